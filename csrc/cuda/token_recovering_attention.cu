// Token recovering attention (DESIGN.md op 7), CUDA forward and backward.
//
// out = [query +] concat_h(softmax(Q_h K_h^T * scale) V_h) Wo^T + bo, with Q = query Wq^T + bq,
// K = x Wk^T + bk, V = x Wv^T + bv; query (1 or S, L, C), x (S, M, C), d = C / H.
//
// Design (the kernels are in tra_kernels.cuh):
//  * Projections are ATen GEMMs (cuBLAS/cuBLASLt on the GPU; fp32 accumulation for half inputs):
//    K|V is ONE GEMM against the stacked weight [Wk; Wv] (2C, C) with the stacked bias as the
//    GEMM epilogue; a shared query (leading dim 1) is projected ONCE, Q (L, C); the output
//    projection is one addmm (bias in the epilogue) followed by one in-place residual add (the
//    shared query broadcast over S). A fused projection kernel would not beat cuBLAS on these
//    GEMMs (~85% of the FLOPs at HoT's shapes: 4*M*C^2 + 2*L*C^2 per sequence vs 4*L*M*C for the
//    attention), so they stay library calls; the scale is applied to the fp32 logits in the
//    kernels (folded with log2(e) for exp2), so Q is the plain projection the reference rounds.
//  * Attention forward (tra_fwd_kernel): one block of 4 warps per (sequence, head, 64 query
//    rows), blockIdx.x = (s * H + h) * nlb + lb (S on x: no gridDim.y/z limit; the blocks of one
//    (s, h) run together and share K_h, V_h through L2; a shared Q tile is read by every
//    sequence's blocks). Keys in tiles of 64 with the online softmax (running max and sum per row
//    in registers, log2 domain); writes o (S, L, C) in the input dtype and lse (S, H, L) fp32.
//    The S x H x L x M probabilities never exist in memory.
//  * Backward: recompute Q and K|V (GEMMs), dO = grad Wo (GEMM), then
//      - tra_fwd_kernel again in recompute mode: o (for dWo = grad^T o) and D = rowsum(dO_h o_h);
//      - tra_dkdv_kernel: one block per (sequence, head, 64 keys); P^T = exp(scale K Q^T - lse)
//        from the saved lse, dV = P^T dO, dS^T = P^T (V dO^T - D), dK = scale dS^T Q, accumulated
//        in registers over the query tiles: one writer per element, no atomics;
//      - tra_dq_kernel: one block per (group of sequences, head, 64 query rows) accumulating
//        dQ = scale sum dS K in registers over its sequences in order and over key tiles. Per-
//        sequence query: groups of one sequence, written directly. Shared query: G groups (G
//        depends on the shapes only) write fp32 partial sums (G, L, C), then tra_sum_groups_kernel
//        adds them in group order: the sum over S is formed in a fixed order, with no S copies
//        of (L, C) tensors;
//      - weight and bias gradients and d_x, d_query: ATen GEMMs / sums (cuBLAS and ATen's
//        reductions are deterministic for fixed shapes on one device).
//  * Precision: float16/bfloat16 attention uses mma.sync m16n8k16 tensor-core tiles (sm_80+) with
//    fp32 accumulation and fp32 softmax statistics; float32 uses fp32 FMA tiles on CUDA cores
//    (no TF32), the same tiling. Head dims up to 128 take the kernels (padded to 16, 32, 64 or
//    128); d > 128 falls back to chunked ATen attention (same GEMMs around it).
//  * Every launch is on the current stream of the inputs' device (CUDAGuard), with no host sync
//    (CUDA-graph safe); element offsets are int64 (S*L*C passes 2^31 at S = 17408).
//  * Shared memory: each kernel takes its default tiles where they fit the device's opt-in limit
//    of dynamic shared memory per block, else its compact tiles (float32 at head dims 65-128: the
//    defaults need 108-116 KB, over the 99 KB of sm_86/89/120 GPUs; the compact ones 75-88 KB),
//    else (no GPU of sm_80+ has so little) the ATen attention below. The limit, the compute
//    capability and each kernel's cudaFuncSetAttribute are read/done once per device, not per call.
//
// TRA_EMULATE (never defined in the build): the file compiles as plain C++ against a CPU
// emulation of the device primitives and of the launch, to test kernels and glue without a GPU.
#include "tra_kernels.cuh"

#ifndef TRA_EMULATE
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/logsumexp.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>
#include <vector>

#include "../hot_kernels.h"

namespace hot_kernels {
namespace {

using namespace hot_kernels::tra;

constexpr const char* kFwd = "token_recovering_attention (cuda)";
constexpr const char* kBwd = "token_recovering_attention_backward (cuda)";

bool has(const std::optional<at::Tensor>& b) { return b.has_value() && b->defined(); }

bool on_device(const at::Tensor& t) {
#ifdef TRA_EMULATE
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

// ---- launches ----------------------------------------------------------------------------------

// What the launches need to know of a device, read once per device (thread-safe) rather than
// before every launch. The emulation takes the limit from the test (tra_emu::g_smem_optin).
struct DeviceInfo {
  size_t smem_optin = 0;  // opt-in limit of dynamic shared memory per block, bytes
  int major = 0;          // compute capability
};

constexpr int kMaxDevices = 128;  // c10::DeviceIndex is an int8_t

#ifdef TRA_EMULATE
DeviceInfo device_info(int /*device*/) { return DeviceInfo{tra_emu::g_smem_optin, 9}; }
#else
int device_attribute(cudaDeviceAttr attr, int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device));
  return v;
}

const DeviceInfo& device_info(int device) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "token_recovering_attention: CUDA device index ", device,
              " out of range");
  static std::once_flag once[kMaxDevices];
  static DeviceInfo info[kMaxDevices];
  std::call_once(once[device], [device] {  // a throw leaves the flag unset: the next call retries
    info[device].smem_optin = static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    info[device].major = device_attribute(cudaDevAttrComputeCapabilityMajor, device);
  });
  return info[device];
}

// Raises Kernel's dynamic shared memory limit to kSmem bytes on `device`, once per (kernel, device):
// the attribute belongs to the kernel in that device's context and stays set.
template <auto Kernel, size_t kSmem>
void allow_smem(int device) {
  if constexpr (kSmem > 48 * 1024) {
    static std::once_flag once[kMaxDevices];
    std::call_once(once[device], [] {
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem)));
    });
  }
}
#endif

// One launch of Kernel in kThreads-thread blocks with kSmem bytes of dynamic shared memory on the
// current stream of `device` (the inputs' device, current under the entry points' CUDAGuard).
template <auto Kernel, size_t kSmem, typename P>
void launch(int64_t blocks, const P& params, int device, const char* name) {
  if (blocks <= 0) return;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), name, ": ", blocks,
              " blocks do not fit one launch (gridDim.x < 2^31)");
  const size_t limit = device_info(device).smem_optin;  // the tile choice makes this hold
  TORCH_CHECK(kSmem <= limit, name, ": needs ", kSmem, " bytes of shared memory per block, the device allows ",
              limit);
#ifdef TRA_EMULATE
  tra_emu::launch(blocks, kThreads, kSmem, [&] { Kernel(params); });
#else
  allow_smem<Kernel, kSmem>(device);
  Kernel<<<dim3(static_cast<unsigned>(blocks)), dim3(kThreads), kSmem, c10::cuda::getCurrentCUDAStream()>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

void launch_sum_groups(const float* part, int64_t groups, int64_t n, float* out) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks <= 0) return;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), kBwd, ": dQ of ", n, " elements is too large");
#ifdef TRA_EMULATE
  tra_emu::launch(blocks, kThreads, 0, [&] { tra_sum_groups_kernel(part, groups, n, out); });
#else
  tra_sum_groups_kernel<<<dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0,
                          c10::cuda::getCurrentCUDAStream()>>>(part, groups, n, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// ---- tile choice -------------------------------------------------------------------------------

enum Tiles : int { kNoFit = -1, kDefaultTiles = 0, kCompactTiles = 1 };

// The tiles of a kernel (shared-memory layout Smem) that fit `limit` bytes per block: the default,
// else the compact ones where they exist (only where the default needs more than kMinOptinSmem).
template <template <typename, int, bool> class Smem, typename T, int DP>
Tiles fitting_tiles(size_t limit) {
  if (Smem<T, DP, false>::bytes <= limit) return kDefaultTiles;
  if constexpr (Smem<T, DP, false>::bytes > kMinOptinSmem) {
    if (Smem<T, DP, true>::bytes <= limit) return kCompactTiles;
  }
  return kNoFit;
}

// f.template operator()<kCompact>() for the chosen tiles (compact ones instantiated only where they exist).
template <template <typename, int, bool> class Smem, typename T, int DP, typename F>
void with_tiles(Tiles tiles, F&& f) {
  if constexpr (Smem<T, DP, false>::bytes > kMinOptinSmem) {
    if (tiles == kCompactTiles) return f.template operator()<true>();
  }
  TORCH_CHECK(tiles == kDefaultTiles, "token_recovering_attention: no kernel tiles fit (internal error)");
  f.template operator()<false>();
}

// f.template operator()<T, DP>() for the input dtype and the padded head dim.
template <typename T, typename F>
void dispatch_dp(int64_t dp, F&& f) {
  switch (dp) {
    case 16: f.template operator()<T, 16>(); break;
    case 32: f.template operator()<T, 32>(); break;
    case 64: f.template operator()<T, 64>(); break;
    case 128: f.template operator()<T, 128>(); break;
    default: TORCH_CHECK(false, "token_recovering_attention: no kernel for padded head dim ", dp);
  }
}

template <typename F>
void dispatch(at::ScalarType dtype, int64_t dp, F&& f) {
  switch (dtype) {
    case at::kFloat: dispatch_dp<float>(dp, f); break;
    case at::kHalf: dispatch_dp<c10::Half>(dp, f); break;
    case at::kBFloat16: dispatch_dp<c10::BFloat16>(dp, f); break;
    default: TORCH_CHECK(false, "token_recovering_attention: unsupported dtype ", dtype);
  }
}

// ---- inputs ------------------------------------------------------------------------------------

struct Dims {
  int64_t S, Sq, L, M, C, H, d;
  bool shared;
  at::ScalarType dtype;
  int device;  // the inputs' CUDA device index
};

constexpr int64_t kMaxHeadDim = 128;  // kernels up to here; ATen attention above

int64_t padded_head_dim(int64_t d) { return d <= 16 ? 16 : d <= 32 ? 32 : d <= 64 ? 64 : 128; }

void check_tensor(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " is undefined");
  TORCH_CHECK(on_device(t) && t.device() == x.device(), fn, ": ", name, " must be on ", x.device(), " like x, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), fn, ": ", name, " must have the dtype of x (", x.scalar_type(),
              "), got ", t.scalar_type());
}

Dims check_inputs(const char* fn, const at::Tensor& query, const at::Tensor& x, const at::Tensor& wq,
                  const std::optional<at::Tensor>& bq, const at::Tensor& wk, const std::optional<at::Tensor>& bk,
                  const at::Tensor& wv, const std::optional<at::Tensor>& bv, const at::Tensor& wo,
                  const std::optional<at::Tensor>& bo, int64_t num_heads) {
  TORCH_CHECK(x.defined() && x.dim() == 3, fn, ": x must be (S, M, C), got ",
              x.defined() ? x.sizes() : at::IntArrayRef{});
  TORCH_CHECK(on_device(x), fn, ": x must be a CUDA tensor, got ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, fn,
              ": x must be float32, float16 or bfloat16 (float64 runs on the cpu and reference backends), got ", dtype);
  check_tensor(fn, "query", query, x);
  Dims D{};
  D.S = x.size(0);
  D.M = x.size(1);
  D.C = x.size(2);
  TORCH_CHECK(query.dim() == 3 && query.size(2) == D.C && (query.size(0) == 1 || query.size(0) == D.S), fn,
              ": query must be (1, L, C) or (S, L, C) with S = ", D.S, ", C = ", D.C, ", got ", query.sizes());
  D.Sq = query.size(0);
  D.L = query.size(1);
  D.shared = D.Sq == 1;
  TORCH_CHECK(num_heads > 0 && D.C % num_heads == 0, fn, ": num_heads = ", num_heads, " must divide C = ", D.C);
  D.H = num_heads;
  D.d = D.C / num_heads;
  // The kernels take L, M, C, H, d as int and form int64 offsets from them.
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max() / 4;
  TORCH_CHECK(D.L <= kIntMax && D.M <= kIntMax && D.C <= kIntMax, fn, ": L = ", D.L, ", M = ", D.M, ", C = ", D.C,
              " must each be below 2^29");
  auto weight = [&](const char* name, const at::Tensor& w) {
    check_tensor(fn, name, w, x);
    TORCH_CHECK(w.dim() == 2 && w.size(0) == D.C && w.size(1) == D.C, fn, ": ", name, " must be (C, C) = (", D.C,
                ", ", D.C, "), got ", w.sizes());
  };
  auto bias = [&](const char* name, const std::optional<at::Tensor>& b) {
    if (!has(b)) return;
    check_tensor(fn, name, *b, x);
    TORCH_CHECK(b->dim() == 1 && b->size(0) == D.C, fn, ": ", name, " must be (C,) = (", D.C, ",), got ", b->sizes());
  };
  weight("wq", wq);
  weight("wk", wk);
  weight("wv", wv);
  weight("wo", wo);
  bias("bq", bq);
  bias("bk", bk);
  bias("bv", bv);
  bias("bo", bo);
  D.dtype = dtype;
  D.device = x.device().index();
  if (dtype != at::kFloat && D.d <= kMaxHeadDim) {
    const int major = device_info(D.device).major;
    TORCH_CHECK(major >= 8, fn, ": float16/bfloat16 tensor-core kernels need compute capability 8.0 or newer, ",
                "this device has ", major, ".x");
  }
  return D;
}

at::Tensor linear(const at::Tensor& in, const at::Tensor& w, const at::Tensor& b) {
  return b.defined() ? at::addmm(b, in, w.t()) : at::mm(in, w.t());
}

// What forward and backward share: the projected query and the K|V projection.
struct Projected {
  at::Tensor q_in;  // (Sq*L, C) query, contiguous, input dtype
  at::Tensor x2;    // (S*M, C)
  at::Tensor wkv;   // (2C, C) = [Wk; Wv]
  at::Tensor q;     // (Sq*L, C) = q_in Wq^T + bq
  at::Tensor kv;    // (S*M, 2C) = x [Wk; Wv]^T + [bk; bv]
};

Projected project(const Dims& D, const at::Tensor& query, const at::Tensor& x, const at::Tensor& wq,
                  const std::optional<at::Tensor>& bq, const at::Tensor& wk, const std::optional<at::Tensor>& bk,
                  const at::Tensor& wv, const std::optional<at::Tensor>& bv) {
  Projected p;
  p.q_in = query.contiguous().view({D.Sq * D.L, D.C});
  p.x2 = x.contiguous().view({D.S * D.M, D.C});
  p.wkv = at::cat({wk, wv}, 0);
  at::Tensor bkv;
  if (has(bk) || has(bv)) {
    const auto opt = x.options();
    bkv = at::cat({has(bk) ? *bk : at::zeros({D.C}, opt), has(bv) ? *bv : at::zeros({D.C}, opt)}, 0);
  }
  p.q = linear(p.q_in, wq, has(bq) ? *bq : at::Tensor());
  p.kv = linear(p.x2, p.wkv, bkv);
  return p;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// 16-byte tile accesses: head slices start on 16-byte boundaries and rows are whole vectors.
bool vector_ok(const Dims& D, std::initializer_list<const at::Tensor*> ts) {
  const int64_t v = 16 / static_cast<int64_t>(c10::elementSize(D.dtype));
  if (D.d % v != 0 || D.C % v != 0) return false;
  for (const at::Tensor* t : ts)
    if (t->defined() && !aligned16(t->data_ptr())) return false;
  return true;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The tiles each attention kernel takes on this call's device (kNoFit everywhere above head dim 128).
struct Plan {
  Tiles fwd = kNoFit, dq = kNoFit, dkv = kNoFit;
  bool forward_kernels() const { return fwd != kNoFit; }
  bool backward_kernels() const { return fwd != kNoFit && dq != kNoFit && dkv != kNoFit; }
};

Plan plan(const Dims& D) {
  Plan pl;
  if (D.d > kMaxHeadDim) return pl;
  const size_t limit = device_info(D.device).smem_optin;
  dispatch(D.dtype, padded_head_dim(D.d), [&]<typename T, int DP>() {
    pl.fwd = fitting_tiles<FwdSmem, T, DP>(limit);
    pl.dq = fitting_tiles<DqSmem, T, DP>(limit);
    pl.dkv = fitting_tiles<DkvSmem, T, DP>(limit);
  });
  return pl;
}

// ---- attention core: kernels -------------------------------------------------------------------

// o (S*L, C) and lse (S, H, L); with dout, instead of lse: dsum (S, H, L) = rowsum(dout_h o_h).
void attention_forward_kernels(const Dims& D, const Plan& pl, const at::Tensor& q, const at::Tensor& kv,
                               const at::Tensor& o, const at::Tensor& lse, const at::Tensor& dout,
                               const at::Tensor& dsum, double scale) {
  const bool vec = vector_ok(D, {&q, &kv, &o, &dout});
  const int64_t nlb = ceil_div(D.L, kRows);
  dispatch(D.dtype, padded_head_dim(D.d), [&]<typename T, int DP>() {
    FwdParams<T> p{};
    p.q = q.data_ptr<T>();
    p.q_sstride = D.shared ? 0 : D.L * D.C;
    p.kv = kv.data_ptr<T>();
    p.o = o.data_ptr<T>();
    p.lse = lse.defined() ? lse.data_ptr<float>() : nullptr;
    p.dout = dout.defined() ? dout.data_ptr<T>() : nullptr;
    p.dsum = dsum.defined() ? dsum.data_ptr<float>() : nullptr;
    p.S = D.S;
    p.L = static_cast<int>(D.L);
    p.M = static_cast<int>(D.M);
    p.C = static_cast<int>(D.C);
    p.H = static_cast<int>(D.H);
    p.d = static_cast<int>(D.d);
    p.nlb = static_cast<int>(nlb);
    p.scale_log2 = static_cast<float>(scale * static_cast<double>(kLog2e));
    p.vec = vec;
    with_tiles<FwdSmem, T, DP>(pl.fwd, [&]<bool kC>() {
      launch<tra_fwd_kernel<T, DP, kC>, FwdSmem<T, DP, kC>::bytes>(D.S * D.H * nlb, p, D.device, kFwd);
    });
  });
}

// Number of sequence groups for a shared query's dQ: about 1024 blocks, at most 256 groups and
// 256 MB of partial sums; a function of the shapes only (the summation order is fixed by it).
int64_t dq_groups(const Dims& D) {
  const int64_t per_group = std::max<int64_t>(1, D.H * ceil_div(D.L, kRows));
  int64_t G = std::min<int64_t>({ceil_div(1024, per_group), D.S, 256});
  G = std::min<int64_t>(G, std::max<int64_t>(1, (int64_t(256) << 20) / std::max<int64_t>(1, D.L * D.C * 4)));
  G = std::max<int64_t>(G, 1);
  const int64_t seqs = ceil_div(D.S, G);
  return ceil_div(D.S, seqs);  // no empty group
}

// o, dsum via the recompute; dkv (S*M, 2C); dq: per-sequence (S*L, C) input dtype, shared (L, C) fp32.
void attention_backward_kernels(const Dims& D, const Plan& pl, const at::Tensor& q, const at::Tensor& kv,
                                const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& o,
                                const at::Tensor& dkv, const at::Tensor& dq, double scale) {
  auto dsum = at::empty({D.S, D.H, D.L}, o.options().dtype(at::kFloat));
  attention_forward_kernels(D, pl, q, kv, o, at::Tensor(), dout, dsum, scale);

  const bool vec = vector_ok(D, {&q, &kv, &dout, &dkv, &dq});
  const int64_t nlb = ceil_div(D.L, kRows), nmb = ceil_div(D.M, kRows);
  const int64_t groups = D.shared ? dq_groups(D) : D.S;
  const int64_t seqs = D.shared ? ceil_div(D.S, groups) : 1;
  at::Tensor part;
  if (D.shared) part = at::empty({groups, D.L, D.C}, o.options().dtype(at::kFloat));
  const float scale_log2 = static_cast<float>(scale * static_cast<double>(kLog2e));

  dispatch(D.dtype, padded_head_dim(D.d), [&]<typename T, int DP>() {
    DkvParams<T> pk{};
    pk.q = q.data_ptr<T>();
    pk.q_sstride = D.shared ? 0 : D.L * D.C;
    pk.kv = kv.data_ptr<T>();
    pk.dout = dout.data_ptr<T>();
    pk.lse = lse.data_ptr<float>();
    pk.dsum = dsum.data_ptr<float>();
    pk.dkv = dkv.data_ptr<T>();
    pk.S = D.S;
    pk.L = static_cast<int>(D.L);
    pk.M = static_cast<int>(D.M);
    pk.C = static_cast<int>(D.C);
    pk.H = static_cast<int>(D.H);
    pk.d = static_cast<int>(D.d);
    pk.nmb = static_cast<int>(nmb);
    pk.scale_log2 = scale_log2;
    pk.scale = static_cast<float>(scale);
    pk.vec = vec;
    with_tiles<DkvSmem, T, DP>(pl.dkv, [&]<bool kC>() {
      launch<tra_dkdv_kernel<T, DP, kC>, DkvSmem<T, DP, kC>::bytes>(D.S * D.H * nmb, pk, D.device, kBwd);
    });

    DqParams<T> pq{};
    pq.q = pk.q;
    pq.q_sstride = pk.q_sstride;
    pq.kv = pk.kv;
    pq.dout = pk.dout;
    pq.lse = pk.lse;
    pq.dsum = pk.dsum;
    pq.dq = D.shared ? nullptr : dq.data_ptr<T>();
    pq.dq_part = D.shared ? part.data_ptr<float>() : nullptr;
    pq.S = D.S;
    pq.seqs = seqs;
    pq.L = pk.L;
    pq.M = pk.M;
    pq.C = pk.C;
    pq.H = pk.H;
    pq.d = pk.d;
    pq.nlb = static_cast<int>(nlb);
    pq.scale_log2 = scale_log2;
    pq.scale = pk.scale;
    pq.vec = vec;
    with_tiles<DqSmem, T, DP>(pl.dq, [&]<bool kC>() {
      launch<tra_dq_kernel<T, DP, kC>, DqSmem<T, DP, kC>::bytes>(groups * D.H * nlb, pq, D.device, kBwd);
    });
  });
  if (D.shared) launch_sum_groups(part.data_ptr<float>(), groups, D.L * D.C, dq.data_ptr<float>());
}

// ---- attention core: ATen (head dim > 128, or no kernel tiles fit the device) ----------------

// Sequences per chunk: the chunk's (n, H, L, M) fp32 logits stay under 256 MB.
int64_t aten_chunk(const Dims& D) {
  const int64_t per_seq = std::max<int64_t>(1, D.H * D.L * D.M * 4);
  return std::max<int64_t>(1, std::min<int64_t>(D.S, (int64_t(256) << 20) / per_seq));
}

// (n*rows, C) -> (n, H, rows, d) fp32.
at::Tensor heads(const at::Tensor& t2d, int64_t n, int64_t rows, const Dims& D) {
  return t2d.reshape({n, rows, D.H, D.d}).permute({0, 2, 1, 3}).to(at::kFloat);
}

at::Tensor kv_heads(const Dims& D, const at::Tensor& kv, int64_t s0, int64_t n, int64_t half) {
  auto t = kv.view({D.S, D.M, 2 * D.C}).narrow(0, s0, n).narrow(2, half * D.C, D.C);
  return t.reshape({n, D.M, D.H, D.d}).permute({0, 2, 1, 3}).to(at::kFloat);  // (n, H, M, d)
}

at::Tensor q_heads(const Dims& D, const at::Tensor& q, int64_t s0, int64_t n) {
  if (D.shared) return heads(q, 1, D.L, D);  // (1, H, L, d): broadcast by matmul
  return heads(q.view({D.S, D.L, D.C}).narrow(0, s0, n), n, D.L, D);
}

void store_heads(const at::Tensor& dst2d, const Dims& D, int64_t rows, int64_t s0, const at::Tensor& h4) {
  const int64_t n = h4.size(0);
  dst2d.view({D.S, rows, D.C}).narrow(0, s0, n).copy_(h4.permute({0, 2, 1, 3}).reshape({n, rows, D.C}));
}

void attention_forward_aten(const Dims& D, const at::Tensor& q, const at::Tensor& kv, const at::Tensor& o,
                            const at::Tensor& lse, double scale) {
  const int64_t cs = aten_chunk(D);
  for (int64_t s0 = 0; s0 < D.S; s0 += cs) {
    const int64_t n = std::min(cs, D.S - s0);
    auto qh = q_heads(D, q, s0, n);
    auto kh = kv_heads(D, kv, s0, n, 0);
    auto vh = kv_heads(D, kv, s0, n, 1);
    auto logits = at::matmul(qh, kh.transpose(-1, -2)).mul_(scale);  // (n, H, L, M)
    auto lse_c = at::logsumexp(logits, {-1});
    auto p = logits.sub_(lse_c.unsqueeze(-1)).exp_();
    store_heads(o, D, D.L, s0, at::matmul(p, vh));
    lse.narrow(0, s0, n).copy_(lse_c);
  }
}

void attention_backward_aten(const Dims& D, const at::Tensor& q, const at::Tensor& kv, const at::Tensor& dout,
                             const at::Tensor& lse, const at::Tensor& o, const at::Tensor& dkv, const at::Tensor& dq,
                             double scale) {
  const int64_t cs = aten_chunk(D);
  at::Tensor dq_sum;  // shared: (H, L, d) fp32, summed over the chunks in order
  if (D.shared) dq_sum = at::zeros({D.H, D.L, D.d}, o.options().dtype(at::kFloat));
  for (int64_t s0 = 0; s0 < D.S; s0 += cs) {
    const int64_t n = std::min(cs, D.S - s0);
    auto qh = q_heads(D, q, s0, n);
    auto kh = kv_heads(D, kv, s0, n, 0);
    auto vh = kv_heads(D, kv, s0, n, 1);
    auto doh = heads(dout.view({D.S, D.L, D.C}).narrow(0, s0, n), n, D.L, D);
    auto p = at::matmul(qh, kh.transpose(-1, -2)).mul_(scale);
    p.sub_(lse.narrow(0, s0, n).unsqueeze(-1)).exp_();  // P (n, H, L, M)
    auto oh = at::matmul(p, vh);
    store_heads(o, D, D.L, s0, oh);
    auto dsum = doh.mul(oh).sum(-1, /*keepdim=*/true);
    auto dv = at::matmul(p.transpose(-1, -2), doh);
    auto ds = p.mul_(at::matmul(doh, vh.transpose(-1, -2)).sub_(dsum));  // dS in place of P
    auto dk = at::matmul(ds.transpose(-1, -2), qh).mul_(scale);
    auto dqh = at::matmul(ds, kh).mul_(scale);  // (n, H, L, d)
    auto dkv3 = dkv.view({D.S, D.M, 2 * D.C}).narrow(0, s0, n);
    dkv3.narrow(2, 0, D.C).copy_(dk.permute({0, 2, 1, 3}).reshape({n, D.M, D.C}));
    dkv3.narrow(2, D.C, D.C).copy_(dv.permute({0, 2, 1, 3}).reshape({n, D.M, D.C}));
    if (D.shared)
      dq_sum.add_(dqh.sum(0));
    else
      store_heads(dq, D, D.L, s0, dqh);
  }
  if (D.shared) dq.copy_(dq_sum.permute({1, 0, 2}).reshape({D.L, D.C}));
}

}  // namespace

// ---- entry points ------------------------------------------------------------------------------

std::vector<at::Tensor> token_recovering_attention_cuda(
    const at::Tensor& query, const at::Tensor& x, const at::Tensor& wq, const std::optional<at::Tensor>& bq,
    const at::Tensor& wk, const std::optional<at::Tensor>& bk, const at::Tensor& wv,
    const std::optional<at::Tensor>& bv, const at::Tensor& wo, const std::optional<at::Tensor>& bo,
    int64_t num_heads, double scale, bool residual) {
  const Dims D = check_inputs(kFwd, query, x, wq, bq, wk, bk, wv, bv, wo, bo, num_heads);
#ifndef TRA_EMULATE
  const c10::cuda::CUDAGuard guard(x.device());
#endif
  const auto opt = x.options();
  auto lse = at::empty({D.S, D.H, D.L}, opt.dtype(at::kFloat));
  const Projected pr = project(D, query, x, wq, bq, wk, bk, wv, bv);
  auto o = at::empty({D.S * D.L, D.C}, opt);
  if (D.M == 0) {  // softmax over no keys: o = 0 (the validated API never gets here)
    o.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
  } else if (const Plan pl = plan(D); pl.forward_kernels()) {
    attention_forward_kernels(D, pl, pr.q, pr.kv, o, lse, at::Tensor(), at::Tensor(), scale);
  } else {
    attention_forward_aten(D, pr.q, pr.kv, o, lse, scale);
  }
  auto out = linear(o, wo, has(bo) ? *bo : at::Tensor());  // (S*L, C)
  if (residual) {
    if (D.shared)
      out.view({D.S, D.L, D.C}).add_(pr.q_in.view({1, D.L, D.C}));
    else
      out.add_(pr.q_in);
  }
  return {out.view({D.S, D.L, D.C}), lse};
}

std::vector<at::Tensor> token_recovering_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& x, const at::Tensor& wq,
    const std::optional<at::Tensor>& bq, const at::Tensor& wk, const std::optional<at::Tensor>& bk,
    const at::Tensor& wv, const std::optional<at::Tensor>& bv, const at::Tensor& wo,
    const std::optional<at::Tensor>& bo, const at::Tensor& lse, int64_t num_heads, double scale, bool residual) {
  const Dims D = check_inputs(kBwd, query, x, wq, bq, wk, bk, wv, bv, wo, bo, num_heads);
  const int64_t S = D.S, L = D.L, M = D.M, C = D.C;
  check_tensor(kBwd, "grad_out", grad_out, x);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == S && grad_out.size(1) == L && grad_out.size(2) == C, kBwd,
              ": grad_out must be (S, L, C) = (", S, ", ", L, ", ", C, "), got ", grad_out.sizes());
  TORCH_CHECK(lse.defined() && on_device(lse) && lse.device() == x.device(), kBwd, ": lse must be on ", x.device());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, kBwd, ": lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == S && lse.size(1) == D.H && lse.size(2) == L, kBwd,
              ": lse must be (S, H, L) = (", S, ", ", D.H, ", ", L, "), got ", lse.sizes());
#ifndef TRA_EMULATE
  const c10::cuda::CUDAGuard guard(x.device());
#endif
  const auto opt = x.options();
  const auto fopt = opt.dtype(at::kFloat);
  const auto g2 = grad_out.contiguous().view({S * L, C});
  const Projected pr = project(D, query, x, wq, bq, wk, bk, wv, bv);
  const auto lse_c = lse.contiguous();

  auto dout = at::mm(g2, wo);  // d o = grad Wo, (S*L, C)
  auto o = at::empty({S * L, C}, opt);
  auto dkv = at::empty({S * M, 2 * C}, opt);
  auto dq = D.shared ? at::empty({L, C}, fopt) : at::empty({S * L, C}, opt);  // scale * dS K
  if (M == 0) {
    o.zero_();
    dq.zero_();
  } else if (const Plan pl = plan(D); pl.backward_kernels()) {
    attention_backward_kernels(D, pl, pr.q, pr.kv, dout, lse_c, o, dkv, dq, scale);
  } else {
    attention_backward_aten(D, pr.q, pr.kv, dout, lse_c, o, dkv, dq, scale);
  }

  // Output projection.
  auto d_wo = at::mm(g2.t(), o);
  at::Tensor gsum;  // shared query: sum over S of grad_out, (L, C) fp32
  if (D.shared && (residual || has(bo))) gsum = at::sum(g2.view({S, L * C}), {0}, false, at::kFloat).view({L, C});
  at::Tensor d_bo;
  if (has(bo)) d_bo = D.shared ? gsum.sum(0) : at::sum(g2, {0}, false, at::kFloat);
  // K|V projection.
  auto dx = at::mm(dkv, pr.wkv).view({S, M, C});
  auto d_wkv = at::mm(dkv.t(), pr.x2);  // (2C, C)
  at::Tensor d_bkv;
  if (has(bk) || has(bv)) d_bkv = at::sum(dkv, {0}, false, at::kFloat);
  // Query projection.
  at::Tensor d_query, d_wq, d_bq;
  if (D.shared) {
    auto dqin = at::mm(dq, wq.to(at::kFloat));  // (L, C) fp32
    if (residual) dqin.add_(gsum);
    d_query = dqin.to(D.dtype).view({1, L, C});
    d_wq = at::mm(dq.t(), pr.q_in.to(at::kFloat));
    if (has(bq)) d_bq = dq.sum(0);
  } else {
    d_query = (residual ? at::addmm(g2, dq, wq) : at::mm(dq, wq)).view({S, L, C});
    d_wq = at::mm(dq.t(), pr.q_in);
    if (has(bq)) d_bq = at::sum(dq, {0}, false, at::kFloat);
  }

  // Every returned tensor owns its storage (the op forbids outputs that alias each other).
  auto owned = [&](const at::Tensor& t) { return t.to(D.dtype).clone(at::MemoryFormat::Contiguous); };
  auto bias_grad = [&](const at::Tensor& t, const std::optional<at::Tensor>& b) {
    return has(b) ? owned(t) : at::empty({0}, opt);
  };
  return {d_query,
          dx,
          owned(d_wq),
          bias_grad(d_bq, bq),
          owned(d_wkv.narrow(0, 0, C)),
          bias_grad(has(bk) ? d_bkv.narrow(0, 0, C) : at::Tensor(), bk),
          owned(d_wkv.narrow(0, C, C)),
          bias_grad(has(bv) ? d_bkv.narrow(0, C, C) : at::Tensor(), bv),
          owned(d_wo),
          bias_grad(d_bo, bo)};
}

}  // namespace hot_kernels
