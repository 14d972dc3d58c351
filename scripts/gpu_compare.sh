#!/usr/bin/env bash
# Before and after of speed changes from one GPU machine and one run: builds the extension of this
# tree and of each BASE (other checkouts of the project, e.g. the commit before a change, or a chain
# of commits) side by side, then runs the same timing commands on each tree in turn, round after
# round (base, this, base, this), so that drift in clocks or temperature shows up as spread rather
# than as a difference.
#   bash scripts/gpu_compare.sh BASE [BASE ...] [COMMAND ...]
# The leading arguments that are checkouts (directories with a setup.py) are the bases, in the
# order given; each COMMAND is one shell string, run from the tree's directory with PYTHONPATH set
# to it. The default commands time decode attention alone, the attention microbenchmark and the
# model (ours only). Logs go to $RESULTS_DIR (default gpu-results/compare): cmdK-ROUND-LABEL.log for
# command K, LABEL being "this", "base" for a single base, else the base directory's name; the
# last lines of each run are printed.
set -uo pipefail
cd "$(dirname "$0")/.."
trees=()
while [[ $# -gt 0 && -f "$1/setup.py" ]]; do
  trees+=("$(cd "$1" && pwd)")
  shift
done
if [[ ${#trees[@]} -eq 0 ]]; then
  echo "usage: $0 BASE [BASE ...] [COMMAND ...]   (BASE: a checkout of the project)" >&2
  exit 2
fi
labels=()
for tree in "${trees[@]}"; do
  if [[ ${#trees[@]} -eq 1 ]]; then labels+=(base); else labels+=("$(basename "$tree")"); fi
done
trees+=("$(pwd)")
labels+=(this)
if [[ $(printf '%s\n' "${labels[@]}" | sort | uniq -d) ]]; then
  echo "the bases need distinct directory names (and none named 'this'): ${labels[*]}" >&2
  exit 2
fi
commands=("$@")
if [[ ${#commands[@]} -eq 0 ]]; then
  commands=("python3 scripts/time_decode_attention.py"
            "python3 -m mistral_ext.bench_attention --repeats 10"
            "python3 -m mistral_ext.cli bench --no-peers --new-tokens 128 --repeats 2")
fi
RESULTS_DIR=${RESULTS_DIR:-gpu-results/compare}
ROUNDS=${ROUNDS:-2}
mkdir -p "$RESULTS_DIR"
export PYTHONUNBUFFERED=1
if [[ -x /usr/bin/g++ ]]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi

build() {  # build TREE LABEL: the extension in place, next to its sources
  (cd "$1" && TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS=8 \
    python3 setup.py build_ext --inplace) >"$RESULTS_DIR/build-$2.log" 2>&1
}
pids=()
for i in "${!trees[@]}"; do
  build "${trees[$i]}" "${labels[$i]}" &
  pids+=($!)
done
failed=()
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || failed+=("${labels[$i]}")
done
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "=== build FAILED: ${failed[*]}"
  for label in "${failed[@]}"; do tail -n 30 "$RESULTS_DIR/build-$label.log"; done
  exit 1
fi

status=0
for k in "${!commands[@]}"; do
  for round in $(seq "$ROUNDS"); do
    for i in "${!trees[@]}"; do
      tree=${trees[$i]} label=${labels[$i]}
      log="$RESULTS_DIR/cmd$k-$round-$label.log"
      echo "=== [$label, round $round] ${commands[$k]}"
      if ! (cd "$tree" && PYTHONPATH="$tree" timeout 400 bash -c "${commands[$k]}") >"$log" 2>&1; then
        echo "=== FAILED"
        status=1
      fi
      tail -n 12 "$log"
    done
  done
done
exit $status
