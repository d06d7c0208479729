"""`raycnn run --log tensorboard --log mlflow`: a real run on a local Ray (synthetic data), then
what the trackers wrote, read back with their own readers: TensorBoard's event accumulator and
MLflow's client. Trial names, params, and one value per epoch for each metric."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raycnn import cli, results

pytest.importorskip("mlflow", reason="pip install 'raycnn[tracking]'")
pytest.importorskip("tensorboard", reason="pip install 'raycnn[tracking]'")

# Two trials: one with a report number, one without (report_acc = NaN in its config).
SUITE = """
[suite]
name = "tiny"
cpus_per_trial = 1
gpus_per_trial = 0.25
table = "Tiny table"

[defaults]
model = "mnist_base"
epochs = 2
max_train_samples = 256
eval_batch_size = 2000

[[axes]]
name = "opt"
role = "column"
values = [{ label = "sgd", title = "SGD", momentum = 0.9 }, { label = "adam", title = "Adam", optimizer = "adam", lr = 0.001 }]

[report]
"tiny/sgd" = 60
"""
EPOCHS = 2
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers")
    (root / "tiny.toml").write_text(SUITE)
    env = dict(os.environ, RAY_AIR_NEW_OUTPUT="0", COLUMNS="200")
    out = subprocess.run([sys.executable, "-m", "raycnn.cli", "run", str(root / "tiny.toml"), "--synthetic",
                          "--log", "tensorboard", "--log", "mlflow", "--results-dir", str(root), "--name", "logged",
                          "--num-cpus", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    # What made the TensorBoard logger unusable before: NaN warnings over the live view; and
    # nothing of MLflow's INFO chatter either.
    assert "NaN or Inf" not in out.stderr + out.stdout and "mlflow" not in out.stderr
    return root / "logged"


def _epochs(run_dir: Path, name: str) -> list[float]:
    epochs = results.load_run(run_dir)[1]
    return epochs[epochs["name"] == name].sort_values("epoch")["test_acc"].tolist()


@pytest.mark.slow      # one Ray run with both trackers: about 3 minutes on 2 busy CPU cores
def test_tensorboard_event_files(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    folders = {}
    for events in (run_dir / "tune" / "experiment").glob("*/events.out.tfevents.*"):
        folders[events.parent.name] = EventAccumulator(str(events.parent)).Reload()
    assert sorted(folders) == ["000-tiny-sgd-r0", "001-tiny-adam-r0"]       # trial names
    for folder, acc in folders.items():
        name = "tiny/" + folder.split("-")[2]
        for metric in METRICS:
            values = acc.Scalars(f"ray/tune/{metric}")
            assert [v.step for v in values] == list(range(1, EPOCHS + 1)), (folder, metric)
        assert [v.value for v in acc.Scalars("ray/tune/test_acc")] == pytest.approx(_epochs(run_dir, name))
        content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        assert hparams["name"].string_value == name and hparams["epochs"].number_value == EPOCHS
        assert ("report_acc" in hparams) == (name == "tiny/sgd")            # NaN left out, not logged


@pytest.mark.slow
def test_mlflow_runs(run_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("logged")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["tiny/adam r0", "tiny/sgd r0"]                   # one MLflow run per trial
    for run_name, run in runs.items():
        name = run_name.split()[0]
        assert run.info.status == "FINISHED"
        p = run.data.params
        assert p["name"] == name and p["epochs"] == str(EPOCHS) and p["model"] == "mnist_base"
        assert p["optimizer"] == ("sgd" if name == "tiny/sgd" else "adam")
        assert p.get("report_acc") == ("0.6" if name == "tiny/sgd" else None)
        for metric in METRICS:
            history = client.get_metric_history(run.info.run_id, metric)
            assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), (run_name, metric)
        history = sorted(client.get_metric_history(run.info.run_id, "test_acc"), key=lambda m: m.step)
        assert [m.value for m in history] == pytest.approx(_epochs(run_dir, name))
        assert "config/trial/config/lr" not in run.data.metrics           # config is params, not metrics


@pytest.mark.parametrize("value, message", [
    ("wandb", "--log wandb: unknown tracker; choose from tensorboard, mlflow"),
    ("tensorboard=/tmp/x", "--log tensorboard=/tmp/x: only mlflow takes a tracking URI"),
    ("mlflow=", "--log mlflow=: no tracking URI after '='"),
])
def test_log_refuses_bad_values(value, message, tmp_path, capsys):
    assert cli.main(["run", "mnist", "--synthetic", "--log", value, "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not list(tmp_path.iterdir())
