"""Density and order as searched settings (`tune --densities`, `--orders`).

A *setting* is the configuration with every fine-tune at one density (or
one ``n``) and the models in one priority order; the configuration as
written is the setting with neither changed.  Each setting has its own
masks, so `search_each` builds a store per setting (one mask pass, as tune
does at start) and searches its weights; `run` keeps the setting whose best
point scores highest on the fit windows.  This module parses the options,
writes each setting's configuration and plans it with mergekit, and searches
the settings one after another; the suggested order is `analyze`'s
(`analyze.order_of`: its rule, its code).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from mergekit_cabs.params import CabsError
from mergekit_cabs.tune.config import mask_signature, model_items, shared_dicts
from mergekit_cabs.tune.live import Live, Settings, bind_store, heldout_score, say, score_point, search, timed
from mergekit_cabs.tune.options import TuneError
from mergekit_cabs.tune.prepare import Prepared
from mergekit_cabs.tune.store import release_memory

ORDER_NAMES = ("config", "suggested", "all")
MAX_ALL = 4  # --orders all tries every order up to this many models (4! = 24 settings)


@dataclass
class Setting:
    """One density and order: its configuration (raw YAML dict) and mergekit's plan of it."""

    density: float | int | None  # float: a density for every model; int: n for every model; None: as configured
    order: str  # "config", "suggested", or the order written out ("all")
    ranks: tuple[int, ...]  # the models (indices into `Prepared.finetunes`) in priority order
    raw: dict
    planned: list
    yours: bool = False  # it plans your configuration's masks (`plan_settings` sets it)

    @functools.cached_property
    def signature(self) -> list[tuple]:
        """`mask_signature` of its plan, computed once."""
        return mask_signature(self.planned)

    def label(self, labels: Sequence[str]) -> str:
        """'density 0.25, order a > b > c' (the configured density is 'density as configured')."""
        return f"{density_text(self.density)}, order {' > '.join(labels[i] for i in self.ranks)}"


def density_text(density: float | int | None) -> str:
    """'density 0.25', 'n 64' (an int is n), or 'density as configured' (None)."""
    if density is None:
        return "density as configured"
    return f"n {density}" if isinstance(density, int) else f"density {density:g}"


def parse_densities(text: str | None) -> tuple[float | int, ...]:
    """--densities: comma-separated densities in (0, 1] (written with a
    point: 0.25, 1.0) or whole numbers n >= 1 (places per block of m); ()
    for None (the configured density only)."""
    if text is None:
        return ()
    values: list[float | int] = []
    for item in (part.strip() for part in text.split(",")):
        try:
            value: float | int = float(item) if any(c in item for c in ".eE") else int(item)
        except ValueError:
            value = -1
        ok = (0 < value <= 1 and math.isfinite(value)) if isinstance(value, float) else value >= 1
        if not ok:
            raise TuneError(f"--densities has {item!r}; give densities in (0, 1] with a decimal point "
                            "(0.1,0.25,0.5) or whole numbers n >= 1 (places kept per block), comma-separated")
        if not any(type(v) is type(value) and v == value for v in values):  # density 1.0 and n 1 differ
            values.append(value)
    return tuple(values)


def parse_orders(text: str | None) -> tuple[str, ...]:
    """--orders: comma-separated of config, suggested, all (default: config)."""
    if text is None:
        return ("config",)
    names = [part.strip() for part in text.split(",")]
    unknown = [name for name in names if name not in ORDER_NAMES]
    if unknown or not names:
        raise TuneError(f"--orders has {unknown[0] if unknown else text!r}; it takes {', '.join(ORDER_NAMES)} "
                        "(comma-separated)")
    return tuple(dict.fromkeys(names))


def setting_budgets(count: int, budget: int, total: int | None) -> list[int]:
    """Each setting's budget: --budget each, or --total-budget shared out
    evenly (the first settings take the remainder); TuneError when the
    total leaves a setting none (`count` may be the fewest settings there
    can be: `check_settings`)."""
    if total is None:
        return [budget] * count
    if total < count:
        raise TuneError(f"--total-budget is {total}; the {count} settings (densities x orders) need at least "
                        f"{count} (one evaluation each)")
    share, extra = divmod(total, count)
    return [share + (i < extra) for i in range(count)]


def check_all(count: int) -> None:
    """TuneError when --orders all would try more than `MAX_ALL` models' orders."""
    if count > MAX_ALL:
        raise TuneError(f"--orders all tries every order of the {count} models ({math.factorial(count)}); "
                        f"it is allowed up to {MAX_ALL} models: use config,suggested")


def check_settings(prep, densities: Sequence[float | int], orders: Sequence[str], total: int | None) -> dict:
    """What can be checked of the settings before a tensor is read (the
    suggested order reads them all): every density plans (an n that fits
    the block; a density that keeps a place per block), --orders all's
    model count, and --total-budget against the fewest settings there can be.
    Returns the plans made (`plan_setting`'s `known`), for `plan_settings`."""
    count = len(prep.finetunes)
    if "all" in orders:
        check_all(count)
    known: dict = {}
    for density in densities:
        try:
            plan_setting(prep, density, range(count), "config", known)
        except TuneError:
            raise
        except CabsError as error:
            raise TuneError(f"--densities has {density}: {error}") from None
    fewest = max(len(densities), 1) * (math.factorial(count) if "all" in orders else 1)
    setting_budgets(fewest, 1, total)
    return known


def setting_config(raw: dict, density: float | int | None, ranks: Sequence[int], finetunes) -> dict:
    """The configuration with every fine-tune at `density` (a float; an int
    is ``n``; None keeps it) and `models:` (and each slice's sources) in the
    priority order `ranks` (indices into `finetunes`); the identity keeps
    the order as written (each slice's own, where slices list their
    sources in different orders)."""
    from mergekit.common import ModelReference


    out = copy.deepcopy(raw)
    if density is not None:
        key = "n" if isinstance(density, int) else "density"
        for params in shared_dicts(out):  # a shared n or density would be the fallback of neither
            params.pop("n", None)
            params.pop("density", None)
        for item in model_items(out):
            params = item["parameters"] = item.get("parameters") or {}
            params.pop("n", None)
            params.pop("density", None)
            params[key] = density
    if tuple(ranks) == tuple(range(len(ranks))):
        return out  # the configuration's order: `models:` and each slice's `sources:` as written
    rank = {finetunes[i]: r for r, i in enumerate(ranks)}

    def position(item: dict) -> int:
        return rank.get(ModelReference.model_validate(item["model"]), -1)  # the base (if listed) first

    if out.get("models"):
        out["models"] = sorted(out["models"], key=position)
    for piece in out.get("slices") or []:
        piece["sources"] = sorted(piece.get("sources") or [], key=position)
    return out


def plan_setting(prep, density, ranks: Sequence[int], order: str, known: dict | None = None) -> Setting:
    """A setting with its configuration planned by mergekit (headers only;
    the configuration as written keeps `prep`'s plan); `known`: the plans
    made so far in this run, by (density, ranks), reused and added to."""
    from mergekit.config import MergeConfiguration

    from mergekit_cabs.planning import plan

    ranks = tuple(ranks)
    if density is None and ranks == tuple(range(len(ranks))):
        return Setting(None, order, ranks, prep.raw, prep.planned)
    key, known = (type(density), density, ranks), {} if known is None else known  # density 1.0 is not n 1
    if key not in known:
        config = setting_config(prep.raw, density, ranks, prep.finetunes)
        known[key] = config, plan(MergeConfiguration.model_validate(config), shapes=False)
    return Setting(density, order, ranks, *known[key])


def order_ranks(order: str, prep, density, progress: bool,
                known: dict | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """The priority orders one --orders name stands for, as (name, ranks)."""
    count = len(prep.finetunes)
    if order == "config":
        return [("config", tuple(range(count)))]
    if order == "all":
        check_all(count)
        return [("all", ranks) for ranks in itertools.permutations(range(count))]
    from mergekit_cabs.analyze import order_of

    setting = plan_setting(prep, density, range(count), "config", known)
    if progress:
        where = "" if density is None else f" at {density_text(density)}"
        print(f"Finding the suggested order{where} (analyze's rule: first and last kept norms)", file=sys.stderr,
              flush=True)
    advice = order_of(setting.planned, progress=progress)
    index = {str(ref): i for i, ref in enumerate(prep.finetunes)}
    ranks = [index[name] for name in advice["suggested"]]
    return [("suggested", tuple(ranks + [i for i in range(count) if i not in ranks]))]  # unmeasured ones last


def plan_settings(prep, densities: Sequence[float | int], orders: Sequence[str], progress: bool = True,
                  say=print, known: dict | None = None) -> list[Setting]:
    """Every (density, order) setting asked for, densities outer, each order
    once per density (a suggested order equal to one already listed, or a
    setting with the masks of an earlier one, such as density 0.25 and n 64
    of 256, is said and dropped); the configured density alone when
    `densities` is empty.  `known`: plans already made (`check_settings`)."""
    settings: list[Setting] = []
    known = {} if known is None else known
    mine = mask_signature(prep.planned)
    for density in densities or (None,):
        seen: set[tuple[int, ...]] = set()
        for name in orders:
            for order, ranks in order_ranks(name, prep, density, progress, known):
                if ranks in seen:
                    if order == "suggested":
                        where = "" if density is None else f" at {density_text(density)}"
                        say(f"tune: the suggested order{where} is one already searched; it is searched once")
                    continue
                seen.add(ranks)
                setting = plan_setting(prep, density, ranks, order, known)
                setting.yours = setting.signature == mine
                twin = next((other for other in settings if other.signature == setting.signature), None)
                if twin is None:
                    settings.append(setting)
                else:
                    say(f"tune: {setting.label(prep.labels)} plans the masks of {twin.label(prep.labels)}; "
                        "it is searched once")
    return settings


def search_each(prep: Prepared, s: Settings, model, objectives: dict, settings: Sequence[Setting],
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
            say(f"Setting {i + 1} of {len(settings)}: {setting.label(prep.labels)} (budget {budget})", s.quiet)
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
    say("Computing your config's own masks to score it as written (no setting searched had them)",
         s.quiet)
    rebind(prep, s, live, prep.planned, clock, announce=None)  # scored, not searched
    return score_point(live, objectives, (prep.start_lambda, *prep.start_weights))


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
            "steps": (result.details or {}).get("steps", 0),
            "weights": dict(zip(prep.names()[1:], result.best[1:])), "fit": result.score,
            "heldout": row.get("heldout"),
            "masks_s": row["masks_s"], "search_s": row["search_s"], "chosen": i == chosen,
        })
    return {"total_budget": total_budget, "evaluations": sum(len(r["points"]) for r in rows), "searched": out}
