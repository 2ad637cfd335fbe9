"""The replay engine: one model, many checkpoints, exact inference-mode figures.

The model is built and compiled once per device, and one evaluation step is traced once per
device and input shape; each checkpoint only swaps the weights into the same variables. The
main batch shape is XLA-compiled; the other shapes (a split's last batch) run in a plain
graph, because one more XLA compilation costs more than it saves on a single batch.
Checkpoints go one at a time (the next one is read from disk meanwhile), or, in data-major
mode, several per produced batch so that an expensive input pipeline runs once for them all.

Exactness. Keras' ``evaluate()`` reports ``loss`` as the batch-size-weighted mean of the
per-batch ``compute_loss``, which is the compiled loss (loss weights, sample weights, one term
per output) plus every entry of ``model.losses``. The step below computes the two parts
separately with Keras' own objects (``CompileLoss``, ``CompileMetrics``, the model's
``_aggregate_additional_loss``), returns per-batch values, and the host sums them in float64.
Metric states are reset before each batch and their per-batch values summed on the host; the
summed state is then written back and Keras' own ``result()`` turns it into the figure. This
assumes additive metric states, which holds for every built-in Keras metric (sums, counts and
confusion matrices). The figures do not depend on the evaluation batch size, up to float32
rounding within a batch.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from trueloss_replay import run as runfmt
from trueloss_replay.data import (
    ArraySplit,
    Split,
    batch_length,
    flatten,
    import_reference,
    map_structure,
    put_cwd_on_path,
    resolve_splits,
    take,
)
from trueloss_replay.errors import (
    DataError,
    EvaluationError,
    ModelLoadError,
    ReplayIncompleteError,
    RunFormatError,
    TruelossReplayError,
)

DEFAULT_BATCH_SIZE = 2048
# Array data up to this size is kept on each device for the whole replay; larger data is
# streamed from host memory batch by batch.
DEVICE_CACHE_BYTES = 2 * 1024**3
# Data-major mode stages up to this many bytes of weights (several checkpoints) on a device,
# and at most this many checkpoints per produced batch.
DATA_MAJOR_BYTES = 256 * 1024**2
DATA_MAJOR_MAX_GROUP = 16


# --------------------------------------------------------------------------- model


def import_modules(modules: Iterable[str]) -> None:
    """Imports modules that register custom layers, losses or metrics (``--import``)."""
    modules = list(modules)
    cwd = put_cwd_on_path() if modules else None
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ModelLoadError(
                f"cannot import module {name!r} given with --import ({e}); searched the "
                f"current directory {cwd} and the Python path."
            ) from e


def load_model(run: runfmt.Run, builder: Callable | str | None = None, unsafe: bool = False):
    """The run's model, compiled as it was for training.

    Args:
        run: the opened run folder.
        builder: a callable (or ``module:function``) returning the model, for runs whose
            architecture could not be saved; compiled from the manifest when it is not.
        unsafe: load ``model.keras`` with ``safe_mode=False`` (Lambda layers need it).

    Raises:
        ModelLoadError: no architecture and no builder, an unsafe layer without ``unsafe``,
            an unregistered custom object, or an uncompiled model.
    """
    import keras

    if builder is not None:
        if isinstance(builder, str):
            try:
                builder = import_reference(builder, "--model")
            except DataError as e:
                raise ModelLoadError(str(e)) from e
        model = builder()
        if not getattr(model, "compiled", False):
            config = run.manifest.get("compile")
            if not config:
                raise ModelLoadError(
                    f"the model builder returned an uncompiled model and {run.path} records "
                    "no compile config; compile the model in the builder."
                )
            model.compile_from_config(config)
        return model
    path = run.model_path
    if path is None:
        raise ModelLoadError(
            f"run {run.path} has no saved architecture (the model could not be serialized); "
            "pass a builder: --model MODULE:FUNCTION returning the model."
        )
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; pass --model MODULE:FUNCTION instead.")
    config = run.manifest.get("compile")
    if not config or not config.get("loss"):
        raise ModelLoadError(
            f"{run.path / runfmt.MANIFEST} records no compiled loss (the model was compiled "
            "without one); there is no loss to replay."
        )
    try:
        # compile=False, then the manifest's compile config: the optimizer's saved state is
        # of no use here, and loading it only warns about mismatched variables.
        model = keras.saving.load_model(path, safe_mode=not unsafe, compile=False)
        model.compile_from_config(config)
    except Exception as e:  # noqa: BLE001 - Keras raises bare ValueError/TypeError here
        raise ModelLoadError(_explain_load_error(path, e)) from e
    return model


def _explain_load_error(path: Path, error: Exception) -> str:
    text = str(error)
    if "safe_mode" in text or "unsafe" in text.lower():
        return (
            f"{path} contains a layer that can run arbitrary code (e.g. Lambda); loading it "
            "needs --unsafe-deserialization (only for run folders you trust)."
        )
    missing = _unregistered_objects(path)
    if missing:
        return (
            f"{path} uses the custom object {missing[0]!r}, which is not registered in this "
            "process; pass --import MODULE for the module that defines it (decorated with "
            "@keras.saving.register_keras_serializable)."
        )
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return f"cannot load the model from {path}: {first[:300]}"


def _unregistered_objects(path: Path) -> list[str]:
    """The ``registered_name``s in a .keras file's config that Keras cannot resolve now."""
    import zipfile

    import keras

    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return []
    names: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            name = node.get("registered_name")
            # Custom objects register as "package>Name"; built-ins carry bare names.
            custom = isinstance(name, str) and ">" in name
            if custom and keras.saving.get_registered_object(name) is None:
                names.append(name)
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(config)
    return names


# --------------------------------------------------------------------------- evaluator


class Evaluator:
    """Evaluates one compiled model at many weights, on one device.

    Args:
        model: a compiled Keras model (built or buildable on the first batch).
        device: a TensorFlow device name, e.g. ``/CPU:0`` or ``/GPU:1``.
        jit_compile: XLA-compile the step (None: try XLA, fall back without it).

    Attributes:
        traces: how many times the step function was traced (once per input shape).
    """

    def __init__(self, model, device: str = "/CPU:0", jit_compile: bool | None = None):
        self.model = model
        self.device = device
        self.jit_compile = jit_compile
        self.traces = 0
        self._step = None
        self._built = False
        self._tracked: list[Any] = []
        self._state: list[Any] = []
        self._device_data: dict[str, Any] = {}
        self._succeeded = False

    # --- public

    def load(self, weights: dict[str, np.ndarray], source: str) -> None:
        """Assigns a checkpoint's weights (already read) to the model's variables."""
        runfmt.load_weights(self.model, weights, source)

    def evaluate(
        self, split: Split, batch_size: int, on_batch: Callable[[int], None] | None = None
    ):
        """The split's figures at the current weights.

        Returns:
            ``{"loss": data loss, "regularization_loss": ..., <metric>: ...}`` and the count.
        """
        return self.evaluate_many(split, batch_size, [None], on_batch)[0]

    def stage(self, weights: dict[str, np.ndarray], source: str) -> list[Any]:
        """A checkpoint's weights as tensors on this device, for ``evaluate_many``.

        Raises:
            CheckpointMismatchError: the weights do not fit the model.
        """
        import tensorflow as tf

        arrays = runfmt.match_weights(self.model, weights, source)
        with tf.device(self.device):
            return [
                tf.convert_to_tensor(a.astype(v.dtype, copy=False))
                for a, v in zip(arrays, self.model.weights, strict=True)
            ]

    def evaluate_many(
        self,
        split: Split,
        batch_size: int,
        weight_sets: Sequence[list[Any] | None],
        on_batch: Callable[[int], None] | None = None,
    ) -> list[tuple[dict[str, float], int]]:
        """Data-major evaluation: each batch is produced once and evaluated at every weight set.

        For input pipelines that cost more than the model (a ``tf.data`` map that decodes,
        a ``PyDataset`` that reads files): the batches of one pass serve several checkpoints,
        whose weights are swapped into the model's variables (a copy on the device) batch by
        batch. The figures are those ``evaluate`` gives for each weight set.

        Args:
            split: the data.
            batch_size: for array data.
            weight_sets: from ``stage``; None stands for the weights the model holds.
            on_batch: called with the examples evaluated, once per produced batch.

        Returns:
            One ``(figures, count)`` per weight set, as ``evaluate`` returns them.
        """
        import tensorflow as tf

        pending: list[list[tuple[int, Any]]] = [[] for _ in weight_sets]
        # The shape most batches have is XLA-compiled; see _call for the others.
        full = batch_size if isinstance(split, ArraySplit) else None
        with tf.device(self.device):
            for x, y, sw in self._batches(split, batch_size):
                n = batch_length(x)
                if n == 0:
                    continue
                if not self._built:
                    self._build(x, y, sw, split.name)
                full = full or n
                for weights, outputs in zip(weight_sets, pending, strict=True):
                    if weights is not None:
                        for variable, value in zip(self.model.weights, weights, strict=True):
                            variable.assign(value)
                    outputs.append((n, self._call(x, y, sw, split.name, main=n == full)))
                if on_batch is not None:
                    on_batch(n * len(weight_sets))
        return [self._reduce(outputs, split.name) for outputs in pending]

    # --- internals

    def _batches(self, split: Split, batch_size: int):
        """Array data is copied to the device once, already cut into batches: slicing a
        tensor costs more Python time per batch than a small model's forward pass."""
        import tensorflow as tf

        if not isinstance(split, ArraySplit) or split.nbytes > DEVICE_CACHE_BYTES:
            yield from split.batches(batch_size)
            return
        cached = self._device_data.get(split.name)
        if cached is None or cached[0] is not split or cached[1] != batch_size:
            self._device_data.pop(split.name, None)  # never two copies on the device
            cached = None
            try:
                batches = [
                    tuple(map_structure(tf.convert_to_tensor, v) for v in batch)
                    for batch in split.batches(batch_size)
                ]
            except Exception as e:  # noqa: BLE001
                if not _is_out_of_memory(e):
                    raise
                batches = None  # the device cannot hold the data: stream it from the host
            cached = self._device_data[split.name] = (split, batch_size, batches)
        yield from cached[2] if cached[2] is not None else split.batches(batch_size)

    def _build(self, x, y, sw, split_name: str) -> None:
        import tensorflow as tf

        model = self.model
        try:
            # One eager pass on a few examples creates the loss and metric objects and their
            # variables, which a traced function must not create.
            few = slice(0, 2)
            xs, ys, sws = (take(v, few) for v in (x, y, sw))
            y_pred = model(xs, training=False)
            model._compile_loss(ys, y_pred, sws)
            if model._compile_metrics is not None:
                model._compile_metrics.update_state(ys, y_pred, sws)
        except tf.errors.OpError as e:  # a runtime failure at these weights, e.g. NaN checks
            raise evaluation_error(e, split_name, batch_length(x)) from e
        except Exception as e:  # noqa: BLE001 - wrong shapes surface as many error types
            raise DataError(_shape_message(model, x, split_name, e)) from e
        self._tracked = [m for m in (model._compile_metrics, *model._compile_loss.metrics) if m]
        self._state = [v for m in self._tracked for v in m.variables]
        additional = model._aggregate_additional_loss

        def step(x, y, sw):
            self.traces += 1
            for variable in self._state:
                variable.assign(tf.zeros(variable.shape, variable.dtype))
            y_pred = model(x, training=False)
            data = model._compile_loss(y, y_pred, sw)
            data = tf.zeros((), "float32") if data is None else data
            extra = [additional(loss) for loss in model.losses]
            reg = tf.add_n([tf.cast(e, "float32") for e in extra]) if extra else tf.zeros(())
            if model._compile_metrics is not None:
                model._compile_metrics.update_state(y, y_pred, sw)
            return data, reg, [v.value for v in self._state]

        jit = True if self.jit_compile is None else self.jit_compile
        self._step = tf.function(step, jit_compile=jit, reduce_retracing=False)
        self._fallback = tf.function(step, jit_compile=False) if self.jit_compile is None else None
        self._built = True

    def _call(self, x, y, sw, split_name: str, main: bool = True):
        """One step. ``main``: a batch of the size most batches have.

        XLA compiles once per input shape, and on a CPU one compilation costs about as much
        as evaluating a few full passes' worth of batches. So, unless XLA was asked for
        explicitly, only the main batch size is compiled; the other sizes (each split's
        last batch) run in a plain graph, whose tracing is several times cheaper. The graph
        keeps the static batch size: Keras weighs its per-output loss trackers by it.
        """
        import tensorflow as tf

        step = self._step if main or self._fallback is None else self._fallback
        try:
            outputs = step(x, y, sw)
        except Exception as e:  # noqa: BLE001
            error = evaluation_error(e, split_name, batch_length(x))
            xla = step is self._step and self._fallback is not None and _is_xla_failure(e)
            if xla and not error.out_of_memory:
                warnings.warn(
                    f"trueloss-replay: XLA cannot compile this model ({type(e).__name__}); "
                    "evaluating without jit_compile.",
                    stacklevel=2,
                )
                self._step, self._fallback = self._fallback, None
                return self._call(x, y, sw, split_name, main)
            if not self._succeeded and not isinstance(e, tf.errors.OpError):
                # Nothing has run yet and tracing failed: model and data do not fit. A
                # TensorFlow runtime error (out of memory, a numeric check tripped by these
                # weights) belongs to the checkpoint instead.
                raise DataError(_shape_message(self.model, x, split_name, e)) from e
            raise error from e
        self._succeeded = True
        return outputs

    def _reduce(self, pending: list[tuple[int, Any]], split_name: str):
        """Per-batch outputs to the split's figures: float64 sums on the host.

        Converting only now lets the device run ahead of the host loop.
        """
        loss_sum = reg_sum = 0.0
        count = 0
        state_sums: list[np.ndarray] | None = None
        for n, (data, reg, states) in pending:
            try:  # an asynchronous device error surfaces when a value is read
                loss_sum += float(data) * n
                reg_sum += float(reg) * n
                values = [np.asarray(s, dtype=np.float64) for s in states]
            except Exception as e:  # noqa: BLE001
                raise evaluation_error(e, split_name, n) from e
            state_sums = (
                values
                if state_sums is None
                else [a + b for a, b in zip(state_sums, values, strict=True)]
            )
            count += n
        if count == 0:
            raise DataError(f"{split_name} data yielded no examples.")
        figures = {"loss": loss_sum / count, "regularization_loss": reg_sum / count}
        figures.update(self._metric_results(state_sums or []))
        return figures, count

    def _metric_results(self, state_sums: Sequence[np.ndarray]) -> dict[str, float]:
        for variable, total in zip(self._state, state_sums, strict=True):
            variable.assign(total.astype(variable.dtype))
        results: dict[str, float] = {}
        for metric in self._tracked:
            value = metric.result()
            if isinstance(value, dict):
                results.update({k: float(np.asarray(v)) for k, v in value.items()})
            else:
                results[metric.name] = float(np.asarray(value))
        return results


def evaluation_error(error: Exception, split_name: str, batch: int) -> EvaluationError:
    if _is_out_of_memory(error):
        return EvaluationError(
            f"evaluating the {split_name} data ran out of device memory at batches of {batch}"
            "; pass a smaller --batch-size (for array data) or smaller dataset batches.",
            out_of_memory=True,
            split=split_name,
        )
    text = " ".join(str(error).split())[:300] or type(error).__name__
    return EvaluationError(f"evaluating the {split_name} data failed: {text}", split=split_name)


def _is_out_of_memory(error: Exception) -> bool:
    text = " ".join(str(error).split())
    markers = ("ResourceExhausted", "OOM when allocating", "out of memory", "Dst tensor is not")
    return "ResourceExhausted" in type(error).__name__ or any(m in text for m in markers)


def _is_xla_failure(error: Exception) -> bool:
    text = str(error)
    return any(s in text for s in ("XLA", "xla", "jit_compile", "Compilation failure", "tf2xla"))


def _shape_message(model, x, split_name: str, error: Exception) -> str:
    shapes = [tuple(a.shape) for a in flatten(x)]
    expected = getattr(model, "input_shape", None)
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return (
        f"{split_name} data does not fit the model: the model expects inputs of shape "
        f"{expected}, the data has {shapes if len(shapes) > 1 else shapes[0]} ({first})."
    )


# --------------------------------------------------------------------------- devices


def resolve_devices(spec: str = "auto") -> list[str]:
    """TensorFlow device names for ``--devices``.

    ``auto``: every GPU, else the CPU. ``cpu``: every logical CPU device. ``gpu``: every GPU
    (an error without one). ``0,1``: those GPUs. Full names (``/CPU:1``) are taken as they are.

    Raises:
        DataError: a named device does not exist (the message lists those that do).
    """
    import tensorflow as tf

    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    spec = (spec or "auto").strip()
    if spec == "auto":
        return gpus or cpus[:1]
    if spec == "cpu":
        return cpus
    if spec == "gpu":
        if not gpus:
            raise DataError("--devices gpu: TensorFlow sees no GPU; use --devices cpu or auto.")
        return gpus
    chosen = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        short = f"gpu:{part}" if part.isdigit() else part.lower().lstrip("/").split("device:")[-1]
        name = f"/device:{short.upper()}"
        matches = [d for d in gpus + cpus if d.lower().split("device:")[-1] == short]
        if not matches:
            raise DataError(
                f"--devices {spec}: there is no device {name}; TensorFlow sees "
                f"{', '.join(cpus + gpus)}."
            )
        chosen.append(matches[0])
    if not chosen:
        raise DataError(f"--devices {spec!r} names no device; use auto, cpu, gpu or 0,1.")
    return chosen


# --------------------------------------------------------------------------- selection


def parse_epochs(spec: str | Iterable[int] | None) -> set[int] | None:
    """``"1,3,5-9"`` to ``{1, 3, 5, 6, 7, 8, 9}``; None means every checkpoint."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        return {int(e) for e in spec}
    chosen: set[int] = set()
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        low, sep, high = part.partition("-")
        try:
            if sep:
                lo, hi = int(low), int(high)
                if hi < lo:
                    raise ValueError
                chosen.update(range(lo, hi + 1))
            else:
                chosen.add(int(low))
        except ValueError as e:
            raise DataError(
                f"--epochs {spec!r}: {part!r} is not an epoch or a range like 5-9."
            ) from e
    return chosen


def result_path(output: Path, checkpoint_name: str) -> Path:
    return output / (Path(checkpoint_name).stem + ".json")


def _reusable(path: Path, checkpoint: runfmt.Checkpoint, fingerprints: dict) -> dict | None:
    from trueloss_replay.history import read_result

    try:
        result = read_result(path)
    except RunFormatError:
        return None
    if result.get("checkpoint_time") != checkpoint.time or result.get("data") != fingerprints:
        return None
    return result


# --------------------------------------------------------------------------- replay


class _Progress:
    """The hooks a progress display implements; the default does nothing."""

    def start(self, checkpoints: int, batches_per_checkpoint: int | None) -> None: ...

    def advance(self, examples: int) -> None: ...

    def checkpoint_done(self, result: dict[str, Any], reused: bool) -> None: ...

    def checkpoint_failed(self, name: str, reason: str) -> None: ...


class _SerializedProgress:
    """Forwards the progress hooks under a lock: every device's worker calls them."""

    def __init__(self, target: _Progress):
        self._target = target
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        hook = getattr(self._target, name)

        def locked(*args, **kwargs):
            with self._lock:
                return hook(*args, **kwargs)

        return locked


def replay(
    run_dir: str | os.PathLike,
    *,
    data: str | None = None,
    train: Any = None,
    val: Any = None,
    batch_size: int | None = None,
    devices: str | Sequence[str] = "auto",
    epochs: str | Iterable[int] | None = None,
    epoch_end_only: bool = False,
    force: bool = False,
    output: str | os.PathLike | None = None,
    unsafe_deserialization: bool = False,
    model: Callable | str | None = None,
    imports: Iterable[str] = (),
    jit_compile: bool | None = None,
    progress: _Progress | None = None,
    data_major: bool = False,
):
    """Evaluates every checkpoint of a run in inference mode; returns the true-loss History.

    Each checkpoint's figures go to ``<output>/<checkpoint>.json`` as soon as they are
    computed, so an interrupted replay resumes where it stopped; a checkpoint whose result
    exists for the same data is not evaluated again unless ``force``.

    Args:
        run_dir: the run folder ``ReplayCheckpoint`` wrote.
        data: a ``module:function`` data factory (default: the one in the manifest).
        train: training data: ``(x, y[, sample_weight])`` arrays, an ``.npz``/``.h5`` path,
            a finite ``tf.data.Dataset`` or a ``keras.utils.PyDataset``.
        val: validation data, the same kinds.
        batch_size: evaluation batch size for array data (default 2048, or fewer examples).
        devices: ``auto``, ``cpu``, ``gpu``, GPU indices ``"0,1"``, or device names.
        epochs: which checkpoints, by completed epochs: ``"1,3,5-9"`` or a list of ints.
        epoch_end_only: skip the checkpoints taken within an epoch (``eNNNN-sSSSSSS.h5``).
        force: recompute results that already exist.
        output: where results go (default ``RUN_DIR/replay/results``).
        unsafe_deserialization: load ``model.keras`` with ``safe_mode=False``.
        model: a builder (callable or ``module:function``) when the run has no architecture.
        imports: modules to import first (custom layers, losses, metrics).
        jit_compile: XLA for the evaluation step; None tries it and falls back.
        progress: an object with the ``_Progress`` hooks (the CLI passes a rich display).
        data_major: evaluate several checkpoints per produced batch, so that an expensive
            input pipeline (a ``tf.data`` map that decodes, a ``PyDataset`` reading files)
            runs once for all of them; their results are written together, so an
            interrupted replay loses up to a group. Groups are bounded by
            ``DATA_MAJOR_BYTES`` of staged weights per device (a model larger than half of
            that is evaluated one checkpoint at a time). Array data already on the device
            gains nothing from it.

    Returns:
        keras.callbacks.History: the true curves (keys in DESIGN.md).

    Raises:
        RunFormatError: the run folder is unreadable.
        DataError: no data, or data that does not fit the model.
        ModelLoadError: the model cannot be rebuilt.
        ReplayIncompleteError: some checkpoints failed; the others were evaluated and
            ``error.history`` holds their History.

    Example:
        >>> history = replay("runs/exp1")
        >>> history.history["loss"][-1], history.history["reported_loss"][-1]
    """
    from trueloss_replay.history import (
        build_frame,
        history_from_frame,
        read_result,
        replay_folder,
        write_exports,
    )

    run = runfmt.Run(run_dir)
    # Device workers report from their own threads.
    progress = _SerializedProgress(progress or _Progress())
    import_modules(imports)
    splits = resolve_splits(run, data=data, train=train, val=val)
    fingerprints = {name: split.fingerprint for name, split in splits.items()}
    device_names = resolve_devices(devices) if isinstance(devices, str) else list(devices)
    if not device_names:
        raise DataError("devices names no device; use 'auto', 'cpu', 'gpu' or device names.")
    output = Path(output) if output is not None else run.results_dir
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFormatError(f"cannot create the results folder {output}: {e}") from e

    wanted = parse_epochs(epochs)
    everything = run.checkpoints()  # opens every file once: list it once
    checkpoints = [
        c
        for c in everything
        if (wanted is None or c.epoch in wanted) and (c.is_epoch_end or not epoch_end_only)
    ]
    if wanted is not None and not checkpoints:
        raise DataError(f"--epochs selects no checkpoint of {run.path}.")
    failures: dict[str, str] = {c.name: c.error for c in checkpoints if c.error}
    results: dict[str, dict] = {}
    todo = []
    for c in checkpoints:
        if c.error:
            continue
        reused = None if force else _reusable(result_path(output, c.name), c, fingerprints)
        if reused is not None:
            results[c.name] = reused
        else:
            todo.append(c)

    batch = batch_size or DEFAULT_BATCH_SIZE
    array_counts = [s.count for s in splits.values() if isinstance(s, ArraySplit)]
    if batch_size is None and array_counts:
        # No default batch larger than the data: that shape would occur nowhere.
        batch = min(batch, max(array_counts))
    per_ckpt = sum(s.num_batches(batch) or 0 for s in splits.values()) or None
    progress.start(len(checkpoints), per_ckpt)
    for c in checkpoints:
        if c.name in results:
            progress.checkpoint_done(results[c.name], reused=True)
        elif c.error:
            progress.checkpoint_failed(c.name, c.error)

    if todo:
        builder = lambda: load_model(run, model, unsafe_deserialization)  # noqa: E731
        _evaluate_all(
            todo,
            splits=splits,
            device_names=device_names,
            builder=builder,
            batch=batch,
            output=output,
            fingerprints=fingerprints,
            jit_compile=jit_compile,
            results=results,
            failures=failures,
            progress=progress,
            data_major=data_major,
        )

    # Unselected checkpoints keep the results stored earlier, so the History covers the run.
    for c in everything:
        stored = result_path(output, c.name)
        if c.name not in results and c.name not in failures and stored.is_file():
            with contextlib.suppress(RunFormatError):
                results[c.name] = read_result(stored)
    ordered = [results[c.name] for c in everything if c.name in results]
    _warn_mixed_data(ordered, run.path)
    # Built from what is in memory; the exports are the same figures, not a second read.
    frame = build_frame(ordered, run.manifest, everything)
    history = history_from_frame(frame, run.manifest.get("params"))
    write_exports(frame, history, replay_folder(run.path, output))
    if failures:
        raise ReplayIncompleteError(run.path, failures, history, len(ordered))
    return history


def _evaluate_all(
    todo,
    *,
    splits,
    device_names,
    builder,
    batch,
    output,
    fingerprints,
    jit_compile,
    results,
    failures,
    progress,
    data_major=False,
) -> None:
    """Spreads checkpoints over devices: one worker thread, one model replica per device."""
    import tensorflow as tf

    work: queue.Queue = queue.Queue()
    for c in todo:
        work.put(c)
    lock = threading.Lock()
    setup_errors: list[BaseException] = []
    # Every replica is built before any takes work, so the queue spreads over all devices.
    ready = threading.Barrier(len(device_names))
    share = -(-len(todo) // len(device_names))

    def done(checkpoint, result) -> None:
        try:
            runfmt.atomic_write_json(result_path(output, checkpoint.name), result)
        except TruelossReplayError as e:
            failed(checkpoint, e)
            return
        with lock:
            results[checkpoint.name] = result
        progress.checkpoint_done(result, reused=False)

    def failed(checkpoint, error: Exception) -> None:
        with lock:
            failures[checkpoint.name] = str(error)
        progress.checkpoint_failed(checkpoint.name, str(error))

    def context(evaluator):
        return _Context(evaluator, splits, batch, fingerprints, progress, done, failed)

    def worker(device: str) -> None:
        try:
            with tf.device(device):
                evaluator = Evaluator(builder(), device, jit_compile)
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            setup_errors.append(e)
            ready.abort()
            return
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            return
        try:
            group = _group_size(evaluator.model, data_major, share)
            if group > 1:
                _data_major_loop(context(evaluator), work, group)
            else:
                _checkpoint_major_loop(context(evaluator), work)
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            setup_errors.append(e)

    threads = [threading.Thread(target=worker, args=(d,), daemon=True) for d in device_names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if setup_errors:
        raise setup_errors[0]


class _Context:
    """What a device's worker needs to evaluate checkpoints and report each one."""

    def __init__(self, evaluator, splits, batch, fingerprints, progress, done, failed):
        self.evaluator = evaluator
        self.splits = splits
        self.batch = batch
        self.fingerprints = fingerprints
        self.progress = progress
        self.done = done
        self.failed = failed

    def evaluate(self, evaluate: Callable[[int], Any]) -> Any:
        """``evaluate(batch size)``; when the device runs out of memory on array data, again
        at half the batch size (the figures do not depend on it), down to a single example.
        This is what bounds the default batch of 2048 by the device's memory."""
        while True:
            try:
                return evaluate(self.batch)
            except EvaluationError as e:
                # Only array data is cut at this size; a dataset's batches are its own.
                array = isinstance(self.splits.get(e.split), ArraySplit)
                if not (e.out_of_memory and array and self.batch > 1):
                    raise
                self.batch //= 2
                warnings.warn(
                    f"trueloss-replay: {self.evaluator.device} ran out of memory; evaluating "
                    f"at batches of {self.batch} from now on.",
                    stacklevel=2,
                )

    def result(self, checkpoint, figures, examples, seconds: float) -> dict[str, Any]:
        return {
            "format": runfmt.RESULT_FORMAT,
            "version": runfmt.FORMAT_VERSION,
            "checkpoint": checkpoint.name,
            "epoch": checkpoint.epoch,
            "step": checkpoint.step,
            "epoch_end": checkpoint.is_epoch_end,
            "checkpoint_time": checkpoint.time,
            "train": figures.get("train"),
            "val": figures.get("val"),
            "reported": checkpoint.logs,
            "examples": examples,
            "data": self.fingerprints,
            # Array data is cut at this size; datasets keep their own batches.
            "batch_size": {
                name: self.batch if isinstance(split, ArraySplit) else None
                for name, split in self.splits.items()
            },
            "device": self.evaluator.device,
            "seconds": seconds,
            "evaluated": time.time(),
        }


def _checkpoint_major_loop(ctx: _Context, work: queue.Queue) -> None:
    """One checkpoint at a time, every split; the next checkpoint is read meanwhile."""
    evaluator = ctx.evaluator
    with ThreadPoolExecutor(max_workers=1) as reader:
        upcoming = _take(work)
        future = reader.submit(runfmt.read_weights, upcoming.path) if upcoming else None
        while upcoming is not None:
            checkpoint, current = upcoming, future
            # Read the next checkpoint from disk while this one evaluates: at most two
            # checkpoints' weights in host memory per device.
            upcoming = _take(work)
            future = reader.submit(runfmt.read_weights, upcoming.path) if upcoming else None
            started = time.perf_counter()
            try:
                evaluator.load(current.result(), str(checkpoint.path))
                del current
                outcome = ctx.evaluate(
                    lambda batch: {
                        name: evaluator.evaluate(split, batch, ctx.progress.advance)
                        for name, split in ctx.splits.items()
                    }
                )
                figures = {name: figures for name, (figures, _) in outcome.items()}
                examples = {name: count for name, (_, count) in outcome.items()}
                result = ctx.result(checkpoint, figures, examples, time.perf_counter() - started)
            except DataError:  # the data, not this checkpoint: stop
                raise
            except TruelossReplayError as e:
                ctx.failed(checkpoint, e)
                continue
            ctx.done(checkpoint, result)


def _data_major_loop(ctx: _Context, work: queue.Queue, group: int) -> None:
    """``group`` checkpoints at a time: each batch is produced once for all of them."""
    evaluator = ctx.evaluator
    while True:
        staged = []
        while len(staged) < group and (checkpoint := _take(work)) is not None:
            try:
                # One checkpoint's host arrays at a time; the staged copies live on the device.
                weights = evaluator.stage(
                    runfmt.read_weights(checkpoint.path), str(checkpoint.path)
                )
            except DataError:
                raise
            except TruelossReplayError as e:
                ctx.failed(checkpoint, e)
                continue
            staged.append((checkpoint, weights))
        if not staged:
            return
        started = time.perf_counter()
        try:
            per_split = ctx.evaluate(
                lambda batch, staged=staged: {
                    name: evaluator.evaluate_many(
                        split, batch, [w for _, w in staged], ctx.progress.advance
                    )
                    for name, split in ctx.splits.items()
                }
            )
        except DataError:
            raise
        except TruelossReplayError as e:  # the whole group shared the failing batches
            for checkpoint, _ in staged:
                ctx.failed(checkpoint, e)
            continue
        seconds = (time.perf_counter() - started) / len(staged)
        for i, (checkpoint, _) in enumerate(staged):
            figures = {name: outcome[i][0] for name, outcome in per_split.items()}
            examples = {name: outcome[i][1] for name, outcome in per_split.items()}
            ctx.done(checkpoint, ctx.result(checkpoint, figures, examples, seconds))


def _group_size(model, data_major: bool, share: int) -> int:
    """Checkpoints evaluated per produced batch: 1 (checkpoint-major) unless data-major.

    Data-major pays off when producing a batch costs more than evaluating it. Its staged
    weights are a copy per checkpoint on the device, bounded by ``DATA_MAJOR_BYTES``; a
    model larger than half of that is evaluated checkpoint-major.
    """
    if not data_major:
        return 1
    nbytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights)
    fits = DATA_MAJOR_BYTES // max(nbytes, 1)
    return int(max(1, min(fits, DATA_MAJOR_MAX_GROUP, share)))


def _take(work: queue.Queue):
    with contextlib.suppress(queue.Empty):
        return work.get_nowait()
    return None


def _warn_mixed_data(results: list[dict], run_path: Path) -> None:
    seen = {json.dumps(r.get("data"), sort_keys=True) for r in results}
    if len(seen) > 1:
        warnings.warn(
            f"trueloss-replay: the checkpoints of {run_path} were evaluated on different data "
            "(their data fingerprints differ); rerun the replay with --force to evaluate all "
            "of them on the same data.",
            stacklevel=3,
        )
