// CPU emulation of the CUDA built-ins used by the TPC kernels (csrc/cuda/tpc_cuda_common.cuh,
// tpc_distance.cu, tpc_select.cu, gather_frames.cu), for builds with -DTPC_EMULATE. Include before
// those sources. What is and is not emulated: README.md beside this file.
//
// The scheduler is tra_emu.h's (one std::thread per CUDA thread, one runnable at a time, switching
// only at barriers and warp collectives; blocks one after another; policies 0/1/2 = lowest id /
// highest id / random first, for threads and for blocks). On top of it this header provides the
// CUDA names the TPC sources use as they are: threadIdx / blockIdx / blockDim, __syncthreads,
// __syncwarp, __shfl_xor_sync / __shfl_up_sync / __ballot_sync (warp collectives), atomicAdd on
// int (one thread runs at a time: a plain read-modify-write), __threadfence (counted, no effect),
// __ldcg, the bit casts, half/bfloat16 conversions (round to nearest even), and nvcuda::wmma
// (fragments with the mma.sync layouts, mma_sync a warp collective).
//
// Shared memory: TPC_SHARED(type, name, dims) declares a static variable (blocks never run at the
// same time) and registers it; the first thread of each block to reach the declaration fills it
// with the poison byte (0xFF: NaN in float32/float16/bfloat16, -1 in ints; 0x7F under policy 1, a
// large finite float and a large int), so a read before a write shows, and differs between policies.
#pragma once

#include "tra_emu.h"

#include <math.h>

#include <c10/core/Device.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <unordered_map>

#define __device__
#define __host__
#define __global__ inline
#define __forceinline__ inline
#define __launch_bounds__(...)

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
using cudaStream_t = void*;

namespace tpc_emu {

inline bool g_force_fma = false;  // the HOT_KERNELS_CUDA_GRAM=fma switch, per call (set by the test)
inline int64_t g_fences = 0;      // __threadfence calls (a count only: the memory model is not emulated)
inline int64_t g_mmas = 0;        // wmma::mma_sync calls (per lane)
inline int64_t g_ballot_bits = 0;  // set bits of every __ballot_sync result (counted once per warp)

struct Dim3 {
  unsigned x, y, z;
};
inline Dim3 thread_idx() { return {static_cast<unsigned>(tra_emu::tl_tid), 0u, 0u}; }
inline Dim3 block_idx() { return {static_cast<unsigned>(tra_emu::tl_block->bid), 0u, 0u}; }
inline Dim3 block_dim() { return {static_cast<unsigned>(tra_emu::tl_block->n), 0u, 0u}; }

// The block now running, as a number that changes from one block (or launch) to the next.
inline uint64_t block_epoch() {
  return (static_cast<uint64_t>(tra_emu::g_stats.launches) << 32) ^ static_cast<uint64_t>(tra_emu::tl_block->index);
}

// A TPC_SHARED variable: poisoned by the first thread of a block that reaches its declaration.
inline void shared_region(void* p, size_t bytes) {
  static std::unordered_map<void*, uint64_t> last;  // address -> epoch of its last poisoning
  const uint64_t now = block_epoch() + 1;           // + 1: never 0 (a fresh map entry)
  uint64_t& seen = last[p];
  if (seen == now) return;
  seen = now;
  std::memset(p, tra_emu::g_policy == 1 ? 0x7F : 0xFF, bytes);
}

template <typename T>
inline uint32_t to_bits(T v) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}
template <typename T>
inline T from_bits(uint32_t u) {
  T v;
  std::memcpy(&v, &u, 4);
  return v;
}

inline void check_full(unsigned mask, const char* what) {
  if (mask != 0xffffffffu) throw std::runtime_error(std::string("tpc_emu: ") + what + " with a partial lane mask");
}

// Every lane publishes v and gets back what lane src(lane) published (src(lane) < 0: its own v).
template <typename T, typename Src>
inline T exchange(T v, Src src) {
  auto& b = *tra_emu::tl_block;
  const int warp = tra_emu::tl_tid / tra_emu::kWarpSize, lane = tra_emu::tl_tid % tra_emu::kWarpSize;
  uint32_t* x = tra_emu::exchange_half(b, warp);
  x[lane * tra_emu::kSlots] = to_bits(v);
  tra_emu::barrier(warp, tra_emu::Kind::kShfl);
  const int s = src(lane);
  return s < 0 ? v : from_bits<T>(x[(s & 31) * tra_emu::kSlots]);
}

}  // namespace tpc_emu

#define threadIdx (::tpc_emu::thread_idx())
#define blockIdx (::tpc_emu::block_idx())
#define blockDim (::tpc_emu::block_dim())
#define TPC_SHARED(type, name, dims) \
  static type name dims;             \
  ::tpc_emu::shared_region(&name, sizeof(name))

inline void __syncthreads() { tra_emu::barrier(-1); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  tpc_emu::check_full(mask, "__syncwarp");
  tra_emu::barrier(tra_emu::tl_tid / tra_emu::kWarpSize);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  tpc_emu::check_full(mask, "__shfl_xor_sync");
  return tpc_emu::exchange(v, [&](int lane) { return lane ^ lane_mask; });
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
  tpc_emu::check_full(mask, "__shfl_up_sync");
  const int d = static_cast<int>(delta);
  return tpc_emu::exchange(v, [&](int lane) { return lane >= d ? lane - d : -1; });
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane) {
  tpc_emu::check_full(mask, "__shfl_sync");
  return tpc_emu::exchange(v, [&](int) { return src_lane; });
}
// Bit l = lane l's predicate: every lane publishes its own, then reads all 32.
inline unsigned __ballot_sync(unsigned mask, int pred) {
  tpc_emu::check_full(mask, "__ballot_sync");
  auto& b = *tra_emu::tl_block;
  const int warp = tra_emu::tl_tid / tra_emu::kWarpSize, lane = tra_emu::tl_tid % tra_emu::kWarpSize;
  uint32_t* x = tra_emu::exchange_half(b, warp);
  x[lane * tra_emu::kSlots] = pred ? 1u : 0u;
  tra_emu::barrier(warp, tra_emu::Kind::kShfl);
  unsigned bits = 0;
  for (int l = 0; l < tra_emu::kWarpSize; ++l) bits |= (x[l * tra_emu::kSlots] ? 1u : 0u) << l;
  if (lane == 0) tpc_emu::g_ballot_bits += __builtin_popcount(bits);
  return bits;
}
inline int __ffs(unsigned v) { return __builtin_ffs(static_cast<int>(v)); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }

inline int atomicAdd(int* p, int v) {  // one thread runs at a time
  const int old = *p;
  *p = old + v;
  return old;
}
inline void __threadfence() { ++tpc_emu::g_fences; }
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

inline float __int_as_float(int v) { return tpc_emu::from_bits<float>(static_cast<uint32_t>(v)); }
inline float __uint_as_float(unsigned v) { return tpc_emu::from_bits<float>(v); }
inline unsigned __float_as_uint(float v) { return tpc_emu::to_bits(v); }
inline int __float_as_int(float v) { return static_cast<int>(tpc_emu::to_bits(v)); }
inline double __longlong_as_double(long long v) {
  double d;
  std::memcpy(&d, &v, 8);
  return d;
}
inline float __half2float(__half v) { return static_cast<float>(v); }
inline float __bfloat162float(__nv_bfloat16 v) { return static_cast<float>(v); }
inline __half __float2half_rn(float v) { return __half(v); }  // c10 rounds to nearest even
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// ---- host side ---------------------------------------------------------------------------------

#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace cuda
}  // namespace c10

namespace tpc_emu {
// A launch of `blocks` blocks of `threads` threads, each running fn (no dynamic shared memory).
inline void launch(unsigned blocks, int threads, const std::function<void()>& fn) {
  tra_emu::launch(static_cast<int64_t>(blocks), threads, 0, fn);
}
}  // namespace tpc_emu

// ---- nvcuda::wmma ------------------------------------------------------------------------------
//
// Fragments hold their elements in the register layouts of the mma.sync instructions a wmma call
// compiles to on sm_80/sm_90 (lane = 4 g + t): tf32 m16n16k8 = two m16n8k8, half m16n16k16 = two
// m16n8k16, split along n. Real wmma fragment layouts are unspecified (the kernels only load,
// store, fill, mma and touch elements one by one, so any one-to-one layout gives the same
// results); a GPU run is the only check of the real one. mma_sync is a warp collective: each lane
// publishes its A and B elements, waits for the warp, then computes its own accumulator elements
// (products exact, the K-term sum in double, rounded once when added: the hardware's internal
// order is unspecified). tf32 operands are truncated to tf32 (the low 13 mantissa bits ignored,
// as the tensor cores do), so an operand not rounded by __float_to_tf32 loses them.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <typename T>
struct elem {
  using type = T;
};
template <>
struct elem<precision::tf32> {
  using type = float;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr bool kA = std::is_same<Use, matrix_a>::value, kB = std::is_same<Use, matrix_b>::value;
  static constexpr int rows = kA ? M : kB ? K : M;
  static constexpr int cols = kA ? K : N;
  static constexpr int num_elements = rows * cols / 32;
  using element_type = typename elem<T>::type;
  element_type x[num_elements];
};

// (row, col) of element e of lane `lane` in a fragment of `Use` with inner dimension K (8: tf32,
// 16: half). A is M x K (16 x K), B is K x N (K x 16), the accumulator 16 x 16.
template <typename Use>
inline void coord(int K, int e, int lane, int& r, int& c) {
  const int g = lane >> 2, t = lane & 3;
  if (std::is_same<Use, matrix_a>::value) {
    if (K == 8) {  // m16n8k8 tf32 A: a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4)
      r = g + 8 * (e & 1);
      c = t + 4 * (e >> 1);
    } else {  // m16n8k16 A: a0,1 (g, 2t..), a2,3 (g + 8, 2t..), a4,5 (g, 2t + 8..), a6,7 (g + 8, 2t + 8..)
      r = g + 8 * ((e >> 1) & 1);
      c = 2 * t + (e & 1) + 8 * (e >> 2);
    }
  } else if (std::is_same<Use, matrix_b>::value) {
    if (K == 8) {  // two m16n8k8 B (n halves h = e / 2): b0 (k = t, n = g), b1 (k = t + 4, n = g)
      r = t + 4 * (e & 1);
      c = g + 8 * (e >> 1);
    } else {  // two m16n8k16 B (h = e / 4): b0,1 (k = 2t.., n = g), b2,3 (k = 2t + 8.., n = g)
      const int i = e & 3;
      r = 2 * t + (i & 1) + 8 * (i >> 1);
      c = g + 8 * (e >> 2);
    }
  } else {  // two m16n8 C tiles (h = e / 4): c0,1 (g, 2t..), c2,3 (g + 8, 2t..)
    const int i = e & 3;
    r = g + 8 * (i >> 1);
    c = 2 * t + (i & 1) + 8 * (e >> 2);
  }
}

inline float __float_to_tf32(float v) {  // cvt.rna.tf32.f32: nearest, ties away from zero
  if (!std::isfinite(v)) return v;
  return tpc_emu::from_bits<float>((tpc_emu::to_bits(v) + 0x1000u) & 0xFFFFE000u);
}

template <typename Use, int M, int N, int K, typename T, typename L, typename E>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, E v) {
  for (auto& e : f.x) e = static_cast<typename fragment<Use, M, N, K, T, L>::element_type>(v);
}

// The CUDA C++ Programming Guide's requirements of load/store_matrix_sync: a 256-bit aligned
// pointer and a leading dimension that is a multiple of 16 bytes.
template <typename P>
inline void check_wmma_address(const P* p, unsigned ld, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ld * sizeof(P)) % 16 != 0)
    throw std::runtime_error(std::string("tpc_emu: ") + what + ": pointer not 32-byte aligned or ld (" +
                             std::to_string(ld) + " elements) not a multiple of 16 bytes");
}

// Per lane, no exchange: every lane reads its own elements (the hardware's ldmatrix/ld are per
// lane too). Row-major: (r, c) at p[r * ld + c]; col-major: at p[c * ld + r].
template <typename Use, int M, int N, int K, typename T, typename L, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ld) {
  check_wmma_address(p, ld, "load_matrix_sync");
  const int lane = tra_emu::tl_tid % tra_emu::kWarpSize;
  constexpr bool col = std::is_same<L, col_major>::value;
  for (int e = 0; e < f.num_elements; ++e) {
    int r, c;
    coord<Use>(K, e, lane, r, c);
    f.x[e] = p[col ? c * ld + r : r * ld + c];
  }
}

template <int M, int N, int K, typename T, typename P>
inline void store_matrix_sync(P* p, const fragment<accumulator, M, N, K, T>& f, unsigned ld, layout_t layout) {
  check_wmma_address(p, ld, "store_matrix_sync");
  const int lane = tra_emu::tl_tid % tra_emu::kWarpSize;
  for (int e = 0; e < f.num_elements; ++e) {
    int r, c;
    coord<accumulator>(K, e, lane, r, c);
    p[layout == mem_col_major ? c * ld + r : r * ld + c] = f.x[e];
  }
}

// Per warp: 2 halves (alternating from one mma to the next, as in tra_emu) x 32 lanes x 16 words.
inline thread_local int tl_mma_half = 0;
inline float g_mma_buf[64][2][32][16];

template <int M, int N, int K, typename TA, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  static_assert(M == 16 && N == 16 && (K == 8 || K == 16), "m16n16k8 (tf32) and m16n16k16 (half) only");
  constexpr bool tf32 = std::is_same<TA, precision::tf32>::value;
  constexpr int NA = M * K / 32, NB = K * N / 32;
  const int warp = tra_emu::tl_tid / tra_emu::kWarpSize, lane = tra_emu::tl_tid % tra_emu::kWarpSize;
  if (warp >= 64) throw std::runtime_error("tpc_emu: more than 64 warps per block");
  float(&buf)[32][16] = g_mma_buf[warp][tl_mma_half];
  tl_mma_half ^= 1;
  auto operand = [](float v) { return tf32 ? __uint_as_float(__float_as_uint(v) & 0xFFFFE000u) : v; };
  for (int e = 0; e < NA; ++e) buf[lane][e] = operand(static_cast<float>(a.x[e]));
  for (int e = 0; e < NB; ++e) buf[lane][NA + e] = operand(static_cast<float>(b.x[e]));
  ++tpc_emu::g_mmas;
  tra_emu::barrier(warp, tra_emu::Kind::kMma);
  // Inverse layouts: which lane / element holds A(r, k) and B(k, n).
  static const auto inv = [] {
    struct Inv {
      int a[16][16], b[16][16];  // lane * 16 + element
    } v{};
    for (int l = 0; l < 32; ++l) {
      for (int e = 0; e < NA; ++e) {
        int r, cc;
        coord<matrix_a>(K, e, l, r, cc);
        v.a[r][cc] = l * 16 + e;
      }
      for (int e = 0; e < NB; ++e) {
        int r, cc;
        coord<matrix_b>(K, e, l, r, cc);
        v.b[r][cc] = l * 16 + NA + e;
      }
    }
    return v;
  }();
  const float* flat = &buf[0][0];
  for (int e = 0; e < d.num_elements; ++e) {
    int r, n;
    coord<accumulator>(K, e, lane, r, n);
    double acc = 0;
    for (int k = 0; k < K; ++k) acc += static_cast<double>(flat[inv.a[r][k]]) * static_cast<double>(flat[inv.b[k][n]]);
    d.x[e] = static_cast<float>(static_cast<double>(c.x[e]) + acc);
  }
}

}  // namespace wmma
}  // namespace nvcuda
