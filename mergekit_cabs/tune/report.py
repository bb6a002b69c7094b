"""What `tune` shows and writes from its report: the console summary,
tune.md, tune.png, and the files in --out (tuned.yml and tune.json too)."""

from __future__ import annotations

from mergekit_cabs._output import fmt
from mergekit_cabs.tune.compare import CABS, bound_lines, recommendation, summary_lines
from mergekit_cabs.tune.rows import items_word


def task_info(report: dict, task: str) -> dict:
    """A task's kind, measure, direction and weight (text's loss where the report predates them)."""
    info = report.get("data", {}).get(task, {})
    return {"kind": info.get("kind", "text"), "measure": info.get("measure", "loss"),
            "lower_is_better": info.get("lower_is_better", True), "weight": info.get("weight", 1.0)}


def direction(lower: bool) -> str:
    return "lower is better" if lower else "higher is better"


def plain_text(report: dict) -> bool:
    """Whether every task is text scored by its loss, with weight 1 (the words of old reports then)."""
    return all(task_info(report, t) == task_info({}, t) for t in report["reference"]["models"])


def measures_words(report: dict) -> str:
    """Which measure each task contributes, and its weight, unless every task is plain text."""
    if plain_text(report):
        return ""
    parts = []
    for task in report["reference"]["models"]:
        info = task_info(report, task)
        weight = f" x {info['weight']:g}" if info["weight"] != 1 else ""
        parts.append(f"{task}'s {info['measure']}{weight}")
    return f" (of {', '.join(parts)})"


def objective_label(report: dict) -> str:
    """What the objective is, in a few words, with its direction."""
    general = report["general_weight"]
    which = "weighted mean" if any(task_info(report, t)["weight"] != 1 for t in report["reference"]["models"]) \
        else "mean"
    if report["objective"] == "gain":
        extra = f" + {general:g} x general text's relative loss change" if general is not None else ""
        return f"{which} normalized gain over tasks{measures_words(report)}{extra} (higher is better)"
    if not has_tasks(report):
        return "loss on the general text (lower is better)"
    extra = f" + {general:g} x general text's loss" if general is not None else ""
    noun = "loss" if plain_text(report) else "value (a higher-is-better measure counted negative)"
    return f"{which} {noun} over tasks{measures_words(report)}{extra} (lower is better)"


def items_of(report: dict) -> str:
    """What the fit part of the data is made of, in a word."""
    return items_word({task_info(report, t)["kind"] for t in report.get("data", {})})


def has_tasks(report: dict) -> bool:
    """Whether the run had per-model data (not --general alone)."""
    return bool(report["reference"]["models"])


def shown(report: dict, score: float) -> float:
    """The objective as the report shows it: the gain, or the loss itself
    (the search maximises minus the loss)."""
    return -score if report["objective"] == "loss" else score


def dropped(report: dict) -> list[str]:
    """The models whose chosen weight is 0 (in every layer group): the merge leaves them out."""
    best = report["best"]["weights"]
    return [label for label, names in report["search"]["weights_of"].items() if all(best[n] == 0 for n in names)]


def zero_note(report: dict, name: str, value: float) -> str:
    """What a chosen weight of 0 means: the model is dropped, or (one layer
    group's weight) left out of that group's tensors; "" for other values."""
    if value != 0 or name == "lambda":
        return ""
    gone = dropped(report)
    whole = any(name in report["search"]["weights_of"][label] for label in gone)
    return " (dropped)" if whole else " (left out of these tensors)"


def group_line(report: dict) -> str | None:
    """The layer groups in one line, or None without them."""
    groups = report["layer_groups"]
    if groups is None:
        return None
    if groups.get("shape") == "tensor":
        return f"one weight per model for each of the {groups['count']} merged tensors"
    return (f"layer groups ({groups['count']} of consecutive decoder layers, then the tensors outside them): "
            + ", ".join(g["name"] for g in groups["groups"]))


def notes_lines(report: dict) -> list[str]:
    """The lines the run said about your config (bounds widened to include
    it; tuned.yml below it on the fit windows), each once."""
    return list(report["search"].get("notes", []))


def searched_settings(report: dict) -> list[dict]:
    """The (density, order) settings searched, when there were several (else [])."""
    found = report.get("settings", {}).get("searched", [])
    return found if len(found) > 1 else []


def only_setting(report: dict) -> str | None:
    """The one setting searched, labelled, when it is not your config's
    masks (--densities or --orders gave one other setting), else None."""
    found = report.get("settings", {}).get("searched", [])
    if len(found) != 1 or found[0]["your_config"]:
        return None
    return f"searched one setting, not your config's: {found[0]['label']} (tuned.yml writes it)"


def settings_lines(report: dict) -> list[str]:
    """The console table of the settings searched: each one's evaluations
    and best objective on the fit and held-out data; the chosen one marked
    (with one setting other than your config's, a line naming it)."""
    found = searched_settings(report)
    if not found:
        return [only_setting(report), ""] if only_setting(report) else []
    width = max(len(row["label"]) for row in found)
    total = report["settings"]
    spent = (f"{total['evaluations']} evaluations of --total-budget {total['total_budget']}"
             if total["total_budget"] is not None else f"{total['evaluations']} evaluations, --budget each")
    lines = [f"settings searched ({len(found)}, {spent}); the best on the fit {items_of(report)} is chosen:",
             f"  {'setting':{width}s} {'evals':>5s} {'fit':>8s} {'held-out':>8s}"]
    lines += [f"  {row['label']:{width}s} {row['evaluations']:5d} {shown(report, row['fit']):8.4f} "
              f"{shown(report, row['heldout']):8.4f}{'  <- chosen' if row['chosen'] else ''}"
              f"{'  (your config)' if row['your_config'] else ''}" for row in found]
    return lines + [""]


def format_summary(report: dict) -> str:
    """The console table: chosen numbers, then each data set's held-out
    value in its own measure and direction (with the change from your config,
    flagged when it got worse, and normalized gains with the gain
    objective), then the objective."""
    best, start = report["best"], report["start"]
    lines = [group_line(report)] if report["layer_groups"] else []
    lines += notes_lines(report) + settings_lines(report) + weight_lines(report)
    if dropped(report):
        lines.append(f"dropped: {', '.join(dropped(report))} (weight 0: the merge leaves its task vector out)")
    lines += ["", *held_out_lines(report)]
    if not has_tasks(report):
        lines.append("no --data: the objective is the loss on the general text")
    lines += accuracy_lines(report) + truncation_lines(report) + shared_lines(report)
    lines.append(
        f"objective ({report['objective']}): {objective_label(report)}, your config -> tuned: "
        f"fit {shown(report, start['fit']['score']):.4f} -> {shown(report, best['fit']['score']):.4f}, "
        f"held-out {shown(report, start['heldout']['score']):.4f} -> {shown(report, best['heldout']['score']):.4f}"
    )
    if report.get("baselines"):
        lines += ["", *summary_lines(report["baselines"], objective_label(report))]
    else:
        lines += bound_lines([{"method": "cabs (tuned)", "on_bounds": report["search"].get("on_bounds", [])}])
    return "\n".join(lines + ["", *recommended_lines(report)])


def recommended_lines(report: dict) -> list[str]:
    """What the run recommends merging (`compare.recommendation`), why, and
    its numbers: a baseline's listed here, tuned cabs's and your config's
    named by their column of the table above.  After an interrupted baseline
    phase, a line says so first."""
    rec = recommendation(report)
    lines = ["the baselines were interrupted (Ctrl-C): no comparison; tuned cabs and your config only"] \
        if report.get("interrupted") else []
    if rec["method"] == CABS:
        return lines + [f"recommended: {CABS}, tuned.yml, the tuned column above: {rec['reason']}"]
    if not rec["in_out"]:
        return lines + [f"recommended: your config as written, {rec['file']}, the your config column above: "
                        f"{rec['reason']}"]
    head = f"recommended: {rec['method']}, {rec['file']}: {rec['reason']}; its numbers:"
    if len(rec["weights"]) > WEIGHTS_LISTED:
        return lines + [head, f"lambda {rec['lambda']:.3f}; the weights (each in {rec['file']}):",
                        *(f"  {label}: {spread([rec['weights'][n] for n in names])}"
                          for label, names in report["search"]["weights_of"].items())]
    width = max(12, *(len(k) for k in rec["weights"]))
    return lines + [head, f"{'lambda':{width}s} {rec['lambda']:8.3f}",
                    *(f"{k:{width}s} {v:8.3f}" for k, v in rec["weights"].items())]


def spread(values) -> str:
    """Many weights in a few words: how many, their range and median."""
    ordered = sorted(values)
    return (f"{len(ordered)} weights, {ordered[0]:.3f} to {ordered[-1]:.3f}, median "
            f"{ordered[len(ordered) // 2]:.3f}")


def model_spreads(weights: dict[str, float], weights_of: dict[str, list[str]]) -> list[tuple[str, str]]:
    """Each model's label and its weights in a few words (`spread`)."""
    return [(label, spread(weights[n] for n in names)) for label, names in weights_of.items()]


WEIGHTS_LISTED = 24  # weights the console lists one by one; more are summed up per model (tune.md lists each)


def weight_lines(report: dict) -> list[str]:
    """Lambda and the weights, your config's and the chosen ones: each one,
    or beyond `WEIGHTS_LISTED` of them each model's range and median."""
    best, start = report["best"], report["start"]
    if len(best["weights"]) <= WEIGHTS_LISTED:
        width = max(12, *(len(k) for k in best["weights"]))
        return ([f"{'':{width}s} {'your config':>11s} {'tuned':>8s}",
                 f"{'lambda':{width}s} {start['lambda']:11.3f} {best['lambda']:8.3f}"]
                + [f"{k:{width}s} {start['weights'][k]:11.3f} {v:8.3f}" for k, v in best["weights"].items()])
    out = [f"lambda: your config {start['lambda']:.3f}, tuned {best['lambda']:.3f}; the weights (each in tune.md and "
           "tuned.yml):"]
    weights_of = report["search"]["weights_of"]
    for (label, names), (_, tuned) in zip(weights_of.items(), model_spreads(best["weights"], weights_of)):
        mine = sorted(start["weights"][n] for n in names)
        out.append(f"  {label}: your config {mine[0]:.3f} to {mine[-1]:.3f}; tuned {tuned}")
    return out


def worse(lower: bool, start: float, tuned: float) -> bool:
    """Whether `tuned` is worse than `start` in the measure's direction."""
    return tuned > start if lower else tuned < start


def held_out_lines(report: dict) -> list[str]:
    """Per data set, its held-out measure for base, own model, your config
    (the start) and tuned point, the change config -> tuned (flagged "WORSE" when it got
    worse), the gain; then any other measure (accuracy) the same way."""
    best, start, gain, ref = report["best"], report["start"], report["objective"] == "gain", report["reference"]
    labels = [task_info(report, t)["measure"] + " (v)" for t in best["heldout"]["loss"]]
    labels += [m + " (^)" for by in best["heldout"].get("measures", {}).values() for m in by]
    mw = max(14, *(len(x) for x in labels))
    lines = [f"held-out {'':14s} {'measure':<{mw}s} {'base':>8s} {'own':>8s} {'config':>8s} {'tuned':>8s} "
             f"{'change':>8s}" + (f" {'gain':>7s}" if gain else "")]
    other = ref.get("measures", {})
    for task, value in best["heldout"]["loss"].items():
        info = task_info(report, task)
        was = start["heldout"]["loss"][task]
        flag = "  WORSE than your config" if worse(info["lower_is_better"], was, value) else ""
        label = f"{task} ({info['kind']})"
        lines.append(
            f"  {label[:20]:20s} {info['measure'] + (' (v)' if info['lower_is_better'] else ' (^)'):<{mw}s} "
            f"{ref['base']['heldout'][task]:8.4f} {fmt(ref['models'].get(task, {}).get('heldout'), '8.4f'):>8s} "
            f"{was:8.4f} {value:8.4f} {value - was:+8.4f}" + (f" {best['heldout']['gain'][task]:7.3f}" if gain else "")
            + flag)
        for measure, tuned in best["heldout"].get("measures", {}).get(task, {}).items():
            if measure == info["measure"]:
                continue
            base = other.get("base", {}).get("heldout", {}).get(task, {}).get(measure)
            own = other.get("models", {}).get(task, {}).get("heldout", {}).get(measure)
            was = start["heldout"]["measures"][task][measure]
            lines.append(f"  {'':20s} {measure + ' (^)':<{mw}s} {fmt(base, '8.4f'):>8s} {fmt(own, '8.4f'):>8s} "
                         f"{was:8.4f} {tuned:8.4f} {tuned - was:+8.4f}"
                         + ("  WORSE than your config" if tuned < was else ""))
    if not plain_text(report) or any(line.endswith("your config") for line in lines):
        lines.append("(v): lower is better, (^): higher is better; config: your configuration as written; "
                     "change: tuned - config")
    return lines


def accuracy_lines(report: dict) -> list[str]:
    """For each task with an accuracy, in words: does the tuned point beat your config on held-out accuracy."""
    out = []
    for task, by in report["best"]["heldout"].get("measures", {}).items():
        if "acc" in by:
            was, now = report["start"]["heldout"]["measures"][task]["acc"], by["acc"]
            verdict = "beats your config" if now > was else "does NOT beat your config"
            out.append(f"{task}: held-out accuracy {was:.4f} -> {now:.4f}: the tuned point {verdict}")
    return out


def shared_lines(report: dict) -> list[str]:
    """Which fine-tune is "own" for each task that belongs to no one model (lm-eval's)."""
    return [f"{task}: own = the best fine-tune on it ({best['fit']} on fit, {best['heldout']} held out)"
            for task, best in report["reference"].get("best_of", {}).items()]


def truncation_lines(report: dict) -> list[str]:
    """A line per data set whose rows or questions were cut to --window."""
    out = []
    for task, info in report.get("data", {}).items():
        cut = info.get("truncated_rows", info.get("truncated_questions", 0))
        if cut:
            out.append(f"{task}: {cut} scored rows longer than --window {info['window']} were cut "
                       f"({info.get('truncation', 'from the left of the prompt')})")
    return out


# --- tune.md ----------------------------------------------------------------------------


# --- tune.png and the files ---------------------------------------------------------------
