// Linear layer without bias on CUDA for a few input rows (LinearParams in kernels.h):
// out[m, n] = sum_k x[m, k] * weight[n, k], accumulated in fp32, with the optional prologue
// (RMSNorm or SiLU-and-mul of x) and residual epilogue fused in.
//
// With M <= 16 input rows each weight element takes part in at most 16 multiply-adds, so the
// time is that of streaming the weight from HBM once: the kernel is built to keep enough
// 16-byte weight loads in flight on every SM and to do nothing else in their way.
//  * x is staged in shared memory as fp32, [M, chunk] at a time (the whole of K in one chunk
//    when it fits: 64 KB, e.g. K up to 16384 for one row), and read from there by every warp.
//    The prologue is applied on the way in (RMSNorm after a first pass over each row for its
//    sum of squares), so at decode the norm and the activation cost no launch of their own.
//    Staging reads x in 16-byte packs, several in flight per thread, and the warps' first
//    weight loads are issued before it: its L2 round trips hide behind the HBM latency.
//  * Each warp owns R consecutive output rows (weight rows) and computes them for all M inputs:
//    lanes stride over 16-byte packs of the weight rows (8 bf16 / fp16 or 4 fp32 elements,
//    coalesced 512-byte warp loads), U packs per row loaded while the previous U are used
//    (software pipelined), fp32 accumulators per (row, input), one warp-shuffle reduction per
//    output at the end, where the residual is added.
//  * 8 warps per block, a persistent grid (as many blocks as fit on the GPU at once) looping over
//    groups of 8 R rows: x is staged once per block when K fits in one chunk.
//  * R grows with M (1 row at M = 1, up to 4 at M >= 8) so that each x value read from shared
//    memory feeds R multiply-adds: shared-memory traffic stays well below the weight stream's.
//  * With LinearParams::overlap_previous (programmatic dependent launch, compute capability 9.0+)
//    the kernel starts while the previous one finishes: its first weight loads are in flight
//    before it waits for that kernel's output, and it lets the next kernel start as soon as all
//    of its own blocks run, so back-to-back projections leave no launch gap and no idle tail.
//  * A scalar path (one element per lane and step) serves weights that are not 16-byte aligned or
//    whose rows are not a whole number of packs (K not a multiple of 8, or of 4 for fp32); x is
//    read element by element when it is not aligned to packs.
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

// Stores V consecutive elements of a staged x row, from element k on (k a multiple of V; V = W
// or 1): the inverse of load_x.
template <int W, int V>
__device__ __forceinline__ void store_x(float* row, int k, const float (&xv)[V]) {
  if constexpr (V == W && W >= 4) {
#pragma unroll
    for (int h = 0; h < W / 4; ++h)
      *reinterpret_cast<float4*>(row + x_slot<W>(k / W, 4 * h)) =
          make_float4(xv[4 * h], xv[4 * h + 1], xv[4 * h + 2], xv[4 * h + 3]);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) row[x_slot<W>((k + j) / W, (k + j) % W)] = xv[j];
  }
}

// What the kernel reads besides the weight: x and the prologue's operands (LinearParams).
template <typename T>
struct LinearInput {
  const T* x;            // [rows, K] ([rows, 2K], gate | up, for kSiluAndMul), row stride row_stride
  int64_t row_stride;
  const T* norm_weight;  // [K] for kRmsNorm
  float eps;
  LinearPrologue prologue;
  bool packed;           // x (and norm_weight) can be read in 16-byte packs of W elements
};

// 1 / rms of each input row over all K, into inv_rms[m] (kRmsNorm only). Block-wide: every
// thread calls it.
template <typename T, int V>
__device__ void compute_inverse_rms(float* inv_rms, const LinearInput<T>& in, int rows, int64_t K) {
  for (int m = 0; m < rows; ++m) {
    const T* row = in.x + m * in.row_stride;
    float sum_squares = 0.f;
    for (int64_t c = threadIdx.x; c < K / V; c += kThreads) {
      const Pack<T, V> v = load_pack<V>(row + c * V);
#pragma unroll
      for (int j = 0; j < V; ++j) sum_squares += to_f32(v.v[j]) * to_f32(v.v[j]);
    }
    const float total = block_sum(sum_squares);
    if (threadIdx.x == 0) inv_rms[m] = inverse_rms(total, K, in.eps);
  }
  __syncthreads();  // inv_rms is read by every thread
}

// Stages x[:, k0 : k0 + k_len] through the prologue into xs ([rows, chunk] fp32, x_slot layout
// of W-element packs), reading V elements per access; each thread issues its loads for
// kStageLoads accesses before it uses any, so the staging costs about one round trip to L2.
constexpr int kStageLoads = 2;
template <typename T, int W, int V>
__device__ void stage_x(float* xs, const LinearInput<T>& in, const float* inv_rms, int rows, int64_t K, int64_t k0,
                        int k_len, int chunk) {
  const int vectors = k_len / V;
  const bool has_operand = in.prologue != LinearPrologue::kNone;
  for (int m = 0; m < rows; ++m) {
    const T* row = in.x + m * in.row_stride + k0;
    // The prologue's second operand: up (the row's second half) or the norm weight.
    const T* operand = in.prologue == LinearPrologue::kSiluAndMul ? row + K
                       : in.prologue == LinearPrologue::kRmsNorm  ? in.norm_weight + k0
                                                                  : nullptr;
    for (int c0 = threadIdx.x; c0 < vectors; c0 += kThreads * kStageLoads) {
      Pack<T, V> v[kStageLoads], o[kStageLoads];
#pragma unroll
      for (int i = 0; i < kStageLoads; ++i) {
        const int c = c0 + i * kThreads;
        if (c >= vectors) continue;
        v[i] = load_pack<V>(row + c * V);
        if (has_operand) o[i] = load_pack<V>(operand + c * V);
      }
#pragma unroll
      for (int i = 0; i < kStageLoads; ++i) {
        const int c = c0 + i * kThreads;
        if (c >= vectors) continue;
        float xv[V];
#pragma unroll
        for (int j = 0; j < V; ++j) {
          // Rounded to T: the prologue's output is what the unfused op would have stored.
          const float x = to_f32(v[i].v[j]);
          xv[j] = in.prologue == LinearPrologue::kRmsNorm      ? to_f32(from_f32<T>(x * inv_rms[m] * to_f32(o[i].v[j])))
                  : in.prologue == LinearPrologue::kSiluAndMul ? to_f32(from_f32<T>(silu_times(x, to_f32(o[i].v[j]))))
                                                               : x;
        }
        store_x<W>(xs + m * chunk, c * V, xv);
      }
    }
  }
}

// U packs of each of the warp's R weight rows, from pack p on (packs past `packs` not loaded).
template <typename T, int W, int R, int U>
__device__ __forceinline__ void load_weights(Pack<T, W> (&wv)[U][R], const T* const (&w)[R], int64_t k0, int p,
                                             int packs) {
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (p + 32 * u < packs) wv[u][r] = load_pack<W>(w[r] + k0 + static_cast<int64_t>(p + 32 * u) * W);
}

// T: storage type; W: elements per weight load (16 bytes, or 1 on the scalar path); MT: input
// rows the kernel is built for (rows <= MT); R: weight rows per warp; U: packs per row in flight.
template <typename T, int W, int MT, int R, int U>
__global__ void __launch_bounds__(kThreads, MT <= 4 ? 2 : 1)
    linear_kernel(T* out,                        // [rows, N]; may alias residual
                  const LinearInput<T> in,
                  const T* __restrict__ weight,  // [N, K]
                  const T* residual,             // [rows, N] or null
                  int rows, int64_t K, int64_t N,
                  int chunk) {                   // K elements staged at a time, a multiple of 32 W
  extern __shared__ __align__(16) float xs[];   // [rows, chunk], x_slot layout
  __shared__ float inv_rms[kLinearMaxRows];
  allow_next_kernel_launch();  // the next kernel's blocks take SM room as ours leave and preload weights
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
      const int packs = k_len / W;
      // The first weight loads do not depend on x: in flight while x is staged. Software
      // pipelined from here on: the next U packs load while the current ones are used.
      Pack<T, W> next[U][R];
      load_weights(next, w, k0, lane, packs);
      if (chunks > 1 || group == blockIdx.x) {  // block-uniform: with one chunk, stage it once
        __syncthreads();                        // every warp is done with the previous chunk
        const bool first = group == blockIdx.x && c == 0;
        // x, norm_weight, residual and out may be the previous kernel's: only the weight is
        // read before this point.
        if (first) wait_for_previous_kernel();
        if (in.packed) {
          if (first && in.prologue == LinearPrologue::kRmsNorm) compute_inverse_rms<T, W>(inv_rms, in, rows, K);
          stage_x<T, W, W>(xs, in, inv_rms, rows, K, k0, k_len, chunk);
        } else {
          if (first && in.prologue == LinearPrologue::kRmsNorm) compute_inverse_rms<T, 1>(inv_rms, in, rows, K);
          stage_x<T, W, 1>(xs, in, inv_rms, rows, K, k0, k_len, chunk);
        }
        __syncthreads();
      }
      if (n0 >= N) continue;  // warp-uniform; the warp still takes part in the next staging

      for (int p0 = lane; p0 < packs; p0 += 32 * U) {
        Pack<T, W> wv[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
          for (int r = 0; r < R; ++r) wv[u][r] = next[u][r];
        load_weights(next, w, k0, p0 + 32 * U, packs);
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
        if (lane == 0 && m < rows && n0 + r < N) {
          const int64_t index = m * N + n0 + r;
          const T product = from_f32<T>(sum);
          out[index] = residual ? from_f32<T>(to_f32(product) + to_f32(residual[index])) : product;
        }
      }
  }
}

template <typename T, int W, int MT>
void launch(const LinearParams& p, CudaStream stream) {
  constexpr int R = MT >= 8 ? 4 : MT >= 2 ? 2 : 1;
  constexpr int U = 4 / R;  // 4 to 8 weight loads of 16 bytes in flight per lane
  const auto kernel = linear_kernel<T, W, MT, R, U>;

  // The x chunk: all of K if it fits in the shared-memory budget, else the largest multiple of
  // 32 packs (one per lane) that does. The kernel's static shared memory (inv_rms, block_sum)
  // counts against the same per-block limits as the dynamic x chunk.
  const KernelLimits limits = kernel_limits(kernel);
  const int64_t granule = 32 * W;
  const int64_t budget = std::min<int64_t>(kMaxSmemBytes, limits.smem_optin_bytes - limits.static_smem_bytes);
  const int64_t max_chunk = budget / (p.rows * static_cast<int64_t>(sizeof(float))) / granule * granule;
  require(max_chunk >= granule, "linear: not enough shared memory on this device for " + std::to_string(p.rows) +
                                    " rows of x (" + std::to_string(budget) + " bytes)");
  const int64_t chunk = std::min((p.in_features + granule - 1) / granule * granule, max_chunk);
  const size_t smem_bytes = static_cast<size_t>(p.rows * chunk) * sizeof(float);
  allow_dynamic_shared_memory(kernel, smem_bytes);

  const int64_t groups = (p.out_features + kWarps * R - 1) / (kWarps * R);
  const int64_t blocks =
      std::min<int64_t>(groups, static_cast<int64_t>(max_blocks_per_sm(kernel, kThreads, smem_bytes)) * limits.sms);
  LinearInput<T> in{static_cast<const T*>(p.input), p.input_row_stride, static_cast<const T*>(p.norm_weight), p.eps,
                    p.prologue, false};
  // x in packs too when its rows and the norm weight line up on them (the weight already does).
  in.packed = W > 1 && packs_fit<T>({p.input, p.prologue == LinearPrologue::kRmsNorm ? p.norm_weight : nullptr},
                                    {p.rows > 1 ? p.input_row_stride : 0});
  launch_kernel(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), smem_bytes, stream, p.overlap_previous,
                static_cast<T*>(p.out), in, static_cast<const T*>(p.weight), static_cast<const T*>(p.residual),
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
