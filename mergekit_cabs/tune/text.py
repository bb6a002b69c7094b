"""The text kind: a plain text file, or JSONL with a `text` field per line,
tokenized, cut into windows of `--window` tokens and split into fit and
held-out windows evenly along the file; each window scored by its mean
next-token loss."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_cabs.tune.options import TuneError
from mergekit_cabs.tune.rows import held_out, read_rows, read_text, thin


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


def read_texts(path: Path) -> list[str]:
    """The texts of a .jsonl file (a `text` field per line) or of a plain file."""
    jsonl = str(path).endswith(".jsonl")
    texts = [row["text"] for _, row in read_rows(path, "text")] if jsonl else [read_text(path)]
    if not any(text.strip() for text in texts):
        raise TuneError(f"data file {path} is empty")
    return texts


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



def window_batches(model, windows: torch.Tensor, batch_size: int):
    """Per batch of `batch_size` windows, each window's mean next-token
    cross-entropy (float64, on the model's device), the logits in float32;
    with autograd as the caller has it (the gradient search takes its
    slopes through it)."""
    device = next(model.parameters()).device
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        )
        yield loss.view(len(batch), -1).double().mean(1)


@torch.no_grad()
def window_losses(model, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean next-token cross-entropy of each window (float64, on the CPU).

    The model runs in its own dtype (float32 here); the same windows and
    batch size give the same numbers run after run."""
    return torch.cat([losses.cpu() for losses in window_batches(model, windows, batch_size)])
