// Operator schemas of the grokalign namespace: declared once here; every
// device registers its implementations in its own file (csrc/cpu, csrc/cuda)
// and the dispatcher picks the device.
#include <torch/library.h>

TORCH_LIBRARY(grokalign, m) {
  // Per-sample Hutchinson sum of a stack of probe products.
  //   g: [P, B, N] (P probes, B samples, N flattened features)
  //   returns out[b] = (1/P) * sum_{p,n} g[p,b,n]^2        -> [B]
  m.def("probe_sqnorm(Tensor g) -> Tensor");
  // Backward of probe_sqnorm: grad_g[p,b,n] = (2/P) * g[p,b,n] * grad_out[b]
  m.def("probe_sqnorm_backward(Tensor g, Tensor grad_out) -> Tensor");

  // Dual-stream Linear(+bias) + activation: the primal batch and K forward-mode
  // tangent streams through y = s(x W^T + b) (grokalign_fast/ops/mlp/reference.py).
  //   x [B, IN], t [K, R, IN], weight [OUT, IN], bias [OUT]?, index [R] long?
  //   (tangent row r rides on primal row index[r]; None: R == B and r -> r),
  //   act: code of reference.ACT_CODE, alpha: leaky_relu slope,
  //   save: also return the state the backward needs (else those are empty).
  // Returns y = s(z) [B, OUT], t_out = s'(z[index]) * (t W^T) [K, R, OUT],
  //   mask = [z > 0] uint8 [B, OUT] (relu, leaky_relu; else [0, 0]),
  //   zu = [z + b; t W^T] [B + K*R, OUT] (smooth activations; else [0, OUT]).
  m.def(
      "dual_linear(Tensor x, Tensor t, Tensor weight, Tensor? bias, Tensor? index, int act, float alpha, "
      "bool save) -> (Tensor y, Tensor t_out, Tensor mask, Tensor zu)");
  // Same, returning the per-row Hutchinson sum sq[r] = (1/K) sum_k ||t_out[k, r]||^2 [R]
  //   instead of t_out, and zu [B + K*R, OUT] for every activation when save.
  m.def(
      "dual_linear_sqnorm(Tensor x, Tensor t, Tensor weight, Tensor? bias, Tensor? index, int act, "
      "float alpha, bool save) -> (Tensor y, Tensor sq, Tensor zu)");
  // Backwards. dims = [B, K, R, IN, OUT]; output_mask = which of (x, t, weight, bias) need a gradient;
  // x and t are needed only for grad_weight, weight only for grad_x / grad_t.
  // Returns grad_xt = [grad_x; grad_t.reshape(K*R, IN)] (only the rows asked for: [B + K*R | B | K*R, IN],
  //   else [0, IN]), grad_weight [OUT, IN] (else [0]), grad_bias [OUT] (else [0]).
  m.def(
      "dual_linear_backward(Tensor? grad_y, Tensor? grad_t_out, Tensor? x, Tensor? t, Tensor? weight, "
      "Tensor mask, Tensor zu, Tensor? index, SymInt[] dims, int act, float alpha, bool[4] output_mask) "
      "-> (Tensor grad_xt, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "dual_linear_sqnorm_backward(Tensor? grad_y, Tensor? grad_sq, Tensor? x, Tensor? t, Tensor? weight, "
      "Tensor zu, Tensor? index, SymInt[] dims, int act, float alpha, bool[4] output_mask) "
      "-> (Tensor grad_xt, Tensor grad_weight, Tensor grad_bias)");
}
