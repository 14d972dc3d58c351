// CUDA implementations of the torch ops: same checks as the CPU ones (op_impls.h), launched on
// the tensors' device and its current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "op_impls.h"

namespace mistral_ext::binding {

struct CudaBackend {
  struct Guard {
    explicit Guard(const at::Tensor& t) : device_guard(check_cuda(t)) {}
    static at::Device check_cuda(const at::Tensor& t) {
      TORCH_CHECK_VALUE(t.device().is_cuda(), "expected CUDA tensors, got one on ", t.device());
      return t.device();
    }
    c10::cuda::CUDAGuard device_guard;
  };
  static CudaStream stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
  static void launch(const RmsNormParams& p) { rms_norm_cuda(p, stream()); }
  static void launch(const FusedAddRmsNormParams& p) { fused_add_rms_norm_cuda(p, stream()); }
  static void launch(const RotaryParams& p) { rotary_embedding_cuda(p, stream()); }
  static void launch(const SiluAndMulParams& p) { silu_and_mul_cuda(p, stream()); }
  static void launch(const KvCacheWriteParams& p) { kv_cache_write_cuda(p, stream()); }
  static void launch(const RotaryCacheWriteParams& p) { rotary_embedding_cache_write_cuda(p, stream()); }
  static size_t workspace_bytes(const AttentionParams& p) { return attention_workspace_bytes(p); }
  static void launch(const AttentionParams& p) { attention_cuda(p, stream()); }
  static void launch(const LinearParams& p) { linear_cuda(p, stream()); }
  // Measured on an H100 (docs/RESULTS.md, Mistral-7B shapes, bf16): our GEMV matches cuBLAS at one
  // row and falls behind from two rows on (5x slower at 16), so only single rows take it.
  static int64_t linear_max_rows(at::ScalarType) { return 1; }
};

}  // namespace mistral_ext::binding

TORCH_LIBRARY_IMPL(mistral_ext, CUDA, m) {
  mistral_ext::binding::register_impls<mistral_ext::binding::CudaBackend>(m);
}
