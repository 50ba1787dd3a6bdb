// grokalign::dual_mlp_sqnorm: the forward-mode (input-space) Hutchinson estimate
// of ||J(x)||_F^2 for a whole piecewise-linear MLP in one pass, and its backward; the driver shared
// by the devices, a template on their elementwise row passes (common/row_passes.h):
// csrc/cpu/dual_mlp_sqnorm_cpu.cpp and csrc/cuda/dual_mlp_sqnorm_cuda.cu register it, the autograd
// is csrc/autograd/whole_mlp_autograd.cpp.
//
// For identity / ReLU / leaky ReLU layers, s'' = 0 and the slope D_l = s_l'(z_l) is
// piecewise constant, so the tangent t_l = D_l (t_{l-1} W_l^T) is a second batch of
// rows pushed through the same GEMMs with no bias and the primal's slopes (rows
// index[r] of D_l). The op therefore runs the MLP on stacked rows S_l = [h_l; t_l]
// ([B + K*R, n_l]): plain backprop on B + K*R rows, with the tangent rows taking the
// slopes of their primal rows. One GEMM per layer in the forward, and in the backward one
// GEMM per layer for dW_l = G_l^T S_{l-1} and one for G_l W_l, over the loss and penalty
// rows together. Layer 1 reads x and v where they are, with two GEMMs each way: stacking
// them into S_0 would copy B + K*R input rows and keep the copy for the backward, for no
// measurable gain in training steps. Per-layer ops (grokalign::dual_linear) cover the smooth
// activations; this op removes their per-layer dispatch and the separate, less efficient
// GEMMs on the R tangent rows when R is a fraction of B (subsample). The GEMMs are ATen calls;
// the elementwise passes are the device's (one loop or kernel each).
//
//   sq[r] = (1/K) sum_k ||t_L[k, r]||^2,  d sq[r] / d t_L[k, r] = (2/K) t_L[k, r];
//   with root, sqrt(sq[r]) (see row_passes::aten::seed_factor for its gradient); either times scale.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common/stacked_rows.h"
#include "common/whole_mlp.h"

namespace grokalign {
namespace dual_mlp_sqnorm {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Saved layout (2L tensors): S_1..S_{L-1} (the stacked inputs [B + K*R, n_{l-1}] of layers
// 2..L; layer 1 reads x and v, passed to the backward), D_1..D_L ([B, n_l]; empty for
// identity; tangent rows read the slopes of their primal row index[r] in place), t_L
// ([K*R, C], the last layer's tangent rows).
template <class Passes>
std::tuple<Tensor, Tensor, std::vector<Tensor>> forward(const Tensor& x_in, const Tensor& v,
                                                             const OptTensor& index, at::TensorList weights,
                                                             at::TensorList biases,
                                                             const std::vector<bool>& has_bias,
                                                             at::IntArrayRef acts, at::ArrayRef<double> alphas,
                                                             bool root, double scale) {
  const whole_mlp::Shapes s =
      whole_mlp::check_args("dual_mlp_sqnorm", "v", true, x_in, v, index, weights, biases, has_bias, acts, alphas);
  stacked_rows::check_index_range("dual_mlp_sqnorm", index, s.B);
  const int64_t L = s.L, B = s.B, K = s.K, R = s.R, KR = K * R;
  std::vector<Tensor> S(L), D(L);
  Tensor Z;
  int64_t nb = 0;
  for (int64_t l = 0; l < L; ++l) {
    if (l == 0) {
      Z = at::empty({B + KR, weights[0].size(0)}, x_in.options());
      Tensor zt = Z.narrow(0, 0, B), ut = Z.narrow(0, B, KR);
      at::mm_out(zt, x_in, weights[0].t());
      at::mm_out(ut, v.reshape({KR, x_in.size(1)}), weights[0].t());
    } else {
      Z = at::mm(S[l], weights[l].t());  // [B + K*R, n_l]: primal rows, then tangent rows
    }
    const Tensor* bias = has_bias[l] ? &biases[nb++] : nullptr;
    D[l] = Passes::activate(Z.narrow(0, 0, B), bias, acts[l], alphas[l]);
    Passes::mul_slopes(Tensor(), Z.narrow(0, B, KR), D[l], index, K, R);
    if (l + 1 < L) S[l + 1] = Z;
  }
  const Tensor y = Z.narrow(0, 0, B).clone();  // an output of its own (outputs must not alias)
  const Tensor tL = Z.narrow(0, B, KR);
  const Tensor sq = Passes::probe_sqnorm(tL, K, R, root, scale);
  std::vector<Tensor> saved(S.begin() + 1, S.end());
  for (int64_t l = 0; l < L; ++l) saved.push_back(D[l].defined() ? D[l] : at::empty({0}, x_in.options()));
  saved.push_back(tL);
  return {y, sq, saved};
}

// Gradients: grad_x ([0] unless need_x), one per weight, one per present bias.
template <class Passes>
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> backward(
    const OptTensor& grad_y, const OptTensor& grad_sq, const Tensor& x, const Tensor& v, const OptTensor& index,
    at::TensorList weights, at::TensorList saved, const std::vector<bool>& has_bias, bool need_x, bool root,
    double scale) {
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == 2 * L, "grokalign::dual_mlp_sqnorm_backward: saved must hold ",
              2 * L, " tensors, got ", saved.size());
  TORCH_CHECK(static_cast<int64_t>(has_bias.size()) == L,
              "grokalign::dual_mlp_sqnorm_backward: has_bias needs one entry per weight");
  const Tensor& tL = saved[2 * L - 1];
  const int64_t KR = tL.size(0), B = x.size(0);
  const int64_t R = index.has_value() ? index->size(0) : B;
  const int64_t K = R > 0 ? KR / R : 1;
  auto D = [&](int64_t l) {
    const Tensor& d = saved[L - 1 + l];
    return d.numel() == 0 && B * weights[l].size(0) != 0 ? Tensor() : d;
  };
  const Tensor& wL = weights[L - 1];
  // G_L: d loss / d [z_L; u_L] = [grad_y D_L; (2/K) grad_sq[r] t_L D_L[index]].
  Tensor G = at::empty({B + KR, wL.size(0)}, tL.options());
  Tensor top = G.narrow(0, 0, B), bottom = G.narrow(0, B, KR);
  const Tensor dL = D(L - 1);
  if (grad_y.has_value() && grad_y->defined()) {
    if (dL.defined()) at::mul_out(top, *grad_y, dL);
    else top.copy_(*grad_y);
  } else {
    top.zero_();
  }
  if (grad_sq.has_value() && grad_sq->defined()) {
    const Tensor c = Passes::seed_factor(*grad_sq, tL, K, R, root, scale);
    Passes::scale_rows(bottom, tL, c, K, R);
    Passes::mul_slopes(Tensor(), bottom, dL, index, K, R);
  } else {
    bottom.zero_();
  }
  std::vector<Tensor> gw(L), gb_layer(L);
  Tensor gx = at::empty({0}, tL.options());
  for (int64_t l = L - 1; l >= 0; --l) {
    if (l > 0) {
      gw[l] = at::mm(G.t(), saved[l - 1]);  // S_{l-1}: loss and penalty rows in one GEMM
    } else {
      gw[0] = at::mm(G.narrow(0, 0, B).t(), x);
      gw[0].addmm_(G.narrow(0, B, KR).t(), v.reshape({KR, x.size(1)}));
    }
    if (has_bias[l]) gb_layer[l] = G.narrow(0, 0, B).sum(0);
    if (l > 0) {
      Tensor next = at::mm(G, weights[l]);  // [B + K*R, n_{l-1}]
      Passes::mul_slopes(next.narrow(0, 0, B), next.narrow(0, B, KR), D(l - 1), index, K, R);
      G = next;
    } else if (need_x) {
      gx = at::mm(G.narrow(0, 0, B), weights[0]);  // the probes V need no gradient
    }
  }
  std::vector<Tensor> gbs;
  for (int64_t l = 0; l < L; ++l)
    if (has_bias[l]) gbs.push_back(gb_layer[l]);
  return {gx, gw, gbs};
}

// ---- the op entry points of one device (Passes: its row passes) ----

template <class Passes>
std::tuple<Tensor, Tensor, std::vector<Tensor>> dual_mlp_sqnorm_op(const Tensor& x, const Tensor& v,
                                                                   const OptTensor& index, at::TensorList weights,
                                                                   at::TensorList biases, c10::List<bool> has_bias,
                                                                   at::IntArrayRef acts,
                                                                   at::ArrayRef<double> alphas, bool root,
                                                                   double scale) {
  return forward<Passes>(x, v, index, weights, biases, whole_mlp::bool_vector(has_bias), acts, alphas, root, scale);
}

template <class Passes>
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> dual_mlp_sqnorm_backward_op(
    const OptTensor& grad_y, const OptTensor& grad_sq, const Tensor& x, const Tensor& v, const OptTensor& index,
    at::TensorList weights, at::TensorList saved, c10::List<bool> has_bias, bool need_x, bool root, double scale) {
  return backward<Passes>(grad_y, grad_sq, x, v, index, weights, saved, whole_mlp::bool_vector(has_bias), need_x,
                          root, scale);
}

// Registers both ops for the device whose TORCH_LIBRARY_IMPL block calls it.
template <class Passes>
void register_dual_mlp_sqnorm_ops(torch::Library& m) {
  m.impl("dual_mlp_sqnorm", &dual_mlp_sqnorm_op<Passes>);
  m.impl("dual_mlp_sqnorm_backward", &dual_mlp_sqnorm_backward_op<Passes>);
}

}  // namespace dual_mlp_sqnorm
}  // namespace grokalign
