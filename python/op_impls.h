// The op implementations, written once over a Backend that launches the params struct on its
// device (CpuBackend in ops.cpp, CudaBackend in ops_cuda.cpp). Backend provides
//   struct Guard { explicit Guard(const at::Tensor&); };   // device guard for the call
//   static void launch(const XxxParams&);                  // one overload per op
//   static int64_t linear_max_rows(at::ScalarType);        // rows up to which our GEMV wins
#pragma once

#include <optional>
#include <tuple>
#include <vector>

#include <ATen/record_function.h>

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

// Runs a step of a composite op under the name of the op it calls, for the profiler to show the
// step as when the ops are called one by one from Python (scripts/profile_step.py counts them).
template <typename Step>
decltype(auto) as_op(const char* name, Step&& step) {
  RECORD_FUNCTION(name, std::vector<c10::IValue>());
  return step();
}

// norm(x) @ W^T for W the weights stacked by rows: one product for a single (fused) weight, else
// one per weight with their outputs side by side.
template <typename Backend>
at::Tensor normed_projections(const at::Tensor& x, at::TensorList weights, const at::Tensor& norm_weight,
                              double eps) {
  std::vector<at::Tensor> outs;
  for (const at::Tensor& weight : weights) {
    outs.push_back(as_op("mistral_ext::linear",
                         [&] { return linear<Backend>(x, weight, std::nullopt, norm_weight, eps, false); }));
  }
  return outs.size() == 1 ? outs[0] : at::cat(outs, -1);
}

// One Mistral decoder layer: the residual stream hidden [batch, tokens, hidden] after attention
// and the MLP, the math of mistral_ext/modeling.py's docstring (mistral_ext/reference.py's
// decoder_layer is the same in plain PyTorch). It is the ops above called from C++: the model
// pays one dispatch per layer instead of a dozen Python calls (docs/RESULTS.md, "Host time per
// decode step"). qkv_weights: [q|k|v] fused, or q, k, v; gate_up_weights likewise. No cache is
// one of capacity 0, [batch, 0, kv_heads, head_dim]: torch.compile's Inductor fails on a mutable
// argument that may be None.
// The caches are written: a single-token step writes its key first, fused with RoPE. That is
// exact: the slot p % capacity it overwrites holds position p - capacity or older, outside query
// p's window as capacity >= window (or never needed when the capacity is smaller: it then covers
// every position). A longer chunk writes after attention, as its earlier queries may still see
// the keys its later tokens overwrite.
template <typename Backend>
at::Tensor decoder_layer(const at::Tensor& hidden, const at::Tensor& positions, at::Tensor& k_cache,
                         at::Tensor& v_cache, const std::optional<at::Tensor>& cache_lens,
                         const at::Tensor& input_norm_weight,
                         at::TensorList qkv_weights, const at::Tensor& o_weight,
                         const at::Tensor& post_attention_norm_weight, at::TensorList gate_up_weights,
                         const at::Tensor& down_weight, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                         double rms_norm_eps, double rope_theta, int64_t window, double scale) {
  typename Backend::Guard guard(hidden);
  check_decoder_layer_args(hidden, k_cache, cache_lens, input_norm_weight, qkv_weights, o_weight,
                           post_attention_norm_weight, gate_up_weights, down_weight, num_heads, num_kv_heads, head_dim);
  const int64_t batch = hidden.size(0), tokens = hidden.size(1);
  if (batch == 0 || tokens == 0) return hidden.clone(at::MemoryFormat::Contiguous);  // nothing to attend or write
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  const at::Tensor qkv = normed_projections<Backend>(hidden, qkv_weights, input_norm_weight, rms_norm_eps);
  at::Tensor q = qkv.narrow(-1, 0, q_size).view({batch, tokens, num_heads, head_dim});
  at::Tensor k = qkv.narrow(-1, q_size, kv_size).view({batch, tokens, num_kv_heads, head_dim});
  const at::Tensor v = qkv.narrow(-1, q_size + kv_size, kv_size).view({batch, tokens, num_kv_heads, head_dim});
  const bool cached = k_cache.size(1) > 0;
  const bool write_first = cached && tokens == 1;
  if (write_first) {
    as_op("mistral_ext::rotary_embedding_cache_write_",
          [&] { rotary_embedding_cache_write_<Backend>(q, k, v, k_cache, v_cache, positions, rope_theta); });
  } else {
    as_op("mistral_ext::rotary_embedding_", [&] { rotary_embedding_<Backend>(q, k, positions, rope_theta); });
  }
  const at::Tensor attended = as_op("mistral_ext::attention", [&] {
    return attention<Backend>(q, k, v, k_cache, v_cache, positions, cache_lens, window, scale);
  });
  if (cached && !write_first) {
    as_op("mistral_ext::kv_cache_write_", [&] { kv_cache_write_<Backend>(k_cache, v_cache, k, v, positions); });
  }
  const at::Tensor h = as_op("mistral_ext::linear", [&] {
    return linear<Backend>(attended.view({batch, tokens, q_size}), o_weight, hidden, std::nullopt, rms_norm_eps, false);
  });
  const at::Tensor gate_up = normed_projections<Backend>(h, gate_up_weights, post_attention_norm_weight, rms_norm_eps);
  return as_op("mistral_ext::linear", [&] {
    return linear<Backend>(gate_up, down_weight, h, std::nullopt, rms_norm_eps, true);
  });
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
  m.impl("decoder_layer", &decoder_layer<Backend>);
}

}  // namespace mistral_ext::binding
