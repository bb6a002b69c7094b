"""End to end: `merge_method: cabs` through mergekit's real entry points.

Every output tensor is compared with an independent per-tensor computation
(`tiny_models.expected_cabs`, written from SPEC.md), never with the package's
own kernel. Entry points: the `mergekit-yaml` console script (subprocess),
`mergekit.merge.run_merge`, `merge_state_dicts` and `merge_tensors`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tiny_models import (
    CUDA_TEST_DEVICE,
    aligned_vocab_rows,
    assert_matches,
    cabs_is_installed,
    cli_command,
    expected_cabs,
    gradient_value,
    layer_t,
    load_output,
    quota_from_density,
    run_cli,
    run_in_process,
)

README_LINK = "[CABS](https://arxiv.org/abs/2503.01874)"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def expected_state(
    base,
    tunes,
    params_for: Callable[[str], dict],
    names: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Expected float64 tensors for a `models:` merge (names map 1:1)."""
    out = {}
    for name in names or sorted(base.state):
        p = params_for(name)
        out[name] = expected_cabs(
            base.state[name], [t.state[name] for t in tunes], **p
        )
    return out


def compare_all(
    actual: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    dtype,
    via=None,
):
    assert set(actual) == set(expected), (
        sorted(set(actual) ^ set(expected))
    )
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == dtype, (name, got.dtype, dtype)
        assert_matches(got, want, name, via=via)


def two_model_yaml(base, tunes, **shared) -> dict:
    return {
        "merge_method": "cabs",
        "base_model": str(base.path),
        "models": [
            {"model": str(tunes[0].path), "parameters": {"weight": 0.5, "density": 0.25}},
            {"model": str(tunes[1].path), "parameters": {"weight": 0.75, "n": 5}},
        ],
        "parameters": {"block_size": 16, "lambda": 1.5, **shared},
    }


def two_model_params(name):
    return dict(
        weights=[0.5, 0.75],
        densities=[0.25, None],
        ns=[None, 5],
        block_size=16,
        lam=1.5,
    )


@pytest.fixture(scope="module")
def cli_two(bf16_family, tmp_path_factory):
    """base + 2 fine-tunes through the real `mergekit-yaml` console script."""
    base, tunes = bf16_family
    work = tmp_path_factory.mktemp("cli_two")
    config = two_model_yaml(base, tunes[:2])
    proc = run_cli(config, work / "config.yml", work / "out")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return config, work / "out", proc


# ---------------------------------------------------------------------------
# console script
# ---------------------------------------------------------------------------


def test_cli_two_finetunes_every_tensor(bf16_family, cli_two):
    base, tunes = bf16_family
    _, out, _ = cli_two
    actual = load_output(out)
    compare_all(actual, expected_state(base, tunes[:2], two_model_params), torch.bfloat16)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == base.config["num_hidden_layers"]
    assert cfg["vocab_size"] == len(base.words)


def test_cli_is_the_plain_console_script(cli_two):
    """Once the package is installed, the run above was plain `mergekit-yaml`
    (no wrapper, no `import mergekit_cabs`)."""
    import sys

    if not cabs_is_installed():
        pytest.skip("mergekit-cabs is not installed in this environment")
    config, out, proc = cli_two
    command = cli_command("c.yml", "out")
    assert command[0] == str(Path(sys.executable).parent / "mergekit-yaml")
    assert len(command) == 3


# ---------------------------------------------------------------------------
# mergekit's device and memory options (those that run without a GPU)
# ---------------------------------------------------------------------------

CPU_OPTIONS = {
    "device-cpu": ["--device", "cpu"],
    "low-cpu-memory": ["--low-cpu-memory"],
    "one-thread": ["-j", "1"],
    "async-write": ["--async-write"],
    "clone-tensors": ["--clone-tensors"],
}


def assert_same_bits(got: dict, want: dict) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name].view(torch.int16), tensor.view(torch.int16)), name


@pytest.mark.parametrize("option", sorted(CPU_OPTIONS))
def test_mergekit_cpu_options_give_the_same_bits(cli_two, option, tmp_path):
    config, out, _ = cli_two
    proc = run_cli(config, tmp_path / "c.yml", tmp_path / "out", CPU_OPTIONS[option])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_bits(load_output(tmp_path / "out"), load_output(out))


# mergekit's options for one GPU; --multi-gpu and --gpu-rich (which sets it) are left out.
GPU_OPTIONS = {
    "cuda": ["--cuda"],
    "device-cuda": ["--device", "cuda"],
    "read-to-gpu": ["--cuda", "--read-to-gpu"],
    "cuda-low-cpu-memory": ["--cuda", "--low-cpu-memory"],
}


@pytest.mark.skipif(CUDA_TEST_DEVICE == "cuda" and not torch.cuda.is_available(),
                    reason="no CUDA device on this machine")
@pytest.mark.parametrize("option", sorted(GPU_OPTIONS) if CUDA_TEST_DEVICE == "cuda" else [CUDA_TEST_DEVICE])
def test_mergekit_cuda_options_give_the_same_bits_as_the_cpu_merge(cli_two, option, tmp_path):
    """On a GPU, mergekit-yaml with each single-GPU option writes the bits of
    the CPU merge (itself checked against the reference above).  In the CPU
    dry run of benchmarks/gpu/run.sh (MERGEKIT_CABS_CUDA_TEST_DEVICE=cpu) the
    one case is `--device cpu`: the same test's code, not a CUDA check."""
    config, out, _ = cli_two
    args = GPU_OPTIONS[option] if CUDA_TEST_DEVICE == "cuda" else ["--device", CUDA_TEST_DEVICE]
    proc = run_cli(config, tmp_path / "c.yml", tmp_path / "out", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_bits(load_output(tmp_path / "out"), load_output(out))


def test_out_shard_size_splits_the_output_and_keeps_the_bits(cli_two, tmp_path):
    config, out, _ = cli_two
    want = load_output(out)
    third = sum(t.numel() for t in want.values()) // 3
    proc = run_cli(config, tmp_path / "c.yml", tmp_path / "out", ["--out-shard-size", str(third)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "out").glob("*.safetensors"))) >= 3
    assert_same_bits(load_output(tmp_path / "out"), want)


def test_lazy_unpickle_of_pickled_checkpoints_gives_the_same_bits(bf16_family, cli_two, tmp_path):
    """`--lazy-unpickle` matters for `pytorch_model.bin` checkpoints: the same
    models saved that way merge to the same bits as their safetensors."""
    import shutil

    from safetensors.torch import load_file

    base, tunes = bf16_family
    config, out, _ = cli_two
    moved = {}
    for model in [base, *tunes[:2]]:
        target = tmp_path / Path(model.path).name
        target.mkdir()
        shutil.copy(Path(model.path) / "config.json", target / "config.json")
        state = load_file(str(Path(model.path) / "model.safetensors"))
        torch.save(state, target / "pytorch_model.bin")
        moved[str(model.path)] = str(target)
    pickled = json.loads(json.dumps(config))
    pickled["base_model"] = moved[pickled["base_model"]]
    for entry in pickled["models"]:
        entry["model"] = moved[entry["model"]]
    proc = run_cli(pickled, tmp_path / "c.yml", tmp_path / "out", ["--lazy-unpickle"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_bits(load_output(tmp_path / "out"), load_output(out))


def test_cli_model_card_names_cabs(cli_two):
    _, out, _ = cli_two
    card = (out / "README.md").read_text()
    assert README_LINK in card
    assert "merge_method: cabs" in card
    assert (out / "mergekit_config.yml").exists()


def test_cli_two_finetunes_supports_are_disjoint(bf16_family, cli_two):
    """K*n <= m (4 + 5 <= 16): the kept supports of the two models are
    disjoint, so where a tensor changed it changed by exactly one task."""
    base, tunes = bf16_family
    _, out, _ = cli_two
    actual = load_output(out)
    name = "model.layers.1.mlp.down_proj.weight"
    _, masks = expected_cabs(
        base.state[name],
        [t.state[name] for t in tunes[:2]],
        weights=[0.5, 0.75],
        densities=[0.25, None],
        ns=[None, 5],
        block_size=16,
        lam=1.5,
        return_masks=True,
    )
    assert not any(a and b for a, b in zip(*masks))
    delta = actual[name].float() - base.state[name].float()
    tau = [(t.state[name].float() - base.state[name].float()).reshape(-1) for t in tunes[:2]]
    flat = delta.reshape(-1)
    for p in range(flat.numel()):
        if masks[0][p]:
            assert flat[p].item() == pytest.approx(1.5 * 0.5 * tau[0][p].item(), abs=1e-2)
        elif masks[1][p]:
            assert flat[p].item() == pytest.approx(1.5 * 0.75 * tau[1][p].item(), abs=1e-2)
        else:
            assert flat[p].item() == 0.0


def test_cli_three_finetunes_strict_overlap(bf16_family, tmp_path):
    """Three models whose quotas add up to more than a block (8+6+4 > 16):
    `strict` keeps later models to the free places. The overlap warning
    appears exactly once for the whole run, with the numbers."""
    base, tunes = bf16_family
    config = {
        "merge_method": "cabs",
        "base_model": str(base.path),
        "models": [
            {"model": str(tunes[0].path), "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": str(tunes[1].path), "parameters": {"weight": 0.25, "density": 0.375}},
            {"model": str(tunes[2].path), "parameters": {"weight": 1.0, "n": 4}},
        ],
        "parameters": {"block_size": 16, "overlap": "strict"},
    }
    proc = run_cli(config, tmp_path / "config.yml", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-4000:]

    def params(name):
        return dict(
            weights=[0.5, 0.25, 1.0],
            densities=[0.5, 0.375, None],
            ns=[None, None, 4],
            block_size=16,
            overlap="strict",
        )

    compare_all(
        load_output(tmp_path / "out"), expected_state(base, tunes, params), torch.bfloat16
    )
    log = proc.stdout + proc.stderr
    hits = [line for line in log.splitlines() if "overlap" in line.lower() and "cabs" in line.lower()]
    assert len(hits) == 1, hits
    assert "18" in hits[0] and "16" in hits[0], hits[0]


# ---------------------------------------------------------------------------
# in-process entry points
# ---------------------------------------------------------------------------


def test_run_merge_bit_identical_to_cli(bf16_family, cli_two, tmp_path):
    """run_merge (in this process) gives the CLI's bits (another process)."""
    config, cli_out, _ = cli_two
    run_in_process(config, tmp_path / "out")
    ours, theirs = load_output(tmp_path / "out"), load_output(cli_out)
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_run_merge_three_finetunes_fill(bf16_family, tmp_path):
    base, tunes = bf16_family
    config = {
        "merge_method": "cabs",
        "base_model": str(base.path),
        "models": [
            {"model": str(t.path), "parameters": {"weight": w, "density": d}}
            for t, w, d in zip(tunes, [0.75, 0.5, 1.25], [0.5, 0.375, 0.25])
        ],
        "parameters": {"block_size": 32, "overlap": "fill", "lambda": 0.5},
    }
    run_in_process(config, tmp_path / "out")

    def params(name):
        return dict(
            weights=[0.75, 0.5, 1.25],
            densities=[0.5, 0.375, 0.25],
            block_size=32,
            overlap="fill",
            lam=0.5,
        )

    compare_all(
        load_output(tmp_path / "out"), expected_state(base, tunes, params), torch.bfloat16
    )


def test_merge_state_dicts_every_tensor(bf16_family, cli_two):
    from mergekit.merge_methods import merge_state_dicts

    base, tunes = bf16_family
    models = {"base": base.state, "ft1": tunes[0].state, "ft2": tunes[1].state}
    result = merge_state_dicts(
        models,
        "cabs",
        base="base",
        parameters={
            "weight": {"ft1": 0.5, "ft2": 0.75},
            "density": {"ft1": 0.25, "ft2": None},
            "n": {"ft1": None, "ft2": 5},
            "block_size": 16,
            "lambda": 1.5,
        },
    )
    compare_all(result, expected_state(base, tunes[:2], two_model_params), torch.bfloat16)
    # The graph (CLI) and the state-dict path agree bit for bit.
    cli = load_output(cli_two[1])
    for name, tensor in result.items():
        assert torch.equal(tensor, cli[name]), name


def test_merge_tensors_each_tensor(bf16_family):
    from mergekit.merge_methods import merge_tensors

    base, tunes = bf16_family
    for name in sorted(base.state):
        got = merge_tensors(
            [tunes[1].state[name], base.state[name], tunes[0].state[name]],
            "cabs",
            ids=["ft2", "base", "ft1"],
            base_index=1,
            name=name,
            parameters={
                "weight": {"ft1": 0.5, "ft2": 0.75},
                "density": {"ft1": 0.5, "ft2": 0.25},
                "block_size": 24,
                "overlap": "strict",
            },
        )
        # Input order (not the ids) is the priority order: ft2 chooses first.
        want = expected_cabs(
            base.state[name],
            [tunes[1].state[name], tunes[0].state[name]],
            weights=[0.75, 0.5],
            densities=[0.25, 0.5],
            block_size=24,
            overlap="strict",
        )
        assert got.dtype == torch.bfloat16
        assert_matches(got, want, name)


@pytest.mark.parametrize(
    "shared",
    [
        {"conflict_aware": False},
        {"balanced": False},
        {"balanced": False, "conflict_aware": False},
        {"overlap": "strict", "lambda": 0.75},
        {"overlap": "fill", "block_size": 7},
    ],
    ids=["no-ca", "unbalanced", "neither", "strict", "block7"],
)
def test_state_dict_variants_fp32(fp32_family, shared):
    """Ablations and odd block sizes on float32 checkpoints with zero deltas."""
    from mergekit.merge_methods import merge_state_dicts

    base, tunes = fp32_family
    shared = {"block_size": 16, **shared}
    densities = [0.625, 0.5]  # 10 + 8 > 16: the models must overlap
    result = merge_state_dicts(
        [base.state, tunes[0].state, tunes[1].state],
        "cabs",
        base=0,
        parameters={"weight": [0.3, 0.7], "density": densities, **shared},
    )
    kwargs = dict(
        weights=[0.3, 0.7],
        densities=densities,
        block_size=shared["block_size"],
        overlap=shared.get("overlap", "fill"),
        conflict_aware=shared.get("conflict_aware", True),
        balanced=shared.get("balanced", True),
        lam=shared.get("lambda", 1.0),
    )
    compare_all(result, expected_state(base, tunes, lambda n: kwargs), torch.float32)


# ---------------------------------------------------------------------------
# tokenizer_source: union
# ---------------------------------------------------------------------------


def test_union_tokenizer(vocab_family, tmp_path):
    from transformers import AutoTokenizer

    base, tunes = vocab_family
    config = {
        "merge_method": "cabs",
        "base_model": str(base.path),
        "tokenizer_source": "union",
        "models": [
            {"model": str(tunes[0].path), "parameters": {"weight": 0.75, "density": 0.375}},
            {"model": str(tunes[1].path), "parameters": {"weight": 0.5, "density": 0.25}},
        ],
        "parameters": {"block_size": 16},
        "dtype": "float32",
    }
    out = tmp_path / "out"
    run_in_process(config, out)
    actual = load_output(out)

    tok = AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    out_words = [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert sorted(vocab.values()) == list(range(len(vocab)))
    union = set(base.words) | set(tunes[0].words) | set(tunes[1].words)
    assert set(out_words) == union and len(out_words) == 82
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 82

    params = dict(weights=[0.75, 0.5], densities=[0.375, 0.25], block_size=16)
    vocabs = {"base": base.vocab, "a": tunes[0].vocab, "b": tunes[1].vocab}
    expected = {}
    for name in base.state:
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            rows = aligned_vocab_rows(
                out_words,
                {"base": base.state[name], "a": tunes[0].state[name], "b": tunes[1].state[name]},
                vocabs,
                "base",
            )
            expected[name] = expected_cabs(rows["base"], [rows["a"], rows["b"]], **params)
            assert actual[name].shape == (82, 40)
        else:
            expected[name] = expected_cabs(
                base.state[name], [t.state[name] for t in tunes], **params
            )
    compare_all(actual, expected, torch.float32)

    # Spot checks that read straight off the checkpoints.
    emb = actual["model.embed_tokens.weight"]
    for word, model in (("alpha_a", tunes[0]), ("eps_b", tunes[1])):
        # Only one model has the word: every aligned input carries that
        # model's row, all task vectors are zero there, the row is the donor's.
        assert torch.equal(emb[vocab[word]], model.state["model.embed_tokens.weight"][model.vocab[word]])
    # A word B lacks: B's aligned row is the base's, so tau_B = 0 there.
    assert "w40" not in tunes[1].vocab
    # A word B moved: B's row is found by word, not by id.
    moved = "w0"
    assert tunes[1].vocab[moved] != base.vocab[moved]


# ---------------------------------------------------------------------------
# slices, filters, gradients
# ---------------------------------------------------------------------------


def test_slices_layer_ranges_and_per_slice_parameters(bf16_family, tmp_path):
    base, tunes = bf16_family
    b, a, c = str(base.path), str(tunes[0].path), str(tunes[1].path)
    config = {
        "merge_method": "cabs",
        "base_model": b,
        "slices": [
            {
                "sources": [
                    {"model": b, "layer_range": [0, 2]},
                    {"model": a, "layer_range": [0, 2], "parameters": {"weight": 0.5}},
                    {"model": c, "layer_range": [0, 2], "parameters": {"weight": 0.75}},
                ],
                "parameters": {"density": 0.5},
            },
            {
                "sources": [
                    {"model": b, "layer_range": [2, 3]},
                    {"model": c, "layer_range": [1, 2], "parameters": {"n": 3}},
                    {
                        "model": a,
                        "layer_range": [2, 3],
                        "parameters": {"weight": 1.25, "density": 0.25},
                    },
                ],
                # `n` on one source and `density` at slice level would be
                # "both n and density for one model" (see test_errors.py).
                "parameters": {"block_size": 8},
            },
        ],
        "parameters": {"block_size": 16},
    }
    out = tmp_path / "out"
    run_in_process(config, out)
    actual = load_output(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3

    first = dict(weights=[0.5, 0.75], densities=[0.5, 0.5], block_size=16)
    second = dict(weights=[1.0, 1.25], densities=[None, 0.25], ns=[3, None], block_size=8)
    expected = {}
    for name in base.state:
        m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if m is None:
            if name == "model.embed_tokens.weight":  # pre-weight: first slice
                expected[name] = expected_cabs(
                    base.state[name], [tunes[0].state[name], tunes[1].state[name]], **first
                )
            else:  # post-weights: last slice, its source order
                expected[name] = expected_cabs(
                    base.state[name], [tunes[1].state[name], tunes[0].state[name]], **second
                )
            continue
        layer, rest = int(m.group(1)), m.group(2)
        if layer < 2:
            src = f"model.layers.{layer}.{rest}"
            expected[name] = expected_cabs(
                base.state[src], [tunes[0].state[src], tunes[1].state[src]], **first
            )
        else:
            expected[name] = expected_cabs(
                base.state[f"model.layers.2.{rest}"],
                [tunes[1].state[f"model.layers.1.{rest}"], tunes[0].state[f"model.layers.2.{rest}"]],
                **second,
            )
    compare_all(actual, expected, torch.bfloat16)


def test_filters_and_gradients_resolved_per_tensor(bf16_family, tmp_path):
    base, tunes = bf16_family
    config = {
        "merge_method": "cabs",
        "base_model": str(base.path),
        "models": [
            {
                "model": str(tunes[0].path),
                "parameters": {
                    "weight": [{"filter": "self_attn", "value": 0.25}, {"value": 0.75}],
                    "density": [{"filter": "mlp", "value": 0.5}, {"value": 0.25}],
                },
            },
            {
                "model": str(tunes[1].path),
                "parameters": {"weight": 1.25, "density": [0.5, 0.125]},
            },
        ],
        "parameters": {
            "block_size": 16,
            "lambda": [{"filter": "lm_head", "value": 0.5}, {"value": 1.0}],
        },
    }
    out = tmp_path / "out"
    run_in_process(config, out)
    actual = load_output(out)
    layers = base.config["num_hidden_layers"]

    def params(name):
        t = layer_t(name, layers)
        return dict(
            weights=[0.25 if "self_attn" in name else 0.75, 1.25],
            densities=[0.5 if "mlp" in name else 0.25, gradient_value([0.5, 0.125], t)],
            block_size=16,
            lam=0.5 if "lm_head" in name else 1.0,
        )

    # The middle layer gets the interpolated density 0.3125 -> n = 5.
    assert quota_from_density(params("model.layers.1.mlp.up_proj.weight")["densities"][1], 16) == 5
    expected = expected_state(base, tunes[:2], params)
    compare_all(actual, expected, torch.bfloat16)

    # Sensitivity: with one filter ignored the expectation would differ.
    name = "model.layers.2.mlp.gate_proj.weight"
    wrong = dict(params(name), densities=[0.25, 0.125])
    alt = expected_cabs(base.state[name], [t.state[name] for t in tunes[:2]], **wrong)
    assert not torch.equal(alt.float().bfloat16(), actual[name])


# ---------------------------------------------------------------------------
# dtype / out_dtype
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,out_dtype,via,expect",
    [
        (None, None, torch.bfloat16, torch.bfloat16),
        ("float32", None, torch.float32, torch.float32),
        ("float32", "bfloat16", torch.float32, torch.bfloat16),
        # mergekit's `dtype` is the merge's own dtype: the method returns in
        # it, and only then does mergekit cast to `out_dtype`.
        ("bfloat16", "float32", torch.bfloat16, torch.float32),
        (None, "float16", torch.bfloat16, torch.float16),
    ],
)
def test_dtype_and_out_dtype(bf16_family, tmp_path, dtype, out_dtype, via, expect):
    base, tunes = bf16_family
    config = two_model_yaml(base, tunes[:2])
    if dtype:
        config["dtype"] = dtype
    if out_dtype:
        config["out_dtype"] = out_dtype
    run_in_process(config, tmp_path / "out")
    compare_all(
        load_output(tmp_path / "out"),
        expected_state(base, tunes[:2], two_model_params),
        expect,
        via=via,
    )


def test_fp32_checkpoints_to_bf16_with_non_dyadic_weights(fp32_family, tmp_path):
    """float32 inputs, weights 0.3/0.7 (inexact), written as bfloat16."""
    base, tunes = fp32_family
    config = {
        "merge_method": "cabs",
        "base_model": str(base.path),
        "models": [
            {"model": str(tunes[0].path), "parameters": {"weight": 0.3, "density": 0.3}},
            {"model": str(tunes[1].path), "parameters": {"weight": 0.7}},
        ],
        "parameters": {"block_size": 20, "lambda": 1.1},
        "out_dtype": "bfloat16",
    }
    run_in_process(config, tmp_path / "out")

    def params(name):
        return dict(weights=[0.3, 0.7], densities=[0.3, 0.25], block_size=20, lam=1.1)

    compare_all(
        load_output(tmp_path / "out"), expected_state(base, tunes, params), torch.bfloat16
    )
