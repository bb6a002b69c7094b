"""What `tune` shows and writes from its report: the console summary,
tune.md, tune.png, and the files in --out (tuned.yml and tune.json too)."""

from __future__ import annotations

import json
from pathlib import Path

from mergekit_cabs._output import WriteError, fmt, publish, pyplot
from mergekit_cabs.tune.baselines import BASELINE_FILES, FILES, LABELS
from mergekit_cabs.tune.compare import markdown_lines, summary_lines
from mergekit_cabs.tune.data import SPLITS
from mergekit_cabs.tune.options import OUT_FILES, TuneError


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


def items_word(report: dict) -> str:
    """What the fit part of the data is made of, in a word."""
    kinds = {task_info(report, t)["kind"] for t in report.get("data", {})} or {"text"}
    return "windows" if kinds == {"text"} else "items"


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
    lines = [f"settings searched ({len(found)}, {spent}); the best on the fit {items_word(report)} is chosen:",
             f"  {'setting':{width}s} {'evals':>5s} {'fit':>8s} {'held-out':>8s}"]
    lines += [f"  {row['label']:{width}s} {row['evaluations']:5d} {shown(report, row['fit']):8.4f} "
              f"{shown(report, row['heldout']):8.4f}{'  <- chosen' if row['chosen'] else ''}"
              f"{'  (your config)' if row['your_config'] else ''}" for row in found]
    return lines + [""]


def settings_markdown(report: dict) -> list[str]:
    """tune.md's table of the settings searched (with one setting, a line
    naming it when it is not your config's)."""
    found = searched_settings(report)
    if not found:
        return ["", f"{only_setting(report)}.", ""] if only_setting(report) else []
    out = ["", "## Settings searched", "",
           (f"Each density and order is its own configuration: its masks computed once, its weights and lambda "
            f"searched, its best point scored on the held-out {items_word(report)}. The best on the fit "
            f"{items_word(report)} is chosen (`tuned.yml` writes its density and order). Objective: "
            f"{objective_label(report)}. Planning the settings (a suggested order reads every tensor once) took "
            f"{report['time'].get('settings_s', 0.0):.1f} s before the references were scored."), "",
           "| setting | budget | evaluations | lambda | fit | held-out | masks s | search s | |",
           "|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {row['label']}{' (your config)' if row['your_config'] else ''} | {row['budget']} | "
            f"{row['evaluations']} | {row['lambda']:.4g} | {shown(report, row['fit']):.4f} | "
            f"{shown(report, row['heldout']):.4f} | {row['masks_s']:.1f} | {row['search_s']:.1f} | "
            f"{'chosen' if row['chosen'] else ''} |" for row in found]
    return out + [""]


def format_summary(report: dict) -> str:
    """The console table: chosen numbers, then each data set's held-out
    value in its own measure and direction (with the change from your config,
    flagged when it got worse, and normalized gains with the gain
    objective), then the objective."""
    best, start = report["best"], report["start"]
    width = max(12, *(len(k) for k in best["weights"]))
    lines = [group_line(report)] if report["layer_groups"] else []
    lines += notes_lines(report) + settings_lines(report)
    lines += [f"{'':{width}s} {'your config':>11s} {'tuned':>8s}",
              f"{'lambda':{width}s} {start['lambda']:11.3f} {best['lambda']:8.3f}"]
    lines += [f"{k:{width}s} {start['weights'][k]:11.3f} {v:8.3f}" for k, v in best["weights"].items()]
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
    return "\n".join(lines)


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
                       "(from the left of the prompt)")
    return out


# --- tune.md ----------------------------------------------------------------------------


def render_markdown(report: dict, plot: bool) -> str:
    """tune.md: the run, the chosen numbers, the losses, the store, every point."""
    out = _run_lines(report) + settings_markdown(report) + _chosen_lines(report) + _data_lines(report)
    for split in SPLITS:
        out += _loss_lines(report, split)
    if report.get("baselines"):
        out += markdown_lines(report["baselines"], objective_label(report))
    out += _store_lines(report) + _point_lines(report)
    out += ["", "## Plot", ""]
    out.append("![objective along each weight](tune.png)" if plot else
               'Not made: pip install ".[plot]" in a clone ("mergekit-cabs[plot]" once on PyPI) gets it (matplotlib).')
    return "\n".join(out) + "\n"


def objective_doc(report: dict) -> str:
    """The objective in words, with its formulas."""
    gain = report["objective"] == "gain"
    if not has_tasks(report):
        return "the loss on the general text (no --data was given), minimised"
    doc = (
        "the mean over tasks of the normalized gain (L_base - L_merged) / (L_base - L_model) on each model's own "
        "data (1 = as good as that model on its task, 0 = as good as the base)"
        if gain else "the mean loss over tasks"
    ) + measures_words(report)
    if report["general_weight"] is not None:
        doc += (f", plus {report['general_weight']} x the general set's "
                + ("relative loss change (L_base - L_merged) / L_base" if gain else "loss"))
    return doc + (", maximised" if gain else ", minimised")


SEARCH_WORDS = {
    "coordinate": "coordinate-wise (one value at a time, halving steps)",
    "cmaes": "CMA-ES (the cma package)",
}


def _run_lines(report: dict) -> list[str]:
    search, t = report["search"], report["time"]
    how = SEARCH_WORDS[search["optimizer"]]
    if search["optimizer_option"] == "auto":
        how += " (--optimizer auto)"
    if search["optimizer"] == "cmaes":
        how += f", seed {search['seed']}"
    return [
        "# CABS weight tuning", "",
        f"- configuration: `{report['config']}`; base `{report['base_model']}`; device {report['device']}",
        f"- objective, on the fit {items_word(report)}: {objective_doc(report)}",
        (f"- search: {search['evaluations']} evaluations of budget {search['budget']} ({search['stopped']}); "
         f"{how} over {', '.join(search['names'])}; tolerance {search['tolerance']}"),
        *([f"- {group_line(report)}"] if report["layer_groups"] else []),
        (f"- time: {t['total_s']:.1f} s in all: scoring base and fine-tunes {t['reference_s']:.1f} s, masks "
         f"{t['masks_s']:.1f} s, search {t['search_s']:.1f} s, final scoring {t['final_s']:.1f} s"
         + (f", baselines {t['baselines_s']:.1f} s" if "baselines_s" in t else "")),
        (f"- per evaluation: setting the weights {1000 * t['set_weights_mean_s']:.1f} ms, scoring the fit "
         f"{items_word(report)} "
         f"{1000 * t['evaluate_mean_s']:.1f} ms"),
        ("- held out: each file's windows or rows are split evenly along the file (every other one at --fit-fraction "
         "0.5); the search saw only the fit windows, and the held-out ones are scored once, for your config and the "
         "chosen point"),
    ]


def _chosen_lines(report: dict) -> list[str]:
    best, start = report["best"], report["start"]
    notes = notes_lines(report)
    out = ["", "## Chosen", "", *(notes + [""] if notes else []), "| | your config | tuned |", "|---|---|---|",
           f"| lambda | {start['lambda']:.4g} | {best['lambda']:.4g} |"]
    out += [f"| weight `{k}` | {start['weights'][k]:.4g} | {v:.4g}{zero_note(report, k, v)} |"
            for k, v in best["weights"].items()]
    if report["layer_groups"]:
        out += ["", group_line(report) + ": `tuned.yml` gives each model one mergekit filter per layer."]
    if dropped(report):
        out += ["", f"Dropped (weight 0, the merge leaves its task vector out): {', '.join(dropped(report))}."]
    out += ["", ("`tuned.yml` is the configuration with these numbers: `mergekit-yaml tuned.yml OUT` writes the "
                 "model scored here."), ""]
    return out


def _loss_lines(report: dict, split: str) -> list[str]:
    best, start, ref, gain = report["best"], report["start"], report["reference"], report["objective"] == "gain"
    where = "held-out" if split == "heldout" else "fit"
    title = f"## Loss on the {where} windows" if plain_text(report) else f"## Each task on the {where} data"
    out = [title, "",
           "| data | kind | measure | items | base | own model | your config | tuned |"
           + (" gain (your config -> tuned) |" if gain else ""), "|---" * (9 if gain else 8) + "|"]
    other = ref.get("measures", {})
    for task, loss in best[split]["loss"].items():
        info, data = task_info(report, task), report.get("data", {}).get(task, {})
        own = ref["models"].get(task, {}).get(split)
        items = data.get(f"{split}_items", data.get(f"{split}_windows", ""))
        out.append(
            f"| {task} | {info['kind']} | {info['measure']} ({direction(info['lower_is_better'])}) | {items} | "
            f"{ref['base'][split][task]:.4f} | {fmt(own)} | {start[split]['loss'][task]:.4f} | {loss:.4f} |"
            + (f" {start[split]['gain'][task]:.3f} -> {best[split]['gain'][task]:.3f} |" if gain else "")
        )
        for measure, tuned in best[split].get("measures", {}).get(task, {}).items():
            if measure != info["measure"]:
                base = other.get("base", {}).get(split, {}).get(task, {}).get(measure)
                mine = other.get("models", {}).get(task, {}).get(split, {}).get(measure)
                out.append(f"| | | {measure} (higher is better) | | {fmt(base)} | {fmt(mine)} | "
                           f"{start[split]['measures'][task][measure]:.4f} | {tuned:.4f} |" + (" |" if gain else ""))
    return out + ["", f"Objective, {objective_label(report)}: {shown(report, start[split]['score']):.4f} -> "
                      f"{shown(report, best[split]['score']):.4f}", ""]


def _data_lines(report: dict) -> list[str]:
    """What each data set is: its kind, file, measure and weight, items, template, rows cut."""
    out = ["## Data", ""]
    for task, info in report.get("data", {}).items():
        details = {k: v for k, v in info.items() if k not in ("file", "kind", "measure", "lower_is_better", "weight")}
        out.append(f"- {task}: {info['kind']}, `{info['file']}`, measure {info['measure']} "
                   f"({direction(info['lower_is_better'])}), weight {info['weight']:g}; "
                   + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in details.items()))
    return out + [""]


def _store_lines(report: dict) -> list[str]:
    sup, mem = report["supports"], report["memory"]
    share = sup["shared_places"] / max(1, sup["places"])
    return [
        "## Supports and memory", "",
        ("The models' kept places are disjoint: each weight scales its own places only." if sup["disjoint"] else
         f"The models' kept places overlap ({sup['shared_places']:,} places, {share:.2%}, changed by two or more "
         "models): the weights are not independent."),
        (f"{sup['merged_tensors']} tensors rebuilt for each point, {sup['fixed_tensors']} fixed. Memory held: "
         f"{mem['store_bytes'] / 2**20:.1f} MiB for the pruned task vectors "
         f"({mem['store_bytes_per_place']:.2f} bytes per merged weight, on {mem['store_device']}) and "
         f"{mem['model_bytes'] / 2**20:.1f} MiB for the {mem['score_dtype']} model being scored."), "",
    ]


def _point_lines(report: dict) -> list[str]:
    names = report["search"]["names"]
    out = ["## Every point evaluated", "",
           "| # | " + " | ".join(names) + f" | {objective_label(report)}, fit |", "|---" * (len(names) + 2) + "|"]
    for i, p in enumerate(report["points"]):
        values = [p["lambda"], *p["weights"].values()]
        out.append(f"| {i} | " + " | ".join(f"{v:.4g}" for v in values) + f" | {shown(report, p['score']):.4f} |")
    return out


# --- tune.png and the files ---------------------------------------------------------------


def make_plot(report: dict, path: Path) -> None:
    """tune.png (`plot_figure`); ImportError without matplotlib."""
    plt = pyplot()
    fig = plot_figure(report)
    fig.savefig(path)
    plt.close(fig)


def plot_figure(report: dict):
    """The figure of tune.png: the objective (in its own words and
    direction) at every point tried, along each searched number, with the
    chosen value in each panel's legend; the last panel is the best so far
    by evaluation."""
    import textwrap

    plt = pyplot()
    names = report["search"]["names"]
    points = [([p["lambda"], *p["weights"].values()], shown(report, p["score"])) for p in report["points"]]
    best = [report["best"]["lambda"], *report["best"]["weights"].values()]
    chosen = shown(report, report["best"]["fit"]["score"])
    columns = min(len(names) + 1, 5)
    rows = -(-(len(names) + 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.9 * rows + 0.5), dpi=100, sharey=True,
                             squeeze=False)
    axes = axes.ravel()
    for j, (ax, name) in enumerate(zip(axes, names)):
        ax.scatter([x[j] for x, _ in points], [v for _, v in points], s=10, color="0.7", label="every point tried")
        line = sorted((x[j], v) for x, v in points if all(x[k] == best[k] for k in range(len(names)) if k != j))
        if len(line) > 1:
            ax.plot([a for a, _ in line], [v for _, v in line], marker="o", ms=3, lw=1,
                    label="others as chosen")
        ax.scatter([best[j]], [chosen], marker="*", s=120, color="tab:red", zorder=3,
                   label=f"chosen: {best[j]:.3g}" + zero_note(report, name, best[j]))
        ax.set_xlabel("lambda (scales every task vector)" if j == 0 else f"weight of {name}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    ax = axes[len(names)]
    running = [max(v for _, v in points[: i + 1]) if report["objective"] == "gain" else
               min(v for _, v in points[: i + 1]) for i in range(len(points))]
    ax.plot(range(1, len(points) + 1), running, color="tab:red", lw=1.5, label=f"best so far: {chosen:.4g}")
    ax.set_xlabel("evaluations, in order", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    for ax in axes[len(names) + 1:]:
        ax.set_visible(False)
    for row in range(rows):
        axes[row * columns].set_ylabel(textwrap.fill(f"{objective_label(report)}, fit {items_word(report)}", 36),
                                       fontsize=8)
    fig.suptitle("What tune tried: each point's objective along each searched number", fontsize=10)
    fig.tight_layout()
    return fig


def baseline_yamls(report: dict, staging: Path) -> list[str]:
    """Each baseline's configuration, as `mergekit-yaml` merges it, into `staging`; the names written."""
    import yaml

    written = []
    for run in (report.get("baselines") or {}).get("runs", []):
        name = FILES[run["name"]]
        seed = f" (its random drops: mergekit-yaml --random-seed {run['seed']})" if run["seed"] is not None else ""
        (staging / name).write_text(
            f"# Written by mergekit-cabs tune: the {LABELS[run['name']]} baseline it scored{seed} (see tune.md).\n"
            + yaml.safe_dump(run["config"], sort_keys=False), encoding="utf-8")
        written.append(name)
    return written


def write_outputs(report: dict, out: Path) -> list[str]:
    """tune.md, tune.png (with matplotlib), tune.json and tuned.yml, into
    `out`, tuned.yml last (there, it means every file is).  A file that cannot
    be written is a one-line TuneError that points to the summary, which the
    command prints before writing (so a full disk loses no search)."""
    import yaml

    def build(staging: Path) -> list[str]:
        plotted = True
        try:
            make_plot(report, staging / "tune.png")
        except ImportError:
            plotted = False
        (staging / "tuned.yml").write_text(
            "# Written by mergekit-cabs tune: the weights and lambda it chose (see tune.md).\n"
            + yaml.safe_dump(report["tuned_config"], sort_keys=False), encoding="utf-8")
        (staging / "tune.md").write_text(render_markdown(report, plotted), encoding="utf-8")
        (staging / "tune.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        extra = baseline_yamls(report, staging)
        return ["tune.md"] + (["tune.png"] if plotted else []) + ["tune.json", *extra, "tuned.yml"]

    try:
        return publish(out, OUT_FILES + BASELINE_FILES, build)
    except WriteError as error:
        raise TuneError(f"tune: {error}; the result (weights, lambda, scores) is printed above") from None
