"""The whole model: plan the configuration with mergekit, measure every cabs tensor, build the report.

Tensors are read through mergekit's own planner and loaders, a tensor at a
time (mergekit's executor drops each input as soon as it has been used).
"""

from __future__ import annotations

from mergekit_cabs.analyze.measure import TensorRecord, measure_tensor
from mergekit_cabs.analyze.summary import build_report
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
