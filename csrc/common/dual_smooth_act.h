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

// The activations in three stages, so that the CPU kernel can evaluate the transcendental functions
// with ATen's vectorised kernels over a block of values and the CUDA kernel per element:
//   1. args(z) -> (u, v): the arguments of at most two elementwise functions Stage<A>::U and ::V;
//   2. u = U(u), v = V(v): erf, exp, tanh, sigmoid, expm1 or log(1 + e^x) (transform());
//   3. combine(z, u, v) -> the requested subset of y = s(z), d1 = s'(z), d2 = s''(z), in arithmetic only.
// With Phi = (1 + erf(z / sqrt 2)) / 2, phi = exp(-z^2 / 2) / sqrt(2 pi), sig the logistic sigmoid:
//   gelu:       u = erf(z / sqrt 2), v = exp(-z^2 / 2);   y = z Phi, s' = Phi + z phi, s'' = phi (2 - z^2)
//   gelu_tanh:  u = tanh(c (z + a z^3)), c = sqrt(2 / pi), a = 0.044715;   y = z (1 + u) / 2, ...
//   silu:       u = sig(z);   y = z u, s' = u (1 + z (1 - u)), s'' = u (1 - u) (2 + z (1 - 2 u))
//   tanh:       u = tanh(z);   y = u, s' = 1 - u^2, s'' = -2 u (1 - u^2)
//   sigmoid:    u = sig(z);   y = u, s' = u (1 - u), s'' = u (1 - u) (1 - 2 u)
//   elu:        u = expm1(min(z, 0)), v = exp(min(z, 0));   z > 0 ? (z, 1, 0) : (alpha u, alpha v, alpha v)
//   softplus:   u = log(1 + e^{min(b z, threshold)}), v = sig(b z);
//               b z > threshold ? (z, 1, 0) : (u / b, v, b v (1 - v))
// (U or V is kNone where that activation does not use the slot.)
enum Func : int { kNone, kErf, kExp, kTanh, kSigmoid, kExpm1, kLog1pExp };

// The elementwise function F at x (per element: the CUDA kernel, and the specification of the CPU
// kernel's vectorised calls).
template <int F, typename T>
C10_HOST_DEVICE inline T transform(T x) {
  if constexpr (F == kErf) return std::erf(x);
  else if constexpr (F == kExp) return std::exp(x);
  else if constexpr (F == kTanh) return std::tanh(x);
  else if constexpr (F == kSigmoid) return T(1) / (T(1) + std::exp(-x));
  else if constexpr (F == kExpm1) return std::expm1(x);
  else if constexpr (F == kLog1pExp) return std::log1p(std::exp(x));
  else return x;
}

template <int A>
struct Stage;

template <>
struct Stage<dual_linear::kGelu> {
  static constexpr int U = kErf, V = kExp;
  template <typename T>
  C10_HOST_DEVICE static void args(T z, const Params<T>&, T& u, T& v) {
    u = z * T(0.70710678118654752440);
    v = T(-0.5) * z * z;
  }
  template <bool Y, bool D1, bool D2, typename T>
  C10_HOST_DEVICE static void combine(T z, T u, T v, const Params<T>&, T& y, T& d1, T& d2) {
    const T Phi = T(0.5) * (T(1) + u);
    const T phi = v * T(0.39894228040143267794);
    if constexpr (Y) y = z * Phi;
    if constexpr (D1) d1 = Phi + z * phi;
    if constexpr (D2) d2 = phi * (T(2) - z * z);
  }
};

template <>
struct Stage<dual_linear::kGeluTanh> {
  static constexpr int U = kTanh, V = kNone;
  template <typename T>
  C10_HOST_DEVICE static void args(T z, const Params<T>&, T& u, T&) {
    u = T(0.79788456080286535588) * (z + T(0.044715) * z * z * z);
  }
  template <bool Y, bool D1, bool D2, typename T>
  C10_HOST_DEVICE static void combine(T z, T th, T, const Params<T>&, T& y, T& d1, T& d2) {
    constexpr T c = T(0.79788456080286535588), a = T(0.044715);
    if constexpr (Y) y = T(0.5) * z * (T(1) + th);
    if constexpr (D1 || D2) {
      const T z2 = z * z;
      const T sech2 = T(1) - th * th;
      const T dg = c * (T(1) + T(3) * a * z2);
      if constexpr (D1) d1 = T(0.5) * (T(1) + th) + T(0.5) * z * sech2 * dg;
      if constexpr (D2) d2 = sech2 * dg + T(0.5) * z * (T(-2) * th * sech2 * dg * dg + sech2 * c * T(6) * a * z);
    }
  }
};

template <>
struct Stage<dual_linear::kSilu> {
  static constexpr int U = kSigmoid, V = kNone;
  template <typename T>
  C10_HOST_DEVICE static void args(T z, const Params<T>&, T& u, T&) { u = z; }
  template <bool Y, bool D1, bool D2, typename T>
  C10_HOST_DEVICE static void combine(T z, T s, T, const Params<T>&, T& y, T& d1, T& d2) {
    if constexpr (Y) y = z * s;
    if constexpr (D1) d1 = s * (T(1) + z * (T(1) - s));
    if constexpr (D2) d2 = s * (T(1) - s) * (T(2) + z * (T(1) - T(2) * s));
  }
};

template <>
struct Stage<dual_linear::kTanh> {
  static constexpr int U = kTanh, V = kNone;
  template <typename T>
  C10_HOST_DEVICE static void args(T z, const Params<T>&, T& u, T&) { u = z; }
  template <bool Y, bool D1, bool D2, typename T>
  C10_HOST_DEVICE static void combine(T, T th, T, const Params<T>&, T& y, T& d1, T& d2) {
    if constexpr (Y) y = th;
    if constexpr (D1) d1 = T(1) - th * th;
    if constexpr (D2) d2 = T(-2) * th * (T(1) - th * th);
  }
};

template <>
struct Stage<dual_linear::kSigmoid> {
  static constexpr int U = kSigmoid, V = kNone;
  template <typename T>
  C10_HOST_DEVICE static void args(T z, const Params<T>&, T& u, T&) { u = z; }
  template <bool Y, bool D1, bool D2, typename T>
  C10_HOST_DEVICE static void combine(T, T s, T, const Params<T>&, T& y, T& d1, T& d2) {
    if constexpr (Y) y = s;
    if constexpr (D1) d1 = s * (T(1) - s);
    if constexpr (D2) d2 = s * (T(1) - s) * (T(1) - T(2) * s);
  }
};

template <>
struct Stage<kElu> {
  static constexpr int U = kExpm1, V = kExp;
  template <typename T>
  C10_HOST_DEVICE static void args(T z, const Params<T>&, T& u, T& v) {
    u = v = z > T(0) ? T(0) : z;
  }
  template <bool Y, bool D1, bool D2, typename T>
  C10_HOST_DEVICE static void combine(T z, T em1, T e, const Params<T>& p, T& y, T& d1, T& d2) {
    const bool pos = z > T(0);
    if constexpr (Y) y = pos ? z : p.alpha * em1;
    if constexpr (D1) d1 = pos ? T(1) : p.alpha * e;
    if constexpr (D2) d2 = pos ? T(0) : p.alpha * e;
  }
};

template <>
struct Stage<kSoftplus> {
  static constexpr int U = kLog1pExp, V = kSigmoid;
  template <typename T>
  C10_HOST_DEVICE static void args(T z, const Params<T>& p, T& u, T& v) {
    v = p.beta * z;
    u = v > p.threshold ? p.threshold : v;
  }
  template <bool Y, bool D1, bool D2, typename T>
  C10_HOST_DEVICE static void combine(T z, T l, T sig, const Params<T>& p, T& y, T& d1, T& d2) {
    const bool linear = p.beta * z > p.threshold;
    if constexpr (Y) y = linear ? z : l / p.beta;
    if constexpr (D1) d1 = linear ? T(1) : sig;
    if constexpr (D2) d2 = linear ? T(0) : p.beta * sig * (T(1) - sig);
  }
};

// Which of the two slots combine<Y, D1, D2> reads for activation A (elu and softplus use u for y only).
template <int A, bool Y, bool D1, bool D2>
constexpr bool uses_u() {
  return Stage<A>::U != kNone && (Y || !(A == kElu || A == kSoftplus));
}
template <int A, bool Y, bool D1, bool D2>
constexpr bool uses_v() {
  return Stage<A>::V != kNone && (D1 || D2 || !(A == kElu || A == kSoftplus));
}

// Evaluates the requested subset of y = s(z), d1 = s'(z), d2 = s''(z) for activation A in precision T,
// per element: the three stages in a row.
template <int A, bool Y, bool D1, bool D2, typename T>
C10_HOST_DEVICE inline void eval(T z, const Params<T>& p, T& y, T& d1, T& d2) {
  using S = Stage<A>;
  T u = T(0), v = T(0);
  S::args(z, p, u, v);
  if constexpr (uses_u<A, Y, D1, D2>()) u = transform<S::U>(u);
  if constexpr (uses_v<A, Y, D1, D2>()) v = transform<S::V>(v);
  S::template combine<Y, D1, D2>(z, u, v, p, y, d1, d2);
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
