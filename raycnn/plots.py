"""Figures of results, for `raycnn plot` and the report page (`raycnn.report`).

Per report table, `TableFigure`: small multiples, one panel per table row and one line per
table column (test accuracy against the epoch), so no panel has more lines than the table has
columns. A row without curves (every cell one epoch) is drawn as bars of the final accuracy
beside the report's, and a table with no curve at all as one panel of such bars.

For the whole reproduction, `reproduction_figure`: ours against the report's accuracy for every
cell, the diagonal with the page's ±1 and ±3 point bands, a colour per report section and the
std over seeds as error bars.

Figure + Agg canvas rather than pyplot: no global backend switch, no figure registry to leak
into, safe next to a GUI session. matplotlib is imported where a figure is drawn, so reading
results stays light.
"""
from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from raycnn import storage
from raycnn.results import EPOCH_COLUMNS, load_run, require
from raycnn.tables import DIFF_STYLES, SUMMARY_COLUMNS, fold_repeats


def folded_frame(trials) -> pd.DataFrame:
    """`tables.fold_repeats` of the trials as a frame, for the figures and the page."""
    return pd.DataFrame(fold_repeats(trials), columns=SUMMARY_COLUMNS)

METRIC, METRIC_LABEL = "test_acc", "test accuracy (%)"
BARS_TOP = 109               # % at the top of a bar axis: a label over a 99% bar clears the title
PANELS_PER_LINE = 3           # panels side by side; a 5-row MNIST table takes two lines
PANEL_SIZE = (4.0, 2.8)       # inches a panel; at the report's 90 dpi three make 1080 pixels
# A report section by the number its table titles start with ("3.1 MNIST ..." -> "3").
SECTIONS = {"3": ("MNIST, sec. 3", "tab:blue"), "4": ("CIFAR-10, sec. 4", "tab:orange"),
            "5": ("pretrained ResNet-18, sec. 5", "tab:green")}
OTHER_SECTION = ("other tables", "tab:gray")
# The bands in the page's colours (report.CSS) for the tables' cell styles: within 1 point, within 3.
STYLE_FILLS = {"green": "#dff3e3", "yellow": "#fff1c2"}
BAND_COLOURS = {ceiling: STYLE_FILLS[style] for ceiling, style in DIFF_STYLES}
NAMED_BEYOND = 10.0           # points off the report past which a reproduction point is named
ZOOM_FROM = 80.0              # the zoom panel shows the cells whose numbers are all above this


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "table"


def slugs(titles: list[str]) -> list[str]:
    """A file-name slug per table title, unique: two tables that slug alike must not overwrite
    each other's file."""
    out, used = [], set()
    for title in titles:
        slug, k = _slug(title), 2
        while slug in used:
            slug, k = f"{_slug(title)}-{k}", k + 1
        used.add(slug)
        out.append(slug)
    return out


def _canvas(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colours(n: int) -> list:
    """One colour per table column, the same in every panel of a figure."""
    from matplotlib import colormaps
    return [colormaps["tab10"](i % 10) for i in range(n)]


def epoch_means(epochs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per trial name, its epoch rows averaged over repeats, indexed by epoch (inf as NaN: a
    diverged trial's line just breaks)."""
    require(epochs, EPOCH_COLUMNS, "epochs")
    values = epochs[list(EPOCH_COLUMNS)].replace([np.inf, -np.inf], np.nan)
    return {name: g.groupby("epoch").mean(numeric_only=True).sort_index()
            for name, g in values.drop(columns="repeat").groupby("name")}


@dataclass
class TableFigure:
    """One report table's figure: its folded cells (`tables.fold_repeats` rows) and the
    per-epoch means of the trials among them that have epoch rows."""
    title: str
    cells: pd.DataFrame
    curves: dict[str, pd.DataFrame]

    @property
    def kinds(self) -> dict[str, str]:
        """Table row -> how its panel draws it: "lines" where a cell has more than one epoch,
        else "bars" where a cell has a final number of ours; rows with neither are left out."""
        out = {}
        for row, g in self.cells.groupby("row", sort=False):
            if any(len(self.curves.get(n, ())) > 1 for n in g["name"]):
                out[row] = "lines"
            elif g["ours_mean"].notna().any():
                out[row] = "bars"
        return out

    @property
    def kind_name(self) -> str:
        """What kind of figure it is, in a few words (its alt text)."""
        return "learning curves" if "lines" in self.kinds.values() else "final accuracy beside the report's"

    @property
    def caption(self) -> str:
        """What the figure shows, in one sentence (the page's caption and alt text)."""
        kinds = set(self.kinds.values())
        if "lines" not in kinds:
            return f"{self.title}: final test accuracy, ours (solid) beside the report's (hatched)"
        bars = "; a row without curves as bars, ours beside the report's" if "bars" in kinds else ""
        return f"{self.title}: test accuracy per epoch, one panel per row, one line per column{bars}"

    def panels(self) -> list[tuple[str, str, pd.DataFrame]]:
        """(title, "lines" | "bars", cells) per panel: one per row with a result, or for a table
        without any curve a single untitled panel of bars, a group per row."""
        kinds = self.kinds
        shown = self.cells[self.cells["row"].isin(kinds)]
        if "lines" not in kinds.values():
            return [("", "bars", shown)]
        return [(row, kind, shown[shown["row"] == row]) for row, kind in kinds.items()]

    def draw(self):
        """The matplotlib Figure of `panels`, sharing the accuracy axis, under the table's title;
        one small legend: the columns' colours, and what the report's marks are."""
        columns = list(dict.fromkeys(self.cells["column"]))
        colour = dict(zip(columns, _colours(len(columns))))
        panels = self.panels()
        across = min(len(panels), PANELS_PER_LINE)
        down = math.ceil(len(panels) / across)
        # Small multiples: a fixed size a panel; one bar panel: wide enough for its bars.
        width = PANEL_SIZE[0] * across if panels[0][0] else 3.0 + 0.6 * len(panels[0][2])
        fig = _canvas((min(max(width, 6.0), 12.0), 0.9 + PANEL_SIZE[1] * down))
        axes = fig.subplots(down, across, sharey=True, squeeze=False).ravel()
        for ax, (row, kind, sub) in zip(axes, panels):
            DRAW[kind](ax, sub, self.curves, colour)
            ax.grid(alpha=0.3, axis="y" if kind == "bars" else "both")
            if row:                               # the title names the row: no group label
                ax.set_title(row, fontsize="medium")
                if kind == "bars":
                    ax.set_xticks([])
        for ax in axes[len(panels):]:
            ax.set_axis_off()
        for ax in axes[::across]:
            ax.set_ylabel(METRIC_LABEL)
        bars = any(kind == "bars" for _, kind, _ in panels)
        if bars:                        # bars start at zero, so the shared axis does; room for labels
            axes[0].set_ylim(0, BARS_TOP)
            axes[0].set_yticks(range(0, 101, 20))
        _legend(fig, colour, lines=any(kind == "lines" for _, kind, _ in panels), bars=bars)
        fig.suptitle(self.title, fontsize="x-large")
        return fig


def _lines(ax, cells: pd.DataFrame, curves: dict[str, pd.DataFrame], colour: dict) -> None:
    """A row's cells as test accuracy against the epoch, one line per column; a one-epoch cell
    beside longer ones is a single marker. The report's number is a notch on the right edge,
    where the line ends, in the line's colour."""
    for cell in cells.itertuples():
        means = curves.get(cell.name)
        if means is None or means.empty:
            continue
        ax.plot(means.index, means[METRIC] * 100, color=colour[cell.column], label=cell.column,
                marker="o" if len(means) == 1 else None, markersize=4)
        if not pd.isna(cell.report_acc):      # x in axes fractions: on the right spine
            ax.plot([1.0], [cell.report_acc * 100], marker="<", ms=8, color=colour[cell.column],
                    transform=ax.get_yaxis_transform(), clip_on=False)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)


def _bars(ax, cells: pd.DataFrame, curves: dict[str, pd.DataFrame], colour: dict) -> None:
    """Final test accuracy: per table row a group, per column ours (solid, ± std over seeds)
    and the report's (hatched) side by side; cells without a number of ours are left out.
    (`curves` unused: the signature is DRAW's.)"""
    rows = list(dict.fromkeys(cells["row"]))
    columns = [c for c in colour if c in set(cells["column"])]
    width = 0.8 / (2 * len(columns))
    for cell in cells.itertuples():
        if pd.isna(cell.ours_mean):
            continue
        x = rows.index(cell.row) - 0.4 + width * 2 * columns.index(cell.column) + width / 2
        err = cell.ours_std * 100 if cell.n > 1 and not pd.isna(cell.ours_std) else None
        ours = ax.bar(x, cell.ours_mean * 100, width, color=colour[cell.column], yerr=err, capsize=3)
        ax.bar_label(ours, fmt="%.1f", fontsize="x-small", padding=2 if err is None else 6)
        if not pd.isna(cell.report_acc):
            ax.bar(x + width, cell.report_acc * 100, width, facecolor="white",
                   edgecolor=colour[cell.column], hatch="////")
    ax.set_xticks(range(len(rows)), [textwrap.fill(str(r), 16) for r in rows], fontsize="small")
    ax.set_xlim(-0.5, len(rows) - 0.5)


DRAW = {"lines": _lines, "bars": _bars}


def _legend(fig, colour: dict, lines: bool, bars: bool) -> None:
    """One legend below the panels: the columns' colours (none for a single column, which the
    title names), the report's notch beside lines, and for bars which of a pair is ours."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    handles = [Line2D([], [], color=c, lw=2, label=str(col)) for col, c in colour.items()] if len(colour) > 1 else []
    if lines:
        handles.append(Line2D([], [], ls="", marker="<", ms=8, color="0.45", label="report (right edge)"))
    if bars:
        handles += [Patch(facecolor="0.45", label="ours"),
                    Patch(facecolor="white", edgecolor="0.45", hatch="////", label="report")]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False,
                   fontsize="small")


def table_figures(trials: pd.DataFrame, epochs: pd.DataFrame) -> list[TableFigure]:
    """Per report table with a number or a curve of ours, in declared order, its TableFigure
    (curves are means over the repeats in `epochs`)."""
    curves = epoch_means(epochs)
    out = []
    for table, cells in folded_frame(trials).groupby("table", sort=False):
        mine = {n: curves[n] for n in cells["name"] if n in curves}
        if mine or cells["ours_mean"].notna().any():
            out.append(TableFigure(str(table), cells.reset_index(drop=True), mine))
    return out


# ---------------------------------------------------------------- the whole reproduction

REPRODUCTION_TITLE = "The reproduction: ours against the report"
REPRODUCTION_CAPTION = ("Ours against the report's test accuracy, every cell with both numbers: on the "
                        "diagonal we agree; the bands are ±1 and ±3 points; colour is the report's section; "
                        "error bars are the std over seeds and ticks the seeds themselves; hollow points trained below the report's budget; "
                        f"cells more than {NAMED_BEYOND:g} points off are named")


def _points(n: float) -> str:
    return f"{n:g} point" + ("" if n == 1 else "s")


def _section(table: str) -> tuple[str, str]:
    found = re.match(r"\s*(\d+)", str(table))
    return SECTIONS.get(found.group(1) if found else "", OTHER_SECTION)


def reproduction_figure(trials: pd.DataFrame):
    """Ours against the report's accuracy for every cell that has both, or None when none has:
    all cells on 0-100, and beside it a zoom on the cells above ZOOM_FROM (where MNIST crowds)."""
    s = folded_frame(trials)
    s = s[s["ours_mean"].notna() & s["report_acc"].notna()].reset_index(drop=True)
    if s.empty:
        return None
    high = s[(s["ours_mean"] * 100 > ZOOM_FROM) & (s["report_acc"] * 100 > ZOOM_FROM)]
    zoom = len(high) >= 2
    fig = _canvas((12.0 if zoom else 6.5, 5.8))
    axes = fig.subplots(1, 2 if zoom else 1, squeeze=False).ravel()
    lo = math.floor(min(high["ours_mean"].min(), high["report_acc"].min()) * 100 - 1) if zoom else 0
    # Each repeat as a tick beside its cell's mean: a bimodal cell (trains under one seed,
    # collapses under another) shows both modes, which its mean ± std hides.
    seeds = trials.groupby("name")["final_test_acc"].apply(lambda v: [a * 100 for a in v.dropna()])
    for i, (ax, limits) in enumerate(zip(axes, ((0.0, 100.0), (lo, 100.0)))):
        _reproduction_panel(ax, s, seeds, limits, named=i == 0)
    axes[0].set_title("every cell")
    if zoom:
        axes[1].set_title(f"zoom: cells above {lo:g}%")
    _sections_legend(fig, s)
    fig.suptitle(REPRODUCTION_TITLE, fontsize="x-large")
    return fig


def _label_offsets(points: list[tuple[float, float]], near: float = 4.0, step: float = 9.0) -> list[float]:
    """Vertical offsets (in points) for labels at data `points`: a label within `near` data units
    of one already placed drops a line below it, so names of neighbouring cells stay readable."""
    placed, offsets = [], []
    for x, y in points:
        drop = sum(abs(x - px) < 4 * near and abs(y - py) < near for px, py in placed)
        placed.append((x, y))
        offsets.append(-3 - step * drop)
    return offsets


def _reproduction_panel(ax, s: pd.DataFrame, seeds: pd.Series, limits: tuple[float, float],
                        named: bool) -> None:
    xs = np.linspace(*limits, 2)
    for ceiling in sorted(BAND_COLOURS, reverse=True):     # wide band first, the narrow on top
        ax.fill_between(xs, xs - ceiling, xs + ceiling, color=BAND_COLOURS[ceiling], lw=0,
                        label=f"±{_points(ceiling)}")
    ax.plot(xs, xs, color="0.3", lw=0.8)
    labels = []
    for cell in s.itertuples():
        _, colour = _section(cell.table)
        x, y = cell.report_acc * 100, cell.ours_mean * 100
        full = cell.budget in ("", "full")
        err = cell.ours_std * 100 if cell.n > 1 and not pd.isna(cell.ours_std) else None
        ax.errorbar(x, y, yerr=err, fmt="o", ms=6, color=colour, mfc=colour if full else "white",
                    mew=1.4, capsize=3, elinewidth=1)
        if cell.n > 1:
            repeats = seeds.get(cell.name, [])
            ax.plot([x] * len(repeats), repeats, ls="", marker="_", ms=9, mew=1.2, color=colour, label="_repeats")
        if named and abs(y - x) > NAMED_BEYOND:
            labels.append((cell.name, x, y))
    for (name, x, y), dy in zip(labels, _label_offsets([(x, y) for _, x, y in labels])):
        ax.annotate(name, (x, y), xytext=(6, dy), textcoords="offset points", fontsize="x-small")
    ax.set(xlim=limits, ylim=limits, xlabel="report's test accuracy (%)", ylabel="ours (%)", aspect="equal")
    ax.grid(alpha=0.3)


def _sections_legend(fig, s: pd.DataFrame) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    shown = dict.fromkeys(_section(t) for t in s["table"])
    handles = [Line2D([], [], ls="", marker="o", color=c, label=label) for label, c in shown]
    if (~s["budget"].isin(["", "full"])).any():
        handles.append(Line2D([], [], ls="", marker="o", color="0.3", mfc="white", label="below the report's budget"))
    handles += [Patch(color=BAND_COLOURS[c], label=f"within {_points(c)}") for c in sorted(BAND_COLOURS)]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False, fontsize="small")


# ---------------------------------------------------------------- raycnn plot

def plot(run_dir: str | Path, out_dir: str | Path | None = None) -> list[storage.Place]:
    """Draw one PNG per report table (`TableFigure`: test accuracy per epoch, a panel per row, a
    line per column; bars where there are no curves), means over repeats. Writes to out_dir
    (default RUN_DIR/plots), named after the table; tables without any number of ours are left
    out. Returns the written paths in table order."""
    trials, epochs = load_run(run_dir)
    out_dir = storage.resolve(out_dir) if out_dir is not None else storage.resolve(run_dir) / "plots"
    found = table_figures(trials, epochs)
    written = []
    for item, slug in zip(found, slugs([f.title for f in found])):
        fig = item.draw()
        written.append((out_dir / f"{slug}.png").write(lambda f: fig.savefig(f, format="png", dpi=100)))
    return written
