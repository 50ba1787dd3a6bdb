// Shared by the CPU and CUDA kernels of grokalign::max_pool2d_argmax (csrc/cpu/max_pool2d_argmax_cpu.cpp,
// csrc/cuda/max_pool2d_argmax_cuda.cu): the argument checks, the output size and the window scan.
//
// The op returns the indices ATen's max_pool2d(..., return_indices=True) returns, without the values:
// per output entry the flat index ih W + iw of its window's maximum, scanned row by row (ih outer,
// iw inner) and taking an entry when it is greater than the running maximum or NaN, as ATen's CPU
// and CUDA kernels do, so ties keep the first entry and a NaN the last NaN. The values are compared in
// the accumulation type (float for half and bfloat16). A window of -inf keeps its first entry.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <limits>

namespace grokalign {
namespace max_pool2d_argmax {

struct Params {
  int64_t kH, kW, sH, sW, pH, pW, dH, dW;
};

// ATen's pooling output size (floor or ceil mode; a last window that would start in the right
// padding only is dropped).
inline int64_t out_size(int64_t in, int64_t k, int64_t pad, int64_t stride, int64_t dil, bool ceil_mode) {
  const int64_t num = in + 2 * pad - dil * (k - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  int64_t out = (num >= 0 ? num / stride : -((-num + stride - 1) / stride)) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out;
}

// Checks the arguments (as ATen's max_pool2d does, naming them); returns the parameters and sets
// Ho, Wo.
inline Params check(const at::Tensor& z, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, bool ceil_mode, int64_t& Ho, int64_t& Wo) {
  const char* op = "grokalign::max_pool2d_argmax";
  TORCH_CHECK(z.dim() == 4, op, ": z must be [N, C, H, W], got ", z.sizes());
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), op, ": z must be floating point, got ", z.scalar_type());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": kernel_size, stride, padding and dilation must have two entries each");
  const Params p{kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
  TORCH_CHECK(p.kH > 0 && p.kW > 0, op, ": kernel_size must be positive, got ", kernel_size);
  TORCH_CHECK(p.sH > 0 && p.sW > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(p.dH > 0 && p.dW > 0, op, ": dilation must be positive, got ", dilation);
  TORCH_CHECK(p.pH >= 0 && p.pW >= 0 && p.pH <= p.kH / 2 && p.pW <= p.kW / 2, op,
              ": padding must be non-negative and at most half of kernel_size, got padding ", padding,
              " and kernel_size ", kernel_size);
  Ho = out_size(z.size(2), p.kH, p.pH, p.sH, p.dH, ceil_mode);
  Wo = out_size(z.size(3), p.kW, p.pW, p.sW, p.dW, ceil_mode);
  TORCH_CHECK(Ho >= 1 && Wo >= 1, op, ": the output would be ", Ho, " x ", Wo, " for a ", z.size(2), " x ",
              z.size(3), " input: too small for the kernel");
  return p;
}

// The argmax of output entry (oh, ow) of the plane x [H, W] (acc_t: the comparison type), and the first
// entry of its window (where a window of -inf, or one the scan never takes from, keeps its argmax).
template <typename acc_t, bool FirstOnly = false, typename scalar_t>
C10_HOST_DEVICE inline int64_t window_argmax(const scalar_t* x, int64_t H, int64_t W, int64_t oh, int64_t ow,
                                             const Params& p) {
  int64_t ih0 = oh * p.sH - p.pH, iw0 = ow * p.sW - p.pW;
  const int64_t ih1 = ih0 + (p.kH - 1) * p.dH + 1 < H ? ih0 + (p.kH - 1) * p.dH + 1 : H;
  const int64_t iw1 = iw0 + (p.kW - 1) * p.dW + 1 < W ? iw0 + (p.kW - 1) * p.dW + 1 : W;
  while (ih0 < 0) ih0 += p.dH;
  while (iw0 < 0) iw0 += p.dW;
  int64_t best = ih0 * W + iw0;
  if constexpr (FirstOnly) return best;
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int64_t ih = ih0; ih < ih1; ih += p.dH) {
    for (int64_t iw = iw0; iw < iw1; iw += p.dW) {
      const int64_t i = ih * W + iw;
      const acc_t v = static_cast<acc_t>(x[i]);
      if (v > mx || v != v) {
        mx = v;
        best = i;
      }
    }
  }
  return best;
}

}  // namespace max_pool2d_argmax
}  // namespace grokalign
