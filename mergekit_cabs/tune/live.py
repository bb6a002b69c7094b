"""The live model and one point of a search: the search's settings, the
store bound to the model, setting a point and scoring it, and one search
(`search.optimise`) over the fit items with every point timed."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_cabs.tune.data import task_scores
from mergekit_cabs.tune.gradsearch import live_gradient_search, split_fit
from mergekit_cabs.tune.groups import LayerGroups
from mergekit_cabs.tune.objective import Objective
from mergekit_cabs.tune.options import DEFAULTS, TuneError
from mergekit_cabs.tune.prepare import Prepared
from mergekit_cabs.tune.rows import SPLITS, mean_measures, means
from mergekit_cabs.tune.search import (
    GRADIENT,
    GRADIENT_DIMENSIONS,
    SearchResult,
    at_bounds,
    budget_note,
    choose_optimizer,
    lambda_line,
    optimise,
    sweep,
)
from mergekit_cabs.tune.smooth import check_differentiable, differentiable
from mergekit_cabs.tune.store import WeightStore, build_store, release_memory


@contextlib.contextmanager
def timed(clock: dict[str, float], key: str):
    """Within the block, time it: `clock[key]` = its wall seconds."""
    started = time.perf_counter()
    yield
    clock[key] = time.perf_counter() - started


def say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


@dataclass
class Settings:
    """The search's settings, as `run_tune` takes them."""

    device: str
    store_device: str
    score_dtype: torch.dtype
    objective: str
    general_weight: float
    budget: int
    weight_bounds: tuple[float, float]
    lambda_bounds: tuple[float, float]
    tolerance: float
    batch_size: int
    quiet: bool
    optimizer: str = DEFAULTS["optimizer"]
    seed: int = DEFAULTS["seed"]
    budget_option: str = "--budget"  # where `budget` comes from, for the budget warning
    budget_shares: int = 1  # ... as one of this many equal shares of it
    minibatch: int = DEFAULTS["minibatch"]  # the gradient search: items per data set per step
    learning_rate: float = DEFAULTS["learning_rate"]  # ... Adam's step, a fraction of each number's range


@dataclass
class Live:
    """The model being scored and the store that sets its weights."""

    model: Any
    store: WeightStore
    tasks: list  # any kind (`data`)
    batch_size: int
    groups: LayerGroups
    models: int

    def set(self, x: Sequence[float]) -> None:
        """Set the model to the merge at point x = (lambda, then the weights as `Prepared.names`)."""
        self.store.apply(self.groups.rows(x[1:], self.models), x[0])

    def scores(self, split: str) -> dict[str, dict[str, torch.Tensor]]:
        """Every task's measures on `split`, per item (`data.task_scores`)."""
        return task_scores(self.model, self.tasks, split, self.batch_size)

    def losses(self, split: str) -> dict[str, torch.Tensor]:
        """Every task's objective measure on `split`, per item."""
        return {t.name: scored[t.measure] for t, scored in zip(self.tasks, self.scores(split).values())}


def bind_store(prep: Prepared, model, s: Settings, planned=None, announce: str | None = "") -> WeightStore:
    """Phase 2: the masks, through mergekit's merge, kept in a store bound to `model`.
    The merge runs where the store will live: on the host unless the store is
    kept on the device, so that one tensor's merge (its inputs, masks and
    temporaries: about 25 bytes per weight of the largest tensor by a count
    of its arrays, 13 GB for a 128k-vocabulary 8B's embeddings) never needs
    device memory.  `planned`: a setting's plan (None: the configuration's);
    `announce`: say when the models' kept places overlap (once per search;
    None: not), the setting's words put after "overlap"."""
    store = build_store(prep.planned if planned is None else planned, prep.finetunes, model,
                        device=s.store_device, store_device=s.store_device, progress=not s.quiet)
    for slot in store.slots:
        slot.group = prep.groups.of(slot.name)
    release_memory()
    if announce is not None and not store.disjoint:
        say(
            f"tune: the models' kept places overlap{announce} ({store.shared_places():,} of {store.places():,} "
            "places are changed by two or more models: overlap: fill with K*n > m, or conflict_aware: false); the "
            "weights are no longer independent, and every model's pruned tensor is kept in memory",
            False,
        )
    return store


def check_scored(live: Live, x: Sequence[float], losses: dict[str, float], prep: Prepared) -> None:
    """A point's losses are finite; else a TuneError naming the point, the
    merged tensor that holds NaN or infinity and the model keeping it there."""
    bad = [task for task, loss in losses.items() if not math.isfinite(loss)]
    if not bad:
        return
    point = ", ".join(f"{k} {w:.4g}" for k, w in zip(prep.names(), x))
    found = live.store.non_finite()
    if found is None:
        where = "its weights are finite, so the forward pass overflows"
    else:
        tensor, model = found
        owner = "" if model is None else f", at a place {prep.labels[model]!r} keeps"
        where = f"its tensor {tensor} holds NaN or infinite values{owner}"
    raise TuneError(f"tune: the merge at {point} scores a non-finite loss on the data of {bad[0]!r}: {where}; "
                    "narrow --weight-bounds or --lambda-bounds, or check that model's weights")


def check_search(prep: Prepared, optimizer: str, budget: int, minibatch: int, learning_rate: float) -> None:
    """Before any model loads: the gradient search's data is differentiable
    and its settings sane; a search without slopes over a fine shape (at
    least `GRADIENT_DIMENSIONS` numbers) can move each number once."""
    dims = len(prep.names())
    if optimizer == GRADIENT:
        check_differentiable(prep.tasks)
    if isinstance(minibatch, bool) or not isinstance(minibatch, int) or minibatch < 1:
        raise TuneError(f"--minibatch is {minibatch!r}; it must be a whole number >= 1 (items per data set per step)")
    if not (math.isfinite(learning_rate) and 0 < learning_rate <= 1):
        raise TuneError(f"--learning-rate is {learning_rate}; give a number in (0, 1] (Adam's step as a fraction of "
                        "each number's range)")
    if optimizer in ("coordinate", "cmaes") and dims >= GRADIENT_DIMENSIONS and budget < dims + 1:
        raise TuneError(f"--optimizer {optimizer} with --budget {budget} cannot move each of the {dims} searched "
                        f"numbers once; use --optimizer gradient (or auto), or give --budget {5 * sweep(dims)} or "
                        "more")


def search_space(prep: Prepared, s: Settings) -> tuple[list[str], list[tuple[float, float]], tuple[float, ...]]:
    """The searched numbers (lambda, then each model's weight or weights): names, bounds, start."""
    names = prep.names()
    bounds = [s.lambda_bounds] + [s.weight_bounds] * (len(names) - 1)
    return names, bounds, (prep.start_lambda, *prep.start_weights)


def search(live: Live, objective: Objective, prep: Prepared, s: Settings,
           say_budget: bool = True) -> tuple[SearchResult, list[dict]]:
    """Phase 3: the search on the fit items, from the better of your
    config's point and the best one-lambda point (lambda searched alone from
    1, as the one-lambda baselines do): `optimise`, or the gradient search
    (`gradient_search`); every point evaluated on every fit item is timed and
    kept (`say_budget`: print `budget_note`'s line, if any)."""
    import tqdm

    names, bounds, start = search_space(prep, s)
    chosen = choose_optimizer(s.optimizer, len(bounds), s.budget, not live.store.disjoint, differentiable(live.tasks))
    note = budget_note(len(bounds), s.budget, s.budget_option, s.budget_shares) if say_budget else None
    if note and chosen != GRADIENT:
        say(note, False)
    points: list[dict] = []
    steps = chosen == GRADIENT
    bar = tqdm.tqdm(total=s.budget, desc="Tuning (gradient steps)" if steps else "Tuning", unit="step" if steps
                    else "eval", disable=s.quiet)
    evaluate = point_scorer(live, objective, prep, s, points, None if steps else bar)
    line_from = min(max(1.0, bounds[0][0]), bounds[0][1])
    with bar:
        if steps:
            result = gradient_search(live, objective, evaluate, start, bounds, s, line_from, bar)
        else:
            result = optimise(chosen, evaluate, start, bounds, budget=s.budget, tolerance=s.tolerance, seed=s.seed,
                              coupled=not live.store.disjoint, line_from=line_from)
    return result, points


def point_scorer(live: Live, objective: Objective, prep: Prepared, s: Settings, points: list[dict], bar):
    """The search's objective: set the live model to a point, score every fit
    item, check the losses are finite; each point kept in `points`, timed,
    and counted on `bar` (when given)."""
    names = prep.names()

    def evaluate(x: tuple[float, ...]) -> float:
        took: dict[str, float] = {}
        with timed(took, "set_s"):
            live.set(x)
            if s.device.startswith("cuda"):
                torch.cuda.synchronize()
        with timed(took, "eval_s"):
            fit = means(live.losses("fit"))
        check_scored(live, x, fit, prep)
        score = objective.score(fit)
        points.append({"lambda": x[0], "weights": dict(zip(names[1:], x[1:])), "fit_loss": fit, "score": score,
                       **took})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(best=f"{max(p['score'] for p in points):.4f}")
        return score

    return evaluate


class StepBar(list):
    """A gradient search's trace (`live_gradient_search`'s `trace`) that counts each step on a progress bar."""

    def __init__(self, bar):
        super().__init__()
        self.bar = bar

    def append(self, step: dict) -> None:
        super().append(step)
        self.bar.update(1)
        self.bar.set_postfix(batch=f"{step['score']:.4f}")


def gradient_search(live: Live, objective: Objective, evaluate, start, bounds, s: Settings, line_from: float,
                    bar) -> SearchResult:
    """The gradient search's run: your config's point, then lambda alone
    from `line_from` (`lambda_line`, at most `DEFAULTS["line_evaluations"]`
    evaluations of every fit item), then Adam from the better of the two
    (`live_gradient_search`: `s.budget` steps of `s.minibatch` items per data
    set, early stopping on a held-back quarter of the fit items); the point
    it keeps is scored on every fit item by the real merge (`evaluate`),
    which is the search's score.  `details`: the steps, the validations and
    what it all cost in forward passes over the fit items."""
    line = lambda_line(evaluate, start, bounds, line_from, budget=DEFAULTS["line_evaluations"],
                       tolerance=s.tolerance)
    trace = StepBar(bar)
    found = live_gradient_search(live, objective, line.best, bounds, steps=s.budget, items=s.minibatch,
                                 seed=s.seed, rate=s.learning_rate, checkpoint=True, trace=trace)
    scored = dict(line.history)  # a point the line scored is not scored again
    score = scored[found.best] if found.best in scored else evaluate(found.best)  # the real merge, every fit item
    history = line.history + ([] if found.best in scored else [(found.best, score)])
    details = gradient_cost(live.tasks, s.minibatch, len(trace), len(found.history), len(history))
    details.update(stopped=found.stopped, validated=[{"lambda": x[0], "score": v} for x, v in found.history],
                   minibatch_scores=[step["score"] for step in trace], learning_rate=s.learning_rate)
    return SearchResult(best=found.best, score=score, history=history, stopped=found.stopped, optimizer=GRADIENT,
                        began=line.best, details=details)


def gradient_cost(tasks, minibatch: int, steps: int, validations: int, evaluations: int) -> dict:
    """What a gradient search cost, in forward passes over items and in
    evaluations' worth (one evaluation: every fit item once).  A step's item
    counts 4 forward passes: the forward pass, the backward pass (about two)
    and the decoder layers' recomputation under checkpointing."""
    train, check = split_fit(tasks)
    fit = sum(t.count("fit") for t in tasks)
    per_step = sum(min(minibatch, len(pool)) for pool in train.values())
    passes = 4 * per_step * steps + validations * sum(len(c) for c in check.values()) + evaluations * fit
    return {"steps": steps, "minibatch": minibatch, "items_per_step": per_step, "validations": validations,
            "evaluations": evaluations, "forward_passes": passes, "evaluation_equivalents": passes / max(1, fit)}


def search_notes(prep: Prepared, s: Settings, result: SearchResult) -> dict:
    """Where a search started its full search (`optimise`: your config's
    point or the best one-lambda point) and which of the chosen numbers
    ended on a bound of the search: {"began": {...}, "on_bounds": [...]}."""
    names, bounds, start = search_space(prep, s)
    began = result.began or tuple(start)
    options = ["--lambda-bounds"] + ["--weight-bounds"] * (len(names) - 1)
    return {"began": {"lambda": began[0], "weights": dict(zip(names[1:], began[1:])),
                      "from": "your config" if result.began in (None, result.history[0][0]) else "one lambda"},
            "on_bounds": [{"name": names[j], "value": result.best[j], "bound": side, "option": options[j],
                           "bounds": list(bounds[j])} for j, side in at_bounds(result.best, bounds)]}


def score_point(live: Live, objectives: dict[str, Objective], x: Sequence[float]) -> dict:
    """Phase 4: losses, gains and objective of point x on both splits (the model is left at x)."""
    live.set(x)
    return score_now(live, objectives)


def heldout_score(live: Live, objectives: dict[str, Objective], x: Sequence[float]) -> float:
    """The objective of point x on the held-out data alone (the model is left at x)."""
    live.set(x)
    return objectives["heldout"].score(means(live.losses("heldout")))


def score_now(live: Live, objectives: dict[str, Objective]) -> dict:
    """Losses (mean and per window), gains and objective of the live model as it is, on both splits."""
    out = {}
    for split in SPLITS:
        scored = live.scores(split)
        per_item = {t.name: scored[t.name][t.measure] for t in live.tasks}
        losses = means(per_item)
        out[split] = {"loss": losses, "gain": objectives[split].gains(losses), "score": objectives[split].score(losses),
                      "window_losses": {k: v.tolist() for k, v in per_item.items()},
                      "measures": {k: mean_measures(by) for k, by in scored.items()}}
    return out
