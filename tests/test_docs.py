"""The README agrees with the code: its options table names every option of `raycnn run`, its
code table every module."""
from __future__ import annotations

import pkgutil
import re
from pathlib import Path

import raycnn
from raycnn import cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_the_options_table_names_every_option_of_run():
    table = [line for line in README.splitlines() if line.startswith("| `--")]
    documented = {opt for line in table for opt in re.findall(r"`(--[a-z-]+)", line.split(" | ")[0])}
    run = cli.parser()._subparsers._group_actions[0].choices["run"]
    options = {o for action in run._actions for o in action.option_strings if o.startswith("--") and o != "--help"}
    assert documented == options


def test_the_code_table_names_every_module():
    listed = set(re.findall(r"^\| `raycnn/(\w+)\.py` \|", README, flags=re.M))
    modules = {m.name for m in pkgutil.iter_modules(raycnn.__path__)}
    assert listed == modules
