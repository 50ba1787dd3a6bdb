// Shared by the whole-MLP one-pass ops for piecewise-linear MLPs
// (grokalign::reverse_mlp in csrc/cpu/reverse_mlp_cpu.cpp and grokalign::dual_mlp_sqnorm
// in csrc/cpu/dual_mlp_sqnorm_cpu.cpp): argument checks and the autograd save / result helpers
// (their elementwise passes are in common/row_passes.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/dual_linear.h"
#include "common/row_passes.h"

namespace grokalign {
namespace whole_mlp {

using at::Tensor;
using dual_linear::kIdentity;
using dual_linear::kLeakyRelu;
using dual_linear::kRelu;
using OptTensor = std::optional<Tensor>;

#define CHECK_OP_ARG(cond, ...) TORCH_CHECK(cond, "grokalign::", op, ": ", __VA_ARGS__)

struct Shapes {
  int64_t L, B, K, R;
};

// Checks every argument; each message names the argument and what was expected.
// probes [K, R, n] with n = the MLP's input size (input_probes) or output size.
inline Shapes check_args(const char* op, const char* probe_name, bool input_probes, const Tensor& x,
                         const Tensor& u, const OptTensor& index, at::TensorList weights, at::TensorList biases,
                         const std::vector<bool>& has_bias, at::IntArrayRef acts, at::ArrayRef<double> alphas) {
  const int64_t L = static_cast<int64_t>(weights.size());
  CHECK_OP_ARG(L >= 1, "weights must hold at least one [OUT, IN] matrix");
  CHECK_OP_ARG(static_cast<int64_t>(acts.size()) == L && static_cast<int64_t>(alphas.size()) == L &&
                   static_cast<int64_t>(has_bias.size()) == L,
               "acts, alphas and has_bias need one entry per weight (", L, "), got ", acts.size(), ", ",
               alphas.size(), ", ", has_bias.size());
  CHECK_OP_ARG(x.dim() == 2, "x must have shape [B, IN], got ", x.sizes());
  CHECK_OP_ARG(u.dim() == 3, probe_name, " must have shape [K, R, n], got ", u.sizes());
  const int64_t B = x.size(0), K = u.size(0), R = u.size(1);
  CHECK_OP_ARG(K >= 1, probe_name, " must carry at least one probe (K >= 1)");
  int64_t n = x.size(1);
  int64_t nb = 0;
  for (int64_t l = 0; l < L; ++l) {
    const Tensor& w = weights[l];
    CHECK_OP_ARG(w.dim() == 2 && w.size(1) == n, "weights[", l, "] must have shape [OUT, ", n, "], got ", w.sizes());
    CHECK_OP_ARG(w.scalar_type() == x.scalar_type() && w.device() == x.device(), "weights[", l, "] (", w.scalar_type(),
                 ", ", w.device(), ") must match x (", x.scalar_type(), ", ", x.device(), ")");
    CHECK_OP_ARG(acts[l] == kIdentity || acts[l] == kRelu || acts[l] == kLeakyRelu, "acts[", l,
                 "] must be a piecewise-linear activation code (identity 0, relu 1, leaky_relu 2), got ", acts[l]);
    if (has_bias[l]) {
      CHECK_OP_ARG(nb < static_cast<int64_t>(biases.size()), "biases holds ", biases.size(),
                   " tensors but has_bias marks more layers");
      const Tensor& b = biases[nb++];
      CHECK_OP_ARG(b.dim() == 1 && b.size(0) == w.size(0), "the bias of layer ", l, " must have shape [", w.size(0),
                   "], got ", b.sizes());
      CHECK_OP_ARG(b.scalar_type() == x.scalar_type() && b.device() == x.device(), "the bias of layer ", l,
                   " must match x's dtype and device");
    }
    n = w.size(0);
  }
  CHECK_OP_ARG(nb == static_cast<int64_t>(biases.size()), "biases holds ", biases.size(), " tensors, has_bias marks ",
               nb);
  const int64_t want = input_probes ? x.size(1) : n;
  CHECK_OP_ARG(u.size(2) == want, probe_name, " must have shape [K, R, ", want, "] (the MLP's ",
               input_probes ? "inputs" : "outputs", "), got ", u.sizes());
  CHECK_OP_ARG(u.scalar_type() == x.scalar_type() && u.device() == x.device(), probe_name,
               " must match x's dtype and device");
  if (index.has_value()) {
    CHECK_OP_ARG(index->dim() == 1 && index->size(0) == R && index->scalar_type() == at::kLong &&
                     index->device() == x.device(),
                 "index must be a long tensor [R=", R, "] on x's device, got ", index->scalar_type(), " ",
                 index->sizes());
  } else {
    CHECK_OP_ARG(R == B, probe_name, " has R=", R, " rows but x has B=", B, "; pass index for a subset of rows");
  }
  return {L, B, K, R};
}

#undef CHECK_OP_ARG

inline std::vector<bool> bool_vector(const c10::List<bool>& list) {
  std::vector<bool> out;
  out.reserve(list.size());
  for (size_t i = 0; i < list.size(); ++i) out.push_back(list.get(i));
  return out;
}

// The autograd of both ops (Names: the forward and backward op names). Their schemas agree:
//   fwd(x, probes, index?, weights, biases, has_bias, acts, alphas, root, scale) -> (y, est, saved[])
//   bwd(grad_y?, grad_est?, x, probes, index?, weights, saved, has_bias, need_x, root, scale)
//     -> (grad_x, grad_weights[], grad_biases[])
// The Function saves x, the probes, index (or an undefined tensor), the weights and the op's
// saved state (x and the probes are the caller's tensors, not copies).
using ForwardSig = std::tuple<Tensor, Tensor, std::vector<Tensor>>(const Tensor&, const Tensor&, const OptTensor&,
                                                                   at::TensorList, at::TensorList, c10::List<bool>,
                                                                   at::IntArrayRef, at::ArrayRef<double>, bool,
                                                                   double);
using BackwardSig = std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>>(
    const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const OptTensor&, at::TensorList,
    at::TensorList, c10::List<bool>, bool, bool, double);

template <class Names>
struct WholeMLPFunction : public torch::autograd::Function<WholeMLPFunction<Names>> {
  using variable_list = torch::autograd::variable_list;

  static variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& probes,
                               const OptTensor& index, at::TensorList weights, at::TensorList biases,
                               c10::List<bool> has_bias, std::vector<int64_t> acts, std::vector<double> alphas,
                               bool root, double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow(Names::kForward, "").template typed<ForwardSig>();
    auto [y, est, state] = op.call(x, probes, index, weights, biases, has_bias, acts, alphas, root, scale);
    ctx->set_materialize_grads(false);
    std::vector<Tensor> keep = {x, probes, index.has_value() ? *index : Tensor()};
    keep.insert(keep.end(), weights.begin(), weights.end());
    keep.insert(keep.end(), state.begin(), state.end());
    ctx->save_for_backward(keep);
    ctx->saved_data["L"] = static_cast<int64_t>(weights.size());
    ctx->saved_data["nb"] = static_cast<int64_t>(biases.size());
    ctx->saved_data["has_index"] = index.has_value() && index->defined();
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["root"] = root;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable(state);
    variable_list out = {y, est};
    out.insert(out.end(), state.begin(), state.end());
    return out;
  }

  // One entry per forward argument (a TensorList counts one per element): x, probes, index,
  // weights (L), biases (nb), has_bias, acts, alphas, root, scale; only x, the weights and the biases get
  // gradients. needs_input_grad counts only the tensors present: x, probes, index when given,
  // the weights, the biases.
  static variable_list backward(torch::autograd::AutogradContext* ctx, variable_list grads) {
    const Tensor& gy = grads[0];
    const Tensor& ge = grads[1];
    const int64_t L = ctx->saved_data["L"].toInt(), nb = ctx->saved_data["nb"].toInt();
    variable_list result(3 + L + nb + 5);
    if (!gy.defined() && !ge.defined()) return result;
    const variable_list saved = ctx->get_saved_variables();
    const OptTensor index = saved[2].defined() ? OptTensor(saved[2]) : std::nullopt;
    const std::vector<Tensor> weights(saved.begin() + 3, saved.begin() + 3 + L);
    const std::vector<Tensor> state(saved.begin() + 3 + L, saved.end());
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow(Names::kBackward, "").template typed<BackwardSig>();
    auto [gx, gw, gb] = op.call(gy.defined() ? OptTensor(gy) : std::nullopt,
                                ge.defined() ? OptTensor(ge) : std::nullopt, saved[0], saved[1], index, weights,
                                state,
                                ctx->saved_data["has_bias"].toBoolList(), ctx->needs_input_grad(0),
                                ctx->saved_data["root"].toBool(), ctx->saved_data["scale"].toDouble());
    const int64_t w0 = 2 + (ctx->saved_data["has_index"].toBool() ? 1 : 0);
    if (ctx->needs_input_grad(0)) result[0] = gx;
    for (int64_t l = 0; l < L; ++l)
      if (ctx->needs_input_grad(w0 + l)) result[3 + l] = gw[l];
    for (int64_t j = 0; j < nb; ++j)
      if (ctx->needs_input_grad(w0 + L + j)) result[3 + L + j] = gb[j];
    return result;
  }
};

// The Autograd-key kernel of an op: WholeMLPFunction<Names> applied, outputs as the schema has them.
template <class Names>
std::tuple<Tensor, Tensor, std::vector<Tensor>> autograd_kernel(const Tensor& x, const Tensor& probes,
                                                                const OptTensor& index, at::TensorList weights,
                                                                at::TensorList biases, c10::List<bool> has_bias,
                                                                at::IntArrayRef acts, at::ArrayRef<double> alphas,
                                                                bool root, double scale) {
  const torch::autograd::variable_list out = WholeMLPFunction<Names>::apply(x, probes, index, weights, biases, has_bias,
                                                                            acts.vec(), alphas.vec(), root, scale);
  return {out[0], out[1], std::vector<Tensor>(out.begin() + 2, out.end())};
}

}  // namespace whole_mlp
}  // namespace grokalign
