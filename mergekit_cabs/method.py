"""The `cabs` merge method for mergekit: parameters, checks and binding.

Importing this module imports mergekit; `install()` registers the method under
the name ``cabs`` (idempotent).  `_autoload` calls it as soon as mergekit's
``mergekit.merge_methods`` is imported, so plain ``mergekit-yaml`` sees it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import torch
from pydantic import PlainValidator
from typing_extensions import Annotated

from mergekit.merge_methods import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    OptionalTensorPolicy,
    ParameterScope,
    TensorGroup,
    register,
    registered_methods,
)
from mergekit.merge_methods.base import ParameterSpec

from mergekit_cabs.kernel import NonFiniteInputError, block_quota, cabs_merge

LOG = logging.getLogger("mergekit_cabs")

NAME = "cabs"
DEFAULT_DENSITY = 0.25
DEFAULT_BLOCK_SIZE = 256
OVERLAP_RULES = ("fill", "strict")


class CabsConfigError(ValueError):
    """A cabs parameter is out of range or contradicts another one."""


# --- scalar types: coerce what YAML and mergekit gradients produce, name the
# parameter when a value has the wrong type.  Ranges that involve a model are
# checked in `resolve`, where the model's name is known.


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"cabs: '{name}' must be a number; got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"cabs: '{name}' must be a number; got {value!r}")


def _whole(name: str, value: Any) -> int:
    number = _number(name, value)
    if not number.is_integer():
        raise ValueError(
            f"cabs: '{name}' must be a whole number; got {value!r} (a gradient on "
            f"'{name}' interpolates between its values: give whole numbers that "
            "interpolate exactly, or use 'density' for a smooth gradient)"
        )
    return int(number)


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"cabs: '{name}' must be true or false; got {value!r}")


def _soft_number(name: str, value: Any) -> Any:
    """Per-model values: make numbers of what can be numbers (mergekit needs
    that to interpolate gradients) and leave the rest for `resolve`, which
    knows the model's name for the error."""
    try:
        return _number(name, value)
    except ValueError:
        return value


def _soft_whole(name: str, value: Any) -> Any:
    value = _soft_number(name, value)
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _typed(name: str, kind, optional: bool = False):
    def validate(value: Any) -> Any:
        if value is None and optional:
            return None
        return kind(name, value)

    validate.__name__ = validate.__qualname__ = f"cabs_{name}"
    return Annotated[Any, PlainValidator(validate)]


def _block_size(name: str, value: Any) -> int:
    size = _whole(name, value)
    if size < 1:
        raise ValueError(f"cabs: 'block_size' must be a whole number >= 1; got {value!r}")
    return size


def _overlap(name: str, value: Any) -> str:
    if value not in OVERLAP_RULES:
        raise ValueError(f"cabs: 'overlap' must be 'fill' or 'strict'; got {value!r}")
    return value


def _finite(name: str, value: Any) -> float:
    number = _number(name, value)
    if not math.isfinite(number):
        raise ValueError(f"cabs: '{name}' must be a finite number; got {value!r}")
    return number


PARAMETERS = (
    ParameterSpec(
        "weight", _typed("weight", _soft_number), ParameterScope.NON_BASE, default=1.0,
        description="scale of this model's pruned task vector (lambda_i)",
    ),
    ParameterSpec(
        "density", _typed("density", _soft_number, optional=True), ParameterScope.NON_BASE,
        default=None,
        description=f"kept fraction in (0, 1]; n = floor(density * block_size + 0.5); "
        f"{DEFAULT_DENSITY} when neither density nor n is given",
    ),
    ParameterSpec(
        "n", _typed("n", _soft_whole, optional=True), ParameterScope.NON_BASE, default=None,
        description="places kept per block, in [1, block_size]; excludes density",
    ),
    ParameterSpec(
        "block_size", _typed("block_size", _block_size), ParameterScope.SHARED,
        default=DEFAULT_BLOCK_SIZE, description="m: consecutive elements per block",
    ),
    ParameterSpec(
        "overlap", _typed("overlap", _overlap), ParameterScope.SHARED, default="fill",
        description="'fill' or 'strict': what a model does when a block has fewer "
        "free places than its quota",
    ),
    ParameterSpec(
        "conflict_aware", _typed("conflict_aware", _flag), ParameterScope.SHARED,
        default=True, description="later models choose only among free places",
    ),
    ParameterSpec(
        "balanced", _typed("balanced", _flag), ParameterScope.SHARED, default=True,
        description="n:m per block; false: magnitude top-k over the whole tensor",
    ),
    ParameterSpec(
        "lambda", _typed("lambda", _finite), ParameterScope.SHARED, default=1.0,
        description="global scale on the summed task vectors",
    ),
)

SPEC = MergeMethodSpec(
    name=NAME,
    pretty_name="CABS",
    reference_url="https://arxiv.org/abs/2503.01874",
    parameters=PARAMETERS,
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
    optional_tensor_policy=OptionalTensorPolicy.PASSTHROUGH_BASE_SINGLETON,
)


# --- resolving one tensor's parameters ------------------------------------


@dataclass(frozen=True)
class Resolved:
    """Checked parameters of one output tensor, models in priority order."""

    weights: Tuple[float, ...]
    n: Tuple[int, ...]  # per full block
    density: Tuple[Optional[float], ...]  # as given; None where n was given
    block_size: int
    overlap: str
    conflict_aware: bool
    balanced: bool
    lam: float

    def kernel_quotas(self, numel: int) -> Tuple[List[int], int]:
        """(per-model quota per block, block length) for a tensor of `numel`
        elements; with `balanced: false` the whole tensor is one block."""
        if self.balanced:
            return list(self.n), self.block_size
        quotas = [
            math.floor(d * numel + 0.5) if d is not None else block_quota(n, numel, self.block_size)
            for n, d in zip(self.n, self.density)
        ]
        return quotas, numel


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resolve(
    shared: Mapping[str, Any],
    per_model: Sequence[Tuple[str, Mapping[str, Any]]],
    tensor: Optional[str],
) -> Resolved:
    """Check one tensor's resolved mergekit parameters and derive the quotas.

    `per_model` lists (model label, that model's parameters) in priority order.
    Raises CabsConfigError naming the parameter, model, tensor and allowed values.
    """
    m = shared["block_size"]
    where = f" on tensor '{tensor}'" if tensor else ""
    weights, ns, densities = [], [], []
    for label, params in per_model:
        who = f"for model '{label}'{where}"
        weight, density, n = params.get("weight", 1.0), params.get("density"), params.get("n")
        if not _is_number(weight) or not math.isfinite(weight):
            raise CabsConfigError(f"cabs: 'weight' {who} must be a finite number; got {weight!r}")
        if density is not None and n is not None:
            raise CabsConfigError(
                f"cabs: both 'n' ({n!r}) and 'density' ({density!r}) are set {who}; give one "
                "of them (parameters at any level, model, slice or global, count)"
            )
        if n is not None:
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= m:
                raise CabsConfigError(
                    f"cabs: 'n' {who} is {n!r}; it must be a whole number in "
                    f"[1, block_size={m}] (use 'density' for a smooth gradient)"
                )
        else:
            if density is None:
                density = DEFAULT_DENSITY
            if not _is_number(density) or not 0 < density <= 1:
                raise CabsConfigError(
                    f"cabs: 'density' {who} is {density!r}; it must be a number in (0, 1]"
                )
            n = math.floor(density * m + 0.5)
            if n < 1:
                raise CabsConfigError(
                    f"cabs: 'density' {who} is {density}, which keeps "
                    f"floor({density} * {m} + 0.5) = 0 places per block of "
                    f"block_size={m}; use density >= {0.5 / m:.6g} or a larger block_size"
                )
        weights.append(float(weight))
        ns.append(n)
        densities.append(density)

    resolved = Resolved(
        weights=tuple(weights),
        n=tuple(ns),
        density=tuple(densities),
        block_size=m,
        overlap=shared["overlap"],
        conflict_aware=shared["conflict_aware"],
        balanced=shared["balanced"],
        lam=shared["lambda"],
    )
    _warn_unavoidable_overlap(resolved, tensor)
    return resolved


class _OncePerMerge:
    """Says each overlap warning once per merge, not once per tensor."""

    def __init__(self):
        self.said: set = set()
        self.planned: set = set()

    def new_merge(self) -> None:
        self.said.clear()
        self.planned.clear()

    def planning(self, tensor: str) -> None:
        # mergekit plans each output tensor once per merge: a name seen again
        # means another merge is being planned (mergekit-multi, a notebook).
        if tensor in self.planned:
            self.new_merge()
        self.planned.add(tensor)

    def warn(self, key: Any, message: str, *args: Any) -> None:
        if key not in self.said:
            self.said.add(key)
            LOG.warning(message, *args)


_once = _OncePerMerge()

_OVERLAP_RULE = {
    "fill": "'fill': models after the block is full also keep their largest entries "
    "among claimed places, so their supports overlap there",
    "strict": "'strict': later models keep only the free places, fewer than their quota",
}


def _warn_unavoidable_overlap(r: Resolved, tensor: Optional[str]) -> None:
    if not r.conflict_aware:
        return
    if r.balanced:
        total, room = sum(r.n), r.block_size
        what = f"n = {list(r.n)} add up to {total} > block_size = {room}"
    else:
        fractions = [d if d is not None else n / r.block_size for n, d in zip(r.n, r.density)]
        total, room = sum(fractions), 1.0
        what = f"densities {[round(f, 6) for f in fractions]} add up to {total:.6g} > 1"
    if total > room:
        _once.warn(
            (what, r.overlap),
            "cabs: the quotas %s%s: overlap between models cannot be avoided; going on "
            "by overlap=%s. Said once per merge and setting.",
            what, f" (first seen on tensor '{tensor}')" if tensor else "", _OVERLAP_RULE[r.overlap],
        )


def _warn_short_block_overlap(r: Resolved, numel: int, tensor: Optional[str]) -> None:
    tail = numel % r.block_size
    if not (r.conflict_aware and r.balanced and tail) or sum(r.n) > r.block_size:
        return  # nothing short, or already said for the full blocks
    quotas = [block_quota(n, tail, r.block_size) for n in r.n]
    if sum(quotas) > tail:
        _once.warn(
            (tuple(quotas), tail, r.overlap),
            "cabs: in the short last block of %d elements%s the rounded quotas %s add up "
            "to more than %d: overlap there cannot be avoided; going on by overlap=%s.",
            tail, f" of tensor '{tensor}'" if tensor else "", quotas, tail,
            _OVERLAP_RULE[r.overlap],
        )


# --- the mergekit method --------------------------------------------------


def _label(model_id: Hashable) -> str:
    return str(model_id)


def _resolve_group(group: TensorGroup, parameters: Mapping[str, Any]) -> Resolved:
    per_model = [
        (_label(e.id), {k: parameters[k][e.id] for k in ("weight", "density", "n")})
        for e in group.non_base
    ]
    return resolve(parameters, per_model, group.metadata.name)


class CabsMerge(GroupMergeMethod):
    """Conflict-Aware and Balanced Sparsification, one output tensor at a time."""

    spec = SPEC

    def validate_inputs(self, input_ids, base_id=None, *, group_name=None) -> None:
        if base_id is None:
            where = f" (for {group_name})" if group_name else ""
            raise ValueError(
                f"cabs needs a base model{where}: set `base_model:` in the YAML "
                "(or base_index=/base= in merge_tensors/merge_state_dicts); task "
                "vectors are differences from it"
            )
        super().validate_inputs(input_ids, base_id, group_name=group_name)

    def __call__(self, groups, /, **kwargs):
        _once.new_merge()  # merge_tensors / merge_state_dicts: one call, one merge
        return super().__call__(groups, **kwargs)

    def _bind_parameters(self, groups, parameters):
        bound = super()._bind_parameters(groups, parameters)
        # Check every tensor's parameters before the first one is merged.
        for group, values in zip(groups, bound):
            if group.non_base:
                _resolve_group(group, values)
        return bound

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        if not entries:
            return base
        r = _resolve_group(group, parameters)
        if base.numel() == 0:
            return base.clone()
        _warn_short_block_overlap(r, base.numel(), group.metadata.name)
        quotas, m = r.kernel_quotas(base.numel())
        try:
            merged = cabs_merge(
                base,
                [e.tensor for e in entries],
                r.weights,
                quotas,
                m,
                overlap=r.overlap,
                conflict_aware=r.conflict_aware,
                lam=r.lam,
            )
        except NonFiniteInputError as error:
            who = "the base model" if error.model is None else f"model '{_label(entries[error.model].id)}'"
            tensor = f" in tensor '{group.metadata.name}'" if group.metadata.name else ""
            raise ValueError(
                f"cabs: {who} has NaN or infinite values{tensor}; fix or drop that model"
            ) from None
        return merged.to(base.dtype)


cabs_method = CabsMerge()


def _check_planned_task(task) -> None:
    """Check the parameters mergekit resolved for one planned tensor."""
    _once.planning(task.output_weight.name)
    models = [m for m in task.model_order if m != task.base_model]
    per_model = [(_label(m), dict(task.input_parameters[m].items())) for m in models]
    resolve(dict(task.parameters.items()), per_model, task.output_weight.name)


def _install_plan_check() -> None:
    """Check every planned cabs tensor while mergekit plans, before it merges.

    mergekit resolves parameters per tensor (filters, gradients) when it plans
    and offers no hook that sees them together, so this wraps the constructor
    of its per-tensor task: a bad combination (n above block_size, n with
    density, ...) stops the run before any tensor is merged or written.
    """
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    original = ExecuteMergeMethodTask.__init__
    if getattr(original, "_cabs_checked", False):
        return

    def __init__(self, /, **data):
        original(self, **data)
        if self.method_name == NAME:
            _check_planned_task(self)

    __init__._cabs_checked = True
    ExecuteMergeMethodTask.__init__ = __init__


def install() -> None:
    """Register `cabs` with mergekit (safe to call any number of times)."""
    if not any(method.spec.name == NAME for method in registered_methods()):
        register(cabs_method)
    _install_plan_check()
