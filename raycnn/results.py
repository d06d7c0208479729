"""A run folder's results on disk: `trials.parquet` (one row per trial and repeat) and
`epochs.parquet` (one row per trial, repeat and epoch), written by `write_run` and read back by
`load_run`; `write_parquet` is the one Parquet writer (atomic and durable, `raycnn.files`).
Tables over the rows are in `raycnn.tables`, learning curves in `raycnn.plots`. Ray-free and
torch-free, so results can be inspected without a cluster.

The two files stay consistent although they cannot be replaced in one step: `write_run` writes
epochs.parquet first and trials.parquet last, both stamped with the same write id, and
`load_run` refuses a pair whose ids differ (a crash between the two writes), saying that the
next write of the run (`raycnn run ... --resume`) mends it; Tune's folder, from which both are
made, is the source of truth.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raycnn.errors import ResultsError
from raycnn.files import atomic

TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"
EPOCH_COLUMNS = ("name", "repeat", "epoch", "train_acc", "test_acc", "train_loss", "test_loss")


WRITE_ID = b"raycnn.write_id"     # Parquet schema metadata: which write_run made the file


def write_parquet(rows: list[dict] | pd.DataFrame, path: str | Path, metadata: dict[bytes, bytes] | None = None) -> Path:
    """Write rows (dicts or a DataFrame) to `path` atomically and durably, creating its folder.

    Tuple and list cells become Parquet list columns; `load_run` turns them back into lists.
    `metadata` goes into the file's schema metadata.
    """
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    return atomic(Path(path), lambda tmp: pq.write_table(table, tmp))


def write_run(run_dir: str | Path, trial_rows: list[dict], epoch_rows: list[dict]) -> None:
    """Write a run's trials.parquet and epochs.parquet as one write (see the module's doc)."""
    stamp = {WRITE_ID: uuid.uuid4().hex.encode()}
    write_parquet(epoch_rows, Path(run_dir) / EPOCHS_FILE, stamp)
    write_parquet(trial_rows, Path(run_dir) / TRIALS_FILE, stamp)


def _read(path: Path) -> tuple[pd.DataFrame, bytes | None]:
    """The rows of a Parquet file and its write id (None in files written otherwise)."""
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ResultsError(f"cannot read {path}: {first}") from None
    df = table.to_pandas()
    # pyarrow hands list cells back as numpy arrays; plain lists compare with == and feed
    # TrainConfig.from_dict (which turns lists into tuples) unchanged.
    for col in df.columns[df.dtypes == object]:
        if df[col].map(lambda v: isinstance(v, np.ndarray)).any():
            df[col] = df[col].map(lambda v: v.tolist() if isinstance(v, np.ndarray) else v)
    return df, (table.schema.metadata or {}).get(WRITE_ID)


def load_run(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (trials, epochs) of a run folder; no epochs file gives an empty epochs frame.

    Raises ResultsError when trials.parquet is missing or unreadable.
    """
    run_dir = Path(run_dir)
    trials_path, epochs_path = run_dir / TRIALS_FILE, run_dir / EPOCHS_FILE
    if not trials_path.is_file():
        raise ResultsError(f"no results: {trials_path} does not exist")
    trials, trials_id = _read(trials_path)
    if not epochs_path.is_file():
        return trials, pd.DataFrame(columns=list(EPOCH_COLUMNS))
    epochs, epochs_id = _read(epochs_path)
    if trials_id and epochs_id and trials_id != epochs_id:
        raise ResultsError(f"{run_dir}: trials.parquet and epochs.parquet are from different writes (a crash "
                           f"between them); resuming the run with `raycnn run ... --resume` writes both again")
    return trials, epochs


def require(df: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ResultsError(f"{what} lack column(s): {', '.join(missing)}")
