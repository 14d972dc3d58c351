// SiLU-and-mul on the CPU: out[r, i] = silu(gate) * up with gate = x[r, i], up = x[r, inter + i],
// silu(g) = g / (1 + exp(-g)), computed in fp32 and rounded once.
#include "activation_common.h"
#include "common.h"

namespace mistral_ext {

void silu_and_mul_cpu(const SiluAndMulParams& p) {
  check_silu_and_mul_params(p);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* input = static_cast<const T*>(p.input);
    T* out = static_cast<T*>(p.out);
#pragma omp parallel for if (worth_threading(p.rows * p.inter))
    for (int64_t r = 0; r < p.rows; ++r) {
      const T* gate = input + r * 2 * p.inter;
      const T* up = gate + p.inter;
      T* o = out + r * p.inter;
      for (int64_t i = 0; i < p.inter; ++i) o[i] = from_float<T>(silu_times(to_float(gate[i]), to_float(up[i])));
    }
  });
}

}  // namespace mistral_ext
