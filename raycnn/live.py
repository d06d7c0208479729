"""The console view of a running suite: one row per running or recent trial, with its epoch,
the batches done in the current epoch, test accuracy (a search's samples: validation accuracy
and ASHA's rung), images/s and ETA, redrawn in place on a
terminal; elsewhere a line per trial end. `raycnn.tune` calls it (start, update, restarting,
failed, warn, stop); it never imports Ray."""
from __future__ import annotations

import math
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from raycnn import epoch_progress, storage
from raycnn.experiment import trial_folder


def rung_text(epoch: int, rungs: list[int] | None) -> str:
    """A sample's ASHA rung: the rungs passed of all, and the epoch of the next ("1/3 -> 3")."""
    if not rungs:
        return ""
    passed = sum(epoch >= m for m in rungs)
    return f"{passed}/{len(rungs)}" + (f" -> {rungs[passed]}" if passed < len(rungs) else "")


class LiveView:
    """The console view of a run: one row per running or recent trial, with epoch, accuracy,
    images/s and ETA. On a terminal it redraws in place, and a running trial's row shows its
    batches done in the epoch and its current images/s from the files in `progress_dir`
    (`raycnn.epoch_progress`); elsewhere it prints a line per trial end."""

    ORDER = {"running": 0, "error": 1, "diverged": 2, "ok": 3, "stopped": 3, "pending": 4}

    def __init__(self, console: Console, max_rows: int = 24, header: str = "",
                 progress_dir: str | Path | storage.Place = ""):
        self.console, self.max_rows, self.rows, self.live, self.header = console, max_rows, {}, None, header
        self.progress_dir = storage.resolve(progress_dir) if progress_dir else None
        self.read_at: dict[str, tuple[float, dict | None]] = {}   # folder -> (when read, record)

    def warn(self, message: str) -> None:
        """A line the user must see (above the live table on a terminal)."""
        self.console.print(f"raycnn: warning: {message}", markup=False, highlight=False, soft_wrap=True)

    def restarting(self, meta: dict, info: dict) -> None:
        """Tune restarts a failed trial from its last checkpoint."""
        self.warn(f"{self._name(meta)} failed ({info.get('error', '?')}); restarting it from its last checkpoint")

    def failed(self, meta: dict, info: dict) -> None:
        """A trial failed for good (no restarts left)."""
        self.warn(f"{self._name(meta)} failed ({info.get('error', '?')}); traceback in {info.get('log') or 'its error.txt'}")

    @staticmethod
    def _name(meta: dict) -> str:
        return meta["name"] + (f" #{meta['repeat']}" if meta["repeat"] else "")

    def start(self, params: list[dict]) -> None:
        """Show the trials of `params` (plan entries) as pending; a search's samples, which its
        searcher makes as it goes, are added when they first report (`update`)."""
        if self.header:       # printed once the run really starts: errors before it stay one line
            self.console.print(self.header, markup=False, highlight=False, soft_wrap=True)
            self.header = ""  # a search starts the view once per cell, then for its re-run
        self.started = time.time()
        self.concurrency = 1
        self.rows = {}
        for p in params:
            self._row(p)
        if self.console.is_terminal:
            # Live(self): each refresh calls __rich__, so elapsed time and ETA tick between epochs.
            self.live = Live(self, console=self.console, refresh_per_second=2)
            self.live.start()

    def _row(self, p: dict) -> dict:
        """The row of a plan entry or a search's sample (which carries its folder and ASHA's rungs)."""
        key = (p["name"], p["repeat"])
        if key not in self.rows:
            label = " sample " if "rungs" in p else " #"
            self.rows[key] = {"name": p["name"] + (f"{label}{p['repeat']}" if p["repeat"] else ""),
                              "epochs": p["config"]["epochs"], "status": "pending", "epoch": 0, "acc": math.nan,
                              "ips": math.nan, "epoch_s": math.nan, "folder": p.get("folder") or trial_folder(p),
                              "batch_size": p["config"]["batch_size"], "inside": None, "rungs": p.get("rungs")}
        return self.rows[key]

    def update(self, meta: dict, result: dict) -> None:
        row = self._row(meta) if "rungs" in meta else self.rows.get((meta["name"], meta["repeat"]))
        if row is None:
            return
        if result.get("warning"):
            self.warn(f"{row['name']}: {result['warning']}")
        status = result.get("status", row["status"])
        # A search's samples never see the test split: their view shows validation accuracy.
        acc = result.get("val_acc" if row["rungs"] is not None else "test_acc", row["acc"])
        row.update(status=status, epoch=result.get("epoch", row["epoch"]), acc=acc,
                   ips=result.get("images_per_s", row["ips"]), epoch_s=result.get("seconds", row["epoch_s"]))
        if self.live is None and status != "running":
            what = "val acc" if row["rungs"] is not None else "test acc"
            self.console.print(f"  {row['name']}: {status}, epoch {row['epoch']}/{row['epochs']}, "
                               f"{what} {100 * row['acc']:.2f}%")

    def _inside(self, row: dict) -> dict | None:
        """The running trial's progress inside its current epoch, if it wrote any."""
        if self.progress_dir is None or row["status"] != "running":
            return None
        # Read at most as often as trials write: in a bucket each read is a request.
        at, record = self.read_at.get(row["folder"], (-math.inf, None))
        if time.monotonic() - at >= min(epoch_progress.EVERY_S, 1.0):
            record = epoch_progress.read(self.progress_dir / f"{row['folder']}.json")
            self.read_at[row["folder"]] = (time.monotonic(), record)
        # A file is removed when its trial ends or restarts, so a later epoch than the row's last
        # is the current one (also when a resumed run's rows have not heard of earlier epochs).
        return record if record and record.get("epoch", 0) > row["epoch"] else None

    @staticmethod
    def _epoch_s(row: dict) -> float:
        """Seconds per epoch: the last epoch's, else the current epoch's training rate."""
        inside = row["inside"]
        if math.isfinite(row["epoch_s"]) or not inside or not inside["images_per_s"] > 0:
            return row["epoch_s"]
        return inside["steps"] * row["batch_size"] / inside["images_per_s"]

    @staticmethod
    def _left(row: dict, per_epoch: float) -> float:
        """Seconds left in a trial at `per_epoch` seconds an epoch, less the current epoch's done part."""
        inside = row["inside"]
        done = inside["epoch"] - 1 + inside["step"] / inside["steps"] if inside else row["epoch"]
        return (row["epochs"] - done) * per_epoch

    def eta(self) -> float:
        """Seconds left: the running trials' remaining epochs plus the pending trials at the mean
        trial time seen so far, spread over the trials running at once."""
        rows = list(self.rows.values())
        running = [r for r in rows if r["status"] == "running"]
        self.concurrency = max(self.concurrency, len(running))
        per_epoch = [self._epoch_s(r) for r in rows]
        known = [s for s in per_epoch if math.isfinite(s)]
        if not known:
            return math.nan
        mean = sum(known) / len(known)
        left = sum(self._left(r, s if math.isfinite(s) else mean)
                   for r, s in zip(rows, per_epoch) if r["status"] in ("running", "pending"))
        return left / self.concurrency

    def render(self) -> Table:
        counts = {}
        for r in self.rows.values():
            counts[r["status"]] = counts.get(r["status"], 0) + 1
            r["inside"] = self._inside(r)
        eta = self.eta()
        title = " ".join(f"{k} {v}" for k, v in sorted(counts.items())) + \
            f"  elapsed {time.time() - self.started:.0f}s" + (f"  ETA {eta:.0f}s" if math.isfinite(eta) else "")
        searching = any(r["rungs"] is not None for r in self.rows.values())
        columns = ["trial", "status", "epoch", *(["rung"] if searching else []), "batch",
                   "val acc" if searching else "test acc", "img/s", "ETA"]
        table = Table(*columns, title=title)
        shown = sorted(self.rows.values(), key=lambda r: self.ORDER.get(r["status"], 5))[:self.max_rows]
        for r in shown:
            inside = r["inside"]
            left = self._left(r, self._epoch_s(r)) if r["status"] == "running" else math.nan
            ips = inside["images_per_s"] if inside else r["ips"]    # the current rate while an epoch runs
            rung = [rung_text(r["epoch"], r["rungs"])] if searching else []
            table.add_row(r["name"], r["status"], f"{r['epoch']}/{r['epochs']}", *rung,
                          f"{inside['step']}/{inside['steps']}" if inside else "",
                          "" if math.isnan(r["acc"]) else f"{100 * r['acc']:.2f}%",
                          "" if not math.isfinite(ips) else f"{ips:.0f}",
                          "" if math.isnan(left) else f"{left:.0f}s")
        return table

    def __rich__(self) -> Table:
        return self.render()

    def stop(self) -> None:
        if self.live is not None:
            self.live.refresh()
            self.live.stop()
