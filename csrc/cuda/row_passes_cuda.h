// The CUDA row passes of the whole-MLP ops (the interface and the semantics: csrc/common/row_passes.h),
// defined in row_passes_cuda.cu: one grid-stride kernel per pass on the current stream, for float,
// double, half and bfloat16 rows whose entries are contiguous (any row stride); other layouts and mixed
// dtypes take the ATen form of the pass (row_passes::aten).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace grokalign {
namespace row_passes {
namespace cuda {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

Tensor activate(const Tensor& z, const Tensor* bias, int64_t act, double alpha);
void mul_slopes(const Tensor& primal, const Tensor& tangent, const Tensor& D, const OptTensor& index, int64_t K,
                int64_t R);
void scale_rows(const Tensor& out, const Tensor& src, const Tensor& c, int64_t K, int64_t R);
Tensor probe_sqnorm(const Tensor& t, int64_t K, int64_t R, bool root, double scale);
Tensor seed_factor(const Tensor& grad, const Tensor& t, int64_t K, int64_t R, bool root, double scale);

// The passes as the whole-MLP drivers take them (common/row_passes.h).
struct Passes {
  static Tensor activate(const Tensor& z, const Tensor* bias, int64_t act, double alpha) {
    return cuda::activate(z, bias, act, alpha);
  }
  static void mul_slopes(const Tensor& primal, const Tensor& tangent, const Tensor& D, const OptTensor& index,
                         int64_t K, int64_t R) {
    cuda::mul_slopes(primal, tangent, D, index, K, R);
  }
  static void scale_rows(const Tensor& out, const Tensor& src, const Tensor& c, int64_t K, int64_t R) {
    cuda::scale_rows(out, src, c, K, R);
  }
  static Tensor probe_sqnorm(const Tensor& t, int64_t K, int64_t R, bool root, double scale) {
    return cuda::probe_sqnorm(t, K, R, root, scale);
  }
  static Tensor seed_factor(const Tensor& grad, const Tensor& t, int64_t K, int64_t R, bool root, double scale) {
    return cuda::seed_factor(grad, t, K, R, root, scale);
  }
};

}  // namespace cuda
}  // namespace row_passes
}  // namespace grokalign
