// Operator schemas of the grokalign namespace: declared once here; every
// device registers its implementations in its own file (csrc/cpu, csrc/cuda)
// and the dispatcher picks the device.
#include <torch/library.h>

TORCH_LIBRARY(grokalign, m) {
  // Per-sample Hutchinson sum of a stack of probe products.
  //   g: [P, B, N] (P probes, B samples, N flattened features)
  //   returns out[b] = (1/P) * sum_{p,n} g[p,b,n]^2        -> [B]
  m.def("probe_sqnorm(Tensor g) -> Tensor");
  // Backward of probe_sqnorm: grad_g[p,b,n] = (2/P) * g[p,b,n] * grad_out[b]
  m.def("probe_sqnorm_backward(Tensor g, Tensor grad_out) -> Tensor");
}
