// Autograd kernel of grokalign::dual_act (the dual-stream engine's piecewise-linear activation;
// grokalign_fast/ops/dual_act). Device-agnostic, as dual_linear_autograd.cpp: the forward and
// backward ops are called below autograd, and the dispatcher sends them to the CPU or CUDA kernels
// (or to the fakes registered in Python while torch.compile traces).
//
// Saved for backward: the forward's mask [P, n] (uint8, one byte per primal entry) and the index.
// The backward is the op grokalign::dual_act_backward, grad_s = grad * d(mask), first order only.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace grokalign {
namespace dual_act {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

using ForwardSig = std::tuple<Tensor, Tensor>(const Tensor&, int64_t, const OptTensor&, int64_t, double);
using BackwardSig = Tensor(const Tensor&, const Tensor&, int64_t, const OptTensor&, int64_t, double);

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

struct DualActFunction : public torch::autograd::Function<DualActFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& s, int64_t primal_rows, const OptTensor& index,
                               int64_t act, double alpha) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("grokalign::dual_act", "").typed<ForwardSig>();
    auto [out, mask] = op.call(s, primal_rows, index, act, alpha);
    ctx->mark_non_differentiable({mask});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({mask, index.has_value() ? *index : Tensor()});
    ctx->saved_data["primal_rows"] = primal_rows;
    ctx->saved_data["act"] = act;
    ctx->saved_data["alpha"] = alpha;
    return {out, mask};
  }

  // One entry per forward argument: s, primal_rows, index, act, alpha.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(5);
    const Tensor& grad = grads[0];
    if (!grad.defined() || !ctx->needs_input_grad(0)) return result;
    const variable_list saved = ctx->get_saved_variables();
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("grokalign::dual_act_backward", "").typed<BackwardSig>();
    result[0] = op.call(grad.contiguous(), saved[0], ctx->saved_data["primal_rows"].toInt(), opt(saved[1]),
                        ctx->saved_data["act"].toInt(), ctx->saved_data["alpha"].toDouble());
    return result;
  }
};

std::tuple<Tensor, Tensor> dual_act_autograd(const Tensor& s, int64_t primal_rows, const OptTensor& index,
                                             int64_t act, double alpha) {
  const variable_list out = DualActFunction::apply(s, primal_rows, index, act, alpha);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, Autograd, m) { m.impl("dual_act", &dual_act_autograd); }

}  // namespace dual_act
}  // namespace grokalign
