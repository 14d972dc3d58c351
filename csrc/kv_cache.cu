// Ring-buffer KV-cache write on CUDA: the k/v of token t of row b are copied to slot
// positions[b, t] % capacity of that row's buffers ([batch, capacity, kv_heads, head_dim]).
// Padding (negative position) is skipped, and so is any token that a later token of the same
// call would overwrite, so a chunk longer than the buffer leaves exactly its last `capacity`.
// One block per token copies its kv_heads * head_dim elements of k and of v, 16 bytes at a time
// where the layout allows.
#include "cuda_common.cuh"
#include "kv_cache_common.h"

namespace mistral_ext {
namespace {

constexpr int kMaxThreads = 256;

template <typename T, int W>
__global__ void __launch_bounds__(kMaxThreads) kv_cache_write_kernel(
    T* __restrict__ k_cache,                // [batch, capacity, kv_heads, head_dim]
    T* __restrict__ v_cache,                // [batch, capacity, kv_heads, head_dim]
    const T* __restrict__ k,                // [batch, tokens, kv_heads, head_dim], token stride k_token_stride
    int64_t k_token_stride,
    const T* __restrict__ v,                // same shape, token stride v_token_stride
    int64_t v_token_stride,
    const int64_t* __restrict__ positions,  // [batch, tokens]
    int tokens, int capacity, int64_t token_elems) {
  const int64_t token = blockIdx.x;  // b * tokens + t
  const int64_t dst = kv_cache_offset(positions, token, tokens, capacity, token_elems);
  if (dst < 0) return;
  block_copy<W>(k_cache + dst, k + token * k_token_stride, token_elems);
  block_copy<W>(v_cache + dst, v + token * v_token_stride, token_elems);
}

}  // namespace

void kv_cache_write_cuda(const KvCacheWriteParams& p, CudaStream stream) {
  check_kv_cache_write_params(p);
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.tokens;
  require(blocks <= kMaxGridX, "kv_cache_write: at most 2^31 - 1 tokens per call on CUDA");
  if (blocks == 0) return;
  const int64_t token_elems = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
  dispatch_cuda_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool packed =
        packs_fit<T>({p.k, p.v, p.k_cache, p.v_cache}, {token_elems, p.k_token_stride, p.v_token_stride});
    dispatch_pack_width<T>(packed, [&](auto width) {
      constexpr int W = decltype(width)::value;
      kv_cache_write_kernel<T, W><<<static_cast<unsigned>(blocks), block_threads(token_elems / W, kMaxThreads), 0,
                                    stream>>>(
          static_cast<T*>(p.k_cache), static_cast<T*>(p.v_cache), static_cast<const T*>(p.k), p.k_token_stride,
          static_cast<const T*>(p.v), p.v_token_stride, p.positions, p.tokens, p.capacity, token_elems);
    });
  });
  check_launch("kv_cache_write");
}

}  // namespace mistral_ext
