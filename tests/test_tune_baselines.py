"""`tune`'s baselines (issue 23, part 1): task arithmetic tuned the same way,
and the one-lambda task_arithmetic, ties and dare_ties merged by mergekit's
own methods, scored on the same windows as tuned cabs.

* every baseline's reported per-window losses are those of the model
  `mergekit-yaml` writes from the YAML tune writes for it (tuned task
  arithmetic with layer groups included);
* a one-lambda baseline's lambda search costs one merge (counted);
* the table's paired differences and the verdict line follow the intervals;
* a method's interval of the normalized gain redraws the references (the
  base's and the fine-tunes' own values) on the same items, so items that
  differ widely in loss do not widen it; where a draw leaves a model no
  better than the base, there is none (the differences remain);
* --baselines with an unknown name is one line listing the known ones;


* --baselines with an unknown name is one line listing the known ones; one
  naming nothing, or none beside other names, is one line too;
* tuned task arithmetic runs by default only where its store fits in the
  free memory (else one line says what it would cost), runs whenever named,
  and the one-lambda baselines run without it when named alone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import test_tune_command
import torch
import yaml
from click.testing import CliRunner
from test_tune_command import _data_args, _merge

from mergekit_cabs import _mergekit
from mergekit_cabs import tune as tn
from mergekit_cabs.cli import main
from mergekit_cabs.tune import compare

tune_family = test_tune_command.tune_family  # the fixture: a bf16 base, three fine-tunes, their texts
no_model_loading = test_tune_command.no_model_loading


def test_every_baseline_scores_what_mergekit_yaml_writes_from_its_yaml(tune_family, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["tune", str(tune_family["config"]), *map(str, _data_args(tune_family)),
                                       "--out", str(out), "--budget", "10", "--max-windows", "4", "--layer-groups",
                                       "2", "--baselines", "task_arithmetic_tuned,task_arithmetic,ties",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "tune.json").read_text())
    runs = {r["name"]: r for r in report["baselines"]["runs"]}
    assert list(runs) == ["task_arithmetic_tuned", "task_arithmetic", "ties"]
    assert runs["task_arithmetic_tuned"]["evaluations"] == len(runs["task_arithmetic_tuned"]["points"]) <= 10
    prep = tn.prepare(tune_family["config"], [a for a in _data_args(tune_family) if a != "--data"], max_windows=4,
                      layer_groups=2)
    for name, run in runs.items():
        written = yaml.safe_load((out / f"{name}.yml").read_text())
        assert written == run["config"] and written["merge_method"] == name.removesuffix("_tuned")
        model = _merge(written, tmp_path / f"merged-{name}", torch.bfloat16)
        for task in prep.tasks:
            for split in ("fit", "heldout"):
                got = tn.window_losses(model, getattr(task, split), tn.DEFAULTS["batch_size"]).tolist()
                assert got == run[split]["window_losses"][task.name], (name, task.name, split)
    tuned_weights = yaml.safe_load((out / "task_arithmetic_tuned.yml").read_text())
    written_weight = tuned_weights["models"][0]["parameters"]["weight"]
    assert [w.get("filter") for w in written_weight] == ["model.layers.0.", "model.layers.1.", None]  # groups
    assert "density" not in tuned_weights["models"][0]["parameters"]
    assert yaml.safe_load((out / "ties.yml").read_text())["models"][0]["parameters"]["density"] == 0.25
    methods = [r["method"] for r in report["baselines"]["rows"]]
    assert methods == ["cabs (tuned)", "your config", "task_arithmetic (tuned)", "task_arithmetic", "ties"]
    assert report["baselines"]["verdict"] in result.output and report["baselines"]["verdict"] in \
        (out / "tune.md").read_text()
    items, reference = report["reference"]["items"], report["reference"]
    assert report["baselines"]["references"] == "redrawn"  # each draw's gain against the same items' references
    for task in prep.tasks:  # the items the bootstrap redraws: one value per window, averaging to the references
        for split in ("fit", "heldout"):
            for values, mean in ((items["base"][split][task.name], reference["base"][split][task.name]),
                                 (items["models"][task.name][split], reference["models"][task.name][split])):
                assert len(values) == task.count(split) and np.mean(values) == pytest.approx(mean, rel=1e-12)


def test_a_one_lambda_baselines_search_costs_one_merge(tune_family, monkeypatch):
    calls = []
    real = _mergekit.execute

    def counted(targets, device="cpu"):
        calls.append(len(targets))
        yield from real(targets, device)

    prep = tn.prepare(tune_family["config"], [f"{k}={v}" for k, v in tune_family["data"].items()], max_windows=2)
    monkeypatch.setattr(_mergekit, "execute", counted)
    report = tn.run_tune(prep, budget=8, objective="loss", quiet=True, baselines="none")
    assert "baselines" not in report
    before = len(calls)  # the cabs masks: one merge
    report = tn.run_tune(prep, budget=8, objective="loss", quiet=True, baselines="dare_ties")
    assert [r["name"] for r in report["baselines"]["runs"]] == ["dare_ties"]  # named alone: no tuned one
    run = report["baselines"]["runs"][0]
    assert run["name"] == "dare_ties" and run["seed"] == 0
    lambdas = [p["lambda"] for p in run["points"]]
    assert run["evaluations"] == len(set(lambdas)) >= 3  # many lambdas ...
    assert run["merges"] == 2 and run["search_merges"] == 1  # ... from one merge, then the chosen one merged
    # the cabs masks; dare_ties's one merge and its chosen one
    assert before == 1 and len(calls) - before == 3


def test_dense_cabs_keeps_every_place_and_as_method_drops_the_cabs_settings():
    raw = {"merge_method": "cabs", "base_model": "b", "parameters": {"block_size": 64, "lambda": 0.9,
                                                                      "conflict_aware": True},
           "models": [{"model": "x", "parameters": {"n": 16, "weight": 0.5}}, {"model": "y"}]}
    dense = tn.dense_cabs(raw)
    assert dense["parameters"] == {"block_size": 64, "lambda": 0.9, "conflict_aware": False, "density": 1.0,
                                   "overlap": "fill"}
    assert [m["parameters"] for m in dense["models"]] == [{"weight": 0.5, "density": 1.0}, {"density": 1.0}]
    ties = tn.as_method(raw, "ties", 0.7)
    assert ties["merge_method"] == "ties" and ties["parameters"] == {"lambda": 0.7}
    assert [m["parameters"] for m in ties["models"]] == [{"weight": 0.5, "density": 0.25}, {"weight": 1.0}]
    ta = tn.as_method(raw, "task_arithmetic")
    assert [m["parameters"] for m in ta["models"]] == [{"weight": 0.5}, {"weight": 1.0}]
    assert raw["models"][0]["parameters"] == {"n": 16, "weight": 0.5}  # the input is not changed


def test_unknown_baseline_is_one_line_listing_the_known_ones(tune_family, tmp_path, no_model_loading):
    result = CliRunner().invoke(main, ["tune", str(tune_family["config"]), *map(str, _data_args(tune_family)),
                                       "--out", str(tmp_path / "o"), "--baselines", "ties,magic"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: --baselines names 'magic'; known: task_arithmetic_tuned, task_arithmetic, ties, dare_ties "
        "(comma-separated, exactly those run), or none (no baseline); without --baselines, task_arithmetic_tuned "
        "when it fits in memory"]
    assert tn.parse_baselines(None) == (None, ()) and tn.parse_baselines("none") == (False, ())
    assert tn.parse_baselines("ties, task_arithmetic,ties") == (False, ("ties", "task_arithmetic"))
    assert tn.parse_baselines("ties,task_arithmetic_tuned") == (True, ("ties",))
    assert tn.parse_baselines("none, none") == (False, ())


@pytest.mark.parametrize("text, message", [
    ("none,ties", "--baselines 'none,ties': none (no baseline) cannot be combined with other names; give none alone, "
                  "or only the baselines to run"),
    ("", "--baselines '' names no baseline; give the names to run (task_arithmetic_tuned, task_arithmetic, ties, "
         "dare_ties, comma-separated), or none for no baseline"),
    (" , ", "--baselines ' , ' names no baseline; give the names to run (task_arithmetic_tuned, task_arithmetic, "
            "ties, dare_ties, comma-separated), or none for no baseline"),
])
def test_baselines_naming_nothing_or_none_beside_a_name_is_refused_in_one_line(tune_family, tmp_path,
                                                                              no_model_loading, text, message):
    result = CliRunner().invoke(main, ["tune", str(tune_family["config"]), *map(str, _data_args(tune_family)),
                                       "--out", str(tmp_path / "o"), "--baselines", text])
    assert result.exit_code == 1 and not (tmp_path / "o").exists()
    assert result.output.strip().splitlines() == [f"Error: {message}"]


def _rows(diffs: dict[str, list[float]]):
    """A report and baselines whose held-out windows differ from cabs's by the given per-window amounts."""
    cabs = [2.0] * 40

    def part(windows):
        losses = {"t": float(np.mean(windows))}
        return {s: {"score": -losses["t"], "window_losses": {"t": windows}} for s in ("fit", "heldout")}

    report = {"objective": "loss", "config": "c.yml", "search": {"evaluations": 5},
              "best": {"lambda": 1.0, **part(cabs)}, "start": {"lambda": 1.0, **part(cabs)}}
    report["start"]["heldout"]["window_losses"]["t"] = [2.0 + 0.5 * (-1) ** i for i in range(40)]
    baselines = [{"name": name, "lambda": 0.5, "evaluations": 3, "merges": 2, "seed": None,
                  **part([2.0 + d for d in amounts])} for name, amounts in diffs.items()]
    return report, baselines


class _Loss:
    def score(self, losses):
        return -losses["t"]


@pytest.mark.parametrize("diffs, words", [
    ({"task_arithmetic_tuned": [-0.1 + 0.01 * (i % 3) for i in range(40)]},
     "task_arithmetic (tuned) has a lower held-out loss than cabs (tuned) by 0.09"),
    ({"ties": [0.1 + 0.01 * (i % 3) for i in range(40)]}, "cabs (tuned) and your config are not distinguishable"),
])
def test_the_verdict_follows_the_paired_intervals(diffs, words):
    report, baselines = _rows(diffs)
    result = tn.comparison(_Loss(), report, baselines)
    assert words in result["verdict"], result["verdict"]
    row = result["rows"][2]
    assert row["difference"] == pytest.approx(-np.mean(diffs[baselines[0]["name"]]))  # cabs's loss minus its
    assert compare.summary_lines(result, "loss")[-1] == result["verdict"]


def _gain_rows(shift: dict[str, float], noise: float, items: int = 40, own_by: float = 0.6, seed: int = 1):
    """A gain report and one baseline on two data sets, each half easy items
    (base loss 1.0) and half hard ones (3.5): every model's loss on an item is
    the base's lowered by its own amount (`shift`; the fine-tune on its own
    data by `own_by`), plus per-item noise.  Returns the report, the baselines
    and the objective."""
    rng = np.random.default_rng(seed)
    base = {t: [1.0] * (items // 2) + [3.5] * (items - items // 2) for t in ("a", "b")}

    def lowered(by: float) -> dict[str, list[float]]:
        return {t: (np.asarray(v) - by + rng.normal(0, noise, len(v))).tolist() for t, v in base.items()}

    own = lowered(own_by)
    reference = {"base": {s: {t: float(np.mean(v)) for t, v in base.items()} for s in tn.SPLITS},
                 "models": {t: {s: float(np.mean(v)) for s in tn.SPLITS} for t, v in own.items()},
                 "items": {"base": {s: base for s in tn.SPLITS}, "models": {t: {s: v for s in tn.SPLITS}
                                                                             for t, v in own.items()}}}
    objective = tn.split_objectives("gain", ["a", "b"], reference, 0.0)["heldout"]

    def part(name: str) -> dict:
        windows = lowered(shift[name])
        score = objective.score({t: float(np.mean(v)) for t, v in windows.items()})
        return {s: {"score": score, "window_losses": windows} for s in ("fit", "heldout")}

    report = {"objective": "gain", "config": "c.yml", "search": {"evaluations": 5}, "reference": reference,
              "best": {"lambda": 1.0, **part("cabs")}, "start": {"lambda": 1.0, **part("yours")}}
    baselines = [{"name": "task_arithmetic_tuned", "lambda": 0.5, "evaluations": 3, "merges": 1, "seed": None,
                  **part("ta")}]
    return report, baselines, objective


def _width(pair) -> float:
    return pair[1] - pair[0]


def test_a_methods_gain_interval_redraws_the_references_so_easy_and_hard_items_do_not_widen_it():
    report, baselines, objective = _gain_rows({"cabs": 0.35, "yours": 0.34, "ta": 0.30}, noise=0.05)
    result = tn.comparison(objective, report, baselines)
    assert result["references"] == "redrawn"
    cabs, yours, ta = result["rows"]
    for row in result["rows"]:
        assert row["interval"][0] < row["heldout"] < row["interval"][1]
    # items spread by 2.5 nats: held fixed, the references made each interval about 0.92 wide, 23 times the
    # paired difference's 0.04; redrawn on the same items, a method's interval is within twice that
    assert _width(cabs["interval"]) < 2 * _width(ta["difference_interval"])
    assert _width(ta["interval"]) < 2 * _width(ta["difference_interval"])
    assert ta["cabs_better"] and not yours["cabs_better"] and not yours["baseline_better"]


def test_where_a_draw_leaves_a_model_no_better_than_the_base_there_is_no_per_method_interval():
    report, baselines, objective = _gain_rows({"cabs": 0.05, "yours": 0.04, "ta": 0.03}, noise=0.3, items=8,
                                              own_by=0.06)
    result = tn.comparison(objective, report, baselines)
    assert result["references"] == "fixed"
    assert [r["interval"] for r in result["rows"]] == [None, None, None]
    for row in result["rows"][1:]:
        lo, hi = row["difference_interval"]
        assert lo <= row["difference"] <= hi
    lines = compare.summary_lines(result, "gain")
    assert lines[2].split()[4] == "-" and lines[5].startswith("no per-method interval: on some draw a model")
    assert "| - |" in "\n".join(compare.markdown_lines(result, "gain"))


GB = 10**9


@pytest.mark.parametrize("asked, need, places, available, runs", [
    (None, 8 * GB, GB, 20 * GB, True),  # fits: on by default
    (None, 56 * GB, 7 * GB, 56 * GB, False),  # the store fits, the scoring on top of it does not
    (None, 56 * GB, 7 * GB, 40 * GB, False),  # a 7B, K = 3, on a 64 GB host with a 14 GB model held
    (None, 12 * GB, int(1.5 * GB), None, True),  # memory unknown: by size, up to 1.5B merged parameters
    (None, 16 * GB, 2 * GB, None, False),
    (True, 56 * GB, 7 * GB, 0, True),  # named: whatever it costs
    (False, 8, 1, 20 * GB, False),  # none, or one-lambda baselines named alone
])
def test_tuned_task_arithmetic_runs_by_default_only_where_its_store_fits(asked, need, places, available, runs):
    run, line = tn.tuned_decision(asked, need, places, available)
    assert run is runs
    assert (line is None) == (runs or asked is not None)
    if line:
        assert line.startswith(f"tune: task arithmetic tuned the same way was not run: it needs about "
                               f"{(need + 2**30) / GB:.1f} GB more memory (its store, {need / places:.1f} bytes per "
                               "merged parameter, and 1.1 GB to score), and ")
        assert line.endswith("; --baselines task_arithmetic_tuned runs it anyway")
        assert (f"and {available / GB:.1f} GB is available;" in line) if available else ("over 1.5B" in line)


def test_above_the_free_memory_tune_says_the_cost_in_one_line_and_runs_without_it(tune_family, tmp_path,
                                                                                   monkeypatch):
    from mergekit_cabs.tune import baselines

    monkeypatch.setattr(baselines, "available_memory", lambda device: 10**6)  # 1 MB free: nothing fits
    args = ["tune", str(tune_family["config"]), *map(str, _data_args(tune_family)), "--budget", "3",
            "--max-windows", "2", "--quiet"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "a" / "tune.json").read_text())
    need = report["memory"]["tuned_task_arithmetic_store_bytes"]
    assert need == 8 * report["supports"]["places"]  # bf16, three models and the base: 8 bytes per place
    line = (f"tune: task arithmetic tuned the same way was not run: it needs about {(need + 2**30) / GB:.1f} GB "
            "more memory (its store, 8.0 bytes per merged parameter, and 1.1 GB to score), and 0.0 GB is "
            "available; --baselines task_arithmetic_tuned runs it anyway")
    assert result.output.count(line) == 2  # when it happens, and in the summary
    assert report["search"]["notes"] == [line] and "baselines" not in report
    assert not (tmp_path / "a" / "task_arithmetic_tuned.yml").exists()
    assert line in (tmp_path / "a" / "tune.md").read_text()
    forced = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b"), "--baselines", "task_arithmetic_tuned"])
    assert forced.exit_code == 0, forced.output
    assert "was not run" not in forced.output
    report = json.loads((tmp_path / "b" / "tune.json").read_text())
    assert [r["name"] for r in report["baselines"]["runs"]] == ["task_arithmetic_tuned"]
    assert (tmp_path / "b" / "task_arithmetic_tuned.yml").exists()


def _with_lambda(family, tmp_path, lam):
    raw = {**family["raw"], "parameters": {**family["raw"]["parameters"], "lambda": lam}}
    path = tmp_path / f"cabs-lambda-{lam}.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_tuned_task_arithmetic_scores_at_least_its_one_lambda_best_when_the_config_lambda_is_far_from_it(
        tune_family, tmp_path):
    """The config's lambda (2, the upper bound) is far from task
    arithmetic's best one lambda: the tuned search starts from the best
    one-lambda point, so on the fit data it ends at least where one-lambda
    task arithmetic does (within the rounding between mergekit's merge at
    lambda 1 rescaled and the store's direct sum, both in bf16)."""
    prep = tn.prepare(_with_lambda(tune_family, tmp_path, 2.0),
                      [f"{k}={v}" for k, v in tune_family["data"].items()], max_windows=4)
    report = tn.run_tune(prep, budget=30, quiet=True, baselines="task_arithmetic_tuned,task_arithmetic")
    runs = {r["name"]: r for r in report["baselines"]["runs"]}
    tuned, one = runs["task_arithmetic_tuned"], runs["task_arithmetic"]
    assert one["lambda"] < 0.5  # far from the config's 2
    assert tuned["began"]["from"] == "one lambda" and tuned["began"]["lambda"] < 0.5
    assert tuned["fit"]["score"] >= one["fit"]["score"] - 1e-3
    assert tuned["evaluations"] <= 30 and report["search"]["evaluations"] <= 30  # the budgets stay equal
    assert report["search"]["began"]["from"] == "one lambda"  # cabs by the same rule


def test_a_search_that_ends_on_a_bound_says_which_in_the_table(tune_family, tmp_path):
    out = tmp_path / "out"
    config = _with_lambda(tune_family, tmp_path, 0.05)  # inside the bounds: they are not widened
    result = CliRunner().invoke(main, ["tune", str(config), *map(str, _data_args(tune_family)),
                                       "--out", str(out), "--budget", "9", "--max-windows", "2",
                                       "--lambda-bounds", "0.05,0.1", "--baselines", "task_arithmetic_tuned",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "tune.json").read_text())
    tuned = report["baselines"]["runs"][0]
    assert tuned["lambda"] == 0.1 and {"name": "lambda", "value": 0.1, "bound": "upper",
                                       "option": "--lambda-bounds", "bounds": [0.05, 0.1]} in tuned["on_bounds"]
    line = next(x for x in result.output.splitlines() if x.startswith("task_arithmetic (tuned) ended on a bound"))
    assert "lambda 0.1 (upper end of --lambda-bounds 0.05,0.1)" in line
    assert f"- {line}" in (out / "tune.md").read_text()


@pytest.mark.parametrize("line_from, expected_from", [(1.0, "one lambda"), (0.05, "your config")])
def test_optimise_starts_from_the_better_of_the_start_and_the_lambda_line(line_from, expected_from):
    """A bowl with its best lambda at 1 and weights at 0.5: the line from
    lambda 1 beats the start (lambda 0.05); a line from the start's own
    lambda finds the same point the start had, so the search begins there."""
    from mergekit_cabs.tune.search import optimise

    calls = []

    def bowl(x):
        calls.append(x)
        return -((x[0] - 1.0) ** 2) - sum((w - 0.5) ** 2 for w in x[1:])

    result = optimise("coordinate", bowl, (0.05, 0.5, 0.5), [(0.05, 2.0), (0.0, 2.0), (0.0, 2.0)], budget=30,
                      tolerance=0.05, seed=0, line_from=line_from)
    assert len(calls) == len(set(calls)) == len(result.history) <= 30  # each point once, all counted
    assert result.history[0][0] == (0.05, 0.5, 0.5)
    began_from = "one lambda" if result.began != (0.05, 0.5, 0.5) else "your config"
    assert began_from == expected_from or line_from == 0.05
    assert abs(result.best[0] - 1.0) < 0.05
