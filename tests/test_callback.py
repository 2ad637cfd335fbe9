"""ReplayCheckpoint writes the run folder of DESIGN.md."""

from __future__ import annotations

import json

import h5py
import keras
import numpy as np
import pytest

from trueloss_replay import Run, load_weights
from trueloss_replay.run import CHECKPOINT_FORMAT, RUN_FORMAT, WRITER_LOCK, weight_keys

from .conftest import EPOCHS, build_model

pytestmark = pytest.mark.backend


def test_folder_layout_matches_design(trained_run):
    names = sorted(p.name for p in (trained_run.path / "checkpoints").iterdir())
    assert names == [f"e{e:04d}.h5" for e in range(EPOCHS + 1)]
    assert (trained_run.path / "model.keras").is_file()
    assert (trained_run.path / "data" / "train.h5").is_file()
    assert (trained_run.path / "data" / "val.h5").is_file()
    # The writer's lock file stays (unlinking it would let two writers lock different files).
    hidden = [p for p in trained_run.path.rglob(".*") if p.name != WRITER_LOCK]
    assert not hidden, "temporary files left behind"


def test_manifest_fields(trained_run):
    manifest = json.loads((trained_run.path / "manifest.json").read_text())
    assert manifest["format"] == RUN_FORMAT
    assert manifest["version"] == 1
    assert manifest["status"] == "finished"
    assert manifest["model"] == "model.keras"
    assert manifest["backend"] == keras.backend.backend()
    assert manifest["compile"]["loss"] == "sparse_categorical_crossentropy"
    assert manifest["params"]["epochs"] == EPOCHS
    assert manifest["data_files"] == {"train": "data/train.h5", "val": "data/val.h5"}
    assert [c["epoch"] for c in manifest["checkpoints"]] == list(range(EPOCHS + 1))


def test_checkpoint_attributes_and_variable_paths(trained_run):
    steps_per_epoch = trained_run.history.params["steps"]
    for epoch in range(EPOCHS + 1):
        with h5py.File(trained_run.path / "checkpoints" / f"e{epoch:04d}.h5", "r") as f:
            assert f.attrs["format"] == CHECKPOINT_FORMAT
            assert f.attrs["version"] == 1
            assert f.attrs["epoch"] == epoch
            assert f.attrs["step"] == epoch * steps_per_epoch
            assert f.attrs["time"] > 0
            for variable in trained_run.model.weights:
                dataset = f["weights"][variable.path]
                assert dataset.dtype == np.dtype(variable.dtype)
                assert dataset.shape == tuple(variable.shape)


def test_weights_load_back_bit_for_bit(trained_run):
    model = build_model()
    for epoch, expected in trained_run.weights.items():
        load_weights(model, trained_run.path / "checkpoints" / f"e{epoch:04d}.h5")
        for got, want in zip(model.get_weights(), expected, strict=True):
            np.testing.assert_array_equal(got, want)


def test_reported_logs_match_training_history(trained_run):
    checkpoints = Run(trained_run.path).checkpoints()
    assert checkpoints[0].logs == {}
    for c in checkpoints[1:]:
        for key, values in trained_run.history.history.items():
            assert c.logs[key] == values[c.epoch - 1]


def test_weight_keys_are_variable_paths(trained_run):
    assert weight_keys(trained_run.model) == [v.path for v in trained_run.model.weights]
