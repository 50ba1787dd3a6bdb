// CUDA kernels of grokalign::attention_jvp and grokalign::attention_jvp_backward (schemas in
// csrc/grokalign.cpp; the math: grokalign_fast/ops/attention_jvp/reference.py; the CPU kernels in
// csrc/cpu/attention_jvp_cpu.cpp are the same algorithm with GEMMs on blocks).
//
// Written for correctness over speed. One warp per row: a thread block of kWarps warps takes kWarps
// consecutive rows of one (b, h) and walks over tiles of kTile = 32 rows of the other side, one per
// lane, staged in shared memory (converted to acc_t: float for half / bfloat16 / float, double for
// double). Scores are dot products of a lane's tile row with the warp's own row, the softmax
// statistics warp reductions, and the accumulations loops over the tile with each lane owning
// some output features. No atomics: every output row is written by one warp.
//   forward       one warp per query row: the online softmax over key tiles (row maximum m, normaliser
//                 l), shared by the P probes, accumulating o, o_t and mu unnormalised (reference.py's
//                 forward; the CPU file's comment has the recurrences);
//   backward (q)  one warp per query row, over key tiles: g_q, g_qt;
//   backward (k)  one warp per key row, over query tiles: g_k, g_v, g_kt, g_vt.
// Both backward kernels recompute p = exp(c q k^T - lse) and use the per-row scalars og, D of
// row_scalars (csrc/common/attention_jvp.h). Launched on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "common/attention_jvp.h"

namespace grokalign {
namespace attention_jvp {
namespace {

using at::Tensor;

constexpr int kWarps = 4;   // rows per thread block, one warp each
constexpr int kTile = 32;   // rows of the other side per tile, one per lane
constexpr int kThreads = kWarps * 32;
constexpr unsigned kFull = 0xffffffffu;

__device__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
__device__ T vmax(T a, T b) { return a < b ? b : a; }

template <typename T>
__device__ T warp_sum(T x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

template <typename T>
__device__ T warp_max(T x) {
  for (int o = 16; o > 0; o >>= 1) x = vmax(x, __shfl_xor_sync(kFull, x, o));
  return x;
}

template <typename T>
__device__ T dot(const T* a, const T* b, int n) {
  T s = 0;
  for (int x = 0; x < n; ++x) s += a[x] * b[x];
  return s;
}

// dst[r * ld + x] = src[(r0 + r) * w + x] for the rows r < n of a tile (zeros below), by the whole block.
template <typename scalar_t, typename acc_t>
__device__ void load_tile(acc_t* dst, int ld, const scalar_t* __restrict__ src, int64_t r0, int n, int w) {
  for (int idx = threadIdx.x; idx < kTile * w; idx += blockDim.x) {
    const int r = idx / w, x = idx - r * w;
    dst[r * ld + x] = r < n ? static_cast<acc_t>(src[(r0 + r) * w + x]) : acc_t(0);
  }
}

// dst[r] = src[r0 + r] for r < n (zeros below), by the whole block.
template <typename acc_t>
__device__ void load_stat(acc_t* dst, const acc_t* __restrict__ src, int64_t r0, int n) {
  for (int r = threadIdx.x; r < kTile; r += blockDim.x) dst[r] = r < n ? src[r0 + r] : acc_t(0);
}

// One row of width w into shared memory (acc_t), by one warp.
template <typename scalar_t, typename acc_t>
__device__ void load_row(acc_t* dst, const scalar_t* __restrict__ src, int w, int lane) {
  for (int x = lane; x < w; x += 32) dst[x] = static_cast<acc_t>(src[x]);
}

template <typename scalar_t, typename acc_t>
__device__ void store_row(scalar_t* __restrict__ dst, const acc_t* src, int w, int lane) {
  for (int x = lane; x < w; x += 32) dst[x] = static_cast<scalar_t>(src[x]);
}

// acc[x] = acc[x] * keep + alpha * sum_r w[r] tile[r * ld + x] over the tile's rows, for a warp's
// row of width n (each lane its own features x).
template <typename acc_t>
__device__ void accumulate(acc_t* acc, int n, acc_t keep, acc_t alpha, const acc_t* w, const acc_t* tile, int ld,
                           int lane) {
  for (int x = lane; x < n; x += 32) {
    acc_t s = 0;
    for (int r = 0; r < kTile; ++r) s += w[r] * tile[r * ld + x];
    acc[x] = acc[x] * keep + alpha * s;
  }
}

struct Shape {
  int64_t BH, T, S;
  int d, dv, P;
  bool causal;
};

template <typename scalar_t, typename acc_t>
struct FwdArgs {
  const scalar_t *q, *k, *v, *qt, *kt, *vt;
  scalar_t *o, *ot;
  acc_t *lse, *mu;
};

// Shared memory of the forward: K, K_t tiles [kTile][d + 1] (padded: lanes read different rows), V,
// V_t tiles [kTile][dv]; per warp q [d], q_t [P][d], the accumulators of o and o_t [(1 + P)][dv], the
// running mu [P] and the lane weights p, p s_t [kTile] each.
int64_t forward_smem_elems(const Shape& s) {
  const int64_t tiles = 2 * kTile * (s.d + 1) + 2 * kTile * s.dv;
  const int64_t per_warp = (1 + s.P) * int64_t(s.d) + (1 + s.P) * int64_t(s.dv) + s.P + 2 * kTile;
  return tiles + kWarps * per_warp;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const Shape sh, const acc_t c, const FwdArgs<scalar_t, acc_t> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int d = sh.d, dv = sh.dv, P = sh.P;
  const int64_t T = sh.T, S = sh.S, BH = sh.BH;
  const int64_t row_tiles = (T + kWarps - 1) / kWarps;
  const int64_t bh = blockIdx.x / row_tiles, i0 = (blockIdx.x % row_tiles) * kWarps;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = i0 + warp;
  const bool row_ok = i < T;
  const acc_t neg_inf = -static_cast<acc_t>(INFINITY);

  acc_t* Ks = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* Kts = Ks + kTile * (d + 1);
  acc_t* Vs = Kts + kTile * (d + 1);
  acc_t* Vts = Vs + kTile * dv;
  acc_t* q = Vts + kTile * dv + warp * ((1 + P) * d + (1 + P) * dv + P + 2 * kTile);
  acc_t* qt = q + d;             // [P][d]
  acc_t* acc = qt + P * d;       // [1 + P][dv]: o, then o_t per probe
  acc_t* mu = acc + (1 + P) * dv;  // [P]
  acc_t* pw = mu + P;            // [kTile]: p of the tile's keys
  acc_t* pstw = pw + kTile;      // [kTile]: p s_t

  if (row_ok) {
    load_row(q, a.q + (bh * T + i) * d, d, lane);
    for (int p = 0; p < P; ++p) load_row(qt + p * d, a.qt + ((p * BH + bh) * T + i) * d, d, lane);
  }
  for (int x = lane; x < (1 + P) * dv; x += 32) acc[x] = 0;
  for (int p = lane; p < P; p += 32) mu[p] = 0;
  __syncwarp();

  acc_t m = neg_inf, l = 0;
  // Causal: keys past the block's last row are masked for all its rows.
  const int64_t S_end = sh.causal ? imin(S, i0 + kWarps) : S;
  for (int64_t j0 = 0; j0 < S_end; j0 += kTile) {
    const int nk = static_cast<int>(imin(kTile, S_end - j0));
    __syncthreads();  // every warp is done with the previous tiles
    load_tile(Ks, d + 1, a.k + bh * S * d, j0, nk, d);
    load_tile(Vs, dv, a.v + bh * S * dv, j0, nk, dv);
    __syncthreads();
    const int64_t j = j0 + lane;
    const bool vis = row_ok && lane < nk && (!sh.causal || j <= i);
    const acc_t s = vis ? c * dot(q, Ks + lane * (d + 1), d) : neg_inf;
    // Online softmax: the new maximum, the rescale factor of the running sums, p = exp(s - m_new).
    // The first tile holds key 0, visible to every row, so m is finite from then on (rows past T
    // keep m = -inf and alpha = 1 and write nothing).
    const acc_t m_new = vmax(m, warp_max(s));
    const acc_t alpha = m_new == neg_inf ? acc_t(1) : exp(m - m_new);
    const acc_t p = vis ? exp(s - m_new) : acc_t(0);
    l = l * alpha + warp_sum(p);
    m = m_new;
    pw[lane] = p;
    __syncwarp();
    accumulate(acc, dv, alpha, acc_t(1), pw, Vs, dv, lane);  // o = o alpha + p v
    for (int pr = 0; pr < P; ++pr) {
      const int64_t krow = pr * BH * S + bh * S;
      __syncthreads();
      load_tile(Kts, d + 1, a.kt + krow * d, j0, nk, d);
      load_tile(Vts, dv, a.vt + krow * dv, j0, nk, dv);
      __syncthreads();
      // s_t = c (q_t . k + q . k_t); mu = mu alpha + sum p s_t; o_t = o_t alpha + (p s_t) v + p v_t.
      const acc_t st = vis ? c * (dot(qt + pr * d, Ks + lane * (d + 1), d) + dot(q, Kts + lane * (d + 1), d)) : 0;
      const acc_t pst = p * st;
      const acc_t mu_new = mu[pr] * alpha + warp_sum(pst);
      pstw[lane] = pst;
      __syncwarp();
      if (lane == 0) mu[pr] = mu_new;
      accumulate(acc + (1 + pr) * dv, dv, alpha, acc_t(1), pstw, Vs, dv, lane);
      accumulate(acc + (1 + pr) * dv, dv, acc_t(1), acc_t(1), pw, Vts, dv, lane);
      __syncwarp();
    }
  }
  if (!row_ok) return;
  // o = o / l, mu = mu / l, o_t = o_t / l - mu o, lse = m + log l.
  const acc_t inv = acc_t(1) / l;
  for (int e = lane; e < dv; e += 32) {
    const acc_t o = acc[e] * inv;
    a.o[(bh * T + i) * dv + e] = static_cast<scalar_t>(o);
    for (int pr = 0; pr < P; ++pr) {
      const acc_t mu_r = mu[pr] * inv;
      a.ot[((pr * BH + bh) * T + i) * dv + e] = static_cast<scalar_t>(acc[(1 + pr) * dv + e] * inv - mu_r * o);
    }
  }
  if (lane == 0) {
    a.lse[bh * T + i] = m + log(l);
    for (int pr = 0; pr < P; ++pr) a.mu[(pr * BH + bh) * T + i] = mu[pr] * inv;
  }
}

template <typename scalar_t, typename acc_t>
struct BwdArgs {
  const scalar_t *q, *k, *v, *qt, *kt, *vt, *go, *gt;
  const acc_t *lse, *mu, *og, *D;
  scalar_t *gq, *gk, *gv, *gqt, *gkt, *gvt;
};

// Shared memory of the query-side backward: K, K_t, V, V_t tiles [kTile][w + 1] (padded); per warp
// q [d], q_t [P][d], g_o [dv], g_t [P][dv], the accumulators g_q [d], g_qt [P][d], and the lane
// weights [kTile].
int64_t backward_q_smem_elems(const Shape& s) {
  const int64_t tiles = 2 * kTile * (s.d + 1) + 2 * kTile * (s.dv + 1);
  const int64_t per_warp = (2 + 2 * s.P) * int64_t(s.d) + (1 + s.P) * int64_t(s.dv) + kTile;
  return tiles + kWarps * per_warp;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_q_kernel(const Shape sh, const acc_t c, const BwdArgs<scalar_t, acc_t> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int d = sh.d, dv = sh.dv, P = sh.P;
  const int64_t T = sh.T, S = sh.S, BH = sh.BH;
  const int64_t row_tiles = (T + kWarps - 1) / kWarps;
  const int64_t bh = blockIdx.x / row_tiles, i0 = (blockIdx.x % row_tiles) * kWarps;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = i0 + warp;
  const bool row_ok = i < T;

  acc_t* Ks = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* Kts = Ks + kTile * (d + 1);
  acc_t* Vs = Kts + kTile * (d + 1);
  acc_t* Vts = Vs + kTile * (dv + 1);
  acc_t* q = Vts + kTile * (dv + 1) + warp * ((2 + 2 * P) * d + (1 + P) * dv + kTile);
  acc_t* qt = q + d;          // [P][d]
  acc_t* go = qt + P * d;     // [dv]
  acc_t* gt = go + dv;        // [P][dv]
  acc_t* gq = gt + P * dv;    // [d]
  acc_t* gqt = gq + d;        // [P][d]
  acc_t* w = gqt + P * d;     // [kTile]

  const int64_t row = bh * T + i;
  if (row_ok) {
    load_row(q, a.q + row * d, d, lane);
    load_row(go, a.go + row * dv, dv, lane);
    for (int p = 0; p < P; ++p) {
      load_row(qt + p * d, a.qt + (p * BH * T + row) * d, d, lane);
      load_row(gt + p * dv, a.gt + (p * BH * T + row) * dv, dv, lane);
    }
  }
  for (int x = lane; x < (1 + P) * d; x += 32) gq[x] = 0;
  __syncwarp();
  const acc_t lse = row_ok ? a.lse[row] : acc_t(0), D = row_ok ? a.D[row] : acc_t(0);

  const int64_t S_end = sh.causal ? imin(S, i0 + kWarps) : S;
  for (int64_t j0 = 0; j0 < S_end; j0 += kTile) {
    const int nk = static_cast<int>(imin(kTile, S_end - j0));
    __syncthreads();
    load_tile(Ks, d + 1, a.k + bh * S * d, j0, nk, d);
    load_tile(Vs, dv + 1, a.v + bh * S * dv, j0, nk, dv);
    __syncthreads();
    const bool vis = row_ok && lane < nk && (!sh.causal || j0 + lane <= i);
    // p = exp(c q . k - lse);  g_p = g_o . v + (probe terms)
    const acc_t p = vis ? exp(c * dot(q, Ks + lane * (d + 1), d) - lse) : acc_t(0);
    acc_t gp = vis ? dot(go, Vs + lane * (dv + 1), dv) : acc_t(0);
    for (int pr = 0; pr < P; ++pr) {
      const int64_t krow = pr * BH * S + bh * S;
      __syncthreads();
      load_tile(Kts, d + 1, a.kt + krow * d, j0, nk, d);
      load_tile(Vts, dv + 1, a.vt + krow * dv, j0, nk, dv);
      __syncthreads();
      acc_t gst = 0;
      if (vis) {
        const acc_t mu = a.mu[pr * BH * T + row], og = a.og[pr * BH * T + row];
        const acc_t st = c * (dot(qt + pr * d, Ks + lane * (d + 1), d) + dot(q, Kts + lane * (d + 1), d));
        const acc_t av = dot(gt + pr * dv, Vs + lane * (dv + 1), dv);  // a = v . g_t
        const acc_t y = dot(gt + pr * dv, Vts + lane * (dv + 1), dv);   // v_t . g_t
        gp += (st - mu) * av + y - st * og;
        gst = p * (av - og);
      }
      w[lane] = gst;
      __syncwarp();
      accumulate(gqt + pr * d, d, acc_t(1), c, w, Ks, d + 1, lane);  // g_qt += c g_st k
      accumulate(gq, d, acc_t(1), c, w, Kts, d + 1, lane);           // g_q += c g_st k_t
      __syncwarp();
    }
    w[lane] = p * (gp - D);  // g_s
    __syncwarp();
    accumulate(gq, d, acc_t(1), c, w, Ks, d + 1, lane);  // g_q += c g_s k
    __syncwarp();
  }
  if (!row_ok) return;
  store_row(a.gq + row * d, gq, d, lane);
  for (int p = 0; p < P; ++p) store_row(a.gqt + (p * BH * T + row) * d, gqt + p * d, d, lane);
}

// Shared memory of the key-side backward: Q, Q_t tiles [kTile][d + 1], G_o, G_t tiles [kTile][dv + 1],
// the tile rows' lse, D, mu, og [kTile] each; per warp k [d], k_t [P][d], v [dv], v_t [P][dv], the
// accumulators g_k [d], g_kt [P][d], g_v [dv], g_vt [P][dv], and three lane weights [kTile].
int64_t backward_k_smem_elems(const Shape& s) {
  const int64_t tiles = 2 * kTile * (s.d + 1) + 2 * kTile * (s.dv + 1) + 4 * kTile;
  const int64_t per_warp = 2 * (1 + s.P) * (int64_t(s.d) + s.dv) + 3 * kTile;
  return tiles + kWarps * per_warp;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_k_kernel(const Shape sh, const acc_t c, const BwdArgs<scalar_t, acc_t> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int d = sh.d, dv = sh.dv, P = sh.P;
  const int64_t T = sh.T, S = sh.S, BH = sh.BH;
  const int64_t row_tiles = (S + kWarps - 1) / kWarps;
  const int64_t bh = blockIdx.x / row_tiles, j0 = (blockIdx.x % row_tiles) * kWarps;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t j = j0 + warp;
  const bool row_ok = j < S;

  acc_t* Qs = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* Qts = Qs + kTile * (d + 1);
  acc_t* GOs = Qts + kTile * (d + 1);
  acc_t* GTs = GOs + kTile * (dv + 1);
  acc_t* lse_s = GTs + kTile * (dv + 1);
  acc_t* D_s = lse_s + kTile;
  acc_t* mu_s = D_s + kTile;
  acc_t* og_s = mu_s + kTile;
  acc_t* k = og_s + kTile + warp * (2 * (1 + P) * (d + dv) + 3 * kTile);
  acc_t* kt = k + d;          // [P][d]
  acc_t* v = kt + P * d;      // [dv]
  acc_t* vt = v + dv;         // [P][dv]
  acc_t* gk = vt + P * dv;    // [d]
  acc_t* gkt = gk + d;        // [P][d]
  acc_t* gv = gkt + P * d;    // [dv]
  acc_t* gvt = gv + dv;       // [P][dv]
  acc_t* wp = gvt + P * dv;   // [kTile]: p
  acc_t* wx = wp + kTile;     // [kTile]: g_st, then g_s
  acc_t* ww = wx + kTile;     // [kTile]: p (s_t - mu)

  const int64_t row = bh * S + j;
  if (row_ok) {
    load_row(k, a.k + row * d, d, lane);
    load_row(v, a.v + row * dv, dv, lane);
    for (int p = 0; p < P; ++p) {
      load_row(kt + p * d, a.kt + (p * BH * S + row) * d, d, lane);
      load_row(vt + p * dv, a.vt + (p * BH * S + row) * dv, dv, lane);
    }
  }
  for (int x = lane; x < (1 + P) * (d + dv); x += 32) gk[x] = 0;
  __syncwarp();

  // Causal: query rows before the block's first key see none of its keys.
  const int64_t first = sh.causal ? (j0 / kTile) * kTile : 0;
  for (int64_t i0 = first; i0 < T; i0 += kTile) {
    const int nq = static_cast<int>(imin(kTile, T - i0));
    __syncthreads();
    load_tile(Qs, d + 1, a.q + bh * T * d, i0, nq, d);
    load_tile(GOs, dv + 1, a.go + bh * T * dv, i0, nq, dv);
    load_stat(lse_s, a.lse + bh * T, i0, nq);
    load_stat(D_s, a.D + bh * T, i0, nq);
    __syncthreads();
    const bool vis = row_ok && lane < nq && (!sh.causal || j <= i0 + lane);
    const acc_t p = vis ? exp(c * dot(k, Qs + lane * (d + 1), d) - lse_s[lane]) : acc_t(0);
    acc_t gp = vis ? dot(v, GOs + lane * (dv + 1), dv) : acc_t(0);
    wp[lane] = p;
    for (int pr = 0; pr < P; ++pr) {
      const int64_t qrow = pr * BH * T + bh * T;
      __syncthreads();
      load_tile(Qts, d + 1, a.qt + qrow * d, i0, nq, d);
      load_tile(GTs, dv + 1, a.gt + qrow * dv, i0, nq, dv);
      load_stat(mu_s, a.mu + qrow, i0, nq);
      load_stat(og_s, a.og + qrow, i0, nq);
      __syncthreads();
      acc_t gst = 0, wv = 0;
      if (vis) {
        const acc_t mu = mu_s[lane], og = og_s[lane];
        const acc_t st = c * (dot(Qts + lane * (d + 1), k, d) + dot(Qs + lane * (d + 1), kt + pr * d, d));
        const acc_t av = dot(GTs + lane * (dv + 1), v, dv);        // a = v . g_t
        const acc_t y = dot(GTs + lane * (dv + 1), vt + pr * dv, dv);  // v_t . g_t
        gp += (st - mu) * av + y - st * og;
        gst = p * (av - og);
        wv = p * (st - mu);
      }
      wx[lane] = gst;
      ww[lane] = wv;
      __syncwarp();
      accumulate(gv, dv, acc_t(1), acc_t(1), ww, GTs, dv + 1, lane);         // g_v += (p (s_t - mu))^T g_t
      accumulate(gvt + pr * dv, dv, acc_t(1), acc_t(1), wp, GTs, dv + 1, lane);  // g_vt += p^T g_t
      accumulate(gk, d, acc_t(1), c, wx, Qts, d + 1, lane);                  // g_k += c g_st^T q_t
      accumulate(gkt + pr * d, d, acc_t(1), c, wx, Qs, d + 1, lane);         // g_kt += c g_st^T q
      __syncwarp();
    }
    wx[lane] = p * (gp - D_s[lane]);  // g_s
    __syncwarp();
    accumulate(gv, dv, acc_t(1), acc_t(1), wp, GOs, dv + 1, lane);  // g_v += p^T g_o
    accumulate(gk, d, acc_t(1), c, wx, Qs, d + 1, lane);            // g_k += c g_s^T q
    __syncwarp();
  }
  if (!row_ok) return;
  store_row(a.gk + row * d, gk, d, lane);
  store_row(a.gv + row * dv, gv, dv, lane);
  for (int p = 0; p < P; ++p) {
    store_row(a.gkt + (p * BH * S + row) * d, gkt + p * d, d, lane);
    store_row(a.gvt + (p * BH * S + row) * dv, gvt + p * dv, dv, lane);
  }
}

// Dynamic shared memory of `elems` acc_t for `kernel`: checked against the device's opt-in limit,
// which is opted into above the default 48 KiB.
template <typename Kernel>
size_t smem_bytes(Kernel kernel, int64_t elems, size_t elem_size, const char* op, const Shape& s) {
  const size_t bytes = static_cast<size_t>(elems) * elem_size;
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(bytes <= limit, "grokalign::", op, ": the CUDA kernel needs ", bytes,
              " bytes of shared memory for d = ", s.d, ", dv = ", s.dv, ", P = ", s.P, "; the device has ", limit,
              " (use fewer probes per call)");
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  return bytes;
}

Shape shape_of(const Dims& n, bool causal) {
  return Shape{n.BH(), n.T, n.S, static_cast<int>(n.d), static_cast<int>(n.dv), static_cast<int>(n.P), causal};
}

unsigned int grid_of(int64_t BH, int64_t rows) {
  const int64_t g = BH * ((rows + kWarps - 1) / kWarps);
  TORCH_CHECK(g < (int64_t{1} << 31), "grokalign::attention_jvp: too many rows for one CUDA launch (", g, " blocks)");
  return static_cast<unsigned int>(g);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_jvp_cuda(const Tensor& q_in, const Tensor& k_in,
                                                              const Tensor& v_in, const Tensor& qt_in,
                                                              const Tensor& kt_in, const Tensor& vt_in, bool causal,
                                                              double scale) {
  const Dims n = check_inputs("attention_jvp", q_in, k_in, v_in, qt_in, kt_in, vt_in, scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const Tensor qt = qt_in.contiguous(), kt = kt_in.contiguous(), vt = vt_in.contiguous();
  const auto acc = q.options().dtype(acc_dtype(q.scalar_type()));
  Tensor o = at::empty({n.B, n.H, n.T, n.dv}, q.options());
  Tensor ot = at::empty({n.P, n.B, n.H, n.T, n.dv}, q.options());
  Tensor lse = at::empty({n.B, n.H, n.T}, acc);
  Tensor mu = at::empty({n.P, n.B, n.H, n.T}, acc);
  if (n.BH() * n.T == 0) return {o, ot, lse, mu};
  const Shape sh = shape_of(n, causal);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_jvp_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const FwdArgs<scalar_t, acc_t> a{q.const_data_ptr<scalar_t>(),  k.const_data_ptr<scalar_t>(),
                                     v.const_data_ptr<scalar_t>(),  qt.const_data_ptr<scalar_t>(),
                                     kt.const_data_ptr<scalar_t>(), vt.const_data_ptr<scalar_t>(),
                                     o.data_ptr<scalar_t>(),        ot.data_ptr<scalar_t>(),
                                     lse.data_ptr<acc_t>(),         mu.data_ptr<acc_t>()};
    auto kernel = forward_kernel<scalar_t, acc_t>;
    const size_t bytes = smem_bytes(kernel, forward_smem_elems(sh), sizeof(acc_t), "attention_jvp", sh);
    kernel<<<grid_of(n.BH(), n.T), kThreads, bytes, at::cuda::getCurrentCUDAStream()>>>(
        sh, static_cast<acc_t>(scale), a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {o, ot, lse, mu};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> attention_jvp_backward_cuda(
    const std::optional<Tensor>& grad_o, const std::optional<Tensor>& grad_o_t, const Tensor& q_in,
    const Tensor& k_in, const Tensor& v_in, const Tensor& qt_in, const Tensor& kt_in, const Tensor& vt_in,
    const Tensor& o, const Tensor& ot, const Tensor& lse_in, const Tensor& mu_in, bool causal, double scale) {
  const Dims n = check_inputs("attention_jvp_backward", q_in, k_in, v_in, qt_in, kt_in, vt_in, scale);
  check_saved(n, q_in, grad_o, grad_o_t, o, ot, lse_in, mu_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const Tensor qt = qt_in.contiguous(), kt = kt_in.contiguous(), vt = vt_in.contiguous();
  const Tensor lse = lse_in.contiguous(), mu = mu_in.contiguous();
  const Tensor go = grad_or_zeros(grad_o, o), gt = grad_or_zeros(grad_o_t, ot);
  Tensor og, D;
  std::tie(og, D) = row_scalars(o, ot, go, gt, mu);
  Tensor gq = at::empty_like(q), gk = at::empty_like(k), gv = at::empty_like(v);
  Tensor gqt = at::empty_like(qt), gkt = at::empty_like(kt), gvt = at::empty_like(vt);
  const Shape sh = shape_of(n, causal);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_jvp_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BwdArgs<scalar_t, acc_t> a{q.const_data_ptr<scalar_t>(),  k.const_data_ptr<scalar_t>(),
                                     v.const_data_ptr<scalar_t>(),  qt.const_data_ptr<scalar_t>(),
                                     kt.const_data_ptr<scalar_t>(), vt.const_data_ptr<scalar_t>(),
                                     go.const_data_ptr<scalar_t>(), gt.const_data_ptr<scalar_t>(),
                                     lse.const_data_ptr<acc_t>(),   mu.const_data_ptr<acc_t>(),
                                     og.const_data_ptr<acc_t>(),    D.const_data_ptr<acc_t>(),
                                     gq.data_ptr<scalar_t>(),       gk.data_ptr<scalar_t>(),
                                     gv.data_ptr<scalar_t>(),       gqt.data_ptr<scalar_t>(),
                                     gkt.data_ptr<scalar_t>(),      gvt.data_ptr<scalar_t>()};
    const auto stream = at::cuda::getCurrentCUDAStream();
    const acc_t c = static_cast<acc_t>(scale);
    if (n.BH() * n.T > 0) {
      auto kernel = backward_q_kernel<scalar_t, acc_t>;
      const size_t bytes = smem_bytes(kernel, backward_q_smem_elems(sh), sizeof(acc_t), "attention_jvp_backward", sh);
      kernel<<<grid_of(n.BH(), n.T), kThreads, bytes, stream>>>(sh, c, a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (n.BH() * n.S > 0) {
      auto kernel = backward_k_kernel<scalar_t, acc_t>;
      const size_t bytes = smem_bytes(kernel, backward_k_smem_elems(sh), sizeof(acc_t), "attention_jvp_backward", sh);
      kernel<<<grid_of(n.BH(), n.S), kThreads, bytes, stream>>>(sh, c, a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gq, gk, gv, gqt, gkt, gvt};
}

}  // namespace

TORCH_LIBRARY_IMPL(grokalign, CUDA, m) {
  m.impl("attention_jvp", &attention_jvp_cuda);
  m.impl("attention_jvp_backward", &attention_jvp_backward_cuda);
}

}  // namespace attention_jvp
}  // namespace grokalign
