// Autograd kernel of grokalign::dual_batch_norm_train (the dual-stream engine's batch norm in train
// mode; grokalign_fast/ops/dual_batch_norm_train, whose Python wrapper updates the running statistics
// from the op's mean and var). Device-agnostic, as dual_linear_autograd.cpp: the forward and backward
// ops are called below autograd, and the dispatcher sends them to the CPU or CUDA kernels (or to the
// fakes registered in Python while torch.compile traces).
//
// Saved for backward: the input rows s, weight and the forward's per-channel mean and var (outputs,
// not differentiable). The backward op grokalign::dual_batch_norm_train_backward computes only the
// gradients asked for (its output_mask); grad_weight and grad_bias come back in the dtypes of weight
// and bias. First order only.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace grokalign {
namespace dual_batch_norm_train {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

using ForwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&, int64_t,
                                                      double);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                                                       const Tensor&, int64_t, double, std::array<bool, 3>);

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }
OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

struct DualBatchNormTrainFunction : public torch::autograd::Function<DualBatchNormTrainFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& s, const OptTensor& weight, const OptTensor& bias,
                               int64_t primal_rows, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("grokalign::dual_batch_norm_train", "").typed<ForwardSig>();
    auto [out, mean, var] = op.call(s, weight, bias, primal_rows, eps);
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({s, present(weight) ? *weight : Tensor(), mean, var});
    ctx->saved_data["primal_rows"] = primal_rows;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_weight"] = present(weight);
    ctx->saved_data["has_bias"] = present(bias);
    if (present(weight)) ctx->saved_data["weight_dtype"] = weight->scalar_type();
    if (present(bias)) ctx->saved_data["bias_dtype"] = bias->scalar_type();
    return {out, mean, var};
  }

  // One entry per forward argument: s, weight, bias, primal_rows, eps. Input edges are the tensors
  // present: s, [weight], [bias].
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(5);
    const Tensor& grad = grads[0];
    if (!grad.defined()) return result;
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 3> need = {ctx->needs_input_grad(0), has_weight && ctx->needs_input_grad(1),
                                      has_bias && ctx->needs_input_grad(has_weight ? 2 : 1)};
    if (!need[0] && !need[1] && !need[2]) return result;
    const variable_list saved = ctx->get_saved_variables();
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("grokalign::dual_batch_norm_train_backward", "")
                               .typed<BackwardSig>();
    auto [gs, gw, gb] = op.call(grad.contiguous(), saved[0], opt(saved[1]), saved[2], saved[3],
                                ctx->saved_data["primal_rows"].toInt(), ctx->saved_data["eps"].toDouble(), need);
    if (need[0]) result[0] = gs;
    if (need[1]) result[1] = gw.to(ctx->saved_data["weight_dtype"].toScalarType());
    if (need[2]) result[2] = gb.to(ctx->saved_data["bias_dtype"].toScalarType());
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor> dual_batch_norm_train_autograd(const Tensor& s, const OptTensor& weight,
                                                                  const OptTensor& bias, int64_t primal_rows,
                                                                  double eps) {
  const variable_list out = DualBatchNormTrainFunction::apply(s, weight, bias, primal_rows, eps);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, Autograd, m) { m.impl("dual_batch_norm_train", &dual_batch_norm_train_autograd); }

}  // namespace dual_batch_norm_train
}  // namespace grokalign
