"""Held-out quality of merges whose scale was picked on the same validation data.

Needs the model family from ``benchmarks/tune_models.py`` (a small Llama base
trained here on CPU and four specialists: Python, C, JavaScript, docs).
In one run, on the same windows of each specialist's own held-out text:

* task_arithmetic, ties and dare_ties, with one lambda picked from a grid;
* cabs with one lambda picked from the same grid;
* cabs tuned by ``mergekit-cabs tune`` (per-model weights and lambda).

Every candidate is scored on the *fit* windows (every other window of each
data file, spread along it, as ``tune`` splits it at its default
--fit-fraction 0.5); the chosen one is then scored once on the *held-out*
windows (the windows in between).  Reported per task: held-out loss and normalized gain
(L_base - L) / (L_base - L_own) with 95% bootstrap intervals over windows
(paired: the same resampled windows for base, own model and merge), the mean
gain over tasks, the evaluations each search spent and its wall time.

    python benchmarks/tune_models.py --out /tmp/tune-bench
    python benchmarks/tune_compare.py --models-dir /tmp/tune-bench --out benchmarks/results/tune
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

KINDS = ("python", "c", "javascript", "docs")
GRID = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5)
DENSITY = 0.25


def method_config(method: str, root: Path, lam: float) -> dict:
    models = []
    for kind in KINDS:
        params = {"weight": 1.0}
        if method != "task_arithmetic":
            params["density"] = DENSITY
        models.append({"model": str(root / kind), "parameters": params})
    params = {"lambda": lam}
    if method == "cabs":
        params["block_size"] = 256
    return {"merge_method": method, "base_model": str(root / "base"), "models": models,
            "parameters": params, "dtype": "float32"}


def bootstrap(base: torch.Tensor, own: torch.Tensor | None, merged: torch.Tensor, draws: int, seed: int):
    """Normalized gain (or, without `own`, relative loss change) on resampled windows."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(base), (draws, len(base)), generator=gen)
    b, m = base[idx].mean(1), merged[idx].mean(1)
    return (b - m) / ((b - own[idx].mean(1)) if own is not None else b)


def interval(samples: torch.Tensor) -> list[float]:
    q = torch.quantile(samples.double(), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return [float(q[0]), float(q[1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/tune-bench"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tune"))
    parser.add_argument("--max-windows", type=int, default=32, help="windows per file and split")
    parser.add_argument("--budget", type=int, default=60, help="tune's evaluation budget")
    parser.add_argument("--draws", type=int, default=2000, help="bootstrap resamples")
    args = parser.parse_args()

    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers.utils import logging as hf_logging

    from mergekit_cabs import tune as tn

    hf_logging.disable_progress_bar()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = args.models_dir.resolve()
    data = [f"{kind}={root / 'data' / f'{kind}.txt'}" for kind in KINDS]
    general = root / "data" / "general.txt"
    prep = tn.prepare(root / "cabs.yml", data, general=general, max_windows=args.max_windows, budget=args.budget)
    tasks = {t.name: t for t in prep.tasks}
    batch = tn.DEFAULTS["batch_size"]

    def load(path) -> torch.nn.Module:
        return tn.load_model(str(path), "cpu")

    def score(model, split: str) -> dict[str, torch.Tensor]:
        return tn.task_losses(model, prep.tasks, split, batch)

    base_losses = {s: score(load(root / "base"), s) for s in tn.SPLITS}
    own = {}
    for kind in KINDS:
        model = load(root / kind)
        own[kind] = {s: tn.window_losses(model, getattr(tasks[kind], s), batch) for s in tn.SPLITS}
    reference = {"base": {s: {k: float(v.mean()) for k, v in base_losses[s].items()} for s in tn.SPLITS},
                 "models": {k: {s: float(own[k][s].mean()) for s in tn.SPLITS} for k in KINDS}}
    objective = tn.split_objectives("gain", list(KINDS), reference, tn.DEFAULTS["general_weight"])

    results = {}
    work = Path(tempfile.mkdtemp(prefix="tune-compare-"))
    try:
        for method in ("task_arithmetic", "ties", "dare_ties", "cabs"):
            started = time.perf_counter()
            grid = []
            for lam in GRID:
                out = work / f"{method}-{lam}"
                config = MergeConfiguration.model_validate(method_config(method, root, lam))
                run_merge(config, str(out), MergeOptions(quiet=True, copy_tokenizer=False, random_seed=0))
                fit = {k: float(v.mean()) for k, v in score(load(out), "fit").items()}
                grid.append({"lambda": lam, "fit_loss": fit, "score": objective["fit"].score(fit)})
                print(f"{method:16s} lambda {lam:5.2f}  fit objective {grid[-1]['score']:.4f}", flush=True)
            best = max(grid, key=lambda g: g["score"])
            search_s = time.perf_counter() - started
            heldout = score(load(work / f"{method}-{best['lambda']}"), "heldout")
            results[f"{method} (lambda grid)"] = {"lambda": best["lambda"], "grid": grid, "evaluations": len(GRID),
                                                  "search_s": search_s, "heldout": heldout}
        started = time.perf_counter()
        report = tn.run_tune(prep, budget=args.budget, quiet=False)
        tune_s = time.perf_counter() - started
        heldout = {k: torch.tensor(v, dtype=torch.float64)
                   for k, v in report["best"]["heldout"]["window_losses"].items()}
        results["cabs tuned"] = {"lambda": report["best"]["lambda"], "weights": report["best"]["weights"],
                                 "evaluations": report["search"]["evaluations"], "search_s": tune_s,
                                 "tune_time": report["time"], "heldout": heldout,
                                 "memory": report["memory"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    names = list(KINDS) + [tn.GENERAL]
    table = {}
    for label, r in results.items():
        row = {"evaluations": r["evaluations"], "search_s": r["search_s"], "lambda": r["lambda"],
               "weights": r.get("weights"), "tasks": {}}
        draws = []
        for i, name in enumerate(names):
            merged = r["heldout"][name]
            ref_own = own[name]["heldout"] if name in own else None
            samples = bootstrap(base_losses["heldout"][name], ref_own, merged, args.draws, seed=i)
            if name in own:
                draws.append(samples)
            base_mean = float(base_losses["heldout"][name].mean())
            point = (base_mean - float(merged.mean())) / (
                (base_mean - float(ref_own.mean())) if ref_own is not None else base_mean)
            row["tasks"][name] = {"loss": float(merged.mean()), "gain": point, "gain_ci": interval(samples)}
        mean_draws = torch.stack(draws).mean(0)
        row["mean_gain"] = sum(row["tasks"][k]["gain"] for k in KINDS) / len(KINDS)
        row["mean_gain_ci"] = interval(mean_draws)
        table[label] = row

    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "models_dir": str(root), "grid": GRID, "density": DENSITY, "budget": args.budget,
        "windows": {k: {"fit": len(t.fit), "heldout": len(t.heldout), "window": int(t.fit.shape[1])}
                    for k, t in tasks.items()},
        "reference": {"base_heldout": {k: float(v.mean()) for k, v in base_losses["heldout"].items()},
                      "own_heldout": {k: float(v["heldout"].mean()) for k, v in own.items()}},
        "methods": table,
        "tune": {k: results["cabs tuned"][k] for k in ("tune_time", "memory", "weights", "lambda")},
        "torch_threads": torch.get_num_threads(),
    }
    (args.out / "tune_compare.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = ["| method | chosen | evaluations | search wall | " + " | ".join(names) + " | mean gain (4 tasks) |",
             "|---" * (len(names) + 5) + "|"]
    for label, row in table.items():
        chosen = f"lambda {row['lambda']:g}"
        if row["weights"]:
            chosen += ", w " + "/".join(f"{w:g}" for w in row["weights"].values())
        cells = [f"{row['tasks'][n]['gain']:.3f} [{row['tasks'][n]['gain_ci'][0]:.3f}, "
                 f"{row['tasks'][n]['gain_ci'][1]:.3f}]" for n in names]
        lines.append(f"| {label} | {chosen} | {row['evaluations']} | {row['search_s']:.0f} s | " + " | ".join(cells)
                     + f" | {row['mean_gain']:.3f} [{row['mean_gain_ci'][0]:.3f}, {row['mean_gain_ci'][1]:.3f}] |")
    (args.out / "tune_compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(table, names, args.out / "tune_compare.png")


def plot(table: dict, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = names + ["mean (4 tasks)"]
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=100)
    width = 0.8 / len(table)
    for j, (label, row) in enumerate(table.items()):
        values = [row["tasks"][n]["gain"] for n in names] + [row["mean_gain"]]
        cis = [row["tasks"][n]["gain_ci"] for n in names] + [row["mean_gain_ci"]]
        xs = [i + (j - (len(table) - 1) / 2) * width for i in range(len(groups))]
        err = [[v - lo for v, (lo, _) in zip(values, cis)], [hi - v for v, (_, hi) in zip(values, cis)]]
        ax.bar(xs, values, width, yerr=err, capsize=2, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("held-out normalized gain")
    ax.set_title("general: relative loss change vs base (negative = forgetting)", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
