// An AVX-512 GEMM for the blockwise CPU kernels (blas::gemm's first choice where the CPU has
// AVX-512F; csrc/cpu/blas.h).
//
// Why: MKL, the BLAS in torch's x86 wheels, runs its AVX2 kernels on AMD CPUs. On the AMD EPYC
// (Zen 5) this was measured on, one core: an FMA loop peaks at 268 GFLOP/s on 512-bit registers
// and 133 on 256-bit ones; MKL's sgemm reaches 90-113 GFLOP/s on the attention op's block shapes
// (64-512 x 64-512 x 64-512) and 112 on 1024^3, this kernel 230-261 and 208
// (bench/cpp/bench_blas.cpp; the table and its command are in bench/RESULTS.md).
//
// Method (the BLIS structure without packing A): B is packed, a KC x NC block at a time, into
// slivers of NR = 2 vectors of columns ([K][NR], zero-padded); an MR x NR tile of C is accumulated in
// 2 MR registers, reading B's sliver (one pair of loads per k) and broadcasting MR entries of A
// straight from A's storage (a row-major or a transposed A is only a different pair of strides;
// the last M % MR rows from a zero-padded copy).
// The tile is then written as alpha acc + beta C under a lane mask for the last columns (beta = 0:
// C is not read). MR = 8 (16 accumulators of 32 registers): 6 and 12 were 1-4% and 2-8% slower on
// the op's shapes, and 8 divides the op's blocks. A transposed B (the op's k^T and v^T) is packed
// by 16 x 16 (double: 8 x 8) transposes in registers.
//
// Compiled with a target attribute (the build itself assumes only x86-64), reached only after a
// runtime check of the CPU's features: avx512::available().
#pragma once

#if defined(__GNUC__) && defined(__x86_64__)
#define GROKALIGN_AVX512_GEMM 1

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#define GROKALIGN_AVX512 __attribute__((target("avx512f")))
#define GROKALIGN_AVX512_INLINE __attribute__((target("avx512f"), always_inline)) inline

namespace grokalign {
namespace blas {
namespace avx512 {

inline bool available() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// One 512-bit register of T and the operations the kernel uses.
template <typename T>
struct Vec;

template <>
struct Vec<float> {
  using reg = __m512;
  using mask = __mmask16;
  static constexpr int lanes = 16;
  static GROKALIGN_AVX512_INLINE reg zero() { return _mm512_setzero_ps(); }
  static GROKALIGN_AVX512_INLINE reg set1(float x) { return _mm512_set1_ps(x); }
  static GROKALIGN_AVX512_INLINE reg load(const float* p) { return _mm512_loadu_ps(p); }
  static GROKALIGN_AVX512_INLINE reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static GROKALIGN_AVX512_INLINE reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static GROKALIGN_AVX512_INLINE reg load(mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static GROKALIGN_AVX512_INLINE void store(float* p, mask m, reg x) { _mm512_mask_storeu_ps(p, m, x); }
};

template <>
struct Vec<double> {
  using reg = __m512d;
  using mask = __mmask8;
  static constexpr int lanes = 8;
  static GROKALIGN_AVX512_INLINE reg zero() { return _mm512_setzero_pd(); }
  static GROKALIGN_AVX512_INLINE reg set1(double x) { return _mm512_set1_pd(x); }
  static GROKALIGN_AVX512_INLINE reg load(const double* p) { return _mm512_loadu_pd(p); }
  static GROKALIGN_AVX512_INLINE reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_pd(a, b, c); }
  static GROKALIGN_AVX512_INLINE reg mul(reg a, reg b) { return _mm512_mul_pd(a, b); }
  static GROKALIGN_AVX512_INLINE reg load(mask m, const double* p) { return _mm512_maskz_loadu_pd(m, p); }
  static GROKALIGN_AVX512_INLINE void store(double* p, mask m, reg x) { _mm512_mask_storeu_pd(p, m, x); }
};

// Register shuffles through their masked forms with every lane selected: the same instructions,
// but GCC 12 warns (wrongly, GCC bug 105593) that the plain forms read an uninitialised register.
template <int imm>
GROKALIGN_AVX512_INLINE __m512 lanes128(__m512 a, __m512 b) {
  return _mm512_mask_shuffle_f32x4(a, __mmask16(0xFFFF), a, b, imm);
}
template <int imm>
GROKALIGN_AVX512_INLINE __m512 within128(__m512 a, __m512 b) {
  return _mm512_mask_shuffle_ps(a, __mmask16(0xFFFF), a, b, imm);
}

// dst[k ldd + j] = src[j ld + k] for j, k < L (the lanes): one L x L block transposed in registers
// (unpacks within 128-bit lanes, then two rounds of 128-bit lane shuffles).
GROKALIGN_AVX512_INLINE void transpose_block(const float* src, int64_t ld, float* dst, int64_t ldd) {
  __m512 r[16], t[16];
  for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_ps(src + j * ld);
  for (int j = 0; j < 16; j += 2) {  // per 128-bit lane l: t[j] = (r_j, r_j+1) at 4l, 4l + 1; t[j+1] at 4l + 2, 4l + 3
    t[j] = _mm512_mask_unpacklo_ps(r[j], __mmask16(0xFFFF), r[j], r[j + 1]);
    t[j + 1] = _mm512_mask_unpackhi_ps(r[j], __mmask16(0xFFFF), r[j], r[j + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // r[4g + i]: rows 4g .. 4g + 3 at column 4l + i of lane l
    r[4 * g + 0] = within128<0x44>(t[4 * g], t[4 * g + 2]);
    r[4 * g + 1] = within128<0xEE>(t[4 * g], t[4 * g + 2]);
    r[4 * g + 2] = within128<0x44>(t[4 * g + 1], t[4 * g + 3]);
    r[4 * g + 3] = within128<0xEE>(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int i = 0; i < 4; ++i) {  // lanes of (groups 0, 1) and (groups 2, 3): columns i, 8 + i / 4 + i, 12 + i
    t[i] = lanes128<0x88>(r[i], r[4 + i]);
    t[4 + i] = lanes128<0xDD>(r[i], r[4 + i]);
    t[8 + i] = lanes128<0x88>(r[8 + i], r[12 + i]);
    t[12 + i] = lanes128<0xDD>(r[8 + i], r[12 + i]);
  }
  for (int i = 0; i < 4; ++i) {  // columns i, 8 + i, 4 + i, 12 + i: all 16 rows each
    _mm512_storeu_ps(dst + i * ldd, lanes128<0x88>(t[i], t[8 + i]));
    _mm512_storeu_ps(dst + (8 + i) * ldd, lanes128<0xDD>(t[i], t[8 + i]));
    _mm512_storeu_ps(dst + (4 + i) * ldd, lanes128<0x88>(t[4 + i], t[12 + i]));
    _mm512_storeu_ps(dst + (12 + i) * ldd, lanes128<0xDD>(t[4 + i], t[12 + i]));
  }
}

// The double block: the same steps on 64-bit entries (pairs of floats: the float shuffles move them
// as the double ones would).
GROKALIGN_AVX512_INLINE void transpose_block(const double* src, int64_t ld, double* dst, int64_t ldd) {
  __m512 r[8], t[8];
  for (int j = 0; j < 8; ++j) r[j] = _mm512_castpd_ps(_mm512_loadu_pd(src + j * ld));
  for (int j = 0; j < 8; j += 2) {  // per 128-bit lane l: t[j] = (r_j, r_j+1) at column 2l, t[j+1] at 2l + 1
    t[j] = within128<0x44>(r[j], r[j + 1]);
    t[j + 1] = within128<0xEE>(r[j], r[j + 1]);
  }
  for (int i = 0; i < 2; ++i) {  // rows (0-3) and (4-7) of columns i, 4 + i (0x88) and 2 + i, 6 + i (0xDD)
    r[i] = lanes128<0x88>(t[i], t[2 + i]);
    r[2 + i] = lanes128<0xDD>(t[i], t[2 + i]);
    r[4 + i] = lanes128<0x88>(t[4 + i], t[6 + i]);
    r[6 + i] = lanes128<0xDD>(t[4 + i], t[6 + i]);
  }
  for (int i = 0; i < 2; ++i) {
    _mm512_storeu_pd(dst + i * ldd, _mm512_castps_pd(lanes128<0x88>(r[i], r[4 + i])));
    _mm512_storeu_pd(dst + (4 + i) * ldd, _mm512_castps_pd(lanes128<0xDD>(r[i], r[4 + i])));
    _mm512_storeu_pd(dst + (2 + i) * ldd, _mm512_castps_pd(lanes128<0x88>(r[2 + i], r[6 + i])));
    _mm512_storeu_pd(dst + (6 + i) * ldd, _mm512_castps_pd(lanes128<0xDD>(r[2 + i], r[6 + i])));
  }
}

constexpr int kMR = 8;             // rows of a C tile
constexpr int kNV = 2;             // vectors across a C tile
constexpr int64_t kKC = 256;       // rows of B packed at a time
constexpr int64_t kNCVectors = 32; // columns of B packed at a time, in vectors (512 floats, 256 doubles)

template <typename T>
constexpr int64_t nr() {
  return kNV * Vec<T>::lanes;
}

// C[0:mv, 0:nv] = alpha sum_k a(r, k) bp[k][:] + beta C, for the tile's rows r < mv and columns < nv;
// a(r, k) = a[r ars + k acs]; bp: the packed [K][NR] sliver.
template <typename T>
GROKALIGN_AVX512_INLINE void tile(int64_t K, const T* a, int64_t ars, int64_t acs, const T* bp, T* c, int64_t ldc,
                                  T alpha, T beta, int64_t mv, int64_t nv) {
  using V = Vec<T>;
  constexpr int L = V::lanes, NR = kNV * L;
  typename V::reg acc[kMR][kNV];
  for (int r = 0; r < kMR; ++r)
    for (int v = 0; v < kNV; ++v) acc[r][v] = V::zero();
  for (int64_t k = 0; k < K; ++k) {
    typename V::reg b[kNV];
    for (int v = 0; v < kNV; ++v) b[v] = V::load(bp + k * NR + v * L);
    const T* ak = a + k * acs;
    for (int r = 0; r < kMR; ++r) {
      const typename V::reg ar = V::set1(ak[r * ars]);
      for (int v = 0; v < kNV; ++v) acc[r][v] = V::fmadd(ar, b[v], acc[r][v]);
    }
  }
  const typename V::reg va = V::set1(alpha), vb = V::set1(beta);
  for (int r = 0; r < kMR && r < mv; ++r) {
    T* cr = c + r * ldc;
    for (int v = 0; v < kNV; ++v) {
      const int64_t left = nv - int64_t(v) * L;
      if (left <= 0) break;
      const auto m = static_cast<typename V::mask>(left >= L ? (1u << L) - 1 : (1u << left) - 1);
      typename V::reg x = V::mul(va, acc[r][v]);
      if (beta != T(0)) x = V::fmadd(vb, V::load(m, cr + v * L), x);
      V::store(cr + v * L, m, x);
    }
  }
}

// Packs B's rows [0, K) and columns [0, N) (entry (k, j) at b[k bks + j bjs]) as slivers of NR
// columns, [ceil(N / NR)][K][NR], the last one zero-padded.
template <typename T>
GROKALIGN_AVX512 void pack_b(const T* b, int64_t bks, int64_t bjs, int64_t K, int64_t N, T* out) {
  constexpr int64_t NR = nr<T>();
  for (int64_t j0 = 0; j0 < N; j0 += NR) {
    const int64_t nj = std::min(NR, N - j0);
    T* o = out + (j0 / NR) * K * NR;
    int64_t k = 0;
    if (bjs != 1 && bks == 1 && nj == NR) {  // a transposed B, whole sliver: L x L blocks in registers
      constexpr int64_t L = Vec<T>::lanes;
      for (; k + L <= K; k += L)
        for (int64_t v = 0; v < kNV; ++v) transpose_block(b + (j0 + v * L) * bjs + k, bjs, o + k * NR + v * L, NR);
    }
    for (; k < K; ++k) {
      const T* src = b + k * bks + j0 * bjs;
      T* ok = o + k * NR;
      if (bjs == 1) {
        for (int64_t j = 0; j < nj; ++j) ok[j] = src[j];
      } else if (nj == NR) {  // a transposed B: one entry from each of NR stored rows
        for (int64_t j = 0; j < NR; ++j) ok[j] = src[j * bjs];
      } else {
        for (int64_t j = 0; j < nj; ++j) ok[j] = src[j * bjs];
      }
      for (int64_t j = nj; j < NR; ++j) ok[j] = T(0);
    }
  }
}

// C[M, N] = alpha A B + beta C, row-major C with leading dimension ldc; A's entry (i, k) at
// a[i ars + k acs], B's entry (k, j) at b[k bks + j bjs]. K >= 1. With beta = 0, C is not read.
template <typename T>
GROKALIGN_AVX512 void gemm(T* c, int64_t ldc, int64_t M, int64_t N, int64_t K, const T* a, int64_t ars, int64_t acs,
                           const T* b, int64_t bks, int64_t bjs, T alpha, T beta) {
  constexpr int64_t NR = nr<T>(), NC = kNCVectors * Vec<T>::lanes;
  thread_local std::vector<T> packed;
  thread_local std::vector<T> edge;
  if (packed.size() < static_cast<size_t>(kKC * NC)) packed.resize(kKC * NC);
  if (edge.size() < static_cast<size_t>(kKC * kMR)) edge.resize(kKC * kMR);
  for (int64_t jc = 0; jc < N; jc += NC) {
    const int64_t nc = std::min(NC, N - jc);
    for (int64_t pc = 0; pc < K; pc += kKC) {
      const int64_t kc = std::min(kKC, K - pc);
      const T beta_pc = pc == 0 ? beta : T(1);  // later K blocks accumulate onto the first's result
      pack_b(b + pc * bks + jc * bjs, bks, bjs, kc, nc, packed.data());
      // The last mv < MR rows of A are read from a zero-padded copy ([kc][MR]), as a tile reads MR rows.
      const int64_t M_full = M - M % kMR, mv = M - M_full;
      for (int64_t k = 0; k < kc && mv > 0; ++k)
        for (int64_t r = 0; r < kMR; ++r) edge[k * kMR + r] = r < mv ? a[(M_full + r) * ars + (pc + k) * acs] : T(0);
      for (int64_t jr = 0; jr < nc; jr += NR) {
        const T* bp = packed.data() + (jr / NR) * kc * NR;
        const int64_t nv = std::min(NR, nc - jr);
        T* cj = c + jc + jr;
        for (int64_t ir = 0; ir < M_full; ir += kMR) {
          tile<T>(kc, a + ir * ars + pc * acs, ars, acs, bp, cj + ir * ldc, ldc, alpha, beta_pc, kMR, nv);
        }
        if (mv > 0) tile<T>(kc, edge.data(), 1, kMR, bp, cj + M_full * ldc, ldc, alpha, beta_pc, mv, nv);
      }
    }
  }
}

}  // namespace avx512
}  // namespace blas
}  // namespace grokalign

#else
#define GROKALIGN_AVX512_GEMM 0
#endif
