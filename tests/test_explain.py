"""Explaining the reported-loss gap: each cause alone, the exact sum, no side effects."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

import h5py
import keras
import numpy as np
import pandas as pd
import pytest

from tests.conftest import make_data
from trueloss_replay import ReplayCheckpoint
from trueloss_replay.engine import load_model
from trueloss_replay.errors import DataError
from trueloss_replay.explanation import (
    ExplainIncompleteError,
    TrainingModeEvaluator,
    explain,
    infer_batch_size,
    verdict,
)
from trueloss_replay.run import Run, read_weights
from trueloss_replay.scheduler import replay

pytestmark = pytest.mark.backend

EPOCHS = 2
BATCH = 32
SEEDS = 5
L2 = 1e-2
# Different from Keras' default 32, so that a wrong guess would show in the BatchNorm figures.
BN_BATCH = 20


def _model(cause: str, optimizer: keras.optimizers.Optimizer | None = None) -> keras.Model:
    keras.utils.set_random_seed(7)
    regularizer = keras.regularizers.L2(L2) if cause == "l2" else None
    layers = [
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu", kernel_regularizer=regularizer),
    ]
    if cause == "batchnorm":
        layers.append(keras.layers.BatchNormalization())
    if cause == "dropout":
        layers.append(keras.layers.Dropout(0.5))
    layers.append(keras.layers.Dense(3, activation="softmax"))
    model = keras.Sequential(layers)
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy"
    )
    return model


def _batch_size(cause: str) -> int:
    return BN_BATCH if cause == "batchnorm" else BATCH


def _train(model: keras.Model, folder: Path, batch_size: int = BATCH, **checkpoint_options):
    """Fits ``model`` on the module's data into ``folder / "run"``; returns the path and train."""
    x, y = make_data(n=240, seed=1)
    train, val = (x[:180], y[:180]), (x[180:], y[180:])
    path = folder / "run"
    model.fit(
        *train,
        validation_data=val,
        epochs=EPOCHS,
        batch_size=batch_size,
        verbose=0,
        callbacks=[ReplayCheckpoint(path, train_data=train, val_data=val, **checkpoint_options)],
    )
    return path, train


def _train_and_explain(cause: str, folder: Path):
    path, train = _train(_model(cause), folder, _batch_size(cause))
    replay(path)
    return cause, path, explain(path, seeds=SEEDS), train


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """Trains, replays and explains a run of ``_model(cause)`` once per cause."""
    runs = {}

    def get(cause: str):
        if cause not in runs:
            runs[cause] = _train_and_explain(cause, tmp_path_factory.mktemp(cause))
        return runs[cause]

    return get


@pytest.fixture(params=["l2", "dropout", "batchnorm", "none"])
def cause_run(request, explained):
    """A replayed and explained run whose model has only one cause of the gap (or none)."""
    return explained(request.param)


def _se(row) -> float:
    return float(row["gap_training_mode_se"])


def _model_at(path: Path, checkpoint: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = keras.saving.load_model(path / "model.keras", compile=False)
    from trueloss_replay.run import load_weights

    load_weights(model, path / "checkpoints" / checkpoint)
    return model


def _crossentropy(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    p = np.clip(probabilities.astype(np.float64), 1e-7, 1 - 1e-7)
    return -np.log(p[np.arange(len(labels)), labels])


# --------------------------------------------------------------------------- each cause alone


def test_the_parts_sum_to_the_reported_loss_exactly(cause_run):
    _, path, frame, _ = cause_run
    assert len(frame) == EPOCHS
    for row in frame.itertuples():
        total = row.loss + row.gap_penalty + row.gap_training_mode + row.gap_drift
        assert total == row.reported_loss
    reported = [c.logs["loss"] for c in Run(path).checkpoints(epoch_end_only=True)[1:]]
    assert frame["reported_loss"].tolist() == reported


def test_the_penalty_part_is_the_l2_penalty_or_zero(cause_run):
    cause, path, frame, _ = cause_run
    for row in frame.itertuples():
        weights = read_weights(path / "checkpoints" / row.checkpoint)
        kernel = next(iter(weights.values()))  # the first Dense layer's, the regularized one
        assert kernel.shape == (8, 16)
        expected = L2 * float(np.sum(kernel.astype(np.float64) ** 2)) if cause == "l2" else 0.0
        assert row.gap_penalty == pytest.approx(expected, rel=1e-5, abs=0.0)
    if cause == "l2":
        assert (frame["gap_penalty"] > 0.01).all()


def test_the_training_mode_part_appears_only_with_dropout_or_batchnorm(cause_run):
    cause, _, frame, _ = cause_run
    significant = []
    for _, row in frame.iterrows():
        part = float(row["gap_training_mode"])
        if cause in ("l2", "none"):
            # No layer behaves differently in training: the same loss up to float32 rounding.
            assert abs(part) < 1e-6
            assert _se(row) < 1e-6
        else:
            significant.append(abs(part) > 3 * _se(row) and abs(part) > 0.01)
    if cause == "dropout":
        assert all(significant), frame
        assert (frame["gap_training_mode"] > 0).all()
    if cause == "batchnorm":
        # Batch against moving statistics: how far apart they are depends on the weights
        # (the initialisation differs between backends), so not necessarily every epoch.
        assert any(significant), frame


def test_the_drift_is_what_remains(cause_run):
    cause, _, frame, _ = cause_run
    expected = frame["reported_loss"] - frame["loss"] - frame["gap_penalty"]
    expected -= frame["gap_training_mode"]
    np.testing.assert_allclose(frame["gap_drift"], expected, rtol=0, atol=1e-12)
    if cause in ("l2", "none"):
        # Without training-mode layers, drift is reported - true - penalty alone.
        np.testing.assert_allclose(
            frame["gap_drift"],
            frame["reported_loss"] - frame["loss"] - frame["gap_penalty"],
            atol=1e-6,
        )


def test_drift_vanishes_when_the_weights_never_change(tmp_path):
    # With a zero learning rate the weights are those of the checkpoint throughout the epoch
    # and no layer behaves differently in training: Keras' own reported loss is then exactly
    # the true loss plus the penalty, so the whole decomposition must leave no drift.
    path, _ = _train(_model("l2", keras.optimizers.SGD(learning_rate=0.0)), tmp_path)
    frame = explain(path, seeds=2)
    assert len(frame) == EPOCHS
    assert (frame["gap_penalty"] > 0.01).all()  # the penalty is part of what must add up
    np.testing.assert_allclose(
        frame["loss"] + frame["gap_penalty"], frame["reported_loss"], rtol=1e-5, atol=0
    )
    assert (frame["gap_drift"].abs() < 1e-5 * frame["reported_loss"]).all()


def test_batchnorm_part_matches_keras_in_training_mode_at_the_training_batch_size(explained):
    _, path, frame, (x, y) = explained("batchnorm")
    row = frame.iloc[-1]
    assert row["batch_size"] == BN_BATCH  # 180 examples in 9 steps
    model = _model_at(path, row["checkpoint"])
    per_seed = []
    for seed in range(SEEDS):
        order = np.random.default_rng(seed).permutation(len(x))
        total = 0.0
        for start in range(0, len(x), BN_BATCH):
            part = order[start : start + BN_BATCH]
            probabilities = keras.ops.convert_to_numpy(model(x[part], training=True))
            total += float(np.mean(_crossentropy(probabilities, y[part]))) * len(part)
        per_seed.append(total / len(x))
    expected = np.mean(per_seed) - row["loss"]
    assert row["gap_training_mode"] == pytest.approx(expected, abs=1e-5)
    assert _se(row) == pytest.approx(np.std(per_seed, ddof=1) / math.sqrt(SEEDS), abs=1e-5)


def test_dropout_part_agrees_with_keras_own_dropout_within_the_standard_error(explained):
    _, path, frame, (x, y) = explained("dropout")
    row = frame.iloc[-1]
    model = _model_at(path, row["checkpoint"])
    keras.utils.set_random_seed(123)
    draws = [
        float(np.mean(_crossentropy(keras.ops.convert_to_numpy(model(x, training=True)), y)))
        for _ in range(20)
    ]
    independent = np.mean(draws) - row["loss"]
    spread = math.hypot(_se(row), np.std(draws, ddof=1) / math.sqrt(len(draws)))
    assert abs(row["gap_training_mode"] - independent) < 4 * spread


# --------------------------------------------------------------------------- stored results


def test_parts_are_stored_in_each_epoch_result(cause_run):
    _, path, frame, _ = cause_run
    for row in frame.itertuples():
        stored = json.loads(
            (path / "replay/results" / (Path(row.checkpoint).stem + ".json")).read_text()
        )
        part = stored["explain"]
        assert part["penalty"] == row.gap_penalty
        assert part["training_mode"] == row.gap_training_mode
        assert part["drift"] == row.gap_drift
        assert part["seeds"] == list(range(SEEDS))
        assert len(part["training_mode_losses"]) == SEEDS
    assert "explain" not in json.loads((path / "replay/results/e0000.json").read_text())


def test_stored_parts_are_reused_and_force_recomputes(cause_run):
    _, path, frame, _ = cause_run
    seen = []
    again = explain(path, seeds=SEEDS, on_checkpoint=lambda name, reused: seen.append(reused))
    assert seen == [True] * EPOCHS
    pd.testing.assert_frame_equal(again, frame)
    seen.clear()
    forced = explain(path, seeds=SEEDS, force=True, on_checkpoint=lambda n, r: seen.append(r))
    assert seen == [False] * EPOCHS
    # Fixed seeds: the recomputed parts are the same numbers.
    pd.testing.assert_frame_equal(forced, frame)


# --------------------------------------------------------------------------- no side effects


def _snapshot(model) -> list[bytes]:
    return [keras.ops.convert_to_numpy(v).tobytes() for v in model.variables]


def test_the_training_mode_pass_changes_no_variable_bit_for_bit(trained_run):
    run = Run(trained_run.path)
    model = load_model(run)
    from trueloss_replay.data import ArraySplit
    from trueloss_replay.run import load_weights

    load_weights(model, run.path / "checkpoints/e0003.h5")
    names = [v.path for v in model.variables]
    assert any("moving_mean" in n for n in names) and any("seed_generator" in n for n in names)
    before = _snapshot(model)
    evaluator = TrainingModeEvaluator(model)
    split = ArraySplit("train", *trained_run.train)
    at_model = evaluator.losses(split, batch_size=32, seeds=[0, 1])
    at_file = evaluator.losses(
        split, batch_size=32, seeds=[0, 1], weights=read_weights(run.path / "checkpoints/e0001.h5")
    )
    assert _snapshot(model) == before
    assert not np.array_equal(at_model, at_file)  # the file's weights were used, not assigned


def test_explain_leaves_checkpoint_files_unchanged(run_copy):
    def digests():
        return {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((run_copy / "checkpoints").iterdir())
        }

    before = digests()
    frame = explain(run_copy, seeds=2)
    assert len(frame) == 3
    assert digests() == before


def test_seeds_make_the_pass_reproducible_and_it_is_traced_once_per_shape(trained_run):
    from trueloss_replay.data import ArraySplit

    model = load_model(Run(trained_run.path))
    split = ArraySplit("train", *trained_run.train)
    evaluator = TrainingModeEvaluator(model)
    first = evaluator.losses(split, batch_size=32, seeds=[3, 4])
    second = TrainingModeEvaluator(model).losses(split, batch_size=32, seeds=[3, 4])
    np.testing.assert_array_equal(first, second)
    assert first[0] != first[1]
    # 180 examples: batches of 32 and a last one of 20, traced once each for all seeds.
    assert evaluator.traces == 2


# --------------------------------------------------------------------------- batch size


@pytest.mark.parametrize(
    ("examples", "steps", "expected"),
    [
        (180, 6, 32),  # 30..35 fit: Keras' default
        (180, 9, 20),  # 20 only
        (1000, 8, 128),  # 125..142: the power of two
        (100, 3, 34),  # 34..49: neither 32 nor a power of two
        (100, 1, 100),  # one step: the whole set
    ],
)
def test_infer_batch_size(examples, steps, expected):
    assert infer_batch_size(examples, steps) == expected
    assert math.ceil(examples / expected) == steps


def test_batch_size_override_is_recorded(run_copy):
    frame = explain(run_copy, seeds=2, batch_size=60)
    assert (frame["batch_size"] == 60).all()
    stored = json.loads((run_copy / "replay/results/e0001.json").read_text())
    assert stored["explain"]["batch_size"] == 60


def test_unknown_steps_per_epoch_asks_for_a_batch_size(run_copy):
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["steps_per_epoch"] = None
    manifest["params"].pop("steps", None)
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="pass batch_size"):
        explain(run_copy, seeds=2)


def test_a_damaged_checkpoint_is_reported_and_the_others_explained(run_copy):
    (run_copy / "checkpoints/e0002.h5").write_bytes(b"not hdf5")
    with pytest.raises(ExplainIncompleteError, match="e0002.h5") as caught:
        explain(run_copy, seeds=2)
    assert caught.value.frame["checkpoint"].tolist() == ["e0001.h5", "e0003.h5"]


def test_sub_epoch_checkpoints_are_not_replayed(tmp_path):
    # 180 examples in batches of 32: 6 steps per epoch, a checkpoint every 2 steps.
    path, _ = _train(_model("none"), tmp_path, save_freq=2)
    names = [c.name for c in Run(path).checkpoints()]
    assert any("-s" in name for name in names), names
    frame = explain(path, seeds=2)
    assert frame["checkpoint"].tolist() == ["e0001.h5", "e0002.h5"]
    assert sorted(p.name for p in (path / "replay/results").glob("e*-s*.json")) == []


def _drop_a_weight(checkpoint: Path) -> None:
    with h5py.File(checkpoint, "r+") as f:
        del f["weights"][_dataset_names(f["weights"])[-1]]


def _lose_a_weights_data(checkpoint: Path) -> None:
    # The file still opens and lists its variables; reading one fails (its data is gone).
    with h5py.File(checkpoint, "r+") as f:
        name = _dataset_names(f["weights"])[0]
        old = f["weights"][name]
        shape, dtype, attrs = old.shape, old.dtype, dict(old.attrs)
        del f["weights"][name]
        gone = str(checkpoint.with_name("gone.bin"))
        new = f["weights"].create_dataset(
            name, shape=shape, dtype=dtype, external=[(gone, 0, h5py.h5f.UNLIMITED)]
        )
        new.attrs.update(attrs)


def _dataset_names(group) -> list[str]:
    names = []
    group.visititems(
        lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None
    )
    return names


@pytest.mark.parametrize("damage", [_drop_a_weight, _lose_a_weights_data])
def test_a_checkpoint_damaged_after_its_replay_is_reported_and_the_others_explained(
    run_copy, damage
):
    # The replay results are stored, so replay() reuses them and never reads the weights
    # again: the damage shows only when explain reads them.
    replay(run_copy)
    damage(run_copy / "checkpoints/e0002.h5")
    with pytest.raises(ExplainIncompleteError, match="e0002.h5") as caught:
        explain(run_copy, seeds=2)
    assert list(caught.value.failures) == ["e0002.h5"]
    assert caught.value.frame["checkpoint"].tolist() == ["e0001.h5", "e0003.h5"]
    results = run_copy / "replay/results"
    for name in ("e0001", "e0003"):
        assert "explain" in json.loads((results / f"{name}.json").read_text())
    assert "explain" not in json.loads((results / "e0002.json").read_text())


def test_a_result_that_cannot_be_written_is_reported_and_the_others_explained(
    run_copy, monkeypatch
):
    import errno

    from trueloss_replay import run as runfmt

    replay(run_copy)
    write = runfmt.atomic_write_json

    def full_disk(path, obj):
        if Path(path).name == "e0002.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, obj)

    monkeypatch.setattr(runfmt, "atomic_write_json", full_disk)
    with pytest.raises(ExplainIncompleteError) as caught:
        explain(run_copy, seeds=2)
    reason = caught.value.failures["e0002.h5"]
    assert "could not write" in reason and "e0002.json" in reason
    assert "No space left on device" in reason
    assert caught.value.frame["checkpoint"].tolist() == ["e0001.h5", "e0003.h5"]


# --------------------------------------------------------------------------- verdict


def _frame(rows, layers=("Dropout",)):
    columns = [
        "epoch",
        "reported_loss",
        "reported_val_loss",
        "loss",
        "val_loss",
        "gap_penalty",
        "gap_training_mode",
        "gap_training_mode_se",
        "gap_drift",
    ]
    frame = pd.DataFrame([dict(zip(columns, r, strict=True)) for r in rows])
    frame.attrs["training_mode_layers"] = list(layers)
    return frame


def test_verdict_reads_like_the_example():
    frame = _frame([(20, 1.01, 0.87, 0.54, 0.62, 0.25, 0.17, 0.004, 0.05)])
    assert verdict(frame) == (
        "At epoch 20 the reported training loss 1.01 exceeds the validation loss 0.87. "
        "The true training loss is 0.54: 0.25 of the gap is the regularization penalty, "
        "0.17 ± 0.00 is training mode (dropout), 0.05 is the within-epoch average over "
        "changing weights. The model fits the training set better than the validation set "
        "(0.54 vs 0.62): mild overfitting."
    )


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (
            [(5, 1.0, 1.0, 0.3, 0.9, 0, 0, 0, 0.7)],
            "much better than the validation set (0.30 vs 0.90): overfitting.",
        ),
        ([(5, 1.0, 1.0, 0.9, 0.7, 0, 0, 0, 0.1)], "validation set may be easier"),
        (
            [(4, 1.2, 1.0, 1.0, 1.0, 0, 0, 0, 0.2), (5, 1.0, 1.0, 0.9, 0.91, 0, 0, 0, 0.1)],
            "still fell by 10% in the last epoch: underfitting",
        ),
        (
            [(4, 1.0, 1.0, 0.9, 0.9, 0, 0, 0, 0.1), (5, 1.0, 1.0, 0.9, 0.91, 0, 0, 0, 0.1)],
            "no sign of over- or underfitting.",
        ),
        ([(5, 1.0, math.nan, 0.9, math.nan, 0, 0, 0, 0.1)], "There is no validation set"),
    ],
)
def test_verdict_judges_the_fit(rows, expected):
    assert expected in verdict(_frame(rows))


def test_verdict_names_the_absence_of_training_mode_layers():
    text = verdict(_frame([(2, 1.0, 1.0, 0.9, 0.9, 0.1, 0.0, math.nan, 0.0)], layers=()))
    assert "0.00 is training mode (there is no dropout or BatchNorm layer)" in text


# --------------------------------------------------------------------------- History, plot, CLI


@pytest.fixture(scope="module")
def explained_copy(trained_run, tmp_path_factory):
    """A copy of the shared run, replayed and explained once, read-only for the tests below."""
    import shutil

    target = tmp_path_factory.mktemp("explained") / "run"
    shutil.copytree(trained_run.path, target)
    return target, explain(target, seeds=3)


def test_history_has_the_gap_keys(explained_copy):
    from trueloss_replay.history import load_history

    path, frame = explained_copy
    history = load_history(path).history
    for key in ("gap_penalty", "gap_training_mode", "gap_training_mode_se", "gap_drift"):
        assert history[key] == frame[key].tolist()
    total = [
        a + b + c + d
        for a, b, c, d in zip(
            history["loss"],
            history["gap_penalty"],
            history["gap_training_mode"],
            history["gap_drift"],
            strict=True,
        )
    ]
    assert total == history["reported_loss"]
    assert list(history).index("gap_drift") < list(history).index("reported_loss")


def test_exported_history_files_carry_the_gap_keys(explained_copy):
    path, frame = explained_copy
    exported = json.loads((path / "replay/history.json").read_text())["history"]
    assert exported["gap_drift"] == frame["gap_drift"].tolist()


def test_plot_explain_stacks_the_parts_under_the_reported_curve(explained_copy):
    from trueloss_replay.plot import plot_history

    path, frame = explained_copy
    fig = plot_history(path, explain=True, path=path / "explained.png")
    loss_ax = next(ax for ax in fig.axes if ax.get_title() == "loss")
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy"]
    areas = loss_ax.collections
    assert [a.get_label() for a in areas] == ["penalty", "training mode", "within-epoch drift"]
    top = areas[-1].get_paths()[0].vertices
    # The top edge of the last area is the reported loss at each epoch.
    for epoch, reported in zip(frame["epoch"], frame["reported_loss"], strict=True):
        ys = top[np.isclose(top[:, 0], epoch), 1]
        assert np.isclose(ys, reported).any()
    assert (path / "explained.png").stat().st_size > 0


def test_plot_explain_without_explained_parts_says_what_to_run(trained_run):
    from trueloss_replay.plot import PlotError, plot_history

    plain = {"loss": [1.0], "reported_loss": [1.2]}
    with pytest.raises(PlotError, match=r"explain the run first: explain\(run_dir\)"):
        plot_history(plain, explain=True)


def test_cli_explain_prints_the_table_and_the_verdict(explained_copy):
    from click.testing import CliRunner

    from trueloss_replay.cli import main

    path, frame = explained_copy
    result = CliRunner().invoke(main, ["explain", str(path), "--seeds", "3"])
    assert result.exit_code == 0, result.output
    assert "training mode" in result.output and "drift" in result.output
    assert f"{frame['gap_drift'].iloc[-1]:.4f}" in result.output
    assert verdict(frame) in " ".join(result.output.split())


def test_cli_plot_explain_writes_the_figure(explained_copy, tmp_path):
    from click.testing import CliRunner

    from trueloss_replay.cli import main

    path, _ = explained_copy
    out = tmp_path / "gap.png"
    result = CliRunner().invoke(main, ["plot", str(path), "--explain", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0


def test_cli_plot_explain_before_explain_fails_with_the_fix(replayed_run):
    from click.testing import CliRunner

    from trueloss_replay.cli import main

    result = CliRunner().invoke(main, ["plot", str(replayed_run), "--explain"])
    assert result.exit_code == 1
    assert "explain the run first: explain(run_dir), or the explain command" in result.output


def test_cli_explain_reports_a_damaged_checkpoint(run_copy):
    from click.testing import CliRunner

    from trueloss_replay.cli import main

    (run_copy / "checkpoints/e0001.h5").write_bytes(b"not hdf5")
    result = CliRunner().invoke(main, ["explain", str(run_copy), "--seeds", "2"])
    assert result.exit_code == 1
    assert "Error: 1 checkpoint(s)" in result.output and "e0001.h5" in result.output
    assert "(incomplete)" in result.output
