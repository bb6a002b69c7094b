"""The coefficients' shapes (``--coefficients model|layer|tensor``): which
weight of a model each merged tensor takes, and the mergekit filters that
say so in tuned.yml.  `model`: one weight per model (`ONE_GROUP`); `layer`:
one per model for each decoder layer, or for each of G groups of
consecutive layers (``--layer-groups G``), and one for the tensors outside
the layers (`LayerGroups`); `tensor`: one per model per merged tensor
(`TensorColumns`).  Both classes offer the same few things (`count`,
`labels`, `of`, `names`, `rows`, `layers`, `setting`, `report`), so the
store, the searches and tuned.yml treat every shape alike.

A tensor's decoder layer is the first all-digit part of its dotted name
(``model.layers.7.mlp.up_proj.weight``: 7); the tensors in no layer (the
embeddings, the final norm, the head) form one more group, the last.  The
layers the plan writes are split, in order, into G runs whose sizes differ
by at most one (the first ones the longer).  Without layer groups, every
tensor is in the one group, and each model has one weight.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mergekit_cabs.tune.options import TuneError

OUTSIDE = "embeddings/norm/head"  # the group of the tensors in no decoder layer
COEFFICIENTS = ("model", "layer", "tensor")


def layer_index(name: str) -> int | None:
    """The decoder layer of a tensor: the first all-digit part of its dotted name, or None."""
    return next((int(part) for part in name.split(".") if part.isdigit()), None)


def layer_prefix(name: str, layer: int | None = None) -> str:
    """The name up to and including its layer number, and a dot
    (``model.layers.7.``): a mergekit filter that matches that layer's
    tensors only (mergekit filters are substrings).  With `layer`, the same
    prefix for that layer number instead."""
    parts = name.split(".")
    at = next(k for k, part in enumerate(parts) if part.isdigit())
    number = parts[at] if layer is None else str(layer)
    return ".".join(parts[:at] + [number]) + "."


@dataclass(frozen=True)
class LayerGroups:
    """The groups of merged tensors that each take their own weight per model."""

    spans: tuple[tuple[int, ...], ...] = ()  # each group's decoder layers, in order (none: one group)
    prefixes: dict[int, str] = field(default_factory=dict)  # layer -> its filter prefix in the output's names

    @property
    def count(self) -> int:
        return len(self.spans) + 1

    def labels(self) -> list[str]:
        """Each group in words: "layers 0-3" ..., then the tensors outside the layers."""
        if not self.spans:
            return ["all tensors"]
        words = [f"layer {s[0]}" if len(s) == 1 else f"layers {s[0]}-{s[-1]}" for s in self.spans]
        return words + [OUTSIDE]

    def of(self, name: str) -> int:
        """The group of the tensor `name` (output name)."""
        layer = layer_index(name)
        return next((g for g, span in enumerate(self.spans) if layer in span), len(self.spans))

    def names(self, labels: Sequence[str]) -> list[str]:
        """The searched weights' names, model by model, group by group."""
        if not self.spans:
            return list(labels)
        return [f"{label}: {group}" for label in labels for group in self.labels()]

    def rows(self, weights: Sequence[float], models: int) -> list[list[float]]:
        """The searched weights (model-major, as `names`) as one vector per group,
        indexed by model."""
        return rows_of(weights, models, self.count)

    @property
    def layers(self) -> list[int]:
        """The decoder layers the output's tensor names hold."""
        return sorted(self.prefixes)

    def setting(self, values: Sequence[float], layers) -> float | list[dict]:
        """A model's `weight` setting: its one weight, or with layer groups one
        mergekit filter per input layer (`layers`: (input layer, output layer)
        pairs), then the weight of the tensors outside the layers."""
        if self.count == 1:
            return float(values[0])
        group = {layer: g for g, span in enumerate(self.spans) for layer in span}
        return [{"filter": layer_prefix(self.prefixes[out], layer), "value": float(values[group[out]])}
                for layer, out in layers] + [{"value": float(values[-1])}]

    def report(self) -> dict | None:
        """The groups in tune.json: each group's words and decoder layers; None with one group."""
        if self.count == 1:
            return None
        return {"count": len(self.spans), "shape": "layer",
                "groups": [{"name": label, "layers": list(span)} for label, span in
                           zip(self.labels(), [*self.spans, ()])]}


def rows_of(weights: Sequence[float], models: int, count: int) -> list[list[float]]:
    """Weights flat model-major (each model's `count` columns in turn) as one vector per column, indexed by model."""
    return [[float(weights[i * count + g]) for i in range(models)] for g in range(count)]


ONE_GROUP = LayerGroups()


@dataclass(frozen=True)
class TensorColumns:
    """One weight per model per merged tensor (``--coefficients tensor``), in
    the plan's order of the merged tensors' output names."""

    tensors: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.tensors)

    def labels(self) -> list[str]:
        return list(self.tensors)

    def of(self, name: str) -> int:
        return self.tensors.index(name)

    def names(self, labels: Sequence[str]) -> list[str]:
        """The searched weights' names, model by model, tensor by tensor."""
        return [f"{label}: {tensor}" for label in labels for tensor in self.tensors]

    def rows(self, weights: Sequence[float], models: int) -> list[list[float]]:
        return rows_of(weights, models, self.count)

    @property
    def layers(self) -> list[int]:
        return sorted({layer_index(t) for t in self.tensors} - {None})

    def setting(self, values: Sequence[float], layers) -> list[dict]:
        """A model's `weight` setting: one mergekit filter per merged tensor,
        its full name (in a slice, with the source's input layer number:
        `layers` holds (input layer, output layer) pairs); a tensor of a layer
        the source does not write gets none.  A full name matches no other
        tensor of a transformers model (mergekit filters are substrings)."""
        inputs = {out: layer for layer, out in layers}
        entries = []
        for name, value in zip(self.tensors, values):
            layer = layer_index(name)
            if layer is None or layer in inputs:
                written = name if layer is None else layer_prefix(name, inputs[layer]) + name[len(layer_prefix(name)):]
                entries.append({"filter": written, "value": float(value)})
        return entries

    def report(self) -> dict:
        return {"count": self.count, "shape": "tensor", "groups": [{"name": t, "layers": [] if layer_index(t) is None
                                                                    else [layer_index(t)]} for t in self.tensors]}


def make_groups(names: Iterable[str], count: int | None) -> LayerGroups:
    """`count` groups of the decoder layers the tensors `names` are in (None:
    one group of everything); TuneError when the merge has fewer layers."""
    if count is None:
        return ONE_GROUP
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise TuneError(f"--layer-groups is {count!r}; it must be a whole number >= 1")
    prefixes = {}
    for name in names:
        layer = layer_index(name)
        if layer is not None:
            prefixes.setdefault(layer, layer_prefix(name))
    layers = sorted(prefixes)
    if count > len(layers):
        raise TuneError(f"--layer-groups is {count}; this merge writes {len(layers)} decoder layers"
                        + (f": give 1 to {len(layers)}" if layers else ", so there is nothing to group"))
    size, longer = divmod(len(layers), count)
    spans, start = [], 0
    for g in range(count):
        end = start + size + (g < longer)
        spans.append(tuple(layers[start:end]))
        start = end
    return LayerGroups(tuple(spans), dict(sorted(prefixes.items())))


def make_columns(names: Sequence[str], coefficients: str | None, layer_groups: int | None):
    """The coefficients' shape (`COEFFICIENTS`) over the merged tensors
    `names`: None is `layer` with --layer-groups and `model` without;
    `layer` without --layer-groups is one group per decoder layer.
    TuneError for a shape --layer-groups contradicts."""
    shape = coefficients or ("layer" if layer_groups is not None else "model")
    if shape not in COEFFICIENTS:
        raise TuneError(f"--coefficients is {coefficients!r}; choose {', '.join(COEFFICIENTS)}")
    if layer_groups is not None and shape != "layer":
        raise TuneError(f"--layer-groups {layer_groups} sets one weight per model per group of layers; it goes "
                        f"with --coefficients layer (or alone), not {shape}")
    if shape == "model":
        return ONE_GROUP
    if shape == "tensor":
        return TensorColumns(tuple(dict.fromkeys(names)))
    layers = {layer_index(name) for name in names} - {None}
    return make_groups(names, layer_groups if layer_groups is not None else max(1, len(layers)))
