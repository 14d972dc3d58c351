#!/usr/bin/env bash
# Rebuilds the torch extension in place (mistral_ext/_C*.so) for development; serialised with a
# lock so that several builds started at once do not trample each other.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/mistral_ext_build.lock python3 setup.py -q build_ext --inplace -j 2
