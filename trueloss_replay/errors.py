"""The few exception types the library raises.

Each one also inherits the matching built-in, so ``except ValueError`` in user code keeps
working. Only ``cli.py`` turns them into Click exceptions, and it decides how from the
fields every error carries (``usage``, ``argument``, ``path``, ``checkpoint``, ``hint``),
never from the message text.

Messages are written for the Python API: an argument is named as the caller passes it,
``model=`` or ``epochs=``. ``command_line_text`` shows the same text with the command
line's flags (``--model``, ``--epochs``); that is the one place the two vocabularies meet.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any


class TruelossReplayError(Exception):
    """Base class of every error raised by trueloss-replay.

    Args:
        message: what was expected, what was found; names an API argument as ``name=``.
        path: the file or folder at fault, when there is one.
        checkpoint: the file name of the checkpoint at fault, when there is one.
        hint: what to do about it; appended to the message.
        usage: True when the caller's arguments are at fault (a command line exits 2),
            False when a file, the data, the model or the machine is (exit 1). Default: the
            class's ``usage``.
        argument: the API argument at fault (``"epochs"``, ``"devices"``), when one is.

    Attributes:
        path, checkpoint, hint, usage, argument: as given.

    Example:
        >>> error = DataError("'x' is not an epoch (epochs='x').", usage=True, argument="epochs")
        >>> error.usage, error.argument
        (True, 'epochs')
    """

    #: whether errors of this class are the caller's doing unless a raiser says otherwise.
    usage = False

    def __init__(
        self,
        message: str = "",
        *,
        path: Any = None,
        checkpoint: str | None = None,
        hint: str | None = None,
        usage: bool | None = None,
        argument: str | None = None,
    ):
        super().__init__(f"{message} {hint}" if hint else message)
        self.path = path
        self.checkpoint = checkpoint
        self.hint = hint
        self.argument = argument
        if usage is not None:
            self.usage = usage


def command_line_text(text: str, flags: Mapping[str, str]) -> str:
    """``text`` with each API argument it names (``model=``) shown as its flag (``--model``).

    Only the names in ``flags`` are translated, and only where the text names an argument:
    ``name=`` after a space or at the start, not ``train_data=`` nor ``ReplayCheckpoint(data=``.
    A value written right after the ``=`` stays, after a space: ``epochs='1-x'`` reads
    ``--epochs '1-x'``.

    Args:
        text: a library message.
        flags: ``{API argument: flag}``, e.g. ``{"model": "--model"}``.

    Returns:
        The message for a command-line user, on one line.

    Example:
        >>> command_line_text("pass model='module:function'.", {"model": "--model"})
        "pass --model 'module:function'."
    """
    if not flags:
        return " ".join(text.split())
    names = "|".join(re.escape(name) for name in sorted(flags, key=len, reverse=True))

    def flag(match: re.Match) -> str:
        if match.group(2):  # trust_data_factory=True: the flag alone says it
            return flags[match.group(1)]
        following = text[match.end() : match.end() + 1]
        value_follows = following and following not in " \t\n),.;:"
        return flags[match.group(1)] + (" " if value_follows else "")

    # Not an argument of a call written out (ReplayCheckpoint(data=...)) nor part of a name.
    translated = re.sub(rf"(?<![\w.\-/])(?<!\w\()({names})=(True\b)?", flag, text)
    return " ".join(translated.split())


class RunFormatError(TruelossReplayError, ValueError):
    """A run folder, manifest or checkpoint is missing, unreadable or of an unknown format."""


class CheckpointMismatchError(RunFormatError):
    """A checkpoint's variables do not match the model it is loaded into."""


class AdoptError(TruelossReplayError, ValueError):
    """A folder of Keras checkpoints cannot be adopted as it is: no checkpoint, a name without
    an epoch, two files of one epoch, missing epochs, or a log whose epochs do not match."""


class RunExistsError(TruelossReplayError, FileExistsError):
    """The run folder already holds a different run."""


class RunLockedError(TruelossReplayError, RuntimeError):
    """Another writer (a process, or another ``ReplayCheckpoint``) is writing the run folder.

    Attributes:
        run_dir: the run folder.
    """

    def __init__(self, message: str, run_dir=None, **fields):
        super().__init__(message, path=run_dir, **fields)
        self.run_dir = run_dir


class RunWriteError(TruelossReplayError, OSError):
    """A file of the run folder could not be written.

    Attributes:
        reason: the system's word for the failure (``No space left on device``), when known.
    """

    reason: str | None = None


class DataError(TruelossReplayError, ValueError):
    """A data source is missing, malformed, or does not fit the model."""


class ShardError(TruelossReplayError, ValueError):
    """A shard (``shard="i/n"`` or ``"auto"``) is malformed, out of range, or cannot be read
    from the job array's environment variables. A usage error: the caller's to fix."""

    usage = True


class ModelLoadError(TruelossReplayError, ValueError):
    """The model could not be rebuilt from the run folder."""


class EvaluationError(TruelossReplayError, RuntimeError):
    """Evaluating a checkpoint failed (out of memory, a numeric error in the model).

    Attributes:
        out_of_memory: the device ran out of memory; a smaller batch may fit.
        split: the split being evaluated (``train`` or ``val``), when known.
    """

    def __init__(
        self, message: str, out_of_memory: bool = False, split: str | None = None, **fields
    ):
        super().__init__(message, **fields)
        self.out_of_memory = out_of_memory
        self.split = split


def size_text(size: float) -> str:
    """A byte count as people read it: ``512 B``, ``1.2 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _incomplete(
    run_path, failures: Mapping[str, Any], verb: str, done: int, unwritten=None, export=None
) -> str:
    unwritten = dict(unwritten or {})
    written_names = {getattr(path, "name", str(path)) for path in unwritten}
    # A checkpoint whose result could not be written is listed once, with the result file.
    failed = {
        n: r for n, r in failures.items() if n.rsplit(".", 1)[0] + ".json" not in written_names
    }
    parts = []
    if failed:
        names = ", ".join(f"{n} ({_one_line(r)})" for n, r in failed.items())
        parts.append(f"{len(failed)} checkpoint(s) of {run_path} could not be {verb}: {names}")
    if unwritten:
        names = ", ".join(f"{p} ({_one_line(r)})" for p, r in unwritten.items())
        parts.append(f"could not write {len(unwritten)} result file(s): {names}")
    if not failed and unwritten:
        parts[0] = f"{run_path}: {parts[0]}"
    stored = " and stored" if unwritten else ""
    text = "; ".join(parts) + f". The other {done} checkpoint(s) were {verb}{stored}."
    if export is not None:
        text += f" Writing the History files failed too: {_one_line(export)}"
    return text


class ReplayIncompleteError(TruelossReplayError, RuntimeError):
    """Some checkpoints could not be evaluated, or their results not written; all the others
    were.

    The message lists every failed checkpoint, then every result file that could not be
    written, then (last) an error writing ``history.csv`` / ``history.json``.

    Attributes:
        failures: ``{checkpoint name: reason}``, every checkpoint without a stored result
            (those whose result could not be written included).
        unwritten: ``{result file path: reason}``, the results computed but not written.
        export_error: the error writing the History files, or None.
        history: the true-loss History of what was evaluated.
    """

    def __init__(
        self, run_path, failures: dict, history, done: int, unwritten=None, export_error=None
    ):
        super().__init__(
            _incomplete(run_path, failures, "evaluated", done, unwritten, export_error),
            path=run_path,
        )
        self.failures = failures
        self.unwritten = dict(unwritten or {})
        self.export_error = export_error
        self.history = history


class ExplainIncompleteError(TruelossReplayError, RuntimeError):
    """Some checkpoints could not be explained; all the others were.

    Attributes:
        failures: ``{checkpoint name: reason}``.
        frame: the table of the checkpoints that were explained.
    """

    def __init__(self, run_path, failures: dict, frame):
        super().__init__(_incomplete(run_path, failures, "explained", len(frame)), path=run_path)
        self.failures = failures
        self.frame = frame


class PlotError(TruelossReplayError, ValueError):
    """A quantity asked for is not in the History, or a figure format is not supported."""


class BackendError(TruelossReplayError, RuntimeError):
    """Keras runs on a backend trueloss-replay does not support (it supports TensorFlow, JAX)."""


class MissingDependencyError(TruelossReplayError, ImportError):
    """An optional package a feature needs is not installed; the message names the extra."""


class StorageError(TruelossReplayError, OSError):
    """A run folder or results folder in object storage (``s3://``, ``gs://``) cannot be read
    or written: credentials refused, bucket missing, endpoint unreachable. The message names
    the URL."""
