"""Replaying a run: choosing checkpoints, reusing results, scheduling devices, writing results.

``replay()`` is the orchestration; each of its parts has a name here: ``select`` picks the
checkpoints and the results that can be reused, ``Shard`` keeps a job-array task's share
of them (``parse_shard`` reads it from Slurm or Kubernetes), ``_evaluate_all`` spreads the
rest over the devices (one worker thread and one model replica per device, pulling from one
queue), the loops evaluate one checkpoint at a time or several per produced batch
(data-major), and each result is written atomically as soon as it is computed, so an
interrupted replay resumes where it stopped. The figures themselves come from ``engine.Evaluator``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import queue
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from trueloss_replay import run as runfmt
from trueloss_replay import storage
from trueloss_replay.backends import get_backend, resolve_devices
from trueloss_replay.data import ArraySplit, resolve_splits
from trueloss_replay.engine import DEFAULT_BATCH_SIZE, Evaluator, import_modules, load_model
from trueloss_replay.errors import (
    DataError,
    EvaluationError,
    ReplayIncompleteError,
    RunFormatError,
    RunWriteError,
    ShardError,
    StorageError,
    TruelossReplayError,
)
from trueloss_replay.progress import ProgressHooks, progress_display
from trueloss_replay.reading import Readers, reader_count
from trueloss_replay.sampling import sample_split

# Data-major mode stages up to this many bytes of weights (several checkpoints) on a device,
# and at most this many checkpoints per produced batch.
DATA_MAJOR_BYTES = 256 * 1024**2
DATA_MAJOR_MAX_GROUP = 16


# --------------------------------------------------------------------------- selection


def parse_epochs(spec: str | Iterable[int] | None) -> runfmt.EpochSet | None:
    """``"1,3,5-9"`` as an ``EpochSet`` (ranges, never expanded); None means every checkpoint.

    ``"1-1000000000"`` costs no more than ``"1-9"``: membership is tested against the ranges.

    Raises:
        DataError: a part is not an epoch or a range like ``5-9``.
    """
    if spec is None or isinstance(spec, runfmt.EpochSet):
        return spec
    if not isinstance(spec, str):
        return runfmt.EpochSet((int(e), int(e)) for e in spec)
    ranges = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        low, sep, high = part.partition("-")
        try:
            lo, hi = (int(low), int(high)) if sep else (int(low), int(low))
            if hi < lo or lo < 0:
                raise ValueError
        except ValueError as e:
            raise DataError(
                f"{part!r} is not an epoch or a range like 5-9 (in epochs={spec!r}).",
                usage=True,
                argument="epochs",
            ) from e
        ranges.append((lo, hi))
    return runfmt.EpochSet(ranges)


#: A Kubernetes Indexed Job sets only ``JOB_COMPLETION_INDEX``; the count comes from here
#: (or from ``shard="auto/N"``).
SHARD_COUNT_ENV = "TRUELOSS_REPLAY_SHARD_COUNT"
_SLURM_ID, _SLURM_COUNT = "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"
_SLURM_MIN, _SLURM_STEP = "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"
_K8S_INDEX = "JOB_COMPLETION_INDEX"


@dataclasses.dataclass(frozen=True)
class Shard:
    """One of ``count`` shards of a replay, ``index`` counted from 0.

    A checkpoint belongs to the shard whose index is its position (from 0) in the selected
    checkpoints, in training order, modulo ``count``: the split is balanced (shares differ by
    at most one checkpoint), the same in every process, and independent of which results
    already exist; checkpoints a live run adds later only append positions.

    Example:
        >>> Shard(1, 3).share(["e0000", "e0001", "e0002", "e0003", "e0004"])
        ['e0001', 'e0004']
    """

    index: int
    count: int

    def __post_init__(self):
        if not (0 < self.count and 0 <= self.index < self.count):
            raise ShardError(
                f"shard={self.index}/{self.count} is out of range: the index counts from 0 to "
                "n-1 (shards 0/3, 1/3 and 2/3 make a whole).",
                argument="shard",
            )

    def share(self, items: Sequence) -> list:
        """The items at positions ``index``, ``index + count``, ... of ``items``."""
        return list(items[self.index :: self.count])

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(
    spec: str | Shard | tuple[int, int] | None, environ: Mapping[str, str] | None = None
) -> Shard | None:
    """The shard a ``shard`` argument names: ``"i/n"``, ``"auto"``, ``"auto/n"`` or None.

    ``"auto"`` reads the job array's environment: under Slurm the index is
    ``(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP`` (so
    ``--array=1-8`` and ``--array=0-7`` both give shards 0..7) and the count
    ``SLURM_ARRAY_TASK_COUNT``; in a Kubernetes Indexed Job the index is
    ``JOB_COMPLETION_INDEX`` and the count is ``n`` of ``"auto/n"`` or, failing that,
    ``TRUELOSS_REPLAY_SHARD_COUNT``.

    Args:
        spec: the shard; None for no sharding (every checkpoint).
        environ: the environment to read for ``"auto"`` (default ``os.environ``).

    Returns:
        A ``Shard``, or None when ``spec`` is None.

    Raises:
        ShardError: a malformed spec, an index out of range, or ``"auto"`` without the
            variables it needs (the message names what to set).

    Example:
        >>> parse_shard("1/3")
        Shard(index=1, count=3)
        >>> parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1",
        ...                      "SLURM_ARRAY_TASK_COUNT": "8"})
        Shard(index=4, count=8)
    """
    if spec is None or isinstance(spec, Shard):
        return spec
    if isinstance(spec, tuple):
        return Shard(*(int(v) for v in spec))
    environ = os.environ if environ is None else environ
    text = str(spec).strip()
    head, sep, tail = text.partition("/")
    count = _shard_int(tail, spec) if sep else None
    if head.strip().lower() == "auto":
        return _shard_from_environment(environ, count, spec)
    if not sep:
        raise ShardError(
            f"shard={spec!r} is not a shard; give i/n (0 <= i < n, e.g. 0/4), auto, or auto/n.",
            argument="shard",
        )
    return Shard(_shard_int(head, spec), count)


def _shard_int(text: str, spec) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise ShardError(
            f"shard={spec!r} is not a shard; give i/n (0 <= i < n, e.g. 0/4), auto, or auto/n.",
            argument="shard",
        )
    return value


def _environment_int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError as e:
        raise ShardError(
            f"shard='auto': {name}={environ[name]!r} is not an integer.", argument="shard"
        ) from e


def _shard_from_environment(environ: Mapping[str, str], count: int | None, spec) -> Shard:
    if _SLURM_ID in environ:
        task = _environment_int(environ, _SLURM_ID)
        first = _environment_int(environ, _SLURM_MIN) if _SLURM_MIN in environ else 0
        step = _environment_int(environ, _SLURM_STEP) if _SLURM_STEP in environ else 1
        slurm_count = _environment_int(environ, _SLURM_COUNT) if _SLURM_COUNT in environ else None
        if count is None and slurm_count is None:
            raise ShardError(
                f"shard='auto' found {_SLURM_ID} but not {_SLURM_COUNT}; set it to the number "
                f"of array tasks, or give the count as shard='auto/N'.",
                argument="shard",
            )
        if count is not None and slurm_count is not None and count != slurm_count:
            raise ShardError(
                f"shard={spec!r} says {count} shards but {_SLURM_COUNT}={slurm_count}; give "
                "shard='auto' to use the array's count.",
                argument="shard",
            )
        count = count if count is not None else slurm_count
        offset = task - first
        if step < 1 or offset < 0 or offset % step or offset // step >= count:
            raise ShardError(
                f"shard='auto': Slurm array task {task} (min {first}, step {step}, count "
                f"{count}) is not one of a contiguous array; submit the array as a range "
                f"such as 0-{count - 1} (or a-b:step), not as a list of ids.",
                argument="shard",
            )
        return Shard(offset // step, count)
    if _K8S_INDEX in environ:
        index = _environment_int(environ, _K8S_INDEX)
        if count is None:
            if SHARD_COUNT_ENV not in environ:
                raise ShardError(
                    f"shard='auto' found {_K8S_INDEX} (a Kubernetes Indexed Job) but no count; "
                    f"give shard='auto/N' or set {SHARD_COUNT_ENV} to the Job's completions.",
                    argument="shard",
                )
            count = _environment_int(environ, SHARD_COUNT_ENV)
        if count < 1 or index >= count:
            raise ShardError(
                f"shard='auto': {_K8S_INDEX}={index} is not below the count {count}; set the "
                "count to the Job's completions.",
                argument="shard",
            )
        return Shard(index, count)
    raise ShardError(
        f"shard='auto' found no job-array index: set {_SLURM_ID} and {_SLURM_COUNT} (a Slurm "
        f"array job sets them) or {_K8S_INDEX} (a Kubernetes Indexed Job sets it) with the "
        f"count in shard='auto/N' or {SHARD_COUNT_ENV}; or give shard='i/n'.",
        argument="shard",
    )


def _reusable(path: Path, checkpoint: runfmt.Checkpoint, fingerprints: dict) -> dict | None:
    try:
        result = runfmt.read_result(path)
    except RunFormatError:
        return None
    if result.get("checkpoint_time") != checkpoint.time or result.get("data") != fingerprints:
        return None
    return result


# --------------------------------------------------------------------------- replay


def _device_names(devices: str | Sequence[str]) -> list[str]:
    """The device names ``devices=`` selects; none is the caller's error."""
    names = resolve_devices(devices) if isinstance(devices, str) else list(devices)
    if not names:
        raise DataError(
            "devices= names no device; use 'auto', 'cpu', 'gpu' or device names.",
            usage=True,
            argument="devices",
        )
    return names


def _results_dir(run: runfmt.Run, output: str | os.PathLike | None) -> Path:
    """The results folder (default ``RUN_DIR/replay/results``), created."""
    folder = Path(output) if output is not None else run.results_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFormatError(f"cannot create the results folder {folder}: {e}") from e
    return folder


def _batch_size(batch_size: int | None, splits: Mapping[str, Any]) -> int:
    """The evaluation batch size: the caller's, else the default, never above the data."""
    if batch_size is not None:
        return batch_size
    counts = [s.count for s in splits.values() if isinstance(s, ArraySplit)]
    # No default batch larger than the data: that shape would occur nowhere.
    return min(DEFAULT_BATCH_SIZE, max(counts)) if counts else DEFAULT_BATCH_SIZE


class _SerializedProgress:
    """Forwards the progress hooks under a lock: every device's worker calls them."""

    def __init__(self, target: ProgressHooks):
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
    progress: bool | ProgressHooks | None = True,
    data_major: bool = False,
    trust_data_factory: bool = False,
    shard: str | Shard | tuple[int, int] | None = None,
    train_sample: int | float | None = None,
    sample_seed: int | None = None,
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
        progress: show progress bars (a terminal's stderr, or the notebook); False shows
            nothing. An object with the ``progress.ProgressHooks`` methods gets the
            progress instead.
        data_major: evaluate several checkpoints per produced batch, so that an expensive
            input pipeline (a ``tf.data`` map that decodes, a ``PyDataset`` reading files)
            runs once for all of them; their results are written together, so an
            interrupted replay loses up to a group. Groups are bounded by
            ``DATA_MAJOR_BYTES`` of staged weights per device (a model larger than half of
            that is evaluated one checkpoint at a time). Array data already on the device
            gains nothing from it.
        trust_data_factory: call the manifest's recorded data factory even when it resolves
            to the standard library or an installed package (see ``data.resolve_splits``);
            a factory passed as ``data`` is always called.
        shard: evaluate only this process's share, so that the jobs of a job array replay
            one run together: ``"i/n"`` (``i`` from 0 to ``n - 1``; position ``p`` of the
            selected checkpoints in training order belongs to shard ``p % n``), ``"auto"``
            or ``"auto/n"`` to read the index (and count) from Slurm or a Kubernetes
            Indexed Job (see ``parse_shard``). The exports are rewritten from every result
            present, under a lock, so the last shard to finish leaves them complete.
        train_sample: evaluate a fixed random subset of the training set instead of all of
            it: a count (int >= 2) or a fraction in (0, 1). The same examples at every
            checkpoint; each mean figure gets its standard error as ``<figure>_se``
            (``sampling.ratio_standard_error``). Array data only. Validation stays full.
        sample_seed: the seed that draws the subset (default ``sampling.DEFAULT_SAMPLE_SEED``).

    Returns:
        keras.callbacks.History: the true curves (keys in DESIGN.md), from every result
        present when it returns (other shards' included).

    Raises:
        RunFormatError: the run folder is unreadable.
        DataError: no data, or data that does not fit the model.
        ModelLoadError: the model cannot be rebuilt.
        ReplayIncompleteError: some checkpoints failed; the others were evaluated and
            ``error.history`` holds their History.
        ShardError: a malformed ``shard``, or ``"auto"`` outside a job array.

    Example:
        >>> history = replay("runs/exp1")
        >>> history = replay("runs/exp1", shard="auto")  # in each task of a job array
        >>> history.history["loss"][-1], history.history["reported_loss"][-1]
    """
    if shard is not None:
        url = next((p for p in (run_dir, output) if storage.is_url(p)), None)
        if url is not None:
            # Each shard's mirror is pulled once, when it starts, and the exports lock is a
            # local file: shards on several machines would overwrite each other's exports.
            raise ShardError(
                f"shards need a run folder and results folder on a shared file system, not "
                f"{os.fspath(url)!r}; replay a run in object storage without shard=.",
                argument="shard",
            )
    run_dir, output = runfmt.local_folders(run_dir, output)
    from trueloss_replay.history import (
        build_frame,
        exports_lock,
        history_from_frame,
        replay_folder,
        write_exports,
    )

    get_backend()  # an unsupported Keras backend is refused before any work
    shard = parse_shard(shard)  # a bad shard is refused before the data is loaded
    run = runfmt.Run(run_dir)
    import_modules(imports)
    splits = resolve_splits(
        run, data=data, train=train, val=val, trust_data_factory=trust_data_factory
    )
    if train_sample is not None:
        if "train" not in splits:
            raise DataError(
                "train_sample= samples the training data, and there is none; pass train=.",
                usage=True,
                argument="train_sample",
            )
        splits["train"] = sample_split(splits["train"], train_sample, sample_seed)
    elif sample_seed is not None:
        raise DataError(
            "sample_seed= only applies with train_sample=; pass both, or neither.",
            usage=True,
            argument="sample_seed",
        )
    # A sampled split's fingerprint names its sample: results of another sample, or of the
    # full set, differ in ``data`` and are never reused for it (``_reusable``), nor it for them.
    fingerprints = {name: split.fingerprint for name, split in splits.items()}
    device_names = _device_names(devices)
    output = _results_dir(run, output)

    wanted = parse_epochs(epochs)
    everything = run.checkpoints()  # opens every file once: list it once
    checkpoints = [
        c
        for c in everything
        if (wanted is None or c.epoch in wanted) and (c.is_epoch_end or not epoch_end_only)
    ]
    if wanted is not None and not checkpoints:
        raise DataError(
            f"epochs= selects no checkpoint of {run.path}.", usage=True, argument="epochs"
        )
    if shard is not None:
        # By position in the selection, never by what is already replayed: every shard
        # computes the same split.
        checkpoints = shard.share(checkpoints)
    failures: dict[str, str] = {c.name: c.error for c in checkpoints if c.error}
    unwritten: dict[Path, str] = {}  # result files computed but not written
    results: dict[str, dict] = {}
    todo = []
    for c in checkpoints:
        if c.error:
            continue
        reused = None if force else _reusable(runfmt.result_path(output, c.name), c, fingerprints)
        if reused is not None:
            results[c.name] = reused
        else:
            todo.append(c)

    batch = _batch_size(batch_size, splits)
    per_ckpt = sum(s.num_batches(batch) or 0 for s in splits.values()) or None
    with progress_display(progress) as display:
        # Device workers report from their own threads.
        hooks = _SerializedProgress(display)
        hooks.start(len(checkpoints), per_ckpt)
        for c in checkpoints:
            if c.name in results:
                hooks.checkpoint_done(results[c.name], reused=True)
            elif c.error:
                hooks.checkpoint_failed(c.name, c.error)

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
                unwritten=unwritten,
                progress=hooks,
                data_major=data_major,
            )

    def collect():
        # Unselected checkpoints (and other shards' shares) keep the results stored, so the
        # History covers the run.
        for c in everything:
            stored = runfmt.result_path(output, c.name)
            if c.name not in results and c.name not in failures and stored.is_file():
                with contextlib.suppress(RunFormatError):
                    results[c.name] = runfmt.read_result(stored)
        ordered = [results[c.name] for c in everything if c.name in results]
        # Built from what is in memory; the exports are the same figures, no second read.
        frame = build_frame(ordered, run.manifest, everything)
        return ordered, frame, history_from_frame(frame, run.manifest.get("params"))

    history = None
    try:
        folder = replay_folder(run.path, output)
        # Other shards write results and exports into the same folders: the results present
        # are read and the exports written under one lock, so whichever shard takes it last
        # writes exports that hold every result, and none is overwritten by an older view.
        with exports_lock(folder):
            ordered, frame, history = collect()
            write_exports(frame, history, folder)
    except (RunWriteError, StorageError) as e:
        if not failures:
            raise
        if history is None:  # the lock itself could not be taken
            ordered, _, history = collect()
        # The lost checkpoints and results are named first: they matter more than the export.
        raise ReplayIncompleteError(
            run.path, failures, history, len(ordered), unwritten, export_error=e
        ) from e
    _warn_mixed_data(ordered, run.path)
    if failures:
        raise ReplayIncompleteError(run.path, failures, history, len(ordered), unwritten)
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
    unwritten,
    progress,
    data_major=False,
    replicas: dict[str, _Replica] | None = None,
) -> None:
    """Spreads checkpoints over devices: one worker thread, one model replica per device.

    ``replicas`` keeps each device's evaluator (its model, staged data and compiled
    programs) and batch size from one call to the next, as ``follow`` needs; without it every
    call builds its own.

    Ctrl-C (``KeyboardInterrupt``) empties the queue, waits for what the workers have taken
    (whose results are written), then propagates; a second Ctrl-C stops waiting for them.
    """
    backend = get_backend()
    replicas = {} if replicas is None else replicas

    work: queue.Queue = queue.Queue()
    for c in todo:
        work.put(c)
    lock = threading.Lock()
    setup_errors: list[BaseException] = []
    # Every replica is built before any takes work, so the queue spreads over all devices.
    ready = threading.Barrier(len(device_names))
    first_takes = _FirstTakes(len(device_names))
    share = -(-len(todo) // len(device_names))

    def done(checkpoint, result) -> None:
        try:
            runfmt.write_result(output, result)
        except (RunWriteError, StorageError) as e:  # a full disk, a failed upload: said so
            reason = getattr(e, "reason", None) or str(e)
            with lock:
                unwritten[runfmt.result_path(output, checkpoint.name)] = reason
            failed(checkpoint, e)
            return
        with lock:
            results[checkpoint.name] = result
        progress.checkpoint_done(result, reused=False)

    def failed(checkpoint, error: Exception) -> None:
        with lock:
            failures[checkpoint.name] = str(error)
        progress.checkpoint_failed(checkpoint.name, str(error))

    stopping = threading.Event()  # set on Ctrl-C: a group already read is not started
    # Reader processes, for the stacked loop; started now, they are ready when it is.
    readers = Readers(reader_count() if len(todo) > 1 and not data_major else 0)

    def context(evaluator):
        ctx = _Context(
            evaluator, splits, batch, fingerprints, progress, done, failed, stopping, readers
        )
        ctx.first_takes = first_takes
        return ctx

    def worker(device: str) -> None:
        replica = replicas.get(device)
        try:
            if replica is None:
                with backend.device_scope(device):
                    replica = _Replica(Evaluator(builder(), device, jit_compile), batch)
                replicas[device] = replica
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            setup_errors.append(e)
            ready.abort()
            return
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            return
        ctx = context(replica.evaluator)
        ctx.batch = replica.batch  # as an earlier call left it (halved on out-of-memory)
        try:
            group = _group_size(replica.evaluator.model, data_major, share)
            stack = replica.evaluator.stack_size(splits, share)
            if group > 1:
                _data_major_loop(ctx, work, group)
            elif stack > 1:
                _stacked_loop(ctx, work, stack)
            else:
                _checkpoint_major_loop(ctx, work)
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            setup_errors.append(e)
        finally:
            ctx.took_first()  # a worker that failed before its first take holds no one back
            replica.batch = ctx.batch

    threads = [threading.Thread(target=worker, args=(d,), daemon=True) for d in device_names]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except KeyboardInterrupt:
        # Nothing new is taken; what each worker is evaluating finishes and is written.
        stopping.set()
        while _take(work) is not None:
            pass
        for t in threads:
            t.join()
        raise
    finally:
        # Interrupted (a second Ctrl-C) or failed: the readers are killed, not waited for.
        readers.close(kill=sys.exc_info()[0] is not None)
    if setup_errors:
        raise setup_errors[0]


@dataclasses.dataclass
class _Replica:
    """A device's evaluator and the batch size it evaluates array data at."""

    evaluator: Evaluator
    batch: int


class _FirstTakes:
    """Every device's worker takes its first checkpoints before any worker reads ahead.

    A worker reads the next checkpoint, or group, ahead while the device evaluates the one
    before. The worker whose thread happened to start first would otherwise read ahead the
    checkpoints another device was about to take: in a short run, all of them (4 checkpoints
    on 2 devices all went to one).
    """

    def __init__(self, workers: int):
        self._waiting_for = workers
        self._taken = threading.Condition()

    def took_first(self) -> None:
        with self._taken:
            self._waiting_for -= 1
            self._taken.notify_all()

    def wait(self) -> None:
        with self._taken:
            self._taken.wait_for(lambda: self._waiting_for <= 0)


class _Context:
    """What a device's worker needs to evaluate checkpoints and report each one."""

    def __init__(
        self, evaluator, splits, batch, fingerprints, progress, done, failed, stopping, readers
    ):
        self.evaluator = evaluator
        self.splits = splits
        self.batch = batch
        self.fingerprints = fingerprints
        self.progress = progress
        self.done = done
        self.failed = failed
        self.stopping = stopping  # a threading.Event, set on Ctrl-C
        self.readers = readers  # reading.Readers: where the stacked loop reads checkpoints
        # Shared by the workers of the other devices; one worker alone waits for no one.
        self.first_takes = _FirstTakes(1)
        self._took_first = False
        self._others_took_first = False

    def took_first(self) -> None:
        """Called once this worker took its first checkpoints (or none were left); again
        is harmless."""
        if not self._took_first:
            self._took_first = True
            self.first_takes.took_first()

    def read_ahead(self) -> None:
        """Returns once every device's worker took its first checkpoints: call before
        taking any beyond this worker's first."""
        self.took_first()
        if not self._others_took_first:
            self.first_takes.wait()
            self._others_took_first = True

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

    def result(
        self,
        checkpoint,
        outcome: Mapping[str, tuple[dict[str, float], int]],
        seconds: float,
        stacked: int = 1,
        batch: int | None = None,
    ) -> dict[str, Any]:
        """The result of a checkpoint from its ``{split: (figures, examples)}``, evaluated at
        array batches of ``batch`` (default the current size), with ``stacked`` checkpoints
        per program call."""
        batch = self.batch if batch is None else batch
        return runfmt.make_result(
            checkpoint,
            train=outcome["train"][0],
            val=outcome["val"][0] if "val" in outcome else None,
            examples={name: count for name, (_, count) in outcome.items()},
            data=self.fingerprints,
            # Array data is cut at this size; datasets keep their own batches.
            batch_size={
                name: batch if isinstance(split, ArraySplit) else None
                for name, split in self.splits.items()
            },
            backend=self.evaluator.backend.NAME,
            device=self.evaluator.device,
            seconds=seconds,
            stacked=stacked,
            sample={
                name: split.sample
                for name, split in self.splits.items()
                if getattr(split, "sample", None) is not None
            }
            or None,
        )


def _checkpoint_major_loop(ctx: _Context, work: queue.Queue) -> None:
    """One checkpoint at a time, every split; the next checkpoint is read meanwhile."""
    evaluator = ctx.evaluator
    # Checked against the model before any value is read (None: not built yet; then the
    # manifest's record is the reference).
    signature = evaluator.signature or None
    with ThreadPoolExecutor(max_workers=1) as reader:
        upcoming = _take(work)
        future = reader.submit(runfmt.read_weights, upcoming.path, signature) if upcoming else None
        while upcoming is not None:
            checkpoint, current = upcoming, future
            # Read the next checkpoint from disk while this one evaluates: at most two
            # checkpoints' weights in host memory per device.
            ctx.read_ahead()
            upcoming = _take(work)
            future = (
                reader.submit(runfmt.read_weights, upcoming.path, signature) if upcoming else None
            )
            started = time.perf_counter()
            try:
                evaluator.load(current.result(), str(checkpoint.path))
                del current
                outcome = ctx.evaluate(
                    lambda batch: evaluator.evaluate_splits(ctx.splits, batch, ctx.progress.advance)
                )
                result = ctx.result(checkpoint, outcome, time.perf_counter() - started)
            except DataError:  # the data, not this checkpoint: stop
                raise
            except TruelossReplayError as e:
                ctx.failed(checkpoint, e)
                continue
            ctx.done(checkpoint, result)


def _stacked_loop(ctx: _Context, work: queue.Queue, size: int) -> None:
    """Up to ``size`` checkpoints per program call, their weights stacked on the device.

    For models whose forward pass is short (a small model on a GPU), per-checkpoint work on
    the host would otherwise dominate: a program call per split and batch shape, a read-back,
    a file read, a result written. Here the groups form a pipeline: while the device runs a
    group, the host reads the next one (straight into its stacked host buffers, on a reader
    thread that goes on to the one after while a staging thread puts the weights on the
    device), starts it, and only then waits for the group before and turns its outputs into
    figures; results are written on a writer thread. A group's figures are each
    checkpoint's own, as one at a time; a result's ``seconds`` is its group's share of the
    wall time.

    After Ctrl-C (``ctx.stopping``) a group already read is not started; the groups running
    finish and are written. An error that stops the loop still writes the group whose
    figures the device had computed.
    """
    evaluator = ctx.evaluator
    # Three sets of stacked buffers, taken in turn: the group read back, the one running,
    # the one being read (``gather`` fills set g % 3 only once group g - 3 is read back).
    stacks: list[list[np.ndarray]] = []
    turn = itertools.count()
    # Set when the loop stops on an error: a group read ahead takes no more checkpoints from
    # the queue (another device's worker evaluates them).
    halted = threading.Event()

    def stopped() -> bool:
        return ctx.stopping.is_set() or halted.is_set()

    def gather() -> tuple[list, list[np.ndarray] | None]:
        """The next group: up to ``size`` checkpoints read into the next set of buffers, in
        parallel on the reader processes; one that cannot be read is reported and another
        takes its slot."""
        number = next(turn)
        if number > 0:
            ctx.read_ahead()
        index = number % 3
        buffers = stacks[index] if index < len(stacks) else None
        members: dict[int, Any] = {}
        free = list(range(size - 1, -1, -1))
        reading: dict[Any, tuple[int, Any]] = {}
        while True:
            while free and not stopped() and (checkpoint := _take(work)) is not None:
                if buffers is None:
                    buffers = evaluator.host_stack(size)
                    stacks.append(buffers)
                slot = free.pop()
                future = ctx.readers.read_into(
                    checkpoint.path,
                    evaluator.file_signature(checkpoint.path),
                    evaluator.slot_views(buffers, slot),
                )
                reading[future] = (slot, checkpoint)
            ctx.took_first()
            if not reading:
                break
            finished, _ = concurrent.futures.wait(
                reading, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in finished:
                slot, checkpoint = reading.pop(future)
                try:
                    future.result()
                except TruelossReplayError as e:  # a damaged or foreign checkpoint: that one
                    ctx.failed(checkpoint, e)
                    free.append(slot)
                except BaseException:
                    concurrent.futures.wait(reading)  # nothing writes into the buffers after
                    raise
                else:
                    members[slot] = checkpoint
        # The members in the first slots (a slot refilled after a failure keeps its place).
        slots = sorted(members)
        for position, slot in enumerate(slots):
            if slot != position:
                for buffer in buffers:
                    buffer[position] = buffer[slot]
        return [members[slot] for slot in slots], buffers

    def stage(read: concurrent.futures.Future) -> tuple[list, list[np.ndarray] | None, Any]:
        """A group read by ``gather``, its weights put on the device: the copy (10 MB for 8
        checkpoints of the reference MLP, a millisecond or two) is not made by the thread
        that drives the device. Returns the members, their buffers and the staged weights,
        or the ``EvaluationError`` of a device without room for them (dealt with in the
        group's turn: one checkpoint at a time may fit)."""
        members, buffers = read.result()
        if not members or stopped():
            return members, buffers, None
        try:
            return members, buffers, evaluator.stage_stack(buffers, len(members))
        except EvaluationError as e:
            return members, buffers, e

    def upcoming_group() -> concurrent.futures.Future:
        return stager.submit(stage, reader.submit(gather))

    with (
        ThreadPoolExecutor(max_workers=1) as reader,
        ThreadPoolExecutor(max_workers=1) as stager,
        ThreadPoolExecutor(max_workers=1) as writer,
    ):
        written: list = []
        last_done = time.perf_counter()

        def settle(group: _Group) -> None:
            """The group's figures read back (or it evaluated again) and its results queued
            for writing."""
            nonlocal last_done
            outcome = _finish(ctx, group)
            now = time.perf_counter()
            if outcome is not None:
                seconds = (now - last_done) / len(group.members)
                for checkpoint, figures in zip(group.members, outcome, strict=True):
                    result = ctx.result(
                        checkpoint,
                        figures,  # {split: (figures, examples)} of this checkpoint
                        seconds,
                        stacked=len(group.members),
                        batch=group.batch,
                    )
                    written.append(writer.submit(ctx.done, checkpoint, result))
            last_done = now

        upcoming = upcoming_group()
        previous: _Group | None = None
        while True:
            current = None
            try:
                # The next group is read while this one is staged and evaluated, so that
                # the reader never waits for the staging (it would add the staging's time
                # to every group's): at most three groups' weights in host memory per
                # device (the one read back, kept to evaluate again should it fail; the one
                # running; the one being read, into the buffers of the group before last,
                # whose figures are in). After the last group it reads nothing.
                following = upcoming_group()
                members, buffers, staged = upcoming.result()
                upcoming = following
                if members and not ctx.stopping.is_set():
                    current = _Group(members, buffers, ctx.batch)
                    _start(ctx, current, staged)
            except BaseException:
                halted.set()
                if previous is not None:
                    settle(previous)  # what the device computed is still written
                raise
            if previous is not None:
                settle(previous)
            if current is None:
                break
            previous = current
        for future in written:
            future.result()  # an unexpected error in writing comes out here


@dataclasses.dataclass
class _Group:
    """Checkpoints evaluated by one program call: their stacked host weights, the batch
    size they were started at, what ``dispatch_stacked`` started (None: it did not start)
    and the error that kept it from starting."""

    members: list
    buffers: list[np.ndarray]
    batch: int
    started: Any = None
    error: TruelossReplayError | None = None


def _start(ctx: _Context, group: _Group, staged: Any) -> None:
    """The group's programs started on its weights as ``stage_stack`` put them on the
    device (``staged``; or the error that kept them off it)."""
    evaluator = ctx.evaluator
    if isinstance(staged, EvaluationError):
        group.error = staged
        return
    try:
        group.started = evaluator.dispatch_stacked(
            ctx.splits, group.batch, staged, len(group.members), ctx.progress.advance
        )
    except DataError:
        raise
    except TruelossReplayError as e:
        group.error = e  # dealt with when the group's turn comes (``_finish``)


def _finish(ctx: _Context, group: _Group) -> list | None:
    """A started group's figures, per checkpoint. If it failed: when the device ran out of
    memory running it, the group again at half the batch size (``ctx.evaluate``); otherwise
    (its weights did not fit on the device, say), or if that fails too, one checkpoint at a
    time, so that an error (a numeric check tripped by one checkpoint's weights) stays with
    its checkpoint; then None (those were reported)."""
    evaluator = ctx.evaluator
    error = group.error
    if group.started is not None:
        try:
            return evaluator.collect(group.started)
        except DataError:
            raise
        except TruelossReplayError as e:
            error = e
    # Out of memory running the programs (not staging them, which has no split): the group
    # again at smaller batches.
    if isinstance(error, EvaluationError) and error.out_of_memory and error.split is not None:
        try:
            params = evaluator.stage_stack(group.buffers, len(group.members))
            outcome = ctx.evaluate(
                functools.partial(
                    _evaluate_stacked, evaluator, ctx, params=params, count=len(group.members)
                )
            )
            group.batch = ctx.batch  # as halved
            return outcome
        except DataError:
            raise
        except TruelossReplayError:
            pass
    _one_by_one(ctx, group.members, group.buffers)
    return None


def _evaluate_stacked(evaluator, ctx: _Context, batch: int, *, params, count: int):
    return evaluator.evaluate_stacked(ctx.splits, batch, params, count, ctx.progress.advance)


def _one_by_one(ctx: _Context, members: list, buffers: Sequence[np.ndarray]) -> None:
    """A failed group again, one checkpoint at a time, so each gets its own result or error."""
    evaluator = ctx.evaluator
    for slot, checkpoint in enumerate(members):
        started = time.perf_counter()
        try:
            evaluator.load_slot(buffers, slot)
            outcome = ctx.evaluate(
                lambda batch: evaluator.evaluate_splits(ctx.splits, batch, ctx.progress.advance)
            )
        except DataError:
            raise
        except TruelossReplayError as e:
            ctx.failed(checkpoint, e)
            continue
        ctx.done(checkpoint, ctx.result(checkpoint, outcome, time.perf_counter() - started))


def _data_major_loop(ctx: _Context, work: queue.Queue, group: int) -> None:
    """``group`` checkpoints at a time: each batch is produced once for all of them."""
    evaluator = ctx.evaluator
    retry = None  # a checkpoint the device had no room for beside the others of its group
    while True:
        staged = []
        while len(staged) < group and (checkpoint := retry or _take(work)) is not None:
            retry = None
            try:
                # One checkpoint's host arrays at a time; the staged copies live on the device.
                staged.append(
                    (
                        checkpoint,
                        evaluator.stage(
                            runfmt.read_weights(checkpoint.path, evaluator.signature or None),
                            str(checkpoint.path),
                        ),
                    )
                )
            except DataError:
                raise
            except EvaluationError as e:
                if not (e.out_of_memory and staged):
                    ctx.failed(checkpoint, e)
                    continue
                retry = checkpoint  # first in the next group, once these left the device
                break
            except TruelossReplayError as e:
                ctx.failed(checkpoint, e)
        ctx.took_first()
        if not staged:
            return
        # The checkpoints alone: a name bound to staged weights would keep them on the device
        # while the next group is staged.
        checkpoints = [checkpoint for checkpoint, _ in staged]
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
            for checkpoint in checkpoints:
                ctx.failed(checkpoint, e)
            continue
        seconds = (time.perf_counter() - started) / len(staged)
        for i, checkpoint in enumerate(checkpoints):
            outcome = {name: outcomes[i] for name, outcomes in per_split.items()}
            ctx.done(checkpoint, ctx.result(checkpoint, outcome, seconds))


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
            "(their data fingerprints differ); rerun the replay with force= to evaluate all "
            "of them on the same data.",
            stacklevel=3,
        )
