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
            "'my_project.data:load'."
        )
    return reference


def import_reference(reference: str, what: str = "data") -> Any:
    """Imports ``module:function`` with the current directory on the import path.

    Raises:
        DataError: the form is wrong, the module cannot be imported, or has no such name.
    """
    validate_reference(reference, what)
    module_name, _, attr = reference.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        # As uvicorn and gunicorn do: a module beside the user is importable.
        sys.path.insert(0, cwd)
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise DataError(
            f"cannot import module {module_name!r} for {what}={reference!r} ({e}); searched "
            f"the current directory {cwd} and the Python path."
        ) from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise DataError(
                f"module {module_name!r} has no attribute {attr!r} ({what}={reference!r})."
            ) from e
    return obj


def flatten(value: Any) -> list[np.ndarray]:
    """The arrays of a structure as ``as_arrays`` returns it, in a fixed order."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [a for key in sorted(value) for a in flatten(value[key])]
    if isinstance(value, list):
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
