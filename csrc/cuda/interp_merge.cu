// token_recovering_interpolation and merge_tokens on CUDA, forward and backward.
//
// Interpolation forward: one block per output frame (b, t); every thread finds t's segment by a
// binary search of the (ascending) index row (a few cached loads) and writes its elements of
// (1 - w) x[lo] + w x[hi] over the J * C values of the frame (float32 arithmetic, w from a rounded
// division: the CPU's w). Backward: one block per kept frame (b, p); each thread sums, t ascending,
// the weighted gradients of the frames between p's neighbours for its elements: a gather, so no
// atomics and a fixed order.
// merge_tokens forward: one block per cluster (b, p); each thread owns channels and scans the
// sample's tokens in order, adding w_i x_i for the members (O(N) per cluster, the same order as the
// CPU's sum). Backward: grad_x one block per token (coalesced over channels); grad_weight one thread
// per token (a dot product over C in channel order). Nothing here synchronises with the host.
// Index-like inputs are trusted (validated on the host where free); out-of-range values read and
// write nothing out of bounds.
#ifndef TPC_EMULATE
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <limits>
#include <vector>

#include "../hot_kernels.h"
#include "tpc_cuda_common.cuh"

namespace hot_kernels {
namespace tpc_cuda {
namespace {

// a / b rounded to nearest (the CPU's division; CUDA's plain '/' may be approximate under fast-math).
#ifdef TPC_EMULATE
inline float div_rn(float a, float b) { return a / b; }
#else
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
#endif

// q = number of kept frames at or before t in an ascending row; lo/hi/w as in the CPU's interp_segment.
__device__ __forceinline__ void interp_segment(const int64_t* row, int64_t f, int64_t t, int64_t& lo, int64_t& hi,
                                               float& w) {
  int64_t a = 0, b = f;
  while (a < b) {
    const int64_t m = (a + b) / 2;
    if (row[m] <= t) a = m + 1; else b = m;
  }
  if (a == 0 || a == f) {
    lo = hi = (a == 0 ? 0 : f - 1);
    w = 0.f;
    return;
  }
  lo = a - 1;
  hi = a;
  const int64_t span = row[hi] - row[lo];
  w = span > 0 ? div_rn(static_cast<float>(t - row[lo]), static_cast<float>(span)) : 0.f;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) interp_fwd_kernel(const T* __restrict__ x, const int64_t* __restrict__ index,
                                                              int64_t f, int64_t F, int64_t R, T* __restrict__ out) {
  const int64_t r = blockIdx.x;  // b * F + t
  const int64_t b = r / F, t = r % F;
  int64_t lo, hi;
  float w;
  interp_segment(index + b * f, f, t, lo, hi, w);
  const float w0 = 1.f - w;
  const T* a = x + (b * f + lo) * R;
  const T* c = x + (b * f + hi) * R;
  T* o = out + r * R;
  for (int64_t e = threadIdx.x; e < R; e += kThreads) o[e] = from_f<T>(w0 * to_f(a[e]) + w * to_f(c[e]));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) interp_bwd_kernel(const T* __restrict__ grad, const int64_t* __restrict__ index,
                                                              int64_t f, int64_t F, int64_t R, T* __restrict__ gx) {
  const int64_t r = blockIdx.x;  // b * f + p
  const int64_t b = r / f, p = r % f;
  const int64_t* row = index + b * f;
  // (ternaries, not max/min: the int64 overloads differ between nvcc and the CPU emulation)
  const int64_t t0 = p == 0 ? 0 : (row[p - 1] + 1 > 0 ? row[p - 1] + 1 : 0);
  const int64_t t1 = p == f - 1 ? F - 1 : (row[p + 1] - 1 < F - 1 ? row[p + 1] - 1 : F - 1);
  T* o = gx + r * R;
  for (int64_t e = threadIdx.x; e < R; e += kThreads) {
    float acc = 0.f;
    for (int64_t t = t0; t <= t1; ++t) {
      int64_t lo, hi;
      float w;
      interp_segment(row, f, t, lo, hi, w);
      const float wp = (lo == p ? 1.f - w : 0.f) + (hi == p && hi != lo ? w : 0.f);
      if (wp != 0.f) acc += wp * to_f(grad[(b * F + t) * R + e]);
    }
    o[e] = from_f<T>(acc);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) merge_fwd_kernel(const T* __restrict__ x, const int64_t* __restrict__ assign,
                                                             const T* __restrict__ weight, int64_t N, int64_t f,
                                                             int64_t C, T* __restrict__ out, float* __restrict__ wsum) {
  const int64_t r = blockIdx.x;  // b * f + p
  const int64_t b = r / f, p = r % f;
  const int64_t* a = assign + b * N;
  // Every thread computes W in the same order (same bits); thread 0 stores it.
  float W = 0.f;
  for (int64_t i = 0; i < N; ++i)
    if (a[i] == p) W += weight != nullptr ? to_f(weight[b * N + i]) : 1.f;
  const float inv = W != 0.f ? div_rn(1.f, W) : 0.f;
  if (threadIdx.x == 0) wsum[r] = W;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    float acc = 0.f;
    for (int64_t i = 0; i < N; ++i) {
      if (a[i] != p) continue;
      const float wi = weight != nullptr ? to_f(weight[b * N + i]) : 1.f;
      acc += wi * to_f(x[(b * N + i) * C + c]);
    }
    out[r * C + c] = from_f<T>(acc * inv);
  }
}

// 1 / W_p for token i's cluster p, or 0 when i is in no cluster or W_p == 0.
__device__ __forceinline__ float merge_inv(const int64_t* assign, const float* wsum, int64_t r, int64_t N, int64_t f,
                                           int64_t& p) {
  const int64_t b = r / N;
  p = assign[r];
  if (p < 0 || p >= f) {
    p = 0;
    return 0.f;
  }
  const float W = wsum[b * f + p];
  p += b * f;  // the flat (b, p) row
  return W != 0.f ? div_rn(1.f, W) : 0.f;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) merge_grad_x_kernel(const T* __restrict__ grad, const int64_t* __restrict__ assign,
                                                                const T* __restrict__ weight, const float* __restrict__ wsum,
                                                                int64_t N, int64_t f, int64_t C, T* __restrict__ gx) {
  const int64_t r = blockIdx.x;  // b * N + i
  int64_t bp;
  const float inv = merge_inv(assign, wsum, r, N, f, bp);
  const float s = (weight != nullptr ? to_f(weight[r]) : 1.f) * inv;
  for (int64_t c = threadIdx.x; c < C; c += kThreads)
    gx[r * C + c] = from_f<T>(inv != 0.f ? s * to_f(grad[bp * C + c]) : 0.f);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) merge_grad_w_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                                                const int64_t* __restrict__ assign,
                                                                const T* __restrict__ out, const float* __restrict__ wsum,
                                                                int64_t BN, int64_t N, int64_t f, int64_t C,
                                                                T* __restrict__ gw) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;  // b * N + i
  if (r >= BN) return;
  int64_t bp;
  const float inv = merge_inv(assign, wsum, r, N, f, bp);
  float dot = 0.f;
  if (inv != 0.f)
    for (int64_t c = 0; c < C; ++c) dot += to_f(grad[bp * C + c]) * (to_f(x[r * C + c]) - to_f(out[bp * C + c]));
  gw[r] = from_f<T>(dot * inv);
}

void check_long(const at::Tensor& t, const char* op, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 2, op, ": ", name, " must be a 2-D int64 tensor, got ",
              t.sizes(), " ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
}

unsigned blocks_for(int64_t n, const char* op) {
  TORCH_CHECK(n <= std::numeric_limits<int>::max(), op, ": ", n, " blocks are too many for one launch");
  return static_cast<unsigned>(n);
}

}  // namespace
}  // namespace tpc_cuda

using namespace tpc_cuda;

at::Tensor token_recovering_interpolation_cuda(const at::Tensor& x_in, const at::Tensor& index_in, int64_t num_frames) {
  const char* op = "token_recovering_interpolation";
  TORCH_CHECK(x_in.dim() == 3 || x_in.dim() == 4, op, ": x_kept must be (B, f, C) or (B, f, J, C), got ", x_in.sizes());
  TORCH_CHECK(on_device(x_in), op, ": x_kept must be a CUDA tensor, got ", x_in.device());
  const int64_t B = x_in.size(0), f = x_in.size(1);
  check_long(index_in, op, "index", x_in);
  TORCH_CHECK(index_in.size(0) == B && index_in.size(1) == f, op, ": index must be (B, f) = (", B, ", ", f, "), got ",
              index_in.sizes());
  TORCH_CHECK(num_frames >= 0, op, ": F must be >= 0, got ", num_frames);
  const c10::cuda::CUDAGuard guard(x_in.device());
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape[1] = num_frames;
  at::Tensor out = at::empty(shape, x_in.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK(f > 0, op, ": x_kept must have at least one kept frame");
  const int64_t R = x_in.numel() / (B * f);
  const at::Tensor x = x_in.contiguous(), index = index_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_type(x.scalar_type(), op, "x_kept", [&](auto tag) {
    using T = decltype(tag);
    launch(interp_fwd_kernel<T>, blocks_for(B * num_frames, op), stream, reinterpret_cast<const T*>(x.data_ptr()),
           index.data_ptr<int64_t>(), f, num_frames, R, reinterpret_cast<T*>(out.data_ptr()));
  });
  return out;
}

at::Tensor token_recovering_interpolation_backward_cuda(const at::Tensor& grad_in, const at::Tensor& index_in, int64_t f) {
  const char* op = "token_recovering_interpolation_backward";
  TORCH_CHECK(grad_in.dim() == 3 || grad_in.dim() == 4, op, ": grad must be (B, F, C) or (B, F, J, C), got ",
              grad_in.sizes());
  TORCH_CHECK(on_device(grad_in), op, ": grad must be a CUDA tensor, got ", grad_in.device());
  const int64_t B = grad_in.size(0), F = grad_in.size(1);
  check_long(index_in, op, "index", grad_in);
  TORCH_CHECK(index_in.size(0) == B && index_in.size(1) == f, op, ": index must be (B, f) = (", B, ", ", f, "), got ",
              index_in.sizes());
  const c10::cuda::CUDAGuard guard(grad_in.device());
  std::vector<int64_t> shape(grad_in.sizes().begin(), grad_in.sizes().end());
  shape[1] = f;
  if (F == 0) return at::zeros(shape, grad_in.options());
  at::Tensor gx = at::empty(shape, grad_in.options());
  if (gx.numel() == 0) return gx;
  const int64_t R = gx.numel() / (B * f);
  const at::Tensor grad = grad_in.contiguous(), index = index_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_type(grad.scalar_type(), op, "grad", [&](auto tag) {
    using T = decltype(tag);
    launch(interp_bwd_kernel<T>, blocks_for(B * f, op), stream, reinterpret_cast<const T*>(grad.data_ptr()),
           index.data_ptr<int64_t>(), f, F, R, reinterpret_cast<T*>(gx.data_ptr()));
  });
  return gx;
}

std::tuple<at::Tensor, at::Tensor> merge_tokens_cuda(const at::Tensor& x_in, const at::Tensor& assignment_in,
                                                     int64_t f, const std::optional<at::Tensor>& weight) {
  const char* op = "merge_tokens";
  TORCH_CHECK(x_in.dim() == 3, op, ": x must be (B, N, C), got ", x_in.sizes());
  TORCH_CHECK(on_device(x_in), op, ": x must be a CUDA tensor, got ", x_in.device());
  const int64_t B = x_in.size(0), N = x_in.size(1), C = x_in.size(2);
  check_long(assignment_in, op, "assignment", x_in);
  TORCH_CHECK(assignment_in.size(0) == B && assignment_in.size(1) == N, op, ": assignment must be (B, N) = (", B,
              ", ", N, "), got ", assignment_in.sizes());
  TORCH_CHECK(f >= 0, op, ": the number of clusters must be >= 0, got ", f);
  const bool has_w = weight.has_value() && weight->defined();
  if (has_w)
    TORCH_CHECK(weight->dim() == 2 && weight->size(0) == B && weight->size(1) == N &&
                    weight->scalar_type() == x_in.scalar_type() && weight->device() == x_in.device(),
                op, ": weight must be (B, N) = (", B, ", ", N, ") of x's dtype and device, got ", weight->sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor out = at::empty({B, f, C}, x_in.options());
  at::Tensor wsum = at::empty({B, f}, x_in.options().dtype(at::kFloat));
  if (B == 0 || f == 0) return {out, wsum};
  const at::Tensor x = x_in.contiguous(), assignment = assignment_in.contiguous();
  const at::Tensor w = has_w ? weight->contiguous() : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_type(x.scalar_type(), op, "x", [&](auto tag) {
    using T = decltype(tag);
    launch(merge_fwd_kernel<T>, blocks_for(B * f, op), stream, reinterpret_cast<const T*>(x.data_ptr()),
           assignment.data_ptr<int64_t>(), has_w ? reinterpret_cast<const T*>(w.data_ptr()) : nullptr, N, f, C,
           reinterpret_cast<T*>(out.data_ptr()), wsum.data_ptr<float>());
  });
  return {out, wsum};
}

std::tuple<at::Tensor, at::Tensor> merge_tokens_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                              const at::Tensor& assignment_in,
                                                              const std::optional<at::Tensor>& weight,
                                                              const at::Tensor& out_in, const at::Tensor& wsum_in,
                                                              bool weight_grad) {
  const char* op = "merge_tokens_backward";
  TORCH_CHECK(grad_in.dim() == 3 && x_in.dim() == 3, op, ": grad must be (B, f, C) and x (B, N, C), got ",
              grad_in.sizes(), " and ", x_in.sizes());
  TORCH_CHECK(on_device(x_in), op, ": x must be a CUDA tensor, got ", x_in.device());
  const int64_t B = x_in.size(0), N = x_in.size(1), C = x_in.size(2), f = grad_in.size(1);
  check_long(assignment_in, op, "assignment", x_in);
  TORCH_CHECK(wsum_in.scalar_type() == at::kFloat, op, ": wsum must be float32, got ", wsum_in.scalar_type());
  const bool has_w = weight.has_value() && weight->defined();
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor gx = at::empty({B, N, C}, x_in.options());
  at::Tensor gw = at::empty({weight_grad ? B : 0, weight_grad ? N : 0}, x_in.options());
  if (B == 0 || N == 0) return {gx, gw};
  if (f == 0) {
    gx.zero_();
    gw.zero_();
    return {gx, gw};
  }
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous(), assignment = assignment_in.contiguous();
  const at::Tensor out = out_in.contiguous(), wsum = wsum_in.contiguous();
  const at::Tensor w = has_w ? weight->contiguous() : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_type(x.scalar_type(), op, "x", [&](auto tag) {
    using T = decltype(tag);
    const T* wp = has_w ? reinterpret_cast<const T*>(w.data_ptr()) : nullptr;
    launch(merge_grad_x_kernel<T>, blocks_for(B * N, op), stream, reinterpret_cast<const T*>(grad.data_ptr()),
           assignment.data_ptr<int64_t>(), wp, wsum.data_ptr<float>(), N, f, C, reinterpret_cast<T*>(gx.data_ptr()));
    if (weight_grad)
      launch(merge_grad_w_kernel<T>, blocks_for((B * N + kThreads - 1) / kThreads, op), stream,
             reinterpret_cast<const T*>(grad.data_ptr()), reinterpret_cast<const T*>(x.data_ptr()),
             assignment.data_ptr<int64_t>(), reinterpret_cast<const T*>(out.data_ptr()), wsum.data_ptr<float>(),
             B * N, N, f, C, reinterpret_cast<T*>(gw.data_ptr()));
  });
  return {gx, gw};
}

}  // namespace hot_kernels
