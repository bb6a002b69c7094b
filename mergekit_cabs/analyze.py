"""`mergekit-cabs analyze`: overlap and balance of the kept weights, before merging.

For every tensor mergekit would merge with a cabs configuration, this module
builds the keep-masks of three pruning rules at the same budget and measures
how the kept places of the models collide and how they spread:

* ``cabs``: the masks the merge itself would use (`kernel.cabs_masks` with the
  parameters mergekit resolves for that tensor: filters, gradients, slices);
* ``ties``: magnitude top-k per model over the whole tensor (TIES-style), with
  k = the number of places CABS keeps for that model in that tensor; ties in
  |tau| go to the lower flattened index; models are pruned independently;
* ``dare``: random keep per model (DARE-style): every place is kept
  independently with probability p = k / numel (same k as above), drawn from a
  ``torch.Generator`` seeded with ``zlib.crc32(b"<seed>:<tensor>#<i>")``, i =
  the model's position among the tensor's fine-tunes (0 first). So the
  kept count is k only on average; it is reported as achieved. No rescaling.

Definitions (per tensor; "overall" sums the counts over tensors first):

* a model's *kept places* in overlap numbers are the places where its mask
  keeps a changed weight (tau != 0): keeping an unchanged weight changes
  nothing and, as in SPEC.md, is no conflict. Densities count every kept place;
* pair overlap = |A_i & A_j| / |A_i | A_j|; overall = sum of intersections /
  sum of unions over the tensors both models take part in;
* shared = places kept by two or more models / numel;
* norm ratio = ||mask_i * tau_i|| / ||tau_i||; overall = sqrt(sum of kept
  squares / sum of squares) over tensors;
* row balance: kept count per row (dim 0, tensors with >= 2 dims) as a share
  of the row length; per tensor and pooled over all rows of all such tensors:
  coefficient of variation (population std / mean), min and max;
* layer balance: kept / numel per layer (layer index from ``.layers.<i>.`` in
  the output tensor name; other tensors form the group ``other``, which is
  reported but left out of the spread across layers).

Precision: task vectors are taken in float32 (float64 when an input is
float64) from the tensors as mergekit loads them for the merge (after its
``dtype:`` cast); sums of squares and all aggregates are float64.

Tensors are read through mergekit's own planner and loaders, a tensor at a
time (mergekit's executor drops each input as soon as it has been used).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RULES = ("cabs", "ties", "dare")
REPORT_FILES = ("report.json", "report.md", "overlap-by-layer.png", "kept-by-layer.png")
PLOTS_HINT = 'pip install "mergekit-cabs[plot]" gets the plots (matplotlib)'
OTHER = "other"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class AnalyzeError(ValueError):
    """The configuration or a model cannot be analysed; the message says why."""


def _method(*names: str):
    """Names from mergekit_cabs.method, imported after mergekit.merge_methods
    (the other order makes the autoload hook import method.py half-built)."""
    import mergekit.merge_methods  # noqa: F401

    from mergekit_cabs import method

    return tuple(getattr(method, name) for name in names)


# --- reading the configuration ----------------------------------------------


def load_config(path: Path):
    """Parse a mergekit YAML and check that it is a cabs configuration.

    Raises AnalyzeError naming the file, the parameter or the model at fault.
    """
    import yaml
    from mergekit.config import MergeConfiguration

    NAME, CabsConfigError, _check_parameter_names = _method("NAME", "CabsConfigError", "_check_parameter_names")

    try:
        with open(path, encoding="utf-8") as stream:  # a stream: YAML errors name the file
            data = yaml.safe_load(stream)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise AnalyzeError(f"cannot read {path} as YAML: {error}") from None
    if not isinstance(data, dict):
        raise AnalyzeError(f"{path} is not a mergekit configuration (a YAML mapping with merge_method:, models: ...)")
    method = data.get("merge_method")
    if method != NAME:
        raise AnalyzeError(
            f"{path} has merge_method: {method!r}; analyze reads cabs configurations "
            f"(merge_method: {NAME})"
        )
    try:
        config = MergeConfiguration.model_validate(data)
    except (ValueError, RuntimeError, TypeError) as error:
        raise AnalyzeError(f"{path} is not a valid mergekit configuration: {error}") from None
    if config.base_model is None:
        raise AnalyzeError(f"{path} has no base_model:; cabs needs one (task vectors are differences from it)")
    try:
        _check_parameter_names(config)
    except CabsConfigError as error:
        raise AnalyzeError(str(error)) from None
    return config


def check_models(config, trust_remote_code: bool = False) -> None:
    """Every model the configuration names must be readable (its config.json)."""
    for model in sorted(config.referenced_models(), key=str):
        path = model.model.path
        if not os.path.exists(path) and (os.path.isabs(path) or path.startswith((".", "~"))):
            raise AnalyzeError(f"model '{model}' not found: there is no directory {path}")
        try:
            model.config(trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as error:  # what transformers/hub raise
            raise AnalyzeError(f"cannot read model '{model}': {error}") from None


@dataclass
class PlannedTensor:
    """One output tensor as mergekit plans it, with its resolved cabs parameters."""

    order: int
    name: str
    task: Any  # mergekit ExecuteMergeMethodTask
    models: list[Any]  # ModelReference of the fine-tunes, priority order
    resolved: Any  # method.Resolved
    save_dtype: str | None = None  # what mergekit-yaml casts the result to when writing


@contextlib.contextmanager
def _quiet_cabs_log():
    """The merge's one-line overlap warnings: the report lists those cases itself."""
    log = logging.getLogger("mergekit_cabs")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def plan(config, options=None) -> list[PlannedTensor]:
    """The tensors `mergekit-yaml` would merge, with their parameters.

    Runs mergekit's own MergePlanner on a copy of `config`, so filters,
    gradients and slices resolve exactly as in a merge; reads only the models'
    configs and tensor indexes.
    """
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import LoaderCache, SaveTensor
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    CabsConfigError, install, resolve = _method("CabsConfigError", "install", "resolve")
    install()
    options = options or MergeOptions(quiet=True)
    config = config.model_copy(deep=True)  # the planner normalises it in place
    try:
        arch_info = get_architecture_info(config, options)
        cache = LoaderCache()
        cache.setup(options=options)
        for model in config.referenced_models():
            cache.get(model)
        out_config = _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
        with _quiet_cabs_log():
            # plan_to_disk only builds the task graph; nothing runs or is
            # written unless its tasks are executed, and only the inputs are.
            # (plan_in_memory fails to build in mergekit 0.1.5.)
            tasks = MergePlanner(config, arch_info, options=options, out_model_config=out_config).plan_to_disk(
                out_path=os.devnull
            )
    except CabsConfigError as error:
        raise AnalyzeError(str(error)) from None
    except (ValueError, RuntimeError, OSError, KeyError) as error:
        raise AnalyzeError(f"mergekit cannot plan this merge: {error}") from None

    planned = []
    for order, target in enumerate(t for t in tasks if isinstance(t, SaveTensor)):
        task = target.tensor_task
        models = [m for m in task.model_order if m != task.base_model]
        per_model = [(str(m), dict(task.input_parameters[m].items())) for m in models]
        with _quiet_cabs_log():
            resolved = resolve(dict(task.parameters.items()), per_model, task.output_weight.name)
        planned.append(PlannedTensor(order, task.output_weight.name, task, models, resolved, target.dtype))
    return planned


def read_tensors(planned: Sequence[PlannedTensor], progress: bool = True) -> Iterator[tuple[PlannedTensor, dict]]:
    """(planned tensor, {model: tensor}) one tensor at a time, in mergekit's
    reading order, through its executor (inputs are dropped once used)."""
    import tqdm
    from mergekit.graph import Executor

    by_input: dict[Any, list[PlannedTensor]] = {}
    for p in planned:
        by_input.setdefault(p.task.gather_tensors, []).append(p)
    if not by_input:
        return
    executor = Executor(targets=list(by_input), math_device="cpu", storage_device="cpu")
    with tqdm.tqdm(total=len(planned), desc="Reading tensors", unit="tensor", disable=not progress) as bar:
        for task, tensors in executor.run(quiet=True):
            for p in by_input[task]:
                yield p, tensors
                bar.update(1)


# --- one tensor ---------------------------------------------------------------


@dataclass
class Moments:
    """Count, mean, sum of squared deviations, min and max of some values
    (float64), mergeable (Chan et al.), so pooled spreads need no value lists."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf

    @classmethod
    def of(cls, values: torch.Tensor) -> Moments:
        values = values.to(torch.float64).reshape(-1)
        if values.numel() == 0:
            return cls()
        mean = float(values.mean())
        return cls(values.numel(), mean, float(((values - mean) ** 2).sum()), float(values.min()), float(values.max()))

    def merge(self, other: Moments) -> Moments:
        if not other.n:
            return self
        if not self.n:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * other.n / n
        m2 = self.m2 + other.m2 + delta * delta * self.n * other.n / n
        return Moments(n, mean, m2, min(self.lo, other.lo), max(self.hi, other.hi))

    def scaled(self, factor: float) -> Moments:
        """The moments of the values times `factor` (> 0)."""
        return Moments(self.n, self.mean * factor, self.m2 * factor * factor, self.lo * factor, self.hi * factor)

    @property
    def cv(self) -> float | None:
        """Population standard deviation / mean; None without values or mean 0."""
        if not self.n or self.mean == 0:
            return None
        return math.sqrt(max(self.m2, 0.0) / self.n) / self.mean


def dare_seed(seed: int, tensor: str, index: int) -> int:
    """The DARE-style generator's seed for model `index` of `tensor` (32 bits:
    torch's CPU generator uses only the low 32 bits of a seed)."""
    return zlib.crc32(f"{seed}:{tensor}#{index}".encode())


def rule_masks(base: torch.Tensor, models: Sequence[torch.Tensor], resolved, tensor: str, seed: int) -> dict[str, list[torch.Tensor]]:
    """Flat boolean keep-masks per rule (see the module doc), models in order."""
    from mergekit_cabs.kernel import cabs_masks

    numel = base.numel()
    quotas, length = resolved.kernel_quotas(numel)
    cabs = cabs_masks(base, models, quotas, length, overlap=resolved.overlap, conflict_aware=resolved.conflict_aware)
    cabs = [m.reshape(-1) for m in cabs]
    counts = [int(m.sum()) for m in cabs]
    ties = [m.reshape(-1) for m in cabs_masks(base, models, counts, numel, conflict_aware=False)]
    dare = []
    for i, k in enumerate(counts):
        generator = torch.Generator().manual_seed(dare_seed(seed, tensor, i))
        dare.append(torch.rand(numel, generator=generator) < k / numel)
    return {"cabs": cabs, "ties": ties, "dare": dare}


def unavoidable_overlap(resolved, numel: int) -> dict | None:
    """Where the quotas of a tensor add up to more than its room (conflict-aware only).

    `excess` is per block (or per tensor with balanced: false); `places` sums it
    over the tensor's blocks: how many kept places cannot be free ones.
    """
    from mergekit_cabs.kernel import block_quota

    if not resolved.conflict_aware or numel == 0:
        return None
    quotas, length = resolved.kernel_quotas(numel)
    if not resolved.balanced:
        if sum(quotas) > numel:
            return {"where": "tensor", "quotas": quotas, "room": numel,
                    "excess": sum(quotas) - numel, "places": sum(quotas) - numel}
        return None
    full, tail = divmod(numel, length)
    found = None
    if full and sum(quotas) > length:
        excess = sum(quotas) - length
        found = {"where": "blocks", "quotas": quotas, "room": length, "excess": excess, "places": excess * full}
    if tail:
        tail_quotas = [block_quota(q, tail, length) for q in quotas]
        tail_excess = sum(tail_quotas) - tail
        if tail_excess > 0:
            if found is None:
                return {"where": "last block", "quotas": tail_quotas, "room": tail,
                        "excess": tail_excess, "places": tail_excess}
            found["places"] += tail_excess
    return found


def layer_of(tensor: str) -> str:
    """'3' for 'model.layers.3.mlp.up_proj.weight'; 'other' otherwise."""
    match = _LAYER.search(tensor)
    return match.group(1) if match else OTHER


@dataclass
class TensorRecord:
    """Everything measured on one tensor; raw counts and float64 sums."""

    name: str
    shape: list[int]
    layer: str
    models: list[str]
    quotas: list[int]
    block_length: int
    unavoidable: dict | None
    tau_sq: list[float]
    kept: dict[str, list[int]] = field(default_factory=dict)
    kept_changed: dict[str, list[int]] = field(default_factory=dict)
    kept_sq: dict[str, list[float]] = field(default_factory=dict)
    rows: dict[str, list[Moments | None]] = field(default_factory=dict)  # of kept counts per row
    row_length: int | None = None
    pairs: dict[str, list[tuple[int, int, int, int]]] = field(default_factory=dict)  # (i, j, inter, union)
    shared: dict[str, int] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict:
        rules = {}
        for rule in RULES:
            per_model = {}
            for i, label in enumerate(self.models):
                rows = self.rows[rule][i]
                per_model[label] = {
                    "kept": self.kept[rule][i],
                    "kept_changed": self.kept_changed[rule][i],
                    "density": _ratio(self.kept[rule][i], self.numel),
                    "kept_sq_sum": self.kept_sq[rule][i],
                    "norm_ratio": _sqrt_ratio(self.kept_sq[rule][i], self.tau_sq[i]),
                    "rows": None if rows is None else {
                        "rows": rows.n, "cv": rows.cv, "min": int(rows.lo), "max": int(rows.hi),
                    },
                }
            rules[rule] = {
                "models": per_model,
                "pairs": [
                    {"models": [self.models[i], self.models[j]], **_pair_counts(inter, union)}
                    for i, j, inter, union in self.pairs[rule]
                ],
                "shared": {"places": self.shared[rule], "share": _ratio(self.shared[rule], self.numel)},
            }
        return {
            "name": self.name, "shape": self.shape, "numel": self.numel, "layer": self.layer,
            "models": self.models, "quotas": self.quotas, "block_length": self.block_length,
            "row_length": self.row_length,
            "tau_sq_sum": dict(zip(self.models, self.tau_sq)),
            "unavoidable_overlap": self.unavoidable, "rules": rules,
        }


def measure_tensor(name: str, base: torch.Tensor, models: Sequence[torch.Tensor], labels: Sequence[str], resolved, seed: int = 0) -> TensorRecord:
    """All numbers of one tensor under the three rules (see the module doc)."""
    from mergekit_cabs.kernel import NonFiniteInputError, compute_dtype

    try:
        masks = rule_masks(base, models, resolved, name, seed)
    except NonFiniteInputError as error:
        who = "the base model" if error.model is None else f"model '{labels[error.model]}'"
        raise AnalyzeError(f"{who} has NaN or infinite values in tensor '{name}'") from None
    dtype = compute_dtype(base, *models)
    base_flat = base.reshape(-1).to(dtype)
    taus = [m.reshape(-1).to(dtype) - base_flat for m in models]
    changed = [tau != 0 for tau in taus]
    quotas, length = resolved.kernel_quotas(base.numel())
    record = TensorRecord(
        name=name, shape=list(base.shape), layer=layer_of(name), models=list(labels),
        quotas=list(quotas), block_length=length,
        unavoidable=unavoidable_overlap(resolved, base.numel()),
        tau_sq=[float(tau.to(torch.float64).square().sum()) for tau in taus],
    )
    if base.dim() >= 2 and base.numel():
        record.row_length = base.numel() // base.shape[0]
    for rule, rule_mask in masks.items():
        kept_places = [m & c for m, c in zip(rule_mask, changed)]
        record.kept[rule] = [int(m.sum()) for m in rule_mask]
        record.kept_changed[rule] = [int(k.sum()) for k in kept_places]
        record.kept_sq[rule] = [float(torch.where(m, tau, 0).to(torch.float64).square().sum()) for m, tau in zip(rule_mask, taus)]
        if record.row_length:
            record.rows[rule] = [Moments.of(m.reshape(base.shape[0], -1).sum(1)) for m in rule_mask]
        else:
            record.rows[rule] = [None] * len(models)
        record.pairs[rule] = [
            (i, j, int((kept_places[i] & kept_places[j]).sum()), int((kept_places[i] | kept_places[j]).sum()))
            for i in range(len(models)) for j in range(i + 1, len(models))
        ]
        holders = torch.stack(kept_places).sum(0, dtype=torch.int32)
        record.shared[rule] = int((holders >= 2).sum())
    return record


# --- the whole model ------------------------------------------------------------


def analyze(config, *, seed: int = 0, options=None, progress: bool = True) -> dict:
    """Plan `config` with mergekit, measure every cabs tensor, return the report dict."""
    planned = plan(config, options)
    records: dict[int, TensorRecord] = {}
    skipped = []
    for p, tensors in read_tensors(planned, progress=progress):
        reason = _skip_reason(p, tensors)
        if reason:
            skipped.append({"tensor": p.name, "reason": reason})
            continue
        base = tensors[p.task.base_model]
        records[p.order] = measure_tensor(
            p.name, base, [tensors[m] for m in p.models], [str(m) for m in p.models], p.resolved, seed
        )
    ordered = [records[k] for k in sorted(records)]
    return build_report(ordered, skipped, base_model=str(config.base_model), seed=seed)


def _skip_reason(p: PlannedTensor, tensors: dict) -> str | None:
    base = tensors.get(p.task.base_model)
    if base is None:
        return "the base model has no such tensor"
    if not p.models:
        return "no fine-tuned model takes part (the base passes through)"
    missing = [str(m) for m in p.models if m not in tensors]
    if missing:
        return f"missing in {', '.join(missing)} (optional tensor: the merge passes the base through)"
    if not base.is_floating_point():
        return "not a floating-point tensor (copied, not merged)"
    if base.numel() == 0:
        return "empty tensor"
    return None


def build_report(records: Sequence[TensorRecord], skipped: Sequence[dict], *, base_model: str, seed: int) -> dict:
    """Aggregate tensor records (in plan order) into the report dict written as JSON."""
    models: list[str] = []
    for r in records:
        models += [m for m in r.models if m not in models]
    layers = sorted({r.layer for r in records}, key=_layer_sort_key)

    per_model = {m: {rule: _ModelTotals() for rule in RULES} for m in models}
    pair_totals: dict[tuple[str, str], dict[str, list[int]]] = {}
    shared = {rule: 0 for rule in RULES}
    layer_totals = {
        layer: {"numel": 0, "shared": {rule: 0 for rule in RULES},
                "pairs": {rule: [0, 0] for rule in RULES},
                "rows": {rule: Moments() for rule in RULES},
                "models": {m: {rule: [0, 0] for rule in RULES} for m in models}}
        for layer in layers
    }
    for r in records:
        lt = layer_totals[r.layer]
        lt["numel"] += r.numel
        for rule in RULES:
            shared[rule] += r.shared[rule]
            lt["shared"][rule] += r.shared[rule]
            for i, m in enumerate(r.models):
                t = per_model[m][rule]
                t.numel += r.numel
                t.kept += r.kept[rule][i]
                t.kept_changed += r.kept_changed[rule][i]
                t.kept_sq += r.kept_sq[rule][i]
                t.tau_sq += r.tau_sq[i]
                if r.rows[rule][i] is not None:  # pooled as row densities
                    rows = r.rows[rule][i].scaled(1 / r.row_length)
                    t.rows = t.rows.merge(rows)
                    lt["rows"][rule] = lt["rows"][rule].merge(rows)
                lt["models"][m][rule][0] += r.kept[rule][i]
                lt["models"][m][rule][1] += r.numel
            for i, j, inter, union in r.pairs[rule]:
                pair = pair_totals.setdefault((r.models[i], r.models[j]), {x: [0, 0] for x in RULES})
                pair[rule][0] += inter
                pair[rule][1] += union
                lt["pairs"][rule][0] += inter
                lt["pairs"][rule][1] += union

    total = sum(r.numel for r in records)
    numbered = [layer for layer in layers if layer != OTHER]
    summary_models = {}
    for m in models:
        summary_models[m] = {}
        for rule in RULES:
            t = per_model[m][rule]
            spread = Moments.of(torch.tensor(
                [k / n for k, n in (layer_totals[layer]["models"][m][rule] for layer in numbered) if n],
                dtype=torch.float64,
            ))
            summary_models[m][rule] = {
                "numel": t.numel, "kept": t.kept, "kept_changed": t.kept_changed,
                "density": _ratio(t.kept, t.numel),
                "norm_ratio": _sqrt_ratio(t.kept_sq, t.tau_sq),
                "row_cv": t.rows.cv, "row_density_min": _finite(t.rows.lo), "row_density_max": _finite(t.rows.hi),
                "rows": t.rows.n,
                "layer_cv": spread.cv, "layer_density_min": _finite(spread.lo), "layer_density_max": _finite(spread.hi),
            }
    unavoidable = [dict(tensor=r.name, **r.unavoidable) for r in records if r.unavoidable]
    return {
        "format": "mergekit-cabs analyze report, version 1",
        "base_model": base_model,
        "models": models,
        "short_names": dict(zip(models, _short_names(models))),
        "rules": list(RULES),
        "seed": seed,
        "summary": {
            "tensors": len(records),
            "weights": total,
            "models": summary_models,
            "pairs": [
                {"models": [a, b], **{rule: _pair_counts(*totals[rule]) for rule in RULES}}
                for (a, b), totals in pair_totals.items()
            ],
            "shared": {rule: {"places": shared[rule], "share": _ratio(shared[rule], total)} for rule in RULES},
            "unavoidable_overlap_tensors": len(unavoidable),
        },
        "layers": {
            layer: {
                "numel": lt["numel"],
                "shared": {rule: _ratio(lt["shared"][rule], lt["numel"]) for rule in RULES},
                "pair_overlap": {rule: _ratio(*lt["pairs"][rule]) for rule in RULES},
                "row_cv": {rule: lt["rows"][rule].cv for rule in RULES},
                "density": {m: {rule: _ratio(*lt["models"][m][rule]) for rule in RULES} for m in models},
            }
            for layer, lt in layer_totals.items()
        },
        "unavoidable_overlap": unavoidable,
        "skipped": list(skipped),
        "tensors": [r.to_json() for r in records],
    }


@dataclass
class _ModelTotals:
    numel: int = 0
    kept: int = 0
    kept_changed: int = 0
    kept_sq: float = 0.0
    tau_sq: float = 0.0
    rows: Moments = field(default_factory=Moments)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _sqrt_ratio(a: float, b: float) -> float | None:
    return math.sqrt(a / b) if b else None


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _pair_counts(inter: int, union: int) -> dict:
    return {"intersection": inter, "union": union, "overlap": _ratio(inter, union)}


def _layer_sort_key(layer: str):
    return (1, 0) if layer == OTHER else (0, int(layer))


def _short_names(labels: Sequence[str]) -> list[str]:
    """Last path component of each model, unless two would look the same."""
    short = [os.path.basename(label.rstrip("/\\")) or label for label in labels]
    return short if len(set(short)) == len(short) else list(labels)


# --- output -----------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def format_table(report: dict) -> str:
    """The short terminal summary."""
    s = report["summary"]
    names = report["short_names"]
    width = max([len("model")] + [len(names[m]) for m in report["models"]])
    lines = [
        (f"cabs analyze: {s['tensors']} tensors, {s['weights']:,} weights, "
         f"{len(report['models'])} models, seed {report['seed']}"),
        "",
        f"{'model':<{width}}  density  kept-norm  row CV cabs / ties / dare",
    ]
    for m in report["models"]:
        r = s["models"][m]
        cvs = " / ".join(_fmt(r[rule]["row_cv"], ".3f") for rule in RULES)
        lines.append(f"{names[m]:<{width}}  {_fmt(r['cabs']['density'])}   {_fmt(r['cabs']['norm_ratio'], '.3f')}      {cvs}")
    if s["pairs"]:
        pair_names = [f"{names[p['models'][0]]} & {names[p['models'][1]]}" for p in s["pairs"]]
        pw = max(len("pair"), *map(len, pair_names))
        lines += ["", f"{'pair':<{pw}}  overlap cabs    ties    dare"]
        for label, p in zip(pair_names, s["pairs"]):
            lines.append(f"{label:<{pw}}        " + "  ".join(_fmt(p[rule]["overlap"]) for rule in RULES))
    lines += [
        "",
        "kept by 2+ models: " + "  ".join(f"{rule} {_pct(s['shared'][rule]['share'])}" for rule in RULES),
        f"tensors where overlap is unavoidable (quotas > block): {s['unavoidable_overlap_tensors']}",
    ]
    if report["skipped"]:
        lines.append(f"tensors not analysed: {len(report['skipped'])} (see report.md)")
    return "\n".join(lines)


def render_markdown(report: dict, plots: Sequence[str] = ()) -> str:
    """report.md: the summary, per layer, unavoidable overlap and per tensor."""
    s, names = report["summary"], report["short_names"]
    out = [
        "# CABS analysis",
        "",
        f"Base model: `{report['base_model']}`; fine-tunes in priority order: "
        + ", ".join(f"`{m}`" for m in report["models"])
        + f". {s['tensors']} tensors, {s['weights']:,} weights. DARE-style seed: {report['seed']}.",
        "",
        ("Rules at the same budget: **cabs** as configured; **ties**: magnitude top-k per model over the "
         "whole tensor (k = the places cabs keeps); **dare**: each place kept with probability k / numel. "
         "Overlap counts places where models keep a changed weight (tau != 0): "
         "|A and B| / |A or B|, overall = sum of intersections / sum of unions."),
        "",
        "## Models",
        "",
        "| model | rule | density | kept-norm ratio | row CV | row density min / max | layer CV | layer density min / max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in report["models"]:
        for rule in RULES:
            r = s["models"][m][rule]
            out.append(
                f"| {names[m]} | {rule} | {_fmt(r['density'])} | {_fmt(r['norm_ratio'])} | {_fmt(r['row_cv'])} | "
                f"{_fmt(r['row_density_min'])} / {_fmt(r['row_density_max'])} | {_fmt(r['layer_cv'])} | "
                f"{_fmt(r['layer_density_min'])} / {_fmt(r['layer_density_max'])} |"
            )
    out += ["", "## Overlap", "", "| pair | cabs | ties | dare |", "|---|---|---|---|"]
    for p in s["pairs"]:
        a, b = p["models"]
        out.append(f"| {names[a]} & {names[b]} | " + " | ".join(_fmt(p[rule]["overlap"]) for rule in RULES) + " |")
    out.append("| kept by 2+ models (share of weights) | " + " | ".join(_pct(s["shared"][rule]["share"]) for rule in RULES) + " |")
    out += [
        "", "## Per layer", "",
        "Row CV pools the rows of every model's tensors in the layer (kept share per row).", "",
        "| layer | weights | kept by 2+ cabs / ties / dare | pair overlap cabs / ties / dare | row CV cabs / ties / dare |",
        "|---|---|---|---|---|",
    ]
    for layer, lt in report["layers"].items():
        out.append(
            f"| {layer} | {lt['numel']:,} | " + " / ".join(_pct(lt["shared"][rule]) for rule in RULES)
            + " | " + " / ".join(_fmt(lt["pair_overlap"][rule]) for rule in RULES)
            + " | " + " / ".join(_fmt(lt["row_cv"][rule]) for rule in RULES) + " |"
        )
    out += ["", "## Unavoidable overlap", ""]
    if report["unavoidable_overlap"]:
        out += [
            ("The quotas add up to more than the room, so some kept places cannot be free ones "
             "(the `overlap` rule decides what happens there)."),
            "", "| tensor | where | quotas | room | excess | places |", "|---|---|---|---|---|---|",
        ]
        for u in report["unavoidable_overlap"]:
            out.append(f"| `{u['tensor']}` | {u['where']} | {u['quotas']} | {u['room']} | {u['excess']} | {u['places']:,} |")
    else:
        out.append("None: in every tensor the quotas fit in the blocks (or conflict_aware is false).")
    if report["skipped"]:
        out += ["", "## Not analysed", ""] + [f"- `{x['tensor']}`: {x['reason']}" for x in report["skipped"]]
    out += [
        "", "## Per tensor", "",
        "| tensor | weights | kept by 2+ cabs / ties / dare | cabs kept-norm ratio per model |", "|---|---|---|---|",
    ]
    for t in report["tensors"]:
        ratios = ", ".join(_fmt(t["rules"]["cabs"]["models"][m]["norm_ratio"], ".3f") for m in t["models"])
        out.append(
            f"| `{t['name']}` | {t['numel']:,} | "
            + " / ".join(_pct(t["rules"][rule]["shared"]["share"]) for rule in RULES) + f" | {ratios} |"
        )
    out += ["", "## Plots", ""]
    if plots:
        out += [f"![{p}]({p})" for p in plots]
    else:
        out.append(f"Not made: {PLOTS_HINT}.")
    return "\n".join(out) + "\n"


def make_plots(report: dict, directory: Path) -> list[str]:
    """overlap-by-layer.png and kept-by-layer.png; ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(report["layers"])
    x = list(range(len(layers)))
    names = report["short_names"]
    styles = {"cabs": "-", "ties": "--", "dare": ":"}

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for rule in RULES:
        left.plot(x, [100 * (report["layers"][k]["shared"][rule] or 0) for k in layers], styles[rule], marker="o", label=rule)
        right.plot(x, [report["layers"][k]["pair_overlap"][rule] or 0 for k in layers], styles[rule], marker="o", label=rule)
    left.set_title("weights kept by 2+ models (%)", fontsize=10)
    right.set_title("pair overlap |A and B| / |A or B|", fontsize=10)
    left.set_ylim(bottom=0)
    right.set_ylim(bottom=0)
    left.legend(fontsize=8)
    _save_layer_figure(plt, fig, x, layers, directory / "overlap-by-layer.png")

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for m in report["models"]:
        left.plot(x, [report["layers"][k]["density"][m]["cabs"] or 0 for k in layers], marker="o", label=names[m])
    for rule in RULES:
        right.plot(x, [report["layers"][k]["row_cv"][rule] or 0 for k in layers], styles[rule], marker="o", label=rule)
    left.set_title("kept share of each layer's weights (cabs)", fontsize=10)
    right.set_title("spread across rows: CV of kept share per row", fontsize=10)
    right.set_ylim(bottom=0)
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    _save_layer_figure(plt, fig, x, layers, directory / "kept-by-layer.png")
    return ["overlap-by-layer.png", "kept-by-layer.png"]


def _save_layer_figure(plt, fig, x, layers, path: Path) -> None:
    """Layer ticks, labels and grid on every panel; write the PNG."""
    for ax in fig.axes:
        ax.set_xticks(x, layers)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def check_out_dir(out: Path, force: bool, names: Sequence[str] = REPORT_FILES, error=AnalyzeError) -> None:
    """Refuse a file, or a directory that holds files unless `force`."""
    if out.exists() and not out.is_dir():
        raise error(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise error(
            f"--out {out} already holds files; pass --force to replace its "
            f"{', '.join(names)} (other files are left alone), or give another --out"
        )


def write_report(report: dict, out: Path) -> tuple[list[str], bool]:
    """Write report.json, report.md and the plots into `out` (see `publish`).
    Returns (file names written, whether the plots were made)."""
    import json

    made = []

    def build(staging: Path) -> list[str]:
        try:
            made.extend(make_plots(report, staging))
        except ImportError:
            pass
        (staging / "report.md").write_text(render_markdown(report, made), encoding="utf-8")
        (staging / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        return made + ["report.md", "report.json"]

    return publish(out, REPORT_FILES, build), bool(made)


def publish(out: Path, names: Sequence[str], build: Callable[[Path], list[str]]) -> list[str]:
    """Let `build` write files into a temporary directory next to `out`, then
    move them in, in the order it returns them (so the last one, the JSON,
    appears last).  Earlier files of `names` in `out` are replaced or removed;
    a failure leaves no new file that looks complete.  Returns the names written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        written = build(staging)
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            (out / name).unlink(missing_ok=True)
        for name in written:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written
