"""What `tune` shows and writes from its report: the console summary,
tune.md, tune.png, and the files in --out (tuned.yml and tune.json too)."""

from __future__ import annotations

import json
from pathlib import Path

from mergekit_cabs._output import fmt, publish, pyplot
from mergekit_cabs.tune.data import SPLITS
from mergekit_cabs.tune.options import OUT_FILES


def format_summary(report: dict) -> str:
    """The console table: chosen numbers and held-out scores per task."""
    best, start = report["best"], report["start"]
    lines = [f"{'':12s} {'start':>8s} {'tuned':>8s}", f"{'lambda':12s} {start['lambda']:8.3f} {best['lambda']:8.3f}"]
    lines += [f"{k:12s} {start['weights'][k]:8.3f} {v:8.3f}" for k, v in best["weights"].items()]
    lines += ["", f"held-out {'task':12s} {'base':>8s} {'own':>8s} {'start':>8s} {'tuned':>8s} {'gain':>7s}"]
    ref = report["reference"]
    for task, loss in best["heldout"]["loss"].items():
        own = ref["models"].get(task, {}).get("heldout")
        lines.append(
            f"{'':9s}{task:12s} {ref['base']['heldout'][task]:8.4f} {fmt(own, '8.4f'):>8s} "
            f"{start['heldout']['loss'][task]:8.4f} {loss:8.4f} {best['heldout']['gain'][task]:7.3f}"
        )
    lines.append(
        f"objective ({report['objective']}): fit {start['fit']['score']:.4f} -> {best['fit']['score']:.4f}, "
        f"held-out {start['heldout']['score']:.4f} -> {best['heldout']['score']:.4f}"
    )
    return "\n".join(lines)


# --- tune.md ----------------------------------------------------------------------------


def render_markdown(report: dict, plot: bool) -> str:
    """tune.md: the run, the chosen numbers, the losses, the store, every point."""
    out = _run_lines(report) + _chosen_lines(report)
    for split in SPLITS:
        out += _loss_lines(report, split)
    out += _store_lines(report) + _point_lines(report)
    out += ["", "## Plot", ""]
    out.append("![objective along each weight](tune.png)" if plot else
               'Not made: pip install "mergekit-cabs[plot]" gets it (matplotlib).')
    return "\n".join(out) + "\n"


def objective_doc(report: dict) -> str:
    """The objective in words."""
    gain = report["objective"] == "gain"
    doc = (
        "the mean over tasks of the normalized gain (L_base - L_merged) / (L_base - L_model) on each model's own "
        "data (1 = as good as that model on its task, 0 = as good as the base)"
        if gain else "minus the mean loss over tasks"
    )
    if report["general_weight"] is not None:
        doc += (f", plus {report['general_weight']} x the general set's "
                + ("relative loss change (L_base - L_merged) / L_base" if gain else "loss (subtracted)"))
    return doc


def _run_lines(report: dict) -> list[str]:
    search, t = report["search"], report["time"]
    return [
        "# CABS weight tuning", "",
        f"- configuration: `{report['config']}`; base `{report['base_model']}`; device {report['device']}",
        f"- objective, maximised on the fit windows: {objective_doc(report)}",
        (f"- search: {search['evaluations']} evaluations of budget {search['budget']} ({search['stopped']}); "
         f"coordinate-wise over {', '.join(search['names'])}; step tolerance {search['tolerance']}"),
        (f"- time: {t['total_s']:.1f} s in all: scoring base and fine-tunes {t['reference_s']:.1f} s, masks "
         f"{t['masks_s']:.1f} s, search {t['search_s']:.1f} s, final scoring {t['final_s']:.1f} s"),
        (f"- per evaluation: setting the weights {1000 * t['set_weights_mean_s']:.1f} ms, scoring the fit windows "
         f"{1000 * t['evaluate_mean_s']:.1f} ms"),
        ("- held out: each file's windows are split evenly along the file (every other window at --fit-fraction "
         "0.5); the search saw only the fit windows, and the held-out ones are scored once, for the start and the "
         "chosen point"),
    ]


def _chosen_lines(report: dict) -> list[str]:
    best, start = report["best"], report["start"]
    out = ["", "## Chosen", "", "| | start | tuned |", "|---|---|---|",
           f"| lambda | {start['lambda']:.4g} | {best['lambda']:.4g} |"]
    out += [f"| weight `{k}` | {start['weights'][k]:.4g} | {v:.4g} |" for k, v in best["weights"].items()]
    out += ["", ("`tuned.yml` is the configuration with these numbers: `mergekit-yaml tuned.yml OUT` writes the "
                 "model scored here."), ""]
    return out


def _loss_lines(report: dict, split: str) -> list[str]:
    best, start, ref = report["best"], report["start"], report["reference"]
    out = [f"## Loss on the {'held-out' if split == 'heldout' else 'fit'} windows", "",
           "| data | windows | base | own model | start | tuned | gain (start -> tuned) |",
           "|---|---|---|---|---|---|---|"]
    for task, loss in best[split]["loss"].items():
        own = ref["models"].get(task, {}).get(split)
        windows = report["data"][task][f"{split}_windows"]
        out.append(
            f"| {task} | {windows} | {ref['base'][split][task]:.4f} | {fmt(own)} | "
            f"{start[split]['loss'][task]:.4f} | {loss:.4f} | "
            f"{start[split]['gain'][task]:.3f} -> {best[split]['gain'][task]:.3f} |"
        )
    return out + ["", f"Objective: {start[split]['score']:.4f} -> {best[split]['score']:.4f}", ""]


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
           "| # | " + " | ".join(names) + " | objective (fit) |", "|---" * (len(names) + 2) + "|"]
    for i, p in enumerate(report["points"]):
        values = [p["lambda"], *p["weights"].values()]
        out.append(f"| {i} | " + " | ".join(f"{v:.4g}" for v in values) + f" | {p['score']:.4f} |")
    return out


# --- tune.png and the files ---------------------------------------------------------------


def make_plot(report: dict, path: Path) -> None:
    """The fit objective against each searched number; ImportError without matplotlib."""
    plt = pyplot()
    names = report["search"]["names"]
    points = [([p["lambda"], *p["weights"].values()], p["score"]) for p in report["points"]]
    best = [report["best"]["lambda"], *report["best"]["weights"].values()]
    fig, axes = plt.subplots(1, len(names), figsize=(2.8 * len(names), 2.9), dpi=100, sharey=True)
    for j, (ax, name) in enumerate(zip(axes, names)):
        ax.scatter([x[j] for x, _ in points], [s for _, s in points], s=10, color="0.7", label="all points")
        line = sorted((x[j], s) for x, s in points if all(x[k] == best[k] for k in range(len(names)) if k != j))
        ax.plot([v for v, _ in line], [s for _, s in line], marker="o", ms=4, label="others at the best")
        ax.axvline(best[j], color="tab:red", lw=1, ls="--")
        ax.set_title(name if j == 0 else f"weight: {name}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"objective on fit windows ({report['objective']})", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(report: dict, out: Path) -> list[str]:
    """tuned.yml, tune.md, tune.png (with matplotlib) and tune.json, into `out`."""
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
        return ["tuned.yml", "tune.md"] + (["tune.png"] if plotted else []) + ["tune.json"]

    return publish(out, OUT_FILES, build)
