// CPU kernels of grokalign::attention_jvp and grokalign::attention_jvp_backward (schemas in
// csrc/grokalign.cpp; the math and its notation: grokalign_fast/ops/attention_jvp/reference.py).
//
// Blockwise (flash-style): the [T, S] score matrix is never formed. Work is cut into query blocks of
// kBlockQ rows and key blocks of kBlockK rows; a block pair's scores live in a [kBlockQ, kBlockK]
// scratch buffer per thread, so the extra memory is O(kBlockQ * kBlockK) per thread plus the
// per-row statistics and gradients, linear in T and S.
//
// Forward, per (b, h, query block): an online softmax over the key blocks (running row maximum m_i
// and normaliser l_i, shared by all P probes) accumulates, unnormalised and rescaled by
// exp(m_old - m_new) whenever the maximum grows,
//     l_i = sum_j p_ij,  o_i = sum_j p_ij v_j,
//     per probe  mu_i = sum_j p_ij s_t,ij,  o_t,i = sum_j p_ij (s_t,ij v_j + v_t,j);
// at the end o = o / l, mu = mu / l, o_t = o_t / l - mu o, lse = m + log l.
//
// Backward: first the per-row scalars og_i = o_i . g_t,i (per probe) and
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
// The GEMMs of a block pair run through ATen (MKL) on views of the blocks: a 64 x 128 x 64 float
// GEMM runs at ~90 GFLOP/s on one core against ~60 for plain loops (and 4x less without -march).
// The exponentials go through at::exp_ (vectorised); the other elementwise passes are plain loops.
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

namespace grokalign {
namespace attention_jvp {
namespace {

using at::Tensor;

// Block sizes: a score block is 64 x 128 (32 KiB in float), so the scratch of a thread stays in L2.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 128;

int64_t blocks(int64_t n, int64_t b) { return (n + b - 1) / b; }

// The [rows, cols] row-major matrix at p (no copy, no ownership).
template <typename acc_t>
Tensor mat(const acc_t* p, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<acc_t*>(p), {rows, cols},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// Keys of the block [j0, j0 + nk) visible to query row i: all, or (causal: j <= i) the first
// clamp(i - j0 + 1, 0, nk).
int64_t visible(bool causal, int64_t i, int64_t j0, int64_t nk) {
  return causal ? std::clamp<int64_t>(i - j0 + 1, 0, nk) : nk;
}

// Inputs and outputs in acc_t, contiguous: q [BH, T, d], q_t [P, BH, T, d], ... (reference.py's
// shapes with B and H merged).
template <typename acc_t>
struct Fwd {
  const acc_t *q, *k, *v, *qt, *kt, *vt;
  acc_t *o, *ot, *lse, *mu;
};

template <typename acc_t>
void forward_kernel(const Dims& n, bool causal, acc_t c, const Fwd<acc_t>& a) {
  const int64_t BH = n.BH(), T = n.T, S = n.S, d = n.d, dv = n.dv, P = n.P;
  const int64_t nqb = blocks(T, kBlockQ);
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, BH * nqb, 1, [&](int64_t task0, int64_t task1) {
    std::vector<acc_t> s_buf(kBlockQ * kBlockK), st_buf(kBlockQ * kBlockK);
    std::vector<acc_t> m(kBlockQ), l(kBlockQ), alpha(kBlockQ);
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t bh = task / nqb, i0 = (task % nqb) * kBlockQ, nq = std::min(kBlockQ, T - i0);
      const Tensor Q = mat(a.q + (bh * T + i0) * d, nq, d);
      acc_t* o = a.o + (bh * T + i0) * dv;
      Tensor O = mat(o, nq, dv);
      O.zero_();
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), acc_t(0));
      for (int64_t p = 0; p < P; ++p) {
        mat(a.ot + ((p * BH + bh) * T + i0) * dv, nq, dv).zero_();
        std::fill_n(a.mu + (p * BH + bh) * T + i0, nq, acc_t(0));
      }
      // Causal: keys beyond the block's last row are masked for all of its rows.
      const int64_t S_end = causal ? std::min(S, i0 + nq) : S;
      for (int64_t j0 = 0; j0 < S_end; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, S_end - j0);
        const Tensor K = mat(a.k + (bh * S + j0) * d, nk, d);
        const Tensor V = mat(a.v + (bh * S + j0) * dv, nk, dv);
        // s = c q k^T; the running maximum; s - m_new (-inf where masked); p = exp(s - m_new).
        Tensor Pm = mat(s_buf.data(), nq, nk);
        at::mm_out(Pm, Q, K.t());
        for (int64_t i = 0; i < nq; ++i) {
          acc_t* row = s_buf.data() + i * nk;
          const int64_t vis = visible(causal, i0 + i, j0, nk);
          acc_t mx = m[i];
          for (int64_t j = 0; j < vis; ++j) mx = std::max(mx, c * row[j]);
          // The first key block holds key 0, visible to every row, so mx is finite from then on.
          alpha[i] = std::exp(m[i] - mx);
          m[i] = mx;
          for (int64_t j = 0; j < vis; ++j) row[j] = c * row[j] - mx;
          for (int64_t j = vis; j < nk; ++j) row[j] = kNegInf;
        }
        at::exp_(Pm);
        for (int64_t i = 0; i < nq; ++i) {
          const acc_t* row = s_buf.data() + i * nk;
          acc_t sum = 0;
          for (int64_t j = 0; j < nk; ++j) sum += row[j];
          l[i] = l[i] * alpha[i] + sum;
        }
        // Rescale the running sums to the new maximum, then add this block's terms.
        for (int64_t p = -1; p < P; ++p) {
          acc_t* rows = p < 0 ? o : a.ot + ((p * BH + bh) * T + i0) * dv;
          for (int64_t i = 0; i < nq; ++i) {
            for (int64_t e = 0; e < dv; ++e) rows[i * dv + e] *= alpha[i];
          }
        }
        at::addmm_out(O, O, Pm, V);
        Tensor St = mat(st_buf.data(), nq, nk);
        for (int64_t p = 0; p < P; ++p) {
          const int64_t qrow = (p * BH + bh) * T + i0, krow = (p * BH + bh) * S + j0;
          const Tensor Qt = mat(a.qt + qrow * d, nq, d);
          const Tensor Kt = mat(a.kt + krow * d, nk, d);
          const Tensor Vt = mat(a.vt + krow * dv, nk, dv);
          Tensor Ot = mat(a.ot + qrow * dv, nq, dv);
          // s_t = c (q_t k^T + q k_t^T); St := p * s_t (0 where masked, as p is).
          at::mm_out(St, Qt, K.t());
          at::addmm_out(St, St, Q, Kt.t());
          acc_t* mu = a.mu + qrow;
          for (int64_t i = 0; i < nq; ++i) {
            const acc_t* prow = s_buf.data() + i * nk;
            acc_t* row = st_buf.data() + i * nk;
            acc_t sum = 0;
            for (int64_t j = 0; j < nk; ++j) {
              row[j] = prow[j] * c * row[j];
              sum += row[j];
            }
            mu[i] = mu[i] * alpha[i] + sum;
          }
          // o_t += (p * s_t) v + p v_t
          at::addmm_out(Ot, Ot, St, V);
          at::addmm_out(Ot, Ot, Pm, Vt);
        }
      }
      // Normalise: o = o / l, mu = mu / l, o_t = o_t / l - mu o, lse = m + log l.
      for (int64_t i = 0; i < nq; ++i) {
        const acc_t inv = acc_t(1) / l[i];
        for (int64_t e = 0; e < dv; ++e) o[i * dv + e] *= inv;
        a.lse[bh * T + i0 + i] = m[i] + std::log(l[i]);
        for (int64_t p = 0; p < P; ++p) {
          const int64_t row = (p * BH + bh) * T + i0 + i;
          const acc_t mu = a.mu[row] * inv;
          a.mu[row] = mu;
          acc_t* ot = a.ot + row * dv;
          for (int64_t e = 0; e < dv; ++e) ot[e] = ot[e] * inv - mu * o[i * dv + e];
        }
      }
    }
  });
}

// The backward's inputs in acc_t, contiguous; og [P, BH, T] and D [BH, T] are the per-row scalars
// (file comment). Outputs: gq [chunks, BH, T, d] and gqt [chunks, P, BH, T, d] (one copy per key-block
// chunk, zeroed), gk, gv, gkt, gvt (written whole).
template <typename acc_t>
struct Bwd {
  const acc_t *q, *k, *v, *qt, *kt, *vt, *go, *gt, *lse, *mu, *og, *D;
  acc_t *gq, *gqt, *gk, *gv, *gkt, *gvt;
};

template <typename acc_t>
void backward_kernel(const Dims& n, bool causal, acc_t c, int64_t chunks, const Bwd<acc_t>& a) {
  const int64_t BH = n.BH(), T = n.T, S = n.S, d = n.d, dv = n.dv, P = n.P;
  const int64_t nkb = blocks(S, kBlockK);
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, BH * chunks, 1, [&](int64_t task0, int64_t task1) {
    std::vector<acc_t> p_buf(kBlockQ * kBlockK), gp_buf(kBlockQ * kBlockK), st_buf(kBlockQ * kBlockK),
        x_buf(kBlockQ * kBlockK), y_buf(kBlockQ * kBlockK);
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t bh = task / chunks, chunk = task % chunks;
      acc_t* gq = a.gq + (chunk * BH + bh) * T * d;
      for (int64_t kb = chunk; kb < nkb; kb += chunks) {
        const int64_t j0 = kb * kBlockK, nk = std::min(kBlockK, S - j0);
        const Tensor K = mat(a.k + (bh * S + j0) * d, nk, d);
        const Tensor V = mat(a.v + (bh * S + j0) * dv, nk, dv);
        Tensor GK = mat(a.gk + (bh * S + j0) * d, nk, d);
        Tensor GV = mat(a.gv + (bh * S + j0) * dv, nk, dv);
        GK.zero_();
        GV.zero_();
        for (int64_t p = 0; p < P; ++p) {
          mat(a.gkt + ((p * BH + bh) * S + j0) * d, nk, d).zero_();
          mat(a.gvt + ((p * BH + bh) * S + j0) * dv, nk, dv).zero_();
        }
        // Causal: query rows before j0 see none of the block's keys.
        const int64_t first_q = causal ? (j0 / kBlockQ) * kBlockQ : 0;
        for (int64_t i0 = first_q; i0 < T; i0 += kBlockQ) {
          const int64_t nq = std::min(kBlockQ, T - i0);
          const Tensor Q = mat(a.q + (bh * T + i0) * d, nq, d);
          const Tensor GO = mat(a.go + (bh * T + i0) * dv, nq, dv);
          Tensor GQ = mat(gq + i0 * d, nq, d);
          // p = exp(c q k^T - lse), 0 where masked.
          Tensor Pm = mat(p_buf.data(), nq, nk);
          at::mm_out(Pm, Q, K.t());
          for (int64_t i = 0; i < nq; ++i) {
            acc_t* row = p_buf.data() + i * nk;
            const acc_t lse = a.lse[bh * T + i0 + i];
            const int64_t vis = visible(causal, i0 + i, j0, nk);
            for (int64_t j = 0; j < vis; ++j) row[j] = c * row[j] - lse;
            for (int64_t j = vis; j < nk; ++j) row[j] = kNegInf;
          }
          at::exp_(Pm);
          // g_p = g_o v^T + (probe terms below); g_s = p (g_p - D) after them.
          Tensor Gp = mat(gp_buf.data(), nq, nk);
          at::mm_out(Gp, GO, V.t());
          Tensor St = mat(st_buf.data(), nq, nk);
          Tensor X = mat(x_buf.data(), nq, nk);
          Tensor Y = mat(y_buf.data(), nq, nk);
          for (int64_t p = 0; p < P; ++p) {
            const int64_t qrow = (p * BH + bh) * T + i0, krow = (p * BH + bh) * S + j0;
            const Tensor Qt = mat(a.qt + qrow * d, nq, d);
            const Tensor GT = mat(a.gt + qrow * dv, nq, dv);
            const Tensor Kt = mat(a.kt + krow * d, nk, d);
            const Tensor Vt = mat(a.vt + krow * dv, nk, dv);
            // s_t / c = q_t k^T + q k_t^T;  X = a = g_t v^T;  Y = g_t v_t^T.
            at::mm_out(St, Qt, K.t());
            at::addmm_out(St, St, Q, Kt.t());
            at::mm_out(X, GT, V.t());
            at::mm_out(Y, GT, Vt.t());
            const acc_t* mu = a.mu + qrow;
            const acc_t* og = a.og + qrow;
            for (int64_t i = 0; i < nq; ++i) {
              const acc_t* prow = p_buf.data() + i * nk;
              const acc_t* srow = st_buf.data() + i * nk;
              acc_t* gprow = gp_buf.data() + i * nk;
              acc_t* xrow = x_buf.data() + i * nk;
              acc_t* yrow = y_buf.data() + i * nk;
              for (int64_t j = 0; j < nk; ++j) {
                const acc_t st = c * srow[j], av = xrow[j];
                // g_p += (s_t - mu) a + v_t . g_t - s_t (o . g_t)
                gprow[j] += (st - mu[i]) * av + yrow[j] - st * og[i];
                // X := g_st = p (a - o . g_t);  Y := p (s_t - mu), g_v's probe weight.
                xrow[j] = prow[j] * (av - og[i]);
                yrow[j] = prow[j] * (st - mu[i]);
              }
            }
            Tensor GQt = mat(a.gqt + ((chunk * P + p) * BH * T + bh * T + i0) * d, nq, d);
            Tensor GKt = mat(a.gkt + krow * d, nk, d);
            Tensor GVt = mat(a.gvt + krow * dv, nk, dv);
            at::addmm_out(GV, GV, Y.t(), GT);            // g_v += (p (s_t - mu))^T g_t
            at::addmm_out(GVt, GVt, Pm.t(), GT);         // g_vt += p^T g_t
            at::addmm_out(GQ, GQ, X, Kt, 1, c);          // g_q += c g_st k_t
            at::addmm_out(GQt, GQt, X, K, 1, c);         // g_qt = c g_st k
            at::addmm_out(GK, GK, X.t(), Qt, 1, c);      // g_k += c g_st^T q_t
            at::addmm_out(GKt, GKt, X.t(), Q, 1, c);     // g_kt = c g_st^T q
          }
          for (int64_t i = 0; i < nq; ++i) {
            const acc_t* prow = p_buf.data() + i * nk;
            acc_t* gprow = gp_buf.data() + i * nk;
            const acc_t D = a.D[bh * T + i0 + i];
            for (int64_t j = 0; j < nk; ++j) gprow[j] = prow[j] * (gprow[j] - D);
          }
          at::addmm_out(GV, GV, Pm.t(), GO);         // g_v += p^T g_o
          at::addmm_out(GQ, GQ, Gp, K, 1, c);        // g_q += c g_s k
          at::addmm_out(GK, GK, Gp.t(), Q, 1, c);    // g_k += c g_s^T q
        }
      }
    }
  });
}

Tensor to_acc(const Tensor& x) { return x.to(acc_dtype(x.scalar_type())).contiguous(); }

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_jvp_cpu(const Tensor& q_in, const Tensor& k_in,
                                                             const Tensor& v_in, const Tensor& qt_in,
                                                             const Tensor& kt_in, const Tensor& vt_in, bool causal,
                                                             double scale) {
  const Dims n = check_inputs("attention_jvp", q_in, k_in, v_in, qt_in, kt_in, vt_in, scale);
  const Tensor q = to_acc(q_in), k = to_acc(k_in), v = to_acc(v_in);
  const Tensor qt = to_acc(qt_in), kt = to_acc(kt_in), vt = to_acc(vt_in);
  Tensor o = at::empty({n.B, n.H, n.T, n.dv}, q.options());
  Tensor ot = at::empty({n.P, n.B, n.H, n.T, n.dv}, q.options());
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
  return {o.to(dtype), ot.to(dtype), lse, mu};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> attention_jvp_backward_cpu(
    const std::optional<Tensor>& grad_o, const std::optional<Tensor>& grad_o_t, const Tensor& q_in,
    const Tensor& k_in, const Tensor& v_in, const Tensor& qt_in, const Tensor& kt_in, const Tensor& vt_in,
    const Tensor& o_in, const Tensor& ot_in, const Tensor& lse_in, const Tensor& mu_in, bool causal, double scale) {
  const Dims n = check_inputs("attention_jvp_backward", q_in, k_in, v_in, qt_in, kt_in, vt_in, scale);
  check_saved(n, q_in, grad_o, grad_o_t, o_in, ot_in, lse_in, mu_in);
  const Tensor q = to_acc(q_in), k = to_acc(k_in), v = to_acc(v_in);
  const Tensor qt = to_acc(qt_in), kt = to_acc(kt_in), vt = to_acc(vt_in);
  const Tensor lse = lse_in.contiguous(), mu = mu_in.contiguous();
  const Tensor go = to_acc(grad_or_zeros(grad_o, o_in)), gt = to_acc(grad_or_zeros(grad_o_t, ot_in));
  Tensor og, D;
  std::tie(og, D) = row_scalars(o_in, ot_in, go, gt, mu);

  const int64_t BH = n.BH();
  const int64_t chunks =
      std::clamp<int64_t>(blocks(at::get_num_threads(), std::max<int64_t>(BH, 1)), 1, blocks(n.S, kBlockK));
  Tensor gq = at::zeros({chunks, n.B, n.H, n.T, n.d}, q.options());
  Tensor gqt = at::zeros({chunks, n.P, n.B, n.H, n.T, n.d}, q.options());
  Tensor gk = at::empty_like(k), gv = at::empty_like(v), gkt = at::empty_like(kt), gvt = at::empty_like(vt);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_jvp_backward_cpu", [&] {
    const Bwd<scalar_t> a{q.const_data_ptr<scalar_t>(),  k.const_data_ptr<scalar_t>(),
                          v.const_data_ptr<scalar_t>(),  qt.const_data_ptr<scalar_t>(),
                          kt.const_data_ptr<scalar_t>(), vt.const_data_ptr<scalar_t>(),
                          go.const_data_ptr<scalar_t>(), gt.const_data_ptr<scalar_t>(),
                          lse.const_data_ptr<scalar_t>(), mu.const_data_ptr<scalar_t>(),
                          og.const_data_ptr<scalar_t>(), D.const_data_ptr<scalar_t>(),
                          gq.data_ptr<scalar_t>(),       gqt.data_ptr<scalar_t>(),
                          gk.data_ptr<scalar_t>(),       gv.data_ptr<scalar_t>(),
                          gkt.data_ptr<scalar_t>(),      gvt.data_ptr<scalar_t>()};
    backward_kernel<scalar_t>(n, causal, static_cast<scalar_t>(scale), chunks, a);
  });
  const auto dtype = q_in.scalar_type();
  return {gq.sum(0).to(dtype), gk.to(dtype), gv.to(dtype), gqt.sum(0).to(dtype), gkt.to(dtype), gvt.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, CPU, m) {
  m.impl("attention_jvp", &attention_jvp_cpu);
  m.impl("attention_jvp_backward", &attention_jvp_backward_cpu);
}

}  // namespace attention_jvp
}  // namespace grokalign
