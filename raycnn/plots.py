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


def _plot_table(title: str, curves: list[tuple[str, pd.DataFrame]], path: Path) -> Path:
    # Figure + Agg canvas rather than pyplot: no global backend switch, no figure registry
    # to leak into, safe next to a GUI session. Imported here so reading results stays light.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    for ax, (col, label) in zip(axes, PLOT_PANELS):
        for name, means in curves:
            # A marker so one-point curves (a zero-shot epoch 0) still show.
            ax.plot(means.index, means[col], marker="o", markersize=3, label=name)
        ax.set(title=label, xlabel="epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize="small")
    fig.suptitle(title)
    return atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def plot(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw one PNG per report table: train/test accuracy and loss vs epoch, one line per trial
    ("row / column"), mean over repeats. Writes to out_dir (default RUN_DIR/plots), named after
    the table; tables without epoch rows are skipped. Returns the written paths in table order."""
    trials, epochs = load_run(run_dir)
    require(epochs, EPOCH_COLUMNS, "epochs")
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    # A diverged trial logs inf/NaN losses; NaN just breaks its line where inf would warn.
    values = epochs[list(EPOCH_COLUMNS)].replace([np.inf, -np.inf], np.nan)
    means = {name: g.groupby("epoch").mean(numeric_only=True).sort_index()
             for name, g in values.drop(columns="repeat").groupby("name")}
    paths, used = [], set()
    for table, sub in fold_repeats(trials).groupby("table", sort=False):
        curves = [(f"{r.row} / {r.column}", means[r.name]) for r in sub.itertuples() if r.name in means]
        if not curves:
            continue
        slug, k = _slug(table), 2
        while slug in used:  # two tables that slug alike must not overwrite each other
            slug, k = f"{_slug(table)}-{k}", k + 1
        used.add(slug)
        paths.append(_plot_table(str(table), curves, out_dir / f"{slug}.png"))
    return paths
