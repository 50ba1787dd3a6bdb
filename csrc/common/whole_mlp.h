// Shared by the whole-MLP one-pass ops for piecewise-linear MLPs (grokalign::reverse_mlp, driver
// common/reverse_mlp.h, and grokalign::dual_mlp_sqnorm, driver common/dual_mlp_sqnorm.h): their
// argument checks. The elementwise passes: common/row_passes.h; the autograd:
// csrc/autograd/whole_mlp_autograd.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "common/dual_linear.h"

namespace grokalign {
namespace whole_mlp {

using at::Tensor;
using dual_linear::kIdentity;
using dual_linear::kLeakyRelu;
using dual_linear::kRelu;
using OptTensor = std::optional<Tensor>;

#define CHECK_OP_ARG(cond, ...) TORCH_CHECK(cond, "grokalign::", op, ": ", __VA_ARGS__)

struct Shapes {
  int64_t L, B, K, R;
};

// Checks every argument; each message names the argument and what was expected.
// probes [K, R, n] with n = the MLP's input size (input_probes) or output size.
inline Shapes check_args(const char* op, const char* probe_name, bool input_probes, const Tensor& x,
                         const Tensor& u, const OptTensor& index, at::TensorList weights, at::TensorList biases,
                         const std::vector<bool>& has_bias, at::IntArrayRef acts, at::ArrayRef<double> alphas) {
  const int64_t L = static_cast<int64_t>(weights.size());
  CHECK_OP_ARG(L >= 1, "weights must hold at least one [OUT, IN] matrix");
  CHECK_OP_ARG(static_cast<int64_t>(acts.size()) == L && static_cast<int64_t>(alphas.size()) == L &&
                   static_cast<int64_t>(has_bias.size()) == L,
               "acts, alphas and has_bias need one entry per weight (", L, "), got ", acts.size(), ", ",
               alphas.size(), ", ", has_bias.size());
  CHECK_OP_ARG(x.dim() == 2, "x must have shape [B, IN], got ", x.sizes());
  CHECK_OP_ARG(u.dim() == 3, probe_name, " must have shape [K, R, n], got ", u.sizes());
  const int64_t B = x.size(0), K = u.size(0), R = u.size(1);
  CHECK_OP_ARG(K >= 1, probe_name, " must carry at least one probe (K >= 1)");
  int64_t n = x.size(1);
  int64_t nb = 0;
  for (int64_t l = 0; l < L; ++l) {
    const Tensor& w = weights[l];
    CHECK_OP_ARG(w.dim() == 2 && w.size(1) == n, "weights[", l, "] must have shape [OUT, ", n, "], got ", w.sizes());
    CHECK_OP_ARG(w.scalar_type() == x.scalar_type() && w.device() == x.device(), "weights[", l, "] (", w.scalar_type(),
                 ", ", w.device(), ") must match x (", x.scalar_type(), ", ", x.device(), ")");
    CHECK_OP_ARG(acts[l] == kIdentity || acts[l] == kRelu || acts[l] == kLeakyRelu, "acts[", l,
                 "] must be a piecewise-linear activation code (identity 0, relu 1, leaky_relu 2), got ", acts[l]);
    if (has_bias[l]) {
      CHECK_OP_ARG(nb < static_cast<int64_t>(biases.size()), "biases holds ", biases.size(),
                   " tensors but has_bias marks more layers");
      const Tensor& b = biases[nb++];
      CHECK_OP_ARG(b.dim() == 1 && b.size(0) == w.size(0), "the bias of layer ", l, " must have shape [", w.size(0),
                   "], got ", b.sizes());
      CHECK_OP_ARG(b.scalar_type() == x.scalar_type() && b.device() == x.device(), "the bias of layer ", l,
                   " must match x's dtype and device");
    }
    n = w.size(0);
  }
  CHECK_OP_ARG(nb == static_cast<int64_t>(biases.size()), "biases holds ", biases.size(), " tensors, has_bias marks ",
               nb);
  const int64_t want = input_probes ? x.size(1) : n;
  CHECK_OP_ARG(u.size(2) == want, probe_name, " must have shape [K, R, ", want, "] (the MLP's ",
               input_probes ? "inputs" : "outputs", "), got ", u.sizes());
  CHECK_OP_ARG(u.scalar_type() == x.scalar_type() && u.device() == x.device(), probe_name,
               " must match x's dtype and device");
  if (index.has_value()) {
    CHECK_OP_ARG(index->dim() == 1 && index->size(0) == R && index->scalar_type() == at::kLong &&
                     index->device() == x.device(),
                 "index must be a long tensor [R=", R, "] on x's device, got ", index->scalar_type(), " ",
                 index->sizes());
  } else {
    CHECK_OP_ARG(R == B, probe_name, " has R=", R, " rows but x has B=", B, "; pass index for a subset of rows");
  }
  return {L, B, K, R};
}

#undef CHECK_OP_ARG

inline std::vector<bool> bool_vector(const c10::List<bool>& list) {
  std::vector<bool> out;
  out.reserve(list.size());
  for (size_t i = 0; i < list.size(); ++i) out.push_back(list.get(i));
  return out;
}

}  // namespace whole_mlp
}  // namespace grokalign
