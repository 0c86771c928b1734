// Shared device machinery of the token-pruning (TPC) CUDA kernels: point loads (with the joint
// pooling of a (B, N, J, C) input), the Gram-tile engine, per-row candidate lists, the exact
// distance refinement, block scans and the deterministic top-f selection.
//
// Semantics: ../../shared/DESIGN.md and hot_kernels/reference.py (the oracle); the contract between
// backends: the "Distances inside the selection kernels" section of the TPC spec, summarised here.
//
// Distances. D[i,j] = ||x_i - x_j|| / sqrt(C). Candidates (each row's nearest tokens, its nearest
// higher token, its nearest kept token) come from Gram tiles, d2 = |a_i|^2 + |a_j|^2 - 2 a_i.a_j on
// tensor cores (3xTF32 for float32 / pooled input, native fp16/bf16 products for 3-D half input,
// fp32 accumulation) or on fp32 FMA units (HOT_KERNELS_CUDA_GRAM=fma, or an arch below sm_80).
// Every engine stages a_i = x_i - s, s = token 0 of the sample (its finite channels), computed in
// float32 and rounded once to the stage type (float32, or the half type for native products):
// distances are translation invariant and the shift shrinks the cancellation of the Gram form
// (unshifted, a channel mean far above the spread makes |a|^2 >> d^2 and the Gram error swamps the
// gaps between neighbours). Every distance that feeds a result is then REFINED: recomputed as
// sum_c (x_ic - x_jc)^2 in float32 from the raw (pooled) values by refine_d2, whose summation
// order depends only on c and C. That value is bit-symmetric, so mutual nearest neighbours get
// bitwise-equal densities (the tie rule needs it), and near-duplicate tokens, where the Gram form
// cancels, get accurate distances.
//
// e = max(d2, 0) (NaN -> 0, as the reference's where(d2 > 0, ...)); D = finish(e) is exactly the
// reference's formula. Every block has kThreads = 256 threads (8 warps); kernels rely on it.
//
// TPC_EMULATE (never defined in the build): these sources compile as plain C++ against the CPU
// emulation of tests/cuda_emulation/tpc_emu.h (included first), which supplies the CUDA built-ins
// they use (threadIdx, __syncthreads, shuffles, ballots, nvcuda::wmma, ...). For it, shared
// variables are declared with TPC_SHARED (plain __shared__ there does not compile) and kernels are
// launched with launch() below, never with <<< >>>.
#pragma once

#ifndef TPC_EMULATE
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

// `__shared__ type name dims;` (the emulation poisons each such variable when a block starts).
#define TPC_SHARED(type, name, dims) __shared__ type name dims
#endif

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

// Tensor-core paths need sm_80 (tf32, bf16 WMMA). The host pass and sm_80+ device passes see them;
// a device pass for an older arch compiles the FMA engine only.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define HK_TC 0
#else
#define HK_TC 1
#endif

namespace hot_kernels {
namespace tpc_cuda {

constexpr int kThreads = 256;  // every kernel of the TPC family runs 256-thread blocks
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kNone = 0x7fffffff;          // "no candidate" index (sorts after every real index)
constexpr int kMaxTokens = 1 << 24;        // N limit: token indices live in 24 bits of a selection key
constexpr float kFltMin = 1.17549435e-38f;  // smallest normal float (torch.finfo(float32).tiny)

// Gram engines.
enum Engine : int { kEngFMA = 0, kEngTF32 = 1, kEngNative = 2 };

// ---- scalar helpers ----------------------------------------------------------------------------

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float inf_f() { return __int_as_float(0x7f800000); }

// D from e = max(d2, 0): the reference's where(d2 > 0, sqrt(clamp_min(d2, tiny)), 0) / sqrt(C).
// scale = (float)sqrt((double)C), as the reference divides by a Python float.
__device__ __forceinline__ float finish(float e, float scale) {
  return e > 0.f ? sqrtf(fmaxf(e, kFltMin)) / scale : 0.f;
}

// e from the Gram form (CPU: s = sq_i + sq_j; d2 = s - (g + g)); NaN -> 0.
__device__ __forceinline__ float gram_e(float sqi, float sqj, float g) {
  const float d2 = (sqi + sqj) - (g + g);
  return d2 > 0.f ? d2 : 0.f;
}

// (a, ia) ranks before (b, ib): smaller value, then lower index. Values are never NaN here.
__device__ __forceinline__ bool before(float a, int ia, float b, int ib) { return a < b || (a == b && ia < ib); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;  // bitwise identical in every lane (butterfly: each level adds the same two halves)
}

// ---- points: x (B, N, C) or (B, N, J, C) with unit channel stride ------------------------------

// p[b, n, c] = mean over J of x[b, n, j, c] in float32 (sum in j order, then / J, like torch's mean);
// for J == 1 simply x[b, n, c] as float. Strides in elements; 64-bit offsets throughout.
template <typename T>
struct Points {
  const T* x = nullptr;
  int64_t sb = 0, sn = 0, sj = 0;
  int N = 0, J = 1, C = 0;

  __device__ __forceinline__ const T* ptr(int b, int n, int c) const {
    return x + static_cast<int64_t>(b) * sb + static_cast<int64_t>(n) * sn + c;
  }
  __device__ __forceinline__ float at(int b, int n, int c) const {
    const T* p = ptr(b, n, c);
    if (J == 1) return to_f(*p);
    float s = 0.f;
    for (int j = 0; j < J; ++j) s += to_f(p[static_cast<int64_t>(j) * sj]);
    return s / static_cast<float>(J);
  }
  // at() without the pooling code, for callers that know J == 1 (the native engine).
  __device__ __forceinline__ float at1(int b, int n, int c) const { return to_f(*ptr(b, n, c)); }
};

// The exact squared distance sum_c (p_ic - p_jc)^2 computed by an aligned group of 8 lanes (sub =
// lane & 7): lane sub sums c = sub, sub + 8, ... in order, then a fixed xor butterfly. Every lane of
// the group gets the same bits, and (i, j) and (j, i) give the same bits ((a-b)^2 == (b-a)^2). All 32
// lanes of the warp must call it together (shuffles); valid is uniform within a group. NaN -> 0.
template <typename T>
__device__ __forceinline__ float refine_d2(const Points<T>& P, int b, int i, int j, bool valid, int sub) {
  float acc = 0.f;
  if (valid) {
    for (int c = sub; c < P.C; c += 8) {
      const float d = P.at(b, i, c) - P.at(b, j, c);
      acc = fmaf(d, d, acc);
    }
  }
  acc += __shfl_xor_sync(kFull, acc, 4);
  acc += __shfl_xor_sync(kFull, acc, 2);
  acc += __shfl_xor_sync(kFull, acc, 1);
  return acc > 0.f ? acc : 0.f;
}

// ---- per-row candidate lists ------------------------------------------------------------------

// The M best (value, index) pairs seen by one thread, ascending by before(); registers only
// (every index is a compile-time constant). Empty slots hold (+inf, kNone).
template <int M>
struct TopList {
  float v[M];
  int j[M];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int t = 0; t < M; ++t) {
      v[t] = inf_f();
      j[t] = kNone;
    }
  }
  __device__ __forceinline__ void push(float e, int jj) {
    if (!before(e, jj, v[M - 1], j[M - 1])) return;
    v[M - 1] = e;
    j[M - 1] = jj;
#pragma unroll
    for (int t = M - 1; t > 0; --t) {
      const float av = v[t - 1], bv = v[t];
      const int aj = j[t - 1], bj = j[t];
      const bool sw = before(bv, bj, av, aj);
      v[t - 1] = sw ? bv : av;
      j[t - 1] = sw ? bj : aj;
      v[t] = sw ? av : bv;
      j[t] = sw ? aj : bj;
    }
  }
  __device__ __forceinline__ void pop_front() {
#pragma unroll
    for (int t = 0; t + 1 < M; ++t) {
      v[t] = v[t + 1];
      j[t] = j[t + 1];
    }
    v[M - 1] = inf_f();
    j[M - 1] = kNone;
  }
};

// Merges the lists of an aligned group of 8 lanes (the threads of one row) into the group's M best,
// ascending, written to out_v / out_j by lane sub == 0 (shared memory; the caller __syncwarp()s
// before other lanes read them). Every index appears in at most one lane's list (each lane scans
// its own columns), so each round's winner is unique (except empty slots, whose pop is harmless).
// All 32 lanes must call it together.
template <int M>
__device__ __forceinline__ void merge8(TopList<M>& L, float* out_v, int* out_j, int sub) {
#pragma unroll 1
  for (int r = 0; r < M; ++r) {
    float hv = L.v[0];
    int hj = L.j[0];
#pragma unroll
    for (int o = 1; o < 8; o <<= 1) {
      const float ov = __shfl_xor_sync(kFull, hv, o);
      const int oj = __shfl_xor_sync(kFull, hj, o);
      if (before(ov, oj, hv, hj)) {
        hv = ov;
        hj = oj;
      }
    }
    if (sub == 0) {
      out_v[r] = hv;
      out_j[r] = hj;
    }
    if (L.v[0] == hv && L.j[0] == hj) L.pop_front();
  }
}

// ---- block-wide primitives (blockDim.x == kThreads) ---------------------------------------------

// Inclusive scan of v over the block's threads in thread order; total = the block's sum. ws: 8 ints
// of shared memory. Contains __syncthreads(): call from uniform control flow.
__device__ __forceinline__ int block_inclusive_scan(int v, int* ws, int& total) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(kFull, v, o);
    if (lane >= o) v += n;
  }
  if (lane == 31) ws[w] = v;
  __syncthreads();
  if (w == 0) {
    int t = lane < kWarps ? ws[lane] : 0;
#pragma unroll
    for (int o = 1; o < kWarps; o <<= 1) {
      const int n = __shfl_up_sync(kFull, t, o);
      if (lane >= o) t += n;
    }
    if (lane < kWarps) ws[lane] = t;
  }
  __syncthreads();
  const int incl = v + (w > 0 ? ws[w - 1] : 0);
  total = ws[kWarps - 1];
  __syncthreads();  // ws is reused by the next call
  return incl;
}

__device__ __forceinline__ int block_sum(int v, int* ws) {
  int total;
  block_inclusive_scan(v, ws, total);
  return total;
}

// Maximum over the block (v never NaN). wsf: 8 floats of shared memory. Contains __syncthreads().
__device__ __forceinline__ float block_max(float v, float* wsf) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  if (lane == 0) wsf[w] = v;
  __syncthreads();
  float m = wsf[0];
#pragma unroll
  for (int t = 1; t < kWarps; ++t) m = fmaxf(m, wsf[t]);
  __syncthreads();
  return m;
}

// ---- the Gram-tile engine ------------------------------------------------------------------------

template <typename T, int ENG>
struct StageType {
  using type = float;
};
template <typename T>
struct StageType<T, kEngNative> {
  using type = T;
};

// Tile geometry: RT row tokens x CT column tokens, channels streamed in chunks of KC. Each chunk is
// staged in shared memory token-major (stage[token][c], rows first, then columns): thread (warp w,
// lane l) stages channel l of tokens w + 8 q, q < Q (tokens q < QA are rows). Squared norms of the
// staged tokens are summed along the way with warp butterflies (same bits for a token whether it is
// a row or a column). Output: G[r][c] = a_r . a_c (row-major, ld LDG) and sq[token].
template <typename T, int ENG, int RT, int CT>
struct Gram {
  using S = typename StageType<T, ENG>::type;
  static constexpr int KC = 32;
  static constexpr int LDS = KC + (sizeof(S) == 4 ? 4 : 8);  // WMMA: ld a multiple of 16 bytes
  static constexpr int LDG = CT + 8;                          // conflict-free row reads (8 lanes/row)
  static constexpr int NTOK = RT + CT;
  static constexpr int Q = NTOK / kWarps;
  static constexpr int QA = RT / kWarps;
  static constexpr int TC_COLS = CT / 16;
  static constexpr int NACC = (RT / 16) * (CT / 16) / kWarps;  // 16x16 accumulator tiles per warp
  static constexpr int RPT = RT / 16;                           // FMA engine: rows per thread
  static constexpr int CPT = CT / 16;                           // FMA engine: columns per thread
  static_assert(RT % 16 == 0 && CT % 16 == 0, "tiles are multiples of 16");
  static_assert(((RT / 16) * (CT / 16)) % kWarps == 0, "whole accumulator tiles per warp");
  static_assert(KC == 32, "one channel per lane");
  static_assert(!(ENG == kEngNative && std::is_same<T, float>::value), "native engine is for half types");

  struct Smem {
    alignas(128) S stage[NTOK * LDS];
    alignas(128) float G[RT * LDG];
    float sq[NTOK];
  };
};

#if HK_TC
template <typename T, int ENG>
struct Mma;

// 3xTF32: a = a_hi + a_lo (both tf32), a.b ~= a_lo.b_hi + a_hi.b_lo + a_hi.b_hi (fp32-class).
template <typename T>
struct Mma<T, kEngTF32> {
  static constexpr int K = 8;
  using FA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 8, nvcuda::wmma::precision::tf32,
                                    nvcuda::wmma::row_major>;
  using FB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 8, nvcuda::wmma::precision::tf32,
                                    nvcuda::wmma::col_major>;
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 8, float>;
  template <typename Frag>
  __device__ static __forceinline__ void split(Frag& hi, Frag& lo) {
#pragma unroll
    for (int t = 0; t < hi.num_elements; ++t) {
      const float v = hi.x[t];
      const float h = nvcuda::wmma::__float_to_tf32(v);
      hi.x[t] = h;
      lo.x[t] = nvcuda::wmma::__float_to_tf32(v - h);
    }
  }
  // acc += A (16 x K at pa, row-major) * B^T (B: 16 tokens x K at pb, token-major), ld in elements.
  __device__ static __forceinline__ void step(Acc& acc, const float* pa, const float* pb, int ld) {
    FA ah, al;
    FB bh, bl;
    nvcuda::wmma::load_matrix_sync(ah, pa, ld);
    nvcuda::wmma::load_matrix_sync(bh, pb, ld);
    split(ah, al);
    split(bh, bl);
    nvcuda::wmma::mma_sync(acc, al, bh, acc);
    nvcuda::wmma::mma_sync(acc, ah, bl, acc);
    nvcuda::wmma::mma_sync(acc, ah, bh, acc);
  }
};

// Native half products (exact in fp32), fp32 accumulation.
template <typename T>
struct Mma<T, kEngNative> {
  static constexpr int K = 16;
  using FA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major>;
  using FB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major>;
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  __device__ static __forceinline__ void step(Acc& acc, const T* pa, const T* pb, int ld) {
    FA a;
    FB b;
    nvcuda::wmma::load_matrix_sync(a, pa, ld);
    nvcuda::wmma::load_matrix_sync(b, pb, ld);
    nvcuda::wmma::mma_sync(acc, a, b, acc);
  }
};
#endif  // HK_TC

// This thread's staged values of chunk k0 (into v) and their squared norms, warp-summed over the
// chunk's channels and added to nsq (row tokens only when row_norms). tok[q]: token of slot q (-1:
// none -> zeros). A gives the row tokens, Bp the column tokens; the shift comes from A's token 0.
template <typename T, int ENG, int RT, int CT>
__device__ __forceinline__ void gram_stage_load(const Points<T>& A, const Points<T>& Bp, int b, const int* tok,
                                                int k0, bool row_norms,
                                                typename Gram<T, ENG, RT, CT>::S* v, float* nsq) {
  using G = Gram<T, ENG, RT, CT>;
  using S = typename G::S;
  const int lane = threadIdx.x & 31;
  const int c = k0 + lane;
  const bool cin = c < A.C;
  // The native engine only runs 3-D input (J == 1): plain loads, no pooling code (registers).
  auto load = [&](const Points<T>& P, int n) { return ENG == kEngNative ? P.at1(b, n, c) : P.at(b, n, c); };
  float shift = 0.f;
  if (cin) {
    const float s0 = load(A, 0);
    shift = isfinite(s0) ? s0 : 0.f;
  }
#pragma unroll
  for (int q = 0; q < G::Q; ++q) {
    const Points<T>& P = q < G::QA ? A : Bp;
    // x - s in float32, rounded once to the stage type (native engine: the half type).
    const S val = from_f<S>((cin && tok[q] >= 0) ? load(P, tok[q]) - shift : 0.f);
    v[q] = val;
    if (q >= G::QA || row_norms) {
      const float f = to_f(val);
      nsq[q] += warp_sum(f * f);
    }
  }
}

// G[r][c] = a_r . a_c for the row tokens row_tok[0, RT) of A and column tokens col_tok[0, CT) of Bp
// (shared memory; -1 = absent, staged as zeros), sq[t] = |a_t|^2 (sq[0, RT) only when row_norms;
// otherwise they keep the values of an earlier call). Precondition: row_tok / col_tok were written
// before a __syncthreads(). Ends with __syncthreads(): G and sq are then visible to the block.
// Must be called by all threads from uniform control flow.
template <typename T, int ENG, int RT, int CT>
__device__ void gram_run(const Points<T>& A, const Points<T>& Bp, int b, const int* row_tok, const int* col_tok,
                         bool row_norms, typename Gram<T, ENG, RT, CT>::Smem& sm) {
  using G = Gram<T, ENG, RT, CT>;
  using S = typename G::S;
  const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31;
  const int C = A.C;
  int tok[G::Q];
#pragma unroll
  for (int q = 0; q < G::Q; ++q) {
    const int t = w + kWarps * q;
    tok[q] = t < RT ? row_tok[t] : col_tok[t - RT];
  }
  float nsq[G::Q];
#pragma unroll
  for (int q = 0; q < G::Q; ++q) nsq[q] = 0.f;
  S v[G::Q];

  constexpr bool use_fma = (ENG == kEngFMA) || !HK_TC;
  if constexpr (use_fma) {
    const int rg = tid >> 4, cg = tid & 15;
    float acc[G::RPT][G::CPT];
#pragma unroll
    for (int u = 0; u < G::RPT; ++u)
#pragma unroll
      for (int s = 0; s < G::CPT; ++s) acc[u][s] = 0.f;
    for (int k0 = 0; k0 < C; k0 += G::KC) {
      gram_stage_load<T, ENG, RT, CT>(A, Bp, b, tok, k0, row_norms, v, nsq);
      __syncthreads();  // the previous chunk's products are done with the stage
#pragma unroll
      for (int q = 0; q < G::Q; ++q) sm.stage[(w + kWarps * q) * G::LDS + lane] = v[q];
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < G::KC; ++kk) {
        float a[G::RPT], bb[G::CPT];
#pragma unroll
        for (int u = 0; u < G::RPT; ++u) a[u] = to_f(sm.stage[(rg * G::RPT + u) * G::LDS + kk]);
#pragma unroll
        for (int s = 0; s < G::CPT; ++s) bb[s] = to_f(sm.stage[(RT + cg + 16 * s) * G::LDS + kk]);
#pragma unroll
        for (int u = 0; u < G::RPT; ++u)
#pragma unroll
          for (int s = 0; s < G::CPT; ++s) acc[u][s] = fmaf(a[u], bb[s], acc[u][s]);
      }
    }
    // G's previous readers finished before this call's first __syncthreads().
#pragma unroll
    for (int u = 0; u < G::RPT; ++u)
#pragma unroll
      for (int s = 0; s < G::CPT; ++s) sm.G[(rg * G::RPT + u) * G::LDG + cg + 16 * s] = acc[u][s];
  } else {
#if HK_TC
    using MM = Mma<T, ENG>;
    typename MM::Acc acc[G::NACC];
#pragma unroll
    for (int u = 0; u < G::NACC; ++u) nvcuda::wmma::fill_fragment(acc[u], 0.f);
    for (int k0 = 0; k0 < C; k0 += G::KC) {
      gram_stage_load<T, ENG, RT, CT>(A, Bp, b, tok, k0, row_norms, v, nsq);
      __syncthreads();
#pragma unroll
      for (int q = 0; q < G::Q; ++q) sm.stage[(w + kWarps * q) * G::LDS + lane] = v[q];
      __syncthreads();
#pragma unroll
      for (int u = 0; u < G::NACC; ++u) {
        const int tile = w + kWarps * u;
        const int tr = tile / G::TC_COLS, tc = tile % G::TC_COLS;
#pragma unroll
        for (int ks = 0; ks < G::KC / MM::K; ++ks)
          MM::step(acc[u], &sm.stage[(16 * tr) * G::LDS + ks * MM::K], &sm.stage[(RT + 16 * tc) * G::LDS + ks * MM::K],
                   G::LDS);
      }
    }
#pragma unroll
    for (int u = 0; u < G::NACC; ++u) {
      const int tile = w + kWarps * u;
      const int tr = tile / G::TC_COLS, tc = tile % G::TC_COLS;
      nvcuda::wmma::store_matrix_sync(&sm.G[(16 * tr) * G::LDG + 16 * tc], acc[u], G::LDG, nvcuda::wmma::mem_row_major);
    }
#endif
  }
  if (lane == 0) {
#pragma unroll
    for (int q = 0; q < G::Q; ++q)
      if (q >= G::QA || row_norms) sm.sq[w + kWarps * q] = nsq[q];
  }
  __syncthreads();
}

// ---- deterministic top-f selection ---------------------------------------------------------------

// A unique 64-bit rank key, larger = better: class (bits 56-57: 3 real with a number, 2 real with a
// NaN score, 1 masked, 0 excluded), then the score (bits 24-55, order-preserving; NaN as -inf, -0 as
// +0), then the lower index (bits 0-23 hold 0xFFFFFF - i). Requires i < kMaxTokens.
__device__ __forceinline__ uint32_t ord_score(float s) {
  if (s != s) s = -inf_f();
  if (s == 0.f) s = 0.f;
  const uint32_t u = __float_as_uint(s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ uint64_t rank_key(int cls, float s, int i) {
  return (static_cast<uint64_t>(cls) << 56) | (static_cast<uint64_t>(ord_score(s)) << 24) |
         static_cast<uint64_t>(0xFFFFFF - i);
}
__device__ __forceinline__ int key_token(uint64_t key) { return 0xFFFFFF - static_cast<int>(key & 0xFFFFFFu); }

struct SelectSmem {
  int hist[256];
  int ws[kWarps];
  int bin;
  int rem;
};

// Sorts keys[0, n) in place, largest first, with a bitonic network in its "flip" form (the first
// step of each merge pairs i with its mirror in the merged block, then half-cleaners), which sorts
// any n: the missing elements past n would be the smallest and never move, so pairs reaching past
// n are skipped. O(log^2 n) steps of n / kThreads compare-exchanges, a __syncthreads() after each.
// keys (shared or global memory) must be visible to the block; uniform control flow required.
__device__ __forceinline__ void block_sort_desc(uint64_t* keys, int n) {
  for (int k = 2; (k >> 1) < n; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < n; i += kThreads) {
        const int p = j == (k >> 1) ? (i ^ (k - 1)) : (i ^ j);
        if (p > i && p < n) {
          const uint64_t lo = keys[i], hi = keys[p];
          if (lo < hi) {
            keys[i] = hi;
            keys[p] = lo;
          }
        }
      }
      __syncthreads();
    }
  }
}

// One block selects for one row: the nsel tokens with the largest key(i) (i in [0, N); keys unique),
// written to index_row[0, f) as int64: ascending token order when sorted (with `center` added when
// keep_center), else best first (then `center` last when keep_center). pos_row (optional): position
// of each token in index_row, -1 for the others. Radix select over the 8 bytes of the key (8 passes
// over N), then a compaction in token order; best first: the nsel selected keys sorted in place
// (block_sort_desc) in sort_buf (sort_cap keys of shared memory) when they fit, else in selkey_row
// (nsel uint64 of global scratch, only used when !sorted). Uniform control flow required.
template <class KeyFn>
__device__ void block_select(const KeyFn& key, int N, int nsel, int f, int center, bool keep_center, bool sorted,
                             int64_t* index_row, int* pos_row, uint64_t* selkey_row, uint64_t* sort_buf,
                             int sort_cap, SelectSmem& sm) {
  const int tid = threadIdx.x;
  if (pos_row)
    for (int i = tid; i < N; i += kThreads) pos_row[i] = -1;
  __syncthreads();
  uint64_t thr = ~0ull;  // selected: key >= thr (no key reaches ~0)
  if (nsel > 0) {
    uint64_t prefix = 0;
    int rem = nsel;  // rank (from the top, 1-based) of the wanted key among those matching prefix
    for (int pass = 0; pass < 8; ++pass) {
      const int shift = 56 - 8 * pass;
      sm.hist[tid] = 0;
      if (tid == 0) {
        sm.bin = 0;
        sm.rem = 1;
      }
      __syncthreads();
      for (int i = tid; i < N; i += kThreads) {
        const uint64_t s = key(i);
        const bool match = pass == 0 || (s >> (shift + 8)) == prefix;
        if (match) atomicAdd(&sm.hist[static_cast<int>((s >> shift) & 255u)], 1);
      }
      __syncthreads();
      const int bin = 255 - tid;  // thread t looks at digit 255 - t: the scan counts from the top
      const int h = sm.hist[bin];
      int total;
      const int incl = block_inclusive_scan(h, sm.ws, total);
      const int above = incl - h;  // keys with this prefix and a larger digit
      if (above < rem && incl >= rem) {
        sm.bin = bin;
        sm.rem = rem - above;
      }
      __syncthreads();
      prefix = (prefix << 8) | static_cast<uint64_t>(sm.bin);
      rem = sm.rem;
      __syncthreads();  // everyone has read bin / rem before the next pass resets them
    }
    thr = prefix;  // keys are unique: exactly nsel keys are >= the nsel-th largest
  }
  if (sorted) {
    int base = 0;
    for (int c0 = 0; c0 < N; c0 += kThreads) {
      const int i = c0 + tid;
      const bool sel = i < N && ((nsel > 0 && key(i) >= thr) || (keep_center && i == center));
      int total;
      const int incl = block_inclusive_scan(sel ? 1 : 0, sm.ws, total);
      if (sel) {
        const int p = base + incl - 1;
        if (p < f) {
          index_row[p] = i;
          if (pos_row) pos_row[i] = p;
        }
      }
      base += total;
    }
    return;
  }
  // Best first: gather the selected keys (token order), sort them (largest first), write.
  uint64_t* keys = nsel <= sort_cap ? sort_buf : selkey_row;
  int base = 0;
  for (int c0 = 0; c0 < N; c0 += kThreads) {
    const int i = c0 + tid;
    uint64_t s = 0;
    bool sel = false;
    if (i < N && nsel > 0) {
      s = key(i);
      sel = s >= thr;
    }
    int total;
    const int incl = block_inclusive_scan(sel ? 1 : 0, sm.ws, total);
    if (sel) {
      const int p = base + incl - 1;
      if (p < nsel) keys[p] = s;
    }
    base += total;
  }
  __syncthreads();  // keys (shared or global) written by this block are visible to it after the barrier
  const int cnt = base < nsel ? base : nsel;
  block_sort_desc(keys, cnt);
  for (int q = tid; q < cnt && q < f; q += kThreads) {
    const int tokn = key_token(keys[q]);
    if (tokn >= 0 && tokn < N) {
      index_row[q] = tokn;
      if (pos_row) pos_row[tokn] = q;
    }
  }
  if (keep_center && tid == 0 && f >= 1 && center >= 0 && center < N) {
    index_row[f - 1] = center;
    if (pos_row) pos_row[center] = f - 1;
  }
}

// ---- host helpers ----------------------------------------------------------------------------------

// Runs kernel k on `blocks` blocks of kThreads threads on `stream` (the CPU emulation under
// TPC_EMULATE). No-op for blocks == 0.
template <typename... P, typename... A>
void launch(void (*k)(P...), unsigned blocks, cudaStream_t stream, const A&... args) {
  if (blocks == 0) return;
#ifdef TPC_EMULATE
  (void)stream;
  tpc_emu::launch(blocks, kThreads, [&] { k(args...); });
#else
  k<<<blocks, kThreads, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// The tensor is on the backend's device (a CPU tensor under the emulation).
inline bool on_device(const at::Tensor& t) {
#ifdef TPC_EMULATE
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

// The Gram engine: HOT_KERNELS_CUDA_GRAM=fma forces the FMA engine (a debugging aid, read once;
// under the emulation, set per call by the test); else native half products for 3-D half input,
// 3xTF32 otherwise.
inline bool force_fma() {
#ifdef TPC_EMULATE
  return tpc_emu::g_force_fma;
#else
  static const bool v = [] {
    const char* e = std::getenv("HOT_KERNELS_CUDA_GRAM");
    return e != nullptr && std::strcmp(e, "fma") == 0;
  }();
  return v;
#endif
}

inline int choose_engine(at::ScalarType st, int64_t J) {
  if (force_fma()) return kEngFMA;
  if ((st == at::kHalf || st == at::kBFloat16) && J == 1) return kEngNative;
  return kEngTF32;
}

// Calls fn(T{}) with the device element type of x's dtype.
template <typename Fn>
void with_type(at::ScalarType st, const char* op, const char* arg, Fn&& fn) {
  switch (st) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(__half{}); break;
    case at::kBFloat16: fn(__nv_bfloat16{}); break;
    default:
      TORCH_CHECK(false, op, ": ", arg, " must be float16, bfloat16 or float32 on the cuda backend (float64 runs on "
                  "the cpu and reference backends), got ", st);
  }
}

// Calls fn(std::integral_constant<int, ENG>{}) for the engine (native only exists for half types).
template <typename T, typename Fn>
void with_engine(int eng, Fn&& fn) {
  if (eng == kEngFMA) {
    fn(std::integral_constant<int, kEngFMA>{});
  } else if (eng == kEngNative && !std::is_same<T, float>::value) {
    if constexpr (!std::is_same<T, float>::value) fn(std::integral_constant<int, kEngNative>{});
  } else {
    fn(std::integral_constant<int, kEngTF32>{});
  }
}

template <typename T>
inline Points<T> make_points(const at::Tensor& x) {
  Points<T> p;
  p.x = reinterpret_cast<const T*>(x.data_ptr());
  p.sb = x.stride(0);
  p.sn = x.stride(1);
  p.sj = x.dim() == 4 ? x.stride(2) : 0;
  p.N = static_cast<int>(x.size(1));
  p.J = x.dim() == 4 ? static_cast<int>(x.size(2)) : 1;
  p.C = static_cast<int>(x.size(-1));
  return p;
}

// x as the kernels read it: unit channel stride (other strides are used as they are: expanded or
// transposed batches cost no copy).
inline at::Tensor points_input(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

}  // namespace tpc_cuda
}  // namespace hot_kernels
