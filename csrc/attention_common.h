// Shared by the CPU and CUDA attention kernels: argument checks, and which keys a block of
// queries can see (the ring-buffer cache and the chunk's own tokens, put in one "key order").
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "common.h"

namespace mistral_ext {

constexpr int32_t kMaxAttentionHeadDim = 256;

inline void check_attention_params(const AttentionParams& p) {
  require(p.dtype == DType::kFloat32 || p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16,
          "attention: unknown dtype tag " + std::to_string(static_cast<int>(p.dtype)));
  require(p.batch >= 0 && p.tokens >= 0, "attention: batch and tokens must be >= 0");
  require(p.num_heads > 0 && p.num_kv_heads > 0, "attention: num_heads and num_kv_heads must be > 0");
  require(p.num_heads % p.num_kv_heads == 0, "attention: num_heads (" + std::to_string(p.num_heads) +
                                                  ") must be a multiple of num_kv_heads (" +
                                                  std::to_string(p.num_kv_heads) + ")");
  require(p.head_dim > 0 && p.head_dim <= kMaxAttentionHeadDim,
          "attention: head_dim must be in [1, 256], got " + std::to_string(p.head_dim));
  require(p.capacity >= 0, "attention: capacity must be >= 0");
  require(p.capacity == 0 || (p.k_cache && p.v_cache && p.cache_lens),
          "attention: a cache (capacity > 0) needs k_cache, v_cache and cache_lens");
  const int64_t kv_width = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
  require(p.q_token_stride >= static_cast<int64_t>(p.num_heads) * p.head_dim && p.k_token_stride >= kv_width &&
              p.v_token_stride >= kv_width,
          "attention: token strides must be at least heads * head_dim");
  require(std::isfinite(p.scale), "attention: scale must be finite");
}

// The keys of row b in key order: index j < num_cached is the cached position cache_start + j
// (ring-buffer slot (cache_start + j) % capacity), index j >= num_cached is the chunk's token
// j - num_cached. Cached positions precede the chunk's, so positions increase along key order
// except at the chunk's padding tokens (negative positions, which no query sees).
// [begin, end) is the part that can fall inside the windows of a block of queries.
struct KeySpan {
  int64_t cache_start;
  int32_t num_cached;
  int32_t begin;
  int32_t end;
};

// First t in [0, n) with row[t] >= value (value >= 0), for a row of positions whose padding
// (negative entries) comes first and whose valid entries increase.
MISTRAL_EXT_HOST_DEVICE inline int32_t first_position_at_least(const int64_t* row, int32_t n, int64_t value) {
  int32_t lo = 0, hi = n;
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo) / 2;
    if (row[mid] < value)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// Key span of the queries t_first..t_last of row b, the last of which must be valid (position
// >= 0): keys from the first one inside the window of the earliest valid query up to the last
// query itself (later tokens are in every query's future).
MISTRAL_EXT_HOST_DEVICE inline KeySpan attention_key_span(const AttentionParams& p, int32_t b, int32_t t_first,
                                                          int32_t t_last) {
  const int64_t* row = p.positions + static_cast<int64_t>(b) * p.tokens;
  const int64_t first_query = row[t_first + first_position_at_least(row + t_first, t_last - t_first + 1, 0)];
  const int64_t lowest = p.window > 0 && first_query - p.window + 1 > 0 ? first_query - p.window + 1 : 0;
  const int64_t written = p.capacity > 0 && p.cache_lens[b] > 0 ? p.cache_lens[b] : 0;
  KeySpan s;
  s.cache_start = written > p.capacity ? written - p.capacity : 0;
  s.num_cached = static_cast<int32_t>(written - s.cache_start);
  s.begin = lowest < written ? static_cast<int32_t>((lowest > s.cache_start ? lowest : s.cache_start) - s.cache_start)
                             : s.num_cached + first_position_at_least(row, t_last + 1, lowest);
  s.end = s.num_cached + t_last + 1;
  return s;
}

MISTRAL_EXT_HOST_DEVICE inline int64_t key_position(const AttentionParams& p, const KeySpan& s, int32_t b, int32_t j) {
  return j < s.num_cached ? s.cache_start + j : p.positions[static_cast<int64_t>(b) * p.tokens + (j - s.num_cached)];
}

// Whether the query at position query_pos (>= 0) sees the key at key_pos.
MISTRAL_EXT_HOST_DEVICE inline bool key_visible(int64_t query_pos, int64_t key_pos, int32_t window) {
  return key_pos >= 0 && key_pos <= query_pos && (window <= 0 || key_pos > query_pos - window);
}

// The head kv_head of key j (key order) in the cache or in the chunk's k and v.
template <typename T>
struct KeyRow {
  const T* k;  // [head_dim]
  const T* v;  // [head_dim]
};

template <typename T>
MISTRAL_EXT_HOST_DEVICE inline KeyRow<T> key_row(const AttentionParams& p, const KeySpan& s, int32_t b,
                                                 int32_t kv_head, int32_t j) {
  if (j < s.num_cached) {
    const int64_t slot = (s.cache_start + j) % p.capacity;
    const int64_t offset = ((static_cast<int64_t>(b) * p.capacity + slot) * p.num_kv_heads + kv_head) * p.head_dim;
    return {static_cast<const T*>(p.k_cache) + offset, static_cast<const T*>(p.v_cache) + offset};
  }
  const int64_t token = static_cast<int64_t>(b) * p.tokens + (j - s.num_cached);
  const int64_t head = static_cast<int64_t>(kv_head) * p.head_dim;
  return {static_cast<const T*>(p.k) + token * p.k_token_stride + head,
          static_cast<const T*>(p.v) + token * p.v_token_stride + head};
}

}  // namespace mistral_ext
