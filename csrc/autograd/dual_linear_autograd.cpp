// Autograd kernels of grokalign::dual_linear and grokalign::dual_linear_sqnorm.
//
// Device-agnostic: the forward and backward ops are called below autograd and
// the dispatcher sends them to the CPU or CUDA kernels (or to the fake kernels
// registered in Python while torch.compile traces). setup.py and CMake compile
// csrc/autograd/*.cpp into every build.
//
// Why C++ rather than torch.library.register_autograd: the Python autograd
// path costs ~0.15-0.2 ms per layer (forward + backward) on the 2-core CI
// machine, ~0.5 ms (7%) of a 784-200-200-10 training step, and allocates
// enough Python objects to trigger the cyclic GC; a C++ autograd::Function is
// as cheap as a built-in op's autograd node. Same pattern as torchvision's
// C++ ops (C++ autograd + Python fake kernels), which torch.compile traces.
//
// Saved for backward: x and t only when weight needs a gradient, weight only
// when x or t do, plus the forward's compact state (mask or preact, see
// csrc/grokalign.cpp). Gradients of unused outputs are not materialised.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace grokalign {
namespace dual_linear {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

using ForwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                              const OptTensor&, const OptTensor&, int64_t, double,
                                                              bool);
using SqnormForwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                            const OptTensor&, const OptTensor&, int64_t, double, bool);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor>(const OptTensor&, const OptTensor&, const OptTensor&,
                                                       const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
                                                       const OptTensor&, c10::SymIntArrayRef, int64_t, double,
                                                       std::array<bool, 4>);
using SqnormBackwardSig = std::tuple<Tensor, Tensor, Tensor>(const OptTensor&, const OptTensor&, const OptTensor&,
                                                             const OptTensor&, const OptTensor&, const Tensor&,
                                                             const OptTensor&, c10::SymIntArrayRef, int64_t, double,
                                                             std::array<bool, 4>);

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

template <bool SQNORM>
struct DualLinearFunction : public torch::autograd::Function<DualLinearFunction<SQNORM>> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& t, const Tensor& weight,
                               const OptTensor& bias, const OptTensor& index, int64_t act, double alpha, bool save) {
    at::AutoDispatchBelowADInplaceOrView guard;
    variable_list out;
    Tensor mask, preact;
    if constexpr (SQNORM) {
      static const auto op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("grokalign::dual_linear_sqnorm", "")
                                 .typed<SqnormForwardSig>();
      auto [y, sq, z] = op.call(x, t, weight, bias, index, act, alpha, save);
      preact = z;
      out = {y, sq, preact};
      ctx->mark_non_differentiable({preact});
    } else {
      static const auto op =
          c10::Dispatcher::singleton().findSchemaOrThrow("grokalign::dual_linear", "").typed<ForwardSig>();
      auto [y, t_out, m, z] = op.call(x, t, weight, bias, index, act, alpha, save);
      mask = m;
      preact = z;
      out = {y, t_out, mask, preact};
      ctx->mark_non_differentiable({mask, preact});
    }
    ctx->set_materialize_grads(false);
    const bool need_w = weight.requires_grad();
    const bool need_xt = x.requires_grad() || t.requires_grad();
    ctx->save_for_backward({need_w ? x : Tensor(), need_w ? t : Tensor(), need_xt ? weight : Tensor(), mask, preact,
                            index.has_value() ? *index : Tensor()});
    ctx->saved_data["B"] = x.sym_size(0);
    ctx->saved_data["K"] = t.sym_size(0);
    ctx->saved_data["R"] = t.sym_size(1);
    ctx->saved_data["IN"] = x.sym_size(1);
    ctx->saved_data["OUT"] = weight.sym_size(0);
    ctx->saved_data["act"] = act;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // One entry per forward argument: x, t, weight, bias, index, act, alpha, save.
    variable_list result(8);
    const Tensor& gy = grads[0];
    const Tensor& gtan = grads[1];  // grad of t_out, or of sq
    if (!gy.defined() && !gtan.defined()) return result;
    const variable_list saved = ctx->get_saved_variables();
    const c10::SymInt B = ctx->saved_data["B"].toSymInt(), K = ctx->saved_data["K"].toSymInt(),
                      R = ctx->saved_data["R"].toSymInt(), IN = ctx->saved_data["IN"].toSymInt(),
                      OUT = ctx->saved_data["OUT"].toSymInt();
    const int64_t act = ctx->saved_data["act"].toInt();
    const double alpha = ctx->saved_data["alpha"].toDouble();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // Input edges are the tensor arguments present: x, t, weight, [bias], [index].
    const std::array<bool, 4> need = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                                      has_bias && ctx->needs_input_grad(3)};
    const std::vector<c10::SymInt> dims = {B, K, R, IN, OUT};
    Tensor gxt, gw, gb;
    if constexpr (SQNORM) {
      static const auto op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("grokalign::dual_linear_sqnorm_backward", "")
                                 .typed<SqnormBackwardSig>();
      std::tie(gxt, gw, gb) = op.call(opt(gy), opt(gtan), opt(saved[0]), opt(saved[1]), opt(saved[2]), saved[4],
                                      opt(saved[5]), dims, act, alpha, need);
    } else {
      static const auto op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("grokalign::dual_linear_backward", "")
                                 .typed<BackwardSig>();
      std::tie(gxt, gw, gb) = op.call(opt(gy), opt(gtan), opt(saved[0]), opt(saved[1]), opt(saved[2]), saved[3],
                                      saved[4], opt(saved[5]), dims, act, alpha, need);
    }
    // grad_xt = [gx; gt.reshape(K*R, IN)] with only the rows asked for.
    if (need[0]) result[0] = gxt.narrow_symint(0, 0, B);
    if (need[1]) {
      const c10::SymInt start = need[0] ? B : c10::SymInt(0);
      result[1] = gxt.narrow_symint(0, start, K * R).view_symint({K, R, IN});
    }
    if (need[2]) result[2] = gw;
    if (need[3]) result[3] = gb;
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> dual_linear_autograd(const Tensor& x, const Tensor& t,
                                                                 const Tensor& weight, const OptTensor& bias,
                                                                 const OptTensor& index, int64_t act, double alpha,
                                                                 bool save) {
  const variable_list out = DualLinearFunction<false>::apply(x, t, weight, bias, index, act, alpha, save);
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<Tensor, Tensor, Tensor> dual_linear_sqnorm_autograd(const Tensor& x, const Tensor& t,
                                                               const Tensor& weight, const OptTensor& bias,
                                                               const OptTensor& index, int64_t act, double alpha,
                                                               bool save) {
  const variable_list out = DualLinearFunction<true>::apply(x, t, weight, bias, index, act, alpha, save);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, Autograd, m) {
  m.impl("dual_linear", &dual_linear_autograd);
  m.impl("dual_linear_sqnorm", &dual_linear_sqnorm_autograd);
}

}  // namespace dual_linear
}  // namespace grokalign
