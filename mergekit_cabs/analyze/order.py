"""The order of `models:`: what each model keeps choosing first and last, and the advice built on it.

In a conflict-aware cabs merge the first model picks its places in every
block first; later ones pick among what is left.  A model's *loss* is the
share of its task vector's norm it keeps choosing first minus the share it
keeps choosing last (after the others, in their planned order), both
``sqrt(sum of kept tau^2 / sum of tau^2)`` over the tensors, in float64.
`suggest_order` turns the losses into an order; `tune --orders suggested`
uses the same rule.  To get its `per_model` from tensors: `position_masks`
per tensor, sum `stats.kept_sq_sum` of each model's first and last masks
and of its whole task vector over the tensors, then `order_entry`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_cabs.analyze.stats import kept_sq_sum, ratio, sqrt_ratio
from mergekit_cabs.kernel import cabs_masks

ORDER_TOLERANCE = 0.01


def position_masks(
    base: torch.Tensor, models: Sequence[torch.Tensor], resolved, planned: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Flat cabs keep-masks of every model if it chose first and if it chose
    last (the others before it in their planned order); `planned` are the
    configured order's flat masks (reused for the model planned last).

    Choosing first means choosing among all places, which is what
    conflict_aware: false gives every model; with conflict_aware: false the
    order changes nothing, so first = last = planned."""
    if not resolved.conflict_aware or len(models) < 2:
        return list(planned), list(planned)
    quotas, length = resolved.kernel_quotas(base.numel())
    first = cabs_masks(base, models, quotas, length, overlap=resolved.overlap, conflict_aware=False)
    last = []
    for i in range(len(models) - 1):
        order = [j for j in range(len(models)) if j != i] + [i]
        masks = cabs_masks(base, [models[j] for j in order], [quotas[j] for j in order], length,
                           overlap=resolved.overlap, conflict_aware=True)
        last.append(masks[-1].reshape(-1))
    return [m.reshape(-1) for m in first], last + [planned[-1]]


def position_sq(base: torch.Tensor, models: Sequence[torch.Tensor], resolved, planned: Sequence[torch.Tensor],
                taus: Sequence[torch.Tensor]) -> dict[str, list[float]]:
    """Each model's kept sum of squares of its task vector (`taus`, flat) if
    it chose first and if it chose last (`position_masks`), in float64:
    {"first": [...], "last": [...]}."""
    first, last = position_masks(base, models, resolved, planned)
    return {where: [kept_sq_sum(m, tau) for m, tau in zip(masks, taus)] for where, masks in
            (("first", first), ("last", last))}


def order_entry(*, kept: int, numel: int, first_sq: float, planned_sq: float, last_sq: float,
                tau_sq: float) -> dict:
    """One model's row of the order advice from its sums over the tensors:
    places cabs keeps and weights, and the sums of squares of its task vector
    kept choosing first, as planned, last, and in all.  Returns
    {"density", "first", "planned", "last", "loss"} (norm shares; None
    without a changed weight)."""
    first, last = sqrt_ratio(first_sq, tau_sq), sqrt_ratio(last_sq, tau_sq)
    return {
        "density": ratio(kept, numel), "first": first, "planned": sqrt_ratio(planned_sq, tau_sq), "last": last,
        "loss": None if first is None or last is None else first - last,
    }


def suggest_order(models: Sequence[str], per_model: dict) -> dict:
    """The suggested priority order from each model's kept-norm ratio first and last.

    `per_model[m]["loss"]` (every m in `models`; see `order_entry`) is what
    m keeps going first minus what it keeps going last (shares of its task
    vector's norm), or None when m has no changed weight. The suggestion
    puts the models in descending loss, ties in the planned order: who loses
    most by choosing later chooses first. With two models this is the order
    with the larger sum of kept-norm ratios (first_A + last_B against
    first_B + last_A). When the losses all lie within ORDER_TOLERANCE (1
    point) of each other, or a model has no changed weight, the order makes
    little difference and the planned one is kept. Returns {"suggested",
    "reason"}: reason is "single" (one model), "flat" (little difference),
    "planned" (already in that order) or "reorder"."""
    if len(models) < 2:
        return {"suggested": list(models), "reason": "single"}
    losses = [per_model[m]["loss"] for m in models]
    if None in losses or max(losses) - min(losses) < ORDER_TOLERANCE:
        return {"suggested": list(models), "reason": "flat"}
    suggested = [m for _, _, m in sorted((-loss, i, m) for i, (m, loss) in enumerate(zip(models, losses)))]
    return {"suggested": suggested, "reason": "planned" if suggested == list(models) else "reorder"}
