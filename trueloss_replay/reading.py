"""Reading checkpoints on reader processes, beside the thread that drives the device.

h5py holds Python's GIL while HDF5 opens a file and walks its metadata: most of the
millisecond a small model's checkpoint takes to read, where its folder has no layout
(``run._Layout``: checkpoints of earlier versions, or other writers'; those the callback writes
are read by one, with the GIL for a small part of the time). On a GPU that evaluates such a
checkpoint in about as long, a reader *thread* takes turns with the thread that drives the
device, and several GPUs share one GIL. So replay can read on reader *processes*, as many
as ``TRUELOSS_REPLAY_READERS`` says (none by default: see ``READERS_ENV``).

A reader is started as ``python -c`` with this process's ``sys.path``, and imports this
module, h5py and numpy, and no user code (``multiprocessing``'s spawn would run the caller's
main module again, and with it a script's training). One thread here per reader sends it a
request (the file, the model's signature, the arrays' shapes) on its stdin; the reader reads
with ``run.read_weights_into`` (the same checks, the same errors, which come back pickled)
and writes the arrays' bytes to its stdout, which this process reads straight into the
caller's arrays (a stacked buffer's slot). Those reads are system calls that let go of the
GIL. Pipes rather than shared memory: nothing to clean up after a crash, no ``/dev/shm`` to
fill (64 MiB in a default Docker container), at the cost of one more copy (0.5-0.7 ms of CPU
time per 1.2 MB checkpoint on the 2-core test machine, without the GIL).

Where a reader cannot start, replay reads in its own process, as without readers, and says
so once. A reader that dies while it reads (a file that crashes HDF5) fails that checkpoint
only; the next read starts a new reader.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from trueloss_replay import run as runfmt
from trueloss_replay.errors import DataError, RunFormatError

#: Reader processes per replay: an integer >= 0; 0 (the default) reads on the replay's own
#: thread. Not on by default until a GPU host measures that they win: on 2 CPU cores they
#: do not (the reader and the copy out of its pipe compete with the device's thread for the
#: same cores; ``scripts/bench.py read``), and ``scripts/bench_gpu.sh`` measures replay
#: with 0 and with 4.
READERS_ENV = "TRUELOSS_REPLAY_READERS"

_HEADER = struct.Struct("!Q")
_READY = b"trueloss-replay reader ready\n"
_F_SETPIPE_SZ = 1031  # Linux: a pipe of 1 MiB, so a checkpoint's bytes flow in few reads
_PIPE_BYTES = 1 << 20
#: Seconds a reader may take to start (import h5py and numpy) before it is given up.
_START_SECONDS = 120


def reader_count() -> int:
    """Reader processes a replay starts: ``TRUELOSS_REPLAY_READERS``, 0 when unset.

    Raises:
        DataError: the variable holds something other than an integer >= 0.
    """
    value = os.environ.get(READERS_ENV, "").strip()
    if not value:
        return 0
    try:
        count = int(value)
        if count < 0:
            raise ValueError
    except ValueError:
        raise DataError(
            f"{READERS_ENV}={value!r} is not a number of reader processes; set it to an "
            "integer >= 0 (0 reads checkpoints on the replay's own thread) or unset it.",
            usage=True,
        ) from None
    return count


class Readers:
    """Reads checkpoints into arrays the caller owns: on ``processes`` reader processes, or
    with 0 on the calling thread.

    Example:
        >>> with Readers(2) as readers:
        ...     futures = [readers.read_into(p, signature, arrays) for p, arrays in jobs]
        ...     for future in futures:
        ...         future.result()  # None, or raises the read's error
    """

    def __init__(self, processes: int):
        self.processes = processes
        self._workers: list[_Worker] = []
        self._local = threading.local()
        self._lock = threading.Lock()
        self._cannot_start: str | None = None
        self._executor = (
            ThreadPoolExecutor(processes, thread_name_prefix="trueloss-reader")
            if processes
            else None
        )
        if self._executor is not None:
            # Each thread starts its reader now: they import h5py while the model loads.
            for _ in range(processes):
                self._executor.submit(self._worker)

    def read_into(
        self, path: Path, signature: Sequence[Sequence[Any]], into: Sequence[np.ndarray]
    ) -> Future:
        """Starts reading checkpoint ``path`` into ``into`` (C-contiguous arrays, one per
        signature entry, as ``run.read_weights_into`` takes them).

        Returns:
            A future whose result is None, or whose exception is the read's
            (``RunFormatError``, ``CheckpointMismatchError``).
        """
        if self._executor is None:
            future: Future = Future()
            try:
                runfmt.read_weights_into(path, signature, into)
            except BaseException as e:  # noqa: BLE001 - the caller gets it from the future
                future.set_exception(e)
            else:
                future.set_result(None)
            return future
        return self._executor.submit(self._read, Path(path), [list(s) for s in signature], into)

    def close(self, kill: bool = False) -> None:
        """Waits for the reads started, then stops the reader processes. With ``kill`` (an
        interrupted replay), kills them first: their reads fail at once, and reads not
        started are cancelled."""
        if kill:
            with self._lock:
                workers = list(self._workers)
            for worker in workers:
                worker.process.kill()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=kill)
        for worker in self._workers:
            worker.stop()

    def __enter__(self) -> Readers:
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(kill=kind is not None)

    @property
    def pids(self) -> list[int]:
        """The ids of the reader processes running."""
        with self._lock:
            return [w.process.pid for w in self._workers if w.process.poll() is None]

    # --- on the reader threads

    def _worker(self) -> _Worker | None:
        worker = getattr(self._local, "worker", None)
        if worker is not None and worker.process.poll() is None:
            return worker
        if self._cannot_start is not None:
            return None
        try:
            worker = _Worker.start()
        except _ReaderStopped as e:
            with self._lock:
                first = self._cannot_start is None
                self._cannot_start = str(e)
            if first:
                warnings.warn(
                    f"trueloss-replay: a reader process could not start ({e}); reading "
                    "checkpoints in the replay's own process.",
                    stacklevel=2,
                )
            return None
        self._local.worker = worker
        with self._lock:
            self._workers.append(worker)
        return worker

    def _read(self, path: Path, signature: list, into: Sequence[np.ndarray]) -> None:
        worker = self._worker()
        if worker is None or not all(_sendable(a) for a in into):
            runfmt.read_weights_into(path, signature, into)
            return
        layout = [(a.shape, a.dtype.str) for a in into]
        request = pickle.dumps((str(path), signature, layout), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            error = worker.read(request, into)
        except _ReaderStopped as e:
            self._local.worker = None
            raise RunFormatError(
                f"checkpoint {path}: the reader process reading it stopped ({e}); the file "
                "may be damaged.",
                path=path,
                checkpoint=path.name,
                hint=runfmt.DAMAGED_HINT,
            ) from None
        if error is not None:
            raise error


def _sendable(array: np.ndarray) -> bool:
    """Whether an array's bytes can come through the pipe as they are: C-contiguous, of a
    numpy number type in this machine's byte order (not bfloat16, which ``memoryview``
    cannot export)."""
    dtype = array.dtype
    return array.flags.c_contiguous and dtype.kind in "biuf" and dtype.isnative


class _ReaderStopped(Exception):
    """A reader process did not start, or stopped while it read."""


class _Worker:
    """One reader process and its pipes, used by one thread.

    A reply is 8 bytes (0, or the length of the pickled error that follows), then, after a 0,
    the arrays' bytes: this side reads the 8 bytes and the arrays with one ``readv`` (more
    where the pipe holds less), each a system call without the GIL, so that a busy thread
    that holds it delays a read as little as possible.
    """

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.replies = process.stdout.fileno()
        self.requests = process.stdin.fileno()

    @classmethod
    def start(cls) -> _Worker:
        if getattr(sys, "frozen", False):  # sys.executable is the application itself
            raise _ReaderStopped("a frozen application has no Python to start them with")
        if not hasattr(os, "readv"):
            raise _ReaderStopped("this platform has no readv")
        # The reader imports exactly what this process would: its sys.path, in its order.
        code = f"import sys; sys.path[:] = {sys.path!r}; import {__name__} as r; r.main()"
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", code],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # Ctrl-C is for the replay to handle, not its readers
            )
        except OSError as e:
            raise _ReaderStopped(f"{sys.executable}: {e}") from None
        worker = cls(process)
        with contextlib.suppress(OSError, AttributeError):
            import fcntl

            fcntl.fcntl(worker.replies, _F_SETPIPE_SZ, _PIPE_BYTES)
        ready = bytearray(len(_READY))
        try:
            if not select.select([worker.replies], [], [], _START_SECONDS)[0]:
                raise EOFError(f"no word from it in {_START_SECONDS} s")
            _read_fully(worker.replies, [memoryview(ready)])
        except EOFError as e:
            worker.process.kill()
            worker.stop()
            lines = process.stderr.read().decode(errors="replace").strip().splitlines()
            raise _ReaderStopped(lines[-1] if lines else str(e)) from None
        if ready != _READY:
            worker.stop()
            raise _ReaderStopped(f"it said {bytes(ready)!r}")
        # What it writes to stderr from now on (HDF5's diagnostics) is not read: let it go.
        threading.Thread(target=_drain, args=(process.stderr,), daemon=True).start()
        return worker

    def read(self, request: bytes, into: Sequence[np.ndarray]) -> BaseException | None:
        """Sends a request; the arrays' bytes go into ``into``. Returns the read's error."""
        status = bytearray(_HEADER.size)
        views = [memoryview(status)] + [memoryview(a).cast("B") for a in into if a.nbytes]
        try:
            _write_fully(self.requests, [_HEADER.pack(len(request)), request])
            got = _read_fully(self.replies, views, at_least=_HEADER.size)
            (size,) = _HEADER.unpack(status)
            if size == 0:
                _read_fully(self.replies, views, start=got)
                return None
            # An error: its first bytes went into the arrays (they are not used).
            received = got - _HEADER.size
            if received > size:
                raise EOFError(f"a reply of {received} bytes for an error of {size}")
            payload = b"".join(bytes(v) for v in views[1:])[:received]
            rest = bytearray(size - received)
            _read_fully(self.replies, [memoryview(rest)])
            return pickle.loads(payload + rest)
        except (OSError, EOFError, pickle.UnpicklingError) as e:
            self.stop()
            code = self.process.returncode
            raise _ReaderStopped(
                f"exit status {code}" if code is not None else f"{type(e).__name__}: {e}"
            ) from None
        except BaseException:
            # Anything else (Ctrl-C) leaves a reply in the pipe: this reader is done.
            self.process.kill()
            self.stop()
            raise

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()  # the reader's cue to exit
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(OSError):
            self.process.stdout.close()


def _read_fully(fd: int, views: list[memoryview], start: int = 0, at_least: int | None = None):
    """Reads into the concatenation of ``views`` from byte ``start`` until it is full (or
    holds ``at_least`` bytes); returns the bytes it holds. Raises EOFError at the end of
    the pipe."""
    total = sum(v.nbytes for v in views)
    goal = total if at_least is None else at_least
    done = start
    while done < goal:
        # The views from byte ``done`` on.
        rest, skip = [], done
        for view in views:
            if skip >= view.nbytes:
                skip -= view.nbytes
                continue
            rest.append(view[skip:])
            skip = 0
        n = os.readv(fd, rest[: runfmt.IOV_MAX])
        if n == 0:
            raise EOFError("the reader closed its pipe")
        done += n
    return done


def _write_fully(fd: int, parts: list) -> None:
    views = [memoryview(p).cast("B") for p in parts if len(memoryview(p).cast("B"))]
    while views:
        n = os.writev(fd, views[: runfmt.IOV_MAX])
        while n:
            if n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            else:
                views[0], n = views[0][n:], 0


def _drain(stream: BinaryIO) -> None:
    with contextlib.suppress(OSError, ValueError):
        while stream.read(65536):
            pass


# --------------------------------------------------------------------------- the reader


def serve(requests: int, replies: int) -> None:
    """The reader's loop, one request per checkpoint, until the ``requests`` pipe closes;
    a reply is ``_Worker``'s: 0 and the arrays' bytes, or the pickled error's length and it."""
    arrays: dict[Any, list[np.ndarray]] = {}  # reused from one checkpoint to the next
    while True:
        header = bytearray(_HEADER.size)
        try:
            _read_fully(requests, [memoryview(header)])
            request = bytearray(_HEADER.unpack(header)[0])
            _read_fully(requests, [memoryview(request)])
        except EOFError:
            return
        into: list[np.ndarray] = []
        try:
            path, signature, layout = pickle.loads(request)
            key = tuple((tuple(shape), dtype) for shape, dtype in layout)
            if key not in arrays:
                arrays.clear()
                arrays[key] = [np.empty(shape, np.dtype(dtype)) for shape, dtype in key]
            into = arrays[key]
            runfmt.read_weights_into(Path(path), signature, into)
        except Exception as e:  # noqa: BLE001 - the replay raises it where it asked
            try:
                payload = pickle.dumps(e, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:  # noqa: BLE001 - an error that does not pickle: its text
                payload = pickle.dumps(RunFormatError(f"{type(e).__name__}: {e}"))
            _write_fully(replies, [_HEADER.pack(len(payload)), payload])
            continue
        _write_fully(replies, [_HEADER.pack(0), *into])


def main() -> None:
    # The pipe to the replay carries only replies; a stray print goes to stderr.
    sys.stdout.flush()
    replies = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _write_fully(replies, [_READY])
    serve(sys.stdin.fileno(), replies)


if __name__ == "__main__":
    main()
