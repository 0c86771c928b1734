// The CUDA TPC ops (csrc/cuda/tpc_distance.cu, tpc_select.cu, gather_frames.cu, and interp_merge.cu's
// token_recovering_interpolation / merge_tokens: host glue and kernels, unchanged) compiled as plain C++ against the CPU emulation in tpc_emu.h, registered as
// torch.ops.hot_kernels_tpc_emu.*. Built by tests/test_cuda_emulation_tpc.py with -DTPC_EMULATE
// -DHOT_KERNELS_WITH_CUDA and csrc/ on the include path. "CUDA tensors" are CPU tensors here.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "tpc_emu.h"
// The emulation must come before the sources: they take the CUDA built-ins from it.
#include "cuda/gather_frames.cu"
#include "cuda/interp_merge.cu"
#include "cuda/tpc_distance.cu"
#include "cuda/tpc_select.cu"

namespace {

void set_policy(int64_t policy, int64_t seed) {
  TORCH_CHECK(policy >= 0 && policy <= 2, "policy must be 0 (low id first), 1 (high id first) or 2 (random)");
  tra_emu::g_policy = static_cast<int>(policy);
  tra_emu::g_seed = static_cast<uint64_t>(seed);
}

void set_force_fma(bool on) { tpc_emu::g_force_fma = on; }

// launches, blocks, scheduler switches, __threadfence calls, mma_sync calls (per lane), set bits of
// all ballots (pairwise_distance: the pairs recomputed exactly because their Gram form cancels).
std::vector<int64_t> stats() {
  const auto& s = tra_emu::g_stats;
  return {s.launches, s.blocks, s.switches, tpc_emu::g_fences, tpc_emu::g_mmas, tpc_emu::g_ballot_bits};
}

// One warp computes D = A B + C through the emulated wmma calls the Gram engine uses (load A
// row-major, B col-major, fill, mma_sync, store row-major), for a (16 x K) and b (K x 16) float32
// (K = 8: tf32, each operand split hi + lo as the engine does; K = 16: float16 operands).
at::Tensor wmma_selftest(const at::Tensor& a, const at::Tensor& bt, bool tf32) {
  namespace w = nvcuda::wmma;
  const int K = tf32 ? 8 : 16;
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, K}) && bt.sizes() == at::IntArrayRef({16, K}) &&
                  a.scalar_type() == at::kFloat && bt.scalar_type() == at::kFloat,
              "a and bt must be (16, ", K, ") float32");
  const at::Tensor ac = a.contiguous(), bc = bt.contiguous();
  at::Tensor out = at::empty({16, 16}, a.options());  // (wmma wants 32-byte aligned rows: ATen's CPU allocations are 64-byte aligned)
  const float* pa = ac.data_ptr<float>();
  const float* pb = bc.data_ptr<float>();
  float* po = out.data_ptr<float>();
  tpc_emu::launch(1, 32, [&] {
    if (tf32) {
      using MM = hot_kernels::tpc_cuda::Mma<float, hot_kernels::tpc_cuda::kEngTF32>;
      MM::Acc acc;
      w::fill_fragment(acc, 0.f);
      MM::step(acc, pa, pb, 8);
      w::store_matrix_sync(po, acc, 16, w::mem_row_major);
    } else {
      using MM = hot_kernels::tpc_cuda::Mma<__half, hot_kernels::tpc_cuda::kEngNative>;
      alignas(32) __half ha[256], hb[256];
      for (int i = 0; i < 256; ++i) {
        ha[i] = __half(pa[i]);
        hb[i] = __half(pb[i]);
      }
      MM::Acc acc;
      w::fill_fragment(acc, 0.f);
      MM::step(acc, ha, hb, 16);
      w::store_matrix_sync(po, acc, 16, w::mem_row_major);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(hot_kernels_tpc_emu, m) {
  m.def("pairwise_distance", &hot_kernels::pairwise_distance_cuda);
  m.def("pairwise_distance_backward", &hot_kernels::pairwise_distance_backward_cuda);
  m.def("knn_density", &hot_kernels::knn_density_cuda);
  m.def("dpc_delta", &hot_kernels::dpc_delta_cuda);
  m.def("topf_select", &hot_kernels::topf_select_cuda);
  m.def("dpc_knn", &hot_kernels::dpc_knn_cuda);
  m.def("gather_frames", &hot_kernels::gather_frames_cuda);
  m.def("gather_frames_backward", &hot_kernels::gather_frames_backward_cuda);
  m.def("token_recovering_interpolation", &hot_kernels::token_recovering_interpolation_cuda);
  m.def("token_recovering_interpolation_backward", &hot_kernels::token_recovering_interpolation_backward_cuda);
  m.def("merge_tokens", &hot_kernels::merge_tokens_cuda);
  m.def("merge_tokens_backward", &hot_kernels::merge_tokens_backward_cuda);
  m.def("set_policy", &set_policy);
  m.def("set_force_fma", &set_force_fma);
  m.def("stats", &stats);
  m.def("wmma_selftest", &wmma_selftest);
}
