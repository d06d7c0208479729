"""A run folder's results on disk: `trials.parquet` (one row per trial and repeat) and
`epochs.parquet` (one row per trial, repeat and epoch), written by `write_run` and read back by
`load_run`; `write_parquet` is the one Parquet writer (atomic and durable, `raycnn.storage`).
A run folder is a local path or a URI (`s3://...`: `raycnn.storage`).
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

import pyarrow as pa
import pyarrow.parquet as pq

from raycnn import storage
from raycnn.errors import ResultsError
from raycnn.storage import Place

TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"
RUN_FILES = (TRIALS_FILE, EPOCHS_FILE)
EPOCH_COLUMNS = ("name", "repeat", "epoch", "train_acc", "test_acc", "train_loss", "test_loss")


WRITE_ID = b"raycnn.write_id"     # Parquet schema metadata: which write_run made the file


def write_parquet(rows, path: str | Path | Place, metadata: dict[bytes, bytes] | None = None) -> Place:
    """Write rows (dicts or a pandas DataFrame) to `path` atomically and durably, creating its
    folder. Tuple and list cells become Parquet list columns; the readers turn them back into
    lists. `metadata` goes into the file's schema metadata.
    """
    import pandas as pd       # the writers run beside Ray and torch; the readers stay light
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    return storage.resolve(path).write(lambda f: pq.write_table(table, f))


def write_run(run_dir: str | Path | Place, trial_rows: list[dict], epoch_rows: list[dict],
              files: tuple[str, str] = RUN_FILES) -> None:
    """Write a run's trials.parquet and epochs.parquet as one write (see the module's doc);
    `files` names another pair of the same shape (a search's samples and their epochs)."""
    stamp = {WRITE_ID: uuid.uuid4().hex.encode()}
    run_dir = storage.resolve(run_dir)
    write_parquet(epoch_rows, run_dir / files[1], stamp)
    write_parquet(trial_rows, run_dir / files[0], stamp)


def _table(path: Place) -> tuple[pa.Table, bytes | None]:
    """A Parquet file and its write id (None in files written otherwise)."""
    try:
        # ParquetFile, not read_table: read_table goes through pyarrow.dataset, which imports pandas
        table = pq.ParquetFile(path.path, filesystem=path.fs).read()
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ResultsError(f"cannot read {path}: {first}") from None
    return table, (table.schema.metadata or {}).get(WRITE_ID)


def _paths(run_dir: Place, files: tuple[str, str]) -> tuple[Place, Place]:
    trials_path = run_dir / files[0]
    if not trials_path.is_file():
        raise ResultsError(f"no results: {trials_path} does not exist")
    return trials_path, run_dir / files[1]


def _tables(run_dir: Place, files: tuple[str, str] = RUN_FILES) -> tuple[pa.Table, pa.Table | None]:
    """A run's two tables, checked to come from one write; None for a missing epochs file."""
    trials_path, epochs_path = _paths(run_dir, files)
    trials, trials_id = _table(trials_path)
    if not epochs_path.is_file():
        return trials, None
    epochs, epochs_id = _table(epochs_path)
    if trials_id and epochs_id and trials_id != epochs_id:
        raise ResultsError(f"{run_dir}: trials.parquet and epochs.parquet are from different writes (a crash "
                           f"between them); resuming the run with `raycnn run ... --resume` writes both again")
    return trials, epochs


def read_rows(run_dir: str | Path | Place, epochs: bool = False, files: tuple[str, str] = RUN_FILES
              ) -> tuple[list[dict], list[dict]]:
    """(trials, epochs) of a run folder (or the pair `files` names) as lists of dicts, without
    pandas (the command line's tables); epochs only when asked for. ResultsError when
    trials.parquet is missing or unreadable."""
    trials, epoch_table = _tables(storage.resolve(run_dir), files)
    return trials.to_pylist(), (epoch_table.to_pylist() if epochs and epoch_table is not None else [])


def _frame(table: pa.Table):
    import numpy as np
    df = table.to_pandas()
    # pyarrow hands list cells back as numpy arrays; plain lists compare with == and feed
    # TrainConfig.from_dict (which turns lists into tuples) unchanged.
    for col in df.columns[df.dtypes == object]:
        if df[col].map(lambda v: isinstance(v, np.ndarray)).any():
            df[col] = df[col].map(lambda v: v.tolist() if isinstance(v, np.ndarray) else v)
    return df


def load_run(run_dir: str | Path | Place, files: tuple[str, str] = RUN_FILES):
    """(trials, epochs) of a run folder (or the pair `files` names) as pandas frames; no epochs
    file gives an empty epochs frame. ResultsError when trials.parquet is missing or unreadable."""
    import pandas as pd
    trials, epochs = _tables(storage.resolve(run_dir), files)
    return _frame(trials), (_frame(epochs) if epochs is not None else pd.DataFrame(columns=list(EPOCH_COLUMNS)))


def require(have, columns: tuple[str, ...], what: str) -> None:
    """ResultsError naming the `columns` missing from `have` (a frame's columns, or names)."""
    lacking = [c for c in columns if c not in set(getattr(have, "columns", have))]
    if lacking:
        raise ResultsError(f"{what} lack column(s): {', '.join(lacking)}")
