"""Explain the gap between the training loss Keras reported and the true training loss.

For each epoch-end checkpoint the reported loss splits into four measured parts::

    reported_loss = loss + gap_penalty + gap_training_mode + gap_drift

* ``loss``: the true training loss (replay: data loss, inference mode, end-of-epoch weights);
* ``gap_penalty``: ``regularization_loss`` at the end-of-epoch weights (from the replay);
* ``gap_training_mode``: the data loss on the training set evaluated with ``training=True``
  (dropout active, BatchNorm on batch statistics) minus ``loss``, averaged over a fixed set of
  seeds, with its standard error;
* ``gap_drift``: the rest, ``reported - (loss + penalty + training mode)``: the effect of
  averaging over weights that kept changing during the epoch, plus augmentation, plus any
  difference of activity penalties between training and inference mode.

The training-mode pass is side-effect free: it runs ``model.stateless_call`` with the
checkpoint's arrays passed as values, so no variable of the model is assigned, BatchNorm's
moving statistics included, and the checkpoint file is only read.

Decisions. Each seed fixes every Dropout-like layer's ``SeedGenerator`` state (the values
passed to ``stateless_call``, never the variables) and, for array data, the order of the
training set, as ``fit(shuffle=True)`` reshuffles it every epoch; the standard error thus
covers both the dropout masks and which examples share a BatchNorm batch. BatchNorm batch
statistics depend on the batch size, so the pass uses the *training* batch size. Keras'
History does not record it; the callback records ``steps_per_epoch``, and
``infer_batch_size`` picks a batch size consistent with it (see there). ``batch_size``
overrides it. Data given as a ``tf.data.Dataset`` or ``PyDataset`` is iterated with its own
batches, in its own order.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trueloss_replay import run as runfmt
from trueloss_replay.backends import get_backend
from trueloss_replay.data import ArraySplit, Split, batch_length, resolve_splits, take
from trueloss_replay.errors import (
    DataError,
    ExplainIncompleteError,
    RunFormatError,
    TruelossReplayError,
)
from trueloss_replay.progress import ProgressHooks, progress_display

DEFAULT_SEEDS = 5
KERAS_DEFAULT_BATCH_SIZE = 32
#: The frame ``explain`` returns, column by column.
COLUMNS = (
    "checkpoint",
    "epoch",
    "reported_loss",
    "reported_val_loss",
    "loss",
    "val_loss",
    "gap_penalty",
    "gap_training_mode",
    "gap_training_mode_se",
    "gap_drift",
    "batch_size",
    "seeds",
)
# Relative difference of true train and val loss beyond which the verdict calls it a gap.
_FIT_MARGIN = 0.05
_STRONG_OVERFIT = 0.25


# --------------------------------------------------------------------------- batch size


def infer_batch_size(examples: int, steps_per_epoch: int) -> int:
    """The training batch size, from the number of examples and the steps per epoch.

    Several batch sizes give the same number of steps (180 examples in 6 steps: any batch
    size from 30 to 35). Among those, the choice is Keras' default 32 when it fits, else the
    largest power of two that fits, else the smallest that fits: users pick 32 and powers of
    two far more often than anything else. With no consistent batch size (the data differ
    from those of training) it is ``ceil(examples / steps_per_epoch)``.

    Example:
        >>> infer_batch_size(180, 6), infer_batch_size(1000, 8), infer_batch_size(100, 1)
        (32, 128, 100)
    """
    if examples <= 0 or steps_per_epoch <= 0:
        raise DataError(
            f"cannot infer a batch size from {examples} examples and {steps_per_epoch} steps "
            "per epoch; pass batch_size=."
        )
    low = math.ceil(examples / steps_per_epoch)
    if steps_per_epoch == 1:
        return examples
    high = math.ceil(examples / (steps_per_epoch - 1)) - 1
    if low > high:
        return low
    if low <= KERAS_DEFAULT_BATCH_SIZE <= high:
        return KERAS_DEFAULT_BATCH_SIZE
    power = 1 << int(math.log2(high))
    return power if power >= low else low


def _training_batch_size(run: runfmt.Run, split: Split, override: int | None) -> int | None:
    if override is not None:
        if int(override) < 1:
            raise DataError(f"batch_size must be at least 1; received {override}.")
        return int(override)
    if not isinstance(split, ArraySplit):
        return None  # a dataset brings its own batches
    steps = run.manifest.get("steps_per_epoch") or (run.manifest.get("params") or {}).get("steps")
    if not steps:
        raise DataError(
            f"{run.path / runfmt.MANIFEST} does not record the steps per epoch, so the "
            "training batch size is unknown; pass batch_size= as given to fit()."
        )
    return infer_batch_size(split.count, int(steps))


def _seed_list(seeds: int | Iterable[int]) -> list[int]:
    if isinstance(seeds, (int, np.integer)):
        if seeds < 1:
            raise DataError(f"seeds must be at least 1; received {seeds}.")
        return list(range(int(seeds)))
    chosen = [int(s) for s in seeds]
    if not chosen:
        raise DataError("seeds is empty; give a count or at least one seed.")
    return chosen


# --------------------------------------------------------------------------- the pass


def training_mode_layers(model) -> list[str]:
    """Class names of the layers that behave differently with ``training=True``.

    Those are the layers that draw random numbers (Dropout, GaussianNoise, augmentation)
    and BatchNormalization; used to name the cause in the verdict.
    """
    import keras

    names = set()
    for layer in model._flatten_layers(include_self=False):
        random = bool(getattr(layer, "_seed_generators", None))
        if random or isinstance(layer, keras.layers.BatchNormalization):
            names.add(type(layer).__name__)
    return sorted(names)


class TrainingModeEvaluator:
    """The data loss of one model in training mode, without changing any of its state.

    The model's forward pass runs through ``stateless_call``: weights, BatchNorm statistics
    and seed states are passed in as values, and what the call would have assigned is
    returned instead (and dropped, except the advancing seed states). The compiled loss runs
    in a ``StatelessScope`` too, so loss trackers of multi-output models stay as they are.

    Args:
        model: a built, compiled Keras model.
        device: a device name of the current backend (``resolve_devices``).

    Example:
        >>> evaluator = TrainingModeEvaluator(model)
        >>> evaluator.losses(split, batch_size=32, seeds=[0, 1, 2])
        array([0.71, 0.69, 0.70])
    """

    def __init__(self, model, device: str | None = None):
        self.backend = get_backend()
        self.model = model
        self.device = device or self.backend.default_device()
        self.traces = 0
        self._step = None
        self._seed_ids = {
            id(generator.state)
            for layer in model._flatten_layers(include_self=True)
            for generator in getattr(layer, "_seed_generators", [])
        }

    def losses(
        self,
        split: Split,
        *,
        batch_size: int | None,
        seeds: Sequence[int],
        weights: Mapping[str, np.ndarray] | None = None,
        source: str = "(in memory)",
        shuffle: bool = True,
    ) -> np.ndarray:
        """The training-mode data loss on ``split``, one value per seed.

        Args:
            split: the training data.
            batch_size: the training batch size (ignored for datasets, which bring theirs).
            seeds: one pass per seed; a seed fixes the dropout masks and the order of array
                data.
            weights: a checkpoint's arrays (``run.read_weights``); default: the model's
                current values. The model's variables are never assigned either way.
            source: the name error messages give ``weights``.
            shuffle: shuffle array data per seed, as ``fit(shuffle=True)`` does.

        Returns:
            float64 array: per seed, the batch-size-weighted mean of the per-batch compiled
            loss, as Keras aggregates the loss it reports.
        """
        with self.backend.device_scope(self.device):
            trainable, non_trainable = self._values(weights, source)
            totals = []
            for seed in seeds:
                state = self._seeded(non_trainable, seed)
                total = 0.0
                count = 0
                for x, y, sw in self._batches(split, batch_size, seed, shuffle):
                    n = batch_length(x)
                    if n == 0:
                        continue
                    if self._step is None:
                        self._build(x, y, sw)
                    loss, state = self._step(trainable, state, x, y, sw)
                    total += float(loss) * n
                    count += n
                if count == 0:
                    raise DataError(f"{split.name} data yielded no examples.")
                totals.append(total / count)
        return np.asarray(totals, dtype=np.float64)

    def _values(self, weights, source):
        model = self.model
        if weights is None:
            by_id = {}
        else:
            arrays = runfmt.match_weights(model, weights, source)
            by_id = {id(v): a for v, a in zip(model.weights, arrays, strict=True)}

        def value(variable):
            array = by_id.get(id(variable))
            if array is None:
                array = np.asarray(variable)
            return self.backend.to_device(np.asarray(array, dtype=variable.dtype), self.device)

        trainable = [value(v) for v in model.trainable_variables]
        non_trainable = [value(v) for v in model.non_trainable_variables]
        return trainable, non_trainable

    def _seeded(self, non_trainable, seed: int):
        values = list(non_trainable)
        index = 0
        for position, variable in enumerate(self.model.non_trainable_variables):
            if id(variable) in self._seed_ids:
                # One independent stream per generator, so two Dropout layers never share masks.
                start = np.random.SeedSequence([seed, index]).generate_state(1)[0]
                state = np.array([int(start), 0], dtype=variable.dtype)
                values[position] = self.backend.to_device(state, self.device)
                index += 1
        return values

    def _batches(self, split: Split, batch_size, seed: int, shuffle: bool):
        if not isinstance(split, ArraySplit):
            yield from split.batches(batch_size or 1)
            return
        order = (
            np.random.default_rng(seed).permutation(split.count)
            if shuffle
            else np.arange(split.count)
        )
        for start in range(0, split.count, batch_size):
            part = order[start : start + batch_size]
            yield tuple(take(v, part) for v in (split.x, split.y, split.sample_weight))

    def _build(self, x, y, sw) -> None:
        import keras

        model = self.model
        compile_loss = model._compile_loss
        if compile_loss is None:
            raise DataError("the model has no compiled loss; there is no loss to explain.")
        if not compile_loss.built:
            # The loss creates its trackers on the first call, which a traced function must
            # not do; their state is put back afterwards.
            few = slice(0, 2)
            trackers = [v for m in compile_loss.metrics for v in m.variables]
            saved = [np.array(v.numpy()) for v in trackers]
            with keras.StatelessScope():
                y_pred = model(take(x, few), training=False)
            compile_loss(take(y, few), y_pred, take(sw, few))
            trackers = [v for m in compile_loss.metrics for v in m.variables]
            for variable, value in zip(trackers, saved, strict=False):
                variable.assign(value)
            for variable in trackers[len(saved) :]:
                variable.assign(np.zeros(variable.shape, variable.dtype))
        seed_positions = [
            i for i, v in enumerate(model.non_trainable_variables) if id(v) in self._seed_ids
        ]

        def step(trainable, non_trainable, x, y, sw):
            self.traces += 1
            y_pred, updated = model.stateless_call(trainable, non_trainable, x, training=True)
            with keras.StatelessScope():
                loss = compile_loss(y, y_pred, sw)
            # Only the seed states move on (a fresh mask per batch, as in fit); BatchNorm's
            # updated moving statistics are dropped: training mode does not read them.
            state = list(non_trainable)
            for i in seed_positions:
                state[i] = updated[i]
            return keras.ops.cast(loss, "float32"), state

        # Training mode runs once per seed and checkpoint: a plain graph on TensorFlow.
        self._step = self.backend.compile_step(step, jit=False)


# --------------------------------------------------------------------------- the parts


def decompose(
    reported: float, loss: float, penalty: float, training_mode_loss: float
) -> dict[str, float]:
    """The three parts of ``reported - loss``; they sum back to ``reported`` by construction.

    Args:
        reported: the training loss Keras reported for the epoch.
        loss: the true training loss (inference mode, no penalty).
        penalty: ``regularization_loss`` at the end-of-epoch weights.
        training_mode_loss: the training-set data loss in training mode.

    Returns:
        ``{"penalty", "training_mode", "drift"}``, with ``drift`` the remainder.

    Example:
        >>> decompose(1.0, 0.5, 0.25, 0.65)
        {'penalty': 0.25, 'training_mode': 0.15000000000000002, 'drift': 0.09999999999999998}
    """
    training_mode = training_mode_loss - loss
    return {
        "penalty": penalty,
        "training_mode": training_mode,
        "drift": reported - (loss + penalty + training_mode),
    }


def explain(
    run_dir: str | os.PathLike,
    *,
    seeds: int | Iterable[int] = DEFAULT_SEEDS,
    batch_size: int | None = None,
    shuffle: bool = True,
    output: str | os.PathLike | None = None,
    force: bool = False,
    data: str | None = None,
    train: Any = None,
    val: Any = None,
    device: str | None = None,
    unsafe_deserialization: bool = False,
    model: Callable | str | None = None,
    imports: Iterable[str] = (),
    on_checkpoint: Callable[[str, bool], None] | None = None,
    trust_data_factory: bool = False,
    progress: bool | ProgressHooks | None = True,
) -> pd.DataFrame:
    """Splits each epoch's reported training loss into true loss, penalty, training mode, drift.

    The epoch-end checkpoints are replayed first (``replay()`` reuses results it already
    stored for the same data, so this costs nothing after a replay). Then each checkpoint's
    training set is evaluated in training mode, without changing any model state or file,
    and the parts are stored in its result file under ``"explain"``; the History gets them
    as ``gap_penalty``, ``gap_training_mode`` (with ``gap_training_mode_se``) and
    ``gap_drift``. Parts stored earlier with the same seeds, batch size and shuffling are
    reused unless ``force``.

    Args:
        run_dir: the run folder.
        seeds: how many seeds (0, 1, ...), or the seeds themselves, for the training-mode
            pass; its standard error is ``std / sqrt(len(seeds))``.
        batch_size: the training batch size; default inferred from the manifest's
            ``steps_per_epoch`` (``infer_batch_size``).
        shuffle: shuffle array data per seed, as ``fit(shuffle=True)`` does.
        output: the results folder (default ``RUN_DIR/replay/results``).
        force: recompute the parts even when stored (the replay results are reused).
        data: a ``module:function`` data factory, as for ``replay``.
        train: training data, as for ``replay``.
        val: validation data, as for ``replay``.
        device: a device of the current backend (``resolve_devices``) for the replay and the
            pass (default: the first GPU, else the CPU).
        unsafe_deserialization: load ``model.keras`` with ``safe_mode=False``.
        model: a model builder when the run has no saved architecture.
        imports: modules to import first (custom layers, losses, metrics).
        on_checkpoint: called with each checkpoint's name and whether it was reused.
        trust_data_factory: call the manifest's data factory even when it resolves to the
            standard library or an installed package (``data.check_recorded_factory``).
        progress: show progress bars (a terminal's stderr, or the notebook): the replay,
            then the training-mode pass; False shows nothing. An object with the
            ``progress.ProgressHooks`` methods gets the progress instead.

    Returns:
        pandas.DataFrame: one row per epoch-end checkpoint with the columns of ``COLUMNS``;
        ``loss + gap_penalty + gap_training_mode + gap_drift == reported_loss``.
        ``frame.attrs["training_mode_layers"]`` names the layers behind the training-mode part.

    Raises:
        RunFormatError: the run folder is unreadable or has no epoch-end checkpoint.
        DataError: no training data, or data that does not fit the model.
        ModelLoadError: the model cannot be rebuilt.
        ExplainIncompleteError: some checkpoints failed (unreadable, not matching the model,
            or their result could not be written); ``error.frame`` has the others.

    Example:
        >>> frame = explain("runs/exp1")
        >>> frame[["epoch", "reported_loss", "loss", "gap_penalty", "gap_drift"]]
        >>> print(verdict(frame))
    """
    run_dir, output = runfmt.local_folders(run_dir, output)
    from trueloss_replay.backends import resolve_devices
    from trueloss_replay.engine import evaluation_error, import_modules, load_model
    from trueloss_replay.errors import ReplayIncompleteError
    from trueloss_replay.history import export_history
    from trueloss_replay.scheduler import replay

    backend = get_backend()  # an unsupported Keras backend is refused before any work
    run = runfmt.Run(run_dir)
    import_modules(imports)
    seed_list = _seed_list(seeds)
    splits = resolve_splits(
        run, data=data, train=train, val=val, trust_data_factory=trust_data_factory
    )
    if data is None and trust_data_factory:
        data = run.manifest.get("data")  # confirmed: the replay below may call it too
    train_split = splits["train"]
    batch = _training_batch_size(run, train_split, batch_size)
    device = device or resolve_devices("auto")[0]
    results_dir = runfmt.results_folder(run.path, output)
    checkpoints = [c for c in run.checkpoints(epoch_end_only=True) if c.epoch >= 1]
    if not checkpoints:
        raise RunFormatError(
            f"{run.path} has no epoch-end checkpoint yet; there is no reported loss to explain."
        )

    failures = {c.name: c.error for c in checkpoints if c.error}
    usable = [c for c in checkpoints if not c.error]
    with progress_display(progress) as display:
        if usable:
            try:
                replay(
                    run.path,
                    data=data,
                    train=train_split,
                    val=splits.get("val"),
                    devices=[device],
                    epochs=[c.epoch for c in usable],
                    # A sub-epoch checkpoint shares its epoch number; it has no reported loss.
                    epoch_end_only=True,
                    output=results_dir,
                    unsafe_deserialization=unsafe_deserialization,
                    model=model,
                    progress=display,
                )
            except ReplayIncompleteError as e:
                failures.update(e.failures)

        settings = {"seeds": seed_list, "batch_size": batch, "shuffle": shuffle}
        evaluator: TrainingModeEvaluator | None = None
        layers: list[str] | None = None
        rows = []
        stage = getattr(display, "stage", None)  # absent from a caller's own hooks
        if stage is not None:
            stage("training mode", len(usable))
        for c in usable:
            if c.name in failures:
                continue
            path = runfmt.result_path(results_dir, c.name)
            try:
                result = runfmt.read_result(path)
            except RunFormatError as e:
                failures[c.name] = str(e)
                continue
            # A diverged epoch's NaN is stored as null, but the key is there.
            if "loss" not in (result.get("reported") or {}):
                failures[c.name] = "Keras logged no training loss for this epoch"
                continue
            stored = result.get("explain")
            reuse = not force and isinstance(stored, dict) and _same_settings(stored, settings)
            if not reuse:
                if evaluator is None:
                    with backend.device_scope(device):
                        evaluator = TrainingModeEvaluator(
                            load_model(run, model, unsafe_deserialization), device
                        )
                    layers = training_mode_layers(evaluator.model)
                try:
                    stored = _explain_checkpoint(
                        evaluator,
                        c,
                        result,
                        path,
                        train_split,
                        settings={**settings, "layers": layers},
                    )
                except DataError:  # the data or the model, not this checkpoint: stop
                    raise
                except TruelossReplayError as e:
                    failures[c.name] = str(e)
                    continue
                except OSError as e:  # h5py or the file system, outside atomic_path
                    failures[c.name] = str(runfmt.write_error(path, e))
                    continue
                except Exception as e:  # noqa: BLE001
                    if not backend.is_runtime_error(e):
                        raise
                    # At these weights: out of memory, a numeric check.
                    failures[c.name] = str(evaluation_error(e, "train", batch))
                    continue
            if on_checkpoint is not None:
                on_checkpoint(c.name, reuse)
            display.checkpoint_done(None, reused=reuse)
            rows.append(_row(c, result, stored))
            if layers is None and stored.get("layers") is not None:
                layers = list(stored["layers"])

    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame.attrs["training_mode_layers"] = layers or []
    with contextlib.suppress(RunFormatError):  # the exports now carry the gap_* columns
        export_history(run.path, results_dir)
    if failures:
        raise ExplainIncompleteError(run.path, failures, frame)
    return frame


def _explain_checkpoint(
    evaluator: TrainingModeEvaluator,
    checkpoint: runfmt.Checkpoint,
    result: dict[str, Any],
    path: Path,
    train_split: Split,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """Computes one checkpoint's parts and stores them in its result file."""
    per_seed = evaluator.losses(
        train_split,
        batch_size=settings["batch_size"],
        seeds=settings["seeds"],
        # Checked against this model from the file's metadata before any data is read.
        weights=runfmt.read_weights(checkpoint.path, runfmt.model_signature(evaluator.model)),
        source=str(checkpoint.path),
        shuffle=settings["shuffle"],
    )
    figures = result["train"]
    parts = decompose(
        runfmt.json_float(result["reported"]["loss"]),
        runfmt.json_float(figures.get("loss")),
        runfmt.json_float(figures.get("regularization_loss", 0.0)),
        float(per_seed.mean()),
    )
    stored = {
        **parts,
        "training_mode_se": _standard_error(per_seed),
        "training_mode_losses": per_seed.tolist(),
        **settings,
    }
    runfmt.write_result(path.parent, {**result, "explain": stored})
    result["explain"] = stored
    return stored


def _same_settings(stored: Mapping[str, Any], settings: Mapping[str, Any]) -> bool:
    return all(stored.get(k) == v for k, v in settings.items())


def _standard_error(values: np.ndarray) -> float | None:
    if len(values) < 2:
        return None  # unknown with one seed; null in JSON, NaN in the History
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def _row(checkpoint: runfmt.Checkpoint, result: Mapping[str, Any], parts: Mapping[str, Any]):
    val = result.get("val") or {}
    se = parts.get("training_mode_se")
    return {
        "checkpoint": checkpoint.name,
        "epoch": checkpoint.epoch,
        "reported_loss": runfmt.json_float(result["reported"]["loss"]),
        "reported_val_loss": runfmt.json_float(result["reported"].get("val_loss")),
        "loss": runfmt.json_float(result["train"].get("loss")),
        "val_loss": runfmt.json_float(val.get("loss")),
        "gap_penalty": runfmt.json_float(parts.get("penalty")),
        "gap_training_mode": runfmt.json_float(parts.get("training_mode")),
        "gap_training_mode_se": runfmt.json_float(se),
        "gap_drift": runfmt.json_float(parts.get("drift")),
        "batch_size": parts.get("batch_size"),
        "seeds": len(parts.get("seeds") or []),
    }


# --------------------------------------------------------------------------- verdict


_CAUSE_NAMES = {"Dropout": "dropout", "BatchNormalization": "BatchNorm"}


def verdict(frame: pd.DataFrame, layers: Sequence[str] | None = None) -> str:
    """A one-paragraph, plain-language reading of the last explained epoch.

    It states the reported training loss against the reported validation loss, how much of
    the gap to the true training loss each part carries, and compares the true training loss
    with the validation loss: *overfitting* when the training set fits better by more than
    5% (*mild* up to 25%), *underfitting* when the two agree within 5% but the true training
    loss still fell by more than 2% in the last epoch, otherwise no sign of either.

    Args:
        frame: the table ``explain`` returns.
        layers: the training-mode layer names (default ``frame.attrs["training_mode_layers"]``).

    Returns:
        The paragraph; a short notice when nothing is explained.

    Example:
        >>> print(verdict(explain("runs/exp1")))
        At epoch 20 the reported training loss 1.01 exceeds the validation loss 0.87. ...
    """
    rows = frame.dropna(subset=["reported_loss", "loss", "gap_drift"])
    if rows.empty:
        return "No epoch is explained yet; there is nothing to judge."
    last = rows.iloc[-1]
    reported, true = float(last["reported_loss"]), float(last["loss"])
    scale = abs(reported) or 1.0
    digits = max(2, 2 - math.floor(math.log10(scale)))

    def fmt(value: float) -> str:
        text = f"{value:.{digits}f}"
        return text[1:] if text.startswith("-") and float(text) == 0 else text

    epoch = int(last["epoch"])
    reported_val = float(last["reported_val_loss"])
    if math.isnan(reported_val):
        first = f"At epoch {epoch} the reported training loss is {fmt(reported)}."
    else:
        relation = (
            "exceeds"
            if reported > reported_val
            else ("is below" if reported < reported_val else "equals")
        )
        first = (
            f"At epoch {epoch} the reported training loss {fmt(reported)} {relation} the "
            f"validation loss {fmt(reported_val)}."
        )

    layers = list(layers if layers is not None else frame.attrs.get("training_mode_layers") or [])
    cause = ", ".join(_CAUSE_NAMES.get(name, name) for name in layers) or (
        "there is no dropout or BatchNorm layer"
    )
    se = float(last["gap_training_mode_se"])
    mode = fmt(float(last["gap_training_mode"]))
    if not math.isnan(se):
        mode += f" ± {fmt(se)}"
    second = (
        f"The true training loss is {fmt(true)}: {fmt(float(last['gap_penalty']))} of the gap "
        f"is the regularization penalty, {mode} is training mode ({cause}), "
        f"{fmt(float(last['gap_drift']))} is the within-epoch average over changing weights."
    )
    return f"{first} {second} {_fit_sentence(rows, fmt)}"


def _fit_sentence(rows: pd.DataFrame, fmt: Callable[[float], str]) -> str:
    last = rows.iloc[-1]
    true, val = float(last["loss"]), float(last["val_loss"])
    if math.isnan(val):
        return "There is no validation set to compare the true training loss with."
    pair = f"({fmt(true)} vs {fmt(val)})"
    relative = (val - true) / (max(abs(val), abs(true)) or 1.0)
    if relative > _FIT_MARGIN:
        degree = "much better" if relative > _STRONG_OVERFIT else "better"
        label = "overfitting" if relative > _STRONG_OVERFIT else "mild overfitting"
        return f"The model fits the training set {degree} than the validation set {pair}: {label}."
    if relative < -_FIT_MARGIN:
        return (
            f"The model fits the validation set better than the training set {pair}: no "
            "overfitting; the validation set may be easier than the training set."
        )
    if len(rows) >= 2:
        before = float(rows.iloc[-2]["loss"])
        fall = (before - true) / (abs(before) or 1.0)
        if fall > 0.02:
            return (
                f"The true training and validation losses agree {pair} and the training loss "
                f"still fell by {fall:.0%} in the last epoch: underfitting; train longer or "
                "use a larger model."
            )
    return (
        f"The true training and validation losses agree {pair}: no sign of over- or underfitting."
    )
