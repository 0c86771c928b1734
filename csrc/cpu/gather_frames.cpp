// gather_frames on the CPU: the gather + positional-embedding add of token_pruning_cluster, and
// its backward (a scatter into zeros: the kept frames of a row are distinct, so nothing collides).
#include "../hot_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

namespace hot_kernels {

at::Tensor gather_frames_cpu(const at::Tensor& x, const at::Tensor& index, const std::optional<at::Tensor>& pos_embed) {
  TORCH_CHECK(x.dim() == 4, "gather_frames: x must be (B, F, J, C), got ", x.sizes());
  TORCH_CHECK(index.dim() == 2 && index.size(0) == x.size(0) && index.scalar_type() == at::kLong,
              "gather_frames: index must be (B, f) int64 with B = ", x.size(0), ", got ", index.sizes(), " ",
              index.scalar_type());
  const int64_t B = x.size(0), F = x.size(1), f = index.size(1), J = x.size(2), C = x.size(3);
  const bool has_pos = pos_embed.has_value() && pos_embed->defined();
  if (has_pos) {
    TORCH_CHECK(pos_embed->dim() == 3 && (pos_embed->size(0) == 1 || pos_embed->size(0) == B) &&
                    pos_embed->size(1) == f && pos_embed->size(2) == C,
                "gather_frames: pos_embed must be (1 or B, f, C) = (1, ", f, ", ", C, "), got ", pos_embed->sizes());
    TORCH_CHECK(pos_embed->scalar_type() == x.scalar_type(), "gather_frames: pos_embed must have the dtype of x (",
                x.scalar_type(), "), got ", pos_embed->scalar_type());
  }
  // One copy of J*C contiguous values per kept frame (+ pos_embed[b or 0, p] on every joint), the
  // (b, p) pairs spread over the threads: a plain memory copy, not an element-wise gather.
  const at::Tensor xc = x.contiguous();
  const at::Tensor idx = index.contiguous();
  const at::Tensor pos = has_pos ? pos_embed->contiguous() : at::Tensor();
  at::Tensor out = at::empty({B, f, J, C}, x.options());
  const int64_t frame = J * C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_frames_cpu", [&] {
    const scalar_t* src = xc.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    const scalar_t* pp = has_pos ? pos.const_data_ptr<scalar_t>() : nullptr;
    const int64_t pos_bstride = has_pos && pos.size(0) == B ? f * C : 0;
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * f, std::max<int64_t>(1, 16384 / std::max<int64_t>(frame, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / f, p = r - b * f, t = ip[r];
        TORCH_CHECK(t >= 0 && t < F, "gather_frames: index must be in [0, ", F, "), got ", t);
        const scalar_t* xs = src + (b * F + t) * frame;
        scalar_t* o = dst + r * frame;
        if (pp == nullptr) {
          std::memcpy(o, xs, sizeof(scalar_t) * frame);
        } else {
          const scalar_t* pe = pp + b * pos_bstride + p * C;
          for (int64_t j = 0; j < J; ++j)
            for (int64_t c = 0; c < C; ++c) o[j * C + c] = xs[j * C + c] + pe[c];
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gather_frames_backward_cpu(const at::Tensor& grad, const at::Tensor& index,
                                                             int64_t num_frames, int64_t pos_batch) {
  TORCH_CHECK(grad.dim() == 4, "gather_frames_backward: grad must be (B, f, J, C), got ", grad.sizes());
  const int64_t B = grad.size(0), f = grad.size(1), J = grad.size(2), C = grad.size(3);
  // The kept frames of a row are distinct (DESIGN.md): each grad frame is copied to its place, the
  // other frames are zero; per sample, so nothing is written twice.
  at::Tensor grad_x = at::empty({B, num_frames, J, C}, grad.options());
  const at::Tensor gc = grad.contiguous();
  const at::Tensor idx = index.contiguous();
  const int64_t frame = J * C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "gather_frames_backward_cpu", [&] {
    const scalar_t* g = gc.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        std::fill(gx + b * num_frames * frame, gx + (b + 1) * num_frames * frame, scalar_t(0));
        for (int64_t p = 0; p < f; ++p) {
          const int64_t t = ip[b * f + p];
          TORCH_CHECK(t >= 0 && t < num_frames, "gather_frames_backward: index must be in [0, ", num_frames,
                      "), got ", t);
          std::memcpy(gx + (b * num_frames + t) * frame, g + (b * f + p) * frame, sizeof(scalar_t) * frame);
        }
      }
    });
  });
  at::Tensor grad_pos;
  if (pos_batch == 0) {
    grad_pos = at::empty({0}, grad.options());
  } else {
    const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor summed = grad.sum({2}, /*keepdim=*/false, acc);  // (B, f, C)
    if (pos_batch == 1) summed = summed.sum({0}, /*keepdim=*/true);
    grad_pos = summed.to(grad.scalar_type());
  }
  return std::make_tuple(grad_x, grad_pos);
}

}  // namespace hot_kernels
