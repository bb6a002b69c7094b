"""Every use of a mergekit internal, in one place.

mergekit 0.1.5 has no plugin hooks, so the package leans on a few of its
internals; nothing outside this module reaches past mergekit's public API
(``mergekit.merge_methods``, ``MergeConfiguration``, ``MergeOptions``,
``ModelReference``, ``run_merge``).  `REQUIREMENTS` lists every internal
name and signature used here, and `problems()` says which of them a
mergekit lacks (the project's tests check that list, so a mergekit release
that changes one fails that one test).

What this module does with them:

* two wrappers, installed once per process: ``ConfigReader.parameter_sources``
  (check a cabs configuration's parameter names the first time mergekit reads
  it) and ``ExecuteMergeMethodTask.__init__`` (check each planned cabs tensor's
  parameters while mergekit plans, before anything is merged).  Both act only
  when the configuration or task names one of our methods, read mergekit's
  attributes defensively, and on anything unexpected leave mergekit to its own
  behaviour and say so in one ``mergekit-cabs:`` line (an error under
  ``MERGEKIT_CABS_STRICT=1``).  Errors in the user's configuration
  (`CabsError`) are raised as such.
* `CheckedGroupMethod`: ``_bind_parameters`` runs a check on every group of a
  ``merge_tensors`` call before the first is merged.
* planning and executing a configuration the way ``mergekit-yaml`` does
  (`plan_config`, `execute`), for analyze, tune and check; where each
  planned input tensor is stored (`input_tensors`, from the models' tensor
  indexes), so shapes can be checked from file headers before anything is
  read; and mergekit-multi's references to other stages (`replace_models`),
  for check.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from mergekit_cabs.params import CabsError

STRICT_ENV = "MERGEKIT_CABS_STRICT"

# The attributes the wrappers read, by name; a release that renames one makes
# them fall back.
CONFIG_ATTR = "config"  # ConfigReader.config
METHOD_ATTR = "merge_method"  # MergeConfiguration.merge_method
TASK_METHOD_ATTR = "method_name"  # ExecuteMergeMethodTask.method_name


@dataclass(frozen=True)
class Requirement:
    """A mergekit name this package uses: `params` are the leading parameter
    names of a callable, `fields` the attributes instances carry."""

    module: str
    name: str
    params: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()

    def problem(self) -> str | None:
        """None when mergekit has it as described, else what is wrong."""
        where = f"{self.module}.{self.name}"
        try:
            value: Any = importlib.import_module(self.module)
            for part in self.name.split("."):
                value = getattr(value, part)
        except (ImportError, AttributeError) as error:
            return f"{where} is missing ({error})"
        if self.params:
            try:
                names = tuple(inspect.signature(value).parameters)
            except (TypeError, ValueError) as error:
                return f"{where} has no signature ({error})"
            if names[: len(self.params)] != self.params:
                return f"{where} takes {names}, expected {self.params} first"
        known = set(getattr(value, "model_fields", None) or getattr(value, "__dataclass_fields__", None) or ())
        lost = [f for f in self.fields if f not in known]
        return f"{where} has no field(s) {', '.join(lost)}" if lost else None


REQUIREMENTS = (
    Requirement("mergekit.config", "ConfigReader", fields=("config",)),
    Requirement("mergekit.config", "ConfigReader.parameter_sources", params=("self", "model")),
    Requirement("mergekit.config", "MergeConfiguration", fields=("merge_method", "parameters", "models", "slices",
                                                                 "modules", "base_model")),
    Requirement("mergekit.merge_methods.task_adapter", "ExecuteMergeMethodTask",
                fields=("method_name", "gather_tensors", "model_order", "base_model", "output_weight",
                        "parameters", "input_parameters")),
    Requirement("mergekit.merge_methods.task_adapter", "ExecuteMergeMethodTask.__init__", params=("self", "data")),
    Requirement("mergekit.merge_methods.base", "MergeMethod._bind_parameters",
                params=("self", "groups", "parameters")),
    Requirement("mergekit.merge_methods.base", "ParameterSpec",
                params=("name", "value_type", "scope", "default", "description")),
    Requirement("mergekit.merge", "_model_out_config", params=("config", "arch_info", "trust_remote_code")),
    Requirement("mergekit.architecture", "get_architecture_info", params=("config", "options")),
    Requirement("mergekit.plan", "MergePlanner.__init__",
                params=("self", "config", "arch_info", "options", "out_model_config")),
    Requirement("mergekit.plan", "MergePlanner.plan_to_disk", params=("self", "out_path")),
    Requirement("mergekit.io.tasks", "LoaderCache.setup", params=("self", "options")),
    Requirement("mergekit.io.tasks", "LoaderCache.get", params=("self", "model")),
    Requirement("mergekit.io.tasks", "LoaderCache.flush_all", params=("self",)),
    Requirement("mergekit.io.tasks", "SaveTensor", fields=("tensor_task", "dtype")),
    Requirement("mergekit.graph", "Executor.__init__", params=("self", "targets", "math_device", "storage_device")),
    Requirement("mergekit.graph", "Executor.run", params=("self", "quiet")),
    Requirement("mergekit.common", "dtype_from_name", params=("name",)),
    Requirement("mergekit.io.tasks", "GatherTensors", fields=("weight_info",)),
    Requirement("mergekit.architecture", "WeightInfo", fields=("name", "optional", "aliases", "tied_names",
                                                                       "vocabulary_axis")),
    Requirement("mergekit.io.lazy_tensor_loader", "LazyTensorLoader.__init__", params=("self", "index")),
    Requirement("mergekit.io.lazy_tensor_loader", "ShardedTensorIndex", fields=("base_path", "tensor_paths")),
    Requirement("mergekit.architecture.conversion", "can_convert_checkpoint_keys",
                params=("model_type", "source_keys", "target_key")),
    Requirement("mergekit.merge_methods.generalized_task_arithmetic", "GeneralizedTaskArithmeticMerge.merge_group",
                params=("self", "group")),
    Requirement("transformers.trainer_utils", "set_seed", params=("seed",)),
)


def problems() -> list[str]:
    """What this mergekit lacks of `REQUIREMENTS` (empty when all is there)."""
    return [p for p in (r.problem() for r in REQUIREMENTS) if p]


_said: set = set()


def fall_back(what: str, error: BaseException | str) -> None:
    """Say once per process that a check is skipped and mergekit goes on alone;
    raise instead under MERGEKIT_CABS_STRICT=1."""
    if os.environ.get(STRICT_ENV) == "1":
        if isinstance(error, BaseException):
            raise error
        raise RuntimeError(f"mergekit-cabs: {what}: {error}")
    detail = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
    line = (f"mergekit-cabs: {what} ({detail}); this mergekit differs from the one mergekit-cabs knows, so "
            f"mergekit goes on with its own behaviour there. Set {STRICT_ENV}=1 to raise instead.")
    if line not in _said:
        _said.add(line)
        sys.stderr.write(line + "\n")


# --- the planned tensor, read defensively ------------------------------------------


@dataclass(frozen=True)
class PlannedTask:
    """What cabs needs of one of mergekit's per-tensor merge tasks."""

    name: str  # output tensor
    base: Any  # ModelReference
    models: tuple  # the fine-tunes, priority order
    shared: dict  # resolved shared parameters
    per_model: dict  # ModelReference -> resolved per-model parameters
    inputs: Any  # the task that loads the input tensors
    task: Any  # mergekit's ExecuteMergeMethodTask itself


def planned_task(task) -> PlannedTask:
    """Read a mergekit ExecuteMergeMethodTask (AttributeError when it changed)."""
    base = task.base_model
    models = tuple(m for m in task.model_order if m != base)
    return PlannedTask(
        name=task.output_weight.name,
        base=base,
        models=models,
        shared=dict(task.parameters.items()),
        per_model={m: dict(task.input_parameters[m].items()) for m in models},
        inputs=task.gather_tensors,
        task=task,
    )


# --- the two wrappers ------------------------------------------------------------


def _config_method(reader) -> tuple[Any, str | None]:
    """(configuration, its merge_method) of a ConfigReader, or (None, None)."""
    config = getattr(reader, CONFIG_ATTR, None)
    method = getattr(config, METHOD_ATTR, None)
    if config is None or method is None:
        fall_back(f"cannot read ConfigReader.{CONFIG_ATTR}.{METHOD_ATTR}; cabs parameter names are not checked",
                  "attribute missing")
        return None, None
    return config, method if isinstance(method, str) else None


def _wrap(module: str, owner: str, attribute: str, make: Callable[[Any], Any], missing: str) -> None:
    """Replace `owner.attribute` (a class in mergekit's `module`) by
    `make(original)`, once per process; if it is not there, fall back."""
    try:
        cls = getattr(importlib.import_module(module), owner)
        original = getattr(cls, attribute)
    except (ImportError, AttributeError) as error:
        fall_back(missing, error)
        return
    if not getattr(original, "_cabs_wrapped", False):
        wrapper = make(original)
        wrapper._cabs_wrapped = True
        setattr(cls, attribute, wrapper)


def wrap_config_reader(is_ours: Callable[[str], bool], check_config: Callable[[Any], None]) -> None:
    """Run `check_config(config)` the first time mergekit reads the parameters
    of a configuration whose merge_method `is_ours`."""
    checked = []  # the last configuration checked (one merge at a time)

    def make(original):
        def parameter_sources(self, model=None):
            config, method = _config_method(self)
            if method is not None and is_ours(method) and not (checked and checked[0] is config):
                try:
                    check_config(config)
                except CabsError:
                    raise  # the user's configuration is at fault
                except Exception as error:  # noqa: BLE001 (our check, not mergekit, failed)
                    fall_back("checking the cabs parameter names failed", error)
                checked[:] = [config]
            return original(self, model)

        return parameter_sources

    _wrap("mergekit.config", "ConfigReader", "parameter_sources", make, "cabs parameter names are not checked")


def _task_view(task, is_ours: Callable[[str], bool]) -> PlannedTask | None:
    """The planned task when it is one of ours and readable, else None."""
    method = getattr(task, TASK_METHOD_ATTR, None)
    if method is None:
        fall_back(f"cannot read ExecuteMergeMethodTask.{TASK_METHOD_ATTR}; cabs tensors are checked at "
                  "merge time", "attribute missing")
        return None
    if not (isinstance(method, str) and is_ours(method)):
        return None
    try:
        return planned_task(task)
    except Exception as error:  # noqa: BLE001 (mergekit changed: its own checks still run)
        fall_back("cannot read mergekit's planned cabs tensor; it is checked at merge time", error)
        return None


def wrap_task_init(is_ours: Callable[[str], bool], check_task: Callable[[PlannedTask], None]) -> None:
    """Run `check_task` on every per-tensor merge task of one of our methods,
    as mergekit plans it."""

    def make(original):
        def __init__(self, /, **data):
            original(self, **data)
            view = _task_view(self, is_ours)
            if view is not None:
                check_task(view)

        return __init__

    _wrap("mergekit.merge_methods.task_adapter", "ExecuteMergeMethodTask", "__init__", make,
          "cabs parameters are checked at merge time, not while planning")


# --- the method's side ---------------------------------------------------------------


def parameter_specs(parameters: Iterable) -> tuple:
    """mergekit ParameterSpecs for `params.Parameter`s."""
    from mergekit.merge_methods import ParameterScope
    from mergekit.merge_methods.base import ParameterSpec

    return tuple(
        ParameterSpec(p.name, p.type, ParameterScope.SHARED if p.shared else ParameterScope.NON_BASE,
                      default=p.default, description=p.description)
        for p in parameters
    )


def checked_group_method():
    """A GroupMergeMethod base class whose `check_group(group, values)` runs on
    every group of a call before the first group is merged."""
    from mergekit.merge_methods import GroupMergeMethod

    class CheckedGroupMethod(GroupMergeMethod):
        def check_group(self, group, values) -> None:
            """Raise on bad parameters; called with each group's bound values."""

        def _bind_parameters(self, groups, parameters):
            bound = super()._bind_parameters(groups, parameters)
            for group, values in zip(groups, bound):
                self.check_group(group, values)
            return bound

    return CheckedGroupMethod


# --- planning and executing a configuration ---------------------------------------------


def plan_config(config, options) -> list[tuple[PlannedTask, str | None]]:
    """(planned task, dtype mergekit-yaml writes it in) for every tensor a merge
    of `config` would write, from mergekit's own planner.  Reads the models'
    configs and tensor indexes only; `config` is normalised in place."""
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import LoaderCache, SaveTensor
    from mergekit.merge import _model_out_config
    from mergekit.plan import MergePlanner

    arch_info = get_architecture_info(config, options)
    cache = LoaderCache()
    cache.setup(options=options)
    for model in config.referenced_models():
        cache.get(model)
    out_config = _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    # plan_to_disk only builds the task graph; nothing runs or is written
    # unless its tasks are executed.  (plan_in_memory fails in mergekit 0.1.5.)
    planner = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
    tasks = planner.plan_to_disk(out_path=os.devnull)
    return [(planned_task(t.tensor_task), t.dtype) for t in tasks if isinstance(t, SaveTensor)]


@dataclass(frozen=True)
class InputTensor:
    """Where one model's input to a planned tensor is stored."""

    model: Any  # ModelReference
    name: str  # the tensor's name in that model's checkpoint (mergekit's name when it has none)
    file: str | None  # the checkpoint file that holds it; None when missing or converted
    missing: bool  # the model has no such tensor (nor an alias, tied name or conversion of it)
    optional: bool  # mergekit passes the base through when a fine-tune lacks it
    vocabulary: bool = False  # indexed by token ids (embeddings, output head)


def plain_loads(inputs) -> bool:
    """Whether a planned task's `inputs` are tensors loaded as stored (not
    embeddings permuted for tokenizer_source); no file is read."""
    from mergekit.io.tasks import GatherTensors

    return isinstance(inputs, GatherTensors)


def input_tensors(inputs) -> list[InputTensor] | None:
    """Where each model's tensor for a planned merge task's `inputs` lies,
    from the models' tensor indexes (no tensor is read).  None when the
    inputs are not plain loads (embeddings permuted for tokenizer_source)."""
    from mergekit.architecture.conversion import can_convert_checkpoint_keys
    from mergekit.io.tasks import LoaderCache

    if not plain_loads(inputs):
        return None
    found = []
    for model, info in inputs.weight_info.items():
        index = LoaderCache().get(model).index
        names = [info.name, *(info.aliases or ()), *(info.tied_names or ())]
        vocabulary = getattr(info, "vocabulary_axis", None) is not None
        name = next((n for n in names if n in index.tensor_paths), None)
        if name is not None:
            file = os.path.join(index.base_path, index.tensor_paths[name])
            found.append(InputTensor(model, name, file, False, bool(info.optional), vocabulary))
            continue
        model_type = getattr(model.config(trust_remote_code=LoaderCache().trust_remote_code), "model_type", None)
        converted = can_convert_checkpoint_keys(model_type, set(index.tensor_paths), info.name)
        found.append(InputTensor(model, info.name, None, not converted, bool(info.optional), vocabulary))
    return found


def execute(targets: list, device: str = "cpu") -> Iterator[tuple[Any, Any]]:
    """(target, value) for mergekit tasks, run by mergekit's executor, which
    drops each input as soon as nothing needs it.  After each target the
    models' open shard files are closed (mergekit reopens them when next
    read): safetensors maps a file, and every page read stays in this
    process's resident memory while the file is open, so keeping all of
    them open would hold every input model in memory by the end.  A model
    file mergekit cannot read (removed since the merge was planned) is one
    `CabsError` naming it."""
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache

    executor = Executor(targets=targets, math_device=device, storage_device=device)
    try:
        for target, value in executor.run(quiet=True):
            yield target, value
            LoaderCache().flush_all()
    except OSError as error:  # a model's file removed or unreadable since it was planned (mergekit reads it now)
        raise CabsError(f"cannot read a model's tensors: {' '.join(str(error).split())}") from None
    finally:
        LoaderCache().flush_all()


@contextlib.contextmanager
def capture_merge_group(method_class, sink: Callable[[Any, dict, Any], None]):
    """Within the block, every `method_class.merge_group` call (a mergekit
    merge method's work on one tensor group) also hands (group, parameters,
    result) to `sink`; the method is restored on leaving."""
    original = method_class.merge_group

    def merge_group(self, group, /, **parameters):
        result = original(self, group, **parameters)
        sink(group, parameters, result)
        return result

    method_class.merge_group = merge_group
    try:
        yield
    finally:
        method_class.merge_group = original


def capture_task_arithmetic(sink: Callable[[Any, Any], None]):
    """Within the block, every merge of mergekit's task arithmetic family
    (task_arithmetic, ties, dare_ties: `GeneralizedTaskArithmeticMerge`) also
    hands (group, result) to `sink`; the group's ``base.tensor`` and
    ``metadata.name`` are what `tune`'s baselines read."""
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge

    return capture_merge_group(GeneralizedTaskArithmeticMerge, lambda group, _, result: sink(group, result))


def seed_random_merges(seed: int) -> None:
    """Seed the draws of mergekit's random merges (dare_ties) as
    ``mergekit-yaml --random-seed`` does before a merge."""
    from transformers.trainer_utils import set_seed

    set_seed(seed)


def dtype_from_name(name: str | None):
    """The torch dtype mergekit means by `name` (None for None)."""
    from mergekit.common import dtype_from_name as convert

    return convert(name)


# --- for `mergekit-cabs check` ---------------------------------------------------------


def replace_models(config, paths: dict[str, str]):
    """(`config` with every model whose path is a key of `paths` at the path
    it maps to, the keys used): how mergekit-multi points a stage at the
    output of another (`mergekit.scripts.multimerge.patched_config`)."""
    from mergekit.common import ModelReference
    from mergekit.config import MergeConfiguration

    used: set[str] = set()

    def moved(ref):
        if ref.model.path not in paths:
            return None
        used.add(ref.model.path)
        return ref.model_copy(update={"model": ref.model.model_copy(update={"path": paths[ref.model.path],
                                                                             "revision": None})})

    def patch(value):
        if isinstance(value, list):
            return [patch(v) for v in value]
        if isinstance(value, dict):
            return {k: patch(v) for k, v in value.items()}
        if isinstance(value, str):  # a ModelReference dumps as its string
            try:
                ref = moved(ModelReference.model_validate(value))
            except ValueError:
                ref = None
            return value if ref is None else ref.model_dump()
        return value

    return MergeConfiguration.model_validate(patch(config.model_dump())), used
