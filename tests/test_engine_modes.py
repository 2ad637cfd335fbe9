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

from trueloss_replay import engine
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
    """Counts the checkpoints whose weights are in host memory, until their arrays are freed:
    one for each ``read_weights`` result, ``size`` for each ``Evaluator.host_stack`` buffer
    set (the stacked path reads several checkpoints straight into those)."""
    census = {"alive": 0, "peak": 0, "read": 0, "stacked": 0}
    read, stack = runfmt.read_weights, engine.Evaluator.host_stack
    lock = threading.Lock()  # the reader thread and finalizers both count

    def hold(checkpoints, arrays):
        with lock:
            census["alive"] += checkpoints
            census["peak"] = max(census["peak"], census["alive"])
        left = [len(arrays)]

        def release():
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    census["alive"] -= checkpoints

        for array in arrays:
            weakref.finalize(array, release)

    def counted(path, *args, **kwargs):
        weights = read(path, *args, **kwargs)
        census["read"] += 1
        hold(1, list(weights.values()))
        return weights

    def counted_stack(evaluator, size):
        buffers = stack(evaluator, size)
        census["stacked"] += 1
        hold(size, list(buffers))
        return buffers

    monkeypatch.setattr(runfmt, "read_weights", counted)
    monkeypatch.setattr(engine.Evaluator, "host_stack", counted_stack)
    return census


@pytest.mark.parametrize("data_major", [False, True])
def test_host_memory_holds_two_checkpoints_or_three_groups_whatever_k(
    run_copy, monkeypatch, data_major
):
    """12 checkpoints: data-major reads one at a time (at most two in host memory); the
    stacked path, at groups of 2 here, holds at most three groups: the one whose figures are
    read back (kept to evaluate again should it fail), the one running, the next. Its six
    groups take three sets of buffers in turn."""
    monkeypatch.setattr(engine, "STACK_MAX", 2)
    _add_checkpoints(run_copy, 8)
    census = _census(monkeypatch)
    replay(run_copy, data_major=data_major)
    if data_major:
        assert (census["read"], census["stacked"]) == (12, 0)
        assert census["peak"] <= 2
    else:
        assert census["stacked"] == 3  # 6 groups of 2, in 3 sets of buffers
        assert census["peak"] <= 6
    assert len(list((run_copy / "replay" / "results").glob("e*.json"))) == 12
    gc.collect()
    assert census["alive"] == 0


def _recorded_evaluators(monkeypatch) -> list:
    """Every Evaluator the scheduler creates (it imports the name, so that is patched)."""
    from trueloss_replay import scheduler

    created = []

    class Recorded(engine.Evaluator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(scheduler, "Evaluator", Recorded)
    return created


def test_stacked_checkpoints_get_the_figures_they_get_one_at_a_time(
    run_copy, tmp_path, monkeypatch
):
    """8 checkpoints at up to 3 per program call: groups of 3, 3 and 2 (padded to 3). Each
    checkpoint's figures are those of the one-checkpoint programs, and the stacked programs
    are traced once per shape (train: 3 batches of 50 and one of 30; val: 50 and 10)."""
    _add_checkpoints(run_copy, 4)
    monkeypatch.setattr(engine, "STACK_MAX", 3)
    created = _recorded_evaluators(monkeypatch)

    replay(run_copy, output=tmp_path / "stacked", batch_size=50)
    (stacked_evaluator,) = created
    monkeypatch.setattr(engine.Evaluator, "stack_size", lambda self, splits, n: 1)
    replay(run_copy, output=tmp_path / "single", batch_size=50)

    assert sorted(stacked_evaluator._programs) == ["loop@", "rest@"]
    assert stacked_evaluator.traces == 4
    stacked, single = _results(tmp_path / "stacked"), _results(tmp_path / "single")
    assert sorted(stacked) == sorted(single) and len(stacked) == 8
    for name in single:
        for split in ("train", "val"):
            assert set(stacked[name][split]) == set(single[name][split])
            for key, value in single[name][split].items():
                np.testing.assert_allclose(stacked[name][split][key], value, rtol=1e-6)
        assert stacked[name]["examples"] == single[name]["examples"] == {"train": 180, "val": 60}
    # Every checkpoint differs, so a mix-up of slots (or a padded slot's figures) would show.
    losses = [stacked[name]["train"]["loss"] for name in sorted(stacked)]
    assert len(set(losses)) == len(losses)
