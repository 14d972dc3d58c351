// SiLU-and-mul on the CPU: out[r, i] = silu(gate) * up with gate = x[r, i], up = x[r, inter + i],
// silu(g) = g / (1 + exp(-g)), computed in fp32 and rounded once. The row is processed in vectors
// of four with exp as a polynomial (exp_vector): libm's expf, one call per element, made this op
// five times slower than its memory traffic. A NaN gate gives NaN, an infinite one +-inf times up
// over 1 or 1 + inf (inf or NaN), as the formula does.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "activation_common.h"
#include "common.h"
#include "cpu_vector.h"

namespace mistral_ext {
namespace {

constexpr int kLanes = 4;  // the baseline ISA's vector width
using Floats = Vec<kLanes>::F;

template <typename T>
MISTRAL_EXT_INLINE Floats load_floats(const T* src) {
  Floats v;
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&v, src, sizeof(v));
  } else {
    for (int i = 0; i < kLanes; ++i) v[i] = to_float(src[i]);
  }
  return v;
}

template <typename T>
MISTRAL_EXT_INLINE void store_floats(Floats v, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, &v, sizeof(v));
  } else {
    for (int i = 0; i < kLanes; ++i) dst[i] = from_float<T>(v[i]);
  }
}

MISTRAL_EXT_INLINE Floats silu_times(Floats gate, Floats up) { return gate / (1.f + exp_vector<kLanes>(-gate)) * up; }

// One row of n outputs: whole vectors, then the last n % kLanes through a zero-padded vector.
template <typename T>
void silu_and_mul_row(const T* gate, const T* up, T* out, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store_floats(silu_times(load_floats(gate + i), load_floats(up + i)), out + i);
  if (i == n) return;
  T gate_tail[kLanes] = {}, up_tail[kLanes] = {}, out_tail[kLanes];
  std::copy(gate + i, gate + n, gate_tail);
  std::copy(up + i, up + n, up_tail);
  store_floats(silu_times(load_floats(gate_tail), load_floats(up_tail)), out_tail);
  std::copy(out_tail, out_tail + (n - i), out + i);
}

}  // namespace

void silu_and_mul_cpu(const SiluAndMulParams& p) {
  check_silu_and_mul_params(p);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* input = static_cast<const T*>(p.input);
    T* out = static_cast<T*>(p.out);
#pragma omp parallel for if (worth_threading(p.rows * p.inter))
    for (int64_t r = 0; r < p.rows; ++r) {
      const T* gate = input + r * 2 * p.inter;
      silu_and_mul_row(gate, gate + p.inter, out + r * p.inter, p.inter);
    }
  });
}

}  // namespace mistral_ext
