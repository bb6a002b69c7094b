"""The shipped example configs merge as documented, and `mergekit-cabs demo` works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tiny_models import assert_matches, expected_cabs

EXAMPLES = Path(__file__).resolve().parent.parent / "example_configs"
BIN = Path(sys.executable).parent


def _merge(config: dict, out: Path) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True))
    return load_file(str(out / "model.safetensors"))


def _point_at(config: dict, base, tunes) -> dict:
    """The example with its model names replaced by local tiny models, in order."""
    config = dict(config, base_model=str(base.path))
    assert len(config["models"]) == len(tunes)
    config["models"] = [dict(entry, model=str(t.path)) for entry, t in zip(config["models"], tunes)]
    return config


def test_paper_recipe_is_the_paper_setting():
    config = yaml.safe_load((EXAMPLES / "cabs-mistral-7b-paper.yml").read_text())
    assert config["merge_method"] == "cabs"
    assert config["dtype"] == "float16"
    assert config["parameters"]["block_size"] == 256
    assert [m["parameters"] for m in config["models"]] == [{"weight": 1.2, "n": 64}] * 2


def test_paper_recipe_merges_as_specified(bf16_family, tmp_path):
    base, tunes = bf16_family
    config = yaml.safe_load((EXAMPLES / "cabs-mistral-7b-paper.yml").read_text())
    merged = _merge(_point_at(config, base, tunes[:2]), tmp_path / "out")
    assert set(merged) == set(base.state)
    for name, tensor in merged.items():
        assert tensor.dtype == torch.float16, name
        want = expected_cabs(
            base.state[name].to(torch.float16),
            [t.state[name].to(torch.float16) for t in tunes[:2]],
            weights=[1.2, 1.2], ns=[64, 64], block_size=256,
        )
        assert_matches(tensor, want, name)


def test_three_model_example_merges_with_its_filters(bf16_family, tmp_path):
    base, tunes = bf16_family
    config = yaml.safe_load((EXAMPLES / "cabs-three-models.yml").read_text())
    merged = _merge(_point_at(config, base, tunes), tmp_path / "out")
    assert set(merged) == set(base.state)
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16, name
        chat_weight = 0.7 if "self_attn" in name else 0.8
        want = expected_cabs(
            base.state[name], [t.state[name] for t in tunes],
            weights=[1.0, 0.9, chat_weight], densities=[0.25, None, 0.375], ns=[None, 64, None],
            block_size=256,
        )
        assert_matches(tensor, want, name)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo, run from the directory above its own (as `mergekit-cabs demo` from a project's root)."""
    directory = tmp_path_factory.mktemp("demo") / "run"
    result = subprocess.run(
        [str(BIN / "mergekit-cabs"), "demo", "run"],
        capture_output=True, text=True, timeout=600, cwd=directory.parent,
    )
    return directory, result


def test_demo_builds_merges_and_reports(demo_run):
    directory, result = demo_run
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"The merged model is in {directory / 'merged'}" in out
    assert "places changed by two or more models: 0" in out
    assert "largest difference from base + sum of weighted pruned task vectors: 0.00e+00" in out
    assert "finite: True" in out
    merged = directory / "merged"
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert "CABS" in (merged / "README.md").read_text()
    assert yaml.safe_load((directory / "cabs.yml").read_text())["merge_method"] == "cabs"
    assert sorted(p.name for p in directory.glob("*.txt")) == ["chat.txt", "code.txt", "math.txt"]
    assert sorted(p.name for p in directory.glob("*.jsonl")) == ["chat.jsonl", "math-choice.jsonl"]


def _printed(result, command: str, which: int = 0) -> list[str]:
    """The command line the demo printed that starts with `command` (the
    first, or the `which`-th), split as a shell would."""
    import shlex

    lines = [x.strip() for x in result.stdout.splitlines() if x.strip().startswith(command + " ")]
    return shlex.split(lines[which])


def test_demo_answers_render_as_the_chat_text_and_the_right_choice_is_the_next_term(demo_run):
    import json

    from transformers import AutoTokenizer

    directory, result = demo_run
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(directory / "base")
    for line in (directory / "chat.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert text == "".join(f"{'user' if m['role'] == 'user' else 'bot'} : {m['content']} " for m in messages)
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]
    rows = [json.loads(x) for x in (directory / "math-choice.jsonl").read_text().splitlines()]
    assert len(rows) == 64
    for row in rows:
        terms = [int(t) for t in row["question"].split(":")[1].split()]
        step = terms[1] - terms[0]
        assert len(row["choices"]) == len(set(row["choices"])) == 4
        assert int(row["choices"][row["answer"]]) == terms[-1] + step


def test_demo_texts_encode_without_unknown_words_and_each_fine_tune_beats_the_base_on_its_own(demo_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, result = demo_run
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(directory / "base")
    models = {name: AutoModelForCausalLM.from_pretrained(directory / name).eval()
              for name in ("base", "math", "code", "chat")}
    for name in ("math", "code", "chat"):
        ids = tokenizer((directory / f"{name}.txt").read_text(), add_special_tokens=False)["input_ids"]
        assert len(ids) >= 32 * 128 and tokenizer.unk_token_id not in ids, name
        windows = torch.tensor(ids[: 32 * 128]).view(32, 128)
        with torch.no_grad():
            loss = {k: float(m(input_ids=windows, labels=windows).loss) for k, m in models.items()}
        assert loss[name] < loss["base"] - 0.2, (name, loss)  # float32 mean next-token loss
        assert loss[name] == min(loss.values()), (name, loss)


def test_demo_training_is_deterministic_per_seed():
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergekit_cabs.demo import train

    states = []
    for _ in range(2):
        torch.manual_seed(3)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1))
        train(model, [torch.arange(200) % 37 + 3], steps=3, lr=1e-3, seed=5)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_the_demos_printed_analyze_tune_and_merge_commands_run_to_the_end(demo_run):
    """The README's path: demo -> analyze -> tune -> mergekit-yaml tuned.yml,
    each command exactly as the demo printed it, from where the demo ran."""
    directory, result = demo_run
    assert result.returncode == 0, result.stderr[-3000:]
    cwd = directory.parent
    for command in ("mergekit-cabs analyze", "mergekit-cabs tune", "mergekit-yaml"):
        args = _printed(result, command)
        run = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=900, cwd=cwd)
        assert run.returncode == 0, (command, run.stdout[-2000:], run.stderr[-3000:])
        if command == "mergekit-cabs tune":
            assert args[2:] == ["run/cabs.yml", "--data", "math=run/math.txt", "--data", "code=run/code.txt", "--data",
                                "chat=run/chat.txt", "--out", "run/tune"]
            assert "Wrote tune.md" in run.stdout and "objective (gain)" in run.stdout
            report = yaml.safe_load((directory / "tune" / "tune.json").read_text())
            assert report["best"]["heldout"]["score"] > 0  # the tuned merge beats the base on held-out text
    assert (directory / "merged-tuned" / "model.safetensors").is_file()


def test_mergekit_yaml_prints_nothing_on_stdout_and_on_stderr_progress_bars_and_the_torch_dtype_line(demo_run):
    """What Getting started says `mergekit-yaml` prints on the demo: nothing on
    stdout; on stderr, progress bars and transformers' `torch_dtype` line
    (mergekit's command: our commands hide that line, mergekit-yaml keeps it)."""
    import re

    directory, result = demo_run
    assert result.returncode == 0, result.stderr[-3000:]
    run = subprocess.run([str(BIN / "mergekit-yaml"), "run/cabs.yml", "run/merged-again"], capture_output=True,
                         text=True, timeout=900, cwd=directory.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == ""
    lines = {line.strip() for line in re.split(r"[\r\n]", run.stderr) if line.strip()}
    progress = re.compile(r"^[\w ]+: +\d+%\|")
    deprecated = "`torch_dtype` is deprecated! Use `dtype` instead!"  # with or without the logging prefix
    assert all(line.endswith(deprecated) for line in lines if not progress.match(line)), run.stderr[-3000:]
    assert any(progress.match(line) for line in lines)


def test_tune_on_the_demo_prints_the_same_numbers_with_omp_num_threads_1_as_with_the_default(demo_run):
    """The README's busy-machine tip (`OMP_NUM_THREADS=1` in front) changes
    the time, not the output: the same summary, times aside."""
    import os
    import re

    directory, result = demo_run
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = []
    for threads in (None, "1"):
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        if threads:
            env["OMP_NUM_THREADS"] = threads
        out = f"run/tune-threads-{threads or 'default'}"
        run = subprocess.run([str(BIN / "mergekit-cabs"), "tune", "run/cabs.yml", "--data", "math=run/math.txt",
                              "--data", "code=run/code.txt", "--data", "chat=run/chat.txt", "--budget", "8",
                              "--baselines", "none", "--quiet", "--out", out],
                             capture_output=True, text=True, timeout=900, cwd=directory.parent, env=env)
        assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
        outputs.append(re.sub(r"\d+(\.\d+)? ?(s|ms|min)\b", "N", run.stdout.replace(out, "OUT")))
    assert outputs[0] == outputs[1]


def test_the_demos_printed_tune_on_answers_runs_and_says_whether_it_beats_the_start(demo_run):
    """The second tune command: math as multiple choice, chat as conversations;
    the summary says in words whether held-out accuracy beat your config."""
    import json

    directory, result = demo_run
    assert result.returncode == 0, result.stderr[-3000:]
    args = _printed(result, "mergekit-cabs tune", 1)
    assert args[2:] == ["run/cabs.yml", "--data", "math=run/math-choice.jsonl", "--data", "code=run/code.txt",
                        "--data", "chat=run/chat.jsonl", "--out", "run/tune-answers"]
    run = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=900,
                         cwd=directory.parent)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
    report = json.loads((directory / "tune-answers" / "tune.json").read_text())
    assert {k: v["kind"] for k, v in report["data"].items()} == {"math": "choice", "code": "text", "chat": "chat"}
    was, now = (report[p]["heldout"]["measures"]["math"]["acc"] for p in ("start", "best"))
    verdict = "beats your config" if now > was else "does NOT beat your config"
    assert f"math: held-out accuracy {was:.4f} -> {now:.4f}: the tuned point {verdict}" in run.stdout
    assert "math (choice)" in run.stdout and "chat (chat)" in run.stdout and "response loss" in run.stdout


def test_demo_refuses_a_used_directory(demo_run):
    directory, first = demo_run
    assert first.returncode == 0
    again = subprocess.run(
        [str(BIN / "mergekit-cabs"), "demo", str(directory)],
        capture_output=True, text=True, timeout=120,
    )
    assert again.returncode != 0
    assert "is not empty" in again.stderr


def test_analyze_the_demo(demo_run, tmp_path):
    """`mergekit-cabs analyze` on the demo's config, through the console script."""
    import json

    directory, first = demo_run
    assert first.returncode == 0
    out = tmp_path / "analysis"
    result = subprocess.run(
        [str(BIN / "mergekit-cabs"), "analyze", str(directory / "cabs.yml"), "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Reading tensors" in result.stderr  # the progress bar
    report = json.loads((out / "report.json").read_text())
    s = report["summary"]
    assert (s["tensors"], s["weights"]) == (21, 269_280)
    assert [report["short_names"][m] for m in report["models"]] == ["math", "code", "chat"]
    for m in report["models"]:
        # 64 of every 256 (short blocks round to the same share) under every rule but dare's draw
        assert s["models"][m]["cabs"]["density"] == s["models"][m]["ties"]["density"] == 0.25
    # 64 + 64 + 64 <= 256: disjoint under cabs; magnitude and random keeps overlap
    assert s["shared"]["cabs"]["places"] == 0 and s["unavoidable_overlap_tensors"] == 0
    assert all(p["cabs"]["overlap"] == 0 and p["ties"]["overlap"] > 0.1 and p["dare"]["overlap"] > 0.1
               for p in s["pairs"])
    assert "kept by 2+ models: cabs 0.00%" in result.stdout
    for m in report["models"]:
        # the demo's rows (96 and 264 wide) are not whole blocks of 256: kept counts per row vary
        # under cabs too, while every full block of 256 holds its 64 (the balance cabs promises)
        r = s["models"][m]
        assert r["cabs"]["block_cv"] == 0 < r["dare"]["block_cv"] < r["ties"]["block_cv"]
        assert r["cabs"]["row_cv"] > 0
    files = {p.name for p in out.iterdir()}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert files == {"report.json", "report.md"}
        assert 'pip install ".[plot]" in a clone' in result.stdout
    else:
        assert files == {"report.json", "report.md", "overlap-by-layer.png", "kept-by-layer.png"}


def test_demo_check_fails_on_a_merged_tensor_that_is_not_the_cabs_merge(demo_run, tmp_path):
    """The demo's own check is a check: a merged model changed by one weight
    (another demo writing the same directory, say) stops the demo in one line."""
    import shutil

    from safetensors.torch import save_file

    from mergekit_cabs.demo import check_merge
    from mergekit_cabs.params import CabsError

    directory, result = demo_run
    assert result.returncode == 0, result.stderr[-3000:]
    merged = tmp_path / "merged"
    shutil.copytree(directory / "merged", merged)
    check_merge(directory / "cabs.yml", merged, lambda line: None)  # as written: passes
    (shard,) = sorted(merged.glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 0.5
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CabsError, match=r"^demo: the merged model in .* is not base \+ lambda"):
        check_merge(directory / "cabs.yml", merged, lambda line: None)


def test_demo_into_a_directory_it_cannot_create_is_one_line(tmp_path):
    """DIRECTORY under a file: one `Error:` line naming it, before any training, no traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    run = subprocess.run([str(BIN / "mergekit-cabs"), "demo", str(blocker / "demo")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    expected = f"Error: DIRECTORY {blocker / 'demo'} cannot be created: Not a directory"
    assert run.stderr.strip().splitlines() == [expected]


def test_demo_on_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """A write error while the demo trains or merges (ENOSPC) is one line with
    the file, not a traceback; the lock on DIRECTORY is released."""
    import errno

    from click.testing import CliRunner

    import mergekit_cabs.demo as demo_module
    from mergekit_cabs.cli import main

    target = tmp_path / "demo"

    def full(directory, seed, echo):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "base" / "model.safetensors"))

    monkeypatch.setattr(demo_module, "run_demo", full)
    result = CliRunner().invoke(main, ["demo", str(target)])
    assert result.exit_code == 1 and result.exception.__class__ is SystemExit
    assert result.output.strip().splitlines() == [
        f"Error: demo: could not write in {target}: No space left on device ({target / 'base' / 'model.safetensors'})"]
    assert not (target / ".mergekit-cabs.lock").exists()
