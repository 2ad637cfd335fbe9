"""Data-major evaluation and bounded host memory: what the replay engine does for speed."""

from __future__ import annotations

import gc
import json
import threading
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf

from trueloss_replay import run as runfmt
from trueloss_replay.scheduler import replay

pytestmark = pytest.mark.backend


class CountingBatches(keras.utils.PyDataset):
    """Fixed batches of arrays that count how often each one is produced."""

    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self.produced = 0

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, i):
        self.produced += 1
        part = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.x[part], self.y[part]


def _sources(trained_run, kind):
    if kind == "tf.data":
        return tuple(
            tf.data.Dataset.from_tensor_slices(arrays).batch(32)
            for arrays in (trained_run.train, trained_run.val)
        )
    return tuple(CountingBatches(*arrays, 32) for arrays in (trained_run.train, trained_run.val))


def _results(folder):
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("e*.json"))}


@pytest.mark.parametrize("kind", ["tf.data", "PyDataset"])
def test_data_major_figures_equal_checkpoint_major(trained_run, tmp_path, kind):
    train, val = _sources(trained_run, kind)
    replay(trained_run.path, train=train, val=val, output=tmp_path / "plain")
    replay(trained_run.path, train=train, val=val, output=tmp_path / "dm", data_major=True)
    plain, dm = _results(tmp_path / "plain"), _results(tmp_path / "dm")
    assert sorted(plain) == sorted(dm) == ["e0000", "e0001", "e0002", "e0003"]
    for name in plain:
        for split in ("train", "val"):
            assert set(dm[name][split]) == set(plain[name][split])
            for key, value in plain[name][split].items():
                np.testing.assert_allclose(dm[name][split][key], value, rtol=1e-6)
            assert dm[name]["examples"] == plain[name]["examples"]
    # The checkpoints differ, so a data-major mix-up of weight sets would show.
    losses = [plain[name]["train"]["loss"] for name in plain]
    assert len(set(losses)) == len(losses)


def test_data_major_produces_each_batch_once_for_all_checkpoints(trained_run, tmp_path):
    train, val = _sources(trained_run, "PyDataset")
    before = train.produced, val.produced
    replay(trained_run.path, train=train, val=val, output=tmp_path, data_major=True)
    checkpoints = len(list(tmp_path.glob("e*.json")))
    assert checkpoints == 4
    # One pass for all four checkpoints, plus the first batch, read once for the fingerprint.
    produced = (train.produced - before[0], val.produced - before[1])
    assert produced == (len(train) + 1, len(val) + 1)


def _add_checkpoints(run_dir, count):
    """Extends a run with ``count`` more checkpoints: the last one's weights, perturbed."""
    last = runfmt.Run(run_dir).checkpoints()[-1]
    weights = runfmt.read_weights(last.path)
    rng = np.random.default_rng(0)
    for i in range(1, count + 1):
        epoch = last.epoch + i
        runfmt.write_checkpoint(
            run_dir / runfmt.CHECKPOINT_DIR / runfmt.checkpoint_name(epoch),
            [
                (k, (v + 0.01 * rng.normal(size=v.shape)).astype(v.dtype))
                for k, v in weights.items()
            ],
            epoch=epoch,
            step=last.step + i,
            time=last.time + i,
        )


def _census(monkeypatch):
    """Counts the checkpoints whose weights ``read_weights`` returned and that are still alive."""
    census = {"alive": 0, "peak": 0, "read": 0}
    read = runfmt.read_weights
    lock = threading.Lock()  # the reader thread and finalizers both count

    def counted(path, *args, **kwargs):
        weights = read(path, *args, **kwargs)
        with lock:
            census["read"] += 1
            census["alive"] += 1
            census["peak"] = max(census["peak"], census["alive"])
        left = [len(weights)]

        def release():
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    census["alive"] -= 1

        for array in weights.values():
            weakref.finalize(array, release)
        return weights

    monkeypatch.setattr(runfmt, "read_weights", counted)
    return census


@pytest.mark.parametrize("data_major", [False, True])
def test_at_most_two_checkpoints_weights_in_host_memory(run_copy, monkeypatch, data_major):
    _add_checkpoints(run_copy, 8)
    census = _census(monkeypatch)
    replay(run_copy, data_major=data_major)
    assert census["read"] == 12
    assert census["peak"] <= 2
    gc.collect()
    assert census["alive"] == 0
