// CUDA kernel of grokalign::max_pool2d_argmax (schema in csrc/grokalign.cpp; the scan in
// csrc/common/max_pool2d_argmax.h, the CPU kernel in csrc/cpu/max_pool2d_argmax_cpu.cpp): one thread
// per output entry, a grid-stride loop. Launched on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common/max_pool2d_argmax.h"

namespace grokalign {
namespace {

using at::Tensor;
namespace mpa = max_pool2d_argmax;
constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void argmax_kernel(const scalar_t* __restrict__ z, int64_t* __restrict__ idx, int64_t planes, int64_t H,
                              int64_t W, int64_t Ho, int64_t Wo, mpa::Params p) {
  const int64_t total = planes * Ho * Wo;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t q = e / (Ho * Wo), o = e - q * Ho * Wo;
    const int64_t oh = o / Wo, ow = o - oh * Wo;
    idx[e] = mpa::window_argmax<acc_t>(z + q * H * W, H, W, oh, ow, p);
  }
}

Tensor max_pool2d_argmax_cuda(const Tensor& z_in, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  int64_t Ho = 0, Wo = 0;
  const mpa::Params p = mpa::check(z_in, kernel_size, stride, padding, dilation, ceil_mode, Ho, Wo);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const Tensor z = z_in.contiguous();
  const int64_t N = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3);
  Tensor idx = at::empty({N, C, Ho, Wo}, z.options().dtype(at::kLong));
  const int64_t total = idx.numel();
  if (total == 0) return idx;
  const int grid = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "max_pool2d_argmax_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    argmax_kernel<scalar_t, acc_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        z.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), N * C, H, W, Ho, Wo, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return idx;
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, CUDA, m) { m.impl("max_pool2d_argmax", &max_pool2d_argmax_cuda); }

}  // namespace grokalign
