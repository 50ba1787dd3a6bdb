// Autograd kernel of grokalign::dual_layer_norm (the math in csrc/common/dual_layer_norm.h).
//
// Device-agnostic: the forward and backward ops are called below autograd and the dispatcher sends
// them to the CPU or CUDA kernels (or to the fakes registered in Python, grokalign_fast/ops/
// dual_layer_norm, while torch.compile traces). C++ rather than torch.library.register_autograd for
// the reason csrc/autograd/dual_linear_autograd.cpp gives (a Python formula's cost per call), and a
// GPT step runs two of these per block.
//
// Saved for backward: the rows s, the per-primal-row mean and rstd, the index, and the weight only
// when s needs a gradient (grad_weight and grad_bias do not read it). The mean and rstd outputs are
// not differentiable. The gradients of weight and bias come back from the backward op as [G, n] in
// the statistics' dtype and are given the parameters' shape and dtype here.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace grokalign {
namespace dual_layer_norm {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

using ForwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&, int64_t,
                                                      const OptTensor&, double, bool);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                                                       const Tensor&, int64_t, const OptTensor&, bool, int64_t,
                                                       std::array<bool, 3>);

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

struct DualLayerNormFunction : public torch::autograd::Function<DualLayerNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& s, const OptTensor& weight, const OptTensor& bias,
                               int64_t P, const OptTensor& index, double eps, bool rms) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("grokalign::dual_layer_norm", "").typed<ForwardSig>();
    auto [out, mean, rstd] = op.call(s, weight, bias, P, index, eps, rms);
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);
    const bool has_w = given(weight), has_b = given(bias);
    ctx->save_for_backward({s, has_w && s.requires_grad() ? *weight : Tensor(), mean, rstd,
                            given(index) ? *index : Tensor()});
    const Tensor& param = has_w ? *weight : (has_b ? *bias : Tensor());
    ctx->saved_data["P"] = P;
    ctx->saved_data["rms"] = rms;
    ctx->saved_data["groups"] = param.defined() && param.dim() == 2 ? param.size(0) : int64_t{1};
    ctx->saved_data["has_w"] = has_w;
    ctx->saved_data["has_b"] = has_b;
    if (has_w) ctx->saved_data["w_dtype"] = weight->scalar_type();
    if (has_b) ctx->saved_data["b_dtype"] = bias->scalar_type();
    if (param.defined()) ctx->saved_data["param_shape"] = param.sizes().vec();
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // One entry per forward argument: s, weight, bias, primal_rows, index, eps, rms.
    variable_list result(7);
    const Tensor& grad = grads[0];
    if (!grad.defined()) return result;
    const variable_list saved = ctx->get_saved_variables();
    const bool has_w = ctx->saved_data["has_w"].toBool(), has_b = ctx->saved_data["has_b"].toBool();
    // Input edges are the tensors present: s, [weight], [bias], [index].
    const std::array<bool, 3> need = {ctx->needs_input_grad(0), has_w && ctx->needs_input_grad(1),
                                      has_b && ctx->needs_input_grad(has_w ? 2 : 1)};
    if (!need[0] && !need[1] && !need[2]) return result;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("grokalign::dual_layer_norm_backward", "")
                               .typed<BackwardSig>();
    auto [gs, gw, gb] = op.call(grad.contiguous(), saved[0], opt(saved[1]), saved[2], saved[3],
                                ctx->saved_data["P"].toInt(), opt(saved[4]), ctx->saved_data["rms"].toBool(),
                                ctx->saved_data["groups"].toInt(), need);
    if (need[0]) result[0] = gs;
    if (need[1] || need[2]) {
      const std::vector<int64_t> shape = ctx->saved_data["param_shape"].toIntVector();
      if (need[1]) result[1] = gw.view(shape).to(ctx->saved_data["w_dtype"].toScalarType());
      if (need[2]) result[2] = gb.view(shape).to(ctx->saved_data["b_dtype"].toScalarType());
    }
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor> dual_layer_norm_autograd(const Tensor& s, const OptTensor& weight,
                                                            const OptTensor& bias, int64_t P, const OptTensor& index,
                                                            double eps, bool rms) {
  const variable_list out = DualLayerNormFunction::apply(s, weight, bias, P, index, eps, rms);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, Autograd, m) { m.impl("dual_layer_norm", &dual_layer_norm_autograd); }

}  // namespace dual_layer_norm
}  // namespace grokalign
