"""Bad input, as a user makes it: one table of mistakes (command-line options, suite files,
TrainConfig fields, run folders to resume, reading commands). Each ends in exit 2 and one line
on stderr, with no traceback, before Ray starts where it can, and leaves earlier results byte
for byte as they were. Fast, except the cases that need a Ray cluster or a run to resume."""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from raycnn import results
from support import cli_env, raycnn, ray_sessions, snapshot

ROOT = Path(__file__).resolve().parents[1]

BAD_SUITE = """
[suite]
name = "bad"
{head}
[defaults]
model = "mnist_base"
epochs = 1

[[trials]]
name = "one"
{extra}
"""

PREV = {"trials.parquet": b"PAR1 earlier trials", "epochs.parquet": b"PAR1 earlier epochs",
        "tune/experiment/000-prev-r0/result.json": b'{"epoch": 1}\n', "plots/t.png": b"\x89PNG"}


def _suite(tmp: Path, extra: str, head: str = "", tail: str = "") -> Path:
    path = tmp / "bad.toml"
    path.write_text(BAD_SUITE.format(extra=extra, head=head) + tail)
    return path


def _file_path(tmp: Path, res: Path) -> tuple:
    return ("--results-dir", res / "prev" / "trials.parquet" / "sub", "--name", "x")


def _corrupt(tmp: Path, res: Path, request, content: bytes = b"garbage, not a checkpoint") -> tuple:
    """A copy of the interrupted run with the in-progress trial's checkpoint overwritten (its own
    copy: the session's is shared with the tests that resume it)."""
    suite, _, name, _, shared = request.getfixturevalue("interrupted")
    copy = tmp / "corrupted"
    shutil.copytree(shared / name, copy / name)
    trials, _ = results.load_run(copy / name)
    going = trials[trials.status == "running"]
    assert len(going), trials[["name", "status", "epochs_done"]]
    folder = next((copy / name / "tune" / "experiment").glob(f"*-{going.name.iloc[0].replace('/', '-')}-r0"))
    states = list(folder.glob("checkpoint_*/state.pt"))
    assert states, list(folder.iterdir())
    for state in states:
        state.write_bytes(content)
    request.node.corrupted = (going.name.iloc[0], copy / name)
    return ("run", suite, "--synthetic", "--num-cpus", "1", "--results-dir", copy, "--name", name, "--resume")


class Payload:
    """Unpickled, it creates the marker file: what a planted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _planted(tmp: Path, res: Path, request) -> tuple:
    """The interrupted run's copy with a checkpoint whose pickle would create a marker."""
    import io
    import torch
    buffer = io.BytesIO()
    torch.save({"model": Payload(tmp / "marker")}, buffer)
    return _corrupt(tmp, res, request, buffer.getvalue())


def _other_epochs(tmp: Path, res: Path, request) -> tuple:
    """The interrupted run's copy, resumed with another --epochs than it started with."""
    suite, _, name, _, copy = request.getfixturevalue("interrupted")
    return ("run", suite, "--synthetic", "--num-cpus", "1", "--epochs", "7", "--results-dir", copy, "--name", name,
            "--resume")


def _not_ray() -> str:
    """HOST:PORT of a server that answers, but not as Ray does (an HTTP/1 error to anything)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve():
        while True:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{server.getsockname()[1]}"


SYN = ("--synthetic", "--num-cpus", "1")
OFFLINE = {k: "http://127.0.0.1:1" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}


def _write(tmp: Path, text: str) -> Path:
    path = tmp / "bad.toml"
    path.write_text(text)
    return path


def _bad_suite(line: str, message: str) -> tuple:
    """A CASES entry: a one-trial suite file with `line` added must exit 2 with `message`, before Ray."""
    return (lambda t, r: ("run", _suite(t, line), *SYN, "--results-dir", r), 2, message, False, {})


SEARCH_SUITE = BAD_SUITE.format(head="", extra="") + "\n[search]\n"


def _bad_space(lines: str, message: str, *options: str, suite_search: str | None = None) -> tuple:
    """A CASES entry: `raycnn search` of the one-trial suite, whose [search] table has `lines`
    (optimizer sgd), must exit 2 with `message`, before Ray; `suite_search` replaces the whole table."""
    def argv(t: Path, r: Path) -> tuple:
        table = suite_search if suite_search is not None else f"[search.optimizer.sgd]\n{lines}\n"
        path = _write(t, BAD_SUITE.format(head="", extra="") + table)
        return ("search", "bad/*", "--suite", path, *SYN, *options, "--results-dir", r)
    return (argv, 2, message, False, {})


def _other_samples(t: Path, r: Path) -> tuple:
    """A search planned with 5 samples (its folder outside the results checked), resumed with --samples 3."""
    from raycnn import search, suites
    path = _write(t, SEARCH_SUITE + "[search.optimizer.sgd]\nlr = { around = 10 }\n")
    suite = suites.load(path)
    settings = {"metric": "val_acc", "seed": 0, "repeats": None, "samples": 5, "grace": None, "val_fraction": None,
                "budget": None}
    search.write(t / "searches" / "old", search.plan_doc(suite.trials, {"bad": suite.search}, settings, "optuna"))
    return ("search", "bad/*", "--suite", path, *SYN, "--samples", "3", "--results-dir", t / "searches", "--name", "old",
            "--resume")


# id: (argv after `raycnn`, or a function (tmp, results_dir[, request]) -> argv; exit code; stderr
#      must contain; Ray may start; extra environment)
CASES = {
    "unknown-suite": (lambda t, r: ("run", "nosuch", *SYN, "--results-dir", r), 2, "unknown suite 'nosuch'", False, {}),
    "unknown-model": _bad_suite('model = "nonet"', "unknown model 'nonet'"),
    "unknown-optimizer": _bad_suite('optimizer = "sgdd"', "unknown optimizer 'sgdd'"),
    "unknown-augmentation": _bad_suite('augment = ["rotate"]', "unknown augmentation(s) ['rotate']"),
    "unknown-key": _bad_suite("lernrate = 0.1", "bad.toml: trials[0] (one): unknown key 'lernrate'"),
    "not-toml": _bad_suite("lr = = 0.1", "bad.toml: cannot read suite"),
    "wrong-type": _bad_suite('lr = "fast"', "bad.toml: trial bad/one: lr must be float"),
    "zero-lr": _bad_suite("lr = 0.0", "lr must be positive, got 0.0"),
    "negative-batch-size": _bad_suite("batch_size = -8", "batch_size must be positive, got -8"),
    "hue-out-of-range": _bad_suite("hue = [-2.0, 2.0]",
                                   "bad.toml: trial bad/one: hue must be [lo, hi] with -0.5 <= lo <= hi <= 0.5, got [-2.0, 2.0]"),
    "hue-scalar-too-big": _bad_suite("hue = 0.7", "bad.toml: trial bad/one: hue = 0.7: a single number must be in [0, 0.5]"),
    "brightness-negative": _bad_suite("brightness = -0.4", "bad.toml: trial bad/one: brightness = -0.4: a single number must not be negative"),
    "negative-crop-padding": _bad_suite("crop_padding = -3", "bad.toml: trial bad/one: crop_padding must not be negative, got -3"),
    "flip-p-not-a-probability": _bad_suite("flip_p = 7", "bad.toml: trial bad/one: flip_p must be a probability in [0, 1], got 7.0"),
    "unsorted-milestones": _bad_suite("milestones = [22, 10]",
                                      "bad.toml: trial bad/one: milestones must be positive epochs in increasing order, got [22, 10]"),
    "pretrained-without-weights": _bad_suite("pretrained = true",
                                             "bad.toml: trial bad/one: pretrained = true needs a model with ImageNet weights (resnet18), not 'mnist_base'"),
    "unknown-normalize": _bad_suite('normalize = "zscore"', "bad.toml: trial bad/one: unknown normalize 'zscore'"),
    "imagenet-normalize-on-mnist": _bad_suite('normalize = "imagenet"', "bad.toml: trial bad/one: normalize = 'imagenet' is for 3-channel images"),
    "unknown-jitter-mode": _bad_suite('jitter_mode = "pil"', "bad.toml: trial bad/one: unknown jitter_mode 'pil'"),
    "val-fraction-all": _bad_suite("val_fraction = 1.0", "bad.toml: trial bad/one: val_fraction must be in [0, 1), got 1.0"),
    "zero-epochs": (lambda t, r: ("run", _suite(t, ""), *SYN, "--epochs", "0", "--results-dir", r), 2,
                    "--epochs must be positive, got 0", False, {}),
    "no-data-offline": (lambda t, r: ("run", "mnist", "--filter", "mnist/base/sgd/lr0.01", "--epochs", "1",
                                      "--num-cpus", "1", "--data-dir", t / "empty", "--results-dir", r),
                        2, "mnist files not found", False, OFFLINE),
    "unreachable-address": (lambda t, r: ("run", _suite(t, ""), "--synthetic", "--address", "127.0.0.1:1",
                                          "--results-dir", r), 2, "cannot reach a Ray cluster at 127.0.0.1:1", False, {}),
    "address-not-ray": (lambda t, r: ("run", _suite(t, ""), "--synthetic", "--address", _not_ray(),
                                      "--results-dir", r), 2, "answers, but not as a Ray cluster", False, {}),
    "results-dir-under-a-file": (lambda t, r: ("run", _suite(t, ""), *SYN, *_file_path(t, r)), 2,
                                 "cannot write results to", False, {}),
    "results-dir-uri-unknown": (lambda t, r: ("run", _suite(t, ""), *SYN, "--results-dir", "nosuch://bucket/results"),
                                2, "not a location pyarrow.fs can open", False, {}),
    "results-dir-uri-credentials": (lambda t, r: ("run", _suite(t, ""), *SYN, "--results-dir",
                                                  "s3://AKIAEXAMPLE:wJalrEXAMPLE@bucket/results"),
                                    2, "s3://bucket/results: credentials in the URI are refused", False, {}),
    "name-exists": (lambda t, r: ("run", _suite(t, ""), *SYN, "--results-dir", r, "--name", "prev"), 2,
                    "exists: pass --resume", False, {}),
    "resume-nothing": (lambda t, r: ("run", _suite(t, ""), *SYN, "--results-dir", r, "--name", "nope", "--resume"),
                       2, "no run to resume", False, {}),
    "gpus-per-trial-too-many": (lambda t, r: ("run", _suite(t, ""), *SYN, "--results-dir", r,
                                              "--gpus-per-trial", "2"), 2, "more than any node has", True, {}),
    "corrupted-checkpoint": (_corrupt, 2, "refused (UnpicklingError", False, {}),
    "planted-checkpoint": (_planted, 2, "refused (UnpicklingError", False, {}),
    "resume-with-other-epochs": (_other_epochs, 2, "--resume with other options than the run started with would "
                                 "change its results: --epochs", False, {}),
    # TrainConfig fields
    "infinite-lr": _bad_suite("lr = inf", "lr must be a finite number, got inf"),
    "nan-momentum": _bad_suite("momentum = nan", "momentum must be a finite number, got nan"),
    "negative-threads": _bad_suite("num_threads = -2", "num_threads must not be negative, got -2"),
    "negative-eval-batch": _bad_suite("eval_batch_size = -5", "eval_batch_size must be positive, got -5"),
    "zero-eval-batch": _bad_suite("eval_batch_size = 0", "eval_batch_size must be positive, got 0"),
    "bogus-device": _bad_suite('device = "bogus"', "unknown device 'bogus'"),
    "unknown-budget": _bad_suite('budget = "huge"', "unknown budget 'huge'"),
    "negative-seed": _bad_suite("seed = -1", "seed must not be negative, got -1"),
    "augment-not-a-list": _bad_suite('augment = "crop"', "augment must be tuple, got 'crop'"),
    "milestone-not-a-number": _bad_suite('milestones = ["ten"]', "milestones must be positive epochs"),
    "unknown-dataset": _bad_suite('dataset = "imagenet"', "unknown dataset 'imagenet'"),
    "unknown-finetune": _bad_suite('model = "resnet18"\nfinetune = "layer9"', "unknown finetune 'layer9'"),
    "model-dataset-mismatch": _bad_suite('dataset = "cifar10"', "model 'mnist_base' is built for mnist, not cifar10"),
    "negative-patience": _bad_suite("early_stopping_patience = -1", "early_stopping_patience must not be negative"),
    "negative-image-size": _bad_suite("image_size = -1", "max_train_samples and image_size must not be negative"),
    # suite files
    "cpus-not-a-number": (lambda t, r: ("run", _suite(t, "", head='cpus_per_trial = "abc"'), *SYN, "--results-dir", r),
                          2, "[suite]: cpus_per_trial must be a positive whole number, got 'abc'", False, {}),
    "negative-cpus": (lambda t, r: ("run", _suite(t, "", head="cpus_per_trial = -1"), *SYN, "--results-dir", r),
                      2, "cpus_per_trial must be a positive whole number, got -1", False, {}),
    "negative-gpus": (lambda t, r: ("run", _suite(t, "", head="gpus_per_trial = -0.5"), *SYN, "--results-dir", r),
                      2, "gpus_per_trial must be a number >= 0, got -0.5", False, {}),
    "values-not-tables": (lambda t, r: ("run", _suite(t, "", tail='[[axes]]\nname = "x"\nrole = "row"\nvalues = [1, 2]\n'),
                                        *SYN, "--results-dir", r), 2, "values, an array of tables", False, {}),
    "label-not-a-string": (lambda t, r: ("run", _suite(t, "", tail='[[axes]]\nname = "x"\nrole = "row"\nvalues = [{ label = 5 }]\n'),
                                         *SYN, "--results-dir", r), 2, "label must be a name without '/', got 5", False, {}),
    "trials-not-tables": (lambda t, r: ("run", _write(t, '[suite]\nname = "bad"\ntrials = 5\n'), *SYN, "--results-dir", r),
                          2, "unknown key 'trials'", False, {}),
    "trials-a-number": (lambda t, r: ("run", _write(t, 'trials = 5\n'), *SYN, "--results-dir", r),
                        2, "trials must be an array of tables", False, {}),
    "report-not-a-percentage": _bad_suite("report = 150", "report must be a percentage, got 150"),
    # command-line options
    "negative-max-failures": (lambda t, r: ("run", _suite(t, ""), *SYN, "--max-failures", "-1", "--results-dir", r),
                              2, "--max-failures must be at least 0, got -1", False, {}),
    "unknown-precision": (lambda t, r: ("run", _suite(t, ""), *SYN, "--precision", "fp8", "--results-dir", r),
                          2, "argument --precision: invalid choice: 'fp8'", False, {}),
    "zero-repeats": (lambda t, r: ("run", _suite(t, ""), *SYN, "--repeats", "0", "--results-dir", r),
                     2, "--repeats must be positive, got 0", False, {}),
    "zero-cpus-per-trial": (lambda t, r: ("run", _suite(t, ""), *SYN, "--cpus-per-trial", "0", "--results-dir", r),
                            2, "--cpus-per-trial must be positive, got 0", False, {}),
    "negative-gpus-per-trial": (lambda t, r: ("run", _suite(t, ""), *SYN, "--gpus-per-trial", "-1", "--results-dir", r),
                                2, "--gpus-per-trial must be a number >= 0, got -1.0", False, {}),
    "zero-checkpoint-every": (lambda t, r: ("run", _suite(t, ""), *SYN, "--checkpoint-every", "0", "--results-dir", r),
                              2, "--checkpoint-every must be positive, got 0", False, {}),
    "epochs-not-a-number": (lambda t, r: ("run", _suite(t, ""), *SYN, "--epochs", "ten", "--results-dir", r),
                            2, "argument --epochs: invalid int value: 'ten'", False, {}),
    "unknown-tracker": (lambda t, r: ("run", _suite(t, ""), *SYN, "--log", "wandb", "--results-dir", r),
                        2, "--log wandb: unknown tracker", False, {}),
    "resume-without-name": (lambda t, r: ("run", _suite(t, ""), *SYN, "--resume", "--results-dir", r),
                            2, "--resume needs --name RUN", False, {}),
    "name-with-a-slash": (lambda t, r: ("run", _suite(t, ""), *SYN, "--name", "a/b", "--results-dir", r),
                          2, "--name 'a/b': must be a plain folder name", False, {}),
    "filter-matches-nothing": (lambda t, r: ("run", _suite(t, ""), *SYN, "--filter", "nope/*", "--results-dir", r),
                               2, "--filter nope/* matches no trial", False, {}),
    "missing-weights-file": (lambda t, r: ("run", "pretrained", "--filter", "pretrained/zero-shot", *SYN, "--weights",
                                           t / "none.pth", "--results-dir", r), 2, "none.pth: no such file", False, {}),
    "unknown-command": (lambda t, r: ("fly",), 2, "argument command: invalid choice: 'fly'", False, {}),
    # raycnn search: spaces, options
    "search-unknown-domain": _bad_space("lr = { logu = [0.001, 0.1] }", "bad.toml: [search.optimizer.sgd]: lr: unknown domain 'logu'"),
    "search-unsearchable-field": _bad_space("epochs = { choice = [1, 2] }", "[search.optimizer.sgd]: epochs cannot be searched"),
    "search-bounds-reversed": _bad_space("lr = { loguniform = [0.1, 0.001] }", "lr: loguniform must be [lo, hi] with 0 < lo < hi"),
    "search-around-not-a-factor": _bad_space("lr = { around = 0.5 }", "lr: around must be a factor > 1"),
    "search-uniform-on-a-whole-number": _bad_space("crop_padding = { uniform = [0, 4] }", "crop_padding is not a float field"),
    "search-two-domains": _bad_space("lr = { uniform = [0.1, 0.2], around = 10 }", "lr must be one domain"),
    "search-end-does-not-fit": _bad_space("momentum = { uniform = [-1.0, 0.5] }",
                                          "[search.optimizer.sgd]: momentum = -1.0 does not fit bad/one: momentum and weight_decay must not be negative"),
    "search-unknown-optimizer": _bad_space("", "unknown optimizer 'rmsprop' in [search.optimizer.rmsprop]",
                                           suite_search="[search.optimizer.rmsprop]\nlr = { around = 10 }\n"),
    "search-samples-not-a-number": _bad_space("", "[search]: samples must be a whole number >= 1, got 'many'",
                                              suite_search='[search]\nsamples = "many"\n'),
    "search-unknown-setting": _bad_space("", "[search]: unknown key 'trials_per_cell'", suite_search="[search]\ntrials_per_cell = 3\n"),
    "search-nothing-to-search": _bad_space("", "[search] declares nothing to search for bad/one", suite_search="[search]\n"),
    "search-no-space-declared": _bad_space("", "suite bad", suite_search=""),
    "search-space-file-missing": (lambda t, r: ("search", "bad/*", "--suite", _write(t, SEARCH_SUITE), "--space",
                                                t / "none.toml", *SYN, "--results-dir", r), 2, "none.toml: cannot read search space", False, {}),
    "search-on-the-test-set": (lambda t, r: ("search", "mnist/base/sgd/lr0.01", "--metric", "test_acc", *SYN,
                                             "--results-dir", r), 2, "argument --metric: invalid choice: 'test_acc'", False, {}),
    "search-val-fraction-all": (lambda t, r: ("search", "mnist/base/sgd/lr0.01", "--val-fraction", "1", *SYN,
                                              "--results-dir", r), 2, "--val-fraction must be in (0, 1), got 1.0", False, {}),
    "search-zero-budget": (lambda t, r: ("search", "mnist/base/sgd/lr0.01", "--budget", "0", *SYN, "--results-dir", r),
                           2, "--budget must be positive, got 0", False, {}),
    "search-zero-samples": (lambda t, r: ("search", "mnist/base/sgd/lr0.01", "--samples", "0", *SYN, "--results-dir", r),
                            2, "--samples must be positive, got 0", False, {}),
    "search-cell-matches-nothing": (lambda t, r: ("search", "mnist/nonet/*", *SYN, "--results-dir", r), 2,
                                    "CELL-GLOB mnist/nonet/* matches no cell of all", False, {}),
    "search-pretrained": (lambda t, r: ("search", "pretrained/*", *SYN, "--results-dir", r), 2,
                          "the pretrained cells cannot be searched", False, {}),
    "search-resume-with-other-samples": (_other_samples, 2, "--resume with other options than the search started "
                                         "with would change its results: --data-dir (other data), --samples, the "
                                         "cell's config", False, {}),
    "search-resume-nothing": (lambda t, r: ("search", "mnist/base/sgd/lr0.01", *SYN, "--results-dir", r, "--name", "nope",
                                            "--resume"), 2, "no run to resume", False, {}),
    # reading commands
    "table-of-nothing": (lambda t, r: ("table", r / "nosuch"), 2, "no results:", False, {}),
    "table-of-a-broken-file": (lambda t, r: ("table", r / "prev"), 2, "cannot read", False, {}),
    "compare-nothing-in-common": (lambda t, r: ("compare", ROOT / "results" / "mnist-all-1ep",
                                                ROOT / "results" / "cifar10-base-quick"), 2, "no trial in common", False, {}),
    "report-of-nothing": (lambda t, r: ("report", r / "nosuch", "-o", t / "page.html"), 2, "no results:", False, {}),
    "plot-of-nothing": (lambda t, r: ("plot", r / "nosuch"), 2, "no results:", False, {}),
}
SLOW_CASES = {"gpus-per-trial-too-many", "corrupted-checkpoint", "planted-checkpoint", "resume-with-other-epochs"}


def attempt(case: str, tmp: Path, ray_tmp: Path, request=None) -> dict:
    """Run one case against a results folder holding an earlier run; what came of it."""
    argv, _, _, _, extra_env = CASES[case]
    res = tmp / "results"
    for rel, content in PREV.items():            # an earlier run that must stay as it is
        (res / "prev" / rel).parent.mkdir(parents=True, exist_ok=True)
        (res / "prev" / rel).write_bytes(content)
    (tmp / "empty").mkdir(exist_ok=True)
    before = snapshot(res)
    args = argv(tmp, res, request) if argv in (_corrupt, _planted, _other_epochs) else argv(tmp, res)
    start = time.time()
    out = raycnn(*args, env=cli_env(ray_tmp, **extra_env))
    return dict(out=out, took=time.time() - start, before=before, after=snapshot(res),
                ray_started=bool(ray_sessions(ray_tmp)))


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES])
def test_bad_input(case, tmp_path, ray_tmp, request):
    _, code, message, may_start_ray, _ = CASES[case]
    got = attempt(case, tmp_path, ray_tmp, request)
    out = got["out"]

    assert out.returncode == code, (out.returncode, out.stderr[-3000:])
    assert message in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    if code:
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("raycnn: error: "), out.stderr[-3000:]
    if not may_start_ray:
        assert not got["ray_started"], f"{case}: Ray started before the error ({got['took']:.0f}s)"
    assert got["after"] == got["before"]          # earlier results byte-identical, nothing added

    if case in ("corrupted-checkpoint", "planted-checkpoint", "resume-with-other-epochs"):
        name, run_dir = getattr(request.node, "corrupted", (None, None))
        assert not (tmp_path / "marker").exists()        # the planted pickle never ran
        assert not ray_sessions(ray_tmp)                  # refused before Ray started


def test_at_least_forty_mistakes_are_covered():
    assert len(CASES) >= 40
