"""`mergekit-cabs check`: every check a merge would run, without reading a tensor.

For one mergekit YAML, or each stage of a mergekit-multi file (several YAML
documents with `name:`; recognised by its content): the merge method's name,
the configuration's form, the cabs parameter names, the models (local
directories and their config.json), then mergekit's own plan of the merge
with every planned tensor's cabs parameters, and the shapes of the tensors
each model would give, from the safetensors headers.  Every problem found is
one line, `FILE: [stage N 'name': ]problem`; notes say what could not be
checked (a hub model id, for one: check works offline).

A stage that uses another stage's output is planned with that stage's base
model standing in for it (mergekit-multi writes it only when stage 1 runs);
the shapes of the stand-in are not compared.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_cabs import _mergekit, planning
from mergekit_cabs.params import LIST_ADVICE, CabsError, list_settings, name_problems


@dataclass
class Findings:
    """What check found, in order: (is it a problem, the line)."""

    lines: list[tuple[bool, str]] = field(default_factory=list)
    tensors: int = 0  # planned tensors, over every stage

    @property
    def problems(self) -> list[str]:
        return [line for is_problem, line in self.lines if is_problem]

    def summary(self, source) -> str:
        """The closing line: how many problems, or OK."""
        count = len(self.problems)
        if count:
            return f"{source}: {count} problem{'s' if count > 1 else ''}"
        return f"{source}: OK" + (f"; {self.tensors} tensors planned" if self.tensors else
                                  " as far as checked (see the notes)")


@dataclass
class Out:
    """Where one configuration's findings go, and the prefix of its lines."""

    findings: Findings
    where: str  # "cabs.yml: " or "multi.yml: stage 2 'final': "
    relabel: dict[str, str] = field(default_factory=dict)  # stand-in path -> what the YAML says

    def problem(self, text: str) -> None:
        self.findings.lines.append((True, self.where + self._one_line(text)))

    def note(self, text: str) -> None:
        self.findings.lines.append((False, self.where + "note: " + self._one_line(text)))

    def _one_line(self, text: str) -> str:
        for path, label in sorted(self.relabel.items(), key=lambda item: -len(item[0])):
            text = text.replace(path, label)
        return " ".join(text.split())


def check_file(path: Path) -> Findings:
    """Check a mergekit YAML or a mergekit-multi file; every problem found."""
    findings = Findings()
    out = Out(findings, f"{path}: ")
    try:
        documents = planning.read_documents(path)
    except CabsError as error:
        out.problem(str(error))
        return findings
    if len(documents) > 1 or any(isinstance(d, dict) and "name" in d for d in documents):
        check_stages(documents, out)
    elif not documents or not isinstance(documents[0], dict):
        out.problem("not a mergekit configuration (a YAML mapping with merge_method:, models: ...)")
    else:
        check_document(documents[0], out)
    return findings


# --- one configuration -------------------------------------------------------------------


def check_document(doc: dict, out: Out, stand_ins: dict[str, str | None] | None = None) -> None:
    """Check one configuration; `stand_ins` maps the names of mergekit-multi
    stages to a model that stands in for their output (None: none does)."""
    from mergekit_cabs import method as cabs

    stand_ins = stand_ins or {}
    name = doc.get("merge_method")
    problem = method_problem(name)
    if problem:
        out.problem(problem)
    config = validate(doc, out, skip_method=problem is not None)
    if config is None:
        return
    is_cabs = isinstance(name, str) and cabs.is_ours(name)
    if problem and isinstance(name, str) and cabs.is_ours(name.lower()):  # CABS: checked as what it means
        config, is_cabs = config.model_copy(update={"merge_method": name.lower()}), True
    if is_cabs:
        check_cabs_settings(config, out)
    if not check_models(config, out, stand_ins):
        return
    if not is_cabs:
        if problem is None:
            out.note(f"merge_method {name!r}: models checked; parameters and shapes are checked for cabs only")
        return
    if config.base_model is not None:
        check_plan(config, out, stand_ins)


def method_problem(name: Any) -> str | None:
    """Why `name` is not a merge method mergekit knows (with close names), or None."""
    from mergekit.merge_methods import registered_methods

    from mergekit_cabs import method as cabs

    cabs.install()
    names = sorted(m.spec.name for m in registered_methods())
    if name is None:
        return "no merge_method: (for CABS: merge_method: cabs)"
    if not isinstance(name, str):
        return f"merge_method is {name!r}; it must be the name of a merge method, such as cabs"
    if name in names:
        return None
    close = [n for n in names if n.lower() == name.lower()] or difflib.get_close_matches(name, names, n=3)
    hint = f"did you mean {' or '.join(map(repr, close))}?" if close else f"mergekit has {', '.join(names)}"
    return f"merge_method {name!r} is not a mergekit method; {hint}"


_UNION_BRANCH = re.compile(r"^[A-Z]|\[|^(bool|int|float|str)$")


def validate(doc: dict, out: Out, skip_method: bool = False):
    """The MergeConfiguration of `doc`, or None after one line per problem."""
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    try:
        return MergeConfiguration.model_validate(doc)
    except ValidationError as error:
        seen: dict[tuple, list] = {}
        for e in error.errors():
            loc = []
            for part in e["loc"]:  # up to the first branch of a union: one line per place
                if isinstance(part, str) and _UNION_BRANCH.search(part):
                    break
                loc.append(part)
            seen.setdefault(tuple(loc), []).append(e)
        for loc, errors in seen.items():
            if skip_method and loc[:1] == ("merge_method",):
                continue
            what = errors[0]["msg"] if len(errors) == 1 else "not a form mergekit takes"
            got = f" (got {errors[0]['input']!r})" if errors[0]["type"] != "missing" else ""
            out.problem(f"{_place(loc)}: {what}{got}")
    except (ValueError, RuntimeError, TypeError) as error:
        out.problem(f"not a valid mergekit configuration: {error}")
    return None


def _place(loc: Iterable) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "the configuration"


def check_cabs_settings(config, out: Out) -> None:
    """base_model, parameter names, one-value settings given as lists."""
    if config.base_model is None:
        out.problem("no base_model:; cabs needs one (task vectors are differences from it)")
    with planning.quiet_cabs_log():  # notes on mergekit-evolve's names: harmless here
        for problem in name_problems(config):
            out.problem(problem)
    for found in list_settings(config):
        out.problem(f"cabs: {found} takes {LIST_ADVICE}")


# --- models ------------------------------------------------------------------------------


def model_places(config) -> list[tuple[str, Any]]:
    """(where in the YAML, ModelReference) for every model, each model once."""
    places: list[tuple[str, Any]] = [("base_model", config.base_model)]
    places += _entry_places("", config.models, config.slices)
    for key, module in (config.modules or {}).items():
        places += _entry_places(f"modules.{key}.", module.models, module.slices)
    source = config.tokenizer_source
    places.append(("tokenizer_source", source if hasattr(source, "model") else None))
    found: dict = {}
    for where, model in places:
        if model is not None and model not in found:
            found[model] = where
    return [(where, model) for model, where in found.items()]


def _entry_places(prefix: str, models, slices) -> list[tuple[str, Any]]:
    places = [(f"{prefix}models[{i}]", entry.model) for i, entry in enumerate(models or ())]
    for i, output_slice in enumerate(slices or ()):
        places.append((f"{prefix}slices[{i}].base_model", output_slice.base_model))
        places += [(f"{prefix}slices[{i}].sources[{j}]", s.model) for j, s in enumerate(output_slice.sources)]
    return places


def check_models(config, out: Out, stand_ins: dict[str, str | None]) -> bool:
    """Every local model is there with its config.json; True when the merge
    can be planned here (every model local, or the output of a stage)."""
    plannable, hub = True, []
    for where, model in model_places(config):
        path = model.model.path
        if path in stand_ins:
            continue
        if os.path.isdir(path) or planning.looks_local(path) or os.path.exists(path):
            problem = planning.model_problem(model)
            if problem:
                out.problem(f"{where}: {problem}")
                plannable = False
        else:
            hub.append(f"{where} '{path}'")
    if hub:
        one = len(hub) == 1
        out.note(f"{', '.join(hub)}: no director{'y' if one else 'ies'} here, so taken as Hugging Face model "
                 f"id{'' if one else 's'}, which check does not download; parameter values and tensor shapes are "
                 "checked only with every model's files at hand")
    if not plannable:
        out.note("parameter values on each tensor and tensor shapes are checked once every model can be read")
    return plannable and not hub


# --- the plan: parameter values, tensors, shapes ----------------------------------------------


def check_plan(config, out: Out, stand_ins: dict[str, str | None]) -> None:
    """Plan the merge as mergekit would, check every planned tensor's cabs
    parameters and its inputs' shapes."""
    from mergekit_cabs import method as cabs

    config, standing_in = with_stand_ins(config, out, stand_ins)
    if config is None:
        return
    try:
        with cabs.deferred_checks(), planning.quiet_cabs_log():
            tasks = [task for task, _ in planning.plan_tasks(config)]
    except CabsError as error:
        out.problem(str(error))
        return
    out.findings.tensors += len(tasks)
    failed: dict[str, list[tuple[str, str]]] = {}  # one line per problem, however many tensors have it
    for task in tasks:
        for problem in cabs.planned_problems(task):
            failed.setdefault(problem.replace(f" on tensor '{task.name}'", ""), []).append((problem, task.name))
    for key, found in failed.items():
        first_message, first_tensor = found[0]
        out.problem(first_message if len(found) == 1 else f"{key} (on {_tensors(len(found))}, the first "
                    f"'{first_tensor}')")
    check_shapes(tasks, out, skip=standing_in)


def with_stand_ins(config, out: Out, stand_ins: dict[str, str | None]):
    """(`config` with a stand-in for every stage output it uses, the stand-in
    paths), or (None, ...) after a note when a stage has none."""
    used = [n for n in stand_ins if any(m.model.path == n for m in config.referenced_models())]
    missing = [n for n in used if stand_ins[n] is None]
    if missing:
        out.note(f"not planned: no model can stand in for the output of stage {missing[0]!r}")
        return None, set()
    # A path of its own per stand-in (the same directory), so that a stand-in
    # is never taken for the base model it points at.
    paths = {n: os.path.join(stand_ins[n], *["."] * (i + 1)) for i, n in enumerate(used)}
    for n in used:
        out.note(f"'{n}' is the output of stage '{n}'; planned with {stand_ins[n]} in its place, and its tensor "
                 "shapes are not compared")
        out.relabel[paths[n]] = n
    config, _ = _mergekit.replace_models(config, paths)
    return config, set(paths.values())


def check_shapes(tasks, out: Out, skip: set[str]) -> None:
    """Every model has every tensor the merge reads, shaped like the base's
    (`planning.check_shapes`): one line per model, its first problem and how
    many more it has."""
    aligned = sum(1 for task in tasks if not _mergekit.plain_loads(task.inputs))
    labels = {planning.model_label(m, m == t.base) + end: str(m)
              for t in tasks for m in (t.base, *t.models) for end in (":", " ")}
    per_model: dict[str, list[str]] = {}
    for line in planning.check_shapes(tasks, skip):
        model = next((name for label, name in labels.items() if line.startswith(label)), "")
        per_model.setdefault(model, []).append(line)
    for lines in per_model.values():
        out.problem(lines[0] + (f"; and {_more(len(lines) - 1)} like it" if len(lines) > 1 else ""))
    if aligned:
        out.note(f"{aligned} tensors are read through mergekit's vocabulary alignment (tokenizer_source), "
                 "so their shapes are not compared")


def _tensors(count: int) -> str:
    return f"{count} tensor{'s' if count != 1 else ''}"


def _more(count: int) -> str:
    return f"{count} more tensor{'s' if count != 1 else ''}"


# --- mergekit-multi files ----------------------------------------------------------------------


def check_stages(documents: list, out: Out) -> None:
    """Check every stage of a mergekit-multi file up front."""
    stages: dict[Any, dict] = {}
    labels: dict[Any, str] = {}
    for number, doc in enumerate(documents, 1):
        label = f"stage {number}" + (f" {doc.get('name')!r}" if isinstance(doc, dict) and "name" in doc else "")
        if not isinstance(doc, dict):
            out.problem(f"{label}: not a mergekit configuration (a YAML mapping with name:, merge_method: ...)")
            continue
        name = doc.get("name")
        if name in stages:
            out.problem(f"{label}: " + (f"a second stage named {name!r}" if name is not None else
                                        "a second stage without name: (mergekit-multi takes one final merge)"))
            continue
        stages[name] = {k: v for k, v in doc.items() if k != "name"}
        labels[name] = label
    stand_ins = {name: stand_in(name, stages) for name in stages if name is not None}
    _check_cycles(stages, stand_ins, labels, out)
    for name, doc in stages.items():
        check_document(doc, Out(out.findings, f"{out.where}{labels[name]}: "), stand_ins)


def _model_paths(doc: dict) -> list[str]:
    """The model paths a stage's YAML names, the base first (as written)."""
    from mergekit.config import MergeConfiguration

    try:
        config = MergeConfiguration.model_validate(doc)
    except (ValueError, RuntimeError, TypeError):
        return []
    return [m.model.path for _, m in model_places(config)]


def stand_in(name: str, stages: dict[Any, dict], seen: frozenset = frozenset()) -> str | None:
    """A local model that stands in for the output of stage `name`: its base
    model (or first model), followed through other stages; None if none."""
    paths = _model_paths(stages[name])
    if not paths or name in seen:
        return None
    first = paths[0]
    if first in stages and first is not None:
        return stand_in(first, stages, seen | {name})
    return first if os.path.isdir(first) else None


def _check_cycles(stages: dict[Any, dict], stand_ins: dict, labels: dict, out: Out) -> None:
    uses = {name: {p for p in _model_paths(doc) if p in stand_ins} for name, doc in stages.items()}

    def reaches(start, goal, seen=()):
        return any(u == goal or (u not in seen and reaches(u, goal, (*seen, u))) for u in uses.get(start, ()))

    for name in stages:
        if name is not None and reaches(name, name):
            out.problem(f"{labels[name]}: uses its own output, through the stages it uses (mergekit-multi refuses "
                        "circular stages)")
