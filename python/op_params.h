// Tensor checks shared by the CPU and CUDA implementations of every op: each make_*_params
// validates its tensors (naming the argument on failure) and fills the plain params struct
// the kernel library takes. This file and the op registration files are the only places
// that see torch tensors.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "mistral_ext/kernels.h"

namespace mistral_ext::binding {

inline DType dtype_tag(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline void check_rank(const at::Tensor& t, int64_t rank, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == rank, name, " must have ", rank, " dimensions, got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", ref_name,
                   " has dtype ", ref.scalar_type());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (shape ", t.sizes(), ", strides ", t.strides(), ")");
}

inline void check_positions(const at::Tensor& positions, const at::Tensor& ref, at::IntArrayRef leading,
                            const char* ref_name) {
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kLong, "positions must be int64, got ", positions.scalar_type());
  check_same_device(positions, ref, "positions", ref_name);
  TORCH_CHECK_VALUE(positions.sizes() == leading, "positions must have shape ", leading, " to match ", ref_name,
                    ", got ", positions.sizes());
  check_contiguous(positions, "positions");
}

// A [batch, tokens, heads, head_dim] tensor whose heads and head_dim are contiguous and whose
// batch stride is tokens * token stride (true for contiguous tensors and for column slices of
// a contiguous [batch, tokens, columns] tensor). Returns the token stride in elements.
inline int64_t token_stride_of(const at::Tensor& t, const char* name) {
  check_rank(t, 4, name);
  const int64_t head_dim = t.size(3);
  TORCH_CHECK_VALUE(t.stride(3) == 1 && (t.size(2) == 1 || t.stride(2) == head_dim), name,
                    " must have contiguous heads and head_dim (strides ", t.strides(), ")");
  const int64_t token_stride = t.size(1) == 1 ? (t.size(0) == 1 ? t.size(2) * head_dim : t.stride(0)) : t.stride(1);
  TORCH_CHECK_VALUE(t.size(0) == 1 || t.stride(0) == t.size(1) * token_stride, name,
                    " must have batch stride tokens * token stride (strides ", t.strides(), ")");
  TORCH_CHECK_VALUE(token_stride >= t.size(2) * head_dim, name, " has overlapping tokens (strides ", t.strides(),
                    ")");
  return token_stride;
}

RmsNormParams make_rms_norm_params(const at::Tensor& input, const at::Tensor& weight, double eps, at::Tensor& out);
FusedAddRmsNormParams make_fused_add_rms_norm_params(const at::Tensor& input, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps, at::Tensor& out,
                                                     at::Tensor& residual_out);
RotaryParams make_rotary_params(at::Tensor& query, at::Tensor& key, const at::Tensor& positions, double theta);
SiluAndMulParams make_silu_and_mul_params(const at::Tensor& input, at::Tensor& out);
KvCacheWriteParams make_kv_cache_write_params(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& key,
                                              const at::Tensor& value, const at::Tensor& positions);
// The checks of both ops it fuses: rotary on query/key, the cache write of the (rotated) key.
RotaryCacheWriteParams make_rotary_cache_write_params(at::Tensor& query, at::Tensor& key, const at::Tensor& value,
                                                      at::Tensor& k_cache, at::Tensor& v_cache,
                                                      const at::Tensor& positions, double theta);
AttentionParams make_attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const std::optional<at::Tensor>& k_cache,
                                      const std::optional<at::Tensor>& v_cache, const at::Tensor& positions,
                                      const std::optional<at::Tensor>& cache_lens, int64_t window, double scale,
                                      at::Tensor& out);
// The linear op's optional steps (LinearParams): the residual added to the product, and the
// RMSNorm (norm_weight, eps) or SiLU-and-mul prologue applied to input first.
struct LinearOptions {
  const std::optional<at::Tensor>& residual;
  const std::optional<at::Tensor>& norm_weight;
  double eps;
  bool silu_and_mul;
};
// Checks input [..., K] ([..., 2K] with silu_and_mul; unit inner stride) against weight [N, K]
// (contiguous): same dtype and device, matching K; norm_weight [K]; residual [..., N] like the
// output. Returns the number of rows of input (its leading dimensions flattened).
int64_t check_linear_args(const at::Tensor& input, const at::Tensor& weight, const LinearOptions& options);
// input: its rows evenly strided (contiguous, or 2-D with a unit inner stride), at most
// kLinearMaxRows of them; residual (used when options has one) and out: [rows, N] contiguous.
LinearParams make_linear_params(const at::Tensor& input, const at::Tensor& weight, const LinearOptions& options,
                                const at::Tensor& residual, at::Tensor& out);

// decoder_layer's hidden [batch, tokens, hidden] (float) and weights, named on failure: the norms'
// [hidden]; q|k|v [(num_heads + 2 num_kv_heads) * head_dim, hidden] in all, o [hidden, num_heads *
// head_dim], gate|up [2 inter, hidden] in all, down [hidden, inter]; all on hidden's device and dtype,
// contiguous. Also cache_lens (given a cache of capacity > 0) and the head counts: the checks that
// attention would make only after a decode step has written the cache. (The steps' own checks
// cover the rest: positions, the caches' shapes.)
void check_decoder_layer_args(const at::Tensor& hidden, const at::Tensor& k_cache,
                              const std::optional<at::Tensor>& cache_lens, const at::Tensor& input_norm_weight,
                              at::TensorList qkv_weights, const at::Tensor& o_weight,
                              const at::Tensor& post_attention_norm_weight, at::TensorList gate_up_weights,
                              const at::Tensor& down_weight, int64_t num_heads, int64_t num_kv_heads,
                              int64_t head_dim);

}  // namespace mistral_ext::binding
