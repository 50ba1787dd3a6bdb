// Elementwise passes of the whole-MLP one-pass ops (grokalign::dual_mlp_sqnorm,
// grokalign::reverse_mlp) over their primal and tangent row buffers, each as one loop on the CPU.
//
// Row layout: a layer's primal rows z [B, n] and its tangent rows t [K*R, n], where
// tangent row k*R + r rides on primal row src(r) = index[r] (or r without index) and
// takes that row's slope s'(z). A pass reads the slopes of row src(r) in place, so no
// gathered copy is made or saved; in ATen ops the same pass takes 2-5 calls (a compare,
// a gather of the slopes for the tangent rows, a bool->float conversion, a multiply).
//
// Threads: a pass splits into chunks of at least grain_elems() elements. These passes are
// memory-bound and short (a 250 x 200 float buffer takes ~10-20 us on one core). OpenMP's
// default policy keeps the workers spinning for a while after the GEMMs, so a 16k-element
// grain pays; with OMP_WAIT_POLICY=PASSIVE each parallel pass pays for waking a sleeping
// worker (40-120 us on a 2-core machine), so it is 64k there. Training steps of
// 784-200-200-10 (batch 200, subsample=0.25, 2 threads) as multiples of a plain step:
// default policy 1.22-1.23x (16k) against 1.23-1.25x (64k); PASSIVE 1.13x (16k) against
// 1.11x (64k).
//
// Each function has an ATen fallback with the same results (any device, any dtype, any
// strides); the loops serve contiguous-row float / double CPU tensors.
#pragma once

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>

#include "common/dual_linear.h"
#include "common/stacked_rows.h"

namespace grokalign {
namespace row_passes {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline int64_t grain_elems() {
  static const int64_t grain = [] {
    const char* policy = std::getenv("OMP_WAIT_POLICY");
    const bool passive = policy != nullptr && (policy[0] == 'P' || policy[0] == 'p');
    return passive ? int64_t{1} << 16 : int64_t{1} << 14;
  }();
  return grain;
}

inline int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, grain_elems() / std::max<int64_t>(n, 1)); }

// A CPU float/double matrix whose rows are contiguous (any row stride), or undefined.
inline bool loop_ok(const Tensor& t) {
  if (!t.defined()) return true;
  return t.device().is_cpu() && t.dim() == 2 &&
         (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) && (t.size(1) <= 1 || t.stride(1) == 1);
}

using stacked_rows::check_index_range;

// s'(z): a bool mask [z > 0] for ReLU (1 byte per entry saved for backward), a tensor of
// z's dtype for leaky ReLU, undefined for identity (s' = 1).
inline Tensor slope(const Tensor& z, int64_t act, double alpha) {
  if (act == dual_linear::kIdentity) return Tensor();
  const Tensor pos = z.gt(0);
  if (act == dual_linear::kRelu) return pos;
  return at::where(pos, at::ones({}, z.options()), at::full({}, alpha, z.options()));
}

// In place on the primal rows z [B, n]: z += bias (if given); returns D = s'(z) (see slope)
// and sets z = s(z) with torch's semantics (relu: NaN stays NaN, -inf becomes 0).
inline Tensor activate(const Tensor& z, const Tensor* bias, int64_t act, double alpha) {
  using namespace dual_linear;
  const bool loop = loop_ok(z) && z.size(0) * z.size(1) > 0 &&
                    (bias == nullptr || (bias->is_contiguous() && bias->scalar_type() == z.scalar_type()));
  if (act == kIdentity || !loop) {
    if (bias != nullptr) z.add_(*bias);
    const Tensor D = slope(z, act, alpha);
    if (act == kRelu) z.clamp_min_(0);
    else if (act == kLeakyRelu) {
      Tensor zz = z;  // the same storage; at::leaky_relu_ takes a non-const reference
      at::leaky_relu_(zz, alpha);
    }
    return D;
  }
  const int64_t B = z.size(0), n = z.size(1), ld = z.stride(0);
  const Tensor D = at::empty({B, n}, z.options().dtype(act == kRelu ? at::kBool : z.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "grokalign_row_passes_activate", [&] {
    scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* bp = bias != nullptr ? bias->data_ptr<scalar_t>() : nullptr;
    const scalar_t a = static_cast<scalar_t>(alpha);
    bool* mp = act == kRelu ? D.data_ptr<bool>() : nullptr;
    scalar_t* sp = act == kRelu ? nullptr : D.data_ptr<scalar_t>();
    // Two branch-free passes per row, each of which the compiler vectorises: one loop with
    // the compare, the mask store and the select together compiles to a branch per element
    // for double, and for leaky ReLU for float too (~190 us per 40k elements with random
    // signs, against ~10-30 us for the two passes).
    at::parallel_for(0, B, grain_rows(n), [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        scalar_t* __restrict row = zp + i * ld;
        if (bp != nullptr)
          for (int64_t j = 0; j < n; ++j) row[j] += bp[j];
        if (mp != nullptr) {
          bool* __restrict m = mp + i * n;
          for (int64_t j = 0; j < n; ++j) row[j] = row[j] < scalar_t(0) ? scalar_t(0) : row[j];  // NaN stays
          for (int64_t j = 0; j < n; ++j) m[j] = row[j] > scalar_t(0);  // relu(z) > 0 iff z > 0
        } else {
          scalar_t* __restrict sl = sp + i * n;
          for (int64_t j = 0; j < n; ++j) sl[j] = row[j] > scalar_t(0) ? scalar_t(1) : a;
          for (int64_t j = 0; j < n; ++j) row[j] *= sl[j];  // z > 0 ? z : a z, as torch's leaky_relu
        }
      }
    });
  });
  return D;
}

// primal [B, n] *= D and tangent [K*R, n] row k*R + r *= D[src(r)]; either may be
// undefined, nothing happens for an undefined D (identity). Multiplication, also by a
// bool mask, so a NaN or inf in a masked entry gives NaN as with ATen's mul.
inline void mul_slopes(const Tensor& primal, const Tensor& tangent, const Tensor& D, const OptTensor& index,
                       int64_t K, int64_t R) {
  if (!D.defined() || (!primal.defined() && !tangent.defined())) return;
  const bool loop = loop_ok(primal) && loop_ok(tangent) && D.device().is_cpu() && D.is_contiguous() &&
                    (!index.has_value() || (index->device().is_cpu() && index->is_contiguous())) &&
                    (D.scalar_type() == at::kBool ||
                     D.scalar_type() == (primal.defined() ? primal : tangent).scalar_type()) &&
                    (!primal.defined() || !tangent.defined() || primal.scalar_type() == tangent.scalar_type());
  if (!loop) {
    if (primal.defined()) primal.mul_(D);
    if (tangent.defined()) {
      const Tensor Dr = index.has_value() ? D.index_select(0, *index) : D;
      tangent.view({K, R, -1}).mul_(Dr.unsqueeze(0));
    }
    return;
  }
  const int64_t Bp = primal.defined() ? primal.size(0) : 0;
  const int64_t Bt = tangent.defined() ? K * R : 0;
  const int64_t n = D.size(1);
  if ((Bp + Bt) * n == 0) return;
  const int64_t ldp = primal.defined() ? primal.stride(0) : 0, ldt = tangent.defined() ? tangent.stride(0) : 0;
  const int64_t* ip = index.has_value() ? index->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES((primal.defined() ? primal : tangent).scalar_type(), "grokalign_row_passes_mul_slopes", [&] {
    scalar_t* pp = primal.defined() ? primal.data_ptr<scalar_t>() : nullptr;
    scalar_t* tp = tangent.defined() ? tangent.data_ptr<scalar_t>() : nullptr;
    const bool mask = D.scalar_type() == at::kBool;
    const bool* mp = mask ? D.data_ptr<bool>() : nullptr;
    const scalar_t* sp = mask ? nullptr : D.data_ptr<scalar_t>();
    at::parallel_for(0, Bp + Bt, grain_rows(n), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        scalar_t* row;
        int64_t src;
        if (i < Bp) {
          row = pp + i * ldp;
          src = i;
        } else {
          const int64_t r = (i - Bp) % R;
          row = tp + (i - Bp) * ldt;
          src = ip != nullptr ? ip[r] : r;
        }
        if (mask) {
          const bool* m = mp + src * n;
          for (int64_t j = 0; j < n; ++j) row[j] *= static_cast<scalar_t>(m[j]);
        } else {
          const scalar_t* s = sp + src * n;
          for (int64_t j = 0; j < n; ++j) row[j] *= s[j];
        }
      }
    });
  });
}

// out [K*R, n] row k*R + r = c[r] * src[k*R + r] for a per-row factor c [R]; out may be a row
// block of a larger buffer (the penalty rows of the reverse op's stacked backward).
inline void scale_rows(const Tensor& out, const Tensor& src, const Tensor& c, int64_t K, int64_t R) {
  const bool loop = loop_ok(out) && loop_ok(src) && c.device().is_cpu() && c.dim() == 1 && c.is_contiguous() &&
                    c.scalar_type() == out.scalar_type() && src.scalar_type() == out.scalar_type();
  if (!loop) {
    Tensor o = out.view({K, R, -1});
    at::mul_out(o, src.reshape({K, R, -1}), c.view({1, R, 1}));
    return;
  }
  const int64_t rows = K * R, n = out.size(1);
  if (rows * n == 0) return;
  const int64_t ldo = out.stride(0), lds = src.stride(0);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "grokalign_row_passes_scale_rows", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* sp = src.data_ptr<scalar_t>();
    const scalar_t* cp = c.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(n), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t f = cp[i % R];
        scalar_t* __restrict o = op + i * ldo;
        const scalar_t* __restrict a = sp + i * lds;
        for (int64_t j = 0; j < n; ++j) o[j] = a[j] * f;
      }
    });
  });
}

// The loop of probe_sqnorm, shared with the standalone op grokalign::probe_sqnorm
// (csrc/cpu/probe_sqnorm_cpu.cpp, which also serves float16 / bfloat16): rows t [K*R, n] at row
// stride ld, out[r] = scale * f((1/K) sum_k ||t[k*R + r]||^2), f = sqrt with root, accumulated in
// at::acc_type (double for float, float for the half types).
template <typename scalar_t>
void sum_sq_rows(const scalar_t* tp, int64_t ld, int64_t n, int64_t K, int64_t R, bool root, double scale,
                 scalar_t* out) {
  using acc_t = at::acc_type<scalar_t, false>;
  at::parallel_for(0, R, grain_rows(K * n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      acc_t acc[4] = {0, 0, 0, 0};  // four partial sums: independent chains pipeline
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* row = tp + (k * R + r) * ld;
        int64_t j = 0;
        for (; j + 4 <= n; j += 4)
          for (int q = 0; q < 4; ++q) acc[q] += static_cast<acc_t>(row[j + q]) * static_cast<acc_t>(row[j + q]);
        for (; j < n; ++j) acc[0] += static_cast<acc_t>(row[j]) * static_cast<acc_t>(row[j]);
      }
      const acc_t v = ((acc[0] + acc[1]) + (acc[2] + acc[3])) / static_cast<acc_t>(K);
      const scalar_t f = static_cast<scalar_t>(root ? std::sqrt(v) : v);
      out[r] = scale == 1.0 ? f : static_cast<scalar_t>(f * static_cast<scalar_t>(scale));
    }
  });
}

// sq[r] = (1/K) sum_k ||t[k*R + r]||^2 for tangent rows t [K*R, n]; returns [R], or sqrt(sq)
// with root (the penalty on the norm rather than its square; sqrt(0) = 0, nan stays nan), times
// scale (a penalty weight folded into the epilogue: scale * sum_r is then the weighted mean).
inline Tensor probe_sqnorm(const Tensor& t, int64_t K, int64_t R, bool root = false, double scale = 1.0) {
  if (!loop_ok(t) || t.numel() == 0) {
    Tensor sq = t.reshape({K, R, -1}).pow(2).sum(at::IntArrayRef{0, 2}).div_(static_cast<double>(K));
    if (root) sq.sqrt_();
    return scale == 1.0 ? sq : sq.mul_(scale);
  }
  Tensor sq = at::empty({R}, t.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "grokalign_row_passes_probe_sqnorm", [&] {
    sum_sq_rows(t.data_ptr<scalar_t>(), t.stride(0), t.size(1), K, R, root, scale, sq.data_ptr<scalar_t>());
  });
  return sq;
}

// The per-row factor c[r] of the penalty's backward seed, d loss / d t[k*R + r] = c[r] t[k*R + r]:
// (2/K) g[r] for the squared estimate; with root, d sqrt(sq) / d sq = 1 / (2 sqrt(sq)) makes
// it g[r] / (K e[r]), e = sqrt(sq) recomputed from the rows t, and 0 where e[r] = 0 (the
// gradient of the norm at a zero Jacobian, as grokalign_fast.jacobian.safe_sqrt has it);
// g = scale * grad (see probe_sqnorm).
inline Tensor seed_factor(const Tensor& grad, const Tensor& t, int64_t K, int64_t R, bool root, double scale = 1.0) {
  const bool loop = loop_ok(t) && t.numel() > 0 && grad.device().is_cpu() && grad.dim() == 1 &&
                    grad.size(0) == R && grad.scalar_type() == t.scalar_type();
  if (!loop) {
    const Tensor g = scale == 1.0 ? grad : grad * scale;
    if (!root) return g.mul(2.0 / static_cast<double>(K));
    const Tensor e = probe_sqnorm(t, K, R, /*root=*/true);
    const Tensor nonzero = e.ne(0);
    return at::where(nonzero, g / (e * static_cast<double>(K)), at::zeros({}, g.options()));
  }
  // One pass instead of 4-6 ATen calls; grad may be a stride-0 expand (a mean's or sum's backward).
  const Tensor e = root ? probe_sqnorm(t, K, R, /*root=*/true) : Tensor();
  Tensor c = at::empty({R}, t.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "grokalign_row_passes_seed_factor", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const int64_t gs = grad.stride(0);
    const scalar_t* ep = root ? e.data_ptr<scalar_t>() : nullptr;
    scalar_t* cp = c.data_ptr<scalar_t>();
    const scalar_t k = static_cast<scalar_t>(K), two_over_k = static_cast<scalar_t>(2.0 / static_cast<double>(K));
    const scalar_t sc = static_cast<scalar_t>(scale);
    for (int64_t r = 0; r < R; ++r) {
      const scalar_t g = scale == 1.0 ? gp[r * gs] : gp[r * gs] * sc;
      cp[r] = !root ? g * two_over_k : (ep[r] != scalar_t(0) ? g / (ep[r] * k) : scalar_t(0));
    }
  });
  return c;
}

}  // namespace row_passes
}  // namespace grokalign
