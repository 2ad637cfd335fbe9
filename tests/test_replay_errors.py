"""Bad inputs to replay get one clear error naming the split, module, file or checkpoint."""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import threading
import weakref

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from trueloss_replay import ReplayCheckpoint, load_frame
from trueloss_replay.errors import DataError, ModelLoadError, ReplayIncompleteError
from trueloss_replay.scheduler import parse_epochs, replay

from .conftest import build_model, make_data

pytestmark = pytest.mark.backend


def _arrays(trained_run):
    return trained_run.train, trained_run.val


def test_infinite_dataset_is_refused(trained_run):
    x, y = trained_run.train
    infinite = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat()
    with pytest.raises(DataError, match=r"train data is an infinite tf.data.Dataset"):
        replay(trained_run.path, train=infinite, output=trained_run.path.parent / "x")


def test_dataset_without_targets_is_refused(trained_run, tmp_path):
    x, _ = trained_run.train
    with pytest.raises(DataError, match=r"val data yields elements without targets"):
        replay(
            trained_run.path,
            train=trained_run.train,
            val=tf.data.Dataset.from_tensor_slices(x).batch(32),
            output=tmp_path,
        )


def test_empty_split_is_refused(trained_run, tmp_path):
    x, y = trained_run.val
    with pytest.raises(DataError, match=r"val data is empty"):
        replay(trained_run.path, train=trained_run.train, val=(x[:0], y[:0]), output=tmp_path)


def test_shape_that_does_not_fit_the_model(trained_run, tmp_path):
    x, y = trained_run.train
    with pytest.raises(DataError, match=r"train data does not fit the model.*\(None, 8\)"):
        replay(trained_run.path, train=(x[:, :5], y), output=tmp_path)
    assert not list(tmp_path.glob("*.json")), "no result may be written for unfit data"


def test_unimportable_data_module_names_module_and_path(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"cannot import module 'no_such_mod'.*{tmp_path}"):
        replay(trained_run.path, data="no_such_mod:load", output=tmp_path / "out")


def test_data_factory_from_current_directory(trained_run, tmp_path, monkeypatch):
    np.savez(tmp_path / "train.npz", x=trained_run.train[0], y=trained_run.train[1])
    (tmp_path / "mydata.py").write_text(
        "import numpy as np\n"
        "def load():\n"
        "    d = np.load('train.npz')\n"
        "    return {'train': (d['x'], d['y']), 'val': None}\n"
    )
    monkeypatch.chdir(tmp_path)
    history = replay(trained_run.path, data="mydata:load", output=tmp_path / "out")
    assert len(history.history["loss"]) == 3
    # The factory gives no validation set, so the callback's snapshot supplies it.
    assert len(history.history["val_loss"]) == 3
    result = json.loads((tmp_path / "out" / "e0001.json").read_text())
    assert result["examples"] == {"train": 180, "val": 60}
    assert result["data"]["train"]["count"] == 180


@pytest.mark.parametrize("kind", ["tf.data", "PyDataset", "npz"])
def test_other_sources_give_the_array_figures(trained_run, tmp_path, kind):
    x, y = trained_run.train
    if kind == "tf.data":
        source = tf.data.Dataset.from_tensor_slices((x, y)).batch(50)
    elif kind == "PyDataset":

        class Batches(keras.utils.PyDataset):
            def __len__(self):
                return 4

            def __getitem__(self, i):
                return x[i * 50 : (i + 1) * 50], y[i * 50 : (i + 1) * 50]

        source = Batches()
    else:
        source = tmp_path / "train.npz"
        np.savez(source, x=x, y=y)
    expected = replay(trained_run.path, train=(x, y), output=tmp_path / "arrays")
    got = replay(trained_run.path, train=source, output=tmp_path / "other")
    np.testing.assert_allclose(got.history["loss"], expected.history["loss"], rtol=1e-6)
    np.testing.assert_allclose(got.history["accuracy"], expected.history["accuracy"], rtol=1e-6)


def test_unreadable_checkpoint_is_reported_and_the_others_evaluated(run_copy):
    bad = run_copy / "checkpoints" / "e0002.h5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(ReplayIncompleteError, match=r"e0002.h5") as caught:
        replay(run_copy)
    done = sorted(p.name for p in (run_copy / "replay" / "results").glob("e*.json"))
    assert done == ["e0000.json", "e0001.json", "e0003.json"]
    assert list(caught.value.failures) == ["e0002.h5"]


def test_checkpoint_of_another_model_names_the_variable(run_copy):
    path = run_copy / "checkpoints" / "e0001.h5"
    with h5py.File(path, "a") as f:
        name = next(iter(f["weights"]))  # the first layer group
        del f["weights"][name]
    with pytest.raises(ReplayIncompleteError, match=r"e0001.h5 has no variable"):
        replay(run_copy)


def test_result_written_for_other_data_is_recomputed(run_copy):
    replay(run_copy)
    x, y = make_data(seed=5)
    with pytest.warns(UserWarning, match="different data"):
        replay(run_copy, train=(x, y), epochs="1")
    results = run_copy / "replay" / "results"
    first = json.loads((results / "e0001.json").read_text())
    assert first["examples"]["train"] == len(x)


def test_run_without_architecture_needs_a_builder(run_copy):
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["model"] = None
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=r"model='module:function'"):
        replay(run_copy)
    history = replay(run_copy, model=build_model)
    assert len(history.history["loss"]) == 3


def test_lambda_layer_needs_unsafe_deserialization(tmp_path):
    x, y = make_data(n=64)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Lambda(lambda t: t * 2.0), keras.layers.Dense(3)]
    )
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, verbose=0, callbacks=[ReplayCheckpoint(tmp_path, train_data=(x, y))])
    with pytest.raises(ModelLoadError, match=r"unsafe_deserialization=True"):
        replay(tmp_path)
    history = replay(tmp_path, unsafe_deserialization=True)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize(
    "spec, expected",
    [("1,3,5-7", {1, 3, 5, 6, 7}), ("0", {0}), (" 2 , 4-4 ", {2, 4}), ([1, 2], {1, 2})],
)
def test_parse_epochs(spec, expected):
    assert parse_epochs(spec) == expected


@pytest.mark.parametrize("spec", ["a", "3-1", "1,,x"])
def test_parse_epochs_rejects(spec):
    with pytest.raises(DataError, match="epochs=") as caught:
        parse_epochs(spec)
    assert caught.value.usage and caught.value.argument == "epochs"


CUSTOM_LAYER = """
import keras

@keras.saving.register_keras_serializable(package="tlr_test")
class Scale(keras.layers.Layer):
    def call(self, x):
        return 2.0 * x
"""


def test_missing_custom_object_suggests_import(tmp_path, monkeypatch):
    import importlib
    import sys

    (tmp_path / "tlr_custom.py").write_text(CUSTOM_LAYER)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("tlr_custom")
    x, y = make_data(n=64)
    model = keras.Sequential([keras.Input((8,)), module.Scale(), keras.layers.Dense(3)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    run = tmp_path / "run"
    model.fit(x, y, epochs=1, verbose=0, callbacks=[ReplayCheckpoint(run, train_data=(x, y))])
    # As in a fresh process: the class is neither imported nor registered.
    keras.saving.get_custom_objects().pop("tlr_test>Scale")
    monkeypatch.delitem(sys.modules, "tlr_custom")
    with pytest.raises(ModelLoadError, match=r"Scale.*with imports="):
        replay(run)
    history = replay(run, imports=["tlr_custom"])
    assert np.isfinite(history.history["loss"][0])


def test_unwritable_result_is_a_failure_of_that_checkpoint_only(run_copy):
    results = run_copy / "replay" / "results"
    (results / "e0001.json").mkdir(parents=True)  # something in the way of the result file
    with pytest.raises(ReplayIncompleteError, match=r"could not write .*e0001.json") as caught:
        replay(run_copy)
    assert list(caught.value.failures) == ["e0001.h5"]
    done = sorted(p.name for p in results.glob("e*.json") if p.is_file())
    assert done == ["e0000.json", "e0002.json", "e0003.json"]


@keras.saving.register_keras_serializable(package="tlr_test")
class CheckedDense(keras.layers.Dense):
    """A Dense layer whose call fails at run time on non-finite activations."""

    def call(self, inputs):
        outputs = super().call(inputs)
        if keras.backend.backend() == "tensorflow":
            return tf.debugging.check_numerics(outputs, "CheckedDense output")
        _jax_runtime_check(outputs, lambda v: not np.isfinite(v).all(), "CheckedDense output")
        return outputs


def _jax_runtime_check(value, fails, message: str) -> None:
    """Raises inside the running XLA program (a JaxRuntimeError) when ``fails(value)``."""
    import jax

    def check(v):
        if fails(np.asarray(v)):
            raise FloatingPointError(message)

    jax.debug.callback(check, value)


@pytest.mark.parametrize(
    "bad, epochs, left",
    [
        ("e0001", 2, ["e0000.json", "e0002.json"]),
        # The first checkpoint a device evaluates: still that checkpoint's failure, not "data
        # that does not fit the model".
        ("e0000", 1, ["e0001.json"]),
    ],
)
def test_runtime_failure_of_one_checkpoint_does_not_stop_the_others(tmp_path, bad, epochs, left):
    x, y = make_data(n=64)
    model = keras.Sequential([keras.Input((8,)), CheckedDense(3)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(
        x, y, epochs=epochs, verbose=0, callbacks=[ReplayCheckpoint(tmp_path, train_data=(x, y))]
    )
    with h5py.File(tmp_path / "checkpoints" / f"{bad}.h5", "a") as f:
        kernel = next(d for n, d in _datasets(f["weights"]) if n.endswith("kernel"))
        kernel[...] = np.nan
    with pytest.raises(ReplayIncompleteError, match=rf"{bad}.h5 \(evaluating the train data"):
        replay(tmp_path, jit_compile=False)
    assert sorted(p.name for p in (tmp_path / "replay" / "results").glob("e*.json")) == left


def _datasets(group):
    found = []
    group.visititems(
        lambda name, obj: found.append((name, obj)) if isinstance(obj, h5py.Dataset) else None
    )
    return found


@keras.saving.register_keras_serializable(package="tlr_test")
class SmallDevice(keras.layers.Layer):
    """Identity, on a pretend device that holds at most 32 examples at once: larger batches
    fail as TensorFlow (or JAX) fails when a GPU runs out of memory."""

    def call(self, inputs):
        if keras.backend.backend() == "jax":
            # The text XLA gives when a GPU runs out of memory.
            message = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate"
            _jax_runtime_check(inputs, lambda v: v.shape[0] > 32, message)
            return inputs

        def check(x):
            if x.shape[0] > 32:
                raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
            return x

        out = tf.py_function(check, [inputs], inputs.dtype)
        out.set_shape(inputs.shape)
        return out


def test_out_of_memory_halves_the_batch_and_keeps_the_figures(tmp_path):
    x, y = make_data(n=100)
    model = keras.Sequential([keras.Input((8,)), SmallDevice(), keras.layers.Dense(3)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(
        x,
        y,
        batch_size=20,
        epochs=1,
        verbose=0,
        callbacks=[ReplayCheckpoint(tmp_path, train_data=(x, y))],
    )
    with pytest.warns(UserWarning, match="ran out of memory") as caught:
        history = replay(tmp_path, batch_size=100, jit_compile=False)
    assert [str(w.message).split("batches of ")[1] for w in caught] == [
        "50 from now on.",
        "25 from now on.",
    ]
    result = json.loads((tmp_path / "replay" / "results" / "e0001.json").read_text())
    assert result["batch_size"]["train"] == 25
    logits = model.predict(x, batch_size=20, verbose=0).astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -np.mean(logp[np.arange(len(y)), y])
    np.testing.assert_allclose(history.history["loss"][0], expected, rtol=1e-5)


def test_out_of_memory_on_a_dataset_does_not_shrink_the_array_batch(tmp_path):
    x, y = make_data(n=100)
    model = keras.Sequential([keras.Input((8,)), SmallDevice(), keras.layers.Dense(3)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=20, epochs=1, verbose=0, callbacks=[ReplayCheckpoint(tmp_path)])
    val = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)  # its own batches: too big
    with pytest.warns(UserWarning, match="ran out of memory") as caught:
        with pytest.raises(ReplayIncompleteError, match="val data ran out of device memory"):
            replay(tmp_path, train=(x, y), val=val, batch_size=100, jit_compile=False)
    assert len(caught) == 2  # train: 100 -> 50 -> 25, and no further for val's sake


class DeviceWithRoomFor:
    """Our backend's weight transfer (``to_device_many``) on a pretend device with room for
    ``room`` bytes of weights at once, counting those still there (placed and not yet
    freed): a transfer beyond that fails with the error a full GPU gives. The data's own
    transfers are left alone. Counts the refusals, so that a test knows the device was
    really full."""

    def __init__(self, monkeypatch, room: float):
        from trueloss_replay.backends import get_backend

        backend = get_backend()
        self.room, self.refused, self.held, self.real = room, 0, 0, backend.to_device_many
        self.lock = threading.Lock()
        monkeypatch.setattr(backend, "to_device_many", self)

    def __call__(self, values, device):
        sizes = [np.asarray(v).nbytes for v in values]
        with self.lock:
            if self.held + sum(sizes) > self.room:
                self.refused += 1
                raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while trying to allocate.")
            self.held += sum(sizes)
        placed = self.real(values, device)
        for array, size in zip(placed, sizes, strict=True):
            weakref.finalize(array, self._free, size)
        return placed

    def _free(self, size: int) -> None:
        with self.lock:
            self.held -= size


def _checkpoint_bytes(model) -> int:
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights)


def test_a_group_whose_weights_do_not_fit_goes_one_checkpoint_at_a_time(
    run_copy, trained_run, replay_results, monkeypatch
):
    device = DeviceWithRoomFor(monkeypatch, room=1.5 * _checkpoint_bytes(trained_run.model))
    history = replay(run_copy)
    # The group's stacked weights, once: then one checkpoint at a time, each leaving the
    # device before the next comes (not at half the batch size, which needs the same room).
    assert device.refused == 1
    results = _results_match_keras(run_copy, replay_results)
    assert all(result["stacked"] == 1 for result in results.values())  # each on its own
    assert history.history["loss"] == [
        results[f"e{e:04d}"]["train"]["loss"] for e in range(1, len(history.history["loss"]) + 1)
    ]


def test_data_major_evaluates_the_checkpoints_the_device_has_room_for(
    run_copy, trained_run, replay_results, monkeypatch
):
    # Room for two checkpoints' weights: the groups of data-major replay shrink to two.
    device = DeviceWithRoomFor(monkeypatch, room=2.5 * _checkpoint_bytes(trained_run.model))
    replay(run_copy, data_major=True)
    assert device.refused >= 1, "the device was never full: nothing was tested"
    _results_match_keras(run_copy, replay_results)


def _results_match_keras(run_dir, replay_results) -> dict[str, dict]:
    """Every checkpoint's result file, each figure Keras' own (``replay_results``)."""
    results = {p.stem: json.loads(p.read_text()) for p in (run_dir / "replay/results").glob("*")}
    assert sorted(results) == sorted(n.removesuffix(".h5") for n in replay_results)
    for name, expected in replay_results.items():
        result = results[name.removesuffix(".h5")]
        for split in ("train", "val"):
            for key, value in expected[split].items():
                assert result[split][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, key)
    return results


@pytest.mark.parametrize(
    "how",
    [{}, {"epochs": "2"}, {"data_major": True}],
    ids=["stacked", "one-checkpoint", "data-major"],
)
def test_weights_that_do_not_fit_the_device_fail_each_checkpoint_clearly(
    run_copy, trained_run, monkeypatch, how
):
    device = DeviceWithRoomFor(monkeypatch, room=0.5 * _checkpoint_bytes(trained_run.model))
    checkpoints = sorted(p.name for p in (run_copy / "checkpoints").glob("*.h5"))
    if "epochs" in how:
        checkpoints = ["e0002.h5"]
    with pytest.raises(ReplayIncompleteError) as caught:
        replay(run_copy, **how)
    message = str(caught.value)
    assert "\n" not in message
    assert device.refused >= len(checkpoints)
    for name in checkpoints:
        assert f"{name} (" in message
    assert f"{len(checkpoints)} checkpoint(s)" in message
    assert "ran out of memory putting the weights" in message
    assert "replay on another device with devices=" in message
    assert not list((run_copy / "replay" / "results").glob("*.json"))


# --------------------------------------------------------------------------- untrusted files


def _replace_first_variable(path, **create) -> str:
    with h5py.File(path, "r+") as f:
        key = next(n for n, d in _datasets(f["weights"]) if int(d.attrs["index"]) == 0)
        del f["weights"][key]
        f["weights"].create_dataset(key, **create).attrs["index"] = 0
    return key


@pytest.mark.parametrize(
    "create, recorded, reason",
    [
        # 4 TiB declared in a few KB: refused from the metadata, against the recorded model.
        ({"shape": (2**20, 2**20), "dtype": "float32"}, True, "has shape (1048576, 1048576)"),
        # No variables recorded: the loaded model is the reference all the same (the stored-
        # bytes backstop without any signature is tested in test_run.py).
        ({"shape": (2**20, 2**20), "dtype": "float32"}, False, "has shape (1048576, 1048576)"),
        ({"data": np.full((8, 16), b"0.5")}, True, "is stored as |S3, not as numbers"),
    ],
)
def test_huge_or_text_variable_fails_its_checkpoint_alone(run_copy, create, recorded, reason):
    if not recorded:
        manifest = json.loads((run_copy / "manifest.json").read_text())
        manifest["variables"] = None
        (run_copy / "manifest.json").write_text(json.dumps(manifest))
    key = _replace_first_variable(run_copy / "checkpoints" / "e0002.h5", **create)

    with pytest.raises(ReplayIncompleteError) as caught:
        replay(run_copy)

    assert list(caught.value.failures) == ["e0002.h5"]
    failure = caught.value.failures["e0002.h5"]
    assert "e0002.h5" in failure and repr(key) in failure and reason in failure
    done = sorted(p.name for p in (run_copy / "replay" / "results").glob("e*.json"))
    assert done == ["e0000.json", "e0001.json", "e0003.json"]


@pytest.mark.parametrize("field, value", [("version", "1.0"), ("train", [0.5]), ("step", "7")])
def test_result_of_the_wrong_type_is_recomputed_like_a_damaged_one(run_copy, field, value):
    replay(run_copy)
    path = run_copy / "replay" / "results" / "e0001.json"
    damaged = {**json.loads(path.read_text()), field: value, "evaluated": 0.0}
    path.write_text(json.dumps(damaged))
    others = {p.name: p.read_text() for p in path.parent.glob("e*.json") if p != path}

    replay(run_copy)

    recomputed = json.loads(path.read_text())
    assert recomputed["version"] == 1 and recomputed["evaluated"] > 0
    assert {p.name: p.read_text() for p in path.parent.glob("e*.json") if p != path} == others


def test_result_files_of_a_diverged_run_are_strict_json(tmp_path):
    x, y = make_data(n=64)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, verbose=0, callbacks=[ReplayCheckpoint(tmp_path, train_data=(x, y))])
    with h5py.File(tmp_path / "checkpoints" / "e0001.h5", "a") as f:
        next(d for n, d in _datasets(f["weights"]) if n.endswith("kernel"))[...] = np.inf

    replay(tmp_path)

    frame = load_frame(tmp_path).set_index("checkpoint")
    assert np.isnan(frame.loc["e0001.h5", "loss"])  # inf logits: a NaN loss, read back as NaN
    assert np.isfinite(frame.loc["e0000.h5", "loss"])
    for path in [*(tmp_path / "replay" / "results").glob("*.json"), tmp_path / "manifest.json"]:
        json.loads(path.read_text(), parse_constant=pytest.fail)  # no bare NaN / Infinity
    result = json.loads((tmp_path / "replay" / "results" / "e0001.json").read_text())
    assert result["train"]["loss"] is None


def test_model_file_of_garbage_bytes_is_named_damaged(run_copy):
    (run_copy / "model.keras").write_bytes(b"\x00garbage, not a zip archive" * 40)

    with pytest.raises(ModelLoadError) as caught:
        replay(run_copy)

    message = str(caught.value)
    assert f"{run_copy / 'model.keras'} is not a valid .keras archive" in message
    assert "damaged" in message and "File not found" not in message


PARSE_HUGE_RANGE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (700 * 2**20,) * 2)
from trueloss_replay.scheduler import parse_epochs
epochs = parse_epochs("1-1000000000")
print(0 in epochs, 1 in epochs, 10**9 in epochs, 10**9 + 1 in epochs)
"""


def test_parse_epochs_of_a_huge_range_stays_within_a_memory_bound():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", PARSE_HUGE_RANGE], capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True", "True", "False"]


def test_huge_epoch_range_selects_the_run_s_checkpoints(run_copy):
    history = replay(run_copy, epochs="2-1000000000")

    done = sorted(p.name for p in (run_copy / "replay" / "results").glob("e*.json"))
    assert done == ["e0002.json", "e0003.json"]
    assert np.isnan(history.history["loss"][0]) and np.isfinite(history.history["loss"][2])


@contextlib.contextmanager
def _files_capped_at(size: int):
    """This process may not grow a file past ``size`` bytes: the OS refuses the write (EFBIG),
    as a full disk refuses it (ENOSPC). Lifted again on the way out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_lists_every_lost_checkpoint_and_result_before_the_export(
    run_copy, replay_results
):
    from click.testing import CliRunner

    from trueloss_replay.cli import main
    from trueloss_replay.run import write_result

    results = run_copy / "replay" / "results"
    results.mkdir(parents=True)
    kept = write_result(results, replay_results["e0002.h5"]).read_bytes()
    (run_copy / "checkpoints" / "e0001.h5").write_bytes(b"garbage")
    command = ["replay", str(run_copy), "--no-progress", "--force"]

    with _files_capped_at(64):  # every result file is larger; CliRunner's output is in memory
        result = CliRunner().invoke(main, command)

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("Error: 1 checkpoint(s) of "), result.output
    lost = error.index("e0001.h5 (checkpoint")
    unwritten = error.index("could not write 3 result file(s): ")
    names = [error.index(f"{results / n} (File too large)") for n in ("e0000.json", "e0003.json")]
    export = error.index("Writing the History files failed too: could not write ")
    assert lost < unwritten < min(names) and max(names) < export
    assert f"{results / 'e0002.json'} (File too large)" in error
    # Nothing already written is lost or corrupted, and no temporary file is left behind.
    assert (results / "e0002.json").read_bytes() == kept
    assert sorted(p.name for p in results.iterdir()) == ["e0002.json"]
