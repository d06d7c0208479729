"""Learning curves: one PNG per report table, train/test accuracy and loss against the epoch."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from raycnn.results import EPOCH_COLUMNS, load_run, require, atomic
from raycnn.tables import fold_repeats

PLOT_PANELS = (("train_acc", "train accuracy"), ("test_acc", "test accuracy"),
               ("train_loss", "train loss"), ("test_loss", "test loss"))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "table"


# Panel column -> y label: accuracies drawn in percent, losses as logged.
PANEL_LABELS = {"train_acc": "accuracy (%)", "test_acc": "accuracy (%)",
                "train_loss": "cross-entropy loss", "test_loss": "cross-entropy loss"}
PERCENT = {"train_acc", "test_acc"}


def figure(title: str, curves: list[tuple[str, pd.DataFrame]]):
    """A 2x2 matplotlib Figure: train/test accuracy (%) and loss against the epoch, one line per
    (label, per-epoch means) curve, one legend beside the panels."""
    # Figure + Agg canvas rather than pyplot: no global backend switch, no figure registry
    # to leak into, safe next to a GUI session. Imported here so reading results stays light.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    for ax, (col, label) in zip(axes, PLOT_PANELS):
        for i, (name, means) in enumerate(curves):
            scale = 100 if col in PERCENT else 1
            # A marker so one-point curves (a zero-shot epoch 0, a 1-epoch run) still show.
            ax.plot(means.index, means[col] * scale, marker="o", markersize=3, label=name,
                    color=_colour(i, len(curves)))
        ax.set(title=label, xlabel="epoch", ylabel=PANEL_LABELS[col])
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small", frameon=False)
    fig.suptitle(title, fontsize="x-large")
    return fig


def _colour(i: int, n: int):
    """Curve i of n: tab10 as usual, tab20 past ten curves (a 5 x 4 MNIST table) so none repeat."""
    from matplotlib import colormaps
    return colormaps["tab10" if n <= 10 else "tab20"](i % 20)


def _plot_table(title: str, curves: list[tuple[str, pd.DataFrame]], path: Path) -> Path:
    fig = figure(title, curves)
    return atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def table_curves(trials: pd.DataFrame, epochs: pd.DataFrame) -> list[tuple[str, list[tuple[str, pd.DataFrame]]]]:
    """Per report table, in declared order: (table, [("row / column", per-epoch means), ...]),
    means over the repeats in `epochs`; tables without epoch rows are left out."""
    require(epochs, EPOCH_COLUMNS, "epochs")
    # A diverged trial logs inf/NaN losses; NaN just breaks its line where inf would warn.
    values = epochs[list(EPOCH_COLUMNS)].replace([np.inf, -np.inf], np.nan)
    means = {name: g.groupby("epoch").mean(numeric_only=True).sort_index()
             for name, g in values.drop(columns="repeat").groupby("name")}
    out = []
    for table, sub in fold_repeats(trials).groupby("table", sort=False):
        curves = [(f"{r.row} / {r.column}", means[r.name]) for r in sub.itertuples() if r.name in means]
        if curves:
            out.append((str(table), curves))
    return out


def plot(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw one PNG per report table: train/test accuracy and loss vs epoch, one line per trial
    ("row / column"), mean over repeats. Writes to out_dir (default RUN_DIR/plots), named after
    the table; tables without epoch rows are skipped. Returns the written paths in table order."""
    trials, epochs = load_run(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    found = table_curves(trials, epochs)
    return [_plot_table(table, curves, out_dir / f"{slug}.png")
            for (table, curves), slug in zip(found, slugs([t for t, _ in found]))]


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
