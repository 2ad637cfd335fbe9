"""trueloss-replay: the true training loss of a Keras run, replayed from per-epoch checkpoints.

The public names are re-exported lazily: ``import trueloss_replay`` imports neither Keras nor
TensorFlow nor matplotlib (Keras itself imports matplotlib when it is installed), so the
command line starts fast and ``load_history`` stays free of TensorFlow work until it is used.
"""

import importlib
import importlib.metadata

try:
    __version__ = importlib.metadata.version("trueloss-replay")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "AdoptError": "trueloss_replay.errors",
    "CheckpointMismatchError": "trueloss_replay.errors",
    "DataError": "trueloss_replay.errors",
    "FollowResult": "trueloss_replay.following",
    "MissingDependencyError": "trueloss_replay.errors",
    "ModelLoadError": "trueloss_replay.errors",
    "ReplayCheckpoint": "trueloss_replay.callback",
    "ReplayIncompleteError": "trueloss_replay.errors",
    "Run": "trueloss_replay.run",
    "RunExistsError": "trueloss_replay.errors",
    "RunFormatError": "trueloss_replay.errors",
    "RunLockedError": "trueloss_replay.errors",
    "RunWriteError": "trueloss_replay.errors",
    "Shard": "trueloss_replay.scheduler",
    "ShardError": "trueloss_replay.errors",
    "StorageError": "trueloss_replay.errors",
    "TruelossReplayError": "trueloss_replay.errors",
    "adopt": "trueloss_replay.adoption",
    "explain": "trueloss_replay.explanation",
    "export_tensorboard": "trueloss_replay.tensorboard",
    "follow": "trueloss_replay.following",
    "load_frame": "trueloss_replay.history",
    "load_history": "trueloss_replay.history",
    "load_weights": "trueloss_replay.run",
    "parse_shard": "trueloss_replay.scheduler",
    "plot_history": "trueloss_replay.plot",
    "replay": "trueloss_replay.scheduler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trueloss_replay' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
