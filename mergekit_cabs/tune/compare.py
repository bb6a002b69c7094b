"""Tuned cabs against its baselines on the held-out items: each one's
objective with a 95% paired bootstrap interval over items (text windows,
chat rows, questions, documents: whatever each data set is made of), the
paired difference tuned cabs minus each, and one plain verdict line.

The bootstrap draws, for each data set, its held-out items (their values in
the task's objective measure) with replacement (2000 draws, a numpy
generator seeded 0: the same numbers run to run); every method is scored on
the same draws (paired), in float64.  For the normalized gain, the
references are redrawn with them: the base's and each model's own values
(for a shared lm-eval task, the best fine-tune's per split: `best_of`) on
the same items of the draw (`reference["items"]`, kept per item when the
references are scored), so a draw of hard items raises the base, the own
model and the merge together and the gain measures the merge, not which
items were drawn.  Where on some draw a model is no better than the base on
its drawn items (its gain is undefined there: few items, or a 0/1 measure),
there is no per-method interval and the paired differences hold the
references at their full-set values.  The loss objective has no references.
An interval is the 2.5th to 97.5th percentile of the draws.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mergekit_cabs.tune.options import FILES, LABELS

DRAWS = 2000
SEED = 0
CABS = "cabs (tuned)"
REFERENCES_MD = {"redrawn": ", the base's and the fine-tunes' own values (the gain's references) drawn on the same "
                            "items"}
YOURS = "your config"


def drawn_means(values: Sequence[float], picks: np.ndarray) -> np.ndarray:
    """The mean of `values` on each draw's picks (a row of `picks` per draw)."""
    return np.asarray(values, dtype=np.float64)[picks].mean(axis=1)


def drawn_objectives(objective, report: dict, picks: dict[str, np.ndarray]) -> list | None:
    """For the gain, the objective of each draw, its references (the base's
    and each model's own values) the means of their held-out items on the
    draw's picks; None for the loss objective (no references) and where on
    some draw a model is no better than the base on its drawn items."""
    if report["objective"] == "loss":
        return None
    items = report["reference"]["items"]
    base = {task: drawn_means(items["base"]["heldout"][task], picks[task]) for task in picks}
    own = {task: drawn_means(items["models"][task]["heldout"], picks[task]) for task in objective.tasks}
    if not all(np.all(objective.sign(t) * (base[t] - own[t]) > 0) for t in objective.tasks):
        return None
    return [dataclasses.replace(objective, base={t: float(v[d]) for t, v in base.items()},
                                own={t: float(v[d]) for t, v in own.items()}) for d in range(DRAWS)]


def draw_scores(objective, windows: dict[str, Sequence[float]], picks: dict[str, np.ndarray],
                drawn: list | None = None) -> np.ndarray:
    """The objective (as searched: higher is better) on every bootstrap draw:
    against each draw's references (`drawn_objectives`), or with None, the
    full-set ones."""
    losses = {task: drawn_means(w, picks[task]) for task, w in windows.items()}
    if drawn is None:
        return np.asarray(objective.score(losses), dtype=np.float64)
    return np.array([o.score({t: float(v[d]) for t, v in losses.items()}) for d, o in enumerate(drawn)],
                    dtype=np.float64)


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
             "steps": steps_of(report.get("settings", {}).get("searched"), report["search"]),
             "merges": 0, "on_bounds": report["search"].get("on_bounds", []), "part": report["best"]},
            {"method": YOURS, "file": report["config"], "lambda": report["start"]["lambda"], "evaluations": 0,
             "merges": 0, "on_bounds": [], "part": report["start"]}]
    rows += [{"method": LABELS[b["name"]], "file": FILES[b["name"]], "lambda": b["lambda"],
              "evaluations": b["evaluations"], "merges": b["merges"], "on_bounds": b.get("on_bounds", []),
              "steps": steps_of(None, b),
              "part": b} for b in baselines]
    windows = report["best"]["heldout"]["window_losses"]
    rng = np.random.default_rng(SEED)
    picks = {task: rng.integers(0, len(w), size=(DRAWS, len(w))) for task, w in windows.items()}
    references = drawn_objectives(objective, report, picks)
    drawn = [draw_scores(objective, r["part"]["heldout"]["window_losses"], picks, references) for r in rows]
    own_intervals = references is not None or report["objective"] == "loss"
    table = []
    cabs_score = report["best"]["heldout"]["score"]
    for row, draws in zip(rows, drawn):
        part = row.pop("part")
        paired = drawn[0] - draws  # tuned cabs minus this row, on the same draws (searched sign)
        lo_hi = sorted(sign * v for v in interval(draws)) if own_intervals else None
        p_lo, p_hi = interval(paired)
        d_lo, d_hi = sorted(sign * v for v in (p_lo, p_hi))
        table.append({**row, "fit": sign * part["fit"]["score"], "heldout": sign * part["heldout"]["score"],
                      "interval": lo_hi, "difference": sign * (cabs_score - part["heldout"]["score"]),
                      "difference_interval": [d_lo, d_hi], "cabs_better": p_lo > 0,
                      "baseline_better": p_hi < 0})
    return {"rows": table, "verdict": verdict(table[1:], report["objective"], items), "draws": DRAWS, "seed": SEED,
            "items": items, "references": None if report["objective"] == "loss" else
            "redrawn" if references is not None else "fixed", "runs": list(baselines)}


def higher_words(objective: str) -> str:
    return "has a lower held-out loss" if objective == "loss" else "scores higher on the held-out data"


def winner(others: Sequence[dict], objective: str) -> dict | None:
    """The row better than tuned cabs by its paired interval, the best such
    on the held-out data; None when no row is."""
    better = [r for r in others if r["baseline_better"]]
    return max(better, key=lambda r: r["heldout"] * (-1 if objective == "loss" else 1)) if better else None


def verdict(others: Sequence[dict], objective: str, items: str = "windows") -> str:
    """One plain line: which to merge, judged on the held-out data by the
    paired differences' intervals."""
    best, higher = winner(others, objective), higher_words(objective)
    if best is not None:
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


def recommendation(report: dict) -> dict:
    """What the run recommends merging, decided here once for the summary,
    tune.md, tune.json and the command's last line:

    1. the held-out comparison's winner, when a row (a baseline or your
       config) is better than tuned cabs by its paired interval (the verdict
       names it);
    2. else tuned.yml, when tuned cabs is better than your config by its
       paired interval (held-out evidence outweighs the fit data);
    3. else your config as written, when tuned.yml scores below it on the fit
       data (`report["scores_below_config"]`);
    4. else tuned.yml.

    Without a comparison (--baselines none, or the baselines interrupted),
    rules 3 and 4.  Returns the method, its file (`in_out`: written to
    --out; else your config's path), its lambda and weights, and the reason."""
    rows = (report.get("baselines") or {}).get("rows", [])
    best, higher = winner(rows[1:], report["objective"]) if rows else None, higher_words(report["objective"])
    if best is not None and best["method"] != YOURS:
        run = next(r for r in report["baselines"]["runs"] if LABELS[r["name"]] == best["method"])
        return {"method": best["method"], "file": best["file"], "in_out": True, "lambda": run["lambda"],
                "weights": run["weights"] or dict(report["start"]["weights"]),
                "reason": f"it {higher} than {CABS} by its paired interval"}
    if best is not None:
        return recommended(report, YOURS, f"it {higher} than {CABS} by its paired interval")
    if any(r["method"] == YOURS and r["cabs_better"] for r in rows):
        return recommended(report, CABS, "it is better than your config on the held-out data by its paired "
                                         "interval, and no row is better than it")
    if report.get("scores_below_config"):
        return recommended(report, YOURS, "tuned.yml scores below it on the fit data" + (
            f", and no row is better than {CABS} on the held-out data" if rows else ""))
    return recommended(report, CABS, "no row is better than it on the held-out data" if rows else
                       "it scores at least as high as your config on the fit data; no baseline was compared")


def recommended(report: dict, method: str, reason: str) -> dict:
    """`recommendation`'s answer for tuned cabs or your config."""
    point = report["best"] if method == CABS else report["start"]
    return {"method": method, "file": "tuned.yml" if method == CABS else report["config"], "in_out": method == CABS,
            "lambda": point["lambda"], "weights": dict(point["weights"]), "reason": reason}


# --- how the report shows it ----------------------------------------------------------------


def interval_text(row: dict) -> str:
    """A row's own interval, or a dash where there is none (`references` "fixed")."""
    return "-" if row["interval"] is None else f"[{row['interval'][0]:.4f}, {row['interval'][1]:.4f}]"


def references_note(comparison: dict) -> list[str]:
    """Why there are no per-method intervals, where there are none."""
    if comparison.get("references") != "fixed":
        return []
    return [f"no per-method interval: on some draw a model is no better than the base on its drawn "
            f"{comparison.get('items', 'windows')}, so the differences hold the references at their full-set values"]


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
                     f"{interval_text(r)} {diff:>28s}")
    spent = "; ".join(f"{r['method']} {r['evaluations']}" + (f" and {r['steps']} gradient steps" if r.get("steps")
                                                              else "")
                      + (f" ({r['merges']} merges)" if r["merges"] else "")
                      for r in rows if r["method"] != YOURS)
    return lines + references_note(comparison) + [f"evaluations: {spent}", *bound_lines(rows), comparison["verdict"]]


BOUNDS_NAMED = 4  # a method with more numbers on a bound than this: counted per option, not named


def steps_of(settings: Sequence[dict] | None, search: dict) -> int:
    """The gradient steps a tuned method took: every setting's (`settings`,
    tune.json's settings.searched), else the one search's; 0 without the gradient search."""
    if settings:
        return sum(row.get("steps", 0) for row in settings)
    return (search.get("gradient") or {}).get("steps", 0)


def bound_lines(rows: Sequence[dict]) -> list[str]:
    """One line per tuned method whose chosen point lies on a bound of its
    search: which numbers, on which end of which option (beyond
    `BOUNDS_NAMED` of them, how many on each end of each option)."""
    return [f"{r['method']} ended on a bound: {bound_words(r['on_bounds'])}" for r in rows if r.get("on_bounds")]


def bound_words(found: Sequence[dict]) -> str:
    if len(found) <= BOUNDS_NAMED:
        return ", ".join(f"{b['name']} {b['value']:.4g} ({b['bound']} end of {b['option']} "
                         f"{b['bounds'][0]:g},{b['bounds'][1]:g})" for b in found)
    counts: dict[tuple, int] = {}
    for b in found:
        key = (b["option"], b["bounds"][0], b["bounds"][1], b["bound"])
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} number{'s' * (n > 1)} at the {side} end of {option} {lo:g},{hi:g}"
                     for (option, lo, hi, side), n in counts.items()) + " (tune.json: search.on_bounds)"


def markdown_lines(comparison: dict, label: str) -> list[str]:
    """tune.md's section: the table, the verdict, what each baseline cost."""
    out = ["## Tuned cabs and the baselines", "",
           f"Objective: {label}. Interval: 95% paired bootstrap over the held-out {comparison.get('items', 'windows')} "
           f"({comparison['draws']} "
           f"draws, seed {comparison['seed']}){REFERENCES_MD.get(comparison.get('references'), '')}; difference: "
           "tuned cabs minus the row, on the same draws.", *references_note(comparison), "",
           "| method | file | lambda | fit | held-out | interval | tuned cabs minus it | evaluations | merges |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in comparison["rows"]:
        diff = "" if r["method"] == CABS else \
            f"{r['difference']:+.4f} [{r['difference_interval'][0]:+.4f}, {r['difference_interval'][1]:+.4f}]"
        out.append(f"| {r['method']} | `{r['file']}` | {r['lambda']:.4g} | {r['fit']:.4f} | {r['heldout']:.4f} | "
                   f"{interval_text(r)} | {diff} | {r['evaluations']} | "
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
