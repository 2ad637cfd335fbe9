"""The README is the user's manual: it must cover every command and stay true to the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trueloss_replay.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_begins_with_the_two_commands():
    first_block = README.split("```")[1]
    assert "scripts/demo" in first_block and "scripts/test" in first_block


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_has_help_and_an_example_in_the_readme(name):
    command = main.commands[name]
    assert command.help and "Example:" in command.help, f"{name} has no help with an example"
    assert f"trueloss-replay {name} " in README, f"README shows no example of {name}"


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_option_is_in_the_readme(name):
    for param in main.commands[name].params:
        for opt in getattr(param, "opts", []):
            if opt.startswith("--") and opt != "--help":
                assert opt in README, f"README does not mention {name} {opt}"


def test_public_names_are_documented():
    import trueloss_replay

    for name in ("ReplayCheckpoint", "replay", "load_history", "load_frame", "plot_history"):
        assert name in trueloss_replay.__all__
        assert f"{name}(" in README


def test_importing_the_package_starts_neither_tensorflow_nor_matplotlib():
    code = (
        "import sys, trueloss_replay, trueloss_replay.cli\n"
        "print(sorted(m for m in ('tensorflow', 'keras', 'matplotlib') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_scripts_are_executable():
    for script in ("scripts/demo", "scripts/test", ".ci/run"):
        assert (ROOT / script).stat().st_mode & 0o111, f"{script} is not executable"


def test_public_names_stay_themselves_after_every_module_is_imported():
    # A module named like a public function (explain.py beside explain()) replaces that
    # function on the package as soon as anything imports the module.
    code = (
        "import importlib, pkgutil, types, trueloss_replay\n"
        "for m in pkgutil.walk_packages(trueloss_replay.__path__, 'trueloss_replay.'):\n"
        "    importlib.import_module(m.name)\n"
        "from trueloss_replay import *\n"
        "print(sorted(n for n in trueloss_replay.__all__\n"
        "             if isinstance(getattr(trueloss_replay, n), types.ModuleType)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
