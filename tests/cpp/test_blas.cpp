// csrc/cpu/blas.h: the row-major gemm of the blockwise CPU kernels, on both of its paths (the
// BLAS symbols libtorch exports, and the at::addmm_out fallback used where it exports none), against
// at::matmul in double: every transpose combination, leading dimensions wider than the operands,
// alpha and beta, beta = 0 over a C full of NaN (BLAS semantics: C is not read), K = 0, and
// single rows and columns. Exit status 0 when every check passes, 1 otherwise.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "cpu/blas.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s  %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

using grokalign::blas::Mat;

// A stored [r, c] matrix with leading dimension ld >= c, as a double tensor (the padding left out).
template <typename T>
at::Tensor stored(const std::vector<T>& buf, int64_t r, int64_t c, int64_t ld) {
  at::Tensor t = at::empty({r, c}, at::kDouble);
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < c; ++j) t[i][j] = static_cast<double>(buf[i * ld + j]);
  return t;
}

template <typename T>
void check(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, T beta, bool fallback) {
  // Operand a is [M, K] in the product; stored as [M, K] or (ta) as [K, M], with 3 columns of padding.
  const int64_t ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
  const int64_t lda = ac + 3, ldb = bc + 2, ldc = N + 1;
  std::vector<T> a(std::max<int64_t>(ar * lda, 1)), b(std::max<int64_t>(br * ldb, 1)), c(std::max<int64_t>(M * ldc, 1));
  unsigned s = 12345u + static_cast<unsigned>(M * 131 + N * 17 + K);
  auto draw = [&s] {
    s = s * 1103515245u + 12345u;
    return static_cast<T>(static_cast<int>((s >> 8) % 2001) - 1000) / T(250);
  };
  for (auto& x : a) x = draw();
  for (auto& x : b) x = draw();
  for (auto& x : c) x = beta == T(0) ? std::numeric_limits<T>::quiet_NaN() : draw();
  const at::Tensor A = stored(a, ar, ac, lda), B = stored(b, br, bc, ldb);
  at::Tensor want = at::matmul(ta ? A.t() : A, tb ? B.t() : B) * static_cast<double>(alpha);
  if (beta != T(0)) want += stored(c, M, N, ldc) * static_cast<double>(beta);
  const Mat<T> ma{a.data(), M, K, lda, ta}, mb{b.data(), K, N, ldb, tb};
  if (fallback) {
    grokalign::blas::detail::aten_gemm(c.data(), ldc, ma, mb, alpha, beta);
  } else {
    grokalign::blas::gemm(c.data(), ldc, ma, mb, alpha, beta);
  }
  // Padding of C (column N of each row) is never written.
  bool padding_kept = true;
  for (int64_t i = 0; i + 1 < M; ++i) {
    const T x = c[i * ldc + N];
    padding_kept = padding_kept && (beta == T(0) ? std::isnan(x) : std::isfinite(x));
  }
  const double tol = std::is_same_v<T, float> ? 1e-4 : 1e-12;
  const at::Tensor got = stored(c, M, N, ldc);
  const bool close = at::allclose(got, want, tol, tol * std::max<int64_t>(K, 1) * 20);
  char what[200];
  std::snprintf(what, sizeof what, "%s %s a%s b%s M%lld N%lld K%lld alpha %.2f beta %.2f",
                std::is_same_v<T, float> ? "float " : "double", fallback ? "aten" : "gemm", ta ? "^T" : "  ",
                tb ? "^T" : "  ", static_cast<long long>(M), static_cast<long long>(N), static_cast<long long>(K),
                static_cast<double>(alpha), static_cast<double>(beta));
  expect(close && padding_kept, what);
}

template <typename T>
void check_all() {
  std::printf("%s: gemm calls the BLAS directly: %s\n", std::is_same_v<T, float> ? "float" : "double",
              grokalign::blas::direct<T>() ? "yes" : "no (at::addmm_out)");
  const int64_t shapes[][3] = {{5, 7, 3}, {64, 128, 64}, {1, 9, 4}, {9, 1, 4}, {3, 4, 0}, {2, 3, 1}};
  for (bool fallback : {false, true})
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (const auto& sh : shapes) {
          check<T>(ta, tb, sh[0], sh[1], sh[2], T(1), T(0), fallback);
          check<T>(ta, tb, sh[0], sh[1], sh[2], T(0.7), T(1), fallback);
          check<T>(ta, tb, sh[0], sh[1], sh[2], T(-1.5), T(0.25), fallback);
        }
}

}  // namespace

int main() {
  check_all<float>();
  check_all<double>();
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
