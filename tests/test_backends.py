"""The backend layer and the compiled programs: each Keras backend, one program per shape,
the ragged last batch, compute_loss overrides, replay across backends, the refusal of others."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from trueloss_replay.backends import get_backend, resolve_devices
from trueloss_replay.data import ArraySplit
from trueloss_replay.engine import Evaluator
from trueloss_replay.errors import BackendError
from trueloss_replay.run import Run, read_weights
from trueloss_replay.scheduler import replay

from .conftest import replay_in_subprocess

pytestmark = pytest.mark.backend

RTOL = 1e-5
OTHER_BACKEND = "jax" if keras.backend.backend() == "tensorflow" else "tensorflow"


def _env(backend: str) -> dict[str, str]:
    return {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}


# --------------------------------------------------------------------------- refusal


@pytest.mark.parametrize("name", ["torch", "numpy", "openvino"])
def test_unsupported_backend_is_refused_naming_the_supported_ones(name):
    with pytest.raises(BackendError) as info:
        get_backend(name)
    message = str(info.value)
    assert repr(name) in message
    assert "KERAS_BACKEND=tensorflow" in message and "KERAS_BACKEND=jax" in message


def test_cli_replay_on_an_unsupported_backend_exits_1_with_one_line(trained_run, tmp_path):
    # Keras' numpy backend installs with Keras itself, so it stands in for PyTorch here.
    result = replay_in_subprocess(trained_run.path, tmp_path / "results", _env("numpy"))
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Keras is on 'numpy'" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists()


def test_resolve_devices_names_devices_of_the_current_backend():
    gpus, cpus = get_backend().list_devices()
    assert resolve_devices("auto") == (gpus or cpus[:1])
    assert resolve_devices("cpu") == cpus
    assert resolve_devices(cpus[0]) == [cpus[0]]


# --------------------------------------------------------------------------- programs


class ExampleCount(keras.metrics.Metric):
    """Counts examples, ignoring sample weights: padding a batch would change it."""

    def __init__(self, name="examples", **kwargs):
        super().__init__(name=name, **kwargs)
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.count.assign_add(keras.ops.cast(keras.ops.shape(y_pred)[0], self.dtype))

    def result(self):
        return self.count


def _counted_model():
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", kernel_regularizer=keras.regularizers.L2(0.1)),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy", ExampleCount()],
    )
    return model


def _arrays(n=61, seed=2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = rng.integers(0, 3, size=n).astype("int32")
    sw = rng.uniform(0.5, 2.0, size=n).astype("float32")
    return x, y, sw


def _numpy_figures(model, x, y, sw):
    """Data loss and accuracy from ``predict`` and numpy; the penalty from ``model.losses``."""
    p = model.predict(x, batch_size=len(x), verbose=0).astype("float64")
    per_example = -np.log(np.clip(p[np.arange(len(y)), y], 1e-7, 1.0))
    correct = (p.argmax(axis=1) == y).astype("float64")
    return {
        "loss": float((per_example * sw).sum() / len(y)),
        "accuracy": float(correct.mean()),  # compile(metrics=...) ignores sample weights
        "regularization_loss": float(sum(float(v) for v in model.losses)),
        "examples": float(len(y)),
    }


@pytest.mark.parametrize("batch_size", [7, 20, 61, 1000])
def test_ragged_last_batch_changes_no_figure(batch_size):
    """61 examples: 8 full batches of 7 and a last one of 5; 3 of 20 and one of 1; one batch
    of 61 (also at batch size 1000). A metric counting examples would show any padding."""
    model = _counted_model()
    x, y, sw = _arrays()
    expected = _numpy_figures(model, x, y, sw)
    evaluator = Evaluator(model)
    figures, count = evaluator.evaluate(ArraySplit("train", x, y, sw), batch_size)
    assert count == 61
    assert figures["examples"] == 61.0
    assert callable(evaluator._results_program)  # the metrics' results ran compiled
    for key in ("loss", "accuracy", "regularization_loss"):
        assert figures[key] == pytest.approx(expected[key], rel=RTOL), key


class HostMeanConfidence(keras.metrics.Metric):
    """The mean top-class probability, its result() computed with numpy: untraceable."""

    def __init__(self, name="confidence", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.total.assign_add(keras.ops.sum(keras.ops.max(y_pred, axis=-1)))
        self.count.assign_add(keras.ops.cast(keras.ops.shape(y_pred)[0], self.dtype))

    def result(self):
        return float(np.asarray(self.total.value)) / float(np.asarray(self.count.value))


def test_metric_results_are_right_whether_or_not_result_can_be_compiled():
    """Metric results run as one compiled host program; a result() that only runs eagerly
    (numpy on the state) is computed eagerly, and both are right."""
    model = _counted_model()
    model.compile(
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy", ExampleCount(), HostMeanConfidence()],
    )
    x, y, sw = _arrays()
    p = model.predict(x, batch_size=len(x), verbose=0).astype("float64")
    evaluator = Evaluator(model)

    figures, _ = evaluator.evaluate(ArraySplit("train", x, y, sw), 20)

    assert figures["examples"] == 61.0
    assert figures["accuracy"] == pytest.approx((p.argmax(axis=1) == y).mean(), rel=RTOL)
    assert figures["confidence"] == pytest.approx(p.max(axis=1).mean(), rel=RTOL)
    assert evaluator._results_program is False  # the eager way, after the compiled one failed
    again, _ = evaluator.evaluate(ArraySplit("train", x, y, sw), 20)
    assert again == figures


@pytest.mark.parametrize("traceable", [True, False])
def test_a_groups_metric_results_are_each_checkpoints_own(traceable):
    """Three checkpoints evaluated in one stacked call: their metric results come from one
    compiled call (or, with a result() that only runs eagerly, one by one), and each is the
    checkpoint's own, as numpy computes it from that checkpoint's predictions."""
    model = _counted_model()
    metrics = ["accuracy", keras.metrics.SparseCategoricalCrossentropy(name="ce"), ExampleCount()]
    metrics += [] if traceable else [HostMeanConfidence()]
    model.compile(loss="sparse_categorical_crossentropy", metrics=metrics)
    x, y, sw = _arrays()
    rng = np.random.default_rng(7)
    weight_sets = [
        [np.asarray(v) * scale + rng.normal(0, 0.3, v.shape).astype(v.dtype) for v in model.weights]
        for scale in (1.0, -0.5, 2.0)
    ]
    evaluator = Evaluator(model)
    buffers = evaluator.host_stack(3)
    for slot, weights in enumerate(weight_sets):
        for view, array in zip(evaluator.slot_views(buffers, slot), weights, strict=True):
            view[...] = array
    params = evaluator.stage_stack(buffers, 3)

    results = evaluator.evaluate_stacked({"train": ArraySplit("train", x, y, sw)}, 20, params, 3)

    assert callable(evaluator._results_program) is traceable
    entropies = []
    for weights, result in zip(weight_sets, results, strict=True):
        figures, count = result["train"]
        model.set_weights(weights)
        p = model.predict(x, batch_size=len(x), verbose=0).astype("float64")
        assert count == 61 and figures["examples"] == 61.0
        assert figures["accuracy"] == pytest.approx((p.argmax(axis=1) == y).mean(), rel=RTOL)
        ce = -np.log(np.clip(p[np.arange(len(y)), y], 1e-7, 1.0)).mean()  # unweighted
        assert figures["ce"] == pytest.approx(ce, rel=RTOL)
        if not traceable:
            assert figures["confidence"] == pytest.approx(p.max(axis=1).mean(), rel=RTOL)
        entropies.append(figures["ce"])
    assert len(set(entropies)) == 3  # a mix-up of checkpoints would show


def test_programs_are_traced_once_per_shape_not_per_checkpoint(trained_run):
    """Three checkpoints, 180 train and 60 val examples at batches of 50: the stacked loop
    and the last-batch program of each split, traced for the first checkpoint only."""
    from trueloss_replay.engine import load_model

    run = Run(trained_run.path)
    evaluator = Evaluator(load_model(run))
    splits = {
        "train": ArraySplit("train", *trained_run.train),
        "val": ArraySplit("val", *trained_run.val),
    }
    traces = []
    for checkpoint in run.checkpoints():
        evaluator.load(read_weights(checkpoint.path), checkpoint.name)
        evaluator.evaluate_splits(splits, 50)
        traces.append(evaluator.traces)
    assert len(traces) == 4  # e0000 .. e0003
    # train: 3 batches of 50 + 30; val: 1 batch of 50 + 10. Two loop shapes, two rest shapes.
    assert traces[0] == 4
    assert traces == [traces[0]] * len(traces)


def test_each_checkpoint_gets_its_own_figures_from_one_program(trained_run):
    """The program takes the weights as arguments: figures follow the checkpoint, and equal
    Keras' evaluate() at those weights."""
    from trueloss_replay.engine import load_model

    run = Run(trained_run.path)
    model = load_model(run)
    evaluator = Evaluator(model)
    x, y = trained_run.train
    split = ArraySplit("train", x, y)
    reference = keras.models.clone_model(trained_run.model)
    reference.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    for epoch, weights in sorted(trained_run.weights.items()):
        checkpoint = run.checkpoint_dir / f"e{epoch:04d}.h5"
        evaluator.load(read_weights(checkpoint), checkpoint.name)
        figures, _ = evaluator.evaluate(split, 64)
        reference.set_weights(weights)
        logs = reference.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
        penalty = float(sum(float(v) for v in reference.losses))
        assert figures["loss"] + figures["regularization_loss"] == pytest.approx(
            logs["loss"], rel=RTOL
        )
        assert figures["regularization_loss"] == pytest.approx(penalty, rel=RTOL)
        assert figures["accuracy"] == pytest.approx(logs["accuracy"], rel=RTOL)


# --------------------------------------------------------------------------- compute_loss


class ScaledMSE(keras.Model):
    """Overrides compute_loss, as Keras 3 documents: 2 * MSE plus an L1 term on the output,
    plus the penalties (self.losses), with its own tracker."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(
            5, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.05)
        )
        self.out = keras.layers.Dense(1)
        self.tracker = keras.metrics.Mean(name="custom_loss")

    def call(self, x):
        return self.out(self.hidden(x))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        data = 2.0 * keras.ops.mean((y_pred - y) ** 2) + 0.1 * keras.ops.mean(keras.ops.abs(y_pred))
        total = data
        for penalty in self.losses:
            total = total + penalty
        self.tracker.update_state(total)
        return total


def test_compute_loss_override_is_evaluated_through_it():
    keras.utils.set_random_seed(3)
    model = ScaledMSE()
    model.compile(optimizer="sgd", metrics=["mae"])  # no compiled loss: compute_loss is it
    rng = np.random.default_rng(4)
    x = rng.normal(size=(45, 4)).astype("float32")
    y = rng.normal(size=(45, 1)).astype("float32")
    model(x[:1])
    figures, count = Evaluator(model).evaluate(ArraySplit("train", x, y), 20)

    p = model.predict(x, batch_size=len(x), verbose=0).astype("float64")
    per_batch = []
    for start in range(0, 45, 20):
        pb, yb = p[start : start + 20], y[start : start + 20].astype("float64")
        per_batch.append((2.0 * ((pb - yb) ** 2).mean() + 0.1 * np.abs(pb).mean(), len(pb)))
    expected = sum(v * n for v, n in per_batch) / 45
    penalty = 0.05 * float((np.asarray(model.hidden.kernel, dtype="float64") ** 2).sum())
    assert count == 45
    assert figures["loss"] == pytest.approx(expected, rel=RTOL)
    assert figures["regularization_loss"] == pytest.approx(penalty, rel=RTOL)
    assert figures["mae"] == pytest.approx(float(np.abs(p - y).mean()), rel=RTOL)
    assert float(model.tracker.count) == 0.0  # evaluation changed none of the model's state


# --------------------------------------------------------------------------- across backends


def test_run_replays_on_the_other_backend_with_the_same_figures(trained_run, tmp_path):
    """Checkpoints hold plain arrays: a run trained here replays on the other backend."""
    here = replay(trained_run.path, output=tmp_path / "here", batch_size=50)
    script = (
        "import sys\n"
        "from trueloss_replay.scheduler import replay\n"
        "replay(sys.argv[1], output=sys.argv[2], batch_size=50)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(trained_run.path), str(tmp_path / "there")],
        capture_output=True,
        text=True,
        env=_env(OTHER_BACKEND),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    there = {
        json.loads(p.read_text())["checkpoint"]: json.loads(p.read_text())
        for p in (tmp_path / "there").glob("e*.json")
    }
    assert len(there) == 4
    assert {r["backend"] for r in there.values()} == {OTHER_BACKEND}
    for checkpoint, result_there in there.items():
        result_here = json.loads(
            (tmp_path / "here" / checkpoint.replace(".h5", ".json")).read_text()
        )
        for split in ("train", "val"):
            for key, value in result_here[split].items():
                assert result_there[split][key] == pytest.approx(value, rel=RTOL, abs=1e-7), (
                    checkpoint,
                    split,
                    key,
                )
    assert here.history["loss"] == pytest.approx(
        [there[f"e{e:04d}.h5"]["train"]["loss"] for e in (1, 2, 3)], rel=RTOL
    )


# --------------------------------------------------------------------------- callback


def test_a_per_epoch_callback_keeps_keras_async_dispatch(tmp_path):
    """Overriding a batch hook makes Keras wait for the device at every step (JAX): the
    per-epoch callback defines none; one that saves every N steps must."""
    from keras.src import backend as keras_backend
    from keras.src.utils.python_utils import is_default

    from trueloss_replay import ReplayCheckpoint

    from .conftest import build_model

    per_epoch = ReplayCheckpoint(tmp_path / "epoch")
    per_steps = ReplayCheckpoint(tmp_path / "steps", save_freq=5)
    assert is_default(per_epoch.on_train_batch_end) and is_default(per_epoch.on_batch_end)
    assert not is_default(per_steps.on_train_batch_end)

    model = build_model()
    epoch_list = keras.callbacks.CallbackList([per_epoch], model=model)
    steps_list = keras.callbacks.CallbackList([per_steps], model=model)
    assert not steps_list._async_train
    # Keras dispatches batch callbacks asynchronously only on thread-safe backends (JAX).
    assert epoch_list._async_train == keras_backend.IS_THREAD_SAFE
