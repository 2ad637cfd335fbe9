"""The demo, end to end on small settings, and the showcase ordering it exists to show."""

from __future__ import annotations

import csv

import matplotlib.image
import pytest

from trueloss_replay.demo import run_demo


@pytest.fixture(scope="module")
def demo_result(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo"), epochs=10, seed=0)


def test_demo_writes_plot_and_csv(demo_result):
    assert matplotlib.image.imread(demo_result.plot).ndim == 3
    with demo_result.csv.open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(10))
    assert {"loss", "val_loss", "regularization_loss", "reported_loss"} <= set(rows[0])


def test_reported_training_loss_is_above_validation_but_the_true_one_is_below(demo_result):
    # Dropout and the L2 penalty inflate the reported training loss past the validation
    # loss; in inference mode without the penalty the model fits its training set better.
    h = demo_result.history.history
    assert h["reported_loss"][-1] > h["reported_val_loss"][-1]
    assert h["loss"][-1] < h["val_loss"][-1]


def test_headline_names_the_figures(demo_result):
    h = demo_result.history.history
    text = demo_result.headline()
    assert f"{h['reported_loss'][-1]:.3f}" in text
    assert f"{h['loss'][-1]:.3f}" in text
    assert text.startswith("At epoch 10")
