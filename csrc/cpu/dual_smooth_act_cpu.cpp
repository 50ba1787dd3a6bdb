// CPU kernels of grokalign::dual_smooth_act and grokalign::dual_smooth_act_backward (schemas in
// csrc/grokalign.cpp; the math in csrc/common/dual_smooth_act.h). Both passes run over the primal
// rows: each evaluates s' (and s'') of its primal row once, into a row buffer in the accumulation
// type, and then serves the tangent rows riding on it, so no transcendental is computed per
// tangent entry and no slope tensor is made or saved.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common/dual_smooth_act.h"
#include "cpu/row_passes_cpu.h"
#include "common/stacked_rows.h"

namespace grokalign {
namespace {

using at::Tensor;

// The rows' grain for work proportional to n (1 + riders per primal row) per primal row.
int64_t grain(int64_t n, int64_t P, int64_t N) {
  return row_passes::cpu::grain_rows(n * ((N + P - 1) / P));
}

Tensor dual_smooth_act_cpu(const Tensor& s_in, int64_t P, const std::optional<Tensor>& index_in, int64_t act,
                           double alpha, double beta, double threshold) {
  const int64_t R = dual_smooth_act::check("dual_smooth_act", s_in, P, index_in, act);
  const Tensor s = s_in.contiguous();
  const std::optional<Tensor> index = stacked_rows::checked_index("dual_smooth_act", index_in, P);
  const auto [offsets, rows] = stacked_rows::riders(index, P);
  const int64_t N = s.size(0), n = s.size(1), K = (N - P) / R;
  Tensor out = at::empty_like(s);
  if (N * n == 0) return out;
  const int64_t* op_off = offsets.defined() ? offsets.data_ptr<int64_t>() : nullptr;
  const int64_t* op_rows = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dual_smooth_act_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dual_smooth_act::Params<acc_t> prm{static_cast<acc_t>(alpha), static_cast<acc_t>(beta),
                                             static_cast<acc_t>(threshold)};
    const scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    dual_smooth_act::dispatch(act, [&](auto a) {
      constexpr int A = decltype(a)::value;
      at::parallel_for(0, P, grain(n, P, N), [&](int64_t p0, int64_t p1) {
        std::vector<acc_t> d1(n);
        acc_t unused = 0;
        for (int64_t p = p0; p < p1; ++p) {
          const scalar_t* z = sp + p * n;
          scalar_t* y = outp + p * n;
          for (int64_t i = 0; i < n; ++i) {
            acc_t v;
            dual_smooth_act::eval<A, true, true, false>(static_cast<acc_t>(z[i]), prm, v, d1[i], unused);
            y[i] = static_cast<scalar_t>(v);
          }
          stacked_rows::for_each_rider(p, K, R, op_off, op_rows, [&](int64_t j) {
            const scalar_t* __restrict__ t = sp + (P + j) * n;
            scalar_t* __restrict__ o = outp + (P + j) * n;
            for (int64_t i = 0; i < n; ++i) o[i] = static_cast<scalar_t>(static_cast<acc_t>(t[i]) * d1[i]);
          });
        }
      });
    });
  });
  return out;
}

Tensor dual_smooth_act_backward_cpu(const Tensor& grad_in, const Tensor& s_in, int64_t P,
                                    const std::optional<Tensor>& index_in, int64_t act, double alpha, double beta,
                                    double threshold) {
  const int64_t R = dual_smooth_act::check("dual_smooth_act_backward", s_in, P, index_in, act);
  dual_smooth_act::check_grad(grad_in, s_in);
  const Tensor s = s_in.contiguous();
  const Tensor grad = grad_in.contiguous();
  const std::optional<Tensor> index = stacked_rows::checked_index("dual_smooth_act_backward", index_in, P);
  const auto [offsets, rows] = stacked_rows::riders(index, P);
  const int64_t N = s.size(0), n = s.size(1), K = (N - P) / R;
  Tensor out = at::empty_like(s);
  if (N * n == 0) return out;
  const int64_t* op_off = offsets.defined() ? offsets.data_ptr<int64_t>() : nullptr;
  const int64_t* op_rows = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dual_smooth_act_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dual_smooth_act::Params<acc_t> prm{static_cast<acc_t>(alpha), static_cast<acc_t>(beta),
                                             static_cast<acc_t>(threshold)};
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    dual_smooth_act::dispatch(act, [&](auto a) {
      constexpr int A = decltype(a)::value;
      at::parallel_for(0, P, grain(n, P, N), [&](int64_t p0, int64_t p1) {
        std::vector<acc_t> d1(n), d2(n), gt(n);  // s'(z_p), s''(z_p), sum over the riders of g_j t_j
        acc_t unused = 0;
        for (int64_t p = p0; p < p1; ++p) {
          const scalar_t* z = sp + p * n;
          for (int64_t i = 0; i < n; ++i) {
            dual_smooth_act::eval<A, false, true, true>(static_cast<acc_t>(z[i]), prm, unused, d1[i], d2[i]);
            gt[i] = acc_t(0);
          }
          stacked_rows::for_each_rider(p, K, R, op_off, op_rows, [&](int64_t j) {
            const scalar_t* __restrict__ g = gp + (P + j) * n;
            const scalar_t* __restrict__ t = sp + (P + j) * n;
            scalar_t* __restrict__ o = outp + (P + j) * n;
            for (int64_t i = 0; i < n; ++i) {
              const acc_t gv = static_cast<acc_t>(g[i]);
              gt[i] += gv * static_cast<acc_t>(t[i]);
              o[i] = static_cast<scalar_t>(gv * d1[i]);
            }
          });
          const scalar_t* g = gp + p * n;
          scalar_t* o = outp + p * n;
          for (int64_t i = 0; i < n; ++i) {
            o[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * d1[i] + d2[i] * gt[i]);
          }
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, CPU, m) {
  m.impl("dual_smooth_act", &dual_smooth_act_cpu);
  m.impl("dual_smooth_act_backward", &dual_smooth_act_backward_cpu);
}

}  // namespace grokalign
