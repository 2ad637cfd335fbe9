"""Sampled training-set estimates: the subset, the standard errors, reuse, CLI and plot."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from trueloss_replay import ReplayCheckpoint, replay
from trueloss_replay.cli import main
from trueloss_replay.data import ArraySplit, make_split
from trueloss_replay.errors import DataError
from trueloss_replay.run import Run, read_result
from trueloss_replay.sampling import ratio_standard_error, sample_indices, sample_split

from .conftest import build_model, make_data

pytestmark = pytest.mark.backend


def _per_example(model, x, y):
    """Per-example cross-entropy and correctness, from Keras' predictions and numpy."""
    p = np.asarray(model.predict(x, batch_size=len(x), verbose=0), dtype=np.float64)
    loss = -np.log(np.clip(p[np.arange(len(y)), y], 1e-7, 1.0))
    return loss, (p.argmax(axis=1) == y).astype(np.float64)


@pytest.fixture(scope="module")
def population(trained_run):
    """2,000 examples' real per-example loss and correctness under the trained model."""
    x, y = make_data(n=2000, seed=1)
    loss, correct = _per_example(trained_run.model, x, y)
    weights = np.random.default_rng(7).uniform(0.2, 3.0, size=len(loss))
    return loss, correct, weights


def test_standard_error_matches_the_spread_over_many_samples(population):
    loss, correct, weights = population
    n, big = 300, len(loss)
    cases = [  # (a, b, the exact full-set figure): a plain mean and a weighted one
        (loss, None, loss.mean()),
        (correct * weights, weights, np.sum(correct * weights) / weights.sum()),
    ]
    for a, b, exact in cases:
        estimates, errors = [], []
        for seed in range(200):
            idx = sample_indices(big, n, seed)
            b_i = None if b is None else b[idx]
            estimates.append(a[idx].sum() / (n if b is None else b_i.sum()))
            errors.append(ratio_standard_error(a[idx], b_i, population=big))
        estimates, errors = np.asarray(estimates), np.asarray(errors)
        spread = estimates.std(ddof=1)
        assert abs(errors.mean() / spread - 1) < 0.2, (errors.mean(), spread)
        covered = np.mean(np.abs(estimates - exact) <= 2 * errors)
        assert 0.9 <= covered <= 0.99, covered


def test_standard_error_of_a_plain_mean_is_the_textbook_formula():
    values = np.random.default_rng(0).normal(size=50)
    expected = values.std(ddof=1) / np.sqrt(50) * np.sqrt(1 - 50 / 200)
    assert ratio_standard_error(values, None, population=200) == pytest.approx(expected)
    assert ratio_standard_error(values, None, population=50) == 0.0  # the whole set


@pytest.mark.parametrize(
    ("train_sample", "message"),
    [
        (1, "at least 2"),
        (0.001, "at least 2"),
        (1.5, "not a count"),
        (181, "at most 180"),
        (True, "neither a count"),
        ("10", "neither a count"),
    ],
)
def test_bad_train_sample_names_the_argument(trained_run, train_sample, message):
    split = ArraySplit("train", *trained_run.train)
    with pytest.raises(DataError, match=message) as info:
        sample_split(split, train_sample)
    assert "train_sample" in str(info.value) and info.value.usage


def test_a_streamed_training_source_is_refused_by_kind(trained_run):
    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return trained_run.train[0][i * 90 : (i + 1) * 90], trained_run.train[1][
                i * 90 : (i + 1) * 90
            ]

    with pytest.raises(DataError, match="train_sample= needs array .* keras.utils.PyDataset"):
        sample_split(make_split("train", Batches()), 50)


def test_sampled_replay_matches_numpy_on_the_same_subset(trained_run, run_copy):
    history = replay(run_copy, train_sample=0.25, sample_seed=3, progress=False)
    x, y = trained_run.train
    idx = sample_indices(len(x), 45, 3)
    model = build_model()
    for epoch, weights in trained_run.weights.items():
        if epoch == 0:
            continue
        model.set_weights(weights)
        loss, correct = _per_example(model, x[idx], y[idx])
        fpc = np.sqrt(1 - 45 / len(x))
        h = {k: v[epoch - 1] for k, v in history.history.items()}
        assert h["loss"] == pytest.approx(loss.mean(), rel=1e-4)
        assert h["loss_se"] == pytest.approx(loss.std(ddof=1) / np.sqrt(45) * fpc, rel=1e-3)
        assert h["accuracy"] == pytest.approx(correct.mean())
        assert h["accuracy_se"] == pytest.approx(correct.std(ddof=1) / np.sqrt(45) * fpc)
    assert "val_loss_se" not in history.history and "regularization_loss_se" not in history.history
    result = read_result(run_copy / "replay" / "results" / "e0001.json")
    assert result["examples"] == {"train": 45, "val": len(trained_run.val[0])}
    assert result["sample"]["train"]["size"] == 45 and result["sample"]["train"]["seed"] == 3
    assert result["data"]["train"]["sample"] == result["sample"]["train"]


def test_sampled_weighted_replay_uses_the_ratio_estimator(trained_run, tmp_path):
    x, y = trained_run.train
    w = np.random.default_rng(2).uniform(0.5, 2.0, size=len(x)).astype("float32")
    model = build_model()
    # Weighted metrics: accuracy becomes sum(w * correct) / sum(w), a ratio estimate.
    model.compile(loss="sparse_categorical_crossentropy", weighted_metrics=["accuracy"])
    history = replay(
        trained_run.path,
        model=lambda: model,
        train=(x, y, w),
        val=trained_run.val,
        train_sample=60,
        epochs=[3],
        output=tmp_path / "results",
        progress=False,
    )
    model.set_weights(trained_run.weights[3])
    idx = sample_indices(len(x), 60, 0)
    loss, correct = _per_example(model, x[idx], y[idx])
    a, wi = loss * w[idx], w[idx].astype(np.float64)
    fpc = 1 - 60 / len(x)
    h = {k: v[2] for k, v in history.history.items()}
    assert h["loss"] == pytest.approx(a.mean(), rel=1e-4)  # Keras divides by the count
    assert h["loss_se"] == pytest.approx(np.sqrt(fpc * a.var(ddof=1) / 60), rel=1e-3)
    ratio = np.sum(correct * wi) / wi.sum()
    expected = np.sqrt(fpc * np.sum((correct * wi - ratio * wi) ** 2) / (60 * 59)) / wi.mean()
    assert h["accuracy"] == pytest.approx(ratio, rel=1e-5)
    assert h["accuracy_se"] == pytest.approx(expected, rel=1e-3)


def test_a_result_of_another_sample_or_the_full_set_is_never_reused(run_copy):
    results = run_copy / "replay" / "results" / "e0002.json"

    def evaluated(**options):
        history = replay(run_copy, epochs=[2], progress=False, **options)
        # Epoch 2 only: the other checkpoints have no result (NaN).
        return read_result(results)["evaluated"], {k: v[1] for k, v in history.history.items()}

    first, sampled = evaluated(train_sample=40, sample_seed=5)
    again, same = evaluated(train_sample=40, sample_seed=5)
    assert again == first and same == sampled  # the same sample: reused
    full_time, full = evaluated()
    assert full_time > first and "loss_se" not in full and full["loss"] != sampled["loss"]
    back, resampled = evaluated(train_sample=40, sample_seed=5)
    assert back > full_time and resampled["loss"] == sampled["loss"]  # same seed, same subset
    other, _ = evaluated(train_sample=40, sample_seed=6)
    assert other > back
    assert read_result(results)["sample"]["train"]["seed"] == 6


def test_cli_replay_history_and_plot_show_the_standard_errors(run_copy):
    runner = CliRunner()
    result = runner.invoke(
        main, ["replay", str(run_copy), "--train-sample", "0.5", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "loss_se" in result.output
    result = runner.invoke(main, ["history", str(run_copy), "--format", "csv"])
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0].split(",")
    assert "loss_se" in header and "accuracy_se" in header
    stored = json.loads((run_copy / "replay" / "history.json").read_text())
    assert len(stored["history"]["loss_se"] if "history" in stored else stored["loss_se"]) == 3
    result = runner.invoke(main, ["plot", str(run_copy)])
    assert result.exit_code == 0, result.output
    assert (run_copy / "replay" / "curves.png").stat().st_size > 0
    assert Run(run_copy).manifest  # the run folder is intact


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--train-sample", "abc"], "neither a count"),
        (["--train-sample", "5000"], "--train-sample 5000 asks for more examples"),
        (["--sample-seed", "3"], "--sample-seed only applies with --train-sample"),
    ],
)
def test_cli_bad_sample_options_are_usage_errors(trained_run, args, message):
    result = CliRunner().invoke(main, ["replay", str(trained_run.path), "--no-progress", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_plot_draws_a_two_standard_error_band_around_the_training_curve():
    from trueloss_replay.plot import BAND_LABEL, plot_history, quantities

    history = {"loss": [1.0, 0.8], "loss_se": [0.1, 0.05], "val_loss": [1.1, 0.9]}
    assert quantities(history) == ["loss"]
    fig = plot_history(history, path=None)
    ax = fig.axes[0]
    (band,) = [c for c in ax.collections if c.get_label() == BAND_LABEL]
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.8 - 0.1) and ys.max() == pytest.approx(1.0 + 0.2)


def test_multi_output_standard_errors_are_named_as_keras_names_the_figures(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)).astype("float32")
    y = {"a": rng.integers(0, 3, 120).astype("int32"), "b": rng.normal(size=(120, 2))}
    y["b"] = y["b"].astype("float32")
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    outputs = {
        "a": keras.layers.Dense(3, activation="softmax", name="a")(hidden),
        "b": keras.layers.Dense(2, name="b")(hidden),
    }
    model = keras.Model(inputs, outputs)
    model.compile(
        "adam",
        loss={"a": "sparse_categorical_crossentropy", "b": "mse"},
        loss_weights={"a": 1.0, "b": 0.5},
        metrics={"a": ["accuracy"], "b": ["mae"]},
    )
    run_dir = tmp_path / "run"
    model.fit(x, y, epochs=1, verbose=0, callbacks=[ReplayCheckpoint(run_dir, train_data=(x, y))])
    h = {k: v[0] for k, v in replay(run_dir, train_sample=40, progress=False).history.items()}
    idx = sample_indices(120, 40, 0)
    p = model.predict(x[idx], verbose=0)
    fpc = np.sqrt(1 - 40 / 120) / np.sqrt(40)
    loss = -np.log(p["a"][np.arange(40), y["a"][idx]]) + 0.5 * ((p["b"] - y["b"][idx]) ** 2).mean(1)
    correct = (p["a"].argmax(1) == y["a"][idx]).astype(float)
    mae = np.abs(p["b"] - y["b"][idx]).mean(1)
    assert h["loss"] == pytest.approx(loss.mean(), rel=1e-4)
    assert h["loss_se"] == pytest.approx(loss.std(ddof=1) * fpc, rel=1e-3)
    assert h["a_accuracy_se"] == pytest.approx(correct.std(ddof=1) * fpc, rel=1e-4)
    assert h["b_mae_se"] == pytest.approx(mae.std(ddof=1) * fpc, rel=1e-3)
    assert "a_loss_se" not in h  # Keras' per-output loss trackers are batch means: no SE
