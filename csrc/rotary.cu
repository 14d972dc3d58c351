// Rotary position embedding on CUDA, in place on q and k (rotate-half layout):
// for i < D/2, with angle = position * inv_freq[i] and inv_freq[i] = theta^(-2i/D) in fp32,
//   (x[i], x[i+D/2]) <- (x[i] cos - x[i+D/2] sin, x[i+D/2] cos + x[i] sin).
// Tokens with a negative position (padding) are left as they are. One block per token: its
// cos/sin are computed once (precise sincosf: positions reach 1e5 radians and beyond) into
// shared memory, then the block rotates every q and k head of the token.
#include "cuda_common.cuh"
#include "rotary_common.h"

namespace mistral_ext {
namespace {

constexpr int kMaxHalf = 128;  // head_dim <= 256
constexpr int kMaxThreads = 256;

// Inverse frequencies computed on the host (rope_inv_freq, as the CPU kernel), passed by value.
struct InvFreq {
  float v[kMaxHalf];
};

template <typename T, int W>
__global__ void __launch_bounds__(kMaxThreads)
    rotary_kernel(T* q,                                    // [tokens, num_heads, head_dim], token stride q_token_stride
                  int64_t q_token_stride,
                  T* k,                                    // [tokens, num_kv_heads, head_dim], token stride k_token_stride
                  int64_t k_token_stride,
                  const int64_t* __restrict__ positions,  // [tokens]
                  int num_heads, int num_kv_heads, int head_dim, const InvFreq inv_freq) {
  __shared__ float cos_s[kMaxHalf];
  __shared__ float sin_s[kMaxHalf];
  const int64_t token = blockIdx.x;
  const int64_t position = positions[token];
  if (position < 0) return;  // the same for the whole block, so no thread misses the barrier
  const int half = head_dim / 2;
  for (int i = threadIdx.x; i < half; i += blockDim.x)
    sincosf(static_cast<float>(position) * inv_freq.v[i], &sin_s[i], &cos_s[i]);
  __syncthreads();

  const int packs_per_head = half / W;
  const int items = (num_heads + num_kv_heads) * packs_per_head;
  for (int item = threadIdx.x; item < items; item += blockDim.x) {
    const int head = item / packs_per_head;
    const int i = (item % packs_per_head) * W;
    T* x = head < num_heads ? q + token * q_token_stride + static_cast<int64_t>(head) * head_dim
                            : k + token * k_token_stride + static_cast<int64_t>(head - num_heads) * head_dim;
    const Pack<T, W> lo = load_pack<W>(x + i);
    const Pack<T, W> hi = load_pack<W>(x + half + i);
    Pack<T, W> lo_out, hi_out;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const float x1 = to_f32(lo.v[j]);
      const float x2 = to_f32(hi.v[j]);
      lo_out.v[j] = from_f32<T>(x1 * cos_s[i + j] - x2 * sin_s[i + j]);
      hi_out.v[j] = from_f32<T>(x2 * cos_s[i + j] + x1 * sin_s[i + j]);
    }
    store_pack<W>(x + i, lo_out);
    store_pack<W>(x + half + i, hi_out);
  }
}

}  // namespace

void rotary_embedding_cuda(const RotaryParams& p, CudaStream stream) {
  check_rotary_params(p);
  require(p.tokens <= kMaxGridX, "rotary_embedding: at most 2^31 - 1 tokens per call on CUDA");
  if (p.tokens == 0) return;
  const int half = p.head_dim / 2;
  InvFreq inv_freq{};
  for (int i = 0; i < half; ++i) inv_freq.v[i] = rope_inv_freq(i, p.head_dim, p.theta);
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
