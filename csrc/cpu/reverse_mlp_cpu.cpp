// CPU kernels of grokalign::reverse_mlp and grokalign::reverse_mlp_backward: the driver
// common/reverse_mlp.h (GEMMs through ATen) with the CPU row passes (cpu/row_passes_cpu.h).
#include <torch/library.h>

#include "common/reverse_mlp.h"
#include "cpu/row_passes_cpu.h"

namespace grokalign {

TORCH_LIBRARY_IMPL(grokalign, CPU, m) { reverse_mlp::register_reverse_mlp_ops<row_passes::cpu::Passes>(m); }

}  // namespace grokalign
