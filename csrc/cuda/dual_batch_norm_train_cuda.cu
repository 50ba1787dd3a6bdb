// CUDA kernels of grokalign::dual_batch_norm_train and grokalign::dual_batch_norm_train_backward
// (schemas in csrc/grokalign.cpp; the math in csrc/common/dual_batch_norm_train.h, the CPU kernels
// in csrc/cpu/dual_batch_norm_train_cpu.cpp). The per-channel sums run one block per channel (a
// strided loop over the channel's values and a shared-memory tree), in the accumulation type (float
// for float / half / bfloat16, double for double); the elementwise parts one thread per entry.
// Launched on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>

#include "common/dual_batch_norm_train.h"

namespace grokalign {
namespace {

using at::Tensor;
namespace bn = dual_batch_norm_train;
constexpr int kThreads = 256;  // a power of two: the tree below halves it

int blocks_for(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(b, 1), 65535));
}

// The sum of v over the block's threads, returned to every thread (smem: kThreads entries).
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* smem) {
  smem[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) smem[threadIdx.x] += smem[threadIdx.x + stride];
    __syncthreads();
  }
  const acc_t total = smem[0];
  __syncthreads();  // every thread has read the total before smem is written again
  return total;
}

// Block c: mean[c] and var[c] (biased) over the n = P L primal values of channel c.
template <typename scalar_t, typename acc_t>
__global__ void stats_kernel(const scalar_t* __restrict__ s, acc_t* __restrict__ mean, acc_t* __restrict__ var,
                             int64_t P, int64_t C, int64_t L) {
  __shared__ acc_t smem[kThreads];
  const int64_t c = blockIdx.x, n = P * L;
  acc_t sum = 0;
  for (int64_t e = threadIdx.x; e < n; e += kThreads) {
    const int64_t r = e / L, l = e - r * L;
    sum += static_cast<acc_t>(s[(r * C + c) * L + l]);
  }
  const acc_t mu = block_sum(sum, smem) / static_cast<acc_t>(n);
  acc_t sq = 0;
  for (int64_t e = threadIdx.x; e < n; e += kThreads) {
    const int64_t r = e / L, l = e - r * L;
    const acc_t d = static_cast<acc_t>(s[(r * C + c) * L + l]) - mu;
    sq += d * d;
  }
  const acc_t v = block_sum(sq, smem) / static_cast<acc_t>(n);
  if (threadIdx.x == 0) {
    mean[c] = mu;
    var[c] = v;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void normalize_kernel(const scalar_t* __restrict__ s, scalar_t* __restrict__ out,
                                 const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                                 const acc_t* __restrict__ w, const acc_t* __restrict__ b, int64_t P, int64_t C,
                                 int64_t L, int64_t total, acc_t eps) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t q = e / L, r = q / C, c = q - r * C;
    const acc_t scale = bn::invstd(var[c], eps) * w[c];
    const acc_t x = static_cast<acc_t>(s[e]);
    out[e] = static_cast<scalar_t>(r < P ? x * scale + (b[c] - mean[c] * scale) : x * scale);
  }
}

// Block c: sum_g[c], dots[c] = dot + S and grad_w[c] = invstd (dot + S) (see the header).
template <typename scalar_t, typename acc_t>
__global__ void grad_sums_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ s,
                                 const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                                 acc_t* __restrict__ sum_g, acc_t* __restrict__ dots, acc_t* __restrict__ grad_w,
                                 int64_t N, int64_t P, int64_t C, int64_t L, acc_t eps) {
  __shared__ acc_t smem[kThreads];
  const int64_t c = blockIdx.x, all = N * L, n = P * L;
  const acc_t mu = mean[c];
  acc_t sg = 0, dot = 0;
  for (int64_t e = threadIdx.x; e < all; e += kThreads) {
    const int64_t r = e / L, l = e - r * L;
    const int64_t f = (r * C + c) * L + l;
    const acc_t gv = static_cast<acc_t>(g[f]), x = static_cast<acc_t>(s[f]);
    if (e < n) {
      sg += gv;
      dot += gv * (x - mu);
    } else {
      dot += gv * x;  // S: the tangent rows' sum of g t
    }
  }
  const acc_t total_g = block_sum(sg, smem);
  const acc_t total_dot = block_sum(dot, smem);
  if (threadIdx.x == 0) {
    sum_g[c] = total_g;
    dots[c] = total_dot;
    grad_w[c] = bn::invstd(var[c], eps) * total_dot;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void grad_rows_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ s,
                                 scalar_t* __restrict__ out, const acc_t* __restrict__ mean,
                                 const acc_t* __restrict__ var, const acc_t* __restrict__ w,
                                 const acc_t* __restrict__ sum_g, const acc_t* __restrict__ dots, int64_t P, int64_t C,
                                 int64_t L, int64_t total, acc_t eps, acc_t inv_n) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t q = e / L, r = q / C, c = q - r * C;
    const acc_t is = bn::invstd(var[c], eps);
    const acc_t scale = is * w[c];
    const acc_t gv = static_cast<acc_t>(g[e]);
    if (r >= P) {
      out[e] = static_cast<scalar_t>(gv * scale);
    } else {
      const acc_t x = static_cast<acc_t>(s[e]);
      out[e] = static_cast<scalar_t>(scale * (gv - sum_g[c] * inv_n - (x - mean[c]) * (is * is * dots[c] * inv_n)));
    }
  }
}

std::tuple<Tensor, Tensor, Tensor> dual_batch_norm_train_cuda(const Tensor& s_in, const std::optional<Tensor>& weight,
                                                              const std::optional<Tensor>& bias, int64_t P,
                                                              double eps) {
  bn::check("dual_batch_norm_train", s_in, P, weight, bias);
  const c10::cuda::CUDAGuard guard(s_in.device());
  const Tensor s = s_in.contiguous();
  const int64_t C = s.size(1), L = s.size(2), total = s.numel();
  const auto stat_options = s.options().dtype(bn::stat_dtype(s));
  Tensor mean = at::zeros({C}, stat_options), var = at::zeros({C}, stat_options);
  Tensor out = at::empty_like(s);
  if (total == 0 || C == 0) return {out, mean, var};
  const Tensor w = bn::channel_param(weight, s, 1.0), b = bn::channel_param(bias, s, 0.0);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dual_batch_norm_train_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    stats_kernel<scalar_t, acc_t><<<static_cast<unsigned>(C), kThreads, 0, stream>>>(
        s.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), P, C, L);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    normalize_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
        s.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(),
        w.data_ptr<acc_t>(), b.data_ptr<acc_t>(), P, C, L, total, static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> dual_batch_norm_train_backward_cuda(
    const Tensor& grad_in, const Tensor& s_in, const std::optional<Tensor>& weight, const Tensor& mean_in,
    const Tensor& var_in, int64_t P, double eps, std::array<bool, 3> output_mask) {
  bn::check("dual_batch_norm_train_backward", s_in, P, weight, std::nullopt);
  bn::check_backward(grad_in, s_in, mean_in, var_in);
  const c10::cuda::CUDAGuard guard(s_in.device());
  const Tensor s = s_in.contiguous(), grad = grad_in.contiguous();
  const Tensor mean = mean_in.contiguous(), var = var_in.contiguous();
  const int64_t N = s.size(0), C = s.size(1), L = s.size(2), total = s.numel();
  const auto stat_options = mean.options();
  Tensor sum_g = at::zeros({C}, stat_options), dots = at::zeros({C}, stat_options);
  Tensor grad_w = at::zeros({C}, stat_options);
  Tensor grad_s = output_mask[0] ? at::empty_like(s) : at::empty({0}, s.options());
  if (total > 0 && C > 0) {
    const Tensor w = bn::channel_param(weight, s, 1.0);
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dual_bn_train_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t e = static_cast<acc_t>(eps);
      grad_sums_kernel<scalar_t, acc_t><<<static_cast<unsigned>(C), kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(),
          sum_g.data_ptr<acc_t>(), dots.data_ptr<acc_t>(), grad_w.data_ptr<acc_t>(), N, P, C, L, e);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (output_mask[0]) {
        grad_rows_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
            grad.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), grad_s.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(),
            var.data_ptr<acc_t>(), w.data_ptr<acc_t>(), sum_g.data_ptr<acc_t>(), dots.data_ptr<acc_t>(), P, C, L,
            total, e, acc_t(1) / static_cast<acc_t>(P * L));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  return {grad_s, output_mask[1] ? grad_w : at::empty({0}, stat_options),
          output_mask[2] ? sum_g : at::empty({0}, stat_options)};
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, CUDA, m) {
  m.impl("dual_batch_norm_train", &dual_batch_norm_train_cuda);
  m.impl("dual_batch_norm_train_backward", &dual_batch_norm_train_backward_cuda);
}

}  // namespace grokalign
