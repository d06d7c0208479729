"""The committed results: every run that results/README.md publishes (a `## RUN: ...` section)
renders, from its Parquet files, exactly the tables the README shows for it. A rerun, an edit of
the README or a change to the table renderer that would make the two disagree fails here.

Only published runs are checked: a user's own run folder beside them (new runs go to the
git-ignored runs/ by default, but `--results-dir results` is allowed) never fails this test."""
import re
import shutil
from pathlib import Path

import pytest

from raycnn import results, tables

RESULTS = Path(__file__).resolve().parents[1] / "results"


def published_runs(results_dir: Path) -> list[Path]:
    """The run folders results_dir/README.md has a `## RUN: ...` section for, in README order."""
    readme = (results_dir / "README.md").read_text()
    return [results_dir / name for name in re.findall(r"(?m)^## ([^\s:]+):", readme)]


RUNS = published_runs(RESULTS)


def _grids(markdown: str) -> list[str]:
    """The pipe-table blocks of a markdown text, each as one string."""
    blocks, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    return blocks


def test_results_has_runs():
    assert RUNS, "results/README.md publishes no run"
    for run in RUNS:
        assert (run / results.TRIALS_FILE).is_file(), f"results/README.md publishes {run.name}, which has no Parquet"


def test_a_user_run_beside_the_published_ones_is_not_checked(tmp_path):
    published = RUNS[0]
    shutil.copytree(published, tmp_path / published.name, ignore=shutil.ignore_patterns("plots"))
    shutil.copy(RESULTS / "README.md", tmp_path / "README.md")
    mine = tmp_path / "mnist-20260101-120000"          # what `raycnn run mnist --results-dir results` makes
    results.write_parquet(results.load_run(published)[0], mine / results.TRIALS_FILE)
    found = published_runs(tmp_path)
    assert mine not in found and tmp_path / published.name in found


def expected_markdown(run: Path, section: str, capsys) -> str:
    """What a published run's section must show: a run's tables, from its Parquet files; a
    search's view (`raycnn search`), as the section's own `raycnn table` command renders it,
    since its "grid (ours)" column comes from the runs that command names."""
    from raycnn import cli, search
    if not search.is_search(run):
        return tables.render(results.load_run(run)[0], "markdown")
    commands = re.findall(rf"(?m)^    raycnn table (results/{re.escape(run.name)} .*--format markdown.*)$", section)
    assert commands, f"{run.name}: a search's section needs its `raycnn table results/{run.name} ... --format markdown`"
    root = run.parent.parent
    assert cli.main(["table", *(str(root / a) if a.startswith("results/") else a for a in commands[0].split())]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_published_tables_match_parquet(run, capsys):
    readme = (RESULTS / "README.md").read_text()
    section = readme.split(f"## {run.name}:", 1)[1].split("\n## ", 1)[0]
    rendered = _grids(expected_markdown(run, section, capsys))
    assert rendered
    for grid in rendered:
        assert grid in section, f"{run.name}: table not published as rendered:\n{grid}"


README = RESULTS.parent / "README.md"
HEADLINE_COMMANDS = re.findall(r"(?m)^    (raycnn table results/.* --format markdown.*)$", README.read_text())


def test_readme_headline_tables_are_generated():
    assert len(HEADLINE_COMMANDS) >= 2, "README.md's headline tables lost their raycnn table commands"


@pytest.mark.parametrize("command", HEADLINE_COMMANDS)
def test_readme_headline_tables_match_their_command(command, capsys):
    from raycnn import cli
    root = RESULTS.parent
    argv = [str(root / a) if a.startswith("results/") else a for a in command.split()[1:]]
    assert cli.main(argv) == 0
    # The README puts the report's tables one heading level down; the grids are verbatim.
    after = README.read_text().split(command, 1)[1]
    for grid in _grids(capsys.readouterr().out):
        assert grid in after.split("\n    raycnn ", 1)[0], f"README.md: not as `{command}` renders it:\n{grid}"
