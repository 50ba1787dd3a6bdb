// Argument checks of grokalign::dual_max_pool and grokalign::dual_max_pool_backward, shared by the
// CPU and CUDA kernels (csrc/cpu/dual_max_pool_cpu.cpp, csrc/cuda/dual_max_pool_cuda.cu).
//
// On stacked rows (common/stacked_rows.h) z [N, C, L] with the primal rows' argmax idx [P, C, Lout]:
//   out[r, c, o] = z[r, c, idx[src(r), c, o]],
// and the backward scatters: grad_z[r, c, idx[src(r), c, o]] += grad[r, c, o].
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "common/stacked_rows.h"

namespace grokalign {
namespace dual_max_pool {

// Checks the rows' count N and width C of z / grad, idx [P, C, Lout] (long, on z's device) and index;
// returns R (the tangent rows' period).
inline int64_t check(const char* op, const at::Tensor& rows, const at::Tensor& idx,
                     const std::optional<at::Tensor>& index) {
  TORCH_CHECK(rows.dim() == 3, "grokalign::", op, ": the rows must be [N, C, L], got ", rows.sizes());
  TORCH_CHECK(at::isFloatingType(rows.scalar_type()), "grokalign::", op, ": the rows must be floating point, got ",
              rows.scalar_type());
  TORCH_CHECK(idx.dim() == 3 && idx.scalar_type() == at::kLong && idx.size(1) == rows.size(1),
              "grokalign::", op, ": idx must be long [P, C=", rows.size(1), ", Lout], got ", idx.scalar_type(), " ",
              idx.sizes());
  TORCH_CHECK(idx.device() == rows.device(), "grokalign::", op, ": idx must be on ", rows.device());
  return stacked_rows::check_streams(op, rows.size(0), idx.size(0), index, rows.device());
}

// idx made contiguous, its values checked to lie in [0, L) for a CPU idx (one pass over the primal
// rows' indices; on a GPU an out-of-range idx is the caller's error, as with ATen's gather).
inline at::Tensor checked_idx(const char* op, const at::Tensor& idx, int64_t L) {
  at::Tensor c = idx.contiguous();
  if (c.device().is_cpu() && c.numel() > 0) {
    const auto [lo, hi] = at::aminmax(c);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < L, "grokalign::", op,
                ": idx must lie in [0, ", L, "), got values in [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
  }
  return c;
}

}  // namespace dual_max_pool
}  // namespace grokalign
