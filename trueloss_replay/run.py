"""The run folder: paths, manifest, atomic writes, checkpoint files, weight loading.

Format version 1, as ``shared/DESIGN.md`` specifies it. The checkpoint files in
``checkpoints/`` are the source of truth for which checkpoints exist; the manifest carries the
run's metadata and a copy of the checkpoint list for people and tools that read JSON only.
That way a training process killed between writing a checkpoint and rewriting the manifest
loses nothing: the checkpoint is listed all the same.

Every file is written to a hidden temporary name in its final folder, flushed, fsynced and
``os.replace``d into place, so a reader sees either the old file or the new one, never a
half-written one, even after ``kill -9``. Readers only list final names.
"""

from __future__ import annotations

import bisect
import contextlib
import difflib
import functools
import io
import itertools
import json
import math
import os
import re
import secrets
import shutil
import threading
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import h5py
import numpy as np

from trueloss_replay import storage
from trueloss_replay.errors import CheckpointMismatchError, RunFormatError, RunWriteError

RUN_FORMAT = "trueloss-replay/run"
CHECKPOINT_FORMAT = "trueloss-replay/checkpoint"
RESULT_FORMAT = "trueloss-replay/result"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
MODEL_FILE = "model.keras"
CHECKPOINT_DIR = "checkpoints"
DATA_DIR = "data"
REPLAY_DIR = "replay"
RESULTS_DIR = "replay/results"
# Held by the one writer of a run folder; readers never look at it.
WRITER_LOCK = ".writer.lock"

_CHECKPOINT_RE = re.compile(r"^e(\d{4,})(?:-s(\d{6,}))?\.h5$")


# --------------------------------------------------------------------------- atomic files


def fsync_dir(folder: Path) -> None:
    """Makes a rename in ``folder`` durable; silently not where a folder cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flushes a closed file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, temporary: str | os.PathLike | None = None
) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success, fsyncs it and renames it into place.

    The caller writes and closes the temporary file inside the block. On an exception the
    temporary file is removed and ``path`` is left as it was; an ``OSError`` comes out as a
    ``RunWriteError`` naming ``path``. ``temporary`` overrides the temporary name, for
    readers that pick files by a part of their name (TensorBoard reads any "tfevents" file).

    Example:
        >>> with atomic_path("run/manifest.json") as tmp:
        ...     tmp.write_text("{}")
    """
    path = Path(path)
    # A hidden name that keeps the suffix: Keras insists that a model file ends in .keras.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    if temporary is not None:
        tmp = Path(temporary)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and not isinstance(e, RunWriteError):
            raise write_error(path, e) from e
        raise
    fsync_dir(path.parent)
    # A file of a mirrored run folder goes to object storage whole, once it is complete here.
    storage.uploaded(path)


def write_error(path: str | os.PathLike, error: OSError) -> RunWriteError:
    """The ``RunWriteError`` for ``error`` while writing ``path``: names the file once.

    Its ``reason`` is the system's word for what happened (``No space left on device``).
    """
    reason = error.strerror or " ".join(str(error).split()) or type(error).__name__
    failure = RunWriteError(
        f"could not write {path}: {reason}.",
        path=Path(path),
        hint="Check that the folder is writable, that nothing else is in the way, and that "
        "the disk has space.",
    )
    failure.reason = reason
    return failure


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented, strict JSON to ``path`` atomically.

    NaN becomes ``null`` and infinities ``"Infinity"`` / ``"-Infinity"`` (``strict_json``),
    so that every tool parses the file (``jq`` rejects bare ``NaN`` tokens); ``json_float``
    reads such a figure back.

    Raises:
        RunWriteError: the file could not be written.
    """
    text = json.dumps(strict_json(obj), indent=2, sort_keys=False, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


def strict_json(value: Any) -> Any:
    """``value`` with numpy types as Python ones, NaN as None and infinities as strings.

    The same convention as ``history.json``: a strict JSON reader accepts the result, and
    ``json_float`` turns ``null`` back into NaN and ``"Infinity"`` into ``inf``.
    """
    if isinstance(value, Mapping):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return strict_json(value.tolist())
    if isinstance(value, np.generic):
        return strict_json(value.item())
    if isinstance(value, float):
        if value != value:
            return None
        if value in (float("inf"), float("-inf")):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if value is None or isinstance(value, (str, int)):
        return value
    return str(value)


def json_float(value: Any) -> float:
    """A figure read from a strict JSON file: ``null`` is NaN, ``"Infinity"`` is ``inf``.

    Anything that is not a number (a string other than those, a list, an object) is NaN.
    """
    if value is None or isinstance(value, bool):
        return float("nan") if value is None else float(value)
    if isinstance(value, (int, float, np.number)):
        return float(value)
    if isinstance(value, str) and value in ("Infinity", "-Infinity", "NaN"):
        return float(value.replace("Infinity", "inf"))
    return float("nan")


def to_jsonable(logs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Turns a Keras ``logs`` dict (numpy or tensor values) into plain floats."""
    out = {}
    for key, value in (logs or {}).items():
        try:
            out[str(key)] = float(np.asarray(value))
        except (TypeError, ValueError):
            out[str(key)] = str(value)
    return out


# --------------------------------------------------------------------------- names


def checkpoint_name(epoch: int, step: int | None = None) -> str:
    """The file name of a checkpoint: ``e0003.h5``, or ``e0003-s000450.h5`` within an epoch.

    Args:
        epoch: completed epochs when the weights were taken.
        step: the global optimizer step, for a checkpoint taken within an epoch.

    Returns:
        The file name, without folder.

    Example:
        >>> checkpoint_name(3), checkpoint_name(3, 450)
        ('e0003.h5', 'e0003-s000450.h5')
    """
    return f"e{epoch:04d}.h5" if step is None else f"e{epoch:04d}-s{step:06d}.h5"


def parse_checkpoint_name(name: str) -> tuple[int, int | None] | None:
    """``(epoch, step or None)`` for a checkpoint file name, or None for any other name."""
    match = _CHECKPOINT_RE.match(name)
    if match is None:
        return None
    return int(match.group(1)), None if match.group(2) is None else int(match.group(2))


def weight_keys(model) -> list[str]:
    """The name each of ``model.weights`` has in a checkpoint: its ``variable.path``.

    Keras 3 paths are unique in practice; should two variables share one, the later ones get
    ``__2``, ``__3`` ... so that no weight is silently dropped.
    """
    keys, seen = [], {}
    for variable in model.weights:
        path = variable.path
        seen[path] = seen.get(path, 0) + 1
        keys.append(path if seen[path] == 1 else f"{path}__{seen[path]}")
    return keys


def model_signature(model) -> list[list[Any]]:
    """``[[key, shape, dtype], ...]`` for the model's weights: what identifies "the same model"."""
    return [
        [key, [int(d) for d in v.shape], str(v.dtype)]
        for key, v in zip(weight_keys(model), model.weights, strict=True)
    ]


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint file of a run.

    Attributes:
        name: file name, e.g. ``e0003.h5``.
        path: full path.
        epoch: completed epochs when the weights were taken.
        step: global optimizer step (None when the file could not be read).
        time: Unix seconds when the weights were taken.
        logs: what Keras logged for that epoch (or batch, within an epoch).
        error: why the file cannot be used, or None when it is readable.
    """

    name: str
    path: Path
    epoch: int
    step: int | None = None
    time: float | None = None
    logs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def is_epoch_end(self) -> bool:
        """True for ``eNNNN.h5``, False for a checkpoint taken within an epoch."""
        return "-s" not in self.name

    def sort_key(self) -> tuple[int, int, int]:
        return checkpoint_order(self.name)

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "epoch": self.epoch,
            "step": self.step,
            "time": self.time,
            "logs": self.logs,
        }


class EpochSet:
    """A set of epochs held as inclusive ranges: ``5 in EpochSet([(1, 10**9)])`` costs nothing.

    What ``--epochs 1,3,5-9`` selects. A range as large as the user types is never expanded
    (``1-1000000000`` would be a billion ints).

    Args:
        ranges: ``(low, high)`` pairs, both included.

    Example:
        >>> epochs = EpochSet([(1, 1), (5, 9)])
        >>> 7 in epochs, 4 in epochs, epochs == {1, 5, 6, 7, 8, 9}
        (True, False, True)
    """

    def __init__(self, ranges: Iterable[tuple[int, int]]):
        merged: list[list[int]] = []
        for lo, hi in sorted((int(lo), int(hi)) for lo, hi in ranges):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.ranges: tuple[tuple[int, int], ...] = tuple((lo, hi) for lo, hi in merged)

    def __contains__(self, epoch: object) -> bool:
        if not isinstance(epoch, (int, np.integer)) or isinstance(epoch, bool):
            return False
        return any(lo <= epoch <= hi for lo, hi in self.ranges)

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __iter__(self) -> Iterator[int]:
        """Every epoch in order; lazily, but a huge range yields for as long as it is."""
        for lo, hi in self.ranges:
            yield from range(lo, hi + 1)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EpochSet):
            return self.ranges == other.ranges
        if isinstance(other, (set, frozenset)):
            # Compared without expanding self: count, then membership of every element.
            size = sum(hi - lo + 1 for lo, hi in self.ranges)
            return size == len(other) and all(e in self for e in other)
        return NotImplemented

    def __repr__(self) -> str:
        parts = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges]
        return f"EpochSet({','.join(parts)!r})"


def write_checkpoint(
    path: str | os.PathLike,
    weights: Sequence[tuple[str, np.ndarray]],
    *,
    epoch: int,
    step: int,
    time: float,
    logs: Mapping[str, Any] | None = None,
) -> None:
    """Writes one checkpoint file atomically.

    Args:
        path: the final path, e.g. ``RUN/checkpoints/e0003.h5``.
        weights: ``(key, array)`` pairs; each key becomes the dataset ``weights/<key>``.
        epoch: completed epochs.
        step: global optimizer step.
        time: Unix seconds when the weights were taken.
        logs: what Keras logged; stored as a JSON string.

    Raises:
        RunWriteError: the file could not be written (nothing partial is left behind).
    """
    file_create, group_create, file_access = _checkpoint_property_lists()
    # atomic_path turns an OSError (h5py's included) into a RunWriteError naming the path.
    with atomic_path(path) as tmp:
        fid = h5py.h5f.create(
            os.fsencode(tmp), h5py.h5f.ACC_TRUNC, fcpl=file_create, fapl=file_access
        )
        with h5py.File(fid) as f:
            # The weights first, then the attributes: what differs from one checkpoint to
            # the next (the values, the length of ``logs``) comes after every byte HDF5
            # reads to find the weights, which are then the same in every checkpoint of a
            # model (``_Layout``).
            groups = {"": _new_group(f, "weights", group_create)}  # by path under weights/
            for index, (key, array) in enumerate(weights):
                *folders, name = [part for part in key.split("/") if part]
                path = ""
                for folder in folders:
                    parent, path = groups[path], f"{path}/{folder}"
                    if path not in groups:
                        groups[path] = _new_group(parent, folder, group_create)
                # The position in model.weights: lets a rebuilt model whose layers got
                # other auto-generated names (dense_3 for dense) load by structure.
                dataset = groups[path].create_dataset(name, data=array, track_times=False)
                dataset.attrs["index"] = index
            f.attrs["format"] = CHECKPOINT_FORMAT
            f.attrs["version"] = FORMAT_VERSION
            f.attrs["epoch"] = int(epoch)
            f.attrs["step"] = int(step)
            f.attrs["time"] = float(time)
            f.attrs["logs"] = json.dumps(strict_json(to_jsonable(logs)), allow_nan=False)


@functools.cache
def _checkpoint_property_lists():
    """How checkpoints are created: the HDF5 1.8 file format (readable by any HDF5 since
    2008), whose object headers can keep attributes apart from themselves ("dense" storage,
    for every attribute of the root group: ``epoch``, ``logs`` and the rest stay root
    attributes to every reader, but their values are not in the bytes HDF5 reads on the way
    to the weights), and no timestamps in the headers of groups (HDF5 keeps them by default;
    h5py keeps none for datasets). Names are UTF-8, as h5py writes them."""
    file_create = h5py.h5p.create(h5py.h5p.FILE_CREATE)
    file_create.set_attr_phase_change(0, 0)
    file_create.set_obj_track_times(False)
    group_create = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
    group_create.set_obj_track_times(False)
    link_create = h5py.h5p.create(h5py.h5p.LINK_CREATE)
    link_create.set_char_encoding(h5py.h5t.CSET_UTF8)
    file_access = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    file_access.set_libver_bounds(h5py.h5f.LIBVER_V18, h5py.h5f.LIBVER_V18)
    return file_create, (group_create, link_create), file_access


def _new_group(parent: h5py.Group, name: str, create) -> h5py.Group:
    group_create, link_create = create
    h5py.h5g.create(parent.id, name.encode(), lcpl=link_create, gcpl=group_create)
    return parent[name]


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Reads a checkpoint's attributes (not its weights) and checks its format.

    Raises:
        RunFormatError: the file is unreadable, not a trueloss-replay checkpoint, or of a
            newer format version.
    """
    path = Path(path)
    parsed = parse_checkpoint_name(path.name)
    epoch = parsed[0] if parsed else -1
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            if attrs.get("format") != CHECKPOINT_FORMAT:
                raise RunFormatError(
                    f"checkpoint {path} is not a trueloss-replay checkpoint "
                    f"(format attribute {attrs.get('format')!r}). Remove it from checkpoints/."
                )
            check_version(attrs.get("version"), f"checkpoint {path}")
            if not isinstance(f.get("weights"), h5py.Group):
                raise RunFormatError(f"checkpoint {path} has no 'weights' group; it is damaged.")
            logs = json.loads(attrs.get("logs", "{}"))
            if not isinstance(logs, dict):
                raise RunFormatError(
                    f"checkpoint {path}: its 'logs' attribute is not a JSON object; it is damaged."
                )
            return Checkpoint(
                name=path.name,
                path=path,
                epoch=_count_attribute(attrs.get("epoch", epoch), "epoch", path),
                step=_count_attribute(attrs["step"], "step", path),
                time=float(attrs["time"]),
                logs=logs,
            )
    except RunFormatError as e:
        _at_checkpoint(e, path)
        raise
    except (OSError, KeyError, ValueError, TypeError, OverflowError) as e:
        raise _unreadable(path, e) from e


#: the largest epoch or step a checkpoint may record: it must fit an int64 column.
_MAX_COUNT = 2**62


def _count_attribute(value: Any, key: str, path: Path) -> int:
    try:
        count = int(value)
    except (TypeError, ValueError, OverflowError):
        count = None
    if count is None or count != value or not 0 <= count <= _MAX_COUNT:
        raise RunFormatError(
            f"checkpoint {path}: its {key!r} attribute is {value!r}, not a whole number from "
            f"0 to {_MAX_COUNT}; it is damaged. Delete it or replay the others with epochs=."
        )
    return count


def read_weights(
    path: str | os.PathLike, expected: Sequence[Sequence[Any]] | None = None
) -> dict[str, np.ndarray]:
    """All of a checkpoint's weights, keyed as ``weight_keys`` names them.

    A checkpoint is untrusted input: a dataset can declare any shape (a file of a few KB
    can declare hundreds of GiB that HDF5 fills in on read) and any dtype. So everything is
    checked from the HDF5 metadata before a single value is read: every dataset must hold
    numbers; names, shapes and dtypes must fit the model's signature (``check_signature``);
    and a dataset must hold in the file the bytes its shape declares (a never-written one
    does not). Only then is the data read.

    Args:
        path: the checkpoint file.
        expected: the model's ``[[key, shape, dtype], ...]`` (``model_signature``). Default:
            the ``variables`` recorded in the manifest of the run folder that holds the
            checkpoint (``RUN_DIR/checkpoints/``), when there is one.

    Returns:
        ``{key: array}`` in the order of the model's weights when the file was written.

    Raises:
        RunFormatError: the file cannot be read, or holds a variable that is not numeric,
            declares more data than it stores, or is too large to read into memory.
        CheckpointMismatchError: a variable is missing, extra, of another shape or of a
            dtype that does not fit the model's; the message names it.

    Example:
        >>> weights = read_weights("runs/exp1/checkpoints/e0003.h5", model_signature(model))
    """
    path = Path(path)
    source = str(path)
    signature = expected if expected is not None else _recorded_signature(path)
    if signature is not None:
        weights = _read_exact(path, signature)
        if weights is not None:
            return weights
    try:
        with h5py.File(path, "r") as f:
            group = f.get("weights")
            if not isinstance(group, h5py.Group):
                raise RunFormatError(f"checkpoint {path} has no 'weights' group; it is damaged.")
            found: list[tuple[int, str, h5py.Dataset]] = []

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    found.append((int(obj.attrs.get("index", len(found))), name, obj))

            group.visititems(visit)
            datasets = {name: obj for _, name, obj in sorted(found, key=lambda t: t[0])}
            for name, obj in datasets.items():
                _check_numeric(name, obj.dtype, source)
            if signature is not None:
                check_signature(signature, datasets, source)
            for name, obj in datasets.items():
                _check_stored(name, obj, source)
            if signature is None:
                _check_expansion(datasets, source)
            return {name: obj[()] for name, obj in datasets.items()}
    except RunFormatError as e:
        _at_checkpoint(e, path)
        raise
    except MemoryError as e:
        raise RunFormatError(
            f"checkpoint {path} is too large to read into memory; it is damaged or was not "
            "written for this model.",
            path=path,
            checkpoint=path.name,
            hint=DAMAGED_HINT,
        ) from e
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise _unreadable(path, e) from e


def read_weights_into(
    path: str | os.PathLike, expected: Sequence[Sequence[Any]], into: Sequence[np.ndarray]
) -> None:
    """``read_weights`` into arrays the caller owns: ``into[i]`` receives the variable of
    ``expected[i]`` (a slot of a buffer that stacks several checkpoints, say). A checkpoint
    laid out as the callback writes it is read straight into them; any other takes
    ``read_weights``' checked path and is copied.

    Raises:
        RunFormatError, CheckpointMismatchError: as ``read_weights``.
    """
    path = Path(path)
    if _read_exact(path, expected, into) is not None:
        return
    weights = read_weights(path, expected)
    for destination, key in zip(into, check_signature(expected, weights, str(path)), strict=True):
        destination[...] = weights[key]


def _read_exact(
    path: Path, signature: Sequence[Sequence[Any]], into: Sequence[np.ndarray] | None = None
) -> dict[str, np.ndarray] | None:
    """The fast path of ``read_weights``: the checkpoint's arrays when the file is exactly
    what the signature describes, else None (``read_weights`` then takes the checked path,
    which also says what is wrong).

    Exactly: the ``weights`` group holds one dataset per signature entry and nothing else,
    matched as ``check_signature`` matches them (by path, or by position where the paths
    differ only in Keras' per-process names, in the order of integer ``index`` attributes),
    each of the signature's shape and of exactly the HDF5 type h5py stores its dtype as,
    stored contiguously in the file itself (no filter, no external file: nothing expands or
    is fetched on read) with every byte it declares, in a file without a user block. That is
    every checkpoint the callback writes. Everything is checked before a value is read; then
    each variable's bytes are copied from their offset with ``os.preadv``, which lets go of
    the GIL. Matched by name, the arrays come in the signature's order (for the names a run
    recorded, the order its checkpoints were written in); by position, in the file's
    ``index`` order. With ``into`` (arrays of the signature's shapes and dtypes, in its
    order), the values go there.

    Those checks go through HDF5, which holds the GIL for about a millisecond per file, as
    long as a small model's forward pass on a GPU. So the first file of a folder that passes
    them also gives its ``_Layout``, and the folder's next files are read by it: one
    ``preadv`` of the whole file, then a comparison of the bytes HDF5 read to check the first
    (``_FolderLayout`` says when a folder takes another).
    """
    if into is not None and len(into) != len(signature):
        raise ValueError(f"{len(into)} arrays to read {len(signature)} variables into")
    try:
        wanted = [
            (str(key), tuple(int(d) for d in shape), np.dtype(rest[0]) if rest else None)
            for key, shape, *rest in signature
        ]
    except (TypeError, ValueError):  # a dtype numpy does not name (bfloat16): checked path
        return None
    if any(dtype is None or dtype.kind not in _NUMERIC_KINDS for *_, dtype in wanted):
        return None
    # Bytes are copied only into arrays of the stored dtype, laid out as they are stored.
    if into is not None and not all(
        target.shape == shape and target.dtype == dtype and target.flags.c_contiguous
        for target, (_, shape, dtype) in zip(into, wanted, strict=True)
    ):
        return None
    return _folder_layout(path, wanted).read(path, wanted, into)


def _read_checked_layout(path: Path, wanted, into) -> dict[str, np.ndarray] | None:
    """``_read_exact`` through HDF5: its checks, then each variable's bytes with ``preadv``."""
    try:
        fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY)
    except Exception:  # noqa: BLE001 - whatever h5py raises, the checked path says it well
        return None
    try:
        handle = fid.get_vfd_handle()
        plan = _plan(fid, wanted, os.fstat(handle).st_size)
        if plan is None:
            return None
        arrays = {}
        for (key, offset, nbytes), (_, shape, dtype), target in zip(
            plan.variables, wanted, into or [None] * len(wanted), strict=True
        ):
            array = np.empty(shape, dtype) if target is None else target
            # ``preadv`` lets go of the GIL while it copies (h5py's read does not).
            if nbytes and os.preadv(handle, [memoryview(array).cast("B")], offset) != nbytes:
                return None
            arrays[key] = array
        return plan.arrange(arrays, into is None)
    except Exception:  # noqa: BLE001 - falling back is always safe
        return None
    finally:
        fid.close()


@dataclass(frozen=True)
class _Plan:
    """Where a checkpoint's variables are, as ``_plan`` checked them: ``variables`` holds
    ``(key, offset, nbytes)`` in the signature's order, the key the file's; ``file_keys``
    the order ``_read_exact`` returns them in."""

    variables: tuple[tuple[str, int, int], ...]
    file_keys: tuple[str, ...]

    def arrange(self, arrays: Mapping[str, np.ndarray], scalars: bool) -> dict[str, np.ndarray]:
        """``arrays`` in ``file_keys`` order; with ``scalars``, a scalar variable as a numpy
        scalar, as the checked path's ``obj[()]`` reads it."""
        return {
            key: arrays[key][()] if scalars and arrays[key].ndim == 0 else arrays[key]
            for key in self.file_keys
        }


def _plan(fid, wanted, size: int) -> _Plan | None:
    """Where each variable ``wanted`` is in the open file ``fid`` of ``size`` bytes, when it is
    laid out exactly as ``_read_exact`` says; else None. Reads no value."""
    # The layout the callback writes has no user block (HDF5's offsets would count it).
    if fid.get_create_plist().get_userblock() != 0:
        return None
    group = h5py.h5o.open(fid, b"weights")
    if not isinstance(group, h5py.h5g.GroupID):
        return None
    names: list[bytes] = []

    def visit(name: bytes, info) -> None:
        if info.type == h5py.h5o.TYPE_DATASET:
            names.append(name)

    h5py.h5o.visit(group, visit, info=True)
    keys = [key for key, _, _ in wanted]
    by_key = {name.decode(): h5py.h5d.open(group, name) for name in names}
    if set(keys) != set(by_key):
        # Matched by position, as check_signature does, in the order of the ``index``
        # attributes (integers, one value each).
        found = []
        for position, (key, dataset) in enumerate(by_key.items()):
            found.append((_index_attribute(dataset, position), key, dataset))
        if any(index is None for index, _, _ in found):
            return None
        found.sort(key=lambda t: t[0])
        by_key = {key: dataset for _, key, dataset in found}
        file_keys = list(by_key)
        if len(keys) != len(file_keys) or not all(
            same_structure(a, b) for a, b in zip(keys, file_keys, strict=True)
        ):
            return None
        keys = file_keys
    else:
        # By name: in the signature's order, which for the names a run recorded is the
        # order its checkpoints were written in.
        by_key = {key: by_key[key] for key in keys}
    variables = []
    for key, (_, shape, dtype) in zip(keys, wanted, strict=True):
        dataset = by_key[key]
        # The stored type exactly numpy's: h5py shows, say, a float with a 7-bit exponent as
        # float32, whose bytes HDF5 would convert and a copy would not.
        if dataset.shape != shape or not dataset.get_type().equal(_hdf5_type(dtype)):
            return None
        # Contiguous in this file: no filter to expand, no external file to fetch; then
        # its bytes are the array's, at that offset.
        layout = dataset.get_create_plist()
        if layout.get_layout() != h5py.h5d.CONTIGUOUS or layout.get_external_count():
            return None
        offset = dataset.get_offset()
        nbytes = math.prod(shape) * dtype.itemsize
        if offset is None or dataset.get_storage_size() < nbytes or offset + nbytes > size:
            return None
        variables.append((key, offset, nbytes))
    return _Plan(tuple(variables), tuple(by_key))


#: Buffers one ``preadv`` takes at most (POSIX guarantees 16; Linux allows 1024).
try:
    IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (AttributeError, ValueError, OSError):
    IOV_MAX = 16


@dataclass(frozen=True)
class _Layout:
    """A checkpoint as HDF5 found it, for reading the files laid out like it without HDF5.

    HDF5 is deterministic: given the same bytes, it reads the same places and finds the
    same things. So a file of the same size whose bytes are the same at every place HDF5
    read while ``_plan`` checked this one (``checked``: the superblock, the object headers
    and the links on the way to each variable, and what they declare) holds its variables
    at the same offsets, of the same shapes and types: its values are the bytes there.
    The variables' own bytes are not compared. HDF5 reads a little ahead of an object header
    (512 bytes), into the data after it, and uses only the header: a read that reaches into a
    variable must start at an object header of one chunk that ends before the variable
    (``headers``, from HDF5), else there is no layout; so every byte HDF5 uses is compared.
    What HDF5 did not read, the root attributes among it (``write_checkpoint`` stores them
    apart from the root's header), may differ. Where checkpoints keep their attributes in the
    root's header (as this project wrote them before it wrote layouts, and h5py does by
    default), each differs from the one before where HDF5 reads (``_FolderLayout`` then
    takes layouts ever more rarely).

    ``segments`` cover the file in order, none longer than ``_READ_BYTES``: ``(None, start,
    end)`` a part of the scratch buffer that takes what is not a variable, ``(i, start, end)``
    bytes ``start:end`` of variable ``i`` of ``plan``.
    ``checked`` are parts of that scratch buffer, ``expected`` their bytes in this file.
    """

    size: int
    plan: _Plan
    segments: tuple[tuple[int | None, int, int], ...]
    scratch: int
    checked: tuple[tuple[int, int], ...]
    expected: bytes

    @classmethod
    def of(
        cls,
        plan: _Plan,
        size: int,
        reads: Iterable[tuple[int, bytes]],
        headers: Mapping[int, int],
    ) -> _Layout | None:
        """The layout of a file of ``size`` bytes that ``plan`` describes, from the
        ``(offset, bytes)`` HDF5 read to make it and the ``{address: size}`` of the object
        headers of one chunk it read; None where it cannot be one."""
        data = sorted(
            (offset, offset + nbytes, i)
            for i, (_, offset, nbytes) in enumerate(plan.variables)
            if nbytes
        )
        starts = [start for start, _, _ in data]
        if any(b[0] < a[1] for a, b in itertools.pairwise(data)):
            return None  # two variables share bytes: one read cannot fill both
        # Bytes of variables before each one, and in all.
        before = [0, *itertools.accumulate(end - start for start, end, _ in data)]
        segments: list[tuple[int | None, int, int]] = []
        cursor = scratch = 0  # in the file; in the scratch buffer
        for start, end, i in [*data, (size, size, None)]:
            if start > cursor:
                segments.extend(
                    (None, piece, min(piece + _READ_BYTES, scratch + start - cursor))
                    for piece in range(scratch, scratch + start - cursor, _READ_BYTES)
                )
                scratch += start - cursor
            if i is not None:
                segments.extend(
                    (i, piece, min(piece + _READ_BYTES, end - start))
                    for piece in range(0, end - start, _READ_BYTES)
                )
            cursor = end
        # What HDF5 read, as disjoint pieces (the same bytes where two reads overlap).
        pieces: list[tuple[int, bytearray]] = []
        for offset, chunk in sorted(reads):
            if not chunk:
                continue
            # The variable at or after ``offset``: a read reaching into it starts at an
            # object header that ends before it.
            after = bisect.bisect_right(starts, offset)
            if after and offset < data[after - 1][1]:
                return None  # a read that starts inside a variable
            if after < len(data) and offset + len(chunk) > starts[after]:
                if offset + headers.get(offset, size) > starts[after]:
                    return None
            if pieces and offset <= pieces[-1][0] + len(pieces[-1][1]):
                start, piece = pieces[-1]
                shared = min(len(chunk), start + len(piece) - offset)
                if piece[offset - start : offset - start + shared] != chunk[:shared]:
                    return None  # the file changed while HDF5 read it
                piece += chunk[shared:]
            else:
                pieces.append((offset, bytearray(chunk)))
        # Those pieces, less the variables' bytes, as parts of the scratch buffer.
        checked, expected = [], bytearray()
        for offset, piece in pieces:
            end = min(offset + len(piece), size)
            position = offset
            index = bisect.bisect_right(starts, position)
            while position < end:
                upto = min(starts[index], end) if index < len(data) else end
                if position < upto:  # [position, upto) holds no variable's byte
                    at = position - before[index]  # in the scratch buffer
                    checked.append((at, at + upto - position))
                    expected += piece[position - offset : upto - offset]
                if index < len(data):
                    position = max(upto, data[index][1])
                    index += 1
                else:
                    position = end
        return cls(size, plan, tuple(segments), scratch, tuple(checked), bytes(expected))


#: Bytes one ``preadv`` is asked for at most (Linux copies at most 2 GiB less 4 KiB per call).
_READ_BYTES = 1 << 30


class _RecordingFile(io.RawIOBase):
    """A file opened for reading that keeps every ``(offset, bytes)`` read from it."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.reads: list[tuple[int, bytes]] = []

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def readinto(self, buffer) -> int:
        offset = self.raw.tell()
        count = self.raw.readinto(buffer)
        self.reads.append((offset, bytes(memoryview(buffer)[:count])))
        return count


def _take_layout(path: Path, wanted) -> _Layout | None:
    """The ``_Layout`` of checkpoint ``path``: ``_plan`` run through h5py's file-object
    driver, which shows every read HDF5 makes. None where the file is not exactly laid out."""
    try:
        with open(path, "rb", buffering=0) as raw:
            size = os.fstat(raw.fileno()).st_size
            recording = _RecordingFile(raw)
            with h5py.File(recording, "r") as f:
                plan = _plan(f.id, wanted, size)
                if plan is None:
                    return None
                # Where the object headers on the way to the variables are, and how long
                # (``visit`` passes one info object, changed from call to call).
                found = []

                def header(_, info) -> None:
                    if info.hdr.nchunks == 1:
                        found.append((info.addr, info.hdr.space.total))

                header(None, h5py.h5o.get_info(f.id))
                header(None, h5py.h5o.get_info(f["weights"].id))
                h5py.h5o.visit(f["weights"].id, header, info=True)
    except Exception:  # noqa: BLE001 - no layout: the folder is read through HDF5
        return None
    return _Layout.of(plan, size, recording.reads, dict(found))


def _read_laid_out(path: Path, layout: _Layout, wanted, into) -> dict[str, np.ndarray] | None:
    """Checkpoint ``path`` read by ``layout``: None where it is not laid out so (or cannot be
    read so: the HDF5 path then says why)."""
    try:
        arrays = [
            np.empty(shape, dtype) if into is None else into[i]
            for i, (_, shape, dtype) in enumerate(wanted)
        ]
        scratch = memoryview(bytearray(layout.scratch))
        views = [memoryview(array).cast("B") for array in arrays]
        buffers = [
            scratch[start:end] if i is None else views[i][start:end]
            for i, start, end in layout.segments
        ]
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            if os.fstat(fd).st_size != layout.size:
                return None
            position = first = 0
            while first < len(buffers):  # the whole file, in as few calls as may be
                last, count = first, 0
                while last < len(buffers) and (
                    last == first
                    or (last - first < IOV_MAX and count + buffers[last].nbytes <= _READ_BYTES)
                ):
                    count += buffers[last].nbytes
                    last += 1
                # ``preadv`` lets go of the GIL while it copies.
                if os.preadv(fd, buffers[first:last], position) != count:
                    return None
                position += count
                first = last
        finally:
            os.close(fd)
    except Exception:  # noqa: BLE001 - falling back is always safe
        return None
    if b"".join(scratch[start:end] for start, end in layout.checked) != layout.expected:
        return None
    by_key = {key: array for (key, _, _), array in zip(layout.plan.variables, arrays, strict=True)}
    return layout.plan.arrange(by_key, into is None)


@dataclass
class _FolderLayout:
    """The ``_Layout`` a folder's checkpoints are read by, for one signature, and when to
    take another: after ``wait`` more files read through HDF5. A layout that matched no file
    before it was dropped doubles the wait for the next (checkpoints whose every file
    differs where HDF5 reads: a take per 2, 4, ... up to ``_LAYOUT_WAIT`` files); one that
    matched makes the next come at once (the run's writer changed, say)."""

    layout: _Layout | None = None
    matched: int = 0
    wait: int = 0
    interval: int = 0

    def read(self, path: Path, wanted, into) -> dict[str, np.ndarray] | None:
        layout = self.layout
        if layout is not None:
            arrays = _read_laid_out(path, layout, wanted, into)
            if arrays is not None:
                self.matched += 1
                return arrays
            self.layout = None
        arrays = _read_checked_layout(path, wanted, into)
        if arrays is not None and self.layout is None:
            self.wait -= 1
            if self.wait <= 0:
                self.interval = 1 if self.matched else min(2 * self.interval or 1, _LAYOUT_WAIT)
                self.wait, self.matched = self.interval, 0
                self.layout = _take_layout(path, wanted)
        return arrays


#: Files read through HDF5 at most between two layouts taken in a folder whose files match none.
_LAYOUT_WAIT = 64
_LAYOUTS: dict[tuple, _FolderLayout] = {}
_LAYOUTS_LOCK = threading.Lock()


def _folder_layout(path: Path, wanted) -> _FolderLayout:
    key = (str(Path(path).parent), tuple((k, shape, dtype.str) for k, shape, dtype in wanted))
    with _LAYOUTS_LOCK:
        return _LAYOUTS.setdefault(key, _FolderLayout())


@functools.cache
def _hdf5_type(dtype: np.dtype):
    """The HDF5 type h5py stores numpy's ``dtype`` as."""
    return h5py.h5t.py_create(dtype)


def _index_attribute(dataset, default: int) -> int | None:
    """A dataset's integer ``index`` attribute (``default`` without one); None when it is
    not one integer."""
    if not h5py.h5a.exists(dataset, b"index"):
        return default
    attribute = h5py.h5a.open(dataset, b"index")
    if attribute.get_type().get_class() != h5py.h5t.INTEGER:
        return None
    if attribute.get_space().get_simple_extent_npoints() != 1:
        return None
    value = np.zeros((), np.int64)
    attribute.read(value)
    return int(value)


#: What to do about a damaged checkpoint, in every message that says one is.
DAMAGED_HINT = "Delete it or replay the others with epochs=."


def _unreadable(path: Path, error: Exception) -> RunFormatError:
    return RunFormatError(
        f"checkpoint {path} cannot be read ({' '.join(str(error).split())}). It is damaged;",
        path=path,
        checkpoint=path.name,
        hint=DAMAGED_HINT[0].lower() + DAMAGED_HINT[1:],
    )


def _at_checkpoint(error: RunFormatError, path: Path) -> RunFormatError:
    # The readers' checks name the file in their text; the fields say it for callers.
    if error.path is None:
        error.path = path
    if error.checkpoint is None:
        error.checkpoint = path.name
    return error


#: Without a model signature to check a checkpoint against, its variables may declare at
#: most this many bytes more than the file stores (in total). Trueloss-replay writes no
#: compressed variable, so only a foreign or hostile file gets near it: a gzip variable of
#: zeros stores 4 GiB in 4 MiB, and reading it would allocate all of it.
MAX_UNCHECKED_EXPANSION = 256 * 2**20


def _check_expansion(datasets: Mapping[str, h5py.Dataset], source: str) -> None:
    expansion = {
        name: obj.size * obj.dtype.itemsize - obj.id.get_storage_size()
        for name, obj in datasets.items()
    }
    if sum(max(0, n) for n in expansion.values()) <= MAX_UNCHECKED_EXPANSION:
        return
    name = max(expansion, key=expansion.get)
    dataset = datasets[name]
    raise RunFormatError(
        f"checkpoint {source}: variable {name!r} declares shape {dataset.shape} "
        f"({dataset.size * dataset.dtype.itemsize:,} bytes) from "
        f"{dataset.id.get_storage_size():,} compressed bytes, and there is no model "
        "signature to check it against (the run folder's manifest records no 'variables'). "
        f"Without one, a checkpoint may expand by at most {MAX_UNCHECKED_EXPANSION // 2**20} "
        "MiB when read; trueloss-replay writes no compressed variable, so this file comes "
        "from elsewhere.",
        hint="Delete it, or if it is genuine, read it against the model: "
        "read_weights(path, model_signature(model)).",
    )


def as_recorded(signature: Sequence[Sequence[Any]], path: str | os.PathLike) -> list[list[Any]]:
    """``signature`` with its variables named as the run that holds checkpoint ``path``
    recorded them (its manifest's ``variables``), where the two pair up by position (paths
    that differ only in Keras' per-process names, as ``check_signature`` pairs them, of the
    same shapes and dtypes); otherwise ``signature`` itself.

    A model loaded for replay names its variables ``dense/kernel`` where the training
    process wrote ``sequential/dense/kernel``: against the recorded names, a checkpoint's
    variables match by name, and reading it needs none of its ``index`` attributes.
    """
    recorded = _recorded_signature(Path(path))
    wanted = [list(entry) for entry in signature]
    if not isinstance(recorded, list) or len(recorded) != len(wanted):
        return wanted
    # The same names: they match by name already (by position they might pair otherwise).
    names = {str(entry[0]) for entry in recorded if isinstance(entry, list | tuple) and entry}
    if names == {str(key) for key, *_ in wanted}:
        return wanted
    renamed = []
    for (key, shape, *rest), entry in zip(wanted, recorded, strict=True):
        if not (isinstance(entry, list | tuple) and len(entry) == 2 + len(rest)):
            return wanted
        other_key, other_shape, *other_rest = entry
        if not (
            isinstance(other_key, str)
            and isinstance(other_shape, list | tuple)
            and same_structure(str(key), other_key)
            and list(other_shape) == list(shape)
            and [str(r) for r in other_rest] == [str(r) for r in rest]
        ):
            return wanted
        renamed.append([other_key, shape, *rest])
    if len({key for key, *_ in renamed}) != len(renamed):
        return wanted
    return renamed


def _recorded_signature(path: Path) -> list[Any] | None:
    # The variables the training run recorded, when the checkpoint sits in a run folder.
    if path.parent.name != CHECKPOINT_DIR:
        return None
    try:
        return read_manifest(path.parent.parent).get("variables")
    except RunFormatError:
        return None


def _check_numeric(key: str, dtype: Any, source: str) -> None:
    kind = getattr(np.dtype(dtype), "kind", "?") if _is_dtype(dtype) else "?"
    if kind not in _NUMERIC_KINDS:
        raise RunFormatError(
            f"checkpoint {source}: variable {key!r} is stored as {dtype}, not as numbers; "
            "the file is damaged or was not written by trueloss-replay. Delete it or replay "
            "the others with epochs=."
        )


def _is_dtype(dtype: Any) -> bool:
    try:
        np.dtype(dtype)
    except TypeError:
        return False
    return True


def _check_stored(key: str, dataset: h5py.Dataset, source: str) -> None:
    # Without compression a dataset stores every byte it declares; one created with a shape
    # and never written stores none, and reading it would allocate the whole shape.
    if dataset.id.get_create_plist().get_nfilters() > 0:
        # Compressed: the bytes say nothing, but a chunk never written is not stored at all.
        spanned = math.prod(-(-n // c) for n, c in zip(dataset.shape, dataset.chunks, strict=True))
        stored = dataset.id.get_num_chunks()
        if stored < spanned:
            raise RunFormatError(
                f"checkpoint {source}: variable {key!r} declares shape {dataset.shape} "
                f"({spanned:,} compressed chunks) but the file stores {stored:,} of them; "
                "the file is damaged. Delete it or replay the others with epochs=."
            )
        return
    stored, declared = dataset.id.get_storage_size(), dataset.size * dataset.dtype.itemsize
    if stored < declared:
        raise RunFormatError(
            f"checkpoint {source}: variable {key!r} declares shape {dataset.shape} "
            f"({declared:,} bytes) but the file stores {stored:,} bytes of it; the file is "
            "damaged. Delete it or replay the others with epochs=."
        )


#: dtype kinds a variable may be stored as: bool, signed and unsigned ints, floats.
_NUMERIC_KINDS = "biuf"
#: which stored kinds each kind of model variable accepts (a float read into an int
#: variable would be truncated).
_ACCEPTS = {"f": "biuf", "i": "biu", "u": "biu", "b": "biu"}


def _variable_kind(dtype: Any) -> str:
    # Keras names dtypes as strings; bfloat16 and float8 are not numpy's.
    name = str(dtype)
    for prefix, kind in (("bool", "b"), ("uint", "u"), ("int", "i"), ("bfloat", "f")):
        if name.startswith(prefix):
            return kind
    return "f" if name.startswith("float") else "?"


_UNIQUIFIER = re.compile(r"_\d+(?=/|$)")


def same_structure(a: str, b: str) -> bool:
    """True when two variable paths differ only in what Keras generates per process.

    Keras makes layer names unique with _1, _2 ... ("sequential_1/dense_2/kernel"), and a
    Sequential model loaded from a .keras file drops its own name from the paths
    ("dense_2/kernel"). So: compare without the suffixes, the shorter path as the tail of
    the longer one.
    """
    pa, pb = _UNIQUIFIER.sub("", a).split("/"), _UNIQUIFIER.sub("", b).split("/")
    shorter, longer = sorted((pa, pb), key=len)
    return longer[len(longer) - len(shorter) :] == shorter


def match_weights(model, weights: Mapping[str, np.ndarray], source: str) -> list[np.ndarray]:
    """The checkpoint's arrays in ``model.weights`` order, or ``CheckpointMismatchError``.

    Which file variable feeds which model variable is ``check_signature``'s rule.
    """
    return [weights[k] for k in check_signature(model_signature(model), weights, source)]


def check_signature(
    signature: Sequence[Sequence[Any]],
    weights: Mapping[str, np.ndarray | Sequence[int]],
    source: str,
) -> list[str]:
    """Checks a checkpoint's variables against a model's; the one rule for load and verify.

    Variables match by path. When the paths differ only in what Keras generates per
    process (``dense_3`` for ``dense`` in a model rebuilt after others; no ``sequential/``
    prefix in a Sequential model loaded from ``model.keras``), they match by position,
    provided there are as many, every path agrees structurally (``same_structure``) and
    every shape agrees.

    Args:
        signature: the model's ``[[key, shape, ...], ...]``, as ``model_signature`` gives it
            and the manifest's ``variables`` stores it.
        weights: the checkpoint's arrays (or shapes) by key, in file order.
        source: the name error messages give the checkpoint.

    Returns:
        The checkpoint's keys in the order of ``signature``.

    Raises:
        RunFormatError: a variable does not hold numbers.
        CheckpointMismatchError: a variable is missing, extra, of another shape or of a
            dtype the model's variable cannot take (a float for an integer variable); the
            message names it.

    Example:
        >>> check_signature(model_signature(model), read_weights("run/checkpoints/e0003.h5"),
        ...                 "e0003.h5")
        ['sequential/dense/kernel', 'sequential/dense/bias']
    """
    expected = [(str(key), tuple(int(d) for d in shape)) for key, shape, *_ in signature]
    found = {str(k): _shape(v, str(k), source) for k, v in weights.items()}
    keys, file_keys = [k for k, _ in expected], list(found)
    if set(keys) == set(found):
        pairs = list(zip(expected, keys, strict=True))
    elif len(keys) == len(file_keys) and all(
        same_structure(a, b) for a, b in zip(keys, file_keys, strict=True)
    ):
        pairs = list(zip(expected, file_keys, strict=True))
    else:
        raise _missing_or_extra(keys, file_keys, source)
    dtypes = {str(key): rest[0] if rest else None for key, _, *rest in signature}
    for (key, shape), file_key in pairs:
        if found[file_key] != shape:
            raise CheckpointMismatchError(
                f"checkpoint {source}: variable {file_key!r} has shape {found[file_key]}, the "
                f"model expects {shape}. Was it written by a different model?"
            )
        stored = getattr(weights[file_key], "dtype", None)
        if stored is not None:
            _check_numeric(file_key, stored, source)
            wanted = _variable_kind(dtypes[key])
            if np.dtype(stored).kind not in _ACCEPTS.get(wanted, _NUMERIC_KINDS):
                raise CheckpointMismatchError(
                    f"checkpoint {source}: variable {file_key!r} is stored as {stored}, the model "
                    f"expects {dtypes[key]}. Was it written by a different model?"
                )
    return [file_key for _, file_key in pairs]


def _shape(value: Any, key: str, source: str) -> tuple[int, ...]:
    shape = getattr(value, "shape", value)
    if shape is None:  # an HDF5 dataset with a null dataspace
        raise RunFormatError(f"checkpoint {source}: variable {key!r} holds no array.")
    return tuple(int(d) for d in shape)


def _missing_or_extra(keys: list[str], file_keys: list[str], source: str) -> Exception:
    # Align the two lists in order, by path without the per-process parts, so that a missing
    # variable is named even when every path of a rebuilt model differs from the file's.
    depth = min(len(k.split("/")) for k in [*keys, *file_keys]) if keys and file_keys else 1

    def plain(key: str) -> str:
        return "/".join(_UNIQUIFIER.sub("", key).split("/")[-depth:])

    counts = f"(the model has {len(keys)} variables, the file {len(file_keys)})"
    matcher = difflib.SequenceMatcher(
        None, [plain(k) for k in keys], [plain(k) for k in file_keys], autojunk=False
    )
    for tag, i1, _, j1, _ in matcher.get_opcodes():
        if tag in ("delete", "replace"):
            return CheckpointMismatchError(
                f"checkpoint {source} has no variable {keys[i1]!r} {counts}. Was it written "
                "by a different model?"
            )
        if tag == "insert":
            return CheckpointMismatchError(
                f"checkpoint {source} has variable {file_keys[j1]!r}, which the model lacks "
                f"{counts}. Was it written by a different model?"
            )
    return CheckpointMismatchError(
        f"checkpoint {source}: its variables do not match the model's {counts}. Was it "
        "written by a different model?"
    )


def load_weights(
    model, checkpoint: str | os.PathLike | Mapping[str, np.ndarray], source: str | None = None
) -> None:
    """Assigns a checkpoint's weights to ``model`` by variable path.

    Args:
        model: a built Keras model with the same variables as the one that was trained.
        checkpoint: a checkpoint path, or weights already read with ``read_weights``.
        source: the name error messages give the weights (default: the path).

    Raises:
        RunFormatError: the file cannot be read.
        CheckpointMismatchError: a variable is missing, extra or of another shape; the
            message names it. The model is left unchanged.

    Example:
        >>> load_weights(model, "runs/exp1/checkpoints/e0003.h5")
    """
    if isinstance(checkpoint, Mapping):
        weights, source = checkpoint, source or "(in memory)"
    else:
        weights, source = read_weights(checkpoint), source or str(checkpoint)
    arrays = match_weights(model, weights, source)
    for array, variable in zip(arrays, model.weights, strict=True):
        variable.assign(array.astype(variable.dtype, copy=False))


# --------------------------------------------------------------------------- results


def checkpoint_order(name: str) -> tuple[int, int, int]:
    """The training-order sort key of a checkpoint (or result) file name.

    Epoch first; within an epoch the epoch-end checkpoint ``eNNNN.h5`` (taken when epoch N
    ended) comes before the sub-epoch ones ``eNNNN-sSSSSSS.h5`` (taken during epoch N+1), in
    step order. Any other name sorts first. The one ordering every reader uses.

    Example:
        >>> sorted(["e0001-s000040.h5", "e0002.h5", "e0001.h5"], key=checkpoint_order)
        ['e0001.h5', 'e0001-s000040.h5', 'e0002.h5']
    """
    epoch, step = parse_checkpoint_name(name) or (-1, None)
    return (epoch, 0 if step is None else 1, -1 if step is None else step)


def results_folder(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Where a run's result files are: ``output``, or ``RUN_DIR/replay/results``."""
    if output is not None:
        return local_path(output, "results folder")
    return local_path(run_dir) / RESULTS_DIR


def result_path(folder: str | os.PathLike, checkpoint: str) -> Path:
    """The result file of a checkpoint in a results folder: ``e0003.h5`` → ``e0003.json``."""
    return Path(folder) / (Path(checkpoint).stem + ".json")


def make_result(
    checkpoint: Checkpoint,
    *,
    train: Mapping[str, Any],
    val: Mapping[str, Any] | None,
    examples: Mapping[str, int],
    data: Mapping[str, Any],
    batch_size: Any,
    backend: str,
    device: str,
    seconds: float,
    evaluated: float | None = None,
    sample: Mapping[str, Any] | None = None,
    stacked: int = 1,
) -> dict[str, Any]:
    """One checkpoint's result, as ``write_result`` stores it (format ``trueloss-replay/result``).

    Args:
        checkpoint: the checkpoint evaluated.
        train: the training split's figures (``loss``, ``regularization_loss``, metrics).
        val: the validation split's figures, or None without validation data.
        examples: examples evaluated per split.
        data: the data fingerprint per split; a result is reused only for the same data.
        batch_size: the evaluation batch size per split (None for a dataset's own).
        backend: the Keras backend that evaluated it.
        device: the device that evaluated it.
        seconds: how long the evaluation took; for checkpoints evaluated together (``stacked``
            > 1), their program call's share of the wall time.
        evaluated: Unix seconds when it was evaluated (default now).
        stacked: how many checkpoints one program call evaluated with this one (1: alone).
        sample: per sampled split (``train``), its ``size``, ``seed``, ``population`` and
            ``indices_sha256`` (``sampling.SampledSplit.sample``); None for full sets. The
            same record is in ``data``, so a result is reused only for the same sample.

    Returns:
        The result dict; ``explain`` adds an ``"explain"`` entry to it later.
    """
    import time

    return {
        "format": RESULT_FORMAT,
        "version": FORMAT_VERSION,
        "checkpoint": checkpoint.name,
        "epoch": checkpoint.epoch,
        "step": checkpoint.step,
        "epoch_end": checkpoint.is_epoch_end,
        "checkpoint_time": checkpoint.time,
        "train": dict(train),
        "val": None if val is None else dict(val),
        "reported": checkpoint.logs,
        "examples": dict(examples),
        "data": dict(data),
        "batch_size": batch_size,
        "backend": backend,
        "device": device,
        "seconds": seconds,
        "evaluated": time.time() if evaluated is None else evaluated,
        "sample": None if sample is None else {k: dict(v) for k, v in sample.items()},
        "stacked": stacked,
    }


def write_result(folder: str | os.PathLike, result: Mapping[str, Any]) -> Path:
    """Writes a result to ``folder/<checkpoint>.json`` atomically, as strict JSON.

    Returns:
        The path written.

    Raises:
        RunWriteError: the file could not be written (``reason`` says why).
    """
    path = result_path(folder, result["checkpoint"])
    atomic_write_json(path, result)
    return path


#: The result fields that readers use: (key, type, required). ``history`` reads the figures
#: and ``replay`` decides from ``checkpoint_time`` and ``data`` whether to reuse a result.
_RESULT_FIELDS = (
    ("checkpoint", str, True),
    ("train", dict, True),
    ("val", dict, False),
    ("reported", dict, False),
    ("explain", dict, False),
    ("data", dict, False),
    ("sample", dict, False),
    ("step", int, False),
    ("checkpoint_time", (int, float), False),
)


def read_result(path: str | os.PathLike) -> dict[str, Any]:
    """One result file, validated: format, version and the type of every field readers use.

    Raises:
        RunFormatError: unreadable, not JSON, not a trueloss-replay result, a newer or
            malformed version, or a field of the wrong type (the message names the file).

    Example:
        >>> read_result("runs/exp1/replay/results/e0003.json")["train"]["loss"]
    """
    path = Path(path)
    fields = {"path": path, "hint": "Delete it and replay that checkpoint again."}
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunFormatError(
            f"result file {path} cannot be read ({' '.join(str(e).split())}).", **fields
        ) from e
    if not isinstance(result, dict) or result.get("format") != RESULT_FORMAT:
        found = result.get("format") if isinstance(result, dict) else type(result).__name__
        raise RunFormatError(
            f"result file {path} is not a trueloss-replay result (format {found!r}).", **fields
        )
    check_version(result.get("version"), f"result file {path}", **fields)
    for key, kind, required in _RESULT_FIELDS:
        value = result.get(key)
        if (value is not None or required) and not isinstance(value, kind):
            raise RunFormatError(f"result file {path} has no valid {key!r} entry.", **fields)
    if isinstance(result.get("checkpoint_time"), bool) or isinstance(result.get("step"), bool):
        raise RunFormatError(f"result file {path} has a true/false step or time.", **fields)
    if parse_checkpoint_name(result["checkpoint"]) is None:
        raise RunFormatError(
            f"result file {path} names the checkpoint {result['checkpoint']!r}, which is not "
            "a checkpoint file name.",
            **fields,
        )
    return result


def list_results(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Every result file in a results folder, validated, in training order.

    Only files named after a checkpoint (``e0003.json``, ``e0001-s000450.json``) are read;
    the hidden temporary files of a write in progress and any other file are ignored.

    Raises:
        RunFormatError: a result file is damaged (the message names it).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    results = []
    for entry in os.scandir(folder):
        stem, suffix = os.path.splitext(entry.name)
        if suffix != ".json" or parse_checkpoint_name(stem + ".h5") is None:
            continue
        if entry.is_file():
            results.append(read_result(entry.path))
    return sorted(results, key=lambda r: checkpoint_order(r["checkpoint"]))


# --------------------------------------------------------------------------- the run


class Run:
    """A run folder opened for reading.

    Args:
        run_dir: the folder ``ReplayCheckpoint`` wrote.

    Raises:
        RunFormatError: there is no readable trueloss-replay manifest in ``run_dir``.

    Example:
        >>> run = Run("runs/exp1")
        >>> [c.name for c in run.checkpoints()]
        ['e0000.h5', 'e0001.h5', 'e0002.h5']
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = local_path(run_dir)
        self.manifest = read_manifest(self.path)

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def results_dir(self) -> Path:
        return self.path / RESULTS_DIR

    def resolve(self, relative: str) -> Path:
        """A path named in the manifest, refused unless it stays inside the run folder."""
        return resolve_inside(self.path, relative)

    @property
    def model_path(self) -> Path | None:
        model = self.manifest.get("model")
        return None if model is None else self.resolve(model)

    def checkpoints(self, epoch_end_only: bool = False) -> list[Checkpoint]:
        """The run's checkpoints in training order; unreadable ones carry ``error``."""
        return list_checkpoints(self.checkpoint_dir, epoch_end_only=epoch_end_only)


def resolve_inside(run_dir: Path, relative: str) -> Path:
    """``run_dir / relative``, refused when ``relative`` is absolute or leaves ``run_dir``."""
    candidate = (run_dir / relative).resolve()
    if Path(relative).is_absolute() or not candidate.is_relative_to(run_dir.resolve()):
        raise RunFormatError(
            f"{run_dir / MANIFEST} names the path {relative!r}, which is outside the run "
            "folder; refusing to read it. Paths in a manifest must be relative to the run."
        )
    return candidate


def list_checkpoints(
    folder: Path, epoch_end_only: bool = False, exclude: Container[str] = ()
) -> list[Checkpoint]:
    """Every complete checkpoint file in ``folder``, in training order.

    Temporary files of an interrupted write are ignored. A file that cannot be opened is
    listed with ``error`` set rather than raising, so one bad file does not hide the others.
    Names in ``exclude`` are neither opened nor listed (a follower lists only what is new).
    """
    if not folder.is_dir():
        return []
    found = []
    for entry in os.scandir(folder):
        parsed = parse_checkpoint_name(entry.name)
        if parsed is None or entry.name in exclude or not entry.is_file():
            continue
        if epoch_end_only and parsed[1] is not None:
            continue
        try:
            found.append(read_checkpoint(entry.path))
        except RunFormatError as e:
            found.append(Checkpoint(entry.name, Path(entry.path), parsed[0], error=str(e)))
    return sorted(found, key=Checkpoint.sort_key)


def new_manifest(
    model,
    *,
    model_file: str | None,
    compile_config: Mapping[str, Any] | None,
    data: str | None = None,
    data_files: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    save_freq: str | int = "epoch",
    status: str = "running",
    created: float | None = None,
) -> dict[str, Any]:
    """The manifest of a new run of ``model``, before any checkpoint is listed.

    The one place that decides what a manifest holds: ``ReplayCheckpoint`` writes it at
    train begin, ``adopt`` for a folder of Keras checkpoints.

    Args:
        model: the Keras model whose variables the checkpoints hold.
        model_file: the architecture's path relative to the run folder, or None.
        compile_config: ``model.get_compile_config()`` of the trained model.
        data: a ``module:function`` data factory, or None.
        data_files: ``{"train": "data/train.h5", ...}``: snapshots in the run folder.
        params: Keras' ``History.params`` (``epochs``, ``steps``, ``verbose``).
        save_freq: ``"epoch"`` or the step count of sub-epoch checkpoints.
        status: ``running``, ``finished`` or ``failed``.
        created: Unix seconds (default now).

    Returns:
        The manifest as a dict, with an empty ``checkpoints`` list.

    Example:
        >>> manifest = new_manifest(model, model_file="model.keras",
        ...                         compile_config=model.get_compile_config())
    """
    import time

    import keras

    params = dict(params or {})
    return {
        "format": RUN_FORMAT,
        "version": FORMAT_VERSION,
        "created": time.time() if created is None else created,
        "keras_version": keras.__version__,
        "tensorflow_version": installed_version("tensorflow"),
        "jax_version": installed_version("jax"),
        "backend": keras.backend.backend(),
        "model": model_file,
        "model_class": type(model).__name__,
        "compile": None if compile_config is None else dict(compile_config),
        "data": data,
        "data_files": dict(data_files or {}),
        "params": params,
        "steps_per_epoch": params.get("steps"),
        "save_freq": save_freq,
        "variables": model_signature(model),
        "status": status,
        "checkpoints": [],
    }


def installed_version(package: str) -> str | None:
    """The installed version of a package, read from its metadata: recording TensorFlow's
    version must not import TensorFlow into a JAX training process."""
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The manifest of ``run_dir``, validated: format, version and the type of every field
    that readers use.

    Raises:
        RunFormatError: missing, not JSON, not a trueloss-replay run, a newer version, or a
            field of the wrong type (the message names the file and the field).
    """
    run_dir = local_path(run_dir)
    path = run_dir / MANIFEST
    if not run_dir.is_dir():
        raise RunFormatError(
            f"run folder {storage.shown(run_dir)} does not exist. Pass the folder given to "
            "ReplayCheckpoint.",
            path=run_dir,
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise RunFormatError(
            f"{storage.shown(run_dir)} has no {MANIFEST}; it is not a trueloss-replay run "
            "folder. Pass the "
            "folder given to ReplayCheckpoint.",
            path=path,
        ) from e
    except (OSError, ValueError) as e:
        raise RunFormatError(
            f"{path} cannot be read as JSON ({' '.join(str(e).split())}); the manifest is damaged.",
            path=path,
        ) from e
    if not isinstance(manifest, dict) or manifest.get("format") != RUN_FORMAT:
        raise RunFormatError(
            f"{path} is not a trueloss-replay manifest (format "
            f"{manifest.get('format') if isinstance(manifest, dict) else None!r}).",
            path=path,
        )
    check_version(manifest.get("version"), str(path), path=path)
    _check_manifest(manifest, path)
    return manifest


def check_version(version: Any, what: str, **fields: Any) -> int:
    """Checks a file's ``version`` field: an integer this trueloss-replay reads.

    Args:
        version: the value read from the file (JSON or an HDF5 attribute).
        what: the file, as error messages name it.

    Returns:
        The version.

        fields: the error's fields (``path``, ``hint``), as ``TruelossReplayError`` takes them.

    Raises:
        RunFormatError: not an integer (``"one"``, ``"1.0"``, missing), or a newer version.
    """
    if isinstance(version, (bool, np.bool_)) or not isinstance(version, (int, np.integer)):
        raise RunFormatError(
            f"{what}: field 'version' is {_described(version)}, not an integer format "
            "version; the file is damaged or was not written by trueloss-replay.",
            **fields,
        )
    if version > FORMAT_VERSION:
        raise RunFormatError(
            f"{what} has format version {version}; this trueloss-replay reads up to "
            f"{FORMAT_VERSION}.",
            **{**fields, "hint": "Upgrade trueloss-replay."},
        )
    return int(version)


def _described(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_signature(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, list)
        and len(v) == 3
        and isinstance(v[0], str)
        and isinstance(v[1], list)
        and all(_is_int(d) and d >= 0 for d in v[1])
        and isinstance(v[2], str)
        for v in value
    )


def _is_checkpoint_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(c, dict)
        and isinstance(c.get("name"), str)
        and (c.get("step") is None or _is_int(c["step"]))
        and (c.get("logs") is None or isinstance(c["logs"], dict))
        for c in value
    )


#: The manifest's fields that readers use: (field, check, what it must be). A missing or
#: null field is allowed (an older or interrupted run); any other value must pass.
_MANIFEST_FIELDS: tuple[tuple[str, Any, str], ...] = (
    ("model", lambda v: isinstance(v, str), "a relative path (a string)"),
    ("model_class", lambda v: isinstance(v, str), "a string"),
    ("keras_version", lambda v: isinstance(v, str), "a string"),
    ("tensorflow_version", lambda v: isinstance(v, str), "a string"),
    ("jax_version", lambda v: isinstance(v, str), "a string"),
    ("backend", lambda v: isinstance(v, str), "a string"),
    ("status", lambda v: isinstance(v, str), "a string"),
    ("created", _is_number, "a number (Unix seconds)"),
    ("finished", _is_number, "a number (Unix seconds)"),
    ("compile", lambda v: isinstance(v, dict), "an object (Keras' compile config)"),
    ("data", lambda v: isinstance(v, str), "a 'module:function' string"),
    (
        "data_files",
        lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
        'an object of relative paths ({"train": "data/train.h5"})',
    ),
    (
        "params",
        lambda v: isinstance(v, dict) and (v.get("steps") is None or _is_int(v["steps"])),
        "an object (Keras' History.params, with an integer 'steps')",
    ),
    ("steps_per_epoch", lambda v: _is_int(v) and v > 0, "a positive integer"),
    ("save_freq", lambda v: v == "epoch" or (_is_int(v) and v > 0), "'epoch' or an integer"),
    ("variables", _is_signature, "a list of [path, shape, dtype] entries"),
    ("checkpoints", _is_checkpoint_list, 'a list of objects, each with a "name" string'),
    (
        "pruned",
        lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
        "a list of checkpoint file names",
    ),
)


def _check_manifest(manifest: dict[str, Any], path: Path) -> None:
    for name, check, expected in _MANIFEST_FIELDS:
        value = manifest.get(name)
        if value is not None and not check(value):
            raise RunFormatError(
                f"{path}: field {name!r} must be {expected}, not {_described(value)}; the "
                "manifest is damaged.",
                path=path,
                hint="Copy it again from where the run was trained.",
            )


def local_path(path: str | os.PathLike, what: str = "run folder") -> Path:
    """``path`` as a local ``Path``; a URL (``s3://``, ``gs://``, ``file://`` ...) as its
    local mirror, brought up to date (``storage.mirror_path``).

    The one entry point the API, the callback and the command line call for a run folder or
    a results folder. ``Path("gs://bucket/run")`` would be the local folder
    ``gs:/bucket/run``: a URL never reaches ``Path``. Files later written into the mirror
    through ``atomic_path`` are uploaded to the URL, one by one.

    Args:
        path: a local path or an fsspec URL.
        what: what the path is, as error messages name it.

    Returns:
        The local folder.

    Raises:
        MissingDependencyError: the URL's protocol needs a package that is not installed
            (the message names the extra to install).
        StorageError: the URL cannot be read (credentials refused, no such bucket).

    Example:
        >>> local_path("runs/exp1")
        PosixPath('runs/exp1')
    """
    if storage.is_url(path):
        return storage.mirror_path(os.fspath(path), what)
    return Path(path)


def local_folders(
    run_dir: str | os.PathLike, output: str | os.PathLike | None = None
) -> tuple[Path, Path | None]:
    """``local_path`` of a run folder and of a results folder (None stays None)."""
    run_dir = local_path(run_dir)
    return run_dir, None if output is None else local_path(output, "results folder")


def remove_path(path: Path) -> None:
    """Removes a file or folder if it exists (and its copy in object storage, for a mirror)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    storage.removed(path)
