// Tests of the kernel library's linear op (x @ weight^T for up to kLinearMaxRows rows):
//  * the CPU kernel against a plain double-precision loop, on random inputs with every row count
//    up to 16, odd and usual sizes and strided input rows, in fp32, bf16 and fp16;
//  * fp16 weights widened exactly: every finite fp16 value (subnormals included) read back
//    through one-hot input rows, and inf / NaN kept;
//  * bad parameters (more than 16 rows among them) throw std::invalid_argument, from the CPU
//    entry point and, when built with CUDA, from the CUDA one;
//  * when built with CUDA and a device is present, the CUDA kernel against the CPU kernel: packed
//    and scalar paths, K longer than one shared-memory chunk, output rows that do not fill the
//    last group and more groups than the grid has blocks.
// Prints one line per failed check and exits non-zero if there was any.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "test_support.h"

using namespace mistral_ext;
using namespace mistral_ext::testing;

namespace {

const DType kAllDtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};

std::string describe(const char* op, DType dtype, int64_t rows, int64_t k, int64_t n, int64_t stride) {
  return std::string(op) + " " + dtype_name(dtype) + " rows=" + std::to_string(rows) + " K=" + std::to_string(k) +
         " N=" + std::to_string(n) + " stride=" + std::to_string(stride);
}

// Products of 16-bit values are exact in fp32: what is left is the fp32 summation order over K
// terms below 4 in magnitude, and for 16-bit outputs one rounding of the result.
Tolerance vs_exact(DType dtype, int64_t k) {
  const double sums = 4.0 * k * std::numeric_limits<float>::epsilon();
  switch (dtype) {
    case DType::kFloat32: return {sums, 1e-6};
    case DType::kFloat16: return {sums, 1.0 / 1024};
    case DType::kBFloat16: return {sums, 1.0 / 128};
  }
  return {0, 0};
}

// out[m, n] = sum_k x[m * stride + k] * w[n, k] in double.
std::vector<double> linear_loop(const Values& x, int64_t stride, const Values& w, int64_t rows, int64_t k_len,
                                int64_t n_len) {
  std::vector<double> out(rows * n_len);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t n = 0; n < n_len; ++n) {
      double sum = 0;
      for (int64_t k = 0; k < k_len; ++k) sum += double(x.get(m * stride + k)) * w.get(n * k_len + k);
      out[m * n_len + n] = sum;
    }
  return out;
}

void test_linear_cpu(DType d) {
  struct Shape {
    int64_t k, n;
  };
  for (const Shape& s : {Shape{1, 1}, Shape{7, 5}, Shape{33, 17}, Shape{576, 64}, Shape{577, 1001}})
    for (int64_t rows = 1; rows <= kLinearMaxRows; ++rows)
      for (int64_t pad : {int64_t{0}, int64_t{5}}) {
        const int64_t stride = s.k + pad;
        const Values x = random_values(d, rows * stride), w = random_values(d, s.n * s.k);
        Values out(d, rows * s.n);
        linear_cpu(LinearParams{d, rows, s.k, s.n, x.data(), stride, w.data(), out.data()});
        expect_close(describe("linear_cpu", d, rows, s.k, s.n, stride), out, linear_loop(x, stride, w, rows, s.k, s.n),
                     vs_exact(d, s.k));
      }
}

// Weight [512, 128] holding every fp16 bit pattern (inf and NaN replaced by zero), read back one
// column at a time by one-hot input rows: each output must be the weight value itself.
void test_linear_cpu_fp16_values() {
  const DType d = DType::kFloat16;
  const int64_t n_len = 512, k_len = 128, rows = kLinearMaxRows;
  Values w(d, n_len * k_len);
  for (int64_t i = 0; i < n_len * k_len; ++i) {
    const uint16_t bits = static_cast<uint16_t>(i);
    static_cast<Float16*>(w.data())[i] = Float16{(bits & 0x7c00u) == 0x7c00u ? uint16_t{0} : bits};
  }
  int64_t wrong = 0;
  for (int64_t k0 = 0; k0 < k_len; k0 += rows) {
    Values x(d, rows * k_len);
    for (int64_t i = 0; i < rows * k_len; ++i) x.set(i, 0.f);
    for (int64_t m = 0; m < rows; ++m) x.set(m * k_len + k0 + m, 1.f);
    Values out(d, rows * n_len);
    linear_cpu(LinearParams{d, rows, k_len, n_len, x.data(), k_len, w.data(), out.data()});
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t n = 0; n < n_len; ++n)
        if (out.get(m * n_len + n) != w.get(n * k_len + k0 + m)) ++wrong;
  }
  expect(wrong == 0, "linear_cpu fp16: " + std::to_string(wrong) + " weight values not read back exactly");

  // inf and NaN weights, in the vectorised part of the row (k < 8) and in its tail (k = 16).
  Values special(d, 3 * 17);
  for (int64_t i = 0; i < special.size(); ++i) special.set(i, 0.5f);
  static_cast<Float16*>(special.data())[0 * 17 + 2] = Float16{0x7c00};   // +inf
  static_cast<Float16*>(special.data())[1 * 17 + 5] = Float16{0xfc00};   // -inf
  static_cast<Float16*>(special.data())[2 * 17 + 16] = Float16{0x7e00};  // NaN
  Values one(d, 17), out(d, 3);
  for (int64_t k = 0; k < 17; ++k) one.set(k, 1.f);
  linear_cpu(LinearParams{d, 1, 17, 3, one.data(), 17, special.data(), out.data()});
  expect(std::isinf(out.get(0)) && out.get(0) > 0 && std::isinf(out.get(1)) && out.get(1) < 0 && std::isnan(out.get(2)),
         "linear_cpu fp16: inf and NaN weights");
}

// ---------------------------------------------------------------------------------------------
// Bad parameters: every entry point (CPU, and CUDA when built) checks before touching memory.

struct Backend {
  const char* name;
  std::function<void(const LinearParams&)> linear;
};

std::vector<Backend> backends() {
  std::vector<Backend> all = {{"cpu", linear_cpu}};
#ifdef MISTRAL_EXT_WITH_CUDA
  all.push_back({"cuda", [](const LinearParams& p) { linear_cuda(p, nullptr); }});
#endif
  return all;
}

void test_bad_params(const Backend& be) {
  float buf[64] = {};
  const std::string n = std::string(be.name) + ": ";
  const auto linear = [&](int64_t rows, int64_t k, int64_t n_len, int64_t stride, DType d = DType::kFloat32) {
    be.linear(LinearParams{d, rows, k, n_len, buf, stride, buf, buf});
  };
  expect_invalid(n + "linear 17 rows", [&] { linear(kLinearMaxRows + 1, 2, 2, 2); });
  expect_invalid(n + "linear rows -1", [&] { linear(-1, 2, 2, 2); });
  expect_invalid(n + "linear in_features 0", [&] { linear(1, 0, 2, 0); });
  expect_invalid(n + "linear out_features -1", [&] { linear(1, 2, -1, 2); });
  expect_invalid(n + "linear input_row_stride -1", [&] { linear(2, 2, 2, -1); });
  expect_invalid(n + "linear unknown dtype", [&] { linear(1, 2, 2, 2, static_cast<DType>(7)); });
}

// ---------------------------------------------------------------------------------------------
// The CUDA kernel against the CPU kernel.

#ifdef MISTRAL_EXT_WITH_CUDA

// Two fp32 summation orders, and for 16-bit outputs up to one ulp apart after rounding.
Tolerance vs_cpu(DType dtype, int64_t k) {
  const double sums = 8.0 * k * std::numeric_limits<float>::epsilon();
  switch (dtype) {
    case DType::kFloat32: return {sums, 1e-6};
    case DType::kFloat16: return {sums, 1.0 / 512};
    case DType::kBFloat16: return {sums, 1.0 / 64};
  }
  return {0, 0};
}

void test_linear_cuda(DType d) {
  struct Case {
    int64_t rows, k, n, pad, weight_offset;
  };
  // weight_offset 1 misaligns the weight (scalar path), as does K % 8 != 0; K = 4096 at 16 rows
  // and K = 20000 at 1 row need several shared-memory chunks of x; N = 50000 at 1 row has more
  // row groups than the grid has blocks; N = 1001 leaves the last group partly empty.
  for (const Case& c : {Case{1, 4096, 1001, 0, 0}, Case{1, 577, 1001, 3, 0}, Case{1, 576, 960, 0, 1},
                        Case{1, 20000, 64, 0, 0}, Case{1, 576, 50000, 0, 0}, Case{2, 576, 1001, 8, 0},
                        Case{3, 64, 17, 0, 0}, Case{4, 1536, 576, 0, 0}, Case{5, 4100, 300, 0, 0},
                        Case{8, 576, 3072, 0, 1}, Case{13, 3000, 1001, 0, 0}, Case{16, 4096, 1001, 0, 0},
                        Case{16, 577, 333, 5, 0}, Case{16, 576, 49152, 0, 0}}) {
    const int64_t stride = c.k + c.pad;
    const Values x = random_values(d, c.rows * stride), w = random_values(d, c.weight_offset + c.n * c.k);
    Values out(d, c.rows * c.n);
    linear_cpu(LinearParams{d, c.rows, c.k, c.n, x.data(), stride, w.data(c.weight_offset), out.data()});
    const DeviceBuffer dx(x), dw(w), dout(out);
    linear_cuda(LinearParams{d, c.rows, c.k, c.n, dx.at(d), stride, dw.at(d, c.weight_offset), dout.at(d)}, nullptr);
    std::string what = describe("linear_cuda", d, c.rows, c.k, c.n, stride);
    if (c.weight_offset) what += " unaligned weight";
    expect_close(what, dout.to_host(d), as_doubles(out), vs_cpu(d, c.k));
  }
}

#endif  // MISTRAL_EXT_WITH_CUDA

}  // namespace

int main() {
  rng.seed(20261125);
  for (DType d : kAllDtypes)
    run((std::string("linear_cpu ") + dtype_name(d)).c_str(), [d] { test_linear_cpu(d); });
  run("linear_cpu fp16 weights widened exactly", test_linear_cpu_fp16_values);
  for (const Backend& be : backends())
    run((std::string("bad params throw std::invalid_argument (") + be.name + ")").c_str(), [&] { test_bad_params(be); });

#ifdef MISTRAL_EXT_WITH_CUDA
  if (cuda_device_present()) {
    for (DType d : kAllDtypes)
      run((std::string("linear_cuda ") + dtype_name(d) + " vs cpu").c_str(), [d] { test_linear_cuda(d); });
  } else {
    std::printf("skipped: CUDA kernel vs CPU kernel (no CUDA device)\n");
  }
#else
  std::printf("skipped: CUDA kernel vs CPU kernel (built without CUDA)\n");
#endif

  return summary();
}
