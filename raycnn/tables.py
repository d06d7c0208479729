"""Results laid out the way the report does: one grid per report table, each cell
"ours (report, ours − report)" in percent, coloured by the size of the disagreement.

Rows are plain dicts (a run's trials as `raycnn.results.read_rows` gives them), so that
`raycnn table` and `compare` need neither pandas nor numpy and answer at once; a pandas frame's
`to_dict("records")` works as well. `fold_repeats` folds a trial's repeats into mean ± std,
`combine` lays several runs together (the rule is in its docstring), `render` writes markdown,
CSV or JSON, `sheets` / `long_sheet` feed `raycnn.screen`, and `compare` sets two runs side by side.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import fields
from typing import Callable, Iterable, Iterator

from raycnn.config import TrainConfig
from raycnn.errors import ResultsError
from raycnn.results import require
from raycnn.screen import Sheet

Rows = list[dict]

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


def missing(value) -> bool:
    """No number: None (Parquet's null) or NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def records(trials) -> Rows:
    """Rows from a list of dicts or a pandas frame (its records)."""
    return trials.to_dict("records") if hasattr(trials, "to_dict") else list(trials)


def _status_summary(statuses: list[str]) -> str:
    """One status when all repeats agree, else e.g. "1/3 diverged" for each status not ok."""
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s] = counts.get(s, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    rank = {s: i for i, s in enumerate(STATUS_ORDER)}
    bad = sorted((s for s in counts if s != "ok"), key=lambda s: (rank.get(s, -1), s))
    return ", ".join(f"{counts[s]}/{len(statuses)} {s}" for s in bad)


def joined(values: Iterable) -> str:
    """Distinct non-empty values, in order, as one "a, b" string (the runs, devices, versions of
    a cell's repeats)."""
    return ", ".join(dict.fromkeys(str(v) for v in values if not missing(v) and str(v)))


def md_cell(value) -> str:
    """A value as a Markdown table cell: its pipes escaped."""
    return str(value).replace("|", "\\|")


def _mean_and_std(values: list) -> tuple[float, float]:
    """Mean and sample std of the numbers among `values` (NaN where there are too few)."""
    xs = [float(v) for v in values if not missing(v)]
    mean = sum(xs) / len(xs) if xs else math.nan
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else math.nan
    return mean, std


def fold_repeats(trials) -> Rows:
    """One row per (table, row, column, name), in declared order: the repeats of each trial folded.

    `ours_mean`/`ours_std` are over repeats of `final_test_acc` (fractions; std is the sample
    std, NaN for a single repeat), `n` counts repeats, `diff` = ours_mean - report_acc, and
    `status` is "ok", "diverged", ... or e.g. "1/3 diverged" when repeats disagree. `source`
    names the run(s) the repeats came from and `budget` their training budget (full, quick,
    reduced; "" for rows without that field, as runs made before it was recorded).
    """
    rows = records(trials)
    require(set().union(*(r.keys() for r in rows)) if rows else TRIAL_COLUMNS, TRIAL_COLUMNS, "trials")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["table"], r["row"], r["column"], r["name"]), []).append(r)
    out = []
    for (table, row, column, name), reps in groups.items():
        mean, std = _mean_and_std([r["final_test_acc"] for r in reps])
        report = reps[0]["report_acc"]
        report = math.nan if missing(report) else report
        out.append({"table": table, "row": row, "column": column, "name": name,
                    "suite": reps[0].get("suite") or "", "order": min(r["order"] for r in reps), "n": len(reps),
                    "ours_mean": mean, "ours_std": std, "report_acc": report, "diff": mean - report,
                    "status": _status_summary([r["status"] for r in reps]),
                    "source": joined(r.get("source", "") for r in reps),
                    "budget": joined(r.get("budget", "") for r in reps)})
    out.sort(key=lambda c: (SUITE_RANK.get(c["suite"], len(SUITE_RANK)), c["suite"], c["order"], c["name"]))
    return [{k: c[k] for k in SUMMARY_COLUMNS} for c in out]


# Fields that do not change what a trial computes: rows differing only in these are repeats.
NOT_CONFIG = {"seed", "data_dir", "num_threads", "eval_batch_size", "weights", "device"}


def _config_key(row: dict, columns: list[str]) -> str:
    """A row's config as one string (whole floats as ints: 1.0 and 1 are one config)."""
    norm = lambda v: int(v) if isinstance(v, float) and v.is_integer() else v
    return "\x1f".join(str(norm(row.get(c))) for c in columns)


def combine(runs: list[tuple[str, object]]) -> Rows:
    """The trial rows of several runs as one list, each with a `source` field (the run's name).

    The rule for a trial present in several runs, runs taken in the order given:
    - the same config (every TrainConfig field but the seed and where data/weights live):
      the repeats pool, so the cell is the mean ± std over all of them; for a seed present in
      several runs, the later run's row wins (a rerun replaces, never double counts);
    - a different config (e.g. 1 epoch, then 10): the later run's rows replace the earlier ones.
    """
    if not runs:
        raise ResultsError("no runs given")
    loaded = [[r | {"source": name} for r in records(rows)] for name, rows in runs]
    common = set.intersection(*(set().union(*(r.keys() for r in rows)) for rows in loaded))
    config = [f.name for f in fields(TrainConfig) if f.name in common and f.name not in NOT_CONFIG]
    seeded = "seed" in common
    out: Rows = []
    for rows in loaded:
        configs = {r["name"]: _config_key(r, config) for r in rows}
        seeds = {(r["name"], r.get("seed")) for r in rows} if seeded else set()
        out = [r for r in out if not (r["name"] in configs and configs[r["name"]] != _config_key(r, config))
               and (r["name"], r.get("seed")) not in seeds] + rows
    return out


def _pct(x: float, decimals: int) -> str:
    return MISSING if missing(x) else f"{x * 100:.{decimals}f}"


def _cell_text(rec: dict, source: bool = False) -> str:
    """"97.6 (98, -0.4)", "97.6 ± 0.3 (98, -0.4)" with repeats, then the status when it is not
    "ok", then with `source` the run(s) it came from in square brackets."""
    ours = _pct(rec["ours_mean"], 1)
    if rec["n"] > 1 and not missing(rec["ours_std"]):
        ours += f" ± {_pct(rec['ours_std'], 1)}"
    diff = "" if missing(rec["diff"]) else f", {rec['diff'] * 100:+.1f}"
    text = f"{ours} ({_pct(rec['report_acc'], 0)}{diff})"
    text = text if rec["status"] == "ok" else f"{text} {rec['status']}"
    if rec["budget"] and rec["budget"] != "full":     # never mistake a quick number for a full one
        text += f" [{rec['budget']}]"
    return f"{text} [{rec['source']}]" if source and rec["source"] else text


def _style(diff: float) -> str:
    """Colour for |ours - report| (fractions), either sign; no report number, no colour."""
    if missing(diff):
        return ""
    points = round(abs(diff) * 100, 6)  # so 0.52 - 0.53 counts as 1 point, not 1.0000000000000009
    return next((style for ceiling, style in DIFF_STYLES if points <= ceiling), FAR_STYLE)


def _grids(summary: Rows, source: bool = False) -> Iterator[tuple[str, list, list, dict]]:
    """Per table, in declared order: (table, rows, columns, {(row, column): (text, style)}).

    Two trials landing in one cell are both shown, joined by " / ", coloured by the one
    further from the report.
    """
    for table in dict.fromkeys(c["table"] for c in summary):
        sub = [c for c in summary if c["table"] == table]
        by_cell: dict[tuple, list[dict]] = {}
        for c in sub:
            by_cell.setdefault((c["row"], c["column"]), []).append(c)
        cells = {}
        for key, recs in by_cell.items():
            worst = max((r["diff"] for r in recs if not missing(r["diff"])), key=abs, default=math.nan)
            cells[key] = (" / ".join(_cell_text(r, source) for r in recs), _style(worst))
        yield table, list(dict.fromkeys(c["row"] for c in sub)), list(dict.fromkeys(c["column"] for c in sub)), cells


def _markdown(trials, source: bool = False) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(md_cell(c) for c in cells) + " |"
    lines = [LEGEND, ""]
    for table, rows, cols, cells in _grids(fold_repeats(trials), source):
        lines += [f"### {table}", "", line([""] + cols), "|" + "---|" * (len(cols) + 1)]
        lines += [line([r] + [cells.get((r, c), (MISSING, ""))[0] for c in cols]) for r in rows]
        lines.append("")
    return "\n".join(lines)


def _plain(value):
    """A cell for CSV and JSON: no number is empty (CSV) or null (JSON)."""
    return None if missing(value) else value


def _csv(trials, source: bool = False) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    writer.writerows([["" if missing(c[k]) else c[k] for k in SUMMARY_COLUMNS] for c in fold_repeats(trials)])
    return out.getvalue()


def _json(trials, source: bool = False) -> str:
    return json.dumps([{k: _plain(v) for k, v in c.items()} for c in fold_repeats(trials)], indent=1) + "\n"


RENDERERS: dict[str, Callable[..., str]] = {"markdown": _markdown, "csv": _csv, "json": _json}


def render(trials, fmt: str, source: bool = False) -> str:
    """Text of the results: "markdown" (a "### table" heading and pipe grid per report table,
    cells "ours (report, ours - report)" in %; `source` adds each cell's run), or "csv" / "json"
    (one record per trial with repeats folded, fractions, `diff` signed, `source` the run(s))."""
    if fmt not in RENDERERS:
        raise ResultsError(f"unknown format {fmt!r}; choose from {', '.join(RENDERERS)}")
    return RENDERERS[fmt](trials, source)


def sheets(trials, source: bool = False) -> list[Sheet]:
    """One Sheet per report table, cells as in `render`, coloured by |ours - report| either way:
    green within 1 point, yellow within 3, red beyond (for `screen.emit` on a terminal)."""
    out = []
    for table, rows, cols, cells in _grids(fold_repeats(trials), source):
        grid = Sheet([""] + [str(c) for c in cols], title=str(table), caption=CAPTION,
                     justify={str(c): "right" for c in cols})
        grid.rows = [[str(r)] + [cells.get((r, c), (MISSING, "dim")) for c in cols] for r in rows]
        out.append(grid)
    return out


def long_sheet(trials) -> Sheet:
    """All cells in one Sheet, one line per trial (for a pipe: grep/cut/awk), percentages."""
    sheet = Sheet(["table", "row", "column", "trial", "n", "ours", "std", "report", "diff", "status", "source",
                   "budget"])
    sheet.rows = [[r["table"], r["row"], r["column"], r["name"], str(r["n"]), _pct(r["ours_mean"], 2),
                   _pct(r["ours_std"], 2), _pct(r["report_acc"], 0),
                   MISSING if missing(r["diff"]) else f"{r['diff'] * 100:+.2f}", r["status"], r["source"], r["budget"]]
                  for r in fold_repeats(trials)]
    return sheet


COMPARE_COLUMNS = ["table", "row", "column", "name", "a_n", "a_mean", "a_std", "b_n", "b_mean", "b_std", "diff",
                   "beyond_spread"]


def compare(a, b) -> Rows:
    """Per trial in both, in B's declared order: n, mean and std of each side (fractions),
    `diff` = B - A, and `beyond_spread`: True when |diff| exceeds std_A + std_B, False when it
    does not, None unless both sides have repeats."""
    fa = {c["name"]: c for c in fold_repeats(a)}
    out = []
    for cb in fold_repeats(b):
        ca = fa.get(cb["name"])
        if ca is None:
            continue
        diff, spread = cb["ours_mean"] - ca["ours_mean"], ca["ours_std"] + cb["ours_std"]
        beyond = None if missing(spread) or min(ca["n"], cb["n"]) < 2 else abs(diff) > spread
        out.append({"table": cb["table"], "row": cb["row"], "column": cb["column"], "name": cb["name"],
                    "a_n": ca["n"], "a_mean": ca["ours_mean"], "a_std": ca["ours_std"],
                    "b_n": cb["n"], "b_mean": cb["ours_mean"], "b_std": cb["ours_std"],
                    "diff": diff, "beyond_spread": beyond})
    return out


def compare_text(diffs: Rows, fmt: str) -> str:
    """`compare`'s rows as CSV or JSON."""
    if fmt == "json":
        return json.dumps([{k: _plain(v) for k, v in d.items()} for d in diffs], indent=1) + "\n"
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COMPARE_COLUMNS)
    writer.writerows([["" if missing(d[k]) else d[k] for k in COMPARE_COLUMNS] for d in diffs])
    return out.getvalue()


def _mean_std(mean: float, std: float, n: int) -> str:
    return _pct(mean, 1) + (f" ± {_pct(std, 1)}" if n > 1 and not missing(std) else "")


def compare_sheet(diffs: Rows, a: str, b: str) -> Sheet:
    """`compare`'s rows as a Sheet: trial, A, B, B - A in points and whether it beats the spread."""
    sheet = Sheet(["trial", a, b, "B − A", "beyond spread"], title=f"A = {a}, B = {b}, test accuracy %",
                  drop=("beyond spread",), justify={a: "right", b: "right", "B − A": "right"})
    verdict = {True: "yes", False: "no", None: MISSING}
    sheet.rows = [[r["name"], _mean_std(r["a_mean"], r["a_std"], r["a_n"]), _mean_std(r["b_mean"], r["b_std"], r["b_n"]),
                   MISSING if missing(r["diff"]) else f"{r['diff'] * 100:+.1f}", verdict[r["beyond_spread"]]]
                  for r in diffs]
    return sheet


# ---------------------------------------------------------------- searches

SEARCH_HEADER = ("cell", "report", "grid (ours)", "tuned ({seeds}re-run)", "best config", "epochs spent")
SEARCH_LEGEND = ("Per searched cell: the report's test accuracy (%), ours from the grid runs given, the "
                 "best config's re-run with fresh seeds (mean ± std over seeds, test set), the config the "
                 "search chose on its validation split, and the epochs trained: search + re-run.")
SEARCH_COLUMNS = ["name", "table", "row", "column", "report_acc", "grid_mean", "grid_std", "grid_n", "grid_budget",
                  "tuned_mean", "tuned_std", "tuned_n", "tuned_status", "tuned_budget", "tuned_diff", "best_config",
                  "repeats", "metric", "best_metric", "samples", "epochs_search", "epochs_rerun", "source"]


def _planned_seeds(view: Rows) -> int | None:
    """The seeds every searched cell's re-run plans, where they all plan the same number."""
    planned = {r["repeats"] for r in view}
    return planned.pop() if len(planned) == 1 else None


def search_header(view: Rows) -> list[str]:
    """SEARCH_HEADER, the re-run's seeds named where every cell plans the same: "tuned (3-seed re-run)"."""
    seeds = _planned_seeds(view)
    return [h.format(seeds=f"{seeds}-seed " if seeds else "") for h in SEARCH_HEADER]


def search_view(searched: Rows, grid=None) -> Rows:
    """Per searched cell (`raycnn.search.summary` rows, several searches laid together): the
    report, the grid's number from the `grid` trial rows (repeats folded; NaN where not run),
    the tuned re-run and what the search spent."""
    cells = {c["name"]: c for c in fold_repeats(grid)} if grid is not None and len(grid) else {}
    out = []
    for s in searched:
        g = cells.get(s["name"], {})
        out.append(s | {"grid_mean": g.get("ours_mean", math.nan), "grid_std": g.get("ours_std", math.nan),
                        "grid_n": g.get("n", 0), "grid_budget": g.get("budget", ""),
                        "tuned_diff": s["tuned_mean"] - s["report_acc"]})
    return out


def _budget_tag(budget) -> str:
    return f" [{budget}]" if isinstance(budget, str) and budget and budget != "full" else ""


def search_cells(view: Rows) -> list[list[str]]:
    """The search view's rows as text cells (search_header's), percentages; a re-run's seeds are
    named where the header does not say them all ("(2 of 3 seeds)": one not run yet)."""
    out, header_seeds = [], _planned_seeds(view)
    for r in view:
        grid = MISSING if missing(r["grid_mean"]) else (
            _mean_std(r["grid_mean"], r["grid_std"], r["grid_n"]) + _budget_tag(r["grid_budget"]))
        seeds = "" if r["tuned_n"] == header_seeds else f" ({r['tuned_n']} of {r['repeats']} seeds)"
        tuned = MISSING if missing(r["tuned_mean"]) else (
            _mean_std(r["tuned_mean"], r["tuned_std"], r["tuned_n"]) + seeds + _budget_tag(r["tuned_budget"]))
        out.append([r["name"], _pct(r["report_acc"], 0), grid, tuned, r["best_config"] or MISSING,
                    f"{r['epochs_search']} + {r['epochs_rerun']}"])
    return out


def search_sheet(view: Rows) -> Sheet:
    """The search view as a Sheet; the tuned cell coloured by |tuned - report| as the grids are."""
    header = search_header(view)
    sheet = Sheet(header, title="Searched cells", caption=SEARCH_LEGEND,
                  justify={c: "right" for c in header[1:4] + header[5:]}, drop=("epochs spent", "grid (ours)"))
    sheet.rows = [cells[:3] + [(cells[3], _style(r["tuned_diff"]))] + cells[4:]
                  for cells, r in zip(search_cells(view), view)]
    return sheet


def _search_markdown(view: Rows) -> str:
    lines = [SEARCH_LEGEND, "", "| " + " | ".join(search_header(view)) + " |", "|" + "---|" * len(SEARCH_HEADER)]
    return "\n".join(lines + ["| " + " | ".join(md_cell(c) for c in cells) + " |" for cells in search_cells(view)]) + "\n"


def _search_csv(view: Rows) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(SEARCH_COLUMNS)
    writer.writerows([["" if missing(r[k]) else r[k] for k in SEARCH_COLUMNS] for r in view])
    return out.getvalue()


def _search_json(view: Rows) -> str:
    return json.dumps([{k: _plain(r[k]) for k in SEARCH_COLUMNS} for r in view], indent=1) + "\n"


SEARCH_RENDERERS: dict[str, Callable[[Rows], str]] = {"markdown": _search_markdown, "csv": _search_csv,
                                                      "json": _search_json}


def render_search(view: Rows, fmt: str) -> str:
    """The search view as markdown (one table), or csv / json (SEARCH_COLUMNS, fractions)."""
    if fmt not in SEARCH_RENDERERS:
        raise ResultsError(f"unknown format {fmt!r}; choose from {', '.join(SEARCH_RENDERERS)}")
    return SEARCH_RENDERERS[fmt](view)
