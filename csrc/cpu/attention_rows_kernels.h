// The attention row kernels of attention_rows.cpp, compiled once per instruction-set path: that file
// includes this one three times, inside a namespace and a `#pragma GCC target` region each (so that
// every helper here, down to a broadcast, is compiled for the path's ISA), with kIsa = 2 (AVX-512),
// 1 (AVX2 + FMA) or 0 (the baseline). No include guard, on purpose.
//
// Vectors: 16 lanes in zmm (AVX-512), 8 in ymm (AVX2), 4 in xmm (baseline SSE2). Register blocks:
// kR query rows (or keys) at a time, R in the helpers; the logits hold up to max_v(R) vectors of
// keys per row in registers (AVX-512: 4 rows x 6 vectors = the 96 padded keys of HoT's M = 81 in
// one pass; AVX2: 6 x 2; the baseline: 4 x 2), the other products up to kSumV vectors of channels.
constexpr int kW = kIsa == 2 ? 16 : kIsa == 1 ? 8 : 4;
typedef float vf __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kW * sizeof(int32_t))));
// The logits' register block: R rows x max_v(R) vectors of keys, 24 accumulators on AVX-512
// (R = 4: 6 vectors), 12 on AVX2 (R = 4: 3; R = 6: 2), 8 on the baseline (2).
constexpr int max_v(int R) { return (kIsa == 2 ? 24 : kIsa == 1 ? 12 : 8) / R; }
constexpr int kSumV = kIsa == 2 ? 4 : 2;
// Query rows per register block: 6 on AVX2, where 4 rows left the weighted sums 4 x 2 accumulators
// (no more chains than FMA latency x ports) and 6 x 2 still fit 16 registers with their operands
// (bare forward, HoT's shapes at B = 1, 2 threads: 1-2 % faster than 4 rows); 4 on the other paths.
constexpr int kR = kIsa == 1 ? 6 : 4;
static_assert(kPad % kW == 0, "padding must be whole vectors");
// Keys are padded to whole vectors of this path (at least 8): HoT's M = 81 takes 96 keys on the
// AVX-512 path and 88 on the others. The padding keys' logits are -inf, their probabilities exactly
// 0, and every sum over keys runs over the real keys or adds those zeros, so the padding does not
// change any result.
constexpr int64_t kKeyPad = kW < 8 ? 8 : kW;

HK_HOT_IMPL vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
HK_HOT_IMPL void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
HK_HOT_IMPL vf vsplat(float a) { return a - vf{}; }  // one broadcast (a + 0 would be a scalar add: -0)

// a * b + c: one fused multiply-add on the AVX-512 and AVX2 paths (fp-contract=fast in this file),
// two roundings on the baseline ISA, which has no FMA.
HK_HOT_IMPL vf fmadd(vf a, vf b, vf c) { return a * b + c; }

HK_HOT_IMPL vf vmax(vf a, vf b) {
  const vi gt = a > b;
  return (vf)(((vi)a & gt) | ((vi)b & ~gt));
}

// Horizontal max and sum, as fixed trees of lane pairs (templates: only the tree of V's width is
// instantiated).
template <typename V>
HK_HOT_IMPL V swap_halves(V v, int step) {
  if constexpr (sizeof(V) == 64) {
    switch (step) {
      case 8: return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
      case 4: return __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
      case 2: return __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
      default: return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    }
  } else if constexpr (sizeof(V) == 32) {
    switch (step) {
      case 4: return __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
      case 2: return __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
      default: return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
    }
  } else {
    return step == 2 ? __builtin_shufflevector(v, v, 2, 3, 0, 1) : __builtin_shufflevector(v, v, 1, 0, 3, 2);
  }
}
template <typename V>
HK_HOT_IMPL float hmax(V v) {
#pragma GCC unroll 4
  for (int step = kW / 2; step >= 1; step /= 2) v = vmax(v, swap_halves(v, step));
  return v[0];
}
template <typename V>
HK_HOT_IMPL float hsum(V v) {
#pragma GCC unroll 4
  for (int step = kW / 2; step >= 1; step /= 2) v = v + swap_halves(v, step);
  return v[0];
}

// 2^t for t <= 0, lane by lane: t below -126 (results below the smallest normal; -inf too) gives 0,
// NaN stays NaN. One add of 1.5 * 2^23 + 127 rounds t to the integer n and leaves n + 127 in the
// low mantissa bits, which a shift moves into the exponent field of 2^n; 2^f, f = t - n in
// [-1/2, 1/2], is a degree-6 polynomial (near-minimax for relative error): under 1 ulp in all. The
// logits are scaled by log2(e) up front (Geometry::scale_log2), so the softmax needs no range
// reduction by ln 2: 14 vector operations per exponential where e^x took 19.
HK_HOT_IMPL vf vexp2(vf t) {
  const vf magic = vsplat(12583039.0f);  // 1.5 * 2^23 + 127
  const vf v = t + magic;
  const vf f = t - (v - magic);
  vf p = vsplat(1.534697076e-04f);
  p = fmadd(p, f, vsplat(1.339994138e-03f));
  p = fmadd(p, f, vsplat(9.618484415e-03f));
  p = fmadd(p, f, vsplat(5.550328642e-02f));
  p = fmadd(p, f, vsplat(2.402264625e-01f));
  p = fmadd(p, f, vsplat(6.931471825e-01f));
  p = fmadd(p, f, vsplat(1.0f));
  const vf two_n = (vf)((vi)v << 23);
  const vf y = p * two_n;
  const vi under = t < vsplat(-126.0f);
  return (vf)((vi)y & ~under);
}

// a . b over n floats: whole vectors, then a scalar tail.
HK_HOT_IMPL float dot(const float* a, const float* b, int64_t n) {
  vf acc = vf{};
  int64_t c = 0;
  for (; c + kW <= n; c += kW) acc = fmadd(vload(a + c), vload(b + c), acc);
  float t = hsum(acc);
  for (; c < n; ++c) t += a[c] * b[c];
  return t;
}

// Copy n floats (n >= 0) with vectors, then a scalar tail.
HK_HOT_IMPL void copy_floats(float* dst, const float* src, int64_t n) {
  int64_t c = 0;
  for (; c + kW <= n; c += kW) vstore(dst + c, vload(src + c));
  for (; c < n; ++c) dst[c] = src[c];
}

// Pull the n floats from p into the cache (a row slice the caller reads a few rows from now).
HK_HOT_IMPL void prefetch_floats(const float* p, int64_t n) {
  for (int64_t c = 0; c < n; c += 16) __builtin_prefetch(p + c, 0, 3);
}

// One butterfly step of a kW x kW transpose (rows r[i], r[i + h] for i with bit h clear): after the
// steps h = kW/2, ..., 1, r[i] holds column i.
template <int h, int... l>
HK_HOT_IMPL void transpose_step(vf* r, std::integer_sequence<int, l...>) {
#pragma GCC unroll 16
  for (int i = 0; i < kW; ++i) {
    if (i & h) continue;
    const vf a = r[i], b = r[i + h];
    r[i] = __builtin_shufflevector(a, b, ((l & h) == 0 ? l : kW + l - h)...);
    r[i + h] = __builtin_shufflevector(a, b, ((l & h) == 0 ? l + h : kW + l)...);
  }
}
template <int h>
HK_HOT_IMPL void transpose(vf* r) {
  transpose_step<h>(r, std::make_integer_sequence<int, kW>{});
  if constexpr (h > 1) transpose<h / 2>(r);
}

// bt (d rows of mp) = (the M rows of d channels from first, at stride ld)^T * mul, zero columns
// j >= M: kW x kW blocks transposed in registers.
HK_HOT_IMPL void pack_transposed(const float* first, int64_t ld, int64_t M, int64_t d, int64_t mp, float mul,
                                 float* bt) {
  const vf mv = vsplat(mul);
  for (int64_t j0 = 0; j0 < mp; j0 += kW) {
    for (int64_t c0 = 0; c0 < d; c0 += kW) {
      const int64_t cn = std::min<int64_t>(kW, d - c0);
      vf r[kW];
#pragma GCC unroll 16
      for (int i = 0; i < kW; ++i) {
        if (j0 + i >= M) {
          r[i] = vf{};
        } else if (cn == kW) {
          r[i] = vload(first + (j0 + i) * ld + c0);
        } else {
          float t[kW] = {};
          for (int64_t c = 0; c < cn; ++c) t[c] = first[(j0 + i) * ld + c0 + c];
          r[i] = vload(t);
        }
      }
      transpose<kW / 2>(r);
      for (int64_t c = 0; c < cn; ++c) vstore(bt + (c0 + c) * mp + j0, r[c] * mv);
    }
  }
}

// acc[r][t] (+)= sum_k a_at(r, k) * b[k][col0 + t * kW ...] over k < K in order: R rows of a
// (a_at(r, k) reads element (r, k)) times the kV vectors of columns from col0 of b (K rows at stride
// ldb), in registers; kAcc: the sums continue from acc's values. The micro-kernel of every product in
// the attention. kSplit: even and odd k go to separate accumulators, added at the end (twice the FMA
// chains in flight, where R * kV alone is too few to hide the FMA latency and the register file has
// room for both sets).
template <int R, int kV, bool kSplit, bool kAcc, class At>
HK_HOT_IMPL void block_product(const At& a_at, const float* b, int64_t ldb, int64_t K, int64_t col0,
                               vf (&acc)[R][kV]) {
  constexpr int kS = kSplit ? 2 : 1;
  vf part[kS][R][kV];
#pragma GCC unroll 2
  for (int u = 0; u < kS; ++u)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int t = 0; t < kV; ++t) part[u][r][t] = kAcc && u == 0 ? acc[r][t] : vf{};
  auto step = [&](int u, int64_t k) __attribute__((always_inline)) {
    vf bk[kV];
#pragma GCC unroll 8
    for (int t = 0; t < kV; ++t) bk[t] = vload(b + k * ldb + col0 + t * kW);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vf ar = vsplat(a_at(r, k));
#pragma GCC unroll 8
      for (int t = 0; t < kV; ++t) part[u][r][t] = fmadd(ar, bk[t], part[u][r][t]);
    }
  };
  int64_t k = 0;
  if constexpr (kSplit) {
    for (; k + 2 <= K; k += 2) {
      step(0, k);
      step(1, k + 1);
    }
  }
  for (; k < K; ++k) step(0, k);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < kV; ++t) acc[r][t] = kSplit ? part[0][r][t] + part[kS - 1][r][t] : part[0][r][t];
}

// block_product over rows a[r] (K values each): the logits (Q K^T), the weighted sums (P V), dQ (dS K).
template <int R, int kV, bool kSplit = false>
HK_HOT_IMPL void rows_times_block(const float* const* a, const float* b, int64_t ldb, int64_t K, int64_t col0,
                                  vf (&acc)[R][kV]) {
  block_product<R, kV, kSplit, false>([a](int r, int64_t k) __attribute__((always_inline)) { return a[r][k]; }, b,
                                      ldb, K, col0, acc);
}

// acc += block_product over the R columns from j0 of a (K rows at stride lda), i.e. rows of a^T: dV
// (P^T dO) and dK (dS^T Q).
template <int R, int kV, bool kSplit = false>
HK_HOT_IMPL void cols_times_block(const float* a, int64_t lda, int64_t j0, const float* b, int64_t ldb, int64_t K,
                                  int64_t col0, vf (&acc)[R][kV]) {
  const float* a0 = a + j0;
  block_product<R, kV, kSplit, true>(
      [a0, lda](int r, int64_t k) __attribute__((always_inline)) { return a0[k * lda + r]; }, b, ldb, K, col0, acc);
}

// s (R rows of mp) = rows a[r] (d channels) times bt (d rows of mp) + bias (mp: 0, or -inf at the
// padding keys), for the kV vectors of keys from j0; mx[r] = the lane-wise max over them, folded in.
template <int R, int kV>
HK_HOT_IMPL void logits_cols(const float* const* a, const float* bt, const float* bias, int64_t mp, int64_t d,
                             int64_t j0, float* s, vf* mx) {
  vf acc[R][kV];
  rows_times_block<R, kV>(a, bt, mp, d, j0, acc);
#pragma GCC unroll 8
  for (int t = 0; t < kV; ++t) {
    const vf bt_ = vload(bias + j0 + t * kW);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vf v = acc[r][t] + bt_;
      vstore(s + r * mp + j0 + t * kW, v);
      mx[r] = vmax(mx[r], v);
    }
  }
}

// The last (fewer than max_v(R)) vectors of keys from j0: nv of them, one register pass.
template <int R, int kV>
HK_HOT_IMPL void logits_tail(int64_t nv, const float* const* a, const float* bt, const float* bias, int64_t mp,
                             int64_t d, int64_t j0, float* s, vf* mx) {
  if constexpr (kV >= 1) {
    if (nv == kV)
      logits_cols<R, kV>(a, bt, bias, mp, d, j0, s, mx);
    else
      logits_tail<R, kV - 1>(nv, a, bt, bias, mp, d, j0, s, mx);
  }
}

// The logits of R rows over every key (see logits_cols); returns the row maxima in m.
template <int R>
HK_HOT_IMPL void logits(const float* const* a, const float* bt, const float* bias, int64_t mp, int64_t d, float* s,
                        float* m) {
  constexpr int kMaxV = max_v(R);
  vf mx[R];
  for (int r = 0; r < R; ++r) mx[r] = vsplat(-std::numeric_limits<float>::infinity());
  int64_t j0 = 0;
  for (; j0 + kMaxV * kW <= mp; j0 += kMaxV * kW) logits_cols<R, kMaxV>(a, bt, bias, mp, d, j0, s, mx);
  logits_tail<R, kMaxV - 1>((mp - j0) / kW, a, bt, bias, mp, d, j0, s, mx);
  for (int r = 0; r < R; ++r) m[r] = hmax(mx[r]);
}

// y (R rows of dp) = (rows p[r] (M values each) times b (M rows of dp)) * mul[r], for the kV vectors
// of channels from c0.
template <int R, int kV, bool kSplit>
HK_HOT_IMPL void combine_cols(const float* const* p, const float* b, int64_t M, int64_t dp, int64_t c0,
                              const float* mul, float* y) {
  vf acc[R][kV];
  rows_times_block<R, kV, kSplit>(p, b, dp, M, c0, acc);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const vf mr = vsplat(mul[r]);
#pragma GCC unroll 8
    for (int t = 0; t < kV; ++t) vstore(y + r * dp + c0 + t * kW, acc[r][t] * mr);
  }
}

// The channel blocks of a product over dp channels (combine, transposed_product): block(kv, split, c0)
// with kv (a std::integral_constant) = kSumV vectors at a time, then 2, then 1. On AVX-512 the
// narrower blocks split their sums in two (split: a std::bool_constant): 32 registers have room for
// two sets of 4 x 2 (measured interleaved, TRA at B = 1, C = 128 / 256: 1-2 % faster forward and
// forward+backward than one set).
template <class Block>
HK_HOT_IMPL void channel_blocks(int64_t dp, const Block& block) {
  using Split = std::bool_constant<kIsa == 2>;
  int64_t c0 = 0;
  for (; c0 + kSumV * kW <= dp; c0 += kSumV * kW) block(std::integral_constant<int, kSumV>{}, std::false_type{}, c0);
  if constexpr (kSumV > 2) {
    if (c0 + 2 * kW <= dp) block(std::integral_constant<int, 2>{}, Split{}, c0), c0 += 2 * kW;
  }
  for (; c0 < dp; c0 += kW) block(std::integral_constant<int, 1>{}, Split{}, c0);
}

// y (R rows of dp) = (p (R rows at stride mp, M used) times b (M rows of dp)) * mul[r].
template <int R>
HK_HOT_IMPL void combine(const float* p, int64_t mp, const float* b, int64_t M, int64_t dp, const float* mul,
                         float* y) {
  const float* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = p + r * mp;
  channel_blocks(dp, [&](auto kv, auto split, int64_t c0) __attribute__((always_inline)) {
    combine_cols<R, decltype(kv)::value, decltype(split)::value>(rows, b, M, dp, c0, mul, y);
  });
}

// acc (rows j < M of dp, and rows up to the next multiple of R) += a^T b: acc_j += sum_k a[k][j] b_k
// over the K rows in order (a: K rows at stride lda; b: K rows of dp), for the kV vectors of channels
// from c0 of the R keys from j0. The rows past M are computed too (not used): their reads run up to
// R - 1 floats past column M - 1 of a row, which must be readable (the next row, or slack after the
// last).
template <int R, int kV, bool kSplit>
HK_HOT_IMPL void transposed_cols(const float* a, int64_t lda, const float* b, int64_t dp, int64_t K, int64_t j0,
                                 int64_t c0, float* acc_rows) {
  vf acc[R][kV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < kV; ++t) acc[r][t] = vload(acc_rows + (j0 + r) * dp + c0 + t * kW);
  cols_times_block<R, kV, kSplit>(a, lda, j0, b, dp, K, c0, acc);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < kV; ++t) vstore(acc_rows + (j0 + r) * dp + c0 + t * kW, acc[r][t]);
}

template <int R>
HK_HOT_IMPL void transposed_product(const float* a, int64_t lda, const float* b, int64_t dp, int64_t K, int64_t M,
                                    float* acc_rows) {
  for (int64_t j0 = 0; j0 < M; j0 += R) {
    channel_blocks(dp, [&](auto kv, auto split, int64_t c0) __attribute__((always_inline)) {
      transposed_cols<R, decltype(kv)::value, decltype(split)::value>(a, lda, b, dp, K, j0, c0, acc_rows);
    });
  }
}

// ---- forward --------------------------------------------------------------------------------

// Rows [i0, i1) of (sequence s, head h): their o rows and lse.
void forward_task(const Geometry& g, int64_t s, int64_t h, int64_t i0, int64_t i1, float* o, float* lse) {
  const int64_t mp = g.mp, dp = g.dp, M = g.M, d = g.d;
  thread_local tpc::AlignedBuf<float> buf;  // reused by the thread's next tasks (see AlignedBuf)
  buf.assign_zero(d * mp + M * dp + mp + kR * mp + kR * dp);
  float* kt = buf.data();    // (d, mp): K^T * scale * log2(e), zero padding columns
  float* vp = kt + d * mp;   // (M, dp): V, zero padding channels
  float* bias = vp + M * dp; // (mp): 0 at the keys, -inf at the padding
  float* sb = bias + mp;     // (kR, mp): base-2 logits, then 2^(logit - max)
  float* yb = sb + kR * mp;  // (kR, dp): output rows
  pack_transposed(g.k_row(s, h, 0), 2 * g.C, M, d, mp, g.scale_log2, kt);
  pack_rows(g, g.v_row(s, h, 0), vp);
  std::fill(bias + M, bias + mp, -std::numeric_limits<float>::infinity());
  for (int64_t i = i0; i < i1; i += kR) {
    const int rows = static_cast<int>(std::min<int64_t>(kR, i1 - i));
    const float* a[kR];  // query rows in place; rows past i1 repeat the last one (not stored)
    for (int r = 0; r < kR; ++r) a[r] = g.q_row(s, h, i + std::min(r, rows - 1));
    float m[kR], inv[kR];
    logits<kR>(a, kt, bias, mp, d, sb, m);
    // A row whose logits are all -inf (infinite inputs) has no finite maximum: it comes out NaN.
    vf sum[kR];
    for (int r = 0; r < kR; ++r) sum[r] = vf{};
    for (int64_t j = 0; j < mp; j += kW)
#pragma GCC unroll 8
      for (int r = 0; r < kR; ++r) {
        const vf e = vexp2(vload(sb + r * mp + j) - vsplat(m[r]));
        vstore(sb + r * mp + j, e);
        sum[r] += e;
      }
    for (int r = 0; r < kR; ++r) {
      const float total = hsum(sum[r]);
      inv[r] = 1.0f / total;
      if (r < rows) lse[i + r] = m[r] * kLn2 + std::log(total);  // m is in base-2 units
    }
    combine<kR>(sb, mp, vp, M, dp, inv, yb);
    for (int r = 0; r < rows; ++r) copy_floats(o + (i + r) * g.C + h * d, yb + r * dp, d);
  }
}

// ---- backward -------------------------------------------------------------------------------

// The whole (sequence s, head h): dq rows (of this sequence) and the head's dK | dV rows. The rows
// go in chunks of at most kBackwardChunkBytes of scratch (all L rows at HoT's shapes), in two passes
// each. The first, per block of kR query rows: P and dS * scale, kept for the chunk's rows, and the
// block's dQ = dS K * scale. The second: dV += P^T dO and dK += dS^T Q * scale over the chunk's rows,
// kR keys x up to kSumV vectors of channels in registers (each sum over the rows in row order). No two
// tasks write the same element; nothing depends on the thread count.
void backward_task(const Geometry& g, const float* dO, const float* o, const float* lse, int64_t s, int64_t h,
                   float* dq, float* dkv) {
  constexpr int R = kR;
  const int64_t mp = g.mp, dp = g.dp, M = g.M, d = g.d, L = g.L, C = g.C;
  const int64_t Mr = round_up(M, R);
  // Rows per chunk: whole blocks, within the budget (at least one block).
  const int64_t per_row = 2 * (mp + dp) * int64_t(sizeof(float));
  const int64_t Lc = std::min(round_up(L, R), std::max<int64_t>(R, kBackwardChunkBytes / per_row / R * R));
  thread_local tpc::AlignedBuf<float> small, rows, probs;  // reused by the thread's next tasks
  small.assign_zero(2 * d * mp + M * dp + 2 * mp + R * dp + 2 * Mr * dp);
  float* kt = small.data();   // (d, mp): K^T * scale * log2(e)
  float* vt = kt + d * mp;    // (d, mp): V^T
  float* kp = vt + d * mp;    // (M, dp): K, zero channels past d
  float* bias = kp + M * dp;  // (mp): 0 at the keys, -inf at the padding
  float* zero = bias + mp;    // (mp): zeros
  float* yb = zero + mp;      // (R, dp): a block's dQ rows
  float* dk = yb + R * dp;    // (Mr, dp): dK, summed over the chunks
  float* dv = dk + Mr * dp;   // (Mr, dp): dV, likewise
  rows.assign_uninit(2 * Lc * dp + Lc);
  float* qa = rows.data();    // (Lc, dp): the chunk's query rows, zero channels past d and zero rows past L
  float* ga = qa + Lc * dp;   // (Lc, dp): its dO rows, likewise
  float* dd = ga + Lc * dp;   // (Lc): D_i = dO_i . o_i of its rows
  // (Lc, mp) each, then R - 1 floats that the last key block of the second pass reads (not used).
  probs.assign_uninit(2 * Lc * mp + R);
  float* pa = probs.data();   // P
  float* da = pa + Lc * mp;   // dS * scale
  std::fill(da + Lc * mp, da + Lc * mp + R, 0.0f);
  pack_transposed(g.k_row(s, h, 0), 2 * C, M, d, mp, g.scale_log2, kt);
  pack_transposed(g.v_row(s, h, 0), 2 * C, M, d, mp, 1.0f, vt);
  pack_rows(g, g.k_row(s, h, 0), kp);
  std::fill(bias + M, bias + mp, -std::numeric_limits<float>::infinity());
  const float* lse_sh = lse + (s * g.H + h) * L;
  const vf sc = vsplat(g.scale);
  float ones[R];
  for (int r = 0; r < R; ++r) ones[r] = 1.0f;
  for (int64_t i0 = 0; i0 < L; i0 += Lc) {
    const int64_t n = std::min(Lc, L - i0);  // the chunk's rows
    const int64_t np = round_up(n, R);
    // The rows' head slices are d of C channels, rows C apart in memory: each row is new cache
    // lines that the hardware prefetchers do not fetch ahead, so the loop asks for them kAhead rows
    // early, and D's dot product reads o's row here too (measured, perf samples in the backward
    // task, fp32, Xeon, AVX-512: this loop and that product had a tenth of them, waiting on those
    // loads; with the prefetch the task takes 2-9 % less CPU time at HoT-MotionBERT,
    // -MotionAGFormer and -MixSTE B = 1, the same results bitwise).
    constexpr int64_t kAhead = 8;
    for (int64_t i = 0; i < np; ++i) {
      float* qr = qa + i * dp;
      float* gr = ga + i * dp;
      const int64_t c = i < n ? d : 0;
      if (c) {
        const int64_t row = s * L + i0 + i;
        if (i + kAhead < n) {
          prefetch_floats(g.q_row(s, h, i0 + i + kAhead), d);
          prefetch_floats(dO + (row + kAhead) * C + h * d, d);
          prefetch_floats(o + (row + kAhead) * C + h * d, d);
        }
        copy_floats(qr, g.q_row(s, h, i0 + i), d);
        copy_floats(gr, dO + row * C + h * d, d);
        dd[i] = dot(gr, o + row * C + h * d, d);
      }
      std::fill(qr + c, qr + dp, 0.0f);
      std::fill(gr + c, gr + dp, 0.0f);
    }
    for (int64_t i = 0; i < np; i += R) {
      const float* qrows[R];
      const float* grows[R];
      float lse_b[R], m_unused[R];
      vf delta[R];  // D_r = dO_r . o_r
      for (int r = 0; r < R; ++r) {
        const int64_t row = i + r;  // in the chunk
        qrows[r] = qa + row * dp;
        grows[r] = ga + row * dp;
        if (row < n) {
          lse_b[r] = lse_sh[i0 + row] * kLog2e;  // in the logits' base-2 units
          delta[r] = vsplat(dd[row]);
        } else {
          // Zero rows with lse = +inf: probabilities exactly 0, and not summed in the second pass.
          lse_b[r] = std::numeric_limits<float>::infinity();
          delta[r] = vf{};
        }
      }
      float* pb = pa + i * mp;
      float* db = da + i * mp;
      logits<R>(qrows, kt, bias, mp, d, pb, m_unused);
      logits<R>(grows, vt, zero, mp, d, db, m_unused);  // dP (0 at the padding, where P is 0)
      for (int64_t j = 0; j < mp; j += kW)
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const vf p = vexp2(vload(pb + r * mp + j) - vsplat(lse_b[r]));
          vstore(pb + r * mp + j, p);
          const vf dpv = vload(db + r * mp + j);
          vstore(db + r * mp + j, p * (dpv - delta[r]) * sc);
        }
      combine<R>(db, mp, kp, M, dp, ones, yb);  // dQ = dS K * scale
      const int64_t nr = std::min<int64_t>(R, n - i);
      for (int64_t r = 0; r < nr; ++r) copy_floats(dq + (s * L + i0 + i + r) * C + h * d, yb + r * dp, d);
    }
    transposed_product<R>(pa, mp, ga, dp, n, M, dv);  // dV += P^T dO
    transposed_product<R>(da, mp, qa, dp, n, M, dk);  // dK += dS^T Q * scale
  }
  for (int64_t j = 0; j < M; ++j) {
    float* row = dkv + (s * M + j) * 2 * C + h * d;
    copy_floats(row, dk + j * dp, d);
    copy_floats(row + C, dv + j * dp, d);
  }
}
