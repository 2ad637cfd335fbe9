"""One small module per Keras backend; everything above this package is backend-neutral.

A backend module owns what differs between TensorFlow and JAX: listing devices, placing data
and weights on a device, compiling the evaluation program (one step, and one program that
loops over batches stacked on the device), and recognising its runtime and out-of-memory
errors. The backend is Keras' own (``keras.backend.backend()``, i.e. ``KERAS_BACKEND``): a
run trained on one backend replays on another, since checkpoints hold plain arrays.

PyTorch is refused up front: its wheels bring the whole CUDA stack, too large for the
machines this project is tested on, so it is neither tested nor claimed.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from trueloss_replay.errors import BackendError

SUPPORTED = ("tensorflow", "jax")


def get_backend(name: str | None = None) -> ModuleType:
    """The backend module for ``name`` (default: the backend Keras runs on).

    Raises:
        BackendError: the backend is not TensorFlow or JAX.

    Example:
        >>> get_backend().NAME
        'tensorflow'
    """
    if name is None:
        import keras

        name = keras.backend.backend()
    if name not in SUPPORTED:
        raise BackendError(
            f"trueloss-replay runs on Keras' TensorFlow and JAX backends; Keras is on "
            f"{name!r}. Set KERAS_BACKEND=tensorflow or KERAS_BACKEND=jax (the weights are "
            "plain arrays: a run trained on any backend replays on these)."
        )
    return importlib.import_module(f"trueloss_replay.backends.{name}_backend")


def share_device_memory() -> bool:
    """Lets this process share its GPUs with another one (a training process it follows).

    By default JAX takes 75% of each GPU's memory when it starts its devices, and TensorFlow
    nearly all of it; a follower beside a training process would starve it. JAX gets
    ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (unless the variable is set already: the user's
    value wins), which it reads when it first starts its devices; TensorFlow gets memory
    growth on every GPU, which must be set before it starts them. Both then take memory as
    programs need it. Without a GPU nothing changes.

    Returns:
        True when the setting is in effect; False when the backend had already started its
        devices without it (with a warning when it has a GPU).

    Raises:
        BackendError: the backend is not TensorFlow or JAX.

    Example:
        >>> share_device_memory()  # before anything starts the devices
        True
    """
    return get_backend().share_device_memory()


def resolve_devices(spec: str = "auto") -> list[str]:
    """Device names of the current backend for ``devices``.

    ``auto``: every GPU, else the first CPU. ``cpu``: every (logical) CPU device. ``gpu``:
    every GPU (an error without one). ``0,1``: those GPUs. Full names (``/CPU:1``,
    ``cpu:1``) are taken as they are.

    Raises:
        DataError: a named device does not exist (the message lists those that do).
    """
    from trueloss_replay.errors import DataError

    backend = get_backend()
    gpus, cpus = backend.list_devices()
    spec = (spec or "auto").strip()
    if spec == "auto":
        return gpus or cpus[:1]
    if spec == "cpu":
        return cpus
    if spec == "gpu":
        if not gpus:
            raise DataError(
                f"{backend.DISPLAY_NAME} sees no GPU; use devices='cpu' or 'auto'.",
                usage=True,
                argument="devices",
            )
        return gpus
    chosen = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        short = f"gpu:{part}" if part.isdigit() else _short(part)
        matches = [d for d in gpus + cpus if _short(d) == short]
        if not matches:
            raise DataError(
                f"there is no device {part} (in devices={spec!r}); {backend.DISPLAY_NAME} sees "
                f"{', '.join(cpus + gpus)}.",
                usage=True,
                argument="devices",
            )
        chosen.append(matches[0])
    if not chosen:
        raise DataError(
            f"devices={spec!r} names no device; use auto, cpu, gpu or 0,1.",
            usage=True,
            argument="devices",
        )
    return chosen


def _short(name: str) -> str:
    """``/device:GPU:0``, ``/GPU:0``, ``gpu:0``, ``cuda:0`` all become ``gpu:0``."""
    short = name.lower().lstrip("/").split("device:")[-1]
    kind, _, index = short.partition(":")
    return f"{'gpu' if kind in ('cuda', 'rocm') else kind}:{index}"
