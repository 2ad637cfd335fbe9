"""The true curves as TensorBoard scalars, on the same cards as the ones Keras wrote.

Keras' ``keras.callbacks.TensorBoard`` writes two runs, ``LOGDIR/train`` and
``LOGDIR/validation``, with tags ``epoch_loss``, ``epoch_accuracy``, ``epoch_learning_rate``
... at step = the epoch index (0 for the first epoch). TensorBoard draws one card per tag and
one line per run, so writing the true figures as two more runs, ``train_true`` and
``validation_true``, with the same tags and steps puts each true curve beside the reported one.
The penalty has a tag of its own (``epoch_regularization_loss``), as do the ``explain`` parts.

The reported curves: a run trained with Keras' TensorBoard callback already has them in
``train``/``validation``, and writing them again would draw every point twice. So they are
written there only when those folders hold no event file of another writer, and a file of
ours found beside another writer's is removed.

Event files are written with the ``tensorboard`` package's protobufs and record writer, which
need neither TensorFlow nor a running TensorBoard (replay on JAX exports too). Each export
writes a whole new file per run folder, under a name that sorts after the previous one, and
then removes the previous one, so a rerun never leaves a step twice on disk. The new file
starts with a ``SessionLog.START`` event at step 0, TensorBoard's own "the run restarted"
mark: a TensorBoard already showing the old points drops them when it reads the new file,
instead of drawing both.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trueloss_replay import run as runfmt
from trueloss_replay.errors import MissingDependencyError, RunWriteError
from trueloss_replay.history import REPORTED_PREFIX, as_history, load_history
from trueloss_replay.run import atomic_path

TRAIN = "train"
VALIDATION = "validation"
TRAIN_TRUE = "train_true"
VALIDATION_TRUE = "validation_true"

_OURS = ".trueloss-replay"
# events.out.tfevents.<seconds>.<nanoseconds>.trueloss-replay: sorts in writing order.
_OUR_NAME = re.compile(r"^events\.out\.tfevents\.(\d{10})\.(\d{9})" + re.escape(_OURS) + "$")


@dataclass(frozen=True)
class TensorBoardExport:
    """What ``export_tensorboard`` wrote.

    Attributes:
        logdir: the TensorBoard log folder.
        files: the event files written, one per run folder with figures.
        left_to_keras: run folders (``train``, ``validation``) where another writer, Keras'
            TensorBoard callback, already holds the reported curves; nothing was written there.
    """

    logdir: Path
    files: tuple[Path, ...]
    left_to_keras: tuple[str, ...]


def scalar_tag(key: str) -> tuple[str, str]:
    """The TensorBoard run folder and tag of a History key, in Keras' own layout.

    Example:
        >>> scalar_tag("val_accuracy"), scalar_tag("reported_loss")
        (('validation_true', 'epoch_accuracy'), ('train', 'epoch_loss'))
    """
    reported = key.startswith(REPORTED_PREFIX)
    if reported:
        key = key[len(REPORTED_PREFIX) :]
    validation = key.startswith("val_")
    if validation:
        key = key[len("val_") :]
    run = (VALIDATION if validation else TRAIN) + ("" if reported else "_true")
    return run, f"epoch_{key}"


def export_tensorboard(
    history_or_run_dir: Any,
    logdir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    reported: bool = True,
) -> TensorBoardExport:
    """Writes a true-loss History as TensorBoard scalars in Keras' own layout.

    True figures go to ``logdir/train_true`` and ``logdir/validation_true`` with Keras' tags
    (``epoch_loss``, ``epoch_accuracy``, ``epoch_regularization_loss`` ...) at Keras' steps
    (the epoch index, 0 for the first epoch), so TensorBoard draws them on the cards of the
    run's own ``keras.callbacks.TensorBoard`` logs. What Keras reported goes to ``logdir/train``
    and ``logdir/validation`` only where no other writer's events are (see ``reported``).
    NaN and infinite values (epochs not replayed yet) are not written. Exporting again
    replaces this function's earlier files instead of adding points.

    Args:
        history_or_run_dir: a ``keras.callbacks.History`` or a run folder.
        logdir: the TensorBoard log folder, usually the ``log_dir`` given to Keras'
            TensorBoard callback (created if needed).
        output: the results folder, when a run folder's replay was given one.
        reported: also write the reported curves, into ``train``/``validation`` folders that
            hold no event file of another writer. A run trained with Keras' TensorBoard
            callback into ``logdir`` already has them there and is left alone. False writes
            only the true curves (and removes reported curves an earlier export wrote).

    Returns:
        TensorBoardExport: the files written and the folders left to Keras' own events.

    Raises:
        RunFormatError: a run folder that cannot be read, or nothing replayed yet.
        RunWriteError: ``logdir`` cannot be written.
        MissingDependencyError: the ``tensorboard`` package is not installed.

    Example:
        >>> model.fit(..., callbacks=[keras.callbacks.TensorBoard("logs/exp1"),
        ...                           ReplayCheckpoint("runs/exp1")])
        >>> replay("runs/exp1")
        >>> export_tensorboard("runs/exp1", "logs/exp1")  # then: tensorboard --logdir logs
    """
    if isinstance(history_or_run_dir, (str, os.PathLike)):
        history = load_history(history_or_run_dir, output)
    else:
        history = as_history(history_or_run_dir)
    protos = _protos()
    # A URL logdir is a mirror: each event file is uploaded as it is written.
    logdir = runfmt.local_path(logdir, "TensorBoard log folder")
    if logdir.exists() and not logdir.is_dir():
        raise RunWriteError(f"the TensorBoard log folder {logdir} is a file; give logdir a folder.")

    runs = _scalars_by_run(history)
    files: list[Path] = []
    left_to_keras: list[str] = []
    for run in (TRAIN_TRUE, VALIDATION_TRUE, TRAIN, VALIDATION):
        folder = logdir / run
        scalars = runs.get(run, {})
        if run in (TRAIN, VALIDATION):
            if _foreign_events(folder):
                left_to_keras.append(run)
                scalars = {}  # Keras' own file has them: never a second copy
            elif not reported:
                scalars = {}
        path = _replace_events(folder, scalars, protos)
        if path is not None:
            files.append(path)
    return TensorBoardExport(logdir, tuple(files), tuple(left_to_keras))


def _scalars_by_run(history) -> dict[str, dict[int, dict[str, float]]]:
    """``{run folder: {step: {tag: value}}}`` of the finite values of a History."""
    epochs = getattr(history, "epoch", None)
    runs: dict[str, dict[int, dict[str, float]]] = {}
    for key, values in history.history.items():
        values = list(values)
        steps = epochs if epochs is not None and len(epochs) == len(values) else None
        run, tag = scalar_tag(key)
        for index, value in enumerate(values):
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue  # not a figure (a string logged by a callback)
            if not math.isfinite(value):
                continue
            step = int(steps[index]) if steps is not None else index
            runs.setdefault(run, {}).setdefault(step, {})[tag] = value
    return runs


def _protos():
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.plugins.scalar.summary_v2 import scalar_pb
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError as e:
        raise MissingDependencyError(
            "writing TensorBoard event files needs the tensorboard package, which is not "
            "installed: pip install 'trueloss-replay[tensorboard]' (or pip install tensorboard)."
        ) from e
    return event_pb2, summary_pb2, scalar_pb, RecordWriter


def _event_files(folder: Path) -> list[Path]:
    # TensorBoard reads every file whose name contains "tfevents".
    try:
        return sorted(p for p in folder.iterdir() if "tfevents" in p.name and p.is_file())
    except FileNotFoundError:
        return []
    except OSError as e:
        raise RunWriteError(f"cannot list the TensorBoard folder {folder}: {e}") from e


def _ours(folder: Path) -> list[Path]:
    return [p for p in _event_files(folder) if _OUR_NAME.match(p.name)]


def _foreign_events(folder: Path) -> bool:
    return any(not _OUR_NAME.match(p.name) for p in _event_files(folder))


def _new_name(previous: Iterable[Path]) -> str:
    """A name that sorts after every earlier file of ours: TensorBoard reads files in order."""
    now = time.time_ns()
    for path in previous:
        match = _OUR_NAME.match(path.name)
        now = max(now, int(match.group(1)) * 10**9 + int(match.group(2)) + 1)
    return f"events.out.tfevents.{now // 10**9:010d}.{now % 10**9:09d}{_OURS}"


def _replace_events(folder: Path, scalars: dict[int, dict[str, float]], protos) -> Path | None:
    """Writes ``scalars`` as one new event file of ours in ``folder``; removes our older ones."""
    event_pb2, summary_pb2, scalar_pb, record_writer = protos
    previous = _ours(folder)
    path = None
    if scalars:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunWriteError(
                f"cannot create the TensorBoard folder {folder}: {e.strerror or e}. Check that "
                "logdir is a writable folder."
            ) from e
        path = folder / _new_name(previous)
        wall_time = time.time()
        events = [
            event_pb2.Event(wall_time=wall_time, file_version="brain.Event:2"),
            event_pb2.Event(
                wall_time=wall_time,
                step=0,  # TensorBoard drops the points it holds from step 0 on
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
            ),
        ]
        for step in sorted(scalars):
            summary = summary_pb2.Summary()
            for tag, value in sorted(scalars[step].items()):
                summary.value.extend(scalar_pb(tag, value).value)
            events.append(event_pb2.Event(wall_time=wall_time, step=step, summary=summary))
        # The temporary name holds no "tfevents": TensorBoard must not read a half file.
        temporary = folder / f".trueloss-replay-{secrets.token_hex(4)}.tmp"
        with atomic_path(path, temporary=temporary) as tmp:
            with open(tmp, "wb") as f:
                writer = record_writer(f)
                for event in events:
                    writer.write(event.SerializeToString())
    for old in previous:
        try:
            # In a mirrored (object storage) logdir, the bucket's copy goes too.
            runfmt.remove_path(old)
        except FileNotFoundError:
            pass
        except OSError as e:  # StorageError is one
            raise RunWriteError(
                f"cannot remove the earlier export {old}: {e.strerror or e}. Remove it by hand, "
                "or TensorBoard shows its points twice."
            ) from e
    return path
