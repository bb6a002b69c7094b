"""The data `tune` scores on: which kind each --data file is, matching each
file to its model, and the text kind itself (a text or JSONL `text` file cut
into fit and held-out windows, scored by each window's loss).

Every kind of task (`TaskData` here; `chat.ChatTask`, `choice.ChoiceTask`,
`lmeval.LmEvalTask`) offers the same few things, so the objective, the
fit/held-out split, the report and the exactness check treat them alike:
`name`, `path`, `kind`, `measure` (the name of the value the objective
uses), `lower_is_better`, `weight` (in the objective), `count(split)`
(items: windows, rows, questions, documents), `describe()` (for the report)
and `score(model, split, batch_size)`: per measure, one float64 value per
item of the split, the objective's `measure` first; the task's value is its
items' mean."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_cabs.tune.options import GENERAL, TuneError

SPLITS = ("fit", "heldout")


@dataclass
class TaskData:
    """One text data set, cut into windows of `window` tokens."""

    name: str
    path: str
    tokens: int
    fit: torch.Tensor  # [windows, window] token ids
    heldout: torch.Tensor
    weight: float = 1.0
    kind: str = "text"
    measure: str = "loss"
    lower_is_better: bool = True

    def count(self, split: str) -> int:
        return len(getattr(self, split))

    def describe(self) -> dict:
        return {"tokens": self.tokens, "window": int(self.fit.shape[1]), "fit_windows": len(self.fit),
                "heldout_windows": len(self.heldout)}

    def score(self, model, split: str, batch_size: int) -> dict[str, torch.Tensor]:
        return {self.measure: window_losses(model, getattr(self, split), batch_size)}


# --- reading and cutting a file -----------------------------------------------------


def read_texts(path: Path) -> list[str]:
    """The texts of a .jsonl file (a `text` field per line) or of a plain file."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TuneError(f"cannot read data file {path}: {error}") from None
    texts = _jsonl_texts(path, raw) if str(path).endswith(".jsonl") else [raw]
    if not any(text.strip() for text in texts):
        raise TuneError(f"data file {path} is empty")
    return texts


def _jsonl_texts(path: Path, raw: str) -> list[str]:
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise TuneError(f"{path} line {number} is not JSON: {error}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise TuneError(f"{path} line {number} has no string field 'text' (JSONL data needs one per line)")
        texts.append(record["text"])
    return texts


def held_out(count: int, fit_fraction: float) -> torch.Tensor:
    """Which of `count` consecutive windows are held out: window i is when
    floor((i + 1) * h) > floor(i * h), h = 1 - fit_fraction (every other
    window at 0.5), so both parts see every region of the file."""
    held = 1 - fit_fraction
    is_held = torch.tensor([math.floor((i + 1) * held) > math.floor(i * held) for i in range(count)])
    if bool(is_held.all()) or not bool(is_held.any()):  # two windows and an extreme fraction
        is_held = torch.arange(count) == count - 1
    return is_held


def thin(part: torch.Tensor, max_windows: int) -> torch.Tensor:
    """At most `max_windows` of the windows, picked evenly along them."""
    if len(part) <= max_windows:
        return part
    picks = torch.linspace(0, len(part) - 1, max_windows).round().long()
    return part[picks]


def load_task_data(name: str, path: Path, tokenizer, *, window: int, fit_fraction: float, max_windows: int) -> TaskData:
    """Tokenize a file (documents joined by the end-of-text token, when the
    tokenizer has one), cut it into consecutive windows, and split them
    evenly along the file (`held_out`); each part is thinned evenly to at
    most `max_windows` windows."""
    ids: list[int] = []
    for text in read_texts(path):
        if ids and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    count = len(ids) // window
    if count < 2:
        raise TuneError(
            f"data for '{name}' ({path}) is {len(ids)} tokens: too short for one window to fit "
            f"and one held out (2 x --window {window} tokens); give more text or a smaller --window"
        )
    windows = torch.tensor(ids[: count * window], dtype=torch.long).view(count, window)
    is_held = held_out(count, fit_fraction)
    return TaskData(name, str(path), len(ids), thin(windows[~is_held], max_windows),
                    thin(windows[is_held], max_windows))


def check_file(path: Path, name: str) -> None:
    """A --data or --general file exists and is a file."""
    if path.is_dir():
        raise TuneError(f"data file {path} (for '{name}') is a directory; give one file: a text file, or a "
                        ".jsonl file with one example per line (text, prompt/response, messages or multiple choice)")
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
    from mergekit_cabs.tune.chat import load_chat_task
    from mergekit_cabs.tune.choice import load_choice_task
    from mergekit_cabs.tune.rows import file_kind

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


@torch.no_grad()
def window_losses(model, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean next-token cross-entropy of each window (float64, on the CPU).

    The model runs in its own dtype (float32 here); the same windows and
    batch size give the same numbers run after run."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        )
        out.append(loss.view(len(batch), -1).double().mean(1).cpu())
    return torch.cat(out)


def task_scores(model, tasks: Sequence, split: str, batch_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """Every task's measures on its `split` ("fit" or "heldout"): per task, per measure, one value per item."""
    return {t.name: t.score(model, split, batch_size) for t in tasks}


def task_losses(model, tasks: Sequence, split: str, batch_size: int) -> dict[str, torch.Tensor]:
    """Every task's objective measure on its `split`, per item (text: `window_losses`), by name."""
    return {t.name: t.score(model, split, batch_size)[t.measure] for t in tasks}


def means(per_window: dict[str, torch.Tensor]) -> dict[str, float]:
    """The mean of each data set's per-item values."""
    return {k: float(v.mean()) for k, v in per_window.items()}
