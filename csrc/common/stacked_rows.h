// The stacked-row layout of the dual-stream engine's epilogue ops (grokalign::dual_act,
// grokalign::dual_smooth_act, grokalign::dual_max_pool, grokalign::dual_batch_norm_train), shared by
// their CPU and CUDA kernels (grokalign_fast/dual/streams.py describes the layout):
//
//   rows [0, P)       the primal rows,
//   rows [P, N)       T = N - P tangent rows; tangent row j (row P + j) rides on primal row
//                     src(j) = index[j % R] (index [R] long), or j % P without index (R = P).
//
// So the tangent rows are K = T / R streams of R rows, and the tangent rows riding on primal row p
// ("its riders") are j = k R + r for every k < K and every r with index[r] = p (r = p without index).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <optional>
#include <tuple>

namespace grokalign {
namespace stacked_rows {

// The source row of stacked row r (r itself for a primal row).
C10_HOST_DEVICE inline int64_t source_row(int64_t r, int64_t P, const int64_t* index, int64_t R) {
  return r < P ? r : (index != nullptr ? index[(r - P) % R] : (r - P) % P);
}

// Calls f(j) for every tangent row j (0-based among the tangent rows) riding on primal row p, in the
// order of the riders' table (offsets, rows) of riders() (stream-major within each r), or for
// j = k P + p, k < K, without index (offsets == nullptr).
template <typename F>
C10_HOST_DEVICE inline void for_each_rider(int64_t p, int64_t K, int64_t R, const int64_t* offsets,
                                           const int64_t* rows, F&& f) {
  if (offsets == nullptr) {
    for (int64_t k = 0; k < K; ++k) f(k * R + p);
    return;
  }
  for (int64_t q = offsets[p]; q < offsets[p + 1]; ++q) {
    const int64_t r = rows[q];
    for (int64_t k = 0; k < K; ++k) f(k * R + r);
  }
}

// The riders' table of index [R] over P primal rows, on index's device: (offsets [P + 1], rows [R])
// with rows[offsets[p] : offsets[p + 1]] the positions r (ascending) where index[r] = p. A stable
// sort and a binary search, so no host synchronisation on a GPU. Undefined tensors without index.
inline std::tuple<at::Tensor, at::Tensor> riders(const std::optional<at::Tensor>& index, int64_t P) {
  if (!index.has_value() || !index->defined()) return {at::Tensor(), at::Tensor()};
  const auto [sorted, order] = at::sort(*index, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor offsets = at::searchsorted(sorted, at::arange(P + 1, index->options()));
  return {offsets.contiguous(), order.contiguous()};
}

// Checks P primal rows among N stacked rows on `device` and the optional index [R] (a non-empty 1-D
// long tensor on the same device, T = N - P a multiple of R, or of P without index); returns R.
inline int64_t check_streams(const char* op, int64_t N, int64_t P, const std::optional<at::Tensor>& index,
                             const at::Device& device) {
  TORCH_CHECK(P >= 1 && P <= N, "grokalign::", op, ": primal_rows must be in [1, ", N, "], got ", P);
  const int64_t T = N - P;
  int64_t R = P;
  if (index.has_value() && index->defined()) {
    TORCH_CHECK(index->dim() == 1 && index->scalar_type() == at::kLong && index->size(0) >= 1,
                "grokalign::", op, ": index must be a non-empty 1-D long tensor, got ", index->scalar_type(), " ",
                index->sizes());
    TORCH_CHECK(index->device() == device, "grokalign::", op, ": index must be on ", device);
    R = index->size(0);
  }
  TORCH_CHECK(T % R == 0, "grokalign::", op, ": the ", T, " tangent rows are not a whole number of streams of ", R,
              " rows");
  return R;
}

// index [R] (long) must address rows of a P-row primal block: checked on the host for a CPU index
// before any loop reads through it (a CUDA kernel reading through an out-of-range index is the
// caller's error, as with ATen's index kernels).
inline void check_index_range(const char* op, const std::optional<at::Tensor>& index, int64_t P) {
  if (!index.has_value() || !index->defined() || !index->device().is_cpu()) return;
  const at::Tensor idx = index->contiguous();
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t r = 0; r < idx.numel(); ++r)
    TORCH_CHECK(p[r] >= 0 && p[r] < P, "grokalign::", op, ": index[", r, "] = ", p[r],
                " is out of range for x with B=", P, " rows");
}

// index made contiguous, its range checked (check_index_range); nullopt without index.
inline std::optional<at::Tensor> checked_index(const char* op, const std::optional<at::Tensor>& index, int64_t P) {
  if (!index.has_value() || !index->defined()) return std::nullopt;
  std::optional<at::Tensor> idx = index->contiguous();
  check_index_range(op, idx, P);
  return idx;
}

}  // namespace stacked_rows
}  // namespace grokalign
