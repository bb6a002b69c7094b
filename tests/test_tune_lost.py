"""Nothing lost, nothing misleading (issue 29): what `tune` recommends, said once.

* The command's last line is the mergekit-yaml command of what the run
  recommends (`tune.recommendation`): a baseline's YAML when it beats tuned
  cabs on the held-out data, your config as written when it does or (no row
  better) when tuned.yml scores below it on the fit data, else tuned.yml;
  the summary names the same file and shows its numbers.
* A full disk loses nothing the summary recommends: every YAML tune would
  have written is printed, as it would have been written, before the
  one-line error.
* Ctrl-C (a real SIGINT to a real process) while the baselines run keeps the
  finished cabs search: its summary, tuned.yml, tune.md and tune.json, exit
  status 130, and a last line that says what to merge.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_tune_command
import yaml
from click.testing import CliRunner
from test_tune_command import _data_args

from mergekit_cabs import tune as tn
from mergekit_cabs._output import STAGING
from mergekit_cabs.cli import main

REPO = Path(__file__).resolve().parent.parent
tune_family = test_tune_command.tune_family  # the fixture: a bf16 base, three fine-tunes, their texts


def _args(family, out: Path, *extra) -> list[str]:
    return ["tune", str(family["config"]), *map(str, _data_args(family)), "--out", str(out), *map(str, extra)]


@pytest.fixture(scope="module")
def real_report(tune_family, tmp_path_factory) -> dict:
    """tune.json of a real run with tuned task arithmetic, as tune wrote it."""
    out = tmp_path_factory.mktemp("lost") / "out"
    result = CliRunner().invoke(main, _args(tune_family, out, "--budget", 3, "--max-windows", 4,
                                            "--baselines", "task_arithmetic_tuned", "--quiet"))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "tune.json").read_text())
    assert result.output.strip().splitlines()[-1] == tn.merge_line(report, out)
    return report


def _rescaled(part: dict, objective, factor: float) -> dict:
    """`part` (a row's scores) with every held-out loss times `factor`, its score recomputed."""
    windows = {t: [v * factor for v in w] for t, w in part["heldout"]["window_losses"].items()}
    losses = {t: sum(w) / len(w) for t, w in windows.items()}
    part["heldout"] = {**part["heldout"], "window_losses": windows, "loss": losses, "score": objective.score(losses)}
    return part


def _variant(report: dict, baseline: float, config: float) -> dict:
    """The real report with the baseline's and your config's held-out losses
    scaled (below 1: better than tuned cabs), and its comparison redone."""
    report = copy.deepcopy(report)
    objectives = tn.split_objectives(report["objective"], list(report["reference"]["models"]), report["reference"],
                                     1.0)
    runs = [_rescaled(run, objectives["heldout"], baseline) for run in report["baselines"]["runs"]]
    _rescaled(report["start"], objectives["heldout"], config)
    report["baselines"] = tn.comparison(objectives["heldout"], report, runs)
    return report


def _tune_with(monkeypatch, report: dict, family, out: Path):
    """The real command, its search replaced by `report` (prepare, the
    summary, the files and the last line are the command's own)."""
    monkeypatch.setattr(tn, "run_tune", lambda *a, **k: copy.deepcopy(report))
    return CliRunner().invoke(main, _args(family, out, "--budget", 3, "--max-windows", 4, "--quiet"))


def _numbers_shown(output: str, rec: dict) -> None:
    """The recommended lambda and every weight are printed in the summary:
    a line that starts with the name holds the value."""
    for name, value in {"lambda": rec["lambda"], **rec["weights"]}.items():
        assert any(line.split()[:1] == [name] and f"{value:.3f}" in line.split() for line in output.splitlines()), \
            (name, value, output)


def test_the_last_line_merges_the_baseline_that_beats_tuned_cabs_and_shows_its_weights(
        tune_family, real_report, tmp_path, monkeypatch):
    report = _variant(real_report, baseline=0.7, config=1.3)
    out = tmp_path / "out"
    result = _tune_with(monkeypatch, report, tune_family, out)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1] == f"Merge it:  mergekit-yaml {out / 'task_arithmetic_tuned.yml'} OUTPUT_DIR"
    assert "merge task_arithmetic_tuned.yml" in report["baselines"]["verdict"]
    run = report["baselines"]["runs"][0]
    shown = lines[lines.index(next(x for x in lines if x.startswith("recommended: task_arithmetic (tuned)"))):]
    assert shown[1].split() == ["lambda", f"{run['lambda']:.3f}"]
    assert [x.split() for x in shown[2:2 + len(run["weights"])]] == [[k, f"{v:.3f}"] for k, v in
                                                                     run["weights"].items()]
    written = json.loads((out / "tune.json").read_text())["recommended"]
    assert written["file"] == "task_arithmetic_tuned.yml" and (out / written["file"]).exists()
    assert "**`mergekit-yaml task_arithmetic_tuned.yml OUT`**" in (out / "tune.md").read_text()


def test_the_last_line_merges_your_config_when_it_beats_tuned_cabs_on_held_out_data(
        tune_family, real_report, tmp_path, monkeypatch):
    report = _variant(real_report, baseline=1.3, config=0.7)
    out = tmp_path / "out"
    result = _tune_with(monkeypatch, report, tune_family, out)
    assert result.exit_code == 0, result.output
    assert report["baselines"]["verdict"].endswith(f"merge {tune_family['config']}")
    assert result.output.strip().splitlines()[-1] == f"Merge it:  mergekit-yaml {tune_family['config']} OUTPUT_DIR"
    assert f"recommended: your config as written, {tune_family['config']}, the your config column above" \
        in result.output
    _numbers_shown(result.output, tn.recommendation(report))
    assert "tuned.yml OUTPUT_DIR" not in result.output


def test_the_last_line_merges_tuned_yml_when_tuned_cabs_beats_every_row(
        tune_family, real_report, tmp_path, monkeypatch):
    report = _variant(real_report, baseline=1.3, config=1.3)
    report["scores_below_config"] = True  # the held-out evidence outweighs the fit data's
    out = tmp_path / "out"
    result = _tune_with(monkeypatch, report, tune_family, out)
    assert result.exit_code == 0, result.output
    assert report["baselines"]["verdict"].endswith("merge tuned.yml")
    assert result.output.strip().splitlines()[-1] == f"Merge it:  mergekit-yaml {out / 'tuned.yml'} OUTPUT_DIR"
    assert "recommended: cabs (tuned), tuned.yml, the tuned column above" in result.output
    _numbers_shown(result.output, tn.recommendation(report))


@pytest.mark.parametrize("density, below", [("0.5", True), ("1", False)])  # on this family, at budget 1
def test_without_baselines_the_last_line_follows_the_fit_data(tune_family, tmp_path, density, below):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, _args(tune_family, out, "--budget", 1, "--max-windows", 2, "--densities",
                                            density, "--baselines", "none", "--quiet"))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "tune.json").read_text())
    assert report["scores_below_config"] is below and "baselines" not in report
    chosen = tune_family["config"] if below else out / "tuned.yml"
    assert result.output.strip().splitlines()[-1] == f"Merge it:  mergekit-yaml {chosen} OUTPUT_DIR"
    assert report["recommended"]["method"] == ("your config" if below else "cabs (tuned)")
    _numbers_shown(result.output, report["recommended"])
    assert sum("mergekit-yaml" in line for line in result.output.splitlines()) == 1  # no other advice


def test_a_full_disk_prints_every_yaml_it_would_have_written_and_the_recommended_one(
        tune_family, real_report, tmp_path, monkeypatch):
    report = _variant(real_report, baseline=0.7, config=1.3)  # the verdict: merge task_arithmetic_tuned.yml
    attempted = {}
    real = Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.parent.name.startswith(STAGING):
            attempted[self.name] = data
            if self.name == "tune.md":  # written after every YAML
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "out"
    result = _tune_with(monkeypatch, report, tune_family, out)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1] == (f"Error: tune: could not write {out}: No space left on device; the summary and every YAML "
                         "it would have written are printed above (the recommended one: task_arithmetic_tuned.yml)")
    printed = dict(re.findall(r"^=== (\S+) ===\n(.*?)\n=== end of \1 ===$", result.output, flags=re.M | re.S))
    assert sorted(printed) == sorted(tn.yaml_texts(report)) == ["task_arithmetic_tuned.yml", "tuned.yml"]
    for name, text in printed.items():
        assert yaml.safe_load(text) == yaml.safe_load(attempted[name])  # as it would have been written
        assert text == attempted[name].rstrip()
    assert yaml.safe_load(printed["task_arithmetic_tuned.yml"])["merge_method"] == "task_arithmetic"
    assert "merge task_arithmetic_tuned.yml" in result.output and not out.exists()


def test_ctrl_c_during_the_baselines_keeps_the_finished_cabs_search(tune_family, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    args = _args(tune_family, out, "--budget", 30, "--max-windows", 8, "--optimizer", "coordinate",
                 "--baselines", "task_arithmetic_tuned,task_arithmetic,ties,dare_ties")  # a long baseline phase
    proc = subprocess.Popen([sys.executable, "-m", "mergekit_cabs.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline, seen = time.time() + 300, ""
        while "Tuning task arithmetic the same way" not in seen:
            assert proc.poll() is None and time.time() < deadline, seen
            seen += proc.stderr.readline()
        assert proc.poll() is None, "the baseline phase ended before the signal"
        stdout = stderr = None
        for _ in range(300):  # Ctrl-C once a second until it takes, as a user would press it again
            proc.send_signal(signal.SIGINT)  # Python may run the handler in a finalizer, which ignores it
            try:
                stdout, stderr = proc.communicate(timeout=1)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    lines = stdout.strip().splitlines()
    assert lines[0].split() == ["your", "config", "tuned"] and any(x.startswith("objective (gain)") for x in lines)
    assert "the baselines were interrupted (Ctrl-C): no comparison; tuned cabs and your config only" in lines
    report = json.loads((out / "tune.json").read_text())
    assert "baselines" not in report and report["interrupted"] == "baselines"
    tuned = yaml.safe_load((out / "tuned.yml").read_text())
    assert tuned["merge_method"] == "cabs" and tuned["parameters"]["lambda"] == pytest.approx(report["best"]["lambda"])
    written = ["tune.md", *(["tune.png"] if (out / "tune.png").exists() else []), "tune.json", "tuned.yml"]
    assert lines[-2] == (f"Interrupted (Ctrl-C) while the baselines ran: wrote {', '.join(written)} to {out}, the "
                         "finished cabs search's result without the baselines")
    assert sorted(p.name for p in out.iterdir()) == sorted(written)
    chosen = tune_family["config"] if report["scores_below_config"] else out / "tuned.yml"
    assert lines[-1] == f"Merge it:  mergekit-yaml {chosen} OUTPUT_DIR"
    ignored = re.sub(r"Exception ignored in.*?KeyboardInterrupt: ?\n", "", stderr, flags=re.S)  # a swallowed signal
    assert "Traceback" not in ignored
