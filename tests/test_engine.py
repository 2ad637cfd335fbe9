"""Replay figures against independent computations (numpy from predict, Keras evaluate)."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from trueloss_replay import ReplayCheckpoint
from trueloss_replay.scheduler import replay

pytestmark = pytest.mark.backend

RTOL = 1e-5


def _data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = np.argmax(x[:, :3] + 0.7 * rng.normal(size=(n, 3)), axis=1).astype("int32")
    target = (x[:, 3:5].sum(axis=1, keepdims=True) + 0.1 * rng.normal(size=(n, 1))).astype(
        "float32"
    )
    sw = rng.uniform(0.2, 2.0, size=n).astype("float32")
    return x, y, target, sw


def _single_output_model():
    keras.utils.set_random_seed(1)
    reg = keras.regularizers
    inputs = keras.Input((8,))
    h = keras.layers.Dense(
        16,
        activation="relu",
        kernel_regularizer=reg.L1L2(l1=1e-3, l2=1e-2),
        activity_regularizer=reg.L2(1e-3),
    )(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Dropout(0.5)(h)
    outputs = keras.layers.Dense(3, activation="softmax", kernel_regularizer=reg.L1(1e-3))(h)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top2")],
    )
    return model


def _two_output_model():
    keras.utils.set_random_seed(2)
    inputs = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-2))(
        inputs
    )
    h = keras.layers.Dropout(0.3)(h)
    a = keras.layers.Dense(3, activation="softmax", name="a")(h)
    b = keras.layers.Dense(1, name="b")(h)
    model = keras.Model(inputs, {"a": a, "b": b})
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss={"a": "sparse_categorical_crossentropy", "b": "mse"},
        loss_weights={"a": 1.0, "b": 0.5},
        metrics={"a": ["accuracy"], "b": ["mae"]},
    )
    return model


def _train(tmp_path_factory, name, build, targets):
    x, y, target, sw = _data(240, seed=3)
    ys = targets(y, target)
    train = (x[:180], _take(ys, slice(0, 180)), sw[:180])
    val = (x[180:], _take(ys, slice(180, None)), sw[180:])
    model = build()
    weights = {}
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: weights.__setitem__(epoch + 1, model.get_weights())
    )
    path = tmp_path_factory.mktemp(name) / "run"
    model.fit(
        train[0],
        train[1],
        sample_weight=train[2],
        validation_data=val,
        epochs=2,
        batch_size=32,
        verbose=0,
        callbacks=[ReplayCheckpoint(path, train_data=train, val_data=val), record],
    )
    return path, build, weights, {"train": train, "val": val}


def _take(ys, part):
    return {k: v[part] for k, v in ys.items()} if isinstance(ys, dict) else ys[part]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    return _train(tmp_path_factory, "single", _single_output_model, lambda y, t: y)


@pytest.fixture(scope="module")
def two_output_run(tmp_path_factory):
    return _train(tmp_path_factory, "two", _two_output_model, lambda y, t: {"a": y, "b": t})


def _results(folder):
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("e*.json"))}


def _crossentropy(p, y):
    return -np.log(np.clip(p[np.arange(len(y)), y].astype(np.float64), 1e-7, 1.0))


@pytest.mark.parametrize("batch_size", [30, 7])  # divides 180 and 60; divides neither
def test_single_output_figures_match_numpy_and_evaluate(single_run, tmp_path, batch_size):
    path, build, weights, splits = single_run
    replay(path, batch_size=batch_size, output=tmp_path)
    results = _results(tmp_path)
    model = build()
    for epoch, w in weights.items():
        model.set_weights(w)
        for split, (x, y, sw) in splits.items():
            got = results[f"e{epoch:04d}"][split]
            p = model.predict(x, verbose=0, batch_size=1000)
            data_loss = float(np.sum(_crossentropy(p, y) * sw) / len(y))
            accuracy = float(np.mean(np.argmax(p, axis=1) == y))
            top2 = float(np.mean(np.argsort(p, axis=1)[:, -2:] == y[:, None]) * 2)
            evaluated = model.evaluate(x, y, sample_weight=sw, verbose=0, return_dict=True)
            np.testing.assert_allclose(got["loss"], data_loss, rtol=RTOL)
            np.testing.assert_allclose(got["accuracy"], accuracy, rtol=RTOL)
            np.testing.assert_allclose(got["top2"], top2, rtol=RTOL)
            np.testing.assert_allclose(
                got["loss"] + got["regularization_loss"], evaluated["loss"], rtol=RTOL
            )
            assert got["regularization_loss"] > 0


@pytest.mark.parametrize("batch_size", [60, 13])
def test_two_output_model_with_loss_weights(two_output_run, tmp_path, batch_size):
    path, build, weights, splits = two_output_run
    replay(path, batch_size=batch_size, output=tmp_path)
    results = _results(tmp_path)
    model = build()
    for epoch, w in weights.items():
        model.set_weights(w)
        for split, (x, ys, sw) in splits.items():
            got = results[f"e{epoch:04d}"][split]
            p = model.predict(x, verbose=0, batch_size=1000)
            a_loss = float(np.sum(_crossentropy(p["a"], ys["a"]) * sw) / len(x))
            b_loss = float(np.sum(((p["b"] - ys["b"]) ** 2).mean(axis=1) * sw) / len(x))
            evaluated = model.evaluate(x, ys, sample_weight=sw, verbose=0, return_dict=True)
            assert set(got) - {"regularization_loss"} == set(evaluated)
            np.testing.assert_allclose(got["loss"], 1.0 * a_loss + 0.5 * b_loss, rtol=RTOL)
            np.testing.assert_allclose(got["a_loss"], a_loss, rtol=RTOL)
            np.testing.assert_allclose(got["b_loss"], b_loss, rtol=RTOL)
            np.testing.assert_allclose(
                got["a_accuracy"], np.mean(np.argmax(p["a"], axis=1) == ys["a"]), rtol=RTOL
            )
            np.testing.assert_allclose(got["b_mae"], np.mean(np.abs(p["b"] - ys["b"])), rtol=RTOL)
            np.testing.assert_allclose(
                got["loss"] + got["regularization_loss"], evaluated["loss"], rtol=RTOL
            )


def test_figures_identical_with_and_without_xla(single_run, tmp_path):
    path = single_run[0]
    replay(path, batch_size=50, output=tmp_path / "xla", jit_compile=True)
    replay(path, batch_size=50, output=tmp_path / "plain", jit_compile=False)
    xla, plain = _results(tmp_path / "xla"), _results(tmp_path / "plain")
    assert sorted(xla) == sorted(plain) == ["e0000", "e0001", "e0002"]
    for name in plain:
        for split in ("train", "val"):
            for key, value in plain[name][split].items():
                np.testing.assert_allclose(xla[name][split][key], value, rtol=1e-6)


def test_step_is_traced_once_per_shape_across_checkpoints(trained_run):
    from trueloss_replay.data import ArraySplit
    from trueloss_replay.engine import Evaluator, load_model
    from trueloss_replay.run import Run, read_weights

    run = Run(trained_run.path)
    evaluator = Evaluator(load_model(run), jit_compile=True)
    split = ArraySplit("train", *trained_run.train)  # 180 examples: batches of 50 and of 30
    traces = []
    for checkpoint in run.checkpoints():
        evaluator.load(read_weights(checkpoint.path), checkpoint.name)
        evaluator.evaluate(split, 50)
        traces.append(evaluator.traces)
    assert traces == [2] * len(run.checkpoints())


def test_two_input_model_with_dict_inputs(tmp_path):
    keras.utils.set_random_seed(4)
    left, right = keras.Input((3,), name="left"), keras.Input((5,), name="right")
    h = keras.layers.Concatenate()([left, right])
    out = keras.layers.Dense(1, kernel_regularizer=keras.regularizers.L2(1e-2))(h)
    model = keras.Model({"left": left, "right": right}, out)
    model.compile("adam", "mse", metrics=["mae"])
    rng = np.random.default_rng(0)
    x = {
        "left": rng.normal(size=(90, 3)).astype("float32"),
        "right": rng.normal(size=(90, 5)).astype("float32"),
    }
    y = rng.normal(size=(90, 1)).astype("float32")
    model.fit(x, y, epochs=1, verbose=0, callbacks=[ReplayCheckpoint(tmp_path, train_data=(x, y))])
    history = replay(tmp_path, batch_size=40)
    p = model.predict(x, verbose=0)
    np.testing.assert_allclose(history.history["loss"][0], np.mean((p - y) ** 2), rtol=RTOL)
    np.testing.assert_allclose(history.history["mae"][0], np.mean(np.abs(p - y)), rtol=RTOL)
