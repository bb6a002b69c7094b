"""The baselines `tune` scores beside tuned cabs, on the same windows.

* Task arithmetic tuned the same way (``task_arithmetic_tuned``; by default
  on when its store fits in the free memory, `tuned_decision`): the
  same search (the optimiser the cabs search used, its layer groups, bounds,
  budget and start) through a weight store built as for cabs, from the
  configuration with every place kept (``density: 1.0``) and no
  conflict-aware exclusion (``conflict_aware: false``): the kernel's sum,
  which is task arithmetic's.  The chosen weights are then written as a
  ``merge_method: task_arithmetic`` YAML (`task_arithmetic_tuned.yml`),
  merged by mergekit's own method in memory, and that model is what is
  scored and reported.
* One-lambda references (``--baselines task_arithmetic,ties,dare_ties``,
  which names exactly the baselines run: add ``task_arithmetic_tuned`` to keep it):
  the configuration's models and weights (and, for ties/dare_ties, its
  densities) merged by mergekit's own method, in memory, through the same
  mergekit plan and executor the store uses.  The merge is ``base + lambda *
  delta``, so one merge at lambda 1 gives every lambda: its lambda is
  searched on the fit windows from that one merge (base and merged tensor
  held, rebuilt in float32 and rounded to the merge dtype), then the
  chosen lambda is merged once more by mergekit and that model is scored
  and reported.  dare_ties draws with a fixed seed (`--seed`), set as
  ``mergekit-yaml --random-seed`` sets it.

Each runs after the cabs search, one at a time, the previous store freed:
the peak is the largest store plus the live model.  Tuned task arithmetic's
store is (K + 1) x 2 bytes per merged parameter in 16 bits (K models): above
cabs's 5 from K = 2 on, so it runs by default only where it fits.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergekit_cabs.kernel import compute_dtype, finish
from mergekit_cabs.tune.compare import comparison
from mergekit_cabs.tune.config import model_items, shared_dicts, tuned_config
from mergekit_cabs.tune.live import Live, Settings, bind_store, say, score_now, search, search_notes, timed
from mergekit_cabs.tune.options import ONE_LAMBDA, TUNED, TuneError
from mergekit_cabs.tune.prepare import Prepared
from mergekit_cabs.tune.rows import items_word, means
from mergekit_cabs.tune.search import optimise
from mergekit_cabs.tune.store import APPLY_CHUNK, held_bytes, release_memory, write_merges

CABS_ONLY = ("n", "block_size", "overlap", "conflict_aware", "balanced")


KNOWN = (TUNED, *ONE_LAMBDA)
SCORING_BYTES = 1 << 30  # host memory an evaluation takes besides the weights (measured about 1.0 GB at 220M)
FALLBACK_PLACES = 1_500_000_000  # where the free memory cannot be read: tuned task arithmetic up to this size


def parse_baselines(text: str | None) -> tuple[bool | None, tuple[str, ...]]:
    """--baselines: (tuned task arithmetic: True = run it, False = not, None =
    when it fits in memory (`tuned_decision`); the one-lambda methods).
    None: tuned task arithmetic when it fits; "none": nothing; a list of
    names: exactly those (``task_arithmetic_tuned`` runs it whatever its
    size).  A text that names nothing ("", ",") is refused, as is none
    beside other names."""
    if text is None:
        return None, ()
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise TuneError(f"--baselines {text!r} names no baseline; give the names to run ({', '.join(KNOWN)}, "
                        "comma-separated), or none for no baseline")
    if set(names) == {"none"}:
        return False, ()
    if "none" in names:
        raise TuneError(f"--baselines {text!r}: none (no baseline) cannot be combined with other names; give none "
                        "alone, or only the baselines to run")
    bad = [n for n in names if n not in KNOWN]
    if bad:
        raise TuneError(f"--baselines names {bad[0]!r}; known: {', '.join(KNOWN)} (comma-separated, exactly those "
                        "run), or none (no baseline); without --baselines, task_arithmetic_tuned when it fits in "
                        "memory")
    return TUNED in names, tuple(n for n in dict.fromkeys(names) if n != TUNED)


# --- whether tuned task arithmetic fits -----------------------------------------------------


def tuned_store_bytes(slots) -> int:
    """Bytes the tuned task arithmetic's store holds for these merged tensors
    (a cabs store's slots): per tensor, every model's tensor and the base, in
    the merge dtype (no keep-mask: every place is kept)."""
    return sum((len(s.models) + 1) * s.base.numel() * s.base.element_size() for s in slots)


def available_memory(store_device: str = "cpu") -> int | None:
    """Bytes free for the store where it lives: the GPU's free memory for a
    CUDA store, else the host's MemAvailable (/proc/meminfo); None where it
    cannot be read (not Linux)."""
    if str(store_device).startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(store_device))[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def tuned_decision(asked: bool | None, need: int, places: int, available: int | None) -> tuple[bool, str | None]:
    """Whether tuned task arithmetic runs, and the line that says why not
    (None when it runs or was not asked for).  `asked` as `parse_baselines`
    gives it; `need`: its store's bytes (`tuned_store_bytes`); `places`:
    merged parameters; `available`: free bytes (None: unknown).  Run by
    default only when the store and `SCORING_BYTES` fit in what is free (the
    live model is already held), or, unknown, up to `FALLBACK_PLACES`."""
    if asked is not None:
        return asked, None
    fits = need + SCORING_BYTES <= available if available is not None else places <= FALLBACK_PLACES
    if fits:
        return True, None
    per = need / max(1, places)
    cost = f"it needs about {gb(need + SCORING_BYTES)} more memory (its store, {per:.1f} bytes per merged parameter, " \
           f"and {gb(SCORING_BYTES)} to score)"
    why = (f"{gb(available)} is available" if available is not None else
           f"the free memory cannot be read here, and {places / 1e9:.2f}B merged parameters is over "
           f"{FALLBACK_PLACES / 1e9:.1f}B")
    return False, (f"tune: task arithmetic tuned the same way was not run: {cost}, and {why}; "
                   "--baselines task_arithmetic_tuned runs it anyway")


# --- the configurations ------------------------------------------------------------------


def dense_cabs(raw: dict) -> dict:
    """The cabs configuration of task arithmetic: every place kept
    (density 1.0 everywhere), no conflict-aware exclusion."""
    out = copy.deepcopy(raw)
    shared = shared_dicts(out)
    for params in shared:
        params.pop("n", None)
        params.update({k: v for k, v in (("density", 1.0), ("conflict_aware", False)) if k in params})
    shared[0].update(density=1.0, conflict_aware=False, overlap="fill")
    for item in model_items(out):
        params = item["parameters"] = item.get("parameters") or {}
        params.pop("n", None)
        params["density"] = 1.0
    return out


def as_method(raw: dict, method: str, lam: float | None = None) -> dict:
    """The configuration merged by mergekit's `method` (task_arithmetic, ties,
    dare_ties): the same models, weights (1.0 where none is set) and, but for
    task_arithmetic, densities (an ``n`` becomes n / block_size); cabs-only
    settings dropped; lambda set to `lam` when given."""
    from mergekit_cabs.params import DEFAULT_BLOCK_SIZE

    out = copy.deepcopy(raw)
    out["merge_method"] = method
    shared = shared_dicts(out)
    block = shared[0].get("block_size", DEFAULT_BLOCK_SIZE)
    for item in model_items(out):
        params = item["parameters"] = item.get("parameters") or {}
        if "n" in params and "density" not in params:
            params["density"] = params["n"] / block
        params.setdefault("weight", 1.0)
    if "n" in shared[0] and "density" not in shared[0]:
        shared[0]["density"] = shared[0]["n"] / block
    for params in shared + [item["parameters"] for item in model_items(out)]:
        for key in CABS_ONLY + (("density",) if method == "task_arithmetic" else ()):
            params.pop(key, None)
    if lam is not None:
        for params in shared:
            params["lambda"] = float(lam)
    return out


# --- merging with mergekit, in memory ---------------------------------------------------------


def merge_into(model, raw: dict, *, device: str = "cpu", seed: int | None = None, sink=None) -> int:
    """Merge `raw` with mergekit's own plan and executor, one tensor at a
    time, writing each result into `model` (cast as mergekit-yaml saves it);
    with `sink`, mergekit's task-arithmetic-family merges are also handed to
    it (`_mergekit.capture_task_arithmetic`).  Returns 1: one merge."""
    import contextlib

    from mergekit.config import MergeConfiguration

    from mergekit_cabs import _mergekit, planning

    try:
        config = MergeConfiguration.model_validate(raw)
    except (ValueError, TypeError) as error:
        raise TuneError(f"tune: the {raw.get('merge_method')} baseline's configuration is not valid: {error}") from None
    planned = planning.plan_tasks(config)
    by_task = {t.task: types.SimpleNamespace(name=t.name, save_dtype=dtype) for t, dtype in planned}
    if seed is not None:
        _mergekit.seed_random_merges(seed)
    capture = _mergekit.capture_task_arithmetic(sink) if sink else contextlib.nullcontext()
    with capture, torch.no_grad():
        for p, target, save in write_merges(by_task, model, device):
            if sink:
                sink.bind(p.name, target, save)
    return 1


@dataclass
class LambdaSlot:
    """One tensor of a one-lambda merge: the base and the merge at lambda 1
    (flat, merge dtype), and the live tensor they rebuild for any lambda."""

    base: torch.Tensor
    merged: torch.Tensor
    target: torch.Tensor | None = None
    save_dtype: torch.dtype | None = None

    def write(self, lam: float) -> None:
        """target = base + lam * (merged - base), in float32 (float64 for
        float64 tensors), rounded once to the merge dtype."""
        dtype = compute_dtype(self.base)
        flat = self.target.view(-1)
        for start in range(0, flat.numel(), APPLY_CHUNK):
            where = slice(start, start + APPLY_CHUNK)
            base = self.base[where]
            value = finish(self.merged[where].to(dtype) - base.to(dtype), base, lam, self.base.dtype)
            flat[where].copy_(value if self.save_dtype is None else value.to(self.save_dtype))


class LambdaStore:
    """Handed mergekit's merges (`merge_into`'s sink): keeps each tensor's
    base and result; `apply(lam)` sets the live model to lambda `lam`."""

    def __init__(self):
        self.pending: dict[str, LambdaSlot] = {}
        self.slots: list[LambdaSlot] = []

    def __call__(self, group, result) -> None:
        if group.non_base and group.base.tensor.numel():
            base = group.base.tensor
            self.pending[group.metadata.name] = LambdaSlot(base.reshape(-1).clone(), result.reshape(-1).clone())

    def bind(self, name: str, target: torch.Tensor, save_dtype) -> None:
        slot = self.pending.pop(name, None)
        if slot is not None:
            slot.target, slot.save_dtype = target, save_dtype
            self.slots.append(slot)

    def apply(self, lam: float) -> None:
        with torch.no_grad():
            for slot in self.slots:
                slot.write(lam)

    def nbytes(self) -> int:
        return held_bytes(t for s in self.slots for t in (s.base, s.merged))


# --- the runs ------------------------------------------------------------------------------


def one_lambda(method: str, prep, s, live, objectives, seed: int) -> dict:
    """A one-lambda baseline: one merge at lambda 1 (the search's), lambda
    searched on the fit windows, the chosen lambda merged once more and scored."""

    store = LambdaStore()
    merges = merge_into(live.model, as_method(prep.raw, method, 1.0), seed=seed, sink=store)
    points = []

    def evaluate(x: tuple[float, ...]) -> float:
        store.apply(x[0])
        score = objectives["fit"].score(means(live.losses("fit")))
        points.append({"lambda": x[0], "score": score})
        return score

    start = min(max(1.0, s.lambda_bounds[0]), s.lambda_bounds[1])
    result = optimise("coordinate", evaluate, (start,), [s.lambda_bounds], budget=s.budget, tolerance=s.tolerance,
                      seed=s.seed)
    store_bytes = store.nbytes()
    store.slots.clear()  # freed before the chosen lambda is merged
    release_memory()
    chosen = as_method(prep.raw, method, result.best[0])
    merges += merge_into(live.model, chosen, seed=seed)
    return {"name": method, "lambda": result.best[0], "weights": None, "config": chosen, "evaluations": len(points),
            "merges": merges, "search_merges": 1, "stopped": result.stopped, "store_bytes": store_bytes,
            "points": points, "seed": seed if method == "dare_ties" else None, **score_now(live, objectives)}


def tuned_task_arithmetic(prep, s, live, objectives, optimizer: str) -> dict:
    """Task arithmetic searched as cabs is (the same optimiser, groups,
    bounds, budget and start: your config's point or the best one-lambda
    point, whichever scores higher), through a store of the configuration
    with every place kept; the chosen point merged by mergekit's
    task_arithmetic and scored.  Its budget line is cabs's (not said twice)."""
    from mergekit.config import MergeConfiguration

    from mergekit_cabs.planning import plan

    planned = plan(MergeConfiguration.model_validate(dense_cabs(prep.raw)), shapes=False)
    live.store = bind_store(prep, live.model, s, planned, announce=None)  # every place kept: shared, not said
    store_bytes = live.store.nbytes()
    result, points = search(live, objectives["fit"], prep, dataclasses.replace(s, optimizer=optimizer),
                            say_budget=False)
    live.store = None
    release_memory()
    chosen = tuned_config(as_method(prep.raw, "task_arithmetic"), prep.finetunes, result.best[1:], result.best[0],
                          prep.groups)
    merges = merge_into(live.model, chosen)
    names = prep.names()
    return {"name": TUNED, "lambda": result.best[0], "weights": dict(zip(names[1:], result.best[1:])),
            "config": chosen, "evaluations": len(points), "merges": 1 + merges, "search_merges": 1,
            "stopped": result.stopped, "store_bytes": store_bytes,
            "points": [{"lambda": p["lambda"], "weights": p["weights"], "score": p["score"]} for p in points],
            "seed": None, **search_notes(prep, s, result), **({"gradient": result.details} if result.details else {}),
            **score_now(live, objectives)}


def run_baselines(prep, s, live, objectives, optimizer: str, tuned: bool, methods: Sequence[str]) -> list[dict]:
    """Every baseline asked for (`tuned`: tuned task arithmetic, as
    `tuned_decision` settled it), one after the other on the live model
    (whose cabs store the caller has freed); each one's report."""
    import sys

    out = []
    if tuned:
        if not s.quiet:
            print("Tuning task arithmetic the same way (every place kept)", file=sys.stderr, flush=True)
        out.append(tuned_task_arithmetic(prep, s, live, objectives, optimizer))
    for method in methods:
        if not s.quiet:
            print(f"Merging {method} with mergekit, lambda picked on the fit data", file=sys.stderr, flush=True)
        out.append(one_lambda(method, prep, s, live, objectives, s.seed))
    return out


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
        say(note, False)
        report["search"]["notes"].append(note)
    if run_tuned or one_lambda:
        with timed(report["time"], "baselines_s"):
            found = run_baselines(prep, s, live, objectives, optimizer, run_tuned, one_lambda)
        report["baselines"] = comparison(objectives["heldout"], report, found, items_word(t.kind for t in prep.tasks))
