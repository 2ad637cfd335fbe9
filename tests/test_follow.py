"""Following a live run: real training and follower processes, SIGKILL, SIGINT, keep=."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from trueloss_replay import ReplayCheckpoint, Run, follow, replay
from trueloss_replay.backends import share_device_memory
from trueloss_replay.cli import main
from trueloss_replay.following import MISSED_REASON
from trueloss_replay.history import read_json
from trueloss_replay.run import atomic_write_json, read_manifest, read_result
from trueloss_replay.tensorboard import export_tensorboard

from .conftest import build_model, make_data
from .trainer_subprocess import PACED_EPOCHS

SCRIPT = Path(__file__).with_name("trainer_subprocess.py")
PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"
# The command line, run as a user runs it. Under JAX a backend factory registered first
# reports the variable at the moment JAX starts its devices (it then steps aside).
FOLLOWER = f"""
import os
if os.environ.get("KERAS_BACKEND") == "jax":
    from jax._src import xla_bridge
    def report():
        print("{PREALLOCATE} when JAX started:", os.environ.get("{PREALLOCATE}"), flush=True)
        raise RuntimeError("only reports")
    xla_bridge.register_backend_factory("report", report, priority=-100)
from trueloss_replay.cli import main
main()
"""
TIMEOUT = 300


def _start_follower(run_dir: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != PREALLOCATE}
    return subprocess.Popen(
        [sys.executable, "-c", FOLLOWER, "replay", str(run_dir), "--follow", "--no-progress"]
        + ["--poll", "0.05", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_until(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if process.poll() is not None:
            pytest.fail(
                f"follower exited ({process.returncode}) before {what}: {process.stderr.read()}"
            )
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _set_status(run_dir: Path, status: str) -> None:
    manifest = read_manifest(run_dir)
    manifest["status"] = status
    atomic_write_json(run_dir / "manifest.json", manifest)


def _results(run_dir: Path) -> Path:
    return run_dir / "replay" / "results"


def _checkpoint_names(run_dir: Path) -> list[str]:
    return [c.name for c in Run(run_dir).checkpoints()]


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# --------------------------------------------------------------------------- live training


@pytest.mark.backend
def test_a_follower_started_before_training_evaluates_each_checkpoint_while_it_trains(tmp_path):
    run_dir = tmp_path / "run"  # nothing there yet: the follower waits for the manifest
    follower = _start_follower(run_dir, "--idle-timeout", str(TIMEOUT))
    trainer = subprocess.Popen(
        [sys.executable, str(SCRIPT), "paced", str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, trainer_err = trainer.communicate(timeout=TIMEOUT)
        out, err = follower.communicate(timeout=TIMEOUT)
    finally:
        for process in (trainer, follower):
            if process.poll() is None:
                process.kill()
    assert trainer.returncode == 0, trainer_err
    assert follower.returncode == 0, err
    assert "Traceback" not in err and "cannot be evaluated" not in err

    names = [f"e{epoch:04d}.h5" for epoch in range(PACED_EPOCHS + 1)]
    assert _checkpoint_names(run_dir) == names
    finished = read_manifest(run_dir)["finished"]
    for name in names:
        result = read_result(_results(run_dir) / name.replace(".h5", ".json"))
        # Each epoch waited for its result (up to PACED_WAIT): written during training.
        assert result["evaluated"] < finished, name
    followed = read_json(run_dir / "replay" / "history.json")
    plain = replay(run_dir, output=tmp_path / "plain")
    assert followed.epoch == plain.epoch == list(range(PACED_EPOCHS))
    assert sorted(followed.history) == sorted(plain.history)
    for key, values in plain.history.items():
        np.testing.assert_allclose(followed.history[key], values, rtol=1e-6, err_msg=key)
    assert (run_dir / "replay" / "curves.png").stat().st_size > 0
    if os.environ.get("KERAS_BACKEND") == "jax":  # shares the GPU: no preallocation
        assert f"{PREALLOCATE} when JAX started: false" in out


def test_a_follower_killed_and_restarted_recomputes_nothing(run_copy):
    _set_status(run_copy, "running")
    results = _results(run_copy)
    follower = _start_follower(run_copy)
    _wait_until(lambda: any(results.glob("e*.json")), follower, "a first result")
    follower.kill()  # SIGKILL, perhaps while it evaluates the next checkpoint
    follower.communicate()
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in results.glob("e*.json")}
    _set_status(run_copy, "finished")

    outcome = follow(run_copy, poll=0.05, plot=False)

    assert outcome.status == "finished" and outcome.ok
    assert sorted(outcome.reused) == sorted(n.replace(".json", ".h5") for n in before)
    assert sorted(outcome.reused + outcome.evaluated) == _checkpoint_names(run_copy)
    kept = {name: (results / name).stat().st_mtime_ns for name in before}
    assert kept == {name: mtime for name, (mtime, _) in before.items()}
    assert all((results / name).read_bytes() == data for name, (_, data) in before.items())


def test_ctrl_c_stops_a_follower_cleanly_and_keeps_every_result(run_copy):
    _set_status(run_copy, "running")
    results = _results(run_copy)
    follower = _start_follower(run_copy)
    _wait_until(lambda: any(results.glob("e*.json")), follower, "a first result")
    follower.send_signal(signal.SIGINT)
    out, err = follower.communicate(timeout=TIMEOUT)

    assert follower.returncode == 130, err
    assert "Traceback" not in err and "Aborted" not in err
    assert f"interrupted; every result written is kept in {results}" in err
    written = sorted(results.glob("e*.json"))
    assert written
    for path in written:
        assert read_result(path)["checkpoint"] == path.stem + ".h5"


# --------------------------------------------------------------------------- how it stops


def test_a_failed_training_exits_1_once_every_checkpoint_is_evaluated(run_copy):
    _set_status(run_copy, "failed")
    result = _invoke("replay", run_copy, "--follow", "--poll", "0.05", "--no-plot")

    assert result.exit_code == 1, result.output
    assert "failed (its manifest says 'failed'); 4 checkpoint(s) evaluated" in result.output
    assert sorted(p.stem for p in _results(run_copy).glob("*.json")) == [
        "e0000",
        "e0001",
        "e0002",
        "e0003",
    ]


def test_no_new_checkpoint_for_the_idle_timeout_exits_1(run_copy):
    _set_status(run_copy, "running")
    started = time.monotonic()
    result = _invoke(
        "replay", run_copy, "--follow", "--poll", "0.05", "--idle-timeout", "0.5", "--no-plot"
    )

    assert result.exit_code == 1, result.output
    assert time.monotonic() - started >= 0.5
    assert "no new checkpoint in" in result.output and "for 0.5 s (--idle-timeout)" in result.output
    assert "e0003.h5: loss" in result.output  # what had landed was evaluated
    assert (run_copy / "replay" / "results" / "e0003.json").is_file()


def test_a_run_that_never_starts_exits_1_after_the_idle_timeout(tmp_path):
    result = _invoke(
        "replay", tmp_path / "nowhere", "--follow", "--poll", "0.05", "--idle-timeout", "0.2"
    )

    assert result.exit_code == 1, result.output
    assert "waiting for" in result.output
    assert "got no manifest.json in 0.2 s (--idle-timeout)" in result.output
    assert not (tmp_path / "nowhere").exists()


# --------------------------------------------------------------------------- missed checkpoints


def test_checkpoints_removed_by_keep_are_listed_as_missed(tmp_path):
    x, y = make_data(64)
    run_dir = tmp_path / "run"
    build_model().fit(
        x,
        y,
        batch_size=32,
        epochs=2,
        verbose=0,
        callbacks=[ReplayCheckpoint(run_dir, train_data=(x, y), keep=1)],
    )

    result = _invoke("replay", run_dir, "--follow", "--poll", "0.05", "--no-plot")

    assert result.exit_code == 0, result.output
    for name in ("e0000.h5", "e0001.h5"):
        assert f"{name}: missed, {MISSED_REASON}" in result.output
    assert "1 checkpoint(s) evaluated, 0 reused; missed 2: e0000.h5, e0001.h5" in result.output
    assert sorted(p.stem for p in _results(run_dir).glob("*.json")) == ["e0002"]


def test_a_checkpoint_removed_after_it_was_listed_is_missed_not_failed(run_copy):
    class RemoveTheNext:
        """Removes e0002.h5 as keep= would, between its listing and its turn."""

        def checkpoint_done(self, result, reused):
            if result["checkpoint"] == "e0001.h5":
                (run_copy / "checkpoints" / "e0002.h5").unlink()

    outcome = follow(run_copy, poll=0.05, plot=False, progress=RemoveTheNext())

    assert outcome.status == "finished" and not outcome.failures
    assert outcome.missed == {"e0002.h5": MISSED_REASON}
    assert outcome.evaluated == ["e0000.h5", "e0001.h5", "e0003.h5"]


# --------------------------------------------------------------------------- exports, options


@pytest.mark.parametrize(
    "args", [("--follow", "--logdir"), ("--tensorboard",)], ids=["follow-logdir", "alias"]
)
def test_tensorboard_scalars_hold_one_copy_of_the_curves(run_copy, tmp_path, args):
    logdir = tmp_path / "logs"
    result = _invoke("replay", run_copy, "--no-progress", *args, logdir)
    assert result.exit_code == 0, result.output

    fresh = tmp_path / "fresh"
    export_tensorboard(run_copy, fresh)
    # Refreshed after every checkpoint, yet as many event files as one export writes.
    found = sorted(p.relative_to(logdir).parent for p in logdir.rglob("events.out.tfevents.*"))
    once = sorted(p.relative_to(fresh).parent for p in fresh.rglob("events.out.tfevents.*"))
    assert found == once and found


@pytest.mark.parametrize(
    "args, message",
    [
        (("--poll", "1"), "--poll only applies with --follow"),
        (("--follow", "--data-major"), "--data-major groups checkpoints"),
        (("--follow", "--poll", "0"), "0.0 is not in the range x>0"),
        (("--logdir", "a", "--tensorboard", "b"), "--tensorboard is another name for --logdir"),
    ],
)
def test_follow_options_given_wrong_are_usage_errors(run_copy, args, message):
    result = _invoke("replay", run_copy, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_replay_without_follow_still_needs_the_run_folder(tmp_path):
    result = _invoke("replay", tmp_path / "nowhere")
    assert result.exit_code == 2
    assert "does not exist (with --follow it may not exist yet)" in result.output


@pytest.mark.parametrize("poll", [0, -1, "2"])
def test_follow_refuses_a_poll_that_is_not_positive_seconds(tmp_path, poll):
    with pytest.raises(ValueError, match="poll must be a positive number of seconds"):
        follow(tmp_path, poll=poll)


@pytest.mark.backend
def test_sharing_device_memory_changes_nothing_without_a_gpu(monkeypatch):
    monkeypatch.delenv(PREALLOCATE, raising=False)  # restored after the test
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        share_device_memory()  # the devices of this process are started: no GPU, no warning
    if os.environ.get("KERAS_BACKEND") == "jax":
        assert os.environ[PREALLOCATE] == "false"
