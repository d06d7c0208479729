#!/usr/bin/env bash
# The four published searches: the report's cells that look like failures of a setting, each
# searched at the report's epochs and batch size and its best config re-run with 3 fresh seeds.
#
#   benchmarks/searches.sh DATA_DIR RESULTS_DIR [GRID_DIR]
#
# Each cell's samples train at most 3 full runs of the cell in epochs (the bundled spaces'
# budget_runs: 30 epochs for an MNIST cell, 90 for a CIFAR-10 one), then the re-run trains 3 more
# full runs. A search runs in WORK (default runs/, git-ignored: its Tune folders hold the
# checkpoints); when it is done, what is published (the plan, the samples' rows, the re-run's
# rows, the re-run's figures) is copied to RESULTS_DIR/search-..., as the runs in results/ are.
# Run again after an interruption: published searches are skipped, an interrupted one resumes.
#
# GRID_DIR (default results) holds the grid's runs, the "grid (ours)" column of the tables.
# Each search's wall time goes to RESULTS_DIR/searches.log; at the end the script prints the
# `raycnn table` commands for results/README.md and the README, and writes the report page
# with the searches' figures, RESULTS_DIR/report-searches.md.
#
# SEARCH_ARGS adds options to every search, e.g. a smoke run on real data:
#   SEARCH_ARGS="--epochs 1 --max-train-samples 1000 --samples 2 --repeats 1" benchmarks/searches.sh data /tmp/s
set -euo pipefail
data=${1:?usage: benchmarks/searches.sh DATA_DIR RESULTS_DIR [GRID_DIR]}
out=${2:?usage: benchmarks/searches.sh DATA_DIR RESULTS_DIR [GRID_DIR]}
grid=${3:-results}
work=${WORK:-runs}
raycnn=${RAYCNN:-raycnn}
read -r -a extra <<< "${SEARCH_ARGS:-}"
mkdir -p "$out" "$work"

# name | cell | the grid's runs that hold the cell (the later one wins, as in raycnn table)
SEARCHES=(
  "search-mnist-dropout-adam-lr0.01|mnist/dropout/adam/lr0.01|mnist-all-1ep mnist-grid-10ep-a mnist-grid-10ep-d"
  "search-mnist-base-sgd-lr0.001|mnist/base/sgd/lr0.001|mnist-all-1ep mnist-base-lr0.001-10ep"
  "search-cifar10-augment-jitter|cifar10/augment/jitter|cifar10-handbuilt-30ep cifar10-repeats-30ep"
  "search-cifar10-base-scheduler|cifar10/base/scheduler|cifar10-handbuilt-30ep"
)
PUBLISHED=(search.json samples.parquet sample_epochs.parquet trials.parquet epochs.parquet)

search() {     # name cell: search into WORK (or resume it there), then publish
  local name=$1 cell=$2 resume=() start=$SECONDS
  if [[ -f "$out/$name/trials.parquet" ]]; then
    echo "searches: $name is published in $out, skipped" >&2
    return
  fi
  [[ -f "$work/$name/search.json" ]] && resume=(--resume)
  $raycnn search "$cell" --data-dir "$data" --results-dir "$work" --name "$name" "${resume[@]}" "${extra[@]}"
  echo "$name $((SECONDS - start)) s${resume:+ (resumed: this part only)}: raycnn search $cell ${extra[*]}" >> "$out/searches.log"
  mkdir -p "$out/$name"
  for f in "${PUBLISHED[@]}"; do cp "$work/$name/$f" "$out/$name/$f"; done
  $raycnn plot "$out/$name" > /dev/null
}

for entry in "${SEARCHES[@]}"; do
  IFS='|' read -r name cell _ <<< "$entry"
  search "$name" "$cell"
done

# The tables: one per search beside its grid runs (results/README.md), and the four together (README).
names=() grids=()
for entry in "${SEARCHES[@]}"; do
  IFS='|' read -r name _ runs <<< "$entry"
  names+=("$out/$name")
  echo
  echo "    raycnn table $out/$name $(printf "$grid/%s " $runs)--format markdown"
  echo
  $raycnn table "$out/$name" $(printf "$grid/%s " $runs) --format markdown
  for r in $runs; do [[ " ${grids[*]} " == *" $grid/$r "* ]] || grids+=("$grid/$r"); done
done
echo
echo "    raycnn table ${names[*]} ${grids[*]} --format markdown"
echo
$raycnn table "${names[@]}" "${grids[@]}" --format markdown
$raycnn report "${grids[@]}" "${names[@]}" -o "$out/report-searches.md" --format markdown
