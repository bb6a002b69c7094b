"""Bad models fail in one line, naming the model and the tensor, before any
tensor is read: a tensor shaped unlike the base's, a tensor a fine-tune lacks,
a LoRA reference, a NaN.  (tune's side of these: tests/test_tune_command.py.)

`planning.check_shapes` is the one home of the shape and missing-tensor
checks: `plan` raises its first line (`require_shapes`), and a caller that
wants every line (the `check` command) plans with ``shapes=False``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergekit_cabs import CabsError, planning
from mergekit_cabs.cli import main

from tiny_models import make_tiny_llama

UP = "model.layers.0.mlp.up_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"


def _variant(base, path: Path, seed: int, edit) -> Path:
    """A fine-tune of `base` whose state dict `edit` changed (no tokenizer)."""
    model = make_tiny_llama(path, seed=seed, base=base, tokenizer=False)
    state = dict(model.state)
    edit(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _shorter(name: str):
    def edit(state):
        state[name] = state[name][:-8].clone()
    return edit


def _without(name: str):
    def edit(state):
        del state[name]
    return edit


def _config(base, models, path: Path) -> Path:
    config = {
        "merge_method": "cabs", "base_model": str(base.path),
        "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.25}} for m in models],
        "parameters": {"block_size": 16},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def no_tensor_reading(monkeypatch):
    from mergekit.io.tasks import LoadTensor

    def refuse(self):
        raise AssertionError(f"read tensor {self.tensor} before the models were checked")

    monkeypatch.setattr(LoadTensor, "execute", refuse)


def _analyze_error(config: Path, out: Path) -> str:
    result = CliRunner().invoke(main, ["analyze", str(config), "--out", str(out), "--quiet"])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()
    return result.output


def test_analyze_names_model_and_tensor_of_a_shape_mismatch_before_reading_tensors(
        fp32_family, tmp_path, no_tensor_reading):
    base, tunes = fp32_family
    bad = _variant(base, tmp_path / "ft-short", 5, _shorter(UP))
    out = _analyze_error(_config(base, [tunes[0].path, bad], tmp_path / "c.yml"), tmp_path / "r")
    assert f"model 'ft-short' ({bad}): tensor {UP} has shape (64, 40), the base has (72, 40)" in out


def test_analyze_names_model_and_tensor_a_fine_tune_lacks_before_reading_tensors(
        fp32_family, tmp_path, no_tensor_reading):
    base, tunes = fp32_family
    bad = _variant(base, tmp_path / "ft-gap", 6, _without(DOWN))
    out = _analyze_error(_config(base, [bad, tunes[1].path], tmp_path / "c.yml"), tmp_path / "r")
    assert f"model 'ft-gap' ({bad}) has no tensor {DOWN} (the base has it)" in out


def test_check_shapes_lists_every_problem_and_plan_raises_the_first(fp32_family, tmp_path):
    base, tunes = fp32_family
    short = _variant(base, tmp_path / "ft-short", 5, _shorter(UP))
    gap = _variant(base, tmp_path / "ft-gap", 6, _without(DOWN))
    config = planning.load_config(_config(base, [short, gap, tunes[0].path], tmp_path / "c.yml"))
    planned = planning.plan(config, shapes=False)
    assert planning.check_shapes(planned) == [
        f"model 'ft-short' ({short}): tensor {UP} has shape (64, 40), the base has (72, 40)",
        f"model 'ft-gap' ({gap}) has no tensor {DOWN} (the base has it)",
    ]
    more = r"the base has \(72, 40\) \(1 more: mergekit-cabs check lists them all\)"
    with pytest.raises(planning.PlanError, match=more):
        planning.plan(config)
    good = planning.load_config(_config(base, [t.path for t in tunes], tmp_path / "good.yml"))
    assert planning.check_shapes(planning.plan(good, shapes=False)) == []


def test_check_shapes_reads_a_torch_pickle_checkpoint_without_loading_it(fp32_family, tmp_path):
    base, tunes = fp32_family
    bad = _variant(base, tmp_path / "ft-bin", 7, _shorter(UP))
    state = load_file(str(bad / "model.safetensors"))
    (bad / "model.safetensors").unlink()
    torch.save(state, bad / "pytorch_model.bin")
    config = planning.load_config(_config(base, [tunes[0].path, bad], tmp_path / "c.yml"))
    assert planning.check_shapes(planning.plan(config, shapes=False)) == [
        f"model 'ft-bin' ({bad}): tensor {UP} has shape (64, 40), the base has (72, 40)"]


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory):
    """A real peft LoRA adapter on a tiny Llama (peft comes with mergekit)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    base = make_tiny_llama(root / "base", seed=31)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(root / "adapter")
    return base, root / "adapter"


@pytest.mark.parametrize("command", ["analyze", "tune"])
def test_a_lora_reference_is_refused_in_one_line_saying_how_to_merge_it(
        command, lora_adapter, fp32_family, tmp_path, no_tensor_reading):
    base, adapter = lora_adapter
    config = _config(base, [f"{base.path}+{adapter}"], tmp_path / "c.yml")
    extra = ["--data", f"base={config}"] if command == "tune" else []
    result = CliRunner().invoke(main, [command, str(config), "--out", str(tmp_path / "r"), "--quiet", *extra])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert f"model '{base.path}+{adapter}' is {base.path} with the LoRA adapter {adapter}" in lines[0]
    assert "merge_and_unload().save_pretrained(DIR)" in lines[0] and "Need to specify cache dir" not in lines[0]
    assert not (tmp_path / "r").exists()


def test_a_nan_in_a_merge_input_is_a_cabs_error_naming_model_and_tensor():
    """CabsError (a ValueError, as mergekit expects): analyze and tune print it in one line."""
    from mergekit.merge_methods import merge_tensors

    bad = torch.ones(40)
    bad[3] = float("nan")
    with pytest.raises(CabsError, match=r"model 'sick' has NaN or infinite values in tensor 'a.weight'"):
        merge_tensors([torch.zeros(40), torch.ones(40), bad], "cabs", ids=["base", "fine", "sick"], base_index=0,
                      name="a.weight", parameters={"block_size": 16})
