"""The evaluator: one split of data at many weights, exact inference-mode figures.

Backend-neutral: everything TensorFlow- or JAX-specific goes through
``trueloss_replay.backends``. This module returns figures and never writes files; choosing
checkpoints, reusing results, scheduling devices and writing results is ``scheduler.py``.

One compiled program per split. Array data is copied to the device once, cut into batches
and stacked (``[batches, batch_size, ...]``); one compiled program loops over the stacked
batches (``jax.lax.map``, or ``tf.map_fn`` inside one XLA ``tf.function``) and returns the
per-batch loss, penalty and metric states as stacked arrays, read back once. The ragged last
batch, if any, is a second, one-step program at its own shape: padding it would change
figures that count examples or weigh by the batch size (Keras weighs per-output loss
trackers by the static batch size), so it is evaluated as it is. The weights are arguments
of the program (``model.stateless_call``), so a checkpoint is evaluated without assigning
a single variable and the program is traced once per device and shape, for all checkpoints.
Data that streams (``tf.data``, ``PyDataset``, arrays too large for the device) goes batch by
batch through the one-step program instead.

Exactness. Keras' ``evaluate()`` reports ``loss`` as the batch-size-weighted mean of the
per-batch ``compute_loss``, which is the compiled loss (loss weights, sample weights, one term
per output) plus every entry of ``model.losses``. The step computes the two parts separately
with Keras' own objects (``CompileLoss``, ``CompileMetrics``, the model's
``_aggregate_additional_loss``), per batch, and the host sums them in float64. Metric states
start from zero in every batch (a ``StatelessScope`` maps them to zeros) and their per-batch
values are summed on the host; Keras' own ``result()`` then turns the summed state into the
figure (in a ``StatelessScope`` again: no metric variable is assigned). This assumes
additive metric states, which holds for every built-in Keras metric (sums, counts and
confusion matrices). The figures do not depend on the evaluation batch size, up to float32
rounding within a batch.

A model that overrides ``compute_loss`` (the documented Keras 3 hook, e.g. a VAE) is
evaluated through it: its data loss is what ``compute_loss`` returns while ``model.losses``
reads as zero, so the penalties are neither counted twice nor lost, whether or not the
override adds ``self.losses``; ``regularization_loss`` is ``model.losses`` as usual.
"""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trueloss_replay import run as runfmt
from trueloss_replay.backends import get_backend
from trueloss_replay.data import (
    ArraySplit,
    Split,
    batch_length,
    flatten,
    import_reference,
    map_structure,
    put_cwd_on_path,
    take,
)
from trueloss_replay.errors import DataError, EvaluationError, ModelLoadError, size_text
from trueloss_replay.sampling import SE_SUFFIX, ratio_standard_error

DEFAULT_BATCH_SIZE = 2048
# Array data up to this size is kept on each device for the whole replay; larger data is
# streamed from host memory batch by batch.
DEVICE_CACHE_BYTES = 2 * 1024**3
# Checkpoint-major replay evaluates up to STACK_MAX checkpoints per program call, their
# weights stacked (at most STACK_BYTES of them): one dispatch, one read-back per group.
STACK_BYTES = 64 * 1024**2
STACK_MAX = 8
# ``Evaluator._params`` after a load that failed: nothing to evaluate at.
_UNLOADED: Any = object()


# --------------------------------------------------------------------------- model


def import_modules(modules: Iterable[str]) -> None:
    """Imports modules that register custom layers, losses or metrics (``imports=``)."""
    modules = list(modules)
    cwd = put_cwd_on_path() if modules else None
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ModelLoadError(
                f"cannot import module {name!r} given in imports= ({e}); searched the "
                f"current directory {cwd} and the Python path.",
                argument="imports",
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
    config = run.manifest.get("compile")
    if builder is not None:
        model = build_model(builder)
        if not getattr(model, "compiled", False):
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
            "pass a builder: model='module:function' returning the model.",
            path=run.path,
        )
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing; pass a builder instead: model='module:function'.", path=path
        )
    model = load_model_file(path, config, unsafe)
    if not (config or {}).get("loss") and not overrides_compute_loss(model):
        raise ModelLoadError(
            f"{run.path / runfmt.MANIFEST} records no compiled loss (the model was compiled "
            "without one) and the model does not override compute_loss; there is no loss "
            "to replay."
        )
    return model


def build_model(builder: Callable | str):
    """Calls a model builder (a callable or a ``module:function`` reference), as given.

    Raises:
        ModelLoadError: the reference cannot be imported, or the builder raised or returned
            something other than a ``keras.Model``; the message names the builder.
    """
    name = builder if isinstance(builder, str) else _callable_name(builder)
    if isinstance(builder, str):
        try:
            builder = import_reference(builder, "model")
        except DataError as e:
            raise ModelLoadError(str(e), usage=e.usage, argument="model") from e
    return _build(builder, name)


def load_model_file(path: Path, compile_config: dict | None = None, unsafe: bool = False):
    """A model from a ``.keras`` file, without its optimizer state.

    Args:
        path: the ``.keras`` archive.
        compile_config: compiled with it when given; otherwise the model is left uncompiled.
        unsafe: load with ``safe_mode=False`` (Lambda layers need it).

    Raises:
        ModelLoadError: a damaged archive, an unsafe layer without ``unsafe``, an
            unregistered custom object; the message names the file.
    """
    import keras

    try:
        # compile=False, then the given compile config: the optimizer's saved state is of no
        # use here, and loading it only warns about mismatched variables.
        model = keras.saving.load_model(path, safe_mode=not unsafe, compile=False)
        if compile_config:
            model.compile_from_config(compile_config)
    except Exception as e:  # noqa: BLE001 - Keras raises bare ValueError/TypeError here
        raise ModelLoadError(_explain_load_error(Path(path), e), path=Path(path)) from e
    return model


def _callable_name(builder: Any) -> str:
    module = getattr(builder, "__module__", None)
    name = getattr(builder, "__qualname__", None) or type(builder).__name__
    return f"{module}:{name}" if module else name


def _build(builder: Callable, name: str):
    """Calls the user's model builder; what it raises or returns wrong is named as its own."""
    import keras

    try:
        model = builder()
    except Exception as e:  # noqa: BLE001 - the user's code: any failure is the builder's
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ModelLoadError(
            f"the model builder {name} (model=) raised {type(e).__name__}"
            + (f": {first}" if first else "")
            + ". Fix the builder, or pass another.",
            argument="model",
        ) from e
    if not isinstance(model, keras.Model):
        raise ModelLoadError(
            f"the model builder {name} (model=) returned {type(model).__name__}, not a "
            "keras.Model; it must return the model.",
            argument="model",
        )
    return model


def _explain_load_error(path: Path, error: Exception) -> str:
    import zipfile

    # Keras says "File not found" for a file that is there but is no zip archive.
    if path.is_file() and not zipfile.is_zipfile(path):
        return (
            f"{path} is not a valid .keras archive (not a zip file); it is damaged. Copy "
            "model.keras again from where the run was trained, or pass a builder as "
            "model='module:function' instead."
        )
    text = str(error)
    if "safe_mode" in text or "unsafe" in text.lower():
        return (
            f"{path} contains a layer that can run arbitrary code (e.g. Lambda); loading it "
            "needs unsafe_deserialization=True (only for run folders you trust)."
        )
    missing = _unregistered_objects(path)
    if missing:
        return (
            f"{path} uses the custom object {missing[0]!r}, which is not registered in this "
            "process; pass the module that defines it with imports= (decorated with "
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

#: The weights of one checkpoint on a device: ``(trainable, non_trainable)`` arrays in the
#: order of ``model.trainable_variables`` and ``model.non_trainable_variables``.
Params = tuple[list[Any], list[Any]]


@dataclass
class _Resident:
    """A split on the device: the full batches stacked, the ragged last batch on its own."""

    split: Split
    batch_size: int
    stacked: tuple | None  # (x, y, sw), each [batches, batch_size, ...]; sw may be None
    full: int  # how many full batches ``stacked`` holds
    rest: tuple | None  # (x, y, sw) of the last, smaller batch
    rest_count: int


@dataclass
class _Stacked:
    """What ``Evaluator.dispatch_stacked`` started, for ``Evaluator.collect``: per split,
    ``(pending outputs with a checkpoint axis, None)`` or ``(None, per checkpoint pending)``
    for a split that streamed."""

    splits: dict[str, Split]
    pending: dict[str, tuple[Any, Any]]
    count: int


class Evaluator:
    """Evaluates one compiled model at many weights, on one device.

    Args:
        model: a compiled Keras model (built, or buildable on the first batch).
        device: a device name of the current backend (``resolve_devices``); default the
            first GPU, else the CPU.
        jit_compile: XLA-compile the programs. None: XLA for the programs that run many
            batches, a plain graph for a split's last batch on TensorFlow (an XLA
            compilation costs more than it saves on one batch), with a fallback to plain
            graphs when XLA cannot compile the model. JAX always compiles with XLA.

    Attributes:
        traces: how many times a program was traced (once per program and input shape).

    Example:
        >>> evaluator = Evaluator(model)
        >>> evaluator.load(runfmt.read_weights("run/checkpoints/e0003.h5"), "e0003.h5")
        >>> figures, count = evaluator.evaluate(split, batch_size=2048)
    """

    def __init__(self, model, device: str | None = None, jit_compile: bool | None = None):
        self.backend = get_backend()
        self.model = model
        self.device = device or self.backend.default_device()
        self.jit_compile = jit_compile
        self.traces = 0
        self._built = False
        self._succeeded = False
        self._tracked: list[Any] = []
        self._state: list[Any] = []
        self._params: Params | None = None
        self._signature: list[list[Any]] | None = None
        self._places: list[int] | None = None
        self._file_signatures: dict[Path, list[list[Any]]] = {}
        self._programs: dict[str, Callable] = {}
        self._resident: dict[str, _Resident | None] = {}
        self._xla = jit_compile is not False
        self._per_example_names: list[str] = []
        # The metrics' result() of a group of checkpoints as one compiled host program;
        # False: computed eagerly.
        self._results_program: Callable | bool | None = None
        self._result_names: list[str] = []

    # --- public

    def stage(self, weights: Mapping[str, np.ndarray], source: str) -> Params:
        """A checkpoint's weights as arrays on this device, for ``evaluate_many``.

        Raises:
            CheckpointMismatchError: the weights do not fit the model.
            EvaluationError: the device has no room for them (``out_of_memory``).
        """
        keys = runfmt.check_signature(self.signature, weights, source)
        arrays = [weights[k] for k in keys]
        by_id = {
            id(v): np.asarray(a).astype(v.dtype, copy=False)
            for a, v in zip(arrays, self.model.weights, strict=True)
        }
        return self._place(by_id)

    def load(self, weights: Mapping[str, np.ndarray], source: str) -> None:
        """Makes a checkpoint's weights (already read) the ones ``evaluate`` uses.

        The model's variables are not assigned: the weights are arguments of the program.
        The weights loaded before leave the device first, so that it needs room for one
        checkpoint's, not two; after a load that failed, ``evaluate`` refuses to run.
        """
        self._params = _UNLOADED
        self._params = self.stage(weights, source)

    def evaluate(
        self, split: Split, batch_size: int, on_batch: Callable[..., None] | None = None
    ) -> tuple[dict[str, float], int]:
        """The split's figures at the loaded weights (default: the model's own).

        Returns:
            ``{"loss": data loss, "regularization_loss": ..., <metric>: ...}`` and the count.
        """
        return self.evaluate_splits({split.name: split}, batch_size, on_batch)[split.name]

    def evaluate_splits(
        self,
        splits: Mapping[str, Split],
        batch_size: int,
        on_batch: Callable[..., None] | None = None,
    ) -> dict[str, tuple[dict[str, float], int]]:
        """Every split's figures at the loaded weights; ``evaluate`` for several splits.

        The programs of all splits are dispatched before any result is read back, so the
        device never waits for the host between them.
        """
        pending = {
            name: self._dispatch(split, batch_size, [self._current()], on_batch)[0]
            for name, split in splits.items()
        }
        return {name: self._reduce(outputs, splits[name]) for name, outputs in pending.items()}

    def evaluate_many(
        self,
        split: Split,
        batch_size: int,
        weight_sets: Sequence[Params | None],
        on_batch: Callable[..., None] | None = None,
    ) -> list[tuple[dict[str, float], int]]:
        """Data-major evaluation: each batch is produced once and evaluated at every weight set.

        For input pipelines that cost more than the model (a ``tf.data`` map that decodes,
        a ``PyDataset`` that reads files): the batches of one pass serve several
        checkpoints. The figures are those ``evaluate`` gives for each weight set.

        Args:
            split: the data.
            batch_size: for array data.
            weight_sets: from ``stage``; None stands for the loaded weights.
            on_batch: called with the examples (and batches) evaluated, as they are.

        Returns:
            One ``(figures, count)`` per weight set, as ``evaluate`` returns them.
        """
        params = [self._current() if w is None else w for w in weight_sets]
        pending = self._dispatch(split, batch_size, params, on_batch)
        return [self._reduce(outputs, split) for outputs in pending]

    # --- several checkpoints per program

    def stack_size(self, splits: Mapping[str, Split], checkpoints: int) -> int:
        """How many checkpoints ``evaluate_stacked`` takes at once for ``checkpoints`` of
        them: 1 (one at a time) unless every split is array data the device can keep and the
        model is built; else up to ``STACK_MAX``, with at most ``STACK_BYTES`` of weights,
        balanced so that the groups are about equally full."""
        resident = all(
            isinstance(split, ArraySplit) and split.nbytes <= DEVICE_CACHE_BYTES
            for split in splits.values()
        )
        if not resident or not self.signature or checkpoints < 2:
            return 1
        nbytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in self.model.weights)
        largest = int(max(1, min(STACK_MAX, STACK_BYTES // max(nbytes, 1), checkpoints)))
        groups = -(-checkpoints // largest)
        return -(-checkpoints // groups)

    def host_stack(self, size: int) -> list[np.ndarray]:
        """Host buffers for ``size`` checkpoints' weights, one ``[size, *shape]`` array per
        variable in the program's order; a variable no checkpoint holds (a seed generator's
        state) is the model's value in every slot."""
        buffers = []
        held = {id(v) for v in self.model.weights}
        for v in self._ordered():
            buffer = np.empty((size, *v.shape), np.dtype(v.dtype))
            if id(v) not in held:
                buffer[...] = np.asarray(v)
            buffers.append(buffer)
        return buffers

    def slot_views(self, buffers: Sequence[np.ndarray], slot: int) -> list[np.ndarray]:
        """Slot ``slot`` of ``host_stack``'s buffers, one array per variable in
        ``model.weights`` order (the signature's): where ``run.read_weights_into`` (or
        ``reading.Readers.read_into``) reads a checkpoint, against ``file_signature``."""
        return [buffers[i][slot, ...] for i in self._weight_places()]

    def _weight_places(self) -> list[int]:
        """Where each of ``model.weights`` is in ``_ordered()``. Worked out once the model is
        built: Keras walks every layer to list its variables (0.1 ms for the reference MLP,
        per checkpoint read into a slot)."""
        if self._places is not None:
            return self._places
        place = {id(v): i for i, v in enumerate(self._ordered())}
        places = [place[id(v)] for v in self.model.weights]
        if self._built:
            self._places = places
        return places

    def file_signature(self, path: Path) -> list[list[Any]]:
        """The model's signature, its variables named as the run holding checkpoint ``path``
        recorded them where they pair up (``run.as_recorded``): its checkpoints then match
        by name, the fast read's quickest case. Worked out once per run folder."""
        folder = Path(path).parent
        if folder not in self._file_signatures:
            self._file_signatures[folder] = runfmt.as_recorded(self.signature, path)
        return self._file_signatures[folder]

    def stage_stack(self, buffers: Sequence[np.ndarray], count: int) -> Params:
        """The first ``count`` slots of ``host_stack``'s buffers on this device, stacked; the
        slots after them repeat the first (a group that is not full is padded, so the
        program keeps its shape; their figures are never read).

        Raises:
            EvaluationError: the device has no room for them (``out_of_memory``; one
                checkpoint at a time, ``load_slot``, may still fit).
        """
        for buffer in buffers:
            buffer[count:] = buffer[:1]
        return self._params_of(self._put(list(buffers), "the stacked weights"))

    def load_slot(self, buffers: Sequence[np.ndarray], slot: int) -> None:
        """Makes slot ``slot`` of ``host_stack``'s buffers the weights ``evaluate`` uses.

        Raises:
            EvaluationError: the device has no room for them (``out_of_memory``).
        """
        self._params = _UNLOADED  # as in ``load``: the weights before leave the device first
        self._params = self._params_of(self._put([b[slot, ...] for b in buffers], "the weights"))

    def evaluate_stacked(
        self,
        splits: Mapping[str, Split],
        batch_size: int,
        params: Params,
        count: int,
        on_batch: Callable[..., None] | None = None,
    ) -> list[dict[str, tuple[dict[str, float], int]]]:
        """``evaluate_splits`` for the first ``count`` checkpoints of ``stage_stack``'s
        weights: one program call per split and batch shape for all of them, the outputs of
        array data read back in one transfer.

        Returns:
            Per checkpoint, ``{split: (figures, count)}`` as ``evaluate_splits`` gives it.
        """
        return self.collect(self.dispatch_stacked(splits, batch_size, params, count, on_batch))

    def dispatch_stacked(
        self,
        splits: Mapping[str, Split],
        batch_size: int,
        params: Params,
        count: int,
        on_batch: Callable[..., None] | None = None,
    ) -> _Stacked:
        """The first half of ``evaluate_stacked``: the programs are started and nothing is
        read back, so the host can prepare the next group while the device works; ``collect``
        is the second half."""
        pending = {
            name: self._dispatch_stacked(split, batch_size, params, count, on_batch)
            for name, split in splits.items()
        }
        return _Stacked(dict(splits), pending, count)

    def collect(self, stacked: _Stacked) -> list[dict[str, tuple[dict[str, float], int]]]:
        """The figures of what ``dispatch_stacked`` started: waits for the device.

        Raises:
            EvaluationError: the device failed running the programs.
        """
        splits, count = stacked.splits, stacked.count
        fetched = self._fetch({n: p for n, (p, _) in stacked.pending.items() if p is not None})
        per_split = {
            name: [self._reduce(streamed[c], splits[name]) for c in range(count)]
            if streamed is not None  # evaluated one checkpoint at a time
            else self._figures_stacked(fetched[name], splits[name], count)
            for name, (_, streamed) in stacked.pending.items()
        }
        return [{name: figures[c] for name, figures in per_split.items()} for c in range(count)]

    def _dispatch_stacked(self, split, batch_size, params: Params, count: int, on_batch):
        """A split's stacked programs for every checkpoint of ``params``; a split the device
        cannot keep (it ran out of memory staging it) goes checkpoint by checkpoint.

        Returns:
            ``(pending, None)``: ``[(examples per batch, outputs with a checkpoint axis)]``;
            or ``(None, per checkpoint pending)`` for a split that streamed.
        """
        suffix = self._suffix(split)
        resident = self._resident_split(split, batch_size)
        if resident is None:
            one_by_one = [map_structure(lambda a, i=i: a[i], params) for i in range(count)]
            return None, self._dispatch(split, batch_size, one_by_one, on_batch)
        pending = []
        with self.backend.device_scope(self.device):
            if not self._built:
                self._build(*(resident.rest or take(resident.stacked, 0)), split.name)
            if resident.stacked is not None:
                out = self._run("loop@" + suffix, params, resident.stacked, split.name, batch_size)
                pending.append((batch_size, out))
                if on_batch is not None:  # one bar's worth of batches per group
                    on_batch(batch_size * resident.full * count, resident.full)
            if resident.rest is not None:
                n = resident.rest_count
                pending.append(
                    (n, self._run("rest@" + suffix, params, resident.rest, split.name, n))
                )
                if on_batch is not None:
                    on_batch(n * count, 1)
        return pending, None

    # --- dispatch

    def _ordered(self) -> list[Any]:
        """The variables in the order the programs take their values."""
        return [*self.model.trainable_variables, *self.model.non_trainable_variables]

    def _params_of(self, placed: Sequence[Any]) -> Params:
        split = len(self.model.trainable_variables)
        return list(placed[:split]), list(placed[split:])

    def _current(self) -> Params:
        if self._params is _UNLOADED:  # never the model's own weights in its place
            raise RuntimeError("the last load of weights failed: load a checkpoint first")
        if self._params is None:  # nothing loaded: the weights the model holds
            self._params = self._place({id(v): np.asarray(v) for v in self.model.weights})
        return self._params

    def _place(self, by_id: Mapping[int, np.ndarray]) -> Params:
        """The arrays in stateless-call order; a variable no checkpoint holds (a seed
        generator's state) keeps the model's value."""

        ordered = self._ordered()
        arrays = [by_id.get(id(v)) for v in ordered]
        arrays = [np.asarray(v) if a is None else a for a, v in zip(arrays, ordered, strict=True)]
        return self._params_of(self._put(arrays, "the weights"))

    def _put(self, arrays: list[np.ndarray], what: str) -> list[Any]:
        """``arrays`` on this device in one transfer call; a device without room for them is
        an ``EvaluationError`` (``out_of_memory``, no split) that says so, not the
        backend's own error."""
        try:
            return self.backend.to_device_many(arrays, self.device)
        except Exception as e:  # noqa: BLE001
            if not self.backend.is_out_of_memory(e):
                raise
            size = size_text(sum(a.nbytes for a in arrays))
            raise EvaluationError(
                f"{self.device} ran out of memory putting {what} ({size}) on it; stop "
                "other processes that use it, or replay on another device with devices=.",
                out_of_memory=True,
            ) from e

    @property
    def signature(self) -> list[list[Any]]:
        """The model's ``[[key, shape, dtype], ...]`` (``run.model_signature``), computed once
        the model is built: checkpoints are checked against it before they are read."""
        if self._signature is None or not self._signature and self.model.weights:
            self._signature = runfmt.model_signature(self.model)
        return self._signature

    def _dispatch(self, split, batch_size, params: Sequence[Params], on_batch):
        """Runs the programs for every weight set; the outputs stay on the device.

        Returns:
            Per weight set, a list of ``(examples per batch, outputs)``; the loop
            program's outputs have one row per batch.
        """
        pending: list[list[tuple[int, Any]]] = [[] for _ in params]
        suffix = self._suffix(split)
        resident = self._resident_split(split, batch_size)
        with self.backend.device_scope(self.device):
            if resident is not None:
                if not self._built:
                    self._build(*(resident.rest or take(resident.stacked, 0)), split.name)
                for p, outputs in zip(params, pending, strict=True):
                    if resident.stacked is not None:
                        out = self._run(
                            "loop" + suffix, p, resident.stacked, split.name, batch_size
                        )
                        outputs.append((batch_size, out))
                        if on_batch is not None:
                            on_batch(batch_size * resident.full, resident.full)
                    if resident.rest is not None:
                        out = self._run(
                            "rest" + suffix, p, resident.rest, split.name, resident.rest_count
                        )
                        outputs.append((resident.rest_count, out))
                        if on_batch is not None:
                            on_batch(resident.rest_count, 1)
                return pending
            main = None
            for batch in split.batches(batch_size):
                n = batch_length(batch[0])
                if n == 0:
                    continue
                if not self._built:
                    self._build(*batch, split.name)
                main = main or n
                placed = tuple(map_structure(self._to_device, part) for part in batch)
                # The size most batches have is XLA-compiled; the others run as plain graphs.
                kind = ("step" if n == main else "rest") + suffix
                for p, outputs in zip(params, pending, strict=True):
                    outputs.append((n, self._run(kind, p, placed, split.name, n)))
                if on_batch is not None:  # a batch produced once, for every weight set
                    on_batch(n * len(params), 1)
        return pending

    def _suffix(self, split: Split) -> str:
        """``:per_example`` for a sampled split, whose programs also return per-example
        values (for standard errors); else nothing."""
        if not getattr(split, "per_example", False):
            return ""
        if overrides_compute_loss(self.model):
            raise DataError(
                f"train_sample= needs per-example losses, and {type(self.model).__name__} "
                "overrides compute_loss, which returns one value per batch; leave "
                "train_sample out to evaluate the full training set.",
                usage=True,
                argument="train_sample",
            )
        return ":per_example"

    def _to_device(self, value):
        return self.backend.to_device(value, self.device)

    def _resident_split(self, split: Split, batch_size: int) -> _Resident | None:
        """The split on this device, stacked (once per split and batch size), or None when
        it streams: not arrays, larger than ``DEVICE_CACHE_BYTES``, or the device is full."""
        if not isinstance(split, ArraySplit) or split.nbytes > DEVICE_CACHE_BYTES:
            return None
        cached = self._resident.get(split.name)
        if cached is not None and cached.split is split and cached.batch_size == batch_size:
            return cached
        self._resident.pop(split.name, None)  # never two copies on the device
        full, rest = divmod(split.count, batch_size)
        parts = (split.x, split.y, split.sample_weight)
        try:
            stacked = None
            if full:
                stacked = tuple(
                    map_structure(
                        lambda a: self._to_device(
                            a[: full * batch_size].reshape(full, batch_size, *a.shape[1:])
                        ),
                        part,
                    )
                    for part in parts
                )
            tail = None
            if rest:
                tail = tuple(
                    map_structure(lambda a: self._to_device(a[full * batch_size :]), part)
                    for part in parts
                )
        except Exception as e:  # noqa: BLE001
            if not self.backend.is_out_of_memory(e):
                raise
            self._resident[split.name] = None
            return None  # the device cannot hold the data: stream it from the host
        resident = _Resident(split, batch_size, stacked, full, tail, rest)
        self._resident[split.name] = resident
        return resident

    def _run(self, kind: str, params: Params, batch, split_name: str, n: int):
        """One program call. ``kind``: ``loop`` (stacked batches), ``step`` (a batch of the
        size most batches have) or ``rest`` (any other size), each with ``:per_example``
        for a program that also returns per-example values."""
        program = self._program(kind)
        try:
            outputs = program(params, batch)
        except Exception as e:  # noqa: BLE001
            error = evaluation_error(e, split_name, n)
            fallback = (
                self._xla
                and self.jit_compile is None
                and self.backend.is_compile_failure(e)
                and not error.out_of_memory
            )
            if fallback:
                warnings.warn(
                    f"trueloss-replay: XLA cannot compile this model ({type(e).__name__}); "
                    "evaluating without jit_compile.",
                    stacklevel=2,
                )
                self._xla = False
                self._programs.clear()
                return self._run(kind, params, batch, split_name, n)
            if not self._succeeded and not self.backend.is_runtime_error(e):
                # Nothing has run yet and tracing failed: model and data do not fit. A
                # runtime error (out of memory, a numeric check tripped by these weights)
                # belongs to the checkpoint instead.
                raise DataError(_shape_message(self.model, batch[0], split_name, e)) from e
            raise error from e
        self._succeeded = True
        return outputs

    def _program(self, kind: str) -> Callable:
        program = self._programs.get(kind)
        if program is None:
            backend = self.backend
            base, _, per_example = kind.partition(":")

            def body(params, batch):
                return self._step(params, batch, per_example=bool(per_example))

            if base.endswith("@"):  # several checkpoints' weights stacked
                loop = base == "loop@"
                jit = self._xla if loop else bool(self.jit_compile)
                program = backend.compile_stacked(body, jit, loop, on_trace=self._traced)
            elif base == "loop":
                program = backend.compile_loop(body, self._xla, on_trace=self._traced)
            else:
                # A split's last batch: one call per checkpoint, so no XLA unless asked for.
                jit = self._xla if base == "step" else bool(self.jit_compile)

                def step(params, batch):
                    self._traced()
                    return body(params, batch)

                program = backend.compile_step(step, jit)
            self._programs[kind] = program
        return program

    def _traced(self) -> None:
        self.traces += 1

    # --- the step

    def _build(self, x, y, sw, split_name: str) -> None:
        """One eager pass on a few examples creates the loss and metric objects and their
        variables, which a traced program must not create."""
        model = self.model
        try:
            few = slice(0, 2)
            xs, ys, sws = (take(v, few) for v in (x, y, sw))
            y_pred = model(xs, training=False)
            if model._compile_loss is not None:
                model._compile_loss(ys, y_pred, sws)
            if model._compile_metrics is not None:
                model._compile_metrics.update_state(ys, y_pred, sws)
        except Exception as e:  # noqa: BLE001 - wrong shapes surface as many error types
            if self.backend.is_runtime_error(e):  # at these weights, e.g. a NaN check
                raise evaluation_error(e, split_name, batch_length(x)) from e
            raise DataError(_shape_message(model, x, split_name, e)) from e
        if model._compile_loss is None and not overrides_compute_loss(model):
            raise ModelLoadError(
                f"{type(model).__name__} has no compiled loss and does not override "
                "compute_loss; there is no loss to replay."
            )
        compiled = [model._compile_metrics, *(getattr(model._compile_loss, "metrics", None) or [])]
        self._tracked = [m for m in compiled if m is not None]
        self._state = [v for m in self._tracked for v in m.variables]
        self._built = True

    def _step(self, params: Params, batch, per_example: bool = False):
        """Per batch: the data loss (a batch mean), the penalty, the metric states from zero;
        with ``per_example``, also ``[a, b, a, b, ...]``: per example, the numerator and
        denominator of each mean figure (``_per_example``)."""
        import keras

        trainable, non_trainable = params
        x, y, sw = batch
        model = self.model
        kwargs = {"training": False} if getattr(model, "_call_has_training_arg", True) else {}
        y_pred, _, losses = model.stateless_call(
            trainable, non_trainable, x, return_losses=True, **kwargs
        )
        reg = keras.ops.zeros((), "float32")
        for loss in losses:
            reg = reg + keras.ops.cast(model._aggregate_additional_loss(loss), "float32")
        zeros = [keras.ops.zeros(v.shape, v.dtype) for v in self._state]
        mapping = list(zip(model.trainable_variables, trainable, strict=True))
        mapping += list(zip(model.non_trainable_variables, non_trainable, strict=True))
        mapping += list(zip(self._state, zeros, strict=True))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            if overrides_compute_loss(model):
                data = _custom_data_loss(model, x, y, y_pred, sw)
            elif model._compile_loss is not None:
                data = model._compile_loss(y, y_pred, sw)
            else:
                data = None
            if model._compile_metrics is not None:
                model._compile_metrics.update_state(y, y_pred, sw)
        data = keras.ops.zeros((), "float32") if data is None else keras.ops.cast(data, "float32")
        states = []
        for variable, zero in zip(self._state, zeros, strict=True):
            value = scope.get_current_value(variable)
            states.append(zero if value is None else value)
        if not per_example:
            return data, reg, states
        # A scope of its own: the loss trackers it updates on the way are thrown away.
        with keras.StatelessScope(state_mapping=mapping):
            figures = self._per_example(y, y_pred, sw)
        self._per_example_names = [name for name, _, _ in figures]
        extras = [part for _, a, b in figures for part in (a, b)]
        return data, reg, states, extras

    def _per_example(self, y, y_pred, sw) -> list[tuple[str, Any, Any]]:
        """``(figure, a, b)`` per mean figure: per-example arrays whose batch sums give the
        figure as ``sum(a) / sum(b)``. The loss: ``a`` the example's weighted loss summed
        over outputs with their loss weights (the compiled loss with every reduction set to
        ``"none"``), ``b`` one, since Keras divides by the number of examples. A
        ``MeanMetricWrapper`` metric: ``a = w * value``, ``b = w`` (``w`` one for the
        unweighted ``metrics=``). Other metrics (AUC, Precision...) are no such mean."""
        import keras

        model = self.model
        figures = []
        compile_loss = model._compile_loss
        if compile_loss is not None:
            saved = compile_loss._flat_losses
            compile_loss._flat_losses = [
                type(entry)(entry.path, _per_example_loss(entry.loss), *entry[2:])
                for entry in saved
            ]
            try:
                a = compile_loss(y, y_pred, sw)
            finally:
                compile_loss._flat_losses = saved
            a = keras.ops.cast(a, "float32")
            figures.append(("loss", a, keras.ops.ones_like(a)))
        metrics = model._compile_metrics
        if metrics is None:
            return figures
        ys, preds = metrics._flatten_y(y), metrics._flatten_y(y_pred)
        weights = [None] * len(ys)
        if sw is not None:
            weights = metrics._flatten_y(sw)
            if len(weights) < len(ys):
                weights = [weights[0]] * len(ys)
        names: dict[str, int] = {}
        # The order and names of CompileMetrics.result(), so the keys match its figures.
        both = ((False, metrics._flat_metrics), (True, metrics._flat_weighted_metrics))
        for weighted, lists in both:
            for mls, y_t, y_p, w in zip(lists, ys, preds, weights, strict=False):
                if not mls:
                    continue
                for metric in mls.metrics:
                    prefix = f"{mls.output_name}_" if mls.output_name else ""
                    name = prefix + metric.name
                    if name not in names:
                        names[name] = 1
                    elif weighted:
                        name = f"{prefix}weighted_{metric.name}"
                    else:
                        names[name] += 1
                        name = f"{name}_{names[name] - 1}"
                    if isinstance(metric, keras.metrics.MeanMetricWrapper):
                        values = metric._fn(y_t, y_p, **metric._fn_kwargs)
                        a, b = _weighted_rows(values, w if weighted else None)
                        figures.append((name, a, b))
        return figures

    # --- read back

    def _reduce(self, pending: list[tuple[int, Any]], split: Split):
        """Per-batch outputs to the split's figures (``_figures_stacked``), read back in one
        call.

        Reading back only now lets the device run ahead of the host.
        """
        fetched = self._fetch({split.name: pending})[split.name]
        one = [(n, map_structure(lambda a: np.expand_dims(a, 0), out)) for n, out in fetched]
        return self._figures_stacked(one, split, 1)[0]

    def _fetch(self, pending: Mapping[str, list[tuple[int, Any]]]) -> dict[str, list]:
        """Every split's outputs as numpy, ``{split: [(examples per batch, outputs)]}``, in
        one transfer (one wait for the device)."""
        names = list(pending)
        try:  # an asynchronous device error surfaces when a value is read
            fetched = self.backend.to_host([[out for _, out in pending[n]] for n in names])
        except Exception as e:  # noqa: BLE001
            first = pending[names[0]] if names else []
            split = names[0] if names else ""
            raise evaluation_error(e, split, first[0][0] if first else 0) from e
        return {
            name: [(n, out) for (n, _), out in zip(pending[name], values, strict=True)]
            for name, values in zip(names, fetched, strict=True)
        }

    def _figures_stacked(
        self, fetched: list[tuple[int, Any]], split: Split, count: int
    ) -> list[tuple[dict[str, float], int]]:
        """Per-batch outputs (numpy, a leading axis of ``count`` checkpoints) to each
        checkpoint's figures: float64 sums on the host, for all checkpoints at once; for a
        sampled split also ``<figure>_se``, the standard error from the per-example values
        (``sampling.ratio_standard_error``)."""
        loss_sums = np.zeros(count)
        reg_sums = np.zeros(count)
        examples = 0
        state_sums: list[np.ndarray] | None = None
        extras: list[list[np.ndarray]] = []
        for n, (data, reg, states, *more) in fetched:
            # A group that is not full was padded: its last slots are not read.
            data = np.asarray(data, dtype=np.float64)[:count]
            reg = np.asarray(reg, dtype=np.float64)[:count]
            values = [np.asarray(s, dtype=np.float64)[:count] for s in states]
            if data.ndim == 2:  # the loop program's: [checkpoints, batches] of n examples
                examples += n * data.shape[1]
                values = [v.sum(axis=1) for v in values]
                data, reg = data.sum(axis=1), reg.sum(axis=1)
            else:
                examples += n
            loss_sums += data * n
            reg_sums += reg * n
            state_sums = (
                values
                if state_sums is None
                else [a + b for a, b in zip(state_sums, values, strict=True)]
            )
            if more:
                extras.append([np.asarray(v, dtype=np.float64) for v in more[0]])
        if examples == 0:
            raise DataError(f"{split.name} data yielded no examples.")
        metric_results = self._metric_results(
            [[s[c] for s in state_sums or []] for c in range(count)]
        )
        results = []
        for c in range(count):
            figures = {
                "loss": float(loss_sums[c]) / examples,
                "regularization_loss": float(reg_sums[c]) / examples,
            }
            figures.update(metric_results[c])
            if extras:
                population = getattr(split, "population", None)
                columns = [
                    np.concatenate([row[j][c].reshape(-1) for row in extras])
                    for j in range(len(extras[0]))
                ]
                for i, name in enumerate(self._per_example_names):
                    se = ratio_standard_error(columns[2 * i], columns[2 * i + 1], population)
                    figures[name + SE_SUFFIX] = se
            results.append((figures, examples))
        return results

    def _metric_results(self, state_sums: Sequence[Sequence[np.ndarray]]) -> list[dict[str, float]]:
        """Keras' own ``result()`` of each checkpoint's summed states (``state_sums``: one
        list per checkpoint), computed in host memory on values passed through a
        ``StatelessScope``: no variable assigned, no device round trip.

        The ``result()`` calls of all the checkpoints of a group run as one compiled host
        program, traced once per number of checkpoints. Eagerly they are a dozen small ops
        per metric, over a millisecond per split and checkpoint, which is as long as the
        whole forward pass of a small model on a GPU; and each call of a compiled program
        is a dispatch and a read-back (about 0.2 ms on a GPU host), so one call per split
        and group instead of one per split and checkpoint. A metric whose ``result()``
        cannot be traced is computed eagerly instead.
        """
        with self.backend.host_scope():
            values = [
                [total.astype(v.dtype) for v, total in zip(self._state, sums, strict=True)]
                for sums in state_sums
            ]
            if self._results_program is None:
                self._results_program = self.backend.compile_step(self._result_lists, jit=False)
            if self._results_program is not False:
                try:
                    results = self.backend.to_host(self._results_program(values))
                except Exception:  # noqa: BLE001 - a result() that cannot be traced
                    self._results_program = False
                else:  # lists, in the order result() gave the names when traced
                    return [
                        {
                            name: float(np.asarray(v))
                            for name, v in zip(self._result_names, checkpoint, strict=True)
                        }
                        for checkpoint in results
                    ]
            return [
                {name: float(np.asarray(v)) for name, v in self._results(checkpoint).items()}
                for checkpoint in values
            ]

    def _result_lists(self, values: Sequence[Sequence[Any]]) -> list[list[Any]]:
        """``_results`` of each checkpoint's state values as a list (a compiled program
        would sort a dict's keys), the names kept in ``_result_names``."""
        lists = []
        for checkpoint in values:
            results = self._results(checkpoint)
            self._result_names = list(results)
            lists.append(list(results.values()))
        return lists

    def _results(self, values: Sequence[Any]) -> dict[str, Any]:
        """Every tracked metric's ``result()`` with its state variables at ``values``."""
        import keras

        results: dict[str, Any] = {}
        with keras.StatelessScope(state_mapping=list(zip(self._state, values, strict=True))):
            for metric in self._tracked:
                value = metric.result()
                if not isinstance(value, dict):
                    value = {metric.name: value}
                # Read inside the scope: a result() that returns a state variable itself
                # must give the scope's value, not the variable's own.
                results.update(
                    {k: v.value if isinstance(v, keras.Variable) else v for k, v in value.items()}
                )
        return results


def _per_example_loss(loss_fn):
    """``loss_fn`` with reduction ``"none"``, averaged over each example's other axes
    (``sum_over_batch_size`` divides by every element, so this keeps the batch mean)."""
    if not hasattr(loss_fn, "reduction"):
        raise DataError(
            f"train_sample= needs per-example losses, and the loss {loss_fn!r} has no "
            "reduction to turn off; leave train_sample out.",
            usage=True,
            argument="train_sample",
        )

    def per_example(y_true, y_pred, sample_weight=None):
        import keras

        saved = loss_fn.reduction
        loss_fn.reduction = "none"
        try:
            values = keras.ops.cast(loss_fn(y_true, y_pred, sample_weight), "float32")
        finally:
            loss_fn.reduction = saved
        if len(values.shape) == 0:
            raise DataError(
                f"train_sample= needs per-example losses, and the loss {loss_fn.name!r} "
                "returns one value per batch even with reduction='none'; leave "
                "train_sample out.",
                usage=True,
                argument="train_sample",
            )
        if len(values.shape) > 1:
            values = keras.ops.mean(values, axis=tuple(range(1, len(values.shape))))
        return values

    return per_example


def _weighted_rows(values, weights):
    """Per example ``(a, b)`` of a Keras ``Mean``: ``a`` its weighted value, ``b`` its
    weight; values with more axes than the weights are averaged over them first, as
    ``reduce_to_samplewise_values`` does."""
    import keras

    ops = keras.ops
    values = ops.cast(values, "float32")
    if weights is None:
        weights = ops.ones((ops.shape(values)[0],), "float32")
    weights = ops.cast(weights, "float32")
    if len(values.shape) > len(weights.shape):
        values = ops.mean(values, axis=tuple(range(len(weights.shape), len(values.shape))))
    a = values * weights
    b = ops.broadcast_to(weights, ops.shape(a))
    if len(a.shape) > 1:
        axes = tuple(range(1, len(a.shape)))
        a, b = ops.sum(a, axis=axes), ops.sum(b, axis=axes)
    return a, b


def overrides_compute_loss(model) -> bool:
    """True when the model's class overrides ``compute_loss`` (Keras 3's documented hook)."""
    import keras

    return getattr(type(model), "compute_loss", None) is not keras.Model.compute_loss


def _custom_data_loss(model, x, y, y_pred, sw):
    """``compute_loss`` with ``model.losses`` reading as zero: the data part of its total."""
    import keras

    saved = model._losses_override
    model._losses_override = [keras.ops.zeros(())]
    try:
        return model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sw, training=False)
    finally:
        model._losses_override = saved


def evaluation_error(error: Exception, split_name: str, batch: int) -> EvaluationError:
    """The ``EvaluationError`` for a failure while evaluating a split at some weights."""
    if get_backend().is_out_of_memory(error):
        return EvaluationError(
            f"evaluating the {split_name} data ran out of device memory at batches of {batch}"
            "; pass a smaller batch_size (for array data) or smaller dataset batches.",
            out_of_memory=True,
            split=split_name,
        )
    text = " ".join(str(error).split())[:300] or type(error).__name__
    return EvaluationError(f"evaluating the {split_name} data failed: {text}", split=split_name)


def _shape_message(model, x, split_name: str, error: Exception) -> str:
    shapes = [tuple(a.shape) for a in flatten(x)]
    expected = getattr(model, "input_shape", None)
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return (
        f"{split_name} data does not fit the model: the model expects inputs of shape "
        f"{expected}, the data has {shapes if len(shapes) > 1 else shapes[0]} ({first})."
    )
