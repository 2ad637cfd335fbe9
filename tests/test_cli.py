"""The history, plot, inspect and export commands, through Click's CliRunner."""

from __future__ import annotations

import csv
import io
import json

import h5py
import pytest
from click.testing import CliRunner

from tests.conftest import EPOCHS, build_model, make_data
from trueloss_replay import ReplayCheckpoint, load_weights
from trueloss_replay.cli import main
from trueloss_replay.errors import RunFormatError
from trueloss_replay.history import read_json
from trueloss_replay.run import read_weights

COMMANDS = ["history", "plot", "inspect", "export"]


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def expected(replay_results, split: str, key: str) -> list[float]:
    return [replay_results[f"e{e:04d}.h5"][split][key] for e in range(1, EPOCHS + 1)]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    result = invoke(command, "--help")

    assert result.exit_code == 0, result.output
    assert "Example:" in result.output
    assert f"trueloss-replay {command} runs/exp1" in result.output


# --------------------------------------------------------------------------- history


def test_history_table(replayed_run, replay_results):
    result = invoke("history", replayed_run)

    assert result.exit_code == 0, result.output
    assert "regularization_loss" in result.output
    assert "reported_val_loss" in result.output
    assert f"{expected(replay_results, 'train', 'loss')[-1]:.4f}" in result.output


def test_history_csv_to_stdout(replayed_run, replay_results):
    result = invoke("history", replayed_run, "--format", "csv")

    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert [float(r["loss"]) for r in rows] == expected(replay_results, "train", "loss")
    assert [float(r["val_accuracy"]) for r in rows] == expected(replay_results, "val", "accuracy")


def test_history_json_file_from_the_suffix(replayed_run, replay_results, tmp_path):
    path = tmp_path / "true.json"

    result = invoke("history", replayed_run, "-o", path)

    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {path}\n"
    assert read_json(path).history["loss"] == expected(replay_results, "train", "loss")


def test_history_full_lists_every_checkpoint(replayed_run):
    result = invoke("history", replayed_run, "--full", "--format", "csv")

    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert [r["checkpoint"] for r in rows] == [f"e{e:04d}.h5" for e in range(EPOCHS + 1)]


def test_history_of_a_run_not_replayed_fails_on_one_line(run_copy):
    result = invoke("history", run_copy)

    assert result.exit_code == 1
    assert result.output.startswith("Error: ")
    assert "holds no replay results. Replay the run first" in result.output
    assert result.output.count("\n") == 1
    assert "Traceback" not in result.output


def test_debug_shows_the_exception(run_copy):
    result = invoke("--debug", "history", run_copy)

    assert result.exit_code == 1
    assert isinstance(result.exception, RunFormatError)


def test_history_of_a_damaged_result_names_it(replayed_run):
    (replayed_run / "replay" / "results" / "e0002.json").write_text("{")

    result = invoke("history", replayed_run)

    assert result.exit_code == 1
    assert "e0002.json cannot be read" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "xml"], "Invalid value for '--format'"),
        (["-o", "history.txt"], "cannot tell the format of 'history.txt'"),
        (["--format", "table", "-o", "h.csv"], "--format table prints to the terminal"),
    ],
)
def test_history_usage_errors(replayed_run, args, message):
    result = invoke("history", replayed_run, *args)

    assert result.exit_code == 2
    assert message in result.output


def test_missing_run_folder_is_a_usage_error(tmp_path):
    result = invoke("history", tmp_path / "nowhere")

    assert result.exit_code == 2
    assert "does not exist" in result.output


# --------------------------------------------------------------------------- plot


def test_plot_writes_curves_png_by_default(replayed_run):
    result = invoke("plot", replayed_run)

    path = replayed_run / "replay" / "curves.png"
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {path}\n"
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_plot_warns_about_epochs_not_replayed(replayed_run):
    (replayed_run / "replay" / "results" / "e0002.json").unlink()

    result = invoke("plot", replayed_run)

    assert result.exit_code == 0, result.output
    assert result.output.startswith("Warning: trueloss-replay: loss, accuracy, ")
    assert result.output.count("Warning:") == 1


def test_plot_svg_with_one_metric(replayed_run, tmp_path):
    path = tmp_path / "loss.svg"

    result = invoke("plot", replayed_run, "-o", path, "--metric", "loss")

    assert result.exit_code == 0, result.output
    svg = path.read_text()
    assert "train (true)" in svg
    assert "accuracy" not in svg


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metric", "f1"], "Invalid value for '--metric': the History has no 'f1' to plot"),
        (["-o", "curves.gif"], "Invalid value for '-o': cannot save a figure as 'curves.gif'"),
    ],
)
def test_plot_usage_errors(replayed_run, args, message):
    result = invoke("plot", replayed_run, *args)

    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_plot_of_a_run_not_replayed_fails(run_copy):
    result = invoke("plot", run_copy)

    assert result.exit_code == 1
    assert "holds no replay results" in result.output


# --------------------------------------------------------------------------- inspect


def test_inspect_shows_manifest_and_checkpoints(replayed_run, trained_run):
    (replayed_run / "replay" / "results" / "e0003.json").unlink()

    result = invoke("inspect", replayed_run)

    assert result.exit_code == 0, result.output
    assert "finished" in result.output
    assert "keras 3." in result.output
    assert f"{EPOCHS} of {EPOCHS + 1} checkpoints" in result.output
    rows = [line for line in result.output.splitlines() if line.startswith("│")]
    lines = {line.split()[1]: line for line in rows}
    assert set(lines) == {f"e{e:04d}.h5" for e in range(EPOCHS + 1)}
    assert lines["e0002.h5"].split()[-2] == "yes"
    assert lines["e0003.h5"].split()[-2] == "no"
    assert f"{trained_run.history.history['loss'][-1]:.4f}" in lines["e0003.h5"]


def test_inspect_verify_passes_on_a_good_run(replayed_run):
    result = invoke("inspect", replayed_run, "--verify")

    assert result.exit_code == 0, result.output
    assert f"all {EPOCHS + 1} checkpoints verified." in result.output


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def recorded_variable(run_dir, position: int) -> str:
    """The name the run recorded for its variable at ``position`` (Keras' auto-generated
    names depend on the models built before it in the process)."""
    return json.loads((run_dir / "manifest.json").read_text())["variables"][position][0]


def drop_a_variable(path):
    key = recorded_variable(path.parent.parent, 7)  # the last Dense layer's bias
    with h5py.File(path, "a") as f:
        del f["weights"][key]


@pytest.mark.parametrize("damage", [truncate, drop_a_variable])
def test_inspect_verify_names_a_damaged_checkpoint(replayed_run, damage):
    damage(replayed_run / "checkpoints" / "e0002.h5")

    result = invoke("inspect", replayed_run, "--verify")

    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"Error: 1 of {EPOCHS + 1} checkpoints failed verification: e0002.h5")


def resumed_run(tmp_path):
    """A run of build_model() resumed at epoch 2 with a rebuilt model: every variable of
    the manifest is named sequential_1/dense_2/... where e0000-e0002 have sequential/dense/..."""
    path = tmp_path / "run"
    x, y = make_data(96)
    fit = {"batch_size": 32, "verbose": 0}
    build_model().fit(x, y, epochs=2, callbacks=[ReplayCheckpoint(path)], **fit)
    model = build_model()
    load_weights(model, path / "checkpoints" / "e0002.h5")
    model.fit(x, y, epochs=3, initial_epoch=2, callbacks=[ReplayCheckpoint(path)], **fit)
    stored = list(read_weights(path / "checkpoints" / "e0000.h5"))
    assert [v[0] for v in json.loads((path / "manifest.json").read_text())["variables"]] != stored
    return path


def test_inspect_verify_passes_on_a_run_resumed_with_a_rebuilt_model(tmp_path):
    path = resumed_run(tmp_path)

    result = invoke("inspect", path, "--verify")

    assert result.exit_code == 0, result.output
    assert "all 4 checkpoints verified." in result.output


def test_inspect_verify_names_a_variable_missing_after_a_resume(tmp_path):
    path = resumed_run(tmp_path)
    damaged = path / "checkpoints" / "e0001.h5"
    dropped = 2  # the first BatchNormalization variable
    with h5py.File(damaged, "a") as f:
        del f[f"weights/{list(read_weights(damaged))[dropped]}"]
    variables = json.loads((path / "manifest.json").read_text())["variables"]

    result = invoke("inspect", path, "--verify")

    assert result.exit_code == 1
    last = " ".join(result.output.strip().splitlines()[-1].split())
    assert last.startswith("Error: 1 of 4 checkpoints failed verification: e0001.h5: ")
    assert f"has no variable {variables[dropped][0]!r} (the model has 8 variables, the file 7)" in (
        last
    )


def test_inspect_without_verify_marks_an_unreadable_checkpoint(replayed_run):
    truncate(replayed_run / "checkpoints" / "e0002.h5")

    result = invoke("inspect", replayed_run)

    assert result.exit_code == 0, result.output
    assert "e0002.h5 (unreadable)" in result.output


def test_inspect_a_folder_that_is_not_a_run(tmp_path):
    result = invoke("inspect", tmp_path)

    assert result.exit_code == 1
    assert f"{tmp_path} has no manifest.json; it is not a trueloss-replay run folder" in (
        " ".join(result.output.split())
    )


# --------------------------------------------------------------------------- export


def read_scalars(folder) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of a TensorBoard run folder, read by TensorBoard itself."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(
        str(folder), size_guidance={event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    return {
        tag: {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}
        for tag in acc.Tags()["tensors"]
    }


@pytest.mark.parametrize("option", ["--logdir", "--tensorboard"])
def test_export_tensorboard_scalars(option, replayed_run, replay_results, trained_run, tmp_path):
    (replayed_run / "replay" / "results" / "e0002.json").unlink()
    logdir = tmp_path / "logs"

    result = invoke("export", replayed_run, option, logdir)

    assert result.exit_code == 0, result.output
    assert f"wrote {logdir / 'train_true'}" in result.output
    train, val = read_scalars(logdir / "train_true"), read_scalars(logdir / "validation_true")
    assert {"epoch_loss", "epoch_accuracy", "epoch_regularization_loss"} <= set(train)
    loss = expected(replay_results, "train", "loss")
    assert set(train["epoch_loss"]) == {0, 2}  # epoch 2 is not replayed: no point
    for step in (0, 2):
        assert train["epoch_loss"][step] == pytest.approx(loss[step], rel=1e-6)
        val_loss = expected(replay_results, "val", "loss")[step]
        assert val["epoch_loss"][step] == pytest.approx(val_loss, rel=1e-6)
    reported = read_scalars(logdir / "train")["epoch_loss"]
    assert [reported[s] for s in range(EPOCHS)] == pytest.approx(
        trained_run.history.history["loss"]
    )


def test_export_tensorboard_alias_is_hidden():
    result = invoke("export", "--help")

    assert result.exit_code == 0, result.output
    assert "--logdir" in result.output and "--tensorboard" not in result.output


def test_export_no_reported(replayed_run, tmp_path):
    result = invoke("export", replayed_run, "--logdir", tmp_path / "logs", "--no-reported")

    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [
        "train_true",
        "validation_true",
    ]


def test_export_needs_a_target(replayed_run):
    result = invoke("export", replayed_run)

    assert result.exit_code == 2
    assert "Missing option '--logdir'" in result.output


def test_export_of_a_run_not_replayed_fails(run_copy, tmp_path):
    result = invoke("export", run_copy, "--logdir", tmp_path / "logs")

    assert result.exit_code == 1
    assert "holds no replay results" in result.output


# --------------------------------------------------------------------------- untrusted run folders


def one_line_error(result) -> str:
    """The ``Error: ...`` line of a failed command, checked to be its last line."""
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output
    assert lines[-1].startswith("Error: "), result.output
    return lines[-1]


def test_inspect_verify_names_a_checkpoint_declaring_a_huge_variable(replayed_run):
    path = replayed_run / "checkpoints" / "e0002.h5"
    key = recorded_variable(replayed_run, 0)  # the first Dense layer's kernel
    with h5py.File(path, "r+") as f:
        del f["weights"][key]
        f["weights"].create_dataset(key, shape=(2**20, 2**20), dtype="float32")

    result = invoke("inspect", replayed_run, "--verify")

    assert result.exit_code == 1
    line = one_line_error(result)
    assert line.startswith(f"Error: 1 of {EPOCHS + 1} checkpoints failed verification: e0002.h5")
    assert f"variable {key!r} has shape (1048576, 1048576), the model expects (8, 16)" in line


@pytest.mark.parametrize("command", ["history", "inspect", "replay", "plot"])
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("version", "one", "field 'version' is str 'one', not an integer"),
        ("params", "epochs=3", "field 'params' must be an object"),
        ("data_files", ["data/train.h5"], "field 'data_files' must be an object"),
        ("checkpoints", "e0001.h5", "field 'checkpoints' must be a list"),
    ],
)
def test_manifest_field_of_the_wrong_type_fails_on_one_line(
    replayed_run, command, field, value, message
):
    path = replayed_run / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))

    result = invoke(command, replayed_run)

    assert result.exit_code == 1, result.output
    assert one_line_error(result) == " ".join(one_line_error(result).split())
    assert f"{path}: {message}" in one_line_error(result)


@pytest.mark.parametrize("field, value", [("version", "1.0"), ("train", "0.5")])
def test_history_of_a_result_of_the_wrong_type_names_it(replayed_run, field, value):
    path = replayed_run / "replay" / "results" / "e0002.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))

    result = invoke("history", replayed_run)

    assert result.exit_code == 1
    line = one_line_error(result)
    assert f"result file {path}" in line and repr(field) in line


@pytest.mark.parametrize("fmt", ["table", "csv"])
def test_history_into_a_closed_pipe_exits_quietly(replayed_run, fmt):
    import subprocess
    import sys
    from pathlib import Path

    command = [Path(sys.executable).parent / "trueloss-replay", "history", replayed_run]
    process = subprocess.Popen(
        [*command, "--format", fmt], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()  # as `| head -0` does, before the command writes its first line
    stderr = process.stderr.read().decode()
    process.wait(timeout=60)

    assert "Error" not in stderr and "Traceback" not in stderr and "Exception" not in stderr


def test_recorded_stdlib_data_factory_needs_trust(run_copy):
    path = run_copy / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "data": "os:getcwd"}))

    refused = invoke("replay", run_copy, "--no-progress")
    trusted = invoke("replay", run_copy, "--no-progress", "--trust-data-factory")

    assert refused.exit_code == 1 and trusted.exit_code == 1
    assert "resolves to the standard library" in one_line_error(refused)
    assert "--trust-data-factory" in one_line_error(refused)
    # Confirmed, it is called: os.getcwd returns a string, which is no data.
    assert "data factory os:getcwd returned str" in one_line_error(trusted)


# --------------------------------------------------------------------------- option names


@pytest.mark.parametrize("flag", ["-o", "--output"])
def test_plot_output_is_the_figure_file(replayed_run, tmp_path, flag):
    path = tmp_path / "curves.png"

    result = invoke("plot", replayed_run, flag, path)

    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {path}\n"
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize("flag", ["--output", "--out"])
def test_history_output_is_the_file_and_out_still_works(
    replayed_run, replay_results, tmp_path, flag
):
    path = tmp_path / "true.csv"

    result = invoke("history", replayed_run, flag, path)

    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert [float(r["loss"]) for r in rows] == pytest.approx(
        expected(replay_results, "train", "loss")
    )


@pytest.mark.parametrize(
    ("command", "extra", "without", "with_results"),
    [
        ("history", [], "holds no replay results", "true-loss History"),
        ("plot", [], "holds no replay results", "curves.png"),
        ("inspect", [], "0 of 4 checkpoints", "4 of 4 checkpoints"),
        ("export", ["--tensorboard", "LOGS"], "holds no replay results", "events.out.tfevents"),
    ],
)
def test_results_names_the_results_folder_on_every_command(
    replayed_run, tmp_path, command, extra, without, with_results
):
    moved = tmp_path / "elsewhere"
    (replayed_run / "replay" / "results").rename(moved)
    extra = [str(tmp_path / "logs") if a == "LOGS" else a for a in extra]

    before = invoke(command, replayed_run, *extra)
    after = invoke(command, replayed_run, *extra, "--results", moved)

    assert without in " ".join(before.output.split())
    assert after.exit_code == 0, after.output
    assert with_results in " ".join(after.output.split())


@pytest.mark.parametrize("command", [*COMMANDS, "replay", "explain"])
def test_help_shows_one_meaning_per_option_name(command):
    result = invoke(command, "--help")

    assert result.exit_code == 0, result.output
    assert "--results DIRECTORY" in result.output
    assert "--out " not in result.output  # a hidden alias of -o/--output
    if command in ("history", "plot"):
        assert "-o, --output PATH" in result.output
    else:
        assert "--output" not in result.output  # replay's old --output DIR is hidden


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "def build():\n    raise RuntimeError('no GPU here')\n",
            "the model builder tlr_builder_raises:build (--model) raised RuntimeError: no GPU here",
        ),
        (
            "def build():\n    return None\n",
            "the model builder tlr_builder_none:build (--model) returned NoneType, not a "
            "keras.Model",
        ),
    ],
    ids=["raises", "returns-none"],
)
def test_a_model_builder_that_fails_is_named_on_one_line(
    run_copy, tmp_path, monkeypatch, source, message
):
    module = "tlr_builder_raises" if "raise" in source else "tlr_builder_none"
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.chdir(tmp_path)

    result = invoke("replay", run_copy, "--no-progress", "--model", f"{module}:build")

    assert result.exit_code == 1
    assert message in one_line_error(result)
    assert not list((run_copy / "replay" / "results").glob("*.json"))


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("pass model='module:function'.", "pass --model 'module:function'."),
        ("pass trust_data_factory=True; or data=", "pass --trust-data-factory; or --data"),
        ("train= and val= (arrays)", "--train and --val (arrays)"),
        ("the others with epochs=.", "the others with --epochs."),
        ("results of output=", "results of --results"),
        ("the builder (model=) raised", "the builder (--model) raised"),
        # Not an argument of the command line: kept as written.
        ("ReplayCheckpoint(data=...) or train_data=", "ReplayCheckpoint(data=...) or train_data="),
    ],
)
def test_library_messages_are_shown_with_flags(text, shown):
    from trueloss_replay.cli import FLAGS
    from trueloss_replay.errors import command_line_text

    assert command_line_text(text, FLAGS) == shown


def _error_messages(path):
    """The text of every string given to an ``...Error(...)`` call in a module."""
    import ast

    for node in ast.walk(ast.parse(path.read_text())):
        name = getattr(node, "func", None)
        name = getattr(name, "id", getattr(name, "attr", ""))
        if isinstance(node, ast.Call) and name.endswith("Error"):
            for part in ast.walk(node):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    yield part.value


def test_library_error_messages_name_api_arguments_not_flags():
    import re
    from pathlib import Path

    import trueloss_replay

    package = Path(trueloss_replay.__file__).parent
    flags = {
        f"{path.relative_to(package)}: {text!r}"
        for path in package.rglob("*.py")
        if path.name != "cli.py"
        for text in _error_messages(path)
        if re.search(r"(?<![\w-])--[a-z]", text)
    }
    assert not flags
