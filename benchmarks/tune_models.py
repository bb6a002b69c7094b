"""Build a small family of Llama models, trained here on CPU, for benchmarking
weight tuning of a CABS merge: one base and four specialists fine-tuned from it.

    python benchmarks/tune_models.py --out /tmp/tune-bench
    python benchmarks/tune_models.py --out DIR --base-steps 1600 --spec-steps 400 --seed 0 --force
    python benchmarks/tune_models.py --out DIR2 --specialists python,docs --spec-steps 100 --spec-lr 2e-4 \
        --base-from DIR

The last is the second family (issue 23): two fine-tunes instead of four,
whose task vectors are small next to the base (fewer steps, a lower
learning rate), as 7B fine-tunes usually are.  The base is trained on all
four kinds either way; --base-from DIR takes the tokenizer and base of an
earlier run instead of training them again (the text it gathers must be the
same: checked against DIR/data), so the second family costs minutes.

Text of four clearly different kinds is gathered from this machine (sorted file
lists shuffled with a fixed seed, 5 MB per kind; files over 100 KB, with a line
over 2000 characters (minified code, embedded base64) or seen already are skipped):

    python      Python standard library sources (*.py, test dirs skipped)
    c           C headers under /usr/include (*.h)
    javascript  *.js under the global npm install (or any node_modules found)
    docs        markdown (*.md) under node_modules, site-packages, /usr/share/doc

Each kind's files are split, by file, into held-out text (never trained on),
base-training text and specialist-training text.  Written to OUT:

    data/<kind>.txt   held-out text of each kind (~200 KB), for tuning / eval
    data/general.txt  other held-out files of all kinds, mixed (~190 KB)
    base/             LlamaForCausalLM (hidden 192, 4 layers, vocab 4096, 3.3M
                      parameters, float32 safetensors) trained on all four kinds
    python/ c/ javascript/ docs/
                      full fine-tunes of base, each on its own kind
    cabs.yml          mergekit config: cabs merge of the 4 specialists on base
    manifest.json     data sizes, steps, losses (each model on each data/*.txt),
                      wall time per phase

Every model directory holds the byte-level BPE tokenizer trained here, so
AutoTokenizer / AutoModelForCausalLM.from_pretrained(dir) work offline.
With the defaults it takes 17-19 minutes on 2 CPU cores (~0.33 s a step: base
about 9 minutes, each specialist about 2); each specialist ends 0.3-0.5 nats
below the base on its own kind and about 1 nat above it on the others.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

KINDS = ("python", "c", "javascript", "docs")
EOS = "<|endoftext|>"
KIND_CAP = 5_000_000  # bytes of text used per kind
FILE_CAP = 100_000  # larger files are skipped (generated tables, bundles)
LINE_CAP = 2_000  # so are files with a longer line
EVAL_BYTES = 200_000  # held-out text per kind in data/<kind>.txt
GENERAL_BYTES = 36_000  # held-out text per kind in data/general.txt
SEQ, BATCH, EVAL_WINDOWS = 128, 16, 64
# test suites, site-packages inside the stdlib, `encodings` (generated codec tables, in the stdlib
# and in iconv-lite) and `archs` (node's OpenSSL headers, one near-identical copy per platform)
SKIP_DIRS = {"test", "tests", "__pycache__", "idlelib", "encodings", "archs", "site-packages", "dist-packages"}


def node_modules_roots() -> list[Path]:
    npm = shutil.which("npm")
    if npm:
        for parent in Path(npm).resolve().parents:
            if parent.name == "node_modules":
                return [parent]
    roots = [Path(p) for p in ("/usr/lib/node_modules", "/usr/local/lib/node_modules")]
    roots = [p for p in roots if p.is_dir()]
    if not roots:  # any node_modules on disk
        for top in ("/usr", "/opt", "/root", "/home"):
            roots += sorted(Path(top).glob("**/node_modules"))[:1] if Path(top).is_dir() else []
    return roots


def sources() -> dict[str, tuple[list[Path], str]]:
    """Per kind: (directories, glob pattern)."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    nm = node_modules_roots()
    return {
        "python": ([Path(sysconfig.get_paths()["stdlib"])], "*.py"),
        "c": ([Path("/usr/include")], "*.h"),
        "javascript": (nm, "*.js"),
        "docs": (nm + [purelib, Path("/usr/share/doc")], "*.md"),
    }


def collect(kind: str, roots: list[Path], pattern: str) -> list[tuple[str, str]]:
    """Up to KIND_CAP bytes of (path, text), in a fixed pseudo-random order."""
    paths = set()
    for root in roots:
        if root.is_dir():
            paths.update(p for p in root.rglob(pattern)
                         if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
                         and not p.name.endswith(".min.js"))
    paths = sorted(paths)
    random.Random(f"tune-models-{kind}").shuffle(paths)
    files, seen, total = [], set(), 0
    for p in paths:
        try:
            if p.stat().st_size > FILE_CAP:
                continue
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text.strip()) < 200 or max(map(len, text.splitlines())) > LINE_CAP:
            continue  # tiny, or minified / embedded data (e.g. base64 wasm in a .js)
        if text in seen:
            continue  # exact copies would leak across the splits
        seen.add(text)
        files.append((str(p), text))
        total += len(text.encode())
        if total >= KIND_CAP:
            break
    if total < 1_000_000:
        sys.exit(f"error: found only {total} bytes of {kind!r} text ({pattern} under "
                 f"{', '.join(map(str, roots)) or 'no directory found'}); need at least 1 MB")
    return files


def split(files):
    """By file: eval (data/<kind>.txt), general (data/general.txt), then base / spec alternately."""
    parts = {"eval": [], "general": [], "base": [], "spec": []}

    def size(part):
        return sum(len(t.encode()) for _, t in parts[part])

    for i, f in enumerate(files):
        if size("eval") < EVAL_BYTES:
            parts["eval"].append(f)
        elif size("general") < GENERAL_BYTES and len(f[1]) <= GENERAL_BYTES:  # no one big file
            parts["general"].append(f)
        else:
            parts["base" if i % 2 == 0 else "spec"].append(f)
    return parts


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                   pad_token=EOS, unk_token=EOS, model_max_length=256)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts encoded, each followed by the end-of-text token, as one 1-D tensor."""
    ids = []
    for enc in tokenizer._tokenizer.encode_batch(texts):
        ids += enc.ids + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def train(model, streams: list[torch.Tensor], steps: int, lr: float, warmup: int, seed: int, label: str):
    """AdamW with linear warmup and cosine decay to lr/10; each batch row drawn
    from the streams in turn (so a mixture is balanced), at a random offset."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    model.train()
    t0, recent = time.time(), []
    for step in range(1, steps + 1):
        rows = []
        for r in range(BATCH):
            s = streams[r % len(streams)]
            i = int(torch.randint(0, len(s) - SEQ, (1,), generator=gen))
            rows.append(s[i:i + SEQ])
        x = torch.stack(rows)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-50:]
        if step % 100 == 0 or step == steps:
            print(f"  [{label}] step {step}/{steps}  loss {sum(recent) / len(recent):.3f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:.0f}s", flush=True)
    model.eval()
    return sum(recent) / len(recent)


@torch.no_grad()
def eval_loss(model, stream: torch.Tensor) -> float:
    """Mean next-token loss over EVAL_WINDOWS windows of SEQ tokens spread evenly over the text."""
    windows = len(stream) // SEQ
    n = min(EVAL_WINDOWS, windows)
    x = torch.stack([stream[j * SEQ:(j + 1) * SEQ] for j in (i * windows // n for i in range(n))])
    return sum(model(input_ids=x[i:i + 16], labels=x[i:i + 16]).loss.item() * len(x[i:i + 16])
               for i in range(0, n, 16)) / n


LR = {"base": 1e-3, "specialist": 1e-3}  # learning rates


def save(model, tokenizer, path: Path):
    takes = inspect.signature(model.save_pretrained).parameters
    kw = {"safe_serialization": True} if "safe_serialization" in takes else {}
    model.to(torch.float32).save_pretrained(path, **kw)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(path)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--base-steps", type=int, default=1600)
    ap.add_argument("--spec-steps", type=int, default=400)
    ap.add_argument("--spec-lr", type=float, default=LR["specialist"], help="specialists' peak learning rate")
    ap.add_argument("--specialists", default=",".join(KINDS),
                    help=f"comma-separated kinds to fine-tune (and merge), of {', '.join(KINDS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 if another process is busy)")
    ap.add_argument("--force", action="store_true", help="overwrite what an earlier run wrote in --out")
    ap.add_argument("--base-from", type=Path, default=None, metavar="DIR",
                    help="take the tokenizer and base model of an earlier run's --out DIR (same data) instead of "
                         "training them")
    args = ap.parse_args()
    args.specialists = [k.strip() for k in args.specialists.split(",") if k.strip()]
    if not args.specialists or any(k not in KINDS for k in args.specialists):
        ap.error(f"--specialists takes kinds of {', '.join(KINDS)}")
    return args


def clear_out(out: Path, force: bool) -> None:
    """An empty --out, or (with --force) one with what an earlier run wrote removed."""
    if out.exists() and any(out.iterdir()):
        if not force:
            sys.exit(f"error: {out} is not empty (use --force to overwrite)")
        for name in ["data", "base", *KINDS, "cabs.yml", "manifest.json"]:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    (out / "data").mkdir(parents=True, exist_ok=True)


def write_data(out: Path, manifest: dict) -> dict:
    """Collect each kind's text, split it by file, write data/<kind>.txt and data/general.txt."""
    print("collecting text", flush=True)
    parts = {kind: split(collect(kind, roots, pattern)) for kind, (roots, pattern) in sources().items()}
    manifest["data"] = {kind: {"roots": [str(r) for r in sources()[kind][0]], "pattern": sources()[kind][1],
                               **{part: {"files": len(fs), "bytes": sum(len(t.encode()) for _, t in fs)}
                                  for part, fs in p.items()}} for kind, p in parts.items()}
    for kind in KINDS:
        (out / "data" / f"{kind}.txt").write_text("\n\n".join(t for _, t in parts[kind]["eval"]))
    general = [f for kind in KINDS for f in parts[kind]["general"]]
    random.Random("tune-models-general").shuffle(general)
    (out / "data" / "general.txt").write_text("\n\n".join(t for _, t in general))
    for kind, p in manifest["data"].items():
        print(f"  {kind:11s} " + "  ".join(f"{k} {v['files']} files {v['bytes'] / 1e6:.2f} MB"
                                           for k, v in p.items() if isinstance(v, dict)), flush=True)
    return parts


def write_config(out: Path, kinds) -> None:
    (out / "cabs.yml").write_text(
        f"# CABS merge of the {len(kinds)} specialists made by benchmarks/tune_models.py\n"
        "merge_method: cabs\n"
        f"base_model: {out / 'base'}\n"
        "models:\n" + "".join(
            f"  - model: {out / kind}\n    parameters:\n      weight: 1.0\n      density: 0.25\n" for kind in kinds)
        + "parameters:\n  block_size: 256\n  lambda: 1.0\ndtype: float32\n")


def train_family(out: Path, args, tokenizer, streams: dict, manifest: dict, phases: dict) -> tuple[dict, dict]:
    """Train the base on every kind, then each specialist from it; save each.
    Returns (final training loss, loss on every data file) per model."""
    config = LlamaConfig(vocab_size=4096, hidden_size=192, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=512, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    t = time.time()
    if args.base_from:
        base = LlamaForCausalLM.from_pretrained(args.base_from / "base", dtype=torch.float32).eval()
        final = {"base": json.loads((args.base_from / "manifest.json").read_text())["final_train_loss"]["base"]}
        print(f"base model from {args.base_from / 'base'}", flush=True)
    else:
        base = LlamaForCausalLM(config)
        print(f"training base ({sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters)", flush=True)
        final = {"base": train(base, streams["base"], args.base_steps, LR["base"], 100, args.seed, "base")}
    manifest["model"] = {"parameters": sum(p.numel() for p in base.parameters()), "hidden": 192,
                         "layers": 4, "heads": 4, "intermediate": 512, "vocab": 4096}
    save(base, tokenizer, out / "base")
    phases["base"], t = time.time() - t, time.time()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    losses = {"base": {name: eval_loss(base, s) for name, s in streams["eval"].items()}}
    for i, kind in enumerate(args.specialists):
        print(f"fine-tuning {kind}", flush=True)
        model = LlamaForCausalLM(config)
        model.load_state_dict(base_state)
        final[kind] = train(model, [streams["spec"][kind]], args.spec_steps, args.spec_lr, 20, args.seed + 1 + i,
                            kind)
        save(model, tokenizer, out / kind)
        losses[kind] = {name: eval_loss(model, s) for name, s in streams["eval"].items()}
        phases[kind], t = time.time() - t, time.time()
    return final, losses


def same_data(out: Path, earlier: Path) -> None:
    """The text gathered now is the text `earlier`'s base was trained beside (its held-out files match)."""
    for name in ["general", *KINDS]:
        if (out / "data" / f"{name}.txt").read_bytes() != (earlier / "data" / f"{name}.txt").read_bytes():
            sys.exit(f"error: data/{name}.txt differs from {earlier}'s: --base-from needs the same text on "
                     "this machine")


def main():
    args = parse_args()
    out = args.out.resolve()
    clear_out(out, args.force)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    phases, t = {}, time.time()
    manifest = {"kinds": list(KINDS), "seed": args.seed, "threads": args.threads, "seq_len": SEQ, "batch": BATCH}
    parts = write_data(out, manifest)
    phases["data"], t = time.time() - t, time.time()

    if args.base_from:
        same_data(out, args.base_from)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(args.base_from / "base")
    else:
        print("training tokenizer", flush=True)
        tokenizer = train_tokenizer([txt for kind in KINDS for _, txt in parts[kind]["base"]])
    evals = ["general", *KINDS]
    streams = {"base": [token_stream(tokenizer, [x for _, x in parts[k]["base"]]) for k in KINDS],
               "spec": {k: token_stream(tokenizer, [x for _, x in parts[k]["spec"]]) for k in KINDS},
               "eval": {name: token_stream(tokenizer, [(out / "data" / f"{name}.txt").read_text()]) for name in evals}}
    manifest["tokens"] = {k: {"base": len(streams["base"][i]), "spec": len(streams["spec"][k]),
                              "eval": len(streams["eval"][k])} for i, k in enumerate(KINDS)}
    phases["tokenizer"] = time.time() - t

    final, losses = train_family(out, args, tokenizer, streams, manifest, phases)
    write_config(out, args.specialists)
    manifest.update(
        base_from=str(args.base_from.resolve()) if args.base_from else None,
        steps={"base": None if args.base_from else args.base_steps, "specialist": args.spec_steps},
        lr={**LR, "specialist": args.spec_lr},
        specialists=args.specialists, final_train_loss=final,
        eval_loss={m: {k: round(v, 4) for k, v in by_set.items()} for m, by_set in losses.items()},
        eval_windows=EVAL_WINDOWS,
        model_bytes={m: sum(f.stat().st_size for f in (out / m).glob("*.safetensors"))
                     for m in ["base", *args.specialists]},
        wall_s={k: round(v, 1) for k, v in phases.items()} | {"total": round(sum(phases.values()), 1)},
    )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"\nmean next-token loss on data/*.txt ({EVAL_WINDOWS} windows of {SEQ} tokens spread over each)")
    print(f"{'model':11s}" + "".join(f"{name:>12s}" for name in evals))
    for m, by_set in losses.items():
        print(f"{m:11s}" + "".join(f"{by_set[name]:12.3f}" for name in evals))
    print(f"\nwrote {out} in {sum(phases.values()) / 60:.1f} min: " +
          ", ".join(f"{k} {v:.0f}s" for k, v in phases.items()))


if __name__ == "__main__":
    main()
