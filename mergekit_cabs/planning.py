"""A cabs configuration as mergekit plans it: load and check the YAML, plan
the merge, read the planned tensors one at a time.

Used by analyze, tune and check; mergekit's planner and executor are reached
through `_mergekit`, so filters, gradients, slices and ``dtype:`` resolve
exactly as in ``mergekit-yaml``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_cabs import _mergekit
from mergekit_cabs.params import ALT_NAME, NAME, CabsError, Resolved, check_parameter_names


class PlanError(CabsError):
    """The configuration or a model cannot be planned; the message says why."""


def _method_names() -> tuple[str, ...]:
    """The merge_method names that mean this package's cabs here."""
    import mergekit.merge_methods  # noqa: F401  (registers cabs, through the autoload hook)

    from mergekit_cabs import method

    method.install()
    return tuple(sorted(method.names, key=lambda n: n != NAME)) or (ALT_NAME,)


def read_documents(path: Path) -> list:
    """Every YAML document in `path` (a mergekit-multi file holds several;
    PlanError naming the file when it cannot be read)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as stream:  # a stream: YAML errors name the file
            return list(yaml.safe_load_all(stream))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise PlanError(f"cannot read {path} as YAML: {error}") from None


def read_yaml(path: Path) -> dict:
    """The YAML mapping in `path` (PlanError naming the file otherwise)."""
    documents = read_documents(path)
    if len(documents) > 1:
        raise PlanError(f"{path} holds {len(documents)} YAML documents (a mergekit-multi file?); give one "
                        "configuration (`mergekit-cabs check` checks a whole mergekit-multi file)")
    data = documents[0] if documents else None
    if not isinstance(data, dict):
        raise PlanError(f"{path} is not a mergekit configuration (a YAML mapping with merge_method:, models: ...)")
    return data


def load_config(path: Path, command: str = "analyze"):
    """Parse a mergekit YAML and check that it is a cabs configuration.

    Raises PlanError naming the file, the parameter or the model at fault;
    `command` names who reads it ("analyze reads cabs configurations").
    """
    from mergekit.config import MergeConfiguration

    data = read_yaml(path)
    method = data.get("merge_method")
    names = _method_names()
    if method not in names:
        raise PlanError(
            f"{path} has merge_method: {method!r}; {command} reads cabs configurations "
            f"(merge_method: {names[0]})"
        )
    try:
        config = MergeConfiguration.model_validate(data)
    except (ValueError, RuntimeError, TypeError) as error:
        raise PlanError(f"{path} is not a valid mergekit configuration: {error}") from None
    if config.base_model is None:
        raise PlanError(f"{path} has no base_model:; cabs needs one (task vectors are differences from it)")
    check_parameter_names(config)
    return config


def looks_local(path: str) -> bool:
    """Whether a model path can only mean a directory here (not a hub id)."""
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or "\\" in path


def model_label(model, base: bool = False) -> str:
    """How errors name a model: "model 'ft2' (/models/ft2)", or "the base
    model 'base' (...)" with `base`; the path alone when it is a bare name."""
    text = str(model)
    short = os.path.basename(text.rstrip("/\\")) or text
    return f"{'the base model' if base else 'model'} '{short}'" + (f" ({text})" if short != text else "")


def model_problem(model, trust_remote_code: bool = False) -> str | None:
    """Why a model cannot be read (no directory, no readable config.json), or None."""
    path = model.model.path
    if not os.path.isdir(path) and (looks_local(path) or os.path.exists(path)):
        return f"model '{model}' not found: there is no directory {os.path.abspath(os.path.expanduser(path))}"
    try:
        model.config(trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:  # what transformers/hub raise
        return f"cannot read model '{model}': {' '.join(str(error).split())}"
    return None


def check_models(config, trust_remote_code: bool = False) -> None:
    """Every model the configuration names must be readable (its config.json),
    and a full model: a LoRA reference (``model+adapter``) is refused, saying
    how to merge the adapter first."""
    for model in sorted(config.referenced_models(), key=str):
        if model.lora is not None:
            raise PlanError(
                f"model '{model}' is {model.model} with the LoRA adapter {model.lora}; analyze and tune read full "
                "models only: merge the adapter first (peft: PeftModel.from_pretrained(model, adapter)"
                ".merge_and_unload().save_pretrained(DIR)) and name DIR in the YAML instead"
            )
        problem = model_problem(model, trust_remote_code)
        if problem:
            raise PlanError(problem)


@dataclass
class PlannedTensor:
    """One output tensor as mergekit plans it, with its resolved cabs parameters."""

    order: int
    name: str
    task: Any  # the merge task (_mergekit.PlannedTask.task), for `_mergekit.execute`
    inputs: Any  # the task that loads its input tensors
    base: Any  # ModelReference of the base
    models: list[Any]  # ModelReference of the fine-tunes, priority order
    resolved: Resolved
    save_dtype: str | None = None  # what mergekit-yaml casts the result to when writing


@contextlib.contextmanager
def quiet_cabs_log():
    """The merge's one-line overlap warnings: the reports list those cases themselves."""
    log = logging.getLogger("mergekit_cabs")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def plan_tasks(config, options=None) -> list[tuple[_mergekit.PlannedTask, str | None]]:
    """(task, dtype mergekit-yaml writes it in) for every tensor a merge of
    `config` would write, from mergekit's own planner (on a copy of `config`);
    PlanError when mergekit cannot plan it."""
    from mergekit.options import MergeOptions

    _method_names()  # cabs registered, wrappers in place
    options = options or MergeOptions(quiet=True)
    config = config.model_copy(deep=True)  # the planner normalises it in place
    try:
        with quiet_cabs_log():
            return _mergekit.plan_config(config, options)
    except CabsError:
        raise
    except (ValueError, RuntimeError, OSError, KeyError) as error:
        raise PlanError(f"mergekit cannot plan this merge: {error}") from None
    except AttributeError as error:  # a mergekit release that changed an internal
        raise PlanError(f"this mergekit is not one mergekit-cabs can plan with ({error}); "
                        "mergekit-cabs works with mergekit 0.1.x") from None


def plan(config, options=None, *, shapes: bool = True) -> list[PlannedTensor]:
    """The tensors `mergekit-yaml` would merge, with their parameters.

    Runs mergekit's own planner on a copy of `config`, so filters, gradients
    and slices resolve exactly as in a merge; reads only the models' configs,
    tensor indexes and checkpoint headers.  With `shapes`, a tensor a model
    lacks or has in another shape than the base is a PlanError
    (`require_shapes`).
    """
    from mergekit_cabs.method import resolve_planned

    planned = []
    for order, (task, save_dtype) in enumerate(plan_tasks(config, options)):
        with quiet_cabs_log():
            resolved = resolve_planned(task)
        planned.append(PlannedTensor(order, task.name, task.task, task.inputs, task.base, list(task.models),
                                     resolved, save_dtype))
    if shapes:
        require_shapes(planned)
    return planned


# --- shapes, from the checkpoint headers ---------------------------------------------


def file_shapes(file: str) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a checkpoint file without reading a tensor: the
    safetensors header, or a memory map of a torch pickle; {} when the file
    cannot be read that way (reading the tensors will say why)."""
    try:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as handle:
                return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
        import torch

        state = torch.load(file, mmap=True, weights_only=True, map_location="cpu")
        return {name: tuple(t.shape) for name, t in state.items() if hasattr(t, "shape")}
    except Exception:  # noqa: BLE001 (unknown shapes: the read that follows names the problem)
        return {}


VOCABULARY_HINT = " (another vocabulary: mergekit aligns them with tokenizer_source: union or base)"


def _input_problems(p: PlannedTensor, headers: dict[str, dict], skip: Collection[str]) -> list[str]:
    """What is wrong with the inputs of one planned tensor (see `check_shapes`)."""
    sources = {s.model: s for s in _mergekit.input_tensors(p.inputs) or () if s.model.model.path not in skip}
    base = sources.get(p.base)
    if base is None:
        return []
    if base.missing:
        return [] if base.optional else [f"{model_label(p.base, base=True)} has no tensor {base.name}"]

    def shape(source):
        if source.file not in headers:
            headers[source.file] = file_shapes(source.file)
        return headers[source.file].get(source.name)

    base_shape, out = shape(base) if base.file else None, []
    for model in p.models:
        s = sources.get(model)
        if s is None or (s.missing and s.optional):
            continue
        if s.missing:
            out.append(f"{model_label(model)} has no tensor {s.name} (the base has it)")
        elif s.file and base_shape is not None and (found := shape(s)) is not None and found != base_shape:
            hint = VOCABULARY_HINT if s.vocabulary else ""
            out.append(f"{model_label(model)}: tensor {s.name} has shape {found}, the base has {base_shape}{hint}")
    return out


def check_shapes(planned: Sequence[PlannedTensor], skip: Collection[str] = ()) -> list[str]:
    """One line per problem, in plan order: a tensor mergekit needs that a
    model lacks, or a fine-tune's tensor shaped unlike the base's.  From the
    models' tensor indexes and checkpoint headers: no tensor is read.  Inputs
    mergekit builds otherwise (tokenizer_source embeddings, checkpoint
    conversions), and models whose path is in `skip`, are not checked.  Empty
    when every input fits."""
    problems: list[str] = []
    headers: dict[str, dict] = {}
    for p in planned:
        problems += [line for line in _input_problems(p, headers, skip) if line not in problems]
    return problems


def require_shapes(planned: Sequence[PlannedTensor]) -> None:
    """`check_shapes` as a PlanError: its first line, and how many more."""
    problems = check_shapes(planned)
    if problems:
        more = f" ({len(problems) - 1} more: mergekit-cabs check lists them all)" if len(problems) > 1 else ""
        raise PlanError(f"{problems[0]}{more}; cabs needs every fine-tune to have the base's tensors, "
                        "in the base's shapes")


def read_tensors(planned: Sequence[PlannedTensor], progress: bool = True) -> Iterator[tuple[PlannedTensor, dict]]:
    """(planned tensor, {model: tensor}) one tensor at a time, in mergekit's
    reading order, through its executor (inputs are dropped once used)."""
    import tqdm

    by_input: dict[Any, list[PlannedTensor]] = {}
    for p in planned:
        by_input.setdefault(p.inputs, []).append(p)
    if not by_input:
        return
    with tqdm.tqdm(total=len(planned), desc="Reading tensors", unit="tensor", disable=not progress) as bar:
        for task, tensors in _mergekit.execute(list(by_input)):
            for p in by_input[task]:
                yield p, tensors
                bar.update(1)


def fine_tunes(planned: Sequence[PlannedTensor]) -> list:
    """Every fine-tuned model of the plan, in first-seen (priority) order."""
    found: list = []
    for p in planned:
        found += [m for m in p.models if m not in found]
    return found
