// CPU kernel of grokalign::max_pool2d_argmax (schema in csrc/grokalign.cpp; the scan's rule in
// csrc/common/max_pool2d_argmax.h): one task per (n, c) plane. Per output row, the window offsets
// (kh, kw) are visited in the scan's order, and for each the running maximum and argmax of every
// output column are updated in one SIMD loop with selects (each output still sees its window's entries
// in the scan's order, so the result is the scan's, ties and NaN included). Scanning window by window
// instead (ATen's CPU max pool, and csrc/common's window_argmax) branches on every comparison, which
// data mispredicts often: over [128, 32, 32, 32] float rows after a ReLU, 2 x 2 windows, one thread,
// ATen's max_pool2d_with_indices took 15.5 ms and this kernel 3.3 ms (bench/max_pool_argmax.py,
// 2026-11-30); on Gaussian rows (no ties) the window-by-window scan took 33 ms.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common/max_pool2d_argmax.h"
#include "cpu/row_passes_cpu.h"
#include "cpu/simd_math.h"

namespace grokalign {
namespace {

using at::Tensor;
namespace mpa = max_pool2d_argmax;

// Output columns [lo, hi) of one output row against input row xr at window column offset c (input
// column ow sW + c, flat index base + ow sW + c): take where greater than the running maximum, or NaN.
template <typename scalar_t, typename acc_t>
SIMD_TARGETS void scan_offset(const scalar_t* __restrict__ xr, int64_t lo, int64_t hi, int64_t sW, int64_t c,
                              int64_t base, acc_t* __restrict__ mx, int64_t* __restrict__ best) {
#pragma omp simd
  for (int64_t ow = lo; ow < hi; ++ow) {
    const int64_t iw = ow * sW + c;
    const acc_t v = static_cast<acc_t>(xr[iw]);
    const bool take = (v > mx[ow]) | (v != v);
    mx[ow] = take ? v : mx[ow];
    best[ow] = take ? base + iw : best[ow];
  }
}

Tensor max_pool2d_argmax_cpu(const Tensor& z_in, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  int64_t Ho = 0, Wo = 0;
  const mpa::Params p = mpa::check(z_in, kernel_size, stride, padding, dilation, ceil_mode, Ho, Wo);
  const Tensor z = z_in.contiguous();
  const int64_t N = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3);
  Tensor idx = at::empty({N, C, Ho, Wo}, z.options().dtype(at::kLong));
  if (idx.numel() == 0) return idx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "max_pool2d_argmax_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.data_ptr<scalar_t>();
    int64_t* ip = idx.data_ptr<int64_t>();
    at::parallel_for(0, N * C, row_passes::cpu::grain_rows(H * W), [&](int64_t q0, int64_t q1) {
      std::vector<acc_t> mx(Wo);
      for (int64_t q = q0; q < q1; ++q) {
        const scalar_t* x = zp + q * H * W;
        for (int64_t oh = 0; oh < Ho; ++oh) {
          int64_t* best = ip + (q * Ho + oh) * Wo;
          for (int64_t ow = 0; ow < Wo; ++ow) best[ow] = mpa::window_argmax<acc_t, true>(x, H, W, oh, ow, p);
          std::fill(mx.begin(), mx.end(), -std::numeric_limits<acc_t>::infinity());
          for (int64_t kh = 0; kh < p.kH; ++kh) {
            const int64_t ih = oh * p.sH - p.pH + kh * p.dH;
            if (ih < 0 || ih >= H) continue;
            for (int64_t kw = 0; kw < p.kW; ++kw) {
              // The columns ow whose input column ow sW + c lies in [0, W).
              const int64_t c = kw * p.dW - p.pW;
              const int64_t lo = c >= 0 ? 0 : (-c + p.sW - 1) / p.sW;
              const int64_t hi = W - 1 - c < 0 ? 0 : std::min(Wo, (W - 1 - c) / p.sW + 1);
              if (lo < hi) scan_offset(x + ih * W, lo, hi, p.sW, c, ih * W, mx.data(), best);
            }
          }
        }
      }
    });
  });
  return idx;
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, CPU, m) { m.impl("max_pool2d_argmax", &max_pool2d_argmax_cpu); }

}  // namespace grokalign
