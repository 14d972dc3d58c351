// Shared by the CPU and CUDA cache-write kernels: argument checks and the slot rule.
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

}  // namespace mistral_ext
