// CPU implementation of grokalign::rademacher_: fills a tensor with random signs +-1 drawn from
// a CPU generator, the same signs grokalign_fast/probes.py draws in Python for the same
// generator state (its specification and the reference the tests compare against).
//
// The Python path draws W = ceil(numel / 32) words with torch.randint(0, 2**32, (W,)), whose CPU
// kernel takes each word serially as the low 32 bits of CPUGeneratorImpl::random64(), and gives
// element e the sign of bit (e % 32) of word e / 32 (bit set: +1). That is 5 ATen calls and a
// [numel / 8, 8] gather; here it is one pass, ~2450 engine draws and a branch-free write for the
// 50 x 784 probes of a subsampled MNIST-sized batch.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>
#include <vector>

namespace grokalign {
namespace {

// table[b * 8 + i] = the sign of bit i of byte b: each byte of a word becomes 8 signs with one
// 8-element copy, which compiles to two 16-byte moves for float (a per-bit select compiled to
// branches and a per-bit variable shift does not vectorise on SSE2: 5x and 4x slower, measured).
template <typename scalar_t>
const scalar_t* sign_table() {
  static const std::vector<scalar_t> table = [] {
    std::vector<scalar_t> t(256 * 8);
    for (int b = 0; b < 256; ++b)
      for (int i = 0; i < 8; ++i) t[b * 8 + i] = scalar_t(((b >> i) & 1) ? 1 : -1);
    return t;
  }();
  return table.data();
}

void rademacher_cpu_(const at::Tensor& out, std::optional<at::Generator> generator) {
  TORCH_CHECK(out.device().is_cpu(), "rademacher_: out must be a CPU tensor, got ", out.device());
  TORCH_CHECK(at::isFloatingType(out.scalar_type()), "rademacher_: out must be floating point, got ",
              out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "rademacher_: out must be contiguous");
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  const int64_t total = out.numel();
  const int64_t nwords = (total + 31) / 32;
  std::vector<uint32_t> words(static_cast<size_t>(nwords));
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    for (int64_t w = 0; w < nwords; ++w) words[w] = static_cast<uint32_t>(gen->random64());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "rademacher_cpu", [&] {
    scalar_t* p = out.data_ptr<scalar_t>();
    const scalar_t* table = sign_table<scalar_t>();
    const uint32_t* wp = words.data();
    const int64_t full = total / 32;
    // Serial below 4096 words (131k signs): the write is memory bound and a worker's wake-up
    // costs more than it saves at probe sizes.
    at::parallel_for(0, full, 4096, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        const uint32_t bits = wp[w];
        scalar_t* row = p + w * 32;
        for (int j = 0; j < 4; ++j) std::memcpy(row + 8 * j, table + ((bits >> (8 * j)) & 0xffu) * 8, 8 * sizeof(scalar_t));
      }
    });
    for (int64_t e = full * 32; e < total; ++e)
      p[e] = table[((wp[e >> 5] >> (e & 24)) & 0xffu) * 8 + (e & 7)];
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, CPU, m) { m.impl("rademacher_", &rademacher_cpu_); }

}  // namespace grokalign
