"""Property-based fuzzing of the readers: a run folder is untrusted input.

Random mutations of a real run folder (the shared trained run with its replay results): the
manifest and a result file (a field replaced by another JSON value or removed, the bytes
truncated) and a checkpoint (HDF5 attributes, a variable's shape or dtype, a variable
removed, the bytes truncated). Each mutated folder goes through the readers and through
``history`` and ``inspect --verify`` in-process. Every outcome must be success or a
``TruelossReplayError``; anything else is a bug. ``replay()`` runs on fewer damaged copies
(``REPLAY_EXAMPLES``), in-process with one shared model: every outcome is a History whose
replayed epochs hold Keras' own figures, or a ``TruelossReplayError``.

MAX_EXAMPLES = 450 examples of the readers (about 60 s on a 2-core CPU) and REPLAY_EXAMPLES =
20 replays (12-30 s, as loaded as the machine is). Declared shapes of
hundreds of GiB are exercised on their own below, with a bound on the memory the readers
allocate.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import EPOCHS, build_model
from trueloss_replay.cli import main
from trueloss_replay.errors import ReplayIncompleteError, TruelossReplayError
from trueloss_replay.history import load_history
from trueloss_replay.run import Run, list_checkpoints, read_manifest, read_result, read_weights
from trueloss_replay.scheduler import replay

MAX_EXAMPLES = 450

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=8,
)


def _paths(value, prefix=()):
    """Every key path into a JSON document, the root included."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*prefix, index))


def _replace(document, path, new, delete):
    if not path:
        return new
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return document


def _mutate_json(data, path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    if data.draw(st.booleans(), label="truncate"):
        cut = data.draw(st.integers(0, len(text)), label="cut")
        path.write_text(text[:cut], encoding="utf-8")
        return
    document = json.loads(text)
    where = data.draw(st.sampled_from(list(_paths(document))), label="path")
    delete = bool(where) and data.draw(st.booleans(), label="delete")
    new = None if delete else data.draw(json_values, label="value")
    document = _replace(document, where, new, delete)
    path.write_text(json.dumps(document), encoding="utf-8")  # NaN tokens included


_DTYPES = ["float16", "float64", "int8", "uint32", "bool", "complex64", "S4", "O"]


def _mutate_checkpoint(data, path: Path) -> None:
    kind = data.draw(
        st.sampled_from(["truncate", "attribute", "shape", "dtype", "delete"]), label="kind"
    )
    if kind == "truncate":
        raw = path.read_bytes()
        path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1), label="cut")])
        return
    with h5py.File(path, "r+") as f:
        names = []
        f["weights"].visititems(
            lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None
        )
        name = data.draw(st.sampled_from(names), label="variable")
        dataset = f["weights"][name]
        if kind == "attribute":
            target = data.draw(st.sampled_from([f, dataset]), label="target")
            keys = sorted(target.attrs) + ["index", "epoch", "step", "format", "version"]
            key = data.draw(st.sampled_from(keys), label="attribute")
            value = data.draw(
                st.none()
                | st.integers(-(2**63), 2**63 - 1)
                | st.floats()
                | st.text(st.characters(exclude_characters="\x00"), max_size=10)  # HDF5: no NUL
                | st.lists(st.integers(-5, 5), max_size=3),
                label="attribute value",
            )
            if value is None:
                target.attrs.pop(key, None)
            else:
                target.attrs[key] = np.asarray(value) if isinstance(value, list) else value
            return
        attrs = dict(dataset.attrs)
        shape, dtype = dataset.shape, dataset.dtype
        del f["weights"][name]
        if kind == "delete":
            return
        if kind == "shape":
            shape = tuple(data.draw(st.lists(st.integers(0, 2**20), max_size=3), label="shape"))
        else:
            dtype = data.draw(st.sampled_from(_DTYPES), label="dtype")
        dtype = h5py.string_dtype() if dtype == "O" else np.dtype(dtype)
        # Declared, never written: a huge shape costs no bytes in the file.
        created = f["weights"].create_dataset(name, shape=shape, dtype=dtype)
        created.attrs.update(attrs)


def _damaged_copy(data, run_dir: Path, tmp: Path) -> tuple[Path, str, set[str]]:
    """A copy of ``run_dir`` in ``tmp`` with its manifest, a result file or a checkpoint
    damaged; returns the copy, which kind of file, and the checkpoint damaged (if one was)."""
    target = data.draw(st.sampled_from(["manifest", "result", "checkpoint"]), label="target")
    folder = tmp / "run"
    shutil.copytree(run_dir, folder)
    if target == "manifest":
        _mutate_json(data, folder / "manifest.json")
    elif target == "result":
        results = sorted((folder / "replay" / "results").glob("*.json"))
        _mutate_json(data, data.draw(st.sampled_from(results), label="result"))
    else:
        checkpoint = data.draw(st.sampled_from(sorted((folder / "checkpoints").glob("*.h5"))))
        _mutate_checkpoint(data, checkpoint)
        return folder, target, {checkpoint.name}
    return folder, target, set()


def _allowed(call) -> None:
    try:
        call()
    except TruelossReplayError:
        pass


def _check_cli(*args: str) -> None:
    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output, result.output
    if result.exit_code == 1:
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, result.output


def _read_everything(folder: Path) -> None:
    _allowed(lambda: read_manifest(folder))
    try:
        checkpoints = Run(folder).checkpoints()
    except TruelossReplayError:  # the manifest is damaged; the checkpoints may not be
        checkpoints = list_checkpoints(folder / "checkpoints")
    for checkpoint in checkpoints:
        _allowed(lambda c=checkpoint: read_weights(c.path))
    for result in sorted((folder / "replay" / "results").glob("*.json")):
        _allowed(lambda r=result: read_result(r))
    _allowed(lambda: load_history(folder))
    _check_cli("history", str(folder))
    _check_cli("inspect", str(folder), "--verify")


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_damaged_run_folders_fail_only_with_library_errors(replayed_run, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder, _, _ = _damaged_copy(data, replayed_run, Path(tmp))
        _read_everything(folder)


# --------------------------------------------------------------------------- replay in-process

#: Examples of the replay fuzz: each replays a damaged copy of the run in-process (0.3-1.7 s
#: each on a 2-core CPU, with one model and the data shared by all of them).
REPLAY_EXAMPLES = 20


@pytest.fixture(scope="module")
def shared_model():
    """One compiled model of the run's architecture, handed to every fuzzed replay."""
    model = build_model()
    return lambda: model


def _expected_or_failed(history, failed: set[str], damaged: set[str], replay_results) -> None:
    """Every epoch whose checkpoint was replayed has Keras' own figures, damaged or not:
    a damaged file is either refused or holds the same weights."""
    for epoch in range(1, EPOCHS + 1):
        name = f"e{epoch:04d}.h5"
        if name in failed:
            continue
        expected = replay_results[name]
        for key, split in (("loss", "train"), ("val_loss", "val")):
            got = history.history[key][epoch - 1]
            assert got == pytest.approx(expected[split]["loss"], rel=1e-4, abs=1e-6), (
                name,
                key,
                name in damaged,
            )


@settings(
    max_examples=REPLAY_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_replay_of_a_damaged_run_is_correct_or_a_library_error(
    replayed_run, trained_run, replay_results, shared_model, data
):
    with tempfile.TemporaryDirectory() as tmp:
        folder, target, damaged = _damaged_copy(data, replayed_run, Path(tmp))
        try:
            history = replay(
                folder,
                model=shared_model,
                train=trained_run.train,
                val=trained_run.val,
                jit_compile=False,
            )
            failed: set[str] = set()
        except ReplayIncompleteError as e:
            history, failed = e.history, set(e.failures)
            assert failed <= damaged or target == "manifest", e.failures
        except TruelossReplayError:
            return
        _expected_or_failed(history, failed, damaged, replay_results)


@contextlib.contextmanager
def _first_variable_replaced(path: Path, **options):
    """Yields a new dataset in place of a checkpoint's first variable (same name and attrs)."""
    with h5py.File(path, "r+") as f:
        names = []
        f["weights"].visititems(
            lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None
        )
        attrs = dict(f["weights"][names[0]].attrs)
        del f["weights"][names[0]]
        dataset = f["weights"].create_dataset(names[0], **options)
        dataset.attrs.update(attrs)
        yield dataset


def _forget_signature(run_dir: Path) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest.pop("variables")
    (run_dir / "manifest.json").write_text(json.dumps(manifest))


# 4 GiB fits this machine's memory, so reading it would not fail fast; 64 GiB does not.
HUGE = [(2**15, 2**15), (2**17, 2**17)]


@pytest.mark.parametrize("shape", HUGE, ids=["4GiB", "64GiB"])
@pytest.mark.parametrize("compressed", [False, True], ids=["contiguous", "gzip"])
@pytest.mark.parametrize("recorded", [True, False], ids=["with-signature", "no-signature"])
def test_a_huge_declared_shape_is_refused_without_allocating(run_copy, shape, compressed, recorded):
    path = run_copy / "checkpoints" / "e0001.h5"
    options = {"compression": "gzip", "chunks": (1024, 1024)} if compressed else {}
    with _first_variable_replaced(path, shape=shape, dtype="float32", **options):
        pass
    if not recorded:
        _forget_signature(run_copy)

    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(TruelossReplayError):
            read_weights(path)
        _check_cli("inspect", str(run_copy), "--verify")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 30
    assert peak < 256 * 2**20, f"the readers allocated {peak:,} bytes"


def _gzip_zeros(path: Path, shape=(2**15, 2**15), chunks=(2**11, 2**11)) -> str:
    """Replaces a checkpoint's first variable by a gzip variable of zeros, every chunk written
    (4 GiB declared in 4 MiB: each 16 MiB chunk deflates to 16 KiB). Returns its name."""
    import zlib

    deflate = zlib.compressobj(6)  # HDF5's gzip filter stores zlib streams
    zeros = bytes(2**20)
    chunk = b"".join(deflate.compress(zeros) for _ in range(chunks[0] * chunks[1] * 4 // 2**20))
    chunk += deflate.flush()
    options = {"shape": shape, "dtype": "float32", "chunks": chunks, "compression": "gzip"}
    with _first_variable_replaced(path, **options) as dataset:
        for i in range(0, shape[0], chunks[0]):
            for j in range(0, shape[1], chunks[1]):
                dataset.id.write_direct_chunk((i, j), chunk)
        return dataset.name.removeprefix("/weights/")


def test_a_fully_written_compressed_variable_without_a_signature_is_refused(run_copy):
    path = run_copy / "checkpoints" / "e0001.h5"
    name = _gzip_zeros(path)
    assert path.stat().st_size < 8 * 2**20
    _forget_signature(run_copy)  # no model signature to check the variable against

    tracemalloc.start()
    try:
        with pytest.raises(TruelossReplayError) as caught:
            read_weights(path)
        result = CliRunner().invoke(main, ["inspect", str(run_copy), "--verify"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    message = str(caught.value)
    assert f"checkpoint {path}: variable {name!r} declares shape (32768, 32768)" in message
    assert "no model signature" in message and "at most 256 MiB" in message
    assert caught.value.path == path and caught.value.checkpoint == "e0001.h5"
    assert result.exit_code == 1
    assert f"e0001.h5: checkpoint {path}: variable {name!r}" in " ".join(result.output.split())
    assert peak < 256 * 2**20, f"the readers allocated {peak:,} bytes"
