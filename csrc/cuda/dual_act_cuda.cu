// CUDA kernels of grokalign::dual_act and grokalign::dual_act_backward (schemas in
// csrc/grokalign.cpp; the CPU kernels in csrc/cpu/dual_act_cpu.cpp are the same passes):
// elementwise over the stacked rows, each element reading the mask of its row's primal row.
// Launched on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/dual_act.h"

namespace grokalign {
namespace {

using at::Tensor;
constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void mask_kernel(const scalar_t* __restrict__ z, uint8_t* __restrict__ mask, int64_t total) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    mask[i] = z[i] > scalar_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void apply_kernel(const scalar_t* __restrict__ in, const uint8_t* __restrict__ mask,
                             scalar_t* __restrict__ out, const int64_t* __restrict__ index, int64_t P, int64_t R,
                             int64_t n, int64_t total, acc_t off) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / n, c = i - r * n;
    const int64_t src = r < P ? r : (index ? index[(r - P) % R] : (r - P) % P);
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(in[i]) * (mask[src * n + c] ? acc_t(1) : off));
  }
}

int blocks_for(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(b, 1), 65535));
}

void apply_mask(const Tensor& in, const Tensor& mask, Tensor& out, int64_t P, const std::optional<Tensor>& index,
                int64_t R, double off) {
  const int64_t total = in.numel();
  if (total == 0) return;
  const int64_t* idx = (index.has_value() && index->defined()) ? index->data_ptr<int64_t>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "dual_act_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    apply_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
        in.data_ptr<scalar_t>(), mask.data_ptr<uint8_t>(), out.data_ptr<scalar_t>(), idx, P, R, in.size(1), total,
        static_cast<acc_t>(off));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor> dual_act_cuda(const Tensor& s_in, int64_t P, const std::optional<Tensor>& index_in,
                                         int64_t act, double alpha) {
  const int64_t R = dual_act::check("dual_act", s_in, P, index_in, act);
  const c10::cuda::CUDAGuard guard(s_in.device());
  const Tensor s = s_in.contiguous();
  std::optional<Tensor> index;
  if (index_in.has_value() && index_in->defined()) index = index_in->contiguous();
  const int64_t n = s.size(1);
  Tensor mask = at::empty({P, n}, s.options().dtype(at::kByte));
  if (P * n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dual_act_mask_cuda", [&] {
      mask_kernel<scalar_t><<<blocks_for(P * n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          s.data_ptr<scalar_t>(), mask.data_ptr<uint8_t>(), P * n);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  Tensor out = at::empty_like(s);
  apply_mask(s, mask, out, P, index, R, dual_act::off_slope(act, alpha));
  return {out, mask};
}

Tensor dual_act_backward_cuda(const Tensor& grad_in, const Tensor& mask_in, int64_t P,
                              const std::optional<Tensor>& index_in, int64_t act, double alpha) {
  const int64_t R = dual_act::check("dual_act_backward", grad_in, P, index_in, act);
  dual_act::check_mask(mask_in, P, grad_in.size(1));
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const Tensor grad = grad_in.contiguous();
  const Tensor mask = mask_in.contiguous();
  std::optional<Tensor> index;
  if (index_in.has_value() && index_in->defined()) index = index_in->contiguous();
  Tensor out = at::empty_like(grad);
  apply_mask(grad, mask, out, P, index, R, dual_act::off_slope(act, alpha));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, CUDA, m) {
  m.impl("dual_act", &dual_act_cuda);
  m.impl("dual_act_backward", &dual_act_backward_cuda);
}

}  // namespace grokalign
