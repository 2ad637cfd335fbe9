"""Adopt a plain Keras run: a folder of ``ModelCheckpoint`` files becomes a run folder.

Each checkpoint is rewritten in the native checkpoint format (the model's weights by
variable path, no optimizer state) rather than referenced where it lies. The trade-off: an
adopted run costs the disk of its weights once more (a ``.keras`` or ``.weights.h5`` file
of Keras also holds the optimizer's slots, about twice the weights for Adam, so the copy is
about a third of the source), and in exchange every reader (``replay``, ``history``,
``explain``, ``inspect --verify``, the fuzzed validation of untrusted files) keeps one
format, and the run folder stays valid when the source folder is moved or deleted.

Keras' own loader (``model.load_weights``) reads the source files, so whatever Keras writes
it can read, whole models (``.keras``) and weights-only files (``.weights.h5``) alike. Before
it does, the file's variables are compared with those of the model, as Keras lays them out
in its own weights file: Keras ignores variables that the model lacks, and its message for a
missing one does not name the file.

Nothing is half-written: the run is built in a hidden folder beside ``run_dir`` and renamed
into place at the end; any error removes it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import string
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from trueloss_replay import run as runfmt
from trueloss_replay import storage
from trueloss_replay.errors import (
    AdoptError,
    CheckpointMismatchError,
    ModelLoadError,
    RunExistsError,
    RunFormatError,
    RunWriteError,
    TruelossReplayError,
)

#: The file names Keras' ``ModelCheckpoint`` writes: weights only, or the whole model.
CHECKPOINT_SUFFIXES = (".weights.h5", ".keras")

_FIRST_INTEGER = re.compile(r"\d+")


@dataclass(frozen=True)
class SourceCheckpoint:
    """One Keras checkpoint file of the folder being adopted.

    Attributes:
        path: the file.
        epoch: completed epochs (Keras' 1-based ``{epoch}`` in ``filepath``).
    """

    path: Path
    epoch: int

    @property
    def is_model(self) -> bool:
        """True for a whole-model ``.keras`` file, False for ``.weights.h5``."""
        return self.path.name.endswith(".keras")


# --------------------------------------------------------------------------- file names


def epoch_parser(pattern: str | None = None) -> Callable[[str], int | None]:
    """A function from a checkpoint's file name to its epoch, or None when it has none.

    Args:
        pattern: Keras' ``ModelCheckpoint`` ``filepath`` syntax, e.g.
            ``"ckpt-{epoch:03d}.weights.h5"`` or ``"model-{epoch:02d}-{val_loss:.2f}.keras"``:
            ``{epoch}`` (with any format spec) is the epoch, every other ``{field}`` matches
            anything. A folder part is ignored (the source folder is given separately).
            None (default) takes the first integer of the name before its suffix.

    Returns:
        ``parse(name) -> int | None``.

    Raises:
        AdoptError: the pattern has no ``{epoch}`` field or is not valid format syntax.

    Example:
        >>> parse = epoch_parser("ckpt-{epoch:03d}-{val_loss:.2f}.keras")
        >>> parse("ckpt-007-0.31.keras"), parse("final.keras")
        (7, None)
    """
    if pattern is None:

        def first_integer(name: str) -> int | None:
            match = _FIRST_INTEGER.search(_strip_suffix(name))
            return None if match is None else int(match.group())

        return first_integer
    regex = _pattern_regex(pattern)

    def by_pattern(name: str) -> int | None:
        match = regex.fullmatch(name)
        if match is None:
            return None
        found = {int(value) for value in match.groupdict().values()}
        return found.pop() if len(found) == 1 else None

    return by_pattern


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    name = pattern.replace("\\", "/").rsplit("/", 1)[-1]
    parts, epochs = [], 0
    try:
        fields = list(string.Formatter().parse(name))
    except ValueError as e:
        raise AdoptError(
            f"pattern {pattern!r} is not Keras' filepath syntax ({e}); write it as given to "
            "ModelCheckpoint, e.g. 'ckpt-{epoch:03d}.weights.h5'."
        ) from e
    for literal, field, _spec, _conversion in fields:
        parts.append(re.escape(literal))
        if field is None:
            continue
        if field == "epoch":
            # Each occurrence may have its own format spec ({epoch}-{epoch:03d}): compared
            # as numbers after the match.
            parts.append(rf"(?P<epoch{epochs}>\d+)")
            epochs += 1
        else:
            parts.append(r".+?")
    if not epochs:
        raise AdoptError(
            f"pattern {pattern!r} has no {{epoch}} field, so it cannot say which epoch a file "
            "holds; write it as given to ModelCheckpoint, e.g. 'ckpt-{epoch:03d}.weights.h5'."
        )
    return re.compile("".join(parts))


def _strip_suffix(name: str) -> str:
    for suffix in CHECKPOINT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_checkpoints(
    src: str | os.PathLike, pattern: str | None = None, exclude: Iterable[str | os.PathLike] = ()
) -> list[SourceCheckpoint]:
    """The Keras checkpoint files of a folder, by epoch.

    Every ``*.weights.h5`` and ``*.keras`` file of ``src`` (not its subfolders; hidden
    files are ignored) is a checkpoint and must name its epoch.

    Args:
        src: the folder ``ModelCheckpoint`` wrote.
        pattern: how names carry the epoch (see ``epoch_parser``).
        exclude: files of ``src`` that are no checkpoint (the architecture's ``.keras``).

    Returns:
        The checkpoints in epoch order.

    Raises:
        AdoptError: ``src`` is not a folder, holds no checkpoint, a file whose name has no
            epoch, or two files of one epoch; the message names the files.

    Example:
        >>> [c.epoch for c in find_checkpoints("ckpts", "ckpt-{epoch:03d}.weights.h5")]
        [1, 2, 3]
    """
    src = runfmt.local_path(src, "source folder")
    if not src.is_dir():
        raise AdoptError(
            f"source folder {src} does not exist or is not a folder; pass the folder that "
            "Keras' ModelCheckpoint wrote."
        )
    parse = epoch_parser(pattern)
    excluded = {Path(p).resolve() for p in exclude}
    by_epoch: dict[int, SourceCheckpoint] = {}
    others = []
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        if Path(entry.path).resolve() in excluded:
            continue
        if not entry.name.endswith(CHECKPOINT_SUFFIXES):
            others.append(entry.name)
            continue
        epoch = parse(entry.name)
        if epoch is None:
            how = f"pattern {pattern!r}" if pattern else "the default pattern (its first integer)"
            raise AdoptError(
                f"checkpoint {Path(entry.path)} does not name an epoch by {how}; pass the "
                "filepath given to ModelCheckpoint as pattern=, e.g. "
                "pattern='ckpt-{epoch:03d}.weights.h5', or move the file out of the folder."
            )
        if epoch in by_epoch:
            raise AdoptError(
                f"checkpoints {by_epoch[epoch].path.name} and {entry.name} in {src} are both "
                f"epoch {epoch}; keep one of them (or pass a pattern that tells them apart)."
            )
        by_epoch[epoch] = SourceCheckpoint(Path(entry.path), epoch)
    if not by_epoch:
        seen = f" (it holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
        raise AdoptError(
            f"source folder {src} holds no Keras checkpoint (*.weights.h5 or *.keras)"
            f"{seen if others else ''}; pass the folder given to ModelCheckpoint."
        )
    return [by_epoch[e] for e in sorted(by_epoch)]


# --------------------------------------------------------------------------- the log


def read_log(path: str | os.PathLike) -> dict[int, dict[str, float]]:
    """What Keras logged per epoch, from a ``CSVLogger`` file or a saved History JSON.

    A JSON file is ``json.dump(history.history)`` (``{"loss": [...], ...}``) or
    ``{"history": {...}, "epoch": [...]}`` (what ``history.write_json`` writes).

    Args:
        path: the ``.csv``/``.log`` file of ``CSVLogger``, or a ``.json`` file.

    Returns:
        ``{completed epochs: {key: value}}``: CSVLogger's 0-based ``epoch`` 0 is 1 here, as
        in the checkpoints' names.

    Raises:
        RunFormatError: the file cannot be read or parsed (the message names the line).
        AdoptError: an epoch appears twice, or a column is shorter than the others.

    Example:
        >>> read_log("training.log")[1]["val_loss"]
        0.9388
    """
    from trueloss_replay.history import read_csv, read_json

    path = Path(path)
    try:
        head = path.read_text(encoding="utf-8").lstrip()[:1]
    except (OSError, UnicodeDecodeError) as e:
        raise RunFormatError(f"log {path} cannot be read ({e}).") from e
    if head == "{":
        epochs, history = _read_json_log(path, read_json)
    else:
        logged = read_csv(path)
        epochs, history = logged.epoch, logged.history
    rows: dict[int, dict[str, float]] = {}
    for index, epoch in enumerate(epochs):
        if epoch + 1 in rows:
            raise AdoptError(
                f"log {path} has epoch {epoch} twice (CSVLogger(append=True) over two fits?); "
                "keep the rows of the fit that wrote the checkpoints."
            )
        # CSVLogger writes NA for a key not logged that epoch (validation_freq): absent, as in
        # the logs Keras gave a callback.
        rows[epoch + 1] = {
            key: float(values[index])
            for key, values in history.items()
            if not math.isnan(float(values[index]))
        }
    return rows


def _read_json_log(path: Path, read_json) -> tuple[list[int], dict[str, list[float]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise RunFormatError(f"log {path} is not valid JSON ({e}).") from e
    if isinstance(data, dict) and isinstance(data.get("history"), dict):
        logged = read_json(path)
        return logged.epoch, logged.history
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise RunFormatError(
            f'log {path} is not a saved History: expected {{"loss": [...], ...}} as '
            "json.dump(history.history) writes it, or a file of history.write_json."
        )
    lengths = {len(v) for v in data.values()}
    if len(lengths) > 1:
        raise AdoptError(
            f"log {path}: its keys have different lengths {sorted(lengths)}; every key needs "
            "one value per epoch."
        )
    try:
        history = {str(k): [runfmt.json_float(x) for x in v] for k, v in data.items()}
    except (TypeError, ValueError) as e:
        raise RunFormatError(f"log {path} holds a value that is not a number ({e}).") from e
    return list(range(lengths.pop() if lengths else 0)), history


# --------------------------------------------------------------------------- weights files


@contextlib.contextmanager
def _weights_file(path: Path) -> Iterator[h5py.File]:
    # A .keras archive stores its weights as model.weights.h5 (Keras' H5IOStore reads the
    # member in place, as here).
    if path.name.endswith(".keras"):
        with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as member:
            with h5py.File(member, "r") as f:
                yield f
    else:
        with h5py.File(path, "r") as f:
            yield f


def _layout(f: h5py.File) -> dict[str, tuple[int, ...]]:
    # The model's variables as Keras lays them out; the optimizer's slots are no concern.
    found: dict[str, tuple[int, ...]] = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and name.split("/", 1)[0] != "optimizer":
            found[name] = tuple(int(d) for d in obj.shape)

    f.visititems(visit)
    return found


def _optimizer_step(f: h5py.File) -> int | None:
    # Keras' optimizer keeps its iteration count as its first variable.
    iterations = f.get("optimizer/vars/0")
    if not isinstance(iterations, h5py.Dataset) or iterations.shape != ():
        return None
    if iterations.dtype.kind not in "iu":
        return None
    return int(iterations[()])


def _read_source(checkpoint: SourceCheckpoint) -> tuple[dict[str, tuple[int, ...]], int | None]:
    try:
        with _weights_file(checkpoint.path) as f:
            return _layout(f), _optimizer_step(f)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        kind = ".keras archive" if checkpoint.is_model else "Keras weights file"
        raise RunFormatError(
            f"checkpoint {checkpoint.path} cannot be read as a {kind} "
            f"({' '.join(str(e).split())}); it is damaged. Delete it or move it out of the "
            "folder."
        ) from e


def _check_layout(
    model, expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], path
) -> None:
    counts = f"(the model has {len(expected)} variables, the file {len(found)})"
    names = _entry_names(model)

    def describe(entry: str) -> str:
        return f"{names[entry][1]!r} ({entry})" if entry in names else repr(entry)

    # In the model's order, so that the first layer at fault is named.
    for entry in sorted(expected, key=lambda e: names.get(e, (len(names), ""))[0]):
        if entry not in found:
            raise CheckpointMismatchError(
                f"checkpoint {path} has no variable {describe(entry)} {counts}. Was it written "
                "by a different model?"
            )
        if found[entry] != expected[entry]:
            raise CheckpointMismatchError(
                f"checkpoint {path}: variable {describe(entry)} has shape {found[entry]}, the "
                f"model expects {expected[entry]}. Was it written by a different model?"
            )
    for entry in found:
        if entry not in expected:
            raise CheckpointMismatchError(
                f"checkpoint {path} has variable {entry!r}, which the model lacks {counts}. "
                "Was it written by a different model?"
            )


def _entry_names(model) -> dict[str, tuple[int, str]]:
    """``{"layers/dense_1/vars/0": (position, "sequential/dense_1/kernel")}``, for the
    variables of the model's own layers: Keras' weights file names a layer of a list by its
    class in snake case, made unique with _1, _2 ..., and its variables by position."""
    names: dict[str, tuple[int, str]] = {}
    used: dict[str, int] = {}
    for layer in getattr(model, "layers", []):
        base = _snake_case(type(layer).__name__)
        used[base] = used.get(base, -1) + 1
        name = base if used[base] == 0 else f"{base}_{used[base]}"
        if getattr(layer, "_layers", None):
            continue  # a layer of layers: its own variables are not all of its weights
        own = list(layer.trainable_weights) + list(layer.non_trainable_weights)
        for index, variable in enumerate(own):
            names[f"layers/{name}/vars/{index}"] = (len(names), variable.path)
    return names


def _snake_case(name: str) -> str:
    # As keras.src.utils.naming.to_snake_case names saved layers.
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _reference_layout(model, folder: Path) -> dict[str, tuple[int, ...]]:
    # The model's own weights file, as Keras writes it: what every checkpoint must match.
    path = folder / f".reference-{secrets.token_hex(4)}.weights.h5"
    try:
        model.save_weights(path)
        with h5py.File(path, "r") as f:
            return _layout(f)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def _load_into(model, checkpoint: SourceCheckpoint) -> list[tuple[str, np.ndarray]]:
    import keras

    try:
        with warnings.catch_warnings():
            # A compiled model's unbuilt optimizer skips the file's optimizer slots.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model.load_weights(checkpoint.path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointMismatchError(
            f"checkpoint {checkpoint.path} cannot be loaded into the model ({first[:300]}). "
            "Was it written by a different model?"
        ) from e
    return [
        (key, np.array(keras.ops.convert_to_numpy(v), copy=True))
        for key, v in zip(runfmt.weight_keys(model), model.weights, strict=True)
    ]


# --------------------------------------------------------------------------- the model


def _archive_compile_config(path: Path) -> dict[str, Any] | None:
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    compile_config = config.get("compile_config") if isinstance(config, dict) else None
    return compile_config if isinstance(compile_config, dict) else None


def _architecture(
    checkpoints: list[SourceCheckpoint],
    model: Callable | str | None,
    model_file: Path | None,
    unsafe: bool,
):
    """The model (uncompiled when read from a file) and its compile config."""
    from trueloss_replay.engine import build_model, load_model_file

    archives = [model_file] if model_file is not None else []
    archives += [c.path for c in reversed(checkpoints) if c.is_model]
    if model is not None:
        built = build_model(model)
        config = None
        if getattr(built, "compiled", False):
            with contextlib.suppress(Exception):
                config = built.get_compile_config()
        for archive in archives:
            config = config or _archive_compile_config(archive)
        if not config or not config.get("loss"):
            raise ModelLoadError(
                f"the model builder {model!r} returned a model compiled without a loss, and "
                "no .keras file says how it was compiled; compile the model in the builder as "
                "for training."
            )
        return built, config
    if not archives:
        raise ModelLoadError(
            f"the checkpoints in {checkpoints[0].path.parent} are weights only and no model "
            "architecture was given; pass model_file= (a .keras model saved with model.save) "
            "or model='module:function' (a builder)."
        )
    source = Path(archives[0])
    loaded = load_model_file(source, None, unsafe)  # a damaged archive is named first
    config = _archive_compile_config(source)
    if not config or not config.get("loss"):
        raise ModelLoadError(
            f"{source} was saved from a model compiled without a loss, so there is no loss to "
            "replay; pass model='module:function' returning the model compiled as for "
            "training."
        )
    return loaded, config


# --------------------------------------------------------------------------- adopt


def adopt(
    src: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    pattern: str | None = None,
    model: Callable | str | None = None,
    model_file: str | os.PathLike | None = None,
    data: str | None = None,
    train: Any = None,
    val: Any = None,
    log: str | os.PathLike | None = None,
    allow_gaps: bool = False,
    unsafe_deserialization: bool = False,
    imports: Iterable[str] = (),
) -> runfmt.Run:
    """Turns a folder of Keras ``ModelCheckpoint`` files into a run folder.

    Each checkpoint is read with Keras' own loader and written as a native checkpoint
    (weights only, no optimizer state), so ``replay``, ``history``, ``plot``, ``explain``,
    ``export`` and ``inspect`` treat the run as one ``ReplayCheckpoint`` wrote. The run is
    built in a hidden folder beside ``run_dir`` and renamed into place: on any error nothing
    is left behind.

    Args:
        src: the folder of ``*.weights.h5`` (``save_weights_only=True``) or ``*.keras``
            files of ``ModelCheckpoint``; one file per epoch.
        run_dir: the run folder to create; it must not exist or be empty.
        pattern: the ``filepath`` given to ``ModelCheckpoint``, e.g.
            ``"ckpt-{epoch:03d}.weights.h5"``; default: the first integer of each name.
        model: a builder (callable or ``"module:function"``) of the trained model, compiled
            as for training.
        model_file: a ``.keras`` file with the architecture and compile config (it may lie
            in ``src``: it is not taken for a checkpoint); default the newest ``.keras``
            checkpoint in ``src``.
        data: a ``"module:function"`` data factory, recorded for replay.
        train: training data: ``(x, y[, sample_weight])`` arrays or an ``.npz``/``.h5``
            path, snapshotted to ``data/train.h5``.
        val: validation data, the same kinds, to ``data/val.h5``.
        log: a ``CSVLogger`` file or a saved History JSON: what Keras reported, stored with
            each checkpoint as a native run stores it.
        allow_gaps: accept missing epochs (``save_best_only=True``, a checkpoint deleted);
            they are warned about. Default: missing epochs are an error.
        unsafe_deserialization: load ``.keras`` files with ``safe_mode=False`` (Lambda).
        imports: modules to import first (custom layers, losses, metrics).

    Returns:
        The new run, opened (``Run``).

    Raises:
        AdoptError: no checkpoint in ``src``, a name without an epoch, two files of one
            epoch, missing epochs (without ``allow_gaps``), a ``log`` whose epochs do not
            match the checkpoints', or both ``model`` and ``model_file``.
        CheckpointMismatchError: a checkpoint of another architecture (names the file and
            the variable).
        ModelLoadError: no architecture, or a model compiled without a loss.
        RunExistsError: ``run_dir`` is already a run folder, or holds other files.
        RunFormatError: a damaged checkpoint or an unreadable ``log``.
        DataError: ``data``, ``train`` or ``val`` is malformed.
        RunWriteError: ``run_dir`` cannot be written.

    Example:
        >>> run = adopt("ckpts", "runs/exp1", pattern="ckpt-{epoch:03d}.weights.h5",
        ...             model_file="ckpts/ckpt-003.keras", train="train.npz",
        ...             val="val.npz", log="training.log")
        >>> history = replay(run.path)
    """
    from trueloss_replay.backends import get_backend
    from trueloss_replay.engine import import_modules

    if model is not None and model_file is not None:
        raise AdoptError("pass model (a builder) or model_file (a .keras file), not both.")
    get_backend()  # an unsupported Keras backend is refused before any work
    url = next((p for p in (src, run_dir, model_file) if storage.is_url(p)), None)
    if url is not None:
        # The run is built in a staging folder and renamed into place: no upload happens.
        raise AdoptError(
            f"adopt reads and writes local folders only, not {os.fspath(url)!r}; adopt into a "
            "local folder, then copy the run folder to object storage.",
            usage=True,
        )
    run_dir = runfmt.local_path(run_dir)
    _check_target(run_dir)
    if model_file is not None:
        model_file = runfmt.local_path(model_file, "model file")
    checkpoints = find_checkpoints(src, pattern, exclude=[model_file] if model_file else [])
    logs = read_log(log) if log is not None else None
    _check_epochs(checkpoints, logs, Path(log) if log is not None else None, allow_gaps)
    splits = _splits(data, train, val)
    import_modules(imports)
    keras_model, compile_config = _architecture(
        checkpoints,
        model,
        model_file,
        unsafe_deserialization,
    )

    staging = run_dir.parent / f".{run_dir.name}.adopt-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        _build(staging, checkpoints, logs, keras_model, compile_config, data, splits, log)
        _move_into_place(staging, run_dir)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, TruelossReplayError):
            raise RunWriteError(
                f"could not write the run folder {run_dir} ({e.strerror or e}); nothing was "
                "left behind. Check that its parent folder is writable and has space."
            ) from e
        raise
    return runfmt.Run(run_dir)


def _check_target(run_dir: Path) -> None:
    if (run_dir / runfmt.MANIFEST).exists():
        raise RunExistsError(
            f"{run_dir} is already a run folder; adopt into a new folder (or delete that run "
            "first)."
        )
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise RunExistsError(
            f"{run_dir} already exists and is not an empty folder; adopt into a new folder."
        )


def _check_epochs(
    checkpoints: list[SourceCheckpoint],
    logs: Mapping[int, Mapping[str, float]] | None,
    log: Path | None,
    allow_gaps: bool,
) -> None:
    by_epoch = {c.epoch: c for c in checkpoints}
    if logs is not None:
        unlogged = [c for c in checkpoints if c.epoch >= 1 and c.epoch not in logs]
        if unlogged:
            c = unlogged[0]
            last = max(logs, default=0)
            raise AdoptError(
                f"log {log} has no row for epoch {c.epoch} (checkpoint {c.path.name}; "
                f"CSVLogger counts it as epoch {c.epoch - 1}); it logs {len(logs)} epoch(s) up "
                f"to {last}. Pass the log of the fit that wrote the checkpoints."
            )
    last = max([*by_epoch, *(logs or {})])
    missing = [e for e in range(1, last + 1) if e not in by_epoch]
    if not missing:
        return
    src = checkpoints[0].path.parent
    listed = _epoch_list(missing)
    if not allow_gaps:
        raise AdoptError(
            f"source folder {src} has no checkpoint for epoch(s) {listed} of 1-{last}; pass "
            "allow_gaps=True if the run saved only some epochs "
            "(save_best_only=True), or restore the missing files."
        )
    warnings.warn(
        f"trueloss-replay: source folder {src} has no checkpoint for epoch(s) {listed} of "
        f"1-{last}; the adopted run has none either.",
        stacklevel=3,
    )


def _epoch_list(epochs: list[int]) -> str:
    shown = ", ".join(str(e) for e in epochs[:10])
    return shown + (f" and {len(epochs) - 10} more" if len(epochs) > 10 else "")


def _splits(data: str | None, train: Any, val: Any) -> dict[str, Any]:
    from trueloss_replay.data import as_arrays, check_storable, load_arrays, validate_reference

    if data is not None:
        validate_reference(data)
    splits = {}
    for name, value in (("train", train), ("val", val)):
        if value is None:
            continue
        if isinstance(value, (str, os.PathLike)):
            arrays = load_arrays(value)
        else:
            arrays = as_arrays(value, name)
        check_storable(arrays, name)
        splits[name] = arrays
    return splits


def _build(
    folder: Path,
    checkpoints: list[SourceCheckpoint],
    logs: Mapping[int, Mapping[str, float]] | None,
    model,
    compile_config: Mapping[str, Any],
    data: str | None,
    splits: Mapping[str, Any],
    log: str | os.PathLike | None,
) -> None:
    from trueloss_replay.data import save_arrays

    model_rel = _save_model(model, folder)
    data_files = {}
    if splits:
        (folder / runfmt.DATA_DIR).mkdir()
    for name, arrays in splits.items():
        data_files[name] = f"{runfmt.DATA_DIR}/{name}.h5"
        save_arrays(folder / data_files[name], arrays)

    expected = _reference_layout(model, folder)
    (folder / runfmt.CHECKPOINT_DIR).mkdir()
    entries, steps = [], {}
    for checkpoint in checkpoints:
        found, step = _read_source(checkpoint)
        _check_layout(model, expected, found, checkpoint.path)
        weights = _load_into(model, checkpoint)
        name = runfmt.checkpoint_name(checkpoint.epoch)
        meta = {
            "epoch": checkpoint.epoch,
            "step": 0 if step is None else step,
            "time": checkpoint.path.stat().st_mtime,
            "logs": dict((logs or {}).get(checkpoint.epoch, {})),
        }
        runfmt.write_checkpoint(folder / runfmt.CHECKPOINT_DIR / name, weights, **meta)
        entries.append({"name": name, **meta, "logs": runfmt.to_jsonable(meta["logs"])})
        steps[checkpoint.epoch] = step

    params: dict[str, Any] = {"epochs": max(c.epoch for c in checkpoints)}
    per_epoch = _steps_per_epoch(steps)
    if per_epoch is not None:
        params["steps"] = per_epoch
    manifest = runfmt.new_manifest(
        model,
        model_file=model_rel,
        compile_config=compile_config,
        data=data,
        data_files=data_files,
        params=params,
        status="finished",
    )
    manifest["finished"] = time.time()
    manifest["checkpoints"] = entries
    manifest["adopted"] = {
        "files": {runfmt.checkpoint_name(c.epoch): c.path.name for c in checkpoints},
        "log": None if log is None else Path(log).name,
    }
    runfmt.atomic_write_json(folder / runfmt.MANIFEST, manifest)


def _steps_per_epoch(steps: Mapping[int, int | None]) -> int | None:
    # The optimizer's iteration count at the end of epoch k is k * steps per epoch.
    known = {e: s for e, s in steps.items() if e >= 1 and s is not None}
    if not known:
        return None
    per_epoch = {s / e for e, s in known.items()}
    value = per_epoch.pop()
    if per_epoch or value < 1 or not float(value).is_integer():
        return None
    return int(value)


def _save_model(model, folder: Path) -> str | None:
    target = folder / runfmt.MODEL_FILE
    try:
        with runfmt.atomic_path(target) as tmp:
            model.save(tmp)
    except RunWriteError:
        raise
    except Exception as e:  # noqa: BLE001 - any serialization failure means "no architecture"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        warnings.warn(
            f"trueloss-replay: the architecture of {type(model).__name__} cannot be saved to "
            f"model.keras ({first[:200]}); replay the adopted run with a model builder, "
            "model='module:function'.",
            stacklevel=4,
        )
        return None
    return runfmt.MODEL_FILE


def _move_into_place(staging: Path, run_dir: Path) -> None:
    # os.replace onto an empty folder replaces it; onto anything else it fails, so a folder
    # that filled up meanwhile is never merged into.
    try:
        os.replace(staging, run_dir)
    except OSError as e:
        raise RunExistsError(
            f"{run_dir} appeared while the run was being adopted and is not empty "
            f"({e.strerror or e}); nothing was written there. Adopt into a new folder."
        ) from e
    runfmt.fsync_dir(run_dir.parent)
