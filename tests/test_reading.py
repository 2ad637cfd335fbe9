"""Reader processes: checkpoints read beside the device's thread, into the caller's arrays."""

from __future__ import annotations

import array
import fcntl
import json
import os
import signal
import sys
import termios
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from trueloss_replay import engine
from trueloss_replay.errors import (
    CheckpointMismatchError,
    DataError,
    ReplayIncompleteError,
    RunFormatError,
)
from trueloss_replay.reading import READERS_ENV, Readers, reader_count
from trueloss_replay.run import read_manifest, write_checkpoint
from trueloss_replay.scheduler import replay


def _signature(run_dir: Path) -> list:
    return read_manifest(run_dir)["variables"]


def _arrays(signature) -> list[np.ndarray]:
    return [np.full(shape, np.nan, np.dtype(dtype)) for _, shape, dtype in signature]


def _h5py_values(path: Path, signature) -> list[np.ndarray]:
    """The checkpoint's arrays as h5py reads them, in the signature's order."""
    with h5py.File(path, "r") as f:
        return [f["weights"][key][()] for key, *_ in signature]


def _children() -> set[int]:
    """This process's child processes (Linux)."""
    found = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with open(task / "children") as f:
            found.update(int(pid) for pid in f.read().split())
    return found


linux = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")


@pytest.mark.parametrize("processes", [0, 2])
def test_readers_read_every_checkpoint_as_h5py_does(trained_run, processes):
    signature = _signature(trained_run.path)
    paths = sorted((trained_run.path / "checkpoints").glob("e*.h5"))
    with Readers(processes) as readers:
        jobs = [(path, _arrays(signature)) for path in paths]
        futures = [readers.read_into(path, signature, into) for path, into in jobs]
        for future in futures:
            assert future.result(timeout=60) is None
        deadline = time.monotonic() + 60  # each reader starts on its own thread
        while len(readers.pids) < processes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(readers.pids) == processes
        assert not set(readers.pids) & {os.getpid()}
    for path, into in jobs:
        for got, expected in zip(into, _h5py_values(path, signature), strict=True):
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)


def test_a_readers_error_is_the_reads_own(run_copy):
    signature = _signature(run_copy)
    damaged = run_copy / "checkpoints" / "e0001.h5"
    damaged.write_bytes(b"not HDF5")
    wider = [[key, [n + 1 for n in shape], dtype] for key, shape, dtype in signature]
    with Readers(1) as readers:
        bad = readers.read_into(damaged, signature, _arrays(signature))
        foreign = readers.read_into(run_copy / "checkpoints" / "e0002.h5", wider, _arrays(wider))
        with pytest.raises(RunFormatError, match="e0001.h5") as error:
            bad.result(timeout=60)
        with pytest.raises(CheckpointMismatchError, match="e0002.h5"):
            foreign.result(timeout=60)
    assert error.value.checkpoint == "e0001.h5" and error.value.path == damaged


@linux
def test_a_reader_that_dies_fails_its_checkpoint_only(run_copy):
    """A reader killed in the middle of a read (stopped, then killed once the request is in
    its pipe) fails that checkpoint with a message that names it; the next read starts a
    new reader."""
    signature = _signature(run_copy)
    path = run_copy / "checkpoints" / "e0002.h5"
    readers = Readers(1)
    try:
        deadline = time.monotonic() + 60
        while not readers.pids:
            assert time.monotonic() < deadline, "the reader never started"
            time.sleep(0.01)
        (pid,) = readers.pids
        os.kill(pid, signal.SIGSTOP)
        stuck = readers.read_into(path, signature, _arrays(signature))
        waiting = array.array("i", [0])
        while not waiting[0]:  # bytes in the stopped reader's stdin: the request was sent
            assert time.monotonic() < deadline, "the request was never sent"
            fcntl.ioctl(readers._workers[0].process.stdin.fileno(), termios.FIONREAD, waiting)
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(RunFormatError, match=r"e0002\.h5: the reader process") as error:
            stuck.result(timeout=60)
        into = _arrays(signature)
        assert readers.read_into(path, signature, into).result(timeout=60) is None
        assert readers.pids and pid not in readers.pids
    finally:
        readers.close(kill=True)
    assert error.value.checkpoint == "e0002.h5"
    assert "Delete it or replay the others with epochs=" in str(error.value)
    np.testing.assert_array_equal(into[0], _h5py_values(path, signature)[0])


def test_arrays_a_pipe_cannot_carry_are_read_in_this_process(trained_run):
    """Big-endian arrays (bfloat16 likewise): read here, converted, as the checked read does."""
    signature = _signature(trained_run.path)
    path = trained_run.path / "checkpoints" / "e0002.h5"
    into = [np.full(shape, np.nan, ">f4") for _, shape, _ in signature]
    with Readers(1) as readers:
        assert readers.read_into(path, signature, into).result(timeout=60) is None
    for got, expected in zip(into, _h5py_values(path, signature), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_more_arrays_than_one_system_call_takes(tmp_path):
    """A checkpoint of 1,100 variables: more buffers than one readv or writev accepts."""
    rng = np.random.default_rng(0)
    weights = [
        (f"layer_{i}/kernel", rng.normal(size=(i % 5 + 1,)).astype("float32")) for i in range(1100)
    ]
    path = tmp_path / "e0001.h5"
    write_checkpoint(path, weights, epoch=1, step=1, time=0.0)
    signature = [[key, list(value.shape), "float32"] for key, value in weights]
    into = _arrays(signature)
    with Readers(1) as readers:
        assert readers.read_into(path, signature, into).result(timeout=120) is None
    for got, (_, expected) in zip(into, weights, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_readers_that_cannot_start_leave_reading_to_this_thread(trained_run, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(Path(__file__).parent / "no-such-python"))
    signature = _signature(trained_run.path)
    path = trained_run.path / "checkpoints" / "e0002.h5"
    into = _arrays(signature)
    with pytest.warns(UserWarning, match="a reader process could not start .*no-such-python"):
        with Readers(2) as readers:
            assert readers.read_into(path, signature, into).result(timeout=60) is None
            assert readers.pids == []
    np.testing.assert_array_equal(into[-1], _h5py_values(path, signature)[-1])


@pytest.mark.parametrize(
    ("value", "expected"), [("0", 0), ("3", 3), (" 2 ", 2), ("", None), (None, None)]
)
def test_reader_count_comes_from_the_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(READERS_ENV, raising=False)
    else:
        monkeypatch.setenv(READERS_ENV, value)
    assert reader_count() == (0 if expected is None else expected)


@pytest.mark.parametrize("value", ["two", "-1", "1.5"])
def test_a_reader_count_that_is_not_one_says_so(monkeypatch, value):
    monkeypatch.setenv(READERS_ENV, value)
    with pytest.raises(DataError, match=f"{READERS_ENV}='{value}' is not a number") as error:
        reader_count()
    assert error.value.usage


def _figures(folder: Path) -> dict[str, dict]:
    return {
        p.stem: {k: v for k, v in json.loads(p.read_text()).items() if k in ("train", "val")}
        for p in sorted(folder.glob("e*.json"))
    }


@linux
@pytest.mark.backend
def test_replay_on_reader_processes_gives_the_same_figures(run_copy, tmp_path, monkeypatch):
    """Groups of 2 over 4 checkpoints, one of them damaged: the same figures as reading on
    the replay's thread, the damaged one reported, and no reader process left behind."""
    monkeypatch.setattr(engine, "STACK_MAX", 2)
    before = _children()
    monkeypatch.setenv(READERS_ENV, "0")
    replay(run_copy, output=tmp_path / "thread")
    (run_copy / "checkpoints" / "e0001.h5").write_bytes(b"not HDF5")
    monkeypatch.setenv(READERS_ENV, "2")
    used = []  # the reader processes each replay had when it closed them
    close = Readers.close
    monkeypatch.setattr(
        Readers, "close", lambda self, **kw: (used.append(self.pids), close(self, **kw))
    )
    with pytest.raises(ReplayIncompleteError, match="e0001.h5") as error:
        replay(run_copy, output=tmp_path / "processes")

    assert [len(pids) for pids in used] == [2]
    assert list(error.value.failures) == ["e0001.h5"]
    assert "e0001.h5" in error.value.failures["e0001.h5"]
    on_thread, on_processes = _figures(tmp_path / "thread"), _figures(tmp_path / "processes")
    assert sorted(on_processes) == ["e0000", "e0002", "e0003"]
    assert on_processes == {name: on_thread[name] for name in on_processes}
    assert _children() <= before
