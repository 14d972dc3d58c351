// The op implementations, written once over a Backend that launches the params struct on its
// device (CpuBackend in ops.cpp, CudaBackend in ops_cuda.cpp). Backend provides
//   struct Guard { explicit Guard(const at::Tensor&); };   // device guard for the call
//   static void launch(const XxxParams&);                  // one overload per op
//   static int64_t linear_max_rows(at::ScalarType);        // rows up to which our GEMV wins
#pragma once

#include <tuple>

#include "op_params.h"

namespace mistral_ext::binding {

template <typename Backend>
at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps) {
  typename Backend::Guard guard(input);
  at::Tensor out = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  const RmsNormParams p = make_rms_norm_params(input, weight, eps, out);
  if (p.rows > 0) Backend::launch(p);
  return out;
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& input, const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps) {
  typename Backend::Guard guard(input);
  at::Tensor out = at::empty_like(input, at::MemoryFormat::Contiguous);
  at::Tensor residual_out = at::empty_like(input, at::MemoryFormat::Contiguous);
  const FusedAddRmsNormParams p = make_fused_add_rms_norm_params(input, residual, weight, eps, out, residual_out);
  if (p.rows > 0) Backend::launch(p);
  return {out, residual_out};
}

template <typename Backend>
void rotary_embedding_(at::Tensor& query, at::Tensor& key, const at::Tensor& positions, double theta) {
  typename Backend::Guard guard(query);
  const RotaryParams p = make_rotary_params(query, key, positions, theta);
  if (p.tokens > 0) Backend::launch(p);
}

template <typename Backend>
at::Tensor silu_and_mul(const at::Tensor& input) {
  typename Backend::Guard guard(input);
  TORCH_CHECK_VALUE(input.dim() >= 1, "input must have at least 1 dimension");
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() /= 2;
  at::Tensor out = at::empty(out_shape, input.options());
  const SiluAndMulParams p = make_silu_and_mul_params(input, out);
  if (p.rows > 0) Backend::launch(p);
  return out;
}

template <typename Backend>
void kv_cache_write_(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& key, const at::Tensor& value,
                     const at::Tensor& positions) {
  typename Backend::Guard guard(k_cache);
  const KvCacheWriteParams p = make_kv_cache_write_params(k_cache, v_cache, key, value, positions);
  if (p.batch > 0 && p.tokens > 0) Backend::launch(p);
}

template <typename Backend>
void rotary_embedding_cache_write_(at::Tensor& query, at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
                                   at::Tensor& v_cache, const at::Tensor& positions, double theta) {
  typename Backend::Guard guard(query);
  const RotaryCacheWriteParams p =
      make_rotary_cache_write_params(query, key, value, k_cache, v_cache, positions, theta);
  if (p.rotary.tokens > 0) Backend::launch(p);
}

// Backend::workspace_bytes(p) says how much device scratch the launch needs; it is allocated here
// (through torch's allocator, so it is stream-ordered and cached) and freed after the launch.
template <typename Backend>
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& k_cache, const std::optional<at::Tensor>& v_cache,
                     const at::Tensor& positions, const std::optional<at::Tensor>& cache_lens, int64_t window,
                     double scale) {
  typename Backend::Guard guard(q);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  AttentionParams p = make_attention_params(q, k, v, k_cache, v_cache, positions, cache_lens, window, scale, out);
  if (p.batch == 0 || p.tokens == 0) return out;
  at::Tensor workspace;
  if (const size_t bytes = Backend::workspace_bytes(p); bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
  }
  Backend::launch(p);
  return out;
}

// x @ weight^T over the last dimension of input, after the optional prologue (RMSNorm with
// norm_weight, or SiLU-and-mul), plus the optional residual. Up to Backend::linear_max_rows rows
// (decode) the product streams the weight once and is bound by memory bandwidth: our kernel, with
// the prologue and the residual add fused in. More rows make it a compute-bound GEMM (prefill),
// the job of the vendor library behind at::linear (MKL / oneDNN on the CPU, cuBLAS on CUDA),
// between our prologue kernel and torch's add; the checks and the values are the same on both
// paths.
template <typename Backend>
at::Tensor linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& residual,
                  const std::optional<at::Tensor>& norm_weight, double eps, bool apply_silu_and_mul) {
  typename Backend::Guard guard(input);
  const LinearOptions options{residual, norm_weight, eps, apply_silu_and_mul};
  const int64_t rows = check_linear_args(input, weight, options);
  if (rows > Backend::linear_max_rows(input.scalar_type())) {
    const at::Tensor x = norm_weight          ? rms_norm<Backend>(input.contiguous(), *norm_weight, eps)
                         : apply_silu_and_mul ? silu_and_mul<Backend>(input.contiguous())
                                              : input;
    at::Tensor out = at::linear(x, weight);
    return residual ? out.add_(*residual) : out;
  }
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = weight.size(0);
  at::Tensor out = at::empty(out_shape, input.options().memory_format(at::MemoryFormat::Contiguous));
  // A view when the leading dimensions flatten to evenly strided rows, else a copy of <= 16 rows.
  const at::Tensor input_rows = input.reshape({rows, input.size(-1)});
  const at::Tensor residual_rows = residual ? residual->reshape({rows, weight.size(0)}).contiguous() : at::Tensor();
  const LinearParams p = make_linear_params(input_rows, weight, options, residual_rows, out);
  if (p.rows > 0 && p.out_features > 0) Backend::launch(p);
  return out;
}

// Registers every op's implementation for one dispatch key.
template <typename Backend>
void register_impls(torch::Library& m) {
  m.impl("rms_norm", &rms_norm<Backend>);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm<Backend>);
  m.impl("rotary_embedding_", &rotary_embedding_<Backend>);
  m.impl("silu_and_mul", &silu_and_mul<Backend>);
  m.impl("kv_cache_write_", &kv_cache_write_<Backend>);
  m.impl("rotary_embedding_cache_write_", &rotary_embedding_cache_write_<Backend>);
  m.impl("attention", &attention<Backend>);
  m.impl("linear", &linear<Backend>);
}

}  // namespace mistral_ext::binding
