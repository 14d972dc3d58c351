// Shared by the CPU and CUDA linear kernels: argument checks.
#pragma once

#include <string>

#include "common.h"

namespace mistral_ext {

inline void check_linear_params(const LinearParams& p) {
  dtype_size(p.dtype);  // throws on an unknown tag
  require(p.rows >= 0 && p.rows <= kLinearMaxRows,
          "linear: rows must be in [0, " + std::to_string(kLinearMaxRows) + "], got " + std::to_string(p.rows));
  require(p.in_features > 0, "linear: in_features must be > 0");
  require(p.out_features >= 0, "linear: out_features must be >= 0");
  require(p.input_row_stride >= 0, "linear: input_row_stride must be >= 0");
  switch (p.prologue) {
    case LinearPrologue::kNone: break;
    case LinearPrologue::kRmsNorm:
      require(p.norm_weight != nullptr, "linear: the RMSNorm prologue needs norm_weight");
      break;
    case LinearPrologue::kSiluAndMul:
      require(p.rows <= 1 || p.input_row_stride >= 2 * p.in_features,
              "linear: with the SiLU-and-mul prologue input rows hold 2 * in_features values (gate | up); "
              "input_row_stride must be >= " + std::to_string(2 * p.in_features));
      break;
    default: require(false, "linear: unknown prologue " + std::to_string(static_cast<int>(p.prologue)));
  }
}

}  // namespace mistral_ext
