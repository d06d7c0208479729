"""`raycnn report`: the page for the published runs, rendered by a real browser (headless
chromium): every report table and figure is in the DOM, every image decodes, a screenshot is
taken; the Markdown form and the committed results/report.md match what the command writes."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raycnn import cli, plots, report, tables

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
README = ROOT / "README.md"
PNG = b"\x89PNG\r\n\x1a\n"


def _report_command(fmt: str) -> list[str]:
    """The README's `raycnn report ...` command for `fmt`, as argv with absolute paths."""
    pattern = r"(?m)^    (raycnn report results/.*)$"
    found = [c for c in re.findall(pattern, README.read_text()) if ("markdown" in c) == (fmt == "markdown")]
    assert found, f"README.md lost its raycnn report command ({fmt})"
    return [str(ROOT / a) if a.startswith("results/") else a for a in found[0].split()[1:]]


def _runs(argv: list[str]) -> list[str]:
    return argv[1:argv.index("-o")]     # the form: report RUN ... -o FILE [--format F]


def test_report_command_covers_the_published_runs():
    published = set(re.findall(r"(?m)^## ([^\s:]+):", (RESULTS / "README.md").read_text()))
    for fmt in ("html", "markdown"):
        assert {Path(r).name for r in _runs(_report_command(fmt))} == published


@pytest.fixture(scope="module")
def published():
    argv = _report_command("html")
    return report.collect(_runs(argv))


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    return found


def _browser(*args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: CI runs as root, where chromium refuses its sandbox.
    argv = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


# Appended to a copy of the page only (the report itself has no script): after load, each image
# records whether the browser decoded it and its pixel size.
CHECK = ("<script>window.addEventListener('load', () => document.querySelectorAll('img').forEach(i => "
         "i.setAttribute('data-decoded', i.complete && i.naturalWidth > 0 ? i.naturalWidth + 'x' + "
         "i.naturalHeight : 'no')));</script>")


def test_report_in_a_browser(published, tmp_path):
    page = report.to_html(published)
    assert "<script" not in page and not re.search(r"""(src|href)=["']?https?:""", page)  # self-contained
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", CHECK + "</body>"))
    done = _browser("--virtual-time-budget=5000", "--dump-dom", checked.as_uri())
    dom = done.stdout
    assert done.returncode == 0 and "</html>" in dom, done.stderr[-2000:]

    expected = list(tables.fold_repeats(published.trials)["table"].unique())
    shown = re.findall(r'<table class="report-table" data-table="([^"]*)"', dom)
    assert [t.replace("&amp;", "&") for t in shown] == expected and len(expected) >= 7   # 3.x, 4.x and pretrained
    drawn = [t for t, _ in plots.table_curves(published.trials, published.epochs)]
    figures = re.findall(r'<figure class="report-figure" data-table="([^"]*)"><img[^>]*data-decoded="([^"]*)"', dom)
    assert [t for t, _ in figures] == drawn and len(drawn) == 5
    assert len(re.findall(r"<img", dom)) == len(drawn)
    for table, size in figures:
        width, height = map(int, size.split("x"))            # "no" if the browser could not decode it
        assert width > 500 and height > 300, table
    # Every cell of the grid: the report's 59, the ones not run among them with a reason, and the
    # published study's one (the Color Jitter cell with PIL-faithful jitter).
    assert len(re.findall(r"<td class=", dom)) == 59 + 1
    gaps = dom.split("Cells not run", 1)[1]
    assert gaps.count("needs ImageNet weights") == 8 and "reduced budget: 1 of 10 epochs" in gaps
    assert 'title="cifar10/base/no-scheduler: run cifar10-handbuilt-30ep; device cpu; precision fp32; epochs 30' in dom

    shot = tmp_path / "report.png"
    page_file = tmp_path / "report.html"
    page_file.write_text(page)
    done = _browser("--window-size=1280,2000", f"--screenshot={shot}", page_file.as_uri())
    assert done.returncode == 0 and shot.read_bytes()[:8] == PNG, done.stderr[-2000:]
    from matplotlib.image import imread
    assert imread(shot).shape[:2] == (2000, 1280)


def test_report_markdown_is_the_committed_one(published, tmp_path):
    argv = _report_command("markdown")
    out = Path(argv[argv.index("-o") + 1])
    text = report.to_markdown(published, tmp_path / f"{out.stem}_files", tmp_path)
    assert text == out.read_text(), "results/report.md is not what `raycnn report --format markdown` writes"
    assert tables.render(published.trials, "markdown") in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 5
    from matplotlib.image import imread
    for link in links:
        assert imread(tmp_path / link).shape[1] > 500           # written, and decodes
        assert (out.parent / link).read_bytes()[:8] == PNG      # committed beside results/report.md


def test_report_cli_writes_a_page_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "page.html"
    assert cli.main(["report", str(RESULTS / "cifar10-base-quick"), "-o", str(out)]) == 0
    page = out.read_text()
    assert page.count('class="report-table"') >= 2 and page.count("data:image/png;base64,") == 1
    assert "[reduced]" in page                                    # the quick run is marked
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path / "nope"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no results" in err
    assert out.read_text() == page                                # the earlier page survives


