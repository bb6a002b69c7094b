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

Two code paths compute this: the pure torch one below (any device) and, for
CPU tensors when numba is installed, the compiled one in `_numba.py`.  They
give the same bits; `backend=` (or the environment variable
``MERGEKIT_CABS_BACKEND``: ``auto``, ``torch`` or ``numba``; see `backend.py`)
picks one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mergekit_cabs.backend import BACKENDS, backend_setting
from mergekit_cabs.params import OVERLAP_RULES, block_quota

# Elements per chunk of blocks; a chunk always holds at least one whole block.
_CHUNK_ELEMENTS = 1 << 18
_DEVICE_CHUNK_ELEMENTS = 1 << 24  # GPUs want bigger pieces of work
_FREE_RANK = 1 << 31  # above every bit pattern of a finite |x| in float32
# 32 bits of (free, |tau|) plus the position must fit in a signed int64.
_MAX_KEYED_LENGTH = 1 << 31


class NonFiniteInputError(ValueError):
    """An input holds NaN or infinity. `model` is the index into `models`, or
    None when the base tensor is at fault."""

    def __init__(self, model: int | None):
        self.model = model
        who = "the base tensor" if model is None else f"model {model}"
        super().__init__(f"{who} holds NaN or infinite values")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def pick_backend(backend: str | None, tensors: Sequence[torch.Tensor]) -> str:
    """'numba' or 'torch' for these tensors.  None reads MERGEKIT_CABS_BACKEND
    (default 'auto': numba for CPU tensors when it is installed, unless
    autograd has to follow the inputs)."""
    if backend is None:
        backend = backend_setting()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "torch":
        return "torch"
    from mergekit_cabs import _numba  # imports numba, if installed: only when merging

    on_cpu = all(t.device.type == "cpu" for t in tensors)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if backend == "numba":
        if not _numba.available():
            raise ValueError('backend "numba" needs numba: pip install numba')
        if not on_cpu:
            raise ValueError('backend "numba" runs on CPU tensors only; use "torch" (or "auto")')
        if grad:
            raise ValueError('backend "numba" does not record gradients; use "torch" (or "auto")')
        return "numba"
    return "numba" if on_cpu and not grad and _numba.available() else "torch"


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
    backend: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W_base + lam * sum_i weights[i] * (mask_i * tau_i), shaped like `base`.

    `n[i]` is model i's quota in a full block (0 <= n[i] <= block_size).
    Computed in float32, or float64 when an input is float64, and returned in
    that dtype, or rounded once to `out_dtype` when given (the compiled path
    rounds while it writes, so no full-size float32 copy is made).
    """
    _check_arguments(base, models, n, block_size, overlap, weights)
    dtype = compute_dtype(base, *models)
    base_flat = base.reshape(-1)
    if pick_backend(backend, [base, *models]) == "numba":
        # Roundings the compiled path does while writing, exactly as torch's
        # .to() does them; torch takes float64 to half types through float32.
        direct = out_dtype in (None, dtype, torch.float32, torch.float64) or (
            dtype == torch.float32 and out_dtype in (torch.bfloat16, torch.float16)
        )
        merged = _compiled(
            base, models, n, block_size, overlap, conflict_aware, dtype,
            weights=weights, lam=lam, out_dtype=out_dtype if direct else None,
        )
        return (merged if direct else merged.to(out_dtype)).reshape(base.shape)
    acc = torch.zeros(base_flat.numel(), dtype=dtype, device=base.device)

    def sink(i: int, where: slice, keep: torch.Tensor, tau: torch.Tensor) -> None:
        add_kept(acc[where], keep, tau, weights[i])

    _select_all(base_flat, models, n, block_size, overlap, conflict_aware, dtype, sink)
    return finish(acc, base_flat, lam, out_dtype).reshape(base.shape)


# --- the sum: one arithmetic for the merge and for tune's rebuilds -------------


def add_kept(acc: torch.Tensor, keep: torch.Tensor, tau: torch.Tensor, weight: float) -> None:
    """One step of the sum: acc += weight * (tau where keep, else 0), in acc's dtype."""
    acc += torch.where(keep, tau, 0).reshape(acc.shape).mul_(weight)


def disjoint_sum(tau: torch.Tensor, owner: torch.Tensor, owner_weights: torch.Tensor) -> torch.Tensor:
    """The whole sum ``(0 + w_1 m_1 tau_1) + ...`` where no place is kept by two
    models: `owner` holds 1 + the index of the model that keeps each place (0:
    none; tau is then 0 there), `owner_weights` is [0, w_1, w_2, ...] in tau's
    dtype.  The same bits as the step-by-step sum, since adding +0 changes no
    value but -0 (which the sum's start, +0, turns into +0).  Overwrites `tau`."""
    return tau.mul_(owner_weights[owner.long()]).add_(0.0)


def finish(acc: torch.Tensor, base_flat: torch.Tensor, lam: float,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``base + lam * acc`` in acc's dtype (acc is overwritten; the base is
    converted a chunk at a time, so no full-size copy of it is made), rounded
    once to `out_dtype` when given."""
    step = _CHUNK_ELEMENTS if acc.device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
    for start in range(0, acc.numel(), step):
        where = slice(start, start + step)
        acc[where].mul_(lam).add_(base_flat[where].to(acc.dtype))
    return acc if out_dtype is None else acc.to(out_dtype)


def cabs_masks(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    n: Sequence[int],
    block_size: int,
    *,
    overlap: str = "fill",
    conflict_aware: bool = True,
    backend: str | None = None,
) -> list[torch.Tensor]:
    """Boolean keep-masks shaped like `base`, one per model, in priority order."""
    _check_arguments(base, models, n, block_size, overlap)
    dtype = compute_dtype(base, *models)
    masks = [torch.zeros(base.numel(), dtype=torch.bool, device=base.device) for _ in models]
    if pick_backend(backend, [base, *models]) == "numba":
        _compiled(base, models, n, block_size, overlap, conflict_aware, dtype, masks=masks)
        return [mask.reshape(base.shape) for mask in masks]

    def record(i: int, where: slice, keep: torch.Tensor, tau: torch.Tensor) -> None:
        masks[i][where] = keep.reshape(-1)

    _select_all(base.reshape(-1), models, n, block_size, overlap, conflict_aware, dtype, record)
    return [mask.reshape(base.shape) for mask in masks]


def _compiled(base, models, n, block_size, overlap, conflict_aware, dtype, **outputs):
    """Run `_numba.run` (the merge and/or the masks), raising on non-finite input."""
    from mergekit_cabs import _numba

    base_flat, flats = base.reshape(-1), [model.reshape(-1) for model in models]
    merged = _numba.run(
        base_flat, flats, n, _tail_quotas(n, base.numel(), block_size), block_size,
        overlap == "strict", conflict_aware, dtype, **outputs,
    )
    if merged is None:
        raise NonFiniteInputError(_blame(base_flat, flats, dtype))
    return merged


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


def _tail_quotas(n: Sequence[int], numel: int, block_size: int) -> list[int]:
    """Quotas in the short last block (the full ones when there is none)."""
    tail = numel % block_size
    return [block_quota(q, tail, block_size) for q in n] if tail else list(n)


def _blame(base_flat: torch.Tensor, flats: Sequence[torch.Tensor], dtype: torch.dtype) -> int | None:
    """Which input makes a tau non-finite: None for the base, else the first
    model (in priority order).  Only called once something was found."""
    if not bool(torch.isfinite(base_flat).all()):
        return None
    for i, flat in enumerate(flats):
        for start in range(0, flat.numel(), _CHUNK_ELEMENTS):
            where = slice(start, start + _CHUNK_ELEMENTS)
            if not bool(torch.isfinite(flat[where].to(dtype) - base_flat[where].to(dtype)).all()):
                return i
    raise AssertionError("no input holds a non-finite value")


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
    chunk = _CHUNK_ELEMENTS if base_flat.device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
    rows_per_chunk = max(1, chunk // block_size)

    segments = []  # (start element, rows, row length, quotas)
    for row in range(0, full_blocks, rows_per_chunk):
        rows = min(rows_per_chunk, full_blocks - row)
        segments.append((row * block_size, rows, block_size, list(n)))
    if tail:
        segments.append((full_blocks * block_size, 1, tail, _tail_quotas(n, numel, block_size)))

    strict = overlap == "strict"
    # tau * 0 is 0 where tau is finite and NaN elsewhere, so this sum turns NaN
    # exactly when some tau is not finite; read once at the end (one sync on GPUs).
    probe = torch.zeros((), dtype=dtype, device=base_flat.device)
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
            probe += tau.mul(0).sum()
            keep = _keep(tau, claimed, quotas[i])
            if claimed is not None:
                if strict:
                    keep &= ~claimed
                claimed |= keep & (tau != 0)
            sink(i, where, keep, tau)
    if not bool(torch.isfinite(probe)):
        raise NonFiniteInputError(_blame(base_flat, flats, dtype))


def _keep(tau: torch.Tensor, claimed: torch.Tensor | None, quota: int) -> torch.Tensor:
    """Per row of `tau`, mark the `quota` top-ranked places (see module doc)."""
    length = tau.shape[1]
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
