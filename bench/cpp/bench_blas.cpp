// GFLOP/s of csrc/cpu/blas.h's GEMM paths on the attention op's block GEMMs (T = 1024, d = 64,
// P = 4: 64-row query blocks, 128-row key blocks) and on 1024^3, one thread (the op calls gemm from
// inside its own parallel tasks). Paths alternate within each round; medians over the rounds.
//   build/cmake/lib/bench_blas [rounds]
// Built with the CMake tests (BUILD_TESTING); prints a markdown table.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/blas.h"

namespace {

using grokalign::blas::Mat;
namespace gblas = grokalign::blas::detail;

struct Shape {
  const char* what;
  int64_t M, N, K;
  bool ta, tb;
};

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? std::atoi(argv[1]) : 15;
  at::set_num_threads(1);
  const Shape shapes[] = {
      {"p = q k^T", 64, 128, 64, false, true},        {"s_t = q_t k^T", 256, 128, 64, false, true},
      {"r = q k_t^T", 64, 512, 64, false, true},      {"o += p v", 64, 64, 128, false, false},
      {"o_t += p s_t v", 256, 64, 128, false, false}, {"o_t += p v_t", 64, 256, 128, false, false},
      {"g_v += p^T g_o", 128, 64, 64, true, false},   {"g_v += (p s_t)^T g_t", 128, 64, 256, true, false},
      {"g_kt += g_st^T q", 512, 64, 64, true, false}, {"g_q += g_st k_t", 64, 64, 512, false, false},
      {"y = g_t v_t^T", 64, 128, 256, false, true},   {"1024^3", 1024, 1024, 1024, false, false},
  };
  const bool avx512 = GROKALIGN_AVX512_GEMM && grokalign::blas::avx512::available();
  const bool blas = gblas::has_blas<float>();
  std::printf("float, one thread, %d rounds, medians; AVX-512 kernel %s, BLAS %s\n\n", rounds,
              avx512 ? "present" : "absent (not on this CPU)", blas ? "present" : "absent");
  std::printf("| GEMM | M | N | K | avx512 GFLOP/s | blas GFLOP/s | avx512 / blas |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|\n");
  for (const Shape& s : shapes) {
    const int64_t ar = s.ta ? s.K : s.M, ac = s.ta ? s.M : s.K, br = s.tb ? s.N : s.K, bc = s.tb ? s.K : s.N;
    at::Tensor A = at::randn({ar, ac}), B = at::randn({br, bc}), C = at::zeros({s.M, s.N});
    const Mat<float> ma{A.data_ptr<float>(), s.M, s.K, ac, s.ta}, mb{B.data_ptr<float>(), s.K, s.N, bc, s.tb};
    const double flop = 2.0 * s.M * s.N * s.K;
    const int reps = std::max(3, static_cast<int>(4e8 / flop));
    std::vector<double> t_avx, t_blas;
    for (int r = 0; r < rounds + 1; ++r) {  // round 0 warms up
      for (int path = 0; path < 2; ++path) {
        if ((path == 0 && !avx512) || (path == 1 && !blas)) continue;
        const double t0 = now();
        for (int i = 0; i < reps; ++i) {
          if (path == 0) {
            gblas::avx512_gemm(C.data_ptr<float>(), s.N, ma, mb, 1.f, 1.f);
          } else {
            gblas::blas_gemm(C.data_ptr<float>(), s.N, ma, mb, 1.f, 1.f);
          }
        }
        const double rate = flop * reps / (now() - t0) / 1e9;
        if (r > 0) (path == 0 ? t_avx : t_blas).push_back(rate);
      }
    }
    const double ga = t_avx.empty() ? 0 : median(t_avx), gb = t_blas.empty() ? 0 : median(t_blas);
    std::printf("| %s | %lld | %lld | %lld | %.0f | %.0f | %.2f |\n", s.what, static_cast<long long>(s.M),
                static_cast<long long>(s.N), static_cast<long long>(s.K), ga, gb, gb > 0 ? ga / gb : 0.0);
  }
  return 0;
}
