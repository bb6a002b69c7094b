"""The `cabs` merge method for mergekit, and `install()`, which registers it.

Importing this module imports mergekit.  `install()` registers the method
under the name ``cabs`` and under ``mergekit_cabs`` (idempotent); if another
package registered a ``cabs`` first, that one is left alone, said once, and
ours answers to ``mergekit_cabs`` only.  `_autoload` calls `install()` as soon
as mergekit's ``mergekit.merge_methods`` is imported, so plain
``mergekit-yaml`` sees the method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from mergekit.merge_methods import (
    BasePolicy,
    InputContract,
    MergeMethodSpec,
    OptionalTensorPolicy,
    TensorGroup,
    register,
    registered_methods,
)

from mergekit_cabs import _mergekit
from mergekit_cabs.backend import requested_backend
from mergekit_cabs.kernel import NonFiniteInputError, cabs_merge
from mergekit_cabs.params import (
    ALT_NAME,
    NAME,
    PARAMETERS,
    CabsConfigError,
    CabsError,
    Resolved,
    check_parameter_names,
    once,
    resolve,
    resolve_problems,
    warn_short_block_overlap,
)

LOG = logging.getLogger("mergekit_cabs")

SPEC = MergeMethodSpec(
    name=NAME,
    pretty_name="CABS",
    reference_url="https://arxiv.org/abs/2503.01874",
    parameters=_mergekit.parameter_specs(PARAMETERS),
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
    optional_tensor_policy=OptionalTensorPolicy.PASSTHROUGH_BASE_SINGLETON,
)


def _label(model_id: Hashable) -> str:
    return str(model_id)


def resolve_group(group: TensorGroup, parameters: Mapping[str, Any]) -> Resolved:
    """The checked parameters of one group, as mergekit bound them."""
    per_model = [
        (_label(e.id), {k: parameters[k][e.id] for k in ("weight", "density", "n")})
        for e in group.non_base
    ]
    return resolve(parameters, per_model, group.metadata.name)


def _advise_compiled_path(base: torch.Tensor) -> None:
    """Say once per merge when a CPU merge runs the slower pure torch path
    only because numba is missing (not when the user asked for torch)."""
    if base.device.type != "cpu" or requested_backend() != "auto":
        return
    from mergekit_cabs import _numba

    if not _numba.available():
        once.warn(
            "no numba",
            "cabs: numba is not installed, so this CPU merge runs the pure torch path: "
            "the same results, several times slower. For the compiled one: pip install numba",
        )


class CabsMerge(_mergekit.checked_group_method()):
    """Conflict-Aware and Balanced Sparsification, one output tensor at a time."""

    is_mergekit_cabs = True  # how install() tells ours from another package's `cabs`

    def __init__(self, name: str = NAME):
        self.spec = SPEC if name == NAME else dataclasses.replace(SPEC, name=name)

    def validate_inputs(self, input_ids, base_id=None, *, group_name=None) -> None:
        if base_id is None:
            raise ValueError(
                f"{self.spec.name} needs a base model: set `base_model:` in the YAML "
                "(or base_index=/base= in merge_tensors/merge_state_dicts); task "
                "vectors are differences from it"
            )
        super().validate_inputs(input_ids, base_id, group_name=group_name)

    def __call__(self, groups, /, **kwargs):
        once.new_merge()  # merge_tensors / merge_state_dicts: one call, one merge
        return super().__call__(groups, **kwargs)

    def check_group(self, group, values) -> None:
        if group.non_base:
            resolve_group(group, values)

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        if not entries:
            return base
        r = resolve_group(group, parameters)
        if base.numel() == 0:
            return base.clone()
        warn_short_block_overlap(r, base.numel(), group.metadata.name)
        _advise_compiled_path(base)
        quotas, m = r.kernel_quotas(base.numel())
        try:
            return cabs_merge(
                base, [e.tensor for e in entries], r.weights, quotas, m,
                overlap=r.overlap, conflict_aware=r.conflict_aware, lam=r.lam, out_dtype=base.dtype,
            )
        except NonFiniteInputError as error:
            who = "the base model" if error.model is None else f"model '{_label(entries[error.model].id)}'"
            tensor = f" in tensor '{group.metadata.name}'" if group.metadata.name else ""
            raise CabsError(  # a ValueError, as mergekit expects; a one-line error in analyze and tune
                f"cabs: {who} has NaN or infinite values{tensor}; fix or drop that model"
            ) from None


cabs_method = CabsMerge()
alt_method = CabsMerge(ALT_NAME)  # the same method under its second name

# The names our method is registered under in this process (see install()).
names: set[str] = set()


def is_ours(method_name: str) -> bool:
    """Whether a configuration's merge_method is this package's cabs."""
    return method_name in names


def resolve_planned(task: _mergekit.PlannedTask) -> Resolved:
    """The checked parameters of one tensor, as mergekit planned them."""
    per_model = [(_label(m), task.per_model[m]) for m in task.models]
    return resolve(task.shared, per_model, task.name)


def planned_problems(task: _mergekit.PlannedTask) -> list[str]:
    """Every problem with one planned tensor's parameters (`resolve_planned` raises the first)."""
    per_model = [(_label(m), task.per_model[m]) for m in task.models]
    return resolve_problems(task.shared, per_model, task.name)


# While `deferred_checks` is active, planning goes on past bad parameters:
# the caller (`mergekit-cabs check`) collects every problem itself.
_deferred: list = []


@contextlib.contextmanager
def deferred_checks():
    """Within the block, mergekit's planning does not stop at a bad parameter
    name or value; the caller checks what was planned."""
    _deferred.append(True)
    try:
        yield
    finally:
        _deferred.pop()


def check_config(config) -> None:
    """Check a configuration the first time mergekit reads it: a new merge
    (warnings are said once per merge from here on)."""
    once.new_merge()
    if not _deferred:
        check_parameter_names(config)


def check_planned(task: _mergekit.PlannedTask) -> None:
    """Check one planned tensor while mergekit plans (said-once warnings per merge)."""
    once.planning(task.name)
    if not _deferred:
        resolve_planned(task)


def capture_merges(sink):
    """Within the block, every cabs merge also hands (group, parameters, result) to `sink`."""
    return _mergekit.capture_merge_group(CabsMerge, sink)


_foreign_said: list = []


def _register(name: str, method: CabsMerge) -> None:
    existing = {m.spec.name: m for m in registered_methods()}.get(name)
    if existing is None:
        register(method)
    elif not getattr(existing, "is_mergekit_cabs", False):
        names.discard(name)
        if not _foreign_said:
            _foreign_said.append(name)
            sys.stderr.write(
                f"mergekit-cabs: mergekit already has a merge method called '{name}' "
                f"({type(existing).__module__}.{type(existing).__qualname__}); it is left as it is. "
                f"This package's CABS is merge_method: {ALT_NAME}\n"
            )
        return
    names.add(name)


def install() -> None:
    """Register cabs with mergekit (safe to call any number of times)."""
    _register(NAME, cabs_method)
    _register(ALT_NAME, alt_method)
    _mergekit.wrap_task_init(is_ours, check_planned)
    _mergekit.wrap_config_reader(is_ours, check_config)


__all__ = ["CabsConfigError", "CabsMerge", "SPEC", "cabs_method", "install", "is_ours"]

# Importing this module first (before mergekit) reaches mergekit's import from
# here, while this module is still half made; `_autoload` then leaves the
# registration to this line.
install()
