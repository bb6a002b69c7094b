"""lm-eval tasks as tune data (`--lm-eval TASK[:METRIC]`), behind the
`lm-eval` extra.

The live in-memory model and the base's tokenizer are handed to lm-eval's
`HFLM`, so a weight vector costs what setting it costs plus lm-eval's own
run, not a merge to disk.  A task's documents (its evaluation split) are
split into fit and held-out ones as a data file's rows are (every other
document at --fit-fraction 0.5), each part thinned evenly to at most
--lm-eval-limit documents, and given to `simple_evaluate` as its `samples`
(document indices per task).  The task's value is lm-eval's aggregate of the
metric, which must be a mean over documents (acc, acc_norm, exact_match...),
so the per-document values tune keeps average to it.  The direction is
lm-eval's `higher_is_better`.

An lm-eval task belongs to no one model: every fine-tune is scored on it,
and its normalized gain is measured against the fine-tune that scores best
on it (per split)."""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_cabs.tune.options import TuneError
from mergekit_cabs.tune.rows import split_rows

EXTRA = 'pip install ".[lm-eval]" in a clone of mergekit-cabs ("mergekit-cabs[lm-eval]" once on PyPI)'
DEFAULT_METRIC = "acc,none"  # as mergekit-evolve's


def lm_eval_modules():
    """lm-eval's evaluator, task manager and HF model class; TuneError naming the extra when it is missing."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager, get_task_dict
    except ImportError:
        raise TuneError(f"--lm-eval needs the lm-eval package: {EXTRA}") from None
    return simple_evaluate, HFLM, TaskManager, get_task_dict


def parse_task(text: str) -> tuple[str, str]:
    """TASK[:METRIC] -> (task, metric as lm-eval keys it: "acc,none"; a bare metric gets ",none")."""
    task, _, metric = text.partition(":")
    if not task:
        raise TuneError(f"--lm-eval {text!r}: write TASK or TASK:METRIC, such as arc_easy:acc_norm,none")
    metric = metric or DEFAULT_METRIC
    return task, metric if "," in metric else f"{metric},none"


@contextlib.contextmanager
def quiet_run():
    """For the block, standard error (file descriptor 2, and sys.stderr where
    something has replaced it) goes nowhere:
    lm-eval's progress bars (some with tqdm's `disable` forced off), its
    warnings and the `git` it runs for its environment report would
    otherwise print at every evaluation.  Exceptions still rise."""
    import sys

    sys.stderr.flush()
    saved, sink = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(sink, 2)
    try:
        with open(os.devnull, "w") as python_sink, contextlib.redirect_stderr(python_sink):  # sys.stderr replaced
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(sink)


@dataclass
class LmEvalTask:
    """An lm-eval task: per document of a split, the metric's value."""

    name: str
    task: str
    metric: str  # as lm-eval keys it, "acc,none"
    lower_is_better: bool
    docs: dict[str, list[int]]  # per split, indices into the task's evaluation documents
    total: int  # documents in the task's evaluation split
    tokenizer: object = field(repr=False)
    manager: object = field(repr=False)
    weight: float = 1.0
    kind: str = "lm-eval"
    shared: bool = True  # scored on every fine-tune; its gain is against the best of them

    @property
    def path(self) -> str:
        return f"lm-eval task {self.task}"

    @property
    def measure(self) -> str:
        return self.metric

    def count(self, split: str) -> int:
        return len(self.docs[split])

    def describe(self) -> dict:
        return {"task": self.task, "documents": self.total}

    def score(self, model, split: str, batch_size: int) -> dict[str, torch.Tensor]:
        """lm-eval's run of the task on this split's documents: the metric per document (float64)."""
        simple_evaluate, HFLM, _, _ = lm_eval_modules()
        with quiet_run():
            lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=batch_size)
            result = simple_evaluate(model=lm, tasks=[self.task], task_manager=self.manager,
                                     samples={self.task: self.docs[split]}, log_samples=True, bootstrap_iters=0,
                                     verbosity="ERROR")
        name, _, filter_name = self.metric.partition(",")
        samples = sorted((s for s in result["samples"][self.task] if s.get("filter", "none") == filter_name),
                         key=lambda s: s["doc_id"])
        if name not in (samples[0] if samples else {}):
            raise TuneError(f"--lm-eval {self.task}: lm-eval gives no per-document {self.metric!r}; "
                            f"its metrics: {', '.join(k for k in result['results'][self.task] if ',' in k)}")
        return {self.metric: torch.tensor([float(s[name]) for s in samples], dtype=torch.float64)}


def load_lm_eval_tasks(specs, tokenizer, *, include: Path | None, limit: int, fit_fraction: float,
                       taken: set[str]) -> list[LmEvalTask]:
    """The --lm-eval tasks, checked (known to lm-eval, its data readable, a
    metric it averages over documents, every scored document's answer one of
    its choices), their documents split; `taken`: names already used."""
    if not specs:
        return []
    _, _, TaskManager, _ = lm_eval_modules()
    if include is not None and not Path(include).is_dir():
        raise TuneError(f"--lm-eval-include {include}: not a directory (give the directory of your task YAMLs)")
    manager = TaskManager(include_path=str(include) if include else None)
    tasks = []
    for spec in specs:
        task, metric = parse_task(spec)
        if task in taken:
            raise TuneError(f"--lm-eval {spec!r}: {task!r} is already the name of a model's data; one name each")
        loaded = load_task(spec, task, manager)
        name = metric.partition(",")[0]
        aggregation = loaded.aggregation().get(name)
        if aggregation is None or getattr(aggregation, "__name__", "") != "mean":
            raise TuneError(f"--lm-eval {spec!r}: tune needs a metric lm-eval averages over documents; "
                            f"{task} has {', '.join(sorted(loaded.aggregation()))}")
        count = len(loaded.eval_docs)
        docs = split_rows(count, fit_fraction, limit, task, Path(f"lm-eval task {task}"))
        check_answers(spec, task, loaded, docs["fit"] + docs["heldout"])
        lower = not loaded.higher_is_better().get(name, True)
        tasks.append(LmEvalTask(task, task, metric, lower, docs, count, tokenizer, manager))
        taken.add(task)
    return tasks


def load_task(spec: str, task: str, manager):
    """lm-eval's task object (its data read); what lm-eval and datasets raise
    for an unknown task, unreadable data or a first document it cannot use
    is one TuneError naming the task."""
    from datasets.exceptions import DatasetGenerationError

    _, _, _, get_task_dict = lm_eval_modules()
    with quiet_run(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # get_task_dict: in every 0.4.x, deprecated in 0.4.13
        try:
            return get_task_dict([task], manager)[task]
        except (KeyError, ValueError) as error:
            raise TuneError(f"--lm-eval {spec!r}: lm-eval cannot load task {task!r} ({error}); give "
                            "--lm-eval-include DIR for your own task YAMLs") from None
        except (FileNotFoundError, DatasetGenerationError) as error:
            cause = f" ({one_line(error.__cause__)})" if error.__cause__ else ""
            raise TuneError(f"--lm-eval {spec!r}: lm-eval cannot read the data of task {task!r}: "
                            f"{one_line(error)}{cause}") from None
        except IndexError as error:  # ConfigurableTask.__init__ indexes the choices with the first document's target
            raise TuneError(f"--lm-eval {spec!r}: lm-eval fails on the first document of task {task!r} "
                            f"(IndexError: {one_line(error)}): is its answer (doc_to_target) outside its choices "
                            "(doc_to_choice)?") from None


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def check_answers(spec: str, task: str, loaded, indices) -> None:
    """Every scored document of a multiple-choice task has an answer among its
    choices (an index 0 to n-1 or a choice's text, or a list of them): lm-eval
    only logs a warning for one that is not, and counts it wrong whatever the
    model says."""
    if getattr(loaded, "OUTPUT_TYPE", None) != "multiple_choice" or getattr(loaded, "multiple_input", 0):
        return
    for i in indices:
        doc = loaded.eval_docs[i]
        choices, target = loaded.doc_to_choice(doc), loaded.doc_to_target(doc)
        if not all(is_choice(t, choices) for t in (target if isinstance(target, list) else [target])):
            raise TuneError(f"--lm-eval {spec!r}: document {i} of task {task!r} has answer {target!r}, not one of "
                            f"its {len(choices)} choices (an index 0 to {len(choices) - 1}, or a choice's text); "
                            "lm-eval would count it wrong whatever the model answers")


def is_choice(target, choices: list) -> bool:
    if isinstance(target, bool):
        return False
    if isinstance(target, int):
        return 0 <= target < len(choices)
    return isinstance(target, str) and target in choices
