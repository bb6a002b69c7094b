"""`mergekit-cabs demo`: a tiny model family, merged with cabs end to end, and data to tune it on.

Builds a tiny Llama base and three fine-tunes, each trained for a few
seconds on the CPU on its own synthetic text ("math": arithmetic
progressions, "code": bracket and keyword lines, "chat": dialogue turns),
with a word-level tokenizer that encodes every word of those texts (and
carries a chat template that writes a conversation as the chat text does).
Writes a cabs YAML and one held-back text per fine-tune (math.txt, code.txt,
chat.txt, from draws no training step saw), and the same held-back draws as
answers: chat.jsonl (conversations, scored on the bot's turns) and
math-choice.jsonl (the next term of a progression among 4 choices); merges the YAML through
mergekit, checks every merged tensor against the kernel's masks with the
numbers the YAML gives, and loads the result.  No network; deterministic for
a seed on one machine (one thread, torch's deterministic algorithms).
"""

from __future__ import annotations

import os
import random
import shlex
from collections.abc import Callable
from pathlib import Path

import torch

from mergekit_cabs.params import CabsError

SPECIALISTS = ("math", "code", "chat")
VOCABULARY_SIZE = 320  # the tokenizer's words, padded with unused ones
TRAIN = {"window": 48, "batch": 16, "base_steps": 40, "base_lr": 3e-3, "steps": 40, "lr": 1e-3,
         "tokens": 20_000}
DATA_TOKENS = 32 * 128  # per data file: 32 windows of tune's default 128 here (16 fit, 16 held out)

CONFIG = """\
# CABS merge of three small fine-tunes made by `mergekit-cabs demo`.
# Priority order is the order of `models:`: math chooses first.
merge_method: cabs
base_model: {base}
models:
  - model: {math}
    parameters: {{weight: 1.0, density: 0.25}}
  - model: {code}
    parameters: {{weight: 0.8, n: 64}}
  - model: {chat}
    parameters: {{weight: 0.6, density: 0.25}}
parameters:
  block_size: 256
  overlap: fill
  conflict_aware: true
  balanced: true
  lambda: 1.0
dtype: float32
"""

# --- the synthetic texts --------------------------------------------------------------

NAMES, FUNCTIONS = ("x", "y", "z", "n", "i", "k"), ("f", "g", "h")
CODE = ("def {f} ( {v} ) : return {v} + {k}", "if ( {v} < {k} ) {{ {w} = {f} ( {v} ) ; }}",
        "for {v} in range ( {k} ) {{ print ( {v} ) ; }}", "while ( {v} > 0 ) {{ {v} = {v} - 1 ; }}")
CHAT = (("hello , how are you ?", "i am fine , thanks ."), ("what is your name ?", "my name is bot ."),
        ("do you like {x} ?", "yes , i like {x} too ."), ("how is the weather today ?", "it is {w} today ."),
        ("thanks !", "you are welcome ."), ("bye !", "see you later , have a nice day ."))
LIKES, WEATHER = ("tea", "coffee", "music", "books"), ("sunny", "rainy", "cold", "warm")
# The demo tokenizer's chat template: a conversation rendered exactly as the chat text is written.
CHAT_TEMPLATE = ("{% for m in messages %}{{ 'user : ' if m['role'] == 'user' else 'bot : ' }}{{ m['content'] }} "
                 "{% endfor %}{% if add_generation_prompt %}bot : {% endif %}")
ANSWER_ROWS = 64  # rows of chat.jsonl and questions of math-choice.jsonl: 32 fit, 32 held out


def math_line(r: random.Random) -> str:
    """An arithmetic progression: start + step : five terms ;"""
    step = r.randrange(1, 6)
    first = r.randrange(0, 31 - 4 * step)
    return f"{first} + {step} : " + " ".join(str(first + k * step) for k in range(5)) + " ;"


def code_line(r: random.Random) -> str:
    return r.choice(CODE).format(f=r.choice(FUNCTIONS), v=r.choice(NAMES), w=r.choice(NAMES), k=r.randrange(31))


def chat_turn(r: random.Random) -> tuple[str, str]:
    question, answer = r.choice(CHAT)
    x, w = r.choice(LIKES), r.choice(WEATHER)
    return question.format(x=x, w=w), answer.format(x=x, w=w)


def chat_line(r: random.Random) -> str:
    question, answer = chat_turn(r)
    return f"user : {question} bot : {answer}"


def chat_row(r: random.Random) -> dict:
    """A conversation of one or two exchanges, as chat messages."""
    messages = []
    for _ in range(r.randrange(1, 3)):
        question, answer = chat_turn(r)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def math_question(r: random.Random) -> dict:
    """Four terms of a progression; the choices: the next term and three others (0 to 30)."""
    step = r.randrange(1, 6)
    first = r.randrange(0, 31 - 4 * step)
    terms = [first + k * step for k in range(5)]
    wrong = {terms[4] + d for d in (-3, -2, -1, 1, 2, 3, step, -step)} - {terms[4]}  # near misses, 3 or more
    choices = [terms[4], *r.sample(sorted(v for v in wrong if 0 <= v <= 30), 3)]
    r.shuffle(choices)
    return {"question": f"{first} + {step} : " + " ".join(map(str, terms[:4])),
            "choices": [str(c) for c in choices], "answer": choices.index(terms[4])}


LINES = {"math": math_line, "code": code_line, "chat": chat_line}


def demo_text(name: str, seed: int, tokens: int) -> str:
    """Lines of `name`'s text, drawn with `seed`, until there are `tokens` words."""
    r, lines, count = random.Random(seed), [], 0
    while count < tokens:
        lines.append(LINES[name](r))
        count += len(lines[-1].split())
    return "\n".join(lines) + "\n"


def vocabulary() -> list[str]:
    """Every word the texts use (numbers 0 to 30 and the templates' words), padded."""
    text = " ".join([*map(str, range(31)), *NAMES, *FUNCTIONS, *CODE, *(q + " " + a for q, a in CHAT), *LIKES,
                     *WEATHER, "user : bot + ; { } = - 1"]).replace("{{", "{").replace("}}", "}")
    words = sorted({w for w in text.split() if not (w.startswith("{") and len(w) > 1)})
    words = ["<unk>", "<s>", "</s>"] + words
    return words + [f"w{i}" for i in range(VOCABULARY_SIZE - len(words))]


# --- the models ------------------------------------------------------------------------


def train(model, streams: list[torch.Tensor], steps: int, lr: float, seed: int) -> None:
    """`steps` of AdamW on random windows of the token streams (one thread,
    torch's deterministic algorithms: the same seed gives the same weights)."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread, and alike everywhere
    torch.use_deterministic_algorithms(True)
    try:
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        model.train()
        size, batch = TRAIN["window"], TRAIN["batch"]
        for _ in range(steps):
            rows = []
            for which in torch.randint(len(streams), (batch,), generator=generator).tolist():
                at = int(torch.randint(len(streams[which]) - size, (1,), generator=generator))
                rows.append(streams[which][at:at + size])
            x = torch.stack(rows)
            model(input_ids=x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def build_models(directory: Path, seed: int) -> dict[str, Path]:
    """The base (trained a little on all three texts) and the fine-tunes
    (each trained from it on its own text), saved as safetensors with the
    tokenizer; {name: path}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = vocabulary()
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=96, intermediate_size=264, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    streams = [torch.tensor(tokenizer.encode(demo_text(name, seed * 100 + i, TRAIN["tokens"])).ids)
               for i, name in enumerate(SPECIALISTS)]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    train(model, streams, TRAIN["base_steps"], TRAIN["base_lr"], seed)
    paths = {"base": directory / "base"}
    model.save_pretrained(paths["base"], safe_serialization=True)
    fast.save_pretrained(paths["base"])
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, name in enumerate(SPECIALISTS):
        model.load_state_dict(base_state)
        train(model, [streams[i]], TRAIN["steps"], TRAIN["lr"], seed * 100 + i + 1)
        paths[name] = directory / name
        model.save_pretrained(paths[name], safe_serialization=True)
        fast.save_pretrained(paths[name])
    return paths


def write_data(directory: Path, seed: int) -> dict[str, Path]:
    """NAME.txt beside the YAML for each fine-tune: its own text, drawn with
    seeds no training step used (held-back text for `tune`); {name: path}."""
    paths = {}
    for i, name in enumerate(SPECIALISTS):
        paths[name] = directory / f"{name}.txt"
        paths[name].write_text(demo_text(name, seed * 100 + 50 + i, DATA_TOKENS), encoding="utf-8")
    return paths


def write_answers(directory: Path, seed: int) -> dict[str, Path]:
    """chat.jsonl (conversations) and math-choice.jsonl (multiple choice),
    drawn with seeds no training step used; {name: path}."""
    import json

    makers = {"math": ("math-choice.jsonl", math_question), "chat": ("chat.jsonl", chat_row)}
    paths = {}
    for name, (file, make) in makers.items():
        r = random.Random(seed * 100 + 70 + SPECIALISTS.index(name))
        paths[name] = directory / file
        paths[name].write_text("".join(json.dumps(make(r)) + "\n" for _ in range(ANSWER_ROWS)), encoding="utf-8")
    return paths


def write_config(directory: Path, paths: dict[str, Path]) -> Path:
    """cabs.yml for the demo models."""
    path = directory / "cabs.yml"
    path.write_text(CONFIG.format(**{k: str(v) for k, v in paths.items()}), encoding="utf-8")
    return path


def _settings(config_path: Path):
    """(resolved cabs parameters, fine-tune paths, base path) as the YAML gives them."""
    from mergekit_cabs.params import PARAMETERS, resolve
    from mergekit_cabs.planning import read_yaml

    raw = read_yaml(config_path)
    shared = {p.name: p.default for p in PARAMETERS if p.shared}
    shared.update(raw.get("parameters") or {})
    per_model = [(str(m["model"]), m.get("parameters") or {}) for m in raw["models"]]
    return resolve(shared, per_model, None), [Path(label) for label, _ in per_model], Path(raw["base_model"])


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not iterable)
    return tensors


# The check recomputes the merge in float32 in the kernel's order; a difference
# beyond float32 rounding of the demo's weights means the merge is not CABS's.
CHECK_TOLERANCE = 1e-5


def check_merge(config_path: Path, out: Path, echo: Callable[[str], None]) -> None:
    """Check the merged tensors against the kernel's masks with the YAML's
    numbers (weights, n per block, lambda) and print a summary."""
    from mergekit_cabs.kernel import cabs_masks

    r, model_paths, base_path = _settings(config_path)
    base, merged = _load(base_path), _load(out)
    finetunes = [_load(p) for p in model_paths]
    kept, shared, total, worst = [0] * len(finetunes), 0, 0, 0.0
    for key, w_base in base.items():
        models = [ft[key] for ft in finetunes]
        masks = cabs_masks(w_base, models, list(r.n), r.block_size, overlap=r.overlap,
                           conflict_aware=r.conflict_aware)
        changed = [m & (t != w_base) for m, t in zip(masks, models)]  # a kept zero changes nothing
        shared += int((torch.stack(changed).sum(0) > 1).sum())
        total += w_base.numel()
        for i, mask in enumerate(masks):
            kept[i] += int(mask.sum())
        summed = sum(w * torch.where(m, t - w_base, 0) for w, m, t in zip(r.weights, masks, models))
        worst = max(worst, float((merged[key].float() - (w_base + r.lam * summed)).abs().max()))
    echo(f"\nMerged {len(merged)} tensors, {total:,} weights")
    for path, k, n in zip(model_paths, kept, r.n):
        echo(f"  {path.name:5s} kept {k:>9,} weights ({k / total:.1%} of each tensor, {n} of every {r.block_size})")
    fits = "disjoint" if sum(r.n) <= r.block_size else "overlap unavoidable"
    echo(f"  places changed by two or more models: {shared} "
         f"({'+'.join(map(str, r.n))} {'<=' if sum(r.n) <= r.block_size else '>'} {r.block_size}: {fits})")
    echo(f"  largest difference from base + sum of weighted pruned task vectors: {worst:.2e}")
    if not worst <= CHECK_TOLERANCE:  # NaN fails too
        raise CabsError(f"demo: the merged model in {out} is not base + lambda x the weighted pruned task vectors "
                        f"(largest difference {worst:.2e}); was another demo writing into the same directory?")


def check_loads(out: Path, echo: Callable[[str], None]) -> None:
    """Load the merged model with transformers and run it once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("user : hello , how are you ? bot :", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    echo(f"  transformers loads it: {sum(p.numel() for p in model.parameters()):,} parameters, "
         f"logits {tuple(logits.shape)}, finite: {bool(torch.isfinite(logits).all())}")


def shown(path: Path) -> str:
    """A path as a command line gives it: relative to the working directory
    when it lies inside it, quoted for a POSIX shell when it needs to be."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        relative = ".."
    return shlex.quote(path.as_posix() if relative.startswith("..") else Path(relative).as_posix())


def tune_command(config_path: Path, data: dict[str, Path], out: Path) -> str:
    return " ".join([f"mergekit-cabs tune {shown(config_path)}",
                     *(f"--data {name}={shown(path)}" for name, path in data.items()), f"--out {shown(out)}"])


def next_steps(directory: Path, config_path: Path, data: dict[str, Path]) -> list[str]:
    """The commands that go on from the demo: analyze, tune (on the data
    files beside the YAML), and mergekit-yaml on what tune writes."""
    out = directory / "tune"
    return [
        f"mergekit-cabs analyze {shown(config_path)} --out {shown(directory / 'analysis')}",
        tune_command(config_path, data, out),
        f"mergekit-yaml {shown(out / 'tuned.yml')} {shown(directory / 'merged-tuned')}",
    ]


def answers_step(directory: Path, config_path: Path, data: dict[str, Path]) -> str:
    """tune on answers: math as multiple choice, chat as conversations (code stays text)."""
    answers = {**data, **{k: directory / f for k, f in (("math", "math-choice.jsonl"), ("chat", "chat.jsonl"))}}
    return tune_command(config_path, answers, directory / "tune-answers")


def run_demo(directory: Path, seed: int, echo: Callable[[str], None]) -> tuple[Path, dict[str, Path]]:
    """Build and train, write the YAML and the data, merge with mergekit,
    check; returns the config's path and the data files by model."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_cabs  # noqa: F401  (registers cabs)
    from mergekit_cabs.planning import read_yaml

    out = directory / "merged"
    directory.mkdir(parents=True, exist_ok=True)
    echo(f"Training a tiny Llama base and {len(SPECIALISTS)} fine-tunes ({', '.join(SPECIALISTS)}), "
         f"each on its own synthetic text, in {directory}")
    config_path = write_config(directory, build_models(directory, seed))
    data = write_data(directory, seed)
    answers = write_answers(directory, seed)
    echo(f"Wrote {config_path} and {', '.join(p.name for p in data.values())} (held-back text of each fine-tune)")
    echo(f"Wrote {', '.join(p.name for p in answers.values())} (held-back answers: multiple choice, conversations)")
    echo("Merging with mergekit (merge_method: cabs)")
    config = MergeConfiguration.model_validate(read_yaml(config_path))
    run_merge(config, str(out), MergeOptions(copy_tokenizer=True, quiet=False))
    check_merge(config_path, out, echo)
    check_loads(out, echo)
    return config_path, data
