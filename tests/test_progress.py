"""Progress bars of replay() and explain(): on by default, silent with progress=False."""

from __future__ import annotations

import pytest

from tests.conftest import EPOCHS
from trueloss_replay import explain, replay

CHECKPOINTS = EPOCHS + 1  # e0000 (before training) and one per epoch


def test_replay_shows_progress_by_default(run_copy, capsys):
    replay(run_copy)

    out, err = capsys.readouterr()
    assert out == ""
    assert "checkpoints" in err and f"{CHECKPOINTS}/{CHECKPOINTS}" in err
    assert "batches" in err and "examples/s" in err


def test_replay_progress_false_is_silent(run_copy, capsys):
    history = replay(run_copy, progress=False)

    assert capsys.readouterr() == ("", "")
    assert len(history.history["loss"]) == EPOCHS


@pytest.mark.parametrize("progress", [True, False])
def test_explain_shows_the_replay_then_the_training_mode_pass(progress, replayed_run, capsys):
    explain(replayed_run, seeds=1, progress=progress)

    out, err = capsys.readouterr()
    assert out == ""
    if progress:
        assert "checkpoints" in err and f"{CHECKPOINTS}/{CHECKPOINTS}" not in err  # epoch ends
        assert "training mode" in err and f"{EPOCHS}/{EPOCHS}" in err
    else:
        assert err == ""


NOTEBOOK_CELL = """
from trueloss_replay.progress import RichProgress

with RichProgress() as bars:
    bars.start(3, 2)
    for _ in range(3):
        bars.advance(50)
        bars.advance(50)
        bars.checkpoint_done({}, reused=False)
"""


def test_progress_in_a_notebook_is_one_display_updated_in_place():
    """A real Jupyter kernel: the bars are HTML in the saved notebook, shown once."""
    import nbclient
    import nbformat

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(NOTEBOOK_CELL)])
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3").execute()

    outputs = notebook.cells[0].outputs
    assert [o["output_type"] for o in outputs] == ["display_data"], outputs
    html = outputs[0]["data"]["text/html"]
    assert "checkpoints" in html and "3/3" in html and "<pre" in html
    assert "examples/s" in outputs[0]["data"]["text/plain"]
