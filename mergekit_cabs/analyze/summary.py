"""The report dict (what report.json holds): tensor records summed per model, pair, layer and in all.

`build_report` adds the `TensorRecord`s of `measure` up (raw counts and
float64 sums first, ratios last) into the summary, the per-layer table, the
order advice (`order`) and the per-tensor list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mergekit_cabs._output import short_names
from mergekit_cabs.analyze.measure import OTHER, RULES, TensorRecord
from mergekit_cabs.analyze.order import order_entry, suggest_order
from mergekit_cabs.analyze.stats import Moments, finite, pair_counts, ratio, sqrt_ratio


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
                    "blocks": {rule: Moments() for rule in RULES},
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
        if r.blocks[rule][i] is not None:  # as block densities, spread within each tensor
            blocks = r.blocks[rule][i].scaled(1 / r.block_size)
            t.blocks = t.blocks.merge_within(blocks)
            lt["blocks"][rule] = lt["blocks"][rule].merge_within(blocks)
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
            "density": ratio(t.kept, t.numel),
            "norm_ratio": sqrt_ratio(t.kept_sq, t.tau_sq),
            "row_cv": t.rows.cv, "row_density_min": finite(t.rows.lo), "row_density_max": finite(t.rows.hi),
            "rows": t.rows.n,
            "block_cv": t.blocks.cv, "blocks": t.blocks.n,
            "layer_cv": spread.cv, "layer_density_min": finite(spread.lo), "layer_density_max": finite(spread.hi),
        }

    def order_summary(self) -> dict:
        """Kept-norm ratios (cabs) first, as planned and last per model, and the suggested order."""
        per_model = {}
        for m in self.models:
            t = self.per_model[m]["cabs"]
            per_model[m] = order_entry(kept=t.kept, numel=t.numel, first_sq=self.position_sq[m]["first"],
                                       planned_sq=t.kept_sq, last_sq=self.position_sq[m]["last"], tau_sq=t.tau_sq)
        return {"planned": list(self.models), **suggest_order(self.models, per_model), "models": per_model}

    def layer_summary(self, layer: str) -> dict:
        lt = self.by_layer[layer]
        return {
            "numel": lt["numel"],
            "shared": {rule: ratio(lt["shared"][rule], lt["numel"]) for rule in RULES},
            "pair_overlap": {rule: ratio(*lt["pairs"][rule]) for rule in RULES},
            "row_cv": {rule: lt["rows"][rule].cv for rule in RULES},
            "block_cv": {rule: lt["blocks"][rule].cv for rule in RULES},
            "density": {m: {rule: ratio(*lt["models"][m][rule]) for rule in RULES} for m in self.models},
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
                {"models": [a, b], **{rule: pair_counts(*counts[rule]) for rule in RULES}}
                for (a, b), counts in totals.pairs.items()
            ],
            "shared": {rule: {"places": totals.shared[rule], "share": ratio(totals.shared[rule], total)}
                       for rule in RULES},
            "unavoidable_overlap_tensors": len(unavoidable),
            "block_sizes": sorted({r.block_size for r in records}),
            "order": totals.order_summary(),
        },
        "layers": {layer: totals.layer_summary(layer) for layer in totals.layers},
        "unavoidable_overlap": unavoidable,
        "skipped": list(skipped),
        "tensors": [r.to_json() for r in records],
    }


@dataclass
class _ModelTotals:
    numel: int = 0
    kept: int = 0
    kept_changed: int = 0
    kept_sq: float = 0.0
    tau_sq: float = 0.0
    rows: Moments = field(default_factory=Moments)
    blocks: Moments = field(default_factory=Moments)


def _layer_sort_key(layer: str):
    return (1, 0) if layer == OTHER else (0, int(layer))
