// knn_density on the CPU: rho_i = exp(-mean of the squares of the k smallest D[i, :]), self
// included (log rho when log is true). The distance block and the k-nearest selection are the
// shared ones of tpc_common.h (the same code dpc_knn runs).
#include "../hot_kernels.h"
#include "tpc_common.h"

namespace hot_kernels {

at::Tensor knn_density_cpu(const at::Tensor& x, int64_t k, const std::optional<at::Tensor>& token_mask, bool log) {
  tpc::check_x(x, "knn_density");
  const int64_t B = x.size(0), N = x.size(1);
  TORCH_CHECK(k >= 1, "knn_density: k must be >= 1, got ", k);
  k = std::min<int64_t>(k, std::max<int64_t>(N, 1));  // fewer than k tokens: the mean runs over all (the reference)
  const at::Tensor xf = tpc::compute_input(x);
  const at::Tensor mask = tpc::prepare_mask(token_mask, B, N, "knn_density");
  at::Tensor out = at::empty({B, N}, xf.options());
  AT_DISPATCH_FLOATING_TYPES(xf.scalar_type(), "knn_density_cpu", [&] {
    auto job = tpc::make_job<scalar_t>(xf, mask);
    job.k = k;
    job.log_rho = out.data_ptr<scalar_t>();
    tpc::run(job);
  });
  if (!log) out.exp_();  // the same exp as the reference's log_rho.exp()
  return out;
}

}  // namespace hot_kernels
