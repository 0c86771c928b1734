// pairwise_distance on CUDA (forward and backward).
//
// Forward: D (B, N, M) = ||x_i - y_j|| / sqrt(C) in x's dtype. One block per 64 x 64 tile of D
// (flattened grid: sample, row tile, column tile); the tile's Gram values come from the engine of
// tpc_cuda_common.cuh (inputs shifted by x's token 0, half inputs too), pairs whose Gram form
// cancels badly (d2 < (|a_i|^2 + |a_j|^2) / 32, as on the CPU) are recomputed exactly as
// sum_c (x_ic - y_jc)^2 by a whole warp (channels across the lanes).
// Without y only tiles I <= J run and each writes its pairs at (i, j) and (j, i): every unordered
// pair is computed once, so D is bit-symmetric with an exactly zero diagonal by construction.
//
// Backward: with W_ij = grad_ij / (C D_ij) (0 where D_ij == 0: the gradient of |v| at 0 is 0),
//   grad_x_i = sum_j W_ij (x_i - y_j),   grad_y_j = sum_i W_ij (y_j - x_i),
// and without y grad_x_i = sum_j (W_ij + W_ji) (x_i - x_j). Computed in that direct-difference
// form (translation invariant, no cancellation), float32 accumulation in a fixed order: one block per
// (sample, 32 rows, 64 channels), streaming the other tokens in chunks of 32.
#ifndef TPC_EMULATE
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <limits>

#include "../hot_kernels.h"
#include "tpc_cuda_common.cuh"

namespace hot_kernels {
namespace tpc_cuda {
namespace {

constexpr int kPT = 64;  // forward tile (rows and columns)
static_assert(kPT % 32 == 0, "a warp's pairs of a tile row share the row");

template <typename T>
struct PdArgs {
  Points<T> x, y;  // y == x when self
  int B = 0, N = 0, M = 0, tn = 0, tm = 0;
  bool self = false;
  T* out = nullptr;  // (B, N, M) contiguous
};

template <typename T, int ENG>
__global__ void __launch_bounds__(kThreads, 2) pd_forward_kernel(const PdArgs<T> a) {
  using G = Gram<T, ENG, kPT, kPT>;
  TPC_SHARED(typename G::Smem, sm, );
  TPC_SHARED(int, s_rows, [kPT]);
  TPC_SHARED(int, s_cols, [kPT]);

  const int64_t blk = blockIdx.x;
  const int J = static_cast<int>(blk % a.tm);
  const int I = static_cast<int>((blk / a.tm) % a.tn);
  const int b = static_cast<int>(blk / (static_cast<int64_t>(a.tm) * a.tn));
  if (a.self && I > J) return;  // the whole block: tile (J, I) writes these pairs
  const int N = a.N, M = a.M, tid = threadIdx.x;
  const int r0 = I * kPT, c0 = J * kPT;
  const bool diag = a.self && I == J;

  if (tid < kPT) {
    s_rows[tid] = r0 + tid < N ? r0 + tid : -1;
  } else if (tid < 2 * kPT) {
    const int t = tid - kPT;
    s_cols[t] = c0 + t < M ? c0 + t : -1;
  }
  __syncthreads();
  gram_run<T, ENG, kPT, kPT>(a.x, a.y, b, s_rows, s_cols, true, sm);
  const float scale = static_cast<float>(sqrt(static_cast<double>(a.x.C)));

  // G -> D in place (float). In a diagonal tile only the strict upper triangle is computed; the
  // lower one is read mirrored below, the diagonal is 0. Pairs whose Gram form cancels are
  // recomputed exactly by their whole warp, one pair at a time (lane l sums channels l, l + 32, ...,
  // then a butterfly): 16 uniform rounds of one pair per thread, so every lane reaches the ballot.
  for (int e0 = 0; e0 < kPT * kPT; e0 += kThreads) {
    const int e = e0 + tid, r = e / kPT, c = e % kPT, i = r0 + r, j = c0 + c, lane = tid & 31;
    float* g = &sm.G[r * G::LDG + c];
    bool live = i < N && j < M;
    if (live && diag && c <= r) {
      if (c == r) *g = 0.f;
      live = false;
    }
    float ev = 0.f;
    bool cancel = false;
    if (live) {
      const float sqi = sm.sq[r], sqj = sm.sq[kPT + c];
      ev = gram_e(sqi, sqj, *g);
      cancel = ev * 32.f < sqi + sqj;
    }
    for (unsigned todo = __ballot_sync(kFull, cancel); todo != 0; todo &= todo - 1) {
      // A warp's 32 pairs lie in one row (kPT % 32 == 0): the source lane's pair is (i, j - lane + src).
      const int src = __ffs(static_cast<int>(todo)) - 1, js = j - lane + src;
      float acc = 0.f;
      for (int ch = lane; ch < a.x.C; ch += 32) {
        const float d = a.x.at1(b, i, ch) - a.y.at1(b, js, ch);  // 3-D input: J == 1
        acc = fmaf(d, d, acc);
      }
      acc = warp_sum(acc);
      if (lane == src) ev = acc > 0.f ? acc : 0.f;
    }
    if (live) *g = finish(ev, scale);
  }
  __syncthreads();
  T* out = a.out + static_cast<int64_t>(b) * N * M;
  for (int e = tid; e < kPT * kPT; e += kThreads) {
    const int r = e / kPT, c = e % kPT, i = r0 + r, j = c0 + c;
    if (i >= N || j >= M) continue;
    const float v = (diag && c < r) ? sm.G[c * G::LDG + r] : sm.G[r * G::LDG + c];
    out[static_cast<int64_t>(i) * M + j] = from_f<T>(v);
  }
  if (a.self && I < J) {  // the mirrored tile, written along its rows (consecutive i)
    for (int e = tid; e < kPT * kPT; e += kThreads) {
      const int c = e / kPT, r = e % kPT, i = r0 + r, j = c0 + c;
      if (i >= N || j >= N) continue;
      out[static_cast<int64_t>(j) * N + i] = from_f<T>(sm.G[r * G::LDG + c]);
    }
  }
}

// ---- backward ----------------------------------------------------------------------------------------

constexpr int kBR = 32;  // output rows per block
constexpr int kBC = 64;  // output channels per block
constexpr int kBS = 32;  // other tokens per streamed chunk
static_assert(kBR == kBS, "the transposed W staging swaps the row and token indices of a square tile");
static_assert(kBC * 4 == kThreads, "thread -> (channel, row group of 8)");

enum WMode : int { kWDirect = 0, kWTransposed = 1, kWSym = 2 };

template <typename T>
struct PdBwdArgs {
  const T* P = nullptr;  // (B, R, C) contiguous: the tokens whose gradient is computed
  const T* Q = nullptr;  // (B, S, C) contiguous: the other tokens
  const T* grad = nullptr;  // (B, NW, MW) contiguous
  const T* dist = nullptr;  // (B, NW, MW) contiguous
  int B = 0, R = 0, S = 0, C = 0, NW = 0, MW = 0, row_tiles = 0, ch_tiles = 0;
  int mode = kWDirect;  // w(r, s) = W[r][s] | W[s][r] | W[r][s] + W[s][r]
  T* out = nullptr;     // (B, R, C)
};

template <typename T>
__device__ __forceinline__ float w_at(const PdBwdArgs<T>& a, int b, int i, int j, float cf) {
  // W[b, i, j] (i < NW, j < MW checked by the caller).
  const int64_t o = (static_cast<int64_t>(b) * a.NW + i) * a.MW + j;
  const float d = to_f(a.dist[o]);
  return d != 0.f ? to_f(a.grad[o]) / (d * cf) : 0.f;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) pd_backward_kernel(const PdBwdArgs<T> a) {
  TPC_SHARED(float, s_w, [kBR][kBS + 1]);   // w(r, s) (direct part)
  TPC_SHARED(float, s_wt, [kBR][kBS + 1]);  // w(r, s) transposed part (sym only)
  TPC_SHARED(float, s_q, [kBS][kBC]);

  const int64_t blk = blockIdx.x;
  const int ct = static_cast<int>(blk % a.ch_tiles);
  const int rt = static_cast<int>((blk / a.ch_tiles) % a.row_tiles);
  const int b = static_cast<int>(blk / (static_cast<int64_t>(a.ch_tiles) * a.row_tiles));
  const int tid = threadIdx.x, c = tid & (kBC - 1), rg = tid >> 6;  // rows rg * 8 + u
  const int r0 = rt * kBR, ch0 = ct * kBC, C = a.C;
  const float cf = static_cast<float>(C);
  const bool cin = ch0 + c < C;

  float p[8], acc[8];
#pragma unroll
  for (int u = 0; u < 8; ++u) {
    const int rr = r0 + rg * 8 + u;
    p[u] = (cin && rr < a.R) ? to_f(a.P[(static_cast<int64_t>(b) * a.R + rr) * C + ch0 + c]) : 0.f;
    acc[u] = 0.f;
  }
  for (int s0 = 0; s0 < a.S; s0 += kBS) {
    __syncthreads();  // the previous chunk's reads are done
#pragma unroll
    for (int q = 0; q < kBR * kBS / kThreads; ++q) {
      const int e = tid + kThreads * q, hi = e / kBS, lo = e % kBS;
      if (a.mode == kWDirect) {
        const int rr = r0 + hi, ss = s0 + lo;
        s_w[hi][lo] = (rr < a.R && ss < a.S) ? w_at(a, b, rr, ss, cf) : 0.f;
      } else if (a.mode == kWTransposed) {
        const int ss = s0 + hi, rr = r0 + lo;  // W[b, s, r]: consecutive threads along r
        s_w[lo][hi] = (rr < a.R && ss < a.S) ? w_at(a, b, ss, rr, cf) : 0.f;
      } else {
        const int rr = r0 + hi, ss = s0 + lo;
        s_w[hi][lo] = (rr < a.R && ss < a.S) ? w_at(a, b, rr, ss, cf) : 0.f;
        const int ss2 = s0 + hi, rr2 = r0 + lo;
        s_wt[lo][hi] = (rr2 < a.R && ss2 < a.S) ? w_at(a, b, ss2, rr2, cf) : 0.f;
      }
    }
#pragma unroll
    for (int q = 0; q < kBS * kBC / kThreads; ++q) {
      const int e = tid + kThreads * q, ss = e / kBC, cc = e % kBC;
      s_q[ss][cc] = (s0 + ss < a.S && ch0 + cc < C)
                        ? to_f(a.Q[(static_cast<int64_t>(b) * a.S + s0 + ss) * C + ch0 + cc])
                        : 0.f;
    }
    __syncthreads();
    const int ns = a.S - s0 < kBS ? a.S - s0 : kBS;  // only real tokens (0 * inf would be NaN)
    for (int s = 0; s < ns; ++s) {
      const float qv = s_q[s][c];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const float w = a.mode == kWSym ? s_w[rg * 8 + u][s] + s_wt[rg * 8 + u][s] : s_w[rg * 8 + u][s];
        acc[u] = fmaf(w, p[u] - qv, acc[u]);
      }
    }
  }
  if (!cin) return;
#pragma unroll
  for (int u = 0; u < 8; ++u) {
    const int rr = r0 + rg * 8 + u;
    if (rr < a.R) a.out[(static_cast<int64_t>(b) * a.R + rr) * C + ch0 + c] = from_f<T>(acc[u]);
  }
}

void check_xy(const at::Tensor& x, const std::optional<at::Tensor>& y, const char* op) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be (B, N, C), got ", x.sizes());
  TORCH_CHECK(on_device(x), op, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.size(2) >= 1 || x.size(0) * x.size(1) == 0, op, ": x must have at least one channel, got ", x.sizes());
  TORCH_CHECK(x.size(1) <= std::numeric_limits<int>::max() / 2 && x.size(2) <= std::numeric_limits<int>::max() / 2,
              op, ": x too large: ", x.sizes());
  if (y.has_value() && y->defined()) {
    TORCH_CHECK(y->dim() == 3 && y->size(0) == x.size(0) && y->size(2) == x.size(2), op,
                ": y must be (B, M, C) = (", x.size(0), ", M, ", x.size(2), ") like x, got ", y->sizes());
    TORCH_CHECK(y->device() == x.device(), op, ": y must be on ", x.device(), " like x, got ", y->device());
    TORCH_CHECK(y->size(1) <= std::numeric_limits<int>::max() / 2, op, ": y too large: ", y->sizes());
  }
}

}  // namespace
}  // namespace tpc_cuda

using namespace tpc_cuda;

at::Tensor pairwise_distance_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& y_in) {
  const char* op = "pairwise_distance";
  check_xy(x_in, y_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool has_y = y_in.has_value() && y_in->defined();
  const at::Tensor x = points_input(x_in);
  const at::Tensor y = has_y ? points_input(y_in->to(x.scalar_type())) : x;
  const int64_t B = x.size(0), N = x.size(1), M = y.size(1);
  at::Tensor out = at::empty({B, N, M}, x.options());
  if (B == 0 || N == 0 || M == 0) return out;
  const int64_t tn = (N + kPT - 1) / kPT, tm = (M + kPT - 1) / kPT;
  const int64_t blocks = B * tn * tm;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), op, ": too large for one launch: ", B, " x ", tn, " x ", tm,
              " tiles");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_type(x.scalar_type(), op, "x", [&](auto tag) {
    using T = decltype(tag);
    PdArgs<T> a;
    a.x = make_points<T>(x);
    a.y = make_points<T>(y);
    a.B = static_cast<int>(B);
    a.N = static_cast<int>(N);
    a.M = static_cast<int>(M);
    a.tn = static_cast<int>(tn);
    a.tm = static_cast<int>(tm);
    a.self = !has_y;
    a.out = reinterpret_cast<T*>(out.data_ptr());
    with_engine<T>(choose_engine(x.scalar_type(), 1), [&](auto eng) {
      constexpr int E = decltype(eng)::value;
      launch(pd_forward_kernel<T, E>, static_cast<unsigned>(blocks), stream, a);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                   const std::optional<at::Tensor>& y_in,
                                                                   const at::Tensor& dist_in) {
  const char* op = "pairwise_distance_backward";
  check_xy(x_in, y_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool has_y = y_in.has_value() && y_in->defined();
  const int64_t B = x_in.size(0), N = x_in.size(1), C = x_in.size(2);
  const int64_t M = has_y ? y_in->size(1) : N;
  TORCH_CHECK(grad_in.dim() == 3 && grad_in.size(0) == B && grad_in.size(1) == N && grad_in.size(2) == M, op,
              ": grad must be (B, N, M) = (", B, ", ", N, ", ", M, "), got ", grad_in.sizes());
  TORCH_CHECK(dist_in.sizes() == grad_in.sizes(), op, ": dist must be (B, N, M) = (", B, ", ", N, ", ", M, "), got ",
              dist_in.sizes());
  TORCH_CHECK(grad_in.device() == x_in.device() && dist_in.device() == x_in.device(), op,
              ": grad and dist must be on ", x_in.device(), " like x");
  const auto st = x_in.scalar_type();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = has_y ? y_in->to(st).contiguous() : x;
  const at::Tensor grad = grad_in.to(st).contiguous();
  const at::Tensor dist = dist_in.to(st).contiguous();
  at::Tensor gx = at::empty({B, N, C}, x.options());
  at::Tensor gy = has_y ? at::empty({B, M, C}, x.options()) : at::empty({0}, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_type(st, op, "x", [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](const at::Tensor& P, const at::Tensor& Q, int mode, at::Tensor& out) {
      const int64_t R = P.size(1), S = Q.size(1);
      if (B == 0 || R == 0 || C == 0) return;
      if (S == 0) {  // no other token: the gradient is zero (not reached: the validator needs N, M >= 1)
        out.zero_();
        return;
      }
      PdBwdArgs<T> a;
      a.P = reinterpret_cast<const T*>(P.data_ptr());
      a.Q = reinterpret_cast<const T*>(Q.data_ptr());
      a.grad = reinterpret_cast<const T*>(grad.data_ptr());
      a.dist = reinterpret_cast<const T*>(dist.data_ptr());
      a.B = static_cast<int>(B);
      a.R = static_cast<int>(R);
      a.S = static_cast<int>(S);
      a.C = static_cast<int>(C);
      a.NW = static_cast<int>(N);
      a.MW = static_cast<int>(M);
      a.row_tiles = static_cast<int>((R + kBR - 1) / kBR);
      a.ch_tiles = static_cast<int>((C + kBC - 1) / kBC);
      a.mode = mode;
      a.out = reinterpret_cast<T*>(out.data_ptr());
      const int64_t blocks = B * a.row_tiles * static_cast<int64_t>(a.ch_tiles);
      TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), op, ": too large for one launch");
      launch(pd_backward_kernel<T>, static_cast<unsigned>(blocks), stream, a);
    };
    if (has_y) {
      run(x, y, kWDirect, gx);
      run(y, x, kWTransposed, gy);
    } else {
      run(x, x, kWSym, gx);
    }
  });
  return std::make_tuple(gx, gy);
}

}  // namespace hot_kernels
