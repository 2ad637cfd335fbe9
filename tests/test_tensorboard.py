"""export_tensorboard in Keras' own layout, read back with TensorBoard's own readers."""

from __future__ import annotations

import subprocess
import sys

import keras
import pytest

from tests.conftest import build_model, make_data
from trueloss_replay import ReplayCheckpoint, replay
from trueloss_replay.errors import MissingDependencyError, RunWriteError
from trueloss_replay.tensorboard import export_tensorboard


def read_run(folder, accumulator="event_accumulator") -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of a TensorBoard run folder, as TensorBoard reads it."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(
        str(folder), size_guidance={event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    scalars: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["tensors"]:
        if acc.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
            continue  # Keras' model summary, a text plugin
        events = acc.Tensors(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{folder}: {tag} holds a step twice: {steps}"
        scalars[tag] = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in events}
    return scalars


def by_step(values) -> dict[int, float]:
    return dict(enumerate(float(v) for v in values))


def event_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "tfevents" in p.name)


def test_true_curves_land_beside_keras_tensorboard_callback(trained_run, tmp_path):
    # Not run again under JAX: the export is backend-free (test_export_needs_no_tensorflow),
    # and Keras' TensorBoard callback writes through TensorFlow on every backend.
    # trained_run first: other tests name the shared model's variables by Keras' first names.
    x, y = make_data(n=120)
    train, val = (x[:90], y[:90]), (x[90:], y[90:])
    logdir, run_dir = tmp_path / "logs", tmp_path / "run"
    model = build_model()
    fitted = model.fit(
        *train,
        validation_data=val,
        epochs=2,
        batch_size=32,
        verbose=0,
        callbacks=[
            keras.callbacks.TensorBoard(logdir),
            ReplayCheckpoint(run_dir, train_data=train, val_data=val),
        ],
    )
    keras_files = {run: event_files(logdir / run) for run in ("train", "validation")}
    history = replay(run_dir, progress=False)

    done = export_tensorboard(run_dir, logdir)

    assert done.left_to_keras == ("train", "validation")
    assert {run: event_files(logdir / run) for run in ("train", "validation")} == keras_files
    runs = {run: read_run(logdir / run) for run in ("train", "validation")}
    runs.update({run: read_run(logdir / run) for run in ("train_true", "validation_true")})
    true, reported = history.history, fitted.history
    # The same cards: Keras' tags at Keras' steps (the epoch index).
    assert set(runs["train"]["epoch_loss"]) == set(runs["train_true"]["epoch_loss"]) == {0, 1}
    assert set(runs["validation"]["epoch_loss"]) == set(runs["validation_true"]["epoch_loss"])
    assert {"epoch_loss", "epoch_accuracy"} <= set(runs["train"]) & set(runs["train_true"])
    assert runs["train"]["epoch_loss"] == pytest.approx(by_step(reported["loss"]), rel=1e-6)
    expected = {
        ("train_true", "epoch_loss"): true["loss"],
        ("train_true", "epoch_accuracy"): true["accuracy"],
        ("train_true", "epoch_regularization_loss"): true["regularization_loss"],
        ("validation_true", "epoch_loss"): true["val_loss"],
        ("validation_true", "epoch_accuracy"): true["val_accuracy"],
    }
    for (run, tag), values in expected.items():
        assert runs[run][tag] == pytest.approx(by_step(values), rel=1e-6), (run, tag)
    # The true training loss is not the reported one: the overlay shows a difference.
    assert runs["train_true"]["epoch_loss"][1] < runs["train"]["epoch_loss"][1]


def test_reported_curves_go_where_no_tensorboard_callback_wrote(
    replayed_run, trained_run, tmp_path
):
    logdir = tmp_path / "logs"

    done = export_tensorboard(replayed_run, logdir)

    assert done.left_to_keras == ()
    assert sorted(p.parent.name for p in done.files) == [
        "train",
        "train_true",
        "validation",
        "validation_true",
    ]
    reported = trained_run.history.history
    train, validation = read_run(logdir / "train"), read_run(logdir / "validation")
    assert train["epoch_loss"] == pytest.approx(by_step(reported["loss"]), rel=1e-6)
    assert train["epoch_accuracy"] == pytest.approx(by_step(reported["accuracy"]), rel=1e-6)
    assert validation["epoch_loss"] == pytest.approx(by_step(reported["val_loss"]), rel=1e-6)
    assert set(train["epoch_loss"]) == set(read_run(logdir / "train_true")["epoch_loss"])


def test_no_reported_writes_only_the_true_curves(replayed_run, tmp_path):
    logdir = tmp_path / "logs"
    export_tensorboard(replayed_run, logdir)

    done = export_tensorboard(replayed_run, logdir, reported=False)

    assert sorted(p.parent.name for p in done.files) == ["train_true", "validation_true"]
    assert event_files(logdir / "train") == [] and event_files(logdir / "validation") == []


def test_exporting_again_replaces_the_points_a_live_tensorboard_holds(tmp_path):
    """A follower exports after every checkpoint; TensorBoard must not draw a step twice."""
    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.util import tensor_util

    logdir = tmp_path / "logs"
    history = keras.callbacks.History()
    history.history, history.epoch = {"loss": [3.0, float("nan"), float("nan")]}, [0, 1, 2]
    export_tensorboard(history, logdir)
    # What TensorBoard's server reads with (--load_fast=false), already showing the first file.
    live = plugin_event_accumulator.EventAccumulator(str(logdir / "train_true"))
    live.Reload()
    history.history = {"loss": [2.0, 1.0, float("nan")]}

    export_tensorboard(history, logdir)
    live.Reload()

    points = [
        (e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
        for e in live.Tensors("epoch_loss")
    ]
    assert points == [(0, 2.0), (1, 1.0)]
    assert len(event_files(logdir / "train_true")) == 1
    assert read_run(logdir / "train_true") == {"epoch_loss": {0: 2.0, 1: 1.0}}


def test_a_later_tensorboard_callback_takes_the_reported_curves_over(replayed_run, tmp_path):
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    logdir = tmp_path / "logs"
    export_tensorboard(replayed_run, logdir)
    ours = event_files(logdir / "train")
    writer = EventFileWriter(str(logdir / "train"))  # another writer, as Keras' callback is
    writer.close()

    done = export_tensorboard(replayed_run, logdir)

    assert done.left_to_keras == ("train",)
    assert len(event_files(logdir / "train")) == 1 and event_files(logdir / "train") != ours
    assert "epoch_loss" in read_run(logdir / "validation")


def test_missing_tensorboard_package_names_the_extra(replayed_run, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails

    with pytest.raises(
        MissingDependencyError, match=r"pip install 'trueloss-replay\[tensorboard\]'"
    ):
        export_tensorboard(replayed_run, tmp_path / "logs")

    assert not (tmp_path / "logs").exists()


def test_logdir_that_is_a_file_is_refused(replayed_run, tmp_path):
    logdir = tmp_path / "logs"
    logdir.write_text("not a folder")

    with pytest.raises(RunWriteError, match=f"log folder {logdir} is a file; give logdir a folder"):
        export_tensorboard(replayed_run, logdir)

    assert logdir.read_text() == "not a folder"


NO_TENSORFLOW = """
import sys, types
sys.modules["tensorflow"] = None  # as on a JAX machine without TensorFlow
from trueloss_replay.tensorboard import export_tensorboard
figures = {"loss": [0.5, 0.25], "val_loss": [0.75, 0.5]}
history = types.SimpleNamespace(history=figures, epoch=[0, 1])
done = export_tensorboard(history, sys.argv[1])
print(len(done.files))
"""


def test_export_needs_no_tensorflow(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", NO_TENSORFLOW, str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["2"]
    assert read_run(tmp_path / "logs" / "validation_true") == {"epoch_loss": {0: 0.75, 1: 0.5}}
