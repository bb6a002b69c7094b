"""Write every sample output and figure the docs show, from the demo.

    python docs/generate.py            # rewrite docs/samples/*.txt and the PNGs in docs/
    python docs/generate.py --check    # regenerate into a temporary directory, compare, exit 1 on a difference

It runs, in a new temporary directory and exactly as the docs print them,
`mergekit-cabs demo`, then check on the demo, analyze, tune and the merge of
tune's result as the demo prints them, tune with layer groups, tune on the
demo's answers as it prints it and with math weighed 3 times, tune with
an lm-eval task it writes over the demo's math questions, tune searching
densities and orders, and tune by the gradient search with a weight per
tensor (see
`commands_after_demo`; the lm-eval run needs the `lm-eval` extra). Each command's standard output (not the progress
bars on stderr) goes to
`docs/samples/NAME.txt`, its first line the command itself (`$ ...`), so a
page that includes a sample shows the command that produced it. The
temporary directory's path is written as `/home/me/project`, and anything
that varies with the machine's speed (times) is masked. The figures of
`FIGURES` are copied into docs/ (not compared by --check: PNG bytes vary with
matplotlib's version), and so are the benchmark figures of `COPIES`.

It also writes `docs/samples/environment.json`: the torch (version and
build) and the CPU kind the samples were made with. `--check` compares
every number (`differences`, exact) where it runs in that environment, and
elsewhere the words only, with the outcomes that a number decides (a
verdict, a flag, the chosen row) counted as the same: another CPU kind or
torch build rounds floats differently in their last bits, and the demo's
searches and its 32-question accuracies turn such bits into other points
and other verdicts (see tests/test_docs_samples.py).

The console scripts are the ones beside this Python (`sys.executable`), with
the repository first on PYTHONPATH, so the checkout's code is what runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SAMPLES = DOCS / "samples"
ENVIRONMENT = SAMPLES / "environment.json"  # what the committed samples were made with (`environment`)
BIN = Path(sys.executable).parent
HOME = "/home/me/project"  # what the temporary directory is shown as

DEMO = "mergekit-cabs demo"
CHECK = "mergekit-cabs check cabs-demo/cabs.yml"
GROUPS = "--layer-groups 2"  # the tune run with layer groups: the demo's tune command with this and an --out of its own
# density and order searched: the demo's tune command with these (60 evaluations shared by the settings)
SETTINGS = "--densities 0.1,0.25,0.5 --orders config,suggested --total-budget 60 --baselines none"
# the gradient search at the finest shape: the demo's tune command with these
GRADIENT = "--optimizer gradient --coefficients tensor"


def commands_after_demo(demo_output: str) -> dict[str, str]:
    """name -> command, as the docs show them and run from the demo's parent
    directory: check, then analyze, tune and the merge exactly as the demo
    printed them, and tune again with layer groups into an --out of its own
    (the first run's --out already holds files)."""
    printed = [line.strip() for line in demo_output.splitlines()]

    def the(prefix: str, suffix: str = "") -> str:
        found = [line for line in printed if line.startswith(prefix + " ") and line.endswith(suffix)]
        if len(found) != 1:
            raise CommandFailed(f"the demo printed {len(found)} lines starting with {prefix!r}"
                                + (f" and ending with {suffix!r}" if suffix else "") + ", not 1")
        return found[0]

    tune = the("mergekit-cabs tune", " --out cabs-demo/tune")
    answers = the("mergekit-cabs tune", " --out cabs-demo/tune-answers")
    if MATH_CHOICE not in answers:
        raise CommandFailed(f"the demo's answers command does not name {MATH_CHOICE}: {answers}")
    return {
        "check": CHECK,
        "analyze": the("mergekit-cabs analyze"),
        "tune": tune,
        "tune-groups": tune.replace(" --out cabs-demo/tune", f" {GROUPS} --out cabs-demo/tune-groups"),
        "merge": the("mergekit-yaml cabs-demo/tune/tuned.yml"),
        "tune-answers": answers,
        "tune-answers-weighted": answers.replace(MATH_CHOICE, MATH_CHOICE + "@3").replace(
            " --out cabs-demo/tune-answers", " --out cabs-demo/tune-answers-weighted"),
        "tune-lmeval": LMEVAL,
        "tune-settings": tune.replace(" --out cabs-demo/tune", f" {SETTINGS} --out cabs-demo/tune-settings"),
        "tune-gradient": tune.replace(" --out cabs-demo/tune", f" {GRADIENT} --out cabs-demo/tune-gradient"),
    }


# the demo's multiple-choice file as its answers command names it
MATH_CHOICE = "math=cabs-demo/math-choice.jsonl"
# an lm-eval task made of the demo's math questions (written by `write_task`)
# beside its text and chat data: the docs' lm-eval example
LMEVAL = ("mergekit-cabs tune cabs-demo/cabs.yml --data math=cabs-demo/math.txt --data code=cabs-demo/code.txt "
          "--data chat=cabs-demo/chat.jsonl --lm-eval demo_math --lm-eval-include tasks --budget 20 "
          "--out cabs-demo/tune-lmeval")
TASK_YAML = """\
task: demo_math
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def write_task(directory: Path) -> None:
    """tasks/demo_math.yaml: the lm-eval task of the docs, over the demo's math questions."""
    (directory / "tasks").mkdir(exist_ok=True)
    data = directory / "cabs-demo" / "math-choice.jsonl"
    (directory / "tasks" / "demo_math.yaml").write_text(TASK_YAML.format(data=data))


# file the commands wrote (relative to their directory) -> its name in docs/
FIGURES = {
    "cabs-demo/analysis/overlap-by-layer.png": "analyze-overlap.png",
    "cabs-demo/analysis/kept-by-layer.png": "analyze-kept.png",
    "cabs-demo/tune/tune.png": "tune.png",
}

# Figures of a benchmark run (too long to rerun here), copied so the site can show them:
# repository file -> its name in docs/ (--check compares the bytes)
COPIES = {
    "benchmarks/results/tune/tune_compare.png": "tune-compare.png",
    "benchmarks/results/tune/tune_compare_search.png": "tune-compare-search.png",
}

# Lines whose presence depends on the machine's state, not on the code (the
# numba kernel is compiled only where no cached copy exists).
_DROP = re.compile(r"compil\w* the CPU kernel", re.I)
# Durations: "10.3 s", "82.4 ms", "2 min".
_TIME = re.compile(r"\b\d+(?:\.\d+)?(?= ?(?:s|ms|min)\b)")


class CommandFailed(RuntimeError):
    pass


def environment() -> dict[str, str]:
    """What decides the samples' last bits besides the code: torch's version
    and build (`2.13.0+cpu`) and the CPU kind (LLVM's name for it, as `python
    -m numba -s` prints it), of this Python, whose console scripts run the
    commands."""
    import torch

    try:
        from llvmlite import binding
        cpu = binding.get_host_cpu_name()
    except ImportError:  # no numba (and so no llvmlite) here
        cpu = platform.processor() or "unknown"
    return {"torch": torch.__version__, "cpu": cpu, "machine": platform.machine()}


def recorded_environment() -> dict[str, str] | None:
    """The environment the committed samples were made in (None: not recorded)."""
    return json.loads(ENVIRONMENT.read_text()) if ENVIRONMENT.exists() else None


def mask(text: str, directory: Path) -> str:
    """`text` with the run's directory shown as HOME, times as 'N', machine-state lines dropped."""
    text = text.replace(str(directory), HOME)
    lines = [_TIME.sub("N", line).rstrip() for line in text.splitlines() if not _DROP.search(line)]
    return "\n".join(lines).strip("\n") + "\n"


def run(command: str, directory: Path) -> str:
    """`command`'s sample: the command line, then its masked standard output."""
    args = shlex.split(command)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")  # the lm-eval task is local: nothing to fetch
    print(f"$ {command}", file=sys.stderr, flush=True)
    result = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=directory, env=env,
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise CommandFailed(f"{command!r} failed ({result.returncode}):\n{result.stdout[-2000:]}"
                            f"\n{result.stderr[-3000:]}")
    return f"$ {command}\n" + mask(result.stdout, directory)


def run_all(directory: Path) -> dict[str, str]:
    """The demo, then `commands_after_demo`, in `directory`: name -> sample text."""
    samples = {"demo": run(DEMO, directory)}
    write_task(directory)
    for name, command in commands_after_demo(samples["demo"]).items():
        samples[name] = run(command, directory)
    return samples


def command_of(sample: str) -> str:
    """The command a sample shows (its first line, less the prompt)."""
    return sample.splitlines()[0].removeprefix("$ ")


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]?\d+)?%?")


def _value(token: str) -> float:
    return float(token.replace(",", "").rstrip("%"))


def _close(old: str, new: str) -> bool:
    """Two printed numbers agree: equal, or within 2 units of the last printed
    digit or 1% of the value, whichever is larger."""
    if old == new:
        return True
    a, b = _value(old), _value(new)
    relative = 0.01 * max(abs(a), abs(b))
    if "e" in old:  # 0.00e+00: the scale is in the exponent
        return abs(a - b) <= relative
    digits = len(old.rstrip("%").split(".")[1]) if "." in old else 0
    return abs(a - b) <= max(2 * 10.0 ** -digits, relative)


# Outcomes a number decides: where the samples' numbers are not compared
# (another environment), which of these a line shows is not a difference either.
# Each is (pattern, what it stands for); a new wording of one is still a
# difference (the pattern no longer matches it).
OUTCOMES = [
    # tune on answers: "math: held-out accuracy 0.4062 -> 0.4375: the tuned point beats your config"
    (re.compile(r"the tuned point (?:beats|does NOT beat) your config"), "the tuned point <beats or not> your config"),
    # a held-out measure's row flagged when the tuned point did worse than the config on it
    (re.compile(r" +WORSE than your config\b"), ""),
    # the row of the setting the density/order search chose
    (re.compile(r" +<- chosen\b"), ""),
    # the comparison's verdict (tune/compare.py's three forms, each naming what to merge)
    (re.compile(r"^\S.* (?:scores higher on the held-out data|has a lower held-out loss) than .* by .*: merge \S+$"
                r"|^\S.* is better than every baseline on the held-out data: .*; merge tuned\.yml$"
                r"|^\S.* are not distinguishable here \(.*\): these held-out \w+ do not tell them apart$"),
     "<which merge the held-out comparison favours>"),
    # analyze's order headline (analyze/report.py's three forms)
    (re.compile(r"^suggested order: .* \(planned: .*\): put \S+ first, it loses most by choosing later$"
                r"|^order: keep .*; it already puts first the model that loses most by choosing later$"
                r"|^order: makes little difference here \(the models lose about as much by choosing later\); keep .*$"),
     "<the order analyze advises>"),
]


_SIGNED = re.compile(r"\+?" + _NUMBER.pattern)  # "+0.0329" as one number


def _words(line: str, exact: bool) -> str:
    """`line` with its numbers as '#'; unless `exact`, with its OUTCOMES as
    what they stand for, signs in the numbers and runs of spaces as one (a
    number of another width moves the columns after it)."""
    if exact:
        return _NUMBER.sub("#", line)
    for pattern, stands_for in OUTCOMES:
        line = pattern.sub(stands_for, line)
    return " ".join(_SIGNED.sub("#", line).split())


def differences(old: str, new: str, exact: bool = True) -> list[str]:
    """Lines where `new` differs from `old` in its words, or (`exact`) in a
    number beyond `_close`. Not `exact`: the words only, numbers and the
    OUTCOMES they decide left out; a changed word, a missing or extra line
    or number is still a difference."""
    old_lines, new_lines = old.splitlines(), new.splitlines()
    if len(old_lines) != len(new_lines):
        return [f"{len(old_lines)} lines committed, {len(new_lines)} printed now"]
    out = []
    for i, (a, b) in enumerate(zip(old_lines, new_lines), 1):
        numbers_a, numbers_b = _NUMBER.findall(a), _NUMBER.findall(b)
        same_words = _words(a, exact) == _words(b, exact) and (not exact or len(numbers_a) == len(numbers_b))
        if not (same_words and (not exact or all(_close(x, y) for x, y in zip(numbers_a, numbers_b)))):
            out.append(f"line {i}:\n  committed: {a}\n  now:       {b}")
    return out


def exact_here() -> bool:
    """Whether to compare every number: this is the environment the samples were made in (or none is recorded)."""
    recorded = recorded_environment()
    return recorded is None or recorded == environment()


def check(samples: dict[str, str], exact: bool | None = None) -> list[str]:
    """What differs between the committed samples and `samples` (a missing or
    extra file included); numbers compared when `exact` (default: `exact_here`)."""
    exact = exact_here() if exact is None else exact
    problems = []
    committed = {p.stem for p in SAMPLES.glob("*.txt")}
    for name in sorted(committed - set(samples)):
        problems.append(f"docs/samples/{name}.txt: no command writes it any more")
    for name, text in samples.items():
        path = SAMPLES / f"{name}.txt"
        if not path.exists():
            problems.append(f"{path.relative_to(REPO)}: missing")
            continue
        problems += [f"{path.relative_to(REPO)}: {d}" for d in differences(path.read_text(), text, exact)]
    for source, target in COPIES.items():
        copy = DOCS / target
        if not copy.exists() or copy.read_bytes() != (REPO / source).read_bytes():
            problems.append(f"docs/{target}: not a copy of {source}")
    return problems


def write(samples: dict[str, str], directory: Path) -> None:
    SAMPLES.mkdir(exist_ok=True)
    for stale in SAMPLES.glob("*.txt"):
        if stale.stem not in samples:
            stale.unlink()
    for name, text in samples.items():
        (SAMPLES / f"{name}.txt").write_text(text)
    ENVIRONMENT.write_text(json.dumps(environment(), indent=2) + "\n")
    for source, target in FIGURES.items():
        shutil.copyfile(directory / source, DOCS / target)
    for source, target in COPIES.items():
        shutil.copyfile(REPO / source, DOCS / target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed samples instead of writing them; exit 1 on a difference")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cabs-docs-") as tmp:
        directory = Path(tmp)
        samples = run_all(directory)
        if options.check:
            exact = exact_here()
            if not exact:
                print(f"Made in {json.dumps(recorded_environment())}, checked in {json.dumps(environment())}: "
                      "comparing the words only (not the numbers, nor the outcomes they decide)")
            problems = check(samples, exact)
            for problem in problems:
                print(problem)
            if problems:
                print("The docs' samples are stale: run `python docs/generate.py` and commit what it writes.")
                return 1
            print(f"docs/samples: {len(samples)} samples as committed")
            return 0
        write(samples, directory)
    print(f"Wrote {len(samples)} samples to docs/samples and {len(FIGURES)} figures to docs/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
