// token_recovering_interpolation and merge_tokens on the CPU, forward and backward. Both are
// gathers: every output element is written by one thread, reductions run in a fixed order (no
// atomics, results independent of the thread count). Accumulation in float32 for half inputs,
// float64 for float64, as the reference.
#include "../hot_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <vector>

namespace hot_kernels {
namespace {

// The interpolation segment of output frame t for one ascending index row idx[0..f): q = the
// number of kept frames at or before t. Before the first kept frame (q == 0) or at/after the last
// (q == f) the frame copies that kept frame (w = 0); else it lies in [idx[q-1], idx[q]) and mixes
// lo = q - 1 and hi = q with weight w on hi. An unsorted row gives unspecified weights but indices
// stay in [0, f) (never out of bounds).
template <typename acc_t>
inline void interp_segment(const int64_t* idx, int64_t f, int64_t t, int64_t& lo, int64_t& hi, acc_t& w) {
  int64_t a = 0, b = f;  // binary search: first position with idx > t
  while (a < b) {
    const int64_t m = (a + b) / 2;
    if (idx[m] <= t) a = m + 1; else b = m;
  }
  const int64_t q = a;
  if (q == 0 || q == f) {
    lo = hi = (q == 0 ? 0 : f - 1);
    w = acc_t(0);
    return;
  }
  lo = q - 1;
  hi = q;
  const int64_t span = idx[hi] - idx[lo];
  // (t - idx[lo]) / span in the accumulation type: both exact integers below 2^24.
  w = span > 0 ? acc_t(t - idx[lo]) / acc_t(span) : acc_t(0);
}

void check_index(const char* op, const at::Tensor& index, int64_t B) {
  TORCH_CHECK(index.dim() == 2 && index.size(0) == B && index.scalar_type() == at::kLong, op,
              ": index must be (B, f) int64 with B = ", B, ", got ", index.sizes(), " ", index.scalar_type());
}

}  // namespace

at::Tensor token_recovering_interpolation_cpu(const at::Tensor& x, const at::Tensor& index, int64_t num_frames) {
  const char* op = "token_recovering_interpolation";
  TORCH_CHECK(x.dim() == 3 || x.dim() == 4, op, ": x_kept must be (B, f, C) or (B, f, J, C), got ", x.sizes());
  const int64_t B = x.size(0), f = x.size(1);
  check_index(op, index, B);
  TORCH_CHECK(index.size(1) == f, op, ": index must be (B, f) with f = ", f, ", got ", index.sizes());
  TORCH_CHECK(num_frames >= 0, op, ": F must be >= 0, got ", num_frames);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[1] = num_frames;
  at::Tensor out = at::empty(shape, x.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK(f > 0, op, ": x_kept must have at least one kept frame to interpolate from");
  const int64_t R = x.numel() / (B * f);  // J * C values per frame
  const at::Tensor xc = x.contiguous();
  const at::Tensor idx = index.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "token_recovering_interpolation_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = xc.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * num_frames, std::max<int64_t>(1, 8192 / R), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / num_frames, t = r - b * num_frames;
        int64_t lo, hi;
        acc_t w;
        interp_segment<acc_t>(ip + b * f, f, t, lo, hi, w);
        const scalar_t* a = src + (b * f + lo) * R;
        const scalar_t* c = src + (b * f + hi) * R;
        scalar_t* o = dst + r * R;
        const acc_t w0 = acc_t(1) - w;
        // (1 - w) a + w c: exactly a at w = 0 (a kept frame, or a clamped end).
        for (int64_t e = 0; e < R; ++e) o[e] = static_cast<scalar_t>(w0 * acc_t(a[e]) + w * acc_t(c[e]));
      }
    });
  });
  return out;
}

at::Tensor token_recovering_interpolation_backward_cpu(const at::Tensor& grad, const at::Tensor& index, int64_t f) {
  const char* op = "token_recovering_interpolation_backward";
  TORCH_CHECK(grad.dim() == 3 || grad.dim() == 4, op, ": grad must be (B, F, C) or (B, F, J, C), got ", grad.sizes());
  const int64_t B = grad.size(0), F = grad.size(1);
  check_index(op, index, B);
  TORCH_CHECK(index.size(1) == f, op, ": index must be (B, f) with f = ", f, ", got ", index.sizes());
  std::vector<int64_t> shape(grad.sizes().begin(), grad.sizes().end());
  shape[1] = f;
  at::Tensor gx = at::empty(shape, grad.options());
  if (gx.numel() == 0) return gx;
  const int64_t R = gx.numel() / (B * f);
  const at::Tensor gc = grad.contiguous();
  const at::Tensor idx = index.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "token_recovering_interpolation_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = gc.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    scalar_t* dst = gx.data_ptr<scalar_t>();
    // One kept frame p per task: it gathers the weighted gradients of the output frames between its
    // neighbours (all frames before the first / after the last for the ends), t ascending.
    at::parallel_for(0, B * f, 1, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> acc(R);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / f, p = r - b * f;
        const int64_t* row = ip + b * f;
        const int64_t t0 = p == 0 ? 0 : std::max<int64_t>(0, row[p - 1] + 1);
        const int64_t t1 = p == f - 1 ? F - 1 : std::min<int64_t>(F - 1, row[p + 1] - 1);
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t t = t0; t <= t1; ++t) {
          int64_t lo, hi;
          acc_t w;
          interp_segment<acc_t>(row, f, t, lo, hi, w);
          // The forward's weights, as it computed them: (1 - w) on lo, w on hi.
          const acc_t wp = (lo == p ? acc_t(1) - w : acc_t(0)) + (hi == p && hi != lo ? w : acc_t(0));
          if (wp == acc_t(0)) continue;
          const scalar_t* gt = g + (b * F + t) * R;
          for (int64_t e = 0; e < R; ++e) acc[e] += wp * acc_t(gt[e]);
        }
        scalar_t* o = dst + r * R;
        for (int64_t e = 0; e < R; ++e) o[e] = static_cast<scalar_t>(acc[e]);
      }
    });
  });
  return gx;
}

std::tuple<at::Tensor, at::Tensor> merge_tokens_cpu(const at::Tensor& x, const at::Tensor& assignment, int64_t f,
                                                    const std::optional<at::Tensor>& weight) {
  const char* op = "merge_tokens";
  TORCH_CHECK(x.dim() == 3, op, ": x must be (B, N, C), got ", x.sizes());
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  TORCH_CHECK(f >= 0, op, ": the number of clusters must be >= 0, got ", f);
  TORCH_CHECK(assignment.dim() == 2 && assignment.size(0) == B && assignment.size(1) == N &&
                  assignment.scalar_type() == at::kLong,
              op, ": assignment must be (B, N) int64 = (", B, ", ", N, "), got ", assignment.sizes(), " ",
              assignment.scalar_type());
  const bool has_w = weight.has_value() && weight->defined();
  if (has_w)
    TORCH_CHECK(weight->dim() == 2 && weight->size(0) == B && weight->size(1) == N &&
                    weight->scalar_type() == x.scalar_type(),
                op, ": weight must be (B, N) = (", B, ", ", N, ") of x's dtype, got ", weight->sizes(), " ",
                weight->scalar_type());
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({B, f, C}, x.options());
  at::Tensor wsum = at::empty({B, f}, x.options().dtype(acc_type));
  if (B == 0 || f == 0) return {out, wsum};
  const at::Tensor xc = x.contiguous();
  const at::Tensor ac = assignment.contiguous();
  const at::Tensor wc = has_w ? weight->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "merge_tokens_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xs = xc.const_data_ptr<scalar_t>();
    const int64_t* as = ac.const_data_ptr<int64_t>();
    const scalar_t* ws = has_w ? wc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* os = out.data_ptr<scalar_t>();
    acc_t* wo = wsum.data_ptr<acc_t>();
    // Per sample: members of each cluster in ascending token order (a stable counting sort), then one
    // task per (sample, cluster) summing its members in that order. Tokens with an assignment outside
    // [0, f) belong to no cluster.
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<int64_t> start(f + 1), members(N);
      std::vector<acc_t> acc(C);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t* a = as + b * N;
        std::fill(start.begin(), start.end(), 0);
        for (int64_t i = 0; i < N; ++i)
          if (a[i] >= 0 && a[i] < f) ++start[a[i] + 1];
        for (int64_t p = 0; p < f; ++p) start[p + 1] += start[p];
        std::vector<int64_t> fill(start.begin(), start.end() - 1);
        for (int64_t i = 0; i < N; ++i)
          if (a[i] >= 0 && a[i] < f) members[fill[a[i]]++] = i;
        for (int64_t p = 0; p < f; ++p) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          acc_t W = 0;
          for (int64_t m = start[p]; m < start[p + 1]; ++m) {
            const int64_t i = members[m];
            const acc_t wi = ws ? acc_t(ws[b * N + i]) : acc_t(1);
            W += wi;
            const scalar_t* xi = xs + (b * N + i) * C;
            for (int64_t c = 0; c < C; ++c) acc[c] += wi * acc_t(xi[c]);
          }
          wo[b * f + p] = W;
          // A cluster with no members or weights summing to 0 is 0 (no division by zero).
          const acc_t inv = W != acc_t(0) ? acc_t(1) / W : acc_t(0);
          scalar_t* o = os + (b * f + p) * C;
          for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(acc[c] * inv);
        }
      }
    });
  });
  return {out, wsum};
}

std::tuple<at::Tensor, at::Tensor> merge_tokens_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                             const at::Tensor& assignment,
                                                             const std::optional<at::Tensor>& weight,
                                                             const at::Tensor& out, const at::Tensor& wsum,
                                                             bool weight_grad) {
  const char* op = "merge_tokens_backward";
  TORCH_CHECK(grad.dim() == 3 && x.dim() == 3, op, ": grad must be (B, f, C) and x (B, N, C), got ", grad.sizes(),
              " and ", x.sizes());
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), f = grad.size(1);
  const bool has_w = weight.has_value() && weight->defined();
  at::Tensor gx = at::empty({B, N, C}, x.options());
  at::Tensor gw = at::empty({weight_grad ? B : 0, weight_grad ? N : 0}, x.options());
  if (B == 0 || N == 0) return {gx, gw};
  const at::Tensor gc = grad.contiguous(), xc = x.contiguous(), ac = assignment.contiguous();
  const at::Tensor oc = out.contiguous(), sc = wsum.contiguous();
  const at::Tensor wc = has_w ? weight->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "merge_tokens_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = gc.const_data_ptr<scalar_t>();
    const scalar_t* xs = xc.const_data_ptr<scalar_t>();
    const int64_t* as = ac.const_data_ptr<int64_t>();
    const scalar_t* ws = has_w ? wc.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* os = oc.const_data_ptr<scalar_t>();
    const acc_t* Ws = sc.const_data_ptr<acc_t>();
    scalar_t* gxs = gx.data_ptr<scalar_t>();
    scalar_t* gws = weight_grad ? gw.data_ptr<scalar_t>() : nullptr;
    // One token per task: d out[p] / d x_i = w_i / W_p, d out[p] / d w_i = (x_i - out[p]) / W_p for
    // p = assignment[i] (zero for a token in no cluster or in a cluster whose weights sum to 0).
    at::parallel_for(0, B * N, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / N, p = as[r];
        scalar_t* gxi = gxs + r * C;
        const acc_t W = (p >= 0 && p < f) ? Ws[b * f + p] : acc_t(0);
        if (W == acc_t(0)) {
          std::fill(gxi, gxi + C, scalar_t(0));
          if (gws) gws[r] = scalar_t(0);
          continue;
        }
        const acc_t inv = acc_t(1) / W;
        const acc_t s = (ws ? acc_t(ws[r]) : acc_t(1)) * inv;
        const scalar_t* gp = g + (b * f + p) * C;
        for (int64_t c = 0; c < C; ++c) gxi[c] = static_cast<scalar_t>(s * acc_t(gp[c]));
        if (gws) {
          const scalar_t* xi = xs + r * C;
          const scalar_t* op_ = os + (b * f + p) * C;
          acc_t dot = 0;
          for (int64_t c = 0; c < C; ++c) dot += acc_t(gp[c]) * (acc_t(xi[c]) - acc_t(op_[c]));
          gws[r] = static_cast<scalar_t>(dot * inv);
        }
      }
    });
  });
  return {gx, gw};
}

}  // namespace hot_kernels
