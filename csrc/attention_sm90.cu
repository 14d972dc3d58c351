// Sliding-window grouped-query attention prefill on Hopper (sm_90a): the tensor-core kernel of
// attention.cu with its two matrix products on warpgroup MMA (wgmma) instead of mma.sync. Same
// function (AttentionParams in kernels.h: the query at position i sees the keys at positions j
// with i - W < j <= i; out = softmax(scale * q.k) @ v in fp32 with an online softmax), same CTA
// rows (128 (token, head) rows of one (sequence, kv head), so each K/V tile serves the whole GQA
// group), same key span and split-KV partials. bf16 / fp16, head_dim 128.
//
// A CTA is two warpgroups of 64 query rows. K/V tiles of 128 keys stream through shared memory by
// cp.async (their rows come from the ring-buffer cache or the chunk, which no single tensor map
// describes), stored in the layout wgmma reads with 128-byte swizzle: a 128 x 128 tile is two
// halves of 64 columns, each row of a half 128 bytes with its 16-byte chunk c at position
// c ^ (row % 8), so that 8 consecutive rows (one 1024-byte swizzle atom) hit distinct banks.
// Per tile n, each warpgroup issues
//   S = Q K(n)^T          (64 x 128, Q and K from shared memory, both K-major)
//   O += P(n-1) V(n-1)    (64 x 128, P from registers, V from shared memory read transposed)
// and does the softmax of S(n) while the second product still runs on the tensor cores (the
// intra-warpgroup overlap of flash-attention 3); O is rescaled once that product has finished.
// K is loaded two tiles ahead and V one tile ahead into two stages each, so that K(n) and V(n-1)
// are resident together: 2 x 32 KB of K, 2 x 32 KB of V and the 32 KB Q tile.
#include <cstdlib>
#include <cstring>

#include "attention_cuda.cuh"

namespace mistral_ext {
namespace detail {
namespace {

constexpr int kHeadDim = 128;
constexpr int kTileKeys = 128;
constexpr int kThreads = 256;                        // two warpgroups of 64 rows: kBlockM rows
constexpr int kTileBytes = kTileKeys * kHeadDim * 2;  // 128 rows x 128 columns: Q, or one stage of K or V
constexpr int kAtomBytes = 1024;                      // 8 swizzled rows
// Q, K stages 0 and 1, V stages 0 and 1, two stages of key positions, and the slack that aligns the
// tiles to a swizzle atom.
constexpr size_t kSmemBytes = 5 * kTileBytes + 2 * kTileKeys * sizeof(int) + kAtomBytes;
static_assert(kThreads / 2 == kTileKeys && kThreads / 2 == kBlockM, "two threads load each row of a tile");

// Device code for sm_90a only: the other targets compile an empty kernel, which the host never
// launches (sm90_attention_enabled).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

constexpr int kHalfBytes = kTileBytes / 2;         // 128 rows x 64 columns
constexpr int kRowBytes = kHalfBytes / kTileKeys;  // a row of one half: 64 16-bit elements

// Byte offset of 16-byte chunk `chunk` (0..15) of row `row` in a swizzled 128 x 128 tile.
__device__ __forceinline__ uint32_t swizzled_offset(int row, int chunk) {
  return (chunk / 8) * kHalfBytes + row * kRowBytes + (((chunk % 8) ^ (row % 8)) * 16);
}

// wgmma shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address,
// leading and stride byte offsets (each >> 4), 128-byte swizzle. For the K-major operands here
// (Q, K) the stride is between 8-row groups (1024 bytes) and the leading offset is unused; for the
// transposed V the leading offset steps between the 64-column halves and the stride between
// groups of 8 keys. Adding (bytes >> 4) to a descriptor moves its start address.
__device__ __forceinline__ uint64_t matrix_descriptor(const void* smem, uint32_t leading_bytes, uint32_t stride_bytes) {
  return static_cast<uint64_t>((shared_address(smem) & 0x3FFFF) >> 4) |
         static_cast<uint64_t>(leading_bytes >> 4) << 16 | static_cast<uint64_t>(stride_bytes >> 4) << 32 | 1ull << 62;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most `kPending` of this warpgroup's most recent wgmma groups are in flight.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Shared memory written through the generic proxy (cp.async) becomes visible to wgmma.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// wgmma reads and writes registers asynchronously: no access to these (fp32 accumulators or
// 32-bit A fragments) may move across this point.
template <typename E, int N>
__device__ __forceinline__ void fence_registers(E (&d)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if constexpr (std::is_same_v<E, float>)
        asm volatile("" : "+f"(d[i][e])::"memory");
      else
        asm volatile("" : "+r"(d[i][e])::"memory");
    }
}

// m64n128k16 with fp32 accumulators d (the warpgroup's 64 x 128 in the accumulator layout, this
// warp's 16 rows): ss: d (+)= A B with A and B from descriptors (both K-major); rs: d += A B with A
// from registers (the m16 x k16 A fragment of this warp's rows) and B transposed (MN-major).
template <typename T>
struct Wgmma;

#define MISTRAL_EXT_WGMMA_D                                                                                       \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "    \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, " \
  "%45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define MISTRAL_EXT_ACC4(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define MISTRAL_EXT_ACC64                                                                                      \
  MISTRAL_EXT_ACC4(0), MISTRAL_EXT_ACC4(1), MISTRAL_EXT_ACC4(2), MISTRAL_EXT_ACC4(3), MISTRAL_EXT_ACC4(4),     \
      MISTRAL_EXT_ACC4(5), MISTRAL_EXT_ACC4(6), MISTRAL_EXT_ACC4(7), MISTRAL_EXT_ACC4(8), MISTRAL_EXT_ACC4(9), \
      MISTRAL_EXT_ACC4(10), MISTRAL_EXT_ACC4(11), MISTRAL_EXT_ACC4(12), MISTRAL_EXT_ACC4(13),                  \
      MISTRAL_EXT_ACC4(14), MISTRAL_EXT_ACC4(15)
#define MISTRAL_EXT_DEFINE_WGMMA(T, PTX_TYPE)                                                                    \
  template <>                                                                                                   \
  struct Wgmma<T> {                                                                                             \
    static __device__ __forceinline__ void ss(float (&d)[16][4], uint64_t a, uint64_t b, int accumulate) {      \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                 \
                   "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX_TYPE "." PTX_TYPE " " MISTRAL_EXT_WGMMA_D \
                   ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                                            \
                   : MISTRAL_EXT_ACC64                                                                          \
                   : "l"(a), "l"(b), "r"(accumulate));                                                          \
    }                                                                                                           \
    static __device__ __forceinline__ void rs(float (&d)[16][4], const uint32_t (&a)[4], uint64_t b) {          \
      asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX_TYPE "." PTX_TYPE " " MISTRAL_EXT_WGMMA_D  \
                   ", {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"                                                 \
                   : MISTRAL_EXT_ACC64                                                                          \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));                                       \
    }                                                                                                           \
  };
MISTRAL_EXT_DEFINE_WGMMA(__nv_bfloat16, "bf16")
MISTRAL_EXT_DEFINE_WGMMA(__half, "f16")
#undef MISTRAL_EXT_DEFINE_WGMMA
#undef MISTRAL_EXT_ACC64
#undef MISTRAL_EXT_ACC4
#undef MISTRAL_EXT_WGMMA_D

// Tile loads: thread t takes row t / 2 and the 16-byte chunks t % 2 + 2i (so each pair of lanes
// reads 32 contiguous bytes per instruction).
//
// The CTA's query rows into the Q tile; rows past the end and padding queries are zero-filled.
template <typename T>
__device__ __forceinline__ void load_q_tile(const AttentionParams& p, const RowBlock& rb, unsigned char* q_tile) {
  const int r = threadIdx.x / 2;
  const int64_t token = static_cast<int64_t>(rb.b) * p.tokens + rb.token(r);
  const bool present = rb.exists(r) && p.positions[token] >= 0;
  const T* src = static_cast<const T*>(p.q) + (present ? token * p.q_token_stride + rb.head(r) * kHeadDim : 0);
#pragma unroll
  for (int i = 0; i < kHeadDim / 16; ++i) {
    const int chunk = threadIdx.x % 2 + 2 * i;
    cp_async_16(q_tile + swizzled_offset(r, chunk), src + (present ? 8 * chunk : 0), present);
  }
}

// Keys j0 .. j0 + 127 (key order of `span`) into a K stage with their positions (kAbsentKey for
// rows past the span's end and padding tokens, which are zero-filled), or into a V stage.
template <typename T, bool kValues>
__device__ __forceinline__ void load_key_tile(const AttentionParams& p, const KeySpan& span, const RowBlock& rb,
                                              int j0, unsigned char* tile, int* key_pos) {
  const int r = threadIdx.x / 2, j = j0 + r;
  const int64_t position = j < span.end ? key_position(p, span, rb.b, j) : -1;
  const bool present = position >= 0;
  const T* src = static_cast<const T*>(kValues ? p.v : p.k);
  if (present) {
    const KeyRow<T> row = key_row<T>(p, span, rb.b, rb.kv_head, j);
    src = kValues ? row.v : row.k;
  }
#pragma unroll
  for (int i = 0; i < kHeadDim / 16; ++i) {
    const int chunk = threadIdx.x % 2 + 2 * i;
    cp_async_16(tile + swizzled_offset(r, chunk), src + (present ? 8 * chunk : 0), present);
  }
  if (!kValues && threadIdx.x % 2 == 0) key_pos[r] = present ? static_cast<int>(position) : kAbsentKey;
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// grid (m_blocks * num_splits, num_kv_heads, batch), kThreads threads, kSmemBytes of dynamic shared
// memory; outputs as flash_attention_kernel's in attention.cu.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    flash_attention_sm90_kernel(const AttentionParams p, int num_splits, float* __restrict__ partial_out,
                                float* __restrict__ partial_lse) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + (kAtomBytes - shared_address(smem_raw) % kAtomBytes) % kAtomBytes;
  unsigned char* q_tile = smem;                                        // [kBlockM rows] swizzled
  unsigned char* k_tiles = smem + kTileBytes;                          // [2 stages][kTileKeys rows] swizzled
  unsigned char* v_tiles = smem + 3 * kTileBytes;                      // [2 stages][kTileKeys rows] swizzled
  int* key_pos = reinterpret_cast<int*>(smem + 5 * kTileBytes);        // [2 stages][kTileKeys]

  const int warp = threadIdx.x / 32, warpgroup = threadIdx.x / 128;
  const int split = blockIdx.x % num_splits;
  const RowBlock rb = cta_row_block(p, num_splits);
  WarpRows<kHeadDim> w = start_warp_rows<kHeadDim>(p, rb, warp);
  const TileRange range = split_tile_range<kTileKeys>(p, rb.b, rb.token(0), rb.last_token(), num_splits, split);
  const KeySpan& span = range.span;
  const int tiles = range.end - range.begin;

  if (tiles > 0) {  // the same for the whole CTA, so the barriers inside are safe
    const auto first_key = [&](int n) { return span.begin + (range.begin + n) * kTileKeys; };
    // Prologue: group 0 = Q and K(0); group 1 = K(1) and V(0).
    load_q_tile<T>(p, rb, q_tile);
    load_key_tile<T, false>(p, span, rb, first_key(0), k_tiles, key_pos);
    cp_async_commit();
    if (tiles > 1) load_key_tile<T, false>(p, span, rb, first_key(1), k_tiles + kTileBytes, key_pos + kTileKeys);
    load_key_tile<T, true>(p, span, rb, first_key(0), v_tiles, nullptr);
    cp_async_commit();

    // The warpgroup's 64 rows of Q; K and V stage 0. k16 step kk of S reads columns 16kk.. of Q and
    // K: half kk / 4, 32 bytes per step within the swizzled row. Step ks of O += P V reads keys
    // 16ks.. of V: 16 rows further.
    const uint64_t q_desc = matrix_descriptor(q_tile + warpgroup * 64 * kRowBytes, 16, kAtomBytes);
    const uint64_t k_desc = matrix_descriptor(k_tiles, 16, kAtomBytes);
    const uint64_t v_desc = matrix_descriptor(v_tiles, kHalfBytes, kAtomBytes);
    const auto k_step = [](int kk) { return static_cast<uint64_t>(((kk / 4) * kHalfBytes + (kk % 4) * 32) >> 4); };
    const auto stage_offset = [](int n) { return static_cast<uint64_t>(((n % 2) * kTileBytes) >> 4); };

    const float scale_log2 = p.scale * kLog2e;
    float s[kTileKeys / 8][4] = {};   // S(n), then its probabilities
    uint32_t pf[kTileKeys / 16][4];   // P(n - 1) as A fragments, 16 keys each
    const auto issue_values = [&](int n) {  // O += P(n) V(n), one commit group
#pragma unroll
      for (int ks = 0; ks < kTileKeys / 16; ++ks)
        Wgmma<T>::rs(w.out, pf[ks], v_desc + stage_offset(n) + ((ks * 16 * kRowBytes) >> 4));
      wgmma_commit();
    };
    for (int n = 0; n < tiles; ++n) {
      // K(n) and V(n - 1) have landed: the group committed two groups ago.
      cp_async_wait<1>();
      fence_proxy_async();
      __syncthreads();

      fence_registers(w.out);  // the rescale and P of the last tile are written before the fence
      fence_registers(pf);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk)
        Wgmma<T>::ss(s, q_desc + k_step(kk), k_desc + stage_offset(n) + k_step(kk), kk > 0);
      wgmma_commit();
      if (n > 0) {
        issue_values(n - 1);
        wgmma_wait<1>();  // S(n) is done; O += P(n - 1) V(n - 1) may still run
      } else {
        wgmma_wait<0>();
      }
      fence_registers(s);

      float factor[2];
      online_softmax<kTileKeys>(s, key_pos + (n % 2) * kTileKeys, scale_log2, w, factor);

      wgmma_wait<0>();  // P(n - 1) and O are free again
      fence_registers(w.out);
      rescale_output(w, factor);
      pack_probabilities<T, kTileKeys>(s, pf);

      // Every warpgroup is done with K(n) and V(n - 1): refill their stages with K(n + 2), V(n + 1).
      __syncthreads();
      if (n + 2 < tiles)
        load_key_tile<T, false>(p, span, rb, first_key(n + 2), k_tiles + (n % 2) * kTileBytes,
                                key_pos + (n % 2) * kTileKeys);
      if (n + 1 < tiles)
        load_key_tile<T, true>(p, span, rb, first_key(n + 1), v_tiles + ((n + 1) % 2) * kTileBytes, nullptr);
      cp_async_commit();  // possibly empty: keeps the group count of the wait above
    }

    // The last O += P V.
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
    fence_registers(w.out);
    fence_registers(pf);
    wgmma_fence();
    issue_values(tiles - 1);
    wgmma_wait<0>();
    fence_registers(w.out);
  }

  store_warp_rows<T, kHeadDim>(p, rb, warp, w, num_splits, split, partial_out, partial_lse);
#endif
}

}  // namespace

bool sm90_attention_enabled() {
#ifdef MISTRAL_EXT_SM90A
  const char* flag = std::getenv("MISTRAL_EXT_SM90_ATTENTION");
  if (flag != nullptr && std::strcmp(flag, "0") == 0) return false;  // opted out
  int device = 0, major = 0, minor = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
         cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess && major == 9 &&
         minor == 0;
#else
  return false;
#endif
}

template <typename T>
void launch_attention_sm90(const AttentionParams& p, dim3 grid, int num_splits, float* partial_out,
                           float* partial_lse, CudaStream stream) {
  allow_dynamic_shared_memory(flash_attention_sm90_kernel<T>, kSmemBytes);
  flash_attention_sm90_kernel<T><<<grid, kThreads, kSmemBytes, stream>>>(p, num_splits, partial_out, partial_lse);
  check_launch("attention (sm90)");
}

template void launch_attention_sm90<__nv_bfloat16>(const AttentionParams&, dim3, int, float*, float*, CudaStream);
template void launch_attention_sm90<__half>(const AttentionParams&, dim3, int, float*, float*, CudaStream);

}  // namespace detail
}  // namespace mistral_ext
