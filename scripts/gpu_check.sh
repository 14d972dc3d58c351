#!/usr/bin/env bash
# Everything a GPU machine must confirm, in one run: builds the extension with the CUDA kernels,
# runs ctest (CUDA kernels vs CPU kernels), the CUDA pytest cases, compute-sanitizer, the attention
# microbenchmark, the model benchmark (512- and 4096-token prompts, the latter also with the
# Hopper attention kernel turned off), the GEMV benchmark and kernel-by-kernel profiles of prefill and decode.
# Logs and JSON figures go to $RESULTS_DIR (default ./gpu-results).
#   bash scripts/gpu_check.sh [--quick | --bench | --profile]
#     --quick: tests only; --bench: benchmarks only; --profile: profiles only
# BENCH_ARGS adds arguments to the model benchmark (e.g. "--new-tokens 64 --repeats 2").
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
case "$mode" in all | --quick | --bench | --profile) ;; *) echo "usage: $0 [--quick | --bench | --profile]" >&2; exit 2 ;; esac
RESULTS_DIR=${RESULTS_DIR:-gpu-results}
BENCH_ARGS=${BENCH_ARGS:-}
mkdir -p "$RESULTS_DIR"
export PYTHONUNBUFFERED=1
status=0
run() {  # run NAME SECONDS CMD...: logs to $RESULTS_DIR/NAME.log, stops CMD after SECONDS, keeps going
  local name=$1 limit=$2
  shift 2
  echo "=== $name"
  local start=$SECONDS
  if timeout "$limit" "$@" >"$RESULTS_DIR/$name.log" 2>&1; then
    echo "=== $name: ok in $((SECONDS - start)) s"
  else
    echo "=== $name: FAILED in $((SECONDS - start)) s"
    status=1
  fi
  tail -n 25 "$RESULTS_DIR/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# Build with the system compiler torch was built against: a toolchain that links libstdc++
# statically into the extension (one image's /opt/gcc did) crashes on the first error message.
if [[ -x /usr/bin/g++ ]]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
# The CMake build (C++ tests) compiles beside the extension build.
if [[ "$mode" == all || "$mode" == --quick ]]; then
  (cmake -S . -B /tmp/build-gpu -DCMAKE_CUDA_ARCHITECTURES=90a -DMISTRAL_EXT_CUDA=ON \
    && cmake --build /tmp/build-gpu -j 8) >"$RESULTS_DIR/cmake.log" 2>&1 &
  cmake_pid=$!
fi
run build 300 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS=8 \
  python3 -m pip install --no-build-isolation --no-deps -e .
python3 -c "import mistral_ext; assert mistral_ext.cuda_kernels_available(), 'no CUDA kernels in the build'" || exit 1
if [[ "$mode" == all || "$mode" == --quick ]]; then
  wait "$cmake_pid" || { echo "=== cmake build FAILED"; tail -n 25 "$RESULTS_DIR/cmake.log"; status=1; }
  run ctest 300 ctest --test-dir /tmp/build-gpu --output-on-failure
  run pytest-cuda 300 python3 -m pytest -q tests/test_ops.py tests/test_attention.py tests/test_model.py \
    tests/test_generation.py -k cuda
  # Out-of-bounds accesses and races the comparisons above could miss.
  run sanitizer 120 compute-sanitizer --error-exitcode 1 /tmp/build-gpu/tests/cpp/test_attention
  run sanitizer-kernels 120 compute-sanitizer --error-exitcode 1 /tmp/build-gpu/tests/cpp/test_kernels
fi
if [[ "$mode" == all || "$mode" == --bench ]]; then
  run bench-attention 200 python3 -m mistral_ext.bench_attention --json "$RESULTS_DIR/bench_attention.json"
  # shellcheck disable=SC2086
  run bench 400 python3 -m mistral_ext.cli bench --json "$RESULTS_DIR/bench.json" $BENCH_ARGS
  run bench-prefill-4096 200 python3 -m mistral_ext.cli bench --prompt-len 4096 --new-tokens 8 --batch 2 \
    --json "$RESULTS_DIR/bench_prefill_4096.json"
  # The same prompt with the Hopper attention kernel turned off (ours only).
  run bench-prefill-4096-mma 120 env MISTRAL_EXT_SM90_ATTENTION=0 python3 -m mistral_ext.cli bench \
    --prompt-len 4096 --new-tokens 8 --batch 2 --no-peers --json "$RESULTS_DIR/bench_prefill_4096_mma.json"
  run bench-linear 150 python3 scripts/bench_linear.py --rows 1 2 4 16
fi
if [[ "$mode" == all || "$mode" == --profile ]]; then
  run profile 200 python3 scripts/profile_step.py --json "$RESULTS_DIR/profile.json"
  run profile-4096 200 python3 scripts/profile_step.py --prompt-len 4096 --steps 8 \
    --json "$RESULTS_DIR/profile_4096.json"
  run profile-4096-mma 200 env MISTRAL_EXT_SM90_ATTENTION=0 python3 scripts/profile_step.py --prompt-len 4096 \
    --steps 8 --json "$RESULTS_DIR/profile_4096_mma.json"
fi
exit $status
