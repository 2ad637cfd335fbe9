"""scripts/bench.py runs end to end on tiny settings (a smoke test: nothing here is timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "args",
    [
        ["callback", "--examples", "800", "--epochs", "2", "--reps", "1"],
        ["replay", "--examples", "800", "--k", "2", "--reps", "1", "--no-profile"],
        ["datamajor", "--examples", "800", "--k", "2", "--reps", "1", "--delay", "0.001"],
    ],
    ids=["callback", "replay", "datamajor"],
)
def test_bench_subcommand_runs_and_writes_json(args, tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| variant" in done.stdout or "| mode" in done.stdout
    assert json.loads(out.read_text())
