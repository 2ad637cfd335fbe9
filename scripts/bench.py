#!/usr/bin/env python
"""Benchmarks for the performance targets of ``shared/DESIGN.md``.

Each subcommand measures one figure on the reference workload (an MLP on 40,000 training
and 10,000 validation examples of 64 float32 features, 10 classes, batch size 64) and
prints one markdown table that can be pasted into the README, plus the machine it ran on.

Timings on a shared machine are noisy, so every figure is a ratio of variants measured
side by side: within each repetition the variants run one after the other, in an order
rotated from one repetition to the next, and the table reports medians over repetitions.

    python scripts/bench.py callback                 # the full figure (~6 min on 2 cores)
    python scripts/bench.py callback --examples 2000 --epochs 2 --reps 1   # smoke run
    python scripts/bench.py callback --json bench-callback.json
    python scripts/bench.py replay                   # replay vs naive loop vs floor (~4 min)
    python scripts/bench.py replay --examples 2000 --k 3 --reps 1           # smoke run

A new figure is one more ``@cli.command()`` that reuses the helpers below
(``reference_data``, ``build_reference_model``, ``rotated``, ``median``, ``print_table``,
``machine_info``, ``write_json``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

REFERENCE_TRAIN = 40_000
REFERENCE_VAL = 10_000
FEATURES = 64
CLASSES = 10
BATCH_SIZE = 64
SEED = 1234

# TensorFlow and Keras are imported inside the functions, after this line.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# ---------------------------------------------------------------------- shared helpers


def reference_data(n_train: int = REFERENCE_TRAIN, n_val: int = REFERENCE_VAL, seed: int = SEED):
    """Synthetic, seeded, learnable data: labels from a noisy random linear teacher."""
    import numpy as np

    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(FEATURES, CLASSES)).astype("float32")

    def split(n):
        x = rng.normal(size=(n, FEATURES)).astype("float32")
        scores = x @ teacher + rng.normal(scale=2.0, size=(n, CLASSES)).astype("float32")
        return x, scores.argmax(axis=1).astype("int32")

    return split(n_train), split(n_val)


def build_reference_model(seed: int = SEED):
    """The reference MLP of DESIGN.md, compiled; the same weights for the same seed."""
    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    l2 = keras.regularizers.L2(1e-3)
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(512, activation="relu", kernel_regularizer=l2),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(512, activation="relu", kernel_regularizer=l2),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(CLASSES, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def epoch_timer():
    """A callback that records, after every other callback, when each epoch ended.

    Put it last in ``callbacks``: an epoch's time then runs from the end of the previous
    epoch's callbacks to the end of this epoch's, so it includes the training steps, the
    validation pass and whatever the other callbacks do on the training thread. The first
    duration (from ``on_train_begin``) includes tracing and is usually dropped.

    ``durations`` is wall-clock time; ``cpu_durations`` is the CPU time of the whole process
    (all threads: TensorFlow's, a callback's background writer), which other processes on a
    shared machine disturb much less than the wall clock.
    """
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.marks: list[tuple[float, float]] = []

        def on_train_begin(self, logs=None):
            self.marks = [(time.perf_counter(), time.process_time())]

        def on_epoch_end(self, epoch, logs=None):
            self.marks.append((time.perf_counter(), time.process_time()))

        @property
        def durations(self) -> list[float]:
            return [b[0] - a[0] for a, b in zip(self.marks, self.marks[1:], strict=False)]

        @property
        def cpu_durations(self) -> list[float]:
            return [b[1] - a[1] for a, b in zip(self.marks, self.marks[1:], strict=False)]

    return EpochTimer()


def rotated(items: Sequence, rep: int) -> list:
    """``items`` rotated left by ``rep``: each repetition starts with another variant."""
    k = rep % len(items)
    return list(items[k:]) + list(items[:k])


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio_summary(values: Sequence[float], baseline: Sequence[float]) -> dict[str, Any]:
    """Per-rep ratios ``values[i] / baseline[i]`` and their median, min and max."""
    ratios = [v / b for v, b in zip(values, baseline, strict=True)]
    return {
        "ratio_median": median(ratios),
        "ratio_per_rep": ratios,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Prints a markdown table; floats get 3 significant decimals."""

    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(headers)]
    click.echo("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    click.echo("| " + " | ".join("-" * w for w in widths) + " |")
    for r in text:
        click.echo("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


def machine_info() -> dict[str, Any]:
    import keras
    import tensorflow as tf

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": _cpu_model() or platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "loadavg_start": os.getloadavg(),
    }


def print_machine_info(info: dict[str, Any]) -> None:
    click.echo(
        f"{info['date']}  {info['processor']}  cpus={info['cpus_usable']}/{info['cpu_count']}"
        f"  gpus={len(info['gpus'])}  python {info['python']}  TF {info['tensorflow']}"
        f"  Keras {info['keras']} ({info['backend']})"
    )
    load = " -> ".join(
        "/".join(f"{v:.1f}" for v in info[k]) for k in ("loadavg_start", "loadavg_end") if k in info
    )
    click.echo(f"load average (1/5/15 min): {load}; other processes inflate wall-clock times")


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        click.echo(f"wrote {path}")


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _log(message: str) -> None:
    click.echo(message, err=True)


# ---------------------------------------------------------------------- commands


def _reps_option(default: int):
    return click.option(
        "--reps",
        default=default,
        show_default=True,
        type=click.IntRange(min=1),
        help="Repetitions of every variant.",
    )


def _examples_option(default: int, minimum: int):
    return click.option(
        "--examples",
        default=default,
        show_default=True,
        type=click.IntRange(min=minimum),
        help="Training examples (validation: a quarter as many). Lower it for a smoke run.",
    )


def _k_option(default: int):
    return click.option(
        "--k",
        "k",
        default=default,
        show_default=True,
        type=click.IntRange(min=2),
        help="Checkpoints in the run folder.",
    )


_json_option = click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="Also write JSON."
)


@click.group()
def cli():
    """Benchmarks for the performance targets of DESIGN.md."""


def _in_fit_evaluate(x_train, y_train):
    """The seed library's approach: evaluate the training set inside fit, every epoch."""
    import keras

    class InFitEvaluate(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.evaluate(x_train, y_train, verbose=0)

    return InFitEvaluate()


def _callback_variants(x_train, y_train) -> dict[str, Callable[[Path], list]]:
    """Variant name -> function(tmpdir) returning the callbacks of that variant."""
    import keras

    from trueloss_replay import ReplayCheckpoint

    return {
        "none": lambda tmp: [],
        "ReplayCheckpoint": lambda tmp: [ReplayCheckpoint(tmp / "run")],
        "ModelCheckpoint": lambda tmp: [
            keras.callbacks.ModelCheckpoint(
                str(tmp / "w{epoch}.weights.h5"), save_weights_only=True
            )
        ],
        "in-fit evaluate": lambda tmp: [_in_fit_evaluate(x_train, y_train)],
    }


@cli.command()
@click.option(
    "--epochs",
    default=5,
    show_default=True,
    type=click.IntRange(min=2),
    help="Epochs per fit; the first is not timed.",
)
@_reps_option(5)
@_examples_option(REFERENCE_TRAIN, 4)
@click.option(
    "--variant",
    "only",
    multiple=True,
    help="Run only these variants (repeatable); 'none' is always run.",
)
@_json_option
def callback(epochs, reps, examples, only, json_path):
    """Training time with each checkpointing callback / without one.

    Times model.fit epochs 2..E with a per-epoch timer placed after the callback under
    test (epoch 1 carries the tracing and is dropped), for: no callback, ReplayCheckpoint
    (default options), Keras ModelCheckpoint(save_weights_only=True) every epoch, and an
    in-fit evaluate() of the training set every epoch (the seed library's approach).
    Reports the median s/epoch and the median per-rep ratio to no callback, for the wall
    clock and for the process CPU time (less disturbed by other processes).

    \b
    Example:
        python scripts/bench.py callback --json callback.json
    """
    info = machine_info()
    (x, y), (xv, yv) = reference_data(examples, max(examples // 4, 1))
    variants = _callback_variants(x, y)
    unknown = set(only) - set(variants)
    if unknown:
        raise click.BadParameter(
            f"unknown variant(s) {sorted(unknown)}; choose from {list(variants)}.",
            param_hint="--variant",
        )
    if only:
        variants = {k: v for k, v in variants.items() if k == "none" or k in only}
    names = list(variants)

    # raw[name][rep]: the timed epochs (wall and CPU seconds) and the whole fit() of one run.
    raw: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for rep in range(reps):
        for name in rotated(names, rep):
            model = build_reference_model()
            timer = epoch_timer()
            with tempfile.TemporaryDirectory(prefix="bench-callback-") as tmp:
                callbacks = variants[name](Path(tmp)) + [timer]
                start = time.perf_counter()
                model.fit(
                    x,
                    y,
                    validation_data=(xv, yv),
                    epochs=epochs,
                    batch_size=BATCH_SIZE,
                    callbacks=callbacks,
                    verbose=0,
                )
                fit_s = time.perf_counter() - start
            run = {
                "epochs": timer.durations[1:],
                "cpu_epochs": timer.cpu_durations[1:],
                "first_epoch": timer.durations[0],
                "fit": fit_s,
            }
            raw[name].append(run)
            _log(
                f"rep {rep + 1}/{reps} {name:<17} s/epoch (2..{epochs}): "
                + " ".join(f"{d:.2f}" for d in run["epochs"])
                + "   cpu: "
                + " ".join(f"{d:.2f}" for d in run["cpu_epochs"])
                + f"   fit {fit_s:.1f}s"
            )
    info["loadavg_end"] = os.getloadavg()

    summary = {}
    for name in names:
        wall = [median(r["epochs"]) for r in raw[name]]
        cpu = [median(r["cpu_epochs"]) for r in raw[name]]
        summary[name] = {
            "s_per_epoch_median": median(wall),
            "s_per_epoch_per_rep": wall,
            **ratio_summary(wall, [median(r["epochs"]) for r in raw["none"]]),
            "cpu_s_per_epoch_median": median(cpu),
            "cpu_ratio_median": ratio_summary(cpu, [median(r["cpu_epochs"]) for r in raw["none"]])[
                "ratio_median"
            ],
            "fit_s_median": median([r["fit"] for r in raw[name]]),
        }

    click.echo("")
    click.echo(
        f"callback: {examples} train / {len(xv)} val examples, batch {BATCH_SIZE}, "
        f"{epochs} epochs (timed: 2..{epochs}, per-epoch timer), {reps} reps, rotated order"
    )
    print_machine_info(info)
    click.echo("")
    print_table(
        [
            "variant",
            "s/epoch (median)",
            "s/epoch per rep",
            "ratio / none (median)",
            "ratio per rep",
            "CPU s/epoch",
            "CPU ratio",
        ],
        [
            [
                name,
                s["s_per_epoch_median"],
                " ".join(f"{v:.2f}" for v in s["s_per_epoch_per_rep"]),
                s["ratio_median"],
                " ".join(f"{v:.3f}" for v in s["ratio_per_rep"]),
                s["cpu_s_per_epoch_median"],
                s["cpu_ratio_median"],
            ]
            for name, s in summary.items()
        ],
    )
    if "ReplayCheckpoint" in summary:
        ratio = summary["ReplayCheckpoint"]["ratio_median"]
        verdict = "meets" if ratio <= 1.02 else "misses"
        note = "" if examples == REFERENCE_TRAIN else " (which applies to --examples 40000 only)"
        click.echo(f"\nReplayCheckpoint / none = {ratio:.3f}: {verdict} the target <= 1.02{note}")

    write_json(
        json_path,
        {
            "benchmark": "callback",
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "config": {
                "train_examples": examples,
                "val_examples": len(xv),
                "batch_size": BATCH_SIZE,
                "epochs": epochs,
                "timed_epochs": f"2..{epochs}",
                "reps": reps,
                "order": "rotated each rep",
            },
            "machine": info,
            "raw": raw,
            "summary": summary,
        },
    )


# ---------------------------------------------------------------------- replay


def _make_replay_run(run_dir: Path, k: int, train, val, fit_examples: int) -> None:
    """A run folder with ``k`` checkpoints: the initial weights and ``k - 1`` short epochs.

    The epochs train on the first ``fit_examples`` examples only: the figures are about
    evaluation speed, which does not depend on what the weights are. The callback is given
    the full splits, so the run folder holds them as ``data/train.h5`` and ``data/val.h5``
    and ``replay()`` is measured through its public API with no data argument.
    """
    from trueloss_replay import ReplayCheckpoint

    model = build_reference_model()
    x, y = train
    model.fit(
        x[:fit_examples],
        y[:fit_examples],
        epochs=k - 1,
        batch_size=BATCH_SIZE,
        verbose=0,
        callbacks=[ReplayCheckpoint(run_dir, train_data=train, val_data=val)],
    )


class _WeightsCensus:
    """Counts the checkpoints whose weights ``read_weights`` returned and are still alive."""

    def __init__(self):
        self.alive = 0
        self.peak = 0

    def wrap(self, read_weights):
        import weakref

        def counted(path):
            weights = read_weights(path)
            arrays = list(weights.values())
            if arrays:
                self.alive += 1
                self.peak = max(self.peak, self.alive)
                # The checkpoint counts as held until its last array is freed.
                remaining = [len(arrays)]

                def release():
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        self.alive -= 1

                for array in arrays:
                    weakref.finalize(array, release)
            return weights

        return counted


def _replay_memory(run_dir: Path, epochs: str | None) -> dict[str, Any]:
    """One untimed replay under tracemalloc: host (numpy and Python) peak bytes, and the
    most checkpoints' weights alive at once."""
    import tracemalloc

    from trueloss_replay import engine
    from trueloss_replay import run as runfmt

    census = _WeightsCensus()
    original = runfmt.read_weights
    runfmt.read_weights = census.wrap(original)
    tracemalloc.start()
    try:
        engine.replay(run_dir, epochs=epochs, force=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        runfmt.read_weights = original
    return {"tracemalloc_peak_bytes": peak, "checkpoints_alive_peak": census.peak}


def _recording_evaluators():
    """Patches the engine so that every Evaluator it creates is recorded (for ``traces``)."""
    from trueloss_replay import engine

    created: list[Any] = []
    base = engine.Evaluator

    class Recorded(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    engine.Evaluator = Recorded
    return created, lambda: setattr(engine, "Evaluator", base)


def _timed_replay(run_dir: Path, epochs: str | None) -> dict[str, Any]:
    """Wall seconds of one public ``replay()`` call, its results' per-checkpoint seconds, and
    the traces of the step."""
    from trueloss_replay import engine
    from trueloss_replay.history import load_results

    created, restore = _recording_evaluators()
    try:
        start = time.perf_counter()
        engine.replay(run_dir, epochs=epochs, force=True)
        wall = time.perf_counter() - start
    finally:
        restore()
    results = sorted(load_results(run_dir), key=lambda r: r["evaluated"])
    if epochs is not None:
        wanted = engine.parse_epochs(epochs)
        results = [r for r in results if r["epoch"] in wanted]
    return {
        "wall": wall,
        # The evaluation of each checkpoint (weights in, train and val figures out), in the
        # order evaluated: the first one carries the tracing and XLA compilation.
        "checkpoint_seconds": [r["seconds"] for r in results],
        "traces": [e.traces for e in created],
    }


def _naive_loop(run_dir: Path, train, val) -> list[float]:
    """What one writes by hand: per checkpoint, load the model, load the weights, evaluate
    both sets at Keras' default batch size (32). Seconds per checkpoint."""
    import warnings

    import keras

    from trueloss_replay import run as runfmt

    times = []
    for checkpoint in runfmt.Run(run_dir).checkpoints():
        start = time.perf_counter()
        with warnings.catch_warnings():  # the optimizer's variables are not in model.keras
            warnings.simplefilter("ignore")
            model = keras.saving.load_model(run_dir / runfmt.MODEL_FILE)
        runfmt.load_weights(model, checkpoint.path)
        model.evaluate(*train, verbose=0)
        model.evaluate(*val, verbose=0)
        times.append(time.perf_counter() - start)
    return times


def _reused_model(run_dir: Path, train, val, batch_size: int) -> list[float]:
    """One model loaded once; per checkpoint, load the weights and ``evaluate`` at a large
    batch. Seconds per checkpoint; the first includes the tracing."""
    import warnings

    import keras

    from trueloss_replay import run as runfmt

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = keras.saving.load_model(run_dir / runfmt.MODEL_FILE)
    times = []
    for checkpoint in runfmt.Run(run_dir).checkpoints():
        runfmt.load_weights(model, checkpoint.path)
        model.evaluate(*train, batch_size=batch_size, verbose=0)
        model.evaluate(*val, batch_size=batch_size, verbose=0)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
    return times


class _Floor:
    """The XLA-compiled forward pass alone, over train and val batched as replay batches them
    (the same shapes), the batches already on the device. Compiled once, outside the timing."""

    def __init__(self, train, val, batch_size: int):
        import tensorflow as tf

        self.model = build_reference_model()
        self.forward = tf.function(
            lambda x: self.model(x, training=False),
            jit_compile=True,
            reduce_retracing=False,
            autograph=False,
        )
        self.batches = [
            tf.convert_to_tensor(x[i : i + batch_size])
            for x in (train[0], val[0])
            for i in range(0, len(x), batch_size)
        ]
        start = time.perf_counter()
        self.run()
        self.compile_seconds = time.perf_counter() - start

    def run(self) -> float:
        import numpy as np

        start = time.perf_counter()
        outputs = [self.forward(b) for b in self.batches]
        # One stream runs the batches in order: the last one done means all are done.
        np.asarray(outputs[-1])
        return time.perf_counter() - start


def _replay_profile(run_dir: Path, floor: _Floor, batch_size: int, reps: int) -> dict:
    """Where one checkpoint's time goes inside the engine, next to the floor, alternating.

    Setup (once per replay call): model load, data load, first evaluation of each split
    (build, tracing, XLA compilation). Per checkpoint: reading the weights file (done on a
    background thread during the previous checkpoint's evaluation), assigning them, the
    step calls alone (every batch dispatched, one sync at the end), the full ``evaluate``
    of both splits (step calls + read-backs + float64 sums + metric results), and writing
    the result file.
    """
    import contextlib

    from trueloss_replay import engine
    from trueloss_replay import run as runfmt
    from trueloss_replay.data import resolve_splits

    run = runfmt.Run(run_dir)
    checkpoints = run.checkpoints()
    times: dict[str, dict[str, list[float]]] = {"setup": {}, "per_checkpoint": {}}

    @contextlib.contextmanager
    def timed(kind: str, name: str):
        start = time.perf_counter()
        yield
        times[kind].setdefault(name, []).append(time.perf_counter() - start)

    for _ in range(reps):
        with timed("setup", "load model.keras + compile"):
            evaluator = engine.Evaluator(engine.load_model(run))
        with timed("setup", "load data (h5)"):
            splits = resolve_splits(run)
        evaluator.load(runfmt.read_weights(checkpoints[0].path), "e0")
        for name, split in splits.items():
            with timed("setup", f"first evaluate({name}): build + trace + compile"):
                evaluator.evaluate(split, batch_size)
        for checkpoint in checkpoints[1:]:
            with timed("per_checkpoint", "read weights (background thread)"):
                weights = runfmt.read_weights(checkpoint.path)
            with timed("per_checkpoint", "assign weights"):
                evaluator.load(weights, checkpoint.name)
            with timed("per_checkpoint", "step calls only (one sync at the end)"):
                _step_calls(evaluator, splits, batch_size)
            with timed("per_checkpoint", "evaluate(train) + evaluate(val)"):
                figures = {n: evaluator.evaluate(s, batch_size) for n, s in splits.items()}
            with timed("per_checkpoint", "write the result JSON"):
                runfmt.atomic_write_json(run_dir / "profile.json", figures)
            with timed("per_checkpoint", "floor (XLA forward pass alone)"):
                floor.run()
    return {kind: {k: median(v) for k, v in items.items()} for kind, items in times.items()}


def _step_calls(evaluator, splits, batch_size: int) -> None:
    import numpy as np
    import tensorflow as tf

    outputs = []
    with tf.device(evaluator.device):
        for split in splits.values():
            for x, y, sw in evaluator._batches(split, batch_size):
                outputs.append(evaluator._step(x, y, sw))
    np.asarray(outputs[-1][0])


@cli.command("replay")
@_k_option(10)
@_reps_option(3)
@_examples_option(REFERENCE_TRAIN, 8)
@click.option(
    "--batch-size",
    default=2048,
    show_default=True,
    type=click.IntRange(min=1),
    help="Batch size of replay, of the reused model and of the floor.",
)
@click.option("--profile/--no-profile", default=True, show_default=True, help="Also profile.")
@_json_option
def replay_command(k, reps, examples, batch_size, profile, json_path):
    """Replay seconds per checkpoint against the naive loop, a reused model and the floor.

    On a run folder of K checkpoints of the reference model (the initial weights and K-1
    one-epoch fits on 2,000 examples; the data snapshots are the full splits), measures per
    repetition, in rotated order:

    \b
      replay K   replay(run_dir, force=True): every checkpoint, one public call
      replay 1   replay(run_dir, epochs="0", force=True): one checkpoint
      naive      per checkpoint: keras.saving.load_model, load weights, evaluate
                 train and val at the default batch size (32)
      reused     one model; per checkpoint: load weights, evaluate at --batch-size
      floor      tf.function(jit_compile=True) of model(x, training=False) over the
                 same batches, already on the device, compiled beforehand

    "incl. setup" is wall time / K (model load, data load, tracing and XLA compilation
    included); "steady" is the median of the checkpoints after the first. Then one untimed
    replay of K and of 1 checkpoint under tracemalloc (host peak bytes, checkpoints' weights
    alive at once), and a profile of where a checkpoint's time goes in the engine.

    \b
    Example:
        python scripts/bench.py replay --json replay.json
        python scripts/bench.py replay --examples 2000 --k 3 --reps 1   # smoke run
    """
    import resource

    info = machine_info()
    train, val = reference_data(examples, max(examples // 4, 1))
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        run_dir = Path(tmp) / "run"
        _make_replay_run(run_dir, k, train, val, fit_examples=min(examples, 2000))
        floor = _Floor(train, val, batch_size)
        variants: dict[str, Callable[[], Any]] = {
            "replay K": lambda: _timed_replay(run_dir, None),
            "replay 1": lambda: _timed_replay(run_dir, "0"),
            "naive": lambda: _naive_loop(run_dir, train, val),
            "reused": lambda: _reused_model(run_dir, train, val, batch_size),
            "floor": lambda: [floor.run() for _ in range(k)],
        }
        raw: dict[str, list[Any]] = {name: [] for name in variants}
        for rep in range(reps):
            for name in rotated(list(variants), rep):
                raw[name].append(variants[name]())
                _log(f"rep {rep + 1}/{reps} {name:<9} {_describe(raw[name][-1])}")
        memory = {
            "replay K": _replay_memory(run_dir, None),
            "replay 1": _replay_memory(run_dir, "0"),
        }
        profile_data = _replay_profile(run_dir, floor, batch_size, reps) if profile else None
    info["loadavg_end"] = os.getloadavg()
    info["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    summary = _replay_summary(raw, k, floor.compile_seconds)
    summary["memory"] = memory
    _print_replay(summary, info, k, examples, len(val[0]), batch_size, reps, profile_data)
    write_json(
        json_path,
        {
            "benchmark": "replay",
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "config": {
                "checkpoints": k,
                "train_examples": examples,
                "val_examples": len(val[0]),
                "batch_size": batch_size,
                "reps": reps,
                "order": "rotated each rep",
                "checkpoints_from": "initial weights + K-1 one-epoch fits on 2,000 examples",
            },
            "machine": info,
            "raw": raw,
            "summary": summary,
            "profile": profile_data,
        },
    )


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        steps = " ".join(f"{s:.3f}" for s in value["checkpoint_seconds"])
        return f"wall {value['wall']:.2f}s  checkpoints: {steps}  traces {value['traces']}"
    return "s/checkpoint: " + " ".join(f"{v:.3f}" for v in value)


def _replay_summary(raw: dict[str, list[Any]], k: int, floor_compile: float) -> dict[str, Any]:
    """Medians over repetitions of per-checkpoint seconds, and the ratios of the targets."""
    floor = [median(times) for times in raw["floor"]]
    rows: dict[str, dict[str, float]] = {}
    replay_k = raw["replay K"]
    rows["replay"] = {
        "incl_setup": median([r["wall"] / k for r in replay_k]),
        "steady": median([median(r["checkpoint_seconds"][1:]) for r in replay_k]),
        "setup": median([r["wall"] - k * median(r["checkpoint_seconds"][1:]) for r in replay_k]),
        "incl_setup_per_rep": [r["wall"] / k for r in replay_k],
        "steady_per_rep": [median(r["checkpoint_seconds"][1:]) for r in replay_k],
    }
    rows["naive"] = {
        "incl_setup": median([sum(t) / k for t in raw["naive"]]),
        "steady": median([median(t) for t in raw["naive"]]),
        "setup": 0.0,
        "incl_setup_per_rep": [sum(t) / k for t in raw["naive"]],
        "steady_per_rep": [median(t) for t in raw["naive"]],
    }
    rows["reused"] = {
        "incl_setup": median([sum(t) / k for t in raw["reused"]]),
        "steady": median([median(t[1:]) for t in raw["reused"]]),
        "setup": median([sum(t) - k * median(t[1:]) for t in raw["reused"]]),
        "incl_setup_per_rep": [sum(t) / k for t in raw["reused"]],
        "steady_per_rep": [median(t[1:]) for t in raw["reused"]],
    }
    rows["floor"] = {
        "incl_setup": median(floor) + floor_compile / k,
        "steady": median(floor),
        "setup": floor_compile,
        "incl_setup_per_rep": [f + floor_compile / k for f in floor],
        "steady_per_rep": floor,
    }
    for row in rows.values():
        row["steady_over_floor"] = median(
            [a / b for a, b in zip(row["steady_per_rep"], floor, strict=True)]
        )
        row["incl_setup_over_floor"] = median(
            [a / b for a, b in zip(row["incl_setup_per_rep"], floor, strict=True)]
        )
    naive_over_replay = [
        a / b
        for a, b in zip(
            rows["naive"]["incl_setup_per_rep"], rows["replay"]["incl_setup_per_rep"], strict=True
        )
    ]
    k_over_one = [
        rk["wall"] / (k * r1["wall"]) for rk, r1 in zip(replay_k, raw["replay 1"], strict=True)
    ]
    return {
        "per_checkpoint": rows,
        "a_over_d_steady": rows["replay"]["steady_over_floor"],
        "a_over_d_incl_setup": rows["replay"]["incl_setup_over_floor"],
        "b_over_a_incl_setup": median(naive_over_replay),
        "b_over_a_steady": median(
            [
                a / b
                for a, b in zip(
                    rows["naive"]["steady_per_rep"], rows["replay"]["steady_per_rep"], strict=True
                )
            ]
        ),
        "replay_k_over_k_times_one": median(k_over_one),
        "replay_one_wall": median([r["wall"] for r in raw["replay 1"]]),
        "traces": raw["replay K"][-1]["traces"],
    }


def _print_replay(summary, info, k, examples, val_examples, batch_size, reps, profile) -> None:
    rows = summary["per_checkpoint"]
    labels = {
        "replay": "(a) replay()",
        "naive": "(b) naive loop: load_model + evaluate, batch 32",
        "reused": f"(c) one model, evaluate, batch {batch_size}",
        "floor": f"(d) floor: XLA forward pass alone, batch {batch_size}",
    }
    click.echo("")
    click.echo(
        f"replay: {k} checkpoints, {examples} train + {val_examples} val examples, "
        f"{reps} reps, rotated order; medians"
    )
    print_machine_info(info)
    click.echo("")
    print_table(
        [
            "variant",
            "s/checkpoint, steady",
            "/ floor",
            "s/checkpoint incl. setup (wall / K)",
            "/ floor",
            "one-time setup s",
        ],
        [
            [
                labels[name],
                row["steady"],
                row["steady_over_floor"],
                row["incl_setup"],
                row["incl_setup_over_floor"],
                row["setup"],
            ]
            for name, row in rows.items()
        ],
    )
    memory = summary["memory"]
    click.echo("")
    print_table(
        ["figure", "value", "target"],
        [
            ["a/d, steady", summary["a_over_d_steady"], "<= 1.3"],
            ["a/d, incl. setup", summary["a_over_d_incl_setup"], ""],
            ["b/a, incl. setup", summary["b_over_a_incl_setup"], ">= 10"],
            ["b/a, steady", summary["b_over_a_steady"], ""],
            [f"replay of {k} / ({k} x replay of 1)", summary["replay_k_over_k_times_one"], "< 1.0"],
            ["replay of 1 checkpoint, wall s", summary["replay_one_wall"], ""],
            ["traces of the step (per device)", str(summary["traces"]), "one per shape"],
            [
                f"host peak (tracemalloc), replay of {k} / of 1, MiB",
                f"{memory['replay K']['tracemalloc_peak_bytes'] / 2**20:.1f} / "
                f"{memory['replay 1']['tracemalloc_peak_bytes'] / 2**20:.1f}",
                "not growing with K",
            ],
            [
                f"checkpoints' weights alive at once, replay of {k}",
                str(memory["replay K"]["checkpoints_alive_peak"]),
                "<= 2",
            ],
            ["process peak RSS (ru_maxrss, whole run), MiB", f"{info['ru_maxrss_mib']:.0f}", ""],
        ],
    )
    if profile:
        click.echo("")
        print_table(
            ["where a replay's time goes (medians)", "seconds"],
            [[f"setup: {n}", v] for n, v in profile["setup"].items()]
            + [[f"per checkpoint: {n}", v] for n, v in profile["per_checkpoint"].items()],
        )


# --------------------------------------------------------------------------- data-major


class _DecodingBatches:
    """A ``PyDataset`` whose batches cost ``delay`` seconds each to produce, as decoding
    images or reading files would; the model then waits on the pipeline, not the device."""

    def __new__(cls, x, y, batch: int, delay: float):
        import keras

        class Batches(keras.utils.PyDataset):
            def __len__(self):
                return -(-len(x) // batch)

            def __getitem__(self, i):
                time.sleep(delay)
                part = slice(i * batch, (i + 1) * batch)
                return x[part], y[part]

        return Batches()


@cli.command("datamajor")
@_k_option(8)
@_reps_option(3)
@_examples_option(8_000, 8)
@click.option(
    "--delay", default=0.02, show_default=True, type=float, help="Seconds to produce a batch."
)
@_json_option
def datamajor_command(k, reps, examples, delay, json_path):
    """Replay with a slow input pipeline: checkpoint-major vs data-major.

    \b
    Example:
        python scripts/bench.py datamajor --k 8 --delay 0.02
    """
    from trueloss_replay.engine import replay

    info = machine_info()
    (x, y), (xv, yv) = reference_data(examples, max(examples // 4, 1))
    seconds: dict[str, list[float]] = {"checkpoint-major": [], "data-major": []}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        _make_replay_run(run_dir, k, (x, y), (xv, yv), min(examples, 2_000))
        train = _DecodingBatches(x, y, 2048, delay)
        val = _DecodingBatches(xv, yv, 2048, delay)
        for rep in range(reps):
            for mode in rotated(list(seconds), rep):
                started = time.perf_counter()
                replay(run_dir, train=train, val=val, force=True, data_major=mode == "data-major")
                seconds[mode].append(time.perf_counter() - started)
                _log(f"rep {rep + 1}/{reps} {mode:<16} {seconds[mode][-1]:.2f}s")
    summary = {mode: median(v) for mode, v in seconds.items()}
    print_machine_info(info)
    click.echo(
        f"{k} checkpoints, {examples} + {len(xv)} examples in batches of 2048 that take "
        f"{delay}s each to produce; {reps} reps, rotated order; medians"
    )
    print_table(
        ["mode", "s per replay", "s per checkpoint", "ratio to checkpoint-major"],
        [
            [mode, f"{v:.2f}", f"{v / k:.3f}", f"{v / summary['checkpoint-major']:.2f}"]
            for mode, v in summary.items()
        ],
    )
    write_json(json_path, {"machine": info, "seconds": seconds, "median": summary})


if __name__ == "__main__":
    cli()
