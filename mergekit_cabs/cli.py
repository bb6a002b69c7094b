"""`mergekit-cabs`: the package's command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click


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
    from mergekit_cabs.demo import run_demo

    directory = directory.resolve()
    out = directory / "merged"
    if out.exists() and any(out.iterdir()):
        raise click.ClickException(f"{out} is not empty; give another DIRECTORY or remove it")
    config_path = run_demo(directory, seed, click.echo)
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
    from mergekit_cabs import planning
    from mergekit_cabs._output import PLOTS_HINT, check_out_dir
    from mergekit_cabs.params import CabsError

    try:
        merge_config = planning.load_config(config, "analyze")
        check_out_dir(out_dir, force, an.REPORT_FILES)
        planning.check_models(merge_config)
        report = an.analyze(merge_config, seed=seed, progress=not quiet)
        written, plotted = an.write_report(report, out_dir)
    except CabsError as error:
        raise click.ClickException(str(error)) from None
    click.echo(an.format_table(report))
    click.echo(f"\nWrote {', '.join(written)} to {out_dir}")
    if not plotted:
        click.echo(f"No plots: {PLOTS_HINT}")


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
@click.option("--cuda", is_flag=True,
              help="Score on the GPU; the weights are rebuilt there from the store in host memory "
                   "(the masks are computed on the host).")
@click.option("--score-dtype", type=click.Choice(["merge", "float32"]), default="merge", show_default=True,
              help="Dtype the models are scored in: merge (the dtype mergekit-yaml writes, as the merged model "
                   "is usually loaded) or float32 (2x the model's memory when the merge is 16-bit).")
@click.option("--store-on-device", is_flag=True,
              help="With --cuda: compute the masks on the GPU and keep the pruned task vectors there (faster; "
                   "about 5 more bytes per merged weight, and one tensor's merge, on the GPU) instead of "
                   "streaming them from host memory.")
@click.option("--force", is_flag=True, help="Write into a --out that already holds files.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def tune(config: Path, data, general, general_weight, objective, out_dir, budget, weight_bounds, lambda_bounds,
         tolerance, window, max_windows, fit_fraction, batch_size, cuda, score_dtype, store_on_device, force,
         quiet) -> None:
    """Pick each model's weight and lambda from your own data.

    Plans CONFIG (your cabs YAML) with mergekit, computes every mask once, and
    holds the pruned task vectors in memory, so a new weight vector costs one
    pass over the parameters instead of a merge. A coordinate-wise search
    maximises the mean normalized gain over the models' tasks on the fit
    share of each --data file's windows (--fit-fraction, spread along the
    file: every other window at 0.5); the rest is held out and reported.
    Writes tuned.yml (CONFIG with the chosen numbers), tune.json, tune.md and
    tune.png to --out."""
    from mergekit_cabs import tune as tn
    from mergekit_cabs._output import check_out_dir
    from mergekit_cabs.params import CabsError

    try:
        weight_range, lambda_range, device = tn.search_settings(
            weight_bounds=weight_bounds, lambda_bounds=lambda_bounds, general_weight=general_weight,
            tolerance=tolerance, batch_size=batch_size, cuda=cuda)
        tn.check_device_settings(device=device, score_dtype=score_dtype, store_on_device=store_on_device)
        check_out_dir(out_dir, force, tn.OUT_FILES, tn.TuneError)
        prep = tn.prepare(config, data, general=general, window=window, fit_fraction=fit_fraction,
                          max_windows=max_windows, budget=budget)
        report = tn.run_tune(prep, device=device, objective=objective, general_weight=general_weight,
                             budget=budget, weight_bounds=weight_range, lambda_bounds=lambda_range,
                             tolerance=tolerance, batch_size=batch_size, score_dtype=score_dtype,
                             store_on_device=store_on_device, quiet=quiet)
        written = tn.write_outputs(report, out_dir)
    except CabsError as error:
        raise click.ClickException(str(error)) from None
    click.echo(tn.format_summary(report))
    click.echo(f"\nWrote {', '.join(written)} to {out_dir}")
    click.echo(f"Merge it:  mergekit-yaml {out_dir / 'tuned.yml'} OUTPUT_DIR")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
