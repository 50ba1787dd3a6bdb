// CUDA kernels of grokalign::dual_layer_norm and grokalign::dual_layer_norm_backward (schemas in
// csrc/grokalign.cpp; the math in csrc/common/dual_layer_norm.h, the CPU kernels in
// csrc/cpu/dual_layer_norm_cpu.cpp). One block per primal row (a grid-stride loop over the primal
// rows): the block computes the row's statistics with shared-memory tree sums, then serves the
// tangent rows riding on it one after the other (two row sums each in the forward, five in the
// backward). Every thread owns the features i = threadIdx.x (mod kThreads) of the row, so the
// backward's per-feature accumulator over the riders (a [P, n] scratch buffer in the accumulation
// type) is read and written by its owner only. grad_weight and grad_bias are written per primal row
// ([P, n]) and summed over the rows of each group afterwards (no atomics). Accumulation in float for
// float / half / bfloat16, double for double. Launched on the current stream.
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

#include "common/dual_layer_norm.h"
#include "common/stacked_rows.h"

namespace grokalign {
namespace {

using at::Tensor;
namespace ln = dual_layer_norm;
constexpr int kThreads = 256;  // a power of two: the tree below halves it
constexpr int kMaxSums = 5;    // the most row sums taken at once (the backward's per rider)

unsigned blocks_for_rows(int64_t P) { return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(P, 1), 65535)); }

// The sums of v[0..V) over the block's threads, returned to every thread (smem: kMaxSums * kThreads).
template <int V, typename acc_t>
__device__ void block_sums(acc_t (&v)[V], acc_t* smem) {
  static_assert(V <= kMaxSums, "smem holds kMaxSums sums");
  for (int q = 0; q < V; ++q) smem[q * kThreads + threadIdx.x] = v[q];
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride)
      for (int q = 0; q < V; ++q) smem[q * kThreads + threadIdx.x] += smem[q * kThreads + threadIdx.x + stride];
    __syncthreads();
  }
  for (int q = 0; q < V; ++q) v[q] = smem[q * kThreads];
  __syncthreads();  // every thread has read the sums before smem is written again
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ s, scalar_t* __restrict__ out, acc_t* __restrict__ mean,
                               acc_t* __restrict__ rstd, const acc_t* __restrict__ w, const acc_t* __restrict__ b,
                               const int64_t* __restrict__ offsets, const int64_t* __restrict__ rows, int64_t P,
                               int64_t R, int64_t K, int64_t n, int64_t G, acc_t eps, bool rms) {
  __shared__ acc_t smem[kMaxSums * kThreads];
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n), c = rms ? acc_t(0) : acc_t(1);
  for (int64_t p = blockIdx.x; p < P; p += gridDim.x) {
    const scalar_t* z = s + p * n;
    acc_t mu = 0;
    if (!rms) {
      acc_t sum[1] = {0};
      for (int64_t i = threadIdx.x; i < n; i += kThreads) sum[0] += static_cast<acc_t>(z[i]);
      block_sums(sum, smem);
      mu = sum[0] * inv_n;
    }
    acc_t sq[1] = {0};
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const acc_t d = static_cast<acc_t>(z[i]) - mu;
      sq[0] += d * d;
    }
    block_sums(sq, smem);
    const acc_t r = ln::rstd(sq[0] * inv_n, eps);
    if (threadIdx.x == 0) {
      mean[p] = mu;
      rstd[p] = r;
    }
    const acc_t* wr = w + (p % G) * n;
    const acc_t* br = b + (p % G) * n;
    for (int64_t i = threadIdx.x; i < n; i += kThreads)
      out[p * n + i] = static_cast<scalar_t>((static_cast<acc_t>(z[i]) - mu) * r * wr[i] + br[i]);
    stacked_rows::for_each_rider(p, K, R, offsets, rows, [&](int64_t j) {
      const scalar_t* t = s + (P + j) * n;
      acc_t sums[2] = {0, 0};  // sum t, sum x t
      for (int64_t i = threadIdx.x; i < n; i += kThreads) {
        const acc_t tv = static_cast<acc_t>(t[i]), x = (static_cast<acc_t>(z[i]) - mu) * r;
        sums[0] += tv;
        sums[1] += x * tv;
      }
      block_sums(sums, smem);
      const acc_t cm = c * sums[0] * inv_n, a = sums[1] * inv_n;
      scalar_t* o = out + (P + j) * n;
      for (int64_t i = threadIdx.x; i < n; i += kThreads) {
        const acc_t x = (static_cast<acc_t>(z[i]) - mu) * r;
        o[i] = static_cast<scalar_t>(wr[i] * r * (static_cast<acc_t>(t[i]) - cm - x * a));
      }
    });
  }
}

// gx: scratch [P, n]; part_w, part_b: [P, n] per-row contributions (nullptr: not asked for);
// grad_s: nullptr when s needs no gradient.
template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ s,
                                scalar_t* __restrict__ grad_s, const acc_t* __restrict__ mean,
                                const acc_t* __restrict__ rstd, const acc_t* __restrict__ w, acc_t* __restrict__ gx,
                                acc_t* __restrict__ part_w, acc_t* __restrict__ part_b,
                                const int64_t* __restrict__ offsets, const int64_t* __restrict__ rows, int64_t P,
                                int64_t R, int64_t K, int64_t n, int64_t G, bool rms) {
  __shared__ acc_t smem[kMaxSums * kThreads];
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n), c = rms ? acc_t(0) : acc_t(1);
  for (int64_t p = blockIdx.x; p < P; p += gridDim.x) {
    const scalar_t* z = s + p * n;
    const scalar_t* gy = g + p * n;
    const acc_t mu = mean[p], r = rstd[p];
    const acc_t* wr = w + (p % G) * n;
    acc_t* G_acc = gx != nullptr ? gx + p * n : nullptr;
    acc_t* pw = part_w != nullptr ? part_w + p * n : nullptr;
    acc_t* pb = part_b != nullptr ? part_b + p * n : nullptr;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const acc_t gv = static_cast<acc_t>(gy[i]);
      if (grad_s != nullptr) G_acc[i] = acc_t(0);
      if (pw != nullptr) pw[i] = gv * (static_cast<acc_t>(z[i]) - mu) * r;
      if (pb != nullptr) pb[i] = gv;
    }
    acc_t S = 0;  // the same value in every thread
    stacked_rows::for_each_rider(p, K, R, offsets, rows, [&](int64_t j) {
      const scalar_t* t = s + (P + j) * n;
      const scalar_t* gj = g + (P + j) * n;
      acc_t sums[5] = {0, 0, 0, 0, 0};  // sum t, sum x t, sum h, sum x h, sum h t
      for (int64_t i = threadIdx.x; i < n; i += kThreads) {
        const acc_t tv = static_cast<acc_t>(t[i]), h = static_cast<acc_t>(gj[i]) * wr[i];
        const acc_t x = (static_cast<acc_t>(z[i]) - mu) * r;
        sums[0] += tv;
        sums[1] += x * tv;
        sums[2] += h;
        sums[3] += x * h;
        sums[4] += h * tv;
      }
      block_sums(sums, smem);
      const acc_t cm = c * sums[0] * inv_n, a = sums[1] * inv_n, cmh = c * sums[2] * inv_n, e = sums[3] * inv_n;
      S += r * (sums[4] - cm * sums[2] - a * sums[3]);
      for (int64_t i = threadIdx.x; i < n; i += kThreads) {
        const acc_t tv = static_cast<acc_t>(t[i]), gv = static_cast<acc_t>(gj[i]), h = gv * wr[i];
        const acc_t x = (static_cast<acc_t>(z[i]) - mu) * r;
        if (grad_s != nullptr) {
          G_acc[i] += a * h + e * tv;
          grad_s[(P + j) * n + i] = static_cast<scalar_t>(r * (h - cmh - x * e));
        }
        if (pw != nullptr) pw[i] += gv * r * (tv - cm - x * a);
      }
    });
    if (grad_s == nullptr) continue;
    acc_t sums[2] = {0, 0};  // sum G, sum x G
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const acc_t v = static_cast<acc_t>(gy[i]) * wr[i] - r * G_acc[i];
      G_acc[i] = v;
      sums[0] += v;
      sums[1] += (static_cast<acc_t>(z[i]) - mu) * r * v;
    }
    block_sums(sums, smem);
    const acc_t cmG = c * sums[0] * inv_n, k = (sums[1] + S) * inv_n;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const acc_t x = (static_cast<acc_t>(z[i]) - mu) * r;
      grad_s[p * n + i] = static_cast<scalar_t>(r * (G_acc[i] - cmG - x * k));
    }
  }
}

// weight / bias as [G * n] of the accumulation type, `fill` where None.
Tensor param_or(const std::optional<Tensor>& p, const Tensor& s, int64_t G, double fill) {
  const Tensor v = ln::param(p, s);
  return v.defined() ? v : at::full({G * s.size(1)}, fill, s.options().dtype(ln::stat_dtype(s)));
}

std::tuple<Tensor, Tensor, Tensor> dual_layer_norm_cuda(const Tensor& s_in, const std::optional<Tensor>& weight,
                                                        const std::optional<Tensor>& bias, int64_t P,
                                                        const std::optional<Tensor>& index_in, double eps, bool rms) {
  int64_t G = 1;
  const int64_t R = ln::check("dual_layer_norm", s_in, P, index_in, weight, bias, &G);
  const c10::cuda::CUDAGuard guard(s_in.device());
  const Tensor s = s_in.contiguous();
  const std::optional<Tensor> index = stacked_rows::checked_index("dual_layer_norm", index_in, P);
  const auto riders = stacked_rows::riders(index, P);
  const Tensor& offsets = std::get<0>(riders);
  const Tensor& rows = std::get<1>(riders);
  const int64_t N = s.size(0), n = s.size(1), K = (N - P) / R;
  const auto stat_options = s.options().dtype(ln::stat_dtype(s));
  Tensor out = at::empty_like(s), mean = at::empty({P}, stat_options), rstd = at::empty({P}, stat_options);
  const Tensor w = param_or(weight, s, G, 1.0), b = param_or(bias, s, G, 0.0);
  const int64_t* off = offsets.defined() ? offsets.data_ptr<int64_t>() : nullptr;
  const int64_t* rw = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dual_layer_norm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t><<<blocks_for_rows(P), kThreads, 0, stream>>>(
        s.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(),
        w.data_ptr<acc_t>(), b.data_ptr<acc_t>(), off, rw, P, R, K, n, G, static_cast<acc_t>(eps), rms);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> dual_layer_norm_backward_cuda(
    const Tensor& grad_in, const Tensor& s_in, const std::optional<Tensor>& weight, const Tensor& mean_in,
    const Tensor& rstd_in, int64_t P, const std::optional<Tensor>& index_in, bool rms, int64_t G,
    std::array<bool, 3> output_mask) {
  const int64_t R = ln::check("dual_layer_norm_backward", s_in, P, index_in, std::nullopt, std::nullopt);
  ln::check_backward(grad_in, s_in, mean_in, rstd_in, P, G, weight);
  const c10::cuda::CUDAGuard guard(s_in.device());
  const Tensor s = s_in.contiguous(), grad = grad_in.contiguous();
  const Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const std::optional<Tensor> index = stacked_rows::checked_index("dual_layer_norm_backward", index_in, P);
  const auto riders = stacked_rows::riders(index, P);
  const Tensor& offsets = std::get<0>(riders);
  const Tensor& rows = std::get<1>(riders);
  const int64_t N = s.size(0), n = s.size(1), K = (N - P) / R;
  const auto stat_options = mean.options();
  const bool need_s = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  const Tensor w = param_or(weight, s, G, 1.0);
  Tensor grad_s = need_s ? at::empty_like(s) : at::empty({0}, s.options());
  Tensor gx = need_s ? at::empty({P, n}, stat_options) : Tensor();
  Tensor part_w = need_w ? at::empty({P, n}, stat_options) : Tensor();
  Tensor part_b = need_b ? at::empty({P, n}, stat_options) : Tensor();
  const int64_t* off = offsets.defined() ? offsets.data_ptr<int64_t>() : nullptr;
  const int64_t* rw = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
  if (need_s || need_w || need_b) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dual_layer_norm_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t, acc_t><<<blocks_for_rows(P), kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), need_s ? grad_s.data_ptr<scalar_t>() : nullptr,
          mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), w.data_ptr<acc_t>(), need_s ? gx.data_ptr<acc_t>() : nullptr,
          need_w ? part_w.data_ptr<acc_t>() : nullptr, need_b ? part_b.data_ptr<acc_t>() : nullptr, off, rw, P, R, K,
          n, G, rms);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // Row p belongs to group p mod G: [P, n] -> [P / G, G, n], summed over the first dimension.
  auto per_group = [&](const Tensor& part) { return part.view({P / G, G, n}).sum(0); };
  return {grad_s, need_w ? per_group(part_w) : at::empty({0}, stat_options),
          need_b ? per_group(part_b) : at::empty({0}, stat_options)};
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, CUDA, m) {
  m.impl("dual_layer_norm", &dual_layer_norm_cuda);
  m.impl("dual_layer_norm_backward", &dual_layer_norm_backward_cuda);
}

}  // namespace grokalign
