// Operator schemas of the grokalign namespace: declared once here; every
// device registers its implementations in its own file (csrc/cpu, csrc/cuda)
// and the dispatcher picks the device. The differentiable ops register their
// autograd (the Autograd key) in csrc/autograd, device-agnostic C++.
#include <torch/library.h>

TORCH_LIBRARY(grokalign, m) {
  // Per-sample Hutchinson sum of a stack of probe products.
  //   g: [P, B, N] (P probes, B samples, N flattened features)
  //   returns out[b] = (1/P) * sum_{p,n} g[p,b,n]^2        -> [B]
  m.def("probe_sqnorm(Tensor g) -> Tensor");
  // Backward of probe_sqnorm: grad_g[p,b,n] = (2/P) * g[p,b,n] * grad_out[b]
  m.def("probe_sqnorm_backward(Tensor g, Tensor grad_out) -> Tensor");

  // Fills out (floating point, contiguous, CPU or CUDA) with independent random signs +-1 from a
  // generator of out's device (None: the default one): the signs grokalign_fast.probes draws for
  // "rademacher" probes from the same generator state (csrc/cpu/rademacher_cpu.cpp,
  // csrc/cuda/rademacher_cuda.cu).
  m.def("rademacher_(Tensor(a!) out, Generator? generator=None) -> ()");

  // The dual-stream engine's epilogue of a piecewise-linear activation (grokalign_fast/dual/rules/act.py)
  // on stacked rows: s [N, n] holds primal rows [0, P) and tangent rows [P, N); tangent row j rides on
  // primal row src(j) = index[j % R] (index [R] long) or j % P (index None).
  //   act: 1 relu, 2 leaky_relu (slope alpha).
  // Returns out [N, n] = s * d, with d = 1 where the primal row's value > 0 and 0 (relu) or alpha
  // (leaky_relu) elsewhere, read from row src(j) for tangent rows; and mask = [z > 0] uint8 [P, n].
  m.def("dual_act(Tensor s, int primal_rows, Tensor? index, int act, float alpha) -> (Tensor out, Tensor mask)");
  // Its backward (and the same pass on any rows): grad_s = grad * d, d from mask as above.
  m.def("dual_act_backward(Tensor grad, Tensor mask, int primal_rows, Tensor? index, int act, float alpha) -> Tensor");

  // The dual-stream engine's epilogue of a smooth activation (grokalign_fast/ops/dual_smooth_act) on
  // stacked rows s [N, n] laid out as for dual_act.
  //   act: 3 gelu, 4 gelu_tanh, 5 silu, 6 tanh, 7 sigmoid (the codes of the MLP ops), 8 elu (alpha),
  //   9 softplus (beta, threshold).
  // Returns out [N, n]: s(z) on the primal rows, s'(z_src(j)) * t_j on tangent row j.
  m.def(
      "dual_smooth_act(Tensor s, int primal_rows, Tensor? index, int act, float alpha, float beta, "
      "float threshold) -> Tensor");
  // Its backward for the cotangent grad [N, n] of out: grad_s [N, n] with
  //   primal row p: grad[p] s'(z_p) + s''(z_p) sum_{tangent rows j on p} grad[j] t_j,
  //   tangent row j: grad[j] s'(z_src(j)).
  m.def(
      "dual_smooth_act_backward(Tensor grad, Tensor s, int primal_rows, Tensor? index, int act, float alpha, "
      "float beta, float threshold) -> Tensor");

  // The dual-stream engine's max pool (grokalign_fast/ops/dual_max_pool): every stacked row gathered
  // at its primal row's argmax. z [N, C, L] (the pooled dimensions flattened), idx [P, C, Lout] long
  // (the primal rows' argmax indices into L, as ATen's max pools return them), index as for dual_act
  // (P = idx.size(0) primal rows). Returns out [N, C, Lout], out[r, c, o] = z[r, c, idx[src(r), c, o]].
  m.def("dual_max_pool(Tensor z, Tensor idx, Tensor? index) -> Tensor");
  // Its backward: grad_z [N, C, length], the scatter-add of grad [N, C, Lout] at the same positions.
  m.def("dual_max_pool_backward(Tensor grad, Tensor idx, Tensor? index, int length) -> Tensor");
  // The argmax indices of a 2-d max pool (grokalign_fast/ops/dual_max_pool), as ATen's max_pool2d with
  // return_indices=True returns them (ties: the first entry of the window; NaN: the last NaN), without
  // the values: z [N, C, H, W] -> idx [N, C, Ho, Wo] long, flat into H W. Not differentiable.
  m.def(
      "max_pool2d_argmax(Tensor z, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "bool ceil_mode) -> Tensor");

  // The dual-stream engine's batch norm in train mode (grokalign_fast/ops/dual_batch_norm_train) on
  // stacked rows s [N, C, L] (primal rows [0, P), any tangent rows after them): the batch statistics
  // per channel over the P * L primal values, mean and var (biased), invstd = 1 / sqrt(var + eps);
  //   primal rows:  (z - mean) invstd weight + bias,    tangent rows:  t invstd weight.
  // Returns out [N, C, L], mean [C] and var [C] (float for half / bfloat16 rows, else the rows' dtype).
  // weight, bias: [C], None for 1 and 0.
  m.def(
      "dual_batch_norm_train(Tensor s, Tensor? weight, Tensor? bias, int primal_rows, float eps) "
      "-> (Tensor out, Tensor mean, Tensor var)");
  // Its backward for the cotangent grad [N, C, L] of out (n = P L, S = sum over the tangent rows of grad t,
  // sum_g and dot = sum of grad and of grad (z - mean) over the primal rows, all per channel):
  //   grad_s: primal rows invstd weight (grad - sum_g / n - (z - mean) invstd^2 (dot + S) / n),
  //           tangent rows grad invstd weight;
  //   grad_weight = invstd (dot + S), grad_bias = sum_g.
  // output_mask: which of (s, weight, bias) need a gradient (the others come back empty).
  m.def(
      "dual_batch_norm_train_backward(Tensor grad, Tensor s, Tensor? weight, Tensor mean, Tensor var, "
      "int primal_rows, float eps, bool[3] output_mask) -> (Tensor grad_s, Tensor grad_weight, Tensor grad_bias)");

  // The dual-stream engine's layer norm / RMS norm (and group norm, through grouped parameters) on
  // stacked rows s [N, n] laid out as for dual_act (grokalign_fast/ops/dual_layer_norm; the math in
  // csrc/common/dual_layer_norm.h). Per primal row z, with c = 1 (layer norm) or 0 (rms: no centring):
  //   mean = c mean(z), rstd = 1 / sqrt(mean((z - mean)^2) + eps), x = (z - mean) rstd;
  //   primal rows:  y = x w + b,     tangent row j:  t' = w rstd (t - c mean(t) - x mean(x t)),  x of src(j).
  // weight, bias: [n] or [G, n] (one shape; P a multiple of G): primal row p takes row p mod G, a
  // tangent row its source row's; None: w = 1, b = 0.
  // Returns out [N, n], mean [P] (0 for rms) and rstd [P] (float for half / bfloat16 rows, else the rows' dtype).
  m.def(
      "dual_layer_norm(Tensor s, Tensor? weight, Tensor? bias, int primal_rows, Tensor? index, float eps, bool rms) "
      "-> (Tensor out, Tensor mean, Tensor rstd)");
  // Its backward for the cotangent grad [N, n] of out. With h_j = grad_j w for tangent row j, and per
  // rider j of primal row p: a_j = mean(x t_j), e_j = mean(x h_j), u_j = rstd (t_j - c mean(t_j) - x a_j),
  // S = sum_j <h_j, u_j>, G = grad_p w - rstd sum_j (a_j h_j + e_j t_j):
  //   grad_s: tangent rows rstd (h_j - c mean(h_j) - x e_j),
  //           primal rows  rstd (G - c mean(G) - x (mean(x G) + S / n));
  //   grad_weight = sum_rows grad_p x + sum_riders grad_j u_j, grad_bias = sum_rows grad_p, per group:
  //   [groups, n] in the statistics' dtype. output_mask: which of (s, weight, bias) need a gradient
  //   (the others come back empty).
  m.def(
      "dual_layer_norm_backward(Tensor grad, Tensor s, Tensor? weight, Tensor mean, Tensor rstd, int primal_rows, "
      "Tensor? index, bool rms, int groups, bool[3] output_mask) -> (Tensor grad_s, Tensor grad_weight, "
      "Tensor grad_bias)");

  // Dual-stream Linear(+bias) + activation: the primal batch and K forward-mode
  // tangent streams through y = s(x W^T + b) (grokalign_fast/ops/mlp/reference.py).
  //   x [B, IN], t [K, R, IN], weight [OUT, IN], bias [OUT]?, index [R] long?
  //   (tangent row r rides on primal row index[r]; None: R == B and r -> r),
  //   act: code of reference.ACT_CODE, alpha: leaky_relu slope,
  //   save: also return the state the backward needs (else those are empty).
  // Returns y = s(z) [B, OUT], t_out = s'(z[index]) * (t W^T) [K, R, OUT],
  //   mask = [z > 0] uint8 [B, OUT] (relu, leaky_relu; else [0, 0]),
  //   preact = [z + b; t W^T] [B + K*R, OUT] (smooth activations; else [0, OUT]).
  m.def(
      "dual_linear(Tensor x, Tensor t, Tensor weight, Tensor? bias, Tensor? index, int act, float alpha, "
      "bool save) -> (Tensor y, Tensor t_out, Tensor mask, Tensor preact)");
  // Same, returning the per-row Hutchinson sum sq[r] = (1/K) sum_k ||t_out[k, r]||^2 [R]
  //   instead of t_out, and preact [B + K*R, OUT] for every activation when save.
  m.def(
      "dual_linear_sqnorm(Tensor x, Tensor t, Tensor weight, Tensor? bias, Tensor? index, int act, "
      "float alpha, bool save) -> (Tensor y, Tensor sq, Tensor preact)");
  // Backwards. dims = [B, K, R, IN, OUT]; output_mask = which of (x, t, weight, bias) need a gradient;
  // x and t are needed only for grad_weight, weight only for grad_x / grad_t.
  // Returns grad_xt = [grad_x; grad_t.reshape(K*R, IN)] (only the rows asked for: [B + K*R | B | K*R, IN],
  //   else [0, IN]), grad_weight [OUT, IN] (else [0]), grad_bias [OUT] (else [0]).
  m.def(
      "dual_linear_backward(Tensor? grad_y, Tensor? grad_t_out, Tensor? x, Tensor? t, Tensor? weight, "
      "Tensor mask, Tensor preact, Tensor? index, SymInt[] dims, int act, float alpha, bool[4] output_mask) "
      "-> (Tensor grad_xt, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "dual_linear_sqnorm_backward(Tensor? grad_y, Tensor? grad_sq, Tensor? x, Tensor? t, Tensor? weight, "
      "Tensor preact, Tensor? index, SymInt[] dims, int act, float alpha, bool[4] output_mask) "
      "-> (Tensor grad_xt, Tensor grad_weight, Tensor grad_bias)");

  // The output-space Hutchinson estimate for a piecewise-linear MLP in one pass
  // (csrc/common/reverse_mlp.h; grokalign_fast/ops/mlp/reverse_mlp.py is the specification).
  //   x [B, IN], u [K, R, C] output probes riding on rows index [R] (None: R == B),
  //   weights[l] [n_l, n_{l-1}], biases: the present biases, has_bias[l]: layer l has one,
  //   acts[l]: 0 identity, 1 relu, 2 leaky_relu (slope alphas[l]).
  // Returns y = the MLP's output [B, C], est[r] = (1/K) sum_k ||J(x[index[r]])^T u[k, r]||^2 [R]
  //   (with root=True its square root, whose gradient is 0 where est[r] = 0; either times scale, so
  //   that a penalty weight lambda / R makes sum(est) the weighted batch mean),
  //   and the state the backward needs (3L - 1 tensors, see csrc/common/reverse_mlp.h).
  m.def(
      "reverse_mlp(Tensor x, Tensor u, Tensor? index, Tensor[] weights, Tensor[] biases, bool[] has_bias, "
      "int[] acts, float[] alphas, bool root=False, float scale=1.0) -> (Tensor y, Tensor est, Tensor[] saved)");
  // Returns grad_x ([0] unless need_x), one grad per weight, one per present bias.
  m.def(
      "reverse_mlp_backward(Tensor? grad_y, Tensor? grad_est, Tensor x, Tensor u, Tensor? index, Tensor[] weights, "
      "Tensor[] saved, bool[] has_bias, bool need_x, bool root=False, float scale=1.0) -> (Tensor grad_x, Tensor[] grad_weights, "
      "Tensor[] grad_biases)");
  // The forward-mode (input-space) Hutchinson estimate for a whole piecewise-linear MLP in one pass
  // (csrc/common/dual_mlp_sqnorm.h): the MLP runs on the stacked rows [x; v] with the tangent rows
  // taking the primal rows' slopes. v [K, R, IN] input probes riding on rows index [R];
  // other arguments as reverse_mlp. Returns y [B, C], sq[r] = (1/K) sum_k ||J(x[index[r]]) v[k, r]||^2 [R],
  // (root and scale as in reverse_mlp) and the state the backward needs (2L tensors, see
  // csrc/common/dual_mlp_sqnorm.h).
  // The backward's arguments are reverse_mlp_backward's.
  m.def(
      "dual_mlp_sqnorm(Tensor x, Tensor v, Tensor? index, Tensor[] weights, Tensor[] biases, bool[] has_bias, "
      "int[] acts, float[] alphas, bool root=False, float scale=1.0) -> (Tensor y, Tensor sq, Tensor[] saved)");
  m.def(
      "dual_mlp_sqnorm_backward(Tensor? grad_y, Tensor? grad_sq, Tensor x, Tensor v, Tensor? index, Tensor[] weights, "
      "Tensor[] saved, bool[] has_bias, bool need_x, bool root=False, float scale=1.0) -> (Tensor grad_x, Tensor[] grad_weights, "
      "Tensor[] grad_biases)");

  // Scaled dot-product attention and its forward-mode derivative along P tangents, blockwise
  // (flash-style: the [T, S] scores are never formed; grokalign_fast/ops/attention_jvp/reference.py is
  // the specification, csrc/cpu/attention_jvp_cpu.cpp the algorithm).
  //   q [B, H, T, d], k [B, H, S, d], v [B, H, S, dv] (S >= 1); tangents q_t [P, B, H, T, d],
  //   k_t [P, B, H, S, d], v_t [P, B, H, S, dv], all of q's dtype and device; causal: key j visible to
  //   query i iff j <= i (top-left, as F.scaled_dot_product_attention(is_causal=True)); scale c.
  // With s = c q k^T (masked), p = softmax_j(s), s_t = c (q_t k^T + q k_t^T):
  //   o = p v [B, H, T, dv], o_t = (p * (s_t - mu)) v + p v_t [P, B, H, T, dv],
  //   lse = log sum_j exp(s_ij) [B, H, T] and mu_i = sum_j p_ij s_t,ij [P, B, H, T], the row
  //   statistics the backward needs, in the accumulation dtype (float for half / bfloat16 / float,
  //   double for double).
  m.def(
      "attention_jvp(Tensor q, Tensor k, Tensor v, Tensor q_t, Tensor k_t, Tensor v_t, bool causal, float scale) "
      "-> (Tensor o, Tensor o_t, Tensor lse, Tensor mu)");
  // Its backward: the gradients of q, k, v, q_t, k_t, v_t (in that order, their shapes) of a loss
  // whose gradients on o and o_t are grad_o, grad_o_t (None: zero), from the inputs and the forward's
  // four outputs (the formulas: reference.py's docstring). Not itself differentiable.
  m.def(
      "attention_jvp_backward(Tensor? grad_o, Tensor? grad_o_t, Tensor q, Tensor k, Tensor v, Tensor q_t, "
      "Tensor k_t, Tensor v_t, Tensor o, Tensor o_t, Tensor lse, Tensor mu, bool causal, float scale) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_q_t, Tensor grad_k_t, Tensor grad_v_t)");
}
