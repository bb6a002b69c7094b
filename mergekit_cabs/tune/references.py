"""The references: each fine-tune on its own data (and on every shared
task), then the base on every data set, each model loaded in the scoring
dtype, checked for non-finite weights, scored and freed."""

from __future__ import annotations

from typing import Any

import torch

from mergekit_cabs.tune.data import task_scores
from mergekit_cabs.tune.live import Settings, say
from mergekit_cabs.tune.options import TuneError
from mergekit_cabs.tune.prepare import Prepared
from mergekit_cabs.tune.rows import SPLITS, mean_measures
from mergekit_cabs.tune.store import release_memory


def scoring_dtype(config, choice: str) -> torch.dtype:
    """The dtype the models are scored in: float32, or for "merge" the dtype
    mergekit-yaml writes (`out_dtype`, else `dtype`, else the base's own)."""
    from mergekit_cabs import _mergekit

    if choice == "float32":
        return torch.float32
    name = config.out_dtype or config.dtype
    if name:
        return _mergekit.dtype_from_name(name)
    base = config.base_model.config()
    own = getattr(base, "dtype", None) or getattr(base, "torch_dtype", None)
    own = getattr(torch, own, None) if isinstance(own, str) else own
    return own if isinstance(own, torch.dtype) else torch.float32


def load_model(path: str, device: str, dtype: torch.dtype = torch.float32):
    """A causal LM in `dtype`, on `device`, in eval mode (without transformers'
    progress bars); a model that cannot be read (its files removed or broken
    since they were checked) is a one-line TuneError naming it."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # ours say what is going on
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as error:
        raise TuneError(f"cannot load the model at {path}: {str(error).splitlines()[0]}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


def score_references(prep: Prepared, s: Settings) -> tuple[Any, dict]:
    """Phase 1: each fine-tune on its own task (and on every shared task:
    lm-eval's), then the base on every data set, one model in memory at a
    time (each freed before the next is loaded), all in the scoring dtype.
    Returns the base model (to become the merged one) and the values: a
    shared task's "own" value is the best fine-tune's (`best_of` names it);
    `reference["items"]` keeps each item's value of the objective measure."""
    import tqdm

    reference: dict = {"base": {}, "models": {}}
    measures: dict = {"base": {}, "models": {}, "shared": {}}  # every measure (accuracy too)
    items: dict = {"models": {}, "shared": {}}  # the objective measure per item, as `measures`
    shared = [t for t in prep.tasks if getattr(t, "shared", False)]
    own = {t.name: t for t in prep.tasks}  # no model's own data with --general alone
    jobs = [(k, r, ([own[k]] if k in own else []) + shared) for k, r in zip(prep.labels, prep.finetunes)]
    jobs = [job for job in jobs if job[2]]  # none with --general alone: no bar then
    for label, ref, tasks in tqdm.tqdm(jobs, desc="Scoring the fine-tunes", unit="model",
                                       disable=s.quiet or not jobs):
        tuned = load_model(str(ref.model.path), s.device, s.score_dtype)
        check_finite(tuned, ref)
        for task in tasks:
            per_item = {split: task.score(tuned, split, s.batch_size) for split in SPLITS}
            scored = {split: mean_measures(per_item[split]) for split in SPLITS}
            if getattr(task, "shared", False):
                measures["shared"].setdefault(task.name, {})[label] = scored
                items["shared"].setdefault(task.name, {})[label] = item_values(per_item, task.measure)
            else:
                reference["models"][label] = {split: scored[split][task.measure] for split in SPLITS}
                measures["models"][label], items["models"][label] = scored, item_values(per_item, task.measure)
        del tuned
        release_memory()
    for task in shared:
        reference.setdefault("best_of", {})[task.name] = best_of = best_fine_tunes(task, measures["shared"][task.name])
        reference["models"][task.name] = {split: measures["shared"][task.name][best_of[split]][split][task.measure]
                                          for split in SPLITS}
        measures["models"][task.name] = {split: measures["shared"][task.name][best_of[split]][split]
                                         for split in SPLITS}
        items["models"][task.name] = {split: items["shared"][task.name][best_of[split]][split] for split in SPLITS}
    say(f"Loading the base model {prep.config.base_model} and scoring it on {len(prep.tasks)} data sets", s.quiet)
    model = load_model(str(prep.config.base_model.model.path), s.device, s.score_dtype)
    check_finite(model, prep.config.base_model, base=True)
    base = {split: task_scores(model, prep.tasks, split, s.batch_size) for split in SPLITS}
    measures["base"] = {split: {name: mean_measures(v) for name, v in base[split].items()} for split in SPLITS}
    reference["base"] = {split: {t.name: measures["base"][split][t.name][t.measure] for t in prep.tasks}
                         for split in SPLITS}
    reference["measures"] = measures
    reference["items"] = {"base": {split: {t.name: base[split][t.name][t.measure].tolist() for t in prep.tasks}
                                   for split in SPLITS}, "models": items["models"]}
    return model, reference


def best_fine_tunes(task, by_model: dict[str, dict]) -> dict[str, str]:
    """Per split, the fine-tune that scores best on a shared task (the first of equals, in the YAML's order)."""
    sign = 1 if task.lower_is_better else -1
    return {split: min(by_model, key=lambda label: sign * by_model[label][split][task.measure]) for split in SPLITS}


def item_values(per_item: dict[str, dict[str, torch.Tensor]], measure: str) -> dict[str, list[float]]:
    """Per split, each item's value of `measure` (the references the bootstrap redraws: `compare`)."""
    return {split: per_item[split][measure].tolist() for split in SPLITS}


def check_finite(model, ref, base: bool = False) -> None:
    """A loaded model's weights hold no NaN or infinity (checked as each is
    loaded, before it is scored); TuneError naming the model and the tensor."""
    from mergekit_cabs.planning import model_label

    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise TuneError(f"{model_label(ref, base)}: tensor {name} holds NaN or infinite values; "
                                "fix or drop that model")
