"""Everything checked before a model is loaded: the configuration planned
by mergekit, the data read and tokenized (`data`), the layer groups and
the configured numbers the search starts from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_cabs.tune.chat import find_template
from mergekit_cabs.tune.config import configured_numbers
from mergekit_cabs.tune.data import load_tasks, match_data, model_names
from mergekit_cabs.tune.groups import LayerGroups, TensorColumns, make_columns
from mergekit_cabs.tune.lmeval import load_lm_eval_tasks
from mergekit_cabs.tune.options import DEFAULTS, TuneError, check_data_settings


@dataclass
class Prepared:
    """Everything checked before a model is loaded."""

    config_path: Path
    config: Any
    raw: dict
    planned: list
    finetunes: list
    labels: list[str]
    start_weights: list[float]  # per model (and layer group: `groups.names`)
    start_lambda: float
    tasks: list  # one per fine-tune (any kind: `data`), then the general set if given
    groups: LayerGroups | TensorColumns  # which weight of a model each merged tensor takes

    def names(self) -> list[str]:
        """The searched numbers: lambda, then each model's weight(s)."""
        return ["lambda"] + self.groups.names(self.labels)


def prepare(config_path: Path, data: Sequence[str], *, general: Path | None = None, window: int | None = None,
            fit_fraction: float = DEFAULTS["fit_fraction"], max_windows: int = DEFAULTS["max_windows"],
            budget: int = DEFAULTS["budget"], layer_groups: int | None = None,
            chat_template: str | None = None, lm_eval: Sequence[str] = (), lm_eval_include: Path | None = None,
            lm_eval_limit: int | None = None, coefficients: str | None = None) -> Prepared:
    """Check the configuration and the data, tokenize the data; loads no model weights.
    `data` (MODEL=FILE) names a file for every fine-tune, or is empty with `general` alone;
    `layer_groups` G: one weight per model for each of G groups of consecutive
    decoder layers and one for the tensors outside them (None: one per model);
    `coefficients`: the weights' shape, model, layer or tensor (`groups.make_columns`;
    None: layer with `layer_groups`, else model);
    `chat_template`: the model (as the YAML names it) whose chat template
    chat data and multiple-choice questions go under (None: the base's, for chat data only);
    `lm_eval`: TASK[:METRIC] lm-eval tasks (`lmeval`), from `lm_eval_include`
    too, at most `lm_eval_limit` documents per split (None: `max_windows`)."""
    from mergekit_cabs import planning
    from mergekit_cabs._output import short_names

    check_data_settings(budget=budget, fit_fraction=fit_fraction, max_windows=max_windows)
    config, planned, finetunes = plan_config(config_path)
    if not data and general is None and not lm_eval:
        raise TuneError("give --data MODEL=FILE for every fine-tuned model, or --lm-eval TASK, or --general FILE "
                        "alone (its loss is then the objective)")
    files, weights = match_data(finetunes, data) if data else ([], [])
    merged = [p.name for p in planned if p.models or coefficients != "tensor"]  # tensor: the merged ones
    groups = make_columns(merged, coefficients, layer_groups)
    start_weights, start_lambda = configured_numbers(planned, finetunes, groups)
    labels = short_names([str(m.model.path) for m in finetunes])
    tokenizer, window = base_tokenizer(config, window)
    template, choice_template = chat_templates(config, finetunes, tokenizer, chat_template)
    tasks = load_tasks(labels, files, general, tokenizer, window=window, fit_fraction=fit_fraction,
                       max_windows=max_windows, weights=weights, template=template, choice_template=choice_template)
    tasks[len(files):len(files)] = load_lm_eval_tasks(lm_eval, tokenizer, include=lm_eval_include,
                                                      limit=lm_eval_limit or max_windows, fit_fraction=fit_fraction,
                                                      taken={t.name for t in tasks})
    raw = planning.read_yaml(config_path)
    return Prepared(Path(config_path), config, raw, planned, finetunes, labels, start_weights, start_lambda, tasks,
                    groups)


def chat_templates(config, finetunes, tokenizer, option: str | None):
    """The chat template for chat data (`chat.find_template`), and the one
    multiple-choice questions go under (only one --chat-template names)."""
    names = {k: str(finetunes[v[0]].model.path) for k, v in model_names(finetunes).items() if len(v) == 1}
    base = str(config.base_model.model.path)
    names.update({str(config.base_model): base, base: base})
    template = find_template(tokenizer, str(config.base_model), option, names)
    return template, (template if option is not None else None)


def plan_config(config_path: Path) -> tuple[Any, list, list]:
    """The configuration, mergekit's plan of it and its fine-tunes, checked for what tune needs."""
    from mergekit_cabs import planning

    config = planning.load_config(config_path, "tune")
    if config.modules:
        raise TuneError(f"{config_path} uses modules:; tune sets weights in models: and slices: configurations "
                        "only: write the merge with one of those")
    if config.tokenizer_source is not None or config.tokenizer is not None:
        raise TuneError(
            f"{config_path} sets tokenizer_source/tokenizer, which builds a new vocabulary; "
            "tune scores with the base model's tokenizer and needs the base's vocabulary"
        )
    planning.check_models(config)
    planned = planning.plan(config)
    finetunes = planning.fine_tunes(planned)
    if not finetunes:
        raise TuneError(f"{config_path} merges no fine-tuned model; there is nothing to tune")
    return config, planned, finetunes


def base_tokenizer(config, window: int | None) -> tuple[Any, int]:
    """The base model's tokenizer, and the window checked against its context length
    (None: the default, or the context length if smaller)."""
    from transformers import AutoTokenizer

    base_path = str(config.base_model.model.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_path)
    except (OSError, ValueError) as error:
        raise TuneError(f"cannot load the base model's tokenizer from {base_path}: {error}") from None
    limit = getattr(config.base_model.config(), "max_position_embeddings", None)
    if window is None:
        window = min(DEFAULTS["window"], limit or DEFAULTS["window"])
    if window < 2 or (limit and window > limit):
        raise TuneError(f"--window is {window}; it must be in [2, {limit}] (the base's max_position_embeddings)")
    return tokenizer, window
