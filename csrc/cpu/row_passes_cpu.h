// The CPU row passes of the whole-MLP ops (the interface: csrc/common/row_passes.h), each one loop,
// and the thread grain the CPU kernels of the engine's other ops share.
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
// The loops serve float / double rows with contiguous entries (row_passes::rows_contiguous); other
// dtypes (half, bfloat16) and layouts take the ATen form of the pass (row_passes::aten), with the
// same results.
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
#include "common/row_passes.h"

namespace grokalign {
namespace row_passes {
namespace cpu {

inline int64_t grain_elems() {
  static const int64_t grain = [] {
    const char* policy = std::getenv("OMP_WAIT_POLICY");
    const bool passive = policy != nullptr && (policy[0] == 'P' || policy[0] == 'p');
    return passive ? int64_t{1} << 16 : int64_t{1} << 14;
  }();
  return grain;
}

inline int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, grain_elems() / std::max<int64_t>(n, 1)); }

// A float / double matrix whose rows are contiguous (any row stride), or undefined.
inline bool loop_ok(const Tensor& t) {
  if (!t.defined()) return true;
  return rows_contiguous(t) && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble);
}

// See aten::activate. Two branch-free passes per row, each of which the compiler vectorises.
inline Tensor activate(const Tensor& z, const Tensor* bias, int64_t act, double alpha) {
  using namespace dual_linear;
  const bool loop = loop_ok(z) && z.size(0) * z.size(1) > 0 &&
                    (bias == nullptr || (bias->is_contiguous() && bias->scalar_type() == z.scalar_type()));
  if (act == kIdentity || !loop) return aten::activate(z, bias, act, alpha);
  const int64_t B = z.size(0), n = z.size(1), ld = z.stride(0);
  const Tensor D = at::empty({B, n}, z.options().dtype(act == kRelu ? at::kBool : z.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "grokalign_row_passes_activate", [&] {
    scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* bp = bias != nullptr ? bias->data_ptr<scalar_t>() : nullptr;
    const scalar_t a = static_cast<scalar_t>(alpha);
    bool* mp = act == kRelu ? D.data_ptr<bool>() : nullptr;
    scalar_t* sp = act == kRelu ? nullptr : D.data_ptr<scalar_t>();
    // One loop with the compare, the mask store and the select together compiles to a branch per
    // element for double, and for leaky ReLU for float too (~190 us per 40k elements with random
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

// See aten::mul_slopes.
inline void mul_slopes(const Tensor& primal, const Tensor& tangent, const Tensor& D, const OptTensor& index,
                       int64_t K, int64_t R) {
  if (!D.defined() || (!primal.defined() && !tangent.defined())) return;
  const bool loop = loop_ok(primal) && loop_ok(tangent) && D.is_contiguous() &&
                    (!index.has_value() || index->is_contiguous()) &&
                    (D.scalar_type() == at::kBool ||
                     D.scalar_type() == (primal.defined() ? primal : tangent).scalar_type()) &&
                    (!primal.defined() || !tangent.defined() || primal.scalar_type() == tangent.scalar_type());
  if (!loop) return aten::mul_slopes(primal, tangent, D, index, K, R);
  const int64_t Bp = primal.defined() ? primal.size(0) : 0;
  const int64_t Bt = tangent.defined() ? K * R : 0;
  const int64_t n = D.size(1);
  if ((Bp + Bt) * n == 0) return;
  const int64_t ldp = primal.defined() ? primal.stride(0) : 0, ldt = tangent.defined() ? tangent.stride(0) : 0;
  const int64_t* ip = index.has_value() ? index->data_ptr<int64_t>() : nullptr;
  const at::ScalarType dtype = (primal.defined() ? primal : tangent).scalar_type();
  AT_DISPATCH_FLOATING_TYPES(dtype, "grokalign_row_passes_mul_slopes", [&] {
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

// See aten::scale_rows.
inline void scale_rows(const Tensor& out, const Tensor& src, const Tensor& c, int64_t K, int64_t R) {
  const bool loop = loop_ok(out) && loop_ok(src) && c.dim() == 1 && c.is_contiguous() &&
                    c.scalar_type() == out.scalar_type() && src.scalar_type() == out.scalar_type();
  if (!loop) return aten::scale_rows(out, src, c, K, R);
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

// See aten::probe_sqnorm.
inline Tensor probe_sqnorm(const Tensor& t, int64_t K, int64_t R, bool root, double scale) {
  if (!loop_ok(t) || t.numel() == 0) return aten::probe_sqnorm(t, K, R, root, scale);
  Tensor sq = at::empty({R}, t.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "grokalign_row_passes_probe_sqnorm", [&] {
    sum_sq_rows(t.data_ptr<scalar_t>(), t.stride(0), t.size(1), K, R, root, scale, sq.data_ptr<scalar_t>());
  });
  return sq;
}

// See aten::seed_factor. One pass instead of 4-6 ATen calls; grad may be a stride-0 expand (a
// mean's or sum's backward).
inline Tensor seed_factor(const Tensor& grad, const Tensor& t, int64_t K, int64_t R, bool root, double scale) {
  const bool loop = loop_ok(t) && t.numel() > 0 && grad.dim() == 1 && grad.size(0) == R &&
                    grad.scalar_type() == t.scalar_type();
  if (!loop) return aten::seed_factor(grad, t, K, R, root, scale);
  const Tensor e = root ? probe_sqnorm(t, K, R, /*root=*/true, /*scale=*/1.0) : Tensor();
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

// The passes as the whole-MLP drivers take them (common/row_passes.h).
struct Passes {
  static Tensor activate(const Tensor& z, const Tensor* bias, int64_t act, double alpha) {
    return cpu::activate(z, bias, act, alpha);
  }
  static void mul_slopes(const Tensor& primal, const Tensor& tangent, const Tensor& D, const OptTensor& index,
                         int64_t K, int64_t R) {
    cpu::mul_slopes(primal, tangent, D, index, K, R);
  }
  static void scale_rows(const Tensor& out, const Tensor& src, const Tensor& c, int64_t K, int64_t R) {
    cpu::scale_rows(out, src, c, K, R);
  }
  static Tensor probe_sqnorm(const Tensor& t, int64_t K, int64_t R, bool root, double scale) {
    return cpu::probe_sqnorm(t, K, R, root, scale);
  }
  static Tensor seed_factor(const Tensor& grad, const Tensor& t, int64_t K, int64_t R, bool root, double scale) {
    return cpu::seed_factor(grad, t, K, R, root, scale);
  }
};

}  // namespace cpu
}  // namespace row_passes
}  // namespace grokalign
