// CPU implementation of the dual-stream Linear(+bias) + activation ops
// grokalign::dual_linear, dual_linear_sqnorm and their backwards.
//
// Forward: the GEMMs of the primal and tangent rows write one stacked buffer
// preact = [z; u] (ATen/MKL), then one OpenMP-parallel pass over the primal rows b
// adds the bias, writes y = s(z) (and the ReLU mask), and, for the tangent rows
// r riding on b (r == b, or the inverse of index), writes t' = s'(z_b) * u_{k,r}
// or accumulates sq[r] = (1/K) sum_{k,o} (s'(z_b) u_{k,r})^2. s'(z_b) is evaluated
// once per row and reused by its K * (#rows) tangent rows.
//
// Backward: one parallel pass over b builds G = [gz; gu] (gz = gy s'(z) + s''(z)
// sum_{r->b, k} gt'_{k,r} u_{k,r};  gu = gt' s'(z_b)), owning its tangent rows, so
// repeated indices need no atomics and the result is deterministic; then
// gW = gz^T x + gu^T t, gb = sum gz, [gx; gt] = G W through ATen GEMMs.
//
// The loops are branch-free over the feature dimension so the compiler
// vectorises the piecewise-linear cases; the smooth activations call libm.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "common/dual_linear.h"

namespace grokalign {
namespace dual_linear {
namespace {

// Work per parallel chunk, in elements of OUT-wide rows (at::internal::GRAIN_SIZE / 4:
// the epilogue does several flops per element).
constexpr int64_t kGrainElems = 8192;

// Tangent rows of primal row b: rows[start[b] .. start[b+1]) (r increasing), the
// inverse of index as CSR; r == b when index is None.
struct RowMap {
  bool identity = true;
  std::vector<int64_t> start, rows;
  int64_t begin(int64_t b) const { return identity ? b : start[b]; }
  int64_t end(int64_t b) const { return identity ? b + 1 : start[b + 1]; }
  int64_t row(int64_t j) const { return identity ? j : rows[j]; }
};

RowMap make_row_map(const std::optional<at::Tensor>& index, int64_t B) {
  RowMap m;
  if (!index.has_value()) return m;
  m.identity = false;
  const at::Tensor idx = index->contiguous();
  const int64_t R = idx.numel();
  const int64_t* ip = idx.data_ptr<int64_t>();
  m.start.assign(B + 1, 0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t v = ip[r];
    DL_CHECK(v >= 0 && v < B, "index[", r, "] = ", v, " is out of range for B = ", B);
    ++m.start[v + 1];
  }
  for (int64_t b = 0; b < B; ++b) m.start[b + 1] += m.start[b];
  m.rows.resize(R);
  std::vector<int64_t> fill(m.start.begin(), m.start.end() - 1);
  for (int64_t r = 0; r < R; ++r) m.rows[fill[ip[r]]++] = r;
  return m;
}

int64_t grain_rows(const Dims& d) {
  const int64_t per_row = std::max<int64_t>(1, d.OUT * (1 + d.K * d.R / std::max<int64_t>(d.B, 1)));
  return std::max<int64_t>(1, kGrainElems / per_row);
}

// Row kernels over the OUT features: restrict-qualified, branch-free and
// specialised at compile time so that the compiler vectorises them. The uint8
// mask is written in a loop of its own: a char store may alias anything and
// would force scalar code on the loop that holds it.
template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// z += bias (rounded to scalar_t as the reference rounds it), y = s(z), d1 = s'(z).
template <typename scalar_t, int A, bool HAS_BIAS, bool D1>
inline void primal_row(scalar_t* __restrict__ z, const scalar_t* __restrict__ bias, acc_type<scalar_t> a,
                       scalar_t* __restrict__ y, acc_type<scalar_t>* __restrict__ d1, int64_t n) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t o = 0; o < n; ++o) {
    acc_t zv = static_cast<acc_t>(z[o]);
    if constexpr (HAS_BIAS) {
      const scalar_t zs = static_cast<scalar_t>(zv + static_cast<acc_t>(bias[o]));
      z[o] = zs;
      zv = static_cast<acc_t>(zs);
    }
    acc_t yv, dv, unused;
    act_eval<A, true, D1, false>(zv, a, yv, dv, unused);
    y[o] = static_cast<scalar_t>(yv);
    if constexpr (D1) d1[o] = dv;
  }
}

template <typename scalar_t>
inline void mask_row(const scalar_t* __restrict__ z, uint8_t* __restrict__ m, int64_t n) {
  for (int64_t o = 0; o < n; ++o) m[o] = static_cast<acc_type<scalar_t>>(z[o]) > acc_type<scalar_t>(0);
}

template <typename scalar_t>
inline void scale_row(const acc_type<scalar_t>* __restrict__ d1, const scalar_t* __restrict__ u,
                      scalar_t* __restrict__ out, int64_t n) {
  for (int64_t o = 0; o < n; ++o) out[o] = static_cast<scalar_t>(d1[o] * static_cast<acc_type<scalar_t>>(u[o]));
}

template <typename scalar_t>
inline acc_type<scalar_t> sqnorm_row(const acc_type<scalar_t>* __restrict__ d1, const scalar_t* __restrict__ u,
                                     int64_t n) {
  acc_type<scalar_t> s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t o = 0; o < n; ++o) {
    const acc_type<scalar_t> v = d1[o] * static_cast<acc_type<scalar_t>>(u[o]);
    s += v * v;
  }
  return s;
}

template <typename scalar_t, int A>
void forward_epilogue(const Dims& d, const RowMap& map, scalar_t* preact, const scalar_t* bias, double alpha,
                      scalar_t* y, uint8_t* mask, scalar_t* out /* t' [K,R,OUT] or sq [R] */, bool sqnorm) {
  using acc_t = acc_type<scalar_t>;
  const int64_t B = d.B, K = d.K, R = d.R, OUT = d.OUT;
  const acc_t a = static_cast<acc_t>(alpha);
  const acc_t inv_k = acc_t(1) / static_cast<acc_t>(K);
  at::parallel_for(0, B, grain_rows(d), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> d1buf(OUT);
    acc_t* d1 = d1buf.data();
    for (int64_t b = b0; b < b1; ++b) {
      scalar_t* zrow = preact + b * OUT;
      scalar_t* yrow = y + b * OUT;
      const int64_t j0 = map.begin(b), j1 = map.end(b);
      // Primal row: bias (kept in preact for the tangents and backward), y, s' if tangent rows ride on b.
      if (j0 < j1) {
        if (bias) primal_row<scalar_t, A, true, true>(zrow, bias, a, yrow, d1, OUT);
        else primal_row<scalar_t, A, false, true>(zrow, bias, a, yrow, d1, OUT);
      } else {
        if (bias) primal_row<scalar_t, A, true, false>(zrow, bias, a, yrow, d1, OUT);
        else primal_row<scalar_t, A, false, false>(zrow, bias, a, yrow, d1, OUT);
      }
      if (mask) mask_row(zrow, mask + b * OUT, OUT);
      // Tangent rows riding on b.
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t r = map.row(j);
        if (sqnorm) {
          acc_t s = 0;
          for (int64_t k = 0; k < K; ++k) s += sqnorm_row(d1, preact + (B + k * R + r) * OUT, OUT);
          out[r] = static_cast<scalar_t>(s * inv_k);
        } else {
          for (int64_t k = 0; k < K; ++k) scale_row(d1, preact + (B + k * R + r) * OUT, out + (k * R + r) * OUT, OUT);
        }
      }
    }
  });
}

// d1 = s'(z) (and d2 = s''(z)) of one primal row, from z.
template <typename scalar_t, int A, bool D2>
inline void derivs_row(const scalar_t* __restrict__ z, acc_type<scalar_t> a, acc_type<scalar_t>* __restrict__ d1,
                       acc_type<scalar_t>* __restrict__ d2, int64_t n) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t o = 0; o < n; ++o) {
    acc_t unused, dv1, dv2;
    act_eval<A, false, true, D2>(static_cast<acc_t>(z[o]), a, unused, dv1, dv2);
    d1[o] = dv1;
    if constexpr (D2) d2[o] = dv2;
  }
}

// One tangent row (k, r): g = gt'_{k,r} (or d sq / d t' = c s' u for the sqnorm),
// gu = g s', and acc += g u (the s'' term, SMOOTH).
template <typename scalar_t, bool SQNORM, bool WRITE_GU, bool SMOOTH>
inline void tangent_grad_row(const acc_type<scalar_t>* __restrict__ d1, const scalar_t* __restrict__ u,
                             const scalar_t* __restrict__ gt, acc_type<scalar_t> c, scalar_t* __restrict__ gu,
                             acc_type<scalar_t>* __restrict__ acc, int64_t n) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t o = 0; o < n; ++o) {
    acc_t g;
    if constexpr (SQNORM) {
      g = c * d1[o] * static_cast<acc_t>(u[o]);
    } else {
      g = static_cast<acc_t>(gt[o]);
    }
    if constexpr (WRITE_GU) gu[o] = static_cast<scalar_t>(g * d1[o]);
    if constexpr (SMOOTH) acc[o] += g * static_cast<acc_t>(u[o]);
  }
}

// gz = gy s' (+ s'' acc).
template <typename scalar_t, bool HAS_GY, bool SMOOTH>
inline void gz_row(const scalar_t* __restrict__ gy, const acc_type<scalar_t>* __restrict__ d1,
                   const acc_type<scalar_t>* __restrict__ d2, const acc_type<scalar_t>* __restrict__ acc,
                   scalar_t* __restrict__ gz, int64_t n) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t o = 0; o < n; ++o) {
    acc_t v = acc_t(0);
    if constexpr (HAS_GY) v = static_cast<acc_t>(gy[o]) * d1[o];
    if constexpr (SMOOTH) v += d2[o] * acc[o];
    gz[o] = static_cast<scalar_t>(v);
  }
}

// G rows: gz [B, OUT] (nullptr: not needed), gu [K*R, OUT] (nullptr: not needed).
// gtan: gt' [K, R, OUT] (dual_linear) or gsq [R] (sqnorm); TAN: gtan present.
template <typename scalar_t, int A, bool SQNORM, bool TAN>
void backward_epilogue(const Dims& d, const RowMap& map, const scalar_t* preact, const uint8_t* mask, double alpha,
                       const scalar_t* gy, const scalar_t* gtan, scalar_t* gz, scalar_t* gu) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool SMOOTH = !piecewise_linear(A) && TAN;  // the s'' term is present
  [[maybe_unused]] constexpr bool USES_U = SQNORM || SMOOTH;  // else u (and preact) is not read
  const int64_t B = d.B, K = d.K, R = d.R, OUT = d.OUT;
  const acc_t a = static_cast<acc_t>(alpha);
  const acc_t two_over_k = acc_t(2) / static_cast<acc_t>(K);
  at::parallel_for(0, B, grain_rows(d), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> buf(SMOOTH ? 3 * OUT : OUT);
    acc_t* d1 = buf.data();
    acc_t* d2 = SMOOTH ? d1 + OUT : nullptr;
    acc_t* acc = SMOOTH ? d1 + 2 * OUT : nullptr;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = map.begin(b), j1 = map.end(b);
      const bool has_rows = TAN && j0 < j1;
      if (!gz && !has_rows) continue;
      // s'(z_b) (and s''(z_b)): constant for identity, from the mask for ReLU-like, else from z.
      if constexpr (A == kIdentity) {
        std::fill(d1, d1 + OUT, acc_t(1));
      } else {
        if (mask) {
          const uint8_t* __restrict__ mrow = mask + b * OUT;
          const acc_t off = A == kLeakyRelu ? a : acc_t(0);
          for (int64_t o = 0; o < OUT; ++o) d1[o] = mrow[o] ? acc_t(1) : off;
        } else {
          derivs_row<scalar_t, A, SMOOTH>(preact + b * OUT, a, d1, d2, OUT);
        }
      }
      if constexpr (SMOOTH) std::fill(acc, acc + OUT, acc_t(0));
      if constexpr (TAN) {
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t r = map.row(j);
          const acc_t c = SQNORM ? two_over_k * static_cast<acc_t>(gtan[r]) : acc_t(0);
          for (int64_t k = 0; k < K; ++k) {
            const int64_t row = k * R + r;
            const scalar_t* urow = USES_U ? preact + (B + row) * OUT : nullptr;
            const scalar_t* gtrow = SQNORM ? nullptr : gtan + row * OUT;
            if (gu) {
              tangent_grad_row<scalar_t, SQNORM, true, SMOOTH>(d1, urow, gtrow, c, gu + row * OUT, acc, OUT);
            } else if constexpr (SMOOTH) {
              tangent_grad_row<scalar_t, SQNORM, false, SMOOTH>(d1, urow, gtrow, c, nullptr, acc, OUT);
            }
          }
        }
      }
      if (gz) {
        if (gy) gz_row<scalar_t, true, SMOOTH>(gy + b * OUT, d1, d2, acc, gz + b * OUT, OUT);
        else gz_row<scalar_t, false, SMOOTH>(nullptr, d1, d2, acc, gz + b * OUT, OUT);
      }
    }
  });
}

template <typename scalar_t>
const scalar_t* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<scalar_t>() : nullptr;
}

// Shared forward: returns y, t' or sq, mask, preact.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& x, const at::Tensor& t, const at::Tensor& weight, const std::optional<at::Tensor>& bias_in,
    const std::optional<at::Tensor>& index, int64_t act, double alpha, bool save, bool sqnorm) {
  const Dims d = check_forward(x, t, weight, bias_in, index, act);
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
  const RowMap map = make_row_map(index, d.B);
  const std::optional<at::Tensor> bias = opt_contiguous(bias_in);
  at::Tensor preact = stacked_gemm(x, t, weight, d);
  at::Tensor y = at::empty({d.B, d.OUT}, x.options());
  at::Tensor out = sqnorm ? at::empty({d.R}, x.options()) : at::empty({d.K, d.R, d.OUT}, x.options());
  const bool keep_mask = save && !sqnorm && mask_activation(act);
  const bool keep_preact = save && (sqnorm || !piecewise_linear(act));
  at::Tensor mask = at::empty({keep_mask ? d.B : 0, keep_mask ? d.OUT : 0}, x.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dual_linear_cpu", [&] {
    dispatch_act(act, [&](auto A) {
      uint8_t* mp = keep_mask ? mask.data_ptr<uint8_t>() : nullptr;
      forward_epilogue<scalar_t, decltype(A)::value>(d, map, preact.data_ptr<scalar_t>(), opt_ptr<scalar_t>(bias), alpha,
                                                      y.data_ptr<scalar_t>(), mp, out.data_ptr<scalar_t>(), sqnorm);
    });
  });
  if (!keep_preact) preact = at::empty({0, d.OUT}, x.options());
  return {y, out, mask, preact};
}

// Shared backward: returns [gx; gt] (rows present per output_mask), gW, gb.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const std::optional<at::Tensor>& gy_in, const std::optional<at::Tensor>& gtan_in,
    const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& t, const std::optional<at::Tensor>& weight,
    const at::Tensor& mask_in, const at::Tensor& preact_in, const std::optional<at::Tensor>& index, at::IntArrayRef dims,
    int64_t act, double alpha, std::array<bool, 4> output_mask, bool sqnorm) {
  const std::optional<at::Tensor> gy = opt_contiguous(gy_in), gtan = opt_contiguous(gtan_in);
  BackwardPlan p;
  const Dims d = check_backward(dims, act, mask_in, preact_in, sqnorm, gy, gtan, x, t, weight, output_mask, p);
  const at::Tensor preact = preact_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor& ref = gy.has_value() ? *gy : *gtan;
  TORCH_INTERNAL_ASSERT(ref.device().is_cpu());
  const RowMap map = make_row_map(index, d.B);
  at::Tensor G = at::empty({d.B + d.K * d.R, d.OUT}, ref.options());
  if (p.need_gz || p.need_gu) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ref.scalar_type(), "dual_linear_bwd_cpu", [&] {
      dispatch_act(act, [&](auto A) {
        constexpr int a = decltype(A)::value;
        const uint8_t* mp = (!sqnorm && mask_activation(a)) ? mask.data_ptr<uint8_t>() : nullptr;
        const scalar_t* zp = preact.numel() ? preact.data_ptr<scalar_t>() : nullptr;
        const scalar_t* gyp = opt_ptr<scalar_t>(gy);
        const scalar_t* gtp = opt_ptr<scalar_t>(gtan);
        scalar_t* gzp = p.need_gz ? G.data_ptr<scalar_t>() : nullptr;
        scalar_t* gup = p.need_gu ? G.data_ptr<scalar_t>() + d.B * d.OUT : nullptr;
        if (sqnorm) {
          if (p.tan) backward_epilogue<scalar_t, a, true, true>(d, map, zp, mp, alpha, gyp, gtp, gzp, gup);
          else backward_epilogue<scalar_t, a, true, false>(d, map, zp, mp, alpha, gyp, gtp, gzp, gup);
        } else {
          if (p.tan) backward_epilogue<scalar_t, a, false, true>(d, map, zp, mp, alpha, gyp, gtp, gzp, gup);
          else backward_epilogue<scalar_t, a, false, false>(d, map, zp, mp, alpha, gyp, gtp, gzp, gup);
        }
      });
    });
  }
  return backward_gemms(G, d, p, x, t, weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, CPU, m) { register_ops<&forward_impl, &backward_impl>(m); }

}  // namespace dual_linear
}  // namespace grokalign
