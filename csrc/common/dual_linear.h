// Shared by the CPU and CUDA implementations of the dual-stream Linear(+bias)
// + activation ops (grokalign::dual_linear*, schemas in csrc/grokalign.cpp):
// the activation math s, s', s'' (host and device) and the host-side checks.
//
// Notation (grokalign_fast/ops/mlp/reference.py is the specification):
//   z = x W^T + b  [B, OUT],  u = t W^T  [K, R, OUT],  y = s(z),
//   t' = s'(z[index]) * u,  sq[r] = (1/K) sum_{k,o} t'[k,r,o]^2.
// Both devices compute z and u with one stacked buffer preact [B + K*R, OUT]
// (rows 0..B-1: z, rows B + k*R + r: u[k, r]).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

namespace grokalign {
namespace dual_linear {

// Activation codes: grokalign_fast.ops.mlp.reference.ACT_CODE (same order).
enum : int64_t {
  kIdentity = 0,
  kRelu = 1,
  kLeakyRelu = 2,
  kGelu = 3,
  kGeluTanh = 4,
  kSilu = 5,
  kTanh = 6,
  kSigmoid = 7,
  kNumActs = 8,
};

// s'' == 0 (s' is piecewise constant and carries no gradient).
C10_HOST_DEVICE inline constexpr bool piecewise_linear(int64_t act) { return act <= kLeakyRelu; }
// s' is a function of the sign of z only, so a uint8 mask [z > 0] suffices for backward.
C10_HOST_DEVICE inline constexpr bool mask_activation(int64_t act) {
  return act == kRelu || act == kLeakyRelu;
}

// Evaluates the requested subset of y = s(z), d1 = s'(z), d2 = s''(z) for
// activation A in precision T (the accumulation type). Formulas as in
// reference.act_fwd / act_d1 / act_d2; unused results are dropped at compile time.
template <int A, bool Y, bool D1, bool D2, typename T>
C10_HOST_DEVICE inline void act_eval(T z, T alpha, T& y, T& d1, T& d2) {
  constexpr T kSqrt2OverPi = T(0.79788456080286535588);
  constexpr T kInvSqrt2 = T(0.70710678118654752440);
  constexpr T kInvSqrt2Pi = T(0.39894228040143267794);
  constexpr T kGeluTanhA = T(0.044715);
  if constexpr (A == kIdentity) {
    if constexpr (Y) y = z;
    if constexpr (D1) d1 = T(1);
    if constexpr (D2) d2 = T(0);
  } else if constexpr (A == kRelu) {
    if constexpr (Y) y = z < T(0) ? T(0) : z;  // NaN propagates like torch.relu
    if constexpr (D1) d1 = z > T(0) ? T(1) : T(0);
    if constexpr (D2) d2 = T(0);
  } else if constexpr (A == kLeakyRelu) {
    if constexpr (Y) y = z > T(0) ? z : alpha * z;
    if constexpr (D1) d1 = z > T(0) ? T(1) : alpha;
    if constexpr (D2) d2 = T(0);
  } else if constexpr (A == kGelu) {
    // Phi = (1 + erf(z / sqrt 2)) / 2, phi = exp(-z^2 / 2) / sqrt(2 pi)
    const T Phi = T(0.5) * (T(1) + std::erf(z * kInvSqrt2));
    if constexpr (Y) y = z * Phi;
    if constexpr (D1 || D2) {
      const T phi = std::exp(T(-0.5) * z * z) * kInvSqrt2Pi;
      if constexpr (D1) d1 = Phi + z * phi;
      if constexpr (D2) d2 = phi * (T(2) - z * z);
    }
  } else if constexpr (A == kGeluTanh) {
    const T z2 = z * z;
    const T th = std::tanh(kSqrt2OverPi * (z + kGeluTanhA * z2 * z));
    if constexpr (Y) y = T(0.5) * z * (T(1) + th);
    if constexpr (D1 || D2) {
      const T sech2 = T(1) - th * th;
      const T dg = kSqrt2OverPi * (T(1) + T(3) * kGeluTanhA * z2);
      if constexpr (D1) d1 = T(0.5) * (T(1) + th) + T(0.5) * z * sech2 * dg;
      if constexpr (D2) {
        const T d2g = kSqrt2OverPi * T(6) * kGeluTanhA * z;
        d2 = sech2 * dg + T(0.5) * z * (T(-2) * th * sech2 * dg * dg + sech2 * d2g);
      }
    }
  } else if constexpr (A == kSilu) {
    const T s = T(1) / (T(1) + std::exp(-z));
    if constexpr (Y) y = z * s;
    if constexpr (D1) d1 = s * (T(1) + z * (T(1) - s));
    if constexpr (D2) d2 = s * (T(1) - s) * (T(2) + z * (T(1) - T(2) * s));
  } else if constexpr (A == kTanh) {
    const T th = std::tanh(z);
    if constexpr (Y) y = th;
    if constexpr (D1) d1 = T(1) - th * th;
    if constexpr (D2) d2 = T(-2) * th * (T(1) - th * th);
  } else {  // kSigmoid
    const T s = T(1) / (T(1) + std::exp(-z));
    if constexpr (Y) y = s;
    if constexpr (D1) d1 = s * (T(1) - s);
    if constexpr (D2) d2 = s * (T(1) - s) * (T(1) - T(2) * s);
  }
}

// Calls f(std::integral_constant<int, A>{}) for the runtime activation code.
template <typename F>
inline void dispatch_act(int64_t act, F&& f) {
  switch (act) {
    case kIdentity: return f(std::integral_constant<int, kIdentity>{});
    case kRelu: return f(std::integral_constant<int, kRelu>{});
    case kLeakyRelu: return f(std::integral_constant<int, kLeakyRelu>{});
    case kGelu: return f(std::integral_constant<int, kGelu>{});
    case kGeluTanh: return f(std::integral_constant<int, kGeluTanh>{});
    case kSilu: return f(std::integral_constant<int, kSilu>{});
    case kTanh: return f(std::integral_constant<int, kTanh>{});
    case kSigmoid: return f(std::integral_constant<int, kSigmoid>{});
    default: TORCH_CHECK(false, "dual_linear: unknown activation code ", act, " (0..", kNumActs - 1, ")");
  }
}

// Sizes of one call: x [B, IN], t [K, R, IN], weight [OUT, IN].
struct Dims {
  int64_t B, K, R, IN, OUT;
};

inline bool supported_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

#define DL_CHECK(cond, ...) TORCH_CHECK(cond, "dual_linear: ", __VA_ARGS__)

// Host-side checks of the forward arguments; returns the sizes.
inline Dims check_forward(const at::Tensor& x, const at::Tensor& t, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& index,
                          int64_t act) {
  DL_CHECK(act >= 0 && act < kNumActs, "act must be an activation code in [0, ", kNumActs, "), got ", act);
  DL_CHECK(x.dim() == 2, "x must have shape [B, IN], got ", x.sizes());
  DL_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "weight must have shape [OUT, IN=", x.size(1),
           "], got ", weight.sizes());
  DL_CHECK(t.dim() == 3 && t.size(2) == x.size(1), "t must have shape [K, R, IN=", x.size(1), "], got ",
           t.sizes());
  DL_CHECK(t.size(0) >= 1, "t must carry at least one tangent stream (K >= 1)");
  DL_CHECK(supported_dtype(x.scalar_type()), "dtype ", x.scalar_type(),
           " is not supported (float32, float64, float16, bfloat16)");
  DL_CHECK(t.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
           "x, t and weight must share one dtype, got ", x.scalar_type(), ", ", t.scalar_type(), ", ",
           weight.scalar_type());
  DL_CHECK(t.device() == x.device() && weight.device() == x.device(), "x, t and weight must be on one device");
  if (bias.has_value()) {
    DL_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape [OUT=", weight.size(0),
             "], got ", bias->sizes());
    DL_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
             "bias must match x in dtype and device");
  }
  if (index.has_value()) {
    DL_CHECK(index->dim() == 1 && index->size(0) == t.size(1) && index->scalar_type() == at::kLong,
             "index must be a long tensor of shape [R=", t.size(1), "], got ", index->scalar_type(), " ",
             index->sizes());
    DL_CHECK(index->device() == x.device(), "index must be on the device of x");
  } else {
    DL_CHECK(t.size(1) == x.size(0), "t has R=", t.size(1), " rows but x has B=", x.size(0),
             "; pass index for a subset");
  }
  return Dims{x.size(0), t.size(0), t.size(1), x.size(1), weight.size(0)};
}

// preact = [x; t.reshape(K*R, IN)] @ W^T as one stacked [B + K*R, OUT] buffer,
// written block by block (two GEMMs into the row blocks) so that the inputs
// are never copied into a stacked operand.
inline at::Tensor stacked_gemm(const at::Tensor& x, const at::Tensor& t, const at::Tensor& weight,
                               const Dims& d) {
  at::Tensor preact = at::empty({d.B + d.K * d.R, d.OUT}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor wt = weight.t();
  if (d.B > 0) {
    at::Tensor z = preact.narrow(0, 0, d.B);
    at::mm_out(z, x, wt);
  }
  if (d.K * d.R > 0) {
    at::Tensor u = preact.narrow(0, d.B, d.K * d.R);
    at::mm_out(u, t.reshape({d.K * d.R, d.IN}), wt);
  }
  return preact;
}

// What one backward call computes.
struct BackwardPlan {
  bool need_x, need_t, need_w, need_b;  // output_mask: (x, t, weight, bias)
  bool tan;                             // the tangent output's gradient (grad_t_out / grad_sq) is present
  bool need_gz;                         // gz rows of G = [gz; gu]
  bool need_gu;                         // gu rows of G
};

// Host-side checks of the backward arguments (incoming gradients and the
// forward's saved state); returns the sizes and fills the plan.
inline Dims check_backward(at::IntArrayRef dims, int64_t act, const at::Tensor& mask, const at::Tensor& preact,
                           bool sqnorm, const std::optional<at::Tensor>& gy, const std::optional<at::Tensor>& gtan,
                           const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& t,
                           const std::optional<at::Tensor>& weight, std::array<bool, 4> output_mask,
                           BackwardPlan& plan) {
  DL_CHECK(dims.size() == 5, "dims must be [B, K, R, IN, OUT], got ", dims);
  DL_CHECK(act >= 0 && act < kNumActs, "act must be an activation code in [0, ", kNumActs, "), got ", act);
  const Dims d{dims[0], dims[1], dims[2], dims[3], dims[4]};
  const bool need_preact = sqnorm || !piecewise_linear(act);
  const bool need_mask = !need_preact && mask_activation(act);
  if (need_preact)
    DL_CHECK(preact.dim() == 2 && preact.size(0) == d.B + d.K * d.R && preact.size(1) == d.OUT,
             "backward needs the saved preact [B + K*R, OUT] (forward run with save=True), got ", preact.sizes());
  if (need_mask)
    DL_CHECK(mask.dim() == 2 && mask.size(0) == d.B && mask.size(1) == d.OUT && mask.scalar_type() == at::kByte,
             "backward needs the saved uint8 mask [B, OUT] (forward run with save=True), got ", mask.sizes());
  DL_CHECK(gy.has_value() || gtan.has_value(), "backward needs grad_y or the tangent output's gradient");
  const at::Tensor& ref = gy.has_value() ? *gy : *gtan;
  DL_CHECK(supported_dtype(ref.scalar_type()), "dtype ", ref.scalar_type(), " is not supported");
  if (gy.has_value())
    DL_CHECK(gy->dim() == 2 && gy->size(0) == d.B && gy->size(1) == d.OUT, "grad_y must be [B, OUT], got ",
             gy->sizes());
  if (gtan.has_value()) {
    if (sqnorm) {
      DL_CHECK(gtan->dim() == 1 && gtan->size(0) == d.R, "grad_sq must be [R], got ", gtan->sizes());
    } else {
      DL_CHECK(gtan->dim() == 3 && gtan->size(0) == d.K && gtan->size(1) == d.R && gtan->size(2) == d.OUT,
               "grad_t_out must be [K, R, OUT], got ", gtan->sizes());
    }
  }
  for (const at::Tensor* v : {gy ? &*gy : nullptr, gtan ? &*gtan : nullptr, need_preact ? &preact : nullptr}) {
    if (v) DL_CHECK(v->scalar_type() == ref.scalar_type() && v->device() == ref.device(),
                    "the gradients and saved tensors must share one dtype and device");
  }
  const auto [need_x, need_t, need_w, need_b] = output_mask;
  DL_CHECK(!need_w || (x.has_value() && t.has_value()), "grad_weight needs the saved x and t");
  DL_CHECK(!(need_x || need_t) || weight.has_value(), "grad_x / grad_t need the saved weight");
  plan.need_x = need_x;
  plan.need_t = need_t;
  plan.need_w = need_w;
  plan.need_b = need_b;
  plan.tan = gtan.has_value();
  plan.need_gz = need_x || need_w || need_b;
  plan.need_gu = plan.tan && (need_t || need_w);
  return d;
}

// The GEMM half of the backward, from G = [gz; gu] [B + K*R, OUT] (rows filled as
// the plan says): gW = gz^T x + gu^T t, gb = sum_b gz, [gx; gt] = G W (the rows
// asked for; gt = 0 when the tangent gradient is absent).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_gemms(const at::Tensor& G, const Dims& d,
                                                                     const BackwardPlan& p,
                                                                     const std::optional<at::Tensor>& x,
                                                                     const std::optional<at::Tensor>& t,
                                                                     const std::optional<at::Tensor>& weight) {
  const int64_t KR = d.K * d.R;
  const at::Tensor gz = G.narrow(0, 0, d.B), gu = G.narrow(0, d.B, KR);
  const at::TensorOptions opts = G.options();
  at::Tensor gw = at::empty({0}, opts), gb = at::empty({0}, opts), gxt = at::empty({0, d.IN}, opts);
  if (p.need_w) {
    gw = at::mm(gz.t(), *x);
    if (p.need_gu) gw.addmm_(gu.t(), t->reshape({KR, d.IN}));
  }
  if (p.need_b) gb = gz.sum(0);
  if (p.need_x && p.need_t) {
    if (p.need_gu) {
      gxt = at::mm(G, *weight);
    } else {
      gxt = at::empty({d.B + KR, d.IN}, opts);
      at::Tensor gx = gxt.narrow(0, 0, d.B);
      at::mm_out(gx, gz, *weight);
      gxt.narrow(0, d.B, KR).zero_();
    }
  } else if (p.need_x) {
    gxt = at::mm(gz, *weight);
  } else if (p.need_t) {
    gxt = p.need_gu ? at::mm(gu, *weight) : at::zeros({KR, d.IN}, opts);
  }
  return {gxt, gw, gb};
}

inline std::optional<at::Tensor> opt_contiguous(const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return t->contiguous();
}

// The four op entry points of one device, built from its forward_impl and backward_impl
// (the same signatures on CPU and CUDA): each device file calls register_ops<...>(m) in
// its TORCH_LIBRARY_IMPL block, so the argument plumbing exists once.
using ForwardImpl = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, int64_t, double, bool, bool);
using BackwardImpl = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, at::IntArrayRef, int64_t, double, std::array<bool, 4>, bool);

template <ForwardImpl Forward, BackwardImpl Backward>
struct OpEntries {
  using OptTensor = std::optional<at::Tensor>;
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_linear(
      const at::Tensor& x, const at::Tensor& t, const at::Tensor& weight, const OptTensor& bias,
      const OptTensor& index, int64_t act, double alpha, bool save) {
    return Forward(x, t, weight, bias, index, act, alpha, save, /*sqnorm=*/false);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_linear_sqnorm(
      const at::Tensor& x, const at::Tensor& t, const at::Tensor& weight, const OptTensor& bias,
      const OptTensor& index, int64_t act, double alpha, bool save) {
    auto [y, sq, mask, preact] = Forward(x, t, weight, bias, index, act, alpha, save, /*sqnorm=*/true);
    return {y, sq, preact};
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_linear_backward(
      const OptTensor& grad_y, const OptTensor& grad_t_out, const OptTensor& x, const OptTensor& t,
      const OptTensor& weight, const at::Tensor& mask, const at::Tensor& preact, const OptTensor& index,
      at::IntArrayRef dims, int64_t act, double alpha, std::array<bool, 4> output_mask) {
    return Backward(grad_y, grad_t_out, x, t, weight, mask, preact, index, dims, act, alpha, output_mask,
                    /*sqnorm=*/false);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> dual_linear_sqnorm_backward(
      const OptTensor& grad_y, const OptTensor& grad_sq, const OptTensor& x, const OptTensor& t,
      const OptTensor& weight, const at::Tensor& preact, const OptTensor& index, at::IntArrayRef dims, int64_t act,
      double alpha, std::array<bool, 4> output_mask) {
    const at::Tensor no_mask = at::empty({0}, preact.options().dtype(at::kByte));
    return Backward(grad_y, grad_sq, x, t, weight, no_mask, preact, index, dims, act, alpha, output_mask,
                    /*sqnorm=*/true);
  }
};

template <ForwardImpl Forward, BackwardImpl Backward>
void register_ops(torch::Library& m) {
  using E = OpEntries<Forward, Backward>;
  m.impl("dual_linear", &E::dual_linear);
  m.impl("dual_linear_sqnorm", &E::dual_linear_sqnorm);
  m.impl("dual_linear_backward", &E::dual_linear_backward);
  m.impl("dual_linear_sqnorm_backward", &E::dual_linear_sqnorm_backward);
}

}  // namespace dual_linear
}  // namespace grokalign
