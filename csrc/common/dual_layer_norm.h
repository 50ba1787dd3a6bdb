// Shared by the CPU and CUDA kernels of grokalign::dual_layer_norm and its backward
// (csrc/cpu/dual_layer_norm_cpu.cpp, csrc/cuda/dual_layer_norm_cuda.cu): the argument checks and
// the math. grokalign_fast/ops/dual_layer_norm is the specification (its reference in plain PyTorch).
//
// Rows s [N, n] in the stacked layout of common/stacked_rows.h: primal rows [0, P), tangent row j
// riding on primal row src(j). Per primal row z (n values), with c = 1 for layer norm and c = 0 for
// RMS norm (no centring):
//   mu = c mean(z),  rstd = 1 / sqrt(mean((z - mu)^2) + eps),  x = (z - mu) rstd      (x: x_hat)
// and the affine w, b of the row's group (weight, bias [G, n] or [n] with G = 1: primal row p takes
// row p mod G, a tangent row that of its source row; w = 1, b = 0 where None):
//   primal row:   y = x w + b
//   tangent row:  t' = w u,   u = rstd (t - c mean(t) - x mean(x t))
// (layer norm: u = rstd (t_c - x mean(x t_c)) with t_c = t - mean(t), as mean(x) = 0; RMS norm:
// u = r (t - z r^2 mean(z t)) with r = rstd). u is linear in t through the symmetric projection
// Pi = I - c 1 1^T / n - x x^T / n, u = rstd Pi t.
//
// Backward, for the cotangents gy of y and g_j of t'_j (riders j of primal row p), h_j = g_j w:
//   tangent row:  grad t_j = rstd Pi h_j = rstd (h_j - c mean(h_j) - x mean(x h_j))
//   primal row:   with the per-rider scalars a_j = mean(x t_j), e_j = mean(x h_j) and
//                 S = sum_j <h_j, u_j> = sum_j rstd (<h_j, t_j> - c n mean(t_j) mean(h_j) - n a_j e_j),
//                 the cotangent of x:   G = gy w - rstd sum_j (a_j h_j + e_j t_j),
//                 grad z = rstd (G - c mean(G) - x (mean(x G) + S / n))
//   grad w = sum_rows gy x + sum_riders g_j u_j,   grad b = sum_rows gy    (per group)
// Derivation: <h_j, u_j> = rstd (<h_j, t_j> - c n mean(t_j) mean(h_j) - n a_j e_j) depends on x through
// a_j and e_j (d/dx_i = -rstd (h_ji a_j + e_j t_ji)) and on rstd explicitly (S / rstd); y = x w + b
// gives gy w. Then x = (z - mu) rstd is the layer norm's (RMS norm's) own map, whose backward is
// rstd (G - c mean(G) - x mean(x G)), and d rstd / d z_i = -rstd^2 x_i / n carries S / rstd to
// -rstd x S / n.
//
// Saved: the rows s, the per-primal-row mean (0 for RMS norm) and rstd, in the statistics' dtype
// (float for half / bfloat16 rows, else the rows' dtype); the backward recomputes x from them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <optional>

#include "common/stacked_rows.h"

namespace grokalign {
namespace dual_layer_norm {

// rstd from the second moment about mu (the variance; the mean square for RMS norm).
template <typename T>
C10_HOST_DEVICE inline T rstd(T moment, T eps) {
  return T(1) / std::sqrt(moment + eps);
}

// The dtype of mean and rstd: float for half / bfloat16 rows, else the rows' dtype.
inline at::ScalarType stat_dtype(const at::Tensor& s) { return at::toOpMathType(s.scalar_type()); }

inline bool present(const std::optional<at::Tensor>& p) { return p.has_value() && p->defined(); }

// Checks s [N, n] (n >= 1, floating point), P, index and the optional weight / bias ([n] or [G, n],
// floating point, on s's device, both of one shape when both are given, P a multiple of G); returns
// R, the tangent rows' period. *groups (if given) receives G.
inline int64_t check(const char* op, const at::Tensor& s, int64_t P, const std::optional<at::Tensor>& index,
                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                     int64_t* groups = nullptr) {
  TORCH_CHECK(s.dim() == 2, "grokalign::", op, ": the rows must be [N, n], got ", s.sizes());
  TORCH_CHECK(s.size(1) >= 1, "grokalign::", op, ": the rows must have n >= 1 features, got ", s.sizes());
  TORCH_CHECK(at::isFloatingType(s.scalar_type()), "grokalign::", op, ": the rows must be floating point, got ",
              s.scalar_type());
  const int64_t R = stacked_rows::check_streams(op, s.size(0), P, index, s.device());
  const int64_t n = s.size(1);
  int64_t G = 1;
  for (const auto* p : {&weight, &bias}) {
    if (!present(*p)) continue;
    const at::Tensor& v = **p;
    const bool shape_ok = (v.dim() == 1 && v.size(0) == n) || (v.dim() == 2 && v.size(0) >= 1 && v.size(1) == n);
    TORCH_CHECK(shape_ok && at::isFloatingType(v.scalar_type()) && v.device() == s.device(), "grokalign::", op,
                ": weight and bias must be floating point [n=", n, "] or [G, n=", n, "] on ", s.device(), ", got ",
                v.scalar_type(), " ", v.sizes(), " on ", v.device());
    G = v.dim() == 2 ? v.size(0) : 1;
  }
  if (present(weight) && present(bias))
    TORCH_CHECK(weight->sizes() == bias->sizes(), "grokalign::", op, ": weight and bias must have one shape, got ",
                weight->sizes(), " and ", bias->sizes());
  TORCH_CHECK(P % G == 0, "grokalign::", op, ": primal_rows (", P, ") must be a multiple of the ", G,
              " groups of weight and bias");
  if (groups != nullptr) *groups = G;
  return R;
}

// The backward's other arguments: grad like s, mean and rstd [P] of the statistics' dtype, groups
// G >= 1 dividing P and matching weight.
inline void check_backward(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& mean,
                           const at::Tensor& rstd, int64_t P, int64_t G, const std::optional<at::Tensor>& weight) {
  const char* op = "grokalign::dual_layer_norm_backward";
  TORCH_CHECK(grad.sizes() == s.sizes() && grad.scalar_type() == s.scalar_type() && grad.device() == s.device(), op,
              ": grad must match s (", s.scalar_type(), " ", s.sizes(), "), got ", grad.scalar_type(), " ",
              grad.sizes());
  for (const auto* v : {&mean, &rstd}) {
    TORCH_CHECK(v->dim() == 1 && v->size(0) == P && v->scalar_type() == stat_dtype(s) && v->device() == s.device(),
                op, ": mean and rstd must be ", stat_dtype(s), " [P=", P, "], got ", v->scalar_type(), " ",
                v->sizes());
  }
  TORCH_CHECK(G >= 1 && P % G == 0, op, ": groups must be >= 1 and divide primal_rows (", P, "), got ", G);
  if (present(weight))
    TORCH_CHECK(weight->numel() == G * s.size(1), op, ": weight must have groups * n = ", G * s.size(1),
                " values, got ", weight->sizes());
}

// weight or bias as a contiguous [G * n] tensor of the statistics' dtype; undefined where None.
inline at::Tensor param(const std::optional<at::Tensor>& p, const at::Tensor& s) {
  if (!present(p)) return at::Tensor();
  return p->to(s.options().dtype(stat_dtype(s))).contiguous().view(-1);
}

}  // namespace dual_layer_norm
}  // namespace grokalign
