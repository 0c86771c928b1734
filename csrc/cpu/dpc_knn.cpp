// dpc_knn on the CPU: the fused TPC selection. Per sample, one GEMM-based distance block (or, for
// long clips, canonical tiles streamed twice; tpc_common.h), then a single pass over its rows for
// the k-nearest log-density, a pass for delta (ordered by log rho), score = delta * exp(log rho),
// the top-f selection and the optional assignment. No B x N x N tensor is ever allocated.
// A (B, N, J, C) input is pooled over J first (token_pruning_cluster).
#include "../hot_kernels.h"
#include "tpc_common.h"

namespace hot_kernels {
namespace tpc {

// Rows [r0, r1) of the (B*N, J, C) input -> their joint means: per channel, the J values summed in
// order (j = 0, 1, ...), then divided by J. Channels in blocks of kPoolBlock whose sums stay in
// registers over the J joints (one load per input element). The same sums in every
// instruction-set path.
constexpr int64_t kPoolBlock = 64;

template <typename scalar_t, typename acc_t>
HK_HOT_IMPL void pool_rows_impl(const scalar_t* src, acc_t* dst, int64_t r0, int64_t r1, int64_t J, int64_t C) {
  const acc_t count = acc_t(J);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* xr = src + r * J * C;
    acc_t* o = dst + r * C;
    int64_t c0 = 0;
    for (; c0 + kPoolBlock <= C; c0 += kPoolBlock) {
      acc_t a[kPoolBlock];
#pragma omp simd
      for (int64_t c = 0; c < kPoolBlock; ++c) a[c] = static_cast<acc_t>(xr[c0 + c]);
      for (int64_t j = 1; j < J; ++j) {
        const scalar_t* xj = xr + j * C + c0;
#pragma omp simd
        for (int64_t c = 0; c < kPoolBlock; ++c) a[c] += static_cast<acc_t>(xj[c]);
      }
#pragma omp simd
      for (int64_t c = 0; c < kPoolBlock; ++c) o[c0 + c] = a[c] / count;
    }
    for (int64_t c = c0; c < C; ++c) o[c] = static_cast<acc_t>(xr[c]);
    for (int64_t j = 1; j < J; ++j)
      for (int64_t c = c0; c < C; ++c) o[c] += static_cast<acc_t>(xr[j * C + c]);
    for (int64_t c = c0; c < C; ++c) o[c] /= count;
  }
}
HK_MULTIVERSION(pool_rows)

}  // namespace tpc

namespace {

// (B, N, J, C) -> (B, N, C) mean over the joints in the compute dtype (float32 for half inputs),
// one pass over x in parallel over the (b, n) rows; no (B, N, J, C) copy in float32 (at::mean
// over a middle dimension is several times slower here).
at::Tensor pool_joints(const at::Tensor& x) {
  const int64_t B = x.size(0), N = x.size(1), J = x.size(2), C = x.size(3);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({B, N, C}, x.options().dtype(tpc::compute_dtype(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dpc_knn_pool_joints", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* src = xc.const_data_ptr<scalar_t>();
    acc_t* dst = out.data_ptr<acc_t>();
    at::parallel_for(0, B * N, std::max<int64_t>(1, 4096 / std::max<int64_t>(J * C, 1)),
                     [&](int64_t r0, int64_t r1) { tpc::pool_rows(src, dst, r0, r1, J, C); });
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dpc_knn_cpu(const at::Tensor& x, int64_t f, int64_t k,
                                               const std::optional<at::Tensor>& token_mask,
                                               std::optional<int64_t> center, bool keep_center, bool sorted,
                                               bool return_assignment) {
  if (x.dim() == 4) {
    // (B, N, J, C): select on the joint-pooled clip, pooled in the compute precision (float32 for
    // half inputs), as every backend does.
    TORCH_CHECK(x.size(2) >= 1, "dpc_knn: x (B, N, J, C) must have J >= 1, got ", x.sizes());
    return dpc_knn_cpu(pool_joints(x), f, k, token_mask, center, keep_center, sorted, return_assignment);
  }
  tpc::check_x(x, "dpc_knn");
  const int64_t B = x.size(0), N = x.size(1);
  TORCH_CHECK(k >= 1, "dpc_knn: k must be >= 1, got ", k);
  k = std::min<int64_t>(k, std::max<int64_t>(N, 1));  // fewer than k tokens: the mean runs over all (the reference)
  const bool has_center = center.has_value();
  if (has_center) {
    TORCH_CHECK(*center >= 0 && *center < N, "dpc_knn: center must be in [0, N) = [0, ", N, "), got ", *center);
    if (keep_center) {
      TORCH_CHECK(f >= 1 && f <= N, "dpc_knn: f must be in [1, N] = [1, ", N, "] with a kept center, got ", f);
    } else {
      TORCH_CHECK(f >= 0 && f <= N - 1, "dpc_knn: f must be in [0, N - 1] = [0, ", N - 1,
                  "] when the center is excluded (keep_center=False), got ", f);
    }
  } else {
    TORCH_CHECK(f >= 0 && f <= N, "dpc_knn: f must be in [0, N] = [0, ", N, "], got ", f);
  }
  TORCH_CHECK(!return_assignment || f >= 1 || B * N == 0, "dpc_knn: return_assignment needs f >= 1, got ", f);
  const at::Tensor xf = tpc::compute_input(x);
  const at::Tensor mask = tpc::prepare_mask(token_mask, B, N, "dpc_knn");
  const auto lopt = xf.options().dtype(at::kLong);
  at::Tensor index = at::empty({B, f}, lopt);
  at::Tensor assignment = return_assignment ? at::empty({B, N}, lopt) : at::empty({B, 0}, lopt);
  at::Tensor log_rho = at::empty({B, N}, xf.options());
  at::Tensor delta = at::empty({B, N}, xf.options());
  AT_DISPATCH_FLOATING_TYPES(xf.scalar_type(), "dpc_knn_cpu", [&] {
    auto job = tpc::make_job<scalar_t>(xf, mask);
    job.k = k;
    job.log_rho = log_rho.data_ptr<scalar_t>();
    job.want_delta = true;
    job.delta = delta.data_ptr<scalar_t>();
    job.want_select = true;
    job.f = f;
    job.center = has_center ? *center : -1;
    job.keep_center = keep_center;
    job.sorted = sorted;
    job.index = index.data_ptr<int64_t>();
    job.assign = return_assignment ? assignment.data_ptr<int64_t>() : nullptr;
    tpc::run(job);
  });
  return std::make_tuple(index, assignment);
}

}  // namespace hot_kernels
