"""Tiny Llama checkpoints and tokenizers, built locally (no model hub).

Sizes are deliberately awkward (hidden 40, intermediate 72, vocabulary 77,
one key/value head) so that no tensor is a multiple of the small block sizes
the tests use: blocks straddle rows and every tensor ends in a short tail.

Values lie on dyadic grids so that every checkpoint value and every task
vector ``W_i - W_base`` is exact in float32 *and* in bfloat16:

* base values are ``m * 2**-7`` with ``|m| <= 60`` (layer norms ``1 + ...``);
* a fine-tune adds ``s * k * 2**-7`` with ``k`` in ``{-8..8}``; a fraction of
  places get ``k = 0`` (unchanged weights) and the grid makes equal
  magnitudes (ties) common, so tie rules are exercised for real.

Each fine-tune has its own scale ``s`` so that task vectors have distinct
magnitudes from model to model.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

GRID = 2.0**-7

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


# CI sets this: then a missing optional package (numba, matplotlib) fails the
# tests that need it instead of skipping them.
FULL_TESTS = os.environ.get("MERGEKIT_CABS_FULL_TESTS") == "1"

# The device of the tests that check a CUDA path against the CPU (named with
# "cuda"; benchmarks/gpu/run.sh runs them on the first GPU): "cuda", where they
# skip without one.  The CPU dry run of that script sets "cpu" so that they run
# their code there too: then the "device" side is the CPU's default path
# (numba where installed) against the torch path, not a CUDA check.
CUDA_TEST_DEVICE = os.environ.get("MERGEKIT_CABS_CUDA_TEST_DEVICE", "cuda")


def optional(module: str, install: str):
    """Import an optional package, or skip the test saying `pip install
    <install>` (fail under FULL_TESTS)."""
    import pytest

    try:
        return importlib.import_module(module)
    except ImportError:
        if FULL_TESTS:
            pytest.fail(f"{module} is not installed, and MERGEKIT_CABS_FULL_TESTS=1")
        pytest.skip(f"{module} is not installed: pip install {install}")


def default_words(vocab_size: int, prefix: str = "w") -> list[str]:
    """A vocabulary of ``vocab_size`` tokens: three specials, then words."""
    words = list(SPECIAL_TOKENS)
    words += [f"{prefix}{i}" for i in range(vocab_size - len(words))]
    return words[:vocab_size]


@dataclass
class TinyModel:
    path: Path
    words: list[str]
    dtype: torch.dtype
    state: dict[str, torch.Tensor] = field(repr=False)
    config: dict = field(repr=False, default_factory=dict)

    @property
    def vocab(self) -> dict[str, int]:
        return {word: idx for idx, word in enumerate(self.words)}

    def __str__(self) -> str:
        return str(self.path)


def word_text(*numbers: int) -> str:
    """The words w<n> of the tiny vocabulary (`default_words`) for `numbers`, joined by spaces."""
    return " ".join(f"w{n}" for n in numbers)


def write_jsonl(path: Path, rows) -> Path:
    """`rows` written to `path` as JSON lines; the path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def llama_config(
    *,
    vocab_size: int,
    hidden: int = 40,
    intermediate: int = 72,
    layers: int = 2,
    heads: int = 5,
    kv_heads: int = 1,
    dtype: torch.dtype = torch.float32,
):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        architectures=["LlamaForCausalLM"],
        torch_dtype=str(dtype).replace("torch.", ""),
    )


def tensor_shapes(config) -> dict[str, torch.Size]:
    """Names and shapes of a Llama's persistent weights, built on `meta`."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: t.shape for name, t in model.state_dict().items()}


def make_tokenizer(words: Sequence[str]):
    """A word-level fast tokenizer whose token ids are the list positions."""
    import tokenizers
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: idx for idx, word in enumerate(words)}
    if len(vocab) != len(words):
        raise ValueError("duplicate words")
    tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


def _grid_base(shape, gen: torch.Generator, norm: bool) -> torch.Tensor:
    m = torch.randint(-60, 61, tuple(shape), generator=gen).to(torch.float32)
    if norm:
        return 1.0 + (m / 4).round() * GRID
    return m * GRID


def _grid_delta(shape, gen: torch.Generator, scale: int, zero_frac: float):
    k = torch.randint(1, 9, tuple(shape), generator=gen).to(torch.float32)
    sign = torch.randint(0, 2, tuple(shape), generator=gen).to(torch.float32) * 2 - 1
    keep = (torch.rand(tuple(shape), generator=gen) >= zero_frac).to(torch.float32)
    return sign * k * keep * (scale * GRID)


def _tiny_tensor(name, shape, gen, base, words, scale, zero_frac, dtype) -> torch.Tensor:
    """One tensor of a tiny model: a fresh grid value, or the base's (vocabulary
    rows matched by word) plus a grid perturbation; exact in `dtype`."""
    norm = name.endswith("norm.weight")
    if base is None:
        value = _grid_base(shape, gen, norm)
    else:
        source = base.state[name].to(torch.float32)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            fresh = _grid_base(shape, gen, norm)
            vocab = base.vocab
            rows = [source[vocab[word]] if word in vocab else fresh[idx] for idx, word in enumerate(words)]
            source = torch.stack(rows)
        value = source + _grid_delta(shape, gen, scale, zero_frac)
    out = value.to(dtype).contiguous()
    # Every value must be exact in the stored dtype (see module docstring).
    assert torch.equal(out.to(torch.float32), value), name
    return out


def make_tiny_llama(
    path,
    *,
    vocab_size: int | None = None,
    words: Sequence[str] | None = None,
    hidden: int = 40,
    intermediate: int = 72,
    layers: int = 2,
    seed: int = 0,
    base: TinyModel | None = None,
    scale: int = 1,
    zero_frac: float = 0.1,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
) -> TinyModel:
    """Write a tiny LlamaForCausalLM (config + safetensors [+ tokenizer]).

    Without ``base`` the weights are a fresh grid "pretrained" model. With
    ``base`` the model is a fine-tune: every weight is the base's weight plus
    a deterministic grid perturbation of scale ``scale``. Vocabulary rows are
    matched by word, so a fine-tune may order its vocabulary differently or
    carry words the base lacks (those rows are fresh values).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if words is None:
        if vocab_size is None:
            vocab_size = len(base.words) if base is not None else 77
        words = base.words if base is not None else default_words(vocab_size)
    words = list(words)
    if vocab_size is not None and vocab_size != len(words):
        raise ValueError("vocab_size and words disagree")
    if base is not None:
        hidden = base.config["hidden_size"]
        intermediate = base.config["intermediate_size"]
        layers = base.config["num_hidden_layers"]

    config = llama_config(
        vocab_size=len(words),
        hidden=hidden,
        intermediate=intermediate,
        layers=layers,
        dtype=dtype,
    )
    shapes = tensor_shapes(config)
    gen = torch.Generator().manual_seed(seed)

    state = {name: _tiny_tensor(name, shapes[name], gen, base, words, scale, zero_frac, dtype)
             for name in sorted(shapes)}

    config.save_pretrained(path)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer:
        make_tokenizer(words).save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    return TinyModel(path=path, words=words, dtype=dtype, state=state, config=cfg)


# ---------------------------------------------------------------------------
# Expected values: a plain CABS for one tensor (masks from tests/reference.py),
# with weights, densities and ablations from SPEC.md, plus helpers that predict
# which parameter value mergekit resolves for a tensor.
# ---------------------------------------------------------------------------


def quota_from_density(density: float, m: int) -> int:
    """n = floor(density * m + 0.5)."""
    import math

    return int(math.floor(density * m + 0.5))


def expected_cabs(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    densities: Sequence[float | None] | None = None,
    ns: Sequence[int | None] | None = None,
    block_size: int = 256,
    overlap: str = "fill",
    conflict_aware: bool = True,
    balanced: bool = True,
    lam: float = 1.0,
    return_masks: bool = False,
):
    """CABS for one tensor, as SPEC.md "The computation" describes it.

    Returns the merged tensor in float64 (not yet cast), shaped like ``base``,
    and optionally the boolean masks (flat lists). Ties: free places before
    claimed ones, larger |tau| first, then the lower flattened index.
    """
    import math

    k = len(models)
    densities = list(densities) if densities is not None else [None] * k
    ns = list(ns) if ns is not None else [None] * k
    for i in range(k):
        if densities[i] is None and ns[i] is None:
            densities[i] = 0.25
    base32 = base.detach().to(torch.float32).reshape(-1)
    numel = base32.numel()
    taus = [
        (t.detach().to(torch.float32).reshape(-1) - base32).tolist() for t in models
    ]
    # Masks from the scalar reference of the kernel tests (tests/reference.py);
    # here only the quotas are worked out from density / n / balanced.
    from reference import ref_masks

    if balanced:
        quotas = [n if n is not None else quota_from_density(d, block_size) for n, d in zip(ns, densities)]
        length = block_size
    else:
        quotas = [
            int(math.floor(d * numel + 0.5)) if d is not None else int(math.floor(n / block_size * numel + 0.5))
            for n, d in zip(ns, densities)
        ]
        length = max(numel, 1)
    masks = [
        mask.reshape(-1).tolist()
        for mask in ref_masks(base, models, quotas, length, overlap=overlap, conflict_aware=conflict_aware)
    ]

    total = torch.zeros(numel, dtype=torch.float64)
    for i in range(k):
        kept = torch.tensor(
            [t if keep else 0.0 for t, keep in zip(taus[i], masks[i])],
            dtype=torch.float64,
        )
        total += float(weights[i]) * kept
    result = (base32.to(torch.float64) + float(lam) * total).reshape(base.shape)
    if return_masks:
        return result, masks
    return result


def assert_matches(
    actual: torch.Tensor,
    expected64: torch.Tensor,
    name: str = "",
    via: torch.dtype | None = None,
):
    """Compare a product tensor with a float64 expectation.

    ``via`` is the dtype the merge itself returns in (mergekit's compute
    dtype, before any ``out_dtype`` cast); by default the output's dtype.
    Float32 (or wider) all the way: within a few float32 rounding steps.
    A narrower dtype on the way: equal to the float32-rounded expectation
    cast through ``via`` to the output dtype, give or take one unit in the
    last place of the coarser dtype (double rounding).
    """
    wide = (torch.float32, torch.float64)
    via = via or actual.dtype
    assert actual.shape == expected64.shape, (name, actual.shape, expected64.shape)
    if actual.dtype in wide and via in wide:
        torch.testing.assert_close(
            actual.to(torch.float64),
            expected64,
            rtol=4e-7,
            atol=1e-7,
            msg=lambda m: f"{name}: {m}",
        )
        return
    want = expected64.to(torch.float32).to(via).to(actual.dtype)
    if torch.equal(actual, want):
        return
    ulp = max(
        torch.finfo(d).eps for d in (via, actual.dtype) if d not in wide
    )
    torch.testing.assert_close(
        actual.to(torch.float64),
        want.to(torch.float64),
        rtol=ulp,
        atol=0,
        msg=lambda m: f"{name}: {m}",
    )


def gradient_value(values: Sequence[float], t: float) -> float:
    """A mergekit gradient (list of anchors) at position t in [0, 1]."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def layer_t(name: str, num_layers: int) -> float:
    """Position of a tensor in its slice (pre/post weights sit at t = 0)."""
    import re

    match = re.search(r"\.layers\.(\d+)\.", name)
    if not match or num_layers <= 1:
        return 0.0 if not match else 1.0
    return int(match.group(1)) / (num_layers - 1)


def aligned_vocab_rows(
    out_words: Sequence[str],
    tensors: dict[str, torch.Tensor],
    vocabs: dict[str, dict[str, int]],
    base_key: str,
) -> dict[str, torch.Tensor]:
    """Re-create the vocabulary alignment of ``tokenizer_source: union``.

    For each output token, a model that has the token contributes its own row.
    A model that lacks it gets: the only holder's row if one model has it, the
    base's row if the base has it, else the mean of the holders' rows.
    """
    out = {}
    for key, tensor in tensors.items():
        rows = []
        for word in out_words:
            if word in vocabs[key]:
                rows.append(tensor[vocabs[key][word]].to(torch.float32))
                continue
            holders = [h for h in tensors if word in vocabs[h]]
            if len(holders) == 1:
                h = holders[0]
                rows.append(tensors[h][vocabs[h][word]].to(torch.float32))
            elif word in vocabs[base_key]:
                rows.append(tensors[base_key][vocabs[base_key][word]].to(torch.float32))
            else:
                rows.append(
                    torch.stack(
                        [tensors[h][vocabs[h][word]].to(torch.float32) for h in holders]
                    ).mean(0)
                )
        out[key] = torch.stack(rows)
    return out


# ---------------------------------------------------------------------------
# Running merges: the real console script, or run_merge in this process.
# ---------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent


def cabs_is_installed() -> bool:
    """True when the mergekit-cabs distribution is installed in this env."""
    from importlib import metadata

    try:
        metadata.distribution("mergekit-cabs")
    except metadata.PackageNotFoundError:
        return False
    return True


def cli_command(config_path, out_path) -> list[str]:
    """`mergekit-yaml CONFIG OUT` from this interpreter's environment.

    Before the package is installed (development checkout), the same click
    command runs after an explicit `import mergekit_cabs`.
    """
    import sys

    script = Path(sys.executable).parent / "mergekit-yaml"
    if cabs_is_installed() and script.exists():
        return [str(script), str(config_path), str(out_path)]
    return [
        sys.executable,
        "-c",
        "import mergekit_cabs; from mergekit.scripts.run_yaml import main; main()",
        str(config_path),
        str(out_path),
    ]


def run_cli(config: dict, config_path, out_path, extra_args: Sequence[str] = ()):
    """Write ``config`` as YAML and run the console script in a subprocess."""
    import os
    import subprocess

    import yaml

    config_path = Path(config_path)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = dict(os.environ)
    env["MERGEKIT_CABS_STRICT"] = "1"
    if not cabs_is_installed():
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]
        )
    return subprocess.run(
        cli_command(config_path, out_path) + list(extra_args),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def run_in_process(config: dict, out_path, **options) -> None:
    """mergekit.merge.run_merge on a config dict (as YAML would give it)."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    merge_config = MergeConfiguration.model_validate(config)
    run_merge(
        merge_config,
        str(out_path),
        options=MergeOptions(quiet=True, **options),
        config_source=yaml.safe_dump(config, sort_keys=False),
    )


def load_output(out_path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors shard in a merge's output folder."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    shards = sorted(Path(out_path).glob("*.safetensors"))
    assert shards, f"no safetensors in {out_path}"
    for shard in shards:
        part = load_file(str(shard))
        assert not set(part) & set(tensors)
        tensors.update(part)
    return tensors
