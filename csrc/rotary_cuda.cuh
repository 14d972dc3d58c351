// Device helpers shared by the CUDA rotary kernels (rotary.cu, rotary_cache_write.cu): the inverse
// frequencies passed by value, a token's cos/sin in shared memory, the rotation of a token's heads.
#pragma once

#include "cuda_common.cuh"
#include "rotary_common.h"

namespace mistral_ext {

inline constexpr int kRopeMaxHalf = 128;  // head_dim <= 256

// Inverse frequencies computed on the host (fill_rope_inv_freq, as the CPU kernel), passed by value.
struct RopeInvFreq {
  float v[kRopeMaxHalf];
};

inline RopeInvFreq make_rope_inv_freq(int32_t head_dim, float theta) {
  RopeInvFreq inv_freq{};
  fill_rope_inv_freq(inv_freq.v, head_dim, theta);
  return inv_freq;
}

// The block fills cos_s and sin_s ([head_dim / 2], shared memory) for one token; the caller
// syncs before reading them. Precise sincosf: positions reach 1e5 radians and beyond.
__device__ __forceinline__ void rope_cos_sin(int64_t position, const RopeInvFreq& inv_freq, int half, float* cos_s,
                                             float* sin_s) {
  for (int i = threadIdx.x; i < half; i += blockDim.x)
    sincosf(static_cast<float>(position) * inv_freq.v[i], &sin_s[i], &cos_s[i]);
}

// The block rotates every q and k head of one token in place, W pairs per step and thread. The
// rotated k heads also go to k_copy unless it is null (a cache slot: one write of k fewer than
// rotating and then copying).
template <typename T, int W>
__device__ __forceinline__ void rope_rotate_token(T* q,       // [num_heads, head_dim]
                                                  T* k,       // [num_kv_heads, head_dim]
                                                  T* k_copy,  // [num_kv_heads, head_dim] or null
                                                  int num_heads, int num_kv_heads, int head_dim,
                                                  const float* cos_s, const float* sin_s) {
  const int half = head_dim / 2;
  const int packs_per_head = half / W;
  const int items = (num_heads + num_kv_heads) * packs_per_head;
  for (int item = threadIdx.x; item < items; item += blockDim.x) {
    const int head = item / packs_per_head;
    const int i = (item % packs_per_head) * W;
    const bool is_k = head >= num_heads;
    const int64_t offset = static_cast<int64_t>(is_k ? head - num_heads : head) * head_dim;
    T* x = (is_k ? k : q) + offset;
    const Pack<T, W> lo = load_pack<W>(x + i);
    const Pack<T, W> hi = load_pack<W>(x + half + i);
    Pack<T, W> lo_out, hi_out;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const float x1 = to_f32(lo.v[j]);
      const float x2 = to_f32(hi.v[j]);
      // Each product rounded on its own (no fused multiply-add the compiler may or may not
      // form in one kernel and not the other): both rotary kernels give the same bits.
      lo_out.v[j] = from_f32<T>(__fsub_rn(__fmul_rn(x1, cos_s[i + j]), __fmul_rn(x2, sin_s[i + j])));
      hi_out.v[j] = from_f32<T>(__fadd_rn(__fmul_rn(x2, cos_s[i + j]), __fmul_rn(x1, sin_s[i + j])));
    }
    store_pack<W>(x + i, lo_out);
    store_pack<W>(x + half + i, hi_out);
    if (is_k && k_copy != nullptr) {
      store_pack<W>(k_copy + offset + i, lo_out);
      store_pack<W>(k_copy + offset + half + i, hi_out);
    }
  }
}

}  // namespace mistral_ext
