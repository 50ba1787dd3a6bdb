// csrc/cpu/blas.h: the row-major gemm of the blockwise CPU kernels, through its dispatcher and on
// each of its paths this machine has (the AVX-512 kernel, the BLAS symbols libtorch exports, and the
// at::addmm_out fallback), against at::matmul in double: every transpose combination, leading
// dimensions wider than the operands, alpha and beta, beta = 0 over a C full of NaN (BLAS semantics:
// C is not read), alpha = 0 over operands full of NaN (a and b are not read), K = 0, single rows and
// columns, and sizes past the AVX-512 kernel's tile (8 x 2 vectors) and block (256 rows of B,
// 32 vectors of columns) edges. Exit status 0 when every check passes, 1 otherwise.
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

enum class Path { dispatch, avx512, blas, aten };
const char* const kPathNames[] = {"gemm  ", "avx512", "blas  ", "aten  "};

template <typename T>
void check(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, T beta, Path path) {
  // Operand a is [M, K] in the product; stored as [M, K] or (ta) as [K, M], with 3 columns of padding.
  const int64_t ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
  const int64_t lda = ac + 3, ldb = bc + 2, ldc = N + 1;
  std::vector<T> a(std::max<int64_t>(ar * lda, 1)), b(std::max<int64_t>(br * ldb, 1)), c(std::max<int64_t>(M * ldc, 1));
  unsigned s = 12345u + static_cast<unsigned>(M * 131 + N * 17 + K);
  auto draw = [&s] {
    s = s * 1103515245u + 12345u;
    return static_cast<T>(static_cast<int>((s >> 8) % 2001) - 1000) / T(250);
  };
  for (auto& x : a) x = alpha == T(0) ? std::numeric_limits<T>::quiet_NaN() : draw();
  for (auto& x : b) x = alpha == T(0) ? std::numeric_limits<T>::quiet_NaN() : draw();
  for (auto& x : c) x = beta == T(0) ? std::numeric_limits<T>::quiet_NaN() : draw();
  const at::Tensor A = stored(a, ar, ac, lda), B = stored(b, br, bc, ldb);
  at::Tensor want = alpha == T(0) ? at::zeros({M, N}, at::kDouble)
                                  : at::matmul(ta ? A.t() : A, tb ? B.t() : B) * static_cast<double>(alpha);
  if (beta != T(0)) want += stored(c, M, N, ldc) * static_cast<double>(beta);
  const Mat<T> ma{a.data(), M, K, lda, ta}, mb{b.data(), K, N, ldb, tb};
  namespace detail = grokalign::blas::detail;
  bool served = true;
  switch (path) {
    case Path::dispatch: grokalign::blas::gemm(c.data(), ldc, ma, mb, alpha, beta); break;
    case Path::avx512: served = detail::avx512_gemm(c.data(), ldc, ma, mb, alpha, beta); break;
    case Path::blas: served = detail::blas_gemm(c.data(), ldc, ma, mb, alpha, beta); break;
    case Path::aten: detail::aten_gemm(c.data(), ldc, ma, mb, alpha, beta); break;
  }
  // Padding of C (column N of each row) is never written.
  bool padding_kept = true;
  for (int64_t i = 0; i + 1 < M; ++i) {
    const T x = c[i * ldc + N];
    padding_kept = padding_kept && (beta == T(0) ? std::isnan(x) : std::isfinite(x));
  }
  char what[200];
  std::snprintf(what, sizeof what, "%s %s a%s b%s M%lld N%lld K%lld alpha %.2f beta %.2f",
                std::is_same_v<T, float> ? "float " : "double", kPathNames[static_cast<int>(path)], ta ? "^T" : "  ",
                tb ? "^T" : "  ", static_cast<long long>(M), static_cast<long long>(N), static_cast<long long>(K),
                static_cast<double>(alpha), static_cast<double>(beta));
  if (!served) {  // a direct path may decline K = 0 only (the dispatcher scales C itself there)
    expect(K == 0, std::string(what) + " (declined)");
    return;
  }
  const double tol = std::is_same_v<T, float> ? 1e-4 : 1e-12;
  const at::Tensor got = stored(c, M, N, ldc);
  const bool close = at::allclose(got, want, tol, tol * std::max<int64_t>(K, 1) * 20);
  expect(close && padding_kept, what);
}

template <typename T>
void check_all() {
  namespace blas = grokalign::blas;
  const bool avx512 = GROKALIGN_AVX512_GEMM && blas::avx512::available();
  std::printf("%s: gemm takes the %s path; AVX-512 kernel %s; BLAS symbol %s\n",
              std::is_same_v<T, float> ? "float" : "double", blas::path<T>(), avx512 ? "tested" : "not on this CPU",
              blas::detail::has_blas<T>() ? "present" : "absent");
  // {M, N, K}: small and odd; the op's block shape; single rows and columns; K = 0; then past the
  // AVX-512 kernel's edges (M % 8, N % 32 floats / 16 doubles, K > 256, N > 512 floats / 256 doubles).
  const int64_t shapes[][3] = {{5, 7, 3}, {64, 128, 64}, {1, 9, 4}, {9, 1, 4}, {3, 4, 0}, {2, 3, 1},
                               {13, 37, 17}, {70, 45, 300}, {11, 530, 9}};
  for (Path path : {Path::dispatch, Path::avx512, Path::blas, Path::aten}) {
    if (path == Path::avx512 && !avx512) continue;
    if (path == Path::blas && !blas::detail::has_blas<T>()) continue;
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (const auto& sh : shapes) {
          check<T>(ta, tb, sh[0], sh[1], sh[2], T(1), T(0), path);
          check<T>(ta, tb, sh[0], sh[1], sh[2], T(0.7), T(1), path);
          check<T>(ta, tb, sh[0], sh[1], sh[2], T(-1.5), T(0.25), path);
        }
  }
  for (bool ta : {false, true}) check<T>(ta, !ta, 6, 5, 4, T(0), T(0.5), Path::dispatch);  // alpha = 0
  // The direct paths decline K = 0 (the dispatcher scales C itself).
  T c = 0, a = 0, b = 0;
  const blas::Mat<T> a0{&a, 1, 0, 1, false}, b0{&b, 0, 1, 1, false};
  expect(!blas::detail::blas_gemm(&c, 1, a0, b0, T(1), T(0)) && !blas::detail::avx512_gemm(&c, 1, a0, b0, T(1), T(0)),
         "the direct paths decline K = 0");
}

}  // namespace

int main() {
  check_all<float>();
  check_all<double>();
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
