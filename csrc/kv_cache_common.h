// Shared by the CPU and CUDA cache-write kernels: argument checks, the slot rule and the slot's offset.
#pragma once

#include <cstdint>

#include "common.h"

namespace mistral_ext {

inline void check_kv_cache_write_params(const KvCacheWriteParams& p) {
  require(p.batch >= 0 && p.tokens >= 0, "kv_cache_write: batch and tokens must be >= 0");
  require(p.num_kv_heads > 0 && p.head_dim > 0, "kv_cache_write: kv_heads and head_dim must be > 0");
  require(p.capacity > 0, "kv_cache_write: capacity must be > 0");
}

// Slot for a token at `position`, or -1 when it is padding or when a later token of the same
// row (the last one being at `last_position`) lands on the same slot.
MISTRAL_EXT_HOST_DEVICE inline int64_t kv_cache_slot(int64_t position, int64_t last_position, int32_t capacity) {
  if (position < 0 || position <= last_position - capacity) return -1;
  return position % capacity;
}

// Element offset, in its row's buffer of [batch, capacity, kv_heads, head_dim], of the slot of
// token `token` (= b * tokens + t), or -1 when kv_cache_slot skips the token.
MISTRAL_EXT_HOST_DEVICE inline int64_t kv_cache_offset(const int64_t* positions,  // [batch, tokens]
                                                       int64_t token, int32_t tokens, int32_t capacity,
                                                       int64_t token_elems) {
  const int64_t b = token / tokens;
  const int64_t slot = kv_cache_slot(positions[token], positions[b * tokens + tokens - 1], capacity);
  return slot < 0 ? -1 : (b * capacity + slot) * token_elems;
}

}  // namespace mistral_ext
