// Autograd kernel of grokalign::dual_max_pool (the dual-stream engine's max pool as one gather;
// grokalign_fast/ops/dual_max_pool). Device-agnostic, as dual_linear_autograd.cpp: the forward and
// backward ops are called below autograd, and the dispatcher sends them to the CPU or CUDA kernels
// (or to the fakes registered in Python while torch.compile traces).
//
// Saved for backward: the argmax indices idx and the index (no rows); the backward op
// grokalign::dual_max_pool_backward scatters the gradient back to z's length (first order only).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

namespace grokalign {
namespace dual_max_pool {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

using ForwardSig = Tensor(const Tensor&, const Tensor&, const OptTensor&);
using BackwardSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, int64_t);

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

struct DualMaxPoolFunction : public torch::autograd::Function<DualMaxPoolFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& z, const Tensor& idx, const OptTensor& index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("grokalign::dual_max_pool", "").typed<ForwardSig>();
    Tensor out = op.call(z, idx, index);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({idx, index.has_value() ? *index : Tensor()});
    // The schema's length is an int: a symbolic length (torch.compile, dynamic shapes) is specialised,
    // as Python's int argument is.
    ctx->saved_data["length"] = z.sym_size(2).guard_int(__FILE__, __LINE__);
    return out;
  }

  // One entry per forward argument: z, idx, index.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(3);
    const Tensor& grad = grads[0];
    if (!grad.defined() || !ctx->needs_input_grad(0)) return result;
    const variable_list saved = ctx->get_saved_variables();
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("grokalign::dual_max_pool_backward", "")
                               .typed<BackwardSig>();
    result[0] = op.call(grad.contiguous(), saved[0], opt(saved[1]), ctx->saved_data["length"].toInt());
    return result;
  }
};

Tensor dual_max_pool_autograd(const Tensor& z, const Tensor& idx, const OptTensor& index) {
  return DualMaxPoolFunction::apply(z, idx, index);
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, Autograd, m) { m.impl("dual_max_pool", &dual_max_pool_autograd); }

}  // namespace dual_max_pool
}  // namespace grokalign
