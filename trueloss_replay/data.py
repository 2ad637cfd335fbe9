"""Data sources for replay: arrays, files, factories, tf.data, PyDataset.

Everything here ends in the same shape: a ``Split`` that yields finite, deterministic
``(x, y, sample_weight)`` batches at any batch size. Arrays are the common case and the fast
one; a ``tf.data.Dataset`` or ``PyDataset`` is iterated as it comes, one pass per evaluation.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from trueloss_replay.errors import DataError
from trueloss_replay.run import atomic_path

_PARTS = ("x", "y", "sample_weight")


# --------------------------------------------------------------------------- array files


def _normalize_tuple(data: Any, what: str) -> tuple[Any, Any, Any]:
    if isinstance(data, Mapping) and "x" in data:
        return data["x"], data.get("y"), data.get("sample_weight")
    if isinstance(data, (tuple, list)) and len(data) in (2, 3):
        x, y = data[0], data[1]
        return x, y, data[2] if len(data) == 3 else None
    raise DataError(
        f"{what}: expected an (x, y) or (x, y, sample_weight) tuple of arrays, got "
        f"{type(data).__name__}."
    )


def _as_structure(value: Any, what: str) -> Any:
    """Arrays, or dicts/lists of arrays, as numpy."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {str(k): _as_structure(v, f"{what}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)) and value and not np.isscalar(value[0]):
        return [_as_structure(v, f"{what}[{i}]") for i, v in enumerate(value)]
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as e:
        raise DataError(f"{what} cannot be turned into a numpy array ({e}).") from e


def as_arrays(data: Any, what: str) -> tuple[Any, Any, Any]:
    """``(x, y, sample_weight)`` as numpy structures, from a tuple or an ``{"x":...}`` dict.

    Raises:
        DataError: ``data`` is not an (x, y[, sample_weight]) tuple.
    """
    x, y, sw = _normalize_tuple(data, what)
    return (
        _as_structure(x, f"{what} x"),
        _as_structure(y, f"{what} y"),
        _as_structure(sw, f"{what} sample_weight"),
    )


def check_storable(arrays: tuple[Any, Any, Any], what: str) -> None:
    """Raises ``DataError`` when a split holds arrays HDF5 cannot store (text, objects)."""
    for part, value in zip(_PARTS, arrays, strict=True):
        for array in flatten(value):
            if array.dtype.kind in "UOV":
                raise DataError(
                    f"{what} {part} has dtype {array.dtype}, which the run folder's HDF5 "
                    "snapshot cannot store; pass data='module:function' (a factory that "
                    "returns the data at replay time) instead."
                )


def save_arrays(path: str | os.PathLike, data: Any) -> None:
    """Writes an ``(x, y[, sample_weight])`` split to an HDF5 file atomically.

    Dicts and lists of arrays (multi-input or multi-output models) become groups.
    """
    x, y, sw = as_arrays(data, str(path))
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, value in zip(_PARTS, (x, y, sw), strict=True):
                if value is not None:
                    _write_structure(f, name, value)


def _write_structure(parent: h5py.Group, name: str, value: Any) -> None:
    if isinstance(value, dict):
        group = parent.create_group(name)
        group.attrs["kind"] = "dict"
        for key, item in value.items():
            _write_structure(group, key, item)
    elif isinstance(value, list):
        group = parent.create_group(name)
        group.attrs["kind"] = "list"
        for i, item in enumerate(value):
            _write_structure(group, str(i), item)
    else:
        parent.create_dataset(name, data=value)


def _read_structure(obj: h5py.Group | h5py.Dataset) -> Any:
    if isinstance(obj, h5py.Dataset):
        return obj[()]
    items = {key: _read_structure(obj[key]) for key in obj}
    if obj.attrs.get("kind") == "list":
        return [items[str(i)] for i in range(len(items))]
    return items


def load_arrays(path: str | os.PathLike) -> tuple[Any, Any, Any]:
    """Reads ``(x, y, sample_weight)`` from an ``.h5`` or ``.npz`` file.

    Both hold the datasets ``x``, ``y`` and optionally ``sample_weight``; for several inputs
    or outputs, ``x/<name>`` (a group in HDF5, a ``x/<name>`` key in npz; all-digit names
    make a list).

    Raises:
        DataError: the file is missing, unreadable, or lacks ``x`` or ``y``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist.")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                flat = {key: npz[key] for key in npz.files}
            parts = {name: _unflatten(flat, name) for name in _PARTS}
        else:
            with h5py.File(path, "r") as f:
                parts = {name: _read_structure(f[name]) if name in f else None for name in _PARTS}
    except (OSError, ValueError) as e:
        raise DataError(f"data file {path} cannot be read ({e}). Expected .npz or .h5.") from e
    for name in ("x", "y"):
        if parts[name] is None:
            raise DataError(
                f"data file {path} has no {name!r}; it needs arrays named 'x' and 'y' "
                "(and optionally 'sample_weight')."
            )
    return parts["x"], parts["y"], parts["sample_weight"]


def _unflatten(flat: dict[str, np.ndarray], name: str) -> Any:
    if name in flat:
        return flat[name]
    prefix = name + "/"
    items = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
    if not items:
        return None
    if all(k.isdigit() for k in items):
        return [items[str(i)] for i in range(len(items))]
    return items


# --------------------------------------------------------------------------- factories


def validate_reference(reference: str, what: str = "data") -> str:
    """Checks the ``module:function`` form without importing anything."""
    module, sep, attr = reference.partition(":")
    valid = sep and all(p.isidentifier() for p in module.split(".")) and attr
    if not valid or not all(p.isidentifier() for p in attr.split(".")):
        raise DataError(
            f"{what}={reference!r} is not a 'module:function' reference, e.g. "
            "'my_project.data:load'.",
            usage=True,
            argument=what,
        )
    return reference


def put_cwd_on_path() -> str:
    """Puts the current directory first on ``sys.path``, as uvicorn and gunicorn do, so that
    a module beside the user is importable even from an installed console script."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    return cwd


def import_reference(reference: str, what: str = "data") -> Any:
    """Imports ``module:function`` with the current directory on the import path.

    Raises:
        DataError: the form is wrong, the module cannot be imported, or has no such name.
    """
    validate_reference(reference, what)
    module_name, _, attr = reference.partition(":")
    cwd = put_cwd_on_path()
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise DataError(
            f"cannot import module {module_name!r} for {what}={reference!r} ({e}); searched "
            f"the current directory {cwd} and the Python path.",
            argument=what,
        ) from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise DataError(
                f"module {module_name!r} has no attribute {attr!r} ({what}={reference!r}).",
                argument=what,
            ) from e
    return obj


def flatten(value: Any) -> list[np.ndarray]:
    """The arrays of a structure as ``as_arrays`` returns it, in a fixed order."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [a for key in sorted(value) for a in flatten(value[key])]
    if isinstance(value, (list, tuple)):
        return [a for item in value for a in flatten(item)]
    return [value]


def fingerprint_arrays(x: Any, y: Any, sw: Any) -> dict[str, Any]:
    """Count, shapes, dtypes and a hash of a few examples: enough to tell two data sets apart."""
    leaves = [a for part in (x, y, sw) for a in flatten(part)]
    count = int(len(leaves[0])) if leaves else 0
    digest = hashlib.sha256()
    picks = np.unique(np.linspace(0, max(count - 1, 0), num=min(count, 16)).astype(int))
    for leaf in leaves:
        digest.update(np.ascontiguousarray(leaf[picks]).tobytes())
    return {
        "count": count,
        "shapes": [list(a.shape[1:]) for a in leaves],
        "dtypes": [str(a.dtype) for a in leaves],
        "hash": digest.hexdigest()[:16],
    }


# --------------------------------------------------------------------------- splits


class Split:
    """One evaluation set (``train`` or ``val``) that yields finite ``(x, y, sw)`` batches.

    Attributes:
        name: ``"train"`` or ``"val"``.
        fingerprint: count, shapes, dtypes and a hash of a few examples (see
            ``fingerprint_arrays``); results record it so that a change of data is noticed.
    """

    name: str
    fingerprint: dict[str, Any]

    def batches(self, batch_size: int):
        """Yields ``(x, y, sample_weight)``; ``sample_weight`` may be None."""
        raise NotImplementedError

    def num_batches(self, batch_size: int) -> int | None:
        raise NotImplementedError


class ArraySplit(Split):
    """In-memory arrays: sliced into batches of any size; the fast path."""

    def __init__(self, name: str, x: Any, y: Any, sample_weight: Any = None):
        self.name = name
        self.x, self.y, self.sample_weight = x, y, sample_weight
        if y is None:
            raise DataError(
                f"{name} data has no targets (y); replay needs (x, y) to compute a loss."
            )
        lengths = {len(a) for a in flatten(x) + flatten(y) + flatten(sample_weight)}
        if len(lengths) != 1:
            raise DataError(
                f"{name} data: x, y and sample_weight have different numbers of examples "
                f"({sorted(lengths)}); they must all have the same first dimension."
            )
        self.count = lengths.pop()
        self.nbytes = sum(a.nbytes for a in flatten(x) + flatten(y) + flatten(sample_weight))
        if self.count == 0:
            raise DataError(f"{name} data is empty; replay needs at least one example.")
        self.fingerprint = {"kind": "arrays", **fingerprint_arrays(x, y, sample_weight)}

    def num_batches(self, batch_size: int) -> int:
        return -(-self.count // batch_size)

    def batches(self, batch_size: int):
        for start in range(0, self.count, batch_size):
            part = slice(start, start + batch_size)
            yield tuple(take(v, part) for v in (self.x, self.y, self.sample_weight))


def map_structure(fn: Any, value: Any) -> Any:
    """``fn`` applied to every array of a structure (arrays, dicts, lists, tuples; None kept)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: map_structure(fn, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_structure(fn, v) for v in value)
    return fn(value)


def take(value: Any, index: Any) -> Any:
    """``value[index]`` for every array of a structure."""
    return map_structure(lambda array: array[index], value)


def batch_length(x: Any) -> int:
    """The number of examples in a batch of inputs (an array, or a dict or list of them)."""
    while isinstance(x, (dict, list, tuple)):
        x = next(iter(x.values())) if isinstance(x, dict) else x[0]
    return int(x.shape[0])


def _to_numpy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _to_numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_numpy(v) for v in value]
    return np.asarray(value)


def _unpack(element: Any, name: str) -> tuple[Any, Any, Any]:
    if isinstance(element, (tuple, list)) and len(element) in (2, 3):
        return element[0], element[1], element[2] if len(element) == 3 else None
    raise DataError(
        f"{name} data yields elements without targets ({type(element).__name__}); each batch "
        "must be (x, y) or (x, y, sample_weight)."
    )


class DatasetSplit(Split):
    """A finite, batched ``tf.data.Dataset``, iterated as it is (its own batch size)."""

    def __init__(self, name: str, dataset: Any):
        import tensorflow as tf

        self.name = name
        self.dataset = dataset
        cardinality = int(dataset.cardinality())
        if cardinality == int(tf.data.INFINITE_CARDINALITY):
            raise DataError(
                f"{name} data is an infinite tf.data.Dataset (it repeats); replay needs one "
                "finite pass: drop .repeat() or add .take(steps)."
            )
        if cardinality == 0:
            raise DataError(f"{name} data is an empty tf.data.Dataset.")
        self.cardinality = cardinality
        first = next(iter(dataset), None)
        if first is None:
            raise DataError(f"{name} data is an empty tf.data.Dataset.")
        arrays = [None if a is None else _to_numpy(a) for a in _unpack(first, name)]
        self.fingerprint = {
            "kind": "tf.data",
            "cardinality": cardinality,
            "element_spec": str(dataset.element_spec),
            **{k: v for k, v in fingerprint_arrays(*arrays).items() if k != "count"},
        }

    def num_batches(self, batch_size: int) -> int | None:
        return self.cardinality if self.cardinality >= 0 else None

    def batches(self, batch_size: int):
        for element in self.dataset:
            yield _unpack(element, self.name)


class PyDatasetSplit(Split):
    """A ``keras.utils.PyDataset`` (or any ``Sequence`` of batches), read in order."""

    def __init__(self, name: str, dataset: Any):
        self.name = name
        self.dataset = dataset
        try:
            length = len(dataset)
        except TypeError as e:
            raise DataError(
                f"{name} data is a PyDataset without a length (infinite); replay needs a "
                "finite PyDataset with __len__."
            ) from e
        if length == 0:
            raise DataError(f"{name} data is an empty PyDataset.")
        self.length = length
        arrays = [None if a is None else _to_numpy(a) for a in _unpack(dataset[0], name)]
        self.fingerprint = {
            "kind": "PyDataset",
            "batches": length,
            **{k: v for k, v in fingerprint_arrays(*arrays).items() if k != "count"},
        }

    def num_batches(self, batch_size: int) -> int:
        return self.length

    def batches(self, batch_size: int):
        for i in range(self.length):
            yield _unpack(self.dataset[i], self.name)


def make_split(name: str, source: Any) -> Split:
    """A ``Split`` from arrays, an ``(x, y[, sw])`` tuple, a file path, a ``tf.data.Dataset`` or a
    ``PyDataset``.

    Raises:
        DataError: the source is of an unknown kind, infinite, empty, or lacks targets.
    """
    if isinstance(source, Split):
        return source
    if isinstance(source, (str, os.PathLike)):
        return ArraySplit(name, *load_arrays(source))
    module = type(source).__module__
    if module.startswith("tensorflow") and hasattr(source, "element_spec"):
        return DatasetSplit(name, source)
    if (
        hasattr(source, "__getitem__")
        and hasattr(source, "__len__")
        and not isinstance(source, (tuple, list, dict))
    ):
        return PyDatasetSplit(name, source)
    return ArraySplit(name, *as_arrays(source, f"{name} data"))


def call_factory(reference: str) -> dict[str, Any]:
    """Imports and calls a ``module:function`` data factory: ``{"train": ..., "val": ...}``."""
    return _produce(import_reference(reference, "data"), reference)


def _produce(factory: Any, reference: str) -> dict[str, Any]:
    try:
        produced = factory()
    except Exception as e:
        raise DataError(f"data factory {reference} raised {type(e).__name__}: {e}") from e
    if isinstance(produced, Mapping) and "train" in produced:
        return {"train": produced["train"], "val": produced.get("val")}
    if isinstance(produced, (tuple, list)) and len(produced) == 2:
        return {"train": produced[0], "val": produced[1]}
    raise DataError(
        f"data factory {reference} returned {type(produced).__name__}; expected "
        '{"train": ..., "val": ...} or a (train, val) pair.'
    )


def resolve_splits(
    run: Any,
    *,
    data: str | None = None,
    train: Any = None,
    val: Any = None,
    trust_data_factory: bool = False,
) -> dict[str, Split]:
    """The data a replay evaluates. For each split on its own, the first that is given of:
    an explicit ``train``/``val`` (arrays, a file, a dataset), the ``module:function``
    factory (``data``, else the manifest's), the callback's snapshot in ``RUN_DIR/data/``.
    So ``--val other.npz`` alone keeps the recorded training data.

    The manifest's factory is code that a run folder names, and it is imported and called:
    it is refused when it resolves to the standard library or to an installed package
    (``check_recorded_factory``) unless ``trust_data_factory``. A factory passed as ``data``
    is the caller's own choice and is always called.

    Args:
        run: the opened ``run.Run``.
        data: a ``module:function`` factory; default the one recorded in the manifest.
        train: training data (arrays, an ``.npz``/``.h5`` path, a dataset).
        val: validation data, the same kinds.
        trust_data_factory: call the manifest's factory wherever it resolves.

    Returns:
        ``{"train": Split, "val": Split}`` (``val`` only when there is validation data).

    Raises:
        DataError: no training data can be found, a source is malformed, or the manifest's
            factory cannot be imported or is refused by the trust policy.

    Example:
        >>> splits = resolve_splits(Run("runs/exp1"), val="val.npz")
    """
    sources: dict[str, Any] = {
        split: run.resolve(rel) for split, rel in (run.manifest.get("data_files") or {}).items()
    }
    reference = data or run.manifest.get("data")
    if reference and (train is None or val is None):
        if data:
            produced = call_factory(reference)
        else:
            produced = _call_recorded_factory(run, reference, trust_data_factory)
        sources.update({name: s for name, s in produced.items() if s is not None})
    sources.update({name: s for name, s in (("train", train), ("val", val)) if s is not None})
    if sources.get("train") is None:
        raise DataError(
            f"no training data for run {run.path}: pass data='module:function' or train= "
            "(arrays or a file), or give ReplayCheckpoint(data=...) or train_data= when "
            "training."
        )
    return {name: make_split(name, sources[name]) for name in ("train", "val") if name in sources}


def _call_recorded_factory(run: Any, reference: str, trusted: bool) -> dict[str, Any]:
    manifest = run.path / "manifest.json"
    instead = "pass the data yourself: data='module:function', or train= and val= (arrays or files)"
    if not trusted:
        check_recorded_factory(reference, manifest)
    try:
        factory = import_reference(reference, "data")
    except DataError as e:
        raise DataError(
            f"the data factory {reference!r} recorded in {manifest} cannot be used: "
            f"{str(e).rstrip('.')}. Make its module importable here, or {instead}."
        ) from e
    return _produce(factory, reference)


def check_recorded_factory(reference: str, manifest: str | os.PathLike = "the manifest") -> None:
    """The trust policy for a data factory that a run folder names (``manifest.json``).

    A run folder may come from anywhere, and its factory is imported and called on replay:
    one naming ``os:abort``, ``shutil:rmtree`` or any function of an installed package would
    run it. So a recorded factory must resolve to a module of the user's own (beside the
    run, on the Python path, not installed into the environment); one that resolves to the
    standard library or to an installed package (under ``site-packages`` /
    ``dist-packages``) is refused. The module's location is looked up without importing it.

    Args:
        reference: the ``module:function`` reference from the manifest.
        manifest: the manifest's path, for the message.

    Raises:
        DataError: the factory resolves to the standard library or an installed package.

    Example:
        >>> check_recorded_factory("os:getcwd", "runs/exp1/manifest.json")
        Traceback (most recent call last):
        DataError: the data factory 'os:getcwd' recorded in runs/exp1/manifest.json ...
    """
    module = reference.partition(":")[0]
    where = _module_home(module.split(".")[0])
    if where is None:
        return
    raise DataError(
        f"the data factory {reference!r} recorded in {manifest} resolves to {where}; a run "
        "folder from elsewhere could name any function there (os:abort), so it is not "
        "called. If you trust this run folder, pass trust_data_factory=True; or pass the "
        "factory yourself as data='module:function'."
    )


def _module_home(top: str) -> str | None:
    """'the standard library', 'the installed package X', or None for the user's own code."""
    import importlib.util
    import sysconfig

    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return "the standard library"
    put_cwd_on_path()  # where import_reference will look
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None  # import_reference reports it
    if spec is None:
        return None
    if spec.origin in ("built-in", "frozen"):
        return "the standard library"
    locations = [spec.origin] if spec.origin else []
    locations += list(spec.submodule_search_locations or [])
    stdlib = {
        Path(sysconfig.get_paths()[key]).resolve()
        for key in ("stdlib", "platstdlib")
        if sysconfig.get_paths().get(key)
    }
    for location in locations:
        path = Path(location).resolve()
        if {"site-packages", "dist-packages"} & set(path.parts):
            return f"the installed package {top!r}"
        if any(path.is_relative_to(folder) for folder in stdlib):
            return "the standard library"
    return None
