"""Read a run folder's Parquet results and lay them out the way the report does.

A run folder holds `trials.parquet` (one row per trial and repeat) and `epochs.parquet` (one row
per trial, repeat and epoch). This module only reads them back (plus `write_parquet`, the atomic
writer the producer uses): `fold_repeats` folds repeats, `combine` lays several runs together,
`render` / `sheets` draw one grid per report table as "ours (report, difference)" in percent,
`compare` sets two runs side by side, and `plot` draws learning curves. Ray-free on purpose, so
results can be inspected on a machine without a cluster.
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

from raycnn.screen import Sheet, rich_table

TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"
TRIAL_COLUMNS = ("name", "table", "row", "column", "order", "status", "final_test_acc", "report_acc")
EPOCH_COLUMNS = ("name", "repeat", "epoch", "train_acc", "test_acc", "train_loss", "test_loss")
SUMMARY_COLUMNS = ["table", "row", "column", "name", "suite", "order", "n",
                   "ours_mean", "ours_std", "report_acc", "diff", "status", "source", "budget"]

# `order` is a position inside one suite file, so tables of different suites are ordered by
# suite first: the report's own suites in report order, user suites after them by name.
SUITE_RANK = {"mnist": 0, "cifar10": 1, "pretrained": 2}
# Worst-first, so a mixed status lists the most alarming outcome first.
STATUS_ORDER = ("error", "diverged", "running", "ok")
# Cell colour by |ours - report| in percentage points, above or below alike (a number far above
# the report is as much a disagreement as one far below): first ceiling met wins, else red.
DIFF_STYLES = ((1.0, "green"), (3.0, "yellow"))
FAR_STYLE = "red"
MISSING = "—"
LEGEND = ("Test accuracy in %: ours (report, ours − report in points); ours is the final-epoch "
          f"accuracy, mean ± std over repeats; {MISSING} = not run or no number; a status after a "
          "cell flags repeats that did not end ok.")
CAPTION = "ours (report, ours − report), test accuracy %"
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


def _joined(values: pd.Series) -> str:
    return ", ".join(dict.fromkeys(str(v) for v in values if isinstance(v, str) and v))


def fold_repeats(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per (table, row, column, name), in declared order: the repeats of each trial folded.

    `ours_mean`/`ours_std` are over repeats of `final_test_acc` (fractions; std is the sample
    std, NaN for a single repeat), `n` counts repeats, `diff` = ours_mean - report_acc, and
    `status` is "ok", "diverged", ... or e.g. "1/3 diverged" when repeats disagree. `source`
    names the run(s) the repeats came from and `budget` their training budget (full, quick,
    reduced; "" for a frame without that column, as runs made before it was recorded).
    """
    _require(trials, TRIAL_COLUMNS, "trials")
    df = trials.assign(**{c: "" for c in ("suite", "source", "budget") if c not in trials.columns})
    out = (df.groupby(["table", "row", "column", "name"], sort=False, dropna=False)
           .agg(suite=("suite", "first"), order=("order", "min"), n=("name", "size"),
                ours_mean=("final_test_acc", "mean"), ours_std=("final_test_acc", "std"),
                report_acc=("report_acc", "first"), status=("status", _status_summary),
                source=("source", _joined), budget=("budget", _joined))
           .reset_index())
    out["diff"] = out["ours_mean"] - out["report_acc"]
    rank = out["suite"].map(SUITE_RANK).fillna(len(SUITE_RANK))
    out = out.assign(_rank=rank).sort_values(["_rank", "suite", "order", "name"], kind="stable")
    return out[SUMMARY_COLUMNS].reset_index(drop=True)


# Fields that do not change what a trial computes: rows differing only in these are repeats.
NOT_CONFIG = {"seed", "data_dir", "num_threads", "eval_batch_size", "weights", "device"}


def _config_columns(frames: list[pd.DataFrame]) -> list[str]:
    from dataclasses import fields
    from raycnn.trainer import TrainConfig
    common = set.intersection(*(set(f.columns) for f in frames))
    return [f.name for f in fields(TrainConfig) if f.name in common and f.name not in NOT_CONFIG]


def combine(runs: list[tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    """The trial rows of several runs as one frame, with a `source` column (the run's name).

    The rule for a trial present in several runs, runs taken in the order given:
    - the same config (every TrainConfig field but the seed and where data/weights live):
      the repeats pool, so the cell is the mean ± std over all of them; for a seed present in
      several runs, the later run's row wins (a rerun replaces, never double counts);
    - a different config (e.g. 1 epoch, then 10): the later run's rows replace the earlier ones.
    """
    frames = [df.assign(source=name) for name, df in runs]
    if not frames:
        raise ResultsError("no runs given")
    config = _config_columns(frames)
    seed = ["seed"] if all("seed" in f.columns for f in frames) else []
    out = pd.DataFrame()
    for df in frames:
        if out.empty:
            out = df
            continue
        key = lambda f: f[config].astype(str).agg("\x1f".join, axis=1) if config else pd.Series("", index=f.index)
        old_key, new_key = key(out), key(df)
        names_configs = dict(zip(df["name"], new_key))
        replaced = out["name"].isin(names_configs) & (out["name"].map(names_configs) != old_key)
        if seed:
            pairs = set(zip(df["name"], df["seed"]))
            replaced |= pd.Series([p in pairs for p in zip(out["name"], out["seed"])], index=out.index)
        out = pd.concat([out[~replaced], df], ignore_index=True)
    return out.reset_index(drop=True)


def _pct(x: float, decimals: int) -> str:
    return MISSING if pd.isna(x) else f"{x * 100:.{decimals}f}"


def _cell_text(rec, source: bool = False) -> str:
    """"97.6 (98, -0.4)", "97.6 ± 0.3 (98, -0.4)" with repeats, then the status when it is not
    "ok", then with `source` the run(s) it came from in square brackets."""
    ours = _pct(rec.ours_mean, 1)
    if rec.n > 1 and not pd.isna(rec.ours_std):
        ours += f" ± {_pct(rec.ours_std, 1)}"
    diff = "" if pd.isna(rec.diff) else f", {rec.diff * 100:+.1f}"
    text = f"{ours} ({_pct(rec.report_acc, 0)}{diff})"
    text = text if rec.status == "ok" else f"{text} {rec.status}"
    if rec.budget and rec.budget != "full":     # never mistake a quick number for a full one
        text += f" [{rec.budget}]"
    return f"{text} [{rec.source}]" if source and rec.source else text


def _style(diff: float) -> str:
    """Colour for |ours - report| (fractions), either sign; no report number, no colour."""
    if pd.isna(diff):
        return ""
    points = round(abs(diff) * 100, 6)  # so 0.52 - 0.53 counts as 1 point, not 1.0000000000000009
    return next((style for ceiling, style in DIFF_STYLES if points <= ceiling), FAR_STYLE)


def _grids(summary: pd.DataFrame, source: bool = False) -> Iterator[tuple[str, list, list, dict]]:
    """Per table, in declared order: (table, rows, columns, {(row, column): (text, style)}).

    Two trials landing in one cell are both shown, joined by " / ", coloured by the one
    further from the report.
    """
    for table in summary["table"].unique():
        sub = summary[summary["table"] == table]
        cells = {}
        for key, group in sub.groupby(["row", "column"], sort=False, dropna=False):
            recs = list(group.itertuples(index=False))
            worst = max((r.diff for r in recs if not pd.isna(r.diff)), key=abs, default=math.nan)
            cells[key] = (" / ".join(_cell_text(r, source) for r in recs), _style(worst))
        yield table, list(sub["row"].unique()), list(sub["column"].unique()), cells


def _markdown(trials: pd.DataFrame, source: bool = False) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    lines = [LEGEND, ""]
    for table, rows, cols, cells in _grids(fold_repeats(trials), source):
        lines += [f"### {table}", "", line([""] + cols), "|" + "---|" * (len(cols) + 1)]
        lines += [line([r] + [cells.get((r, c), (MISSING, ""))[0] for c in cols]) for r in rows]
        lines.append("")
    return "\n".join(lines)


def _csv(trials: pd.DataFrame, source: bool = False) -> str:
    return fold_repeats(trials).to_csv(index=False)


def _json(trials: pd.DataFrame, source: bool = False) -> str:
    return fold_repeats(trials).to_json(orient="records", indent=1) + "\n"


RENDERERS: dict[str, Callable[..., str]] = {"markdown": _markdown, "csv": _csv, "json": _json}


def render(trials: pd.DataFrame, fmt: str, source: bool = False) -> str:
    """Text of the results: "markdown" (a "### table" heading and pipe grid per report table,
    cells "ours (report, ours - report)" in %; `source` adds each cell's run), or "csv" / "json"
    (one record per trial with repeats folded, fractions, `diff` signed, `source` the run(s))."""
    if fmt not in RENDERERS:
        raise ResultsError(f"unknown format {fmt!r}; choose from {', '.join(RENDERERS)}")
    return RENDERERS[fmt](trials, source)


def sheets(trials: pd.DataFrame, source: bool = False) -> list[Sheet]:
    """One Sheet per report table, cells as in `render`, coloured by |ours - report| either way:
    green within 1 point, yellow within 3, red beyond (for `screen.emit` on a terminal)."""
    out = []
    for table, rows, cols, cells in _grids(fold_repeats(trials), source):
        grid = Sheet([""] + [str(c) for c in cols], title=str(table), caption=CAPTION,
                     justify={str(c): "right" for c in cols})
        grid.rows = [[str(r)] + [cells.get((r, c), (MISSING, "dim")) for c in cols] for r in rows]
        out.append(grid)
    return out


def long_sheet(trials: pd.DataFrame) -> Sheet:
    """All cells in one Sheet, one line per trial (for a pipe: grep/cut/awk), percentages."""
    s = fold_repeats(trials)
    sheet = Sheet(["table", "row", "column", "trial", "n", "ours", "std", "report", "diff", "status", "source",
                   "budget"])
    sheet.rows = [[r.table, r.row, r.column, r.name, str(r.n), _pct(r.ours_mean, 2), _pct(r.ours_std, 2),
                   _pct(r.report_acc, 0), MISSING if pd.isna(r.diff) else f"{r.diff * 100:+.2f}", r.status,
                   r.source, r.budget] for r in s.itertuples(index=False)]
    return sheet


def compare(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Per trial in both trial frames, in B's declared order: n, mean and std of each side
    (fractions), `diff` = B - A, and `beyond_spread`: True when |diff| exceeds std_A + std_B,
    False when it does not, None unless both sides have repeats."""
    keep = ["name", "n", "ours_mean", "ours_std"]
    fa, fb = fold_repeats(a)[keep], fold_repeats(b)
    both = fb[["table", "row", "column"] + keep].merge(fa, on="name", suffixes=("_b", "_a"))
    both = both.rename(columns=lambda c: f"{c[-1]}_{c[:-2].replace('ours_', '')}" if c[-2:] in ("_a", "_b") else c)
    both["diff"] = both["b_mean"] - both["a_mean"]
    spread = both["a_std"] + both["b_std"]
    both["beyond_spread"] = pd.Series([None if pd.isna(s) or min(na, nb) < 2 else bool(abs(d) > s)
                                       for d, s, na, nb in zip(both["diff"], spread, both["a_n"], both["b_n"])],
                                      index=both.index, dtype=object)
    return both[["table", "row", "column", "name", "a_n", "a_mean", "a_std", "b_n", "b_mean", "b_std", "diff",
                 "beyond_spread"]]


def _mean_std(mean: float, std: float, n: int) -> str:
    return _pct(mean, 1) + (f" ± {_pct(std, 1)}" if n > 1 and not pd.isna(std) else "")


def compare_sheet(diffs: pd.DataFrame, a: str, b: str) -> Sheet:
    """`compare`'s frame as a Sheet: trial, A, B, B - A in points and whether it beats the spread."""
    sheet = Sheet(["trial", a, b, "B − A", "beyond spread"], title=f"A = {a}, B = {b}, test accuracy %",
                  drop=("beyond spread",), justify={a: "right", b: "right", "B − A": "right"})
    verdict = {True: "yes", False: "no", None: MISSING}
    sheet.rows = [[r.name, _mean_std(r.a_mean, r.a_std, r.a_n), _mean_std(r.b_mean, r.b_std, r.b_n),
                   MISSING if pd.isna(r.diff) else f"{r.diff * 100:+.1f}", verdict[r.beyond_spread]]
                  for r in diffs.itertuples(index=False)]
    return sheet


def rich_tables(trials: pd.DataFrame, width: int = 200) -> list:
    """The `sheets` as rich Tables for a terminal `width` characters wide."""
    return [rich_table(s, width) for s in sheets(trials)]


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
