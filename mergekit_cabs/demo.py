"""`mergekit-cabs demo`: a tiny made-up model family, merged with cabs end to end.

Builds a random tiny Llama base (with a word-level tokenizer) and fine-tunes
that each add a different random task vector, writes a cabs YAML, merges it
through mergekit, and checks every merged tensor against the kernel's masks
with the numbers the YAML gives.  No network.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

SPECIALISTS = ("math", "code", "chat")

CONFIG = """\
# CABS merge of three small fine-tunes made by `mergekit-cabs demo`.
# Priority order is the order of `models:`: math chooses first.
merge_method: cabs
base_model: {base}
models:
  - model: {math}
    parameters: {{weight: 1.0, density: 0.25}}
  - model: {code}
    parameters: {{weight: 0.8, n: 64}}
  - model: {chat}
    parameters: {{weight: 0.6, density: 0.25}}
parameters:
  block_size: 256
  overlap: fill
  conflict_aware: true
  balanced: true
  lambda: 1.0
dtype: float32
"""


def build_models(directory: Path, seed: int) -> dict[str, Path]:
    """The base and the fine-tunes, saved as safetensors with a tokenizer; {name: path}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(317)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=96, intermediate_size=264, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    paths = {"base": directory / "base"}
    model.save_pretrained(paths["base"], safe_serialization=True)
    fast.save_pretrained(paths["base"])
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, name in enumerate(SPECIALISTS):
        generator = torch.Generator().manual_seed(seed * 100 + i + 1)
        with torch.no_grad():
            for key, param in model.state_dict().items():
                param.copy_(base_state[key] + torch.randn(param.shape, generator=generator) * 0.02 * (1 + i))
        paths[name] = directory / name
        model.save_pretrained(paths[name], safe_serialization=True)
        fast.save_pretrained(paths[name])
    return paths


def write_config(directory: Path, paths: dict[str, Path]) -> Path:
    """cabs.yml for the demo models."""
    path = directory / "cabs.yml"
    path.write_text(CONFIG.format(**{k: str(v) for k, v in paths.items()}), encoding="utf-8")
    return path


def _settings(config_path: Path):
    """(resolved cabs parameters, fine-tune paths, base path) as the YAML gives them."""
    from mergekit_cabs.params import PARAMETERS, resolve
    from mergekit_cabs.planning import read_yaml

    raw = read_yaml(config_path)
    shared = {p.name: p.default for p in PARAMETERS if p.shared}
    shared.update(raw.get("parameters") or {})
    per_model = [(str(m["model"]), m.get("parameters") or {}) for m in raw["models"]]
    return resolve(shared, per_model, None), [Path(label) for label, _ in per_model], Path(raw["base_model"])


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not iterable)
    return tensors


def check_merge(config_path: Path, out: Path, echo: Callable[[str], None]) -> None:
    """Check the merged tensors against the kernel's masks with the YAML's
    numbers (weights, n per block, lambda) and print a summary."""
    from mergekit_cabs.kernel import cabs_masks

    r, model_paths, base_path = _settings(config_path)
    base, merged = _load(base_path), _load(out)
    finetunes = [_load(p) for p in model_paths]
    kept, shared, total, worst = [0] * len(finetunes), 0, 0, 0.0
    for key, w_base in base.items():
        models = [ft[key] for ft in finetunes]
        masks = cabs_masks(w_base, models, list(r.n), r.block_size, overlap=r.overlap,
                           conflict_aware=r.conflict_aware)
        shared += int((torch.stack(masks).sum(0) > 1).sum())
        total += w_base.numel()
        for i, mask in enumerate(masks):
            kept[i] += int(mask.sum())
        summed = sum(w * torch.where(m, t - w_base, 0) for w, m, t in zip(r.weights, masks, models))
        worst = max(worst, float((merged[key].float() - (w_base + r.lam * summed)).abs().max()))
    echo(f"\nMerged {len(merged)} tensors, {total:,} weights")
    for path, k, n in zip(model_paths, kept, r.n):
        echo(f"  {path.name:5s} kept {k:>9,} weights ({k / total:.1%} of each tensor, {n} of every {r.block_size})")
    fits = "disjoint" if sum(r.n) <= r.block_size else "overlap unavoidable"
    echo(f"  places kept by two or more models: {shared} "
         f"({'+'.join(map(str, r.n))} {'<=' if sum(r.n) <= r.block_size else '>'} {r.block_size}: {fits})")
    echo(f"  largest difference from base + sum of weighted pruned task vectors: {worst:.2e}")


def check_loads(out: Path, echo: Callable[[str], None]) -> None:
    """Load the merged model with transformers and run it once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    echo(f"  transformers loads it: {sum(p.numel() for p in model.parameters()):,} parameters, "
         f"logits {tuple(logits.shape)}, finite: {bool(torch.isfinite(logits).all())}")


def run_demo(directory: Path, seed: int, echo: Callable[[str], None]) -> Path:
    """Build, write the YAML, merge with mergekit, check; returns the config's path."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_cabs  # noqa: F401  (registers cabs)
    from mergekit_cabs.planning import read_yaml

    out = directory / "merged"
    directory.mkdir(parents=True, exist_ok=True)
    echo(f"Building a tiny Llama base and {len(SPECIALISTS)} fine-tunes in {directory}")
    config_path = write_config(directory, build_models(directory, seed))
    echo(f"Wrote {config_path}")
    echo("Merging with mergekit (merge_method: cabs)")
    config = MergeConfiguration.model_validate(read_yaml(config_path))
    run_merge(config, str(out), MergeOptions(copy_tokenizer=True, quiet=False))
    check_merge(config_path, out, echo)
    check_loads(out, echo)
    return config_path
