// gather_frames on CUDA: token_pruning_cluster's gather + positional-embedding add, and its backward.
//
// Forward: out (B, f, J, C)[b, t, j, c] = x[b, index[b, t], j, c] (+ pos_embed[0 or b, t, c]), in x's
// dtype (the add in float32, rounded once, as torch adds half tensors). One block per kept frame
// (b, t) copies its contiguous J * C slab.
// Backward: grad_x (B, F, J, C) zero except grad_x[b, index[b, t]] = grad[b, t] (index rows are
// distinct, so every element has one writer: zero fill, then one block per (b, t)); grad_pos
// (pos_batch, f, C) = grad summed over J (and over B when pos_batch == 1) in float32, one thread per
// output element in a fixed order (b outer, j inner: the CPU's sum over J, then over B), no atomics.
// An index value outside [0, F) reads nothing (zeros) and writes nothing: never out of bounds.
#ifndef TPC_EMULATE
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <limits>

#include "../hot_kernels.h"
#include "tpc_cuda_common.cuh"

namespace hot_kernels {
namespace tpc_cuda {
namespace {

// One block per (b, t): blockIdx.x = b * f + t. x (B, F, J, C), out (B, f, J, C), pos (P, f, C)
// float32 or null, all contiguous.
template <typename T>
__global__ void __launch_bounds__(kThreads) gather_kernel(const T* __restrict__ x, const int64_t* __restrict__ index,
                                                          const float* __restrict__ pos, int pos_batch, int F, int f,
                                                          int64_t J, int64_t C, T* __restrict__ out) {
  const int64_t bt = blockIdx.x;
  const int64_t b = bt / f, t = bt % f;
  const int64_t JC = J * C;
  const int64_t src = index[bt];
  const bool ok = src >= 0 && src < F;
  const T* xs = x + (b * F + (ok ? src : 0)) * JC;
  T* o = out + bt * JC;
  const float* p = pos != nullptr ? pos + ((pos_batch == 1 ? 0 : b) * f + t) * C : nullptr;
  for (int64_t e = threadIdx.x; e < JC; e += kThreads) {
    if (p == nullptr) {
      o[e] = ok ? xs[e] : from_f<T>(0.f);
    } else {
      const float v = ok ? to_f(xs[e]) : 0.f;
      o[e] = from_f<T>(v + p[e % C]);
    }
  }
}

// grad_x[b, index[b, t]] = grad[b, t]; grad_x is zero-filled before.
template <typename T>
__global__ void __launch_bounds__(kThreads) scatter_kernel(const T* __restrict__ grad, const int64_t* __restrict__ index,
                                                           int F, int64_t JC, T* __restrict__ grad_x, int f) {
  const int64_t bt = blockIdx.x;
  const int64_t b = bt / f;
  const int64_t dst = index[bt];
  if (dst < 0 || dst >= F) return;  // uniform over the block
  const T* g = grad + bt * JC;
  T* o = grad_x + (b * F + dst) * JC;
  for (int64_t e = threadIdx.x; e < JC; e += kThreads) o[e] = g[e];
}

// grad_pos[pb, t, c] = sum_b' sum_j grad[b', t, j, c] over b' = pb (pos_batch == B) or all b'
// (pos_batch == 1). One thread per output element; consecutive threads -> consecutive c (coalesced).
template <typename T>
__global__ void __launch_bounds__(kThreads) pos_grad_kernel(const T* __restrict__ grad, int64_t B, int64_t f,
                                                            int64_t J, int64_t C, int64_t pos_batch,
                                                            T* __restrict__ out) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t total = pos_batch * f * C;
  if (o >= total) return;
  const int64_t c = o % C, t = (o / C) % f, pb = o / (C * f);
  const int64_t b0 = pos_batch == 1 ? 0 : pb, b1 = pos_batch == 1 ? B : pb + 1;
  float acc = 0.f;
  for (int64_t b = b0; b < b1; ++b) {
    const T* g = grad + ((b * f + t) * J) * C + c;
    float s = 0.f;
    for (int64_t j = 0; j < J; ++j) s += to_f(g[j * C]);
    acc += s;
  }
  out[o] = from_f<T>(acc);
}

void check_index(const at::Tensor& index, int64_t B, const at::Tensor& like, const char* op) {
  TORCH_CHECK(index.dim() == 2 && index.size(0) == B && index.scalar_type() == at::kLong, op,
              ": index must be (B, f) int64 with B = ", B, ", got ", index.sizes(), " ", index.scalar_type());
  TORCH_CHECK(index.device() == like.device(), op, ": index must be on ", like.device(), ", got ", index.device());
}

}  // namespace
}  // namespace tpc_cuda

using namespace tpc_cuda;

at::Tensor gather_frames_cuda(const at::Tensor& x_in, const at::Tensor& index_in,
                              const std::optional<at::Tensor>& pos_embed) {
  const char* op = "gather_frames";
  TORCH_CHECK(x_in.dim() == 4, op, ": x must be (B, F, J, C), got ", x_in.sizes());
  TORCH_CHECK(on_device(x_in), op, ": x must be a CUDA tensor, got ", x_in.device());
  const int64_t B = x_in.size(0), F = x_in.size(1), J = x_in.size(2), C = x_in.size(3);
  check_index(index_in, B, x_in, op);
  const int64_t f = index_in.size(1);
  const bool has_pos = pos_embed.has_value() && pos_embed->defined();
  if (has_pos) {
    TORCH_CHECK(pos_embed->dim() == 3 && (pos_embed->size(0) == 1 || pos_embed->size(0) == B) &&
                    pos_embed->size(1) == f && pos_embed->size(2) == C,
                op, ": pos_embed must be (1 or B, f, C) = (1, ", f, ", ", C, "), got ", pos_embed->sizes());
    TORCH_CHECK(pos_embed->device() == x_in.device(), op, ": pos_embed must be on ", x_in.device(), ", got ",
                pos_embed->device());
  }
  TORCH_CHECK(F <= std::numeric_limits<int>::max() && f <= std::numeric_limits<int>::max(), op, ": too many frames");
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor out = at::empty({B, f, J, C}, x_in.options());
  if (B == 0 || f == 0 || J == 0 || C == 0) return out;
  TORCH_CHECK(B * f <= std::numeric_limits<int>::max(), op, ": B * f = ", B * f, " is too large for one launch");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const at::Tensor pos = has_pos ? pos_embed->to(at::kFloat).contiguous() : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_type(x.scalar_type(), op, "x", [&](auto tag) {
    using T = decltype(tag);
    launch(gather_kernel<T>, static_cast<unsigned>(B * f), stream, reinterpret_cast<const T*>(x.data_ptr()),
           index.data_ptr<int64_t>(), has_pos ? pos.data_ptr<float>() : nullptr,
           has_pos ? static_cast<int>(pos.size(0)) : 0, static_cast<int>(F), static_cast<int>(f), J, C,
           reinterpret_cast<T*>(out.data_ptr()));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gather_frames_backward_cuda(const at::Tensor& grad_in, const at::Tensor& index_in,
                                                              int64_t num_frames, int64_t pos_batch) {
  const char* op = "gather_frames_backward";
  TORCH_CHECK(grad_in.dim() == 4, op, ": grad must be (B, f, J, C), got ", grad_in.sizes());
  TORCH_CHECK(on_device(grad_in), op, ": grad must be a CUDA tensor, got ", grad_in.device());
  const int64_t B = grad_in.size(0), f = grad_in.size(1), J = grad_in.size(2), C = grad_in.size(3);
  check_index(index_in, B, grad_in, op);
  TORCH_CHECK(index_in.size(1) == f, op, ": index must be (B, f) = (", B, ", ", f, "), got ", index_in.sizes());
  TORCH_CHECK(num_frames >= 0 && num_frames <= std::numeric_limits<int>::max(), op, ": num_frames out of range: ",
              num_frames);
  TORCH_CHECK(pos_batch == 0 || pos_batch == 1 || pos_batch == B, op, ": pos_batch must be 0, 1 or B = ", B, ", got ",
              pos_batch);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  at::Tensor grad_x = at::zeros({B, num_frames, J, C}, grad.options());
  at::Tensor grad_pos;
  if (pos_batch == 0) {
    grad_pos = at::empty({0}, grad.options());
  } else if (B == 0 || f == 0 || C == 0) {
    grad_pos = at::zeros({pos_batch, f, C}, grad.options());  // an empty sum
  } else {
    grad_pos = at::empty({pos_batch, f, C}, grad.options());
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_type(grad.scalar_type(), op, "grad", [&](auto tag) {
    using T = decltype(tag);
    const int64_t JC = J * C;
    if (B > 0 && f > 0 && JC > 0 && num_frames > 0) {
      TORCH_CHECK(B * f <= std::numeric_limits<int>::max(), op, ": B * f = ", B * f, " is too large for one launch");
      launch(scatter_kernel<T>, static_cast<unsigned>(B * f), stream, reinterpret_cast<const T*>(grad.data_ptr()),
             index.data_ptr<int64_t>(), static_cast<int>(num_frames), JC, reinterpret_cast<T*>(grad_x.data_ptr()),
             static_cast<int>(f));
    }
    if (pos_batch > 0 && B > 0 && f > 0 && C > 0) {
      const int64_t total = pos_batch * f * C;
      const int64_t blocks = (total + kThreads - 1) / kThreads;
      TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), op, ": grad_pos too large for one launch");
      launch(pos_grad_kernel<T>, static_cast<unsigned>(blocks), stream, reinterpret_cast<const T*>(grad.data_ptr()), B,
             f, J, C, pos_batch, reinterpret_cast<T*>(grad_pos.data_ptr()));
    }
  });
  return std::make_tuple(grad_x, grad_pos);
}

}  // namespace hot_kernels
