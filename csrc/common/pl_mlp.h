// Shared by the whole-MLP one-pass ops for piecewise-linear MLPs
// (grokalign::reverse_mlp in csrc/cpu/reverse_mlp.cpp and grokalign::dual_mlp_sqnorm
// in csrc/cpu/dual_mlp.cpp): argument checks and the autograd save / result helpers
// (their elementwise passes are in common/pl_rows.h).
#pragma once

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <optional>
#include <string>
#include <vector>

#include "common/dual_linear.h"
#include "common/pl_rows.h"

namespace grokalign {
namespace pl_mlp {

using at::Tensor;
using dual_linear::kIdentity;
using dual_linear::kLeakyRelu;
using dual_linear::kRelu;
using OptTensor = std::optional<Tensor>;

#define PL_CHECK(cond, ...) TORCH_CHECK(cond, "grokalign::", op, ": ", __VA_ARGS__)

struct Shapes {
  int64_t L, B, K, R;
};

// Checks every argument; each message names the argument and what was expected.
// probes [K, R, n] with n = the MLP's input size (input_probes) or output size.
inline Shapes check_args(const char* op, const char* probe_name, bool input_probes, const Tensor& x,
                         const Tensor& u, const OptTensor& index, at::TensorList weights, at::TensorList biases,
                         const std::vector<bool>& has_bias, at::IntArrayRef acts, at::ArrayRef<double> alphas) {
  const int64_t L = static_cast<int64_t>(weights.size());
  PL_CHECK(L >= 1, "weights must hold at least one [OUT, IN] matrix");
  PL_CHECK(static_cast<int64_t>(acts.size()) == L && static_cast<int64_t>(alphas.size()) == L &&
               static_cast<int64_t>(has_bias.size()) == L,
           "acts, alphas and has_bias need one entry per weight (", L, "), got ", acts.size(), ", ",
           alphas.size(), ", ", has_bias.size());
  PL_CHECK(x.dim() == 2, "x must have shape [B, IN], got ", x.sizes());
  PL_CHECK(u.dim() == 3, probe_name, " must have shape [K, R, n], got ", u.sizes());
  const int64_t B = x.size(0), K = u.size(0), R = u.size(1);
  PL_CHECK(K >= 1, probe_name, " must carry at least one probe (K >= 1)");
  int64_t n = x.size(1);
  int64_t nb = 0;
  for (int64_t l = 0; l < L; ++l) {
    const Tensor& w = weights[l];
    PL_CHECK(w.dim() == 2 && w.size(1) == n, "weights[", l, "] must have shape [OUT, ", n, "], got ", w.sizes());
    PL_CHECK(w.scalar_type() == x.scalar_type() && w.device() == x.device(), "weights[", l, "] (", w.scalar_type(),
             ", ", w.device(), ") must match x (", x.scalar_type(), ", ", x.device(), ")");
    PL_CHECK(acts[l] == kIdentity || acts[l] == kRelu || acts[l] == kLeakyRelu, "acts[", l,
             "] must be a piecewise-linear activation code (identity 0, relu 1, leaky_relu 2), got ", acts[l]);
    if (has_bias[l]) {
      PL_CHECK(nb < static_cast<int64_t>(biases.size()), "biases holds ", biases.size(),
               " tensors but has_bias marks more layers");
      const Tensor& b = biases[nb++];
      PL_CHECK(b.dim() == 1 && b.size(0) == w.size(0), "the bias of layer ", l, " must have shape [", w.size(0),
               "], got ", b.sizes());
      PL_CHECK(b.scalar_type() == x.scalar_type() && b.device() == x.device(), "the bias of layer ", l,
               " must match x's dtype and device");
    }
    n = w.size(0);
  }
  PL_CHECK(nb == static_cast<int64_t>(biases.size()), "biases holds ", biases.size(), " tensors, has_bias marks ",
           nb);
  const int64_t want = input_probes ? x.size(1) : n;
  PL_CHECK(u.size(2) == want, probe_name, " must have shape [K, R, ", want, "] (the MLP's ",
           input_probes ? "inputs" : "outputs", "), got ", u.sizes());
  PL_CHECK(u.scalar_type() == x.scalar_type() && u.device() == x.device(), probe_name,
           " must match x's dtype and device");
  if (index.has_value()) {
    PL_CHECK(index->dim() == 1 && index->size(0) == R && index->scalar_type() == at::kLong &&
                 index->device() == x.device(),
             "index must be a long tensor [R=", R, "] on x's device, got ", index->scalar_type(), " ",
             index->sizes());
  } else {
    PL_CHECK(R == B, probe_name, " has R=", R, " rows but x has B=", B, "; pass index for a subset of rows");
  }
  return {L, B, K, R};
}

#undef PL_CHECK

inline std::vector<bool> bool_vector(const c10::List<bool>& list) {
  std::vector<bool> out;
  out.reserve(list.size());
  for (size_t i = 0; i < list.size(); ++i) out.push_back(list.get(i));
  return out;
}

// The autograd Functions of both ops save: the inputs named in `head` (reverse_mlp: x;
// dual_mlp_sqnorm: x, v), index (or an undefined tensor), the weights and the op's saved state.
inline void save_for_backward(torch::autograd::AutogradContext* ctx, std::vector<Tensor> head,
                              const OptTensor& index, at::TensorList weights, at::TensorList biases,
                              const c10::List<bool>& has_bias, at::TensorList state) {
  ctx->set_materialize_grads(false);
  head.push_back(index.has_value() ? *index : Tensor());
  head.insert(head.end(), weights.begin(), weights.end());
  head.insert(head.end(), state.begin(), state.end());
  ctx->save_for_backward(head);
  ctx->saved_data["L"] = static_cast<int64_t>(weights.size());
  ctx->saved_data["nb"] = static_cast<int64_t>(biases.size());
  ctx->saved_data["has_index"] = index.has_value() && index->defined();
  ctx->saved_data["has_bias"] = has_bias;
  ctx->mark_non_differentiable(state.vec());
}

// The backward's result: one entry per forward argument (a TensorList counts one per element):
// the n_head leading tensors (only the first, x, gets a gradient), index, weights (L), biases
// (nb), has_bias, acts, alphas. needs_input_grad counts only the tensors present: the head,
// index when given, the weights, the biases.
inline torch::autograd::variable_list grads_result(torch::autograd::AutogradContext* ctx, int64_t n_head,
                                                   const Tensor& gx, const std::vector<Tensor>& gw,
                                                   const std::vector<Tensor>& gb) {
  const int64_t L = ctx->saved_data["L"].toInt(), nb = ctx->saved_data["nb"].toInt();
  const int64_t w0 = n_head + (ctx->saved_data["has_index"].toBool() ? 1 : 0);
  torch::autograd::variable_list result(n_head + 1 + L + nb + 3);
  if (ctx->needs_input_grad(0)) result[0] = gx;
  for (int64_t l = 0; l < L; ++l)
    if (ctx->needs_input_grad(w0 + l)) result[n_head + 1 + l] = gw[l];
  for (int64_t j = 0; j < nb; ++j)
    if (ctx->needs_input_grad(w0 + L + j)) result[n_head + 1 + L + j] = gb[j];
  return result;
}

}  // namespace pl_mlp
}  // namespace grokalign
