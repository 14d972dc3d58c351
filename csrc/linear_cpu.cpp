// Linear layer without bias on the CPU for a few input rows (LinearParams in kernels.h):
// out[m, n] = sum_k x[m, k] * weight[n, k], accumulated in fp32, with the optional prologue
// (RMSNorm or SiLU-and-mul of x) and residual epilogue.
//
// With M <= 16 input rows each weight element takes part in at most 16 multiply-adds: at batch 1
// the cores could do far more in the time it takes to bring the weight in from memory, so the
// product is bound by the bandwidth at which the weight streams in, read once per call. The
// kernel reads the weight exactly once, as one sequential stream per thread, and keeps the
// arithmetic out of the way:
//  * x is converted once to fp32 scratch [M, K] (rows 64-byte aligned); it stays in cache while
//    the weight streams past. A prologue runs first, through the op's own CPU kernel (rms_norm_cpu,
//    silu_and_mul_cpu) into a [M, K] buffer of dtype: the values are those of the unfused op by
//    construction, and M * K elements are nothing next to the weight.
//  * Each thread takes one contiguous range of weight rows (static split) and walks it row after
//    row. On this kind of CPU (AMD EPYC, measured) one sequential stream per core reads about
//    twice as fast as several interleaved ones, so rows are not interleaved; independent
//    accumulators come from the x rows instead.
//  * Each weight row is dotted with tiles of 8 (or 4) x rows at once: one weight load and
//    widening for eight multiply-adds into eight independent sums.
//  * The dot products are plain loops with `omp simd` reductions that the compiler vectorises,
//    widening bf16 / fp16 weights in registers. On x86-64 they are compiled twice, for the
//    baseline ISA and for AVX2 + FMA, and the AVX2 build is chosen at run time when the CPU has
//    it (the library is not built with -march=native, so it runs on any x86-64).
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "common.h"
#include "linear_common.h"

namespace mistral_ext {
namespace {

// Everything here is always inlined (MISTRAL_EXT_INLINE) into the two entry points of each
// dtype, so that it is compiled (and vectorised) for the ISA of the entry point it lands in.

constexpr int64_t kRowBlock = 4;     // weight rows that go through every tile of x rows in turn
constexpr int64_t kAlignFloats = 16; // x scratch rows start on 64-byte boundaries

// fp16 -> fp32 without branches, so that it vectorises (half_bits_to_float does not): the 15
// magnitude bits shifted into fp32 position read as a number 2^-112 times too small, exact for
// normal and subnormal halves alike; inf and NaN keep their payload under the all-ones exponent.
MISTRAL_EXT_INLINE float widen_half(uint16_t h) {
  const uint32_t magnitude = (static_cast<uint32_t>(h) & 0x7fffu) << 13;
  float scaled;
  std::memcpy(&scaled, &magnitude, sizeof(scaled));
  scaled *= 0x1p112f;
  uint32_t finite;
  std::memcpy(&finite, &scaled, sizeof(finite));
  const uint32_t special = 0u - static_cast<uint32_t>(magnitude >= (0x7c00u << 13));  // all ones: inf / NaN
  const uint32_t bits = (finite & ~special) | ((magnitude | 0x7f800000u) & special) |
                        (static_cast<uint32_t>(h) & 0x8000u) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

MISTRAL_EXT_INLINE float widen(float w) { return w; }
MISTRAL_EXT_INLINE float widen(BFloat16 w) { return to_float(w); }
MISTRAL_EXT_INLINE float widen(Float16 w) { return widen_half(w.bits); }

// s[i] = x[i] . w for eight x rows: eight independent accumulators, enough to keep both FMA
// pipes busy, and each weight element loaded and widened once for all of them.
template <typename T>
MISTRAL_EXT_INLINE void dot_8x1(const float* const* x, const T* w, int64_t k_len, float* s) {
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3], *x4 = x[4], *x5 = x[5], *x6 = x[6], *x7 = x[7];
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f, s4 = 0.f, s5 = 0.f, s6 = 0.f, s7 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
  for (int64_t k = 0; k < k_len; ++k) {
    const float wk = widen(w[k]);
    s0 += x0[k] * wk;
    s1 += x1[k] * wk;
    s2 += x2[k] * wk;
    s3 += x3[k] * wk;
    s4 += x4[k] * wk;
    s5 += x5[k] * wk;
    s6 += x6[k] * wk;
    s7 += x7[k] * wk;
  }
  s[0] = s0, s[1] = s1, s[2] = s2, s[3] = s3, s[4] = s4, s[5] = s5, s[6] = s6, s[7] = s7;
}

// The same for four x rows (2 to 4 rows left).
template <typename T>
MISTRAL_EXT_INLINE void dot_4x1(const float* const* x, const T* w, int64_t k_len, float* s) {
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t k = 0; k < k_len; ++k) {
    const float wk = widen(w[k]);
    s0 += x0[k] * wk;
    s1 += x1[k] * wk;
    s2 += x2[k] * wk;
    s3 += x3[k] * wk;
  }
  s[0] = s0, s[1] = s1, s[2] = s2, s[3] = s3;
}

// One x row (decode at batch 1): a single accumulator chain already outruns memory.
template <typename T>
MISTRAL_EXT_INLINE float dot_1x1(const float* x, const T* w, int64_t k_len) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < k_len; ++k) s += x[k] * widen(w[k]);
  return s;
}

template <typename T>
struct RowsArgs {
  const float* x;   // [rows, in_features], fp32, row stride x_stride
  int64_t x_stride;
  const T* weight;  // [out_features, in_features]
  T* out;           // [rows, out_features]
  const T* residual;  // [rows, out_features] or null; may alias out
  int64_t rows, in_features, out_features;
};

// out[index] = sum rounded to T, plus the residual (rounded again) when there is one.
template <typename T>
MISTRAL_EXT_INLINE void store_output(const RowsArgs<T>& a, int64_t index, float sum) {
  const T product = from_float<T>(sum);
  a.out[index] = a.residual ? from_float<T>(to_float(product) + to_float(a.residual[index])) : product;
}

// out[:, n0:n1] for weight rows [n0, n1). With more than one tile of x rows (M > 8), blocks of
// kRowBlock weight rows go through every tile in turn: the tile in use and the block stay in L1,
// and the block is read from memory once, by the first tile.
template <typename T>
MISTRAL_EXT_INLINE void linear_rows(const RowsArgs<T>& a, int64_t n0, int64_t n1) {
  const int64_t M = a.rows, K = a.in_features, N = a.out_features;
  for (int64_t block = n0; block < n1; block += kRowBlock) {
    const int64_t block_end = std::min(n1, block + kRowBlock);
    for (int64_t m = 0; m < M;) {
      if (M - m == 1) {
        for (int64_t n = block; n < block_end; ++n)
          store_output(a, m * N + n, dot_1x1(a.x + m * a.x_stride, a.weight + n * K, K));
        break;
      }
      // A tile of 8 or 4 x rows; past the last row it repeats that row and drops the results.
      const int64_t tile = M - m > 4 ? 8 : 4;
      const float* x[8];
      for (int64_t i = 0; i < tile; ++i) x[i] = a.x + std::min(m + i, M - 1) * a.x_stride;
      for (int64_t n = block; n < block_end; ++n) {
        float s[8];
        if (tile == 8)
          dot_8x1(x, a.weight + n * K, K, s);
        else
          dot_4x1(x, a.weight + n * K, K, s);
        for (int64_t i = 0; i < tile && m + i < M; ++i) store_output(a, (m + i) * N + n, s[i]);
      }
      m += tile;
    }
  }
}

template <typename T>
void linear_rows_baseline(const RowsArgs<T>& a, int64_t n0, int64_t n1) {
  linear_rows(a, n0, n1);
}

#if defined(__x86_64__)
template <typename T>
__attribute__((target("avx2,fma"))) void linear_rows_avx2(const RowsArgs<T>& a, int64_t n0, int64_t n1) {
  linear_rows(a, n0, n1);
}
#endif

template <typename T>
using RowsFn = void (*)(const RowsArgs<T>&, int64_t, int64_t);

template <typename T>
RowsFn<T> rows_fn_for_this_cpu() {
#if defined(__x86_64__)
  if (cpu_has_avx2_fma()) return linear_rows_avx2<T>;
#endif
  return linear_rows_baseline<T>;
}

// x after the prologue: the input itself, or the prologue's output in `buffer` ([rows, K]).
template <typename T>
std::pair<const T*, int64_t> prologue_output(const LinearParams& p, std::vector<T>& buffer) {
  const int64_t K = p.in_features;
  if (p.prologue == LinearPrologue::kNone) return {static_cast<const T*>(p.input), p.input_row_stride};
  buffer.resize(static_cast<size_t>(p.rows * K));
  if (p.prologue == LinearPrologue::kRmsNorm) {
    rms_norm_cpu(RmsNormParams{p.dtype, p.rows, K, p.input, p.input_row_stride, p.norm_weight, buffer.data(), p.eps});
  } else {  // kSiluAndMul, row by row: the input rows (gate | up) need not be contiguous
    for (int64_t m = 0; m < p.rows; ++m)
      silu_and_mul_cpu(SiluAndMulParams{p.dtype, 1, K, static_cast<const T*>(p.input) + m * p.input_row_stride,
                                        buffer.data() + m * K});
  }
  return {buffer.data(), K};
}

}  // namespace

void linear_cpu(const LinearParams& p) {
  check_linear_params(p);
  if (p.rows == 0 || p.out_features == 0) return;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t K = p.in_features;
    std::vector<T> prologue_buffer;
    const auto [input, input_row_stride] = prologue_output(p, prologue_buffer);
    const int64_t x_stride = (K + kAlignFloats - 1) / kAlignFloats * kAlignFloats;
    const size_t x_bytes = static_cast<size_t>(p.rows * x_stride) * sizeof(float);
    std::vector<float> scratch(static_cast<size_t>(p.rows * x_stride + kAlignFloats));
    void* base = scratch.data();
    size_t space = scratch.size() * sizeof(float);
    float* x = static_cast<float*>(std::align(kAlignFloats * sizeof(float), x_bytes, base, space));
    for (int64_t m = 0; m < p.rows; ++m) {
      const T* row = input + m * input_row_stride;
      for (int64_t k = 0; k < K; ++k) x[m * x_stride + k] = to_float(row[k]);
    }
    const RowsArgs<T> args{x, x_stride, static_cast<const T*>(p.weight), static_cast<T*>(p.out),
                           static_cast<const T*>(p.residual), p.rows, K, p.out_features};
    const RowsFn<T> rows_fn = rows_fn_for_this_cpu<T>();
#pragma omp parallel if (worth_threading(p.rows * p.out_features * K))
    {
      const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
      rows_fn(args, p.out_features * t / threads, p.out_features * (t + 1) / threads);
    }
  });
}

}  // namespace mistral_ext
