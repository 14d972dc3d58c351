// Shared by the CPU and CUDA RMSNorm kernels: argument checks.
#pragma once

#include <cstdint>

#include "common.h"

namespace mistral_ext {

inline void check_rms_norm_sizes(int64_t rows, int64_t hidden) {
  require(rows >= 0, "rms_norm: rows must be >= 0");
  require(hidden > 0, "rms_norm: hidden size must be > 0");
}

}  // namespace mistral_ext
