"""The scripts in examples/ run end to end, as a user runs them: real subprocesses, 2 epochs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

pytest.importorskip("sklearn")  # the examples use scikit-learn's bundled digits data

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
EPOCHS = 2


def run_example(name: str, out: Path, cwd: Path) -> str:
    """Runs examples/<name> with small settings; returns its stdout."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--epochs", str(EPOCHS), "--out", str(out)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def printed(stdout: str, label: str) -> float:
    match = re.search(rf"^{re.escape(label)}\s+([-+0-9.e]+)", stdout, re.MULTILINE)
    assert match, f"{label!r} not printed:\n{stdout}"
    return float(match.group(1))


def checkpoint_names(run_dir: Path, folder: str, suffix: str) -> list[str]:
    return sorted(p.name for p in (run_dir / folder).glob(f"*{suffix}"))


def expected_names(suffix: str) -> list[str]:
    return [f"e{epoch:04d}{suffix}" for epoch in range(EPOCHS + 1)]


def test_digits_demo(tmp_path):
    out = tmp_path / "digits"
    stdout = run_example("digits_demo.py", out, cwd=tmp_path)

    run_dir = out / "run"
    assert checkpoint_names(run_dir, "checkpoints", ".h5") == expected_names(".h5")
    assert checkpoint_names(run_dir, "replay/results", ".json") == expected_names(".json")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"epoch {EPOCHS} of {EPOCHS}" in stdout

    # The reported figures are what Keras logged at the last epoch end.
    manifest = json.loads((run_dir / "manifest.json").read_text())
    logs = manifest["checkpoints"][-1]["logs"]
    assert printed(stdout, "reported loss") == pytest.approx(logs["loss"], abs=1e-6)
    assert printed(stdout, "reported val_loss") == pytest.approx(logs["val_loss"], abs=1e-6)

    # The true val_loss, recomputed here: the last weights, inference mode, cross-entropy in
    # numpy on the validation snapshot.
    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    with h5py.File(run_dir / "checkpoints" / f"e{EPOCHS:04d}.h5", "r") as f:
        # Stored as weights/sequential/<layer>/<variable>; the loaded layers keep their names.
        for layer in model.layers:
            for variable in layer.weights:
                variable.assign(f["weights"]["sequential"][layer.name][variable.name][()])
    with h5py.File(run_dir / "data" / "val.h5", "r") as f:
        xv, yv = f["x"][()], f["y"][()]
    probs = keras.ops.convert_to_numpy(model(xv, training=False)).astype("float64")
    true_val_loss = -np.mean(np.log(probs[np.arange(len(yv)), yv]))
    assert printed(stdout, "true val_loss") == pytest.approx(true_val_loss, abs=1e-5)
    # Keras' val_loss is that data loss plus the L2 penalty.
    penalty = printed(stdout, "regularization_loss")
    assert penalty > 0
    assert logs["val_loss"] == pytest.approx(true_val_loss + penalty, abs=1e-4)


def load_example_module(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tfdata_augmentation_factory_is_deterministic():
    module = load_example_module("tfdata_augmentation")
    first, second = module.load_data(), module.load_data()
    (x, y), (xv, yv) = module.digits_images()
    for split, (xs, ys) in (("train", (x, y)), ("val", (xv, yv))):
        batches = [list(first[split]), list(second[split])]
        for run in batches:
            np.testing.assert_array_equal(np.concatenate([b[0] for b in run]), xs)
            np.testing.assert_array_equal(np.concatenate([b[1] for b in run]), ys)


def test_tfdata_augmentation(tmp_path):
    out = tmp_path / "tfdata"
    stdout = run_example("tfdata_augmentation.py", out, cwd=EXAMPLES)

    run_dir = out / "run"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["data"] == "tfdata_augmentation:load_data"
    assert not (run_dir / "data").exists()  # a tf.data pipeline is referenced, not copied
    assert checkpoint_names(run_dir, "replay/results", ".json") == expected_names(".json")
    last = json.loads((run_dir / "replay" / "results" / f"e{EPOCHS:04d}.json").read_text())
    assert last["data"]["train"]["kind"] == "tf.data"
    assert last["examples"] == {"train": 1437, "val": 360}
    assert (out / "curves.png").is_file()

    rows = re.findall(r"^\s*(\d+)((?:\s+[-0-9.]+){4})\s*$", stdout, re.MULTILINE)
    assert [int(epoch) for epoch, _ in rows] == list(range(1, EPOCHS + 1)), stdout
    for (_, numbers), entry in zip(rows, manifest["checkpoints"][1:], strict=True):
        reported, true, reported_val, true_val = map(float, numbers.split())
        assert reported == pytest.approx(entry["logs"]["loss"], abs=1e-6)
        assert reported_val == pytest.approx(entry["logs"]["val_loss"], abs=1e-6)
        # No weight penalty: Keras' val_loss is already the inference-mode data loss.
        assert true_val == pytest.approx(reported_val, abs=1e-5)
        assert true != pytest.approx(reported, abs=1e-3)  # augmentation + dropout
    gap = float(re.search(r"differ by ([-+0-9.e]+)", stdout).group(1))
    assert gap < 1e-5


def test_custom_objects(tmp_path):
    out = tmp_path / "custom"
    stdout = run_example("custom_objects.py", out, cwd=EXAMPLES)

    # Without --import: exit 1, the missing object named, --import suggested.
    assert "--no-progress   (exit 1)" in stdout
    assert "'examples>ResidualDense'" in stdout
    assert "pass the module that defines it with --import" in stdout
    # With --import custom_objects: the summary table.
    assert "true loss of" in stdout

    run_dir = out / "run"
    assert checkpoint_names(run_dir, "replay/results", ".json") == expected_names(".json")
    history = json.loads((run_dir / "replay" / "history.json").read_text())["history"]
    assert len(history["loss"]) == EPOCHS
    # The custom metric was replayed on both sets.
    for key in ("confident_accuracy", "val_confident_accuracy"):
        assert all(0.0 <= value <= 1.0 for value in history[key])
    # The custom layer's L2 penalty is reported apart from the focal (data) loss.
    assert all(value > 0 for value in history["regularization_loss"])
