#!/usr/bin/env bash
# Everything a GPU machine must confirm, in one run: builds the extension with the CUDA kernels,
# runs ctest (CUDA kernels vs CPU kernels), the CUDA pytest cases, the attention microbenchmark
# and the model benchmark. Logs and JSON figures go to $RESULTS_DIR (default ./gpu-results).
#   bash scripts/gpu_check.sh [--quick]    # --quick: tests only, no benchmarks
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR=${RESULTS_DIR:-gpu-results}
mkdir -p "$RESULTS_DIR"
export PYTHONUNBUFFERED=1
status=0
run() {  # run NAME CMD...: logs to $RESULTS_DIR/NAME.log, keeps going on failure
  local name=$1
  shift
  echo "=== $name"
  local start=$SECONDS
  if "$@" >"$RESULTS_DIR/$name.log" 2>&1; then
    echo "=== $name: ok in $((SECONDS - start)) s"
  else
    echo "=== $name: FAILED in $((SECONDS - start)) s"
    status=1
  fi
  tail -n 25 "$RESULTS_DIR/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run build env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS=16 \
  python3 -m pip install --no-build-isolation --no-deps -e .
python3 -c "import mistral_ext; assert mistral_ext.cuda_kernels_available(), 'no CUDA kernels in the build'" || exit 1
run ctest bash -c 'cmake -S . -B /tmp/build-gpu -DCMAKE_CUDA_ARCHITECTURES=90a -DMISTRAL_EXT_CUDA=ON \
  && cmake --build /tmp/build-gpu -j 16 && ctest --test-dir /tmp/build-gpu --output-on-failure'
run pytest-cuda python3 -m pytest -q -x tests/test_ops.py tests/test_attention.py tests/test_model.py \
  tests/test_generation.py -k cuda
if [[ "${1:-}" != "--quick" ]]; then
  run bench-attention python3 -m mistral_ext.bench_attention --json "$RESULTS_DIR/bench_attention.json"
  run bench python3 -m mistral_ext.cli bench --json "$RESULTS_DIR/bench.json"
fi
exit $status
