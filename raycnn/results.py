"""Read a run folder's Parquet results and lay them out the way the report does.

A run folder holds `trials.parquet` (one row per trial and repeat) and `epochs.parquet` (one row
per trial, repeat and epoch). This module only reads them back (plus `write_parquet`, the atomic
writer the producer uses): `summarize` folds repeats, `render` / `rich_tables` draw one grid per
report table as "ours (report)" in percent, and `plot` draws learning curves. Ray-free on purpose,
so results can be inspected on a machine without a cluster.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from rich.table import Table
from rich.text import Text

TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"
TRIAL_COLUMNS = ("name", "table", "row", "column", "order", "status", "final_test_acc", "report_acc")
EPOCH_COLUMNS = ("name", "repeat", "epoch", "train_acc", "test_acc", "train_loss", "test_loss")
SUMMARY_COLUMNS = ["table", "row", "column", "name", "suite", "order", "n",
                   "ours_mean", "ours_std", "report_acc", "diff", "status"]

# `order` is a position inside one suite file, so tables of different suites are ordered by
# suite first: the report's own suites in report order, user suites after them by name.
SUITE_RANK = {"mnist": 0, "cifar10": 1, "pretrained": 2}
# Worst-first, so a mixed status lists the most alarming outcome first.
STATUS_ORDER = ("error", "diverged", "running", "ok")
# Cell colour by (ours - report) in percentage points: first threshold met wins, else red.
DIFF_STYLES = ((-1.0, "green"), (-3.0, "yellow"))
FAR_STYLE = "red"
MISSING = "—"
LEGEND = ("Test accuracy in %: ours (report); ours is the final-epoch accuracy, mean ± std over "
          f"repeats; {MISSING} = not run or no number; a status after a cell flags repeats that "
          "did not end ok.")
PLOT_PANELS = (("train_acc", "train accuracy"), ("test_acc", "test accuracy"),
               ("train_loss", "train loss"), ("test_loss", "test loss"))


class ResultsError(ValueError):
    """Results that cannot be read or shown; the message is one line for the user."""


def _atomic(path: Path, write: Callable[[str], None]) -> Path:
    """Run `write(tmp)` on a temp file beside `path`, then rename it over `path`.

    Same folder so os.replace is a rename on one filesystem: readers see the old file or the
    new one, never half of one, and a failed write leaves no litter behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_parquet(rows: list[dict] | pd.DataFrame, path: str | Path) -> Path:
    """Write rows (dicts or a DataFrame) to `path` atomically, creating its folder.

    Tuple and list cells become Parquet list columns; `load_run` turns them back into lists.
    """
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    return _atomic(Path(path), lambda tmp: df.to_parquet(tmp, index=False))


def _read(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ResultsError(f"cannot read {path}: {first}") from None
    # pyarrow hands list cells back as numpy arrays; plain lists compare with == and feed
    # TrainConfig.from_dict (which turns lists into tuples) unchanged.
    for col in df.columns[df.dtypes == object]:
        if df[col].map(lambda v: isinstance(v, np.ndarray)).any():
            df[col] = df[col].map(lambda v: v.tolist() if isinstance(v, np.ndarray) else v)
    return df


def load_run(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (trials, epochs) of a run folder; no epochs file gives an empty epochs frame.

    Raises ResultsError when trials.parquet is missing or unreadable.
    """
    run_dir = Path(run_dir)
    trials_path, epochs_path = run_dir / TRIALS_FILE, run_dir / EPOCHS_FILE
    if not trials_path.is_file():
        raise ResultsError(f"no results: {trials_path} does not exist")
    epochs = _read(epochs_path) if epochs_path.is_file() else pd.DataFrame(columns=list(EPOCH_COLUMNS))
    return _read(trials_path), epochs


def _require(df: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ResultsError(f"{what} lack column(s): {', '.join(missing)}")


def _status_summary(statuses: pd.Series) -> str:
    """One status when all repeats agree, else e.g. "1/3 diverged" for each status not ok."""
    counts = statuses.value_counts()
    if len(counts) == 1:
        return str(counts.index[0])
    rank = {s: i for i, s in enumerate(STATUS_ORDER)}
    bad = sorted((s for s in counts.index if s != "ok"), key=lambda s: (rank.get(s, -1), s))
    return ", ".join(f"{counts[s]}/{len(statuses)} {s}" for s in bad)


def summarize(trials: pd.DataFrame) -> pd.DataFrame:
    """Fold repeats: one row per (table, row, column, name), in declared order.

    `ours_mean`/`ours_std` are over repeats of `final_test_acc` (fractions; std is the sample
    std, NaN for a single repeat), `n` counts repeats, `diff` = ours_mean - report_acc, and
    `status` is "ok", "diverged", ... or e.g. "1/3 diverged" when repeats disagree.
    """
    _require(trials, TRIAL_COLUMNS, "trials")
    df = trials if "suite" in trials.columns else trials.assign(suite="")
    out = (df.groupby(["table", "row", "column", "name"], sort=False, dropna=False)
           .agg(suite=("suite", "first"), order=("order", "min"), n=("name", "size"),
                ours_mean=("final_test_acc", "mean"), ours_std=("final_test_acc", "std"),
                report_acc=("report_acc", "first"), status=("status", _status_summary))
           .reset_index())
    out["diff"] = out["ours_mean"] - out["report_acc"]
    rank = out["suite"].map(SUITE_RANK).fillna(len(SUITE_RANK))
    out = out.assign(_rank=rank).sort_values(["_rank", "suite", "order", "name"], kind="stable")
    return out[SUMMARY_COLUMNS].reset_index(drop=True)


def _pct(x: float, decimals: int) -> str:
    return MISSING if pd.isna(x) else f"{x * 100:.{decimals}f}"


def _cell_text(rec) -> str:
    """"97.6 (98)", "97.6 ± 0.3 (98)" with repeats, then the status when it is not "ok"."""
    ours = _pct(rec.ours_mean, 1)
    if rec.n > 1 and not pd.isna(rec.ours_std):
        ours += f" ± {_pct(rec.ours_std, 1)}"
    text = f"{ours} ({_pct(rec.report_acc, 0)})"
    return text if rec.status == "ok" else f"{text} {rec.status}"


def _style(diff: float) -> str:
    """Colour for ours - report (fractions); no report number, no colour."""
    if pd.isna(diff):
        return ""
    points = round(diff * 100, 6)  # so 0.52 - 0.53 counts as -1 point, not -1.0000000000000009
    return next((style for floor, style in DIFF_STYLES if points >= floor), FAR_STYLE)


def _grids(summary: pd.DataFrame) -> Iterator[tuple[str, list, list, dict]]:
    """Per table, in declared order: (table, rows, columns, {(row, column): (text, style)}).

    Two trials landing in one cell are both shown, joined by " / ", coloured by the worse one.
    """
    for table in summary["table"].unique():
        sub = summary[summary["table"] == table]
        cells = {}
        for key, group in sub.groupby(["row", "column"], sort=False, dropna=False):
            recs = list(group.itertuples(index=False))
            worst = min((r.diff for r in recs if not pd.isna(r.diff)), default=math.nan)
            cells[key] = (" / ".join(_cell_text(r) for r in recs), _style(worst))
        yield table, list(sub["row"].unique()), list(sub["column"].unique()), cells


def _markdown(trials: pd.DataFrame) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    lines = [LEGEND, ""]
    for table, rows, cols, cells in _grids(summarize(trials)):
        lines += [f"### {table}", "", line([""] + cols), "|" + "---|" * (len(cols) + 1)]
        lines += [line([r] + [cells.get((r, c), (MISSING, ""))[0] for c in cols]) for r in rows]
        lines.append("")
    return "\n".join(lines)


def _csv(trials: pd.DataFrame) -> str:
    return summarize(trials).to_csv(index=False)


RENDERERS: dict[str, Callable[[pd.DataFrame], str]] = {"markdown": _markdown, "csv": _csv}


def render(trials: pd.DataFrame, fmt: str) -> str:
    """Text of the results: "markdown" (a "### table" heading and pipe grid per report table,
    cells "ours (report)" in %) or "csv" (one line per summarized trial, fractions)."""
    if fmt not in RENDERERS:
        raise ResultsError(f"unknown format {fmt!r}; choose from {', '.join(RENDERERS)}")
    return RENDERERS[fmt](trials)


def rich_tables(trials: pd.DataFrame) -> list[Table]:
    """One rich Table per report table, cells as in `render`, coloured by ours - report:
    green within 1 point below the report (or above it), yellow within 3, red beyond."""
    out = []
    for table, rows, cols, cells in _grids(summarize(trials)):
        grid = Table(title=table, caption="ours (report), test accuracy %", title_justify="left")
        grid.add_column("", style="bold")
        for c in cols:
            grid.add_column(str(c), justify="right")
        for r in rows:
            grid.add_row(str(r), *(Text(*cells.get((r, c), (MISSING, "dim"))) for c in cols))
        out.append(grid)
    return out


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
    return _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def plot(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw one PNG per report table: train/test accuracy and loss vs epoch, one line per trial
    ("row / column"), mean over repeats. Writes to out_dir (default RUN_DIR/plots), named after
    the table; tables without epoch rows are skipped. Returns the written paths in table order."""
    trials, epochs = load_run(run_dir)
    _require(epochs, EPOCH_COLUMNS, "epochs")
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    # A diverged trial logs inf/NaN losses; NaN just breaks its line where inf would warn.
    values = epochs[list(EPOCH_COLUMNS)].replace([np.inf, -np.inf], np.nan)
    means = {name: g.groupby("epoch").mean(numeric_only=True).sort_index()
             for name, g in values.drop(columns="repeat").groupby("name")}
    paths, used = [], set()
    for table, sub in summarize(trials).groupby("table", sort=False):
        curves = [(f"{r.row} / {r.column}", means[r.name]) for r in sub.itertuples() if r.name in means]
        if not curves:
            continue
        slug, k = _slug(table), 2
        while slug in used:  # two tables that slug alike must not overwrite each other
            slug, k = f"{_slug(table)}-{k}", k + 1
        used.add(slug)
        paths.append(_plot_table(str(table), curves, out_dir / f"{slug}.png"))
    return paths
