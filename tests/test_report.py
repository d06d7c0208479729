"""`raycnn report`: the page for the published runs, rendered by a real browser (headless
chromium): every report table and figure is in the DOM, every image decodes, a screenshot is
taken; the Markdown form and the committed results/report.md match what the command writes."""
import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from raycnn import cli, plots, report, results, tables
from raycnn.errors import EXIT

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

    expected = list(dict.fromkeys(c["table"] for c in tables.fold_repeats(published.trials)))
    shown = re.findall(r'<table class="report-table" data-table="([^"]*)"', dom)
    assert [t.replace("&amp;", "&") for t in shown] == expected and len(expected) >= 7   # 3.x, 4.x and pretrained
    # One figure of the whole reproduction, before the first table; then one per table with a result.
    figures = re.findall(r'<figure class="report-figure" data-(table|figure)="([^"]*)"><img alt="([^"]*)"'
                         r'[^>]*data-decoded="([^"]*)"[^>]*><figcaption>([^<]*)</figcaption>', dom)
    # and, after the tables, one per searched cell of the published searches
    searched = re.findall(r'<figure class="report-figure" data-search="([^"]*)"><img[^>]*data-decoded="(\d+)x\d+"', dom)
    assert [key for key, _ in searched] == [d.key for d in published.searched] and searched
    assert len(re.findall(r"<img", dom)) == len(figures) + len(searched) and len(figures) == 1 + 6
    assert all(width == "1080" for _, width in searched)
    assert figures[0][:3] == ("figure", "reproduction", plots.REPRODUCTION_TITLE)
    assert dom.index('data-figure="reproduction"') < dom.index('class="report-table"')
    assert "±1 and ±3 points" in figures[0][4] and "std over seeds" in figures[0][4]
    drawn = plots.table_figures(published.trials, published.epochs)
    assert [(kind, key) for kind, key, *_ in figures[1:]] == [("table", f.title) for f in drawn]
    for (_, key, alt, size, caption), f in zip(figures[1:], drawn):
        assert alt == f"{key}: learning curves" and caption.startswith(f"{key}: test accuracy per epoch, one panel per row")
    for _, key, _, size, _ in figures:
        width, height = map(int, size.split("x"))            # "no" if the browser could not decode it
        assert 500 < width <= 1080 and 250 < height < width, key   # at most the page's width, wider than tall
    assert int(figures[0][3].split("x")[0]) == 1080                # the reproduction: both panels, full width
    # Every cell of the grid: the report's 59, the ones not run among them with a reason, and the
    # published study's one (the Color Jitter cell with PIL-faithful jitter).
    assert len(re.findall(r"<td class=", dom)) == 59 + 1
    gaps = dom.split("Cells not run", 1)[1]
    # every weight-free cell is published, at the report's budget: only the pretrained ones are missing
    assert gaps.count("not in these runs") == gaps.count("needs ImageNet weights") == 8
    assert "budget:" not in gaps
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
    assert len(links) == 1 + 6 + len(published.searched) and links[0].endswith("/reproduction.png")
    from matplotlib.image import imread
    for link in links:
        assert imread(tmp_path / link).shape[1] > 500           # written, and decodes
        assert (out.parent / link).read_bytes()[:8] == PNG      # committed beside results/report.md
    committed = sorted(p.name for p in (out.parent / f"{out.stem}_files").iterdir())
    assert committed == sorted(Path(link).name for link in links)   # no figure left from an older page


def test_report_cli_writes_a_page_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "page.html"
    assert cli.main(["report", str(RESULTS / "cifar10-base-quick"), "-o", str(out)]) == 0
    page = out.read_text()
    assert page.count('class="report-table"') >= 2 and page.count("data:image/png;base64,") == 2
    assert "[reduced]" in page                                    # the quick run is marked
    # One epoch: no curves, so its table's figure is bars of the final accuracy beside the report's.
    assert '<img alt="4.1 CIFAR-10 base model: final accuracy beside the report&#x27;s"' in page
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path / "nope"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no results" in err
    assert out.read_text() == page                                # the earlier page survives


def _figure(trials, epochs, title: str) -> plots.TableFigure:
    return next(f for f in plots.table_figures(trials, epochs) if f.title == title)


def test_table_figure_is_small_multiples_with_bars_where_no_curves(published):
    """A panel per table row, a line per column; a row whose cells ran one epoch is bars of ours
    beside the report's, and a table without any curve is one panel of bars."""
    mnist = _figure(published.trials, published.epochs, "3.1 MNIST, lr = 0.01")
    rows = ["Base Model", "3 Dropout", "2 BatchNorm", "Stride = 2", "Kernel 5x5"]
    assert mnist.kinds == dict.fromkeys(rows, "lines")        # every row at the report's 10 epochs
    fig = mnist.draw()
    panels = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in panels] == rows
    columns = ["SGD", "SGD + momentum", "Adam", "AdamW"]
    assert [line.get_label() for line in panels[0].get_lines() if not line.get_label().startswith("_")] == columns
    assert [len(line.get_xdata()) for line in panels[0].get_lines()][::2] == [10, 10, 10, 10]   # line, notch
    assert [t.get_text() for t in fig.legends[0].get_texts()] == columns + ["report (right edge)"]   # no bars: no bar keys

    quick = report.collect([str(RESULTS / "cifar10-base-quick")])
    base = _figure(quick.trials, quick.epochs, "4.1 CIFAR-10 base model")
    assert base.kinds == {"Base Model": "bars"} and base.caption.endswith("beside the report's (hatched)")
    [panel] = base.draw().axes
    assert [t.get_text() for t in panel.get_xticklabels()] == ["Base Model"] and len(panel.patches) == 4
    heights = [round(b.get_height(), 6) for b in panel.patches]
    assert heights == [round(v * 100, 6) for c in base.cells.itertuples() for v in (c.ours_mean, c.report_acc)]


def test_reproduction_figure(published):
    """Every cell with both numbers at (report, ours), coloured by its report section, error bars
    where it has repeats; the diagonal and the ±1 / ±3 point bands in both panels."""
    cells = plots.folded_frame(published.trials).dropna(subset=["ours_mean", "report_acc"])
    fig = plots.reproduction_figure(published.trials)
    every, zoom = fig.axes
    assert len(every.containers) == len(cells) == 51 + 1     # the grid's weight-free cells and the jitter study's
    from matplotlib.colors import to_hex
    for point, cell in zip(every.containers, cells.itertuples()):
        (x,), (y,) = point.lines[0].get_data()
        assert (x, y) == pytest.approx((cell.report_acc * 100, cell.ours_mean * 100))
        assert to_hex(point.lines[0].get_color()) == to_hex(plots.SECTIONS[cell.table[0]][1])
        assert point.has_yerr == (cell.n > 1)
    assert sum(p.has_yerr for p in every.containers) == (cells["n"] > 1).sum() == 10    # the cells run with seeds 0-2 (7 CIFAR-10, 3 MNIST)
    # every repeat as a tick on its cell's x: the bimodal MNIST cells show both modes
    ticks = [(l.get_xdata()[0], sorted(l.get_ydata())) for l in every.get_lines() if l.get_label() == "_repeats"]
    assert len(ticks) == 10 and all(len(y) == 3 for _, y in ticks)
    assert sum(y[0] < 15 and y[-1] > 90 for x, y in ticks if x <= 11) == 3
    # the named cells' labels do not overlap
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in every.texts]
    assert len(boxes) == 3 and not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    for ax in (every, zoom):
        assert [c.get_label() for c in ax.collections if c.get_label().startswith("±")] == ["±3 points", "±1 point"]
        diagonal = ax.get_lines()[0].get_xydata()
        assert (diagonal[:, 0] == diagonal[:, 1]).all() and tuple(diagonal[[0, -1], 0]) == ax.get_xlim()
    assert every.get_xlim() == (0, 100) and zoom.get_xlim()[0] > 50
    assert plots.reproduction_figure(published.trials.assign(final_test_acc=float("nan"))) is None


MIXED = """
[suite]
name = "mixed"
cpus_per_trial = 1
table = "Mixed outcomes"

[defaults]
model = "mnist_base"
epochs = 2
max_train_samples = 256
eval_batch_size = 2000

[[trials]]
name = "trains"
row = "trains"
column = "Accuracy (%)"
report = 90

[[trials]]
name = "fails"
row = "fails"
column = "Accuracy (%)"
model = "resnet18"
pretrained = true
finetune = "head"
weights = "{garbage}"
report = 80

[[trials]]
name = "skipped"
row = "skipped"
column = "Accuracy (%)"
model = "resnet18"
pretrained = true
finetune = "head"
report = 70
"""


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """A real run (synthetic data) with a cell of each outcome: one trains, one fails in its trial
    (its ImageNet weights file is garbage), one is skipped for want of ImageNet weights."""
    tmp = tmp_path_factory.mktemp("mixed")
    garbage = tmp / "garbage.pth"
    garbage.write_bytes(bytes(range(256)) * 16)
    (tmp / "mixed.toml").write_text(MIXED.format(garbage=garbage))
    env = dict(os.environ, TORCH_HOME=str(tmp / "no-weights"), RAY_AIR_NEW_OUTPUT="0")
    done = subprocess.run([sys.executable, "-m", "raycnn.cli", "run", str(tmp / "mixed.toml"), "--synthetic",
                           "--results-dir", str(tmp), "--name", "mixed", "--num-cpus", "2", "--max-failures", "0"],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == EXIT["errors"], done.stderr[-3000:]
    return tmp / "mixed"


@pytest.mark.parametrize("fmt", ["html", "markdown"])
def test_report_on_a_run_with_skipped_and_failed_cells(mixed_run, tmp_path, fmt, capsys):
    trials = results.load_run(mixed_run)[0].set_index("name")
    assert trials["status"].to_dict() == {"mixed/trains": "ok", "mixed/fails": "error",
                                          "mixed/skipped": "skipped: needs ImageNet weights (--weights FILE)"}
    assert pd.isna(trials.loc["mixed/skipped", "epochs_done"])          # what broke the page once
    out = tmp_path / ("page.html" if fmt == "html" else "page.md")
    assert cli.main(["report", str(mixed_run), "-o", str(out), "--format", fmt]) == 0, capsys.readouterr().err
    page = html.unescape(out.read_text())
    gaps = page.split(report.GAPS_TITLE, 1)[1]
    error = trials.loc["mixed/fails", "error"]
    assert error and f"mixed/fails | failed: {error}" in gaps.replace("</td><td>", " | ")
    assert "mixed/skipped | needs ImageNet weights (--weights FILE)" in gaps.replace("</td><td>", " | ")
    provenance = page.split("Provenance", 1)[1].split(report.GAPS_TITLE, 1)[0]
    assert "mixed/trains" in provenance and "mixed/fails" in provenance and "mixed/skipped" not in provenance
    assert "2 of 62 cells run from 1 run(s)" in page                     # the skipped cell did not run
    assert "Mixed outcomes: learning curves" in page and plots.REPRODUCTION_TITLE in page
    figures = page.count("data:image/png;base64,") if fmt == "html" else len(list(out.parent.glob("page_files/*.png")))
    assert figures == 2


def test_report_of_a_search_in_a_browser(searched, tmp_path):
    """A search's folder beside a grid run: the grid's tables as before, and a section of the
    searched cells (report | grid | tuned | best config | epochs) with each cell's figure: the
    samples in parallel coordinates, the rung survivors' curves, the metric against lr."""
    from raycnn import search, search_plots
    run, _ = searched
    page = report.to_html(report.collect([str(run), str(RESULTS / "mnist-all-1ep")]))
    assert "<script" not in page
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", CHECK + "</body>"))
    done = _browser("--virtual-time-budget=5000", "--dump-dom", checked.as_uri())
    dom = done.stdout
    assert done.returncode == 0 and "</html>" in dom, done.stderr[-2000:]
    assert "reduced budget: 1 of 10 epochs" in dom.split(report.GAPS_TITLE, 1)[1]     # mnist-all-1ep's cells
    section = dom.split(f"<h2>{report.SEARCH_TITLE}</h2>", 1)[1].split("<h2>", 1)[0]
    header = re.findall(r"<th>([^<]*)</th>", section.split("</thead>", 1)[0])
    assert header == ["cell", "report", "grid (ours)", "tuned (2-seed re-run)", "best config", "epochs spent"]
    [row] = re.findall(r"<tr><td>tiny/sgd</td>(.*?)</tr>", section)
    cells = [html.unescape(c) for c in re.findall(r"<td>([^<]*)</td>", row)]
    samples, epochs = search.load_samples(run)
    assert cells[0] == "90" and cells[1] == "—" and re.fullmatch(r"\d+\.\d ± \d+\.\d", cells[2]) and cells[3].startswith("lr=")
    assert cells[4] == f"{samples['epochs_done'].sum()} + 8"
    figures = re.findall(r'<figure class="report-figure" data-search="([^"]*)"><img alt="([^"]*)"[^>]*'
                         r'data-decoded="([^"]*)"[^>]*><figcaption>([^<]*)</figcaption>', section)
    assert [(key, alt) for key, alt, _, _ in figures] == [("tiny/sgd", "tiny/sgd: search")]
    width, height = map(int, figures[0][2].split("x"))
    assert width == 1080 and 250 < height < width and "parallel coordinates" in figures[0][3]
    assert page.count('class="report-table"') >= 2              # the grid run's tables are still there

    [figure] = search_plots.figures(search.read(run), samples, epochs)
    parallel, survivors, against = figure.draw().axes
    assert sum(len(line.get_xdata()) == 3 for line in parallel.get_lines()) == len(samples)   # lr, momentum, metric
    passed = samples[samples["epochs_done"] > search.read(run)["cells"][0]["rungs"][0]]
    assert [line.get_label() for line in survivors.get_lines() if line.get_label().startswith("sample")] == \
        [f"sample {s}" for s in passed["sample"]]
    assert len(against.collections[0].get_offsets()) == len(samples) and against.get_xscale() == "log"


def test_the_published_runs_hold_every_weight_free_cell_at_the_reports_budget(published):
    """Every cell of the report's grid that needs no ImageNet weights is in the published runs
    the README's report command lays together, trained at the report's epochs on the whole
    training set of the real data."""
    grid = {name: t for name, t in report._grid().items() if t.suite != "pretrained"}
    rows = published.trials[published.trials["name"].isin(grid)].to_dict("records")
    assert len(grid) == 51 and {r["name"] for r in rows} == set(grid)
    for r in rows:
        assert r["epochs"] == grid[r["name"]].config.epochs and r["budget"] == "full", r["name"]
        assert not r.get("synthetic") and not r.get("max_train_samples"), r["name"]
