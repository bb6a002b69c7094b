"""Two ways `tune` used to mislead, closed (issue 23, part 4).

* Your configuration as written is scored and reported as "your config":
  a weight or lambda outside --weight-bounds/--lambda-bounds widens the
  bounds (one line says so) instead of being clipped silently, so tuned.yml
  never scores below it on the fit windows.
* A run holds its --out for its whole length: a second run into the same
  --out (a real second process) refuses at start in one line naming the
  first one's pid; a run killed with SIGKILL never blocks the next.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_tune_command
import torch
import yaml
from click.testing import CliRunner
from test_tune_command import _data_args, _merge

from mergekit_cabs import tune as tn
from mergekit_cabs._output import LOCK_NAME, out_lock
from mergekit_cabs.cli import main

REPO = Path(__file__).resolve().parent.parent
tune_family = test_tune_command.tune_family  # the fixture: a bf16 base, three fine-tunes, their texts


def test_a_start_outside_the_bounds_is_scored_and_reported_as_written(tune_family, tmp_path):
    raw = json.loads(json.dumps(tune_family["raw"]))
    raw["models"][1]["parameters"]["weight"] = 3.0
    raw["parameters"]["lambda"] = 2.5
    config = tmp_path / "outside.yml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["tune", str(config), *map(str, _data_args(tune_family)),
                                                       "--out", str(out), "--budget", "8", "--max-windows", "4",
                                                       "--objective", "loss", "--quiet"])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads((out / "tune.json").read_text())
    start = report["start"]
    assert (start["lambda"], start["weights"]) == (2.5, {"ft0": 1.0, "ft1": 3.0, "ft2": 1.0})  # not clipped
    assert report["search"]["bounds"][0] == [0.05, 2.5] and report["search"]["bounds"][1] == [0.0, 3.0]
    first = report["points"][0]
    assert (first["lambda"], first["weights"]) == (2.5, start["weights"])  # the search starts there
    assert report["best"]["fit"]["score"] >= start["fit"]["score"]
    notes = report["search"]["notes"]
    assert notes == [
        "tune: your config sets a weight 3, outside --weight-bounds 0,2; the search covers 0,3 instead, so it "
        "starts from your config as written",
        "tune: your config sets lambda 2.5, outside --lambda-bounds 0.05,2; the search covers 0.05,2.5 instead, "
        "so it starts from your config as written"]
    assert all(n in result.stderr for n in notes) and all(n in result.stdout for n in notes)
    assert "your config" in result.stdout and notes[0] in (out / "tune.md").read_text()
    # "your config" is the model mergekit writes from the YAML as given, window for window
    model = _merge(raw, tmp_path / "merged", torch.bfloat16)
    prep = tn.prepare(config, [a for a in _data_args(tune_family) if a != "--data"], max_windows=4)
    for task in prep.tasks:
        for split in ("fit", "heldout"):
            assert tn.window_losses(model, getattr(task, split), 4).tolist() == \
                start[split]["window_losses"][task.name], (task.name, split)


def test_a_start_inside_the_bounds_changes_nothing_and_says_nothing(tune_family):
    prep = tn.prepare(tune_family["config"], [f"{k}={v}" for k, v in tune_family["data"].items()], max_windows=2)
    report = tn.run_tune(prep, budget=2, objective="loss", quiet=True)
    assert report["search"]["notes"] == [] and report["search"]["bounds"][1] == [0.0, 2.0]


# --- the lock on --out ------------------------------------------------------------------------

HOLD = """
import sys, time
from mergekit_cabs._output import out_lock
with out_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(out: Path) -> subprocess.Popen:
    """A real second process that holds the lock on `out` until killed."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_into_a_held_out_refuses_in_one_line_naming_the_pid(tune_family, tmp_path):
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        result = CliRunner().invoke(main, ["tune", str(tune_family["config"]), *map(str, _data_args(tune_family)),
                                           "--out", str(out), "--budget", "2", "--max-windows", "2", "--quiet"])
        assert result.exit_code == 1
        assert result.output.strip().splitlines() == [
            f"Error: --out {out} is in use by another run (pid {holder.pid}); wait for it to end or give "
            "another --out"]
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # the holder's lock: nothing of ours written
    finally:
        holder.kill()
        holder.wait()
    # killed with SIGKILL: its lock file stays, its lock does not; the next run goes through
    assert (out / LOCK_NAME).read_text().strip() == str(holder.pid)
    result = CliRunner().invoke(main, ["tune", str(tune_family["config"]), *map(str, _data_args(tune_family)),
                                       "--out", str(out), "--budget", "2", "--max-windows", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".png") == ["task_arithmetic_tuned.yml", "tune.json",
                                                                           "tune.md", "tuned.yml"]


def test_two_tune_processes_on_one_out_end_with_one_result_and_one_refusal(tune_family, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "mergekit_cabs.cli", "tune", str(tune_family["config"]),
            *map(str, _data_args(tune_family)), "--out", str(out), "--max-windows", "4", "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    first = subprocess.Popen([*args, "--budget", "12"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)
    deadline = time.time() + 120
    while not (out / LOCK_NAME).exists() or not (out / LOCK_NAME).read_text().strip():
        assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
        time.sleep(0.05)
    second = subprocess.run([*args, "--budget", "2"], capture_output=True, text=True, env=env)
    first_out, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err
    assert second.returncode == 1 and second.stdout == ""
    assert second.stderr.strip().splitlines() == [
        f"Error: --out {out} is in use by another run (pid {first.pid}); wait for it to end or give another --out"]
    report = json.loads((out / "tune.json").read_text())
    assert report["search"]["budget"] == 12  # the one result is the first run's
    assert not (out / LOCK_NAME).exists() and f"to {out}" in first_out


def test_the_lock_is_released_and_removed_with_what_it_created(tmp_path):
    out = tmp_path / "new" / "out"
    with out_lock(out):
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
        # a second holder in this process: flock is per open file
        with pytest.raises(tn.TuneError, match=r"is in use by another run \(pid \d+\)"), out_lock(out, tn.TuneError):
            pass
    assert not out.exists() and (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(tn.TuneError, match="is a file; give a directory"), out_lock(tmp_path / "file", tn.TuneError):
        pass


def test_a_disk_too_full_for_the_pid_still_locks_and_leaves_nothing(tmp_path, monkeypatch):
    """On a completely full disk the pid cannot be written: the lock holds all
    the same, and leaving it raises nothing (the run's own error is the one
    line the user sees) and removes what it created."""
    import errno

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    monkeypatch.setattr(os, "write", full)
    with out_lock(out, tn.TuneError):
        assert (out / LOCK_NAME).exists() and (out / LOCK_NAME).read_text() == ""
        with pytest.raises(tn.TuneError, match=r"is in use by another run \(pid unknown\)"), \
                out_lock(out, tn.TuneError):
            pass
    assert not out.exists()


def test_sigterm_releases_the_lock(tmp_path):
    out = tmp_path / "out"
    holder = _holder(out)
    holder.send_signal(signal.SIGTERM)
    holder.wait()
    with out_lock(out):
        pass
