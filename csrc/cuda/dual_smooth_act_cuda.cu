// CUDA kernels of grokalign::dual_smooth_act and grokalign::dual_smooth_act_backward (schemas in
// csrc/grokalign.cpp; the math in csrc/common/dual_smooth_act.h, the CPU kernels in
// csrc/cpu/dual_smooth_act_cpu.cpp). One thread per entry of the stacked rows, in the accumulation
// type (float for half / bfloat16): a tangent entry evaluates s' at its primal row's entry (cheaper
// on a GPU than a slope buffer's write and reads); a primal entry of the backward also sums
// g_j t_j over its riders. Launched on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "common/dual_smooth_act.h"
#include "common/stacked_rows.h"

namespace grokalign {
namespace {

using at::Tensor;
constexpr int kThreads = 256;

int blocks_for(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(b, 1), 65535));
}

// out[r, c] = s(z[r, c]) for a primal row, s'(z[src(r), c]) * s[r, c] for a tangent row.
template <int A, typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ s, scalar_t* __restrict__ out,
                               const int64_t* __restrict__ index, int64_t P, int64_t R, int64_t n, int64_t total,
                               dual_smooth_act::Params<acc_t> prm) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = e / n, c = e - r * n;
    acc_t y, d1, d2;
    if (r < P) {
      dual_smooth_act::eval<A, true, false, false>(static_cast<acc_t>(s[e]), prm, y, d1, d2);
      out[e] = static_cast<scalar_t>(y);
    } else {
      const int64_t src = stacked_rows::source_row(r, P, index, R);
      dual_smooth_act::eval<A, false, true, false>(static_cast<acc_t>(s[src * n + c]), prm, y, d1, d2);
      out[e] = static_cast<scalar_t>(static_cast<acc_t>(s[e]) * d1);
    }
  }
}

// grad_s[p, c] = g[p, c] s'(z) + s''(z) sum_{riders j} g[P + j, c] t[P + j, c] for a primal row
// (z = s[p, c]); grad_s[r, c] = g[r, c] s'(z[src(r), c]) for a tangent row.
template <int A, typename scalar_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ s,
                                scalar_t* __restrict__ out, const int64_t* __restrict__ index,
                                const int64_t* __restrict__ offsets, const int64_t* __restrict__ rows, int64_t P,
                                int64_t R, int64_t K, int64_t n, int64_t total, dual_smooth_act::Params<acc_t> prm) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = e / n, c = e - r * n;
    acc_t y, d1, d2;
    if (r < P) {
      dual_smooth_act::eval<A, false, true, true>(static_cast<acc_t>(s[e]), prm, y, d1, d2);
      acc_t gt = 0;
      stacked_rows::for_each_rider(r, K, R, offsets, rows, [&](int64_t j) {
        const int64_t f = (P + j) * n + c;
        gt += static_cast<acc_t>(g[f]) * static_cast<acc_t>(s[f]);
      });
      out[e] = static_cast<scalar_t>(static_cast<acc_t>(g[e]) * d1 + d2 * gt);
    } else {
      const int64_t src = stacked_rows::source_row(r, P, index, R);
      dual_smooth_act::eval<A, false, true, false>(static_cast<acc_t>(s[src * n + c]), prm, y, d1, d2);
      out[e] = static_cast<scalar_t>(static_cast<acc_t>(g[e]) * d1);
    }
  }
}

Tensor dual_smooth_act_cuda(const Tensor& s_in, int64_t P, const std::optional<Tensor>& index_in, int64_t act,
                            double alpha, double beta, double threshold) {
  const int64_t R = dual_smooth_act::check("dual_smooth_act", s_in, P, index_in, act);
  const c10::cuda::CUDAGuard guard(s_in.device());
  const Tensor s = s_in.contiguous();
  const std::optional<Tensor> index = stacked_rows::checked_index("dual_smooth_act", index_in, P);
  const int64_t total = s.numel();
  Tensor out = at::empty_like(s);
  if (total == 0) return out;
  const int64_t* idx = index.has_value() ? index->data_ptr<int64_t>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dual_smooth_act_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dual_smooth_act::Params<acc_t> prm{static_cast<acc_t>(alpha), static_cast<acc_t>(beta),
                                             static_cast<acc_t>(threshold)};
    dual_smooth_act::dispatch(act, [&](auto a) {
      forward_kernel<decltype(a)::value, scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
          s.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), idx, P, R, s.size(1), total, prm);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

Tensor dual_smooth_act_backward_cuda(const Tensor& grad_in, const Tensor& s_in, int64_t P,
                                     const std::optional<Tensor>& index_in, int64_t act, double alpha, double beta,
                                     double threshold) {
  const int64_t R = dual_smooth_act::check("dual_smooth_act_backward", s_in, P, index_in, act);
  dual_smooth_act::check_grad(grad_in, s_in);
  const c10::cuda::CUDAGuard guard(s_in.device());
  const Tensor s = s_in.contiguous();
  const Tensor grad = grad_in.contiguous();
  const std::optional<Tensor> index = stacked_rows::checked_index("dual_smooth_act_backward", index_in, P);
  const auto riders = stacked_rows::riders(index, P);
  const Tensor& offsets = std::get<0>(riders);
  const Tensor& rows = std::get<1>(riders);
  const int64_t total = s.numel(), K = (s.size(0) - P) / R;
  Tensor out = at::empty_like(s);
  if (total == 0) return out;
  const int64_t* idx = index.has_value() ? index->data_ptr<int64_t>() : nullptr;
  const int64_t* off = offsets.defined() ? offsets.data_ptr<int64_t>() : nullptr;
  const int64_t* rw = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dual_smooth_act_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dual_smooth_act::Params<acc_t> prm{static_cast<acc_t>(alpha), static_cast<acc_t>(beta),
                                             static_cast<acc_t>(threshold)};
    dual_smooth_act::dispatch(act, [&](auto a) {
      backward_kernel<decltype(a)::value, scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), idx, off, rw, P, R, K,
          s.size(1), total, prm);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, CUDA, m) {
  m.impl("dual_smooth_act", &dual_smooth_act_cuda);
  m.impl("dual_smooth_act_backward", &dual_smooth_act_backward_cuda);
}

}  // namespace grokalign
