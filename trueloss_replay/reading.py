"""Reading checkpoints on reader processes, beside the thread that drives the device.

h5py holds Python's GIL while HDF5 opens a file and walks its metadata: most of the
millisecond a small model's checkpoint takes to read. On a GPU that evaluates such a
checkpoint in about as long, a reader *thread* takes turns with the thread that drives the
device, and several GPUs share one GIL. So replay can read on reader *processes*.

A reader is started as ``python -m trueloss_replay.reading``: it imports h5py and numpy, and
no user code (``multiprocessing``'s spawn would run the caller's main module again, and with
it a script's training). One thread here per reader sends it a request (the file, the model's
signature, the arrays' shapes) on its stdin; the reader reads with ``run.read_weights_into``
(the same checks, the same errors, which come back pickled) and writes the arrays' bytes to
its stdout, which this process reads straight into the caller's arrays (a stacked buffer's
slot). Those reads are system calls that let go of the GIL. Pipes rather than shared memory:
nothing to clean up after a crash, no ``/dev/shm`` to fill (64 MiB in a default Docker
container), at the cost of one more copy on a core that is otherwise idle.

Where a reader cannot start, replay reads on its own thread, as without readers, and says so
once. A reader that dies while it reads (a file that crashes HDF5) fails that checkpoint
only; the next read starts a new reader.
"""

from __future__ import annotations

import contextlib
import os
import pickle
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

#: Reader processes per replay: an integer >= 0; 0 reads on the replay's own thread.
READERS_ENV = "TRUELOSS_REPLAY_READERS"
#: The default is one reader process per 4 CPU cores, at most this many: 4 on a 16-core GPU
#: host; none on 2 cores, where a reader would compete with the device's thread for them.
MAX_READERS = 4

_HEADER = struct.Struct("!Q")
_READY = b"trueloss-replay reader ready\n"
_F_SETPIPE_SZ = 1031  # Linux: a pipe of 1 MiB, so a checkpoint's bytes flow in few reads
_PIPE_BYTES = 1 << 20


def reader_count() -> int:
    """Reader processes a replay starts: ``TRUELOSS_REPLAY_READERS`` when set, else one per
    4 CPU cores, at most ``MAX_READERS``.

    Raises:
        DataError: the variable holds something other than an integer >= 0.
    """
    value = os.environ.get(READERS_ENV, "").strip()
    if not value:
        return min(MAX_READERS, (os.cpu_count() or 1) // 4)
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

    def close(self) -> None:
        """Waits for the reads started, then stops the reader processes."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        for worker in self._workers:
            worker.stop()

    def __enter__(self) -> Readers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
                    "checkpoints on the replay's own thread.",
                    stacklevel=2,
                )
            return None
        self._local.worker = worker
        with self._lock:
            self._workers.append(worker)
        return worker

    def _read(self, path: Path, signature: list, into: Sequence[np.ndarray]) -> None:
        worker = self._worker()
        if worker is None or not all(a.flags.c_contiguous for a in into):
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
                hint="Delete it or replay the others with epochs=.",
            ) from None
        if error is not None:
            raise error


class _ReaderStopped(Exception):
    """A reader process did not start, or stopped while it read."""


class _Worker:
    """One reader process and its pipes, used by one thread."""

    def __init__(self, process: subprocess.Popen):
        self.process = process

    @classmethod
    def start(cls) -> _Worker:
        # The reader imports this package from where this process imported it.
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "trueloss_replay.reading"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,  # Ctrl-C is for the replay to handle, not its readers
            )
        except OSError as e:
            raise _ReaderStopped(f"{sys.executable}: {e}") from None
        worker = cls(process)
        with contextlib.suppress(OSError, AttributeError):
            import fcntl

            fcntl.fcntl(process.stdout.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)
        if process.stdout.readline() != _READY:
            worker.stop()
            lines = process.stderr.read().decode(errors="replace").strip().splitlines()
            raise _ReaderStopped(lines[-1] if lines else f"exit status {process.returncode}")
        # What it writes to stderr from now on (HDF5's diagnostics) is not read: let it go.
        threading.Thread(target=_drain, args=(process.stderr,), daemon=True).start()
        return worker

    def read(self, request: bytes, into: Sequence[np.ndarray]) -> BaseException | None:
        """Sends a request; the arrays' bytes go into ``into``. Returns the read's error."""
        try:
            self.process.stdin.write(_HEADER.pack(len(request)) + request)
            self.process.stdin.flush()
            error = pickle.loads(_receive(self.process.stdout))
            if error is None:
                for array in into:
                    if array.nbytes:
                        view = memoryview(array).cast("B")
                        if self.process.stdout.readinto(view) != array.nbytes:
                            raise EOFError("the reader closed its pipe")
            return error
        except (OSError, EOFError, pickle.UnpicklingError) as e:
            self.stop()
            code = self.process.returncode
            raise _ReaderStopped(
                f"exit status {code}" if code is not None else f"{type(e).__name__}: {e}"
            ) from None

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()  # the reader's cue to exit
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _drain(stream: BinaryIO) -> None:
    with contextlib.suppress(OSError, ValueError):
        while stream.read(65536):
            pass


def _receive(stream: BinaryIO) -> bytes:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("the reader closed its pipe")
    (size,) = _HEADER.unpack(header)
    payload = stream.read(size)
    if len(payload) < size:
        raise EOFError("the reader closed its pipe")
    return payload


# --------------------------------------------------------------------------- the reader


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """The reader's loop, one request per checkpoint, until ``requests`` closes: the reply
    is the pickled error (None), then the arrays' bytes."""
    arrays: dict[Any, list[np.ndarray]] = {}  # reused from one checkpoint to the next
    while True:
        try:
            request = _receive(requests)
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
            error: BaseException | None = None
        except Exception as e:  # noqa: BLE001 - the replay raises it where it asked
            error = e
        try:
            payload = pickle.dumps(error, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 - an error that does not pickle: its text
            payload = pickle.dumps(RunFormatError(f"{type(error).__name__}: {error}"))
        replies.write(_HEADER.pack(len(payload)) + payload)
        if error is None:
            for array in into:
                if array.nbytes:
                    replies.write(memoryview(array).cast("B"))
        replies.flush()


def main() -> None:
    # The pipe to the replay carries only replies; a stray print goes to stderr.
    replies = sys.stdout.buffer
    sys.stdout = sys.stderr
    replies.write(_READY)
    replies.flush()
    serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
