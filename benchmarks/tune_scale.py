"""What `mergekit-cabs tune` costs on bigger models: peak memory per merged
parameter, phase by phase, and the seconds per weight setting and per
evaluation.

For each shape it writes a random Llama base (bfloat16) and three fine-tunes
(base + small random task vectors; densities 0.25 of blocks of 256, so the
kept places are disjoint) with a word-level tokenizer and random-word data
files, once, in its own process.  Then every measured run is one more
process that only imports the package and runs `tune` (`--objective loss`:
random data has no meaningful normalized gain), so building the models does
not count.  In that process a thread samples the resident set (VmRSS) every
20 ms and files each sample under the phase running (`tune.live.timed`'s
keys: reference_s, masks_s, search_s, final_s); on CUDA the peak of
`torch.cuda.max_memory_allocated()` is read per phase as well.

Bytes per parameter are (peak - resident set after the imports and the
data) / merged parameters.  The tune run reports the mean seconds per
weight setting (every place rewritten) and per evaluation; `--settings`
adds a process per shape that times full rewrites against the incremental
path (only the moved model's places), which `tune` leaves off.

`--optimizer gradient` runs tune's gradient search instead (lambda line,
then `--budget` Adam steps of `--minibatch` items per data set): each step
(`gradient.objective_gradient`: setting the weights, forward and backward
with every merged weight's gradient reduced and freed) and each validation
is timed and is a memory phase of its own (step_s, validate_s), so its peak
stands against the evaluations' (eval_s) in the same process.
`--no-checkpoint` turns off the decoder layers' checkpointing the wiring
always uses; `--line-evaluations` caps the lambda line (tune's is 10) to
save time.  `--steps-only` times `--budget` steps alone (the store, one
evaluation of every fit item, the steps: no references, no line).

    python benchmarks/tune_scale.py --shapes 220m --optimizer gradient --budget 3 --max-windows 12 \
        --baselines none --line-evaluations 2
    python benchmarks/tune_scale.py --shapes 220m --optimizer gradient --steps-only [--no-checkpoint] \
        --budget 2 --max-windows 12

    python benchmarks/tune_scale.py --work /tmp/tune-scale --shapes 220m,1b --out benchmarks/results/tune_scale.json
    python benchmarks/tune_scale.py --work /tmp/tune-scale --shapes 1b --cuda      # on a GPU machine
    python benchmarks/tune_scale.py --work /tmp/tune-scale --shapes 1b --cuda --store-on-device --check-exact

With --cuda the models are drawn on the GPU (other random numbers, the same
distributions; `--build-only` stops there).  `--check-exact` merges the
tuned configuration with mergekit afterwards (on the GPU with --cuda, as
`mergekit-yaml tuned.yml --cuda` does), scores every fit and held-out window
with the written model and counts those that equal tune's report for the
chosen point; any difference exits 1 after the results line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

SHAPES = {  # name: (hidden, layers, vocab); intermediate 2.75 x hidden, untied embeddings
    "tiny": (64, 2, 512),  # the CPU dry run of benchmarks/gpu/run.sh
    "220m": (1024, 12, 32000),
    "1b": (2048, 16, 32000),
}


def build(work: Path, hidden: int, layers: int, vocab: int = 32000, device: str = "cpu") -> Path:
    """The family, drawn on `device` (a GPU draws other numbers than the CPU, from
    the same distributions, in a fraction of the time), written to `work`."""
    import torch
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
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    names = ["base", "ft1", "ft2", "ft3"]
    for i, name in enumerate(names):
        if i:
            gen = torch.Generator(device=device).manual_seed(i)
            with torch.no_grad():
                for key, param in model.state_dict().items():
                    noise = torch.randn(param.shape, generator=gen, device=device) * 0.002
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


def resident() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class PhaseMemory:
    """Peak VmRSS (and, on CUDA, peak allocated device memory) per phase of `run_tune`."""

    def __init__(self, cuda: bool):
        self.cuda, self.phase = cuda, "setup"
        self.rss: dict[str, int] = {}
        self.device: dict[str, int] = {}
        threading.Thread(target=self.sample, daemon=True).start()

    def sample(self) -> None:
        while True:
            self.rss[self.phase] = max(self.rss.get(self.phase, 0), resident()["VmRSS"])
            time.sleep(0.02)

    def watch(self, modules) -> None:
        """Wrap `timed` (`tune.live.timed`) in each of `modules` that uses it, so
        that every timed phase is a memory phase too."""
        import torch

        from mergekit_cabs.tune.live import timed

        @contextlib.contextmanager
        def phased(clock, key):
            self.phase = key
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            with timed(clock, key):
                yield
            if self.cuda:
                self.device[key] = torch.cuda.max_memory_allocated()
            self.rss[key] = max(self.rss.get(key, 0), resident()["VmRSS"])
            self.phase = "between"

        for module in modules:
            module.timed = phased
        self.phased = phased

    def watch_gradient(self, checkpoint: bool) -> dict:
        """Time each gradient step and validation of the gradient search as
        phases of their own (step_s, validate_s), the step's checkpointing
        forced to `checkpoint`; returns the dict the timings and the tap's
        statistics go into."""
        from mergekit_cabs.tune import gradsearch

        taken: dict = {"step_s": [], "validate_s": [], "peak_grad_bytes": 0, "items_per_step": []}
        gradient, value = gradsearch.objective_gradient, gradsearch.objective_value

        def step(live, objective, x, picks=None, **kwargs):
            clock, stats = {}, {}
            with self.phased(clock, "step_s"):
                out = gradient(live, objective, x, picks, **{**kwargs, "checkpoint": checkpoint, "stats": stats})
            taken["step_s"].append(clock["step_s"])
            taken["peak_grad_bytes"] = max(taken["peak_grad_bytes"], stats["peak_grad_bytes"])
            taken["items_per_step"].append(sum(len(v) for v in (picks or {}).values()))
            return out

        def validate(*args, **kwargs):
            clock = {}
            with self.phased(clock, "validate_s"):
                out = value(*args, **kwargs)
            taken["validate_s"].append(clock["validate_s"])
            return out

        gradsearch.objective_gradient, gradsearch.objective_value = step, validate
        return taken


def measure(args) -> dict:
    """One tune run in this process (see the module doc)."""
    memory = PhaseMemory(args.cuda)
    import os

    import torch
    from llvmlite import binding

    load_before = os.getloadavg()

    from mergekit_cabs import tune as tn
    from mergekit_cabs.tune import baselines, live, run, settings

    work = args.work
    prep = tn.prepare(work / "cabs.yml", [f"ft{i}={work / f'ft{i}.txt'}" for i in (1, 2, 3)], window=args.window,
                      max_windows=args.max_windows, budget=args.budget)
    fixed = resident()["VmRSS"]  # imports, tokenizer, data
    memory.watch([run, settings, baselines, live])
    gradient = args.optimizer == "gradient"
    taken = memory.watch_gradient(not args.no_checkpoint) if gradient else None
    if args.line_evaluations:
        live.DEFAULTS["line_evaluations"] = args.line_evaluations
    chosen = {"optimizer": args.optimizer, "minibatch": args.minibatch} if args.optimizer else {}
    report = tn.run_tune(prep, device="cuda" if args.cuda else "cpu", objective="loss", budget=args.budget,
                         batch_size=args.batch_size, score_dtype=args.score_dtype,
                         store_on_device=args.store_on_device, quiet=True, baselines=args.baselines, **chosen)
    peak = resident()["VmHWM"]
    places = report["supports"]["places"]
    out = {
        "shape": args.shape, "device": report["device"], "score_dtype": report["score_dtype"],
        "store_on_device": args.store_on_device, "merged_parameters": places,
        "store_bytes_per_parameter": report["memory"]["store_bytes_per_place"],
        "model_bytes_per_parameter": report["memory"]["model_bytes"] / places,
        "fixed_rss_bytes": fixed, "peak_rss_bytes": peak,
        "peak_rss_bytes_per_parameter": (peak - fixed) / places,
        "peak_rss_by_phase_per_parameter": {k: round((v - fixed) / places, 2) for k, v in memory.rss.items()},
        "set_weights_mean_s": report["time"]["set_weights_mean_s"],
        "evaluate_mean_s": report["time"]["evaluate_mean_s"],
        "tokens_per_evaluation": sum(len(t.fit) * t.fit.shape[1] for t in prep.tasks),
        "phase_s": {k: round(v, 1) for k, v in report["time"].items() if not k.endswith("mean_s")},
        "evaluations": report["search"]["evaluations"], "torch_threads": torch.get_num_threads(),
        "cpu": binding.get_host_cpu_name(), "load_average_before_after": [round(load_before[0], 2),
                                                                           round(os.getloadavg()[0], 2)],
        "baselines": [r["name"] for r in report.get("baselines", {}).get("runs", [])],
        "baseline_store_bytes_per_parameter": {r["name"]: r["store_bytes"] / places
                                               for r in report.get("baselines", {}).get("runs", [])},
    }
    if gradient:
        out["gradient"] = gradient_row(args, report, taken, out)
    if args.cuda:
        out["peak_device_bytes_by_phase_per_parameter"] = {k: round(v / places, 2) for k, v in memory.device.items()}
        out["peak_device_bytes_per_parameter"] = max(memory.device.values()) / places
        out["gpu"] = torch.cuda.get_device_name()
    if args.check_exact:
        out["tuned_merge"] = check_exact(args, prep, report)
    return out


def gradient_row(args, report: dict, taken: dict, out: dict) -> dict:
    """The gradient search's seconds per step against per evaluation, and its
    peak bytes per merged parameter against the evaluations' (same accounting)."""
    steps = taken["step_s"]
    by_phase = out["peak_rss_by_phase_per_parameter"]
    evaluation = out["set_weights_mean_s"] + out["evaluate_mean_s"]
    return {
        "checkpoint": not args.no_checkpoint, "minibatch": args.minibatch, "steps": len(steps),
        "items_per_step": taken["items_per_step"], "step_s": [round(t, 2) for t in steps],
        "step_mean_s": sum(steps) / len(steps), "steps_after_first_mean_s": sum(steps[1:]) / max(1, len(steps) - 1),
        "validate_s": [round(t, 2) for t in taken["validate_s"]],
        "set_and_evaluate_mean_s": evaluation, "step_over_evaluation": sum(steps) / len(steps) / evaluation,
        "step_over_evaluation_per_item": (sum(steps) / len(steps) / (sum(taken["items_per_step"]) / len(steps)))
                                         / (evaluation / (out["tokens_per_evaluation"] / args.window)),
        "peak_grad_bytes": taken["peak_grad_bytes"],
        "step_peak_rss_bytes_per_parameter": by_phase.get("step_s"),
        "eval_peak_rss_bytes_per_parameter": by_phase.get("eval_s"),
        "step_minus_eval_bytes_per_parameter": round(by_phase.get("step_s", 0) - by_phase.get("eval_s", 0), 2),
        "line_evaluations_cap": args.line_evaluations, "cost": report["search"].get("gradient"),
    }


def check_exact(args, prep, report: dict) -> dict:
    """mergekit's merge of the tuned configuration (on the GPU with --cuda,
    as `mergekit-yaml tuned.yml --cuda` does), loaded in the scoring dtype on
    tune's device, scored window by window: how many of the per-window losses
    equal those tune reported for the chosen point (all of them, or tune's
    scores are not the written model's)."""
    import torch
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_cabs import tune as tn
    from mergekit_cabs.tune import references

    device = report["device"]
    out = args.work / "tuned-merge"
    shutil.rmtree(out, ignore_errors=True)  # a merge of an earlier run
    started = time.perf_counter()
    run_merge(MergeConfiguration.model_validate(report["tuned_config"]), str(out),
              MergeOptions(quiet=True, copy_tokenizer=False, cuda=device.startswith("cuda")))
    merge_s = time.perf_counter() - started
    model = references.load_model(str(out), device, getattr(torch, report["score_dtype"]))
    windows = equal = 0
    for task in prep.tasks:
        for split in tn.SPLITS:
            got = tn.window_losses(model, getattr(task, split), args.batch_size).tolist()
            want = report["best"][split]["window_losses"][task.name]
            windows += len(want)
            equal += sum(a == b for a, b in zip(got, want)) if len(got) == len(want) else 0
    return {"merge_s": round(merge_s, 1), "windows": windows, "windows_equal": equal, "exact": equal == windows}


def measure_settings(args) -> dict:
    """Seconds to set a weight vector, in a process of its own: every place
    rewritten (lambda moved, or one weight with `incremental` off) against only
    the moved model's places (`incremental`)."""
    import torch

    from mergekit_cabs import tune as tn
    from mergekit_cabs.tune import live, references

    work = args.work
    prep = tn.prepare(work / "cabs.yml", [f"ft{i}={work / f'ft{i}.txt'}" for i in (1, 2, 3)], window=args.window,
                      max_windows=args.max_windows, budget=args.budget)
    device = "cuda" if args.cuda else "cpu"
    s = live.Settings(device=device, store_device=device if args.store_on_device else "cpu",
                     score_dtype=references.scoring_dtype(prep.config, args.score_dtype), objective="loss",
                     general_weight=1.0, budget=args.budget, weight_bounds=(0.0, 2.0), lambda_bounds=(0.25, 2.0),
                     tolerance=0.05, batch_size=args.batch_size, quiet=True)
    model = references.load_model(str(prep.config.base_model.model.path), device, s.score_dtype)
    store = live.bind_store(prep, model, s)

    def timed_apply(weights, lam, incremental):
        store.incremental = incremental
        started = time.perf_counter()
        store.apply([weights], lam)
        if args.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    timed_apply((1.0, 1.0, 1.0), 1.0, False)
    full = [timed_apply((1.0, 1.0, 1.0), lam, False) for lam in (0.75, 1.25)]
    full += [timed_apply((1.0, w, 1.0), 1.25, False) for w in (0.5, 1.5)]
    incremental = [timed_apply((w, 1.5, 1.0), 1.25, True) for w in (0.5, 1.5)]
    return {"shape": args.shape, "device": device, "store_on_device": args.store_on_device,
            "set_full_s": [round(t, 3) for t in full], "set_incremental_s": [round(t, 3) for t in incremental]}


def measure_steps(args) -> dict:
    """Gradient steps alone, in a process of its own (no references, no lambda
    line, no final scoring): the store and the live model at the
    configuration's point, one evaluation of every fit item, then `--budget`
    steps of `--minibatch` items per data set (the first ones not held back),
    with the decoder layers checkpointed unless `--no-checkpoint`; each a
    memory phase (eval_s, step_s), the same accounting as `measure`."""
    import os

    import torch
    from llvmlite import binding

    from mergekit_cabs import tune as tn
    from mergekit_cabs.tune import gradient, gradsearch, live, references
    from mergekit_cabs.tune.objective import Objective

    memory, load_before = PhaseMemory(False), os.getloadavg()
    memory.watch([live])
    work = args.work
    prep = tn.prepare(work / "cabs.yml", [f"ft{i}={work / f'ft{i}.txt'}" for i in (1, 2, 3)], window=args.window,
                      max_windows=args.max_windows, budget=args.budget)
    fixed = resident()["VmRSS"]
    dtype = references.scoring_dtype(prep.config, args.score_dtype)
    s = live.Settings(device="cpu", store_device="cpu", score_dtype=dtype, objective="loss", general_weight=1.0,
                      budget=args.budget, weight_bounds=(0.0, 2.0), lambda_bounds=(0.25, 2.0),
                      tolerance=0.05, batch_size=args.batch_size, quiet=True)
    model = references.load_model(str(prep.config.base_model.model.path), "cpu", s.score_dtype)
    clock: dict[str, float] = {}
    with memory.phased(clock, "masks_s"):
        state = live.Live(model, live.bind_store(prep, model, s), prep.tasks, s.batch_size, prep.groups,
                          len(prep.labels))
    objective = Objective("loss", [t.name for t in prep.tasks], {}, {})
    x = (prep.start_lambda, *prep.start_weights)
    with memory.phased(clock, "eval_s"):
        state.set(x)
        objective.score(live.means(state.losses("fit")))
    train, _ = gradsearch.split_fit(prep.tasks)
    picks = {name: pool[:args.minibatch] for name, pool in train.items()}
    steps, stats = [], {}
    for _ in range(args.budget):
        with memory.phased(clock, "step_s"):
            gradient.objective_gradient(state, objective, x, picks, checkpoint=not args.no_checkpoint, stats=stats)
        steps.append(clock.pop("step_s"))
    places = state.store.places()
    by_phase = {k: round((v - fixed) / places, 2) for k, v in memory.rss.items()}
    return {"shape": args.shape, "mode": "steps", "device": "cpu", "merged_parameters": places,
            "checkpoint": not args.no_checkpoint, "batch_size": args.batch_size, "window": args.window,
            "items_per_step": sum(len(v) for v in picks.values()), "fixed_rss_bytes": fixed,
            "peak_rss_by_phase_per_parameter": by_phase, "eval_s": round(clock["eval_s"], 1),
            "step_s": [round(t, 1) for t in steps], "peak_grad_bytes": stats.get("peak_grad_bytes"),
            "step_minus_eval_bytes_per_parameter": round(by_phase["step_s"] - by_phase["eval_s"], 2),
            "torch_threads": torch.get_num_threads(), "cpu": binding.get_host_cpu_name(),
            "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tune-scale"))
    parser.add_argument("--shapes", default="220m", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--budget", type=int, default=4)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--score-dtype", default="merge", choices=["merge", "float32"])
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--baselines", default=None,
                        help="tune's --baselines (default: task arithmetic tuned the same way when it fits in memory; "
                             "task_arithmetic_tuned: always; none: no baseline)")
    parser.add_argument("--store-on-device", action="store_true")
    parser.add_argument("--check-exact", action="store_true",
                        help="merge the tuned configuration with mergekit (on the GPU with --cuda) and check that "
                             "every window scores exactly what tune reported; exit 1 if not")
    parser.add_argument("--build-only", action="store_true", help="build the shapes' models and data, and stop")
    parser.add_argument("--optimizer", default=None, help="tune's --optimizer (default: tune's, auto)")
    parser.add_argument("--minibatch", type=int, default=8, help="the gradient search's items per data set per step")
    parser.add_argument("--no-checkpoint", action="store_true",
                        help="the gradient search without the decoder layers' checkpointing (tune always uses it)")
    parser.add_argument("--line-evaluations", type=int, default=None,
                        help="the gradient search's lambda line: at most this many evaluations (tune's: 10)")
    parser.add_argument("--out", type=Path, default=None, help="append the results (JSON lines) to this file")
    parser.add_argument("--settings", action="store_true",
                        help="also time full against incremental weight settings (one more process per shape)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: one run, this shape
    parser.add_argument("--measure-settings", default=None, help=argparse.SUPPRESS)  # internal
    parser.add_argument("--steps-only", action="store_true",
                        help="time --budget gradient steps alone (measure_steps), not a tune run")
    parser.add_argument("--measure-steps", default=None, help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.measure or args.measure_settings or args.measure_steps:
        args.shape = args.measure or args.measure_settings or args.measure_steps
        args.work = args.work / args.shape
        result = (measure(args) if args.measure else measure_settings(args) if args.measure_settings
                  else measure_steps(args))
        print(json.dumps(result), flush=True)
        if not result.get("tuned_merge", {"exact": True})["exact"]:
            sys.exit(f"tune_scale: the merge of the tuned configuration scores {result['tuned_merge']['windows_equal']}"
                     f" of {result['tuned_merge']['windows']} windows as tune reported; all must match")
        return
    for shape in args.shapes.split(","):
        work = args.work / shape
        if not (work / "cabs.yml").exists():
            work.mkdir(parents=True, exist_ok=True)
            hidden, layers, vocab = SHAPES[shape]
            device = "cuda" if args.cuda else "cpu"
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                            f"import tune_scale as t; from pathlib import Path; "
                            f"t.build(Path({str(work)!r}), {hidden}, {layers}, {vocab}, {device!r})"], check=True)
        if args.build_only:
            continue
        argv = ["--work", str(args.work), "--budget", str(args.budget), "--max-windows", str(args.max_windows),
                "--window", str(args.window), "--batch-size", str(args.batch_size), "--score-dtype", args.score_dtype,
                *(["--cuda"] if args.cuda else []), *(["--store-on-device"] if args.store_on_device else []),
                *(["--check-exact"] if args.check_exact else []),
                *(["--baselines", args.baselines] if args.baselines else []),
                *(["--optimizer", args.optimizer, "--minibatch", str(args.minibatch)] if args.optimizer else []),
                *(["--no-checkpoint"] if args.no_checkpoint else []),
                *(["--line-evaluations", str(args.line_evaluations)] if args.line_evaluations else [])]
        flags = ["--measure-steps"] if args.steps_only else ["--measure"]
        for flag in flags + (["--measure-settings"] if args.settings else []):
            done = subprocess.run([sys.executable, __file__, *argv, flag, shape], check=True,
                                  stdout=subprocess.PIPE, text=True)
            line = done.stdout.strip().splitlines()[-1]
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
