// Autograd kernel of grokalign::attention_jvp (scaled dot-product attention and its JVP along P
// tangents; grokalign_fast/ops/attention_jvp). Device-agnostic, as dual_linear_autograd.cpp: the
// forward and backward ops are called below autograd, and the dispatcher sends them to the CPU or CUDA
// kernels (or to the fakes registered in Python while torch.compile traces).
//
// Saved for backward: the six inputs, o, o_t and the row statistics lse and mu (outputs that are the
// backward's state, not differentiable). An unused o or o_t reaches the backward op as None (zero).
// The backward op grokalign::attention_jvp_backward is first order only.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace grokalign {
namespace attention_jvp {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

using ForwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                              const Tensor&, const Tensor&, const Tensor&, bool,
                                                              double);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool, double);

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

struct AttentionJvpFunction : public torch::autograd::Function<AttentionJvpFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& q_t, const Tensor& k_t, const Tensor& v_t, bool causal, double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("grokalign::attention_jvp", "").typed<ForwardSig>();
    auto [o, o_t, lse, mu] = op.call(q, k, v, q_t, k_t, v_t, causal, scale);
    ctx->mark_non_differentiable({lse, mu});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({q, k, v, q_t, k_t, v_t, o, o_t, lse, mu});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    return {o, o_t, lse, mu};
  }

  // One entry per forward argument: q, k, v, q_t, k_t, v_t, causal, scale.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(8);
    const Tensor &grad_o = grads[0], &grad_o_t = grads[1];
    if (!grad_o.defined() && !grad_o_t.defined()) return result;
    const variable_list s = ctx->get_saved_variables();
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("grokalign::attention_jvp_backward", "")
                               .typed<BackwardSig>();
    const auto [gq, gk, gv, gq_t, gk_t, gv_t] =
        op.call(opt(grad_o), opt(grad_o_t), s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9],
                ctx->saved_data["causal"].toBool(), ctx->saved_data["scale"].toDouble());
    const Tensor all[6] = {gq, gk, gv, gq_t, gk_t, gv_t};
    for (int i = 0; i < 6; ++i)
      if (ctx->needs_input_grad(i)) result[i] = all[i];
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_jvp_autograd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                                  const Tensor& q_t, const Tensor& k_t,
                                                                  const Tensor& v_t, bool causal, double scale) {
  const variable_list out = AttentionJvpFunction::apply(q, k, v, q_t, k_t, v_t, causal, scale);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, Autograd, m) { m.impl("attention_jvp", &attention_jvp_autograd); }

}  // namespace attention_jvp
}  // namespace grokalign
