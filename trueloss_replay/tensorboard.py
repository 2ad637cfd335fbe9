"""The true curves as TensorBoard scalars, next to the ones Keras' TensorBoard callback wrote.

Scalars are written with ``tf.summary.write`` and the scalar plugin's metadata, which is
exactly what ``tf.summary.scalar`` does; ``tf.summary.scalar`` itself lives in the
``tensorboard`` package, which recent TensorFlow wheels no longer install. TensorBoard shows
these as ordinary scalars. TensorFlow is imported inside the function only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from trueloss_replay.errors import BackendError, RunWriteError
from trueloss_replay.history import REPORTED_PREFIX, as_history, load_history


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of a History key: ``true/loss``, ``reported/val_loss`` ...

    Example:
        >>> scalar_tag("val_accuracy"), scalar_tag("reported_loss")
        ('true/val_accuracy', 'reported/loss')
    """
    if key.startswith(REPORTED_PREFIX):
        return "reported/" + key[len(REPORTED_PREFIX) :]
    return "true/" + key


def export_tensorboard(
    history_or_run_dir: Any,
    logdir: str | os.PathLike,
    output: str | os.PathLike | None = None,
) -> Path:
    """Writes a true-loss History as TensorBoard scalars in ``logdir``.

    Each History key becomes a scalar: ``true/loss``, ``true/val_loss``, ``true/<metric>``,
    ``true/regularization_loss`` ..., and what Keras reported as ``reported/loss``,
    ``reported/val_loss`` .... The step is the Keras epoch index (``history.epoch``, 0 for
    the first epoch), as Keras' own TensorBoard callback counts, so both runs overlay.
    NaN and infinite values (epochs not replayed yet) are not written.

    Args:
        history_or_run_dir: a ``keras.callbacks.History`` or a run folder.
        logdir: the TensorBoard log folder (created if needed).
        output: the results folder, when a run folder's replay was given one.

    Returns:
        The event file written.

    Raises:
        RunFormatError: a run folder that cannot be read, or nothing replayed yet.
        RunWriteError: ``logdir`` cannot be written.

    Example:
        >>> export_tensorboard("runs/exp1", "logs/exp1-true")
    """
    if isinstance(history_or_run_dir, (str, os.PathLike)):
        history = load_history(history_or_run_dir, output)
    else:
        history = as_history(history_or_run_dir)
    logdir = Path(logdir)
    try:
        logdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunWriteError(f"cannot create the TensorBoard folder {logdir}: {e}") from e
    before = set(logdir.glob("events.out.tfevents.*"))

    try:
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2
    except ImportError as e:
        raise BackendError(
            "writing TensorBoard event files needs TensorFlow, which is not installed; "
            "pip install tensorflow (replay itself runs on JAX without it)."
        ) from e

    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
    )
    epochs = getattr(history, "epoch", None)
    writer = tf.summary.create_file_writer(str(logdir))
    try:
        with writer.as_default():
            for key, values in history.history.items():
                steps = epochs if epochs is not None and len(epochs) == len(values) else None
                for index, value in enumerate(values):
                    value = float(value)
                    if not math.isfinite(value):
                        continue
                    step = int(steps[index]) if steps is not None else index
                    tf.summary.write(
                        scalar_tag(key),
                        tf.constant(value, dtype=tf.float32),
                        step=step,
                        metadata=metadata,
                    )
        writer.flush()
    except (OSError, tf.errors.OpError) as e:
        raise RunWriteError(f"cannot write TensorBoard events to {logdir}: {e}") from e
    finally:
        writer.close()
    written = sorted(set(logdir.glob("events.out.tfevents.*")) - before)
    return written[-1] if written else logdir
