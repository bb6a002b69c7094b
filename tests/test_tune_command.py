"""`mergekit-cabs tune` end to end, on tiny generated models.

* The losses `tune` reports for the chosen point are exactly those of the
  model `mergekit` writes from tuned.yml, loaded in the dtype tune scored in
  (the merge's, bfloat16 here, by default; float32 with --score-dtype);
  tuned.yml changes only the weights and lambda.
* Every bad input fails with a clear message before any model is loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from mergekit_cabs import tune as tn
from mergekit_cabs.cli import main

from tiny_models import make_tiny_llama, optional

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _sample_text(path: Path, tokens: int, seed: int) -> str:
    """Words sampled from a tiny model: its own kind of text (lower loss under it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    ids = [5]
    with torch.no_grad():
        while len(ids) < tokens:
            logits = model(torch.tensor([ids[-63:]])).logits[0, -1, 3:]  # no special tokens
            ids.append(3 + int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)))
    return " ".join(f"w{i - 3}" for i in ids)


@pytest.fixture(scope="session")
def tune_family(tiny_root):
    """A bf16 base, three fine-tunes, each with a text sampled from itself, a
    general text sampled from the base, and a cabs YAML (3 x 16 of 64: disjoint)."""
    root = tiny_root / "tune"
    base = make_tiny_llama(root / "base", seed=1, layers=2, dtype=torch.bfloat16)
    tunes = [make_tiny_llama(root / f"ft{i}", seed=10 + i, base=base, scale=3, dtype=torch.bfloat16)
             for i in range(3)]
    data = {}
    for i, t in enumerate(tunes):
        data[f"ft{i}"] = root / f"ft{i}.txt"
        data[f"ft{i}"].write_text(_sample_text(t.path, 900, seed=i))
    general = root / "general.jsonl"
    text = _sample_text(base.path, 700, seed=9).split()
    general.write_text("".join(json.dumps({"text": " ".join(text[j:j + 100])}) + "\n" for j in range(0, 700, 100)))
    config = {
        "merge_method": "cabs",
        "base_model": str(base.path),
        "models": [{"model": str(t.path), "parameters": {"weight": 1.0, "density": 0.25}} for t in tunes],
        "parameters": {"block_size": 64, "lambda": 1.0},
        "dtype": "bfloat16",
    }
    path = root / "cabs.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return {"base": base, "tunes": tunes, "data": data, "general": general, "config": path, "raw": config}


def _data_args(family, names=None):
    args = []
    for name in names or family["data"]:
        args += ["--data", f"{name}={family['data'][name]}"]
    return args


def _run(args):
    result = CliRunner().invoke(main, ["tune", *map(str, args)], catch_exceptions=False)
    return result


def _merge(config: dict, out: Path, dtype: torch.dtype):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True, copy_tokenizer=False))
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()


def test_tune_reports_the_scores_of_the_model_mergekit_writes(tune_family, tmp_path):
    out = tmp_path / "tuned"
    result = _run([tune_family["config"], *_data_args(tune_family), "--general", tune_family["general"],
                   "--out", out, "--budget", 25, "--quiet"])
    assert result.exit_code == 0, result.output
    optional("matplotlib", '".[plot]"')
    assert sorted(p.name for p in out.iterdir()) == ["task_arithmetic_tuned.yml", "tune.json", "tune.md", "tune.png",
                                                     "tuned.yml"]  # task arithmetic tuned the same way: by default
    assert (out / "tune.png").read_bytes().startswith(PNG_SIGNATURE)
    report = json.loads((out / "tune.json").read_text())
    assert report["search"]["evaluations"] == len(report["points"]) <= 25
    assert report["supports"]["disjoint"] and report["supports"]["shared_places"] == 0
    best = report["best"]
    assert best["fit"]["score"] == max(p["score"] for p in report["points"])
    assert best["fit"]["score"] >= report["start"]["fit"]["score"]

    # tuned.yml: the original configuration with the chosen weights and lambda
    tuned = yaml.safe_load((out / "tuned.yml").read_text())
    expected = json.loads(json.dumps(tune_family["raw"]))
    for item, label in zip(expected["models"], ["ft0", "ft1", "ft2"]):
        item["parameters"]["weight"] = best["weights"][label]
    expected["parameters"]["lambda"] = best["lambda"]
    assert tuned == expected
    assert (best["lambda"], *best["weights"].values()) != (1.0, 1.0, 1.0)  # the search moved

    # the written model, loaded in the merge's dtype, scores exactly what tune reported, on both splits
    assert report["score_dtype"] == "bfloat16" and report["memory"]["store_device"] == "cpu"
    model = _merge(tuned, tmp_path / "merged", torch.bfloat16)
    prep = tn.prepare(tune_family["config"], [a for a in _data_args(tune_family) if a != "--data"],
                      general=tune_family["general"])
    for task in prep.tasks:
        for split in ("fit", "heldout"):
            losses = tn.window_losses(model, getattr(task, split), tn.DEFAULTS["batch_size"])
            assert float(losses.mean()) == best[split]["loss"][task.name], (task.name, split)
            assert losses.tolist() == best[split]["window_losses"][task.name]

    md = (out / "tune.md").read_text()
    assert "held-out" in md and "disjoint" in md and "![objective along each weight](tune.png)" in md
    assert result.output.count("held-out") >= 1 and "mergekit-yaml" in result.output
    assert f"Wrote tune.md, tune.png, tune.json, task_arithmetic_tuned.yml, tuned.yml to {out}" in result.output
    # tuned.yml last


def test_tune_with_overlapping_supports_and_float32_scoring_still_matches_mergekit(tune_family, tmp_path):
    raw = json.loads(json.dumps(tune_family["raw"]))
    raw["parameters"]["conflict_aware"] = False
    config = tmp_path / "overlap.yml"
    config.write_text(yaml.safe_dump(raw))
    prep = tn.prepare(config, [f"{k}={v}" for k, v in tune_family["data"].items()], max_windows=4)
    report = tn.run_tune(prep, budget=4, objective="loss", score_dtype="float32", quiet=True)
    assert not report["supports"]["disjoint"] and report["supports"]["shared_places"] > 0
    assert report["score_dtype"] == "float32"
    assert report["objective"] == "loss"
    assert report["best"]["fit"]["score"] == -sum(report["best"]["fit"]["loss"].values()) / 3
    model = _merge(report["tuned_config"], tmp_path / "merged", torch.float32)
    for task in prep.tasks:
        got = float(tn.window_losses(model, task.heldout, tn.DEFAULTS["batch_size"]).mean())
        assert got == report["best"]["heldout"]["loss"][task.name]


def test_references_load_one_model_at_a_time_in_the_scoring_dtype(tune_family, monkeypatch):
    """Each fine-tune, then the base (which becomes the live model), loaded in
    the merge's dtype; each model is gone before the next one is loaded."""
    import weakref

    from mergekit_cabs.tune import references

    loaded, original = [], references.load_model

    def watch(path, device, dtype=torch.float32):
        assert not [r for r in loaded if r() is not None], "a model was still in memory when the next was loaded"
        model = original(path, device, dtype)
        loaded.append(weakref.ref(model))
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        return model

    monkeypatch.setattr(references, "load_model", watch)
    prep = tn.prepare(tune_family["config"], [f"{k}={v}" for k, v in tune_family["data"].items()], max_windows=2)
    report = tn.run_tune(prep, budget=1, objective="loss", quiet=True)
    assert len(loaded) == 4 and report["memory"]["model_bytes"] == 2 * sum(
        p.numel() for p in tn.load_model(str(tune_family["base"].path), "cpu").parameters())
    assert report["memory"]["store_bytes"] == 5 * report["supports"]["places"]  # disjoint, bfloat16


def test_tune_says_when_weights_are_not_independent(tune_family, tmp_path):
    raw = json.loads(json.dumps(tune_family["raw"]))
    for item in raw["models"]:
        item["parameters"]["density"] = 0.5  # 3 x 32 > 64: overlap: fill
    config = tmp_path / "fill.yml"
    config.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["tune", str(config), *map(str, _data_args(tune_family)), "--out",
                                       str(tmp_path / "o"), "--budget", "2", "--max-windows", "2",
                                       "--objective", "loss", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "no longer independent" in result.output
    assert "overlap" in (tmp_path / "o" / "tune.md").read_text()


# --- bad input: a clear error before any model is loaded -----------------------------------


@pytest.fixture
def no_model_loading(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _bad(tune_family, tmp_path, *, data=None, config=None, extra=()):
    args = [config or tune_family["config"], *(data if data is not None else _data_args(tune_family)),
            "--out", tmp_path / "out", "--quiet", *extra]
    result = CliRunner().invoke(main, ["tune", *map(str, args)])
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert not (tmp_path / "out").exists()
    return result.output


def test_error_model_without_data(tune_family, tmp_path, no_model_loading):
    out = _bad(tune_family, tmp_path, data=_data_args(tune_family, ["ft0", "ft2"]))
    assert "no --data for model(s)" in out and "ft1" in out and "MODEL=FILE" in out


def test_error_unknown_model_and_bad_form(tune_family, tmp_path, no_model_loading):
    out = _bad(tune_family, tmp_path, data=[*_data_args(tune_family), "--data", "ft9=x.txt"])
    assert "no fine-tuned model is called 'ft9'" in out and "ft0, ft1, ft2" in out
    out = _bad(tune_family, tmp_path, data=["--data", "ft0"])
    assert "write MODEL=FILE" in out
    out = _bad(tune_family, tmp_path, data=[*_data_args(tune_family), "--data", f"ft0={tune_family['data']['ft1']}"])
    assert "two files for model" in out


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("   \n\n", "is empty"),
    (b"\xff\xfe\x00bad", "cannot read data file"),
    ("w1 w2 w3 w4", "too short for one window to fit and one held out"),
])
def test_error_bad_data_file(tune_family, tmp_path, no_model_loading, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    data = _data_args(tune_family, ["ft0", "ft1"]) + ["--data", f"ft2={bad}"]
    out = _bad(tune_family, tmp_path, data=data)
    assert message in out and "bad.txt" in out


def test_error_jsonl_without_text_and_missing_file(tune_family, tmp_path, no_model_loading):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n{"content": "w3"}\n')
    out = _bad(tune_family, tmp_path, data=_data_args(tune_family, ["ft0", "ft1"]) + ["--data", f"ft2={bad}"])
    assert f"{bad} line 2 is none of the row forms: " in out
    out = _bad(tune_family, tmp_path, data=_data_args(tune_family, ["ft0", "ft1"]) + ["--data", "ft2=nowhere.txt"])
    assert "nowhere.txt" in out and "does not exist" in out
    out = _bad(tune_family, tmp_path, extra=["--general", tmp_path / "nothing.txt"])
    assert "nothing.txt" in out and "general" in out


def test_error_config_not_cabs(tune_family, tmp_path, no_model_loading):
    raw = dict(tune_family["raw"], merge_method="ties")
    config = tmp_path / "ties.yml"
    config.write_text(yaml.safe_dump(raw))
    out = _bad(tune_family, tmp_path, config=config)
    assert "merge_method: 'ties'" in out and "cabs" in out


def test_error_weight_that_varies_by_tensor(tune_family, tmp_path, no_model_loading):
    raw = json.loads(json.dumps(tune_family["raw"]))
    raw["models"][1]["parameters"]["weight"] = [0.5, 1.0]  # a gradient
    config = tmp_path / "gradient.yml"
    config.write_text(yaml.safe_dump(raw))
    out = _bad(tune_family, tmp_path, config=config)
    assert "ft1" in out and "varies by tensor" in out and "one weight per model" in out


@pytest.mark.parametrize("extra, message", [
    (["--weight-bounds", "2,1"], "--weight-bounds"),
    (["--lambda-bounds", "x"], "--lambda-bounds"),
    (["--budget", "0"], "--budget"),
    (["--fit-fraction", "1"], "--fit-fraction"),
    (["--window", "1000"], "--window"),
    (["--store-on-device"], "--store-on-device needs --cuda"),
])
def test_error_bad_options(tune_family, tmp_path, no_model_loading, extra, message):
    out = _bad(tune_family, tmp_path, extra=extra)
    assert message in out


def test_error_fine_tune_no_better_than_base(tune_family, tmp_path):
    """Normalized gain needs each model to beat the base on its own data."""
    data = _data_args(tune_family, ["ft0", "ft1"]) + ["--data", f"ft2={tune_family['general']}"]
    result = CliRunner().invoke(main, ["tune", str(tune_family["config"]), *map(str, data), "--out",
                                       str(tmp_path / "out"), "--quiet", "--max-windows", "4"])
    assert result.exit_code != 0
    assert "model 'ft2' is no better than the base" in result.output and "--objective loss" in result.output
    assert not (tmp_path / "out").exists()


def test_tuned_config_sets_weights_in_every_slice_source(tune_family):
    """A `slices:` configuration: every source of a model gets its weight,
    and mergekit resolves the chosen numbers on every tensor."""
    base, tunes = tune_family["base"], tune_family["tunes"]
    sources = [{"model": str(base.path), "layer_range": [0, 2]}] + [
        {"model": str(t.path), "layer_range": [0, 2], "parameters": {"weight": 0.5, "density": 0.25}} for t in tunes
    ]
    raw = {"merge_method": "cabs", "base_model": str(base.path), "slices": [{"sources": sources,
           "parameters": {"lambda": 0.9}}], "parameters": {"block_size": 64}, "dtype": "bfloat16"}
    refs = next(p.models for p in _plan(raw) if p.models)
    tuned = tn.tuned_config(raw, refs, [0.25, 1.5, 0.75], 1.25)
    tn.check_round_trip(tuned, refs, [0.25, 1.5, 0.75], 1.25)  # raises if any tensor disagrees
    got = [s["parameters"]["weight"] for s in tuned["slices"][0]["sources"][1:]]
    assert got == [0.25, 1.5, 0.75] and tuned["slices"][0]["parameters"]["lambda"] == 1.25
    assert raw["slices"][0]["sources"][1]["parameters"]["weight"] == 0.5  # the input is not changed
    with pytest.raises(RuntimeError, match="resolves to"):
        tn.check_round_trip(raw, refs, [0.25, 1.5, 0.75], 1.25)


def _plan(raw: dict):
    from mergekit.config import MergeConfiguration

    from mergekit_cabs.planning import plan

    return plan(MergeConfiguration.model_validate(raw))


# --- bad models, NaN, a full disk: one line naming what is at fault ---------------------------


def _variant(base, path: Path, edit) -> Path:
    """A bf16 fine-tune of `base` whose state dict `edit` changed."""
    from safetensors.torch import save_file

    model = make_tiny_llama(path, seed=41, base=base, scale=3, dtype=torch.bfloat16, tokenizer=False)
    state = dict(model.state)
    edit(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _with_model(tune_family, tmp_path, index: int, model: Path) -> Path:
    raw = json.loads(json.dumps(tune_family["raw"]))
    raw["models"][index]["model"] = str(model)
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(raw))
    return config


def _tune_error(tune_family, tmp_path, config, names=("ft0", "ft1", "ft2"), extra=()) -> list[str]:
    data = []
    for name, text in zip(names, tune_family["data"].values()):
        data += ["--data", f"{name}={text}"]
    result = CliRunner().invoke(main, ["tune", str(config), *data, "--out", str(tmp_path / "out"), "--quiet",
                                       "--budget", "9", "--max-windows", "4", *map(str, extra)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and result.output.startswith("Error: "), result.output
    return result.output.strip().splitlines()


UP = "model.layers.0.mlp.up_proj.weight"


def test_tune_names_model_and_tensor_of_a_shape_mismatch_before_loading_a_model(
        tune_family, tmp_path, no_model_loading):
    short = _variant(tune_family["base"], tmp_path / "short", lambda s: s.update({UP: s[UP][:-8].clone()}))
    lines = _tune_error(tune_family, tmp_path, _with_model(tune_family, tmp_path, 1, short), ["ft0", "short", "ft2"])
    assert len(lines) == 1 and f"model 'short' ({short}): tensor {UP} has shape (64, 40), the base has (72, 40)" \
        in lines[0]
    assert not (tmp_path / "out").exists()


def test_tune_names_model_and_tensor_a_fine_tune_lacks_before_loading_a_model(
        tune_family, tmp_path, no_model_loading):
    gap = _variant(tune_family["base"], tmp_path / "gap", lambda s: s.pop(UP))
    lines = _tune_error(tune_family, tmp_path, _with_model(tune_family, tmp_path, 2, gap), ["ft0", "ft1", "gap"])
    assert len(lines) == 1 and f"model 'gap' ({gap}) has no tensor {UP} (the base has it)" in lines[0]


def test_tune_names_model_and_tensor_of_a_nan_in_a_fine_tune_before_scoring_it(tune_family, tmp_path, monkeypatch):
    down = "model.layers.1.mlp.down_proj.weight"

    def poison(state):
        state[down] = state[down].clone()
        state[down][2, 3] = float("nan")

    sick = _variant(tune_family["base"], tmp_path / "sick", poison)
    scored = []
    real = tn.text.window_losses
    monkeypatch.setattr(tn.text, "window_losses",
                        lambda model, *a: scored.append(model.name_or_path) or real(model, *a))
    lines = _tune_error(tune_family, tmp_path, _with_model(tune_family, tmp_path, 0, sick), ["sick", "ft1", "ft2"])
    assert lines == [f"Error: model 'sick' ({sick}): tensor {down} holds NaN or infinite values; "
                     "fix or drop that model"]
    assert str(sick) not in scored and not (tmp_path / "out").exists()


def test_tune_names_point_tensor_and_model_when_a_merged_weight_turns_nan(tune_family, tmp_path, monkeypatch):
    real = tn.WeightStore.apply
    hit = {}

    def apply(self, weights, lam):
        real(self, weights, lam)
        slot = self.slots[3]
        place = int(slot.owner.nonzero()[0])  # a place a model keeps
        slot.target.view(-1)[place] = float("nan")
        hit.update(tensor=slot.name, model=f"ft{slot.models[int(slot.owner[place]) - 1]}")

    monkeypatch.setattr(tn.WeightStore, "apply", apply)
    lines = _tune_error(tune_family, tmp_path, tune_family["config"])
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: tune: the merge at lambda 1, ft0 1, ft1 1, ft2 1 scores a non-finite loss")
    assert f"its tensor {hit['tensor']} holds NaN or infinite values, at a place '{hit['model']}' keeps" in lines[0]
    assert not (tmp_path / "out").exists()


def _summary_then_error(result, out: Path, reason: str) -> None:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert lines[-1].startswith(f"Error: tune: could not write {out}: {reason}; the summary and every YAML it "
                                "would have written are printed above (the recommended one: "), result.output
    assert "=== tuned.yml ===" in lines and "=== end of tuned.yml ===" in lines
    assert lines[0].split() == ["your", "config", "tuned"] and lines[1].startswith("lambda")
    assert "Traceback" not in result.output
    assert any(line.startswith("objective (gain)") for line in lines[:-1])


def test_tune_prints_the_result_before_a_full_disk_and_fails_in_one_line(tune_family, tmp_path, monkeypatch):
    import errno

    from mergekit_cabs._output import STAGING

    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.parent.name.startswith(STAGING) and self.name == "tune.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["tune", str(tune_family["config"]), *map(str, _data_args(tune_family)),
                                       "--out", str(out), "--budget", "9", "--max-windows", "4", "--quiet"])
    _summary_then_error(result, out, "No space left on device")
    assert not out.exists() and not [p for p in tmp_path.rglob(".*")]  # no staging folder anywhere


def test_tune_on_a_real_full_tmpfs_keeps_the_result_and_leaves_no_staging(tune_family, tmp_path):
    from test_publish import small_tmpfs

    with small_tmpfs(tmp_path / "full", "8k") as out:
        result = CliRunner().invoke(main, ["tune", str(tune_family["config"]), *map(str, _data_args(tune_family)),
                                           "--out", str(out), "--budget", "9", "--max-windows", "4", "--quiet"])
        _summary_then_error(result, out, "No space left on device")
        assert list(out.iterdir()) == []


# --- objectives without per-task data, the loss report, dropped models ------------------------


def test_tune_with_general_alone_minimises_the_general_texts_loss(tune_family, tmp_path):
    out = tmp_path / "out"
    result = _run([tune_family["config"], "--general", tune_family["general"], "--out", out, "--budget", 6,
                   "--max-windows", 4, "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "tune.json").read_text())
    assert report["objective"] == "loss" and report["reference"]["models"] == {}
    assert list(report["data"]) == ["general"]
    best = report["best"]
    assert best["fit"]["score"] == -best["fit"]["loss"]["general"] == max(p["score"] for p in report["points"])
    assert "no --data: the objective is the loss on the general text" in result.output
    line = next(x for x in result.output.splitlines() if x.startswith("objective (loss)"))
    assert line.startswith("objective (loss): loss on the general text (lower is better), your config -> tuned: fit ")
    numbers = re.findall(r"-?\d+\.\d+", line)
    assert len(numbers) == 4 and all(float(v) > 0 for v in numbers), line  # losses, not minus losses
    assert numbers[1] == f"{best['fit']['loss']['general']:.4f}"
    assert "gain" not in result.output


def test_tune_refuses_gain_with_general_alone_and_no_data_at_all(tune_family, tmp_path, no_model_loading):
    out = _bad(tune_family, tmp_path, data=[], extra=["--general", tune_family["general"], "--objective", "gain"])
    assert "--objective gain needs --data" in out and "--general alone" in out
    out = _bad(tune_family, tmp_path, data=[])
    assert "give --data MODEL=FILE for every fine-tuned model, or --lm-eval TASK, or --general FILE alone" in out


def test_loss_objective_reports_losses_and_a_positive_mean_loss(tune_family, tmp_path):
    out = tmp_path / "out"
    result = _run([tune_family["config"], *_data_args(tune_family), "--out", out, "--budget", 5, "--max-windows", 4,
                   "--objective", "loss", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "tune.json").read_text())
    lines = result.output.splitlines()
    header = next(x for x in lines if x.startswith("held-out"))
    assert header.split() == ["held-out", "measure", "base", "own", "config", "tuned", "change"]
    mean = sum(report["best"]["heldout"]["loss"].values()) / 3
    line = next(x for x in lines if x.startswith("objective (loss)"))
    assert line.startswith("objective (loss): mean loss over tasks (lower is better), your config -> tuned: fit ")
    assert line.endswith(f" -> {mean:.4f}")
    md = (out / "tune.md").read_text()
    assert "gain" not in md and "mean loss over tasks (lower is better)" in md


def test_a_model_whose_weight_ends_at_zero_is_named_dropped(tune_family, tmp_path):
    raw = json.loads(json.dumps(tune_family["raw"]))
    raw["models"][1]["parameters"]["weight"] = 0.0
    config = tmp_path / "zero.yml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    result = _run([config, *_data_args(tune_family), "--out", out, "--budget", 1, "--max-windows", 2, "--quiet"])
    assert result.exit_code == 0, result.output
    assert "dropped: ft1 (weight 0: the merge leaves its task vector out)" in result.output
    assert "| weight `ft1` | 0 | 0 (dropped) |" in (out / "tune.md").read_text()


def test_tune_with_cmaes_is_deterministic_per_seed_and_says_which_search_ran(tune_family):
    prep = tn.prepare(tune_family["config"], [f"{k}={v}" for k, v in tune_family["data"].items()], max_windows=2)
    runs = [tn.run_tune(prep, budget=6, objective="loss", optimizer="cmaes", seed=s, quiet=True) for s in (5, 5, 6)]
    points = [[(p["lambda"], *p["weights"].values()) for p in r["points"]] for r in runs]
    assert len(points[0]) == 6 and points[0] == points[1] != points[2]
    assert points[0][0] == (1.0, 1.0, 1.0, 1.0)  # the configured start is scored first
    search = runs[0]["search"]
    assert (search["optimizer"], search["optimizer_option"], search["seed"]) == ("cmaes", "cmaes", 5)
    assert "CMA-ES (the cma package), seed 5 over lambda, ft0, ft1, ft2" in tn.render_markdown(runs[0], plot=False)
    assert tn.run_tune(prep, budget=3, objective="loss", quiet=True)["search"]["optimizer"] == "coordinate"  # auto


def test_a_search_without_slopes_that_cannot_move_each_number_of_a_fine_shape_is_refused_in_one_line(
        tune_family, tmp_path, no_model_loading):
    out = _bad(tune_family, tmp_path, extra=["--coefficients", "tensor", "--optimizer", "coordinate", "--budget", "5"])
    dims = 1 + 3 * 21  # lambda, and three fine-tunes' weight for each of the 21 merged tensors of two layers
    assert out.strip().splitlines() == [f"Error: --optimizer coordinate with --budget 5 cannot move each of the {dims} "
                                        f"searched numbers once; use --optimizer gradient (or auto), or give --budget "
                                        f"{5 * (2 * dims + 1)} or more"]


def test_a_fine_tunes_safetensors_removed_before_the_store_is_built_is_one_line_naming_it(tune_family, tmp_path,
                                                                                         monkeypatch):
    from mergekit_cabs.tune import run

    config, models = _copied_family(tune_family, tmp_path)
    gone = models["ft1"] / "model.safetensors"
    scored = run.score_references

    def then_remove(*args, **kwargs):  # the fine-tunes are scored; the store, built next, reads them again
        result = scored(*args, **kwargs)
        gone.unlink()
        return result

    monkeypatch.setattr(run, "score_references", then_remove)
    args = ["tune", str(config), *map(str, _data_args(tune_family)), "--out", str(tmp_path / "out"), "--quiet",
            "--budget", "2", "--baselines", "none"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and not gone.exists(), (result.output, result.exception)
    assert result.output.strip().splitlines() == [
        f"Error: cannot read a model's tensors: No such file or directory: {gone}"]


def test_a_fine_tunes_safetensors_removed_before_it_is_scored_is_one_line_naming_it(tune_family, tmp_path,
                                                                                     monkeypatch):
    from mergekit_cabs.tune import run

    config, models = _copied_family(tune_family, tmp_path)
    gone = models["ft0"] / "model.safetensors"
    scoring = run.score_references

    def remove_then_score(*args, **kwargs):  # checked by prepare; gone when the references load it
        gone.unlink()
        return scoring(*args, **kwargs)

    monkeypatch.setattr(run, "score_references", remove_then_score)
    args = ["tune", str(config), *map(str, _data_args(tune_family)), "--out", str(tmp_path / "out"), "--quiet",
            "--budget", "2", "--baselines", "none"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: cannot load the model at {models['ft0']}: ")


def _copied_family(tune_family, tmp_path):
    """A copy of the family's models (so a test may remove a file; the family
    stays whole) and a config naming them: (config path, name -> model dir)."""
    import shutil

    paths = {"base": tune_family["base"].path, **{f"ft{i}": t.path for i, t in enumerate(tune_family["tunes"])}}
    models = {name: shutil.copytree(path, tmp_path / name) for name, path in paths.items()}
    raw = yaml.safe_load(yaml.safe_dump(tune_family["raw"]))
    raw["base_model"] = str(models["base"])
    for entry, name in zip(raw["models"], ("ft0", "ft1", "ft2")):
        entry["model"] = str(models[name])
    config = tmp_path / "cabs.yml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config, models


@pytest.mark.parametrize("optimizer, extra, warned", [
    ("coordinate", ["--learning-rate", "0.1"], "--learning-rate is the gradient search's setting; "
                                               "--optimizer coordinate does not use it."),
    ("cmaes", ["--minibatch", "4", "--learning-rate", "0.1"],
     "--minibatch and --learning-rate are the gradient search's settings; --optimizer cmaes does not use them."),
    ("gradient", ["--minibatch", "4", "--learning-rate", "0.1"], None),
    ("coordinate", [], None),
])
def test_gradient_only_options_given_to_another_search_are_named_in_one_warning(
        tune_family, tmp_path, no_model_loading, optimizer, extra, warned):
    # an unknown baseline stops the run right after the warning, before any model loads
    out = _bad(tune_family, tmp_path, extra=["--optimizer", optimizer, *extra, "--baselines", "nonesuch"])
    assert ("Warning: " + warned in out) if warned else ("Warning: --" not in out)
    assert "nonesuch" in out
