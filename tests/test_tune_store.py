"""`mergekit-cabs tune`'s weight store: rebuilding a tensor from it (owner
index, or per-model tensors when supports overlap) equals a full `cabs_merge`
bit for bit, on both kernel paths, whether every place is rewritten or only
those of the models whose weight changed, streamed from a store in memory of
its own into a separate live tensor; the store holds the bytes per weight the
README states."""

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


POINTS = [  # (weights, lambda): one weight changes, then lambda, then two weights, then back to the first point
    ((1.0, 0.8, 0.6), 1.0), ((1.0, 0.3, 0.6), 1.0), ((1.0, 0.3, 0.6), 1.7), ((0.0, -0.7, 1 / 3), 1.7),
    ((2.0, -0.7, 0.25), 1.7), ((2.0, 0.0, 0.25), 1 / 3), ((1.0, 0.8, 0.6), 1.0),
]


def _bound_store(base, models, masks, live_dtype, incremental=False):
    """A one-slot store in memory of its own (as build_store leaves it) bound to a separate live tensor."""
    slot = tn.Slot.make("t", tuple(range(len(models))), base, models, masks).to("cpu")
    slot.target = torch.full(base.shape, float("nan"), dtype=live_dtype)
    return tn.WeightStore([slot], 0, incremental=incremental), slot


@pytest.mark.parametrize("incremental", [False, True])
@pytest.mark.parametrize("live_dtype", ["merge", torch.float32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"K{c[0]}n{c[1]}m{c[2]}-{c[3]}-ca{int(c[4])}")
def test_rebuild_equals_cabs_merge(kernel_backend, dtype, case, live_dtype, incremental, monkeypatch):
    k, n, m, overlap, aware, disjoint = case
    monkeypatch.setattr(tn.store, "APPLY_CHUNK", 512)  # several chunks, and a short last one
    base, models = _inputs(dtype, k, (37, 50), seed=k * 100 + n)  # 1850 elements: a short last block
    masks = cabs_masks(base, models, [n] * k, m, overlap=overlap, conflict_aware=aware)
    live_dtype = dtype if live_dtype == "merge" else live_dtype
    store, slot = _bound_store(base, models, masks, live_dtype, incremental)
    assert (slot.owner is not None) == disjoint
    assert (slot.shared == 0) == disjoint
    for t in slot.tensors():  # the store shares no memory with the inputs or the live tensor
        assert t.untyped_storage().data_ptr() not in {x.untyped_storage().data_ptr() for x in [base, *models]}
        assert t.untyped_storage().data_ptr() != slot.target.untyped_storage().data_ptr()
    for weights, lam in POINTS:
        weights = weights[:k]
        expected = cabs_merge(base, models, list(weights), [n] * k, m, overlap=overlap, conflict_aware=aware,
                              lam=lam, out_dtype=dtype)
        assert slot.merged(weights, lam).dtype == dtype
        assert torch.equal(_bits(slot.merged(weights, lam).view(base.shape)), _bits(expected)), (weights, lam)
        store.apply([weights], lam)  # with `incremental`, only the changed models' places where it can
        assert torch.equal(_bits(slot.target), _bits(expected.to(live_dtype))), (weights, lam)


def test_incremental_apply_rewrites_only_the_changed_models_places():
    base, models = _inputs(torch.bfloat16, 3, (64, 64), seed=5)
    masks = cabs_masks(base, models, [16] * 3, 64)
    store, slot = _bound_store(base, models, masks, torch.bfloat16, incremental=True)
    assert store.changed(((1.0, 1.0, 1.0),), 1.0) == [None]  # nothing written yet: every place
    store.apply([(1.0, 1.0, 1.0)], 1.0)
    assert store.changed(((1.0, 0.5, 1.0),), 1.0) == [[1]]
    assert store.changed(((1.0, 0.5, 1.0),), 0.5) == [None]  # lambda moves every place
    marker = torch.tensor(7.0, dtype=torch.bfloat16)
    slot.target[slot.owner.view(64, 64) != 2] = marker  # any write there would show
    store.apply([(1.0, 0.5, 1.0)], 1.0)
    assert bool((slot.target[slot.owner.view(64, 64) != 2] == marker).all())
    expected = cabs_merge(base, models, [1.0, 0.5, 1.0], [16] * 3, 64, out_dtype=torch.bfloat16)
    own = slot.owner.view(64, 64) == 2
    assert torch.equal(_bits(slot.target[own]), _bits(expected[own]))
    store.incremental = False
    assert store.changed(((1.0, 0.7, 1.0),), 1.0) == [None]


@pytest.mark.parametrize("dtype,size", [(torch.bfloat16, 2), (torch.float32, 4)])
def test_store_holds_the_bytes_per_weight_the_readme_states(dtype, size):
    """Disjoint: base + kept + a one-byte owner; shared: base + K tensors + K one-byte masks.
    Counted as the storages the store keeps alive, so a view of a bigger tensor would count it whole."""
    whole, models = _inputs(dtype, 3, (96, 64), seed=11)
    base = whole[:64]  # a view of a bigger tensor, as a sliced merge may hand it over
    models = [t[:64] for t in models]
    for n, per_weight in [(16, 2 * size + 1), (40, 4 * size + 3)]:
        masks = cabs_masks(base, models, [n] * 3, 64)
        store, _ = _bound_store(base, models, masks, dtype)
        assert store.nbytes() == base.numel() * per_weight, n
        assert tn.held_bytes([base]) == whole.numel() * size  # the check counts what a view keeps alive


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

