// mistral_ext kernel library: the plain C++ API of every op, CPU and CUDA.
//
// Everything here works on raw pointers, sizes and a dtype tag; nothing depends on torch.
// Each op has a `*_cpu` and a `*_cuda` entry point with the same arguments (the CUDA one
// also takes the stream to launch on). The CUDA entry points exist only when the library
// was built with CUDA (MISTRAL_EXT_WITH_CUDA is then defined by the CMake target).
//
// Errors: invalid sizes or unsupported configurations throw std::invalid_argument, a failed
// CUDA launch throws std::runtime_error. Pointers are assumed valid and of the stated size.
//
// Conventions (shared with the model, see DESIGN.md):
//  * Tokens are laid out [batch, tokens, heads, head_dim]; a "token stride" is the distance in
//    elements between consecutive tokens (so q/k/v may be column slices of a fused QKV
//    output), heads and head_dim are contiguous inside a token. Batch stride = tokens * token
//    stride.
//  * positions: int64 [batch, tokens], the absolute position of each token in its sequence;
//    a negative position marks a padding token. Within a row, valid positions are strictly
//    increasing and padding comes first (left padding).
//  * KV cache: per layer one key and one value ring buffer, each
//        [batch, capacity, kv_heads, head_dim], contiguous,
//    where the token at position p of sequence b lives in slot p % capacity. cache_lens
//    (int32 [batch]) says how many positions of each sequence have been written: the cache
//    holds positions [max(0, len - capacity), len).
//  * Sliding window W: the query at position i attends to keys at positions j with
//    i - W < j <= i (W keys, itself included); window <= 0 means plain causal.
//  * GQA: query head h reads kv head h / (num_heads / num_kv_heads); K/V never duplicated.
//  * Norms and softmax accumulate in fp32 whatever the storage dtype.
#pragma once

#include <cstddef>
#include <cstdint>

struct CUstream_st;  // cudaStream_t without including the CUDA runtime headers

namespace mistral_ext {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

const char* dtype_name(DType dtype);
size_t dtype_size(DType dtype);

using CudaStream = CUstream_st*;

// Overlapping launches (CUDA on compute capability 9.0 and up; ignored elsewhere). The params of
// the kernels of a decode step (linear, rotary_embedding_cache_write, attention's decode kernel)
// carry `overlap_previous`: when set, the kernel may start while the previous kernel in the stream
// still runs (programmatic dependent launch) and waits on the device for that kernel's results
// before it touches memory it may have written or read, so back-to-back kernels leave no launch
// gap or idle tail. Only linear does work before that wait: it streams its first weight packs, so
// its weight must not be written by any kernel still in flight (true of a model's fixed weights).

// ---------------------------------------------------------------------------------------------
// RMSNorm: out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight, accumulated in fp32.
struct RmsNormParams {
  DType dtype;
  int64_t rows;
  int64_t hidden;
  const void* input;        // [rows, hidden], row stride input_row_stride
  int64_t input_row_stride;
  const void* weight;       // [hidden]
  void* out;                // [rows, hidden], contiguous
  float eps;
};
void rms_norm_cpu(const RmsNormParams& p);

// Fused residual add + RMSNorm: residual_out = input + residual (rounded to dtype);
// out = rms_norm(residual_out) * weight. Returns both, as the next layer needs both.
struct FusedAddRmsNormParams {
  DType dtype;
  int64_t rows;
  int64_t hidden;
  const void* input;        // [rows, hidden], contiguous
  const void* residual;     // [rows, hidden], contiguous
  const void* weight;       // [hidden]
  void* out;                // [rows, hidden], contiguous
  void* residual_out;       // [rows, hidden], contiguous; may alias residual
  float eps;
};
void fused_add_rms_norm_cpu(const FusedAddRmsNormParams& p);

// ---------------------------------------------------------------------------------------------
// Rotary embedding, in place on q and k, transformers' rotate-half layout: for i < D/2,
//   angle = position * theta^(-2i/D)   (inverse frequency rounded to fp32, product in fp32)
//   x[i]       = x[i] * cos - x[i + D/2] * sin
//   x[i + D/2] = x[i + D/2] * cos + x[i] * sin
// Tokens with a negative position (padding) are left untouched.
struct RotaryParams {
  DType dtype;
  int64_t tokens;           // batch * tokens per row, flattened
  int32_t num_heads;
  int32_t num_kv_heads;
  int32_t head_dim;         // even; 64, 96, 128 and every even size up to 256
  void* q;                  // [tokens, num_heads, head_dim], token stride q_token_stride
  int64_t q_token_stride;
  void* k;                  // [tokens, num_kv_heads, head_dim], token stride k_token_stride
  int64_t k_token_stride;
  const int64_t* positions; // [tokens]
  float theta;
};
void rotary_embedding_cpu(const RotaryParams& p);

// ---------------------------------------------------------------------------------------------
// SiLU-and-mul: out[r, i] = silu(x[r, i]) * x[r, inter + i], x = [gate | up].
struct SiluAndMulParams {
  DType dtype;
  int64_t rows;
  int64_t inter;            // intermediate size
  const void* input;        // [rows, 2 * inter], contiguous
  void* out;                // [rows, inter], contiguous
};
void silu_and_mul_cpu(const SiluAndMulParams& p);

// ---------------------------------------------------------------------------------------------
// Ring-buffer KV-cache write: k/v of token t of row b go to slot positions[b, t] % capacity.
// Padding tokens (negative position) are skipped, and so are tokens that a later token of the
// same call overwrites (position <= positions[b, tokens - 1] - capacity), so that a chunk
// longer than the capacity leaves exactly its last `capacity` tokens in the buffer.
struct KvCacheWriteParams {
  DType dtype;
  int32_t batch;
  int32_t tokens;           // tokens per row
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t capacity;
  const void* k;            // [batch, tokens, num_kv_heads, head_dim], token stride k_token_stride
  int64_t k_token_stride;
  const void* v;            // same shape, token stride v_token_stride
  int64_t v_token_stride;
  void* k_cache;            // [batch, capacity, num_kv_heads, head_dim]
  void* v_cache;            // [batch, capacity, num_kv_heads, head_dim]
  const int64_t* positions; // [batch, tokens]
};
void kv_cache_write_cpu(const KvCacheWriteParams& p);

// ---------------------------------------------------------------------------------------------
// Fused RoPE + ring-buffer KV-cache write, in one pass: exactly rotary_embedding(p.rotary) followed
// by kv_cache_write(p.cache), the cache write storing the rotated key. The two halves describe the
// same tokens: p.cache.k must be p.rotary.k (same token stride), both take the same positions and
// dtype, p.rotary.tokens = p.cache.batch * p.cache.tokens, and kv_heads and head_dim agree.
struct RotaryCacheWriteParams {
  RotaryParams rotary;      // q and k rotated in place
  KvCacheWriteParams cache; // the rotated k and v written to the ring buffers
  bool overlap_previous = false;  // see "Overlapping launches" at the top
};
void rotary_embedding_cache_write_cpu(const RotaryCacheWriteParams& p);

// ---------------------------------------------------------------------------------------------
// Sliding-window GQA attention of a chunk of new tokens over the ring-buffer cache (as it was
// before this chunk) plus the chunk's own keys. For the query of row b at position i >= 0:
//   keys  = { cached positions j in [max(0, L - capacity), L) } U { new positions j >= 0 },
//           L = cache_lens[b], restricted to i - W < j <= i,
//   out   = softmax(scale * q . k) @ v over those keys, fp32 accumulation.
// Padding queries (negative position) produce zeros. Exact for chunks of any length as long
// as capacity >= W (or, with no window, capacity >= every position reached).
// Cached positions must all be smaller than the chunk's positions.
struct AttentionParams {
  DType dtype;
  int32_t batch;
  int32_t tokens;           // new tokens per row (1 for a decode step)
  int32_t num_heads;
  int32_t num_kv_heads;     // divides num_heads
  int32_t head_dim;         // 64, 96, 128 (CPU: any size up to 256)
  int32_t capacity;         // ring-buffer slots per sequence (0: no cache)
  int32_t window;           // <= 0: plain causal
  float scale;              // softmax scale, usually 1/sqrt(head_dim)
  const void* q;            // [batch, tokens, num_heads, head_dim], token stride q_token_stride
  int64_t q_token_stride;
  const void* k;            // [batch, tokens, num_kv_heads, head_dim], token stride k_token_stride
  int64_t k_token_stride;
  const void* v;            // same shape as k, token stride v_token_stride
  int64_t v_token_stride;
  const void* k_cache;      // [batch, capacity, num_kv_heads, head_dim] (null when capacity 0)
  const void* v_cache;      // [batch, capacity, num_kv_heads, head_dim]
  const int64_t* positions; // [batch, tokens]
  const int32_t* cache_lens;// [batch] (null when capacity 0)
  void* out;                // [batch, tokens, num_heads, head_dim], contiguous
  void* workspace;          // CUDA only: attention_workspace_bytes(p) bytes of scratch (or null if 0)
  bool overlap_previous = false;  // CUDA decode kernel (bf16 / fp16, tokens * group <= 8): see "Overlapping launches"
};
void attention_cpu(const AttentionParams& p);

// ---------------------------------------------------------------------------------------------
// Linear layer without bias for a few input rows (decode): out[m, n] = sum_k x[m, k] * weight[n, k]
// (x @ weight^T, like torch's F.linear), fp32 accumulation, rounded once to dtype. Input, weight
// and out share the dtype. The kernels stream every weight element once, at memory bandwidth;
// they take at most kLinearMaxRows input rows (more rows make the product compute-bound, the
// work of a vendor GEMM).
//
// The decoder's small steps around each projection ride along, so that they cost no pass (and
// no launch) of their own; each computes what the unfused op does, rounding included (on the
// CPU to the bit; on CUDA the RMSNorm's sum of squares is added in another order):
//  * prologue, applied to x as it is read: kRmsNorm is rms_norm(x, norm_weight, eps) (RmsNormParams),
//    kSiluAndMul is silu_and_mul(x) (SiluAndMulParams: input holds gate | up, 2 * in_features
//    columns); the result is rounded to dtype before the product, as the unfused op's output is;
//  * epilogue: with a residual, out = residual + (x @ weight^T rounded to dtype), the sum of the
//    two dtype tensors rounded once more, as torch adds them. residual may alias out; input
//    must not.
inline constexpr int64_t kLinearMaxRows = 16;
enum class LinearPrologue : int32_t { kNone = 0, kRmsNorm = 1, kSiluAndMul = 2 };
struct LinearParams {
  DType dtype;
  int64_t rows;             // M, at most kLinearMaxRows
  int64_t in_features;      // K
  int64_t out_features;     // N
  const void* input;        // [rows, in_features] ([rows, 2 * in_features] for kSiluAndMul), row stride input_row_stride
  int64_t input_row_stride;
  const void* weight;       // [out_features, in_features], contiguous
  void* out;                // [rows, out_features], contiguous
  LinearPrologue prologue = LinearPrologue::kNone;
  const void* norm_weight = nullptr;  // [in_features] for kRmsNorm
  float eps = 0.f;                    // kRmsNorm
  const void* residual = nullptr;     // [rows, out_features], contiguous, or null
  bool overlap_previous = false;      // see "Overlapping launches" at the top
};
void linear_cpu(const LinearParams& p);

#ifdef MISTRAL_EXT_WITH_CUDA
void rms_norm_cuda(const RmsNormParams& p, CudaStream stream);
void fused_add_rms_norm_cuda(const FusedAddRmsNormParams& p, CudaStream stream);
void rotary_embedding_cuda(const RotaryParams& p, CudaStream stream);
void silu_and_mul_cuda(const SiluAndMulParams& p, CudaStream stream);
void kv_cache_write_cuda(const KvCacheWriteParams& p, CudaStream stream);
void rotary_embedding_cache_write_cuda(const RotaryCacheWriteParams& p, CudaStream stream);
// Scratch the CUDA attention needs for split-KV partial results (depends on sizes only).
size_t attention_workspace_bytes(const AttentionParams& p);
void attention_cuda(const AttentionParams& p, CudaStream stream);
void linear_cuda(const LinearParams& p, CudaStream stream);
#endif

}  // namespace mistral_ext
