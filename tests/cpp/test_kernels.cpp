// Tests of the kernel library's non-attention ops (RMSNorm, fused add + RMSNorm, rotary,
// SiLU-and-mul, KV-cache write, fused rotary + KV-cache write):
//  * each CPU kernel against a plain double-precision loop written here, on random inputs with
//    odd and usual sizes and strided layouts, in fp32, bf16 and fp16; the fused rotary + cache
//    write against the CPU rotary and cache-write kernels run one after the other (bit for bit);
//  * bad parameters throw std::invalid_argument, from the CPU entry points and, when built with
//    CUDA, from the CUDA ones (their checks run before any device work, so no GPU is needed);
//  * the fp16 / bf16 conversions of csrc/common.h against known bit patterns;
//  * when built with CUDA and a device is present, each CUDA kernel against the CPU kernel in
//    fp32, fp16 and bf16, on 16-byte-aligned layouts (packed path) and unaligned ones (scalar);
//    the fused rotary + cache write also against the two CUDA kernels it fuses (bit for bit).
// Prints one line per failed check and exits non-zero if there was any.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "test_support.h"

using namespace mistral_ext;
using namespace mistral_ext::testing;

namespace {

// A kernel against a double-precision loop: fp32 accumulation slack, or the single rounding of
// a 16-bit result (half an ulp, up to 2^-8 relative for bf16 and 2^-11 for fp16, doubled).
Tolerance vs_exact(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return {1e-5, 1e-4};
    case DType::kFloat16: return {1e-5, 1.0 / 1024};
    case DType::kBFloat16: return {1e-5, 1.0 / 128};
  }
  return {0, 0};
}

std::string describe(const char* op, DType dtype, std::initializer_list<std::pair<const char*, int64_t>> sizes) {
  std::string s = std::string(op) + " " + dtype_name(dtype);
  for (const auto& [name, value] : sizes) s += std::string(" ") + name + "=" + std::to_string(value);
  return s;
}

// Row b of `batch` rows of `tokens` positions counts up from starts[b % starts.size()];
// the negative ones are left padding.
std::vector<int64_t> make_positions(int batch, int tokens, const std::vector<int64_t>& starts) {
  std::vector<int64_t> positions;
  for (int b = 0; b < batch; ++b)
    for (int t = 0; t < tokens; ++t) positions.push_back(starts[b % starts.size()] + t);
  return positions;
}

// Left padding, a fresh sequence, continuation past a 4096 window, 128k context and beyond.
const std::vector<int64_t> kRotaryStarts = {-2, 0, 4090, 131069, 999998};

const DType kAllDtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};

// ---------------------------------------------------------------------------------------------
// Plain loops (the expected values).

std::vector<double> rms_norm_loop(const Values& x, int64_t stride, const Values& w, int64_t rows, int64_t hidden,
                                  double eps) {
  std::vector<double> out(rows * hidden);
  for (int64_t r = 0; r < rows; ++r) {
    double sum_squares = 0;
    for (int64_t i = 0; i < hidden; ++i) sum_squares += double(x.get(r * stride + i)) * x.get(r * stride + i);
    const double inv_rms = 1.0 / std::sqrt(sum_squares / hidden + eps);
    for (int64_t i = 0; i < hidden; ++i) out[r * hidden + i] = x.get(r * stride + i) * inv_rms * w.get(i);
  }
  return out;
}

// Rotates the q and k heads of every non-padding token of a [tokens, width] buffer in which q
// starts at column 0 and k at column k_offset, both with token stride `width`.
std::vector<double> rotary_loop(const Values& qk, int64_t width, int64_t k_offset, const std::vector<int64_t>& positions,
                                int heads, int kv_heads, int head_dim, float theta) {
  std::vector<double> out = as_doubles(qk);
  const int half = head_dim / 2;
  for (size_t t = 0; t < positions.size(); ++t) {
    if (positions[t] < 0) continue;
    for (int h = 0; h < heads + kv_heads; ++h) {
      const int64_t base = t * width + (h < heads ? h * head_dim : k_offset + (h - heads) * head_dim);
      for (int i = 0; i < half; ++i) {
        // The documented angle: fp32 inverse frequency, fp32 product.
        const float inv_freq = static_cast<float>(std::pow(double(theta), -2.0 * i / head_dim));
        const float angle = static_cast<float>(positions[t]) * inv_freq;
        const double c = std::cos(double(angle)), s = std::sin(double(angle));
        const double x1 = qk.get(base + i), x2 = qk.get(base + half + i);
        out[base + i] = x1 * c - x2 * s;
        out[base + half + i] = x2 * c + x1 * s;
      }
    }
  }
  return out;
}

// Writes token after token, so that later tokens overwrite earlier ones in the same slot. Token
// n's values start at src[src_offset + n * token_stride].
void kv_cache_loop(Values& cache, const Values& src, int64_t src_offset, int64_t token_stride,
                   const std::vector<int64_t>& positions, int batch, int tokens, int capacity, int64_t token_elems) {
  for (int b = 0; b < batch; ++b)
    for (int t = 0; t < tokens; ++t) {
      const int64_t position = positions[b * tokens + t];
      if (position < 0) continue;
      const int64_t dst = (b * capacity + position % capacity) * token_elems;
      const int64_t from = src_offset + (int64_t{b} * tokens + t) * token_stride;
      for (int64_t i = 0; i < token_elems; ++i) cache.set(dst + i, src.get(from + i));
    }
}

// ---------------------------------------------------------------------------------------------
// CPU kernels against the plain loops.

void test_rms_norm_cpu(DType d) {
  for (int64_t hidden : {1, 7, 33, 64, 4097})
    for (int64_t pad : {0, 5}) {
      const int64_t rows = 3, stride = hidden + pad;
      const Values x = random_values(d, rows * stride), w = random_values(d, hidden);
      Values out(d, rows * hidden);
      rms_norm_cpu(RmsNormParams{d, rows, hidden, x.data(), stride, w.data(), out.data(), 1e-5f});
      expect_close(describe("rms_norm_cpu", d, {{"hidden", hidden}, {"stride", stride}}), out,
                   rms_norm_loop(x, stride, w, rows, hidden, 1e-5), vs_exact(d));
    }
}

void test_fused_add_rms_norm_cpu(DType d) {
  for (int64_t hidden : {1, 7, 33, 4097}) {
    const int64_t rows = 4, n = rows * hidden;
    const Values x = random_values(d, n), residual = random_values(d, n), w = random_values(d, hidden);
    Values summed(d, n);
    for (int64_t i = 0; i < n; ++i) summed.set(i, x.get(i) + residual.get(i));  // fp32 sum, rounded once
    const std::vector<double> want = rms_norm_loop(summed, hidden, w, rows, hidden, 1e-6);
    const std::string what = describe("fused_add_rms_norm_cpu", d, {{"hidden", hidden}});

    Values out(d, n), residual_out(d, n);
    fused_add_rms_norm_cpu(FusedAddRmsNormParams{d, rows, hidden, x.data(), residual.data(), w.data(), out.data(),
                                                 residual_out.data(), 1e-6f});
    expect(residual_out == summed, what + ": residual_out is not the rounded sum");
    expect_close(what, out, want, vs_exact(d));

    Values in_place = residual;  // residual_out aliasing residual
    fused_add_rms_norm_cpu(FusedAddRmsNormParams{d, rows, hidden, x.data(), in_place.data(), w.data(), out.data(),
                                                 in_place.data(), 1e-6f});
    expect(in_place == summed, what + " in place: residual is not the rounded sum");
    expect_close(what + " in place", out, want, vs_exact(d));
  }
}

void test_rotary_cpu(DType d) {
  struct Case {
    int heads, kv_heads, head_dim, pad;
    float theta;
  };
  for (const Case& c : {Case{4, 2, 64, 0, 10000.f}, Case{4, 2, 96, 3, 1e6f}, Case{3, 1, 128, 0, 10000.f},
                        Case{2, 2, 2, 1, 10000.f}, Case{2, 1, 6, 0, 500.f}, Case{1, 1, 256, 0, 1e5f}}) {
    const int batch = 5, tokens = 4;
    // A fused [q | k | v] projection output per token; rotary touches q and k only.
    const int64_t k_offset = int64_t{c.heads} * c.head_dim;
    const int64_t width = (c.heads + 2 * c.kv_heads) * int64_t{c.head_dim} + c.pad;
    const std::vector<int64_t> positions = make_positions(batch, tokens, kRotaryStarts);
    Values qk = random_values(d, batch * tokens * width);
    const std::vector<double> want = rotary_loop(qk, width, k_offset, positions, c.heads, c.kv_heads, c.head_dim, c.theta);
    rotary_embedding_cpu(RotaryParams{d, batch * tokens, c.heads, c.kv_heads, c.head_dim, qk.data(), width,
                                      qk.data(k_offset), width, positions.data(), c.theta});
    expect_close(describe("rotary_embedding_cpu", d, {{"head_dim", c.head_dim}, {"width", width}}), qk, want,
                 vs_exact(d));
  }
}

void test_silu_and_mul_cpu(DType d) {
  for (int64_t inter : {1, 7, 33, 4097}) {
    const int64_t rows = 3;
    const Values x = random_values(d, rows * 2 * inter);
    Values out(d, rows * inter);
    silu_and_mul_cpu(SiluAndMulParams{d, rows, inter, x.data(), out.data()});
    std::vector<double> want(rows * inter);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < inter; ++i) {
        const double gate = x.get(r * 2 * inter + i), up = x.get(r * 2 * inter + inter + i);
        want[r * inter + i] = gate / (1.0 + std::exp(-gate)) * up;
      }
    expect_close(describe("silu_and_mul_cpu", d, {{"inter", inter}}), out, want, vs_exact(d));
  }
}

void test_kv_cache_write_cpu(DType d) {
  struct Case {
    int tokens, kv_heads, head_dim, capacity;
  };
  // Rows: left padding, a continuation whose chunk is longer than the buffer, all padding.
  const std::vector<int64_t> starts = {-2, 4090, -100};
  for (const Case& c : {Case{6, 2, 5, 4}, Case{6, 2, 8, 16}, Case{1, 3, 64, 7}}) {
    const int batch = 3;
    const int64_t token_elems = int64_t{c.kv_heads} * c.head_dim;
    const int64_t width = 3 * token_elems;  // k and v are column slices of a fused [q | k | v] buffer
    const std::vector<int64_t> positions = make_positions(batch, c.tokens, starts);
    const Values kv = random_values(d, batch * c.tokens * width);
    Values k_cache = random_values(d, batch * c.capacity * token_elems);
    Values v_cache = random_values(d, batch * c.capacity * token_elems);
    Values k_want = k_cache, v_want = v_cache;
    kv_cache_loop(k_want, kv, 0, width, positions, batch, c.tokens, c.capacity, token_elems);
    kv_cache_loop(v_want, kv, token_elems, width, positions, batch, c.tokens, c.capacity, token_elems);
    kv_cache_write_cpu(KvCacheWriteParams{d, batch, c.tokens, c.kv_heads, c.head_dim, c.capacity, kv.data(), width,
                                          kv.data(token_elems), width, k_cache.data(), v_cache.data(),
                                          positions.data()});
    const std::string what = describe("kv_cache_write_cpu", d, {{"tokens", c.tokens}, {"capacity", c.capacity}});
    expect(k_cache == k_want, what + ": k_cache differs");
    expect(v_cache == v_want, what + ": v_cache differs");
  }
}

// A fused rotary + cache-write case: q, k, v are column slices of a fused [q | k | v | pad]
// buffer of batch * tokens tokens.
struct RotaryCacheCase {
  int batch, tokens, heads, kv_heads, head_dim, capacity, pad;
  int64_t width() const { return (heads + 2 * kv_heads) * int64_t{head_dim} + pad; }
  int64_t cache_elems() const { return int64_t{batch} * capacity * kv_heads * head_dim; }
};

const RotaryCacheCase kRotaryCacheCases[] = {
    {3, 1, 5, 1, 64, 7, 0},     // decode steps, odd head count
    {5, 1, 32, 8, 128, 16, 0},  // decode steps, Mistral's heads
    {5, 6, 3, 3, 128, 4, 3},    // chunks longer than the ring: tokens rotated but not written
    {3, 3, 3, 1, 6, 5, 1},      // tiny head_dim (odd half)
    {2, 2, 2, 2, 256, 3, 0},
};

// Rows: left padding, wrapped rings, a continuation past a 4096 window, padding only, 128k.
const std::vector<int64_t> kRotaryCacheStarts = {-1, 6, 4090, -100, 131071};

// The params of case c over a qkv buffer and two caches (host or device pointers alike).
RotaryCacheWriteParams rotary_cache_params(DType d, const RotaryCacheCase& c, void* qkv, void* k_cache, void* v_cache,
                                           const int64_t* positions) {
  const int64_t q_cols = int64_t{c.heads} * c.head_dim, kv_cols = int64_t{c.kv_heads} * c.head_dim;
  char* k = static_cast<char*>(qkv) + q_cols * dtype_size(d);
  const char* v = k + kv_cols * dtype_size(d);
  return {RotaryParams{d, int64_t{c.batch} * c.tokens, c.heads, c.kv_heads, c.head_dim, qkv, c.width(), k, c.width(),
                       positions, 10000.f},
          KvCacheWriteParams{d, c.batch, c.tokens, c.kv_heads, c.head_dim, c.capacity, k, c.width(), v, c.width(),
                             k_cache, v_cache, positions}};
}

// Random q | k | v rows (with `pad` unused columns) and caches for case c, positions from
// kRotaryCacheStarts.
struct RotaryCacheInputs {
  std::vector<int64_t> positions;
  Values qkv, k_cache, v_cache;
  RotaryCacheInputs(DType d, const RotaryCacheCase& c)
      : positions(make_positions(c.batch, c.tokens, kRotaryCacheStarts)),
        qkv(random_values(d, c.batch * c.tokens * c.width())),
        k_cache(random_values(d, c.cache_elems())),
        v_cache(random_values(d, c.cache_elems())) {}
};

void test_rotary_cache_write_cpu(DType d) {
  for (const RotaryCacheCase& c : kRotaryCacheCases) {
    const RotaryCacheInputs in(d, c);
    const std::vector<int64_t>& positions = in.positions;
    const Values &qkv = in.qkv, &k_init = in.k_cache, &v_init = in.v_cache;
    Values want_qkv = qkv, want_k = k_init, want_v = v_init;
    const RotaryCacheWriteParams unfused =
        rotary_cache_params(d, c, want_qkv.data(), want_k.data(), want_v.data(), positions.data());
    rotary_embedding_cpu(unfused.rotary);
    kv_cache_write_cpu(unfused.cache);
    Values qkv_out = qkv, k_cache = k_init, v_cache = v_init;
    rotary_embedding_cache_write_cpu(rotary_cache_params(d, c, qkv_out.data(), k_cache.data(), v_cache.data(),
                                                         positions.data()));
    const std::string what = describe("rotary_embedding_cache_write_cpu", d,
                                      {{"tokens", c.tokens}, {"heads", c.heads}, {"head_dim", c.head_dim}});
    expect(qkv_out == want_qkv, what + ": q | k | v differ from rotary_embedding_cpu's");
    expect(k_cache == want_k, what + ": k_cache differs from kv_cache_write_cpu's");
    expect(v_cache == want_v, what + ": v_cache differs from kv_cache_write_cpu's");
  }
}

// ---------------------------------------------------------------------------------------------
// fp16 / bf16 conversions of csrc/common.h.

void test_conversions() {
  const auto bf16 = [](float f) { return from_float<BFloat16>(f).bits; };
  expect(bf16(1.f) == 0x3f80 && bf16(-2.f) == 0xc000, "bf16 of 1 and -2");
  expect(bf16(1.f + 0x1p-8f) == 0x3f80, "bf16 rounds a tie to even (down)");
  expect(bf16(1.f + 3 * 0x1p-8f) == 0x3f82, "bf16 rounds a tie to even (up)");
  expect(bf16(1.f + 0x1p-8f + 0x1p-20f) == 0x3f81, "bf16 rounds above a tie up");
  expect(std::isnan(to_float(BFloat16{bf16(NAN)})), "bf16 keeps NaN");
  expect(to_float(BFloat16{0x4049}) == 3.140625f, "bf16 0x4049 is 3.140625");

  const auto fp16 = [](float f) { return float_to_half_bits(f); };
  expect(fp16(1.f) == 0x3c00 && fp16(-2.f) == 0xc000 && fp16(65504.f) == 0x7bff, "fp16 of 1, -2, 65504");
  expect(fp16(65520.f) == 0x7c00 && fp16(1e6f) == 0x7c00, "fp16 overflows to inf");
  expect(fp16(0x1p-24f) == 0x0001 && fp16(0x1p-25f) == 0 && fp16(3 * 0x1p-25f) == 0x0002, "fp16 subnormals round");
  expect(half_bits_to_float(0x0001) == 0x1p-24f && half_bits_to_float(0x3555) == 0x1.554p-2f, "fp16 to float");
  expect(fp16(NAN) == 0x7e00, "fp16 keeps NaN");
  int64_t round_trip_errors = 0;  // every finite and infinite fp16 survives fp16 -> fp32 -> fp16
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const bool nan = (bits & 0x7c00) == 0x7c00 && (bits & 0x3ff) != 0;
    if (!nan && fp16(half_bits_to_float(static_cast<uint16_t>(bits))) != bits) ++round_trip_errors;
  }
  expect(round_trip_errors == 0, "fp16 round trip: " + std::to_string(round_trip_errors) + " patterns changed");
}

// ---------------------------------------------------------------------------------------------
// Bad parameters: every entry point (CPU, and CUDA when built) checks before touching memory.

struct Backend {
  const char* name;
  std::function<void(const RmsNormParams&)> rms_norm;
  std::function<void(const FusedAddRmsNormParams&)> fused_add_rms_norm;
  std::function<void(const RotaryParams&)> rotary;
  std::function<void(const SiluAndMulParams&)> silu_and_mul;
  std::function<void(const KvCacheWriteParams&)> kv_cache_write;
  std::function<void(const RotaryCacheWriteParams&)> rotary_cache_write;
};

std::vector<Backend> backends() {
  std::vector<Backend> all = {{"cpu", rms_norm_cpu, fused_add_rms_norm_cpu, rotary_embedding_cpu, silu_and_mul_cpu,
                               kv_cache_write_cpu, rotary_embedding_cache_write_cpu}};
#ifdef MISTRAL_EXT_WITH_CUDA
  all.push_back({"cuda", [](const RmsNormParams& p) { rms_norm_cuda(p, nullptr); },
                 [](const FusedAddRmsNormParams& p) { fused_add_rms_norm_cuda(p, nullptr); },
                 [](const RotaryParams& p) { rotary_embedding_cuda(p, nullptr); },
                 [](const SiluAndMulParams& p) { silu_and_mul_cuda(p, nullptr); },
                 [](const KvCacheWriteParams& p) { kv_cache_write_cuda(p, nullptr); },
                 [](const RotaryCacheWriteParams& p) { rotary_embedding_cache_write_cuda(p, nullptr); }});
#endif
  return all;
}

void test_bad_params(const Backend& be) {
  const DType f32 = DType::kFloat32;
  const DType unknown = static_cast<DType>(7);
  float buf[64] = {};
  int64_t positions[4] = {0, 1, 2, 3};
  const std::string n = std::string(be.name) + ": ";

  expect_invalid(n + "rms_norm hidden 0", [&] { be.rms_norm({f32, 2, 0, buf, 0, buf, buf, 1e-6f}); });
  expect_invalid(n + "rms_norm rows -1", [&] { be.rms_norm({f32, -1, 4, buf, 4, buf, buf, 1e-6f}); });
  expect_invalid(n + "rms_norm unknown dtype", [&] { be.rms_norm({unknown, 2, 4, buf, 4, buf, buf, 1e-6f}); });
  expect_invalid(n + "fused_add_rms_norm hidden 0",
                 [&] { be.fused_add_rms_norm({f32, 2, 0, buf, buf, buf, buf, buf, 1e-6f}); });
  expect_invalid(n + "fused_add_rms_norm unknown dtype",
                 [&] { be.fused_add_rms_norm({unknown, 2, 4, buf, buf, buf, buf, buf, 1e-6f}); });

  const auto rotary = [&](int tokens, int heads, int kv_heads, int head_dim, float theta, DType d = DType::kFloat32) {
    be.rotary({d, tokens, heads, kv_heads, head_dim, buf, 8, buf, 8, positions, theta});
  };
  expect_invalid(n + "rotary odd head_dim", [&] { rotary(1, 1, 1, 7, 1e4f); });
  expect_invalid(n + "rotary head_dim 0", [&] { rotary(1, 1, 1, 0, 1e4f); });
  expect_invalid(n + "rotary head_dim 258", [&] { rotary(1, 1, 1, 258, 1e4f); });
  expect_invalid(n + "rotary no heads", [&] { rotary(1, 0, 1, 8, 1e4f); });
  expect_invalid(n + "rotary no kv heads", [&] { rotary(1, 1, 0, 8, 1e4f); });
  expect_invalid(n + "rotary theta 0", [&] { rotary(1, 1, 1, 8, 0.f); });
  expect_invalid(n + "rotary theta -1", [&] { rotary(1, 1, 1, 8, -1.f); });
  expect_invalid(n + "rotary tokens -1", [&] { rotary(-1, 1, 1, 8, 1e4f); });
  expect_invalid(n + "rotary unknown dtype", [&] { rotary(1, 1, 1, 8, 1e4f, unknown); });

  expect_invalid(n + "silu_and_mul inter 0", [&] { be.silu_and_mul({f32, 2, 0, buf, buf}); });
  expect_invalid(n + "silu_and_mul rows -1", [&] { be.silu_and_mul({f32, -1, 4, buf, buf}); });
  expect_invalid(n + "silu_and_mul unknown dtype", [&] { be.silu_and_mul({unknown, 2, 4, buf, buf}); });

  const auto kv = [&](int batch, int kv_heads, int head_dim, int capacity, DType d = DType::kFloat32) {
    be.kv_cache_write({d, batch, 1, kv_heads, head_dim, capacity, buf, 8, buf, 8, buf, buf, positions});
  };
  expect_invalid(n + "kv_cache_write capacity 0", [&] { kv(1, 1, 8, 0); });
  expect_invalid(n + "kv_cache_write no kv heads", [&] { kv(1, 0, 8, 4); });
  expect_invalid(n + "kv_cache_write head_dim 0", [&] { kv(1, 1, 0, 4); });
  expect_invalid(n + "kv_cache_write batch -1", [&] { kv(-1, 1, 8, 4); });
  expect_invalid(n + "kv_cache_write unknown dtype", [&] { kv(1, 1, 8, 4, unknown); });

  // Two tokens (batch 2) of 1 head and 1 kv head of head_dim 8 in a fused buffer, 2-slot caches.
  float fused[112] = {};
  const RotaryCacheWriteParams valid{
      {f32, 2, 1, 1, 8, fused, 24, fused + 8, 24, positions, 1e4f},
      {f32, 2, 1, 1, 8, 2, fused + 8, 24, fused + 16, 24, fused + 48, fused + 80, positions}};
  if (std::string(be.name) == "cpu") {  // the variants below throw because of their one change
    try {
      be.rotary_cache_write(valid);
    } catch (const std::exception& e) {
      expect(false, n + "rotary_cache_write: valid params threw " + e.what());
    }
  }
  const auto rotary_cache = [&](const char* what, const std::function<void(RotaryCacheWriteParams&)>& change) {
    RotaryCacheWriteParams p = valid;
    change(p);
    expect_invalid(n + "rotary_cache_write " + what, [&] { be.rotary_cache_write(p); });
  };
  rotary_cache("odd head_dim", [](auto& p) { p.rotary.head_dim = p.cache.head_dim = 7; });
  rotary_cache("theta 0", [](auto& p) { p.rotary.theta = 0.f; });
  rotary_cache("capacity 0", [](auto& p) { p.cache.capacity = 0; });
  rotary_cache("unknown dtype", [&](auto& p) { p.rotary.dtype = p.cache.dtype = unknown; });
  rotary_cache("dtypes differ", [](auto& p) { p.cache.dtype = DType::kBFloat16; });
  rotary_cache("cache reads another k", [&](auto& p) { p.cache.k = fused + 9; });
  rotary_cache("k strides differ", [](auto& p) { p.cache.k_token_stride = 32; });
  rotary_cache("positions differ", [&](auto& p) { p.cache.positions = positions + 1; });
  rotary_cache("token counts differ", [](auto& p) { p.rotary.tokens = 3; });
  rotary_cache("kv heads differ", [](auto& p) { p.rotary.num_kv_heads = 2; });
  rotary_cache("head_dims differ", [](auto& p) { p.cache.head_dim = 4; });
}

// ---------------------------------------------------------------------------------------------
// CUDA kernels against the CPU kernels.

#ifdef MISTRAL_EXT_WITH_CUDA

// A CUDA kernel against the CPU one: other summation orders and sin/cos/exp implementations,
// so fp32 results differ in the last bits and 16-bit ones by up to one ulp after rounding.
Tolerance vs_cpu(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return {1e-6, 5e-5};
    case DType::kFloat16: return {1e-5, 1.0 / 512};
    case DType::kBFloat16: return {1e-5, 1.0 / 64};
  }
  return {0, 0};
}

void test_rms_norm_cuda(DType d) {
  // offset 1 misaligns the input (scalar path); pad 8 keeps 16-byte rows for 16-bit dtypes.
  for (int64_t hidden : {1, 7, 33, 4096, 4097, 8200})
    for (int64_t offset : {0, 1})
      for (int64_t pad : {0, 8}) {
        const int64_t rows = 7, stride = hidden + pad;
        const Values x = random_values(d, offset + rows * stride), w = random_values(d, hidden);
        Values out(d, rows * hidden);
        rms_norm_cpu(RmsNormParams{d, rows, hidden, x.data(offset), stride, w.data(), out.data(), 1e-5f});
        const DeviceBuffer dx(x), dw(w), dout(out);
        rms_norm_cuda(RmsNormParams{d, rows, hidden, dx.at(d, offset), stride, dw.at(d), dout.at(d), 1e-5f}, nullptr);
        expect_close(describe("rms_norm_cuda", d, {{"hidden", hidden}, {"offset", offset}, {"stride", stride}}),
                     dout.to_host(d), as_doubles(out), vs_cpu(d));
      }
}

void test_fused_add_rms_norm_cuda(DType d) {
  for (int64_t hidden : {1, 7, 33, 4096, 4097})
    for (int64_t offset : {0, 1}) {
      const int64_t rows = 9, n = rows * hidden;
      const Values x = random_values(d, offset + n), residual = random_values(d, n), w = random_values(d, hidden);
      Values out(d, n), residual_out(d, n);
      fused_add_rms_norm_cpu(FusedAddRmsNormParams{d, rows, hidden, x.data(offset), residual.data(), w.data(),
                                                   out.data(), residual_out.data(), 1e-6f});
      const std::string what = describe("fused_add_rms_norm_cuda", d, {{"hidden", hidden}, {"offset", offset}});
      for (bool in_place : {false, true}) {
        const DeviceBuffer dx(x), dres(residual), dw(w), dout(out), dres_out(residual_out);
        const DeviceBuffer& written = in_place ? dres : dres_out;
        fused_add_rms_norm_cuda(FusedAddRmsNormParams{d, rows, hidden, dx.at(d, offset), dres.at(d), dw.at(d),
                                                      dout.at(d), written.at(d), 1e-6f},
                                nullptr);
        const std::string name = what + (in_place ? " in place" : "");
        expect(written.to_host(d) == residual_out, name + ": residual_out differs from the CPU's");
        expect_close(name, dout.to_host(d), as_doubles(out), vs_cpu(d));
      }
    }
}

void test_rotary_cuda(DType d) {
  struct Case {
    int heads, kv_heads, head_dim, pad;
  };
  for (const Case& c : {Case{32, 8, 128, 0}, Case{32, 8, 128, 1}, Case{4, 2, 64, 0}, Case{4, 2, 96, 0},
                        Case{3, 1, 96, 3}, Case{2, 1, 2, 0}, Case{2, 2, 256, 0}, Case{1, 1, 6, 0}}) {
    const int batch = 5, tokens = 3;
    const int64_t k_offset = int64_t{c.heads} * c.head_dim;
    const int64_t width = (c.heads + 2 * c.kv_heads) * int64_t{c.head_dim} + c.pad;
    const std::vector<int64_t> positions = make_positions(batch, tokens, kRotaryStarts);
    const Values input = random_values(d, batch * tokens * width);
    Values qk = input;
    rotary_embedding_cpu(RotaryParams{d, batch * tokens, c.heads, c.kv_heads, c.head_dim, qk.data(), width,
                                      qk.data(k_offset), width, positions.data(), 10000.f});
    const DeviceBuffer dqk(input), dpos(positions);
    rotary_embedding_cuda(RotaryParams{d, batch * tokens, c.heads, c.kv_heads, c.head_dim, dqk.at(d), width,
                                       dqk.at(d, k_offset), width, dpos.as<int64_t>(), 10000.f},
                          nullptr);
    expect_close(describe("rotary_embedding_cuda", d, {{"head_dim", c.head_dim}, {"width", width}}), dqk.to_host(d),
                 as_doubles(qk), vs_cpu(d));
  }
}

void test_silu_and_mul_cuda(DType d) {
  for (int64_t inter : {1, 7, 33, 4096, 14336, 14337})
    for (int64_t rows : {1, 5})
      for (int64_t offset : {0, 1}) {
        const Values x = random_values(d, offset + rows * 2 * inter);
        Values out(d, rows * inter);
        silu_and_mul_cpu(SiluAndMulParams{d, rows, inter, x.data(offset), out.data()});
        const DeviceBuffer dx(x), dout(out);
        silu_and_mul_cuda(SiluAndMulParams{d, rows, inter, dx.at(d, offset), dout.at(d)}, nullptr);
        expect_close(describe("silu_and_mul_cuda", d, {{"inter", inter}, {"rows", rows}, {"offset", offset}}),
                     dout.to_host(d), as_doubles(out), vs_cpu(d));
      }
}

void test_kv_cache_write_cuda(DType d) {
  struct Case {
    int batch, tokens, kv_heads, head_dim, capacity, pad;
  };
  const std::vector<int64_t> starts = {-2, 4090, -100, 131000};
  for (const Case& c : {Case{4, 6, 8, 128, 4, 0}, Case{4, 6, 8, 128, 16, 1}, Case{3, 5, 2, 5, 4, 0},
                        Case{16, 1, 8, 128, 256, 0}}) {
    const int64_t token_elems = int64_t{c.kv_heads} * c.head_dim;
    const int64_t width = 3 * token_elems + c.pad;  // k, v: column slices of a fused [q | k | v]
    const std::vector<int64_t> positions = make_positions(c.batch, c.tokens, starts);
    const Values kv = random_values(d, c.batch * c.tokens * width);
    const Values k_init = random_values(d, c.batch * c.capacity * token_elems);
    const Values v_init = random_values(d, c.batch * c.capacity * token_elems);
    Values k_cache = k_init, v_cache = v_init;
    kv_cache_write_cpu(KvCacheWriteParams{d, c.batch, c.tokens, c.kv_heads, c.head_dim, c.capacity, kv.data(), width,
                                          kv.data(token_elems), width, k_cache.data(), v_cache.data(),
                                          positions.data()});
    const DeviceBuffer dkv(kv), dk_cache(k_init), dv_cache(v_init), dpos(positions);
    kv_cache_write_cuda(KvCacheWriteParams{d, c.batch, c.tokens, c.kv_heads, c.head_dim, c.capacity, dkv.at(d), width,
                                           dkv.at(d, token_elems), width, dk_cache.at(d), dv_cache.at(d),
                                           dpos.as<int64_t>()},
                        nullptr);
    const std::string what = describe("kv_cache_write_cuda", d, {{"head_dim", c.head_dim}, {"width", width}});
    expect(dk_cache.to_host(d) == k_cache, what + ": k_cache differs from the CPU's");
    expect(dv_cache.to_host(d) == v_cache, what + ": v_cache differs from the CPU's");
  }
}

void test_rotary_cache_write_cuda(DType d) {
  for (const RotaryCacheCase& c : kRotaryCacheCases) {
    const RotaryCacheInputs in(d, c);
    const std::vector<int64_t>& positions = in.positions;
    const Values &qkv = in.qkv, &k_init = in.k_cache, &v_init = in.v_cache;
    Values qkv_out = qkv, k_cache = k_init, v_cache = v_init;
    rotary_embedding_cache_write_cpu(rotary_cache_params(d, c, qkv_out.data(), k_cache.data(), v_cache.data(),
                                                         positions.data()));
    const DeviceBuffer dpos(positions), dqkv(qkv), dk_cache(k_init), dv_cache(v_init);
    rotary_embedding_cache_write_cuda(
        rotary_cache_params(d, c, dqkv.data(), dk_cache.data(), dv_cache.data(), dpos.as<int64_t>()), nullptr);
    const std::string what = describe("rotary_embedding_cache_write_cuda", d,
                                      {{"tokens", c.tokens}, {"heads", c.heads}, {"head_dim", c.head_dim}});
    const Values got_qkv = dqkv.to_host(d), got_k = dk_cache.to_host(d);
    expect_close(what + " q | k | v", got_qkv, as_doubles(qkv_out), vs_cpu(d));
    expect_close(what + " k_cache", got_k, as_doubles(k_cache), vs_cpu(d));
    expect(dv_cache.to_host(d) == v_cache, what + ": v_cache differs from the CPU's");

    const DeviceBuffer uqkv(qkv), uk_cache(k_init), uv_cache(v_init);  // the two CUDA kernels it fuses
    const RotaryCacheWriteParams unfused =
        rotary_cache_params(d, c, uqkv.data(), uk_cache.data(), uv_cache.data(), dpos.as<int64_t>());
    rotary_embedding_cuda(unfused.rotary, nullptr);
    kv_cache_write_cuda(unfused.cache, nullptr);
    expect(uqkv.to_host(d) == got_qkv, what + ": q | k | v differ from rotary_embedding_cuda's");
    expect(uk_cache.to_host(d) == got_k, what + ": k_cache differs from kv_cache_write_cuda's");
  }
}

#endif  // MISTRAL_EXT_WITH_CUDA

}  // namespace

int main() {
  rng.seed(20261124);
  run("fp16/bf16 conversions", test_conversions);
  for (DType d : kAllDtypes) {
    const std::string suffix = std::string(" ") + dtype_name(d);
    run(("rms_norm_cpu" + suffix).c_str(), [d] { test_rms_norm_cpu(d); });
    run(("fused_add_rms_norm_cpu" + suffix).c_str(), [d] { test_fused_add_rms_norm_cpu(d); });
    run(("rotary_embedding_cpu" + suffix).c_str(), [d] { test_rotary_cpu(d); });
    run(("silu_and_mul_cpu" + suffix).c_str(), [d] { test_silu_and_mul_cpu(d); });
    run(("kv_cache_write_cpu" + suffix).c_str(), [d] { test_kv_cache_write_cpu(d); });
    run(("rotary_embedding_cache_write_cpu" + suffix).c_str(), [d] { test_rotary_cache_write_cpu(d); });
  }
  for (const Backend& be : backends())
    run((std::string("bad params throw std::invalid_argument (") + be.name + ")").c_str(), [&] { test_bad_params(be); });

#ifdef MISTRAL_EXT_WITH_CUDA
  if (cuda_device_present()) {
    for (DType d : kAllDtypes) {
      const std::string suffix = std::string(" ") + dtype_name(d) + " vs cpu";
      run(("rms_norm_cuda" + suffix).c_str(), [d] { test_rms_norm_cuda(d); });
      run(("fused_add_rms_norm_cuda" + suffix).c_str(), [d] { test_fused_add_rms_norm_cuda(d); });
      run(("rotary_embedding_cuda" + suffix).c_str(), [d] { test_rotary_cuda(d); });
      run(("silu_and_mul_cuda" + suffix).c_str(), [d] { test_silu_and_mul_cuda(d); });
      run(("kv_cache_write_cuda" + suffix).c_str(), [d] { test_kv_cache_write_cuda(d); });
      run(("rotary_embedding_cache_write_cuda" + suffix).c_str(), [d] { test_rotary_cache_write_cuda(d); });
    }
  } else {
    std::printf("skipped: CUDA kernels vs CPU kernels (no CUDA device)\n");
  }
#else
  std::printf("skipped: CUDA kernels vs CPU kernels (built without CUDA)\n");
#endif

  return summary();
}
