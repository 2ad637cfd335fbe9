"""Training scripts that tests run in a separate Python process.

python tests/trainer_subprocess.py crash RUN_DIR       # trains a big model until killed
python tests/trainer_subprocess.py raise RUN_DIR [--catch]
python tests/trainer_subprocess.py mirrored RUN_DIR --save-final FILE.npz
python tests/trainer_subprocess.py hold RUN_DIR        # trains one epoch, then blocks in fit
python tests/trainer_subprocess.py paced RUN_DIR       # each epoch waits for a follower's result
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The crash test's model: big enough that writing a checkpoint takes measurable time.
CRASH_FEATURES = 64
CRASH_HIDDEN = 2000
CRASH_CLASSES = 10
CRASH_MODEL_NAME = "crash"
CRASH_LAYERS = (("big1", CRASH_HIDDEN), ("big2", CRASH_HIDDEN), ("out", CRASH_CLASSES))

RAISE_AT_EPOCH = 2  # the "raise" mode fails at the end of this (1-based) epoch

MIRRORED_SAMPLES = 200
MIRRORED_BATCH = 32


def crash(run_dir: str) -> None:
    import keras
    import numpy as np

    from trueloss_replay import ReplayCheckpoint

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((CRASH_FEATURES,))]
        + [keras.layers.Dense(units, name=name) for name, units in CRASH_LAYERS],
        name=CRASH_MODEL_NAME,
    )
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, CRASH_FEATURES)).astype("float32")
    y = rng.integers(0, CRASH_CLASSES, size=64)
    model.fit(x, y, batch_size=64, epochs=100_000, verbose=0, callbacks=[ReplayCheckpoint(run_dir)])


def fail(run_dir: str, catch: bool) -> None:
    import keras

    from tests.conftest import build_model, make_data
    from trueloss_replay import ReplayCheckpoint

    def boom(epoch, logs):
        if epoch + 1 == RAISE_AT_EPOCH:
            raise RuntimeError(f"boom at epoch {epoch + 1}")

    x, y = make_data(96)
    model = build_model()
    callbacks = [ReplayCheckpoint(run_dir), keras.callbacks.LambdaCallback(on_epoch_end=boom)]
    try:
        model.fit(x, y, batch_size=32, epochs=5, verbose=0, callbacks=callbacks)
    except RuntimeError as e:
        if not catch:
            raise
        print(f"caught: {e}")


def hold(run_dir: str) -> None:
    import time

    import keras

    from tests.conftest import build_model, make_data
    from trueloss_replay import ReplayCheckpoint

    x, y = make_data(64)
    model = build_model()
    block = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: time.sleep(3600))
    callbacks = [ReplayCheckpoint(run_dir), block]
    model.fit(x, y, batch_size=32, epochs=5, verbose=0, callbacks=callbacks)


PACED_EPOCHS = 2
PACED_WAIT = 120.0  # seconds an epoch waits for the follower before training on


def paced(run_dir: str) -> None:
    """Trains build_model(); each epoch ends only once a follower has written the result of
    its checkpoint (or after PACED_WAIT seconds): a slow epoch, as long as the follower
    needs, so that the test shows evaluation during training without a fixed sleep."""
    import time

    import keras

    from tests.conftest import build_model, make_data
    from trueloss_replay import ReplayCheckpoint

    results = Path(run_dir) / "replay" / "results"

    def wait_for_result(epoch, logs):
        deadline = time.monotonic() + PACED_WAIT
        while not (results / f"e{epoch + 1:04d}.json").is_file():
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)

    x, y = make_data()
    train, val = (x[:180], y[:180]), (x[180:], y[180:])
    model = build_model()
    callbacks = [
        ReplayCheckpoint(run_dir, train_data=train, val_data=val),
        keras.callbacks.LambdaCallback(on_epoch_end=wait_for_result),
    ]
    model.fit(
        *train,
        validation_data=val,
        batch_size=32,
        epochs=PACED_EPOCHS,
        verbose=0,
        callbacks=callbacks,
    )


def mirrored(run_dir: str, save_final: str) -> None:
    import tensorflow as tf

    # Must come before TensorFlow initializes its devices.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )

    import keras
    import numpy as np

    from tests.conftest import make_data
    from trueloss_replay import ReplayCheckpoint

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    print(f"replicas={strategy.num_replicas_in_sync}")
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.BatchNormalization(),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
        model.compile(
            optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
    x, y = make_data(MIRRORED_SAMPLES)
    model.fit(
        x,
        y,
        batch_size=MIRRORED_BATCH,
        epochs=2,
        verbose=0,
        callbacks=[ReplayCheckpoint(run_dir)],
    )
    np.savez(save_final, **{str(i): w for i, w in enumerate(model.get_weights())})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["crash", "raise", "mirrored", "hold", "paced"])
    parser.add_argument("run_dir")
    parser.add_argument("--catch", action="store_true")
    parser.add_argument("--save-final")
    args = parser.parse_args()
    if args.mode == "crash":
        crash(args.run_dir)
    elif args.mode == "hold":
        hold(args.run_dir)
    elif args.mode == "paced":
        paced(args.run_dir)
    elif args.mode == "raise":
        fail(args.run_dir, args.catch)
    else:
        mirrored(args.run_dir, args.save_final)


if __name__ == "__main__":
    main()
