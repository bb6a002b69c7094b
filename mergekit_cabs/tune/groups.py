"""Layer groups: which weight of a model each merged tensor takes when `tune`
searches one weight per model for each group of consecutive decoder layers
(``--layer-groups G``), and the mergekit filters that say so in tuned.yml.

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
        return [[float(weights[i * self.count + g]) for i in range(models)] for g in range(self.count)]


ONE_GROUP = LayerGroups()


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
