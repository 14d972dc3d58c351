// Sliding-window grouped-query attention on the CPU (AttentionParams in kernels.h): the query at
// position i attends to the cached and new keys at positions j with i - W < j <= i, out =
// softmax(scale * q.k) @ v, accumulated in fp32 with an online softmax (running max and sum).
//
// A work item is (row b, kv head, block of query tokens); its rows are the queries of every head
// sharing that kv head, so each block of keys is converted to fp32 once and serves all of them.
// Only the key span that can fall inside the block's windows is visited (attention_key_span):
// keys far outside the window are never read. Items run in parallel over OpenMP threads. When
// there are fewer items than threads can share evenly (a decode step: one item per kv head),
// each item's key span is also split into parts that run in parallel, and the parts' partial
// (max, sum, acc) are merged afterwards, as in flash-decoding. The fp32 scratch is per thread and
// kept across calls. While a block of keys is scored, the next block's cached rows are prefetched
// (CachedRows): in a model's decode step they come from memory.
//
// The arithmetic works on tiles of kRowTile = 4 query rows, so every key and value element loaded
// serves four rows: scores come from four-row x two-key dot products, and the weighted sum of
// values from four-row x two-vector register tiles; exp is a polynomial on vectors. As in
// linear_cpu.cpp, this is compiled for the baseline ISA (4-float vectors) and for AVX2 + FMA
// (8-float vectors), chosen at run time: the library is not built with -march=native.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "attention_common.h"
#include "common.h"
#include "cpu_vector.h"

namespace mistral_ext {
namespace {

// Everything on the per-part path is always inlined (MISTRAL_EXT_INLINE) into its two entry
// points (attend_part_*), so that it is compiled (and vectorised) for the ISA of the entry point
// it lands in.

constexpr int kKeyBlock = 64;                 // keys converted to fp32 and scored at a time
constexpr int kTargetRows = 64;               // query rows (tokens x heads of one kv head) per item
constexpr int kRowTile = 4;                   // query rows computed together (rows are padded to it)
constexpr int64_t kMinPartKeys = 4 * kKeyBlock;  // below this a part's fixed costs outweigh the balance
constexpr int kMaxParts = 16;                    // bounds the merge's per-part arrays
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Per-thread scratch kept across calls; each use has its own slot.
enum class Slot { kQueries, kQueryPositions, kState, kParts };
template <Slot S, typename U>
U* thread_scratch(size_t size) {
  thread_local std::vector<U> scratch;
  if (scratch.size() < size) scratch.resize(size);
  return scratch.data();
}

int round_up_rows(int rows) { return (rows + kRowTile - 1) / kRowTile * kRowTile; }

// Online-softmax state of an item's rows: acc [rows, d], running max and sum [rows].
struct RowState {
  float* acc;
  float* max;
  float* sum;
};

size_t state_floats(int rows, int d) { return static_cast<size_t>(rows) * (d + 2); }

RowState state_at(float* base, int rows, int d) {
  float* max = base + static_cast<size_t>(rows) * d;
  return {base, max, max + rows};
}

template <typename T>
MISTRAL_EXT_INLINE void to_float_row(const T* src, float* dst, int n, float factor) {
  for (int i = 0; i < n; ++i) dst[i] = to_float(src[i]) * factor;
}

template <int L, typename VF = typename Vec<L>::F>
MISTRAL_EXT_INLINE float horizontal_sum(VF x) {  // pairwise: short dependency chains
  for (int width = L / 2; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) x[i] += x[i + width];
  return x[0];
}

// s[r][j], s[r][j + 1] = q_r . k_j, q_r . k_j1 for the kRowTile rows of q ([kRowTile, d]): each
// key element loaded serves four rows, each query element two keys.
template <int L>
MISTRAL_EXT_INLINE void score_tile(const float* q, int d, const float* k_j, const float* k_j1,
                                   float (*s)[kKeyBlock], int j) {
  using VF = typename Vec<L>::F;
  VF a[kRowTile], b[kRowTile];
  for (int r = 0; r < kRowTile; ++r) a[r] = b[r] = VF{};
  int i = 0;
  for (; i + L <= d; i += L) {
    const VF x = *reinterpret_cast<const VF*>(k_j + i), y = *reinterpret_cast<const VF*>(k_j1 + i);
    for (int r = 0; r < kRowTile; ++r) {
      const VF q_ri = *reinterpret_cast<const VF*>(q + r * d + i);
      a[r] += q_ri * x;
      b[r] += q_ri * y;
    }
  }
  for (int r = 0; r < kRowTile; ++r) {
    float sa = horizontal_sum<L>(a[r]), sb = horizontal_sum<L>(b[r]);
    for (int t = i; t < d; ++t) sa += q[r * d + t] * k_j[t], sb += q[r * d + t] * k_j1[t];
    s[r][j] = sa, s[r][j + 1] = sb;
  }
}

// acc[r][0, d) += sum_j w[r][j] * v[j][0, d) for the kRowTile rows of acc ([kRowTile, d]), in
// register tiles of kRowTile rows x kColTile columns: each value element loaded serves four
// rows. Masked keys have weight 0 (their values are finite: padding keys point at zeros).
template <int L>
MISTRAL_EXT_INLINE void accumulate_tile(float* acc, int d, const float (*w)[kKeyBlock], const float* const* v,
                                        int n) {
  using VF = typename Vec<L>::F;
  constexpr int kTileVecs = 2;  // vectors per row: 8 accumulators, all in registers
  constexpr int kColTile = kTileVecs * L;
  int c0 = 0;
  for (; c0 + kColTile <= d; c0 += kColTile) {
    VF a[kRowTile][kTileVecs];
    for (int r = 0; r < kRowTile; ++r)
      for (int u = 0; u < kTileVecs; ++u) a[r][u] = *reinterpret_cast<const VF*>(acc + r * d + c0 + u * L);
    for (int j = 0; j < n; ++j) {
      VF v_j[kTileVecs];
      for (int u = 0; u < kTileVecs; ++u) v_j[u] = *reinterpret_cast<const VF*>(v[j] + c0 + u * L);
      for (int r = 0; r < kRowTile; ++r)
        for (int u = 0; u < kTileVecs; ++u) a[r][u] += w[r][j] * v_j[u];
    }
    for (int r = 0; r < kRowTile; ++r)
      for (int u = 0; u < kTileVecs; ++u) *reinterpret_cast<VF*>(acc + r * d + c0 + u * L) = a[r][u];
  }
  for (; c0 < d; ++c0)  // the last d % kColTile columns
    for (int r = 0; r < kRowTile; ++r) {
      float sum = acc[r * d + c0];
      for (int j = 0; j < n; ++j) sum += w[r][j] * v[j][c0];
      acc[r * d + c0] = sum;
    }
}

// Online-softmax update of row r's state with its scores s[0, n) against keys at key_pos; the
// scores become the weights (masked keys exactly 0). s has room for n rounded up to L.
// all_visible: every key of the block is inside this row's window (no masking needed).
template <int L>
MISTRAL_EXT_INLINE void softmax_update(float* s, int64_t query_pos, const int64_t* key_pos, int n, int32_t window,
                                       bool all_visible, int d, float* acc_r, float* running_max,
                                       float* running_sum) {
  using VF = typename Vec<L>::F;
  const int n_vec = (n + L - 1) / L * L;
  for (int j = n; j < n_vec; ++j) s[j] = kNegInf;
  if (!all_visible)
    for (int j = 0; j < n; ++j) s[j] = key_visible(query_pos, key_pos[j], window) ? s[j] : kNegInf;
  VF lane_max = VF{} + kNegInf;
  for (int j = 0; j < n_vec; j += L) {
    const VF s_j = *reinterpret_cast<const VF*>(s + j);
    lane_max = s_j > lane_max ? s_j : lane_max;
  }
  float block_max = kNegInf;
  for (int i = 0; i < L; ++i) block_max = std::max(block_max, lane_max[i]);
  if (block_max == kNegInf) {  // nothing visible (or a padding query): the state stays as it was
    std::fill(s, s + n, 0.f);
    return;
  }
  const float new_max = std::max(*running_max, block_max);
  // ~0 (e^-87) for the row's first visible block, whose acc and sum are still 0.
  const float rescale = exp_vector<L>(VF{} + (*running_max - new_max))[0];
  if (rescale != 1.f)
    for (int i = 0; i < d; ++i) acc_r[i] *= rescale;
  VF sum{};
  for (int j = 0; j < n_vec; j += L) {
    VF& s_j = *reinterpret_cast<VF*>(s + j);
    s_j = s_j == kNegInf ? VF{} : exp_vector<L>(s_j - new_max);
    sum += s_j;
  }
  *running_sum = *running_sum * rescale + horizontal_sum<L>(sum);
  *running_max = new_max;
}

// The cached K and V rows of one key block (its keys below span.num_cached), found once: requested
// from memory a key pair at a time while the block before it is scored, then read. A decode step
// reads cache rows that the weights streamed since have evicted, and the rows of one kv head are
// strided (every num_kv_heads-th head_dim slice), which the hardware prefetcher does not follow;
// asking for a whole block at once would stall on the core's outstanding-miss limit instead of
// overlapping the arithmetic.
template <typename T>
struct CachedRows {
  KeyRow<T> rows[kKeyBlock];
  int count = 0;

  // Rows j and j + 1 into the cache hierarchy (prefetcht1: measured faster here than into L1).
  MISTRAL_EXT_INLINE void prefetch_pair(int j, int d) const {
    for (int r = j; r < std::min(j + 2, count); ++r)
      for (size_t byte = 0; byte < d * sizeof(T); byte += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(rows[r].k) + byte, 0, 2);
        __builtin_prefetch(reinterpret_cast<const char*>(rows[r].v) + byte, 0, 2);
      }
  }
};

// Online-softmax update of every row with one block of n keys (fp32 rows k[j], v[j] at positions
// key_pos[j]; k has kKeyBlock entries, those past n any readable row). Row r: query q[r]
// (already scaled) at position query_pos[r]; rows is a multiple of kRowTile. The first row tile's
// scoring also prefetches the next block's rows.
template <int L, typename T>
MISTRAL_EXT_INLINE void attend_key_block(const float* q, const int64_t* query_pos, int rows, int d,
                                         const float* const* k, const float* const* v, const int64_t* key_pos,
                                         int n, int32_t window, const RowState& st, const CachedRows<T>& next) {
  float scores[kRowTile][kKeyBlock];
  // Key positions increase along the block unless it holds padding (negative positions, which
  // may follow the cached keys).
  const bool no_padding = std::all_of(key_pos, key_pos + n, [](int64_t pos) { return pos >= 0; });
  auto all_visible = [&](int64_t query_pos) {
    return no_padding && key_pos[n - 1] <= query_pos && (window <= 0 || key_pos[0] > query_pos - window);
  };
  for (int r0 = 0; r0 < rows; r0 += kRowTile) {
    const float* q_tile = q + static_cast<size_t>(r0) * d;
    for (int j = 0; j < n; j += 2) {
      if (r0 == 0) next.prefetch_pair(j, d);
      score_tile<L>(q_tile, d, k[j], k[j + 1], scores, j);
    }
    for (int r = r0; r < r0 + kRowTile; ++r)
      softmax_update<L>(scores[r - r0], query_pos[r], key_pos, n, window, all_visible(query_pos[r]), d,
                        st.acc + static_cast<size_t>(r) * d, st.max + r, st.sum + r);
    accumulate_tile<L>(st.acc + static_cast<size_t>(r0) * d, d, scores, v, n);
  }
}

// Queries of tokens [t_begin, t_end) of row b for the heads of kv_head. Row r of the item is
// token t_begin + r / group, head kv_head * group + r % group (the output's own order), padded
// with rows that see nothing up to a multiple of kRowTile.
struct Item {
  int32_t b, kv_head, t_begin, t_end;
};

// Attends the item's rows to part `part` of `parts` equal parts of its key span, leaving the
// unnormalised result in st.
template <typename T, int L>
MISTRAL_EXT_INLINE void attend_part(const AttentionParams& p, const Item& it, int part, int parts, const RowState& st) {
  const int group = p.num_heads / p.num_kv_heads;
  const int d = p.head_dim;
  const int rows = round_up_rows((it.t_end - it.t_begin) * group);
  std::fill(st.acc, st.acc + static_cast<size_t>(rows) * d, 0.f);
  std::fill(st.max, st.max + rows, kNegInf);
  std::fill(st.sum, st.sum + rows, 0.f);
  const int64_t* positions = p.positions + static_cast<int64_t>(it.b) * p.tokens;
  if (positions[it.t_end - 1] < 0) return;  // padding comes first: the whole item is padding
  const KeySpan span = attention_key_span(p, it.b, it.t_begin, it.t_end - 1);
  const int64_t span_keys = span.end - span.begin;
  const int32_t j_begin = span.begin + static_cast<int32_t>(span_keys * part / parts);
  const int32_t j_end = span.begin + static_cast<int32_t>(span_keys * (part + 1) / parts);

  constexpr bool kConvert = !std::is_same_v<T, float>;  // fp32 keys are read in place
  float* q = thread_scratch<Slot::kQueries, float>(static_cast<size_t>(rows + 1) * d +
                                                  (kConvert ? 2 * kKeyBlock * d : 0));
  float* zeros = q + static_cast<size_t>(rows) * d;  // [d]: k and v of padding keys
  float* k_buffer = zeros + d;                       // [kKeyBlock, d] when converting
  float* v_buffer = k_buffer + kKeyBlock * d;        // [kKeyBlock, d] when converting
  int64_t* query_pos = thread_scratch<Slot::kQueryPositions, int64_t>(rows);  // [rows]
  const T* q_in = static_cast<const T*>(p.q);
  const int real_rows = (it.t_end - it.t_begin) * group;
  std::fill(zeros, zeros + d, 0.f);
  for (int r = 0; r < rows; ++r) {
    float* q_r = q + static_cast<size_t>(r) * d;
    if (r >= real_rows) {
      std::fill(q_r, q_r + d, 0.f);
      query_pos[r] = -1;
      continue;
    }
    const int64_t token = static_cast<int64_t>(it.b) * p.tokens + it.t_begin + r / group;
    to_float_row(q_in + token * p.q_token_stride + static_cast<int64_t>(it.kv_head * group + r % group) * d, q_r, d,
                 p.scale);
    query_pos[r] = positions[it.t_begin + r / group];
  }

  // Cached rows of the block being read and of the next one (found and prefetched meanwhile).
  CachedRows<T> blocks[2];
  auto find_cached_rows = [&](CachedRows<T>& block, int32_t j0) {  // of the block starting at key j0
    block.count = 0;
    for (int32_t j = j0; j < std::min({j0 + kKeyBlock, j_end, span.num_cached}); ++j)
      block.rows[block.count++] = key_row<T>(p, span, it.b, it.kv_head, j);
  };
  find_cached_rows(blocks[0], j_begin);  // the first block: requested all at once, nothing to overlap yet
  for (int j = 0; j < blocks[0].count; j += 2) blocks[0].prefetch_pair(j, d);

  int64_t key_pos[kKeyBlock];
  const float* k_rows[kKeyBlock];
  const float* v_rows[kKeyBlock];
  for (int32_t j0 = j_begin, current = 0; j0 < j_end; j0 += kKeyBlock, current ^= 1) {
    const int n = std::min(kKeyBlock, j_end - j0);
    const CachedRows<T>& cached = blocks[current];
    for (int j = 0; j < n; ++j) {
      key_pos[j] = key_position(p, span, it.b, j0 + j);
      if (key_pos[j] < 0) {  // padding: no query sees it; a finite row keeps its weight 0 exact
        k_rows[j] = v_rows[j] = zeros;
        continue;
      }
      const KeyRow<T> row = j < cached.count ? cached.rows[j] : key_row<T>(p, span, it.b, it.kv_head, j0 + j);
      if constexpr (kConvert) {
        to_float_row(row.k, k_buffer + j * d, d, 1.f);
        to_float_row(row.v, v_buffer + j * d, d, 1.f);
        k_rows[j] = k_buffer + j * d;
        v_rows[j] = v_buffer + j * d;
      } else {
        k_rows[j] = row.k;
        v_rows[j] = row.v;
      }
    }
    if (n % 2) k_rows[n] = zeros;  // keys are scored in pairs; the spare score is never used
    CachedRows<T>& next = blocks[current ^ 1];
    find_cached_rows(next, j0 + kKeyBlock);
    attend_key_block<L>(q, query_pos, rows, d, k_rows, v_rows, key_pos, n, p.window, st, next);
  }
}

template <typename T>
void attend_part_baseline(const AttentionParams& p, const Item& it, int part, int parts, const RowState& st) {
  attend_part<T, 4>(p, it, part, parts, st);
}

#if defined(__x86_64__)
template <typename T>
__attribute__((target("avx2,fma"))) void attend_part_avx2(const AttentionParams& p, const Item& it, int part,
                                                          int parts, const RowState& st) {
  attend_part<T, 8>(p, it, part, parts, st);
}
#endif

template <typename T>
using PartFn = void (*)(const AttentionParams&, const Item&, int, int, const RowState&);

template <typename T>
PartFn<T> part_fn_for_this_cpu() {
#if defined(__x86_64__)
  if (cpu_has_avx2_fma()) return attend_part_avx2<T>;
#endif
  return attend_part_baseline<T>;
}

// Merges the partial states of an item's key parts and writes its output: each part's sum and
// acc count relative to its own max. Padding queries saw no key: sum 0, output 0.
template <typename T>
void write_output(const AttentionParams& p, const Item& it, const RowState* parts, int num_parts) {
  const int group = p.num_heads / p.num_kv_heads;
  const int d = p.head_dim;
  const int rows = (it.t_end - it.t_begin) * group;
  const int64_t first_row_elem =
      ((static_cast<int64_t>(it.b) * p.tokens + it.t_begin) * p.num_heads + it.kv_head * group) * d;
  float weight[kMaxParts];
  for (int r = 0; r < rows; ++r) {
    float max = kNegInf;
    for (int s = 0; s < num_parts; ++s) max = std::max(max, parts[s].max[r]);
    float sum = 0.f;
    for (int s = 0; s < num_parts; ++s) {
      weight[s] = parts[s].max[r] == kNegInf ? 0.f : std::exp(parts[s].max[r] - max);
      sum += parts[s].sum[r] * weight[s];
    }
    const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
    T* o = static_cast<T*>(p.out) + first_row_elem + (static_cast<int64_t>(r / group) * p.num_heads + r % group) * d;
    for (int i = 0; i < d; ++i) {
      float value = 0.f;
      for (int s = 0; s < num_parts; ++s) value += parts[s].acc[static_cast<size_t>(r) * d + i] * weight[s];
      o[i] = from_float<T>(value * inv_sum);
    }
  }
}

}  // namespace

void attention_cpu(const AttentionParams& p) {
  check_attention_params(p);
  if (p.batch == 0 || p.tokens == 0) return;
  const int32_t group = p.num_heads / p.num_kv_heads;
  const int32_t block_tokens = std::max(1, kTargetRows / group);
  const int32_t blocks = (p.tokens + block_tokens - 1) / block_tokens;
  const int64_t items = static_cast<int64_t>(p.batch) * p.num_kv_heads * blocks;
  const int rows = round_up_rows(std::min(block_tokens, p.tokens) * group);
  // Work ~ queries x keys per query x head_dim, for the threading decision only.
  const int64_t keys = p.window > 0 ? std::min<int64_t>(p.window, int64_t{p.capacity} + p.tokens)
                                    : int64_t{p.capacity} + p.tokens;
  const int64_t work = static_cast<int64_t>(p.batch) * p.tokens * p.num_heads * p.head_dim * keys;
  const bool threaded = worth_threading(work) && items > 1;
  // Few items split over the threads unevenly (3 kv heads on 2 threads: one thread does two), so
  // then each item's keys are split into parts, making the number of units (item, part) a
  // multiple of the threads. Many items balance well enough under dynamic scheduling.
  const int threads = omp_get_max_threads();
  int parts = 1;
  if (worth_threading(work) && items < 4 * threads) {
    const int64_t even = threads / std::gcd<int64_t>(items, threads);  // items * even: a multiple of threads
    parts = static_cast<int>(std::clamp<int64_t>(std::min(even, keys / kMinPartKeys), 1, kMaxParts));
  }
  float* part_states =
      parts > 1 ? thread_scratch<Slot::kParts, float>(state_floats(rows, p.head_dim) * items * parts) : nullptr;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const PartFn<T> part_fn = part_fn_for_this_cpu<T>();
    // Later query blocks see more keys (causal), so items are started from the last block back:
    // the longest first, which lets dynamic scheduling even out the end.
    auto item_at = [&](int64_t item) {
      const int32_t block = blocks - 1 - static_cast<int32_t>(item % blocks);
      const int32_t kv_head = static_cast<int32_t>(item / blocks % p.num_kv_heads);
      const int32_t b = static_cast<int32_t>(item / blocks / p.num_kv_heads);
      return Item{b, kv_head, block * block_tokens, std::min(p.tokens, (block + 1) * block_tokens)};
    };
    auto part_state = [&](int64_t unit) {
      return state_at(part_states + state_floats(rows, p.head_dim) * unit, rows, p.head_dim);
    };
#pragma omp parallel if (threaded || parts > 1)
    {
#pragma omp for schedule(dynamic, 1)
      for (int64_t unit = 0; unit < items * parts; ++unit) {
        const Item it = item_at(unit / parts);
        if (parts == 1) {
          const RowState st = state_at(thread_scratch<Slot::kState, float>(state_floats(rows, p.head_dim)), rows,
                                       p.head_dim);
          part_fn(p, it, 0, 1, st);
          write_output<T>(p, it, &st, 1);
        } else {
          part_fn(p, it, static_cast<int>(unit % parts), parts, part_state(unit));
        }
      }
      if (parts > 1) {  // every part is done: the loop above ends in a barrier
        RowState states[kMaxParts];
#pragma omp for
        for (int64_t item = 0; item < items; ++item) {
          for (int s = 0; s < parts; ++s) states[s] = part_state(item * parts + s);
          write_output<T>(p, item_at(item), states, parts);
        }
      }
    }
  });
}

}  // namespace mistral_ext
