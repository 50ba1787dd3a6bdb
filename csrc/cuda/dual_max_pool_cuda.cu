// CUDA kernels of grokalign::dual_max_pool and grokalign::dual_max_pool_backward (schemas in
// csrc/grokalign.cpp; the layout in csrc/common/dual_max_pool.h, the CPU kernels in
// csrc/cpu/dual_max_pool_cpu.cpp). One thread per output entry: the forward gathers at its primal
// row's argmax; the backward adds atomically into a zeroed buffer of the accumulation type (the
// output itself for float and double, a float buffer for half / bfloat16 that is then cast), as
// overlapping windows may add into one entry. Launched on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>

#include "common/dual_max_pool.h"
#include "common/stacked_rows.h"

namespace grokalign {
namespace {

using at::Tensor;
constexpr int kThreads = 256;

int blocks_for(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(b, 1), 65535));
}

// The argmax index of output entry e = (r C + c) Lout + o: idx[src(r), c, o].
__device__ inline int64_t argmax_of(int64_t e, const int64_t* __restrict__ am, const int64_t* __restrict__ index,
                                    int64_t P, int64_t R, int64_t C, int64_t Lout) {
  const int64_t q = e / Lout, o = e - q * Lout;
  const int64_t r = q / C, c = q - r * C;
  return am[(stacked_rows::source_row(r, P, index, R) * C + c) * Lout + o];
}

template <typename scalar_t>
__global__ void gather_kernel(const scalar_t* __restrict__ z, const int64_t* __restrict__ am,
                              scalar_t* __restrict__ out, const int64_t* __restrict__ index, int64_t P, int64_t R,
                              int64_t C, int64_t L, int64_t Lout, int64_t total) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    out[e] = z[(e / Lout) * L + argmax_of(e, am, index, P, R, C, Lout)];
  }
}

template <typename scalar_t, typename acc_t>
__global__ void scatter_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ am,
                               acc_t* __restrict__ acc, const int64_t* __restrict__ index, int64_t P, int64_t R,
                               int64_t C, int64_t L, int64_t Lout, int64_t total) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    gpuAtomicAddNoReturn(acc + (e / Lout) * L + argmax_of(e, am, index, P, R, C, Lout), static_cast<acc_t>(grad[e]));
  }
}

Tensor dual_max_pool_cuda(const Tensor& z_in, const Tensor& idx_in, const std::optional<Tensor>& index_in) {
  const int64_t R = dual_max_pool::check("dual_max_pool", z_in, idx_in, index_in);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const Tensor z = z_in.contiguous();
  const int64_t N = z.size(0), C = z.size(1), L = z.size(2), P = idx_in.size(0), Lout = idx_in.size(2);
  const Tensor idx = dual_max_pool::checked_idx("dual_max_pool", idx_in, L);
  const std::optional<Tensor> index = stacked_rows::checked_index("dual_max_pool", index_in, P);
  Tensor out = at::empty({N, C, Lout}, z.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const int64_t* ip = index.has_value() ? index->data_ptr<int64_t>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "dual_max_pool_cuda", [&] {
    gather_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        z.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), ip, P, R, C, L, Lout, total);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

Tensor dual_max_pool_backward_cuda(const Tensor& grad_in, const Tensor& idx_in,
                                   const std::optional<Tensor>& index_in, int64_t L) {
  const int64_t R = dual_max_pool::check("dual_max_pool_backward", grad_in, idx_in, index_in);
  TORCH_CHECK(grad_in.size(2) == idx_in.size(2), "grokalign::dual_max_pool_backward: grad must be [N, C, Lout=",
              idx_in.size(2), "], got ", grad_in.sizes());
  TORCH_CHECK(L >= 0, "grokalign::dual_max_pool_backward: length must be >= 0, got ", L);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const Tensor grad = grad_in.contiguous();
  const int64_t N = grad.size(0), C = grad.size(1), P = idx_in.size(0), Lout = idx_in.size(2);
  const Tensor idx = dual_max_pool::checked_idx("dual_max_pool_backward", idx_in, L);
  const std::optional<Tensor> index = stacked_rows::checked_index("dual_max_pool_backward", index_in, P);
  const int64_t* ip = index.has_value() ? index->data_ptr<int64_t>() : nullptr;
  const int64_t total = grad.numel();
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "dual_max_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Tensor acc = at::zeros({N, C, L}, grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    if (total > 0 && L > 0) {
      scatter_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          grad.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), acc.data_ptr<acc_t>(), ip, P, R, C, L, Lout, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    out = std::is_same_v<acc_t, scalar_t> ? acc : acc.to(grad.scalar_type());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, CUDA, m) {
  m.impl("dual_max_pool", &dual_max_pool_cuda);
  m.impl("dual_max_pool_backward", &dual_max_pool_backward_cuda);
}

}  // namespace grokalign
