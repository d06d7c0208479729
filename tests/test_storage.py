"""Results in object storage, against a real S3 API: moto's server on loopback, started per test
module as a subprocess and stopped by its pid (tests/support.py). Nothing here mocks boto or
pyarrow in-process. Clients get the server only through the standard AWS environment variables.
The tests that start the server are in the slow tier; the default tier keeps those that need none.

- a run folder's files read and written the same way, all or nothing, on a local disk, in a
  bucket and on a filesystem of neither kind (write-new-then-point);
- a URI that carries credentials is refused without showing them;
- `table`, `compare` and `report` of a run in a bucket print what they print for the same run on
  disk, and `plot` draws the same figures into the bucket;
- `run` refuses, in one line and before Ray starts, a bucket that does not exist;
- the lease that keeps a second driver off a run folder in a bucket.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

import raycnn
from raycnn import lock, storage
from raycnn.errors import LockedError, StorageError
from support import cli_env, raycnn as run_cli, s3_server

PUBLISHED = Path(raycnn.__path__[0]).parent / "results" / "cifar10-handbuilt-30ep"


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        server.admin().create_dir("bkt")
        yield server


@pytest.fixture
def aws(s3, monkeypatch):
    """This process as a client of the server: the standard AWS variables only."""
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    return s3


def _root(where: str, tmp_path: Path) -> storage.Place:
    """A fresh folder: on this disk, in the bucket, or on a filesystem that is neither (pyarrow's
    SubTreeFileSystem over this disk stands for HDFS and the like: no rename-free atomic write)."""
    if where == "other":
        return storage.Place(pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), "r")
    return storage.resolve(tmp_path / "r" if where == "disk" else f"s3://bkt/{where}-{time.time_ns()}/r")


@pytest.mark.parametrize("where", ["disk", pytest.param("bucket", marks=pytest.mark.slow), "other"])
def test_a_place_works_alike_on_disk_in_a_bucket_and_elsewhere(where, request, tmp_path):
    if where == "bucket":         # only the bucket needs the server (slow tier: it starts one)
        request.getfixturevalue("aws")
    root = _root(where, tmp_path)
    assert not root.exists() and root.tree() == {}
    (root / "a.json").write_text('{"x": 1}')
    (root / "sub" / "b.txt").write_bytes(b"b")
    assert json.loads((root / "a.json").read_text()) == {"x": 1} and (root / "a.json").is_file()
    assert sorted(root.tree()) == ["a.json", "sub/b.txt"]          # no temporary file left behind
    assert [p.name for p in root.files("*.json")] == ["a.json"]
    (root / "a.json").write_text('{"x": 2}')                        # replaced whole
    assert json.loads((root / "a.json").read_text()) == {"x": 2} and sorted(root.tree()) == ["a.json", "sub/b.txt"]

    def half(f):
        f.write(b"half of it")
        raise RuntimeError("the writer failed half-way")
    with pytest.raises(RuntimeError):
        (root / "a.json").write(half)
    assert (root / "a.json").read_text() == '{"x": 2}'      # all or nothing
    assert sorted(root.tree()) == ["a.json", "sub/b.txt"]
    with pytest.raises(FileNotFoundError):
        (root / "nothing").read_bytes()
    (root / "a.json").unlink()
    (root / "a.json").unlink()                               # gone already: no error
    root.rmtree()
    assert root.tree() == {}
    assert str(root).startswith({"bucket": "s3://bkt/", "disk": "/", "other": "subtree://"}[where])


@pytest.mark.parametrize("uri", ["s3://AKIAEXAMPLEKEY:wJalrEXAMPLESECRET@bkt/runs", "s3://AKIAEXAMPLEKEY@bkt/runs",
                                 "abfs://acct:wJalrEXAMPLESECRET@ctr/runs",
                                 "abfs://acct@ctr/runs?client_id=x&client_secret=wJalrEXAMPLESECRET"])
def test_a_uri_holding_credentials_is_refused_without_showing_them(uri, tmp_path, ray_tmp):
    with pytest.raises(StorageError, match="credentials in the URI are refused") as refused:
        storage.resolve(uri)
    assert "EXAMPLE" not in str(refused.value)
    out = run_cli("table", uri, env=cli_env(ray_tmp))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "EXAMPLE" not in out.stderr, out.stderr


def test_a_uri_pyarrow_cannot_open_is_one_line():
    with pytest.raises(StorageError, match="not a location pyarrow.fs can open"):
        storage.resolve("nosuchscheme://x/y")
    assert storage.resolve("file:///tmp/x").local == Path("/tmp/x")      # file:// is a local disk


def _copy_published(s3, key: str) -> str:
    """The published run copied into the bucket, as a user's `aws s3 sync` would."""
    pafs.copy_files(str(PUBLISHED), f"bkt/{key}/{PUBLISHED.name}", destination_filesystem=s3.admin())
    return f"s3://bkt/{key}/{PUBLISHED.name}"


@pytest.mark.slow
def test_table_and_report_read_a_run_in_a_bucket(s3, tmp_path, ray_tmp):
    uri = _copy_published(s3, "published")
    env = cli_env(ray_tmp, **s3.env)
    for command in (["compare", "--format", "csv"], ["table", "--format", "markdown", "--source"]):
        runs = [PUBLISHED] * (1 + (command[0] == "compare"))
        on_disk = run_cli(*command[:1], *runs, *command[1:], env=env)
        in_bucket = run_cli(*command[:1], *[uri] * len(runs), *command[1:], env=env)
        assert on_disk.returncode == in_bucket.returncode == 0, in_bucket.stderr
        assert in_bucket.stdout == on_disk.stdout and "2 BatchNorm" in in_bucket.stdout
    assert "[cifar10-handbuilt-30ep]" in in_bucket.stdout       # the run's name from the URI, as from the path
    pages = [run_cli("report", run, "-o", tmp_path / f"{i}.md", "--format", "markdown", env=env)
             for i, run in enumerate((PUBLISHED, uri))]
    assert [p.returncode for p in pages] == [0, 0], pages[1].stderr
    assert (tmp_path / "0.md").read_text() == (tmp_path / "1.md").read_text().replace("1_files/", "0_files/")
    missing = run_cli("table", "s3://bkt/published/nosuch", env=env)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no results" in missing.stderr


@pytest.mark.slow
def test_plot_draws_a_run_in_a_bucket_into_it(s3, tmp_path, ray_tmp):
    uri = _copy_published(s3, "plotted")
    s3.admin().delete_dir(f"{uri[len('s3://'):]}/plots")            # the copy's figures: drawn again below
    env = cli_env(ray_tmp, **s3.env)
    on_disk = run_cli("plot", PUBLISHED, "--out", tmp_path / "plots", env=env)
    in_bucket = run_cli("plot", uri, env=env)
    assert on_disk.returncode == in_bucket.returncode == 0, in_bucket.stderr
    drawn = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert len(drawn) == 3 and in_bucket.stdout.split() == [f"{uri}/plots/{name}" for name in drawn]
    for name in drawn:
        with s3.admin().open_input_stream(f"{uri[len('s3://'):]}/plots/{name}") as f:
            assert f.read() == (tmp_path / "plots" / name).read_bytes()


@pytest.mark.slow
def test_run_refuses_a_bucket_it_cannot_write_before_ray_starts(s3, tmp_path, ray_tmp):
    suite = tmp_path / "s.toml"
    suite.write_text('[suite]\nname = "s"\n[defaults]\nmodel = "mnist_base"\n[[trials]]\nname = "one"\n')
    env = cli_env(ray_tmp, **s3.env)
    out = run_cli("run", suite, "--synthetic", "--results-dir", "s3://nosuchbucket/runs", "--name", "x", env=env)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("raycnn: error: cannot write results to s3://nosuchbucket/runs/x")
    assert "NO_SUCH_BUCKET" in out.stderr and not list(ray_tmp.iterdir())          # Ray never started
    mlflow = run_cli("run", suite, "--synthetic", "--results-dir", "s3://bkt/runs", "--log", "mlflow", env=env)
    assert mlflow.returncode == 2 and "give a tracking URI" in mlflow.stderr, mlflow.stderr
    resume = run_cli("run", suite, "--synthetic", "--results-dir", "s3://bkt/runs", "--name", "none", "--resume",
                     env=env)
    assert resume.returncode == 2 and "no run to resume at s3://bkt/runs/none" in resume.stderr


@pytest.fixture
def quick_lease(monkeypatch):
    monkeypatch.setattr(lock, "LEASE_S", 2.0)
    monkeypatch.setattr(lock, "SETTLE_S", 0.3)


@pytest.mark.slow
def test_a_second_driver_is_refused_and_a_dead_ones_lease_expires(aws, quick_lease):
    run_dir = storage.resolve(f"s3://bkt/lease-{time.time_ns()}/r")
    first = lock.hold(run_dir)
    assert isinstance(first, lock.LeaseLock) and isinstance(lock.hold(PUBLISHED), lock.RunLock)
    with first:
        time.sleep(lock.LEASE_S * 1.5)                     # renewed meanwhile: still held
        with pytest.raises(LockedError, match=r"is driven by pid \d+ on "):
            lock.hold(run_dir).acquire()
        assert not first.lost
    assert not (run_dir / lock.LOCK_FILE).exists()          # released: the object is gone
    # A driver that died holding it: its record stays, unrenewed, and expires.
    dead = lock.LeaseLock(run_dir)
    dead._write()
    with pytest.raises(LockedError):
        lock.hold(run_dir).acquire()
    time.sleep(lock.LEASE_S + 0.5)
    with lock.hold(run_dir) as taker:
        assert taker._ours(taker._read())


@pytest.mark.slow
def test_of_two_drivers_racing_for_a_lease_one_wins(aws, quick_lease):
    run_dir = storage.resolve(f"s3://bkt/race-{time.time_ns()}/r")
    for _ in range(3):
        outcomes, locks = [], [lock.LeaseLock(run_dir) for _ in range(2)]
        start = threading.Barrier(2)

        def go(mine):
            start.wait()
            try:
                mine.acquire()
                outcomes.append("held")
            except LockedError:
                outcomes.append("refused")
        threads = [threading.Thread(target=go, args=(lk,)) for lk in locks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["held", "refused"]
        for lk in locks:
            lk.release()


@pytest.mark.slow
def test_a_checkpoint_in_a_bucket_is_read_the_safe_way(aws):
    """Before --resume every checkpoint of the run is read with weights_only=True, in a bucket too."""
    import torch
    from raycnn import checkpoint
    from raycnn.errors import CheckpointError
    exp = storage.resolve(f"s3://bkt/ck-{time.time_ns()}/tune/experiment")
    (exp / "000-t-r0" / "checkpoint_000000" / checkpoint.STATE_FILE).write(lambda f: torch.save({"epoch": 1}, f))
    assert checkpoint.check_all(exp) == 1
    (exp / "001-u-r0" / "checkpoint_000000" / checkpoint.BEST_FILE).write(lambda f: torch.save(threading.Lock, f))
    with pytest.raises(CheckpointError, match=r"checkpoint s3://bkt/ck-\d+/tune/experiment/001-u-r0/.*best.pt refused"):
        checkpoint.check_all(exp)
