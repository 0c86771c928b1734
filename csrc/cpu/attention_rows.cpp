// The attention core of the cpu TRA in float32: see attention_rows.h for the layouts.
//
// TRA attends L query rows (a clip's frames, 243) to the M tokens kept by the pruning (81): few keys,
// narrow heads (d = 32 or 64). ATen's CPU flash attention runs such a head as small GEMM calls with
// an online softmax; here a head's keys are packed whole into per-task scratch (K^T scaled, V padded
// to whole vectors) and every block of query rows is one register-blocked pass: logits, an exact
// softmax over the whole row (no rescaling), and the weighted sum of V. The backward gives one task a
// whole (sequence, head): P and dS for all its rows, then dK and dV summed over the rows in order, so no
// two threads write the same element and the sums do not depend on the thread count.
//
// Instruction-set paths (tpc_common.h's cpu_isa): the kernels (attention_rows_kernels.h) are
// compiled three times, each inside a `#pragma GCC target` region, on the path's own vectors: 16
// lanes (zmm) on AVX-512, 8 (ymm) on AVX2 + FMA, 4 (xmm) on the baseline, with register blocks
// sized to its register file. The AVX-512 and AVX2 paths use fused multiply-adds, the baseline
// separate multiplies and adds, and each path's row sums follow its vector width, so the paths
// agree to rounding (each within the tested tolerance of the float64 reference), not bitwise. The
// softmax exponentials are 2^t on logits pre-scaled by log2(e) (one rounding, folded into K's
// scale): a degree-6 polynomial after an exact split of t, under 1 ulp.
#include "attention_rows.h"

#include "tpc_common.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

// Contract a * b + c into FMAs where the target has them (the build's -ffp-contract=off keeps the row
// kernels of tpc_common.h bitwise equal across paths; these need not be). No loop vectoriser: the
// kernels are written on vectors already, and it re-vectorises their loops across lanes (masked
// broadcasts and spills: several times the stack traffic, measured in the object code).
#pragma GCC optimize("fp-contract=fast", "no-tree-loop-vectorize")
#pragma GCC diagnostic ignored "-Wpsabi"  // vf in internal functions only

namespace hot_kernels {
namespace attn {
namespace {

constexpr int64_t kPad = 16;  // head channels are padded to a multiple of this (whole vectors on every path)
constexpr int64_t kTaskRows = 64;   // query rows per forward task when (sequence, head) pairs are few
constexpr int64_t kMaxKeysTimesWidth = int64_t(1) << 18;  // per-task scratch bound (supported())
// The backward's per-task scratch for P and dS (and the rows they multiply) in a chunk of query rows:
// every row of HoT's shapes in one chunk (L = 243, up to 96 keys of 64 channels: 311 KB), long clips
// in chunks of this size instead of L x keys.
constexpr int64_t kBackwardChunkBytes = int64_t(512) << 10;
constexpr double kLog2e = 1.4426950408889634;  // log2(e)
constexpr float kLn2 = 0.693147180559945309f;  // ln(2)

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// ---- per-task scratch and packing -----------------------------------------------------------

struct Geometry {
  const float* q;
  int64_t q_seq_stride;
  const float* kv;
  int64_t L, M, C, H, d;
  int64_t mp, dp;  // M and d padded to whole vectors
  float scale;
  float scale_log2;  // scale * log2(e): the logits in base-2 units, for exp2 (attention_rows_kernels.h)
  const float* q_row(int64_t s, int64_t h, int64_t i) const { return q + s * q_seq_stride + i * C + h * d; }
  const float* k_row(int64_t s, int64_t h, int64_t j) const { return kv + (s * M + j) * 2 * C + h * d; }
  const float* v_row(int64_t s, int64_t h, int64_t j) const { return k_row(s, h, j) + C; }
};

// key_pad: the path's key padding (whole vectors of its width: every padding key costs a logit and
// an exponential per query row).
Geometry geometry(const at::Tensor& q, int64_t q_seq_stride, const at::Tensor& kv, int64_t L, int64_t M, int64_t H,
                  double scale, int64_t key_pad) {
  Geometry g{};
  g.q = q.data_ptr<float>();
  g.q_seq_stride = q_seq_stride;
  g.kv = kv.data_ptr<float>();
  g.L = L;
  g.M = M;
  g.C = kv.size(1) / 2;
  g.H = H;
  g.d = g.C / H;
  g.mp = round_up(M, key_pad);
  g.dp = round_up(g.d, kPad);
  g.scale = static_cast<float>(scale);
  g.scale_log2 = static_cast<float>(scale * kLog2e);
  return g;
}

// b (M rows of dp) = the rows j < M of d channels, zero channels c >= d.
inline void pack_rows(const Geometry& g, const float* first, float* b) {
  for (int64_t j = 0; j < g.M; ++j) std::memcpy(b + j * g.dp, first + j * 2 * g.C, g.d * sizeof(float));
}

// ---- the row kernels, once per instruction-set path ------------------------------------------

#if defined(HK_ISA_CLONES)
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace v4 {
constexpr int kIsa = 2;
#include "attention_rows_kernels.h"
}  // namespace v4
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace v3 {
constexpr int kIsa = 1;
#include "attention_rows_kernels.h"
}  // namespace v3
#pragma GCC pop_options
#endif
namespace generic {
constexpr int kIsa = 0;
#include "attention_rows_kernels.h"
}  // namespace generic

using ForwardTask = void (*)(const Geometry&, int64_t, int64_t, int64_t, int64_t, float*, float*);
using BackwardTask = void (*)(const Geometry&, const float*, const float*, const float*, int64_t, int64_t, float*,
                              float*);
struct Tasks {
  ForwardTask forward;
  BackwardTask backward;
  int64_t key_pad;
};

// The row kernels of the instruction-set path this call takes.
Tasks tasks() {
#if defined(HK_ISA_CLONES)
  switch (tpc::cpu_isa::level()) {
    case tpc::cpu_isa::kAvx512: return {v4::forward_task, v4::backward_task, v4::kKeyPad};
    case tpc::cpu_isa::kAvx2: return {v3::forward_task, v3::backward_task, v3::kKeyPad};
    default: break;
  }
#endif
  return {generic::forward_task, generic::backward_task, generic::kKeyPad};
}

void check_f32(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(), "attention rows: ", name,
              " must be a contiguous float32 CPU tensor");
}

}  // namespace

bool supported(int64_t M, int64_t d) {
  return M >= 1 && d >= 1 && round_up(M, kPad) * round_up(d, kPad) <= kMaxKeysTimesWidth;
}

void forward(const at::Tensor& q, int64_t q_seq_stride, const at::Tensor& kv, int64_t n, int64_t L, int64_t M,
             int64_t H, double scale, at::Tensor& o, at::Tensor& lse) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"kv", &kv}, {"o", &o}, {"lse", &lse}})
    check_f32(name, *t);
  const Tasks path = tasks();
  const Geometry g = geometry(q, q_seq_stride, kv, L, M, H, scale, path.key_pad);
  TORCH_CHECK(supported(M, g.d) && o.numel() == n * L * g.C && lse.numel() == n * H * L,
              "attention rows: unsupported or inconsistent shapes");
  // One task per (sequence, head) (its keys packed once), or row blocks of it when the pairs are too
  // few to keep the threads busy.
  const int64_t rows_per_task = n * H >= 4 * at::get_num_threads() ? L : kTaskRows;
  const int64_t row_tasks = (L + rows_per_task - 1) / rows_per_task;
  const ForwardTask task = path.forward;
  float* o_p = o.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  // Every task writes its own rows: the result does not depend on how tasks meet threads.
  at::parallel_for(0, n * H * row_tasks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t sh = t / row_tasks, s = sh / H, h = sh % H;
      const int64_t i0 = (t % row_tasks) * rows_per_task, i1 = std::min(L, i0 + rows_per_task);
      task(g, s, h, i0, i1, o_p + s * L * g.C, lse_p + (s * H + h) * L);
    }
  });
}

void backward(const at::Tensor& dO, const at::Tensor& q, int64_t q_seq_stride, const at::Tensor& kv,
              const at::Tensor& o, const at::Tensor& lse, int64_t n, int64_t L, int64_t M, int64_t H, double scale,
              at::Tensor& dq, at::Tensor& dkv) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"dO", &dO}, {"q", &q}, {"kv", &kv}, {"o", &o},
                         {"lse", &lse}, {"dq", &dq}, {"dkv", &dkv}})
    check_f32(name, *t);
  const Tasks path = tasks();
  const Geometry g = geometry(q, q_seq_stride, kv, L, M, H, scale, path.key_pad);
  TORCH_CHECK(supported(M, g.d) && dO.numel() == n * L * g.C && o.numel() == n * L * g.C &&
                  lse.numel() == n * H * L && dq.numel() == n * L * g.C && dkv.numel() == n * M * 2 * g.C,
              "attention rows: unsupported or inconsistent shapes");
  const BackwardTask task = path.backward;
  const float *dO_p = dO.data_ptr<float>(), *o_p = o.data_ptr<float>(), *lse_p = lse.data_ptr<float>();
  float *dq_p = dq.data_ptr<float>(), *dkv_p = dkv.data_ptr<float>();
  at::parallel_for(0, n * H, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) task(g, dO_p, o_p, lse_p, t / H, t % H, dq_p, dkv_p);
  });
}

}  // namespace attn
}  // namespace hot_kernels
