"""The TensorFlow backend: ``tf.device`` placement, ``tf.function`` programs, ``OpError``s.

The program that loops over batches is a ``tf.map_fn`` inside one ``tf.function``; with
``jit_compile=True`` XLA compiles the loop and its body into one program, so the batches
already on the device run without a Python call per batch.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

DISPLAY_NAME = "TensorFlow"
NAME = "tensorflow"


def version() -> str:
    import tensorflow as tf

    return tf.__version__


def share_device_memory() -> bool:
    """Memory growth on every GPU: TensorFlow then takes memory as it needs it, not all of it.

    Returns:
        False when TensorFlow had already started a GPU without memory growth.
    """
    import tensorflow as tf

    fixed = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # its devices are started: the setting can no longer change
            if not tf.config.experimental.get_memory_growth(gpu):
                fixed.append(gpu.name)
    if fixed:
        warnings.warn(
            f"trueloss-replay: TensorFlow had started {', '.join(fixed)} before following "
            "began, so it may hold most of their memory; a training process on the same GPU "
            "can run out. Call tf.config.experimental.set_memory_growth(gpu, True) before "
            "TensorFlow starts its GPUs, or set TF_FORCE_GPU_ALLOW_GROWTH=true.",
            stacklevel=3,
        )
    return not fixed


def list_devices() -> tuple[list[str], list[str]]:
    """``(gpus, cpus)`` as TensorFlow names them (``/device:GPU:0``)."""
    import tensorflow as tf

    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    return gpus, cpus


def default_device() -> str:
    gpus, cpus = list_devices()
    return (gpus or cpus)[0]


def device_scope(device: str | None):
    """A context in which new tensors and ops are placed on ``device``."""
    import tensorflow as tf

    return tf.device(device) if device else contextlib.nullcontext()


def to_device(value: Any, device: str | None) -> Any:
    """An array (or None) as a tensor on ``device``."""
    import tensorflow as tf

    if value is None:
        return None
    with device_scope(device):
        # tf.identity copies a tensor that lives elsewhere onto this device.
        return tf.identity(tf.convert_to_tensor(value))


def to_device_many(values: Sequence[Any], device: str | None) -> list[Any]:
    """Several arrays onto ``device`` (weights: one per variable)."""
    return [to_device(v, device) for v in values]


def to_host(tree: Any) -> Any:
    """Every tensor of a structure as numpy."""
    import numpy as np
    import tensorflow as tf

    return tf.nest.map_structure(np.asarray, tree)


def host_scope():
    """A context in which new tensors live in host memory (small bookkeeping ops)."""
    return device_scope("/CPU:0")


def compile_step(fn: Callable, jit: bool) -> Callable:
    """``fn`` as one graph (XLA-compiled when ``jit``), traced once per input shape."""
    import tensorflow as tf

    return tf.function(fn, jit_compile=jit, reduce_retracing=False, autograph=False)


def compile_loop(body: Callable, jit: bool, on_trace: Callable | None = None) -> Callable:
    """``program(params, stacked)``: ``body(params, batch)`` for each leading-axis slice of
    ``stacked``, its outputs stacked the same way, in one graph (one XLA program when ``jit``).

    ``stacked`` is a tuple whose items may be None (no sample weights): those stay None.
    """
    import tensorflow as tf

    def program(params, stacked):
        if on_trace is not None:
            on_trace()
        return _over_batches(body, params, stacked)

    return tf.function(program, jit_compile=jit, reduce_retracing=False, autograph=False)


def compile_stacked(
    body: Callable, jit: bool, loop: bool, on_trace: Callable | None = None
) -> Callable:
    """``program(stacked_params, data)``: the checkpoints' weights stacked on a leading axis,
    each evaluated in turn (``tf.map_fn``) on ``data``: the stacked batches when ``loop``
    (``body`` over them, as ``compile_loop``), else one batch. Outputs gain a leading
    checkpoint axis. Each checkpoint's computation is the one-checkpoint program's."""
    import tensorflow as tf

    def program(params, data):
        if on_trace is not None:
            on_trace()
        first = tf.nest.map_structure(lambda t: t[0], params)
        if loop:
            # The model is traced once for the output signature of a batch, and once inside
            # the loops (not once per nested map_fn and signature: tracing is most of the
            # time this program takes to build).
            batch = tuple(
                None if item is None else tf.nest.map_structure(lambda t: t[0], item)
                for item in data
            )
            per_batch = _spec(body(first, batch))
            batches = int(tf.nest.flatten([item for item in data if item is not None])[0].shape[0])

            def one(p):
                return _over_batches(body, p, data, per_batch)

            spec = tf.nest.map_structure(
                lambda s: tf.TensorSpec([batches, *s.shape], s.dtype), per_batch
            )
        else:
            spec = _spec(body(first, data))

            def one(p):
                return body(p, data)

        # One checkpoint at a time, also without XLA (map_fn runs up to 10 by default).
        return tf.map_fn(one, params, fn_output_signature=spec, parallel_iterations=1)

    return tf.function(program, jit_compile=jit, reduce_retracing=False, autograph=False)


def _over_batches(body: Callable, params: Any, stacked: tuple, spec: Any = None) -> Any:
    """``body(params, batch)`` for each leading-axis slice of ``stacked`` (None items stay
    None), outputs stacked; ``spec``: the output signature of one batch, when known."""
    import tensorflow as tf

    present = [i for i, item in enumerate(stacked) if item is not None]

    def one(elems):
        batch = [None] * len(stacked)
        for i, item in zip(present, elems, strict=True):
            batch[i] = item
        return body(params, tuple(batch))

    elems = tuple(stacked[i] for i in present)
    if spec is None:
        spec = _spec(one(tf.nest.map_structure(lambda t: t[0], elems)))
    return tf.map_fn(one, elems, fn_output_signature=spec)


def _spec(outputs: Any) -> Any:
    """The ``tf.TensorSpec`` structure of traced outputs."""
    import tensorflow as tf

    return tf.nest.map_structure(tf.TensorSpec.from_tensor, outputs)


def is_runtime_error(error: BaseException) -> bool:
    """An error raised while running a program (not while tracing it)."""
    import tensorflow as tf

    return isinstance(error, tf.errors.OpError)


def is_out_of_memory(error: BaseException) -> bool:
    text = " ".join(str(error).split())
    markers = ("ResourceExhausted", "OOM when allocating", "out of memory", "Dst tensor is not")
    return "ResourceExhausted" in type(error).__name__ or any(m in text for m in markers)


def is_compile_failure(error: BaseException) -> bool:
    """XLA cannot compile the program (an op without an XLA kernel); a plain graph can."""
    text = str(error)
    return any(s in text for s in ("XLA", "xla", "jit_compile", "Compilation failure", "tf2xla"))
