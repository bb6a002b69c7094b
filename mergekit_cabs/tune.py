"""`mergekit-cabs tune`: pick each model's weight (and lambda) from the user's data.

A CABS merge is ``base + lambda * sum_i weight_i * (mask_i * tau_i)``.  The
masks do not depend on the weights, so the tuner computes them once, through
mergekit's own plan and execution graph (filters, gradients, slices and dtype
settings resolve exactly as in ``mergekit-yaml``), and keeps what it needs to
rebuild any merged tensor:

* where the kept places of the models are disjoint (K * n <= m with
  ``conflict_aware: true``), one tensor holding, at every kept place, the
  owning model's weight (``tau = kept - base`` there) and a one-byte owner
  index: each weight moves its own places only;
* elsewhere (``overlap: fill`` with K * n > m, or ``conflict_aware: false``)
  every model's tensor and keep-mask, and the weights interact.

Setting a weight vector is then one pass over the parameters with the same
arithmetic as the kernel (float32, one rounding), written into a live
transformers model that is scored on each model's own data.  A search over the
weights and lambda (coordinate-wise, with halving steps) maximises the mean
normalized gain over tasks; the chosen point is written as ``tuned.yml``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

OBJECTIVES = ("gain", "loss")
OUT_FILES = ("tuned.yml", "tune.md", "tune.png", "tune.json")
GENERAL = "general"
DEFAULTS = {
    "budget": 60,
    "weight_bounds": (0.0, 2.0),
    "lambda_bounds": (0.25, 2.0),
    "tolerance": 0.05,
    "window": 256,
    "max_windows": 64,
    "fit_fraction": 0.5,
    "batch_size": 8,
    "general_weight": 1.0,
}
_APPLY_CHUNK = 1 << 22  # elements per step when a weight vector is written


class TuneError(ValueError):
    """Bad input to `tune`; the message names the thing at fault."""


# --- the search ------------------------------------------------------------------


@dataclass
class SearchResult:
    best: tuple[float, ...]
    score: float
    history: list[tuple[tuple[float, ...], float]]  # every point evaluated, in order
    stopped: str  # "converged" or "budget"


def coordinate_search(
    objective: Callable[[tuple[float, ...]], float],
    start: Sequence[float],
    bounds: Sequence[tuple[float, float]],
    *,
    budget: int,
    tolerance: float,
) -> SearchResult:
    """Maximise `objective` over a box, one coordinate at a time.

    Each coordinate starts with a step of a quarter of its range.  A sweep
    tries +step and -step on every coordinate in turn and keeps going in a
    direction while that improves; a sweep that improves nothing halves every
    step.  Stops when every step is below `tolerance` or after `budget`
    distinct points (the start included).  Deterministic; a point is never
    evaluated twice.
    """
    if budget < 1:
        raise ValueError("budget must be >= 1")
    lows = [float(lo) for lo, _ in bounds]
    highs = [float(hi) for _, hi in bounds]
    history: list[tuple[tuple[float, ...], float]] = []
    seen: dict[tuple[float, ...], float] = {}

    class _Spent(Exception):
        pass

    def clip(values) -> tuple[float, ...]:
        return tuple(round(min(hi, max(lo, v)), 10) for v, lo, hi in zip(values, lows, highs))

    def score(point: tuple[float, ...]) -> float:
        if point not in seen:
            if len(seen) >= budget:
                raise _Spent
            seen[point] = float(objective(point))
            history.append((point, seen[point]))
        return seen[point]

    def moved(point, j, delta):
        return clip(point[:j] + (point[j] + delta,) + point[j + 1:])

    x = clip(start)
    fx = score(x)
    steps = [(hi - lo) / 4 for lo, hi in zip(lows, highs)]
    stopped = "converged"
    try:
        while any(step >= tolerance for step in steps):
            improved = False
            for j, step in enumerate(steps):
                if step < tolerance:
                    continue
                for direction in (1, -1):
                    y = moved(x, j, direction * step)
                    if y == x or score(y) <= fx:
                        continue
                    x, fx, improved = y, seen[y], True
                    while (z := moved(x, j, direction * step)) != x and score(z) > fx:
                        x, fx = z, seen[z]
                    break
            if not improved:
                steps = [step / 2 for step in steps]
    except _Spent:
        stopped = "budget"
    return SearchResult(best=x, score=fx, history=history, stopped=stopped)


# --- data ---------------------------------------------------------------------------


@dataclass
class TaskData:
    """One data set, cut into windows of `window` tokens."""

    name: str
    path: str
    tokens: int
    fit: torch.Tensor  # [windows, window] token ids
    heldout: torch.Tensor


def read_texts(path: Path) -> list[str]:
    """The texts of a .jsonl file (a `text` field per line) or of a plain file."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TuneError(f"cannot read data file {path}: {error}") from None
    if str(path).endswith(".jsonl"):
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise TuneError(f"{path} line {number} is not JSON: {error}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise TuneError(f"{path} line {number} has no string field 'text' (JSONL data needs one per line)")
            texts.append(record["text"])
    else:
        texts = [raw]
    if not any(text.strip() for text in texts):
        raise TuneError(f"data file {path} is empty")
    return texts


def load_task_data(name: str, path: Path, tokenizer, *, window: int, fit_fraction: float, max_windows: int) -> TaskData:
    """Tokenize a file (documents joined by the end-of-text token, when the
    tokenizer has one), cut it into consecutive windows, and split them
    evenly along the file: window i is held out when
    floor((i + 1) * h) > floor(i * h), h = 1 - fit_fraction (every other
    window at 0.5), so both parts see every region of the file; each part is
    thinned evenly to at most `max_windows` windows."""
    ids: list[int] = []
    for text in read_texts(path):
        if ids and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    count = len(ids) // window
    if count < 2:
        raise TuneError(
            f"data for '{name}' ({path}) is {len(ids)} tokens: too short for one window to fit "
            f"and one held out (2 x --window {window} tokens); give more text or a smaller --window"
        )
    windows = torch.tensor(ids[: count * window], dtype=torch.long).view(count, window)
    held = 1 - fit_fraction
    is_held = torch.tensor([math.floor((i + 1) * held) > math.floor(i * held) for i in range(count)])
    if bool(is_held.all()) or not bool(is_held.any()):  # two windows and an extreme fraction
        is_held = torch.arange(count) == count - 1

    def thin(part: torch.Tensor) -> torch.Tensor:
        if len(part) <= max_windows:
            return part
        picks = torch.linspace(0, len(part) - 1, max_windows).round().long()
        return part[picks]

    return TaskData(name, str(path), len(ids), thin(windows[~is_held]), thin(windows[is_held]))


@torch.no_grad()
def window_losses(model, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean next-token cross-entropy of each window (float64, on the CPU).

    The model runs in its own dtype (float32 here); the same windows and
    batch size give the same numbers run after run."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        )
        out.append(loss.view(len(batch), -1).double().mean(1).cpu())
    return torch.cat(out)


# --- the weight store --------------------------------------------------------------


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


@dataclass
class _Slot:
    """What is needed to rebuild one merged tensor for any weights."""

    name: str
    models: tuple[int, ...]  # index of each input into the tuner's model list
    base: torch.Tensor  # flat, in the merge dtype
    owner: torch.Tensor | None = None  # uint8: 0 = no model, j + 1 = input j
    kept: torch.Tensor | None = None  # the owner's weight where it keeps, the base elsewhere
    inputs: list[torch.Tensor] = field(default_factory=list)  # overlapping: every model's tensor
    masks: list[torch.Tensor] = field(default_factory=list)  # ... and its keep-mask
    shared: int = 0  # places with a non-zero kept delta from two or more models
    target: torch.Tensor | None = None  # the live model's tensor
    save_dtype: torch.dtype | None = None

    @classmethod
    def make(cls, name, models, base, inputs, masks) -> _Slot:
        from mergekit_cabs.kernel import compute_dtype

        dtype = compute_dtype(base, *inputs)
        base, inputs = base.reshape(-1), [t.reshape(-1) for t in inputs]
        masks = [m.reshape(-1) for m in masks]
        delta = [mask & (t.to(dtype) != base.to(dtype)) for t, mask in zip(inputs, masks)]
        count = torch.stack(delta).sum(0, dtype=torch.int16) if delta else None
        shared = int((count > 1).sum()) if count is not None else 0
        if shared or len(inputs) > 255:
            return cls(name, models, base, inputs=inputs, masks=masks, shared=shared)
        owner = torch.zeros(base.numel(), dtype=torch.uint8, device=base.device)
        kept = base.clone()
        for j, (t, d) in enumerate(zip(inputs, delta)):
            owner[d] = j + 1
            kept[d] = t[d]
        return cls(name, models, base, owner=owner, kept=kept)

    def nbytes(self) -> int:
        parts = [self.base, self.owner, self.kept, *self.inputs, *self.masks]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def merged(self, weights: Sequence[float], lam: float, where: slice = slice(None)) -> torch.Tensor:
        """The kernel's arithmetic for this slice: base + lam * ((0 + w_1 m_1 tau_1) + ...),
        in float32 (float64 for float64 inputs), rounded once to the merge dtype."""
        from mergekit_cabs.kernel import compute_dtype

        dtype = compute_dtype(self.base)
        base = self.base[where].to(dtype)
        if self.owner is not None:
            table = torch.tensor([0.0] + [weights[i] for i in self.models], dtype=dtype, device=base.device)
            acc = self.kept[where].to(dtype) - base  # tau (a new tensor); 0 where no model keeps a change
            acc.mul_(table[self.owner[where].long()]).add_(0.0)  # 0 + w tau: turns -0 into +0, as the kernel sum does
        else:
            acc = torch.zeros_like(base)
            for j, (t, mask) in enumerate(zip(self.inputs, self.masks)):
                tau = t[where].to(dtype) - base
                acc += torch.where(mask[where], tau, 0).mul_(weights[self.models[j]])
        return acc.mul_(lam).add_(base).to(self.base.dtype)

    def write(self, weights: Sequence[float], lam: float) -> None:
        flat = self.target.view(-1)
        for start in range(0, flat.numel(), _APPLY_CHUNK):
            where = slice(start, start + _APPLY_CHUNK)
            value = self.merged(weights, lam, where)
            flat[where].copy_(value if self.save_dtype is None else value.to(self.save_dtype))


class WeightStore:
    """Pruned task vectors of every merged tensor, bound to a live model."""

    def __init__(self, slots: list[_Slot], fixed: int):
        self.slots = slots
        self.fixed = fixed  # tensors the weights do not change (written once)

    @property
    def disjoint(self) -> bool:
        return all(s.owner is not None for s in self.slots)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.slots)

    def shared_places(self) -> int:
        return sum(s.shared for s in self.slots)

    def places(self) -> int:
        return sum(s.base.numel() for s in self.slots)

    def apply(self, weights: Sequence[float], lam: float) -> None:
        with torch.no_grad():
            for slot in self.slots:
                slot.write(weights, lam)


@contextlib.contextmanager
def _capture_cabs(sink):
    """Within the block, every cabs merge also hands (group, parameters, result) to `sink`."""
    from mergekit_cabs.method import CabsMerge

    original = CabsMerge.merge_group

    def merge_group(self, group, /, **parameters):
        result = original(self, group, **parameters)
        sink(group, parameters, result)
        return result

    CabsMerge.merge_group = merge_group
    try:
        yield
    finally:
        CabsMerge.merge_group = original


def build_store(planned, finetunes, model, *, device: str, progress: bool = True) -> WeightStore:
    """Run mergekit's merge tasks for every planned tensor (at the configured
    weights), keep what rebuilds each cabs result for other weights, and write
    every result into `model`.  Each slot is checked to rebuild the configured
    merge bit for bit."""
    import tqdm
    from mergekit.common import dtype_from_name
    from mergekit.graph import Executor

    from mergekit_cabs.kernel import cabs_masks
    from mergekit_cabs.method import _resolve_group

    index = {ref: i for i, ref in enumerate(finetunes)}
    state = model.state_dict()
    pending: dict[str, _Slot] = {}

    def sink(group, parameters, result):
        base, entries = group.base.tensor, group.non_base
        if not entries or base.numel() == 0:
            return
        r = _resolve_group(group, parameters)
        quotas, m = r.kernel_quotas(base.numel())
        masks = cabs_masks(base, [e.tensor for e in entries], quotas, m,
                           overlap=r.overlap, conflict_aware=r.conflict_aware)
        slot = _Slot.make(group.metadata.name, tuple(index[e.id] for e in entries), base,
                          [e.tensor for e in entries], masks)
        weights = [0.0] * len(finetunes)
        for i, w in zip(slot.models, r.weights):
            weights[i] = w
        if not _same_bits(slot.merged(weights, r.lam).view(result.shape), result):
            raise RuntimeError(f"tune: rebuilding tensor '{slot.name}' did not give the merge's bits (a bug)")
        pending[slot.name] = slot

    by_task = {p.task: p for p in planned}
    slots, fixed = [], 0
    executor = Executor(targets=list(by_task), math_device=device, storage_device=device)
    with _capture_cabs(sink), tqdm.tqdm(total=len(by_task), desc="Masks", unit="tensor", disable=not progress) as bar:
        for task, result in executor.run(quiet=True):
            p = by_task[task]
            if result is None:
                raise TuneError(f"mergekit writes no tensor '{p.name}' for this configuration; tune cannot score it")
            target = state.get(p.name)
            if target is None or target.shape != result.shape:
                shape = None if target is None else tuple(target.shape)
                raise TuneError(
                    f"the merged tensor '{p.name}' {tuple(result.shape)} does not fit the base model's "
                    f"{'(missing)' if shape is None else shape}; tune needs the merge to keep the base's architecture"
                )
            save = dtype_from_name(p.save_dtype) if p.save_dtype else None
            with torch.no_grad():
                target.copy_(result if save is None else result.to(save))
            slot = pending.pop(p.name, None)
            if slot is None:
                fixed += 1
            else:
                slot.target, slot.save_dtype = target, save
                slots.append(slot)
            bar.update(1)
    covered = {p.name for p in planned}
    covered_ptrs = {state[n].data_ptr() for n in covered if n in state}
    missing = [n for n, t in state.items() if n not in covered and t.data_ptr() not in covered_ptrs]
    if missing:
        raise TuneError(
            f"mergekit's plan writes no tensor for {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; tune needs every weight of the base model merged"
        )
    return WeightStore(slots, fixed)


# --- objective ----------------------------------------------------------------------


@dataclass
class Objective:
    kind: str  # "gain" or "loss"
    tasks: list[str]
    base: dict[str, float]  # L_base per data set (the split being scored)
    own: dict[str, float]  # L of model i on task i
    general_weight: float = 0.0

    def gains(self, losses: dict[str, float]) -> dict[str, float]:
        out = {t: (self.base[t] - losses[t]) / (self.base[t] - self.own[t]) for t in self.tasks}
        if GENERAL in losses:
            out[GENERAL] = (self.base[GENERAL] - losses[GENERAL]) / self.base[GENERAL]
        return out

    def score(self, losses: dict[str, float]) -> float:
        general = GENERAL in losses
        if self.kind == "loss":
            value = -sum(losses[t] for t in self.tasks) / len(self.tasks)
            return value - (self.general_weight * losses[GENERAL] if general else 0.0)
        gains = self.gains(losses)
        value = sum(gains[t] for t in self.tasks) / len(self.tasks)
        return value + (self.general_weight * gains[GENERAL] if general else 0.0)


# --- input checks -------------------------------------------------------------------


def _parse_bounds(text: str, what: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in str(text).split(","))
    except ValueError:
        raise TuneError(f"{what} is {text!r}; give two numbers LOW,HIGH such as 0,2") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise TuneError(f"{what} is {text!r}; LOW must be below HIGH, both finite")
    return lo, hi


def _model_names(finetunes) -> dict[str, list[int]]:
    """Every name a --data MODEL may use: as the YAML writes it, or the directory's name."""
    names: dict[str, list[int]] = {}
    for i, ref in enumerate(finetunes):
        for name in {str(ref), str(ref.model.path), os.path.basename(str(ref.model.path).rstrip("/\\"))}:
            names.setdefault(name, []).append(i)
    return names


def match_data(finetunes, data: Sequence[str]) -> list[Path]:
    """One data file per fine-tuned model, from MODEL=FILE arguments."""
    names = _model_names(finetunes)
    files: dict[int, Path] = {}
    for item in data:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise TuneError(f"--data {item!r}: write MODEL=FILE")
        hits = names.get(name)
        if not hits:
            known = ", ".join(sorted({os.path.basename(str(r.model.path).rstrip('/')) for r in finetunes}))
            raise TuneError(f"--data {item!r}: no fine-tuned model is called '{name}' (models: {known})")
        if len(hits) > 1:
            raise TuneError(f"--data {item!r}: '{name}' names several models; use the path the YAML writes")
        if hits[0] in files:
            raise TuneError(f"--data gives two files for model '{finetunes[hits[0]]}'")
        files[hits[0]] = Path(file)
    missing = [str(finetunes[i]) for i in range(len(finetunes)) if i not in files]
    if missing:
        raise TuneError(
            f"no --data for model(s) {', '.join(missing)}; tune needs MODEL=FILE for every fine-tuned model"
        )
    return [files[i] for i in range(len(finetunes))]


def _uniform(planned, finetunes) -> tuple[list[float], float]:
    """The configured weight of every model and lambda, which must be one
    number each across all tensors (tune sets one number each)."""
    weights: dict[int, set] = {i: set() for i in range(len(finetunes))}
    lams = set()
    index = {ref: i for i, ref in enumerate(finetunes)}
    for p in planned:
        if not p.models:
            continue
        lams.add(p.resolved.lam)
        for ref, w in zip(p.models, p.resolved.weights):
            weights[index[ref]].add(w)
    for i, values in weights.items():
        if len(values) > 1:
            raise TuneError(
                f"model '{finetunes[i]}' has a weight that varies by tensor ({min(values)} to {max(values)}, "
                "from a filter or gradient); tune sets one weight per model: give it one number"
            )
    if len(lams) > 1:
        raise TuneError(
            f"'lambda' varies by tensor ({min(lams)} to {max(lams)}); tune sets one lambda: give it one number"
        )
    return [next(iter(weights[i]), 1.0) for i in range(len(finetunes))], next(iter(lams), 1.0)


@dataclass
class Prepared:
    """Everything checked before a model is loaded."""

    config_path: Path
    config: Any
    raw: dict
    planned: list
    finetunes: list
    labels: list[str]
    start_weights: list[float]
    start_lambda: float
    tasks: list[TaskData]  # one per fine-tune, then the general set if given


def prepare(config_path: Path, data: Sequence[str], *, general: Path | None = None, window: int | None = None,
            fit_fraction: float = DEFAULTS["fit_fraction"], max_windows: int = DEFAULTS["max_windows"],
            budget: int = DEFAULTS["budget"]) -> Prepared:
    """Check the configuration and the data, tokenize the data; loads no model weights."""
    import yaml
    from transformers import AutoTokenizer

    from mergekit_cabs import analyze as an

    if budget < 1:
        raise TuneError(f"--budget is {budget}; it must be >= 1 (evaluations of the merged model)")
    if not 0 < fit_fraction < 1:
        raise TuneError(f"--fit-fraction is {fit_fraction}; it must be between 0 and 1 (the rest is held out)")
    if max_windows < 1:
        raise TuneError(f"--max-windows is {max_windows}; it must be >= 1")
    try:
        config = an.load_config(config_path)
    except an.AnalyzeError as error:
        raise TuneError(str(error).replace("analyze reads", "tune reads")) from None
    if config.tokenizer_source is not None or config.tokenizer is not None:
        raise TuneError(
            f"{config_path} sets tokenizer_source/tokenizer, which builds a new vocabulary; "
            "tune scores with the base model's tokenizer and needs the base's vocabulary"
        )
    try:
        an.check_models(config)
        planned = an.plan(config)
    except an.AnalyzeError as error:
        raise TuneError(str(error)) from None
    finetunes = []
    for p in planned:
        finetunes += [m for m in p.models if m not in finetunes]
    if not finetunes:
        raise TuneError(f"{config_path} merges no fine-tuned model; there is nothing to tune")
    files = match_data(finetunes, data)
    start_weights, start_lambda = _uniform(planned, finetunes)
    labels = an._short_names([str(m.model.path) for m in finetunes])

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
    named = list(zip(labels, files)) + ([(GENERAL, Path(general))] if general is not None else [])
    for name, path in named:
        if not path.is_file():
            raise TuneError(f"data file {path} (for '{name}') does not exist")
    tasks = [load_task_data(name, path, tokenizer, window=window, fit_fraction=fit_fraction, max_windows=max_windows)
             for name, path in named]
    with open(config_path, encoding="utf-8") as stream:
        raw = yaml.safe_load(stream)
    return Prepared(Path(config_path), config, raw, planned, finetunes, labels, start_weights, start_lambda, tasks)


# --- tuned.yml -------------------------------------------------------------------------


def tuned_config(raw: dict, finetunes, weights: Sequence[float], lam: float) -> dict:
    """The user's YAML with every fine-tune's `weight` and the `lambda` set."""
    import copy

    from mergekit.common import ModelReference

    out = copy.deepcopy(raw)
    chosen = {ref: w for ref, w in zip(finetunes, weights)}

    def set_weight(item: dict) -> None:
        ref = ModelReference.model_validate(item["model"])
        if ref in chosen:
            params = item.get("parameters") or {}
            params["weight"] = float(chosen[ref])
            item["parameters"] = params

    for item in out.get("models") or []:
        set_weight(item)
    for piece in out.get("slices") or []:
        for item in piece.get("sources") or []:
            set_weight(item)
        if "lambda" in (piece.get("parameters") or {}):
            piece["parameters"]["lambda"] = float(lam)
    params = out.get("parameters") or {}
    params["lambda"] = float(lam)
    out["parameters"] = params
    return out


def check_round_trip(tuned: dict, finetunes, weights, lam) -> None:
    """Plan `tuned` with mergekit and check every tensor gets the chosen numbers."""
    from mergekit.config import MergeConfiguration

    from mergekit_cabs import analyze as an

    planned = an.plan(MergeConfiguration.model_validate(tuned))
    got_weights, got_lam = _uniform(planned, finetunes)
    if got_weights != [float(w) for w in weights] or got_lam != float(lam):
        raise RuntimeError(f"tune: tuned.yml resolves to weights {got_weights}, lambda {got_lam} (a bug)")


# --- the run -----------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def run_tune(prep: Prepared, *, device: str = "cpu", objective: str = "gain",
             general_weight: float = DEFAULTS["general_weight"], budget: int = DEFAULTS["budget"],
             weight_bounds=DEFAULTS["weight_bounds"], lambda_bounds=DEFAULTS["lambda_bounds"],
             tolerance: float = DEFAULTS["tolerance"], batch_size: int = DEFAULTS["batch_size"],
             quiet: bool = False) -> dict:
    """Load the models, build the store, search, and return the report (a dict)."""
    import tqdm
    from transformers import AutoModelForCausalLM

    clock = {}
    started = time.perf_counter()
    tasks = prep.tasks
    task_names = [t.name for t in tasks]
    own_tasks = prep.labels

    def load(path: str):
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # ours say what is going on
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        return model.to(device).eval()

    def losses_of(model, split: str) -> dict[str, torch.Tensor]:
        return {t.name: window_losses(model, getattr(t, split), batch_size) for t in tasks}

    def means(per_window: dict[str, torch.Tensor]) -> dict[str, float]:
        return {k: float(v.mean()) for k, v in per_window.items()}

    # References: the base on every set, each fine-tune on its own task.
    t0 = time.perf_counter()
    _say(f"Loading the base model {prep.config.base_model} and scoring it on {len(tasks)} data sets", quiet)
    model = load(str(prep.config.base_model.model.path))
    reference = {"base": {s: means(losses_of(model, s)) for s in ("fit", "heldout")}, "models": {}}
    for label, ref, task in tqdm.tqdm(list(zip(own_tasks, prep.finetunes, tasks)), desc="Scoring the fine-tunes",
                                      unit="model", disable=quiet):
        tuned = load(str(ref.model.path))
        reference["models"][label] = {s: float(window_losses(tuned, getattr(task, s), batch_size).mean())
                                      for s in ("fit", "heldout")}
        del tuned
    clock["reference_s"] = time.perf_counter() - t0
    objectives = {
        s: Objective(objective, own_tasks, reference["base"][s],
                     {k: v[s] for k, v in reference["models"].items()}, general_weight)
        for s in ("fit", "heldout")
    }
    if objective == "gain":
        for label in own_tasks:
            for s in ("fit", "heldout"):
                gap = reference["base"][s][label] - reference["models"][label][s]
                if not gap > 0:
                    raise TuneError(
                        f"model '{label}' is no better than the base on its own {s} data (loss "
                        f"{reference['models'][label][s]:.4f} vs base {reference['base'][s][label]:.4f}), so its "
                        "normalized gain is undefined; check its --data file, or use --objective loss"
                    )

    t0 = time.perf_counter()
    store = build_store(prep.planned, prep.finetunes, model, device=device, progress=not quiet)
    clock["masks_s"] = time.perf_counter() - t0
    if not store.disjoint:
        _say(
            f"tune: the models' kept places overlap ({store.shared_places():,} of {store.places():,} places are "
            "changed by two or more models: overlap: fill with K*n > m, or conflict_aware: false); the weights are "
            "no longer independent, and every model's pruned tensor is kept in memory",
            False,
        )

    names = ["lambda"] + list(own_tasks)
    bounds = [tuple(lambda_bounds)] + [tuple(weight_bounds)] * len(own_tasks)
    start = (prep.start_lambda, *prep.start_weights)
    points, set_times, eval_times = [], [], []

    bar = tqdm.tqdm(total=budget, desc="Tuning", unit="eval", disable=quiet)

    def evaluate(x: tuple[float, ...]) -> float:
        t1 = time.perf_counter()
        store.apply(x[1:], x[0])
        _sync(device)
        t2 = time.perf_counter()
        fit = means(losses_of(model, "fit"))
        t3 = time.perf_counter()
        score = objectives["fit"].score(fit)
        set_times.append(t2 - t1)
        eval_times.append(t3 - t2)
        points.append({"lambda": x[0], "weights": dict(zip(own_tasks, x[1:])), "fit_loss": fit, "score": score,
                       "set_s": t2 - t1, "eval_s": t3 - t2})
        bar.update(1)
        bar.set_postfix(best=f"{max(p['score'] for p in points):.4f}")
        return score

    t0 = time.perf_counter()
    result = coordinate_search(evaluate, start, bounds, budget=budget, tolerance=tolerance)
    bar.close()
    clock["search_s"] = time.perf_counter() - t0

    def scored(x) -> dict:
        store.apply(x[1:], x[0])
        out = {}
        for s in ("fit", "heldout"):
            per_window = losses_of(model, s)
            losses = means(per_window)
            out[s] = {"loss": losses, "gain": objectives[s].gains(losses), "score": objectives[s].score(losses),
                      "window_losses": {k: v.tolist() for k, v in per_window.items()}}
        return out

    _say(f"Scoring the start and the chosen point on fit and held-out windows ({result.stopped} after "
         f"{len(points)} evaluations)", quiet)
    t0 = time.perf_counter()
    start_scores = scored(result.history[0][0])  # the start, clipped into the bounds
    best_scores = scored(result.best)  # the model is left at the chosen weights
    clock["final_s"] = time.perf_counter() - t0
    clock["total_s"] = time.perf_counter() - started
    clock["set_weights_mean_s"] = sum(set_times) / len(set_times)
    clock["evaluate_mean_s"] = sum(eval_times) / len(eval_times)

    tuned = tuned_config(prep.raw, prep.finetunes, result.best[1:], result.best[0])
    check_round_trip(tuned, prep.finetunes, result.best[1:], result.best[0])
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    report = {
        "config": str(prep.config_path),
        "base_model": str(prep.config.base_model),
        "models": {label: str(ref) for label, ref in zip(own_tasks, prep.finetunes)},
        "objective": objective,
        "general_weight": general_weight if GENERAL in task_names else None,
        "device": device,
        "data": {t.name: {"file": t.path, "tokens": t.tokens, "window": int(t.fit.shape[1]),
                          "fit_windows": len(t.fit), "heldout_windows": len(t.heldout)} for t in tasks},
        "search": {"names": names, "bounds": [list(b) for b in bounds], "start": list(start),
                   "budget": budget, "tolerance": tolerance, "evaluations": len(points), "stopped": result.stopped},
        "supports": {"disjoint": store.disjoint, "shared_places": store.shared_places(), "places": store.places(),
                     "merged_tensors": len(store.slots), "fixed_tensors": store.fixed},
        "memory": {"store_bytes": store.nbytes(), "model_bytes": model_bytes,
                   "store_bytes_per_place": store.nbytes() / max(1, store.places())},
        "reference": reference,
        "start": {"lambda": result.history[0][0][0], "weights": dict(zip(own_tasks, result.history[0][0][1:])),
                  **start_scores},
        "best": {"lambda": result.best[0], "weights": dict(zip(own_tasks, result.best[1:])), **best_scores},
        "points": points,
        "time": clock,
        "tuned_config": tuned,
    }
    return report


# --- outputs --------------------------------------------------------------------------


def _num(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def format_summary(report: dict) -> str:
    """The console table: chosen numbers and held-out scores per task."""
    best, start = report["best"], report["start"]
    lines = [f"{'':12s} {'start':>8s} {'tuned':>8s}", f"{'lambda':12s} {start['lambda']:8.3f} {best['lambda']:8.3f}"]
    lines += [f"{k:12s} {start['weights'][k]:8.3f} {v:8.3f}" for k, v in best["weights"].items()]
    lines += ["", f"held-out {'task':12s} {'base':>8s} {'own':>8s} {'start':>8s} {'tuned':>8s} {'gain':>7s}"]
    ref = report["reference"]
    for task, loss in best["heldout"]["loss"].items():
        own = ref["models"].get(task, {}).get("heldout")
        lines.append(
            f"{'':9s}{task:12s} {ref['base']['heldout'][task]:8.4f} {_num(own, '8.4f'):>8s} "
            f"{start['heldout']['loss'][task]:8.4f} {loss:8.4f} {best['heldout']['gain'][task]:7.3f}"
        )
    lines.append(
        f"objective ({report['objective']}): fit {start['fit']['score']:.4f} -> {best['fit']['score']:.4f}, "
        f"held-out {start['heldout']['score']:.4f} -> {best['heldout']['score']:.4f}"
    )
    return "\n".join(lines)


def render_markdown(report: dict, plot: bool) -> str:
    best, start, ref, t = report["best"], report["start"], report["reference"], report["time"]
    search, sup, mem = report["search"], report["supports"], report["memory"]
    names = search["names"]
    gain_doc = (
        "the mean over tasks of the normalized gain (L_base - L_merged) / (L_base - L_model) on each model's own "
        "data (1 = as good as that model on its task, 0 = as good as the base)"
        if report["objective"] == "gain" else "minus the mean loss over tasks"
    )
    if report["general_weight"] is not None:
        gain_doc += (f", plus {report['general_weight']} x the general set's "
                     + ("relative loss change (L_base - L_merged) / L_base" if report["objective"] == "gain"
                        else "loss (subtracted)"))
    out = [
        "# CABS weight tuning", "",
        f"- configuration: `{report['config']}`; base `{report['base_model']}`; device {report['device']}",
        f"- objective, maximised on the fit windows: {gain_doc}",
        (f"- search: {search['evaluations']} evaluations of budget {search['budget']} ({search['stopped']}); "
         f"coordinate-wise over {', '.join(names)}; step tolerance {search['tolerance']}"),
        (f"- time: {t['total_s']:.1f} s in all: scoring base and fine-tunes {t['reference_s']:.1f} s, masks "
         f"{t['masks_s']:.1f} s, search {t['search_s']:.1f} s, final scoring {t['final_s']:.1f} s"),
        (f"- per evaluation: setting the weights {1000 * t['set_weights_mean_s']:.1f} ms, scoring the fit windows "
         f"{1000 * t['evaluate_mean_s']:.1f} ms"),
        ("- held out: each file's windows are split evenly along the file (every other window at --fit-fraction "
         "0.5); the search saw only the fit windows, and the held-out ones are scored once, for the start and the "
         "chosen point"),
        "", "## Chosen", "",
        "| | start | tuned |", "|---|---|---|",
        f"| lambda | {start['lambda']:.4g} | {best['lambda']:.4g} |",
    ]
    out += [f"| weight `{k}` | {start['weights'][k]:.4g} | {v:.4g} |" for k, v in best["weights"].items()]
    out += ["", ("`tuned.yml` is the configuration with these numbers: `mergekit-yaml tuned.yml OUT` writes the "
                 "model scored here."), ""]
    for split in ("fit", "heldout"):
        out += [f"## Loss on the {'held-out' if split == 'heldout' else 'fit'} windows", "",
                "| data | windows | base | own model | start | tuned | gain (start -> tuned) |", "|---|---|---|---|---|---|---|"]
        for task, loss in best[split]["loss"].items():
            own = ref["models"].get(task, {}).get(split)
            windows = report["data"][task][f"{split}_windows"]
            out.append(
                f"| {task} | {windows} | {ref['base'][split][task]:.4f} | {_num(own)} | "
                f"{start[split]['loss'][task]:.4f} | {loss:.4f} | "
                f"{start[split]['gain'][task]:.3f} -> {best[split]['gain'][task]:.3f} |"
            )
        out += ["", f"Objective: {start[split]['score']:.4f} -> {best[split]['score']:.4f}", ""]
    share = sup["shared_places"] / max(1, sup["places"])
    out += [
        "## Supports and memory", "",
        ("The models' kept places are disjoint: each weight scales its own places only." if sup["disjoint"] else
         f"The models' kept places overlap ({sup['shared_places']:,} places, {share:.2%}, changed by two or more "
         "models): the weights are not independent."),
        (f"{sup['merged_tensors']} tensors rebuilt for each point, {sup['fixed_tensors']} fixed. Memory held: "
         f"{mem['store_bytes'] / 2**20:.1f} MiB for the pruned task vectors "
         f"({mem['store_bytes_per_place']:.2f} bytes per merged weight) and {mem['model_bytes'] / 2**20:.1f} MiB "
         "for the float32 model being scored."), "",
        "## Every point evaluated", "",
        "| # | " + " | ".join(names) + " | objective (fit) |", "|---" * (len(names) + 2) + "|",
    ]
    for i, p in enumerate(report["points"]):
        values = [p["lambda"], *p["weights"].values()]
        out.append(f"| {i} | " + " | ".join(f"{v:.4g}" for v in values) + f" | {p['score']:.4f} |")
    out += ["", "## Plot", ""]
    out.append("![objective along each weight](tune.png)" if plot else
               'Not made: pip install "mergekit-cabs[plot]" gets it (matplotlib).')
    return "\n".join(out) + "\n"


def make_plot(report: dict, path: Path) -> None:
    """The fit objective against each searched number; ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report["search"]["names"]
    points = [([p["lambda"], *p["weights"].values()], p["score"]) for p in report["points"]]
    best = [report["best"]["lambda"], *report["best"]["weights"].values()]
    fig, axes = plt.subplots(1, len(names), figsize=(2.8 * len(names), 2.9), dpi=100, sharey=True)
    for j, (ax, name) in enumerate(zip(axes, names)):
        ax.scatter([x[j] for x, _ in points], [s for _, s in points], s=10, color="0.7", label="all points")
        line = sorted((x[j], s) for x, s in points if all(x[k] == best[k] for k in range(len(names)) if k != j))
        ax.plot([v for v, _ in line], [s for _, s in line], marker="o", ms=4, label="others at the best")
        ax.axvline(best[j], color="tab:red", lw=1, ls="--")
        ax.set_title(name if j == 0 else f"weight: {name}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"objective on fit windows ({report['objective']})", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(report: dict, out: Path) -> list[str]:
    """tuned.yml, tune.md, tune.png (with matplotlib) and tune.json, into `out`."""
    import yaml

    from mergekit_cabs.analyze import publish

    def build(staging: Path) -> list[str]:
        plotted = True
        try:
            make_plot(report, staging / "tune.png")
        except ImportError:
            plotted = False
        (staging / "tuned.yml").write_text(
            "# Written by mergekit-cabs tune: the weights and lambda it chose (see tune.md).\n"
            + yaml.safe_dump(report["tuned_config"], sort_keys=False), encoding="utf-8")
        (staging / "tune.md").write_text(render_markdown(report, plotted), encoding="utf-8")
        (staging / "tune.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        return ["tuned.yml", "tune.md"] + (["tune.png"] if plotted else []) + ["tune.json"]

    return publish(out, OUT_FILES, build)
