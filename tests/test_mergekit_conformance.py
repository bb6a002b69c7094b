"""The kinds of checks mergekit 0.1.5 applies to its own merge methods
(tests/test_merge_method_interface.py, test_merge_method_regressions.py,
test_merge_dtypes.py, test_batched_merges.py, test_config_parameters.py,
test_vocabulary_axis.py, test_basic_merges.py), applied to `cabs`.

Expected values come from `tiny_models.expected_cabs` (SPEC.md, written
independently of the package).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from mergekit import merge_methods
from mergekit.merge_methods import (
    BasePolicy,
    ParameterScope,
    PerGroupValues,
    TensorEntry,
    TensorGroup,
    TensorMetadata,
    merge_state_dicts,
    merge_tensors,
)
from safetensors.torch import load_file, save_file

from tiny_models import assert_matches, expected_cabs

GRID = 2.0**-7


def grid_inputs(shape, k=2, seed=0, dtype=torch.float32, zero_frac=0.1):
    """base + k fine-tunes on a dyadic grid: exact in fp16/bf16/fp32/fp64,
    with many equal |tau| (ties) and some unchanged places."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-60, 61, shape, generator=g).to(torch.float32) * GRID
    tunes = []
    for i in range(k):
        mag = torch.randint(1, 9, shape, generator=g).to(torch.float32)
        sign = torch.randint(0, 2, shape, generator=g).to(torch.float32) * 2 - 1
        keep = (torch.rand(shape, generator=g) >= zero_frac).to(torch.float32)
        tunes.append(base + sign * mag * keep * (i + 1) * GRID)
    return base.to(dtype), [t.to(dtype) for t in tunes]


def method():
    return merge_methods.get("cabs")


# ---------------------------------------------------------------------------
# spec metadata, registry, model card
# ---------------------------------------------------------------------------


def test_spec_metadata():
    spec = method().spec
    assert spec.name == "cabs"
    assert spec.pretty_name == "CABS"
    assert spec.reference_url == "https://arxiv.org/abs/2503.01874"
    assert spec.contract.base == BasePolicy.REQUIRED
    params = {p.name: p for p in spec.parameters}
    assert set(params) == {
        "weight", "density", "n", "block_size", "overlap", "conflict_aware", "balanced", "lambda",
    }
    for name in ("weight", "density", "n"):
        assert params[name].scope == ParameterScope.NON_BASE, name
    for name in ("block_size", "overlap", "conflict_aware", "balanced", "lambda"):
        assert params[name].scope == ParameterScope.SHARED, name
    defaults = {
        "weight": 1.0, "block_size": 256, "overlap": "fill",
        "conflict_aware": True, "balanced": True, "lambda": 1.0,
    }
    for name, value in defaults.items():
        assert params[name].validate(params[name].default) == value, name


def test_model_card_link():
    from mergekit.card import method_md

    assert method_md("cabs") == "[CABS](https://arxiv.org/abs/2503.01874)"


def test_registered_once_and_install_is_idempotent():
    import mergekit_cabs

    before = merge_methods.registered_methods()
    mergekit_cabs.install()
    mergekit_cabs.install()
    after = merge_methods.registered_methods()
    assert before == after
    assert [m.spec.name for m in after].count("cabs") == 1
    # No builtin was replaced or shadowed.
    for name in ("linear", "task_arithmetic", "ties", "dare_ties", "slerp"):
        assert merge_methods.get(name).spec.name == name


def test_registry_isolation(monkeypatch):
    from mergekit.merge_methods import get, register, registered_methods, registry

    cabs = get("cabs")
    monkeypatch.setattr(registry, "_METHODS", {})
    with pytest.raises(RuntimeError, match="Unimplemented merge method cabs"):
        get("cabs")
    register(cabs)
    assert get("cabs") is cabs
    assert registered_methods() == (cabs,)
    with pytest.raises(ValueError, match="already registered"):
        register(cabs)
    # The fresh registry works end to end.
    base, tunes = grid_inputs((4, 9))
    merge_tensors([base, *tunes], "cabs", base_index=0, parameters={"block_size": 4})
    monkeypatch.undo()
    assert get("cabs") is cabs
    assert get("linear").spec.name == "linear"


def test_construction_does_not_register(monkeypatch):
    from mergekit.merge_methods import registry

    from mergekit_cabs.method import CabsMerge

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    count = len(registry._METHODS)
    fresh = CabsMerge()
    assert len(registry._METHODS) == count
    base, tunes = grid_inputs((3, 5))
    (a,) = fresh([TensorGroup.from_tensors([base, *tunes], base_index=0)])
    b = merge_tensors([base, *tunes], "cabs", base_index=0)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# values: defaults, dtypes x shapes, strides, single elements
# ---------------------------------------------------------------------------


def test_defaults_are_spec_defaults():
    """No parameters: weight 1, density 0.25, block 256, fill, both on, lambda 1."""
    base, tunes = grid_inputs((9, 120), k=3, seed=5)  # 1080 = 4 * 256 + 56
    got = merge_tensors([base, *tunes], "cabs", base_index=0)
    want = expected_cabs(base, tunes, weights=[1, 1, 1], densities=[0.25] * 3)
    assert_matches(got, want)


SHAPES = [(), (1,), (5,), (1, 1), (3, 7), (2, 3, 5), (40, 72)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_dtypes_and_shapes(dtype, shape):
    base, tunes = grid_inputs(shape, k=2, seed=len(shape) + 7, dtype=dtype)
    params = {"weight": [0.5, 1.25], "density": [0.5, 0.25], "block_size": 4, "lambda": 0.75}
    got = merge_tensors([base, *tunes], "cabs", base_index=0, parameters=params)
    assert got.shape == base.shape
    assert got.dtype == dtype
    want = expected_cabs(
        base, tunes, weights=[0.5, 1.25], densities=[0.5, 0.25], block_size=4, lam=0.75
    )
    assert_matches(got, want)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0)])
def test_empty_tensors(shape):
    base, tunes = torch.zeros(shape), [torch.zeros(shape), torch.zeros(shape)]
    got = merge_tensors([base, *tunes], "cabs", base_index=0, parameters={"block_size": 4})
    assert got.shape == shape and got.dtype == torch.float32


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
@pytest.mark.parametrize("density", [0.25, 1.0])
def test_single_element_tensors(shape, density):
    """A one-element tensor is a tail block of r = 1: its quota is
    floor(n / m + 0.5), i.e. it keeps its change only when n >= m / 2."""
    base, other = torch.zeros(shape), torch.ones(shape)
    got = merge_state_dicts(
        [{"bias": base}, {"bias": other}],
        "cabs",
        base=0,
        parameters={"density": density},
    )["bias"]
    torch.testing.assert_close(got, other if density == 1.0 else base)
    torch.testing.assert_close(base, torch.zeros_like(base))
    torch.testing.assert_close(other, torch.ones_like(other))


def test_strided_inputs_without_mutation():
    """mergekit's own check for every registered method (weight 1.0,
    density 0.7, three inputs, transposed storage)."""
    g = torch.Generator().manual_seed(42)
    tensors = [torch.randn(4, 6, generator=g).T for _ in range(3)]
    assert all(not t.is_contiguous() for t in tensors)
    copies = [t.clone() for t in tensors]
    params = {"weight": 1.0, "density": 0.7}
    expected = merge_state_dicts(
        [{"w": t.contiguous()} for t in tensors], "cabs", base=0, parameters=params
    )["w"]
    actual = merge_state_dicts([{"w": t} for t in tensors], "cabs", base=0, parameters=params)["w"]
    assert actual.isfinite().all()
    assert torch.equal(actual, expected)
    for t, before in zip(tensors, copies):
        assert torch.equal(t, before)
    want = expected_cabs(tensors[0], tensors[1:], weights=[1.0, 1.0], densities=[0.7, 0.7])
    assert_matches(actual, want)


# ---------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------


def test_bit_identical_run_to_run_and_across_thread_counts():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(300, 257, generator=g)
    # Continuous values plus a band of exact ties.
    tunes = [base + torch.randn(300, 257, generator=g) * s for s in (0.01, 0.02, 0.03)]
    tunes[1][:50] = base[:50] + 0.125
    params = {"density": [0.5, 0.375, 0.25], "block_size": 64, "weight": [0.3, 0.6, 0.9]}
    threads = torch.get_num_threads()
    try:
        first = merge_tensors([base, *tunes], "cabs", base_index=0, parameters=params)
        second = merge_tensors([base, *tunes], "cabs", base_index=0, parameters=params)
        torch.set_num_threads(1)
        single = merge_tensors([base, *tunes], "cabs", base_index=0, parameters=params)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, second)
    assert torch.equal(first, single)


# ---------------------------------------------------------------------------
# merge_state_dicts: ids, keys, buffers, dtype policy
# ---------------------------------------------------------------------------


def test_state_dicts_match_names_and_ids():
    b, t = grid_inputs((6, 10), seed=1)
    c, u = grid_inputs((17,), seed=2)
    models = {
        "tune-b": {"x": t[1], "y": u[1]},
        "base": {"y": c, "x": b},
        "tune-a": {"x": t[0], "y": u[0]},
    }
    result = merge_state_dicts(
        models,
        "cabs",
        base="base",
        parameters={"weight": {"tune-a": 0.5, "tune-b": 2.0}, "block_size": 8},
    )
    assert list(result) == ["x", "y"]
    # Priority follows the mapping's order: tune-b first.
    assert_matches(result["x"], expected_cabs(b, [t[1], t[0]], weights=[2.0, 0.5], block_size=8))
    assert_matches(result["y"], expected_cabs(c, [u[1], u[0]], weights=[2.0, 0.5], block_size=8))


def test_state_dicts_validate_keys():
    with pytest.raises(ValueError, match="different tensor keys"):
        merge_state_dicts(
            [{"x": torch.ones(2)}, {"y": torch.ones(2)}], "cabs", base=0
        )


def test_module_inputs_and_non_floating_buffers():
    """BatchNorm modules: floats merged, int/bool buffers copied uncast."""
    models = []
    for index in range(3):
        bn = torch.nn.BatchNorm1d(6)
        bn.register_buffer("enabled", torch.tensor([True, False]))
        bn.num_batches_tracked.fill_(257)
        with torch.no_grad():
            bn.running_mean.copy_(torch.arange(6.0) * (index + 1) * GRID)
            bn.weight.copy_(torch.linspace(-1, 1, 6) * (index + 1))
        models.append(bn)
    with torch.no_grad():
        result = merge_state_dicts(
            models,
            "cabs",
            base=0,
            parameters={"block_size": 4, "density": 0.5},
            dtype=torch.bfloat16,
            out_dtype=torch.float64,
        )
    assert result["num_batches_tracked"].dtype == torch.int64
    assert result["num_batches_tracked"].item() == 257
    assert result["enabled"].dtype == torch.bool
    assert torch.equal(result["enabled"], torch.tensor([True, False]))
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert result[name].dtype == torch.float64
        tensors = [m.state_dict()[name].to(torch.bfloat16) for m in models]
        want = expected_cabs(
            tensors[0], tensors[1:], weights=[1, 1], densities=[0.5, 0.5], block_size=4
        )
        assert_matches(result[name], want, name, via=torch.bfloat16)


def test_differing_non_floating_buffers_are_rejected():
    with pytest.raises(ValueError, match="Non-floating buffer 'counter' differs"):
        merge_state_dicts(
            [{"counter": torch.tensor(3)}, {"counter": torch.tensor(4)}], "cabs", base=0
        )


def mixed_models():
    g = torch.Generator().manual_seed(9)
    base = torch.randint(-60, 61, (12,), generator=g).to(torch.float32) * GRID
    other = base + torch.randint(-8, 9, (12,), generator=g).to(torch.float32) * GRID
    return [
        {
            "low": base.bfloat16(),
            "mixed": base.bfloat16(),
            "norm": base.clone(),
            "double": base.double(),
            "counter": torch.tensor(7),
        },
        {
            "low": other.bfloat16(),
            "mixed": other.half(),
            "norm": other.clone(),
            "double": other.clone(),
            "counter": torch.tensor(7),
        },
    ]


def test_state_dict_promotes_each_weight_independently():
    models = mixed_models()
    params = {"block_size": 4, "density": 0.5}
    result = merge_state_dicts(models, "cabs", base=0, parameters=params)
    for name, dtype in (
        ("low", torch.bfloat16),
        ("mixed", torch.float32),
        ("norm", torch.float32),
        ("double", torch.float64),
    ):
        assert result[name].dtype == dtype, name
        want = expected_cabs(
            models[0][name], [models[1][name]], weights=[1], densities=[0.5], block_size=4
        )
        assert_matches(result[name], want, name)
    assert result["counter"].dtype == torch.int64 and result["counter"].item() == 7
    assert models[0]["mixed"].dtype == torch.bfloat16
    # Same dtype decisions as mergekit's own task_arithmetic.
    ta = merge_state_dicts(models, "task_arithmetic", base=0, parameters={"weight": 1.0})
    assert {k: v.dtype for k, v in ta.items()} == {k: v.dtype for k, v in result.items()}


def test_input_cast_and_output_cast_are_distinct():
    """dtype casts the inputs (tau taken from rounded values); out_dtype only
    the result: 1000 * bf16(1.003) = 1000, bf16(1000 * 1.003) = 1004."""
    models = [{"w": torch.tensor([0.0]), "c": torch.tensor(7)}, {"w": torch.tensor([1.003]), "c": torch.tensor(7)}]
    params = {"lambda": 1000.0, "block_size": 1, "density": 1.0}
    input_cast = merge_state_dicts(models, "cabs", base=0, parameters=params, dtype=torch.bfloat16)
    output_cast = merge_state_dicts(models, "cabs", base=0, parameters=params, out_dtype=torch.bfloat16)
    assert input_cast["w"].item() == 1000.0
    assert output_cast["w"].item() == 1004.0
    assert input_cast["c"].dtype == output_cast["c"].dtype == torch.int64
    both = merge_state_dicts(
        models, "cabs", base=0, parameters=params, dtype=torch.bfloat16, out_dtype=torch.float64
    )
    assert both["w"].dtype == torch.float64 and both["w"].item() == 1000.0


@pytest.mark.parametrize("option", ["dtype", "out_dtype"])
def test_non_floating_dtype_overrides_rejected(option):
    with pytest.raises(ValueError, match="floating-point torch.dtype"):
        merge_state_dicts(mixed_models(), "cabs", base=0, **{option: torch.int64})


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [None, torch.float64])
def test_direct_and_state_dict_calls_share_dtype_policy(dtype, out_dtype):
    models = mixed_models()
    params = {"block_size": 4, "density": 0.5}
    expected = merge_state_dicts(
        models, "cabs", base=0, parameters=params, dtype=dtype, out_dtype=out_dtype
    )
    names = [n for n in models[0] if n != "counter"]
    batch = tuple(
        TensorGroup.from_tensors([m[n] for m in models], base_index=0, name=n) for n in names
    )
    actual = method()(batch, parameters=params, dtype=dtype, out_dtype=out_dtype)
    for name, tensor in zip(names, actual):
        assert tensor.dtype == expected[name].dtype
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16])
def test_ambient_autocast_is_ignored(autocast_dtype):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(8, 33, generator=g) * 1000
    tunes = [base + torch.randn(8, 33, generator=g) for _ in range(2)]
    params = {"block_size": 16, "density": [0.5, 0.25]}
    plain = merge_tensors([base, *tunes], "cabs", base_index=0, parameters=params)
    with torch.autocast("cpu", dtype=autocast_dtype):
        inside = merge_tensors([base, *tunes], "cabs", base_index=0, parameters=params)
    assert inside.dtype == torch.float32
    assert torch.equal(plain, inside)


# ---------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_follow_the_masks(dtype):
    base, tunes = grid_inputs((5, 13), k=2, seed=11, dtype=dtype)
    inputs = [t.clone().requires_grad_() for t in (base, *tunes)]
    originals = [t.detach().clone() for t in inputs]
    w, lam = [0.5, 1.5], 0.75
    result = merge_tensors(
        inputs,
        "cabs",
        base_index=0,
        parameters={"weight": w, "density": [0.5, 0.5], "block_size": 8, "lambda": lam},
    )
    result.sum().backward()
    _, masks = expected_cabs(
        base, tunes, weights=w, densities=[0.5, 0.5], block_size=8, lam=lam, return_masks=True
    )
    masks = [torch.tensor(m, dtype=dtype).reshape(base.shape) for m in masks]
    torch.testing.assert_close(inputs[1].grad, lam * w[0] * masks[0])
    torch.testing.assert_close(inputs[2].grad, lam * w[1] * masks[1])
    torch.testing.assert_close(
        inputs[0].grad, 1 - lam * (w[0] * masks[0] + w[1] * masks[1])
    )
    for t, before in zip(inputs, originals):
        assert torch.equal(t.detach(), before)


def test_module_inputs_keep_autograd_and_no_grad_detaches():
    torch.manual_seed(0)
    models = [
        torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False), torch.nn.Linear(5, 3))
        for _ in range(3)
    ]
    params = {"block_size": 4, "density": 1.0, "conflict_aware": False}
    result = merge_state_dicts(models, "cabs", base=0, parameters=params)
    sum(t.sum() for t in result.values()).backward()
    # density 1, no conflict handling: base + tau_1 + tau_2 = W1 + W2 - W0.
    for model, coefficient in zip(models, (-1.0, 1.0, 1.0)):
        for p in model.parameters():
            torch.testing.assert_close(p.grad, torch.full_like(p, coefficient))
    with torch.no_grad():
        result = merge_state_dicts(models, "cabs", base=0, parameters=params)
    assert all(not t.requires_grad for t in result.values())


# ---------------------------------------------------------------------------
# input contract, vocabulary axis, batches
# ---------------------------------------------------------------------------


def test_requires_a_base_and_a_model():
    base, tunes = grid_inputs((4,))
    with pytest.raises(ValueError, match="base"):
        merge_tensors([base, *tunes], "cabs")
    with pytest.raises(ValueError):
        merge_tensors([base], "cabs", base_index=0)


def test_mismatched_shapes_rejected():
    with pytest.raises(ValueError, match="size mismatch for projection"):
        merge_tensors(
            [torch.ones(2, 3), torch.ones(3, 2)], "cabs", base_index=0, name="projection"
        )


@pytest.mark.parametrize("shape", [(3, 2), (2, 3)])
def test_mismatched_embedding_shapes_point_at_tokenizer(shape):
    entries = tuple(
        TensorEntry(i, torch.ones((2, 2) if i == 0 else shape), is_base=i == 0)
        for i in range(3)
    )
    group = TensorGroup(entries, TensorMetadata(name="embed_tokens.weight", vocabulary_axis=0))
    with pytest.raises(ValueError, match="Tensor size mismatch.*tokenizer"):
        method()((group,))


@pytest.fixture
def kernel_calls(monkeypatch):
    """A list that grows by one each time the method runs the kernel."""
    from mergekit_cabs import method as cabs_module

    calls = []
    real = cabs_module.cabs_merge

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cabs_module, "cabs_merge", spy)
    return calls


def test_whole_batch_checked_before_any_merge(kernel_calls):
    base, tunes = grid_inputs((6,))
    good = TensorGroup.from_tensors([base, *tunes], base_index=0)
    no_base = TensorGroup.from_tensors([base, *tunes])
    with pytest.raises(ValueError, match="base"):
        method()((good, no_base))
    assert kernel_calls == []


def test_bad_parameter_in_later_group_fails_before_any_merge(kernel_calls):
    base, tunes = grid_inputs((6,))
    groups = [TensorGroup.from_tensors([base, *tunes], base_index=0) for _ in range(2)]
    with pytest.raises(ValueError, match="density"):
        method()(groups, parameters={"density": PerGroupValues([0.5, 1.5])})
    assert kernel_calls == []


def test_per_group_parameter_values():
    groups, wants = [], []
    for i, density in enumerate([0.25, 0.5, 1.0]):
        base, tunes = grid_inputs((3, 11), seed=20 + i)
        groups.append(TensorGroup.from_tensors([base, *tunes], base_index=0))
        wants.append(expected_cabs(base, tunes, weights=[1, 1], densities=[density] * 2, block_size=8))
    results = method()(
        groups,
        parameters={"density": PerGroupValues([0.25, 0.5, 1.0]), "block_size": 8},
    )
    for got, want in zip(results, wants):
        assert_matches(got, want)
    assert method()([]) == ()


# ---------------------------------------------------------------------------
# graph adapters: optional tensors, raw-PyTorch graph vs state dicts
# ---------------------------------------------------------------------------


def optional_task(refs, base_ref, params):
    from mergekit.architecture import WeightInfo
    from mergekit.common import ImmutableMap
    from mergekit.io.tasks import GatherTensors
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    weight = WeightInfo(name="optional.bias", optional=True)
    return ExecuteMergeMethodTask(
        method_name="cabs",
        gather_tensors=GatherTensors(weight_info=ImmutableMap({r: weight for r in refs})),
        model_order=refs,
        base_model=base_ref,
        output_weight=weight,
        parameters=ImmutableMap({"block_size": 4, "overlap": "fill", "conflict_aware": True,
                                 "balanced": True, "lambda": 1.0}),
        input_parameters=ImmutableMap(
            {r: ImmutableMap(params[r]) for r in refs if r != base_ref}
        ),
    )


def test_optional_weights():
    from mergekit.common import ModelReference

    refs = tuple(ModelReference.model_validate(n) for n in ("base", "a", "b"))
    params = {
        refs[1]: {"weight": 0.5, "density": 0.5, "n": None},
        refs[2]: {"weight": 2.0, "density": 0.25, "n": None},
    }
    task = optional_task(refs, refs[0], params)
    base, tunes = grid_inputs((10,), seed=8)
    # Only the base has the weight: it passes through.
    torch.testing.assert_close(task.execute({refs[0]: base}), base)
    # The base lacks it: no silent baseless merge.
    with pytest.raises(ValueError, match="(?i)base.*optional.bias"):
        task.execute({refs[1]: tunes[0], refs[2]: tunes[1]})
    # One fine-tune lacks it: the other keeps its own coefficients.
    got = task.execute({refs[2]: tunes[1], refs[0]: base})
    assert_matches(got, expected_cabs(base, [tunes[1]], weights=[2.0], densities=[0.25], block_size=4))


def test_raw_graph_and_state_dict_merges_agree(tmp_path):
    from mergekit.graph import Executor
    from mergekit.options import MergeOptions
    from mergekit.scripts.merge_raw_pytorch import RawPyTorchMergeConfig, plan_flat_merge

    g = torch.Generator().manual_seed(12)
    states = []
    for _ in range(3):
        bn = {
            "w": torch.randint(-20, 21, (7, 9), generator=g).float() * GRID,
            "b": torch.randint(-20, 21, (9,), generator=g).float() * GRID,
            "steps": torch.tensor(41),
        }
        states.append(bn)
    paths = []
    for i, state in enumerate(states):
        path = tmp_path / f"m{i}.safetensors"
        save_file(state, str(path))
        paths.append(str(path))
    params = {"block_size": 5, "density": 0.4, "weight": 0.75}
    config = RawPyTorchMergeConfig(
        merge_method="cabs",
        models=[{"model": p} for p in paths[1:]],
        base_model=paths[0],
        parameters=params,
        dtype="bfloat16",
        out_dtype="float32",
    )
    out = tmp_path / "out"
    Executor(plan_flat_merge(config, str(out), False, False, MergeOptions())).execute()
    actual = load_file(str(out / "model.safetensors"))
    expected = merge_state_dicts(
        states, "cabs", base=0, parameters=params, dtype=torch.bfloat16, out_dtype=torch.float32
    )
    assert set(actual) == set(expected)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
    assert actual["steps"].dtype == torch.int64 and actual["steps"].item() == 41


# ---------------------------------------------------------------------------
# parameter resolution
# ---------------------------------------------------------------------------


def test_non_base_parameters_ignore_the_base_entry():
    """A NON_BASE parameter is not even validated for the base's entry."""
    import yaml
    from mergekit.scripts.merge_raw_pytorch import RawPyTorchMergeConfig, construct_param_dicts

    raw = RawPyTorchMergeConfig.model_validate(
        yaml.safe_load(
            """
merge_method: cabs
base_model: base
models:
  - model: a
    parameters: {weight: 0.5, density: 5e-1}
  - model: b
    parameters: {n: 3}
  - model: base
    parameters: {weight: not-a-number, density: 7}
parameters:
  block_size: 16
  overlap: strict
"""
        )
    )
    shared, per_input = construct_param_dicts(raw, method(), "w")
    assert shared["block_size"] == 16 and shared["overlap"] == "strict"
    assert shared["conflict_aware"] is True and shared["balanced"] is True
    by_name = {str(k): v for k, v in per_input.items()}
    assert by_name["base"] == {}
    assert by_name["a"]["weight"] == 0.5
    assert by_name["a"]["density"] == 0.5  # YAML's "5e-1" string is a number here
    assert by_name["b"]["n"] == 3 and by_name["b"]["weight"] == 1.0


@pytest.mark.parametrize(
    "name,setting,t,expected",
    [
        ("n", [2, 4], 0.5, 3),
        ("density", ["1e-1", "3e-1"], 0.5, 0.2),
        ("block_size", [16, 32], 1.0, 32),
        ("conflict_aware", [False, True], 0.5, False),
        ("balanced", [True, False], 1.0, False),
        ("overlap", ["fill", "strict"], 0.9, "fill"),
        ("lambda", [0.5, 1.5], 0.25, 0.75),
    ],
)
def test_gradients_use_declared_types(name, setting, t, expected):
    from mergekit.config import evaluate_setting

    parameter = next(p for p in method().spec.parameters if p.name == name)
    result = evaluate_setting("w", setting, t=t, validate=parameter.validate)
    if isinstance(expected, float):
        assert result == pytest.approx(expected)
    else:
        assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    "first",
    [
        "from mergekit_cabs import cabs_method",
        "import mergekit_cabs.method",
        "from mergekit_cabs.kernel import cabs_merge",
        "import mergekit_cabs",
        "import mergekit.merge_methods",
    ],
)
def test_any_first_import_registers_cabs_once_without_a_warning(first):
    code = "\n".join([
        first,
        "import mergekit_cabs",
        "from mergekit.merge_methods import get, registered_methods",
        "assert [m.spec.name for m in registered_methods()].count('cabs') == 1",
        "assert get('cabs') is mergekit_cabs.cabs_method",
    ])
    env = {k: v for k, v in os.environ.items() if k != "MERGEKIT_CABS_STRICT"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "mergekit-cabs:" not in proc.stderr
