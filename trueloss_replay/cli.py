"""The ``trueloss-replay`` command line: each command parses options, calls one library
function and prints the result.

Library errors (``TruelossReplayError``) become one-line messages, decided from the error's
fields: ``usage`` errors exit 2 as Click's own do (``click.BadParameter`` naming the flag of
the error's ``argument``), every other one exits 1 (``click.ClickException``); ``--debug``
shows the traceback instead. The library's messages name API arguments (``model=``); the
text shown here names the flags (``--model``), through ``FLAGS``.

Option names have one meaning each: ``--results DIR`` is the results folder on every command
that reads or writes one, ``-o/--output FILE`` the file a command writes (``history``,
``plot``). Older spellings still work, hidden from ``--help``: ``--out FILE``, and on
``replay`` ``--output DIR`` (the name DESIGN.md's command line gives it).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.abc
import importlib.util
import math
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import click

from trueloss_replay.errors import TruelossReplayError, command_line_text, size_text
from trueloss_replay.storage import is_url

# TensorFlow's C++ start-up lines (no CUDA driver, CPU instructions, XLA) are noise on a
# command line's stderr. Set before anything imports TensorFlow; a value the user set wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if TYPE_CHECKING:
    from trueloss_replay.run import EpochSet
    from trueloss_replay.scheduler import Shard


class _LocalPath(click.Path):
    """``click.Path`` that, with ``urls=True``, passes a URL (``s3://bucket/run``) on as a
    string for the library to mirror (``run.local_path``), and otherwise refuses it before it
    becomes the local file ``s3:/bucket/run``."""

    def __init__(self, *args, urls: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.urls = urls

    def convert(self, value, param, ctx):
        if is_url(value):
            if self.urls:
                return value
            self.fail(
                f"{value!r} is a URL; this option takes a local file. Write it locally, then "
                "copy it (aws s3 cp, gcloud storage cp).",
                param,
                ctx,
            )
        return super().convert(value, param, ctx)


_PATH = _LocalPath(path_type=Path)
_RUN_DIR = _LocalPath(exists=True, file_okay=False, path_type=Path, urls=True)
_FOLDER = _LocalPath(file_okay=False, path_type=Path, urls=True)


#: The flag of each API argument a library message may name (``command_line_text``).
FLAGS = {
    "data": "--data",
    "train": "--train",
    "val": "--val",
    "trust_data_factory": "--trust-data-factory",
    "batch_size": "--batch-size",
    "devices": "--devices",
    "epochs": "--epochs",
    "force": "--force",
    "output": "--results",
    "unsafe_deserialization": "--unsafe-deserialization",
    "model": "--model",
    "imports": "--import",
    "data_major": "--data-major",
    "train_sample": "--train-sample",
    "sample_seed": "--sample-seed",
    "metrics": "--metric",
    "seeds": "--seeds",
    "pattern": "--pattern",
    "model_file": "--model-file",
    "allow_gaps": "--allow-gaps",
    "log": "--log",
    "shard": "--shard",
}


def click_error(error: TruelossReplayError) -> click.ClickException:
    """The Click exception for a library error: exit 2 for a usage error, else 1.

    Decided from the error's fields (``usage``, ``argument``), never from its text; the text
    is shown with flags in place of API arguments.
    """
    message = command_line_text(str(error), FLAGS)
    if not error.usage:
        return click.ClickException(message)
    flag = FLAGS.get(error.argument or "")
    if flag is None:
        return click.UsageError(message)
    return click.BadParameter(message, param_hint=f"'{flag}'")


class _Group(click.Group):
    """Turns library errors into one-line messages unless ``--debug`` asks for tracebacks."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TruelossReplayError as e:
            if ctx.params.get("debug"):
                raise
            raise click_error(e) from e
        except OSError as e:  # a file the library did not expect to fail
            # A closed pipe (`history RUN | head -1`): Click's main() exits quietly.
            if ctx.params.get("debug") or e.errno == errno.EPIPE:
                raise
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from e


@click.group(cls=_Group)
@click.version_option(package_name="trueloss-replay")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
def main(debug: bool) -> None:
    """Replay Keras checkpoints in inference mode and rebuild the true-loss History.

    \b
    Example:
        trueloss-replay history runs/exp1
    """
    if not debug:
        _quiet_tensorflow_import()


def _quiet_tensorflow_import() -> None:
    """Keep TensorFlow's import-time C++ log lines off stderr.

    ``TF_CPP_MIN_LOG_LEVEL`` is not enough: the absl lines (``cudart_stub.cc``, "All log
    messages before absl::InitializeLog()") are written while TensorFlow's shared libraries
    load, before any log level is read (``ABSL_MIN_LOG_LEVEL`` and ``GLOG_minloglevel`` do
    not stop them either). So the first ``import tensorflow`` runs with file descriptor 2 on
    ``/dev/null``; Python exceptions still propagate. Only when the level is 3 (our default,
    or the user's), and lazily: commands that never import TensorFlow stay fast.
    """
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "3":
        return
    if not any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: the real finders locate the package
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def quiet_exec_module(module):
            with _stderr_fd_to_devnull():
                exec_module(module)

        spec.loader.exec_module = quiet_exec_module
        return spec


@contextlib.contextmanager
def _stderr_fd_to_devnull():
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _Option(click.Option):
    """A ``click.Option`` whose older names still work but are left out of ``--help``."""

    def __init__(self, *args, hidden_names: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.hidden_names = set(hidden_names)

    def get_help_record(self, ctx):
        shown, self.opts = self.opts, [o for o in self.opts if o not in self.hidden_names]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


def _results_option(*hidden: str):
    """``--results DIR``: the results folder, on every command that reads or writes one."""
    return click.option(
        "--results",
        *hidden,
        "results",
        cls=_Option,
        hidden_names=hidden,
        type=_FOLDER,
        default=None,
        help="Results folder, where `replay --results` wrote them (default "
        "RUN_DIR/replay/results).",
    )


def _file_option(help: str):
    """``-o/--output FILE``: the file a command writes (``--out`` still works)."""
    return click.option(
        "-o",
        "--output",
        "--out",
        "out",
        cls=_Option,
        hidden_names=("--out",),
        type=_PATH,
        default=None,
        help=help,
    )


# --------------------------------------------------------------------------- history


@main.command()
@click.argument("run_dir", type=_RUN_DIR)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default=None,
    help="Output format (default: from the -o suffix, else table).",
)
@_file_option("Write to this file (.csv or .json) instead of printing.")
@click.option(
    "--full", is_flag=True, help="One row per checkpoint (initial, sub-epoch), not per epoch."
)
@_results_option()
def history(run_dir: Path, fmt: str | None, out: Path | None, full: bool, results: Path | None):
    """Show the true-loss History of a replayed run.

    \b
    Example:
        trueloss-replay history runs/exp1
        trueloss-replay history runs/exp1 -o true_history.csv
        trueloss-replay history runs/exp1 --results /scratch/exp1-results
    """
    from trueloss_replay import history as hist

    if fmt is None:
        fmt = {".csv": "csv", ".json": "json"}.get(out.suffix.lower(), None) if out else "table"
        if fmt is None:
            raise click.BadParameter(
                f"cannot tell the format of {out.name!r}; name it .csv or .json, or pass --format.",
                param_hint="'-o'",
            )
    if fmt == "table" and out is not None:
        raise click.UsageError("--format table prints to the terminal; use csv or json with -o.")
    if full and fmt == "json":
        raise click.UsageError("--full works with --format table or csv.")

    table = hist.load_frame(run_dir, results) if full else hist.load_history(run_dir, results)
    if fmt == "table":
        _print(_frame_table(table) if full else _history_table(table))
        click.echo(_coverage_line(hist.replay_coverage(run_dir, results)))
    elif out is not None:
        (hist.write_csv if fmt == "csv" else hist.write_json)(table, out)
        click.echo(f"wrote {out}")
    else:
        click.echo(hist.format_csv(table) if fmt == "csv" else hist.format_json(table), nl=False)


#: Missing checkpoints named in full on the coverage line; more are counted.
_MISSING_SHOWN = 10


def _coverage_line(coverage) -> str:
    """``7 of 10 checkpoints replayed; missing: e0003, e0007, e0009``."""
    line = f"{len(coverage.replayed)} of {coverage.total} checkpoints replayed"
    if not coverage.missing:
        return line + "."
    names = [Path(name).stem for name in coverage.missing[:_MISSING_SHOWN]]
    more = len(coverage.missing) - len(names)
    return f"{line}; missing: {', '.join(names)}" + (f" and {more} more" if more else "")


def _number(value) -> str:
    value = float(value)
    return "–" if math.isnan(value) else f"{value:.4f}"


def _history_table(history):
    from rich.table import Table

    keys = list(history.history)
    table = Table(title="true-loss History", title_justify="left")
    table.add_column("epoch", justify="right")
    for key in keys:
        table.add_column(key, justify="right")
    for index, epoch in enumerate(history.epoch):
        table.add_row(str(epoch + 1), *(_number(history.history[k][index]) for k in keys))
    return table


def _frame_table(frame):
    from rich.table import Table

    table = Table(title="true-loss figures per checkpoint", title_justify="left")
    for column in frame.columns:
        table.add_column(column, justify="left" if column == "checkpoint" else "right")
    for row in frame.itertuples(index=False):
        name, epochs, step, *values = row
        step = "–" if step is None or step != step else str(int(step))
        table.add_row(name, f"{epochs:.3f}", step, *(_number(v) for v in values))
    return table


def _print(renderable) -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a pipe or file: do not squeeze wide tables to 80 columns
        console = Console(width=200)
    console.print(renderable)


# --------------------------------------------------------------------------- plot


@main.command()
@click.argument("run_dir", type=_RUN_DIR)
@_file_option("Figure file, .png, .svg or .pdf (default RUN_DIR/replay/curves.png).")
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    metavar="NAME",
    help="A quantity to plot (loss, accuracy ...); repeat for several. Default: all.",
)
@click.option(
    "--explain",
    "explain",
    is_flag=True,
    help="Fill the gap under the reported loss with its parts (run `explain` first).",
)
@_results_option()
def plot(
    run_dir: Path, out: Path | None, metrics: tuple[str, ...], explain: bool, results: Path | None
):
    """Plot the true, validation and reported curves of a replayed run.

    \b
    Example:
        trueloss-replay plot runs/exp1
        trueloss-replay plot runs/exp1 -o loss.svg --metric loss
        trueloss-replay plot runs/exp1 --explain --output gap.png
    """
    from trueloss_replay.plot import FORMATS, plot_run

    if out is not None and out.suffix.lower() not in FORMATS:
        raise click.BadParameter(
            f"cannot save a figure as {out.name!r}: the name must end in {', '.join(FORMATS)}.",
            param_hint="'-o'",
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        path = plot_run(run_dir, out, list(metrics) or None, results, explain=explain)
    for warning in caught:  # one line each, without Python's source-line decoration
        click.echo(f"Warning: {warning.message}", err=True)
    click.echo(f"wrote {path}")


# --------------------------------------------------------------------------- inspect


@main.command()
@click.argument("run_dir", type=_RUN_DIR)
@click.option(
    "--verify", is_flag=True, help="Read every checkpoint in full; exit 1 if one is damaged."
)
@_results_option()
def inspect(run_dir: Path, verify: bool, results: Path | None):
    """Show a run's manifest and checkpoints, and which are replayed.

    \b
    Example:
        trueloss-replay inspect runs/exp1 --verify
    """
    from trueloss_replay.history import describe_run

    description = describe_run(run_dir, results, verify=verify)
    _print(_run_summary(description))
    _print(_checkpoint_table(description))
    problems = description.problems
    if verify and problems:
        names = "; ".join(f"{c.name}: {c.error}" for c in problems)
        raise click.ClickException(
            command_line_text(
                f"{len(problems)} of {len(description.checkpoints)} checkpoints failed "
                f"verification: {names}",
                FLAGS,
            )
        )
    if verify:
        click.echo(f"all {len(description.checkpoints)} checkpoints verified.")


def _run_summary(description):
    from rich.table import Table

    manifest = description.manifest
    params = manifest.get("params") or {}
    data = manifest.get("data") or ", ".join(
        f"{k}: {v}" for k, v in (manifest.get("data_files") or {}).items()
    )
    rows = [
        ("run", str(description.path)),
        ("status", str(manifest.get("status", "unknown"))),
        (
            "versions",
            f"keras {manifest.get('keras_version', '?')}, "
            f"tensorflow {manifest.get('tensorflow_version', '?')}, "
            f"backend {manifest.get('backend', '?')}",
        ),
        ("model", f"{manifest.get('model') or 'none'} ({manifest.get('model_class', '?')})"),
        ("data", data or "none"),
        ("params", ", ".join(f"{k}={v}" for k, v in params.items()) or "none"),
        (
            "replayed",
            f"{sum(c.replayed for c in description.checkpoints)} of "
            f"{len(description.checkpoints)} checkpoints",
        ),
    ]
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def _checkpoint_table(description):
    from rich.table import Table

    table = Table(title="checkpoints", title_justify="left")
    for name in ("checkpoint", "epoch", "step", "size", "reported loss", "replayed"):
        table.add_column(name, justify="left" if name == "checkpoint" else "right")
    if description.verified:
        table.add_column("verified", justify="left")
    for c in description.checkpoints:
        cells = [
            c.name,
            str(c.epoch),
            "–" if c.step is None else str(c.step),
            "–" if c.size is None else size_text(c.size),
            _number(c.reported_loss),
            "yes" if c.replayed else "no",
        ]
        if description.verified:
            cells.append("ok" if c.error is None else "[red]damaged[/red]")
        elif c.error:
            cells[0] += " [red](unreadable)[/red]"
        table.add_row(*cells)
    return table


# --------------------------------------------------------------------------- export


@main.command()
@click.argument("run_dir", type=_RUN_DIR)
@click.option(
    "--logdir",
    type=_FOLDER,
    help="The TensorBoard log folder, usually the log_dir of the run's TensorBoard callback.",
)
@click.option("--tensorboard", "logdir_alias", type=_FOLDER, hidden=True)
@click.option(
    "--reported/--no-reported",
    default=True,
    show_default=True,
    help="Also write what Keras reported to train/ and validation/, where no TensorBoard "
    "callback wrote it.",
)
@_results_option()
def export(
    run_dir: Path,
    logdir: Path | None,
    logdir_alias: Path | None,
    reported: bool,
    results: Path | None,
):
    """Export the true curves of a replayed run to TensorBoard, in Keras' own layout.

    The true figures go to LOGDIR/train_true and LOGDIR/validation_true with the tags and
    steps of Keras' TensorBoard callback (epoch_loss, epoch_accuracy, ... at the epoch
    index), so they share its cards; the penalty is epoch_regularization_loss. Exporting
    again replaces the earlier export.

    \b
    Example:
        trueloss-replay export runs/exp1 --logdir logs/exp1
        tensorboard --logdir logs/exp1
    """
    from trueloss_replay.tensorboard import export_tensorboard

    if logdir is None and logdir_alias is None:
        raise click.UsageError("Missing option '--logdir'.")
    if logdir is not None and logdir_alias is not None and logdir != logdir_alias:
        raise click.UsageError("--logdir and --tensorboard (its old name) name different folders.")
    done = export_tensorboard(run_dir, logdir or logdir_alias, results, reported=reported)
    for path in done.files:
        click.echo(f"wrote {path}")
    for run in done.left_to_keras:
        click.echo(f"{done.logdir / run}: reported curves left to the TensorBoard callback's files")


# --------------------------------------------------------------------------- replay


def _summary_table(history, title: str):
    from rich.table import Table

    h = history.history
    columns = [
        ("reported loss", "reported_loss"),
        ("true loss", "loss"),
        ("penalty", "regularization_loss"),
        ("reported val_loss", "reported_val_loss"),
        ("true val_loss", "val_loss"),
    ]
    columns = [(label, key) for label, key in columns if key in h]
    metrics = [
        k
        for k in h
        if not k.startswith(("val_", "reported_", "gap_"))
        and k not in ("loss", "regularization_loss")
    ]
    columns += [(k, k) for k in metrics] + [
        (f"val_{k}", f"val_{k}") for k in metrics if f"val_{k}" in h
    ]
    table = Table(title=title, title_justify="left")
    table.add_column("epoch", justify="right")
    for label, _ in columns:
        table.add_column(label, justify="right")
    for index, epoch in enumerate(history.epoch):
        table.add_row(str(epoch + 1), *(_number(h[key][index]) for _, key in columns))
    return table


def _options(*options):
    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f

    return apply


# What replay and explain both need: where the data comes from, how the model loads.
_data_options = _options(
    click.option("--data", metavar="MOD:FN", help="Data factory returning the train and val data."),
    click.option(
        "--train",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Training data: .npz or .h5 with x, y and optionally sample_weight.",
    ),
    click.option(
        "--val",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Validation data, the same kinds.",
    ),
    click.option(
        "--trust-data-factory",
        is_flag=True,
        help="Call the manifest's data factory even if it is in the standard library or an "
        "installed package (trusted runs only).",
    ),
)
_model_options = _options(
    click.option(
        "--unsafe-deserialization",
        is_flag=True,
        help="Load model.keras with safe_mode=False (Lambda layers; trusted runs only).",
    ),
    click.option("--model", "model_ref", metavar="MOD:FN", help="Builder of the model."),
    click.option(
        "--import",
        "imports",
        multiple=True,
        metavar="MODULE",
        help="Import a module that registers custom objects (repeatable).",
    ),
)


class _SampleSize(click.ParamType):
    """``--train-sample``: a count (``4000``) or a fraction in (0, 1) (``0.1``)."""

    name = "N|FRACTION"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return value
        try:
            return int(value)
        except ValueError:
            pass
        try:
            fraction = float(value)
        except ValueError:
            fraction = math.nan
        if not 0 < fraction < 1:
            self.fail(
                f"{value!r} is neither a count (like 4000) nor a fraction in (0, 1) (like 0.1).",
                param,
                ctx,
            )
        return fraction


def _devices_option(value: str):
    from trueloss_replay.backends import resolve_devices

    return resolve_devices(value)  # a bad value: a usage error naming devices=, see FLAGS


def _epochs_option(value: str | None):
    from trueloss_replay.scheduler import parse_epochs

    return parse_epochs(value)


def _shard_option(value: str | None):
    from trueloss_replay.scheduler import parse_shard

    return parse_shard(value)  # a bad value: a usage error naming shard=, see FLAGS


def _follow_option(ctx, param, value: bool) -> bool:
    # Eager, so that it runs before --devices starts the devices: after that, JAX and
    # TensorFlow would keep the GPU memory they took.
    if value:
        from trueloss_replay.backends import share_device_memory

        share_device_memory()
    return value


@main.command()
@click.argument("run_dir", type=_FOLDER)
@click.option(
    "--follow",
    is_flag=True,
    is_eager=True,
    callback=_follow_option,
    help="Follow a run while it trains: evaluate each checkpoint as it lands, until the "
    "manifest says finished (exit 0) or failed (exit 1).",
)
@click.option(
    "--poll",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="With --follow: seconds between two looks at the run folder (default 2).",
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="With --follow: exit 1 after this long without a new checkpoint (default: wait).",
)
@click.option(
    "--logdir",
    type=_FOLDER,
    default=None,
    help="Also write the true curves as TensorBoard scalars there (with --follow, after "
    "each checkpoint).",
)
@click.option("--tensorboard", "logdir_alias", type=_FOLDER, default=None, hidden=True)
@click.option("--no-plot", is_flag=True, help="With --follow: do not rewrite curves.png.")
@_data_options
@click.option(
    "--batch-size", type=click.IntRange(min=1), help="Evaluation batch size (default 2048)."
)
@click.option(
    "--devices",
    default="auto",
    show_default=True,
    callback=lambda ctx, param, value: _devices_option(value),
    help="auto, cpu, gpu, GPU indices like 0,1, or device names like /CPU:0,/CPU:1.",
)
@click.option(
    "--epochs",
    metavar="LIST",
    callback=lambda ctx, param, value: _epochs_option(value),
    help="Checkpoints to evaluate, by completed epochs, e.g. 1,3,5-9.",
)
@click.option("--force", is_flag=True, help="Recompute results that already exist.")
@click.option(
    "--shard",
    metavar="i/n|auto",
    callback=lambda ctx, param, value: _shard_option(value),
    help="Evaluate only share i of n (from 0; checkpoint p goes to shard p mod n), for the "
    "jobs of a job array; auto reads Slurm's or a Kubernetes Indexed Job's variables.",
)
@_results_option("--output")
@_model_options
@click.option(
    "--data-major",
    is_flag=True,
    help="Evaluate several checkpoints per produced batch (for slow input pipelines).",
)
@click.option(
    "--train-sample",
    type=_SampleSize(),
    default=None,
    metavar="N|FRACTION",
    help="Evaluate a fixed random subset of the training set (a count like 4000 or a "
    "fraction like 0.1), the same at every checkpoint, with standard errors (loss_se, ...).",
)
@click.option(
    "--sample-seed",
    type=click.IntRange(min=0),
    default=None,
    help="With --train-sample: the seed that draws the subset (default 0).",
)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def replay(
    run_dir: Path,
    follow: bool,
    poll: float | None,
    idle_timeout: float | None,
    logdir: Path | None,
    logdir_alias: Path | None,
    no_plot: bool,
    data: str | None,
    train: Path | None,
    val: Path | None,
    trust_data_factory: bool,
    batch_size: int | None,
    devices: list[str],
    epochs: EpochSet | None,
    force: bool,
    shard: Shard | None,
    results: Path | None,
    unsafe_deserialization: bool,
    model_ref: str | None,
    imports: tuple[str, ...],
    data_major: bool,
    train_sample: int | float | None,
    sample_seed: int | None,
    no_progress: bool,
):
    """Evaluate every checkpoint in inference mode and write the true-loss results.

    Results go to RUN_DIR/replay/results (one JSON per checkpoint), the History to
    RUN_DIR/replay/history.csv and history.json. A rerun skips finished checkpoints.

    With --follow, RUN_DIR may be a run still training (or not started yet): each checkpoint
    is evaluated as it lands, and history.csv, history.json, curves.png (and --logdir) are
    rewritten after each. Exit 0 when the training finished, 1 when it failed or after
    --idle-timeout, 130 on Ctrl-C (every result written is kept).

    With --shard i/n, n processes (the tasks of a Slurm array or a Kubernetes Indexed Job)
    replay one run together, each its share; whichever finishes rewrites history.csv and
    history.json from all the results present. `trueloss-replay history` shows what is
    still missing.

    \b
    Example:
        trueloss-replay replay runs/exp1
        trueloss-replay replay runs/exp1 --data my_project.data:load --devices 0,1
        trueloss-replay replay runs/exp1 --epochs 10-20 --batch-size 4096 --force
        trueloss-replay replay runs/exp1 --follow --idle-timeout 3600 --logdir logs/exp1
        trueloss-replay replay runs/exp1 --results /scratch/exp1-results
        trueloss-replay replay runs/exp1 --shard 0/4
        trueloss-replay replay runs/exp1 --shard auto
        trueloss-replay replay runs/exp1 --train-sample 4000 --sample-seed 1
    """
    from trueloss_replay.errors import ReplayIncompleteError
    from trueloss_replay.scheduler import replay as run_replay

    if logdir is not None and logdir_alias is not None and logdir != logdir_alias:
        raise click.UsageError("--tensorboard is another name for --logdir; give one of them.")
    logdir = logdir or logdir_alias
    # What replay and the follower both take.
    options = dict(
        data=data,
        train=train,
        val=val,
        batch_size=batch_size,
        devices=devices,
        epochs=epochs,
        force=force,
        output=results,
        unsafe_deserialization=unsafe_deserialization,
        model=model_ref,
        imports=imports,
        trust_data_factory=trust_data_factory,
    )
    if follow:
        if shard is not None:
            raise click.UsageError(
                "--shard splits the checkpoints that are there; --follow evaluates each as "
                "it lands. Give one of them."
            )
        if data_major:
            raise click.UsageError(
                "--data-major groups checkpoints that are all there; --follow evaluates each "
                "as it lands. Give one of them."
            )
        if train_sample is not None or sample_seed is not None:
            raise click.UsageError(
                "--train-sample does not apply with --follow yet; replay the finished run "
                "with --train-sample instead."
            )
        _follow(
            run_dir,
            poll=poll,
            idle_timeout=idle_timeout,
            logdir=logdir,
            plot=not no_plot,
            no_progress=no_progress,
            **options,
        )
        return
    for flag, value in (("--poll", poll), ("--idle-timeout", idle_timeout), ("--no-plot", no_plot)):
        if value:
            raise click.UsageError(f"{flag} only applies with --follow.")
    if not is_url(run_dir) and not run_dir.is_dir():
        raise click.BadParameter(
            f"Directory {str(run_dir)!r} does not exist (with --follow it may not exist yet).",
            param_hint="'RUN_DIR'",
        )
    tally = None
    try:
        with contextlib.ExitStack() as stack:
            progress = not no_progress
            if shard is not None:
                from trueloss_replay.progress import progress_display

                tally = _Tally(stack.enter_context(progress_display(progress)))
                progress = tally
            history = run_replay(
                run_dir,
                data_major=data_major,
                progress=progress,
                shard=shard,
                train_sample=train_sample,
                sample_seed=sample_seed,
                **options,
            )
    except ReplayIncompleteError as e:
        if e.history.epoch:
            _print(_summary_table(e.history, f"true loss of {run_dir} (incomplete)"))
        if tally is not None:
            click.echo(tally.summary(shard, run_dir, results))
        if logdir is not None and e.history.epoch:
            _export_tensorboard(run_dir, logdir, results)
        raise
    _print(_summary_table(history, f"true loss of {run_dir}"))
    if tally is not None:
        click.echo(tally.summary(shard, run_dir, results))
    if logdir is not None:
        _export_tensorboard(run_dir, logdir, results)


class _Tally:
    """Forwards the progress hooks to a display and keeps the names of what it evaluated."""

    def __init__(self, target):
        self._target = target
        self.evaluated: list[str] = []
        self.reused: list[str] = []

    def __getattr__(self, name: str):
        return getattr(self._target, name)

    def checkpoint_done(self, result, reused: bool) -> None:
        if result is not None:
            (self.reused if reused else self.evaluated).append(result["checkpoint"])
        self._target.checkpoint_done(result, reused)

    def summary(self, shard, run_dir: Path, results: Path | None) -> str:
        """``shard 1/3: evaluated e0001, e0004; reused none. 5 of 6 checkpoints ...``"""
        from trueloss_replay.history import replay_coverage

        def names(found: list[str]) -> str:
            return ", ".join(Path(n).stem for n in found) or "none"

        return (
            f"shard {shard}: evaluated {names(self.evaluated)}; reused {names(self.reused)}. "
            + _coverage_line(replay_coverage(run_dir, results))
        )


def _export_tensorboard(run_dir: Path, logdir: Path, results: Path | None) -> None:
    from trueloss_replay.tensorboard import export_tensorboard

    for path in export_tensorboard(run_dir, logdir, results).files:
        click.echo(f"wrote {path}")


class _FollowLog:
    """The follower's progress hooks as one line per event: a follower's output is a log."""

    def waiting(self, manifest_path) -> None:
        click.echo(f"waiting for {manifest_path} (start the training) ...")

    def checkpoint_done(self, result, reused: bool) -> None:
        figures = [
            f"{key} {_number(value)}"
            for key, value in (
                ("loss", (result.get("train") or {}).get("loss")),
                ("val_loss", (result.get("val") or {}).get("loss")),
            )
            if value is not None
        ]
        how = "stored result reused" if reused else f"{float(result.get('seconds') or 0):.1f} s"
        click.echo(f"{result['checkpoint']}: {', '.join(figures)} ({how})")

    def checkpoint_failed(self, name: str, reason: str) -> None:
        reason = " ".join(command_line_text(reason, FLAGS).split())
        click.echo(f"{name}: cannot be evaluated: {reason}", err=True)

    def checkpoint_missed(self, name: str, reason: str) -> None:
        click.echo(f"{name}: missed, {reason}")


def _follow(run_dir: Path, *, poll, idle_timeout, no_progress, **options) -> None:
    from trueloss_replay.errors import ReplayIncompleteError
    from trueloss_replay.following import DEFAULT_POLL, follow
    from trueloss_replay.run import RESULTS_DIR

    folder = options["output"] or Path(run_dir) / RESULTS_DIR  # follow() refuses URLs
    try:
        outcome = follow(
            run_dir,
            poll=DEFAULT_POLL if poll is None else poll,
            idle_timeout=idle_timeout,
            progress=None if no_progress else _FollowLog(),
            **options,
        )
    except KeyboardInterrupt:
        # Exit 130, as a shell reports a command stopped by SIGINT; no traceback.
        click.echo(f"interrupted; every result written is kept in {folder}.", err=True)
        sys.exit(130)
    if outcome.history.epoch:
        _print(_summary_table(outcome.history, f"true loss of {run_dir}"))
    done = len(outcome.evaluated) + len(outcome.reused)
    summary = f"{len(outcome.evaluated)} checkpoint(s) evaluated, {len(outcome.reused)} reused"
    if outcome.missed:
        summary += f"; missed {len(outcome.missed)}: {', '.join(outcome.missed)}"
    if outcome.status == "finished":
        click.echo(f"the training finished; {summary}.")
    if outcome.failures:
        raise ReplayIncompleteError(run_dir, outcome.failures, outcome.history, done)
    if outcome.status == "failed":
        raise click.ClickException(
            f"the training of {run_dir} failed (its manifest says 'failed'); {summary}, "
            f"results in {folder}."
        )
    if outcome.status == "idle" and not (run_dir / "manifest.json").is_file():
        raise click.ClickException(
            f"{run_dir} got no manifest.json in {idle_timeout:g} s (--idle-timeout): no "
            "training with ReplayCheckpoint started there. Check the path."
        )
    if outcome.status == "idle":
        raise click.ClickException(
            f"no new checkpoint in {run_dir} for {idle_timeout:g} s (--idle-timeout) while "
            f"its manifest says 'running': was the training process stopped? {summary}; "
            "run the same command again to go on following."
        )


# --------------------------------------------------------------------------- explain


@main.command()
@click.argument("run_dir", type=_RUN_DIR)
@click.option(
    "--seeds",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Dropout seeds (0, 1, ...) to average the training-mode pass over.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="The training batch size (default: inferred from the steps per epoch).",
)
@click.option("--force", is_flag=True, help="Recompute parts that are already stored.")
@_data_options
@_results_option()
@_model_options
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def explain(
    run_dir: Path,
    seeds: int,
    batch_size: int | None,
    force: bool,
    data: str | None,
    train: Path | None,
    val: Path | None,
    trust_data_factory: bool,
    results: Path | None,
    unsafe_deserialization: bool,
    model_ref: str | None,
    imports: tuple[str, ...],
    no_progress: bool,
):
    """Split each epoch's reported training loss into true loss, penalty, training mode, drift.

    Replays the epoch-end checkpoints first if needed, evaluates the training set in training
    mode (dropout on, BatchNorm on batch statistics) without changing the model or its
    files, stores the parts in the results (History keys gap_penalty, gap_training_mode,
    gap_drift) and prints a table and a verdict.

    \b
    Example:
        trueloss-replay explain runs/exp1
        trueloss-replay explain runs/exp1 --seeds 10 --batch-size 64
        trueloss-replay plot runs/exp1 --explain
    """
    from trueloss_replay.explanation import ExplainIncompleteError, verdict
    from trueloss_replay.explanation import explain as run_explain

    try:
        frame = run_explain(
            run_dir,
            seeds=seeds,
            batch_size=batch_size,
            force=force,
            data=data,
            train=train,
            val=val,
            output=results,
            unsafe_deserialization=unsafe_deserialization,
            model=model_ref,
            imports=imports,
            trust_data_factory=trust_data_factory,
            progress=not no_progress,
        )
    except ExplainIncompleteError as e:
        if len(e.frame):
            _print(_explain_table(e.frame, f"the reported-loss gap of {run_dir} (incomplete)"))
        raise
    _print(_explain_table(frame, f"the reported-loss gap of {run_dir}"))
    click.echo()
    click.echo(verdict(frame))


def _explain_table(frame, title: str):
    from rich.table import Table

    columns = [
        ("reported loss", "reported_loss"),
        ("true loss", "loss"),
        ("penalty", "gap_penalty"),
        ("training mode", "gap_training_mode"),
        ("± se", "gap_training_mode_se"),
        ("drift", "gap_drift"),
        ("true val_loss", "val_loss"),
    ]
    table = Table(title=title, title_justify="left")
    table.add_column("epoch", justify="right")
    for label, _ in columns:
        table.add_column(label, justify="right")
    for _, row in frame.iterrows():
        table.add_row(str(int(row["epoch"])), *(_number(row[key]) for _, key in columns))
    return table


# --------------------------------------------------------------------------- adopt


def _pattern_option(value: str | None):
    from trueloss_replay.adoption import epoch_parser
    from trueloss_replay.errors import AdoptError

    if value is not None:
        try:
            epoch_parser(value)
        except AdoptError as e:
            raise click.BadParameter(str(e)) from e
    return value


@main.command()
@click.argument("src", type=_LocalPath(exists=True, file_okay=False, path_type=Path))
@click.argument("run_dir", type=_FOLDER)
@click.option(
    "--pattern",
    metavar="PATTERN",
    callback=lambda ctx, param, value: _pattern_option(value),
    help="ModelCheckpoint's filepath, e.g. 'ckpt-{epoch:03d}.weights.h5' (default: the first "
    "integer of each name is its epoch).",
)
@click.option(
    "--model-file",
    type=_LocalPath(exists=True, dir_okay=False, path_type=Path),
    help="A .keras file with the architecture (default: the newest .keras checkpoint).",
)
@click.option("--data", metavar="MOD:FN", help="Data factory returning the train and val data.")
@click.option(
    "--train",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Training data to snapshot: .npz or .h5 with x, y and optionally sample_weight.",
)
@click.option(
    "--val",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Validation data to snapshot, the same kinds.",
)
@click.option(
    "--log",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="What Keras reported: a CSVLogger file or a saved History JSON.",
)
@click.option(
    "--allow-gaps",
    is_flag=True,
    help="Accept missing epochs (save_best_only=True); default: they are an error.",
)
@_model_options
def adopt(
    src: Path,
    run_dir: Path,
    pattern: str | None,
    model_file: Path | None,
    data: str | None,
    train: Path | None,
    val: Path | None,
    log: Path | None,
    allow_gaps: bool,
    unsafe_deserialization: bool,
    model_ref: str | None,
    imports: tuple[str, ...],
):
    """Turn a folder of Keras ModelCheckpoint files into a run folder.

    SRC holds *.weights.h5 (save_weights_only=True) or *.keras files, one per epoch. Each
    is rewritten as a native checkpoint in RUN_DIR (a new folder), so replay, history, plot,
    explain, export and inspect work on it as on a run of ReplayCheckpoint.

    \b
    Example:
        trueloss-replay adopt ckpts runs/exp1 --pattern 'ckpt-{epoch:03d}.weights.h5' \\
            --model-file model.keras --train train.npz --val val.npz --log training.log
        trueloss-replay replay runs/exp1
    """
    from trueloss_replay.adoption import adopt as adopt_run

    if model_ref is not None and model_file is not None:
        raise click.UsageError("pass --model or --model-file, not both.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        run = adopt_run(
            src,
            run_dir,
            pattern=pattern,
            model=model_ref,
            model_file=model_file,
            data=data,
            train=train,
            val=val,
            log=log,
            allow_gaps=allow_gaps,
            unsafe_deserialization=unsafe_deserialization,
            imports=imports,
        )
    for warning in caught:
        if "trueloss-replay:" in str(warning.message):
            click.echo(
                f"warning: {str(warning.message).removeprefix('trueloss-replay: ')}", err=True
            )
    epochs = [c.epoch for c in run.checkpoints()]
    click.echo(
        f"adopted {len(epochs)} checkpoint(s) of {src} (epochs {epochs[0]}-{epochs[-1]}) as "
        f"{run.path}"
    )
    click.echo(f"next: trueloss-replay replay {run.path}")


# --------------------------------------------------------------------------- demo


@main.command()
@click.argument("directory", default="demo-run", type=_FOLDER)
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo(directory: Path, epochs: int, no_progress: bool):
    """Train a small regularized model on the digits data, replay it, plot the true loss.

    Needs scikit-learn (pip install 'trueloss-replay[demo]'), whose digits data ships with
    the package. Writes DIRECTORY/run, DIRECTORY/curves.png and DIRECTORY/history.csv.

    \b
    Example:
        trueloss-replay demo demo-run
    """
    from trueloss_replay.demo import run_demo

    click.echo(f"training the demo model for {epochs} epochs on scikit-learn's digits ...")
    result = run_demo(directory, epochs=epochs, progress=not no_progress)
    click.echo(f"run folder: {result.run_dir}")
    click.echo(f"plot:       {result.plot}")
    click.echo(f"csv:        {result.csv}")
    click.echo(result.headline())
