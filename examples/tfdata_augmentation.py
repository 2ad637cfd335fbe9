"""Training from an augmenting ``tf.data`` pipeline; replaying on the clean data.

The model trains on the 8x8 digits as images, through a ``tf.data`` pipeline that shuffles
them and augments every example (a random shift of up to one pixel and Gaussian noise).
The training loss Keras reports is then measured on *augmented* images, in training mode
(Dropout on), averaged over an epoch whose weights kept changing: a different quantity from
``val_loss``. The replay evaluates each epoch's weights on the *clean* training images, so
``loss`` and ``val_loss`` finally measure the same thing on two data sets.

The callback cannot snapshot a ``tf.data`` pipeline, so it records a reference to a data
factory instead: ``ReplayCheckpoint(run_dir, data="tfdata_augmentation:load_data")``.
``load_data`` below returns the un-augmented, un-shuffled, finite, batched datasets; the
replay imports and calls it. The module is imported by name, with the current directory on
the import path, so run both the training and a later command-line replay from this folder::

    cd examples
    python tfdata_augmentation.py --epochs 10 --out runs/tfdata
    trueloss-replay replay runs/tfdata/run        # later: finds load_data via the manifest

(``python examples/tfdata_augmentation.py`` works too: Python puts the script's folder on
the import path, so the replay inside this script finds the module either way.)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# Silence TensorFlow's C++ start-up logging; must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from trueloss_replay import ReplayCheckpoint, plot_history, replay  # noqa: E402

# How the replay finds the data: "module:function", resolved by import at replay time.
DATA_REFERENCE = "tfdata_augmentation:load_data"
EVAL_BATCH_SIZE = 256


def digits_images(seed: int = 0):
    """The digits as (N, 8, 8, 1) float32 images in [0, 1], split 80/20."""
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., np.newaxis]
    y = digits.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def load_data():
    """The replay's data factory: ``{"train": ..., "val": ...}`` without augmentation.

    Why no augmentation, no shuffle and no repeat here:

    - The true loss is the loss *on the training set*. Random shifts and noise would make
      every replayed figure a sample of a random quantity (a different one for every
      checkpoint), and the curve would show the augmentation's noise, not the model's fit.
    - The replay compares checkpoints with each other, so every checkpoint must see exactly
      the same examples: the order does not change a mean, but a ``shuffle`` with
      ``drop_remainder`` or ``take`` would change which examples are seen.
    - It must be finite: the replay makes one pass per checkpoint (``.repeat()`` would never
      end).

    Keras preprocessing layers inside the model (``RandomFlip``, ``RandomTranslation``) are
    fine: they are inactive in inference mode, which is how the replay evaluates.
    """
    (x, y), (xv, yv) = digits_images()
    return {
        "train": tf.data.Dataset.from_tensor_slices((x, y)).batch(EVAL_BATCH_SIZE),
        "val": tf.data.Dataset.from_tensor_slices((xv, yv)).batch(EVAL_BATCH_SIZE),
    }


def augment(image, label):
    """A random shift by up to one pixel, then Gaussian noise; runs per example in tf.data."""
    padded = tf.image.resize_with_crop_or_pad(image, 10, 10)
    image = tf.image.random_crop(padded, size=(8, 8, 1))
    image = image + tf.random.normal(tf.shape(image), stddev=0.1)
    return tf.clip_by_value(image, 0.0, 1.0), label


def training_dataset(batch_size: int, seed: int) -> tf.data.Dataset:
    """What ``fit`` trains on: shuffled and augmented anew every epoch."""
    (x, y), _ = digits_images()
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        .map(augment, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )


def build_model(dropout: float = 0.3) -> keras.Model:
    """A small convolutional network. No weight penalty, so ``val_loss`` is pure data loss."""
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dropout(dropout),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dropout(dropout),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--out", type=Path, default=Path("runs/tfdata"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seeds weights, shuffle, noise")
    args = parser.parse_args(argv)

    run_dir = args.out / "run"
    keras.utils.set_random_seed(args.seed)
    model = build_model()
    # Validation during fit uses the same clean datasets the replay will use. The callback
    # records only the factory's name (a pipeline cannot be snapshotted); overwrite=True
    # because rerunning the example replaces its previous run.
    val = load_data()["val"]
    reported = model.fit(
        training_dataset(args.batch_size, args.seed),
        validation_data=val,
        epochs=args.epochs,
        shuffle=False,  # the pipeline shuffles itself; Keras cannot shuffle a tf.data.Dataset
        verbose=0,
        callbacks=[ReplayCheckpoint(run_dir, data=DATA_REFERENCE, overwrite=True)],
    )

    # No data argument: replay reads DATA_REFERENCE from run_dir/manifest.json, imports
    # tfdata_augmentation and calls load_data(). Passing data=DATA_REFERENCE (or
    # train=..., val=... datasets) would override it.
    history = replay(run_dir)
    plot_history(history, path=args.out / "curves.png")

    h = history.history
    print(f"data factory: {DATA_REFERENCE}")
    print("epoch  reported_loss  true_loss  reported_val_loss  true_val_loss")
    for epoch in history.epoch:
        print(
            f"{epoch + 1:5d}  {h['reported_loss'][epoch]:13.6f}  {h['loss'][epoch]:9.6f}  "
            f"{h['reported_val_loss'][epoch]:17.6f}  {h['val_loss'][epoch]:13.6f}"
        )
    # Without a weight penalty, Keras' own val_loss is already an inference-mode data loss
    # at the end-of-epoch weights: it must agree with the replay's. The training loss does
    # not: fit measured augmented images in training mode.
    gap = abs(reported.history["val_loss"][-1] - h["val_loss"][-1])
    print(f"val_loss: Keras and the replay differ by {gap:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
