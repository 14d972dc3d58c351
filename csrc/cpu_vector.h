// Vector types and the exp polynomial that the CPU kernels write their hot loops with (GCC / Clang
// vector extensions): loops left to the auto-vectoriser keep register tiles in memory, and libm's
// expf is one call per element.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

namespace mistral_ext {

// L floats (or int32s) in one vector register: L = 4 for the baseline ISA (SSE2, NEON), 8 for
// AVX2. aligned(4): loads and stores through them need not be aligned.
template <int L>
struct Vec {
  typedef float F __attribute__((vector_size(4 * L), aligned(4)));
  typedef int32_t I __attribute__((vector_size(4 * L), aligned(4)));
};
// Vectors only pass between always-inlined functions: no ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"

// e^x to a few ulp: x = n ln2 + r with |r| <= ln2 / 2, e^r from the Cephes single-precision
// polynomial, 2^n made in the exponent bits. Below -87 (and for NaN) it gives e^-87 ~ 1e-38,
// which nothing added to 1 or to a sum can tell from 0; from ~88.4 (n = 128) it is infinite, as
// e^x overflows fp32 there or a little later.
template <int L, typename VF = typename Vec<L>::F>
MISTRAL_EXT_INLINE VF exp_vector(VF x) {
  x = x > -87.f ? x : VF{} - 87.f;
  x = x < 89.f ? x : VF{} + 89.f;
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const VF n = (x * 1.44269504f + kRound) - kRound;
  const VF r = x - n * 0.693145751953125f - n * 1.428606765330187e-6f;  // x - n ln 2, in two parts
  VF poly = VF{} + 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * r * r + r + 1.f;
  const auto two_n_bits = (__builtin_convertvector(n, typename Vec<L>::I) + 127) << 23;
  VF two_n;
  std::memcpy(&two_n, &two_n_bits, sizeof(two_n));
  return poly * two_n;
}

}  // namespace mistral_ext
