"""Tuned cabs against its baselines on the held-out items: each one's
objective with a 95% paired bootstrap interval over items (text windows,
chat rows, questions, documents: whatever each data set is made of), the
paired difference tuned cabs minus each, and one plain verdict line.

The bootstrap draws, for each data set, its held-out items (their values in
the task's objective measure) with replacement (2000 draws, a numpy generator seeded 0: the same numbers run to
run); every method is scored on the same draws (paired), in float64, with
the base's and each model's own losses (the normalized gain's references)
held fixed.  An interval is the 2.5th to 97.5th percentile of the draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mergekit_cabs.tune.options import FILES, LABELS

DRAWS = 2000
SEED = 0
CABS = "cabs (tuned)"
YOURS = "your config"


def draw_scores(objective, windows: dict[str, Sequence[float]], picks: dict[str, np.ndarray]) -> np.ndarray:
    """The objective (as searched: higher is better) on every bootstrap draw."""
    losses = {task: np.asarray(w, dtype=np.float64)[picks[task]].mean(axis=1) for task, w in windows.items()}
    return np.asarray(objective.score(losses), dtype=np.float64)


def interval(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def comparison(objective, report: dict, baselines: Sequence[dict], items: str = "windows") -> dict:
    """The table (a row per method: tuned cabs, your config, each baseline),
    the paired differences and the verdict, for tune.json; values as the
    report shows the objective (the loss itself for --objective loss).
    `items`: what the data sets are made of, in a word (`report.items_word`)."""
    sign = -1.0 if report["objective"] == "loss" else 1.0
    spent = report.get("settings", {}).get("evaluations", report["search"]["evaluations"])  # every setting's
    rows = [{"method": CABS, "file": "tuned.yml", "lambda": report["best"]["lambda"], "evaluations": spent,
             "merges": 0, "on_bounds": report["search"].get("on_bounds", []), "part": report["best"]},
            {"method": YOURS, "file": report["config"], "lambda": report["start"]["lambda"], "evaluations": 0,
             "merges": 0, "on_bounds": [], "part": report["start"]}]
    rows += [{"method": LABELS[b["name"]], "file": FILES[b["name"]], "lambda": b["lambda"],
              "evaluations": b["evaluations"], "merges": b["merges"], "on_bounds": b.get("on_bounds", []),
              "part": b} for b in baselines]
    windows = report["best"]["heldout"]["window_losses"]
    rng = np.random.default_rng(SEED)
    picks = {task: rng.integers(0, len(w), size=(DRAWS, len(w))) for task, w in windows.items()}
    drawn = [draw_scores(objective, r["part"]["heldout"]["window_losses"], picks) for r in rows]
    table = []
    cabs_score = report["best"]["heldout"]["score"]
    for row, draws in zip(rows, drawn):
        part = row.pop("part")
        paired = drawn[0] - draws  # tuned cabs minus this row, on the same draws (searched sign)
        lo, hi = sorted(sign * v for v in interval(draws))
        p_lo, p_hi = interval(paired)
        d_lo, d_hi = sorted(sign * v for v in (p_lo, p_hi))
        table.append({**row, "fit": sign * part["fit"]["score"], "heldout": sign * part["heldout"]["score"],
                      "interval": [lo, hi], "difference": sign * (cabs_score - part["heldout"]["score"]),
                      "difference_interval": [d_lo, d_hi], "cabs_better": p_lo > 0,
                      "baseline_better": p_hi < 0})
    return {"rows": table, "verdict": verdict(table[1:], report["objective"], items), "draws": DRAWS, "seed": SEED,
            "items": items, "runs": list(baselines)}


def verdict(others: Sequence[dict], objective: str, items: str = "windows") -> str:
    """One plain line: which to merge, judged on the held-out data by the
    paired differences' intervals."""
    better = [r for r in others if r["baseline_better"]]
    higher = "has a lower held-out loss" if objective == "loss" else "scores higher on the held-out data"
    if better:
        best = max(better, key=lambda r: r["heldout"] * (-1 if objective == "loss" else 1))
        lo, hi = best["difference_interval"]
        d, lo, hi = abs(best["difference"]), min(abs(lo), abs(hi)), max(abs(lo), abs(hi))
        return f"{best['method']} {higher} than {CABS} by {d:.4f} [{lo:.4f}, {hi:.4f}]: merge {best['file']}"
    closest = min(others, key=lambda r: abs(r["difference"]))
    lo, hi = closest["difference_interval"]
    if all(r["cabs_better"] for r in others):
        return (f"{CABS} is better than every baseline on the held-out data: by {abs(closest['difference']):.4f} "
                f"[{min(abs(lo), abs(hi)):.4f}, {max(abs(lo), abs(hi)):.4f}] over the closest, {closest['method']}; "
                "merge tuned.yml")
    tied = [r["method"] for r in others if not r["cabs_better"]]
    return (f"{CABS} and {', '.join(tied)} are not distinguishable here (difference {closest['difference']:+.4f} "
            f"[{lo:+.4f}, {hi:+.4f}] with {closest['method']}): these held-out {items} do not tell them apart")


# --- how the report shows it ----------------------------------------------------------------


def summary_lines(comparison: dict, label: str) -> list[str]:
    """The console table and the verdict; `label` is the objective in words."""
    rows = comparison["rows"]
    width = max(len(r["method"]) for r in rows)
    lines = [f"held-out {label}, 95% paired bootstrap interval over {comparison.get('items', 'windows')}:",
             f"{'method':{width}s} {'lambda':>7s} {'held-out':>9s} {'interval':>19s} {'cabs minus it':>28s}"]
    for r in rows:
        diff = "" if r["method"] == CABS else \
            f"{r['difference']:+.4f} [{r['difference_interval'][0]:+.4f}, {r['difference_interval'][1]:+.4f}]"
        lines.append(f"{r['method']:{width}s} {r['lambda']:7.3f} {r['heldout']:9.4f} "
                     f"[{r['interval'][0]:.4f}, {r['interval'][1]:.4f}] {diff:>28s}")
    spent = "; ".join(f"{r['method']} {r['evaluations']}" + (f" ({r['merges']} merges)" if r["merges"] else "")
                      for r in rows if r["method"] != YOURS)
    return lines + [f"evaluations: {spent}", *bound_lines(rows), comparison["verdict"]]


def bound_lines(rows: Sequence[dict]) -> list[str]:
    """One line per tuned method whose chosen point lies on a bound of its
    search: which numbers, on which end of which option."""
    return [f"{r['method']} ended on a bound: " + ", ".join(
        f"{b['name']} {b['value']:.4g} ({b['bound']} end of {b['option']} {b['bounds'][0]:g},{b['bounds'][1]:g})"
        for b in r["on_bounds"]) for r in rows if r.get("on_bounds")]


def markdown_lines(comparison: dict, label: str) -> list[str]:
    """tune.md's section: the table, the verdict, what each baseline cost."""
    out = ["## Tuned cabs and the baselines", "",
           f"Objective: {label}. Interval: 95% paired bootstrap over the held-out {comparison.get('items', 'windows')} "
           f"({comparison['draws']} "
           f"draws, seed {comparison['seed']}); difference: tuned cabs minus the row, on the same draws.", "",
           "| method | file | lambda | fit | held-out | interval | tuned cabs minus it | evaluations | merges |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in comparison["rows"]:
        diff = "" if r["method"] == CABS else \
            f"{r['difference']:+.4f} [{r['difference_interval'][0]:+.4f}, {r['difference_interval'][1]:+.4f}]"
        out.append(f"| {r['method']} | `{r['file']}` | {r['lambda']:.4g} | {r['fit']:.4f} | {r['heldout']:.4f} | "
                   f"[{r['interval'][0]:.4f}, {r['interval'][1]:.4f}] | {diff} | {r['evaluations']} | "
                   f"{r['merges']} |")
    bounds = [f"- {line}" for line in bound_lines(comparison["rows"])]
    out += [""] + (bounds + [""] if bounds else []) + [f"**{comparison['verdict']}**", ""]
    for run in comparison["runs"]:
        if run["seed"] is not None:
            out.append(f"- {run['name']}: mergekit's random drops with seed {run['seed']} (as `mergekit-yaml "
                       f"--random-seed {run['seed']}`).")
    out += ["- task_arithmetic (tuned): the same search as cabs (optimiser, layer groups, bounds, budget, start) on "
            "a store with every place kept; the chosen point is merged by mergekit's task_arithmetic and scored. "
            "Each tuned search first scores your config's point, then searches lambda alone from 1 (at most a "
            "half of its budget, as the one-lambda baselines search theirs), and starts from the better.",
            "- one-lambda baselines: the configuration's models and weights (ties/dare_ties: its densities), merged "
            "by mergekit's own method; one merge gives every lambda (base + lambda x delta), searched on the fit "
            f"{comparison.get('items', 'windows')}; the chosen lambda is merged once more by mergekit and scored.", ""]
    return out
