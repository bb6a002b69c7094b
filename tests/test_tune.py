"""`mergekit-cabs tune`: the weight store, the search, the outputs, the errors.

* Rebuilding a tensor from the store (owner index, or per-model tensors when
  supports overlap) equals a full `cabs_merge` bit for bit, on both kernel paths.
* The search finds known optima of synthetic objectives inside its bounds and
  budget.
* End to end on tiny generated models: the losses `tune` reports for the
  chosen point are exactly those of the model `mergekit` writes from
  tuned.yml; tuned.yml changes only the weights and lambda.
* Every bad input fails with a clear message before any model is loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from tiny_models import make_tiny_llama, optional

from mergekit_cabs import tune as tn
from mergekit_cabs.cli import main
from mergekit_cabs.kernel import cabs_masks, cabs_merge

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# --- the store: owner index / per-model tensors == cabs_merge --------------------------


def _inputs(dtype, k, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
    base.view(-1)[:7] = -0.0  # negative zeros in the base
    models = []
    for _ in range(k):
        delta = (torch.randn(shape, generator=gen) * 0.01).to(dtype)
        delta[torch.rand(shape, generator=gen) < 0.2] = 0  # unchanged weights
        models.append((base.float() + delta.float()).to(dtype))
    return base, models


CASES = [  # (K, n, block, overlap, conflict_aware, disjoint?)
    (3, 16, 64, "fill", True, True),
    (2, 32, 64, "strict", True, True),
    (3, 40, 64, "fill", True, False),  # K * n > m: overlap unavoidable
    (3, 16, 64, "fill", False, False),  # every model chooses from all places
    (1, 64, 64, "fill", True, True),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"K{c[0]}n{c[1]}m{c[2]}-{c[3]}-ca{int(c[4])}")
def test_rebuild_equals_cabs_merge(kernel_backend, dtype, case):
    k, n, m, overlap, aware, disjoint = case
    base, models = _inputs(dtype, k, (37, 50), seed=k * 100 + n)  # 1850 elements: a short last block
    masks = cabs_masks(base, models, [n] * k, m, overlap=overlap, conflict_aware=aware)
    slot = tn._Slot.make("t", tuple(range(k)), base, models, masks)
    assert (slot.owner is not None) == disjoint
    assert (slot.shared == 0) == disjoint
    for weights, lam in [((1.0, 0.8, 0.6)[:k], 1.0), ((0.0, -0.7, 1 / 3)[:k], 1.7), ((2.0, 0.0, 0.25)[:k], 1 / 3)]:
        expected = cabs_merge(base, models, list(weights), [n] * k, m, overlap=overlap, conflict_aware=aware,
                              lam=lam, out_dtype=dtype)
        got = slot.merged(weights, lam).view(base.shape)
        assert got.dtype == dtype
        assert torch.equal(_bits(got), _bits(expected)), (weights, lam)


def test_owner_store_is_compact_and_each_weight_moves_its_own_places():
    base, models = _inputs(torch.bfloat16, 3, (64, 64), seed=7)
    masks = cabs_masks(base, models, [16] * 3, 64)
    slot = tn._Slot.make("t", (0, 1, 2), base, models, masks)
    # base + kept in bf16 and a one-byte owner: 5 bytes per weight, not 3 x 2 more.
    assert slot.nbytes() == base.numel() * (2 + 2 + 1)
    before = slot.merged((1.0, 1.0, 1.0), 1.0)
    after = slot.merged((1.0, 0.3, 1.0), 1.0)
    changed = before != after
    assert changed.any()
    assert bool((slot.owner[changed] == 2).all())  # only model 2's places (index 1)


def test_slot_maps_a_subset_of_models():
    """A tensor some fine-tunes lack: its inputs index into the full weight vector."""
    base, models = _inputs(torch.float32, 2, (8, 64), seed=3)
    masks = cabs_masks(base, models, [16, 16], 64)
    slot = tn._Slot.make("t", (0, 2), base, models, masks)
    expected = cabs_merge(base, models, [0.5, 1.5], [16, 16], 64, out_dtype=torch.float32)
    assert torch.equal(slot.merged((0.5, 99.0, 1.5), 1.0).view(base.shape), expected)


# --- the search ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", [(0.37, 1.61, 0.9), (1.0, 0.05, 1.95), (0.0, 2.0, 1.3)])
def test_search_finds_the_optimum_of_a_separable_objective(target):
    calls = []

    def objective(x):
        calls.append(x)
        return -sum((a - b) ** 2 for a, b in zip(x, target))

    result = tn.coordinate_search(objective, (1.0, 1.0, 1.0), [(0.0, 2.0)] * 3, budget=200, tolerance=0.01)
    assert result.stopped == "converged"
    assert all(abs(a - b) <= 0.01 for a, b in zip(result.best, target)), result.best
    assert len(calls) == len(set(calls)) == len(result.history)  # no point twice
    assert result.score == max(s for _, s in result.history)


def test_search_with_coupled_coordinates_and_an_optimum_outside_the_box():
    # optimum of the unconstrained problem at (3, -1): the box's best point is (2, 0)
    def objective(x):
        a, b = x[0] - 3, x[1] + 1
        return -(a * a + b * b + 0.5 * a * b)

    result = tn.coordinate_search(objective, (1.0, 1.0), [(0.0, 2.0), (0.0, 2.0)], budget=200, tolerance=0.01)
    assert result.best == (2.0, 0.0)
    # a coupled interior optimum: -(x-1)^2 - (y-0.5)^2 - (x-1)(y-0.5)
    result = tn.coordinate_search(
        lambda x: -((x[0] - 1) ** 2 + (x[1] - 0.5) ** 2 + (x[0] - 1) * (x[1] - 0.5)),
        (0.0, 2.0), [(-2.0, 2.0), (-2.0, 2.0)], budget=300, tolerance=0.005,
    )
    assert abs(result.best[0] - 1) < 0.03 and abs(result.best[1] - 0.5) < 0.03, result.best


def test_search_keeps_to_its_budget_and_bounds():
    seen = []

    def objective(x):
        seen.append(x)
        return math.sin(5 * x[0]) + math.cos(3 * x[1])

    result = tn.coordinate_search(objective, (5.0, -5.0), [(0.0, 1.0), (-1.0, 1.0)], budget=7, tolerance=1e-6)
    assert result.stopped == "budget" and len(seen) == 7
    assert seen[0] == (1.0, -1.0)  # the start, clipped into the box
    assert all(0 <= a <= 1 and -1 <= b <= 1 for a, b in seen)
    again = tn.coordinate_search(objective, (5.0, -5.0), [(0.0, 1.0), (-1.0, 1.0)], budget=7, tolerance=1e-6)
    assert again.history == result.history  # deterministic


# --- end to end on tiny models --------------------------------------------------------------


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


def _merge(config: dict, out: Path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True, copy_tokenizer=False))
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def test_tune_reports_the_scores_of_the_model_mergekit_writes(tune_family, tmp_path):
    out = tmp_path / "tuned"
    result = _run([tune_family["config"], *_data_args(tune_family), "--general", tune_family["general"],
                   "--out", out, "--budget", 25, "--quiet"])
    assert result.exit_code == 0, result.output
    optional("matplotlib", "plot")
    assert sorted(p.name for p in out.iterdir()) == ["tune.json", "tune.md", "tune.png", "tuned.yml"]
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

    # the written model scores exactly what tune reported, on both splits
    model = _merge(tuned, tmp_path / "merged")
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


def test_tune_with_overlapping_supports_still_matches_mergekit(tune_family, tmp_path):
    raw = json.loads(json.dumps(tune_family["raw"]))
    raw["parameters"]["conflict_aware"] = False
    config = tmp_path / "overlap.yml"
    config.write_text(yaml.safe_dump(raw))
    prep = tn.prepare(config, [f"{k}={v}" for k, v in tune_family["data"].items()], max_windows=4)
    report = tn.run_tune(prep, budget=4, objective="loss", quiet=True)
    assert not report["supports"]["disjoint"] and report["supports"]["shared_places"] > 0
    assert report["objective"] == "loss"
    assert report["best"]["fit"]["score"] == -sum(report["best"]["fit"]["loss"].values()) / 3
    model = _merge(report["tuned_config"], tmp_path / "merged")
    for task in prep.tasks:
        got = float(tn.window_losses(model, task.heldout, tn.DEFAULTS["batch_size"]).mean())
        assert got == report["best"]["heldout"]["loss"][task.name]


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
    assert "line 2 has no string field 'text'" in out
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

    from mergekit_cabs.analyze import plan

    return plan(MergeConfiguration.model_validate(raw))


class _CountingTokenizer:
    """Token i of the text is the number i: windows are easy to recognise."""

    eos_token_id = None

    def __call__(self, text, add_special_tokens=False, verbose=True):
        return {"input_ids": [int(w) for w in text.split()]}


@pytest.mark.parametrize("fraction, held", [(0.5, [1, 3, 5, 7, 9]), (0.7, [3, 6, 9]), (0.2, [1, 2, 3, 4, 6, 7, 8, 9])])
def test_split_spreads_held_out_windows_along_the_file(tmp_path, fraction, held):
    path = tmp_path / "d.txt"
    path.write_text(" ".join(str(i) for i in range(43)))  # 10 windows of 4, 3 tokens left over
    data = tn.load_task_data("d", path, _CountingTokenizer(), window=4, fit_fraction=fraction, max_windows=64)
    assert [int(w[0]) // 4 for w in data.heldout] == held
    assert sorted([int(w[0]) // 4 for w in data.fit] + held) == list(range(10))
    thinned = tn.load_task_data("d", path, _CountingTokenizer(), window=4, fit_fraction=0.5, max_windows=2)
    assert [int(w[0]) // 4 for w in thinned.fit] == [0, 8] and [int(w[0]) // 4 for w in thinned.heldout] == [1, 9]
