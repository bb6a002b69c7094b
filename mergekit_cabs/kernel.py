"""CABS for one tensor: the masks and the merge, in pure torch.

Nothing here knows about mergekit; `method.py` binds it.

The rule, for task vectors tau_i = W_i - W_base taken in priority order:
the tensor is flattened row-major and cut into blocks of `block_size`
consecutive elements (the last block may be shorter).  In every block, model i
keeps its quota of places: free places (not claimed by an earlier model) rank
before claimed ones, larger |tau_i| before smaller, and among equal |tau_i| the
lower flattened index first.  `strict` then drops whatever it took from claimed
places; `fill` keeps them.  A kept place becomes claimed only where tau_i != 0.

Numerics: tau, masks and the sum are computed in float32 (float64 when an
input is float64).  Weights and lambda are rounded to that dtype.  The result is
``W_base + lambda * (((0 + w_1 * m_1 tau_1) + w_2 * m_2 tau_2) + ...)`` with each
product and each sum rounded separately (no fused multiply-add), so every code
path gives the same bits.  Work is done a chunk of whole blocks at a time, so
temporary memory does not grow with the number of models.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

OVERLAP_RULES = ("fill", "strict")

# Elements per chunk of blocks; a chunk always holds at least one whole block.
_CHUNK_ELEMENTS = 1 << 18
_FREE_RANK = 1 << 31  # above every bit pattern of a finite |x| in float32
# 32 bits of (free, |tau|) plus the position must fit in a signed int64.
_MAX_KEYED_LENGTH = 1 << 31


class NonFiniteInputError(ValueError):
    """An input holds NaN or infinity. `model` is the index into `models`, or
    None when the base tensor is at fault."""

    def __init__(self, model: Optional[int]):
        self.model = model
        who = "the base tensor" if model is None else f"model {model}"
        super().__init__(f"{who} holds NaN or infinite values")


def block_quota(n: int, length: int, block_size: int) -> int:
    """Places kept in a block of `length` elements: floor(n * length / block_size + 0.5)."""
    return (2 * n * length + block_size) // (2 * block_size)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def cabs_merge(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    n: Sequence[int],
    block_size: int,
    *,
    overlap: str = "fill",
    conflict_aware: bool = True,
    lam: float = 1.0,
) -> torch.Tensor:
    """W_base + lam * sum_i weights[i] * (mask_i * tau_i), shaped like `base`.

    `n[i]` is model i's quota in a full block (0 <= n[i] <= block_size).
    Returns float32, or float64 when an input is float64.
    """
    _check_arguments(base, models, n, block_size, overlap, weights)
    dtype = compute_dtype(base, *models)
    base_flat = base.reshape(-1)
    acc = torch.zeros(base_flat.numel(), dtype=dtype, device=base.device)

    def add_kept(i: int, where: slice, keep: torch.Tensor, tau: torch.Tensor) -> None:
        kept = torch.where(keep, tau, 0).reshape(-1)
        acc[where] += kept.mul_(weights[i])

    _select_all(base_flat, models, n, block_size, overlap, conflict_aware, dtype, add_kept)
    result = acc.mul_(lam).add_(base_flat.to(dtype))
    return result.reshape(base.shape)


def cabs_masks(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    n: Sequence[int],
    block_size: int,
    *,
    overlap: str = "fill",
    conflict_aware: bool = True,
) -> List[torch.Tensor]:
    """Boolean keep-masks shaped like `base`, one per model, in priority order."""
    _check_arguments(base, models, n, block_size, overlap)
    dtype = compute_dtype(base, *models)
    masks = [torch.zeros(base.numel(), dtype=torch.bool, device=base.device) for _ in models]

    def record(i: int, where: slice, keep: torch.Tensor, tau: torch.Tensor) -> None:
        masks[i][where] = keep.reshape(-1)

    _select_all(base.reshape(-1), models, n, block_size, overlap, conflict_aware, dtype, record)
    return [mask.reshape(base.shape) for mask in masks]


def _check_arguments(base, models, n, block_size, overlap, weights=None) -> None:
    if overlap not in OVERLAP_RULES:
        raise ValueError(f"overlap must be one of {OVERLAP_RULES}; got {overlap!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size}")
    if len(n) != len(models) or (weights is not None and len(weights) != len(models)):
        raise ValueError("need one n (and one weight) per model")
    for i, quota in enumerate(n):
        if not 0 <= quota <= block_size:
            raise ValueError(f"n[{i}] = {quota} is outside [0, block_size={block_size}]")
    for model in models:
        if model.shape != base.shape:
            raise ValueError(f"shape mismatch: base {tuple(base.shape)}, model {tuple(model.shape)}")


def _select_all(
    base_flat: torch.Tensor,
    models: Sequence[torch.Tensor],
    n: Sequence[int],
    block_size: int,
    overlap: str,
    conflict_aware: bool,
    dtype: torch.dtype,
    sink: Callable[[int, slice, torch.Tensor, torch.Tensor], None],
) -> None:
    """Walk the tensor a chunk of blocks at a time; hand each model's keep-mask
    and task vector for that chunk to `sink(i, flat_slice, keep, tau)`."""
    numel = base_flat.numel()
    full_blocks, tail = divmod(numel, block_size)
    flats = [model.reshape(-1) for model in models]
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // block_size)

    segments = []  # (start element, rows, row length, quotas)
    for row in range(0, full_blocks, rows_per_chunk):
        rows = min(rows_per_chunk, full_blocks - row)
        segments.append((row * block_size, rows, block_size, list(n)))
    if tail:
        quotas = [block_quota(q, tail, block_size) for q in n]
        segments.append((full_blocks * block_size, 1, tail, quotas))

    strict = overlap == "strict"
    for start, rows, length, quotas in segments:
        where = slice(start, start + rows * length)
        base_chunk = base_flat[where].to(dtype).view(rows, length)
        claimed = (
            torch.zeros((rows, length), dtype=torch.bool, device=base_flat.device)
            if conflict_aware
            else None
        )
        for i, flat in enumerate(flats):
            tau = flat[where].to(dtype).view(rows, length) - base_chunk
            if not bool(torch.isfinite(tau).all()):
                base_ok = bool(torch.isfinite(base_chunk).all())
                raise NonFiniteInputError(i if base_ok else None)
            keep = _keep(tau, claimed, quotas[i])
            if claimed is not None:
                if strict:
                    keep &= ~claimed
                claimed |= keep & (tau != 0)
            sink(i, where, keep, tau)


def _keep(tau: torch.Tensor, claimed: Optional[torch.Tensor], quota: int) -> torch.Tensor:
    """Per row of `tau`, mark the `quota` top-ranked places (see module doc)."""
    rows, length = tau.shape
    if quota <= 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    if quota >= length:
        return torch.ones_like(tau, dtype=torch.bool)
    if tau.dtype == torch.float32 and length <= _MAX_KEYED_LENGTH:
        # Non-negative float32 values order like their bit patterns, so one
        # int64 key holds (free, |tau|, -position) and every key is distinct:
        # the chosen set does not depend on how topk breaks ties.
        key = tau.abs().view(torch.int32).to(torch.int64)
        if claimed is not None:
            key += (~claimed).to(torch.int64) * _FREE_RANK
        shift = max(1, (length - 1).bit_length())
        position = torch.arange(length - 1, -1, -1, dtype=torch.int64, device=tau.device)
        key = (key << shift) | position
        chosen = key.topk(quota, dim=1, sorted=False).indices
    else:
        # float64, or a block too long for the packed key: order by |tau| with a stable sort (equal values keep index
        # order), then stably move free places to the front.
        order = tau.abs().sort(dim=1, descending=True, stable=True).indices
        if claimed is not None:
            free = (~claimed).gather(1, order).to(torch.uint8)
            order = order.gather(1, free.sort(dim=1, descending=True, stable=True).indices)
        chosen = order[:, :quota]
    return torch.zeros_like(tau, dtype=torch.bool).scatter_(1, chosen, True)
