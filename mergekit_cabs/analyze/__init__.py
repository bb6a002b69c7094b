"""`mergekit-cabs analyze`: overlap and balance of the kept weights, before merging.

For every tensor mergekit would merge with a cabs configuration, this package
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
  nothing and is no conflict (it does not claim the place for later models).
  Densities count every kept place;
* pair overlap = |A_i & A_j| / |A_i | A_j|; overall = sum of intersections /
  sum of unions over the tensors both models take part in;
* shared = places kept by two or more models / numel;
* norm ratio = ||mask_i * tau_i|| / ||tau_i||; overall = sqrt(sum of kept
  squares / sum of squares) over tensors;
* block balance, the balance CABS promises: kept count per full block of m
  consecutive places of the flattened tensor (m = the configured block_size,
  also with balanced: false; a short last block is left out), as a share of
  m; per tensor: coefficient of variation (population std / mean), min and
  max of the counts; pooled (per model, per layer) around each tensor's own
  mean, so a density gradient across tensors is no spread: sqrt(sum over
  tensors of squared deviations / blocks) / mean. cabs with balanced: true
  and overlap: fill keeps n in every full block, block CV 0;
* row balance: kept count per row (dim 0, tensors with >= 2 dims) as a share
  of the row length; per tensor and pooled over all rows of all such tensors:
  coefficient of variation (population std / mean), min and max (rows that
  are not a whole number of blocks hold parts of several, so cabs rows vary);
* layer balance: kept / numel per layer (layer index from ``.layers.<i>.`` in
  the output tensor name; other tensors form the group ``other``, which is
  reported but left out of the spread across layers);
* order: each model's cabs norm ratio if it chose first (its own top-n per
  block among all places) and if it chose last (after the other models in
  their planned order); see `suggest_order` for the rule built on them.

Precision: task vectors are taken in float32 (float64 when an input is
float64) from the tensors as mergekit loads them for the merge (after its
``dtype:`` cast); sums of squares and all aggregates are float64.

Tensors are read through mergekit's own planner and loaders, a tensor at a
time (mergekit's executor drops each input as soon as it has been used).

The package, a file per job: `measure` (one tensor: the three rules' masks
and every count), `order` (first / last kept norms and the order rule,
`suggest_order`, which ``tune --orders suggested`` uses too,
through `run.order_of`), `summary` (the
records summed into the report dict, that is report.json), `run` (plan,
read, measure, summarise), `report` (the terminal table, report.md, writing
--out), `plots` (the PNGs) and `stats` (pooled moments and ratios).

    from mergekit_cabs import analyze, planning
    config = planning.load_config("my-cabs.yml", "analyze")
    report = analyze.analyze(config, source="my-cabs.yml")
    print(analyze.format_table(report))
    analyze.write_report(report, "cabs-analysis")
"""

from mergekit_cabs.analyze.measure import (
    OTHER,
    RULES,
    AnalyzeError,
    TensorRecord,
    dare_seed,
    layer_of,
    measure_tensor,
    rule_masks,
    unavoidable_overlap,
)
from mergekit_cabs.analyze.order import ORDER_TOLERANCE, order_entry, position_masks, suggest_order
from mergekit_cabs.analyze.plots import OTHER_TICK, OVERLAP_NOTE, RULE_LABELS, layer_figures, make_plots
from mergekit_cabs.analyze.report import REPORT_FILES, format_table, order_advice, render_markdown, write_report
from mergekit_cabs.analyze.run import analyze, order_of
from mergekit_cabs.analyze.stats import Moments, kept_sq_sum
from mergekit_cabs.analyze.summary import build_report

__all__ = [
    "ORDER_TOLERANCE",
    "OTHER",
    "OTHER_TICK",
    "OVERLAP_NOTE",
    "REPORT_FILES",
    "RULES",
    "RULE_LABELS",
    "AnalyzeError",
    "Moments",
    "TensorRecord",
    "analyze",
    "build_report",
    "dare_seed",
    "format_table",
    "kept_sq_sum",
    "layer_figures",
    "layer_of",
    "make_plots",
    "measure_tensor",
    "order_advice",
    "order_entry",
    "order_of",
    "position_masks",
    "render_markdown",
    "rule_masks",
    "suggest_order",
    "unavoidable_overlap",
    "write_report",
]
