"""The numbers `tune` sets in a configuration: the configured ones it starts
from, and `tuned.yml`, the user's YAML with the chosen ones, checked to
resolve to them on every tensor."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from mergekit_cabs.tune.options import TuneError


def configured_numbers(planned, finetunes) -> tuple[list[float], float]:
    """The configured weight of every model and lambda, which must be one
    number each across all tensors (tune sets one number each)."""
    weights: dict[int, set] = {i: set() for i in range(len(finetunes))}
    lams = set()
    index = {ref: i for i, ref in enumerate(finetunes)}
    for p in planned:
        if not p.models:
            continue
        lams.add(p.resolved.lam)
        for ref, w in zip(p.models, p.resolved.weights):
            weights[index[ref]].add(w)
    for i, values in weights.items():
        if len(values) > 1:
            raise TuneError(
                f"model '{finetunes[i]}' has a weight that varies by tensor ({min(values)} to {max(values)}, "
                "from a filter or gradient); tune sets one weight per model: give it one number"
            )
    if len(lams) > 1:
        raise TuneError(
            f"'lambda' varies by tensor ({min(lams)} to {max(lams)}); tune sets one lambda: give it one number"
        )
    return [next(iter(weights[i]), 1.0) for i in range(len(finetunes))], next(iter(lams), 1.0)


def tuned_config(raw: dict, finetunes, weights: Sequence[float], lam: float) -> dict:
    """The user's YAML with every fine-tune's `weight` and the `lambda` set."""
    from mergekit.common import ModelReference

    out = copy.deepcopy(raw)
    chosen = {ref: w for ref, w in zip(finetunes, weights)}

    def set_weight(item: dict) -> None:
        ref = ModelReference.model_validate(item["model"])
        if ref in chosen:
            params = item.get("parameters") or {}
            params["weight"] = float(chosen[ref])
            item["parameters"] = params

    for item in out.get("models") or []:
        set_weight(item)
    for piece in out.get("slices") or []:
        for item in piece.get("sources") or []:
            set_weight(item)
        if "lambda" in (piece.get("parameters") or {}):
            piece["parameters"]["lambda"] = float(lam)
    params = out.get("parameters") or {}
    params["lambda"] = float(lam)
    out["parameters"] = params
    return out


def check_round_trip(tuned: dict, finetunes, weights, lam) -> None:
    """Plan `tuned` with mergekit and check every tensor gets the chosen numbers."""
    from mergekit.config import MergeConfiguration

    from mergekit_cabs.planning import plan

    planned = plan(MergeConfiguration.model_validate(tuned))
    got_weights, got_lam = configured_numbers(planned, finetunes)
    if got_weights != [float(w) for w in weights] or got_lam != float(lam):
        raise RuntimeError(f"tune: tuned.yml resolves to weights {got_weights}, lambda {got_lam} (a bug)")
