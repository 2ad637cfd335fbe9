"""The run-folder formats as untrusted input: checkpoints, manifest, strict JSON, paths."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np
import pytest

from trueloss_replay import run as runfmt
from trueloss_replay.errors import CheckpointMismatchError, RunFormatError
from trueloss_replay.run import (
    EpochSet,
    _read_exact,
    as_recorded,
    atomic_write_json,
    check_signature,
    read_checkpoint,
    read_manifest,
    read_weights,
    read_weights_into,
    write_checkpoint,
)

# A variable that declares 4 TiB: HDF5 stores nothing for it and fills it in on read.
HUGE = (2**20, 2**20)


def first_variable(path: Path) -> tuple[str, tuple[int, ...]]:
    """The key and shape of the checkpoint's variable number 0 (the first Dense kernel)."""
    with h5py.File(path, "r") as f:
        found = {}
        f["weights"].visititems(
            lambda name, obj: (
                found.__setitem__(int(obj.attrs["index"]), (name, obj.shape))
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )
    return found[0]


def replace_variable(path: Path, **create) -> str:
    """Replaces variable number 0 of a checkpoint by ``create_dataset(**create)``."""
    key, _ = first_variable(path)
    with h5py.File(path, "r+") as f:
        del f["weights"][key]
        f["weights"].create_dataset(key, **create).attrs["index"] = 0
    return key


@pytest.fixture
def checkpoint(run_copy) -> Path:
    return run_copy / "checkpoints" / "e0002.h5"


# --------------------------------------------------------------------------- checkpoints


def test_huge_declared_shape_is_refused_from_the_manifest_before_reading(checkpoint):
    key = replace_variable(checkpoint, shape=HUGE, dtype="float32")
    assert checkpoint.stat().st_size < 100_000  # a few KB that read as 4 TiB

    with pytest.raises(CheckpointMismatchError) as caught:
        read_weights(checkpoint)

    message = str(caught.value)
    assert str(checkpoint) in message and repr(key) in message
    assert f"has shape {HUGE}, the model expects (8, 16)" in message


def test_huge_declared_shape_is_refused_against_a_given_signature(checkpoint, trained_run):
    from trueloss_replay.run import model_signature

    outside = checkpoint.parent.parent.parent / "loose.h5"  # no run folder around it
    replace_variable(checkpoint, shape=HUGE, dtype="float32")
    shutil.copy(checkpoint, outside)

    with pytest.raises(CheckpointMismatchError, match=r"has shape \(1048576, 1048576\)"):
        read_weights(outside, model_signature(trained_run.model))


def test_data_never_written_is_refused_without_any_signature(checkpoint):
    # Outside a run folder nothing declares the model: the file must hold what it declares.
    outside = checkpoint.parent.parent.parent / "loose.h5"
    key = replace_variable(checkpoint, shape=HUGE, dtype="float32")
    shutil.copy(checkpoint, outside)

    with pytest.raises(RunFormatError) as caught:
        read_weights(outside)

    message = str(caught.value)
    assert repr(key) in message and f"declares shape {HUGE}" in message
    assert f"{2**40 * 4:,} bytes" in message and "stores 0 bytes" in message


def test_right_shape_never_written_is_refused(checkpoint):
    key, shape = first_variable(checkpoint)
    replace_variable(checkpoint, shape=shape, dtype="float32")

    with pytest.raises(RunFormatError, match=rf"{key!r} declares shape \(8, 16\)"):
        read_weights(checkpoint)


@pytest.mark.parametrize(
    "create, stored",
    [
        ({"data": np.full((8, 16), b"0.5", dtype="S3")}, "|S3"),
        ({"data": np.full((8, 16), "0.5", dtype=object), "dtype": h5py.string_dtype()}, "object"),
        ({"data": np.zeros((8, 16), dtype="complex64")}, "complex64"),
    ],
)
def test_variable_that_is_not_numbers_is_refused_by_name(checkpoint, create, stored):
    key = replace_variable(checkpoint, **create)

    with pytest.raises(RunFormatError) as caught:
        read_weights(checkpoint)

    assert f"checkpoint {checkpoint}: variable {key!r} is stored as {stored}, not as numbers" in (
        str(caught.value)
    )


def test_float_stored_for_an_integer_variable_is_refused():
    signature = [["seed_generator/state", [2], "uint32"]]
    with pytest.raises(CheckpointMismatchError, match=r"stored as float32, the model expects"):
        check_signature(signature, {"seed_generator/state": np.zeros(2, "float32")}, "e1.h5")


def test_integers_stored_for_a_float_variable_are_accepted():
    signature = [["dense/bias", [3], "float32"]]
    assert check_signature(signature, {"dense/bias": np.arange(3)}, "e1.h5") == ["dense/bias"]


def test_a_good_checkpoint_reads_as_written(tmp_path):
    arrays = [("dense/kernel", np.arange(6, dtype="float32").reshape(2, 3)), ("step", np.int64(7))]
    path = tmp_path / "checkpoints" / "e0001.h5"
    path.parent.mkdir()
    write_checkpoint(path, arrays, epoch=1, step=7, time=0.0)

    weights = read_weights(path, [["dense/kernel", [2, 3], "float32"], ["step", [], "int64"]])

    assert list(weights) == ["dense/kernel", "step"]
    np.testing.assert_array_equal(weights["dense/kernel"], arrays[0][1])
    assert weights["step"] == 7


def test_checkpoint_with_a_text_version_is_refused(checkpoint):
    with h5py.File(checkpoint, "r+") as f:
        f.attrs["version"] = "one"

    with pytest.raises(RunFormatError, match=r"field 'version' is str 'one', not an integer"):
        read_checkpoint(checkpoint)


@pytest.mark.parametrize("key", ["epoch", "step"])
@pytest.mark.parametrize(
    "value", [2.0**63, float("inf"), -1, 1.5], ids=["2^63", "inf", "-1", "1.5"]
)
def test_checkpoint_with_an_out_of_range_count_is_refused(checkpoint, key, value):
    # 2^63 read as a step overflowed the History's int64 column with a traceback.
    with h5py.File(checkpoint, "r+") as f:
        f.attrs[key] = value

    with pytest.raises(RunFormatError, match=rf"its '{key}' attribute is .*not a whole number"):
        read_checkpoint(checkpoint)


def test_a_gzip_variable_whose_chunks_were_never_written_is_refused(tmp_path):
    # Compressed, a declared 4 GiB costs the file nothing; reading it allocated all of it.
    path = tmp_path / "e0001.h5"
    write_checkpoint(path, [("w", np.zeros(1, "float32"))], epoch=1, step=1, time=0.0)
    with h5py.File(path, "r+") as f:
        del f["weights/w"]
        f["weights"].create_dataset(
            "w", shape=(2**15, 2**15), dtype="float32", compression="gzip", chunks=(1024, 1024)
        )

    with pytest.raises(RunFormatError, match=r"stores 0 of them; the file is damaged"):
        read_weights(path)


def test_nan_logs_are_stored_as_strict_json(tmp_path):
    path = tmp_path / "e0001.h5"
    logs = {"loss": float("nan"), "val_loss": float("inf")}
    write_checkpoint(path, [("w", np.zeros(1, "float32"))], epoch=1, step=1, time=0.0, logs=logs)

    with h5py.File(path, "r") as f:
        text = f.attrs["logs"]
    assert json.loads(text, parse_constant=pytest.fail) == {"loss": None, "val_loss": "Infinity"}


# --------------------------------------------------------------------------- manifest


def rewrite_manifest(run_dir: Path, **fields) -> Path:
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(fields)
    path.write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("version", "one", "field 'version' is str 'one', not an integer"),
        ("version", 1.0, "field 'version' is float 1.0, not an integer"),
        ("params", "epochs=3", "field 'params' must be an object"),
        ("params", {"steps": "6"}, "field 'params' must be an object"),
        ("data_files", ["data/train.h5"], "field 'data_files' must be an object"),
        ("data_files", {"train": 3}, "field 'data_files' must be an object"),
        ("checkpoints", {"e0001.h5": {}}, "field 'checkpoints' must be a list"),
        ("checkpoints", ["e0001.h5"], "field 'checkpoints' must be a list"),
        ("variables", [["dense/kernel", "8x16", "float32"]], "field 'variables' must be a list"),
        ("model", 3, "field 'model' must be a relative path"),
        ("data", ["os:getcwd"], "field 'data' must be a 'module:function' string"),
        ("compile", "adam", "field 'compile' must be an object"),
        ("steps_per_epoch", "6", "field 'steps_per_epoch' must be a positive integer"),
        ("status", 0, "field 'status' must be a string"),
    ],
)
def test_manifest_field_of_the_wrong_type_is_named(run_copy, field, value, expected):
    path = rewrite_manifest(run_copy, **{field: value})

    with pytest.raises(RunFormatError) as caught:
        read_manifest(run_copy)

    assert str(path) in str(caught.value) and expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_manifest_without_optional_fields_is_read(run_copy):
    path = run_copy / "manifest.json"
    path.write_text(json.dumps({"format": "trueloss-replay/run", "version": 1}))

    assert read_manifest(run_copy) == {"format": "trueloss-replay/run", "version": 1}


# --------------------------------------------------------------------------- strict JSON


def test_atomic_write_json_is_strict_json(tmp_path):
    path = tmp_path / "result.json"
    figures = {"loss": float("nan"), "val_loss": np.float32("inf"), "acc": np.float64(0.5)}

    atomic_write_json(path, {"train": figures, "list": [np.nan, -np.inf, 1]})

    text = path.read_text()
    assert "NaN" not in text and "Infinity" in text
    parsed = json.loads(text, parse_constant=pytest.fail)  # a bare NaN/Infinity token fails
    assert parsed == {
        "train": {"loss": None, "val_loss": "Infinity", "acc": 0.5},
        "list": [None, "-Infinity", 1],
    }


@pytest.mark.parametrize(
    "value, expected",
    [(None, math.nan), ("Infinity", math.inf), ("-Infinity", -math.inf), (0.25, 0.25), (2, 2.0)],
)
def test_json_float_reads_back_what_strict_json_writes(value, expected):
    from trueloss_replay.run import json_float

    assert json_float(value) == expected or (math.isnan(expected) and math.isnan(json_float(value)))


# --------------------------------------------------------------------------- epochs and paths


def test_epoch_set_of_a_huge_range_tests_membership_without_expanding():
    epochs = EpochSet([(1, 10**9), (0, 0)])

    assert epochs.ranges == ((0, 10**9),)
    assert 0 in epochs and 10**9 in epochs and 10**9 + 1 not in epochs
    assert epochs != {1, 2, 3}


def test_version_comes_from_the_package_metadata():
    import importlib.metadata

    import trueloss_replay

    assert trueloss_replay.__version__ == importlib.metadata.version("trueloss-replay")


def test_license_file_is_the_declared_licence():
    root = Path(__file__).resolve().parents[1]
    pyproject = (root / "pyproject.toml").read_text()
    assert 'license = "Apache-2.0"' in pyproject
    text = (root / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_a_small_compressed_variable_without_a_signature_is_read(tmp_path):
    # Below the cap on expansion: a foreign gzip checkpoint of a real size still reads.
    path = tmp_path / "e0001.h5"
    write_checkpoint(path, [("dense/kernel", np.zeros((4, 3), "float32"))], epoch=1, step=1, time=0)
    zeros = np.zeros((1024, 1024), "float32")  # 4 MiB declared, a few KiB stored
    with h5py.File(path, "r+") as f:
        del f["weights/dense/kernel"]
        f["weights"].create_dataset("dense/kernel", data=zeros, compression="gzip")

    weights = read_weights(path)

    assert path.stat().st_size < 2**20
    np.testing.assert_array_equal(weights["dense/kernel"], zeros)


def test_errors_name_the_file_in_fields_as_well_as_in_text(run_copy):
    (run_copy / "checkpoints" / "e0002.h5").write_bytes(b"garbage")
    manifest = run_copy / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "params": "many"}))

    with pytest.raises(RunFormatError) as bad_manifest:
        read_manifest(run_copy)
    with pytest.raises(RunFormatError) as bad_checkpoint:
        read_weights(run_copy / "checkpoints" / "e0002.h5")

    assert bad_manifest.value.path == manifest and not bad_manifest.value.usage
    assert bad_manifest.value.hint == "Copy it again from where the run was trained."
    assert str(bad_manifest.value).endswith(bad_manifest.value.hint)
    assert bad_checkpoint.value.checkpoint == "e0002.h5"
    assert bad_checkpoint.value.path == run_copy / "checkpoints" / "e0002.h5"
    assert "epochs=" in str(bad_checkpoint.value) and "--epochs" not in str(bad_checkpoint.value)


# --------------------------------------------------------------------------- the fast read


def _checked_read(path: Path, tmp_path: Path) -> dict[str, np.ndarray]:
    """The high-level, checked read of ``read_weights``: a copy outside any run folder has
    no recorded signature, which is what the fast path needs."""
    copy = tmp_path / "outside" / path.name
    copy.parent.mkdir(exist_ok=True)
    shutil.copy(path, copy)
    return read_weights(copy)


def test_the_fast_read_gives_what_the_checked_read_gives(trained_run, tmp_path):
    path = trained_run.path / "checkpoints" / "e0002.h5"
    signature = read_manifest(trained_run.path)["variables"]

    fast = _read_exact(path, signature)
    checked = _checked_read(path, tmp_path)

    assert fast is not None  # a checkpoint the callback wrote takes the fast path
    assert list(fast) == list(checked)  # the same keys, in the file's index order
    for key in checked:
        assert fast[key].dtype == checked[key].dtype
        np.testing.assert_array_equal(fast[key], checked[key])
    assert list(read_weights(path)) == list(checked)
    # Paths that differ only in Keras' per-process names match by position, as in
    # check_signature (a Sequential model loaded from model.keras drops its own name).
    renamed = [[f"outer_2/{key}", *rest] for key, *rest in signature]
    by_position = _read_exact(path, renamed)
    assert by_position is not None and list(by_position) == list(checked)
    swapped = [renamed[1], renamed[0], *renamed[2:]]  # not one structure, position by position
    assert _read_exact(path, swapped) is None


def test_as_recorded_names_the_model_variables_as_the_run_recorded_them(trained_run):
    """A model loaded from model.keras names its variables without the Sequential's name;
    against the recorded names, a checkpoint matches by name, in the recorded order."""
    recorded = read_manifest(trained_run.path)["variables"]
    path = trained_run.path / "checkpoints" / "e0002.h5"
    loaded = [[key.split("/", 1)[1], *rest] for key, *rest in recorded]

    assert as_recorded(loaded, path) == [list(entry) for entry in recorded]
    fast = _read_exact(path, as_recorded(loaded, path))
    assert fast is not None and list(fast) == [key for key, *_ in recorded]
    # Anything that does not pair up position by position stays as the model names it.
    swapped = [loaded[1], loaded[0], *loaded[2:]]
    assert as_recorded(swapped, path) == swapped
    wider = [[loaded[0][0], loaded[0][1], "float64"], *loaded[1:]]
    assert as_recorded(wider, path) == wider
    assert as_recorded(loaded[:-1], path) == loaded[:-1]
    # The recorded names in another order match by name as they are, never by position.
    permuted = [list(recorded[1]), list(recorded[0]), *map(list, recorded[2:])]
    assert as_recorded(permuted, path) == permuted
    outside = Path("elsewhere") / "e0002.h5"  # no run folder: nothing recorded
    assert as_recorded(loaded, outside) == loaded


def test_a_checkpoint_cut_short_is_refused_by_name(checkpoint, run_copy):
    """A copy interrupted in the last variable's bytes: neither read returns numbers. (HDF5
    itself refuses to open a file shorter than it records; the fast read also checks each
    variable's end against the file's size, and a short ``preadv``.)"""
    signature = read_manifest(run_copy)["variables"]
    with h5py.File(checkpoint, "r") as f:
        last = max(
            f["weights"][key].id.get_offset() + f["weights"][key].id.get_storage_size()
            for key, *_ in signature
        )
    with open(checkpoint, "r+b") as f:
        f.truncate(last - 4)

    assert _read_exact(checkpoint, signature) is None
    with pytest.raises(RunFormatError, match="e0002.h5.*damaged") as error:
        read_weights(checkpoint)
    assert error.value.checkpoint == "e0002.h5"


def test_arrays_of_another_dtype_are_filled_by_the_checked_read(trained_run):
    """Bytes are copied only into arrays of the stored dtype; float64 arrays get the float32
    values converted, as h5py reads them."""
    path = trained_run.path / "checkpoints" / "e0002.h5"
    signature = read_manifest(trained_run.path)["variables"]
    into = [np.full(shape, np.nan, np.float64) for _, shape, _ in signature]

    assert _read_exact(path, signature, into) is None
    read_weights_into(path, signature, into)
    with h5py.File(path, "r") as f:
        for got, (key, *_) in zip(into, signature, strict=True):
            np.testing.assert_array_equal(got, f["weights"][key][()].astype(np.float64))


def _gzip(path: Path) -> None:
    """Variable 0 compressed: zeros, so it stores far fewer bytes than it declares."""
    key, _ = first_variable(path)
    with h5py.File(path, "r+") as f:
        data = np.zeros_like(f["weights"][key][()])
        del f["weights"][key]
        f["weights"].create_dataset(key, data=data, compression="gzip").attrs["index"] = 0


def _extra(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        f["weights"].create_dataset("extra/kernel", data=np.zeros(3, "float32"))


def _float64(path: Path) -> None:
    key, _ = first_variable(path)
    with h5py.File(path, "r+") as f:
        data = f["weights"][key][()].astype("float64")
        del f["weights"][key]
        f["weights"].create_dataset(key, data=data).attrs["index"] = 0


def _gzip_incompressible(path: Path) -> None:
    """Variable 0 compressed, but storing more bytes than it declares (random values)."""
    key, _ = first_variable(path)
    with h5py.File(path, "r+") as f:
        data = f["weights"][key][()]
        del f["weights"][key]
        f["weights"].create_dataset(key, data=data, compression="gzip").attrs["index"] = 0


def _seven_bit_exponent(path: Path) -> None:
    """Variable 0 as a 32-bit float with a 7-bit exponent: h5py shows it as float32, but
    its bytes are not float32's (HDF5 converts them on read)."""
    key, _ = first_variable(path)
    with h5py.File(path, "r+") as f:
        data = f["weights"][key][()]
        del f["weights"][key]
        stored = h5py.h5t.IEEE_F32LE.copy()
        stored.set_fields(31, 23, 7, 0, 23)
        stored.set_ebias(63)
        space = h5py.h5s.create_simple(data.shape)
        dataset = h5py.h5d.create(f["weights"].id, key.encode(), stored, space)
        dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, data)
        f["weights"][key].attrs["index"] = 0
        assert f["weights"][key].dtype == np.float32


def _float_index(path: Path) -> None:
    key, _ = first_variable(path)
    with h5py.File(path, "r+") as f:
        f["weights"][key].attrs["index"] = 0.0


@pytest.mark.parametrize(
    "change",
    [_gzip, _gzip_incompressible, _extra, _float64, _float_index, _seven_bit_exponent],
    ids=["gzip", "gzip-incompressible", "extra", "float64", "float-index", "7-bit-exponent"],
)
def test_anything_but_the_exact_layout_takes_the_checked_read(checkpoint, run_copy, change):
    signature = read_manifest(run_copy)["variables"]
    if change is _float_index:
        # Only matching by position reads the index attributes; by name they do not count.
        signature = [[f"outer_2/{key}", *rest] for key, *rest in signature]
    key, _ = first_variable(checkpoint)
    original = read_weights(checkpoint)[key]
    change(checkpoint)

    assert _read_exact(checkpoint, signature) is None
    if change is _extra:
        with pytest.raises(CheckpointMismatchError, match="extra/kernel"):
            read_weights(checkpoint)
    else:  # a compressed or wider variable is still read, by the checked path
        after = read_weights(checkpoint)[key]
        expected = {_gzip: np.zeros_like(original), _float64: original.astype("float64")}.get(
            change, original
        )
        assert after.dtype == expected.dtype
        np.testing.assert_array_equal(after, expected)


# --------------------------------------------------------------------------- reading by a layout

#: A small model's variables, nested as Keras names them, with a scalar among them.
SIGNATURE = [
    ["outer/dense/kernel", [4, 3], "float32"],
    ["outer/dense/bias", [3], "float32"],
    ["outer/seed", [], "int64"],
]


def _values(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "outer/dense/kernel": rng.standard_normal((4, 3)).astype("float32"),
        "outer/dense/bias": rng.standard_normal(3).astype("float32"),
        "outer/seed": np.int64(rng.integers(1 << 40)),
    }


def _write_checkpoints(folder: Path, count: int) -> list[Path]:
    """``count`` checkpoints of one model: other values, epochs, times, and logs of other
    lengths, as training writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for epoch in range(count):
        path = folder / f"e{epoch:04d}.h5"
        logs = {"loss": 1 / (epoch + 3), **{f"metric_{i}": float(i) for i in range(epoch)}}
        write_checkpoint(
            path, list(_values(epoch).items()), epoch=epoch, step=7 * epoch, time=epoch, logs=logs
        )
        paths.append(path)
    return paths


def _write_old_checkpoint(path: Path, values: Mapping[str, np.ndarray], epoch: int) -> None:
    """A checkpoint as versions before the layouts wrote it: h5py's defaults, the root
    attributes (epoch, time, logs) in the root group's object header."""
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "trueloss-replay/checkpoint"
        f.attrs["version"] = 1
        f.attrs["epoch"] = epoch
        f.attrs["step"] = epoch
        f.attrs["time"] = float(epoch)
        f.attrs["logs"] = json.dumps({"loss": 1 / (epoch + 3)})
        for index, (key, array) in enumerate(values.items()):
            f.create_dataset(f"weights/{key}", data=array).attrs["index"] = index


@pytest.fixture
def counted(monkeypatch) -> dict[str, int]:
    """How often ``_read_exact`` went through HDF5, read by a layout, and took a layout."""
    counts = {"hdf5": 0, "layout": 0, "taken": 0}
    for name, key in [
        ("_read_checked_layout", "hdf5"),
        ("_read_laid_out", "layout"),
        ("_take_layout", "taken"),
    ]:
        original = getattr(runfmt, name)

        def wrapper(*args, _original=original, _key=key):
            counts[_key] += 1
            return _original(*args)

        monkeypatch.setattr(runfmt, name, wrapper)
    return counts


def _h5py_read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {key: f["weights"][key][()] for key, *_ in SIGNATURE}


def test_a_folders_checkpoints_are_read_by_the_layout_of_the_first(tmp_path, monkeypatch, counted):
    # Several preadv calls per file, the kernel read in pieces of 8 bytes.
    monkeypatch.setattr(runfmt, "IOV_MAX", 2)
    monkeypatch.setattr(runfmt, "_READ_BYTES", 8)
    paths = _write_checkpoints(tmp_path / "checkpoints", 4)

    for epoch, path in enumerate(paths):
        expected = _h5py_read(path)
        into = [np.full(shape, -1, dtype) for _, shape, dtype in SIGNATURE]
        read = _read_exact(path, SIGNATURE, into)
        assert read is not None and list(read) == [key for key, *_ in SIGNATURE]
        for got, (key, *_) in zip(into, SIGNATURE, strict=True):
            np.testing.assert_array_equal(got, expected[key])
            np.testing.assert_array_equal(got, _values(epoch)[key])
        alone = _read_exact(path, SIGNATURE)  # arrays of its own; the scalar as a scalar
        assert {key: type(value) for key, value in alone.items()} == {
            key: type(value) for key, value in expected.items()
        }

    # HDF5 checked the first file; the other reads went by its layout.
    assert counted == {"hdf5": 1, "layout": 7, "taken": 1}


def _renamed(path: Path) -> str:
    values = _values(9)
    values["outer/dense/kernal"] = values.pop("outer/dense/kernel")  # as long a name
    write_checkpoint(path, list(values.items()), epoch=1, step=7, time=1)
    return "kernel"


def _transposed(path: Path) -> str:
    values = _values(9)
    values["outer/dense/kernel"] = values["outer/dense/kernel"].T.copy()
    write_checkpoint(path, list(values.items()), epoch=1, step=7, time=1)
    return "kernel"


def _integer_bias(path: Path) -> str:
    values = _values(9)
    values["outer/dense/bias"] = np.arange(3, dtype="int32")  # as many bytes as float32
    write_checkpoint(path, list(values.items()), epoch=1, step=7, time=1)
    return "bias"


@pytest.mark.parametrize(
    "change", [_renamed, _transposed, _integer_bias], ids=["renamed", "transposed", "int32"]
)
def test_a_checkpoint_unlike_the_layout_where_hdf5_reads_is_checked_by_hdf5(
    tmp_path, counted, change
):
    """Of the same size as the layout's file, so only the bytes HDF5 read tell them apart."""
    first, second = _write_checkpoints(tmp_path / "checkpoints", 2)
    assert _read_exact(first, SIGNATURE) is not None
    variable = change(second)
    assert second.stat().st_size == first.stat().st_size

    assert _read_exact(second, SIGNATURE) is None
    assert counted["layout"] == 1  # tried, and refused
    if change is _integer_bias:  # integers fit a float variable: h5py converts them
        bias = read_weights(second, SIGNATURE)["outer/dense/bias"]
        np.testing.assert_array_equal(bias, np.arange(3, dtype="float32"))
    else:
        with pytest.raises(CheckpointMismatchError, match=variable):
            read_weights(second, SIGNATURE)


def test_a_checkpoint_changed_in_place_is_read_by_the_layout_as_it_is_now(tmp_path, counted):
    """New values and a new epoch written into a file change no byte HDF5 reads to find the
    weights; a file cut short is of another size, and HDF5 says what is wrong with it."""
    first, second, third = _write_checkpoints(tmp_path / "checkpoints", 3)
    assert _read_exact(first, SIGNATURE) is not None
    with h5py.File(second, "r+") as f:
        f["weights/outer/dense/bias"][...] = [7.0, 8.0, 9.0]
        f.attrs["epoch"] = 99
    with open(third, "r+b") as f:
        f.truncate(third.stat().st_size - 4)

    read = _read_exact(second, SIGNATURE)
    assert read is not None and counted == {"hdf5": 1, "layout": 1, "taken": 1}
    np.testing.assert_array_equal(read["outer/dense/bias"], _h5py_read(second)["outer/dense/bias"])
    np.testing.assert_array_equal(read["outer/dense/bias"], [7.0, 8.0, 9.0])
    assert _read_exact(third, SIGNATURE) is None
    with pytest.raises(RunFormatError, match="e0002.h5.*damaged"):
        read_weights(third, SIGNATURE)


def _read_and_check(path: Path, epoch: int) -> None:
    read = _read_exact(path, SIGNATURE)
    assert read is not None
    for key, value in _values(epoch).items():
        np.testing.assert_array_equal(read[key], value)


def test_a_folder_of_older_checkpoints_takes_layouts_ever_more_rarely(tmp_path, counted):
    """Each older checkpoint differs from the one before where HDF5 reads (its epoch is in
    the root's header): a layout is taken from files 1, 2, 4, 8 and 16, tried on the file
    after each, and every file is read through HDF5."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for epoch in range(20):
        path = folder / f"e{epoch:04d}.h5"
        _write_old_checkpoint(path, _values(epoch), epoch)
        _read_and_check(path, epoch)

    assert counted == {"hdf5": 20, "layout": 5, "taken": 5}


def test_a_folder_whose_checkpoints_change_layout_takes_the_new_one(tmp_path, counted):
    """A run resumed by a newer version: six older checkpoints, then six laid out. Layouts
    are taken from files 1, 2, 4 and 8, and the last four are read by the one of file 8."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for epoch in range(12):
        path = folder / f"e{epoch:04d}.h5"
        if epoch < 6:
            _write_old_checkpoint(path, _values(epoch), epoch)
        else:
            write_checkpoint(path, list(_values(epoch).items()), epoch=epoch, step=epoch, time=0)
        _read_and_check(path, epoch)

    assert counted == {"hdf5": 8, "layout": 7, "taken": 4}


def test_no_layout_is_taken_from_a_file_whose_variable_lies_over_hdf5s_metadata(tmp_path, counted):
    """A crafted checkpoint whose scalar variable is "stored" inside the superblock: HDF5 reads
    it, but the bytes it uses there are the variable's, which a layout does not compare. So
    that file gives no layout, and a copy of it that HDF5 cannot open is not read by one."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    first, second = folder / "e0000.h5", folder / "e0001.h5"
    _write_old_checkpoint(first, _values(0), 0)
    with h5py.File(first, "r") as f:
        offset = f["weights/outer/seed"].id.get_offset()
    image = bytearray(first.read_bytes())
    # The seed's layout message: its address, then its size (8 bytes each, v1 headers).
    at = image.find(offset.to_bytes(8, "little") + (8).to_bytes(8, "little"))
    assert at > 0
    image[at : at + 8] = (8).to_bytes(8, "little")  # now bytes 8 to 16 of the superblock
    first.write_bytes(bytes(image))
    read = _read_exact(first, SIGNATURE)
    assert read is not None and read["outer/seed"] == int.from_bytes(image[8:16], "little")
    image[13] = 4  # the superblock's size of offsets, 8 -> 4: HDF5 refuses the file
    second.write_bytes(bytes(image))

    assert counted["taken"] == 1  # taken, and refused
    (state,) = [state for key, state in runfmt._LAYOUTS.items() if key[0] == str(folder)]
    assert state.layout is None
    assert _read_exact(second, SIGNATURE) is None
    with pytest.raises(RunFormatError, match="e0001.h5"):
        read_weights(second, SIGNATURE)


def test_checkpoints_keep_their_attributes_out_of_the_bytes_that_find_the_weights(tmp_path):
    """The root attributes are stored apart from the root group's object header, and no
    object header holds a time (h5py writes HDF5's times for groups by default): else every
    checkpoint would differ from the layout of the one before."""
    (path,) = _write_checkpoints(tmp_path, 1)
    with h5py.File(path, "r") as f:
        # The messages of the root group's object header, one bit per HDF5 message type:
        # an "attribute info" one (0x15: the attributes are elsewhere), no attribute (0x0C).
        present = h5py.h5o.get_info(f.id).hdr.mesg.present
        assert present & (1 << 0x15) and not present & (1 << 0x0C)
        times = {}
        f.visititems(lambda name, obj: times.__setitem__(name, h5py.h5o.get_info(obj.id).ctime))
        times["/"] = h5py.h5o.get_info(f.id).ctime
        assert set(times) > {"/", "weights", "weights/outer", "weights/outer/dense"}
        assert set(times.values()) == {0}
        assert dict(f.attrs)["epoch"] == 0
