// CUDA row passes of the whole-MLP ops (grokalign::reverse_mlp, grokalign::dual_mlp_sqnorm): the
// interface and the semantics are csrc/common/row_passes.h, the CPU loops csrc/cpu/row_passes_cpu.h.
//
// Each pass is one simple kernel on the current stream: a grid-stride loop over the entries of the
// rows (one thread per entry), or one block per output row for the row sums of squares. Arithmetic
// in at::opmath_type (float for half / bfloat16), each stored value rounded to the rows' dtype as the
// ATen form rounds it; the row sums of squares accumulate in at::acc_type<scalar_t, false>, as the
// CPU loop does (double for float). Rows need contiguous entries (any row stride, as the drivers'
// stacked buffers have); anything else runs the ATen form.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <optional>

#include "common/dual_linear.h"
#include "common/row_passes.h"
#include "cuda/row_passes_cuda.h"

namespace grokalign {
namespace row_passes {
namespace cuda {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(b, 1), 65535));
}

bool kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A matrix of a kernel dtype with contiguous entries along its rows, or undefined.
bool kernel_ok(const Tensor& t) { return !t.defined() || (rows_contiguous(t) && kernel_dtype(t.scalar_type())); }

// z [B, n] (row stride ld) += bias, then D = s'(z) and z = s(z): mask (relu) or slopes (leaky relu).
template <typename scalar_t>
__global__ void activate_kernel(scalar_t* __restrict__ z, int64_t ld, const scalar_t* __restrict__ bias,
                                bool* __restrict__ mask, scalar_t* __restrict__ slopes, int64_t B, int64_t n,
                                at::opmath_type<scalar_t> alpha, scalar_t alpha_slope) {
  using op_t = at::opmath_type<scalar_t>;
  const int64_t total = B * n;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / n, j = i - r * n;
    scalar_t* e = z + r * ld + j;
    // z + bias rounded to the rows' dtype first, as the ATen form's add_ stores it.
    const scalar_t zs = bias != nullptr ? static_cast<scalar_t>(static_cast<op_t>(*e) + static_cast<op_t>(bias[j]))
                                        : *e;
    const op_t v = static_cast<op_t>(zs);
    const bool pos = v > op_t(0);
    if (mask != nullptr) {
      mask[i] = pos;                         // [z > 0]; NaN gives false
      *e = v < op_t(0) ? scalar_t(0) : zs;   // relu, NaN stays NaN
    } else {
      slopes[i] = pos ? scalar_t(1) : alpha_slope;
      *e = pos ? zs : static_cast<scalar_t>(v * alpha);  // z > 0 ? z : alpha z, as torch's leaky_relu
    }
  }
}

// primal row i *= D[i]; tangent row k*R + r *= D[src(r)], src(r) = index[r] (or r); P rows in D.
template <typename scalar_t, typename slope_t>
__global__ void mul_slopes_kernel(scalar_t* __restrict__ primal, int64_t ldp, int64_t Bp,
                                  scalar_t* __restrict__ tangent, int64_t ldt, int64_t Bt,
                                  const slope_t* __restrict__ D, int64_t P, const int64_t* __restrict__ index,
                                  int64_t R, int64_t n) {
  using op_t = at::opmath_type<scalar_t>;
  const int64_t total = (Bp + Bt) * n;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = i / n, j = i - row * n;
    scalar_t* e;
    int64_t src;
    if (row < Bp) {
      e = primal + row * ldp + j;
      src = row;
    } else {
      const int64_t tr = row - Bp, r = tr % R;
      e = tangent + tr * ldt + j;
      src = index != nullptr ? index[r] : r;
    }
    CUDA_KERNEL_ASSERT(src >= 0 && src < P);
    *e = static_cast<scalar_t>(static_cast<op_t>(*e) * static_cast<op_t>(D[src * n + j]));
  }
}

// out row i (row stride ldo) = src row i (row stride lds) * c[i % R], for rows i < rows.
template <typename scalar_t>
__global__ void scale_rows_kernel(scalar_t* __restrict__ out, int64_t ldo, const scalar_t* __restrict__ src,
                                  int64_t lds, const scalar_t* __restrict__ c, int64_t rows, int64_t R, int64_t n) {
  using op_t = at::opmath_type<scalar_t>;
  const int64_t total = rows * n;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = i / n, j = i - row * n;
    out[row * ldo + j] = static_cast<scalar_t>(static_cast<op_t>(src[row * lds + j]) * static_cast<op_t>(c[row % R]));
  }
}

// One block per r: out[r] = scale * f((1/K) sum_k ||t[k*R + r]||^2), f = sqrt with root.
template <typename scalar_t, typename acc_t>
__global__ void sum_sq_rows_kernel(const scalar_t* __restrict__ t, int64_t ld, int64_t n, int64_t K, int64_t R,
                                   bool root, bool scaled, scalar_t scale, scalar_t* __restrict__ out) {
  using op_t = at::opmath_type<scalar_t>;
  const int64_t r = blockIdx.x;
  acc_t s = 0;
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* row = t + (k * R + r) * ld;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const acc_t v = static_cast<acc_t>(row[j]);
      s += v * v;
    }
  }
  __shared__ acc_t smem[kThreads];
  smem[threadIdx.x] = s;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) smem[threadIdx.x] += smem[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const acc_t v = smem[0] / static_cast<acc_t>(K);
    const double vd = static_cast<double>(v);  // sqrt in double, rounded once: the correctly rounded root
    const scalar_t f = static_cast<scalar_t>(root ? ::sqrt(vd) : vd);
    out[r] = scaled ? static_cast<scalar_t>(static_cast<op_t>(f) * static_cast<op_t>(scale)) : f;
  }
}

// c[r] = (2/K) g[r] (or, with root, g[r] / (K e[r]), 0 where e[r] = 0), g = scale * grad (row stride gs).
template <typename scalar_t>
__global__ void seed_factor_kernel(const scalar_t* __restrict__ grad, int64_t gs, const scalar_t* __restrict__ e,
                                   scalar_t* __restrict__ c, int64_t R, bool scaled, at::opmath_type<scalar_t> scale,
                                   at::opmath_type<scalar_t> k, at::opmath_type<scalar_t> two_over_k) {
  using op_t = at::opmath_type<scalar_t>;
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < R; r += (int64_t)gridDim.x * blockDim.x) {
    const scalar_t g = scaled ? static_cast<scalar_t>(static_cast<op_t>(grad[r * gs]) * scale) : grad[r * gs];
    if (e == nullptr) {
      c[r] = static_cast<scalar_t>(static_cast<op_t>(g) * two_over_k);
    } else {
      const op_t er = static_cast<op_t>(e[r]);
      const scalar_t ek = static_cast<scalar_t>(er * k);
      c[r] = er != op_t(0) ? static_cast<scalar_t>(static_cast<op_t>(g) / static_cast<op_t>(ek)) : scalar_t(0);
    }
  }
}

}  // namespace

Tensor activate(const Tensor& z, const Tensor* bias, int64_t act, double alpha) {
  using namespace dual_linear;
  const bool kernel = kernel_ok(z) && z.size(0) * z.size(1) > 0 &&
                      (bias == nullptr || bias->scalar_type() == z.scalar_type());
  if (act == kIdentity || !kernel) return aten::activate(z, bias, act, alpha);
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t B = z.size(0), n = z.size(1);
  const Tensor b = bias != nullptr ? bias->contiguous() : Tensor();
  const Tensor D = at::empty({B, n}, z.options().dtype(act == kRelu ? at::kBool : z.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "row_passes_activate_cuda", [&] {
    using op_t = at::opmath_type<scalar_t>;
    activate_kernel<scalar_t><<<blocks_for(B * n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        z.data_ptr<scalar_t>(), z.stride(0), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
        act == kRelu ? D.data_ptr<bool>() : nullptr, act == kRelu ? nullptr : D.data_ptr<scalar_t>(), B, n,
        static_cast<op_t>(alpha), static_cast<scalar_t>(alpha));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return D;
}

void mul_slopes(const Tensor& primal, const Tensor& tangent, const Tensor& D, const OptTensor& index, int64_t K,
                int64_t R) {
  if (!D.defined() || (!primal.defined() && !tangent.defined())) return;
  const Tensor& rows = primal.defined() ? primal : tangent;
  const bool kernel = kernel_ok(primal) && kernel_ok(tangent) && D.dim() == 2 &&
                      (D.scalar_type() == at::kBool || D.scalar_type() == rows.scalar_type()) &&
                      (!primal.defined() || !tangent.defined() || primal.scalar_type() == tangent.scalar_type());
  if (!kernel) return aten::mul_slopes(primal, tangent, D, index, K, R);
  const int64_t Bp = primal.defined() ? primal.size(0) : 0;
  const int64_t Bt = tangent.defined() ? K * R : 0;
  const int64_t n = D.size(1);
  if ((Bp + Bt) * n == 0) return;
  const c10::cuda::CUDAGuard guard(rows.device());
  const Tensor Dc = D.contiguous();
  const Tensor idx = index.has_value() && Bt > 0 ? index->contiguous() : Tensor();
  const int64_t ldp = primal.defined() ? primal.stride(0) : 0, ldt = tangent.defined() ? tangent.stride(0) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "row_passes_mul_slopes_cuda", [&] {
    scalar_t* pp = primal.defined() ? primal.data_ptr<scalar_t>() : nullptr;
    scalar_t* tp = tangent.defined() ? tangent.data_ptr<scalar_t>() : nullptr;
    const int64_t* ip = idx.defined() ? idx.data_ptr<int64_t>() : nullptr;
    const int blocks = blocks_for((Bp + Bt) * n);
    auto stream = at::cuda::getCurrentCUDAStream();
    if (Dc.scalar_type() == at::kBool) {
      mul_slopes_kernel<scalar_t, bool><<<blocks, kThreads, 0, stream>>>(pp, ldp, Bp, tp, ldt, Bt, Dc.data_ptr<bool>(),
                                                                          Dc.size(0), ip, R, n);
    } else {
      mul_slopes_kernel<scalar_t, scalar_t><<<blocks, kThreads, 0, stream>>>(
          pp, ldp, Bp, tp, ldt, Bt, Dc.data_ptr<scalar_t>(), Dc.size(0), ip, R, n);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void scale_rows(const Tensor& out, const Tensor& src, const Tensor& c, int64_t K, int64_t R) {
  const bool kernel = out.defined() && src.defined() && kernel_ok(out) && kernel_ok(src) && c.dim() == 1 &&
                      c.scalar_type() == out.scalar_type() && src.scalar_type() == out.scalar_type();
  if (!kernel) return aten::scale_rows(out, src, c, K, R);
  const int64_t rows = K * R, n = out.size(1);
  if (rows * n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const Tensor cc = c.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "row_passes_scale_rows_cuda", [&] {
    scale_rows_kernel<scalar_t><<<blocks_for(rows * n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(), out.stride(0), src.data_ptr<scalar_t>(), src.stride(0), cc.data_ptr<scalar_t>(),
        rows, R, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor probe_sqnorm(const Tensor& t, int64_t K, int64_t R, bool root, double scale) {
  if (!t.defined() || !kernel_ok(t) || t.numel() == 0) return aten::probe_sqnorm(t, K, R, root, scale);
  const c10::cuda::CUDAGuard guard(t.device());
  Tensor sq = at::empty({R}, t.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "row_passes_probe_sqnorm_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    sum_sq_rows_kernel<scalar_t, acc_t><<<R, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        t.data_ptr<scalar_t>(), t.stride(0), t.size(1), K, R, root, scale != 1.0, static_cast<scalar_t>(scale),
        sq.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sq;
}

Tensor seed_factor(const Tensor& grad, const Tensor& t, int64_t K, int64_t R, bool root, double scale) {
  const bool kernel = t.defined() && kernel_ok(t) && t.numel() > 0 && grad.dim() == 1 && grad.size(0) == R &&
                      grad.scalar_type() == t.scalar_type() && grad.device() == t.device();
  if (!kernel) return aten::seed_factor(grad, t, K, R, root, scale);
  const c10::cuda::CUDAGuard guard(t.device());
  const Tensor e = root ? cuda::probe_sqnorm(t, K, R, /*root=*/true, /*scale=*/1.0) : Tensor();
  Tensor c = at::empty({R}, t.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "row_passes_seed_factor_cuda", [&] {
    using op_t = at::opmath_type<scalar_t>;
    // grad may be a stride-0 expand (a mean's or sum's backward): read through its stride.
    seed_factor_kernel<scalar_t><<<blocks_for(R), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), grad.stride(0), root ? e.data_ptr<scalar_t>() : nullptr, c.data_ptr<scalar_t>(),
        R, scale != 1.0, static_cast<op_t>(scale), static_cast<op_t>(K),
        static_cast<op_t>(2.0 / static_cast<double>(K)));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return c;
}

}  // namespace cuda
}  // namespace row_passes
}  // namespace grokalign
