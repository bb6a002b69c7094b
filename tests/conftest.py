"""Shared fixtures: tiny local Llama checkpoints, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))
REPO_ROOT = TESTS_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("MERGEKIT_CABS_STRICT", "1")
import mergekit_cabs  # noqa: E402,F401  (registers `cabs` with mergekit)

from tiny_models import default_words, make_tiny_llama, optional  # noqa: E402

LAYERS = 3


@pytest.fixture(params=["torch", "numba"])
def kernel_backend(request, monkeypatch):
    """Run the test once on each code path of the kernel (MERGEKIT_CABS_BACKEND).

    Without numba the numba case is skipped, saying so (a failure in CI, which
    sets MERGEKIT_CABS_FULL_TESTS=1).
    """
    if request.param == "numba":
        optional("numba", "numba")
    monkeypatch.setenv("MERGEKIT_CABS_BACKEND", request.param)
    return request.param


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def bf16_family(tiny_root):
    """A bfloat16 base and three fine-tunes with task-vector scales 1, 2, 3."""
    base = make_tiny_llama(
        tiny_root / "bf16_base", seed=100, layers=LAYERS, dtype=torch.bfloat16
    )
    tunes = [
        make_tiny_llama(
            tiny_root / f"bf16_ft{i}",
            seed=100 + i,
            base=base,
            scale=i,
            dtype=torch.bfloat16,
        )
        for i in (1, 2, 3)
    ]
    return base, tunes


@pytest.fixture(scope="session")
def fp32_family(tiny_root):
    """A float32 base and two fine-tunes (scales 1 and 3, some zero deltas)."""
    base = make_tiny_llama(
        tiny_root / "fp32_base", seed=200, layers=2, dtype=torch.float32
    )
    tunes = [
        make_tiny_llama(
            tiny_root / f"fp32_ft{i}",
            seed=200 + i,
            base=base,
            scale=i,
            zero_frac=0.3,
            dtype=torch.float32,
        )
        for i in (1, 3)
    ]
    return base, tunes


@pytest.fixture(scope="session")
def vocab_family(tiny_root):
    """Models with different vocabularies, for `tokenizer_source: union`.

    * base: 77 tokens;
    * tune A: the base's tokens plus two words of its own (79);
    * tune B: the base's tokens in another order (a reversed block of ids),
      less one word, plus three words of its own (79).
    No word is held by two models but not by the base, so mergekit never
    averages rows (its average is taken in the checkpoint's dtype).
    """
    base = make_tiny_llama(
        tiny_root / "vocab_base", seed=300, layers=2, dtype=torch.float32
    )
    words_a = base.words + ["alpha_a", "beta_a"]
    plain = base.words[3:]
    words_b = (
        base.words[:3]
        + list(reversed(plain[:30]))
        + [w for w in plain[30:] if w != "w40"]
        + ["gamma_b", "delta_b", "eps_b"]
    )
    tune_a = make_tiny_llama(
        tiny_root / "vocab_a", words=words_a, seed=301, base=base, scale=1
    )
    tune_b = make_tiny_llama(
        tiny_root / "vocab_b", words=words_b, seed=302, base=base, scale=2
    )
    assert default_words(77) == base.words
    return base, [tune_a, tune_b]
