// Calls two kernels of the installed library the way a C++ serving loop would: RMSNorm over a
// batch of hidden states, then rotary embedding of a query/key pair, both on the CPU, and
// checks them against a plain loop. Prints the results; exits non-zero on a mismatch.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "mistral_ext/kernels.h"

int main() {
  using namespace mistral_ext;
  int failures = 0;
  const auto check = [&](const char* what, double got, double want) {
    const bool ok = std::fabs(got - want) <= 1e-5 + 1e-5 * std::fabs(want);
    if (!ok) ++failures;
    std::printf("%-22s got % .6f  want % .6f  %s\n", what, got, want, ok ? "ok" : "MISMATCH");
  };

  // RMSNorm: 2 rows of 5.
  const int64_t rows = 2, hidden = 5;
  const std::vector<float> x = {0.5f, -1.25f, 2.f, 0.75f, -0.3f, 1.5f, 0.2f, -0.9f, 1.1f, -2.4f};
  const std::vector<float> weight = {1.f, 0.5f, 2.f, -1.f, 0.25f};
  std::vector<float> normed(rows * hidden);
  rms_norm_cpu({DType::kFloat32, rows, hidden, x.data(), hidden, weight.data(), normed.data(), 1e-6f});
  for (int64_t r = 0; r < rows; ++r) {
    double sum_squares = 0;
    for (int64_t i = 0; i < hidden; ++i) sum_squares += double(x[r * hidden + i]) * x[r * hidden + i];
    const double inv_rms = 1 / std::sqrt(sum_squares / hidden + 1e-6);
    for (int64_t i = 0; i < hidden; ++i)
      check("rms_norm", normed[r * hidden + i], x[r * hidden + i] * inv_rms * weight[i]);
  }

  // Rotary: one token at position 7, one query head and one key head of dimension 4.
  const int32_t head_dim = 4;
  const int64_t position = 7;
  const float theta = 10000.f;
  std::vector<float> q = {0.3f, -0.7f, 1.2f, 0.4f}, k = {-1.f, 0.6f, 0.25f, 0.9f};
  const std::vector<float> q0 = q, k0 = k;
  rotary_embedding_cpu({DType::kFloat32, 1, 1, 1, head_dim, q.data(), head_dim, k.data(), head_dim, &position, theta});
  const auto check_rotated = [&](const char* name, const std::vector<float>& after, const std::vector<float>& before) {
    for (int i = 0; i < head_dim / 2; ++i) {
      const double angle = float(position) * float(std::pow(double(theta), -2.0 * i / head_dim));
      const double x1 = before[i], x2 = before[i + head_dim / 2];
      check(name, after[i], x1 * std::cos(angle) - x2 * std::sin(angle));
      check(name, after[i + head_dim / 2], x2 * std::cos(angle) + x1 * std::sin(angle));
    }
  };
  check_rotated("rotary q", q, q0);
  check_rotated("rotary k", k, k0);

  std::printf("%s\n", failures == 0 ? "cpp_consumer: all results match" : "cpp_consumer: MISMATCH");
  return failures == 0 ? 0 : 1;
}
