// CUDA kernels of grokalign::dual_mlp_sqnorm and grokalign::dual_mlp_sqnorm_backward: the driver
// common/dual_mlp_sqnorm.h (GEMMs through ATen, cuBLAS) with the CUDA row passes
// (cuda/row_passes_cuda.cu).
#include <torch/library.h>

#include "common/dual_mlp_sqnorm.h"
#include "cuda/row_passes_cuda.h"

namespace grokalign {

TORCH_LIBRARY_IMPL(grokalign, CUDA, m) {
  dual_mlp_sqnorm::register_dual_mlp_sqnorm_ops<row_passes::cuda::Passes>(m);
}

}  // namespace grokalign
