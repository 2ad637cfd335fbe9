"""Replay across processes: resume after kill -9, and several (logical) devices."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trueloss_replay.scheduler import replay

pytestmark = pytest.mark.backend

ROOT = Path(__file__).resolve().parents[1]

SLOW_FACTORY = """
import time
import keras
from trueloss_replay.data import load_arrays

class Slow(keras.utils.PyDataset):
    # A slow input pipeline: each batch takes a while, as a decoding tf.data map would.
    def __init__(self, path, delay):
        super().__init__()
        self.x, self.y, _ = load_arrays(path)
        self.delay = delay

    def __len__(self):
        return -(-len(self.x) // 20)

    def __getitem__(self, i):
        time.sleep(self.delay)
        part = slice(i * 20, (i + 1) * 20)
        return self.x[part], self.y[part]

def load():
    import os
    run, delay = os.environ["RUN"], float(os.environ["DELAY"])
    return Slow(run + "/data/train.h5", delay), Slow(run + "/data/val.h5", delay)
"""


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    env.update(extra)
    return env


KILLED_AFTER_TWO = """
import os, signal, sys
from trueloss_replay.scheduler import replay

class KillAfterTwo:
    # kill -9 right after the second result is on disk: no chance to clean up.
    done = 0
    def start(self, *args): pass
    def advance(self, examples, batches=1): pass
    def checkpoint_failed(self, name, reason): pass
    def checkpoint_done(self, result, reused):
        self.done += 1
        if self.done == 2:
            os.kill(os.getpid(), signal.SIGKILL)

replay(sys.argv[1], data="slowdata:load", progress=KillAfterTwo())
"""


def test_interrupted_replay_resumes_without_recomputing(run_copy, tmp_path, monkeypatch):
    (tmp_path / "slowdata.py").write_text(SLOW_FACTORY)
    results = run_copy / "replay" / "results"
    env = _env(RUN=str(run_copy), DELAY="0")
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_TWO, str(run_copy)], cwd=tmp_path, env=env, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL
    done = {p.name: json.loads(p.read_text())["evaluated"] for p in results.glob("e*.json")}
    assert sorted(done) == ["e0000.json", "e0001.json"]
    assert not [p for p in results.iterdir() if p.name.startswith(".")], "temporary file left"

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUN", str(run_copy))
    monkeypatch.setenv("DELAY", "0")
    history = replay(run_copy, data="slowdata:load")
    after = {p.name: json.loads(p.read_text())["evaluated"] for p in results.glob("e*.json")}
    assert sorted(after) == ["e0000.json", "e0001.json", "e0002.json", "e0003.json"]
    for name, stamp in done.items():
        assert after[name] == stamp, f"{name} was evaluated again"
    assert len(history.history["loss"]) == 3


MULTI_DEVICE = """
import sys
import keras
if keras.backend.backend() == "tensorflow":
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from trueloss_replay.backends import resolve_devices
from trueloss_replay.scheduler import replay
run, out = sys.argv[1], sys.argv[2]
cpus = resolve_devices("cpu")
assert len(cpus) == 2, cpus
replay(run, devices=cpus, output=out + "/two", batch_size=50)
replay(run, devices=cpus[:1], output=out + "/one", batch_size=50)
"""


def test_two_logical_devices_give_the_same_figures_as_one(trained_run, tmp_path):
    subprocess.run(
        [sys.executable, "-c", MULTI_DEVICE, str(trained_run.path), str(tmp_path)],
        # JAX makes its logical CPU devices from this flag; TensorFlow from the script.
        env={**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        check=True,
        timeout=300,
    )
    one = {p.name: json.loads(p.read_text()) for p in (tmp_path / "one").glob("e*.json")}
    two = {p.name: json.loads(p.read_text()) for p in (tmp_path / "two").glob("e*.json")}
    assert sorted(one) == sorted(two) and len(one) == 4
    # Each device takes its first checkpoints before either reads ahead: 2 each, whichever
    # worker thread happens to start first (one used to read ahead the other's share).
    devices = [r["device"] for r in two.values()]
    assert sorted(devices.count(d) for d in set(devices)) == [2, 2], devices
    for name in one:
        for split in ("train", "val"):
            for key, value in one[name][split].items():
                np.testing.assert_allclose(two[name][split][key], value, rtol=1e-6)
