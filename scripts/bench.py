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
@click.option(
    "--reps",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Repetitions of every variant.",
)
@click.option(
    "--examples",
    default=REFERENCE_TRAIN,
    show_default=True,
    type=click.IntRange(min=4),
    help="Training examples (validation: a quarter as many). Lower it for a smoke run.",
)
@click.option(
    "--variant",
    "only",
    multiple=True,
    help="Run only these variants (repeatable); 'none' is always run.",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write JSON.")
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


if __name__ == "__main__":
    cli()
