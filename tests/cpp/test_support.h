// What the C++ test programs (tests/cpp/test_*.cpp) share: a failure counter with expect(),
// expect_invalid() and expect_close(), host buffers of one dtype read and written as fp32 through
// csrc/common.h's conversions, random fills and, when built with CUDA, device buffers and the
// device-present check. Each program prints one line per failed check and exits non-zero if
// `failures` is not 0.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "mistral_ext/kernels.h"

#ifdef MISTRAL_EXT_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace mistral_ext::testing {

inline int failures = 0;
// Seeded by each test program first thing in main.
inline std::mt19937 rng;

inline void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what.c_str());
  }
}

template <typename Fn>
void expect_invalid(const std::string& what, Fn&& fn) {
  try {
    fn();
  } catch (const std::invalid_argument&) {
    return;
  } catch (const std::exception& e) {
    expect(false, what + ": threw " + e.what() + " instead of std::invalid_argument");
    return;
  }
  expect(false, what + ": did not throw std::invalid_argument");
}

// Host values of one dtype, read and written as fp32 through the library's conversions.
class Values {
 public:
  Values(DType dtype, int64_t n) : dtype_(dtype), bytes_(static_cast<size_t>(n) * dtype_size(dtype)) {}
  DType dtype() const { return dtype_; }
  int64_t size() const { return static_cast<int64_t>(bytes_.size() / dtype_size(dtype_)); }
  size_t bytes() const { return bytes_.size(); }
  void* data(int64_t offset = 0) { return bytes_.data() + offset * dtype_size(dtype_); }
  const void* data(int64_t offset = 0) const { return bytes_.data() + offset * dtype_size(dtype_); }
  float get(int64_t i) const {
    float out = 0.f;
    dispatch_dtype(dtype_, [&](auto tag) { out = to_float(static_cast<const decltype(tag)*>(data())[i]); });
    return out;
  }
  void set(int64_t i, float value) {
    dispatch_dtype(dtype_, [&](auto tag) {
      using T = decltype(tag);
      static_cast<T*>(data())[i] = from_float<T>(value);
    });
  }
  bool operator==(const Values& other) const { return dtype_ == other.dtype_ && bytes_ == other.bytes_; }

 private:
  DType dtype_;
  std::vector<unsigned char> bytes_;
};

// Standard normal values.
inline Values random_normal(DType dtype, int64_t n) {
  std::normal_distribution<float> normal;
  Values v(dtype, n);
  for (int64_t i = 0; i < n; ++i) v.set(i, normal(rng));
  return v;
}

// Uniform magnitudes in [0.05, 2) with random signs: never zero.
inline Values random_values(DType dtype, int64_t n) {
  std::uniform_real_distribution<float> magnitude(0.05f, 2.f);
  std::bernoulli_distribution negative(0.5);
  Values v(dtype, n);
  for (int64_t i = 0; i < n; ++i) v.set(i, negative(rng) ? -magnitude(rng) : magnitude(rng));
  return v;
}

inline std::vector<double> as_doubles(const Values& v) {
  std::vector<double> out(v.size());
  for (int64_t i = 0; i < v.size(); ++i) out[i] = v.get(i);
  return out;
}

struct Tolerance {
  double atol, rtol;
};

// One failure naming how many values are off and the first of them.
inline void expect_close(const std::string& what, const Values& got, const std::vector<double>& want, Tolerance tol) {
  int64_t bad = 0, first = -1;
  for (int64_t i = 0; i < static_cast<int64_t>(want.size()); ++i) {
    const double g = got.get(i);
    if (!(std::fabs(g - want[i]) <= tol.atol + tol.rtol * std::fabs(want[i]))) {
      if (bad++ == 0) first = i;
    }
  }
  if (bad == 0) return;
  char detail[160];
  std::snprintf(detail, sizeof(detail), ": %lld of %zu values off, first at %lld: got %.8g, want %.8g",
                static_cast<long long>(bad), want.size(), static_cast<long long>(first), got.get(first), want[first]);
  expect(false, what + detail);
}

// ||got - want|| / ||want|| below bound over all values; a NaN (an unwritten poisoned output)
// fails it.
inline void expect_relative_error(const std::string& what, const Values& got, const std::vector<double>& want,
                                  double bound) {
  double diff = 0, norm = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(want.size()); ++i) {
    diff += (got.get(i) - want[i]) * (got.get(i) - want[i]);
    norm += want[i] * want[i];
  }
  const double error = std::sqrt(diff / norm);
  if (error < bound) return;
  char detail[96];
  std::snprintf(detail, sizeof(detail), ": relative error %.3g, bound %.1g", error, bound);
  expect(false, what + detail);
}

// Values all NaN: an output buffer whose unwritten elements cannot pass for results.
inline Values nan_values(DType dtype, int64_t n) {
  Values v(dtype, n);
  for (int64_t i = 0; i < n; ++i) v.set(i, std::numeric_limits<float>::quiet_NaN());
  return v;
}

// Prints the verdict; the exit status of main().
inline int summary() {
  if (failures > 0) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}

// Runs one named test, counting an unexpected exception as a failure, and prints ok / FAIL.
inline void run(const char* name, const std::function<void()>& test) {
  const int before = failures;
  try {
    test();
  } catch (const std::exception& e) {
    expect(false, std::string(name) + ": unexpected exception: " + e.what());
  }
  std::printf("%-4s %s\n", failures == before ? "ok" : "FAIL", name);
}

#ifdef MISTRAL_EXT_WITH_CUDA

inline void check_cuda(cudaError_t error, const char* what) {
  if (error != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(error));
}

inline bool cuda_device_present() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver: clear the error, report no device
    return false;
  }
  return count > 0;
}

// A device copy of host bytes, or uninitialised device memory when `host` is null.
class DeviceBuffer {
 public:
  DeviceBuffer(const void* host, size_t bytes) : bytes_(bytes) {
    check_cuda(cudaMalloc(&ptr_, bytes > 0 ? bytes : 1), "cudaMalloc");
    if (host && bytes > 0) check_cuda(cudaMemcpy(ptr_, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to device");
  }
  explicit DeviceBuffer(const Values& v) : DeviceBuffer(v.data(), v.bytes()) {}
  template <typename T>
  explicit DeviceBuffer(const std::vector<T>& v) : DeviceBuffer(v.data(), v.size() * sizeof(T)) {}
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(ptr_); }

  void* data() const { return ptr_; }
  // Element `offset` of a buffer of `dtype` values.
  void* at(DType dtype, int64_t offset = 0) const { return static_cast<char*>(ptr_) + offset * dtype_size(dtype); }
  template <typename T>
  T* as() const { return static_cast<T*>(ptr_); }
  // Waits for the kernels and copies the buffer back as `dtype` values.
  Values to_host(DType dtype) const {
    check_cuda(cudaDeviceSynchronize(), "kernel");
    Values v(dtype, static_cast<int64_t>(bytes_ / dtype_size(dtype)));
    check_cuda(cudaMemcpy(v.data(), ptr_, bytes_, cudaMemcpyDeviceToHost), "cudaMemcpy to host");
    return v;
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
};

#endif  // MISTRAL_EXT_WITH_CUDA

}  // namespace mistral_ext::testing
