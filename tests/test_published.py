"""The committed results: every run under results/ renders, from its Parquet files, exactly the
tables that results/README.md publishes for it. A rerun, an edit of the README or a change to the
table renderer that would make the two disagree fails here."""
from pathlib import Path

import pytest

from raycnn import results

RESULTS = Path(__file__).resolve().parents[1] / "results"
RUNS = sorted(p.parent for p in RESULTS.glob("*/trials.parquet"))


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
    assert RUNS, "no committed runs under results/"


@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_published_tables_match_parquet(run):
    readme = (RESULTS / "README.md").read_text()
    assert f"## {run.name}:" in readme, f"results/README.md has no section for {run.name}"
    section = readme.split(f"## {run.name}:", 1)[1].split("\n## ", 1)[0]
    trials, _ = results.load_run(run)
    rendered = _grids(results.render(trials, "markdown"))
    assert rendered
    for grid in rendered:
        assert grid in section, f"{run.name}: table not published as rendered:\n{grid}"
