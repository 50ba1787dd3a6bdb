// CPU kernels of grokalign::attention_jvp and grokalign::attention_jvp_backward (schemas in
// csrc/grokalign.cpp; the math and its notation: grokalign_fast/ops/attention_jvp/reference.py).
//
// Blockwise (flash-style): the [T, S] score matrix is never formed. Work is cut into query blocks of
// kBlockQ rows and key blocks of kBlockK rows; a block pair's scores live in scratch buffers of
// O(kBlockQ * kBlockK * P) per thread, so the extra memory is that plus the per-row statistics,
// the re-laid-out tangents and the gradients: linear in T and S.
//
// Layouts. The primal rows as given, B and H merged: q [BH, T, d], k [BH, S, d], v [BH, S, dv],
// g_o [BH, T, dv]. The probes' rows interleaved: q_t as [BH, T, P, d] (row (i, p) is probe p's query
// row i), likewise k_t, v_t, g_t = grad_o_t, o_t and the tangents' gradients (converted on entry and
// exit). Then the rows of all probes of a block form one matrix: [nq P, d] with rows (i, p), or, read
// as [nq, P d], one row per query. So a block pair takes 6 GEMMs (forward) and 15 (backward) for any
// P, each with a P times larger dimension where probes enter, instead of 2 + 4P and 5 + 10P small
// ones (at P = 4: 4x fewer GEMM calls, ~10% more GFLOP/s each).
//
// Forward, per (b, h, query block): an online softmax over the key blocks (running row maximum m_i
// and normaliser l_i, shared by all P probes) accumulates, unnormalised and rescaled by
// exp(m_old - m_new) whenever the maximum grows,
//     l_i = sum_j p_ij,  o_i = sum_j p_ij v_j,
//     per probe  mu_i = sum_j p_ij s_t,ij,  o_t,i = sum_j p_ij (s_t,ij v_j + v_t,j);
// at the end o = o / l, mu = mu / l, o_t = o_t / l - mu o, lse = m + log l.
//
// Backward (without a cotangent for o, as when the caller takes o_t only, the two GEMMs with g_o are
// skipped): first the per-row scalars og_i = o_i . g_t,i (per probe) and
// D_i = o_i . g_o,i + sum_probes (o_t,i . g_t,i - mu_i og_i); then per block pair p is recomputed
// from lse (p_ij = exp(c q_i . k_j - lse_i)) and the gradients of reference.py are accumulated:
// key-side grads (g_k, g_v, g_kt, g_vt) into the rows of the key block, query-side grads (g_q, g_qt)
// into the rows of the query block. Races: a task owns (b, h, a set of key blocks) and visits every
// query block for each of them, so it is the only writer of its key blocks' rows; the query-side
// grads of one (b, h) are summed by several tasks, so each task writes its own copy (one per key-block
// chunk, `chunks` of them, round-robin over the key blocks so that causal work is balanced), and
// the copies are summed at the end. chunks = ceil(threads / (B H)) (at most the number of key
// blocks): with B H >= threads there is one copy and no reduction.
//
// The GEMMs are blas::gemm calls on raw pointers (csrc/cpu/blas.h): an AVX-512 kernel where the CPU
// has AVX-512F (on the AMD EPYC measured, 2.0-2.5x MKL's sgemm on these block shapes: MKL runs its
// AVX2 kernels there), else the BLAS libtorch links. Either way, no dispatcher per GEMM: a call issues
// thousands of them, ~5-10 us each. Causal block pairs stop at the last key their query rows see, in
// the backward as in the forward. The score passes (running maximum, exp, row sums) and the
// per-probe passes are SIMD loops (simd_math::exp for float).
// Half and bfloat16 inputs are converted to float first; everything is computed in acc_t (float, or
// double for double) and o, o_t and the input gradients converted back to the inputs' dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/attention_jvp.h"
#include "cpu/blas.h"
#include "cpu/simd_math.h"

namespace grokalign {
namespace attention_jvp {
namespace {

using at::Tensor;

// Block sizes: a score block is 64 x 128 (32 KiB in float). With the AVX-512 GEMM, 128 x 128,
// 64 x 256 and 128 x 64 were within 5% at T = S = 1024 (d = 64, P = 1 and 4, two threads) and
// 8-40% slower on GPT's causal T = 256 heads; 64 query rows give more tasks to short sequences.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 128;

using blas::gemm;
using blas::rm;
using blas::tr;

int64_t blocks(int64_t n, int64_t b) { return (n + b - 1) / b; }

// Keys of the block [j0, j0 + nk) visible to query row i: all, or (causal: j <= i) the first
// clamp(i - j0 + 1, 0, nk).
int64_t visible(bool causal, int64_t i, int64_t j0, int64_t nk) {
  return causal ? std::clamp<int64_t>(i - j0 + 1, 0, nk) : nk;
}

// The elementwise passes over a block row, as SIMD loops on restrict pointers (SIMD_TARGETS,
// csrc/cpu/simd_math.h; written inline in the task lambdas they compiled to scalar code). r points at
// probe p's entry of key 0 in R's row [(j, p)], so its entries are P apart.

// Forward, probe p of query row i: row = p c (row + r) (row: q_t k^T, becomes p s_t); returns its sum.
template <typename T>
SIMD_TARGETS T forward_probe_row(const T* __restrict__ prow, const T* __restrict__ r, T* __restrict__ row, int64_t nk,
                                 int64_t P, T c) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < nk; ++j) {
    row[j] = prow[j] * c * (row[j] + r[j * P]);
    sum += row[j];
  }
  return sum;
}

// Backward, probe p of query row i (file comment's formulas; s_t = c (srow + r), a = arow):
// gprow += (s_t - mu) a - s_t og; arow, r := p (a - og) (g_st, both layouts); srow := p (s_t - mu).
template <typename T>
SIMD_TARGETS void backward_probe_row(const T* __restrict__ prow, T* __restrict__ srow, T* __restrict__ arow,
                                     T* __restrict__ r, T* __restrict__ gprow, int64_t nk, int64_t P, T c, T mu,
                                     T og) {
#pragma omp simd
  for (int64_t j = 0; j < nk; ++j) {
    const T st = c * (srow[j] + r[j * P]), av = arow[j];
    const T gst = prow[j] * (av - og);
    gprow[j] += (st - mu) * av - st * og;
    arow[j] = gst;
    r[j * P] = gst;
    srow[j] = prow[j] * (st - mu);
  }
}

// Backward: gprow = p (gprow + y - D) (g_s from g_p, the v_t . g_t terms y and D).
template <typename T>
SIMD_TARGETS void backward_score_row(const T* __restrict__ prow, const T* __restrict__ y, T* __restrict__ gprow,
                                     int64_t nk, T D) {
#pragma omp simd
  for (int64_t j = 0; j < nk; ++j) gprow[j] = prow[j] * (gprow[j] + y[j] - D);
}

// exp in the score passes: simd_math::exp for float (inlined, so the row loops vectorise; relative
// error 8.3e-8), libm's for double.
inline float score_exp(float x) { return simd_math::exp(x); }
inline double score_exp(double x) { return std::exp(x); }

// Forward, the score block p [nq, nk] (q k^T of query rows i0.. and keys j0..) into the online
// softmax: per row, the running maximum m grows to mx = max(m, c p_j) over the visible keys,
// alpha = exp(m_old - mx) is the rescale of the running sums, p_j := exp(c p_j - mx) (0 where
// masked), and l := l alpha + sum_j p_j. For float, run inside simd_math::dispatch.
template <typename T>
inline void forward_scores(T* __restrict__ p, int64_t nq, int64_t nk, int64_t i0, int64_t j0, bool causal, T c,
                           T* __restrict__ m, T* __restrict__ l, T* __restrict__ alpha) {
  for (int64_t i = 0; i < nq; ++i) {
    T* __restrict__ row = p + i * nk;
    const int64_t vis = visible(causal, i0 + i, j0, nk);
    T mx = m[i];
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < vis; ++j) mx = std::max(mx, c * row[j]);
    // The first key block holds key 0, visible to every row, so mx is finite from then on.
    alpha[i] = std::exp(m[i] - mx);
    m[i] = mx;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < vis; ++j) {
      const T e = score_exp(c * row[j] - mx);
      row[j] = e;
      sum += e;
    }
    for (int64_t j = vis; j < nk; ++j) row[j] = 0;
    l[i] = l[i] * alpha[i] + sum;
  }
}

// Backward, the score block p [nq, nk] recomputed: p_j := exp(c p_j - lse_i), 0 where masked.
template <typename T>
inline void backward_scores(T* __restrict__ p, int64_t nq, int64_t nk, int64_t i0, int64_t j0, bool causal, T c,
                            const T* __restrict__ lse) {
  for (int64_t i = 0; i < nq; ++i) {
    T* __restrict__ row = p + i * nk;
    const int64_t vis = visible(causal, i0 + i, j0, nk);
    const T shift = lse[i];
#pragma omp simd
    for (int64_t j = 0; j < vis; ++j) row[j] = score_exp(c * row[j] - shift);
    for (int64_t j = vis; j < nk; ++j) row[j] = 0;
  }
}

// Runs f() under simd_math::dispatch for float (AVX2 + FMA where the CPU has them), directly for double.
template <typename T, typename F>
void run_scores(F&& f) {
  if constexpr (std::is_same_v<T, float>) {
    simd_math::dispatch(f);
  } else {
    f();
  }
}

// Forward's inputs and outputs in acc_t, contiguous, in the layouts of the file comment:
// q [BH, T, d], k [BH, S, d], v [BH, S, dv], qt [BH, T, P, d], kt [BH, S, P, d], vt [BH, S, P, dv];
// o [BH, T, dv], ot [BH, T, P, dv], lse [BH, T], mu [P, BH, T].
template <typename acc_t>
struct Fwd {
  const acc_t *q, *k, *v, *qt, *kt, *vt;
  acc_t *o, *ot, *lse, *mu;
};

template <typename acc_t>
void forward_kernel(const Dims& n, bool causal, acc_t c, const Fwd<acc_t>& a) {
  const int64_t BH = n.BH(), T = n.T, S = n.S, d = n.d, dv = n.dv, P = n.P;
  const int64_t Pd = P * d, Pdv = P * dv;
  const int64_t nqb = blocks(T, kBlockQ);
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t one = 1, zero = 0;
  at::parallel_for(0, BH * nqb, 1, [&](int64_t task0, int64_t task1) {
    // p [nq, nk]; q_t k^T then p s_t [(i, p), j]; q k_t^T [i, (j, p)].
    std::vector<acc_t> p_buf(kBlockQ * kBlockK), st_buf(kBlockQ * P * kBlockK), r_buf(kBlockQ * kBlockK * P);
    std::vector<acc_t> m(kBlockQ), l(kBlockQ), alpha(kBlockQ), mu(kBlockQ * P);
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t bh = task / nqb, i0 = (task % nqb) * kBlockQ, nq = std::min(kBlockQ, T - i0);
      const acc_t* q = a.q + (bh * T + i0) * d;
      const acc_t* qt = a.qt + (bh * T + i0) * Pd;
      acc_t* o = a.o + (bh * T + i0) * dv;
      acc_t* ot = a.ot + (bh * T + i0) * Pdv;  // rows (i, p), or read as [nq, P dv]: one row per query
      std::fill(o, o + nq * dv, acc_t(0));
      std::fill(ot, ot + nq * Pdv, acc_t(0));
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), acc_t(0));
      std::fill(mu.begin(), mu.end(), acc_t(0));
      // Causal: keys beyond the block's last row are masked for all of its rows.
      const int64_t S_end = causal ? std::min(S, i0 + nq) : S;
      for (int64_t j0 = 0; j0 < S_end; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, S_end - j0);
        const acc_t* k = a.k + (bh * S + j0) * d;
        const acc_t* kt = a.kt + (bh * S + j0) * Pd;
        const acc_t* v = a.v + (bh * S + j0) * dv;
        const acc_t* vt = a.vt + (bh * S + j0) * Pdv;
        // s = c q k^T; the running maximum; p = exp(s - m_new) (0 where masked); l and the other
        // running sums rescaled to the new maximum.
        gemm(p_buf.data(), nk, rm(q, nq, d), tr(k, nk, d), one, zero);
        run_scores<acc_t>([&] { forward_scores(p_buf.data(), nq, nk, i0, j0, causal, c, m.data(), l.data(), alpha.data()); });
        for (int64_t i = 0; i < nq; ++i) {
          for (int64_t e = 0; e < dv; ++e) o[i * dv + e] *= alpha[i];
          for (int64_t e = 0; e < Pdv; ++e) ot[i * Pdv + e] *= alpha[i];
          for (int64_t p = 0; p < P; ++p) mu[i * P + p] *= alpha[i];
        }
        // s_t / c = q_t k^T + q k_t^T: St = q_t k^T [(i, p), j], R = q k_t^T [i, (j, p)]; then
        // St := p s_t (0 where masked, as p is) and mu += sum_j p s_t.
        gemm(st_buf.data(), nk, rm(qt, nq * P, d), tr(k, nk, d), one, zero);
        gemm(r_buf.data(), nk * P, rm(q, nq, d), tr(kt, nk * P, d), one, zero);
        for (int64_t i = 0; i < nq; ++i) {
          const acc_t* prow = p_buf.data() + i * nk;
          const acc_t* rrow = r_buf.data() + i * nk * P;
          for (int64_t p = 0; p < P; ++p) {
            mu[i * P + p] += forward_probe_row(prow, rrow + p, st_buf.data() + (i * P + p) * nk, nk, P, c);
          }
        }
        gemm(o, dv, rm(p_buf.data(), nq, nk), rm(v, nk, dv), one, one);                // o += p v
        gemm(ot, dv, rm(st_buf.data(), nq * P, nk), rm(v, nk, dv), one, one);          // o_t += (p s_t) v
        gemm(ot, Pdv, rm(p_buf.data(), nq, nk), rm(vt, nk, Pdv), one, one);            // o_t += p v_t
      }
      // Normalise: o = o / l, mu = mu / l, o_t = o_t / l - mu o, lse = m + log l.
      for (int64_t i = 0; i < nq; ++i) {
        const acc_t inv = acc_t(1) / l[i];
        for (int64_t e = 0; e < dv; ++e) o[i * dv + e] *= inv;
        a.lse[bh * T + i0 + i] = m[i] + std::log(l[i]);
        for (int64_t p = 0; p < P; ++p) {
          const acc_t mu_ip = mu[i * P + p] * inv;
          a.mu[(p * BH + bh) * T + i0 + i] = mu_ip;
          acc_t* row = ot + (i * P + p) * dv;
          for (int64_t e = 0; e < dv; ++e) row[e] = row[e] * inv - mu_ip * o[i * dv + e];
        }
      }
    }
  });
}

// The backward's inputs in acc_t, contiguous, laid out as Fwd's (go [BH, T, dv], gt [BH, T, P, dv]);
// og [P, BH, T] and D [BH, T] are the per-row scalars (file comment). Outputs: gq [chunks, BH, T, d]
// and gqt [chunks, BH, T, P, d] (one copy per key-block chunk, zeroed), gk [BH, S, d], gv [BH, S, dv],
// gkt [BH, S, P, d], gvt [BH, S, P, dv] (written whole).
template <typename acc_t>
struct Bwd {
  const acc_t *q, *k, *v, *qt, *kt, *vt, *go, *gt, *lse, *mu, *og, *D;
  acc_t *gq, *gqt, *gk, *gv, *gkt, *gvt;
};

template <typename acc_t>
void backward_kernel(const Dims& n, bool causal, acc_t c, int64_t chunks, bool has_go, const Bwd<acc_t>& a) {
  const int64_t BH = n.BH(), T = n.T, S = n.S, d = n.d, dv = n.dv, P = n.P;
  const int64_t Pd = P * d, Pdv = P * dv;
  const int64_t nkb = blocks(S, kBlockK);
  const acc_t one = 1, zero = 0;
  at::parallel_for(0, BH * chunks, 1, [&](int64_t task0, int64_t task1) {
    // p, g_p then g_s, and sum_probes g_t . v_t [nq, nk]; q_t k^T then p (s_t - mu), and g_t v^T then
    // g_st [(i, p), j]; q k_t^T then g_st [i, (j, p)].
    const int64_t block = kBlockQ * kBlockK;
    std::vector<acc_t> p_buf(block), gp_buf(block), y_buf(block), st_buf(block * P), a_buf(block * P),
        r_buf(block * P);
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t bh = task / chunks, chunk = task % chunks;
      acc_t* gq = a.gq + (chunk * BH + bh) * T * d;
      acc_t* gqt = a.gqt + (chunk * BH + bh) * T * Pd;
      for (int64_t kb = chunk; kb < nkb; kb += chunks) {
        const int64_t j0 = kb * kBlockK, nk = std::min(kBlockK, S - j0);
        const acc_t* k = a.k + (bh * S + j0) * d;
        const acc_t* kt = a.kt + (bh * S + j0) * Pd;
        const acc_t* v = a.v + (bh * S + j0) * dv;
        const acc_t* vt = a.vt + (bh * S + j0) * Pdv;
        acc_t* gk = a.gk + (bh * S + j0) * d;
        acc_t* gv = a.gv + (bh * S + j0) * dv;
        acc_t* gkt = a.gkt + (bh * S + j0) * Pd;   // rows (j, p)
        acc_t* gvt = a.gvt + (bh * S + j0) * Pdv;  // rows (j, p), or one row per key
        std::fill(gk, gk + nk * d, acc_t(0));
        std::fill(gv, gv + nk * dv, acc_t(0));
        std::fill(gkt, gkt + nk * Pd, acc_t(0));
        std::fill(gvt, gvt + nk * Pdv, acc_t(0));
        // Causal: query rows before j0 see none of the block's keys.
        const int64_t first_q = causal ? (j0 / kBlockQ) * kBlockQ : 0;
        for (int64_t i0 = first_q; i0 < T; i0 += kBlockQ) {
          const int64_t nq = std::min(kBlockQ, T - i0);
          // Causal: the block's keys after the query block's last row are masked for all of its rows,
          // so the pair works on the first ns of them only (as the forward does).
          const int64_t ns = causal ? std::min(nk, i0 + nq - j0) : nk;
          const acc_t* q = a.q + (bh * T + i0) * d;
          const acc_t* qt = a.qt + (bh * T + i0) * Pd;
          const acc_t* go = a.go + (bh * T + i0) * dv;
          const acc_t* gt = a.gt + (bh * T + i0) * Pdv;  // rows (i, p), or one row per query
          acc_t* gqb = gq + i0 * d;
          acc_t* gqtb = gqt + i0 * Pd;  // rows (i, p)
          // p = exp(c q k^T - lse), 0 where masked.
          gemm(p_buf.data(), ns, rm(q, nq, d), tr(k, ns, d), one, zero);
          run_scores<acc_t>([&] { backward_scores(p_buf.data(), nq, ns, i0, j0, causal, c, a.lse + bh * T + i0); });
          // Gp = g_o v^T, Y = sum_probes g_t v_t^T (one GEMM over the [nq, P dv] rows),
          // St = q_t k^T, A = g_t v^T [(i, p), j], R = q k_t^T [i, (j, p)].
          acc_t *pb = p_buf.data(), *gpb = gp_buf.data(), *yb = y_buf.data();
          acc_t *stb = st_buf.data(), *ab = a_buf.data(), *rb = r_buf.data();
          if (has_go) {
            gemm(gpb, ns, rm(go, nq, dv), tr(v, ns, dv), one, zero);
          } else {
            std::fill(gpb, gpb + nq * ns, acc_t(0));  // no cotangent for o (its caller uses o_t only)
          }
          gemm(yb, ns, rm(gt, nq, Pdv), tr(vt, ns, Pdv), one, zero);
          gemm(stb, ns, rm(qt, nq * P, d), tr(k, ns, d), one, zero);
          gemm(ab, ns, rm(gt, nq * P, dv), tr(v, ns, dv), one, zero);
          gemm(rb, ns * P, rm(q, nq, d), tr(kt, ns * P, d), one, zero);
          // Per probe, with s_t = c (St + R), a = A:
          //   g_p += (s_t - mu) a + v_t . g_t - s_t (o . g_t)   (the v_t . g_t terms are Y)
          //   g_st = p (a - o . g_t)  into A and R (both layouts);  p (s_t - mu) into St;
          // then g_s = p (g_p - D) into Gp.
          for (int64_t i = 0; i < nq; ++i) {
            const acc_t* prow = pb + i * ns;
            acc_t* gprow = gpb + i * ns;
            acc_t* rrow = rb + i * ns * P;
            for (int64_t p = 0; p < P; ++p) {
              const acc_t mu = a.mu[(p * BH + bh) * T + i0 + i], og = a.og[(p * BH + bh) * T + i0 + i];
              backward_probe_row(prow, stb + (i * P + p) * ns, ab + (i * P + p) * ns, rrow + p, gprow, ns, P, c, mu, og);
            }
            backward_score_row(prow, yb + i * ns, gprow, ns, a.D[bh * T + i0 + i]);
          }
          if (has_go) gemm(gv, dv, tr(pb, nq, ns), rm(go, nq, dv), one, one);  // g_v += p^T g_o
          gemm(gv, dv, tr(stb, nq * P, ns), rm(gt, nq * P, dv), one, one);      //   + (p (s_t - mu))^T g_t
          gemm(gvt, Pdv, tr(pb, nq, ns), rm(gt, nq, Pdv), one, one);            // g_vt += p^T g_t
          gemm(gqb, d, rm(gpb, nq, ns), rm(k, ns, d), c, one);                  // g_q += c g_s k
          gemm(gqb, d, rm(rb, nq, ns * P), rm(kt, ns * P, d), c, one);          //   + c g_st k_t
          gemm(gqtb, d, rm(ab, nq * P, ns), rm(k, ns, d), c, one);              // g_qt += c g_st k
          gemm(gk, d, tr(gpb, nq, ns), rm(q, nq, d), c, one);                   // g_k += c g_s^T q
          gemm(gk, d, tr(ab, nq * P, ns), rm(qt, nq * P, d), c, one);           //   + c g_st^T q_t
          gemm(gkt, d, tr(rb, nq, ns * P), rm(q, nq, d), c, one);               // g_kt += c g_st^T q
        }
      }
    }
  });
}

Tensor to_acc(const Tensor& x) { return x.to(acc_dtype(x.scalar_type())).contiguous(); }

// A contiguous copy of x in dtype (one pass, whatever x's strides).
Tensor copy_as(const Tensor& x, at::ScalarType dtype) {
  return at::empty(x.sizes(), x.options().dtype(dtype)).copy_(x);
}
// A tangent-like [P, B, H, R, w] as [B, H, R, P, w] in acc_t (the interleaved layout), and back.
Tensor interleave(const Tensor& x) { return copy_as(x.permute({1, 2, 3, 0, 4}), acc_dtype(x.scalar_type())); }
Tensor deinterleave(const Tensor& x, at::ScalarType dtype) { return copy_as(x.permute({3, 0, 1, 2, 4}), dtype); }

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_jvp_cpu(const Tensor& q_in, const Tensor& k_in,
                                                             const Tensor& v_in, const Tensor& qt_in,
                                                             const Tensor& kt_in, const Tensor& vt_in, bool causal,
                                                             double scale) {
  const Dims n = check_inputs("attention_jvp", q_in, k_in, v_in, qt_in, kt_in, vt_in, scale);
  const Tensor q = to_acc(q_in), k = to_acc(k_in), v = to_acc(v_in);
  const Tensor qt = interleave(qt_in), kt = interleave(kt_in), vt = interleave(vt_in);
  Tensor o = at::empty({n.B, n.H, n.T, n.dv}, q.options());
  Tensor ot = at::empty({n.B, n.H, n.T, n.P, n.dv}, q.options());
  Tensor lse = at::empty({n.B, n.H, n.T}, q.options());
  Tensor mu = at::empty({n.P, n.B, n.H, n.T}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_jvp_cpu", [&] {
    const Fwd<scalar_t> a{q.const_data_ptr<scalar_t>(),  k.const_data_ptr<scalar_t>(),
                          v.const_data_ptr<scalar_t>(),  qt.const_data_ptr<scalar_t>(),
                          kt.const_data_ptr<scalar_t>(), vt.const_data_ptr<scalar_t>(),
                          o.data_ptr<scalar_t>(),        ot.data_ptr<scalar_t>(),
                          lse.data_ptr<scalar_t>(),      mu.data_ptr<scalar_t>()};
    forward_kernel<scalar_t>(n, causal, static_cast<scalar_t>(scale), a);
  });
  const auto dtype = q_in.scalar_type();
  return {o.to(dtype), deinterleave(ot, dtype), lse, mu};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> attention_jvp_backward_cpu(
    const std::optional<Tensor>& grad_o, const std::optional<Tensor>& grad_o_t, const Tensor& q_in,
    const Tensor& k_in, const Tensor& v_in, const Tensor& qt_in, const Tensor& kt_in, const Tensor& vt_in,
    const Tensor& o_in, const Tensor& ot_in, const Tensor& lse_in, const Tensor& mu_in, bool causal, double scale) {
  const Dims n = check_inputs("attention_jvp_backward", q_in, k_in, v_in, qt_in, kt_in, vt_in, scale);
  check_saved(n, q_in, grad_o, grad_o_t, o_in, ot_in, lse_in, mu_in);
  const Tensor q = to_acc(q_in), k = to_acc(k_in), v = to_acc(v_in);
  const Tensor qt = interleave(qt_in), kt = interleave(kt_in), vt = interleave(vt_in);
  const Tensor lse = lse_in.contiguous(), mu = mu_in.contiguous();
  const Tensor go = to_acc(grad_or_zeros(grad_o, o_in)), gt_in = grad_or_zeros(grad_o_t, ot_in);
  const Tensor gt = interleave(gt_in);
  Tensor og, D;
  std::tie(og, D) = row_scalars(o_in, ot_in, go, gt_in, mu);

  const int64_t BH = n.BH();
  const int64_t chunks =
      std::clamp<int64_t>(blocks(at::get_num_threads(), std::max<int64_t>(BH, 1)), 1, blocks(n.S, kBlockK));
  Tensor gq = at::zeros({chunks, n.B, n.H, n.T, n.d}, q.options());
  Tensor gqt = at::zeros({chunks, n.B, n.H, n.T, n.P, n.d}, q.options());
  Tensor gk = at::empty_like(k), gv = at::empty_like(v), gkt = at::empty_like(kt), gvt = at::empty_like(vt);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_jvp_backward_cpu", [&] {
    const Bwd<scalar_t> a{q.const_data_ptr<scalar_t>(),   k.const_data_ptr<scalar_t>(),
                          v.const_data_ptr<scalar_t>(),   qt.const_data_ptr<scalar_t>(),
                          kt.const_data_ptr<scalar_t>(),  vt.const_data_ptr<scalar_t>(),
                          go.const_data_ptr<scalar_t>(),  gt.const_data_ptr<scalar_t>(),
                          lse.const_data_ptr<scalar_t>(), mu.const_data_ptr<scalar_t>(),
                          og.const_data_ptr<scalar_t>(),  D.const_data_ptr<scalar_t>(),
                          gq.data_ptr<scalar_t>(),        gqt.data_ptr<scalar_t>(),
                          gk.data_ptr<scalar_t>(),        gv.data_ptr<scalar_t>(),
                          gkt.data_ptr<scalar_t>(),       gvt.data_ptr<scalar_t>()};
    backward_kernel<scalar_t>(n, causal, static_cast<scalar_t>(scale), chunks, grad_o.has_value() && grad_o->defined(),
                              a);
  });
  const auto dtype = q_in.scalar_type();
  return {gq.sum(0).to(dtype),
          gk.to(dtype),
          gv.to(dtype),
          deinterleave(gqt.sum(0), dtype),
          deinterleave(gkt, dtype),
          deinterleave(gvt, dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, CPU, m) {
  m.impl("attention_jvp", &attention_jvp_cpu);
  m.impl("attention_jvp_backward", &attention_jvp_backward_cpu);
}

}  // namespace attention_jvp
}  // namespace grokalign
