"""The data `tune` scores on, on top of the kinds: which kind each --data
file is, loading it as that kind, matching each file to its model, and
scoring every task on a split.

Every kind of task (`text.TaskData`; `chat.ChatTask`, `choice.ChoiceTask`,
`lmeval.LmEvalTask`) offers the same few things, so the objective, the
fit/held-out split, the report and the exactness check treat them alike:
`name`, `path`, `kind`, `measure` (the name of the value the objective
uses), `lower_is_better`, `weight` (in the objective), `count(split)`
(items: windows, rows, questions, documents), `describe()` (for the report)
and `score(model, split, batch_size)`: per measure, one float64 value per
item of the split, the objective's `measure` first; the task's value is its
items' mean."""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import torch

from mergekit_cabs.tune.chat import load_chat_task
from mergekit_cabs.tune.choice import load_choice_task
from mergekit_cabs.tune.options import GENERAL, TuneError
from mergekit_cabs.tune.rows import file_kind
from mergekit_cabs.tune.text import load_task_data

SPECIAL_FILES = ((stat.S_ISFIFO, "a fifo (named pipe)"), (stat.S_ISSOCK, "a socket"),
                 (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def check_file(path: Path, name: str) -> None:
    """A --data or --general file exists and is a regular file (tune reads it
    more than once: a fifo's text would be gone after the first read)."""
    if path.is_dir():
        raise TuneError(f"data file {path} (for '{name}') is a directory; give one file: a text file, or a "
                        ".jsonl file with one example per line (text, prompt/response, messages or multiple choice)")
    if path.exists() and not path.is_file():
        mode = path.stat().st_mode
        what = next((words for test, words in SPECIAL_FILES if test(mode)), "a special file")
        raise TuneError(f"data file {path} (for '{name}') is {what}, not a regular file; tune reads its data "
                        "more than once: give a text file or a .jsonl file")
    if not path.is_file():
        raise TuneError(f"data file {path} (for '{name}') does not exist")


def load_tasks(labels: Sequence[str], files: Sequence[Path], general: Path | None, tokenizer, *, window: int,
               fit_fraction: float, max_windows: int, weights: Sequence[float] | None = None,
               template=None, choice_template=None) -> list:
    """One data set per fine-tune (under its label), of the kind its file
    holds, then the general set (text) if given.  `template`: the chat
    template for prompt/response and messages rows (`chat.Template`);
    `choice_template`: the one multiple-choice questions go under (None:
    none, lm-eval's default)."""
    named = list(zip(labels, files)) + ([(GENERAL, Path(general))] if general is not None else [])
    weights = list(weights or [1.0] * len(labels)) + [1.0]
    for name, path in named:
        check_file(path, name)
    tasks = []
    for (name, path), weight in zip(named, weights):
        kind = file_kind(path)
        if name == GENERAL and kind != "text":
            raise TuneError(f"--general {path}: its first line is a {kind} row; --general takes text "
                            "(a text file, or JSONL with a 'text' field per line)")
        sizes = {"window": window, "fit_fraction": fit_fraction}
        if kind == "text":
            task = load_task_data(name, path, tokenizer, max_windows=max_windows, **sizes)
            task.weight = weight
        elif kind == "choice":
            task = load_choice_task(name, path, tokenizer, choice_template, max_rows=max_windows, weight=weight,
                                    **sizes)
        else:
            task = load_chat_task(name, path, kind, tokenizer, template, max_rows=max_windows, weight=weight,
                                  **sizes)
        tasks.append(task)
    return tasks


# --- which file is whose ------------------------------------------------------------


def model_names(finetunes) -> dict[str, list[int]]:
    """Every name a --data MODEL may use: as the YAML writes it, or the directory's name."""
    names: dict[str, list[int]] = {}
    for i, ref in enumerate(finetunes):
        for name in {str(ref), str(ref.model.path), os.path.basename(str(ref.model.path).rstrip("/\\"))}:
            names.setdefault(name, []).append(i)
    return names


def data_weight(item: str, file: str) -> tuple[str, float]:
    """FILE@W: the file and its weight in the objective (FILE alone: 1)."""
    path, sep, weight = file.rpartition("@")
    if not sep:
        return file, 1.0
    try:
        value = float(weight)
    except ValueError:
        return file, 1.0  # an @ in the file's name
    if not (math.isfinite(value) and value > 0):
        raise TuneError(f"--data {item!r}: the weight after @ is {weight}; it must be a number > 0")
    return path, value


def match_data(finetunes, data: Sequence[str]) -> tuple[list[Path], list[float]]:
    """One data file per fine-tuned model, and its weight in the objective, from MODEL=FILE[@W] arguments."""
    names = model_names(finetunes)
    files: dict[int, tuple[Path, float]] = {}
    for item in data:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise TuneError(f"--data {item!r}: write MODEL=FILE (or MODEL=FILE@WEIGHT)")
        hits = names.get(name)
        if not hits:
            known = ", ".join(sorted({os.path.basename(str(r.model.path).rstrip('/')) for r in finetunes}))
            raise TuneError(f"--data {item!r}: no fine-tuned model is called '{name}' (models: {known})")
        if len(hits) > 1:
            raise TuneError(f"--data {item!r}: '{name}' names several models; use the path the YAML writes")
        if hits[0] in files:
            raise TuneError(f"--data gives two files for model '{finetunes[hits[0]]}'")
        file, weight = data_weight(item, file)
        files[hits[0]] = (Path(file), weight)
    missing = [str(finetunes[i]) for i in range(len(finetunes)) if i not in files]
    if missing:
        raise TuneError(
            f"no --data for model(s) {', '.join(missing)}; tune needs MODEL=FILE for every fine-tuned model"
        )
    return [files[i][0] for i in range(len(finetunes))], [files[i][1] for i in range(len(finetunes))]


# --- scoring ------------------------------------------------------------------------

def task_scores(model, tasks: Sequence, split: str, batch_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """Every task's measures on its `split` ("fit" or "heldout"): per task, per measure, one value per item."""
    return {t.name: t.score(model, split, batch_size) for t in tasks}


def task_losses(model, tasks: Sequence, split: str, batch_size: int) -> dict[str, torch.Tensor]:
    """Every task's objective measure on its `split`, per item (text: `window_losses`), by name."""
    return {t.name: t.score(model, split, batch_size)[t.measure] for t in tasks}


