// Internal to the CUDA attention (attention.cu, attention_sm90.cu): the pieces that the tensor-core
// kernels share. A CTA owns 128 query rows of one (sequence, kv head); each warp owns 16 of them
// and keeps their scores and output accumulators in registers, in the accumulator layout common
// to mma.sync m16n8 and wgmma m64nN: with g = lane / 4 and c = lane % 4, element e of an 8-column
// fragment is row g + 8 * (e / 2), column 2c + e % 2.
#pragma once

#include <climits>

#include "attention_common.h"
#include "cuda_common.cuh"

namespace mistral_ext {
namespace detail {

constexpr int kBlockM = 128;  // query rows per CTA: each K/V tile read from L2 serves 128 rows
constexpr int kAbsentKey = INT_MAX;  // key position of empty tile rows: no query sees it
constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+).

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy, cached in L2 only. present = false writes 16 zero bytes and reads
// nothing (src-size 0), so empty rows never produce NaN through 0 * garbage. The "memory" clobbers
// keep the compiler from moving shared-memory reads and writes across the copies and the waits
// (the decode kernel has no barrier between a wait and its reads).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool present) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem)), "l"(gmem),
               "r"(present ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most `kPending` of this thread's most recent groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Two floats rounded to T and packed into one register, lo in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// 2^x with the SFU (relative error ~2^-22); 2^-inf = 0.
__device__ __forceinline__ float exp2_fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---------------------------------------------------------------------------------------------
// Rows and keys of a CTA.

// Everything a CTA needs to know about its 128 query rows: row r of the CTA is row0 + r of the
// (token, head) rows of (b, kv_head), i.e. token (row0 + r) / group, head kv_head * group +
// (row0 + r) % group.
struct RowBlock {
  int b, kv_head, group, rows_total, row0;
  __device__ int token(int r) const { return (row0 + r) / group; }
  __device__ int head(int r) const { return kv_head * group + (row0 + r) % group; }
  __device__ bool exists(int r) const { return row0 + r < rows_total; }
  __device__ int last_token() const {
    return ((row0 + kBlockM < rows_total ? row0 + kBlockM : rows_total) - 1) / group;
  }
};

// The rows of a tensor-core CTA: grid (m_blocks * num_splits, num_kv_heads, batch).
__device__ __forceinline__ RowBlock cta_row_block(const AttentionParams& p, int num_splits) {
  const int group = p.num_heads / p.num_kv_heads;
  return RowBlock{static_cast<int>(blockIdx.z), static_cast<int>(blockIdx.y), group, p.tokens * group,
                  static_cast<int>(blockIdx.x / num_splits) * kBlockM};
}

// The key span of a CTA's queries t_first..t_last of row b, and the tiles of kTileKeys keys
// [begin, end) of it that split `split` of `num_splits` covers: none when the last query is
// padding (padding comes first, so then every query is).
struct TileRange {
  KeySpan span;
  int begin, end;
};
template <int kTileKeys>
__device__ __forceinline__ TileRange split_tile_range(const AttentionParams& p, int b, int t_first, int t_last,
                                                      int num_splits, int split) {
  TileRange range{};
  if (p.positions[static_cast<int64_t>(b) * p.tokens + t_last] >= 0) {
    range.span = attention_key_span(p, b, t_first, t_last);
    const int tiles = (range.span.end - range.span.begin + kTileKeys - 1) / kTileKeys;
    const int per_split = (tiles + num_splits - 1) / num_splits;
    range.begin = split * per_split;
    range.end = range.begin + per_split < tiles ? range.begin + per_split : tiles;
  }
  return range;
}

// ---------------------------------------------------------------------------------------------
// Per-warp state of 16 query rows: this lane holds rows g and g + 8 (g = lane / 4) of the warp's
// block, i.e. element i of each pair below is row g + 8i.
template <int kHeadDim>
struct WarpRows {
  float out[kHeadDim / 8][4];  // accumulator fragments of the 16 x head_dim output, one per 8 columns
  float max[2];                // running max of scale * log2(e) * q.k
  float sum[2];                // running sum of 2^(score - max), this lane's columns only
  int query_pos[2];            // -1 for padding and rows past the end
  int window_low[2];           // keys at positions <= window_low are outside the window
};

// The state of warp `warp`'s rows (CTA rows 16 * warp ..) before the first key.
template <int kHeadDim>
__device__ __forceinline__ WarpRows<kHeadDim> start_warp_rows(const AttentionParams& p, const RowBlock& rb,
                                                              int warp) {
  WarpRows<kHeadDim> w;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + lane / 4 + 8 * i;
    const int64_t position = rb.exists(r) ? p.positions[static_cast<int64_t>(rb.b) * p.tokens + rb.token(r)] : -1;
    w.query_pos[i] = position >= 0 ? static_cast<int>(position) : -1;
    w.window_low[i] = p.window > 0 ? w.query_pos[i] - p.window : -1;
    w.max[i] = -INFINITY;
    w.sum[i] = 0.f;
  }
#pragma unroll
  for (int nt = 0; nt < kHeadDim / 8; ++nt) w.out[nt][0] = w.out[nt][1] = w.out[nt][2] = w.out[nt][3] = 0.f;
  return w;
}

// Whether every key of a tile is inside the window of every row of the warp (the answer is the
// same for the whole warp). Absent keys (kAbsentKey) and absent rows (-1) make it false.
template <int kTileKeys, int kHeadDim>
__device__ __forceinline__ bool tile_inside_windows(const int* key_pos, const WarpRows<kHeadDim>& w) {
  int lowest = INT_MAX, highest = INT_MIN;
#pragma unroll
  for (int j = threadIdx.x % 32; j < kTileKeys; j += 32) {
    lowest = min(lowest, key_pos[j]);
    highest = max(highest, key_pos[j]);
  }
  lowest = __reduce_min_sync(0xffffffffu, lowest);
  highest = __reduce_max_sync(0xffffffffu, highest);
  bool inside = true;
#pragma unroll
  for (int i = 0; i < 2; ++i) inside = inside && highest <= w.query_pos[i] && lowest > w.window_low[i];
  return __all_sync(0xffffffffu, inside);
}

// Online softmax of one tile of scores s = q.k (16 rows x kTileKeys keys of the warp, in the
// accumulator layout): masks the keys outside each row's window (unless the whole tile is inside
// every window), turns s into 2^(scale_log2 * s - max) and updates the running max and sum.
// factor[i] = 2^(old max - new max) is left for the caller to apply to row i's output
// accumulators, which may still be in use by an asynchronous product.
template <int kTileKeys, int kHeadDim>
__device__ __forceinline__ void online_softmax(float (&s)[kTileKeys / 8][4], const int* key_pos, float scale_log2,
                                               WarpRows<kHeadDim>& w, float (&factor)[2]) {
  const int lane = threadIdx.x % 32;
  float tile_max[2] = {-INFINITY, -INFINITY};
  if (tile_inside_windows<kTileKeys>(key_pos, w)) {
#pragma unroll
    for (int nt = 0; nt < kTileKeys / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] *= scale_log2;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], s[nt][e]);
      }
  } else {
#pragma unroll
    for (int nt = 0; nt < kTileKeys / 8; ++nt) {
      const int2 kp = *reinterpret_cast<const int2*>(key_pos + nt * 8 + 2 * (lane % 4));
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e / 2, key = e % 2 ? kp.y : kp.x;
        s[nt][e] = key <= w.query_pos[i] && key > w.window_low[i] ? s[nt][e] * scale_log2 : -INFINITY;
        tile_max[i] = fmaxf(tile_max[i], s[nt][e]);
      }
    }
  }
  // The four lanes of a row (same g) share its max through shuffles.
  float base[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 1));
    tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 2));
    const float new_max = fmaxf(w.max[i], tile_max[i]);
    base[i] = new_max == -INFINITY ? 0.f : new_max;  // no visible key yet: keep everything at 0
    factor[i] = exp2_fast(w.max[i] - base[i]);
    w.max[i] = new_max;
    w.sum[i] *= factor[i];
  }
#pragma unroll
  for (int nt = 0; nt < kTileKeys / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] = exp2_fast(s[nt][e] - base[e / 2]);
      w.sum[e / 2] += s[nt][e];
    }
}

template <int kHeadDim>
__device__ __forceinline__ void rescale_output(WarpRows<kHeadDim>& w, const float (&factor)[2]) {
#pragma unroll
  for (int nt = 0; nt < kHeadDim / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) w.out[nt][e] *= factor[e / 2];
}

// Probabilities of keys 16 kt .. 16 kt + 15 as the A fragment of an m16 x k16 product: the
// accumulator fragments of keys 16 kt .. + 7 and + 8 .. + 15 are exactly its a0 a1 and a2 a3.
template <typename T, int kTileKeys>
__device__ __forceinline__ void pack_probabilities(const float (&s)[kTileKeys / 8][4],
                                                   uint32_t (&pf)[kTileKeys / 16][4]) {
#pragma unroll
  for (int kt = 0; kt < kTileKeys / 16; ++kt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      pf[kt][2 * half] = pack2<T>(s[2 * kt + half][0], s[2 * kt + half][1]);
      pf[kt][2 * half + 1] = pack2<T>(s[2 * kt + half][2], s[2 * kt + half][3]);
    }
}

// Epilogue: the four lanes of a row add up their partial sums; this lane writes columns
// nt*8 + 2c, 2c+1 of rows g and g+8 of warp `warp`. With one split, the normalised output to
// p.out; otherwise the normalised partial output and its base-2 log-sum-exp to partial_out
// [num_splits, batch * tokens * num_heads, head_dim] and partial_lse [num_splits, rows].
template <typename T, int kHeadDim>
__device__ __forceinline__ void store_warp_rows(const AttentionParams& p, const RowBlock& rb, int warp,
                                                const WarpRows<kHeadDim>& w, int num_splits, int split,
                                                float* __restrict__ partial_out, float* __restrict__ partial_lse) {
  const int lane = threadIdx.x % 32;
  const int64_t out_rows = static_cast<int64_t>(p.batch) * p.tokens * p.num_heads;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float sum = w.sum[i];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int r = warp * 16 + lane / 4 + 8 * i;
    if (!rb.exists(r)) continue;
    const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;  // padding rows saw no key: output 0
    const int64_t out_row = (static_cast<int64_t>(rb.b) * p.tokens + rb.token(r)) * p.num_heads + rb.head(r);
    const int col = 2 * (lane % 4);
    if (num_splits == 1) {
      T* dst = static_cast<T*>(p.out) + out_row * kHeadDim + col;
#pragma unroll
      for (int nt = 0; nt < kHeadDim / 8; ++nt)
        *reinterpret_cast<uint32_t*>(dst + nt * 8) =
            pack2<T>(w.out[nt][2 * i] * inv_sum, w.out[nt][2 * i + 1] * inv_sum);
    } else {
      float* dst = partial_out + (split * out_rows + out_row) * kHeadDim + col;
#pragma unroll
      for (int nt = 0; nt < kHeadDim / 8; ++nt)
        *reinterpret_cast<float2*>(dst + nt * 8) =
            make_float2(w.out[nt][2 * i] * inv_sum, w.out[nt][2 * i + 1] * inv_sum);
      if (lane % 4 == 0) partial_lse[split * out_rows + out_row] = sum > 0.f ? w.max[i] + log2f(sum) : -INFINITY;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The Hopper prefill kernel (attention_sm90.cu): bf16 / fp16, head_dim 128, same grid, rows and
// outputs as the tensor-core kernel of attention.cu.

// Whether it runs here: built for sm_90a, current device of compute capability 9.0, and not turned
// off with MISTRAL_EXT_SM90_ATTENTION=0 in the environment.
bool sm90_attention_enabled();

template <typename T>
void launch_attention_sm90(const AttentionParams& p, dim3 grid, int num_splits, float* partial_out,
                           float* partial_lse, CudaStream stream);

}  // namespace detail
}  // namespace mistral_ext
