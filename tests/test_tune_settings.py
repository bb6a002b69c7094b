"""`tune --densities / --orders / --total-budget` (issue 23, part 2): density
and order as searched settings.

* each (density, order) setting builds its own masks (a mask pass each,
  counted, with the plan each pass gets) and its own search;
* the chosen setting round-trips through tuned.yml: its density and order
  are written, and the model `mergekit-yaml` writes from tuned.yml scores
  per window what tune reported;
* `suggested` is the order `analyze` advises (the same rule and code);
* your config is scored as written even when its density is not searched;
* bad values are one line naming the option and what it takes.
"""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest
import test_tune_command
import torch
import yaml
from click.testing import CliRunner
from test_tune_command import _data_args, _merge

from mergekit_cabs import analyze as an
from mergekit_cabs import planning
from mergekit_cabs import tune as tn
from mergekit_cabs.cli import main
from mergekit_cabs.tune import live as tune_live
from mergekit_cabs.tune.outputs import settings_markdown
from mergekit_cabs.tune.report import settings_lines
from mergekit_cabs.tune.settings import check_settings, order_ranks

tune_family = test_tune_command.tune_family  # a bf16 base, three fine-tunes (3 x 16 of 64), their texts
no_model_loading = test_tune_command.no_model_loading


def _count_mask_passes(monkeypatch) -> list:
    """Record the plan handed to every mask pass (`build_store`) of a tune run."""
    passes = []
    real = tune_live.build_store

    def counted(planned, *args, **kwargs):
        passes.append(planned)
        return real(planned, *args, **kwargs)

    monkeypatch.setattr(tune_live, "build_store", counted)
    return passes


def _quotas(planned) -> set:
    return {(tuple(str(m) for m in p.models), p.resolved.n) for p in planned if p.models}


def test_each_setting_builds_its_own_masks_and_the_chosen_one_round_trips_through_tuned_yml(
        tune_family, tmp_path, monkeypatch):
    passes = _count_mask_passes(monkeypatch)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["tune", str(tune_family["config"]), *map(str, _data_args(tune_family)),
                                       "--out", str(out), "--budget", "6", "--max-windows", "4",
                                       "--densities", "0.125,0.5", "--orders", "config,all", "--baselines", "none",
                                       "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "tune.json").read_text())
    searched = report["settings"]["searched"]
    assert len(searched) == 2 * 6  # two densities x the 3! orders (config is one of them)
    labels = [t.path.name for t in tune_family["tunes"]]
    assert [s["density"] for s in searched] == [0.125] * 6 + [0.5] * 6
    assert {tuple(s["models"]) for s in searched[:6]} == set(itertools.permutations(labels))
    assert sum(s["chosen"] for s in searched) == 1 and all(s["evaluations"] <= 6 for s in searched)
    assert all(s["heldout"] is not None for s in searched)
    # one mask pass per setting, in order, each with its own quotas and order; then your config's own
    # (0.25 is not searched) and, unless the last setting won, the chosen one's once more
    n_of = {0.125: 8, 0.5: 32}
    for s, planned in zip(searched, passes):
        got = _quotas(planned)
        assert len(got) == 1
        order, n = next(iter(got))
        assert [o.rsplit("/", 1)[-1] for o in order] == s["models"] and n == (n_of[s["density"]],) * 3
    assert _quotas(passes[12]) == _quotas(planning.plan(planning.load_config(tune_family["config"], "tune")))
    chosen = next(i for i, s in enumerate(searched) if s["chosen"])
    assert len(passes) == 13 + 1 and passes[-1] is passes[chosen]  # the chosen setting's masks, built again
    # tuned.yml: the chosen density and order, and what mergekit-yaml writes from it scores as reported
    tuned = yaml.safe_load((out / "tuned.yml").read_text())
    assert [m["model"].rsplit("/", 1)[-1] for m in tuned["models"]] == searched[chosen]["models"]
    assert {m["parameters"]["density"] for m in tuned["models"]} == {searched[chosen]["density"]}
    assert set(labels) == set(searched[chosen]["models"])
    model = _merge(tuned, tmp_path / "merged", torch.bfloat16)
    prep = tn.prepare(tune_family["config"], [a for a in _data_args(tune_family) if a != "--data"], max_windows=4)
    for task in prep.tasks:
        got = tn.window_losses(model, task.heldout, tn.DEFAULTS["batch_size"]).tolist()
        assert got == report["best"]["heldout"]["window_losses"][task.name]
    assert "density 0.5" in result.output and "chosen" in (out / "tune.md").read_text()


def test_your_config_is_scored_as_written_when_its_density_is_not_searched(tune_family):
    args = [f"{k}={v}" for k, v in tune_family["data"].items()]
    plain = tn.run_tune(tn.prepare(tune_family["config"], args, max_windows=2), budget=3, quiet=True,
                        baselines="none")
    other = tn.run_tune(tn.prepare(tune_family["config"], args, max_windows=2), budget=3, quiet=True,
                        baselines="none", densities="0.5")
    for split in ("fit", "heldout"):
        assert other["start"][split]["window_losses"] == plain["start"][split]["window_losses"]
    assert other["settings"]["searched"][0]["your_config"] is False
    assert plain["settings"]["searched"][0]["your_config"] is True
    assert other["tuned_config"]["models"][0]["parameters"]["density"] == 0.5


def test_a_density_equal_to_the_configs_counts_as_your_config_and_costs_no_extra_mask_pass(
        tune_family, monkeypatch):
    passes = _count_mask_passes(monkeypatch)
    prep = tn.prepare(tune_family["config"], [f"{k}={v}" for k, v in tune_family["data"].items()], max_windows=2)
    report = tn.run_tune(prep, budget=3, quiet=True, baselines="none", densities="16,0.5")  # n 16 of 64 = 0.25
    assert [s["your_config"] for s in report["settings"]["searched"]] == [True, False]
    chosen_last = report["settings"]["searched"][-1]["chosen"]
    assert len(passes) == 2 + (0 if chosen_last else 1)


def test_suggested_is_the_order_analyze_advises(tune_family, tmp_path):
    raw = dict(tune_family["raw"])
    # unequal densities make the order matter: the model keeping most loses most by going last
    raw["models"] = [{"model": m["model"], "parameters": {"weight": 1.0, "density": d}}
                     for m, d in zip(tune_family["raw"]["models"], (0.1, 0.3, 0.6))]
    path = tmp_path / "uneven.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    config = planning.load_config(path, "tune")
    advice = an.analyze(config, progress=False)["summary"]["order"]
    got = an.order_of(planning.plan(config), progress=False)
    assert got == {"suggested": advice["suggested"], "reason": advice["reason"]}
    assert advice["reason"] == "reorder"  # a case where the order changes
    prep = tn.prepare(path, [f"{k}={v}" for k, v in tune_family["data"].items()], max_windows=2)
    settings = tn.plan_settings(prep, (), ("config", "suggested"), progress=False)
    assert [s.order for s in settings] == ["config", "suggested"]
    assert [str(prep.finetunes[i]) for i in settings[1].ranks] == advice["suggested"]
    assert [str(m) for m in settings[1].planned[0].models] == advice["suggested"]
    # written in the suggested order, the suggestion is that order: searched once, and said
    raw["models"] = [next(m for m in raw["models"] if m["model"] == name) for name in advice["suggested"]]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    prep = tn.prepare(path, [f"{k}={v}" for k, v in tune_family["data"].items()], max_windows=2)
    said = []
    settings = tn.plan_settings(prep, (), ("config", "suggested"), progress=False, say=said.append)
    assert len(settings) == 1 and said == ["tune: the suggested order is one already searched; it is searched once"]


def test_the_total_budget_is_shared_among_the_settings(tune_family):
    assert tn.setting_budgets(3, 60, None) == [60, 60, 60]
    assert tn.setting_budgets(3, 60, 10) == [4, 3, 3]
    with pytest.raises(tn.TuneError, match="--total-budget is 2; the 3 settings"):
        tn.setting_budgets(3, 60, 2)
    prep = tn.prepare(tune_family["config"], [f"{k}={v}" for k, v in tune_family["data"].items()], max_windows=2)
    report = tn.run_tune(prep, budget=50, total_budget=7, quiet=True, baselines="none", densities="0.125,0.5")
    assert [s["budget"] for s in report["settings"]["searched"]] == [4, 3]
    assert report["settings"]["evaluations"] <= 7 and report["settings"]["total_budget"] == 7


def test_setting_config_sets_n_or_density_for_every_model_and_reorders_models_and_sources():
    from mergekit.common import ModelReference

    refs = [ModelReference.model_validate(name) for name in ("a", "b", "c")]
    raw = {"merge_method": "cabs", "base_model": "base", "parameters": {"density": 0.3, "lambda": 1.0},
           "models": [{"model": "a", "parameters": {"weight": 1.0, "n": 8}}, {"model": "b"},
                      {"model": "c", "parameters": {"density": [{"filter": "mlp", "value": 0.1}, {"value": 0.2}]}}]}
    out = tn.setting_config(raw, 16, (2, 0, 1), refs)
    assert [m["model"] for m in out["models"]] == ["c", "a", "b"]
    assert [m["parameters"] for m in out["models"]] == [{"n": 16}, {"weight": 1.0, "n": 16}, {"n": 16}]
    assert out["parameters"] == {"lambda": 1.0} and raw["parameters"]["density"] == 0.3  # the input untouched
    assert [m["parameters"]["density"] for m in tn.setting_config(raw, 0.5, (0, 1, 2), refs)["models"]] == [0.5] * 3
    slices = {"merge_method": "cabs", "base_model": "base",
              "slices": [{"sources": [{"model": "base", "layer_range": [0, 2]}, {"model": "a", "layer_range": [0, 2]},
                                      {"model": "b", "layer_range": [0, 2]}]}]}
    got = tn.setting_config(slices, None, (1, 0), refs[:2])
    assert [s["model"] for s in got["slices"][0]["sources"]] == ["base", "b", "a"]


@pytest.mark.parametrize("option, value, words", [
    ("--densities", "0,0.5", "--densities has '0'; give densities in (0, 1] with a decimal point"),
    ("--densities", "1.5", "--densities has '1.5'"),
    ("--densities", "half", "--densities has 'half'"),
    ("--densities", "0.5,", "--densities has ''"),
    ("--orders", "config,best", "--orders has 'best'; it takes config, suggested, all"),
])
def test_a_bad_setting_option_is_one_line_before_any_model_loads(tune_family, tmp_path, no_model_loading, option,
                                                                  value, words):
    result = CliRunner().invoke(main, ["tune", str(tune_family["config"]), *map(str, _data_args(tune_family)),
                                       "--out", str(tmp_path / "out"), option, value])
    assert result.exit_code != 0
    assert words in result.output and len(result.output.strip().splitlines()) == 1


def test_orders_all_is_refused_above_four_models_in_one_line():
    prep = SimpleNamespace(finetunes=list(range(5)))
    with pytest.raises(tn.TuneError, match="--orders all tries every order of the 5 models \\(120\\); it is allowed "
                                           "up to 4 models"):
        order_ranks("all", prep, None, progress=False)


def test_the_config_order_keeps_each_slices_own_order_when_only_the_density_changes():
    from mergekit.common import ModelReference

    refs = [ModelReference.model_validate(name) for name in ("a", "b")]
    slices = {"merge_method": "cabs", "base_model": "base", "parameters": {"density": 0.25},
              "slices": [{"sources": [{"model": "base", "layer_range": [0, 1]}, {"model": "a", "layer_range": [0, 1]},
                                      {"model": "b", "layer_range": [0, 1]}]},
                         {"sources": [{"model": "b", "layer_range": [1, 2]}, {"model": "a", "layer_range": [1, 2]},
                                      {"model": "base", "layer_range": [1, 2]}]}]}
    got = tn.setting_config(slices, 0.25, (0, 1), refs)  # --densities 0.25 --orders config
    assert [[s["model"] for s in piece["sources"]] for piece in got["slices"]] == [["base", "a", "b"],
                                                                                    ["b", "a", "base"]]
    assert all(s.get("parameters", {}).get("density") == 0.25 for piece in got["slices"] for s in piece["sources"]
               if s["model"] != "base")


def _refuse_reading_tensors(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the suggested order read the tensors before the settings were checked")

    monkeypatch.setattr(an, "order_of", refuse)


@pytest.mark.parametrize("extra, words", [
    (["--densities", "0.1,300", "--orders", "suggested"],
     "--densities has 300: cabs: 'n' for model"),
    (["--orders", "suggested,all", "--total-budget", "5"],
     "--total-budget is 5; the 6 settings"),
])
def test_a_setting_that_cannot_run_fails_before_the_suggested_order_reads_the_tensors(
        tune_family, tmp_path, no_model_loading, monkeypatch, extra, words):
    _refuse_reading_tensors(monkeypatch)
    result = CliRunner().invoke(main, ["tune", str(tune_family["config"]), *map(str, _data_args(tune_family)),
                                       "--out", str(tmp_path / "out"), *extra])
    assert result.exit_code == 1
    assert words in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_orders_all_above_four_models_fails_before_the_suggested_order_reads_the_tensors(monkeypatch):
    _refuse_reading_tensors(monkeypatch)
    prep = SimpleNamespace(finetunes=list(range(5)))
    with pytest.raises(tn.TuneError, match="--orders all tries every order of the 5 models"):
        check_settings(prep, (), ("suggested", "all"), None)


def test_one_setting_other_than_your_configs_is_named_in_the_summary_and_tune_md():
    row = {"label": "n 1, order a > b", "your_config": False}
    report = {"settings": {"searched": [row]}}
    assert settings_lines(report)[0] == ("searched one setting, not your config's: n 1, order a > b "
                                            "(tuned.yml writes it)")
    assert "n 1, order a > b" in "\n".join(settings_markdown(report))
    row["your_config"] = True
    assert settings_lines(report) == [] and settings_markdown(report) == []


def test_a_density_in_a_progress_line_is_named_as_in_the_settings_table():
    from mergekit_cabs.tune.settings import density_text

    assert [density_text(d) for d in (64, 0.25, None)] == ["n 64", "density 0.25", "density as configured"]


def test_the_overlap_line_is_said_once_per_setting_searched_not_again_when_its_masks_are_rebuilt(
        tune_family, capsys):
    prep = tn.prepare(tune_family["config"], [f"{k}={v}" for k, v in tune_family["data"].items()], max_windows=2)
    capsys.readouterr()
    # 3 x 32 of 64 overlap; your config's masks (0.25) are built after the search, then the chosen one's again
    tn.run_tune(prep, budget=2, quiet=True, baselines="none", densities="0.5")
    said = capsys.readouterr()
    assert (said.out + said.err).count("the models' kept places overlap") == 1
    tn.run_tune(prep, budget=2, quiet=True, baselines="none", densities="0.5,0.25")  # with --quiet, which setting
    said = capsys.readouterr()
    assert "the models' kept places overlap (density 0.5, order ft0 > ft1 > ft2) (" in said.out + said.err


@pytest.mark.parametrize("density, below", [("0.5", True), ("1", False)])  # on this family, at budget 1
def test_the_closing_line_advises_your_config_when_tuned_yml_scores_below_it(tune_family, tmp_path, density, below):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["tune", str(tune_family["config"]), *map(str, _data_args(tune_family)),
                                       "--out", str(out), "--budget", "1", "--max-windows", "2", "--densities",
                                       density, "--baselines", "none", "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "tune.json").read_text())
    assert (report["best"]["fit"]["score"] < report["start"]["fit"]["score"]) is below
    assert report["scores_below_config"] is below
    last = result.output.strip().splitlines()[-1]
    if below:
        assert last == f"Merge it:  mergekit-yaml {tune_family['config']} OUTPUT_DIR"
        assert "tuned.yml scores below your config on the fit windows" in result.output
    else:
        assert last == f"Merge it:  mergekit-yaml {out / 'tuned.yml'} OUTPUT_DIR"


def test_a_density_and_an_n_with_the_same_masks_are_searched_once(tune_family):
    prep = tn.prepare(tune_family["config"], [f"{k}={v}" for k, v in tune_family["data"].items()], max_windows=2)
    said = []
    settings = tn.plan_settings(prep, (0.25, 16, 0.5), ("config",), progress=False, say=said.append)
    assert [s.density for s in settings] == [0.25, 0.5]  # n 16 of block 64 is density 0.25
    assert said == ["tune: n 16, order ft0 > ft1 > ft2 plans the masks of density 0.25, order ft0 > ft1 > ft2; "
                    "it is searched once"]


def test_densities_tell_a_density_from_an_n_by_the_decimal_point():
    assert tn.parse_densities("0.1,0.25,64,1.0,1,0.25") == (0.1, 0.25, 64, 1.0, 1)
    assert [type(v) for v in tn.parse_densities("1.0,1,2.5e-1")] == [float, int, float]
    assert tn.parse_densities(None) == ()
