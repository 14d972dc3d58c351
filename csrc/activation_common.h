// Shared by the CPU and CUDA activation kernels: argument checks.
#pragma once

#include "common.h"

namespace mistral_ext {

inline void check_silu_and_mul_params(const SiluAndMulParams& p) {
  require(p.rows >= 0 && p.inter > 0, "silu_and_mul: sizes must be positive");
}

}  // namespace mistral_ext
