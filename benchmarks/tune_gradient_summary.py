"""Compact summary of `mergekit-cabs tune` runs (issue 28 part 4 evidence).

    python benchmarks/tune_gradient_summary.py OUT.json LABEL=RUN_DIR ...
    python benchmarks/tune_gradient_summary.py --markdown OUT.json   # the evidence table
    python benchmarks/tune_gradient_summary.py --paired RUN_A:cabs RUN_B:ta   # A minus B, held out

--paired: the held-out mean normalized gain of merge A minus merge B (each
`cabs`, tuned cabs, or `ta`, tuned task arithmetic, of its run) with a 95%
paired bootstrap interval over the held-out windows (2000 draws, the same
resampled windows for both; text data only, where each item is a window
loss).  Two runs on the same data and --max-windows share their windows.

Keeps, per run: the search (optimizer, shape, numbers searched, evaluations,
stopped, search.gradient), each table row (fit, held-out with its interval,
cabs minus it with the paired interval), task arithmetic tuned's search cost,
time.* and the chosen lambda.  RUN_DIR/tune.json is large; this is not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def small(v):
    if isinstance(v, dict) and "minibatch_scores" in v:  # search.gradient: drop the per-step list
        v = {k: x for k, x in v.items() if k != "minibatch_scores"}
    return v if len(json.dumps(v)) < 2000 else "(long)"


def summarise(path: Path) -> dict:
    d = json.loads((path / "tune.json").read_text())
    s = d["search"]
    out = {
        "dir": str(path),
        "optimizer": s.get("optimizer"),
        "coefficients": s.get("coefficients", d.get("coefficients")),
        "layer_groups": d.get("layer_groups"),
        "numbers": len(s.get("names", [])),
        "budget": s.get("budget"),
        "bounds_weight": s.get("bounds", [None, None])[1],
        "evaluations": s.get("evaluations"),
        "stopped": s.get("stopped"),
        "began_from": (s.get("began") or {}).get("from"),
        "gradient": small(s.get("gradient")),
        "on_bounds": len(s.get("on_bounds") or []),
        "time": d.get("time"),
        "rows": [{k: r.get(k) for k in ("method", "lambda", "evaluations", "steps", "fit", "heldout", "interval",
                                        "difference", "difference_interval")} for r in d["baselines"]["rows"]],
        "baseline_runs": [{k: small(r.get(k)) for k in ("name", "evaluations", "stopped", "gradient", "began")}
                          for r in d["baselines"].get("runs", [])],
        "verdict": d["baselines"].get("verdict"),
    }
    return out


def cost(run: dict, gradient: dict | None) -> str:
    if gradient:
        return f"{gradient['evaluation_equivalents']:.0f} ({gradient['steps']} steps)"
    return str(run.get("evaluations"))


def ival(row: dict, key: str = "interval") -> str:
    lo, hi = row[key]
    return f"[{lo:+.3f}, {hi:+.3f}]" if key != "interval" else f"[{lo:.3f}, {hi:.3f}]"


def markdown(data: dict) -> str:
    lines = ["| run | numbers | cabs held-out | cabs fit | TA tuned held-out | TA fit | cabs - TA (paired) "
             "| cost cabs / TA (evaluations' worth) | stopped cabs / TA | time s (cabs + TA) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in data.items():
        rows = {x["method"]: x for x in r["rows"]}
        c, t = rows["cabs (tuned)"], rows.get("task_arithmetic (tuned)")
        ta_run = next((b for b in r["baseline_runs"] if b["name"] == "task_arithmetic_tuned"), {})
        g = r.get("gradient")
        tg = ta_run.get("gradient") if isinstance(ta_run.get("gradient"), dict) else None
        stop_c = g["stopped"] if g else r["stopped"]
        stop_t = (tg or {}).get("stopped", ta_run.get("stopped"))
        if g:
            stop_c += f" ({g['validations']} val.)"
        if tg:
            stop_t += f" ({tg['validations']} val.)"
        ta_cost = cost(ta_run, tg) if ta_run else "-"
        tm = r["time"]
        ta_cells = (f"{t['heldout']:.3f} {ival(t)} | {t['fit']:.3f} | "
                    f"{t['difference']:+.3f} {ival(t, 'difference_interval')} | ") if t else "- | - | - | "
        times = f"{tm['total_s']:.0f} + {tm.get('baselines_s', 0):.0f}"
        lines.append(f"| {label} | {r['numbers']} | {c['heldout']:.3f} {ival(c)} | {c['fit']:.3f} | {ta_cells}"
                     f"{cost(r, g)} / {ta_cost} | {stop_c} / {stop_t} | {times} |")
    return "\n".join(lines)


def window_losses(run: Path, which: str) -> tuple[dict, dict]:
    d = json.loads((run / "tune.json").read_text())
    held = d["best"]["heldout"] if which == "cabs" else next(
        r for r in d["baselines"]["runs"] if r["name"] == "task_arithmetic_tuned")["heldout"]
    return held["window_losses"], d


def gain(base, own, x, idx):
    """Normalized gain of values `x` on items `idx`: (base - x) / (base - own), on the items' means
    (own = 0 for the general text: its relative loss change)."""
    return (base[idx].mean() - x[idx].mean()) / (base[idx].mean() - own[idx].mean())


def paired(a: str, b: str, draws: int = 2000, seed: int = 0) -> dict:
    import numpy as np

    (la, d), (lb, _) = (window_losses(Path(x.rsplit(":", 1)[0]), x.rsplit(":", 1)[1]) for x in (a, b))
    ref = d["reference"]["items"]
    tasks = [t for t in la if t != "general"]
    weights = {t: d["data"][t]["weight"] / sum(d["data"][u]["weight"] for u in tasks) for t in tasks}
    if "general" in la:  # the general text's relative loss change, at --general-weight (as tune's objective)
        weights["general"] = d["general_weight"]
    rng = np.random.default_rng(seed)
    diffs, point = np.zeros(draws), 0.0
    for t in la:
        base = np.array(ref["base"]["heldout"][t])
        own = np.array(ref["models"][t]["heldout"]) if t != "general" else np.zeros_like(base)
        xa, xb = np.array(la[t]), np.array(lb[t])
        every = np.arange(len(xa))
        w = weights[t]
        point += w * (gain(base, own, xa, every) - gain(base, own, xb, every))
        for i in range(draws):
            idx = rng.integers(0, len(xa), len(xa))
            diffs[i] += w * (gain(base, own, xa, idx) - gain(base, own, xb, idx))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"a": a, "b": b, "difference": point, "interval": [lo, hi]}


def main() -> None:
    if sys.argv[1] == "--paired":
        r = paired(sys.argv[2], sys.argv[3])
        print(f"{r['a']} minus {r['b']}: {r['difference']:+.4f} [{r['interval'][0]:+.4f}, {r['interval'][1]:+.4f}]")
        return
    if sys.argv[1] == "--markdown":
        print(markdown(json.loads(Path(sys.argv[2]).read_text())))
        return
    target = Path(sys.argv[1])
    data = json.loads(target.read_text()) if target.exists() else {}
    for arg in sys.argv[2:]:
        label, run = arg.rsplit("=", 1)
        data[label] = summarise(Path(run))
    target.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
