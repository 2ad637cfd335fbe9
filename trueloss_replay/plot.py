"""Matplotlib figures of a true-loss History: one panel per quantity, true against reported.

matplotlib is imported inside the functions only, so ``import trueloss_replay`` stays light
and never picks a GUI backend. A figure that is saved (``path=...``, the CLI) is a plain
``matplotlib.figure.Figure`` on the Agg canvas, never registered with pyplot: it needs no
display and is freed like any object. A figure that is only returned goes through pyplot, so
``plt.show()`` and notebooks display it as Keras users expect.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trueloss_replay import run as runfmt
from trueloss_replay.errors import PlotError
from trueloss_replay.history import (
    GAP_PREFIX,
    REPORTED_PREFIX,
    as_history,
    load_history,
    replay_folder,
)
from trueloss_replay.sampling import SE_SUFFIX

FORMATS = (".png", ".svg", ".pdf")
DEFAULT_FIGURE = "curves.png"

TRAIN_LABEL = "train (true)"
VAL_LABEL = "val"
REPORTED_LABEL = "train (reported by Keras)"
VAL_REPORTED_LABEL = "val (reported by Keras)"
PENALTY_LABEL = "penalty (regularization_loss)"
VAL_PENALTY_LABEL = "val penalty (val_regularization_loss)"

BAND_LABEL = "train ±2 SE (sampled)"

_PENALTIES = ("regularization_loss", "val_regularization_loss")
# The stacked parts of the explained gap, bottom to top, on top of the true loss.
_GAP_PARTS = (
    ("gap_penalty", "penalty", "C2"),
    ("gap_training_mode", "training mode", "C4"),
    ("gap_drift", "within-epoch drift", "C7"),
)
_COLUMNS = 3


def quantities(history: Any) -> list[str]:
    """The panels ``plot_history`` draws: ``loss`` first, then each metric, in History order.

    ``val_x`` and ``reported_x`` belong to the panel of ``x``; the regularization penalty is
    drawn on the loss panel; ``x_se`` (a sampled replay's standard error) is the band
    around ``x``.

    Example:
        >>> quantities({"loss": [1.0], "val_loss": [1.1], "accuracy": [0.5]})
        ['loss', 'accuracy']
    """
    history = as_history(history)
    names = []
    bands = {key for key in history.history if _is_band(key, history.history)}
    for key in history.history:
        if key in bands:
            continue
        base = key[len(REPORTED_PREFIX) :] if key.startswith(REPORTED_PREFIX) else key
        base = base[len("val_") :] if base.startswith("val_") else base
        if base not in names and key not in _PENALTIES and not key.startswith(GAP_PREFIX):
            names.append(base)
    return sorted(names, key=lambda name: name != "loss")


def plot_history(
    history_or_run_dir: Any,
    metrics: Sequence[str] | None = None,
    path: str | os.PathLike | None = None,
    *,
    ax: Any = None,
    output: str | os.PathLike | None = None,
    title: str | None = None,
    explain: bool = False,
):
    """Plots a History: one panel per quantity, true training, validation and reported curves.

    On each panel: the true training curve (``train (true)``), validation (``val``) and what
    Keras reported during training (dashed, ``train (reported by Keras)`` and ``val (reported
    by Keras)``); the loss panel also shows the regularization penalty, the part of the
    reported loss that is not data loss. A sampled replay (``train_sample=``) draws a band
    of +/- 2 standard errors (``loss_se``, ...) around the true training curve. A plain
    History from ``model.fit()`` works too (its curves are labelled ``train`` and ``val``).
    The x axis counts epochs from 1, as Keras prints them. NaN and infinite values
    (checkpoints not replayed yet, a diverged loss) are left as gaps, with one warning naming
    their keys.

    Args:
        history_or_run_dir: a ``keras.callbacks.History``, a ``{key: list}`` dict, a
            ``load_frame`` table, or a run folder (its stored results are loaded).
        metrics: the quantities to draw (``["loss", "accuracy"]``); default all of them.
        path: save the figure there too (``.png``, ``.svg`` or ``.pdf``).
        ax: an Axes, or a sequence with one Axes per quantity, to draw into.
        output: the results folder, when ``history_or_run_dir`` is a run folder whose
            replay was given one.
        title: a title above the panels.
        explain: on the loss panel, fill the gap between the true and the reported training
            loss with its parts (``gap_penalty``, ``gap_training_mode``, ``gap_drift``, from
            ``trueloss-replay explain``) as stacked areas.

    Returns:
        matplotlib.figure.Figure: the figure, one Axes per quantity.

    Raises:
        PlotError: a name in ``metrics`` is not in the History, the History is empty,
            ``path`` has an unsupported suffix, or ``explain`` without explained parts.
        RunFormatError: a run folder that cannot be read.

    Example:
        >>> fig = plot_history(model.fit(x, y, validation_split=0.2, epochs=5))
        >>> fig = plot_history("runs/exp1", metrics=["loss"], path="loss.svg")
    """
    if path is not None:
        _check_suffix(path)
    if isinstance(history_or_run_dir, (str, os.PathLike)):
        history = load_history(history_or_run_dir, output)
    else:
        history = as_history(history_or_run_dir)
    available = quantities(history)
    names = list(dict.fromkeys(metrics)) if metrics else available
    unknown = [name for name in names if name not in available]
    if unknown or not names:
        raise PlotError(
            f"the History has no {unknown[0]!r} to plot; it has: {', '.join(available)}."
            if unknown
            else "the History is empty; there is nothing to plot.",
            usage=bool(unknown),
            argument="metrics" if unknown else None,
        )

    if explain and not all(key in history.history for key, _, _ in _GAP_PARTS):
        raise PlotError(
            "the History has no explained gap (gap_penalty, gap_training_mode, gap_drift); "
            "explain the run first: explain(run_dir), or the explain command."
        )
    if explain and "loss" not in names:
        raise PlotError(
            "explain draws on the loss panel; include 'loss' in the metrics.",
            usage=True,
            argument="metrics",
        )

    fig, axes = _axes(len(names), ax, for_saving=path is not None)
    series, non_finite = _series(history)
    is_replay = any(key.startswith(REPORTED_PREFIX) for key in history.history)
    for name, axes_ in zip(names, axes, strict=True):
        if explain and name == "loss":
            _gap_areas(axes_, series)
        _panel(axes_, name, series, is_replay)
    if non_finite:
        warnings.warn(
            f"trueloss-replay: {', '.join(non_finite)} "
            f"{'has' if len(non_finite) == 1 else 'have'} NaN or infinite values (checkpoints "
            "not replayed yet, or a diverged loss); they are left as gaps in the plot.",
            RuntimeWarning,
            stacklevel=2,
        )
    if title:
        fig.suptitle(title)
    if path is not None:
        save_figure(fig, path)
    return fig


def _axes(count: int, ax: Any, for_saving: bool):
    if ax is not None:
        if hasattr(ax, "flat"):  # a numpy array of Axes, as plt.subplots returns
            axes = list(ax.flat)
        else:
            axes = list(ax) if isinstance(ax, Sequence) else [ax]
        if len(axes) != count:
            raise PlotError(f"{count} panels to draw, but {len(axes)} Axes were given.")
        return axes[0].figure, axes
    columns = min(count, _COLUMNS)
    rows = math.ceil(count / columns)
    size = (4.8 * columns, 3.6 * rows)
    if for_saving:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=size, layout="constrained")
        FigureCanvasAgg(fig)
    else:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=size, layout="constrained")
    grid = fig.subplots(rows, columns, squeeze=False).flatten()
    for extra in grid[count:]:
        extra.remove()
    return fig, list(grid[:count])


def _series(history) -> tuple[dict[str, tuple[list[int], list[float]]], list[str]]:
    # Every key as (1-based epochs, values with NaN for anything not finite).
    epochs = getattr(history, "epoch", None)
    series, non_finite = {}, []
    for key, values in history.history.items():
        values = [_finite_or_nan(v) for v in values]
        if any(math.isnan(v) for v in values):
            non_finite.append(key)
        xs = (
            [int(e) + 1 for e in epochs]
            if epochs is not None and len(epochs) == len(values)
            else list(range(1, len(values) + 1))
        )
        series[key] = (xs, values)
    return series, non_finite


def _is_band(key: str, history: dict) -> bool:
    # "loss_se" beside "loss": a standard error drawn as a band, not a quantity of its own.
    return key.endswith(SE_SUFFIX) and key[: -len(SE_SUFFIX)] in history


def _band(ax, name: str, series) -> None:
    """The true training curve +/- 2 standard errors of a sampled replay (``name_se``)."""
    import numpy as np

    xs, values = series[name]
    se = np.asarray(series[name + SE_SUFFIX][1], dtype=float)
    values = np.asarray(values, dtype=float)
    ax.fill_between(
        xs, values - 2 * se, values + 2 * se, color="C0", alpha=0.2, linewidth=0, label=BAND_LABEL
    )


def _finite_or_nan(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def _panel(ax, name: str, series, is_replay: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    lines = [
        (name, TRAIN_LABEL if is_replay else "train", {"color": "C0"}),
        ("val_" + name, VAL_LABEL, {"color": "C1"}),
        (REPORTED_PREFIX + name, REPORTED_LABEL, {"color": "C0", "linestyle": "--"}),
        # Keras' val_loss carries the penalty too: shown so the two gaps can be compared.
        (REPORTED_PREFIX + "val_" + name, VAL_REPORTED_LABEL, {"color": "C1", "linestyle": "--"}),
    ]
    if name == "loss":
        lines.append((_PENALTIES[0], PENALTY_LABEL, {"color": "C2", "linestyle": ":"}))
        if _differs(series, *_PENALTIES):  # activity penalties differ between the sets
            lines.append((_PENALTIES[1], VAL_PENALTY_LABEL, {"color": "C3", "linestyle": ":"}))
    if name in series and name + SE_SUFFIX in series:
        _band(ax, name, series)
    for key, label, style in lines:
        if key in series:
            xs, values = series[key]
            ax.plot(xs, values, label=label, marker="o", markersize=3, **style)
    ax.set_title(name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def _gap_areas(ax, series) -> None:
    import numpy as np

    xs, bottom = series["loss"]
    bottom = np.asarray(bottom, dtype=float)
    for key, label, color in _GAP_PARTS:
        top = bottom + np.asarray(series[key][1], dtype=float)
        # Stacked on the true loss, the last part ends exactly on the reported loss.
        ax.fill_between(xs, bottom, top, label=label, color=color, alpha=0.3, linewidth=0)
        bottom = top


def _differs(series, first: str, second: str) -> bool:
    if first not in series or second not in series:
        return second in series
    a, b = series[first][1], series[second][1]
    return any(
        not (math.isnan(x) and math.isnan(y))
        and not math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-12)
        for x, y in zip(a, b, strict=False)
    )


def _check_suffix(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise PlotError(
            f"cannot save a figure as {Path(path).name!r}: the name must end in "
            f"{', '.join(FORMATS)}."
        )
    return suffix


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Saves a figure as PNG, SVG or PDF (by the suffix of ``path``), atomically.

    Args:
        fig: a matplotlib Figure.
        path: the file to write; its folder must exist.

    Returns:
        The path written.

    Raises:
        PlotError: the suffix is not ``.png``, ``.svg`` or ``.pdf``.
        RunWriteError: the file could not be written.

    Example:
        >>> save_figure(plot_history(history), "curves.pdf")
    """
    from trueloss_replay.run import atomic_path

    path = Path(path)
    suffix = _check_suffix(path)
    # atomic_path turns any OSError into one RunWriteError naming the path: not wrapped twice.
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=suffix[1:], dpi=150 if suffix == ".png" else "figure")
    return path


def plot_run(
    run_dir: str | os.PathLike,
    path: str | os.PathLike | None = None,
    metrics: Sequence[str] | None = None,
    output: str | os.PathLike | None = None,
    explain: bool = False,
) -> Path:
    """Plots a run's stored results to a file, without a display (what ``plot`` runs).

    Args:
        run_dir: the run folder.
        path: the figure file; default ``RUN_DIR/replay/curves.png`` (or in ``output``).
        metrics: the quantities to draw; default all.
        output: the results folder, if the replay was given one.
        explain: draw the explained parts of the gap under the reported loss.

    Returns:
        The path written.

    Raises:
        RunFormatError: not a run folder, a damaged result, or nothing replayed yet.
        PlotError: an unknown quantity or figure format, or ``explain`` before explaining.

    Example:
        >>> plot_run("runs/exp1")
        PosixPath('runs/exp1/replay/curves.png')
    """
    run_dir, output = runfmt.local_folders(run_dir, output)
    path = Path(path) if path is not None else replay_folder(run_dir, output) / DEFAULT_FIGURE
    _check_suffix(path)
    history = load_history(run_dir, output)
    plot_history(history, metrics, path, title=Path(run_dir).resolve().name, explain=explain)
    return path
