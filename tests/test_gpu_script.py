"""benchmarks/gpu/run.sh, the script for the first GPU, tried on the CPU.

* Its dry run (GPU_DRY_RUN=1: the same steps on the CPU, tiny shapes) passes
  every step and writes every figure to one JSON file and a log; without a
  wheels folder the install is recorded as skipped, never as passed.
* A failing or hung step is recorded and the next step still runs; the run
  then exits 1; a skipped CUDA test fails its step.
* Every test file with a CUDA check is one the script runs.
* With MERGEKIT_CABS_TEST_WHEELS=1 (needs PyPI): wheels.sh gets every wheel,
  under 64 MiB, and the dry run installs them offline into its target.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "benchmarks" / "gpu"
STEPS = ["install_wheels", "environment", "cuda_tests", "kernel_mlp", "kernel_embedding", "family", "end_to_end",
         "tune", "tune_store_on_device"]


def steps_module():
    spec = importlib.util.spec_from_file_location("gpu_steps", GPU / "steps.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_steps"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def dry_run(tmp_path: Path, wheels: Path) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    env = {**os.environ, "GPU_DRY_RUN": "1", "PYTHON": sys.executable, "OUT": str(out), "GPU_WHEELS": str(wheels),
           "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", str(GPU / "run.sh")], env=env, capture_output=True, text=True, timeout=600)
    results = json.loads((out / "gpu-results.json").read_text())
    return done, results


def check_figures(results: dict) -> None:
    """The figures each step of a dry run must bring back."""
    steps = {r["step"]: r for r in results["steps"]}
    assert steps["environment"]["figures"]["cabs_method"] == "CabsMerge"
    tests = steps["cuda_tests"]["figures"]
    assert tests["passed"] >= 1 and not tests.get("skipped") and not tests.get("failed")
    for name in ("kernel_mlp", "kernel_embedding"):
        times = steps[name]["figures"]["times"]["3"]
        assert sorted(times) == ["cabs", "task_arithmetic", "ties"] and all(t > 0 for t in times.values())
    e2e = steps["end_to_end"]["figures"]
    assert sorted(e2e["results"]) == ["cabs", "task_arithmetic"] and e2e["parameters"] > 0
    for name in ("tune", "tune_store_on_device"):
        tune = steps[name]["figures"]
        assert tune["evaluate_mean_s"] > 0 and tune["peak_rss_bytes_per_parameter"] > 0
        merged = tune["tuned_merge"]
        assert merged["exact"] and merged["windows"] == merged["windows_equal"] > 0


def test_dry_run_passes_every_step_and_records_the_missing_wheels_as_skipped(tmp_path):
    done, results = dry_run(tmp_path, tmp_path / "no-wheels")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert results["dry_run"] is True
    assert [r["step"] for r in results["steps"]] == STEPS
    install, *rest = results["steps"]
    assert install["status"] == f"skipped: no wheels folder ({tmp_path / 'no-wheels'})"
    assert {r["step"]: r["status"] for r in rest} == {name: "passed" for name in STEPS[1:]}
    check_figures(results)
    log = (tmp_path / "out" / "gpu-run.log").read_text()
    assert all(f"===== {name}:" in log for name in STEPS[1:])
    assert "install_wheels" in done.stdout and "tune_store_on_device" in done.stdout


def test_a_failing_or_hung_step_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    steps = steps_module()
    fake = [
        steps.Step("environment", [sys.executable, "-c", "print('{\"device_name\": null}')"], 30,
                   check="json_stdout"),
        steps.Step("boom", [sys.executable, "-c", "import sys; print('half done'); sys.exit(3)"], 30),
        steps.Step("hang", [sys.executable, "-c", "import time; time.sleep(60)"], 1),
        # the results so far are on disk when a step starts (a run killed from outside keeps them)
        steps.Step("after", [sys.executable, "-c", "import json, sys; r = json.load(open(sys.argv[1])); "
                             "sys.exit(r['complete'] or [s['step'] for s in r['steps']][-1] != 'hang')",
                             str(tmp_path / "gpu-results.json")], 30),
    ]
    monkeypatch.setattr(steps, "plan", lambda dry, scratch: fake)
    monkeypatch.setattr(steps, "MIN_STEP_S", 0)
    monkeypatch.setattr(sys, "argv", ["steps.py", "--out", str(tmp_path), "--scratch", str(tmp_path / "s")])
    with pytest.raises(SystemExit) as exit_:
        steps.main()
    assert exit_.value.code == 1
    final = json.loads((tmp_path / "gpu-results.json").read_text())
    assert final["complete"] is True
    records = {r["step"]: r for r in final["steps"]}
    assert records["boom"]["status"] == "failed: exit status 3" and "half done" in records["boom"]["output_tail"]
    assert records["hang"]["status"] == "failed: timed out after 1 s" and records["hang"]["seconds"] < 30
    assert records["after"]["status"] == "passed"
    assert records["install_wheels"]["status"] == "skipped: not asked"


def test_a_step_the_budget_leaves_no_time_for_is_not_started_and_fails(tmp_path):
    steps = steps_module()
    with open(tmp_path / "log", "w") as log:
        record = steps.run_step(steps.Step("late", [sys.executable, "-c", "pass"], 30), steps.MIN_STEP_S - 1, log)
    assert record["status"] == "failed: not started, the run's time budget was spent"


def test_the_summary_names_the_gpu_figures():
    """The last lines of a GPU run's output carry the figures even if the JSON file never comes back."""
    steps = steps_module()
    records = [
        {"step": "kernel_embedding", "status": "passed", "seconds": 30.0, "figures": {
            "times": {"3": {"task_arithmetic": 0.25, "ties": None, "cabs": 0.5}},
            "device_memory": {"3": {"task_arithmetic": {"peak_bytes": 9 * 2**30, "extra_bytes": 2**31},
                                    "ties": {"error": "out of memory: CUDA"},
                                    "cabs": {"peak_bytes": 12 * 2**30, "extra_bytes": 5 * 2**30}}}}},
        {"step": "end_to_end", "status": "passed", "seconds": 60.0, "figures": {"results": {
            "cabs": {"wall_s": 21.5, "gpu_peak_gb": 3.25}}}},
        {"step": "tune_store_on_device", "status": "passed", "seconds": 80.0, "figures": {
            "evaluate_mean_s": 0.5, "peak_rss_bytes_per_parameter": 3.0, "peak_device_bytes_per_parameter": 9.5,
            "tuned_merge": {"windows": 48, "windows_equal": 48, "exact": True}}},
        {"step": "tune", "status": "failed: exit status 1", "seconds": 9.0, "figures": {"evaluate_mean_s": 1}},
    ]
    text = steps.summary(records)
    assert "task_arithmetic 250.0 ms +2.00 GiB; ties out of memory; cabs 500.0 ms +5.00 GiB" in text
    assert "cabs 21.5 s, GPU 3.25 GB" in text
    assert "eval 0.50 s, host 3.0 B/param, GPU 9.5 B/param, exact 48/48 windows" in text
    assert "failed: exit status 1" in text and "figures not summarised: KeyError" in text


@pytest.mark.parametrize("output, problem", [
    ("1 passed, 103 deselected in 2.1s", None),
    ("1 skipped, 103 deselected in 2.1s", "did not all pass"),
    ("1 passed, 1 skipped in 2.1s", "did not all pass"),
    ("1 failed, 2 passed in 2.1s", "did not all pass"),
    ("no tests ran in 0.1s", "did not all pass"),
])
def test_the_cuda_tests_step_passes_only_when_every_test_ran_and_passed(output, problem):
    steps = steps_module()
    _, found = steps.read_figures(steps.Step("cuda_tests", [], 1, check="pytest"), output)
    assert (found is None) if problem is None else (problem in found)


def test_every_test_file_with_a_cuda_check_is_run_by_the_gpu_script():
    steps = steps_module()
    with_cuda = sorted(f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py")
                       if p.name != Path(__file__).name  # this file names the patterns
                       and re.search(r"torch\.cuda\.is_available|CUDA_TEST_DEVICE|\.cuda\(", p.read_text()))
    assert with_cuda and set(with_cuda) <= set(steps.CUDA_TEST_FILES)
    for name in steps.CUDA_TEST_FILES:
        assert re.search(r"def test_\w*cuda\w*\(", (REPO / name).read_text()), name  # `-k cuda` selects it


@pytest.mark.skipif(os.environ.get("MERGEKIT_CABS_TEST_WHEELS") != "1",
                    reason="downloads from PyPI: set MERGEKIT_CABS_TEST_WHEELS=1")
def test_wheels_sh_gets_every_wheel_under_64_mib_and_the_dry_run_installs_them_offline(tmp_path):
    wheels = tmp_path / "wheels"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = {**os.environ, "WHEELS_PYTHON": version, "PIP": f"{sys.executable} -m pip"}
    got = subprocess.run(["bash", str(GPU / "wheels.sh"), str(wheels)], env=env, capture_output=True, text=True)
    assert got.returncode == 0, got.stderr[-3000:]
    total = sum(p.stat().st_size for p in wheels.rglob("*.whl"))
    assert 0 < total < 64 * 2**20
    assert {p.name.split("-")[0].lower() for p in wheels.glob("*.whl")} >= {"mergekit", "pydantic", "immutables"}
    done, results = dry_run(tmp_path, wheels)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {r["step"]: r["status"] for r in results["steps"]} == {name: "passed" for name in STEPS}
    check_figures(results)
