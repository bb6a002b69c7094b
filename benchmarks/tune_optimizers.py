"""Coordinate search against CMA-ES at equal budgets, on synthetic objectives
shaped like `tune`'s: lambda in [0.25, 2] and K weights in [0, 2], started
at lambda 1 and every weight 1, with tune's default --tolerance (0.05).

Three families, each with a known optimum inside the box (value 0):

* separable: -sum_j (x_j - x*_j)^2 over all searched values;
* scale: the merge acts through lambda * weight_i, and task vectors
  interfere: -sum_i (lambda w_i - t_i)^2 - 0.5 (sum_i (lambda w_i - t_i))^2,
  t_i = lambda* w*_i (a ridge: many points are optimal);
* rotated: -(x - x*)' H (x - x*) with H = Q diag(1 .. 100) Q' / (K + 1), a
  random rotation Q (coupled, condition number 100);
* rugged: separable plus ripples, -sum_j [(x_j - x*_j)^2 + 0.02 (1 - cos(10 pi (x_j - x*_j)))]
  (a local optimum every 0.2 along each value).

For every family, K and budget: `--instances` random optima (the same for
both optimisers), CMA-ES with seed = instance number.  Reported: the median
regret (0 minus the best value found) and how often each optimiser found the
better point.  Float64 throughout; deterministic.

    python benchmarks/tune_optimizers.py --out benchmarks/results/tune_optimizers.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from mergekit_cabs.tune.options import DEFAULTS
from mergekit_cabs.tune.search import cmaes_search, coordinate_search

FAMILIES = ("separable", "scale", "rotated", "rugged")
OPTIMIZERS = {"coordinate": coordinate_search, "cmaes": cmaes_search}


def instance(family: str, k: int, rng: np.random.Generator):
    """An objective over (lambda, w_1 .. w_k) with maximum 0 inside the box."""
    lam, w = rng.uniform(0.4, 1.8), rng.uniform(0.1, 1.9, k)
    if family == "separable":
        best = np.concatenate([[lam], w])
        return lambda x: -float(np.sum((np.asarray(x) - best) ** 2))
    if family == "rugged":
        best = np.concatenate([[lam], w])
        return lambda x: -float(np.sum((d := np.asarray(x) - best) ** 2 + 0.02 * (1 - np.cos(10 * np.pi * d))))
    if family == "scale":
        t = lam * w
        return lambda x: -float(np.sum((d := x[0] * np.asarray(x[1:]) - t) ** 2) + 0.5 * np.sum(d) ** 2)
    q, _ = np.linalg.qr(rng.standard_normal((k + 1, k + 1)))
    h = q @ np.diag(np.logspace(0, 2, k + 1)) @ q.T / (k + 1)
    best = np.concatenate([[lam], w])
    return lambda x: -float((np.asarray(x) - best) @ h @ (np.asarray(x) - best))


def compare(ks, budgets, instances: int) -> list[dict]:
    rows = []
    for family in FAMILIES:
        for k in ks:
            bounds = [DEFAULTS["lambda_bounds"]] + [DEFAULTS["weight_bounds"]] * k
            for budget in budgets:
                regrets = {name: [] for name in OPTIMIZERS}
                evals = {name: [] for name in OPTIMIZERS}
                for i in range(instances):
                    objective = instance(family, k, np.random.default_rng(1000 * k + i))
                    for name, search in OPTIMIZERS.items():
                        result = search(objective, (1.0,) * (k + 1), bounds, budget=budget,
                                        tolerance=DEFAULTS["tolerance"], seed=i)
                        regrets[name].append(-result.score)
                        evals[name].append(len(result.history))
                wins = sum(c < d for c, d in zip(regrets["cmaes"], regrets["coordinate"]))
                rows.append({"family": family, "weights": k, "dimensions": k + 1, "budget": budget,
                             **{f"{n}_median_regret": statistics.median(regrets[n]) for n in OPTIMIZERS},
                             **{f"{n}_mean_evaluations": statistics.mean(evals[n]) for n in OPTIMIZERS},
                             "cmaes_better": wins / instances})
                r = rows[-1]
                print(f"{family:9s} K={k:2d} budget {budget:3d}: median regret coordinate "
                      f"{r['coordinate_median_regret']:.2e} ({r['coordinate_mean_evaluations']:.0f} evals), cmaes "
                      f"{r['cmaes_median_regret']:.2e} ({r['cmaes_mean_evaluations']:.0f}); cmaes better in "
                      f"{r['cmaes_better']:.0%}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="1,2,3,4,8,16,32", help="K values (models or weight groups)")
    parser.add_argument("--budgets", default="60,200,600")
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    rows = compare([int(v) for v in args.weights.split(",")], [int(v) for v in args.budgets.split(",")],
                   args.instances)
    print(f"{time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"instances": args.instances, "tolerance": DEFAULTS["tolerance"],
                                        "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
