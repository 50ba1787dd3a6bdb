// Elementwise passes of the whole-MLP one-pass ops (grokalign::dual_mlp_sqnorm,
// grokalign::reverse_mlp) over their primal and tangent row buffers: the interface every device
// implements, and its ATen form.
//
// Row layout: a layer's primal rows z [B, n] and its tangent rows t [K*R, n], where
// tangent row k*R + r rides on primal row src(r) = index[r] (or r without index) and
// takes that row's slope s'(z). A device's pass reads the slopes of row src(r) in place, so no
// gathered copy is made or saved; in ATen ops the same pass takes 2-5 calls (a compare,
// a gather of the slopes for the tangent rows, a bool->float conversion, a multiply).
//
// The drivers (common/reverse_mlp.h, common/dual_mlp_sqnorm.h) are templates on a Passes type with
// these static members (the semantics: the functions of namespace aten below):
//
//   Tensor activate(const Tensor& z, const Tensor* bias, int64_t act, double alpha);
//   void mul_slopes(const Tensor& primal, const Tensor& tangent, const Tensor& D, const OptTensor& index,
//                   int64_t K, int64_t R);
//   void scale_rows(const Tensor& out, const Tensor& src, const Tensor& c, int64_t K, int64_t R);
//   Tensor probe_sqnorm(const Tensor& t, int64_t K, int64_t R, bool root, double scale);
//   Tensor seed_factor(const Tensor& grad, const Tensor& t, int64_t K, int64_t R, bool root, double scale);
//
// Implementations: csrc/cpu/row_passes_cpu.h (OpenMP loops), csrc/cuda/row_passes_cuda.cu (CUDA
// kernels). Both run the ATen form below on what their loops do not serve (other dtypes, rows whose
// entries are not contiguous), so it is the specification of each pass and is exercised by tests.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "common/dual_linear.h"

namespace grokalign {
namespace row_passes {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// A matrix whose entries along each row are contiguous (any row stride), or undefined: the layout
// the device loops serve (any device; each device checks its dtypes).
inline bool rows_contiguous(const Tensor& t) {
  if (!t.defined()) return true;
  return t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1);
}

namespace aten {

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
  if (bias != nullptr) z.add_(*bias);
  const Tensor D = slope(z, act, alpha);
  if (act == kRelu) {
    z.clamp_min_(0);
  } else if (act == kLeakyRelu) {
    Tensor zz = z;  // the same storage; at::leaky_relu_ takes a non-const reference
    at::leaky_relu_(zz, alpha);
  }
  return D;
}

// primal [B, n] *= D and tangent [K*R, n] row k*R + r *= D[src(r)]; either may be
// undefined, nothing happens for an undefined D (identity). Multiplication, also by a
// bool mask, so a NaN or inf in a masked entry gives NaN as with ATen's mul.
inline void mul_slopes(const Tensor& primal, const Tensor& tangent, const Tensor& D, const OptTensor& index,
                       int64_t K, int64_t R) {
  if (!D.defined()) return;
  if (primal.defined()) primal.mul_(D);
  if (tangent.defined()) {
    const Tensor Dr = index.has_value() ? D.index_select(0, *index) : D;
    tangent.view({K, R, -1}).mul_(Dr.unsqueeze(0));
  }
}

// out [K*R, n] row k*R + r = c[r] * src[k*R + r] for a per-row factor c [R]; out may be a row
// block of a larger buffer (the penalty rows of the reverse op's stacked backward).
inline void scale_rows(const Tensor& out, const Tensor& src, const Tensor& c, int64_t K, int64_t R) {
  Tensor o = out.view({K, R, -1});
  at::mul_out(o, src.reshape({K, R, -1}), c.view({1, R, 1}));
}

// sq[r] = (1/K) sum_k ||t[k*R + r]||^2 for tangent rows t [K*R, n]; returns [R], or sqrt(sq)
// with root (the penalty on the norm rather than its square; sqrt(0) = 0, nan stays nan), times
// scale (a penalty weight folded into the epilogue: scale * sum_r is then the weighted mean).
inline Tensor probe_sqnorm(const Tensor& t, int64_t K, int64_t R, bool root, double scale) {
  Tensor sq = t.reshape({K, R, -1}).pow(2).sum(at::IntArrayRef{0, 2}).div_(static_cast<double>(K));
  if (root) sq.sqrt_();
  return scale == 1.0 ? sq : sq.mul_(scale);
}

// The per-row factor c[r] of the penalty's backward seed, d loss / d t[k*R + r] = c[r] t[k*R + r]:
// (2/K) g[r] for the squared estimate; with root, d sqrt(sq) / d sq = 1 / (2 sqrt(sq)) makes
// it g[r] / (K e[r]), e = sqrt(sq) recomputed from the rows t, and 0 where e[r] = 0 (the
// gradient of the norm at a zero Jacobian, as grokalign_fast.jacobian.safe_sqrt has it);
// g = scale * grad (see probe_sqnorm).
inline Tensor seed_factor(const Tensor& grad, const Tensor& t, int64_t K, int64_t R, bool root, double scale) {
  const Tensor g = scale == 1.0 ? grad : grad * scale;
  if (!root) return g.mul(2.0 / static_cast<double>(K));
  const Tensor e = probe_sqnorm(t, K, R, /*root=*/true, /*scale=*/1.0);
  return at::where(e.ne(0), g / (e * static_cast<double>(K)), at::zeros({}, g.options()));
}

}  // namespace aten
}  // namespace row_passes
}  // namespace grokalign
