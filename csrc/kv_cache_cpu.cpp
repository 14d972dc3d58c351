// Ring-buffer KV-cache write on the CPU: the k/v of token t of row b are copied to slot
// positions[b, t] % capacity of that row's buffers ([batch, capacity, kv_heads, head_dim]).
// Padding (negative position) is skipped, and so is any token that a later token of the same
// call would overwrite, so a chunk longer than the buffer leaves exactly its last `capacity`.
#include <cstring>

#include "common.h"
#include "kv_cache_common.h"

namespace mistral_ext {

void kv_cache_write_cpu(const KvCacheWriteParams& p) {
  check_kv_cache_write_params(p);
  const size_t elem = dtype_size(p.dtype);
  const int64_t token_elems = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
  const size_t token_bytes = static_cast<size_t>(token_elems) * elem;
  const char* k = static_cast<const char*>(p.k);
  const char* v = static_cast<const char*>(p.v);
  char* k_cache = static_cast<char*>(p.k_cache);
  char* v_cache = static_cast<char*>(p.v_cache);
#pragma omp parallel for collapse(2) if (worth_threading(int64_t{p.batch} * p.tokens * token_elems))
  for (int32_t b = 0; b < p.batch; ++b) {
    for (int32_t t = 0; t < p.tokens; ++t) {
      const int64_t row = static_cast<int64_t>(b) * p.tokens;
      const int64_t slot = kv_cache_slot(p.positions[row + t], p.positions[row + p.tokens - 1], p.capacity);
      if (slot < 0) continue;
      const int64_t dst = (static_cast<int64_t>(b) * p.capacity + slot) * token_elems;
      std::memcpy(k_cache + dst * elem, k + (row + t) * p.k_token_stride * elem, token_bytes);
      std::memcpy(v_cache + dst * elem, v + (row + t) * p.v_token_stride * elem, token_bytes);
    }
  }
}

}  // namespace mistral_ext
