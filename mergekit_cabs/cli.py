"""`mergekit-cabs`: the package's command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

SPECIALISTS = ("math", "code", "chat")

DEMO_CONFIG = """\
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


@click.group()
@click.version_option(package_name="mergekit-cabs")
def main() -> None:
    """CABS (Conflict-Aware and Balanced Sparsification) for mergekit."""


@main.command()
@click.argument("directory", default="cabs-demo", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed for the made-up weights.")
def demo(directory: Path, seed: int) -> None:
    """Merge a tiny made-up model family with cabs, end to end.

    Builds a tiny Llama base and three fine-tunes in DIRECTORY (default:
    ./cabs-demo; no network), writes a cabs YAML there, merges it with
    mergekit into DIRECTORY/merged, checks every merged tensor and loads the
    result with transformers."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_cabs  # noqa: F401  (registers cabs)

    directory = directory.resolve()
    out = directory / "merged"
    if out.exists() and any(out.iterdir()):
        raise click.ClickException(f"{out} is not empty; give another DIRECTORY or remove it")
    directory.mkdir(parents=True, exist_ok=True)

    click.echo(f"Building a tiny Llama base and {len(SPECIALISTS)} fine-tunes in {directory}")
    paths = _build_demo_models(directory, seed)
    config_path = directory / "cabs.yml"
    config_path.write_text(DEMO_CONFIG.format(**{k: str(v) for k, v in paths.items()}))
    click.echo(f"Wrote {config_path}")

    click.echo("Merging with mergekit (merge_method: cabs)")
    config = MergeConfiguration.model_validate(yaml.safe_load(config_path.read_text()))
    run_merge(config, str(out), MergeOptions(copy_tokenizer=True, quiet=False))

    _report(paths, out, click.echo)
    click.echo(f"\nThe merged model is in {out}")
    click.echo(f"The same merge with mergekit's own command:  mergekit-yaml {config_path} {directory / 'merged-again'}")


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", default="cabs-analysis", show_default=True,
              type=click.Path(path_type=Path), help="Directory for report.json, report.md and the plots.")
@click.option("--seed", default=0, show_default=True, help="Seed for the DARE-style random keep.")
@click.option("--force", is_flag=True,
              help="Write into a --out that already holds files (replaces earlier report files only).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def analyze(config: Path, out_dir: Path, seed: int, force: bool, quiet: bool) -> None:
    """Overlap and balance of the kept weights, before you merge.

    Reads CONFIG (the cabs YAML you would give mergekit-yaml), plans it with
    mergekit, reads the models a tensor at a time and compares the kept places
    of cabs with magnitude top-k (TIES-style) and random keep (DARE-style) at
    the same densities. Prints a short table; writes report.json, report.md
    and PNG plots (with matplotlib) to --out."""
    from mergekit_cabs import analyze as an

    try:
        merge_config = an.load_config(config)
        an.check_out_dir(out_dir, force)
        an.check_models(merge_config)
        report = an.analyze(merge_config, seed=seed, progress=not quiet)
        written, plotted = an.write_report(report, out_dir)
    except an.AnalyzeError as error:
        raise click.ClickException(str(error)) from None
    click.echo(an.format_table(report))
    click.echo(f"\nWrote {', '.join(written)} to {out_dir}")
    if not plotted:
        click.echo(f"No plots: {an.PLOTS_HINT}")


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data", "data", multiple=True, required=True, metavar="MODEL=FILE",
              help="A fine-tuned model (as the YAML names it, or its directory's name) and a text or JSONL "
                   "(a 'text' field per line) file of its task. Once per fine-tuned model.")
@click.option("--general", type=click.Path(path_type=Path), default=None,
              help="A text or JSONL file of general text, scored too and counted in the objective.")
@click.option("--general-weight", default=1.0, show_default=True,
              help="Weight of the general set in the objective.")
@click.option("--objective", type=click.Choice(["gain", "loss"]), default="gain", show_default=True,
              help="gain: mean normalized gain over tasks; loss: mean loss.")
@click.option("--out", "out_dir", default="cabs-tune", show_default=True, type=click.Path(path_type=Path),
              help="Directory for tuned.yml, tune.json, tune.md and tune.png.")
@click.option("--budget", default=60, show_default=True, help="Most merged-model evaluations the search may spend.")
@click.option("--weight-bounds", default="0,2", show_default=True, metavar="LOW,HIGH", help="Range of each weight.")
@click.option("--lambda-bounds", default="0.25,2", show_default=True, metavar="LOW,HIGH", help="Range of lambda.")
@click.option("--tolerance", default=0.05, show_default=True, help="Stop when every step is below this.")
@click.option("--window", default=None, type=int,
              help="Tokens per scored window [default: 256, or the base's max_position_embeddings if smaller].")
@click.option("--max-windows", default=64, show_default=True, help="Most windows per file and split.")
@click.option("--fit-fraction", default=0.5, show_default=True,
              help="Share of each file's windows to fit on, spread evenly along the file; the rest is held out.")
@click.option("--batch-size", default=8, show_default=True, help="Windows per forward pass.")
@click.option("--cuda", is_flag=True, help="Compute masks, merges and scores on the GPU.")
@click.option("--force", is_flag=True, help="Write into a --out that already holds files.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def tune(config: Path, data, general, general_weight, objective, out_dir, budget, weight_bounds, lambda_bounds,
         tolerance, window, max_windows, fit_fraction, batch_size, cuda, force, quiet) -> None:
    """Pick each model's weight and lambda from your own data.

    Plans CONFIG (your cabs YAML) with mergekit, computes every mask once, and
    holds the pruned task vectors in memory, so a new weight vector costs one
    pass over the parameters instead of a merge. A coordinate-wise search
    maximises the mean normalized gain over the models' tasks on half of
    each --data file's windows (every other one); the other half is held out
    and reported. Writes
    tuned.yml (CONFIG with the chosen numbers), tune.json, tune.md and
    tune.png to --out."""
    import math

    from mergekit_cabs import tune as tn
    from mergekit_cabs.analyze import check_out_dir

    try:
        bounds = tn._parse_bounds(weight_bounds, "--weight-bounds"), tn._parse_bounds(lambda_bounds, "--lambda-bounds")
        if not (math.isfinite(general_weight) and tolerance > 0 and batch_size >= 1):
            raise tn.TuneError("--general-weight must be finite, --tolerance > 0 and --batch-size >= 1")
        device = "cpu"
        if cuda:
            import torch

            if not torch.cuda.is_available():
                raise tn.TuneError("--cuda: torch sees no CUDA device here")
            device = "cuda"
        check_out_dir(out_dir, force, tn.OUT_FILES, tn.TuneError)
        prep = tn.prepare(config, data, general=general, window=window, fit_fraction=fit_fraction,
                          max_windows=max_windows, budget=budget)
        report = tn.run_tune(prep, device=device, objective=objective, general_weight=general_weight,
                             budget=budget, weight_bounds=bounds[0], lambda_bounds=bounds[1],
                             tolerance=tolerance, batch_size=batch_size, quiet=quiet)
        written = tn.write_outputs(report, out_dir)
    except tn.TuneError as error:
        raise click.ClickException(str(error)) from None
    click.echo(tn.format_summary(report))
    click.echo(f"\nWrote {', '.join(written)} to {out_dir}")
    click.echo(f"Merge it:  mergekit-yaml {out_dir / 'tuned.yml'} OUTPUT_DIR")


def _build_demo_models(directory: Path, seed: int) -> dict:
    """A random tiny Llama base (with a word-level tokenizer) and fine-tunes
    that add a different random task vector each; all saved as safetensors."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(317)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=96, intermediate_size=264, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config)
    paths = {"base": directory / "base"}
    base.save_pretrained(paths["base"], safe_serialization=True)
    fast.save_pretrained(paths["base"])
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    for i, name in enumerate(SPECIALISTS):
        generator = torch.Generator().manual_seed(seed * 100 + i + 1)
        with torch.no_grad():
            for key, param in base.state_dict().items():
                noise = torch.randn(param.shape, generator=generator) * 0.02 * (1 + i)
                param.copy_(base_state[key] + noise)
        paths[name] = directory / name
        base.save_pretrained(paths[name], safe_serialization=True)
        fast.save_pretrained(paths[name])
    return paths


def _report(paths: dict, out: Path, echo) -> None:
    """Check the merged tensors against the kernel's masks and print a summary."""
    import torch
    from safetensors import safe_open

    from mergekit_cabs.kernel import cabs_masks

    def load(path: Path) -> dict:
        tensors = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not iterable)
        return tensors

    base, merged = load(paths["base"]), load(out)
    finetunes = [load(paths[name]) for name in SPECIALISTS]
    kept = [0] * len(SPECIALISTS)
    shared = total = 0
    worst = 0.0
    for key, w_base in base.items():
        models = [ft[key] for ft in finetunes]
        masks = cabs_masks(w_base, models, [64, 64, 64], 256)
        count = torch.stack(masks).sum(0)
        shared += int((count > 1).sum())
        total += w_base.numel()
        for i, mask in enumerate(masks):
            kept[i] += int(mask.sum())
        weights = (1.0, 0.8, 0.6)
        expected = w_base + sum(w * torch.where(m, t - w_base, 0) for w, m, t in zip(weights, masks, models))
        worst = max(worst, float((merged[key].float() - expected).abs().max()))
    echo(f"\nMerged {len(merged)} tensors, {total:,} weights")
    for name, k in zip(SPECIALISTS, kept):
        echo(f"  {name:5s} kept {k:>9,} weights ({k / total:.1%} of each tensor, 64 of every 256)")
    echo(f"  places kept by two or more models: {shared} (64+64+64 <= 256: disjoint)")
    echo(f"  largest difference from base + sum of weighted pruned task vectors: {worst:.2e}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    echo(f"  transformers loads it: {sum(p.numel() for p in model.parameters()):,} parameters, "
         f"logits {tuple(logits.shape)}, finite: {bool(torch.isfinite(logits).all())}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
