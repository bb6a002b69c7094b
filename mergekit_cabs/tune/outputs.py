"""What `tune` writes from its report besides the console summary: tune.md,
tune.png, and the files in --out (tuned.yml, the baselines' YAMLs and
tune.json too)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from mergekit_cabs._output import WriteError, fmt, publish, pyplot
from mergekit_cabs.tune.compare import markdown_lines, recommendation
from mergekit_cabs.tune.options import BASELINE_FILES, FILES, LABELS, OUT_FILES, TuneError
from mergekit_cabs.tune.report import (
    WEIGHTS_LISTED,
    direction,
    dropped,
    format_summary,
    group_line,
    has_tasks,
    items_of,
    measures_words,
    model_spreads,
    notes_lines,
    objective_label,
    only_setting,
    plain_text,
    searched_settings,
    shown,
    task_info,
    zero_note,
)
from mergekit_cabs.tune.rows import SPLITS


def settings_markdown(report: dict) -> list[str]:
    """tune.md's table of the settings searched (with one setting, a line
    naming it when it is not your config's)."""
    found = searched_settings(report)
    if not found:
        return ["", f"{only_setting(report)}.", ""] if only_setting(report) else []
    out = ["", "## Settings searched", "",
           (f"Each density and order is its own configuration: its masks computed once, its weights and lambda "
            f"searched, its best point scored on the held-out {items_of(report)}. The best on the fit "
            f"{items_of(report)} is chosen (`tuned.yml` writes its density and order). Objective: "
            f"{objective_label(report)}. Planning the settings (a suggested order reads every tensor once) took "
            f"{report['time'].get('settings_s', 0.0):.1f} s before the references were scored."), "",
           "| setting | budget | evaluations | lambda | fit | held-out | masks s | search s | |",
           "|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {row['label']}{' (your config)' if row['your_config'] else ''} | {row['budget']} | "
            f"{row['evaluations']} | {row['lambda']:.4g} | {shown(report, row['fit']):.4f} | "
            f"{shown(report, row['heldout']):.4f} | {row['masks_s']:.1f} | {row['search_s']:.1f} | "
            f"{'chosen' if row['chosen'] else ''} |" for row in found]
    return out + [""]


def render_markdown(report: dict, plot: bool) -> str:
    """tune.md: the run, the chosen numbers, the losses, the store, every point."""
    out = _run_lines(report) + recommended_markdown(report) + settings_markdown(report) + _chosen_lines(report) \
        + _data_lines(report)
    for split in SPLITS:
        out += _loss_lines(report, split)
    if report.get("baselines"):
        out += markdown_lines(report["baselines"], objective_label(report))
    out += _store_lines(report) + _point_lines(report)
    out += ["", "## Plot", ""]
    out.append("![objective along each weight](tune.png)" if plot else
               'Not made: pip install ".[plot]" in a clone ("mergekit-cabs[plot]" once on PyPI) gets it '
               "(matplotlib).")
    return "\n".join(out) + "\n"


def recommended_markdown(report: dict) -> list[str]:
    """tune.md's section on what to merge (`compare.recommendation`): the
    file, why, its lambda and weights; after an interrupted baseline phase,
    a line saying so."""
    rec = recommendation(report)
    what = "your config as written" if not rec["in_out"] else rec["method"]
    out = ["", "## What to merge", ""]
    if report.get("interrupted"):
        out += ["The baselines were interrupted (Ctrl-C) before they finished: no comparison was made, and "
                "only tuned cabs and your config are weighed here.", ""]
    return out + [f"**`mergekit-yaml {rec['file']} OUT`**: {what}, as {rec['reason']}. Its numbers: "
                  f"{numbers_words(report, rec)}."]


def numbers_words(report: dict, rec: dict) -> str:
    """The recommended point's lambda and weights: each one, or beyond
    `WEIGHTS_LISTED` weights each model's count, range and median (every
    weight is in the recommended YAML)."""
    weights, groups = rec["weights"], report["search"].get("weights_of", {})
    if len(weights) <= WEIGHTS_LISTED or not all(n in weights for names in groups.values() for n in names):
        return ", ".join(f"{k} {v:.4g}" for k, v in {"lambda": rec["lambda"], **weights}.items())
    return (f"lambda {rec['lambda']:.4g}; " + "; ".join(f"{label}: {words}" for label, words in
                                                       model_spreads(weights, groups))
            + f" (each weight in {rec['file']})")


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
    "gradient": "gradient (Adam on the exact gradient, minibatches of the fit items, early stopping on a held-back "
                "quarter of them)",
}


NAMES_LISTED = 12  # searched numbers named in tune.md's search line; more are counted


def search_line(search: dict, how: str) -> str:
    """tune.md's line on the search: what it spent, how, over which numbers."""
    names = search["names"]
    over = ", ".join(names) if len(names) <= NAMES_LISTED else f"{len(names)} numbers (lambda and {names[1]} ...)"
    gradient = search.get("gradient")
    if gradient is None:
        return (f"- search: {search['evaluations']} evaluations of budget {search['budget']} ({search['stopped']}); "
                f"{how} over {over}; tolerance {search['tolerance']}")
    return (f"- search: {gradient['steps']} steps of budget {search['budget']} ({search['stopped']}), "
            f"{gradient['items_per_step']} fit items a step, {gradient['validations']} validations and "
            f"{search['evaluations']} evaluations of every fit item: {gradient['evaluation_equivalents']:.1f} "
            f"evaluations' worth of forward passes in all; {how} over {over}")


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
        f"- objective, on the fit {items_of(report)}: {objective_doc(report)}",
        search_line(search, how),
        *([f"- {group_line(report)}"] if report["layer_groups"] else []),
        (f"- time: {t['total_s']:.1f} s for tuned cabs: scoring base and fine-tunes {t['reference_s']:.1f} s, "
         f"masks {t['masks_s']:.1f} s, search {t['search_s']:.1f} s, final scoring {t['final_s']:.1f} s"
         + (f"; then the baselines {t['baselines_s']:.1f} s" if "baselines_s" in t else "")),
        (f"- per evaluation: setting the weights {1000 * t['set_weights_mean_s']:.1f} ms, scoring the fit "
         f"{items_of(report)} "
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
        each = "merged tensor" if report["layer_groups"].get("shape") == "tensor" else "layer"
        out += ["", group_line(report) + f": `tuned.yml` gives each model one mergekit filter per {each}."]
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
        axes[row * columns].set_ylabel(textwrap.fill(f"{objective_label(report)}, fit {items_of(report)}", 36),
                                       fontsize=8)
    fig.suptitle("What tune tried: each point's objective along each searched number", fontsize=10)
    fig.tight_layout()
    return fig


def yaml_texts(report: dict) -> dict[str, str]:
    """Every YAML tune writes, by file name, as text: tuned.yml, then each
    baseline's, as `mergekit-yaml` merges it.  The one home of that text: the
    files in --out, and the printout when they cannot be written."""
    import yaml

    texts = {"tuned.yml": "# Written by mergekit-cabs tune: the weights and lambda it chose (see tune.md).\n"
             + yaml.safe_dump(report["tuned_config"], sort_keys=False)}
    for run in (report.get("baselines") or {}).get("runs", []):
        seed = f" (its random drops: mergekit-yaml --random-seed {run['seed']})" if run["seed"] is not None else ""
        texts[FILES[run["name"]]] = (
            f"# Written by mergekit-cabs tune: the {LABELS[run['name']]} baseline it scored{seed} (see tune.md).\n"
            + yaml.safe_dump(run["config"], sort_keys=False))
    return texts


def yaml_printout(report: dict) -> str:
    """Every YAML of `yaml_texts`, each between a line `=== NAME ===` and a
    line `=== end of NAME ===`: what a user saves by hand when --out cannot
    be written."""
    return "\n".join(f"\n=== {name} ===\n{text.rstrip()}\n=== end of {name} ==="
                     for name, text in yaml_texts(report).items())


def recommended_file(report: dict, out: Path) -> str:
    """Where the recommended configuration is (`compare.recommendation`):
    its file in `out`, or your config's path as given."""
    rec = recommendation(report)
    return str(Path(out) / rec["file"]) if rec["in_out"] else rec["file"]


def merge_line(report: dict, out: Path) -> str:
    """The command's last line: the mergekit-yaml command of what it recommends."""
    return f"Merge it:  mergekit-yaml {recommended_file(report, out)} OUTPUT_DIR"


def write_outputs(report: dict, out: Path) -> list[str]:
    """tune.md, tune.png (with matplotlib), tune.json (with the
    recommendation), the baselines' YAMLs and tuned.yml, into `out`,
    tuned.yml last (there, it means every file is).  A file that cannot be
    written is a one-line TuneError that points to the summary, which the
    command prints before writing (so a full disk loses no search), and to
    the YAMLs `write_or_show` prints."""
    def build(staging: Path) -> list[str]:
        plotted = True
        try:
            make_plot(report, staging / "tune.png")
        except ImportError:
            plotted = False
        texts = yaml_texts(report)
        for name, text in texts.items():
            (staging / name).write_text(text, encoding="utf-8")
        (staging / "tune.md").write_text(render_markdown(report, plotted), encoding="utf-8")
        (staging / "tune.json").write_text(json.dumps({**report, "recommended": recommendation(report)}, indent=1)
                                           + "\n", encoding="utf-8")
        extra = [name for name in texts if name != "tuned.yml"]
        return ["tune.md"] + (["tune.png"] if plotted else []) + ["tune.json", *extra, "tuned.yml"]

    try:
        return publish(out, OUT_FILES + BASELINE_FILES, build)
    except WriteError as error:
        rec = recommendation(report)
        which = rec["file"] if rec["in_out"] else f"your config as written, {rec['file']}"
        raise TuneError(f"tune: {error}; the summary and every YAML it would have written are printed above "
                        f"(the recommended one: {which})") from None


def write_or_show(report: dict, out: Path, echo) -> list[str]:
    """`write_outputs`; when it fails, every YAML (`yaml_printout`) goes to
    `echo` before its one-line error is raised, so whatever the summary
    recommends can be saved from the screen."""
    try:
        return write_outputs(report, out)
    except TuneError:
        echo(yaml_printout(report))
        raise


class Finished:
    """`run_tune`'s `finished=`: keeps a copy of the report it hands over
    once the cabs search has finished, before the baselines start."""

    def __init__(self):
        self.report: dict | None = None

    def __call__(self, report: dict) -> None:
        self.report = copy.deepcopy(report)


def show_interrupted(report: dict, out: Path, echo) -> None:
    """After Ctrl-C during the baselines: the summary of the finished cabs
    search (`report`, as `Finished` kept it), its files written (tuned.yml,
    tune.md, tune.json without the baselines), one line saying so, and the
    merge line."""
    report = {**report, "interrupted": "baselines"}
    echo(format_summary(report))
    written = write_or_show(report, out, echo)
    echo(f"\nInterrupted (Ctrl-C) while the baselines ran: wrote {', '.join(written)} to {out}, the finished cabs "
         "search's result without the baselines")
    echo(merge_line(report, out))


def closing_lines(report: dict, out: Path, written: list[str]) -> list[str]:
    """What the command prints after writing: the files, then the merge line."""
    return ["", f"Wrote {', '.join(written)} to {out}", merge_line(report, out)]
