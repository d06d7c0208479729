"""raycnn.results, tables and plots: Parquet round trip, repeat folding, report-shaped tables, run
combination and comparison, plots."""
import io
import math
import os

import pandas as pd
import pytest
from rich.console import Console

from raycnn import plots, results, screen, tables
from raycnn.errors import ResultsError

MNIST, AUG, PRE = "3.1 MNIST, lr = 0.01", "4.2 Data Augmentation", "5.1 Without finetuning"
ACC = "Accuracy (%)"
# (suite, table, row, column, order, report_acc, [(final_test_acc, status) per repeat])
TRIALS = [
    ("mnist", MNIST, "Base Model", "SGD", 0, 0.98, [(0.975, "ok"), (0.979, "ok"), (0.974, "ok")]),
    ("mnist", MNIST, "Base Model", "SGD + momentum", 1, 0.99, [(0.991, "ok")]),
    ("mnist", MNIST, "3 Dropout", "SGD", 2, 0.11, [(0.101, "diverged")]),
    # ("3 Dropout", "SGD + momentum") is left out on purpose: a cell that was not run
    ("cifar10", AUG, "Random Crop", ACC, 0, 0.53, [(0.52, "ok")]),          # exactly -1 point
    ("cifar10", AUG, "Flip", ACC, 1, math.nan, [(0.70, "ok")]),             # no report number
    ("cifar10", AUG, "Color Jitter", ACC, 2, 0.46, [(0.43, "ok"), (0.43, "diverged")]),  # -3 points
    ("cifar10", AUG, "Crop + Flip", ACC, 3, 0.66, [(0.40, "ok")]),
    ("pretrained", PRE, "Zero-shot", ACC, 0, 0.15, [(0.10, "ok")]),        # no epoch rows
]


def _name(suite, row, column):
    return f"{suite}/{row}/{column}".lower().replace(" ", "-")


def make_frames():
    trials, epochs = [], []
    for suite, table, row, column, order, report, reps in TRIALS:
        name = _name(suite, row, column)
        for repeat, (acc, status) in enumerate(reps):
            trials.append(dict(run="r1", name=name, suite=suite, table=table, row=row, column=column,
                               order=order, report_acc=report, status=status, final_test_acc=acc,
                               best_test_acc=acc, best_epoch=2, epochs_done=2, repeat=repeat, seed=repeat,
                               lr=0.01, milestones=(10, 22), augment=("crop", "flip") if order else ()))
            if suite == "pretrained":
                continue
            for epoch in (1, 2):
                epochs.append(dict(run="r1", name=name, repeat=repeat, epoch=epoch, table=table, row=row,
                                   column=column, train_loss=1.0 / epoch + repeat, train_acc=acc - 0.1 / epoch,
                                   test_loss=1.5 / epoch, test_acc=acc - 0.05 * (2 - epoch) + 0.01 * repeat))
    # Written last-declared first: the output must follow `suite`/`order`, not file order.
    return pd.DataFrame(trials[::-1]), pd.DataFrame(epochs)


@pytest.fixture
def run_dir(tmp_path):
    trials, epochs = make_frames()
    results.write_parquet(trials, tmp_path / "run" / "trials.parquet")
    results.write_parquet(epochs.to_dict("records"), tmp_path / "run" / "epochs.parquet")
    return tmp_path / "run"


def test_load_run_round_trips_including_tuple_cells(run_dir):
    trials, epochs = load = results.load_run(run_dir)
    want_trials, want_epochs = make_frames()
    assert trials["milestones"].tolist() == [[10, 22]] * len(want_trials)
    assert sorted(map(tuple, trials["augment"])) == sorted(want_trials["augment"])
    plain = [c for c in want_trials.columns if c not in ("milestones", "augment")]
    pd.testing.assert_frame_equal(trials[plain], want_trials[plain], check_dtype=False)
    pd.testing.assert_frame_equal(epochs, want_epochs, check_dtype=False)
    assert len(load) == 2 and len(epochs) == 2 * 10


def test_missing_files(tmp_path):
    with pytest.raises(ResultsError) as err:
        results.load_run(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "trials.parquet") in str(err.value) and "\n" not in str(err.value)
    results.write_parquet([{"name": "a"}], tmp_path / "trials.parquet")
    trials, epochs = results.load_run(tmp_path)
    assert epochs.empty and "test_acc" in epochs.columns and trials["name"].tolist() == ["a"]
    (tmp_path / "trials.parquet").write_bytes(b"not parquet")
    with pytest.raises(ResultsError, match="cannot read"):
        results.load_run(tmp_path)


def test_write_parquet_is_atomic(tmp_path):
    path = tmp_path / "deep" / "trials.parquet"
    results.write_parquet([{"x": 1}], path)
    results.write_parquet([{"x": 2}], path)
    assert os.listdir(path.parent) == ["trials.parquet"]
    with pytest.raises(Exception):  # a column pyarrow cannot type
        results.write_parquet(pd.DataFrame({"x": [1, "a"]}, dtype=object), path)
    assert os.listdir(path.parent) == ["trials.parquet"]
    assert pd.read_parquet(path)["x"].tolist() == [2]


def test_fold_repeats(run_dir):
    s = pd.DataFrame(tables.fold_repeats(results.load_run(run_dir)[0]))
    assert list(s.columns) == tables.SUMMARY_COLUMNS
    assert s["name"].tolist() == [_name(t[0], t[2], t[3]) for t in TRIALS]  # declared order
    by = s.set_index("row")
    base = s.iloc[0]
    assert (base["n"], base["status"]) == (3, "ok")
    assert base["ours_mean"] == pytest.approx(0.976)
    assert base["ours_std"] == pytest.approx(math.sqrt(7e-6))
    assert base["diff"] == pytest.approx(-0.004)
    assert math.isnan(s.iloc[1]["ours_std"]) and s.iloc[1]["n"] == 1
    assert by.loc["3 Dropout", "status"] == "diverged"
    assert by.loc["Color Jitter", "status"] == "1/2 diverged"
    assert by.loc["Color Jitter", "ours_std"] == 0.0
    assert math.isnan(by.loc["Flip", "diff"]) and math.isnan(by.loc["Flip", "report_acc"])
    assert by.loc["Crop + Flip", "diff"] == pytest.approx(-0.26)


def test_fold_repeats_names_missing_columns():
    with pytest.raises(ResultsError, match="report_acc"):
        tables.fold_repeats(make_frames()[0].drop(columns="report_acc"))


def test_markdown(run_dir):
    md = tables.render(results.load_run(run_dir)[0], "markdown")
    lines = md.splitlines()
    headings = [line for line in lines if line.startswith("### ")]
    assert headings == [f"### {MNIST}", f"### {AUG}", f"### {PRE}"]
    assert "|  | SGD | SGD + momentum |" in lines
    assert "| Base Model | 97.6 ± 0.3 (98, -0.4) | 99.1 (99, +0.1) |" in lines
    assert "| 3 Dropout | 10.1 (11, -0.9) diverged | — |" in lines
    i = lines.index(f"### {AUG}")
    assert lines[i + 2:i + 8] == ["|  | Accuracy (%) |", "|---|---|", "| Random Crop | 52.0 (53, -1.0) |",
                                  "| Flip | 70.0 (—) |", "| Color Jitter | 43.0 ± 0.0 (46, -3.0) 1/2 diverged |",
                                  "| Crop + Flip | 40.0 (66, -26.0) |"]


def test_csv_parses_back(run_dir):
    text = tables.render(results.load_run(run_dir)[0], "csv")
    back = pd.read_csv(io.StringIO(text))
    assert list(back.columns) == tables.SUMMARY_COLUMNS and len(back) == len(TRIALS)
    assert back.loc[0, "ours_mean"] == pytest.approx(0.976) and back.loc[0, "n"] == 3
    assert back["table"].tolist()[:3] == [MNIST] * 3 and back.loc[5, "status"] == "1/2 diverged"


def test_unknown_format(run_dir):
    with pytest.raises(ResultsError, match="markdown, csv, json"):
        tables.render(results.load_run(run_dir)[0], "html")


def test_rich_tables(run_dir):
    grids = [screen.rich_table(sheet, 200) for sheet in tables.sheets(results.load_run(run_dir)[0])]
    assert [t.title for t in grids] == [MNIST, AUG, PRE]
    console = Console(record=True, width=200)
    for t in grids:
        console.print(t)
    text = console.export_text()
    for cell in ("97.6 ± 0.3 (98, -0.4)", "99.1 (99, +0.1)", "10.1 (11, -0.9) diverged", "—", "70.0 (—)",
                 "10.0 (15, -5.0)"):
        assert cell in text
    styles = {str(c): c.style for t in grids for col in t.columns[1:] for c in col.cells}
    assert styles["97.6 ± 0.3 (98, -0.4)"] == "green"
    assert styles["10.1 (11, -0.9) diverged"] == "green"           # diverged as the report did
    assert styles["52.0 (53, -1.0)"] == "green"                    # exactly 1 point below
    assert styles["43.0 ± 0.0 (46, -3.0) 1/2 diverged"] == "yellow"  # exactly 3 points below
    assert styles["40.0 (66, -26.0)"] == "red" and styles["10.0 (15, -5.0)"] == "red"
    assert styles["70.0 (—)"] == ""


def test_colour_is_the_size_of_the_disagreement_either_way():
    # Far above the report is as much a disagreement as far below (96.5 against the report's 11).
    for points, style in ((0.5, "green"), (1.0, "green"), (2.0, "yellow"), (3.0, "yellow"), (85.5, "red")):
        assert tables._style(points / 100) == style and tables._style(-points / 100) == style
    trials = make_frames()[0]
    trials.loc[trials.row == "Crop + Flip", "final_test_acc"] = 0.92                     # 26 points above
    [cell] = [c for t in (screen.rich_table(sh, 200) for sh in tables.sheets(trials)) for col in t.columns[1:] for c in col.cells
              if str(c).startswith("92.0")]
    assert str(cell) == "92.0 (66, +26.0)" and cell.style == "red"


def _rows(name, seeds, acc, epochs=1):
    return pd.DataFrame([dict(name=name, suite="s", table="T", row="r", column="c", order=0, report_acc=0.5,
                              status="ok", final_test_acc=acc + 0.01 * s, seed=s, epochs=epochs, lr=0.01,
                              model="m", data_dir=f"/data{s}") for s in seeds])


def test_combine_pools_same_config_and_later_run_wins_otherwise():
    a = pd.concat([_rows("s/x", [0], 0.50), _rows("s/y", [0], 0.60), _rows("s/z", [0], 0.70)])
    b = pd.concat([_rows("s/x", [0, 1, 2], 0.40), _rows("s/y", [1], 0.60), _rows("s/z", [0], 0.90, epochs=10)])
    both = pd.DataFrame(tables.combine([("A", a), ("B", b)]))
    got = {n: sorted(zip(g.source, g.seed)) for n, g in both.groupby("name")}
    assert got["s/x"] == [("B", 0), ("B", 1), ("B", 2)]     # seed 0 rerun: counted once, from B
    assert got["s/y"] == [("A", 0), ("B", 1)]               # same config, other seeds: pooled
    assert got["s/z"] == [("B", 0)]                         # another config (10 epochs): B replaces A
    folded = pd.DataFrame(tables.fold_repeats(both)).set_index("name")
    assert folded.loc["s/y", "n"] == 2 and folded.loc["s/y", "source"] == "A, B"
    assert folded.loc["s/y", "ours_mean"] == pytest.approx(0.605)
    # The order on the command line decides: the other way round A's 1-epoch z wins.
    assert pd.DataFrame(tables.combine([("B", b), ("A", a)])).query("name == 's/z'").epochs.tolist() == [1]


def test_compare_says_whether_the_difference_beats_the_spread():
    a = pd.concat([_rows("s/x", [0, 1, 2], 0.50), _rows("s/y", [0, 1], 0.50), _rows("s/only-a", [0], 0.1)])
    b = pd.concat([_rows("s/x", [0, 1, 2], 0.60), _rows("s/y", [0, 1], 0.51), _rows("s/z", [0], 0.7)])
    d = {r["name"]: r for r in tables.compare(a, b)}
    assert sorted(d) == ["s/x", "s/y"]
    assert d["s/x"]["diff"] == pytest.approx(0.10) and d["s/x"]["beyond_spread"] is True
    assert d["s/y"]["diff"] == pytest.approx(0.01) and d["s/y"]["beyond_spread"] is False
    one = tables.compare(_rows("s/x", [0], 0.5), _rows("s/x", [0], 0.6))
    assert [r["beyond_spread"] for r in one] == [None]


def test_plot(run_dir, tmp_path):
    paths = plots.plot(run_dir)
    assert [p.name for p in paths] == ["3-1-mnist-lr-0-01.png", "4-2-data-augmentation.png", "5-1-without-finetuning.png"]
    assert sorted(os.listdir(run_dir / "plots")) == sorted(p.name for p in paths)  # no temp files
    for p in paths:
        assert p.local.parent == run_dir / "plots" and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.local.stat().st_size > 5000
    # The figures the report page shows too: a panel per row, a line per column; no epoch rows, bars.
    drawn = {f.title: f for f in plots.table_figures(*results.load_run(run_dir))}
    assert drawn[MNIST].kinds == {"Base Model": "lines", "3 Dropout": "lines"}
    assert drawn[PRE].kinds == {"Zero-shot": "bars"}
    base = drawn[MNIST].curves[_name("mnist", "Base Model", "SGD")]
    assert base.loc[2, "test_acc"] == pytest.approx(0.976 + 0.01)  # mean over the 3 repeats
    assert base.loc[1, "train_loss"] == pytest.approx(2.0)
    other = plots.plot(run_dir, tmp_path / "elsewhere")
    assert [p.local.parent for p in other] == [tmp_path / "elsewhere"] * 3
