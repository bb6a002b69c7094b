"""The settings of `tune`: their defaults, their checks, and its error type."""

from __future__ import annotations

import math

from mergekit_cabs.params import CabsError

OBJECTIVES = ("gain", "loss")
OPTIMIZERS = ("auto", "coordinate", "cmaes", "gradient")
SCORE_DTYPES = ("merge", "float32")  # merge: the dtype mergekit-yaml writes
OUT_FILES = ("tuned.yml", "tune.md", "tune.png", "tune.json")
GENERAL = "general"  # the name of the --general data set
DEFAULTS = {
    "budget": 60,
    "weight_bounds": (0.0, 2.0),
    "lambda_bounds": (0.05, 2.0),
    "tolerance": 0.05,
    "window": 256,
    "max_windows": 64,
    "fit_fraction": 0.5,
    "batch_size": 4,
    "general_weight": 1.0,
    "optimizer": "auto",
    "seed": 0,
    "minibatch": 8,  # the gradient search: items per data set per step
    "learning_rate": 0.03,  # ... Adam's step, as a fraction of each number's range
    "line_evaluations": 10,  # ... most evaluations of its lambda line (your config, then lambda alone from 1)
    "score_dtype": "merge",
}
NO_TASKS_FOR_GAIN = ("--objective gain needs --data MODEL=FILE for every fine-tuned model (a gain per task); "
                     "with --general alone the objective is the general text's loss (--objective loss)")


class TuneError(CabsError):
    """Bad input to `tune`; the message names the thing at fault."""


def parse_bounds(text: str, what: str) -> tuple[float, float]:
    """LOW,HIGH as two finite numbers, LOW below HIGH; `what` names the option."""
    try:
        lo, hi = (float(v) for v in str(text).split(","))
    except ValueError:
        raise TuneError(f"{what} is {text!r}; give two numbers LOW,HIGH such as 0,2") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise TuneError(f"{what} is {text!r}; LOW must be below HIGH, both finite")
    return lo, hi


def search_settings(*, weight_bounds: str, lambda_bounds: str, general_weight: float, tolerance: float,
                    batch_size: int, cuda: bool) -> tuple[tuple[float, float], tuple[float, float], str]:
    """The command's search options, checked: (weight bounds, lambda bounds, device)."""
    bounds = parse_bounds(weight_bounds, "--weight-bounds"), parse_bounds(lambda_bounds, "--lambda-bounds")
    if not (math.isfinite(general_weight) and general_weight >= 0):
        raise TuneError(f"--general-weight is {general_weight}; give a finite number >= 0 (0: the general text "
                        "is scored, not optimised)")
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise TuneError(f"--tolerance is {tolerance}; give a number > 0")
    if batch_size < 1:
        raise TuneError(f"--batch-size is {batch_size}; give a whole number >= 1")
    device = "cpu"
    if cuda:
        import torch

        if not torch.cuda.is_available():
            raise TuneError("--cuda: torch sees no CUDA device here")
        device = "cuda"
    return bounds[0], bounds[1], device


def check_data_settings(*, budget: int, fit_fraction: float, max_windows: int) -> None:
    """The options `prepare` takes, checked before anything is read."""
    if budget < 1:
        raise TuneError(f"--budget is {budget}; it must be >= 1 (evaluations of the merged model)")
    if not 0 < fit_fraction < 1:
        raise TuneError(f"--fit-fraction is {fit_fraction}; it must be between 0 and 1 (the rest is held out)")
    if max_windows < 1:
        raise TuneError(f"--max-windows is {max_windows}; it must be >= 1")


def implied_objective(objective: str | None, has_data: bool) -> str:
    """The objective: as given, else "gain" with --data and "loss" with
    --general alone (there is no task to gain on)."""
    if objective is None:
        return "gain" if has_data else "loss"
    if objective not in OBJECTIVES:
        raise TuneError(f"--objective is {objective!r}; choose {' or '.join(OBJECTIVES)}")
    if objective == "gain" and not has_data:
        raise TuneError(NO_TASKS_FOR_GAIN)
    return objective


def check_optimizer(optimizer: str, seed: int) -> None:
    """--optimizer is one of OPTIMIZERS and --seed a whole number >= 0."""
    if optimizer not in OPTIMIZERS:
        raise TuneError(f"--optimizer is {optimizer!r}; choose {', '.join(OPTIMIZERS)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TuneError(f"--seed is {seed!r}; it must be a whole number >= 0")


def check_device_settings(*, device: str, score_dtype: str, store_on_device: bool) -> None:
    """Where the store lives and the dtype models are scored in, checked."""
    if score_dtype not in SCORE_DTYPES:
        raise TuneError(f"--score-dtype is {score_dtype!r}; it must be one of {', '.join(SCORE_DTYPES)}")
    if store_on_device and device == "cpu":
        raise TuneError("--store-on-device needs --cuda (on the CPU the store is always in host memory)")


ONE_LAMBDA = ("task_arithmetic", "ties", "dare_ties")


TUNED = "task_arithmetic_tuned"


FILES = {TUNED: "task_arithmetic_tuned.yml", **{name: f"{name}.yml" for name in ONE_LAMBDA}}


BASELINE_FILES = tuple(FILES.values())


LABELS = {TUNED: "task_arithmetic (tuned)", **{name: name for name in ONE_LAMBDA}}
