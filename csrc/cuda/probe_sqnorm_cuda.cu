// CUDA implementation of grokalign::probe_sqnorm and its backward. The forward is the row sum of
// squares of the whole-MLP ops (csrc/cuda/row_passes_cuda.cu: one block per sample reduces over probes
// and features); the backward one grid-stride kernel. Launched on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/row_passes_cuda.h"

namespace grokalign {

namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void probe_sqnorm_backward_kernel(const scalar_t* __restrict__ g,
                                             const scalar_t* __restrict__ grad,
                                             scalar_t* __restrict__ out, int64_t P, int64_t B,
                                             int64_t N) {
  const acc_t scale = acc_t(2) / static_cast<acc_t>(P);
  const int64_t total = P * B * N;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = (i / N) % B;
    out[i] = static_cast<scalar_t>(scale * static_cast<acc_t>(grad[b]) * static_cast<acc_t>(g[i]));
  }
}

}  // namespace

at::Tensor probe_sqnorm_cuda(const at::Tensor& g_in) {
  TORCH_CHECK(g_in.dim() == 3, "probe_sqnorm: g must have shape [P, B, N], got ", g_in.sizes());
  TORCH_CHECK(g_in.size(0) >= 1, "probe_sqnorm: need at least one probe (P >= 1)");
  TORCH_CHECK(at::isFloatingType(g_in.scalar_type()), "probe_sqnorm: g must be floating point");
  const c10::cuda::CUDAGuard guard(g_in.device());
  const at::Tensor g = g_in.contiguous();
  const int64_t P = g.size(0), B = g.size(1), N = g.size(2);
  if (B == 0 || N == 0) return at::zeros({B}, g.options());
  // The whole-MLP ops' row sum of squares: (1/P) sum_p ||g[p, b]||^2 over the rows [P * B, N].
  return row_passes::cuda::probe_sqnorm(g.view({P * B, N}), P, B, /*root=*/false, /*scale=*/1.0);
}

at::Tensor probe_sqnorm_backward_cuda(const at::Tensor& g_in, const at::Tensor& grad_in) {
  TORCH_CHECK(g_in.dim() == 3, "probe_sqnorm_backward: g must have shape [P, B, N]");
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == g_in.size(1),
              "probe_sqnorm_backward: grad_out must have shape [B]");
  TORCH_CHECK(grad_in.scalar_type() == g_in.scalar_type(),
              "probe_sqnorm_backward: grad_out and g must share a dtype");
  const c10::cuda::CUDAGuard guard(g_in.device());
  const at::Tensor g = g_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const int64_t P = g.size(0), B = g.size(1), N = g.size(2);
  at::Tensor out = at::empty_like(g);
  const int64_t total = P * B * N;
  if (total == 0) return out;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65535);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "probe_sqnorm_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    probe_sqnorm_backward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        g.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), P, B, N);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(grokalign, CUDA, m) {
  m.impl("probe_sqnorm", &probe_sqnorm_cuda);
  m.impl("probe_sqnorm_backward", &probe_sqnorm_backward_cuda);
}

}  // namespace grokalign
