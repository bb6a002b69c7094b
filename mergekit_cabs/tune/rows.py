"""Data given as one example per JSONL line (prompt/response, chat messages,
multiple choice): reading and checking the rows, which kind a file holds,
the fit/held-out split by rows, and the per-token log-probabilities of
token sequences of different lengths, padded into batches."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from mergekit_cabs.tune.options import TuneError

SPLITS = ("fit", "heldout")

# The kinds of a JSONL line, by its fields (the first line decides the file's kind).
ROW_FORMS = {
    "text": "{\"text\": ...}",
    "messages": "{\"messages\": [{\"role\": ..., \"content\": ...}, ...]}",
    "prompt": "{\"prompt\": ..., \"response\": ...}",
    "choice": "{\"question\": ..., \"choices\": [...], \"answer\": INDEX}",
}


def row_kind(record) -> str | None:
    """Which kind of row a JSON value is, by its fields (None: none of ROW_FORMS)."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "prompt" in record or "response" in record:
        return "prompt"
    if "choices" in record:
        return "choice"
    if "text" in record:
        return "text"
    return None


def file_kind(path: Path) -> str:
    """The kind of a data file: "text" for a plain file, else its first JSONL line's (`row_kind`; one of no
    known form is an error listing the forms)."""
    if not str(path).endswith(".jsonl"):
        return "text"
    for number, line in enumerate(read_lines(path), 1):
        if line.strip():
            kind = row_kind(parse_line(path, number, line))
            if kind is None:
                raise no_form(path, number)
            return kind
    raise TuneError(f"data file {path} is empty")


def no_form(path: Path, number: int) -> TuneError:
    """The error for a JSONL line of none of the ROW_FORMS, listing them."""
    return TuneError(f"{path} line {number} is none of the row forms: {'; '.join(ROW_FORMS.values())}")


def read_text(path: Path) -> str:
    """A data file's text, UTF-8 (a byte order mark at its start is dropped: it is no text)."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise TuneError(f"cannot read data file {path}: {error}") from None


def read_lines(path: Path) -> list[str]:
    return read_text(path).splitlines()


def parse_line(path: Path, number: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise TuneError(f"{path} line {number} is not JSON: {error}") from None


def read_rows(path: Path, kind: str) -> list[tuple[int, dict]]:
    """The (line number, row) pairs of a JSONL file whose first line is of
    `kind`, each checked (`check_row`); a line of another kind is an error."""
    rows = []
    for number, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        record = parse_line(path, number, line)
        found = row_kind(record)
        if found is None:
            raise no_form(path, number)
        if found != kind:
            raise TuneError(f"{path} line {number} is a {found} row, but line {rows[0][0] if rows else 1} is a {kind} "
                            "row: one kind of row per file")
        check_row(path, number, kind, record)
        rows.append((number, record))
    return rows


def _text(value) -> bool:
    return isinstance(value, str)


def check_row(path: Path, number: int, kind: str, row: dict) -> None:
    """A row has the fields of its kind with the right types; TuneError naming the file and line."""
    where = f"{path} line {number}"
    if kind == "text":
        if not _text(row["text"]):
            raise TuneError(f"{where}: 'text' is {type(row['text']).__name__}; a text row needs a string 'text'")
    elif kind == "prompt":
        if not (_text(row.get("prompt")) and _text(row.get("response")) and row["response"]):
            raise TuneError(f"{where}: a prompt/response row needs a string 'prompt' and a non-empty string "
                            "'response'")
    elif kind == "messages":
        messages = row["messages"]
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and _text(m.get("role")) and _text(m.get("content")) for m in messages)):
            raise TuneError(f"{where}: 'messages' must be a non-empty list of {{\"role\": ..., \"content\": ...}} "
                            "with string values")
        if not any(m["role"] == "assistant" for m in messages):
            raise TuneError(f"{where}: no message has role 'assistant'; the loss is counted on the assistant's turns")
    elif kind == "choice":
        check_choice_row(where, row)


def check_choice_row(where: str, row: dict) -> None:
    question = row.get("question", row.get("context"))
    choices, answer = row.get("choices"), row.get("answer")
    if not _text(question):
        raise TuneError(f"{where}: a multiple-choice row needs a string 'question' (or 'context')")
    if not (isinstance(choices, list) and all(_text(c) and c for c in choices)):
        raise TuneError(f"{where}: 'choices' must be a list of non-empty strings")
    if len(choices) < 2:
        raise TuneError(f"{where}: {len(choices)} choice(s); a multiple-choice question needs at least 2")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise TuneError(f"{where}: 'answer' is {answer!r}; it must be the index of the right choice, "
                        f"0 to {len(choices) - 1}")


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


def split_rows(count: int, fit_fraction: float, max_items: int, name: str, path: Path) -> dict[str, list[int]]:
    """Which rows are fit and which held out: spread along the file as the
    text's windows are (`held_out`), each part thinned evenly to `max_items`."""
    if count < 2:
        raise TuneError(f"data for '{name}' ({path}) has {count} row(s): too few for one to fit and one held out")
    is_held = held_out(count, fit_fraction)
    index = torch.arange(count)
    return {"fit": thin(index[~is_held], max_items).tolist(), "heldout": thin(index[is_held], max_items).tolist()}


# --- scoring sequences of different lengths ------------------------------------------


@torch.no_grad()
def token_logprobs(model, sequences: Sequence[Sequence[int]], pad_id: int) -> list[torch.Tensor]:
    """One forward pass over `sequences`, right-padded to the longest: for
    each, the log-probability (float64, on the CPU) of its tokens 1..n-1
    given the tokens before.  No attention mask is passed: attention is
    causal, so a real token never sees the padding after it, and the
    padding's own positions are dropped; the model runs as it does on one
    unpadded sequence (the padded batch's numbers can differ from one
    sequence at a time only in the last bits of the float32 matrix
    products, whose blocking depends on the batch's shape)."""
    return [logp.cpu() for logp in sequence_logprobs(model, sequences, pad_id)]


def sequence_logprobs(model, sequences: Sequence[Sequence[int]], pad_id: int) -> list[torch.Tensor]:
    """`token_logprobs`' arithmetic, on the model's device, with autograd as
    the caller has it (the gradient search takes its slopes through it)."""
    device = next(model.parameters()).device
    longest = max(len(s) for s in sequences)
    batch = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        batch[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    batch = batch.to(device)
    logits = model(input_ids=batch, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch[:, 1:, None])[..., 0].double()
    return [logp[i, :len(s) - 1] for i, s in enumerate(sequences)]


def batches(sizes: Sequence[int], batch_size: int) -> list[range]:
    """Consecutive groups of items, each holding `sizes[i]` sequences for item
    i: items are added to a group while it holds fewer than `batch_size`
    sequences (an item's sequences always share one group)."""
    groups, start, held = [], 0, 0
    for i, size in enumerate(sizes):
        if held and held + size > batch_size:
            groups.append(range(start, i))
            start, held = i, 0
        held += size
    if start < len(sizes):
        groups.append(range(start, len(sizes)))
    return groups


def items_word(kinds) -> str:
    """What data sets of these kinds are made of, in a word: "windows" when
    every one is text (or there is none), else "items"."""
    return "windows" if set(kinds) <= {"text"} else "items"


def means(per_window: dict[str, torch.Tensor]) -> dict[str, float]:
    """The mean of each data set's per-item values."""
    return {k: float(v.mean()) for k, v in per_window.items()}


def mean_measures(scored: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each measure's mean over the items."""
    return {m: float(v.mean()) for m, v in scored.items()}
