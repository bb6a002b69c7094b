"""`tune --layer-groups`: one weight per model for each group of consecutive
decoder layers (and one for the tensors outside the layers).

* the groups split the layers in order, sizes differing by at most one;
* the store, set to per-group weights, holds bit for bit the tensors
  `mergekit-yaml tuned.yml` writes, for every tensor;
* tuned.yml says the per-group weights with mergekit filters that re-plan to
  exactly the chosen numbers on every tensor, for models: and slices:
  configurations (a slice whose layers come from other input layers too);
* the scores tune reports are those of the model mergekit writes from it.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from mergekit_cabs import tune as tn
from mergekit_cabs.cli import main
from mergekit_cabs.tune.groups import make_columns

from tiny_models import make_tiny_llama

LAYERS = 5


@pytest.fixture(scope="module")
def family(tiny_root):
    """A bf16 base with five decoder layers and two fine-tunes (disjoint supports)."""
    root = tiny_root / "groups"
    base = make_tiny_llama(root / "base", seed=3, layers=LAYERS, dtype=torch.bfloat16)
    tunes = [make_tiny_llama(root / f"ft{i}", seed=20 + i, base=base, scale=3, dtype=torch.bfloat16)
             for i in range(2)]
    raw = {"merge_method": "cabs", "base_model": str(base.path),
           "models": [{"model": str(t.path), "parameters": {"weight": 1.0, "density": 0.25}} for t in tunes],
           "parameters": {"block_size": 64, "lambda": 1.0}, "dtype": "bfloat16"}
    return {"root": root, "base": base, "tunes": tunes, "raw": raw}


def _plan(raw: dict):
    from mergekit.config import MergeConfiguration

    from mergekit_cabs.planning import plan

    return plan(MergeConfiguration.model_validate(raw))


def _fine_tunes(planned):
    return next(p.models for p in planned if p.models)


# --- the groups -------------------------------------------------------------------------


def test_layer_index_is_the_first_number_in_the_name():
    assert tn.layer_index("model.layers.12.mlp.experts.3.w1.weight") == 12
    assert tn.layer_index("model.embed_tokens.weight") is None and tn.layer_index("lm_head.weight") is None


@pytest.mark.parametrize("count, spans", [
    (1, [(0, 1, 2, 3, 4)]), (2, [(0, 1, 2), (3, 4)]), (3, [(0, 1), (2, 3), (4,)]), (5, [(i,) for i in range(5)]),
])
def test_groups_split_the_layers_in_order_sizes_differing_by_at_most_one(count, spans):
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(LAYERS)] + ["model.norm.weight"]
    groups = tn.make_groups(names, count)
    assert [list(s) for s in groups.spans] == [list(s) for s in spans]
    assert groups.count == count + 1 and groups.labels()[-1] == "embeddings/norm/head"
    assert [groups.of(n) for n in names] == [g for g, s in enumerate(spans) for _ in s] + [count]
    assert tn.make_groups(names, None).count == 1 and tn.make_groups(names, None).of(names[0]) == 0


def test_more_groups_than_layers_is_one_line_naming_the_layer_count():
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(LAYERS)]
    with pytest.raises(tn.TuneError, match=r"--layer-groups is 6; this merge writes 5 decoder layers: give 1 to 5"):
        tn.make_groups(names, 6)
    with pytest.raises(tn.TuneError, match="whole number >= 1"):
        tn.make_groups(names, 0)


def test_a_weight_that_varies_within_a_group_is_refused_but_one_per_group_is_the_start(family, tmp_path):
    raw = json.loads(json.dumps(family["raw"]))
    raw["models"][0]["parameters"]["weight"] = [{"filter": "model.layers.4.", "value": 0.5}, {"value": 1.0}]
    planned = _plan(raw)
    refs = _fine_tunes(planned)
    by_layer = tn.make_groups([p.name for p in planned], LAYERS)  # layer 4 alone: its own number
    weights, _ = tn.configured_numbers(planned, refs, by_layer)
    assert weights[:by_layer.count] == [1.0, 1.0, 1.0, 1.0, 0.5, 1.0]
    with pytest.raises(tn.TuneError, match="within layer group 'layers 3-4'"):
        tn.configured_numbers(planned, refs, tn.make_groups([p.name for p in planned], 2))


# --- the store rebuilds mergekit's merge of tuned.yml, group by group ----------------------


def _point(groups, models: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    return [round(float(v), 3) for v in torch.rand(models * groups.count, generator=gen) * 2]


@pytest.mark.parametrize("incremental", [False, True])
def test_per_group_weights_rebuild_the_merge_of_tuned_yml_bit_for_bit(family, tmp_path, incremental):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    planned = _plan(family["raw"])
    refs = _fine_tunes(planned)
    groups = tn.make_groups([p.name for p in planned], 2)
    model = tn.load_model(str(family["base"].path), "cpu", torch.bfloat16)
    store = tn.build_store(planned, refs, model, device="cpu", progress=False)
    store.incremental = incremental
    for slot in store.slots:
        slot.group = groups.of(slot.name)
    assert {slot.group for slot in store.slots} == {0, 1, 2}
    first = _point(groups, 2, seed=1)
    moved = list(first)
    moved[1] = 0.0  # ft0 left out of layers 3-4: a one-group change (incremental rewrites only that group)
    for i, (weights, lam) in enumerate([(first, 0.8), (moved, 0.8)]):
        store.apply(groups.rows(weights, 2), lam)
        tuned = tn.tuned_config(family["raw"], refs, weights, lam, groups)
        out = tmp_path / f"merged{i}"
        run_merge(MergeConfiguration.model_validate(tuned), str(out),
                  MergeOptions(quiet=True, copy_tokenizer=False))
        written = load_file(str(out / "model.safetensors"))
        live = model.state_dict()
        assert set(written) <= set(live)
        for name, tensor in written.items():
            assert tn.same_bits(live[name], tensor), name


# --- tuned.yml with layer groups re-plans to the chosen numbers ---------------------------


def _slices(family, pieces) -> dict:
    base, tunes = family["base"], family["tunes"]
    out = []
    for first, last in pieces:
        sources = [{"model": str(base.path), "layer_range": [first, last]}] + [
            {"model": str(t.path), "layer_range": [first, last], "parameters": {"weight": 1.0, "density": 0.25}}
            for t in tunes]
        out.append({"sources": sources})
    return {"merge_method": "cabs", "base_model": str(base.path), "slices": out,
            "parameters": {"block_size": 64, "lambda": 1.0}, "dtype": "bfloat16"}


@pytest.mark.parametrize("shape", ["models", "slices", "slices-reordered"])
def test_tuned_yml_with_layer_groups_replans_to_the_chosen_weights(family, shape):
    """Every tensor of the re-planned tuned.yml takes its own model's weight
    for its output layer's group; in the reordered slices the output layers
    0-2 come from input layers 2-4 and 3-4 from 0-1 (filters name input layers)."""
    raw = {"models": family["raw"], "slices": _slices(family, [(0, 2), (2, 5)]),
           "slices-reordered": _slices(family, [(2, 5), (0, 2)])}[shape]
    planned = _plan(raw)
    refs = _fine_tunes(planned)
    groups = tn.make_groups([p.name for p in planned], 3)
    weights = _point(groups, 2, seed=7)
    tuned = tn.tuned_config(raw, refs, weights, 0.6, groups)
    tn.check_round_trip(tuned, refs, weights, 0.6, groups)  # raises if any tensor disagrees
    replanned = _plan(tuned)
    for p in replanned:
        for ref, w in zip(p.models, p.resolved.weights):
            assert w == weights[refs.index(ref) * groups.count + groups.of(p.name)], p.name
    assert len({w for p in replanned for w in p.resolved.weights}) == len(set(weights)) > 4
    item = (tuned["models"] if shape == "models" else tuned["slices"][0]["sources"])[-1]
    filters = [entry.get("filter") for entry in item["parameters"]["weight"]]
    assert filters[-1] is None and all(f.startswith("model.layers.") and f.endswith(".") for f in filters[:-1])
    with pytest.raises(RuntimeError, match="resolves to"):
        tn.check_round_trip(raw, refs, weights, 0.6, groups)


# --- tune --layer-groups end to end -------------------------------------------------------


def test_tune_with_layer_groups_reports_the_scores_of_the_model_mergekit_writes(family, tmp_path):
    from transformers import AutoModelForCausalLM

    root, config = family["root"], _with_data(family)
    out = tmp_path / "tuned"
    args = ["tune", config, "--data", f"ft0={root / 'ft0.txt'}", "--data", f"ft1={root / 'ft1.txt'}",
            "--objective", "loss", "--layer-groups", 2, "--budget", 8, "--max-windows", 3, "--out", out, "--quiet"]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "layer groups (2 of consecutive decoder layers" in result.output
    report = json.loads((out / "tune.json").read_text())
    assert report["search"]["names"] == ["lambda"] + [f"ft{i}: {g}" for i in range(2) for g in
                                                      ("layers 0-2", "layers 3-4", "embeddings/norm/head")]
    assert report["layer_groups"]["groups"][1] == {"name": "layers 3-4", "layers": [3, 4]}
    tuned = yaml.safe_load((out / "tuned.yml").read_text())
    assert isinstance(tuned["models"][0]["parameters"]["weight"], list)

    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(tuned), str(tmp_path / "merged"),
              MergeOptions(quiet=True, copy_tokenizer=False))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16).eval()
    prep = tn.prepare(config, [f"ft{i}={root / f'ft{i}.txt'}" for i in range(2)], max_windows=3, layer_groups=2)
    best = report["best"]
    for task in prep.tasks:
        for split in tn.SPLITS:
            losses = tn.window_losses(model, getattr(task, split), tn.DEFAULTS["batch_size"])
            assert losses.tolist() == best[split]["window_losses"][task.name], (task.name, split)


def test_a_modules_configuration_is_refused_before_anything_is_loaded(family, tmp_path):
    raw = {k: v for k, v in family["raw"].items() if k != "models"}
    raw["modules"] = {"decoder": {"models": family["raw"]["models"]}}
    config = tmp_path / "modules.yml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(tn.TuneError, match=r"modules.yml uses modules:; tune sets weights in models: and slices:"):
        tn.prepare(config, [], general=tmp_path / "unread.txt", layer_groups=2)


# --- --coefficients: one weight per model per merged tensor -------------------------------


@pytest.mark.parametrize("shape", ["models", "slices", "slices-reordered"])
def test_tuned_yml_per_tensor_replans_to_the_chosen_weights(family, shape):
    """Every tensor of the re-planned tuned.yml takes its own model's weight
    for that tensor; in slices the filters name each source's input layers."""
    raw = {"models": family["raw"], "slices": _slices(family, [(0, 2), (2, 5)]),
           "slices-reordered": _slices(family, [(2, 5), (0, 2)])}[shape]
    planned = _plan(raw)
    refs = _fine_tunes(planned)
    columns = make_columns([p.name for p in planned if p.models], "tensor", None)
    weights = _point(columns, 2, seed=3)
    tuned = tn.tuned_config(raw, refs, weights, 0.6, columns)
    tn.check_round_trip(tuned, refs, weights, 0.6, columns)  # raises if any tensor disagrees
    replanned = _plan(tuned)
    for p in replanned:
        for ref, w in zip(p.models, p.resolved.weights):
            assert w == weights[refs.index(ref) * columns.count + columns.of(p.name)], p.name
    assert len({w for p in replanned for w in p.resolved.weights}) == len(set(weights)) > columns.count


def test_the_shapes_and_layer_groups_are_checked_in_one_line():
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    assert make_columns(names, None, None).count == 1
    assert make_columns(names, "layer", None).count == 3  # two layers, then the tensors outside them
    assert make_columns(names, None, 1).count == 2 and make_columns(names, "tensor", None).count == 3
    for shape in ("model", "tensor"):
        with pytest.raises(tn.TuneError) as error:
            make_columns(names, shape, 2)
        assert str(error.value) == (f"--layer-groups 2 sets one weight per model per group of layers; it goes with "
                                    f"--coefficients layer (or alone), not {shape}")


@pytest.mark.parametrize("coefficients, optimizer", [("model", "coordinate"), ("layer", "gradient"),
                                                     ("tensor", "gradient")])
def test_each_coefficient_shape_reports_the_scores_of_the_model_mergekit_writes(family, tmp_path, coefficients,
                                                                                 optimizer):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers import AutoModelForCausalLM

    root, config = family["root"], _with_data(family)
    out = tmp_path / "tuned"
    args = ["tune", config, "--data", f"ft0={root / 'ft0.txt'}", "--data", f"ft1={root / 'ft1.txt'}",
            "--objective", "loss", "--coefficients", coefficients, "--optimizer", optimizer, "--budget", 8,
            "--max-windows", 4, "--out", out, "--quiet", "--baselines", "none"]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "tune.json").read_text())
    assert report["search"]["optimizer"] == optimizer
    columns = {"model": 1, "layer": 6, "tensor": report["supports"]["merged_tensors"]}[coefficients]  # 5 layers
    assert len(report["search"]["names"]) == 1 + 2 * columns
    tuned = yaml.safe_load((out / "tuned.yml").read_text())
    run_merge(MergeConfiguration.model_validate(tuned), str(tmp_path / "merged"),
              MergeOptions(quiet=True, copy_tokenizer=False))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16).eval()
    prep = tn.prepare(config, [f"ft{i}={root / f'ft{i}.txt'}" for i in range(2)], max_windows=4,
                      coefficients=coefficients)
    for task in prep.tasks:
        for split in tn.SPLITS:
            losses = tn.window_losses(model, getattr(task, split), tn.DEFAULTS["batch_size"])
            assert losses.tolist() == report["best"][split]["window_losses"][task.name], (task.name, split)


def _with_data(family):
    """Each fine-tune's data (its own deterministic word stream) beside the
    family, and the family's config written there; the config's path."""
    root, words = family["root"], family["base"].words[3:]
    for i in range(2):
        gen = torch.Generator().manual_seed(50 + i)
        ids = torch.randint(0, len(words) // 2, (600,), generator=gen) + i * (len(words) // 2)
        (root / f"ft{i}.txt").write_text(" ".join(words[j] for j in ids.tolist()))
    config = root / "cabs.yml"
    config.write_text(yaml.safe_dump(family["raw"], sort_keys=False))
    return config
