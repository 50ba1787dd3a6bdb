// CPU kernels of grokalign::dual_act and grokalign::dual_act_backward (schemas in csrc/grokalign.cpp):
// the piecewise-linear activation of the dual-stream engine on stacked primal and tangent rows, each
// pass one loop over the rows that reads the mask of the row's primal row in place.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/dual_act.h"
#include "cpu/row_passes_cpu.h"

namespace grokalign {
namespace {

using at::Tensor;

// out[r] = in[r] * d(mask[src(r)]) for every row r of [N, n] (src(r) = r for the primal rows).
void apply_mask(const Tensor& in, const Tensor& mask, Tensor& out, int64_t P, const std::optional<Tensor>& index,
                int64_t R, double off) {
  const int64_t N = in.size(0), n = in.size(1);
  const int64_t* idx = (index.has_value() && index->defined()) ? index->data_ptr<int64_t>() : nullptr;
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "dual_act_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ip = in.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // d = off + (1 - off) * mask: branch-free, so the inner loop vectorises.
    const acc_t off_v = static_cast<acc_t>(off), on_v = acc_t(1) - static_cast<acc_t>(off);
    at::parallel_for(0, N, row_passes::cpu::grain_rows(n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t src = r < P ? r : (idx ? idx[(r - P) % R] : (r - P) % P);
        const uint8_t* __restrict__ m = mp + src * n;
        const scalar_t* __restrict__ x = ip + r * n;
        scalar_t* __restrict__ y = op + r * n;
        for (int64_t i = 0; i < n; ++i) {
          y[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * (off_v + on_v * static_cast<acc_t>(m[i])));
        }
      }
    });
  });
}

std::tuple<Tensor, Tensor> dual_act_cpu(const Tensor& s_in, int64_t P, const std::optional<Tensor>& index_in,
                                        int64_t act, double alpha) {
  const int64_t R = dual_act::check("dual_act", s_in, P, index_in, act);
  const Tensor s = s_in.contiguous();
  std::optional<Tensor> index;
  if (index_in.has_value() && index_in->defined()) {
    index = index_in->contiguous();
    stacked_rows::check_index_range("dual_act", index, P);
  }
  const int64_t n = s.size(1);
  Tensor mask = at::empty({P, n}, s.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dual_act_mask_cpu", [&] {
    const scalar_t* zp = s.data_ptr<scalar_t>();
    uint8_t* mp = mask.data_ptr<uint8_t>();
    at::parallel_for(0, P * n, row_passes::cpu::grain_elems(), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) mp[i] = zp[i] > scalar_t(0);
    });
  });
  Tensor out = at::empty_like(s);
  apply_mask(s, mask, out, P, index, R, dual_act::off_slope(act, alpha));
  return {out, mask};
}

Tensor dual_act_backward_cpu(const Tensor& grad_in, const Tensor& mask_in, int64_t P,
                             const std::optional<Tensor>& index_in, int64_t act, double alpha) {
  const int64_t R = dual_act::check("dual_act_backward", grad_in, P, index_in, act);
  dual_act::check_mask(mask_in, P, grad_in.size(1));
  const Tensor grad = grad_in.contiguous();
  const Tensor mask = mask_in.contiguous();
  std::optional<Tensor> index;
  if (index_in.has_value() && index_in->defined()) {
    index = index_in->contiguous();
    stacked_rows::check_index_range("dual_act_backward", index, P);
  }
  Tensor out = at::empty_like(grad);
  apply_mask(grad, mask, out, P, index, R, dual_act::off_slope(act, alpha));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, CPU, m) {
  m.impl("dual_act", &dual_act_cpu);
  m.impl("dual_act_backward", &dual_act_backward_cpu);
}

}  // namespace grokalign
