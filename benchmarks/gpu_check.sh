#!/usr/bin/env bash
# The GPU check in one call on an offline GPU machine (CPython 3.12 with torch, no Ray, no network):
#   1. benchmarks/throughput.py on CUDA: the raycnn trainer against the naive loop (images/s, ratio),
#      and benchmarks/layout.py: a training step of each network in NCHW against channels_last;
#   2. benchmarks/packing.py: total images/s at 1, 2, 4, 8 trials per GPU (again under CUDA MPS
#      where nvidia-cuda-mps-control exists: started before Ray, stopped after);
#   3. benchmarks/grid.py: the 40 MNIST + 11 CIFAR-10 trials at the report's epochs on the real
#      data, longest first, at step 2's best packing (the 8 pretrained trials are left out: they
#      need ImageNet weights, which that machine cannot download);
#   4. throughput.py again with torch.compile, in what time is left.
# GPU_CHECK_SKIP=throughput,layout,packing,... leaves steps out (e.g. a second call for the grid alone).
# Each step has its own time limit inside GPU_CHECK_BUDGET_S; after every step (and every 20 s of
# the grid) the figures are copied to $OUT, so a run cut short still returns them.
#
#   GPU_KIT=DIR bash benchmarks/gpu_check.sh --prepare   # here (reaches PyPI): fills .device/ (git-ignored)
#                                            # and checks that what travels is under 64 MiB
#   bash benchmarks/gpu_check.sh             # there, in the repo root copied with .device/
#   bash benchmarks/gpu_check.sh --dry-run   # here: the device half on the CPU, synthetic and tiny,
#                                            # with this machine's Python and Ray (PYTHON=...)
# On the GPU machine: copy the repository with .device/ (under 64 MiB in all); one call of about 540 s.
#
# .device/ holds ray-site.tar.xz (Ray Core + Tune for cp312, from the GPU kit's make_ray_bundle.sh),
# data.npz and datapack.py (the real MNIST and CIFAR-10, from the kit's datapack.py) and pylib/
# (rich and its pure-Python dependencies, absent from that image). Outputs: results/speed/
# throughput-<gpu>.parquet, layout-<gpu>.parquet, packing-<gpu>.parquet, grid-<gpu>.parquet, gpu-check.log, and the grid's
# run folder results/grid-<gpu>/ (its Parquet files; Tune's folder there is git-ignored).
set -uo pipefail      # no -e: a failed step must not hide the numbers of the next ones
cd "$(dirname "$0")/.."

DEV=${GPU_CHECK_DEVICE_DIR:-.device}
LIMIT_MIB=${GPU_CHECK_LIMIT_MIB:-64}
BUDGET_S=${GPU_CHECK_BUDGET_S:-510}   # the whole device half; a 540 s call less a margin
SITE=${GPU_CHECK_SITE:-/tmp/site}     # where Ray unpacks (the kit's prefix)
DATA=${GPU_CHECK_DATA:-/tmp/raycnn-data}
RES=${GPU_CHECK_RESULTS:-results}   # results root; the dry run's default is a temporary folder
PY=${PYTHON:-python3}
DRY=0
SCALE=1                               # step limits x SCALE (the dry run's CPU is slower)
t0=$SECONDS

travelling_bytes() {
  # What a device call carries: the files git tracks or would track, plus .device/.
  { git ls-files -z --cached --others --exclude-standard; find "$DEV" -type f -print0 2>/dev/null; } |
    sort -zu | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}'
}

check_size() {
  local bytes mib limit=$((LIMIT_MIB * 1024 * 1024))
  bytes=$(travelling_bytes)
  mib=$(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1048576}')
  if ((bytes > limit)); then
    echo "gpu_check: $mib MiB would travel (working tree + $DEV), over the ${LIMIT_MIB} MiB limit" >&2
    return 2
  fi
  echo "travels: $mib MiB of ${LIMIT_MIB} MiB"
}

prepare() {
  # Each part is built once; delete it (or pass --force to the kit's script) to rebuild.
  local kit=${GPU_KIT:-} py=${PYTHON:-python3}
  # The GPU kit (make_ray_bundle.sh, datapack.py): a folder the caller names.
  [ -n "$kit" ] || { echo "gpu_check: --prepare needs GPU_KIT=DIR, the folder with make_ray_bundle.sh and datapack.py" >&2; return 2; }
  [ -d "$kit" ] || { echo "gpu_check: no GPU kit at $kit (GPU_KIT)" >&2; return 2; }
  mkdir -p "$DEV"
  [ -f "$DEV/ray-site.tar.xz" ] || PYTHON=$py "$kit/make_ray_bundle.sh" "$DEV" || return 1
  [ -f "$DEV/data.npz" ] || "$py" "$kit/datapack.py" pack "$DEV/data.npz" || return 1
  cp "$kit/datapack.py" "$DEV/datapack.py"
  rm -rf "$DEV/pylib" && mkdir -p "$DEV/pylib"
  "$py" - "$DEV/pylib" <<'EOF' || return 1
import importlib, pathlib, shutil, sys
for name in ("rich", "markdown_it", "mdurl", "pygments"):
    src = pathlib.Path(importlib.import_module(name).__file__).parent
    shutil.copytree(src, pathlib.Path(sys.argv[1]) / name, ignore=shutil.ignore_patterns("__pycache__"))
EOF
  du -sh "$DEV"/*
  check_size
}

copy_out() {
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT/results/speed" "$OUT/results/$GRID"
  cp "$RES"/speed/*-"$SLUG".parquet "$RES"/speed/gpu-check.log "$OUT/results/speed/" 2>/dev/null
  cp "$RES/$GRID"/*.parquet "$OUT/results/$GRID/" 2>/dev/null
  return 0
}

step() {
  # step LIMIT CMD...: run CMD under `timeout`, at most LIMIT seconds and what the budget leaves.
  local limit=$(($1 * SCALE)) left=$((BUDGET_S - (SECONDS - t0))); shift
  ((left < limit)) && limit=$left
  if ((limit < 20)); then echo "== skipped, out of time: $*"; return 124; fi
  echo "== $(date +%T) +$((SECONDS - t0))s [limit ${limit}s] $*"
  # SIGINT to the command alone: Tune stops, writes what finished and shuts Ray down. SIGTERM
  # makes Ray 2.60's C++ handler abort the driver, and signalling the whole process group (timeout
  # without --foreground) kills Ray under it. The KILL 20 s later ends what is left.
  timeout --foreground -s INT -k 20 "$limit" "$@"
  local rc=$?
  echo "== rc=$rc +$((SECONDS - t0))s"
  copy_out
  return $rc
}

setup_env() {
  if ((DRY)); then      # this machine's Python and Ray; the tree's own PYTHONPATH
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  else
    mkdir -p "$SITE" && { [ -d "$SITE/ray" ] || timeout 120 "$PY" -m tarfile --filter tar \
      -e "$DEV/ray-site.tar.xz" "$SITE"; } || { echo "cannot unpack $DEV/ray-site.tar.xz"; return 1; }
    # pylib last: a rich already in the image wins. PYTHONPATH absolute: Tune runs trials elsewhere.
    export PYTHONPATH=$SITE:$PWD:$PWD/$DEV/pylib PATH=$SITE/bin:$PATH
    if [ ! -f "$DATA/.unpacked" ]; then
      timeout 120 "$PY" "$DEV/datapack.py" unpack "$DEV/data.npz" "$DATA" && touch "$DATA/.unpacked" ||
        { echo "cannot unpack $DEV/data.npz"; return 1; }
    fi
  fi
  export RAY_USAGE_STATS_ENABLED=0 RAY_AIR_NEW_OUTPUT=0 COLUMNS=${COLUMNS:-200}
  timeout 120 "$PY" -c 'import sys, torch, ray, rich; print("python", sys.version.split()[0], "torch",
      torch.__version__, "ray", ray.__version__, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available()
      else "no GPU", "x", torch.cuda.device_count())'
}

wanted() {   # wanted STEP: not named in GPU_CHECK_SKIP (comma-separated: throughput,layout,packing,mps,grid,compile)
  [[ ",${GPU_CHECK_SKIP:-}," != *",$1,"* ]]
}

mps() {   # mps start|stop: CUDA MPS, private to this run
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/raycnn-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/raycnn-mps/log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if [ "$1" = start ]; then nvidia-cuda-mps-control -d; else echo quit | nvidia-cuda-mps-control; fi
}

main() {
  echo "== gpu_check $(git rev-parse --short HEAD 2>/dev/null || echo '?') on $(hostname 2>/dev/null), $(date -Is)$( ((DRY)) && echo ', dry run')"
  setup_env || return 1
  local rc=0 label k copier
  # Per step: (dry run on the CPU | the real thing on CUDA).
  local tp=(--device cuda --data-dir "$DATA") ly=(--device cuda) pk=(--device cuda --data-dir "$DATA") gr=(--device cuda --data-dir "$DATA")
  if ((DRY)); then
    tp=(--device cpu --quick --models mnist_base,cifar_base)
    ly=(--device cpu --quick --models mnist_base,cifar_base --reps 1)
    pk=(--device cpu --synthetic --trial-images 128 --epochs 1 --concurrency 1,2)
    gr=(--device cpu --synthetic --epochs 1 --max-train-samples 64 --num-cpus 2 --max-failures 0
        --filter 'mnist/base/sgd/*' --filter 'cifar10/base/*')
  fi
  wanted throughput && { step 120 "$PY" benchmarks/throughput.py "${tp[@]}" --out "$RES/speed" || rc=1; }
  wanted layout && { step 60 "$PY" benchmarks/layout.py "${ly[@]}" --out "$RES/speed" || rc=1; }
  wanted packing && { step 150 "$PY" benchmarks/packing.py "${pk[@]}" --out "$RES/speed" || rc=1; }
  if ((!DRY)) && wanted mps && command -v nvidia-cuda-mps-control >/dev/null; then
    # The densest packing only: MPS matters where many processes share the GPU.
    mps start && { step 60 "$PY" benchmarks/packing.py "${pk[@]}" --concurrency 8 --label mps --out "$RES/speed" || rc=1; }
    mps stop
  fi
  if wanted grid; then
    read -r label k < <("$PY" benchmarks/grid.py --best-packing "$RES/speed/packing-$SLUG.parquet")
    [ "${label:-}" = mps ] && mps start
    (while sleep 20; do copy_out; done) & copier=$!
    # The grid gets what is left but 40 s, kept for the compiled throughput's first model.
    step $(((BUDGET_S - (SECONDS - t0)) / SCALE - 40)) "$PY" benchmarks/grid.py "${gr[@]}" --per-device "${k:-1}" \
      --run-dir "$RES/$GRID" --out "$RES/speed" || rc=1
    kill "$copier" 2>/dev/null
    [ "${label:-}" = mps ] && mps stop
  fi
  wanted compile && { step 300 "$PY" benchmarks/throughput.py "${tp[@]}" --compile --out "$RES/speed/compile" || rc=1; }
  [ -n "${OUT:-}" ] && mkdir -p "$OUT/results/speed/compile" && cp "$RES"/speed/compile/*.parquet "$OUT/results/speed/compile/" 2>/dev/null
  echo "== done in $((SECONDS - t0))s, rc=$rc"
  return $rc
}

case "${1:-}" in
  --prepare) prepare; exit $? ;;
  --check-size) check_size; exit $? ;;
  --dry-run) DRY=1; DATA=none; RES=${GPU_CHECK_RESULTS:-$(mktemp -d)/results}
             BUDGET_S=${GPU_CHECK_BUDGET_S:-1800}; SCALE=4 ;;   # a shared 2-core CPU: looser limits
  "") ;;
  *) echo "gpu_check: unknown option $1 (--prepare, --check-size, --dry-run or none)" >&2; exit 2 ;;
esac
# The device's file stem, as throughput.py names its files; the grid's run folder.
SLUG=cpu
((DRY)) || SLUG=$(timeout 60 "$PY" -c 'import re, torch; print(re.sub(r"[^a-z0-9]+", "-",
    torch.cuda.get_device_name(0).lower()).strip("-") if torch.cuda.is_available() else "cpu")')
GRID=grid-$SLUG
mkdir -p "$RES/speed"
main 2>&1 | tee "$RES/speed/gpu-check.log"
rc=${PIPESTATUS[0]}
copy_out
exit "$rc"
