"""The reproduction report as one page: `raycnn report RUN [RUN ...]`.

Several runs laid together by `tables.combine`'s rule; first one figure of the whole
reproduction (`plots.reproduction_figure`: ours against the report's for every cell), then per
report table: the grid of `tables.sheets` (ours beside the report's, coloured by
|ours - report|), its figure (`plots.TableFigure`), and per cell where the number came from
(device, precision, epochs, seeds, wall time, images/s, versions, git revision). Every cell of
the report's grid that these runs did not fill, that failed, or that ran below the report's
budget, is listed with the reason.

HTML is one self-contained file (CSS inline, figures as base64 PNG, no script, nothing fetched);
Markdown is a text file plus one PNG per figure beside it.

A search's folder among the runs adds a section: per searched cell the report's number, the
grid's, the tuned re-run's, the best config and the epochs spent, and the cell's figure
(`raycnn.search_plots`).
"""
from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd

from raycnn import plots, results, search, search_plots, storage, suites, tables
from raycnn.files import atomic
from raycnn.plots import folded_frame

TITLE = "Reproduction of the CNN course report"
NOT_RUN = "not run"
SKIPPED = "skipped"          # the start of a skipped cell's status ("skipped: needs ...", cli.add_skipped)
FAILED = "error"             # a trial that failed for good (experiment.py)
REPRODUCTION = "reproduction"   # the whole reproduction's figure: its key and file name
GAPS_TITLE = "Cells not run, failed, or below the report's budget"
DPI = 90     # a 12-inch figure is 1080 pixels: sharp in a 1180-pixel page
# Why a grid cell is empty, first match wins: what a trial of the bundled grid needs that these
# runs did not have. Checked on the suite's declared trial.
NEEDS = ((lambda t: t.config.pretrained, suites.NEEDS_WEIGHTS),)
# Cell colour (tables' rich style names) -> CSS class of the HTML page.
STYLE_CLASS = {"green": "near", "yellow": "off", "red": "far", "dim": "none", "": "none"}
# Provenance: column title -> how to show it for one trial's rows (its repeats).
# Every column may be missing or NaN in a row (a trial that failed before its first epoch, a
# run made before the column existed): each shows what there is, else "".
PROVENANCE = {
    "run": lambda g: tables.joined(g["source"]),
    "device": lambda g: tables.joined(_column(g, "device")),
    "precision": lambda g: tables.joined(_column(g, "precision")),
    "epochs": lambda g: tables.joined(_column(g, "epochs_done").dropna().astype(int)),
    "seeds": lambda g: ", ".join(str(int(s)) for s in sorted(_column(g, "seed").dropna())),
    "wall time": lambda g: _minutes(_column(g, "wall_seconds").sum(min_count=1)),
    "images/s": lambda g: _rate(_column(g, "images_per_s").mean()),
    "torch": lambda g: tables.joined(_column(g, "torch_version")),
    "ray": lambda g: tables.joined(_column(g, "ray_version")),
    "python": lambda g: tables.joined(_column(g, "python_version")),
    "git": lambda g: tables.joined(_column(g, "git_rev")),
}


def _column(g: pd.DataFrame, name: str) -> pd.Series:
    return g[name] if name in g else pd.Series(dtype=float)


def _minutes(seconds: float) -> str:
    return "" if pd.isna(seconds) else f"{seconds / 60:.1f} min"


def _rate(per_s: float) -> str:
    return "" if pd.isna(per_s) else f"{per_s:,.0f}"


def _ran(statuses: pd.Series) -> pd.Series:
    """Which rows ran (finished, diverged or failed), as opposed to grid cells not in these runs
    and cells skipped before they started."""
    return (statuses != NOT_RUN) & ~statuses.astype(str).str.startswith(SKIPPED)


@dataclass(frozen=True)
class Drawn:
    """A figure of the page: key (a table title, or REPRODUCTION), file-name slug, alt text (what
    it is), caption (how to read it), PNG."""
    key: str
    slug: str
    alt: str
    caption: str
    png: bytes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


@dataclass
class Report:
    """What the page shows: the runs' trial rows laid together (with a row per grid cell not
    run), their epoch rows, and per trial the reason it is missing or below budget."""
    runs: list[str]
    trials: pd.DataFrame
    epochs: pd.DataFrame
    gaps: pd.DataFrame          # table, row, column, name, reason
    searches: list = field(default_factory=list)                    # tables.search_view rows
    search_figures: list = field(default_factory=list)              # search_plots.SearchFigure per cell

    @cached_property
    def searched(self) -> list[Drawn]:
        """One figure per searched cell (samples in parallel coordinates, the rung survivors'
        curves, the metric against lr), in the searches' order."""
        return [Drawn(f.cell["name"], slug, f"{f.cell['name']}: search", f.caption, _png(f.draw()))
                for f, slug in zip(self.search_figures, plots.slugs([f"search-{f.cell['name']}" for f in self.search_figures]))]

    @cached_property
    def figures(self) -> list[Drawn]:
        """The reproduction's figure (when a cell has both numbers), then one per report table
        with a number of ours, in table order."""
        found = plots.table_figures(self.trials, self.epochs)
        whole = plots.reproduction_figure(self.trials)
        drawers = [] if whole is None else [(REPRODUCTION, plots.REPRODUCTION_TITLE, plots.REPRODUCTION_CAPTION,
                                             lambda: whole)]
        drawers += [(f.title, f"{f.title}: {f.kind_name}", f.caption, f.draw) for f in found]
        return [Drawn(key, slug, alt, caption, _png(draw()))
                for (key, alt, caption, draw), slug in zip(drawers, plots.slugs([d[0] for d in drawers]))]


def _grid() -> dict[str, suites.Trial]:
    return {t.name: t for p in suites.resolve("all") for t in suites.load(p).trials}


def _budget(row, grid: dict[str, suites.Trial]) -> str:
    """A run made before rows recorded their budget: "full" when it trained the suite's epochs
    on every image, else "reduced"."""
    declared = grid.get(row["name"])
    if declared is None:
        return ""
    full = row["epochs"] == declared.config.epochs and not row.get("max_train_samples")
    return "full" if full else "reduced"


def _short_of(row, grid: dict[str, suites.Trial]) -> str:
    """Why a trial row that ran is below the report's budget, or "" when it is not."""
    declared = grid.get(row["name"])
    if row["budget"] in ("", "full") or declared is None:
        return ""
    parts = [f"{int(row['epochs'])} of {declared.config.epochs} epochs"]
    if row.get("max_train_samples"):
        parts.append(f"the first {int(row['max_train_samples']):,} training images")
    return f"{row['budget']} budget: " + ", ".join(parts)


def _gap(row, grid: dict[str, suites.Trial]) -> str:
    """Why a trial row's cell is not the report's number at the report's budget, or ""."""
    status = str(row["status"])
    if status.startswith(SKIPPED):
        return status.split(":", 1)[-1].strip()
    if status == FAILED:
        error = row.get("error")
        return "failed" + (f": {error}" if isinstance(error, str) and error else "")
    return _short_of(row, grid)


def collect(run_dirs: list[str]) -> Report:
    """The runs laid together (later run wins, repeats of one config pool: `tables.combine`),
    the bundled grid's cells they miss added as "not run" rows, and the reasons. A search's
    folder (`raycnn.search`) is not laid into the grid: its cells get their own section, the
    search view beside the grid's numbers and a figure per cell."""
    searched = [d for d in run_dirs if search.is_search(d)]
    loaded = [(storage.resolve(d).name, *results.load_run(d)) for d in run_dirs if d not in searched]
    trials = (pd.DataFrame(tables.combine([(name, t) for name, t, _ in loaded])) if loaded
              else pd.DataFrame(columns=[*tables.TRIAL_COLUMNS, "suite", "source", "budget", "repeat", "epochs"]))
    grid = _grid()
    if "budget" not in trials.columns:
        trials["budget"] = ""
    unknown = trials["budget"].isna() | (trials["budget"] == "")
    trials.loc[unknown, "budget"] = [_budget(r, grid) for _, r in trials[unknown].iterrows()]
    # Epoch rows of exactly the trial rows that survived combine (a replaced run's are dropped).
    kept = set(zip(trials["source"], trials["name"], trials["repeat"]))
    epochs = (pd.concat([e.assign(source=name) for name, _, e in loaded], ignore_index=True) if loaded
              else pd.DataFrame(columns=[*results.EPOCH_COLUMNS, "source"]))
    grid_rows = trials.copy()
    epochs = epochs[pd.Series([k in kept for k in zip(epochs["source"], epochs["name"], epochs["repeat"])],
                              index=epochs.index, dtype=bool)]
    gaps = [(r["name"], why) for _, r in trials.drop_duplicates("name").iterrows() if (why := _gap(r, grid))]
    missing = [t for name, t in grid.items() if name not in set(trials["name"])]
    for t in missing:
        need = next((text for test, text in NEEDS if test(t)), "")
        gaps.append((t.name, "not in these runs" + (f"; {need}" if need else "")))
    placeholders = pd.DataFrame([{"name": t.name, "suite": t.suite, "table": t.table, "row": t.row,
                                  "column": t.column, "order": t.order, "report_acc": t.report_acc,
                                  "status": NOT_RUN, "final_test_acc": math.nan, "source": "", "budget": ""}
                                 for t in missing])
    trials = pd.concat([trials, placeholders], ignore_index=True) if missing else trials
    where = trials.drop_duplicates("name").set_index("name")[["table", "row", "column"]]
    gaps_df = pd.DataFrame(gaps, columns=["name", "reason"]).join(where, on="name")
    # In the page's order: table by table, then as the suite declares the cells.
    folded = folded_frame(trials)
    rank = {t: i for i, t in enumerate(folded["table"].unique())}
    order = {n: i for i, n in enumerate(folded["name"])}
    gaps_df = (gaps_df.assign(_t=gaps_df["table"].map(rank), _n=gaps_df["name"].map(order))
               .sort_values(["_t", "_n"]).reset_index(drop=True))
    views = [search.summary(d) for d in searched]
    found = [f for d in searched for f in search_plots.figures(search.read(d), *_samples(d))]
    return Report([storage.resolve(d).name for d in run_dirs], trials, epochs,
                  gaps_df[["table", "row", "column", "name", "reason"]],
                  tables.search_view([row for v in views for row in v], grid_rows),
                  found)


def _samples(run_dir: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A search's samples and their epochs; empty before its first sample reported."""
    if (storage.resolve(run_dir) / search.SAMPLES[0]).is_file():
        return search.load_samples(run_dir)
    return pd.DataFrame(), pd.DataFrame()


def provenance(report: Report) -> pd.DataFrame:
    """One row per trial that ran (a failed one too; not a skipped one): table, row, column, name
    and the PROVENANCE columns."""
    ran = report.trials[_ran(report.trials["status"])]
    rows = []
    for name, g in ran.groupby("name", sort=False):
        first = g.iloc[0]
        rows.append({"table": first["table"], "row": first["row"], "column": first["column"], "name": name,
                     **{k: f(g) for k, f in PROVENANCE.items()}})
    return pd.DataFrame(rows, columns=["table", "row", "column", "name", *PROVENANCE])


def _counts(report: Report) -> str:
    """One line: how many of the grid's cells ran and how close they came."""
    s = folded_frame(report.trials)
    ran = s[_ran(s["status"])]
    pts = (ran["diff"].abs() * 100).round(6)
    return (f"{len(ran)} of {len(s)} cells run from {len(report.runs)} run(s): {int((pts <= 1).sum())} within "
            f"1 point of the report, {int(((pts > 1) & (pts <= 3)).sum())} within 3, {int((pts > 3).sum())} "
            f"further off; {len(report.gaps)} cell(s) not run, failed, or below the report's budget (listed at the end).")


# ---------------------------------------------------------------- HTML

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1180px; color: #1d1d1f; padding: 0 1em; }
h1 { font-size: 1.7em; margin-bottom: .2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.lead { color: #555; } code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }
table { border-collapse: collapse; margin: .6em 0 1em; }
th, td { border: 1px solid #d8d8d8; padding: .35em .7em; text-align: right; }
th:first-child, td:first-child { text-align: left; } thead th { background: #f5f5f7; }
td.near { background: #dff3e3; } td.off { background: #fff1c2; } td.far { background: #fbd5d5; }
td.none { color: #888; background: #fafafa; }
.key span { display: inline-block; padding: .1em .6em; margin-right: .4em; border: 1px solid #ccc; }
.key .near { background: #dff3e3; } .key .off { background: #fff1c2; } .key .far { background: #fbd5d5; }
figure { margin: 0 0 1em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; margin-top: .2em; }
details { margin: .4em 0 1em; } summary { cursor: pointer; color: #0b57d0; }
table.details td, table.details th, table.gaps td, table.gaps th { font-size: .85em; text-align: left; }
table.gaps td:nth-child(3), table.gaps td:nth-child(4) { white-space: nowrap; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _cell_title(info: pd.DataFrame, table: str, row: str, column: str) -> str:
    hits = info[(info["table"] == table) & (info["row"] == row) & (info["column"] == column)]
    return "\n".join(f"{r['name']}: " + "; ".join(f"{k} {r[k]}" for k in PROVENANCE if r[k])
                     for _, r in hits.iterrows())


def _html_grid(sheet, info: pd.DataFrame, gaps: pd.DataFrame) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in sheet.columns)
    body = []
    for cells in sheet.rows:
        row = cells[0]
        tds = [f"<th>{_e(row)}</th>"]
        for column, (text, style) in zip(sheet.columns[1:], cells[1:]):
            why = gaps[(gaps["table"] == sheet.title) & (gaps["row"] == row) & (gaps["column"] == column)]
            title = _cell_title(info, sheet.title, row, column) or "; ".join(why["reason"])
            tds.append(f'<td class="{STYLE_CLASS.get(style, "none")}" title="{_e(title)}">{_e(text)}</td>')
        body.append("<tr>" + "".join(tds) + "</tr>")
    return (f'<table class="report-table" data-table="{_e(sheet.title)}"><caption hidden>{_e(sheet.title)}'
            f"</caption><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def _html_rows(df: pd.DataFrame, cls: str) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in df.columns)
    rows = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in r) + "</tr>" for r in df.itertuples(index=False))
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _html_figure(drawn: Drawn, data: str) -> str:
    png = base64.b64encode(drawn.png).decode()
    return (f'<figure class="report-figure" {data}><img alt="{_e(drawn.alt)}" '
            f'src="data:image/png;base64,{png}"><figcaption>{_e(drawn.caption)}.</figcaption></figure>')


def to_html(report: Report) -> str:
    """The page: a summary line, the reproduction's figure, per report table its grid, details
    and figure, then the gaps."""
    info = provenance(report)
    figures = {f.key: f for f in report.figures}
    parts = [f"<h1>{_e(TITLE)}</h1>",
             f'<p class="lead">Runs: {", ".join(f"<code>{_e(r)}</code>" for r in report.runs)}. {_e(_counts(report))}</p>',
             f"<p>{_e(tables.LEGEND)} Hover over a cell for where it came from.</p>",
             '<p class="key"><span class="near">within 1 point</span><span class="off">within 3 points</span>'
             '<span class="far">further off</span> (either direction)</p>']
    if REPRODUCTION in figures:
        parts.append(_html_figure(figures[REPRODUCTION], f'data-figure="{REPRODUCTION}"'))
    for sheet in tables.sheets(report.trials):
        parts += [f"<h2>{_e(sheet.title)}</h2>", _html_grid(sheet, info, report.gaps)]
        mine = info[info["table"] == sheet.title].drop(columns=["table"])
        if len(mine):
            parts.append(f"<details><summary>Provenance of the {len(mine)} cell(s) run</summary>"
                         f"{_html_rows(mine, 'details')}</details>")
        if sheet.title in figures:
            parts.append(_html_figure(figures[sheet.title], f'data-table="{_e(sheet.title)}"'))
    parts += _html_searches(report)
    parts += [f"<h2>{_e(GAPS_TITLE)}</h2>",
              _html_rows(report.gaps, "gaps") if len(report.gaps) else "<p>None: every cell ran at the report's budget.</p>"]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(TITLE)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


SEARCH_TITLE = "Searched cells"


def _html_searches(report: Report) -> list[str]:
    """The searches' section: the search view, then a figure per searched cell."""
    if not len(report.searches):
        return []
    head = "".join(f"<th>{_e(c)}</th>" for c in tables.search_header(report.searches))
    rows = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>"
                   for cells in tables.search_cells(report.searches))
    parts = [f"<h2>{_e(SEARCH_TITLE)}</h2>", f"<p>{_e(tables.SEARCH_LEGEND)}</p>",
             f'<table class="search-table"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>']
    return parts + [_html_figure(d, f'data-search="{_e(d.key)}"') for d in report.searched]


# ---------------------------------------------------------------- Markdown

def _md_rows(df: pd.DataFrame) -> str:
    cell = tables.md_cell
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in df.itertuples(index=False)])


def to_markdown(report: Report, figure_dir: Path, relative_to: Path) -> str:
    """The page as Markdown: the tables as `tables.render` writes them, the figures as PNG files
    written into figure_dir (linked relative to relative_to), provenance and gaps as tables."""
    lines = [f"# {TITLE}", "", f"Runs: {', '.join(f'`{r}`' for r in report.runs)}. {_counts(report)}", "",
             tables.render(report.trials, "markdown"), "## Figures", ""]
    for drawn in report.figures:
        path = atomic(figure_dir / f"{drawn.slug}.png", lambda tmp: Path(tmp).write_bytes(drawn.png))
        lines += [f"![{drawn.alt}]({path.relative_to(relative_to).as_posix()})", "", f"*{drawn.caption}.*", ""]
    if len(report.searches):
        lines += [f"## {SEARCH_TITLE}", "", tables.render_search(report.searches, "markdown")]
        for drawn in report.searched:
            path = atomic(figure_dir / f"{drawn.slug}.png", lambda tmp: Path(tmp).write_bytes(drawn.png))
            lines += [f"![{drawn.alt}]({path.relative_to(relative_to).as_posix()})", "", f"*{drawn.caption}.*", ""]
    lines += ["## Provenance", "", _md_rows(provenance(report).drop(columns=["table", "row", "column"])), "",
              f"## {GAPS_TITLE}", "",
              _md_rows(report.gaps) if len(report.gaps) else "None.", ""]
    return "\n".join(lines)


FORMATS = ("html", "markdown")


def write(run_dirs: list[str], out: str | Path, fmt: str = "html") -> Path:
    """Build the report of the runs and write it to `out` atomically (Markdown: its PNGs go into
    the folder OUT_STEM_files beside it). Returns the path written."""
    if fmt not in FORMATS:
        raise results.ResultsError(f"unknown report format {fmt!r}; choose from {', '.join(FORMATS)}")
    report = collect(run_dirs)
    out = Path(out)
    if fmt == "html":
        text = to_html(report)
    else:
        text = to_markdown(report, out.parent / f"{out.stem}_files", out.parent)
    return atomic(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
