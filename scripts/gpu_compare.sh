#!/usr/bin/env bash
# Before and after of a speed change from one GPU machine and one run: builds the extension of
# this tree and of BASE (another checkout of the project, e.g. the commit before the change) side
# by side, then runs the same timing commands on each, alternating (base, this, base, this) so that
# drift in clocks or temperature shows up as spread rather than as a difference.
#   bash scripts/gpu_compare.sh BASE [COMMAND ...]
# Each COMMAND is one shell string, run from the tree's directory with PYTHONPATH set to it. The
# default commands time decode attention alone, the attention microbenchmark and the model (ours
# only). Logs go to $RESULTS_DIR (default gpu-results/compare): NAME-K-base.log and NAME-K-this.log
# for command K; a summary of the runs' last lines is printed.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 1 || ! -f "$1/setup.py" ]]; then
  echo "usage: $0 BASE [COMMAND ...]   (BASE: a checkout of the project)" >&2
  exit 2
fi
base=$(cd "$1" && pwd)
this=$(pwd)
shift
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
build "$base" base &
base_pid=$!
build "$this" this
this_status=$?
wait "$base_pid"
base_status=$?
if [[ $base_status -ne 0 || $this_status -ne 0 ]]; then
  echo "=== build FAILED (base: exit $base_status, this: exit $this_status)"
  tail -n 30 "$RESULTS_DIR/build-base.log" "$RESULTS_DIR/build-this.log"
  exit 1
fi

status=0
for k in "${!commands[@]}"; do
  for round in $(seq "$ROUNDS"); do
    for label in base this; do
      tree=$base
      [[ $label == this ]] && tree=$this
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
