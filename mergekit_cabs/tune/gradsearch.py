"""The gradient search: Adam on the exact gradient of the objective
(`gradient.objective_gradient`), over minibatches of the fit items, with
early stopping on a held-back slice of the fit items (never the held-out
split).

`gradient_search` has the other searches' shape (`search.coordinate_search`,
`search.cmaes_search`) with a gradient instead of a plain objective;
`live_gradient_search` wires it to a live model: the minibatches, the
held-back slice and its validation."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from mergekit_cabs.tune.gradient import objective_gradient, objective_value
from mergekit_cabs.tune.search import SearchResult

DEFAULT_STEPS = 60
DEFAULT_RATE = 0.03  # Adam's step, as a fraction of each coordinate's range
DEFAULT_EVERY = 5  # steps between validations
DEFAULT_PATIENCE = 4  # validations without improvement before stopping
DEFAULT_ITEMS = 8  # items per task per minibatch
DEFAULT_HELD_BACK = 0.25  # of each task's fit items, for the validation


def gradient_search(
    gradient: Callable[[tuple[float, ...]], tuple[float, Sequence[float]]],
    validate: Callable[[tuple[float, ...]], float],
    start: Sequence[float],
    bounds: Sequence[tuple[float, float]],
    *,
    steps: int = DEFAULT_STEPS,
    rate: float = DEFAULT_RATE,
    every: int = DEFAULT_EVERY,
    patience: int = DEFAULT_PATIENCE,
    trace: list | None = None,
) -> SearchResult:
    """Maximise with Adam (`torch.optim.Adam`, float64) from `start`, each
    coordinate scaled to [0, 1] over its bounds (so `rate` is a fraction of
    its range) and projected back into them after every step.

    `gradient(point)`: (the minibatch's score, its gradient in the point's
    order); `validate(point)`: the score on the held-back items.  The start
    is validated, then the point after every `every` steps (and the last
    one); the best validated point is the result, and the search stops
    ("converged") after `patience` validations in a row without improving
    it, else after `steps` steps ("budget").  `history`: every validated
    point and its score, in order; `trace`, when given, gets each step's
    point, minibatch score and gradient.  Deterministic when `gradient` and
    `validate` are."""
    if steps < 1 or every < 1 or patience < 1:
        raise ValueError("steps, every and patience must be >= 1")
    lows = torch.tensor([float(lo) for lo, _ in bounds], dtype=torch.float64)
    widths = torch.tensor([float(hi) - float(lo) for lo, hi in bounds], dtype=torch.float64)
    u = ((torch.tensor([float(v) for v in start], dtype=torch.float64) - lows) / widths).clamp_(0, 1)
    u.requires_grad_(True)
    adam = torch.optim.Adam([u], lr=rate, maximize=True)

    def point() -> tuple[float, ...]:
        x = (lows + widths * u.detach().clamp(0, 1)).tolist()
        return tuple(min(hi, max(lo, v)) for v, (lo, hi) in zip(x, bounds))

    history = [(point(), float(validate(point())))]
    best, best_score, stale, stopped = history[0][0], history[0][1], 0, "budget"
    for step in range(1, steps + 1):
        x = point()
        score, slope = gradient(x)
        if trace is not None:
            trace.append({"step": step, "point": x, "score": score, "gradient": tuple(slope)})
        u.grad = torch.tensor([float(g) for g in slope], dtype=torch.float64) * widths
        adam.step()
        with torch.no_grad():
            u.clamp_(0, 1)
        if step % every and step != steps:
            continue
        history.append((point(), float(validate(point()))))
        if history[-1][1] > best_score:
            best, best_score, stale = history[-1][0], history[-1][1], 0
        elif (stale := stale + 1) >= patience:
            stopped = "converged"
            break
    return SearchResult(best=best, score=best_score, history=history, stopped=stopped, optimizer="gradient")


def held_back(count: int, fraction: float) -> list[int]:
    """Which of `count` items are held back for the validation: evenly spread,
    about `fraction` of them, at least one and never all (none when count < 2)."""
    if count < 2:
        return []
    size = min(count - 1, max(1, round(count * fraction)))
    return sorted({math.floor((k + 0.5) * count / size) for k in range(size)})


def split_fit(tasks, fraction: float = DEFAULT_HELD_BACK) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Per task, (the fit items the minibatches draw from, the held-back ones
    the validation scores); a task with one fit item is in both."""
    train, check = {}, {}
    for task in tasks:
        count = task.count("fit")
        back = held_back(count, fraction)
        train[task.name] = [i for i in range(count) if i not in set(back)]
        check[task.name] = back or list(range(count))
    return train, check


def live_gradient_search(live, objective, start: Sequence[float], bounds: Sequence[tuple[float, float]], *,
                         steps: int = DEFAULT_STEPS, items: int = DEFAULT_ITEMS, seed: int = 0,
                         rate: float = DEFAULT_RATE, every: int = DEFAULT_EVERY, patience: int = DEFAULT_PATIENCE,
                         held_back_fraction: float = DEFAULT_HELD_BACK, checkpoint: bool = False,
                         trace: list | None = None) -> SearchResult:
    """`gradient_search` on the live model: each step's minibatch is `items`
    fit items per task (all when it has fewer), drawn without replacement
    from a torch generator seeded with `seed` (and nothing else), from the
    fit items not held back (`split_fit`); the validation scores every
    held-back item.  `objective`: the fit split's (its normalisation is the
    fit data's).  The model is left at the last point scored."""
    train, check = split_fit(live.tasks, held_back_fraction)
    draws = torch.Generator().manual_seed(seed)

    def minibatch() -> dict[str, list[int]]:
        return {name: [pool[int(k)] for k in torch.randperm(len(pool), generator=draws)[:items]]
                for name, pool in train.items()}

    def gradient(x):
        return objective_gradient(live, objective, x, minibatch(), checkpoint=checkpoint)

    def validate(x):
        return objective_value(live, objective, x, check)

    return gradient_search(gradient, validate, start, bounds, steps=steps, rate=rate, every=every,
                           patience=patience, trace=trace)
