"""The digits demo, written out with the public API.

A small regularized classifier (L2, BatchNormalization, Dropout) on scikit-learn's bundled
8x8 digits: the three things that make the training loss Keras reports incomparable with
``val_loss``. ``ReplayCheckpoint`` stores the weights of every epoch during ``fit``; after
training, ``replay`` evaluates every checkpoint in inference mode and returns a
``keras.callbacks.History`` of the *true* curves, which plots like the one ``fit`` returned.

Run it (needs scikit-learn, whose digits data ships with the package, so nothing is
downloaded)::

    python examples/digits_demo.py --epochs 20 --out runs/digits

It writes ``runs/digits/run`` (the run folder: checkpoints, manifest, replay results),
``runs/digits/curves.png`` and prints the reported against the true loss of the last epoch.
``trueloss-replay demo`` does the same in one command.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# Silence TensorFlow's C++ start-up logging; must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from trueloss_replay import ReplayCheckpoint, plot_history, replay  # noqa: E402


def digits_data(seed: int = 0):
    """The 1797 digits scaled to [0, 1], shuffled and split 80/20: ``((x, y), (xv, yv))``."""
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def build_model(l2: float = 2e-3, dropout: float = 0.5, width: int = 128) -> keras.Model:
    """An MLP with every cause of a misleading training curve.

    - the L2 penalty is added to both ``loss`` and ``val_loss`` by Keras;
    - Dropout is on during training, so the reported loss is that of a noisier model;
    - BatchNormalization normalizes with batch statistics in training mode.
    """
    regularizer = keras.regularizers.L2(l2)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(width, activation="relu", kernel_regularizer=regularizer),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(dropout),
            keras.layers.Dense(width, activation="relu", kernel_regularizer=regularizer),
            keras.layers.Dropout(dropout),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--out", type=Path, default=Path("runs/digits"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split, weights, dropout")
    args = parser.parse_args(argv)

    run_dir = args.out / "run"
    train, val = digits_data(args.seed)
    keras.utils.set_random_seed(args.seed)
    model = build_model()

    # train_data/val_data are snapshotted once into run_dir/data/*.h5, so the replay needs
    # nothing but the run folder. overwrite=True because rerunning the example replaces the
    # previous run; leave it out in real experiments to protect finished runs.
    checkpoint = ReplayCheckpoint(run_dir, train_data=train, val_data=val, overwrite=True)
    reported = model.fit(
        *train,
        validation_data=val,
        epochs=args.epochs,
        batch_size=args.batch_size,
        verbose=0,
        callbacks=[checkpoint],
    )

    # Any time later, in any process: evaluate every checkpoint in inference mode. The
    # results are stored in run_dir/replay/, so a second call only reads them back.
    history = replay(run_dir)

    # plot_history draws true and reported curves; any code that plots a Keras History works
    # just as well on this one (history.history["loss"], history.history["val_loss"], ...).
    plot_path = args.out / "curves.png"
    plot_history(history, path=plot_path)

    h = history.history
    epoch = len(h["loss"])
    print(f"epoch {epoch} of {len(reported.history['loss'])}")
    print(f"reported loss            {h['reported_loss'][-1]:.6f}  (fit's running mean)")
    print(f"true loss                {h['loss'][-1]:.6f}  (inference mode, no penalty)")
    print(f"regularization_loss      {h['regularization_loss'][-1]:.6f}  (the L2 penalty)")
    print(f"reported val_loss        {h['reported_val_loss'][-1]:.6f}  (includes the penalty)")
    print(f"true val_loss            {h['val_loss'][-1]:.6f}")
    print(f"run folder               {run_dir}")
    print(f"plot                     {plot_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
