// Scratch tensors of CPU op calls, taken from buffers the process keeps between calls.
//
// Why: TRA's large internal tensors (K|V, the attention output, the gradient rows, the stacked
// [Wk; Wv]) were fresh allocations each call. glibc hands large
// blocks back to the system between calls or not depending on the process's allocation history
// (its mmap threshold adapts to the blocks freed so far), so in some processes every 4 KB page of
// every such temporary costs a page fault when first written: measured 1.6 us each on a 2-core KVM
// Xeon, 1345 faults per TRA forward at HoT-MotionAGFormer B = 1 (4.8 ms against 2.6 ms without them).
// Buffers kept here stay mapped, so the cost and the run time do not depend on that history.
//
// The cache holds at most limit() bytes (HOT_KERNELS_CPU_CACHE_MB, default 64, read at load;
// set_limit), in use or not; a request that does not fit is a plain allocation. A buffer is handed
// out again only when nothing else refers to its storage: concurrent calls never share one, a kept
// tensor is not reused while autograd holds it, and one that escaped by mistake is never
// overwritten. release() frees every buffer not in use.
#pragma once

#include <ATen/ATen.h>

namespace hot_kernels {
namespace scratch_cache {

// An uninitialised contiguous tensor, a view of a cached buffer, for a tensor the op keeps to
// itself: a temporary of the call, or what a forward keeps for its backward. Never for a tensor the
// user gets (its storage may be larger than it, which torch.save would write out).
at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype);
// The same, zero-filled.
at::Tensor zeros(at::IntArrayRef sizes, at::ScalarType dtype);

int64_t cached_bytes();            // bytes held, in use or not
int64_t release();                 // frees the buffers not in use; returns the bytes freed
int64_t limit();                   // bytes the cache may hold
int64_t set_limit(int64_t bytes);  // returns the previous limit; 0 turns the cache off

}  // namespace scratch_cache
}  // namespace hot_kernels
