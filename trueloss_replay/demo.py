"""The demo: a small regularized model on scikit-learn's bundled digits, trained and replayed.

scikit-learn ships the 8x8 digits data inside the package, so the demo needs no download.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class DemoResult:
    """What ``run_demo`` produced.

    Attributes:
        run_dir: the run folder.
        plot: the true-loss figure (PNG).
        csv: the true-loss History as CSV.
        history: the true-loss ``keras.callbacks.History``.
        reported: the History ``fit()`` returned.
    """

    run_dir: Path
    plot: Path
    csv: Path
    history: object
    reported: object

    def headline(self) -> str:
        """The reported vs true training loss at the last epoch, in one paragraph."""
        h = self.history.history
        last = len(h["loss"])
        return (
            f"At epoch {last} Keras reported a training loss of {h['reported_loss'][-1]:.3f} "
            f"and a validation loss of {h['reported_val_loss'][-1]:.3f}. The true training "
            f"loss (inference mode, no penalty) is {h['loss'][-1]:.3f}, the true validation "
            f"loss {h['val_loss'][-1]:.3f}; the L2 penalty adds "
            f"{h['regularization_loss'][-1]:.3f} to both reported figures."
        )


def digits_data(seed: int = 0):
    """scikit-learn's digits, scaled to [0, 1], split 80/20: ``((x, y), (xv, yv))``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        from trueloss_replay.errors import DataError

        raise DataError(
            "the demo needs scikit-learn for its bundled digits data: "
            "pip install 'trueloss-replay[demo]'."
        ) from e
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def build_demo_model(l2: float = 2e-3, dropout: float = 0.5, width: int = 128):
    """Dense + L2, BatchNormalization, Dropout, softmax: every cause of a misleading curve."""
    import keras

    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(
                width, activation="relu", kernel_regularizer=keras.regularizers.L2(l2)
            ),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(dropout),
            keras.layers.Dense(
                width, activation="relu", kernel_regularizer=keras.regularizers.L2(l2)
            ),
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


def run_demo(
    directory: str | os.PathLike = "demo-run",
    *,
    epochs: int = 20,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> DemoResult:
    """Trains the demo model with ``ReplayCheckpoint``, replays it, writes the plot and CSV.

    Args:
        directory: where the run folder, ``curves.png`` and ``history.csv`` go (replaced).
        epochs: training epochs.
        batch_size: training batch size.
        seed: seeds the data split, the weights and dropout.
        progress: passed on to ``replay``: its progress bars, or False for none.

    Returns:
        DemoResult: paths and both Histories.

    Example:
        >>> result = run_demo("demo-run", epochs=5)
        >>> print(result.headline())
    """
    import keras

    from trueloss_replay.callback import ReplayCheckpoint
    from trueloss_replay.history import write_csv
    from trueloss_replay.plot import plot_history
    from trueloss_replay.scheduler import replay

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    run_dir = directory / "run"
    train, val = digits_data(seed)
    keras.utils.set_random_seed(seed)
    model = build_demo_model()
    reported = model.fit(
        *train,
        validation_data=val,
        epochs=epochs,
        batch_size=batch_size,
        verbose=0,
        callbacks=[ReplayCheckpoint(run_dir, train_data=train, val_data=val, overwrite=True)],
    )
    history = replay(run_dir, progress=progress)
    plot = directory / "curves.png"
    plot_history(history, path=plot)
    csv = directory / "history.csv"
    write_csv(history, csv)
    return DemoResult(run_dir, plot, csv, history, reported)
