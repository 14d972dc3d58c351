// Tests of the kernel library's linear op (x @ weight^T for up to kLinearMaxRows rows):
//  * the CPU kernel against a plain double-precision loop, on random inputs with every row count
//    up to 16, odd and usual sizes and strided input rows, in fp32, bf16 and fp16;
//  * the fused prologues (RMSNorm, SiLU-and-mul) and residual epilogue on the CPU equal to the bit
//    to the separate CPU ops composed (rms_norm_cpu / silu_and_mul_cpu, linear_cpu, the add
//    rounded to the dtype), the residual also added in place (residual == out);
//  * fp16 weights widened exactly: every finite fp16 value (subnormals included) read back
//    through one-hot input rows, and inf / NaN kept;
//  * bad parameters (more than 16 rows among them) throw std::invalid_argument, from the CPU
//    entry point and, when built with CUDA, from the CUDA one;
//  * when built with CUDA and a device is present, the CUDA kernel against the CPU kernel: packed
//    and scalar paths, K longer than one shared-memory chunk, output rows that do not fill the
//    last group and more groups than the grid has blocks; and with the prologues and the residual
//    (in place too), x aligned to packs or not, K in one chunk or several; and a chain of decoder
//    MLP blocks launched to overlap each previous kernel equal to the bit to the serial chain.
// Prints one line per failed check and exits non-zero if there was any.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <thread>
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

// ---------------------------------------------------------------------------------------------
// The fused prologue and residual epilogue.

// A random fused call: x [rows, row_stride] (gate | up for kSiluAndMul), weight [n, k], the
// norm weight and a residual [rows, n].
struct FusedCase {
  DType dtype;
  LinearPrologue prologue;
  int64_t rows, k, n, row_stride;
  Values x, w, norm_weight, residual;
  FusedCase(DType d, LinearPrologue pro, int64_t rows_, int64_t k_, int64_t n_, int64_t pad)
      : dtype(d), prologue(pro), rows(rows_), k(k_), n(n_),
        row_stride((pro == LinearPrologue::kSiluAndMul ? 2 * k_ : k_) + pad),
        x(random_values(d, rows_ * row_stride)), w(random_values(d, n_ * k_)), norm_weight(random_values(d, k_)),
        residual(random_values(d, rows_ * n_)) {}
  std::string describe() const {
    const char* names[] = {"none", "rms_norm", "silu_and_mul"};
    return ::describe("linear", dtype, rows, k, n, row_stride) + " prologue=" + names[static_cast<int>(prologue)];
  }
};

// The separate CPU ops composed: prologue op, linear_cpu, then residual + product rounded.
Values compose_on_cpu(const FusedCase& c) {
  Values x_in(c.dtype, c.rows * c.k);
  const void* x = c.x.data();
  int64_t stride = c.row_stride;
  if (c.prologue == LinearPrologue::kRmsNorm) {
    rms_norm_cpu(
        RmsNormParams{c.dtype, c.rows, c.k, c.x.data(), c.row_stride, c.norm_weight.data(), x_in.data(), 1e-5f});
    x = x_in.data(), stride = c.k;
  } else if (c.prologue == LinearPrologue::kSiluAndMul) {
    for (int64_t m = 0; m < c.rows; ++m) {
      Values row(c.dtype, 2 * c.k), out(c.dtype, c.k);
      for (int64_t i = 0; i < 2 * c.k; ++i) row.set(i, c.x.get(m * c.row_stride + i));
      silu_and_mul_cpu(SiluAndMulParams{c.dtype, 1, c.k, row.data(), out.data()});
      for (int64_t i = 0; i < c.k; ++i) x_in.set(m * c.k + i, out.get(i));
    }
    x = x_in.data(), stride = c.k;
  }
  Values out(c.dtype, c.rows * c.n);
  linear_cpu(LinearParams{c.dtype, c.rows, c.k, c.n, x, stride, c.w.data(), out.data()});
  for (int64_t i = 0; i < out.size(); ++i) out.set(i, out.get(i) + c.residual.get(i));  // set() rounds
  return out;
}

LinearParams fused_params(const FusedCase& c, const void* x, const void* w, const void* norm_weight,
                          const void* residual, void* out) {
  LinearParams p{c.dtype, c.rows, c.k, c.n, x, c.row_stride, w, out};
  p.prologue = c.prologue;
  p.norm_weight = norm_weight;
  p.eps = 1e-5f;
  p.residual = residual;
  return p;
}

void test_linear_cpu_fused(DType d) {
  for (LinearPrologue pro : {LinearPrologue::kNone, LinearPrologue::kRmsNorm, LinearPrologue::kSiluAndMul})
    for (int64_t rows : {int64_t{1}, int64_t{3}, int64_t{9}, kLinearMaxRows})
      for (int64_t pad : {int64_t{0}, int64_t{3}}) {
        const FusedCase c(d, pro, rows, 97, 61, pad);
        const Values want = compose_on_cpu(c);
        Values out(d, rows * c.n);
        linear_cpu(fused_params(c, c.x.data(), c.w.data(), c.norm_weight.data(), c.residual.data(), out.data()));
        expect(out == want, c.describe() + ": fused differs from the separate ops");
        Values in_place = c.residual;  // the residual stream updated where it lies
        linear_cpu(fused_params(c, c.x.data(), c.w.data(), c.norm_weight.data(), in_place.data(), in_place.data()));
        expect(in_place == want, c.describe() + ": residual added in place differs");
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
  const auto with_prologue = [&](LinearPrologue prologue, int64_t rows, int64_t stride, const void* norm_weight) {
    LinearParams p{DType::kFloat32, rows, 4, 2, buf, stride, buf, buf};
    p.prologue = prologue;
    p.norm_weight = norm_weight;
    be.linear(p);
  };
  expect_invalid(n + "linear RMSNorm prologue without norm_weight",
                 [&] { with_prologue(LinearPrologue::kRmsNorm, 1, 4, nullptr); });
  expect_invalid(n + "linear SiLU-and-mul rows narrower than 2K",
                 [&] { with_prologue(LinearPrologue::kSiluAndMul, 2, 7, nullptr); });
  expect_invalid(n + "linear unknown prologue", [&] { with_prologue(static_cast<LinearPrologue>(3), 1, 4, buf); });
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
  // row groups than the grid has blocks; N = 1001 leaves the last group partly empty; 3 rows of
  // K = 4096 fill exactly 48 KB, past the default once the static shared memory is counted.
  for (const Case& c : {Case{1, 4096, 1001, 0, 0}, Case{1, 577, 1001, 3, 0}, Case{1, 576, 960, 0, 1},
                        Case{1, 20000, 64, 0, 0}, Case{1, 576, 50000, 0, 0}, Case{2, 576, 1001, 8, 0},
                        Case{3, 64, 17, 0, 0}, Case{3, 4096, 300, 0, 0}, Case{4, 1536, 576, 0, 0},
                        Case{5, 4100, 300, 0, 0}, Case{8, 576, 3072, 0, 1}, Case{13, 3000, 1001, 0, 0}, Case{16, 4096, 1001, 0, 0},
                        Case{16, 577, 333, 5, 0}, Case{16, 576, 49152, 0, 0}}) {
    const int64_t stride = c.k + c.pad;
    const Values x = random_values(d, c.rows * stride), w = random_values(d, c.weight_offset + c.n * c.k);
    Values out(d, c.rows * c.n);
    linear_cpu(LinearParams{d, c.rows, c.k, c.n, x.data(), stride, w.data(c.weight_offset), out.data()});
    const DeviceBuffer dx(x), dw(w), dout(nan_values(d, out.size()));
    linear_cuda(LinearParams{d, c.rows, c.k, c.n, dx.at(d), stride, dw.at(d, c.weight_offset), dout.at(d)}, nullptr);
    std::string what = describe("linear_cuda", d, c.rows, c.k, c.n, stride);
    if (c.weight_offset) what += " unaligned weight";
    expect_close(what, dout.to_host(d), as_doubles(out), vs_cpu(d, c.k));
  }
}

// The fused prologues and residual against the CPU's fused call. A prologue output may round
// the other way on the two devices (exp, the order of the sum of squares), which moves a product
// by more than an elementwise tolerance allows near zero: the check is the relative error.
void test_linear_cuda_fused(DType d) {
  struct Case {
    LinearPrologue prologue;
    int64_t rows, k, n, pad, x_offset;
  };
  const LinearPrologue none = LinearPrologue::kNone, norm = LinearPrologue::kRmsNorm,
                       silu = LinearPrologue::kSiluAndMul;
  // x_offset 1: x not aligned to packs, read element by element while the weight stays packed;
  // K = 577: the scalar path throughout; K = 20000 at one row: x in several chunks (the RMS over
  // all of them, up at K + chunk offsets); N = 50000: blocks loop over several row groups.
  for (const Case& c : {Case{norm, 1, 4096, 6144, 0, 0}, Case{silu, 1, 14336, 1001, 0, 0},
                        Case{none, 1, 4096, 1001, 0, 0}, Case{norm, 1, 576, 50000, 0, 0},
                        Case{silu, 1, 576, 960, 0, 1}, Case{norm, 1, 576, 960, 0, 1}, Case{norm, 1, 577, 300, 0, 0},
                        Case{silu, 1, 577, 300, 0, 0}, Case{norm, 1, 20000, 64, 0, 0}, Case{silu, 1, 20000, 64, 0, 0},
                        Case{silu, 3, 1536, 576, 8, 0}, Case{norm, 5, 4100, 300, 0, 0}, Case{norm, 16, 576, 333, 5, 0},
                        Case{silu, 16, 4096, 1001, 0, 0}}) {
    const FusedCase f(d, c.prologue, c.rows, c.k, c.n, c.pad);
    Values out(d, c.rows * c.n);
    linear_cpu(fused_params(f, f.x.data(), f.w.data(), f.norm_weight.data(), f.residual.data(), out.data()));
    Values shifted_x(d, c.x_offset + f.x.size());
    for (int64_t i = 0; i < f.x.size(); ++i) shifted_x.set(c.x_offset + i, f.x.get(i));
    const DeviceBuffer dx(shifted_x), dw(f.w), dnorm(f.norm_weight), dres(f.residual), dout(nan_values(d, out.size()));
    const DeviceBuffer in_place(f.residual);
    linear_cuda(fused_params(f, dx.at(d, c.x_offset), dw.data(), dnorm.data(), dres.data(), dout.data()), nullptr);
    linear_cuda(fused_params(f, dx.at(d, c.x_offset), dw.data(), dnorm.data(), in_place.data(), in_place.data()),
                nullptr);
    const std::string what = f.describe() + (c.x_offset ? " unaligned x" : "");
    const double bound = d == DType::kFloat32 ? 1e-5 : d == DType::kFloat16 ? 2e-3 : 1e-2;
    expect_relative_error(what, dout.to_host(d), as_doubles(out), bound);
    expect_relative_error(what + " in place", in_place.to_host(d), as_doubles(out), bound);
  }
}

// Decoder MLP blocks back to back, h += down(silu_and_mul(gate_up(rms_norm(h)))) in place, layer
// after layer: every call reads what the call before it wrote. Launched with overlap_previous
// (each projection may start before the previous one ends), on the legacy default stream and on a
// stream of its own, the chain must equal to the bit the same chain launched without it (same
// kernels, same order of sums); a read before the kernel's wait would see a stale h. Both are
// also checked against the CPU's chain.
void test_linear_cuda_overlapping_chain(DType d) {
  const int64_t hidden = 1024, inner = 2816, layers = 8;
  struct Layer {
    Values norm, gate_up, down;
  };
  std::vector<Layer> model;
  for (int64_t l = 0; l < layers; ++l)
    model.push_back({random_values(d, hidden), random_values(d, 2 * inner * hidden), random_values(d, hidden * inner)});
  const Values h0 = random_values(d, hidden);
  const auto gate_up_params = [&](const void* norm, const void* w, const void* h, void* out) {
    LinearParams p{d, 1, hidden, 2 * inner, h, hidden, w, out};
    p.prologue = LinearPrologue::kRmsNorm, p.norm_weight = norm, p.eps = 1e-5f;
    return p;
  };
  const auto down_params = [&](const void* gate_up, const void* w, void* h) {
    LinearParams p{d, 1, inner, hidden, gate_up, 2 * inner, w, h};
    p.prologue = LinearPrologue::kSiluAndMul, p.residual = h;
    return p;
  };

  Values h = h0, gate_up(d, 2 * inner);
  for (const Layer& l : model) {
    linear_cpu(gate_up_params(l.norm.data(), l.gate_up.data(), h.data(), gate_up.data()));
    linear_cpu(down_params(gate_up.data(), l.down.data(), h.data()));
  }

  std::vector<std::unique_ptr<DeviceBuffer>> weights;
  for (const Layer& l : model)
    for (const Values* v : {&l.norm, &l.gate_up, &l.down}) weights.push_back(std::make_unique<DeviceBuffer>(*v));
  cudaStream_t own_stream = nullptr;
  check_cuda(cudaStreamCreateWithFlags(&own_stream, cudaStreamNonBlocking), "cudaStreamCreate");
  const auto chain_on_cuda = [&](bool overlap, cudaStream_t stream) {
    const DeviceBuffer dh(h0), dgate_up(nan_values(d, 2 * inner));
    check_cuda(cudaDeviceSynchronize(), "copies to the device");  // own_stream does not wait for them
    // The stream waits 20 ms on the host first: the whole chain is queued by then, so each kernel
    // really can start before the one before it ends (one launch costs the host about as long as
    // a kernel here).
    check_cuda(cudaLaunchHostFunc(
                   stream, [](void*) { std::this_thread::sleep_for(std::chrono::milliseconds(20)); }, nullptr),
               "cudaLaunchHostFunc");
    for (int64_t l = 0; l < layers; ++l) {
      LinearParams first =
          gate_up_params(weights[3 * l]->data(), weights[3 * l + 1]->data(), dh.data(), dgate_up.data());
      LinearParams second = down_params(dgate_up.data(), weights[3 * l + 2]->data(), dh.data());
      first.overlap_previous = second.overlap_previous = overlap;
      linear_cuda(first, stream);
      linear_cuda(second, stream);
    }
    return dh.to_host(d);
  };
  const Values serial = chain_on_cuda(false, own_stream);
  const double bound = d == DType::kFloat32 ? 1e-4 : 5e-2;
  const std::string what = std::string("linear_cuda chain of ") + std::to_string(layers) + " MLP blocks " + dtype_name(d);
  expect_relative_error(what + " vs cpu", serial, as_doubles(h), bound);
  for (cudaStream_t stream : {static_cast<cudaStream_t>(nullptr), own_stream})
    expect(chain_on_cuda(true, stream) == serial,
           what + (stream ? " (own stream)" : " (default stream)") + ": overlapping launches differ from serial ones");
  check_cuda(cudaStreamDestroy(own_stream), "cudaStreamDestroy");
}

#endif  // MISTRAL_EXT_WITH_CUDA

}  // namespace

int main() {
  rng.seed(20261125);
  for (DType d : kAllDtypes)
    run((std::string("linear_cpu ") + dtype_name(d)).c_str(), [d] { test_linear_cpu(d); });
  for (DType d : kAllDtypes)
    run((std::string("linear_cpu fused prologue and residual ") + dtype_name(d)).c_str(), [d] { test_linear_cpu_fused(d); });
  run("linear_cpu fp16 weights widened exactly", test_linear_cpu_fp16_values);
  for (const Backend& be : backends())
    run((std::string("bad params throw std::invalid_argument (") + be.name + ")").c_str(), [&] { test_bad_params(be); });

#ifdef MISTRAL_EXT_WITH_CUDA
  if (cuda_device_present()) {
    for (DType d : kAllDtypes)
      run((std::string("linear_cuda ") + dtype_name(d) + " vs cpu").c_str(), [d] { test_linear_cuda(d); });
    for (DType d : kAllDtypes)
      run((std::string("linear_cuda fused ") + dtype_name(d) + " vs cpu").c_str(), [d] { test_linear_cuda_fused(d); });
    for (DType d : {DType::kFloat32, DType::kBFloat16})
      run((std::string("linear_cuda overlapping launches ") + dtype_name(d)).c_str(),
          [d] { test_linear_cuda_overlapping_chain(d); });
  } else {
    std::printf("skipped: CUDA kernel vs CPU kernel (no CUDA device)\n");
  }
#else
  std::printf("skipped: CUDA kernel vs CPU kernel (built without CUDA)\n");
#endif

  return summary();
}
