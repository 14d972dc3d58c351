// Fused RoPE + ring-buffer KV-cache write on the CPU, one pass over the tokens: each token is
// rotated in place exactly as rotary_embedding_cpu does (q and k, rotate-half layout), then its
// rotated k and its v are copied to slot position % capacity exactly as kv_cache_write_cpu does.
// Padding tokens (negative position) are left as they are and not written.
#include <vector>

#include "common.h"
#include "kv_cache_cpu.h"
#include "rotary_cache_write_common.h"
#include "rotary_cpu.h"

namespace mistral_ext {

void rotary_embedding_cache_write_cpu(const RotaryCacheWriteParams& p) {
  check_rotary_cache_write_params(p);
  const RotaryParams& r = p.rotary;
  const int32_t half = r.head_dim / 2;
  std::vector<float> inv_freq(half);
  fill_rope_inv_freq(inv_freq.data(), r.head_dim, r.theta);
  const size_t elem_size = dtype_size(r.dtype);
  dispatch_dtype(r.dtype, [&](auto tag) {
    using T = decltype(tag);
    // Work per token: q and k rotated, k and v copied.
#pragma omp parallel if (worth_threading(r.tokens * (r.num_heads + 3 * r.num_kv_heads) * r.head_dim))
    {
      std::vector<float> cos(half), sin(half);
#pragma omp for
      for (int64_t t = 0; t < r.tokens; ++t) {
        if (r.positions[t] < 0) continue;
        rope_rotate_token<T>(r, t, inv_freq.data(), cos.data(), sin.data());
        kv_cache_write_token_cpu(p.cache, t, elem_size);
      }
    }
  });
}

}  // namespace mistral_ext
