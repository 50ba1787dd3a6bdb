// CUDA implementation of the dual-stream Linear(+bias) + activation ops
// grokalign::dual_linear, dual_linear_sqnorm and their backwards (the autograd
// kernels are device-agnostic, csrc/cpu/dual_linear_autograd.cpp).
//
// Same structure as the CPU file: the GEMMs go through ATen (cuBLAS) into one
// stacked buffer preact = [z; u], then fused element-wise kernels launched on the
// current stream:
//   forward   primal_kernel   (b, o): bias, y = s(z), mask; z + b written back to preact
//             tangent_kernel  (k, r, o): t' = s'(z[index[r]]) * u
//             sqnorm_kernel   one block per r: sq[r] = (1/K) sum_{k,o} t'^2 (t' never stored)
//   backward  backward_kernel (b, o): s', s'' once, then the tangent rows r -> b
//             (the inverse of index as a CSR built with argsort + searchsorted on the
//             device, no host sync) write gu and accumulate the s'' term; gz last.
//             Each (b, o) owns its rows: deterministic, no atomics.
// Then gW = gz^T x + gu^T t, gb = sum gz, [gx; gt] = G W through ATen.
// fp32/fp64 compute in their own precision, fp16/bf16 accumulate in fp32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common/dual_linear.h"

namespace grokalign {
namespace dual_linear {
namespace {

constexpr int kThreads = 256;

int64_t num_blocks(int64_t n) {
  // Grid-stride loops: enough blocks to fill the device, never more than the work.
  const int64_t fill = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, fill));
}

template <typename scalar_t, int A>
__global__ void primal_kernel(scalar_t* __restrict__ preact, const scalar_t* __restrict__ bias,
                              at::opmath_type<scalar_t> alpha, scalar_t* __restrict__ y,
                              uint8_t* __restrict__ mask, int64_t n, int64_t OUT) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t zr = static_cast<acc_t>(preact[i]);
    if (bias) zr += static_cast<acc_t>(bias[i % OUT]);
    const scalar_t zs = static_cast<scalar_t>(zr);  // z rounded as the reference rounds it
    preact[i] = zs;
    const acc_t z = static_cast<acc_t>(zs);
    acc_t yv, unused1, unused2;
    act_eval<A, true, false, false>(z, alpha, yv, unused1, unused2);
    y[i] = static_cast<scalar_t>(yv);
    if (mask) mask[i] = z > acc_t(0);
  }
}

template <typename scalar_t, int A>
__global__ void tangent_kernel(const scalar_t* __restrict__ preact, const int64_t* __restrict__ index,
                               at::opmath_type<scalar_t> alpha, scalar_t* __restrict__ t_out, int64_t n,
                               int64_t B, int64_t R, int64_t OUT) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ u = preact + B * OUT;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = i % OUT;
    const int64_t r = (i / OUT) % R;
    const int64_t b = index ? index[r] : r;
    CUDA_KERNEL_ASSERT(b >= 0 && b < B && "dual_linear: index out of range");
    acc_t d1, unused1, unused2;
    act_eval<A, false, true, false>(static_cast<acc_t>(preact[b * OUT + o]), alpha, unused1, d1, unused2);
    t_out[i] = static_cast<scalar_t>(d1 * static_cast<acc_t>(u[i]));
  }
}

template <typename scalar_t, int A>
__global__ void sqnorm_kernel(const scalar_t* __restrict__ preact, const int64_t* __restrict__ index,
                              at::opmath_type<scalar_t> alpha, scalar_t* __restrict__ sq, int64_t B, int64_t K,
                              int64_t R, int64_t OUT) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = blockIdx.x;
  const int64_t b = index ? index[r] : r;
  CUDA_KERNEL_ASSERT(b >= 0 && b < B && "dual_linear: index out of range");
  acc_t s = 0;
  for (int64_t o = threadIdx.x; o < OUT; o += blockDim.x) {
    acc_t d1, unused1, unused2;
    act_eval<A, false, true, false>(static_cast<acc_t>(preact[b * OUT + o]), alpha, unused1, d1, unused2);
    for (int64_t k = 0; k < K; ++k) {
      const acc_t v = d1 * static_cast<acc_t>(preact[(B + k * R + r) * OUT + o]);
      s += v * v;
    }
  }
  __shared__ acc_t smem[kThreads];
  smem[threadIdx.x] = s;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) smem[threadIdx.x] += smem[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) sq[r] = static_cast<scalar_t>(smem[0] / static_cast<acc_t>(K));
}

// gz [B, OUT] and gu [K*R, OUT] may be null (not needed). gtan: gt' [K, R, OUT]
// or gsq [R] (SQNORM). starts [B + 1] / perm [R]: CSR of the inverse of index
// (null: r == b).
template <typename scalar_t, int A, bool SQNORM, bool TAN>
__global__ void backward_kernel(const scalar_t* __restrict__ preact, const uint8_t* __restrict__ mask,
                                at::opmath_type<scalar_t> alpha, const scalar_t* __restrict__ gy,
                                const scalar_t* __restrict__ gtan, const int64_t* __restrict__ starts,
                                const int64_t* __restrict__ perm, scalar_t* __restrict__ gz,
                                scalar_t* __restrict__ gu, int64_t B, int64_t K, int64_t R, int64_t OUT) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool SMOOTH = !piecewise_linear(A) && TAN;  // the s'' term is present
  const acc_t two_over_k = acc_t(2) / static_cast<acc_t>(K);
  const int64_t n = B * OUT;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / OUT, o = i % OUT;
    acc_t d1 = acc_t(1), d2 = acc_t(0), unused = acc_t(0);
    if constexpr (A != kIdentity) {
      if (mask) {
        d1 = mask[i] ? acc_t(1) : (A == kLeakyRelu ? alpha : acc_t(0));
      } else if constexpr (SMOOTH) {
        act_eval<A, false, true, true>(static_cast<acc_t>(preact[i]), alpha, unused, d1, d2);
      } else {
        act_eval<A, false, true, false>(static_cast<acc_t>(preact[i]), alpha, unused, d1, d2);
      }
    }
    acc_t acc = 0;
    if constexpr (TAN) {
      const int64_t j0 = starts ? starts[b] : b, j1 = starts ? starts[b + 1] : b + 1;
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t r = perm ? perm[j] : j;
        const acc_t c = SQNORM ? two_over_k * static_cast<acc_t>(gtan[r]) : acc_t(0);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t row = k * R + r;
          acc_t u = 0;
          if constexpr (SQNORM || SMOOTH) u = static_cast<acc_t>(preact[(B + row) * OUT + o]);
          acc_t g;
          if constexpr (SQNORM) {
            g = c * d1 * u;  // d sq / d t'
          } else {
            g = static_cast<acc_t>(gtan[row * OUT + o]);
          }
          if (gu) gu[row * OUT + o] = static_cast<scalar_t>(g * d1);
          if constexpr (SMOOTH) acc += g * u;
        }
      }
    }
    if (gz) {
      acc_t v = gy ? static_cast<acc_t>(gy[i]) * d1 : acc_t(0);
      if constexpr (SMOOTH) v += d2 * acc;
      gz[i] = static_cast<scalar_t>(v);
    }
  }
}

template <typename scalar_t>
const scalar_t* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<scalar_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& x, const at::Tensor& t, const at::Tensor& weight, const std::optional<at::Tensor>& bias_in,
    const std::optional<at::Tensor>& index_in, int64_t act, double alpha, bool save, bool sqnorm) {
  const Dims d = check_forward(x, t, weight, bias_in, index_in, act);
  TORCH_INTERNAL_ASSERT(x.is_cuda());
  const c10::cuda::CUDAGuard guard(x.device());
  const std::optional<at::Tensor> bias = opt_contiguous(bias_in), index = opt_contiguous(index_in);
  at::Tensor preact = stacked_gemm(x, t, weight, d);
  at::Tensor y = at::empty({d.B, d.OUT}, x.options());
  at::Tensor out = sqnorm ? at::empty({d.R}, x.options()) : at::empty({d.K, d.R, d.OUT}, x.options());
  const bool keep_mask = save && !sqnorm && mask_activation(act);
  const bool keep_preact = save && (sqnorm || !piecewise_linear(act));
  at::Tensor mask = at::empty({keep_mask ? d.B : 0, keep_mask ? d.OUT : 0}, x.options().dtype(at::kByte));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dual_linear_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t a = static_cast<acc_t>(alpha);
    const int64_t* ip = index ? index->data_ptr<int64_t>() : nullptr;
    dispatch_act(act, [&](auto A) {
      constexpr int ac = decltype(A)::value;
      const int64_t n = d.B * d.OUT;
      if (n > 0) {
        primal_kernel<scalar_t, ac><<<num_blocks(n), kThreads, 0, stream>>>(
            preact.data_ptr<scalar_t>(), opt_ptr<scalar_t>(bias), a, y.data_ptr<scalar_t>(),
            keep_mask ? mask.data_ptr<uint8_t>() : nullptr, n, d.OUT);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (sqnorm) {
        if (d.R > 0) {
          sqnorm_kernel<scalar_t, ac><<<d.R, kThreads, 0, stream>>>(preact.data_ptr<scalar_t>(), ip, a,
                                                                     out.data_ptr<scalar_t>(), d.B, d.K, d.R, d.OUT);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      } else {
        const int64_t nt = d.K * d.R * d.OUT;
        if (nt > 0) {
          tangent_kernel<scalar_t, ac><<<num_blocks(nt), kThreads, 0, stream>>>(
              preact.data_ptr<scalar_t>(), ip, a, out.data_ptr<scalar_t>(), nt, d.B, d.R, d.OUT);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    });
  });
  if (!keep_preact) preact = at::empty({0, d.OUT}, x.options());
  return {y, out, mask, preact};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const std::optional<at::Tensor>& gy_in, const std::optional<at::Tensor>& gtan_in,
    const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& t, const std::optional<at::Tensor>& weight,
    const at::Tensor& mask_in, const at::Tensor& preact_in, const std::optional<at::Tensor>& index, at::IntArrayRef dims,
    int64_t act, double alpha, std::array<bool, 4> output_mask, bool sqnorm) {
  const std::optional<at::Tensor> gy = opt_contiguous(gy_in), gtan = opt_contiguous(gtan_in);
  BackwardPlan p;
  const Dims d = check_backward(dims, act, mask_in, preact_in, sqnorm, gy, gtan, x, t, weight, output_mask, p);
  const at::Tensor& ref = gy.has_value() ? *gy : *gtan;
  TORCH_INTERNAL_ASSERT(ref.is_cuda());
  const c10::cuda::CUDAGuard guard(ref.device());
  const at::Tensor preact = preact_in.contiguous(), mask = mask_in.contiguous();
  at::Tensor G = at::empty({d.B + d.K * d.R, d.OUT}, ref.options());
  // Inverse of index as CSR (rows perm[starts[b] .. starts[b+1]) ride on b), on the device.
  at::Tensor starts, perm;
  if (index.has_value() && p.tan) {
    perm = at::argsort(*index, /*stable=*/true);
    starts = at::searchsorted(index->index_select(0, perm), at::arange(d.B + 1, index->options()));
  }
  const int64_t n = d.B * d.OUT;
  if ((p.need_gz || p.need_gu) && n > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ref.scalar_type(), "dual_linear_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t a = static_cast<acc_t>(alpha);
      dispatch_act(act, [&](auto A) {
        constexpr int ac = decltype(A)::value;
        const uint8_t* mp = (!sqnorm && mask_activation(ac)) ? mask.data_ptr<uint8_t>() : nullptr;
        const scalar_t* zp = preact.numel() ? preact.data_ptr<scalar_t>() : nullptr;
        const scalar_t* gyp = opt_ptr<scalar_t>(gy);
        const scalar_t* gtp = opt_ptr<scalar_t>(gtan);
        const int64_t* sp = starts.defined() ? starts.data_ptr<int64_t>() : nullptr;
        const int64_t* pp = perm.defined() ? perm.data_ptr<int64_t>() : nullptr;
        scalar_t* gzp = p.need_gz ? G.data_ptr<scalar_t>() : nullptr;
        scalar_t* gup = p.need_gu ? G.data_ptr<scalar_t>() + d.B * d.OUT : nullptr;
        const int64_t blocks = num_blocks(n);
        if (sqnorm) {
          if (p.tan) {
            backward_kernel<scalar_t, ac, true, true><<<blocks, kThreads, 0, stream>>>(
                zp, mp, a, gyp, gtp, sp, pp, gzp, gup, d.B, d.K, d.R, d.OUT);
          } else {
            backward_kernel<scalar_t, ac, true, false><<<blocks, kThreads, 0, stream>>>(
                zp, mp, a, gyp, gtp, sp, pp, gzp, gup, d.B, d.K, d.R, d.OUT);
          }
        } else {
          if (p.tan) {
            backward_kernel<scalar_t, ac, false, true><<<blocks, kThreads, 0, stream>>>(
                zp, mp, a, gyp, gtp, sp, pp, gzp, gup, d.B, d.K, d.R, d.OUT);
          } else {
            backward_kernel<scalar_t, ac, false, false><<<blocks, kThreads, 0, stream>>>(
                zp, mp, a, gyp, gtp, sp, pp, gzp, gup, d.B, d.K, d.R, d.OUT);
          }
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return backward_gemms(G, d, p, x, t, weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, CUDA, m) { register_ops<&forward_impl, &backward_impl>(m); }

}  // namespace dual_linear
}  // namespace grokalign
