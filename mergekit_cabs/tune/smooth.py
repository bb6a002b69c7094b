"""Differentiable per-item losses of every differentiable kind of task data,
for the gradient search (`gradient`).

Each kind's value per item is computed with the arithmetic of that kind's
own `score` (which runs under `torch.no_grad`), in the same dtypes, so the
numbers agree with the real scoring on the same items and batches:

* text (`data.TaskData`): a window's mean next-token cross-entropy, the
  logits in float32 (`.float()`), each token's loss then averaged in float64
  (`text.window_batches`, which `text.window_losses` runs);
* prompt/response and chat (`chat.ChatTask`): the mean negative
  log-probability (float64) of the row's counted tokens, the log-softmax
  taken in float32 (`rows.sequence_logprobs`, which `rows.token_logprobs` runs);
* multiple choice (`choice.ChoiceTask`): the choice loss, minus the
  log-softmax (float64) of the right choice's log-likelihood among the
  choices', a choice's log-likelihood being the float64 sum of its tokens'
  log-probabilities (`choice.judge`).

Items are batched as the real scoring batches them (`batch_size` windows;
`rows.batches` for rows and questions), so a padded batch has the same
shape, and the same bits, as there.  lm-eval tasks are not differentiable
(lm-eval computes their metrics from generated or compared outputs)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_cabs.tune.options import TuneError
from mergekit_cabs.tune.rows import batches, sequence_logprobs
from mergekit_cabs.tune.text import window_batches

DIFFERENTIABLE = ("text", "chat", "choice")
NOT_DIFFERENTIABLE = ("tune: the lm-eval task {name!r} is not differentiable (lm-eval scores generated or compared "
                      "outputs); use --optimizer coordinate or --optimizer cmaes with lm-eval tasks")


def differentiable(tasks: Sequence) -> bool:
    """Whether the gradient can be taken through every task's measure."""
    return all(task.kind in DIFFERENTIABLE for task in tasks)


def check_differentiable(tasks: Sequence) -> None:
    """Every task is of a kind the gradient can be taken through; else a
    one-line TuneError (lm-eval tasks: use the coordinate search or CMA-ES)."""
    for task in tasks:
        if task.kind == "lm-eval":
            raise TuneError(NOT_DIFFERENTIABLE.format(name=task.name))
        if task.kind not in DIFFERENTIABLE:
            raise TuneError(f"tune: data of kind {task.kind!r} ({task.name!r}) is not differentiable; "
                            "use --optimizer coordinate or --optimizer cmaes")


def task_items(task, split: str, picks: Sequence[int] | None = None):
    """The task's items of `split` (all, or those at the indices `picks`, in
    that order), in the form `item_losses` takes: a [n, window] tensor of
    token ids for text, a list of rows or questions otherwise."""
    check_differentiable([task])
    if task.kind == "text":
        windows = getattr(task, split)
        return windows if picks is None else windows[torch.as_tensor(list(picks), dtype=torch.long)]
    items = task.items[split]
    return list(items) if picks is None else [items[i] for i in picks]


def item_losses(model, task, items, batch_size: int, slope: float | None = None) -> torch.Tensor:
    """The task's measure per item (float64, detached, on the CPU), the model
    run with autograd on.  With `slope` (the objective's derivative with
    respect to one item's loss), each batch's `slope * sum(losses)` is
    back-propagated as soon as the batch is scored, so one batch's
    activations are held at a time."""
    check_differentiable([task])
    batched = {"text": lambda: window_batches(model, items, batch_size),
               "chat": lambda: chat_batches(model, task, items, batch_size),
               "choice": lambda: choice_batches(model, task, items, batch_size)}[task.kind]
    out = []
    for losses in batched():
        if slope and losses.requires_grad:
            (losses.sum() * slope).backward()
        out.append(losses.detach().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def chat_batches(model, task, rows: list, batch_size: int):
    """Per batch of rows, each row's mean negative log-probability (float64)
    of its counted tokens: `ChatTask.score`'s arithmetic."""
    for group in batches([1] * len(rows), batch_size):
        logps = sequence_logprobs(model, [rows[i][0] for i in group], task.pad_id)
        counted = [rows[i][1][1:].to(lp.device) for i, lp in zip(group, logps)]
        yield torch.stack([-lp[c].mean() for lp, c in zip(logps, counted)])


def choice_batches(model, task, questions: list, batch_size: int):
    """Per batch of questions, each one's choice loss (float64): minus the
    log-softmax of the right choice's summed log-likelihood among the
    choices' (`choice.judge`); a question's choices share one forward pass."""
    for group in batches([len(q.sequences) for q in questions], batch_size):
        logps = iter(sequence_logprobs(model, [s for i in group for s in questions[i].sequences], task.pad_id))
        out = []
        for i in group:
            q = questions[i]
            lls = torch.stack([next(logps)[-n:].sum() for n in q.continuation])
            out.append(-torch.log_softmax(lls, 0)[q.answer])
        yield torch.stack(out)
