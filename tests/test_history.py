"""Results → History / DataFrame, and the CSV / JSON files of a History."""

from __future__ import annotations

import csv
import json
import math

import keras
import numpy as np
import pytest

from tests.conftest import EPOCHS, build_model, make_data
from trueloss_replay import RunFormatError, RunWriteError, load_frame, load_history
from trueloss_replay.history import (
    EXPORTS_LOCK,
    build_history,
    export_history,
    load_results,
    read_csv,
    read_json,
    write_csv,
    write_json,
)
from trueloss_replay.run import read_manifest, read_weights, write_checkpoint

TRUE_KEYS = {
    "loss",
    "accuracy",
    "regularization_loss",
    "val_loss",
    "val_accuracy",
    "val_regularization_loss",
}
REPORTED_KEYS = {"reported_loss", "reported_accuracy", "reported_val_loss", "reported_val_accuracy"}
STEPS_PER_EPOCH = math.ceil(180 / 32)  # 180 training examples, batch size 32


def epoch_name(epoch: int) -> str:
    return f"e{epoch:04d}.h5"


def assert_same_history(actual: keras.callbacks.History, expected: keras.callbacks.History):
    assert set(actual.history) == set(expected.history)
    for key, values in expected.history.items():
        np.testing.assert_array_equal(actual.history[key], values, err_msg=key)
    assert list(actual.epoch) == list(expected.epoch)


def test_history_holds_the_figures_keras_computes(replayed_run, replay_results, trained_run):
    history = load_history(replayed_run)

    assert set(history.history) == TRUE_KEYS | REPORTED_KEYS
    assert history.epoch == list(range(EPOCHS))
    for key in ("loss", "accuracy", "regularization_loss"):
        expected = [replay_results[epoch_name(e)]["train"][key] for e in range(1, EPOCHS + 1)]
        assert history.history[key] == pytest.approx(expected, rel=1e-12)
        expected = [replay_results[epoch_name(e)]["val"][key] for e in range(1, EPOCHS + 1)]
        assert history.history["val_" + key] == pytest.approx(expected, rel=1e-12)
    for key, values in trained_run.history.history.items():
        assert history.history["reported_" + key] == pytest.approx(values, rel=1e-7)


def test_history_params_are_the_training_params(replayed_run, trained_run):
    assert load_history(replayed_run).params == trained_run.history.params


def test_frame_has_one_row_per_checkpoint(replayed_run, replay_results):
    frame = load_frame(replayed_run)

    assert list(frame.columns[:3]) == ["checkpoint", "epochs_completed", "step"]
    assert set(frame.columns[3:]) == TRUE_KEYS | REPORTED_KEYS
    assert list(frame["checkpoint"]) == [epoch_name(e) for e in range(EPOCHS + 1)]
    assert list(frame["epochs_completed"]) == [0.0, 1.0, 2.0, 3.0]
    assert list(frame["step"]) == [STEPS_PER_EPOCH * e for e in range(EPOCHS + 1)]
    assert frame["loss"][0] == pytest.approx(replay_results["e0000.h5"]["train"]["loss"])
    assert math.isnan(frame["reported_loss"][0])  # nothing was logged before training


def test_checkpoint_not_replayed_is_nan_not_zero(replayed_run, trained_run):
    (replayed_run / "replay" / "results" / "e0002.json").unlink()

    frame = load_frame(replayed_run)
    history = load_history(replayed_run)

    row = frame.set_index("checkpoint").loc["e0002.h5"]
    assert all(math.isnan(row[key]) for key in TRUE_KEYS)
    # What Keras reported is in the checkpoint itself, replayed or not.
    assert row["reported_loss"] == pytest.approx(trained_run.history.history["loss"][1])
    assert math.isnan(history.history["loss"][1])
    assert not math.isnan(history.history["loss"][0])
    assert not math.isnan(history.history["loss"][2])
    assert history.epoch == [0, 1, 2]


def test_sub_epoch_checkpoint_gets_a_fractional_epoch(replayed_run):
    checkpoints = replayed_run / "checkpoints"
    weights = read_weights(checkpoints / "e0001.h5")
    step = STEPS_PER_EPOCH + 3
    write_checkpoint(
        checkpoints / f"e0001-s{step:06d}.h5",
        list(weights.items()),
        epoch=1,
        step=step,
        time=0.0,
        logs={"loss": 1.25},
    )

    frame = load_frame(replayed_run)

    assert list(frame["checkpoint"]) == [
        "e0000.h5",
        "e0001.h5",
        f"e0001-s{step:06d}.h5",
        "e0002.h5",
        "e0003.h5",
    ]
    row = frame.set_index("checkpoint").loc[f"e0001-s{step:06d}.h5"]
    assert row["epochs_completed"] == pytest.approx(1 + 3 / STEPS_PER_EPOCH)
    assert row["step"] == step
    assert row["reported_loss"] == 1.25
    assert math.isnan(row["loss"])
    assert len(load_history(replayed_run).history["loss"]) == EPOCHS


def test_history_of_a_run_not_replayed_is_an_error(run_copy):
    with pytest.raises(RunFormatError, match="holds no replay results"):
        load_history(run_copy)


def test_frame_of_a_run_not_replayed_is_all_nan(run_copy):
    frame = load_frame(run_copy)

    assert len(frame) == EPOCHS + 1
    assert "loss" not in frame.columns
    assert frame["reported_loss"][1:].notna().all()


@pytest.mark.parametrize(
    "content",
    ['{"format": "trueloss-replay/result", "checkpoint": "e00', '{"format": "other"}', "[1, 2]"],
    ids=["truncated", "other-format", "not-an-object"],
)
def test_damaged_result_file_is_named_on_one_line(replayed_run, content):
    (replayed_run / "replay" / "results" / "e0002.json").write_text(content)

    with pytest.raises(RunFormatError) as info:
        load_results(replayed_run)

    message = str(info.value)
    assert "e0002.json" in message
    assert "\n" not in message


def test_temporary_and_foreign_files_are_ignored(replayed_run):
    results = replayed_run / "replay" / "results"
    (results / ".e0004.1234-abcd.tmp.json").write_text("{half a file")
    (results / "notes.json").write_text("not json")

    assert [r["checkpoint"] for r in load_results(replayed_run)] == [
        epoch_name(e) for e in range(EPOCHS + 1)
    ]


def test_build_history_fills_epochs_not_replayed_from_the_manifest(replay_results, trained_run):
    manifest = read_manifest(trained_run.path)
    subset = [replay_results["e0003.h5"], replay_results["e0001.h5"]]

    history = build_history(subset, manifest)

    assert history.epoch == [0, 1, 2]
    assert math.isnan(history.history["loss"][1])
    assert history.history["loss"][2] == replay_results["e0003.h5"]["train"]["loss"]
    assert history.history["reported_loss"] == pytest.approx(
        trained_run.history.history["loss"], rel=1e-7
    )


def with_missing_values(history: keras.callbacks.History) -> keras.callbacks.History:
    history.history["loss"][1] = math.nan
    history.history["val_loss"][2] = math.inf
    return history


def test_csv_round_trip(replayed_run, tmp_path):
    history = with_missing_values(load_history(replayed_run))
    path = tmp_path / "history.csv"

    write_csv(history, path)

    assert_same_history(read_csv(path), history)
    with path.open() as f:
        header = next(csv.reader(f))
    assert header == ["epoch", *sorted(history.history)]


def test_json_round_trip_keeps_nan_and_params(replayed_run, tmp_path):
    history = with_missing_values(load_history(replayed_run))
    path = tmp_path / "history.json"

    write_json(history, path)

    again = read_json(path)
    assert_same_history(again, history)
    assert again.params == history.params

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    data = json.loads(path.read_text(), parse_constant=refuse)
    assert set(data) == {"history", "epoch", "params"}
    assert data["history"]["loss"][1] is None


def test_fit_history_round_trips(trained_run, tmp_path):
    write_json(trained_run.history, tmp_path / "fit.json")
    write_csv(trained_run.history, tmp_path / "fit.csv")

    assert_same_history(read_json(tmp_path / "fit.json"), trained_run.history)
    assert_same_history(read_csv(tmp_path / "fit.csv"), trained_run.history)


def test_read_csv_reads_a_keras_csv_logger_file(tmp_path):
    x, y = make_data(n=64)
    path = tmp_path / "log.csv"
    fit = build_model().fit(
        x, y, epochs=2, batch_size=32, verbose=0, callbacks=[keras.callbacks.CSVLogger(path)]
    )

    history = read_csv(path)

    assert history.epoch == [0, 1]
    assert set(history.history) == set(fit.history)
    for key, values in fit.history.items():
        assert history.history[key] == pytest.approx(values, rel=1e-6)


def test_export_history_writes_csv_and_json(replayed_run):
    expected = load_history(replayed_run)

    export_history(replayed_run)

    folder = replayed_run / "replay"
    assert_same_history(read_json(folder / "history.json"), expected)
    # history.csv is the full table: one row per checkpoint, read back as the History.
    assert_same_history(read_csv(folder / "history.csv"), expected)
    with (folder / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["checkpoint"] for r in rows] == [epoch_name(e) for e in range(EPOCHS + 1)]
    assert [r["epoch"] for r in rows] == ["", "0", "1", "2"]
    # No temporary file left; the exports' lock file stays, as an OS lock's file does.
    assert not [
        p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != EXPORTS_LOCK
    ]


@pytest.mark.parametrize("write", [write_csv, write_json])
def test_write_error_names_the_file_once(replayed_run, tmp_path, write):
    target = tmp_path / "no_such_folder" / "history.out"

    with pytest.raises(RunWriteError) as caught:
        write(load_history(replayed_run), target)

    message = str(caught.value)
    assert message.startswith(f"could not write {target}: No such file or directory")
    assert message.count("could not write") == 1


def test_null_figures_read_back_as_nan(replayed_run, replay_results):
    path = replayed_run / "replay" / "results" / "e0002.json"
    result = json.loads(path.read_text())
    result["train"]["loss"] = None  # what a diverged checkpoint's NaN is written as
    result["val"]["loss"] = "Infinity"
    path.write_text(json.dumps(result))

    history = load_history(replayed_run)

    assert math.isnan(history.history["loss"][1])
    assert history.history["val_loss"][1] == math.inf
    assert history.history["loss"][2] == replay_results["e0003.h5"]["train"]["loss"]
