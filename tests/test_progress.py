"""Progress inside long epochs: the trainer's per-step hook, the progress file a trial writes,
and the live view that shows it; end to end under tmux, as a user sees the live view."""
import io
import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from conftest import timeless
from raycnn import epoch_progress, trainer
from raycnn.live import LiveView
from raycnn.config import TrainConfig
from raycnn import datafiles

ROOT = Path(__file__).resolve().parents[1]
MNIST = datafiles.synthetic("mnist", seed=1, sizes=(1000, 200))


def cfg(**kw):
    return TrainConfig(**{**dict(model="mnist_base", epochs=2, batch_size=64, num_threads=1, eval_batch_size=200), **kw})


def test_fit_tells_every_step_without_changing_the_training():
    calls = []
    heard = trainer.fit(cfg(), arrays=MNIST, on_batch=lambda *a: calls.append(a))
    plain = trainer.fit(cfg(), arrays=MNIST)
    # 1000 images at batch 64 are 16 steps (the last of 40), for each epoch counted from 1.
    assert calls == [(e, s, 16) for e in (1, 2) for s in range(1, 17)]
    assert all(type(v) is int for call in calls for v in call)   # host counts, never a tensor to sync on
    assert timeless(heard["history"]) == timeless(plain["history"])     # no rows added, same numbers


def test_progress_file_writes_at_most_every_interval(tmp_path):
    clock = iter([0.0, 0.5, 1.0, 2.5, 3.0, 4.9, 5.0, 10.0])
    path = tmp_path / "p" / "t.json"
    seen = []
    write = epoch_progress.ProgressFile(path, batch_size=64, every_s=2.0, clock=lambda: next(clock))
    for step in range(1, 7):                 # epoch 1: steps at t = 0, 0.5, 1, 2.5, 3, 4.9 s
        write(1, step, 6)
        seen.append(epoch_progress.read(path) and epoch_progress.read(path)["step"])
    # first at 2.5 s (2.5 s after the epoch began); at 3 s too soon; the last step always, after a write
    assert seen == [None, None, None, 4, 4, 6]
    assert epoch_progress.read(path)["images_per_s"] == pytest.approx(2 * 64 / 2.4)
    write.remove()
    write(2, 1, 100)                          # epoch 2 starts at t = 5 s
    write(2, 2, 100)                          # 5 s later
    record = epoch_progress.read(path)
    assert (record["epoch"], record["step"], record["steps"]) == (2, 2, 100)
    assert record["images_per_s"] == pytest.approx(2 * 64 / 5.0)
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.json"]     # atomic: no temp file left


def test_a_short_epoch_writes_nothing(tmp_path):
    write = epoch_progress.ProgressFile(tmp_path / "t.json", batch_size=64, every_s=60)
    trainer.fit(cfg(epochs=1), arrays=MNIST, on_batch=write)
    assert not (tmp_path / "t.json").exists()


def view_with(tmp_path, record: dict | None, epoch_done: int = 0) -> str:
    view = LiveView(Console(file=io.StringIO()), progress_dir=tmp_path)
    view.start([{"name": "s/a", "repeat": 0, "order": 3, "config": {"epochs": 3, "batch_size": 64}}])
    view.update({"name": "s/a", "repeat": 0}, {"status": "running"})
    if epoch_done:
        view.update({"name": "s/a", "repeat": 0}, {"epoch": epoch_done, "test_acc": 0.5, "images_per_s": 1000.0,
                                                   "seconds": 60.0})
    if record is not None:
        (tmp_path / "003-s-a-r0.json").write_text(json.dumps(record))
    out = Console(file=io.StringIO(), width=120)
    out.print(view.render())
    return out.file.getvalue()


def test_live_view_shows_batches_and_current_rate(tmp_path):
    shown = view_with(tmp_path, {"epoch": 1, "step": 200, "steps": 800, "images_per_s": 3200.0})
    row = next(line for line in shown.splitlines() if "s/a" in line)
    # ETA from the current rate before any epoch ended: 2.75 epochs of 800 x 64 images at 3200/s
    assert re.search(r"running\s*│\s*0/3\s*│\s*200/800\s*│\s*│\s*3200\s*│\s*44s", row), row


def test_live_view_eta_counts_the_part_of_the_epoch_done(tmp_path):
    shown = view_with(tmp_path, {"epoch": 2, "step": 400, "steps": 800, "images_per_s": 900.0}, epoch_done=1)
    row = next(line for line in shown.splitlines() if "s/a" in line)
    assert re.search(r"1/3\s*│\s*400/800\s*│\s*50.00%\s*│\s*900\s*│\s*90s", row), row    # 1.5 epochs x 60 s


def test_live_view_ignores_a_finished_epochs_record(tmp_path):
    shown = view_with(tmp_path, {"epoch": 1, "step": 800, "steps": 800, "images_per_s": 900.0}, epoch_done=1)
    row = next(line for line in shown.splitlines() if "s/a" in line)
    assert "800/800" not in row and re.search(r"1/3\s*│\s*│\s*50.00%\s*│\s*1000\s*│\s*120s", row), row


ONE_TRIAL = """
[suite]
name = "one"
cpus_per_trial = 1
gpus_per_trial = 0.25
table = "One"

[defaults]
model = "cifar_base"
epochs = 2
momentum = 0.9
max_train_samples = 20000

[[axes]]
name = "net"
role = "row"
values = [{ label = "base", title = "base" }]
"""


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (.ci/run installs it)")
def test_progress_inside_epochs_under_tmux(tmp_path):
    """`raycnn run` in a tmux pane: the running trial's row shows batches done within the epoch."""
    (tmp_path / "one.toml").write_text(ONE_TRIAL)
    socket = f"raycnn-test-{uuid.uuid4().hex[:8]}"      # a private tmux server, stopped below
    env = f"PYTHONPATH={ROOT} RAYCNN_PROGRESS_S=0.3 RAY_AIR_NEW_OUTPUT=0"
    command = (f"cd {tmp_path} && env {env} {sys.executable} -m raycnn.cli run one.toml --synthetic "
               f"--results-dir runs --name r --num-cpus 2; echo EXIT=$?; sleep 600")
    tmux = ["tmux", "-L", socket]
    subprocess.run([*tmux, "new-session", "-d", "-x", "150", "-y", "30", command], check=True)
    frames = []
    try:
        end = time.time() + 300
        while time.time() < end and not any("EXIT=" in f for f in frames[-1:]):
            frames.append(subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True).stdout)
            time.sleep(0.2)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    assert "EXIT=0" in frames[-1], frames[-1]
    # 20,000 images at batch 64: 313 steps an epoch
    inside = [m for f in frames for m in re.findall(r"one/base\s*│\s*running\s*│\s*([01])/2\s*│\s*(\d+)/313", f)]
    assert {epoch for epoch, _ in inside} == {"0", "1"}, frames      # seen inside both epochs
    assert any(0 < int(step) < 313 for _, step in inside)
    epochs = pd.read_parquet(tmp_path / "runs" / "r" / "epochs.parquet")
    assert list(epochs["epoch"]) == [1, 2]                            # progress added no rows
    assert not epoch_progress.folder(tmp_path / "runs" / "r").exists()    # nor files, once the run ended
