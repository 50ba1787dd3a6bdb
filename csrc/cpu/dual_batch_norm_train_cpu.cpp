// CPU kernels of grokalign::dual_batch_norm_train and grokalign::dual_batch_norm_train_backward
// (schemas in csrc/grokalign.cpp; the math in csrc/common/dual_batch_norm_train.h). Each pass is a
// loop over the channels for the per-channel sums (two passes over the primal rows for mean and
// variance; one over all rows for the backward's three sums), accumulated in at::acc_type (double
// for float rows), then one loop over the (row, channel) pairs for the elementwise part.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/dual_batch_norm_train.h"
#include "cpu/row_passes_cpu.h"

namespace grokalign {
namespace {

using at::Tensor;
namespace bn = dual_batch_norm_train;

// Channels per task for per-channel work of `per_channel` elements.
int64_t channel_grain(int64_t per_channel) { return row_passes::cpu::grain_rows(per_channel); }

std::tuple<Tensor, Tensor, Tensor> dual_batch_norm_train_cpu(const Tensor& s_in, const std::optional<Tensor>& weight,
                                                             const std::optional<Tensor>& bias, int64_t P,
                                                             double eps) {
  bn::check("dual_batch_norm_train", s_in, P, weight, bias);
  const Tensor s = s_in.contiguous();
  const int64_t N = s.size(0), C = s.size(1), L = s.size(2), n = P * L;
  const auto stat_options = s.options().dtype(bn::stat_dtype(s));
  Tensor mean = at::empty({C}, stat_options), var = at::empty({C}, stat_options);
  Tensor out = at::empty_like(s);
  const Tensor w = bn::channel_param(weight, s, 1.0), b = bn::channel_param(bias, s, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dual_batch_norm_train_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const scalar_t* sp = s.data_ptr<scalar_t>();
    opmath_t* mp = mean.data_ptr<opmath_t>();
    opmath_t* vp = var.data_ptr<opmath_t>();
    at::parallel_for(0, C, channel_grain(n), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        acc_t sum = 0;
        for (int64_t r = 0; r < P; ++r) {
          const scalar_t* x = sp + (r * C + c) * L;
          for (int64_t l = 0; l < L; ++l) sum += static_cast<acc_t>(x[l]);
        }
        const acc_t mu = n > 0 ? sum / static_cast<acc_t>(n) : acc_t(0);
        acc_t sq = 0;
        for (int64_t r = 0; r < P; ++r) {
          const scalar_t* x = sp + (r * C + c) * L;
          for (int64_t l = 0; l < L; ++l) {
            const acc_t d = static_cast<acc_t>(x[l]) - mu;
            sq += d * d;
          }
        }
        mp[c] = static_cast<opmath_t>(mu);
        vp[c] = static_cast<opmath_t>(n > 0 ? sq / static_cast<acc_t>(n) : acc_t(0));
      }
    });
    const opmath_t* wp = w.data_ptr<opmath_t>();
    const opmath_t* bp = b.data_ptr<opmath_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const opmath_t e = static_cast<opmath_t>(eps);
    at::parallel_for(0, N * C, row_passes::cpu::grain_rows(L), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t r = q / C, c = q - r * C;
        const opmath_t scale = bn::invstd(vp[c], e) * wp[c];
        const opmath_t shift = r < P ? bp[c] - mp[c] * scale : opmath_t(0);
        const scalar_t* x = sp + q * L;
        scalar_t* y = op + q * L;
        for (int64_t l = 0; l < L; ++l) y[l] = static_cast<scalar_t>(static_cast<opmath_t>(x[l]) * scale + shift);
      }
    });
  });
  return {out, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> dual_batch_norm_train_backward_cpu(
    const Tensor& grad_in, const Tensor& s_in, const std::optional<Tensor>& weight, const Tensor& mean_in,
    const Tensor& var_in, int64_t P, double eps, std::array<bool, 3> output_mask) {
  bn::check("dual_batch_norm_train_backward", s_in, P, weight, std::nullopt);
  bn::check_backward(grad_in, s_in, mean_in, var_in);
  const Tensor s = s_in.contiguous(), grad = grad_in.contiguous();
  const Tensor mean = mean_in.contiguous(), var = var_in.contiguous();
  const int64_t N = s.size(0), C = s.size(1), L = s.size(2), n = P * L;
  const auto stat_options = mean.options();
  const Tensor w = bn::channel_param(weight, s, 1.0);
  // Per channel: sum_g, dot + S, and invstd (dot + S) (grad_w).
  Tensor sum_g = at::empty({C}, stat_options), dots = at::empty({C}, stat_options);
  Tensor grad_w = at::empty({C}, stat_options);
  Tensor grad_s = output_mask[0] ? at::empty_like(s) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dual_batch_norm_train_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const opmath_t* mp = mean.data_ptr<opmath_t>();
    const opmath_t* vp = var.data_ptr<opmath_t>();
    const opmath_t* wp = w.data_ptr<opmath_t>();
    const opmath_t e = static_cast<opmath_t>(eps);
    opmath_t* sgp = sum_g.data_ptr<opmath_t>();
    opmath_t* dp = dots.data_ptr<opmath_t>();
    opmath_t* gwp = grad_w.data_ptr<opmath_t>();
    at::parallel_for(0, C, channel_grain(N * L), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const acc_t mu = static_cast<acc_t>(mp[c]);
        acc_t sg = 0, dot = 0, S = 0;
        for (int64_t r = 0; r < P; ++r) {
          const scalar_t* x = sp + (r * C + c) * L;
          const scalar_t* g = gp + (r * C + c) * L;
          for (int64_t l = 0; l < L; ++l) {
            const acc_t gv = static_cast<acc_t>(g[l]);
            sg += gv;
            dot += gv * (static_cast<acc_t>(x[l]) - mu);
          }
        }
        for (int64_t r = P; r < N; ++r) {
          const scalar_t* t = sp + (r * C + c) * L;
          const scalar_t* g = gp + (r * C + c) * L;
          for (int64_t l = 0; l < L; ++l) S += static_cast<acc_t>(g[l]) * static_cast<acc_t>(t[l]);
        }
        sgp[c] = static_cast<opmath_t>(sg);
        dp[c] = static_cast<opmath_t>(dot + S);
        gwp[c] = bn::invstd(vp[c], e) * dp[c];
      }
    });
    if (!output_mask[0]) return;
    scalar_t* op = grad_s.data_ptr<scalar_t>();
    const opmath_t inv_n = opmath_t(1) / static_cast<opmath_t>(n);
    at::parallel_for(0, N * C, row_passes::cpu::grain_rows(L), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t r = q / C, c = q - r * C;
        const opmath_t is = bn::invstd(vp[c], e);
        const opmath_t scale = is * wp[c];
        const scalar_t* g = gp + q * L;
        scalar_t* y = op + q * L;
        if (r >= P) {
          for (int64_t l = 0; l < L; ++l) y[l] = static_cast<scalar_t>(static_cast<opmath_t>(g[l]) * scale);
          continue;
        }
        const scalar_t* x = sp + q * L;
        const opmath_t mg = sgp[c] * inv_n, k = is * is * dp[c] * inv_n, mu = mp[c];
        for (int64_t l = 0; l < L; ++l) {
          const opmath_t gv = static_cast<opmath_t>(g[l]), xv = static_cast<opmath_t>(x[l]);
          y[l] = static_cast<scalar_t>(scale * (gv - mg - (xv - mu) * k));
        }
      }
    });
  });
  return {output_mask[0] ? grad_s : at::empty({0}, s.options()),
          output_mask[1] ? grad_w : at::empty({0}, stat_options),
          output_mask[2] ? sum_g : at::empty({0}, stat_options)};
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, CPU, m) {
  m.impl("dual_batch_norm_train", &dual_batch_norm_train_cpu);
  m.impl("dual_batch_norm_train_backward", &dual_batch_norm_train_backward_cpu);
}

}  // namespace grokalign
