// Shared by the CPU and CUDA rotary kernels: argument checks and the inverse frequencies.
#pragma once

#include <cmath>

#include "common.h"

namespace mistral_ext {

inline void check_rotary_params(const RotaryParams& p) {
  require(p.tokens >= 0, "rotary_embedding: tokens must be >= 0");
  require(p.head_dim >= 2 && p.head_dim % 2 == 0 && p.head_dim <= 256,
          "rotary_embedding: head_dim must be even and at most 256, got " + std::to_string(p.head_dim));
  require(p.num_heads > 0 && p.num_kv_heads > 0, "rotary_embedding: head counts must be > 0");
  require(p.theta > 0.f, "rotary_embedding: theta must be > 0");
}

// theta^(-2i/D) computed in double and rounded once to fp32 (what transformers gets from
// 1 / theta ** (arange(0, D, 2) / D) in fp32, up to the last bit).
inline float rope_inv_freq(int32_t i, int32_t head_dim, float theta) {
  return static_cast<float>(1.0 / std::pow(static_cast<double>(theta), (2.0 * i) / static_cast<double>(head_dim)));
}

// inv_freq[i] = rope_inv_freq(i, head_dim, theta) for i < head_dim / 2.
inline void fill_rope_inv_freq(float* inv_freq, int32_t head_dim, float theta) {
  for (int32_t i = 0; i < head_dim / 2; ++i) inv_freq[i] = rope_inv_freq(i, head_dim, theta);
}

}  // namespace mistral_ext
