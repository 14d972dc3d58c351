// Rotary position embedding on the CPU, in place on q and k (rotate-half layout):
// for i < D/2, with angle = position * inv_freq[i] and inv_freq[i] = theta^(-2i/D) in fp32,
//   (x[i], x[i+D/2]) <- (x[i] cos - x[i+D/2] sin, x[i+D/2] cos + x[i] sin).
// Tokens with a negative position (padding) are left as they are.
#include <cmath>
#include <vector>

#include "common.h"
#include "rotary_common.h"

namespace mistral_ext {
namespace {

template <typename T>
void rotate_heads(T* x, int32_t heads, int32_t head_dim, const float* cos, const float* sin) {
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

}  // namespace

void rotary_embedding_cpu(const RotaryParams& p) {
  check_rotary_params(p);
  const int32_t half = p.head_dim / 2;
  std::vector<float> inv_freq(half);
  for (int32_t i = 0; i < half; ++i) inv_freq[i] = rope_inv_freq(i, p.head_dim, p.theta);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    T* q = static_cast<T*>(p.q);
    T* k = static_cast<T*>(p.k);
#pragma omp parallel if (worth_threading(p.tokens * (p.num_heads + p.num_kv_heads) * p.head_dim))
    {
      std::vector<float> cos(half), sin(half);
#pragma omp for
      for (int64_t t = 0; t < p.tokens; ++t) {
        const int64_t position = p.positions[t];
        if (position < 0) continue;
        for (int32_t i = 0; i < half; ++i) {
          const float angle = static_cast<float>(position) * inv_freq[i];
          cos[i] = std::cos(angle);
          sin[i] = std::sin(angle);
        }
        rotate_heads(q + t * p.q_token_stride, p.num_heads, p.head_dim, cos.data(), sin.data());
        rotate_heads(k + t * p.k_token_stride, p.num_kv_heads, p.head_dim, cos.data(), sin.data());
      }
    }
  });
}

}  // namespace mistral_ext
