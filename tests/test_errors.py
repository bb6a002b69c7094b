"""What users must see when a cabs configuration or an input is bad.

SPEC.md "What users must see": a bad configuration fails before any tensor
is merged, naming the parameter, the model and the allowed values; a NaN or
infinite input names the model and the tensor; unavoidable overlap is said
once, with the numbers.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_models import run_cli, run_in_process

LATE = "model.layers.2."  # the last layer of the 3-layer bf16 family


def base_config(base, tunes, p1=None, p2=None, shared=None, with_base=True):
    config = {
        "merge_method": "cabs",
        "models": [
            {"model": str(tunes[0].path), "parameters": dict(p1 or {})},
            {"model": str(tunes[1].path), "parameters": dict(p2 or {})},
        ],
        "parameters": {"block_size": 16, **(shared or {})},
    }
    if with_base:
        config["base_model"] = str(base.path)
    return config


def assert_nothing_written(out: Path):
    if not out.exists():
        return
    leftovers = sorted(p.name for p in out.iterdir())
    assert not [n for n in leftovers if n.endswith(".safetensors") or n == "config.json"], leftovers


def merge_error(config, out: Path) -> str:
    """Run in process; return the error text, after checking no output."""
    with pytest.raises(Exception) as info:
        run_in_process(config, out)
    assert_nothing_written(out)
    return str(info.value)


def has_all(text: str, *needles: str):
    for needle in needles:
        assert needle in text, f"{needle!r} not in message:\n{text}"


# ---------------------------------------------------------------------------
# configuration errors (in process: message + nothing written)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p1,shared,needles",
    [
        ({"n": 20}, {}, ["'n'", "20", "block_size=16", "[1,"]),
        ({"n": 0}, {}, ["'n'", "[1,"]),
        ({"n": 2, "density": 0.5}, {}, ["'n'", "'density'", "both"]),
        ({"density": 0}, {}, ["'density'", "(0, 1]"]),
        ({"density": 1.5}, {}, ["'density'", "(0, 1]", "1.5"]),
        ({"density": -0.25}, {}, ["'density'", "(0, 1]"]),
        # density * m < 0.5: a block would keep nothing.
        ({"density": 0.02}, {}, ["'density'", "0.02", "block_size=16"]),
    ],
    ids=["n-above-m", "n-zero", "n-and-density", "density-0", "density-1.5",
         "density-negative", "density-too-small"],
)
def test_per_model_errors_name_parameter_model_and_range(bf16_family, tmp_path, p1, shared, needles):
    base, tunes = bf16_family
    text = merge_error(base_config(base, tunes, p1=p1, shared=shared), tmp_path / "out")
    has_all(text, "cabs", str(tunes[0].path), *needles)
    assert str(tunes[1].path) not in text


def test_n_and_density_at_different_levels(bf16_family, tmp_path):
    """A global `density` plus a model's own `n` is still both for that model."""
    base, tunes = bf16_family
    config = base_config(base, tunes, p2={"n": 4}, shared={"density": 0.5})
    text = merge_error(config, tmp_path / "out")
    has_all(text, "'n'", "'density'", str(tunes[1].path))


@pytest.mark.parametrize(
    "shared,needles",
    [
        ({"block_size": 0}, ["'block_size'", ">= 1"]),
        ({"block_size": -16}, ["'block_size'", ">= 1"]),
        ({"overlap": "greedy"}, ["'overlap'", "fill", "strict", "greedy"]),
        ({"conflict_aware": "maybe"}, ["'conflict_aware'", "true", "false"]),
        ({"balanced": "sometimes"}, ["'balanced'", "true", "false"]),
        ({"lambda": "big"}, ["'lambda'"]),
    ],
    ids=["block-0", "block-negative", "overlap", "conflict-aware", "balanced", "lambda"],
)
def test_shared_parameter_errors(bf16_family, tmp_path, shared, needles):
    base, tunes = bf16_family
    text = merge_error(base_config(base, tunes, shared=shared), tmp_path / "out")
    has_all(text, "cabs", *needles)


def test_no_base_model(bf16_family, tmp_path):
    base, tunes = bf16_family
    text = merge_error(base_config(base, tunes, with_base=False), tmp_path / "out")
    has_all(text, "cabs", "base_model")


def test_unknown_parameter_is_not_silently_ignored(bf16_family):
    from mergekit.merge_methods import merge_tensors

    base, tunes = bf16_family
    name = "model.norm.weight"
    with pytest.raises(TypeError, match="densty"):
        merge_tensors(
            [base.state[name], tunes[0].state[name]],
            "cabs",
            base_index=0,
            parameters={"densty": 0.5},
        )


@pytest.mark.parametrize(
    "p2,needle",
    [
        ({"density": [0.25, 0.01]}, "'density'"),  # 0.01 * 16 < 0.5 at t = 1 only
        ({"n": [4, 20]}, "'n'"),  # 20 > block_size at t = 1 only
    ],
    ids=["density-gradient", "n-gradient"],
)
def test_gradient_invalid_only_in_last_layer(bf16_family, tmp_path, p2, needle):
    """The first tensors are fine; only the last layer's resolved value is
    bad. The run must still fail before writing anything, naming the tensor."""
    base, tunes = bf16_family
    text = merge_error(base_config(base, tunes, p2=p2), tmp_path / "out")
    has_all(text, needle, str(tunes[1].path), LATE)


def test_filter_invalid_on_one_tensor_kind(bf16_family, tmp_path):
    base, tunes = bf16_family
    p1 = {"density": [{"filter": "v_proj", "value": 2.0}, {"value": 0.25}]}
    text = merge_error(base_config(base, tunes, p1=p1), tmp_path / "out")
    has_all(text, "'density'", str(tunes[0].path), "v_proj", "(0, 1]")


@pytest.mark.parametrize("p1", [{"density": "lots"}, {"weight": "x"}, {"n": 2.5}])
def test_badly_typed_per_model_value_names_the_model(bf16_family, tmp_path, p1):
    base, tunes = bf16_family
    text = merge_error(base_config(base, tunes, p1=p1), tmp_path / "out")
    has_all(text, next(iter(p1)), str(tunes[0].path))


def test_density_too_small_unbalanced(bf16_family, tmp_path):
    base, tunes = bf16_family
    config = base_config(
        base, tunes, p1={"density": 0.001}, shared={"balanced": False, "block_size": 256}
    )
    text = merge_error(config, tmp_path / "out")
    has_all(text, "'density'", str(tunes[0].path))


# ---------------------------------------------------------------------------
# the same through the console script: exit status, message, nothing written
# ---------------------------------------------------------------------------


def test_cli_late_gradient_error(bf16_family, tmp_path):
    base, tunes = bf16_family
    config = base_config(base, tunes, p2={"density": [0.25, 0.01]})
    out = tmp_path / "out"
    proc = run_cli(config, tmp_path / "config.yml", out)
    assert proc.returncode != 0
    has_all(proc.stderr, "'density'", str(tunes[1].path), LATE, "0.01")
    assert_nothing_written(out)


def test_cli_n_above_block_size(bf16_family, tmp_path):
    base, tunes = bf16_family
    config = base_config(base, tunes, p1={"n": 17})
    out = tmp_path / "out"
    proc = run_cli(config, tmp_path / "config.yml", out)
    assert proc.returncode != 0
    has_all(proc.stderr, "'n'", "17", str(tunes[0].path), "block_size=16")
    assert_nothing_written(out)


# ---------------------------------------------------------------------------
# non-finite inputs
# ---------------------------------------------------------------------------


def poisoned_copy(model, dest: Path, tensor: str, value: float) -> Path:
    shutil.copytree(model.path, dest)
    state = load_file(str(dest / "model.safetensors"))
    bad = state[tensor].clone()
    bad.view(-1)[bad.numel() // 2 + 3] = value
    state[tensor] = bad
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_cli_nan_names_model_and_tensor(bf16_family, tmp_path):
    base, tunes = bf16_family
    tensor = LATE + "mlp.down_proj.weight"
    sick = poisoned_copy(tunes[1], tmp_path / "sick", tensor, float("nan"))
    config = base_config(base, tunes)
    config["models"][1]["model"] = str(sick)
    proc = run_cli(config, tmp_path / "config.yml", tmp_path / "out")
    assert proc.returncode != 0
    has_all(proc.stderr, str(sick), tensor)
    assert re.search(r"nan", proc.stderr, re.IGNORECASE)


def test_inf_in_base_names_base_and_tensor(bf16_family, tmp_path):
    base, tunes = bf16_family
    tensor = "model.layers.1.self_attn.k_proj.weight"
    sick = poisoned_copy(base, tmp_path / "sick_base", tensor, float("inf"))
    config = base_config(base, tunes)
    config["base_model"] = str(sick)
    with pytest.raises(Exception) as info:
        run_in_process(config, tmp_path / "out")
    text = str(info.value)
    has_all(text, tensor)
    assert "base" in text.lower()
    assert re.search(r"inf", text, re.IGNORECASE)


def test_nan_through_merge_tensors_names_input_and_tensor():
    from mergekit.merge_methods import merge_tensors

    base = torch.zeros(40)
    good = torch.ones(40)
    bad = torch.ones(40)
    bad[37] = float("nan")
    with pytest.raises(ValueError) as info:
        merge_tensors(
            [base, good, bad],
            "cabs",
            ids=["base", "good-model", "bad-model"],
            base_index=0,
            name="layer.weight",
            parameters={"block_size": 16},
        )
    has_all(str(info.value), "bad-model", "layer.weight")
    assert "good-model" not in str(info.value)


# ---------------------------------------------------------------------------
# unavoidable overlap: said once, with the numbers
# ---------------------------------------------------------------------------


def overlap_records(caplog):
    return [
        r for r in caplog.records
        if r.levelno >= logging.WARNING and "overlap" in r.getMessage().lower()
    ]


def test_overlap_warning_once_per_merge(bf16_family, tmp_path, caplog):
    """n = 8 + 6 > block_size 13: one warning for the whole model (dozens of
    tensors), carrying the numbers. (This exact setting is used nowhere else.)"""
    base, tunes = bf16_family
    config = base_config(base, tunes, p1={"n": 8}, p2={"n": 6}, shared={"block_size": 13})
    with caplog.at_level(logging.WARNING):
        run_in_process(config, tmp_path / "out")
    hits = overlap_records(caplog)
    assert len(hits) == 1, [r.getMessage() for r in hits]
    has_all(hits[0].getMessage(), "13", "8", "6", "14")


def test_overlap_warning_repeats_for_a_second_merge(bf16_family, tmp_path, caplog):
    base, tunes = bf16_family
    config = base_config(base, tunes, p1={"n": 9}, p2={"n": 8}, shared={"block_size": 15})
    run_in_process(config, tmp_path / "first")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_in_process(config, tmp_path / "second")
    assert len(overlap_records(caplog)) == 1


@pytest.mark.parametrize(
    "p1,p2,shared",
    [
        ({"n": 8}, {"n": 8}, {}),  # K * n == m: disjoint is still possible
        ({"n": 12}, {"n": 12}, {"conflict_aware": False}),  # overlap by design
    ],
    ids=["exactly-full", "not-conflict-aware"],
)
def test_no_overlap_warning(bf16_family, tmp_path, caplog, p1, p2, shared):
    base, tunes = bf16_family
    config = base_config(base, tunes, p1=p1, p2=p2, shared=shared)
    with caplog.at_level(logging.WARNING):
        run_in_process(config, tmp_path / "out")
    assert overlap_records(caplog) == []


def test_density_boundary_half_a_place():
    """density * m == 0.5 keeps one place per block (allowed); just below is
    an error."""
    from mergekit.merge_methods import merge_tensors

    base, tune = torch.zeros(17), torch.arange(1.0, 18.0)
    got = merge_tensors(
        [base, tune], "cabs", base_index=0, parameters={"block_size": 16, "density": 1 / 32}
    )
    want = torch.zeros(17)
    want[15] = 16.0  # the largest |tau| of the full block; the tail rounds to 0
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="'density'.*0.031"):
        merge_tensors(
            [base, tune], "cabs", base_index=0, parameters={"block_size": 16, "density": 0.031}
        )


def test_short_last_block_overlap_is_said_once(caplog):
    """n = 8 + 8 fills a block of 16, but on a 1-element tail both quotas
    round up to 1: overlap there is unavoidable, and the merge says so once."""
    from mergekit.merge_methods import merge_state_dicts

    g = torch.Generator().manual_seed(5)
    shapes = {"a": (17,), "b": (33,)}  # two tensors, both with a 1-element tail
    models = {
        key: {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}
        for key in ("base", "x", "y")
    }
    with caplog.at_level(logging.WARNING):
        merge_state_dicts(models, "cabs", base="base", parameters={"n": 8, "block_size": 16})
    hits = overlap_records(caplog)
    assert len(hits) == 1, [r.getMessage() for r in hits]
    has_all(hits[0].getMessage(), "short last block of 1 elements", "[1, 1]")


@pytest.mark.parametrize(
    "p1,shared,needles",
    [
        ({"densty": 0.5}, {}, ["unknown parameter 'densty'", "for model", "density"]),
        ({}, {"lamda": 2.0}, ["unknown parameter 'lamda'", "lambda"]),
        ({"block_size": 8}, {}, ["'block_size' is shared", "for model", "top-level"]),
        ({"overlap": "strict"}, {}, ["'overlap' is shared", "for model"]),
    ],
    ids=["typo-per-model", "typo-global", "shared-set-per-model", "overlap-per-model"],
)
def test_parameter_names_mergekit_would_ignore(bf16_family, tmp_path, p1, shared, needles):
    """mergekit only looks up the names a method declares: without this check
    these settings would be dropped without a word."""
    base, tunes = bf16_family
    text = merge_error(base_config(base, tunes, p1=p1, shared=shared), tmp_path / "out")
    has_all(text, "cabs", *needles)
    if "for model" in needles:
        has_all(text, str(tunes[0].path))


def test_parameter_names_in_slices(bf16_family, tmp_path):
    base, tunes = bf16_family
    config = {
        "merge_method": "cabs",
        "base_model": str(base.path),
        "slices": [{
            "sources": [
                {"model": str(base.path), "layer_range": [0, 3]},
                {"model": str(tunes[0].path), "layer_range": [0, 3], "parameters": {"wieght": 1}},
            ],
        }],
        "parameters": {"block_size": 16},
    }
    has_all(merge_error(config, tmp_path / "out"), "unknown parameter 'wieght'", str(tunes[0].path))
