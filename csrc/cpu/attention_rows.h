// The attention core of the cpu TRA in float32 (csrc/cpu/attention_rows.cpp): softmax(Q K^T * scale) V
// of every (sequence, head) of a chunk, and its backward, on the head-interleaved row layouts the
// TRA's projections read and write (no (n, H, rows, d) copies).
//
// Layouts (C = H * d channels, head h in channels [h*d, (h+1)*d)):
//   q   query rows, (L, C) shared by every sequence (q_seq_stride 0) or (n*L, C) (q_seq_stride L*C)
//   kv  (n*M, 2C): K | V of the chunk's n sequences
//   o   (n*L, C) attention output rows;  lse (n, H, L) row log-sum-exp of the scaled logits
//   dO  (n*L, C);  dq (n*L, C) (per sequence, also for a shared query);  dkv (n*M, 2C) = dK | dV
// All contiguous float32. M >= 1.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace hot_kernels {
namespace attn {

// Whether the row kernels take a head of width d over M keys (their per-task scratch holds a
// head's keys whole); otherwise the caller uses ATen's flash attention.
bool supported(int64_t M, int64_t d);

void forward(const at::Tensor& q, int64_t q_seq_stride, const at::Tensor& kv, int64_t n, int64_t L, int64_t M,
             int64_t H, double scale, at::Tensor& o, at::Tensor& lse);

void backward(const at::Tensor& dO, const at::Tensor& q, int64_t q_seq_stride, const at::Tensor& kv,
              const at::Tensor& o, const at::Tensor& lse, int64_t n, int64_t L, int64_t M, int64_t H, double scale,
              at::Tensor& dq, at::Tensor& dkv);

}  // namespace attn
}  // namespace hot_kernels
