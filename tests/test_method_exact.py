"""Exactness tests: the `cabs` mergekit method (merge_tensors) against the
slow reference of SPEC.md."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mergekit.merge_methods import merge_tensors

import mergekit_cabs  # noqa: F401  (registers the method)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402
from strategies import cabs_cases  # noqa: E402


def cabs(tensors, base_index=0, **kw):
    params = kw.pop("parameters", {})
    return merge_tensors(tensors, "cabs", base_index=base_index, parameters=params, **kw)


def distinct_models(shape, k, seed, dtype=torch.float32):
    """Base and K models with pairwise-distinct, non-zero |tau| per model."""
    g = torch.Generator().manual_seed(seed)
    numel = int(np.prod(shape)) if len(shape) else 1
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    models = []
    for _ in range(k):
        mags = (torch.randperm(numel, generator=g) + 1).to(torch.float64) * 0.37
        signs = torch.randint(0, 2, (numel,), generator=g).to(torch.float64) * 2 - 1
        models.append((base + (mags * signs).reshape(shape)).to(dtype))
    return base.to(dtype), models


def assert_bit_equal(got, want):
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape
    assert torch.equal(got, want), f"\n got {got}\n want {want}\n diff {got - want}"


# ---------------------------------------------------------------------------
# configurations through merge_tensors
# ---------------------------------------------------------------------------

CONFIGS = [
    # (shape, K, parameters, reference kwargs)
    ((4, 16), 2, {"n": [4, 4], "block_size": 16}, dict(n=[4, 4], m=16)),
    ((4, 16), 3, {"n": [4, 6, 2], "block_size": 8}, dict(n=[4, 6, 2], m=8)),
    ((5, 7), 3, {"n": [3, 2, 5], "block_size": 8}, dict(n=[3, 2, 5], m=8)),
    ((3,), 2, {"n": [2, 3], "block_size": 8}, dict(n=[2, 3], m=8)),
    ((2, 3, 5), 2, {"n": 3, "block_size": 4}, dict(n=[3, 3], m=4)),
    (
        (4, 8),
        3,
        {"n": [5, 5, 4], "block_size": 8, "overlap": "strict"},
        dict(n=[5, 5, 4], m=8, overlap="strict"),
    ),
    (
        (4, 8),
        3,
        {"n": [5, 5, 4], "block_size": 8, "overlap": "fill"},
        dict(n=[5, 5, 4], m=8, overlap="fill"),
    ),
    (
        (4, 9),
        3,
        {"n": [3, 4, 5], "block_size": 8, "conflict_aware": False},
        dict(n=[3, 4, 5], m=8, conflict_aware=False),
    ),
    (
        (4, 8),
        2,
        {"n": [2, 3], "block_size": 8, "weight": [0.3, 1.7], "lambda": 0.45},
        dict(n=[2, 3], m=8, weights=[0.3, 1.7], lam=0.45),
    ),
    (
        (6, 8),
        2,
        {"density": [0.25, 0.5], "block_size": 8, "weight": 0.6},
        dict(n=[2, 4], m=8, weights=[0.6, 0.6]),
    ),
    # density -> n = floor(density * m + 0.5): 0.3*10 = 3, 0.15*10+0.5 = 2
    ((4, 10), 2, {"density": [0.3, 0.15], "block_size": 10}, dict(n=[3, 2], m=10)),
    # 0.2*8 = 1.6 -> 2, 0.45*8 = 3.6 -> 4 (rounded, not truncated)
    ((3, 8), 2, {"density": [0.2, 0.45], "block_size": 8}, dict(n=[2, 4], m=8)),
    # default density 0.25 and default block_size 256 (one short block of 100: 64*100/256 -> 25)
    ((10, 10), 2, {}, dict(n=[64, 64], m=256)),
    ((2, 256), 3, {}, dict(n=[64, 64, 64], m=256)),
    ((3, 4), 1, {"n": [5], "block_size": 8, "lambda": 2.5}, dict(n=[5], m=8, lam=2.5)),
]


@pytest.mark.parametrize("shape,k,params,rk", CONFIGS)
def test_merge_tensors_equals_reference(shape, k, params, rk):
    base, models = distinct_models(shape, k, seed=hash((shape, k)) % 1000)
    out = cabs([base, *models], parameters=params)
    weights = rk.get("weights", [1.0] * k)
    want = ref.ref_merge(
        base,
        models,
        weights,
        rk["n"],
        rk["m"],
        overlap=rk.get("overlap", "fill"),
        conflict_aware=rk.get("conflict_aware", True),
        lam=rk.get("lam", 1.0),
    )
    assert_bit_equal(out, want)


def test_n_by_id_and_base_not_first():
    base, (a, b, c) = distinct_models((4, 8), 3, seed=21)
    m = 8
    # inputs in order c, base, a, b: priority is c, a, b
    out = cabs(
        [c, base, a, b],
        base_index=1,
        ids=["c", "base", "a", "b"],
        parameters={
            "n": {"a": 2, "b": 5, "c": 3},
            "weight": {"a": 0.5, "b": 1.5, "c": -1.0},
            "block_size": m,
        },
    )
    want = ref.ref_merge(base, [c, a, b], [-1.0, 0.5, 1.5], [3, 2, 5], m)
    assert_bit_equal(out, want)
    # a sequence is in non-base input order
    out2 = cabs(
        [c, base, a, b],
        base_index=1,
        parameters={"n": [3, 2, 5], "weight": [-1.0, 0.5, 1.5], "block_size": m},
    )
    assert_bit_equal(out2, want)


def test_input_order_is_priority_order():
    base = torch.zeros(8)
    a = torch.tensor([9.0, 8, 1, 1.5, 0.5, 0.25, 0.125, 2])
    b = torch.tensor([7.0, -10, 3, 0.1, 0.2, 4, 0.3, 0.4])
    p = {"n": 2, "block_size": 8}
    assert cabs([base, a, b], parameters=p).tolist() == [9.0, 8, 3, 0, 0, 4, 0, 0]
    assert cabs([base, b, a], parameters=p).tolist() == [7.0, -10, 0, 1.5, 0, 0, 0, 2]


# ---------------------------------------------------------------------------
# balanced: false
# ---------------------------------------------------------------------------


def test_unbalanced_explicit():
    base = torch.zeros(2, 4)
    a = torch.tensor([[9.0, 8, 7, 6], [1, 2, 3, 4]])
    b = torch.tensor([[1.0, 1, 1, 1], [5, 6, 7, 8]])
    # density 0.5 over 8 places -> 4 places; block_size irrelevant
    out = cabs(
        [base, a, b],
        parameters={"density": 0.5, "balanced": False, "block_size": 4},
    )
    # a takes its top 4 (row 0); b takes its top 4 among the rest (row 1)
    assert out.tolist() == [[9.0, 8, 7, 6], [5, 6, 7, 8]]
    # with balanced n:m (2 of each block of 4) the answer is different
    bal = cabs([base, a, b], parameters={"density": 0.5, "block_size": 4})
    assert bal.tolist() == [[9.0, 8, 1, 1], [5, 6, 3, 4]]


@pytest.mark.parametrize(
    "shape,densities,overlap,ca",
    [
        ((6, 10), [0.25, 0.25], "fill", True),
        ((7, 9), [0.3, 0.5, 0.2], "fill", True),  # 63*0.3 = 18.9 -> 19, 31.5 -> 32, 12.6 -> 13
        ((5, 5), [0.6, 0.6], "strict", True),  # 15 + 15 > 25
        ((5, 5), [0.6, 0.6], "fill", True),
        ((4, 6), [0.5, 0.75], "fill", False),
        ((11,), [0.5], "fill", True),  # 5.5 -> 6
    ],
)
def test_unbalanced_equals_reference(shape, densities, overlap, ca):
    k = len(densities)
    base, models = distinct_models(shape, k, seed=22)
    w = [0.9, 1.1, 0.5][:k]
    out = cabs(
        [base, *models],
        parameters={
            "density": densities,
            "balanced": False,
            "block_size": 8,  # ignored when unbalanced (balanced would differ)
            "overlap": overlap,
            "conflict_aware": ca,
            "weight": w,
            "lambda": 0.8,
        },
    )
    want = ref.ref_merge_unbalanced(
        base, models, w, densities, overlap=overlap, conflict_aware=ca, lam=0.8
    )
    assert_bit_equal(out, want)
    numel = base.numel()
    for d in densities:  # sanity on the quota rule
        assert math.floor(d * numel + 0.5) >= 1


# ---------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    base, models = distinct_models((4, 12), 3, seed=23, dtype=dtype)
    params = {"n": [3, 2, 4], "block_size": 8, "weight": [0.3, 0.7, 1.1], "lambda": 0.9}
    want32 = ref.ref_merge(base, models, [0.3, 0.7, 1.1], [3, 2, 4], 8, lam=0.9)
    out = cabs([base, *models], parameters=params)
    assert out.dtype == dtype
    assert_bit_equal(out, want32.to(dtype))
    # out_dtype casts the method's result, which (as for mergekit's own methods)
    # is in the promoted input dtype: float32 -> bf16/fp16 -> float32
    out32 = cabs([base, *models], parameters=params, out_dtype=torch.float32)
    assert_bit_equal(out32, want32.to(dtype).to(torch.float32))
    # an explicit working dtype gives the float32 result itself
    full = cabs([base, *models], parameters=params, dtype=torch.float32)
    assert_bit_equal(full, want32)


def test_float64_inputs():
    base, models = distinct_models((4, 12), 2, seed=24, dtype=torch.float64)
    models = [x + 1e-13 for x in models]
    params = {"n": [3, 4], "block_size": 8, "weight": [0.3, 0.7], "lambda": 1.2}
    out = cabs([base, *models], parameters=params)
    assert out.dtype == torch.float64
    assert_bit_equal(out, ref.ref_merge(base, models, [0.3, 0.7], [3, 4], 8, lam=1.2))


def test_explicit_dtype_float32_for_bf16_inputs():
    base, models = distinct_models((3, 8), 2, seed=25, dtype=torch.bfloat16)
    params = {"n": [2, 3], "block_size": 8, "weight": [0.3, 0.7]}
    out = cabs([base, *models], parameters=params, dtype=torch.float32)
    assert out.dtype == torch.float32
    assert_bit_equal(out, ref.ref_merge(base, models, [0.3, 0.7], [2, 3], 8))


# ---------------------------------------------------------------------------
# paper formula, determinism
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape,m,n", [((4, 16), 16, 4), ((3, 8), 8, 4), ((2, 12), 4, 2)])
def test_two_models_equal_paper_formula(shape, m, n):
    base, (a, b) = distinct_models(shape, 2, seed=26)
    want, _, _ = ref.paper_two_model(base, a, b, n, m, 0.8, 1.2)
    out = cabs([base, a, b], parameters={"n": n, "block_size": m, "weight": [0.8, 1.2]})
    assert_bit_equal(out, want)


def test_deterministic():
    g = torch.Generator().manual_seed(27)
    base = torch.randint(-2, 3, (6, 10), generator=g).to(torch.bfloat16)
    models = [base + torch.randint(-2, 3, (6, 10), generator=g).to(torch.bfloat16) for _ in range(4)]
    params = {"n": [3, 4, 5, 2], "block_size": 8, "weight": [0.3, 0.5, 0.7, 0.9], "lambda": 0.77}
    out1 = cabs([base, *models], parameters=params)
    out2 = cabs([base.clone(), *[x.clone() for x in models]], parameters=params)
    assert torch.equal(out1.view(torch.int16), out2.view(torch.int16))


# ---------------------------------------------------------------------------
# property test through merge_tensors
# ---------------------------------------------------------------------------

@st.composite
def method_cases(draw):
    case = draw(cabs_cases(min_n=1))
    return (*case, draw(st.integers(0, len(case[1]))))


@pytest.mark.usefixtures("kernel_backend")
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(method_cases())
def test_property_method_equals_reference(case):
    base, models, weights, n, m, overlap, conflict_aware, lam, base_index = case
    tensors = list(models)
    tensors.insert(base_index, base)
    out = cabs(
        tensors,
        base_index=base_index,
        parameters={
            "n": n,
            "weight": weights,
            "block_size": m,
            "overlap": overlap,
            "conflict_aware": conflict_aware,
            "lambda": lam,
        },
    )
    want = ref.ref_merge(
        base, models, weights, n, m, overlap=overlap, conflict_aware=conflict_aware, lam=lam
    )
    assert_bit_equal(out, want)


@pytest.mark.parametrize(
    "numel, n, m, kept",
    [(10, 3, 8, 4), (2, 1, 4, 1), (6, 1, 4, 2), (1, 1, 4, 0), (40, 5, 16, 13)],
)
def test_unbalanced_with_n_keeps_n_over_block_size_of_the_tensor(numel, n, m, kept):
    # SPEC defines balanced: false by density; with `n` given the product uses
    # density = n / block_size exactly: floor(n * numel / m + 0.5) places.
    base = torch.zeros(numel)
    model = torch.arange(1, numel + 1, dtype=torch.float32)  # distinct magnitudes
    out = merge_tensors(
        [base, model], "cabs", base_index=0,
        parameters={"n": n, "block_size": m, "balanced": False},
    )
    assert int((out != 0).sum()) == kept
    # the kept places are the largest ones
    assert torch.equal(out[numel - kept:], model[numel - kept:])
