"""One-off correction of the `lr` column of committed results/*/epochs.parquet.

Runs made before the fix logged each epoch's learning rate after that epoch's scheduler step,
so with MultiStepLR([10, 22]) epoch 10 read 0.001 although it trained at 0.01. The training
itself was right; only the logged column was one step ahead. This script recomputes, for every
epoch row, the rate that epoch trained with, from the trial's config in trials.parquet and the
trainer's own schedulers (`raycnn.trainer.scheduled_lrs`), and rewrites only that column,
atomically. Running it again changes nothing.

    PYTHONPATH=. python benchmarks/fix_lr_column.py [results]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raycnn import results
from raycnn.trainer import TrainConfig, scheduled_lrs


def corrected(run: Path) -> pa.Table | None:
    """RUN/epochs.parquet with its lr column recomputed; None where nothing changes."""
    trials, _ = results.load_run(run)
    keys = set(TrainConfig().to_dict())
    schedule = {}
    for row in trials.to_dict("records"):
        config = TrainConfig.from_dict({k: v for k, v in row.items() if k in keys})
        schedule[(row["name"], row["repeat"])] = scheduled_lrs(config)
    table = pq.read_table(run / "epochs.parquet")
    names, repeats, epochs = (table.column(c).to_pylist() for c in ("name", "repeat", "epoch"))
    # Epoch 0 is the zero-shot evaluation, which trains nothing; it keeps its logged value.
    old = table.column("lr").to_pylist()
    lrs = [schedule[(n, r)][e - 1] if e >= 1 else lr for n, r, e, lr in zip(names, repeats, epochs, old)]
    if lrs == old:
        return None
    i = table.schema.get_field_index("lr")
    return table.set_column(i, table.schema.field(i), pa.array(lrs, pa.float64()))


def main(root: Path) -> None:
    for path in sorted(root.glob("*/epochs.parquet")):
        table = corrected(path.parent)
        if table is None:
            print(f"{path}: lr column already right")
            continue
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        print(f"{path}: lr column corrected")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "results")
