"""What the analysis says: the terminal summary, report.md, and report.json with the plots written to --out.

`format_table` is the short summary printed by ``mergekit-cabs analyze``;
`render_markdown` is report.md; `write_report` writes report.json,
report.md and the plots (`plots`) through `_output.publish`, so a failed
write leaves no file that looks complete (the command prints the summary
before it writes, so a full disk loses no analysis).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

from mergekit_cabs._output import PLOTS_HINT, WriteError, fmt, pct, publish
from mergekit_cabs.analyze.measure import RULES, AnalyzeError
from mergekit_cabs.analyze.order import ORDER_TOLERANCE
from mergekit_cabs.analyze.plots import block_size_text, make_plots

REPORT_FILES = ("report.json", "report.md", "overlap-by-layer.png", "kept-by-layer.png")


def order_advice(report: dict) -> list[str]:
    """The order suggestion: a headline and the numbers behind it (none for one model)."""
    order, names = report["summary"]["order"], report["short_names"]
    if order["reason"] == "single":
        return []
    per = order["models"]
    planned = ", ".join(names[m] for m in order["planned"])
    if order["reason"] == "reorder":
        head = (f"suggested order: {', '.join(names[m] for m in order['suggested'])} (planned: {planned}): "
                f"put {names[order['suggested'][0]]} first, it loses most by choosing later")
    elif order["reason"] == "planned":
        head = f"order: keep {planned}; it already puts first the model that loses most by choosing later"
    else:
        head = f"order: makes little difference here (the models lose about as much by choosing later); keep {planned}"
    densities = {fmt(per[m]["density"], ".4g") for m in order["planned"]}
    at = f" at density {next(iter(densities))}" if len(densities) == 1 else ""
    numbers = ", ".join(
        names[m] + ("" if at else f" (density {fmt(per[m]['density'], '.4g')})")
        + f" {_pct1(per[m]['first'])} / {_pct1(per[m]['last'])}"
        for m in order["suggested"]
    )
    return [head, f"  share of its task vector's norm each model keeps choosing first / last{at}: {numbers}"]


def _pct1(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(report: dict) -> str:
    """The short terminal summary."""
    s = report["summary"]
    names = report["short_names"]
    width = max([len("model")] + [len(names[m]) for m in report["models"]])
    lines = [
        (f"cabs analyze: {s['tensors']} tensors, {s['weights']:,} weights, "
         f"{len(report['models'])} models, seed {report['seed']}"),
        "",
        f"{'model':<{width}}  density  kept-norm  block CV cabs / ties / dare",
    ]
    for m in report["models"]:
        r = s["models"][m]
        cvs = " / ".join(fmt(r[rule]["block_cv"], ".3f") for rule in RULES)
        density, norm = fmt(r["cabs"]["density"]), fmt(r["cabs"]["norm_ratio"], ".3f")
        lines.append(f"{names[m]:<{width}}  {density}   {norm}      {cvs}")
    if s["pairs"]:
        pair_names = [f"{names[p['models'][0]]} & {names[p['models'][1]]}" for p in s["pairs"]]
        pw = max(len("pair"), *map(len, pair_names))
        lines += ["", f"{'pair':<{pw}}  overlap cabs    ties    dare"]
        for label, p in zip(pair_names, s["pairs"]):
            lines.append(f"{label:<{pw}}        " + "  ".join(fmt(p[rule]["overlap"]) for rule in RULES))
    lines += [
        "",
        "kept by 2+ models: " + "  ".join(f"{rule} {pct(s['shared'][rule]['share'])}" for rule in RULES),
        f"tensors where overlap is unavoidable (quotas > block): {s['unavoidable_overlap_tensors']}",
    ]
    advice = order_advice(report)
    if advice:
        lines += [""] + advice
    if report["skipped"]:
        lines.append(f"tensors not analysed: {len(report['skipped'])} (see report.md)")
    return "\n".join(lines)


def _md_models(report: dict) -> list[str]:
    s, names = report["summary"], report["short_names"]
    out = [
        "## Models", "",
        _balance_text(report), "",
        "| model | rule | density | kept-norm ratio | block CV | row CV | row density min / max | layer CV "
        "| layer density min / max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in report["models"]:
        for rule in RULES:
            r = s["models"][m][rule]
            out.append(
                f"| {names[m]} | {rule} | {fmt(r['density'])} | {fmt(r['norm_ratio'])} | {fmt(r['block_cv'])} | "
                f"{fmt(r['row_cv'])} | "
                f"{fmt(r['row_density_min'])} / {fmt(r['row_density_max'])} | {fmt(r['layer_cv'])} | "
                f"{fmt(r['layer_density_min'])} / {fmt(r['layer_density_max'])} |"
            )
    out += ["", "## Overlap", "", "| pair | cabs | ties | dare |", "|---|---|---|---|"]
    for p in s["pairs"]:
        a, b = p["models"]
        out.append(f"| {names[a]} & {names[b]} | " + " | ".join(fmt(p[rule]["overlap"]) for rule in RULES) + " |")
    shares = " | ".join(pct(s["shared"][rule]["share"]) for rule in RULES)
    return out + [f"| kept by 2+ models (share of weights) | {shares} |"]


def _balance_text(report: dict) -> str:
    """What balance CABS promises and how report.md measures it (block CV, row CV)."""
    return (f"Balance: CABS keeps n of every block of {block_size_text(report)} consecutive weights of the "
            "flattened tensor, the same n in every full block of a tensor (with balanced: true; the short last "
            "block is left out). **Block CV** measures that promise: the spread of each model's kept count per "
            "full block around its tensor's mean (std / mean, pooled over tensors), 0 where it is kept. "
            "**Row CV** is the spread of the kept share per row (dim 0): rows that are not a whole number of "
            "blocks hold parts of several blocks, so it can be above 0 for cabs too.")


def _md_order(report: dict) -> list[str]:
    order, names = report["summary"]["order"], report["short_names"]
    if order["reason"] == "single":
        return []
    out = [
        "## Order of `models:`", "",
        ("In cabs the first model picks its places in every block first; later ones pick among what is left. "
         "Share of each task vector's norm that cabs keeps (||kept tau|| / ||tau||) if the model chose first, "
         "in the planned order, and if it chose last (after the others in their planned order). "
         "The suggestion puts first the model that loses most by choosing later "
         "(with two models: the order with the larger sum of kept shares); "
         f"losses within {ORDER_TOLERANCE * 100:.0f} point of each other make no suggestion."),
        "",
        "| model | density | kept norm first | as planned | last | lost by choosing last |",
        "|---|---|---|---|---|---|",
    ]
    for m in order["planned"]:
        r = order["models"][m]
        out.append(f"| {names[m]} | {fmt(r['density'])} | {fmt(r['first'])} | {fmt(r['planned'])} | "
                   f"{fmt(r['last'])} | {fmt(r['loss'])} |")
    return out + [""] + [line.strip() + "  " for line in order_advice(report)] + [""]


def _md_layers(report: dict) -> list[str]:
    out = [
        "## Per layer", "",
        ("Block CV and row CV pool the blocks and the rows of every model's tensors in the layer "
         "(kept share per block or row; blocks around each tensor's mean)."), "",
        "| layer | weights | kept by 2+ cabs / ties / dare | pair overlap cabs / ties / dare "
        "| block CV cabs / ties / dare | row CV cabs / ties / dare |",
        "|---|---|---|---|---|---|",
    ]
    for layer, lt in report["layers"].items():
        out.append(
            f"| {layer} | {lt['numel']:,} | " + " / ".join(pct(lt["shared"][rule]) for rule in RULES)
            + " | " + " / ".join(fmt(lt["pair_overlap"][rule]) for rule in RULES)
            + " | " + " / ".join(fmt(lt["block_cv"][rule]) for rule in RULES)
            + " | " + " / ".join(fmt(lt["row_cv"][rule]) for rule in RULES) + " |"
        )
    out += ["", "## Unavoidable overlap", ""]
    if not report["unavoidable_overlap"]:
        return out + ["None: in every tensor the quotas fit in the blocks (or conflict_aware is false)."]
    out += [
        ("The quotas add up to more than the room, so some kept places cannot be free ones "
         "(the `overlap` rule decides what happens there)."),
        "", "| tensor | where | quotas | room | excess | places |", "|---|---|---|---|---|---|",
    ]
    for u in report["unavoidable_overlap"]:
        out.append(
            f"| `{u['tensor']}` | {u['where']} | {u['quotas']} | {u['room']} | {u['excess']} | {u['places']:,} |"
        )
    return out


def _md_tensors(report: dict, plots: Sequence[str]) -> list[str]:
    out = []
    if report["skipped"]:
        out += ["## Not analysed", ""] + [f"- `{x['tensor']}`: {x['reason']}" for x in report["skipped"]] + [""]
    out += [
        "## Per tensor", "",
        "| tensor | weights | kept by 2+ cabs / ties / dare | cabs kept-norm ratio per model |", "|---|---|---|---|",
    ]
    for t in report["tensors"]:
        ratios = ", ".join(fmt(t["rules"]["cabs"]["models"][m]["norm_ratio"], ".3f") for m in t["models"])
        out.append(
            f"| `{t['name']}` | {t['numel']:,} | "
            + " / ".join(pct(t["rules"][rule]["shared"]["share"]) for rule in RULES) + f" | {ratios} |"
        )
    out += ["", "## Plots", ""]
    return out + ([f"![{p}]({p})" for p in plots] if plots else [f"Not made: {PLOTS_HINT}."])


def render_markdown(report: dict, plots: Sequence[str] = ()) -> str:
    """report.md: the summary, per layer, unavoidable overlap and per tensor."""
    s = report["summary"]
    head = [
        "# CABS analysis" + (f" of `{report['config']}`" if report.get("config") else ""),
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
    ]
    parts = [_md_models(report), _md_order(report), _md_layers(report), _md_tensors(report, plots)]
    return "\n".join(head + parts[0] + [""] + parts[1] + parts[2] + [""] + parts[3]) + "\n"


def write_report(report: dict, out: Path) -> tuple[list[str], bool]:
    """Write report.json, report.md and the plots into `out` (see `publish`).
    Returns (file names written, whether the plots were made); AnalyzeError
    (one line) when they cannot be written: print `format_table` first."""
    made = []

    def build(staging: Path) -> list[str]:
        with contextlib.suppress(ImportError):  # no matplotlib: no plots
            made.extend(make_plots(report, staging))
        (staging / "report.md").write_text(render_markdown(report, made), encoding="utf-8")
        (staging / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        return made + ["report.md", "report.json"]

    try:
        return publish(out, REPORT_FILES, build), bool(made)
    except WriteError as error:
        raise AnalyzeError(f"analyze: {error}; the summary is printed above, the report files were not written") \
            from None
