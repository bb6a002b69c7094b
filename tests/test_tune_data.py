"""`mergekit-cabs tune`'s data: fit and held-out windows spread along the file;
a data path that is no regular file, a JSONL row of no known form and a
UTF-8 byte order mark (read as no text) are each said in one line, before
any model is loaded."""

from __future__ import annotations

import json
import os

import pytest
import test_tune_command
from click.testing import CliRunner

from mergekit_cabs import tune as tn
from mergekit_cabs.cli import main
from mergekit_cabs.tune.rows import ROW_FORMS

tune_family = test_tune_command.tune_family  # the fixture: a bf16 base, three fine-tunes, their texts
no_model_loading = test_tune_command.no_model_loading


class _CountingTokenizer:
    """Token i of the text is the number i: windows are easy to recognise."""

    eos_token_id = None

    def __call__(self, text, add_special_tokens=False, verbose=True):
        return {"input_ids": [int(w) for w in text.split()]}


@pytest.mark.parametrize("fraction, held", [(0.5, [1, 3, 5, 7, 9]), (0.7, [3, 6, 9]), (0.2, [1, 2, 3, 4, 6, 7, 8, 9])])
def test_split_spreads_held_out_windows_along_the_file(tmp_path, fraction, held):
    path = tmp_path / "d.txt"
    path.write_text(" ".join(str(i) for i in range(43)))  # 10 windows of 4, 3 tokens left over
    data = tn.load_task_data("d", path, _CountingTokenizer(), window=4, fit_fraction=fraction, max_windows=64)
    assert [int(w[0]) // 4 for w in data.heldout] == held
    assert sorted([int(w[0]) // 4 for w in data.fit] + held) == list(range(10))
    thinned = tn.load_task_data("d", path, _CountingTokenizer(), window=4, fit_fraction=0.5, max_windows=2)
    assert [int(w[0]) // 4 for w in thinned.fit] == [0, 8] and [int(w[0]) // 4 for w in thinned.heldout] == [1, 9]


def _refused(family, tmp_path, bad) -> list[str]:
    """The output lines of `tune` given `bad` as ft2's --data (which must fail before writing --out), less its
    `tune:` notes (a prompt/response file's, that there is no chat template)."""
    args = ["tune", str(family["config"]), "--data", f"ft0={family['data']['ft0']}",
            "--data", f"ft1={family['data']['ft1']}", "--data", f"ft2={bad}", "--out", str(tmp_path / "out"), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and not (tmp_path / "out").exists(), (result.output, result.exception)
    return [line for line in result.output.strip().splitlines() if not line.startswith("tune: ")]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no fifos here")
def test_a_fifo_given_as_data_is_named_as_not_a_regular_file(tune_family, tmp_path, no_model_loading):
    fifo = tmp_path / "math.txt"
    os.mkfifo(fifo)  # reading it would block until a writer came: the check must not open it
    assert _refused(tune_family, tmp_path, fifo) == [
        f"Error: data file {fifo} (for 'ft2') is a fifo (named pipe), not a regular file; tune reads its data "
        "more than once: give a text file or a .jsonl file"]


@pytest.mark.parametrize("line", ['{"foo": "bar"}', '[1, 2]', '"w1 w2"'])
@pytest.mark.parametrize("after", [None, '{"text": "w1 w2"}', '{"prompt": "w1", "response": "w2"}'])
def test_a_jsonl_row_of_no_known_form_is_one_line_listing_every_form(tune_family, tmp_path, no_model_loading, line,
                                                                     after):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(f"{row}\n" for row in ([after] if after else []) + [line]))
    number = 2 if after else 1
    assert _refused(tune_family, tmp_path, bad) == [
        f"Error: {bad} line {number} is none of the row forms: {'; '.join(ROW_FORMS.values())}"]


def test_a_text_rows_text_that_is_no_string_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "1 2 3"}\n{"text": 5}\n')
    with pytest.raises(tn.TuneError) as error:
        tn.load_tasks(["d"], [bad], None, _CountingTokenizer(), window=2, fit_fraction=0.5, max_windows=8)
    assert str(error.value) == f"{bad} line 2: 'text' is int; a text row needs a string 'text'"


BOM = "\ufeff".encode()


@pytest.mark.parametrize("name, content", [
    ("d.txt", " ".join(str(i) for i in range(12))),
    ("d.jsonl", "".join(json.dumps({"text": " ".join(str(i) for i in range(j, j + 4))}) + "\n" for j in (0, 4, 8))),
])
def test_a_utf8_byte_order_mark_is_read_as_no_text(tmp_path, name, content):
    plain, marked = tmp_path / "plain", tmp_path / "marked"
    plain.mkdir(), marked.mkdir()
    (plain / name).write_bytes(content.encode())
    (marked / name).write_bytes(BOM + content.encode())  # the counting tokenizer cannot read U+FEFF as a number
    kw = {"window": 2, "fit_fraction": 0.5, "max_windows": 8}
    want, got = (tn.load_tasks(["d"], [d / name], None, _CountingTokenizer(), **kw)[0] for d in (plain, marked))
    assert got.tokens == want.tokens == 12
    assert got.fit.tolist() == want.fit.tolist() and got.heldout.tolist() == want.heldout.tolist()


def test_a_byte_order_mark_before_a_jsonl_rows_first_line_is_no_json_error(tmp_path):
    from mergekit_cabs.tune.rows import file_kind, read_rows

    path = tmp_path / "chat.jsonl"
    rows = [{"prompt": "w1", "response": "w2"}, {"prompt": "w3", "response": "w4"}]
    path.write_bytes(BOM + "".join(json.dumps(r) + "\n" for r in rows).encode())
    assert file_kind(path) == "prompt" and read_rows(path, "prompt") == [(1, rows[0]), (2, rows[1])]
