"""``ReplayCheckpoint``: store the weights of every epoch, off the training path.

The training thread only copies the weights to host memory (a few milliseconds even for
large models), once per epoch, and puts the copy on a small bounded queue; a background
thread writes the HDF5 file and rewrites the manifest. The queue bound keeps memory bounded:
when the disk is slower than training, ``fit`` waits rather than piling up copies.

Keras calls no callback when ``fit`` raises, so a run that ends in an exception is marked
``failed`` by an ``atexit`` hook (or when the same callback starts another ``fit``). A run
killed outright stays ``running``; its checkpoints are complete all the same.

One writer per run folder: ``fit`` takes an OS file lock on ``.writer.lock`` at train begin
and holds it until train end (or until the run is marked ``failed``). The OS drops the lock
when the process dies, so a writer killed outright never leaves the folder stuck, which a
lock file checked by its mere existence (or by a PID in it) would on another host.

No batch hook unless ``save_freq`` is a step count. Keras turns off the asynchronous
dispatch of batch callbacks as soon as one callback overrides a batch hook (on JAX every
step then waits for the device, 12-18% per epoch on a GPU), so the per-epoch callback
defines none: the global step comes from the optimizer's iteration count at epoch end.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

import filelock
import keras
import numpy as np

from trueloss_replay import run as runfmt
from trueloss_replay.data import as_arrays, check_storable, save_arrays, validate_reference
from trueloss_replay.errors import (
    RunExistsError,
    RunFormatError,
    RunLockedError,
    RunWriteError,
    StorageError,
)

_STOP = object()


class ReplayCheckpoint(keras.callbacks.Callback):
    """Stores the model's weights at every epoch for a later true-loss replay.

    Writes the run folder of ``shared/DESIGN.md``: ``manifest.json``, ``model.keras`` and
    ``checkpoints/eNNNN.h5``, each atomically, from a background thread.

    Args:
        run_dir: the run folder; created if missing. An fsspec URL (``s3://bucket/run``,
            ``gs://...``) works too: each file is written to a local mirror in the cache
            (``$TRUELOSS_REPLAY_CACHE``, default ``~/.cache/trueloss-replay``), then
            uploaded whole from the writer thread, checkpoint before manifest.
        save_freq: ``"epoch"`` (default) or an int N: also store the weights every N global
            steps (``eNNNN-sSSSSSS.h5``). End-of-epoch checkpoints are always written, since
            the true-loss History has one entry per epoch.
        save_initial: store the weights before training as ``e0000.h5``.
        keep: None keeps every checkpoint; an int N keeps only the newest N (plus those
            ``keep_every`` protects). Pruning runs in the background writer.
        keep_every: with ``keep``, also keep every k-th epoch's checkpoint for good.
        data: a ``"module:function"`` reference returning the un-augmented training and
            validation data, recorded in the manifest for replay.
        train_data: ``(x, y[, sample_weight])`` arrays, snapshotted to ``data/train.h5`` when
            ``fit`` starts, before the first step (so later in-place changes do not leak in).
        val_data: the same for validation, ``data/val.h5``.
        overwrite: replace a run folder that holds another run. Without it a different
            run in the folder is an error; ``fit(..., initial_epoch=k)`` on the same model
            appends to it.
        on_error: ``"warn"`` (default) warns about a failed checkpoint write and trains on;
            ``"raise"`` stops training with ``RunWriteError`` at the next epoch end. Either
            way, a failure before the first training step (``model.keras``, the data
            snapshots, the first manifest) raises ``RunWriteError`` from ``fit``: nothing
            has been computed yet, so stopping costs nothing, whereas training on would
            produce a run that cannot be replayed.
        max_pending: how many weight copies may wait for the writer (memory bound).
        save_model: save the architecture to ``model.keras`` (once, at the start).

    Raises:
        RunWriteError: ``run_dir`` cannot be created or written (from ``__init__``), or a
            file written before training starts cannot be (from ``fit``).
        RunLockedError: another process (or another ``ReplayCheckpoint``) is writing
            ``run_dir``; raised from ``fit`` before any file of the run is changed.
        DataError: ``data``, ``train_data`` or ``val_data`` is malformed.
        MissingDependencyError: ``run_dir`` is a URL whose protocol's package is not
            installed (the message names the extra, ``pip install 'trueloss-replay[s3]'``).
        StorageError: ``run_dir`` is a URL that cannot be read (credentials refused, no
            such bucket).
        ValueError: another argument is out of range.

    Example:
        >>> model.fit(x, y, validation_data=(xv, yv), epochs=20,
        ...           callbacks=[ReplayCheckpoint("runs/exp1", train_data=(x, y),
        ...                                       val_data=(xv, yv))])
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        save_freq: str | int = "epoch",
        save_initial: bool = True,
        keep: int | None = None,
        keep_every: int | None = None,
        data: str | None = None,
        train_data: Any = None,
        val_data: Any = None,
        overwrite: bool = False,
        on_error: str = "warn",
        max_pending: int = 2,
        save_model: bool = True,
    ):
        super().__init__()
        if save_freq != "epoch" and not _positive_int(save_freq):
            raise ValueError(
                f"save_freq must be 'epoch' or a positive int. Received: {save_freq!r}"
            )
        for name, value in (("keep", keep), ("keep_every", keep_every)):
            if value is not None and not _positive_int(value):
                raise ValueError(f"{name} must be None or a positive int. Received: {value!r}")
        if keep_every is not None and keep is None:
            raise ValueError("keep_every only matters with keep=N; pass keep as well.")
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise'. Received: {on_error!r}")
        if not _positive_int(max_pending):
            raise ValueError(f"max_pending must be a positive int. Received: {max_pending!r}")
        # A URL is staged in a local mirror; atomic_path uploads each file as it completes.
        self.run_dir = runfmt.local_path(run_dir)
        self.save_freq = save_freq
        self.save_initial = save_initial
        self.keep = keep
        self.keep_every = keep_every
        self.data = None if data is None else validate_reference(data)
        self.splits = {
            name: as_arrays(value, f"{name}_data")
            for name, value in (("train", train_data), ("val", val_data))
            if value is not None
        }
        for name, arrays in self.splits.items():
            check_storable(arrays, f"{name}_data")
        self.overwrite = overwrite
        self.on_error = on_error
        self.max_pending = max_pending
        self.save_model = save_model
        _check_writable(self.run_dir)

        self._lock = threading.Lock()
        self._writer_lock: filelock.BaseFileLock | None = None
        self._queue: queue.Queue | None = None
        self._writer: threading.Thread | None = None
        self._errors: list[str] = []
        self._manifest: dict[str, Any] = {}
        self._entries: dict[str, dict[str, Any]] = {}
        # Checkpoints keep= removed, in the manifest: a follower lists those it missed.
        self._pruned: list[str] = []
        self._started = False
        self._running = False
        self._active = True
        self._step = 0
        self._epoch_start_step = 0
        self._epoch = 0
        self._last_within: tuple[str | None, int | None] = (None, None)
        self._iterations_at_epoch_begin = 0
        if save_freq != "epoch":
            # Only then: a batch hook costs every step its asynchronous dispatch (see above).
            self.on_train_batch_end = self._on_train_batch_end
        atexit.register(_mark_failed_at_exit, weakref.ref(self))

    # ------------------------------------------------------------------ Keras hooks

    def on_train_begin(self, logs=None):
        if self._running:
            # The previous fit() raised: Keras never called on_train_end.
            self._finish("failed")
        self._active = _is_chief(self.model)
        if self._active:
            self._acquire_writer_lock()
        self._started = False
        self._errors = []
        self._last_within = (None, None)
        self._step = self._iterations()

    def on_epoch_begin(self, epoch, logs=None):
        if not self._active:
            return
        self._epoch = epoch
        # A model built lazily (a subclassed model without build()) has no weights until
        # fit() traces its first step: start at the first batch end (save_freq steps) or
        # the epoch end instead.
        if not self._started and self.model.weights:
            self._start(initial_epoch=epoch)
        self._epoch_start_step = self._step  # after _start: a resume may move the step on
        self._iterations_at_epoch_begin = self._iterations()

    def _on_train_batch_end(self, batch, logs=None):
        # Installed as on_train_batch_end by __init__ when save_freq is a step count.
        if not self._active:
            return
        if not self._started:
            self._start_late()
        step = self._epoch_start_step + batch + 1
        last_of_epoch = (self.params or {}).get("steps") == batch + 1  # on_epoch_end saves it
        due = step // self.save_freq > self._step // self.save_freq
        if due and not last_of_epoch:
            self._snapshot(self._epoch, step, logs, within_epoch=True)
            self._last_within = (runfmt.checkpoint_name(self._epoch, step), step)
        self._step = step

    def on_epoch_end(self, epoch, logs=None):
        if not self._active:
            return
        if not self._started:
            self._start_late()
        if self.save_freq == "epoch":
            # The optimizer's steps in this epoch, on top of where the epoch began (a resume
            # with a rebuilt optimizer continues the stored steps, not the optimizer's).
            taken = self._iterations() - self._iterations_at_epoch_begin
            self._step = self._epoch_start_step + max(taken, 0)
        if self._last_within[1] == self._step:
            # Steps per epoch unknown (params["steps"] is None): the epoch's last step was
            # saved as a sub-epoch checkpoint; the epoch-end one replaces it.
            self._queue.put(("remove", self._last_within[0]))
        self._snapshot(epoch + 1, self._step, logs)
        self._raise_pending()

    def on_train_end(self, logs=None):
        if not self._active or not self._running:
            self._release_writer_lock()
            return
        self._finish("finished")
        self._raise_pending()

    def _iterations(self) -> int:
        iterations = getattr(getattr(self.model, "optimizer", None), "iterations", None)
        return int(np.asarray(iterations)) if iterations is not None else 0

    # ------------------------------------------------------------------ start and finish

    def _acquire_writer_lock(self) -> None:
        if self._writer_lock is not None and self._writer_lock.is_locked:
            return
        path = self.run_dir / runfmt.WRITER_LOCK
        lock = filelock.FileLock(path)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout as e:
            raise RunLockedError(
                f"run folder {self.run_dir} is being written by another process (or another "
                f"ReplayCheckpoint in this one): {path} is locked. Wait for that training to "
                "end, or choose another run folder.",
                run_dir=self.run_dir,
            ) from e
        except OSError as e:
            raise _early_write_error(path, e) from e
        self._writer_lock = lock

    def _release_writer_lock(self) -> None:
        if self._writer_lock is not None:
            self._writer_lock.release(force=True)
            self._writer_lock = None

    def _start_late(self) -> None:
        if self.save_initial and self._epoch == 0:
            warnings.warn(
                f"trueloss-replay: {type(self.model).__name__} had no weights before its first "
                "training step (it is built on its first batch), so the weights before "
                "training (e0000.h5) cannot be stored. Build the model before fit(), e.g. "
                "model(x[:1]) or model.build(input_shape), to have them.",
                stacklevel=3,
            )
        self._start(initial_epoch=self._epoch, save_initial=False)
        self._epoch_start_step = self._step

    def _start(self, initial_epoch: int, save_initial: bool = True) -> None:
        try:
            self._open_run(initial_epoch, save_initial)
        except BaseException:
            # fit() stops here and Keras calls no on_train_end: free the folder now.
            self._release_writer_lock()
            raise

    def _open_run(self, initial_epoch: int, save_initial: bool) -> None:
        signature = runfmt.model_signature(self.model)
        manifest_path = self.run_dir / runfmt.MANIFEST
        existing = None
        if manifest_path.exists():
            existing = self._existing_run(signature, initial_epoch)
        if existing is None:
            if manifest_path.exists():  # overwrite=True: never touch a folder that is not a run
                self._clear_previous()
            self._entries = {}
            self._pruned = []
        else:
            # Those of epochs this resume trains again will be written again.
            self._pruned = [
                n
                for n in existing.get("pruned") or []
                if (runfmt.parse_checkpoint_name(n) or (initial_epoch + 1,))[0] <= initial_epoch
            ]
            kept = [
                c
                for c in runfmt.list_checkpoints(self.run_dir / runfmt.CHECKPOINT_DIR)
                if c.error is None
            ]
            self._entries = {c.name: c.manifest_entry() for c in kept}
            if kept:
                # The optimizer's state is not stored: a model rebuilt for the resume starts
                # at iteration 0. Go on from the checkpoint fit() resumes from (the last one
                # in training order), or keep= would prune the new checkpoints first.
                self._step = max(self._step, kept[-1].step)
        self._mkdir(self.run_dir / runfmt.CHECKPOINT_DIR)

        model_rel = existing.get("model") if existing else None
        if self.save_model and model_rel is None:
            model_rel = self._save_model()
        data_files = dict(existing.get("data_files", {})) if existing else {}
        # Written now, on the training thread: the arrays are the caller's, not copies, and
        # fit() has not yet had a chance to let anything change them.
        for split, arrays in self.splits.items():
            data_files[split] = self._write_data(split, arrays)
        self._manifest = runfmt.new_manifest(
            self.model,
            model_file=model_rel,
            compile_config=_compile_config(self.model),
            data=self.data if self.data is not None else (existing or {}).get("data"),
            data_files=data_files,
            params=self.params,
            save_freq=self.save_freq,
            created=existing.get("created") if existing else None,
        )
        self._write_manifest()
        self._queue = queue.Queue(maxsize=self.max_pending)
        self._writer = threading.Thread(
            target=self._write_loop, name="trueloss-replay-writer", daemon=True
        )
        self._writer.start()
        self._started = self._running = True
        if save_initial and self.save_initial and initial_epoch == 0:
            self._snapshot(0, self._step, {})

    def _existing_run(self, signature, initial_epoch: int) -> dict[str, Any] | None:
        """The manifest of the run to append to, or None to start afresh."""
        try:
            manifest = runfmt.read_manifest(self.run_dir)
        except RunFormatError as e:
            if self.overwrite:
                return None
            raise RunExistsError(
                f"{e} Pass overwrite=True to replace it, or choose another run folder."
            ) from e
        if self.overwrite:
            return None
        if not _same_variables(manifest.get("variables"), signature):
            raise RunExistsError(
                f"run folder {self.run_dir} holds a run of a different model (its variables "
                "differ from this model's). Pass overwrite=True to replace it, or choose "
                "another run folder."
            )
        checkpoints = runfmt.list_checkpoints(self.run_dir / runfmt.CHECKPOINT_DIR)
        last = max((c.epoch for c in checkpoints), default=0)
        if initial_epoch == 0 and last > 0:
            raise RunExistsError(
                f"run folder {self.run_dir} already holds a run with checkpoints up to epoch "
                f"{last}. To continue it, pass initial_epoch={last} to fit(); to replace it, "
                "pass overwrite=True; or choose another run folder."
            )
        stale = [
            c
            for c in checkpoints
            if c.epoch > initial_epoch or (c.epoch == initial_epoch and not c.is_epoch_end)
        ]
        if stale:
            warnings.warn(
                f"trueloss-replay: fit() resumes at epoch {initial_epoch}; removing "
                f"{len(stale)} later checkpoint(s) of {self.run_dir} that this run replaces.",
                stacklevel=3,
            )
            for c in stale:
                runfmt.remove_path(c.path)
        return manifest

    def _clear_previous(self) -> None:
        for rel in (
            runfmt.CHECKPOINT_DIR,
            runfmt.REPLAY_DIR,
            runfmt.DATA_DIR,
            runfmt.MODEL_FILE,
            runfmt.MANIFEST,
        ):
            runfmt.remove_path(self.run_dir / rel)

    def _save_model(self) -> str | None:
        target = self.run_dir / runfmt.MODEL_FILE
        try:
            with runfmt.atomic_path(target) as tmp:
                self.model.save(tmp)
        except OSError as e:
            raise _early_write_error(target, e) from e
        except Exception as e:  # noqa: BLE001 - any serialization failure means "no architecture"
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            warnings.warn(
                f"trueloss-replay: the architecture of {type(self.model).__name__} cannot be "
                f"saved to {target} ({type(e).__name__}: {first_line[:200]}). Checkpoints are "
                "still written; replay will need a model builder: replay(run_dir, "
                "model=...), on the command line --model MODULE:FUNCTION.",
                stacklevel=3,
            )
            return None
        return runfmt.MODEL_FILE

    def _finish(self, status: str) -> None:
        if self._writer is not None and self._queue is not None:
            self._queue.put(_STOP)
            self._writer.join()
        self._writer = self._queue = None
        self._running = False
        if self.on_error == "raise" and self._errors:
            # A write failed during the last epoch: fit() is about to raise, so not "finished".
            status = "failed"
        with self._lock:
            self._manifest["status"] = status
            self._manifest["finished"] = time.time()
        try:
            self._write_manifest()
        except (RunWriteError, StorageError) as e:  # a full disk, a refused upload
            self._report(str(e))
        finally:
            self._release_writer_lock()

    # ------------------------------------------------------------------ snapshot and write

    def _snapshot(self, epoch: int, step: int, logs, within_epoch: bool = False) -> None:
        # The only work on the training thread: one host copy of each weight.
        weights = [
            (key, np.array(keras.ops.convert_to_numpy(v), copy=True))
            for key, v in zip(runfmt.weight_keys(self.model), self.model.weights, strict=True)
        ]
        name = runfmt.checkpoint_name(epoch, step if within_epoch else None)
        meta = {"epoch": epoch, "step": step, "time": time.time(), "logs": runfmt.to_jsonable(logs)}
        self._queue.put(("checkpoint", name, weights, meta))

    def _write_loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            try:
                if job[0] == "checkpoint":
                    self._write_checkpoint(*job[1:])
                else:
                    self._remove_checkpoint(job[1])
            except Exception as e:  # noqa: BLE001 - reported to the training thread
                ours = isinstance(e, (RunWriteError, StorageError))
                self._report(str(e) if ours else f"{type(e).__name__}: {e}")

    def _write_checkpoint(self, name, weights, meta) -> None:
        runfmt.write_checkpoint(self.run_dir / runfmt.CHECKPOINT_DIR / name, weights, **meta)
        with self._lock:
            self._entries[name] = {"name": name, **meta}
            self._prune()
        self._write_manifest()

    def _remove_checkpoint(self, name) -> None:
        with self._lock:
            self._entries.pop(name, None)
        runfmt.remove_path(self.run_dir / runfmt.CHECKPOINT_DIR / name)
        self._write_manifest()

    def _write_data(self, split: str, arrays) -> str:
        rel = f"{runfmt.DATA_DIR}/{split}.h5"
        self._mkdir(self.run_dir / runfmt.DATA_DIR)
        try:
            save_arrays(self.run_dir / rel, arrays)
        except OSError as e:
            raise _early_write_error(self.run_dir / rel, e) from e
        return rel

    def _mkdir(self, folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _early_write_error(folder, e) from e

    def _prune(self) -> None:
        if self.keep is None:
            return
        names = sorted(self._entries, key=lambda n: _training_order(self._entries[n]))
        protected = {
            n
            for n in names
            if self.keep_every
            and "-s" not in n
            and self._entries[n]["epoch"] % self.keep_every == 0
        }
        doomed = [n for n in names[: max(len(names) - self.keep, 0)] if n not in protected]
        for name in doomed:
            runfmt.remove_path(self.run_dir / runfmt.CHECKPOINT_DIR / name)
            del self._entries[name]
            self._pruned.append(name)

    def _write_manifest(self) -> None:
        with self._lock:
            self._manifest["checkpoints"] = sorted(self._entries.values(), key=_training_order)
            if self._pruned or self.keep is not None:
                self._manifest["pruned"] = list(self._pruned)
            path = self.run_dir / runfmt.MANIFEST
            runfmt.atomic_write_json(path, self._manifest)  # a RunWriteError names the path

    def _report(self, message: str) -> None:
        with self._lock:
            self._errors.append(message)
        if self.on_error == "warn":
            warnings.warn(f"trueloss-replay: {message} Training continues.", stacklevel=2)

    def _raise_pending(self) -> None:
        if self.on_error == "raise" and self._errors:
            message = self._errors[0]
            if self._running:
                self._finish("failed")
            raise RunWriteError(message)


# ---------------------------------------------------------------------- helpers


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunWriteError(
            f"run folder {run_dir} cannot be written ({e.strerror or e}). Choose a writable "
            "folder for ReplayCheckpoint."
        ) from e
    if (run_dir / runfmt.MANIFEST).is_dir():
        raise RunWriteError(f"{run_dir / runfmt.MANIFEST} is a folder; choose another run folder.")


def _reason(error: OSError) -> str:
    # atomic_path already wraps the OSError in a RunWriteError: say the root cause once.
    if isinstance(error, RunWriteError) and isinstance(error.__cause__, OSError):
        error = error.__cause__
    return str(error.strerror or error)


def _early_write_error(path: Path, error: OSError) -> RunWriteError:
    return RunWriteError(
        f"could not write {path} ({_reason(error)}), so fit() stops at its start "
        "rather than train a run that cannot be replayed. Make that path writable (move "
        "away what is in its way, free disk space) or choose another run folder."
    )


def _training_order(entry: dict[str, Any]) -> tuple[int, int, int]:
    # Not the step: after a resume that lost the optimizer, steps say nothing reliable.
    name = entry["name"]
    return runfmt.Checkpoint(name, Path(name), entry["epoch"]).sort_key()


def _same_variables(stored, signature) -> bool:
    # A model rebuilt in the same process gets other auto-generated layer names (dense_2 for
    # dense) but is the same model; run.match_weights loads such checkpoints by position.
    return (
        isinstance(stored, list)
        and len(stored) == len(signature)
        and all(
            runfmt.same_structure(a[0], b[0]) and list(a[1:]) == list(b[1:])
            for a, b in zip(stored, signature, strict=True)
        )
    )


def _positive_int(value) -> bool:
    # bool is an int subclass, but keep=True or save_freq=True is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _mark_failed_at_exit(ref) -> None:
    callback = ref()
    if callback is not None and callback._running:
        callback._finish("failed")


def _is_chief(model) -> bool:
    """False on the non-chief workers of a multi-worker strategy or of a multi-process JAX
    job: only the chief (JAX: process 0) writes."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.process_index() == 0
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None:
        return True
    extended = getattr(strategy, "extended", None)
    return bool(getattr(extended, "should_checkpoint", True))


def _compile_config(model) -> dict[str, Any] | None:
    try:
        return model.get_compile_config()
    except Exception:  # noqa: BLE001 - an uncompiled or unserializable config is just absent
        return None
