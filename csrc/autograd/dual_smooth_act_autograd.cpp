// Autograd kernel of grokalign::dual_smooth_act (the dual-stream engine's smooth activation;
// grokalign_fast/ops/dual_smooth_act). Device-agnostic, as dual_linear_autograd.cpp: the forward and
// backward ops are called below autograd, and the dispatcher sends them to the CPU or CUDA kernels
// (or to the fakes registered in Python while torch.compile traces).
//
// Saved for backward: the input rows s and the index; the backward op
// grokalign::dual_smooth_act_backward re-evaluates s' and s'' from them (first order only).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

namespace grokalign {
namespace dual_smooth_act {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

using ForwardSig = Tensor(const Tensor&, int64_t, const OptTensor&, int64_t, double, double, double);
using BackwardSig = Tensor(const Tensor&, const Tensor&, int64_t, const OptTensor&, int64_t, double, double, double);

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

struct DualSmoothActFunction : public torch::autograd::Function<DualSmoothActFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& s, int64_t primal_rows, const OptTensor& index,
                        int64_t act, double alpha, double beta, double threshold) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("grokalign::dual_smooth_act", "").typed<ForwardSig>();
    Tensor out = op.call(s, primal_rows, index, act, alpha, beta, threshold);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({s, index.has_value() ? *index : Tensor()});
    ctx->saved_data["primal_rows"] = primal_rows;
    ctx->saved_data["act"] = act;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["threshold"] = threshold;
    return out;
  }

  // One entry per forward argument: s, primal_rows, index, act, alpha, beta, threshold.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(7);
    const Tensor& grad = grads[0];
    if (!grad.defined() || !ctx->needs_input_grad(0)) return result;
    const variable_list saved = ctx->get_saved_variables();
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("grokalign::dual_smooth_act_backward", "")
                               .typed<BackwardSig>();
    result[0] = op.call(grad.contiguous(), saved[0], ctx->saved_data["primal_rows"].toInt(), opt(saved[1]),
                        ctx->saved_data["act"].toInt(), ctx->saved_data["alpha"].toDouble(),
                        ctx->saved_data["beta"].toDouble(), ctx->saved_data["threshold"].toDouble());
    return result;
  }
};

Tensor dual_smooth_act_autograd(const Tensor& s, int64_t primal_rows, const OptTensor& index, int64_t act,
                                double alpha, double beta, double threshold) {
  return DualSmoothActFunction::apply(s, primal_rows, index, act, alpha, beta, threshold);
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, Autograd, m) { m.impl("dual_smooth_act", &dual_smooth_act_autograd); }

}  // namespace dual_smooth_act
}  // namespace grokalign
