"""Shared fixtures: one tiny regularized model trained once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from trueloss_replay import ReplayCheckpoint  # noqa: E402

EPOCHS = 3


def make_data(n=240, features=8, classes=3, seed=0):
    """A small, learnable classification problem (float32 x, int32 labels)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    w = rng.normal(size=(features, classes))
    y = np.argmax(x @ w + 0.5 * rng.normal(size=(n, classes)), axis=1).astype("int32")
    return x, y


def build_model(features=8, classes=3, l2=1e-2, dropout=0.5, seed=0):
    """Dense + L2, BatchNorm, Dropout, softmax: every cause of the reported-loss gap."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(16, activation="relu", kernel_regularizer=keras.regularizers.L2(l2)),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(dropout),
            keras.layers.Dense(classes, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


@dataclass
class TrainedRun:
    path: Path
    history: keras.callbacks.History
    weights: dict[int, list[np.ndarray]]  # completed epochs -> model.get_weights()
    model: keras.Model
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """A finished run folder of build_model(), read-only for the tests that share it."""
    x, y = make_data()
    train, val = (x[:180], y[:180]), (x[180:], y[180:])
    model = build_model()
    path = tmp_path_factory.mktemp("shared") / "run"
    weights = {0: model.get_weights()}
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: weights.__setitem__(epoch + 1, model.get_weights())
    )
    history = model.fit(
        *train,
        validation_data=val,
        epochs=EPOCHS,
        batch_size=32,
        verbose=0,
        callbacks=[ReplayCheckpoint(path, train_data=train, val_data=val), record],
    )
    return TrainedRun(path, history, weights, model, train, val)


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the shared run folder, for tests that change it."""
    target = tmp_path / "run"
    shutil.copytree(trained_run.path, target)
    return target


@pytest.fixture(scope="session")
def replay_results(trained_run) -> dict[str, dict]:
    """Result dicts for every checkpoint of the shared run, computed with Keras itself.

    ``model.evaluate`` on the whole set in one batch gives data loss + penalty; the penalty
    is ``sum(model.losses)`` (weight penalties only in build_model), so the data loss is the
    difference. Independent of the replay engine, for the tests of what reads results.
    """
    import warnings

    from trueloss_replay.data import load_arrays
    from trueloss_replay.run import Run, load_weights, make_result

    run = Run(trained_run.path)
    with warnings.catch_warnings():  # the optimizer's variables are not in model.keras
        warnings.simplefilter("ignore")
        model = keras.saving.load_model(run.path / "model.keras")
    splits = {name: load_arrays(run.path / "data" / f"{name}.h5") for name in ("train", "val")}
    results = {}
    for checkpoint in run.checkpoints():
        load_weights(model, checkpoint.path)
        penalty = float(sum(float(loss) for loss in model.losses))
        figures = {}
        for name, (x, y, _) in splits.items():
            logs = model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
            figures[name] = {
                "loss": logs["loss"] - penalty,
                "regularization_loss": penalty,
                "accuracy": logs["accuracy"],
            }
        results[checkpoint.name] = make_result(
            checkpoint,
            train=figures["train"],
            val=figures["val"],
            examples={name: len(arrays[0]) for name, arrays in splits.items()},
            data={},
            batch_size=2048,
            backend=keras.backend.backend(),
            device="/CPU:0",
            seconds=0.0,
            evaluated=0.0,
        )
    return results


@pytest.fixture
def replayed_run(run_copy, replay_results) -> Path:
    """A private copy of the shared run with a result file for every checkpoint."""
    from trueloss_replay.run import write_result

    folder = run_copy / "replay" / "results"
    folder.mkdir(parents=True)
    for result in replay_results.values():
        write_result(folder, result)
    return run_copy


def replay_command(run_dir, *options: str) -> list[str]:
    """The command line of ``trueloss-replay replay RUN_DIR --no-progress OPTIONS...`` run by
    this interpreter (the console script may belong to another environment)."""
    cli = "from trueloss_replay.cli import main; main()"
    return [sys.executable, "-c", cli, "replay", str(run_dir), "--no-progress", *options]


def replay_in_subprocess(run_dir, output, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``trueloss-replay replay RUN_DIR --results OUTPUT`` as a real process, in ``env``."""
    return subprocess.run(
        replay_command(run_dir, "--results", str(output)),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
