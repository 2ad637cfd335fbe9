"""scripts/bench.py runs end to end on tiny settings (a smoke test: nothing here is timed).

Under ``--backend jax`` the script runs with TensorFlow made unimportable, as on the GPU
machines that measure the JAX figures, where TensorFlow is not installed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench.py"

# Runs the script with every `import tensorflow` failing as it does where TF is absent.
WITHOUT_TENSORFLOW = """
import importlib.abc, runpy, sys

class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTensorFlow())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# Every variant runs once; the other runs skip what one already covered (the suite's time).
REPLAY_MLP = ["replay", "--examples", "400", "--k", "2", "--reps", "1"]
REPLAY_CNN = ["replay", "--workload", "cnn", "--examples", "64", "--batch-size", "32"]
REPLAY_CNN += ["--k", "2", "--reps", "1", "--skip", "naive", "--skip", "reused"]
REPLAY_CNN += ["--stack-max", "3"]  # 2K = 4 checkpoints: groups of 2
CALLBACK = ["callback", "--examples", "400", "--epochs", "2", "--reps", "1"]
SAMPLE = ["sample", "--examples", "400", "--k", "2", "--reps", "1", "--train-sample", "100"]
DATAMAJOR = ["datamajor", "--examples", "400", "--k", "2", "--reps", "1", "--delay", "0.001"]
READ = ["read", "--k", "4", "--reps", "1", "--readers", "1", "--work-ms", "0.2"]
WITHOUT_NAIVE = ["--skip", "naive"]
ONLY_REPLAY_CHECKPOINT = ["--variant", "ReplayCheckpoint"]

# Figures each benchmark's JSON must hold, as key paths; every one a positive number, except
# those in MAY_BE_NOISE: replay's steady cost is (wall of 2K - wall of K) / K, which on these
# tiny settings is within the noise of the one-time compilation and can come out negative.
MAY_BE_NOISE = {
    ("summary", "replay_steady_over_floor"),
    ("summary", "per_checkpoint", "replay", "steady"),
    ("summary", "replay_steady_over_stacked_programs"),
}
FIGURES = {
    "replay": [
        ("summary", "replay_steady_over_floor"),
        ("summary", "replay_incl_setup_over_floor"),
        ("summary", "replay_k_over_k_times_one"),
        ("summary", "per_checkpoint", "replay", "steady"),
        ("summary", "per_checkpoint", "replay", "incl_setup"),
        ("summary", "per_checkpoint", "floor", "steady"),
        ("summary", "per_checkpoint", "per-batch floor", "steady"),
        ("summary", "per_checkpoint", "stacked programs", "steady"),
        ("summary", "replay_steady_over_stacked_programs"),
        ("summary", "memory", "replay K", "tracemalloc_peak_bytes"),
        ("summary", "memory", "replay 1", "checkpoints_alive_peak"),
    ],
    "callback": [
        ("summary", "none", "s_per_epoch_median"),
        ("summary", "ReplayCheckpoint", "ratio_median"),
        ("summary", "ReplayCheckpoint", "cpu_ratio_median"),
    ],
    "datamajor": [("median", "checkpoint-major"), ("median", "data-major")],
    "read": [
        ("median", "read alone"),
        ("median", "read alone, HDF5"),
        ("median", "work alone"),
        ("median", "thread, HDF5"),
        ("median", "thread"),
        ("median", "1 processes"),
        ("median_cpu", "1 processes"),
    ],
    "sample": [
        ("summary", "speedup"),
        ("summary", "steady_speedup"),
        ("summary", "loss_se_median"),
    ],
}


def _run_bench(backend: str, args: list[str], out: Path) -> subprocess.CompletedProcess:
    command = [str(BENCH), "--backend", backend, *args, "--json", str(out)]
    if backend == "jax":
        command = ["-c", WITHOUT_TENSORFLOW, *command]
    return subprocess.run(
        [sys.executable, *command],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=600,
    )


def _lookup(payload: dict, path: tuple[str, ...]):
    for key in path:
        payload = payload[key]
    return payload


@pytest.mark.parametrize(
    ("backend", "args"),
    [
        pytest.param("tensorflow", REPLAY_MLP, id="replay-mlp-tensorflow"),
        pytest.param("jax", REPLAY_MLP + WITHOUT_NAIVE, id="replay-mlp-jax"),
        pytest.param("jax", REPLAY_CNN, id="replay-cnn-jax"),
        pytest.param("jax", CALLBACK + ONLY_REPLAY_CHECKPOINT, id="callback-jax"),
        pytest.param("tensorflow", DATAMAJOR, id="datamajor-tensorflow"),
        pytest.param("tensorflow", SAMPLE, id="sample-tensorflow"),
        pytest.param("jax", READ, id="read-jax"),
    ],
)
def test_bench_subcommand_runs_and_writes_json(backend, args, tmp_path):
    out = tmp_path / "bench.json"
    done = _run_bench(backend, args, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert any(f"| {h}" in done.stdout for h in ("variant", "mode", "replay"))
    payload = json.loads(out.read_text())
    machine = payload["machine"]
    assert machine["backend"] == backend
    assert machine["backend_version"] and machine["keras"]
    assert machine["devices"] and machine["device_kind"]
    for path in FIGURES[args[0]]:
        value = _lookup(payload, path)
        assert isinstance(value, (int, float)) and math.isfinite(value), (path, value)
        assert value > 0 or path in MAY_BE_NOISE, (path, value)
    if args[0] == "replay":
        skipped = {args[i + 1] for i, arg in enumerate(args) if arg == "--skip"}
        assert sorted(skipped) == payload["config"]["skipped"]
        assert {"replay K", "floor"} <= set(payload["raw"])
        assert not skipped & set(payload["raw"])
        assert ("naive_over_replay_incl_setup" in payload["summary"]) == ("naive" not in skipped)
        # Replay's programs alone take the groups replay makes: of 2K, at most --stack-max.
        limit = int(args[args.index("--stack-max") + 1]) if "--stack-max" in args else 8
        assert payload["config"]["stack_max"] == limit
        k = int(args[args.index("--k") + 1])
        assert payload["config"]["stacked_group"] == -(-2 * k // -(-2 * k // limit))
        assert max(payload["raw"]["replay 2K"][0]["stacked"]) == payload["config"]["stacked_group"]
