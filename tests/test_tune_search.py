"""`mergekit-cabs tune`'s search finds known optima of synthetic objectives
inside its bounds and budget."""

from __future__ import annotations

import math

import pytest

from mergekit_cabs import tune as tn


@pytest.mark.parametrize("target", [(0.37, 1.61, 0.9), (1.0, 0.05, 1.95), (0.0, 2.0, 1.3)])
def test_search_finds_the_optimum_of_a_separable_objective(target):
    calls = []

    def objective(x):
        calls.append(x)
        return -sum((a - b) ** 2 for a, b in zip(x, target))

    result = tn.coordinate_search(objective, (1.0, 1.0, 1.0), [(0.0, 2.0)] * 3, budget=200, tolerance=0.01)
    assert result.stopped == "converged"
    assert all(abs(a - b) <= 0.01 for a, b in zip(result.best, target)), result.best
    assert len(calls) == len(set(calls)) == len(result.history)  # no point twice
    assert result.score == max(s for _, s in result.history)


def test_search_with_coupled_coordinates_and_an_optimum_outside_the_box():
    # optimum of the unconstrained problem at (3, -1): the box's best point is (2, 0)
    def objective(x):
        a, b = x[0] - 3, x[1] + 1
        return -(a * a + b * b + 0.5 * a * b)

    result = tn.coordinate_search(objective, (1.0, 1.0), [(0.0, 2.0), (0.0, 2.0)], budget=200, tolerance=0.01)
    assert result.best == (2.0, 0.0)
    # a coupled interior optimum: -(x-1)^2 - (y-0.5)^2 - (x-1)(y-0.5)
    result = tn.coordinate_search(
        lambda x: -((x[0] - 1) ** 2 + (x[1] - 0.5) ** 2 + (x[0] - 1) * (x[1] - 0.5)),
        (0.0, 2.0), [(-2.0, 2.0), (-2.0, 2.0)], budget=300, tolerance=0.005,
    )
    assert abs(result.best[0] - 1) < 0.03 and abs(result.best[1] - 0.5) < 0.03, result.best


def test_search_keeps_to_its_budget_and_bounds():
    seen = []

    def objective(x):
        seen.append(x)
        return math.sin(5 * x[0]) + math.cos(3 * x[1])

    result = tn.coordinate_search(objective, (5.0, -5.0), [(0.0, 1.0), (-1.0, 1.0)], budget=7, tolerance=1e-6)
    assert result.stopped == "budget" and len(seen) == 7
    assert seen[0] == (1.0, -1.0)  # the start, clipped into the box
    assert all(0 <= a <= 1 and -1 <= b <= 1 for a, b in seen)
    again = tn.coordinate_search(objective, (5.0, -5.0), [(0.0, 1.0), (-1.0, 1.0)], budget=7, tolerance=1e-6)
    assert again.history == result.history  # deterministic



# --- CMA-ES -----------------------------------------------------------------------------


def _coupled(optimum):
    """A coupled quadratic (positive definite Hessian) with its maximum 0 at `optimum`."""
    h = [[2.0, 1.0, 0.0], [1.0, 1.0, 0.3], [0.0, 0.3, 0.5]]  # positive definite

    def objective(x):
        d = [a - b for a, b in zip(x, optimum)]
        return -sum(d[i] * h[i][j] * d[j] for i in range(3) for j in range(3))

    return objective


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_cmaes_finds_the_optimum_of_a_coupled_objective_within_its_budget(seed):
    optimum = (0.6, 1.45, 0.3)
    seen = []

    def objective(x):
        seen.append(x)
        return _coupled(optimum)(x)

    result = tn.cmaes_search(objective, (1.0, 1.0, 1.0), [(0.25, 2.0), (0.0, 2.0), (0.0, 2.0)], budget=300,
                             tolerance=1e-3, seed=seed)
    assert result.optimizer == "cmaes" and len(seen) == len(set(seen)) == len(result.history) <= 300
    assert seen[0] == (1.0, 1.0, 1.0)  # the start is scored first
    assert all(abs(a - b) <= 0.02 for a, b in zip(result.best, optimum)), result.best
    assert result.score == max(s for _, s in result.history) > -1e-3


def test_cmaes_finds_an_optimum_on_the_boundary():
    result = tn.cmaes_search(lambda x: -((x[0] - 3) ** 2) - (x[1] + 1) ** 2, (1.0, 1.0), [(0.0, 2.0), (0.0, 2.0)],
                             budget=200, tolerance=1e-4, seed=0)
    assert abs(result.best[0] - 2) < 1e-3 and abs(result.best[1]) < 1e-3, result.best


def test_cmaes_keeps_to_its_budget_and_bounds_and_is_deterministic_per_seed():
    import numpy as np

    def objective(x):
        np.random.rand()  # numpy's global generator is not cma's
        return math.sin(5 * x[0]) + math.cos(3 * x[1]) + x[2]

    bounds = [(0.0, 1.0), (-1.0, 1.0), (0.5, 0.75)]
    runs = [tn.cmaes_search(objective, (5.0, -5.0, 0.6), bounds, budget=23, tolerance=1e-9, seed=s)
            for s in (3, 3, 4)]
    assert runs[0].stopped == "budget" and len(runs[0].history) == 23
    assert runs[0].history[0][0] == (1.0, -1.0, 0.6)  # the start, clipped into the box
    assert all(lo <= v <= hi for x, _ in runs[0].history for v, (lo, hi) in zip(x, bounds))
    assert runs[0].history == runs[1].history  # the same seed, the same points
    assert runs[0].history != runs[2].history


def test_auto_picks_cmaes_only_for_coupled_weights_with_fifty_evaluations_per_searched_value():
    assert tn.choose_optimizer("auto", 4, 60, coupled=True) == "coordinate"
    assert tn.choose_optimizer("auto", 4, 199, coupled=True) == "coordinate"
    assert tn.choose_optimizer("auto", 4, 200, coupled=True) == "cmaes"
    assert tn.choose_optimizer("auto", 4, 10_000) == "coordinate"  # disjoint supports: never
    assert tn.choose_optimizer("coordinate", 2, 10_000) == "coordinate"
    assert tn.choose_optimizer("cmaes", 33, 60) == "cmaes"
    with pytest.raises(tn.TuneError, match="--optimizer"):
        tn.choose_optimizer("nelder-mead", 4, 60)


@pytest.mark.parametrize("optimizer, expected", [("coordinate", "coordinate"), ("cmaes", "cmaes"),
                                                 ("auto", "coordinate")])
def test_optimise_runs_either_search_through_one_signature(optimizer, expected):
    target = (0.5, 1.5)
    result = tn.optimise(optimizer, lambda x: -sum((a - b) ** 2 for a, b in zip(x, target)), (1.0, 1.0),
                         [(0.0, 2.0)] * 2, budget=80, tolerance=0.01, seed=0)
    assert result.optimizer == expected and len(result.history) <= 80
    assert all(abs(a - b) <= 0.05 for a, b in zip(result.best, target)), result.best


def test_a_budget_below_one_step_each_way_per_number_is_warned_about():
    assert tn.budget_note(4, 9) is None  # start + 2 x 4 steps
    note = tn.budget_note(13, 26)
    assert note == ("tune: --budget 26 is less than one step each way along each of the 13 searched numbers "
                    "(27 evaluations), so some are never moved from the start; give --budget 135 or more")
    shared = tn.budget_note(4, 3, "--total-budget", 2)  # --total-budget 6 shared by two settings
    assert shared == ("tune: each of the 2 settings' share of --total-budget, 3, is less than one step each way "
                      "along each of the 4 searched numbers (9 evaluations), so some are never moved from the start; "
                      "give --total-budget 90 or more")


@pytest.mark.parametrize("option, value, message", [
    ("general_weight", float("nan"), r"^--general-weight is nan; give a finite number >= 0"),
    ("general_weight", -1.0, r"^--general-weight is -1.0; give a finite number >= 0"),
    ("tolerance", 0.0, r"^--tolerance is 0.0; give a number > 0$"),
    ("tolerance", -1.0, r"^--tolerance is -1.0; give a number > 0$"),
    ("batch_size", 0, r"^--batch-size is 0; give a whole number >= 1$"),
])
def test_each_bad_search_option_is_named_with_its_value(option, value, message):
    settings = {"weight_bounds": "0,2", "lambda_bounds": "0.05,2", "general_weight": 1.0, "tolerance": 0.01,
                "batch_size": 4, "cuda": False, option: value}
    with pytest.raises(tn.TuneError, match=message):
        tn.search_settings(**settings)
