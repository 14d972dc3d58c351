// The torch library: op schemas and their CPU implementations. Importing the compiled module
// (mistral_ext._C) registers everything; the CUDA implementations live in ops_cuda.cpp.
#include <Python.h>

#include "op_impls.h"

namespace mistral_ext::binding {

struct CpuBackend {
  struct Guard {
    explicit Guard(const at::Tensor& t) {
      TORCH_CHECK_VALUE(t.device().is_cpu(), "expected CPU tensors, got one on ", t.device());
    }
  };
  static void launch(const RmsNormParams& p) { rms_norm_cpu(p); }
  static void launch(const FusedAddRmsNormParams& p) { fused_add_rms_norm_cpu(p); }
  static void launch(const RotaryParams& p) { rotary_embedding_cpu(p); }
  static void launch(const SiluAndMulParams& p) { silu_and_mul_cpu(p); }
  static void launch(const KvCacheWriteParams& p) { kv_cache_write_cpu(p); }
  static void launch(const RotaryCacheWriteParams& p) { rotary_embedding_cache_write_cpu(p); }
  static size_t workspace_bytes(const AttentionParams&) { return 0; }
  static void launch(const AttentionParams& p) { attention_cpu(p); }
  static void launch(const LinearParams& p) { linear_cpu(p); }
  // Measured on a 2-core AVX-512 CPU (docs/RESULTS.md): our AVX2 kernel beats the vendor GEMM up
  // to 16 rows in fp32, but in bf16/fp16 only up to 4 (the vendor uses the CPU's bf16 dot units).
  static int64_t linear_max_rows(at::ScalarType dtype) { return dtype == at::kFloat ? kLinearMaxRows : 4; }
};

}  // namespace mistral_ext::binding

TORCH_LIBRARY(mistral_ext, m) {
  m.def("rms_norm(Tensor input, Tensor weight, float eps) -> Tensor");
  m.def("fused_add_rms_norm(Tensor input, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary_embedding_(Tensor(a!) query, Tensor(b!) key, Tensor positions, float theta) -> ()");
  m.def("silu_and_mul(Tensor input) -> Tensor");
  m.def("kv_cache_write_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor key, Tensor value, Tensor positions) -> ()");
  m.def("rotary_embedding_cache_write_(Tensor(a!) query, Tensor(b!) key, Tensor value, Tensor(c!) k_cache, "
        "Tensor(d!) v_cache, Tensor positions, float theta) -> ()");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? k_cache, Tensor? v_cache, Tensor positions, "
        "Tensor? cache_lens, int window, float scale) -> Tensor");
  m.def("linear(Tensor input, Tensor weight, Tensor? residual=None, Tensor? norm_weight=None, float eps=1e-6, "
        "bool silu_and_mul=False) -> Tensor");
  m.def("decoder_layer(Tensor hidden, Tensor positions, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor? cache_lens, Tensor input_norm_weight, Tensor[] qkv_weights, Tensor o_weight, "
        "Tensor post_attention_norm_weight, Tensor[] gate_up_weights, Tensor down_weight, int num_heads, "
        "int num_kv_heads, int head_dim, float rms_norm_eps, float rope_theta, int window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(mistral_ext, CPU, m) { mistral_ext::binding::register_impls<mistral_ext::binding::CpuBackend>(m); }

// An importable extension module with no Python functions of its own: importing it runs the
// static registrations above.
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
