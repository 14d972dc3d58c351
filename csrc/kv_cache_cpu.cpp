// Ring-buffer KV-cache write on the CPU: the k/v of token t of row b are copied to slot
// positions[b, t] % capacity of that row's buffers ([batch, capacity, kv_heads, head_dim]).
// Padding (negative position) is skipped, and so is any token that a later token of the same
// call would overwrite, so a chunk longer than the buffer leaves exactly its last `capacity`.
#include "common.h"
#include "kv_cache_common.h"
#include "kv_cache_cpu.h"

namespace mistral_ext {

void kv_cache_write_cpu(const KvCacheWriteParams& p) {
  check_kv_cache_write_params(p);
  const size_t elem_size = dtype_size(p.dtype);
  const int64_t tokens = int64_t{p.batch} * p.tokens;
#pragma omp parallel for if (worth_threading(tokens * p.num_kv_heads * p.head_dim))
  for (int64_t token = 0; token < tokens; ++token) kv_cache_write_token_cpu(p, token, elem_size);
}

}  // namespace mistral_ext
