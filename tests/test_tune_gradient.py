"""The gradient search's gradient (`tune.gradient`): exact for every
coefficient through the weight store (against central finite differences of
the real merge's objective), reduced and freed one weight gradient at a
time; the gradient search itself; lm-eval data refused.

The family is float64 (a float64 merge, live model and store) so that the
finite differences are limited by the scoring's own float32 logits (each
kind's `score` computes its log-softmax in float32), not by the merge's
rounding."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from mergekit_cabs import tune as tn
from mergekit_cabs.tune import gradient as gr
from mergekit_cabs.tune.gradsearch import gradient_search, live_gradient_search
from mergekit_cabs.tune.groups import make_columns
from mergekit_cabs.tune.live import Live
from mergekit_cabs.tune.objective import Objective

from tiny_models import CUDA_TEST_DEVICE, make_tiny_llama
from tiny_models import word_text as _w
from tiny_models import write_jsonl as _jsonl


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A float64 base and three fine-tunes, with a text file (ft0), prompt/response
    rows (ft1), multiple-choice questions (ft2) and a general text."""
    root = tmp_path_factory.mktemp("grad")
    base = make_tiny_llama(root / "base", seed=5, layers=2, dtype=torch.float64)
    tunes = [make_tiny_llama(root / f"ft{i}", seed=50 + i, base=base, scale=2 + i, dtype=torch.float64)
             for i in range(3)]
    gen = torch.Generator().manual_seed(1)

    def words(count: int) -> str:
        return _w(*(4 + torch.randint(0, 70, (count,), generator=gen)).tolist())

    text = root / "text.txt"
    text.write_text(words(200))
    prompt = _jsonl(root / "prompt.jsonl", [{"prompt": words(3 + i % 4), "response": words(2 + i % 3)}
                                            for i in range(10)])
    choice = _jsonl(root / "choice.jsonl", [
        {"question": words(3 + i % 3), "choices": [words(1 + (i + j) % 3) for j in range(2 + i % 2)],
         "answer": i % 2} for i in range(10)])
    general = root / "general.txt"
    general.write_text(words(120))
    raw = {"merge_method": "cabs", "base_model": str(base.path),
           "models": [{"model": str(t.path), "parameters": {"weight": 1.0, "density": 0.25}} for t in tunes],
           "parameters": {"block_size": 64, "lambda": 1.0}, "dtype": "float64"}
    data = [f"ft0={text}", f"ft1={prompt}@2", f"ft2={choice}"]
    repeated = root / "repeated.txt"  # every window alike: what lowers one window's loss lowers the others'
    repeated.write_text(" ".join([_w(*range(4, 21))] * 16))
    return {"root": root, "base": base, "raw": raw, "data": data, "general": general,
            "repeated": [f"ft{i}={repeated}" for i in range(3)]}


SUPPORTS = {  # name: (what changes in the configuration, disjoint?)
    "disjoint": ({}, True),
    "overlapping": ({"conflict_aware": False, "density": 0.5}, False),
    "task arithmetic": ("dense", False),
}


def _live(family, support: str, columns: str, batch_size: int = 4, max_windows: int = 4, repeated: bool = False,
          device: str = "cpu", store_device: str = "cpu"):
    """The live float64 model, bound to the store of the `support` configuration
    with `columns`, and its objective (gain, with task weights and the general
    set; the reference values are made up: the gain is affine in the losses
    whatever they are)."""
    change, _ = SUPPORTS[support]
    raw = json.loads(json.dumps(family["raw"]))
    if change == "dense":
        raw = tn.dense_cabs(raw)
    else:
        raw["parameters"].update(change)
    path = family["root"] / f"{support.replace(' ', '_')}.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    data, general = (family["repeated"], None) if repeated else (family["data"], family["general"])
    prep = tn.prepare(path, data, general=general, window=12, max_windows=max_windows)
    model = tn.load_model(str(family["base"].path), device, torch.float64)
    store = tn.build_store(prep.planned, prep.finetunes, model, device=device, store_device=store_device,
                           progress=False)
    groups = make_columns([slot.name for slot in store.slots], columns, None)
    for slot in store.slots:
        slot.group = groups.of(slot.name)
    live = Live(model, store, prep.tasks, batch_size, groups, len(prep.finetunes))
    names = [t.name for t in prep.tasks]
    if repeated:
        return live, Objective("loss", names, {}, {})
    objective = Objective("gain", names[:-1], {t: 6.0 for t in names}, {t: 4.5 + 0.3 * k for k, t in
                                                                        enumerate(names)},
                          general_weight=0.5, weights={t.name: t.weight for t in prep.tasks})
    return live, objective


def _point(live, seed: int) -> tuple[float, ...]:
    gen = torch.Generator().manual_seed(seed)
    size = live.groups.count * live.models
    return (0.9, *(0.6 + 0.8 * torch.rand(size, generator=gen, dtype=torch.float64)).tolist())


def _real_score(live, objective, x) -> float:
    """The objective as the search scores a point: the real merge and each kind's own `score`."""
    live.set(x)
    return objective.score(tn.means(live.losses("fit")))


# --- the gradient is exact -----------------------------------------------------------------

CASES = [  # (supports, columns): one per model, per layer and per tensor; each kind of support
    ("disjoint", "model"), ("disjoint", "layer"), ("disjoint", "tensor"),
    ("overlapping", "model"), ("overlapping", "tensor"), ("task arithmetic", "layer"),
]


@pytest.mark.parametrize("support, columns", CASES)
def test_every_coefficient_gradient_matches_a_central_finite_difference_of_the_real_merge(family, support, columns):
    """Text, prompt/response and multiple-choice data and a general text at once.
    Tolerance: the real score computes each log-softmax in float32 (its
    `.float()`), so it is smooth only to float32's rounding, about 1e-7 of a
    loss of ~4.3 per token, mostly averaged away over the items; with a step
    h = 1e-3 that rounding contributes at most ~1e-7 / 1e-3 = 1e-4 x the gains'
    scale (1/1.5) to a difference, and the truncation error h^2 f'''/6 is
    ~1e-7.  So 2e-4 absolute plus 1e-3 relative, while the gradients are
    ~1e-3 to 1: a wrong factor (lambda, a weight, a mask or a column) is
    orders of magnitude above it."""
    live, objective = _live(family, support, columns)
    assert live.store.disjoint == SUPPORTS[support][1]
    x = _point(live, seed=len(columns))
    score, slope = gr.objective_gradient(live, objective, x)
    assert len(slope) == len(x) == 1 + live.models * live.groups.count
    assert score == pytest.approx(_real_score(live, objective, x), abs=1e-12)  # the same arithmetic
    h = 1e-3
    fd = []
    for j in range(len(x)):
        up, down = list(x), list(x)
        up[j] += h
        down[j] -= h
        fd.append((_real_score(live, objective, up) - _real_score(live, objective, down)) / (2 * h))
    fd, slope = torch.tensor(fd), torch.tensor(slope)
    assert fd.abs().max() > 1e-2  # the objective does move
    torch.testing.assert_close(slope, fd, rtol=1e-3, atol=2e-4)


@pytest.mark.skipif(CUDA_TEST_DEVICE == "cuda" and not torch.cuda.is_available(),
                    reason="no CUDA device on this machine")
@pytest.mark.parametrize("store_device", ["cpu", CUDA_TEST_DEVICE])
def test_cuda_gradient_and_score_match_the_cpu_ones(family, store_device):
    """`tune --cuda --optimizer gradient`: the live model on the GPU (the store
    on the host, or with --store-on-device on the GPU) gives the CPU's score
    and slopes, in float64, to float64's rounding of a different summation
    order.  In the CPU dry run of benchmarks/gpu/run.sh
    (MERGEKIT_CABS_CUDA_TEST_DEVICE=cpu) this is the same test's code on the
    CPU, not a CUDA check."""
    x = None
    results = []
    for device, store in (("cpu", "cpu"), (CUDA_TEST_DEVICE, store_device)):
        live, objective = _live(family, "disjoint", "tensor", device=device, store_device=store)
        x = x or _point(live, seed=3)
        results.append(gr.objective_gradient(live, objective, x))
    (cpu_score, cpu_slope), (score, slope) = results
    assert score == pytest.approx(cpu_score, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(torch.tensor(slope), torch.tensor(cpu_slope), rtol=1e-7, atol=1e-10)


# --- each weight gradient is reduced and freed as it arrives -------------------------------


@pytest.mark.parametrize("checkpoint", [False, True])
def test_the_hooks_reduce_and_free_each_weight_gradient_so_about_one_is_held_at_a_time(family, checkpoint):
    live, objective = _live(family, "disjoint", "layer")
    params = dict(live.model.named_parameters())
    before = {name: p.requires_grad for name, p in params.items()}
    merged = [p for p in params.values() if any(p.data_ptr() == s.target.data_ptr() for s in live.store.slots)]
    sizes = [p.numel() * p.element_size() for p in merged]
    x = _point(live, seed=3)
    stats: dict = {}
    score, slope = gr.objective_gradient(live, objective, x, checkpoint=checkpoint, stats=stats)
    assert all(p.grad is None for p in params.values())
    assert {name: p.requires_grad for name, p in params.items()} == before
    assert stats["hook_calls"] >= len(merged)  # every merged parameter's gradient went through its hook
    # Counted inside the hooks: the merged gradients alive at once never exceed the largest one
    # (held all together they would be their sum, about 10 times as much here).
    assert stats["peak_grad_bytes"] == max(sizes)
    assert sum(sizes) > 5 * max(sizes)
    plain = gr.objective_gradient(live, objective, x)
    assert score == plain[0]
    torch.testing.assert_close(torch.tensor(slope), torch.tensor(plain[1]), rtol=1e-10, atol=1e-12)


def test_lm_eval_data_is_refused_in_one_line_naming_the_other_optimizers(family):
    from types import SimpleNamespace

    live, objective = _live(family, "disjoint", "model")
    live.tasks = [*live.tasks, SimpleNamespace(name="arc_easy", kind="lm-eval")]
    with pytest.raises(tn.TuneError) as error:
        gr.objective_gradient(live, objective, _point(live, seed=0))
    message = str(error.value)
    assert "\n" not in message and "'arc_easy' is not differentiable" in message
    assert "--optimizer coordinate or --optimizer cmaes" in message


# --- the gradient search -------------------------------------------------------------------


def test_the_gradient_search_stays_in_its_bounds_and_reaches_an_optimum_on_the_boundary():
    """A concave quadratic whose optimum (1.5, -0.2, 0.4) lies outside the box in two coordinates."""
    optimum = torch.tensor([1.5, -0.2, 0.4], dtype=torch.float64)
    bounds = [(0.0, 1.0), (0.0, 1.0), (0.0, 1.0)]

    def value(x):
        return -float(((torch.tensor(x, dtype=torch.float64) - optimum) ** 2).sum())

    def gradient(x):
        return value(x), (-2 * (torch.tensor(x, dtype=torch.float64) - optimum)).tolist()

    trace: list = []
    result = gradient_search(gradient, value, (0.5, 0.5, 0.5), bounds, steps=300, rate=0.05, every=10,
                             patience=3, trace=trace)
    assert all(lo <= v <= hi for step in trace for v, (lo, hi) in zip(step["point"], bounds))
    assert all(lo <= v <= hi for point, _ in result.history for v, (lo, hi) in zip(point, bounds))
    assert result.best == pytest.approx((1.0, 0.0, 0.4), abs=1e-2)
    assert result.stopped == "converged" and result.optimizer == "gradient"
    assert result.score == max(score for _, score in result.history)


def test_the_gradient_search_is_deterministic_for_a_seed_and_improves_the_fit_objective(family):
    live, objective = _live(family, "overlapping", "layer", max_windows=8, repeated=True)
    start = (1.0, *[1.0] * (live.models * live.groups.count))  # the one-lambda start
    bounds = [(0.05, 2.0)] + [(0.0, 2.0)] * (len(start) - 1)
    runs = []
    for seed in (7, 7, 8):
        trace: list = []
        result = live_gradient_search(live, objective, start, bounds, steps=12, items=2, seed=seed, rate=0.05,
                                      every=3, patience=3, trace=trace)
        runs.append((result, trace))
    (first, first_trace), (again, again_trace), (_, other_trace) = runs
    assert first.best == again.best and first.history == again.history
    assert [s["point"] for s in first_trace] == [s["point"] for s in again_trace]
    assert [s["score"] for s in first_trace] != [s["score"] for s in other_trace]  # other minibatches
    assert all(lo <= v <= hi for step in first_trace for v, (lo, hi) in zip(step["point"], bounds))
    assert first.best != start
    assert _real_score(live, objective, first.best) > _real_score(live, objective, start) + 1e-3


@pytest.mark.parametrize("dimensions, budget, differentiable, chosen", [
    (64, 60, True, "gradient"),  # per tensor: the budget cannot step each way along each number
    (21, 100, True, "gradient"),  # per layer of a 4-layer family: not three passes (129)
    (64, 400, True, "coordinate"),  # ... three passes
    (64, 60, False, "coordinate"),  # lm-eval data: no slopes
    (10, 5, True, "coordinate"),  # under 16 numbers: the searches without slopes, as before
])
def test_auto_takes_the_gradient_search_only_for_fine_shapes_the_budget_cannot_cover(dimensions, budget,
                                                                                     differentiable, chosen):
    assert tn.choose_optimizer("auto", dimensions, budget, differentiable=differentiable) == chosen
