// Shared machinery of the token-pruning (TPC) CPU kernels: the distance block, the per-row
// statistics (k nearest, delta), the ranking comparator and the fused per-sample driver.
//
// Semantics: ../../shared/DESIGN.md and hot_kernels/reference.py (the oracle).
//
// Distances. D[i,j] = ||x_i - x_j|| / sqrt(C), computed in the Gram form d2 = |x_i|^2 + |x_j|^2 -
// 2 x_i.x_j on a per-sample *centred* copy of x (distances are translation invariant; centring
// shrinks the cancellation of the Gram form), with the GEMM done by the BLAS behind at::mm.
// Pairs where the Gram form cancels badly (d2 < |x_i|^2 + |x_j|^2 over kRefineDiv) are recomputed
// exactly as sum_c (x_ic - x_jc)^2, so near-duplicate tokens get accurate (and exact duplicates
// exactly zero) distances. Every value is computed once per unordered pair {i, j} and used for both
// D[i,j] and D[j,i]: D is bit-symmetric with an exactly zero diagonal by construction, which is
// what makes mutual nearest neighbours tie exactly in density (DESIGN.md, the tie rule).
// As in the reference, a d2 that is not > 0 (cancellation, or NaN from NaN input) gives D = 0, so
// D never holds NaN (it may hold +inf when squares overflow).
//
// Two ways to lay the distances out, one definition of "the value of pair {i, j}" per way:
//  * full block (N <= kFullMaxN): the whole N x N matrix of one sample lives in a buffer. The
//    GEMM is a "staircase": row tile t (kStairTile rows) times the columns from its own start to N,
//    so only the upper triangle (plus the diagonal tiles) is multiplied; pair i < j takes its value
//    from entry (i, j) and is mirrored.
//  * panels (N > kFullMaxN): no N x N buffer anywhere. Tokens are cut into tiles of `tile` rows;
//    the value of a pair comes from the canonical block (min tile, max tile) = X_a X_b^T (a <= b,
//    upper triangle of it when a == b). A row tile streams over all column tiles (recomputing the
//    canonical block, transposed when needed) and feeds per-row states (k smallest, running
//    min/argmin), so memory is O(tile^2 + tile * k + N * C) and any k in [1, N] works.
#pragma once

#include "../hot_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace hot_kernels {
namespace tpc {

// ---- tuning constants -------------------------------------------------------------------------

constexpr int64_t kFullMaxN = 2048;   // largest N that gets a full N x N block per sample
constexpr int64_t kStairTile = 32;    // row tile of the staircase GEMM of the full block
constexpr int64_t kPanelTile = 256;   // canonical tile of the panel path (may shrink for huge k)
constexpr int64_t kSmallK = 16;       // k up to this: sorted insertion array; above: buffer + nth_element
constexpr int64_t kIntraMinN = 384;   // B < threads and N >= this: parallelise inside a sample
// Pairs with d2 < (|x_i|^2 + |x_j|^2) / kRefineDiv are recomputed by direct differences.
constexpr double kRefineDiv = 32.0;

// ---- small helpers ----------------------------------------------------------------------------

template <typename T>
constexpr T inf() {
  return std::numeric_limits<T>::infinity();
}

// Index type of the same width as T (lets the masked loops vectorise).
template <typename T>
using IndexFor = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

inline int max_threads() { return std::max(1, at::get_num_threads()); }

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// sum_c a_c^2, accumulated in double (eight independent partial sums: deterministic, vectorisable).
template <typename T>
inline T sum_sq(const T* a, int64_t C) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    for (int l = 0; l < 8; ++l) {
      const double v = static_cast<double>(a[c + l]);
      acc[l] += v * v;
    }
  }
  for (; c < C; ++c) acc[0] += static_cast<double>(a[c]) * static_cast<double>(a[c]);
  return static_cast<T>(((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])));
}

// sum_c (a_c - b_c)^2 in T with 16 partial sums. Symmetric in (a, b) bitwise ((a-b)^2 == (b-a)^2).
template <typename T>
inline T sq_dist(const T* a, const T* b, int64_t C) {
  T acc[16];
  for (int l = 0; l < 16; ++l) acc[l] = T(0);
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) {
    for (int l = 0; l < 16; ++l) {
      const T d = a[c + l] - b[c + l];
      acc[l] += d * d;
    }
  }
  for (; c < C; ++c) {
    const T d = a[c] - b[c];
    acc[0] += d * d;
  }
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// c[m x n] (row-major, ldc) = a[m x k] (row-major, lda) * b[n x k]^T (row-major, ldb), by the BLAS
// behind at::mm (views on the buffers, no copies: a row-major result with row stride ldc is a valid
// BLAS layout, so ATen hands the buffer to the GEMM directly).
template <typename T>
inline void gemm_abt(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                     int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, T(0));
    return;
  }
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor A = at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, opt);
  const at::Tensor Bt = at::from_blob(const_cast<T*>(b), {k, n}, {1, ldb}, opt);
  at::Tensor Cv = at::from_blob(c, {m, n}, {ldc, 1}, opt);
  at::mm_out(Cv, A, Bt);
}

// Centres one sample: xc = x - mean over the finite entries of the real tokens (per channel), and
// sq_i = |xc_i|^2. Non-finite entries stay non-finite (so NaN tokens keep NaN distances -> 0).
template <typename T>
inline void center_sample(const T* x, int64_t N, int64_t C, const bool* mask, T* xc, T* sq,
                          std::vector<double>& sum, std::vector<int64_t>& cnt) {
  sum.assign(C, 0.0);
  cnt.assign(C, 0);
  for (int64_t i = 0; i < N; ++i) {
    if (mask && !mask[i]) continue;
    const T* xi = x + i * C;
    for (int64_t c = 0; c < C; ++c) {
      const T v = xi[c];
      const bool fin = (v - v) == T(0);  // false for inf and NaN
      sum[c] += fin ? static_cast<double>(v) : 0.0;
      cnt[c] += fin ? 1 : 0;
    }
  }
  std::vector<T> mean(C);
  for (int64_t c = 0; c < C; ++c) mean[c] = cnt[c] > 0 ? static_cast<T>(sum[c] / static_cast<double>(cnt[c])) : T(0);
  for (int64_t i = 0; i < N; ++i) {
    const T* xi = x + i * C;
    T* yi = xc + i * C;
    for (int64_t c = 0; c < C; ++c) yi[c] = xi[c] - mean[c];
    sq[i] = sum_sq(yi, C);
  }
}

// Distance from a squared distance, exactly as the reference: d2 > 0 ? sqrt(max(d2, tiny)) / sqrt(C) : 0.
template <typename T>
struct DistFinish {
  T scale;  // sqrt(C) in T
  T tiny = std::numeric_limits<T>::min();
  explicit DistFinish(int64_t C) : scale(static_cast<T>(std::sqrt(static_cast<double>(C)))) {}
  inline T operator()(T d2) const {
    const T c = d2 > tiny ? d2 : tiny;  // NaN -> tiny (discarded below)
    const T r = std::sqrt(c) / scale;
    return d2 > T(0) ? r : T(0);
  }
};

// One row segment of Gram values -> distances, in place: g[j] holds x_i . y_j on entry, D(i, j) on
// exit. sq_i = |x_i|^2, sqy[j] = |y_j|^2, xi / y rows (stride C) for the exact recomputation.
template <typename T>
inline void gram_row_to_dist(T* g, int64_t n, T sq_i, const T* sqy, const T* xi, const T* y, int64_t C,
                             const DistFinish<T>& fin) {
  const T div = static_cast<T>(kRefineDiv);
  bool refine = false;
  for (int64_t j = 0; j < n; ++j) {
    const T s = sq_i + sqy[j];
    const T d2 = s - T(2) * g[j];
    refine |= (d2 * div < s);
    g[j] = d2;
  }
  if (refine) {
    for (int64_t j = 0; j < n; ++j) {
      const T s = sq_i + sqy[j];
      if (g[j] * div < s) g[j] = sq_dist(xi, y + j * C, C);
    }
  }
  for (int64_t j = 0; j < n; ++j) g[j] = fin(g[j]);
}

// ---- full block (N <= kFullMaxN) ---------------------------------------------------------------

inline int64_t stair_tiles(int64_t N) { return (N + kStairTile - 1) / kStairTile; }

// Rows of staircase tiles [t0, t1) of the full N x N block D of one sample: GEMM of the tile's rows
// against the columns from the tile start, then, for each row i, D(i, j > i) from the upper entries,
// mirrored to D(j, i), and D(i, i) = 0. Different tiles touch disjoint entries, so tiles may run
// in parallel (the mirror writes of row i land left of every later tile's GEMM columns).
template <typename T>
inline void full_block_tiles(const T* xc, const T* sq, int64_t N, int64_t C, T* D, int64_t t0, int64_t t1) {
  const DistFinish<T> fin(C);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t r0 = t * kStairTile, r1 = std::min(N, r0 + kStairTile);
    gemm_abt<T>(r1 - r0, N - r0, C, xc + r0 * C, C, xc + r0 * C, C, D + r0 * N + r0, N);
    for (int64_t i = r0; i < r1; ++i) {
      T* row = D + i * N;
      row[i] = T(0);
      const int64_t n = N - i - 1;
      if (n <= 0) continue;
      gram_row_to_dist(row + i + 1, n, sq[i], sq + i + 1, xc + i * C, xc + (i + 1) * C, C, fin);
      for (int64_t j = i + 1; j < N; ++j) D[j * N + i] = row[j];
    }
  }
}

// ---- panels (N > kFullMaxN) --------------------------------------------------------------------

// The canonical distances between the tokens of tile a (rows) and tile b (columns), written to
// out (rows of tile a, ld = ldo). scratch: tile * tile. Tile t covers [t * tile, min(N, (t+1) * tile)).
template <typename T>
inline void canonical_block(const T* xc, const T* sq, int64_t N, int64_t C, int64_t tile, int64_t a, int64_t b,
                            T* out, int64_t ldo, T* scratch) {
  const DistFinish<T> fin(C);
  const int64_t ra = a * tile, na = std::min(N, ra + tile) - ra;
  const int64_t rb = b * tile, nb = std::min(N, rb + tile) - rb;
  if (a < b) {
    gemm_abt<T>(na, nb, C, xc + ra * C, C, xc + rb * C, C, out, ldo);
    for (int64_t i = 0; i < na; ++i)
      gram_row_to_dist(out + i * ldo, nb, sq[ra + i], sq + rb, xc + (ra + i) * C, xc + rb * C, C, fin);
  } else if (a > b) {
    // Canonical block is (b, a): compute it and transpose into out.
    gemm_abt<T>(nb, na, C, xc + rb * C, C, xc + ra * C, C, scratch, na);
    for (int64_t j = 0; j < nb; ++j)
      gram_row_to_dist(scratch + j * na, na, sq[rb + j], sq + ra, xc + (rb + j) * C, xc + ra * C, C, fin);
    for (int64_t i = 0; i < na; ++i)
      for (int64_t j = 0; j < nb; ++j) out[i * ldo + j] = scratch[j * na + i];
  } else {
    gemm_abt<T>(na, na, C, xc + ra * C, C, xc + ra * C, C, scratch, na);
    for (int64_t i = 0; i < na; ++i) {
      T* row = scratch + i * na;
      const int64_t n = na - i - 1;
      if (n > 0) gram_row_to_dist(row + i + 1, n, sq[ra + i], sq + ra + i + 1, xc + (ra + i) * C,
                                  xc + (ra + i + 1) * C, C, fin);
    }
    for (int64_t i = 0; i < na; ++i) {
      out[i * ldo + i] = T(0);
      for (int64_t j = i + 1; j < na; ++j) {
        const T v = scratch[i * na + j];
        out[i * ldo + j] = v;
        out[j * ldo + i] = v;
      }
    }
  }
}

// ---- per-row state: the k smallest values of a row (a multiset; self included) ------------------

// Keeps the k smallest of the values pushed (only values < +inf: a +inf or masked value is never a
// neighbour, which is what the reference's masked_fill(+inf) + topk amounts to).
template <typename T>
struct KSmallest {
  int64_t k = 1;
  int64_t cap = 1;  // small k: k (sorted array); big k: 2k (unsorted buffer)
  bool small = true;
  T* buf = nullptr;
  int64_t n = 0;  // big k: stored count; small k: unused
  T thr = inf<T>();

  void init(int64_t k_, T* storage) {
    k = k_;
    small = k <= kSmallK;
    cap = small ? k : 2 * k;
    buf = storage;
    reset();
  }
  static int64_t capacity_for(int64_t k_) { return k_ <= kSmallK ? k_ : 2 * k_; }
  void reset() {
    n = 0;
    thr = inf<T>();
    if (small) std::fill(buf, buf + k, inf<T>());
  }

  inline void insert_small(T v) {
    int64_t p = k - 1;
    while (p > 0 && buf[p - 1] > v) {
      buf[p] = buf[p - 1];
      --p;
    }
    buf[p] = v;
    thr = buf[k - 1];
  }
  inline void insert_big(T v) {
    buf[n++] = v;
    if (n == cap) {
      std::nth_element(buf, buf + (k - 1), buf + n);
      n = k;
      thr = buf[k - 1];
    }
  }

  // Values v[0..len) of columns whose mask is colmask[0..len) (nullptr: all real).
  void push(const T* v, const bool* colmask, int64_t len) {
    constexpr int64_t W = 16;
    int64_t j0 = 0;
    for (; j0 < len; j0 += W) {
      const int64_t j1 = std::min(len, j0 + W);
      int any = 0;
      const T t = thr;
      for (int64_t j = j0; j < j1; ++j) any |= (v[j] < t);
      if (!any) continue;
      for (int64_t j = j0; j < j1; ++j) {
        const T x = v[j];
        if (x < thr && (colmask == nullptr || colmask[j])) {
          if (small)
            insert_small(x);
          else
            insert_big(x);
        }
      }
    }
  }

  // log rho = -(sum of squares of the k smallest, ascending) / count. Without a mask a missing
  // neighbour (+inf) makes it -inf; with a mask missing ones contribute 0 and count = clamp(nreal, 1, k).
  T finish_log(bool mask_mode, int64_t nreal) {
    int64_t m;
    if (small) {
      m = 0;
      while (m < k && buf[m] < inf<T>()) ++m;
    } else {
      if (n > k) std::nth_element(buf, buf + (k - 1), buf + n);
      m = std::min(n, k);
      std::sort(buf, buf + m);
    }
    T s = T(0);
    for (int64_t t = 0; t < m; ++t) s += buf[t] * buf[t];
    if (!mask_mode) {
      if (m < k) s = inf<T>();
      return -(s / static_cast<T>(k));
    }
    const int64_t count = std::min<int64_t>(std::max<int64_t>(nreal, 1), k);
    return -(s / static_cast<T>(count));
  }
};

// ---- per-row state: min over higher tokens (delta / parent) --------------------------------------

// Over the columns j0 .. j0+len of one row: the first column attaining the minimum of D among the
// columns ranked before `ri`. Columns must be fed in increasing order. arg < 0: none seen yet.
template <typename T>
inline void delta_push(const T* v, const IndexFor<T>* rank, IndexFor<T> ri, int64_t j0, int64_t len, T& best,
                       int64_t& arg) {
  constexpr int64_t W = 16;
  for (int64_t c0 = 0; c0 < len; c0 += W) {
    const int64_t c1 = std::min(len, c0 + W);
    if (arg >= 0) {
      int any = 0;
      const T b = best;
      for (int64_t c = c0; c < c1; ++c) any |= ((rank[c] < ri) & (v[c] < b));
      if (!any) continue;
    }
    for (int64_t c = c0; c < c1; ++c) {
      if (rank[c] < ri && (arg < 0 || v[c] < best)) {
        best = v[c];
        arg = j0 + c;
      }
    }
  }
}

// Largest distance of a real row to the real columns (D >= 0, so 0 is neutral).
template <typename T>
inline T row_max_real(const T* v, const bool* colmask, int64_t len, T cur) {
  T m = cur;
  if (colmask == nullptr) {
    for (int64_t j = 0; j < len; ++j) m = v[j] > m ? v[j] : m;
  } else {
    for (int64_t j = 0; j < len; ++j) {
      const T x = colmask[j] ? v[j] : T(0);
      m = x > m ? x : m;
    }
  }
  return m;
}

// ---- ranking ----------------------------------------------------------------------------------

// "a ranks before b": class (higher first), then key (higher first; keys hold no NaN), then index.
template <typename K>
struct RankBefore {
  const int8_t* cls;
  const K* key;
  bool operator()(int64_t a, int64_t b) const {
    if (cls[a] != cls[b]) return cls[a] > cls[b];
    if (key[a] != key[b]) return key[a] > key[b];
    return a < b;
  }
};

// NaN -> -inf (the reference's nan_to_num(nan=-inf)).
template <typename K>
inline K nan_low(K v) {
  return v != v ? -inf<K>() : v;
}

// The nsel best of N by RankBefore into out: ascending index (sorted) or best first. perm: N scratch.
template <typename K>
inline void select_best(const int8_t* cls, const K* key, int64_t N, int64_t nsel, bool sorted, int64_t* out,
                        std::vector<int64_t>& perm) {
  if (nsel <= 0) return;
  perm.resize(N);
  std::iota(perm.begin(), perm.end(), int64_t(0));
  const RankBefore<K> before{cls, key};
  if (nsel < N) std::nth_element(perm.begin(), perm.begin() + (nsel - 1), perm.end(), before);
  if (sorted)
    std::sort(perm.begin(), perm.begin() + nsel);
  else
    std::sort(perm.begin(), perm.begin() + nsel, before);
  std::copy(perm.begin(), perm.begin() + nsel, out);
}

// Order of the tokens by a "higher" key (higher first, ties to the lower index): order[t] = token,
// rank[token] = t.
template <typename I>
inline void rank_by_key(const double* key, int64_t N, std::vector<int64_t>& order, I* rank) {
  order.resize(N);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::sort(order.begin(), order.end(), [key](int64_t a, int64_t b) {
    if (key[a] != key[b]) return key[a] > key[b];
    return a < b;
  });
  for (int64_t t = 0; t < N; ++t) rank[order[t]] = static_cast<I>(t);
}

// ---- the fused driver ---------------------------------------------------------------------------

// What to compute for a batch. x: (B, N, C) contiguous in T. Everything (B, N) is row-major.
template <typename T>
struct Job {
  const T* x = nullptr;
  int64_t B = 0, N = 0, C = 0;
  const bool* mask = nullptr;  // (B, N) or nullptr
  // density: k > 0 computes log rho (k nearest, self included) into log_rho (B, N)
  int64_t k = 0;
  T* log_rho = nullptr;
  // delta: ordered by keys (B, N) when given (dpc_delta; NaN/masked are mapped to -inf here), else
  // by log_rho
  bool want_delta = false;
  const double* keys = nullptr;
  T* delta = nullptr;          // (B, N)
  int64_t* parent = nullptr;   // (B, N) or nullptr
  // selection (dpc_knn): score = delta * exp(log rho)
  bool want_select = false;
  int64_t f = 0;
  int64_t center = -1;
  bool keep_center = true;
  bool sorted = true;
  int64_t* index = nullptr;    // (B, f)
  int64_t* assign = nullptr;   // (B, N) or nullptr
};

// Per-sample state and thread scratch.
template <typename T>
struct SampleWork {
  std::vector<T> xc, sq, D, rowmax, score, kbuf;
  std::vector<double> key, csum;
  std::vector<int64_t> order, perm, ccnt;
  std::vector<IndexFor<T>> rank;
  std::vector<int8_t> cls;
  std::vector<T> abest;
  int64_t nreal = 0;
  T largest = T(0);
};

// Density rows [r0, r1) of one sample whose full distance matrix is D (row stride N); also the
// largest real distance of each real row when rowmax is given.
template <typename T>
inline void full_density_rows(const Job<T>& job, int64_t b, const T* D, int64_t nreal, int64_t r0, int64_t r1,
                              T* kstore, T* rowmax) {
  const int64_t N = job.N;
  const bool* mask = job.mask ? job.mask + b * N : nullptr;
  KSmallest<T> ks;
  if (job.k > 0) ks.init(job.k, kstore);
  for (int64_t i = r0; i < r1; ++i) {
    const T* row = D + i * N;
    const bool real = mask == nullptr || mask[i];
    if (job.k > 0) {
      if (real) {
        ks.reset();
        ks.push(row, mask, N);
        job.log_rho[b * N + i] = ks.finish_log(mask != nullptr, nreal);
      } else {
        job.log_rho[b * N + i] = -inf<T>();
      }
    }
    if (rowmax) rowmax[i] = real ? row_max_real(row, mask, N, T(0)) : T(0);
  }
}

// Keys of one sample for the delta order (NaN and masked tokens -> -inf), then order and rank.
template <typename T>
inline void sample_rank(const Job<T>& job, int64_t b, SampleWork<T>& w) {
  const int64_t N = job.N;
  const bool* mask = job.mask ? job.mask + b * N : nullptr;
  w.key.resize(N);
  for (int64_t i = 0; i < N; ++i) {
    double v = job.keys ? job.keys[b * N + i] : static_cast<double>(job.log_rho[b * N + i]);
    v = nan_low(v);
    if (mask && !mask[i]) v = -inf<double>();
    w.key[i] = v;
  }
  w.rank.resize(N);
  rank_by_key(w.key.data(), N, w.order, w.rank.data());
}

// Finishes a row's delta: the highest token (no column ranked before it) gets `largest`, itself.
template <typename T>
inline void finish_delta(const Job<T>& job, int64_t b, int64_t i, T best, int64_t arg, T largest) {
  const int64_t N = job.N;
  if (arg < 0) {
    best = largest;
    arg = i;
  }
  job.delta[b * N + i] = best;
  if (job.parent) job.parent[b * N + i] = arg;
}

template <typename T>
inline void full_delta_rows(const Job<T>& job, int64_t b, const T* D, const IndexFor<T>* rank, T largest,
                            int64_t r0, int64_t r1) {
  const int64_t N = job.N;
  for (int64_t i = r0; i < r1; ++i) {
    T best = inf<T>();
    int64_t arg = -1;
    if (rank[i] > 0) delta_push(D + i * N, rank, rank[i], 0, N, best, arg);
    finish_delta(job, b, i, best, arg, largest);
  }
}

// Selection of one sample (needs log_rho and delta): writes job.index[b].
template <typename T>
inline void sample_select(const Job<T>& job, int64_t b, SampleWork<T>& w) {
  const int64_t N = job.N, f = job.f;
  const bool* mask = job.mask ? job.mask + b * N : nullptr;
  w.score.resize(N);
  w.cls.resize(N);
  for (int64_t i = 0; i < N; ++i) {
    const T s = job.delta[b * N + i] * std::exp(job.log_rho[b * N + i]);
    const bool isnan_s = s != s;
    int8_t c = isnan_s ? 2 : 3;
    if (mask && !mask[i]) c = 1;
    w.cls[i] = c;
    w.score[i] = isnan_s ? -inf<T>() : s;
  }
  int64_t* out = job.index + b * f;
  if (job.center < 0) {
    select_best(w.cls.data(), w.score.data(), N, f, job.sorted, out, w.perm);
    return;
  }
  w.cls[job.center] = 0;
  const int64_t npick = job.keep_center ? f - 1 : f;
  select_best(w.cls.data(), w.score.data(), N, npick, false, out, w.perm);
  if (job.keep_center) out[f - 1] = job.center;
  if (job.sorted) std::sort(out, out + f);
}

// Assignment rows [r0, r1) of one sample with a full distance matrix: nearest kept token by D
// (lowest position on ties); kept tokens map to their own position. best: N scratch.
template <typename T>
inline void full_assign_rows(const Job<T>& job, int64_t b, const T* D, int64_t r0, int64_t r1, T* best) {
  const int64_t N = job.N, f = job.f;
  const int64_t* idx = job.index + b * f;
  int64_t* asg = job.assign + b * N;
  if (f <= 0) return;
  {
    const T* row = D + idx[0] * N;  // D(kept, i) == D(i, kept) bitwise
    for (int64_t i = r0; i < r1; ++i) {
      best[i] = row[i];
      asg[i] = 0;
    }
  }
  for (int64_t p = 1; p < f; ++p) {
    const T* row = D + idx[p] * N;
    for (int64_t i = r0; i < r1; ++i) {
      const bool better = row[i] < best[i];
      best[i] = better ? row[i] : best[i];
      asg[i] = better ? p : asg[i];
    }
  }
  for (int64_t p = 0; p < f; ++p)
    if (idx[p] >= r0 && idx[p] < r1) asg[idx[p]] = p;
}

template <typename T>
inline int64_t count_real(const Job<T>& job, int64_t b) {
  if (!job.mask) return job.N;
  int64_t n = 0;
  for (int64_t i = 0; i < job.N; ++i) n += job.mask[b * job.N + i] ? 1 : 0;
  return n;
}

// One whole sample on the calling thread (full block).
template <typename T>
inline void full_sample(const Job<T>& job, int64_t b, SampleWork<T>& w) {
  const int64_t N = job.N, C = job.C;
  const bool* mask = job.mask ? job.mask + b * N : nullptr;
  w.xc.resize(N * C);
  w.sq.resize(N);
  w.D.resize(N * N);
  center_sample(job.x + b * N * C, N, C, mask, w.xc.data(), w.sq.data(), w.csum, w.ccnt);
  full_block_tiles(w.xc.data(), w.sq.data(), N, C, w.D.data(), 0, stair_tiles(N));
  const int64_t nreal = count_real(job, b);
  w.rowmax.resize(N);
  w.kbuf.resize(job.k > 0 ? KSmallest<T>::capacity_for(job.k) : 1);
  full_density_rows(job, b, w.D.data(), nreal, 0, N, w.kbuf.data(), job.want_delta ? w.rowmax.data() : nullptr);
  if (!job.want_delta) return;
  T largest = T(0);
  for (int64_t i = 0; i < N; ++i) largest = w.rowmax[i] > largest ? w.rowmax[i] : largest;
  sample_rank(job, b, w);
  full_delta_rows(job, b, w.D.data(), w.rank.data(), largest, 0, N);
  if (!job.want_select) return;
  sample_select(job, b, w);
  if (job.assign) {
    w.abest.resize(N);
    full_assign_rows(job, b, w.D.data(), 0, N, w.abest.data());
  }
}

// One sample with the work of each stage spread over the threads (B small, N large-ish).
template <typename T>
inline void full_sample_parallel(const Job<T>& job, int64_t b, SampleWork<T>& w, std::vector<std::vector<T>>& kbufs,
                                 int nt) {
  const int64_t N = job.N, C = job.C;
  const bool* mask = job.mask ? job.mask + b * N : nullptr;
  w.xc.resize(N * C);
  w.sq.resize(N);
  w.D.resize(N * N);
  w.rowmax.assign(N, T(0));
  w.abest.resize(N);
  center_sample(job.x + b * N * C, N, C, mask, w.xc.data(), w.sq.data(), w.csum, w.ccnt);
  const int64_t ntiles = stair_tiles(N);
  const int64_t nreal = count_real(job, b);
  const T* xc = w.xc.data();
  const T* sq = w.sq.data();
  T* D = w.D.data();
  T* rowmax = job.want_delta ? w.rowmax.data() : nullptr;
  // Tiles have decreasing cost: hand them out one by one.
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t t = 0; t < ntiles; ++t) full_block_tiles(xc, sq, N, C, D, t, t + 1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t r0 = t * kStairTile, r1 = std::min(N, r0 + kStairTile);
    full_density_rows(job, b, D, nreal, r0, r1, kbufs[thread_id()].data(), rowmax);
  }
  if (!job.want_delta) return;
  T largest = T(0);
  for (int64_t i = 0; i < N; ++i) largest = w.rowmax[i] > largest ? w.rowmax[i] : largest;
  sample_rank(job, b, w);
  const IndexFor<T>* rank = w.rank.data();
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t r0 = t * kStairTile, r1 = std::min(N, r0 + kStairTile);
    full_delta_rows(job, b, D, rank, largest, r0, r1);
  }
  if (!job.want_select) return;
  sample_select(job, b, w);
  if (job.assign) {
    T* best = w.abest.data();
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t r0 = t * kStairTile, r1 = std::min(N, r0 + kStairTile);
      full_assign_rows(job, b, D, r0, r1, best);
    }
  }
}

// ---- panel path (N > kFullMaxN) ------------------------------------------------------------------

template <typename T>
inline int64_t panel_tile_for(int64_t k) {
  int64_t tile = kPanelTile;
  const int64_t cap = KSmallest<T>::capacity_for(std::max<int64_t>(k, 1));
  while (tile > 32 && tile * cap * static_cast<int64_t>(sizeof(T)) > (int64_t(64) << 20)) tile /= 2;
  return tile;
}

template <typename T>
inline void run_panels(const Job<T>& job, int nt) {
  const int64_t B = job.B, N = job.N, C = job.C;
  const int64_t tile = panel_tile_for<T>(job.k);
  const int64_t ntiles = (N + tile - 1) / tile;
  const int64_t items = B * ntiles;
  const int64_t kcap = job.k > 0 ? KSmallest<T>::capacity_for(job.k) : 1;

  // Centred copies and norms of every sample (O(B N C), like the input).
  std::vector<T> xc(B * N * C), sq(B * N), rowmax(B * N, T(0)), largest(B, T(0));
  std::vector<int64_t> nreal(B);
  std::vector<SampleWork<T>> sw(B > 0 ? 1 : 0);
  struct Scratch {
    std::vector<T> block, tmp, kstore, best, gk, sqk;
    std::vector<int64_t> arg;
    std::vector<double> csum;
    std::vector<int64_t> ccnt;
  };
  std::vector<Scratch> scr(nt);
  for (auto& s : scr) {
    s.block.resize(tile * tile);
    s.tmp.resize(tile * tile);
    s.kstore.resize(tile * kcap);
    s.best.resize(tile);
    s.arg.resize(tile);
  }
  std::vector<std::vector<IndexFor<T>>> ranks(job.want_delta ? B : 0);
  std::vector<SampleWork<T>> per(B);

#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t b = 0; b < B; ++b) {
    Scratch& s = scr[thread_id()];
    center_sample(job.x + b * N * C, N, C, job.mask ? job.mask + b * N : nullptr, xc.data() + b * N * C,
                  sq.data() + b * N, s.csum, s.ccnt);
    nreal[b] = count_real(job, b);
  }

  // Sweep 1: density (and the largest real distance per row).
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t b = it / ntiles, a = it % ntiles;
    Scratch& s = scr[thread_id()];
    const bool* mask = job.mask ? job.mask + b * N : nullptr;
    const T* xb = xc.data() + b * N * C;
    const T* sqb = sq.data() + b * N;
    const int64_t r0 = a * tile, na = std::min(N, r0 + tile) - r0;
    std::vector<KSmallest<T>> ks(job.k > 0 ? na : 0);
    for (int64_t i = 0; i < static_cast<int64_t>(ks.size()); ++i) ks[i].init(job.k, s.kstore.data() + i * kcap);
    for (int64_t bt = 0; bt < ntiles; ++bt) {
      const int64_t c0 = bt * tile, nc = std::min(N, c0 + tile) - c0;
      canonical_block(xb, sqb, N, C, tile, a, bt, s.block.data(), tile, s.tmp.data());
      const bool* cm = mask ? mask + c0 : nullptr;
      for (int64_t i = 0; i < na; ++i) {
        const bool real = mask == nullptr || mask[r0 + i];
        if (!real) continue;
        const T* v = s.block.data() + i * tile;
        if (job.k > 0) ks[i].push(v, cm, nc);
        if (job.want_delta) rowmax[b * N + r0 + i] = row_max_real(v, cm, nc, rowmax[b * N + r0 + i]);
      }
    }
    if (job.k > 0) {
      for (int64_t i = 0; i < na; ++i) {
        const bool real = mask == nullptr || mask[r0 + i];
        job.log_rho[b * N + r0 + i] = real ? ks[i].finish_log(mask != nullptr, nreal[b]) : -inf<T>();
      }
    }
  }
  if (!job.want_delta) return;

#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t b = 0; b < B; ++b) {
    T m = T(0);
    for (int64_t i = 0; i < N; ++i) m = rowmax[b * N + i] > m ? rowmax[b * N + i] : m;
    largest[b] = m;
    sample_rank(job, b, per[b]);
  }

  // Sweep 2: delta / parent.
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t b = it / ntiles, a = it % ntiles;
    Scratch& s = scr[thread_id()];
    const T* xb = xc.data() + b * N * C;
    const T* sqb = sq.data() + b * N;
    const IndexFor<T>* rank = per[b].rank.data();
    const int64_t r0 = a * tile, na = std::min(N, r0 + tile) - r0;
    for (int64_t i = 0; i < na; ++i) {
      s.best[i] = inf<T>();
      s.arg[i] = -1;
    }
    for (int64_t bt = 0; bt < ntiles; ++bt) {
      const int64_t c0 = bt * tile, nc = std::min(N, c0 + tile) - c0;
      // Skip the block when no row of the tile has a higher token in it.
      IndexFor<T> min_rank_cols = std::numeric_limits<IndexFor<T>>::max();
      for (int64_t j = 0; j < nc; ++j) min_rank_cols = std::min(min_rank_cols, rank[c0 + j]);
      bool needed = false;
      for (int64_t i = 0; i < na && !needed; ++i) needed = rank[r0 + i] > min_rank_cols;
      if (!needed) continue;
      canonical_block(xb, sqb, N, C, tile, a, bt, s.block.data(), tile, s.tmp.data());
      for (int64_t i = 0; i < na; ++i) {
        const IndexFor<T> ri = rank[r0 + i];
        if (ri > 0) delta_push(s.block.data() + i * tile, rank + c0, ri, c0, nc, s.best[i], s.arg[i]);
      }
    }
    for (int64_t i = 0; i < na; ++i) finish_delta(job, b, r0 + i, s.best[i], s.arg[i], largest[b]);
  }
  if (!job.want_select) return;

#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t b = 0; b < B; ++b) sample_select(job, b, per[b]);
  if (!job.assign) return;

  // Assignment: distances of every token to the f kept ones (one GEMM per row tile against the
  // gathered kept tokens; same Gram form, refinement and finish as the canonical values).
  const int64_t f = job.f;
  std::vector<T> kept(B * f * C), sqk(B * f);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < f; ++p) {
      const int64_t j = job.index[b * f + p];
      std::memcpy(kept.data() + (b * f + p) * C, xc.data() + (b * N + j) * C, sizeof(T) * C);
      sqk[b * f + p] = sq[b * N + j];
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t b = it / ntiles, a = it % ntiles;
    Scratch& s = scr[thread_id()];
    const T* xb = xc.data() + b * N * C;
    const T* kb = kept.data() + b * f * C;
    const int64_t r0 = a * tile, na = std::min(N, r0 + tile) - r0;
    const DistFinish<T> fin(C);
    s.gk.resize(na * f);
    gemm_abt<T>(na, f, C, xb + r0 * C, C, kb, C, s.gk.data(), f);
    for (int64_t i = 0; i < na; ++i) {
      T* g = s.gk.data() + i * f;
      gram_row_to_dist(g, f, sq[b * N + r0 + i], sqk.data() + b * f, xb + (r0 + i) * C, kb, C, fin);
      int64_t arg = 0;
      T best = g[0];
      for (int64_t p = 1; p < f; ++p)
        if (g[p] < best) {
          best = g[p];
          arg = p;
        }
      job.assign[b * N + r0 + i] = arg;
    }
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < f; ++p) job.assign[b * N + job.index[b * f + p]] = p;
}

// Runs a job: full blocks (per sample, or inside a sample when there are fewer samples than
// threads) for N <= kFullMaxN, panels above.
template <typename T>
inline void run(const Job<T>& job) {
  if (job.B == 0 || job.N == 0) return;
  const int nt = max_threads();
  if (job.N > kFullMaxN) {
    run_panels(job, nt);
    return;
  }
  if (job.B < nt && job.N >= kIntraMinN) {
    SampleWork<T> w;
    std::vector<std::vector<T>> kbufs(nt, std::vector<T>(job.k > 0 ? KSmallest<T>::capacity_for(job.k) : 1));
    for (int64_t b = 0; b < job.B; ++b) full_sample_parallel(job, b, w, kbufs, nt);
    return;
  }
  const int used = static_cast<int>(std::min<int64_t>(nt, job.B));
  std::vector<SampleWork<T>> ws(used);
#pragma omp parallel for schedule(dynamic, 1) num_threads(used)
  for (int64_t b = 0; b < job.B; ++b) full_sample(job, b, ws[thread_id()]);
}

// ---- tensor plumbing shared by the entry points ---------------------------------------------------

// x in its compute dtype (float32 for half inputs), contiguous.
inline at::Tensor compute_input(const at::Tensor& x) {
  const auto st = x.scalar_type();
  if (st == at::kFloat || st == at::kDouble) return x.contiguous();
  return x.to(at::kFloat).contiguous();
}

inline at::ScalarType compute_dtype(at::ScalarType st) {
  return (st == at::kFloat || st == at::kDouble) ? st : at::kFloat;
}

inline void check_x(const at::Tensor& x, const char* fn) {
  TORCH_CHECK(x.dim() == 3, fn, ": x must be (B, N, C), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), fn, ": x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK(x.size(2) >= 1 || x.size(0) * x.size(1) == 0, fn, ": x must have at least one channel, got ",
              x.sizes());
}

// token_mask (B, N) -> contiguous bool tensor, or an undefined tensor.
inline at::Tensor prepare_mask(const std::optional<at::Tensor>& token_mask, int64_t B, int64_t N, const char* fn) {
  if (!token_mask.has_value() || !token_mask->defined()) return at::Tensor();
  const at::Tensor& m = *token_mask;
  TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == N, fn, ": token_mask must be (B, N) = (", B, ", ", N,
              "), got ", m.sizes());
  TORCH_CHECK(m.device().is_cpu(), fn, ": token_mask must be on the CPU like x, got ", m.device());
  return m.to(at::kBool).contiguous();
}

}  // namespace tpc
}  // namespace hot_kernels
