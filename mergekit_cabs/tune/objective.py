"""What `tune` maximises: the objective over the data sets' measures (their
per-item means), as normalized gains or losses, per split."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mergekit_cabs.tune.options import GENERAL, NO_TASKS_FOR_GAIN, TuneError
from mergekit_cabs.tune.rows import SPLITS


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
