// Token recovering attention (DESIGN.md op 7), CPU forward and backward.
//
// out = [query +] concat_h(softmax(Q_h K_h^T * scale) V_h) Wo^T + bo, with Q = query Wq^T + bq,
// K = x Wk^T + bk, V = x Wv^T + bv; query (1 or S, L, C), x (S, M, C).
//
// Design:
//  * Every GEMM goes to BLAS through ATen (mm/addmm/bmm, strided views, no per-(s, h) loops):
//    K and V come from ONE GEMM with the stacked weight [Wk; Wv] (2C, C); the output projection is
//    one GEMM per chunk; the attention GEMMs are one (b)mm per head per chunk.
//  * A shared query (leading dim 1) is projected once: Qs = (query Wq^T + bq) * scale, (L, C).
//    Its logits for a whole chunk of sequences are then one GEMM per head, Qs_h (L, d) x
//    K_h^T (d, n*M), which lays the logits out as (H, L, n, M); in the backward the summed
//    gradient sum_s dS_s K_s is again one GEMM per head (contraction over n*M), accumulated over
//    chunks in (L, C): no S copies of query-sized tensors exist. A per-sequence query uses
//    batched GEMMs over the chunk, logits laid out as (H, n, L, M).
//  * The S sequences are processed in chunks of n so that the chunk's probabilities (H*n*L*M)
//    and its other temporaries stay within kChunkBytes (cache-friendly and bounded memory);
//    the S x H x L x M tensor never exists. The forward keeps only the row log-sum-exp
//    lse (S, H, L) (its softmax normalises o rows, not the probabilities); the backward
//    recomputes K, V, the probabilities P = exp(logits - lse) and o, and forms
//    dS = P * (dP - rowsum(dO * o)) in place of P in one fused pass.
//  * Weight/bias gradients are accumulated over chunks in a fixed order (deterministic: no
//    atomics, the same chunking for the same shapes).
//  * float16/bfloat16 are computed in float32 (chunk by chunk) and rounded once on output;
//    lse is float32 (float64 for float64 inputs).
#include "../hot_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>

namespace hot_kernels {
namespace {

constexpr const char* kFwd = "token_recovering_attention";
constexpr const char* kBwd = "token_recovering_attention_backward";

// Budget for one chunk's temporaries (probabilities dominate). Measured on HoT's shapes (S=1088,
// L=243, M=81, C=512, H=8, 2 threads): flat between 24 and 40 MB, slower below 12 MB (small
// GEMMs) and above 48 MB (the elementwise softmax passes fall out of cache).
constexpr int64_t kChunkBytes = int64_t(32) << 20;

struct Dims {
  int64_t S, Sq, L, M, C, H, d;
  bool shared;
  at::ScalarType dtype;  // input dtype
  at::ScalarType cdt;    // compute dtype
};

at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kFloat || t == at::kDouble) ? t : at::kFloat;
}

void check_tensor(const char* fn, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, fn, ": ", name, " must have the dtype of x (", dtype, "), got ",
              t.scalar_type());
}

void check_weight(const char* fn, const char* name, const at::Tensor& w, int64_t C, at::ScalarType dtype) {
  check_tensor(fn, name, w, dtype);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == C && w.size(1) == C, fn, ": ", name, " must be (C, C) = (", C, ", ",
              C, "), got ", w.sizes());
}

void check_bias(const char* fn, const char* name, const std::optional<at::Tensor>& b, int64_t C,
                at::ScalarType dtype) {
  if (!b.has_value() || !b->defined()) return;
  check_tensor(fn, name, *b, dtype);
  TORCH_CHECK(b->dim() == 1 && b->size(0) == C, fn, ": ", name, " must be (C,) = (", C, ",), got ", b->sizes());
}

bool has(const std::optional<at::Tensor>& b) { return b.has_value() && b->defined(); }

Dims check_inputs(const char* fn, const at::Tensor& query, const at::Tensor& x, const at::Tensor& wq,
                  const std::optional<at::Tensor>& bq, const at::Tensor& wk, const std::optional<at::Tensor>& bk,
                  const at::Tensor& wv, const std::optional<at::Tensor>& bv, const at::Tensor& wo,
                  const std::optional<at::Tensor>& bo, int64_t num_heads) {
  TORCH_CHECK(x.defined() && x.dim() == 3, fn, ": x must be (S, M, C), got ",
              x.defined() ? x.sizes() : at::IntArrayRef{});
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, fn,
              ": x must be float32, float64, float16 or bfloat16, got ", dtype);
  check_tensor(fn, "x", x, dtype);
  check_tensor(fn, "query", query, dtype);
  Dims D{};
  D.S = x.size(0);
  D.M = x.size(1);
  D.C = x.size(2);
  TORCH_CHECK(query.dim() == 3 && query.size(2) == D.C && (query.size(0) == 1 || query.size(0) == D.S), fn,
              ": query must be (1, L, C) or (S, L, C) with S = ", D.S, ", C = ", D.C, ", got ", query.sizes());
  D.Sq = query.size(0);
  D.L = query.size(1);
  D.shared = D.Sq == 1;
  TORCH_CHECK(num_heads > 0, fn, ": num_heads must be positive, got ", num_heads);
  TORCH_CHECK(D.C % num_heads == 0, fn, ": C = ", D.C, " must be divisible by num_heads = ", num_heads);
  D.H = num_heads;
  D.d = D.C / num_heads;
  check_weight(fn, "wq", wq, D.C, dtype);
  check_weight(fn, "wk", wk, D.C, dtype);
  check_weight(fn, "wv", wv, D.C, dtype);
  check_weight(fn, "wo", wo, D.C, dtype);
  check_bias(fn, "bq", bq, D.C, dtype);
  check_bias(fn, "bk", bk, D.C, dtype);
  check_bias(fn, "bv", bv, D.C, dtype);
  check_bias(fn, "bo", bo, D.C, dtype);
  D.dtype = dtype;
  D.cdt = compute_dtype(dtype);
  return D;
}

int64_t chunk_size(const Dims& D, bool backward) {
  const int64_t elt = D.cdt == at::kDouble ? 8 : 4;
  // per sequence: probabilities, one head's dP, K|V (and dK|dV), o per head + o (+ dO, grad).
  int64_t per_seq = D.H * D.L * D.M + D.L * D.M + 2 * D.M * D.C + 2 * D.L * D.C;
  if (backward) per_seq += 2 * D.M * D.C + 2 * D.L * D.C;
  per_seq = std::max<int64_t>(per_seq * elt, 1);
  const int64_t n_max = std::max<int64_t>(1, std::min<int64_t>(D.S, kChunkBytes / per_seq));
  // Equal chunks (no small tail): n = ceil(S / ceil(S / n_max)).
  const int64_t chunks = (D.S + n_max - 1) / n_max;
  return std::max<int64_t>(1, (D.S + chunks - 1) / std::max<int64_t>(chunks, 1));
}

// Everything the forward and the backward share: weights in the compute dtype, the projected
// shared query, and the per-chunk recomputation of K|V, Q and the logits.
struct Prepared {
  at::Tensor wq, wkv, wo;    // (C, C), (2C, C) = [Wk; Wv], (C, C); compute dtype, contiguous
  at::Tensor bq, bkv, bo;    // (C), (2C), (C) or undefined
  at::Tensor q_in_shared;    // (L, C) query[0] in compute dtype (shared only)
  at::Tensor qs_shared;      // (L, C) (query[0] Wq^T + bq) * scale (shared only)
};

at::Tensor linear2d(const at::Tensor& in, const at::Tensor& w, const at::Tensor& b) {
  return b.defined() ? at::addmm(b, in, w.t()) : at::mm(in, w.t());
}

Prepared prepare(const Dims& D, const at::Tensor& query, const at::Tensor& wq, const std::optional<at::Tensor>& bq,
                 const at::Tensor& wk, const std::optional<at::Tensor>& bk, const at::Tensor& wv,
                 const std::optional<at::Tensor>& bv, const at::Tensor& wo, const std::optional<at::Tensor>& bo,
                 double scale) {
  Prepared p;
  const auto cdt = D.cdt;
  p.wq = wq.to(cdt).contiguous();
  p.wo = wo.to(cdt).contiguous();
  p.wkv = at::cat({wk.to(cdt), wv.to(cdt)}, 0);
  if (has(bq)) p.bq = bq->to(cdt).contiguous();
  if (has(bo)) p.bo = bo->to(cdt).contiguous();
  if (has(bk) || has(bv)) {
    auto opt = wk.options().dtype(cdt);
    p.bkv = at::cat({has(bk) ? bk->to(cdt) : at::zeros({D.C}, opt), has(bv) ? bv->to(cdt) : at::zeros({D.C}, opt)});
  }
  if (D.shared) {
    p.q_in_shared = query.select(0, 0).to(cdt).contiguous();
    p.qs_shared = linear2d(p.q_in_shared, p.wq, p.bq).mul_(scale);
  }
  return p;
}

// Per-chunk state (sequences [s0, s0 + n)).
struct Chunk {
  int64_t s0, n;
  at::Tensor xc;    // (n*M, C)
  at::Tensor kv;    // (n*M, 2C): K | V
  at::Tensor q_in;  // (n*L, C) query rows (per-sequence query only)
  at::Tensor qs;    // (n*L, C) scaled projected query (per-sequence query only)
  at::Tensor buf;   // logits / probabilities: (H, L, n, M) shared, (H, n, L, M) per-sequence
};

// The (n, L, M) view of head h of the probability buffer.
at::Tensor head_probs(const Dims& D, const Chunk& c, int64_t h) {
  auto b = c.buf.select(0, h);
  return D.shared ? b.transpose(0, 1) : b;
}

// (n, H, L) -> the buffer layout of per-row values, with a trailing 1: (H, L, n, 1) for a shared
// query, (H, n, L, 1) otherwise.
at::Tensor to_buf_layout(const Dims& D, const at::Tensor& nHL) {
  return (D.shared ? nHL.permute({1, 2, 0}) : nHL.permute({1, 0, 2})).unsqueeze(-1);
}

// (H, L, n, 1) or (H, n, L, 1) -> (n, H, L).
at::Tensor from_buf_layout(const Dims& D, const at::Tensor& b) {
  auto t = b.squeeze(-1);
  return D.shared ? t.permute({2, 0, 1}) : t.permute({1, 0, 2});
}

Chunk make_chunk(const Dims& D, const Prepared& p, const at::Tensor& query, const at::Tensor& x, int64_t s0,
                 int64_t n, double scale) {
  Chunk c;
  c.s0 = s0;
  c.n = n;
  c.xc = x.narrow(0, s0, n).to(D.cdt).contiguous().view({n * D.M, D.C});
  c.kv = linear2d(c.xc, p.wkv, p.bkv);
  if (!D.shared) {
    c.q_in = query.narrow(0, s0, n).to(D.cdt).contiguous().view({n * D.L, D.C});
    c.qs = linear2d(c.q_in, p.wq, p.bq).mul_(scale);
  }
  return c;
}

// Fills c.buf with the scaled logits (Qs already holds the scale).
void compute_logits(const Dims& D, const Prepared& p, Chunk& c) {
  const int64_t n = c.n, L = D.L, M = D.M, C = D.C, d = D.d;
  auto opt = c.kv.options();
  if (D.shared) {
    c.buf = at::empty({D.H, L, n, M}, opt);
    for (int64_t h = 0; h < D.H; ++h) {
      auto out = c.buf.select(0, h).view({L, n * M});
      at::mm_out(out, p.qs_shared.narrow(1, h * d, d), c.kv.narrow(1, h * d, d).t());
    }
  } else {
    c.buf = at::empty({D.H, n, L, M}, opt);
    auto q3 = c.qs.view({n, L, C});
    auto kv3 = c.kv.view({n, M, 2 * C});
    for (int64_t h = 0; h < D.H; ++h) {
      auto out = c.buf.select(0, h);
      at::bmm_out(out, q3.narrow(2, h * d, d), kv3.narrow(2, h * d, d).transpose(1, 2));
    }
  }
}

// o (n*L, C) = concat_h(P_h V_h) from the probabilities in c.buf; when inv_rowsum (buffer layout,
// (H, L, n, 1) or (H, n, L, 1)) is given, c.buf holds unnormalised exp(logits - max) and each row
// of the result is scaled by it (cheaper than normalising the probabilities: C < H*M values per
// query row, and it rides on the head-interleaving copy).
at::Tensor attention_output(const Dims& D, const Chunk& c, const at::Tensor& inv_rowsum = at::Tensor()) {
  const int64_t n = c.n, L = D.L, M = D.M, C = D.C, d = D.d;
  if (M == 0) return at::zeros({n * L, C}, c.kv.options());
  auto oh = at::empty({D.H, n, L, d}, c.kv.options());
  auto kv3 = c.kv.view({n, M, 2 * C});
  for (int64_t h = 0; h < D.H; ++h) {
    auto out = oh.select(0, h);
    at::bmm_out(out, head_probs(D, c, h), kv3.narrow(2, C + h * d, d));
  }
  auto o = at::empty({n, L, D.H, d}, c.kv.options());
  if (inv_rowsum.defined()) {
    auto inv = D.shared ? inv_rowsum.permute({2, 1, 0, 3}) : inv_rowsum.permute({1, 2, 0, 3});  // (n, L, H, 1)
    at::mul_out(o, oh.permute({1, 2, 0, 3}), inv);
  } else {
    o.copy_(oh.permute({1, 2, 0, 3}));
  }
  return o.view({n * L, C});
}

// P (n, L, M) (last dim contiguous, any other strides) := P * (dP - Dsum[:, :, h]) with dP (n, L, M)
// and Dsum (n, L, H) contiguous. One pass, vectorisable inner loop, rows split across threads.
void softmax_grad_(at::Tensor& P, const at::Tensor& dP, const at::Tensor& Dsum, int64_t h) {
  const int64_t n = P.size(0), L = P.size(1), M = P.size(2), H = Dsum.size(2);
  TORCH_INTERNAL_ASSERT(P.stride(2) == 1 && dP.is_contiguous() && Dsum.is_contiguous());
  const int64_t ps0 = P.stride(0), ps1 = P.stride(1);
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "token_recovering_attention_softmax_grad", [&] {
    scalar_t* pp = P.data_ptr<scalar_t>();
    const scalar_t* pdp = dP.const_data_ptr<scalar_t>();
    const scalar_t* pd = Dsum.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(M, 1));
    at::parallel_for(0, n * L, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t s = i / L, l = i - s * L;
        scalar_t* prow = pp + s * ps0 + l * ps1;
        const scalar_t* dprow = pdp + i * M;
        const scalar_t dv = pd[i * H + h];
        for (int64_t m = 0; m < M; ++m) prow[m] *= dprow[m] - dv;
      }
    });
  });
}

}  // namespace

std::vector<at::Tensor> token_recovering_attention_cpu(
    const at::Tensor& query, const at::Tensor& x, const at::Tensor& wq, const std::optional<at::Tensor>& bq,
    const at::Tensor& wk, const std::optional<at::Tensor>& bk, const at::Tensor& wv,
    const std::optional<at::Tensor>& bv, const at::Tensor& wo, const std::optional<at::Tensor>& bo,
    int64_t num_heads, double scale, bool residual) {
  const Dims D = check_inputs(kFwd, query, x, wq, bq, wk, bk, wv, bv, wo, bo, num_heads);
  const int64_t S = D.S, L = D.L, M = D.M, C = D.C;
  auto out = at::empty({S, L, C}, x.options());
  auto lse = at::empty({S, D.H, L}, x.options().dtype(D.cdt));
  if (S == 0) return {out, lse};
  const Prepared p = prepare(D, query, wq, bq, wk, bk, wv, bv, wo, bo, scale);
  const bool same_dtype = D.cdt == D.dtype;
  const int64_t cs = chunk_size(D, false);
  at::Tensor resid_shared;  // (L, C) query + bo, added to every sequence's output
  if (D.shared && residual) resid_shared = p.bo.defined() ? p.q_in_shared + p.bo : p.q_in_shared;

  for (int64_t s0 = 0; s0 < S; s0 += cs) {
    const int64_t n = std::min(cs, S - s0);
    Chunk c = make_chunk(D, p, query, x, s0, n, scale);
    auto lse_c = lse.narrow(0, s0, n);  // (n, H, L)
    at::Tensor inv_rowsum;
    if (M > 0) {
      compute_logits(D, p, c);
      // Row softmax, keeping the log-sum-exp: E = exp(l - m) in place, lse = m + log(sum E); the
      // normalisation 1 / sum E is applied to o instead of to E.
      auto m = at::amax(c.buf, {-1}, /*keepdim=*/true);
      c.buf.sub_(m).exp_();
      auto ssum = c.buf.sum(-1, /*keepdim=*/true);
      inv_rowsum = at::reciprocal(ssum);
      lse_c.copy_(from_buf_layout(D, m.add_(ssum.log_())));
    } else {
      lse_c.fill_(-std::numeric_limits<double>::infinity());
    }
    auto o = attention_output(D, c, inv_rowsum);
    c.buf.reset();
    at::Tensor y = same_dtype ? out.narrow(0, s0, n).view({n * L, C}) : at::empty({n * L, C}, o.options());
    if (D.shared && residual) {
      at::mm_out(y, o, p.wo.t());
      y.view({n, L, C}).add_(resid_shared);  // query (+ bo): one pass
    } else {
      if (p.bo.defined())
        at::addmm_out(y, p.bo, o, p.wo.t());
      else
        at::mm_out(y, o, p.wo.t());
      if (residual) y.view({n, L, C}).add_(c.q_in.view({n, L, C}));
    }
    if (!same_dtype) out.narrow(0, s0, n).view({n * L, C}).copy_(y);
  }
  return {out, lse};
}

std::vector<at::Tensor> token_recovering_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& x, const at::Tensor& wq,
    const std::optional<at::Tensor>& bq, const at::Tensor& wk, const std::optional<at::Tensor>& bk,
    const at::Tensor& wv, const std::optional<at::Tensor>& bv, const at::Tensor& wo,
    const std::optional<at::Tensor>& bo, const at::Tensor& lse, int64_t num_heads, double scale, bool residual) {
  const Dims D = check_inputs(kBwd, query, x, wq, bq, wk, bk, wv, bv, wo, bo, num_heads);
  const int64_t S = D.S, L = D.L, M = D.M, C = D.C, H = D.H, d = D.d;
  check_tensor(kBwd, "grad_out", grad_out, D.dtype);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == S && grad_out.size(1) == L && grad_out.size(2) == C, kBwd,
              ": grad_out must be (S, L, C) = (", S, ", ", L, ", ", C, "), got ", grad_out.sizes());
  TORCH_CHECK(lse.defined() && lse.device().is_cpu(), kBwd, ": lse must be a CPU tensor");
  TORCH_CHECK(lse.scalar_type() == at::kFloat || lse.scalar_type() == at::kDouble, kBwd,
              ": lse must be float32 or float64, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == S && lse.size(1) == H && lse.size(2) == L, kBwd,
              ": lse must be (S, H, L) = (", S, ", ", H, ", ", L, "), got ", lse.sizes());

  const auto copt = x.options().dtype(D.cdt);
  const bool same_dtype = D.cdt == D.dtype;
  auto dx = at::empty({S, M, C}, x.options());
  auto d_wq = at::zeros({C, C}, copt);
  auto d_wkv = at::zeros({2 * C, C}, copt);
  auto d_wo = at::zeros({C, C}, copt);
  auto d_bq = at::zeros({C}, copt);
  auto d_bkv = at::zeros({2 * C}, copt);
  auto d_bo = at::zeros({C}, copt);
  at::Tensor d_query;  // compute dtype; per-sequence: filled chunk by chunk
  at::Tensor dq_sum, g_sum;  // shared: sum_s dQs_s (unscaled) and sum_s grad_out_s, (L, C)
  if (D.shared) {
    dq_sum = at::zeros({L, C}, copt);
    g_sum = at::zeros({L, C}, copt);
  } else {
    d_query = at::empty({S, L, C}, query.options());
  }

  const Prepared p = S > 0 ? prepare(D, query, wq, bq, wk, bk, wv, bv, wo, bo, scale) : Prepared{};
  const int64_t cs = chunk_size(D, true);

  for (int64_t s0 = 0; s0 < S; s0 += cs) {
    const int64_t n = std::min(cs, S - s0);
    Chunk c = make_chunk(D, p, query, x, s0, n, scale);
    auto g = grad_out.narrow(0, s0, n).to(D.cdt).contiguous().view({n * L, C});
    // dK | dV and (per-sequence query) dQs (unscaled): every element is written below.
    auto dkv = M > 0 ? at::empty({n * M, 2 * C}, copt) : at::zeros({n * M, 2 * C}, copt);
    at::Tensor dq_c;
    if (!D.shared) dq_c = M > 0 ? at::empty({n * L, C}, copt) : at::zeros({n * L, C}, copt);
    at::Tensor o;
    if (M > 0) {
      // P = exp(logits - lse), in place.
      compute_logits(D, p, c);
      auto lse_c = lse.narrow(0, s0, n).to(D.cdt);
      c.buf.sub_(to_buf_layout(D, lse_c)).exp_();
      o = attention_output(D, c);
      auto dO = at::mm(g, p.wo);  // (n*L, C)
      // rowsum(dO_h * o_h): (n, L, H)
      auto Dsum = (dO * o).view({n, L, H, d}).sum(-1);
      auto dO3 = dO.view({n, L, C});
      auto kv3 = c.kv.view({n, M, 2 * C});
      auto dkv3 = dkv.view({n, M, 2 * C});
      for (int64_t h = 0; h < H; ++h) {
        auto P = head_probs(D, c, h);  // (n, L, M)
        auto dOh = dO3.narrow(2, h * d, d);
        auto Kh = kv3.narrow(2, h * d, d);
        auto Vh = kv3.narrow(2, C + h * d, d);
        dkv3.narrow(2, C + h * d, d).copy_(at::bmm(P.transpose(1, 2), dOh));  // dV_h = P^T dO_h
        auto dP = at::bmm(dOh, Vh.transpose(1, 2));                               // (n, L, M)
        softmax_grad_(P, dP, Dsum, h);  // P_h := dS_h = P * (dP - rowsum(dO * o))
        if (D.shared) {
          auto dS = c.buf.select(0, h).view({L, n * M});
          auto Kh2 = c.kv.narrow(1, h * d, d);  // (n*M, d)
          dq_sum.narrow(1, h * d, d).addmm_(dS, Kh2);
          dkv.narrow(1, h * d, d).copy_(at::mm(dS.t(), p.qs_shared.narrow(1, h * d, d)));  // dK_h = dS^T Qs_h
        } else {
          dq_c.view({n, L, C}).narrow(2, h * d, d).copy_(at::bmm(P, Kh));
          dkv3.narrow(2, h * d, d).copy_(at::bmm(P.transpose(1, 2), c.qs.view({n, L, C}).narrow(2, h * d, d)));
        }
      }
      c.buf.reset();
    } else {
      o = at::zeros({n * L, C}, copt);
    }
    // Output projection.
    d_wo.addmm_(g.t(), o);
    if (has(bo)) d_bo.add_(g.sum(0));
    // K|V projections.
    auto dx_c = dx.narrow(0, s0, n).view({n * M, C});
    if (same_dtype)
      at::mm_out(dx_c, dkv, p.wkv);
    else
      dx_c.copy_(at::mm(dkv, p.wkv));
    d_wkv.addmm_(dkv.t(), c.xc);
    if (has(bk) || has(bv)) d_bkv.add_(dkv.sum(0));
    // Query.
    if (D.shared) {
      if (residual) g_sum.add_(g.view({n, L, C}).sum(0));
    } else {
      dq_c.mul_(scale);
      auto dqin = at::mm(dq_c, p.wq);
      if (residual) dqin.add_(g);
      d_query.narrow(0, s0, n).view({n * L, C}).copy_(dqin);
      d_wq.addmm_(dq_c.t(), c.q_in);
      if (has(bq)) d_bq.add_(dq_c.sum(0));
    }
  }

  if (D.shared) {
    at::Tensor dq = g_sum;  // zeros when not residual
    if (S > 0) {
      dq_sum.mul_(scale);
      dq.addmm_(dq_sum, p.wq);
      d_wq.addmm_(dq_sum.t(), p.q_in_shared);
      if (has(bq)) d_bq.copy_(dq_sum.sum(0));
    }
    d_query = dq.unsqueeze(0).to(D.dtype);
  }
  // Every returned tensor owns its storage: the torch.library op forbids outputs that alias each
  // other (the k/v halves of the fused d_wkv/d_bkv, a shared empty bias) or an input.
  auto owned = [&](const at::Tensor& t) { return t.to(D.dtype).clone(at::MemoryFormat::Contiguous); };
  auto outb = [&](const at::Tensor& t, const std::optional<at::Tensor>& b) {
    return has(b) ? owned(t) : at::empty({0}, x.options());
  };
  return {d_query,
          dx,
          d_wq.to(D.dtype),
          outb(d_bq, bq),
          owned(d_wkv.narrow(0, 0, C)),
          outb(d_bkv.narrow(0, 0, C), bk),
          owned(d_wkv.narrow(0, C, C)),
          outb(d_bkv.narrow(0, C, C), bv),
          d_wo.to(D.dtype),
          outb(d_bo, bo)};
}

}  // namespace hot_kernels
