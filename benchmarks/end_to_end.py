"""End to end: `mergekit-yaml` with task_arithmetic, ties, dare_ties, della and
cabs on the same Llama-shaped models, in one run.

    python benchmarks/end_to_end.py                      # make models, run all methods
    python benchmarks/end_to_end.py --repeats 3 --methods task_arithmetic cabs
    python benchmarks/end_to_end.py --models-dir DIR     # reuse (or keep) models there
    python benchmarks/end_to_end.py --base B --fine-tune F1 --fine-tune F2 ...  # your own

Each merge runs as its own `mergekit-yaml CONFIG OUT --no-copy-tokenizer`
process (plus any `--mergekit-arg`, e.g. `--cuda`): mergekit-yaml's own entry
point, called in a Python process that imports mergekit_cabs first (so cabs
is registered also where the package is only on PYTHONPATH) and, when the
merge used CUDA, writes `torch.cuda.max_memory_allocated()` at exit (the GPU
peak).  A small wrapper process measures it: wall
time, the peak resident memory (RSS) of the merge process, and the peak of
its anonymous memory (Linux's RssAnon, sampled every 20 ms).  RSS counts the
pages of the memory-mapped model files a merge has read, which the page cache
can give back under pressure; anonymous memory cannot be given back.  The
cost per billion parameters of one model (wall seconds, RSS bytes per
parameter) is printed too.  Runs are
interleaved (every method once, then again), the model files are read once
before the first run so every method finds them in the page cache, and each
figure is the median over the repeats.  Results go to the terminal as a table
and, with --json, to a file.

Models made here: a bfloat16 base with random weights in the shape of a small
Llama (hidden 2048, 12 layers, grouped KV heads, vocabulary 32000: 672M
parameters; --layers and --hidden change it) and fine-tunes = base + random
deltas of about 5% of the weights' scale, written as safetensors with a
config.json, like a transformers checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("task_arithmetic", "ties", "dare_ties", "della", "cabs")


def llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a LlamaForCausalLM of `config`."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    return shapes


def make_models(root: Path, fine_tunes: int, layers: int, hidden: int, seed: int, vocab: int = 32000) -> list:
    """Write a base and `fine_tunes` fine-tunes under `root` (reused when present)."""
    import torch
    from safetensors.torch import save_file

    inter = hidden * 11 // 4
    inter -= inter % 256
    heads, kv_heads = max(1, hidden // 128), max(1, hidden // 512)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    shapes = llama_shapes(config)
    names = ["base"] + [f"fine_tune_{i + 1}" for i in range(fine_tunes)]
    dirs = [root / name for name in names]
    tag = json.dumps([config, seed])
    def ready(d: Path) -> bool:
        return (d / "model.safetensors").exists() and (d / "made.json").exists() \
            and (d / "made.json").read_text() == tag

    if all(ready(d) for d in dirs):
        return dirs
    total = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"making {len(dirs)} models of {total / 1e6:.0f}M parameters in {root} ...", file=sys.stderr)
    for index, directory in enumerate(dirs):
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for t, (name, shape) in enumerate(sorted(shapes.items())):
            g = torch.Generator().manual_seed(seed * 1000 + t)
            base = torch.randn(shape, generator=g) * 0.02
            if name.endswith("norm.weight"):
                base = base + 1.0
            if index:
                g.manual_seed(seed * 1000 + t + 7919 * index)
                base = base + torch.randn(shape, generator=g) * 1e-3
            tensors[name] = base.to(torch.bfloat16)
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(config, indent=1))
        (directory / "made.json").write_text(tag)
        del tensors
    return dirs


def config_for(method: str, base: Path, fine_tunes: list) -> str:
    params = {
        "task_arithmetic": {"weight": 1.0},
        "ties": {"weight": 1.0, "density": 0.25},
        "dare_ties": {"weight": 1.0, "density": 0.25},
        "della": {"weight": 1.0, "density": 0.25, "epsilon": 0.1},
        "cabs": {"weight": 1.0, "density": 0.25},
    }[method]
    lines = [f"merge_method: {method}", f"base_model: {base}", "dtype: bfloat16"]
    if method == "cabs":
        lines += ["parameters:", "  block_size: 256"]
    lines.append("models:")
    for path in fine_tunes:
        lines.append(f"  - model: {path}")
        lines.append("    parameters:")
        lines += [f"      {k}: {v}" for k, v in params.items()]
    return "\n".join(lines) + "\n"


def parameter_count(model: Path) -> int:
    """Parameters of one model, from its safetensors headers (no tensor read)."""
    from safetensors import safe_open

    total = 0
    for shard in Path(model).glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                shape = handle.get_slice(name).get_shape()
                count = 1
                for size in shape:
                    count *= size
                total += count
    return total


def measure(arguments: list, peak_file: Path) -> dict:
    """Run mergekit-yaml `arguments` (see `mergekit_child`) in a wrapper process
    that reports its wall time and peak RSS; add the GPU peak (None: no CUDA used)."""
    command = [sys.executable, __file__, "--mergekit-child", str(peak_file), *arguments]
    wrapper = [sys.executable, __file__, "--measure-child", "--", *command]
    peak_file.unlink(missing_ok=True)
    done = subprocess.run(wrapper, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"failed: mergekit-yaml {' '.join(arguments)}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(json.loads(peak_file.read_text()))
    return result


def mergekit_child(peak_file: str, arguments: list) -> None:
    """mergekit-yaml `arguments` in this process, cabs registered first; at
    exit, write {"gpu_peak_bytes": torch.cuda.max_memory_allocated(), "gpu":
    the device's name} to `peak_file` (both None where CUDA was not used)."""
    import atexit

    import torch
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    import mergekit_cabs  # noqa: F401  registers cabs (the .pth hook may not run here)

    def write_peak() -> None:
        used = torch.cuda.is_initialized()
        Path(peak_file).write_text(json.dumps({"gpu_peak_bytes": torch.cuda.max_memory_allocated() if used else None,
                                               "gpu": torch.cuda.get_device_name() if used else None}))

    atexit.register(write_peak)
    mergekit_yaml(arguments, prog_name="mergekit-yaml")


def anonymous_kib(pid: int) -> int:
    """The process's resident memory that is not file-backed (Linux: RssAnon), in KiB; 0 elsewhere."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure_child(command: list) -> None:
    """Run `command`; print its wall time, its peak RSS, and the peak of its
    anonymous memory (sampled every 20 ms): the part of RSS that the page
    cache cannot give back, unlike the pages of memory-mapped model files."""
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as errors:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, text=True)
        peak_anon = 0
        while child.poll() is None:
            peak_anon = max(peak_anon, anonymous_kib(child.pid))
            time.sleep(0.02)
        wall = time.perf_counter() - start
        if child.returncode:
            errors.seek(0)
            sys.stderr.write(errors.read())
            sys.exit(child.returncode)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"wall_s": wall, "peak_rss_gb": peak_kib * 1024 / 1e9, "peak_anon_gb": peak_anon * 1024 / 1e9}))


def report(results: dict, params: int) -> dict:
    """Print the medians, the ratios to task_arithmetic, and the cost per
    billion parameters of one model (wall s, and peak RSS in bytes per
    parameter); return the medians."""
    ref = "task_arithmetic" if "task_arithmetic" in results else None
    summary = {}
    for method, runs in results.items():
        wall = statistics.median(r["wall_s"] for r in runs)
        rss = statistics.median(r["peak_rss_gb"] for r in runs)
        anon = statistics.median(r.get("peak_anon_gb", 0.0) for r in runs)
        gpu = [r["gpu_peak_bytes"] for r in runs if r.get("gpu_peak_bytes") is not None]
        summary[method] = {"wall_s": wall, "peak_rss_gb": rss, "peak_anon_gb": anon, "runs": runs,
                           "gpu_peak_gb": statistics.median(gpu) / 1e9 if gpu else None,
                           "wall_s_per_b": wall / (params / 1e9), "rss_bytes_per_param": rss * 1e9 / params}
    print(f"{'method':16s} {'wall s':>8s} {'peak RSS GB':>12s} {'anon GB':>8s} {'s / B':>7s} {'RSS B/param':>12s}"
          f" {'wall / TA':>10s} {'RSS / TA':>9s} {'GPU peak GB':>12s}")
    for method, row in summary.items():
        ratio = ""
        if ref:
            wall_ratio = row["wall_s"] / summary[ref]["wall_s"]
            rss_ratio = row["peak_rss_gb"] / summary[ref]["peak_rss_gb"]
            ratio = f"{wall_ratio:10.2f} {rss_ratio:9.2f}"
        print(f"{method:16s} {row['wall_s']:8.1f} {row['peak_rss_gb']:12.2f} {row['peak_anon_gb']:8.2f}"
              f" {row['wall_s_per_b']:7.1f}"
              f" {row['rss_bytes_per_param']:12.2f} {ratio}"
              + ("" if row["gpu_peak_gb"] is None else f" {row['gpu_peak_gb']:12.2f}"))
    return summary


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure-child":
        return measure_child(sys.argv[3:])
    if len(sys.argv) > 1 and sys.argv[1] == "--mergekit-child":
        return mergekit_child(sys.argv[2], sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to run")
    ap.add_argument("--repeats", type=int, default=1, help="runs per method, interleaved (median)")
    ap.add_argument("--fine-tunes", type=int, default=3, help="fine-tunes to make")
    ap.add_argument("--layers", type=int, default=12, help="layers of the models made")
    ap.add_argument("--hidden", type=int, default=2048, help="hidden size of the models made")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary of the models made")
    ap.add_argument("--seed", type=int, default=0, help="seed of the models made")
    ap.add_argument("--models-dir", type=Path, help="where to make (or find) the models")
    ap.add_argument("--base", type=Path, help="use this base model instead of making one")
    ap.add_argument("--fine-tune", type=Path, action="append", default=[], help="repeatable")
    ap.add_argument("--mergekit-arg", action="append", default=[],
                    help="extra argument for mergekit-yaml, e.g. --mergekit-arg=--cuda")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cabs-bench-"))
    if args.base:
        base, fine_tunes = args.base, args.fine_tune
    else:
        base, *fine_tunes = make_models(args.models_dir or work / "models", args.fine_tunes,
                                        args.layers, args.hidden, args.seed, args.vocab)
    for path in [base, *fine_tunes]:  # into the page cache, for every method alike
        for f in Path(path).glob("*.safetensors"):
            with open(f, "rb") as handle:
                while handle.read(1 << 24):
                    pass
    results = {m: [] for m in args.methods}
    for rep in range(args.repeats):
        for method in args.methods:
            cfg = work / f"{method}.yml"
            cfg.write_text(config_for(method, base, fine_tunes))
            out = work / f"out-{method}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            r = measure([str(cfg), str(out), "--no-copy-tokenizer", *args.mergekit_arg], work / "gpu-peak.json")
            results[method].append(r)
            print(f"  run {rep + 1}: {method:16s} {r['wall_s']:7.1f} s  {r['peak_rss_gb']:5.2f} GB"
                  f" (anonymous {r['peak_anon_gb']:5.2f} GB)",
                  file=sys.stderr, flush=True)
            subprocess.run(["rm", "-rf", str(out)], check=True)

    import torch  # only for the report

    params = parameter_count(base)
    print(f"\n{len(fine_tunes)} fine-tunes of {params / 1e9:.3f}B parameters, bf16, density 0.25, "
          f"cabs block 256; mergekit-yaml {' '.join(args.mergekit_arg) or '(no options)'}; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs; median of {args.repeats}")
    summary = report(results, params)
    if args.json:
        gpu = next((r["gpu"] for runs in results.values() for r in runs if r.get("gpu")), None)
        args.json.write_text(json.dumps({"fine_tunes": len(fine_tunes), "parameters": params, "gpu": gpu,
                                         "mergekit_args": args.mergekit_arg, "results": summary}, indent=1))
    shutil.rmtree(work)  # configs, and the models unless --models-dir kept them elsewhere


if __name__ == "__main__":
    main()
