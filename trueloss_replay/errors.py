"""The few exception types the library raises.

Each one also inherits the matching built-in, so ``except ValueError`` in user code keeps
working. Only ``cli.py`` turns them into Click exceptions.
"""


class TruelossReplayError(Exception):
    """Base class of every error raised by trueloss-replay."""


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

    def __init__(self, message: str, run_dir=None):
        super().__init__(message)
        self.run_dir = run_dir


class RunWriteError(TruelossReplayError, OSError):
    """A file of the run folder could not be written."""


class DataError(TruelossReplayError, ValueError):
    """A data source is missing, malformed, or does not fit the model."""


class ModelLoadError(TruelossReplayError, ValueError):
    """The model could not be rebuilt from the run folder."""


class EvaluationError(TruelossReplayError, RuntimeError):
    """Evaluating a checkpoint failed (out of memory, a numeric error in the model).

    Attributes:
        out_of_memory: the device ran out of memory; a smaller batch may fit.
        split: the split being evaluated (``train`` or ``val``), when known.
    """

    def __init__(self, message: str, out_of_memory: bool = False, split: str | None = None):
        super().__init__(message)
        self.out_of_memory = out_of_memory
        self.split = split


def _incomplete(run_path, failures: dict, verb: str, done: int) -> str:
    names = ", ".join(f"{n} ({' '.join(str(r).split())})" for n, r in failures.items())
    return (
        f"{len(failures)} checkpoint(s) of {run_path} could not be {verb}: {names}. "
        f"The other {done} were."
    )


class ReplayIncompleteError(TruelossReplayError, RuntimeError):
    """Some checkpoints could not be evaluated; all the others were.

    Attributes:
        failures: ``{checkpoint name: reason}``.
        history: the true-loss History of what was evaluated.
    """

    def __init__(self, run_path, failures: dict, history, done: int):
        super().__init__(_incomplete(run_path, failures, "evaluated", done))
        self.failures = failures
        self.history = history


class ExplainIncompleteError(TruelossReplayError, RuntimeError):
    """Some checkpoints could not be explained; all the others were.

    Attributes:
        failures: ``{checkpoint name: reason}``.
        frame: the table of the checkpoints that were explained.
    """

    def __init__(self, run_path, failures: dict, frame):
        super().__init__(_incomplete(run_path, failures, "explained", len(frame)))
        self.failures = failures
        self.frame = frame


class PlotError(TruelossReplayError, ValueError):
    """A quantity asked for is not in the History, or a figure format is not supported."""


class BackendError(TruelossReplayError, RuntimeError):
    """Keras runs on a backend trueloss-replay does not support (it supports TensorFlow, JAX)."""


class MissingDependencyError(TruelossReplayError, ImportError):
    """An optional package a feature needs is not installed; the message names the extra."""
