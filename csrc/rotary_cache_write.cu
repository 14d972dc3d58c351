// Fused RoPE + ring-buffer KV-cache write on CUDA, one launch: every token is rotated in place
// exactly as rotary_embedding_cuda does (q and k, rotate-half layout), then its rotated k and its
// v go to slot position % capacity of its row's buffers exactly as kv_cache_write_cuda does.
// Padding (negative position) is left as it is and not written; a token that a later token of
// the call overwrites is rotated but not written. One block per token: cos/sin once into shared
// memory, then the block rotates the q and k heads, storing k both in place and in the cache
// slot, and copies v to the slot; k is read once instead of twice. With overlap_previous the
// launch may overlap the kernel before it, which the blocks wait for before reading anything.
#include <algorithm>

#include "cuda_common.cuh"
#include "kv_cache_common.h"
#include "rotary_cache_write_common.h"
#include "rotary_cuda.cuh"

namespace mistral_ext {
namespace {

constexpr int kMaxThreads = 256;

template <typename T, int W>
__global__ void __launch_bounds__(kMaxThreads) rotary_cache_write_kernel(
    T* q,                                   // [batch * tokens, num_heads, head_dim], token stride q_token_stride
    int64_t q_token_stride,
    T* k,                                   // [batch * tokens, num_kv_heads, head_dim], token stride k_token_stride
    int64_t k_token_stride,
    const T* __restrict__ v,                // [batch * tokens, num_kv_heads, head_dim], token stride v_token_stride
    int64_t v_token_stride,
    T* __restrict__ k_cache,                // [batch, capacity, num_kv_heads, head_dim]
    T* __restrict__ v_cache,                // [batch, capacity, num_kv_heads, head_dim]
    const int64_t* __restrict__ positions,  // [batch, tokens]
    int tokens, int capacity, int num_heads, int num_kv_heads, int head_dim, const RopeInvFreq inv_freq) {
  __shared__ float cos_s[kRopeMaxHalf];
  __shared__ float sin_s[kRopeMaxHalf];
  allow_next_kernel_launch();
  wait_for_previous_kernel();  // q, k, v and the positions may be its output
  const int64_t token = blockIdx.x;  // b * tokens + t
  const int64_t position = positions[token];
  if (position < 0) return;  // the same for the whole block, so no thread misses the barrier
  const int64_t token_elems = static_cast<int64_t>(num_kv_heads) * head_dim;
  const int64_t dst = kv_cache_offset(positions, token, tokens, capacity, token_elems);
  rope_cos_sin(position, inv_freq, head_dim / 2, cos_s, sin_s);
  __syncthreads();
  rope_rotate_token<T, W>(q + token * q_token_stride, k + token * k_token_stride, dst < 0 ? nullptr : k_cache + dst,
                          num_heads, num_kv_heads, head_dim, cos_s, sin_s);
  if (dst >= 0) block_copy<W>(v_cache + dst, v + token * v_token_stride, token_elems);
}

}  // namespace

void rotary_embedding_cache_write_cuda(const RotaryCacheWriteParams& p, CudaStream stream) {
  check_rotary_cache_write_params(p);
  const RotaryParams& r = p.rotary;
  const KvCacheWriteParams& c = p.cache;
  require(r.tokens <= kMaxGridX, "rotary_embedding_cache_write: at most 2^31 - 1 tokens per call on CUDA");
  if (r.tokens == 0) return;
  const int half = r.head_dim / 2;
  const int64_t token_elems = static_cast<int64_t>(r.num_kv_heads) * r.head_dim;
  const RopeInvFreq inv_freq = make_rope_inv_freq(r.head_dim, r.theta);
  dispatch_cuda_dtype(r.dtype, [&](auto tag) {
    using T = decltype(tag);
    // Cache slots start at multiples of token_elems, a multiple of half.
    const bool packed = packs_fit<T>({r.q, r.k, c.v, c.k_cache, c.v_cache},
                                     {half, r.q_token_stride, r.k_token_stride, c.v_token_stride});
    dispatch_pack_width<T>(packed, [&](auto width) {
      constexpr int W = decltype(width)::value;
      const int64_t items = std::max(static_cast<int64_t>(r.num_heads + r.num_kv_heads) * (half / W), token_elems / W);
      launch_kernel(rotary_cache_write_kernel<T, W>, dim3(static_cast<unsigned>(r.tokens)),
                    dim3(block_threads(items, kMaxThreads)), 0, stream, p.overlap_previous, static_cast<T*>(r.q),
                    r.q_token_stride, static_cast<T*>(r.k), r.k_token_stride, static_cast<const T*>(c.v),
                    c.v_token_stride, static_cast<T*>(c.k_cache), static_cast<T*>(c.v_cache), r.positions, c.tokens,
                    c.capacity, r.num_heads, r.num_kv_heads, r.head_dim, inv_freq);
    });
  });
  check_launch("rotary_embedding_cache_write");
}

}  // namespace mistral_ext
