// The CPU cache write of one token, shared by kv_cache_cpu.cpp and rotary_cache_write_cpu.cpp.
#pragma once

#include <cstring>

#include "common.h"
#include "kv_cache_common.h"

namespace mistral_ext {

// Copies the k and v of token `token` (= b * tokens + t) to its ring-buffer slot, unless
// kv_cache_slot skips it. elem_size: dtype_size(p.dtype), computed once by the caller (it throws
// for an unknown dtype, which must not happen inside a parallel region).
inline void kv_cache_write_token_cpu(const KvCacheWriteParams& p, int64_t token, size_t elem_size) {
  const int64_t token_elems = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
  const int64_t dst = kv_cache_offset(p.positions, token, p.tokens, p.capacity, token_elems);
  if (dst < 0) return;
  const size_t token_bytes = static_cast<size_t>(token_elems) * elem_size;
  std::memcpy(static_cast<char*>(p.k_cache) + dst * elem_size,
              static_cast<const char*>(p.k) + token * p.k_token_stride * elem_size, token_bytes);
  std::memcpy(static_cast<char*>(p.v_cache) + dst * elem_size,
              static_cast<const char*>(p.v) + token * p.v_token_stride * elem_size, token_bytes);
}

}  // namespace mistral_ext
