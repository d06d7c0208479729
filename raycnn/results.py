"""A run folder's results on disk: `trials.parquet` (one row per trial and repeat) and
`epochs.parquet` (one row per trial, repeat and epoch), written atomically by `write_parquet`
and read back by `load_run`. Tables over the rows are in `raycnn.tables`, learning curves in
`raycnn.plots`. Ray-free on purpose, so results can be inspected without a cluster.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"
EPOCH_COLUMNS = ("name", "repeat", "epoch", "train_acc", "test_acc", "train_loss", "test_loss")


class ResultsError(ValueError):
    """Results that cannot be read or shown; the message is one line for the user."""


def atomic(path: Path, write: Callable[[str], None]) -> Path:
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
    return atomic(Path(path), lambda tmp: df.to_parquet(tmp, index=False))


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


def require(df: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ResultsError(f"{what} lack column(s): {', '.join(missing)}")
