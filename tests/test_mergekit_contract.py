"""What the package relies on in mergekit, and that relying on it cannot hurt
other merge methods.

* `test_every_mergekit_internal_we_rely_on_is_there` is the one test a
  mergekit upgrade that changes an internal we use fails;
* the source checks keep every such use in `_mergekit.py`;
* simulated renames leave task_arithmetic, ties and linear merges working,
  with one `mergekit-cabs:` line;
* a `cabs` registered by someone else first is left alone and ours answers to
  `mergekit_cabs`;
* the names mergekit-evolve injects are accepted with a note.
"""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mergekit_cabs import _mergekit
from mergekit_cabs._numba import COMPILING

from tiny_models import load_output, run_in_process

PACKAGE = Path(__file__).resolve().parent.parent / "mergekit_cabs"

# mergekit's public API: what its docs and README show users.  Anything else
# is an internal and belongs in _mergekit.py (and its REQUIREMENTS).
PUBLIC = {
    "mergekit.merge_methods": None,  # every name it exports (its __all__)
    "mergekit.config": {"MergeConfiguration"},
    "mergekit.options": {"MergeOptions"},
    "mergekit.merge": {"run_merge"},
    "mergekit.common": {"ModelReference"},
}


def test_every_mergekit_internal_we_rely_on_is_there():
    """Each REQUIREMENTS row: the name exists, callables take the parameters we
    pass (by these names, in this order), models carry the fields we read."""
    stated = {(r.module, r.name): (r.params, r.fields) for r in _mergekit.REQUIREMENTS}
    assert stated == {
        ("mergekit.config", "ConfigReader"): ((), ("config",)),
        ("mergekit.config", "ConfigReader.parameter_sources"): (("self", "model"), ()),
        ("mergekit.config", "MergeConfiguration"): (
            (), ("merge_method", "parameters", "models", "slices", "modules", "base_model")),
        ("mergekit.merge_methods.task_adapter", "ExecuteMergeMethodTask"): ((), (
            "method_name", "gather_tensors", "model_order", "base_model", "output_weight", "parameters",
            "input_parameters")),
        ("mergekit.merge_methods.task_adapter", "ExecuteMergeMethodTask.__init__"): (("self", "data"), ()),
        ("mergekit.merge_methods.base", "MergeMethod._bind_parameters"): (("self", "groups", "parameters"), ()),
        ("mergekit.merge_methods.base", "ParameterSpec"): (
            ("name", "value_type", "scope", "default", "description"), ()),
        ("mergekit.merge", "_model_out_config"): (("config", "arch_info", "trust_remote_code"), ()),
        ("mergekit.architecture", "get_architecture_info"): (("config", "options"), ()),
        ("mergekit.plan", "MergePlanner.__init__"): (
            ("self", "config", "arch_info", "options", "out_model_config"), ()),
        ("mergekit.plan", "MergePlanner.plan_to_disk"): (("self", "out_path"), ()),
        ("mergekit.io.tasks", "LoaderCache.setup"): (("self", "options"), ()),
        ("mergekit.io.tasks", "LoaderCache.get"): (("self", "model"), ()),
        ("mergekit.io.tasks", "LoaderCache.flush_all"): (("self",), ()),
        ("mergekit.io.tasks", "SaveTensor"): ((), ("tensor_task", "dtype")),
        ("mergekit.graph", "Executor.__init__"): (("self", "targets", "math_device", "storage_device"), ()),
        ("mergekit.graph", "Executor.run"): (("self", "quiet"), ()),
        ("mergekit.common", "dtype_from_name"): (("name",), ()),
        ("mergekit.io.tasks", "GatherTensors"): ((), ("weight_info",)),
        ("mergekit.architecture", "WeightInfo"): ((), ("name", "optional", "aliases", "tied_names", "vocabulary_axis")),
        ("mergekit.io.lazy_tensor_loader", "LazyTensorLoader.__init__"): (("self", "index"), ()),
        ("mergekit.io.lazy_tensor_loader", "ShardedTensorIndex"): ((), ("base_path", "tensor_paths")),
        ("mergekit.architecture.conversion", "can_convert_checkpoint_keys"): (
            ("model_type", "source_keys", "target_key"), ()),
        # tune's baselines: the merged tensor of ties/dare_ties captured once for a lambda search, and
        # dare_ties's drops seeded as mergekit-yaml --random-seed seeds them
        ("mergekit.merge_methods.generalized_task_arithmetic", "GeneralizedTaskArithmeticMerge.merge_group"): (
            ("self", "group"), ()),
        ("transformers.trainer_utils", "set_seed"): (("seed",), ()),
    }
    assert _mergekit.problems() == []


def test_a_changed_internal_is_reported_by_name():
    """The check above can fail: a requirement mergekit does not meet says what."""
    missing = _mergekit.Requirement("mergekit.graph", "Executor.run_everything")
    renamed = _mergekit.Requirement("mergekit.graph", "Executor.run", params=("self", "silent"))
    no_field = _mergekit.Requirement("mergekit.io.tasks", "SaveTensor", fields=("tensor",))
    assert "Executor.run_everything is missing" in missing.problem()
    assert "expected ('self', 'silent') first" in renamed.problem()
    assert "has no field(s) tensor" in no_field.problem()


def _mergekit_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) for every `from mergekit... import name` and every
    `import mergekit...` (name '') in a source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mergekit") and node.level == 0 \
                and not node.module.startswith("mergekit_cabs"):
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.split(".")[0] == "mergekit"]
    return found


def test_only_the_mergekit_module_reaches_past_the_public_api():
    import mergekit.merge_methods as mm

    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_mergekit.py":
            continue
        for module, name in _mergekit_imports(path):
            public = PUBLIC.get(module, set())
            allowed = set(mm.__all__) if public is None else public
            if name and name not in allowed or not name and module not in PUBLIC:
                offenders.append(f"{path.relative_to(PACKAGE)}: {module}.{name}")
    assert offenders == []


def test_every_internal_the_mergekit_module_imports_is_a_stated_requirement():
    stated = {(r.module, r.name.split(".")[0]) for r in _mergekit.REQUIREMENTS}
    imported = [
        (module, name) for module, name in _mergekit_imports(PACKAGE / "_mergekit.py")
        if name and name not in (PUBLIC.get(module) or set()) and module != "mergekit.merge_methods"
    ]
    assert imported and [i for i in imported if i not in stated] == []


# --- simulated renames ----------------------------------------------------------------


def _merge(family, method: str, out: Path, parameters=None) -> dict:
    base, tunes = family
    config = {
        "merge_method": method, "base_model": str(base.path),
        "models": [{"model": str(t.path), "parameters": dict(parameters or {})} for t in tunes],
        "parameters": {"weight": 0.5}, "dtype": "float32",
    }
    run_in_process(config, out)
    return load_output(out)


RENAMES = [  # (what the wrappers read, the start of the line said)
    ("TASK_METHOD_ATTR", "cannot read ExecuteMergeMethodTask.task_method_attr_renamed"),
    ("CONFIG_ATTR", "cannot read ConfigReader.config_attr_renamed.merge_method"),
    ("METHOD_ATTR", "cannot read ConfigReader.config.method_attr_renamed"),
]


@pytest.mark.parametrize("attribute, said", RENAMES, ids=[r[0] for r in RENAMES])
def test_a_renamed_mergekit_attribute_leaves_other_methods_working(
    attribute, said, fp32_family, tmp_path, monkeypatch, capsys
):
    """As if a mergekit release renamed an attribute the wrappers read: the
    plugin stays installed, task_arithmetic, ties and linear merge exactly as
    before, and one `mergekit-cabs:` line says the check is skipped."""
    cases = [("task_arithmetic", None), ("ties", {"density": 0.5}), ("linear", None)]
    before = {m: _merge(fp32_family, m, tmp_path / f"before-{m}", p) for m, p in cases}
    monkeypatch.delenv("MERGEKIT_CABS_STRICT", raising=False)
    monkeypatch.setattr(_mergekit, attribute, f"{attribute.lower()}_renamed")
    monkeypatch.setattr(_mergekit, "_said", set())
    capsys.readouterr()
    for method, params in cases:
        after = _merge(fp32_family, method, tmp_path / f"after-{method}", params)
        assert after.keys() == before[method].keys()
        assert all(torch.equal(after[k], before[method][k]) for k in after), method
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mergekit-cabs:")]
    assert len(lines) == 1 and lines[0].startswith(f"mergekit-cabs: {said}") and "MERGEKIT_CABS_STRICT" in lines[0]


def test_a_renamed_attribute_is_an_error_under_strict(fp32_family, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_CABS_STRICT", "1")
    monkeypatch.setattr(_mergekit, "TASK_METHOD_ATTR", "method_name_renamed")
    with pytest.raises(RuntimeError, match="mergekit-cabs: cannot read ExecuteMergeMethodTask.method_name_renamed"):
        _merge(fp32_family, "linear", tmp_path / "out")


def test_a_changed_planned_task_leaves_cabs_to_its_merge_time_checks(fp32_family, tmp_path, monkeypatch, capsys):
    """If the planned task cannot be read, the cabs merge still runs (its
    parameters are checked when each tensor is merged) and gives the same bits."""
    before = _merge(fp32_family, "cabs", tmp_path / "before")
    monkeypatch.delenv("MERGEKIT_CABS_STRICT", raising=False)
    monkeypatch.setattr(_mergekit, "_said", set())

    def changed(task):
        raise AttributeError("'ExecuteMergeMethodTask' object has no attribute 'output_weight'")

    monkeypatch.setattr(_mergekit, "planned_task", changed)
    after = _merge(fp32_family, "cabs", tmp_path / "after")
    assert all(torch.equal(after[k], before[k]) for k in before)
    err = capsys.readouterr().err
    assert err.count("mergekit-cabs: cannot read mergekit's planned cabs tensor") == 1


# --- someone else's `cabs` ---------------------------------------------------------------

FOREIGN = """
import os, sys
import mergekit.merge_methods as mm
from mergekit.merge_methods import GroupMergeMethod, MergeMethodSpec, ParameterScope
from mergekit.merge_methods.base import ParameterSpec

class TheirCabs(GroupMergeMethod):
    spec = MergeMethodSpec(name="cabs", parameters=(
        ParameterSpec("n_val", int, ParameterScope.SHARED, default=16),
        ParameterSpec("m_val", int, ParameterScope.SHARED, default=32),
        ParameterSpec("pruning_order", object, ParameterScope.SHARED, default=None),
    ))
    def merge_group(self, group, /, **parameters):
        return group.base.tensor * 0 + parameters["n_val"]

theirs = TheirCabs()
mm.register(theirs)
import mergekit_cabs
mergekit_cabs.install()
mergekit_cabs.install()
assert mm.get("cabs") is theirs
assert getattr(mm.get("mergekit_cabs"), "is_mergekit_cabs", False)

import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file
base, tune, out = sys.argv[1:4]
for method, params in (("cabs", {"n_val": 3, "m_val": 4, "pruning_order": ["a"]}), ("mergekit_cabs", {})):
    config = MergeConfiguration.model_validate({"merge_method": method, "base_model": base,
        "models": [{"model": tune}], "parameters": params, "dtype": "float32"})
    run_merge(config, out + "/" + method, MergeOptions(quiet=True))
theirs_out = load_file(out + "/cabs/model.safetensors")
assert all(bool((t == 3).all()) for t in theirs_out.values()), "their cabs did not run with n_val 3"
print("OK")
"""


def test_a_cabs_registered_first_by_someone_else_is_left_alone(fp32_family, tmp_path):
    """Their `cabs` keeps its own parameters (no name check, no plan check of
    ours touches it), one line names both, and ours merges as `mergekit_cabs`."""
    base, tunes = fp32_family
    env = {**os.environ, "MERGEKIT_CABS_AUTOLOAD": "0", "MERGEKIT_CABS_STRICT": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FOREIGN), str(base.path), str(tunes[0].path), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines()  # (a cold numba cache adds its compiling line)
             if line.startswith("mergekit-cabs:") and line != COMPILING]
    assert len(lines) == 1
    assert "already has a merge method called 'cabs' (__main__.TheirCabs)" in lines[0]
    assert "merge_method: mergekit_cabs" in lines[0]
    ours = load_output(tmp_path / "mergekit_cabs")
    assert ours and all(torch.isfinite(t).all() for t in ours.values())


def test_the_second_name_merges_exactly_as_cabs(fp32_family, tmp_path):
    a = _merge(fp32_family, "cabs", tmp_path / "a", {"density": 0.5})
    b = _merge(fp32_family, "mergekit_cabs", tmp_path / "b", {"density": 0.5})
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- names mergekit's tools inject ---------------------------------------------------------


def test_names_mergekit_evolve_injects_are_ignored_with_a_note(fp32_family, tmp_path, caplog):
    base, tunes = fp32_family
    plain = _merge(fp32_family, "cabs", tmp_path / "plain")
    config = {
        "merge_method": "cabs", "base_model": str(base.path), "dtype": "float32",
        "models": [{"model": str(t.path), "parameters": {"weight": 0.5}} for t in tunes],
        "parameters": {"normalize": False, "int8_mask": True},
    }
    with caplog.at_level(logging.WARNING, logger="mergekit_cabs"):
        run_in_process(config, tmp_path / "evolve")
    got = load_output(tmp_path / "evolve")
    assert all(torch.equal(got[k], plain[k]) for k in plain)
    notes = [r.getMessage() for r in caplog.records if "ignoring parameter" in r.getMessage()]
    assert len(notes) == 2 and any("'int8_mask'" in n for n in notes) and any("'normalize'" in n for n in notes)
