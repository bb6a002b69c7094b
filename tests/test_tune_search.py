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

