"""`tune` on prompt/response, chat and multiple-choice data, on tiny models.

* Rows are read and checked by kind; a bad row is one line naming its file and line.
* The loss counts the response / assistant tokens only; long rows are cut
  from the left of the prompt, or on the right through a response longer
  than the window, and the summary says which; padding does not change a
  row's loss.
* Duplicate choices are a warning; a file where no question has two
  different choices is refused.
* Multiple choice is scored as lm-eval scores it, checked against a direct
  computation; the values tune reports for each kind are those of the model
  `mergekit-yaml tuned.yml` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_tune_command
import torch
import yaml
from click.testing import CliRunner

from mergekit_cabs import tune as tn
from mergekit_cabs.cli import main
from mergekit_cabs.tune.chat import Template, encode_row, fit_window, load_chat_task
from mergekit_cabs.tune.choice import load_choice_task

from tiny_models import default_words, make_tiny_llama, make_tokenizer
from tiny_models import word_text as _w
from tiny_models import write_jsonl as _jsonl

no_model_loading = test_tune_command.no_model_loading  # the fixture: loading a model fails the test

# A template over the tiny vocabulary: w1 opens a user turn, w2 an assistant turn, w3 ends a turn.
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}w1 {% else %}w2 {% endif %}{{ m['content'] }} w3 "
            "{% endfor %}{% if add_generation_prompt %}w2 {% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(default_words(77))


@pytest.fixture(scope="module")
def kinds_family(tmp_path_factory):
    """A float32 base (no chat template), two fine-tunes (ft0's tokenizer has
    TEMPLATE), a cabs YAML, and a chat file, a multiple-choice file and a text."""
    root = tmp_path_factory.mktemp("kinds")
    base = make_tiny_llama(root / "base", seed=3, layers=2)
    tunes = [make_tiny_llama(root / f"ft{i}", seed=30 + i, base=base, scale=3) for i in range(2)]
    config = json.loads((tunes[0].path / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (tunes[0].path / "tokenizer_config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)

    def words(count: int) -> str:
        return _w(*(4 + torch.randint(0, 70, (count,), generator=gen)).tolist())

    chat = _jsonl(root / "chat.jsonl", [
        {"messages": [{"role": "user", "content": words(3 + i % 5)}, {"role": "assistant", "content": words(2 + i % 4)},
                      *([{"role": "user", "content": words(2)}, {"role": "assistant", "content": words(3)}]
                        if i % 3 == 0 else [])]} for i in range(10)])
    choice = _jsonl(root / "choice.jsonl", [
        {"question": words(4 + i % 3), "choices": [words(1 + (i + j) % 3) for j in range(3 + i % 2)],
         "answer": i % 3} for i in range(10)])
    general = root / "general.txt"
    general.write_text(words(300))
    raw = {"merge_method": "cabs", "base_model": str(base.path),
           "models": [{"model": str(t.path), "parameters": {"weight": 1.0, "density": 0.25}} for t in tunes],
           "parameters": {"block_size": 64, "lambda": 1.0}, "dtype": "float32"}
    path = root / "cabs.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return {"base": base, "tunes": tunes, "chat": chat, "choice": choice, "general": general, "config": path}


# --- reading and checking rows -------------------------------------------------------------


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "w5", "response": "w6"}, {"messages": [{"role": "assistant", "content": "w5"}]}],
     "line 2 is a messages row, but line 1 is a prompt row: one kind of row per file"),
    ([{"question": "w5", "choices": ["w6", "w7"], "answer": 0}, {"text": "w5"}],
     "line 2 is a text row, but line 1 is a choice row"),
    ([{"prompt": "w5"}], "line 1: a prompt/response row needs a string 'prompt' and a non-empty string 'response'"),
    ([{"messages": [{"role": "user", "content": "w5"}]}], "line 1: no message has role 'assistant'"),
    ([{"messages": [{"role": "user"}]}], "line 1: 'messages' must be a non-empty list"),
    ([{"question": "w5", "choices": ["w6", "w7"], "answer": 1}, {"question": "w5", "choices": ["w6"], "answer": 0}],
     "line 2: 1 choice(s); a multiple-choice question needs at least 2"),
    ([{"question": "w5", "choices": ["w6", "w7"], "answer": 2}],
     "line 1: 'answer' is 2; it must be the index of the right choice, 0 to 1"),
    ([{"choices": ["w6", "w7"], "answer": 0}], "line 1: a multiple-choice row needs a string 'question'"),
])
def test_a_bad_row_is_one_line_naming_the_file_and_line(tmp_path, tokenizer, rows, message):
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(tn.TuneError) as error:
        tn.load_tasks(["m"], [path], None, tokenizer, window=32, fit_fraction=0.5, max_windows=8,
                      template=Template(TEMPLATE, "t"))
    assert str(error.value).startswith(str(path)) and message in str(error.value)
    assert "\n" not in str(error.value)


def test_messages_without_any_template_name_the_option(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "w5"},
                                                       {"role": "assistant", "content": "w6"}]}] * 2)
    with pytest.raises(tn.TuneError, match="has no chat template: give --chat-template MODEL"):
        tn.load_tasks(["m"], [path], None, tokenizer, window=32, fit_fraction=0.5, max_windows=8,
                      template=Template(None, "the base model's (b)"))


def test_a_directory_given_as_data_is_named_a_directory(tmp_path, tokenizer):
    with pytest.raises(tn.TuneError, match=r"is a directory; give one file: a text file, or a \.jsonl file"):
        tn.load_tasks(["m"], [tmp_path], None, tokenizer, window=32, fit_fraction=0.5, max_windows=8)


def test_data_weight_is_read_after_an_at_sign(kinds_family):
    from mergekit_cabs import planning

    tunes = planning.fine_tunes(planning.plan(planning.load_config(kinds_family["config"], "tune")))
    files, weights = tn.match_data(tunes, ["ft0=a.jsonl@2.5", "ft1=b@c.txt"])
    assert files == [Path("a.jsonl"), Path("b@c.txt")] and weights == [2.5, 1.0]
    with pytest.raises(tn.TuneError, match="the weight after @ is -1; it must be a number > 0"):
        tn.match_data(tunes, ["ft0=a.jsonl@-1", "ft1=b.txt"])


# --- which tokens count ---------------------------------------------------------------------


def test_only_assistant_tokens_count_in_a_two_turn_chat(tokenizer):
    row = {"messages": [{"role": "user", "content": _w(5, 6)}, {"role": "assistant", "content": _w(7, 8, 9)},
                        {"role": "user", "content": _w(10)}, {"role": "assistant", "content": _w(11)}]}
    ids, counted = encode_row(tokenizer, TEMPLATE, "messages", row, "x")
    # w1 w5 w6 w3 | w2 w7 w8 w9 w3 | w1 w10 w3 | w2 w11 w3: each assistant turn's content and its w3 count
    assert ids == [tokenizer.convert_tokens_to_ids(t) for t in
                   ["w1", "w5", "w6", "w3", "w2", "w7", "w8", "w9", "w3", "w1", "w10", "w3", "w2", "w11", "w3"]]
    assert counted.nonzero().flatten().tolist() == [5, 6, 7, 8, 13, 14]
    cut, flags, was_cut = fit_window(ids, counted, 6)  # 15 tokens into 6: one token before the first counted
    assert was_cut == "right" and cut == ids[4:10] and flags.nonzero().flatten().tolist() == [1, 2, 3, 4]


def test_prompt_response_without_template_joins_plain_text_and_cuts_the_prompt_on_the_left(tokenizer):
    ids, counted = encode_row(tokenizer, None, "prompt", {"prompt": _w(5, 6, 7, 8, 9, 10), "response": _w(11, 12)}, "x")
    assert len(ids) == 8 and counted.tolist() == [False] * 6 + [True] * 2
    cut, flags, was_cut = fit_window(ids, counted, 4)
    assert was_cut == "left" and cut == ids[4:] and flags.tolist() == [False, False, True, True]
    same, _, was_cut = fit_window(ids, counted, 8)
    assert same == ids and was_cut is None


def test_padding_does_not_change_a_rows_loss(kinds_family, tmp_path):
    """Rows of 3 to 16 tokens scored 4 to a batch (right-padded) and one at a
    time: the same to 1e-6 (float32 matrix products block differently by
    shape; causal attention keeps the padding out of every real token)."""
    from transformers import AutoTokenizer

    model = tn.load_model(str(kinds_family["tunes"][0].path), "cpu")
    tok = AutoTokenizer.from_pretrained(kinds_family["base"].path)
    task = load_chat_task("c", kinds_family["chat"], "messages", tok, Template(TEMPLATE, "t"), window=64,
                          fit_fraction=0.5, max_rows=8)
    lengths = {len(ids) for ids, _ in task.items["fit"]}
    assert len(lengths) > 2  # the batch mixes lengths
    batched = task.score(model, "fit", 4)["response loss"]
    alone = task.score(model, "fit", 1)["response loss"]
    assert torch.allclose(batched, alone, rtol=1e-6, atol=0)
    counted = [c for _, c in task.items["fit"]]
    direct = []
    for (ids, c) in task.items["fit"]:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        direct.append(-lp[c[1:]].mean())
    assert torch.allclose(alone, torch.stack(direct), rtol=1e-5) and len(counted) == len(direct)


# --- multiple choice ------------------------------------------------------------------------


def test_multiple_choice_matches_a_direct_loglikelihood_computation(kinds_family):
    """Each choice scored as ' choice' after the question (lm-eval's
    delimiter), one unpadded sequence at a time, by hand."""
    from transformers import AutoTokenizer

    model = tn.load_model(str(kinds_family["tunes"][1].path), "cpu")
    tok = AutoTokenizer.from_pretrained(kinds_family["base"].path)
    task = load_choice_task("q", kinds_family["choice"], tok, None, window=64, fit_fraction=0.5, max_rows=8)
    got = task.score(model, "heldout", 4)
    rows = [json.loads(x) for x in kinds_family["choice"].read_text().splitlines()]
    heldout = [rows[i] for i in range(1, 10, 2)]  # every other row, at --fit-fraction 0.5
    expect = {"choice loss": [], "acc": [], "acc_norm": []}
    for row in heldout:
        lls = []
        for choice in row["choices"]:
            context = tok(row["question"])["input_ids"]
            whole = tok(row["question"] + " " + choice)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([whole])).logits[0].double()
            lp = torch.log_softmax(logits, -1)
            lls.append(sum(float(lp[p - 1, whole[p]]) for p in range(len(context), len(whole))))
        lls = torch.tensor(lls, dtype=torch.float64)
        expect["choice loss"].append(float(torch.logsumexp(lls, 0) - lls[row["answer"]]))
        expect["acc"].append(float(int(torch.argmax(lls)) == row["answer"]))
        chars = torch.tensor([len(c) for c in row["choices"]], dtype=torch.float64)
        expect["acc_norm"].append(float(int(torch.argmax(lls / chars)) == row["answer"]))
    assert torch.allclose(got["choice loss"], torch.tensor(expect["choice loss"], dtype=torch.float64), atol=1e-5)
    assert got["acc"].tolist() == expect["acc"] and got["acc_norm"].tolist() == expect["acc_norm"]
    assert task.describe()["choices"]["heldout"] == sum(len(r["choices"]) for r in heldout)


# --- end to end: mixed kinds, and the values are those of the model mergekit writes ------------


def test_mixed_kinds_report_each_kinds_values_of_the_model_mergekit_writes(kinds_family, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    out = tmp_path / "out"
    data = [f"ft0={kinds_family['chat']}@2", f"ft1={kinds_family['choice']}"]
    result = CliRunner().invoke(main, ["tune", str(kinds_family["config"]), "--data", data[0], "--data", data[1],
                                       "--general", str(kinds_family["general"]), "--chat-template", "ft0",
                                       "--objective", "loss", "--budget", "6", "--out", str(out), "--quiet"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "tune.json").read_text())
    assert {k: (v["kind"], v["measure"], v["weight"]) for k, v in report["data"].items()} == {
        "ft0": ("chat", "response loss", 2.0), "ft1": ("choice", "choice loss", 1.0),
        "general": ("text", "loss", 1.0)}
    assert "ft0 (chat)" in result.output and "acc_norm (^)" in result.output
    assert "of ft0's response loss x 2, ft1's choice loss" in result.output
    best = report["best"]
    assert best["fit"]["score"] == pytest.approx(
        -(2 * best["fit"]["loss"]["ft0"] + best["fit"]["loss"]["ft1"]) / 3 - best["fit"]["loss"]["general"])

    tuned = yaml.safe_load((out / "tuned.yml").read_text())
    run_merge(MergeConfiguration.model_validate(tuned), str(tmp_path / "merged"), MergeOptions(quiet=True))
    model = tn.load_model(str(tmp_path / "merged"), "cpu")
    prep = tn.prepare(kinds_family["config"], data, general=kinds_family["general"], chat_template="ft0")
    for task in prep.tasks:
        for split in tn.SPLITS:
            scored = task.score(model, split, tn.DEFAULTS["batch_size"])
            assert scored[task.measure].tolist() == best[split]["window_losses"][task.name], (task.name, split)
            assert {m: float(v.mean()) for m, v in scored.items()} == best[split]["measures"][task.name]


def test_a_question_under_a_chat_template_is_the_users_message_with_no_delimiter(tokenizer):
    from mergekit_cabs.tune.choice import make_question

    row = {"question": _w(5, 6), "choices": [_w(7), _w(8, 9)], "answer": 1}
    question, cut = make_question(tokenizer, TEMPLATE, row, 64, "x")
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ["w1", "w5", "w6", "w3", "w2", "w7", "w8", "w9"]]
    assert question.sequences == [ids[:6], ids[:5] + ids[6:]] and question.continuation == [1, 2] and not cut
    plain, _ = make_question(tokenizer, None, row, 4, "x")  # "w5 w6 w8 w9" fits 4; no template, no specials
    assert plain.sequences == [ids[1:3] + ids[5:6], ids[1:3] + ids[6:]] and plain.lengths == [2, 5]


def test_the_summary_counts_rows_cut_to_the_window():
    from mergekit_cabs.tune.report import truncation_lines

    report = {"data": {"a": {"truncated_rows": 3, "truncation": "from the left of the prompt", "window": 64},
                       "b": {"truncated_questions": 0, "window": 64}}}
    assert truncation_lines(report) == [
        "a: 3 scored rows longer than --window 64 were cut (from the left of the prompt)"]


def test_a_row_whose_response_is_cut_on_the_right_is_said_so_not_cut_from_the_prompt(tmp_path, tokenizer):
    from mergekit_cabs.tune.report import truncation_lines

    # no template: prompt, response; 6 tokens fit: rows 1-3 lose prompt words on the left, row 4's response is longer
    path = _jsonl(tmp_path / "pr.jsonl", [{"prompt": _w(5, 6, 7, 8, 9), "response": _w(10, 11)}] * 3
                  + [{"prompt": _w(5), "response": _w(*range(10, 20))}])
    kw = {"window": 6, "fit_fraction": 0.5, "max_rows": 8}
    task = load_chat_task("m", path, "prompt", tokenizer, Template(None, "none"), **kw)
    assert (task.truncated, task.cut_right) == (4, 1)
    assert task.describe()["truncation"] == (
        "3 from the left of the prompt; 1 on the right, through the response: its end is not scored")
    assert truncation_lines({"data": {"m": task.describe()}}) == [
        "m: 4 scored rows longer than --window 6 were cut (3 from the left of the prompt; 1 on the right, through the "
        "response: its end is not scored)"]
    right = load_chat_task("m", _jsonl(tmp_path / "r.jsonl", [{"prompt": _w(5), "response": _w(*range(10, 20))}] * 2),
                           "prompt", tokenizer, Template(None, "none"), **kw)
    assert truncation_lines({"data": {"m": right.describe()}}) == [
        "m: 2 scored rows longer than --window 6 were cut (on the right, through the response: its end is not scored)"]
    whole = load_chat_task("m", path, "prompt", tokenizer, Template(None, "none"), **dict(kw, window=64))
    assert whole.truncated == 0 and "truncation" not in whole.describe()


def test_a_question_cut_to_the_window_is_said_to_be_cut_from_the_left_of_the_question(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "c.jsonl", [{"question": _w(*range(5, 15)), "choices": [_w(20), _w(21)], "answer": 0}] * 2)
    task = load_choice_task("m", path, tokenizer, None, window=4, fit_fraction=0.5, max_rows=8)
    assert task.describe()["truncated_questions"] == 2
    assert task.describe()["truncation"] == "from the left of the question"


# --- duplicate choices ----------------------------------------------------------------------


def test_duplicate_choices_are_a_warning_with_their_count_and_first_line(tmp_path, tokenizer, capsys):
    path = _jsonl(tmp_path / "c.jsonl", [
        {"question": _w(5), "choices": [_w(6), _w(7)], "answer": 0},
        {"question": _w(5), "choices": [_w(6), _w(7), _w(6)], "answer": 1},
        {"question": _w(8), "choices": [_w(9), _w(9)], "answer": 0},
        {"question": _w(8), "choices": [_w(9), _w(10)], "answer": 1}])
    task = load_choice_task("m", path, tokenizer, None, window=32, fit_fraction=0.5, max_rows=8)
    assert task.rows == 4
    assert capsys.readouterr().err.splitlines() == [
        f"tune: {path}: 2 question(s) list the same choice twice (first: line 2); identical choices score alike "
        "and cannot be told apart"]
    load_choice_task("m", _jsonl(tmp_path / "ok.jsonl", [{"question": _w(5), "choices": [_w(6), _w(7)], "answer": 0}]
                                 * 2), tokenizer, None, window=32, fit_fraction=0.5, max_rows=8)
    assert capsys.readouterr().err == ""


def test_a_choice_file_where_no_question_has_two_different_choices_is_refused_before_loading_a_model(
        kinds_family, tmp_path, no_model_loading):
    path = _jsonl(tmp_path / "same.jsonl", [{"question": _w(5 + i), "choices": [_w(6)] * 3, "answer": i % 3}
                                            for i in range(6)])
    result = CliRunner().invoke(main, ["tune", str(kinds_family["config"]), "--data", f"ft0={kinds_family['chat']}",
                                       "--data", f"ft1={path}", "--chat-template", "ft0", "--out",
                                       str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 1 and not (tmp_path / "out").exists()
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {path}: every question's choices are all the same text, so no model can score better than another "
        "on them; give each question different choices")


def test_baselines_on_chat_and_choice_data_are_compared_over_items_and_score_what_mergekit_writes(kinds_family,
                                                                                                   tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    out = tmp_path / "out"
    data = [f"ft0={kinds_family['chat']}@2", f"ft1={kinds_family['choice']}"]
    result = CliRunner().invoke(main, ["tune", str(kinds_family["config"]), "--data", data[0], "--data", data[1],
                                       "--general", str(kinds_family["general"]), "--chat-template", "ft0",
                                       "--objective", "loss", "--budget", "4", "--out", str(out), "--quiet",
                                       "--baselines", "task_arithmetic_tuned,ties"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "tune.json").read_text())
    header = next(line for line in result.output.splitlines() if "paired bootstrap" in line)
    assert header.endswith("95% paired bootstrap interval over items:")  # not "windows": rows and questions
    assert "ft0's response loss x 2, ft1's choice loss" in header  # the table names the measures
    assert "paired bootstrap over the held-out items" in (out / "tune.md").read_text()
    assert report["baselines"]["items"] == "items"
    runs = {r["name"]: r for r in report["baselines"]["runs"]}
    assert list(runs) == ["task_arithmetic_tuned", "ties"]
    prep = tn.prepare(kinds_family["config"], data, general=kinds_family["general"], chat_template="ft0")
    for name, run in runs.items():
        for task in prep.tasks:  # the bootstrap draws over these: one value per row, question or window
            assert len(run["heldout"]["window_losses"][task.name]) == task.count("heldout") > 1
        written = yaml.safe_load((out / f"{name}.yml").read_text())
        run_merge(MergeConfiguration.model_validate(written), str(tmp_path / name), MergeOptions(quiet=True))
        model = tn.load_model(str(tmp_path / name), "cpu")
        for task in prep.tasks:
            for split in tn.SPLITS:
                scored = task.score(model, split, tn.DEFAULTS["batch_size"])
                assert scored[task.measure].tolist() == run[split]["window_losses"][task.name], (name, task.name)
                assert {m: float(v.mean()) for m, v in scored.items()} == run[split]["measures"][task.name]
