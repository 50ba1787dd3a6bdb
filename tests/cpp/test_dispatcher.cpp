// libtorch check of the grokalign operators built by CMakeLists.txt: looks the
// operators up in the dispatcher (so it proves that linking grokalign_ops
// registers them), runs them on the CPU and compares with plain ATen. Built
// with GROKALIGN_TEST_CUDA (CMake: GROKALIGN_WITH_CUDA=ON), it also requires the
// CUDA kernels to be registered and, when a GPU is present, checks their numbers.
// The ops' autograd is C++ (csrc/autograd), so gradients flow here too: checked
// for one epilogue op against autograd through the same formula in ATen.
// Exit status 0 when every check passes, 1 otherwise.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstdio>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s  %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

void expect_close(const at::Tensor& got, const at::Tensor& want, double rtol, double atol,
                  const std::string& what) {
  const bool same_meta = got.sizes() == want.sizes() && got.scalar_type() == want.scalar_type();
  const bool close = same_meta && at::allclose(got, want, rtol, atol);
  std::string detail = what;
  if (!same_meta) {
    detail += " (got " + c10::str(got.sizes(), " ", got.scalar_type()) + ", want " +
              c10::str(want.sizes(), " ", want.scalar_type()) + ")";
  } else if (!close) {
    detail += " (max abs err " + c10::str((got - want).abs().max().item<double>()) + ")";
  }
  expect(close, detail);
}

// The specification, in ATen: out[b] = (1/P) sum_{p,n} g[p,b,n]^2.
at::Tensor reference_sqnorm(const at::Tensor& g) {
  const at::Tensor g64 = g.to(at::kDouble);
  return (g64.pow(2).sum({0, 2}) / static_cast<double>(g.size(0))).to(g.scalar_type());
}

// grad_g[p,b,n] = (2/P) g[p,b,n] grad_out[b].
at::Tensor reference_sqnorm_backward(const at::Tensor& g, const at::Tensor& grad_out) {
  const at::Tensor g64 = g.to(at::kDouble);
  const at::Tensor d64 = grad_out.to(at::kDouble).view({1, -1, 1});
  return (g64 * d64 * (2.0 / static_cast<double>(g.size(0)))).to(g.scalar_type());
}

// Runs both operators on `device` over dtypes and odd shapes (empty ones and a
// non-contiguous input too) and compares with the float64 ATen reference.
template <typename Sqnorm, typename SqnormBackward>
void check_numbers(const Sqnorm& sqnorm, const SqnormBackward& sqnorm_backward, at::Device device) {
  struct Case {
    at::ScalarType dtype;
    double rtol, atol;
  };
  // half/bfloat16 accumulate in float inside the kernels.
  const Case cases[] = {{at::kDouble, 1e-12, 1e-12},
                        {at::kFloat, 1e-5, 1e-6},
                        {at::kHalf, 1e-2, 1e-3},
                        {at::kBFloat16, 2e-2, 1e-2}};
  const int64_t shapes[][3] = {{1, 1, 1}, {3, 5, 7}, {4, 6, 131}, {2, 0, 9}, {2, 3, 0}};
  const std::string on = " on " + device.str();
  for (const auto& c : cases) {
    const auto opts = at::TensorOptions().dtype(c.dtype);
    for (const auto& s : shapes) {
      const std::string tag = c10::str(c.dtype, " [", s[0], ", ", s[1], ", ", s[2], "]", on);
      const at::Tensor g = at::randn({s[0], s[1], s[2]}, opts);
      const at::Tensor grad_out = at::randn({s[1]}, opts);
      expect_close(sqnorm.call(g.to(device)).cpu(), reference_sqnorm(g), c.rtol, c.atol,
                   "probe_sqnorm " + tag);
      expect_close(sqnorm_backward.call(g.to(device), grad_out.to(device)).cpu(),
                   reference_sqnorm_backward(g, grad_out), c.rtol, c.atol,
                   "probe_sqnorm_backward " + tag);
    }
    // Non-contiguous inputs: a [B, P, N] tensor seen as [P, B, N], a strided grad_out.
    const at::Tensor g = at::randn({5, 3, 17}, opts).to(device).transpose(0, 1);
    const at::Tensor grad_out = at::randn({10}, opts).to(device).slice(0, 0, 10, 2);
    expect_close(sqnorm.call(g).cpu(), reference_sqnorm(g.cpu()), c.rtol, c.atol,
                 c10::str("probe_sqnorm ", c.dtype, " non-contiguous", on));
    expect_close(sqnorm_backward.call(g, grad_out).cpu(),
                 reference_sqnorm_backward(g.cpu(), grad_out.cpu()), c.rtol, c.atol,
                 c10::str("probe_sqnorm_backward ", c.dtype, " non-contiguous", on));
  }
}

// grokalign::reverse_mlp from C++: an identity-activation MLP is linear, so
// J = W2 W1 for every x, y = x J^T and est[r] = (1/K) sum_k ||u[k, r] J||^2.
void check_reverse_mlp() {
  using Fn = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::TensorList, at::TensorList,
      c10::List<bool>, at::IntArrayRef, at::ArrayRef<double>, bool, double);
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("grokalign::reverse_mlp", "").typed<Fn>();
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor x = at::randn({5, 7}, opts), w1 = at::randn({6, 7}, opts), w2 = at::randn({3, 6}, opts);
  const at::Tensor u = at::randn({2, 4, 3}, opts);
  const at::Tensor index = at::tensor(std::vector<int64_t>{4, 0, 4, 2});
  const std::vector<at::Tensor> weights = {w1, w2};
  c10::List<bool> has_bias({false, false});
  const std::vector<int64_t> acts = {0, 0};
  const std::vector<double> alphas = {0.0, 0.0};
  const auto [y, est, saved] = op.call(x, u, index, weights, {}, has_bias, acts, alphas, /*root=*/false, 1.0);
  const at::Tensor J = at::mm(w2, w1);
  expect_close(y, at::mm(x, J.t()), 1e-12, 1e-12, "reverse_mlp output of a linear MLP");
  expect_close(est, at::matmul(u, J).pow(2).sum({0, 2}) / 2.0, 1e-12, 1e-12,
               "reverse_mlp estimate of a linear MLP (index with a repeated row)");
  expect(saved.size() == 5, "reverse_mlp returns 3L - 1 saved tensors");
  const auto rooted = std::get<1>(op.call(x, u, index, weights, {}, has_bias, acts, alphas, /*root=*/true, 1.0));
  expect_close(rooted, est.sqrt(), 1e-12, 1e-12, "reverse_mlp with root=true returns the square root of est");
  const auto scaled = std::get<1>(op.call(x, u, index, weights, {}, has_bias, acts, alphas, /*root=*/true, 0.25));
  expect_close(scaled, est.sqrt() * 0.25, 1e-12, 1e-12, "reverse_mlp with scale=0.25 returns 0.25 sqrt(est)");
}

// grokalign::rademacher_ against its specification in ATen (grokalign_fast.probes.rademacher_reference):
// W = ceil(n / 32) words from randint(0, 2^32), element e the sign of bit e % 32 of word e / 32.
void check_rademacher() {
  using Fn = void(const at::Tensor&, std::optional<at::Generator>);
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("grokalign::rademacher_", "").typed<Fn>();
  for (const int64_t n : {int64_t{0}, int64_t{1}, int64_t{33}, int64_t{784 * 3 + 5}}) {
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(7 + n);
    const at::Tensor words = at::randint(0, int64_t{1} << 32, {(n + 31) / 32}, gen, at::TensorOptions().dtype(at::kLong));
    const at::Tensor e = at::arange(n, at::TensorOptions().dtype(at::kLong));
    const at::Tensor bits = words.index_select(0, at::floor_divide(e, 32)).bitwise_right_shift(e.remainder(32)).bitwise_and(1);
    const at::Tensor want = (bits * 2 - 1).to(at::kFloat);
    at::Generator again = at::make_generator<at::CPUGeneratorImpl>(7 + n);
    const at::Tensor got = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
    op.call(got, again);
    expect(at::equal(got, want), "rademacher_ draws the reference signs (" + std::to_string(n) + " entries)");
  }
}

// The dual-stream engine's epilogue ops from C++, one case each against ATen on stacked rows: three
// primal rows, then two streams of two tangent rows riding on primal rows index = [2, 0].
void check_epilogues() {
  auto& dispatcher = c10::Dispatcher::singleton();
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor index = at::tensor(std::vector<int64_t>{2, 0});
  const at::Tensor src = index.repeat({2});  // the primal row of each tangent row

  // dual_smooth_act, tanh (code 6): tanh(z) on the primal rows, (1 - tanh(z_src)^2) t on the tangent rows.
  using SmoothFn = at::Tensor(const at::Tensor&, int64_t, const std::optional<at::Tensor>&, int64_t, double, double,
                              double);
  const auto smooth = dispatcher.findSchemaOrThrow("grokalign::dual_smooth_act", "").typed<SmoothFn>();
  const at::Tensor s = at::randn({7, 5}, opts);
  const at::Tensor th = at::tanh(s.slice(0, 0, 3));
  expect_close(smooth.call(s, 3, index, 6, 1.0, 1.0, 20.0),
               at::cat({th, s.slice(0, 3) * (1 - th.pow(2)).index_select(0, src)}), 1e-12, 1e-12,
               "dual_smooth_act (tanh) against ATen");

  // dual_max_pool: every row gathered at its primal row's argmax (ATen's max_pool1d indices).
  using PoolFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&);
  const auto pool = dispatcher.findSchemaOrThrow("grokalign::dual_max_pool", "").typed<PoolFn>();
  const at::Tensor z = at::randn({7, 2, 9}, opts);
  const auto [maxima, idx] = at::max_pool1d_with_indices(z.slice(0, 0, 3), {3}, {2});
  const at::Tensor pooled = pool.call(z, idx, index);
  expect_close(pooled, z.gather(2, at::cat({idx, idx.index_select(0, src)})), 0, 0,
               "dual_max_pool against ATen's gather");
  expect_close(pooled.slice(0, 0, 3), maxima, 0, 0, "dual_max_pool's primal rows are ATen's maxima");

  // dual_batch_norm_train: statistics of the primal rows, (z - mean) invstd w + b and t invstd w.
  using NormFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                                                const std::optional<at::Tensor>&, int64_t, double);
  const auto norm = dispatcher.findSchemaOrThrow("grokalign::dual_batch_norm_train", "").typed<NormFn>();
  const at::Tensor w = at::rand({2}, opts) + 0.5, b = at::randn({2}, opts);
  const auto [out, mean, var] = norm.call(z, w, b, 3, 1e-3);
  const at::Tensor primal = z.slice(0, 0, 3);
  const at::Tensor want_var = at::var(primal, at::IntArrayRef{0, 2}, /*unbiased=*/false);
  const at::Tensor scale = (w / (want_var + 1e-3).sqrt()).view({1, 2, 1});
  const at::Tensor want = at::cat({(primal - primal.mean({0, 2}, true)) * scale + b.view({1, 2, 1}),
                                   z.slice(0, 3) * scale});
  expect_close(mean, primal.mean({0, 2}), 1e-12, 1e-12, "dual_batch_norm_train mean of the primal rows");
  expect_close(var, want_var, 1e-12, 1e-12, "dual_batch_norm_train variance of the primal rows");
  expect_close(out, want, 1e-12, 1e-12, "dual_batch_norm_train against ATen");
}

// A libtorch user gets the gradient of an epilogue op: dual_smooth_act (tanh, the term s''(z) t of the
// tangent rows included) called through the dispatcher on rows that require a gradient, against
// autograd through the same map written with ATen ops.
void check_epilogue_gradient() {
  using SmoothFn = at::Tensor(const at::Tensor&, int64_t, const std::optional<at::Tensor>&, int64_t, double, double,
                              double);
  const auto smooth =
      c10::Dispatcher::singleton().findSchemaOrThrow("grokalign::dual_smooth_act", "").typed<SmoothFn>();
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor index = at::tensor(std::vector<int64_t>{2, 0});
  const at::Tensor src = index.repeat({2});
  const at::Tensor rows = at::randn({7, 5}, opts), cot = at::randn({7, 5}, opts);
  const at::Tensor s = rows.clone().set_requires_grad(true), s_ref = rows.clone().set_requires_grad(true);
  const at::Tensor out = smooth.call(s, 3, index, 6, 1.0, 1.0, 20.0);
  expect(out.requires_grad(), "dual_smooth_act's output carries a gradient (its C++ autograd)");
  if (!out.requires_grad()) return;
  const at::Tensor got = torch::autograd::grad({out}, {s}, {cot})[0];
  const at::Tensor th = at::tanh(s_ref.slice(0, 0, 3));
  const at::Tensor ref = at::cat({th, s_ref.slice(0, 3) * (1 - th.pow(2)).index_select(0, src)});
  const at::Tensor want = torch::autograd::grad({ref}, {s_ref}, {cot})[0];
  expect_close(got, want, 1e-12, 1e-12, "dual_smooth_act's gradient (tanh) against autograd through ATen");
}

}  // namespace

int main() {
  using SqnormFn = at::Tensor(const at::Tensor&);
  using SqnormBackwardFn = at::Tensor(const at::Tensor&, const at::Tensor&);
  auto& dispatcher = c10::Dispatcher::singleton();
  std::optional<c10::TypedOperatorHandle<SqnormFn>> sqnorm_op;
  std::optional<c10::TypedOperatorHandle<SqnormBackwardFn>> sqnorm_backward_op;
  try {
    sqnorm_op = dispatcher.findSchemaOrThrow("grokalign::probe_sqnorm", "").typed<SqnormFn>();
    sqnorm_backward_op =
        dispatcher.findSchemaOrThrow("grokalign::probe_sqnorm_backward", "").typed<SqnormBackwardFn>();
  } catch (const c10::Error& e) {
    std::fprintf(stderr,
                 "FAIL  grokalign operators are not registered: was libgrokalign_ops linked "
                 "(with --no-as-needed)?\n%s\n",
                 e.what_without_backtrace());
    return 1;
  }
  const auto& sqnorm = *sqnorm_op;
  const auto& sqnorm_backward = *sqnorm_backward_op;
  expect(sqnorm.hasKernelForDispatchKey(c10::DispatchKey::CPU), "probe_sqnorm has a CPU kernel");
  expect(sqnorm_backward.hasKernelForDispatchKey(c10::DispatchKey::CPU),
         "probe_sqnorm_backward has a CPU kernel");

  at::manual_seed(0);
  try {
    check_numbers(sqnorm, sqnorm_backward, at::kCPU);
    check_reverse_mlp();
    check_rademacher();
    check_epilogues();
    check_epilogue_gradient();
#ifdef GROKALIGN_TEST_CUDA
    expect(sqnorm.hasKernelForDispatchKey(c10::DispatchKey::CUDA), "probe_sqnorm has a CUDA kernel");
    expect(sqnorm_backward.hasKernelForDispatchKey(c10::DispatchKey::CUDA),
           "probe_sqnorm_backward has a CUDA kernel");
    if (at::hasCUDA()) {
      check_numbers(sqnorm, sqnorm_backward, at::kCUDA);
    } else {
      std::printf("skip  CUDA numbers: no GPU here\n");
    }
#endif
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "FAIL  unexpected error: %s\n", e.what_without_backtrace());
    return 1;
  }

  // Bad inputs must raise a c10::Error, not crash.
  auto raises = [](auto&& fn) {
    try {
      fn();
    } catch (const c10::Error&) {
      return true;
    }
    return false;
  };
  expect(raises([&] { sqnorm.call(at::randn({3, 4})); }), "probe_sqnorm rejects a 2-D input");
  expect(raises([&] { sqnorm.call(at::randn({0, 4, 5})); }), "probe_sqnorm rejects P = 0");
  expect(raises([&] { sqnorm.call(at::ones({2, 3, 4}, at::kLong)); }),
         "probe_sqnorm rejects an integer input");
  expect(raises([&] { sqnorm_backward.call(at::randn({2, 3, 4}), at::randn({4})); }),
         "probe_sqnorm_backward rejects grad_out of the wrong length");

  if (failures != 0) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
