"""`mergekit-cabs analyze`: every reported number against an independent computation.

The expected numbers are worked out here from the documented definitions
(the doc of the mergekit_cabs.analyze package, README) with plain Python: CABS masks
from the scalar SPEC reference (tests/reference.py), per-tensor quotas from
the test's own reading of the YAML (filters, gradients), a sort-based top-k
for the TIES-style rule, set arithmetic for overlaps, math.fsum for norms and
statistics.pstdev for spreads. Only the DARE-style draw repeats the documented
generator formula (a seeded torch.rand), since a random set cannot be
re-derived any other way.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import struct
import sys
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from mergekit_cabs.cli import main

from reference import ref_masks
from tiny_models import gradient_value, layer_t, make_tiny_llama, optional, quota_from_density

RULES = ("cabs", "ties", "dare")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- scenarios: a config and the test's own idea of each tensor's parameters ---


def _gradient_and_filter(base, tunes):
    """Two models, a density gradient over the layers and an `n` filter on mlp."""
    config = {
        "merge_method": "cabs",
        "base_model": str(base.path),
        "models": [
            {"model": str(tunes[0].path), "parameters": {"density": [0.25, 0.5]}},
            {"model": str(tunes[1].path), "parameters": {"n": [{"filter": "mlp", "value": 6}, {"value": 4}]}},
        ],
        "parameters": {"block_size": 16},
        "dtype": "float32",
    }

    def params(name, numel):
        density = gradient_value([0.25, 0.5], layer_t(name, 2))
        n2 = 6 if "mlp" in name else 4
        return {"quotas": [quota_from_density(density, 16), n2], "length": 16, "overlap": "fill",
                "conflict_aware": True}

    return config, params


def _over_subscribed(base, tunes):
    """Three models at 4 of every 8 (K * n = 12 > 8): overlap everywhere. Every
    row length of the tiny Llama (40, 72) is a multiple of 8."""
    config = {
        "merge_method": "cabs",
        "base_model": str(base.path),
        "models": [{"model": str(t.path), "parameters": {"n": 4, "weight": 0.5}} for t in tunes],
        "parameters": {"block_size": 8, "overlap": "fill"},
    }

    def params(name, numel):
        return {"quotas": [4, 4, 4], "length": 8, "overlap": "fill", "conflict_aware": True}

    return config, params


def _unbalanced_strict(base, tunes):
    """balanced: false with densities adding up to more than 1, overlap: strict."""
    config = {
        "merge_method": "cabs",
        "base_model": str(base.path),
        "models": [
            {"model": str(tunes[0].path), "parameters": {"density": 0.6}},
            {"model": str(tunes[1].path), "parameters": {"density": 0.5}},
        ],
        "parameters": {"balanced": False, "overlap": "strict"},
    }

    def params(name, numel):
        quotas = [math.floor(d * numel + 0.5) for d in (0.6, 0.5)]
        return {"quotas": quotas, "length": numel, "overlap": "strict", "conflict_aware": True,
                "block_size": 256}  # the default m: blocks are measured, though nothing is promised there

    return config, params


def _short_tails(base, tunes):
    """n = 5 and 11 of 16 fit in full blocks, but the 8-element tails round to
    3 + 6 > 8; on norm weights (40 = 2 blocks + 8) n = 9 + 9 overflow both."""
    config = {
        "merge_method": "cabs",
        "base_model": str(base.path),
        "models": [
            {"model": str(tunes[0].path), "parameters": {"n": [{"filter": "norm", "value": 9}, {"value": 5}]}},
            {"model": str(tunes[1].path), "parameters": {"n": [{"filter": "norm", "value": 9}, {"value": 11}]}},
        ],
        "parameters": {"block_size": 16},
    }

    def params(name, numel):
        quotas = [9, 9] if "norm" in name else [5, 11]
        return {"quotas": quotas, "length": 16, "overlap": "fill", "conflict_aware": True}

    return config, params


SCENARIOS = {
    "short_tails": ("fp32_family", _short_tails),
    "gradient_and_filter": ("fp32_family", _gradient_and_filter),
    "over_subscribed": ("bf16_family", _over_subscribed),
    "unbalanced_strict": ("fp32_family", _unbalanced_strict),
}


def _run(args):
    result = CliRunner().invoke(main, ["analyze", *map(str, args)])
    return result


def _write(config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def scenario(request, tmp_path_factory):
    family_name, make = SCENARIOS[request.param]
    base, tunes = request.getfixturevalue(family_name)
    config, params = make(base, tunes)
    tunes = tunes[: len(config["models"])]
    directory = tmp_path_factory.mktemp(request.param)
    config_path = _write(config, directory / "cabs.yml")
    out = directory / "report"
    result = _run([config_path, "--out", out, "--seed", 7, "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    expected = expected_report(base, tunes, params, seed=7)
    return {"name": request.param, "report": report, "expected": expected, "out": out, "result": result,
                "config_path": config_path, "base": base, "tunes": tunes}


# --- the independent computation ---------------------------------------------


def _layer(name):
    match = re.search(r"\.layers\.(\d+)\.", name)
    return match.group(1) if match else "other"


def _dare_keep(numel, k, seed, name, i):
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}#{i}".encode()))
    return (torch.rand(numel, generator=generator) < k / numel).tolist()


def _unavoidable(quotas, length, numel):
    """From SPEC: full blocks of `length` with the quotas, a short tail with
    floor(q * r / m + 0.5)."""
    full, tail = divmod(numel, length)
    entry = None
    if full and sum(quotas) > length:
        excess = sum(quotas) - length
        entry = {"quotas": quotas, "room": length, "excess": excess, "places": excess * full}
    if tail:
        tail_q = [math.floor(q * tail / length + 0.5) for q in quotas]
        if sum(tail_q) > tail:
            if entry is None:
                entry = {"quotas": tail_q, "room": tail, "excess": sum(tail_q) - tail, "places": sum(tail_q) - tail}
            else:
                entry["places"] += sum(tail_q) - tail
    return entry


def expected_tensor(name, base_t, model_ts, p, seed):
    numel = base_t.numel()
    b = base_t.to(torch.float64).reshape(-1).tolist()
    taus = [[x - y for x, y in zip(m.to(torch.float64).reshape(-1).tolist(), b)] for m in model_ts]
    cabs = [m.reshape(-1).tolist() for m in ref_masks(
        base_t, model_ts, p["quotas"], p["length"], overlap=p["overlap"], conflict_aware=p["conflict_aware"])]
    counts = [sum(m) for m in cabs]
    ties = []
    for tau, k in zip(taus, counts):
        top = set(sorted(range(numel), key=lambda q: (-abs(tau[q]), q))[:k])
        ties.append([q in top for q in range(numel)])
    dare = [_dare_keep(numel, k, seed, name, i) for i, k in enumerate(counts)]
    rows = base_t.shape[0] if base_t.dim() >= 2 else None
    block = p.get("block_size", p["length"])  # m as configured; the length cabs works on when balanced
    out = {"numel": numel, "layer": _layer(name), "tau_sq": [math.fsum(t * t for t in tau) for tau in taus],
           "unavoidable": None, "rules": {}, "block_size": block}
    if p["length"] == numel:  # balanced: false
        if sum(p["quotas"]) > numel:
            out["unavoidable"] = {"quotas": p["quotas"], "room": numel, "excess": sum(p["quotas"]) - numel,
                                  "places": sum(p["quotas"]) - numel}
    else:
        out["unavoidable"] = _unavoidable(p["quotas"], p["length"], numel)
    out["position_sq"] = _expected_positions(base_t, model_ts, p, taus)
    for rule, masks in (("cabs", cabs), ("ties", ties), ("dare", dare)):
        kept = [{q for q in range(numel) if m[q]} for m in masks]
        changed = [{q for q in s if tau[q] != 0} for s, tau in zip(kept, taus)]
        holders = Counter(q for s in changed for q in s)
        row_counts = None
        if rows:
            length = numel // rows
            row_counts = [[sum(m[r * length:(r + 1) * length]) for r in range(rows)] for m in masks]
        full = numel // block  # whole blocks of m only: the short last one is left out
        block_counts = [[sum(m[b * block:(b + 1) * block]) for b in range(full)] for m in masks] if full else None
        out["rules"][rule] = {
            "kept": [len(s) for s in kept],
            "kept_changed": [len(s) for s in changed],
            "kept_sq": [math.fsum(tau[q] ** 2 for q in s) for s, tau in zip(kept, taus)],
            "rows": row_counts,
            "row_length": numel // rows if rows else None,
            "blocks": block_counts,
            "pairs": {(i, j): (len(changed[i] & changed[j]), len(changed[i] | changed[j]))
                      for i in range(len(masks)) for j in range(i + 1, len(masks))},
            "shared": sum(1 for c in holders.values() if c >= 2),
        }
    return out


def _expected_positions(base_t, model_ts, p, taus):
    """Kept squares of each model choosing first (alone among all places) and last
    (the others before it in their planned order), from the SPEC reference."""
    def kept_sq(mask, tau):
        return math.fsum(t * t for t, k in zip(tau, mask.reshape(-1).tolist()) if k)

    alone = ref_masks(base_t, model_ts, p["quotas"], p["length"], overlap=p["overlap"], conflict_aware=False)
    last = []
    for i in range(len(model_ts)):
        order = [j for j in range(len(model_ts)) if j != i] + [i]
        masks = ref_masks(base_t, [model_ts[j] for j in order], [p["quotas"][j] for j in order], p["length"],
                          overlap=p["overlap"], conflict_aware=p["conflict_aware"])
        last.append(kept_sq(masks[-1], taus[i]))
    return {"first": [kept_sq(m, tau) for m, tau in zip(alone, taus)], "last": last}


def expected_report(base, tunes, params, seed):
    tensors = {}
    for name in sorted(base.state):
        base_t = base.state[name]
        tensors[name] = expected_tensor(name, base_t, [t.state[name] for t in tunes],
                                        params(name, base_t.numel()), seed)
    return tensors


def _cv(values):
    mean = statistics.fmean(values)
    return statistics.pstdev(values) / mean if mean else None


def _within_cv(parts):
    """Spread of the values around the mean of their own part (a tensor's blocks),
    pooled over parts, over the mean of all values; None without values."""
    values = [v for part in parts for v in part]
    if not values or not statistics.fmean(values):
        return None
    squares = math.fsum(statistics.pvariance(part) * len(part) for part in parts)
    return math.sqrt(squares / len(values)) / statistics.fmean(values)


def approx(x):
    return pytest.approx(x, rel=1e-9, abs=1e-12)


# --- the numbers ---------------------------------------------------------------


def test_every_tensor_is_analysed(scenario):
    report, base = scenario["report"], scenario["base"]
    assert {t["name"] for t in report["tensors"]} == set(base.state)
    assert report["skipped"] == []
    assert report["models"] == [str(t.path) for t in scenario["tunes"]]
    assert report["summary"]["tensors"] == len(base.state)
    assert report["summary"]["weights"] == sum(t.numel() for t in base.state.values())


def test_per_tensor_numbers(scenario):
    report, expected = scenario["report"], scenario["expected"]
    labels = report["models"]
    for t in report["tensors"]:
        want = expected[t["name"]]
        assert t["numel"] == want["numel"] and t["layer"] == want["layer"], t["name"]
        assert t["block_size"] == want["block_size"], t["name"]
        assert t["tau_sq_sum"] == {m: approx(x) for m, x in zip(labels, want["tau_sq"])}
        got_u = t["unavoidable_overlap"]
        assert (got_u is None) == (want["unavoidable"] is None), t["name"]
        if got_u:
            assert {k: got_u[k] for k in ("quotas", "room", "excess", "places")} == want["unavoidable"], t["name"]
        for rule in RULES:
            got, w = t["rules"][rule], want["rules"][rule]
            for i, m in enumerate(labels):
                g = got["models"][m]
                assert g["kept"] == w["kept"][i], (t["name"], rule, m)
                assert g["kept_changed"] == w["kept_changed"][i], (t["name"], rule, m)
                assert g["density"] == approx(w["kept"][i] / want["numel"])
                assert g["norm_ratio"] == approx(math.sqrt(w["kept_sq"][i] / want["tau_sq"][i]))
                if w["rows"] is None:
                    assert g["rows"] is None
                else:
                    counts = w["rows"][i]
                    assert g["rows"] == {"rows": len(counts), "cv": approx(_cv(counts)),
                                         "min": min(counts), "max": max(counts)}, (t["name"], rule, m)
                if w["blocks"] is None:
                    assert g["blocks"] is None, (t["name"], rule, m)
                else:
                    counts = w["blocks"][i]
                    assert g["blocks"] == {"blocks": len(counts), "cv": approx(_cv(counts)),
                                           "min": min(counts), "max": max(counts)}, (t["name"], rule, m)
            pairs = {(labels.index(p["models"][0]), labels.index(p["models"][1])): p for p in got["pairs"]}
            assert set(pairs) == set(w["pairs"])
            for key, (inter, union) in w["pairs"].items():
                assert pairs[key]["intersection"] == inter and pairs[key]["union"] == union
                assert pairs[key]["overlap"] == (approx(inter / union) if union else None)
            assert got["shared"]["places"] == w["shared"]
            assert got["shared"]["share"] == approx(w["shared"] / want["numel"])


def test_overall_and_per_layer_numbers(scenario):
    report, expected = scenario["report"], scenario["expected"]
    labels, s = report["models"], report["summary"]
    total = sum(w["numel"] for w in expected.values())
    layers = sorted({w["layer"] for w in expected.values()},
                    key=lambda x: (x == "other", int(x) if x != "other" else 0))
    assert list(report["layers"]) == layers
    for rule in RULES:
        shared = sum(w["rules"][rule]["shared"] for w in expected.values())
        assert s["shared"][rule] == {"places": shared, "share": approx(shared / total)}
        for pair in s["pairs"]:
            i, j = (labels.index(m) for m in pair["models"])
            inter = sum(w["rules"][rule]["pairs"][(i, j)][0] for w in expected.values())
            union = sum(w["rules"][rule]["pairs"][(i, j)][1] for w in expected.values())
            assert pair[rule] == {"intersection": inter, "union": union, "overlap": approx(inter / union)}
        for i, m in enumerate(labels):
            got = s["models"][m][rule]
            kept = sum(w["rules"][rule]["kept"][i] for w in expected.values())
            assert got["kept"] == kept and got["numel"] == total
            assert got["density"] == approx(kept / total)
            assert got["kept_changed"] == sum(w["rules"][rule]["kept_changed"][i] for w in expected.values())
            assert got["norm_ratio"] == approx(math.sqrt(
                math.fsum(w["rules"][rule]["kept_sq"][i] for w in expected.values())
                / math.fsum(w["tau_sq"][i] for w in expected.values())))
            row_density = [c / w["rules"][rule]["row_length"] for w in expected.values()
                           if w["rules"][rule]["rows"] for c in w["rules"][rule]["rows"][i]]
            assert got["rows"] == len(row_density)
            assert got["row_cv"] == approx(_cv(row_density))
            assert got["row_density_min"] == approx(min(row_density))
            assert got["row_density_max"] == approx(max(row_density))
            blocks = [[c / w["block_size"] for c in w["rules"][rule]["blocks"][i]] for w in expected.values()
                      if w["rules"][rule]["blocks"]]
            assert got["blocks"] == sum(map(len, blocks))
            assert got["block_cv"] == approx(_within_cv(blocks))
            per_layer = []
            for layer in layers:
                in_layer = [w for w in expected.values() if w["layer"] == layer]
                density = sum(w["rules"][rule]["kept"][i] for w in in_layer) / sum(w["numel"] for w in in_layer)
                assert report["layers"][layer]["density"][m][rule] == approx(density)
                if layer != "other":
                    per_layer.append(density)
            assert got["layer_cv"] == approx(_cv(per_layer))
            assert got["layer_density_min"] == approx(min(per_layer))
            assert got["layer_density_max"] == approx(max(per_layer))
        for layer in layers:
            in_layer = [w for w in expected.values() if w["layer"] == layer]
            numel = sum(w["numel"] for w in in_layer)
            got = report["layers"][layer]
            assert got["numel"] == numel
            assert got["shared"][rule] == approx(sum(w["rules"][rule]["shared"] for w in in_layer) / numel)
            inter = sum(x[0] for w in in_layer for x in w["rules"][rule]["pairs"].values())
            union = sum(x[1] for w in in_layer for x in w["rules"][rule]["pairs"].values())
            assert got["pair_overlap"][rule] == approx(inter / union)
            rows = [c / w["rules"][rule]["row_length"] for w in in_layer if w["rules"][rule]["rows"]
                    for counts in w["rules"][rule]["rows"] for c in counts]
            assert got["row_cv"][rule] == approx(_cv(rows))
            blocks = [[c / w["block_size"] for c in counts] for w in in_layer if w["rules"][rule]["blocks"]
                      for counts in w["rules"][rule]["blocks"]]
            assert got["block_cv"][rule] == approx(_within_cv(blocks))
    unavoidable = sorted(name for name, w in expected.items() if w["unavoidable"])
    assert sorted(u["tensor"] for u in report["unavoidable_overlap"]) == unavoidable
    assert s["unavoidable_overlap_tensors"] == len(unavoidable)


def test_what_each_scenario_shows(scenario):
    """The contrasts the command exists to show, on these configurations."""
    report, expected = scenario["report"], scenario["expected"]
    s = report["summary"]
    if scenario["name"] == "gradient_and_filter":
        # quotas fit in every block: cabs' supports are disjoint, the others' are not
        assert report["unavoidable_overlap"] == []
        assert s["shared"]["cabs"]["places"] == 0
        assert s["shared"]["ties"]["places"] > 0 and s["shared"]["dare"]["places"] > 0
        # the gradient reaches layer 1: model 1 keeps more there than in layer 0
        first = report["models"][0]
        assert report["layers"]["1"]["density"][first]["cabs"] > report["layers"]["0"]["density"][first]["cabs"]
    if scenario["name"] == "over_subscribed":
        assert len(report["unavoidable_overlap"]) == len(expected)
        assert {(u["excess"], u["room"]) for u in report["unavoidable_overlap"] if u["where"] == "blocks"} == {(4, 8)}
        for m in report["models"]:  # rows are whole blocks: n:m gives every row the same share
            assert s["models"][m]["cabs"]["row_cv"] == 0
            assert s["models"][m]["ties"]["row_cv"] > 0
    if scenario["name"] in ("gradient_and_filter", "short_tails", "over_subscribed"):
        # the balance cabs promises: its quota n in every full block of m (fill meets every quota)
        for t in report["tensors"]:
            for i, m in enumerate(t["models"]):
                blocks = t["rules"]["cabs"]["models"][m]["blocks"]
                assert blocks is None or blocks["min"] == blocks["max"] == t["quotas"][i], (t["name"], m)
        for m in report["models"]:
            assert s["models"][m]["cabs"]["block_cv"] == 0
            assert s["models"][m]["ties"]["block_cv"] > 0 and s["models"][m]["dare"]["block_cv"] > 0
            assert all(layer["block_cv"]["cabs"] == 0 for layer in report["layers"].values())
    if scenario["name"] == "gradient_and_filter":
        # rows of 40 and 72 are not whole blocks of 16: kept counts per row vary under cabs too,
        # across a density gradient, while every block holds its tensor's n (above)
        assert all(s["models"][m]["cabs"]["row_cv"] > 0 for m in report["models"])
    if scenario["name"] == "unbalanced_strict":  # balanced: false promises nothing per block
        assert all(s["models"][m]["cabs"]["block_cv"] > 0 for m in report["models"])
    if scenario["name"] == "short_tails":
        where = {u["tensor"]: (u["where"], u["excess"], u["places"]) for u in report["unavoidable_overlap"]}
        assert where["model.norm.weight"] == ("blocks", 2, 2 * 2 + 2)
        assert where["model.embed_tokens.weight"] == ("last block", 1, 1)
        assert "model.layers.0.mlp.up_proj.weight" not in where
    if scenario["name"] == "unbalanced_strict":
        assert {u["where"] for u in report["unavoidable_overlap"]} == {"tensor"}
        # strict: the second model gets only what the first left free
        assert s["shared"]["cabs"]["places"] == 0


def test_terminal_table_and_markdown(scenario):
    report, output = scenario["report"], scenario["result"].output
    md = (scenario["out"] / "report.md").read_text()
    s, names = report["summary"], report["short_names"]
    assert f"{s['tensors']} tensors, {s['weights']:,} weights" in output
    for m in report["models"]:
        line = next(x for x in output.splitlines() if x.startswith(names[m] + " "))
        r = s["models"][m]
        assert f"{r['cabs']['density']:.4f}" in line and f"{r['cabs']['norm_ratio']:.3f}" in line
        assert " / ".join(f"{r[rule]['block_cv']:.3f}" for rule in RULES) in line
        assert f"| {names[m]} | cabs | {r['cabs']['density']:.4f} | {r['cabs']['norm_ratio']:.4f} |" in md
    for p in s["pairs"]:
        a, b = (names[m] for m in p["models"])
        cells = "  ".join(f"{p[rule]['overlap']:.4f}" for rule in RULES)
        assert any(x.startswith(f"{a} & {b}") and x.endswith(cells) for x in output.splitlines())
        assert f"| {a} & {b} | " + " | ".join(f"{p[rule]['overlap']:.4f}" for rule in RULES) + " |" in md
    assert f"(quotas > block): {s['unavoidable_overlap_tensors']}" in output
    for t in report["tensors"]:
        assert f"| `{t['name']}` | {t['numel']:,} |" in md
    for u in report["unavoidable_overlap"]:
        assert f"| `{u['tensor']}` | {u['where']} | {u['quotas']} | {u['room']} | {u['excess']} |" in md
    if not report["unavoidable_overlap"]:
        assert "## Unavoidable overlap\n\nNone" in md


def test_report_json_schema(scenario):
    report = scenario["report"]
    assert set(report) == {"format", "config", "base_model", "models", "short_names", "rules", "seed",
                           "summary", "layers", "unavoidable_overlap", "skipped", "tensors"}
    assert report["config"] == str(scenario["config_path"])
    assert report["rules"] == list(RULES) and report["seed"] == 7
    assert report["base_model"] == str(scenario["base"].path)
    tensor = report["tensors"][0]
    assert set(tensor) == {"name", "shape", "numel", "layer", "models", "quotas", "block_length",
                           "row_length", "block_size", "tau_sq_sum", "unavoidable_overlap", "rules", "order"}
    assert set(tensor["order"][report["models"][0]]) == {"first_kept_sq_sum", "first_norm_ratio",
                                                         "last_kept_sq_sum", "last_norm_ratio"}
    order = report["summary"]["order"]
    assert set(order) == {"planned", "suggested", "reason", "models"}
    assert set(order["models"][report["models"][0]]) == {"density", "first", "planned", "last", "loss"}
    assert set(tensor["rules"]) == set(RULES)
    assert set(tensor["rules"]["cabs"]) == {"models", "pairs", "shared"}
    model = next(iter(report["summary"]["models"].values()))
    assert set(model) == set(RULES)
    assert set(model["cabs"]) == {"numel", "kept", "kept_changed", "density", "norm_ratio", "row_cv",
                                  "row_density_min", "row_density_max", "rows", "block_cv", "blocks", "layer_cv",
                                  "layer_density_min", "layer_density_max"}


# --- order of models: what each keeps choosing first and last, and the suggestion ---


def test_order_numbers_per_tensor_and_overall(scenario):
    """First = the model alone among all places; last = after the others in their
    planned order (SPEC reference); overall from summed squares; the suggestion by
    the documented rule, recomputed here."""
    report, expected = scenario["report"], scenario["expected"]
    labels, order = report["models"], report["summary"]["order"]
    for t in report["tensors"]:
        want = expected[t["name"]]
        for i, m in enumerate(labels):
            for where in ("first", "last"):
                assert t["order"][m][f"{where}_kept_sq_sum"] == approx(want["position_sq"][where][i]), (t["name"], m)
    first_name, last_name = labels[0], labels[-1]
    for i, m in enumerate(labels):
        tau = math.fsum(w["tau_sq"][i] for w in expected.values())
        got = order["models"][m]
        first = math.sqrt(math.fsum(w["position_sq"]["first"][i] for w in expected.values()) / tau)
        last = math.sqrt(math.fsum(w["position_sq"]["last"][i] for w in expected.values()) / tau)
        assert got["first"] == approx(first) and got["last"] == approx(last)
        assert got["loss"] == approx(first - last)
        assert got["planned"] == report["summary"]["models"][m]["cabs"]["norm_ratio"]
        assert got["density"] == report["summary"]["models"][m]["cabs"]["density"]
    # the model planned first chose first; the one planned last chose last
    assert order["models"][first_name]["planned"] == approx(order["models"][first_name]["first"])
    assert order["models"][last_name]["planned"] == approx(order["models"][last_name]["last"])
    losses = [order["models"][m]["loss"] for m in labels]
    if max(losses) - min(losses) < 0.01:
        assert (order["suggested"], order["reason"]) == (labels, "flat")
    else:
        want = [labels[i] for i in sorted(range(len(labels)), key=lambda i: (-losses[i], i))]
        assert order["suggested"] == want
        assert order["reason"] == ("planned" if want == labels else "reorder")


def test_order_advice_in_terminal_and_markdown(scenario):
    from mergekit_cabs.analyze import order_advice

    report, output = scenario["report"], scenario["result"].output
    md = (scenario["out"] / "report.md").read_text()
    advice = order_advice(report)
    assert len(advice) == 2
    assert "\n".join(advice) in output
    assert "## Order of `models:`" in md and advice[0] in md
    names = report["short_names"]
    for m in report["models"]:
        r = report["summary"]["order"]["models"][m]
        assert f"| {names[m]} | {r['density']:.4f} | {r['first']:.4f} | {r['planned']:.4f} | {r['last']:.4f} |" in md
        density = "" if "at density" in advice[1] else rf" \(density {r['density']:.4g}\)"
        assert re.search(rf"{re.escape(names[m])}{density} {100 * r['first']:.1f}% / {100 * r['last']:.1f}%",
                         advice[1]), advice[1]


def _one_tensor_report(models, labels, conflict_aware=True):
    """build_report on one 8 x 32 tensor (base 0), 4 of every 16 kept per model."""
    from mergekit_cabs.analyze import build_report, measure_tensor
    from mergekit_cabs.params import Resolved

    resolved = Resolved(weights=(1.0,) * len(models), n=(4,) * len(models), density=(None,) * len(models),
                        block_size=16, overlap="fill", conflict_aware=conflict_aware, balanced=True, lam=1.0)
    record = measure_tensor("model.layers.0.mlp.up_proj.weight", torch.zeros(8, 32), models, labels, resolved)
    return build_report([record], [], base_model="base", seed=0, config="merge.yml")


def _spread_and_concentrated():
    """spread: |tau| = 0.5 everywhere, so (ties to the lower index) it keeps places 0-3
    of every block of 16; concentrated: 2.0 on exactly those places, 0.125 elsewhere
    (all exact in float32)."""
    spread = torch.full((8, 32), 0.5)
    concentrated = torch.full((8, 32), 0.125)
    concentrated.view(-1, 16)[:, :4] = 2.0
    return spread, concentrated


def test_order_suggests_the_concentrated_model_first():
    """Going last, the concentrated model finds its four big places taken and keeps
    four small ones; the spread one keeps half its norm (sqrt(4/16)) wherever it goes."""
    from mergekit_cabs.analyze import format_table, order_advice

    spread, concentrated = _spread_and_concentrated()
    total = 4 * 2.0**2 + 12 * 0.125**2
    first, last = math.sqrt(4 * 2.0**2 / total), math.sqrt(4 * 0.125**2 / total)  # 0.9942, 0.0621
    report = _one_tensor_report([spread, concentrated], ["org/spread", "org/concentrated"])
    order = report["summary"]["order"]
    assert order["models"]["org/concentrated"] == {"density": 0.25, "first": approx(first), "planned": approx(last),
                                                   "last": approx(last), "loss": approx(first - last)}
    assert order["models"]["org/spread"] == {"density": 0.25, "first": approx(0.5), "planned": approx(0.5),
                                             "last": approx(0.5), "loss": approx(0.0)}
    assert (order["suggested"], order["reason"]) == (["org/concentrated", "org/spread"], "reorder")
    assert order_advice(report) == [
        "suggested order: concentrated, spread (planned: spread, concentrated): "
        "put concentrated first, it loses most by choosing later",
        "  share of its task vector's norm each model keeps choosing first / last at density 0.25: "
        "concentrated 99.4% / 6.2%, spread 50.0% / 50.0%",
    ]
    assert "\n".join(order_advice(report)) in format_table(report)
    # planned that way already: said so, same numbers
    report = _one_tensor_report([concentrated, spread], ["org/concentrated", "org/spread"])
    order = report["summary"]["order"]
    assert (order["suggested"], order["reason"]) == (["org/concentrated", "org/spread"], "planned")
    assert order["models"]["org/concentrated"]["planned"] == approx(first)
    assert order_advice(report)[0] == ("order: keep concentrated, spread; it already puts first the model "
                                       "that loses most by choosing later")


def test_order_makes_no_suggestion_when_it_changes_nothing():
    from mergekit_cabs.analyze import order_advice

    spread, concentrated = _spread_and_concentrated()
    for report in (
        _one_tensor_report([spread, -spread], ["a", "b"]),  # alike: both lose nothing
        _one_tensor_report([spread, concentrated], ["a", "b"], conflict_aware=False),  # nobody claims places
    ):
        order = report["summary"]["order"]
        assert (order["suggested"], order["reason"]) == (["a", "b"], "flat")
        assert order_advice(report)[0].startswith("order: makes little difference here")
    single = _one_tensor_report([concentrated], ["a"])
    assert single["summary"]["order"]["reason"] == "single" and order_advice(single) == []


# --- plots ----------------------------------------------------------------------


def _png_size(data: bytes):
    """Width and height from the IHDR chunk, after checking the signature and its CRC."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16:16 + length]
    (crc,) = struct.unpack(">I", data[16 + length:20 + length])
    assert crc == zlib.crc32(kind + body)
    assert data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", body[:8])


def test_plots_are_valid_png(scenario):
    optional("matplotlib", '".[plot]"')
    for name in ("overlap-by-layer.png", "kept-by-layer.png"):
        data = (scenario["out"] / name).read_bytes()
        width, height = _png_size(data)
        assert width >= 300 and height >= 200
        from PIL import Image  # a matplotlib dependency

        with Image.open(scenario["out"] / name) as image:
            image.verify()
    assert "![overlap-by-layer.png](overlap-by-layer.png)" in (scenario["out"] / "report.md").read_text()


def _suptitle(fig) -> str:
    return fig.get_suptitle() if hasattr(fig, "get_suptitle") else fig._suptitle.get_text()  # matplotlib < 3.8


@pytest.fixture
def figures(scenario):
    optional("matplotlib", '".[plot]"')
    import matplotlib.pyplot as plt

    from mergekit_cabs.analyze import layer_figures

    made = layer_figures(scenario["report"])
    yield made
    for fig in made.values():
        plt.close(fig)


def test_plots_name_the_config_and_say_what_the_rules_are(scenario, figures):
    """Title names the YAML; the legend says ties/dare are keeps at the same budget,
    not merges; axis labels are plain words (no bare 'CV')."""
    assert set(figures) == {"overlap-by-layer.png", "kept-by-layer.png"}
    for fig in figures.values():
        assert _suptitle(fig).startswith(f"{scenario['config_path'].name}: ")
        legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
        assert "ties-style keep (magnitude top-k, not a merge)" in legend
        assert "dare-style keep at the same budget (not a merge)" in legend
        assert "cabs (the masks the merge will use)" in legend
        note = " ".join(t.get_text() for t in fig.texts)
        assert "Lines may lie on each other" in note and "(embeddings, final norm, output head)" in note
        for ax in fig.axes:
            assert ax.get_xlabel() == "layer" and ax.get_ylabel() and "CV" not in ax.get_ylabel()
    kept = figures["kept-by-layer.png"]
    assert kept.axes[1].get_ylabel() == "kept count per block of m weights:\nspread across blocks (std / mean)"
    sizes = sorted({t["block_size"] for t in scenario["report"]["tensors"]})
    m = f"m = {sizes[0]}" if len(sizes) == 1 else f"m = block_size ({', '.join(map(str, sizes))})"
    assert kept.axes[1].get_title().startswith(f"how evenly blocks of {m} keep weights")
    assert "CABS keeps n of every block of m consecutive weights" in " ".join(t.get_text() for t in kept.texts)
    names = scenario["report"]["short_names"]
    assert [t.get_text() for t in kept.legends[0].get_texts()] == [names[m] for m in scenario["report"]["models"]]


def test_plots_keep_other_apart_and_lines_distinguishable(scenario, figures):
    """'other' (embeddings, norms, head) is a lone marker right of a gap, not on the
    line; each series has its own marker and sideways shift."""
    layers = list(scenario["report"]["layers"])
    numbered = len(layers) - 1
    assert layers[-1] == "other"
    for fig in figures.values():
        for ax in fig.axes:
            ticks = [t.get_text() for t in ax.get_xticklabels()]
            assert ticks[-1] == "other:\nembeddings,\nnorms, head" and ticks[:-1] == layers[:-1]
            x_other = ax.get_xticks()[-1]
            assert x_other >= numbered + 0.5
            series = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
            lone = [line for line in ax.get_lines() if line.get_linestyle() == "None"]
            assert len(series) == len(lone) >= 2
            for line, point in zip(series, lone):
                assert len(line.get_xdata()) == numbered and max(line.get_xdata()) < numbered
                assert point.get_xdata()[0] == pytest.approx(x_other, abs=0.5)
                assert point.get_marker() == line.get_marker() and point.get_color() == line.get_color()
            assert len({line.get_marker() for line in series}) == len(series)
            assert len({round(float(line.get_xdata()[0]), 6) for line in series}) == len(series)


def test_without_matplotlib_says_how_to_get_plots(fp32_family, tmp_path, monkeypatch):
    base, tunes = fp32_family
    config, _ = _gradient_and_filter(base, tunes)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = _run([_write(config, tmp_path / "c.yml"), "--out", tmp_path / "r", "--quiet"])
    assert result.exit_code == 0, result.output
    assert 'No plots: pip install ".[plot]" in a clone of mergekit-cabs ("mergekit-cabs[plot]" once on PyPI) ' \
        'gets the plots' in result.output
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["report.json", "report.md"]
    assert 'pip install ".[plot]" in a clone' in (tmp_path / "r" / "report.md").read_text()


# --- determinism, reading, output directory -----------------------------------------


def test_same_seed_same_report_other_seed_other_dare(fp32_family, tmp_path):
    path = _write(_gradient_and_filter(*fp32_family)[0], tmp_path / "c.yml")
    for out, seed in (("a", 7), ("b", 7), ("c", 8)):
        assert _run([path, "--out", tmp_path / out, "--seed", seed, "--quiet"]).exit_code == 0
    assert (tmp_path / "a" / "report.json").read_bytes() == (tmp_path / "b" / "report.json").read_bytes()
    first, second = (json.loads((tmp_path / x / "report.json").read_text()) for x in ("a", "c"))
    for a, b in zip(first["tensors"], second["tensors"]):
        assert a["rules"]["cabs"] == b["rules"]["cabs"] and a["rules"]["ties"] == b["rules"]["ties"]
    assert any(a["rules"]["dare"] != b["rules"]["dare"] for a, b in zip(first["tensors"], second["tensors"]))


def test_reads_one_tensor_at_a_time(fp32_family, tmp_path, monkeypatch):
    """While a tensor is measured, only its own inputs (base + models) are alive."""
    import weakref

    from mergekit.io.tasks import LoadTensor

    from mergekit_cabs.analyze import run as analyze_run

    loaded = []
    original_execute, original_measure = LoadTensor.execute, analyze_run.measure_tensor

    def execute(self):
        tensor = original_execute(self)
        loaded.append(weakref.ref(tensor))
        return tensor

    alive = []

    def measure(name, base, models, *args, **kwargs):
        alive.append(sum(ref() is not None for ref in loaded))
        return original_measure(name, base, models, *args, **kwargs)

    monkeypatch.setattr(LoadTensor, "execute", execute)
    monkeypatch.setattr(analyze_run, "measure_tensor", measure)
    base, tunes = fp32_family
    config, _ = _gradient_and_filter(base, tunes)
    result = _run([_write(config, tmp_path / "c.yml"), "--out", tmp_path / "r", "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(alive) == len(base.state) and len(loaded) == 3 * len(base.state)
    assert max(alive) <= 3


def test_refuses_a_used_out_dir_unless_forced(fp32_family, tmp_path):
    base, tunes = fp32_family
    config, _ = _gradient_and_filter(base, tunes)
    path = _write(config, tmp_path / "c.yml")
    out = tmp_path / "r"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "report.md").write_text("old")
    refused = _run([path, "--out", out, "--quiet"])
    assert refused.exit_code != 0 and "--force" in refused.output
    assert (out / "report.md").read_text() == "old"
    forced = _run([path, "--out", out, "--quiet", "--force"])
    assert forced.exit_code == 0, forced.output
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "report.md").read_text().startswith("# CABS analysis")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_a_full_disk_prints_the_summary_then_one_line_and_exits_1(fp32_family, tmp_path, monkeypatch):
    """The staged write of report.md fails with ENOSPC (in-process, deterministic):
    the summary is printed first, then one line naming --out and the reason;
    exit 1, no traceback, no report file and no staging directory left."""
    import errno

    from mergekit_cabs._output import STAGING

    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.parent.name.startswith(STAGING):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    base, tunes = fp32_family
    config, _ = _gradient_and_filter(base, tunes)
    path = _write(config, tmp_path / "c.yml")
    monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "r"
    result = _run([path, "--out", out, "--quiet"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert lines[0].startswith("cabs analyze: ") and "kept by 2+ models: cabs" in result.output, result.output
    assert lines[-1] == (f"Error: analyze: could not write {out}: No space left on device; the summary is printed "
                         "above, the report files were not written"), result.output
    assert "Traceback" not in result.output and "Wrote" not in result.output
    assert not out.exists() and not [p for p in tmp_path.rglob(".*")]  # no staging folder anywhere


# --- errors: clear, before any work, nothing written ---------------------------------


def _bad_configs(base, tunes, tmp_path):
    good, _ = _gradient_and_filter(base, tunes)

    def edit(**changes):
        return dict(good, **changes)

    missing = str(tmp_path / "no-such-model")
    return {
        "not cabs": (edit(merge_method="ties"), "merge_method: 'ties'; analyze reads cabs configurations"),
        "n above block_size": (
            edit(models=[good["models"][0], {"model": str(tunes[1].path), "parameters": {"n": 17}}]),
            f"'n' for model '{tunes[1].path}' on tensor",
        ),
        "unknown parameter": (
            edit(models=[good["models"][0], {"model": str(tunes[1].path), "parameters": {"densty": 0.5}}]),
            f"unknown parameter 'densty' for model '{tunes[1].path}'",
        ),
        "density and n": (edit(parameters={"block_size": 16, "n": 4}), "both 'n' (4) and 'density'"),
        "no base model": ({k: v for k, v in good.items() if k != "base_model"}, "has no base_model"),
        "missing model": (
            edit(models=[good["models"][0], {"model": missing, "parameters": {"n": 4}}]),
            f"model '{missing}' not found: there is no directory {missing}",
        ),
        "no models": (edit(models=None), "is not a valid mergekit configuration"),
    }


@pytest.mark.parametrize("case", ["not cabs", "n above block_size", "unknown parameter", "density and n",
                                  "no base model", "missing model", "no models"])
def test_bad_config_is_a_clear_error_and_writes_nothing(case, fp32_family, tmp_path, monkeypatch):
    from mergekit.io.tasks import LoadTensor

    def no_reading(self):
        raise AssertionError(f"read tensor {self.tensor} before refusing the config")

    monkeypatch.setattr(LoadTensor, "execute", no_reading)
    base, tunes = fp32_family
    config, message = _bad_configs(base, tunes, tmp_path)[case]
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = _run([path, "--out", tmp_path / "r", "--quiet"])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and message in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("text, message", [
    ("merge_method: cabs\nmodels: [\n", "cannot read"),
    ("- just\n- a list\n", "is not a mergekit configuration"),
])
def test_unreadable_yaml(text, message, tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(text)
    result = _run([path, "--out", tmp_path / "r"])
    assert result.exit_code == 1 and message in result.output and str(path) in result.output
    assert not (tmp_path / "r").exists()


def test_missing_config_file(tmp_path):
    result = _run([tmp_path / "nope.yml"])
    assert result.exit_code == 2 and "nope.yml" in result.output and "does not exist" in result.output


def test_nan_in_a_model_names_it_and_leaves_no_report(fp32_family, tmp_path):
    base, tunes = fp32_family
    bad = make_tiny_llama(tmp_path / "bad", seed=9, base=base, scale=1, tokenizer=False)
    state = dict(bad.state)
    name = "model.layers.1.mlp.up_proj.weight"
    state[name] = state[name].clone()
    state[name][3, 5] = float("nan")
    save_file(state, str(bad.path / "model.safetensors"), metadata={"format": "pt"})
    config, _ = _gradient_and_filter(base, [tunes[0], bad])
    result = _run([_write(config, tmp_path / "c.yml"), "--out", tmp_path / "r", "--quiet"])
    assert result.exit_code == 1
    assert f"model '{bad.path}' has NaN or infinite values in tensor '{name}'" in result.output
    assert not (tmp_path / "r").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


PROBE = """
import sys
from mergekit_cabs._output import out_lock
from mergekit_cabs.params import CabsError
try:
    with out_lock(sys.argv[1]):
        print("got it")
except CabsError as error:
    print(error)
"""


def test_analyze_holds_its_out_for_the_whole_run_against_a_second_process(fp32_family, tmp_path, monkeypatch):
    """A real analyze process refuses at start, in one line naming the other
    process's pid, while that process holds --out, and writes nothing; and
    analyze holds --out while it reads the models: a real second process
    trying to take it meanwhile is refused, naming analyze's pid."""
    import os
    import subprocess

    from test_tune_honest import REPO, _holder

    from mergekit_cabs import analyze as an
    from mergekit_cabs._output import LOCK_NAME

    path = _write(_gradient_and_filter(*fp32_family)[0], tmp_path / "c.yml")
    out = tmp_path / "r"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    in_use = "--out {} is in use by another run (pid {}); wait for it to end or give another --out"
    holder = _holder(out)
    try:
        refused = subprocess.run([sys.executable, "-m", "mergekit_cabs.cli", "analyze", str(path), "--out", str(out),
                                  "--quiet"], capture_output=True, text=True, env=env)
        assert refused.returncode == 1 and refused.stdout == ""
        assert refused.stderr.strip().splitlines() == ["Error: " + in_use.format(out, holder.pid)]
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # the holder's: nothing of analyze's
    finally:
        holder.kill()
        holder.wait()
    seen, real = [], an.analyze

    def probed(*args, **kwargs):
        probe = subprocess.run([sys.executable, "-c", PROBE, str(out)], capture_output=True, text=True, env=env)
        seen.append(probe.stdout.strip())
        return real(*args, **kwargs)

    monkeypatch.setattr(an, "analyze", probed)
    result = _run([path, "--out", out, "--quiet"])  # the killed holder's lock file is reused
    assert result.exit_code == 0, result.output
    assert seen == [in_use.format(out, os.getpid())]
    assert (out / "report.json").exists() and not (out / LOCK_NAME).exists()
