// RMSNorm on the CPU: out = x / sqrt(mean(x^2) + eps) * weight per row, fp32 accumulation;
// and the fused variant that first adds the residual stream (the sum is rounded to the
// storage dtype, as the unfused model does, and that rounded sum is what gets normalised).
#include "common.h"
#include "rms_norm_common.h"

namespace mistral_ext {
namespace {

// Both loops vectorise (`omp simd`: the sum of squares in vector lanes, added up at the end).
template <typename T>
void normalize_row(const T* x, const T* weight, T* out, int64_t hidden, float eps) {
  float sum_squares = 0.f;
#pragma omp simd reduction(+ : sum_squares)
  for (int64_t i = 0; i < hidden; ++i) {
    const float v = to_float(x[i]);
    sum_squares += v * v;
  }
  const float inv_rms = inverse_rms(sum_squares, hidden, eps);
#pragma omp simd
  for (int64_t i = 0; i < hidden; ++i) out[i] = from_float<T>(to_float(x[i]) * inv_rms * to_float(weight[i]));
}

}  // namespace

void rms_norm_cpu(const RmsNormParams& p) {
  check_rms_norm_sizes(p.rows, p.hidden);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* input = static_cast<const T*>(p.input);
    const T* weight = static_cast<const T*>(p.weight);
    T* out = static_cast<T*>(p.out);
#pragma omp parallel for if (worth_threading(p.rows * p.hidden))
    for (int64_t r = 0; r < p.rows; ++r)
      normalize_row(input + r * p.input_row_stride, weight, out + r * p.hidden, p.hidden, p.eps);
  });
}

void fused_add_rms_norm_cpu(const FusedAddRmsNormParams& p) {
  check_rms_norm_sizes(p.rows, p.hidden);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* input = static_cast<const T*>(p.input);
    const T* residual = static_cast<const T*>(p.residual);
    const T* weight = static_cast<const T*>(p.weight);
    T* out = static_cast<T*>(p.out);
    T* residual_out = static_cast<T*>(p.residual_out);
#pragma omp parallel for if (worth_threading(p.rows * p.hidden))
    for (int64_t r = 0; r < p.rows; ++r) {
      const int64_t base = r * p.hidden;
      for (int64_t i = 0; i < p.hidden; ++i)
        residual_out[base + i] = from_float<T>(to_float(input[base + i]) + to_float(residual[base + i]));
      normalize_row(residual_out + base, weight, out + base, p.hidden, p.eps);
    }
  });
}

}  // namespace mistral_ext
