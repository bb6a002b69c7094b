"""The docs' sample outputs are what the code prints now, and the commands
README.md and docs/ show on the demo are the ones that produced them.

`docs/generate.py` runs the demo and then check, analyze and tune on it,
exactly as the pages print the commands; here it runs them again into a
temporary directory and compares with the committed docs/samples/*.txt.
Times are masked there. Every other number must match, within two units of
its last printed digit or 1% (whichever is larger): the demo trains in
float32 on one thread, so one machine prints the same digits every run, but
another CPU kind (another matrix kernel, another order of float sums) may
print other last digits. When this test fails, run `python docs/generate.py`
and commit what it writes.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from tiny_models import optional

REPO = Path(__file__).resolve().parent.parent


def _load_generate():
    spec = importlib.util.spec_from_file_location("docs_generate", REPO / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _load_generate()


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    optional("lm_eval", '".[lm-eval]"')  # one sample is a tune run on an lm-eval task
    return generate.run_all(tmp_path_factory.mktemp("docs-samples"))


def test_the_committed_samples_are_what_the_commands_print_now(samples):
    problems = generate.check(samples)
    assert not problems, "\n".join(problems) + "\nrun `python docs/generate.py` and commit what it writes"


def _shown_demo_commands(text: str) -> list[str]:
    """Command lines in fenced blocks that run on the demo (mergekit-cabs / mergekit-yaml on cabs-demo/)."""
    lines = []
    for block in re.findall(r"^\s*```[a-z]*\n(.*?)^\s*```", text, re.M | re.S):
        for line in block.splitlines():
            line = line.strip()
            if line.startswith(("mergekit-cabs ", "mergekit-yaml ")) and (
                    "cabs-demo/" in line or line == "mergekit-cabs demo"):
                lines.append(line)
    return lines


def test_every_demo_command_the_readme_and_docs_show_is_one_generate_ran(samples):
    ran = {generate.command_of(text) for text in samples.values()}
    readme = _shown_demo_commands((REPO / "README.md").read_text())
    assert set(readme) >= {generate.command_of(samples[name]) for name in ("demo", "analyze", "tune", "merge")}, (
        "README's demo block is not the demo's commands as it prints them now", readme)
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for line in _shown_demo_commands(page.read_text()):
            assert line in ran, f"{page.name} shows a command docs/generate.py did not run: {line}"


def test_the_layer_groups_run_has_an_out_of_its_own_and_the_demo_prints_the_rest(samples):
    demo = {line.strip() for line in samples["demo"].splitlines()}
    for name in ("analyze", "tune", "merge"):
        assert generate.command_of(samples[name]) in demo, name
    groups = generate.command_of(samples["tune-groups"])
    assert "--layer-groups 2 --out cabs-demo/tune-groups" in groups
    assert "layer groups (2 of consecutive decoder layers" in samples["tune-groups"]


def test_a_changed_word_or_a_number_off_by_more_than_the_tolerance_is_a_difference():
    old = "held-out 0.2546 -> 0.2952\nkept 67,320 weights (25.0%)\n"
    assert generate.differences(old, old) == []
    assert generate.differences(old, old.replace("held-out", "fit"))
    assert generate.differences(old, old.replace("0.2952", "0.2990"))  # 38 units of the last digit, 1.3%
    assert generate.differences(old, old.replace("67,320", "68,320"))  # 1.5%
    assert generate.differences(old, old + "one more line\n")
    assert generate.differences("0.00e+00", "1.00e-07")


def test_a_last_digit_within_two_units_is_not_a_difference():
    old = "held-out 0.2546 -> 0.2952, 71.0% / 62.1%"
    assert generate.differences(old, "held-out 0.2548 -> 0.2950, 71.1% / 62.0%") == []


def test_samples_show_the_directory_as_home_drop_machine_state_lines_and_mask_times(tmp_path):
    text = (f"The merged model is in {tmp_path}/cabs-demo/merged\n"
            "Compiling the CPU kernel once (cached)\n"
            "time: 5.9 s in all, setting the weights 6.7 ms, 2 min\n")
    assert generate.mask(text, tmp_path) == (
        "The merged model is in /home/me/project/cabs-demo/merged\n"
        "time: N s in all, setting the weights N ms, N min\n")


def _tuned_heldout(sample: str) -> float:
    """The tuned point's held-out objective from a tune sample's objective line."""
    line = next(x for x in sample.splitlines() if x.startswith("objective (gain):"))
    return float(re.search(r"held-out [-\d.]+ -> ([-\d.]+)", line).group(1))


def test_the_gradient_search_per_tensor_scores_at_least_the_coordinate_search_per_model_held_out(samples):
    """On the demo, as the docs show it: tune --optimizer gradient
    --coefficients tensor reaches at least the held-out objective of the
    default run (the coordinate search, one weight per model)."""
    gradient, default = samples["tune-gradient"], samples["tune"]
    assert "--optimizer gradient --coefficients tensor" in generate.command_of(gradient)
    assert "one weight per model for each of the 21 merged tensors" in gradient
    assert _tuned_heldout(gradient) >= _tuned_heldout(default)
