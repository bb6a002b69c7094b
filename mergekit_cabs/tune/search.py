"""What `tune` maximises and how: the objective over the data sets' losses,
and two searches over a box with one signature: a coordinate-wise search
with halving steps, and CMA-ES (the `cma` package) on the box scaled to
[0, 1] in every coordinate.  `auto` picks by whether the weights interact
and the budget per searched value."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mergekit_cabs.tune.options import GENERAL, NO_TASKS_FOR_GAIN, TuneError
from mergekit_cabs.tune.rows import SPLITS

# --- the objective -------------------------------------------------------------------


@dataclass
class Objective:
    kind: str  # "gain" or "loss"
    tasks: list[str]
    base: dict[str, float]  # L_base per data set (the split being scored)
    own: dict[str, float]  # L of model i on task i
    general_weight: float = 0.0
    weights: dict[str, float] | None = None  # each task's weight in the mean (None: 1 each)
    lower: dict[str, bool] | None = None  # whether lower is better, per task (None: all losses)

    def weight(self, task: str) -> float:
        return 1.0 if self.weights is None else self.weights.get(task, 1.0)

    def sign(self, task: str) -> float:
        """+1 for a loss, -1 for a measure where higher is better."""
        return 1.0 if self.lower is None or self.lower.get(task, True) else -1.0

    def mean(self, values: dict[str, float]) -> float:
        """The tasks' weighted mean of `values`."""
        return sum(self.weight(t) * values[t] for t in self.tasks) / sum(self.weight(t) for t in self.tasks)

    def gains(self, losses: dict[str, float]) -> dict[str, float]:
        """Normalized gain per task, (L_base - L) / (L_base - L_own) (the same
        for a measure where higher is better); for the general set, the
        relative loss change (L_base - L) / L_base.  NaN where the model is
        no different from the base on its task (possible with the loss
        objective, which does not use the gains)."""
        out = {t: (self.base[t] - losses[t]) / (self.base[t] - self.own[t]) if self.base[t] != self.own[t]
               else math.nan for t in self.tasks}
        if GENERAL in losses:
            out[GENERAL] = (self.base[GENERAL] - losses[GENERAL]) / self.base[GENERAL]
        return out

    def score(self, losses: dict[str, float]) -> float:
        """What the search maximises: the weighted mean gain over tasks plus the
        weighted general term; for "loss", minus (the weighted mean loss over
        tasks, a higher-is-better measure counted negative, plus the weighted
        general loss), and with no tasks (--general alone) minus the general
        loss itself."""
        general = GENERAL in losses
        if self.kind == "loss":
            if not self.tasks:
                return -losses[GENERAL]
            value = -self.mean({t: self.sign(t) * losses[t] for t in self.tasks})
            return value - (self.general_weight * losses[GENERAL] if general else 0.0)
        gains = self.gains(losses)
        return self.mean(gains) + (self.general_weight * gains[GENERAL] if general else 0.0)


def split_objectives(kind: str, tasks: Sequence[str], reference: dict, general_weight: float,
                     weights: dict[str, float] | None = None, lower: dict[str, bool] | None = None,
                     ) -> dict[str, Objective]:
    """The objective on each split, from the reference values (`reference["base"][split][task]`,
    `reference["models"][task][split]`); for "gain", each model must beat the base on its own data.
    `tasks` are the models with data (none with --general alone, which needs "loss");
    `weights` and `lower`: each task's weight and direction (`Objective`)."""
    if kind == "gain" and not tasks:
        raise TuneError(NO_TASKS_FOR_GAIN)
    objectives = {
        s: Objective(kind, list(tasks), reference["base"][s], {k: v[s] for k, v in reference["models"].items()},
                     general_weight, weights, lower)
        for s in SPLITS
    }
    if kind == "gain":
        for label in tasks:
            for s in SPLITS:
                base, own = reference["base"][s][label], reference["models"][label][s]
                if not objectives[s].sign(label) * (base - own) > 0:
                    raise TuneError(
                        f"model '{label}' is no better than the base on its own {s} data "
                        f"({own:.4f} vs base {base:.4f}), so its "
                        "normalized gain is undefined; check its --data file, or use --objective loss"
                    )
    return objectives


# --- the search ----------------------------------------------------------------------


@dataclass
class SearchResult:
    best: tuple[float, ...]
    score: float
    history: list[tuple[tuple[float, ...], float]]  # every point evaluated, in order
    stopped: str  # "converged" or "budget"
    optimizer: str = "coordinate"


class _Spent(Exception):
    """The budget is spent."""


class _Box:
    """The objective over a box: points clipped into it, each scored once,
    at most `budget` of them."""

    def __init__(self, objective, bounds, budget: int):
        if budget < 1:
            raise ValueError("budget must be >= 1")
        self.objective, self.budget = objective, budget
        self.lows = [float(lo) for lo, _ in bounds]
        self.highs = [float(hi) for _, hi in bounds]
        self.seen: dict[tuple[float, ...], float] = {}
        self.history: list[tuple[tuple[float, ...], float]] = []
        self.x: tuple[float, ...] = ()  # the current (best) point and its score
        self.fx = -math.inf

    def begin(self, start: Sequence[float]) -> None:
        """The search's first point: `start` clipped into the box, scored."""
        self.x = self.clip(start)
        self.fx = self.score(self.x)

    def clip(self, values) -> tuple[float, ...]:
        return tuple(round(min(hi, max(lo, v)), 10) for v, lo, hi in zip(values, self.lows, self.highs))

    def score(self, point: tuple[float, ...]) -> float:
        if point not in self.seen:
            if len(self.seen) >= self.budget:
                raise _Spent
            self.seen[point] = float(self.objective(point))
            self.history.append((point, self.seen[point]))
        return self.seen[point]

    def moved(self, point: tuple[float, ...], j: int, delta: float) -> tuple[float, ...]:
        return self.clip(point[:j] + (point[j] + delta,) + point[j + 1:])

    def improve_along(self, j: int, step: float) -> bool:
        """From the current point, try +step then -step on coordinate j and keep
        going while that improves; whether it moved.  The current point is
        always the best so far, also when the budget runs out mid-way."""
        for direction in (1, -1):
            y = self.moved(self.x, j, direction * step)
            if y == self.x or self.score(y) <= self.fx:
                continue
            self.x, self.fx = y, self.seen[y]
            while (z := self.moved(self.x, j, direction * step)) != self.x and self.score(z) > self.fx:
                self.x, self.fx = z, self.seen[z]
            return True
        return False


def coordinate_search(
    objective: Callable[[tuple[float, ...]], float],
    start: Sequence[float],
    bounds: Sequence[tuple[float, float]],
    *,
    budget: int,
    tolerance: float,
    seed: int = 0,
) -> SearchResult:
    """Maximise `objective` over a box, one coordinate at a time.

    Each coordinate starts with a step of a quarter of its range.  A sweep
    tries +step and -step on every coordinate in turn and keeps going in a
    direction while that improves; a sweep that improves nothing halves every
    step.  Stops when every step is below `tolerance` or after `budget`
    distinct points (the start included).  Deterministic (`seed` is
    unused: nothing is drawn); a point is never evaluated twice.
    """
    box = _Box(objective, bounds, budget)
    box.begin(start)
    steps = [(hi - lo) / 4 for lo, hi in zip(box.lows, box.highs)]
    stopped = "converged"
    try:
        while any(step >= tolerance for step in steps):
            improved = False
            for j, step in enumerate(steps):
                if step >= tolerance and box.improve_along(j, step):
                    improved = True
            if not improved:
                steps = [step / 2 for step in steps]
    except _Spent:
        stopped = "budget"
    return SearchResult(best=box.x, score=box.fx, history=box.history, stopped=stopped)


def cmaes_search(
    objective: Callable[[tuple[float, ...]], float],
    start: Sequence[float],
    bounds: Sequence[tuple[float, float]],
    *,
    budget: int,
    tolerance: float,
    seed: int = 0,
) -> SearchResult:
    """Maximise `objective` over a box with CMA-ES (`cma`), from `start`.

    The search runs on the box scaled to [0, 1] in every coordinate (so the
    weights and lambda share one step size), from the start clipped into the
    box, with sigma0 a quarter of the range and cma's own bound handling.
    The start is scored first; a point is scored once (points are rounded to
    10 decimals, so a repeat is free) and at most `budget` points are.  Stops
    when the budget is spent ("budget") or when cma's own tests stop it, with
    its x tolerance set to `tolerance` on the widest coordinate
    ("converged").  The best point seen is the result.  The draws come from
    a numpy generator seeded with `seed` and nothing else (numpy's global
    state is neither read nor changed), so a seed gives the same points.
    """
    import cma
    import numpy as np

    box = _Box(objective, bounds, budget)
    box.begin(start)
    widths = [hi - lo for lo, hi in zip(box.lows, box.highs)]
    rng = np.random.default_rng(seed)
    options = {"bounds": [0.0, 1.0], "seed": np.nan, "randn": lambda *shape: rng.standard_normal(shape),
               "tolx": tolerance / max(widths), "verbose": -9}
    es = cma.CMAEvolutionStrategy([(v - lo) / w for v, lo, w in zip(box.x, box.lows, widths)], 0.25, options)
    stopped = "converged"
    try:
        for _ in range(100 * budget):  # a generation of repeats costs nothing: a cap all the same
            if es.stop():
                break
            candidates = es.ask()
            values = []
            for c in candidates:
                point = box.clip(lo + w * float(u) for u, lo, w in zip(c, box.lows, widths))
                values.append(box.score(point))
                if values[-1] > box.fx:
                    box.x, box.fx = point, values[-1]
            es.tell(candidates, [-v for v in values])
    except _Spent:
        stopped = "budget"
    return SearchResult(best=box.x, score=box.fx, history=box.history, stopped=stopped, optimizer="cmaes")


SEARCHES = {"coordinate": coordinate_search, "cmaes": cmaes_search}
# `auto` uses CMA-ES only where it found better points than the coordinate
# search at equal budgets (README, "Which search"): on coupled objectives
# (benchmarks/tune_optimizers.py, synthetic) with a budget of at least this
# many evaluations per searched value.  On trained models with disjoint
# supports (benchmarks/tune_compare.py) the coordinate search was as good or
# better at every budget measured, 50 evaluations per value included.
CMAES_EVALUATIONS_PER_VALUE = 50


def choose_optimizer(optimizer: str, dimensions: int, budget: int, coupled: bool = False) -> str:
    """The search `optimizer` names; "auto": CMA-ES when the weights are
    `coupled` (the models' kept places overlap) and the budget allows
    `CMAES_EVALUATIONS_PER_VALUE` evaluations per searched value, else the
    coordinate search."""
    if optimizer == "auto":
        return "cmaes" if coupled and budget >= CMAES_EVALUATIONS_PER_VALUE * dimensions else "coordinate"
    if optimizer not in SEARCHES:
        raise TuneError(f"--optimizer is {optimizer!r}; choose auto, {', '.join(SEARCHES)}")
    return optimizer


def budget_note(dimensions: int, budget: int, option: str = "--budget", shares: int = 1) -> str | None:
    """A warning when the budget cannot score one step each way along every
    searched number from the start (2 x dimensions + 1 evaluations), else
    None; `option` names the option the budget comes from, of which it is
    one of `shares` equal shares (--total-budget among settings)."""
    sweep = 2 * dimensions + 1
    if budget >= sweep:
        return None
    what = f"{option} {budget}" if shares == 1 else f"each of the {shares} settings' share of {option}, {budget},"
    return (f"tune: {what} is less than one step each way along each of the {dimensions} searched "
            f"numbers ({sweep} evaluations), so some are never moved from the start; give {option} "
            f"{5 * sweep * shares} or more")


def optimise(optimizer: str, objective: Callable[[tuple[float, ...]], float], start: Sequence[float],
             bounds: Sequence[tuple[float, float]], *, budget: int, tolerance: float, seed: int,
             coupled: bool = False) -> SearchResult:
    """Maximise `objective` over the box with the search `optimizer` names
    ("auto", "coordinate" or "cmaes"; see `choose_optimizer`)."""
    chosen = choose_optimizer(optimizer, len(bounds), budget, coupled)
    return SEARCHES[chosen](objective, start, bounds, budget=budget, tolerance=tolerance, seed=seed)
