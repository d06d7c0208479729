#!/usr/bin/env python3
"""What results in object storage cost: the same small run on two Ray nodes, its results in an
S3 bucket against on the local disk, alternating, in one session.

    python benchmarks/storage_cost.py [--reps 3] [--out FILE.parquet]

The bucket is moto's S3 server on loopback (a real S3 API over HTTP, as in
tests/test_storage_cluster.py), the two nodes a Ray head (1 CPU) and a second node (2 CPUs) on
this machine, the run tests/support.py's FAULT_SUITE (three mnist_base trials, 1 + 3 + 3
epochs of 1,024 synthetic images, one CPU each). Each repetition runs `raycnn run` once into
`--results-dir s3://bkt/runs` and once into a local folder, the order swapped every
repetition; the wall time is the command's, as a user waits for it, Ray's join and the final
Parquet writes included. Prints each run, the medians and the load average before and after.
So the bucket's cost here is the HTTP round trips of a server on the same machine, not a
network's: a real bucket adds its latency to every request.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                # a checkout that is not installed
sys.path.insert(0, str(ROOT / "tests"))      # the S3 server and the two nodes of the tests

from support import BASE_ENV, FAULT_SUITE, PY, s3_server, two_nodes   # noqa: E402


def timed_run(suite: Path, address: str, results_dir: str, name: str, env: dict) -> float:
    """Seconds `raycnn run` takes, to its exit; SystemExit with its stderr if it fails."""
    argv = [PY, "-m", "raycnn.cli", "run", str(suite), "--synthetic", "--address", address,
            "--results-dir", results_dir, "--name", name]
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"storage_cost: the run into {results_dir} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return took


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", help="also write one row per run here (Parquet)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="storage-cost-"))
    suite = work / "ft.toml"
    suite.write_text(FAULT_SUITE)
    rows, loads = [], [uptime()]
    try:
        with s3_server() as s3, two_nodes(head_env=s3.env, worker_env=s3.env) as cluster:
            s3.admin().create_dir("bkt")
            env = {**os.environ, **BASE_ENV, **s3.env, "PYTHONPATH": str(ROOT)}
            places = {"bucket": "s3://bkt/runs", "disk": str(work / "runs")}
            for rep in range(args.reps):
                for where in (("disk", "bucket") if rep % 2 == 0 else ("bucket", "disk")):
                    seconds = timed_run(suite, cluster.address, places[where], f"rep{rep}", env)
                    rows.append({"rep": rep, "results": where, "seconds": seconds, "load1": os.getloadavg()[0]})
                    print(f"rep {rep}  {where:6}  {seconds:6.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    loads.append(uptime())
    medians = {w: statistics.median(r["seconds"] for r in rows if r["results"] == w) for w in ("disk", "bucket")}
    print(f"median of {args.reps}: disk {medians['disk']:.1f} s, bucket {medians['bucket']:.1f} s, "
          f"bucket - disk {medians['bucket'] - medians['disk']:+.1f} s ({medians['bucket'] / medians['disk'] - 1:+.0%})")
    print(f"before: {loads[0]}\nafter:  {loads[1]}")
    if args.out:
        from raycnn import results
        results.write_parquet(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
