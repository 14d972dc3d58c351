// Linear layer without bias on CUDA for a few input rows (LinearParams in kernels.h):
// out[m, n] = sum_k x[m, k] * weight[n, k], accumulated in fp32.
//
// With M <= 16 input rows each weight element takes part in at most 16 multiply-adds, so the
// time is that of streaming the weight from HBM once: the kernel is built to keep enough
// 16-byte weight loads in flight on every SM and to do nothing else in their way.
//  * x is staged in shared memory as fp32, [M, chunk] at a time (the whole of K in one chunk
//    when it fits: 64 KB, e.g. K up to 16384 for one row), and read from there by every warp.
//  * Each warp owns R consecutive output rows (weight rows) and computes them for all M inputs:
//    lanes stride over 16-byte packs of the weight rows (8 bf16 / fp16 or 4 fp32 elements,
//    coalesced 512-byte warp loads), U packs per row issued before any is used, fp32
//    accumulators per (row, input), one warp-shuffle reduction per output at the end.
//  * 8 warps per block, a persistent grid (as many blocks as fit on the GPU at once) looping over
//    groups of 8 R rows: x is staged once per block when K fits in one chunk.
//  * R grows with M (1 row at M = 1, up to 4 at M >= 8) so that each x value read from shared
//    memory feeds R multiply-adds: shared-memory traffic stays well below the weight stream's.
//  * A scalar path (one element per lane and step) serves weights that are not 16-byte aligned or
//    whose rows are not a whole number of packs (K not a multiple of 8, or of 4 for fp32).
#include <algorithm>

#include "cuda_common.cuh"
#include "linear_common.h"

namespace mistral_ext {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int64_t kMaxSmemBytes = 64 * 1024;  // x chunk: [M, chunk] fp32

// Shared-memory slot of element j of pack p in a staged x row. For 8-element packs the two
// halves of a pack lie 128 floats apart, so that the lanes of a warp read 16 consecutive bytes
// each (float4 loads without bank conflicts) rather than 32 bytes with a gap.
template <int W>
__host__ __device__ constexpr int x_slot(int p, int j) {
  constexpr int V = W < 4 ? W : 4;  // floats per shared-memory load
  return (p >> 5) * (32 * W) + (j / V) * (32 * V) + (p & 31) * V + j % V;
}

template <int W>
__device__ __forceinline__ void load_x(float (&xv)[W], const float* row, int p) {
  if constexpr (W >= 4) {
#pragma unroll
    for (int h = 0; h < W / 4; ++h) {
      const float4 v = *reinterpret_cast<const float4*>(row + x_slot<W>(p, 4 * h));
      xv[4 * h] = v.x, xv[4 * h + 1] = v.y, xv[4 * h + 2] = v.z, xv[4 * h + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < W; ++j) xv[j] = row[x_slot<W>(p, j)];
  }
}

// T: storage type; W: elements per weight load (16 bytes, or 1 on the scalar path); MT: input
// rows the kernel is built for (rows <= MT); R: weight rows per warp; U: packs per row in flight.
template <typename T, int W, int MT, int R, int U>
__global__ void __launch_bounds__(kThreads, MT <= 4 ? 2 : 1)
    linear_kernel(T* __restrict__ out,           // [rows, N]
                  const T* __restrict__ input,   // [rows, K], row stride input_row_stride
                  int64_t input_row_stride,
                  const T* __restrict__ weight,  // [N, K]
                  int rows, int64_t K, int64_t N,
                  int chunk) {                   // K elements staged at a time, a multiple of 32 W
  extern __shared__ __align__(16) float xs[];   // [rows, chunk], x_slot layout
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t groups = (N + kWarps * R - 1) / (kWarps * R);
  const int64_t chunks = (K + chunk - 1) / chunk;

  for (int64_t group = blockIdx.x; group < groups; group += gridDim.x) {
    const int64_t n0 = (group * kWarps + warp) * R;
    // Rows past N read row N - 1 (valid memory) and are not written.
    const T* w[R];
#pragma unroll
    for (int r = 0; r < R; ++r) w[r] = weight + (n0 + r < N ? n0 + r : N - 1) * K;
    float acc[R][MT] = {};

    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k0 = c * chunk;
      const int k_len = static_cast<int>(K - k0 < chunk ? K - k0 : chunk);
      if (chunks > 1 || group == blockIdx.x) {  // block-uniform: with one chunk, stage it once
        __syncthreads();                        // every warp is done with the previous chunk
        for (int m = 0; m < rows; ++m)
          for (int k = threadIdx.x; k < k_len; k += kThreads)
            xs[m * chunk + x_slot<W>(k / W, k % W)] = to_f32(input[m * input_row_stride + k0 + k]);
        __syncthreads();
      }
      if (n0 >= N) continue;  // warp-uniform; the warp still takes part in the next staging

      const int packs = k_len / W;
      for (int p0 = lane; p0 < packs; p0 += 32 * U) {
        Pack<T, W> wv[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
          for (int r = 0; r < R; ++r)
            if (p0 + 32 * u < packs) wv[u][r] = load_pack<W>(w[r] + k0 + static_cast<int64_t>(p0 + 32 * u) * W);
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (p0 + 32 * u >= packs) continue;
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            if (m >= rows) continue;
            float xv[W];
            load_x<W>(xv, xs + m * chunk, p0 + 32 * u);
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
              for (int j = 0; j < W; ++j) acc[r][m] = fmaf(xv[j], to_f32(wv[u][r].v[j]), acc[r][m]);
          }
        }
      }
    }

    if (n0 >= N) continue;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float sum = warp_sum(acc[r][m]);  // every lane takes part, whatever rows is
        if (lane == 0 && m < rows && n0 + r < N) out[m * N + n0 + r] = from_f32<T>(sum);
      }
  }
}

void check_cuda(cudaError_t error, const char* what) {
  if (error != cudaSuccess)
    throw std::runtime_error(std::string("mistral_ext: linear: ") + what + ": " + cudaGetErrorString(error));
}

template <typename T, int W, int MT>
void launch(const LinearParams& p, CudaStream stream) {
  constexpr int R = MT >= 8 ? 4 : MT >= 2 ? 2 : 1;
  constexpr int U = 4 / R;  // 4 weight loads of 16 bytes in flight per lane
  const auto kernel = linear_kernel<T, W, MT, R, U>;

  int device = 0, sms = 0, smem_optin = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "SM count");
  check_cuda(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "shared memory size");

  // The x chunk: all of K if it fits in the shared-memory budget, else the largest multiple of
  // 32 packs (one per lane) that does.
  const int64_t granule = 32 * W;
  const int64_t budget = std::min<int64_t>(kMaxSmemBytes, smem_optin);
  const int64_t max_chunk = budget / (p.rows * static_cast<int64_t>(sizeof(float))) / granule * granule;
  require(max_chunk >= granule, "linear: not enough shared memory on this device for " + std::to_string(p.rows) +
                                    " rows of x (" + std::to_string(budget) + " bytes)");
  const int64_t chunk = std::min((p.in_features + granule - 1) / granule * granule, max_chunk);
  const size_t smem_bytes = static_cast<size_t>(p.rows * chunk) * sizeof(float);
  if (smem_bytes > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)),
               "cannot set the shared memory size");

  int blocks_per_sm = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, smem_bytes),
             "occupancy query");
  const int64_t groups = (p.out_features + kWarps * R - 1) / (kWarps * R);
  const int64_t blocks = std::min<int64_t>(groups, static_cast<int64_t>(std::max(blocks_per_sm, 1)) * sms);
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem_bytes, stream>>>(
      static_cast<T*>(p.out), static_cast<const T*>(p.input), p.input_row_stride, static_cast<const T*>(p.weight),
      static_cast<int>(p.rows), p.in_features, p.out_features, static_cast<int>(chunk));
  check_launch("linear");
}

template <typename T, int W>
void launch_for_rows(const LinearParams& p, CudaStream stream) {
  if (p.rows <= 1) return launch<T, W, 1>(p, stream);
  if (p.rows <= 2) return launch<T, W, 2>(p, stream);
  if (p.rows <= 4) return launch<T, W, 4>(p, stream);
  if (p.rows <= 8) return launch<T, W, 8>(p, stream);
  launch<T, W, 16>(p, stream);
}

}  // namespace

void linear_cuda(const LinearParams& p, CudaStream stream) {
  check_linear_params(p);
  static_assert(kLinearMaxRows == 16, "linear_cuda instantiates kernels for up to 16 rows");
  if (p.rows == 0 || p.out_features == 0) return;
  dispatch_cuda_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_pack_width<T>(packs_fit<T>({p.weight}, {p.in_features}), [&](auto width) {
      launch_for_rows<T, decltype(width)::value>(p, stream);
    });
  });
}

}  // namespace mistral_ext
