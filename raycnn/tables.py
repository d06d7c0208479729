"""Results laid out the way the report does: one grid per report table, each cell
"ours (report, ours − report)" in percent, coloured by the size of the disagreement.

`fold_repeats` folds a trial's repeats into mean ± std, `combine` lays several runs together
(the rule is in its docstring), `render` writes markdown, CSV or JSON, `sheets` / `long_sheet`
feed `raycnn.screen`, and `compare` sets two runs side by side.
"""
from __future__ import annotations

import math
from dataclasses import fields
from typing import Callable, Iterator

import pandas as pd

from raycnn.config import TrainConfig
from raycnn.errors import ResultsError
from raycnn.results import require
from raycnn.screen import Sheet, rich_table

TRIAL_COLUMNS = ("name", "table", "row", "column", "order", "status", "final_test_acc", "report_acc")
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

def _status_summary(statuses: pd.Series) -> str:
    """One status when all repeats agree, else e.g. "1/3 diverged" for each status not ok."""
    counts = statuses.value_counts()
    if len(counts) == 1:
        return str(counts.index[0])
    rank = {s: i for i, s in enumerate(STATUS_ORDER)}
    bad = sorted((s for s in counts.index if s != "ok"), key=lambda s: (rank.get(s, -1), s))
    return ", ".join(f"{counts[s]}/{len(statuses)} {s}" for s in bad)


def joined(values) -> str:
    """Distinct non-empty values, in order, as one "a, b" string (the runs, devices, versions of
    a cell's repeats)."""
    return ", ".join(dict.fromkeys(str(v) for v in values if not pd.isna(v) and str(v)))


def md_cell(value) -> str:
    """A value as a Markdown table cell: its pipes escaped."""
    return str(value).replace("|", "\\|")


def fold_repeats(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per (table, row, column, name), in declared order: the repeats of each trial folded.

    `ours_mean`/`ours_std` are over repeats of `final_test_acc` (fractions; std is the sample
    std, NaN for a single repeat), `n` counts repeats, `diff` = ours_mean - report_acc, and
    `status` is "ok", "diverged", ... or e.g. "1/3 diverged" when repeats disagree. `source`
    names the run(s) the repeats came from and `budget` their training budget (full, quick,
    reduced; "" for a frame without that column, as runs made before it was recorded).
    """
    require(trials, TRIAL_COLUMNS, "trials")
    df = trials.assign(**{c: "" for c in ("suite", "source", "budget") if c not in trials.columns})
    out = (df.groupby(["table", "row", "column", "name"], sort=False, dropna=False)
           .agg(suite=("suite", "first"), order=("order", "min"), n=("name", "size"),
                ours_mean=("final_test_acc", "mean"), ours_std=("final_test_acc", "std"),
                report_acc=("report_acc", "first"), status=("status", _status_summary),
                source=("source", joined), budget=("budget", joined))
           .reset_index())
    out["diff"] = out["ours_mean"] - out["report_acc"]
    rank = out["suite"].map(SUITE_RANK).fillna(len(SUITE_RANK))
    out = out.assign(_rank=rank).sort_values(["_rank", "suite", "order", "name"], kind="stable")
    return out[SUMMARY_COLUMNS].reset_index(drop=True)


# Fields that do not change what a trial computes: rows differing only in these are repeats.
NOT_CONFIG = {"seed", "data_dir", "num_threads", "eval_batch_size", "weights", "device"}


def _config_columns(frames: list[pd.DataFrame]) -> list[str]:
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
        return "| " + " | ".join(md_cell(c) for c in cells) + " |"
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
