"""`bdiff`: fit, sample, evaluate, benchmark, rl. Parses options, calls the engine, prints."""
import functools
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from bdiff import __version__
from bdiff.errors import BdiffError

app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
                  help="Bellman Diffusion: learn a density p(x) and its gradient ∇p(x) as two "
                       "neural fields, sample with the Bellman SDE.")
out = Console()
err = Console(stderr=True)

DEFAULT_CHECKPOINT = "bdiff.safetensors"


def say(text):
    """A plain line on stdout: user text (paths, names) is never read as rich markup."""
    out.print(text, markup=False, highlight=False, soft_wrap=True)


def tell(text):
    """A plain line on stderr (progress, warnings), never read as markup."""
    err.print(text, markup=False, highlight=False, soft_wrap=True)


def _out_of_memory(error):
    text = str(error).lower()
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text or "failed to allocate" in text))


def friendly(command):
    """Turn engine errors into one red line on stderr and exit code 2 (1 for the unexpected)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except BdiffError as error:
            err.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as error:  # noqa: BLE001 - last line of defence against tracebacks
            if os.environ.get("BDIFF_DEBUG"):
                raise
            if _out_of_memory(error):
                err.print("[red]error:[/red] out of memory; try a smaller --batch-size or --n")
                raise typer.Exit(2)
            err.print(f"[red]internal error:[/red] {type(error).__name__}: {escape(str(error))} "
                      "(set BDIFF_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
            raise typer.Exit(1)
    return wrapper


def _version(value: bool):
    if value:
        out.print(f"bdiff {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")):
    pass


def _progress():
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                    console=err, transient=False, disable=not err.is_terminal and not
                    os.environ.get("BDIFF_PROGRESS"))


def _prepare_host():
    from bdiff.backend import prepare_host
    prepare_host()


@app.command()
@friendly
def fit(
    ctx: typer.Context,
    data: str = typer.Argument(..., help="A .npy/.npz/.csv/.safetensors file, or a built-in: "
                               "intervals, mixture, clusters, checkerboard, moons, swissroll, digits, "
                               "wine, breast_cancer."),
    output: Path = typer.Option(DEFAULT_CHECKPOINT, "-o", "--output", help="Checkpoint to write."),
    key: Optional[str] = typer.Option(None, help="Array name inside a .npz/.safetensors file."),
    steps: Optional[int] = typer.Option(None, help="Most training steps; training stops earlier when "
                                        "the loss on 10% of the rows kept out stops improving, "
                                        "once every row has been drawn on 30 times (tables of "
                                        "3+ columns: also the mean of each cluster's own loss). "
                                        "Default: 3000, or 6000 for image data."),
    batch_size: Optional[int] = typer.Option(None, help="Query points per step. Default: 1024 (512 "
                                             "for 1-D and 2-D tables), or 128 for data sets under "
                                             "1000 rows."),
    lr: float = typer.Option(2e-3, help="Adam learning rate (cosine decay)."),
    eps: Optional[float] = typer.Option(None, help="Smoothing bandwidth ε (variance, standardised "
                                        "units). Default: from --eps-rule."),
    eps_rule: str = typer.Option("auto", help="How the targets' ε is chosen when --eps is not "
                                 "given: silverman, scott, heldout (best likelihood of p_ε on 20% of "
                                 "the training rows), or auto (heldout). The density's ε is then the "
                                 "level, from there up to 16 times it, whose learned density best "
                                 "predicts the rows kept out."),
    param: str = typer.Option("auto", help="Field outputs: linear (s, g, the paper's), log (log s, "
                              "∇log s: positive, finite in high D) or auto (log)."),
    eps_max: Optional[float] = typer.Option(None, help="Also learn the fields of p_ε for ε up to "
                                            "this, for the anneal sampler (log fields only). "
                                            "Default: twice the data's total variance for log "
                                            "fields, none for linear; 0 turns levels off."),
    eps_floor: Optional[float] = typer.Option(None, help="Lowest noise level ε_min (log fields with "
                                              "levels), where the anneal sampler ends: below ε, "
                                              "so samples follow the data, not p_ε's N(0, εI) "
                                              "blur. Default: 1e-4 (standardised units), or ε if "
                                              "smaller."),
    level_sampling: str = typer.Option("auto", help="How training draws noise levels (with levels): "
                                       "log-uniform in ε, log-normal (EDM's, around the data's "
                                       "scale), or auto (log-normal for image data, else "
                                       "log-uniform)."),
    fourier: Optional[int] = typer.Option(None, help="Random Fourier features of the input (sin and "
                                          "cos of this many random frequencies, up to 2/sqrt(ε)): "
                                          "the fields follow sharp edges and thin supports. 0: "
                                          "plain input. Default: 32 per column for tables of 1 or 2 "
                                          "columns, 32 for 3 or 4, with noise levels; else 0."),
    query_balance: float = typer.Option(0.0, help="Noise-level training draws "
                                        "its query rows ∝ (share of the row's cluster)^-this, "
                                        "clusters from a BIC Gaussian mixture: 1 trains every "
                                        "cluster alike, 0 (default) follows the data. 1 lifted the "
                                        "small modes of 5-D mixtures (mode-weight error 0.0155 -> "
                                        "0.0107 on one) but lost likelihood on small real tables "
                                        "(diabetes 25.6 -> 22.6; README)."),
    power: str = typer.Option("auto", help="Tables: Yeo-Johnson powers for skewed columns, fitted by "
                              "maximum likelihood (a log-like power brings a long tail in). auto: "
                              "where a kernel density predicts held-out rows clearly better with "
                              "them, with tail powers sinh(δ asinh y)/δ for columns whose tail sets "
                              "their spread (sd over 10 interquartile sds: Cauchy-like); on: "
                              "wherever a column's power is away from 1, and tail powers for every "
                              "heavy symmetric tail such as daily returns; off. The checkpoint keeps "
                              "them: samples and densities are in data units."),
    pixel_logit: bool = typer.Option(True, "--pixel-logit/--no-pixel-logit", help="Image data: "
                                     "model logit-coded pixels (integer pixels dequantised), so "
                                     "samples stay in the data's range and on its grid."),
    grad_loss: str = typer.Option("direct", help="Gradient loss: direct, divergence or sliced."),
    arch: str = typer.Option("auto", help="shared (one trunk) or separate (two networks); auto: "
                             "separate with noise levels, else shared."),
    width: Optional[int] = typer.Option(None, help="Hidden width. Default: 256, or 128 for 1-D and "
                                        "2-D tables."),
    depth: int = typer.Option(3, help="Hidden layers."),
    seed: int = typer.Option(0, help="Random seed."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    backend: Optional[str] = typer.Option(None, help="Kernel backend: triton, torch, chunked, "
                                          "naive, reference (default: automatic)."),
    checkpoint_every: int = typer.Option(500, help="Write the checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run stored in --output."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --output (never the "
                               "input data)."),
):
    """Train the scalar and gradient fields on DATA and write a checkpoint.

    Examples:

      bdiff fit mixture

      bdiff fit data.npy -o model.safetensors --steps 5000

      bdiff fit data.npy -o model.safetensors --steps 8000 --resume
    """
    from bdiff.data import check_fit_output, load_data, output_lock

    loaded = load_data(data, key=key)  # the input first: its error is the one to see
    check_fit_output(output, data, resume, force)  # before any training: a bad path must not cost a fit
    from bdiff.trainer import PREPARE_NOTICE_ROWS, FitConfig, Trainer  # torch: after the checks, 2-3 s
    _prepare_host()
    cfg = FitConfig(steps=steps, batch_size=batch_size, lr=lr, eps=eps, eps_rule=eps_rule, param=param,
                    eps_max=eps_max, eps_floor=eps_floor, level_sampling=level_sampling, fourier=fourier,
                    query_balance=query_balance, power=power, pixel_logit=pixel_logit, grad_loss=grad_loss,
                    arch=arch, width=width, depth=depth, seed=seed, device=device, backend=backend,
                    checkpoint_every=checkpoint_every)
    with output_lock(output):
        if len(loaded.values) >= PREPARE_NOTICE_ROWS:
            tell(f"preparing {loaded.source}: {len(loaded.values)} rows; choosing ε and log C first")
        trainer = Trainer(loaded.values, cfg, loaded.source, loaded.item_shape)
        if resume:
            trainer.restore(output, given=_given(ctx))
            if trainer.step >= trainer.cfg.steps:
                raise BdiffError(f"{output} already has {trainer.step} steps; ask for more with --steps")
        tell(f"fitting {loaded.source}: {len(loaded.values)} points, D={trainer.dim}, "
             f"ε={trainer.eps:.4g} ({'given' if trainer.cfg.eps is not None else trainer.cfg.eps_rule}), "
             f"{trainer.cfg.param} fields{_levels_text(trainer.levels)}{_fourier_text(trainer.cfg.fourier)}, "
             f"log C={trainer.log_c:.3f}, "
             f"batch {trainer.cfg.batch_size}, from step {trainer.step}")
        powers = _powers_text(trainer.standardizer.coding)
        if powers:
            tell(powers)
        if trainer.constant_columns:
            tell(f"warning: column(s) {', '.join(map(str, trainer.constant_columns))} are constant: the model "
                 "leaves them out (its density is that of the other columns) and samples keep their value")
        for column, ratio, row in trainer.far_scaled_columns:
            apart = trainer.rows_set_apart.get(column)
            if apart:
                named = ", ".join(f"row {r} ({loaded.values[r, column]:.4g})" for r in apart[:5])
                tell(f"warning: column {column}: {named}{' and more' if len(apart) > 5 else ''} lie far apart "
                     f"from every other row (with them its standard deviation is {ratio:.0f} times its "
                     "interquartile spread); the column is scaled without them: check them for errors")
            else:
                tell(f"warning: column {column}'s standard deviation is {ratio:.0f} times its interquartile "
                     f"spread: a few far rows set its scale (the farthest: row {row}, "
                     f"{loaded.values[row, column]:.4g}), and the other rows are modelled coarsely; check "
                     "those rows for errors")
        seconds = _train(trainer, output, data)
    if trainer.stopped_early:
        tell(f"stopped at step {trainer.step}: the validation loss stopped improving")
    for line in trainer.fit_report():
        tell(line)
    say(f"wrote {output} ({_count(trainer.step, 'step')} in {seconds:.1f} s)")


def _given(ctx):
    """Names of the options the user set on the command line (not left at their default)."""
    # by the enum's name: Typer ships click's ParameterSource in a private module
    return [name for name in ctx.params
            if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"]


def _train(trainer, output, data):
    """trainer.run with a progress bar (plain lines when piped). Ctrl-C or SIGTERM: the
    checkpoint is saved, and the exit code is 128 + the signal's number."""
    with _progress() as progress:
        task = progress.add_task("fit", total=trainer.cfg.steps, completed=trainer.step, info="")
        first = trainer.step
        plain = _PlainProgress(progress, "fit")

        def on_step(step, losses, elapsed):
            if step % 10 == 0 or step == trainer.cfg.steps:
                rate = (step - first) / max(elapsed, 1e-9)
                info = f"loss {losses[0]:.3e}  {rate:.0f} steps/s"
                progress.update(task, completed=step, info=info)
                plain.report(f"step {step}/{trainer.cfg.steps}  {info}")

        try:
            return trainer.run(output, on_step)
        except KeyboardInterrupt:
            number = trainer.signal or signal.SIGINT
            tell(f"interrupted at step {trainer.step}; checkpoint saved to {output}. "
                 f"Continue with: bdiff fit {data} -o {output} --resume")
            raise typer.Exit(128 + number)


PLAIN_PROGRESS_SECONDS = float(os.environ.get("BDIFF_PROGRESS_SECONDS", 5.0))


class _PlainProgress:
    """One plain line every PLAIN_PROGRESS_SECONDS when stderr is not a terminal (a pipe or a
    log file), where the rich bar draws nothing."""

    def __init__(self, progress, what):
        self.clock, self.what, self.every = time.monotonic, what, PLAIN_PROGRESS_SECONDS
        self.enabled = progress.disable
        self.last = self.clock()

    def report(self, text):
        if self.enabled and self.clock() - self.last >= self.every:
            self.last = self.clock()
            tell(f"{self.what}: {text}")


def _count(number, noun):
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _levels_text(levels):
    return "" if levels is None else f" at noise levels {levels[0]:.4g}..{levels[1]:.4g}"


def _powers_text(coding):
    """Which columns fit coded, by which Yeo-Johnson power and tail power ('' for none)."""
    power, tail = getattr(coding, "power", None), getattr(coding, "tail", None)
    if power is None:
        return ""
    coded = []
    for column, (p, t) in enumerate(zip(power, tail)):
        how = ([f"power {p:.2f}"] if p != 1 else []) + ([f"tail {t:.2f}"] if t != 1 else [])
        if how:
            coded.append(f"{column} ({', '.join(how)})")
    return "skewed or heavy-tailed columns coded: " + ", ".join(coded)


def _fourier_text(count):
    return f" with {count} Fourier features" if count else ""


def _sample_config(model, sampler, init, steps, denoise, trim, seed, batch_size, backend):
    """The model's measured defaults, overridden where given."""
    return model.sample_config(sampler=sampler, init=init, steps=steps, denoise=denoise, trim=trim, seed=seed,
                               batch_size=batch_size, backend=backend)


def _draw_samples(model, n, cfg):
    """Samples in data units, with a progress bar over particle batches."""
    with _progress() as progress:
        task = progress.add_task("sample", total=n, info="")
        return model.sample_values(n, cfg, on_batch=lambda done, total: progress.update(task, completed=done))


def _load_model(checkpoint, device):
    from bdiff.backend import check_device
    from bdiff.model import TrainedModel
    return TrainedModel.load(checkpoint, check_device(device))


@app.command("sample")
@friendly
def sample_command(
    n: int = typer.Option(10_000, "--n", help="Number of samples."),
    checkpoint: Path = typer.Option(DEFAULT_CHECKPOINT, "-c", "--checkpoint", help="Checkpoint to load."),
    output: Path = typer.Option("samples.npy", "-o", "--output", help="Output .npy or .csv."),
    sampler: Optional[str] = typer.Option(None, help="bellman (the paper's SDE), precond "
                                          "(preconditioned SDE), anneal (down the noise levels) or "
                                          "smc (annealing, its paths importance-weighted by the "
                                          "learned density at 4ε, the weights Pareto-smoothed, and "
                                          "resampled there; where the weights are not to be trusted, "
                                          "Pareto k̂ > 0.7 or effective sample size under 25 %, the "
                                          "batch keeps annealing's draws, with a warning). Default: "
                                          "smc for models with noise levels (all fits with the "
                                          "defaults), anneal for image data, bellman for linear "
                                          "fields, else precond."),
    init: Optional[str] = typer.Option(None, help="importance (resample s/q) or gaussian start. "
                                       "Default: importance for linear fields, gaussian otherwise "
                                       "(anneal and smc start from their broadest level)."),
    steps: Optional[int] = typer.Option(None, help="SDE steps (anneal, smc: levels). Default: 200 "
                                        "levels with noise levels (2000 for image data), 100 steps "
                                        "for linear fields, 300 for log fields without levels."),
    denoise: Optional[bool] = typer.Option(None, "--denoise/--no-denoise", help="End with a Tweedie "
                                           "step x + ε∇log s that removes the last level's N(0, εI) "
                                           "blur. Default: on for anneal and smc (they end at ε_min), off "
                                           "otherwise."),
    trim: bool = typer.Option(True, "--trim/--no-trim", help="Draw again the particles that end where "
                              "the learned density is below that of the data's own lowest 0.1 % of "
                              "rows (stored by fit): off the data, on a spurious bump. The run "
                              "reports their share (0-0.16 % on the quality suite). Data sets under "
                              "1000 rows are not trimmed."),
    seed: int = typer.Option(0, help="Random seed; the same seed and --batch-size give the same "
                             "file (particles in one batch share the sampler's resampling)."),
    batch_size: int = typer.Option(10_000, help="Particles simulated at once."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    backend: Optional[str] = typer.Option(None, help="Kernel backend (default: automatic)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --output."),
):
    """Draw samples from a trained model, in data units: down its noise levels, corrected by the
    learned density (the default), or with the Bellman SDE.

    Examples:

      bdiff sample --n 10000

      bdiff sample -c model.safetensors --n 500 -o samples.csv --sampler precond --steps 300

      bdiff sample -c digits.safetensors --n 2000 -o digits.npy --sampler anneal --steps 400
    """
    from bdiff.data import check_output, save_array
    if n < 1:
        raise BdiffError(f"--n must be a positive number of samples, got {n}")
    check_output(output, (".npy", ".csv"), replace=force, inputs=(checkpoint,))
    from bdiff.sampler import sampler_warnings  # torch: after the checks, 2-3 s
    _prepare_host()
    model = _load_model(checkpoint, device)
    cfg = _sample_config(model, sampler, init, steps, denoise, trim, seed, batch_size, backend)
    values, report = _draw_samples(model, n, cfg)
    save_array(output, values.reshape(len(values), *model.item_shape))
    line = (f"wrote {output}: {_count(n, 'sample')} ({_sampler_text(report)}); "
            f"{report['low_density_share']:.2%} ended where s ≈ 0")
    if report["trimmed_share"] is not None:
        line += f"; {100 * report['trimmed_share']:.2f} % drawn again below the density of the data's lowest 0.1 %"
    say(line)
    for warning in sampler_warnings(report):
        tell(f"warning: {warning}")


def _sampler_text(report):
    if report["levels"] is not None:
        text = f"{report['sampler']} over {_count(report['steps'], 'level')}"
        if report["end_level"] > report["levels"][0]:  # fit found copies of the rows below it
            text += f" ending at {report['end_level']:.3g}, not ε_min, so as not to copy the training rows"
    else:
        text = f"{report['sampler']} SDE, {report['init']} start, {report['steps']} steps"
    if report.get("final_ess") is not None:
        smoothing = "" if report.get("pareto_k") is None else f", Pareto-smoothed (k̂ {report['pareto_k']:.2f})"
        text += (f", effective sample size {report['final_ess']:.0%}{smoothing} before resampling at "
                 f"ε' = {report['weighted_to']:.3g}")
    return text


def _check_output(path, extensions, force):
    from bdiff.data import check_output
    check_output(path, extensions, replace=force)


@app.command()
@friendly
def evaluate(
    data: Optional[str] = typer.Option(None, "--data", help="Held-out data: a file or a built-in "
                                       "name (its held-out split). Default: the training set's built-in."),
    checkpoint: Path = typer.Option(DEFAULT_CHECKPOINT, "-c", "--checkpoint", help="Checkpoint to load."),
    samples: Optional[Path] = typer.Option(None, "--samples", help="Samples file; default: sample now."),
    train: Optional[str] = typer.Option(None, "--train", help="The training rows (file), for the "
                                        "far-sample share and the normaliser's proposal. Built-ins "
                                        "use their training split."),
    key: Optional[str] = typer.Option(None, help="Array name inside a .npz/.safetensors file."),
    n: Optional[int] = typer.Option(None, "--n", help="Samples to draw when --samples is not given "
                                    "(default 10000)."),
    sampler: Optional[str] = typer.Option(None, help="Sampler when sampling now: bellman, precond, "
                                          "anneal or smc (default: as `bdiff sample`)."),
    init: Optional[str] = typer.Option(None, help="Start when sampling now (default: as `bdiff sample`)."),
    steps: Optional[int] = typer.Option(None, help="SDE steps when sampling now (default: as `bdiff sample`)."),
    denoise: Optional[bool] = typer.Option(None, "--denoise/--no-denoise", help="Tweedie step at the end."),
    trim: Optional[bool] = typer.Option(None, "--trim/--no-trim", help="Draw again particles below the "
                                        "density of the data's lowest 0.1 % (default: as `bdiff sample`)."),
    seed: int = typer.Option(0, help="Random seed."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the metrics as JSON here."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write PNG figures into this folder."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --json file."),
):
    """Score a model against held-out rows of the data, beside the reference row.

    The held-out rows are split in halves A and B. Every sample is compared with A; the
    reference column compares B, fresh rows of the data itself, with A in the same way: the
    score of a perfect sampler; small held-out sets are split up to 10 times and averaged
    (reference_repeats). C2ST is the 5-fold accuracy of a classifier separating samples
    from A (0.5: indistinguishable); MMD uses a Gaussian kernel of width 0.3 (mmd) and of the
    median distance (mmd_median); *_smoothed_ideal is B plus N(0, εI), a perfect sampler of the
    smoothed p_ε. loglik is the held-out mean log-density of the model's density (density):
    "flow" where fit found the score's probability flow from flow_eps predicts its validation
    rows better, normalised by construction; else "field", the scalar field's p_ε divided by
    its normaliser Z. The field's figures come either way: loglik_field, and Z estimated by
    importance sampling (normaliser, normaliser_se; 1 for a proper density); loglik_field is
    null where the density is ≤ 0 at some held-out row (density_nonpositive_share) and where Z
    cannot be estimated to 5% (normaliser_reliable false: high D, e.g. 64-D digits), with the
    plain mean as loglik_unnormalised; image models report it for the coded pixels' density
    times the coding's Jacobian (dequantised pixels for integer images). far_share
    is the share of samples farther from every training row (or held-out row, without --train)
    than the data's own 99.9th-percentile nearest-neighbour distance (reference: the held-out
    rows' own share, each left out of the threshold), after the sampler has drawn again the
    trimmed_share of particles below the density of the data's lowest 0.1 % (--no-trim keeps
    them). nearest_ratio (with --train) is the samples' median distance to their nearest
    training row over the training rows' own median distance to their nearest other row
    (reference: the held-out rows'; about 1 for fresh data, well below 1 where samples copy
    the training rows: fit raises the level where sampling ends until they do not). On images
    pixel_outside_share,
    blank_pixel_sd (beside the data's) and pixel_w1; outside_range_share the
    share outside the data's range widened by 10%. With the smc sampler (the default for
    tables): final_ess, the effective sample size of its Pareto-smoothed weights, pareto_k,
    their tail shape, and corrected_share, the share of particles whose batch was resampled by
    the weights (below 1, a warning: where k̂ > 0.7 or the ESS is under 25 % a batch keeps
    annealing's draws).

    Examples:

      bdiff evaluate --data mixture --plot plots

      bdiff evaluate --data heldout.npy --train train.npy --samples samples.npy --json metrics.json
    """
    from bdiff.backend import check_device
    from bdiff.evaluation import evaluate_checkpoint
    from bdiff.metrics import json_safe
    if json_path is not None:
        _check_output(json_path, (".json",), force)
    _prepare_host()
    with _progress() as progress:
        task = progress.add_task("sample", total=n or 0, info="")
        result = evaluate_checkpoint(
            checkpoint, data, train, samples, key, seed, check_device(device),
            sampling=dict(n=n, sampler=sampler, init=init, steps=steps, denoise=denoise, trim=trim),
            on_batch=lambda done, total: progress.update(task, completed=done, total=total))
    table = Table(title=f"bdiff evaluate: {escape(str(checkpoint))} on {escape(result.data_name)}")
    table.add_column("metric")
    table.add_column("model", justify="right")
    table.add_column("reference (data)", justify="right")
    table.add_column("reference (p_ε)", justify="right")
    metrics = result.metrics
    for name, value in metrics.items():
        if name.endswith("_ideal") or isinstance(value, list):
            continue
        ideal, smoothed = metrics.get(f"{name}_ideal"), metrics.get(f"{name}_smoothed_ideal")
        table.add_row(name, _fmt(value), "" if ideal is None else _fmt(ideal),
                      "" if smoothed is None else _fmt(smoothed))
    out.print(table)
    for line in result.warnings:
        tell(f"warning: {line}")
    if json_path is not None:
        from bdiff.data import save_json
        save_json(json_path, json_safe(metrics))
        say(f"wrote {json_path}")
    if plot is not None:
        from bdiff.plots import write_plots
        paths = write_plots(str(plot), result.model, result.train if result.train is not None else result.heldout,
                            result.samples, result.item_shape, result.law)
        say(f"wrote {len(paths)} figures to {plot}/")


def _int_list(text, what):
    try:
        values = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BdiffError(f"--{what} takes comma-separated numbers, got {text!r}")
    if not values or min(values) < 1:
        raise BdiffError(f"--{what} needs positive numbers, got {text!r}")
    return values


def _name_list(text):
    return [v.strip() for v in text.split(",") if v.strip()]


@app.command()
@friendly
def benchmark(
    ops: str = typer.Option("field_fwd,field_fwd_bwd,sde_step,sde_oracle", help="Comma-separated ops."),
    sizes: str = typer.Option("1024,4096,16384", help="Comma-separated B = M sizes."),
    dims: str = typer.Option("2,64", help="Comma-separated dimensions D."),
    backends: Optional[str] = typer.Option(None, help="Comma-separated: naive, torch, triton, keops "
                                           "(default: all that can run here)."),
    repeats: int = typer.Option(3, help="Timed repeats after one warm-up; the median is reported."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the records as JSON here."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Write the records as CSV here."),
    compile_check: bool = typer.Option(True, help="Also compile the Triton kernels for sm_80/sm_90 "
                                       "and report registers, shared memory, spills and SASS "
                                       "instructions and shuffles per pair."),
    force: bool = typer.Option(False, "--force", help="Replace existing --json and --csv files."),
):
    """Time the kernels of every backend across sizes.

    Reports throughput, peak memory and the ratio to the naive materialised PyTorch baseline.

    Examples:

      bdiff benchmark

      bdiff benchmark --ops field_fwd --sizes 16384 --dims 2,64 --json bench.json --csv bench.csv

      bdiff benchmark --device cuda --sizes 1024,4096,16384,65536 --dims 2,16,64,784
    """
    import torch

    from bdiff.backend import check_device
    from bdiff.benchmark import run_benchmark
    for path, ext in ((json_path, ".json"), (csv_path, ".csv")):
        if path is not None:
            _check_output(path, (ext,), force)
    _prepare_host()
    device = check_device(device)
    tell(f"device: {device} ({torch.get_num_threads()} threads)")
    records, skipped = run_benchmark(_name_list(ops), _int_list(sizes, "sizes"), _int_list(dims, "dims"),
                                     _name_list(backends) if backends else None, repeats, device,
                                     on_record=lambda r: tell(
                                         f"  {r['op']} {r['backend']} B=M={r['B']} D={r['D']}: "
                                         f"{r['median_s']:.4g} s"))
    table = Table(title=f"bdiff benchmark ({device})")
    for column in ("op", "backend", "B=M", "D", "median s", "pairs/s", "peak MB", "vs naive"):
        table.add_column(column, justify="right" if column not in ("op", "backend") else "left")
    for r in records:
        if r.get("median_s") is None:
            table.add_row(r["op"], r["backend"], str(r["B"]), str(r["D"]), r.get("note", ""), "", "", "")
            continue
        ratio = r.get("ratio_vs_naive")
        table.add_row(r["op"], r["backend"], str(r["B"]), str(r["D"]), f"{r['median_s']:.4g}",
                      f"{r['pairs_per_s']:.3g}", f"{r['peak_mem_mb']:.1f}",
                      "" if ratio is None else f"{ratio:.1f}x")
    out.print(table)
    for name, why in skipped.items():
        say(f"{name}: {why}")
    report = {"records": records, "skipped": skipped}
    if compile_check:
        report["compile"] = _compile_report()
    if json_path is not None:
        from bdiff.data import save_json
        save_json(json_path, records + [{"op": "compile", **c} for c in report.get("compile", [])])
        say(f"wrote {json_path}")
    if csv_path is not None:
        from bdiff.benchmark import CSV_KEYS
        from bdiff.data import save_csv
        save_csv(csv_path, records, CSV_KEYS)
        say(f"wrote {csv_path}")


def _compile_report():
    """Registers, shared memory, spills, and SASS instructions and shuffles per (query, reference)
    pair in the loop over references, per Triton kernel configuration (sm_80, sm_90)."""
    from bdiff.backend import triton_installed
    if not triton_installed():
        say("compile check: Triton is not installed")
        return []
    from bdiff.compile_check import compile_all
    records = compile_all()
    table = Table(title="Triton kernels compiled ahead of time (no GPU needed)")
    for column in ("kernel", "sm", "config", "warps", "registers", "shared B", "spill B", "instr/pair",
                   "shuffles/pair"):
        table.add_column(column)
    for r in records:
        cfg = r["config"]
        short = ",".join(f"{k}={v}" for k, v in cfg.items() if k in ("BLOCK_D", "HAS_EXCLUDE", "PRECOND"))
        per_pair = [f"{r[key]:.1f}" if r[key] is not None else "" for key in ("instructions_per_pair",
                                                                              "shuffles_per_pair")]
        table.add_row(r["kernel"], str(r["sm"]), short, str(r["num_warps"]), str(r["registers"]),
                      str(r["shared_bytes"]), str(r["spill_store_bytes"] + r["spill_load_bytes"]), *per_pair)
    out.print(table)
    return records


@app.command()
@friendly
def rl(
    env: str = typer.Argument(..., help="frozenlake (policy evaluation, W1 to the exact return law) "
                              "or cartpole (control, average return)."),
    agent: Optional[str] = typer.Option(None, help="bellman (Bellman Diffusion fields, the default) "
                                        "or c51; not with --compare, which runs both."),
    seeds: int = typer.Option(1, help="Seeds 0..N-1."),
    steps: int = typer.Option(20_000, help="Environment steps per run."),
    compare: bool = typer.Option(False, "--compare", help="Run both agents over every seed and "
                                 "write curves, plots and the steps-to-threshold ratio."),
    eval_every: int = typer.Option(1000, help="Evaluate every N steps."),
    jobs: int = typer.Option(1, help="Runs at a time, each in its own process on one thread "
                             "(up to the number of cores)."),
    out_dir: Path = typer.Option(Path("rl-results"), "--out", help="Folder for CSV, PNG and JSON."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the records as JSON here."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --json file."),
):
    """Distributional RL: Bellman Diffusion return densities against C51.

    Examples:

      bdiff rl frozenlake --agent bellman --steps 10000

      bdiff rl frozenlake --compare --seeds 5 --steps 4000 --jobs 2 --json rl-results/rl.json
    """
    from bdiff.rl.envs import get_spec
    from bdiff.rl.runner import AGENTS, compare as compare_agents
    from bdiff.data import make_output_folder
    get_spec(env)
    if compare and agent is not None:
        raise BdiffError("--compare runs both agents; leave out --agent")
    agent = agent or "bellman"
    if agent not in AGENTS:
        raise BdiffError(f"unknown agent {agent!r}; choose {', '.join(AGENTS)}")
    if seeds < 1 or steps < 1 or eval_every < 1 or jobs < 1:
        raise BdiffError("--seeds, --steps, --eval-every and --jobs must be positive")
    make_output_folder(out_dir)  # first, so that --json may point into --out
    if json_path is not None:
        _check_output(json_path, (".json",), force)

    def progress(agent_name, seed, step, metric, seconds):
        tell(f"{env} {agent_name} seed {seed}: step {step} {metric:.4g} ({seconds:.0f} s)")

    # a kill unwinds like Ctrl-C, so that the worker processes of --jobs are terminated too
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        records = compare_agents(env, seeds, steps, str(out_dir), AGENTS if compare else (agent,),
                                 on_eval=progress, jobs=jobs, eval_every=eval_every)
    finally:
        signal.signal(signal.SIGTERM, previous)
    table = Table(title=f"bdiff rl {env}")
    for column in ("agent", "seed", "steps to threshold", "final metric", "seconds"):
        table.add_column(column)
    for r in records:
        if not r.get("summary"):
            table.add_row(r["agent"], str(r["seed"]), str(r["steps_to_threshold"]),
                          f"{r['final_metric']:.4g} ({r['metric']})", f"{r['seconds']:.0f}")
    out.print(table)
    summary = records[-1]
    if "ratio" in summary:
        bound = " (a bound: some runs never reached the threshold and count as budget + 1)" \
            if summary["ratio_is_bound"] else ""
        say(f"steps-to-threshold ratio C51 / Bellman Diffusion: {summary['ratio']:.2f}{bound}")
    if json_path is not None:
        from bdiff.data import save_json
        save_json(json_path, records)
    say(f"wrote curves, plots and results to {out_dir}/")


def _fmt(value):
    if value is None:
        return "n/a"
    if isinstance(value, (int, str)):
        return str(value)
    return f"{value:.4g}"


def run():
    app()


if __name__ == "__main__":
    run()
