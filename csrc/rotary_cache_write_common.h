// Shared by the CPU and CUDA fused RoPE + cache-write kernels: argument checks (those of the two
// ops it fuses, and that both halves describe the same tokens).
#pragma once

#include "common.h"
#include "kv_cache_common.h"
#include "rotary_common.h"

namespace mistral_ext {

inline void check_rotary_cache_write_params(const RotaryCacheWriteParams& p) {
  const RotaryParams& r = p.rotary;
  const KvCacheWriteParams& c = p.cache;
  check_rotary_params(r);
  check_kv_cache_write_params(c);
  require(r.dtype == c.dtype, "rotary_embedding_cache_write: rotary.dtype and cache.dtype differ");
  require(r.k == c.k && r.k_token_stride == c.k_token_stride,
          "rotary_embedding_cache_write: cache.k and its token stride must be rotary.k's (the rotated key)");
  require(r.positions == c.positions, "rotary_embedding_cache_write: rotary and cache must share positions");
  require(r.tokens == int64_t{c.batch} * c.tokens,
          "rotary_embedding_cache_write: rotary.tokens must be cache.batch * cache.tokens");
  require(r.num_kv_heads == c.num_kv_heads && r.head_dim == c.head_dim,
          "rotary_embedding_cache_write: rotary and cache must agree on num_kv_heads and head_dim");
}

}  // namespace mistral_ext
