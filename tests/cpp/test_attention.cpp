// Tests of the attention kernels (AttentionParams in kernels.h):
//  * attention_cpu against a plain double-precision loop written here (ring buffer read by its
//    documented slot rule, explicit window test, softmax over the visible keys), on random inputs:
//    window edges, chunks longer than the window, wrapped and partial ring buffers, left padding,
//    GQA groups of 1, 4 and 8, head_dim 64, 80 and 128, fp32 / bf16 / fp16;
//  * bad parameters throw std::invalid_argument (CPU, and CUDA when built: its checks run before
//    any device work);
//  * when built with CUDA and a device is present, attention_cuda against attention_cpu, including
//    long decode steps that take the split-KV path with its workspace.
// Prints one line per failed check and exits non-zero if there was any.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "test_support.h"

using namespace mistral_ext;
using namespace mistral_ext::testing;

namespace {

// One attention call: sizes, the chunk's positions (row b: pad[b] padding tokens, then
// start[b], start[b] + 1, ...) and cache lengths, with random q/k/v and caches.
struct Case {
  std::string name;
  int batch, tokens, heads, kv_heads, head_dim, capacity, window;
  std::vector<int32_t> cache_lens;  // per row; empty when capacity is 0
  std::vector<int> pad;             // padding tokens per row
};

struct Inputs {
  Values q, k, v, k_cache, v_cache;
  std::vector<int64_t> positions;
  Inputs(const Case& c, DType d)
      : q(random_normal(d, int64_t{c.batch} * c.tokens * c.heads * c.head_dim)),
        k(random_normal(d, int64_t{c.batch} * c.tokens * c.kv_heads * c.head_dim)),
        v(random_normal(d, int64_t{c.batch} * c.tokens * c.kv_heads * c.head_dim)),
        k_cache(random_normal(d, int64_t{c.batch} * c.capacity * c.kv_heads * c.head_dim)),
        v_cache(random_normal(d, int64_t{c.batch} * c.capacity * c.kv_heads * c.head_dim)) {
    for (int b = 0; b < c.batch; ++b) {
      const int64_t start = c.capacity > 0 ? c.cache_lens[b] : 0;
      for (int t = 0; t < c.tokens; ++t) positions.push_back(t < c.pad[b] ? -1 : start + t - c.pad[b]);
    }
  }
  AttentionParams params(const Case& c, DType d, void* out) {
    return AttentionParams{d, c.batch, c.tokens, c.heads, c.kv_heads, c.head_dim, c.capacity, c.window,
                           1.f / std::sqrt(float(c.head_dim)), q.data(), int64_t{c.heads} * c.head_dim, k.data(),
                           int64_t{c.kv_heads} * c.head_dim, v.data(), int64_t{c.kv_heads} * c.head_dim,
                           c.capacity > 0 ? k_cache.data() : nullptr, c.capacity > 0 ? v_cache.data() : nullptr,
                           positions.data(), c.capacity > 0 ? c.cache_lens.data() : nullptr, out, nullptr};
  }
};

// The documented semantics, one query at a time in double precision.
std::vector<double> attention_loop(const Case& c, const Inputs& in) {
  const int d = c.head_dim, group = c.heads / c.kv_heads;
  std::vector<double> out(size_t(c.batch) * c.tokens * c.heads * d, 0.0);
  for (int b = 0; b < c.batch; ++b)
    for (int t = 0; t < c.tokens; ++t) {
      const int64_t i = in.positions[size_t(b) * c.tokens + t];
      if (i < 0) continue;
      for (int h = 0; h < c.heads; ++h) {
        const int kv = h / group;
        // Keys: (position, offset of its head in k/k_cache, from the cache?)
        struct Key {
          int64_t position, offset;
          bool cached;
        };
        std::vector<Key> keys;
        if (c.capacity > 0) {
          const int64_t length = c.cache_lens[b];
          for (int64_t p = std::max<int64_t>(0, length - c.capacity); p < length; ++p)
            keys.push_back({p, ((int64_t{b} * c.capacity + p % c.capacity) * c.kv_heads + kv) * d, true});
        }
        for (int u = 0; u < c.tokens; ++u)
          keys.push_back({in.positions[size_t(b) * c.tokens + u], ((int64_t{b} * c.tokens + u) * c.kv_heads + kv) * d,
                          false});
        const int64_t q_offset = ((int64_t{b} * c.tokens + t) * c.heads + h) * d;
        std::vector<double> scores;
        std::vector<const Key*> seen;
        for (const Key& key : keys) {
          if (key.position < 0 || key.position > i || (c.window > 0 && key.position <= i - c.window)) continue;
          const Values& kb = key.cached ? in.k_cache : in.k;
          double dot = 0;
          for (int e = 0; e < d; ++e) dot += double(in.q.get(q_offset + e)) * kb.get(key.offset + e);
          scores.push_back(dot / std::sqrt(double(d)));
          seen.push_back(&key);
        }
        double max_score = -INFINITY, total = 0;
        for (double s : scores) max_score = std::max(max_score, s);
        for (double& s : scores) total += (s = std::exp(s - max_score));
        for (size_t n = 0; n < seen.size(); ++n) {
          const Values& vb = seen[n]->cached ? in.v_cache : in.v;
          for (int e = 0; e < d; ++e) out[q_offset + e] += scores[n] / total * vb.get(seen[n]->offset + e);
        }
      }
    }
  return out;
}

// fp32: accumulation order only; 16-bit: the output's single rounding (2^-8 / 2^-11 relative).
double rtol_for(DType d) { return d == DType::kFloat32 ? 1e-4 : d == DType::kBFloat16 ? 1.0 / 128 : 1.0 / 1024; }

const DType kAllDtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};

std::vector<Case> cases() {
  return {
      // One prompt of W + 2 tokens: queries at W - 1, W and W + 1 around the window's edge.
      {"window edge", 1, 18, 8, 2, 64, 0, 16, {}, {0}},
      // A prompt of three windows in one call, GQA group of 8 (one kv head).
      {"three windows", 2, 48, 8, 1, 64, 0, 16, {}, {0, 5}},
      // Continuation over a partly filled and a wrapped ring buffer, chunk longer than W.
      {"wrapped cache", 2, 21, 4, 2, 128, 16, 16, {9, 40}, {0, 3}},
      // Left-padded batch of different lengths, one row all padding.
      {"padded batch", 3, 7, 8, 8, 64, 12, 12, {0, 30, 5}, {2, 0, 7}},
      // A head_dim that only the CPU kernel supports.
      {"head_dim 80", 2, 9, 6, 3, 80, 8, 8, {3, 20}, {0, 2}},
      // Decode steps over a full ring buffer and a fresh one.
      {"decode", 3, 1, 32, 8, 128, 32, 32, {200, 32, 1}, {0, 0, 0}},
      // No window: plain causal over a cache holding every position.
      {"causal", 2, 5, 6, 3, 64, 64, 0, {40, 0}, {0, 2}},
  };
}

void test_cpu() {
  for (const Case& c : cases())
    for (DType d : kAllDtypes) {
      Inputs in(c, d);
      Values out(d, int64_t{c.batch} * c.tokens * c.heads * c.head_dim);
      attention_cpu(in.params(c, d, out.data()));
      expect_close("attention_cpu " + c.name + " " + dtype_name(d), out, attention_loop(c, in), {1e-5, rtol_for(d)});
    }
}

template <typename Launch>
void test_bad_params(const std::string& backend, Launch launch) {
  const Case c = cases()[2];
  Inputs in(c, DType::kBFloat16);
  Values out(DType::kBFloat16, int64_t{c.batch} * c.tokens * c.heads * c.head_dim);
  const AttentionParams good = in.params(c, DType::kBFloat16, out.data());
  auto with = [&](auto change) {
    AttentionParams p = good;
    change(p);
    return [p, &launch] { launch(p); };
  };
  expect_invalid(backend + " heads not a multiple of kv heads", with([](AttentionParams& p) { p.num_heads = 3; }));
  expect_invalid(backend + " head_dim 0", with([](AttentionParams& p) { p.head_dim = 0; }));
  expect_invalid(backend + " head_dim 300", with([](AttentionParams& p) { p.head_dim = 300; }));
  expect_invalid(backend + " cache without cache_lens", with([](AttentionParams& p) { p.cache_lens = nullptr; }));
  expect_invalid(backend + " negative capacity", with([](AttentionParams& p) { p.capacity = -1; }));
  expect_invalid(backend + " short token stride", with([](AttentionParams& p) { p.q_token_stride = 8; }));
  expect_invalid(backend + " unknown dtype", with([](AttentionParams& p) { p.dtype = static_cast<DType>(7); }));
}

#ifdef MISTRAL_EXT_WITH_CUDA

// attention_cuda against attention_cpu on the same inputs, through both CUDA kernels (at most 8
// query rows per sequence and kv head take the decode kernel). 16-bit: the tensor-core kernel
// rounds the softmax weights to the storage type before the P @ V product (as flash attention does).
// `label` names the kernel set under test in the failure messages.
void test_cuda_against_cpu(const std::string& label) {
  std::vector<Case> all;
  for (const Case& c : cases())
    if (c.head_dim != 80) all.push_back(c);  // CPU-only head_dim
  all.push_back({"split-KV decode", 2, 1, 32, 8, 128, 4096, 4096, {8000, 4096}, {0, 0}});
  all.push_back({"split-KV decode d96", 1, 2, 12, 4, 96, 1024, 0, {900}, {1}});
  // The CUDA-core decode kernel at its row limit (8 = tokens x group), window below capacity.
  all.push_back({"decode d64 group 8", 2, 1, 16, 2, 64, 300, 256, {1000, 77}, {0, 0}});
  all.push_back({"decode d128 two tokens", 3, 2, 8, 2, 128, 64, 48, {130, 64, 3}, {0, 1, 0}});
  all.push_back({"long prefill d64", 1, 300, 8, 2, 64, 0, 100, {}, {0}});
  // Prefill at head_dim 128 (the Hopper kernel's): several 128-key tiles, wrapped cache, padding.
  all.push_back({"long prefill d128", 2, 260, 8, 2, 128, 64, 64, {100, 0}, {0, 37}});
  for (const Case& c : all)
    for (DType d : kAllDtypes) {
      Inputs in(c, d);
      const int64_t out_elems = int64_t{c.batch} * c.tokens * c.heads * c.head_dim;
      Values cpu_out(d, out_elems);
      attention_cpu(in.params(c, d, cpu_out.data()));

      const DeviceBuffer q(in.q), k(in.k), v(in.v), kc(in.k_cache), vc(in.v_cache), pos(in.positions),
          lens(c.cache_lens), out(nullptr, cpu_out.bytes());
      AttentionParams p = in.params(c, d, out.data());
      p.q = q.data(), p.k = k.data(), p.v = v.data(), p.positions = pos.as<int64_t>();
      if (c.capacity > 0) {
        p.k_cache = kc.data(), p.v_cache = vc.data(), p.cache_lens = lens.as<int32_t>();
      }
      const DeviceBuffer workspace(nullptr, attention_workspace_bytes(p));
      p.workspace = workspace.data();
      attention_cuda(p, nullptr);
      const double atol = d == DType::kFloat32 ? 1e-5 : d == DType::kBFloat16 ? 1e-2 : 2e-3;
      expect_close("attention_cuda " + label + c.name + " " + dtype_name(d), out.to_host(d), as_doubles(cpu_out),
                   {atol, 2 * rtol_for(d)});
    }
}

#endif

}  // namespace

int main() {
  rng.seed(3);
  test_cpu();
  test_bad_params("cpu", [](const AttentionParams& p) { attention_cpu(p); });
#ifdef MISTRAL_EXT_WITH_CUDA
  test_bad_params("cuda", [](const AttentionParams& p) { attention_cuda(p, nullptr); });
  {
    const Case c = cases()[4];  // head_dim 80: fine on the CPU, not on CUDA
    Inputs in(c, DType::kBFloat16);
    Values out(DType::kBFloat16, int64_t{c.batch} * c.tokens * c.heads * c.head_dim);
    const AttentionParams p = in.params(c, DType::kBFloat16, out.data());
    expect_invalid("cuda head_dim 80", [&] { attention_cuda(p, nullptr); });
  }
  if (cuda_device_present()) {
    // On a compute capability 9.0 device prefill takes the Hopper kernel unless turned off: then
    // both kernels are tested.
    int major = 0, minor = 0;
    check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), "cudaDeviceGetAttribute");
    check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0), "cudaDeviceGetAttribute");
    const bool hopper = major == 9 && minor == 0;
    if (hopper) setenv("MISTRAL_EXT_SM90_ATTENTION", "0", 1);
    test_cuda_against_cpu("");
    if (hopper) {
      unsetenv("MISTRAL_EXT_SM90_ATTENTION");
      test_cuda_against_cpu("(sm90) ");
    }
  } else
    std::printf("SKIP attention_cuda against attention_cpu: no CUDA device\n");
#endif
  if (failures == 0) std::printf("OK attention\n");
  return failures == 0 ? 0 : 1;
}
