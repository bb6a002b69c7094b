"""Table-driven unit tests of the cabs parameter rules in `mergekit_cabs.params`.

Every expected number below is worked out by hand from the rules in SPEC.md
(n = floor(density * m + 0.5); tail quota floor(n * len / m + 0.5); with
`balanced: false` floor(density * numel + 0.5) per tensor), never by calling
the code under test.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re

import pytest
from mergekit.config import MergeConfiguration
from pydantic import TypeAdapter

from mergekit_cabs import params
from mergekit_cabs.params import (
    PARAMETERS,
    CabsConfigError,
    CabsError,
    Resolved,
    block_quota,
    check_parameter_names,
    resolve,
)

LOGGER = "mergekit_cabs"
TENSOR = "model.layers.0.mlp.up_proj.weight"
# The names cabs takes, in the order the refusal lists them (SPEC's table).
ALLOWED = "weight, density, n, block_size, overlap, conflict_aware, balanced, lambda"


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch):
    """No backend setting from the caller's shell, and no warning already said."""
    monkeypatch.delenv("MERGEKIT_CABS_BACKEND", raising=False)
    params.once.new_merge()
    yield
    params.once.new_merge()


def S(**overrides):
    """Shared parameters as mergekit hands them to cabs: the SPEC defaults,
    with `lam=` standing for `lambda` (a Python keyword)."""
    shared = {"block_size": 256, "overlap": "fill", "conflict_aware": True,
              "balanced": True, "lambda": 1.0}
    if "lam" in overrides:
        overrides["lambda"] = overrides.pop("lam")
    shared.update(overrides)
    return shared


def E(weights, n, density, block_size=256, overlap="fill", conflict_aware=True,
      balanced=True, lam=1.0):
    """Every field of the expected Resolved, SPEC defaults written out by hand."""
    return {"weights": weights, "n": n, "density": density, "block_size": block_size,
            "overlap": overlap, "conflict_aware": conflict_aware, "balanced": balanced,
            "lam": lam}


# --- accepted inputs: (id, shared, per_model, expected fields) ----------------

ACCEPTED = [
    ("defaults_one_model", S(), [("a", {})],
     E((1.0,), (64,), (0.25,))),
    ("defaults_three_models", S(), [("a", {}), ("b", {}), ("c", {})],
     E((1.0, 1.0, 1.0), (64, 64, 64), (0.25, 0.25, 0.25))),
    # density -> n: floor(density * m + 0.5)
    ("density_0.25_m256_is_64", S(), [("a", {"density": 0.25})],
     E((1.0,), (64,), (0.25,))),
    ("density_0.3_m256_76.8_is_77", S(), [("a", {"density": 0.3})],
     E((1.0,), (77,), (0.3,))),
    ("density_0.1_m256_25.6_is_26", S(), [("a", {"density": 0.1})],
     E((1.0,), (26,), (0.1,))),
    ("density_0.2_m256_51.2_is_51", S(), [("a", {"density": 0.2})],
     E((1.0,), (51,), (0.2,))),
    # products exactly x.5 round up (not to even)
    ("density_0.125_m4_0.5_is_1", S(block_size=4), [("a", {"density": 0.125})],
     E((1.0,), (1,), (0.125,), block_size=4)),
    ("density_0.375_m4_1.5_is_2", S(block_size=4), [("a", {"density": 0.375})],
     E((1.0,), (2,), (0.375,), block_size=4)),
    ("density_0.625_m4_2.5_is_3", S(block_size=4), [("a", {"density": 0.625})],
     E((1.0,), (3,), (0.625,), block_size=4)),
    ("density_0.5_m5_2.5_is_3", S(block_size=5), [("a", {"density": 0.5})],
     E((1.0,), (3,), (0.5,), block_size=5)),
    ("density_0.5_m1_is_1", S(block_size=1), [("a", {"density": 0.5})],
     E((1.0,), (1,), (0.5,), block_size=1)),
    ("least_density_0.5_over_256_keeps_1", S(), [("a", {"density": 0.001953125})],
     E((1.0,), (1,), (0.001953125,))),
    ("density_1_keeps_whole_block", S(), [("a", {"density": 1})],
     E((1.0,), (256,), (1,))),
    # n given: density recorded as None
    ("n_3_m4", S(block_size=4), [("a", {"n": 3})],
     E((1.0,), (3,), (None,), block_size=4)),
    ("n_1_lower_bound", S(), [("a", {"n": 1})],
     E((1.0,), (1,), (None,))),
    ("n_m_upper_bound", S(), [("a", {"n": 256})],
     E((1.0,), (256,), (None,))),
    ("n_none_falls_back_to_density", S(), [("a", {"n": None, "density": 0.5})],
     E((1.0,), (128,), (0.5,))),
    ("mixed_n_density_default_in_order", S(),
     [("a", {"n": 64}), ("b", {"density": 0.5}), ("c", {})],
     E((1.0, 1.0, 1.0), (64, 128, 64), (None, 0.5, 0.25))),
    # weights
    ("weight_int_becomes_float", S(), [("a", {"weight": 2})],
     E((2.0,), (64,), (0.25,))),
    ("weight_negative_and_zero", S(), [("a", {"weight": -0.5}), ("b", {"weight": 0})],
     E((-0.5, 0.0), (64, 64), (0.25, 0.25))),
    # shared settings
    ("overlap_strict", S(overlap="strict"), [("a", {})],
     E((1.0,), (64,), (0.25,), overlap="strict")),
    ("conflict_aware_false", S(conflict_aware=False), [("a", {})],
     E((1.0,), (64,), (0.25,), conflict_aware=False)),
    ("balanced_false", S(balanced=False), [("a", {})],
     E((1.0,), (64,), (0.25,), balanced=False)),
    ("lambda_int_becomes_float", S(lam=2), [("a", {})],
     E((1.0,), (64,), (0.25,), lam=2.0)),
    ("lambda_negative", S(lam=-1.5), [("a", {})],
     E((1.0,), (64,), (0.25,), lam=-1.5)),
    ("block_size_128_default_density_is_32", S(block_size=128), [("a", {})],
     E((1.0,), (32,), (0.25,), block_size=128)),
]


@pytest.mark.parametrize(
    "shared, per_model, expected",
    [row[1:] for row in ACCEPTED],
    ids=[row[0] for row in ACCEPTED],
)
@pytest.mark.parametrize("tensor", [None, TENSOR])
def test_accepted_parameters_resolve_to_the_hand_computed_fields(shared, per_model, expected, tensor):
    resolved = resolve(shared, per_model, tensor)
    assert dataclasses.asdict(resolved) == expected
    assert all(type(n) is int for n in resolved.n)
    assert all(type(w) is float for w in resolved.weights)
    assert type(resolved.lam) is float


def test_resolve_does_not_change_its_inputs():
    shared, model = S(lam=2), {"density": 0.5, "weight": 3}
    resolve(shared, [("a", model)], TENSOR)
    assert shared == S(lam=2) and model == {"density": 0.5, "weight": 3}


# --- refused inputs: (id, shared, per_model, message regex) -------------------
# `{where}` stands for " on tensor 'TENSOR'" (tensor given) or "" (tensor None).

A = "for model 'a'{where}"
RANGE_256 = r"it must be a whole number in \[1, block_size=256\]"
HINT = r" \(a gradient on n must land on whole numbers; use density for a smooth one\)"
DENSITY_RANGE = r"it must be a number in \(0, 1\]$"

REFUSED = [
    # n and density together
    ("n_and_density_together", S(), [("a", {"n": 3, "density": 0.5})],
     r"both 'n' \(3\) and 'density' \(0\.5\) are set " + A + "; give only one"),
    ("n_and_density_together_second_model", S(), [("a", {}), ("b", {"n": 64, "density": 0.25})],
     r"both 'n' \(64\) and 'density' \(0\.25\) are set for model 'b'{where}; give only one"),
    # n out of range / not whole
    ("n_zero", S(), [("a", {"n": 0})], r"'n' " + A + " is 0; " + RANGE_256 + "$"),
    ("n_negative", S(), [("a", {"n": -1})], r"'n' " + A + " is -1; " + RANGE_256 + "$"),
    ("n_above_m", S(), [("a", {"n": 257})], r"'n' " + A + " is 257; " + RANGE_256 + "$"),
    ("n_above_small_m", S(block_size=4), [("a", {"n": 5})],
     r"'n' " + A + r" is 5; it must be a whole number in \[1, block_size=4\]$"),
    ("n_non_integer_float_hints_gradient", S(), [("a", {"n": 2.5})],
     r"'n' " + A + r" is 2\.5; " + RANGE_256 + HINT + "$"),
    ("n_integral_float_unconverted_hints_gradient", S(), [("a", {"n": 3.0})],
     r"'n' " + A + r" is 3\.0; " + RANGE_256 + HINT + "$"),
    ("n_bool_no_hint", S(), [("a", {"n": True})],
     r"'n' " + A + " is True; " + RANGE_256 + "$"),
    ("n_string_no_hint", S(), [("a", {"n": "3"})],
     r"'n' " + A + " is '3'; " + RANGE_256 + "$"),
    # density
    ("density_zero", S(), [("a", {"density": 0})], r"'density' " + A + " is 0; " + DENSITY_RANGE),
    ("density_negative", S(), [("a", {"density": -0.25})],
     r"'density' " + A + r" is -0\.25; " + DENSITY_RANGE),
    ("density_above_one", S(), [("a", {"density": 1.01})],
     r"'density' " + A + r" is 1\.01; " + DENSITY_RANGE),
    ("density_string", S(), [("a", {"density": "half"})],
     r"'density' " + A + " is 'half'; " + DENSITY_RANGE),
    ("density_nan", S(), [("a", {"density": math.nan})],
     r"'density' " + A + " is nan; " + DENSITY_RANGE),
    ("density_bool", S(), [("a", {"density": True})],
     r"'density' " + A + " is True; " + DENSITY_RANGE),
    ("density_rounds_to_zero_m256", S(), [("a", {"density": 0.001})],
     r"'density' " + A + r" is 0\.001, which keeps floor\(0\.001 \* 256 \+ 0\.5\) = 0 places "
     r"per block of block_size=256; use density >= 0\.001953125 or a larger block_size$"),
    ("density_rounds_to_zero_m4", S(block_size=4), [("a", {"density": 0.1})],
     r"'density' " + A + r" is 0\.1, which keeps floor\(0\.1 \* 4 \+ 0\.5\) = 0 places "
     r"per block of block_size=4; use density >= 0\.125 or a larger block_size$"),
    ("density_rounds_to_zero_m1", S(block_size=1), [("a", {"density": 0.2})],
     r"'density' " + A + r" is 0\.2, .* = 0 places per block of block_size=1; "
     r"use density >= 0\.5 or"),
    ("bad_density_on_second_model", S(), [("a", {}), ("b", {"density": 0})],
     r"'density' for model 'b'{where} is 0; " + DENSITY_RANGE),
    # weight
    ("weight_nan", S(), [("a", {"weight": math.nan})],
     r"'weight' " + A + " must be a finite number; got nan$"),
    ("weight_inf", S(), [("a", {"weight": -math.inf})],
     r"'weight' " + A + " must be a finite number; got -inf$"),
    ("weight_bool", S(), [("a", {"weight": True})],
     r"'weight' " + A + " must be a finite number; got True$"),
    ("weight_string", S(), [("a", {"weight": "1.0"})],
     r"'weight' " + A + " must be a finite number; got '1\\.0'$"),
    # block_size
    ("block_size_zero", S(block_size=0), [("a", {})],
     r"'block_size'{where} is 0; it must be a whole number >= 1$"),
    ("block_size_negative", S(block_size=-4), [("a", {})],
     r"'block_size'{where} is -4; it must be a whole number >= 1$"),
    ("block_size_float", S(block_size=2.0), [("a", {})],
     r"'block_size'{where} is 2\.0; it must be a whole number >= 1$"),
    ("block_size_bool", S(block_size=True), [("a", {})],
     r"'block_size'{where} is True; it must be a whole number >= 1$"),
    ("block_size_string", S(block_size="256"), [("a", {})],
     r"'block_size'{where} is '256'; it must be a whole number >= 1$"),
    # overlap
    ("overlap_other_word", S(overlap="none"), [("a", {})],
     r"'overlap'{where} is 'none'; it must be 'fill' or 'strict'$"),
    ("overlap_upper_case", S(overlap="FILL"), [("a", {})],
     r"'overlap'{where} is 'FILL'; it must be 'fill' or 'strict'$"),
    ("overlap_none", S(overlap=None), [("a", {})],
     r"'overlap'{where} is None; it must be 'fill' or 'strict'$"),
    # flags
    ("conflict_aware_string", S(conflict_aware="true"), [("a", {})],
     r"'conflict_aware'{where} is 'true'; it must be true or false$"),
    ("conflict_aware_int", S(conflict_aware=1), [("a", {})],
     r"'conflict_aware'{where} is 1; it must be true or false$"),
    ("balanced_string", S(balanced="false"), [("a", {})],
     r"'balanced'{where} is 'false'; it must be true or false$"),
    ("balanced_int", S(balanced=0), [("a", {})],
     r"'balanced'{where} is 0; it must be true or false$"),
    # lambda
    ("lambda_nan", S(lam=math.nan), [("a", {})],
     r"'lambda'{where} is nan; it must be a finite number$"),
    ("lambda_inf", S(lam=math.inf), [("a", {})],
     r"'lambda'{where} is inf; it must be a finite number$"),
    ("lambda_string", S(lam="1.0"), [("a", {})],
     r"'lambda'{where} is '1\.0'; it must be a finite number$"),
    ("lambda_bool", S(lam=True), [("a", {})],
     r"'lambda'{where} is True; it must be a finite number$"),
    # a shared fault is reported before any model's
    ("shared_fault_before_model_fault", S(block_size=0), [("a", {"density": 0})],
     r"'block_size'{where} is 0;"),
]


@pytest.mark.parametrize(
    "shared, per_model, pattern",
    [row[1:] for row in REFUSED],
    ids=[row[0] for row in REFUSED],
)
@pytest.mark.parametrize("tensor", [None, TENSOR], ids=["no_tensor", "tensor"])
def test_refused_parameters_name_the_value_the_model_and_the_tensor(shared, per_model, pattern, tensor):
    where = re.escape(f" on tensor '{tensor}'") if tensor else ""
    with pytest.raises(CabsConfigError) as info:
        resolve(shared, per_model, tensor)
    message = str(info.value)
    assert message.startswith("cabs: ")
    assert re.search(pattern.format(where=where), message), message
    assert ("on tensor" in message) == (tensor is not None), message


def test_n_and_density_together_name_both_values_and_the_model():
    with pytest.raises(CabsConfigError, match=r"both 'n' \(12\) and 'density' \(0\.75\) "
                       r"are set for model 'org/tune-b' on tensor 'lm_head\.weight'"):
        resolve(S(), [("org/tune-a", {}), ("org/tune-b", {"n": 12, "density": 0.75})], "lm_head.weight")


def test_config_errors_are_value_errors_of_the_package():
    assert issubclass(CabsConfigError, CabsError) and issubclass(CabsError, ValueError)


def test_every_error_a_command_reports_is_the_one_public_error_type():
    import mergekit_cabs
    from mergekit_cabs.analyze import AnalyzeError
    from mergekit_cabs.planning import PlanError
    from mergekit_cabs.tune import TuneError

    assert mergekit_cabs.CabsError is CabsError
    assert all(issubclass(e, CabsError) for e in (AnalyzeError, PlanError, TuneError))


def test_the_suggested_minimum_density_is_accepted():
    with pytest.raises(CabsConfigError) as info:
        resolve(S(), [("a", {"density": 0.001})], None)
    suggested = float(re.search(r"use density >= (\S+)", str(info.value)).group(1))
    assert resolve(S(), [("a", {"density": suggested})], None).n == (1,)


# --- the backend environment variable ------------------------------------------

@pytest.mark.parametrize("value, shown", [("bogus", "'bogus'"), ("  BOGUS ", "'bogus'"), ("cuda", "'cuda'")])
def test_a_bad_backend_setting_is_refused_naming_the_variable(monkeypatch, value, shown):
    monkeypatch.setenv("MERGEKIT_CABS_BACKEND", value)
    with pytest.raises(CabsConfigError,
                       match=r"^cabs: MERGEKIT_CABS_BACKEND is " + re.escape(shown) + "; it must be one of"):
        resolve(S(), [("a", {})], TENSOR)


@pytest.mark.parametrize("value", ["torch", "auto", "TORCH", ""])
def test_a_good_backend_setting_does_not_change_the_result(monkeypatch, value):
    monkeypatch.setenv("MERGEKIT_CABS_BACKEND", value)
    assert resolve(S(), [("a", {})], None).n == (64,)


def test_params_imports_neither_the_kernel_nor_torch():
    """The backend setting lives below params and kernel (mergekit_cabs.backend):
    params checks it (in `resolve`) without importing the kernel, so the two no
    longer import each other, and resolving parameters needs no torch."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\nfrom mergekit_cabs.params import resolve\n"
            "shared = {'block_size': 256, 'overlap': 'fill', 'conflict_aware': True, 'balanced': True, "
            "'lambda': 1.0}\n"
            "assert resolve(shared, [('a', {})], None).n == (64,)\n"  # checks the backend setting
            "print(sorted(m for m in sys.modules if m.startswith(('mergekit_cabs.', 'torch', 'mergekit.'))))")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['mergekit_cabs._autoload', 'mergekit_cabs.backend', 'mergekit_cabs.params']"


# --- lenient scalar coercions of the parameter types ---------------------------

TYPES = {p.name: p.type for p in PARAMETERS}

COERCIONS = [
    # (parameter, value, expected value, expected type)
    ("weight", "5e-1", 0.5, float),
    ("weight", 2, 2.0, float),
    ("weight", "-3", -3.0, float),
    ("weight", True, True, bool),
    ("weight", "heavy", "heavy", str),
    ("weight", None, None, type(None)),
    ("density", "0.25", 0.25, float),
    ("density", 1, 1.0, float),
    ("density", "2.5e-1", 0.25, float),
    ("density", "dense", "dense", str),
    ("n", 64.0, 64, int),
    ("n", "64", 64, int),
    ("n", "6.4e1", 64, int),
    ("n", 48, 48, int),
    ("n", 2.5, 2.5, float),
    ("n", "2.5", 2.5, float),
    ("n", "x", "x", str),
    ("n", True, True, bool),
    ("n", None, None, type(None)),
    ("block_size", "128", 128, int),
    ("block_size", 256.0, 256, int),
    ("block_size", 12.5, 12.5, float),
    ("overlap", "fill", "fill", str),
    ("overlap", "strict", "strict", str),
    ("overlap", 5, "5", str),
    ("overlap", None, None, type(None)),
    ("conflict_aware", "TRUE", True, bool),
    ("conflict_aware", "False", False, bool),
    ("conflict_aware", False, False, bool),
    ("conflict_aware", "yes", "yes", str),
    ("conflict_aware", 1, 1, int),
    ("balanced", "true", True, bool),
    ("balanced", "false", False, bool),
    ("lambda", "1e0", 1.0, float),
    ("lambda", 3, 3.0, float),
]


@pytest.mark.parametrize("name, value, expected, kind", COERCIONS,
                         ids=[f"{r[0]}={r[1]!r}" for r in COERCIONS])
def test_parameter_types_coerce_only_what_yaml_and_gradients_produce(name, value, expected, kind):
    got = TypeAdapter(TYPES[name]).validate_python(value)
    assert type(got) is kind
    assert got == expected


@pytest.mark.parametrize("name, value, check", [
    ("weight", "nan", math.isnan),
    ("lambda", "inf", lambda v: v == math.inf),
    ("density", "-inf", lambda v: v == -math.inf),
])
def test_non_finite_strings_become_floats_for_resolve_to_refuse(name, value, check):
    assert check(TypeAdapter(TYPES[name]).validate_python(value))


def test_the_parameter_table_matches_the_spec():
    assert [(p.name, p.shared, p.default) for p in PARAMETERS] == [
        ("weight", False, 1.0), ("density", False, None), ("n", False, None),
        ("block_size", True, 256), ("overlap", True, "fill"),
        ("conflict_aware", True, True), ("balanced", True, True), ("lambda", True, 1.0),
    ]


# --- quotas -------------------------------------------------------------------

BLOCK_QUOTAS = [
    # (n, length, m, floor(n * length / m + 0.5) by hand)
    (64, 256, 256, 64),     # a full block keeps n
    (64, 100, 256, 25),     # 25.0 + 0.5
    (3, 2, 4, 2),           # 1.5 + 0.5 = 2
    (1, 2, 4, 1),           # 0.5 + 0.5 = 1
    (1, 1, 4, 0),           # 0.25 + 0.5
    (5, 3, 6, 3),           # 2.5 + 0.5 = 3
    (2, 5, 8, 1),           # 1.25 + 0.5
    (7, 7, 8, 6),           # 6.125 + 0.5
    (77, 1, 256, 0),        # 0.30 + 0.5
    (128, 1, 256, 1),       # 0.5 + 0.5
]


@pytest.mark.parametrize("n, length, m, expected", BLOCK_QUOTAS)
def test_block_quota_rounds_half_up_on_the_short_block(n, length, m, expected):
    assert block_quota(n, length, m) == expected


def R(n, density, block_size, balanced):
    return Resolved(weights=(1.0,) * len(n), n=n, density=density, block_size=block_size,
                    overlap="fill", conflict_aware=True, balanced=balanced, lam=1.0)


KERNEL_QUOTAS = [
    # (id, resolved, numel, expected (quotas, block length))
    ("balanced_keeps_n_per_block", R((64, 64), (0.25, None), 256, True), 1000, ([64, 64], 256)),
    ("balanced_ignores_numel", R((3, 1), (0.75, None), 4, True), 10, ([3, 1], 4)),
    ("unbalanced_density_2.5_rounds_to_3", R((64,), (0.25,), 256, False), 10, ([3], 10)),
    ("unbalanced_density_0.3_of_1000", R((77,), (0.3,), 256, False), 1000, ([300], 1000)),
    ("unbalanced_density_0.125_of_4", R((32,), (0.125,), 256, False), 4, ([1], 4)),
    ("unbalanced_density_0.1_of_4_is_0", R((26,), (0.1,), 256, False), 4, ([0], 4)),
    # n given (density None): density is n / m, so floor(n * numel / m + 0.5)
    ("unbalanced_n_64_of_10", R((64,), (None,), 256, False), 10, ([3], 10)),
    ("unbalanced_n_64_of_1000", R((64,), (None,), 256, False), 1000, ([250], 1000)),
    ("unbalanced_n_3_m4_of_6", R((3,), (None,), 4, False), 6, ([5], 6)),
    ("unbalanced_mixed", R((64, 128), (None, 0.5), 256, False), 7, ([2, 4], 7)),
]


@pytest.mark.parametrize("resolved, numel, expected",
                         [row[1:] for row in KERNEL_QUOTAS], ids=[row[0] for row in KERNEL_QUOTAS])
def test_kernel_quotas_are_per_block_when_balanced_and_per_tensor_otherwise(resolved, numel, expected):
    quotas, length = resolved.kernel_quotas(numel)
    assert (quotas, length) == expected
    assert isinstance(quotas, list) and all(type(q) is int for q in quotas)


def test_kernel_quotas_of_n_given_under_balanced_false_through_resolve():
    resolved = resolve(S(balanced=False, block_size=4), [("a", {"n": 3}), ("b", {"density": 0.25})], None)
    assert resolved.density == (None, 0.25)
    # a: floor(3 * 6 / 4 + 0.5) = floor(5.0) = 5;  b: floor(0.25 * 6 + 0.5) = 2
    assert resolved.kernel_quotas(6) == ([5, 2], 6)


# --- the unavoidable-overlap warning ------------------------------------------

def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


OVERLAP_WARNINGS = [
    # (id, shared, per_model, tensor, regex of the one warning, or None for none)
    ("balanced_n_over_m", S(block_size=4), [("a", {"n": 3}), ("b", {"n": 2})], TENSOR,
     r"the quotas n = \[3, 2\] add up to 5 > block_size = 4 \(first seen on tensor '"
     + re.escape(TENSOR) + r"'\): overlap between models cannot be avoided; going on by overlap='fill'"),
    ("balanced_from_densities", S(), [("a", {"density": 0.5}), ("b", {"density": 0.75})], None,
     r"the quotas n = \[128, 192\] add up to 320 > block_size = 256: overlap .* by overlap='fill'"),
    ("balanced_strict_rule_named", S(block_size=4, overlap="strict"),
     [("a", {"n": 4}), ("b", {"n": 1})], None,
     r"n = \[4, 1\] add up to 5 > block_size = 4: .*overlap='strict': later models keep only the free places"),
    ("balanced_exactly_m_is_silent", S(block_size=4), [("a", {"n": 2}), ("b", {"n": 2})], TENSOR, None),
    ("default_three_models_silent", S(), [("a", {}), ("b", {}), ("c", {})], TENSOR, None),
    ("not_conflict_aware_is_silent", S(block_size=4, conflict_aware=False),
     [("a", {"n": 3}), ("b", {"n": 2})], TENSOR, None),
    ("unbalanced_densities_over_1", S(balanced=False), [("a", {"density": 0.75}), ("b", {"density": 0.5})], None,
     r"the quotas densities \[0\.75, 0\.5\] add up to 1\.25 > 1: overlap"),
    ("unbalanced_n_counts_as_n_over_m", S(balanced=False, block_size=4),
     [("a", {"n": 3}), ("b", {"density": 0.5})], None,
     r"the quotas densities \[0\.75, 0\.5\] add up to 1\.25 > 1: overlap"),
    ("unbalanced_exactly_1_is_silent", S(balanced=False), [("a", {"density": 0.5}), ("b", {"density": 0.5})],
     None, None),
]


@pytest.mark.parametrize("shared, per_model, tensor, pattern",
                         [row[1:] for row in OVERLAP_WARNINGS], ids=[row[0] for row in OVERLAP_WARNINGS])
def test_unavoidable_overlap_is_said_with_the_numbers(caplog, shared, per_model, tensor, pattern):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        resolve(shared, per_model, tensor)
    said = _warnings(caplog)
    if pattern is None:
        assert said == []
    else:
        assert len(said) == 1 and re.search(pattern, said[0]), said
        assert ("first seen on tensor" in said[0]) == (tensor is not None)


def test_unavoidable_overlap_is_said_once_per_setting_until_a_new_merge(caplog):
    models = [("a", {"n": 3}), ("b", {"n": 2})]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        resolve(S(block_size=4), models, "t1")
        resolve(S(block_size=4), models, "t2")           # same setting: quiet
        assert len(_warnings(caplog)) == 1
        resolve(S(block_size=4, overlap="strict"), models, "t3")   # another rule: said
        assert len(_warnings(caplog)) == 2
        resolve(S(block_size=4), [("a", {"n": 4}), ("b", {"n": 2})], "t4")  # other numbers: said
        assert len(_warnings(caplog)) == 3
        params.once.new_merge()
        resolve(S(block_size=4), models, "t5")           # a new merge: said again
    said = _warnings(caplog)
    assert len(said) == 4
    assert "'t1'" in said[0] and "'t5'" in said[3]


# --- parameter names in a configuration ----------------------------------------

def config(**body):
    body.setdefault("merge_method", "cabs")
    body.setdefault("base_model", "org/base")
    return MergeConfiguration.model_validate(body)


def models(*entries):
    return [{"model": name, **({"parameters": p} if p is not None else {})} for name, p in entries]


def slices(sources, parameters=None):
    out = {"sources": [{"model": name, "layer_range": [0, 2],
                        **({"parameters": p} if p is not None else {})} for name, p in sources]}
    if parameters is not None:
        out["parameters"] = parameters
    return [out]


NAMES_ACCEPTED = [
    ("every_name_at_top_level", dict(
        parameters={"weight": 1.0, "density": 0.5, "block_size": 64, "overlap": "strict",
                    "conflict_aware": False, "balanced": True, "lambda": 2.0},
        models=models(("org/a", None)))),
    ("per_model_names_under_models", dict(
        models=models(("org/a", {"weight": 0.5, "density": 0.3}), ("org/b", {"n": 8})))),
    ("n_with_filter_and_gradient", dict(
        models=models(("org/a", {"n": [{"filter": "mlp", "value": [32, 64]}, {"value": 16}]})))),
    ("shared_names_under_a_slice", dict(
        slices=slices([("org/a", {"weight": 1.0}), ("org/b", None)], {"block_size": 128, "lambda": 1.0}))),
    ("no_parameters_anywhere", dict(models=models(("org/a", None)))),
    ("modules_checked_and_fine", dict(
        modules={"text": {"models": models(("org/a", {"density": 0.5})), "parameters": {"overlap": "fill"}}})),
]


@pytest.mark.parametrize("body", [row[1] for row in NAMES_ACCEPTED], ids=[row[0] for row in NAMES_ACCEPTED])
def test_known_names_in_their_place_are_accepted(body, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        check_parameter_names(config(**body))
    assert _warnings(caplog) == []


NAMES_REFUSED = [
    ("unknown_top_level", dict(parameters={"densty": 0.5}, models=models(("org/a", None))),
     r"^cabs: unknown parameter 'densty'; cabs takes " + ALLOWED + "$"),
    ("unknown_under_a_model", dict(models=models(("org/a", None), ("org/b", {"lamda": 2})))),
    ("shared_under_a_model", dict(models=models(("org/a", {"block_size": 64})))),
    ("lambda_under_a_model", dict(models=models(("org/a", {"weight": 1.0, "lambda": 2.0})))),
    ("unknown_under_a_slice", dict(slices=slices([("org/a", None)], {"topk": 5}))),
    ("unknown_under_a_source", dict(slices=slices([("org/a", {"densit": 0.5})]))),
    ("shared_under_a_source", dict(slices=slices([("org/a", None), ("org/b", {"overlap": "strict"})]))),
    ("unknown_under_a_module", dict(
        modules={"text": {"models": models(("org/a", None)), "parameters": {"epsilon": 0.1}}})),
    ("shared_under_a_module_model", dict(
        modules={"text": {"models": models(("org/a", {"balanced": False}))}})),
    ("unknown_under_a_module_slice_source", dict(
        modules={"text": {"slices": slices([("org/a", {"wieght": 1})])}})),
]
NAMES_REFUSED = [row if len(row) == 3 else row + (None,) for row in NAMES_REFUSED]
# Messages worked out by hand for the rows above, in order.
_NAME_MESSAGES = {
    "unknown_under_a_model": r"^cabs: unknown parameter 'lamda' for model 'org/b'; cabs takes " + ALLOWED + "$",
    "shared_under_a_model": r"^cabs: 'block_size' is shared by all models, so it cannot be set for model "
                            r"'org/a'; put it under the top-level \(or a slice's\) `parameters:`$",
    "lambda_under_a_model": r"^cabs: 'lambda' is shared by all models, so it cannot be set for model 'org/a';",
    "unknown_under_a_slice": r"^cabs: unknown parameter 'topk'; cabs takes " + ALLOWED + "$",
    "unknown_under_a_source": r"^cabs: unknown parameter 'densit' for model 'org/a'; cabs takes " + ALLOWED + "$",
    "shared_under_a_source": r"^cabs: 'overlap' is shared by all models, so it cannot be set for model 'org/b';",
    "unknown_under_a_module": r"^cabs: unknown parameter 'epsilon'; cabs takes " + ALLOWED + "$",
    "shared_under_a_module_model": r"^cabs: 'balanced' is shared by all models, so it cannot be set for model 'org/a';",
    "unknown_under_a_module_slice_source": r"^cabs: unknown parameter 'wieght' for model 'org/a';",
}
NAMES_REFUSED = [(i, body, msg or _NAME_MESSAGES[i]) for i, body, msg in NAMES_REFUSED]


@pytest.mark.parametrize("body, pattern", [row[1:] for row in NAMES_REFUSED], ids=[row[0] for row in NAMES_REFUSED])
def test_unknown_or_misplaced_names_are_refused_naming_them(body, pattern):
    with pytest.raises(CabsConfigError, match=pattern):
        check_parameter_names(config(**body))


@pytest.mark.parametrize("body", [
    dict(parameters={"normalize": True, "int8_mask": False}, models=models(("org/a", {"normalize": 1.0}))),
    dict(slices=slices([("org/a", {"int8_mask": True})], {"normalize": False})),
], ids=["top_level_and_model", "slice_and_source"])
def test_evolve_tool_names_are_accepted_with_one_note_each(body, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        check_parameter_names(config(**body))
        check_parameter_names(config(**body))  # planned again in the same merge: still one note each
    said = _warnings(caplog)
    assert len(said) == 2, said
    assert sum("ignoring parameter 'normalize'" in s for s in said) == 1
    assert sum("ignoring parameter 'int8_mask'" in s for s in said) == 1
    assert all("mergekit-evolve" in s for s in said)
    params.once.new_merge()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        check_parameter_names(config(**body))
    assert len(_warnings(caplog)) == 4


def test_a_tool_name_does_not_hide_an_unknown_one_after_it():
    body = dict(parameters={"normalize": True, "densty": 0.5}, models=models(("org/a", None)))
    with pytest.raises(CabsConfigError, match=r"unknown parameter 'densty'"):
        check_parameter_names(config(**body))


# --- found by these tables, fixed in params.py ----------------------------------

@pytest.mark.parametrize("name", ["weight", "lambda"])
def test_an_integer_too_large_for_a_float_is_refused_by_name(name):
    from pydantic import TypeAdapter

    spec = next(p for p in params.PARAMETERS if p.name == name)
    huge = TypeAdapter(spec.type).validate_python(10**400)  # coercion leaves it as it is
    assert huge == 10**400
    shared, model = (S(lam=huge), {}) if name == "lambda" else (S(), {"weight": huge})
    with pytest.raises(CabsConfigError, match=rf"'{name}' .*finite number"):
        resolve(shared, [("a", model)], None)


def test_balanced_false_quotas_that_round_past_a_small_tensor_are_said():
    """Densities 0.5 + 0.5 fit, but on 3 elements each rounds to 2 places: 4 > 3."""
    r = resolve(S(balanced=False), [("a", {"density": 0.5}), ("b", {"density": 0.5})], "tiny")
    assert r.kernel_quotas(3) == ([2, 2], 3)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger(LOGGER).addHandler(handler)
    try:
        params.warn_short_block_overlap(r, 3, "tiny")
        params.warn_short_block_overlap(r, 4, "even")  # 2 + 2 = 4: fits, nothing said
    finally:
        logging.getLogger(LOGGER).removeHandler(handler)
    said = [rec.getMessage() for rec in records]
    assert len(said) == 1
    assert said[0].startswith("cabs: in tensor 'tiny' of 3 elements the rounded quotas [2, 2] add up to more than 3")
