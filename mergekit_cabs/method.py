"""The `cabs` merge method for mergekit: parameters, checks and binding.

Importing this module imports mergekit; `install()` registers the method under
the name ``cabs`` (idempotent).  `_autoload` calls it as soon as mergekit's
``mergekit.merge_methods`` is imported, so plain ``mergekit-yaml`` sees it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Hashable, List, Mapping, Optional, Sequence, Tuple

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

from mergekit_cabs.kernel import (
    OVERLAP_RULES,
    NonFiniteInputError,
    backend_setting,
    block_quota,
    cabs_merge,
)

LOG = logging.getLogger("mergekit_cabs")

NAME = "cabs"
DEFAULT_DENSITY = 0.25
DEFAULT_BLOCK_SIZE = 256


class CabsConfigError(ValueError):
    """A cabs parameter is out of range or contradicts another one."""


# --- scalar types.  mergekit validates every value through its parameter's
# type while it resolves filters and gradients, without saying which model the
# value belongs to.  So the types only coerce what YAML and gradients produce
# (numeric strings such as "5e-1", integral floats from a gradient on n,
# "true"/"false") and leave anything else as it is; `resolve` then checks every
# value with the model's and the tensor's names at hand.


def _as_number(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _as_whole(value: Any) -> Any:
    value = _as_number(value)
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _as_flag(value: Any) -> Any:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _lenient(name: str, coerce):
    def validate(value: Any) -> Any:
        return None if value is None else coerce(value)

    validate.__name__ = validate.__qualname__ = f"cabs_{name}"
    return Annotated[Any, PlainValidator(validate)]


PARAMETERS = (
    ParameterSpec(
        "weight", _lenient("weight", _as_number), ParameterScope.NON_BASE, default=1.0,
        description="scale of this model's pruned task vector (lambda_i)",
    ),
    ParameterSpec(
        "density", _lenient("density", _as_number), ParameterScope.NON_BASE,
        default=None,
        description=f"kept fraction in (0, 1]; n = floor(density * block_size + 0.5); "
        f"{DEFAULT_DENSITY} when neither density nor n is given",
    ),
    ParameterSpec(
        "n", _lenient("n", _as_whole), ParameterScope.NON_BASE, default=None,
        description="places kept per block, in [1, block_size]; excludes density",
    ),
    ParameterSpec(
        "block_size", _lenient("block_size", _as_whole), ParameterScope.SHARED,
        default=DEFAULT_BLOCK_SIZE, description="m: consecutive elements per block",
    ),
    ParameterSpec(
        "overlap", _lenient("overlap", str), ParameterScope.SHARED, default="fill",
        description="'fill' or 'strict': what a model does when a block has fewer "
        "free places than its quota",
    ),
    ParameterSpec(
        "conflict_aware", _lenient("conflict_aware", _as_flag), ParameterScope.SHARED,
        default=True, description="later models choose only among free places",
    ),
    ParameterSpec(
        "balanced", _lenient("balanced", _as_flag), ParameterScope.SHARED, default=True,
        description="n:m per block; false: magnitude top-k over the whole tensor",
    ),
    ParameterSpec(
        "lambda", _lenient("lambda", _as_number), ParameterScope.SHARED, default=1.0,
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


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resolve(
    shared: Mapping[str, Any],
    per_model: Sequence[Tuple[str, Mapping[str, Any]]],
    tensor: Optional[str],
) -> Resolved:
    """Check one tensor's resolved mergekit parameters and derive the quotas.

    `per_model` lists (model label, that model's parameters) in priority order.
    Raises CabsConfigError naming the parameter, model, tensor and allowed values.
    """
    where = f" on tensor '{tensor}'" if tensor else ""
    try:
        backend_setting()  # a bad environment setting stops the plan, not the merge
    except ValueError as error:
        raise CabsConfigError(f"cabs: {error}") from None
    m, overlap, lam = shared["block_size"], shared["overlap"], shared["lambda"]
    if not _is_whole(m) or m < 1:
        raise CabsConfigError(f"cabs: 'block_size'{where} is {m!r}; it must be a whole number >= 1")
    if overlap not in OVERLAP_RULES:
        raise CabsConfigError(f"cabs: 'overlap'{where} is {overlap!r}; it must be 'fill' or 'strict'")
    for flag in ("conflict_aware", "balanced"):
        if not isinstance(shared[flag], bool):
            raise CabsConfigError(f"cabs: '{flag}'{where} is {shared[flag]!r}; it must be true or false")
    if not _is_number(lam) or not math.isfinite(lam):
        raise CabsConfigError(f"cabs: 'lambda'{where} is {lam!r}; it must be a finite number")
    weights, ns, densities = [], [], []
    for label, params in per_model:
        who = f"for model '{label}'{where}"
        weight, density, n = params.get("weight", 1.0), params.get("density"), params.get("n")
        if not _is_number(weight) or not math.isfinite(weight):
            raise CabsConfigError(f"cabs: 'weight' {who} must be a finite number; got {weight!r}")
        if density is not None and n is not None:
            raise CabsConfigError(
                f"cabs: both 'n' ({n!r}) and 'density' ({density!r}) are set {who}; give "
                "only one (a value under the top-level or a slice's `parameters:` counts "
                "for every model)"
            )
        if n is not None:
            if not _is_whole(n) or not 1 <= n <= m:
                hint = " (a gradient on n must land on whole numbers; use density for a smooth one)"
                raise CabsConfigError(
                    f"cabs: 'n' {who} is {n!r}; it must be a whole number in "
                    f"[1, block_size={m}]" + (hint if isinstance(n, float) else "")
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
        overlap=overlap,
        conflict_aware=shared["conflict_aware"],
        balanced=shared["balanced"],
        lam=float(lam),
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


def _advise_compiled_path(base: torch.Tensor) -> None:
    """Say once per merge when a CPU merge runs the slower pure torch path
    only because numba is missing (not when the user asked for torch)."""
    asked = os.environ.get("MERGEKIT_CABS_BACKEND", "auto").strip().lower() or "auto"
    if base.device.type != "cpu" or asked != "auto":
        return
    from mergekit_cabs import _numba

    if not _numba.available():
        _once.warn(
            "no numba",
            "cabs: numba is not installed, so this CPU merge runs the pure torch path: "
            'the same results, several times slower. For the compiled one: pip install '
            '"mergekit-cabs[fast]"',
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
            raise ValueError(
                "cabs needs a base model: set `base_model:` in the YAML "
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
        _advise_compiled_path(base)
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
                out_dtype=base.dtype,
            )
        except NonFiniteInputError as error:
            who = "the base model" if error.model is None else f"model '{_label(entries[error.model].id)}'"
            tensor = f" in tensor '{group.metadata.name}'" if group.metadata.name else ""
            raise ValueError(
                f"cabs: {who} has NaN or infinite values{tensor}; fix or drop that model"
            ) from None
        return merged  # already in base.dtype (out_dtype)


cabs_method = CabsMerge()


def _check_planned_task(task) -> None:
    """Check the parameters mergekit resolved for one planned tensor."""
    _once.planning(task.output_weight.name)
    models = [m for m in task.model_order if m != task.base_model]
    per_model = [(_label(m), dict(task.input_parameters[m].items())) for m in models]
    resolve(dict(task.parameters.items()), per_model, task.output_weight.name)


_SHARED_NAMES = tuple(p.name for p in SPEC.shared_parameters)
_ALL_NAMES = tuple(p.name for p in SPEC.parameters)


def _check_parameter_names(config) -> None:
    """Refuse parameter names cabs does not know, and shared ones set per model.

    mergekit looks up only the names a method declares, so `densty: 0.5` or a
    `block_size` under one model would otherwise be ignored without a word.
    """

    def check(parameters, model=None) -> None:
        for name in parameters or {}:
            where = f" for model '{model}'" if model is not None else ""
            if name not in _ALL_NAMES:
                raise CabsConfigError(
                    f"cabs: unknown parameter '{name}'{where}; cabs takes "
                    f"{', '.join(_ALL_NAMES)}"
                )
            if model is not None and name in _SHARED_NAMES:
                raise CabsConfigError(
                    f"cabs: '{name}' is shared by all models, so it cannot be set{where}; "
                    "put it under the top-level (or a slice's) `parameters:`"
                )

    def check_slices(slices) -> None:
        for output_slice in slices or ():
            check(output_slice.parameters)
            for source in output_slice.sources:
                check(source.parameters, source.model)

    check(config.parameters)
    for entry in config.models or ():
        check(entry.parameters, entry.model)
    check_slices(config.slices)
    for module in (config.modules or {}).values():
        check(module.parameters)
        for entry in module.models or ():
            check(entry.parameters, entry.model)
        check_slices(module.slices)


def _install_name_check() -> None:
    """Check parameter names the first time mergekit reads a cabs config."""
    from mergekit.config import ConfigReader

    original = ConfigReader.parameter_sources
    if getattr(original, "_cabs_checked", False):
        return
    checked = []  # the last configuration checked (one merge at a time)

    def parameter_sources(self, model=None):
        if self.config.merge_method == NAME and not (checked and checked[0] is self.config):
            _check_parameter_names(self.config)
            checked[:] = [self.config]
        return original(self, model)

    parameter_sources._cabs_checked = True
    ConfigReader.parameter_sources = parameter_sources


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
    _install_name_check()


# Importing this module first (before mergekit) reaches mergekit's import from
# here, while this module is still half made; `_autoload` then leaves the
# registration to this line.
install()
