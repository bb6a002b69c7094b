"""`mergekit-cabs check`: every check a merge would run, one line per problem,
without reading a tensor; a list for a one-value setting; transformers'
`torch_dtype` line hidden in our commands only."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner

from mergekit_cabs.cli import main

from tiny_models import REPO_ROOT, cabs_is_installed, load_output, make_tiny_llama, run_in_process

TORCH_DTYPE_LINE = "`torch_dtype` is deprecated"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what check sets for itself; restored after each test


def _config(base, tunes, p1=None, p2=None, shared=None, **top):
    return {
        "merge_method": "cabs",
        "base_model": str(base.path),
        "models": [
            {"model": str(tunes[0].path), "parameters": dict(p1 or {"density": 0.25})},
            {"model": str(tunes[1].path), "parameters": dict(p2 or {"n": 3})},
        ],
        "parameters": {"block_size": 16, **(shared or {})},
        **top,
    }


def _write(config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _check(path: Path):
    """(exit code, printed lines) of `mergekit-cabs check PATH`."""
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.stdout.splitlines()


def _problems(lines, path):
    """The problem lines (not notes, not the closing count)."""
    return [line for line in lines if line.startswith(f"{path}: ") and ": note: " not in line
            and not line.endswith(("problem", "problems")) and " OK" not in line]


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory, fp32_family):
    """A model of the family's architecture but a wider MLP (intermediate 80, not 72)."""
    base, _ = fp32_family
    return make_tiny_llama(tmp_path_factory.mktemp("odd") / "odd", seed=7, layers=base.config["num_hidden_layers"],
                           intermediate=80, tokenizer=False)


def _no_tensor_reading(monkeypatch):
    """Make every way mergekit or we could read a tensor's data fail."""
    import safetensors.torch
    import torch
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader
    from mergekit.io.tasks import LoadTensor

    def refuse(*args, **kwargs):
        raise AssertionError("check read a tensor")

    monkeypatch.setattr(LoadTensor, "execute", refuse)
    monkeypatch.setattr(LazyTensorLoader, "get_tensor", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)


# --- one configuration -----------------------------------------------------------------------


def test_a_good_config_exits_0_reading_no_tensor(fp32_family, tmp_path, monkeypatch):
    base, tunes = fp32_family
    _no_tensor_reading(monkeypatch)
    path = _write(_config(base, tunes, dtype="float32"), tmp_path / "cabs.yml")
    code, lines = _check(path)
    assert code == 0, lines
    assert lines[-1] == f"{path}: OK; {len(base.state)} tensors planned"
    assert not [line for line in lines[:-1] if ": note: " not in line], lines


def test_check_reports_every_problem_one_line_each_and_exits_1(fp32_family, odd_model, tmp_path, monkeypatch):
    base, tunes = fp32_family
    _no_tensor_reading(monkeypatch)
    config = _config(base, [tunes[0], odd_model], p1={"n": 20, "densty": 0.5}, p2={"n": 3},
                     shared={"overlap": ["fill", "strict"]})
    path = _write(config, tmp_path / "cabs.yml")
    code, lines = _check(path)
    assert code == 1
    problems = _problems(lines, path)
    assert len(problems) == 4, lines
    assert any("unknown parameter 'densty'" in line and str(tunes[0].path) in line for line in problems)
    assert any("'overlap' in the top-level parameters takes one value" in line for line in problems)
    assert any("'n' for model" in line and "is 20" in line for line in problems)
    assert any(f"model 'odd' ({odd_model.path})" in line and "shape" in line for line in problems)
    assert lines[-1] == f"{path}: 4 problems"


def test_wrong_case_merge_method_gets_one_line_naming_cabs(fp32_family, tmp_path):
    base, tunes = fp32_family
    path = _write(dict(_config(base, tunes, p2={"n": 17}), merge_method="CABS"), tmp_path / "cabs.yml")
    code, lines = _check(path)
    assert code == 1
    problems = _problems(lines, path)
    assert problems[0] == f"{path}: merge_method 'CABS' is not a mergekit method; did you mean 'cabs'?"
    # The rest is checked as cabs, the method meant.
    assert len(problems) == 2 and f"cabs: 'n' for model '{tunes[1].path}' is 17" in problems[1], problems


def test_a_misspelt_merge_method_gets_close_names(fp32_family, tmp_path):
    base, tunes = fp32_family
    path = _write(dict(_config(base, tunes), merge_method="tie"), tmp_path / "cabs.yml")
    code, lines = _check(path)
    assert code == 1 and "merge_method 'tie' is not a mergekit method; did you mean 'ties'" in lines[0], lines


def test_missing_model_path_is_one_line_naming_its_place_and_directory(fp32_family, tmp_path):
    base, tunes = fp32_family
    missing = tmp_path / "models" / "ft2"
    path = _write(_config(base, [tunes[0], SimpleNamespace(path=missing)]), tmp_path / "cabs.yml")
    code, lines = _check(path)
    assert code == 1
    expected = f"{path}: models[1]: model '{missing}' not found: there is no directory {missing}"
    assert _problems(lines, path) == [expected]


def test_a_hub_model_id_is_a_note_not_a_problem(fp32_family, tmp_path):
    base, tunes = fp32_family
    config = _config(base, tunes)
    config["models"][1]["model"] = "some-org/some-model"
    path = _write(config, tmp_path / "cabs.yml")
    code, lines = _check(path)
    assert code == 0, lines
    assert lines == [
        f"{path}: note: models[1] 'some-org/some-model': no directory here, so taken as Hugging Face model id, "
        "which check does not download; parameter values and tensor shapes are checked only with every model's "
        "files at hand",
        f"{path}: OK as far as checked (see the notes)"]


def test_a_bad_value_is_one_line_however_many_tensors_have_it(fp32_family, tmp_path):
    base, tunes = fp32_family
    path = _write(_config(base, tunes, p2={"n": 17}), tmp_path / "cabs.yml")
    code, lines = _check(path)
    assert code == 1
    assert _problems(lines, path) == [
        f"{path}: cabs: 'n' for model '{tunes[1].path}' is 17; it must be a whole number in [1, block_size=16] "
        f"(on {len(base.state)} tensors, the first '{_first_tensor(lines)}')"]


def _first_tensor(lines) -> str:
    return next(line for line in lines if "the first '" in line).rsplit("the first '", 1)[1].rstrip("')")


def test_a_value_bad_on_one_tensor_only_names_that_tensor(fp32_family, tmp_path):
    base, tunes = fp32_family
    path = _write(_config(base, tunes, p1={"density": [0.25, 0.01]}), tmp_path / "cabs.yml")
    code, lines = _check(path)
    assert code == 1
    (line,) = _problems(lines, path)
    assert f"'density' for model '{tunes[0].path}' is 0.01, which keeps" in line
    assert line.endswith(f"(on {len(_layer(base, 1))} tensors, the first '{_layer(base, 1)[0]}')"), line


def _layer(model, i: int) -> list[str]:
    return sorted(name for name in model.state if name.startswith(f"model.layers.{i}."))


def test_an_unknown_parameter_name_is_reported(fp32_family, tmp_path):
    base, tunes = fp32_family
    path = _write(_config(base, tunes, shared={"lamda": 2}), tmp_path / "cabs.yml")
    code, lines = _check(path)
    assert code == 1
    assert _problems(lines, path) == [
        f"{path}: cabs: unknown parameter 'lamda'; cabs takes weight, density, n, block_size, overlap, "
        "conflict_aware, balanced, lambda"]


def test_shape_mismatch_names_the_model_the_tensor_and_both_shapes(fp32_family, odd_model, tmp_path, monkeypatch):
    base, tunes = fp32_family
    _no_tensor_reading(monkeypatch)
    path = _write(_config(base, [tunes[0], odd_model]), tmp_path / "cabs.yml")
    code, lines = _check(path)
    assert code == 1
    differing = [name for name in base.state if base.state[name].shape != odd_model.state[name].shape]
    assert len(differing) == 3 * base.config["num_hidden_layers"]  # the MLP's three weights in every layer
    (line,) = _problems(lines, path)
    first = line.split(": tensor ", 1)[1].split(" ", 1)[0]  # the first in mergekit's planning order
    assert first in differing
    assert line == (f"{path}: model 'odd' ({odd_model.path}): tensor {first} has shape "
                    f"{tuple(odd_model.state[first].shape)}, the base has "
                    f"{tuple(base.state[first].shape)}; and {len(differing) - 1} more tensors like it")


def test_another_vocabulary_without_tokenizer_source_is_reported_with_the_remedy(vocab_family, tmp_path):
    base, tunes = vocab_family
    config = _config(base, tunes)
    code, lines = _check(_write(config, tmp_path / "cabs.yml"))
    assert code == 1
    assert [line for line in lines if "has shape (79, 40), the base has" in line
            and "tokenizer_source: union or base" in line and "and 1 more tensor like it" in line] != [], lines
    code, lines = _check(_write(dict(config, tokenizer_source="union"), tmp_path / "union.yml"))
    assert code == 0, lines
    assert "are read through mergekit's vocabulary alignment (tokenizer_source)" in lines[0]


def test_a_missing_tensor_names_the_model_and_the_tensor(fp32_family, tmp_path):
    from safetensors.torch import save_file

    base, tunes = fp32_family
    lacking = make_tiny_llama(tmp_path / "lacking", seed=8, base=base, tokenizer=False)
    state = {k: v for k, v in lacking.state.items() if k != "model.norm.weight"}
    save_file(state, str(lacking.path / "model.safetensors"), metadata={"format": "pt"})
    code, lines = _check(_write(_config(base, [tunes[0], lacking]), tmp_path / "cabs.yml"))
    assert code == 1
    assert f"model 'lacking' ({lacking.path}) has no tensor model.norm.weight (the base has it)" in lines[0], lines


@pytest.mark.parametrize("setting", [{"overlap": ["fill", "strict"]}, {"conflict_aware": [True, False]},
                                     {"balanced": [{"filter": "mlp", "value": [True, False]}, {"value": True}]}],
                         ids=["overlap", "conflict_aware", "balanced-in-a-filter"])
def test_a_list_for_a_one_value_setting_is_reported(fp32_family, tmp_path, setting):
    base, tunes = fp32_family
    path = _write(_config(base, tunes, shared=setting), tmp_path / "cabs.yml")
    code, lines = _check(path)
    assert code == 1
    name = next(iter(setting))
    assert _problems(lines, path) == [
        f"{path}: cabs: '{name}' in the top-level parameters takes one value; mergekit reads a list as a gradient "
        "and picks one entry per layer (the first entry for the first layers, the last for the last)"]


def test_filters_for_a_one_value_setting_are_fine(fp32_family, tmp_path):
    base, tunes = fp32_family
    setting = {"overlap": [{"filter": "mlp", "value": "strict"}, {"value": "fill"}]}
    code, lines = _check(_write(_config(base, tunes, shared=setting), tmp_path / "cabs.yml"))
    assert code == 0, lines


def test_a_malformed_config_is_one_line_per_place(tmp_path):
    path = _write({"merge_method": "cabs", "models": 5, "base_model": "x/y"}, tmp_path / "cabs.yml")
    code, lines = _check(path)
    assert code == 1
    assert _problems(lines, path) == [f"{path}: models: Input should be a valid list (got 5)"]


def test_a_merge_with_a_list_for_a_one_value_setting_warns_once_and_merges(fp32_family, tmp_path, caplog):
    base, tunes = fp32_family
    config = _config(base, tunes, shared={"overlap": ["fill", "strict"], "conflict_aware": [True, False]})
    with caplog.at_level(logging.WARNING, logger="mergekit_cabs"):
        run_in_process(config, tmp_path / "out")
    said = [r.getMessage() for r in caplog.records if "takes one value" in r.getMessage()
            or "each take one value" in r.getMessage()]
    assert said == [
        "cabs: 'overlap' in the top-level parameters and 'conflict_aware' in the top-level parameters each take "
        "one value; mergekit reads a list as a gradient and picks one entry per layer (the first entry for the "
        "first layers, the last for the last); merging that way. Give one value (or `filter:` entries) instead."]
    assert len(load_output(tmp_path / "out")) == len(base.state)


def test_every_problem_of_a_tensor_is_found_and_resolve_raises_the_first():
    from mergekit_cabs.params import CabsConfigError, resolve, resolve_problems

    shared = {"block_size": 16, "overlap": "greedy", "conflict_aware": True, "balanced": "no", "lambda": 1.0}
    per_model = [("a", {"n": 20}), ("b", {"density": 0.5}), ("c", {"density": 2.0})]
    problems = resolve_problems(shared, per_model, "t")
    assert [p.split(";")[0] for p in problems] == [
        "cabs: 'overlap' on tensor 't' is 'greedy'", "cabs: 'balanced' on tensor 't' is 'no'",
        "cabs: 'n' for model 'a' on tensor 't' is 20", "cabs: 'density' for model 'c' on tensor 't' is 2.0"]
    with pytest.raises(CabsConfigError) as info:
        resolve(shared, per_model, "t")
    assert str(info.value) == problems[0]


# --- mergekit-multi files ---------------------------------------------------------------------------


def _multi(base, tunes, second_parameters):
    first = dict(_config(base, tunes), name="first")
    second = {
        "name": "second",
        "merge_method": "cabs",
        "base_model": str(base.path),
        "models": [{"model": "first", "parameters": {"density": 0.25}},
                   {"model": str(tunes[1].path), "parameters": second_parameters}],
        "parameters": {"block_size": 16},
    }
    final = {"merge_method": "linear", "models": [{"model": "second", "parameters": {"weight": 1.0}},
                                                  {"model": str(tunes[0].path), "parameters": {"weight": 1.0}}]}
    return [first, second, final]


def test_a_typo_in_stage_2_of_a_multi_file_is_reported_before_anything_is_merged(fp32_family, tmp_path,
                                                                                 monkeypatch):
    base, tunes = fp32_family
    _no_tensor_reading(monkeypatch)
    path = tmp_path / "multi.yml"
    path.write_text(yaml.safe_dump_all(_multi(base, tunes, {"densty": 0.3}), sort_keys=False))
    code, lines = _check(path)
    assert code == 1
    assert _problems(lines, path) == [
        f"{path}: stage 2 'second': cabs: unknown parameter 'densty' for model '{tunes[1].path}'; cabs takes "
        "weight, density, n, block_size, overlap, conflict_aware, balanced, lambda"]


def test_a_good_multi_file_plans_every_stage_with_a_stand_in_for_earlier_outputs(fp32_family, tmp_path):
    base, tunes = fp32_family
    path = tmp_path / "multi.yml"
    path.write_text(yaml.safe_dump_all(_multi(base, tunes, {"n": 3}), sort_keys=False))
    code, lines = _check(path)
    assert code == 0, lines
    assert f"{path}: stage 2 'second': note: 'first' is the output of stage 'first'; planned with {base.path} in " \
           "its place, and its tensor shapes are not compared" in lines
    assert lines[-1] == f"{path}: OK; {2 * len(base.state)} tensors planned"  # the linear stage is not planned


def test_a_bad_value_in_stage_2_names_the_stage_output_by_its_name(fp32_family, tmp_path):
    base, tunes = fp32_family
    stages = _multi(base, tunes, {"n": 3})
    stages[1]["models"][0]["parameters"] = {"n": 99}
    path = tmp_path / "multi.yml"
    path.write_text(yaml.safe_dump_all(stages, sort_keys=False))
    code, lines = _check(path)
    assert code == 1
    (line,) = _problems(lines, path)
    assert line.startswith(f"{path}: stage 2 'second': cabs: 'n' for model 'first' is 99;"), line


def test_circular_stages_are_reported(fp32_family, tmp_path):
    base, tunes = fp32_family
    stages = _multi(base, tunes, {"n": 3})
    stages[0]["models"][1]["model"] = "second"
    path = tmp_path / "multi.yml"
    path.write_text(yaml.safe_dump_all(stages, sort_keys=False))
    code, lines = _check(path)
    assert code == 1
    assert f"{path}: stage 1 'first': uses its own output, through the stages it uses (mergekit-multi refuses " \
           "circular stages)" in lines


def test_analyze_given_a_multi_file_says_what_it_is(tmp_path):
    path = tmp_path / "multi.yml"
    path.write_text("name: a\nmerge_method: cabs\n---\nmerge_method: cabs\n")
    result = CliRunner().invoke(main, ["analyze", str(path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "holds 2 YAML documents (a mergekit-multi file?)" in result.output


# --- transformers' torch_dtype line ---------------------------------------------------------------


def _env():
    env = dict(os.environ)
    if not cabs_is_installed():
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def test_our_commands_hide_the_torch_dtype_line_and_mergekit_still_shows_it(fp32_family, tmp_path):
    base, tunes = fp32_family
    # dtype: makes mergekit set the output config's torch_dtype while planning.
    path = _write(_config(base, tunes, dtype="float32"), tmp_path / "cabs.yml")
    ours = subprocess.run([sys.executable, "-m", "mergekit_cabs.cli", "check", str(path)], capture_output=True,
                          text=True, env=_env(), timeout=300)
    assert ours.returncode == 0, ours.stdout + ours.stderr
    assert TORCH_DTYPE_LINE not in ours.stdout + ours.stderr
    # The same mergekit code path outside our commands, with the package imported: the line is still there.
    script = ("import mergekit_cabs, yaml\n"
              "from mergekit.config import MergeConfiguration\n"
              "from mergekit_cabs import planning\n"
              f"planning.plan(MergeConfiguration.model_validate(yaml.safe_load(open({str(path)!r}))))\n")
    theirs = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=300)
    assert theirs.returncode == 0, theirs.stderr
    assert TORCH_DTYPE_LINE in theirs.stderr
