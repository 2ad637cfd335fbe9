"""Following a live run: each checkpoint evaluated as it lands, while the run still trains.

``follow`` polls the run folder rather than waiting on file-system events: polling works the
same on every platform, on network file systems and in containers, and costs one directory
listing and one manifest read per interval. What makes it safe is the run folder's contract
(``run.py``): every file appears by an atomic rename, so a listed checkpoint is complete and
a checkpoint still being written is invisible. The manifest's status is read *before* the
folder is listed, and the callback writes ``finished`` only after its last checkpoint, so the
listing that follows a ``finished`` holds every checkpoint of the run.

Unlike a sidecar evaluator that takes the latest checkpoint, every checkpoint listed is
evaluated, in training order. The evaluation is the scheduler's: the data is staged and the
model compiled once per device and kept for the whole follow (``scheduler._evaluate_all``
with kept replicas); results are the same per-checkpoint files ``replay`` writes, so a
follower that is stopped, killed or restarted reuses what is done. A checkpoint that
``ReplayCheckpoint(keep=N)`` removed before it could be read is *missed*: listed, not an error.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trueloss_replay import run as runfmt
from trueloss_replay import storage
from trueloss_replay.backends import get_backend, share_device_memory
from trueloss_replay.data import resolve_splits
from trueloss_replay.engine import import_modules, load_model
from trueloss_replay.errors import RunFormatError
from trueloss_replay.scheduler import (
    _batch_size,
    _device_names,
    _evaluate_all,
    _results_dir,
    _reusable,
    _SerializedProgress,
    parse_epochs,
)

#: Seconds between two looks at the run folder, unless ``poll`` says otherwise.
DEFAULT_POLL = 2.0
#: The manifest statuses after which no checkpoint comes.
FINAL_STATUSES = ("finished", "failed")
#: While a follower catches up on a backlog, the seconds between two rewrites of the figure
#: and the TensorBoard scalars (each takes about a second; history.csv and .json, milliseconds).
FIGURE_INTERVAL = 10.0
MISSED_REASON = "removed (by ReplayCheckpoint's keep) before it was evaluated"


@dataclass
class FollowResult:
    """What ``follow`` did, and why it stopped.

    Attributes:
        status: ``"finished"`` (the manifest says so; every checkpoint was looked at),
            ``"failed"`` (the manifest says the training failed; every checkpoint it wrote
            was looked at) or ``"idle"`` (no new checkpoint for ``idle_timeout`` seconds).
        history: the true-loss History of every result there is, as ``replay`` returns it.
        evaluated: the checkpoints this call evaluated, in the order they finished.
        reused: the checkpoints whose stored results were reused.
        missed: ``{checkpoint name: reason}`` for checkpoints removed before they could be
            evaluated (``ReplayCheckpoint(keep=N)``); not an error.
        failures: ``{checkpoint name: reason}`` for checkpoints that could not be evaluated
            (a damaged file): an error, as in ``replay``.
    """

    status: str
    history: Any
    evaluated: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    missed: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the training finished and every checkpoint it kept was evaluated."""
        return self.status == "finished" and not self.failures


def follow(
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
    logdir: str | os.PathLike | None = None,
    plot: bool = True,
    poll: float = DEFAULT_POLL,
    idle_timeout: float | None = None,
    unsafe_deserialization: bool = False,
    model: Callable | str | None = None,
    imports: Iterable[str] = (),
    jit_compile: bool | None = None,
    progress: Any = None,
    trust_data_factory: bool = False,
) -> FollowResult:
    """Evaluates every checkpoint of a run as it lands, until the training ends.

    Starts before or during training: it waits for ``run_dir/manifest.json`` if there is none
    yet. Every ``poll`` seconds it reads the manifest's status, lists the checkpoints, and
    evaluates the new ones in training order (none is skipped: not only the latest), each
    result written to ``<output>/<checkpoint>.json`` as ``replay`` writes it. After each
    checkpoint it rewrites ``history.csv``, ``history.json``, ``curves.png`` (``plot``) and,
    with ``logdir``, the TensorBoard scalars (while it catches up on checkpoints that were
    there already, the figure and the scalars every ``FIGURE_INTERVAL`` seconds and at the
    end of the backlog: each takes about a second). It returns when the manifest says ``finished``
    or ``failed`` and every checkpoint has been looked at, or after ``idle_timeout`` seconds
    without a new checkpoint (a training process that was killed stays ``running``).

    Results already stored for the same checkpoint and data are reused, so a follower that
    was stopped or killed and started again recomputes nothing. GPU memory is shared with
    the training process: see ``backends.share_device_memory`` (call ``follow`` before
    anything in the process starts JAX's or TensorFlow's GPUs).

    Args:
        run_dir: the run folder ``ReplayCheckpoint`` writes (it need not exist yet).
        data: a ``module:function`` data factory (default: the one in the manifest).
        train: training data, as for ``replay``.
        val: validation data, as for ``replay``.
        batch_size: evaluation batch size for array data (default 2048, or fewer examples).
        devices: ``auto``, ``cpu``, ``gpu``, GPU indices ``"0,1"``, or device names.
        epochs: only these checkpoints, by completed epochs: ``"1,3,5-9"`` or a list of ints.
        epoch_end_only: skip the checkpoints taken within an epoch.
        force: recompute results stored before this call instead of reusing them.
        output: where results go (default ``RUN_DIR/replay/results``).
        logdir: also write the true curves as TensorBoard scalars there after each
            checkpoint (``tensorboard.export_tensorboard``); the event files of the previous
            refresh are replaced.
        plot: rewrite ``curves.png`` beside ``history.csv`` after each checkpoint.
        poll: seconds between two looks at the run folder.
        idle_timeout: stop after this many seconds without a new checkpoint (None: wait
            for as long as the manifest says ``running``).
        unsafe_deserialization: load ``model.keras`` with ``safe_mode=False``.
        model: a builder (callable or ``module:function``) when the run has no architecture.
        imports: modules to import first (custom layers, losses, metrics).
        jit_compile: XLA for the evaluation step; None tries it and falls back.
        progress: an object with any of the hooks ``waiting(manifest_path)``,
            ``checkpoint_done(result, reused)``, ``checkpoint_failed(name, reason)``,
            ``checkpoint_missed(name, reason)`` and ``advance(examples, batches)``.
        trust_data_factory: call the manifest's recorded data factory even when it resolves
            to the standard library or an installed package (see ``replay``).

    Returns:
        FollowResult: why it stopped (``status``), the History, and which checkpoints were
        evaluated, reused, missed or failed. A ``failed`` or ``idle`` status is returned,
        not raised: the results are good either way.

    Raises:
        ValueError: ``poll`` or ``idle_timeout`` is not a positive number of seconds.
        RunFormatError: the manifest is damaged, or the run folder disappears.
        DataError: no data, or data that does not fit the model.
        ModelLoadError: the model cannot be rebuilt.
        KeyboardInterrupt: Ctrl-C; the checkpoints being evaluated finish and are written,
            ``history.csv`` and ``history.json`` are brought up to date, and every result
            stays for the next call to reuse.

    Example:
        >>> outcome = follow("runs/exp1", idle_timeout=3600)
        >>> outcome.status, outcome.history.history["loss"][-1], outcome.missed
    """
    for name, value in (("poll", poll), ("idle_timeout", idle_timeout)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not (number and value > 0):
            raise ValueError(f"{name} must be a positive number of seconds. Received: {value!r}")
    # Before anything starts the devices: later, neither setting can be changed.
    share_device_memory()
    get_backend()
    url = next((p for p in (run_dir, output, logdir) if storage.is_url(p)), None)
    if url is not None:
        # A mirror is brought up to date once, when it is opened: it would never see the
        # checkpoints that training uploads later.
        raise RunFormatError(
            f"follow reads local folders only, not {os.fspath(url)!r}; replay a run in "
            "object storage without follow (a rerun picks up new checkpoints and skips "
            "those already evaluated).",
            usage=True,
        )
    hooks = _Hooks(progress)
    started = time.monotonic()
    run = _wait_for_run(runfmt.local_path(run_dir), poll, idle_timeout, started, hooks)
    if run is None:
        from trueloss_replay.history import build_history

        return FollowResult("idle", build_history([], {}, []))
    return _Follower(
        run,
        data=data,
        train=train,
        val=val,
        batch_size=batch_size,
        devices=devices,
        epochs=epochs,
        epoch_end_only=epoch_end_only,
        force=force,
        output=output,
        logdir=logdir,
        plot=plot,
        unsafe_deserialization=unsafe_deserialization,
        model=model,
        imports=imports,
        jit_compile=jit_compile,
        hooks=hooks,
        trust_data_factory=trust_data_factory,
    ).loop(poll, idle_timeout, started)


def _wait_for_run(path: Path, poll, idle_timeout, started, hooks) -> runfmt.Run | None:
    """The run once its manifest exists; None when ``idle_timeout`` passes first."""
    waited = False
    while not (path / runfmt.MANIFEST).is_file():
        if not waited:
            hooks.waiting(path / runfmt.MANIFEST)
            waited = True
        if idle_timeout is not None and time.monotonic() - started >= idle_timeout:
            return None
        time.sleep(poll)
    return runfmt.Run(path)


class _Hooks:
    """The caller's progress object, with a no-op for each hook it lacks."""

    _NAMES = ("waiting", "checkpoint_done", "checkpoint_failed", "checkpoint_missed", "advance")

    def __init__(self, target: Any):
        for name in self._NAMES:
            setattr(self, name, getattr(target, name, None) or (lambda *a, **k: None))


class _WorkerHooks:
    """What the scheduler's workers report. Failures are held back: the follower tells a
    checkpoint that is gone (missed) from one that is damaged (failed) after the round."""

    def __init__(self, hooks: _Hooks):
        self._hooks = hooks

    def start(self, checkpoints, batches_per_checkpoint) -> None: ...

    def advance(self, examples: int, batches: int = 1) -> None:
        self._hooks.advance(examples, batches)

    def checkpoint_done(self, result, reused: bool) -> None:
        self._hooks.checkpoint_done(result, reused)

    def checkpoint_failed(self, name: str, reason: str) -> None: ...


class _Follower:
    """The state of one ``follow`` call: what is known, done, missed, and the kept replicas."""

    def __init__(
        self,
        run: runfmt.Run,
        *,
        data,
        train,
        val,
        batch_size,
        devices,
        epochs,
        epoch_end_only,
        force,
        output,
        logdir,
        plot,
        unsafe_deserialization,
        model,
        imports,
        jit_compile,
        hooks,
        trust_data_factory,
    ):
        from trueloss_replay.history import replay_folder

        self.run = run
        self.hooks = hooks
        import_modules(imports)
        self.splits = resolve_splits(
            run, data=data, train=train, val=val, trust_data_factory=trust_data_factory
        )
        self.fingerprints = {name: split.fingerprint for name, split in self.splits.items()}
        self.devices = _device_names(devices)
        self.output = _results_dir(run, output)
        self.folder = replay_folder(run.path, output)
        self.output_arg = output
        self.logdir = None if logdir is None else Path(logdir)
        self.plot = plot
        self.wanted = parse_epochs(epochs)
        self.epoch_end_only = epoch_end_only
        self.force = force
        self.batch = _batch_size(batch_size, self.splits)
        self.builder = lambda: load_model(run, model, unsafe_deserialization)
        self.jit_compile = jit_compile
        self.replicas: dict = {}
        self.manifest: dict[str, Any] = run.manifest
        self.known: dict[str, runfmt.Checkpoint] = {}
        self.results: dict[str, dict] = {}
        self.outcome = FollowResult("running", None)
        self.figures_written = -math.inf

    # --- the loop

    def loop(self, poll: float, idle_timeout: float | None, started: float) -> FollowResult:
        last_new = started
        try:
            while True:
                # Status first: after "finished" the listing below holds every checkpoint.
                self.manifest = runfmt.read_manifest(self.run.path)
                status = self.manifest.get("status")
                if self.look():
                    last_new = time.monotonic()
                if status in FINAL_STATUSES:
                    self.outcome.status = status
                    break
                if idle_timeout is not None and time.monotonic() - last_new >= idle_timeout:
                    self.outcome.status = "idle"
                    break
                time.sleep(poll)
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                self.refresh(figures=False)  # the History files; the figure can wait
            raise
        if self.outcome.history is None:
            self.outcome.history = self.refresh()
        return self.outcome

    def look(self) -> bool:
        """Lists what is new, evaluates it; True when a new checkpoint appeared."""
        new = runfmt.list_checkpoints(self.run.checkpoint_dir, exclude=self.known)
        self.known.update((c.name, c) for c in new)
        todo, changed = [], False
        for c in new:
            if not self.selected(c.name):
                changed |= self.load_stored(c.name)
                continue
            changed = True
            if c.error:
                self.failed(c)
                continue
            stored = None
            if not self.force:
                stored = _reusable(self.result_file(c.name), c, self.fingerprints)
            if stored is not None:
                self.results[c.name] = stored
                self.outcome.reused.append(c.name)
                self.hooks.checkpoint_done(stored, True)
            else:
                todo.append(c)
        changed |= self.note_pruned()
        # A round per device count, the exports refreshed after each: after each checkpoint.
        # Behind (a backlog), the figure and TensorBoard wait up to FIGURE_INTERVAL seconds.
        step = len(self.devices)
        for start in range(0, len(todo), step):
            self.evaluate(todo[start : start + step])
            caught_up = start + step >= len(todo)
            due = time.monotonic() - self.figures_written >= FIGURE_INTERVAL
            self.outcome.history = self.refresh(figures=caught_up or due)
        if changed and not todo:
            self.outcome.history = self.refresh()
        return bool(new)

    def evaluate(self, chunk: list[runfmt.Checkpoint]) -> None:
        failures: dict[str, str] = {}
        _evaluate_all(
            chunk,
            splits=self.splits,
            device_names=self.devices,
            builder=self.builder,
            batch=self.batch,
            output=self.output,
            fingerprints=self.fingerprints,
            jit_compile=self.jit_compile,
            results=self.results,
            failures=failures,
            # A result that cannot be written is also in failures: reported as failed.
            unwritten={},
            progress=_SerializedProgress(_WorkerHooks(self.hooks)),
            replicas=self.replicas,
        )
        for c in chunk:
            if c.name in self.results:
                self.outcome.evaluated.append(c.name)
            elif c.name in failures:
                self.failed(c, failures[c.name])

    # --- bookkeeping

    def selected(self, name: str) -> bool:
        epoch, step = runfmt.parse_checkpoint_name(name) or (-1, None)
        return (self.wanted is None or epoch in self.wanted) and (
            step is None or not self.epoch_end_only
        )

    def result_file(self, name: str) -> Path:
        return runfmt.result_path(self.output, name)

    def failed(self, checkpoint: runfmt.Checkpoint, reason: str | None = None) -> None:
        """A checkpoint that could not be read: missed when its file is gone, else failed."""
        if not checkpoint.path.exists():
            self.missed(checkpoint.name)
            return
        reason = reason or checkpoint.error or "unknown error"
        self.outcome.failures[checkpoint.name] = reason
        self.hooks.checkpoint_failed(checkpoint.name, reason)

    def missed(self, name: str) -> None:
        if name not in self.outcome.missed and name not in self.results:
            self.outcome.missed[name] = MISSED_REASON
            self.hooks.checkpoint_missed(name, MISSED_REASON)

    def note_pruned(self) -> bool:
        """The manifest's ``pruned`` names not evaluated: a stored result, else missed."""
        changed = False
        for name in self.manifest.get("pruned") or []:
            if name in self.results or name in self.outcome.missed or not self.selected(name):
                continue
            if runfmt.parse_checkpoint_name(name) is None:
                continue
            if not self.load_stored(name, reuse=True):
                self.missed(name)
            changed = True
        return changed

    def load_stored(self, name: str, reuse: bool = False) -> bool:
        """Reads a stored result of a checkpoint not evaluated here (unselected, or gone)."""
        path = self.result_file(name)
        if name in self.results or not path.is_file() or (reuse and self.force):
            return False
        try:
            result = runfmt.read_result(path)
        except RunFormatError:
            return False
        if reuse and result.get("data") != self.fingerprints:
            return False
        self.results[name] = result
        if reuse:
            self.outcome.reused.append(name)
            self.hooks.checkpoint_done(result, True)
        return True

    # --- exports

    def refresh(self, figures: bool = True):
        """Rewrites history.csv and history.json, and the figure and TensorBoard scalars."""
        from trueloss_replay.history import (
            build_frame,
            exports_lock,
            history_from_frame,
            write_exports,
        )

        frame = build_frame(list(self.results.values()), self.manifest, self.known.values())
        history = history_from_frame(frame, self.manifest.get("params"))
        with exports_lock(self.folder):  # as replay's shards take it
            write_exports(frame, history, self.folder)
        if figures and history.epoch and self.results:
            self.figures_written = time.monotonic()
            if self.plot:
                self.write_figure(history)
            if self.logdir is not None:
                self.write_tensorboard()
        return history

    def write_figure(self, history) -> None:
        from trueloss_replay.plot import DEFAULT_FIGURE, plot_history

        with warnings.catch_warnings():
            # Epochs not evaluated yet are NaN: gaps in a live figure are expected.
            warnings.simplefilter("ignore", RuntimeWarning)
            plot_history(
                history, path=self.folder / DEFAULT_FIGURE, title=self.run.path.resolve().name
            )

    def write_tensorboard(self) -> None:
        from trueloss_replay.tensorboard import export_tensorboard

        # Each export replaces the event files of the previous one (never Keras' own).
        export_tensorboard(self.run.path, self.logdir, self.output_arg)
