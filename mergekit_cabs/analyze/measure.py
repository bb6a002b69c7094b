"""One tensor measured: the keep-masks of the three rules and every count the report is built from.

`rule_masks` builds the cabs, ties-style and dare-style masks of a tensor at
the same budget (see the package doc for the rules); `measure_tensor` counts
what they keep, where they collide and how they spread, into a
`TensorRecord` (raw counts and float64 sums, so tensors add up exactly).
"""

from __future__ import annotations

import contextlib
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mergekit_cabs.analyze.order import position_sq
from mergekit_cabs.analyze.stats import Moments, kept_sq_sum, pair_counts, part_counts, ratio, sqrt_ratio
from mergekit_cabs.kernel import NonFiniteInputError, block_quota, cabs_masks, compute_dtype
from mergekit_cabs.params import CabsError

RULES = ("cabs", "ties", "dare")
OTHER = "other"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class AnalyzeError(CabsError):
    """A model cannot be analysed; the message says why."""


def dare_seed(seed: int, tensor: str, index: int) -> int:
    """The DARE-style generator's seed for model `index` of `tensor` (32 bits:
    torch's CPU generator uses only the low 32 bits of a seed)."""
    return zlib.crc32(f"{seed}:{tensor}#{index}".encode())


def rule_masks(
    base: torch.Tensor, models: Sequence[torch.Tensor], resolved, tensor: str, seed: int
) -> dict[str, list[torch.Tensor]]:
    """Flat boolean keep-masks per rule (see the package doc), models in order."""
    numel = base.numel()
    quotas, length = resolved.kernel_quotas(numel)
    cabs = cabs_masks(base, models, quotas, length, overlap=resolved.overlap, conflict_aware=resolved.conflict_aware)
    cabs = [m.reshape(-1) for m in cabs]
    counts = [int(m.sum()) for m in cabs]
    ties = [m.reshape(-1) for m in cabs_masks(base, models, counts, numel, conflict_aware=False)]
    dare = []
    for i, k in enumerate(counts):
        generator = torch.Generator().manual_seed(dare_seed(seed, tensor, i))
        dare.append(torch.rand(numel, generator=generator) < k / numel)
    return {"cabs": cabs, "ties": ties, "dare": dare}


def unavoidable_overlap(resolved, numel: int) -> dict | None:
    """Where the quotas of a tensor add up to more than its room (conflict-aware only).

    `excess` is per block (or per tensor with balanced: false); `places` sums it
    over the tensor's blocks: how many kept places cannot be free ones.
    """
    if not resolved.conflict_aware or numel == 0:
        return None
    quotas, length = resolved.kernel_quotas(numel)
    if not resolved.balanced:
        if sum(quotas) > numel:
            return {"where": "tensor", "quotas": quotas, "room": numel,
                    "excess": sum(quotas) - numel, "places": sum(quotas) - numel}
        return None
    full, tail = divmod(numel, length)
    found = None
    if full and sum(quotas) > length:
        excess = sum(quotas) - length
        found = {"where": "blocks", "quotas": quotas, "room": length, "excess": excess, "places": excess * full}
    if tail:
        tail_quotas = [block_quota(q, tail, length) for q in quotas]
        tail_excess = sum(tail_quotas) - tail
        if tail_excess > 0:
            if found is None:
                return {"where": "last block", "quotas": tail_quotas, "room": tail,
                        "excess": tail_excess, "places": tail_excess}
            found["places"] += tail_excess
    return found


def layer_of(tensor: str) -> str:
    """'3' for 'model.layers.3.mlp.up_proj.weight'; 'other' otherwise."""
    match = _LAYER.search(tensor)
    return match.group(1) if match else OTHER


@dataclass
class TensorRecord:
    """Everything measured on one tensor; raw counts and float64 sums."""

    name: str
    shape: list[int]
    layer: str
    models: list[str]
    quotas: list[int]
    block_length: int
    unavoidable: dict | None
    tau_sq: list[float]
    kept: dict[str, list[int]] = field(default_factory=dict)
    kept_changed: dict[str, list[int]] = field(default_factory=dict)
    kept_sq: dict[str, list[float]] = field(default_factory=dict)
    rows: dict[str, list[Moments | None]] = field(default_factory=dict)  # of kept counts per row
    row_length: int | None = None
    blocks: dict[str, list[Moments | None]] = field(default_factory=dict)  # of kept counts per full block of m
    block_size: int | None = None  # m, the configured block_size (also with balanced: false)
    pairs: dict[str, list[tuple[int, int, int, int]]] = field(default_factory=dict)  # (i, j, inter, union)
    shared: dict[str, int] = field(default_factory=dict)
    position_sq: dict[str, list[float]] = field(default_factory=dict)  # "first"/"last": kept squares (cabs)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict:
        rules = {}
        for rule in RULES:
            per_model = {}
            for i, label in enumerate(self.models):
                rows, blocks = self.rows[rule][i], self.blocks[rule][i]
                per_model[label] = {
                    "kept": self.kept[rule][i],
                    "kept_changed": self.kept_changed[rule][i],
                    "density": ratio(self.kept[rule][i], self.numel),
                    "kept_sq_sum": self.kept_sq[rule][i],
                    "norm_ratio": sqrt_ratio(self.kept_sq[rule][i], self.tau_sq[i]),
                    "rows": None if rows is None else {
                        "rows": rows.n, "cv": rows.cv, "min": int(rows.lo), "max": int(rows.hi),
                    },
                    "blocks": None if blocks is None else {
                        "blocks": blocks.n, "cv": blocks.cv, "min": int(blocks.lo), "max": int(blocks.hi),
                    },
                }
            rules[rule] = {
                "models": per_model,
                "pairs": [
                    {"models": [self.models[i], self.models[j]], **pair_counts(inter, union)}
                    for i, j, inter, union in self.pairs[rule]
                ],
                "shared": {"places": self.shared[rule], "share": ratio(self.shared[rule], self.numel)},
            }
        return {
            "name": self.name, "shape": self.shape, "numel": self.numel, "layer": self.layer,
            "models": self.models, "quotas": self.quotas, "block_length": self.block_length,
            "row_length": self.row_length, "block_size": self.block_size,
            "tau_sq_sum": dict(zip(self.models, self.tau_sq)),
            "unavoidable_overlap": self.unavoidable, "rules": rules,
            "order": {label: self._order_json(i) for i, label in enumerate(self.models)},
        }

    def _order_json(self, i: int) -> dict:
        first, last = self.position_sq["first"][i], self.position_sq["last"][i]
        return {"first_kept_sq_sum": first, "first_norm_ratio": sqrt_ratio(first, self.tau_sq[i]),
                "last_kept_sq_sum": last, "last_norm_ratio": sqrt_ratio(last, self.tau_sq[i])}


@contextlib.contextmanager
def naming_non_finite(tensor: str, labels: Sequence[str]):
    """Within the block, the kernel's NonFiniteInputError becomes an
    AnalyzeError naming the model (or the base) and the tensor."""
    try:
        yield
    except NonFiniteInputError as error:
        who = "the base model" if error.model is None else f"model '{labels[error.model]}'"
        raise AnalyzeError(f"{who} has NaN or infinite values in tensor '{tensor}'") from None


def task_vectors(base: torch.Tensor, models: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each model's flat task vector, in the kernel's compute dtype (float32; float64 with a float64 input)."""
    dtype = compute_dtype(base, *models)
    base_flat = base.reshape(-1).to(dtype)
    return [m.reshape(-1).to(dtype) - base_flat for m in models]


def measure_tensor(
    name: str, base: torch.Tensor, models: Sequence[torch.Tensor], labels: Sequence[str], resolved, seed: int = 0
) -> TensorRecord:
    """All numbers of one tensor under the three rules (see the package doc)."""
    with naming_non_finite(name, labels):
        masks = rule_masks(base, models, resolved, name, seed)
    taus = task_vectors(base, models)
    changed = [tau != 0 for tau in taus]
    quotas, length = resolved.kernel_quotas(base.numel())
    record = TensorRecord(
        name=name, shape=list(base.shape), layer=layer_of(name), models=list(labels),
        quotas=list(quotas), block_length=length,
        unavoidable=unavoidable_overlap(resolved, base.numel()),
        tau_sq=[float(tau.to(torch.float64).square().sum()) for tau in taus],
    )
    if base.dim() >= 2 and base.numel():
        record.row_length = base.numel() // base.shape[0]
    record.block_size = resolved.block_size
    rows, full_blocks = (base.shape[0] if record.row_length else 0), base.numel() // resolved.block_size
    for rule, rule_mask in masks.items():
        kept_places = [m & c for m, c in zip(rule_mask, changed)]
        record.kept[rule] = [int(m.sum()) for m in rule_mask]
        record.kept_changed[rule] = [int(k.sum()) for k in kept_places]
        record.kept_sq[rule] = [kept_sq_sum(m, tau) for m, tau in zip(rule_mask, taus)]
        record.rows[rule] = [part_counts(m, rows, record.row_length) for m in rule_mask]
        record.blocks[rule] = [part_counts(m, full_blocks, resolved.block_size) for m in rule_mask]
        record.pairs[rule] = [
            (i, j, int((kept_places[i] & kept_places[j]).sum()), int((kept_places[i] | kept_places[j]).sum()))
            for i in range(len(models)) for j in range(i + 1, len(models))
        ]
        holders = torch.stack(kept_places).sum(0, dtype=torch.int32)
        record.shared[rule] = int((holders >= 2).sum())
    record.position_sq = position_sq(base, models, resolved, masks["cabs"], taus)
    return record
