// The CUDA token recovering attention (csrc/cuda/token_recovering_attention.cu: host glue and
// kernels, unchanged) compiled as plain C++ against the CPU emulation in tra_emu.h, registered as
// torch.ops.hot_kernels_tra_emu.*. Built by tests/test_cuda_emulation.py with -DTRA_EMULATE
// -DHOT_KERNELS_WITH_CUDA and csrc/ on the include path. "CUDA tensors" are CPU tensors here.
//
// torch/library.h rather than torch/extension.h: no pybind11, which halves the build time.
#include <torch/library.h>

#include "tra_emu.h"
// The emulation must come first: the .cu's kernels header takes its primitives from it.
#include "cuda/token_recovering_attention.cu"

namespace {

void set_policy(int64_t policy, int64_t seed) {
  TORCH_CHECK(policy >= 0 && policy <= 2, "policy must be 0 (low id first), 1 (high id first) or 2 (random)");
  tra_emu::g_policy = static_cast<int>(policy);
  tra_emu::g_seed = static_cast<uint64_t>(seed);
}

// launches, blocks, scheduler switches, largest dynamic shared memory of a launch (bytes).
std::vector<int64_t> stats() {
  const auto& s = tra_emu::g_stats;
  return {s.launches, s.blocks, s.switches, static_cast<int64_t>(s.max_smem)};
}

void reset_stats() { tra_emu::g_stats = tra_emu::Stats{}; }

// The emulated device's opt-in shared memory limit per block (bytes); returns the previous one.
int64_t set_smem_optin(int64_t bytes) {
  TORCH_CHECK(bytes > 0, "set_smem_optin: bytes must be positive, got ", bytes);
  const auto old = static_cast<int64_t>(tra_emu::g_smem_optin);
  tra_emu::g_smem_optin = static_cast<size_t>(bytes);
  return old;
}

// Kernels with known bugs (and one without), to show that the emulator catches them. One block of
// 128 threads; out[i] = what thread i read from its neighbour's shared slot.
//  0: correct (write, __syncthreads, read)   1: the __syncthreads is missing (a race)
//  2: __syncthreads inside a branch not every thread takes (a deadlock)
//  3: half a warp at __shfl_xor_sync, the other half at __syncwarp (divergent collectives)
at::Tensor selftest(int64_t which) {
  using namespace hot_kernels::tra;
  constexpr int n = 128;
  auto out = at::empty({n}, at::kFloat);
  float* o = out.data_ptr<float>();
  tra_emu::launch(1, n, n * sizeof(float), [&] {
    float* s = reinterpret_cast<float*>(tra_smem());
    const int i = tra_tid();
    s[i] = static_cast<float>(i);
    if (which == 0) tra_sync();
    if (which == 2 && i < n / 2) tra_sync();
    float v = s[(i + 1) % n];
    if (which == 3) {
      if ((i & 31) < 16)
        v = tra_shfl_xor(v, 1);
      else
        tra_syncwarp();
    }
    o[i] = v;
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(hot_kernels_tra_emu, m) {
  m.def("forward", &hot_kernels::token_recovering_attention_cuda);
  m.def("backward", &hot_kernels::token_recovering_attention_backward_cuda);
  m.def("set_policy", &set_policy);
  m.def("stats", &stats);
  m.def("reset_stats", &reset_stats);
  m.def("set_smem_optin", &set_smem_optin);
  m.def("selftest", &selftest);
}
