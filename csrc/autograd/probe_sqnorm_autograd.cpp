// Autograd kernels of grokalign::probe_sqnorm and of its backward op grokalign::probe_sqnorm_backward,
// so that the backward is itself differentiable (double backward: gradgradcheck, a penalty whose
// gradient is differentiated again). Device-agnostic, as dual_linear_autograd.cpp: the ops are called
// below autograd, and the dispatcher sends them to the CPU or CUDA kernels (or to the fakes registered
// in Python while torch.compile traces).
//
//   probe_sqnorm:           out[b] = (1/P) sum_{p,n} g[p,b,n]^2;             saves g (when it needs a grad)
//   probe_sqnorm_backward:  grad_g = (2/P) g * grad_out[b];                    saves g and grad_out
//     its backward:         d g = (2/P) gg * grad_out[b],  d grad_out[b] = (2/P) sum_{p,n} gg g
//                           (ATen ops, differentiable again).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace grokalign {
namespace probe_sqnorm {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSig = Tensor(const Tensor&);
using BackwardSig = Tensor(const Tensor&, const Tensor&);

// The backward op, through the dispatcher from autograd's level: under create_graph it records
// ProbeSqnormBackwardFunction's node.
Tensor call_backward_op(const Tensor& g, const Tensor& grad_out) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("grokalign::probe_sqnorm_backward", "").typed<BackwardSig>();
  return op.call(g, grad_out);
}

struct ProbeSqnormFunction : public torch::autograd::Function<ProbeSqnormFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& g) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("grokalign::probe_sqnorm", "").typed<ForwardSig>();
    Tensor out = op.call(g);
    ctx->save_for_backward({g.requires_grad() ? g : Tensor()});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor g = ctx->get_saved_variables()[0];
    if (!g.defined() || !ctx->needs_input_grad(0)) return {Tensor()};
    return {call_backward_op(g, grads[0].contiguous())};
  }
};

struct ProbeSqnormBackwardFunction : public torch::autograd::Function<ProbeSqnormBackwardFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& g, const Tensor& grad_out) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("grokalign::probe_sqnorm_backward", "").typed<BackwardSig>();
    Tensor out = op.call(g, grad_out);
    ctx->save_for_backward({g, grad_out});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &g = saved[0], &grad_out = saved[1], &gg = grads[0];
    // P is the schema's leading size: a symbolic one (torch.compile, dynamic shapes) is specialised.
    const double scale = 2.0 / static_cast<double>(g.sym_size(0).guard_int(__FILE__, __LINE__));
    Tensor d_g, d_grad;
    if (ctx->needs_input_grad(0)) d_g = gg.mul(scale).mul(grad_out.view({1, -1, 1}));
    if (ctx->needs_input_grad(1)) d_grad = (gg * g).sum(at::IntArrayRef{0, 2}).mul(scale);
    return {d_g, d_grad};
  }
};

Tensor probe_sqnorm_autograd(const Tensor& g) { return ProbeSqnormFunction::apply(g); }

Tensor probe_sqnorm_backward_autograd(const Tensor& g, const Tensor& grad_out) {
  return ProbeSqnormBackwardFunction::apply(g, grad_out);
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, Autograd, m) {
  m.impl("probe_sqnorm", &probe_sqnorm_autograd);
  m.impl("probe_sqnorm_backward", &probe_sqnorm_backward_autograd);
}

}  // namespace probe_sqnorm
}  // namespace grokalign
