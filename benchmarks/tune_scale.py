"""What `mergekit-cabs tune` costs on a bigger model: memory, and the time to
set a weight vector against the time to score one.

Writes a random Llama base of about 170M parameters (bfloat16) and three
fine-tunes (base + small random task vectors) with a word-level tokenizer,
random-word data files, then runs `tune` in this process with a small budget
(`--objective loss`: random data has no meaningful normalized gain) and
reports the store's size, the live model's size, peak RSS and the mean
seconds per weight setting and per evaluation.

    python benchmarks/tune_scale.py --work /tmp/tune-scale
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch


def build(work: Path, hidden: int, layers: int, vocab: int) -> Path:
    import yaml
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    names = ["base", "ft1", "ft2", "ft3"]
    for i, name in enumerate(names):
        if i:
            gen = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for key, param in model.state_dict().items():
                    noise = torch.randn(param.shape, generator=gen) * 0.002
                    param.copy_((base_state[key].float() + noise).to(torch.bfloat16))
        model.save_pretrained(work / name, safe_serialization=True)
        fast.save_pretrained(work / name)
        gen = torch.Generator().manual_seed(100 + i)
        ids = torch.randint(3, vocab, (20_000,), generator=gen).tolist()
        (work / f"{name}.txt").write_text(" ".join(words[j] for j in ids))
    cfg = {"merge_method": "cabs", "base_model": str(work / "base"),
           "models": [{"model": str(work / n), "parameters": {"weight": 1.0, "density": 0.25}} for n in names[1:]],
           "parameters": {"block_size": 256}, "dtype": "bfloat16"}
    (work / "cabs.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return work / "cabs.yml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tune-scale"))
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--budget", type=int, default=4)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    args = parser.parse_args()

    from mergekit_cabs import tune as tn

    config = args.work / "cabs.yml"
    if not config.exists():
        args.work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        build(args.work, args.hidden, args.layers, args.vocab)
        print(f"built the models in {time.perf_counter() - started:.0f} s", flush=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prep = tn.prepare(config, [f"ft{i}={args.work / f'ft{i}.txt'}" for i in (1, 2, 3)], window=args.window,
                      max_windows=args.max_windows, budget=args.budget)
    report = tn.run_tune(prep, objective="loss", budget=args.budget)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    merged = report["supports"]["places"]
    out = {
        "merged_weights": merged,
        "store_bytes": report["memory"]["store_bytes"],
        "store_bytes_per_weight": report["memory"]["store_bytes_per_place"],
        "model_bytes": report["memory"]["model_bytes"],
        "peak_rss_bytes": peak * 1024,
        "rss_before_bytes": before * 1024,
        "set_weights_mean_s": report["time"]["set_weights_mean_s"],
        "evaluate_mean_s": report["time"]["evaluate_mean_s"],
        "tokens_per_evaluation": sum(len(t.fit) * t.fit.shape[1] for t in prep.tasks),
        "masks_s": report["time"]["masks_s"],
        "evaluations": report["search"]["evaluations"],
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
