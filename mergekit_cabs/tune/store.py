"""The weight store: what rebuilds every merged tensor for any weights and
lambda, bound to the live model that is scored.

The masks do not depend on the weights, so they are computed once, through
mergekit's own plan and execution graph.  Per merged tensor a `Slot` keeps:

* where the kept places of the models are disjoint (K * n <= m with
  ``conflict_aware: true``), one tensor holding, at every kept place, the
  owning model's weight (``tau = kept - base`` there) and a one-byte owner
  index: each weight moves its own places only;
* elsewhere (``overlap: fill`` with K * n > m, or ``conflict_aware: false``)
  every model's tensor and keep-mask, and the weights interact.

The sum itself is the kernel's (`kernel.disjoint_sum` / `kernel.add_kept`,
then `kernel.finish`), so a rebuilt tensor has the merge's bits.

The store lives on the host by default, whatever device the live model is
on: setting a weight vector streams each slot to the live tensor's device a
chunk at a time and computes there (`store_device` = the model's device keeps
it there).  With disjoint supports and lambda unchanged, `incremental`
rewrites only the places of the models whose weight changed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mergekit_cabs.kernel import add_kept, cabs_masks, compute_dtype, disjoint_sum, finish
from mergekit_cabs.tune.options import TuneError

APPLY_CHUNK = 1 << 22  # elements per step when a weight vector is written


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bit pattern (so -0 differs from +0, and NaN equals itself)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def release_memory(collect: bool = True) -> None:
    """Hand the C heap's freed pages back to the system (glibc's malloc_trim;
    a no-op elsewhere), after collecting garbage when `collect`.  malloc keeps
    freed tensors of a few MB for reuse; after the masks that was about 1.3
    to 1.6 bytes per merged parameter (measured on the 220M and 1B shapes)."""
    import gc

    if collect:
        gc.collect()
    trim = malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def malloc_trim():
    """glibc's malloc_trim, or None (not Linux, or another C library)."""
    import ctypes
    import sys

    return getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform.startswith("linux") else None


def held_bytes(tensors) -> int:
    """Bytes of memory the tensors keep alive: each distinct storage once, whole
    (a view of a bigger tensor counts that tensor)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t is not None:
            storage = t.untyped_storage()
            seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def owned(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device` in memory of its own (never a view of a bigger tensor or
    of a model file)."""
    moved = t.to(device)
    return moved.clone() if moved.data_ptr() == t.data_ptr() else moved


@dataclass
class Slot:
    """What is needed to rebuild one merged tensor for any weights.  The slot's
    tensors live where the store lives (the host by default); `write` streams
    them, a chunk at a time, to the live tensor's device and computes there."""

    name: str
    models: tuple[int, ...]  # index of each input into the tuner's model list
    base: torch.Tensor  # flat, in the merge dtype
    owner: torch.Tensor | None = None  # uint8: 0 = no model, j + 1 = input j
    kept: torch.Tensor | None = None  # the owner's weight where it keeps, the base elsewhere
    inputs: list[torch.Tensor] = field(default_factory=list)  # overlapping: every model's tensor
    masks: list[torch.Tensor | None] = field(default_factory=list)  # ... and its keep-mask (None: every place)
    shared: int = 0  # places with a non-zero kept delta from two or more models
    target: torch.Tensor | None = None  # the live model's tensor
    save_dtype: torch.dtype | None = None
    group: int = 0  # which of the store's weight vectors (layer groups) this tensor takes

    @classmethod
    def make(cls, name, models, base, inputs, masks) -> Slot:
        """The owner-index form when no place holds a kept change of two models
        (and there are at most 255 inputs), else every input and mask."""
        dtype = compute_dtype(base, *inputs)
        base, inputs = base.reshape(-1), [t.reshape(-1) for t in inputs]
        masks = [m.reshape(-1) for m in masks]
        delta = [mask & (t.to(dtype) != base.to(dtype)) for t, mask in zip(inputs, masks)]
        count = torch.zeros(base.numel(), dtype=torch.int16, device=base.device)
        for d in delta:
            count += d
        shared = int((count > 1).sum())
        del count
        if shared or len(inputs) > 255:
            masks = [None if bool(mask.all()) else mask for mask in masks]  # every place kept: nothing to hold
            return cls(name, models, base, inputs=inputs, masks=masks, shared=shared)
        owner = torch.zeros(base.numel(), dtype=torch.uint8, device=base.device)
        kept = base.clone()
        for j, (t, d) in enumerate(zip(inputs, delta)):
            owner[d] = j + 1
            kept[d] = t[d]
        return cls(name, models, base, owner=owner, kept=kept)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.base, self.owner, self.kept, *self.inputs, *self.masks) if t is not None]

    def nbytes(self) -> int:
        """Bytes the slot holds (its tensors' storages; not the live tensor)."""
        return held_bytes(self.tensors())

    def to(self, device: torch.device | str) -> Slot:
        """The slot with its tensors moved to `device`, each in memory of its own."""
        self.base = owned(self.base, device)
        self.owner, self.kept = (None if t is None else owned(t, device) for t in (self.owner, self.kept))
        self.inputs = [owned(t, device) for t in self.inputs]
        self.masks = [None if t is None else owned(t, device) for t in self.masks]
        return self

    def rebuilds(self, weights: Sequence[float], lam: float, result: torch.Tensor) -> bool:
        """Whether `merged(weights, lam)` has `result`'s bits (compared a chunk at a time)."""
        flat = result.reshape(-1)
        if flat.numel() != self.base.numel():
            return False
        for start in range(0, flat.numel(), APPLY_CHUNK):
            where = slice(start, start + APPLY_CHUNK)
            if not same_bits(self.merged(weights, lam, where), flat[where]):
                return False
        return True

    def merged(self, weights: Sequence[float], lam: float, where: slice = slice(None),
               device: torch.device | str | None = None, select: torch.Tensor | None = None) -> torch.Tensor:
        """The merged tensor's elements `where` (then, when given, only the places
        `select` of those: indices into the chunk), for `weights` (indexed like
        the tuner's model list) and `lam`, in the merge dtype, computed on
        `device` (default: the store's): the kernel's sum, in float32 (float64
        for float64 inputs), rounded once to the merge dtype."""
        dtype = compute_dtype(self.base)
        device = self.base.device if device is None else device

        def part(t: torch.Tensor) -> torch.Tensor:  # the chunk, streamed to `device`
            t = t[where].to(device, non_blocking=True)
            return t if select is None else t[select]

        base = part(self.base).to(dtype)  # converted once, for tau and for the final add
        if self.owner is not None:
            table = torch.tensor([0.0] + [weights[i] for i in self.models], dtype=dtype, device=device)
            tau = part(self.kept).to(dtype) - base  # 0 where no model keeps a change
            acc = disjoint_sum(tau, part(self.owner), table)
        else:
            acc = torch.zeros_like(base)
            for j, (t, mask) in enumerate(zip(self.inputs, self.masks)):
                tau = part(t).to(dtype) - base
                if mask is None:  # every place kept: add_kept's sum without the mask (the same bits)
                    acc += tau.mul_(weights[self.models[j]])
                else:
                    add_kept(acc, part(mask), tau, weights[self.models[j]])
        return finish(acc, base, lam, self.base.dtype)

    def write(self, weights: Sequence[float], lam: float, changed: Sequence[int] | None = None) -> None:
        """Write the merged tensor into the live model, a chunk at a time.  With
        `changed` (model indices; the owner-index form only, and only when lambda
        and every other weight are those last written), rewrite only the places
        those models own: the other places already hold their values."""
        flat = self.target.view(-1)
        codes = None
        if changed is not None:
            codes = torch.tensor([j + 1 for j, i in enumerate(self.models) if i in changed], dtype=torch.uint8)
            if not len(codes):
                return
            codes = codes.to(self.owner.device)
        for start in range(0, flat.numel(), APPLY_CHUNK):
            where = slice(start, start + APPLY_CHUNK)
            select = None
            if codes is not None:
                select = torch.isin(self.owner[where], codes).nonzero().squeeze(1).to(flat.device)
                if not len(select):
                    continue
            value = self.merged(weights, lam, where, flat.device, select)
            value = value if self.save_dtype is None else value.to(self.save_dtype)
            if select is None:
                flat[where].copy_(value)
            else:
                flat[where].index_copy_(0, select, value.to(flat.dtype))


class WeightStore:
    """Pruned task vectors of every merged tensor, bound to a live model.

    `apply` rewrites every place.  With `incremental`, when supports are
    disjoint and lambda is unchanged, it rewrites only the places of the
    models whose weight changed (the same bits); that is off by default
    because on CPU it measured slower than a full rewrite (`benchmarks/
    tune_scale.py --settings`, 2 cores: 2.0 s against 0.93 s on the 220M
    shape, 9.1 s against 2.8 s on the 1B one; finding and gathering a
    model's places costs more than the arithmetic it saves)."""

    def __init__(self, slots: list[Slot], fixed: int, incremental: bool = False):
        self.slots = slots
        self.fixed = fixed  # tensors the weights do not change (written once)
        self.incremental = incremental
        self.last: tuple[tuple[tuple[float, ...], ...], float] | None = None  # the point the live model holds

    @property
    def disjoint(self) -> bool:
        return all(s.owner is not None for s in self.slots)

    def nbytes(self) -> int:
        """Bytes the store holds: every slot's tensors, each storage once."""
        return held_bytes(t for s in self.slots for t in s.tensors())

    def shared_places(self) -> int:
        return sum(s.shared for s in self.slots)

    def places(self) -> int:
        return sum(s.base.numel() for s in self.slots)

    def non_finite(self) -> tuple[str, int | None] | None:
        """(tensor, index of the model that keeps its first bad place, when one
        does) of the first live merged tensor holding NaN or infinity; None if none."""
        for slot in self.slots:
            bad = ~torch.isfinite(slot.target.view(-1))
            if bool(bad.any()):
                place = int(bad.nonzero()[0])
                owner = int(slot.owner[place]) if slot.owner is not None else 0
                return slot.name, (slot.models[owner - 1] if owner else None)
        return None

    def changed(self, rows: tuple[tuple[float, ...], ...], lam: float) -> list[list[int] | None]:
        """Per group, the models whose weight differs from the last point
        written, or None when every place must be rewritten (lambda changed,
        supports shared, nothing written yet, or `incremental` off)."""
        if not (self.incremental and self.disjoint and self.last is not None and self.last[1] == lam
                and len(self.last[0]) == len(rows)):
            return [None] * len(rows)
        return [[i for i, (w, old) in enumerate(zip(row, last)) if w != old] for row, last in zip(rows, self.last[0])]

    def apply(self, weights: Sequence[Sequence[float]], lam: float) -> None:
        """Set the live model to the merge at `weights` and `lam`.  `weights`
        holds one vector of per-model weights per layer group (one vector
        without groups); a slot takes the vector of its `group`."""
        rows = tuple(tuple(float(w) for w in row) for row in weights)
        changed = self.changed(rows, lam)
        self.last = None  # until every slot is written
        with torch.no_grad():
            for slot in self.slots:
                slot.write(rows[slot.group], lam, changed[slot.group])
        self.last = (rows, float(lam))


# --- building the store from mergekit's merge ---------------------------------------


class SlotCollector:
    """Handed every cabs merge mergekit runs (`method.capture_merges`): makes
    the tensor's slot, checks it rebuilds the merge's result bit for bit, and
    moves it to `store_device`."""

    def __init__(self, finetunes, store_device: torch.device | str = "cpu"):
        self.size = len(finetunes)
        self.index = {ref: i for i, ref in enumerate(finetunes)}
        self.store_device = store_device
        self.pending: dict[str, Slot] = {}

    def __call__(self, group, parameters, result) -> None:
        from mergekit_cabs.method import resolve_group

        base, entries = group.base.tensor, group.non_base
        if not entries or base.numel() == 0:
            return
        r = resolve_group(group, parameters)
        quotas, m = r.kernel_quotas(base.numel())
        masks = cabs_masks(base, [e.tensor for e in entries], quotas, m,
                           overlap=r.overlap, conflict_aware=r.conflict_aware)
        slot = Slot.make(group.metadata.name, tuple(self.index[e.id] for e in entries), base,
                         [e.tensor for e in entries], masks)
        weights = [0.0] * self.size
        for i, w in zip(slot.models, r.weights):
            weights[i] = w
        if result.dtype != base.dtype or not slot.rebuilds(weights, r.lam, result):
            raise RuntimeError(f"tune: rebuilding tensor '{slot.name}' did not give the merge's bits (a bug)")
        self.pending[slot.name] = slot.to(self.store_device)


def build_store(planned, finetunes, model, *, device: str, store_device: str = "cpu",
                progress: bool = True) -> WeightStore:
    """Run mergekit's merge tasks for every planned tensor (at the configured
    weights) on `device`, keep on `store_device` what rebuilds each cabs result
    for other weights, and write every result into `model`.  Each slot is
    checked to rebuild the configured merge bit for bit.  One tensor's merge
    is held at a time (mergekit drops its inputs once used, and its model
    files are closed after each tensor)."""
    import tqdm

    from mergekit_cabs.method import capture_merges

    collect = SlotCollector(finetunes, store_device)
    by_task = {p.task: p for p in planned}
    slots, fixed = [], 0
    with capture_merges(collect), tqdm.tqdm(total=len(by_task), desc="Masks", unit="tensor",
                                            disable=not progress) as bar:
        for p, target, save in write_merges(by_task, model, device):
            slot = collect.pending.pop(p.name, None)
            if slot is None:
                fixed += 1
            else:
                slot.target, slot.save_dtype = target, save
                slots.append(slot)
            bar.update(1)
    check_covered(planned, model.state_dict())
    return WeightStore(slots, fixed)


def write_merges(by_task: dict, model, device: str):
    """Run mergekit's merge tasks (`by_task`: task -> its planned tensor, with
    `name` and `save_dtype`) on `device`, one tensor at a time, and write each
    result into `model` (`write_result`); yields (planned tensor, the model's
    tensor, save dtype) after each, then frees that tensor's inputs and
    temporaries."""
    from mergekit_cabs import _mergekit

    state = model.state_dict()
    for task, result in _mergekit.execute(list(by_task), device):
        p = by_task[task]
        target, save = write_result(p, result, state)
        del result
        yield p, target, save
        release_memory(collect=False)


def write_result(p, result: torch.Tensor | None, state: dict) -> tuple[torch.Tensor, torch.dtype | None]:
    """Copy mergekit's result for planned tensor `p` into the model's tensor
    (cast as mergekit-yaml saves it); that tensor and the save dtype."""
    from mergekit_cabs import _mergekit

    if result is None:
        raise TuneError(f"mergekit writes no tensor '{p.name}' for this configuration; tune cannot score it")
    target = state.get(p.name)
    if target is None or target.shape != result.shape:
        shape = None if target is None else tuple(target.shape)
        raise TuneError(
            f"the merged tensor '{p.name}' {tuple(result.shape)} does not fit the base model's "
            f"{'(missing)' if shape is None else shape}; tune needs the merge to keep the base's architecture"
        )
    save = _mergekit.dtype_from_name(p.save_dtype) if p.save_dtype else None
    with torch.no_grad():
        target.copy_(result if save is None else result.to(save))
    return target, save


def check_covered(planned, state: dict) -> None:
    """Every tensor of the model (tied ones count once) is one the plan merges."""
    covered = {p.name for p in planned}
    covered_ptrs = {state[n].data_ptr() for n in covered if n in state}
    missing = [n for n, t in state.items() if n not in covered and t.data_ptr() not in covered_ptrs]
    if missing:
        raise TuneError(
            f"mergekit's plan writes no tensor for {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; tune needs every weight of the base model merged"
        )
