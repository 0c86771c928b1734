// Token recovering attention (DESIGN.md op 7), CPU forward and backward.
//
// out = [query +] concat_h(softmax(Q_h K_h^T * scale) V_h) Wo^T + bo, with Q = query Wq^T + bq,
// K = x Wk^T + bk, V = x Wv^T + bv; query (1 or S, L, C), x (S, M, C).
//
// Design:
//  * The attention core in float32 (also for float16/bfloat16 inputs) is attention_rows.h: a head's
//    M keys packed whole per task, 4-row register blocks with an exact softmax per row, reading Q
//    and K|V in place and writing o, dQ and dK|dV as head-interleaved rows; no (L, M) matrix in
//    memory and no thread-count dependence. Measured against ATen's CPU flash attention on HoT's
//    shapes (S = 17, L = 243, M = 81, 2 threads, Ice Lake): forward 0.61-0.74x its time, backward
//    0.85-0.92x. float64 (and float32 heads past the row kernels' scratch bound) run ATen's flash
//    attention (at::_scaled_dot_product_flash_attention_for_cpu and its backward, on (n, H, *, d)
//    views). Around it the GEMMs go to BLAS through ATen (gemm_fixed.h): K and V come from ONE GEMM
//    with the stacked weight [Wk; Wv] (2C, C).
//  * A shared query (leading dim 1) is projected once: Q = query Wq^T + bq, (L, C), and enters the
//    attention as a stride-0 view over the sequences (no S copies). In the backward its gradient is
//    the sum over sequences of dQ_s, reduced chunk by chunk in a fixed order.
//  * The S sequences are processed in chunks of n so that a chunk's temporaries stay within
//    kChunkBytes; a float32/float64 forward that keeps K|V and o (below) holds them for every
//    sequence anyway, so it runs as one chunk and keeps the attention's own output (no copy). The
//    forward returns the row log-sum-exp lse (S, H, L) and, when the caller will differentiate
//    (keep), K|V and the attention output o as well: the memory autograd keeps for the same layers
//    written with nn.Linear and SDPA, and the backward then skips a K|V GEMM and an attention forward.
//    Without them (or for a per-sequence query's Q) it recomputes from the inputs; both ways give
//    bitwise the same gradients (the recomputation is deterministic).
//  * Weight/bias gradients are accumulated over chunks in a fixed order (no atomics, the same
//    chunking for the same shapes whatever the thread count).
//  * float16/bfloat16 are computed in float32 (chunk by chunk) and rounded once on output;
//    lse is float32 (float64 for float64 inputs).
//  * Every tensor the op keeps to itself (the temporaries, the stacked weight, the kept K|V and o)
//    comes from scratch_cache.h: buffers kept between calls, so that no call pays the page faults of
//    fresh memory. The tensors the user gets (out, the gradients) are plain allocations.
#include "../hot_kernels.h"
#include "attention_rows.h"
#include "gemm_fixed.h"
#include "scratch_cache.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>


#include <algorithm>
#include <exception>
#include <limits>

namespace hot_kernels {
namespace {

constexpr const char* kFwd = "token_recovering_attention";
constexpr const char* kBwd = "token_recovering_attention_backward";

// Budget for one chunk's temporaries. Forward: measured on HoT's shapes (S=1088, L=243, M=81,
// C=512, H=8, 2 threads) when the probabilities were materialised: flat between 24 and 40 MB,
// slower below 12 MB (small GEMMs). Backward: its chunks are GEMMs of n*L rows into the weight
// gradients, and larger ones run faster (fp32, 2 threads, Ice Lake, forward+backward at C = 512:
// 414 -> 399 ms at S = 68, 89.7 -> 85.3 ms at S = 17 from 32 to 128 MB; no gain beyond); the
// whole-batch gradients of the same layers written with nn.Linear and SDPA take more.
constexpr int64_t kChunkBytes = int64_t(32) << 20;
constexpr int64_t kChunkBytesBackward = int64_t(128) << 20;

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
  // per sequence: K|V, o, ATen's attention output layout copy, per-sequence Q; backward: dK|dV,
  // dO, dQ and the gradient rows.
  int64_t per_seq = 2 * D.M * D.C + 3 * D.L * D.C;
  if (backward) per_seq += 2 * D.M * D.C + 3 * D.L * D.C;
  per_seq = std::max<int64_t>(per_seq * elt, 1);
  const int64_t budget = backward ? kChunkBytesBackward : kChunkBytes;
  const int64_t n_max = std::max<int64_t>(1, std::min<int64_t>(D.S, budget / per_seq));
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
  at::Tensor qs_shared;      // (L, C) query[0] Wq^T + bq (shared only)
};

// in w^T + b into a scratch tensor (scratch_cache.h): every projection made here is a temporary of the call.
at::Tensor linear2d(const at::Tensor& in, const at::Tensor& w, const at::Tensor& b) {
  return mm_fixed_scratch(in, w.t(), b);
}

Prepared prepare(const Dims& D, const at::Tensor& query, const at::Tensor& wq, const std::optional<at::Tensor>& bq,
                 const at::Tensor& wk, const std::optional<at::Tensor>& bk, const at::Tensor& wv,
                 const std::optional<at::Tensor>& bv, const at::Tensor& wo, const std::optional<at::Tensor>& bo) {
  Prepared p;
  const auto cdt = D.cdt;
  p.wq = wq.to(cdt).contiguous();
  p.wo = wo.to(cdt).contiguous();
  p.wkv = scratch_cache::empty({2 * D.C, D.C}, cdt);
  p.wkv.narrow(0, 0, D.C).copy_(wk);
  p.wkv.narrow(0, D.C, D.C).copy_(wv);
  if (has(bq)) p.bq = bq->to(cdt).contiguous();
  if (has(bo)) p.bo = bo->to(cdt).contiguous();
  if (has(bk) || has(bv)) {
    auto opt = wk.options().dtype(cdt);
    p.bkv = at::cat({has(bk) ? bk->to(cdt) : at::zeros({D.C}, opt), has(bv) ? bv->to(cdt) : at::zeros({D.C}, opt)});
  }
  if (D.shared) {
    p.q_in_shared = query.select(0, 0).to(cdt).contiguous();
    p.qs_shared = linear2d(p.q_in_shared, p.wq, p.bq);
  }
  return p;
}

// Per-chunk state (sequences [s0, s0 + n)).
struct Chunk {
  int64_t s0, n;
  at::Tensor xc;    // (n*M, C)
  at::Tensor kv;    // (n*M, 2C): K | V
  at::Tensor q_in;  // (n*L, C) query rows (per-sequence query only)
  at::Tensor qs;    // (n*L, C) projected query (per-sequence query only)
};

// kv_all: the whole (S*M, 2C) K|V buffer, or undefined. fill_kv: compute the chunk's rows into it
// (forward with keep); else they are read from it (backward); with no buffer they are computed.
Chunk make_chunk(const Dims& D, const Prepared& p, const at::Tensor& query, const at::Tensor& x, int64_t s0,
                 int64_t n, const at::Tensor& kv_all = {}, bool fill_kv = false) {
  Chunk c;
  c.s0 = s0;
  c.n = n;
  c.xc = x.narrow(0, s0, n).to(D.cdt).contiguous().view({n * D.M, D.C});
  if (!kv_all.defined()) {
    c.kv = linear2d(c.xc, p.wkv, p.bkv);
  } else {
    c.kv = kv_all.narrow(0, s0 * D.M, n * D.M);
    if (fill_kv) gemm_fixed(c.kv, c.xc, p.wkv.t(), p.bkv);
  }
  if (!D.shared) {
    c.q_in = query.narrow(0, s0, n).to(D.cdt).contiguous().view({n * D.L, D.C});
    c.qs = linear2d(c.q_in, p.wq, p.bq);
  }
  return c;
}

// Rows (n*rows, C) of head-interleaved channels -> the (n, H, rows, d) view the attention reads.
at::Tensor heads_view(const at::Tensor& rows2d, int64_t n, int64_t rows, const Dims& D) {
  return rows2d.view({n, rows, D.H, D.d}).transpose(1, 2);
}

// The chunk's attention operands, (n, H, *, d) views: Q (a stride-0 view of the shared query), K, V.
std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv(const Dims& D, const Prepared& p, const Chunk& c) {
  const int64_t n = c.n, M = D.M, C = D.C;
  at::Tensor q = D.shared ? heads_view(p.qs_shared, 1, D.L, D).expand({n, D.H, D.L, D.d})
                          : heads_view(c.qs, n, D.L, D);
  auto k = heads_view(c.kv.view({n * M, 2 * C}).narrow(1, 0, C), n, M, D);
  auto v = heads_view(c.kv.view({n * M, 2 * C}).narrow(1, C, C), n, M, D);
  return {q, k, v};
}

// Whether the chunk's attention runs on the float32 row kernels (attention_rows.h) rather than on
// ATen's flash attention (float64, or keys too many to hold whole per task).
bool rows_kernel(const Dims& D) { return D.cdt == at::kFloat && attn::supported(D.M, D.d); }

// The query rows the row kernels read: (L, C) shared (sequence stride 0) or the chunk's (n*L, C).
std::pair<const at::Tensor&, int64_t> query_rows(const Dims& D, const Prepared& p, const Chunk& c) {
  return {D.shared ? p.qs_shared : c.qs, D.shared ? 0 : D.L * D.C};
}

// (o (n, H, L, d), lse (n, H, L)) of the chunk on ATen's flash attention; M > 0.
std::tuple<at::Tensor, at::Tensor> attend(const Dims& D, const Prepared& p, const Chunk& c, double scale) {
  auto [q, k, v] = qkv(D, p, c);
  return at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, false, std::nullopt, scale);
}

// (n, H, rows, d) -> (n*rows, C) head-interleaved rows: a view when the layout allows it (the flash
// kernel writes (n, rows, H, d) memory), else a copy.
at::Tensor rows_of(const at::Tensor& nHrd) {
  return nHrd.transpose(1, 2).reshape({nHrd.size(0) * nHrd.size(2), nHrd.size(1) * nHrd.size(3)});
}

}  // namespace

std::vector<at::Tensor> token_recovering_attention_cpu(
    const at::Tensor& query, const at::Tensor& x, const at::Tensor& wq, const std::optional<at::Tensor>& bq,
    const at::Tensor& wk, const std::optional<at::Tensor>& bk, const at::Tensor& wv,
    const std::optional<at::Tensor>& bv, const at::Tensor& wo, const std::optional<at::Tensor>& bo,
    int64_t num_heads, double scale, bool residual, bool keep) {
  const Dims D = check_inputs(kFwd, query, x, wq, bq, wk, bk, wv, bv, wo, bo, num_heads);
  const int64_t S = D.S, L = D.L, M = D.M, C = D.C;
  const auto copt = x.options().dtype(D.cdt);
  auto out = at::empty({S, L, C}, x.options());
  auto lse = at::empty({S, D.H, L}, copt);
  // Kept K|V and o are the op's own (saved for its backward, never handed to the user): cached buffers.
  auto kv_all = keep ? scratch_cache::empty({S * M, 2 * C}, D.cdt) : at::empty({0}, copt);
  const bool same_dtype = D.cdt == D.dtype;
  // Kept K|V and o hold every sequence anyway: one chunk, and o is the attention's own output. Not
  // for float16/bfloat16, whose output projection needs a float32 temporary per chunk.
  const bool one_chunk = keep && same_dtype;
  auto o_all = keep && !one_chunk ? scratch_cache::empty({S * L, C}, D.cdt) : at::empty({0}, copt);  // one chunk: set below
  if (S == 0) return {out, lse, kv_all, o_all};
  const Prepared p = prepare(D, query, wq, bq, wk, bk, wv, bv, wo, bo);
  const int64_t cs = one_chunk ? S : chunk_size(D, false);
  at::Tensor resid_shared;  // (L, C) query + bo, added to every sequence's output
  if (D.shared && residual) {
    resid_shared = scratch_cache::empty({L, C}, D.cdt);
    if (p.bo.defined())
      at::add_out(resid_shared, p.q_in_shared, p.bo);
    else
      resid_shared.copy_(p.q_in_shared);
  }

  for (int64_t s0 = 0; s0 < S; s0 += cs) {
    const int64_t n = std::min(cs, S - s0);
    Chunk c = make_chunk(D, p, query, x, s0, n, keep ? kv_all : at::Tensor(), true);
    auto lse_c = lse.narrow(0, s0, n);  // (n, H, L)
    at::Tensor o;
    if (M > 0 && rows_kernel(D)) {  // written in place: into the kept o, or a temporary
      o = keep && !one_chunk ? o_all.narrow(0, s0 * L, n * L) : scratch_cache::empty({n * L, C}, D.cdt);
      const auto [q_rows, q_seq_stride] = query_rows(D, p, c);
      attn::forward(q_rows, q_seq_stride, c.kv, n, L, M, D.H, scale, o, lse_c);
      if (one_chunk) o_all = o;
    } else {
      if (M > 0) {
        auto [oh, lse_h] = attend(D, p, c, scale);
        lse_c.copy_(lse_h);
        o = rows_of(oh);
      } else {
        lse_c.fill_(-std::numeric_limits<double>::infinity());
        o = at::zeros({n * L, C}, copt);
      }
      if (one_chunk)
        o_all = o = o.contiguous();
      else if (keep)
        o = o_all.narrow(0, s0 * L, n * L).copy_(o);
    }
    at::Tensor y = same_dtype ? out.narrow(0, s0, n).view({n * L, C}) : scratch_cache::empty({n * L, C}, D.cdt);
    if (D.shared && residual) {
      gemm_fixed(y, o, p.wo.t());
      y.view({n, L, C}).add_(resid_shared);  // query (+ bo): one pass
    } else {
      if (p.bo.defined())
        gemm_fixed(y, o, p.wo.t(), p.bo);
      else
        gemm_fixed(y, o, p.wo.t());
      if (residual) y.view({n, L, C}).add_(c.q_in.view({n, L, C}));
    }
    if (!same_dtype) out.narrow(0, s0, n).view({n * L, C}).copy_(y);
  }
  return {out, lse, kv_all, o_all};
}

std::vector<at::Tensor> token_recovering_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& x, const at::Tensor& wq,
    const std::optional<at::Tensor>& bq, const at::Tensor& wk, const std::optional<at::Tensor>& bk,
    const at::Tensor& wv, const std::optional<at::Tensor>& bv, const at::Tensor& wo,
    const std::optional<at::Tensor>& bo, const at::Tensor& lse, const at::Tensor& kv, const at::Tensor& o_kept,
    int64_t num_heads, double scale, bool residual) {
  const Dims D = check_inputs(kBwd, query, x, wq, bq, wk, bk, wv, bv, wo, bo, num_heads);
  const int64_t S = D.S, L = D.L, M = D.M, C = D.C, H = D.H;
  check_tensor(kBwd, "grad_out", grad_out, D.dtype);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == S && grad_out.size(1) == L && grad_out.size(2) == C, kBwd,
              ": grad_out must be (S, L, C) = (", S, ", ", L, ", ", C, "), got ", grad_out.sizes());
  TORCH_CHECK(lse.defined() && lse.device().is_cpu(), kBwd, ": lse must be a CPU tensor");
  TORCH_CHECK(lse.scalar_type() == at::kFloat || lse.scalar_type() == at::kDouble, kBwd,
              ": lse must be float32 or float64, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == S && lse.size(1) == H && lse.size(2) == L, kBwd,
              ": lse must be (S, H, L) = (", S, ", ", H, ", ", L, "), got ", lse.sizes());
  // The forward's kept K|V and o: both or neither, exactly as the forward made them.
  const bool kept = kv.defined() && kv.numel() > 0;
  TORCH_CHECK(kept == (o_kept.defined() && o_kept.numel() > 0), kBwd, ": kv and o must both be kept or both empty");
  if (kept) {
    for (auto [name, t, rows, cols] : {std::tuple<const char*, const at::Tensor*, int64_t, int64_t>{"kv", &kv, S * M, 2 * C},
                                       {"o", &o_kept, S * L, C}}) {
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == D.cdt && t->is_contiguous() && t->dim() == 2 &&
                      t->size(0) == rows && t->size(1) == cols,
                  kBwd, ": ", name, " must be the forward's contiguous (", rows, ", ", cols, ") ", D.cdt,
                  " CPU tensor, got ", t->sizes(), " ", t->scalar_type());
    }
  }

  const auto copt = x.options().dtype(D.cdt);
  const bool same_dtype = D.cdt == D.dtype;
  auto dx = at::empty({S, M, C}, x.options());
  auto d_wq = at::zeros({C, C}, copt);
  auto d_wkv = scratch_cache::zeros({2 * C, C}, D.cdt);  // returned as owned copies of its halves
  auto d_wo = at::zeros({C, C}, copt);
  auto d_bq = at::zeros({C}, copt);
  auto d_bkv = at::zeros({2 * C}, copt);
  auto d_bo = at::zeros({C}, copt);
  at::Tensor d_query;  // compute dtype; per-sequence: filled chunk by chunk
  at::Tensor dq_sum, g_sum;  // shared: sum_s dQ_s and sum_s grad_out_s, (L, C)
  if (D.shared) {
    dq_sum = scratch_cache::zeros({L, C}, D.cdt);
    g_sum = at::zeros({L, C}, copt);
  } else {
    d_query = at::empty({S, L, C}, query.options());
  }

  const Prepared p = S > 0 ? prepare(D, query, wq, bq, wk, bk, wv, bv, wo, bo) : Prepared{};
  const int64_t cs = chunk_size(D, true);

  for (int64_t s0 = 0; s0 < S; s0 += cs) {
    const int64_t n = std::min(cs, S - s0);
    Chunk c = make_chunk(D, p, query, x, s0, n, kept ? kv : at::Tensor(), false);
    auto g = grad_out.narrow(0, s0, n).to(D.cdt).contiguous().view({n * L, C});
    at::Tensor o, dkv, dq_c;  // (n*L, C), (n*M, 2C) = dK | dV, (n*L, C) per-sequence dQ
    if (M > 0 && rows_kernel(D)) {
      const auto [q_rows, q_seq_stride] = query_rows(D, p, c);
      if (kept) {
        o = o_kept.narrow(0, s0 * L, n * L);
      } else {  // computed again: bitwise the forward's (deterministic); its lse is the one passed in
        o = scratch_cache::empty({n * L, C}, D.cdt);
        auto lse_again = scratch_cache::empty({n, H, L}, D.cdt);
        attn::forward(q_rows, q_seq_stride, c.kv, n, L, M, H, scale, o, lse_again);
      }
      auto lse_c = lse.narrow(0, s0, n).to(D.cdt).contiguous();
      auto dO = mm_fixed_scratch(g, p.wo);  // (n*L, C)
      auto dq_rows = scratch_cache::empty({n * L, C}, D.cdt);
      dkv = scratch_cache::empty({n * M, 2 * C}, D.cdt);
      attn::backward(dO, q_rows, q_seq_stride, c.kv, o, lse_c, n, L, M, H, scale, dq_rows, dkv);
      if (D.shared)
        dq_sum.add_(dq_rows.view({n, L, C}).sum(0));  // sum over the chunk's sequences
      else
        dq_c = dq_rows;
    } else if (M > 0) {
      auto [q, k, v] = qkv(D, p, c);
      at::Tensor oh;  // (n, H, L, d): kept, or computed again (bitwise the forward's: deterministic)
      if (kept)
        oh = heads_view(o_kept.narrow(0, s0 * L, n * L), n, L, D);
      else
        oh = std::get<0>(attend(D, p, c, scale));
      auto lse_c = lse.narrow(0, s0, n).to(D.cdt);
      auto dO = heads_view(mm_fixed_scratch(g, p.wo), n, L, D);  // (n, H, L, d)
      auto [dq, dk, dv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
          dO, q, k, v, oh, lse_c, 0.0, false, std::nullopt, scale);
      o = rows_of(oh);
      // dK | dV rows: one copy each out of the attention's (n, H, M, d) gradients.
      dkv = scratch_cache::empty({n * M, 2 * C}, D.cdt);
      dkv.narrow(1, 0, C).view({n, M, H, D.d}).copy_(dk.transpose(1, 2));
      dkv.narrow(1, C, C).view({n, M, H, D.d}).copy_(dv.transpose(1, 2));
      if (D.shared)
        dq_sum.add_(dq.sum(0).transpose(0, 1).reshape({L, C}));  // sum over the chunk's sequences
      else
        dq_c = rows_of(dq);
    } else {
      o = at::zeros({n * L, C}, copt);
      dkv = at::zeros({n * M, 2 * C}, copt);
      if (!D.shared) dq_c = at::zeros({n * L, C}, copt);
    }
    // Output projection. The chunk's grad_out summed over its sequences, (L, C), serves both d_bo
    // (then summed over the rows) and a shared residual query's gradient: one pass over g.
    gemm_fixed(d_wo, g.t(), o, {}, true);
    const bool want_g_seq_sum = has(bo) || (D.shared && residual);
    const at::Tensor g_seq_sum = want_g_seq_sum ? g.view({n, L, C}).sum(0) : at::Tensor();
    if (has(bo)) d_bo.add_(g_seq_sum.sum(0));
    // K|V projections.
    auto dx_c = dx.narrow(0, s0, n).view({n * M, C});
    if (same_dtype)
      gemm_fixed(dx_c, dkv, p.wkv);
    else
      dx_c.copy_(mm_fixed_scratch(dkv, p.wkv));
    gemm_fixed(d_wkv, dkv.t(), c.xc, {}, true);
    if (has(bk) || has(bv)) d_bkv.add_(dkv.sum(0));
    // Query.
    if (D.shared) {
      if (residual) g_sum.add_(g_seq_sum);
    } else {
      auto dqin = mm_fixed_scratch(dq_c, p.wq);
      if (residual) dqin.add_(g);
      d_query.narrow(0, s0, n).view({n * L, C}).copy_(dqin);
      gemm_fixed(d_wq, dq_c.t(), c.q_in, {}, true);
      if (has(bq)) d_bq.add_(dq_c.sum(0));
    }
  }

  if (D.shared) {
    at::Tensor dq = g_sum;  // zeros when not residual
    if (S > 0) {
      gemm_fixed(dq, dq_sum, p.wq, {}, true);
      gemm_fixed(d_wq, dq_sum.t(), p.q_in_shared, {}, true);
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
