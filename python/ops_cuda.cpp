// CUDA implementations of the torch ops: same checks as the CPU ones (op_impls.h), launched on
// the tensors' device and its current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>

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
  static void launch(RotaryCacheWriteParams p) {
    p.overlap_previous = overlap_launches();
    rotary_embedding_cache_write_cuda(p, stream());
  }
  static size_t workspace_bytes(const AttentionParams& p) { return attention_workspace_bytes(p); }
  static void launch(AttentionParams p) {
    p.overlap_previous = overlap_launches();
    attention_cuda(p, stream());
  }
  static void launch(LinearParams p) {
    p.overlap_previous = overlap_launches();
    linear_cuda(p, stream());
  }
  // MISTRAL_EXT_PDL=1 at run time: the decode step's kernels may start while the kernel before
  // them finishes ("Overlapping launches" in kernels.h); the linear op's weight must then not be
  // written by a kernel in flight, as a model's is not; that is the caller's promise, hence
  // opt-in (measured 2-3% per decode token, docs/RESULTS.md).
  static bool overlap_launches() {
    const char* flag = std::getenv("MISTRAL_EXT_PDL");
    return flag != nullptr && std::strcmp(flag, "1") == 0;
  }
  // Measured on an H100 (docs/RESULTS.md, Mistral-7B shapes, bf16): our GEMV matches cuBLAS at one
  // row and falls behind from two rows on (5x slower at 16), so only single rows take it.
  static int64_t linear_max_rows(at::ScalarType) { return 1; }
};

}  // namespace mistral_ext::binding

TORCH_LIBRARY_IMPL(mistral_ext, CUDA, m) {
  mistral_ext::binding::register_impls<mistral_ext::binding::CudaBackend>(m);
}
