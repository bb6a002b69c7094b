"""Numbers the analysis is built from: pooled moments and ratios (float64).

`Moments` pools counts, means and spreads without keeping the values
(`part_counts`: of the kept counts per row or per block);
`kept_sq_sum` is the sum of squares of a task vector's kept entries; the
ratio helpers give None where a ratio has no denominator (the reports print
it as '-')."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Moments:
    """Count, mean, sum of squared deviations, min and max of some values
    (float64), mergeable (Chan et al.), so pooled spreads need no value lists."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf

    @classmethod
    def of(cls, values: torch.Tensor) -> Moments:
        values = values.to(torch.float64).reshape(-1)
        if values.numel() == 0:
            return cls()
        mean = float(values.mean())
        return cls(values.numel(), mean, float(((values - mean) ** 2).sum()), float(values.min()), float(values.max()))

    def merge(self, other: Moments) -> Moments:
        if not other.n:
            return self
        if not self.n:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * other.n / n
        m2 = self.m2 + other.m2 + delta * delta * self.n * other.n / n
        return Moments(n, mean, m2, min(self.lo, other.lo), max(self.hi, other.hi))

    def merge_within(self, other: Moments) -> Moments:
        """Pooled as `merge`, but the spread only within each part, around its own
        mean (no term for the parts' different means): for values that should be
        alike within a tensor and may differ across tensors, as a density gradient
        makes them. Its `cv` is then the root mean square deviation from each
        part's mean over the mean of all values."""
        if not other.n:
            return self
        if not self.n:
            return other
        n = self.n + other.n
        mean = self.mean + (other.mean - self.mean) * other.n / n
        return Moments(n, mean, self.m2 + other.m2, min(self.lo, other.lo), max(self.hi, other.hi))

    def scaled(self, factor: float) -> Moments:
        """The moments of the values times `factor` (> 0)."""
        return Moments(self.n, self.mean * factor, self.m2 * factor * factor, self.lo * factor, self.hi * factor)

    @property
    def cv(self) -> float | None:
        """Population standard deviation / mean; None without values or mean 0."""
        if not self.n or self.mean == 0:
            return None
        return math.sqrt(max(self.m2, 0.0) / self.n) / self.mean


def part_counts(mask: torch.Tensor, parts: int, length: int) -> Moments | None:
    """Moments of how many places the flat boolean `mask` keeps in each of its
    first `parts` runs of `length` consecutive places; None for no parts."""
    if not parts:
        return None
    return Moments.of(mask[: parts * length].reshape(parts, length).sum(1))


def kept_sq_sum(mask: torch.Tensor, tau: torch.Tensor) -> float:
    """Sum of squares of `tau` where the flat boolean `mask` keeps it, in float64."""
    return float(torch.where(mask, tau, 0).to(torch.float64).square().sum())


def ratio(a: float, b: float) -> float | None:
    """a / b, or None when b is 0."""
    return a / b if b else None


def sqrt_ratio(a: float, b: float) -> float | None:
    """sqrt(a / b) (a norm ratio from sums of squares), or None when b is 0."""
    return math.sqrt(a / b) if b else None


def finite(x: float) -> float | None:
    """`x`, or None when it is infinite (the min / max of no values)."""
    return x if math.isfinite(x) else None


def pair_counts(inter: int, union: int) -> dict:
    """A pair's intersection, union and overlap (intersection / union)."""
    return {"intersection": inter, "union": union, "overlap": ratio(inter, union)}
