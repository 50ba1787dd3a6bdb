// Shared by the CPU and CUDA kernels of grokalign::dual_smooth_act and its backward
// (csrc/cpu/dual_smooth_act_cpu.cpp, csrc/cuda/dual_smooth_act_cuda.cu): the activations s, s', s''
// (host and device) and the argument checks. grokalign_fast/ops/dual_smooth_act is the specification.
//
// On stacked rows (common/stacked_rows.h) the op computes
//   primal row p:    y = s(z_p),
//   tangent row j:   t' = s'(z_src(j)) * t_j,
// and its backward, for a cotangent g,
//   grad z_p = g_p s'(z_p) + s''(z_p) sum_{riders j of p} g_j t_j,     grad t_j = g_j s'(z_src(j)).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <optional>

#include "common/dual_linear.h"
#include "common/stacked_rows.h"

namespace grokalign {
namespace dual_smooth_act {

// Activation codes: those of the MLP ops (grokalign_fast.ops.mlp.reference.ACT_CODE) for gelu,
// gelu_tanh, silu, tanh, sigmoid, then two with parameters of their own.
enum : int64_t {
  kFirst = dual_linear::kGelu,
  kElu = dual_linear::kNumActs,  // alpha
  kSoftplus,                     // beta, threshold
  kEnd,
};

// The activations' parameters in the accumulation type.
template <typename T>
struct Params {
  T alpha, beta, threshold;
};

// Evaluates the requested subset of y = s(z), d1 = s'(z), d2 = s''(z) for activation A in precision T.
//   elu:       z > 0 ? z : alpha (e^z - 1),        s' = z > 0 ? 1 : alpha e^z,      s'' = z > 0 ? 0 : alpha e^z
//   softplus:  b z > threshold ? z : log(1 + e^{b z}) / b,
//              s' = b z > threshold ? 1 : sig(b z),  s'' = b z > threshold ? 0 : b sig(b z) (1 - sig(b z))
// and dual_linear::act_eval for the codes of the MLP ops.
template <int A, bool Y, bool D1, bool D2, typename T>
C10_HOST_DEVICE inline void eval(T z, const Params<T>& p, T& y, T& d1, T& d2) {
  if constexpr (A == kElu) {
    const bool pos = z > T(0);
    if constexpr (Y) y = pos ? z : p.alpha * std::expm1(z);
    if constexpr (D1 || D2) {
      const T e = pos ? T(0) : p.alpha * std::exp(z);
      if constexpr (D1) d1 = pos ? T(1) : e;
      if constexpr (D2) d2 = e;
    }
  } else if constexpr (A == kSoftplus) {
    const T bz = p.beta * z;
    const bool linear = bz > p.threshold;
    if constexpr (Y) y = linear ? z : std::log1p(std::exp(bz)) / p.beta;
    if constexpr (D1 || D2) {
      const T sig = linear ? T(1) : T(1) / (T(1) + std::exp(-bz));
      if constexpr (D1) d1 = sig;
      if constexpr (D2) d2 = linear ? T(0) : p.beta * sig * (T(1) - sig);
    }
  } else {
    dual_linear::act_eval<A, Y, D1, D2>(z, p.alpha, y, d1, d2);
  }
}

// Calls f(std::integral_constant<int, A>{}) for the runtime activation code (checked by check()).
template <typename F>
inline void dispatch(int64_t act, F&& f) {
  switch (act) {
    case dual_linear::kGelu: return f(std::integral_constant<int, dual_linear::kGelu>{});
    case dual_linear::kGeluTanh: return f(std::integral_constant<int, dual_linear::kGeluTanh>{});
    case dual_linear::kSilu: return f(std::integral_constant<int, dual_linear::kSilu>{});
    case dual_linear::kTanh: return f(std::integral_constant<int, dual_linear::kTanh>{});
    case dual_linear::kSigmoid: return f(std::integral_constant<int, dual_linear::kSigmoid>{});
    case kElu: return f(std::integral_constant<int, kElu>{});
    case kSoftplus: return f(std::integral_constant<int, kSoftplus>{});
    default: TORCH_CHECK(false, "grokalign::dual_smooth_act: unknown activation code ", act);
  }
}

// Checks s / grad [N, n], P primal rows, index and act; returns R (the tangent rows' period).
inline int64_t check(const char* op, const at::Tensor& s, int64_t P, const std::optional<at::Tensor>& index,
                     int64_t act) {
  TORCH_CHECK(s.dim() == 2, "grokalign::", op, ": the rows must be [N, n], got ", s.sizes());
  TORCH_CHECK(at::isFloatingType(s.scalar_type()), "grokalign::", op, ": the rows must be floating point, got ",
              s.scalar_type());
  TORCH_CHECK(act >= kFirst && act < kEnd, "grokalign::", op, ": act must be a smooth activation code in [", kFirst,
              ", ", kEnd, "), got ", act);
  return stacked_rows::check_streams(op, s.size(0), P, index, s.device());
}

// The backward's cotangent: the same shape, dtype and device as the rows.
inline void check_grad(const at::Tensor& grad, const at::Tensor& s) {
  TORCH_CHECK(grad.sizes() == s.sizes() && grad.scalar_type() == s.scalar_type() && grad.device() == s.device(),
              "grokalign::dual_smooth_act_backward: grad must match s (", s.scalar_type(), " ", s.sizes(), "), got ",
              grad.scalar_type(), " ", grad.sizes());
}

}  // namespace dual_smooth_act
}  // namespace grokalign
