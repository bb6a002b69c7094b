"""`mergekit-cabs`: the package's command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

# transformers warns about this whenever mergekit sets a model config's
# `torch_dtype`; harmless, and nothing a user of our commands can change.
TORCH_DTYPE_LINE = "`torch_dtype` is deprecated"
TRANSFORMERS_CONFIG_LOGGER = "transformers.configuration_utils"


class _HideTorchDtype(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return TORCH_DTYPE_LINE not in str(record.msg)


@click.group()
@click.version_option(package_name="mergekit-cabs")
@click.pass_context
def main(ctx: click.Context) -> None:
    """CABS (Conflict-Aware and Balanced Sparsification) for mergekit."""
    # Only while one of our commands runs: mergekit-yaml keeps the line.
    hide = _HideTorchDtype()
    logger = logging.getLogger(TRANSFORMERS_CONFIG_LOGGER)
    logger.addFilter(hide)
    ctx.call_on_close(lambda: logger.removeFilter(hide))


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def check(config: Path) -> None:
    """Check a merge configuration without merging.

    Runs every check a merge of CONFIG (a mergekit YAML, or a mergekit-multi
    file: every stage) would run, without reading a tensor: the merge method's
    name, the YAML's form, the cabs parameter names and values on every
    planned tensor, the models (local directories), and that every model has
    each tensor the merge reads, in the base's shape (from the safetensors
    headers). Prints one line per problem and exits 1 if there is any."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # check reads local files only, never the hub
    from mergekit_cabs.check import check_file

    findings = check_file(config)
    for _, line in findings.lines:
        click.echo(line)
    click.echo(findings.summary(config))
    if findings.problems:
        sys.exit(1)


@main.command()
@click.argument("directory", default="cabs-demo", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed for the models' weights, their training and the texts.")
def demo(directory: Path, seed: int) -> None:
    """Merge a tiny model family with cabs, end to end, and get data to tune it.

    Trains a tiny Llama base and three fine-tunes (math, code, chat), each on
    its own synthetic text, in DIRECTORY (default: ./cabs-demo; no network,
    well under a minute on a CPU), writes a cabs YAML, one text file per
    fine-tune, and answers (chat.jsonl conversations, math-choice.jsonl
    multiple choice) there, merges the YAML with mergekit into DIRECTORY/merged,
    checks every merged tensor and loads the result with transformers. Then
    prints the analyze, tune and mergekit-yaml commands that go on from it,
    and a tune command on the answers."""
    from safetensors import SafetensorError  # what the demo's model writes raise on a full disk

    from mergekit_cabs._output import out_lock
    from mergekit_cabs.demo import answers_step, next_steps, run_demo, shown
    from mergekit_cabs.params import CabsError

    directory = directory.resolve()
    out = directory / "merged"
    if out.exists() and any(out.iterdir()):
        raise click.ClickException(f"{out} is not empty; give another DIRECTORY or remove it")
    try:
        with out_lock(directory, CabsError, "DIRECTORY"):  # a second demo into DIRECTORY refuses at start
            config_path, data = run_demo(directory, seed, click.echo)
    except CabsError as error:
        raise click.ClickException(str(error)) from None
    except (OSError, SafetensorError) as error:  # a full disk, a read-only directory: one line, not a traceback
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        raise click.ClickException(f"demo: could not write in {directory}: "
                                   f"{getattr(error, 'strerror', None) or error}{where}") from None
    click.echo(f"\nThe merged model is in {out}")
    click.echo(f"The same merge with mergekit's own command:  mergekit-yaml {shown(config_path)} "
               f"{shown(directory / 'merged-again')}")
    analyze, tune, merge = next_steps(directory, config_path, data)
    click.echo("\nNext: see how the kept weights overlap, pick the weights from the data, merge with them:")
    for line in (analyze, tune, merge):
        click.echo(f"  {line}")
    click.echo("\nOr tune on answers: math as multiple choice, chat's conversations scored on the bot's turns "
               "(docs/tune-data.md):")
    click.echo(f"  {answers_step(directory, config_path, data)}")


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
    from mergekit_cabs._output import PLOTS_HINT, check_out_dir, out_lock
    from mergekit_cabs.params import CabsError

    try:
        merge_config = planning.load_config(config, "analyze")
        with out_lock(out_dir):  # held to the end: a second run into --out refuses at start
            check_out_dir(out_dir, force, an.REPORT_FILES)
            planning.check_models(merge_config)
            report = an.analyze(merge_config, seed=seed, progress=not quiet, source=str(config))
            click.echo(an.format_table(report))  # before writing: a full disk loses no analysis
            written, plotted = an.write_report(report, out_dir)
    except CabsError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"\nWrote {', '.join(written)} to {out_dir}")
    if not plotted:
        click.echo(f"No plots: {PLOTS_HINT}")


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data", "data", multiple=True, metavar="MODEL=FILE[@W]",
              help="A fine-tuned model (as the YAML names it, or its directory's name) and a file of its task: "
                   "text, or JSONL with one example per line, of one kind ({\"text\"}, {\"prompt\", \"response\"}, "
                   "{\"messages\"} or {\"question\", \"choices\", \"answer\"}; see docs/tune-data.md). @W: the "
                   "task's weight in the objective (default 1). Once per fine-tuned model, or not at all with "
                   "--general.")
@click.option("--chat-template", default=None, metavar="MODEL",
              help="Take the chat template from this model's tokenizer (as the YAML names it) for prompt/response "
                   "and messages rows, and put multiple-choice questions under it [default: the base's template, "
                   "and none for multiple choice].")
@click.option("--lm-eval", "lm_eval", multiple=True, metavar="TASK[:METRIC]",
              help="An lm-eval task scored too (repeatable; METRIC default acc,none), on every model; its gain is "
                   "against the best fine-tune on it. Needs the lm-eval extra: pip install "
                   "\".[lm-eval]\" in a clone (\"mergekit-cabs[lm-eval]\" once on PyPI).")
@click.option("--lm-eval-include", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="A directory of your own lm-eval task YAMLs.")
@click.option("--lm-eval-limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Most documents of each lm-eval task per split [default: --max-windows].")
@click.option("--general", type=click.Path(path_type=Path), default=None,
              help="A text or JSONL file of general text, scored too and counted in the objective; "
                   "alone (no --data), its loss is the objective.")
@click.option("--general-weight", default=1.0, show_default=True,
              help="Weight of the general set in the objective.")
@click.option("--objective", type=click.Choice(["gain", "loss"]), default=None,
              help="gain: mean normalized gain over tasks; loss: mean loss (lower is better) "
                   "[default: gain with --data, loss with --general alone].")
@click.option("--out", "out_dir", default="cabs-tune", show_default=True, type=click.Path(path_type=Path),
              help="Directory for tuned.yml, tune.json, tune.md and tune.png.")
@click.option("--budget", default=60, show_default=True,
              help="Most merged-model evaluations the search may spend (with --optimizer gradient: its steps).")
@click.option("--weight-bounds", default="0,2", show_default=True, metavar="LOW,HIGH", help="Range of each weight.")
@click.option("--lambda-bounds", default="0.05,2", show_default=True, metavar="LOW,HIGH", help="Range of lambda.")
@click.option("--tolerance", default=0.05, show_default=True,
              help="Stop when every step (coordinate) or CMA-ES's step size on the widest range is below this.")
@click.option("--optimizer", type=click.Choice(["auto", "coordinate", "cmaes", "gradient"]), default="auto",
              show_default=True,
              help="coordinate: one value at a time, halving steps; cmaes: CMA-ES (the cma package); gradient: Adam "
                   "on the exact gradient (one backward pass prices every weight), --budget steps of --minibatch "
                   "items per data set, early stopping on a held-back quarter of the fit items (not with lm-eval "
                   "tasks); auto: gradient when 16 or more numbers are searched and --budget cannot take three "
                   "steps each way along each, else cmaes when the models' kept places overlap and --budget allows 50 "
                   "evaluations per searched value, else coordinate.")
@click.option("--coefficients", type=click.Choice(["model", "layer", "tensor"]), default=None,
              help="The weights' shape: model (one weight per model), layer (one per model per decoder layer, or "
                   "per --layer-groups G group, and one for the embeddings, final norm and head), tensor (one per "
                   "model per merged tensor; tuned.yml says them with mergekit filters) [default: layer with "
                   "--layer-groups, else model].")
@click.option("--minibatch", default=8, show_default=True, type=click.IntRange(min=1),
              help="--optimizer gradient: items (windows, rows, questions) per data set per step.")
@click.option("--learning-rate", default=0.03, show_default=True,
              help="--optimizer gradient: Adam's step, as a fraction of each number's range.")
@click.option("--layer-groups", default=None, type=click.IntRange(min=1), metavar="G",
              help="Search one weight per model for each of G groups of consecutive decoder layers, and one for "
                   "the embeddings, final norm and head, instead of one per model (tuned.yml says them with "
                   "mergekit filters, one per layer).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of CMA-ES's draws (the same seed, the same points).")
@click.option("--window", default=None, type=int,
              help="Tokens per scored window [default: 256, or the base's max_position_embeddings if smaller].")
@click.option("--max-windows", default=64, show_default=True,
              help="Most windows (rows, questions) per file and split.")
@click.option("--fit-fraction", default=0.5, show_default=True,
              help="Share of each file's windows to fit on, spread evenly along the file; the rest is held out.")
@click.option("--batch-size", default=4, show_default=True,
              help="Windows or rows per forward pass (a question's choices always share one).")
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
@click.option("--baselines", default=None, metavar="NAMES",
              help="The baselines to score, exactly those (comma-separated): task_arithmetic_tuned (task "
                   "arithmetic tuned the same way), and the one-lambda task_arithmetic, ties, dare_ties (each merged "
                   "by mergekit's own method with its lambda picked on the fit windows); 'none': no baseline. "
                   "Default: task_arithmetic_tuned when its store (about 2 x (models + 1) bytes per merged "
                   "parameter in 16 bits) fits in the free memory, else a line says what it would cost.")
@click.option("--densities", default=None, metavar="LIST",
              help="Search these densities instead of the config's (comma-separated; list the config's to keep "
                   "it a candidate): densities in (0, 1] with a decimal point (0.1,0.25,0.5) or whole numbers n "
                   "(places kept per block), each given to every model; each is a setting with its own masks and "
                   "search, and the best on the fit data wins [default: the config's].")
@click.option("--orders", default=None, metavar="LIST",
              help="Priority orders of models to search (comma-separated): config (as written), suggested (the "
                   "order analyze advises), all (every order, up to 4 models); each with each density "
                   "[default: config].")
@click.option("--total-budget", default=None, type=click.IntRange(min=1), metavar="N",
              help="Share N evaluations evenly among the (density, order) settings instead of --budget each "
                   "(task arithmetic tuned gets N too).")
@click.option("--force", is_flag=True, help="Write into a --out that already holds files.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def tune(config: Path, data, chat_template, lm_eval, lm_eval_include, lm_eval_limit, general, general_weight,
         objective, out_dir, budget, weight_bounds,
         lambda_bounds, tolerance, optimizer, coefficients, minibatch, learning_rate, layer_groups, seed, window,
         max_windows, fit_fraction, batch_size, cuda,
         score_dtype, store_on_device, baselines, densities, orders, total_budget, force, quiet) -> None:
    """Pick each model's weight and lambda from your own data.

    Plans CONFIG (your cabs YAML) with mergekit, computes every mask once, and
    holds the pruned task vectors in memory, so a new weight vector costs one
    pass over the parameters instead of a merge. A search (coordinate-wise
    or CMA-ES, --optimizer) maximises the mean normalized gain over the
    models' tasks on the fit share of each --data file's items (text
    windows, chat rows, multiple-choice questions, lm-eval documents;
    --fit-fraction, spread along the file: every other item at 0.5); the
    rest is held out and reported. Each task counts in its own measure
    (docs/tune-data.md); --data MODEL=FILE@W weights it. With --general FILE alone, it minimises
    the loss on that text instead.
    Writes tuned.yml (CONFIG with the chosen numbers), tune.json, tune.md and
    tune.png to --out."""
    from mergekit_cabs import tune as tn
    from mergekit_cabs._output import check_out_dir, out_lock
    from mergekit_cabs.params import CabsError

    finished = tn.Finished()  # the cabs search's report, kept should Ctrl-C stop the baselines
    try:
        weight_range, lambda_range, device = tn.search_settings(
            weight_bounds=weight_bounds, lambda_bounds=lambda_bounds, general_weight=general_weight,
            tolerance=tolerance, batch_size=batch_size, cuda=cuda)
        objective = tn.implied_objective(objective, bool(data) or bool(lm_eval))
        warn_unused_gradient_options(optimizer)
        tn.parse_baselines(baselines)
        tn.parse_densities(densities), tn.parse_orders(orders)
        tn.check_device_settings(device=device, score_dtype=score_dtype, store_on_device=store_on_device)
        with out_lock(out_dir, tn.TuneError):  # held to the end: a second run into --out refuses at start
            check_out_dir(out_dir, force, tn.OUT_FILES, tn.TuneError)
            prep = tn.prepare(config, data, general=general, window=window, fit_fraction=fit_fraction,
                              max_windows=max_windows, budget=budget, layer_groups=layer_groups,
                              chat_template=chat_template, lm_eval=lm_eval, lm_eval_include=lm_eval_include,
                              lm_eval_limit=lm_eval_limit, coefficients=coefficients)
            report = tn.run_tune(prep, device=device, objective=objective, general_weight=general_weight,
                                 budget=budget, weight_bounds=weight_range, lambda_bounds=lambda_range,
                                 tolerance=tolerance, batch_size=batch_size, quiet=quiet, optimizer=optimizer,
                                 seed=seed, score_dtype=score_dtype, store_on_device=store_on_device,
                                 baselines=baselines, densities=densities, orders=orders,
                                 total_budget=total_budget, minibatch=minibatch, learning_rate=learning_rate,
                                 finished=finished)
            click.echo(tn.format_summary(report))  # before writing: a full disk loses no search
            written = tn.write_or_show(report, out_dir, click.echo)  # on a write error, every YAML printed
    except CabsError as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        if finished.report is None:
            raise
        interrupted(finished.report, out_dir)
    click.echo("\n".join(tn.closing_lines(report, out_dir, written)))  # the last line: what to merge


def warn_unused_gradient_options(optimizer: str) -> None:
    """One line when --minibatch or --learning-rate is given to a search
    that does not use them (they are the gradient search's)."""
    from click.core import ParameterSource

    from mergekit_cabs.tune import SEARCHES  # the searches without slopes

    if optimizer not in SEARCHES:
        return
    context = click.get_current_context()
    given = [f"--{name.replace('_', '-')}" for name in ("minibatch", "learning_rate")
             if context.get_parameter_source(name) is ParameterSource.COMMANDLINE]
    if given:
        verb, noun, them = ("are", "settings", "them") if len(given) > 1 else ("is", "setting", "it")
        click.echo(f"Warning: {' and '.join(given)} {verb} the gradient search's {noun}; --optimizer {optimizer} "
                   f"does not use {them}.", err=True)


def interrupted(report: dict, out_dir: Path) -> None:
    """Ctrl-C after the cabs search finished: its summary, its files written
    into --out (held again), one line saying so, the merge line; status 130.
    A second Ctrl-C while it saves is ignored, so the save is never cut short."""
    import signal

    from mergekit_cabs import tune as tn

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from mergekit_cabs._output import out_lock
    from mergekit_cabs.params import CabsError

    try:
        with out_lock(out_dir, tn.TuneError):
            tn.show_interrupted(report, out_dir, click.echo)
    except CabsError as error:
        raise click.ClickException(str(error)) from None
    sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
