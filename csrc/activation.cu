// SiLU-and-mul on CUDA: out[r, i] = silu(gate) * up with gate = x[r, i], up = x[r, inter + i],
// silu(g) = g / (1 + exp(-g)), computed in fp32 and rounded once. Grid: rows along x, chunks
// of the intermediate dimension along y, 16-byte packs where the sizes allow.
#include "activation_common.h"
#include "cuda_common.cuh"

namespace mistral_ext {
namespace {

constexpr int kMaxThreads = 256;
constexpr int64_t kMaxGridY = 65535;

template <typename T, int W>
__global__ void __launch_bounds__(kMaxThreads)
    silu_and_mul_kernel(T* __restrict__ out,          // [rows, inter]
                        const T* __restrict__ input,  // [rows, 2 * inter]
                        int64_t inter) {
  const int64_t row = blockIdx.x;
  const T* gate = input + row * 2 * inter;
  const T* up = gate + inter;
  T* o = out + row * inter;
  const int64_t packs = inter / W;
  for (int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; c < packs;
       c += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    const Pack<T, W> g = load_pack<W>(gate + c * W);
    const Pack<T, W> u = load_pack<W>(up + c * W);
    Pack<T, W> r;
#pragma unroll
    for (int j = 0; j < W; ++j) r.v[j] = from_f32<T>(silu_times(to_f32(g.v[j]), to_f32(u.v[j])));
    store_pack<W>(o + c * W, r);
  }
}

}  // namespace

void silu_and_mul_cuda(const SiluAndMulParams& p, CudaStream stream) {
  check_silu_and_mul_params(p);
  require(p.rows <= kMaxGridX, "silu_and_mul: at most 2^31 - 1 rows per call on CUDA");
  if (p.rows == 0) return;
  dispatch_cuda_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_pack_width<T>(packs_fit<T>({p.input, p.out}, {p.inter}), [&](auto width) {
      constexpr int W = decltype(width)::value;
      const int64_t packs = p.inter / W;
      const int threads = block_threads(packs, kMaxThreads);
      const int64_t chunks = (packs + threads - 1) / threads;
      const dim3 grid(static_cast<unsigned>(p.rows), static_cast<unsigned>(chunks < kMaxGridY ? chunks : kMaxGridY));
      silu_and_mul_kernel<T, W><<<grid, threads, 0, stream>>>(static_cast<T*>(p.out), static_cast<const T*>(p.input),
                                                                p.inter);
    });
  });
  check_launch("silu_and_mul");
}

}  // namespace mistral_ext
