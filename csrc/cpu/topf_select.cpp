// topf_select on the CPU: the f largest scores per row (ties to the lower index, NaN below every
// number, `exclude` never picked), ascending indices when sorted, else best first. The ranking
// comparator and the selection are the shared ones of tpc_common.h (dpc_knn uses them too).
#include "../hot_kernels.h"
#include "tpc_common.h"

namespace hot_kernels {
namespace {

template <typename T>
void select_rows(const T* sp, int64_t B, int64_t N, int64_t f, bool sorted, const int64_t* exclude, int64_t* out) {
  const int nt = static_cast<int>(std::min<int64_t>(tpc::max_threads(), B));
  const bool par = B * N >= 4096 && nt > 1;
#pragma omp parallel num_threads(nt) if (par)
  {
    std::vector<int8_t> cls(N);
    std::vector<T> key(N);
    std::vector<int64_t> perm;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const T* row = sp + b * N;
      for (int64_t i = 0; i < N; ++i) {
        const bool nan = row[i] != row[i];
        cls[i] = nan ? 2 : 3;
        key[i] = nan ? -tpc::inf<T>() : row[i];
      }
      if (exclude) cls[exclude[b]] = 0;
      tpc::select_best(cls.data(), key.data(), N, f, sorted, out + b * f, perm);
    }
  }
}

}  // namespace

at::Tensor topf_select_cpu(const at::Tensor& score, int64_t f, bool sorted, const std::optional<at::Tensor>& exclude) {
  TORCH_CHECK(score.dim() == 2, "topf_select: score must be (B, N), got ", score.sizes());
  TORCH_CHECK(at::isFloatingType(score.scalar_type()), "topf_select: score must be a floating tensor, got ",
              score.scalar_type());
  const int64_t B = score.size(0), N = score.size(1);
  const bool has_ex = exclude.has_value() && exclude->defined();
  TORCH_CHECK(f >= 0 && f <= (has_ex ? N - 1 : N), "topf_select: f must be in [0, ", has_ex ? N - 1 : N, "]",
              has_ex ? " (one token is excluded)" : "", ", got ", f);
  at::Tensor ex;
  if (has_ex) {
    TORCH_CHECK(exclude->numel() == B, "topf_select: exclude must hold one index per row (B = ", B, "), got ",
                exclude->sizes());
    TORCH_CHECK(!at::isFloatingType(exclude->scalar_type()) && exclude->scalar_type() != at::kBool,
                "topf_select: exclude must be an integer tensor, got ", exclude->scalar_type());
    ex = exclude->to(at::kLong).contiguous().view({B});
    if (B > 0) {
      const int64_t lo = ex.min().item<int64_t>(), hi = ex.max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi < N, "topf_select: exclude must be in [0, N) = [0, ", N, "), got values in [", lo,
                  ", ", hi, "]");
    }
  }
  const auto ct = tpc::compute_dtype(score.scalar_type());
  const at::Tensor s = score.to(ct).contiguous();  // float16/bfloat16 -> float32 keeps order and ties
  at::Tensor index = at::empty({B, f}, score.options().dtype(at::kLong));
  if (B == 0 || f == 0) return index;
  AT_DISPATCH_FLOATING_TYPES(ct, "topf_select_cpu", [&] {
    select_rows(s.data_ptr<scalar_t>(), B, N, f, sorted, has_ex ? ex.data_ptr<int64_t>() : nullptr,
                index.data_ptr<int64_t>());
  });
  return index;
}

}  // namespace hot_kernels
