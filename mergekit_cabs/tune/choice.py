"""Multiple-choice data, scored as lm-eval scores a multiple-choice task.

Each choice is a continuation of the question: lm-eval's target delimiter
" " before it (none under a chat template, as lm-eval does with
`--apply_chat_template`), the context's trailing spaces moved onto the
continuation, the whole text tokenized and the continuation's tokens taken
after the context's.  A choice's log-likelihood is the sum (float64) of its
tokens' log-probabilities.  `acc`: the highest log-likelihood is the right
choice; `acc_norm`: the highest log-likelihood per character of the choice
(lm-eval's `len(choice)`).  The search's smooth score is the right choice's
log-probability among the choices (log-softmax of their log-likelihoods);
its negative, the "choice loss", is what the objective uses, lower being
better, so the normalized gain is computed as for text.

A chat template is used only when --chat-template names one (lm-eval too
scores without a template unless asked): the question is then the user's
message and the context ends with the template's generation prompt."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_cabs.tune.chat import Template, encode, render
from mergekit_cabs.tune.options import TuneError
from mergekit_cabs.tune.rows import batches, read_rows, split_rows, token_logprobs

DELIMITER = " "  # lm-eval's default target_delimiter


@dataclass
class Question:
    sequences: list[list[int]]  # context + continuation tokens, one per choice
    continuation: list[int]  # how many of each sequence's last tokens are the choice
    lengths: list[int]  # characters of each choice (acc_norm)
    answer: int


def pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a context and a continuation into tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    head = len(encode(tokenizer, context)) if context else 0
    if not context and tokenizer.eos_token_id is not None:
        return [tokenizer.eos_token_id], whole  # lm-eval's prefix token for an empty context
    return whole[:head], whole[head:]


def make_question(tokenizer, template: str | None, row: dict, window: int, where: str) -> tuple[Question, bool]:
    """A row's choices as token sequences (at most `window` tokens each, cut
    on the left), and whether any was cut."""
    question = row.get("question", row.get("context"))
    if template is not None:
        context, delimiter = render(tokenizer, template, [{"role": "user", "content": question}], True), ""
    else:
        context, delimiter = question, DELIMITER
    sequences, continuation, cut = [], [], False
    for choice in row["choices"]:
        head, tail = pair(tokenizer, context, delimiter + choice)
        if not tail:
            raise TuneError(f"{where}: choice {choice!r} is no token at all once tokenized")
        if len(tail) >= window:
            raise TuneError(f"{where}: choice {choice!r} is {len(tail)} tokens, not less than --window {window}")
        seq = head + tail
        cut |= len(seq) > window
        sequences.append(seq[-window:])
        continuation.append(len(tail))
    return Question(sequences, continuation, [len(c) for c in row["choices"]], int(row["answer"])), cut


def judge(lls: torch.Tensor, question: Question) -> dict[str, torch.Tensor]:
    """A question's measures from its choices' log-likelihoods."""
    lengths = torch.tensor(question.lengths, dtype=torch.float64)
    return {
        "choice loss": -torch.log_softmax(lls, 0)[question.answer],
        "acc": (torch.argmax(lls) == question.answer).double(),
        "acc_norm": (torch.argmax(lls / lengths) == question.answer).double(),
    }


@dataclass
class ChoiceTask:
    """A multiple-choice file: per question, the choice loss, acc and acc_norm."""

    name: str
    path: str
    rows: int
    truncated: int
    template: str
    window: int
    items: dict[str, list[Question]] = field(repr=False)
    pad_id: int = 0
    weight: float = 1.0
    kind: str = "choice"
    measure: str = "choice loss"
    lower_is_better: bool = True

    def count(self, split: str) -> int:
        return len(self.items[split])

    def describe(self) -> dict:
        cut = {"truncation": "from the left of the question"} if self.truncated else {}
        return {"questions": self.rows, "truncated_questions": self.truncated, **cut, "template": self.template,
                "window": self.window,
                "choices": {s: sum(len(q.sequences) for q in v) for s, v in self.items.items()}}

    def score(self, model, split: str, batch_size: int) -> dict[str, torch.Tensor]:
        """Per question, its measures (float64); a question's choices share one forward pass."""
        items = self.items[split]
        measures: dict[str, list[torch.Tensor]] = {}
        for group in batches([len(q.sequences) for q in items], batch_size):
            sequences = [s for i in group for s in items[i].sequences]
            logps = iter(token_logprobs(model, sequences, self.pad_id))
            for i in group:
                q = items[i]
                lls = torch.stack([next(logps)[-n:].sum() for n in q.continuation])
                for key, value in judge(lls, q).items():
                    measures.setdefault(key, []).append(value)
        return {key: torch.stack(values) for key, values in measures.items()}


def check_choices(path: Path, rows: list[tuple[int, dict]]) -> None:
    """Say how many questions list a choice twice (identical choices score
    alike: a duplicated right answer can lose acc to its twin); refuse a file
    where no question has two different choices, since no model scores
    better than another on it."""
    twice = [number for number, row in rows if len(set(row["choices"])) < len(row["choices"])]
    if twice and all(len(set(row["choices"])) == 1 for _, row in rows):
        raise TuneError(f"{path}: every question's choices are all the same text, so no model can score better "
                        "than another on them; give each question different choices")
    if twice:
        print(f"tune: {path}: {len(twice)} question(s) list the same choice twice (first: line {twice[0]}); "
              "identical choices score alike and cannot be told apart", file=sys.stderr)


def load_choice_task(name: str, path: Path, tokenizer, template: Template | None, *, window: int,
                     fit_fraction: float, max_rows: int, weight: float = 1.0) -> ChoiceTask:
    """Read, check and tokenize a multiple-choice file, split by questions;
    `template` only when --chat-template names one."""
    rows = read_rows(path, "choice")
    check_choices(path, rows)
    parts = split_rows(len(rows), fit_fraction, max_rows, name, path)
    text = template.text if template is not None else None
    items, truncated = {}, 0
    for split, picks in parts.items():
        items[split] = []
        for i in picks:
            number, row = rows[i]
            question, cut = make_question(tokenizer, text, row, window, f"{path} line {number}")
            truncated += cut
            items[split].append(question)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    source = f"{template.source} chat template" if text else "none (question, ' ', choice)"
    return ChoiceTask(name, str(path), len(rows), truncated, source, window, items, pad, weight)
