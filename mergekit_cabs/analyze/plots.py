"""The plots of `mergekit-cabs analyze`: overlap-by-layer.png and kept-by-layer.png (matplotlib, optional)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from mergekit_cabs._output import pyplot
from mergekit_cabs.analyze.measure import OTHER, RULES

RULE_LABELS = {
    "cabs": "cabs (the masks the merge will use)",
    "ties": "ties-style keep (magnitude top-k, not a merge)",
    "dare": "dare-style keep at the same budget (not a merge)",
}
OTHER_TICK = "other:\nembeddings,\nnorms, head"
OVERLAP_NOTE = ("Lines may lie on each other: each has its own marker and is shifted a little sideways. 'other' = "
                "tensors outside .layers.N. (embeddings, final norm, output head), shown apart, not joined to a line.")
BALANCE_NOTE = ("Right: CABS keeps n of every block of m consecutive weights of the flattened tensor (short last "
                "block left out), so its spread is 0 there; rows need not be whole blocks (report.md: row CV).")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", ":", "-.")
_SHIFT = 0.07  # sideways offset between series, in layers


def layer_figures(report: dict) -> dict:
    """{file name: matplotlib Figure} for overlap-by-layer.png and kept-by-layer.png (not saved;
    ImportError without matplotlib)."""
    plt = pyplot()
    layers, config = report["layers"], _config_name(report)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 5), dpi=100)
    fig.suptitle(f"{config}: do the fine-tunes keep the same weights? (by layer)", fontsize=11)
    _plot_layers(left, list(layers), _rule_series(layers, "shared", scale=100))
    _plot_layers(right, list(layers), _rule_series(layers, "pair_overlap"))
    left.set_title("weights kept by two or more models", fontsize=10)
    left.set_ylabel("share of the layer's weights (%)")
    right.set_title("overlap of each pair of models", fontsize=10)
    right.set_ylabel("kept by both / kept by either\n(pairs pooled)")
    _finish_figure(fig, [(None, left, "keep rule (both panels)", 3)])
    overlap = fig

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 5), dpi=100)
    fig.suptitle(f"{config}: how evenly the kept weights spread (by layer)", fontsize=11)
    names = report["short_names"]
    _plot_layers(left, list(layers), {names[m]: [layers[k]["density"][m]["cabs"] for k in layers]
                                      for m in report["models"]})
    _plot_layers(right, list(layers), _rule_series(layers, "block_cv"))
    left.set_title("share of each layer's weights cabs keeps", fontsize=10)
    left.set_ylabel("kept share of the layer's weights")
    right.set_title(f"how evenly blocks of {block_size_text(report)} keep weights\n"
                    "(cabs promises n in each: 0)", fontsize=10)
    right.set_ylabel("kept count per block of m weights:\nspread across blocks (std / mean)")
    _finish_figure(fig, [(left, left, "model (cabs keep)", 4), (right, right, "keep rule", 1)],
                   notes=(BALANCE_NOTE, OVERLAP_NOTE))
    return {"overlap-by-layer.png": overlap, "kept-by-layer.png": fig}


def block_size_text(report: dict) -> str:
    """'m = 256' when every tensor has that block_size, else 'm = block_size (16, 256)'."""
    sizes = report["summary"]["block_sizes"]
    return f"m = {sizes[0]}" if len(sizes) == 1 else f"m = block_size ({', '.join(map(str, sizes))})"


def _rule_series(layers: dict, key: str, scale: float = 1.0) -> dict:
    """{legend label: per-layer values of layers[*][key][rule] times `scale` (None kept)}."""
    return {RULE_LABELS[rule]: [None if layers[k][key][rule] is None else scale * layers[k][key][rule] for k in layers]
            for rule in RULES}


def _config_name(report: dict) -> str:
    config = report.get("config")
    return Path(config).name if config else "cabs analyze"


def _plot_layers(ax, layers: Sequence[str], series: dict) -> None:
    """One line per series over the numbered layers, and its 'other' value as a lone
    marker to the right, past a gap and a dotted rule (no line to it); series shifted
    sideways, each with its own marker (filled for the first, open for the rest)."""
    numbered = [i for i, k in enumerate(layers) if k != OTHER]
    other = layers.index(OTHER) if OTHER in layers else None
    gap = max(1.5, 0.1 * len(numbered))
    x_other = len(numbered) - 1 + gap
    for s, (label, values) in enumerate(series.items()):
        shift = (s - (len(series) - 1) / 2) * _SHIFT
        style = {"marker": _MARKERS[s % len(_MARKERS)], "markersize": 6 if len(numbered) <= 12 else 4,
                 "clip_on": False, "fillstyle": "full" if s == 0 else "none", "markeredgewidth": 1.3}
        (line,) = ax.plot([j + shift for j in range(len(numbered))], [_nan(values[i]) for i in numbered],
                          linestyle=_LINESTYLES[s % len(_LINESTYLES)], label=label, **style)
        if other is not None:
            ax.plot([x_other + shift], [_nan(values[other])], linestyle="none", color=line.get_color(), **style)
    step = max(1, math.ceil(len(numbered) / 16))
    ticks = list(range(0, len(numbered), step))
    labels = [layers[numbered[j]] for j in ticks]
    if other is not None:
        ax.axvline(x_other - gap / 2, color="grey", linewidth=0.8, linestyle=(0, (1, 3)))
        ticks, labels = ticks + [x_other], labels + [OTHER_TICK]
    ax.set_xticks(ticks, labels)
    ax.set_xlim(-0.5, (x_other if other is not None else len(numbered) - 1) + 0.5)
    ax.set_xlabel("layer")
    top = max((v for values in series.values() for v in values if v is not None and math.isfinite(v)), default=0)
    ax.set_ylim(0, 1.12 * top if top > 0 else 1)
    ax.grid(alpha=0.3)


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def _finish_figure(fig, legends, bottom: float = 0.22, notes: Sequence[str] = (OVERLAP_NOTE,)) -> None:
    """Panels above `bottom` (a share of the height); below them the legends, each
    (under this axes or None: centred, of the series of this axes, title, columns);
    the notes at the foot, one a line, the last lowest."""
    fig.tight_layout(rect=(0, bottom, 1, 1))
    for under, source, title, ncol in legends:
        box = under.get_position() if under is not None else None
        x = 0.5 if box is None else box.x0 + box.width / 2
        fig.legend(*source.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(x, bottom),
                   ncol=ncol, fontsize=8, frameon=False, title=title, title_fontsize=8)
    for i, note in enumerate(reversed(notes)):
        fig.text(0.5, 0.012 + 0.03 * i, note, ha="center", fontsize=7.5)


def make_plots(report: dict, directory: Path) -> list[str]:
    """overlap-by-layer.png and kept-by-layer.png into `directory`; ImportError without matplotlib."""
    plt = pyplot()
    written = []
    for name, fig in layer_figures(report).items():
        fig.savefig(directory / name)
        plt.close(fig)
        written.append(name)
    return written
