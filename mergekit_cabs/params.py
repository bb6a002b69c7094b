"""The cabs parameters: their specs, the per-tensor check (`resolve`), the
check of parameter names in a configuration, and the package's error type.

Nothing here imports mergekit or torch: `method.py` turns `PARAMETERS` into
mergekit's parameter specs, and analyze, tune and check call `resolve` and
`check_parameter_names` on what mergekit planned.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import PlainValidator

from mergekit_cabs.backend import backend_setting

LOG = logging.getLogger("mergekit_cabs")

NAME = "cabs"
# The name our method also answers to; the only one when another package
# registered a method called `cabs` first (see method.install).
ALT_NAME = "mergekit_cabs"
DEFAULT_DENSITY = 0.25
DEFAULT_BLOCK_SIZE = 256
OVERLAP_RULES = ("fill", "strict")
# Names mergekit's own tools put into every configuration they build
# (mergekit-evolve: normalize, int8_mask); cabs has no use for them.
TOOL_NAMES = ("normalize", "int8_mask")


class CabsError(ValueError):
    """Bad input to mergekit-cabs; the message names the thing at fault and
    what is allowed.  Every error a command reports is one of these."""


class CabsConfigError(CabsError):
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
        try:
            return float(value)
        except OverflowError:  # a huge integer: left for `resolve` to refuse by name
            return value
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


@dataclass(frozen=True)
class Parameter:
    """One cabs parameter: `shared` ones are set once per tensor, the others per model."""

    name: str
    type: Any
    shared: bool
    default: Any
    description: str


PARAMETERS = (
    Parameter("weight", _lenient("weight", _as_number), False, 1.0,
              "scale of this model's pruned task vector (lambda_i)"),
    Parameter("density", _lenient("density", _as_number), False, None,
              f"kept fraction in (0, 1]; n = floor(density * block_size + 0.5); "
              f"{DEFAULT_DENSITY} when neither density nor n is given"),
    Parameter("n", _lenient("n", _as_whole), False, None,
              "places kept per block, in [1, block_size]; excludes density"),
    Parameter("block_size", _lenient("block_size", _as_whole), True, DEFAULT_BLOCK_SIZE,
              "m: consecutive elements per block"),
    Parameter("overlap", _lenient("overlap", str), True, "fill",
              "'fill' or 'strict': what a model does when a block has fewer free places than its quota"),
    Parameter("conflict_aware", _lenient("conflict_aware", _as_flag), True, True,
              "later models choose only among free places"),
    Parameter("balanced", _lenient("balanced", _as_flag), True, True,
              "n:m per block; false: magnitude top-k over the whole tensor"),
    Parameter("lambda", _lenient("lambda", _as_number), True, 1.0,
              "global scale on the summed task vectors"),
)
SHARED_NAMES = tuple(p.name for p in PARAMETERS if p.shared)
ALL_NAMES = tuple(p.name for p in PARAMETERS)
PER_MODEL_NAMES = tuple(p.name for p in PARAMETERS if not p.shared)


def block_quota(n: int, length: int, block_size: int) -> int:
    """Places kept in a block of `length` elements: floor(n * length / block_size + 0.5)."""
    return (2 * n * length + block_size) // (2 * block_size)


# --- resolving one tensor's parameters ------------------------------------


@dataclass(frozen=True)
class Resolved:
    """Checked parameters of one output tensor, models in priority order."""

    weights: tuple[float, ...]
    n: tuple[int, ...]  # per full block
    density: tuple[float | None, ...]  # as given; None where n was given
    block_size: int
    overlap: str
    conflict_aware: bool
    balanced: bool
    lam: float

    def kernel_quotas(self, numel: int) -> tuple[list[int], int]:
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


def _is_finite(value: Any) -> bool:
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _min_density(m: int) -> float:
    """The smallest float density that keeps at least one place per block of m."""
    density = 0.5 / m
    while math.floor(density * m + 0.5) < 1:
        density = math.nextafter(density, 1.0)
    return density


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shared_problems(shared: Mapping[str, Any], where: str) -> list[str]:
    problems = []
    try:
        backend_setting()  # a bad environment setting stops the plan, not the merge
    except ValueError as error:
        problems.append(f"cabs: {error}")
    m, overlap, lam = shared["block_size"], shared["overlap"], shared["lambda"]
    if not _is_whole(m) or m < 1:
        problems.append(f"cabs: 'block_size'{where} is {m!r}; it must be a whole number >= 1")
    if overlap not in OVERLAP_RULES:
        problems.append(f"cabs: 'overlap'{where} is {overlap!r}; it must be 'fill' or 'strict'")
    for flag in ("conflict_aware", "balanced"):
        if not isinstance(shared[flag], bool):
            problems.append(f"cabs: '{flag}'{where} is {shared[flag]!r}; it must be true or false")
    if not _is_finite(lam):
        problems.append(f"cabs: 'lambda'{where} is {lam!r}; it must be a finite number")
    return problems


def _model_quota(params: Mapping[str, Any], m: int, who: str) -> tuple[float, int, float | None]:
    """(weight, n, density as given) of one model, checked."""
    weight, density, n = params.get("weight", 1.0), params.get("density"), params.get("n")
    if not _is_finite(weight):
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
        return float(weight), n, None
    if density is None:
        density = DEFAULT_DENSITY
    if not _is_number(density) or not 0 < density <= 1:
        raise CabsConfigError(f"cabs: 'density' {who} is {density!r}; it must be a number in (0, 1]")
    n = math.floor(density * m + 0.5)
    if n < 1:
        raise CabsConfigError(
            f"cabs: 'density' {who} is {density}, which keeps "
            f"floor({density} * {m} + 0.5) = 0 places per block of "
            f"block_size={m}; use density >= {_min_density(m)!r} or a larger block_size"
        )
    return float(weight), n, density


def resolve(
    shared: Mapping[str, Any],
    per_model: Sequence[tuple[str, Mapping[str, Any]]],
    tensor: str | None,
) -> Resolved:
    """Check one tensor's resolved mergekit parameters and derive the quotas.

    `per_model` lists (model label, that model's parameters) in priority order.
    Raises CabsConfigError naming the parameter, model, tensor and allowed values.
    """
    where = f" on tensor '{tensor}'" if tensor else ""
    for problem in _shared_problems(shared, where):
        raise CabsConfigError(problem)
    m = shared["block_size"]
    quotas = [_model_quota(params, m, f"for model '{label}'{where}") for label, params in per_model]
    resolved = Resolved(
        weights=tuple(q[0] for q in quotas),
        n=tuple(q[1] for q in quotas),
        density=tuple(q[2] for q in quotas),
        block_size=m,
        overlap=shared["overlap"],
        conflict_aware=shared["conflict_aware"],
        balanced=shared["balanced"],
        lam=float(shared["lambda"]),
    )
    _warn_unavoidable_overlap(resolved, tensor)
    return resolved


def resolve_problems(
    shared: Mapping[str, Any],
    per_model: Sequence[tuple[str, Mapping[str, Any]]],
    tensor: str | None,
) -> list[str]:
    """Every message `resolve` could raise for one tensor, not only the first
    (the models' quotas are checked against the default block_size when
    block_size itself is bad)."""
    where = f" on tensor '{tensor}'" if tensor else ""
    problems = _shared_problems(shared, where)
    m = shared["block_size"] if _is_whole(shared["block_size"]) and shared["block_size"] >= 1 else DEFAULT_BLOCK_SIZE
    for label, params in per_model:
        try:
            _model_quota(params, m, f"for model '{label}'{where}")
        except CabsConfigError as error:
            problems.append(str(error))
    return problems


# --- warnings said once per merge ----------------------------------------------


class OncePerMerge:
    """Says each warning once per merge, not once per tensor."""

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


once = OncePerMerge()

_OVERLAP_RULE = {
    "fill": "'fill': models after the block is full also keep their largest entries "
    "among claimed places, so their supports overlap there",
    "strict": "'strict': later models keep only the free places, fewer than their quota",
}


def _warn_unavoidable_overlap(r: Resolved, tensor: str | None) -> None:
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
        once.warn(
            (what, r.overlap),
            "cabs: the quotas %s%s: overlap between models cannot be avoided; going on "
            "by overlap=%s. Said once per merge and setting.",
            what, f" (first seen on tensor '{tensor}')" if tensor else "", _OVERLAP_RULE[r.overlap],
        )


def warn_short_block_overlap(r: Resolved, numel: int, tensor: str | None) -> None:
    """Say (once per merge) when rounding makes the quotas of a short last block
    (or, with balanced: false, of a small tensor) add up to more than its room."""
    if not r.balanced:
        _warn_whole_tensor_overlap(r, numel, tensor)
        return
    tail = numel % r.block_size
    if not (r.conflict_aware and tail) or sum(r.n) > r.block_size:
        return  # nothing short, or already said for the full blocks
    quotas = [block_quota(n, tail, r.block_size) for n in r.n]
    if sum(quotas) > tail:
        once.warn(
            (tuple(quotas), tail, r.overlap),
            "cabs: in the short last block of %d elements%s the rounded quotas %s add up "
            "to more than %d: overlap there cannot be avoided; going on by overlap=%s.",
            tail, f" of tensor '{tensor}'" if tensor else "", quotas, tail,
            _OVERLAP_RULE[r.overlap],
        )


def _warn_whole_tensor_overlap(r: Resolved, numel: int, tensor: str | None) -> None:
    """balanced: false: densities that fit can still round to more places than a small tensor has."""
    quotas, _ = r.kernel_quotas(numel)
    fractions = [d if d is not None else n / r.block_size for n, d in zip(r.n, r.density)]
    if r.conflict_aware and sum(fractions) <= 1 and sum(quotas) > numel:
        once.warn(
            (tuple(quotas), numel, r.overlap),
            "cabs: in tensor%s of %d elements the rounded quotas %s add up to more than %d: overlap "
            "there cannot be avoided; going on by overlap=%s.",
            f" '{tensor}'" if tensor else "", numel, quotas, numel, _OVERLAP_RULE[r.overlap],
        )


# --- parameter names and settings in a configuration ------------------------------

# Shared parameters that take one of a few values: a list there is a mergekit
# gradient, which picks one entry per layer (a step, not an interpolation).
ONE_VALUE_NAMES = ("overlap", "conflict_aware", "balanced")


def _places(config) -> Iterator[tuple[Any, Any, str]]:
    """(parameters, model or None, where) for every `parameters:` of a
    mergekit `MergeConfiguration`: top level, models, slices, modules."""
    yield config.parameters, None, "the top-level parameters"
    for entry in config.models or ():
        yield entry.parameters, entry.model, f"the parameters of model '{entry.model}'"
    yield from _slice_places(config.slices, "")
    for key, module in (config.modules or {}).items():
        yield module.parameters, None, f"the parameters of module '{key}'"
        for entry in module.models or ():
            yield entry.parameters, entry.model, f"the parameters of model '{entry.model}' in module '{key}'"
        yield from _slice_places(module.slices, f" of module '{key}'")


def _slice_places(slices, module: str) -> Iterator[tuple[Any, Any, str]]:
    for i, output_slice in enumerate(slices or ()):
        yield output_slice.parameters, None, f"the parameters of slice {i}{module}"
        for source in output_slice.sources:
            yield source.parameters, source.model, f"the parameters of model '{source.model}' in slice {i}{module}"


def _name_problems(parameters, model) -> Iterator[str]:
    for name in parameters or {}:
        where = f" for model '{model}'" if model is not None else ""
        if name in TOOL_NAMES:
            once.warn(
                ("tool name", name),
                "cabs: ignoring parameter '%s'%s: mergekit's tools (mergekit-evolve) add it to every "
                "configuration, and cabs has no such setting",
                name, where,
            )
        elif name not in ALL_NAMES:
            yield f"cabs: unknown parameter '{name}'{where}; cabs takes {', '.join(ALL_NAMES)}"
        elif model is not None and name in SHARED_NAMES:
            yield (f"cabs: '{name}' is shared by all models, so it cannot be set{where}; "
                   "put it under the top-level (or a slice's) `parameters:`")


def name_problems(config) -> Iterator[str]:
    """One message per parameter name cabs does not know, or shared one set
    per model, in a mergekit `MergeConfiguration`, in YAML order; names
    mergekit's tools inject (`TOOL_NAMES`) are ignored with a note."""
    for parameters, model, _ in _places(config):
        yield from _name_problems(parameters, model)


def _is_list(setting: Any) -> bool:
    """A gradient: a list of plain values, bare or as a filter's value."""
    if isinstance(setting, (list, tuple)):
        return any(_is_list(s) for s in setting) if any(hasattr(s, "value") for s in setting) else True
    return hasattr(setting, "value") and _is_list(setting.value)


def list_settings(config) -> list[str]:
    """'name' in where, for every `ONE_VALUE_NAMES` setting given as a list."""
    return [
        f"'{name}' in {where}"
        for parameters, model, where in _places(config) if model is None
        for name, setting in (parameters or {}).items()
        if name in ONE_VALUE_NAMES and _is_list(setting)
    ]


LIST_ADVICE = ("one value; mergekit reads a list as a gradient and picks one entry per layer "
               "(the first entry for the first layers, the last for the last)")


def check_parameter_names(config) -> None:
    """Refuse parameter names cabs does not know, and shared ones set per model,
    in a mergekit `MergeConfiguration`; names mergekit's tools inject
    (`TOOL_NAMES`) are ignored with a note.  A one-value setting
    (`ONE_VALUE_NAMES`) given as a list is merged as mergekit resolves it, with
    one warning per merge.

    mergekit looks up only the names a method declares, so `densty: 0.5` or a
    `block_size` under one model would otherwise be ignored without a word.
    """
    for problem in name_problems(config):
        raise CabsConfigError(problem)
    found = list_settings(config)
    if found:
        once.warn(
            ("list settings", tuple(found)),
            "cabs: %s %s %s; merging that way. Give one value (or `filter:` entries) instead.",
            " and ".join(found), "takes" if len(found) == 1 else "each take", LIST_ADVICE,
        )
