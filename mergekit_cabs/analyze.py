"""`mergekit-cabs analyze`: overlap and balance of the kept weights, before merging.

For every tensor mergekit would merge with a cabs configuration, this module
builds the keep-masks of three pruning rules at the same budget and measures
how the kept places of the models collide and how they spread:

* ``cabs``: the masks the merge itself would use (`kernel.cabs_masks` with the
  parameters mergekit resolves for that tensor: filters, gradients, slices);
* ``ties``: magnitude top-k per model over the whole tensor (TIES-style), with
  k = the number of places CABS keeps for that model in that tensor; ties in
  |tau| go to the lower flattened index; models are pruned independently;
* ``dare``: random keep per model (DARE-style): every place is kept
  independently with probability p = k / numel (same k as above), drawn from a
  ``torch.Generator`` seeded with ``zlib.crc32(b"<seed>:<tensor>#<i>")``, i =
  the model's position among the tensor's fine-tunes (0 first). So the
  kept count is k only on average; it is reported as achieved. No rescaling.

Definitions (per tensor; "overall" sums the counts over tensors first):

* a model's *kept places* in overlap numbers are the places where its mask
  keeps a changed weight (tau != 0): keeping an unchanged weight changes
  nothing and is no conflict (it does not claim the place for later models).
  Densities count every kept place;
* pair overlap = |A_i & A_j| / |A_i | A_j|; overall = sum of intersections /
  sum of unions over the tensors both models take part in;
* shared = places kept by two or more models / numel;
* norm ratio = ||mask_i * tau_i|| / ||tau_i||; overall = sqrt(sum of kept
  squares / sum of squares) over tensors;
* row balance: kept count per row (dim 0, tensors with >= 2 dims) as a share
  of the row length; per tensor and pooled over all rows of all such tensors:
  coefficient of variation (population std / mean), min and max;
* layer balance: kept / numel per layer (layer index from ``.layers.<i>.`` in
  the output tensor name; other tensors form the group ``other``, which is
  reported but left out of the spread across layers);
* order: each model's cabs norm ratio if it chose first (its own top-n per
  block among all places) and if it chose last (after the other models in
  their planned order); see `suggest_order` for the rule built on them.

Precision: task vectors are taken in float32 (float64 when an input is
float64) from the tensors as mergekit loads them for the merge (after its
``dtype:`` cast); sums of squares and all aggregates are float64.

Tensors are read through mergekit's own planner and loaders, a tensor at a
time (mergekit's executor drops each input as soon as it has been used).
"""

from __future__ import annotations

import contextlib
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_cabs._output import PLOTS_HINT, fmt, pct, publish, pyplot, short_names
from mergekit_cabs.kernel import NonFiniteInputError, block_quota, cabs_masks, compute_dtype
from mergekit_cabs.params import CabsError
from mergekit_cabs.planning import PlannedTensor, plan, read_tensors

RULES = ("cabs", "ties", "dare")
REPORT_FILES = ("report.json", "report.md", "overlap-by-layer.png", "kept-by-layer.png")
OTHER = "other"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class AnalyzeError(CabsError):
    """A model cannot be analysed; the message says why."""


# --- one tensor ---------------------------------------------------------------


@dataclass
class Moments:
    """Count, mean, sum of squared deviations, min and max of some values
    (float64), mergeable (Chan et al.), so pooled spreads need no value lists."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf

    @classmethod
    def of(cls, values: torch.Tensor) -> Moments:
        values = values.to(torch.float64).reshape(-1)
        if values.numel() == 0:
            return cls()
        mean = float(values.mean())
        return cls(values.numel(), mean, float(((values - mean) ** 2).sum()), float(values.min()), float(values.max()))

    def merge(self, other: Moments) -> Moments:
        if not other.n:
            return self
        if not self.n:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * other.n / n
        m2 = self.m2 + other.m2 + delta * delta * self.n * other.n / n
        return Moments(n, mean, m2, min(self.lo, other.lo), max(self.hi, other.hi))

    def scaled(self, factor: float) -> Moments:
        """The moments of the values times `factor` (> 0)."""
        return Moments(self.n, self.mean * factor, self.m2 * factor * factor, self.lo * factor, self.hi * factor)

    @property
    def cv(self) -> float | None:
        """Population standard deviation / mean; None without values or mean 0."""
        if not self.n or self.mean == 0:
            return None
        return math.sqrt(max(self.m2, 0.0) / self.n) / self.mean


def dare_seed(seed: int, tensor: str, index: int) -> int:
    """The DARE-style generator's seed for model `index` of `tensor` (32 bits:
    torch's CPU generator uses only the low 32 bits of a seed)."""
    return zlib.crc32(f"{seed}:{tensor}#{index}".encode())


def rule_masks(
    base: torch.Tensor, models: Sequence[torch.Tensor], resolved, tensor: str, seed: int
) -> dict[str, list[torch.Tensor]]:
    """Flat boolean keep-masks per rule (see the module doc), models in order."""
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


def position_masks(
    base: torch.Tensor, models: Sequence[torch.Tensor], resolved, planned: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Flat cabs keep-masks of every model if it chose first and if it chose
    last (the others before it in their planned order); `planned` are the
    configured order's flat masks (reused for the model planned last).

    Choosing first means choosing among all places, which is what
    conflict_aware: false gives every model; with conflict_aware: false the
    order changes nothing, so first = last = planned."""
    if not resolved.conflict_aware or len(models) < 2:
        return list(planned), list(planned)
    quotas, length = resolved.kernel_quotas(base.numel())
    first = cabs_masks(base, models, quotas, length, overlap=resolved.overlap, conflict_aware=False)
    last = []
    for i in range(len(models) - 1):
        order = [j for j in range(len(models)) if j != i] + [i]
        masks = cabs_masks(base, [models[j] for j in order], [quotas[j] for j in order], length,
                           overlap=resolved.overlap, conflict_aware=True)
        last.append(masks[-1].reshape(-1))
    return [m.reshape(-1) for m in first], last + [planned[-1]]


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
                rows = self.rows[rule][i]
                per_model[label] = {
                    "kept": self.kept[rule][i],
                    "kept_changed": self.kept_changed[rule][i],
                    "density": _ratio(self.kept[rule][i], self.numel),
                    "kept_sq_sum": self.kept_sq[rule][i],
                    "norm_ratio": _sqrt_ratio(self.kept_sq[rule][i], self.tau_sq[i]),
                    "rows": None if rows is None else {
                        "rows": rows.n, "cv": rows.cv, "min": int(rows.lo), "max": int(rows.hi),
                    },
                }
            rules[rule] = {
                "models": per_model,
                "pairs": [
                    {"models": [self.models[i], self.models[j]], **_pair_counts(inter, union)}
                    for i, j, inter, union in self.pairs[rule]
                ],
                "shared": {"places": self.shared[rule], "share": _ratio(self.shared[rule], self.numel)},
            }
        return {
            "name": self.name, "shape": self.shape, "numel": self.numel, "layer": self.layer,
            "models": self.models, "quotas": self.quotas, "block_length": self.block_length,
            "row_length": self.row_length,
            "tau_sq_sum": dict(zip(self.models, self.tau_sq)),
            "unavoidable_overlap": self.unavoidable, "rules": rules,
            "order": {label: self._order_json(i) for i, label in enumerate(self.models)},
        }

    def _order_json(self, i: int) -> dict:
        first, last = self.position_sq["first"][i], self.position_sq["last"][i]
        return {"first_kept_sq_sum": first, "first_norm_ratio": _sqrt_ratio(first, self.tau_sq[i]),
                "last_kept_sq_sum": last, "last_norm_ratio": _sqrt_ratio(last, self.tau_sq[i])}


def measure_tensor(
    name: str, base: torch.Tensor, models: Sequence[torch.Tensor], labels: Sequence[str], resolved, seed: int = 0
) -> TensorRecord:
    """All numbers of one tensor under the three rules (see the module doc)."""
    try:
        masks = rule_masks(base, models, resolved, name, seed)
    except NonFiniteInputError as error:
        who = "the base model" if error.model is None else f"model '{labels[error.model]}'"
        raise AnalyzeError(f"{who} has NaN or infinite values in tensor '{name}'") from None
    dtype = compute_dtype(base, *models)
    base_flat = base.reshape(-1).to(dtype)
    taus = [m.reshape(-1).to(dtype) - base_flat for m in models]
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
    for rule, rule_mask in masks.items():
        kept_places = [m & c for m, c in zip(rule_mask, changed)]
        record.kept[rule] = [int(m.sum()) for m in rule_mask]
        record.kept_changed[rule] = [int(k.sum()) for k in kept_places]
        record.kept_sq[rule] = [
            float(torch.where(m, tau, 0).to(torch.float64).square().sum()) for m, tau in zip(rule_mask, taus)
        ]
        if record.row_length:
            record.rows[rule] = [Moments.of(m.reshape(base.shape[0], -1).sum(1)) for m in rule_mask]
        else:
            record.rows[rule] = [None] * len(models)
        record.pairs[rule] = [
            (i, j, int((kept_places[i] & kept_places[j]).sum()), int((kept_places[i] | kept_places[j]).sum()))
            for i in range(len(models)) for j in range(i + 1, len(models))
        ]
        holders = torch.stack(kept_places).sum(0, dtype=torch.int32)
        record.shared[rule] = int((holders >= 2).sum())
    first, last = position_masks(base, models, resolved, masks["cabs"])
    for where, where_masks in (("first", first), ("last", last)):
        record.position_sq[where] = [
            float(torch.where(m, tau, 0).to(torch.float64).square().sum()) for m, tau in zip(where_masks, taus)
        ]
    return record


# --- the whole model ------------------------------------------------------------


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


@dataclass
class _Totals:
    """Counts summed over tensor records: per model, per pair, per layer."""

    models: list[str]
    layers: list[str]
    per_model: dict = field(default_factory=dict)  # model -> rule -> _ModelTotals
    pairs: dict = field(default_factory=dict)  # (model, model) -> rule -> [inter, union]
    shared: dict = field(default_factory=lambda: {rule: 0 for rule in RULES})
    by_layer: dict = field(default_factory=dict)
    position_sq: dict = field(default_factory=dict)  # model -> "first"/"last" -> kept squares (cabs)

    def __post_init__(self):
        self.per_model = {m: {rule: _ModelTotals() for rule in RULES} for m in self.models}
        self.position_sq = {m: {"first": 0.0, "last": 0.0} for m in self.models}
        self.by_layer = {
            layer: {"numel": 0, "shared": {rule: 0 for rule in RULES},
                    "pairs": {rule: [0, 0] for rule in RULES},
                    "rows": {rule: Moments() for rule in RULES},
                    "models": {m: {rule: [0, 0] for rule in RULES} for m in self.models}}
            for layer in self.layers
        }

    def add(self, r: TensorRecord) -> None:
        lt = self.by_layer[r.layer]
        lt["numel"] += r.numel
        for i, m in enumerate(r.models):
            for where in ("first", "last"):
                self.position_sq[m][where] += r.position_sq[where][i]
        for rule in RULES:
            self.shared[rule] += r.shared[rule]
            lt["shared"][rule] += r.shared[rule]
            for i, m in enumerate(r.models):
                self._add_model(r, rule, i, m, lt)
            for i, j, inter, union in r.pairs[rule]:
                pair = self.pairs.setdefault((r.models[i], r.models[j]), {x: [0, 0] for x in RULES})
                pair[rule][0] += inter
                pair[rule][1] += union
                lt["pairs"][rule][0] += inter
                lt["pairs"][rule][1] += union

    def _add_model(self, r: TensorRecord, rule: str, i: int, m: str, lt: dict) -> None:
        t = self.per_model[m][rule]
        t.numel += r.numel
        t.kept += r.kept[rule][i]
        t.kept_changed += r.kept_changed[rule][i]
        t.kept_sq += r.kept_sq[rule][i]
        t.tau_sq += r.tau_sq[i]
        if r.rows[rule][i] is not None:  # pooled as row densities
            rows = r.rows[rule][i].scaled(1 / r.row_length)
            t.rows = t.rows.merge(rows)
            lt["rows"][rule] = lt["rows"][rule].merge(rows)
        lt["models"][m][rule][0] += r.kept[rule][i]
        lt["models"][m][rule][1] += r.numel

    def model_summary(self, m: str, rule: str) -> dict:
        t = self.per_model[m][rule]
        numbered = [layer for layer in self.layers if layer != OTHER]
        spread = Moments.of(torch.tensor(
            [k / n for k, n in (self.by_layer[layer]["models"][m][rule] for layer in numbered) if n],
            dtype=torch.float64,
        ))
        return {
            "numel": t.numel, "kept": t.kept, "kept_changed": t.kept_changed,
            "density": _ratio(t.kept, t.numel),
            "norm_ratio": _sqrt_ratio(t.kept_sq, t.tau_sq),
            "row_cv": t.rows.cv, "row_density_min": _finite(t.rows.lo), "row_density_max": _finite(t.rows.hi),
            "rows": t.rows.n,
            "layer_cv": spread.cv, "layer_density_min": _finite(spread.lo), "layer_density_max": _finite(spread.hi),
        }

    def order_summary(self) -> dict:
        """Kept-norm ratios (cabs) first, as planned and last per model, and the suggested order."""
        per_model = {}
        for m in self.models:
            t = self.per_model[m]["cabs"]
            first = _sqrt_ratio(self.position_sq[m]["first"], t.tau_sq)
            last = _sqrt_ratio(self.position_sq[m]["last"], t.tau_sq)
            per_model[m] = {
                "density": _ratio(t.kept, t.numel), "first": first,
                "planned": _sqrt_ratio(t.kept_sq, t.tau_sq), "last": last,
                "loss": None if first is None or last is None else first - last,
            }
        return {"planned": list(self.models), **suggest_order(self.models, per_model), "models": per_model}

    def layer_summary(self, layer: str) -> dict:
        lt = self.by_layer[layer]
        return {
            "numel": lt["numel"],
            "shared": {rule: _ratio(lt["shared"][rule], lt["numel"]) for rule in RULES},
            "pair_overlap": {rule: _ratio(*lt["pairs"][rule]) for rule in RULES},
            "row_cv": {rule: lt["rows"][rule].cv for rule in RULES},
            "density": {m: {rule: _ratio(*lt["models"][m][rule]) for rule in RULES} for m in self.models},
        }


def build_report(
    records: Sequence[TensorRecord], skipped: Sequence[dict], *, base_model: str, seed: int, config: str | None = None
) -> dict:
    """Aggregate tensor records (in plan order) into the report dict written as JSON."""
    models: list[str] = []
    for r in records:
        models += [m for m in r.models if m not in models]
    totals = _Totals(models, sorted({r.layer for r in records}, key=_layer_sort_key))
    for r in records:
        totals.add(r)
    total = sum(r.numel for r in records)
    unavoidable = [dict(tensor=r.name, **r.unavoidable) for r in records if r.unavoidable]
    return {
        "format": "mergekit-cabs analyze report, version 1",
        "config": config,
        "base_model": base_model,
        "models": models,
        "short_names": dict(zip(models, short_names(models))),
        "rules": list(RULES),
        "seed": seed,
        "summary": {
            "tensors": len(records),
            "weights": total,
            "models": {m: {rule: totals.model_summary(m, rule) for rule in RULES} for m in models},
            "pairs": [
                {"models": [a, b], **{rule: _pair_counts(*counts[rule]) for rule in RULES}}
                for (a, b), counts in totals.pairs.items()
            ],
            "shared": {rule: {"places": totals.shared[rule], "share": _ratio(totals.shared[rule], total)}
                       for rule in RULES},
            "unavoidable_overlap_tensors": len(unavoidable),
            "order": totals.order_summary(),
        },
        "layers": {layer: totals.layer_summary(layer) for layer in totals.layers},
        "unavoidable_overlap": unavoidable,
        "skipped": list(skipped),
        "tensors": [r.to_json() for r in records],
    }


ORDER_TOLERANCE = 0.01


def suggest_order(models: Sequence[str], per_model: dict) -> dict:
    """The suggested priority order from each model's kept-norm ratio first and last.

    A model's loss is what it keeps going first minus what it keeps going last
    (shares of its task vector's norm). The suggestion puts the models in
    descending loss, ties in the planned order: who loses most by choosing
    later chooses first. With two models this is the order with the larger
    sum of kept-norm ratios (first_A + last_B against first_B + last_A). When
    the losses all lie within ORDER_TOLERANCE (1 point) of each other, or a
    model has no changed weight, the order makes little difference and the
    planned one is kept. Returns {"suggested", "reason"}: reason is "single"
    (one model), "flat" (little difference), "planned" (already in that
    order) or "reorder"."""
    if len(models) < 2:
        return {"suggested": list(models), "reason": "single"}
    losses = [per_model[m]["loss"] for m in models]
    if None in losses or max(losses) - min(losses) < ORDER_TOLERANCE:
        return {"suggested": list(models), "reason": "flat"}
    suggested = [m for _, _, m in sorted((-loss, i, m) for i, (m, loss) in enumerate(zip(models, losses)))]
    return {"suggested": suggested, "reason": "planned" if suggested == list(models) else "reorder"}


@dataclass
class _ModelTotals:
    numel: int = 0
    kept: int = 0
    kept_changed: int = 0
    kept_sq: float = 0.0
    tau_sq: float = 0.0
    rows: Moments = field(default_factory=Moments)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _sqrt_ratio(a: float, b: float) -> float | None:
    return math.sqrt(a / b) if b else None


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _pair_counts(inter: int, union: int) -> dict:
    return {"intersection": inter, "union": union, "overlap": _ratio(inter, union)}


def _layer_sort_key(layer: str):
    return (1, 0) if layer == OTHER else (0, int(layer))


# --- output -----------------------------------------------------------------------


def order_advice(report: dict) -> list[str]:
    """The order suggestion: a headline and the numbers behind it (none for one model)."""
    order, names = report["summary"]["order"], report["short_names"]
    if order["reason"] == "single":
        return []
    per = order["models"]
    planned = ", ".join(names[m] for m in order["planned"])
    if order["reason"] == "reorder":
        head = (f"suggested order: {', '.join(names[m] for m in order['suggested'])} (planned: {planned}): "
                f"put {names[order['suggested'][0]]} first, it loses most by choosing later")
    elif order["reason"] == "planned":
        head = f"order: keep {planned}; it already puts first the model that loses most by choosing later"
    else:
        head = f"order: makes little difference here (the models lose about as much by choosing later); keep {planned}"
    densities = {fmt(per[m]["density"], ".4g") for m in order["planned"]}
    at = f" at density {next(iter(densities))}" if len(densities) == 1 else ""
    numbers = ", ".join(
        names[m] + ("" if at else f" (density {fmt(per[m]['density'], '.4g')})")
        + f" {_pct1(per[m]['first'])} / {_pct1(per[m]['last'])}"
        for m in order["suggested"]
    )
    return [head, f"  share of its task vector's norm each model keeps choosing first / last{at}: {numbers}"]


def _pct1(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(report: dict) -> str:
    """The short terminal summary."""
    s = report["summary"]
    names = report["short_names"]
    width = max([len("model")] + [len(names[m]) for m in report["models"]])
    lines = [
        (f"cabs analyze: {s['tensors']} tensors, {s['weights']:,} weights, "
         f"{len(report['models'])} models, seed {report['seed']}"),
        "",
        f"{'model':<{width}}  density  kept-norm  row CV cabs / ties / dare",
    ]
    for m in report["models"]:
        r = s["models"][m]
        cvs = " / ".join(fmt(r[rule]["row_cv"], ".3f") for rule in RULES)
        density, norm = fmt(r["cabs"]["density"]), fmt(r["cabs"]["norm_ratio"], ".3f")
        lines.append(f"{names[m]:<{width}}  {density}   {norm}      {cvs}")
    if s["pairs"]:
        pair_names = [f"{names[p['models'][0]]} & {names[p['models'][1]]}" for p in s["pairs"]]
        pw = max(len("pair"), *map(len, pair_names))
        lines += ["", f"{'pair':<{pw}}  overlap cabs    ties    dare"]
        for label, p in zip(pair_names, s["pairs"]):
            lines.append(f"{label:<{pw}}        " + "  ".join(fmt(p[rule]["overlap"]) for rule in RULES))
    lines += [
        "",
        "kept by 2+ models: " + "  ".join(f"{rule} {pct(s['shared'][rule]['share'])}" for rule in RULES),
        f"tensors where overlap is unavoidable (quotas > block): {s['unavoidable_overlap_tensors']}",
    ]
    advice = order_advice(report)
    if advice:
        lines += [""] + advice
    if report["skipped"]:
        lines.append(f"tensors not analysed: {len(report['skipped'])} (see report.md)")
    return "\n".join(lines)


def _md_models(report: dict) -> list[str]:
    s, names = report["summary"], report["short_names"]
    out = [
        "## Models", "",
        "| model | rule | density | kept-norm ratio | row CV | row density min / max | layer CV "
        "| layer density min / max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in report["models"]:
        for rule in RULES:
            r = s["models"][m][rule]
            out.append(
                f"| {names[m]} | {rule} | {fmt(r['density'])} | {fmt(r['norm_ratio'])} | {fmt(r['row_cv'])} | "
                f"{fmt(r['row_density_min'])} / {fmt(r['row_density_max'])} | {fmt(r['layer_cv'])} | "
                f"{fmt(r['layer_density_min'])} / {fmt(r['layer_density_max'])} |"
            )
    out += ["", "## Overlap", "", "| pair | cabs | ties | dare |", "|---|---|---|---|"]
    for p in s["pairs"]:
        a, b = p["models"]
        out.append(f"| {names[a]} & {names[b]} | " + " | ".join(fmt(p[rule]["overlap"]) for rule in RULES) + " |")
    shares = " | ".join(pct(s["shared"][rule]["share"]) for rule in RULES)
    return out + [f"| kept by 2+ models (share of weights) | {shares} |"]


def _md_order(report: dict) -> list[str]:
    order, names = report["summary"]["order"], report["short_names"]
    if order["reason"] == "single":
        return []
    out = [
        "## Order of `models:`", "",
        ("In cabs the first model picks its places in every block first; later ones pick among what is left. "
         "Share of each task vector's norm that cabs keeps (||kept tau|| / ||tau||) if the model chose first, "
         "in the planned order, and if it chose last (after the others in their planned order). "
         "The suggestion puts first the model that loses most by choosing later "
         "(with two models: the order with the larger sum of kept shares); "
         f"losses within {ORDER_TOLERANCE * 100:.0f} point of each other make no suggestion."),
        "",
        "| model | density | kept norm first | as planned | last | lost by choosing last |",
        "|---|---|---|---|---|---|",
    ]
    for m in order["planned"]:
        r = order["models"][m]
        out.append(f"| {names[m]} | {fmt(r['density'])} | {fmt(r['first'])} | {fmt(r['planned'])} | "
                   f"{fmt(r['last'])} | {fmt(r['loss'])} |")
    return out + [""] + [line.strip() + "  " for line in order_advice(report)] + [""]


def _md_layers(report: dict) -> list[str]:
    out = [
        "## Per layer", "",
        "Row CV pools the rows of every model's tensors in the layer (kept share per row).", "",
        "| layer | weights | kept by 2+ cabs / ties / dare | pair overlap cabs / ties / dare "
        "| row CV cabs / ties / dare |",
        "|---|---|---|---|---|",
    ]
    for layer, lt in report["layers"].items():
        out.append(
            f"| {layer} | {lt['numel']:,} | " + " / ".join(pct(lt["shared"][rule]) for rule in RULES)
            + " | " + " / ".join(fmt(lt["pair_overlap"][rule]) for rule in RULES)
            + " | " + " / ".join(fmt(lt["row_cv"][rule]) for rule in RULES) + " |"
        )
    out += ["", "## Unavoidable overlap", ""]
    if not report["unavoidable_overlap"]:
        return out + ["None: in every tensor the quotas fit in the blocks (or conflict_aware is false)."]
    out += [
        ("The quotas add up to more than the room, so some kept places cannot be free ones "
         "(the `overlap` rule decides what happens there)."),
        "", "| tensor | where | quotas | room | excess | places |", "|---|---|---|---|---|---|",
    ]
    for u in report["unavoidable_overlap"]:
        out.append(
            f"| `{u['tensor']}` | {u['where']} | {u['quotas']} | {u['room']} | {u['excess']} | {u['places']:,} |"
        )
    return out


def _md_tensors(report: dict, plots: Sequence[str]) -> list[str]:
    out = []
    if report["skipped"]:
        out += ["## Not analysed", ""] + [f"- `{x['tensor']}`: {x['reason']}" for x in report["skipped"]] + [""]
    out += [
        "## Per tensor", "",
        "| tensor | weights | kept by 2+ cabs / ties / dare | cabs kept-norm ratio per model |", "|---|---|---|---|",
    ]
    for t in report["tensors"]:
        ratios = ", ".join(fmt(t["rules"]["cabs"]["models"][m]["norm_ratio"], ".3f") for m in t["models"])
        out.append(
            f"| `{t['name']}` | {t['numel']:,} | "
            + " / ".join(pct(t["rules"][rule]["shared"]["share"]) for rule in RULES) + f" | {ratios} |"
        )
    out += ["", "## Plots", ""]
    return out + ([f"![{p}]({p})" for p in plots] if plots else [f"Not made: {PLOTS_HINT}."])


def render_markdown(report: dict, plots: Sequence[str] = ()) -> str:
    """report.md: the summary, per layer, unavoidable overlap and per tensor."""
    s = report["summary"]
    head = [
        "# CABS analysis" + (f" of `{report['config']}`" if report.get("config") else ""),
        "",
        f"Base model: `{report['base_model']}`; fine-tunes in priority order: "
        + ", ".join(f"`{m}`" for m in report["models"])
        + f". {s['tensors']} tensors, {s['weights']:,} weights. DARE-style seed: {report['seed']}.",
        "",
        ("Rules at the same budget: **cabs** as configured; **ties**: magnitude top-k per model over the "
         "whole tensor (k = the places cabs keeps); **dare**: each place kept with probability k / numel. "
         "Overlap counts places where models keep a changed weight (tau != 0): "
         "|A and B| / |A or B|, overall = sum of intersections / sum of unions."),
        "",
    ]
    parts = [_md_models(report), _md_order(report), _md_layers(report), _md_tensors(report, plots)]
    return "\n".join(head + parts[0] + [""] + parts[1] + parts[2] + [""] + parts[3]) + "\n"


RULE_LABELS = {
    "cabs": "cabs (the masks the merge will use)",
    "ties": "ties-style keep (magnitude top-k, not a merge)",
    "dare": "dare-style keep at the same budget (not a merge)",
}
OTHER_TICK = "other:\nembeddings,\nnorms, head"
OVERLAP_NOTE = ("Lines may lie on each other: each has its own marker and is shifted a little sideways. 'other' = "
                "tensors outside .layers.N. (embeddings, final norm, output head), shown apart, not joined to a line.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", ":", "-.")
_SHIFT = 0.07  # sideways offset between series, in layers


def layer_figures(report: dict) -> dict:
    """{file name: matplotlib Figure} for overlap-by-layer.png and kept-by-layer.png (not saved;
    ImportError without matplotlib)."""
    plt = pyplot()
    layers, config = report["layers"], _config_name(report)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 5), dpi=100)
    fig.suptitle(f"{config}: do the fine-tunes keep the same weights? (by layer)", fontsize=11)
    _plot_layers(left, list(layers), _rule_series(layers, "shared", scale=100))
    _plot_layers(right, list(layers), _rule_series(layers, "pair_overlap"))
    left.set_title("weights kept by two or more models", fontsize=10)
    left.set_ylabel("share of the layer's weights (%)")
    right.set_title("overlap of each pair of models", fontsize=10)
    right.set_ylabel("kept by both / kept by either\n(pairs pooled)")
    _finish_figure(fig, [(None, left, "keep rule (both panels)", 3)])
    overlap = fig

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 5), dpi=100)
    fig.suptitle(f"{config}: how evenly the kept weights spread (by layer)", fontsize=11)
    names = report["short_names"]
    _plot_layers(left, list(layers), {names[m]: [layers[k]["density"][m]["cabs"] for k in layers]
                                      for m in report["models"]})
    _plot_layers(right, list(layers), _rule_series(layers, "row_cv"))
    left.set_title("share of each layer's weights cabs keeps", fontsize=10)
    left.set_ylabel("kept share of the layer's weights")
    right.set_title("how evenly the rows keep weights (0 = all alike)", fontsize=10)
    right.set_ylabel("share of each row kept:\nspread across rows (std / mean)")
    _finish_figure(fig, [(left, left, "model (cabs keep)", 4), (right, right, "keep rule", 1)])
    return {"overlap-by-layer.png": overlap, "kept-by-layer.png": fig}


def _rule_series(layers: dict, key: str, scale: float = 1.0) -> dict:
    """{legend label: per-layer values of layers[*][key][rule] times `scale` (None kept)}."""
    return {RULE_LABELS[rule]: [None if layers[k][key][rule] is None else scale * layers[k][key][rule] for k in layers]
            for rule in RULES}


def _config_name(report: dict) -> str:
    config = report.get("config")
    return Path(config).name if config else "cabs analyze"


def _plot_layers(ax, layers: Sequence[str], series: dict) -> None:
    """One line per series over the numbered layers, and its 'other' value as a lone
    marker to the right, past a gap and a dotted rule (no line to it); series shifted
    sideways, each with its own marker (filled for the first, open for the rest)."""
    numbered = [i for i, k in enumerate(layers) if k != OTHER]
    other = layers.index(OTHER) if OTHER in layers else None
    gap = max(1.5, 0.1 * len(numbered))
    x_other = len(numbered) - 1 + gap
    for s, (label, values) in enumerate(series.items()):
        shift = (s - (len(series) - 1) / 2) * _SHIFT
        style = {"marker": _MARKERS[s % len(_MARKERS)], "markersize": 6 if len(numbered) <= 12 else 4,
                 "clip_on": False, "fillstyle": "full" if s == 0 else "none", "markeredgewidth": 1.3}
        (line,) = ax.plot([j + shift for j in range(len(numbered))], [_nan(values[i]) for i in numbered],
                          linestyle=_LINESTYLES[s % len(_LINESTYLES)], label=label, **style)
        if other is not None:
            ax.plot([x_other + shift], [_nan(values[other])], linestyle="none", color=line.get_color(), **style)
    step = max(1, math.ceil(len(numbered) / 16))
    ticks = list(range(0, len(numbered), step))
    labels = [layers[numbered[j]] for j in ticks]
    if other is not None:
        ax.axvline(x_other - gap / 2, color="grey", linewidth=0.8, linestyle=(0, (1, 3)))
        ticks, labels = ticks + [x_other], labels + [OTHER_TICK]
    ax.set_xticks(ticks, labels)
    ax.set_xlim(-0.5, (x_other if other is not None else len(numbered) - 1) + 0.5)
    ax.set_xlabel("layer")
    top = max((v for values in series.values() for v in values if v is not None and math.isfinite(v)), default=0)
    ax.set_ylim(0, 1.12 * top if top > 0 else 1)
    ax.grid(alpha=0.3)


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def _finish_figure(fig, legends, bottom: float = 0.22) -> None:
    """Panels above `bottom` (a share of the height); below them the legends, each
    (under this axes or None: centred, of the series of this axes, title, columns);
    the note at the foot."""
    fig.tight_layout(rect=(0, bottom, 1, 1))
    for under, source, title, ncol in legends:
        box = under.get_position() if under is not None else None
        x = 0.5 if box is None else box.x0 + box.width / 2
        fig.legend(*source.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(x, bottom),
                   ncol=ncol, fontsize=8, frameon=False, title=title, title_fontsize=8)
    fig.text(0.5, 0.012, OVERLAP_NOTE, ha="center", fontsize=7.5)


def make_plots(report: dict, directory: Path) -> list[str]:
    """overlap-by-layer.png and kept-by-layer.png into `directory`; ImportError without matplotlib."""
    plt = pyplot()
    written = []
    for name, fig in layer_figures(report).items():
        fig.savefig(directory / name)
        plt.close(fig)
        written.append(name)
    return written


def write_report(report: dict, out: Path) -> tuple[list[str], bool]:
    """Write report.json, report.md and the plots into `out` (see `publish`).
    Returns (file names written, whether the plots were made)."""
    import json

    made = []

    def build(staging: Path) -> list[str]:
        with contextlib.suppress(ImportError):  # no matplotlib: no plots
            made.extend(make_plots(report, staging))
        (staging / "report.md").write_text(render_markdown(report, made), encoding="utf-8")
        (staging / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        return made + ["report.md", "report.json"]

    return publish(out, REPORT_FILES, build), bool(made)
