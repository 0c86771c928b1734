// GEMMs whose results do not depend on the thread count (used by the CPU TRA and the
// pairwise-distance backward).
//
// A multi-threaded BLAS call may split its work, and so its sums, by the thread count: MKL does
// for small shapes (e.g. 11 x 32 x 32). Here every product is cut into fixed blocks of rows of the
// output, and each block is one BLAS call made inside an active OpenMP region, where BLAS runs
// single-threaded. The blocks depend on the shapes only: about kGemmMinRows rows (each block packs
// all of b, which for a weight gradient is a whole chunk of activations), equal in size, and at
// most kGemmMaxBlocks per matrix.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <exception>

namespace hot_kernels {

constexpr int64_t kGemmMinRows = 256;
constexpr int64_t kGemmMaxBlocks = 16;

// Rows per block for an m-row output: ceil(m / kGemmMinRows) blocks (at most kGemmMaxBlocks), made
// even where the rows allow it, all of the same size (so that 2 threads get equal shares: 1377
// rows are 6 blocks of 230, not 5 of 256 and one of 97). Depends on m only.
inline int64_t gemm_block_rows(int64_t m) {
  int64_t blocks = std::min(kGemmMaxBlocks, std::max<int64_t>(1, (m + kGemmMinRows - 1) / kGemmMinRows));
  if (blocks > 1 && blocks % 2 == 1 && m / (blocks + 1) >= kGemmMinRows / 2) ++blocks;
  return std::max<int64_t>(1, (m + blocks - 1) / blocks);
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

// out (+)= a b (+ bias): a (m, k), b (k, n), out (m, n) (any strides ATen's mm takes).
inline void gemm_fixed(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                       const at::Tensor& bias = {}, bool accumulate = false) {
  const int64_t m = out.size(0);
  const int64_t rows = gemm_block_rows(m);
  run_fixed_tasks((m + rows - 1) / rows, [&](int64_t i) {
    const int64_t r0 = i * rows, r = std::min(rows, m - r0);
    auto o = out.narrow(0, r0, r);
    const auto ai = a.narrow(0, r0, r);
    if (accumulate)
      o.addmm_(ai, b);
    else if (bias.defined())
      at::addmm_out(o, bias, ai, b);
    else
      at::mm_out(o, ai, b);
  });
}

// a b (+ bias) into a new (m, n) tensor.
inline at::Tensor mm_fixed(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias = {}) {
  auto out = at::empty({a.size(0), b.size(1)}, a.options());
  gemm_fixed(out, a, b, bias);
  return out;
}

// a (B, m, k) b (B, k, n) -> (B, m, n): at::bmm in fixed (batch, row block) tasks.
inline at::Tensor bmm_fixed(const at::Tensor& a, const at::Tensor& b) {
  const int64_t B = a.size(0), m = a.size(1);
  auto out = at::empty({B, m, b.size(2)}, a.options());
  if (out.numel() == 0) return out;
  if (a.size(2) == 0) return out.zero_();
  const int64_t rows = gemm_block_rows(m);
  const int64_t blocks = (m + rows - 1) / rows;
  run_fixed_tasks(B * blocks, [&](int64_t t) {
    const int64_t s = t / blocks, r0 = (t % blocks) * rows, r = std::min(rows, m - r0);
    auto o = out.select(0, s).narrow(0, r0, r);
    at::mm_out(o, a.select(0, s).narrow(0, r0, r), b.select(0, s));
  });
  return out;
}

}  // namespace hot_kernels
