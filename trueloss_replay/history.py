"""Replay results → the true-loss ``keras.callbacks.History`` and a full-resolution DataFrame.

The replay engine writes one JSON file per evaluated checkpoint. This module only reads
those files, the checkpoints' attributes and the manifest: no TensorFlow work, so curves of a
run can be looked at on any machine while a replay is still going.

Two views of the same figures:

* the **frame** (``load_frame``): one row per checkpoint (initial weights and sub-epoch
  checkpoints included), ``epochs_completed`` as a float, a checkpoint not yet replayed as
  NaN. Exported as ``replay/history.csv``.
* the **History** (``load_history``): the frame's epoch-end rows, one per completed epoch,
  aligned with the History ``model.fit()`` returned (``history.epoch == [0, 1, ...]``), so
  plotting code written for Keras shows the true curves unchanged. Exported as
  ``replay/history.json``.

Missing figures are NaN, never 0: an epoch whose checkpoint is not replayed yet keeps its
place in the lists. In JSON, NaN is written as ``null`` and infinities as the strings
``"Infinity"`` / ``"-Infinity"``, so the files are strict JSON that any tool parses.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import filelock
import numpy as np
import pandas as pd

from trueloss_replay import run as runfmt
from trueloss_replay.errors import RunFormatError, RunWriteError
from trueloss_replay.run import results_folder

if TYPE_CHECKING:
    import keras

HISTORY_CSV = "history.csv"
HISTORY_JSON = "history.json"
#: Taken while the results present are read and the exports written (``exports_lock``).
EXPORTS_LOCK = ".exports.lock"

#: The frame's leading columns; every other column is a figure named like a History key.
FRAME_COLUMNS = ("checkpoint", "epochs_completed", "step")
REGULARIZATION_KEYS = ("regularization_loss", "val_regularization_loss")
REPORTED_PREFIX = "reported_"
#: ``result["explain"]`` parts (``explanation.py``) and their History keys.
GAP_KEYS = {
    "penalty": "gap_penalty",
    "training_mode": "gap_training_mode",
    "training_mode_se": "gap_training_mode_se",
    "drift": "gap_drift",
}
GAP_PREFIX = "gap_"


# --------------------------------------------------------------------------- folders


def replay_folder(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Where a run's History files and figures go: ``output``, or ``RUN_DIR/replay``.

    With the default results folder (``RUN_DIR/replay/results``) the exports sit beside it
    in ``RUN_DIR/replay``; with a results folder of the user's choosing they go inside it
    (their names never look like a result file's, so readers ignore them).
    """
    default = Path(run_dir) / runfmt.REPLAY_DIR
    if output is None or Path(output).resolve() == (Path(run_dir) / runfmt.RESULTS_DIR).resolve():
        return default
    return Path(output)


# --------------------------------------------------------------------------- results


def load_results(
    run_dir: str | os.PathLike, output: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Reads the replay results of a run, in training order.

    Only files named after a checkpoint (``e0003.json``, ``e0001-s000450.json``) are read;
    the hidden temporary files of a write in progress and any other file are ignored.

    Args:
        run_dir: the run folder.
        output: the results folder given to ``replay(output=...)``; default
            ``RUN_DIR/replay/results``.

    Returns:
        One dict per result file, as the engine wrote it. Empty when nothing is replayed.

    Raises:
        RunFormatError: ``run_dir`` is not a run folder, or a result file is damaged (the
            message names it).

    Example:
        >>> [r["checkpoint"] for r in load_results("runs/exp1")]
        ['e0000.h5', 'e0001.h5', 'e0002.h5']
    """
    run_dir, output = runfmt.local_folders(run_dir, output)
    runfmt.read_manifest(Path(run_dir))
    return runfmt.list_results(results_folder(run_dir, output))


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def result_figures(result: Mapping[str, Any]) -> dict[str, float]:
    """A result's figures under their History names: ``loss``, ``val_loss``, ``reported_loss``,
    and the ``gap_*`` parts of ``explain`` when it has run."""
    figures = {}
    for prefix, part in (("", "train"), ("val_", "val"), (REPORTED_PREFIX, "reported")):
        for key, value in (result.get(part) or {}).items():
            figures[prefix + key] = runfmt.json_float(value)
    explained = result.get("explain")
    if isinstance(explained, Mapping):
        for part, key in GAP_KEYS.items():
            if part in explained:
                figures[key] = runfmt.json_float(explained[part])
    return figures


def _key_order(key: str) -> int:
    # History order: data loss, metrics, val, penalties and gap parts, then what Keras reported.
    if key.startswith(REPORTED_PREFIX):
        return 4
    if key in REGULARIZATION_KEYS or key.startswith(GAP_PREFIX):
        return 3
    if key == "loss":
        return 0
    return 2 if key.startswith("val_") else 1


def _ordered_keys(keys: Iterable[str]) -> list[str]:
    first_seen = list(dict.fromkeys(keys))
    # sorted() is stable: within a group, keys keep the order the results list them in.
    return sorted(first_seen, key=_key_order)


# --------------------------------------------------------------------------- frame


def build_frame(
    results: Sequence[Mapping[str, Any]],
    manifest: Mapping[str, Any],
    checkpoints: Iterable[runfmt.Checkpoint | Mapping[str, Any]] | None = None,
) -> pd.DataFrame:
    """The full-resolution table of a run, from results in memory.

    Args:
        results: result dicts as the engine writes them (any order, any subset).
        manifest: the run's manifest (for ``steps_per_epoch``, and its checkpoint list when
            ``checkpoints`` is None).
        checkpoints: the run's checkpoints (``Run.checkpoints()``, the source of truth), or
            None to take the manifest's list. A checkpoint without a result gets a row of
            NaN figures, except ``reported_*``, which come from its own logs.

    Returns:
        One row per checkpoint in training order: ``checkpoint``, ``epochs_completed``
        (float; a sub-epoch checkpoint's fraction counts its steps into the epoch), ``step``
        (int; float with NaN when a checkpoint is unreadable), then one float column per
        figure, named like the History keys.
    """
    rows: dict[str, dict[str, Any]] = {}
    source = (manifest.get("checkpoints") or []) if checkpoints is None else checkpoints
    for c in source:
        entry = c.manifest_entry() if isinstance(c, runfmt.Checkpoint) else dict(c)
        name = entry.get("name")
        if not isinstance(name, str) or runfmt.parse_checkpoint_name(name) is None:
            continue
        rows[name] = {
            "epoch": runfmt.parse_checkpoint_name(name)[0],
            "step": entry.get("step"),
            "figures": {REPORTED_PREFIX + k: runfmt.json_float(v) for k, v in _logs(entry).items()},
        }
    for result in results:
        name = result["checkpoint"]
        row = rows.setdefault(name, {"epoch": runfmt.parse_checkpoint_name(name)[0]})
        if row.get("step") is None:
            row["step"] = result.get("step")
        # The result's figures win: they hold the same reported logs plus the true figures.
        row["figures"] = {**row.get("figures", {}), **result_figures(result)}

    names = sorted(rows, key=runfmt.checkpoint_order)
    keys = _ordered_keys(k for name in names for k in rows[name].get("figures", {}))
    steps_per_epoch = manifest.get("steps_per_epoch") or (manifest.get("params") or {}).get("steps")
    end_steps = {
        rows[n]["epoch"]: rows[n]["step"]
        for n in names
        if runfmt.parse_checkpoint_name(n)[1] is None and rows[n].get("step") is not None
    }
    table: dict[str, list[Any]] = {
        "checkpoint": names,
        "epochs_completed": [
            _epochs_completed(n, rows[n], end_steps, steps_per_epoch) for n in names
        ],
        "step": _steps([rows[n].get("step") for n in names]),
    }
    for key in keys:
        table[key] = [rows[n].get("figures", {}).get(key, math.nan) for n in names]
    frame = pd.DataFrame(table)
    return frame.astype({key: "float64" for key in keys})


def _steps(steps: list[int | None]) -> np.ndarray:
    # int64 when every step is known; otherwise float64 with NaN, the one "missing" marker
    # of the frame (a nullable Int64 column would turn rows into pd.NA-holding objects).
    if all(s is not None for s in steps):
        return np.asarray(steps, dtype="int64")
    return np.asarray([math.nan if s is None else s for s in steps], dtype="float64")


def _logs(entry: Mapping[str, Any]) -> dict[str, Any]:
    logs = entry.get("logs")
    return logs if isinstance(logs, dict) else {}


def _epochs_completed(name, row, end_steps, steps_per_epoch) -> float:
    epoch, step = row["epoch"], row.get("step")
    if runfmt.parse_checkpoint_name(name)[1] is None:
        return float(epoch)
    if step is None:
        return math.nan
    per_epoch = steps_per_epoch
    if not per_epoch and epoch in end_steps and epoch + 1 in end_steps:
        per_epoch = end_steps[epoch + 1] - end_steps[epoch]
    if not per_epoch:
        return math.nan
    start = end_steps.get(epoch, epoch * per_epoch)
    return epoch + (step - start) / per_epoch


def load_frame(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> pd.DataFrame:
    """The full-resolution table of a run: one row per checkpoint, replayed or not.

    Args:
        run_dir: the run folder.
        output: the results folder, if the replay was given one.

    Returns:
        A DataFrame as ``build_frame`` describes: ``checkpoint``, ``epochs_completed``,
        ``step``, then ``loss``, ``val_loss``, metrics, ``regularization_loss``,
        ``reported_*``. Figures of a checkpoint not replayed yet are NaN.

    Raises:
        RunFormatError: not a run folder, or a damaged result file.

    Example:
        >>> frame = load_frame("runs/exp1")
        >>> frame[["epochs_completed", "loss", "reported_loss"]]
    """
    run_dir, output = runfmt.local_folders(run_dir, output)
    run = runfmt.Run(run_dir)
    return build_frame(load_results(run_dir, output), run.manifest, run.checkpoints())


# --------------------------------------------------------------------------- History


def _new_history(
    history: Mapping[str, list[float]], epoch: list[int], params: Mapping[str, Any] | None
) -> keras.callbacks.History:
    import keras  # here, not at the top: reading results needs no Keras (or matplotlib) import

    result = keras.callbacks.History()
    result.history = {k: list(v) for k, v in history.items()}
    result.epoch = list(epoch)
    result.params = dict(params) if params is not None else {}
    return result


def history_from_frame(
    frame: pd.DataFrame, params: Mapping[str, Any] | None = None
) -> keras.callbacks.History:
    """The History of a frame's epoch-end rows, one entry per completed epoch.

    Epochs are 1 to the last completed one; an epoch without a checkpoint row (its file
    could not be written) gets NaN, so the lists stay aligned with the training History.
    Keys that have no value in any epoch row are left out.

    Args:
        frame: a table from ``build_frame`` / ``load_frame``.
        params: ``History.params`` (the manifest's ``params``).
    """
    by_epoch = {}
    for index, name in enumerate(frame["checkpoint"]):
        epoch, step = runfmt.parse_checkpoint_name(name) or (0, 0)
        if step is None and epoch >= 1:
            by_epoch[epoch] = index
    last = max(by_epoch, default=0)
    keys = [c for c in frame.columns if c not in FRAME_COLUMNS]
    history = {}
    for key in keys:
        column = frame[key].to_numpy(dtype="float64")
        values = [
            float(column[by_epoch[e]]) if e in by_epoch else math.nan for e in range(1, last + 1)
        ]
        if any(not math.isnan(v) for v in values):
            history[key] = values
    return _new_history(history, list(range(last)), params)


def build_history(
    results: Sequence[Mapping[str, Any]],
    manifest: Mapping[str, Any],
    checkpoints: Iterable[runfmt.Checkpoint | Mapping[str, Any]] | None = None,
) -> keras.callbacks.History:
    """The true-loss History from result dicts in memory (what ``replay()`` returns).

    Args:
        results: result dicts as the engine writes them (any order, any subset).
        manifest: the run's manifest; gives ``History.params`` and, unless ``checkpoints``
            is given, the list of checkpoints (whose reported logs fill epochs not replayed).
        checkpoints: the run's checkpoints, when the caller has listed them.

    Returns:
        keras.callbacks.History with the keys of DESIGN.md (``loss``, ``val_loss``,
        metrics, ``regularization_loss``, ``reported_*``), one entry per completed epoch.

    Example:
        >>> history = build_history(results, run.manifest)
        >>> history.history["loss"], history.epoch
    """
    frame = build_frame(results, manifest, checkpoints)
    return history_from_frame(frame, manifest.get("params"))


def load_history(
    run_dir: str | os.PathLike, output: str | os.PathLike | None = None
) -> keras.callbacks.History:
    """The true-loss History of a run, from its stored results (no TensorFlow work).

    Args:
        run_dir: the run folder.
        output: the results folder, if the replay was given one.

    Returns:
        keras.callbacks.History: ``history`` (one entry per completed epoch, NaN where a
        checkpoint is not replayed yet), ``epoch == [0, 1, ...]`` and ``params`` (the
        training History's).

    Raises:
        RunFormatError: not a run folder, a damaged result file, or nothing replayed yet.

    Example:
        >>> history = load_history("runs/exp1")
        >>> plt.plot(history.epoch, history.history["loss"])
    """
    run_dir, output = runfmt.local_folders(run_dir, output)
    run = runfmt.Run(run_dir)
    results = load_results(run_dir, output)
    if not results:
        raise RunFormatError(
            f"{results_folder(run_dir, output)} holds no replay results. Replay the run "
            "first: replay(run_dir), or the replay command."
        )
    frame = build_frame(results, run.manifest, run.checkpoints())
    return history_from_frame(frame, run.manifest.get("params"))


def as_history(value: Any) -> keras.callbacks.History:
    """A History from a History, a ``{key: list}`` dict, a frame, or a run folder path."""
    if isinstance(getattr(value, "history", None), Mapping):  # a History, Keras 3 or tf.keras
        return value
    if isinstance(value, pd.DataFrame):
        return history_from_frame(value)
    if isinstance(value, Mapping):
        lengths = {len(v) for v in value.values()}
        return _new_history(dict(value), list(range(max(lengths, default=0))), None)
    if isinstance(value, (str, os.PathLike)):
        return load_history(value)
    raise TypeError(
        "expected a keras.callbacks.History, a dict of lists, a DataFrame or a run folder; "
        f"received {type(value).__name__}."
    )


def _epochs(history: keras.callbacks.History) -> list[int]:
    epoch = getattr(history, "epoch", None)
    length = max((len(v) for v in history.history.values()), default=0)
    if epoch is not None and len(epoch) == length:
        return [int(e) for e in epoch]
    return list(range(length))


# --------------------------------------------------------------------------- CSV and JSON


def _csv_cell(value: Any) -> str:
    return repr(float(value)) if value is not None else "nan"


def format_csv(history_or_frame: keras.callbacks.History | pd.DataFrame) -> str:
    """The CSV text ``write_csv`` writes."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if isinstance(history_or_frame, pd.DataFrame):
        frame = history_or_frame
        keys = sorted(c for c in frame.columns if c not in FRAME_COLUMNS)
        writer.writerow(["epoch", *FRAME_COLUMNS, *keys])
        for _, row in frame.iterrows():
            epoch, sub_step = runfmt.parse_checkpoint_name(row["checkpoint"]) or (0, 0)
            keras_epoch = epoch - 1 if sub_step is None and epoch >= 1 else ""
            step = "" if pd.isna(row["step"]) else int(row["step"])
            writer.writerow(
                [keras_epoch, row["checkpoint"], _csv_cell(row["epochs_completed"]), step]
                + [_csv_cell(row[k]) for k in keys]
            )
    else:
        history = as_history(history_or_frame)
        keys = sorted(k for k in history.history if k != "epoch")
        writer.writerow(["epoch", *keys])
        for index, epoch in enumerate(_epochs(history)):
            values = [
                history.history[k][index] if index < len(history.history[k]) else None for k in keys
            ]
            writer.writerow([epoch, *(_csv_cell(v) for v in values)])
    return out.getvalue()


def write_csv(
    history_or_frame: keras.callbacks.History | pd.DataFrame, path: str | os.PathLike
) -> Path:
    """Writes a History or a frame as CSV, atomically, the way Keras' ``CSVLogger`` does.

    A History gives ``epoch`` (0-based, as Keras counts) then the keys in sorted order, one
    row per epoch. A frame gives ``epoch`` (empty for the initial weights and sub-epoch
    checkpoints), ``checkpoint``, ``epochs_completed``, ``step``, then the sorted keys, one
    row per checkpoint. NaN is written as ``nan``. ``read_csv`` reads either back.

    Args:
        history_or_frame: a ``keras.callbacks.History`` or a ``load_frame`` table.
        path: the CSV file to write.

    Returns:
        The path written.

    Raises:
        RunWriteError: the file could not be written.

    Example:
        >>> write_csv(load_history("runs/exp1"), "true_history.csv")
    """
    return _write_text(path, format_csv(history_or_frame))


def read_csv(path: str | os.PathLike) -> keras.callbacks.History:
    """Reads a History back from a CSV of ``write_csv`` or of Keras' ``CSVLogger``.

    Rows without an ``epoch`` (the initial weights and sub-epoch checkpoints of a frame CSV)
    are skipped. Empty cells and CSVLogger's ``NA`` read as NaN; a column that is ``NA``
    throughout (CSVLogger's ``val_*`` columns of a fit without validation) is dropped.
    ``params`` is empty: a CSV does not carry it.

    Raises:
        RunFormatError: the file is missing, has no ``epoch`` column, or a value that is not
            a number (the message names the line).

    Example:
        >>> history = read_csv("runs/exp1/replay/history.csv")
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RunFormatError(f"history CSV {path} cannot be read ({_one_line(e)}).") from e
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "epoch" not in reader.fieldnames:
        raise RunFormatError(
            f"{path} has no 'epoch' column; expected a CSV written by write_csv or by Keras' "
            "CSVLogger."
        )
    keys = [k for k in reader.fieldnames if k != "epoch" and k not in FRAME_COLUMNS]
    history: dict[str, list[float]] = {k: [] for k in keys}
    epochs, logged = [], set()
    for line, row in enumerate(reader, start=2):
        if not row.get("epoch"):
            continue
        try:
            epochs.append(int(row["epoch"]))
            for key in keys:
                cell = row.get(key)
                history[key].append(math.nan if cell in _MISSING else float(cell))
                if cell != "NA":
                    logged.add(key)
        except ValueError as e:
            raise RunFormatError(f"{path}, line {line}: {e}; expected numbers.") from e
    # CSVLogger adds val_<key> columns of "NA" even when fit() had no validation data.
    history = {k: v for k, v in history.items() if k in logged or not epochs}
    return _new_history(history, epochs, None)


_MISSING = (None, "", "NA")


def _json_value(value: Any) -> float | str | None:
    value = float(value) if value is not None else math.nan
    if math.isnan(value):
        return None
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def history_dict(history: keras.callbacks.History | Any) -> dict[str, Any]:
    """``{"history": ..., "epoch": ..., "params": ...}``, strict-JSON ready (NaN as null)."""
    history = as_history(history)
    return {
        "history": {k: [_json_value(v) for v in values] for k, values in history.history.items()},
        "epoch": _epochs(history),
        "params": runfmt.to_jsonable(history.params) if history.params else {},
    }


def format_json(history: keras.callbacks.History | Any) -> str:
    """The JSON text ``write_json`` writes."""
    return json.dumps(history_dict(history), indent=2, allow_nan=False) + "\n"


def write_json(history: keras.callbacks.History | Any, path: str | os.PathLike) -> Path:
    """Writes a History as ``{"history": ..., "epoch": ..., "params": ...}``, atomically.

    NaN becomes ``null`` and infinities ``"Infinity"`` / ``"-Infinity"``, so the file is
    strict JSON; ``read_json`` turns them back into floats.

    Args:
        history: a ``keras.callbacks.History`` (or anything ``as_history`` accepts).
        path: the JSON file to write.

    Returns:
        The path written.

    Raises:
        RunWriteError: the file could not be written.

    Example:
        >>> write_json(model.fit(...), "fit_history.json")
    """
    return _write_text(path, format_json(history))


def read_json(path: str | os.PathLike) -> keras.callbacks.History:
    """Reads a History back from a file of ``write_json``.

    Raises:
        RunFormatError: the file is missing, not JSON, or not shaped like ``write_json``'s.

    Example:
        >>> history = read_json("runs/exp1/replay/history.json")
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunFormatError(f"history JSON {path} cannot be read ({_one_line(e)}).") from e
    if not isinstance(data, dict) or not isinstance(data.get("history"), dict):
        raise RunFormatError(
            f"{path} has no 'history' object; expected a file written by write_json."
        )
    try:
        history = {
            k: [runfmt.json_float(v) for v in values] for k, values in data["history"].items()
        }
    except (TypeError, ValueError) as e:
        raise RunFormatError(f"{path} holds a value that is not a number ({e}).") from e
    length = max((len(v) for v in history.values()), default=0)
    epoch = data.get("epoch")
    epoch = [int(e) for e in epoch] if isinstance(epoch, list) else list(range(length))
    params = data.get("params") if isinstance(data.get("params"), dict) else {}
    return _new_history(history, epoch, params)


def _write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    # atomic_path turns any OSError into one RunWriteError naming the path: not wrapped twice.
    with runfmt.atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def export_history(
    run_dir: str | os.PathLike, output: str | os.PathLike | None = None
) -> keras.callbacks.History:
    """Writes ``history.csv`` (the full frame) and ``history.json`` (the History) of a run.

    They go to ``RUN_DIR/replay``, or into ``output`` when the results are there.

    Args:
        run_dir: the run folder.
        output: the results folder, if the replay was given one.

    Returns:
        The History written to ``history.json``.

    Raises:
        RunFormatError: not a run folder, or a damaged result file.
        RunWriteError: a file could not be written.

    Example:
        >>> export_history("runs/exp1")  # runs/exp1/replay/history.csv, history.json
    """
    run_dir, output = runfmt.local_folders(run_dir, output)
    run = runfmt.Run(run_dir)
    folder = replay_folder(run_dir, output)
    with exports_lock(folder):
        frame = build_frame(load_results(run_dir, output), run.manifest, run.checkpoints())
        history = history_from_frame(frame, run.manifest.get("params"))
        write_exports(frame, history, folder)
    return history


@contextlib.contextmanager
def exports_lock(folder: str | os.PathLike):
    """Holds the OS file lock ``FOLDER/.exports.lock`` while the exports are rebuilt.

    The shards of a replay (``replay(shard=...)``) write into one folder; each reads the
    results present and writes ``history.csv`` and ``history.json`` inside this lock, so the
    shard that takes it last writes exports holding every result, and no shard overwrites
    them with an older view. The OS drops the lock when its process dies (``kill -9``).

    Args:
        folder: the folder the exports go to (``replay_folder``); created if missing.

    Raises:
        RunWriteError: the folder or its lock file cannot be created.

    Example:
        >>> with exports_lock("runs/exp1/replay"):
        ...     write_exports(frame, history, "runs/exp1/replay")
    """
    folder = Path(folder)
    path = folder / EXPORTS_LOCK
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(path)
        lock.acquire()
    except OSError as e:
        raise RunWriteError(
            f"cannot take the lock {path} to write the exports: {e.strerror or e}. Check "
            "that the folder is writable.",
            path=path,
        ) from e
    try:
        yield
    finally:
        lock.release()


def write_exports(
    frame: pd.DataFrame, history: keras.callbacks.History, folder: str | os.PathLike
) -> None:
    """Writes ``history.csv`` (the full frame) and ``history.json`` (the History) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(frame, folder / HISTORY_CSV)
    write_json(history, folder / HISTORY_JSON)


# --------------------------------------------------------------------------- inspect


@dataclass
class CheckpointStatus:
    """One checkpoint of a run as ``describe_run`` sees it.

    Attributes:
        name: file name (``e0003.h5``).
        epoch: completed epochs.
        step: global optimizer step, None when unknown.
        size: file size in bytes, None when the file is gone (only its result is left).
        reported_loss: the training loss Keras logged, NaN when none.
        replayed: True when a result file exists for it.
        error: why the checkpoint is unusable, or None.
    """

    name: str
    epoch: int
    step: int | None
    size: int | None
    reported_loss: float
    replayed: bool
    error: str | None = None


@dataclass
class RunDescription:
    """What ``trueloss-replay inspect`` shows: the manifest and each checkpoint's state."""

    path: Path
    manifest: dict[str, Any]
    checkpoints: list[CheckpointStatus] = field(default_factory=list)
    verified: bool = False

    @property
    def problems(self) -> list[CheckpointStatus]:
        """The checkpoints that cannot be used."""
        return [c for c in self.checkpoints if c.error]


def describe_run(
    run_dir: str | os.PathLike, output: str | os.PathLike | None = None, verify: bool = False
) -> RunDescription:
    """A run's manifest and the state of each checkpoint (size, reported loss, replayed).

    Args:
        run_dir: the run folder.
        output: the results folder, if the replay was given one.
        verify: open every checkpoint, read all its weights, and check them against the
            manifest's variables by the rule replay loads them with (``run.check_signature``).

    Returns:
        A ``RunDescription``; ``problems`` lists the checkpoints that failed.

    Raises:
        RunFormatError: not a run folder.

    Example:
        >>> [c.name for c in describe_run("runs/exp1", verify=True).problems]
        []
    """
    run_dir, output = runfmt.local_folders(run_dir, output)
    run = runfmt.Run(run_dir)
    folder = results_folder(run_dir, output)
    statuses = []
    for c in run.checkpoints():
        error = c.error
        if verify and error is None:
            error = _verify(c.path, run.manifest.get("variables"))
        try:
            size = c.path.stat().st_size
        except OSError:
            size = None
        statuses.append(
            CheckpointStatus(
                name=c.name,
                epoch=c.epoch,
                step=c.step,
                size=size,
                reported_loss=runfmt.json_float(c.logs.get("loss")),
                replayed=runfmt.result_path(folder, c.name).is_file(),
                error=error,
            )
        )
    return RunDescription(run.path, run.manifest, statuses, verified=verify)


def _verify(path: Path, variables: Any) -> str | None:
    try:
        runfmt.read_checkpoint(path)
        # Names, shapes and dtypes are checked against the manifest's variables before any
        # data is read, by the rule replay loads by (run.check_signature): a model rebuilt on
        # resume names its variables sequential_1/dense_2/..., and the earlier checkpoints
        # are no less healthy.
        runfmt.read_weights(path, variables or None)
    except (RunFormatError, OSError) as e:
        return _one_line(e)
    return None


@dataclass
class ReplayCoverage:
    """Which checkpoints of a run have a result, as ``replay_coverage`` found them.

    Attributes:
        replayed: names of the checkpoints with a result file, in training order.
        missing: names of those without one (not replayed yet, another shard's share still
            running, or unreadable), in training order.
    """

    replayed: list[str]
    missing: list[str]

    @property
    def total(self) -> int:
        """Checkpoints in the run."""
        return len(self.replayed) + len(self.missing)


def replay_coverage(
    run_dir: str | os.PathLike, output: str | os.PathLike | None = None
) -> ReplayCoverage:
    """Which checkpoints of a run are replayed and which are still missing.

    What the shards of a replay have done between them: a checkpoint counts as replayed
    when its result file exists, whichever process wrote it.

    Args:
        run_dir: the run folder.
        output: the results folder, if the replay was given one.

    Returns:
        A ``ReplayCoverage``.

    Raises:
        RunFormatError: not a run folder.

    Example:
        >>> coverage = replay_coverage("runs/exp1")
        >>> f"{len(coverage.replayed)} of {coverage.total}", coverage.missing
        ('7 of 10', ['e0003.h5', 'e0007.h5', 'e0009.h5'])
    """
    run = runfmt.Run(run_dir)
    folder = results_folder(run_dir, output)
    replayed, missing = [], []
    for c in run.checkpoints():
        (replayed if runfmt.result_path(folder, c.name).is_file() else missing).append(c.name)
    return ReplayCoverage(replayed, missing)
