"""adopt: a plain Keras run (ModelCheckpoint + CSVLogger) becomes a run folder.

One real fit writes a native run (ReplayCheckpoint), two Keras ModelCheckpoint folders
(weights only, whole models) and a CSVLogger log from the same weights; the adopted runs
must replay to the native run's figures.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from trueloss_replay import ReplayCheckpoint, adopt, load_history, replay
from trueloss_replay.adoption import epoch_parser
from trueloss_replay.cli import main
from trueloss_replay.errors import (
    AdoptError,
    CheckpointMismatchError,
    ModelLoadError,
    RunExistsError,
    RunFormatError,
)
from trueloss_replay.run import Run, read_weights

from .conftest import build_model, make_data

EPOCHS = 3
WEIGHTS_PATTERN = "ckpt-{epoch:03d}.weights.h5"
MODELS_PATTERN = "model-{epoch:02d}-{val_loss:.3f}.keras"


@dataclass
class KerasRun:
    root: Path
    native: Path
    weights: Path  # ModelCheckpoint(save_weights_only=True)
    models: Path  # ModelCheckpoint(), whole .keras models
    log: Path  # CSVLogger
    history: keras.callbacks.History
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]

    def model_file(self, epoch: int = EPOCHS) -> Path:
        return next(self.models.glob(f"model-{epoch:02d}-*.keras"))


@pytest.fixture(scope="module")
def keras_run(tmp_path_factory) -> KerasRun:
    """One fit with ReplayCheckpoint, both kinds of ModelCheckpoint and CSVLogger."""
    x, y = make_data(n=64)
    train, val = (x[:48], y[:48]), (x[48:], y[48:])
    root = tmp_path_factory.mktemp("keras_run")
    model = build_model()
    history = model.fit(
        *train,
        validation_data=val,
        epochs=EPOCHS,
        batch_size=16,
        verbose=0,
        callbacks=[
            ReplayCheckpoint(root / "native", train_data=train, val_data=val, save_initial=False),
            keras.callbacks.ModelCheckpoint(
                str(root / "weights" / WEIGHTS_PATTERN), save_weights_only=True
            ),
            keras.callbacks.ModelCheckpoint(str(root / "models" / MODELS_PATTERN)),
            keras.callbacks.CSVLogger(str(root / "training.log")),
        ],
    )
    np.savez(root / "train.npz", x=train[0], y=train[1])
    np.savez(root / "val.npz", x=val[0], y=val[1])
    return KerasRun(
        root,
        root / "native",
        root / "weights",
        root / "models",
        root / "training.log",
        history,
        train,
        val,
    )


@pytest.fixture(scope="module")
def replayed(keras_run, tmp_path_factory) -> dict[str, Path]:
    """Both ModelCheckpoint folders adopted, and all three runs replayed (read-only)."""
    root = tmp_path_factory.mktemp("adopted")
    runs = {"native": keras_run.native}
    runs["weights"] = adopt(
        keras_run.weights,
        root / "weights",
        model_file=keras_run.model_file(),
        train=keras_run.train,
        val=keras_run.val,
        log=keras_run.log,
    ).path
    runs["models"] = adopt(
        keras_run.models,
        root / "models",
        pattern=MODELS_PATTERN,
        train=keras_run.root / "train.npz",
        val=keras_run.root / "val.npz",
        log=keras_run.log,
    ).path
    # TensorFlow without XLA: 1.5 s a replay instead of 3-4 here (JAX's compiled programs
    # are reused across the three). The runs are compared with each other, and the engine's
    # XLA path has its own tests.
    jit_compile = False if keras.backend.backend() == "tensorflow" else None
    for path in runs.values():
        replay(path, jit_compile=jit_compile)
    return runs


def csv_logged(path: Path) -> dict[str, list[float]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in rows[0] if k != "epoch"}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def nothing_left(run_dir: Path) -> bool:
    """No run folder and no hidden staging folder of an adopt beside it."""
    return not run_dir.exists() and not list(run_dir.parent.glob(f".{run_dir.name}.adopt-*"))


# --------------------------------------------------------------------------- equal to native


@pytest.mark.backend
@pytest.mark.parametrize("kind", ["weights", "models"])
def test_adopted_run_replays_to_the_native_figures(replayed, kind):
    native = load_history(replayed["native"])
    adopted = load_history(replayed[kind])

    assert adopted.epoch == native.epoch == list(range(EPOCHS))
    assert sorted(adopted.history) == sorted(native.history)
    for key, values in native.history.items():
        np.testing.assert_allclose(adopted.history[key], values, rtol=0, atol=1e-6, err_msg=key)
    assert {"loss", "val_loss", "accuracy", "regularization_loss"} <= set(native.history)


@pytest.mark.backend
@pytest.mark.parametrize("kind", ["weights", "models"])
def test_adopted_checkpoints_hold_the_native_weights(replayed, kind):
    native, adopted = Run(replayed["native"]), Run(replayed[kind])

    assert [c.name for c in adopted.checkpoints()] == ["e0001.h5", "e0002.h5", "e0003.h5"]
    for mine, theirs in zip(adopted.checkpoints(), native.checkpoints(), strict=True):
        ours, reference = read_weights(mine.path), read_weights(theirs.path)
        assert len(ours) == len(reference) == 8
        for a, b in zip(ours.values(), reference.values(), strict=True):
            np.testing.assert_array_equal(a, b)
        # The optimizer's iteration count, from the Keras file: 48 examples / 16 = 3 steps.
        assert mine.step == theirs.step == 3 * mine.epoch


@pytest.mark.backend
def test_reported_curves_are_the_csv_log(replayed, keras_run):
    history = load_history(replayed["models"])
    logged = csv_logged(keras_run.log)

    assert set(logged) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    for key, values in logged.items():
        np.testing.assert_allclose(history.history[f"reported_{key}"], values, rtol=1e-7)
        np.testing.assert_allclose(values, keras_run.history.history[key], rtol=1e-7)


def test_every_downstream_command_reads_an_adopted_run(replayed, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(replayed["weights"], run)

    for args in (
        ["history", run, "-o", tmp_path / "h.csv"],
        ["plot", run, "-o", tmp_path / "c.png"],
        ["inspect", run, "--verify"],
        ["export", run, "--tensorboard", tmp_path / "tb"],
        ["explain", run, "--seeds", "1"],
    ):
        result = invoke(*args)
        assert result.exit_code == 0, (args, result.output)
    assert (tmp_path / "c.png").stat().st_size > 0
    assert any((tmp_path / "tb").rglob("events.out.tfevents.*"))
    # explain inferred the training batch size from the steps the Keras files recorded.
    gap = load_history(run).history["gap_training_mode"]
    assert len(gap) == EPOCHS and np.all(np.isfinite(gap))


# --------------------------------------------------------------------------- the CLI


def test_cli_adopts_weights_with_a_builder_data_files_and_the_log(
    keras_run, replayed, tmp_path, monkeypatch
):
    (tmp_path / "adopt_builder.py").write_text(
        "from tests.conftest import build_model\n\ndef build():\n    return build_model()\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent))
    run = tmp_path / "run"

    result = invoke(
        "adopt", keras_run.weights, run, "--pattern", WEIGHTS_PATTERN,
        "--model", "adopt_builder:build",
        "--train", keras_run.root / "train.npz", "--val", keras_run.root / "val.npz",
        "--log", keras_run.log,
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert f"adopted 3 checkpoint(s) of {keras_run.weights} (epochs 1-3)" in result.output
    manifest = Run(run).manifest
    assert manifest["data_files"] == {"train": "data/train.h5", "val": "data/val.h5"}
    assert manifest["steps_per_epoch"] == 3 and manifest["status"] == "finished"
    assert manifest["compile"]["loss"] == "sparse_categorical_crossentropy"
    logged = csv_logged(keras_run.log)
    assert [c["logs"]["val_loss"] for c in manifest["checkpoints"]] == logged["val_loss"]
    reference = Run(replayed["weights"]).checkpoints()
    for mine, theirs in zip(Run(run).checkpoints(), reference, strict=True):
        for a, b in zip(
            read_weights(mine.path).values(), read_weights(theirs.path).values(), strict=True
        ):
            np.testing.assert_array_equal(a, b)


def test_cli_help_has_an_example():
    result = invoke("adopt", "--help")
    assert result.exit_code == 0, result.output
    assert "trueloss-replay adopt ckpts runs/exp1" in result.output


@pytest.mark.parametrize("kind", ["keras_history", "write_json"])
def test_a_saved_history_json_is_the_log(keras_run, tmp_path, kind):
    logged = keras_run.history.history
    body = logged if kind == "keras_history" else {"history": logged, "epoch": [0, 1, 2]}
    (tmp_path / "history.json").write_text(json.dumps(body))

    run = adopt(keras_run.models, tmp_path / "run", log=tmp_path / "history.json")

    for entry, epoch in zip(run.manifest["checkpoints"], range(EPOCHS), strict=True):
        assert entry["logs"] == {k: float(v[epoch]) for k, v in logged.items()}


@pytest.mark.parametrize(
    ("pattern", "name", "epoch"),
    [
        (None, "ckpt-007.weights.h5", 7),
        (None, "model.weights.h5", None),  # the 5 of .h5 is no epoch
        (None, "run3-epoch12.keras", 3),
        (WEIGHTS_PATTERN, "ckpt-012.weights.h5", 12),
        (WEIGHTS_PATTERN, "ckpt-012.keras", None),
        (MODELS_PATTERN, "model-04-0.123.keras", 4),
        ("out/{epoch}-{epoch:02d}.keras", "5-05.keras", 5),
        ("out/{epoch}-{epoch:02d}.keras", "5-06.keras", None),
    ],
)
def test_epoch_from_a_file_name(pattern, name, epoch):
    assert epoch_parser(pattern)(name) == epoch


# --------------------------------------------------------------------------- bad input


def _copy(keras_run, tmp_path, epochs=(1, 2, 3), names=None) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for epoch in epochs:
        name = (names or {}).get(epoch, WEIGHTS_PATTERN.format(epoch=epoch))
        shutil.copy(keras_run.weights / WEIGHTS_PATTERN.format(epoch=epoch), src / name)
    return src


def _other_model_weights(path: Path, units: int, extra_layer: bool = False) -> None:
    layers = [keras.Input((8,)), keras.layers.Dense(units, activation="relu")]
    layers += [keras.layers.BatchNormalization(), keras.layers.Dropout(0.5)]
    layers += [keras.layers.Dense(3, activation="softmax")]
    if extra_layer:
        layers.append(keras.layers.Dense(3))
    keras.Sequential(layers).save_weights(path)


def _bad_sources(keras_run, tmp_path, case: str) -> tuple[Path, dict, type, str]:
    """(src, adopt kwargs, expected error, text the one-line message contains)."""
    model_file = {"model_file": keras_run.model_file()}
    if case == "gap":
        src = _copy(keras_run, tmp_path, epochs=(1, 3))
        return src, model_file, AdoptError, f"source folder {src} has no checkpoint for epoch(s) 2"
    if case == "unparseable name":
        src = _copy(keras_run, tmp_path, epochs=(1, 2), names={2: "ckpt-best.weights.h5"})
        return src, model_file, AdoptError, f"checkpoint {src / 'ckpt-best.weights.h5'} does not"
    if case == "two files for one epoch":
        src = _copy(keras_run, tmp_path)
        shutil.copy(src / "ckpt-001.weights.h5", src / "ckpt-1.weights.h5")
        text = "checkpoints ckpt-001.weights.h5 and ckpt-1.weights.h5 in"
        return src, model_file, AdoptError, text
    if case == "other shape":
        src = _copy(keras_run, tmp_path)
        _other_model_weights(src / "ckpt-002.weights.h5", units=12)
        # Keras names layers by how many came before in the process: read the model's own.
        kernel = keras.saving.load_model(keras_run.model_file()).layers[0].kernel.path
        text = (
            f"checkpoint {src / 'ckpt-002.weights.h5'}: variable '{kernel}' "
            "(layers/dense/vars/0) has shape (8, 12), the model expects (8, 16)"
        )
        return src, model_file, CheckpointMismatchError, text
    if case == "extra layer":
        src = _copy(keras_run, tmp_path)
        _other_model_weights(src / "ckpt-003.weights.h5", units=16, extra_layer=True)
        text = (
            f"checkpoint {src / 'ckpt-003.weights.h5'} has variable 'layers/dense_2/vars/0', "
            "which the model lacks"
        )
        return src, model_file, CheckpointMismatchError, text
    if case == "damaged file":
        src = _copy(keras_run, tmp_path)
        (src / "ckpt-002.weights.h5").write_bytes(b"not HDF5")
        text = f"checkpoint {src / 'ckpt-002.weights.h5'} cannot be read as a Keras weights file"
        return src, model_file, RunFormatError, text
    if case == "damaged model file":
        src = _copy(keras_run, tmp_path)
        (tmp_path / "model.keras").write_bytes(b"not a zip")
        text = f"{tmp_path / 'model.keras'} is not a valid .keras archive"
        return src, {"model_file": tmp_path / "model.keras"}, ModelLoadError, text
    if case == "empty":
        src = tmp_path / "src"
        src.mkdir()
        (src / "training.log").write_text("epoch,loss\n0,1.0\n")
        return src, {}, AdoptError, f"source folder {src} holds no Keras checkpoint"
    if case == "log too short":
        src = _copy(keras_run, tmp_path)
        log = tmp_path / "short.log"
        log.write_text("".join(keras_run.log.read_text().splitlines(True)[:3]))
        text = (
            f"log {log} has no row for epoch 3 (checkpoint ckpt-003.weights.h5; CSVLogger "
            "counts it as epoch 2)"
        )
        return src, {**model_file, "log": log}, AdoptError, text
    if case == "log twice":
        src = _copy(keras_run, tmp_path)
        log = tmp_path / "twice.log"
        lines = keras_run.log.read_text().splitlines(True)
        log.write_text("".join(lines + lines[1:]))
        return src, {**model_file, "log": log}, AdoptError, f"log {log} has epoch 0 twice"
    if case == "no architecture":
        src = _copy(keras_run, tmp_path)
        return src, {}, ModelLoadError, "are weights only and no model architecture was given"
    raise AssertionError(case)


BAD_CASES = [
    "gap",
    "unparseable name",
    "two files for one epoch",
    "other shape",
    "extra layer",
    "damaged file",
    "damaged model file",
    "empty",
    "log too short",
    "log twice",
    "no architecture",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_source_is_refused_by_the_api(keras_run, tmp_path, case):
    src, kwargs, error, text = _bad_sources(keras_run, tmp_path, case)
    run_dir = tmp_path / "out" / "run"

    with pytest.raises(error) as caught:
        adopt(src, run_dir, **kwargs)

    assert text in str(caught.value)
    assert nothing_left(run_dir)


_FLAGS = {"model_file": "--model-file", "log": "--log"}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_source_is_refused_by_the_cli(keras_run, tmp_path, case):
    src, kwargs, _, text = _bad_sources(keras_run, tmp_path, case)
    run_dir = tmp_path / "out" / "run"
    flags = [item for k, v in kwargs.items() for item in (_FLAGS[k], v)]

    result = invoke("adopt", src, run_dir, *flags)

    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and text in errors[0], result.output
    assert "Traceback" not in result.output
    assert nothing_left(run_dir)


def test_gaps_are_accepted_with_allow_gaps(keras_run, tmp_path):
    src = _copy(keras_run, tmp_path, epochs=(1, 3))

    result = invoke(
        "adopt", src, tmp_path / "run", "--model-file", keras_run.model_file(), "--allow-gaps"
    )

    assert result.exit_code == 0, result.output
    assert f"warning: source folder {src} has no checkpoint for epoch(s) 2 of 1-3" in result.output
    assert [c.name for c in Run(tmp_path / "run").checkpoints()] == ["e0001.h5", "e0003.h5"]


def test_a_model_file_inside_the_source_folder_is_no_checkpoint(keras_run, tmp_path):
    src = _copy(keras_run, tmp_path)
    shutil.copy(keras_run.model_file(), src / "model.keras")

    run = adopt(src, tmp_path / "run", model_file=src / "model.keras")

    assert [c.name for c in run.checkpoints()] == ["e0001.h5", "e0002.h5", "e0003.h5"]
    assert run.manifest["adopted"]["files"]["e0001.h5"] == "ckpt-001.weights.h5"


def test_a_log_longer_than_the_checkpoints_is_a_gap(keras_run, tmp_path):
    src = _copy(keras_run, tmp_path, epochs=(1, 2))

    with pytest.raises(AdoptError, match=r"no checkpoint for epoch\(s\) 3 of 1-3"):
        adopt(src, tmp_path / "run", model_file=keras_run.model_file(), log=keras_run.log)


@pytest.mark.parametrize("via", ["api", "cli"])
def test_an_existing_run_folder_is_left_alone(keras_run, tmp_path, via):
    target = tmp_path / "native"
    shutil.copytree(keras_run.native, target)
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}

    if via == "api":
        with pytest.raises(RunExistsError, match=f"{target} is already a run folder"):
            adopt(keras_run.models, target)
    else:
        result = invoke("adopt", keras_run.models, target)
        assert result.exit_code == 1
        assert f"Error: {target} is already a run folder" in result.output

    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob(".native.adopt-*"))


def test_a_folder_with_other_files_is_refused(keras_run, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")

    with pytest.raises(RunExistsError, match="already exists and is not an empty folder"):
        adopt(keras_run.models, tmp_path / "run")
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--pattern", "ckpt-{val_loss:.2f}.keras"], "has no {epoch} field"),
        (["--pattern", "ckpt-{epoch"], "is not Keras' filepath syntax"),
        (["--model", "m:build", "--model-file", "x.keras"], "pass --model or --model-file"),
    ],
)
def test_usage_errors_exit_2(keras_run, tmp_path, monkeypatch, args, text):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.keras").write_bytes(b"")
    result = invoke("adopt", keras_run.models, tmp_path / "run", *args)
    assert result.exit_code == 2, result.output
    assert text in result.output
    assert nothing_left(tmp_path / "run")


def test_pattern_without_epoch_is_refused_by_the_api(keras_run, tmp_path):
    with pytest.raises(AdoptError, match=r"has no \{epoch\} field"):
        adopt(keras_run.models, tmp_path / "run", pattern="model-{val_loss}.keras")
    assert nothing_left(tmp_path / "run")


def test_a_builder_and_a_model_file_together_are_refused_by_the_api(keras_run, tmp_path):
    with pytest.raises(AdoptError, match=r"pass model \(a builder\) or model_file"):
        adopt(keras_run.models, tmp_path / "run", model=build_model, model_file="x.keras")
    assert nothing_left(tmp_path / "run")


@pytest.mark.parametrize("which", ["src", "run_dir", "model_file"])
def test_a_url_is_refused_before_anything_is_written(keras_run, tmp_path, which):
    paths = {"src": keras_run.weights, "run_dir": tmp_path / "run"}
    paths["model_file"] = keras_run.model_file()
    paths[which] = "s3://bucket/somewhere"

    with pytest.raises(AdoptError, match="local folders only, not 's3://bucket/somewhere'") as e:
        adopt(paths["src"], paths["run_dir"], model_file=paths["model_file"])

    assert e.value.usage
    assert not (tmp_path / "run").exists()
