#!/usr/bin/env python
"""Benchmarks for the performance targets of ``shared/DESIGN.md``, on TensorFlow or JAX.

Each subcommand measures one figure on a DESIGN workload (the reference MLP on 40,000 training
and 10,000 validation examples of 64 float32 features; or the compute-bound CNN on 50,000
random 32x32x3 images) and prints one markdown table that can be pasted into the README, plus
the machine, backend and device it ran on.

Timings on a shared machine are noisy, so every figure is a ratio of variants measured
side by side: within each repetition the variants run one after the other, in an order
rotated from one repetition to the next, and the table reports medians over repetitions.

The backend is chosen before Keras is imported (``--backend``, default ``KERAS_BACKEND`` or
tensorflow). TensorFlow is never imported under ``--backend jax``: the GPU machines that run
the JAX figures have no TensorFlow installed.

    python scripts/bench.py callback                 # the full figure (~6 min on 2 cores)
    python scripts/bench.py callback --examples 2000 --epochs 2 --reps 1   # smoke run
    python scripts/bench.py --backend jax callback --json bench-callback.json
    python scripts/bench.py replay                   # replay vs reused vs naive vs floor
    python scripts/bench.py replay --examples 2000 --k 3 --reps 1           # smoke run
    python scripts/bench.py --backend jax replay --workload cnn --examples 4000 --k 3 --reps 1
    python scripts/bench.py --backend jax replay --workload cnn --skip naive   # on a GPU
    python scripts/bench.py datamajor --examples 8000 --k 8 --delay 0.02

A new figure is one more ``@cli.command()`` that reuses the helpers below
(``WORKLOADS``, ``rotated``, ``median``, ``print_table``, ``machine_info``, ``write_json``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

REFERENCE_TRAIN = 40_000
REFERENCE_VAL = 10_000
FEATURES = 64
CLASSES = 10
BATCH_SIZE = 64
SEED = 1234
BACKENDS = ("tensorflow", "jax")

# TensorFlow, JAX and Keras are imported inside the functions, after the backend is chosen.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# ---------------------------------------------------------------------- workloads


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


def cnn_data(n_train: int, n_val: int, seed: int = SEED):
    """Random 32x32x3 float32 images and int32 labels 0..9, seeded (speed only, not learning)."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def split(n):
        x = rng.random((n, 32, 32, 3), dtype=np.float32)
        return x, rng.integers(0, CLASSES, size=n, dtype=np.int32)

    return split(n_train), split(n_val)


def build_cnn_model(seed: int = SEED):
    """DESIGN.md's compute-bound CNN, compiled; the same weights for the same seed."""
    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.BatchNormalization(),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(128, 3, padding="same", activation="relu"),
            layers.BatchNormalization(),
            layers.Conv2D(128, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dropout(0.5),
            layers.Dense(CLASSES, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


@dataclass(frozen=True)
class Workload:
    """A model and its data, with the defaults the figures are quoted at."""

    name: str
    description: str
    train: int  # default training examples
    val_divisor: int  # validation examples = training examples // val_divisor
    batch_size: int  # default evaluation batch size
    fit_examples: int  # the short fits that make the checkpoints train on at most this many
    data: Callable[[int, int], tuple]
    build: Callable[[], Any]

    def splits(self, examples: int | None):
        n = examples or self.train
        return self.data(n, max(n // self.val_divisor, 1))


WORKLOADS = {
    "mlp": Workload(
        "mlp",
        "reference MLP (64 features, Dense 512 + BN + Dropout + Dense 512 + Dense 10)",
        REFERENCE_TRAIN,
        4,
        2048,
        2000,
        reference_data,
        build_reference_model,
    ),
    "cnn": Workload(
        "cnn",
        "CNN (32x32x3; Conv64, BN, Conv64, pool, Conv128, BN, Conv128, pool, Dense 10)",
        50_000,
        5,
        1024,
        256,
        cnn_data,
        build_cnn_model,
    ),
}


# ---------------------------------------------------------------------- shared helpers


def epoch_timer():
    """A callback that records, after every other callback, when each epoch ended.

    Put it last in ``callbacks``: an epoch's time then runs from the end of the previous
    epoch's callbacks to the end of this epoch's, so it includes the training steps, the
    validation pass and whatever the other callbacks do on the training thread. The first
    duration (from ``on_train_begin``) includes tracing and is usually dropped.

    ``durations`` is wall-clock time; ``cpu_durations`` is the CPU time of the whole process
    (all threads: the backend's, a callback's background writer), which other processes on a
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
    """The machine, the Keras backend and its version, and the device replay runs on."""
    import keras

    from trueloss_replay.backends import get_backend, resolve_devices
    from trueloss_replay.reading import reader_count

    backend = get_backend()
    gpus, _ = backend.list_devices()
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
        "python": platform.python_version(),
        "keras": keras.__version__,
        "backend": backend.NAME,
        "backend_version": backend.version(),
        "gpus": gpus,
        "devices": resolve_devices("auto"),
        "device_kind": _device_kind(backend.NAME, gpus),
        "replay_reader_processes": reader_count(),  # TRUELOSS_REPLAY_READERS
        "loadavg_start": os.getloadavg(),
    }


def _device_kind(backend: str, gpus: list[str]) -> str:
    """What the first device is, e.g. "NVIDIA H100 80GB HBM3", or "cpu"."""
    if backend == "jax":
        import jax

        return jax.devices()[0].device_kind
    if gpus:
        import tensorflow as tf

        details = tf.config.experimental.get_device_details(
            tf.config.list_physical_devices("GPU")[0]
        )
        return details.get("device_name", "GPU")
    return "cpu"


def print_machine_info(info: dict[str, Any]) -> None:
    click.echo(
        f"{info['date']}  {info['processor']}  cpus={info['cpus_usable']}/{info['cpu_count']}"
        f"  python {info['python']}  Keras {info['keras']}  {info['backend']} "
        f"{info['backend_version']}  device {', '.join(info['devices'])} ({info['device_kind']})"
        f"  replay's reader processes {info['replay_reader_processes']}"
    )
    load = " -> ".join(
        "/".join(f"{v:.1f}" for v in info[k]) for k in ("loadavg_start", "loadavg_end") if k in info
    )
    click.echo(f"load average (1/5/15 min): {load}; other processes inflate wall-clock times")


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        click.echo(f"wrote {path}")


def _command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


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


def _select_backend(name: str) -> None:
    """Points Keras at ``name``; it reads ``KERAS_BACKEND`` once, when first imported."""
    keras = sys.modules.get("keras")
    if keras is not None and keras.backend.backend() != name:
        raise click.UsageError(
            f"--backend {name}: Keras is already imported on {keras.backend.backend()!r} in "
            "this process; run the script in a fresh process."
        )
    os.environ["KERAS_BACKEND"] = name


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
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default=lambda: os.environ.get("KERAS_BACKEND", "tensorflow"),
    show_default="KERAS_BACKEND, else tensorflow",
    help="Keras backend to measure; set before Keras is imported.",
)
def cli(backend):
    """Benchmarks for the performance targets of DESIGN.md.

    \b
    Example:
        python scripts/bench.py --backend jax replay --workload cnn --skip naive
    """
    _select_backend(backend)


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

    Times model.fit epochs 2..E of the reference MLP with a per-epoch timer placed after the
    callback under test (epoch 1 carries the tracing and is dropped), for: no callback,
    ReplayCheckpoint (default options), Keras ModelCheckpoint(save_weights_only=True) every
    epoch, and an in-fit evaluate() of the training set every epoch (the seed library's
    approach). Reports the median s/epoch and the median per-rep ratio to no callback, for
    the wall clock and for the process CPU time (less disturbed by other processes).

    \b
    Example:
        python scripts/bench.py callback --json callback.json
        python scripts/bench.py --backend jax callback --examples 2000 --epochs 2 --reps 1
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
        target = 1.01 if info["gpus"] else 1.02
        verdict = "meets" if ratio <= target else "misses"
        note = "" if examples == REFERENCE_TRAIN else " (which applies to --examples 40000 only)"
        click.echo(
            f"\nReplayCheckpoint / none = {ratio:.3f}: {verdict} the target <= {target}{note}"
        )

    write_json(
        json_path,
        {
            "benchmark": "callback",
            "command": _command_line(),
            "config": {
                "workload": "mlp",
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


def _make_replay_run(
    run_dir: Path, k: int, train, val, fit_examples: int, build: Callable = build_reference_model
) -> None:
    """A run folder with ``k`` checkpoints: the initial weights and ``k - 1`` short epochs.

    The epochs train on the first ``fit_examples`` examples only: the figures are about
    evaluation speed, which does not depend on what the weights are. The callback is given
    the full splits, so the run folder holds them as ``data/train.h5`` and ``data/val.h5``
    and ``replay()`` is measured through its public API with no data argument.
    """
    from trueloss_replay import ReplayCheckpoint

    model = build()
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
    """Counts the checkpoints whose weights are in host memory: those ``read_weights``
    returned, and the slots of the stacked buffers (``Evaluator.host_stack``) that replay
    reads several checkpoints into, until their arrays are freed."""

    def __init__(self):
        self.alive = 0
        self.peak = 0

    def hold(self, checkpoints: int, arrays: list) -> None:
        import weakref

        if not arrays:
            return
        self.alive += checkpoints
        self.peak = max(self.peak, self.alive)
        remaining = [len(arrays)]  # held until the last array is freed

        def release():
            remaining[0] -= 1
            if remaining[0] == 0:
                self.alive -= checkpoints

        for array in arrays:
            weakref.finalize(array, release)

    def wrap(self, read_weights):
        def counted(path, *args, **kwargs):
            weights = read_weights(path, *args, **kwargs)
            self.hold(1, list(weights.values()))
            return weights

        return counted

    def wrap_stack(self, host_stack):
        def counted(evaluator, size):
            buffers = host_stack(evaluator, size)
            self.hold(size, list(buffers))
            return buffers

        return counted


def _replay_memory(run_dir: Path, epochs: str | None, batch_size: int) -> dict[str, Any]:
    """One untimed replay under tracemalloc: host (numpy and Python) peak bytes, and the
    most checkpoints' weights in host memory at once."""
    import tracemalloc

    from trueloss_replay import engine
    from trueloss_replay import run as runfmt
    from trueloss_replay.scheduler import replay

    census = _WeightsCensus()
    original, stack = runfmt.read_weights, engine.Evaluator.host_stack
    runfmt.read_weights = census.wrap(original)
    engine.Evaluator.host_stack = census.wrap_stack(stack)
    tracemalloc.start()
    try:
        replay(run_dir, epochs=epochs, batch_size=batch_size, force=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        runfmt.read_weights, engine.Evaluator.host_stack = original, stack
    return {"tracemalloc_peak_bytes": peak, "checkpoints_alive_peak": census.peak}


def _recording_evaluators():
    """Patches the scheduler so that every Evaluator it creates is recorded (for ``traces``);
    the scheduler imports ``Evaluator`` by name, so its name is the one to replace."""
    from trueloss_replay import scheduler

    created: list[Any] = []
    base = scheduler.Evaluator

    class Recorded(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    scheduler.Evaluator = Recorded
    return created, lambda: setattr(scheduler, "Evaluator", base)


def _timed_replay(run_dir: Path, epochs: str | None, batch_size: int) -> dict[str, Any]:
    """Wall seconds of one public ``replay()`` call, its results' per-checkpoint seconds, and
    the traces of the evaluator's programs, per device."""
    from trueloss_replay.history import load_results
    from trueloss_replay.scheduler import parse_epochs, replay

    created, restore = _recording_evaluators()
    try:
        start = time.perf_counter()
        replay(run_dir, epochs=epochs, batch_size=batch_size, force=True)
        wall = time.perf_counter() - start
    finally:
        restore()
    results = sorted(load_results(run_dir), key=lambda r: r["evaluated"])
    if epochs is not None:
        wanted = parse_epochs(epochs)
        results = [r for r in results if r["epoch"] in wanted]
    return {
        "wall": wall,
        # Each checkpoint's share of the wall time, in the order evaluated: the first group
        # carries the tracing and XLA compilation; "stacked" is each one's group size.
        "checkpoint_seconds": [r["seconds"] for r in results],
        "stacked": [int(r.get("stacked") or 1) for r in results],
        "traces": [e.traces for e in created],
    }


def _results_steady(results: list[dict[str, Any]]) -> float:
    """``_steady_seconds`` of a replay's results; with fewer than three groups, the median
    after the first group, or of all of them when there is one group."""
    results = sorted(results, key=lambda r: r["evaluated"])
    run = {
        "checkpoint_seconds": [r["seconds"] for r in results],
        "stacked": [int(r.get("stacked") or 1) for r in results],
    }
    steady = _steady_seconds(run)
    if steady is not None:
        return steady
    first = max(1, run["stacked"][0])
    return median(run["checkpoint_seconds"][first:] or run["checkpoint_seconds"])


def _steady_seconds(run: dict[str, Any]) -> float | None:
    """The median seconds per checkpoint of a replay's groups other than its first and last.

    A group's results record its share of the wall time between the previous group's
    figures and its own. The first group's share holds the compilation; with the pipeline,
    on a backend that runs a program as it is called (TensorFlow), each interval holds the
    next group's programs and this group's read-back, so the last group's holds no program.
    The groups between are the steady cost, everything included. None with fewer than three
    groups.
    """
    groups, i = [], 0
    seconds, sizes = run["checkpoint_seconds"], run["stacked"]
    while i < len(seconds):
        size = max(1, sizes[i])
        groups.append(seconds[i : i + size])
        i += size
    middle = [s for group in groups[1:-1] for s in group]
    return median(middle) if middle else None


def _load_keras_model(run_dir: Path, compile: bool = True):
    import warnings

    import keras

    from trueloss_replay import run as runfmt

    with warnings.catch_warnings():  # the optimizer's variables are not in model.keras
        warnings.simplefilter("ignore")
        return keras.saving.load_model(run_dir / runfmt.MODEL_FILE, compile=compile)


def _naive_loop(run_dir: Path, train, val, k: int) -> list[float]:
    """What one writes by hand: per checkpoint (the first ``k``), load the model, load the
    weights, evaluate both sets at Keras' default batch size (32). Seconds per checkpoint."""
    from trueloss_replay import run as runfmt

    times = []
    for checkpoint in runfmt.Run(run_dir).checkpoints()[:k]:
        start = time.perf_counter()
        model = _load_keras_model(run_dir)
        runfmt.load_weights(model, checkpoint.path)
        model.evaluate(*train, verbose=0)
        model.evaluate(*val, verbose=0)
        times.append(time.perf_counter() - start)
    return times


def _reused_model(run_dir: Path, train, val, batch_size: int, k: int) -> list[float]:
    """One model loaded once; per checkpoint (the first ``k``), load the weights and
    ``evaluate`` at a large batch. Seconds per checkpoint; the first includes the model load
    and the tracing."""
    from trueloss_replay import run as runfmt

    start = time.perf_counter()
    model = _load_keras_model(run_dir)
    times = []
    for checkpoint in runfmt.Run(run_dir).checkpoints()[:k]:
        runfmt.load_weights(model, checkpoint.path)
        model.evaluate(*train, batch_size=batch_size, verbose=0)
        model.evaluate(*val, batch_size=batch_size, verbose=0)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
    return times


class _Floor:
    """The forward pass alone, over train and val cut as replay cuts them (the same shapes),
    with the weights and the batches already on the device. Compiled outside the timing.

    ``one_program``: the full batches of a split are stacked ``[batches, batch_size, ...]``
    and one compiled program loops over them (``backend.compile_loop``, the kind of program
    replay runs), the ragged last batch a second, one-step program; this is DESIGN's floor.
    Otherwise one compiled-step call per batch from Python (on a GPU, many times slower).
    """

    def __init__(self, model, inputs: Sequence[Any], batch_size: int, one_program: bool):
        import numpy as np

        from trueloss_replay.backends import get_backend, resolve_devices

        self.backend = backend = get_backend()
        self.device = device = resolve_devices("auto")[0]

        def put(value):
            return backend.to_device(np.asarray(value), device)

        def body(params, batch):
            trainable, non_trainable = params
            outputs, _ = model.stateless_call(trainable, non_trainable, batch[0], training=False)
            return outputs

        loop = backend.compile_loop(body, jit=True)
        step = backend.compile_step(body, jit=True)
        self.calls: list[tuple[Callable, tuple]] = []
        with backend.device_scope(device):
            self.params = (
                [put(v) for v in model.trainable_variables],
                [put(v) for v in model.non_trainable_variables],
            )
            for x in inputs:
                full, rest = divmod(len(x), batch_size)
                if full and one_program:
                    stacked = x[: full * batch_size].reshape(full, batch_size, *x.shape[1:])
                    self.calls.append((loop, (put(stacked),)))
                elif full:
                    for i in range(full):
                        part = x[i * batch_size : (i + 1) * batch_size]
                        self.calls.append((step, (put(part),)))
                if rest:
                    self.calls.append((step, (put(x[full * batch_size :]),)))
        start = time.perf_counter()
        self.run()
        self.compile_seconds = time.perf_counter() - start

    def run(self) -> float:
        import numpy as np

        start = time.perf_counter()
        with self.backend.device_scope(self.device):
            outputs = [program(self.params, data) for program, data in self.calls]
        # Read back as replay reads its figures; programs on one device run in order, and
        # JAX's arrays also say so themselves.
        np.asarray(outputs[-1])
        for output in outputs:
            if hasattr(output, "block_until_ready"):
                output.block_until_ready()
        return time.perf_counter() - start


class _StackedPrograms:
    """Replay's own programs with nothing around them: the weights of one group of
    checkpoints (``stack_size`` of ``checkpoints``, as ``replay`` groups them) put on the
    device once; each ``run`` is one ``evaluate_stacked`` of train and val (the stacked
    programs, the read-back, the float64 sums and the metric results), with no reading,
    staging or writing. Replay's steady cost over this is what the pipeline around the
    programs costs; this over the floor is what stacking checkpoints and turning outputs into
    figures cost. Compiled outside the timing.
    """

    def __init__(self, run_dir: Path, batch_size: int, checkpoints: int):
        from trueloss_replay import engine
        from trueloss_replay import run as runfmt
        from trueloss_replay.backends import resolve_devices
        from trueloss_replay.data import resolve_splits

        run = runfmt.Run(run_dir)
        device = resolve_devices("auto")[0]
        self.evaluator = evaluator = engine.Evaluator(engine.load_model(run), device)
        self.splits = splits = resolve_splits(run)
        self.batch_size = batch_size
        group = run.checkpoints()[: evaluator.stack_size(splits, checkpoints)]
        self.size = len(group)
        self.params = evaluator.stage_stack(_read_group(evaluator, group), self.size)
        start = time.perf_counter()
        self.run()
        self.compile_seconds = time.perf_counter() - start

    def run(self) -> float:
        """Seconds per checkpoint of one group."""
        start = time.perf_counter()
        self.evaluator.evaluate_stacked(self.splits, self.batch_size, self.params, self.size)
        return (time.perf_counter() - start) / self.size


def _read_group(evaluator, group: Sequence[Any]) -> list[Any]:
    """The checkpoints of ``group`` read into a new set of the evaluator's stacked host
    buffers, as replay reads them by default (on the calling thread)."""
    from trueloss_replay.reading import Readers

    buffers = evaluator.host_stack(len(group))
    readers = Readers(0)
    for slot, checkpoint in enumerate(group):
        readers.read_into(
            checkpoint.path,
            evaluator.file_signature(checkpoint.path),
            evaluator.slot_views(buffers, slot),
        ).result()
    return buffers


def _replay_profile(run_dir: Path, floors: dict[str, _Floor], batch_size: int, reps: int):
    """Where one checkpoint's time goes, through the engine's public API, next to the floors.

    Setup (once per replay call): model load, data load, the first checkpoint's weights onto
    the device, the first ``evaluate_splits`` (build, data onto the device, tracing, XLA
    compilation). Per checkpoint: reading the weights file (replay does it on a background
    thread during the previous checkpoint's evaluation), ``load`` (the weights onto the
    device), ``evaluate_splits`` of train and val (programs, read-back, float64 sums, metric
    results), writing the result file; then the floors' passes. Then replay's own path, per
    group of up to STACK_MAX checkpoints: reading them into the stacked host buffers,
    staging them on the device, and one ``evaluate_stacked`` of both splits.
    """
    from trueloss_replay import engine
    from trueloss_replay import run as runfmt
    from trueloss_replay.backends import resolve_devices
    from trueloss_replay.data import resolve_splits

    run = runfmt.Run(run_dir)
    checkpoints = run.checkpoints()
    device = resolve_devices("auto")[0]
    times: dict[str, dict[str, list[float]]] = {"setup": {}, "per_checkpoint": {}, "stacked": {}}

    @contextlib.contextmanager
    def timed(kind: str, name: str):
        start = time.perf_counter()
        yield
        times[kind].setdefault(name, []).append(time.perf_counter() - start)

    for _ in range(reps):
        with timed("setup", "load model.keras + compile"):
            evaluator = engine.Evaluator(engine.load_model(run), device)
        with timed("setup", "load data (h5)"):
            splits = resolve_splits(run)
        with timed("setup", "first checkpoint: read + load"):
            evaluator.load(runfmt.read_weights(checkpoints[0].path), checkpoints[0].name)
        with timed("setup", "first evaluate_splits: build, data to device, trace, compile"):
            evaluator.evaluate_splits(splits, batch_size)
        for checkpoint in checkpoints[1:]:
            with timed("per_checkpoint", "read weights (replay: background thread)"):
                weights = runfmt.read_weights(checkpoint.path)
            with timed("per_checkpoint", "load: weights onto the device"):
                evaluator.load(weights, checkpoint.name)
            with timed("per_checkpoint", "evaluate_splits(train, val)"):
                figures = evaluator.evaluate_splits(splits, batch_size)
            with timed("per_checkpoint", "write the result JSON"):
                runfmt.atomic_write_json(run_dir / "profile.json", figures)
            for name, floor in floors.items():
                with timed("per_checkpoint", name):
                    floor.run()
        # Replay's own path: up to STACK_MAX checkpoints per program call (stack_size).
        size = evaluator.stack_size(splits, len(checkpoints))
        group = checkpoints[:size]
        with timed("stacked", f"read {size} checkpoints into the stacked buffers"):
            buffers = _read_group(evaluator, group)
        with timed("stacked", f"stage_stack: {size} checkpoints' weights onto the device"):
            params = evaluator.stage_stack(buffers, len(group))
        evaluator.evaluate_stacked(splits, batch_size, params, len(group))  # compiles
        with timed("stacked", f"evaluate_stacked(train, val) of {size} checkpoints"):
            evaluator.evaluate_stacked(splits, batch_size, params, len(group))
    return {
        **{kind: {k: median(v) for k, v in items.items()} for kind, items in times.items()},
        "traces": evaluator.traces,
    }


# "replay K", "replay 2K" and "floor" make the headline figures and always run; --skip names
# the others.
_REPLAY_VARIANTS = (
    "replay K",
    "replay 2K",
    "replay 1",
    "reused",
    "naive",
    "floor",
    "stacked programs",
    "per-batch floor",
)
_SKIPPABLE = {
    "replay-1": "replay 1",
    "reused": "reused",
    "naive": "naive",
    "stacked-programs": "stacked programs",
    "per-batch-floor": "per-batch floor",
}


@cli.command("replay")
@_k_option(12)
@_reps_option(3)
@click.option(
    "--workload",
    type=click.Choice(list(WORKLOADS)),
    default="mlp",
    show_default=True,
    help="mlp: the reference MLP (40,000 + 10,000 examples); cnn: the compute-bound CNN "
    "(50,000 + 10,000 images).",
)
@click.option(
    "--examples",
    type=click.IntRange(min=8),
    help="Training examples (default 40,000 mlp, 50,000 cnn; validation: a quarter as many "
    "for mlp, a fifth for cnn). Lower it for a smoke run.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Batch size of replay, of the reused model and of the floors (default 2048 mlp, "
    "1024 cnn).",
)
@click.option(
    "--skip",
    multiple=True,
    type=click.Choice(list(_SKIPPABLE)),
    help="Variants not to run (repeatable); naive costs seconds per checkpoint on a GPU.",
)
@click.option(
    "--stack-max",
    type=click.IntRange(min=1),
    help="Most checkpoints per program call (engine.STACK_MAX, default "
    "8): for comparing group sizes on a device.",
)
@click.option(
    "--profile/--no-profile",
    default=False,
    show_default=True,
    help="Also profile where a checkpoint's time goes in the engine.",
)
@_json_option
def replay_command(k, reps, workload, examples, batch_size, skip, stack_max, profile, json_path):
    """Replay seconds per checkpoint against the one-program floor, a reused model and a loop.

    On a run folder of 2K checkpoints (the initial weights and 2K-1 one-epoch fits on a few
    examples; the data snapshots are the full splits), measures per repetition, in rotated
    order:

    \b
      replay K         replay(run_dir, epochs="0-<K-1>", force=True): K checkpoints, one
                       public call
      replay 2K        replay(run_dir, force=True): all 2K checkpoints
      replay 1         replay(run_dir, epochs="0", force=True): one checkpoint
      reused           one model; per checkpoint: load weights, evaluate at --batch-size
      naive            per checkpoint: keras.saving.load_model, load weights, evaluate
                       train and val at the default batch size (32)
      floor            the forward pass alone as one compiled program per split looping
                       over the batches already on the device (backend.compile_loop)
      stacked programs replay's own programs alone: evaluate_stacked of one group of
                       checkpoints whose weights are already on the device (no reading,
                       staging or writing), per checkpoint
      per-batch floor  the same forward pass, one compiled call per batch from Python

    An untimed replay of one checkpoint runs first, so that the process's one-time costs
    (JAX compiles each eager op once per process) fall on no variant. "incl. setup" is wall
    time / K (model load, data load, tracing and XLA compilation included); "steady" is the
    median seconds per checkpoint of replay 2K's groups of checkpoints (up to
    --stack-max, default 8, share a program call) other than the first and the last:
    reading, evaluating and writing included, compilation not (K >= 9 gives three groups;
    with fewer, (wall of replay 2K - wall of replay K) / K, which is noisy). The floors'
    passes are K per repetition, compiled beforehand. Then one untimed replay of K and of 1
    checkpoint under tracemalloc (host peak bytes, checkpoints' weights in host memory at
    once), and with --profile where a checkpoint's time goes.

    \b
    Example:
        python scripts/bench.py replay --json replay.json
        python scripts/bench.py --backend jax replay --workload cnn --skip naive
        python scripts/bench.py replay --examples 2000 --k 3 --reps 1   # smoke run
    """
    import resource

    from trueloss_replay import engine

    if stack_max is not None:
        engine.STACK_MAX = stack_max
    spec = WORKLOADS[workload]
    batch_size = batch_size or spec.batch_size
    info = machine_info()
    train, val = spec.splits(examples)
    examples = len(train[0])
    skipped = {_SKIPPABLE[name] for name in skip}
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        run_dir = Path(tmp) / "run"
        # 2K checkpoints: "replay K" replays the first K, "replay 2K" all of them.
        _make_replay_run(
            run_dir, 2 * k, train, val, min(examples, spec.fit_examples), build=spec.build
        )
        model = _load_keras_model(run_dir, compile=False)
        floors = {
            name: _Floor(model, (train[0], val[0]), batch_size, one_program=name == "floor")
            for name in ("floor", "per-batch floor")
            if name not in skipped
        }
        stacked = (
            None if "stacked programs" in skipped else _StackedPrograms(run_dir, batch_size, 2 * k)
        )
        compile_s = {name: f.compile_seconds for name, f in floors.items()}
        if stacked is not None:
            compile_s["stacked programs"] = stacked.compile_seconds
        variants: dict[str, Callable[[], Any]] = {
            "replay K": lambda: _timed_replay(run_dir, f"0-{k - 1}", batch_size),
            "replay 2K": lambda: _timed_replay(run_dir, None, batch_size),
            "replay 1": lambda: _timed_replay(run_dir, "0", batch_size),
            "reused": lambda: _reused_model(run_dir, train, val, batch_size, k),
            "naive": lambda: _naive_loop(run_dir, train, val, k),
            **{
                name: lambda floor=floor: [floor.run() for _ in range(k)]
                for name, floor in floors.items()
            },
            # As many groups as cover K checkpoints: about as long as the floor's K passes.
            "stacked programs": lambda: [stacked.run() for _ in range(-(-k // stacked.size))],
        }
        variants = {name: variants[name] for name in _REPLAY_VARIANTS if name not in skipped}
        # JAX compiles every eager op once per process (model loading, the evaluator's build
        # pass): an untimed replay pays that here, not whichever variant happens to go first.
        warmup = _timed_replay(run_dir, "0", batch_size)
        _log(f"warm-up (untimed) replay 1: {_describe(warmup)}")
        raw: dict[str, list[Any]] = {name: [] for name in variants}
        for rep in range(reps):
            for name in rotated(list(variants), rep):
                raw[name].append(variants[name]())
                _log(f"rep {rep + 1}/{reps} {name:<15} {_describe(raw[name][-1])}")
        memory = {"replay K": _replay_memory(run_dir, f"0-{k - 1}", batch_size)}
        if "replay 1" in variants:
            memory["replay 1"] = _replay_memory(run_dir, "0", batch_size)
        profile_data = _replay_profile(run_dir, floors, batch_size, reps) if profile else None
    info["loadavg_end"] = os.getloadavg()
    info["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    summary = _replay_summary(raw, k, compile_s)
    summary["memory"] = memory
    summary["warmup_replay_one_wall"] = warmup["wall"]
    summary["target_steady_over_floor"] = _floor_target(info)
    config = {
        "workload": workload,
        "model": spec.description,
        "checkpoints": k,
        "train_examples": examples,
        "val_examples": len(val[0]),
        "batch_size": batch_size,
        "reps": reps,
        "skipped": sorted(skipped),
        "stack_max": engine.STACK_MAX,
        "stacked_group": stacked.size if stacked is not None else None,
        "order": "rotated each rep",
        "checkpoints_from": f"initial weights + K-1 one-epoch fits on "
        f"{min(examples, spec.fit_examples)} examples",
    }
    _print_replay(summary, info, config, profile_data)
    write_json(
        json_path,
        {
            "benchmark": "replay",
            "command": _command_line(),
            "config": config,
            "machine": info,
            "raw": raw,
            "summary": summary,
            "profile": profile_data,
        },
    )


def _floor_target(info: dict[str, Any]) -> float:
    """DESIGN's bound on replay's steady s/checkpoint over the floor, for this machine."""
    if info["gpus"]:
        return 1.3
    return 1.2 if info["backend"] == "jax" else 1.1


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        steps = " ".join(f"{s:.3f}" for s in value["checkpoint_seconds"])
        return f"wall {value['wall']:.2f}s  checkpoints: {steps}  traces {value['traces']}"
    return "s/checkpoint: " + " ".join(f"{v:.3f}" for v in value)


def _replay_summary(raw: dict[str, list[Any]], k: int, compile_s: dict[str, float]) -> dict:
    """Medians over repetitions of per-checkpoint seconds, and the ratios of the targets."""
    floor = [median(times) for times in raw["floor"]]
    rows: dict[str, dict[str, Any]] = {}
    replay_k = raw["replay K"]
    # The steady cost per checkpoint of replay 2K, from its groups other than the first and
    # last (_steady_seconds); with fewer than three groups, what K more checkpoints cost one
    # call, (wall of 2K - wall of K) / K, in which the setup cancels out but its noise does
    # not (on tiny settings it can come out negative).
    steady = [
        _steady_seconds(r2) or (r2["wall"] - r1["wall"]) / k
        for r1, r2 in zip(replay_k, raw["replay 2K"], strict=True)
    ]
    rows["replay"] = {
        "steady_per_rep": steady,
        "incl_setup_per_rep": [r["wall"] / k for r in replay_k],
        "setup": median([r["wall"] - k * s for r, s in zip(replay_k, steady, strict=True)]),
    }
    if "reused" in raw:
        rows["reused"] = {
            "steady_per_rep": [median(t[1:]) for t in raw["reused"]],
            "incl_setup_per_rep": [sum(t) / k for t in raw["reused"]],
            "setup": median([sum(t) - k * median(t[1:]) for t in raw["reused"]]),
        }
    if "naive" in raw:
        rows["naive"] = {
            "steady_per_rep": [median(t) for t in raw["naive"]],
            "incl_setup_per_rep": [sum(t) / k for t in raw["naive"]],
            "setup": 0.0,
        }
    for name in ("floor", "stacked programs", "per-batch floor"):
        if name in raw:
            passes = [median(times) for times in raw[name]]
            rows[name] = {
                "steady_per_rep": passes,
                "incl_setup_per_rep": [p + compile_s[name] / k for p in passes],
                "setup": compile_s[name],
            }
    for row in rows.values():
        row["steady"] = median(row["steady_per_rep"])
        row["incl_setup"] = median(row["incl_setup_per_rep"])
        row["steady_over_floor"] = _median_ratio(row["steady_per_rep"], floor)
        row["incl_setup_over_floor"] = _median_ratio(row["incl_setup_per_rep"], floor)
    summary: dict[str, Any] = {
        "per_checkpoint": rows,
        "replay_steady_over_floor": rows["replay"]["steady_over_floor"],
        "replay_incl_setup_over_floor": rows["replay"]["incl_setup_over_floor"],
        "traces_per_device": replay_k[-1]["traces"],
    }
    if "naive" in rows:
        summary["naive_over_replay_incl_setup"] = _median_ratio(
            rows["naive"]["incl_setup_per_rep"], rows["replay"]["incl_setup_per_rep"]
        )
    if "stacked programs" in rows:
        summary["replay_steady_over_stacked_programs"] = _median_ratio(
            rows["replay"]["steady_per_rep"], rows["stacked programs"]["steady_per_rep"]
        )
    if "replay 1" in raw:
        summary["replay_k_over_k_times_one"] = median(
            [
                rk["wall"] / (k * r1["wall"])
                for rk, r1 in zip(replay_k, raw["replay 1"], strict=True)
            ]
        )
        summary["replay_one_wall"] = median([r["wall"] for r in raw["replay 1"]])
    return summary


def _median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """The median over repetitions of each repetition's ratio."""
    return median([a / b for a, b in zip(numerators, denominators, strict=True)])


def _print_replay(summary, info, config, profile) -> None:
    rows = summary["per_checkpoint"]
    k, batch = config["checkpoints"], config["batch_size"]
    labels = {
        "replay": "replay()",
        "reused": f"one model reused, evaluate at batch {batch}",
        "naive": "naive loop: load_model + evaluate, batch 32",
        "floor": f"floor: forward pass, one compiled program, batch {batch}",
        "stacked programs": f"replay's programs alone, {config['stacked_group']} staged "
        f"checkpoints per call, batch {batch}",
        "per-batch floor": f"per-batch floor: one compiled call per batch, batch {batch}",
    }
    click.echo("")
    click.echo(
        f"replay, {config['workload']}: {config['model']}; {k} checkpoints, "
        f"{config['train_examples']} train + {config['val_examples']} val examples, "
        f"{config['reps']} reps, rotated order; medians; at most {config['stack_max']} "
        "checkpoints per program call"
        + (f"; skipped: {', '.join(config['skipped'])}" if config["skipped"] else "")
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
    target = summary["target_steady_over_floor"]
    where = "GPU" if info["gpus"] else f"{info['backend']} CPU"
    figures = [
        ["replay steady / floor", summary["replay_steady_over_floor"], f"<= {target} ({where})"],
        ["replay incl. setup / floor", summary["replay_incl_setup_over_floor"], ""],
    ]
    if "replay_steady_over_stacked_programs" in summary:
        figures.append(
            [
                "replay steady / replay's programs alone (the pipeline's cost)",
                summary["replay_steady_over_stacked_programs"],
                "",
            ]
        )
    if "naive_over_replay_incl_setup" in summary:
        figures.append(["naive / replay, incl. setup", summary["naive_over_replay_incl_setup"], ""])
    if "replay_k_over_k_times_one" in summary:
        figures += [
            [f"replay of {k} / ({k} x replay of 1)", summary["replay_k_over_k_times_one"], "< 1.0"],
            ["replay of 1 checkpoint, wall s", summary["replay_one_wall"], ""],
        ]
    figures.append(
        [
            "first replay in the process (untimed warm-up), wall s",
            summary["warmup_replay_one_wall"],
            "",
        ]
    )
    figures.append(
        ["traces per device (replay of K)", str(summary["traces_per_device"]), "one per shape"]
    )
    peaks = " / ".join(
        f"{memory[name]['tracemalloc_peak_bytes'] / 2**20:.1f}"
        for name in ("replay K", "replay 1")
        if name in memory
    )
    figures += [
        [
            f"host peak (tracemalloc), replay of {k}"
            + (" / of 1" if "replay 1" in memory else "")
            + ", MiB",
            peaks,
            "not growing with K",
        ],
        [
            f"checkpoints' weights in host memory at once, replay of {k}",
            str(memory["replay K"]["checkpoints_alive_peak"]),
            "<= 3 groups of <= 8",
        ],
        ["process peak RSS (ru_maxrss, whole run), MiB", f"{info['ru_maxrss_mib']:.0f}", ""],
    ]
    click.echo("")
    print_table(["figure", "value", "target"], figures)
    if profile:
        click.echo("")
        print_table(
            ["where a replay's time goes (medians)", "seconds"],
            [[f"setup: {n}", v] for n, v in profile["setup"].items()]
            + [[f"per checkpoint: {n}", v] for n, v in profile["per_checkpoint"].items()]
            + [[f"per group (replay's path): {n}", v] for n, v in profile["stacked"].items()],
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
    from trueloss_replay.scheduler import replay

    info = machine_info()
    (x, y), (xv, yv) = reference_data(examples, max(examples // 4, 1))
    seconds: dict[str, list[float]] = {"checkpoint-major": [], "data-major": []}
    with tempfile.TemporaryDirectory(prefix="bench-datamajor-") as tmp:
        run_dir = Path(tmp) / "run"
        _make_replay_run(run_dir, k, (x, y), (xv, yv), min(examples, 2_000))
        train = _DecodingBatches(x, y, 2048, delay)
        val = _DecodingBatches(xv, yv, 2048, delay)
        # Untimed: the process's one-time costs (JAX compiles each eager op once) go here.
        replay(run_dir, train=train, val=val, epochs="0", force=True)
        for rep in range(reps):
            for mode in rotated(list(seconds), rep):
                started = time.perf_counter()
                replay(run_dir, train=train, val=val, force=True, data_major=mode == "data-major")
                seconds[mode].append(time.perf_counter() - started)
                _log(f"rep {rep + 1}/{reps} {mode:<16} {seconds[mode][-1]:.2f}s")
    info["loadavg_end"] = os.getloadavg()
    summary = {mode: median(v) for mode, v in seconds.items()}
    click.echo("")
    click.echo(
        f"datamajor: {k} checkpoints, {examples} + {len(xv)} examples in batches of 2048 that "
        f"take {delay}s each to produce; {reps} reps, rotated order; medians"
    )
    print_machine_info(info)
    click.echo("")
    print_table(
        ["mode", "s per replay", "s per checkpoint", "ratio to checkpoint-major"],
        [
            [mode, f"{v:.2f}", f"{v / k:.3f}", f"{v / summary['checkpoint-major']:.2f}"]
            for mode, v in summary.items()
        ],
    )
    write_json(
        json_path,
        {
            "benchmark": "datamajor",
            "command": _command_line(),
            "config": {
                "workload": "mlp",
                "checkpoints": k,
                "train_examples": examples,
                "val_examples": len(xv),
                "batch_size": 2048,
                "delay": delay,
                "reps": reps,
                "order": "rotated each rep",
            },
            "machine": info,
            "seconds": seconds,
            "median": summary,
        },
    )


# --------------------------------------------------------------------------- reading


def _python_work(units: int) -> float:
    """``units`` of pure-Python arithmetic, which needs the GIL throughout."""
    x = 0.0
    for _ in range(units):
        x = x * 0.999999 + 1.0
    return x


def _wait_precisely(seconds: float) -> None:
    """Blocks without the GIL for ``seconds`` (select's timeout, which is precise to tens
    of microseconds where sleep's timer slack is not)."""
    import select

    deadline = time.perf_counter() + seconds
    while (left := deadline - time.perf_counter()) > 0:
        select.select([], [], [], left)


def _work_units(ms: float) -> int:
    """How many ``_python_work`` units take ``ms`` milliseconds here (median of 15)."""
    trial = 200_000
    timings = []
    for _ in range(15):
        started = time.perf_counter()
        _python_work(trial)
        timings.append(time.perf_counter() - started)
    return max(1, int(trial * ms / 1e3 / median(timings)))


@cli.command("read")
@_k_option(32)
@_reps_option(5)
@click.option(
    "--work-ms",
    default=1.5,
    show_default=True,
    type=float,
    help="Python work per checkpoint on the busy thread, in ms.",
)
@click.option(
    "--readers",
    "reader_counts",
    multiple=True,
    type=click.IntRange(min=1),
    default=(1, 2),
    show_default=True,
    help="Reader processes to measure (repeatable).",
)
@click.option(
    "--wait-ms",
    default=1.0,
    show_default=True,
    type=float,
    help="Then a wait per checkpoint that lets go of the GIL (the device computing), in ms.",
)
@_json_option
def read_command(k, reps, work_ms, wait_ms, reader_counts, json_path):
    """Checkpoint reads beside a busy Python thread: a reader thread vs reader processes.

    On a GPU, the thread that drives the device spends its time in Python (starting
    programs, reading back, writing results) while the device computes; the reads of the
    next checkpoints must not hold it up. This measures that directly, without a GPU: the
    reference MLP's checkpoints (1.2 MB each), and a thread doing --work-ms of pure-Python
    work per checkpoint. Per repetition, in rotated order:

    \b
      read alone     K reads on one thread, one after another
      read alone, HDF5   the same, every file read through HDF5 (a folder without a layout)
      work alone     K units of the work on one thread
      thread         both at once, the reads on a second thread (replay without readers)
      thread, HDF5   the same, every file read through HDF5
      N processes    both at once, the reads on N reader processes (replay's Readers(N))

    Reported: ms per checkpoint, "/ work": wall / work alone (1.00: the reads cost the busy
    thread nothing), and this process's CPU time per read (the GIL's share lies in it).

    \b
    Example:
        python scripts/bench.py read --k 32 --work-ms 1.5 --readers 1 --readers 2
    """
    import concurrent.futures

    import numpy as np

    from trueloss_replay.reading import Readers
    from trueloss_replay.run import read_manifest

    info = machine_info()
    (x, y), (xv, yv) = reference_data(64, 16)
    variants = ["read alone", HDF5_ALONE, "work alone", "thread", HDF5_THREAD]
    variants += [f"{n} processes" for n in reader_counts]
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="bench-read-") as tmp:
        run_dir = Path(tmp) / "run"
        _make_replay_run(run_dir, k, (x, y), (xv, yv), 64)
        signature = read_manifest(run_dir)["variables"]
        paths = sorted((run_dir / "checkpoints").glob("e*.h5"))
        size = paths[0].stat().st_size
        jobs = [(p, [np.empty(shape, dtype) for _, shape, dtype in signature]) for p in paths]
        units = _work_units(work_ms)

        def reads(readers) -> None:
            for future in [readers.read_into(p, signature, a) for p, a in jobs]:
                future.result()

        pools = {n: Readers(n) for n in reader_counts}
        on_thread = Readers(0)
        try:
            for n, readers in pools.items():  # started, and the page cache warm, untimed
                reads(readers)
                deadline = time.monotonic() + 60  # each starts on its own thread
                while len(readers.pids) < n and time.monotonic() < deadline:
                    time.sleep(0.01)
                if len(readers.pids) != n:
                    raise click.ClickException(f"{n} reader processes did not start")

            def work() -> None:
                for _ in paths:
                    _python_work(units)
                    if wait_ms:
                        _wait_precisely(wait_ms / 1e3)

            def both(readers) -> None:
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    reading = pool.submit(reads, readers)
                    work()
                    reading.result()

            runs = {"read alone": lambda: reads(on_thread), "work alone": work}
            runs["thread"] = lambda: both(on_thread)
            runs[HDF5_ALONE] = lambda: _through_hdf5(reads, on_thread)
            runs[HDF5_THREAD] = lambda: _through_hdf5(both, on_thread)
            for n, readers in pools.items():
                runs[f"{n} processes"] = lambda readers=readers: both(readers)
            for rep in range(reps):
                for name in rotated(variants, rep):
                    started, process = time.perf_counter(), time.process_time()
                    runs[name]()
                    wall[name].append((time.perf_counter() - started) / k)
                    cpu[name].append((time.process_time() - process) / k)
                    _log(f"rep {rep + 1}/{reps} {name:<12} {wall[name][-1] * 1e3:.2f} ms/ckpt")
        finally:
            for readers in pools.values():
                readers.close()
    info["loadavg_end"] = os.getloadavg()
    summary = {name: median(v) for name, v in wall.items()}
    cpu_summary = {name: median(v) for name, v in cpu.items()}
    work_cpu = cpu_summary["work alone"]
    click.echo("")
    click.echo(
        f"read: {k} checkpoints of the reference MLP ({size:,} bytes each), "
        f"{work_ms} ms of Python work per checkpoint; {reps} reps, rotated order; medians"
    )
    print_machine_info(info)
    click.echo("")
    rows = []
    for name in variants:
        busy = name not in ("read alone", HDF5_ALONE, "work alone")
        reads_cpu = cpu_summary[name] - (work_cpu if busy else 0)
        rows.append(
            [
                name,
                f"{summary[name] * 1e3:.2f}",
                f"{summary[name] / summary['work alone']:.2f}",
                "" if name == "work alone" else f"{reads_cpu * 1e3:.2f}",
            ]
        )
    print_table(["variant", "ms per checkpoint", "/ work", "this process's CPU ms per read"], rows)
    write_json(
        json_path,
        {
            "benchmark": "read",
            "command": _command_line(),
            "config": {
                "workload": "mlp",
                "checkpoints": k,
                "checkpoint_bytes": size,
                "work_ms": work_ms,
                "readers": list(reader_counts),
                "reps": reps,
                "order": "rotated each rep",
            },
            "machine": info,
            "seconds_per_checkpoint": wall,
            "cpu_seconds_per_checkpoint": cpu,
            "median": summary,
            "median_cpu": cpu_summary,
        },
    )


#: The read bench's variants that read every checkpoint through HDF5, as replay reads the
#: checkpoints of a folder that has no layout (``run._Layout``: those trueloss-replay wrote
#: before it wrote them so, or other writers').
HDF5_ALONE = "read alone, HDF5"
HDF5_THREAD = "thread, HDF5"


def _through_hdf5(function, *args) -> None:
    """``function(*args)`` with every checkpoint read through HDF5, no layout; the layouts
    taken before are kept for the other variants."""
    from trueloss_replay import run as runfmt

    saved, take = dict(runfmt._LAYOUTS), runfmt._take_layout
    runfmt._LAYOUTS.clear()
    runfmt._take_layout = lambda path, wanted: None  # no file gives one
    try:
        function(*args)
    finally:
        runfmt._LAYOUTS.clear()
        runfmt._LAYOUTS.update(saved)
        runfmt._take_layout = take


@cli.command("sample")
@_k_option(5)
@_reps_option(3)
@_examples_option(REFERENCE_TRAIN, 40)
@click.option(
    "--train-sample",
    "sample",
    default=0.1,
    show_default=True,
    type=float,
    help="The sample: a fraction in (0, 1) or a count.",
)
@_json_option
def sample_command(k, reps, examples, sample, json_path):
    """Sampled training-set estimates: the speed-up, and the error in standard errors.

    The full replay and the sampled one (``--train-sample``) of the same run, timed in
    rotated order (validation is evaluated in full by both); then, per checkpoint and
    figure, ``(sampled - full) / SE``: about 95% of them should lie within +/- 2.

    \b
    Example:
        python scripts/bench.py sample --examples 40000 --train-sample 4000
    """
    import numpy as np

    from trueloss_replay.run import list_results
    from trueloss_replay.scheduler import replay

    size = int(sample) if sample >= 1 else sample
    info = machine_info()
    (x, y), (xv, yv) = reference_data(examples, max(examples // 4, 1))
    seconds: dict[str, list[float]] = {"full": [], "sampled": []}
    # Per checkpoint, each result's share of the wall time, from the groups of checkpoints
    # other than the first (which holds the compilation) and the last (_steady_seconds); with
    # fewer than three groups, after the first group; with one group, all of them.
    steady: dict[str, list[float]] = {"full": [], "sampled": []}
    with tempfile.TemporaryDirectory(prefix="bench-sample-") as tmp:
        run_dir = Path(tmp) / "run"
        _make_replay_run(run_dir, k, (x, y), (xv, yv), min(examples, 2_000))
        options = {"full": {}, "sampled": {"train_sample": size}}
        outputs = {mode: Path(tmp) / mode for mode in options}
        # Untimed: the process's one-time costs (imports, JAX compiling each eager op) go here.
        replay(run_dir, epochs="0", output=Path(tmp) / "warm-up", progress=False)
        histories = {}
        for rep in range(reps):
            for mode in rotated(list(options), rep):
                started = time.perf_counter()
                histories[mode] = replay(
                    run_dir, force=True, output=outputs[mode], progress=False, **options[mode]
                ).history
                seconds[mode].append(time.perf_counter() - started)
                steady[mode].append(_results_steady(list_results(outputs[mode])))
                _log(f"rep {rep + 1}/{reps} {mode:<8} {seconds[mode][-1]:.2f}s")
    info["loadavg_end"] = os.getloadavg()
    full, sampled = histories["full"], histories["sampled"]
    errors = {
        key: [
            float(z)
            for z in (np.asarray(sampled[key]) - np.asarray(full[key]))
            / np.asarray(sampled[key + "_se"])
        ]
        for key in ("loss", "accuracy")
    }
    every = np.abs(np.concatenate([np.asarray(v) for v in errors.values()]))
    summary = {
        "full_s": median(seconds["full"]),
        "sampled_s": median(seconds["sampled"]),
        "speedup": median(seconds["full"]) / median(seconds["sampled"]),
        "steady_full_s": median(steady["full"]),
        "steady_sampled_s": median(steady["sampled"]),
        "steady_speedup": median(steady["full"]) / median(steady["sampled"]),
        "sample_size": round(size * examples) if size < 1 else size,
        "abs_error_in_se_median": float(np.median(every)),
        "abs_error_in_se_max": float(every.max()),
        "within_2_se": float(np.mean(every <= 2)),
        "loss_se_median": float(np.median(sampled["loss_se"])),
    }
    click.echo("")
    click.echo(
        f"sample: {k} checkpoints, {summary['sample_size']} of {examples} training examples "
        f"(validation {len(xv)}, full in both); {reps} reps, rotated order; medians"
    )
    print_machine_info(info)
    click.echo("")
    print_table(
        ["replay", "s per replay", "speed-up", "s per checkpoint, steady", "speed-up, steady"],
        [
            [
                mode,
                f"{median(v):.2f}",
                f"{summary['full_s'] / median(v):.2f}",
                f"{median(steady[mode]):.3f}",
                f"{summary['steady_full_s'] / median(steady[mode]):.2f}",
            ]
            for mode, v in seconds.items()
        ],
    )
    click.echo("")
    print_table(
        ["figure", "median |sampled - full| / SE", "max", "within 2 SE"],
        [
            [
                key,
                f"{np.median(np.abs(v)):.2f}",
                f"{np.max(np.abs(v)):.2f}",
                f"{np.mean(np.abs(v) <= 2):.0%}",
            ]
            for key, v in errors.items()
        ],
    )
    write_json(
        json_path,
        {
            "benchmark": "sample",
            "command": _command_line(),
            "config": {
                "workload": "mlp",
                "checkpoints": k,
                "train_examples": examples,
                "train_sample": size,
                "val_examples": len(xv),
                "reps": reps,
                "order": "rotated each rep",
            },
            "machine": info,
            "seconds": seconds,
            "steady_seconds": steady,
            "errors_in_se": errors,
            "summary": summary,
        },
    )


if __name__ == "__main__":
    cli()
