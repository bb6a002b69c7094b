"""The data `tune` scores on: reading and tokenizing the files, cutting them
into fit and held-out windows, matching each --data file to its model, and
the loss of a model on a set of windows."""

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
    """One data set, cut into windows of `window` tokens."""

    name: str
    path: str
    tokens: int
    fit: torch.Tensor  # [windows, window] token ids
    heldout: torch.Tensor


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


def load_tasks(labels: Sequence[str], files: Sequence[Path], general: Path | None, tokenizer, *, window: int,
               fit_fraction: float, max_windows: int) -> list[TaskData]:
    """One data set per fine-tune (under its label), then the general set if given."""
    named = list(zip(labels, files)) + ([(GENERAL, Path(general))] if general is not None else [])
    for name, path in named:
        if not path.is_file():
            raise TuneError(f"data file {path} (for '{name}') does not exist")
    return [load_task_data(name, path, tokenizer, window=window, fit_fraction=fit_fraction, max_windows=max_windows)
            for name, path in named]


# --- which file is whose ------------------------------------------------------------


def model_names(finetunes) -> dict[str, list[int]]:
    """Every name a --data MODEL may use: as the YAML writes it, or the directory's name."""
    names: dict[str, list[int]] = {}
    for i, ref in enumerate(finetunes):
        for name in {str(ref), str(ref.model.path), os.path.basename(str(ref.model.path).rstrip("/\\"))}:
            names.setdefault(name, []).append(i)
    return names


def match_data(finetunes, data: Sequence[str]) -> list[Path]:
    """One data file per fine-tuned model, from MODEL=FILE arguments."""
    names = model_names(finetunes)
    files: dict[int, Path] = {}
    for item in data:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise TuneError(f"--data {item!r}: write MODEL=FILE")
        hits = names.get(name)
        if not hits:
            known = ", ".join(sorted({os.path.basename(str(r.model.path).rstrip('/')) for r in finetunes}))
            raise TuneError(f"--data {item!r}: no fine-tuned model is called '{name}' (models: {known})")
        if len(hits) > 1:
            raise TuneError(f"--data {item!r}: '{name}' names several models; use the path the YAML writes")
        if hits[0] in files:
            raise TuneError(f"--data gives two files for model '{finetunes[hits[0]]}'")
        files[hits[0]] = Path(file)
    missing = [str(finetunes[i]) for i in range(len(finetunes)) if i not in files]
    if missing:
        raise TuneError(
            f"no --data for model(s) {', '.join(missing)}; tune needs MODEL=FILE for every fine-tuned model"
        )
    return [files[i] for i in range(len(finetunes))]


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


def task_losses(model, tasks: Sequence[TaskData], split: str, batch_size: int) -> dict[str, torch.Tensor]:
    """`window_losses` of every data set's `split` ("fit" or "heldout"), by name."""
    return {t.name: window_losses(model, getattr(t, split), batch_size) for t in tasks}


def means(per_window: dict[str, torch.Tensor]) -> dict[str, float]:
    """The mean of each data set's window losses."""
    return {k: float(v.mean()) for k, v in per_window.items()}
