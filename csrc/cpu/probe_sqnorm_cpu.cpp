// CPU implementation of grokalign::probe_sqnorm and its backward.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include "cpu/row_passes_cpu.h"

namespace grokalign {

static void check_probe_stack(const at::Tensor& g) {
  TORCH_CHECK(g.dim() == 3, "probe_sqnorm: g must have shape [P, B, N], got ", g.sizes());
  TORCH_CHECK(g.size(0) >= 1, "probe_sqnorm: need at least one probe (P >= 1), got P = ", g.size(0));
  TORCH_CHECK(at::isFloatingType(g.scalar_type()), "probe_sqnorm: g must be floating point, got ",
              g.scalar_type());
}

at::Tensor probe_sqnorm_cpu(const at::Tensor& g_in) {
  check_probe_stack(g_in);
  TORCH_INTERNAL_ASSERT(g_in.device().is_cpu());
  const at::Tensor g = g_in.contiguous();
  const int64_t P = g.size(0), B = g.size(1), N = g.size(2);
  at::Tensor out = at::empty({B}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "probe_sqnorm_cpu", [&] {
    row_passes::cpu::sum_sq_rows(g.data_ptr<scalar_t>(), N, N, P, B, /*root=*/false, /*scale=*/1.0,
                                 out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor probe_sqnorm_backward_cpu(const at::Tensor& g_in, const at::Tensor& grad_in) {
  check_probe_stack(g_in);
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == g_in.size(1),
              "probe_sqnorm_backward: grad_out must have shape [B] = [", g_in.size(1), "], got ",
              grad_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == g_in.scalar_type(),
              "probe_sqnorm_backward: grad_out dtype ", grad_in.scalar_type(), " != g dtype ",
              g_in.scalar_type());
  const at::Tensor g = g_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const int64_t P = g.size(0), B = g.size(1), N = g.size(2);
  at::Tensor out = at::empty_like(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "probe_sqnorm_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* dp = grad.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t scale = acc_t(2) / static_cast<acc_t>(P);
    at::parallel_for(0, P * B, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t c = scale * static_cast<acc_t>(dp[r % B]);
        const scalar_t* src = gp + r * N;
        scalar_t* dst = op + r * N;
        for (int64_t n = 0; n < N; ++n) dst[n] = static_cast<scalar_t>(c * static_cast<acc_t>(src[n]));
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(grokalign, CPU, m) {
  m.impl("probe_sqnorm", &probe_sqnorm_cpu);
  m.impl("probe_sqnorm_backward", &probe_sqnorm_backward_cpu);
}

}  // namespace grokalign
