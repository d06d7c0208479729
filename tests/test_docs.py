"""The README agrees with the code: its options table names every option of `raycnn run`, its
code table every module."""
from __future__ import annotations

import pkgutil
import re
from pathlib import Path

import raycnn
from raycnn import cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _options(command: str) -> set[str]:
    parser = cli.parser()._subparsers._group_actions[0].choices[command]
    return {o for action in parser._actions for o in action.option_strings if o.startswith("--") and o != "--help"}


def test_the_options_tables_name_every_option_of_run_and_search():
    """The options table of `raycnn run`; the search's table names the options run does not
    have, and the line below it every other option of search."""
    table = [line for line in README.splitlines() if line.startswith("| `--")]
    documented = {opt for line in table for opt in re.findall(r"`(--[a-z-]+)", line.split(" | ")[0])}
    assert documented == _options("run") | (_options("search") - _options("run"))
    search = README.split("## Search", 1)[1].split("\n## ", 1)[0]
    assert {o for o in _options("search") if f"`{o}" not in search} == set()


def test_the_code_table_names_every_module():
    listed = set(re.findall(r"^\| `raycnn/(\w+)\.py` \|", README, flags=re.M))
    modules = {m.name for m in pkgutil.iter_modules(raycnn.__path__)}
    assert listed == modules
