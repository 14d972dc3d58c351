// Rotary position embedding on CUDA, in place on q and k (rotate-half layout):
// for i < D/2, with angle = position * inv_freq[i] and inv_freq[i] = theta^(-2i/D) in fp32,
//   (x[i], x[i+D/2]) <- (x[i] cos - x[i+D/2] sin, x[i+D/2] cos + x[i] sin).
// Tokens with a negative position (padding) are left as they are. One block per token: its
// cos/sin are computed once into shared memory, then the block rotates every q and k head of
// the token (rotary_cuda.cuh).
#include "cuda_common.cuh"
#include "rotary_common.h"
#include "rotary_cuda.cuh"

namespace mistral_ext {
namespace {

constexpr int kMaxThreads = 256;

template <typename T, int W>
__global__ void __launch_bounds__(kMaxThreads) rotary_kernel(
    T* q,                                   // [tokens, num_heads, head_dim], token stride q_token_stride
    int64_t q_token_stride,
    T* k,                                   // [tokens, num_kv_heads, head_dim], token stride k_token_stride
    int64_t k_token_stride,
    const int64_t* __restrict__ positions,  // [tokens]
    int num_heads, int num_kv_heads, int head_dim, const RopeInvFreq inv_freq) {
  __shared__ float cos_s[kRopeMaxHalf];
  __shared__ float sin_s[kRopeMaxHalf];
  const int64_t token = blockIdx.x;
  const int64_t position = positions[token];
  if (position < 0) return;  // the same for the whole block, so no thread misses the barrier
  rope_cos_sin(position, inv_freq, head_dim / 2, cos_s, sin_s);
  __syncthreads();
  rope_rotate_token<T, W>(q + token * q_token_stride, k + token * k_token_stride, nullptr, num_heads, num_kv_heads,
                          head_dim, cos_s, sin_s);
}

}  // namespace

void rotary_embedding_cuda(const RotaryParams& p, CudaStream stream) {
  check_rotary_params(p);
  require(p.tokens <= kMaxGridX, "rotary_embedding: at most 2^31 - 1 tokens per call on CUDA");
  if (p.tokens == 0) return;
  const int half = p.head_dim / 2;
  const RopeInvFreq inv_freq = make_rope_inv_freq(p.head_dim, p.theta);
  dispatch_cuda_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool packed = packs_fit<T>({p.q, p.k}, {half, p.q_token_stride, p.k_token_stride});
    dispatch_pack_width<T>(packed, [&](auto width) {
      constexpr int W = decltype(width)::value;
      const int threads = block_threads(static_cast<int64_t>(p.num_heads + p.num_kv_heads) * (half / W), kMaxThreads);
      rotary_kernel<T, W><<<static_cast<unsigned>(p.tokens), threads, 0, stream>>>(
          static_cast<T*>(p.q), p.q_token_stride, static_cast<T*>(p.k), p.k_token_stride, p.positions, p.num_heads,
          p.num_kv_heads, p.head_dim, inv_freq);
    });
  });
  check_launch("rotary_embedding");
}

}  // namespace mistral_ext
