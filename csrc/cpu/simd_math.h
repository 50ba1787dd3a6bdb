// Loops the compiler vectorises on the CPU, and the float transcendental functions they call.
//
// The build has no -mavx2 (the extension runs on any x86-64), so at::vec::Vectorized would be its
// generic 32-byte arrays here, and ATen's vectorised erf / exp are only reachable through a tensor
// call per buffer. Two ways to get AVX2 code anyway (x86-64 Linux, GCC; elsewhere plain code):
// - SIMD_TARGETS: a function compiled twice (function multiversioning, an ifunc picked once at load
//   time by the CPU's features), for AVX2 (8 floats a vector, no FMA) and for the baseline (SSE2, 4).
//   For memory-bound loops.
// - simd_math::dispatch(f): f and everything it calls inlined (flatten) into two instantiations, one
//   for AVX2 + FMA, one for the baseline, picked by the CPU's features. For arithmetic-bound loops:
//   FMA makes the polynomial loops below 1.3-1.4x faster than the AVX2 clone (0.98 against 1.35 ns a
//   GELU entry, one core), and target_clones takes one feature per clone.
// Loops in either are written on restrict pointers with `omp simd` (a loop inside a lambda reading
// its pointers through the captures compiled to scalar code with GCC 12).
//
// simd_math::exp / erf / tanh / sigmoid (float): branch-free, inlinable, so that a loop calling them
// vectorises (libm's expf and erff are calls, and a loop calling them is scalar; the selects become
// blends with -fno-trapping-math, set in setup.py and CMakeLists.txt). Largest errors against the
// float64 functions over 2^24 evenly spaced arguments (tests/cpp/test_simd_math.cpp checks them):
//   exp:     Cody-Waite reduction to r in [-ln2/2, ln2/2], Cephes' degree-6 polynomial, 2^n from
//            exponent bits (subnormal results included; 0 below log(2^-149), +inf above
//            log(FLT_MAX)): relative 8.3e-8 (0.7 ulp) on [-87, 88.7].
//   erf:     |x| < 1: the Taylor series to x^21 (truncation < 1.1e-9); else 1 - t p(t) exp(-x^2),
//            t = 1 / (1 + 0.3275911 |x|) (Abramowitz & Stegun 7.1.26, the formula of ATen's vectorised
//            float erf, truncation < 1.5e-7): absolute 1.9e-7 on [-20, 20], relative 2.1e-7 on [-1, 1].
//   tanh:    |x| < 0.4: the Taylor series to x^11 (relative truncation < 3e-8); else
//            sign(x) (1 - 2 / (exp(2 |x|) + 1)): relative 1.7e-7 on [-20, 20].
//   sigmoid: 1 / (1 + exp(-x)): relative 1.5e-7 on [-20, 20].
//   expm1:   |x| < 0.5: the Taylor series to x^9 (relative truncation < 5.4e-10); else exp(x) - 1:
//            relative 1.3e-7 on [-20, 20].
// NaN gives NaN; exp(+-inf), erf(+-inf), tanh(+-inf) and sigmoid(+-inf) their limits.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GROKALIGN_X86_MULTIVERSION 1
#define SIMD_TARGETS __attribute__((target_clones("avx2", "default")))
#else
#define GROKALIGN_X86_MULTIVERSION 0
#define SIMD_TARGETS
#endif

namespace grokalign {
namespace simd_math {

inline float exp(float x) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: (a + kRound) - kRound rounds a to an integer
  constexpr float kMin = -103.972076f, kMax = 88.7228394f;  // log of the smallest subnormal; log FLT_MAX
  const float xc = x < kMin ? kMin : (x > kMax ? kMax : x);  // (NaN: handled at the end)
  const float n = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n as two normal powers of two (n in [-150, 128]), so that subnormal results and 2^128 * p < FLT_MAX
  // come out right.
  const int32_t ni = static_cast<int32_t>(n), half = ni / 2;
  const float s1 = std::bit_cast<float>((half + 127) << 23), s2 = std::bit_cast<float>((ni - half + 127) << 23);
  const float e = p * s1 * s2;
  return x != x ? x : (x < kMin ? 0.0f : (x > kMax ? INFINITY : e));
}

// erf(x), and exp(-x^2) into *gauss (the term the formula for |x| >= 1 computes anyway).
inline float erf(float x, float* gauss) {
  const float a = std::fabs(x), x2 = x * x;
  // |x| < 1: 2 / sqrt(pi) sum_{k <= 10} (-1)^k x^(2k + 1) / (k! (2k + 1)).
  float s = 1.0f / 76204800.0f;
  s = s * -x2 + 1.0f / 6894720.0f;
  s = s * -x2 + 1.0f / 685440.0f;
  s = s * -x2 + 1.0f / 75600.0f;
  s = s * -x2 + 1.0f / 9360.0f;
  s = s * -x2 + 1.0f / 1320.0f;
  s = s * -x2 + 1.0f / 216.0f;
  s = s * -x2 + 1.0f / 42.0f;
  s = s * -x2 + 1.0f / 10.0f;
  s = s * -x2 + 1.0f / 3.0f;
  s = s * -x2 + 1.0f;
  const float small = 1.12837916709551257f * x * s;
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float g = exp(-x2);
  *gauss = g;
  const float large = std::copysign(1.0f - t * p * g, x);
  return a < 1.0f ? small : large;
}

inline float erf(float x) {
  float gauss;
  return erf(x, &gauss);
}

inline float tanh(float x) {
  const float a = std::fabs(x), x2 = x * x;
  // |x| < 0.4: x - x^3 / 3 + 2 x^5 / 15 - 17 x^7 / 315 + 62 x^9 / 2835 - 1382 x^11 / 155925.
  float s = -1382.0f / 155925.0f;
  s = s * x2 + 62.0f / 2835.0f;
  s = s * x2 - 17.0f / 315.0f;
  s = s * x2 + 2.0f / 15.0f;
  s = s * x2 - 1.0f / 3.0f;
  s = s * x2 + 1.0f;
  const float small = x * s;
  const float large = std::copysign(1.0f - 2.0f / (exp(2.0f * a) + 1.0f), x);
  return a < 0.4f ? small : large;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp(-x)); }

inline float expm1(float x) {
  // |x| < 0.5: the Taylor series to x^9 / 9! (relative truncation < 5.4e-10); else exp(x) - 1.
  float s = 1.0f / 362880.0f;
  s = s * x + 1.0f / 40320.0f;
  s = s * x + 1.0f / 5040.0f;
  s = s * x + 1.0f / 720.0f;
  s = s * x + 1.0f / 120.0f;
  s = s * x + 1.0f / 24.0f;
  s = s * x + 1.0f / 6.0f;
  s = s * x + 0.5f;
  s = s * x + 1.0f;
  const float small = x * s;
  const float large = exp(x) - 1.0f;
  return std::fabs(x) < 0.5f ? small : large;
}

#if GROKALIGN_X86_MULTIVERSION
template <typename F>
__attribute__((target("avx2,fma"), flatten)) void run_avx2_fma(F& f) {
  f();
}
template <typename F>
__attribute__((flatten)) void run_baseline(F& f) {
  f();
}
inline bool has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

// Runs f() (file comment): compiled for AVX2 + FMA where the CPU has both, else for the baseline.
template <typename F>
void dispatch(F&& f) {
#if GROKALIGN_X86_MULTIVERSION
  if (has_avx2_fma()) {
    run_avx2_fma(f);
  } else {
    run_baseline(f);
  }
#else
  f();
#endif
}

}  // namespace simd_math
}  // namespace grokalign
