// pairwise_distance on the CPU (forward and backward). Without y the distance block is the shared
// bit-symmetric one of tpc_common.h (the one the TPC ops use); with y it is the same Gram form on
// inputs centred by their common mean, with the same exact recomputation of near-duplicate pairs.
#include "../hot_kernels.h"
#include "gemm_fixed.h"
#include "tpc_common.h"

namespace hot_kernels {
namespace {

template <typename T>
void self_distance(const T* x, int64_t B, int64_t N, int64_t C, T* out) {
  const int64_t ld = tpc::row_stride(C), ss = (N + tpc::kPadRows) * ld, sqs = N + tpc::kPadRows;
  tpc::AlignedBuf<T> xc;
  xc.assign_zero(B * ss);
  std::vector<T> sq(B * sqs, T(0));
  const int nt = tpc::max_threads();
  std::vector<std::vector<T>> scratch(nt, std::vector<T>(2 * C));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t b = 0; b < B; ++b)
    tpc::center_sample(x + b * N * C, N, C, static_cast<const bool*>(nullptr), xc.data() + b * ss, ld,
                       sq.data() + b * sqs, scratch[tpc::thread_id()].data());
  // Row tiles of all samples are independent (see full_block_tiles): spread over the threads.
  const int64_t ntl = tpc::stair_tiles(N);
  const T scale = tpc::sqrt_c<T>(C);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t it = 0; it < B * ntl; ++it) {
    const int64_t b = it / ntl, t = it % ntl;
    tpc::full_block_tiles(xc.data() + b * ss, ld, sq.data() + b * sqs, N, C, out + b * N * N, t, t + 1);
  }
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t r = 0; r < B * N; ++r) tpc::e_to_dist(out + r * N, N, scale);
}

template <typename T>
void cross_distance(const T* x, const T* y, int64_t B, int64_t N, int64_t M, int64_t C, T* out) {
  const int64_t ld = tpc::row_stride(C);
  tpc::AlignedBuf<T> xc, yc;
  xc.assign_zero(B * N * ld);
  yc.assign_zero(B * M * ld);
  std::vector<T> sqx(B * N), sqy(B * M);
  const int nt = tpc::max_threads();
  std::vector<std::vector<T>> scratch(nt, std::vector<T>(2 * C));
  // Both sides shifted by their common mean (finite entries): distances unchanged, less cancellation.
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t b = 0; b < B; ++b) {
    const T* mean = tpc::channel_mean(x + b * N * C, N, static_cast<const bool*>(nullptr), y + b * M * C, M, C,
                                      scratch[tpc::thread_id()].data());
    tpc::subtract_mean(x + b * N * C, N, C, mean, xc.data() + b * N * ld, ld, sqx.data() + b * N);
    tpc::subtract_mean(y + b * M * C, M, C, mean, yc.data() + b * M * ld, ld, sqy.data() + b * M);
  }
  constexpr int64_t R = 64;  // rows per work item
  const int64_t nr = (N + R - 1) / R;
  const T scale = tpc::sqrt_c<T>(C);
  const T* xcp = xc.data();
  const T* ycp = yc.data();
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t it = 0; it < B * nr; ++it) {
    const int64_t b = it / nr, r0 = (it % nr) * R, r1 = std::min(N, r0 + R);
    const T* xb = xcp + b * N * ld;
    const T* yb = ycp + b * M * ld;
    T* o = out + b * N * M;
    tpc::gemm_abt<T>(r1 - r0, M, C, xb + r0 * ld, ld, yb, ld, o + r0 * M, M);
    for (int64_t i = r0; i < r1; ++i) {
      tpc::gram_to_e(o + i * M, M, sqx[b * N + i], sqy.data() + b * M, xb + i * ld, yb, ld, C);
      tpc::e_to_dist(o + i * M, M, scale);
    }
  }
}

}  // namespace

at::Tensor pairwise_distance_cpu(const at::Tensor& x, const std::optional<at::Tensor>& y) {
  tpc::check_x(x, "pairwise_distance");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  const bool has_y = y.has_value() && y->defined();
  const at::Tensor xf = tpc::compute_input(x);
  at::Tensor yf;
  int64_t M = N;
  if (has_y) {
    TORCH_CHECK(y->dim() == 3 && y->size(0) == B && y->size(2) == C, "pairwise_distance: y must be (B, M, C) = (",
                B, ", M, ", C, ") like x, got ", y->sizes());
    TORCH_CHECK(y->device().is_cpu(), "pairwise_distance: y must be on the CPU like x, got ", y->device());
    TORCH_CHECK(at::isFloatingType(y->scalar_type()), "pairwise_distance: y must be a floating tensor, got ",
                y->scalar_type());
    yf = y->to(xf.scalar_type()).contiguous();
    M = y->size(1);
  }
  at::Tensor out = at::empty({B, N, M}, xf.options());
  if (B > 0 && N > 0 && M > 0) {
    AT_DISPATCH_FLOATING_TYPES(xf.scalar_type(), "pairwise_distance_cpu", [&] {
      if (has_y)
        cross_distance(xf.data_ptr<scalar_t>(), yf.data_ptr<scalar_t>(), B, N, M, C, out.data_ptr<scalar_t>());
      else
        self_distance(xf.data_ptr<scalar_t>(), B, N, C, out.data_ptr<scalar_t>());
    });
  }
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> pairwise_distance_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                  const std::optional<at::Tensor>& y,
                                                                  const at::Tensor& dist) {
  tpc::check_x(x, "pairwise_distance_backward");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  const bool has_y = y.has_value() && y->defined();
  const int64_t M = has_y ? y->size(1) : N;
  if (has_y) {
    TORCH_CHECK(y->dim() == 3 && y->size(0) == B && y->size(2) == C,
                "pairwise_distance_backward: y must be (B, M, C) like x, got ", y->sizes());
  }
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == B && grad.size(1) == N && grad.size(2) == M,
              "pairwise_distance_backward: grad must be (B, N, M) = (", B, ", ", N, ", ", M, "), got ", grad.sizes());
  TORCH_CHECK(dist.sizes() == grad.sizes(), "pairwise_distance_backward: dist must be (B, N, M) = (", B, ", ", N,
              ", ", M, "), got ", dist.sizes());
  const auto ct = tpc::compute_dtype(x.scalar_type());
  // Contiguous: the GEMMs below then see one layout whatever the caller's strides, so the gradient
  // of a transposed or expanded x is bitwise the gradient of its contiguous copy.
  const at::Tensor xf = x.to(ct).contiguous();
  const at::Tensor yf = has_y ? y->to(ct).contiguous() : xf;
  const at::Tensor d = dist.to(ct).contiguous();
  // W = g / (C * D), 0 where D == 0 (the gradient of |v| at 0 is defined as 0).
  const at::Tensor W = at::where(d != 0, grad.to(ct) / (d * static_cast<double>(C)), at::zeros({}, d.options()));
  // The gradients are translation invariant: work on inputs shifted by their common finite mean
  // (less cancellation in x_i * rowsum - (W y)_i).
  auto finite_mean = [](const at::Tensor& t) {
    const at::Tensor fin = at::isfinite(t);
    return at::where(fin, t, at::zeros({}, t.options())).sum(1, true) /
           fin.sum(1, true).clamp_min(1).to(t.scalar_type());
  };
  at::Tensor off;
  if (has_y) {
    const at::Tensor both = at::cat({xf, yf}, 1);
    off = finite_mean(both);
  } else {
    off = finite_mean(xf);
  }
  const at::Tensor xs = xf - off;
  if (!has_y) {
    const at::Tensor rs = (W.sum(2) + W.sum(1)).unsqueeze(-1);
    const at::Tensor gx = xs * rs - bmm_fixed(W + W.transpose(1, 2), xs);
    return std::make_tuple(gx.to(x.scalar_type()), at::empty({0}, x.options()));
  }
  const at::Tensor ys = yf - off;
  const at::Tensor gx = xs * W.sum(2).unsqueeze(-1) - bmm_fixed(W, ys);
  const at::Tensor gy = ys * W.sum(1).unsqueeze(-1) - bmm_fixed(W.transpose(1, 2), xs);
  return std::make_tuple(gx.to(x.scalar_type()), gy.to(y->scalar_type()));
}

}  // namespace hot_kernels
