// Autograd kernels of the whole-MLP ops grokalign::reverse_mlp and grokalign::dual_mlp_sqnorm
// (drivers: csrc/common/reverse_mlp.h, csrc/common/dual_mlp_sqnorm.h).
//
// Device-agnostic, as csrc/autograd/dual_linear_autograd.cpp: the forward and backward ops are
// called below autograd and the dispatcher sends them to the CPU or CUDA kernels (or to the fake
// kernels registered in Python, grokalign_fast/ops/mlp/whole_mlp.py, while torch.compile traces).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace grokalign {
namespace whole_mlp {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

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

struct ReverseMLPNames {
  static constexpr const char* kForward = "grokalign::reverse_mlp";
  static constexpr const char* kBackward = "grokalign::reverse_mlp_backward";
};

struct DualMLPSqnormNames {
  static constexpr const char* kForward = "grokalign::dual_mlp_sqnorm";
  static constexpr const char* kBackward = "grokalign::dual_mlp_sqnorm_backward";
};

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, Autograd, m) {
  m.impl("reverse_mlp", &autograd_kernel<ReverseMLPNames>);
  m.impl("dual_mlp_sqnorm", &autograd_kernel<DualMLPSqnormNames>);
}

}  // namespace whole_mlp
}  // namespace grokalign
