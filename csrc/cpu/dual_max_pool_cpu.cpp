// CPU kernels of grokalign::dual_max_pool and grokalign::dual_max_pool_backward (schemas in
// csrc/grokalign.cpp; the layout in csrc/common/dual_max_pool.h): one loop over the (row, channel)
// pairs, each reading its primal row's argmax indices in place. The backward accumulates each pair's
// scatter in a row buffer of the accumulation type (overlapping windows add into one entry) and
// writes the row once, so it is deterministic and needs no zero-filled output first.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "common/dual_max_pool.h"
#include "cpu/row_passes_cpu.h"
#include "common/stacked_rows.h"

namespace grokalign {
namespace {

using at::Tensor;

Tensor dual_max_pool_cpu(const Tensor& z_in, const Tensor& idx_in, const std::optional<Tensor>& index_in) {
  const int64_t R = dual_max_pool::check("dual_max_pool", z_in, idx_in, index_in);
  const Tensor z = z_in.contiguous();
  const int64_t N = z.size(0), C = z.size(1), L = z.size(2), P = idx_in.size(0), Lout = idx_in.size(2);
  const Tensor idx = dual_max_pool::checked_idx("dual_max_pool", idx_in, L);
  const std::optional<Tensor> index = stacked_rows::checked_index("dual_max_pool", index_in, P);
  const int64_t* ip = index.has_value() ? index->data_ptr<int64_t>() : nullptr;
  Tensor out = at::empty({N, C, Lout}, z.options());
  if (N * C * Lout == 0) return out;
  const int64_t* am = idx.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "dual_max_pool_cpu", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N * C, row_passes::cpu::grain_rows(Lout), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t r = q / C, c = q - r * C;
        const int64_t* a = am + (stacked_rows::source_row(r, P, ip, R) * C + c) * Lout;
        const scalar_t* x = zp + q * L;
        scalar_t* y = op + q * Lout;
        for (int64_t o = 0; o < Lout; ++o) y[o] = x[a[o]];
      }
    });
  });
  return out;
}

Tensor dual_max_pool_backward_cpu(const Tensor& grad_in, const Tensor& idx_in, const std::optional<Tensor>& index_in,
                                  int64_t L) {
  const int64_t R = dual_max_pool::check("dual_max_pool_backward", grad_in, idx_in, index_in);
  TORCH_CHECK(grad_in.size(2) == idx_in.size(2), "grokalign::dual_max_pool_backward: grad must be [N, C, Lout=",
              idx_in.size(2), "], got ", grad_in.sizes());
  TORCH_CHECK(L >= 0, "grokalign::dual_max_pool_backward: length must be >= 0, got ", L);
  const Tensor grad = grad_in.contiguous();
  const int64_t N = grad.size(0), C = grad.size(1), P = idx_in.size(0), Lout = idx_in.size(2);
  const Tensor idx = dual_max_pool::checked_idx("dual_max_pool_backward", idx_in, L);
  const std::optional<Tensor> index = stacked_rows::checked_index("dual_max_pool_backward", index_in, P);
  const int64_t* ip = index.has_value() ? index->data_ptr<int64_t>() : nullptr;
  Tensor out = at::empty({N, C, L}, grad.options());
  if (N * C * L == 0) return out;
  const int64_t* am = idx.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "dual_max_pool_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N * C, row_passes::cpu::grain_rows(L + Lout), [&](int64_t q0, int64_t q1) {
      std::vector<acc_t> acc(L);
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t r = q / C, c = q - r * C;
        const int64_t* a = am + (stacked_rows::source_row(r, P, ip, R) * C + c) * Lout;
        const scalar_t* g = gp + q * Lout;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t o = 0; o < Lout; ++o) acc[a[o]] += static_cast<acc_t>(g[o]);
        scalar_t* y = op + q * L;
        for (int64_t l = 0; l < L; ++l) y[l] = static_cast<scalar_t>(acc[l]);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, CPU, m) {
  m.impl("dual_max_pool", &dual_max_pool_cpu);
  m.impl("dual_max_pool_backward", &dual_max_pool_backward_cpu);
}

}  // namespace grokalign
