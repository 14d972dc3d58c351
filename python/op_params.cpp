// Checks and params for the elementwise / normalisation / cache / attention / linear ops (see
// op_params.h).
#include "op_params.h"

#include <cmath>
#include <limits>

namespace mistral_ext::binding {

namespace {

// Rows of a [..., hidden] tensor with a unit inner stride and one uniform row stride.
int64_t row_stride_of(const at::Tensor& t) {
  if (t.is_contiguous()) return t.size(-1);
  if (t.dim() == 2 && t.stride(1) == 1) return t.stride(0);
  return -1;
}

// A norm's weight [hidden] for input [..., hidden] (RMSNorm, the linear op's RMSNorm prologue).
void check_weight(const at::Tensor& weight, const at::Tensor& input, int64_t hidden, const char* name = "weight",
                  const char* input_name = "input") {
  check_same_device(weight, input, name, input_name);
  check_same_dtype(weight, input, name, input_name);
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == hidden, name, " must have shape [", hidden,
                    "] to match the last dimension of ", input_name, ", got ", weight.sizes());
  check_contiguous(weight, name);
}

}  // namespace

RmsNormParams make_rms_norm_params(const at::Tensor& input, const at::Tensor& weight, double eps, at::Tensor& out) {
  TORCH_CHECK_VALUE(input.dim() >= 1, "input must have at least 1 dimension");
  const int64_t hidden = input.size(-1);
  TORCH_CHECK_VALUE(hidden > 0, "input's last dimension (hidden size) must be > 0");
  RmsNormParams p{};
  p.dtype = dtype_tag(input, "input");
  check_weight(weight, input, hidden);
  TORCH_CHECK_VALUE(eps >= 0, "eps must be >= 0, got ", eps);
  p.input_row_stride = row_stride_of(input);
  TORCH_CHECK_VALUE(p.input_row_stride >= 0, "input must be contiguous or a 2-D tensor with unit column stride");
  p.rows = input.numel() / hidden;
  p.hidden = hidden;
  p.input = input.data_ptr();
  p.weight = weight.data_ptr();
  p.out = out.data_ptr();
  p.eps = static_cast<float>(eps);
  return p;
}

FusedAddRmsNormParams make_fused_add_rms_norm_params(const at::Tensor& input, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps, at::Tensor& out,
                                                     at::Tensor& residual_out) {
  TORCH_CHECK_VALUE(input.dim() >= 1, "input must have at least 1 dimension");
  const int64_t hidden = input.size(-1);
  TORCH_CHECK_VALUE(hidden > 0, "input's last dimension (hidden size) must be > 0");
  FusedAddRmsNormParams p{};
  p.dtype = dtype_tag(input, "input");
  check_same_device(residual, input, "residual", "input");
  check_same_dtype(residual, input, "residual", "input");
  TORCH_CHECK_VALUE(residual.sizes() == input.sizes(), "residual must have the shape of input ", input.sizes(),
                    ", got ", residual.sizes());
  check_contiguous(input, "input");
  check_contiguous(residual, "residual");
  check_weight(weight, input, hidden);
  TORCH_CHECK_VALUE(eps >= 0, "eps must be >= 0, got ", eps);
  p.rows = input.numel() / hidden;
  p.hidden = hidden;
  p.input = input.data_ptr();
  p.residual = residual.data_ptr();
  p.weight = weight.data_ptr();
  p.out = out.data_ptr();
  p.residual_out = residual_out.data_ptr();
  p.eps = static_cast<float>(eps);
  return p;
}

RotaryParams make_rotary_params(at::Tensor& query, at::Tensor& key, const at::Tensor& positions, double theta) {
  RotaryParams p{};
  p.dtype = dtype_tag(query, "query");
  const int64_t q_stride = token_stride_of(query, "query");
  const int64_t k_stride = token_stride_of(key, "key");
  check_same_device(key, query, "key", "query");
  check_same_dtype(key, query, "key", "query");
  TORCH_CHECK_VALUE(key.size(0) == query.size(0) && key.size(1) == query.size(1), "key's batch and tokens ",
                    key.sizes().slice(0, 2), " must match query's ", query.sizes().slice(0, 2));
  TORCH_CHECK_VALUE(key.size(3) == query.size(3), "key's head_dim ", key.size(3), " must match query's ",
                    query.size(3));
  const int64_t head_dim = query.size(3);
  TORCH_CHECK_VALUE(head_dim % 2 == 0 && head_dim >= 2 && head_dim <= 256,
                    "head_dim must be even and at most 256, got ", head_dim);
  check_positions(positions, query, query.sizes().slice(0, 2), "query");
  TORCH_CHECK_VALUE(theta > 0, "rope theta must be > 0, got ", theta);
  p.tokens = query.size(0) * query.size(1);
  p.num_heads = static_cast<int32_t>(query.size(2));
  p.num_kv_heads = static_cast<int32_t>(key.size(2));
  p.head_dim = static_cast<int32_t>(head_dim);
  p.q = query.data_ptr();
  p.q_token_stride = q_stride;
  p.k = key.data_ptr();
  p.k_token_stride = k_stride;
  p.positions = positions.data_ptr<int64_t>();
  p.theta = static_cast<float>(theta);
  return p;
}

SiluAndMulParams make_silu_and_mul_params(const at::Tensor& input, at::Tensor& out) {
  SiluAndMulParams p{};
  p.dtype = dtype_tag(input, "input");
  TORCH_CHECK_VALUE(input.dim() >= 1 && input.size(-1) % 2 == 0 && input.size(-1) > 0,
                    "input's last dimension must be even ([gate | up]), got shape ", input.sizes());
  check_contiguous(input, "input");
  p.inter = input.size(-1) / 2;
  p.rows = input.numel() / input.size(-1);
  p.input = input.data_ptr();
  p.out = out.data_ptr();
  return p;
}

KvCacheWriteParams make_kv_cache_write_params(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& key,
                                              const at::Tensor& value, const at::Tensor& positions) {
  KvCacheWriteParams p{};
  p.dtype = dtype_tag(k_cache, "k_cache");
  check_rank(k_cache, 4, "k_cache");
  check_contiguous(k_cache, "k_cache");
  check_contiguous(v_cache, "v_cache");
  check_same_device(v_cache, k_cache, "v_cache", "k_cache");
  check_same_dtype(v_cache, k_cache, "v_cache", "k_cache");
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache shape ", v_cache.sizes(),
                    " must equal k_cache shape ", k_cache.sizes());
  const int64_t k_stride = token_stride_of(key, "key");
  const int64_t v_stride = token_stride_of(value, "value");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{key, "key"}, {value, "value"}}) {
    check_same_device(t, k_cache, name, "k_cache");
    check_same_dtype(t, k_cache, name, "k_cache");
    TORCH_CHECK_VALUE(t.size(0) == k_cache.size(0) && t.size(2) == k_cache.size(2) && t.size(3) == k_cache.size(3),
                      name, " shape ", t.sizes(), " does not match k_cache [batch, capacity, kv_heads, head_dim] = ",
                      k_cache.sizes());
  }
  TORCH_CHECK_VALUE(value.size(1) == key.size(1), "value has ", value.size(1), " tokens but key has ", key.size(1));
  TORCH_CHECK_VALUE(k_cache.size(1) > 0, "k_cache capacity must be > 0");
  check_positions(positions, key, key.sizes().slice(0, 2), "key");
  p.batch = static_cast<int32_t>(key.size(0));
  p.tokens = static_cast<int32_t>(key.size(1));
  p.num_kv_heads = static_cast<int32_t>(key.size(2));
  p.head_dim = static_cast<int32_t>(key.size(3));
  p.capacity = static_cast<int32_t>(k_cache.size(1));
  p.k = key.data_ptr();
  p.k_token_stride = k_stride;
  p.v = value.data_ptr();
  p.v_token_stride = v_stride;
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.positions = positions.data_ptr<int64_t>();
  return p;
}

RotaryCacheWriteParams make_rotary_cache_write_params(at::Tensor& query, at::Tensor& key, const at::Tensor& value,
                                                      at::Tensor& k_cache, at::Tensor& v_cache,
                                                      const at::Tensor& positions, double theta) {
  return {make_rotary_params(query, key, positions, theta),
          make_kv_cache_write_params(k_cache, v_cache, key, value, positions)};
}

namespace {

void check_fits_int32(int64_t n, const char* what) {
  TORCH_CHECK_VALUE(n <= std::numeric_limits<int32_t>::max(), what, " must fit in int32, got ", n);
}

// The head counts and head size the attention kernels take.
void check_attention_heads(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, bool cuda) {
  TORCH_CHECK_VALUE(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "num_heads (", num_heads,
                    ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
  if (cuda) {
    TORCH_CHECK_VALUE(head_dim == 64 || head_dim == 96 || head_dim == 128,
                      "head_dim must be 64, 96 or 128 on CUDA, got ", head_dim);
  } else {
    TORCH_CHECK_VALUE(head_dim >= 1 && head_dim <= 256, "head_dim must be in [1, 256], got ", head_dim);
  }
}

// cache_lens: required with a cache of capacity > 0; when given, int32 [batch] on ref's device.
void check_cache_lens(const std::optional<at::Tensor>& cache_lens, int64_t capacity, const at::Tensor& ref,
                      const char* ref_name) {
  TORCH_CHECK_VALUE(capacity == 0 || cache_lens.has_value(), "cache_lens is required with a cache");
  if (!cache_lens.has_value()) return;
  TORCH_CHECK_TYPE(cache_lens->scalar_type() == at::kInt, "cache_lens must be int32, got ", cache_lens->scalar_type());
  check_same_device(*cache_lens, ref, "cache_lens", ref_name);
  TORCH_CHECK_VALUE(cache_lens->dim() == 1 && cache_lens->size(0) == ref.size(0), "cache_lens must have shape [",
                    ref.size(0), "], got ", cache_lens->sizes());
  check_contiguous(*cache_lens, "cache_lens");
}

// CPU tensors only (reading device memory would synchronise): each row's valid positions
// increase after its padding, and its cached positions precede them.
void check_positions_against_cache(const at::Tensor& positions, const int32_t* cache_lens) {
  const int64_t batch = positions.size(0), tokens = positions.size(1);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* row = pos + b * tokens;
    int64_t t = 0;
    while (t < tokens && row[t] < 0) ++t;
    for (int64_t u = t + 1; u < tokens; ++u)
      TORCH_CHECK_VALUE(row[u] > row[u - 1], "positions of row ", b,
                        " must be padding (negative) first, then strictly increasing; got ", row[u - 1], " then ",
                        row[u], " at tokens ", u - 1, " and ", u);
    if (cache_lens == nullptr) continue;
    TORCH_CHECK_VALUE(cache_lens[b] >= 0, "cache_lens[", b, "] must be >= 0, got ", cache_lens[b]);
    TORCH_CHECK_VALUE(t == tokens || cache_lens[b] <= row[t], "cache_lens[", b, "] = ", cache_lens[b],
                      " but row ", b, "'s positions start at ", row[t],
                      ": the cache must hold only positions before the chunk's");
  }
}

}  // namespace

AttentionParams make_attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const std::optional<at::Tensor>& k_cache,
                                      const std::optional<at::Tensor>& v_cache, const at::Tensor& positions,
                                      const std::optional<at::Tensor>& cache_lens, int64_t window, double scale,
                                      at::Tensor& out) {
  AttentionParams p{};
  p.dtype = dtype_tag(q, "q");
  const int64_t q_stride = token_stride_of(q, "q");
  const int64_t k_stride = token_stride_of(k, "k");
  const int64_t v_stride = token_stride_of(v, "v");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k, "k"}, {v, "v"}}) {
    check_same_device(t, q, name, "q");
    check_same_dtype(t, q, name, "q");
    TORCH_CHECK_VALUE(t.size(0) == q.size(0) && t.size(1) == q.size(1), name, "'s batch and tokens ",
                      t.sizes().slice(0, 2), " must match q's ", q.sizes().slice(0, 2));
    TORCH_CHECK_VALUE(t.size(3) == q.size(3), name, "'s head_dim ", t.size(3), " must match q's ", q.size(3));
  }
  TORCH_CHECK_VALUE(v.size(2) == k.size(2), "v has ", v.size(2), " kv heads but k has ", k.size(2));
  const int64_t num_heads = q.size(2), num_kv_heads = k.size(2), head_dim = q.size(3);
  check_attention_heads(num_heads, num_kv_heads, head_dim, q.is_cuda());
  check_positions(positions, q, q.sizes().slice(0, 2), "q");
  check_fits_int32(q.size(0), "batch");
  check_fits_int32(q.size(1), "tokens");
  TORCH_CHECK_VALUE(window <= std::numeric_limits<int32_t>::max(), "window must fit in int32, got ", window);
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);

  TORCH_CHECK_VALUE(k_cache.has_value() == v_cache.has_value(), "k_cache and v_cache must both be given or both be None");
  int64_t capacity = 0;
  if (k_cache.has_value()) {
    for (const auto& [t, name] :
         {std::pair<const at::Tensor&, const char*>{*k_cache, "k_cache"}, {*v_cache, "v_cache"}}) {
      check_same_device(t, q, name, "q");
      check_same_dtype(t, q, name, "q");
      check_rank(t, 4, name);
      TORCH_CHECK_VALUE(t.size(0) == q.size(0) && t.size(2) == num_kv_heads && t.size(3) == head_dim, name,
                        " must have shape [batch, capacity, kv_heads, head_dim] = [", q.size(0), ", capacity, ",
                        num_kv_heads, ", ", head_dim, "], got ", t.sizes());
      check_contiguous(t, name);
    }
    TORCH_CHECK_VALUE(v_cache->sizes() == k_cache->sizes(), "v_cache shape ", v_cache->sizes(),
                      " must equal k_cache shape ", k_cache->sizes());
    capacity = k_cache->size(1);
    check_fits_int32(capacity, "k_cache's capacity");
  }
  check_cache_lens(cache_lens, capacity, q, "q");
  const bool cached = capacity > 0;
  if (positions.is_cpu()) check_positions_against_cache(positions, cached ? cache_lens->data_ptr<int32_t>() : nullptr);

  p.batch = static_cast<int32_t>(q.size(0));
  p.tokens = static_cast<int32_t>(q.size(1));
  p.num_heads = static_cast<int32_t>(num_heads);
  p.num_kv_heads = static_cast<int32_t>(num_kv_heads);
  p.head_dim = static_cast<int32_t>(head_dim);
  p.capacity = static_cast<int32_t>(capacity);
  p.window = window > 0 ? static_cast<int32_t>(window) : 0;
  p.scale = static_cast<float>(scale);
  p.q = q.data_ptr();
  p.q_token_stride = q_stride;
  p.k = k.data_ptr();
  p.k_token_stride = k_stride;
  p.v = v.data_ptr();
  p.v_token_stride = v_stride;
  p.k_cache = cached ? k_cache->data_ptr() : nullptr;
  p.v_cache = cached ? v_cache->data_ptr() : nullptr;
  p.positions = positions.data_ptr<int64_t>();
  p.cache_lens = cached ? cache_lens->data_ptr<int32_t>() : nullptr;
  p.out = out.data_ptr();
  p.workspace = nullptr;
  return p;
}

int64_t check_linear_args(const at::Tensor& input, const at::Tensor& weight, const LinearOptions& options) {
  dtype_tag(input, "input");
  TORCH_CHECK_VALUE(input.dim() >= 1, "input must have at least 1 dimension");
  check_same_device(weight, input, "weight", "input");
  check_same_dtype(weight, input, "weight", "input");
  check_rank(weight, 2, "weight");
  check_contiguous(weight, "weight");
  TORCH_CHECK_VALUE(input.size(-1) > 0, "input's last dimension (in_features) must be > 0");
  const int64_t in_features = weight.size(1);
  if (options.silu_and_mul) {
    TORCH_CHECK_VALUE(!options.norm_weight, "linear takes one prologue: norm_weight or silu_and_mul, not both");
    TORCH_CHECK_VALUE(input.size(-1) == 2 * in_features, "with silu_and_mul, input's last dimension must be 2 * ",
                      in_features, " (gate | up) for weight of shape ", weight.sizes(), ", got ", input.sizes());
  } else {
    TORCH_CHECK_VALUE(input.size(-1) == in_features, "weight must have shape [out_features, ", input.size(-1),
                      "] to match input's last dimension, got ", weight.sizes());
  }
  if (options.norm_weight) {
    check_weight(*options.norm_weight, input, in_features, "norm_weight");
    TORCH_CHECK_VALUE(options.eps >= 0, "eps must be >= 0, got ", options.eps);
  }
  if (options.residual) {
    const at::Tensor& residual = *options.residual;
    check_same_device(residual, input, "residual", "input");
    check_same_dtype(residual, input, "residual", "input");
    std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
    out_shape.back() = weight.size(0);
    TORCH_CHECK_VALUE(residual.sizes() == at::IntArrayRef(out_shape), "residual must have the output's shape ",
                      at::IntArrayRef(out_shape), ", got ", residual.sizes());
  }
  TORCH_CHECK_VALUE(input.stride(-1) == 1, "input must have a unit stride in its last dimension (strides ",
                    input.strides(), ")");
  return input.numel() / input.size(-1);
}

LinearParams make_linear_params(const at::Tensor& input, const at::Tensor& weight, const LinearOptions& options,
                                const at::Tensor& residual, at::Tensor& out) {
  LinearParams p{};
  p.dtype = dtype_tag(input, "input");
  const std::optional<at::Tensor> residual_rows = options.residual ? std::optional(residual) : std::nullopt;
  p.rows = check_linear_args(input, weight, {residual_rows, options.norm_weight, options.eps, options.silu_and_mul});
  TORCH_CHECK_VALUE(p.rows <= kLinearMaxRows, "input has ", p.rows, " rows; the linear kernel takes at most ",
                    kLinearMaxRows);
  p.input_row_stride = row_stride_of(input);
  TORCH_CHECK_VALUE(p.input_row_stride >= 0, "input must be contiguous or a 2-D tensor with unit column stride");
  p.in_features = weight.size(1);
  p.out_features = weight.size(0);
  p.input = input.data_ptr();
  p.weight = weight.data_ptr();
  p.out = out.data_ptr();
  if (options.norm_weight) {
    p.prologue = LinearPrologue::kRmsNorm;
    p.norm_weight = options.norm_weight->data_ptr();
    p.eps = static_cast<float>(options.eps);
  } else if (options.silu_and_mul) {
    p.prologue = LinearPrologue::kSiluAndMul;
  }
  if (options.residual) {
    check_contiguous(residual, "residual");
    p.residual = residual.data_ptr();
  }
  return p;
}

namespace {

// One of decoder_layer's weights (named name, or name[index] for index >= 0): hidden's device and
// dtype, shape [rows (any when < 0), cols], contiguous.
void check_layer_weight(const at::Tensor& weight, const at::Tensor& hidden, const char* name, int64_t index,
                        int64_t rows, int64_t cols) {
  const bool shape_ok = weight.dim() == 2 && (rows < 0 || weight.size(0) == rows) && weight.size(1) == cols;
  if (shape_ok && weight.device() == hidden.device() && weight.scalar_type() == hidden.scalar_type() &&
      weight.is_contiguous())
    return;  // the label is built only to name a failure
  const std::string label = index < 0 ? std::string(name) : c10::str(name, "[", index, "]");
  check_same_device(weight, hidden, label.c_str(), "hidden");
  check_same_dtype(weight, hidden, label.c_str(), "hidden");
  TORCH_CHECK_VALUE(shape_ok, label,
                    " must have shape [", rows < 0 ? std::string("rows") : std::to_string(rows), ", ", cols,
                    "], got ", weight.sizes());
  check_contiguous(weight, label.c_str());
}

// The weights of a fused projection (one tensor, or its parts): [rows, in_features] each; returns
// their rows in all.
int64_t check_projection_weights(at::TensorList weights, const at::Tensor& hidden, const char* name,
                                 int64_t in_features) {
  TORCH_CHECK_VALUE(!weights.empty(), name, " must hold at least one weight");
  int64_t rows = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    check_layer_weight(weights[i], hidden, name, weights.size() > 1 ? static_cast<int64_t>(i) : -1, -1,
                       in_features);
    rows += weights[i].size(0);
  }
  return rows;
}

}  // namespace

void check_decoder_layer_args(const at::Tensor& hidden, const at::Tensor& k_cache,
                              const std::optional<at::Tensor>& cache_lens, const at::Tensor& input_norm_weight,
                              at::TensorList qkv_weights, const at::Tensor& o_weight,
                              const at::Tensor& post_attention_norm_weight, at::TensorList gate_up_weights,
                              const at::Tensor& down_weight, int64_t num_heads, int64_t num_kv_heads,
                              int64_t head_dim) {
  dtype_tag(hidden, "hidden");
  check_rank(hidden, 3, "hidden");
  const int64_t hidden_size = hidden.size(2);
  TORCH_CHECK_VALUE(hidden_size > 0, "hidden's last dimension (hidden size) must be > 0");
  TORCH_CHECK_VALUE(num_heads > 0 && num_kv_heads > 0 && head_dim > 0,
                    "num_heads, num_kv_heads and head_dim must be > 0, got ", num_heads, ", ", num_kv_heads, ", ",
                    head_dim);
  check_weight(input_norm_weight, hidden, hidden_size, "input_norm_weight", "hidden");
  check_weight(post_attention_norm_weight, hidden, hidden_size, "post_attention_norm_weight", "hidden");
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  const int64_t qkv_rows = check_projection_weights(qkv_weights, hidden, "qkv_weights", hidden_size);
  TORCH_CHECK_VALUE(qkv_rows == q_size + 2 * kv_size, "qkv_weights have ", qkv_rows,
                    " rows in all, but (num_heads + 2 * num_kv_heads) * head_dim = ", q_size + 2 * kv_size);
  check_layer_weight(o_weight, hidden, "o_weight", -1, hidden_size, q_size);
  const int64_t gate_up_rows = check_projection_weights(gate_up_weights, hidden, "gate_up_weights", hidden_size);
  TORCH_CHECK_VALUE(gate_up_rows % 2 == 0, "gate_up_weights have ", gate_up_rows,
                    " rows in all: gate and up must have the same number");
  check_layer_weight(down_weight, hidden, "down_weight", -1, hidden_size, gate_up_rows / 2);
  // The checks of attention that a decode step would otherwise meet after it has written the cache.
  check_attention_heads(num_heads, num_kv_heads, head_dim, hidden.is_cuda());
  check_cache_lens(cache_lens, k_cache.size(1), hidden, "hidden");
}

}  // namespace mistral_ext::binding
