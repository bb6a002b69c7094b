"""What one evaluation costs per kind of tune data: the seconds to score
the fit split of a text file (windows), a chat file (rows, response tokens),
a multiple-choice file (questions x choices), and the same questions as a
local lm-eval task (lm-eval's own run on the live model), on one model.

    python benchmarks/tune_kinds_cost.py --demo cabs-demo/run            # the demo's base and its files
    python benchmarks/tune_kinds_cost.py --shape 220m --items 8          # a random 220M Llama (tune_scale's shape)

Each kind is scored `--repeat` times after one warm-up; the median is
printed, with the items scored and the seconds per item.  lm-eval runs only
where it is installed.  Timings are wall seconds on this machine's CPU
(say its load beside them)."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch


def random_files(root: Path, items: int, seed: int = 0) -> dict[str, Path]:
    """Random-word files of each kind over the words w0..w999."""
    r = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(f"w{r.randrange(1000)}" for _ in range(n))

    files = {"text": root / "text.txt", "chat": root / "chat.jsonl", "choice": root / "choice.jsonl"}
    files["text"].write_text(words(2 * items * 256 + 10))
    files["chat"].write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": words(40)}, {"role": "assistant", "content": words(24)}]}) + "\n"
        for _ in range(2 * items)))
    files["choice"].write_text("".join(json.dumps({"question": words(20), "choices": [words(3) for _ in range(4)],
                                                   "answer": 0}) + "\n" for _ in range(2 * items)))
    return files


def lm_eval_task(root: Path, choice_file: Path) -> Path:
    """The multiple-choice file as a local lm-eval task `kinds_mc`."""
    import yaml

    (root / "tasks").mkdir(exist_ok=True)
    (root / "tasks" / "kinds_mc.yaml").write_text(yaml.safe_dump({
        "task": "kinds_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(choice_file)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    return root / "tasks"


def load_tasks(files: dict[str, Path], tokenizer, window: int, items: int, template) -> list:
    from mergekit_cabs.tune.chat import load_chat_task
    from mergekit_cabs.tune.choice import load_choice_task
    from mergekit_cabs.tune.text import load_task_data

    sizes = {"window": window, "fit_fraction": 0.5}
    tasks = [load_task_data("text", files["text"], tokenizer, max_windows=items, **sizes),
             load_chat_task("chat", files["chat"], "messages", tokenizer, template, max_rows=items, **sizes),
             load_choice_task("choice", files["choice"], tokenizer, None, max_rows=items, **sizes)]
    try:
        from mergekit_cabs.tune.lmeval import load_lm_eval_tasks

        include = lm_eval_task(files["choice"].parent, files["choice"])
        tasks += load_lm_eval_tasks(["kinds_mc"], tokenizer, include=include, limit=items, fit_fraction=0.5,
                                    taken=set())
    except Exception as error:  # noqa: BLE001 (lm-eval absent or failing: say so, time the rest)
        print(f"lm-eval not timed: {error}")
    return tasks


def random_model(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers = {"220m": (1024, 12), "60m": (512, 8)}[shape]
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "U:", "A:"] + [f"w{i}" for i in range(31995)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}{{ 'U: ' if m['role'] == 'user' else 'A: ' }}{{ m['content'] }} "
                          "{% endfor %}{% if add_generation_prompt %}A: {% endif %}")
    return fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, help="the demo's directory (cabs-demo/run)")
    parser.add_argument("--shape", choices=["220m", "60m"], help="a random Llama of this shape instead")
    parser.add_argument("--items", type=int, default=32, help="items per split (random data)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from mergekit_cabs.tune.chat import Template
    from mergekit_cabs.tune.references import load_model

    if args.demo:
        from transformers import AutoTokenizer

        model = load_model(str(args.demo / "base"), "cpu")
        tokenizer = AutoTokenizer.from_pretrained(args.demo / "base")
        files = {"text": args.demo / "chat.txt", "chat": args.demo / "chat.jsonl",
                 "choice": args.demo / "math-choice.jsonl"}
        root = Path(tempfile.mkdtemp())
        (root / "choice.jsonl").write_text((args.demo / "math-choice.jsonl").read_text())
        files["choice"] = root / "choice.jsonl"
        window, items, what = 128, 32, f"demo base ({args.demo})"
    else:
        model, tokenizer = random_model(args.shape), word_tokenizer()
        files = random_files(Path(tempfile.mkdtemp()), args.items)
        window, items, what = 256, args.items, f"random {args.shape} Llama, bfloat16"
    template = Template(tokenizer.chat_template, "the model's")
    tasks = load_tasks(files, tokenizer, window, items, template)
    print(f"{what}; torch threads {torch.get_num_threads()}; batch size {args.batch_size}")
    for task in tasks:
        task.score(model, "fit", args.batch_size)  # warm-up
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            task.score(model, "fit", args.batch_size)
            times.append(time.perf_counter() - started)
        seconds, count = statistics.median(times), task.count("fit")
        print(f"{task.kind:8s} {count:3d} items ({json.dumps(task.describe(), default=str)[:90]}): "
              f"{seconds:8.3f} s per evaluation, {1000 * seconds / count:8.1f} ms per item")


if __name__ == "__main__":
    main()
