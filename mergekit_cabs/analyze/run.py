"""The whole model: plan the configuration with mergekit, measure every cabs tensor, build the report.

Tensors are read through mergekit's own planner and loaders, a tensor at a
time (mergekit's executor drops each input as soon as it has been used).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_cabs.analyze.measure import AnalyzeError, TensorRecord, measure_tensor
from mergekit_cabs.analyze.order import order_entry, position_masks, suggest_order
from mergekit_cabs.analyze.stats import kept_sq_sum
from mergekit_cabs.analyze.summary import build_report
from mergekit_cabs.kernel import NonFiniteInputError, cabs_masks, compute_dtype
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
        try:
            masks = cabs_masks(base, models, quotas, length, overlap=p.resolved.overlap,
                               conflict_aware=p.resolved.conflict_aware)
        except NonFiniteInputError as error:
            who = "the base model" if error.model is None else f"model '{p.models[error.model]}'"
            raise AnalyzeError(f"{who} has NaN or infinite values in tensor '{p.name}'") from None
        masks = [m.reshape(-1) for m in masks]
        first, last = position_masks(base, models, p.resolved, masks)
        dtype = compute_dtype(base, *models)
        flat = base.reshape(-1).to(dtype)
        for i, ref in enumerate(p.models):
            tau = models[i].reshape(-1).to(dtype) - flat
            row = sums.setdefault(str(ref), {"kept": 0, "numel": 0, "first_sq": 0.0, "planned_sq": 0.0,
                                             "last_sq": 0.0, "tau_sq": 0.0})
            row["kept"] += int(masks[i].sum())
            row["numel"] += base.numel()
            for key, mask in (("first_sq", first[i]), ("planned_sq", masks[i]), ("last_sq", last[i])):
                row[key] += kept_sq_sum(mask, tau)
            row["tau_sq"] += float(tau.to(torch.float64).square().sum())
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
