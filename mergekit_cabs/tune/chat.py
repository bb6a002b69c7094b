"""Prompt/response and chat data: each row one example under a chat
template, the loss counted on the response (assistant) tokens only, as in
supervised fine-tuning.

The template is the base tokenizer's, or another model's (`--chat-template
MODEL`); the text is tokenized by the base's tokenizer.  An assistant turn's
tokens are found without the template's help (most templates lack the
`{% generation %}` marks transformers' assistant mask needs): the
conversation up to that turn with the generation prompt, and up to the end
of the turn, are rendered; each must be a prefix of the whole conversation's
text, and the turn's tokens are those of the whole text after the first
prefix's tokens and up to the second's (as lm-eval splits a context from its
continuation)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_cabs.tune.options import TuneError
from mergekit_cabs.tune.rows import batches, read_rows, split_rows, token_logprobs


@dataclass
class Template:
    """A chat template (None: none anywhere) and the model it comes from, in words."""

    text: str | None
    source: str


def find_template(tokenizer, base_label: str, option: str | None, models: dict[str, str]) -> Template:
    """The chat template: from the model `option` names (`models`: every name
    a model may go by -> its path), else the base tokenizer's own."""
    if option is None:
        return Template(getattr(tokenizer, "chat_template", None) or None, f"the base model's ({base_label})")
    from transformers import AutoTokenizer

    if option not in models:
        raise TuneError(f"--chat-template {option!r}: no model in the YAML is called that "
                        f"(models: {', '.join(sorted(models))})")
    try:
        other = AutoTokenizer.from_pretrained(models[option])
    except (OSError, ValueError) as error:
        raise TuneError(f"--chat-template {option!r}: cannot load its tokenizer: {error}") from None
    if not getattr(other, "chat_template", None):
        raise TuneError(f"--chat-template {option!r}: that model's tokenizer has no chat template; "
                        "name a model whose tokenizer_config.json has one")
    return Template(other.chat_template, f"{option}'s")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as lm-eval encodes a context: the tokenizer's
    special tokens added, unless the text already starts with its BOS token
    (a chat template usually writes it)."""
    bos = tokenizer.bos_token
    special = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]


def render(tokenizer, template: str, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation)


def turn_spans(tokenizer, template: str, messages: list[dict], where: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The conversation's token ids and each assistant turn's [start, end) in them."""
    whole = render(tokenizer, template, messages, False)
    ids = encode(tokenizer, whole)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, template, messages[:k], True) if k else ""
        through = render(tokenizer, template, messages[:k + 1], False)
        if not (whole.startswith(through) and through.startswith(before)):
            raise TuneError(f"{where}: the chat template does not render the conversation up to assistant turn "
                            f"{k} as the start of the whole one, so its tokens cannot be found; "
                            "use --chat-template with another model's template")
        start = len(encode(tokenizer, before)) if before else 0
        spans.append((max(start, 1), min(len(encode(tokenizer, through)), len(ids))))
    return ids, spans


def encode_row(tokenizer, template: str | None, kind: str, row: dict, where: str) -> tuple[list[int], torch.Tensor]:
    """A row's token ids and which of them the loss counts (bool, one per token)."""
    if kind == "prompt" and template is None:
        prompt = row["prompt"] + ("\n" if row["prompt"] and not row["prompt"][-1].isspace() else "")
        ids = encode(tokenizer, prompt + row["response"])
        spans = [(max(1, len(encode(tokenizer, prompt)) if prompt else 0), len(ids))]
    else:
        messages = row["messages"] if kind == "messages" else [
            {"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
        ids, spans = turn_spans(tokenizer, template, messages, where)
    counted = torch.zeros(len(ids), dtype=torch.bool)
    for start, end in spans:
        counted[start:end] = True
    if not bool(counted.any()):
        raise TuneError(f"{where}: the response is no token at all once tokenized; nothing to score")
    return ids, counted


def fit_window(ids: list[int], counted: torch.Tensor, window: int) -> tuple[list[int], torch.Tensor, str | None]:
    """At most `window` tokens of a row: cut from the left of the prompt while
    every counted token stays with one token before it; where the response
    alone is longer, the window from just before its first token (cut on the
    right).  Returns the tokens, their counted flags, and where it was cut:
    None (not cut), "left" (the prompt only) or "right" (the response's end
    too, which is then not scored)."""
    if len(ids) <= window:
        return ids, counted, None
    first = int(counted.nonzero()[0])
    cut = len(ids) - window
    if cut <= first - 1:
        return ids[cut:], counted[cut:], "left"
    cut = first - 1
    return ids[cut:cut + window], counted[cut:cut + window], "right"


def cut_words(left: int, right: int) -> str:
    """Where the rows cut to --window were cut, for the summary."""
    right_words = "on the right, through the response: its end is not scored"
    if not right:
        return "from the left of the prompt"
    return f"{left} from the left of the prompt; {right} {right_words}" if left else right_words


@dataclass
class ChatTask:
    """A prompt/response or messages file: one example per row, scored by
    its response tokens' mean next-token loss."""

    name: str
    path: str
    form: str  # "prompt" or "messages"
    rows: int
    truncated: int  # rows cut to --window
    cut_right: int  # of them, rows cut on the right, through the response (`fit_window`)
    template: str  # where the template came from, or that there is none
    window: int
    items: dict[str, list[tuple[list[int], torch.Tensor]]] = field(repr=False)  # by split
    pad_id: int = 0
    weight: float = 1.0
    kind: str = "chat"
    measure: str = "response loss"
    lower_is_better: bool = True

    def count(self, split: str) -> int:
        return len(self.items[split])

    def describe(self) -> dict:
        """What the report says of the data."""
        cut = {"truncation": cut_words(self.truncated - self.cut_right, self.cut_right)} if self.truncated else {}
        return {"form": self.form, "rows": self.rows, "truncated_rows": self.truncated, **cut,
                "template": self.template, "window": self.window,
                "response_tokens": {s: int(sum(int(c[1:].sum()) for _, c in v)) for s, v in self.items.items()}}

    def score(self, model, split: str, batch_size: int) -> dict[str, torch.Tensor]:
        """Per row, the mean negative log-probability (float64) of its counted tokens."""
        items = self.items[split]
        out = []
        for group in batches([1] * len(items), batch_size):
            logps = token_logprobs(model, [items[i][0] for i in group], self.pad_id)
            out += [-lp[items[i][1][1:]].mean() for i, lp in zip(group, logps)]
        return {self.measure: torch.stack(out)}


def load_chat_task(name: str, path: Path, form: str, tokenizer, template: Template, *, window: int,
                   fit_fraction: float, max_rows: int, weight: float = 1.0) -> ChatTask:
    """Read, check and tokenize a prompt/response or messages file, split by rows."""
    if form == "messages" and template.text is None:
        raise TuneError(f"{path} holds chat messages, but {template.source} tokenizer has no chat template: "
                        "give --chat-template MODEL (a model in the YAML whose tokenizer has one)")
    if template.text is None:
        print(f"tune: no chat template: the prompt/response rows of {path} are joined as plain text "
              "(prompt, newline, response)", file=sys.stderr)
    rows = read_rows(path, form)
    parts = split_rows(len(rows), fit_fraction, max_rows, name, path)
    cuts: dict[str | None, int] = {"left": 0, "right": 0, None: 0}
    items: dict[str, list] = {}
    for split, picks in parts.items():
        items[split] = []
        for i in picks:
            number, row = rows[i]
            ids, counted = encode_row(tokenizer, template.text, form, row, f"{path} line {number}")
            ids, counted, cut = fit_window(ids, counted, window)
            cuts[cut] += 1
            items[split].append((ids, counted))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    source = f"{template.source} chat template" if template.text else "none (plain text)"
    return ChatTask(name, str(path), form, len(rows), cuts["left"] + cuts["right"], cuts["right"], source, window,
                    items, pad, weight)
