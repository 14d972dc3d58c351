// RMSNorm on CUDA: out = x / sqrt(mean(x^2) + eps) * weight per row, fp32 accumulation;
// and the fused variant that first adds the residual stream (the sum is rounded to the
// storage dtype, stored as residual_out, and that rounded sum is what gets normalised).
// One block per row: a first pass accumulates the sum of squares (warp shuffles, then across
// warps), a second pass re-reads the row (from L2) and writes the normalised values.
#include "cuda_common.cuh"
#include "rms_norm_common.h"

namespace mistral_ext {
namespace {

constexpr int kMaxThreads = 1024;

// Second pass of both kernels: out[i] = x[i] * inv_rms * weight[i] over W-element packs.
template <typename T, int W>
__device__ __forceinline__ void write_normalized(T* out, const T* x, const T* weight, int64_t packs, float inv_rms) {
  for (int64_t c = threadIdx.x; c < packs; c += blockDim.x) {
    const Pack<T, W> xv = load_pack<W>(x + c * W);
    const Pack<T, W> wv = load_pack<W>(weight + c * W);
    Pack<T, W> ov;
#pragma unroll
    for (int j = 0; j < W; ++j) ov.v[j] = from_f32<T>(to_f32(xv.v[j]) * inv_rms * to_f32(wv.v[j]));
    store_pack<W>(out + c * W, ov);
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(kMaxThreads)
    rms_norm_kernel(T* __restrict__ out,           // [rows, hidden]
                    const T* __restrict__ input,   // [rows, hidden], row stride input_row_stride
                    int64_t input_row_stride,
                    const T* __restrict__ weight,  // [hidden]
                    int64_t hidden, float eps) {
  const int64_t row = blockIdx.x;
  const T* x = input + row * input_row_stride;
  const int64_t packs = hidden / W;
  float sum_squares = 0.f;
  for (int64_t c = threadIdx.x; c < packs; c += blockDim.x) {
    const Pack<T, W> xv = load_pack<W>(x + c * W);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const float v = to_f32(xv.v[j]);
      sum_squares += v * v;
    }
  }
  write_normalized<T, W>(out + row * hidden, x, weight, packs, inverse_rms(block_sum(sum_squares), hidden, eps));
}

// residual and residual_out may alias, so neither is __restrict__: each thread reads back only
// the elements it wrote itself, which needs no synchronisation.
template <typename T, int W>
__global__ void __launch_bounds__(kMaxThreads)
    fused_add_rms_norm_kernel(T* __restrict__ out,           // [rows, hidden]
                              T* residual_out,               // [rows, hidden]
                              const T* __restrict__ input,   // [rows, hidden]
                              const T* residual,             // [rows, hidden]
                              const T* __restrict__ weight,  // [hidden]
                              int64_t hidden, float eps) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * hidden;
  const int64_t packs = hidden / W;
  float sum_squares = 0.f;
  for (int64_t c = threadIdx.x; c < packs; c += blockDim.x) {
    const Pack<T, W> xv = load_pack<W>(input + base + c * W);
    const Pack<T, W> rv = load_pack<W>(residual + base + c * W);
    Pack<T, W> sv;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      sv.v[j] = from_f32<T>(to_f32(xv.v[j]) + to_f32(rv.v[j]));
      const float v = to_f32(sv.v[j]);
      sum_squares += v * v;
    }
    store_pack<W>(residual_out + base + c * W, sv);
  }
  const float inv_rms = inverse_rms(block_sum(sum_squares), hidden, eps);
  write_normalized<T, W>(out + base, residual_out + base, weight, packs, inv_rms);
}

void check(int64_t rows, int64_t hidden) {
  check_rms_norm_sizes(rows, hidden);
  require(rows <= kMaxGridX, "rms_norm: at most 2^31 - 1 rows per call on CUDA");
}

}  // namespace

void rms_norm_cuda(const RmsNormParams& p, CudaStream stream) {
  check(p.rows, p.hidden);
  if (p.rows == 0) return;
  dispatch_cuda_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool packed = packs_fit<T>({p.input, p.weight, p.out}, {p.hidden, p.input_row_stride});
    dispatch_pack_width<T>(packed, [&](auto width) {
      constexpr int W = decltype(width)::value;
      const int threads = block_threads(p.hidden / W, kMaxThreads);
      rms_norm_kernel<T, W><<<static_cast<unsigned>(p.rows), threads, 0, stream>>>(
          static_cast<T*>(p.out), static_cast<const T*>(p.input), p.input_row_stride,
          static_cast<const T*>(p.weight), p.hidden, p.eps);
    });
  });
  check_launch("rms_norm");
}

void fused_add_rms_norm_cuda(const FusedAddRmsNormParams& p, CudaStream stream) {
  check(p.rows, p.hidden);
  if (p.rows == 0) return;
  dispatch_cuda_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool packed = packs_fit<T>({p.input, p.residual, p.weight, p.out, p.residual_out}, {p.hidden});
    dispatch_pack_width<T>(packed, [&](auto width) {
      constexpr int W = decltype(width)::value;
      const int threads = block_threads(p.hidden / W, kMaxThreads);
      fused_add_rms_norm_kernel<T, W><<<static_cast<unsigned>(p.rows), threads, 0, stream>>>(
          static_cast<T*>(p.out), static_cast<T*>(p.residual_out), static_cast<const T*>(p.input),
          static_cast<const T*>(p.residual), static_cast<const T*>(p.weight), p.hidden, p.eps);
    });
  });
  check_launch("fused_add_rms_norm");
}

}  // namespace mistral_ext
