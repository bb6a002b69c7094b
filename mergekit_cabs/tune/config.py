"""The numbers `tune` sets in a configuration: the configured ones it starts
from, and `tuned.yml`, the user's YAML with the chosen ones, checked to
resolve to them on every tensor.

Weights are flat, model by model and, with layer groups, group by group
within a model (`groups.LayerGroups.names`).  A model's weight per layer
group is written as a list of mergekit filters, one per decoder layer (the
layer's name prefix, such as ``model.layers.7.``), then the value of the
tensors outside the layers; in a ``slices:`` configuration each source's
filters name its own input layers."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

from mergekit_cabs.tune.groups import ONE_GROUP, LayerGroups
from mergekit_cabs.tune.options import TuneError


def configured_numbers(planned, finetunes, groups: LayerGroups = ONE_GROUP) -> tuple[list[float], float]:
    """The configured weight of every model (per layer group, flat as
    `groups.names`) and lambda, which must be one number each across the
    tensors they cover (tune sets one number each)."""
    labels = groups.labels()
    weights: dict[tuple[int, int], set] = {(i, g): set() for i in range(len(finetunes)) for g in range(groups.count)}
    lams = set()
    index = {ref: i for i, ref in enumerate(finetunes)}
    for p in planned:
        if not p.models:
            continue
        lams.add(p.resolved.lam)
        for ref, w in zip(p.models, p.resolved.weights):
            weights[index[ref], groups.of(p.name)].add(w)
    for (i, g), values in weights.items():
        if len(values) > 1:
            where = "" if groups.count == 1 else f" within layer group '{labels[g]}'"
            raise TuneError(
                f"model '{finetunes[i]}' has a weight that varies by tensor{where} ({min(values)} to {max(values)}, "
                "from a filter or gradient); tune sets one weight per model"
                + (" and layer group" if groups.count > 1 else "") + ": give it one number, or tune one weight per "
                "tensor (--coefficients tensor)"
            )
    if len(lams) > 1:
        raise TuneError(
            f"'lambda' varies by tensor ({min(lams)} to {max(lams)}); tune sets one lambda: give it one number"
        )
    return [next(iter(weights[i, g]), 1.0) for i in range(len(finetunes)) for g in range(groups.count)], \
        next(iter(lams), 1.0)


def tuned_config(raw: dict, finetunes, weights: Sequence[float], lam: float,
                 groups: LayerGroups = ONE_GROUP) -> dict:
    """The user's YAML with every fine-tune's `weight` and the `lambda` set."""
    from mergekit.common import ModelReference

    out = copy.deepcopy(raw)
    per = groups.count
    chosen = {ref: weights[i * per:(i + 1) * per] for i, ref in enumerate(finetunes)}

    def set_weight(item: dict, layers) -> None:
        ref = ModelReference.model_validate(item["model"])
        if ref in chosen:
            params = item.get("parameters") or {}
            params["weight"] = groups.setting(chosen[ref], layers)
            item["parameters"] = params

    every_layer = [(layer, layer) for layer in groups.layers]
    for item in out.get("models") or []:
        set_weight(item, every_layer)
    offset = 0
    for piece in out.get("slices") or []:
        sources = piece.get("sources") or []
        length = sources[0]["layer_range"][1] - sources[0]["layer_range"][0] if sources else 0
        for item in sources:
            first = item["layer_range"][0]
            set_weight(item, [(first + k, offset + k) for k in range(length)])
        offset += length
        if "lambda" in (piece.get("parameters") or {}):
            piece["parameters"]["lambda"] = float(lam)
    params = out.get("parameters") or {}
    params["lambda"] = float(lam)
    out["parameters"] = params
    return out


def check_round_trip(tuned: dict, finetunes, weights, lam, groups: LayerGroups = ONE_GROUP,
                     expected=None) -> None:
    """Plan `tuned` with mergekit and check every tensor gets the chosen
    numbers and, given the `expected` plan (the chosen density and order's),
    the same masks (`settings.mask_signature`: models in priority order and
    their quotas).  The inputs' shapes are not read again: tuned.yml names
    the models, and the tensors, that `prepare` already checked."""
    from mergekit.config import MergeConfiguration

    from mergekit_cabs.planning import plan

    planned = plan(MergeConfiguration.model_validate(tuned), shapes=False)
    got_weights, got_lam = configured_numbers(planned, finetunes, groups)
    if got_weights != [float(w) for w in weights] or got_lam != float(lam):
        raise RuntimeError(f"tune: tuned.yml resolves to weights {got_weights}, lambda {got_lam} (a bug)")
    if expected is not None and mask_signature(planned) != mask_signature(expected):
        raise RuntimeError("tune: tuned.yml does not plan the chosen density and order (a bug)")


def model_items(raw: dict) -> Iterator[dict]:
    """Every model entry of a configuration that is not the base (models: and slices' sources)."""
    from mergekit.common import ModelReference

    base = ModelReference.model_validate(raw["base_model"]) if raw.get("base_model") else None
    items = list(raw.get("models") or []) + [s for p in raw.get("slices") or [] for s in p.get("sources") or []]
    for item in items:
        if ModelReference.model_validate(item["model"]) != base:
            yield item


def shared_dicts(raw: dict) -> list[dict]:
    """The configuration's shared parameter mappings (top level, then each slice's), created if missing."""
    raw["parameters"] = raw.get("parameters") or {}
    out = [raw["parameters"]]
    for piece in raw.get("slices") or []:
        if piece.get("parameters"):
            out.append(piece["parameters"])
    return out


def mask_signature(planned) -> list[tuple]:
    """What decides a plan's masks, tensor by tensor: the models in priority
    order and their quotas (n per block; the density too without balanced
    blocks).  Weights and lambda are left out: tune sets them."""
    return [(p.name, tuple(str(m) for m in p.models), p.resolved.n,
             None if p.resolved.balanced else p.resolved.density, p.resolved.block_size, p.resolved.overlap,
             p.resolved.conflict_aware) for p in planned if p.models]
