"""`tune --lm-eval`: an lm-eval task scored on the live model, offline, on a
local task (a YAML with `dataset_path: json` and local `data_files`).  A
task whose data is missing or not JSON, or whose answer is not one of its
choices, is one line naming the task, before any model is loaded."""

from __future__ import annotations

import json
import sys

import pytest
import test_tune_command
import torch
import yaml
from click.testing import CliRunner

from mergekit_cabs import tune as tn
from mergekit_cabs.cli import main

from tiny_models import make_tiny_llama, optional

no_model_loading = test_tune_command.no_model_loading  # the fixture: loading a model fails the test


def write_task(directory, name: str, data) -> None:
    """A local multiple-choice task YAML in `directory` reading the JSONL file `data` (q, choices, label)."""
    (directory / f"{name}.yaml").write_text(yaml.safe_dump({
        "task": name, "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}))


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
    write_task(tasks, "tiny_mc", tasks / "docs.jsonl")
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
    best_items = report["reference"]["items"]["models"]["tiny_mc"]  # the best fine-tune's documents, per split
    assert [len(best_items[s]) for s in tn.SPLITS] == [3, 3]
    assert sum(best_items["heldout"]) / 3 == pytest.approx(report["reference"]["models"]["tiny_mc"]["heldout"])
    printed = capfd.readouterr()
    assert "loglikelihood" not in printed.err and "pretrained" not in printed.err, printed.err[-500:]


def test_the_gradient_search_with_an_lm_eval_task_is_one_line_before_any_model_loads(lm_family, offline,
                                                                                     monkeypatch):
    optional("lm_eval", '"mergekit-cabs[lm-eval]"')
    import transformers

    prep = tn.prepare(lm_family["config"], lm_family["data"], lm_eval=["tiny_mc"],
                      lm_eval_include=lm_family["tasks"])

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(tn.TuneError) as error:
        tn.run_tune(prep, optimizer="gradient", quiet=True)
    assert str(error.value) == ("tune: the lm-eval task 'tiny_mc' is not differentiable (lm-eval scores generated or "
                                "compared outputs); use --optimizer coordinate or --optimizer cmaes with lm-eval "
                                "tasks")
    assert tn.choose_optimizer("auto", 64, 60, differentiable=False) == "coordinate"  # auto leaves it out


# --- a task's data at fault: one line naming the task, before a model is loaded -----------------


def _docs(path, labels) -> None:
    path.write_text("".join(json.dumps({"q": f"w{5 + i}", "choices": ["w1", "w2", "w3"], "label": label}) + "\n"
                            for i, label in enumerate(labels)))


def _refused(lm_family, tmp_path, task: str) -> str:
    with pytest.raises(tn.TuneError) as error:
        tn.prepare(lm_family["config"], lm_family["data"], lm_eval=[task], lm_eval_include=tmp_path)
    return str(error.value)


def test_an_lm_eval_task_whose_data_file_is_missing_is_one_line_naming_the_task_and_file(
        lm_family, tmp_path, offline, no_model_loading):
    optional("lm_eval", '"mergekit-cabs[lm-eval]"')
    write_task(tmp_path, "gone_mc", tmp_path / "gone.jsonl")
    assert _refused(lm_family, tmp_path, "gone_mc") == (
        f"--lm-eval 'gone_mc': lm-eval cannot read the data of task 'gone_mc': Unable to find "
        f"'{tmp_path / 'gone.jsonl'}'")


def test_an_lm_eval_task_whose_data_is_not_json_is_one_line_naming_the_task(lm_family, tmp_path, offline,
                                                                           no_model_loading):
    optional("lm_eval", '"mergekit-cabs[lm-eval]"')
    (tmp_path / "broken.jsonl").write_text('{"q": "w5", "choices": ["w1", "w2"], "label": 0}\n{"q": \n')
    write_task(tmp_path, "broken_mc", tmp_path / "broken.jsonl")
    message = _refused(lm_family, tmp_path, "broken_mc")
    assert message.startswith("--lm-eval 'broken_mc': lm-eval cannot read the data of task 'broken_mc': An error "
                              "occurred while generating the dataset (") and "\n" not in message


def test_an_lm_eval_task_whose_first_answer_is_out_of_its_choices_is_one_line(lm_family, tmp_path, offline,
                                                                              no_model_loading):
    optional("lm_eval", '"mergekit-cabs[lm-eval]"')
    _docs(tmp_path / "docs.jsonl", [5] * 6)  # lm-eval indexes the first document's choices with it: IndexError
    write_task(tmp_path, "bad_mc", tmp_path / "docs.jsonl")
    assert _refused(lm_family, tmp_path, "bad_mc") == (
        "--lm-eval 'bad_mc': lm-eval fails on the first document of task 'bad_mc' (IndexError: list index out of "
        "range): is its answer (doc_to_target) outside its choices (doc_to_choice)?")


@pytest.mark.parametrize("bad", [3, -1])
def test_an_lm_eval_task_with_one_answer_out_of_its_choices_is_refused_naming_the_document(
        lm_family, tmp_path, offline, no_model_loading, bad):
    optional("lm_eval", '"mergekit-cabs[lm-eval]"')
    _docs(tmp_path / "docs.jsonl", [0, 1, 2, 0, bad, 1])  # lm-eval alone would score document 4 wrong, silently
    write_task(tmp_path, "one_bad_mc", tmp_path / "docs.jsonl")
    assert _refused(lm_family, tmp_path, "one_bad_mc") == (
        f"--lm-eval 'one_bad_mc': document 4 of task 'one_bad_mc' has answer {bad}, not one of its 3 choices "
        "(an index 0 to 2, or a choice's text); lm-eval would count it wrong whatever the model answers")
