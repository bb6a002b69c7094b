"""A slow, deliberately plain reference implementation of SPEC.md (CABS).

Written from /work/shared/SPEC.md only, never from the kernel.  Everything here
is scalar Python / numpy-scalar arithmetic over explicit index loops, so that
each rule of the contract can be read off a few lines:

* flatten row-major (last index varies fastest);
* consecutive blocks of ``m`` places; a short last block of ``r`` places has the
  quota ``floor(n * r / m + 0.5)`` (exact integer arithmetic);
* models choose in priority order; a block's free places are the ones not yet
  claimed by an earlier model;
* ranking inside a block: free places before claimed places (``fill`` only; in
  ``strict`` claimed places are never candidates), then larger ``|tau|`` first,
  then the lower flattened index first (the product's documented tie rule);
* a kept place becomes claimed only where the model's ``tau`` is non-zero;
* ``conflict_aware=False``: nothing is ever claimed (every model sees all
  places free);
* ``balanced=False``: a single "block" spanning the whole tensor with quota
  ``floor(density * numel + 0.5)``;
* merged value: ``acc = 0; acc = acc + w_i * (tau_i if kept else 0)`` for i in
  order, then ``base + lam * acc``, every operation rounded in the working
  precision (float32, or float64 if any input is float64).

It also contains an independent implementation of the paper's own two-model
formula (tau_B masked by (1 - mask_A), then n:m pruning).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

OVERLAP_MODES = ("fill", "strict")


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def block_quota(n: int, r: int, m: int) -> int:
    """floor(n * r / m + 0.5) computed exactly: (2*n*r + m) // (2*m)."""
    assert m >= 1 and r >= 0 and n >= 0
    return (2 * n * r + m) // (2 * m)


def working_dtype(tensors: Sequence[torch.Tensor]):
    """float64 if any input is float64, else float32 (SPEC step 1)."""
    if any(t.dtype == torch.float64 for t in tensors):
        return np.float64
    return np.float32


def flatten_row_major(t: torch.Tensor, npdt) -> list:
    """Row-major flatten by explicit multi-index iteration (last index fastest).

    Values are upcast through Python floats, which are exact for every dtype
    up to float64 (numpy has no bfloat16, so we cannot go through numpy).
    """
    wide = t.detach().to(torch.float64)
    out = []
    for idx in itertools.product(*[range(s) for s in t.shape]):
        out.append(npdt(float(wide[idx].item())))
    return out


def unflatten(values: Sequence, shape, torch_dtype) -> torch.Tensor:
    """Inverse of flatten_row_major."""
    if torch_dtype == torch.bool:
        flat = torch.tensor([bool(v) for v in values], dtype=torch.bool)
    else:
        flat = torch.tensor([float(v) for v in values], dtype=torch_dtype)
    return flat.reshape(tuple(shape))


def blocks_of(numel: int, m: int) -> list[range]:
    """Consecutive blocks of m places; the last one may be shorter."""
    return [range(start, min(start + m, numel)) for start in range(0, numel, m)]


def quota_for(n: int, block: range, m: int) -> int:
    r = len(block)
    if r == m:
        return n
    return block_quota(n, r, m)


# ---------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------


def ref_select(
    taus: Sequence[Sequence],
    numel: int,
    n: Sequence[int],
    m: int,
    overlap: str = "fill",
    conflict_aware: bool = True,
) -> list[list[bool]]:
    """Masks (flat lists of bools) for flat task vectors, in priority order."""
    assert overlap in OVERLAP_MODES
    assert len(taus) == len(n)
    claimed = [False] * numel
    masks = []
    for tau, n_i in zip(taus, n):
        keep = [False] * numel
        for block in blocks_of(numel, m):
            q = quota_for(n_i, block, m)

            def rank(p, tau=tau):  # larger |tau| first, then lower index first
                return (-abs(float(tau[p])), p)

            if conflict_aware:
                free = [p for p in block if not claimed[p]]
                taken = [p for p in block if claimed[p]]
            else:
                free = list(block)
                taken = []
            chosen = sorted(free, key=rank)[:q]
            if len(chosen) < q and overlap == "fill":
                chosen += sorted(taken, key=rank)[: q - len(chosen)]
            for p in chosen:
                keep[p] = True
        if conflict_aware:
            for p in range(numel):
                if keep[p] and tau[p] != 0:
                    claimed[p] = True
        masks.append(keep)
    return masks


def ref_taus(base: torch.Tensor, models: Sequence[torch.Tensor]):
    npdt = working_dtype([base, *models])
    b = flatten_row_major(base, npdt)
    taus = []
    for model in models:
        w = flatten_row_major(model, npdt)
        taus.append([w[p] - b[p] for p in range(len(b))])
    return npdt, b, taus


def ref_masks(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    n: Sequence[int],
    m: int,
    *,
    overlap: str = "fill",
    conflict_aware: bool = True,
) -> list[torch.Tensor]:
    """Bool masks shaped like base, one per model in priority order."""
    _, b, taus = ref_taus(base, models)
    flat = ref_select(taus, len(b), n, m, overlap, conflict_aware)
    return [unflatten(mk, base.shape, torch.bool) for mk in flat]


# ---------------------------------------------------------------------------
# merged tensor
# ---------------------------------------------------------------------------


def ref_combine(npdt, b, taus, masks, weights, lam):
    """acc = 0; acc = acc + w_i * where(mask_i, tau_i, 0); base + lam * acc."""
    zero = npdt(0)
    out = []
    for p in range(len(b)):
        acc = zero
        for tau, mask, w in zip(taus, masks, weights):
            term = npdt(w) * (tau[p] if mask[p] else zero)
            acc = acc + term
        out.append(b[p] + npdt(lam) * acc)
    return out


def ref_merge(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    n: Sequence[int],
    m: int,
    *,
    overlap: str = "fill",
    conflict_aware: bool = True,
    lam: float = 1.0,
) -> torch.Tensor:
    """Merged tensor in the working precision (float32 or float64)."""
    npdt, b, taus = ref_taus(base, models)
    masks = ref_select(taus, len(b), n, m, overlap, conflict_aware)
    out = ref_combine(npdt, b, taus, masks, weights, lam)
    tdt = torch.float64 if npdt is np.float64 else torch.float32
    return unflatten(out, base.shape, tdt)


def n_from_density(density: float, m: int) -> int:
    return math.floor(density * m + 0.5)


def ref_merge_unbalanced(
    base, models, weights, densities, *, overlap="fill", conflict_aware=True, lam=1.0
) -> torch.Tensor:
    """balanced=False: quota floor(density_i * numel + 0.5) over the whole tensor."""
    numel = base.numel()
    n = [math.floor(d * numel + 0.5) for d in densities]
    return ref_merge(
        base,
        models,
        weights,
        n,
        numel,
        overlap=overlap,
        conflict_aware=conflict_aware,
        lam=lam,
    )


# ---------------------------------------------------------------------------
# the paper's own two-model formula, written independently (numpy, per row)
# ---------------------------------------------------------------------------


def _nm_prune_mask(x: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the n largest |x| in each row of m (numel must be a multiple of m).

    Ties: stable sort, lower index first.
    """
    rows = x.reshape(-1, m)
    mask = np.zeros(rows.shape, dtype=bool)
    for i, row in enumerate(rows):
        order = np.argsort(-np.abs(row), kind="stable")
        mask[i, order[:n]] = True
    return mask.reshape(x.shape)


def paper_two_model(base, model_a, model_b, n: int, m: int, w_a=1.0, w_b=1.0):
    """CABS as in the paper: prune tau_A n:m; tau_B' = tau_B * (1 - mask_A);
    prune tau_B' n:m; merged = base + w_A * pruned(tau_A) + w_B * pruned(tau_B').

    Returns (merged float32 tensor, mask_a, mask_b) with numpy bool masks.
    """
    assert base.numel() % m == 0
    def f(t):
        return t.detach().to(torch.float32).contiguous().numpy().reshape(-1)

    b, a, bb = f(base), f(model_a), f(model_b)
    tau_a = a - b
    tau_b = bb - b
    mask_a = _nm_prune_mask(tau_a, n, m)
    tau_b_rest = tau_b * (1 - mask_a).astype(np.float32)
    mask_b = _nm_prune_mask(tau_b_rest, n, m)
    acc = np.zeros_like(b)
    acc = acc + np.float32(w_a) * np.where(mask_a, tau_a, np.float32(0))
    acc = acc + np.float32(w_b) * np.where(mask_b, tau_b_rest, np.float32(0))
    merged = b + np.float32(1.0) * acc
    shape = tuple(base.shape)
    return (
        torch.from_numpy(merged.reshape(shape).copy()),
        mask_a.reshape(shape),
        mask_b.reshape(shape),
    )


# ---------------------------------------------------------------------------
# the same rules, one numpy block at a time (for tensors too big for the
# scalar version above; checked against it in the tests)
# ---------------------------------------------------------------------------


def ref_masks_blockwise(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    n: Sequence[int],
    m: int,
    *,
    overlap: str = "fill",
    conflict_aware: bool = True,
) -> list[np.ndarray]:
    """Flat numpy bool masks; same contract as ref_masks."""
    tdt = torch.float64 if working_dtype([base, *models]) is np.float64 else torch.float32
    b = base.detach().to(tdt).reshape(-1).numpy()
    taus = [mm.detach().to(tdt).reshape(-1).numpy() - b for mm in models]
    numel = b.size
    claimed = np.zeros(numel, dtype=bool)
    masks = []
    for tau, n_i in zip(taus, n):
        keep = np.zeros(numel, dtype=bool)
        for start in range(0, numel, m):
            stop = min(start + m, numel)
            q = n_i if stop - start == m else block_quota(n_i, stop - start, m)
            idx = np.arange(start, stop)
            mag = np.abs(tau[start:stop])
            taken = claimed[start:stop] if conflict_aware else np.zeros(stop - start, bool)
            # np.lexsort: last key is primary -> (claimed, -|tau|, index)
            order = np.lexsort((idx, -mag, taken))
            if overlap == "strict":
                order = order[~taken[order]]
            keep[idx[order[:q]]] = True
        if conflict_aware:
            claimed |= keep & (tau != 0)
        masks.append(keep)
    return masks
