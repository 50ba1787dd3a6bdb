// Argument checks of grokalign::dual_act and grokalign::dual_act_backward, shared by the CPU and
// CUDA kernels (csrc/cpu/dual_act_cpu.cpp, csrc/cuda/dual_act_cuda.cu).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "common/stacked_rows.h"

namespace grokalign {
namespace dual_act {

// The slope where the primal value is not positive: 0 for relu, alpha for leaky_relu.
inline double off_slope(int64_t act, double alpha) { return act == 2 ? alpha : 0.0; }

// Checks s / grad [N, n], P primal rows, index [R] (tangent rows N - P a multiple of R, or of P
// without index) and act; returns R (the tangent rows' period).
inline int64_t check(const char* op, const at::Tensor& s, int64_t P, const std::optional<at::Tensor>& index,
                     int64_t act) {
  TORCH_CHECK(s.dim() == 2, "grokalign::", op, ": the rows must be [N, n], got ", s.sizes());
  TORCH_CHECK(at::isFloatingType(s.scalar_type()), "grokalign::", op, ": the rows must be floating point, got ",
              s.scalar_type());
  TORCH_CHECK(act == 1 || act == 2, "grokalign::", op, ": act must be 1 (relu) or 2 (leaky_relu), got ", act);
  return stacked_rows::check_streams(op, s.size(0), P, index, s.device());
}

// The mask of dual_act_backward: uint8 [P, n] for rows of width n.
inline void check_mask(const at::Tensor& mask, int64_t P, int64_t n) {
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 2 && mask.size(0) == P && mask.size(1) == n,
              "grokalign::dual_act_backward: mask must be uint8 [", P, ", ", n, "], got ", mask.scalar_type(), " ",
              mask.sizes());
}

}  // namespace dual_act
}  // namespace grokalign
