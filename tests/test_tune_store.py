"""`mergekit-cabs tune`'s weight store: rebuilding a tensor from it (owner
index, or per-model tensors when supports overlap) equals a full `cabs_merge`
bit for bit, on both kernel paths."""

from __future__ import annotations

import pytest
import torch

from mergekit_cabs import tune as tn
from mergekit_cabs.kernel import cabs_masks, cabs_merge


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _inputs(dtype, k, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
    base.view(-1)[:7] = -0.0  # negative zeros in the base
    models = []
    for _ in range(k):
        delta = (torch.randn(shape, generator=gen) * 0.01).to(dtype)
        delta[torch.rand(shape, generator=gen) < 0.2] = 0  # unchanged weights
        models.append((base.float() + delta.float()).to(dtype))
    return base, models


CASES = [  # (K, n, block, overlap, conflict_aware, disjoint?)
    (3, 16, 64, "fill", True, True),
    (2, 32, 64, "strict", True, True),
    (3, 40, 64, "fill", True, False),  # K * n > m: overlap unavoidable
    (3, 16, 64, "fill", False, False),  # every model chooses from all places
    (1, 64, 64, "fill", True, True),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"K{c[0]}n{c[1]}m{c[2]}-{c[3]}-ca{int(c[4])}")
def test_rebuild_equals_cabs_merge(kernel_backend, dtype, case):
    k, n, m, overlap, aware, disjoint = case
    base, models = _inputs(dtype, k, (37, 50), seed=k * 100 + n)  # 1850 elements: a short last block
    masks = cabs_masks(base, models, [n] * k, m, overlap=overlap, conflict_aware=aware)
    slot = tn.Slot.make("t", tuple(range(k)), base, models, masks)
    assert (slot.owner is not None) == disjoint
    assert (slot.shared == 0) == disjoint
    for weights, lam in [((1.0, 0.8, 0.6)[:k], 1.0), ((0.0, -0.7, 1 / 3)[:k], 1.7), ((2.0, 0.0, 0.25)[:k], 1 / 3)]:
        expected = cabs_merge(base, models, list(weights), [n] * k, m, overlap=overlap, conflict_aware=aware,
                              lam=lam, out_dtype=dtype)
        got = slot.merged(weights, lam).view(base.shape)
        assert got.dtype == dtype
        assert torch.equal(_bits(got), _bits(expected)), (weights, lam)


def test_owner_store_is_compact_and_each_weight_moves_its_own_places():
    base, models = _inputs(torch.bfloat16, 3, (64, 64), seed=7)
    masks = cabs_masks(base, models, [16] * 3, 64)
    slot = tn.Slot.make("t", (0, 1, 2), base, models, masks)
    # base + kept in bf16 and a one-byte owner: 5 bytes per weight, not 3 x 2 more.
    assert slot.nbytes() == base.numel() * (2 + 2 + 1)
    before = slot.merged((1.0, 1.0, 1.0), 1.0)
    after = slot.merged((1.0, 0.3, 1.0), 1.0)
    changed = before != after
    assert changed.any()
    assert bool((slot.owner[changed] == 2).all())  # only model 2's places (index 1)


def test_slot_maps_a_subset_of_models():
    """A tensor some fine-tunes lack: its inputs index into the full weight vector."""
    base, models = _inputs(torch.float32, 2, (8, 64), seed=3)
    masks = cabs_masks(base, models, [16, 16], 64)
    slot = tn.Slot.make("t", (0, 2), base, models, masks)
    expected = cabs_merge(base, models, [0.5, 1.5], [16, 16], 64, out_dtype=torch.float32)
    assert torch.equal(slot.merged((0.5, 99.0, 1.5), 1.0).view(base.shape), expected)

