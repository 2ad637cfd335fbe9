"""trueloss-replay: the true training loss of a Keras run, replayed from per-epoch checkpoints."""

from trueloss_replay.callback import ReplayCheckpoint
from trueloss_replay.errors import (
    CheckpointMismatchError,
    DataError,
    ModelLoadError,
    RunExistsError,
    RunFormatError,
    RunWriteError,
    TruelossReplayError,
)
from trueloss_replay.history import load_frame, load_history
from trueloss_replay.plot import plot_history
from trueloss_replay.run import Run, load_weights

__all__ = [
    "CheckpointMismatchError",
    "DataError",
    "ModelLoadError",
    "ReplayCheckpoint",
    "Run",
    "RunExistsError",
    "RunFormatError",
    "RunWriteError",
    "TruelossReplayError",
    "load_frame",
    "load_history",
    "load_weights",
    "plot_history",
]
