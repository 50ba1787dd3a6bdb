// CPU kernels of grokalign::dual_mlp_sqnorm and grokalign::dual_mlp_sqnorm_backward: the driver
// common/dual_mlp_sqnorm.h (GEMMs through ATen) with the CPU row passes (cpu/row_passes_cpu.h).
#include <torch/library.h>

#include "common/dual_mlp_sqnorm.h"
#include "cpu/row_passes_cpu.h"

namespace grokalign {

TORCH_LIBRARY_IMPL(grokalign, CPU, m) { dual_mlp_sqnorm::register_dual_mlp_sqnorm_ops<row_passes::cpu::Passes>(m); }

}  // namespace grokalign
