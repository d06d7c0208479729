"""The learning rate in each epoch row is the rate that epoch trained with, in new runs and in
the committed results (corrected by benchmarks/fix_lr_column.py)."""
from pathlib import Path

import pytest

from raycnn import results
from raycnn.trainer import TrainConfig, scheduled_lrs

RESULTS = Path(__file__).resolve().parents[1] / "results"
RUNS = sorted(p.parent for p in RESULTS.glob("*/epochs.parquet"))


def test_multistep_schedule_changes_after_the_milestone_epoch():
    lrs = scheduled_lrs(TrainConfig(epochs=30, scheduler="multistep", milestones=(10, 22), gamma=0.1))
    assert lrs[9] == 0.01 and lrs[10] == pytest.approx(0.001)          # epochs 10 and 11
    assert lrs[21] == pytest.approx(0.001) and lrs[22] == pytest.approx(0.0001)
    assert set(scheduled_lrs(TrainConfig(epochs=5))) == {0.01}


@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_committed_lr_column_is_the_trained_rate(run):
    trials, epochs = results.load_run(run)
    keys = set(TrainConfig().to_dict())
    for row in trials.to_dict("records"):
        want = scheduled_lrs(TrainConfig.from_dict({k: v for k, v in row.items() if k in keys}))
        mine = epochs[(epochs.name == row["name"]) & (epochs.repeat == row["repeat"]) & (epochs.epoch >= 1)]
        assert [want[e - 1] for e in mine.epoch] == pytest.approx(list(mine.lr)), (run.name, row["name"])
