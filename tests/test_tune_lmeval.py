"""`tune --lm-eval`: an lm-eval task scored on the live model, offline, on a
local task (a YAML with `dataset_path: json` and local `data_files`)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner

from mergekit_cabs import tune as tn
from mergekit_cabs.cli import main

from tiny_models import make_tiny_llama, optional


@pytest.fixture(scope="module")
def lm_family(tmp_path_factory):
    """A float32 base, two fine-tunes, a cabs YAML, a text and a
    multiple-choice file, and a local lm-eval task of 12 documents."""
    root = tmp_path_factory.mktemp("lmeval")
    base = make_tiny_llama(root / "base", seed=5, layers=2)
    tunes = [make_tiny_llama(root / f"ft{i}", seed=50 + i, base=base, scale=3) for i in range(2)]
    gen = torch.Generator().manual_seed(1)

    def words(count: int) -> str:
        return " ".join(f"w{int(n)}" for n in 4 + torch.randint(0, 70, (count,), generator=gen))

    text = root / "ft0.txt"
    text.write_text(words(200))
    choice = root / "ft1.jsonl"
    choice.write_text("".join(json.dumps({"question": words(3), "choices": [words(1), words(2)], "answer": i % 2})
                              + "\n" for i in range(6)))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text("".join(
        json.dumps({"q": words(3), "choices": [words(1), words(1), words(1)], "label": i % 3}) + "\n"
        for i in range(12)))
    (tasks / "tiny_mc.yaml").write_text(yaml.safe_dump({
        "task": "tiny_mc", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tasks / "docs.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}))
    raw = {"merge_method": "cabs", "base_model": str(base.path),
           "models": [{"model": str(t.path), "parameters": {"weight": 1.0, "density": 0.25}} for t in tunes],
           "parameters": {"block_size": 64, "lambda": 1.0}, "dtype": "float32"}
    config = root / "cabs.yml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return {"config": config, "data": [f"ft0={text}", f"ft1={choice}"], "tasks": tasks}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if "datasets" in sys.modules:
        monkeypatch.setattr(sys.modules["datasets"].config, "HF_DATASETS_OFFLINE", True)


def test_lm_eval_without_the_extra_is_one_line_naming_it(lm_family, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(tn.TuneError) as error:
        tn.prepare(lm_family["config"], lm_family["data"], lm_eval=["tiny_mc"])
    assert str(error.value) == ('--lm-eval needs the lm-eval package: pip install ".[lm-eval]" in a clone of '
                                 'mergekit-cabs ("mergekit-cabs[lm-eval]" once on PyPI)')


def test_lm_eval_task_beside_text_and_choice_reports_the_values_of_the_model_mergekit_writes(
        lm_family, tmp_path, offline):
    optional("lm_eval", '".[lm-eval]"')
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    out = tmp_path / "out"
    args = ["tune", str(lm_family["config"]), *[x for d in lm_family["data"] for x in ("--data", d)],
            "--lm-eval", "tiny_mc:acc_norm", "--lm-eval-include", str(lm_family["tasks"]), "--lm-eval-limit", "5",
            "--objective", "loss", "--budget", "5", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "tune.json").read_text())
    info = report["data"]["tiny_mc"]
    assert (info["kind"], info["measure"], info["lower_is_better"]) == ("lm-eval", "acc_norm,none", False)
    assert (info["fit_items"], info["heldout_items"], info["documents"]) == (5, 5, 12)
    assert set(report["reference"]["best_of"]["tiny_mc"].values()) <= {"ft0", "ft1"}
    assert "tiny_mc (lm-eval)" in result.output and "acc_norm,none (^)" in result.output
    best = report["best"]
    # the objective counts the higher-is-better accuracy negative beside the two losses
    assert best["fit"]["score"] == pytest.approx(
        -(best["fit"]["loss"]["ft0"] + best["fit"]["loss"]["ft1"] - best["fit"]["loss"]["tiny_mc"]) / 3)

    tuned = yaml.safe_load((out / "tuned.yml").read_text())
    run_merge(MergeConfiguration.model_validate(tuned), str(tmp_path / "merged"), MergeOptions(quiet=True))
    model = tn.load_model(str(tmp_path / "merged"), "cpu")
    prep = tn.prepare(lm_family["config"], lm_family["data"], lm_eval=["tiny_mc:acc_norm"],
                      lm_eval_include=lm_family["tasks"], lm_eval_limit=5)
    for task in prep.tasks:
        for split in tn.SPLITS:
            scored = task.score(model, split, tn.DEFAULTS["batch_size"])[task.measure]
            assert scored.tolist() == best[split]["window_losses"][task.name], (task.name, split)
            assert float(scored.mean()) == best[split]["loss"][task.name]


def test_lm_eval_bad_task_and_metric_are_one_line(lm_family, offline):
    optional("lm_eval", '".[lm-eval]"')
    with pytest.raises(tn.TuneError, match="tune needs a metric lm-eval averages over documents; tiny_mc has acc, "
                                           "acc_norm"):
        tn.prepare(lm_family["config"], lm_family["data"], lm_eval=["tiny_mc:f1"], lm_eval_include=lm_family["tasks"])
    with pytest.raises(tn.TuneError, match="lm-eval cannot load task 'no_such_task'"):
        tn.prepare(lm_family["config"], lm_family["data"], lm_eval=["no_such_task"])


def test_lm_eval_alone_scores_every_fine_tune_and_keeps_lm_evals_output_off_the_terminal(lm_family, offline, capfd):
    optional("lm_eval", '".[lm-eval]"')
    prep = tn.prepare(lm_family["config"], [], lm_eval=["tiny_mc"], lm_eval_include=lm_family["tasks"],
                      lm_eval_limit=3)
    assert [(t.name, t.kind, t.measure) for t in prep.tasks] == [("tiny_mc", "lm-eval", "acc,none")]
    capfd.readouterr()
    report = tn.run_tune(prep, budget=2, objective="loss", quiet=True)
    shared = report["reference"]["measures"]["shared"]["tiny_mc"]
    assert set(shared) == {"ft0", "ft1"}
    best = report["reference"]["best_of"]["tiny_mc"]["heldout"]
    assert report["reference"]["models"]["tiny_mc"]["heldout"] == max(v["heldout"]["acc,none"] for v in shared.values())
    assert shared[best]["heldout"]["acc,none"] == report["reference"]["models"]["tiny_mc"]["heldout"]
    printed = capfd.readouterr()
    assert "loglikelihood" not in printed.err and "pretrained" not in printed.err, printed.err[-500:]
