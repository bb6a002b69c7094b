"""The kernel's two code paths (pure torch, numba) give the same bits.

`test_kernel.py` runs every exactness test on both paths against the SPEC
reference; this file compares the paths with each other on larger, realistic
inputs (every input dtype, short last blocks, many ties), and checks how a
path is picked.
"""

from __future__ import annotations

import pytest
import torch

from mergekit_cabs import _numba
from mergekit_cabs.kernel import (
    NonFiniteInputError,
    cabs_masks,
    cabs_merge,
    pick_backend,
)

from tiny_models import CUDA_TEST_DEVICE, FULL_TESTS

# Under MERGEKIT_CABS_FULL_TESTS=1 these run, and fail, without numba.
needs_numba = pytest.mark.skipif(
    not _numba.available() and not FULL_TESTS,
    reason="numba is not installed: pip install numba",
)


def family(shape, k, dtype, seed, *, coarse=False):
    """A base and k fine-tunes; `coarse` draws deltas from a few values (ties, zeros)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    models = []
    for _ in range(k):
        if coarse:
            delta = torch.randint(-3, 4, shape, generator=g).float() * 2.0**-9
        else:
            delta = torch.randn(shape, generator=g) * 1e-3
        models.append((base + delta).to(dtype))
    return base.to(dtype), models


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns, so that -0.0 and 0.0 differ."""
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}[t.dtype])


def both_paths(fn, *args, **kwargs):
    return fn(*args, backend="torch", **kwargs), fn(*args, backend="numba", **kwargs)


CASES = [
    # shape, block size, quotas, overlap, conflict_aware
    ((64, 1000), 256, [64, 64, 64], "fill", True),
    ((33, 777), 256, [64, 64, 64], "fill", True),  # short last block
    ((128, 96), 32, [12, 12, 12, 12, 12], "fill", True),  # K * n > m: overlap
    ((128, 96), 32, [12, 12, 12, 12, 12], "strict", True),
    ((50, 64), 64, [16, 8, 32], "fill", False),
    ((7, 5, 9), 16, [4, 16, 0], "strict", True),  # n = m and n = 0
    ((4099,), 4099, [1000, 2000], "fill", True),  # balanced: false (one block)
]


@needs_numba
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("coarse", [False, True])
@pytest.mark.parametrize("shape,m,n,overlap,aware", CASES)
def test_paths_give_the_same_bits(shape, m, n, overlap, aware, dtype, coarse):
    base, models = family(shape, len(n), dtype, seed=len(shape) * 7 + m, coarse=coarse)
    weights = [1.0, 0.7, 1 / 3, -1.25, 0.1][: len(n)]
    opts = {"overlap": overlap, "conflict_aware": aware}
    torch_out, numba_out = both_paths(cabs_merge, base, models, weights, n, m, lam=0.9, **opts)
    assert torch_out.dtype == numba_out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(bits(torch_out), bits(numba_out))
    torch_masks, numba_masks = both_paths(cabs_masks, base, models, n, m, **opts)
    for a, b in zip(torch_masks, numba_masks):
        assert torch.equal(a, b)
    # not a vacuous comparison: something was kept and something left out
    kept = sum(int(mask.sum()) for mask in torch_masks)
    assert 0 < kept < len(n) * base.numel()


@needs_numba
def test_mixed_input_dtypes_give_the_same_bits():
    base, models = family((40, 300), 3, torch.float32, seed=5)
    models = [models[0].to(torch.bfloat16), models[1], models[2].to(torch.float16)]
    a, b = both_paths(cabs_merge, base, models, [1.0, 0.5, 2.0], [64, 64, 64], 256)
    assert torch.equal(bits(a), bits(b))


@needs_numba
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("task", [256, 1024, 1 << 16])
def test_numba_result_does_not_depend_on_threads_or_task_size(monkeypatch, threads, task):
    base, models = family((96, 2048), 3, torch.bfloat16, seed=9, coarse=True)
    want = cabs_merge(base, models, [1.0, 0.8, 0.6], [64, 64, 64], 256, backend="torch")
    monkeypatch.setattr(_numba, "_TASK_ELEMENTS", task)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cabs_merge(base, models, [1.0, 0.8, 0.6], [64, 64, 64], 256, backend="numba")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(bits(got), bits(want))


@needs_numba
@pytest.mark.parametrize("scales", ["alternating", "ramp", "one odd block"])
def test_blocks_unlike_their_neighbours_give_the_same_bits(scales):
    """Each block's threshold is looked for near the previous block's; where
    that guess is far off (the scale of tau jumps from block to block), the
    compiled path walks or falls back, and the bits stay the torch path's."""
    g = torch.Generator().manual_seed(11)
    rows = 48
    if scales == "alternating":
        scale = torch.tensor([1e-4, 1e2] * (rows // 2))
    elif scales == "ramp":
        scale = torch.logspace(-6, 3, rows)
    else:
        scale = torch.ones(rows)
        scale[rows // 2] = 1e6
    base = torch.randn((rows, 256), generator=g) * 0.02
    models = [base + torch.randn((rows, 256), generator=g) * scale[:, None] for _ in range(3)]
    for dtype in (torch.float32, torch.bfloat16):
        b, ms = base.to(dtype), [m.to(dtype) for m in models]
        torch_out, numba_out = both_paths(cabs_merge, b, ms, [1.0, 0.5, 2.0], [64, 50, 100], 256)
        assert torch.equal(bits(torch_out), bits(numba_out))


@needs_numba
@pytest.mark.parametrize("key_dtype", ["uint32", "uint64"])
def test_threshold_from_any_guess_is_the_radix_selects(key_dtype):
    """`_find` counts around a guess and walks the distinct keys from it;
    whatever the guess (in the keys or not, near or far, 0 or the largest
    key), its (threshold, count) is the radix select's, and `_take` keeps the
    q top-ranked keys, ties to the lowest indices."""
    import numpy as np

    dtype = np.dtype(key_dtype).type
    ones = dtype(np.iinfo(key_dtype).max)
    limits = np.array([0, ones], key_dtype)
    rng = np.random.default_rng(1)
    for _ in range(200):
        length = int(rng.integers(2, 700))
        distinct = int(rng.choice([2, 3, 7, 40, 1 << 20]))
        keys = (rng.integers(0, distinct, length) * int(rng.integers(1, 1 << 10))).astype(key_dtype)
        keys[rng.random(length) < 0.5] |= dtype(1 << (8 * keys.itemsize - 1))  # free places
        q = int(rng.integers(1, length))
        hist, pool = np.empty(256, np.int32), np.empty(length, key_dtype)
        want = _numba._threshold(keys, length, q, hist, pool)
        picked = keys[int(rng.integers(length))]
        for guess in (picked, want[0], int(want[0]) | 1, 0, ones, int(want[0]) >> 1):
            got = _numba._find(keys, length, q, dtype(guess), hist, pool, limits)
            assert (int(got[0]), int(got[1])) == (int(want[0]), int(want[1]))
        takes = np.empty(length, np.bool_)
        _numba._take(keys, length, q, dtype(want[0]), want[1], takes)
        ranked = np.argsort(ones - keys, kind="stable")  # larger keys first, then lower indices
        expected = np.zeros(length, np.bool_)
        expected[ranked[:q]] = True
        assert np.array_equal(takes, expected)


@pytest.mark.parametrize(
    "where,want",
    [("base", None), ("model 1", 1), ("model 2", 2), ("both models", 1), ("overflow", 0)],
)
@pytest.mark.parametrize("backend", ["torch", pytest.param("numba", marks=needs_numba)])
def test_non_finite_input_names_the_same_input_on_both_paths(where, want, backend):
    base, models = family((20, 300), 3, torch.float32, seed=3)
    if where == "base":
        base[19, 299] = float("nan")
    if where in ("model 1", "both models"):
        models[1][0, 5] = float("inf")
    if where in ("model 2", "both models"):
        models[2][10, 0] = float("nan")
    if where == "overflow":  # finite inputs whose difference is not
        base[3, 3], models[0][3, 3] = -3e38, 3e38
    with pytest.raises(NonFiniteInputError) as error:
        cabs_merge(base, models, [1.0] * 3, [64] * 3, 256, backend=backend)
    assert error.value.model == want


@pytest.mark.skipif(CUDA_TEST_DEVICE == "cuda" and not torch.cuda.is_available(),
                    reason="no CUDA device on this machine")
def test_cuda_gives_the_same_bits_as_cpu():
    base, models = family((256, 4096), 3, torch.bfloat16, seed=11, coarse=True)
    cpu = cabs_merge(base, models, [1.0, 0.8, 0.6], [64] * 3, 256, backend="torch")
    device = torch.device(CUDA_TEST_DEVICE)
    gpu = cabs_merge(base.to(device), [m.to(device) for m in models], [1.0, 0.8, 0.6], [64] * 3, 256)
    assert gpu.device.type == device.type
    assert torch.equal(bits(gpu.cpu()), bits(cpu))


# --- picking a path ---------------------------------------------------------


def test_auto_picks_numba_on_cpu_when_installed(monkeypatch):
    monkeypatch.delenv("MERGEKIT_CABS_BACKEND", raising=False)
    cpu = [torch.zeros(3)]
    assert pick_backend(None, cpu) == ("numba" if _numba.available() else "torch")
    monkeypatch.setattr(_numba, "numba", None)  # as if numba were not installed
    assert pick_backend(None, cpu) == "torch"
    assert pick_backend("auto", cpu) == "torch"


def test_environment_variable_picks_the_path(monkeypatch):
    cpu = [torch.zeros(3)]
    monkeypatch.setenv("MERGEKIT_CABS_BACKEND", "torch")
    assert pick_backend(None, cpu) == "torch"
    monkeypatch.setattr(_numba, "numba", object())  # pretend it is installed
    assert pick_backend("numba", cpu) == "numba"  # an explicit argument wins
    monkeypatch.setenv("MERGEKIT_CABS_BACKEND", "fast")
    refused = r"MERGEKIT_CABS_BACKEND is 'fast'; it must be one of auto, torch, numba, or unset"
    with pytest.raises(ValueError, match=refused):
        pick_backend(None, cpu)


@pytest.mark.parametrize("setting", ["fast", "numba"])
def test_bad_backend_setting_stops_the_plan_before_anything_is_written(
    setting, fp32_family, tmp_path, monkeypatch
):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from mergekit_cabs.params import CabsConfigError

    if setting == "numba":
        monkeypatch.setattr(_numba, "numba", None)  # asked for, not installed
    monkeypatch.setenv("MERGEKIT_CABS_BACKEND", setting)
    base, tunes = fp32_family
    config = MergeConfiguration.model_validate({
        "merge_method": "cabs", "base_model": str(base.path),
        "models": [{"model": str(t.path)} for t in tunes],
    })
    out = tmp_path / "out"
    with pytest.raises(CabsConfigError, match="MERGEKIT_CABS_BACKEND"):
        run_merge(config, str(out), MergeOptions(quiet=True))
    assert not list(out.glob("*.safetensors")) and not (out / "config.json").exists()


def test_numba_backend_without_numba_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(_numba, "numba", None)
    with pytest.raises(ValueError, match="pip install numba"):
        cabs_merge(torch.zeros(4), [torch.ones(4)], [1.0], [2], 4, backend="numba")


def test_numba_backend_refuses_gpu_tensors(monkeypatch):
    monkeypatch.setattr(_numba, "numba", object())  # pretend it is installed
    meta = [torch.zeros(4, device="meta")]
    with pytest.raises(ValueError, match="CPU tensors only"):
        pick_backend("numba", meta)
    assert pick_backend("auto", meta) == "torch"


def test_auto_takes_torch_when_gradients_are_wanted(monkeypatch):
    monkeypatch.setattr(_numba, "numba", object())  # pretend it is installed
    leaf = [torch.zeros(3, requires_grad=True)]
    assert pick_backend("auto", leaf) == "torch"
    with pytest.raises(ValueError, match="gradients"):
        pick_backend("numba", leaf)
    with torch.no_grad():
        assert pick_backend("auto", leaf) == "numba"


def test_cpu_merge_without_numba_says_once_how_to_get_it(monkeypatch, caplog):
    import logging

    from mergekit.merge_methods import merge_state_dicts

    monkeypatch.delenv("MERGEKIT_CABS_BACKEND", raising=False)
    monkeypatch.setattr(_numba, "numba", None)  # as if numba were not installed
    base = {"a": torch.zeros(300), "b": torch.zeros(40)}
    tune = {"a": torch.ones(300), "b": torch.ones(40)}
    with caplog.at_level(logging.WARNING):
        merge_state_dicts([base, tune], "cabs", base=0)
    said = [r.getMessage() for r in caplog.records if "numba is not installed" in r.getMessage()]
    assert len(said) == 1 and "pip install numba" in said[0]
    caplog.clear()
    monkeypatch.setenv("MERGEKIT_CABS_BACKEND", "torch")  # asked for: nothing to say
    with caplog.at_level(logging.WARNING):
        merge_state_dicts([base, tune], "cabs", base=0)
    assert not [r for r in caplog.records if "numba" in r.getMessage()]


# --- rounding to the output dtype while writing -------------------------------


def out_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.bfloat16: torch.int16, torch.float16: torch.int16,
                   torch.float32: torch.int32, torch.float64: torch.int64}[t.dtype])


@needs_numba
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_out_dtype_is_one_rounding_of_the_compute_result(in_dtype, out_dtype):
    base, models = family((30, 500), 3, in_dtype, seed=21, coarse=True)
    args = (base, models, [1.0, 0.7, 1 / 3], [64, 64, 64], 256)
    want = cabs_merge(*args, lam=0.9, backend="torch").to(out_dtype)
    for backend in ("torch", "numba"):
        got = cabs_merge(*args, lam=0.9, backend=backend, out_dtype=out_dtype)
        assert got.dtype == out_dtype and got.shape == base.shape
        assert torch.equal(out_bits(got), out_bits(want)), backend


@needs_numba
def test_bfloat16_rounding_edge_cases_match_torch():
    # tau = 0, so the result is the float32 base itself: these bit patterns
    # check ties to even, overflow to infinity, subnormals and signed zeros.
    patterns = [0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F807FFF, 0x7F7FFFFF, 0xFF7FFFFF,
                0x7F7F8000, 0x00000001, 0x00008000, 0x80018000, 0x80000000, 0x00000000]
    base = torch.tensor(patterns, dtype=torch.int64).to(torch.int32).view(torch.float32)
    got = cabs_merge(base, [base.clone()], [1.0], [1], 4, backend="numba", out_dtype=torch.bfloat16)
    want = cabs_merge(base, [base.clone()], [1.0], [1], 4, backend="torch").to(torch.bfloat16)
    assert torch.equal(out_bits(got), out_bits(want))


@needs_numba
def test_overflowing_sum_rounds_like_torch():
    # finite inputs, weights so large that the sum overflows: +inf, -inf, NaN
    base = torch.zeros(4)
    models = [torch.tensor([10.0, 10.0, 10.0, 1.0]), torch.tensor([1.0, 10.0, 10.0, 1.0])]
    for weights in ([1e38, 1e38], [1e38, -1e38], [-1e38, -1e38]):
        for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
            want = cabs_merge(base, models, weights, [4, 4], 4, conflict_aware=False, backend="torch")
            got = cabs_merge(base, models, weights, [4, 4], 4, conflict_aware=False,
                             backend="numba", out_dtype=out_dtype)
            assert torch.equal(out_bits(got), out_bits(want.to(out_dtype))), (weights, out_dtype)
