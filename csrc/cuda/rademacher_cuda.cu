// CUDA implementation of grokalign::rademacher_: fills a tensor with random signs +-1 drawn from a
// CUDA generator, the same signs grokalign_fast/probes.py's rademacher_reference draws for the same
// generator state (its specification, and what the tests compare against).
//
// The reference draws W = ceil(numel / 32) words with torch.randint(0, 2**32, (W,)) on the generator's
// device and gives element e the sign of bit (e % 32) of word e / 32 (bit set: +1). Here the words come
// from the very same call, at::randint(0, 2^32, {W}, generator) on out's device, so the same generator
// state gives the same words and leaves the generator in the same state (whatever the Philox layout of
// ATen's random kernel); one kernel then unpacks the bits, in place of the reference's int32 view, byte
// view, conversion, table lookup and reshape.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace grokalign {
namespace {

constexpr int kThreads = 256;

// out[e] = +1 where bit e % 32 of words[e / 32] is set, else -1 (words: int64 holding 32 random bits).
template <typename scalar_t>
__global__ void unpack_signs_kernel(const int64_t* __restrict__ words, scalar_t* __restrict__ out, int64_t total) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const uint64_t w = static_cast<uint64_t>(words[e >> 5]);
    out[e] = ((w >> (e & 31)) & 1u) ? scalar_t(1) : scalar_t(-1);
  }
}

void rademacher_cuda_(const at::Tensor& out, std::optional<at::Generator> generator) {
  TORCH_CHECK(out.is_cuda(), "rademacher_: out must be a CUDA tensor, got ", out.device());
  TORCH_CHECK(at::isFloatingType(out.scalar_type()), "rademacher_: out must be floating point, got ",
              out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "rademacher_: out must be contiguous");
  if (generator.has_value() && generator->defined()) {
    TORCH_CHECK(generator->device().is_cuda(), "rademacher_: generator must be a CUDA generator for a CUDA out, got ",
                generator->device());
  }
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t total = out.numel();
  // Drawn also for an empty out, as the reference draws (an empty draw), so the generator advances alike.
  const at::Tensor words =
      at::randint(0, int64_t{1} << 32, {(total + 31) / 32}, generator, out.options().dtype(at::kLong));
  if (total == 0) return;
  const int blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "rademacher_cuda", [&] {
    unpack_signs_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        words.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), total);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, CUDA, m) { m.impl("rademacher_", &rademacher_cuda_); }

}  // namespace grokalign
