"""trueloss-replay replay and demo through Click, as a user runs them."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from trueloss_replay.cli import main

from .conftest import replay_in_subprocess


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_replay_writes_results_history_and_prints_the_summary(run_copy):
    result = _invoke("replay", run_copy, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "true loss of" in result.output and "reported loss" in result.output
    names = sorted(p.name for p in (run_copy / "replay" / "results").glob("*.json"))
    assert names == ["e0000.json", "e0001.json", "e0002.json", "e0003.json"]
    assert (run_copy / "replay" / "history.csv").is_file()
    assert (run_copy / "replay" / "history.json").is_file()


def test_rerun_skips_finished_checkpoints_and_force_recomputes(run_copy):
    results = run_copy / "replay" / "results"
    assert _invoke("replay", run_copy, "--no-progress").exit_code == 0
    before = {p.name: json.loads(p.read_text())["evaluated"] for p in results.glob("*.json")}
    assert _invoke("replay", run_copy, "--no-progress").exit_code == 0
    again = {p.name: json.loads(p.read_text())["evaluated"] for p in results.glob("*.json")}
    assert again == before
    assert _invoke("replay", run_copy, "--no-progress", "--force", "--epochs", "2").exit_code == 0
    forced = {p.name: json.loads(p.read_text())["evaluated"] for p in results.glob("*.json")}
    assert forced["e0002.json"] > before["e0002.json"]
    assert {k: v for k, v in forced.items() if k != "e0002.json"} == {
        k: v for k, v in before.items() if k != "e0002.json"
    }


def test_epochs_selects_checkpoints(run_copy):
    result = _invoke("replay", run_copy, "--no-progress", "--epochs", "1,3")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (run_copy / "replay" / "results").glob("*.json"))
    assert names == ["e0001.json", "e0003.json"]


def test_bad_epochs_is_a_usage_error(run_copy):
    result = _invoke("replay", run_copy, "--epochs", "3-x")
    assert result.exit_code == 2
    assert "'3-x' is not an epoch or a range like 5-9" in result.output


def test_train_and_val_files(run_copy, trained_run, tmp_path):
    np.savez(tmp_path / "train.npz", x=trained_run.train[0], y=trained_run.train[1])
    np.savez(tmp_path / "val.npz", x=trained_run.val[0], y=trained_run.val[1])
    result = _invoke(
        "replay",
        run_copy,
        "--no-progress",
        "--train",
        tmp_path / "train.npz",
        "--val",
        tmp_path / "val.npz",
        "--batch-size",
        "7",
    )
    assert result.exit_code == 0, result.output
    first = json.loads((run_copy / "replay" / "results" / "e0001.json").read_text())
    assert first["examples"] == {"train": 180, "val": 60}
    assert first["batch_size"] == {"train": 7, "val": 7}


def test_unreadable_checkpoint_exits_1_after_evaluating_the_others(run_copy):
    (run_copy / "checkpoints" / "e0001.h5").write_bytes(b"garbage")
    result = _invoke("replay", run_copy, "--no-progress")
    assert result.exit_code == 1
    assert "e0001.h5" in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: 1 checkpoint(s)")
    names = sorted(p.name for p in (run_copy / "replay" / "results").glob("*.json"))
    assert names == ["e0000.json", "e0002.json", "e0003.json"]


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["--data", "missing_module:load"], "cannot import module 'missing_module'", 1),
        (["--data", "no colon"], "Invalid value for '--data': --data 'no colon' is not a", 2),
        (["--import", "missing_module_2"], "given in --import", 1),
    ],
)
def test_bad_options_give_one_line_errors(run_copy, args, message, code):
    result = _invoke("replay", run_copy, "--no-progress", *args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (run_copy / "replay" / "results").exists() or not list(
        (run_copy / "replay" / "results").glob("*.json")
    )


@pytest.mark.parametrize(
    "devices, message",
    [
        ("gpu", "sees no GPU"),
        ("/CPU:7", "there is no device /CPU:7"),
        (",", "names no device"),
    ],
)
def test_bad_devices_are_usage_errors(run_copy, devices, message):
    result = _invoke("replay", run_copy, "--no-progress", "--devices", devices)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_model_builder_for_a_run_without_architecture(run_copy, tmp_path, monkeypatch):
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["model"] = None
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "mybuilder.py").write_text(
        "from tests.conftest import build_model\n\ndef build():\n    return build_model()\n"
    )
    monkeypatch.chdir(tmp_path)
    result = _invoke("replay", run_copy, "--no-progress")
    assert result.exit_code == 1 and "--model 'module:function'" in result.output
    result = _invoke("replay", run_copy, "--no-progress", "--model", "mybuilder:build")
    assert result.exit_code == 0, result.output


def test_demo_command(tmp_path):
    result = _invoke("demo", tmp_path / "demo", "--epochs", "2", "--no-progress")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "curves.png").is_file()
    assert (tmp_path / "demo" / "history.csv").is_file()
    assert "At epoch 2 Keras reported a training loss of" in result.output


def test_import_finds_a_module_in_the_current_directory(tmp_path, monkeypatch):
    import keras

    from tests.conftest import make_data
    from tests.test_replay_errors import CUSTOM_LAYER
    from trueloss_replay import ReplayCheckpoint

    (tmp_path / "tlr_cli_custom.py").write_text(CUSTOM_LAYER.replace("tlr_test", "tlr_cli"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import tlr_cli_custom

    x, y = make_data(n=64)
    model = keras.Sequential([keras.Input((8,)), tlr_cli_custom.Scale(), keras.layers.Dense(3)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, verbose=0, callbacks=[ReplayCheckpoint("run", train_data=(x, y))])
    # As a fresh `trueloss-replay` process sees it: not imported, not registered, not on the path.
    keras.saving.get_custom_objects().pop("tlr_cli>Scale")
    monkeypatch.delitem(sys.modules, "tlr_cli_custom")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in (str(tmp_path), "")])
    result = _invoke("replay", "run", "--no-progress")
    assert result.exit_code == 1 and "'tlr_cli>Scale'" in result.output
    assert "pass the module that defines it with --import" in result.output
    result = _invoke("replay", "run", "--no-progress", "--import", "tlr_cli_custom")
    assert result.exit_code == 0, result.output


def test_data_major_gives_the_same_results(run_copy, tmp_path):
    assert _invoke("replay", run_copy, "--no-progress", "--output", tmp_path / "a").exit_code == 0
    result = _invoke(
        "replay", run_copy, "--no-progress", "--data-major", "--output", tmp_path / "b"
    )
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "a").glob("e*.json"))) == 4
    for path in (tmp_path / "a").glob("e*.json"):
        a = json.loads(path.read_text())
        b = json.loads((tmp_path / "b" / path.name).read_text())
        for split in ("train", "val"):
            for key, value in a[split].items():
                np.testing.assert_allclose(b[split][key], value, rtol=1e-6)


def test_val_alone_keeps_the_recorded_training_data(run_copy, trained_run, tmp_path):
    np.savez(tmp_path / "val.npz", x=trained_run.val[0][:30], y=trained_run.val[1][:30])
    result = _invoke("replay", run_copy, "--no-progress", "--val", tmp_path / "val.npz")
    assert result.exit_code == 0, result.output
    first = json.loads((run_copy / "replay" / "results" / "e0001.json").read_text())
    assert first["examples"] == {"train": 180, "val": 30}


def test_replay_keeps_tensorflow_start_up_lines_off_stderr(trained_run, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = replay_in_subprocess(trained_run.path, tmp_path / "results", env)
    assert result.returncode == 0, result.stderr[-3000:]
    noise = ("cudart_stub", "cpu_feature_guard", "absl::InitializeLog")
    assert not [line for line in result.stderr.splitlines() if any(n in line for n in noise)]
