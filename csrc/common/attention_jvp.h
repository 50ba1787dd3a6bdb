// Argument checks of grokalign::attention_jvp and grokalign::attention_jvp_backward, shared by the CPU
// and CUDA kernels (csrc/cpu/attention_jvp_cpu.cpp, csrc/cuda/attention_jvp_cuda.cu). The math:
// grokalign_fast/ops/attention_jvp/reference.py.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <tuple>

namespace grokalign {
namespace attention_jvp {

// q [B, H, T, d], k [B, H, S, d], v [B, H, S, dv]; tangents with a leading probe dimension P.
struct Dims {
  int64_t P, B, H, T, S, d, dv;
  int64_t BH() const { return B * H; }
};

// The dtype of the row statistics lse and mu, and of the kernels' accumulation: float for
// half / bfloat16 / float, double for double.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_same(const char* op, const char* name, const at::Tensor& x, const at::Tensor& q) {
  TORCH_CHECK(x.scalar_type() == q.scalar_type(), "grokalign::", op, ": ", name, " must have q's dtype ",
              q.scalar_type(), ", got ", x.scalar_type());
  TORCH_CHECK(x.device() == q.device(), "grokalign::", op, ": ", name, " must be on q's device ", q.device(),
              ", got ", x.device());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& x, at::IntArrayRef want) {
  TORCH_CHECK(x.sizes() == want, "grokalign::", op, ": ", name, " must be ", want, ", got ", x.sizes());
}

// Checks the six inputs of attention_jvp (and of its backward); returns the dimensions.
inline Dims check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& q_t, const at::Tensor& k_t, const at::Tensor& v_t, double scale) {
  TORCH_CHECK(q.dim() == 4, "grokalign::", op, ": q must be [B, H, T, d], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "grokalign::", op, ": k must be [B, H, S, d], got ", k.sizes());
  TORCH_CHECK(v.dim() == 4, "grokalign::", op, ": v must be [B, H, S, dv], got ", v.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "grokalign::", op, ": q must be floating point, got ",
              q.scalar_type());
  Dims n{0, q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  check_shape(op, "k", k, {n.B, n.H, n.S, n.d});
  check_shape(op, "v", v, {n.B, n.H, n.S, n.dv});
  TORCH_CHECK(n.S >= 1, "grokalign::", op, ": attention over S = 0 keys is undefined");
  TORCH_CHECK(q_t.dim() == 5, "grokalign::", op, ": q_t must be [P, B, H, T, d], got ", q_t.sizes());
  n.P = q_t.size(0);
  TORCH_CHECK(n.P >= 1, "grokalign::", op, ": the tangents need P >= 1 probes, got ", n.P);
  check_shape(op, "q_t", q_t, {n.P, n.B, n.H, n.T, n.d});
  check_shape(op, "k_t", k_t, {n.P, n.B, n.H, n.S, n.d});
  check_shape(op, "v_t", v_t, {n.P, n.B, n.H, n.S, n.dv});
  check_same(op, "k", k, q);
  check_same(op, "v", v, q);
  check_same(op, "q_t", q_t, q);
  check_same(op, "k_t", k_t, q);
  check_same(op, "v_t", v_t, q);
  TORCH_CHECK(std::isfinite(scale), "grokalign::", op, ": scale must be finite, got ", scale);
  return n;
}

// Checks the forward's outputs and the incoming gradients handed to attention_jvp_backward.
inline void check_saved(const Dims& n, const at::Tensor& q, const std::optional<at::Tensor>& grad_o,
                        const std::optional<at::Tensor>& grad_o_t, const at::Tensor& o, const at::Tensor& o_t,
                        const at::Tensor& lse, const at::Tensor& mu) {
  const char* op = "attention_jvp_backward";
  if (grad_o.has_value() && grad_o->defined()) {
    check_shape(op, "grad_o", *grad_o, {n.B, n.H, n.T, n.dv});
    check_same(op, "grad_o", *grad_o, q);
  }
  if (grad_o_t.has_value() && grad_o_t->defined()) {
    check_shape(op, "grad_o_t", *grad_o_t, {n.P, n.B, n.H, n.T, n.dv});
    check_same(op, "grad_o_t", *grad_o_t, q);
  }
  check_shape(op, "o", o, {n.B, n.H, n.T, n.dv});
  check_same(op, "o", o, q);
  check_shape(op, "o_t", o_t, {n.P, n.B, n.H, n.T, n.dv});
  check_same(op, "o_t", o_t, q);
  const at::ScalarType acc = acc_dtype(q.scalar_type());
  check_shape(op, "lse", lse, {n.B, n.H, n.T});
  check_shape(op, "mu", mu, {n.P, n.B, n.H, n.T});
  TORCH_CHECK(lse.scalar_type() == acc && mu.scalar_type() == acc, "grokalign::", op, ": lse and mu must be ",
              acc, " (the forward's row statistics), got ", lse.scalar_type(), " and ", mu.scalar_type());
  TORCH_CHECK(lse.device() == q.device() && mu.device() == q.device(), "grokalign::", op,
              ": lse and mu must be on q's device ", q.device());
}

// The incoming gradient, or zeros of `like`'s shape when autograd passed none.
inline at::Tensor grad_or_zeros(const std::optional<at::Tensor>& g, const at::Tensor& like) {
  return (g.has_value() && g->defined()) ? g->contiguous() : at::zeros_like(like, at::MemoryFormat::Contiguous);
}

// The backward's per-row scalars (reference.py): og = o . g_t per probe [P, B, H, T] and
// D = o . g_o + sum_probes (o_t . g_t - mu og) = sum_j p_ij g_p,ij [B, H, T], in mu's dtype, contiguous.
inline std::tuple<at::Tensor, at::Tensor> row_scalars(const at::Tensor& o, const at::Tensor& o_t,
                                                      const at::Tensor& grad_o, const at::Tensor& grad_o_t,
                                                      const at::Tensor& mu) {
  const auto acc = mu.scalar_type();
  const at::Tensor o_a = o.to(acc), g_t = grad_o_t.to(acc);
  const at::Tensor og = (o_a.unsqueeze(0) * g_t).sum(-1).contiguous();
  const at::Tensor D = ((o_a * grad_o.to(acc)).sum(-1) + ((o_t.to(acc) * g_t).sum(-1) - mu * og).sum(0)).contiguous();
  return {og, D};
}

}  // namespace attention_jvp
}  // namespace grokalign
