"""Shards: several processes replay one run together, each its share (``--shard i/n``)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from trueloss_replay.cli import main
from trueloss_replay.errors import ShardError
from trueloss_replay.scheduler import Shard, parse_shard

from .conftest import replay_command

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# Every job-array variable parse_shard reads, unset for a clean environment.
ARRAY_VARIABLES = (
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_STEP",
    "JOB_COMPLETION_INDEX",
    "TRUELOSS_REPLAY_SHARD_COUNT",
)


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ARRAY_VARIABLES}
    env.update(PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", **extra)
    return env


def invoke(*args, env: dict | None = None):
    clean = dict.fromkeys(ARRAY_VARIABLES)  # None unsets: the test's own shell may be a job
    return CliRunner().invoke(main, [str(a) for a in args], env={**clean, **(env or {})})


def checkpoint_names(run_dir: Path) -> list[str]:
    """The run's checkpoints in training order, read from the folder, not from the library."""
    names = sorted(p.stem for p in (run_dir / "checkpoints").glob("e*.h5"))
    assert len(names) == 4, names  # the shared fixture: initial weights and 3 epochs
    return names


def share(names: list[str], index: int, count: int) -> list[str]:
    return [name for position, name in enumerate(names) if position % count == index]


def shard_line(output: str, shard: str) -> tuple[list[str], list[str]]:
    """The checkpoints a shard's output says it evaluated and reused."""
    match = re.search(rf"^shard {shard}: evaluated (.*?); reused (.*?)\. ", output, re.M)
    assert match, output
    return tuple([n for n in part.split(", ") if n != "none"] for part in match.groups())


def results_of(run_dir: Path) -> dict[str, dict]:
    folder = run_dir / "replay" / "results"
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("e*.json")}


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "spec, environ, expected",
    [
        ("0/1", {}, (0, 1)),
        ("2/3", {}, (2, 3)),
        (" 1 / 4 ", {}, (1, 4)),
        ((1, 2), {}, (1, 2)),
        # Slurm --array=0-3
        ("auto", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}, (3, 4)),
        # Slurm --array=1-4: ids from 1
        (
            "auto",
            {
                "SLURM_ARRAY_TASK_ID": "1",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_COUNT": "4",
            },
            (0, 4),
        ),
        # Slurm --array=10-16:2 (ids 10, 12, 14, 16)
        (
            "auto",
            {
                "SLURM_ARRAY_TASK_ID": "14",
                "SLURM_ARRAY_TASK_MIN": "10",
                "SLURM_ARRAY_TASK_STEP": "2",
                "SLURM_ARRAY_TASK_COUNT": "4",
            },
            (2, 4),
        ),
        ("auto/3", {"JOB_COMPLETION_INDEX": "2"}, (2, 3)),
        ("auto", {"JOB_COMPLETION_INDEX": "0", "TRUELOSS_REPLAY_SHARD_COUNT": "5"}, (0, 5)),
    ],
)
def test_parse_shard(spec, environ, expected):
    assert parse_shard(spec, environ) == Shard(*expected)


@pytest.mark.parametrize(
    "spec, environ, message",
    [
        ("3/3", {}, "shard=3/3 is out of range: the index counts from 0 to n-1"),
        ("1/0", {}, "shard=1/0 is out of range"),
        ("-1/3", {}, "shard='-1/3' is not a shard; give i/n"),
        ("1", {}, "shard='1' is not a shard; give i/n"),
        ("a/b", {}, "shard='a/b' is not a shard"),
        ("auto", {}, "set SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT"),
        ("auto", {}, "or JOB_COMPLETION_INDEX (a Kubernetes Indexed Job sets it)"),
        (
            "auto",
            {"JOB_COMPLETION_INDEX": "1"},
            "give shard='auto/N' or set TRUELOSS_REPLAY_SHARD_COUNT",
        ),
        ("auto/2", {"JOB_COMPLETION_INDEX": "2"}, "JOB_COMPLETION_INDEX=2 is not below the count"),
        ("auto", {"SLURM_ARRAY_TASK_ID": "1"}, "but not SLURM_ARRAY_TASK_COUNT"),
        (
            "auto/3",
            {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4"},
            "says 3 shards but SLURM_ARRAY_TASK_COUNT=4",
        ),
        (
            # --array=1,5,9: a list, not a range; id 9 is no position in 3 tasks
            "auto",
            {
                "SLURM_ARRAY_TASK_ID": "9",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_COUNT": "3",
            },
            "is not one of a contiguous array",
        ),
        ("auto", {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"}, "is not an integer"),
    ],
)
def test_parse_shard_refuses(spec, environ, message):
    with pytest.raises(ShardError, match=re.escape(message)) as caught:
        parse_shard(spec, environ)
    assert caught.value.usage and caught.value.argument == "shard"
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shard", "3/3"], "Invalid value for '--shard': --shard 3/3 is out of range"),
        (["--shard", "auto"], "--shard 'auto' found no job-array index: set SLURM_ARRAY_TASK_ID"),
        (["--shard", "0/2", "--follow"], "--shard splits the checkpoints that are there"),
    ],
)
def test_replay_shard_usage_errors(trained_run, tmp_path, args, message):
    result = invoke("replay", trained_run.path, "--results", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- processes


def start_shard(run_dir: Path, shard: str) -> subprocess.Popen:
    return subprocess.Popen(
        replay_command(run_dir, "--shard", shard),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_three_shard_processes_evaluate_every_checkpoint_once(run_copy, replay_results):
    names = checkpoint_names(run_copy)
    processes = {f"{i}/3": start_shard(run_copy, f"{i}/3") for i in range(3)}  # all at once
    outputs = {shard: p.communicate(timeout=300)[0] for shard, p in processes.items()}
    for shard, p in processes.items():
        assert p.returncode == 0, outputs[shard]

    evaluated = []
    for i in range(3):
        done, reused = shard_line(outputs[f"{i}/3"], f"{i}/3")
        assert done == share(names, i, 3) and reused == []
        evaluated += done
    assert sorted(evaluated) == names  # every checkpoint, each by exactly one process
    results = results_of(run_copy)
    assert sorted(results) == names
    assert len({r["evaluated"] for r in results.values()}) == len(names)

    # The exports were rewritten last by whichever shard finished last, from every result.
    with open(run_copy / "replay" / "history.csv", newline="") as f:
        rows = {row["checkpoint"]: row for row in csv.DictReader(f)}
    assert sorted(Path(n).stem for n in rows) == names
    for name in names:
        expected = replay_results[f"{name}.h5"]["train"]["loss"]  # Keras' own evaluate
        assert float(rows[f"{name}.h5"]["loss"]) == pytest.approx(expected, rel=1e-4)
    exported = json.loads((run_copy / "replay" / "history.json").read_text())
    assert len(exported["history"]["loss"]) == 3
    assert all(v is not None and math.isfinite(v) for v in exported["history"]["loss"])
    assert all(v is not None for v in exported["history"]["val_loss"])


KILLED_AFTER_ONE = """
import os, signal, sys
from trueloss_replay.progress import ProgressHooks
from trueloss_replay.scheduler import replay

class KillAfterOne(ProgressHooks):
    # kill -9 right after the shard's first result is on disk: no chance to clean up.
    def checkpoint_done(self, result, reused):
        os.kill(os.getpid(), signal.SIGKILL)

replay(sys.argv[1], shard="0/2", progress=KillAfterOne())
"""


def test_a_killed_shard_rerun_completes_only_its_own_share(run_copy):
    names = checkpoint_names(run_copy)
    mine, theirs = share(names, 0, 2), share(names, 1, 2)
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_ONE, str(run_copy)], env=_env(), timeout=300
    )
    assert proc.returncode == -signal.SIGKILL
    before = results_of(run_copy)
    assert sorted(before) == mine[:1]

    result = invoke("replay", run_copy, "--no-progress", "--shard", "0/2")
    assert result.exit_code == 0, result.output
    assert shard_line(result.output, "0/2") == (mine[1:], mine[:1])
    after = results_of(run_copy)
    assert sorted(after) == mine  # the other shard's checkpoints are left to it
    assert after[mine[0]]["evaluated"] == before[mine[0]]["evaluated"]
    missing = ", ".join(theirs)
    assert f"2 of 4 checkpoints replayed; missing: {missing}" in result.output

    # The other shard, run later, leaves complete exports.
    result = invoke("replay", run_copy, "--no-progress", "--shard", "1/2")
    assert result.exit_code == 0, result.output
    assert shard_line(result.output, "1/2") == (theirs, [])
    assert "4 of 4 checkpoints replayed." in result.output
    exported = json.loads((run_copy / "replay" / "history.json").read_text())
    assert None not in exported["history"]["loss"]


@pytest.mark.parametrize(
    "spec, env, shard",
    [
        # sbatch --array=1-3: task 2 is the second of three
        (
            "auto",
            {
                "SLURM_ARRAY_TASK_ID": "2",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_COUNT": "3",
            },
            (1, 3),
        ),
        ("auto/3", {"JOB_COMPLETION_INDEX": "2"}, (2, 3)),
        ("auto", {"JOB_COMPLETION_INDEX": "0", "TRUELOSS_REPLAY_SHARD_COUNT": "3"}, (0, 3)),
    ],
)
def test_shard_auto_reads_the_job_array(run_copy, spec, env, shard):
    names = checkpoint_names(run_copy)
    result = invoke("replay", run_copy, "--no-progress", "--shard", spec, env=env)
    assert result.exit_code == 0, result.output
    expected = share(names, *shard)
    assert shard_line(result.output, f"{shard[0]}/{shard[1]}") == (expected, [])
    assert sorted(results_of(run_copy)) == expected


# --------------------------------------------------------------------------- history


def test_history_names_the_checkpoints_still_missing(replayed_run):
    names = checkpoint_names(replayed_run)
    result = invoke("history", replayed_run)
    assert result.exit_code == 0, result.output
    assert "4 of 4 checkpoints replayed." in result.output

    for name in (names[1], names[3]):
        (replayed_run / "replay" / "results" / f"{name}.json").unlink()
    result = invoke("history", replayed_run)
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last == f"2 of 4 checkpoints replayed; missing: {names[1]}, {names[3]}"


# --------------------------------------------------------------------------- examples


def example_commands(path: Path) -> list[list[str]]:
    """The ``trueloss-replay replay ...`` command lines of an example file."""
    text = path.read_text().replace("\\\n", " ")
    lines = [line.strip().strip("\"'-[], ") for line in text.splitlines()]
    return [shlex.split(line)[2:] for line in lines if line.startswith("trueloss-replay replay ")]


@pytest.mark.parametrize(
    "name, env, shard",
    [
        (
            "slurm_replay.sbatch",
            {
                "SLURM_ARRAY_TASK_ID": "3",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_COUNT": "8",
            },
            Shard(3, 8),
        ),
        ("k8s_replay_job.yaml", {"JOB_COMPLETION_INDEX": "3"}, None),
    ],
)
def test_example_job_arrays_run_replay_with_shard_auto(name, env, shard, monkeypatch):
    commands = example_commands(EXAMPLES / name)
    assert commands, f"{name} runs no `trueloss-replay replay` command"
    for variable in ARRAY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    for args in commands:
        assert "--shard" in args and args[args.index("--shard") + 1].startswith("auto")
        # Click parses the command line and runs the --shard callback with these variables.
        args = [a if not a.startswith("$") else "run" for a in args]
        context = main.commands["replay"].make_context("replay", args)
        if shard is not None:
            assert context.params["shard"] == shard
        else:
            assert context.params["shard"].index == 3
