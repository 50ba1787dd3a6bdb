// CPU kernels of grokalign::dual_smooth_act and grokalign::dual_smooth_act_backward (schemas in
// csrc/grokalign.cpp; the math in csrc/common/dual_smooth_act.h). Both passes walk the primal rows'
// values in tiles of kTile contiguous entries (a tile may span rows or part of one). Per tile:
// the activation's arguments (Stage<A>::args), its transcendental functions by ATen's vectorised
// kernels on the tile's buffers (erf_, exp_, tanh_, ...: an ATen call per function and tile, not a
// scalar libm call per entry), then s' (and s'') in arithmetic into a tile buffer in the accumulation
// type, which serves the tangent rows riding on the tile's rows. No transcendental is computed per
// tangent entry and no slope tensor is made or saved.
//
// Float arithmetic (float, half and bfloat16 rows) of gelu, gelu_tanh, silu, tanh, sigmoid and elu takes a
// faster form: one SIMD loop per row piece (simd_math.h: the stages of each entry in registers, with
// the inlined float exp / erf / tanh), and s' is computed only for the primal rows that carry tangent
// rows (with a subsample most carry none; those rows get y in the forward and s' without s'' in the
// backward). Softplus (log1p) and double rows keep the ATen calls per tile.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/dual_smooth_act.h"
#include "cpu/row_passes_cpu.h"
#include "cpu/simd_math.h"
#include "common/stacked_rows.h"

namespace grokalign {
namespace {

using at::Tensor;
namespace sa = dual_smooth_act;

// Entries per tile: the tile's buffers (up to five of them) stay in L2, and the per-tile ATen calls
// (a few microseconds each) are amortised over 16k entries.
constexpr int64_t kTile = int64_t{1} << 14;

// x <- F(x) over a buffer of m entries, by ATen's vectorised CPU kernel (in place; called inside
// at::parallel_for, where ATen runs it on the calling thread).
template <int F, typename T>
void transform_block(T* x, int64_t m) {
  if constexpr (F == sa::kNone) return;
  Tensor t = at::from_blob(x, {m}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  if constexpr (F == sa::kErf) t.erf_();
  else if constexpr (F == sa::kExp) t.exp_();
  else if constexpr (F == sa::kTanh) t.tanh_();
  else if constexpr (F == sa::kSigmoid) t.sigmoid_();
  else if constexpr (F == sa::kExpm1) t.expm1_();
  else if constexpr (F == sa::kLog1pExp) t.exp_().log1p_();
}

// The tile [e0, e0 + m) of the primal block's entries z: y (if Y, written to y_out), d1 and (if D2) d2
// into the tile buffers, in the accumulation type acc_t.
template <int A, bool Y, bool D2, typename scalar_t, typename acc_t>
void tile_slopes(const scalar_t* z, int64_t m, const sa::Params<acc_t>& prm, acc_t* u, acc_t* v, scalar_t* y_out,
                 acc_t* d1, acc_t* d2) {
  using S = sa::Stage<A>;
  constexpr bool U = sa::uses_u<A, Y, true, D2>(), V = sa::uses_v<A, Y, true, D2>();
  for (int64_t i = 0; i < m; ++i) {
    acc_t a = 0, b = 0;
    S::args(static_cast<acc_t>(z[i]), prm, a, b);
    u[i] = a;
    v[i] = b;
  }
  if constexpr (U) transform_block<S::U>(u, m);
  if constexpr (V) transform_block<S::V>(v, m);
  for (int64_t i = 0; i < m; ++i) {
    acc_t y = 0, s1 = 0, s2 = 0;
    S::template combine<Y, true, D2>(static_cast<acc_t>(z[i]), u[i], v[i], prm, y, s1, s2);
    if constexpr (Y) y_out[i] = static_cast<scalar_t>(y);
    d1[i] = s1;
    if constexpr (D2) d2[i] = s2;
  }
}

// The float SIMD form (file comment): activations whose transcendental functions simd_math has.
template <int A>
constexpr bool kSimd = A == dual_linear::kGelu || A == dual_linear::kGeluTanh || A == dual_linear::kSilu ||
                       A == dual_linear::kTanh || A == dual_linear::kSigmoid || A == sa::kElu;

template <int F>
inline float simd_transform(float x) {
  if constexpr (F == sa::kErf) return simd_math::erf(x);
  else if constexpr (F == sa::kExp) return simd_math::exp(x);
  else if constexpr (F == sa::kTanh) return simd_math::tanh(x);
  else if constexpr (F == sa::kSigmoid) return simd_math::sigmoid(x);
  else if constexpr (F == sa::kExpm1) return simd_math::expm1(x);
  else return x;
}

// The requested subset of y = s(z) (stored as scalar_t), d1 = s'(z), d2 = s''(z) over m entries, in float.
// Called through simd_math::dispatch.
template <int A, bool Y, bool D1, bool D2, typename scalar_t>
void simd_slopes(const scalar_t* __restrict__ z, int64_t m, sa::Params<float> prm, scalar_t* __restrict__ y,
                              float* __restrict__ d1, float* __restrict__ d2) {
  using S = sa::Stage<A>;
#pragma omp simd
  for (int64_t i = 0; i < m; ++i) {
    const float zi = static_cast<float>(z[i]);
    float u = 0, v = 0, yi = 0, s1 = 0, s2 = 0;
    S::args(zi, prm, u, v);
    if constexpr (A == dual_linear::kGelu && sa::uses_v<A, Y, D1, D2>()) {
      u = simd_math::erf(u, &v);  // v = exp(-z^2 / 2) = exp(-u^2): erf's own Gaussian term
    } else {
      if constexpr (sa::uses_u<A, Y, D1, D2>()) u = simd_transform<S::U>(u);
      if constexpr (sa::uses_v<A, Y, D1, D2>()) v = simd_transform<S::V>(v);
    }
    S::template combine<Y, D1, D2>(zi, u, v, prm, yi, s1, s2);
    if constexpr (Y) y[i] = static_cast<scalar_t>(yi);
    if constexpr (D1) d1[i] = s1;
    if constexpr (D2) d2[i] = s2;
  }
}

// The rider loops of both passes, as SIMD loops (acc_t the accumulation type).
// o = t d.
template <typename scalar_t, typename acc_t>
SIMD_TARGETS void scale_row(const scalar_t* __restrict__ t, const acc_t* __restrict__ d, scalar_t* __restrict__ o,
                            int64_t m) {
#pragma omp simd
  for (int64_t i = 0; i < m; ++i) o[i] = static_cast<scalar_t>(static_cast<acc_t>(t[i]) * d[i]);
}
// acc += g t, o = g d (a rider's cotangent g and tangent t).
template <typename scalar_t, typename acc_t>
SIMD_TARGETS void rider_backward(const scalar_t* __restrict__ g, const scalar_t* __restrict__ t,
                                 const acc_t* __restrict__ d, acc_t* __restrict__ acc, scalar_t* __restrict__ o,
                                 int64_t m) {
#pragma omp simd
  for (int64_t i = 0; i < m; ++i) {
    const acc_t gv = static_cast<acc_t>(g[i]);
    acc[i] += gv * static_cast<acc_t>(t[i]);
    o[i] = static_cast<scalar_t>(gv * d[i]);
  }
}
// o = g d1 + d2 gt (gt, d2 nullptr: o = g d1).
template <typename scalar_t, typename acc_t>
SIMD_TARGETS void primal_backward(const scalar_t* __restrict__ g, const acc_t* __restrict__ d1,
                                  const acc_t* __restrict__ d2, const acc_t* __restrict__ gt, scalar_t* __restrict__ o,
                                  int64_t m) {
  if (d2 == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) o[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * d1[i]);
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < m; ++i) o[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * d1[i] + d2[i] * gt[i]);
}

// Calls f(p, c0, c1) for every primal row p meeting the tile [e0, e1) of the primal block (rows of n
// entries), with [c0, c1) the tile's columns of that row.
template <typename F>
void for_each_row_piece(int64_t e0, int64_t e1, int64_t n, F&& f) {
  for (int64_t p = e0 / n; p * n < e1; ++p) {
    const int64_t c0 = std::max(e0, p * n) - p * n, c1 = std::min(e1, (p + 1) * n) - p * n;
    f(p, c0, c1);
  }
}

// Whether primal row p carries tangent rows (K per entry of the riders' table, or K without index).
inline bool has_riders(int64_t p, int64_t K, const int64_t* offsets) {
  return K > 0 && (offsets == nullptr || offsets[p + 1] > offsets[p]);
}

// The grain of the primal block's entries for work proportional to 1 + riders per primal entry.
int64_t grain(int64_t P, int64_t N) {
  const int64_t per = std::max<int64_t>(1, row_passes::cpu::grain_elems() / ((N + P - 1) / P));
  return (per + kTile - 1) / kTile * kTile;
}

Tensor dual_smooth_act_cpu(const Tensor& s_in, int64_t P, const std::optional<Tensor>& index_in, int64_t act,
                           double alpha, double beta, double threshold) {
  const int64_t R = sa::check("dual_smooth_act", s_in, P, index_in, act);
  const Tensor s = s_in.contiguous();
  const std::optional<Tensor> index = stacked_rows::checked_index("dual_smooth_act", index_in, P);
  const auto [offsets, rows] = stacked_rows::riders(index, P);
  const int64_t N = s.size(0), n = s.size(1), K = (N - P) / R;
  Tensor out = at::empty_like(s);
  if (N * n == 0) return out;
  const int64_t* op_off = offsets.defined() ? offsets.data_ptr<int64_t>() : nullptr;
  const int64_t* op_rows = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dual_smooth_act_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const sa::Params<acc_t> prm{static_cast<acc_t>(alpha), static_cast<acc_t>(beta), static_cast<acc_t>(threshold)};
    const scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    sa::dispatch(act, [&](auto a) {
      constexpr int A = decltype(a)::value;
      at::parallel_for(0, P * n, grain(P, N), [&](int64_t b0, int64_t b1) {
        std::vector<acc_t> buf(3 * kTile);
        acc_t *u = buf.data(), *v = u + kTile, *d1 = v + kTile;
        for (int64_t e0 = b0; e0 < b1; e0 += kTile) {
          const int64_t e1 = std::min(b1, e0 + kTile);
          if constexpr (!(kSimd<A> && std::is_same_v<acc_t, float>)) {
            tile_slopes<A, true, false>(sp + e0, e1 - e0, prm, u, v, outp + e0, d1, static_cast<acc_t*>(nullptr));
          }
          for_each_row_piece(e0, e1, n, [&](int64_t p, int64_t c0, int64_t c1) {
            const int64_t m = c1 - c0;
            const acc_t* d = d1 + (p * n + c0 - e0);
            if constexpr (kSimd<A> && std::is_same_v<acc_t, float>) {
              if (!has_riders(p, K, op_off)) {
                simd_math::dispatch([&] {
                  simd_slopes<A, true, false, false>(sp + p * n + c0, m, prm, outp + p * n + c0, nullptr, nullptr);
                });
                return;
              }
              simd_math::dispatch([&] {
                simd_slopes<A, true, true, false>(sp + p * n + c0, m, prm, outp + p * n + c0, d1, nullptr);
              });
              d = d1;
            }
            stacked_rows::for_each_rider(p, K, R, op_off, op_rows, [&](int64_t j) {
              scale_row(sp + (P + j) * n + c0, d, outp + (P + j) * n + c0, m);
            });
          });
        }
      });
    });
  });
  return out;
}

Tensor dual_smooth_act_backward_cpu(const Tensor& grad_in, const Tensor& s_in, int64_t P,
                                    const std::optional<Tensor>& index_in, int64_t act, double alpha, double beta,
                                    double threshold) {
  const int64_t R = sa::check("dual_smooth_act_backward", s_in, P, index_in, act);
  sa::check_grad(grad_in, s_in);
  const Tensor s = s_in.contiguous();
  const Tensor grad = grad_in.contiguous();
  const std::optional<Tensor> index = stacked_rows::checked_index("dual_smooth_act_backward", index_in, P);
  const auto [offsets, rows] = stacked_rows::riders(index, P);
  const int64_t N = s.size(0), n = s.size(1), K = (N - P) / R;
  Tensor out = at::empty_like(s);
  if (N * n == 0) return out;
  const int64_t* op_off = offsets.defined() ? offsets.data_ptr<int64_t>() : nullptr;
  const int64_t* op_rows = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dual_smooth_act_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const sa::Params<acc_t> prm{static_cast<acc_t>(alpha), static_cast<acc_t>(beta), static_cast<acc_t>(threshold)};
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    sa::dispatch(act, [&](auto a) {
      constexpr int A = decltype(a)::value;
      at::parallel_for(0, P * n, grain(P, N), [&](int64_t b0, int64_t b1) {
        // u, v: the stages' buffers; d1, d2: s'(z), s''(z); gt: the sum over the riders of g_j t_j.
        std::vector<acc_t> buf(5 * kTile);
        acc_t *u = buf.data(), *v = u + kTile, *d1 = v + kTile, *d2 = d1 + kTile, *gt = d2 + kTile;
        for (int64_t e0 = b0; e0 < b1; e0 += kTile) {
          const int64_t e1 = std::min(b1, e0 + kTile), m = e1 - e0;
          if constexpr (kSimd<A> && std::is_same_v<acc_t, float>) {
            for_each_row_piece(e0, e1, n, [&](int64_t p, int64_t c0, int64_t c1) {
              const int64_t mp = c1 - c0;
              const scalar_t* z = sp + p * n + c0;
              if (!has_riders(p, K, op_off)) {
                simd_math::dispatch([&] {
                  simd_slopes<A, false, true, false>(z, mp, prm, static_cast<scalar_t*>(nullptr), d1, nullptr);
                });
                primal_backward<scalar_t, acc_t>(gp + p * n + c0, d1, nullptr, nullptr, outp + p * n + c0, mp);
                return;
              }
              simd_math::dispatch([&] {
                simd_slopes<A, false, true, true>(z, mp, prm, static_cast<scalar_t*>(nullptr), d1, d2);
              });
              std::fill(gt, gt + mp, acc_t(0));
              stacked_rows::for_each_rider(p, K, R, op_off, op_rows, [&](int64_t j) {
                rider_backward(gp + (P + j) * n + c0, sp + (P + j) * n + c0, d1, gt, outp + (P + j) * n + c0, mp);
              });
              primal_backward<scalar_t, acc_t>(gp + p * n + c0, d1, d2, gt, outp + p * n + c0, mp);
            });
            continue;
          }
          tile_slopes<A, false, true>(sp + e0, m, prm, u, v, static_cast<scalar_t*>(nullptr), d1, d2);
          std::fill(gt, gt + m, acc_t(0));
          for_each_row_piece(e0, e1, n, [&](int64_t p, int64_t c0, int64_t c1) {
            const int64_t off = p * n + c0 - e0;
            stacked_rows::for_each_rider(p, K, R, op_off, op_rows, [&](int64_t j) {
              rider_backward(gp + (P + j) * n + c0, sp + (P + j) * n + c0, d1 + off, gt + off,
                             outp + (P + j) * n + c0, c1 - c0);
            });
          });
          primal_backward<scalar_t, acc_t>(gp + e0, d1, d2, gt, outp + e0, m);
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, CPU, m) {
  m.impl("dual_smooth_act", &dual_smooth_act_cpu);
  m.impl("dual_smooth_act_backward", &dual_smooth_act_backward_cpu);
}

}  // namespace grokalign
