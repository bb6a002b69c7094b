"""`mergekit-cabs tune`: pick each model's weight (and lambda) from the user's data.

A CABS merge is ``base + lambda * sum_i weight_i * (mask_i * tau_i)``.  The
masks do not depend on the weights, so the tuner computes them once, through
mergekit's own plan and execution graph (filters, gradients, slices and dtype
settings resolve exactly as in ``mergekit-yaml``), and keeps what it needs to
rebuild any merged tensor (`store`).  Setting a weight vector is then one pass
over the parameters with the kernel's own arithmetic, written into a live
transformers model (`live`) that is scored on each model's own data (`data`
dispatches to the kinds: `text` windows; `chat`: prompt/response and chat
rows, loss on the response tokens; `choice`: multiple choice as lm-eval
scores it; `lmeval`: lm-eval tasks on the live model; `rows` holds what
they share).  A search over the weights and lambda (`search`:
coordinate-wise with halving steps, or CMA-ES) maximises the mean
normalized gain over tasks, or minimises a loss (`objective`), one weight
per model or, with layer groups (`groups`), one per model and group of
decoder layers; the chosen point is written as ``tuned.yml`` (`config`)
with a report (`report`: the console; `outputs`: the files).  Task arithmetic tuned
the same way, and on request one-lambda task_arithmetic, ties and dare_ties
merged by mergekit's own methods, are scored on the same held-out windows
(`baselines`), with paired bootstrap intervals and a verdict (`compare`).
With --densities / --orders, each (density, order) setting gets its own
masks and search, and the best on the fit data is kept (`settings`).
`run` holds the phases in order; docs/contributing.md draws the layers.

    from mergekit_cabs import tune
    prep = tune.prepare("my-cabs.yml", ["math-ft=math.jsonl", "code-ft=code.txt"])
    report = tune.run_tune(prep, budget=60)
    tune.write_outputs(report, "cabs-tune")
"""

from mergekit_cabs.tune.baselines import as_method, dense_cabs, merge_into, parse_baselines, tuned_decision
from mergekit_cabs.tune.compare import comparison, recommendation
from mergekit_cabs.tune.config import check_round_trip, configured_numbers, mask_signature, tuned_config
from mergekit_cabs.tune.data import load_tasks, match_data, model_names, task_losses, task_scores
from mergekit_cabs.tune.groups import ONE_GROUP, LayerGroups, layer_index, make_groups
from mergekit_cabs.tune.live import timed
from mergekit_cabs.tune.objective import Objective, split_objectives
from mergekit_cabs.tune.options import (
    BASELINE_FILES,
    DEFAULTS,
    GENERAL,
    OBJECTIVES,
    ONE_LAMBDA,
    OPTIMIZERS,
    OUT_FILES,
    SCORE_DTYPES,
    TuneError,
    check_data_settings,
    check_device_settings,
    check_optimizer,
    implied_objective,
    parse_bounds,
    search_settings,
)
from mergekit_cabs.tune.outputs import (
    Finished,
    closing_lines,
    make_plot,
    merge_line,
    plot_figure,
    render_markdown,
    show_interrupted,
    write_or_show,
    write_outputs,
    yaml_texts,
)
from mergekit_cabs.tune.prepare import Prepared, prepare
from mergekit_cabs.tune.references import load_model, scoring_dtype
from mergekit_cabs.tune.report import format_summary
from mergekit_cabs.tune.rows import SPLITS, held_out, means
from mergekit_cabs.tune.run import run_tune
from mergekit_cabs.tune.search import (
    SEARCHES,
    SearchResult,
    budget_note,
    choose_optimizer,
    cmaes_search,
    coordinate_search,
    optimise,
)
from mergekit_cabs.tune.settings import (
    Setting,
    parse_densities,
    parse_orders,
    plan_settings,
    setting_budgets,
    setting_config,
)
from mergekit_cabs.tune.store import Slot, WeightStore, build_store, held_bytes, same_bits
from mergekit_cabs.tune.text import TaskData, load_task_data, read_texts, window_losses

__all__ = [
    "BASELINE_FILES",
    "ONE_LAMBDA",
    "as_method",
    "comparison",
    "dense_cabs",
    "merge_into",
    "parse_baselines",
    "tuned_decision",
    "DEFAULTS",
    "GENERAL",
    "LayerGroups",
    "ONE_GROUP",
    "OBJECTIVES",
    "OPTIMIZERS",
    "OUT_FILES",
    "SCORE_DTYPES",
    "SEARCHES",
    "SPLITS",
    "Objective",
    "Prepared",
    "SearchResult",
    "Setting",
    "Slot",
    "TaskData",
    "TuneError",
    "WeightStore",
    "budget_note",
    "build_store",
    "check_data_settings",
    "check_device_settings",
    "check_optimizer",
    "choose_optimizer",
    "cmaes_search",
    "check_round_trip",
    "configured_numbers",
    "coordinate_search",
    "format_summary",
    "held_bytes",
    "held_out",
    "implied_objective",
    "layer_index",
    "load_model",
    "load_task_data",
    "load_tasks",
    "make_plot",
    "match_data",
    "make_groups",
    "mask_signature",
    "parse_densities",
    "parse_orders",
    "plan_settings",
    "setting_budgets",
    "setting_config",
    "means",
    "model_names",
    "optimise",
    "parse_bounds",
    "plot_figure",
    "prepare",
    "read_texts",
    "render_markdown",
    "run_tune",
    "same_bits",
    "scoring_dtype",
    "search_settings",
    "split_objectives",
    "timed",
    "task_losses",
    "task_scores",
    "tuned_config",
    "window_losses",
    "write_outputs",
    "Finished",
    "closing_lines",
    "merge_line",
    "recommendation",
    "show_interrupted",
    "write_or_show",
    "yaml_texts",
]
