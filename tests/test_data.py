"""Data sources for replay: the manifest's data factory is code a run folder names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trueloss_replay.data import check_recorded_factory, resolve_splits
from trueloss_replay.errors import DataError
from trueloss_replay.run import Run

USER_FACTORY = """
import numpy as np

def load():
    x = np.arange(12, dtype="float32").reshape(3, 4)
    return {"train": (x, np.array([0, 1, 2])), "val": None}
"""


def record_factory(run_dir: Path, reference: str) -> Run:
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["data"] = reference
    path.write_text(json.dumps(manifest))
    return Run(run_dir)


@pytest.mark.parametrize(
    "reference, home",
    [
        ("os:getcwd", "the standard library"),
        ("os.path:abspath", "the standard library"),
        ("sys:getrecursionlimit", "the standard library"),
        ("h5py:get_config", "the installed package 'h5py'"),
        ("numpy.random:default_rng", "the installed package 'numpy'"),
    ],
)
def test_recorded_factory_in_stdlib_or_installed_package_is_refused(run_copy, reference, home):
    run = record_factory(run_copy, reference)

    with pytest.raises(DataError) as caught:
        resolve_splits(run)

    message = str(caught.value)
    assert f"the data factory {reference!r} recorded in {run_copy / 'manifest.json'}" in message
    assert f"resolves to {home}" in message
    assert "trust_data_factory=True" in message and "data=" in message


def test_recorded_factory_of_the_users_own_module_is_called(run_copy, tmp_path, monkeypatch):
    (tmp_path / "tlr_user_data.py").write_text(USER_FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = record_factory(run_copy, "tlr_user_data:load")

    splits = resolve_splits(run)

    assert splits["train"].count == 3
    np.testing.assert_array_equal(splits["train"].y, [0, 1, 2])


def test_trusted_recorded_factory_is_called(run_copy):
    run = record_factory(run_copy, "os:getcwd")

    # Called this time: os.getcwd returns a string, which is no (train, val) data.
    with pytest.raises(DataError, match=r"data factory os:getcwd returned str"):
        resolve_splits(run, trust_data_factory=True)


def test_factory_passed_by_the_caller_is_called_wherever_it_lives(run_copy):
    run = record_factory(run_copy, "tlr_never_imported:load")

    with pytest.raises(DataError, match=r"data factory os:getcwd returned str"):
        resolve_splits(run, data="os:getcwd")


def test_check_recorded_factory_accepts_a_module_that_is_not_installed():
    check_recorded_factory("tlr_no_such_module:load")  # its import reports it, not the policy


def test_unimportable_recorded_factory_says_where_it_came_from(run_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = record_factory(run_copy, "tlr_gone_module:load")

    with pytest.raises(DataError) as caught:
        resolve_splits(run)

    message = str(caught.value)
    assert f"'tlr_gone_module:load' recorded in {run_copy / 'manifest.json'}" in message
    assert "cannot import module 'tlr_gone_module'" in message
    assert "data='module:function'" in message and "train= and val=" in message
    assert "--" not in message  # the API's words; the command line shows its flags
