"""The `tune` run, phase by phase: check and tokenize (`prepare`), then
(`run_tune`) score the references, build the weight store, search, score the
start and the chosen point, and assemble the report.  The arithmetic lives
elsewhere: the merge in `store` (through the kernel), the search and the
objective in `search`, the data and the losses in `data`."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_cabs.tune.baselines import (
    available_memory,
    parse_baselines,
    run_baselines,
    tuned_decision,
    tuned_store_bytes,
)
from mergekit_cabs.tune.compare import comparison
from mergekit_cabs.tune.config import check_round_trip, configured_numbers, tuned_config
from mergekit_cabs.tune.data import SPLITS, load_tasks, match_data, means, model_names, task_scores
from mergekit_cabs.tune.groups import LayerGroups, make_groups
from mergekit_cabs.tune.lmeval import load_lm_eval_tasks
from mergekit_cabs.tune.options import (
    DEFAULTS,
    GENERAL,
    TuneError,
    check_data_settings,
    check_device_settings,
    check_optimizer,
    implied_objective,
)
from mergekit_cabs.tune.report import items_word
from mergekit_cabs.tune.search import Objective, SearchResult, budget_note, optimise, split_objectives
from mergekit_cabs.tune.settings import (
    Setting,
    check_settings,
    parse_densities,
    parse_orders,
    plan_settings,
    setting_budgets,
)
from mergekit_cabs.tune.store import WeightStore, build_store, held_bytes, release_memory


@contextlib.contextmanager
def timed(clock: dict[str, float], key: str):
    """Within the block, time it: `clock[key]` = its wall seconds."""
    started = time.perf_counter()
    yield
    clock[key] = time.perf_counter() - started


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


# --- before any model is loaded ------------------------------------------------------


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
    groups: LayerGroups  # the tensors that take their own weight per model

    def names(self) -> list[str]:
        """The searched numbers: lambda, then each model's weight(s)."""
        return ["lambda"] + self.groups.names(self.labels)


def prepare(config_path: Path, data: Sequence[str], *, general: Path | None = None, window: int | None = None,
            fit_fraction: float = DEFAULTS["fit_fraction"], max_windows: int = DEFAULTS["max_windows"],
            budget: int = DEFAULTS["budget"], layer_groups: int | None = None,
            chat_template: str | None = None, lm_eval: Sequence[str] = (), lm_eval_include: Path | None = None,
            lm_eval_limit: int | None = None) -> Prepared:
    """Check the configuration and the data, tokenize the data; loads no model weights.
    `data` (MODEL=FILE) names a file for every fine-tune, or is empty with `general` alone;
    `layer_groups` G: one weight per model for each of G groups of consecutive
    decoder layers and one for the tensors outside them (None: one per model);
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
    groups = make_groups((p.name for p in planned), layer_groups)
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
    from mergekit_cabs.tune.chat import find_template

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


# --- the run --------------------------------------------------------------------------


@dataclass
class Settings:
    """The search's settings, as `run_tune` takes them."""

    device: str
    store_device: str
    score_dtype: torch.dtype
    objective: str
    general_weight: float
    budget: int
    weight_bounds: tuple[float, float]
    lambda_bounds: tuple[float, float]
    tolerance: float
    batch_size: int
    quiet: bool
    optimizer: str = DEFAULTS["optimizer"]
    seed: int = DEFAULTS["seed"]
    budget_option: str = "--budget"  # where `budget` comes from, for the budget warning
    budget_shares: int = 1  # ... as one of this many equal shares of it


@dataclass
class Live:
    """The model being scored and the store that sets its weights."""

    model: Any
    store: WeightStore
    tasks: list  # any kind (`data`)
    batch_size: int
    groups: LayerGroups
    models: int

    def set(self, x: Sequence[float]) -> None:
        """Set the model to the merge at point x = (lambda, then the weights as `Prepared.names`)."""
        self.store.apply(self.groups.rows(x[1:], self.models), x[0])

    def scores(self, split: str) -> dict[str, dict[str, torch.Tensor]]:
        """Every task's measures on `split`, per item (`data.task_scores`)."""
        return task_scores(self.model, self.tasks, split, self.batch_size)

    def losses(self, split: str) -> dict[str, torch.Tensor]:
        """Every task's objective measure on `split`, per item."""
        return {t.name: scored[t.measure] for t, scored in zip(self.tasks, self.scores(split).values())}


def run_tune(prep: Prepared, *, device: str = "cpu", objective: str | None = None,
             general_weight: float = DEFAULTS["general_weight"], budget: int = DEFAULTS["budget"],
             weight_bounds=DEFAULTS["weight_bounds"], lambda_bounds=DEFAULTS["lambda_bounds"],
             tolerance: float = DEFAULTS["tolerance"], batch_size: int = DEFAULTS["batch_size"],
             score_dtype: str = DEFAULTS["score_dtype"], store_on_device: bool = False,
             quiet: bool = False, optimizer: str = DEFAULTS["optimizer"], seed: int = DEFAULTS["seed"],
             baselines: str | None = None, densities: str | None = None, orders: str | None = None,
             total_budget: int | None = None) -> dict:
    """Load the models, build the store, search, and return the report (a dict).
    `baselines`: as --baselines (None: task arithmetic tuned the same way
    when it fits in memory; "none": no baseline), scored after the search
    (`baselines`, `compare`).  `densities`, `orders`: as --densities and
    --orders (None: the configuration's); each (density, order) setting is
    searched with `budget` evaluations, or a share of `total_budget`
    (`settings`), and the best on the fit windows is chosen.
    `objective` None: "gain" with per-model data, "loss" with the general set
    alone; `score_dtype`: "merge" (the dtype mergekit-yaml writes) or
    "float32"; `store_on_device`: keep the store on `device` instead of the host."""
    check_optimizer(optimizer, seed)
    tuned_ta, one_lambda = parse_baselines(baselines)
    asked = parse_densities(densities), parse_orders(orders)
    check_device_settings(device=device, score_dtype=score_dtype, store_on_device=store_on_device)
    objective = implied_objective(objective, any(t.name != GENERAL for t in prep.tasks))
    known = check_settings(prep, *asked, total_budget)  # before the suggested order reads every tensor
    clock: dict[str, float] = {"masks_s": 0.0, "search_s": 0.0}
    with timed(clock, "settings_s"):  # planning each setting; a suggested order reads every tensor once
        settings = plan_settings(prep, *asked, progress=not quiet, say=lambda line: _say(line, False), known=known)
    budgets = setting_budgets(len(settings), budget, total_budget)
    s = Settings(device, device if store_on_device else "cpu", scoring_dtype(prep.config, score_dtype), objective,
                 general_weight, budget, tuple(weight_bounds), tuple(lambda_bounds), tolerance, batch_size, quiet,
                 optimizer, seed, *(("--budget", 1) if total_budget is None else ("--total-budget", len(settings))))
    widened = widen_to_start(prep, s)
    with timed(clock, "total_s"):
        with timed(clock, "reference_s"):
            model, reference = score_references(prep, s)
        objectives = split_objectives(objective, list(reference["models"]), reference, general_weight,
                                      {t.name: t.weight for t in prep.tasks},
                                      {t.name: t.lower_is_better for t in prep.tasks})
        live, rows, start = search_settings(prep, s, model, objectives, settings, budgets, clock)
        chosen = max(range(len(rows)), key=lambda i: (rows[i]["result"].score, -i))  # the first of equals
        result, points = rows[chosen]["result"], rows[chosen]["points"]
        _say(f"Scoring your config and the chosen point on the fit and held-out data "
             f"({'budget spent' if result.stopped == 'budget' else 'converged'}: {len(points)} evaluation"
             f"{'' if len(points) == 1 else 's'})", quiet)
        with timed(clock, "final_s"):
            scores = final_scores(prep, s, live, objectives, settings, chosen, start, result.best, clock)
    clock.update(set_weights_mean_s=sum(p["set_s"] for p in points) / len(points),
                 evaluate_mean_s=sum(p["eval_s"] for p in points) / len(points))
    setting = settings[chosen]
    tuned = tuned_config(setting.raw, prep.finetunes, result.best[1:], result.best[0], prep.groups)
    check_round_trip(tuned, prep.finetunes, result.best[1:], result.best[0], prep.groups, expected=setting.planned)
    report = assemble_report(prep, dataclasses.replace(s, budget=budgets[chosen]), reference, live, result, points,
                             scores, clock, tuned)
    report["settings"] = settings_report(prep, settings, rows, chosen, total_budget)
    below = below_config(scores)
    report["search"]["notes"], report["scores_below_config"] = widened + below, bool(below)
    if tuned_ta is not False or one_lambda:
        s = dataclasses.replace(s, budget=budget if total_budget is None else total_budget, budget_shares=1)
        add_baselines(report, prep, s, live, objectives, result.optimizer, tuned_ta, one_lambda)
    return report


def final_scores(prep: Prepared, s: Settings, live: Live, objectives: dict, settings: Sequence[Setting], chosen: int,
                 start: dict | None, best: Sequence[float], clock: dict) -> dict:
    """Phase 4: your config's scores (with its own masks, computed again when
    no setting searched had them) and the chosen point's, with the chosen
    setting's masks bound (the model is left at the chosen point)."""
    bound = settings[-1].planned  # the masks the live store holds
    if start is None:  # your config's masks were not among the settings searched
        start, bound = config_scores(prep, s, live, objectives, clock), prep.planned
    if bound is not settings[chosen].planned:
        rebind(prep, s, live, settings[chosen].planned, clock, announce=None)  # said when searched
    return {"start": start, "best": score_point(live, objectives, best)}


def search_settings(prep: Prepared, s: Settings, model, objectives: dict, settings: Sequence[Setting],
                    budgets: Sequence[int], clock: dict) -> tuple[Live, list[dict], dict | None]:
    """Phases 2 and 3 per setting: its masks (a store, the previous one freed
    first), its search, and with several settings its best point scored on
    both splits; your config, as written, scored while a setting with its
    masks is live.  Returns the live model (the last setting's store bound),
    one row per setting and your config's scores (None when no setting had
    your config's masks)."""
    live, rows, start = None, [], None
    for i, (setting, budget) in enumerate(zip(settings, budgets)):
        if len(settings) > 1:
            _say(f"Setting {i + 1} of {len(settings)}: {setting.label(prep.labels)} (budget {budget})", s.quiet)
        took: dict[str, float] = {}
        where = f" ({setting.label(prep.labels)})" if len(settings) > 1 else ""  # in the overlap line
        with timed(took, "masks_s"):
            if live is None:
                live = Live(model, bind_store(prep, model, s, setting.planned, where), prep.tasks, s.batch_size,
                            prep.groups, len(prep.labels))
            else:
                rebind(prep, s, live, setting.planned, {}, announce=where)
        with timed(took, "search_s"):
            result, points = search(live, objectives["fit"], prep, dataclasses.replace(s, budget=budget),
                                    say_budget=i == 0)
        row = {"result": result, "points": points, "budget": budget, **took}
        if len(settings) > 1:
            row["heldout"] = heldout_score(live, objectives, result.best)  # its fit score is the search's
        if start is None and setting.yours:
            start = score_point(live, objectives, (prep.start_lambda, *prep.start_weights))  # as written
        rows.append(row)
        for key in took:
            clock[key] += took[key]
    return live, rows, start


def rebind(prep: Prepared, s: Settings, live: Live, planned, clock: dict, announce: str | None) -> None:
    """Free the live store, then build the one of `planned` (its masks) into
    the live model; the time added to clock["masks_s"]; `announce`: say
    when its kept places overlap (`bind_store`)."""
    live.store = None
    release_memory()
    took: dict[str, float] = {}
    with timed(took, "masks_s"):
        live.store = bind_store(prep, live.model, s, planned, announce=announce)
    clock["masks_s"] = clock.get("masks_s", 0.0) + took["masks_s"]


def config_scores(prep: Prepared, s: Settings, live: Live, objectives: dict, clock: dict) -> dict:
    """Your config as written, scored with its own masks (one more mask pass:
    no setting searched had them)."""
    _say("Computing your config's own masks to score it as written (no setting searched had them)",
         s.quiet)
    rebind(prep, s, live, prep.planned, clock, announce=None)  # scored, not searched
    return score_point(live, objectives, (prep.start_lambda, *prep.start_weights))


def settings_report(prep: Prepared, settings: Sequence[Setting], rows: Sequence[dict], chosen: int,
                    total_budget: int | None) -> dict:
    """tune.json's "settings": each (density, order) searched, its budget,
    evaluations, best point and (with several) its fit and held-out objective."""
    out = []
    for i, (setting, row) in enumerate(zip(settings, rows)):
        result = row["result"]
        out.append({
            "label": setting.label(prep.labels), "density": setting.density, "order": setting.order,
            "models": [prep.labels[j] for j in setting.ranks], "your_config": setting.yours,
            "budget": row["budget"], "evaluations": len(row["points"]), "stopped": result.stopped,
            "optimizer": result.optimizer, "lambda": result.best[0],
            "weights": dict(zip(prep.names()[1:], result.best[1:])), "fit": result.score,
            "heldout": row.get("heldout"),
            "masks_s": row["masks_s"], "search_s": row["search_s"], "chosen": i == chosen,
        })
    return {"total_budget": total_budget, "evaluations": sum(len(r["points"]) for r in rows), "searched": out}


def add_baselines(report: dict, prep: Prepared, s: Settings, live: Live, objectives: dict, optimizer: str,
                  tuned_ta: bool | None, one_lambda: Sequence[str]) -> None:
    """Phase 6: free the cabs store, settle whether tuned task arithmetic runs
    (`tuned_decision`: its line, when it does not, printed and kept in the
    notes), run the baselines and put their comparison in the report."""
    need, places = tuned_store_bytes(live.store.slots), live.store.places()
    live.store = None  # the cabs store is freed before a baseline's is built
    release_memory()
    run_tuned, note = tuned_decision(tuned_ta, need, places, available_memory(s.store_device))
    report["memory"]["tuned_task_arithmetic_store_bytes"] = need
    if note:
        _say(note, False)
        report["search"]["notes"].append(note)
    if run_tuned or one_lambda:
        with timed(report["time"], "baselines_s"):
            found = run_baselines(prep, s, live, objectives, optimizer, run_tuned, one_lambda)
        report["baselines"] = comparison(objectives["heldout"], report, found, items_word(report))


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
    """A causal LM in `dtype`, on `device`, in eval mode (without transformers' progress bars)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # ours say what is going on
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
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
    _say(f"Loading the base model {prep.config.base_model} and scoring it on {len(prep.tasks)} data sets", s.quiet)
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


def mean_measures(scored: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each measure's mean over the items."""
    return {m: float(v.mean()) for m, v in scored.items()}


def check_finite(model, ref, base: bool = False) -> None:
    """A loaded model's weights hold no NaN or infinity (checked as each is
    loaded, before it is scored); TuneError naming the model and the tensor."""
    from mergekit_cabs.planning import model_label

    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise TuneError(f"{model_label(ref, base)}: tensor {name} holds NaN or infinite values; "
                                "fix or drop that model")


def check_scored(live: Live, x: Sequence[float], losses: dict[str, float], prep: Prepared) -> None:
    """A point's losses are finite; else a TuneError naming the point, the
    merged tensor that holds NaN or infinity and the model keeping it there."""
    bad = [task for task, loss in losses.items() if not math.isfinite(loss)]
    if not bad:
        return
    point = ", ".join(f"{k} {w:.4g}" for k, w in zip(prep.names(), x))
    found = live.store.non_finite()
    if found is None:
        where = "its weights are finite, so the forward pass overflows"
    else:
        tensor, model = found
        owner = "" if model is None else f", at a place {prep.labels[model]!r} keeps"
        where = f"its tensor {tensor} holds NaN or infinite values{owner}"
    raise TuneError(f"tune: the merge at {point} scores a non-finite loss on the data of {bad[0]!r}: {where}; "
                    "narrow --weight-bounds or --lambda-bounds, or check that model's weights")


def bind_store(prep: Prepared, model, s: Settings, planned=None, announce: str | None = "") -> WeightStore:
    """Phase 2: the masks, through mergekit's merge, kept in a store bound to `model`.
    The merge runs where the store will live: on the host unless the store is
    kept on the device, so that one tensor's merge (its inputs, masks and
    temporaries: about 25 bytes per weight of the largest tensor by a count
    of its arrays, 13 GB for a 128k-vocabulary 8B's embeddings) never needs
    device memory.  `planned`: a setting's plan (None: the configuration's);
    `announce`: say when the models' kept places overlap (once per search;
    None: not), the setting's words put after "overlap"."""
    store = build_store(prep.planned if planned is None else planned, prep.finetunes, model,
                        device=s.store_device, store_device=s.store_device, progress=not s.quiet)
    for slot in store.slots:
        slot.group = prep.groups.of(slot.name)
    release_memory()
    if announce is not None and not store.disjoint:
        _say(
            f"tune: the models' kept places overlap{announce} ({store.shared_places():,} of {store.places():,} "
            "places are changed by two or more models: overlap: fill with K*n > m, or conflict_aware: false); the "
            "weights are no longer independent, and every model's pruned tensor is kept in memory",
            False,
        )
    return store


def widen_to_start(prep: Prepared, s: Settings) -> list[str]:
    """Your configuration, as written, is the search's first point: a
    configured weight or lambda outside --weight-bounds/--lambda-bounds widens
    those bounds to include it (`s` is changed).  One line per bound widened
    (printed, and kept for the report); none when the start is inside."""
    notes = []
    for what, attr, values in (("--weight-bounds", "weight_bounds", prep.start_weights),
                               ("--lambda-bounds", "lambda_bounds", [prep.start_lambda])):
        lo, hi = getattr(s, attr)
        new = (min(lo, *values), max(hi, *values))
        if new != (lo, hi):
            setattr(s, attr, new)
            notes.append(f"tune: your config sets {'lambda' if attr == 'lambda_bounds' else 'a weight'} "
                         f"{min(values) if new[0] < lo else max(values):g}, outside {what} {lo:g},{hi:g}; the "
                         f"search covers {new[0]:g},{new[1]:g} instead, so it starts from your config as written")
            _say(notes[-1], False)
    return notes


def below_config(scores: dict) -> list[str]:
    """One line when the chosen point scores below your config on the fit
    windows (it cannot when the search started from it, barring the 10-digit
    rounding of its points), else none."""
    mine, best = scores["start"]["fit"]["score"], scores["best"]["fit"]["score"]
    if best >= mine:
        return []
    return [f"tune: tuned.yml scores below your config on the fit windows ({best:.6g} < {mine:.6g} on the "
            "searched objective); your config is the better of the two there"]  # the summary says it


def search_space(prep: Prepared, s: Settings) -> tuple[list[str], list[tuple[float, float]], tuple[float, ...]]:
    """The searched numbers (lambda, then each model's weight or weights): names, bounds, start."""
    names = prep.names()
    bounds = [s.lambda_bounds] + [s.weight_bounds] * (len(names) - 1)
    return names, bounds, (prep.start_lambda, *prep.start_weights)


def search(live: Live, objective: Objective, prep: Prepared, s: Settings,
           say_budget: bool = True) -> tuple[SearchResult, list[dict]]:
    """Phase 3: the search (`optimise`) on the fit windows; every point
    evaluated, timed (`say_budget`: print `budget_note`'s line, if any)."""
    import tqdm

    names, bounds, start = search_space(prep, s)
    note = budget_note(len(bounds), s.budget, s.budget_option, s.budget_shares) if say_budget else None
    if note:
        _say(note, False)
    points: list[dict] = []
    bar = tqdm.tqdm(total=s.budget, desc="Tuning", unit="eval", disable=s.quiet)

    def evaluate(x: tuple[float, ...]) -> float:
        took: dict[str, float] = {}
        with timed(took, "set_s"):
            live.set(x)
            if s.device.startswith("cuda"):
                torch.cuda.synchronize()
        with timed(took, "eval_s"):
            fit = means(live.losses("fit"))
        check_scored(live, x, fit, prep)
        score = objective.score(fit)
        points.append({"lambda": x[0], "weights": dict(zip(names[1:], x[1:])), "fit_loss": fit, "score": score,
                       **took})
        bar.update(1)
        bar.set_postfix(best=f"{max(p['score'] for p in points):.4f}")
        return score

    with bar:
        result = optimise(s.optimizer, evaluate, start, bounds, budget=s.budget, tolerance=s.tolerance, seed=s.seed,
                          coupled=not live.store.disjoint)
    return result, points


def score_point(live: Live, objectives: dict[str, Objective], x: Sequence[float]) -> dict:
    """Phase 4: losses, gains and objective of point x on both splits (the model is left at x)."""
    live.set(x)
    return score_now(live, objectives)


def heldout_score(live: Live, objectives: dict[str, Objective], x: Sequence[float]) -> float:
    """The objective of point x on the held-out data alone (the model is left at x)."""
    live.set(x)
    return objectives["heldout"].score(means(live.losses("heldout")))


def score_now(live: Live, objectives: dict[str, Objective]) -> dict:
    """Losses (mean and per window), gains and objective of the live model as it is, on both splits."""
    out = {}
    for split in SPLITS:
        scored = live.scores(split)
        per_item = {t.name: scored[t.name][t.measure] for t in live.tasks}
        losses = means(per_item)
        out[split] = {"loss": losses, "gain": objectives[split].gains(losses), "score": objectives[split].score(losses),
                      "window_losses": {k: v.tolist() for k, v in per_item.items()},
                      "measures": {k: mean_measures(by) for k, by in scored.items()}}
    return out


def assemble_report(prep: Prepared, s: Settings, reference: dict, live: Live, result: SearchResult,
                    points: list[dict], scores: dict, clock: dict, tuned: dict) -> dict:
    """Phase 5: the report (what tune.json holds)."""
    names, bounds, start = search_space(prep, s)
    store, labels = live.store, prep.labels
    model_bytes = held_bytes(live.model.state_dict().values())
    begin = result.history[0][0]
    return {
        "config": str(prep.config_path),
        "base_model": str(prep.config.base_model),
        "models": {label: str(ref) for label, ref in zip(labels, prep.finetunes)},
        "objective": s.objective,
        "general_weight": s.general_weight if any(t.name == GENERAL for t in prep.tasks) else None,
        "device": s.device,
        "score_dtype": str(s.score_dtype).removeprefix("torch."),
        "data": {t.name: data_report(t) for t in prep.tasks},
        "search": {"names": names, "bounds": [list(b) for b in bounds], "start": list(start),
                   "budget": s.budget, "tolerance": s.tolerance, "evaluations": len(points), "stopped": result.stopped,
                   "optimizer": result.optimizer, "optimizer_option": s.optimizer, "seed": s.seed,
                   "weights_of": {label: prep.groups.names([label]) for label in labels}},
        "supports": {"disjoint": store.disjoint, "shared_places": store.shared_places(), "places": store.places(),
                     "merged_tensors": len(store.slots), "fixed_tensors": store.fixed},
        "memory": {"store_bytes": store.nbytes(), "model_bytes": model_bytes,
                   "store_bytes_per_place": store.nbytes() / max(1, store.places()),
                   "store_device": s.store_device, "score_dtype": str(s.score_dtype).removeprefix("torch.")},
        "reference": reference,
        "layer_groups": layer_group_report(prep.groups),
        "start": {"lambda": begin[0], "weights": dict(zip(names[1:], begin[1:])), **scores["start"]},
        "best": {"lambda": result.best[0], "weights": dict(zip(names[1:], result.best[1:])), **scores["best"]},
        "points": points,
        "time": clock,
        "tuned_config": tuned,
    }


def data_report(task) -> dict:
    """A task in tune.json: its file, kind, measure (and direction), weight, items per split and details."""
    return {"file": task.path, "kind": task.kind, "measure": task.measure, "lower_is_better": task.lower_is_better,
            "weight": task.weight, **{f"{split}_items": task.count(split) for split in SPLITS}, **task.describe()}


def layer_group_report(groups: LayerGroups) -> dict | None:
    """The layer groups in tune.json: each group's words and decoder layers; None without groups."""
    if groups.count == 1:
        return None
    labels = groups.labels()
    return {"count": len(groups.spans), "groups": [{"name": label, "layers": list(span)} for label, span in
                                                   zip(labels, [*groups.spans, ()])]}
