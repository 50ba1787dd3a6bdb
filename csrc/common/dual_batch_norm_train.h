// Shared by the CPU and CUDA kernels of grokalign::dual_batch_norm_train and its backward
// (csrc/cpu/dual_batch_norm_train_cpu.cpp, csrc/cuda/dual_batch_norm_train_cuda.cu): the argument
// checks and the one formula both passes read the statistics through.
//
// Rows s [N, C, L]: the primal rows [0, P), then the tangent rows. Per channel c, over the n = P L
// primal values: mean, var (biased), invstd = 1 / sqrt(var + eps), and with w = weight (1 if None),
// b = bias (0 if None):
//   forward:   primal  y = (z - mean) invstd w + b,      tangent  t' = t invstd w;
//   backward:  sum_g = sum_primal g,  dot = sum_primal g (z - mean),  S = sum_tangent g t,
//              primal  grad_z = invstd w (g - sum_g / n - (z - mean) invstd^2 (dot + S) / n),
//              tangent grad_t = g invstd w,
//              grad_w = invstd (dot + S),  grad_b = sum_g.
// The primal part of the backward is ATen's batch-norm backward in train mode; the terms in S are the
// tangent rows' dependence on invstd (grokalign_fast/dual/rules/norm.py, _BatchNormTrain).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <optional>

namespace grokalign {
namespace dual_batch_norm_train {

// invstd from the variance, the same expression in the forward and the backward of either device.
template <typename T>
C10_HOST_DEVICE inline T invstd(T var, T eps) {
  return T(1) / std::sqrt(var + eps);
}

// The dtype of mean and var: float for half / bfloat16 rows, else the rows' dtype.
inline at::ScalarType stat_dtype(const at::Tensor& s) { return at::toOpMathType(s.scalar_type()); }

// Checks s [N, C, L], P and an optional per-channel parameter ([C], floating point, on s's device).
inline void check(const char* op, const at::Tensor& s, int64_t P, const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(s.dim() == 3, "grokalign::", op, ": the rows must be [N, C, L], got ", s.sizes());
  TORCH_CHECK(at::isFloatingType(s.scalar_type()), "grokalign::", op, ": the rows must be floating point, got ",
              s.scalar_type());
  TORCH_CHECK(P >= 1 && P <= s.size(0), "grokalign::", op, ": primal_rows must be in [1, ", s.size(0), "], got ", P);
  for (const auto* p : {&weight, &bias}) {
    if (!p->has_value() || !(*p)->defined()) continue;
    const at::Tensor& v = **p;
    TORCH_CHECK(v.dim() == 1 && v.size(0) == s.size(1) && at::isFloatingType(v.scalar_type()) &&
                    v.device() == s.device(),
                "grokalign::", op, ": weight and bias must be floating point [C=", s.size(1), "] on ", s.device(),
                ", got ", v.scalar_type(), " ", v.sizes(), " on ", v.device());
  }
}

// The backward's other arguments: grad like s, mean and var [C] of the statistics' dtype.
inline void check_backward(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& mean,
                           const at::Tensor& var) {
  TORCH_CHECK(grad.sizes() == s.sizes() && grad.scalar_type() == s.scalar_type() && grad.device() == s.device(),
              "grokalign::dual_batch_norm_train_backward: grad must match s (", s.scalar_type(), " ", s.sizes(),
              "), got ", grad.scalar_type(), " ", grad.sizes());
  for (const auto* v : {&mean, &var}) {
    TORCH_CHECK(v->dim() == 1 && v->size(0) == s.size(1) && v->scalar_type() == stat_dtype(s) &&
                    v->device() == s.device(),
                "grokalign::dual_batch_norm_train_backward: mean and var must be ", stat_dtype(s), " [C=", s.size(1),
                "], got ", v->scalar_type(), " ", v->sizes());
  }
}

// A per-channel parameter as a contiguous [C] tensor of the statistics' dtype, or `fill` where it is None.
inline at::Tensor channel_param(const std::optional<at::Tensor>& p, const at::Tensor& s, double fill) {
  const auto options = s.options().dtype(stat_dtype(s));
  if (!p.has_value() || !p->defined()) return at::full({s.size(1)}, fill, options);
  return p->to(options).contiguous();
}

}  // namespace dual_batch_norm_train
}  // namespace grokalign
