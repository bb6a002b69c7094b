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


def objective_label(report: dict) -> str:
    """What the objective is, in a few words, with its direction."""
    general = report["general_weight"]
    if report["objective"] == "gain":
        extra = f" + {general:g} x general text's relative loss change" if general is not None else ""
        return f"mean normalized gain over tasks{extra} (higher is better)"
    if not has_tasks(report):
        return "loss on the general text (lower is better)"
    extra = f" + {general:g} x general text's loss" if general is not None else ""
    return f"mean loss over tasks{extra} (lower is better)"


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


def format_summary(report: dict) -> str:
    """The console table: chosen numbers and held-out losses per data set
    (and normalized gains with the gain objective), then the objective."""
    best, start, gain = report["best"], report["start"], report["objective"] == "gain"
    width = max(12, *(len(k) for k in best["weights"]))
    lines = [group_line(report)] if report["layer_groups"] else []
    lines += notes_lines(report)
    lines += [f"{'':{width}s} {'your config':>11s} {'tuned':>8s}",
              f"{'lambda':{width}s} {start['lambda']:11.3f} {best['lambda']:8.3f}"]
    lines += [f"{k:{width}s} {start['weights'][k]:11.3f} {v:8.3f}" for k, v in best["weights"].items()]
    if dropped(report):
        lines.append(f"dropped: {', '.join(dropped(report))} (weight 0: the merge leaves its task vector out)")
    head = f"held-out {'loss of':12s} {'base':>8s} {'own':>8s} {'your config':>11s} {'tuned':>8s}"
    lines += ["", head + (f" {'gain':>7s}" if gain else "")]
    ref = report["reference"]
    for task, loss in best["heldout"]["loss"].items():
        own = ref["models"].get(task, {}).get("heldout")
        lines.append(
            f"{'':9s}{task:12s} {ref['base']['heldout'][task]:8.4f} {fmt(own, '8.4f'):>8s} "
            f"{start['heldout']['loss'][task]:11.4f} {loss:8.4f}"
            + (f" {best['heldout']['gain'][task]:7.3f}" if gain else "")
        )
    if not has_tasks(report):
        lines.append("no --data: the objective is the loss on the general text")
    lines.append(
        f"objective ({report['objective']}): {objective_label(report)}, your config -> tuned: "
        f"fit {shown(report, start['fit']['score']):.4f} -> {shown(report, best['fit']['score']):.4f}, "
        f"held-out {shown(report, start['heldout']['score']):.4f} -> {shown(report, best['heldout']['score']):.4f}"
    )
    if report.get("baselines"):
        lines += ["", *summary_lines(report["baselines"], objective_label(report))]
    return "\n".join(lines)


# --- tune.md ----------------------------------------------------------------------------


def render_markdown(report: dict, plot: bool) -> str:
    """tune.md: the run, the chosen numbers, the losses, the store, every point."""
    out = _run_lines(report) + _chosen_lines(report)
    for split in SPLITS:
        out += _loss_lines(report, split)
    if report.get("baselines"):
        out += markdown_lines(report["baselines"], objective_label(report))
    out += _store_lines(report) + _point_lines(report)
    out += ["", "## Plot", ""]
    out.append("![objective along each weight](tune.png)" if plot else
               'Not made: pip install "mergekit-cabs[plot]" gets it (matplotlib).')
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
    )
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
        f"- objective, on the fit windows: {objective_doc(report)}",
        (f"- search: {search['evaluations']} evaluations of budget {search['budget']} ({search['stopped']}); "
         f"{how} over {', '.join(search['names'])}; tolerance {search['tolerance']}"),
        *([f"- {group_line(report)}"] if report["layer_groups"] else []),
        (f"- time: {t['total_s']:.1f} s in all: scoring base and fine-tunes {t['reference_s']:.1f} s, masks "
         f"{t['masks_s']:.1f} s, search {t['search_s']:.1f} s, final scoring {t['final_s']:.1f} s"
         + (f", baselines {t['baselines_s']:.1f} s" if "baselines_s" in t else "")),
        (f"- per evaluation: setting the weights {1000 * t['set_weights_mean_s']:.1f} ms, scoring the fit windows "
         f"{1000 * t['evaluate_mean_s']:.1f} ms"),
        ("- held out: each file's windows are split evenly along the file (every other window at --fit-fraction "
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
    out = [f"## Loss on the {'held-out' if split == 'heldout' else 'fit'} windows", "",
           "| data | windows | base | own model | your config | tuned |"
           + (" gain (your config -> tuned) |" if gain else ""),
           "|---" * (7 if gain else 6) + "|"]
    for task, loss in best[split]["loss"].items():
        own = ref["models"].get(task, {}).get(split)
        windows = report["data"][task][f"{split}_windows"]
        out.append(
            f"| {task} | {windows} | {ref['base'][split][task]:.4f} | {fmt(own)} | "
            f"{start[split]['loss'][task]:.4f} | {loss:.4f} |"
            + (f" {start[split]['gain'][task]:.3f} -> {best[split]['gain'][task]:.3f} |" if gain else "")
        )
    return out + ["", f"Objective, {objective_label(report)}: {shown(report, start[split]['score']):.4f} -> "
                      f"{shown(report, best[split]['score']):.4f}", ""]


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
        axes[row * columns].set_ylabel(textwrap.fill(objective_label(report) + ", fit windows", 36), fontsize=8)
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
