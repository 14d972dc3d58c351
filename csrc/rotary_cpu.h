// The CPU rotation of one token, shared by rotary_cpu.cpp and rotary_cache_write_cpu.cpp.
#pragma once

#include <cmath>

#include "common.h"

namespace mistral_ext {

// Rotates `heads` consecutive heads in place with one token's cos and sin ([head_dim / 2] each).
template <typename T>
void rope_rotate_heads(T* x,  // [heads, head_dim]
                       int32_t heads, int32_t head_dim, const float* cos, const float* sin) {
  const int32_t half = head_dim / 2;
  for (int32_t h = 0; h < heads; ++h) {
    T* head = x + static_cast<int64_t>(h) * head_dim;
    for (int32_t i = 0; i < half; ++i) {
      const float x1 = to_float(head[i]);
      const float x2 = to_float(head[i + half]);
      head[i] = from_float<T>(x1 * cos[i] - x2 * sin[i]);
      head[i + half] = from_float<T>(x2 * cos[i] + x1 * sin[i]);
    }
  }
}

// Rotates every q and k head of token t of p in place; its position must be >= 0.
// inv_freq: [head_dim / 2]; cos, sin: scratch of head_dim / 2 floats each.
template <typename T>
void rope_rotate_token(const RotaryParams& p, int64_t t, const float* inv_freq, float* cos, float* sin) {
  const int32_t half = p.head_dim / 2;
  for (int32_t i = 0; i < half; ++i) {
    const float angle = static_cast<float>(p.positions[t]) * inv_freq[i];
    cos[i] = std::cos(angle);
    sin[i] = std::sin(angle);
  }
  rope_rotate_heads(static_cast<T*>(p.q) + t * p.q_token_stride, p.num_heads, p.head_dim, cos, sin);
  rope_rotate_heads(static_cast<T*>(p.k) + t * p.k_token_stride, p.num_kv_heads, p.head_dim, cos, sin);
}

}  // namespace mistral_ext
