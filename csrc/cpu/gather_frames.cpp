// gather_frames on the CPU: the gather + positional-embedding add of token_pruning_cluster, and
// its backward (a scatter into zeros: the kept frames of a row are distinct, so nothing collides).
#include "../hot_kernels.h"

#include <ATen/ATen.h>

namespace hot_kernels {

at::Tensor gather_frames_cpu(const at::Tensor& x, const at::Tensor& index, const std::optional<at::Tensor>& pos_embed) {
  TORCH_CHECK(x.dim() == 4, "gather_frames: x must be (B, F, J, C), got ", x.sizes());
  TORCH_CHECK(index.dim() == 2 && index.size(0) == x.size(0) && index.scalar_type() == at::kLong,
              "gather_frames: index must be (B, f) int64 with B = ", x.size(0), ", got ", index.sizes(), " ",
              index.scalar_type());
  const int64_t B = x.size(0), f = index.size(1), J = x.size(2), C = x.size(3);
  at::Tensor out = x.gather(1, index.view({B, f, 1, 1}).expand({B, f, J, C}));
  if (pos_embed.has_value() && pos_embed->defined()) {
    TORCH_CHECK(pos_embed->dim() == 3 && pos_embed->size(1) == f && pos_embed->size(2) == C,
                "gather_frames: pos_embed must be (1 or B, f, C) = (1, ", f, ", ", C, "), got ", pos_embed->sizes());
    out.add_(pos_embed->unsqueeze(2));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> gather_frames_backward_cpu(const at::Tensor& grad, const at::Tensor& index,
                                                             int64_t num_frames, int64_t pos_batch) {
  TORCH_CHECK(grad.dim() == 4, "gather_frames_backward: grad must be (B, f, J, C), got ", grad.sizes());
  const int64_t B = grad.size(0), f = grad.size(1), J = grad.size(2), C = grad.size(3);
  at::Tensor grad_x = at::zeros({B, num_frames, J, C}, grad.options());
  grad_x.scatter_(1, index.view({B, f, 1, 1}).expand({B, f, J, C}), grad);
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
