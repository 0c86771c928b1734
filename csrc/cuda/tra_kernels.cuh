// Device kernels of token recovering attention (TRA): the attention core, forward and backward.
// Design, launch order and what stays an ATen GEMM: token_recovering_attention.cu. This header
// holds only the kernels (raw pointers, no ATen) so that they can also be compiled as plain C++
// against a CPU emulation of the few device primitives they use (TRA_EMULATE, see below).
//
// Layouts (row-major, element strides): Q (Sq*L, C) with Sq = 1 (shared query) or S; KV (S*M, 2C)
// = [K | V]; o, dO, dQ (S*L, C); dKV (S*M, 2C); lse, D (S, H, L) float32. Head h of a row is
// columns [h*d, h*d + d) (V: C + h*d). Every offset that can pass 2^31 is int64.
//
// Tiling: a block is 4 warps (128 threads); a warp owns 16 rows of the block's row tile and
// computes 16 x 8 accumulator tiles in the register layout of mma.sync m16n8k16 (lane = 4g + t
// holds rows g and g + 8, columns 2t and 2t + 1 of each 8-column tile), for every dtype:
//  * float16 / bfloat16 (kMma): mma.sync.m16n8k16 tensor-core tiles, fp32 accumulation. Both
//    operands are read from shared memory with k (the contraction index) contiguous: the second
//    operand of P V, dS K, P^T dO and dS^T Q is therefore kept transposed in shared memory.
//    Probabilities stay in registers and are re-packed as the A operand (as in FlashAttention-2).
//  * float32: the same tiles computed with fp32 FMAs on CUDA cores (exact fp32, no TF32); the
//    register A operand goes through a per-warp shared scratch tile.
// Shared rows are padded by 16 bytes: the fragment loads of 8 rows x 4 lanes hit 32 distinct
// banks. Tiles past L, M or d are zero-filled when loaded and never stored.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#ifndef TRA_EMULATE
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// ---- device primitives (TRA_EMULATE replaces exactly these with a CPU emulation) -------------
#define TRA_DEV __device__ __forceinline__
#define TRA_KERNEL(threads) __global__ void __launch_bounds__(threads)

namespace hot_kernels {
namespace tra {

TRA_DEV int tra_tid() { return static_cast<int>(threadIdx.x); }
TRA_DEV int64_t tra_bid() { return static_cast<int64_t>(blockIdx.x); }
TRA_DEV unsigned char* tra_smem() {
  extern __shared__ __align__(16) unsigned char tra_smem_buf[];
  return tra_smem_buf;
}
TRA_DEV void tra_sync() { __syncthreads(); }
TRA_DEV void tra_syncwarp() { __syncwarp(); }
TRA_DEV float tra_shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }
TRA_DEV float tra_exp2(float x) { return exp2f(x); }
TRA_DEV float tra_log2(float x) { return log2f(x); }

// Two floats -> one 32-bit register of two 16-bit values (lo in the low half), round to nearest.
template <typename T>
TRA_DEV uint32_t tra_pack2(float lo, float hi);
template <>
TRA_DEV uint32_t tra_pack2<c10::BFloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
TRA_DEV uint32_t tra_pack2<c10::Half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// c (16 x 8, fp32) += a (16 x 16) * b (16 x 8): mma.sync.m16n8k16, row.col.
template <typename T>
TRA_DEV void tra_mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
TRA_DEV void tra_mma<c10::BFloat16>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // the host refuses half inputs below sm_80
#endif
}
template <>
TRA_DEV void tra_mma<c10::Half>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

}  // namespace tra
}  // namespace hot_kernels
#endif  // !TRA_EMULATE

namespace hot_kernels {
namespace tra {

constexpr int kThreads = 128;  // every TRA kernel: 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 16 * kWarps;  // rows of the block's row tile (one 16-row slice per warp)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();

template <typename T>
struct Cfg {
  static constexpr bool kMma = !std::is_same<T, float>::value;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte vector
  static constexpr int kPad = kVec;                               // 16 bytes of row padding
  static constexpr int ld(int n) { return n + kPad; }
};

constexpr size_t align16(size_t n) { return (n + 15) / 16 * 16; }

// Shared memory: each kernel has a default tiling and, as its template flag kCompact, a compact one
// with fewer keys (forward, dQ) or query rows (dK/dV) per inner tile. The compact tiles exist for
// the configurations whose default needs more than kMinOptinSmem bytes per block (float32 at padded
// head dim 128: 108-116 KB), so that they run on every GPU the build targets; the host picks the
// default where it fits the device's opt-in limit (token_recovering_attention.cu).
constexpr size_t kMinOptinSmem = 99 * 1024;  // the smallest opt-in limit of sm_80+ (sm_86/89/120)

// ---- tiles: global <-> shared --------------------------------------------------------------
// s[r * lds + c] = g[r * gstride + c] for r < rows, c < cols; 0 elsewhere in [0, R) x [0, CC).
// vec: 16-byte accesses; the host sets it only when cols, gstride and g are multiples of kVec
// elements / 16-byte aligned (then c < cols implies c + kVec <= cols).
template <typename T, int R, int CC>
TRA_DEV void load_tile(T* __restrict__ s, int lds, const T* __restrict__ g, int64_t gstride, int rows, int cols,
                       bool vec) {
  constexpr int V = Cfg<T>::kVec;
  static_assert(CC % V == 0, "tile width must be a multiple of the vector width");
  const int tid = tra_tid();
  if (vec) {
    constexpr int CV = CC / V;
    for (int i = tid; i < R * CV; i += kThreads) {
      const int r = i / CV, c = (i - r * CV) * V;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (r < rows && c < cols) v = *reinterpret_cast<const uint4*>(g + r * gstride + c);
      *reinterpret_cast<uint4*>(s + r * lds + c) = v;
    }
  } else {
    for (int i = tid; i < R * CC; i += kThreads) {
      const int r = i / CC, c = i - r * CC;
      s[r * lds + c] = (r < rows && c < cols) ? g[r * gstride + c] : T(0.0f);
    }
  }
}

// Transposed: s[c * lds + r] = g[r * gstride + c] (same zero fill). Threads run along r so that
// neighbouring threads store neighbouring shared elements.
template <typename T, int R, int CC>
TRA_DEV void load_tile_t(T* __restrict__ s, int lds, const T* __restrict__ g, int64_t gstride, int rows, int cols,
                         bool vec) {
  constexpr int V = Cfg<T>::kVec;
  static_assert(CC % V == 0, "tile width must be a multiple of the vector width");
  const int tid = tra_tid();
  if (vec) {
    constexpr int CV = CC / V;
    for (int i = tid; i < R * CV; i += kThreads) {
      const int c = (i / R) * V, r = i - (i / R) * R;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (r < rows && c < cols) v = *reinterpret_cast<const uint4*>(g + r * gstride + c);
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int k = 0; k < V; ++k) s[(c + k) * lds + r] = e[k];
    }
  } else {
    for (int i = tid; i < R * CC; i += kThreads) {
      const int c = i / R, r = i - c * R;
      s[c * lds + r] = (r < rows && c < cols) ? g[r * gstride + c] : T(0.0f);
    }
  }
}

// g[r * gstride + c] = s[r * lds + c] for r < rows, c < cols.
template <typename T, int R, int CC>
TRA_DEV void store_tile(T* __restrict__ g, int64_t gstride, const T* __restrict__ s, int lds, int rows, int cols,
                        bool vec) {
  constexpr int V = Cfg<T>::kVec;
  static_assert(CC % V == 0, "tile width must be a multiple of the vector width");
  const int tid = tra_tid();
  if (vec) {
    constexpr int CV = CC / V;
    for (int i = tid; i < R * CV; i += kThreads) {
      const int r = i / CV, c = (i - r * CV) * V;
      if (r < rows && c < cols)
        *reinterpret_cast<uint4*>(g + r * gstride + c) = *reinterpret_cast<const uint4*>(s + r * lds + c);
    }
  } else {
    for (int i = tid; i < R * CC; i += kThreads) {
      const int r = i / CC, c = i - r * CC;
      if (r < rows && c < cols) g[r * gstride + c] = s[r * lds + c];
    }
  }
}

// ---- warp tiles ------------------------------------------------------------------------------
// acc[j] is the 16 x 8 tile of columns [8j, 8j + 8): acc[j][0..1] row g, columns 8j + 2t + {0, 1};
// acc[j][2..3] row g + 8, same columns.

template <typename T>
TRA_DEV uint32_t ld_pair(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// Tensor cores: acc[j] += A B_j^T with A the 16 rows at sA (row stride lda) and B_j the 8 rows at
// sB + 8j * ldb, both k-contiguous, over k in [0, 16 * ks) (ks <= KS); tiles j >= nt are skipped.
// Reads columns < 16 * KS of both operands.
template <typename T, int NT, int KS>
TRA_DEV void gemm_ss_mma(float (&acc)[NT][4], const T* sA, int lda, const T* sB, int ldb, int nt, int ks) {
  const int lane = tra_tid() & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    if (kk < ks) {
      const int k0 = kk * 16 + 2 * t;
      const uint32_t a[4] = {ld_pair(sA + g * lda + k0), ld_pair(sA + (g + 8) * lda + k0),
                             ld_pair(sA + g * lda + k0 + 8), ld_pair(sA + (g + 8) * lda + k0 + 8)};
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        if (j < nt) {
          const T* bp = sB + (8 * j + g) * ldb + k0;
          const uint32_t b[2] = {ld_pair(bp), ld_pair(bp + 8)};
          tra_mma<T>(acc[j], a, b);
        }
      }
    }
  }
}

// Tensor cores with A in registers: acc[j] += P B_j^T, P the 16 x (8 * NTA) accumulator tile p
// (rounded to T), B_j the 8 rows at sB + 8j * ldb (k-contiguous), k in [0, 16 * ks).
template <typename T, int NTA, int NT>
TRA_DEV void gemm_rs_mma(float (&acc)[NT][4], const float (&p)[NTA][4], const T* sB, int ldb, int ks) {
  static_assert(NTA % 2 == 0, "the register operand must span whole k16 steps");
  const int lane = tra_tid() & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int kk = 0; kk < NTA / 2; ++kk) {
    if (kk < ks) {
      const uint32_t a[4] = {tra_pack2<T>(p[2 * kk][0], p[2 * kk][1]), tra_pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                             tra_pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                             tra_pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
      const int k0 = kk * 16 + 2 * t;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const T* bp = sB + (8 * j + g) * ldb + k0;
        const uint32_t b[2] = {ld_pair(bp), ld_pair(bp + 8)};
        tra_mma<T>(acc[j], a, b);
      }
    }
  }
}

// CUDA cores (fp32): acc[j] += A B_j^T over k in [0, kmax), B element (n, k) at sB[n * sbn + k * sbk].
template <int NT>
TRA_DEV void gemm_ss_fma(float (&acc)[NT][4], const float* sA, int lda, const float* sB, int sbn, int sbk, int nt,
                         int kmax) {
  const int lane = tra_tid() & 31, g = lane >> 2, t = lane & 3;
  const float* a0p = sA + g * lda;
  const float* a1p = sA + (g + 8) * lda;
  for (int k = 0; k < kmax; ++k) {
    const float a0 = a0p[k], a1 = a1p[k];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      if (j < nt) {
        const float* bp = sB + (8 * j + 2 * t) * sbn + k * sbk;
        const float b0 = bp[0], b1 = bp[sbn];
        acc[j][0] = fmaf(a0, b0, acc[j][0]);
        acc[j][1] = fmaf(a0, b1, acc[j][1]);
        acc[j][2] = fmaf(a1, b0, acc[j][2]);
        acc[j][3] = fmaf(a1, b1, acc[j][3]);
      }
    }
  }
}

// CUDA cores with A in registers: p goes through the warp's scratch tile sW (16 x ldw floats,
// ldw >= 8 * NTA), then acc[j] += P B_j^T over k in [0, kmax).
template <int NTA, int NT>
TRA_DEV void gemm_rs_fma(float (&acc)[NT][4], const float (&p)[NTA][4], float* sW, int ldw, const float* sB, int sbn,
                         int sbk, int kmax) {
  const int lane = tra_tid() & 31, g = lane >> 2, t = lane & 3;
  tra_syncwarp();  // the warp's previous reads of sW are done
#pragma unroll
  for (int j = 0; j < NTA; ++j) {
    const int c = 8 * j + 2 * t;
    sW[g * ldw + c] = p[j][0];
    sW[g * ldw + c + 1] = p[j][1];
    sW[(g + 8) * ldw + c] = p[j][2];
    sW[(g + 8) * ldw + c + 1] = p[j][3];
  }
  tra_syncwarp();
  gemm_ss_fma<NT>(acc, sW, ldw, sB, sbn, sbk, NT, kmax);
}

// Sum over the 4 lanes of a quad (the lanes that share accumulator rows).
TRA_DEV float quad_sum(float v) {
  v += tra_shfl_xor(v, 1);
  v += tra_shfl_xor(v, 2);
  return v;
}
TRA_DEV float quad_max(float v) {
  v = fmaxf(v, tra_shfl_xor(v, 1));
  v = fmaxf(v, tra_shfl_xor(v, 2));
  return v;
}

// ---- forward (and the backward's recomputation of o) ---------------------------------------------

template <typename T>
struct FwdParams {
  const T* q;            // (Sq*L, C) projected query (unscaled)
  int64_t q_sstride;     // elements from one sequence's query to the next: 0 (shared) or L*C
  const T* kv;           // (S*M, 2C)
  T* o;                  // (S*L, C) attention output, heads concatenated
  float* lse;            // (S, H, L) natural-log log-sum-exp of the scaled logits, or null
  const T* dout;         // (S*L, C) gradient of o, or null; with it the kernel writes dsum
  float* dsum;           // (S, H, L) rowsum(dout_h * o_h) (FlashAttention's D), or null
  int64_t S;
  int L, M, C, H, d, nlb;  // nlb = ceil(L / kRows)
  float scale_log2;        // scale * log2(e)
  bool vec;
};

template <typename T, int DP, bool kCompact = false>
struct FwdSmem {
  using Cf = Cfg<T>;
  static constexpr int BM = kCompact ? 32 : 64;      // keys per tile
  static constexpr int LDQ = Cf::ld(DP);              // sQ [kRows][LDQ]: Q, then dO, then o staging
  static constexpr int LDK = Cf::ld(DP);              // sK [BM][LDK]
  static constexpr int LDV = Cf::kMma ? Cf::ld(BM) : Cf::ld(DP);  // sV^T [DP][LDV] | sV [BM][LDV]
  static constexpr int LDW = BM + 4;                  // fp32 scratch [kWarps][16][LDW]
  static constexpr size_t q_off = 0;
  static constexpr size_t k_off = align16(q_off + sizeof(T) * kRows * LDQ);
  static constexpr size_t v_off = align16(k_off + sizeof(T) * BM * LDK);
  static constexpr size_t w_off = align16(v_off + sizeof(T) * (Cf::kMma ? DP : BM) * LDV);
  static constexpr size_t bytes = align16(w_off + (Cf::kMma ? 0 : sizeof(float) * kWarps * 16 * LDW));
};

// One block per (sequence s, head h, tile of kRows query rows); blockIdx.x = (s * H + h) * nlb + lb
// so that the blocks reading one (s, h)'s K and V run together. Online softmax over key tiles.
template <typename T, int DP, bool kCompact>
TRA_KERNEL(kThreads) tra_fwd_kernel(const FwdParams<T> p) {
  using Cf = Cfg<T>;
  using SM = FwdSmem<T, DP, kCompact>;
  constexpr int BM = SM::BM, NTS = BM / 8, NTO = DP / 8, KSD = DP / 16;
  static_assert(DP % 16 == 0 && BM % 16 == 0, "tiles are whole mma steps");
  unsigned char* smem = tra_smem();
  T* sQ = reinterpret_cast<T*>(smem + SM::q_off);
  T* sK = reinterpret_cast<T*>(smem + SM::k_off);
  T* sV = reinterpret_cast<T*>(smem + SM::v_off);
  const int tid = tra_tid(), warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  float* sW = reinterpret_cast<float*>(smem + SM::w_off) + warp * 16 * SM::LDW;  // fp32 path only

  const int64_t bid = tra_bid();
  const int lb = static_cast<int>(bid % p.nlb);
  const int64_t sh = bid / p.nlb;
  const int h = static_cast<int>(sh % p.H);
  const int64_t s = sh / p.H;
  if (s >= p.S) return;  // block-uniform (the grid is exact)
  const int l0 = lb * kRows;
  const int lrows = min(kRows, p.L - l0);
  const int64_t C = p.C, C2 = 2 * C;
  const int64_t hd = static_cast<int64_t>(h) * p.d;
  const T* kg = p.kv + s * p.M * C2 + hd;
  const T* vg = kg + C;

  load_tile<T, kRows, DP>(sQ, SM::LDQ, p.q + s * p.q_sstride + l0 * C + hd, C, lrows, p.d, p.vec);

  float oacc[NTO][4];
#pragma unroll
  for (int j = 0; j < NTO; ++j) oacc[j][0] = oacc[j][1] = oacc[j][2] = oacc[j][3] = 0.f;
  float mrow[2] = {-kInf, -kInf};  // running max of the log2-domain logits, rows g and g + 8
  float lrow[2] = {0.f, 0.f};      // this lane's part of the running sum of exp2(logit - max)
  const T* sQw = sQ + warp * 16 * SM::LDQ;

  for (int m0 = 0; m0 < p.M; m0 += BM) {
    const int mv = min(BM, p.M - m0);
    tra_sync();  // every warp is done with the previous key tile
    load_tile<T, BM, DP>(sK, SM::LDK, kg + m0 * C2, C2, mv, p.d, p.vec);
    if constexpr (Cf::kMma)
      load_tile_t<T, BM, DP>(sV, SM::LDV, vg + m0 * C2, C2, mv, p.d, p.vec);
    else
      load_tile<T, BM, DP>(sV, SM::LDV, vg + m0 * C2, C2, mv, p.d, p.vec);
    tra_sync();

    float sacc[NTS][4];
#pragma unroll
    for (int j = 0; j < NTS; ++j) sacc[j][0] = sacc[j][1] = sacc[j][2] = sacc[j][3] = 0.f;
    const int nt = (mv + 7) / 8;
    if constexpr (Cf::kMma)
      gemm_ss_mma<T, NTS, KSD>(sacc, sQw, SM::LDQ, sK, SM::LDK, nt, (p.d + 15) / 16);
    else
      gemm_ss_fma<NTS>(sacc, sQw, SM::LDQ, sK, SM::LDK, 1, nt, p.d);

    float tmax[2] = {-kInf, -kInf};
#pragma unroll
    for (int j = 0; j < NTS; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * j + 2 * t + (e & 1);
        const float v = col < mv ? sacc[j][e] * p.scale_log2 : -kInf;
        sacc[j][e] = v;
        tmax[e >> 1] = fmaxf(tmax[e >> 1], v);
      }
    }
    float mbase[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float mnew = fmaxf(mrow[r], quad_max(tmax[r]));
      mbase[r] = mnew == -kInf ? 0.f : mnew;  // no (-inf) - (-inf)
      alpha[r] = tra_exp2(mrow[r] - mbase[r]);
      mrow[r] = mnew;
      lrow[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < NTS; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = tra_exp2(sacc[j][e] - mbase[e >> 1]);
        sacc[j][e] = pe;
        lrow[e >> 1] += pe;
      }
    }
#pragma unroll
    for (int j = 0; j < NTO; ++j) {
      oacc[j][0] *= alpha[0];
      oacc[j][1] *= alpha[0];
      oacc[j][2] *= alpha[1];
      oacc[j][3] *= alpha[1];
    }
    if constexpr (Cf::kMma)
      gemm_rs_mma<T, NTS, NTO>(oacc, sacc, sV, SM::LDV, (mv + 15) / 16);
    else
      gemm_rs_fma<NTS, NTO>(oacc, sacc, sW, SM::LDW, reinterpret_cast<const float*>(sV), 1, SM::LDV, mv);
  }

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lrow[r] = quad_sum(lrow[r]);
    inv[r] = lrow[r] > 0.f ? 1.f / lrow[r] : 0.f;
  }
#pragma unroll
  for (int j = 0; j < NTO; ++j) {
    oacc[j][0] *= inv[0];
    oacc[j][1] *= inv[0];
    oacc[j][2] *= inv[1];
    oacc[j][3] *= inv[1];
  }
  const int row0 = warp * 16 + g;  // this lane's rows in the tile: row0 and row0 + 8
  const int64_t stat0 = (s * p.H + h) * p.L + l0;
  T* og = p.o + (s * p.L + l0) * C + hd;

  tra_sync();  // every warp is done with sQ, sK, sV
  if (p.dout != nullptr) {
    load_tile<T, kRows, DP>(sQ, SM::LDQ, p.dout + (s * p.L + l0) * C + hd, C, lrows, p.d, p.vec);
    tra_sync();
    float ds[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < NTO; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * j + 2 * t + (e & 1);
        ds[e >> 1] += oacc[j][e] * static_cast<float>(sQ[(row0 + 8 * (e >> 1)) * SM::LDQ + col]);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      ds[r] = quad_sum(ds[r]);
      if (t == 0 && row0 + 8 * r < lrows) p.dsum[stat0 + row0 + 8 * r] = ds[r];
    }
    tra_sync();  // sQ is overwritten below
  }
  if (p.lse != nullptr && t == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (row0 + 8 * r < lrows)
        p.lse[stat0 + row0 + 8 * r] = lrow[r] > 0.f ? (mrow[r] + tra_log2(lrow[r])) * kLn2 : -kInf;
  }
#pragma unroll
  for (int j = 0; j < NTO; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e)
      sQ[(row0 + 8 * (e >> 1)) * SM::LDQ + 8 * j + 2 * t + (e & 1)] = T(oacc[j][e]);
  }
  tra_sync();
  store_tile<T, kRows, DP>(og, C, sQ, SM::LDQ, lrows, p.d, p.vec);
}

// ---- backward: dQ ------------------------------------------------------------------------------

template <typename T>
struct DqParams {
  const T* q;
  int64_t q_sstride;
  const T* kv;
  const T* dout;       // (S*L, C)
  const float* lse;    // (S, H, L)
  const float* dsum;   // (S, H, L)
  T* dq;               // per-sequence query: (S*L, C) = scale * dS K; else null
  float* dq_part;      // shared query: (G, L, C) fp32, group sums of scale * dS_s K_s; else null
  int64_t S;
  int64_t seqs;        // sequences per block: 1 (per-sequence query) or the group size
  int L, M, C, H, d, nlb;
  float scale_log2, scale;
  bool vec;
};

template <typename T, int DP, bool kCompact = false>
struct DqSmem {
  using Cf = Cfg<T>;
  static constexpr int BM = kCompact ? 16 : (Cf::kMma || DP <= 64) ? 64 : 32;  // keys per tile
  static constexpr int LDQ = Cf::ld(DP);   // sQ, sdO [kRows][LDQ]
  static constexpr int LDK = Cf::ld(DP);   // sK, sV [BM][LDK]
  static constexpr int LDKT = Cf::ld(BM);  // sK^T [DP][LDKT] (tensor-core path)
  static constexpr int LDW = BM + 4;
  static constexpr size_t q_off = 0;
  static constexpr size_t do_off = align16(q_off + sizeof(T) * kRows * LDQ);
  static constexpr size_t k_off = align16(do_off + sizeof(T) * kRows * LDQ);
  static constexpr size_t v_off = align16(k_off + sizeof(T) * BM * LDK);
  static constexpr size_t kt_off = align16(v_off + sizeof(T) * BM * LDK);
  static constexpr size_t w_off = align16(kt_off + (Cf::kMma ? sizeof(T) * DP * LDKT : 0));
  static constexpr size_t l_off = align16(w_off + (Cf::kMma ? 0 : sizeof(float) * kWarps * 16 * LDW));
  static constexpr size_t d_off = align16(l_off + sizeof(float) * kRows);
  static constexpr size_t bytes = align16(d_off + sizeof(float) * kRows);
};

// One block per (group of sequences, head h, tile of kRows query rows), blockIdx.x =
// (group * H + h) * nlb + lb. Loops over its sequences in order and over key tiles, recomputing
// P = exp(scale Q K^T - lse), dP = dO V^T, dS = P (dP - D), and accumulates dQ += dS K in
// registers: the sum over the sequences of a shared query is formed in a fixed order.
template <typename T, int DP, bool kCompact>
TRA_KERNEL(kThreads) tra_dq_kernel(const DqParams<T> p) {
  using Cf = Cfg<T>;
  using SM = DqSmem<T, DP, kCompact>;
  constexpr int BM = SM::BM, NTS = BM / 8, NTO = DP / 8, KSD = DP / 16;
  static_assert(DP % 16 == 0 && BM % 16 == 0, "tiles are whole mma steps");
  unsigned char* smem = tra_smem();
  T* sQ = reinterpret_cast<T*>(smem + SM::q_off);
  T* sdO = reinterpret_cast<T*>(smem + SM::do_off);
  T* sK = reinterpret_cast<T*>(smem + SM::k_off);
  T* sV = reinterpret_cast<T*>(smem + SM::v_off);
  T* sKt = reinterpret_cast<T*>(smem + SM::kt_off);
  float* sL = reinterpret_cast<float*>(smem + SM::l_off);
  float* sD = reinterpret_cast<float*>(smem + SM::d_off);
  const int tid = tra_tid(), warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  float* sW = reinterpret_cast<float*>(smem + SM::w_off) + warp * 16 * SM::LDW;  // fp32 path only

  const int64_t bid = tra_bid();
  const int lb = static_cast<int>(bid % p.nlb);
  const int64_t gh = bid / p.nlb;
  const int h = static_cast<int>(gh % p.H);
  const int64_t grp = gh / p.H;
  const int64_t s_begin = grp * p.seqs;
  const int64_t s_end = s_begin + p.seqs < p.S ? s_begin + p.seqs : p.S;
  if (s_begin >= p.S) return;  // block-uniform (the host makes no empty group)
  const int l0 = lb * kRows;
  const int lrows = min(kRows, p.L - l0);
  const int64_t C = p.C, C2 = 2 * C;
  const int64_t hd = static_cast<int64_t>(h) * p.d;
  const int row0 = warp * 16 + g;

  // The query tile is the same for every sequence of the block (shared, or a single sequence).
  load_tile<T, kRows, DP>(sQ, SM::LDQ, p.q + s_begin * p.q_sstride + l0 * C + hd, C, lrows, p.d, p.vec);

  float dq[NTO][4];
#pragma unroll
  for (int j = 0; j < NTO; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.f;
  const T* sQw = sQ + warp * 16 * SM::LDQ;
  const T* sdOw = sdO + warp * 16 * SM::LDQ;

  for (int64_t s = s_begin; s < s_end; ++s) {
    const T* kg = p.kv + s * p.M * C2 + hd;
    const T* vg = kg + C;
    for (int m0 = 0; m0 < p.M; m0 += BM) {
      const int mv = min(BM, p.M - m0);
      tra_sync();  // every warp is done with the previous tiles
      if (m0 == 0) {
        load_tile<T, kRows, DP>(sdO, SM::LDQ, p.dout + (s * p.L + l0) * C + hd, C, lrows, p.d, p.vec);
        const int64_t stat0 = (s * p.H + h) * p.L + l0;
        for (int i = tid; i < kRows; i += kThreads) {
          const bool ok = i < lrows;
          sL[i] = ok ? p.lse[stat0 + i] * kLog2e : kInf;  // padded rows: P = 0
          sD[i] = ok ? p.dsum[stat0 + i] : 0.f;
        }
      }
      load_tile<T, BM, DP>(sK, SM::LDK, kg + m0 * C2, C2, mv, p.d, p.vec);
      load_tile<T, BM, DP>(sV, SM::LDK, vg + m0 * C2, C2, mv, p.d, p.vec);
      if constexpr (Cf::kMma) load_tile_t<T, BM, DP>(sKt, SM::LDKT, kg + m0 * C2, C2, mv, p.d, p.vec);
      tra_sync();

      float sacc[NTS][4], dp[NTS][4];
#pragma unroll
      for (int j = 0; j < NTS; ++j) {
        sacc[j][0] = sacc[j][1] = sacc[j][2] = sacc[j][3] = 0.f;
        dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.f;
      }
      const int nt = (mv + 7) / 8;
      if constexpr (Cf::kMma) {
        gemm_ss_mma<T, NTS, KSD>(sacc, sQw, SM::LDQ, sK, SM::LDK, nt, (p.d + 15) / 16);
        gemm_ss_mma<T, NTS, KSD>(dp, sdOw, SM::LDQ, sV, SM::LDK, nt, (p.d + 15) / 16);
      } else {
        gemm_ss_fma<NTS>(sacc, sQw, SM::LDQ, sK, SM::LDK, 1, nt, p.d);
        gemm_ss_fma<NTS>(dp, sdOw, SM::LDQ, sV, SM::LDK, 1, nt, p.d);
      }
#pragma unroll
      for (int j = 0; j < NTS; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = row0 + 8 * (e >> 1);
          const int col = 8 * j + 2 * t + (e & 1);
          const float pe = col < mv ? tra_exp2(sacc[j][e] * p.scale_log2 - sL[row]) : 0.f;
          sacc[j][e] = pe * (dp[j][e] - sD[row]);  // dS
        }
      }
      if constexpr (Cf::kMma)
        gemm_rs_mma<T, NTS, NTO>(dq, sacc, sKt, SM::LDKT, (mv + 15) / 16);
      else
        gemm_rs_fma<NTS, NTO>(dq, sacc, sW, SM::LDW, reinterpret_cast<const float*>(sK), 1, SM::LDK, mv);
    }
  }

#pragma unroll
  for (int j = 0; j < NTO; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[j][e] *= p.scale;
  }
  if (p.dq_part != nullptr) {  // shared query: this group's partial sum, fp32
    float* dst = p.dq_part + (grp * p.L + l0) * C + hd;
#pragma unroll
    for (int j = 0; j < NTO; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = row0 + 8 * (e >> 1);
        const int col = 8 * j + 2 * t + (e & 1);
        if (row < lrows && col < p.d) dst[row * C + col] = dq[j][e];
      }
    }
  } else {
    tra_sync();  // every warp is done with sQ
#pragma unroll
    for (int j = 0; j < NTO; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        sQ[(row0 + 8 * (e >> 1)) * SM::LDQ + 8 * j + 2 * t + (e & 1)] = T(dq[j][e]);
    }
    tra_sync();
    store_tile<T, kRows, DP>(p.dq + (s_begin * p.L + l0) * C + hd, C, sQ, SM::LDQ, lrows, p.d, p.vec);
  }
}

// ---- backward: dK, dV ------------------------------------------------------------------------

template <typename T>
struct DkvParams {
  const T* q;
  int64_t q_sstride;
  const T* kv;
  const T* dout;
  const float* lse;
  const float* dsum;
  T* dkv;  // (S*M, 2C): [dK | dV]
  int64_t S;
  int L, M, C, H, d, nmb;  // nmb = ceil(M / kRows)
  float scale_log2, scale;
  bool vec;
};

template <typename T, int DP, bool kCompact = false>
struct DkvSmem {
  using Cf = Cfg<T>;
  static constexpr int BL = kCompact ? 16 : DP > 64 ? 32 : 64;  // query rows per tile
  static constexpr int LDK = Cf::ld(DP);         // sK, sV [kRows][LDK] (key rows of the block)
  static constexpr int LDQ = Cf::ld(DP);         // sQ, sdO [BL][LDQ]
  static constexpr int LDT = Cf::ld(BL);         // sQ^T, sdO^T [DP][LDT] (tensor-core path)
  static constexpr int LDW = BL + 4;
  static constexpr size_t k_off = 0;
  static constexpr size_t v_off = align16(k_off + sizeof(T) * kRows * LDK);
  static constexpr size_t q_off = align16(v_off + sizeof(T) * kRows * LDK);
  static constexpr size_t do_off = align16(q_off + sizeof(T) * BL * LDQ);
  static constexpr size_t qt_off = align16(do_off + sizeof(T) * BL * LDQ);
  static constexpr size_t dot_off = align16(qt_off + (Cf::kMma ? sizeof(T) * DP * LDT : 0));
  static constexpr size_t w_off = align16(dot_off + (Cf::kMma ? sizeof(T) * DP * LDT : 0));
  static constexpr size_t l_off = align16(w_off + (Cf::kMma ? 0 : sizeof(float) * kWarps * 16 * LDW));
  static constexpr size_t d_off = align16(l_off + sizeof(float) * BL);
  static constexpr size_t bytes = align16(d_off + sizeof(float) * BL);
};

// One block per (sequence s, head h, tile of kRows key rows), blockIdx.x = (s * H + h) * nmb + mb;
// a warp owns 16 key rows and accumulates their dK and dV in registers over the query tiles:
// S^T = K Q^T, P^T = exp(scale S^T - lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - D),
// dK += scale dS^T Q. No cross-block reduction: every dK, dV element has one writer.
template <typename T, int DP, bool kCompact>
TRA_KERNEL(kThreads) tra_dkdv_kernel(const DkvParams<T> p) {
  using Cf = Cfg<T>;
  using SM = DkvSmem<T, DP, kCompact>;
  constexpr int BL = SM::BL, NTL = BL / 8, NTO = DP / 8, KSD = DP / 16;
  static_assert(DP % 16 == 0 && BL % 16 == 0, "tiles are whole mma steps");
  unsigned char* smem = tra_smem();
  T* sK = reinterpret_cast<T*>(smem + SM::k_off);
  T* sV = reinterpret_cast<T*>(smem + SM::v_off);
  T* sQ = reinterpret_cast<T*>(smem + SM::q_off);
  T* sdO = reinterpret_cast<T*>(smem + SM::do_off);
  T* sQt = reinterpret_cast<T*>(smem + SM::qt_off);
  T* sdOt = reinterpret_cast<T*>(smem + SM::dot_off);
  float* sL = reinterpret_cast<float*>(smem + SM::l_off);
  float* sD = reinterpret_cast<float*>(smem + SM::d_off);
  const int tid = tra_tid(), warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  float* sW = reinterpret_cast<float*>(smem + SM::w_off) + warp * 16 * SM::LDW;  // fp32 path only

  const int64_t bid = tra_bid();
  const int mb = static_cast<int>(bid % p.nmb);
  const int64_t sh = bid / p.nmb;
  const int h = static_cast<int>(sh % p.H);
  const int64_t s = sh / p.H;
  if (s >= p.S) return;  // block-uniform
  const int m0 = mb * kRows;
  const int mv = min(kRows, p.M - m0);
  const int64_t C = p.C, C2 = 2 * C;
  const int64_t hd = static_cast<int64_t>(h) * p.d;
  const T* kg = p.kv + (s * p.M + m0) * C2 + hd;
  load_tile<T, kRows, DP>(sK, SM::LDK, kg, C2, mv, p.d, p.vec);
  load_tile<T, kRows, DP>(sV, SM::LDK, kg + C, C2, mv, p.d, p.vec);

  float dk[NTO][4], dv[NTO][4];
#pragma unroll
  for (int j = 0; j < NTO; ++j) {
    dk[j][0] = dk[j][1] = dk[j][2] = dk[j][3] = 0.f;
    dv[j][0] = dv[j][1] = dv[j][2] = dv[j][3] = 0.f;
  }
  const bool active = warp * 16 < mv;  // warp-uniform: this warp has key rows to compute
  const T* sKw = sK + warp * 16 * SM::LDK;
  const T* sVw = sV + warp * 16 * SM::LDK;
  const T* qs = p.q + s * p.q_sstride + hd;
  const T* ds = p.dout + s * p.L * C + hd;
  const int64_t stat = (s * p.H + h) * p.L;

  for (int l0 = 0; l0 < p.L; l0 += BL) {
    const int lv = min(BL, p.L - l0);
    tra_sync();  // every warp is done with the previous query tile
    load_tile<T, BL, DP>(sQ, SM::LDQ, qs + l0 * C, C, lv, p.d, p.vec);
    load_tile<T, BL, DP>(sdO, SM::LDQ, ds + l0 * C, C, lv, p.d, p.vec);
    if constexpr (Cf::kMma) {
      load_tile_t<T, BL, DP>(sQt, SM::LDT, qs + l0 * C, C, lv, p.d, p.vec);
      load_tile_t<T, BL, DP>(sdOt, SM::LDT, ds + l0 * C, C, lv, p.d, p.vec);
    }
    for (int i = tid; i < BL; i += kThreads) {
      const bool ok = i < lv;
      sL[i] = ok ? p.lse[stat + l0 + i] * kLog2e : kInf;
      sD[i] = ok ? p.dsum[stat + l0 + i] : 0.f;
    }
    tra_sync();
    if (active) {
      float st[NTL][4], dpt[NTL][4];
#pragma unroll
      for (int j = 0; j < NTL; ++j) {
        st[j][0] = st[j][1] = st[j][2] = st[j][3] = 0.f;
        dpt[j][0] = dpt[j][1] = dpt[j][2] = dpt[j][3] = 0.f;
      }
      const int nt = (lv + 7) / 8;
      if constexpr (Cf::kMma) {
        gemm_ss_mma<T, NTL, KSD>(st, sKw, SM::LDK, sQ, SM::LDQ, nt, (p.d + 15) / 16);
        gemm_ss_mma<T, NTL, KSD>(dpt, sVw, SM::LDK, sdO, SM::LDQ, nt, (p.d + 15) / 16);
      } else {
        gemm_ss_fma<NTL>(st, sKw, SM::LDK, sQ, SM::LDQ, 1, nt, p.d);
        gemm_ss_fma<NTL>(dpt, sVw, SM::LDK, sdO, SM::LDQ, 1, nt, p.d);
      }
#pragma unroll
      for (int j = 0; j < NTL; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = 8 * j + 2 * t + (e & 1);  // query row of the tile
          st[j][e] = col < lv ? tra_exp2(st[j][e] * p.scale_log2 - sL[col]) : 0.f;  // P^T
        }
      }
      if constexpr (Cf::kMma)
        gemm_rs_mma<T, NTL, NTO>(dv, st, sdOt, SM::LDT, (lv + 15) / 16);
      else
        gemm_rs_fma<NTL, NTO>(dv, st, sW, SM::LDW, reinterpret_cast<const float*>(sdO), 1, SM::LDQ, lv);
#pragma unroll
      for (int j = 0; j < NTL; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = 8 * j + 2 * t + (e & 1);
          st[j][e] *= dpt[j][e] - sD[col];  // dS^T
        }
      }
      if constexpr (Cf::kMma)
        gemm_rs_mma<T, NTL, NTO>(dk, st, sQt, SM::LDT, (lv + 15) / 16);
      else
        gemm_rs_fma<NTL, NTO>(dk, st, sW, SM::LDW, reinterpret_cast<const float*>(sQ), 1, SM::LDQ, lv);
    }
  }

  const int row0 = warp * 16 + g;
  tra_sync();  // every warp is done with sK, sV
#pragma unroll
  for (int j = 0; j < NTO; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int idx = (row0 + 8 * (e >> 1)) * SM::LDK + 8 * j + 2 * t + (e & 1);
      sK[idx] = T(dk[j][e] * p.scale);
      sV[idx] = T(dv[j][e]);
    }
  }
  tra_sync();
  T* dkg = p.dkv + (s * p.M + m0) * C2 + hd;
  store_tile<T, kRows, DP>(dkg, C2, sK, SM::LDK, mv, p.d, p.vec);
  store_tile<T, kRows, DP>(dkg + C, C2, sV, SM::LDK, mv, p.d, p.vec);
}

// ---- the shared query's dQ: out[i] = sum_g part[g * n + i], g ascending -------------------------
TRA_KERNEL(kThreads) tra_sum_groups_kernel(const float* __restrict__ part, int64_t groups, int64_t n,
                                           float* __restrict__ out) {
  const int64_t i = tra_bid() * kThreads + tra_tid();
  if (i >= n) return;
  float acc = 0.f;
  for (int64_t gi = 0; gi < groups; ++gi) acc += part[gi * n + i];
  out[i] = acc;
}

}  // namespace tra
}  // namespace hot_kernels
