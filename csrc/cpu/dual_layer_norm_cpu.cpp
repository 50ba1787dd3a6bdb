// CPU kernels of grokalign::dual_layer_norm and grokalign::dual_layer_norm_backward (schemas in
// csrc/grokalign.cpp; the math in csrc/common/dual_layer_norm.h). Both passes run over the primal
// rows (OpenMP through at::parallel_for): each primal row's statistics and x_hat are computed once,
// into a row buffer in the accumulation type (double for double rows, float otherwise), and then
// serve the tangent rows riding on it, so a row is read from memory once per pass and its riders
// once each (the forward reads them twice, the second time from cache). The row sums are SIMD
// reductions (see `rows` below). half / bfloat16 rows are converted into float row buffers on load
// and back on store.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/dual_layer_norm.h"
#include "cpu/row_passes_cpu.h"
#include "cpu/simd_math.h"
#include "common/stacked_rows.h"

namespace grokalign {
namespace {

using at::Tensor;
namespace ln = dual_layer_norm;

// Rows of scalar_t seen as rows of acc_t: the row itself when the types agree, else a converted
// copy in a row buffer (load), or a buffer converted on store (flush).
template <typename scalar_t, typename acc_t>
struct Rows {
  static constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  static const acc_t* load(const scalar_t* p, acc_t* buf, int64_t n) {
    if constexpr (kSame) {
      return p;
    } else {
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(p[i]);
      return buf;
    }
  }
  static acc_t* target(scalar_t* p, acc_t* buf) {
    if constexpr (kSame) {
      return p;
    } else {
      return buf;
    }
  }
  static void flush(const acc_t* buf, scalar_t* p, int64_t n) {
    if constexpr (!kSame) {
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(buf[i]);
    }
  }
};

// The rows' grain for work proportional to n (1 + riders per primal row) per primal row.
int64_t grain(int64_t n, int64_t P, int64_t N) { return row_passes::cpu::grain_rows(n * ((N + P - 1) / P)); }

// weight / bias as [G * n] of the accumulation type, `fill` where None.
Tensor param_or(const std::optional<Tensor>& p, const Tensor& s, int64_t G, double fill) {
  const Tensor v = ln::param(p, s);
  return v.defined() ? v : at::full({G * s.size(1)}, fill, s.options().dtype(ln::stat_dtype(s)));
}

template <typename scalar_t>
using acc_of = at::opmath_type<scalar_t>;

// The row loops, on rows of the accumulation type T (float or double): functions of restrict
// pointers, one SIMD loop each (`omp simd`, the sums as reductions), called once per row. Written as
// functions rather than inside the row lambdas: a loop in a lambda that reads the row pointers
// through its captures compiled to scalar code (GCC 12), 1.7x the backward's time.
//
// Each is compiled twice (SIMD_TARGETS, csrc/cpu/simd_math.h): for AVX2 and for the baseline. On
// [4096, 256] float rows, half primal, one thread: forward 0.38 -> 0.24 ms, backward 0.58 -> 0.36 ms
// against the baseline alone (AVX-512 clones: within the noise of AVX2).
namespace rows {

// sum(a), or sum((a - mu)^2) with `centred`.
template <typename T, bool centred>
SIMD_TARGETS
T sum(const T* __restrict__ a, T mu, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const T d = a[i] - mu;
    s += centred ? d * d : a[i];
  }
  return s;
}

// x = (z - mu) r; y = x w + b (y may be nullptr: x only).
template <typename T>
SIMD_TARGETS
void normalise(const T* __restrict__ z, T mu, T r, const T* __restrict__ w, const T* __restrict__ b,
               T* __restrict__ x, T* __restrict__ y, int64_t n) {
  if (y == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] = (z[i] - mu) * r;
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    x[i] = (z[i] - mu) * r;
    y[i] = x[i] * w[i] + b[i];
  }
}

// (sum t, sum x t).
template <typename T>
SIMD_TARGETS
std::array<T, 2> tangent_sums(const T* __restrict__ t, const T* __restrict__ x, int64_t n) {
  T st = 0, sxt = 0;
#pragma omp simd reduction(+ : st, sxt)
  for (int64_t i = 0; i < n; ++i) {
    st += t[i];
    sxt += x[i] * t[i];
  }
  return {st, sxt};
}

// o = w r (t - cm - x a).
template <typename T>
SIMD_TARGETS
void tangent_out(const T* __restrict__ t, const T* __restrict__ x, const T* __restrict__ w, T r, T cm, T a,
                 T* __restrict__ o, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) o[i] = w[i] * r * (t[i] - cm - x[i] * a);
}

// With h = g w: (sum t, sum x t, sum h, sum x h, sum h t).
template <typename T>
SIMD_TARGETS
std::array<T, 5> rider_sums(const T* __restrict__ t, const T* __restrict__ g, const T* __restrict__ x,
                            const T* __restrict__ w, int64_t n) {
  T st = 0, sxt = 0, sh = 0, sxh = 0, sht = 0;
#pragma omp simd reduction(+ : st, sxt, sh, sxh, sht)
  for (int64_t i = 0; i < n; ++i) {
    const T h = g[i] * w[i];
    st += t[i];
    sxt += x[i] * t[i];
    sh += h;
    sxh += x[i] * h;
    sht += h * t[i];
  }
  return {st, sxt, sh, sxh, sht};
}

// With h = g w: o = r (h - cmh - x e) (grad t), acc += a h + e t; and with gw (not nullptr)
// gw += g r (t - cm - x a) (grad_w's g u).
template <typename T>
SIMD_TARGETS
void rider_grads(const T* __restrict__ t, const T* __restrict__ g, const T* __restrict__ x, const T* __restrict__ w,
                 T r, T cm, T a, T cmh, T e, T* __restrict__ acc, T* __restrict__ o, T* __restrict__ gw, int64_t n) {
  if (gw == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T h = g[i] * w[i];
      acc[i] += a * h + e * t[i];
      o[i] = r * (h - cmh - x[i] * e);
    }
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T h = g[i] * w[i];
    acc[i] += a * h + e * t[i];
    o[i] = r * (h - cmh - x[i] * e);
    gw[i] += g[i] * r * (t[i] - cm - x[i] * a);
  }
}

// gw += g r (t - cm - x a).
template <typename T>
SIMD_TARGETS
void rider_grad_w(const T* __restrict__ t, const T* __restrict__ g, const T* __restrict__ x, T r, T cm, T a,
                  T* __restrict__ gw, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) gw[i] += g[i] * r * (t[i] - cm - x[i] * a);
}

// gw += gy x (gw not nullptr), gb += gy (gb not nullptr).
template <typename T>
SIMD_TARGETS
void primal_param_grads(const T* __restrict__ gy, const T* __restrict__ x, T* __restrict__ gw, T* __restrict__ gb,
                        int64_t n) {
  if (gw != nullptr && gb != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      gw[i] += gy[i] * x[i];
      gb[i] += gy[i];
    }
  } else if (gw != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) gw[i] += gy[i] * x[i];
  } else if (gb != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) gb[i] += gy[i];
  }
}

// acc = gy w - r acc (G, in place); returns (sum G, sum x G).
template <typename T>
SIMD_TARGETS
std::array<T, 2> primal_cotangent(const T* __restrict__ gy, const T* __restrict__ w, const T* __restrict__ x, T r,
                                  T* __restrict__ acc, int64_t n) {
  T sG = 0, sGx = 0;
#pragma omp simd reduction(+ : sG, sGx)
  for (int64_t i = 0; i < n; ++i) {
    const T v = gy[i] * w[i] - r * acc[i];
    acc[i] = v;
    sG += v;
    sGx += x[i] * v;
  }
  return {sG, sGx};
}

// o = r (G - cmG - x k).
template <typename T>
SIMD_TARGETS
void primal_grad(const T* __restrict__ G, const T* __restrict__ x, T r, T cmG, T k, T* __restrict__ o, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) o[i] = r * (G[i] - cmG - x[i] * k);
}

}  // namespace rows

// The stacked rows' layout (common/stacked_rows.h) and the op's parameters.
struct Layout {
  int64_t N, P, R, K, n, G;
  const int64_t* offsets;  // the riders' table; nullptr without index
  const int64_t* rows;
  bool rms;
};

// The forward over primal rows [0, P): out, and per primal row mean and rstd; w, b [G, n].
template <typename scalar_t>
void forward_rows(const Layout& L, const scalar_t* sp, scalar_t* op, acc_of<scalar_t>* mp, acc_of<scalar_t>* rp,
                  const acc_of<scalar_t>* wp, const acc_of<scalar_t>* bp, double eps) {
  using acc_t = acc_of<scalar_t>;
  using IO = Rows<scalar_t, acc_t>;
  const int64_t N = L.N, P = L.P, R = L.R, K = L.K, n = L.n, G = L.G;
  const acc_t e = static_cast<acc_t>(eps), inv_n = acc_t(1) / static_cast<acc_t>(n);
  const acc_t c = L.rms ? acc_t(0) : acc_t(1);
  at::parallel_for(0, P, grain(n, P, N), [&](int64_t p0, int64_t p1) {
    const int64_t m = IO::kSame ? 0 : n;  // conversion buffers for half / bfloat16 rows
    std::vector<acc_t> xbuf(n), zbuf(m), tbuf(m), ybuf(m), obuf(m);
    acc_t* x = xbuf.data();
    for (int64_t p = p0; p < p1; ++p) {
      const acc_t* z = IO::load(sp + p * n, zbuf.data(), n);
      const acc_t mu = L.rms ? acc_t(0) : rows::sum<acc_t, false>(z, acc_t(0), n) * inv_n;
      const acc_t r = ln::rstd(rows::sum<acc_t, true>(z, mu, n) * inv_n, e);
      mp[p] = mu;
      rp[p] = r;
      const acc_t* wr = wp + (p % G) * n;
      acc_t* y = IO::target(op + p * n, ybuf.data());
      rows::normalise(z, mu, r, wr, bp + (p % G) * n, x, y, n);
      IO::flush(y, op + p * n, n);
      stacked_rows::for_each_rider(p, K, R, L.offsets, L.rows, [&](int64_t j) {
        const acc_t* t = IO::load(sp + (P + j) * n, tbuf.data(), n);
        const auto [st, sxt] = rows::tangent_sums(t, x, n);
        acc_t* o = IO::target(op + (P + j) * n, obuf.data());
        rows::tangent_out(t, x, wr, r, c * st * inv_n, sxt * inv_n, o, n);
        IO::flush(o, op + (P + j) * n, n);
      });
    }
  });
}

// The backward over primal rows [0, P): grad_s (op; nullptr: not asked for) and the per-thread
// partial sums of grad_weight / grad_bias (pwp / pbp [threads, G, n]; nullptr: not asked for).
template <typename scalar_t>
void backward_rows(const Layout& L, const scalar_t* gp, const scalar_t* sp, scalar_t* op, const acc_of<scalar_t>* mp,
                   const acc_of<scalar_t>* rp, const acc_of<scalar_t>* wp, acc_of<scalar_t>* pwp,
                   acc_of<scalar_t>* pbp) {
  using acc_t = acc_of<scalar_t>;
  using IO = Rows<scalar_t, acc_t>;
  const int64_t N = L.N, P = L.P, R = L.R, K = L.K, n = L.n, G = L.G;
  const bool need_s = op != nullptr;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  const acc_t c = L.rms ? acc_t(0) : acc_t(1);
  at::parallel_for(0, P, grain(n, P, N), [&](int64_t p0, int64_t p1) {
    const int64_t tid = at::get_thread_num();
    const int64_t m = IO::kSame ? 0 : n;  // conversion buffers for half / bfloat16 rows
    std::vector<acc_t> xbuf(n), accbuf(n), zbuf(m), tbuf(m), gbuf(m), obuf(m);
    acc_t* x = xbuf.data();
    acc_t* acc = accbuf.data();  // sum over the riders of a_j h_j + e_j t_j, then G
    for (int64_t p = p0; p < p1; ++p) {
      const acc_t r = rp[p];
      rows::normalise<acc_t>(IO::load(sp + p * n, zbuf.data(), n), mp[p], r, nullptr, nullptr, x, nullptr, n);
      std::fill(acc, acc + n, acc_t(0));
      const int64_t grp = p % G;
      const acc_t* wr = wp + grp * n;
      acc_t* gw = pwp != nullptr ? pwp + (tid * G + grp) * n : nullptr;
      acc_t* gb = pbp != nullptr ? pbp + (tid * G + grp) * n : nullptr;
      acc_t S = 0;
      stacked_rows::for_each_rider(p, K, R, L.offsets, L.rows, [&](int64_t j) {
        const acc_t* t = IO::load(sp + (P + j) * n, tbuf.data(), n);
        const acc_t* g = IO::load(gp + (P + j) * n, gbuf.data(), n);
        const auto [st, sxt, sh, sxh, sht] = rows::rider_sums(t, g, x, wr, n);
        const acc_t cm = c * st * inv_n, a = sxt * inv_n, cmh = c * sh * inv_n, ej = sxh * inv_n;
        S += r * (sht - cm * sh - a * sxh);
        if (need_s) {
          acc_t* o = IO::target(op + (P + j) * n, obuf.data());
          rows::rider_grads(t, g, x, wr, r, cm, a, cmh, ej, acc, o, gw, n);
          IO::flush(o, op + (P + j) * n, n);
        } else if (gw != nullptr) {
          rows::rider_grad_w(t, g, x, r, cm, a, gw, n);
        }
      });
      const acc_t* gy = IO::load(gp + p * n, gbuf.data(), n);
      rows::primal_param_grads(gy, x, gw, gb, n);
      if (!need_s) continue;
      const auto [sG, sGx] = rows::primal_cotangent(gy, wr, x, r, acc, n);
      acc_t* o = IO::target(op + p * n, obuf.data());
      rows::primal_grad(acc, x, r, c * sG * inv_n, (sGx + S) * inv_n, o, n);
      IO::flush(o, op + p * n, n);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> dual_layer_norm_cpu(const Tensor& s_in, const std::optional<Tensor>& weight,
                                                       const std::optional<Tensor>& bias, int64_t P,
                                                       const std::optional<Tensor>& index_in, double eps, bool rms) {
  int64_t G = 1;
  const int64_t R = ln::check("dual_layer_norm", s_in, P, index_in, weight, bias, &G);
  const Tensor s = s_in.contiguous();
  const std::optional<Tensor> index = stacked_rows::checked_index("dual_layer_norm", index_in, P);
  const auto [offsets, rows] = stacked_rows::riders(index, P);
  const int64_t N = s.size(0), n = s.size(1), K = (N - P) / R;
  const auto stat_options = s.options().dtype(ln::stat_dtype(s));
  Tensor out = at::empty_like(s), mean = at::empty({P}, stat_options), rstd = at::empty({P}, stat_options);
  const Tensor w = param_or(weight, s, G, 1.0), b = param_or(bias, s, G, 0.0);
  const Layout L{N, P, R, K, n, G, offsets.defined() ? offsets.data_ptr<int64_t>() : nullptr,
                 rows.defined() ? rows.data_ptr<int64_t>() : nullptr, rms};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dual_layer_norm_cpu", [&] {
    forward_rows<scalar_t>(L, s.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), mean.data_ptr<acc_of<scalar_t>>(),
                           rstd.data_ptr<acc_of<scalar_t>>(), w.data_ptr<acc_of<scalar_t>>(),
                           b.data_ptr<acc_of<scalar_t>>(), eps);
  });
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> dual_layer_norm_backward_cpu(
    const Tensor& grad_in, const Tensor& s_in, const std::optional<Tensor>& weight, const Tensor& mean_in,
    const Tensor& rstd_in, int64_t P, const std::optional<Tensor>& index_in, bool rms, int64_t G,
    std::array<bool, 3> output_mask) {
  const int64_t R = ln::check("dual_layer_norm_backward", s_in, P, index_in, std::nullopt, std::nullopt);
  ln::check_backward(grad_in, s_in, mean_in, rstd_in, P, G, weight);
  const Tensor s = s_in.contiguous(), grad = grad_in.contiguous();
  const Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const std::optional<Tensor> index = stacked_rows::checked_index("dual_layer_norm_backward", index_in, P);
  const auto [offsets, rows] = stacked_rows::riders(index, P);
  const int64_t N = s.size(0), n = s.size(1), K = (N - P) / R;
  const auto stat_options = mean.options();
  const bool need_s = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  const Tensor w = ln::present(weight) ? ln::param(weight, s).view({G, n}) : at::ones({G, n}, stat_options);
  Tensor grad_s = need_s ? at::empty_like(s) : at::empty({0}, s.options());
  // Per-thread partial sums of grad_weight and grad_bias, [threads, G, n], summed at the end.
  const int64_t threads = at::get_num_threads();
  Tensor part_w = need_w ? at::zeros({threads, G, n}, stat_options) : Tensor();
  Tensor part_b = need_b ? at::zeros({threads, G, n}, stat_options) : Tensor();
  const Layout L{N, P, R, K, n, G, offsets.defined() ? offsets.data_ptr<int64_t>() : nullptr,
                 rows.defined() ? rows.data_ptr<int64_t>() : nullptr, rms};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dual_layer_norm_backward_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    backward_rows<scalar_t>(L, grad.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(),
                            need_s ? grad_s.data_ptr<scalar_t>() : nullptr, mean.data_ptr<acc_t>(),
                            rstd.data_ptr<acc_t>(), w.data_ptr<acc_t>(), need_w ? part_w.data_ptr<acc_t>() : nullptr,
                            need_b ? part_b.data_ptr<acc_t>() : nullptr);
  });
  return {grad_s, need_w ? part_w.sum(0) : at::empty({0}, stat_options),
          need_b ? part_b.sum(0) : at::empty({0}, stat_options)};
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, CPU, m) {
  m.impl("dual_layer_norm", &dual_layer_norm_cpu);
  m.impl("dual_layer_norm_backward", &dual_layer_norm_backward_cpu);
}

}  // namespace grokalign
