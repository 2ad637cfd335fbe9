"""Custom layers, losses and metrics: replaying a run with ``--import``.

The replay rebuilds the model from ``RUN_DIR/model.keras``. Keras can only rebuild a custom
class or function that is registered in the replaying process, so:

1. decorate every custom object with ``@keras.saving.register_keras_serializable`` (and give
   classes a ``get_config`` that returns their constructor arguments);
2. keep them in a module that can be imported without side effects (training code goes
   under ``if __name__ == "__main__":`` or in another file);
3. name that module when replaying: ``trueloss-replay replay RUN --import custom_objects``
   (``replay(run_dir, imports=["custom_objects"])`` in Python).

Without step 3 the replay stops with a message that names the missing object and suggests
``--import``. This script trains a small model with a custom layer, a custom loss and a
custom metric, then runs the command line twice to show both outcomes::

    cd examples
    python custom_objects.py --epochs 10 --out runs/custom
    trueloss-replay replay runs/custom/run --import custom_objects

``--import`` imports the module by name, from the current directory (as ``--data`` and
``--model`` do) or anywhere on the Python path, e.g. an installed package of your project.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Silence TensorFlow's C++ start-up logging; must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from trueloss_replay import ReplayCheckpoint  # noqa: E402

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- custom objects
# package="examples" makes the registered names "examples>ResidualDense", ...: the names
# stored in model.keras, and the names the replay's error message shows.


@keras.saving.register_keras_serializable(package="examples")
class ResidualDense(keras.layers.Layer):
    """``x + activation(x @ kernel + bias)``: a dense layer with a skip connection."""

    def __init__(self, activation="relu", l2=1e-3, **kwargs):
        super().__init__(**kwargs)
        self.activation = keras.activations.get(activation)
        self.l2 = l2

    def build(self, input_shape):
        width = input_shape[-1]
        self.kernel = self.add_weight(
            shape=(width, width),
            initializer="glorot_uniform",
            regularizer=keras.regularizers.L2(self.l2),
            name="kernel",
        )
        self.bias = self.add_weight(shape=(width,), initializer="zeros", name="bias")

    def call(self, inputs):
        return inputs + self.activation(ops.matmul(inputs, self.kernel) + self.bias)

    def get_config(self):
        config = super().get_config()
        config.update({"activation": keras.activations.serialize(self.activation), "l2": self.l2})
        return config


@keras.saving.register_keras_serializable(package="examples")
class FocalLoss(keras.losses.Loss):
    """Focal loss for integer labels: cross-entropy down-weighted on easy examples."""

    def __init__(self, gamma=2.0, name="focal_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.gamma = gamma

    def call(self, y_true, y_pred):
        y_true = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        probs = ops.clip(y_pred, 1e-7, 1.0 - 1e-7)
        p_true = ops.sum(probs * ops.one_hot(y_true, ops.shape(probs)[-1]), axis=-1)
        return -ops.power(1.0 - p_true, self.gamma) * ops.log(p_true)

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma}


@keras.saving.register_keras_serializable(package="examples")
def confident_accuracy(y_true, y_pred):
    """1 where the prediction is right with probability > 0.5, else 0 (mean over a batch)."""
    y_true = ops.cast(ops.reshape(y_true, (-1,)), "int32")
    right = ops.equal(ops.cast(ops.argmax(y_pred, axis=-1), "int32"), y_true)
    sure = ops.max(y_pred, axis=-1) > 0.5
    return ops.cast(ops.logical_and(right, sure), "float32")


def build_model(features: int, classes: int) -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(32, activation="relu"),
            ResidualDense(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(classes, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=FocalLoss(gamma=2.0),
        metrics=["accuracy", confident_accuracy],
    )
    return model


# --------------------------------------------------------------------------- the example


def make_data(n: int = 600, features: int = 16, classes: int = 4, seed: int = 0):
    """A synthetic classification problem: labels from a noisy random linear map."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    w = rng.normal(size=(features, classes))
    y = np.argmax(x @ w + 0.5 * rng.normal(size=(n, classes)), axis=1).astype("int32")
    cut = int(0.8 * n)
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def cli_command() -> list[str]:
    """``trueloss-replay``, from the same environment as this Python."""
    found = shutil.which("trueloss-replay", path=str(Path(sys.executable).parent))
    if found:
        return [found]
    return [sys.executable, "-c", "from trueloss_replay.cli import main; main()"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    # Run from this folder: --import finds custom_objects.py in the current directory.
    return subprocess.run(
        [*cli_command(), *args], cwd=HERE, capture_output=True, text=True, check=False
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--out", type=Path, default=Path("runs/custom"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seeds data, weights, dropout")
    args = parser.parse_args(argv)

    run_dir = (args.out / "run").resolve()
    train, val = make_data(seed=args.seed)
    keras.utils.set_random_seed(args.seed)
    model = build_model(features=train[0].shape[1], classes=int(train[1].max()) + 1)
    model.fit(
        *train,
        validation_data=val,
        epochs=args.epochs,
        batch_size=args.batch_size,
        verbose=0,
        callbacks=[ReplayCheckpoint(run_dir, train_data=train, val_data=val, overwrite=True)],
    )

    # A fresh process knows nothing of ResidualDense, FocalLoss or confident_accuracy.
    missing = run_cli("replay", str(run_dir), "--no-progress")
    print(f"$ trueloss-replay replay {run_dir} --no-progress   (exit {missing.returncode})")
    print(missing.stderr.strip() or missing.stdout.strip())
    if missing.returncode == 0:
        print("expected the replay to fail without --import", file=sys.stderr)
        return 1

    # --import custom_objects registers them (importing this module runs only the
    # definitions above, not main()).
    replayed = run_cli("replay", str(run_dir), "--import", "custom_objects", "--no-progress")
    print(f"$ trueloss-replay replay {run_dir} --import custom_objects --no-progress")
    print(replayed.stdout.strip())
    if replayed.returncode != 0:
        print(replayed.stderr.strip(), file=sys.stderr)
        return replayed.returncode
    # The true-loss History is now stored with the run: load_history(run_dir), or
    # `trueloss-replay history RUN` / `trueloss-replay plot RUN`, read it without the
    # custom objects and without evaluating anything again.
    print(f"results: {run_dir / 'replay'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
