"""The JAX backend: ``jax.device_put`` placement, ``jax.jit`` programs, XLA runtime errors.

The program that loops over batches is ``jax.lax.map`` inside one ``jax.jit``: one XLA
program runs every batch already on the device, without a Python call per batch. A jitted
function runs on the device its (committed) arguments live on, so placing the data and the
weights with ``device_put`` is what picks the device.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

DISPLAY_NAME = "JAX"
NAME = "jax"


def version() -> str:
    import jax

    return jax.__version__


PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"


def share_device_memory() -> bool:
    """``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless set: JAX reads it when it creates its
    GPU client, i.e. when something first asks for a device (importing JAX does not).

    Returns:
        False when JAX had already started its devices with preallocation on.
    """
    was_set = os.environ.get(PREALLOCATE)
    os.environ.setdefault(PREALLOCATE, "false")
    if not _started() or was_set in ("false", "False", "0"):
        return True
    import jax

    if any(d.platform == "gpu" for d in jax.devices()):
        warnings.warn(
            f"trueloss-replay: JAX had started its GPUs before following began, so it may "
            f"hold most of their memory; a training process on the same GPU can run out. Set "
            f"{PREALLOCATE}=false before JAX starts (before the first jax.devices() call).",
            stacklevel=3,
        )
    return False


def _started() -> bool:
    """Whether JAX has created its device clients (after which the variable is not read)."""
    try:
        from jax._src.xla_bridge import backends_are_initialized
    except ImportError:  # a JAX without it: assume the worst
        return True
    return backends_are_initialized()


@functools.cache
def _devices() -> dict[str, Any]:
    import jax

    found = {}
    for platform in ("gpu", "cpu"):
        with contextlib.suppress(RuntimeError):  # no such platform in this jaxlib
            for d in jax.devices(platform):
                found[f"{'gpu' if platform == 'gpu' else 'cpu'}:{d.id}"] = d
    return found


def list_devices() -> tuple[list[str], list[str]]:
    """``(gpus, cpus)`` named ``gpu:0``, ``cpu:0``, ..."""
    names = list(_devices())
    return [n for n in names if n.startswith("gpu")], [n for n in names if n.startswith("cpu")]


def default_device() -> str:
    gpus, cpus = list_devices()
    return (gpus or cpus)[0]


def device_scope(device: str | None):
    """A context in which new arrays are placed on ``device`` (``jax.default_device``)."""
    import jax

    if not device:
        return contextlib.nullcontext()
    return jax.default_device(_devices()[device])


def to_device(value: Any, device: str | None) -> Any:
    """An array (or None) as a JAX array committed to ``device``."""
    import jax
    import numpy as np

    if value is None:
        return None
    if not isinstance(value, jax.Array):
        value = np.asarray(value)  # tf.data tensors and the like
    return jax.device_put(value, _devices()[device] if device else None)


def to_device_many(values: Sequence[Any], device: str | None) -> list[Any]:
    """Several arrays onto ``device`` in one transfer call (weights: one per variable)."""
    import jax
    import numpy as np

    target = _devices()[device] if device else jax.devices()[0]
    # On a CPU device, device_put may alias the numpy buffer: copy, so that the caller's
    # arrays (a checkpoint just read) are not kept alive by what is staged.
    host = target.platform == "cpu"
    arrays = [
        v if isinstance(v, jax.Array) else np.array(v, copy=True) if host else np.asarray(v)
        for v in values
    ]
    return list(jax.device_put(arrays, target))


def to_host(tree: Any) -> Any:
    """Every array of a structure as numpy, fetched in one call (one wait for the device)."""
    import jax

    return jax.device_get(tree)


def host_scope():
    """A context in which new arrays live in host memory (small bookkeeping ops)."""
    import jax

    return jax.default_device(jax.devices("cpu")[0])


def compile_step(fn: Callable, jit: bool) -> Callable:
    """``fn`` jitted; JAX has no plain graph, so ``jit`` is always honoured as True."""
    import jax

    return jax.jit(fn)


def compile_loop(body: Callable, jit: bool, on_trace: Callable | None = None) -> Callable:
    """``program(params, stacked)``: ``body(params, batch)`` over the leading axis of
    ``stacked`` (``jax.lax.map``), outputs stacked the same way, in one jitted program."""
    import jax

    def program(params, stacked):
        if on_trace is not None:
            on_trace()
        return jax.lax.map(lambda batch: body(params, batch), stacked)

    return jax.jit(program)


def compile_stacked(
    body: Callable, jit: bool, loop: bool, on_trace: Callable | None = None
) -> Callable:
    """``program(stacked_params, data)``: the checkpoints' weights stacked on a leading axis,
    each evaluated in turn (``jax.lax.map``) on ``data``: the stacked batches when ``loop``
    (``body`` over them, as ``compile_loop``), else one batch. Outputs gain a leading
    checkpoint axis. Each checkpoint's computation is the one-checkpoint program's."""
    import jax

    def program(params, data):
        if on_trace is not None:
            on_trace()

        def one(p):
            if loop:
                return jax.lax.map(lambda batch: body(p, batch), data)
            return body(p, data)

        return jax.lax.map(one, params)

    return jax.jit(program)


def is_runtime_error(error: BaseException) -> bool:
    """An error raised while running a program (not while tracing it)."""
    try:
        from jax.errors import JaxRuntimeError as runtime
    except ImportError:  # older JAX
        from jaxlib.xla_extension import XlaRuntimeError as runtime
    return isinstance(error, runtime)


def is_out_of_memory(error: BaseException) -> bool:
    text = " ".join(str(error).split())
    return any(m in text for m in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory"))


def is_compile_failure(error: BaseException) -> bool:
    return False  # no fallback to offer: every JAX program is XLA
