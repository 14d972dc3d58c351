// Rotary position embedding on the CPU, in place on q and k (rotate-half layout):
// for i < D/2, with angle = position * inv_freq[i] and inv_freq[i] = theta^(-2i/D) in fp32,
//   (x[i], x[i+D/2]) <- (x[i] cos - x[i+D/2] sin, x[i+D/2] cos + x[i] sin).
// Tokens with a negative position (padding) are left as they are.
#include <vector>

#include "common.h"
#include "rotary_common.h"
#include "rotary_cpu.h"

namespace mistral_ext {

void rotary_embedding_cpu(const RotaryParams& p) {
  check_rotary_params(p);
  const int32_t half = p.head_dim / 2;
  std::vector<float> inv_freq(half);
  fill_rope_inv_freq(inv_freq.data(), p.head_dim, p.theta);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
#pragma omp parallel if (worth_threading(p.tokens * (p.num_heads + p.num_kv_heads) * p.head_dim))
    {
      std::vector<float> cos(half), sin(half);
#pragma omp for
      for (int64_t t = 0; t < p.tokens; ++t)
        if (p.positions[t] >= 0) rope_rotate_token<T>(p, t, inv_freq.data(), cos.data(), sin.data());
    }
  });
}

}  // namespace mistral_ext
