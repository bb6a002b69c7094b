"""The steps of `benchmarks/gpu/run.sh`, in order, each timed, its output
kept in the log, none stopping the next: the CUDA tests, the kernel on an MLP
and an embedding-shaped tensor, a 1B-shaped family made on the spot,
`mergekit-yaml --cuda` end to end on it, and `tune --cuda` on it (the store on
the host, then on the device), with the tuned merge checked window by window.
Then one JSON file with every figure (and the log) in the output folder.

    python benchmarks/gpu/steps.py --out DIR [--dry-run]      # run.sh calls it

`--dry-run` runs the same steps on the CPU with tiny shapes, so that the
script is tried where there is no GPU (tests/test_gpu_script.py); what a dry
run cannot do on the CPU (`--cuda`, `--store-on-device`) it leaves out, and
each such step says so in its `dry_run_note`.  A step passes when its command
exits 0 and its own check holds (the tests: at least one passed, none failed
or skipped); otherwise its status says why ("failed: ..."), and a step left
no time by the run's budget says "failed: not started ...".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
# Every test file holding a test that needs CUDA (named with "cuda"; they run with `-k cuda`).
CUDA_TEST_FILES = ["tests/test_backends.py", "tests/test_e2e.py", "tests/test_tune_gradient.py"]
RESULTS, LOG = "gpu-results.json", "gpu-run.log"
MIN_STEP_S = 5  # a step left less time than this by the run's budget is not started

# The sizes: on the GPU, the issue's; in the dry run, tiny ones (the same code paths).
SIZES = {
    "gpu": {"mlp": (4096, 14336), "embedding": (128256, 8192), "shape": "1b", "window": 256, "max_windows": 8,
            "budget": 4, "repeats": 3, "budget_s": 480},
    "dry": {"mlp": (64, 1024), "embedding": (512, 256), "shape": "tiny", "window": 32, "max_windows": 2,
            "budget": 4, "repeats": 2, "budget_s": 300},
}

ENVIRONMENT = """
import importlib.metadata as md, json, os, platform, sys, torch
import mergekit_cabs
import mergekit, mergekit.merge_methods as mm  # mergekit imports; get() raises unless cabs is registered
versions = {}
for name in ("torch", "transformers", "accelerate", "safetensors", "tokenizers", "numba", "numpy", "peft",
             "mergekit", "pydantic", "pydantic-core", "immutables", "click", "tqdm", "pytest"):
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
cuda = torch.cuda.is_available()
print(json.dumps({
    "python": platform.python_version(), "versions": versions, "mergekit_cabs": mergekit_cabs.__version__,
    "cabs_method": type(mm.get("cabs")).__name__, "mergekit_from": mergekit.__file__,
    "mergekit_cabs_from": mergekit_cabs.__file__, "cuda_available": cuda, "torch_cuda": torch.version.cuda,
    "cpus": os.cpu_count(), "device_name": torch.cuda.get_device_name() if cuda else None,
    "device_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None}))
if sys.argv[1] == "gpu" and not cuda:
    sys.exit("torch sees no CUDA device")
"""


@dataclass
class Step:
    """One command of the run, how long it may take and where its figures land."""

    name: str
    argv: list[str]
    cap_s: int
    figures_file: Path | None = None  # JSON (or the last JSON line) the command writes
    env: dict[str, str] = field(default_factory=dict)
    note: str | None = None  # what the dry run leaves out
    check: str = "exit"  # "exit": exit status 0; "pytest": and the counts; "json_stdout": figures from stdout


def plan(dry: bool, scratch: Path) -> list[Step]:
    """The steps, with the sizes of the mode."""
    size, py = SIZES["dry" if dry else "gpu"], sys.executable
    device = "cpu" if dry else "cuda"
    cuda = [] if dry else ["--cuda"]
    work, shape = scratch / "family", size["shape"]
    family = work / shape
    kernel = [py, str(BENCH / "kernel.py"), "--device", device, "--ks", "3", "--methods", "task_arithmetic", "ties",
              "cabs", "--no-sizes", "--no-memory", "--repeats", str(size["repeats"])]
    tune = [py, str(BENCH / "tune_scale.py"), "--work", str(work), "--shapes", shape, "--budget", str(size["budget"]),
            "--window", str(size["window"]), "--max-windows", str(size["max_windows"]), "--check-exact", *cuda]
    no_cuda = "dry run: without --cuda (needs a GPU)" if dry else None
    return [
        Step("environment", [py, "-c", ENVIRONMENT, "dry" if dry else "gpu"], 60, check="json_stdout"),
        Step("cuda_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *CUDA_TEST_FILES, "-k", "cuda"],
             120, env={"MERGEKIT_CABS_CUDA_TEST_DEVICE": device}, check="pytest",
             note="dry run: the CUDA tests' device is the CPU (MERGEKIT_CABS_CUDA_TEST_DEVICE=cpu)" if dry else None),
        Step("kernel_mlp", [*kernel, "--shape", *map(str, size["mlp"]), "--json", str(scratch / "kernel_mlp.json")],
             90, scratch / "kernel_mlp.json"),
        Step("kernel_embedding", [*kernel, "--shape", *map(str, size["embedding"]),
                                  "--json", str(scratch / "kernel_embedding.json")], 150,
             scratch / "kernel_embedding.json"),
        Step("family", [py, str(BENCH / "tune_scale.py"), "--work", str(work), "--shapes", shape, "--build-only",
                        *cuda], 120, note=no_cuda),
        Step("end_to_end", [py, str(BENCH / "end_to_end.py"), "--methods", "task_arithmetic", "cabs",
                            "--base", str(family / "base"), *[f"--fine-tune={family / f'ft{i}'}" for i in (1, 2, 3)],
                            *(["--mergekit-arg=--cuda"] if not dry else []), "--json", str(scratch / "e2e.json")],
             150, scratch / "e2e.json", note=no_cuda),
        Step("tune", [*tune, "--out", str(scratch / "tune.jsonl")], 150, scratch / "tune.jsonl", note=no_cuda),
        Step("tune_store_on_device", [*tune, *([] if dry else ["--store-on-device"]),
                                      "--out", str(scratch / "tune_store.jsonl")], 150, scratch / "tune_store.jsonl",
             note="dry run: without --cuda and --store-on-device (both need a GPU)" if dry else None),
    ]


def run_step(step: Step, limit_s: float, log) -> dict:
    """Run one step (killed, with its children, after `limit_s`); its record."""
    shown = step.argv[:2] + ["(the environment check in steps.py)"] if step.check == "json_stdout" else step.argv
    record = {"step": step.name, "command": " ".join(shown), "limit_s": round(limit_s)}
    if step.note:
        record["dry_run_note"] = step.note
    log.write(f"\n===== {step.name}: {record['command']}\n")
    log.flush()
    if limit_s < MIN_STEP_S:
        record.update(status="failed: not started, the run's time budget was spent", seconds=0.0, figures=None)
        return record
    started = time.perf_counter()
    child = subprocess.Popen(step.argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, **step.env}, start_new_session=True)
    try:
        output, _ = child.communicate(timeout=limit_s)
        status = "passed" if child.returncode == 0 else f"failed: exit status {child.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        output, _ = child.communicate()
        status = f"failed: timed out after {limit_s:.0f} s"
    record["seconds"] = round(time.perf_counter() - started, 2)
    log.write(output)
    log.write(f"----- {step.name}: {status} in {record['seconds']} s\n")
    log.flush()
    figures, problem = read_figures(step, output)
    if status == "passed" and problem:
        status = f"failed: {problem}"
    record.update(status=status, figures=figures)
    if status != "passed":
        record["output_tail"] = output[-2000:]
    return record


def read_figures(step: Step, output: str) -> tuple[object, str | None]:
    """The step's figures, and what is wrong with them (None: nothing)."""
    if step.check == "pytest":
        counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", output)}
        if not counts.get("passed") or any(counts.get(k) for k in ("failed", "skipped", "error", "errors")):
            return counts, f"the tests did not all pass ({counts}); a skipped CUDA test is not a pass"
        return counts, None
    if step.check == "json_stdout":
        lines = [line for line in output.splitlines() if line.startswith("{")]
        return (json.loads(lines[-1]), None) if lines else (None, "no JSON line in the output")
    if step.figures_file is None:
        return None, None
    if not step.figures_file.exists():
        return None, f"no figures written to {step.figures_file.name}"
    text = step.figures_file.read_text().strip()
    return (json.loads(text.splitlines()[-1]) if step.figures_file.suffix == ".jsonl" else json.loads(text)), None


def headline(record: dict) -> str:
    """A step's main figures in a few words ("" when it has none)."""
    f, name = record.get("figures") or {}, record["step"]
    if name == "environment":
        return f"{f.get('device_name') or 'no CUDA device'}; torch {f.get('versions', {}).get('torch')}"
    if name == "cuda_tests":
        return ", ".join(f"{n} {word}" for word, n in f.items())
    if name.startswith("kernel") and f.get("times"):
        memory = f.get("device_memory", {}).get("3", {})
        return "; ".join(f"{m} " + ("out of memory" if t is None else f"{t * 1e3:.1f} ms")
                         + (f" +{memory[m]['extra_bytes'] / 2**30:.2f} GiB" if "extra_bytes" in memory.get(m, {})
                            else "") for m, t in f["times"]["3"].items())
    if name == "end_to_end" and f.get("results"):
        return "; ".join(f"{m} {r['wall_s']:.1f} s" + (f", GPU {r['gpu_peak_gb']:.2f} GB" if r.get("gpu_peak_gb")
                                                        else "") for m, r in f["results"].items())
    if name.startswith("tune") and "evaluate_mean_s" in f:
        gpu = f.get("peak_device_bytes_per_parameter")
        merged = f.get("tuned_merge", {})
        return (f"eval {f['evaluate_mean_s']:.2f} s, host {f['peak_rss_bytes_per_parameter']:.1f} B/param"
                + (f", GPU {gpu:.1f} B/param" if gpu is not None else "")
                + f", exact {merged.get('windows_equal')}/{merged.get('windows')} windows")
    return ""


def summary(records: list[dict]) -> str:
    """One line per step: status, seconds, and its main figures."""
    lines = [f"{'step':22s} {'seconds':>8s}  status"]
    for r in records:
        lines.append(f"{r['step']:22s} {r.get('seconds', 0):8.1f}  {r['status']}")
        try:
            words = headline(r)
        except (KeyError, TypeError, ValueError) as error:  # a figure missing or odd: the JSON has them all
            words = f"(figures not summarised: {type(error).__name__} {error})"
        if words:
            lines.append(f"{'':33s}{words}")
    return "\n".join(lines)


def results(args, records: list[dict], started: float, complete: bool) -> dict:
    """The JSON file's content: the run, then each step's record."""
    mode = "dry" if args.dry_run else "gpu"
    env = next((r.get("figures") or {} for r in records if r["step"] == "environment"), {})
    return {"dry_run": args.dry_run, "complete": complete, "device_name": env.get("device_name"),
            "budget_s": args.budget_s or SIZES[mode]["budget_s"], "steps_s": round(time.perf_counter() - started, 1),
            "sizes": SIZES[mode], "steps": records}


def write_partial(args, records: list[dict], started: float) -> None:
    """The results so far (a run killed from outside keeps them); a failed write is said, not fatal."""
    try:
        (args.out / RESULTS).write_text(json.dumps(results(args, records, started, complete=False), indent=1))
    except OSError as error:
        print(f"steps.py: could not write the results so far to {args.out / RESULTS}: {error}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="where the JSON file and the log go")
    ap.add_argument("--scratch", type=Path, required=True, help="where the models and figures are made")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny shapes")
    ap.add_argument("--install", default="skipped: not asked", help="how run.sh's wheel install went")
    ap.add_argument("--install-seconds", type=float, default=0.0)
    ap.add_argument("--budget-s", type=float, default=None, help="seconds for all steps (default: the mode's)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.scratch.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s or SIZES["dry" if args.dry_run else "gpu"]["budget_s"]
    records = [{"step": "install_wheels", "status": args.install, "seconds": args.install_seconds}]
    started = time.perf_counter()
    with open(args.out / LOG, "a") as log:
        for step in plan(args.dry_run, args.scratch):
            left = budget - (time.perf_counter() - started)
            record = run_step(step, min(step.cap_s, left), log)
            records.append(record)
            print(f"{record['step']:22s} {record['seconds']:8.1f} s  {record['status']}", flush=True)
            write_partial(args, records, started)
    final = results(args, records, started, complete=True)
    print("\n" + summary(records), flush=True)  # before the file: a write error loses nothing
    (args.out / RESULTS).write_text(json.dumps(final, indent=1))
    print(f"wrote {args.out / RESULTS} and {args.out / LOG}")
    sys.exit(0 if all(r["status"] == "passed" for r in records[1:]) else 1)


if __name__ == "__main__":
    main()
