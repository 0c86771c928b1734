// GEMMs whose results do not depend on the thread count (used by the CPU TRA and the
// pairwise-distance backward).
//
// A multi-threaded BLAS call may split its work, and so its sums, by the thread count: MKL does
// for small shapes (e.g. 11 x 32 x 32). Here every product is cut into fixed tiles of the output
// (blocks of rows, and of columns where the rows alone give too few tiles: a weight gradient is a
// (C, C) output with a long reduction), and each tile is one BLAS call made inside an active
// OpenMP region, where BLAS runs single-threaded. Every output element is so computed by one
// single-threaded BLAS call over the whole reduction. The tiles depend on the shapes only: about
// kGemmMinRows rows, or kGemmTallRows for tall outputs (each row block packs all of b), at most
// kGemmMaxBlocks row blocks; an output of one row block is also cut into column blocks and shorter
// row blocks, down to kGemmMinCols, up to kGemmMinTasks tiles. An accumulation with a long
// reduction into such an output (a (C, C) weight gradient at C <= 256) instead cuts the reduction
// into fixed chunks whose partial products are added in chunk order (gemm_fixed_split_k).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include "scratch_cache.h"

#include <algorithm>
#include <exception>

namespace hot_kernels {

constexpr int64_t kGemmMinRows = 256;
// Row blocks of outputs taller than this are about this tall. Measured against 256-row blocks (fp32,
// 2 threads, Ice Lake, interleaved): the TRA's K|V projection 1377 x 1024 x 512 7.5 -> 6.8 ms (MKL's
// own threading 6.8), output projection 4131 x 512 x 512 11.2 -> 10.6 ms (MKL 10.1), and 3-7 % at
// C = 128 / 256; outputs of up to 1024 rows (weight gradients) keep 256-row blocks: one 1024-row
// block made the (C, C) gradients 30-40 % slower at C = 512.
constexpr int64_t kGemmTallRows = 1024;
constexpr int64_t kGemmMaxBlocks = 16;
// Tiles (or reduction chunks) wanted for an output of one row block. More tiles of a long
// reduction re-read more of a and b: 4 keeps a 2-core machine busy at C = 128 and 256 (a TRA weight
// gradient: 0.94 -> 0.76 ms at C = 128, 4.3 -> 2.4 ms at C = 256, over 4131 rows) without
// slowing C = 512 (two row blocks, unchanged).
constexpr int64_t kGemmMinTasks = 4;
constexpr int64_t kGemmMinCols = 64;  // narrowest column block, and shortest row block once rows are split further
// A reduction at least twice this long into an output of at most kGemmMinRows rows is cut into
// kGemmMinTasks chunks (gemm_fixed_split_k). Always that many: 3 chunks (k = 1377, the TRA's K|V
// weight gradient at S = 17, M = 81) kept one of 2 threads idle for a third of the time (measured,
// fp32, Xeon, AVX2 path: 0.73 -> 0.56 ms for the 256 x 1377 x 128 product; MKL's own: 0.49 ms).
constexpr int64_t kGemmKChunk = 512;

inline int64_t gemm_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows per block for an m-row output: ceil(m / target) blocks (at most kGemmMaxBlocks), made even
// where the rows allow it, all of the same size (so that 2 threads get equal shares: 4131 rows are
// 6 blocks of 689, not 5 of 1024 and one of 35). Depends on m only. The target is kGemmTallRows
// for outputs taller than that (activations: each block packs all of b once, so fewer, taller
// blocks repack it less), kGemmMinRows below (weight gradients: one block would leave a 2-core
// machine half idle or take the column tiles, which re-read all of a long a).
inline int64_t gemm_block_rows(int64_t m) {
  const int64_t target = m > kGemmTallRows ? kGemmTallRows : kGemmMinRows;
  int64_t blocks = std::min(kGemmMaxBlocks, std::max<int64_t>(1, gemm_ceil_div(m, target)));
  if (blocks > 1 && blocks % 2 == 1 && m / (blocks + 1) >= target / 2) ++blocks;
  return std::max<int64_t>(1, gemm_ceil_div(m, blocks));
}

// The tiling of an (m, n) output: rows x cols per tile (the last ones may be shorter). Depends on
// m and n only. The row blocks of gemm_block_rows; an output of one row block (a (C, C) weight
// gradient) is cut into column blocks (a multiple of 16 wide), then into shorter row blocks, up to
// kGemmMinTasks tiles (measured: more tiles at larger m only re-read more of a and b).
struct GemmTiling {
  int64_t rows, cols;
};

inline GemmTiling gemm_tiling(int64_t m, int64_t n) {
  GemmTiling t{gemm_block_rows(m), std::max<int64_t>(1, n)};
  if (t.rows < m) return t;
  const int64_t cb = std::max<int64_t>(1, std::min(kGemmMinTasks, n / kGemmMinCols));
  const int64_t rb = std::max<int64_t>(1, std::min(gemm_ceil_div(kGemmMinTasks, cb), m / kGemmMinCols));
  t.rows = gemm_ceil_div(m, rb);
  if (cb > 1) t.cols = gemm_ceil_div(gemm_ceil_div(n, cb), 16) * 16;
  return t;
}

// Runs task(i) for i in [0, tasks) on the full OpenMP team (BLAS single-threaded inside). The
// caller's thread-local state (grad mode, dispatch keys, ...) is carried to the workers; an
// exception must not leave the region, so the first one is rethrown after it.
template <class Task>
void run_fixed_tasks(int64_t tasks, const Task& task) {
  const int nt = std::max(1, at::get_num_threads());
  std::exception_ptr error;
  const at::ThreadLocalState state;
#pragma omp parallel num_threads(nt)
  {
    at::ThreadLocalStateGuard guard(state);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < tasks; ++i) {
      try {
        task(i);
      } catch (...) {
#pragma omp critical(hk_gemm_fixed_error)
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

// out += a b with the reduction (k) cut into kc fixed chunks: one task per chunk computes its
// partial product (m, n) with one single-threaded BLAS call, then each block of rows of out adds
// the partials in chunk order. For a long reduction into a small output (a weight gradient
// (C, C) over S * L rows), where output tiles would each re-read whole panels of a and b.
inline void gemm_fixed_split_k(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, int64_t kc) {
  const int64_t m = out.size(0), n = out.size(1), k = a.size(1);
  const int64_t kr = gemm_ceil_div(k, kc);
  auto partial = scratch_cache::empty({kc, m, n}, out.scalar_type());
  run_fixed_tasks(kc, [&](int64_t j) {
    const int64_t k0 = j * kr, kn = std::min(kr, k - k0);
    auto p = partial.select(0, j);
    if (kn <= 0)
      p.zero_();
    else
      at::mm_out(p, a.narrow(1, k0, kn), b.narrow(0, k0, kn));
  });
  const int64_t rows = std::max<int64_t>(1, gemm_ceil_div(m, kGemmMinTasks));
  run_fixed_tasks(gemm_ceil_div(m, rows), [&](int64_t i) {
    const int64_t r0 = i * rows, r = std::min(rows, m - r0);
    auto o = out.narrow(0, r0, r);
    for (int64_t j = 0; j < kc; ++j) o.add_(partial.select(0, j).narrow(0, r0, r));
  });
}

// out (+)= a b (+ bias): a (m, k), b (k, n), out (m, n) (any strides ATen's mm takes).
inline void gemm_fixed(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                       const at::Tensor& bias = {}, bool accumulate = false) {
  const int64_t m = out.size(0), n = out.size(1), k = a.size(1);
  if (m == 0 || n == 0) return;
  if (accumulate && m <= kGemmMinRows && k >= 2 * kGemmKChunk) {
    gemm_fixed_split_k(out, a, b, kGemmMinTasks);
    return;
  }
  const GemmTiling t = gemm_tiling(m, n);
  const int64_t col_blocks = gemm_ceil_div(n, t.cols);
  const int64_t tiles = gemm_ceil_div(m, t.rows) * col_blocks;
  run_fixed_tasks(tiles, [&](int64_t i) {
    const int64_t r0 = i / col_blocks * t.rows, r = std::min(t.rows, m - r0);
    const int64_t c0 = i % col_blocks * t.cols, c = std::min(t.cols, n - c0);
    auto o = out.narrow(0, r0, r).narrow(1, c0, c);
    const auto ai = a.narrow(0, r0, r);
    const auto bi = col_blocks == 1 ? b : b.narrow(1, c0, c);
    if (accumulate)
      o.addmm_(ai, bi);
    else if (bias.defined())
      at::addmm_out(o, bias.narrow(0, c0, c), ai, bi);
    else
      at::mm_out(o, ai, bi);
  });
}

// a b (+ bias) into a new (m, n) scratch tensor (scratch_cache.h): for a tensor the op keeps to itself.
inline at::Tensor mm_fixed_scratch(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias = {}) {
  auto out = scratch_cache::empty({a.size(0), b.size(1)}, a.scalar_type());
  gemm_fixed(out, a, b, bias);
  return out;
}

// a (B, m, k) b (B, k, n) -> (B, m, n): at::bmm in fixed (batch, row block) tasks.
inline at::Tensor bmm_fixed(const at::Tensor& a, const at::Tensor& b) {
  const int64_t B = a.size(0), m = a.size(1);
  auto out = at::empty({B, m, b.size(2)}, a.options());
  if (out.numel() == 0) return out;
  if (a.size(2) == 0) return out.zero_();
  const int64_t rows = gemm_block_rows(m);  // row blocks only: the batch gives the tasks
  const int64_t blocks = gemm_ceil_div(m, rows);
  run_fixed_tasks(B * blocks, [&](int64_t t) {
    const int64_t s = t / blocks, r0 = (t % blocks) * rows, r = std::min(rows, m - r0);
    auto o = out.select(0, s).narrow(0, r0, r);
    at::mm_out(o, a.select(0, s).narrow(0, r0, r), b.select(0, s));
  });
  return out;
}

}  // namespace hot_kernels
