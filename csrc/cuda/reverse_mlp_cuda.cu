// CUDA kernels of grokalign::reverse_mlp and grokalign::reverse_mlp_backward: the driver
// common/reverse_mlp.h (GEMMs through ATen, cuBLAS) with the CUDA row passes (cuda/row_passes_cuda.cu).
#include <torch/library.h>

#include "common/reverse_mlp.h"
#include "cuda/row_passes_cuda.h"

namespace grokalign {

TORCH_LIBRARY_IMPL(grokalign, CUDA, m) { reverse_mlp::register_reverse_mlp_ops<row_passes::cuda::Passes>(m); }

}  // namespace grokalign
