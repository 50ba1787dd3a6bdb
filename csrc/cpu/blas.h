// Row-major GEMM on raw pointers for the blockwise CPU kernels. gemm<T> takes the first of three
// paths that can serve (path<T>() names it):
// - "avx512": csrc/cpu/blas_avx512.h, where the CPU has AVX-512F. MKL, the BLAS of torch's x86
//   wheels, runs its AVX2 kernels on AMD CPUs; on the AMD EPYC measured here this kernel is 2.1-2.8x
//   faster on the attention op's block shapes (bench/RESULTS.md, bench/cpp/bench_blas.cpp).
//   GROKALIGN_CPU_GEMM=blas in the environment (read once) skips it.
// - "blas": the BLAS that libtorch links (`sgemm_` / `dgemm_`, the LP64 Fortran interface).
// - "aten": at::addmm_out on from_blob views, where libtorch exports neither symbol.
//
// Why not at::mm_out on views everywhere: a blockwise kernel issues thousands of small GEMMs
// (64 x 128 x 64) per call, and each at::mm_out pays the dispatcher, the Tensor views and the shape
// checks, a few microseconds against ~10 us of arithmetic. The BLAS symbols are weak references:
// where libtorch exports no `sgemm_` / `dgemm_` (another BLAS, another platform) they resolve to
// null. The declarations take 32-bit integers (LP64, MKL's `sgemm_` in torch's x86 wheels; its
// 64-bit variant is `sgemm_64`); a BLAS exporting 64-bit-integer routines under the plain names
// would be misread, which tests/cpp/test_blas.cpp and the ops' float64 tests would show at once.
#pragma once

#include <ATen/ATen.h>

#include "cpu/blas_avx512.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && !defined(_WIN32)
#define GROKALIGN_WEAK_BLAS 1
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}
#endif

namespace grokalign {
namespace blas {

// A row-major operand: `rows` x `cols` as used in the product, stored at p with leading dimension ld.
// rm(p, r, c) is the [r, c] matrix itself; tr(p, r, c) is the transpose of the stored [r, c] matrix
// (a [c, r] operand, read by BLAS with its transpose flag, no copy).
template <typename T>
struct Mat {
  const T* p;
  int64_t rows, cols, ld;
  bool transposed;
};
template <typename T>
Mat<T> rm(const T* p, int64_t rows, int64_t cols) {
  return {p, rows, cols, cols, false};
}
template <typename T>
Mat<T> tr(const T* p, int64_t rows, int64_t cols) {
  return {p, cols, rows, cols, true};
}

namespace detail {
template <typename T>
at::Tensor view(const Mat<T>& m) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const int64_t r = m.transposed ? m.cols : m.rows, c = m.transposed ? m.rows : m.cols;
  at::Tensor stored = at::from_blob(const_cast<T*>(m.p), {r, c}, {m.ld, 1}, options);
  return m.transposed ? stored.t() : stored;
}

template <typename T>
void aten_gemm(T* c, int64_t ldc, const Mat<T>& a, const Mat<T>& b, T alpha, T beta) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor C = at::from_blob(c, {a.rows, b.cols}, {ldc, 1}, options);
  if (beta == T(0)) C.zero_();  // BLAS semantics: with beta = 0, C's old contents (even NaN) are ignored
  at::addmm_out(C, C, view(a), view(b), beta == T(0) ? T(1) : beta, alpha);
}

inline bool fits_int(int64_t x) { return x <= std::numeric_limits<int>::max(); }

// True where libtorch exports the BLAS routine for T.
template <typename T>
bool has_blas() {
#ifdef GROKALIGN_WEAK_BLAS
  if constexpr (std::is_same_v<T, float>) return sgemm_ != nullptr;
  if constexpr (std::is_same_v<T, double>) return dgemm_ != nullptr;
#endif
  return false;
}

// The BLAS path; false where it cannot serve (no symbol for T, K = 0, or a size over int).
template <typename T>
bool blas_gemm(T* c, int64_t ldc, const Mat<T>& a, const Mat<T>& b, T alpha, T beta) {
#ifdef GROKALIGN_WEAK_BLAS
  const int64_t M = a.rows, N = b.cols, K = a.cols;
  constexpr bool is_float = std::is_same_v<T, float>, is_double = std::is_same_v<T, double>;
  if (!has_blas<T>() || K == 0 || !fits_int(std::max({M, N, K, a.ld, b.ld, ldc}))) return false;
  // Row-major C = A B is column-major C^T = B^T A^T; a stored row-major [r, c] block is a
  // column-major [c, r] one, so an untransposed row-major operand needs no transpose flag here.
  const char ta = b.transposed ? 'T' : 'N', tb = a.transposed ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int lda = static_cast<int>(std::max<int64_t>(b.ld, 1)), ldb = static_cast<int>(std::max<int64_t>(a.ld, 1));
  const int ldcc = static_cast<int>(std::max<int64_t>(ldc, 1));
  if constexpr (is_float) {
    sgemm_(&ta, &tb, &m, &n, &k, &alpha, b.p, &lda, a.p, &ldb, &beta, c, &ldcc);
    return true;
  } else if constexpr (is_double) {
    dgemm_(&ta, &tb, &m, &n, &k, &alpha, b.p, &lda, a.p, &ldb, &beta, c, &ldcc);
    return true;
  }
#endif
  return false;
}

// The AVX-512 path; false where it cannot serve (no AVX-512F, T neither float nor double, K = 0).
template <typename T>
bool avx512_gemm(T* c, int64_t ldc, const Mat<T>& a, const Mat<T>& b, T alpha, T beta) {
#if GROKALIGN_AVX512_GEMM
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    if (!avx512::available() || a.cols == 0) return false;
    // Entry (i, k) of a at a.p[i ars + k acs]; entry (k, j) of b at b.p[k bks + j bjs].
    const int64_t ars = a.transposed ? 1 : a.ld, acs = a.transposed ? a.ld : 1;
    const int64_t bks = b.transposed ? 1 : b.ld, bjs = b.transposed ? b.ld : 1;
    avx512::gemm<T>(c, ldc, a.rows, b.cols, a.cols, a.p, ars, acs, b.p, bks, bjs, alpha, beta);
    return true;
  }
#endif
  return false;
}

// GROKALIGN_CPU_GEMM: unset or "auto" (every path), "blas" (the AVX-512 path skipped).
inline bool avx512_allowed() {
  static const bool allowed = [] {
    const char* env = std::getenv("GROKALIGN_CPU_GEMM");
    if (env == nullptr || std::strcmp(env, "auto") == 0 || env[0] == '\0') return true;
    TORCH_CHECK(std::strcmp(env, "blas") == 0, "GROKALIGN_CPU_GEMM: expected \"auto\" or \"blas\", got \"", env,
                "\"");
    return false;
  }();
  return allowed;
}

template <typename T>
bool avx512_serves() {
#if GROKALIGN_AVX512_GEMM
  return (std::is_same_v<T, float> || std::is_same_v<T, double>) && avx512::available() && avx512_allowed();
#else
  return false;
#endif
}
}  // namespace detail

// C[M, N] = alpha a b + beta C (row-major, ldc), with M = a.rows, K = a.cols = b.rows, N = b.cols.
// With beta = 0, C is written without being read; with alpha = 0 or K = 0, a and b are not read.
template <typename T>
void gemm(T* c, int64_t ldc, const Mat<T>& a, const Mat<T>& b, T alpha, T beta) {
  TORCH_CHECK(a.cols == b.rows, "blas::gemm: inner dimensions differ (", a.cols, " vs ", b.rows, ")");
  const int64_t M = a.rows, N = b.cols, K = a.cols;
  if (M == 0 || N == 0) return;
  if (K == 0 || alpha == T(0)) {  // C = beta C
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  if (detail::avx512_allowed() && detail::avx512_gemm(c, ldc, a, b, alpha, beta)) return;
  if (detail::blas_gemm(c, ldc, a, b, alpha, beta)) return;
  detail::aten_gemm(c, ldc, a, b, alpha, beta);
}

// The path gemm<T> takes for K > 0: "avx512", "blas" or "aten" (tests and benchmarks report it).
template <typename T>
const char* path() {
  if (detail::avx512_serves<T>()) return "avx512";
  return detail::has_blas<T>() ? "blas" : "aten";
}

}  // namespace blas
}  // namespace grokalign
