// Sliding-window grouped-query attention on the CPU (AttentionParams in kernels.h): the query at
// position i attends to the cached and new keys at positions j with i - W < j <= i, out =
// softmax(scale * q.k) @ v, accumulated in fp32 with an online softmax (running max and sum).
//
// A work item is (row b, kv head, block of query tokens); its rows are the queries of every head
// sharing that kv head, so each block of keys is converted to fp32 once and serves all of them.
// Only the key span that can fall inside the block's windows is visited (attention_key_span):
// keys far outside the window are never read. Items run in parallel over OpenMP threads. The fp32
// scratch is per thread and kept across calls, so a decode step allocates nothing.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_common.h"
#include "common.h"

namespace mistral_ext {
namespace {

constexpr int kKeyBlock = 64;    // keys converted to fp32 at a time
constexpr int kTargetRows = 64;  // query rows (tokens x heads of one kv head) per work item
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename U>
U* thread_scratch(size_t size) {
  thread_local std::vector<U> scratch;
  if (scratch.size() < size) scratch.resize(size);
  return scratch.data();
}

template <typename T>
void to_float_row(const T* src, float* dst, int n, float factor) {
  for (int i = 0; i < n; ++i) dst[i] = to_float(src[i]) * factor;
}

// q . k for four keys at once: four independent sums, and each q element loaded once.
void dot4(const float* q, const float* const* k, int d, float* out) {
  const float *k0 = k[0], *k1 = k[1], *k2 = k[2], *k3 = k[3];
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int i = 0; i < d; ++i) {
    s0 += q[i] * k0[i];
    s1 += q[i] * k1[i];
    s2 += q[i] * k2[i];
    s3 += q[i] * k3[i];
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

float dot(const float* a, const float* b, int d) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int i = 0; i < d; ++i) sum += a[i] * b[i];
  return sum;
}

// acc[0, d) += sum_j weight[j] * v[j][0, d), in chunks of 16 elements kept in registers over
// the keys (instead of reading and writing acc once per key). Keys of weight 0 (masked) are
// skipped: their v may be any data.
void accumulate_weighted(float* acc, const float* weight, const float* const* v, int n, int d) {
  constexpr int kChunk = 16;
  int i0 = 0;
  for (; i0 + kChunk <= d; i0 += kChunk) {
    float a[kChunk];
    for (int u = 0; u < kChunk; ++u) a[u] = acc[i0 + u];
    for (int j = 0; j < n; ++j) {
      if (weight[j] == 0.f) continue;
      const float w = weight[j];
      const float* v_j = v[j] + i0;
      for (int u = 0; u < kChunk; ++u) a[u] += w * v_j[u];
    }
    for (int u = 0; u < kChunk; ++u) acc[i0 + u] = a[u];
  }
  for (int j = 0; j < n && i0 < d; ++j) {
    if (weight[j] == 0.f) continue;
    for (int i = i0; i < d; ++i) acc[i] += weight[j] * v[j][i];
  }
}

// Online-softmax update of every query row with one block of n keys (fp32 rows k[j], v[j] at
// positions key_pos[j]). Row r: query q[r] (already scaled) at position query_pos[r].
void attend_key_block(const float* q, const int64_t* query_pos, int rows, int d, const float* const* k,
                      const float* const* v, const int64_t* key_pos, int n, int32_t window, float* acc,
                      float* running_max, float* running_sum) {
  float scores[kKeyBlock];
  for (int r = 0; r < rows; ++r) {
    if (query_pos[r] < 0) continue;
    const float* q_r = q + static_cast<size_t>(r) * d;
    int j = 0;
    for (; j + 4 <= n; j += 4) dot4(q_r, k + j, d, scores + j);
    for (; j < n; ++j) scores[j] = dot(q_r, k[j], d);
    float block_max = kNegInf;
    for (j = 0; j < n; ++j) {
      if (!key_visible(query_pos[r], key_pos[j], window)) scores[j] = kNegInf;
      block_max = std::max(block_max, scores[j]);
    }
    if (block_max == kNegInf) continue;
    const float new_max = std::max(running_max[r], block_max);
    float* acc_r = acc + static_cast<size_t>(r) * d;
    const float rescale = std::exp(running_max[r] - new_max);  // 0 for the first visible block
    if (rescale != 1.f)
      for (int i = 0; i < d; ++i) acc_r[i] *= rescale;
    float sum = running_sum[r] * rescale;
    for (j = 0; j < n; ++j) {  // scores become weights; masked keys get exactly 0
      scores[j] = scores[j] == kNegInf ? 0.f : std::exp(scores[j] - new_max);
      sum += scores[j];
    }
    accumulate_weighted(acc_r, scores, v, n, d);
    running_sum[r] = sum;
    running_max[r] = new_max;
  }
}

// Queries of tokens [t_begin, t_end) of row b for the heads of kv_head. Row r of the block is
// token t_begin + r / group, head kv_head * group + r % group (the output's own order).
template <typename T>
void attend_block(const AttentionParams& p, int32_t b, int32_t kv_head, int32_t t_begin, int32_t t_end) {
  const int group = p.num_heads / p.num_kv_heads;
  const int d = p.head_dim;
  const int rows = (t_end - t_begin) * group;
  const int64_t* positions = p.positions + static_cast<int64_t>(b) * p.tokens;
  const int64_t first_row_elem = ((static_cast<int64_t>(b) * p.tokens + t_begin) * p.num_heads + kv_head * group) * d;
  auto out_row = [&](int r) {
    return static_cast<T*>(p.out) + first_row_elem + (static_cast<int64_t>(r / group) * p.num_heads + r % group) * d;
  };
  if (positions[t_end - 1] < 0) {  // padding comes first: the whole block is padding
    for (int r = 0; r < rows; ++r) std::fill(out_row(r), out_row(r) + d, from_float<T>(0.f));
    return;
  }
  const KeySpan span = attention_key_span(p, b, t_begin, t_end - 1);

  constexpr bool kConvert = !std::is_same_v<T, float>;  // fp32 keys are read in place
  float* q = thread_scratch<float>(static_cast<size_t>(rows) * (2 * d + 2) + (kConvert ? 2 * kKeyBlock * d : 0));
  float* acc = q + static_cast<size_t>(rows) * d;            // [rows, d]
  float* running_max = acc + static_cast<size_t>(rows) * d;  // [rows]
  float* running_sum = running_max + rows;                   // [rows]
  float* k_buffer = running_sum + rows;                      // [kKeyBlock, d] when converting
  float* v_buffer = k_buffer + kKeyBlock * d;                // [kKeyBlock, d] when converting
  int64_t* query_pos = thread_scratch<int64_t>(rows);        // [rows]
  const T* q_in = static_cast<const T*>(p.q);
  for (int r = 0; r < rows; ++r) {
    const int64_t token = static_cast<int64_t>(b) * p.tokens + t_begin + r / group;
    to_float_row(q_in + token * p.q_token_stride + static_cast<int64_t>(kv_head * group + r % group) * d,
                 q + static_cast<size_t>(r) * d, d, p.scale);
    query_pos[r] = positions[t_begin + r / group];
  }
  std::fill(acc, acc + static_cast<size_t>(rows) * d, 0.f);
  std::fill(running_max, running_max + rows, kNegInf);
  std::fill(running_sum, running_sum + rows, 0.f);

  int64_t key_pos[kKeyBlock];
  const float* k_rows[kKeyBlock];
  const float* v_rows[kKeyBlock];
  for (int32_t j0 = span.begin; j0 < span.end; j0 += kKeyBlock) {
    const int n = std::min(kKeyBlock, span.end - j0);
    for (int j = 0; j < n; ++j) {
      key_pos[j] = key_position(p, span, b, j0 + j);
      if (key_pos[j] < 0) {  // padding: no query sees it; any readable row does (weight 0)
        k_rows[j] = v_rows[j] = q;
        continue;
      }
      const KeyRow<T> row = key_row<T>(p, span, b, kv_head, j0 + j);
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
    attend_key_block(q, query_pos, rows, d, k_rows, v_rows, key_pos, n, p.window, acc, running_max, running_sum);
  }
  for (int r = 0; r < rows; ++r) {  // padding queries saw no key: sum 0, output 0
    const float inv_sum = running_sum[r] > 0.f ? 1.f / running_sum[r] : 0.f;
    const float* acc_r = acc + static_cast<size_t>(r) * d;
    T* o = out_row(r);
    for (int i = 0; i < d; ++i) o[i] = from_float<T>(acc_r[i] * inv_sum);
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
  // Work ~ queries x keys per query x head_dim, for the threading decision only.
  const int64_t keys = p.window > 0 ? std::min<int64_t>(p.window, int64_t{p.capacity} + p.tokens)
                                    : int64_t{p.capacity} + p.tokens;
  const int64_t work = static_cast<int64_t>(p.batch) * p.tokens * p.num_heads * p.head_dim * keys;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
#pragma omp parallel for schedule(dynamic, 1) if (worth_threading(work) && items > 1)
    for (int64_t item = 0; item < items; ++item) {
      const int32_t block = static_cast<int32_t>(item % blocks);
      const int32_t kv_head = static_cast<int32_t>(item / blocks % p.num_kv_heads);
      const int32_t b = static_cast<int32_t>(item / blocks / p.num_kv_heads);
      attend_block<T>(p, b, kv_head, block * block_tokens, std::min(p.tokens, (block + 1) * block_tokens));
    }
  });
}

}  // namespace mistral_ext
