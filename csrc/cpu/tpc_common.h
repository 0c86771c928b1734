// Shared machinery of the token-pruning (TPC) CPU kernels: the distance block, the per-row
// statistics (k nearest, delta, assignment), the ranking comparator and the fused per-sample driver.
//
// Semantics: ../../shared/DESIGN.md and hot_kernels/reference.py (the oracle).
//
// Distances. D[i,j] = ||x_i - x_j|| / sqrt(C), computed in the Gram form d2 = |x_i|^2 + |x_j|^2 -
// 2 x_i.x_j on a per-sample *centred* copy of x (distances are translation invariant; centring
// shrinks the cancellation of the Gram form). Pairs where the Gram form cancels badly
// (d2 < (|x_i|^2 + |x_j|^2) / kRefineDiv) are recomputed exactly as sum_c (x_ic - x_jc)^2, so
// near-duplicate tokens get accurate distances and exact duplicates exactly 0. Every value is
// computed once per unordered pair {i, j} and used for both (i, j) and (j, i): bit-symmetric with an
// exactly zero diagonal by construction, which makes mutual nearest neighbours tie exactly in
// density (DESIGN.md, the tie rule).
//
// What is stored is e = max(d2, 0) (NaN -> 0), and D = finish(e) = e > 0 ? sqrt(max(e, tiny)) /
// sqrt(C) : 0 is exactly the reference's formula. finish is monotone, so the k smallest e give the
// k smallest D and the largest e the largest D; where a rule needs "the first index attaining the
// minimum D" (delta's parent, the assignment), distinct e that round to the same D are resolved
// exactly with e_hi(e), a bound on the e that can share e's D. The hot passes thus compare plain
// e values (no sqrt per pair) and still give exactly the D-based result.
//
// Two layouts, each with one definition of "the value of pair {i, j}":
//  * full block (N <= kFullMaxN): the N x N matrix of e of one sample in a buffer, upper triangle
//    computed, mirrored. fp32 on the AVX-512 and AVX2 paths: a register-blocked dot-product kernel
//    (4 x 4 blocks of pairs in ZMM registers, 4 x 3 in YMM) over the strict upper triangle only,
//    with the e computation and the mirror in its epilogue. Otherwise (float64, the generic path) a
//    "staircase" of BLAS GEMMs (at::mm): each 32-row slice of row tile t times the columns from the
//    slice's own start.
//  * panels (N > kFullMaxN): no N x N buffer. Tokens are cut into tiles; the value of a pair comes
//    from the canonical BLAS block (min tile, max tile) = X_a X_b^T (its upper triangle when
//    a == b). A row tile streams over all column tiles (recomputing the canonical block, transposed
//    when needed) into per-row states (k smallest, running minimum): one sweep for the density, one
//    for delta, so memory is O(tile^2 + tile * k + N * C) and any k in [1, N] works. The
//    assignment there comes from one more GEMM of each row tile against the kept tokens (same Gram
//    form and refinement, not the canonical blocks: equal to them up to rounding).
//
// Each Gram kernel runs on its own path only (cpu_isa::level()); the generic path uses BLAS.
#pragma once

#include "../hot_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// Instruction-set paths. Every row kernel below (the HK_MULTIVERSION ones) is compiled three times
// from one body: for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the baseline ISA (the
// extension itself is built for the baseline), and each call takes the path cpu_isa::level()
// names: the best this CPU runs, lowered at run time by HOT_KERNELS_CPU_ISA or
// hot_kernels.use_cpu_isa() (cpu_isa.cpp), so one machine can run - and CI can test - every path
// its CPU supports. Every reduction below has a fixed order, so all paths compute the same values;
// only the fp32 Gram kernels (further down) differ from the BLAS one they replace. A kernel body
// is an always_inline *_impl function: inlined into a wrapper with a target attribute, it is
// compiled for that target. Define HOT_KERNELS_NO_CLONES to build only the baseline.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__) && \
    !defined(HOT_KERNELS_NO_CLONES)
#define HK_ISA_CLONES 1
#endif
#define HK_HOT_IMPL __attribute__((always_inline)) inline

// The AVX-512 and AVX2 Gram kernels (fp32, full block), each used on its own path; BLAS otherwise.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(HOT_KERNELS_NO_AVX512)
#define HK_X86_GRAM 1
#include <immintrin.h>
#endif

namespace hot_kernels {
namespace tpc {

// ---- tuning constants -------------------------------------------------------------------------

constexpr int64_t kFullMaxN = 2048;  // largest N with a full N x N block per sample
constexpr int64_t kStairTile = 64;   // row tile of the full block (a multiple of 4)
// Rows per BLAS GEMM of a staircase tile (float64, the generic path): each GEMM starts at its own
// first row's column, which halves the part below the diagonal computed for nothing. Measured
// (fp32, 2 threads, ATen/MKL on AVX2, dpc_knn interleaved by process): 32 rows 2-5 % faster than
// 64 at N = 243 / 351, C = 512 / 1536, B = 1 and 64; 16 rows 5-10 % slower than 64 (MKL's
// small-m GEMMs).
constexpr int64_t kStairGemmRows = 32;
constexpr int64_t kPanelTile = 256;  // canonical tile of the panel path (shrinks for huge k)
// Fewer samples than threads: a sample is split over the threads when its distance block is big
// enough to pay for the extra barriers: N >= kIntraMinN, or N >= kIntraMinSplitN with N^2 C at
// least the path's threshold. On the AVX-512 path (hand-written Gram kernel) that is the work of
// N = 384 at C = 512 (TPC-MHFormer's N = 351, C = 1536 splits; N = 243, C <= 512 does not); on the
// AVX2 and generic paths the block is a slower BLAS call and splitting pays from N = 128, C = 64
// (measured at B = 1, N = 243 between torch ops, 2 threads, Zen 5 with the avx2 path forced:
// dpc_knn 0.69 -> 0.45 ms at C = 256, token_pruning_cluster 1.21 -> 0.78 ms; the AVX-512 path
// got slower when split at C = 256 and 512). On an Intel Xeon (Ice Lake server, 2 threads) the
// AVX-512 path gains from the split as the BLAS paths do (dpc_knn at B = 1, N = 243: 0.43 -> 0.34
// ms at C = 512, 0.28 -> 0.23 ms at C = 256, 0.21 -> 0.19 ms at C = 128), so there its threshold
// is the BLAS one: intra_min_work_avx512() picks by CPU vendor. The AVX2 Gram kernel takes the BLAS
// threshold: on an Intel Xeon (model 167, avx2 path forced) splitting made dpc_knn 1.32-1.48x and
// token_pruning_cluster 1.23-1.30x faster at B = 1 on all four published shapes (not measured on
// an AMD CPU).
constexpr int64_t kIntraMinN = 384;
constexpr int64_t kIntraMinSplitN = 2 * 64;  // two stair tiles
constexpr int64_t kIntraMinWorkAvx512Amd = int64_t(384) * 384 * 512;
constexpr int64_t kIntraMinWorkBlas = int64_t(128) * 128 * 64;

inline int64_t intra_min_work_avx512() {
  static const int64_t work = [] {
#if defined(__GNUC__) && defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") ? kIntraMinWorkAvx512Amd : kIntraMinWorkBlas;
#else
    return kIntraMinWorkAvx512Amd;
#endif
  }();
  return work;
}
constexpr int64_t kPadRows = 4;      // zero rows after the last token of a centred copy
constexpr int64_t kGramColBlock = 256;  // column chunk of the AVX-512 Gram kernel (a multiple of 4)
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

// The instruction-set path of this call (cpu_isa.cpp): 0 generic, 1 AVX2, 2 AVX-512.
namespace cpu_isa {
enum Level : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
int level();
}  // namespace cpu_isa

inline bool use_avx512_gram() {
#ifdef HK_X86_GRAM
  return cpu_isa::level() >= cpu_isa::kAvx512;
#else
  return false;
#endif
}

inline bool use_avx2_gram() {
#ifdef HK_X86_GRAM
  return cpu_isa::level() == cpu_isa::kAvx2;
#else
  return false;
#endif
}

// One name, three compiled paths (see HK_ISA_CLONES): name(args...) calls name_impl compiled for
// the current path. Arguments are forwarded as they are, so the body's template arguments are
// deduced exactly as for a direct call.
#ifdef HK_ISA_CLONES
#define HK_MULTIVERSION(name)                                                                            \
  template <typename... A>                                                                               \
  __attribute__((target("arch=x86-64-v4"))) inline auto name##_v4(A&&... a) {                            \
    return name##_impl(std::forward<A>(a)...);                                                           \
  }                                                                                                      \
  template <typename... A>                                                                               \
  __attribute__((target("arch=x86-64-v3"))) inline auto name##_v3(A&&... a) {                            \
    return name##_impl(std::forward<A>(a)...);                                                           \
  }                                                                                                      \
  template <typename... A>                                                                               \
  inline auto name(A&&... a) {                                                                           \
    switch (cpu_isa::level()) {                                                                          \
      case cpu_isa::kAvx512: return name##_v4(std::forward<A>(a)...);                                     \
      case cpu_isa::kAvx2: return name##_v3(std::forward<A>(a)...);                                       \
      default: return name##_impl(std::forward<A>(a)...);                                                 \
    }                                                                                                    \
  }
#else
#define HK_MULTIVERSION(name)                                                                            \
  template <typename... A>                                                                               \
  inline auto name(A&&... a) {                                                                           \
    return name##_impl(std::forward<A>(a)...);                                                           \
  }
#endif

// Row stride of a centred copy: C rounded up to 16, plus 16 (breaks the power-of-two strides whose
// rows alias in the L1 cache). The padding columns are zero.
inline int64_t row_stride(int64_t C) { return (C + 15) / 16 * 16 + 16; }

// A buffer whose data() is 64-byte aligned: zeroed (assign_zero) or not (assign_uninit). Its
// storage only grows: a buffer used again (a thread_local task scratch) keeps the largest storage it
// has had and allocates nothing when that is large enough. Fresh storage for every task would, once
// the C library hands large blocks back to the system between calls (glibc does, depending on the
// process's allocation history), cost a page fault per 4 KB touched: measured at 1.6 us each on a
// 2-core VM, about as much as the attention work itself.
template <typename T>
struct AlignedBuf {
  std::unique_ptr<T[]> u;
  T* p = nullptr;
  int64_t capacity = 0;
  // n elements, not initialised: for scratch that is written before it is read.
  void assign_uninit(int64_t n) {
    if (n > capacity || !u) {
      u.reset(new T[static_cast<size_t>(n) + 64 / sizeof(T)]);
      capacity = n;
    }
    const auto a = reinterpret_cast<std::uintptr_t>(u.get());
    p = u.get() + ((64 - a % 64) % 64) / sizeof(T);
  }
  void assign_zero(int64_t n) {
    assign_uninit(n);
    std::fill(p, p + n, T(0));
  }
  T* data() { return p; }
  const T* data() const { return p; }
};

// D from e = max(d2, 0): the reference's where(d2 > 0, sqrt(clamp_min(d2, tiny)), 0) / sqrt(C).
template <typename T>
inline T finish(T e, T scale) {
  const T tiny = std::numeric_limits<T>::min();
  return e > T(0) ? std::sqrt(e > tiny ? e : tiny) / scale : T(0);
}

template <typename T>
inline T sqrt_c(int64_t C) {
  return static_cast<T>(std::sqrt(static_cast<double>(C)));
}

// An upper bound on every e' with finish(e') == finish(e) (e' >= e). finish(e') == finish(e)
// implies e' / e <= 1 + 4 eps (two roundings: sqrt, then the division), so 16 eps is ample; below
// tiny every e shares finish(tiny). +inf stays +inf.
template <typename T>
inline T e_hi(T e) {
  const T tiny = std::numeric_limits<T>::min();
  if (!(e > T(0))) return T(0);
  return (e > tiny ? e : tiny) * (T(1) + T(16) * std::numeric_limits<T>::epsilon());
}

// sum_c (a_c - b_c)^2 with 16 partial sums (fixed order). Symmetric in (a, b) bitwise.
template <typename T>
inline T sq_dist(const T* a, const T* b, int64_t C) {
  T acc[16];
  for (int l = 0; l < 16; ++l) acc[l] = T(0);
  int64_t c = 0;
  for (; c + 16 <= C; c += 16)
    for (int l = 0; l < 16; ++l) {
      const T d = a[c + l] - b[c + l];
      acc[l] += d * d;
    }
  for (; c < C; ++c) {
    const T d = a[c] - b[c];
    acc[c & 15] += d * d;
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

// ---- centring -----------------------------------------------------------------------------------

// Channel sums of rows [0, n) (mask: only real rows), accumulated into sum.
template <typename T>
HK_HOT_IMPL void channel_sums_impl(const T* x, int64_t n, int64_t C, const bool* mask, T* sum) {
  for (int64_t i = 0; i < n; ++i) {
    if (mask && !mask[i]) continue;
    const T* xi = x + i * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) sum[c] += xi[c];
  }
}
HK_MULTIVERSION(channel_sums)

// The same over the finite entries only, with their counts (used when the plain sum is not finite).
template <typename T>
HK_HOT_IMPL void channel_sums_finite_impl(const T* x, int64_t n, int64_t C, const bool* mask, T* sum, T* cnt) {
  for (int64_t i = 0; i < n; ++i) {
    if (mask && !mask[i]) continue;
    const T* xi = x + i * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T v = xi[c];
      const bool fin = (v - v) == T(0);  // false for inf and NaN
      sum[c] += fin ? v : T(0);
      cnt[c] += fin ? T(1) : T(0);
    }
  }
}
HK_MULTIVERSION(channel_sums_finite)

// xc = x - mean (rows of xc at stride ldx; its padding is left alone) and sq_i = |xc_i|^2 (16
// partial sums, fixed order) for rows [0, n), in one pass. Non-finite entries stay non-finite.
template <typename T>
HK_HOT_IMPL void subtract_mean_impl(const T* x, int64_t n, int64_t C, const T* mean, T* xc, int64_t ldx, T* sq) {
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * C;
    T* yi = xc + i * ldx;
    T acc[16];
    for (int l = 0; l < 16; ++l) acc[l] = T(0);
    int64_t c = 0;
    for (; c + 16 <= C; c += 16)
      for (int l = 0; l < 16; ++l) {
        const T y = xi[c + l] - mean[c + l];
        yi[c + l] = y;
        acc[l] += y * y;
      }
    for (; c < C; ++c) {
      const T y = xi[c] - mean[c];
      yi[c] = y;
      acc[c & 15] += y * y;
    }
    for (int w = 8; w >= 1; w /= 2)
      for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
    sq[i] = acc[0];
  }
}
HK_MULTIVERSION(subtract_mean)

// Mean of the finite entries of the real rows of x (n rows) and, when y is given, of y's rows too
// (ny rows, all real); 0 for a channel with no finite entry. scratch: 2 C; returns scratch[0, C).
template <typename T>
inline T* channel_mean(const T* x, int64_t n, const bool* mask, const T* y, int64_t ny, int64_t C, T* scratch) {
  T* sum = scratch;
  T* cnt = scratch + C;
  std::fill(sum, sum + C, T(0));
  channel_sums(x, n, C, mask, sum);
  if (y) channel_sums(y, ny, C, static_cast<const bool*>(nullptr), sum);
  int64_t nrows = y ? ny : 0;
  if (mask) {
    for (int64_t i = 0; i < n; ++i) nrows += mask[i] ? 1 : 0;
  } else {
    nrows += n;
  }
  bool finite = true;
  for (int64_t c = 0; c < C; ++c) finite &= (sum[c] - sum[c]) == T(0);
  if (finite) {
    const T inv = nrows > 0 ? T(1) / static_cast<T>(nrows) : T(0);
    for (int64_t c = 0; c < C; ++c) sum[c] *= inv;
    return sum;
  }
  std::fill(scratch, scratch + 2 * C, T(0));
  channel_sums_finite(x, n, C, mask, sum, cnt);
  if (y) channel_sums_finite(y, ny, C, static_cast<const bool*>(nullptr), sum, cnt);
  for (int64_t c = 0; c < C; ++c) sum[c] = cnt[c] > T(0) ? sum[c] / cnt[c] : T(0);
  return sum;
}

// Centres one sample on the mean of the finite entries of its real tokens: xc rows at stride ldx
// (padding untouched: keep it zero), sq[i] = |xc_i|^2. scratch: 2 C.
template <typename T>
inline void center_sample(const T* x, int64_t N, int64_t C, const bool* mask, T* xc, int64_t ldx, T* sq,
                          T* scratch) {
  const T* mean = channel_mean(x, N, mask, static_cast<const T*>(nullptr), 0, C, scratch);
  subtract_mean(x, N, C, mean, xc, ldx, sq);
}

// ---- Gram values -> e -----------------------------------------------------------------------------

// A row segment of Gram values -> e, in place: g[j] = x_i . y_j on entry, e(i, j) on exit. sq_i =
// |x_i|^2, sqy[j] = |y_j|^2; xi and the rows of y (stride ldy) for the exact recomputation.
template <typename T>
HK_HOT_IMPL void gram_to_e_impl(T* g, int64_t n, T sq_i, const T* sqy, const T* xi, const T* y, int64_t ldy, int64_t C) {
  const T div = static_cast<T>(kRefineDiv);
  int refine = 0;
  for (int64_t j = 0; j < n; ++j) {
    const T s = sq_i + sqy[j];
    const T d2 = s - (g[j] + g[j]);
    refine |= (d2 * div < s);
    g[j] = d2 > T(0) ? d2 : T(0);  // NaN -> 0, like the reference's where(d2 > 0, ...)
  }
  if (!refine) return;
  for (int64_t j = 0; j < n; ++j) {
    if (g[j] * div < sq_i + sqy[j]) {
      const T d2 = sq_dist(xi, y + j * ldy, C);
      g[j] = d2 > T(0) ? d2 : T(0);
    }
  }
}
HK_MULTIVERSION(gram_to_e)

// In place e -> D over n values.
template <typename T>
HK_HOT_IMPL void e_to_dist_impl(T* v, int64_t n, T scale) {
  for (int64_t j = 0; j < n; ++j) v[j] = finish(v[j], scale);
}
HK_MULTIVERSION(e_to_dist)

// ---- full block (N <= kFullMaxN) ---------------------------------------------------------------

inline int64_t stair_tiles(int64_t N) { return (N + kStairTile - 1) / kStairTile; }

// The e values of rows [r0, r1) (one staircase tile whose GEMM is done): upper part from the Gram
// entries, mirrored, zero diagonal.
template <typename T>
HK_HOT_IMPL void stair_rows_to_e_impl(const T* xc, int64_t ld, const T* sq, int64_t N, int64_t C, T* D, int64_t r0,
                            int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    T* row = D + i * N;
    row[i] = T(0);
    const int64_t n = N - i - 1;
    if (n <= 0) continue;
    gram_to_e_impl(row + i + 1, n, sq[i], sq + i + 1, xc + i * ld, xc + (i + 1) * ld, ld, C);
    T* col = D + (i + 1) * N + i;
    for (int64_t j = 0; j < n; ++j) col[j * N] = row[i + 1 + j];
  }
}
HK_MULTIVERSION(stair_rows_to_e)

#ifdef HK_X86_GRAM
// The Gram kernels' prefetch of the caller's next input: bytes from pf pulled into L2 in even steps,
// one step per block of pairs, over the about (rows / 4) x (cols / block_cols) / 2 blocks of the
// triangle (rows x cols: the tile's rows times the columns from its first row). The kernels are
// compute-bound; the next first pass over an input is memory-bound.
struct PrefetchPacer {
  const char* pf;
  int64_t bytes, step, at = 0;
  PrefetchPacer(const char* p, int64_t n, int64_t rows, int64_t cols, int64_t block_cols)
      : pf(p), bytes(p ? n : 0) {
    const int64_t blocks = std::max<int64_t>(1, (rows / 4 + 1) * (cols / block_cols + 1) / 2);
    step = p ? (n / 64) / blocks + 1 : 0;
  }
  void next() {
    for (int64_t q = 0; q < step && at < bytes; ++q, at += 64) _mm_prefetch(pf + at, _MM_HINT_T1);
  }
};

namespace avx512 {

// (The zero-masking forms with a full mask are the plain instructions; unlike the plain intrinsics
// they have no undefined pass-through operand, which GCC's -Wmaybe-uninitialized flags.)
constexpr __mmask16 kAll = 0xFFFF;

// 16 vectors -> one vector of their 16 horizontal sums: lane 4 (m % 4) + m / 4 = sum of v[m].
__attribute__((target("avx512f"))) inline __m512 hsum16(const __m512* v) {
  __m512 w[8];
  for (int p = 0; p < 8; ++p)
    w[p] = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(kAll, v[2 * p], v[2 * p + 1], 0x44),
                         _mm512_maskz_shuffle_f32x4(kAll, v[2 * p], v[2 * p + 1], 0xEE));
  __m512 x[4];
  for (int q = 0; q < 4; ++q)
    x[q] = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(kAll, w[2 * q], w[2 * q + 1], 0x88),
                         _mm512_maskz_shuffle_f32x4(kAll, w[2 * q], w[2 * q + 1], 0xDD));
  __m512 y[2];
  for (int r = 0; r < 2; ++r) {
    const __m512d a = _mm512_castps_pd(x[2 * r]), b = _mm512_castps_pd(x[2 * r + 1]);
    y[r] = _mm512_add_ps(_mm512_castpd_ps(_mm512_maskz_unpacklo_pd(0xFF, a, b)), _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(0xFF, a, b)));
  }
  return _mm512_add_ps(_mm512_maskz_shuffle_ps(kAll, y[0], y[1], 0x88), _mm512_maskz_shuffle_ps(kAll, y[0], y[1], 0xDD));
}

// The epilogue of one 4 x 4 block (kept out of line, so that the kernel's k-loop has all 32
// registers for its accumulators and operands): g (lane 4 s + r = x_{i0+r} . x_{j+s}) -> e, the
// exact recomputation of badly cancelling pairs, and the stores of D(i, j) and D(j, i) for the
// pairs with i < j < N.
__attribute__((target("avx512f"), noinline)) inline void block_epilogue(__m512 g, const float* xc, int64_t ld,
                                                                       int64_t C, const float* sq, int64_t N,
                                                                       float* D, int64_t i0, int64_t j) {
  const __m512i idx_r = _mm512_set_epi32(3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0);  // lane p: p % 4
  const __m512i idx_s = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);  // lane p: p / 4
  const __m512 sqi = _mm512_maskz_permutexvar_ps(kAll, idx_r, _mm512_zextps128_ps512(_mm_loadu_ps(sq + i0)));
  const __m512 sqj = _mm512_maskz_permutexvar_ps(kAll, idx_s, _mm512_zextps128_ps512(_mm_loadu_ps(sq + j)));
  const __m512 s = _mm512_add_ps(sqi, sqj);
  const __m512 d2 = _mm512_sub_ps(s, _mm512_add_ps(g, g));
  __m512 e = _mm512_maskz_max_ps(kAll, d2, _mm512_setzero_ps());  // NaN -> 0 (the second operand)
  const __m512i ii = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(i0)), idx_r);
  const __m512i jj = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(j)), idx_s);
  const __mmask16 valid =
      _mm512_cmpgt_epi32_mask(jj, ii) & _mm512_cmplt_epi32_mask(jj, _mm512_set1_epi32(static_cast<int>(N)));
  const __mmask16 refine =
      _mm512_cmp_ps_mask(_mm512_mul_ps(d2, _mm512_set1_ps(static_cast<float>(kRefineDiv))), s, _CMP_LT_OQ) & valid;
  alignas(64) float te[16];
  if (refine) {
    _mm512_store_ps(te, e);
    for (int p = 0; p < 16; ++p) {
      if (!((refine >> p) & 1)) continue;
      const int64_t i = i0 + (p & 3), jx = j + (p >> 2);
      const float v = sq_dist(xc + i * ld, xc + jx * ld, C);
      te[p] = v > 0.f ? v : 0.f;
    }
    e = _mm512_load_ps(te);
  }
  if (valid == 0xFFFF) {
    _mm_storeu_ps(D + (j + 0) * N + i0, _mm512_maskz_extractf32x4_ps(0xF, e, 0));
    _mm_storeu_ps(D + (j + 1) * N + i0, _mm512_maskz_extractf32x4_ps(0xF, e, 1));
    _mm_storeu_ps(D + (j + 2) * N + i0, _mm512_maskz_extractf32x4_ps(0xF, e, 2));
    _mm_storeu_ps(D + (j + 3) * N + i0, _mm512_maskz_extractf32x4_ps(0xF, e, 3));
    // transpose: lane 4 r + s <- lane 4 s + r
    const __m512i idx_t = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    const __m512 et = _mm512_maskz_permutexvar_ps(kAll, idx_t, e);
    _mm_storeu_ps(D + (i0 + 0) * N + j, _mm512_maskz_extractf32x4_ps(0xF, et, 0));
    _mm_storeu_ps(D + (i0 + 1) * N + j, _mm512_maskz_extractf32x4_ps(0xF, et, 1));
    _mm_storeu_ps(D + (i0 + 2) * N + j, _mm512_maskz_extractf32x4_ps(0xF, et, 2));
    _mm_storeu_ps(D + (i0 + 3) * N + j, _mm512_maskz_extractf32x4_ps(0xF, et, 3));
  } else if (valid) {
    _mm512_store_ps(te, e);
    for (int p = 0; p < 16; ++p) {
      if (!((valid >> p) & 1)) continue;
      const int64_t i = i0 + (p & 3), jx = j + (p >> 2);
      D[i * N + jx] = te[p];
      D[jx * N + i] = te[p];
    }
  }
}

// The e values of rows [r0, r1) (r0 a multiple of 4) of the full block: D(i, j) for j > i and its
// mirror D(j, i), D(i, i) = 0. xc: 64-byte aligned rows at stride ld (a multiple of 16), zero
// beyond column C up to ck = C rounded up to 16, and kPadRows zero rows after row N - 1; sq has
// kPadRows zeros after entry N - 1. Each 4 x 4 block of pairs accumulates 16 dot products over the
// channels in 16 lanes, reduced by a fixed shuffle tree (the same association for every pair);
// lane 4 s + r holds pair (i0 + r, j + s). Columns are taken in chunks of kGramColBlock tokens so
// that the chunk's rows and the tile's rows stay in L2. pf / pf_bytes: memory prefetched into L2
// along the way (PrefetchPacer).
__attribute__((target("avx512f"))) inline void upper_e_rows(const float* xc, int64_t ld, int64_t ck, int64_t C,
                                                            const float* sq, int64_t N, float* D, int64_t r0,
                                                            int64_t r1, const char* pf, int64_t pf_bytes) {
  for (int64_t i = r0; i < r1; ++i) D[i * N + i] = 0.f;
  PrefetchPacer prefetch(pf, pf_bytes, r1 - r0, N - r0, 4);
  for (int64_t jb0 = r0; jb0 < N; jb0 += kGramColBlock) {
    const int64_t jb1 = std::min(N, jb0 + kGramColBlock);
    for (int64_t i0 = r0; i0 < r1 && i0 < jb1; i0 += 4) {
      const float* A = xc + i0 * ld;
      for (int64_t j = std::max(jb0, i0); j < jb1; j += 4) {
        prefetch.next();
        const float* Bp = xc + j * ld;
        __m512 acc[16];
        for (int m = 0; m < 16; ++m) acc[m] = _mm512_setzero_ps();
        for (int64_t k = 0; k < ck; k += 16) {
          const __m512 b0 = _mm512_load_ps(Bp + k), b1 = _mm512_load_ps(Bp + ld + k);
          const __m512 b2 = _mm512_load_ps(Bp + 2 * ld + k), b3 = _mm512_load_ps(Bp + 3 * ld + k);
          for (int r = 0; r < 4; ++r) {
            const __m512 a = _mm512_load_ps(A + r * ld + k);
            acc[4 * r + 0] = _mm512_fmadd_ps(a, b0, acc[4 * r + 0]);
            acc[4 * r + 1] = _mm512_fmadd_ps(a, b1, acc[4 * r + 1]);
            acc[4 * r + 2] = _mm512_fmadd_ps(a, b2, acc[4 * r + 2]);
            acc[4 * r + 3] = _mm512_fmadd_ps(a, b3, acc[4 * r + 3]);
          }
        }
        block_epilogue(hsum16(acc), xc, ld, C, sq, N, D, i0, j);
      }
    }
  }
}

}  // namespace avx512

// The AVX2 Gram kernel: the same triangle walk with 4 x 3 blocks of pairs, sized for the 16 YMM
// registers (12 accumulators, 3 column rows, 1 row operand). Block (i0, j): the 12 dot products
// x_{i0+r} . x_{j+s} (r < 4, s < 3), each accumulated over the channels in 8 lanes and reduced by a
// fixed tree (pairs, quads, then the two 128-bit halves: the same association for every pair).
namespace avx2 {

// Lane r of the result = the sum of the 8 lanes of v[r].
__attribute__((target("avx2,fma"))) inline __m128 hsum4(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// The epilogue of one 4 x 3 block (out of line, like the AVX-512 one): g[s] (lane r = x_{i0+r} .
// x_{j+s}) -> e, the exact recomputation of badly cancelling pairs, and the stores of D(i, j) and
// D(j, i) for the pairs with i < j < jend.
__attribute__((target("avx2,fma"), noinline)) inline void block_epilogue(const __m128* g, const float* xc, int64_t ld,
                                                                        int64_t C, const float* sq, int64_t N,
                                                                        float* D, int64_t i0, int64_t j,
                                                                        int64_t jend) {
  const __m128 sqi = _mm_loadu_ps(sq + i0);
  const __m128 div = _mm_set1_ps(static_cast<float>(kRefineDiv));
  alignas(16) float te[3][4];
  for (int s = 0; s < 3; ++s) {
    const __m128 sv = _mm_add_ps(sqi, _mm_set1_ps(sq[j + s]));
    const __m128 d2 = _mm_sub_ps(sv, _mm_add_ps(g[s], g[s]));
    _mm_store_ps(te[s], _mm_max_ps(d2, _mm_setzero_ps()));  // NaN -> 0 (the second operand)
    const int refine = _mm_movemask_ps(_mm_cmplt_ps(_mm_mul_ps(d2, div), sv));
    if (!refine) continue;
    for (int r = 0; r < 4; ++r) {
      const int64_t i = i0 + r, jx = j + s;
      if (!((refine >> r) & 1) || jx <= i || jx >= jend) continue;
      const float v = sq_dist(xc + i * ld, xc + jx * ld, C);
      te[s][r] = v > 0.f ? v : 0.f;
    }
  }
  if (i0 + 3 < j && j + 2 < jend) {
    for (int s = 0; s < 3; ++s) {
      _mm_storeu_ps(D + (j + s) * N + i0, _mm_load_ps(te[s]));
      for (int r = 0; r < 4; ++r) D[(i0 + r) * N + j + s] = te[s][r];
    }
    return;
  }
  for (int s = 0; s < 3; ++s)
    for (int r = 0; r < 4; ++r) {
      const int64_t i = i0 + r, jx = j + s;
      if (jx <= i || jx >= jend) continue;
      D[i * N + jx] = te[s][r];
      D[jx * N + i] = te[s][r];
    }
}

// As avx512::upper_e_rows (same layout contract for xc and sq; ck = C rounded up to 16), with 4 x 3
// blocks: a row group i0 takes the columns from i0 + 1 in steps of 3, each chunk of kGramColBlock
// columns ending its last block at the chunk's end (lanes past it are not stored).
__attribute__((target("avx2,fma"))) inline void upper_e_rows(const float* xc, int64_t ld, int64_t ck, int64_t C,
                                                          const float* sq, int64_t N, float* D, int64_t r0,
                                                          int64_t r1, const char* pf, int64_t pf_bytes) {
  for (int64_t i = r0; i < r1; ++i) D[i * N + i] = 0.f;
  PrefetchPacer prefetch(pf, pf_bytes, r1 - r0, N - r0, 3);
  for (int64_t jb0 = r0; jb0 < N; jb0 += kGramColBlock) {
    const int64_t jb1 = std::min(N, jb0 + kGramColBlock);
    for (int64_t i0 = r0; i0 < r1 && i0 + 1 < jb1; i0 += 4) {
      const float* A = xc + i0 * ld;
      for (int64_t j = std::max(jb0, i0 + 1); j < jb1; j += 3) {
        prefetch.next();
        const float* Bp = xc + j * ld;
        __m256 acc[12];
        for (int m = 0; m < 12; ++m) acc[m] = _mm256_setzero_ps();
        for (int64_t k = 0; k < ck; k += 8) {
          const __m256 b0 = _mm256_load_ps(Bp + k), b1 = _mm256_load_ps(Bp + ld + k);
          const __m256 b2 = _mm256_load_ps(Bp + 2 * ld + k);
          for (int r = 0; r < 4; ++r) {
            const __m256 a = _mm256_load_ps(A + r * ld + k);
            acc[3 * r + 0] = _mm256_fmadd_ps(a, b0, acc[3 * r + 0]);
            acc[3 * r + 1] = _mm256_fmadd_ps(a, b1, acc[3 * r + 1]);
            acc[3 * r + 2] = _mm256_fmadd_ps(a, b2, acc[3 * r + 2]);
          }
        }
        const __m128 g[3] = {hsum4(acc[0], acc[3], acc[6], acc[9]), hsum4(acc[1], acc[4], acc[7], acc[10]),
                             hsum4(acc[2], acc[5], acc[8], acc[11])};
        block_epilogue(g, xc, ld, C, sq, N, D, i0, j, jb1);
      }
    }
  }
}

}  // namespace avx2
#endif

// Row tiles [t0, t1) (kStairTile rows each) of the full N x N e block of one sample. Different
// tiles touch disjoint entries (a row's mirror writes land left of every later tile's columns), so
// tiles may run in parallel. xc: see avx512::upper_e_rows (the BLAS path needs only the stride).
// prefetch / prefetch_bytes: memory the caller reads next (may be null), pulled into L2 meanwhile.
template <typename T>
inline void full_block_tiles(const T* xc, int64_t ld, const T* sq, int64_t N, int64_t C, T* D, int64_t t0,
                             int64_t t1, const void* prefetch = nullptr, int64_t prefetch_bytes = 0) {
#ifdef HK_X86_GRAM
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx512_gram()) {
      avx512::upper_e_rows(xc, ld, (C + 15) / 16 * 16, C, sq, N, D, t0 * kStairTile, std::min(N, t1 * kStairTile),
                           static_cast<const char*>(prefetch), prefetch ? prefetch_bytes : 0);
      return;
    }
    if (use_avx2_gram()) {
      avx2::upper_e_rows(xc, ld, (C + 15) / 16 * 16, C, sq, N, D, t0 * kStairTile, std::min(N, t1 * kStairTile),
                         static_cast<const char*>(prefetch), prefetch ? prefetch_bytes : 0);
      return;
    }
  }
#endif
  (void)prefetch;
  (void)prefetch_bytes;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t r0 = t * kStairTile, r1 = std::min(N, r0 + kStairTile);
    for (int64_t s0 = r0; s0 < r1; s0 += kStairGemmRows) {
      const int64_t s1 = std::min(r1, s0 + kStairGemmRows);
      gemm_abt<T>(s1 - s0, N - s0, C, xc + s0 * ld, ld, xc + s0 * ld, ld, D + s0 * N + s0, N);
    }
    stair_rows_to_e(xc, ld, sq, N, C, D, r0, r1);
  }
}

// ---- panels (N > kFullMaxN) --------------------------------------------------------------------

template <typename T>
HK_HOT_IMPL void transpose_block_impl(const T* src, int64_t rows, int64_t cols, T* dst, int64_t ldd) {
  // dst[j][i] = src[i][j], src rows x cols (ld cols)
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * ldd + i] = src[i * cols + j];
}
HK_MULTIVERSION(transpose_block)

// The canonical e values between the tokens of tile a (rows) and tile b (columns), into out (rows
// of tile a, ld = ldo). scratch: tile * tile. Tile t covers [t * tile, min(N, (t + 1) * tile)).
template <typename T>
inline void canonical_block(const T* xc, int64_t ld, const T* sq, int64_t N, int64_t C, int64_t tile, int64_t a,
                            int64_t b, T* out, int64_t ldo, T* scratch) {
  const int64_t ra = a * tile, na = std::min(N, ra + tile) - ra;
  const int64_t rb = b * tile, nb = std::min(N, rb + tile) - rb;
  if (a < b) {
    gemm_abt<T>(na, nb, C, xc + ra * ld, ld, xc + rb * ld, ld, out, ldo);
    for (int64_t i = 0; i < na; ++i)
      gram_to_e(out + i * ldo, nb, sq[ra + i], sq + rb, xc + (ra + i) * ld, xc + rb * ld, ld, C);
  } else if (a > b) {  // the canonical block is (b, a): compute it, transpose it into out
    gemm_abt<T>(nb, na, C, xc + rb * ld, ld, xc + ra * ld, ld, scratch, na);
    for (int64_t j = 0; j < nb; ++j)
      gram_to_e(scratch + j * na, na, sq[rb + j], sq + ra, xc + (rb + j) * ld, xc + ra * ld, ld, C);
    transpose_block(scratch, nb, na, out, ldo);
  } else {
    gemm_abt<T>(na, na, C, xc + ra * ld, ld, xc + ra * ld, ld, out, ldo);
    for (int64_t i = 0; i < na; ++i) {
      T* row = out + i * ldo;
      row[i] = T(0);
      const int64_t n = na - i - 1;
      if (n > 0)
        gram_to_e(row + i + 1, n, sq[ra + i], sq + ra + i + 1, xc + (ra + i) * ld, xc + (ra + i + 1) * ld, ld, C);
      for (int64_t j = i + 1; j < na; ++j) out[j * ldo + i] = row[j];
    }
  }
}

// ---- per-row state: the k smallest e of a row (a multiset; self included) ------------------------

// A row's own entry is exactly 0, the least possible value, so its k smallest are {0} and the k - 1
// smallest of the other columns; only those are tracked, among values < +inf (a +inf or masked
// value is never a neighbour: the reference's masked_fill(+inf) + topk). For ko = k - 1:
//  * ko == 1: a running minimum (a vectorised reduction);
//  * ko <= kLaneKMax: kLanes lanes each keeping its own ko smallest with a branch-free min/max
//    insertion network (vectorised across lanes); the row's ko smallest are among the lanes';
//  * larger: an unsorted buffer of 2 ko values, cut back to the ko smallest by nth_element when full
//    (amortised O(1) per value); values >= the current ko-th smallest are not stored.
constexpr int kLaneK = 8;      // unrolled networks up to this depth
constexpr int kLaneKMax = 32;  // run-time depth networks up to this one
constexpr int kLanes = 16;

template <typename T>
struct KState {
  T* buf = nullptr;  // lanes: ko * kLanes values (buf[t * kLanes + l]); big: 2 ko values
  int64_t k = 1;
  int64_t ko = 0;
  int64_t n = 0;     // big: values stored
  T thr = inf<T>();  // ko == 1: the minimum; big: a value must be < thr to be stored

  static int64_t capacity_for(int64_t k) {
    const int64_t ko = k - 1;
    return ko <= 1 ? 1 : (ko <= kLaneKMax ? ko * kLanes : 2 * ko);
  }
  bool lanes() const { return ko >= 2 && ko <= kLaneKMax; }
  void init(int64_t k_, T* storage) {
    k = k_;
    ko = k - 1;
    buf = storage;
    reset();
  }
  void reset() {
    n = 0;
    thr = inf<T>();
    if (lanes()) std::fill(buf, buf + ko * kLanes, inf<T>());
  }
};

template <typename T>
HK_HOT_IMPL T min_pen_impl(const T* v, const T* pen, int64_t len, T m) {
  if (pen == nullptr) {
#pragma omp simd reduction(min : m)
    for (int64_t j = 0; j < len; ++j) m = v[j] < m ? v[j] : m;
  } else {
#pragma omp simd reduction(min : m)
    for (int64_t j = 0; j < len; ++j) {
      const T x = v[j] + pen[j];
      m = x < m ? x : m;
    }
  }
  return m;
}
HK_MULTIVERSION(min_pen)

// The scalar tail shared by both pushes: values j0 <= j < len (fewer than kLanes) go into lane
// j - j0, through the same compare-exchange chain as the vector body.
template <typename T>
inline void lanes_push_tail(T* m, int64_t K, const T* v, const T* pen, int64_t j0, int64_t len) {
  constexpr int W = kLanes;
  for (int64_t j = j0; j < len; ++j) {
    const int l = static_cast<int>(j - j0);
    T x = pen == nullptr ? v[j] : v[j] + pen[j];
    for (int64_t t = 0; t < K; ++t) {
      const T a = m[t * W + l];
      const T lo = x < a ? x : a;
      x = x < a ? a : x;
      m[t * W + l] = lo;
    }
  }
}

template <typename T, int K>
HK_HOT_IMPL void lanes_push_impl(T* m, const T* v, const T* pen, int64_t len) {
  constexpr int W = kLanes;
  int64_t j0 = 0;
  for (; j0 + W <= len; j0 += W) {
    if (pen == nullptr) {
#pragma omp simd
      for (int l = 0; l < W; ++l) {
        T x = v[j0 + l];
        for (int t = 0; t < K; ++t) {
          const T mt = m[t * W + l];
          const T lo = x < mt ? x : mt;
          x = x < mt ? mt : x;
          m[t * W + l] = lo;
        }
      }
    } else {
#pragma omp simd
      for (int l = 0; l < W; ++l) {
        T x = v[j0 + l] + pen[j0 + l];
        for (int t = 0; t < K; ++t) {
          const T mt = m[t * W + l];
          const T lo = x < mt ? x : mt;
          x = x < mt ? mt : x;
          m[t * W + l] = lo;
        }
      }
    }
  }
  lanes_push_tail(m, K, v, pen, j0, len);
}
#ifdef HK_ISA_CLONES
template <typename T, int K>
__attribute__((target("arch=x86-64-v4"))) inline void lanes_push_v4(T* m, const T* v, const T* pen, int64_t len) {
  lanes_push_impl<T, K>(m, v, pen, len);
}
template <typename T, int K>
__attribute__((target("arch=x86-64-v3"))) inline void lanes_push_v3(T* m, const T* v, const T* pen, int64_t len) {
  lanes_push_impl<T, K>(m, v, pen, len);
}
#endif
template <typename T, int K>
inline void lanes_push(T* m, const T* v, const T* pen, int64_t len) {
#ifdef HK_ISA_CLONES
  switch (cpu_isa::level()) {
    case cpu_isa::kAvx512: return lanes_push_v4<T, K>(m, v, pen, len);
    case cpu_isa::kAvx2: return lanes_push_v3<T, K>(m, v, pen, len);
    default: break;
  }
#endif
  lanes_push_impl<T, K>(m, v, pen, len);
}

// The same network with a run-time depth K (kLaneK < K <= kLaneKMax).
template <typename T>
HK_HOT_IMPL void lanes_push_dyn_impl(T* m, int64_t K, const T* v, const T* pen, int64_t len) {
  constexpr int W = kLanes;
  int64_t j0 = 0;
  for (; j0 + W <= len; j0 += W) {
    T x[W];
    if (pen == nullptr) {
      for (int l = 0; l < W; ++l) x[l] = v[j0 + l];
    } else {
      for (int l = 0; l < W; ++l) x[l] = v[j0 + l] + pen[j0 + l];
    }
    for (int64_t t = 0; t < K; ++t) {
      T* mt = m + t * W;
#pragma omp simd
      for (int l = 0; l < W; ++l) {
        const T a = mt[l];
        const T lo = x[l] < a ? x[l] : a;
        x[l] = x[l] < a ? a : x[l];
        mt[l] = lo;
      }
    }
  }
  lanes_push_tail(m, K, v, pen, j0, len);
}
HK_MULTIVERSION(lanes_push_dyn)

template <typename T>
inline void big_insert(KState<T>& s, T x) {
  s.buf[s.n++] = x;
  if (s.n == 2 * s.ko) {
    std::nth_element(s.buf, s.buf + (s.ko - 1), s.buf + s.n);
    s.n = s.ko;
    s.thr = s.buf[s.ko - 1];
  }
}

template <typename T>
HK_HOT_IMPL void big_push_impl(KState<T>& s, const T* v, const T* pen, int64_t len) {
  constexpr int64_t W = 16;
  int64_t j0 = 0;
  for (; j0 + W <= len; j0 += W) {
    const T t = s.thr;
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t l = 0; l < W; ++l) any |= static_cast<int>(v[j0 + l] < t);
    if (!any) continue;
    for (int64_t j = j0; j < j0 + W; ++j)
      if (v[j] < s.thr && (pen == nullptr || pen[j] == T(0))) big_insert(s, v[j]);
  }
  for (int64_t j = j0; j < len; ++j)
    if (v[j] < s.thr && (pen == nullptr || pen[j] == T(0))) big_insert(s, v[j]);
}
HK_MULTIVERSION(big_push)

template <typename T>
inline void kstate_push_range(KState<T>& s, const T* v, const T* pen, int64_t len) {
  if (len <= 0 || s.ko == 0) return;
  if (s.ko == 1) {
    s.thr = min_pen(v, pen, len, s.thr);
    return;
  }
  if (!s.lanes()) return big_push(s, v, pen, len);
  switch (s.ko) {
    case 2: return lanes_push<T, 2>(s.buf, v, pen, len);
    case 3: return lanes_push<T, 3>(s.buf, v, pen, len);
    case 4: return lanes_push<T, 4>(s.buf, v, pen, len);
    case 5: return lanes_push<T, 5>(s.buf, v, pen, len);
    case 6: return lanes_push<T, 6>(s.buf, v, pen, len);
    case 7: return lanes_push<T, 7>(s.buf, v, pen, len);
    case 8: return lanes_push<T, 8>(s.buf, v, pen, len);
    default: return lanes_push_dyn(s.buf, s.ko, v, pen, len);
  }
}

// Values v[0..len) of columns with penalties pen[0..len) (0: real, +inf: masked; nullptr: all real;
// e is never NaN and e + 0 == e, so v + pen is v for a real column and +inf for a masked one), the
// row's own column at `self` (or -1 when it is not in this range) skipped.
template <typename T>
inline void kstate_push(KState<T>& s, const T* v, const T* pen, int64_t len, int64_t self) {
  if (self < 0 || self >= len) return kstate_push_range(s, v, pen, len);
  kstate_push_range(s, v, pen, self);
  kstate_push_range(s, v + self + 1, pen ? pen + self + 1 : pen, len - self - 1);
}

// log rho = -(sum over the k nearest, ascending, of D^2) / count. Without a mask a missing
// neighbour (+inf) makes it -inf; with one, missing neighbours add 0 and count = clamp(nreal, 1, k).
template <typename T>
inline T kstate_log_density(KState<T>& s, T scale, bool mask_mode, int64_t nreal) {
  T small[kLaneKMax];
  const T* vals = s.buf;
  int64_t m = 0;  // others found
  if (s.ko == 1) {
    small[0] = s.thr;
    m = small[0] < inf<T>() ? 1 : 0;
    vals = small;
  } else if (s.lanes()) {
    // The ko smallest of the lane values (+inf = empty), ascending, by insertion. Each lane is
    // sorted (buf[t * kLanes + l] ascends with t), so once a whole depth level adds nothing, no
    // deeper one can.
    for (int64_t t = 0; t < s.ko; ++t) small[t] = inf<T>();
    for (int64_t t = 0; t < s.ko; ++t) {
      bool added = false;
      for (int l = 0; l < kLanes; ++l) {
        const T x = s.buf[t * kLanes + l];
        if (!(x < small[s.ko - 1])) continue;
        int64_t p = s.ko - 1;
        while (p > 0 && small[p - 1] > x) {
          small[p] = small[p - 1];
          --p;
        }
        small[p] = x;
        added = true;
      }
      if (!added) break;
    }
    while (m < s.ko && small[m] < inf<T>()) ++m;
    vals = small;
  } else if (s.ko > 0) {
    if (s.n > s.ko) std::nth_element(s.buf, s.buf + (s.ko - 1), s.buf + s.n);
    m = std::min(s.n, s.ko);
    std::sort(s.buf, s.buf + m);
  }
  T sum = T(0);  // the row's own D = 0 comes first
  for (int64_t t = 0; t < m; ++t) {
    const T d = finish(vals[t], scale);
    sum += d * d;
  }
  if (!mask_mode) {
    if (m < s.ko) sum = inf<T>();
    return -(sum / static_cast<T>(s.k));
  }
  const int64_t count = std::min<int64_t>(std::max<int64_t>(nreal, 1), s.k);
  return -(sum / static_cast<T>(count));
}

// ---- per-row state: the first column attaining the minimum D among higher tokens ---------------

template <typename T>
struct MinState {
  T d = inf<T>();      // the minimum D so far
  T bound = inf<T>();  // e_hi of its e: a later column can only win with e <= bound
  int64_t arg = -1;    // -1: no candidate yet
};

// A candidate column (columns arrive in increasing index order): wins if it is the first one, or
// its D is strictly smaller (so among equal D the lowest index stays).
template <typename T>
inline void minstate_offer(MinState<T>& s, T e, int64_t j, T scale) {
  const T d = finish(e, scale);
  if (s.arg < 0 || d < s.d) {
    s.d = d;
    s.bound = e_hi(e);
    s.arg = j;
  }
}

// Streaming form (panel path): columns j0 + [0, len) of a row, e values v, ranks rank[0..len);
// candidates are the columns ranked before ri (the higher tokens).
template <typename T>
HK_HOT_IMPL void delta_push_impl(MinState<T>& s, const T* v, const IndexFor<T>* rank, IndexFor<T> ri, int64_t j0, int64_t len,
                       T scale) {
  constexpr int64_t W = 16;
  int64_t c0 = 0;
  // Until the first candidate, take the first higher column whatever its value.
  for (; c0 < len && s.arg < 0; ++c0)
    if (rank[c0] < ri) minstate_offer(s, v[c0], j0 + c0, scale);
  for (; c0 + W <= len; c0 += W) {
    const T b = s.bound;
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t l = 0; l < W; ++l) any |= static_cast<int>(rank[c0 + l] < ri) & static_cast<int>(v[c0 + l] <= b);
    if (!any) continue;
    for (int64_t c = c0; c < c0 + W; ++c)
      if (rank[c] < ri && v[c] <= s.bound) minstate_offer(s, v[c], j0 + c, scale);
  }
  for (; c0 < len; ++c0)
    if (rank[c0] < ri && v[c0] <= s.bound) minstate_offer(s, v[c0], j0 + c0, scale);
}
HK_MULTIVERSION(delta_push)

// Full-row form: the first column attaining the minimum D among the columns ranked before ri
// (ri > 0, so there is one). A min-reduction of e over those columns, then the first of them whose
// D equals finish(min) (an e up to e_hi(min) may round to the same D). Returns D, sets arg.
template <typename T>
HK_HOT_IMPL T delta_row_impl(const T* v, const IndexFor<T>* rank, IndexFor<T> ri, int64_t N, T scale, int64_t& arg) {
  T m = inf<T>();
#pragma omp simd reduction(min : m)
  for (int64_t j = 0; j < N; ++j) {
    const T x = rank[j] < ri ? v[j] : inf<T>();
    m = x < m ? x : m;
  }
  const T d = finish(m, scale);
  const T hi = e_hi(m) > m ? e_hi(m) : m;  // m == +inf: every higher column qualifies
  constexpr int64_t W = 16;
  int64_t j = 0;
  for (; j + W <= N; j += W) {
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t l = 0; l < W; ++l) any |= static_cast<int>(rank[j + l] < ri) & static_cast<int>(v[j + l] <= hi);
    if (!any) continue;
    for (int64_t c = j; c < j + W; ++c)
      if (rank[c] < ri && v[c] <= hi && finish(v[c], scale) == d) {
        arg = c;
        return d;
      }
  }
  for (; j < N; ++j)
    if (rank[j] < ri && v[j] <= hi && finish(v[j], scale) == d) {
      arg = j;
      return d;
    }
  // Not reached (the minimum is attained); stay in range regardless.
  for (j = 0; j < N; ++j)
    if (rank[j] < ri) break;
  arg = j < N ? j : 0;
  return d;
}
HK_MULTIVERSION(delta_row)

// Largest e of a real row over the real columns (e >= 0 and never NaN, so 0 is neutral).
template <typename T>
HK_HOT_IMPL T max_e_real_impl(const T* v, const T* pen, int64_t len, T cur) {
  T m = cur;
  if (pen == nullptr) {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < len; ++j) m = v[j] > m ? v[j] : m;
  } else {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < len; ++j) {
      const T x = pen[j] == T(0) ? v[j] : T(0);
      m = x > m ? x : m;
    }
  }
  return m;
}
HK_MULTIVERSION(max_e_real)

// ---- assignment ---------------------------------------------------------------------------------

// Position p's row of e against rows [r0, r1): the running first-argmin of e (p = 0 initialises).
template <typename T>
HK_HOT_IMPL void assign_first_impl(const T* row, IndexFor<T> p, int64_t r0, int64_t r1, T* be, IndexFor<T>* bp) {
#pragma omp simd
  for (int64_t i = r0; i < r1; ++i) {
    const bool better = p == 0 || row[i] < be[i];
    be[i] = better ? row[i] : be[i];
    bp[i] = better ? p : bp[i];
  }
}
HK_MULTIVERSION(assign_first)

// Near-tie pass: a lower position whose distinct e rounds to the same D wins.
template <typename T>
HK_HOT_IMPL void assign_ties_impl(const T* row, IndexFor<T> p, int64_t r0, int64_t r1, const T* be, const T* hi,
                        IndexFor<T>* bp, T scale) {
  constexpr int64_t W = 16;
  int64_t i0 = r0;
  for (; i0 + W <= r1; i0 += W) {
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t l = 0; l < W; ++l)
      any |= static_cast<int>(p < bp[i0 + l]) & static_cast<int>(row[i0 + l] <= hi[i0 + l]);
    if (!any) continue;
    for (int64_t i = i0; i < i0 + W; ++i)
      if (p < bp[i] && row[i] <= hi[i] && finish(row[i], scale) == finish(be[i], scale)) bp[i] = p;
  }
  for (int64_t i = i0; i < r1; ++i)
    if (p < bp[i] && row[i] <= hi[i] && finish(row[i], scale) == finish(be[i], scale)) bp[i] = p;
}
HK_MULTIVERSION(assign_ties)

// Rows [r0, r1): row(p)[i] = e(kept p, i) == e(i, kept p) for p in [0, f); asg[i] = the lowest
// position attaining the minimum D. be, hi: scratch (T), bp: scratch (IndexFor<T>), indexed by i.
template <typename T, typename RowFn>
inline void assign_rows(RowFn row, int64_t f, int64_t r0, int64_t r1, T scale, T* be, IndexFor<T>* bp, T* hi,
                        int64_t* asg) {
  using I = IndexFor<T>;
  for (int64_t p = 0; p < f; ++p) assign_first(row(p), static_cast<I>(p), r0, r1, be, bp);
  bool ties = false;
  for (int64_t i = r0; i < r1; ++i) {
    hi[i] = e_hi(be[i]);
    ties |= bp[i] > 0;
  }
  if (ties)
    for (int64_t p = 0; p + 1 < f; ++p) assign_ties(row(p), static_cast<I>(p), r0, r1, be, hi, bp, scale);
  for (int64_t i = r0; i < r1; ++i) asg[i] = bp[i];
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

// The nsel best of N by RankBefore into out: ascending index (sorted) or best first. perm: scratch.
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

// Tokens ordered by a "higher" key (higher first, ties to the lower index): rank[token] = position.
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

// What to compute for a batch. x: (B, N, C) contiguous in T; every (B, N) array is row-major.
template <typename T>
struct Job {
  const T* x = nullptr;
  int64_t B = 0, N = 0, C = 0;
  const bool* mask = nullptr;  // (B, N) or nullptr
  // density: k > 0 computes log rho (k nearest, self included) into log_rho
  int64_t k = 0;
  T* log_rho = nullptr;
  // delta: ordered by keys when given (dpc_delta; NaN and masked map to -inf here), else by log_rho
  bool want_delta = false;
  const double* keys = nullptr;
  T* delta = nullptr;
  int64_t* parent = nullptr;  // or nullptr
  // selection (dpc_knn): score = delta * exp(log rho)
  bool want_select = false;
  int64_t f = 0;
  int64_t center = -1;
  bool keep_center = true;
  bool sorted = true;
  int64_t* index = nullptr;   // (B, f)
  int64_t* assign = nullptr;  // (B, N) or nullptr
};

// A Job over the compute-dtype input xf (B, N, C) and an optional prepared mask; the caller fills
// in what to compute.
template <typename T>
inline Job<T> make_job(const at::Tensor& xf, const at::Tensor& mask) {
  Job<T> job;
  job.x = xf.data_ptr<T>();
  job.B = xf.size(0);
  job.N = xf.size(1);
  job.C = xf.size(2);
  job.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  return job;
}

// Per-sample state and thread scratch of the full-block path.
template <typename T>
struct SampleWork {
  AlignedBuf<T> xc;  // (N + kPadRows) x ld, zero padding
  int64_t ld = 0;
  std::vector<T> sq, D, rowmax, score, kbuf, cscratch, be, hi, pen;
  std::vector<double> key;
  std::vector<int64_t> order, perm;
  std::vector<IndexFor<T>> rank, bp;
  std::vector<int8_t> cls;
};

template <typename T>
inline int64_t count_real(const Job<T>& job, int64_t b) {
  if (!job.mask) return job.N;
  int64_t n = 0;
  for (int64_t i = 0; i < job.N; ++i) n += job.mask[b * job.N + i] ? 1 : 0;
  return n;
}

// Column penalties of one sample: 0 for a real token, +inf for a masked one (nullptr: no mask).
template <typename T>
inline const T* sample_pen(const Job<T>& job, int64_t b, T* pen) {
  if (!job.mask) return nullptr;
  for (int64_t i = 0; i < job.N; ++i) pen[i] = job.mask[b * job.N + i] ? T(0) : inf<T>();
  return pen;
}

// Density of the rows [r0, r1) of one sample from its full e block (row stride N), and the largest
// real e of each real row when rowmax is given.
template <typename T>
inline void full_density_rows(const Job<T>& job, int64_t b, const T* D, const T* pen, int64_t nreal, int64_t r0,
                              int64_t r1, T* kstore, T* rowmax) {
  const int64_t N = job.N;
  const T scale = sqrt_c<T>(job.C);
  const bool* mask = job.mask ? job.mask + b * N : nullptr;
  KState<T> ks;
  if (job.k > 0) ks.init(job.k, kstore);
  for (int64_t i = r0; i < r1; ++i) {
    const T* row = D + i * N;
    const bool real = mask == nullptr || mask[i];
    if (job.k > 0) {
      if (real) {
        ks.reset();
        kstate_push(ks, row, pen, N, i);
        job.log_rho[b * N + i] = kstate_log_density(ks, scale, mask != nullptr, nreal);
      } else {
        job.log_rho[b * N + i] = -inf<T>();
      }
    }
    if (rowmax) rowmax[i] = real ? max_e_real(row, pen, N, T(0)) : T(0);
  }
}

// Keys of one sample for the delta order (NaN and masked tokens -> -inf), then the ranks.
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

// A row's delta / parent; the highest token (no candidate) gets the largest real distance, itself.
template <typename T>
inline void finish_delta(const Job<T>& job, int64_t b, int64_t i, const MinState<T>& s, T largest) {
  const int64_t N = job.N;
  job.delta[b * N + i] = s.arg < 0 ? largest : s.d;
  if (job.parent) job.parent[b * N + i] = s.arg < 0 ? i : s.arg;
}

template <typename T>
inline void full_delta_rows(const Job<T>& job, int64_t b, const T* D, const IndexFor<T>* rank, T largest,
                            int64_t r0, int64_t r1) {
  const int64_t N = job.N;
  const T scale = sqrt_c<T>(job.C);
  for (int64_t i = r0; i < r1; ++i) {
    MinState<T> s;
    if (rank[i] > 0) s.d = delta_row(D + i * N, rank, rank[i], N, scale, s.arg);
    finish_delta(job, b, i, s, largest);
  }
}

// Largest real distance of a sample from its rows' largest real e.
template <typename T>
inline T largest_of(const T* rowmax, int64_t N, int64_t C) {
  T m = T(0);
  for (int64_t i = 0; i < N; ++i) m = rowmax[i] > m ? rowmax[i] : m;
  return finish(m, sqrt_c<T>(C));
}

// Selection of one sample (needs log_rho and delta): job.index[b].
template <typename T>
inline void sample_select(const Job<T>& job, int64_t b, SampleWork<T>& w) {
  const int64_t N = job.N, f = job.f;
  const bool* mask = job.mask ? job.mask + b * N : nullptr;
  w.score.resize(N);
  w.cls.resize(N);
  for (int64_t i = 0; i < N; ++i) {
    const T s = job.delta[b * N + i] * std::exp(job.log_rho[b * N + i]);
    const bool nan = s != s;
    w.cls[i] = (mask && !mask[i]) ? 1 : (nan ? 2 : 3);
    w.score[i] = nan ? -inf<T>() : s;
  }
  int64_t* out = job.index + b * f;
  if (job.center < 0) {
    select_best(w.cls.data(), w.score.data(), N, f, job.sorted, out, w.perm);
    return;
  }
  w.cls[job.center] = 0;  // excluded: below every other class, never among the first N - 1
  const int64_t npick = job.keep_center ? f - 1 : f;
  select_best(w.cls.data(), w.score.data(), N, npick, false, out, w.perm);
  if (job.keep_center) out[f - 1] = job.center;
  if (job.sorted) std::sort(out, out + f);
}

// Assignment of rows [r0, r1) of one sample from its full e block (row of kept p = its column).
template <typename T>
inline void full_assign_rows(const Job<T>& job, int64_t b, const T* D, int64_t r0, int64_t r1, SampleWork<T>& w) {
  const int64_t N = job.N, f = job.f;
  const int64_t* idx = job.index + b * f;
  int64_t* asg = job.assign + b * N;
  if (f <= 0 || r0 >= r1) return;
  assign_rows([&](int64_t p) { return D + idx[p] * N; }, f, r0, r1, sqrt_c<T>(job.C), w.be.data(), w.bp.data(),
              w.hi.data(), asg);
  for (int64_t p = 0; p < f; ++p)
    if (idx[p] >= r0 && idx[p] < r1) asg[idx[p]] = p;
}

template <typename T>
inline void size_work(const Job<T>& job, SampleWork<T>& w) {
  const int64_t N = job.N, C = job.C;
  w.ld = row_stride(C);
  w.xc.assign_zero((N + kPadRows) * w.ld);
  w.sq.assign(N + kPadRows, T(0));
  w.D.resize(N * N);
  w.rowmax.resize(N);
  w.cscratch.resize(2 * C);
  w.pen.resize(N);
  w.kbuf.resize(job.k > 0 ? KState<T>::capacity_for(job.k) : 1);
  if (job.assign) {
    w.be.resize(N);
    w.hi.resize(N);
    w.bp.resize(N);
  }
}

// One whole sample on the calling thread (full block). next: the sample this thread does next
// (its input is prefetched during the Gram kernel), or -1.
template <typename T>
inline void full_sample(const Job<T>& job, int64_t b, SampleWork<T>& w, int64_t next = -1) {
  const int64_t N = job.N, C = job.C;
  const bool* mask = job.mask ? job.mask + b * N : nullptr;
  center_sample(job.x + b * N * C, N, C, mask, w.xc.data(), w.ld, w.sq.data(), w.cscratch.data());
  full_block_tiles(w.xc.data(), w.ld, w.sq.data(), N, C, w.D.data(), 0, stair_tiles(N),
                   next >= 0 ? static_cast<const void*>(job.x + next * N * C) : nullptr,
                   static_cast<int64_t>(sizeof(T)) * N * C);
  const int64_t nreal = count_real(job, b);
  const T* pen = sample_pen(job, b, w.pen.data());
  full_density_rows(job, b, w.D.data(), pen, nreal, 0, N, w.kbuf.data(), job.want_delta ? w.rowmax.data() : nullptr);
  if (!job.want_delta) return;
  const T largest = largest_of(w.rowmax.data(), N, C);
  sample_rank(job, b, w);
  full_delta_rows(job, b, w.D.data(), w.rank.data(), largest, 0, N);
  if (!job.want_select) return;
  sample_select(job, b, w);
  if (job.assign) full_assign_rows(job, b, w.D.data(), 0, N, w);
}

// One sample with each stage spread over the threads (few samples, N large-ish).
template <typename T>
inline void full_sample_parallel(const Job<T>& job, int64_t b, SampleWork<T>& w, std::vector<std::vector<T>>& kbufs,
                                 int nt) {
  const int64_t N = job.N, C = job.C;
  const bool* mask = job.mask ? job.mask + b * N : nullptr;
  center_sample(job.x + b * N * C, N, C, mask, w.xc.data(), w.ld, w.sq.data(), w.cscratch.data());
  const int64_t ntiles = stair_tiles(N);
  const int64_t nreal = count_real(job, b);
  const T* xc = w.xc.data();
  const int64_t ld = w.ld;
  const T* sq = w.sq.data();
  T* D = w.D.data();
  T* rowmax = job.want_delta ? w.rowmax.data() : nullptr;
  const T* pen = sample_pen(job, b, w.pen.data());
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t t = 0; t < ntiles; ++t) full_block_tiles(xc, ld, sq, N, C, D, t, t + 1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t r0 = t * kStairTile, r1 = std::min(N, r0 + kStairTile);
    full_density_rows(job, b, D, pen, nreal, r0, r1, kbufs[thread_id()].data(), rowmax);
  }
  if (!job.want_delta) return;
  const T largest = largest_of(w.rowmax.data(), N, C);
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
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t r0 = t * kStairTile, r1 = std::min(N, r0 + kStairTile);
      full_assign_rows(job, b, D, r0, r1, w);
    }
  }
}

// ---- panel path (N > kFullMaxN) ------------------------------------------------------------------

template <typename T>
inline int64_t panel_tile_for(int64_t k) {
  int64_t tile = kPanelTile;
  const int64_t cap = KState<T>::capacity_for(std::max<int64_t>(k, 1));
  while (tile > 32 && tile * cap * static_cast<int64_t>(sizeof(T)) > (int64_t(64) << 20)) tile /= 2;
  return tile;
}

template <typename T>
inline void run_panels(const Job<T>& job, int nt) {
  const int64_t B = job.B, N = job.N, C = job.C;
  const T scale = sqrt_c<T>(C);
  const int64_t tile = panel_tile_for<T>(job.k);
  const int64_t ntiles = (N + tile - 1) / tile;
  const int64_t items = B * ntiles;
  const int64_t kcap = job.k > 0 ? KState<T>::capacity_for(job.k) : 1;
  const int64_t f = job.want_select ? job.f : 0;
  const int64_t ld = row_stride(C);
  const int64_t sstride = (N + kPadRows) * ld;  // per-sample stride of the centred copies

  // All allocations happen here, outside the parallel regions.
  AlignedBuf<T> xcbuf;
  xcbuf.assign_zero(B * sstride);
  T* xc = xcbuf.data();
  std::vector<T> sq(B * N), rowmax(B * N, T(0)), largest(B, T(0)), pen(job.mask ? B * N : 0);
  std::vector<int64_t> nreal(B);
  struct Scratch {
    std::vector<T> block, tmp, kstore, cs, gk, be, hi;
    std::vector<IndexFor<T>> bp;
    std::vector<KState<T>> ks;
    std::vector<MinState<T>> ms;
  };
  std::vector<Scratch> scr(nt);
  for (auto& s : scr) {
    s.block.resize(tile * tile);
    s.tmp.resize(tile * tile);
    s.kstore.resize(tile * kcap);
    s.cs.resize(2 * C);
    s.ks.resize(tile);
    s.ms.resize(tile);
    if (job.assign) {
      s.gk.resize(tile * f);
      s.be.resize(tile);
      s.hi.resize(tile);
      s.bp.resize(tile);
    }
  }
  std::vector<SampleWork<T>> per(B);

#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t b = 0; b < B; ++b) {
    center_sample(job.x + b * N * C, N, C, job.mask ? job.mask + b * N : nullptr, xc + b * sstride, ld,
                  sq.data() + b * N, scr[thread_id()].cs.data());
    nreal[b] = count_real(job, b);
    if (job.mask) sample_pen(job, b, pen.data() + b * N);
  }

  // Sweep 1: density, and the largest real e of each row.
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t b = it / ntiles, a = it % ntiles;
    Scratch& s = scr[thread_id()];
    const bool* mask = job.mask ? job.mask + b * N : nullptr;
    const T* xb = xc + b * sstride;
    const T* sqb = sq.data() + b * N;
    const int64_t r0 = a * tile, na = std::min(N, r0 + tile) - r0;
    if (job.k > 0)
      for (int64_t i = 0; i < na; ++i) s.ks[i].init(job.k, s.kstore.data() + i * kcap);
    for (int64_t bt = 0; bt < ntiles; ++bt) {
      const int64_t c0 = bt * tile, nc = std::min(N, c0 + tile) - c0;
      canonical_block(xb, ld, sqb, N, C, tile, a, bt, s.block.data(), tile, s.tmp.data());
      const T* cp = mask ? pen.data() + b * N + c0 : nullptr;
      for (int64_t i = 0; i < na; ++i) {
        if (mask && !mask[r0 + i]) continue;
        const T* v = s.block.data() + i * tile;
        if (job.k > 0) kstate_push(s.ks[i], v, cp, nc, a == bt ? i : -1);
        if (job.want_delta) rowmax[b * N + r0 + i] = max_e_real(v, cp, nc, rowmax[b * N + r0 + i]);
      }
    }
    if (job.k > 0)
      for (int64_t i = 0; i < na; ++i) {
        const bool real = mask == nullptr || mask[r0 + i];
        job.log_rho[b * N + r0 + i] = real ? kstate_log_density(s.ks[i], scale, mask != nullptr, nreal[b]) : -inf<T>();
      }
  }
  if (!job.want_delta) return;

#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t b = 0; b < B; ++b) {
    largest[b] = largest_of(rowmax.data() + b * N, N, C);
    sample_rank(job, b, per[b]);
  }

  // Sweep 2: delta / parent. A block is skipped when no row of the tile has a higher token in it.
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t b = it / ntiles, a = it % ntiles;
    Scratch& s = scr[thread_id()];
    const T* xb = xc + b * sstride;
    const T* sqb = sq.data() + b * N;
    const IndexFor<T>* rank = per[b].rank.data();
    const int64_t r0 = a * tile, na = std::min(N, r0 + tile) - r0;
    IndexFor<T> max_rank_rows = 0;
    for (int64_t i = 0; i < na; ++i) {
      s.ms[i] = MinState<T>();
      max_rank_rows = std::max(max_rank_rows, rank[r0 + i]);
    }
    for (int64_t bt = 0; bt < ntiles; ++bt) {
      const int64_t c0 = bt * tile, nc = std::min(N, c0 + tile) - c0;
      IndexFor<T> min_rank_cols = std::numeric_limits<IndexFor<T>>::max();
      for (int64_t j = 0; j < nc; ++j) min_rank_cols = std::min(min_rank_cols, rank[c0 + j]);
      if (min_rank_cols >= max_rank_rows) continue;
      canonical_block(xb, ld, sqb, N, C, tile, a, bt, s.block.data(), tile, s.tmp.data());
      for (int64_t i = 0; i < na; ++i) {
        const IndexFor<T> ri = rank[r0 + i];
        if (ri > 0) delta_push(s.ms[i], s.block.data() + i * tile, rank + c0, ri, c0, nc, scale);
      }
    }
    for (int64_t i = 0; i < na; ++i) finish_delta(job, b, r0 + i, s.ms[i], largest[b]);
  }
  if (!job.want_select) return;

#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t b = 0; b < B; ++b) sample_select(job, b, per[b]);
  if (!job.assign || f <= 0) return;

  // Assignment: e of every token to the f kept ones, one GEMM per row tile against the gathered
  // kept tokens (same Gram form and exact recomputation as the canonical values; not the canonical
  // blocks themselves, which would cost a third full sweep).
  AlignedBuf<T> keptbuf;
  keptbuf.assign_zero(B * f * ld);
  T* kept = keptbuf.data();
  std::vector<T> sqk(B * f);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < f; ++p) {
      const int64_t j = job.index[b * f + p];
      std::memcpy(kept + (b * f + p) * ld, xc + b * sstride + j * ld, sizeof(T) * C);
      sqk[b * f + p] = sq[b * N + j];
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t b = it / ntiles, a = it % ntiles;
    Scratch& s = scr[thread_id()];
    const T* xb = xc + b * sstride;
    const T* kb = kept + b * f * ld;
    const int64_t r0 = a * tile, na = std::min(N, r0 + tile) - r0;
    // gk[p][i]: kept p against row r0 + i (kept tokens as the GEMM's rows, so each p is a row).
    gemm_abt<T>(f, na, C, kb, ld, xb + r0 * ld, ld, s.gk.data(), na);
    for (int64_t p = 0; p < f; ++p)
      gram_to_e(s.gk.data() + p * na, na, sqk[b * f + p], sq.data() + b * N + r0, kb + p * ld, xb + r0 * ld, ld, C);
    int64_t* asg = job.assign + b * N + r0;
    const T* gk = s.gk.data();
    assign_rows([&](int64_t p) { return gk + p * na; }, f, 0, na, scale, s.be.data(), s.bp.data(), s.hi.data(), asg);
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < f; ++p) job.assign[b * N + job.index[b * f + p]] = p;
}

// Runs a job: full blocks for N <= kFullMaxN (one sample per thread, or each sample split over the
// threads when there are fewer samples than threads), panels above.
template <typename T>
inline void run(const Job<T>& job) {
  if (job.B == 0 || job.N == 0) return;
  const int nt = max_threads();
  if (job.N > kFullMaxN) {
    run_panels(job, nt);
    return;
  }
  const bool avx512_kernel = std::is_same_v<T, float> && use_avx512_gram();
  const int64_t min_work = avx512_kernel ? intra_min_work_avx512() : kIntraMinWorkBlas;
  const bool split = job.N >= kIntraMinN || (job.N >= kIntraMinSplitN && job.N * job.N * job.C >= min_work);
  if (job.B < nt && split) {
    SampleWork<T> w;
    size_work(job, w);
    std::vector<std::vector<T>> kbufs(nt, std::vector<T>(job.k > 0 ? KState<T>::capacity_for(job.k) : 1));
    for (int64_t b = 0; b < job.B; ++b) full_sample_parallel(job, b, w, kbufs, nt);
    return;
  }
  const int used = static_cast<int>(std::min<int64_t>(nt, job.B));
  std::vector<SampleWork<T>> ws(used);
  for (auto& w : ws) size_work(job, w);
  // Round-robin (the samples cost the same), so that each thread knows its next sample. The team
  // is all nt threads even when B < nt (the extra ones find no sample): every BLAS call of the row
  // tiles then runs inside an active parallel region, where BLAS is single-threaded. A team of 1
  // would let a multi-threaded BLAS open a nested team per GEMM (the distance block is BLAS for
  // float64 and on the generic path), next to the pool threads other torch ops leave spinning.
#pragma omp parallel for schedule(static, 1) num_threads(nt)
  for (int64_t b = 0; b < job.B; ++b) full_sample(job, b, ws[thread_id()], b + used < job.B ? b + used : -1);
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
  TORCH_CHECK(x.device().is_cpu(), fn, ": x must be a CPU tensor, got ", x.device());
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
