"""ReplayCheckpoint: resuming, refusing other runs, sub-epoch saving, pruning, arguments,
write errors, unserializable models and tf.distribute."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from trueloss_replay import ReplayCheckpoint, Run, load_weights
from trueloss_replay.data import load_arrays
from trueloss_replay.errors import DataError, RunExistsError, RunWriteError
from trueloss_replay.run import WRITER_LOCK, read_weights

from .conftest import build_model, make_data
from .trainer_subprocess import MIRRORED_BATCH, MIRRORED_SAMPLES

pytestmark = pytest.mark.backend

N, BATCH = 96, 32
STEPS = math.ceil(N / BATCH)  # optimizer steps per epoch


def _fit(model, path, epochs, *, initial_epoch=0, extra=(), n=N, **kwargs):
    x, y = make_data(n)
    return model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=epochs,
        initial_epoch=initial_epoch,
        verbose=0,
        callbacks=[*extra, ReplayCheckpoint(path, **kwargs)],
    )


def _files(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "checkpoints").iterdir() if p.is_file())


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _hidden_files(path: Path) -> list[Path]:
    # Temporary files; the writer's lock file stays by design.
    return [p for p in path.rglob(".*") if p.name != WRITER_LOCK]


def _assert_same_weights(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def _record_epoch_weights(model, into: dict):
    return keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: into.__setitem__(epoch + 1, model.get_weights())
    )


# ----------------------------------------------------------------------------- resume


def test_resume_appends_later_epochs(tmp_path):
    path = tmp_path / "run"
    model = build_model()
    weights = {0: model.get_weights()}
    _fit(model, path, 2, extra=[_record_epoch_weights(model, weights)])
    _fit(model, path, 4, initial_epoch=2, extra=[_record_epoch_weights(model, weights)])

    expected = [f"e{e:04d}.h5" for e in range(5)]
    assert _files(path) == expected
    manifest = _manifest(path)
    assert manifest["status"] == "finished"
    assert [c["name"] for c in manifest["checkpoints"]] == expected
    assert [c["step"] for c in manifest["checkpoints"]] == [e * STEPS for e in range(5)]
    for epoch in range(5):
        with h5py.File(path / "checkpoints" / f"e{epoch:04d}.h5", "r") as f:
            assert f.attrs["step"] == epoch * STEPS
            assert f.attrs["epoch"] == epoch
        stored = read_weights(path / "checkpoints" / f"e{epoch:04d}.h5")
        _assert_same_weights(list(stored.values()), weights[epoch])


def test_resume_with_a_rebuilt_model_in_the_same_process(tmp_path):
    # The rebuilt model's variables are named sequential_1/dense_2/... instead of
    # sequential/dense/...: Keras' auto-generated names, not another architecture.
    path = tmp_path / "run"
    _fit(build_model(), path, 2)
    model = build_model()
    load_weights(model, path / "checkpoints" / "e0002.h5")
    assert model.weights[0].path != read_weights(path / "checkpoints" / "e0002.h5").popitem()[0]
    final = {}
    _fit(model, path, 3, initial_epoch=2, extra=[_record_epoch_weights(model, final)])
    assert _files(path) == ["e0000.h5", "e0001.h5", "e0002.h5", "e0003.h5"]
    stored = read_weights(path / "checkpoints" / "e0003.h5")
    _assert_same_weights(list(stored.values()), final[3])


def test_resume_keeps_the_run_creation_time(tmp_path):
    path = tmp_path / "run"
    model = build_model()
    _fit(model, path, 1)
    created = _manifest(path)["created"]
    _fit(model, path, 2, initial_epoch=1)
    assert _manifest(path)["created"] == created
    assert _files(path) == ["e0000.h5", "e0001.h5", "e0002.h5"]


# ----------------------------------------------------------------------------- other runs


def _other_architecture():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(5), keras.layers.Dense(3, activation="softmax")]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


@pytest.mark.parametrize(
    ("make_model", "hint"),
    [
        pytest.param(build_model, "initial_epoch=2", id="fresh-fit-of-the-same-model"),
        pytest.param(_other_architecture, "different model", id="different-variables"),
    ],
)
def test_another_run_in_the_folder_is_refused(tmp_path, make_model, hint):
    path = tmp_path / "run"
    _fit(build_model(), path, 2)
    before = {p.name: p.stat().st_mtime_ns for p in (path / "checkpoints").iterdir()}

    with pytest.raises(RunExistsError) as info:
        _fit(make_model(), path, 1)

    message = str(info.value)
    assert str(path) in message
    assert hint in message
    assert "overwrite=True" in message
    # The existing run is left exactly as it was.
    assert {p.name: p.stat().st_mtime_ns for p in (path / "checkpoints").iterdir()} == before
    assert _manifest(path)["status"] == "finished"


def test_overwrite_replaces_the_previous_run(tmp_path):
    path = tmp_path / "run"
    _fit(build_model(), path, 3)
    model = _other_architecture()
    final = {}
    _fit(model, path, 1, overwrite=True, extra=[_record_epoch_weights(model, final)])

    assert _files(path) == ["e0000.h5", "e0001.h5"]
    manifest = _manifest(path)
    assert [c["name"] for c in manifest["checkpoints"]] == ["e0000.h5", "e0001.h5"]
    assert manifest["params"]["epochs"] == 1
    stored = read_weights(path / "checkpoints" / "e0001.h5")
    assert [a.shape for a in stored.values()] == [w.shape for w in final[1]]
    _assert_same_weights(list(stored.values()), final[1])


# ----------------------------------------------------------------------------- save_freq


@pytest.mark.parametrize("save_freq", [1, 2, 4])
def test_save_freq_writes_sub_epoch_checkpoints(tmp_path, save_freq):
    path = tmp_path / "run"
    epochs = 3
    model = build_model()
    at_step: dict[int, tuple[dict, list]] = {}
    counter = {"step": 0}

    def record(batch, logs):
        counter["step"] += 1
        if hasattr(model, "jax_state_sync"):  # JAX attaches the state to the model lazily
            model.jax_state_sync()
        at_step[counter["step"]] = ({k: float(v) for k, v in logs.items()}, model.get_weights())

    _fit(
        model,
        path,
        epochs,
        save_freq=save_freq,
        extra=[keras.callbacks.LambdaCallback(on_train_batch_end=record)],
    )

    total = epochs * STEPS
    sub = {
        s: f"e{s // STEPS:04d}-s{s:06d}.h5"
        for s in range(1, total + 1)
        if s % save_freq == 0 and s % STEPS != 0
    }
    ends = [f"e{e:04d}.h5" for e in range(epochs + 1)]
    assert _files(path) == sorted([*ends, *sub.values()])
    for step, name in sub.items():
        with h5py.File(path / "checkpoints" / name, "r") as f:
            assert f.attrs["step"] == step
            assert f.attrs["epoch"] == step // STEPS
            assert json.loads(f.attrs["logs"]) == at_step[step][0]
        _assert_same_weights(
            list(read_weights(path / "checkpoints" / name).values()), at_step[step][1]
        )
    listed = [c["name"] for c in _manifest(path)["checkpoints"]]
    assert len(listed) == len(set(listed)) == len(ends) + len(sub)


@pytest.mark.filterwarnings("ignore:Your input ran out of data")
@pytest.mark.parametrize("save_freq", [1, 3])
def test_save_freq_with_unknown_steps_per_epoch_has_no_duplicates(tmp_path, save_freq):
    # A filtered tf.data.Dataset has unknown cardinality: Keras passes params["steps"] = None,
    # so the callback cannot tell that a batch is the epoch's last one.
    import tensorflow as tf

    path = tmp_path / "run"
    x, y = make_data(N)
    data = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True).batch(BATCH)
    history = build_model().fit(
        data,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[ReplayCheckpoint(path, save_freq=save_freq)],
    )
    assert history.params["steps"] is None
    sub = [
        f"e{s // STEPS:04d}-s{s:06d}.h5"
        for s in range(1, 2 * STEPS + 1)
        if s % save_freq == 0 and s % STEPS != 0
    ]
    expected = sorted(["e0000.h5", "e0001.h5", "e0002.h5", *sub])
    assert _files(path) == expected
    assert sorted(c["name"] for c in _manifest(path)["checkpoints"]) == expected


def test_save_initial_false_writes_no_e0000(tmp_path):
    path = tmp_path / "run"
    _fit(build_model(), path, 2, save_initial=False)
    assert _files(path) == ["e0001.h5", "e0002.h5"]
    assert [c["epoch"] for c in _manifest(path)["checkpoints"]] == [1, 2]


# ----------------------------------------------------------------------------- keep


def _written(epochs, steps, save_freq):
    """``(step, name, epoch or None)`` of every checkpoint a run writes, in training order."""
    written = [(e * steps, f"e{e:04d}.h5", e) for e in range(epochs + 1)]
    if save_freq:
        written += [
            (s, f"e{s // steps:04d}-s{s:06d}.h5", None)
            for s in range(1, epochs * steps + 1)
            if s % save_freq == 0 and s % steps != 0
        ]
    return sorted(written)


def _expected_kept(epochs, steps, save_freq, keep, keep_every):
    """Names left by keep/keep_every, derived from the step arithmetic alone."""
    written = _written(epochs, steps, save_freq)
    newest = {name for _, name, _ in written[-keep:]}
    every = {name for _, name, e in written if keep_every and e is not None and e % keep_every == 0}
    return sorted(newest | every)


@pytest.mark.parametrize(
    ("keep", "keep_every", "save_freq"),
    [(1, None, None), (2, None, None), (2, 3, None), (1, 2, None), (3, None, 2), (2, 2, 2)],
)
def test_keep_prunes_old_checkpoints(tmp_path, keep, keep_every, save_freq):
    path = tmp_path / "run"
    epochs, n = 6, 64  # 2 steps per epoch
    extra = {} if save_freq is None else {"save_freq": save_freq}
    _fit(build_model(), path, epochs, n=n, keep=keep, keep_every=keep_every, **extra)

    expected = _expected_kept(epochs, n // BATCH, save_freq, keep, keep_every)
    assert _files(path) == expected
    assert sorted(c["name"] for c in _manifest(path)["checkpoints"]) == expected
    assert _hidden_files(path) == []
    # What a follower lists as missed when it could not read them in time.
    every = {name for _, name, _ in _written(epochs, n // BATCH, save_freq)}
    assert sorted(_manifest(path)["pruned"]) == sorted(every - set(expected))


def test_keep_continues_across_a_resume(tmp_path):
    path = tmp_path / "run"
    model = build_model()
    _fit(model, path, 2, keep=2)
    _fit(model, path, 4, initial_epoch=2, keep=2)
    assert _files(path) == ["e0003.h5", "e0004.h5"]
    assert _manifest(path)["pruned"] == ["e0000.h5", "e0001.h5", "e0002.h5"]


@pytest.mark.parametrize("save_freq", [None, 2], ids=["epoch", "every-2-steps"])
def test_keep_continues_across_a_resume_with_a_rebuilt_model(tmp_path, save_freq):
    # The optimizer is not stored: the rebuilt model's starts again at iteration 0, yet
    # the steps must go on from e0002's, and keep= must prune the oldest, not the newest.
    path = tmp_path / "run"
    extra = {} if save_freq is None else {"save_freq": save_freq}
    _fit(build_model(), path, 2, keep=2, **extra)
    model = build_model()
    load_weights(model, path / "checkpoints" / "e0002.h5")
    assert int(model.optimizer.iterations) == 0
    _fit(model, path, 4, initial_epoch=2, keep=2, **extra)

    expected = _expected_kept(4, STEPS, save_freq, 2, None)
    assert _files(path) == expected
    assert [c["name"] for c in _manifest(path)["checkpoints"]] == expected
    for c in Run(path).checkpoints():
        sub_step = None if c.is_epoch_end else int(c.name.split("-s")[1].removesuffix(".h5"))
        assert c.step == (c.epoch * STEPS if c.is_epoch_end else sub_step), c.name
        assert c.epoch == c.step // STEPS, c.name


# ----------------------------------------------------------------------------- data


def test_data_snapshot_is_taken_before_the_arrays_change(tmp_path):
    # The callback holds the caller's arrays, not copies; a change made once fit() runs
    # (here by a callback after ReplayCheckpoint) must not reach data/train.h5.
    path = tmp_path / "run"
    x, y = make_data(N)
    original = x.copy()

    def clobber(epoch, logs):
        x[:] = 0.0

    # A long switch interval keeps a background writer from taking the GIL between
    # ReplayCheckpoint's on_epoch_begin and clobber's: the race, made certain.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(5.0)
    try:
        build_model().fit(
            x,
            y,
            batch_size=BATCH,
            epochs=1,
            verbose=0,
            callbacks=[
                ReplayCheckpoint(path, train_data=(x, y), save_initial=False),
                keras.callbacks.LambdaCallback(on_epoch_begin=clobber),
            ],
        )
    finally:
        sys.setswitchinterval(interval)
    stored_x, stored_y, _ = load_arrays(path / "data" / "train.h5")
    np.testing.assert_array_equal(stored_x, original)
    np.testing.assert_array_equal(stored_y, y)
    assert _manifest(path)["data_files"] == {"train": "data/train.h5"}


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"save_freq": 0}, ValueError, "save_freq"),
        ({"save_freq": -5}, ValueError, "save_freq"),
        ({"save_freq": "batch"}, ValueError, "save_freq"),
        ({"save_freq": 2.5}, ValueError, "save_freq"),
        ({"save_freq": True}, ValueError, "save_freq"),
        ({"keep": 0}, ValueError, "keep"),
        ({"keep": "3"}, ValueError, "keep"),
        ({"keep": True}, ValueError, "keep"),
        ({"keep": 3, "keep_every": 0}, ValueError, "keep_every"),
        ({"keep_every": 2}, ValueError, "pass keep as well"),
        ({"on_error": "ignore"}, ValueError, "on_error"),
        ({"max_pending": 0}, ValueError, "max_pending"),
        ({"data": "not a ref"}, DataError, "module:function"),
        ({"data": "pkg.mod"}, DataError, "module:function"),
        ({"train_data": np.zeros((4, 2))}, DataError, "train_data"),
        ({"val_data": (np.zeros(3),)}, DataError, "val_data"),
        (
            {"train_data": (np.array(["a cat", "a dog"]), np.array([0, 1]))},
            DataError,
            "train_data x has dtype <U5, which the run folder's HDF5 snapshot cannot store",
        ),
    ],
)
def test_bad_arguments_fail_in_init(tmp_path, kwargs, error, fragment):
    path = tmp_path / "run"
    with pytest.raises(error, match=fragment):
        ReplayCheckpoint(path, **kwargs)
    assert not path.exists(), "a refused callback must not create the run folder"


# ----------------------------------------------------------------------------- write errors


@pytest.mark.parametrize("where", ["run-dir-is-a-file", "parent-is-a-file"])
def test_unwritable_run_dir_fails_in_init(tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    path = blocker if where == "run-dir-is-a-file" else blocker / "run"
    with pytest.raises(RunWriteError, match="cannot be written") as info:
        ReplayCheckpoint(path)
    assert str(path) in str(info.value)
    assert blocker.read_text() == "a regular file"


def _block_checkpoint(path: Path, epoch: int):
    """At the end of epoch ``epoch`` (1-based), before ReplayCheckpoint runs, puts a folder
    where that epoch's checkpoint must go: the final rename of the file then fails."""

    def block(index, logs):
        if index + 1 == epoch:
            (path / "checkpoints" / f"e{epoch:04d}.h5").mkdir()

    return keras.callbacks.LambdaCallback(on_epoch_end=block)


def _assert_no_partial_files(path: Path, written: list[int]):
    assert _hidden_files(path) == [], "temporary files left behind"
    checkpoints = Run(path).checkpoints()
    assert [c.name for c in checkpoints] == [f"e{e:04d}.h5" for e in written]
    shapes = [w.shape for w in build_model().get_weights()]
    for c in checkpoints:
        assert c.error is None
        assert [a.shape for a in read_weights(c.path).values()] == shapes
    listed = [c["name"] for c in _manifest(path)["checkpoints"]]
    assert listed == [f"e{e:04d}.h5" for e in written]


def test_write_error_warns_and_training_goes_on(tmp_path):
    path = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"e0002\.h5") as record:
        history = _fit(build_model(), path, 4, extra=[_block_checkpoint(path, 2)])
    messages = [str(w.message) for w in record if "e0002.h5" in str(w.message)]
    assert len(messages) == 1
    assert str(path / "checkpoints" / "e0002.h5") in messages[0]
    assert len(history.history["loss"]) == 4
    assert _manifest(path)["status"] == "finished"
    _assert_no_partial_files(path, [0, 1, 3, 4])


@pytest.mark.parametrize("blocked", [2, 4], ids=["middle-epoch", "last-epoch"])
def test_write_error_with_on_error_raise_stops_fit(tmp_path, blocked):
    path = tmp_path / "run"
    epochs = 4
    with pytest.raises(RunWriteError, match=f"e{blocked:04d}\\.h5"):
        _fit(
            build_model(), path, epochs, on_error="raise", extra=[_block_checkpoint(path, blocked)]
        )
    assert _manifest(path)["status"] == "failed"
    written = [c.epoch for c in Run(path).checkpoints()]
    # Training stops at the first epoch end after the failed write was noticed.
    assert written[:blocked] == list(range(blocked))
    assert blocked not in written
    _assert_no_partial_files(path, written)


@pytest.mark.parametrize("on_error", ["warn", "raise"])
@pytest.mark.parametrize("blocked", ["model.keras", "data/train.h5"])
def test_write_error_before_training_stops_fit_before_any_step(tmp_path, on_error, blocked):
    # Nothing is computed yet, so even on_error="warn" fails fast rather than train a run
    # that cannot be replayed.
    path = tmp_path / "run"
    (path / blocked).mkdir(parents=True)
    model = build_model()
    before = model.get_weights()
    batches = []
    x, y = make_data(N)

    with pytest.raises(RunWriteError) as info:
        model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=2,
            verbose=0,
            callbacks=[
                ReplayCheckpoint(path, train_data=(x, y), on_error=on_error),
                keras.callbacks.LambdaCallback(
                    on_train_batch_end=lambda b, logs: batches.append(b)
                ),
            ],
        )

    message = str(info.value)
    assert "\n" not in message
    assert f"could not write {path / blocked} (" in message
    assert "fit() stops at its start" in message
    assert "choose another run folder" in message
    assert batches == []
    _assert_same_weights(model.get_weights(), before)
    assert not (path / "manifest.json").exists()
    assert _hidden_files(path) == []


# ----------------------------------------------------------------------------- architecture


class UnserializableNet(keras.Model):
    """A subclassed model whose constructor takes an object Keras cannot serialize."""

    def __init__(self, helper, **kwargs):
        super().__init__(**kwargs)
        self.helper = helper
        self.hidden = keras.layers.Dense(6, activation="relu")
        self.out = keras.layers.Dense(3, activation="softmax")

    def call(self, x):
        return self.out(self.hidden(x))


def _unserializable_model(built: bool):
    keras.utils.set_random_seed(0)
    model = UnserializableNet(object())
    if built:
        model(np.zeros((1, 8), "float32"))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def test_unserializable_model_warns_once_and_still_checkpoints(tmp_path):
    path = tmp_path / "run"
    model = _unserializable_model(built=True)
    weights = {0: model.get_weights()}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(model, path, 2, extra=[_record_epoch_weights(model, weights)])

    about_model = [str(w.message) for w in record if "--model" in str(w.message)]
    assert len(about_model) == 1, about_model
    assert "UnserializableNet" in about_model[0]
    manifest = _manifest(path)
    assert manifest["model"] is None
    assert manifest["status"] == "finished"
    assert not (path / "model.keras").exists()
    assert _hidden_files(path) == []
    assert _files(path) == ["e0000.h5", "e0001.h5", "e0002.h5"]
    for epoch, expected in weights.items():
        _assert_same_weights(
            list(read_weights(path / "checkpoints" / f"e{epoch:04d}.h5").values()), expected
        )


def test_model_built_on_first_batch_is_checkpointed_with_its_weights(tmp_path):
    # Keras builds an unbuilt subclassed model when fit() traces its first step, after
    # on_epoch_begin: the weights before training do not exist then.
    path = tmp_path / "run"
    model = _unserializable_model(built=False)
    weights = {}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(model, path, 2, extra=[_record_epoch_weights(model, weights)])

    if keras.backend.backend() == "jax":
        # Keras' JAX trainer builds the model before the first epoch begins: e0000 exists.
        assert not any("e0000.h5" in str(w.message) for w in record)
        assert _files(path) == ["e0000.h5", "e0001.h5", "e0002.h5"]
    else:
        assert any("e0000.h5" in str(w.message) for w in record)
        assert _files(path) == ["e0001.h5", "e0002.h5"]
    manifest = _manifest(path)
    assert [v[1] for v in manifest["variables"]] == [list(w.shape) for w in weights[1]]
    for epoch, expected in weights.items():
        _assert_same_weights(
            list(read_weights(path / "checkpoints" / f"e{epoch:04d}.h5").values()), expected
        )


# ----------------------------------------------------------------------------- tf.distribute


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.distribute only")
def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    path = tmp_path / "run"
    final = tmp_path / "final.npz"
    script = Path(__file__).with_name("trainer_subprocess.py")
    result = subprocess.run(
        [sys.executable, str(script), "mirrored", str(path), "--save-final", str(final)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replicas=2" in result.stdout

    manifest = _manifest(path)
    assert manifest["status"] == "finished"
    assert manifest["model"] == "model.keras"
    assert _files(path) == ["e0000.h5", "e0001.h5", "e0002.h5"]
    assert _hidden_files(path) == []
    steps = math.ceil(MIRRORED_SAMPLES / MIRRORED_BATCH)  # the global batch is split
    assert [c["step"] for c in manifest["checkpoints"]] == [0, steps, 2 * steps]

    model = keras.models.load_model(path / "model.keras")
    load_weights(model, path / "checkpoints" / "e0002.h5")
    with np.load(final) as expected:
        _assert_same_weights(model.get_weights(), [expected[k] for k in sorted(expected, key=int)])
