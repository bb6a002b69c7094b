"""The whole model: plan the configuration with mergekit, measure every cabs tensor, build the report.

Tensors are read through mergekit's own planner and loaders, a tensor at a
time (mergekit's executor drops each input as soon as it has been used).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_cabs.analyze.measure import TensorRecord, measure_tensor, naming_non_finite, task_vectors
from mergekit_cabs.analyze.order import order_entry, position_sq, suggest_order
from mergekit_cabs.analyze.stats import kept_sq_sum
from mergekit_cabs.analyze.summary import build_report
from mergekit_cabs.kernel import cabs_masks
from mergekit_cabs.planning import PlannedTensor, plan, read_tensors


def analyze(config, *, seed: int = 0, options=None, progress: bool = True, source: str | None = None) -> dict:
    """Plan `config` with mergekit, measure every cabs tensor, return the report dict
    (`source`: the configuration file's path, named in the report and the plots)."""
    planned = plan(config, options)
    records: dict[int, TensorRecord] = {}
    skipped = []
    for p, tensors in read_tensors(planned, progress=progress):
        reason = _skip_reason(p, tensors)
        if reason:
            skipped.append({"tensor": p.name, "reason": reason})
            continue
        base = tensors[p.base]
        records[p.order] = measure_tensor(
            p.name, base, [tensors[m] for m in p.models], [str(m) for m in p.models], p.resolved, seed
        )
    ordered = [records[k] for k in sorted(records)]
    return build_report(ordered, skipped, base_model=str(config.base_model), seed=seed, config=source)


def order_of(planned: Sequence[PlannedTensor], progress: bool = True) -> dict:
    """The order advice of `analyze` for a plan (`suggest_order`: {"suggested",
    "reason"}, models named as `str` of their references), computing only
    what it needs: each cabs tensor's masks as planned, first and last
    (`position_masks`), summed in float64 as the report sums them."""
    sums: dict[str, dict] = {}
    for p, tensors in read_tensors(planned, progress=progress):
        if _skip_reason(p, tensors):
            continue
        base, models = tensors[p.base], [tensors[m] for m in p.models]
        quotas, length = p.resolved.kernel_quotas(base.numel())
        with naming_non_finite(p.name, [str(m) for m in p.models]):
            masks = [m.reshape(-1) for m in cabs_masks(base, models, quotas, length, overlap=p.resolved.overlap,
                                                       conflict_aware=p.resolved.conflict_aware)]
        taus = task_vectors(base, models)
        where = position_sq(base, models, p.resolved, masks, taus)
        for i, ref in enumerate(p.models):
            row = sums.setdefault(str(ref), {"kept": 0, "numel": 0, "first_sq": 0.0, "planned_sq": 0.0,
                                             "last_sq": 0.0, "tau_sq": 0.0})
            row["kept"] += int(masks[i].sum())
            row["numel"] += base.numel()
            row["first_sq"] += where["first"][i]
            row["last_sq"] += where["last"][i]
            row["planned_sq"] += kept_sq_sum(masks[i], taus[i])
            row["tau_sq"] += float(taus[i].to(torch.float64).square().sum())
    return suggest_order(list(sums), {m: order_entry(**row) for m, row in sums.items()})


def _skip_reason(p: PlannedTensor, tensors: dict) -> str | None:
    base = tensors.get(p.base)
    if base is None:
        return "the base model has no such tensor"
    if not p.models:
        return "no fine-tuned model takes part (the base passes through)"
    missing = [str(m) for m in p.models if m not in tensors]
    if missing:
        return f"missing in {', '.join(missing)} (optional tensor: the merge passes the base through)"
    if not base.is_floating_point():
        return "not a floating-point tensor (copied, not merged)"
    if base.numel() == 0:
        return "empty tensor"
    return None
