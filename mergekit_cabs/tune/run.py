"""The `tune` run, phase by phase (`run_tune`, after `prepare.prepare`):
score the references (`references`), search each (density, order) setting
(`settings`: its masks in a store, `live`: one search), score your config
and the chosen point, write the chosen point as tuned.yml (`config`), run
the baselines (`baselines`) and assemble the report, which `report` and
`outputs` show and write.  Nothing here computes: each phase is a call."""

from __future__ import annotations

import dataclasses

from mergekit_cabs.tune.baselines import (
    add_baselines,
    parse_baselines,
)
from mergekit_cabs.tune.config import check_round_trip, tuned_config
from mergekit_cabs.tune.live import Live, Settings, check_search, say, search_notes, search_space, timed
from mergekit_cabs.tune.objective import split_objectives
from mergekit_cabs.tune.options import (
    DEFAULTS,
    GENERAL,
    check_device_settings,
    check_optimizer,
    implied_objective,
)
from mergekit_cabs.tune.prepare import Prepared
from mergekit_cabs.tune.references import score_references, scoring_dtype
from mergekit_cabs.tune.rows import SPLITS
from mergekit_cabs.tune.search import SearchResult
from mergekit_cabs.tune.settings import (
    check_settings,
    final_scores,
    parse_densities,
    parse_orders,
    plan_settings,
    search_each,
    setting_budgets,
    settings_report,
)
from mergekit_cabs.tune.store import held_bytes


def run_tune(prep: Prepared, *, device: str = "cpu", objective: str | None = None,
             general_weight: float = DEFAULTS["general_weight"], budget: int = DEFAULTS["budget"],
             weight_bounds=DEFAULTS["weight_bounds"], lambda_bounds=DEFAULTS["lambda_bounds"],
             tolerance: float = DEFAULTS["tolerance"], batch_size: int = DEFAULTS["batch_size"],
             score_dtype: str = DEFAULTS["score_dtype"], store_on_device: bool = False,
             quiet: bool = False, optimizer: str = DEFAULTS["optimizer"], seed: int = DEFAULTS["seed"],
             baselines: str | None = None, densities: str | None = None, orders: str | None = None,
             total_budget: int | None = None, minibatch: int = DEFAULTS["minibatch"],
             learning_rate: float = DEFAULTS["learning_rate"], finished=None) -> dict:
    """Load the models, build the store, search, and return the report (a dict).
    `baselines`: as --baselines (None: tuned task arithmetic when it fits in
    memory; "none": none), scored after the search (`baselines`, `compare`).
    `densities`, `orders`: as --densities, --orders; each setting is searched
    with `budget`, or a share of `total_budget` (`settings`), the best on the
    fit items chosen.  `objective` None: "gain" with per-model data, "loss"
    with the general set alone; `score_dtype`: "merge" or "float32";
    `store_on_device`: the store on `device`, not the host; `minibatch`,
    `learning_rate`: the gradient search's (`budget` counts its steps);
    `finished`: called with the report before the baselines start."""
    check_optimizer(optimizer, seed)
    check_search(prep, optimizer, budget, minibatch, learning_rate)
    check_device_settings(device=device, score_dtype=score_dtype, store_on_device=store_on_device)
    (tuned_ta, one_lambda), asked = parse_baselines(baselines), (parse_densities(densities), parse_orders(orders))
    objective = implied_objective(objective, any(t.name != GENERAL for t in prep.tasks))
    known = check_settings(prep, *asked, total_budget)  # before the suggested order reads every tensor
    clock: dict[str, float] = {"masks_s": 0.0, "search_s": 0.0}
    with timed(clock, "settings_s"):  # planning each setting; a suggested order reads every tensor once
        settings = plan_settings(prep, *asked, progress=not quiet, say=lambda line: say(line, False), known=known)
    budgets = setting_budgets(len(settings), budget, total_budget)
    s = Settings(device, device if store_on_device else "cpu", scoring_dtype(prep.config, score_dtype), objective,
                 general_weight, budget, tuple(weight_bounds), tuple(lambda_bounds), tolerance, batch_size, quiet,
                 optimizer, seed, *(("--budget", 1) if total_budget is None else ("--total-budget", len(settings))),
                 minibatch, learning_rate)
    widened = widen_to_start(prep, s)
    with timed(clock, "total_s"):
        with timed(clock, "reference_s"):
            model, reference = score_references(prep, s)
        objectives = split_objectives(objective, list(reference["models"]), reference, general_weight,
                                      {t.name: t.weight for t in prep.tasks},
                                      {t.name: t.lower_is_better for t in prep.tasks})
        live, rows, start = search_each(prep, s, model, objectives, settings, budgets, clock)
        chosen = max(range(len(rows)), key=lambda i: (rows[i]["result"].score, -i))  # the first of equals
        result, points = rows[chosen]["result"], rows[chosen]["points"]
        say(final_words(result, points), quiet)
        with timed(clock, "final_s"):
            scores = final_scores(prep, s, live, objectives, settings, chosen, start, result.best, clock)
    setting = settings[chosen]
    tuned = tuned_config(setting.raw, prep.finetunes, result.best[1:], result.best[0], prep.groups)
    check_round_trip(tuned, prep.finetunes, result.best[1:], result.best[0], prep.groups, expected=setting.planned)
    report = assemble_report(prep, dataclasses.replace(s, budget=budgets[chosen]), reference, live, result, points,
                             scores, clock, tuned)
    report["settings"] = settings_report(prep, settings, rows, chosen, total_budget)
    add_notes(report, widened, below_config(scores))
    if finished is not None:
        finished(report)
    if tuned_ta is not False or one_lambda:
        s = dataclasses.replace(s, budget=budget if total_budget is None else total_budget, budget_shares=1)
        add_baselines(report, prep, s, live, objectives, result.optimizer, tuned_ta, one_lambda)
    return report


def add_notes(report: dict, widened: list[str], below: list[str]) -> None:
    """The lines the run said about your config, kept in the report, and whether tuned.yml scores below it."""
    report["search"]["notes"], report["scores_below_config"] = widened + below, bool(below)


def final_words(result: SearchResult, points: list[dict]) -> str:
    """The line said before the final scoring: how the search ended, and what it spent."""
    steps = f"{result.details['steps']} gradient steps and " if result.details else ""
    return (f"Scoring your config and the chosen point on the fit and held-out data "
            f"({'budget spent' if result.stopped == 'budget' else 'converged'}: {steps}{len(points)} evaluation"
            f"{'' if len(points) == 1 else 's'})")


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
            say(notes[-1], False)
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


def assemble_report(prep: Prepared, s: Settings, reference: dict, live: Live, result: SearchResult,
                    points: list[dict], scores: dict, clock: dict, tuned: dict) -> dict:
    """Phase 5: the report (what tune.json holds); the mean times per point added to `clock`."""
    clock.update(set_weights_mean_s=sum(p["set_s"] for p in points) / len(points),
                 evaluate_mean_s=sum(p["eval_s"] for p in points) / len(points))
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
                   "weights_of": {label: prep.groups.names([label]) for label in labels},
                   **search_notes(prep, s, result), **({"gradient": result.details} if result.details else {})},
        "supports": {"disjoint": store.disjoint, "shared_places": store.shared_places(), "places": store.places(),
                     "merged_tensors": len(store.slots), "fixed_tensors": store.fixed},
        "memory": {"store_bytes": store.nbytes(), "model_bytes": model_bytes,
                   "store_bytes_per_place": store.nbytes() / max(1, store.places()),
                   "store_device": s.store_device, "score_dtype": str(s.score_dtype).removeprefix("torch.")},
        "reference": reference,
        "layer_groups": prep.groups.report(),
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
