// csrc/cpu/simd_math.h's float functions against the float64 libm functions: the largest errors over
// 2^24 evenly spaced arguments stay within the bounds its header states, and the limits (NaN, +-inf,
// overflow, subnormal results) come out right. The functions run in SIMD_TARGETS loops, the form the
// kernels use (vectorised). No torch needed.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <vector>

#include "cpu/simd_math.h"

namespace sm = grokalign::simd_math;

namespace {

int failures = 0;

void check(bool ok, const char* what, double got, double bound) {
  std::printf("%-44s %.3g (bound %.3g) %s\n", what, got, bound, ok ? "ok" : "FAILED");
  if (!ok) ++failures;
}

enum Fn { kExp, kErf, kTanh, kSigmoid, kExpm1 };

template <int F>
SIMD_TARGETS void apply(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (F == kExp) y[i] = sm::exp(x[i]);
    else if constexpr (F == kErf) y[i] = sm::erf(x[i]);
    else if constexpr (F == kTanh) y[i] = sm::tanh(x[i]);
    else if constexpr (F == kSigmoid) y[i] = sm::sigmoid(x[i]);
    else y[i] = sm::expm1(x[i]);
  }
}

template <int F>
float one(float x) {
  float y;
  apply<F>(&x, &y, 1);
  return y;
}

// max over x in [lo, hi] (n + 1 points) of err(x, F(x)).
template <int F, typename E>
double max_over(float lo, float hi, int n, E&& err) {
  std::vector<float> x(n + 1), y(n + 1);
  for (int i = 0; i <= n; ++i) x[i] = lo + (hi - lo) * static_cast<float>(i) / static_cast<float>(n);
  apply<F>(x.data(), y.data(), n + 1);
  double m = 0;
  for (int i = 0; i <= n; ++i) m = std::fmax(m, err(static_cast<double>(x[i]), static_cast<double>(y[i])));
  return m;
}

}  // namespace

int main() {
  constexpr int kN = 1 << 24;
  const double exp_rel = max_over<kExp>(-87.0f, 88.7f, kN, [](double x, double y) {
    const double want = std::exp(x);
    return std::fabs(y - want) / want;
  });
  check(exp_rel <= 8.5e-8, "exp: max relative error on [-87, 88.7]", exp_rel, 8.5e-8);
  const double erf_abs =
      max_over<kErf>(-20.0f, 20.0f, kN, [](double x, double y) { return std::fabs(y - std::erf(x)); });
  check(erf_abs <= 2e-7, "erf: max absolute error on [-20, 20]", erf_abs, 2e-7);
  const double erf_small = max_over<kErf>(-1.0f, 1.0f, kN, [](double x, double y) {
    const double want = std::erf(x);
    return want == 0 ? 0.0 : std::fabs(y - want) / std::fabs(want);
  });
  check(erf_small <= 3e-7, "erf: max relative error on [-1, 1]", erf_small, 3e-7);
  const double tanh_rel = max_over<kTanh>(-20.0f, 20.0f, kN, [](double x, double y) {
    const double want = std::tanh(x);
    return want == 0 ? 0.0 : std::fabs(y - want) / std::fabs(want);
  });
  check(tanh_rel <= 1.8e-7, "tanh: max relative error on [-20, 20]", tanh_rel, 1.8e-7);
  const double sig_rel = max_over<kSigmoid>(-20.0f, 20.0f, kN, [](double x, double y) {
    const double want = 1.0 / (1.0 + std::exp(-x));
    return std::fabs(y - want) / want;
  });
  check(sig_rel <= 1.5e-7, "sigmoid: max relative error on [-20, 20]", sig_rel, 1.5e-7);
  const double expm1_rel = max_over<kExpm1>(-20.0f, 20.0f, kN, [](double x, double y) {
    const double want = std::expm1(x);
    return want == 0 ? 0.0 : std::fabs(y - want) / std::fabs(want);
  });
  check(expm1_rel <= 1.3e-7, "expm1: max relative error on [-20, 20]", expm1_rel, 1.3e-7);

  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const double sub = one<kExp>(-100.0f), sub_want = std::exp(-100.0);
  check(std::fabs(sub - sub_want) <= 1e-3 * sub_want + 1.5e-45, "exp(-100) (subnormal): |error|", std::fabs(sub - sub_want),
        1e-3 * sub_want + 1.5e-45);
  const double big = one<kExp>(88.72f), big_want = std::exp(static_cast<double>(88.72f));
  check(std::isfinite(big) && std::fabs(big - big_want) <= 1e-6 * big_want, "exp(88.72) (near FLT_MAX): rel error",
        std::fabs(big - big_want) / big_want, 1e-6);
  const bool limits = one<kExp>(89.0f) == inf && one<kExp>(inf) == inf && one<kExp>(-inf) == 0.0f &&
                      one<kExp>(-104.0f) == 0.0f && std::isnan(one<kExp>(nan)) && one<kErf>(inf) == 1.0f &&
                      one<kErf>(-inf) == -1.0f && std::isnan(one<kErf>(nan)) && one<kTanh>(inf) == 1.0f &&
                      one<kTanh>(-inf) == -1.0f && std::isnan(one<kTanh>(nan)) && one<kSigmoid>(-inf) == 0.0f &&
                      one<kSigmoid>(inf) == 1.0f && std::isnan(one<kSigmoid>(nan)) && one<kErf>(0.0f) == 0.0f &&
                      one<kTanh>(0.0f) == 0.0f && one<kExpm1>(0.0f) == 0.0f && one<kExpm1>(-inf) == -1.0f &&
                      one<kExpm1>(inf) == inf && std::isnan(one<kExpm1>(nan));
  check(limits, "limits: NaN, +-inf, overflow, underflow", limits ? 0 : 1, 0);
  if (failures) std::printf("%d check(s) FAILED\n", failures);
  return failures == 0 ? 0 : 1;
}
