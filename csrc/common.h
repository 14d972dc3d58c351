// Internal helpers shared by the CPU kernels: storage types, fp32 conversion, dtype dispatch,
// argument checks and the thread pool policy.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "mistral_ext/kernels.h"

// Marks the helpers that the CPU kernels and the CUDA kernels share.
#if defined(__CUDACC__)
#define MISTRAL_EXT_HOST_DEVICE __host__ __device__
#else
#define MISTRAL_EXT_HOST_DEVICE
#endif

namespace mistral_ext {

// The fp32 arithmetic of RMSNorm and SiLU-and-mul, one definition for every kernel that applies
// them (the ops themselves and the linear kernels' prologues), so that all give the same values.
// rms_norm(x)[i] = x[i] * inverse_rms(sum of x^2, n, eps) * weight[i], left to right. silu_times
// is the CUDA kernels'; the CPU's works on vectors with a polynomial exp (activation_cpu.cpp), and
// the CPU linear's prologue calls that op.
MISTRAL_EXT_HOST_DEVICE inline float inverse_rms(float sum_squares, int64_t n, float eps) {
  return 1.f / sqrtf(sum_squares / static_cast<float>(n) + eps);
}
MISTRAL_EXT_HOST_DEVICE inline float silu_times(float gate, float up) { return gate / (1.f + expf(-gate)) * up; }

// 16-bit storage types for the CPU path; arithmetic always happens in fp32.
struct BFloat16 {
  uint16_t bits;
};
struct Float16 {
  uint16_t bits;
};

inline float to_float(float x) { return x; }
inline float to_float(BFloat16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
float half_bits_to_float(uint16_t bits);
uint16_t float_to_half_bits(float f);
inline float to_float(Float16 x) { return half_bits_to_float(x.bits); }

template <typename T>
inline T from_float(float f);
template <>
inline float from_float<float>(float f) { return f; }
template <>
inline BFloat16 from_float<BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return BFloat16{static_cast<uint16_t>(u >> 16)};
}
template <>
inline Float16 from_float<Float16>(float f) { return Float16{float_to_half_bits(f)}; }

// Calls fn with a value of the storage type matching `dtype` (used only for its type).
template <typename Fn>
inline void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); return;
    case DType::kFloat16: fn(Float16{}); return;
    case DType::kBFloat16: fn(BFloat16{}); return;
  }
  throw std::invalid_argument("mistral_ext: unknown dtype tag " + std::to_string(static_cast<int>(dtype)));
}

inline void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument("mistral_ext: " + message);
}

// Forces a helper into its caller, so that code reached from a function compiled for a wider
// ISA (__attribute__((target("avx2,fma"))), chosen at run time) is vectorised for that ISA too.
#define MISTRAL_EXT_INLINE inline __attribute__((always_inline))

// True when this x86-64 CPU runs AVX2 and FMA, the wider of the two builds the CPU kernels
// with vector loops keep of their hot path (decided once, at run time; no -march flags).
inline bool cpu_has_avx2_fma() {
#if defined(__x86_64__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// Parallelise a loop only when there is enough work to pay for waking the OpenMP team
// (`work` ~ scalar operations in the whole loop): about 100 us of one core. Below that the
// team's start and barrier cost more than they save, and far more when the cores are busy.
inline bool worth_threading(int64_t work) { return work >= (int64_t{1} << 18); }

}  // namespace mistral_ext
