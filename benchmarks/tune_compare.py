"""Held-out quality of merges whose numbers were picked on the same validation data.

Needs the model family from ``benchmarks/tune_models.py`` (a small Llama base
trained here on CPU and four specialists: Python, C, JavaScript, docs).
In one run, on the same windows of each specialist's own held-out text:

* task_arithmetic, ties and dare_ties, each with one lambda picked from a grid
  (0.01 .. 1.5; extended downwards, halving, while the best lambda is the
  grid's lowest, and upwards, doubling, while it is the highest, so that every
  method's best lambda is inside its grid);
* cabs with one lambda picked from the same grid;
* cabs tuned by ``tune`` per model (one weight per model and lambda), with the
  coordinate search and with CMA-ES at the same budget;
* cabs tuned per layer group (``layer_groups``: one weight per model and group
  of consecutive decoder layers, plus one for embeddings / final norm / head),
  coordinate search and CMA-ES at the same budget.

Every tuned search's config is the cabs grid's best lambda with every weight
1 (a copy of cabs.yml with that lambda); tune scores that point, then lambda
alone from 1, and starts from the better (each method its own), so its
evaluations are counted as the grid's plus tune's.  Every candidate is scored on the *fit* windows (every
other window of each data file, spread along it, as ``tune`` splits it at its
default --fit-fraction 0.5); the chosen one is scored once on the *held-out*
windows (the windows in between).  Reported per task: held-out normalized gain
(L_base - L) / (L_base - L_own) with 95% bootstrap intervals over windows
(paired: the same resampled windows for base, own model and every merge), the
mean gain over tasks with its interval, paired intervals of the difference
between each tuned merge and each one-lambda merge, the evaluations each
search spent and its wall time, and the best fit objective after each
evaluation of every tuned search (tune_compare_search.png).

    python benchmarks/tune_models.py --out /tmp/tune-bench
    python benchmarks/tune_compare.py --models-dir /tmp/tune-bench --out benchmarks/results/tune
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

KINDS = ("python", "c", "javascript", "docs")
GRID = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5)
GRID_LIMITS = (0.0005, 8.0)  # the grid is not extended past these
DENSITY = 0.25
METHODS = ("task_arithmetic", "ties", "dare_ties", "cabs")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/tune-bench"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tune"))
    parser.add_argument("--max-windows", type=int, default=64, help="windows per file and split")
    parser.add_argument("--budget", type=int, default=150, help="tune's budget per search, per model")
    parser.add_argument("--group-budget", type=int, default=300, help="tune's budget per search, per layer group")
    parser.add_argument("--layer-groups", type=int, default=2, help="decoder layer groups (0: no layer-group arm)")
    parser.add_argument("--lambda-bounds", type=float, nargs=2, default=(0.02, 2.0))
    parser.add_argument("--weight-bounds", type=float, nargs=2, default=(0.0, 2.0))
    parser.add_argument("--tolerance", type=float, default=0.01, help="tune's --tolerance in every search")
    parser.add_argument("--draws", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--grid", type=float, nargs="+", default=GRID, help="the lambdas tried first")
    parser.add_argument("--tune-baselines", default="none",
                        help="tune's --baselines in every tuned arm (e.g. 'task_arithmetic_tuned', or "
                             "'task_arithmetic_tuned,ties,dare_ties'); its table is kept in tune_compare.json, "
                             "and task arithmetic tuned in each arm is a row of the table")
    parser.add_argument("--tune-densities", default=None, help="tune's --densities in every tuned arm")
    parser.add_argument("--tune-orders", default=None, help="tune's --orders in every tuned arm")
    parser.add_argument("--optimizers", default="coordinate,cmaes", help="the tuned arms' searches")
    parser.add_argument("--window", type=int, default=None, help="tokens per window (tune's --window)")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="only write tune_compare.md again beside this tune_compare.json")
    return parser.parse_args()


def family_kinds(root: Path) -> tuple[str, ...]:
    """The specialists of a family from tune_models.py (its manifest's `specialists`; all four before those)."""
    manifest = root / "manifest.json"
    found = json.loads(manifest.read_text()).get("specialists") if manifest.exists() else None
    return tuple(found or KINDS)


def method_config(method: str, root: Path, lam: float) -> dict:
    models = []
    for kind in family_kinds(root):
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
    """Normalized gain (or, without `own`, relative loss change) on resampled windows;
    a seed draws the same windows for every merge (paired)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(base), (draws, len(base)), generator=gen)
    b, m = base[idx].mean(1), merged[idx].mean(1)
    return (b - m) / ((b - own[idx].mean(1)) if own is not None else b)


def interval(samples: torch.Tensor) -> list[float]:
    q = torch.quantile(samples.double(), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return [float(q[0]), float(q[1])]


# --- the references and the one-lambda grids --------------------------------------------


@dataclass
class Bench:
    """The data, the references' per-window losses and the objective, shared by every arm."""

    root: Path
    prep: Any
    work: Path
    base: dict  # split -> data set -> per-window losses of the base
    own: dict  # task -> split -> per-window losses of the task's own model
    objective: dict  # split -> tune's Objective
    batch: int
    grid: tuple[float, ...]  # the lambdas every grid tries first
    kinds: tuple[str, ...] = KINDS  # the family's specialists


def load(path) -> torch.nn.Module:
    from mergekit_cabs import tune as tn

    return tn.load_model(str(path), "cpu")


def make_bench(args: argparse.Namespace, work: Path) -> Bench:
    from mergekit_cabs import tune as tn

    root = args.models_dir.resolve()
    prep = tn.prepare(root / "cabs.yml", data_args(root), general=root / "data" / "general.txt",
                      max_windows=args.max_windows, budget=max(args.budget, args.group_budget), window=args.window)
    batch = tn.DEFAULTS["batch_size"]
    tasks = {t.name: t for t in prep.tasks}
    base = {s: tn.task_losses(load(root / "base"), prep.tasks, s, batch) for s in tn.SPLITS}
    own = {}
    kinds = family_kinds(root)
    for kind in kinds:
        model = load(root / kind)
        own[kind] = {s: tn.window_losses(model, getattr(tasks[kind], s), batch) for s in tn.SPLITS}
    reference = {"base": {s: {k: float(v.mean()) for k, v in base[s].items()} for s in tn.SPLITS},
                 "models": {k: {s: float(own[k][s].mean()) for s in tn.SPLITS} for k in kinds}}
    objective = tn.split_objectives("gain", list(kinds), reference, tn.DEFAULTS["general_weight"])
    for t in prep.tasks:
        print(f"data {t.name:11s} {t.tokens} tokens: {len(t.fit)} fit and {len(t.heldout)} held-out windows "
              f"of {t.fit.shape[1]} tokens", flush=True)
    return Bench(root, prep, work, base, own, objective, batch, tuple(args.grid), kinds)


def data_args(root: Path) -> list[str]:
    return [f"{kind}={root / 'data' / f'{kind}.txt'}" for kind in family_kinds(root)]


def score(bench: Bench, model, split: str) -> dict[str, torch.Tensor]:
    from mergekit_cabs import tune as tn

    return tn.task_losses(model, bench.prep.tasks, split, bench.batch)


def grid_point(bench: Bench, method: str, lam: float) -> dict:
    """Merge with mergekit at this lambda and score the merge on the fit windows."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    out = bench.work / f"{method}-{lam:g}"
    config = MergeConfiguration.model_validate(method_config(method, bench.root, lam))
    run_merge(config, str(out), MergeOptions(quiet=True, copy_tokenizer=False, random_seed=0))
    fit = {k: float(v.mean()) for k, v in score(bench, load(out), "fit").items()}
    point = {"lambda": lam, "fit_loss": fit, "score": bench.objective["fit"].score(fit)}
    print(f"{method:16s} lambda {lam:7.4f}  fit objective {point['score']:.4f}", flush=True)
    return point


def grid_search(bench: Bench, method: str) -> dict:
    """The best lambda of GRID on the fit objective, the grid extended while the best is at an edge."""
    started = time.perf_counter()
    grid = [grid_point(bench, method, lam) for lam in bench.grid]
    extended = []
    while True:
        grid.sort(key=lambda g: g["lambda"])
        best = max(grid, key=lambda g: g["score"])
        if best is grid[0] and best["lambda"] / 2 >= GRID_LIMITS[0]:
            lam = best["lambda"] / 2
        elif best is grid[-1] and best["lambda"] * 2 <= GRID_LIMITS[1]:
            lam = best["lambda"] * 2
        else:
            break
        extended.append(lam)
        grid.append(grid_point(bench, method, lam))
    search_s = time.perf_counter() - started
    heldout = score(bench, load(bench.work / f"{method}-{best['lambda']:g}"), "heldout")
    for g in grid:
        if g is not best:
            shutil.rmtree(bench.work / f"{method}-{g['lambda']:g}", ignore_errors=True)
    interior = grid[0]["score"] < best["score"] and grid[-1]["score"] < best["score"]
    return {"kind": "grid", "lambda": best["lambda"], "grid": grid, "extended": extended, "interior": interior,
            "evaluations": len(grid), "search_s": search_s, "heldout": heldout}


# --- the tuned searches --------------------------------------------------------------------


def start_config(bench: Bench, lam: float) -> Path:
    """A copy of cabs.yml whose lambda is `lam` (the tuned searches' start)."""
    raw = yaml.safe_load((bench.root / "cabs.yml").read_text())
    raw["parameters"]["lambda"] = lam
    path = bench.work / f"cabs-start-{lam:g}.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def has_layer_groups() -> bool:
    from mergekit_cabs import tune as tn

    return "layer_groups" in inspect.signature(tn.prepare).parameters


def tuned_arm(args: argparse.Namespace, prep, grid: dict, optimizer: str, budget: int, groups: int | None) -> dict:
    """One `tune` search from the cabs grid's best lambda; its evaluations count the grid's too."""
    from mergekit_cabs import tune as tn

    started = time.perf_counter()
    settings = {k: v for k, v in (("densities", args.tune_densities), ("orders", args.tune_orders)) if v}
    report = tn.run_tune(prep, budget=budget, optimizer=optimizer, seed=0, lambda_bounds=tuple(args.lambda_bounds),
                         weight_bounds=tuple(args.weight_bounds), tolerance=args.tolerance, quiet=True,
                         baselines=args.tune_baselines, **settings)
    wall = time.perf_counter() - started
    best = report["best"]
    heldout = {k: torch.tensor(v, dtype=torch.float64) for k, v in best["heldout"]["window_losses"].items()}
    scores, running = [], float("-inf")
    for p in report["points"]:
        running = max(running, p["score"])
        scores.append(running)
    spent = (report.get("settings") or {}).get("evaluations", report["search"]["evaluations"])
    print(f"tuned {optimizer:10s} groups {groups}: {spent} evaluations "
          f"({report['search']['stopped']}), fit objective {best['fit']['score']:.4f}, "
          f"held-out {best['heldout']['score']:.4f}, {wall:.0f} s", flush=True)
    return {"kind": "tuned", "optimizer": report["search"]["optimizer"], "layer_groups": groups,
            "groups": report.get("layer_groups"), "lambda": best["lambda"], "weights": best["weights"],
            "searched": len(report["search"]["names"]), "budget": budget,
            "stopped": report["search"]["stopped"], "tune_evaluations": report["search"]["evaluations"],
            "grid_evaluations": grid["evaluations"], "evaluations": spent + grid["evaluations"],
            "tune_evaluations_all": spent, "search_s": report["time"]["search_s"], "grid_s": grid["search_s"],
            "tune_s": wall, "time": report["time"], "fit_score": best["fit"]["score"], "best_so_far": scores,
            "heldout": heldout, "tune_baselines": report.get("baselines"),
            "settings": report.get("settings"), "setting": chosen_setting(report)}


def chosen_setting(report: dict) -> str | None:
    """The (density, order) setting tune chose, when it searched several."""
    found = (report.get("settings") or {}).get("searched", [])
    return next((s["label"] for s in found if s["chosen"]), None) if len(found) > 1 else None


def tuned_arms(bench: Bench, args: argparse.Namespace, grid: dict) -> dict:
    """Per model, then per layer group: coordinate search and CMA-ES at the same budget."""
    from mergekit_cabs import tune as tn

    def prepared(groups: int | None):
        extra = {"layer_groups": groups} if groups else {}
        return tn.prepare(start_config(bench, grid["lambda"]), data_args(bench.root),
                          general=bench.root / "data" / "general.txt", max_windows=args.max_windows,
                          budget=max(args.budget, args.group_budget), window=args.window, **extra)

    prep, results = prepared(None), {}
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    for optimizer in optimizers:
        arm = tuned_arm(args, prep, grid, optimizer, args.budget, None)
        results.update(arm_rows(f"per model, {optimizer}", arm))
    if args.layer_groups and not has_layer_groups():
        print("tune.prepare has no layer_groups option here: the layer-group arm is skipped", flush=True)
    elif args.layer_groups:
        prep = prepared(args.layer_groups)
        for optimizer in optimizers:
            arm = tuned_arm(args, prep, grid, optimizer, args.group_budget, args.layer_groups)
            results.update(arm_rows(f"per layer group (G={args.layer_groups}), {optimizer}", arm))
    return results


def arm_rows(how: str, arm: dict) -> dict:
    """A tuned arm's rows: cabs, and task arithmetic tuned the same way when tune ran it (its held-out
    windows are the same ones, so it takes part in the paired differences)."""
    rows = {f"cabs {how}": arm}
    for run in (arm.get("tune_baselines") or {}).get("runs", []):
        if run["name"] == "task_arithmetic_tuned":
            rows[f"task_arithmetic tuned {how}"] = {
                "kind": "tuned_ta", "arm": f"cabs {how}", "lambda": run["lambda"], "weights": run["weights"],
                "evaluations": run["evaluations"], "tune_evaluations": run["evaluations"], "stopped": run["stopped"],
                "grid_evaluations": arm["grid_evaluations"], "grid_s": arm["grid_s"], "search_s": None,
                "heldout": {k: torch.tensor(v, dtype=torch.float64)
                            for k, v in run["heldout"]["window_losses"].items()}}
    return rows


# --- the table ---------------------------------------------------------------------------


def summarize(bench: Bench, results: dict, draws: int) -> tuple[dict, dict]:
    """Per arm: held-out gains per data set with intervals, the mean over tasks; and the
    mean gain's bootstrap samples (paired across arms), for the differences."""
    from mergekit_cabs import tune as tn

    names = list(bench.kinds) + [tn.GENERAL]
    table, samples = {}, {}
    for label, r in results.items():
        row = {k: r[k] for k in ("kind", "lambda", "evaluations", "search_s") if k in r}
        row.update(weights=r.get("weights"), tasks={})
        per_task = []
        for i, name in enumerate(names):
            merged, base = r["heldout"][name], bench.base["heldout"][name]
            own = bench.own[name]["heldout"] if name in bench.own else None
            draw = bootstrap(base, own, merged, draws, seed=i)
            if own is not None:
                per_task.append(draw)
            b = float(base.mean())
            point = (b - float(merged.mean())) / ((b - float(own.mean())) if own is not None else b)
            row["tasks"][name] = {"loss": float(merged.mean()), "gain": point, "gain_ci": interval(draw)}
        samples[label] = torch.stack(per_task).mean(0)
        row["mean_gain"] = sum(row["tasks"][k]["gain"] for k in bench.kinds) / len(bench.kinds)
        row["mean_gain_ci"] = interval(samples[label])
        table[label] = row
    return table, samples


def differences(table: dict, samples: dict) -> dict:
    """Tuned cabs minus every one-lambda merge and every tuned task arithmetic: mean gain, paired
    bootstrap intervals."""
    tuned = [k for k, r in table.items() if r["kind"] == "tuned"]
    grids = [k for k, r in table.items() if r["kind"] in ("grid", "tuned_ta")]
    return {t: {g: {"difference": table[t]["mean_gain"] - table[g]["mean_gain"],
                    "ci": interval(samples[t] - samples[g])} for g in grids} for t in tuned}


def fmt_ci(value: float, ci: list[float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def chosen(r: dict) -> str:
    if r["kind"] == "grid":
        return f"lambda {r['lambda']:g}" + ("" if r["interior"] else " (grid edge)")
    setting = f"; {r['setting']}" if r.get("setting") else ""
    return f"lambda {r['lambda']:.3g}, {len(r['weights'])} weights{setting}"


def settings_markdown(results: dict) -> list[str]:
    """Per tuned arm that searched several (density, order) settings: each one's best fit and held-out
    objective (tune's numbers) and evaluations."""
    out = []
    for label, r in results.items():
        found = (r.get("settings") or {}).get("searched", []) if r["kind"] == "tuned" else []
        if len(found) < 2:
            continue
        out += ["", f"Settings searched by {label} (tune's objective; the best on the fit windows is chosen):", "",
                "| setting | evaluations | fit | held-out | |", "|---|---|---|---|---|"]
        out += [f"| {s['label']} | {s['evaluations']} ({s['stopped']}) | {s['fit']:.4f} | {s['heldout']:.4f} | "
                f"{'chosen' if s['chosen'] else ''} |" for s in found]
    return out


def markdown(kinds: tuple[str, ...], windows: dict, results: dict, table: dict, diffs: dict) -> str:
    """tune_compare.md; `windows`: per data set its fit/held-out window counts and window length."""
    names = list(kinds) + ["general"]
    lines = ["| method | chosen | evaluations | search wall | " + " | ".join(names)
             + f" | mean gain ({len(kinds)} tasks) |",
             "|---" * (len(names) + 5) + "|"]
    for label, row in table.items():
        r = results[label]
        if r["kind"] == "grid":
            evals, wall = f"{r['evaluations']}", f"{r['search_s']:.0f} s"
        elif r["kind"] == "tuned_ta":  # its search ran in the cabs arm's tune run, after the cabs search
            evals = f"{r['grid_evaluations']} + {r['tune_evaluations']} ({r['stopped']})"
            wall = f"{r['grid_s']:.0f} + {results[r['arm']]['time'].get('baselines_s', 0):.0f} s"
        else:
            settings = len((r.get("settings") or {}).get("searched", [])) or 1
            spent = r.get("tune_evaluations_all", r["tune_evaluations"])
            evals = f"{r['grid_evaluations']} + {spent}" + (
                f" ({settings} settings; the chosen one {r['tune_evaluations']}, {r['stopped']})" if settings > 1
                else f" ({r['stopped']})")
            wall = f"{r['grid_s']:.0f} + {r['search_s']:.0f} s"
        cells = [fmt_ci(row["tasks"][n]["gain"], row["tasks"][n]["gain_ci"]) for n in names]
        lines.append(f"| {label} | {chosen(r)} | {evals} | {wall} | " + " | ".join(cells)
                     + f" | {fmt_ci(row['mean_gain'], row['mean_gain_ci'])} |")
    grids = next(iter(diffs.values()), {})  # the one-lambda merges, then each tuned task arithmetic
    lines += ["", "Tuned cabs minus each one-lambda merge and each tuned task arithmetic, held-out mean gain "
              "(paired bootstrap, 95%):", "",
              "| tuned | " + " | ".join(grids) + " |", "|---" * (len(grids) + 1) + "|"]
    for t, by_grid in diffs.items():
        lines.append(f"| {t} | " + " | ".join(fmt_ci(d["difference"], d["ci"]) for d in by_grid.values()) + " |")
    lines += settings_markdown(results) + ["", "Chosen weights:", ""]
    for label, r in results.items():
        if r["kind"] in ("tuned", "tuned_ta"):
            weights = ", ".join(f"{k} {v:.3g}" for k, v in r["weights"].items())
            lines.append(f"- {label}: lambda {r['lambda']:.4g}; {weights}")
    counts = ", ".join(f"{name} {w['fit']}/{w['heldout']}" for name, w in windows.items())
    lines += ["", f"Fit/held-out windows of {next(iter(windows.values()))['window']} tokens: {counts}."]
    return "\n".join(lines) + "\n"


# --- the figures -------------------------------------------------------------------------


def plot(table: dict, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = names + ["mean (4 tasks)"]
    fig, ax = plt.subplots(figsize=(11, 4.2), dpi=100)
    width = 0.85 / len(table)
    for j, (label, row) in enumerate(table.items()):
        values = [row["tasks"][n]["gain"] for n in names] + [row["mean_gain"]]
        cis = [row["tasks"][n]["gain_ci"] for n in names] + [row["mean_gain_ci"]]
        xs = [i + (j - (len(table) - 1) / 2) * width for i in range(len(groups))]
        err = [[v - lo for v, (lo, _) in zip(values, cis)], [hi - v for v, (_, hi) in zip(values, cis)]]
        ax.bar(xs, values, width, yerr=err, capsize=2, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("held-out normalized gain (higher is better)")
    ax.set_title("general: relative loss change vs base (negative = forgetting)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_search(results: dict, path: Path) -> None:
    """Best fit objective after each of tune's evaluations, per tuned search."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for label, r in results.items():
        if r["kind"] == "grid" and label.startswith("cabs"):
            ax.axhline(max(g["score"] for g in r["grid"]), color="grey", ls=":", label=f"{label} (start)")
        elif r["kind"] == "tuned":
            ax.plot(range(1, len(r["best_so_far"]) + 1), r["best_so_far"], label=label)
    ax.set_xlabel("tune evaluations (after the cabs grid's)")
    ax.set_ylabel("best fit objective so far (higher is better)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- the run -----------------------------------------------------------------------------


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
            "load_at_end": os.getloadavg()}
    try:
        from numba.misc.numba_sysinfo import get_sysinfo

        info["cpu_name"] = get_sysinfo().get("CPU Name")
    except Exception:  # numba's sysinfo is informative only
        info["cpu_name"] = None
    return info


def write_outputs(args, bench: Bench, results: dict, table: dict, diffs: dict, wall: float) -> None:
    from mergekit_cabs import tune as tn

    strip = {"heldout"}
    summary = {
        "models_dir": str(bench.root), "grid": bench.grid, "density": DENSITY,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "windows": {t.name: {"fit": len(t.fit), "heldout": len(t.heldout), "window": int(t.fit.shape[1]),
                             "tokens": t.tokens} for t in bench.prep.tasks},
        "reference": {"base_heldout": {k: float(v.mean()) for k, v in bench.base["heldout"].items()},
                      "own_heldout": {k: float(v["heldout"].mean()) for k, v in bench.own.items()}},
        "methods": table, "differences": diffs,
        "searches": {k: {kk: vv for kk, vv in r.items() if kk not in strip} for k, r in results.items()},
        "machine": machine(), "wall_s": wall,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tune_compare.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = markdown(bench.kinds, summary["windows"], results, table, diffs)
    (args.out / "tune_compare.md").write_text(text)
    print(text)
    plot(table, list(bench.kinds) + [tn.GENERAL], args.out / "tune_compare.png")
    plot_search(results, args.out / "tune_compare_search.png")


def render_again(path: Path) -> None:
    """Write tune_compare.md again from a run's tune_compare.json (`--render`), without running anything."""
    summary = json.loads(path.read_text())
    kinds = tuple(k for k in summary["windows"] if k != "general")
    text = markdown(kinds, summary["windows"], summary["searches"], summary["methods"], summary["differences"])
    (path.parent / "tune_compare.md").write_text(text)
    print(text)


def main() -> None:
    args = parse_args()
    if args.render:
        render_again(args.render)
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="tune-compare-"))
    try:
        bench = make_bench(args, work)
        results = {f"{m} (lambda grid)": grid_search(bench, m) for m in METHODS}
        results.update(tuned_arms(bench, args, results["cabs (lambda grid)"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table, samples = summarize(bench, results, args.draws)
    write_outputs(args, bench, results, table, differences(table, samples), time.perf_counter() - started)
    print(f"total {(time.perf_counter() - started) / 60:.1f} min, load {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
