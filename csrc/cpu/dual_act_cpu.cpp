// CPU kernels of grokalign::dual_act and grokalign::dual_act_backward (schemas in csrc/grokalign.cpp):
// the piecewise-linear activation of the dual-stream engine on stacked primal and tangent rows, each
// pass one loop over the rows that reads the mask of the row's primal row in place. The forward writes
// a primal row's output and its byte mask in one pass. The row loops are SIMD loops compiled for AVX2
// and the baseline (csrc/cpu/simd_math.h); as plain loops inside the row lambdas they compiled to
// scalar code, 4.4x a ReLU's time over [160, 32768] float rows (one thread).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/dual_act.h"
#include "cpu/row_passes_cpu.h"
#include "cpu/simd_math.h"

namespace grokalign {
namespace {

using at::Tensor;

// y = x d(m) over a row of n entries, with d(m) = off + on * m (branch-free, so the loop vectorises).
template <typename scalar_t, typename acc_t>
SIMD_TARGETS void mask_row(const scalar_t* __restrict__ x, const uint8_t* __restrict__ m, scalar_t* __restrict__ y,
                           int64_t n, acc_t off, acc_t on) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * (off + on * m[i]));
}

// A primal row z: its mask m = (z > 0) and y = z d(m), in one pass.
template <typename scalar_t, typename acc_t>
SIMD_TARGETS void primal_row(const scalar_t* __restrict__ z, uint8_t* __restrict__ m, scalar_t* __restrict__ y,
                             int64_t n, acc_t off, acc_t on) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(z[i]);
    const uint8_t pos = v > acc_t(0);
    m[i] = pos;
    y[i] = static_cast<scalar_t>(v * (off + on * pos));
  }
}

// out[r] = in[r] * d(mask[src(r)]) for every row r of [N, n] (src(r) = r for the primal rows); with
// `make_mask`, the primal rows' mask is computed from them first (the forward).
void apply_mask(const Tensor& in, Tensor& mask, Tensor& out, int64_t P, const std::optional<Tensor>& index,
                int64_t R, double off, bool make_mask) {
  const int64_t N = in.size(0), n = in.size(1);
  const int64_t* idx = (index.has_value() && index->defined()) ? index->data_ptr<int64_t>() : nullptr;
  uint8_t* mp = mask.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "dual_act_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ip = in.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t off_v = static_cast<acc_t>(off), on_v = acc_t(1) - static_cast<acc_t>(off);
    // The primal rows first (the forward's masks are ready before any tangent row reads them).
    at::parallel_for(0, P, row_passes::cpu::grain_rows(n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (make_mask) {
          primal_row(ip + r * n, mp + r * n, op + r * n, n, off_v, on_v);
        } else {
          mask_row(ip + r * n, mp + r * n, op + r * n, n, off_v, on_v);
        }
      }
    });
    at::parallel_for(P, N, row_passes::cpu::grain_rows(n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t src = idx ? idx[(r - P) % R] : (r - P) % P;
        mask_row(ip + r * n, mp + src * n, op + r * n, n, off_v, on_v);
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
  Tensor out = at::empty_like(s);
  apply_mask(s, mask, out, P, index, R, dual_act::off_slope(act, alpha), /*make_mask=*/true);
  return {out, mask};
}

Tensor dual_act_backward_cpu(const Tensor& grad_in, const Tensor& mask_in, int64_t P,
                             const std::optional<Tensor>& index_in, int64_t act, double alpha) {
  const int64_t R = dual_act::check("dual_act_backward", grad_in, P, index_in, act);
  dual_act::check_mask(mask_in, P, grad_in.size(1));
  const Tensor grad = grad_in.contiguous();
  Tensor mask = mask_in.contiguous();
  std::optional<Tensor> index;
  if (index_in.has_value() && index_in->defined()) {
    index = index_in->contiguous();
    stacked_rows::check_index_range("dual_act_backward", index, P);
  }
  Tensor out = at::empty_like(grad);
  apply_mask(grad, mask, out, P, index, R, dual_act::off_slope(act, alpha), /*make_mask=*/false);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, CPU, m) {
  m.impl("dual_act", &dual_act_cpu);
  m.impl("dual_act_backward", &dual_act_backward_cpu);
}

}  // namespace grokalign
