// The TPC selection ops on CUDA: knn_density, dpc_delta, topf_select and the fused dpc_knn.
//
// Semantics: ../../shared/DESIGN.md and hot_kernels/reference.py; distance scheme and selection
// machinery: tpc_cuda_common.cuh. No B x N x N tensor is ever formed: every kernel streams column
// tiles through the Gram engine and keeps per-row state (memory O(B N C) for the input, O(B N) for
// the statistics). All launches go to the current stream; no host synchronisation; deterministic
// (no float atomics; integer shared-memory atomics only count).
//
// Kernels (grid: one block per (row tile of kRT = 32 tokens, sample), flattened in x; 256 threads):
//  * density_kernel: rows' (k - 1) nearest other tokens (Gram candidates, refined exactly) -> log rho
//    (or rho), and each real row's largest Gram e to a real token (for the densest token's delta).
//  * delta_kernel: rows' nearest higher token (4 Gram candidates, refined) -> delta / parent, or the
//    score delta * exp(log rho); fused mode: the last block of each sample to finish (an integer
//    counter per sample) runs that sample's top-f selection.
//  * assign_kernel: rows' nearest kept token (4 Gram candidates, refined) -> position in index.
//  * topf_kernel: one block per row of scores: the top-f selection alone.
//
// Launches: knn_density 1, dpc_delta 2 (row maxima, then delta), topf_select 1, dpc_knn 2 (density,
// delta + selection), 3 with return_assignment.
#ifndef TPC_EMULATE
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "../hot_kernels.h"
#include "tpc_cuda_common.cuh"

namespace hot_kernels {
namespace tpc_cuda {
namespace {

constexpr int kRT = 32;  // rows per block (8 threads per row)
constexpr int kCT = 64;  // columns per streamed tile
constexpr int kDeltaM = 4;  // Gram candidates refined for delta and the assignment
constexpr int kSortKeys = 2048;  // topf_kernel: keys sorted in shared memory (16 KB) when !sorted

// ---- kernel arguments ------------------------------------------------------------------------------

template <typename T>
struct DensityArgs {
  Points<T> x;
  int B = 0, N = 0, tiles = 0;
  const bool* mask = nullptr;  // (B, N) contiguous, or null
  int k = 1;                   // neighbours, self included (already min(k, N))
  bool want_density = false;
  bool exp_out = false;        // write rho instead of log rho
  float* out = nullptr;        // (B, N) log rho / rho (want_density)
  float* rowmax = nullptr;     // (B, N) largest real Gram e of each real row (0 otherwise), or null
  int* counter = nullptr;      // (B,) zeroed here for delta_kernel's last-block detection, or null
};

struct SelectParams {
  int f = 0, nsel = 0, center = -1;
  bool keep_center = true, sorted = true;
  int* counter = nullptr;         // (B,) zeroed by density_kernel
  int64_t* index = nullptr;       // (B, f)
  int* pos_of = nullptr;          // (B, N) or null (no assignment)
  uint64_t* selkey = nullptr;     // (B, max(nsel, 1)) scratch when !sorted (keys past shared memory)
};

template <typename T>
struct DeltaArgs {
  Points<T> x;
  int B = 0, N = 0, tiles = 0;
  const bool* mask = nullptr;
  const float* key_f = nullptr;   // log rho (fused) or null
  const double* key_d = nullptr;  // dpc_delta's density (as double) or null
  const float* rowmax = nullptr;  // (B, N) from density_kernel
  float* delta = nullptr;         // (B, N) or null
  int64_t* parent = nullptr;      // (B, N) or null
  float* score = nullptr;         // (B, N) delta * exp(log rho) (fused) or null
  bool fused_select = false;
  SelectParams sel;
};

template <typename T>
struct AssignArgs {
  Points<T> x;
  int B = 0, N = 0, tiles = 0, f = 0;
  const int64_t* index = nullptr;  // (B, f)
  const int* pos_of = nullptr;     // (B, N)
  int64_t* out = nullptr;          // (B, N)
};

// Key for the "higher" order: NaN -> -inf, masked -> -inf.
__device__ __forceinline__ double neg_inf_d() { return __longlong_as_double(static_cast<long long>(0xfff0000000000000ull)); }
__device__ __forceinline__ double clean_key(double v, bool real) { return (v != v || !real) ? neg_inf_d() : v; }

// ---- density ---------------------------------------------------------------------------------------

// Rows [r0, r0 + kRT) of sample b. Thread (r = tid / 8, sub = tid % 8) scans columns c0 + sub + 8 m
// of every tile for row r0 + r, keeping its M best (Gram e, j) in registers; the 8 lists of a row
// are merged, the row's M candidates refined exactly, and the k - 1 smallest refined values (plus
// self, 0) give log rho = -(sum of D^2, ascending) / count.
template <typename T, int ENG, int M>
__global__ void __launch_bounds__(kThreads, M <= 16 ? 2 : 1) density_kernel(const DensityArgs<T> a) {
  using G = Gram<T, ENG, kRT, kCT>;
  TPC_SHARED(typename G::Smem, sm, );
  TPC_SHARED(int, s_rows, [kRT]);
  TPC_SHARED(int, s_cols, [2][kCT]);  // double-buffered by tile parity (see the loop)
  TPC_SHARED(unsigned char, s_creal, [2][kCT]);
  TPC_SHARED(float, s_cv, [kRT][M]);
  TPC_SHARED(int, s_cj, [kRT][M]);
  TPC_SHARED(int, s_ws, [kWarps]);

  const int tile = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.tiles));
  const int b = static_cast<int>(blockIdx.x / static_cast<unsigned>(a.tiles));
  const int N = a.N, tid = threadIdx.x, r = tid >> 3, sub = tid & 7;
  const int r0 = tile * kRT, i = r0 + r;
  const bool* mask = a.mask ? a.mask + static_cast<int64_t>(b) * N : nullptr;
  const bool row_valid = i < N;
  const bool row_real = row_valid && (mask == nullptr || mask[i]);

  if (tid < kRT) s_rows[tid] = r0 + tid < N ? r0 + tid : -1;
  if (a.counter != nullptr && tile == 0 && tid == 0) a.counter[b] = 0;
  int n_real = N;
  if (mask != nullptr) {
    int cnt = 0;
    for (int t = tid; t < N; t += kThreads) cnt += mask[t] ? 1 : 0;
    n_real = block_sum(cnt, s_ws);  // (syncs)
  }

  TopList<M> L;
  L.init();
  float rmax = 0.f;
  const bool want_max = a.rowmax != nullptr;
  for (int t = 0, c0 = 0; c0 < N; c0 += kCT, ++t) {
    const int slot = t & 1;
    // Slot `slot` was last read by tile t - 2's consumers, which finished before tile t - 1's
    // gram_run barriers: safe to overwrite.
    if (tid < kCT) {
      const int j = c0 + tid;
      s_cols[slot][tid] = j < N ? j : -1;
      s_creal[slot][tid] = (j < N && (mask == nullptr || mask[j])) ? 1 : 0;
    }
    __syncthreads();
    gram_run<T, ENG, kRT, kCT>(a.x, a.x, b, s_rows, s_cols[slot], t == 0, sm);
    if (row_real) {
      const float sqi = sm.sq[r];
#pragma unroll(M <= 8 ? kCT / 8 : 1)
      for (int m = 0; m < kCT / 8; ++m) {
        const int jj = sub + 8 * m, j = c0 + jj;
        if (j == i || !s_creal[slot][jj]) continue;  // s_creal is 0 past N
        const float e = gram_e(sqi, sm.sq[kRT + jj], sm.G[r * G::LDG + jj]);
        if (a.want_density) L.push(e, j);
        rmax = fmaxf(rmax, e);
      }
    }
  }

  // Row maxima over the 8 lanes of the row (exact: max is order independent).
#pragma unroll
  for (int o = 1; o < 8; o <<= 1) rmax = fmaxf(rmax, __shfl_xor_sync(kFull, rmax, o));

  if (a.want_density) {  // uniform
    merge8<M>(L, s_cv[r], s_cj[r], sub);
    __syncwarp();
    const float scale = static_cast<float>(sqrt(static_cast<double>(a.x.C)));
    // Refine the M candidates (loop not unrolled: once per row); lane 0 keeps the values in
    // s_cv[r] (only lane 0 of the group reads or writes s_cv[r] from here on).
    int mv = 0;  // valid candidates (they come first: sentinels sort last)
#pragma unroll 1
    for (int t = 0; t < M; ++t) {
      const int j = s_cj[r][t];
      const bool valid = row_real && j != kNone;
      const float e = refine_d2(a.x, b, i, valid ? j : i, valid, sub);
      if (sub == 0) s_cv[r][t] = valid ? e : inf_f();
      mv += valid ? 1 : 0;
    }
    const int ko = a.k - 1;
    float sum = 0.f;  // the row's own D = 0 comes first
    if (sub == 0) {
      float* rv = s_cv[r];
      // Ascending refined values (the exact order can differ from the Gram order): insertion sort.
#pragma unroll 1
      for (int t = 1; t < M; ++t) {
        const float v = rv[t];
        int s2 = t;
        while (s2 > 0 && rv[s2 - 1] > v) {
          rv[s2] = rv[s2 - 1];
          --s2;
        }
        rv[s2] = v;
      }
      // The first min(mv, ko) sorted values are real neighbours (an invalid slot is +inf, and a
      // valid +inf counts the same: +inf without a mask, nothing with one).
#pragma unroll 1
      for (int t = 0; t < ko && t < M; ++t) {
        const float d = t < mv ? finish(rv[t], scale) : inf_f();
        if (mask == nullptr) {
          sum += d * d;  // a missing neighbour (never without a mask) would make it +inf
        } else if (t < mv && d < inf_f()) {
          sum += d * d;  // masked mode: +inf (and missing) neighbours add 0, like the reference
        }
      }
    }
    float lr;
    if (mask == nullptr) {
      lr = -(sum / static_cast<float>(a.k));
    } else {
      const int count = min(max(n_real, 1), a.k);
      lr = -(sum / static_cast<float>(count));
    }
    if (!row_real) lr = -inf_f();
    if (sub == 0 && row_valid) a.out[static_cast<int64_t>(b) * N + i] = a.exp_out ? expf(lr) : lr;
  }
  if (want_max && sub == 0 && row_valid) a.rowmax[static_cast<int64_t>(b) * N + i] = row_real ? rmax : 0.f;
}

// ---- delta (+ fused selection) -------------------------------------------------------------------

template <typename T, int ENG>
__global__ void __launch_bounds__(kThreads, 2) delta_kernel(const DeltaArgs<T> a) {
  using G = Gram<T, ENG, kRT, kCT>;
  TPC_SHARED(typename G::Smem, sm, );
  TPC_SHARED(int, s_rows, [kRT]);
  TPC_SHARED(int, s_cols, [2][kCT]);
  TPC_SHARED(double, s_ckey, [2][kCT]);
  TPC_SHARED(float, s_cv, [kRT][kDeltaM]);
  TPC_SHARED(int, s_cj, [kRT][kDeltaM]);
  TPC_SHARED(float, s_wsf, [kWarps]);
  TPC_SHARED(SelectSmem, s_sel, );
  TPC_SHARED(int, s_last, );

  const int tile = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.tiles));
  const int b = static_cast<int>(blockIdx.x / static_cast<unsigned>(a.tiles));
  const int N = a.N, tid = threadIdx.x, r = tid >> 3, sub = tid & 7;
  const int r0 = tile * kRT, i = r0 + r;
  const int64_t bN = static_cast<int64_t>(b) * N;
  const bool* mask = a.mask ? a.mask + bN : nullptr;
  const bool row_valid = i < N;
  const float scale = static_cast<float>(sqrt(static_cast<double>(a.x.C)));

  if (tid < kRT) s_rows[tid] = r0 + tid < N ? r0 + tid : -1;

  // The sample's largest distance between real tokens (for the token with no higher one).
  float m = 0.f;
  for (int t = tid; t < N; t += kThreads) m = fmaxf(m, a.rowmax[bN + t]);
  const float largest = finish(block_max(m, s_wsf), scale);  // (syncs)

  double ki = neg_inf_d();
  float lr_raw = 0.f;
  if (row_valid) {
    const bool real = mask == nullptr || mask[i];
    if (a.key_f != nullptr) {
      lr_raw = a.key_f[bN + i];
      ki = clean_key(static_cast<double>(lr_raw), real);
    } else {
      ki = clean_key(a.key_d[bN + i], real);
    }
  }

  TopList<kDeltaM> L;
  L.init();
  for (int t = 0, c0 = 0; c0 < N; c0 += kCT, ++t) {
    const int slot = t & 1;
    if (tid < kCT) {
      const int j = c0 + tid;
      s_cols[slot][tid] = j < N ? j : -1;
      double kj = neg_inf_d();
      if (j < N) {
        const bool real = mask == nullptr || mask[j];
        kj = a.key_f != nullptr ? clean_key(static_cast<double>(a.key_f[bN + j]), real) : clean_key(a.key_d[bN + j], real);
      }
      s_ckey[slot][tid] = kj;
    }
    __syncthreads();
    gram_run<T, ENG, kRT, kCT>(a.x, a.x, b, s_rows, s_cols[slot], t == 0, sm);
    if (row_valid) {
      const float sqi = sm.sq[r];
#pragma unroll
      for (int mm = 0; mm < kCT / 8; ++mm) {
        const int jj = sub + 8 * mm, j = c0 + jj;
        if (j >= N) continue;
        const double kj = s_ckey[slot][jj];
        const bool higher = kj > ki || (kj == ki && j < i);
        if (!higher) continue;
        L.push(gram_e(sqi, sm.sq[kRT + jj], sm.G[r * G::LDG + jj]), j);
      }
    }
  }

  merge8<kDeltaM>(L, s_cv[r], s_cj[r], sub);
  __syncwarp();
  float best_d = inf_f();
  int best_j = kNone;
#pragma unroll 1
  for (int t = 0; t < kDeltaM; ++t) {
    const int j = s_cj[r][t];
    const bool valid = row_valid && j != kNone;
    const float d = finish(refine_d2(a.x, b, i, valid ? j : i, valid, sub), scale);
    if (valid && before(d, j, best_d, best_j)) {
      best_d = d;
      best_j = j;
    }
  }
  const bool has_higher = best_j != kNone;
  const float dl = has_higher ? best_d : largest;
  if (sub == 0 && row_valid) {
    if (a.delta != nullptr) a.delta[bN + i] = dl;
    if (a.parent != nullptr) a.parent[bN + i] = has_higher ? best_j : i;
    if (a.score != nullptr) a.score[bN + i] = dl * expf(lr_raw);
  }
  if (!a.fused_select) return;  // uniform

  // Last block of the sample: every score row is written (threadfence reduction pattern).
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const int prev = atomicAdd(&a.sel.counter[b], 1);
    s_last = prev == a.tiles - 1 ? 1 : 0;
  }
  __syncthreads();
  if (!s_last) return;  // uniform (shared flag)
  __threadfence();
  const float* score = a.score + bN;
  const int center = a.sel.center;
  auto key = [&](int j) -> uint64_t {
    const float s = __ldcg(score + j);  // written by other blocks of this launch: read through L2
    int cls = s != s ? 2 : 3;
    if (mask != nullptr && !mask[j]) cls = 1;
    if (j == center) cls = 0;
    return rank_key(cls, s, j);
  };
  block_select(key, N, a.sel.nsel, a.sel.f, center, a.sel.keep_center, a.sel.sorted,
               a.sel.index + static_cast<int64_t>(b) * a.sel.f,
               a.sel.pos_of != nullptr ? a.sel.pos_of + bN : nullptr,
               a.sel.selkey != nullptr ? a.sel.selkey + static_cast<int64_t>(b) * (a.sel.nsel > 0 ? a.sel.nsel : 1)
                                       : nullptr,
               // the Gram tiles are done with: their shared memory sorts the best-first keys
               reinterpret_cast<uint64_t*>(&sm), static_cast<int>(sizeof(sm) / sizeof(uint64_t)), s_sel);
}

// ---- assignment ------------------------------------------------------------------------------------

// Rows [r0, r0 + kRT) of sample b against the f kept tokens (columns = positions p of index[b]):
// the lowest position among the kept tokens nearest by refined D; a kept token maps to itself.
template <typename T, int ENG>
__global__ void __launch_bounds__(kThreads, 2) assign_kernel(const AssignArgs<T> a) {
  using G = Gram<T, ENG, kRT, kCT>;
  TPC_SHARED(typename G::Smem, sm, );
  TPC_SHARED(int, s_rows, [kRT]);
  TPC_SHARED(int, s_cols, [2][kCT]);
  TPC_SHARED(float, s_cv, [kRT][kDeltaM]);
  TPC_SHARED(int, s_cj, [kRT][kDeltaM]);

  const int tile = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.tiles));
  const int b = static_cast<int>(blockIdx.x / static_cast<unsigned>(a.tiles));
  const int N = a.N, f = a.f, tid = threadIdx.x, r = tid >> 3, sub = tid & 7;
  const int r0 = tile * kRT, i = r0 + r;
  const int64_t bN = static_cast<int64_t>(b) * N, bf = static_cast<int64_t>(b) * f;
  const bool row_valid = i < N;
  const float scale = static_cast<float>(sqrt(static_cast<double>(a.x.C)));

  if (tid < kRT) s_rows[tid] = r0 + tid < N ? r0 + tid : -1;

  TopList<kDeltaM> L;
  L.init();
  for (int t = 0, p0 = 0; p0 < f; p0 += kCT, ++t) {
    const int slot = t & 1;
    if (tid < kCT) {
      const int p = p0 + tid;
      int tok = -1;
      if (p < f) {
        const int64_t v = a.index[bf + p];
        tok = (v >= 0 && v < N) ? static_cast<int>(v) : -1;
      }
      s_cols[slot][tid] = tok;
    }
    __syncthreads();
    gram_run<T, ENG, kRT, kCT>(a.x, a.x, b, s_rows, s_cols[slot], t == 0, sm);
    if (row_valid) {
      const float sqi = sm.sq[r];
#pragma unroll
      for (int mm = 0; mm < kCT / 8; ++mm) {
        const int jj = sub + 8 * mm, p = p0 + jj;
        if (p >= f || s_cols[slot][jj] < 0) continue;
        L.push(gram_e(sqi, sm.sq[kRT + jj], sm.G[r * G::LDG + jj]), p);
      }
    }
  }

  merge8<kDeltaM>(L, s_cv[r], s_cj[r], sub);
  __syncwarp();
  float best_d = inf_f();
  int best_p = kNone;
#pragma unroll 1
  for (int t = 0; t < kDeltaM; ++t) {
    const int p = s_cj[r][t];
    int tok = i;
    bool valid = row_valid && p != kNone;
    if (valid) {
      const int64_t v = a.index[bf + p];
      valid = v >= 0 && v < N;
      tok = valid ? static_cast<int>(v) : i;
    }
    const float d = finish(refine_d2(a.x, b, i, tok, valid, sub), scale);
    if (valid && before(d, p, best_d, best_p)) {
      best_d = d;
      best_p = p;
    }
  }
  if (sub == 0 && row_valid) {
    const int own = a.pos_of[bN + i];
    a.out[bN + i] = own >= 0 ? own : (best_p != kNone ? best_p : 0);
  }
}

// ---- topf_select -------------------------------------------------------------------------------------

template <typename TS>
__global__ void __launch_bounds__(kThreads) topf_kernel(const TS* score, int64_t row_stride, int N, int f,
                                                        bool sorted, const int64_t* exclude, int64_t* index,
                                                        uint64_t* selkey) {
  TPC_SHARED(SelectSmem, s_sel, );
  TPC_SHARED(uint64_t, s_keys, [kSortKeys]);  // best-first sort of up to kSortKeys keys (else global scratch)
  const int b = static_cast<int>(blockIdx.x);
  const TS* row = score + static_cast<int64_t>(b) * row_stride;
  int ex = -1;
  if (exclude != nullptr) {
    const int64_t v = exclude[b];
    ex = (v >= 0 && v < N) ? static_cast<int>(v) : -1;  // out of range: nothing excluded (no sync to check)
  }
  auto key = [&](int j) -> uint64_t {
    const float s = to_f(row[j]);
    const int cls = j == ex ? 0 : (s != s ? 2 : 3);
    return rank_key(cls, s, j);
  };
  block_select(key, N, f, f, -1, false, sorted, index + static_cast<int64_t>(b) * f, nullptr,
               selkey != nullptr ? selkey + static_cast<int64_t>(b) * (f > 0 ? f : 1) : nullptr, s_keys, kSortKeys,
               s_sel);
}

// ---- host side ---------------------------------------------------------------------------------------

void check_points(const at::Tensor& x, const char* op, bool allow_4d) {
  TORCH_CHECK(x.dim() == 3 || (allow_4d && x.dim() == 4), op, ": x must be (B, N, C)",
              allow_4d ? " or (B, N, J, C)" : "", ", got ", x.sizes());
  TORCH_CHECK(on_device(x), op, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.size(1) < kMaxTokens, op, ": the cuda backend supports N < ", kMaxTokens, " tokens, got ", x.size(1));
  TORCH_CHECK(x.size(-1) >= 1 || x.size(0) * x.size(1) == 0, op, ": x must have at least one channel, got ",
              x.sizes());
  TORCH_CHECK(x.size(-1) <= std::numeric_limits<int>::max() / 2, op, ": too many channels: ", x.size(-1));
  if (x.dim() == 4) TORCH_CHECK(x.size(2) >= 1, op, ": x (B, N, J, C) must have J >= 1, got ", x.sizes());
}

at::Tensor prepare_mask(const std::optional<at::Tensor>& token_mask, const at::Tensor& x, const char* op) {
  if (!token_mask.has_value() || !token_mask->defined()) return at::Tensor();
  const at::Tensor& m = *token_mask;
  const int64_t B = x.size(0), N = x.size(1);
  TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == N, op, ": token_mask must be (B, N) = (", B, ", ", N,
              "), got ", m.sizes());
  TORCH_CHECK(m.device() == x.device(), op, ": token_mask must be on ", x.device(), " like x, got ", m.device());
  return m.to(at::kBool).contiguous();
}

int row_tiles(int64_t N) { return static_cast<int>((N + kRT - 1) / kRT); }

unsigned grid_blocks(int64_t B, int tiles, const char* op) {
  const int64_t blocks = B * static_cast<int64_t>(tiles);
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), op, ": batch too large for one launch (", B, " x ", tiles,
              " blocks)");
  return static_cast<unsigned>(blocks);
}

// density_kernel launch. k already clipped to [1, min(32, N)].
template <typename T>
void launch_density(const at::Tensor& x, const at::Tensor& mask, int64_t k, bool want_density, bool exp_out,
                    float* out, float* rowmax, int* counter, cudaStream_t stream, const char* op) {
  DensityArgs<T> a;
  a.x = make_points<T>(x);
  a.B = static_cast<int>(x.size(0));
  a.N = static_cast<int>(x.size(1));
  a.tiles = row_tiles(a.N);
  a.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  a.k = static_cast<int>(k);
  a.want_density = want_density;
  a.exp_out = exp_out;
  a.out = out;
  a.rowmax = rowmax;
  a.counter = counter;
  const unsigned blocks = grid_blocks(x.size(0), a.tiles, op);
  const int ko = static_cast<int>(k) - 1;
  with_engine<T>(choose_engine(x.scalar_type(), a.x.J), [&](auto eng) {
    constexpr int E = decltype(eng)::value;
    if (ko <= 2) {
      launch(density_kernel<T, E, 4>, blocks, stream, a);
    } else if (ko <= 14) {
      launch(density_kernel<T, E, 16>, blocks, stream, a);
    } else {
      launch(density_kernel<T, E, 33>, blocks, stream, a);
    }
  });
}

template <typename T>
void launch_delta(const at::Tensor& x, const DeltaArgs<T>& proto, cudaStream_t stream, const char* op) {
  DeltaArgs<T> a = proto;
  a.x = make_points<T>(x);
  a.B = static_cast<int>(x.size(0));
  a.N = static_cast<int>(x.size(1));
  a.tiles = row_tiles(a.N);
  const unsigned blocks = grid_blocks(x.size(0), a.tiles, op);
  with_engine<T>(choose_engine(x.scalar_type(), a.x.J), [&](auto eng) {
    constexpr int E = decltype(eng)::value;
    launch(delta_kernel<T, E>, blocks, stream, a);
  });
}

template <typename T>
void launch_assign(const at::Tensor& x, int64_t f, const int64_t* index, const int* pos_of, int64_t* out,
                   cudaStream_t stream, const char* op) {
  AssignArgs<T> a;
  a.x = make_points<T>(x);
  a.B = static_cast<int>(x.size(0));
  a.N = static_cast<int>(x.size(1));
  a.tiles = row_tiles(a.N);
  a.f = static_cast<int>(f);
  a.index = index;
  a.pos_of = pos_of;
  a.out = out;
  const unsigned blocks = grid_blocks(x.size(0), a.tiles, op);
  with_engine<T>(choose_engine(x.scalar_type(), a.x.J), [&](auto eng) {
    constexpr int E = decltype(eng)::value;
    launch(assign_kernel<T, E>, blocks, stream, a);
  });
}

int64_t clip_k(int64_t k, int64_t N, const char* op) {
  TORCH_CHECK(k >= 1, op, ": k must be >= 1, got ", k);
  k = std::min<int64_t>(k, std::max<int64_t>(N, 1));  // fewer than k tokens: the mean runs over all
  TORCH_CHECK(k <= 32, op, ": the cuda backend supports k <= 32 neighbours, got k = ", k,
              " (use the cpu or reference backend)");
  return k;
}

}  // namespace
}  // namespace tpc_cuda

using namespace tpc_cuda;

at::Tensor knn_density_cuda(const at::Tensor& x_in, int64_t k, const std::optional<at::Tensor>& token_mask, bool log) {
  const char* op = "knn_density";
  check_points(x_in, op, false);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = points_input(x_in);
  const int64_t B = x.size(0), N = x.size(1);
  k = clip_k(k, N, op);
  const at::Tensor mask = prepare_mask(token_mask, x, op);
  at::Tensor out = at::empty({B, N}, x.options().dtype(at::kFloat));
  if (B == 0 || N == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_type(x.scalar_type(), op, "x", [&](auto tag) {
    using T = decltype(tag);
    launch_density<T>(x, mask, k, true, !log, out.data_ptr<float>(), nullptr, nullptr, stream, op);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> dpc_delta_cuda(const at::Tensor& x_in, const at::Tensor& density,
                                                  const std::optional<at::Tensor>& token_mask) {
  const char* op = "dpc_delta";
  check_points(x_in, op, false);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = points_input(x_in);
  const int64_t B = x.size(0), N = x.size(1);
  TORCH_CHECK(density.dim() == 2 && density.size(0) == B && density.size(1) == N,
              "dpc_delta: density must be (B, N) = (", B, ", ", N, "), got ", density.sizes());
  TORCH_CHECK(density.device() == x.device(), "dpc_delta: density must be on ", x.device(), " like x, got ",
              density.device());
  TORCH_CHECK(at::isFloatingType(density.scalar_type()), "dpc_delta: density must be a floating tensor, got ",
              density.scalar_type());
  const at::Tensor mask = prepare_mask(token_mask, x, op);
  at::Tensor delta = at::empty({B, N}, x.options().dtype(at::kFloat));
  at::Tensor parent = at::empty({B, N}, x.options().dtype(at::kLong));
  if (B == 0 || N == 0) return std::make_tuple(delta, parent);
  // Every floating dtype converts to double exactly: the order (and its ties) is unchanged.
  const at::Tensor keys = density.to(at::kDouble).contiguous();
  at::Tensor rowmax = at::empty({B, N}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_type(x.scalar_type(), op, "x", [&](auto tag) {
    using T = decltype(tag);
    launch_density<T>(x, mask, 1, false, false, nullptr, rowmax.data_ptr<float>(), nullptr, stream, op);
    DeltaArgs<T> a;
    a.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    a.key_d = keys.data_ptr<double>();
    a.rowmax = rowmax.data_ptr<float>();
    a.delta = delta.data_ptr<float>();
    a.parent = parent.data_ptr<int64_t>();
    launch_delta<T>(x, a, stream, op);
  });
  return std::make_tuple(delta, parent);
}

at::Tensor topf_select_cuda(const at::Tensor& score, int64_t f, bool sorted, const std::optional<at::Tensor>& exclude) {
  const char* op = "topf_select";
  TORCH_CHECK(score.dim() == 2, "topf_select: score must be (B, N), got ", score.sizes());
  TORCH_CHECK(on_device(score), "topf_select: score must be a CUDA tensor, got ", score.device());
  const int64_t B = score.size(0), N = score.size(1);
  TORCH_CHECK(N < kMaxTokens, "topf_select: the cuda backend supports N < ", kMaxTokens, ", got ", N);
  const bool has_ex = exclude.has_value() && exclude->defined();
  TORCH_CHECK(f >= 0 && f <= (has_ex ? N - 1 : N), "topf_select: f must be in [0, ", has_ex ? N - 1 : N, "]",
              has_ex ? " (one token is excluded)" : "", ", got ", f);
  const c10::cuda::CUDAGuard guard(score.device());
  at::Tensor ex;
  if (has_ex) {
    TORCH_CHECK(exclude->numel() == B, "topf_select: exclude must hold one index per row (B = ", B, "), got ",
                exclude->sizes());
    TORCH_CHECK(!at::isFloatingType(exclude->scalar_type()) && exclude->scalar_type() != at::kBool,
                "topf_select: exclude must be an integer tensor, got ", exclude->scalar_type());
    TORCH_CHECK(exclude->device() == score.device(), "topf_select: exclude must be on ", score.device(),
                " like score, got ", exclude->device());
    // Values are not checked here (that would sync): an out-of-range value excludes nothing.
    ex = exclude->to(at::kLong).contiguous().view({B});
  }
  at::Tensor index = at::empty({B, f}, score.options().dtype(at::kLong));
  if (B == 0 || f == 0) return index;
  TORCH_CHECK(B <= std::numeric_limits<int>::max(), "topf_select: too many rows: ", B);
  const at::Tensor s = score.stride(1) == 1 ? score : score.contiguous();
  at::Tensor selkey;
  if (!sorted) selkey = at::empty({B, f}, score.options().dtype(at::kLong));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_type(s.scalar_type(), op, "score", [&](auto tag) {
    using T = decltype(tag);
    launch(topf_kernel<T>, static_cast<unsigned>(B), stream, reinterpret_cast<const T*>(s.data_ptr()), s.stride(0),
           static_cast<int>(N), static_cast<int>(f), sorted, has_ex ? ex.data_ptr<int64_t>() : nullptr,
           index.data_ptr<int64_t>(), sorted ? nullptr : reinterpret_cast<uint64_t*>(selkey.data_ptr<int64_t>()));
  });
  return index;
}

std::tuple<at::Tensor, at::Tensor> dpc_knn_cuda(const at::Tensor& x_in, int64_t f, int64_t k,
                                                const std::optional<at::Tensor>& token_mask,
                                                std::optional<int64_t> center, bool keep_center, bool sorted,
                                                bool return_assignment) {
  const char* op = "dpc_knn";
  check_points(x_in, op, true);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = points_input(x_in);
  const int64_t B = x.size(0), N = x.size(1);
  k = clip_k(k, N, op);
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
  const at::Tensor mask = prepare_mask(token_mask, x, op);
  const auto lopt = x.options().dtype(at::kLong);
  at::Tensor index = at::empty({B, f}, lopt);
  at::Tensor assignment = return_assignment ? at::empty({B, N}, lopt) : at::empty({B, 0}, lopt);
  if (B == 0 || N == 0) return std::make_tuple(index, assignment);

  const int64_t nsel = has_center && keep_center ? f - 1 : f;
  const auto fopt = x.options().dtype(at::kFloat);
  at::Tensor log_rho = at::empty({B, N}, fopt);
  at::Tensor rowmax = at::empty({B, N}, fopt);
  at::Tensor score = at::empty({B, N}, fopt);
  at::Tensor counter = at::empty({B}, x.options().dtype(at::kInt));
  at::Tensor pos_of = return_assignment ? at::empty({B, N}, x.options().dtype(at::kInt)) : at::Tensor();
  at::Tensor selkey = sorted ? at::Tensor() : at::empty({B, std::max<int64_t>(nsel, 1)}, lopt);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_type(x.scalar_type(), op, "x", [&](auto tag) {
    using T = decltype(tag);
    // 1: log rho, row maxima, zeroed counters.
    launch_density<T>(x, mask, k, true, false, log_rho.data_ptr<float>(), rowmax.data_ptr<float>(),
                      counter.data_ptr<int>(), stream, op);
    // 2: delta -> score; the last block of each sample selects.
    DeltaArgs<T> a;
    a.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    a.key_f = log_rho.data_ptr<float>();
    a.rowmax = rowmax.data_ptr<float>();
    a.score = score.data_ptr<float>();
    a.fused_select = true;
    a.sel.f = static_cast<int>(f);
    a.sel.nsel = static_cast<int>(nsel);
    a.sel.center = has_center ? static_cast<int>(*center) : -1;
    a.sel.keep_center = has_center && keep_center;
    a.sel.sorted = sorted;
    a.sel.counter = counter.data_ptr<int>();
    a.sel.index = index.data_ptr<int64_t>();
    a.sel.pos_of = return_assignment ? pos_of.data_ptr<int>() : nullptr;
    a.sel.selkey = sorted ? nullptr : reinterpret_cast<uint64_t*>(selkey.data_ptr<int64_t>());
    launch_delta<T>(x, a, stream, op);
    // 3: the assignment.
    if (return_assignment)
      launch_assign<T>(x, f, index.data_ptr<int64_t>(), pos_of.data_ptr<int>(), assignment.data_ptr<int64_t>(),
                       stream, op);
  });
  return std::make_tuple(index, assignment);
}

}  // namespace hot_kernels
