// grokalign::reverse_mlp: the output-space ("reverse") Hutchinson estimate of
// ||J(x)||_F^2 for a piecewise-linear MLP in one pass, and its backward; the driver shared by the
// devices, a template on their elementwise row passes (common/row_passes.h):
// csrc/cpu/reverse_mlp_cpu.cpp and csrc/cuda/reverse_mlp_cuda.cu register it, the autograd is
// csrc/autograd/whole_mlp_autograd.cpp.
//
// grokalign_fast/ops/mlp/reverse_mlp.py is the specification (and the Python
// fallback); the math, for layers l = 1..L with z_l = h_{l-1} W_l^T + b_l,
// h_l = s_l(z_l), D_l = diag(s_l'(z_l)) and output probes u [K, R, C]:
//
//   delta_L = D_L u,  delta_{l-1} = D_{l-1} (delta_l W_l),  g = delta_1 W_1 = J^T u
//   est[r] = (1/K) sum_k ||g_{k,r}||^2
//   t_0 = g,  t_l = D_l (t_{l-1} W_l^T)                  (a forward tangent along J^T u)
//   d est / d W_l = (2/K) delta_l^T t_{l-1},  d est / d b_l = 0
//
// The GEMMs are ATen calls (cuBLAS / oneDNN / MKL through the dispatcher); the elementwise
// passes are the device's. What it saves over the Python version: no Python per op (~40 ATen
// calls per step on a 3-layer MLP) and no concatenations. The primal h_l and the tangent
// t_l of each hidden layer share one stacked buffer S_l = [h_l; t_l]
// ([B + K*R, n_l]), written in place by the GEMMs; the backward writes
// G_l = [gamma_l; c delta_l] the same way, so dW_l = G_l^T S_{l-1} is one GEMM
// over the loss and penalty rows together (gamma: the loss's backward chain,
// c = (2/K) d loss / d est per row).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common/stacked_rows.h"
#include "common/whole_mlp.h"

namespace grokalign {
namespace reverse_mlp {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// delta_L = D_L u as [K*R, C] rows (u itself, reshaped, for an identity last layer): probe
// row (k, r) takes the slopes of primal row index[r].
template <class Passes>
Tensor last_delta(const Tensor& u, const Tensor& DL, const OptTensor& index, int64_t K, int64_t R) {
  Tensor d = u.reshape({K * R, u.size(2)});
  if (!DL.defined()) return d.contiguous();
  d = d.clone(at::MemoryFormat::Contiguous);
  Passes::mul_slopes(Tensor(), d, DL, index, K, R);
  return d;
}

// Saved layout (3L - 1 tensors): S_1..S_{L-1} (the stacked [h_l; t_l]), g (= t_0, [K*R, IN]),
// D_1..D_L ([B, n_l]; empty for identity), delta_1..delta_{L-1} ([K*R, n_l]; delta_L is
// recomputed from u in the backward, so an identity last layer saves no copy of u).
template <class Passes>
std::tuple<Tensor, Tensor, std::vector<Tensor>> forward(
    const Tensor& x_in, const Tensor& u_in, const OptTensor& index, at::TensorList weights, at::TensorList biases,
    const std::vector<bool>& has_bias, at::IntArrayRef acts, at::ArrayRef<double> alphas, bool root, double scale) {
  const whole_mlp::Shapes s =
      whole_mlp::check_args("reverse_mlp", "u", false, x_in, u_in, index, weights, biases, has_bias, acts, alphas);
  const int64_t L = s.L, B = s.B, K = s.K, R = s.R, KR = K * R;
  stacked_rows::check_index_range("reverse_mlp", index, s.B);
  const Tensor x = x_in.contiguous();
  std::vector<Tensor> S(L), D(L), delta(L);
  // Primal: z_l into the top rows of S_l (hidden layers) or into y (last layer).
  Tensor h = x, y;
  int64_t nb = 0;
  for (int64_t l = 0; l < L; ++l) {
    const Tensor& w = weights[l];
    const int64_t n = w.size(0);
    Tensor z;
    if (l + 1 < L) {
      S[l] = at::empty({B + KR, n}, x.options());
      z = S[l].narrow(0, 0, B);
      at::mm_out(z, h, w.t());
    } else {
      z = at::mm(h, w.t());
    }
    D[l] = Passes::activate(z, has_bias[l] ? &biases[nb++] : nullptr, acts[l], alphas[l]);
    h = z;
  }
  y = h;
  // The VJP chain: delta_L = D_L u, delta_{l-1} = D_{l-1} (delta_l W_l); g = delta_1 W_1.
  // Probe rows (k, r) take the slopes of primal row index[r] (Passes::mul_slopes).
  Tensor d = last_delta<Passes>(u_in, D[L - 1], index, K, R);
  Tensor g;
  for (int64_t l = L - 1; l >= 0; --l) {
    delta[l] = d;
    g = at::mm(delta[l], weights[l]);
    if (l > 0) {
      Passes::mul_slopes(Tensor(), g, D[l - 1], index, K, R);
      d = g;
    }
  }
  const Tensor est = Passes::probe_sqnorm(g, K, R, root, scale);
  // The tangent along g: t_l = D_l (t_{l-1} W_l^T) into the bottom rows of S_l (l < L).
  Tensor t = g;
  for (int64_t l = 0; l + 1 < L; ++l) {
    Tensor out = S[l].narrow(0, B, KR);
    at::mm_out(out, t, weights[l].t());
    Passes::mul_slopes(Tensor(), out, D[l], index, K, R);
    t = out;
  }
  std::vector<Tensor> saved;
  saved.reserve(3 * L - 1);
  for (int64_t l = 0; l + 1 < L; ++l) saved.push_back(S[l]);
  saved.push_back(g);
  for (int64_t l = 0; l < L; ++l) saved.push_back(D[l].defined() ? D[l] : at::empty({0}, x.options()));
  for (int64_t l = 0; l + 1 < L; ++l) saved.push_back(delta[l]);  // delta_L: recomputed from u
  return {y, est, saved};
}

// Gradients: grad_x ([0] unless need_x), grad_weights (one per weight), grad_biases
// (one per present bias). Either incoming gradient may be absent.
template <class Passes>
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> backward(
    const OptTensor& grad_y, const OptTensor& grad_est, const Tensor& x_in, const Tensor& u, const OptTensor& index,
    at::TensorList weights, at::TensorList saved, const std::vector<bool>& has_bias, bool need_x, bool root,
    double scale) {
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == 3 * L - 1,
              "grokalign::reverse_mlp_backward: saved must hold the forward's ", 3 * L - 1, " tensors, got ",
              saved.size());
  TORCH_CHECK(static_cast<int64_t>(has_bias.size()) == L,
              "grokalign::reverse_mlp_backward: has_bias needs one entry per weight");
  const Tensor x = x_in.contiguous();
  const int64_t B = x.size(0);
  const Tensor& g = saved[L - 1];
  const int64_t KR = g.size(0);
  auto S = [&](int64_t l) { return saved[l]; };  // l < L-1
  auto D = [&](int64_t l) {
    const Tensor& d = saved[L + l];
    return d.numel() == 0 && weights[l].size(0) * B != 0 ? Tensor() : d;
  };
  Tensor delta_L;  // recomputed from u when the penalty has a gradient
  auto delta = [&](int64_t l) { return l + 1 < L ? saved[2 * L + l] : delta_L; };
  const int64_t R = index.has_value() ? index->size(0) : B;
  const int64_t K = R > 0 ? KR / R : 1;
  if (grad_est.has_value() && grad_est->defined()) delta_L = last_delta<Passes>(u, D(L - 1), index, K, R);
  const bool has_gy = grad_y.has_value() && grad_y->defined();
  const bool has_ge = grad_est.has_value() && grad_est->defined();
  Tensor c;  // [R]: the seed factor of probe rows (k, r), (2/K) grad_est[r] for the squared estimate
  if (has_ge) c = Passes::seed_factor(*grad_est, g, K, R, root, scale);
  std::vector<Tensor> gw(L), gb_layer(L);
  // gamma_l [B, n_l] (the loss's backward chain) is written into the top rows of
  // G_l = [gamma_l; c delta_l] when both parts are present at a layer l > 0, so that
  // dW_l = G_l^T [h_{l-1}; t_{l-1}] is one GEMM with no copy; else it is a tensor of its own.
  auto stacked = [&](int64_t l) { return l > 0 && has_gy && has_ge; };
  auto new_gamma = [&](int64_t l, Tensor& G) {
    const int64_t n = weights[l].size(0);
    if (stacked(l)) {
      G = at::empty({B + KR, n}, x.options());
      return G.narrow(0, 0, B);
    }
    G = Tensor();
    return at::empty({B, n}, x.options());
  };
  Tensor G, gamma;
  if (has_gy) {
    gamma = new_gamma(L - 1, G);
    const Tensor dL = D(L - 1);
    if (dL.defined()) at::mul_out(gamma, *grad_y, dL);
    else gamma.copy_(*grad_y);
  }
  for (int64_t l = L - 1; l >= 0; --l) {
    const Tensor& w = weights[l];
    const int64_t n = w.size(0);
    if (stacked(l)) {
      Tensor bottom = G.narrow(0, B, KR);
      Passes::scale_rows(bottom, delta(l), c, K, R);
      gw[l] = at::mm(G.t(), S(l - 1));
    } else {
      const Tensor h_prev = l > 0 ? S(l - 1).narrow(0, 0, B) : x;
      const Tensor t_prev = l > 0 ? S(l - 1).narrow(0, B, KR) : g;
      if (has_gy) gw[l] = at::mm(gamma.t(), h_prev);
      if (has_ge) {
        const Tensor cd = at::empty_like(delta(l));
        Passes::scale_rows(cd, delta(l), c, K, R);
        gw[l] = gw[l].defined() ? gw[l].addmm_(cd.t(), t_prev) : at::mm(cd.t(), t_prev);
      }
      if (!gw[l].defined()) gw[l] = at::zeros_like(w);
    }
    if (has_bias[l]) gb_layer[l] = has_gy ? gamma.sum(0) : at::zeros({n}, w.options());
    if (has_gy && (l > 0 || need_x)) {
      Tensor next;
      if (l > 0) {
        next = new_gamma(l - 1, G);
        at::mm_out(next, gamma, w);
        Passes::mul_slopes(next, Tensor(), D(l - 1), std::nullopt, 0, 0);
      } else {
        next = at::mm(gamma, w);
      }
      gamma = next;
    }
  }
  Tensor gx = at::empty({0}, x.options());
  if (need_x) gx = has_gy ? gamma : at::zeros_like(x);
  std::vector<Tensor> gbs;
  for (int64_t l = 0; l < L; ++l)
    if (has_bias[l]) gbs.push_back(gb_layer[l]);
  return {gx, gw, gbs};
}

// ---- the op entry points of one device (Passes: its row passes) ----

template <class Passes>
std::tuple<Tensor, Tensor, std::vector<Tensor>> reverse_mlp_op(const Tensor& x, const Tensor& u,
                                                               const OptTensor& index, at::TensorList weights,
                                                               at::TensorList biases, c10::List<bool> has_bias,
                                                               at::IntArrayRef acts, at::ArrayRef<double> alphas,
                                                               bool root, double scale) {
  return forward<Passes>(x, u, index, weights, biases, whole_mlp::bool_vector(has_bias), acts, alphas, root, scale);
}

template <class Passes>
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> reverse_mlp_backward_op(
    const OptTensor& grad_y, const OptTensor& grad_est, const Tensor& x, const Tensor& u, const OptTensor& index,
    at::TensorList weights, at::TensorList saved, c10::List<bool> has_bias, bool need_x, bool root, double scale) {
  return backward<Passes>(grad_y, grad_est, x, u, index, weights, saved, whole_mlp::bool_vector(has_bias), need_x,
                          root, scale);
}

// Registers both ops for the device whose TORCH_LIBRARY_IMPL block calls it.
template <class Passes>
void register_reverse_mlp_ops(torch::Library& m) {
  m.impl("reverse_mlp", &reverse_mlp_op<Passes>);
  m.impl("reverse_mlp_backward", &reverse_mlp_backward_op<Passes>);
}

}  // namespace reverse_mlp
}  // namespace grokalign
