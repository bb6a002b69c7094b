"""How `tune` searches: two searches over a box with one signature, a
coordinate-wise search with halving steps and CMA-ES (the `cma` package) on
the box scaled to [0, 1] in every coordinate (`auto` picks by whether the
weights interact and the budget per searched value), and `optimise`, which
first searches lambda alone as the one-lambda baselines do and starts the
chosen search from the better of that and the given start."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mergekit_cabs.tune.options import TuneError


@dataclass
class SearchResult:
    best: tuple[float, ...]
    score: float
    history: list[tuple[tuple[float, ...], float]]  # every point evaluated, in order
    stopped: str  # "converged" or "budget"
    optimizer: str = "coordinate"
    began: tuple[float, ...] | None = None  # where the full search started (None: the start given)
    details: dict | None = None  # what a search says of itself beyond these (the gradient search's steps)


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


GRADIENT = "gradient"  # the gradient search (`gradsearch`): it takes slopes, not only values
# `auto` takes the gradient search from this many searched numbers on, where
# the budget cannot take `GRADIENT_PASSES` steps each way along each: per
# layer and per tensor on a real model, never one weight per model.  In
# docs/tune-evidence.md the gradient search tied the coordinate search per
# model and on the demo's 10 per-layer numbers at equal cost, scored lower
# on family 2's 11 and as high or higher, for less, on family 1's 21, and
# beat it by 0.16 per tensor on the demo (64 numbers), where the coordinate
# search had one pass over each.
GRADIENT_DIMENSIONS = 16
GRADIENT_PASSES = 3


def sweep(dimensions: int) -> int:
    """Evaluations for one step each way along every searched number, and the start."""
    return 2 * dimensions + 1


def choose_optimizer(optimizer: str, dimensions: int, budget: int, coupled: bool = False,
                     differentiable: bool = False) -> str:
    """The search `optimizer` names; "auto": the gradient search when the data
    is `differentiable`, at least `GRADIENT_DIMENSIONS` numbers are searched
    and the budget cannot take `GRADIENT_PASSES` steps each way along each
    (`sweep`: the shape is too fine for a search without slopes), else
    CMA-ES when the weights are `coupled` (the models' kept places overlap)
    and the budget allows `CMAES_EVALUATIONS_PER_VALUE` evaluations per
    searched value, else the coordinate search."""
    if optimizer == "auto":
        fine = dimensions >= GRADIENT_DIMENSIONS and budget < GRADIENT_PASSES * sweep(dimensions)
        if differentiable and fine:
            return GRADIENT
        return "cmaes" if coupled and budget >= CMAES_EVALUATIONS_PER_VALUE * dimensions else "coordinate"
    if optimizer not in (*SEARCHES, GRADIENT):
        raise TuneError(f"--optimizer is {optimizer!r}; choose auto, {', '.join(SEARCHES)}, {GRADIENT}")
    return optimizer


def budget_note(dimensions: int, budget: int, option: str = "--budget", shares: int = 1) -> str | None:
    """A warning when the budget cannot score one step each way along every
    searched number from the start (2 x dimensions + 1 evaluations), else
    None; `option` names the option the budget comes from, of which it is
    one of `shares` equal shares (--total-budget among settings)."""
    needed = sweep(dimensions)
    if budget >= needed:
        return None
    what = f"{option} {budget}" if shares == 1 else f"each of the {shares} settings' share of {option}, {budget},"
    slopes = ", or --optimizer gradient" if dimensions >= GRADIENT_DIMENSIONS else ""
    return (f"tune: {what} is less than one step each way along each of the {dimensions} searched "
            f"numbers ({needed} evaluations), so some are never moved from the start; give {option} "
            f"{5 * needed * shares} or more{slopes}")


LINE_SHARE = 2  # the lambda line (`optimise`) spends at most 1/LINE_SHARE of the budget: half


def optimise(optimizer: str, objective: Callable[[tuple[float, ...]], float], start: Sequence[float],
             bounds: Sequence[tuple[float, float]], *, budget: int, tolerance: float, seed: int,
             coupled: bool = False, line_from: float | None = None) -> SearchResult:
    """Maximise `objective` over the box with the search `optimizer` names
    ("auto", "coordinate" or "cmaes"; see `choose_optimizer`).

    With `line_from` (a value of the first coordinate, lambda) and a budget
    of at least 2 x `LINE_SHARE`: score `start`, then search the first
    coordinate alone from `line_from`, the others held at `start` (the
    coordinate search, as the one-lambda baselines search their lambda), in
    at most a `LINE_SHARE`th of the budget; the chosen search then starts
    from the better of `start` and the line's best and spends the rest.  A
    point is scored once across both; the history is every point in the
    order scored."""
    chosen = choose_optimizer(optimizer, len(bounds), budget, coupled)
    line_budget = budget // LINE_SHARE
    if line_from is None or line_budget < 2:
        return SEARCHES[chosen](objective, start, bounds, budget=budget, tolerance=tolerance, seed=seed)
    seen: dict[tuple[float, ...], float] = {}

    def once(x: tuple[float, ...]) -> float:
        if x not in seen:
            seen[x] = float(objective(x))
        return seen[x]

    began = lambda_line(once, start, bounds, line_from, budget=line_budget, tolerance=tolerance).best
    rest = SEARCHES[chosen](once, began, bounds, budget=budget - len(seen) + 1, tolerance=tolerance, seed=seed)
    return dataclasses.replace(rest, history=list(seen.items()), began=began)


def lambda_line(objective: Callable[[tuple[float, ...]], float], start: Sequence[float],
                bounds: Sequence[tuple[float, float]], line_from: float, *, budget: int,
                tolerance: float) -> SearchResult:
    """Score `start`, then search the first coordinate (lambda) alone from
    `line_from`, the others held at `start` (the coordinate search), in at
    most `budget` points in all; `best` is the better of `start` and the
    line's best (`start` on a tie), `history` every point scored (each once)."""
    seen: dict[tuple[float, ...], float] = {}

    def once(x: tuple[float, ...]) -> float:
        if x not in seen:
            seen[x] = float(objective(x))
        return seen[x]

    first = _Box(once, bounds, 1)
    first.begin(start)
    if budget < 2:
        return SearchResult(best=first.x, score=first.fx, history=first.history, stopped="budget")
    held = [bounds[0]] + [(v, v) for v in first.x[1:]]
    line = coordinate_search(once, (line_from, *first.x[1:]), held, budget=budget - 1, tolerance=tolerance)
    best, score = (line.best, line.score) if line.score > first.fx else (first.x, first.fx)
    return SearchResult(best=best, score=score, history=list(seen.items()), stopped=line.stopped, began=first.x)


def at_bounds(point: Sequence[float], bounds: Sequence[tuple[float, float]]) -> list[tuple[int, str]]:
    """The coordinates of `point` that lie on a bound of the box: (index, "lower" or "upper")."""
    return [(j, "lower" if v <= lo else "upper") for j, (v, (lo, hi)) in enumerate(zip(point, bounds))
            if lo < hi and (v <= lo or v >= hi)]
