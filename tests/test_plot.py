"""Figures of a History: panels, lines and labels (not pixels), files, warnings."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import keras
import matplotlib
import pytest

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from trueloss_replay import RunWriteError, load_history, plot_history  # noqa: E402
from trueloss_replay.plot import PlotError, save_figure  # noqa: E402

MAGIC = {".png": b"\x89PNG\r\n\x1a\n", ".pdf": b"%PDF-", ".svg": b"<?xml"}


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines()]


def line(ax, label: str):
    (found,) = [line for line in ax.get_lines() if line.get_label() == label]
    return found


def test_one_panel_per_quantity_with_true_val_and_reported(replayed_run):
    history = load_history(replayed_run)

    fig = plot_history(history)

    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy"]
    loss, accuracy = fig.axes
    assert labels(loss) == [
        "train (true)",
        "val",
        "train (reported by Keras)",
        "val (reported by Keras)",
        "penalty (regularization_loss)",
    ]
    assert labels(accuracy) == [
        "train (true)",
        "val",
        "train (reported by Keras)",
        "val (reported by Keras)",
    ]
    assert line(loss, "train (reported by Keras)").get_linestyle() == "--"
    assert line(loss, "val (reported by Keras)").get_linestyle() == "--"


def test_lines_hold_the_history_against_1_based_epochs(replayed_run):
    history = load_history(replayed_run)

    loss = plot_history(history).axes[0]

    for label, key in [
        ("train (true)", "loss"),
        ("val", "val_loss"),
        ("train (reported by Keras)", "reported_loss"),
        ("val (reported by Keras)", "reported_val_loss"),
        ("penalty (regularization_loss)", "regularization_loss"),
    ]:
        xs, ys = line(loss, label).get_data()
        assert list(xs) == [1, 2, 3]
        assert list(ys) == history.history[key]


def test_run_folder_is_plotted_from_its_results(replayed_run):
    fig = plot_history(replayed_run)

    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy"]


def test_metrics_selects_the_panels(replayed_run):
    fig = plot_history(load_history(replayed_run), metrics=["accuracy"])

    assert [ax.get_title() for ax in fig.axes] == ["accuracy"]


def test_unknown_metric_is_named(replayed_run):
    with pytest.raises(PlotError, match="no 'f1' to plot; it has: loss, accuracy"):
        plot_history(load_history(replayed_run), metrics=["f1"])


def test_plain_fit_history(trained_run):
    fig = plot_history(trained_run.history)

    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy"]
    assert labels(fig.axes[0]) == ["train", "val"]
    xs, ys = fig.axes[0].get_lines()[0].get_data()
    assert list(xs) == [1, 2, 3]
    assert list(ys) == trained_run.history.history["loss"]


def test_draws_into_given_axes(trained_run):
    fig, axes = plt.subplots(1, 2)

    assert plot_history(trained_run.history, ax=axes) is fig
    assert [ax.get_title() for ax in axes] == ["loss", "accuracy"]


def test_nan_and_inf_leave_gaps_and_warn_once():
    history = keras.callbacks.History()
    history.history = {"loss": [1.0, math.nan, 0.5, math.inf], "val_loss": [1.2, 1.1, 1.0, 0.9]}
    history.epoch = [0, 1, 2, 3]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = plot_history(history)

    assert len(caught) == 1, [str(w.message) for w in caught]
    assert "loss" in str(caught[0].message) and "val_loss" not in str(caught[0].message)
    _, ys = fig.axes[0].get_lines()[0].get_data()
    assert ys[0] == 1.0 and ys[2] == 0.5
    assert math.isnan(ys[1]) and math.isnan(ys[3])


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_figure_files(trained_run, tmp_path, suffix):
    path = tmp_path / f"curves{suffix}"

    plot_history(trained_run.history, path=path)

    assert path.read_bytes().startswith(MAGIC[suffix])
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    if suffix == ".png":
        assert matplotlib.image.imread(path).shape[2] == 4
    if suffix == ".svg":
        assert b"<svg" in path.read_bytes()


def test_saved_figure_is_not_registered_with_pyplot(trained_run, tmp_path):
    plot_history(trained_run.history, path=tmp_path / "curves.png")

    assert plt.get_fignums() == []


def test_unsupported_figure_format(trained_run, tmp_path):
    fig = plot_history(trained_run.history)

    with pytest.raises(PlotError, match=r"'curves\.gif'.*\.png, \.svg, \.pdf"):
        save_figure(fig, tmp_path / "curves.gif")


# Keras 3 itself imports matplotlib.pyplot when it is installed (keras.src.visualization),
# so "matplotlib" in sys.modules after `import trueloss_replay` says nothing about this
# package. Instead, matplotlib is made unimportable: Keras copes with that, and so must every
# module of trueloss-replay until a figure is actually drawn.
_WITHOUT_MATPLOTLIB = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("blocked: " + name)

sys.meta_path.insert(0, Block())
import trueloss_replay, trueloss_replay.cli, trueloss_replay.history, trueloss_replay.plot
try:
    trueloss_replay.plot_history({"loss": [1.0]})
except ImportError as e:
    print("drawing needs", e)
"""


def test_importing_the_package_does_not_import_matplotlib():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_MATPLOTLIB], capture_output=True, text=True, env=env
    )

    assert done.returncode == 0, done.stderr[-2000:]
    assert "drawing needs blocked: matplotlib" in done.stdout


def test_figure_write_error_names_the_file_once(tmp_path):
    history = keras.callbacks.History()
    history.history, history.epoch = {"loss": [1.0, 0.5]}, [0, 1]
    fig = plot_history(history)
    target = tmp_path / "no_such_folder" / "curves.png"

    with pytest.raises(RunWriteError) as caught:
        save_figure(fig, target)

    message = str(caught.value)
    assert message.startswith(f"could not write {target}: No such file or directory")
    assert message.count("could not write") == 1
