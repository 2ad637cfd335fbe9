"""Run folders survive the training process dying: SIGKILL at random moments, exceptions."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trueloss_replay import Run
from trueloss_replay.run import read_manifest, read_weights

from .trainer_subprocess import (
    CRASH_FEATURES,
    CRASH_LAYERS,
    CRASH_MODEL_NAME,
    RAISE_AT_EPOCH,
)

pytestmark = pytest.mark.backend

SCRIPT = Path(__file__).with_name("trainer_subprocess.py")
STARTUP_TIMEOUT = 60.0


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes, inputs = {}, CRASH_FEATURES
    for name, units in CRASH_LAYERS:
        shapes[f"{CRASH_MODEL_NAME}/{name}/kernel"] = (inputs, units)
        shapes[f"{CRASH_MODEL_NAME}/{name}/bias"] = (units,)
        inputs = units
    return shapes


def _start(mode: str, run_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), mode, str(run_dir), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(process: subprocess.Popen, condition, what: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not condition():
        if process.poll() is not None:
            pytest.fail(
                f"trainer exited ({process.returncode}) before {what}: {process.stderr.read()}"
            )
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)


def _temporary_checkpoint(folder: Path) -> bool:
    try:
        return any(e.name.startswith(".e") for e in os.scandir(folder))
    except FileNotFoundError:
        return False


# Seeded delays after the first checkpoint appears; "write" kills the moment a temporary
# checkpoint file is seen, i.e. while a checkpoint is being written.
_rng = random.Random(20240607)
MOMENTS = ["write", "write", *(round(_rng.uniform(0.0, 1.5), 3) for _ in range(3))]


@pytest.mark.parametrize("moment", MOMENTS, ids=[f"kill-{m}" for m in MOMENTS])
def test_sigkill_leaves_a_readable_run(tmp_path, moment):
    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints"
    process = _start("crash", run_dir)
    try:
        _wait_for(process, lambda: (folder / "e0000.h5").is_file(), "the first checkpoint")
        if moment == "write":
            # Past e0000, so that the kill lands in the middle of a later write.
            _wait_for(process, lambda: (folder / "e0001.h5").is_file(), "the second checkpoint")
            _wait_for(process, lambda: _temporary_checkpoint(folder), "a checkpoint write")
        else:
            time.sleep(moment)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL

    manifest = read_manifest(run_dir)
    assert manifest["status"] == "running"
    assert manifest["model"] == "model.keras"
    assert (run_dir / "model.keras").is_file()
    checkpoints = Run(run_dir).checkpoints()
    assert checkpoints, "no checkpoint survived"
    assert [c.epoch for c in checkpoints] == list(range(len(checkpoints)))
    expected = _expected_shapes()
    for c in checkpoints:
        assert c.error is None, c.error
        weights = read_weights(c.path)
        assert {k: w.shape for k, w in weights.items()} == expected
    # The manifest never names a checkpoint that is not complete on disk.
    on_disk = {c.name for c in checkpoints}
    assert {c["name"] for c in manifest["checkpoints"]} <= on_disk


@pytest.mark.parametrize("catch", [False, True], ids=["uncaught", "caught"])
def test_exception_in_fit_marks_the_run_failed(tmp_path, catch):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "raise", str(run_dir), *(["--catch"] if catch else [])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if catch:
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"caught: boom at epoch {RAISE_AT_EPOCH}" in result.stdout
    else:
        assert result.returncode == 1
        assert f"RuntimeError: boom at epoch {RAISE_AT_EPOCH}" in result.stderr

    manifest = read_manifest(run_dir)
    assert manifest["status"] == "failed"
    names = [c.name for c in Run(run_dir).checkpoints()]
    assert names == [f"e{e:04d}.h5" for e in range(RAISE_AT_EPOCH + 1)]
    assert [c["name"] for c in manifest["checkpoints"]] == names


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def test_a_second_writer_is_refused_until_the_first_dies(tmp_path):
    import keras

    from trueloss_replay import ReplayCheckpoint
    from trueloss_replay.errors import RunLockedError, TruelossReplayError

    from .conftest import build_model, make_data

    run_dir = tmp_path / "run"
    process = _start("hold", run_dir)
    try:
        # The holder blocks after epoch 1: its files stop changing once e0001 is listed.
        _wait_for(
            process,
            lambda: (
                (run_dir / "manifest.json").is_file()
                and len(read_manifest(run_dir)["checkpoints"]) == 2
            ),
            "the holder's second checkpoint",
        )
        before = _files(run_dir)
        x, y = make_data(64)
        model = build_model()
        with pytest.raises(RunLockedError) as caught:
            model.fit(
                x, y, epochs=1, verbose=0, callbacks=[ReplayCheckpoint(run_dir, overwrite=True)]
            )
        assert isinstance(caught.value, TruelossReplayError)
        message = str(caught.value)
        assert "\n" not in message
        assert str(run_dir) in message and "another process" in message
        assert _files(run_dir) == before
        assert process.poll() is None, "the first writer stopped"

        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        process.kill()
        process.wait()
        process.stderr.close()

    # The OS dropped the dead writer's lock: the next writer takes the folder over.
    keras.utils.set_random_seed(1)
    model = build_model()
    model.fit(x, y, epochs=1, verbose=0, callbacks=[ReplayCheckpoint(run_dir, overwrite=True)])
    manifest = read_manifest(run_dir)
    assert manifest["status"] == "finished"
    assert [c.name for c in Run(run_dir).checkpoints()] == ["e0000.h5", "e0001.h5"]
