// dpc_delta on the CPU: delta_i = min over the tokens j higher than i (by the given density; NaN
// and masked tokens rank lowest; ties to the lower index) of D[i, j], parent_i = the lowest such j
// attaining it; the highest token gets the largest distance between real tokens and is its own
// parent. Distance block and row scan: tpc_common.h (shared with dpc_knn).
#include "../hot_kernels.h"
#include "tpc_common.h"

namespace hot_kernels {

std::tuple<at::Tensor, at::Tensor> dpc_delta_cpu(const at::Tensor& x, const at::Tensor& density,
                                                 const std::optional<at::Tensor>& token_mask) {
  tpc::check_x(x, "dpc_delta");
  const int64_t B = x.size(0), N = x.size(1);
  TORCH_CHECK(density.dim() == 2 && density.size(0) == B && density.size(1) == N,
              "dpc_delta: density must be (B, N) = (", B, ", ", N, "), got ", density.sizes());
  TORCH_CHECK(density.device().is_cpu(), "dpc_delta: density must be on the CPU like x, got ", density.device());
  TORCH_CHECK(at::isFloatingType(density.scalar_type()), "dpc_delta: density must be a floating tensor, got ",
              density.scalar_type());
  const at::Tensor xf = tpc::compute_input(x);
  const at::Tensor mask = tpc::prepare_mask(token_mask, B, N, "dpc_delta");
  // Every floating dtype converts to double exactly, so the order (and its ties) is unchanged.
  const at::Tensor keys = density.to(at::kDouble).contiguous();
  at::Tensor delta = at::empty({B, N}, xf.options());
  at::Tensor parent = at::empty({B, N}, xf.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(xf.scalar_type(), "dpc_delta_cpu", [&] {
    auto job = tpc::make_job<scalar_t>(xf, mask);
    job.want_delta = true;
    job.keys = keys.data_ptr<double>();
    job.delta = delta.data_ptr<scalar_t>();
    job.parent = parent.data_ptr<int64_t>();
    tpc::run(job);
  });
  return std::make_tuple(delta, parent);
}

}  // namespace hot_kernels
