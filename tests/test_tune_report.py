"""What `tune` shows: the summary and tune.png speak in the objective's own
words and direction, give the chosen values, and name dropped models."""

from __future__ import annotations

import pytest

from mergekit_cabs import tune as tn

from tiny_models import optional


def _report(objective: str, general_weight=None, tasks=("a", "b")) -> dict:
    """A report as run_tune writes it, for two models, four points."""
    points = [((1.0, 1.0, 1.0), 2.0), ((1.0, 0.5, 1.0), 1.9), ((1.0, 0.0, 1.0), 1.8), ((1.25, 0.0, 1.0), 1.85)]
    sign = -1 if objective == "loss" else 1
    names = list(tasks) + ([tn.GENERAL] if general_weight is not None else [])

    def scored(loss: float) -> dict:
        split = {"loss": {k: loss for k in names}, "gain": {k: 0.1 for k in names}, "score": sign * loss}
        return {"fit": split, "heldout": split}

    return {
        "objective": objective, "general_weight": general_weight,
        "reference": {"base": {s: {k: 2.5 for k in names} for s in tn.SPLITS},
                      "models": {k: {s: 1.5 for s in tn.SPLITS} for k in tasks}},
        "search": {"names": ["lambda", "a", "b"], "weights_of": {"a": ["a"], "b": ["b"]}},
        "layer_groups": None,
        "points": [{"lambda": x[0], "weights": {"a": x[1], "b": x[2]}, "score": sign * v} for x, v in points],
        "start": {"lambda": 1.0, "weights": {"a": 1.0, "b": 1.0}, **scored(2.0)},
        "best": {"lambda": 1.0, "weights": {"a": 0.0, "b": 1.0}, **scored(1.8)},
    }


def test_loss_summary_shows_losses_a_positive_mean_loss_and_the_dropped_model():
    text = tn.format_summary(_report("loss"))
    assert "gain" not in text
    assert "dropped: a (weight 0: the merge leaves its task vector out)" in text
    assert text.splitlines()[-3] == ("objective (loss): mean loss over tasks (lower is better), your config -> tuned: "
                                     "fit 2.0000 -> 1.8000, held-out 2.0000 -> 1.8000")
    assert text.splitlines()[-1] == ("recommended: cabs (tuned), tuned.yml, the tuned column above: it scores at "
                                     "least as high as your config on the fit data; no baseline was compared")


def test_gain_summary_keeps_the_gain_column_and_says_higher_is_better():
    text = tn.format_summary(_report("gain", general_weight=0.5))
    assert text.splitlines()[text.splitlines().index("") + 1].split()[-1] == "gain"
    assert "mean normalized gain over tasks + 0.5 x general text's relative loss change (higher is better)" in text


@pytest.mark.parametrize("objective, words, chosen", [
    ("loss", "mean loss over tasks (lower is better)", 1.8),
    ("gain", "mean normalized gain over tasks (higher is better)", 1.8),
])
def test_plot_axis_says_what_is_plotted_and_legends_give_the_chosen_values(objective, words, chosen):
    optional("matplotlib", '".[plot]"')
    import matplotlib.pyplot as plt

    fig = tn.plot_figure(_report(objective))
    try:
        axes = [ax for ax in fig.axes if ax.get_visible()]
        assert " ".join(axes[0].get_ylabel().split()) == f"{words}, fit windows"
        legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in axes]
        assert legends[0][-1] == "chosen: 1" and legends[1][-1] == "chosen: 0 (dropped)"
        assert legends[2][-1] == "chosen: 1" and legends[3] == [f"best so far: {chosen:.4g}"]
        assert all("every point tried" in entries for entries in legends[:3])
        # the plotted values are the objective as shown: the loss itself, not minus it
        ys = sorted(float(y) for y in axes[1].collections[0].get_offsets()[:, 1])
        assert ys == [1.8, 1.85, 1.9, 2.0]
    finally:
        plt.close(fig)


def test_summary_gives_each_tasks_held_out_change_and_flags_the_one_made_worse():
    """A task made worse (here a's held-out loss 1.2196 -> 1.2631) is flagged in
    the terminal summary, each task in its own measure and direction."""
    report = _report("gain")
    report["start"]["heldout"] = {**report["start"]["heldout"], "loss": {"a": 1.2196, "b": 2.0}}
    report["best"]["heldout"] = {**report["best"]["heldout"], "loss": {"a": 1.2631, "b": 1.8}}
    report["data"] = {"a": {"kind": "text", "measure": "loss", "lower_is_better": True, "weight": 1.0},
                      "b": {"kind": "lm-eval", "measure": "acc,none", "lower_is_better": False, "weight": 1.0}}
    lines = tn.format_summary(report).splitlines()
    (a,) = [x for x in lines if x.strip().startswith("a (text)")]
    (b,) = [x for x in lines if x.strip().startswith("b (lm-eval)")]
    assert a.split()[4:9] == ["2.5000", "1.5000", "1.2196", "1.2631", "+0.0435"]
    assert a.endswith("WORSE than your config")
    assert "acc,none (^)" in b and b.endswith("0.100  WORSE than your config")  # higher is better: 2.0 -> 1.8 is worse
    report["best"]["heldout"]["loss"]["b"] = 2.2
    (b,) = [x for x in tn.format_summary(report).splitlines() if x.strip().startswith("b (lm-eval)")]
    assert "WORSE" not in b and "+0.2000" in b


def test_tune_md_sums_up_many_recommended_weights_per_model_and_lists_a_few_one_by_one():
    """tune.md's "What to merge" lists a few weights one by one; past the
    console's limit (a per-tensor shape) each model's count, range and
    median, naming the YAML that holds each weight."""
    from mergekit_cabs.tune.outputs import recommended_markdown
    from mergekit_cabs.tune.report import WEIGHTS_LISTED

    few = recommended_markdown(_report("gain"))[-1]
    assert few.startswith("**`mergekit-yaml tuned.yml OUT`**: cabs (tuned)")
    assert few.endswith("Its numbers: lambda 1, a 0, b 1.")
    report = _report("gain")
    names = {m: [f"{m}: t{i}" for i in range(WEIGHTS_LISTED)] for m in ("a", "b")}
    report["search"]["weights_of"] = names
    for point in ("start", "best"):
        report[point]["weights"] = {n: (i % 5) / 2 for m in names.values() for i, n in enumerate(m)}
    many = recommended_markdown(report)[-1]
    assert many.endswith(f"Its numbers: lambda 1; a: {WEIGHTS_LISTED} weights, 0.000 to 2.000, median 1.000; "
                         f"b: {WEIGHTS_LISTED} weights, 0.000 to 2.000, median 1.000 (each weight in tuned.yml).")
    assert "t23" not in many
