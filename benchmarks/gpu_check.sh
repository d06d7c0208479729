#!/usr/bin/env bash
# GPU check, in under 8 minutes on one GPU with no network: benchmarks/speed.py on CUDA, one
# synthetic epoch of every suite at its declared GPU packing, and the projected wall time of the
# report's full grid (59 trials at 10/30/10 epochs) from those measurements.
# On a lent device machine: run `bash benchmarks/gpu_check.sh` with carry [".device"] and a
# timeout of about 540 s; what it copies to $OUT comes back.
#
#   bash benchmarks/gpu_check.sh --prepare   # here, with network: fills .device/ (git-ignored)
#   bash benchmarks/gpu_check.sh             # there, in the repo root copied with .device/
#
# There: CPython 3.12 with torch preinstalled; Ray comes from .device/ray-site.tar.xz, unpacked
# as /work/shared/gpu-kit/README.md says; rich (with markdown-it-py, mdurl, pygments: pure Python,
# absent from that image) from .device/pylib; real images from .device/data if present (the
# timing does not need them). Outputs go to results/speed/: <gpu>.parquet (speed.py),
# gpu-check/<suite>/*.parquet (the suites' runs), projection-<gpu>.parquet, gpu-check.log; and,
# where $OUT is set, are copied there after every step, so a run cut short still returns them.
set -uo pipefail      # no -e: a failed step must not hide the numbers of the next ones
cd "$(dirname "$0")/.."

BUDGET_S=${GPU_CHECK_BUDGET_S:-465}   # the whole script; 8 minutes less a margin for start-up
RESERVE_S=30                          # kept for the final projection by every earlier step
SITE=${GPU_CHECK_SITE:-/tmp/site}   # where Ray unpacks (the kit's prefix)
t0=$SECONDS

prepare() {
  # make_ray_bundle.sh writes .device/ray-site.tar.xz (reaches PyPI); --force there rebuilds.
  local kit=${GPU_KIT:-$(cd .. && pwd)/shared/gpu-kit} py=${PYTHON:-.venv/bin/python}
  [ -f .device/ray-site.tar.xz ] || "$kit/make_ray_bundle.sh" || return 1
  rm -rf .device/pylib && mkdir -p .device/pylib
  "$py" - <<'EOF'
import importlib, pathlib, shutil
for name in ("rich", "markdown_it", "mdurl", "pygments"):
    src = pathlib.Path(importlib.import_module(name).__file__).parent
    shutil.copytree(src, f".device/pylib/{name}", ignore=shutil.ignore_patterns("__pycache__"))
EOF
  du -sh .device/*
}

copy_out() {
  [ -n "${OUT:-}" ] && mkdir -p "$OUT" && cp -r results/speed "$OUT/" 2>/dev/null
  return 0
}

step() {
  # step LIMIT CMD...: run CMD under `timeout`, at most LIMIT seconds and what the budget leaves.
  local limit=$1 left=$((BUDGET_S - (SECONDS - t0) - RESERVE_S)); shift
  ((left < limit)) && limit=$left
  if ((limit < 15)); then echo "== skipped, out of time: $*"; return 124; fi
  echo "== $(date +%T) +$((SECONDS - t0))s [limit ${limit}s] $*"
  # SIGINT to the command alone: Tune stops, writes what finished and shuts Ray down (seen:
  # rc 130 in 15 s). SIGTERM makes Ray 2.60's C++ handler abort the driver (rc 134), and
  # signalling the whole process group (timeout without --foreground) kills Ray under it.
  # Ray's own processes die with the driver if the KILL 30 s later is needed.
  timeout --foreground -s INT -k 30 "$limit" "$@"
  local rc=$?
  echo "== rc=$rc +$((SECONDS - t0))s"
  copy_out
  return $rc
}

setup_env() {
  mkdir -p "$SITE" && { [ -d "$SITE/ray" ] || timeout 120 python3 -m tarfile --filter tar \
    -e .device/ray-site.tar.xz "$SITE"; } || { echo "cannot unpack .device/ray-site.tar.xz"; return 1; }
  # pylib last: a rich already in the image wins. PYTHONPATH absolute: Tune runs trials elsewhere.
  export PYTHONPATH=$SITE:$PWD:$PWD/.device/pylib PATH=$SITE/bin:$PATH RAY_AUTH_MODE=disabled \
    RAY_USAGE_STATS_ENABLED=0 RAY_AIR_NEW_OUTPUT=0 COLUMNS=${COLUMNS:-200}
  timeout 90 python3 -c 'import sys, torch, ray, rich; print("python", sys.version.split()[0], "torch",
      torch.__version__, "ray", ray.__version__, "|", torch.cuda.get_device_name(0), "x", torch.cuda.device_count())'
}

run_suites() {
  local weights=/tmp/raycnn-random-resnet18.pt suite
  # The pretrained suite loads ImageNet weights: random ones time the same, and timing is all this measures.
  timeout 90 python3 -c "import torch, torchvision; torch.save(torchvision.models.resnet18().state_dict(), '$weights')"
  rm -rf results/gpu-check results/speed/gpu-check
  local rc=0
  for suite in mnist cifar10 pretrained; do
    step 110 python3 -m raycnn.cli run "$suite" --synthetic --epochs 1 --results-dir results/gpu-check \
      --name "$suite" --num-gpus "$NGPU" --max-failures 0 --weights "$weights" || rc=1
    # Only the Parquet files: Tune's folders hold checkpoints.
    mkdir -p "results/speed/gpu-check/$suite"
    cp results/gpu-check/"$suite"/*.parquet "results/speed/gpu-check/$suite/" 2>/dev/null
  done
  copy_out
  return $rc
}

project() {
  local runs=() d
  for d in results/speed/gpu-check/*/; do [ -f "$d/trials.parquet" ] && runs+=("$d"); done
  ((${#runs[@]})) || { echo "no suite produced results: nothing to project"; return 1; }
  RESERVE_S=0 step 60 python3 benchmarks/project.py "${runs[@]}" --gpus "$NGPU" \
    --speed "results/speed/$SLUG.parquet" --out "results/speed/projection-$SLUG.parquet"
}

main() {
  echo "== gpu_check $(git rev-parse --short HEAD 2>/dev/null || echo '?') on $(hostname 2>/dev/null), $(date -Is)"
  setup_env || return 1
  # GPU count (declared to Ray: the kit has not seen its autodetection) and speed.py's file stem.
  read -r NGPU SLUG < <(timeout 90 python3 -c 'import re, torch; print(torch.cuda.device_count(),
      re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-"))')
  local data=(--data-dir .device/data) rc=0
  [ -d .device/data ] || data=(--data-dir none)      # speed.py then times synthetic images
  step 210 python3 benchmarks/speed.py --device cuda "${data[@]}" --out results/speed || rc=1
  run_suites || rc=1
  project || rc=1
  echo "== done in $((SECONDS - t0))s, rc=$rc; outputs in results/speed/"
  return $rc
}

if [ "${1:-}" = "--prepare" ]; then
  prepare
  exit $?
fi
mkdir -p results/speed
main 2>&1 | tee results/speed/gpu-check.log
rc=${PIPESTATUS[0]}
copy_out
exit "$rc"
