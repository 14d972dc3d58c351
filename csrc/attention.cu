// Sliding-window grouped-query attention on CUDA (AttentionParams in kernels.h): the query at
// position i attends to the cached and new keys at positions j with i - W < j <= i,
// out = softmax(scale * q.k) @ v, accumulated in fp32 with an online softmax.
//
// bf16 / fp16: one flash-attention-2 style kernel on tensor cores (mma.sync m16n8k16) serves prefill
// and decode. A CTA owns 128 query rows of one (sequence, kv head): the rows are the (token, head)
// pairs of the kv head's query heads, token-major, so every K/V tile in shared memory serves all
// heads of the group (GQA without duplicated K/V). Each of its 8 warps owns 16 rows and keeps its
// Q fragments, scores and output accumulators in registers. K/V tiles of 64 keys stream through
// shared memory with cp.async, double buffered (the next tile loads while this one is used), over
// the key span that can fall inside the CTA's windows (attention_key_span): tiles outside the
// window or the causal range are never loaded.
// On Hopper, prefill at head_dim 128 takes the wgmma variant of this kernel instead
// (attention_sm90.cu; MISTRAL_EXT_SM90_ATTENTION=0 turns it off).
// Decode (at most 8 query rows per sequence and kv head, e.g. one new token with a GQA group of
// 4): a kernel on CUDA cores instead, since the tensor-core kernel would pad those rows to 128;
// each lane stages its own K/V chunks through shared memory with cp.async, rounds ahead of its
// arithmetic and with no barrier in the key loop. With overlap_previous it and its combine kernel
// may start while the kernel before each still runs (they wait for it first).
// Split-KV (flash-decoding): when the grid would not fill the GPU (decode: one token per sequence),
// each CTA takes one slice of its key span and writes a partial (output, log-sum-exp) to the
// workspace; a combine kernel merges the slices.
// fp32: a simple kernel, one warp per query row, lanes splitting head_dim (no tensor cores).
//
// Positions are compared as int32 on the device: they are below 2^31 - 1 since cache_lens is int32.
#include "attention_cuda.cuh"

namespace mistral_ext {
namespace {

using namespace detail;

constexpr int kBlockN = 64;   // keys per K/V tile
constexpr int kWarps = 8;     // 16 query rows each
constexpr int kThreads = 32 * kWarps;
constexpr int kTargetCtas = 264;       // split the keys until about two waves of CTAs on an H100 (132 SMs)
constexpr int kMaxSplits = 64;
constexpr int kMinTilesPerSplit = 2;   // a slice smaller than this is not worth a partial result

// Shared memory rows are padded by 16 bytes: ldmatrix reads 8 rows of 16 bytes at once, and with a
// row stride of (head_dim + 8) * 2 bytes (144, 208 or 272) those 8 rows fall in 8 distinct 4-bank
// groups, so fragment loads are conflict-free for head_dim 64, 96 and 128.
template <int kHeadDim>
struct Smem {
  static constexpr int kStride = kHeadDim + 8;        // elements per tile row
  static constexpr int kTile = kBlockN * kStride;     // elements per K or V tile
  // The Q tile, K stages 0 and 1, V stages 0 and 1 (16-bit elements), then two stages of key
  // positions: 105 KB for head_dim 128, one CTA (8 warps) per SM.
  static constexpr size_t kBytes = (kBlockM * kStride + 4 * kTile) * 2 + 2 * kBlockN * sizeof(int);
};

// ---------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+).

// ldmatrix.x4: four 8x8 matrices of 16-bit elements; lanes 8i..8i+7 give the addresses of the 8
// rows (16 bytes each) of matrix i. Register i of lane l receives matrix i's row l/4, columns
// 2(l%4) and 2(l%4)+1 (lower column in the low half). With .trans it receives the transposed
// fragment: rows 2(l%4) and 2(l%4)+1 of column l/4.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(smem)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(smem)));
}

// d += a * b, mma.sync m16n8k16 with fp32 accumulators. Fragment layouts (PTX ISA, "Matrix
// fragments for mma.m16n8k16"), with g = lane / 4 and c = lane % 4:
//   A 16x16 (row-major): a0 = (row g,   cols 2c, 2c+1)   a1 = (row g+8, cols 2c, 2c+1)
//                        a2 = (row g,   cols 2c+8, 2c+9) a3 = (row g+8, cols 2c+8, 2c+9)
//   B 16x8 (k x n):      b0 = (k 2c, 2c+1; n g)          b1 = (k 2c+8, 2c+9; n g)
//   C/D 16x8:            d0, d1 = (row g, cols 2c, 2c+1)  d2, d3 = (row g+8, cols 2c, 2c+1)
// Each 32-bit A/B register holds two 16-bit elements, the lower column (or k) in the low half.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel.

// Tile loads use 4 threads per row, each taking every 4th 16-byte chunk (so 4 neighbouring lanes
// read 64 contiguous bytes), kBlockThreads / 4 rows per pass; chunk i of this thread is column
// 8 * (threadIdx.x % 4 + 4 * i).
__device__ __forceinline__ int chunk_column(int i) { return 8 * (threadIdx.x % 4 + 4 * i); }

// The CTA's query rows into the Q tile (row stride Smem::kStride); rows past the end and padding
// queries are zero-filled.
template <typename T, int kHeadDim>
__device__ __forceinline__ void load_q_tile(const AttentionParams& p, const RowBlock& rb, T* q_tile) {
  const T* q = static_cast<const T*>(p.q);
  for (int r = threadIdx.x / 4; r < kBlockM; r += kThreads / 4) {
    const bool present = rb.exists(r) && p.positions[static_cast<int64_t>(rb.b) * p.tokens + rb.token(r)] >= 0;
    const T* src = present ? q + (static_cast<int64_t>(rb.b) * p.tokens + rb.token(r)) * p.q_token_stride +
                                 static_cast<int64_t>(rb.head(r)) * kHeadDim
                           : q;
#pragma unroll
    for (int i = 0; i < kHeadDim / 32; ++i)
      cp_async_16(q_tile + r * Smem<kHeadDim>::kStride + chunk_column(i), src + (present ? chunk_column(i) : 0),
                  present);
  }
}

// Keys j0 .. j0 + 63 (key order of `span`) into one K/V stage, with their positions (kAbsentKey for
// rows past the span's end and for padding tokens, which are zero-filled instead of read).
template <typename T, int kHeadDim, int kBlockThreads = kThreads>
__device__ __forceinline__ void load_kv_tiles(const AttentionParams& p, const KeySpan& span, const RowBlock& rb,
                                              int j0, T* k_tile, T* v_tile, int* key_pos) {
  for (int r = threadIdx.x / 4; r < kBlockN; r += kBlockThreads / 4) {
    const int j = j0 + r;
    const int64_t position = j < span.end ? key_position(p, span, rb.b, j) : -1;
    const bool present = position >= 0;
    const KeyRow<T> src = present ? key_row<T>(p, span, rb.b, rb.kv_head, j)
                                  : KeyRow<T>{static_cast<const T*>(p.k), static_cast<const T*>(p.v)};
#pragma unroll
    for (int i = 0; i < kHeadDim / 32; ++i) {
      const int col = chunk_column(i), offset = present ? col : 0;
      cp_async_16(k_tile + r * Smem<kHeadDim>::kStride + col, src.k + offset, present);
      cp_async_16(v_tile + r * Smem<kHeadDim>::kStride + col, src.v + offset, present);
    }
    if (threadIdx.x % 4 == 0) key_pos[r] = present ? static_cast<int>(position) : kAbsentKey;
  }
}

// One K/V tile for one warp: S = Q K^T (scaled to log2 units and masked), online softmax update,
// O += P V. q holds the warp's A fragments of Q, one per 16 columns of head_dim.
template <typename T, int kHeadDim>
__device__ __forceinline__ void attend_tile(const uint32_t (&q)[kHeadDim / 16][4], const T* k_tile,
                                            const T* v_tile, const int* key_pos, float scale_log2,
                                            WarpRows<kHeadDim>& w) {
  constexpr int kStride = Smem<kHeadDim>::kStride;
  const int lane = threadIdx.x % 32;

  // S (16 x 64) = Q (16 x head_dim) K^T. B fragments from K rows (keys) by ldmatrix without
  // .trans: lanes 0-7 address keys 0-7 at columns kk*16 + 0..7 (-> b0 of key tile 2np), lanes
  // 8-15 keys 0-7 at +8 (-> b1 of 2np), lanes 16-23 keys 8-15 at +0 (-> b0 of 2np+1), lanes
  // 24-31 keys 8-15 at +8 (-> b1 of 2np+1); row l/4 of a K matrix is key g, columns 2c, 2c+1.
  float s[kBlockN / 8][4];
#pragma unroll
  for (int nt = 0; nt < kBlockN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < kBlockN / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, k_tile + (np * 16 + lane % 8 + 8 * (lane / 16)) * kStride + kk * 16 + 8 * (lane / 8 % 2));
      mma_16816<T>(s[2 * np], q[kk], b[0], b[1]);
      mma_16816<T>(s[2 * np + 1], q[kk], b[2], b[3]);
    }
  }

  float factor[2];
  online_softmax<kBlockN>(s, key_pos, scale_log2, w, factor);
  rescale_output(w, factor);
  uint32_t pf[kBlockN / 16][4];
  pack_probabilities<T, kBlockN>(s, pf);

  // O (16 x head_dim) += P (16 x 64) V. B fragments from V rows (keys) by ldmatrix.trans: lanes
  // 0-7 address keys 0-7 at columns dp*16 + 0..7 (-> b0 of column tile 2dp), lanes 8-15 keys 8-15
  // (-> b1 of 2dp), lanes 16-23 keys 0-7 at +8 (-> b0 of 2dp+1), lanes 24-31 keys 8-15 at +8 (-> b1
  // of 2dp+1); transposed, register i holds keys 2c, 2c+1 of column g.
#pragma unroll
  for (int kt = 0; kt < kBlockN / 16; ++kt) {
#pragma unroll
    for (int dp = 0; dp < kHeadDim / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, v_tile + (kt * 16 + lane % 16) * kStride + dp * 16 + 8 * (lane / 16));
      mma_16816<T>(w.out[2 * dp], pf[kt], b[0], b[1]);
      mma_16816<T>(w.out[2 * dp + 1], pf[kt], b[2], b[3]);
    }
  }
}

// grid (m_blocks * num_splits, num_kv_heads, batch), kThreads threads, Smem<kHeadDim>::kBytes of
// dynamic shared memory. With num_splits > 1, split s of a CTA covers the s-th slice of its key
// tiles and writes normalised partial outputs and base-2 log-sum-exps to partial_out
// [num_splits, batch * tokens * num_heads, head_dim] and partial_lse [num_splits, batch * tokens *
// num_heads]; with one split it writes out directly.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads)
    flash_attention_kernel(const AttentionParams p, int num_splits, float* __restrict__ partial_out,
                           float* __restrict__ partial_lse) {
  using S = Smem<kHeadDim>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_tile = reinterpret_cast<T*>(smem);                             // [kBlockM][kStride]
  T* k_tiles = q_tile + kBlockM * S::kStride;                         // [2][kBlockN][kStride]
  T* v_tiles = k_tiles + 2 * S::kTile;                                // [2][kBlockN][kStride]
  int* key_pos = reinterpret_cast<int*>(v_tiles + 2 * S::kTile);      // [2][kBlockN]

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int split = blockIdx.x % num_splits;
  const RowBlock rb = cta_row_block(p, num_splits);
  WarpRows<kHeadDim> w = start_warp_rows<kHeadDim>(p, rb, warp);
  const TileRange range = split_tile_range<kBlockN>(p, rb.b, rb.token(0), rb.last_token(), num_splits, split);
  const KeySpan& span = range.span;
  const int tile_begin = range.begin, tile_end = range.end;

  if (tile_begin < tile_end) {  // the same for the whole CTA, so the barriers inside are safe
    // Prologue: the Q tile and the first K/V tile as one group.
    load_q_tile<T, kHeadDim>(p, rb, q_tile);
    load_kv_tiles<T, kHeadDim>(p, span, rb, span.begin + tile_begin * kBlockN, k_tiles, v_tiles, key_pos);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    // Q A fragments: lanes 0-15 address rows 0-15 at columns kk*16, lanes 16-31 rows 0-15 at
    // kk*16 + 8, giving matrices (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15)
    // = a0, a1, a2, a3.
    uint32_t qf[kHeadDim / 16][4];
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk)
      ldmatrix_x4(qf[kk], q_tile + (warp * 16 + lane % 16) * S::kStride + kk * 16 + 8 * (lane / 16));

    // Warps whose 16 rows are all past the end still load and synchronise, but skip the math.
    const bool warp_has_rows = rb.exists(warp * 16);
    const float scale_log2 = p.scale * kLog2e;
    for (int tile = tile_begin; tile < tile_end; ++tile) {
      const int stage = (tile - tile_begin) % 2;
      if (tile + 1 < tile_end)
        load_kv_tiles<T, kHeadDim>(p, span, rb, span.begin + (tile + 1) * kBlockN, k_tiles + (1 - stage) * S::kTile,
                                   v_tiles + (1 - stage) * S::kTile, key_pos + (1 - stage) * kBlockN);
      cp_async_commit();  // possibly empty: keeps "all but the newest group" meaning "this tile"
      cp_async_wait<1>();
      __syncthreads();
      if (warp_has_rows)
        attend_tile<T, kHeadDim>(qf, k_tiles + stage * S::kTile, v_tiles + stage * S::kTile,
                                 key_pos + stage * kBlockN, scale_log2, w);
      __syncthreads();  // everyone is done with this stage before it is refilled
    }
  }

  store_warp_rows<T, kHeadDim>(p, rb, warp, w, num_splits, split, partial_out, partial_lse);
}

// out[row] = sum_s 2^(lse_s - m) partial_out[s][row] / sum_s 2^(lse_s - m), m = max_s lse_s; rows
// that no split saw (padding) get 0. grid: rows, block: head_dim threads. The first warp turns the
// log-sum-exps into weights (one load per lane and 32 splits), then every column's partial
// outputs are loaded many at a time: the kernel costs a few round trips to L2, not one per split.
template <typename T>
__global__ void combine_splits_kernel(T* __restrict__ out,                      // [rows, head_dim]
                                      const float* __restrict__ partial_out,    // [num_splits, rows, head_dim]
                                      const float* __restrict__ partial_lse,    // [num_splits, rows]
                                      int num_splits, int64_t rows, int head_dim) {
  __shared__ float weights[kMaxSplits];
  __shared__ float weight_sum;
  allow_next_kernel_launch();
  wait_for_previous_kernel();  // the partial results
  const int64_t row = blockIdx.x;
  if (threadIdx.x < 32) {
    constexpr int kPerLane = kMaxSplits / 32;
    float lse[kPerLane], max_lse = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int s = threadIdx.x + 32 * i;
      lse[i] = s < num_splits ? partial_lse[s * rows + row] : -INFINITY;
      max_lse = fmaxf(max_lse, lse[i]);
    }
    max_lse = warp_max(max_lse);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int s = threadIdx.x + 32 * i;
      const float weight = max_lse == -INFINITY ? 0.f : exp2_fast(lse[i] - max_lse);
      if (s < num_splits) weights[s] = weight;
      sum += weight;
    }
    sum = warp_sum(sum);
    if (threadIdx.x == 0) weight_sum = sum;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.f;
#pragma unroll 16
    for (int s = 0; s < num_splits; ++s) acc += weights[s] * partial_out[(s * rows + row) * head_dim + d];
    out[row * head_dim + d] = from_f32<T>(weight_sum > 0.f ? acc / weight_sum : 0.f);
  }
}

// ---------------------------------------------------------------------------------------------
// Decode kernel (bf16 / fp16): a CTA of kDecodeWarps warps owns every query row of one (sequence,
// kv head), at most kDecodeMaxRows, and the keys of its split. Decode reads each K/V row once and
// does little arithmetic with it: the time is that of the reads, so the kernel keeps many of them
// in flight and nothing else in their way.
//  * A warp takes kSteps pairs of keys per round: each half-warp one key of a pair, each lane 8
//    columns (16 bytes) of it.
//  * Each lane copies its own 16-byte chunks of K and V into its own slots of shared memory with
//    cp.async, kDecodeStages - 1 rounds ahead of the round it computes: no register holds a load
//    in flight, and since a lane reads back only what it copied, no barrier is needed.
//  * Scores: the lane's 8-column partial dot product with every query row (held in registers,
//    scaled to log2 units), summed over the 16 lanes of the half-warp by shuffles, so every lane
//    of the half holds the whole score of its key.
//  * Online softmax per half-warp (its lanes hold the same running max and sum), once per round;
//    then out += p V on the lane's 8 columns.
//  * At the end the two halves merge by shuffles, the warps through shared memory.
constexpr int kDecodeMaxRows = 8;
constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = 32 * kDecodeWarps;
constexpr int kDecodeStages = 3;
constexpr int kDecodeTargetCtas = 1056;  // about 8 CTAs per SM of an H100: the last wave is a small share

template <int kRows>
__host__ __device__ constexpr int decode_steps() {  // key pairs per warp and round
  return kRows <= 4 ? 4 : 2;
}

// Dynamic shared memory: the cp.async slots ([warp][stage][K steps, V steps][lane] of 16 bytes),
// reused at the end for the warps' partial outputs ([warp][kRows][kHeadDim] floats).
template <int kHeadDim, int kRows>
constexpr size_t decode_smem_bytes() {
  const size_t slots = size_t{kDecodeWarps} * kDecodeStages * 2 * decode_steps<kRows>() * 32 * 16;
  const size_t merge = size_t{kDecodeWarps} * kRows * kHeadDim * sizeof(float);
  return slots > merge ? slots : merge;
}

// 8 consecutive 16-bit elements as floats.
template <typename T>
__device__ __forceinline__ void to_f32x8(const Pack<T, 8>& pack, float (&dst)[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) dst[e] = to_f32(pack.v[e]);
}

// grid (num_splits, num_kv_heads, batch), kDecodeThreads threads, decode_smem_bytes of dynamic
// shared memory; kRows >= the CTA's query rows; outputs as flash_attention_kernel's.
template <typename T, int kHeadDim, int kRows>
__global__ void __launch_bounds__(kDecodeThreads, kRows <= 4 ? 3 : 2)
    decode_attention_kernel(const AttentionParams p, int num_splits, float* __restrict__ partial_out,
                            float* __restrict__ partial_lse) {
  constexpr int kSteps = decode_steps<kRows>();
  constexpr int kRoundKeys = kDecodeWarps * 2 * kSteps;  // keys of the CTA per round
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float merged_max[kDecodeWarps][kRows], merged_sum[kDecodeWarps][kRows];

  allow_next_kernel_launch();
  wait_for_previous_kernel();  // q, k, v, the caches and cache_lens may be its output
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int half = lane / 16, col = lane % 16 * 8;
  const bool has_columns = col < kHeadDim;  // lanes 8..15 (head_dim 64) or 12..15 (96) of each half hold none
  // This lane's slot for step s (K: s, V: kSteps + s) of a stage.
  Pack<T, 8>* slots = reinterpret_cast<Pack<T, 8>*>(smem) + warp * kDecodeStages * 2 * kSteps * 32 + lane;
  const auto slot = [&](int stage, int i) -> Pack<T, 8>* { return slots + (stage * 2 * kSteps + i) * 32; };

  const int split = blockIdx.x;
  const int group = p.num_heads / p.num_kv_heads;
  const RowBlock rb{static_cast<int>(blockIdx.z), static_cast<int>(blockIdx.y), group, p.tokens * group, 0};
  const int rows = rb.rows_total;  // <= kRows (chosen by the host)
  const int64_t* positions = p.positions + static_cast<int64_t>(rb.b) * p.tokens;
  const TileRange range = split_tile_range<kBlockN>(p, rb.b, 0, p.tokens - 1, num_splits, split);
  const KeySpan& span = range.span;
  const int key_begin = span.begin + range.begin * kBlockN + warp * 2 * kSteps;  // this warp's first key
  const int key_end = min(span.begin + range.end * kBlockN, span.end);
  const int rounds = key_begin < key_end ? (key_end - key_begin + kRoundKeys - 1) / kRoundKeys : 0;
  const int64_t first_slot = p.capacity > 0 ? span.cache_start % p.capacity : 0;  // ring slot of cached key 0

  // Key j's position (-1: not a key) and, for its K and V rows, the cache slot or the chunk token.
  const auto key_at = [&](int j, const T*& k_row, const T*& v_row) -> int64_t {
    if (j >= key_end) return -1;
    if (j < span.num_cached) {  // the ring-buffer slot without a 64-bit division per key
      const int64_t ring = first_slot + j < p.capacity ? first_slot + j : first_slot + j - p.capacity;
      const int64_t offset = ((static_cast<int64_t>(rb.b) * p.capacity + ring) * p.num_kv_heads + rb.kv_head) *
                             kHeadDim;
      k_row = static_cast<const T*>(p.k_cache) + offset;
      v_row = static_cast<const T*>(p.v_cache) + offset;
      return span.cache_start + j;
    }
    const KeyRow<T> row = key_row<T>(p, span, rb.b, rb.kv_head, j);
    k_row = row.k, v_row = row.v;
    return key_position(p, span, rb.b, j);
  };
  // Round `round`'s K and V chunks of this lane into its slots of stage round % kDecodeStages
  // (zeros for absent keys), as one cp.async group, possibly empty.
  const auto copy_round = [&](int round) {
    if (round < rounds) {
      const int stage = round % kDecodeStages;
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        const T *k_row = static_cast<const T*>(p.k), *v_row = k_row;  // any valid address: absent keys read nothing
        // Lanes without columns copy zeros: their share of the score sums must be 0.
        const bool present = key_at(key_begin + round * kRoundKeys + 2 * s + half, k_row, v_row) >= 0 && has_columns;
        cp_async_16(slot(stage, s), k_row + (present ? col : 0), present);
        cp_async_16(slot(stage, kSteps + s), v_row + (present ? col : 0), present);
      }
    }
    cp_async_commit();
  };
#pragma unroll
  for (int round = 0; round < kDecodeStages - 1; ++round) copy_round(round);

  // The query rows: this lane's 8 columns of each, in log2 units; absent rows are -1 / zeros.
  const float scale_log2 = p.scale * kLog2e;
  float q[kRows][8];
  int query_pos[kRows], window_low[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t position = r < rows ? positions[rb.token(r)] : -1;
    query_pos[r] = position >= 0 ? static_cast<int>(position) : -1;
    window_low[r] = p.window > 0 ? query_pos[r] - p.window : -1;
    Pack<T, 8> pack{};
    if (position >= 0 && has_columns)
      pack = load_pack<8>(static_cast<const T*>(p.q) + (static_cast<int64_t>(rb.b) * p.tokens + rb.token(r)) *
                                                           p.q_token_stride +
                          static_cast<int64_t>(rb.head(r)) * kHeadDim + col);
    to_f32x8(pack, q[r]);
#pragma unroll
    for (int e = 0; e < 8; ++e) q[r][e] *= scale_log2;
  }

  float out[kRows][8] = {}, run_max[kRows], run_sum[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) run_max[r] = -INFINITY, run_sum[r] = 0.f;

  for (int round = 0; round < rounds; ++round) {
    copy_round(round + kDecodeStages - 1);  // into the stage computed in the previous round
    cp_async_wait<kDecodeStages - 1>();     // this round's chunks have landed
    const int stage = round % kDecodeStages;

    // Scores of the half-warp's kSteps keys for every row, summed over its 16 lanes; keys outside
    // a row's window (or absent) masked.
    float score[kSteps][kRows];
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      float k[8];
      to_f32x8(*slot(stage, s), k);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) dot = fmaf(q[r][e], k[e], dot);
        score[s][r] = dot;
      }
    }
#pragma unroll
    for (int offset = 8; offset > 0; offset >>= 1)
#pragma unroll
      for (int s = 0; s < kSteps; ++s)
#pragma unroll
        for (int r = 0; r < kRows; ++r) score[s][r] += __shfl_xor_sync(0xffffffffu, score[s][r], offset);
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const T *k_row, *v_row;
      const int64_t position = key_at(key_begin + round * kRoundKeys + 2 * s + half, k_row, v_row);
      const int key_pos = position >= 0 ? static_cast<int>(position) : kAbsentKey;
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (!(key_pos <= query_pos[r] && key_pos > window_low[r])) score[s][r] = -INFINITY;
    }

    // Online softmax over these keys, then out += p V.
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float round_max = -INFINITY;
#pragma unroll
      for (int s = 0; s < kSteps; ++s) round_max = fmaxf(round_max, score[s][r]);
      const float new_max = fmaxf(run_max[r], round_max);
      const float base = new_max == -INFINITY ? 0.f : new_max;  // no visible key yet: keep everything at 0
      const float factor = exp2_fast(run_max[r] - base);
      run_max[r] = new_max;
      run_sum[r] *= factor;
#pragma unroll
      for (int e = 0; e < 8; ++e) out[r][e] *= factor;
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        score[s][r] = exp2_fast(score[s][r] - base);
        run_sum[r] += score[s][r];
      }
    }
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      float v[8];
      to_f32x8(*slot(stage, kSteps + s), v);
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int e = 0; e < 8; ++e) out[r][e] = fmaf(score[s][r], v[e], out[r][e]);
    }
  }
  cp_async_wait<0>();  // (only empty groups are left) before the slots are reused below

  // The two half-warps' states merged (shuffles), then the warps' (shared memory).
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float other_max = __shfl_xor_sync(0xffffffffu, run_max[r], 16);
    const float other_sum = __shfl_xor_sync(0xffffffffu, run_sum[r], 16);
    const float new_max = fmaxf(run_max[r], other_max);
    const float base = new_max == -INFINITY ? 0.f : new_max;
    const float mine = exp2_fast(run_max[r] - base), theirs = exp2_fast(other_max - base);
    run_sum[r] = run_sum[r] * mine + other_sum * theirs;
    run_max[r] = new_max;
#pragma unroll
    for (int e = 0; e < 8; ++e) out[r][e] = out[r][e] * mine + __shfl_xor_sync(0xffffffffu, out[r][e], 16) * theirs;
  }
  float* merged_out = reinterpret_cast<float*>(smem);  // [kDecodeWarps][kRows][kHeadDim]
  __syncthreads();  // every warp is done with its slots
  if (half == 0 && has_columns) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float4* dst = reinterpret_cast<float4*>(merged_out + (warp * kRows + r) * kHeadDim + col);
      dst[0] = make_float4(out[r][0], out[r][1], out[r][2], out[r][3]);
      dst[1] = make_float4(out[r][4], out[r][5], out[r][6], out[r][7]);
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) merged_max[warp][r] = run_max[r], merged_sum[warp][r] = run_sum[r];
  }
  __syncthreads();

  const int64_t out_rows = static_cast<int64_t>(p.batch) * p.tokens * p.num_heads;
  for (int i = threadIdx.x; i < rows * kHeadDim; i += kDecodeThreads) {
    const int r = i / kHeadDim, c = i % kHeadDim;
    float row_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) row_max = fmaxf(row_max, merged_max[w][r]);
    const float base = row_max == -INFINITY ? 0.f : row_max;
    float sum = 0.f, total = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float weight = exp2_fast(merged_max[w][r] - base);
      sum += merged_sum[w][r] * weight;
      total += merged_out[(w * kRows + r) * kHeadDim + c] * weight;
    }
    const float value = sum > 0.f ? total / sum : 0.f;  // padding rows saw no key: output 0
    const int64_t out_row = (static_cast<int64_t>(rb.b) * p.tokens + rb.token(r)) * p.num_heads + rb.head(r);
    if (num_splits == 1) {
      static_cast<T*>(p.out)[out_row * kHeadDim + c] = from_f32<T>(value);
    } else {
      partial_out[(split * out_rows + out_row) * kHeadDim + c] = value;
      if (c == 0) partial_lse[split * out_rows + out_row] = sum > 0.f ? row_max + log2f(sum) : -INFINITY;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// fp32 storage: one warp per query row (b, t, h), lane l holding columns l, l + 32, ...; online
// softmax over the row's key span, one key at a time.
constexpr int kFp32WarpsPerBlock = 4;
constexpr int kFp32MaxPerLane = 4;  // head_dim <= 128

__global__ void __launch_bounds__(32 * kFp32WarpsPerBlock) attention_fp32_kernel(const AttentionParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kFp32WarpsPerBlock + threadIdx.x / 32;  // (b*T + t)*H + h
  const int lane = threadIdx.x % 32;
  if (row >= static_cast<int64_t>(p.batch) * p.tokens * p.num_heads) return;
  const int h = static_cast<int>(row % p.num_heads);
  const int64_t token = row / p.num_heads;  // b * tokens + t
  const int b = static_cast<int>(token / p.tokens), t = static_cast<int>(token % p.tokens);
  const int d = p.head_dim;
  const int64_t query_pos = p.positions[token];
  float acc[kFp32MaxPerLane] = {}, q[kFp32MaxPerLane] = {};
  float max_score = -INFINITY, sum = 0.f;
  if (query_pos >= 0) {
    const float* q_row = static_cast<const float*>(p.q) + token * p.q_token_stride + static_cast<int64_t>(h) * d;
#pragma unroll
    for (int e = 0; e < kFp32MaxPerLane; ++e)
      if (lane + 32 * e < d) q[e] = q_row[lane + 32 * e] * p.scale * kLog2e;
    const int kv_head = h / (p.num_heads / p.num_kv_heads);
    const KeySpan span = attention_key_span(p, b, t, t);
    for (int j = span.begin; j < span.end; ++j) {
      if (!key_visible(query_pos, key_position(p, span, b, j), p.window)) continue;  // same for the warp
      const KeyRow<float> key = key_row<float>(p, span, b, kv_head, j);
      float partial = 0.f;
#pragma unroll
      for (int e = 0; e < kFp32MaxPerLane; ++e)
        if (lane + 32 * e < d) partial += q[e] * key.k[lane + 32 * e];
      const float score = warp_sum(partial);
      const float new_max = fmaxf(max_score, score);
      const float rescale = exp2_fast(max_score - new_max);
      const float weight = exp2_fast(score - new_max);
      sum = sum * rescale + weight;
#pragma unroll
      for (int e = 0; e < kFp32MaxPerLane; ++e)
        if (lane + 32 * e < d) acc[e] = acc[e] * rescale + weight * key.v[lane + 32 * e];
      max_score = new_max;
    }
  }
  const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
  float* out = static_cast<float*>(p.out) + row * d;
#pragma unroll
  for (int e = 0; e < kFp32MaxPerLane; ++e)
    if (lane + 32 * e < d) out[lane + 32 * e] = acc[e] * inv_sum;
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Query rows per (sequence, kv head): the (token, head) pairs of its group.
int64_t rows_per_kv_head(const AttentionParams& p) {
  return static_cast<int64_t>(p.tokens) * (p.num_heads / p.num_kv_heads);
}

int64_t m_blocks(const AttentionParams& p) { return (rows_per_kv_head(p) + kBlockM - 1) / kBlockM; }

// Whether the CUDA-core decode kernel takes the call (else the tensor-core kernel).
bool use_decode_kernel(const AttentionParams& p) { return rows_per_kv_head(p) <= kDecodeMaxRows; }

template <typename T, int kHeadDim, int kRows>
void launch_decode(const AttentionParams& p, dim3 grid, int splits, float* partial_out, float* partial_lse,
                   CudaStream stream) {
  const auto kernel = decode_attention_kernel<T, kHeadDim, kRows>;
  constexpr size_t kSmemBytes = decode_smem_bytes<kHeadDim, kRows>();
  allow_dynamic_shared_memory(kernel, kSmemBytes);
  launch_kernel(kernel, grid, dim3(kDecodeThreads), kSmemBytes, stream, p.overlap_previous, p, splits, partial_out,
                partial_lse);
}

// Key slices per CTA, from the sizes only (the cache lengths live on the device): enough CTAs to
// fill the GPU, each with at least kMinTilesPerSplit tiles of the longest possible span. The
// decode kernel's CTAs are small and stream their keys: it takes about four times as many, so
// that at large batch the last wave is a small share of the time. (One tile per split, 64 splits
// at batch 1 over 4096 keys, measured slower: 22.4 against 16.0 us, docs/RESULTS.md.)
int num_splits(const AttentionParams& p) {
  if (p.dtype == DType::kFloat32) return 1;
  const bool decode = use_decode_kernel(p);
  const int64_t target_ctas = decode ? kDecodeTargetCtas : kTargetCtas;
  const int64_t ctas = (decode ? 1 : m_blocks(p)) * p.num_kv_heads * p.batch;
  if (ctas >= target_ctas) return 1;
  int64_t keys = static_cast<int64_t>(p.capacity) + p.tokens;
  if (p.window > 0 && keys > static_cast<int64_t>(p.window) + p.tokens) keys = static_cast<int64_t>(p.window) + p.tokens;
  const int64_t by_keys = (keys + kBlockN - 1) / kBlockN / kMinTilesPerSplit;
  const int64_t by_ctas = (target_ctas + ctas - 1) / ctas;
  const int64_t splits = by_keys < by_ctas ? by_keys : by_ctas;
  return static_cast<int>(splits < 1 ? 1 : splits > kMaxSplits ? kMaxSplits : splits);
}

// The decode, Hopper or tensor-core kernel, then the combine kernel when the keys were split.
template <typename T, int kHeadDim>
void launch_attention(const AttentionParams& p, int splits, CudaStream stream) {
  const bool decode = use_decode_kernel(p);
  const int64_t out_rows = static_cast<int64_t>(p.batch) * p.tokens * p.num_heads;
  float* partial_out = splits > 1 ? static_cast<float*>(p.workspace) : nullptr;
  float* partial_lse = splits > 1 ? partial_out + splits * out_rows * kHeadDim : nullptr;
  const dim3 grid(static_cast<unsigned>((decode ? 1 : m_blocks(p)) * splits), static_cast<unsigned>(p.num_kv_heads),
                  static_cast<unsigned>(p.batch));
  if (decode) {
    if (rows_per_kv_head(p) <= 4)
      launch_decode<T, kHeadDim, 4>(p, grid, splits, partial_out, partial_lse, stream);
    else
      launch_decode<T, kHeadDim, kDecodeMaxRows>(p, grid, splits, partial_out, partial_lse, stream);
    check_launch("attention");
  } else if (kHeadDim == 128 && sm90_attention_enabled()) {
    launch_attention_sm90<T>(p, grid, splits, partial_out, partial_lse, stream);
  } else {
    allow_dynamic_shared_memory(flash_attention_kernel<T, kHeadDim>, Smem<kHeadDim>::kBytes);
    flash_attention_kernel<T, kHeadDim>
        <<<grid, kThreads, Smem<kHeadDim>::kBytes, stream>>>(p, splits, partial_out, partial_lse);
    check_launch("attention");
  }
  if (splits > 1) {
    launch_kernel(combine_splits_kernel<T>, dim3(static_cast<unsigned>(out_rows)), dim3(p.head_dim), 0, stream,
                  decode && p.overlap_previous, static_cast<T*>(p.out), partial_out, partial_lse, splits, out_rows,
                  p.head_dim);
    check_launch("attention (combine)");
  }
}

template <typename T>
void launch_for_head_dim(const AttentionParams& p, int splits, CudaStream stream) {
  switch (p.head_dim) {
    case 64: return launch_attention<T, 64>(p, splits, stream);
    case 96: return launch_attention<T, 96>(p, splits, stream);
    case 128: return launch_attention<T, 128>(p, splits, stream);
  }
}

}  // namespace

size_t attention_workspace_bytes(const AttentionParams& p) {
  check_attention_params(p);
  if (p.batch == 0 || p.tokens == 0) return 0;  // nothing to launch (and num_splits would divide by 0)
  const int splits = num_splits(p);
  if (splits == 1) return 0;
  const int64_t out_rows = static_cast<int64_t>(p.batch) * p.tokens * p.num_heads;
  return static_cast<size_t>(splits) * out_rows * (p.head_dim + 1) * sizeof(float);
}

void attention_cuda(const AttentionParams& p, CudaStream stream) {
  check_attention_params(p);
  require(p.head_dim == 64 || p.head_dim == 96 || p.head_dim == 128,
          "attention: head_dim must be 64, 96 or 128 on CUDA, got " + std::to_string(p.head_dim));
  require(p.batch <= 65535 && p.num_kv_heads <= 65535, "attention: at most 65535 sequences and kv heads on CUDA");
  if (p.batch == 0 || p.tokens == 0) return;
  const int64_t out_rows = static_cast<int64_t>(p.batch) * p.tokens * p.num_heads;
  if (p.dtype == DType::kFloat32) {
    const int64_t blocks = (out_rows + kFp32WarpsPerBlock - 1) / kFp32WarpsPerBlock;
    require(blocks <= kMaxGridX, "attention: too many query rows for one call on CUDA");
    attention_fp32_kernel<<<static_cast<unsigned>(blocks), 32 * kFp32WarpsPerBlock, 0, stream>>>(p);
    check_launch("attention");
    return;
  }
  // cp.async moves 16-byte chunks: every row start must be 16-byte aligned. The epilogue stores two
  // elements of out (or two floats of the workspace) at once, so those must be aligned too.
  require(packs_fit<__half>({p.q, p.k, p.v, p.k_cache, p.v_cache, p.out},
                            {p.q_token_stride, p.k_token_stride, p.v_token_stride}),
          "attention: on CUDA q, k, v, the caches and out must be 16-byte aligned, with token strides a multiple of 8");
  const int splits = num_splits(p);
  require(splits == 1 || (p.workspace != nullptr && reinterpret_cast<uintptr_t>(p.workspace) % 16 == 0),
          "attention: the CUDA kernel needs attention_workspace_bytes(p) bytes of 16-byte aligned workspace");
  require(m_blocks(p) * splits <= kMaxGridX && out_rows <= kMaxGridX, "attention: too many query rows for one call on CUDA");
  if (p.dtype == DType::kBFloat16)
    launch_for_head_dim<__nv_bfloat16>(p, splits, stream);
  else
    launch_for_head_dim<__half>(p, splits, stream);
}

}  // namespace mistral_ext
