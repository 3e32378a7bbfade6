// See screen.h. The scan keeps the t best (value, index) pairs of a row sorted in a tiny array; a
// 16-wide comparison against the current t-th best skips almost every vector, so the cost is one
// streaming pass over the scores (bf16 -> fp32 widening, one FMA, one compare).
#include "screen.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ASTRA_X86 1
#endif

namespace astra {
namespace {

struct Best {
  float v[8];
  int64_t i[8];
  int t;
  Best() : Best(1) {}
  explicit Best(int t_) : t(t_) {
    for (int j = 0; j < 8; ++j) {
      v[j] = std::numeric_limits<float>::infinity();
      i[j] = -1;
    }
  }
  float worst() const { return v[t - 1]; }
  // Insert (d, k) if it beats the t-th best; equal values keep the earlier (lower) index first.
  void push(float d, int64_t k) {
    if (!(d < v[t - 1])) return;
    int p = t - 1;
    while (p > 0 && d < v[p - 1]) {
      v[p] = v[p - 1];
      i[p] = i[p - 1];
      --p;
    }
    v[p] = d;
    i[p] = k;
  }
};

// Push the lanes set in `hit` (lane j: score d[j], code base + j) into `best`, lowest lane first.
inline void push_hits(Best& best, unsigned hit, const float* d, int64_t base) {
  while (hit) {
    const int j = __builtin_ctz(hit);
    hit &= hit - 1;
    best.push(d[j], base + j);
  }
}

inline float bf16_to_f32(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <bool BF16>
void scan_scalar(const void* S, int64_t rows, int64_t K, int64_t ld, const float* cn, float alpha, int t,
                 float* vals, int64_t* idx, float* smax) {
  for (int64_t r = 0; r < rows; ++r) {
    Best best(t);
    float mx = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float s = BF16 ? bf16_to_f32(static_cast<const uint16_t*>(S)[r * ld + k])
                           : static_cast<const float*>(S)[r * ld + k];
      const float d = cn ? std::fma(alpha, s, cn[k]) : alpha * s;
      mx = std::fmax(mx, std::fabs(s));
      best.push(d, k);
    }
    for (int j = 0; j < t; ++j) {
      vals[r * t + j] = best.v[j];
      idx[r * t + j] = best.i[j];
    }
    if (smax) smax[r] = mx;
  }
}

#ifdef ASTRA_X86
template <bool BF16>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void scan_avx512(const void* S, int64_t rows, int64_t K, int64_t ld,
                                                              const float* cn, float alpha, int t, float* vals,
                                                              int64_t* idx, float* smax) {
  const __m512 valpha = _mm512_set1_ps(alpha);
  const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);
  alignas(64) float tmp[16];
  for (int64_t r = 0; r < rows; ++r) {
    Best best(t);
    __m512 vthr = _mm512_set1_ps(best.worst());
    __m512 vmx = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
      const int64_t m = K - k0 < 16 ? K - k0 : 16;
      const __mmask16 lanes = m == 16 ? __mmask16(0xFFFF) : __mmask16((1u << m) - 1);
      __m512 s;
      if (BF16) {
        const uint16_t* p = static_cast<const uint16_t*>(S) + r * ld + k0;
        const __m256i h = _mm256_maskz_loadu_epi16(lanes, p);
        s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      } else {
        s = _mm512_maskz_loadu_ps(lanes, static_cast<const float*>(S) + r * ld + k0);
      }
      const __m512 d = cn ? _mm512_fmadd_ps(valpha, s, _mm512_maskz_loadu_ps(lanes, cn + k0)) : _mm512_mul_ps(valpha, s);
      vmx = _mm512_max_ps(vmx, _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(s), absmask)));
      __mmask16 hit = _mm512_mask_cmp_ps_mask(lanes, d, vthr, _CMP_LT_OQ);
      if (hit) {
        _mm512_store_ps(tmp, d);
        push_hits(best, hit, tmp, k0);
        vthr = _mm512_set1_ps(best.worst());
      }
    }
    for (int j = 0; j < t; ++j) {
      vals[r * t + j] = best.v[j];
      idx[r * t + j] = best.i[j];
    }
    if (smax) smax[r] = _mm512_reduce_max_ps(vmx);
  }
}

// ASTRA_NO_AVX512 (any value, read once) turns the AVX-512 scans off (the AVX2 ones run where the CPU has AVX2
// and FMA), ASTRA_NO_AVX2 the AVX2 ones too (the scalar scans): the fallbacks' tests on machines that have more.
bool have_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && std::getenv("ASTRA_NO_AVX512") == nullptr;
  return ok;
}

bool have_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         std::getenv("ASTRA_NO_AVX2") == nullptr;
  return ok;
}

// scan_avx512 with 8 lanes (AVX2 + FMA): the same values (one FMA per score), the same order of pushes.
template <bool BF16>
__attribute__((target("avx2,fma"))) void scan_avx2(const void* S, int64_t rows, int64_t K, int64_t ld, const float* cn,
                                                   float alpha, int t, float* vals, int64_t* idx, float* smax) {
  const __m256 valpha = _mm256_set1_ps(alpha);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  alignas(32) float tmp[8];
  const int64_t K8 = K / 8 * 8;
  for (int64_t r = 0; r < rows; ++r) {
    Best best(t);
    __m256 vthr = _mm256_set1_ps(best.worst());
    __m256 vmx = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < K8; k0 += 8) {
      __m256 s;
      if (BF16) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(S) + r * ld + k0));
        s = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      } else {
        s = _mm256_loadu_ps(static_cast<const float*>(S) + r * ld + k0);
      }
      const __m256 d = cn ? _mm256_fmadd_ps(valpha, s, _mm256_loadu_ps(cn + k0)) : _mm256_mul_ps(valpha, s);
      vmx = _mm256_max_ps(vmx, _mm256_and_ps(s, absmask));
      int hit = _mm256_movemask_ps(_mm256_cmp_ps(d, vthr, _CMP_LT_OQ));
      if (hit) {
        _mm256_store_ps(tmp, d);
        push_hits(best, hit, tmp, k0);
        vthr = _mm256_set1_ps(best.worst());
      }
    }
    _mm256_store_ps(tmp, vmx);
    float mx = 0.f;
    for (int j = 0; j < 8; ++j) mx = std::fmax(mx, tmp[j]);
    for (int64_t k = K8; k < K; ++k) {   // the last K % 8 columns
      const float s = BF16 ? bf16_to_f32(static_cast<const uint16_t*>(S)[r * ld + k])
                           : static_cast<const float*>(S)[r * ld + k];
      best.push(cn ? std::fma(alpha, s, cn[k]) : alpha * s, k);
      mx = std::fmax(mx, std::fabs(s));
    }
    for (int j = 0; j < t; ++j) {
      vals[r * t + j] = best.v[j];
      idx[r * t + j] = best.i[j];
    }
    if (smax) smax[r] = mx;
  }
}
#endif

// ---- fused small-group screen (see screen.h): codewords 16 at a time, R tokens at a time ----

template <int R>
void small_group_scalar(const float* x, int64_t ldx, const float* cbg, int64_t kb0, int64_t kb1, int64_t K,
                        int64_t DG, Best* best) {
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const float* c = cbg + kb * (DG + 1) * 16;
    for (int r = 0; r < R; ++r) {
      for (int l = 0; l < 16 && kb * 16 + l < K; ++l) {
        float s = c[DG * 16 + l];
        for (int64_t j = 0; j < DG; ++j) s = std::fma(x[r * ldx + j], c[j * 16 + l], s);
        best[r].push(-2.f * s, kb * 16 + l);
      }
    }
  }
}

constexpr int kRows = 6;  // rows x vectors per register block (kRows * kVecs <= 24 accumulators)
constexpr int kVecs = 4;

#ifdef ASTRA_X86
// R rows against V vectors (16 V codewords) per step: R V accumulators, the x values broadcast from memory.
// DGC > 0: the group dim known at compile time (the dim loop unrolled); 0: DG at run time.
template <int R, int V, int DGC>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void small_group_avx512(const float* x, int64_t ldx,
                                                                             const float* cbg, int64_t kb0,
                                                                             int64_t kb1, int64_t DG_, Best* best) {
  const int64_t DG = DGC > 0 ? DGC : DG_;
  alignas(64) float tmp[16];
  const __m512 m2 = _mm512_set1_ps(-2.f);
  __m512 thr[R];
  for (int r = 0; r < R; ++r) thr[r] = _mm512_set1_ps(best[r].worst());
  const int64_t stride = (DG + 1) * 16;
  int64_t kb = kb0;
  for (; kb + V <= kb1; kb += V) {
    const float* c = cbg + kb * stride;
    __m512 acc[R][V];
    for (int v = 0; v < V; ++v) {
      const __m512 cn = _mm512_loadu_ps(c + v * stride + DG * 16);
      for (int r = 0; r < R; ++r) acc[r][v] = cn;
    }
    for (int64_t j = 0; j < DG; ++j) {
      __m512 cv[V];
      for (int v = 0; v < V; ++v) cv[v] = _mm512_loadu_ps(c + v * stride + j * 16);
      for (int r = 0; r < R; ++r) {
        const __m512 xb = _mm512_set1_ps(x[r * ldx + j]);
        for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(xb, cv[v], acc[r][v]);
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < V; ++v) {
        const __m512 d = _mm512_mul_ps(m2, acc[r][v]);
        __mmask16 hit = _mm512_cmp_ps_mask(d, thr[r], _CMP_LT_OQ);
        if (hit) {
          _mm512_store_ps(tmp, d);
          push_hits(best[r], hit, tmp, (kb + v) * 16);
          thr[r] = _mm512_set1_ps(best[r].worst());
        }
      }
    }
  }
  for (; kb < kb1; ++kb) {  // the last 1..V-1 vectors
    const float* c = cbg + kb * stride;
    for (int r = 0; r < R; ++r) {
      __m512 acc = _mm512_loadu_ps(c + DG * 16);
      for (int64_t j = 0; j < DG; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + j]), _mm512_loadu_ps(c + j * 16), acc);
      _mm512_store_ps(tmp, _mm512_mul_ps(m2, acc));
      for (int l = 0; l < 16; ++l) best[r].push(tmp[l], kb * 16 + l);
    }
  }
}
#endif

#ifdef ASTRA_X86
// small_group_avx512 with 8 lanes (AVX2 + FMA): R rows against one vector of 16 codewords (two halves) per step,
// 2 R accumulators (R = 6: 12 of the 16 ymm registers). The same FMA chain per score, so the same values.
template <int R, int DGC>
__attribute__((target("avx2,fma"))) void small_group_avx2(const float* x, int64_t ldx, const float* cbg, int64_t kb0,
                                                          int64_t kb1, int64_t DG_, Best* best) {
  const int64_t DG = DGC > 0 ? DGC : DG_;
  alignas(32) float sc[R][16];
  const __m256 m2 = _mm256_set1_ps(-2.f);
  const int64_t stride = (DG + 1) * 16;
  float thr[R];
  for (int r = 0; r < R; ++r) thr[r] = best[r].worst();
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const float* c = cbg + kb * stride;
    __m256 lo[R], hi[R];
    const __m256 cn_lo = _mm256_loadu_ps(c + DG * 16), cn_hi = _mm256_loadu_ps(c + DG * 16 + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) lo[r] = cn_lo, hi[r] = cn_hi;
    for (int64_t j = 0; j < DG; ++j) {
      const __m256 c0 = _mm256_loadu_ps(c + j * 16), c1 = _mm256_loadu_ps(c + j * 16 + 8);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 xb = _mm256_broadcast_ss(x + r * ldx + j);
        lo[r] = _mm256_fmadd_ps(xb, c0, lo[r]);
        hi[r] = _mm256_fmadd_ps(xb, c1, hi[r]);
      }
    }
    // masks in registers first (the accumulators are indexed only in unrolled loops, so they stay in registers)
    int hits[R];
    int any = 0;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 vt = _mm256_set1_ps(thr[r]);
      lo[r] = _mm256_mul_ps(m2, lo[r]);
      hi[r] = _mm256_mul_ps(m2, hi[r]);
      hits[r] = _mm256_movemask_ps(_mm256_cmp_ps(lo[r], vt, _CMP_LT_OQ)) |
                (_mm256_movemask_ps(_mm256_cmp_ps(hi[r], vt, _CMP_LT_OQ)) << 8);
      any |= hits[r];
    }
    if (!any) continue;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm256_store_ps(sc[r], lo[r]);
      _mm256_store_ps(sc[r] + 8, hi[r]);
    }
    for (int r = 0; r < R; ++r) {
      int hit = hits[r];
      if (!hit) continue;
      push_hits(best[r], hit, sc[r], kb * 16);
      thr[r] = best[r].worst();
    }
  }
}
#endif

template <int R>
void small_group_rows(const float* x, int64_t ldx, const float* cbg, int64_t kb0, int64_t kb1, int64_t K, int64_t DG,
                      Best* best) {
#ifdef ASTRA_X86
  if (have_avx512()) {
    // padding columns: -inf scores, never pushed
    if (DG == 24)
      small_group_avx512<R, kVecs, 24>(x, ldx, cbg, kb0, kb1, DG, best);   // G = 32 of 768
    else if (DG == 12)
      small_group_avx512<R, kVecs, 12>(x, ldx, cbg, kb0, kb1, DG, best);   // G = 32 of 384, G = 64 of 768
    else
      small_group_avx512<R, kVecs, 0>(x, ldx, cbg, kb0, kb1, DG, best);
    return;
  }
  if (have_avx2()) {
    if (DG == 24)
      small_group_avx2<R, 24>(x, ldx, cbg, kb0, kb1, DG, best);
    else if (DG == 12)
      small_group_avx2<R, 12>(x, ldx, cbg, kb0, kb1, DG, best);
    else
      small_group_avx2<R, 0>(x, ldx, cbg, kb0, kb1, DG, best);
    return;
  }
#endif
  small_group_scalar<R>(x, ldx, cbg, kb0, kb1, K, DG, best);
}

// One group, `n` rows (at most kTile): codeword blocks of kKbChunk vectors stay in L1 while every row of
// the tile passes over them (the whole group codebook, ~100 KB at K = 1024, DG = 24, would not).
constexpr int kTile = 48;
constexpr int64_t kKbChunk = 8;

void small_group_tile(const float* x, int64_t ldx, const float* cbg, int64_t Kp, int64_t K, int64_t DG, int n,
                      Best* best) {
  constexpr int R = kRows;
  for (int64_t kb0 = 0; kb0 < Kp / 16; kb0 += kKbChunk) {
    const int64_t kb1 = kb0 + kKbChunk < Kp / 16 ? kb0 + kKbChunk : Kp / 16;
    int r = 0;
    for (; r + R <= n; r += R) small_group_rows<R>(x + r * ldx, ldx, cbg, kb0, kb1, K, DG, best + r);
    for (; r < n; ++r) small_group_rows<1>(x + r * ldx, ldx, cbg, kb0, kb1, K, DG, best + r);
  }
}


// ---- bf16 small-group screen with an in-kernel fp32 re-rank (see screen.h) ----

constexpr float kU32 = 5.9604645e-08f;   // 2^-24, fp32 unit roundoff

// The codewords whose screened score is within `w` of the running best (the candidates): appended in code
// order, pruned when full; `overflow` if more than kCap are within the window at once (the caller refines).
struct Window {
  static constexpr int kCap = 16;
  float s[kCap];
  int32_t k[kCap];
  int n = 0;
  float best = -std::numeric_limits<float>::infinity();
  float w = 0.f;
  bool overflow = false;
  float thr() const { return best - w; }
  void compact() {
    const float t = thr();
    int m = 0;
    for (int i = 0; i < n; ++i)
      if (s[i] >= t) {
        s[m] = s[i];
        k[m] = k[i];
        ++m;
      }
    n = m;
  }
  void push(float v, int32_t code) {
    if (!(v >= thr()) || v == -std::numeric_limits<float>::infinity()) return;
    if (v > best) best = v;
    if (n == kCap) compact();
    if (n == kCap) {
      overflow = true;
      return;
    }
    s[n] = v;
    k[n] = code;
    ++n;
  }
};

// The screening window 2 e of one row of one group, e >= |S_b(k) - S(k)| for every k (screen.h), from the norms
// of x's bf16 rounding residual (nr), of bf16(x) (nxb) and of x (nx), and the group's constants.
float bf16_window(int64_t DG, const float* cst, float nres, float nr, float nxb, float nx) {
  const float sl = 1.0f + 1e-5f;   // fp32 rounding of the norms' sums (any order)
  nr *= sl, nxb *= sl, nx *= sl;
  const float res = nres >= 0.f ? nres : kU32 * 1.01f * nx;   // the rounding of x - mu (fp32 inputs)
  const float max_c = cst[0], max_cr = cst[1], max_cb = cst[2], max_cn = cst[3];
  const float n = float(DG + 3);   // terms accumulated (2 ceil(DG / 2) products and -||c||^2 / 2), with a spare
  const float gam = n * kU32 / (1.f - n * kU32);
  const float flush = 1.2e-38f * (float(DG) * (1.f + max_cb) + std::sqrt(float(DG)) * nxb);   // FTZ / DAZ
  const float e = (nr + res) * max_c + nxb * max_cr + gam * (0.5f * max_cn + nxb * max_cb) + kU32 * 0.5f * max_cn +
                  2.f * flush;
  return 2.f * (e * 1.01f + 1e-30f);
}

// The candidates' distances d = -2 (x.c - ||c||^2 / 2) recomputed in fp32 (FMA, dims in order) from the fp32
// codebook rows cb32 [K][DG] and the fp32 -||c||^2 / 2 of the bf16 packing: the best two, ascending (ties: lowest
// code first). A second value of +inf means a single candidate; {+inf, +inf} means "not decided here" (window
// overflow, or a non-finite candidate distance).
#ifdef ASTRA_X86
__attribute__((target("fma")))   // std::fma inline (the fp32 bound assumes one rounding per term); else a libm call
#endif
void rerank_fp32(const float* x, const float* cb32, const uint32_t* cbg, int64_t DG, Window& w, float* vals,
                 int64_t* idx) {
  const float inf = std::numeric_limits<float>::infinity();
  vals[0] = vals[1] = inf;
  idx[0] = idx[1] = 0;
  if (w.overflow) return;
  w.compact();
  float b0 = inf, b1 = inf;
  int64_t i0 = -1, i1 = -1;
  for (int i = 0; i < w.n; ++i) {
    const int64_t k = w.k[i], P = (DG + 1) / 2;
    const float* c = cb32 + k * DG;
    float s;
    std::memcpy(&s, cbg + ((k / 16) * (P + 1) + P) * 16 + k % 16, 4);
    for (int64_t j = 0; j < DG; ++j) s = std::fma(x[j], c[j], s);
    const float d = -2.f * s;
    if (d < b0) {
      b1 = b0;
      i1 = i0;
      b0 = d;
      i0 = k;
    } else if (d < b1) {
      b1 = d;
      i1 = k;
    }
  }
  // a non-finite candidate distance (fp32 overflow): not decided here
  if (i0 < 0 || !std::isfinite(b0) || (w.n > 1 && !std::isfinite(b1))) return;
  vals[0] = b0;
  idx[0] = i0;
  vals[1] = w.n == 1 ? inf : b1;
  idx[1] = w.n == 1 ? i0 : i1;
}

#ifdef ASTRA_X86
bool have_avx512_bf16() {
  static const bool ok = have_avx512() && __builtin_cpu_supports("avx512bf16");
  return ok;
}

// One row of one group: the bf16 pair words of x (round to nearest even; dims 2p, 2p + 1 in the low, high
// half of word p, a zero pad for odd DG) and its screening window (bf16_window).
__attribute__((target("avx512f,avx512bw,avx512vl"))) float bf16_row(const float* x, int64_t DG, const float* cst,
                                                                    float nres, uint32_t* xw) {
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7FFF);
  const __m512i top = _mm512_set1_epi32(int(0xFFFF0000u));
  __m512 r2 = _mm512_setzero_ps(), b2 = r2, x2 = r2;
  uint16_t* out = reinterpret_cast<uint16_t*>(xw);
  for (int64_t j = 0; j < DG; j += 16) {
    const int m = DG - j < 16 ? int(DG - j) : 16;
    const __m512 xv = _mm512_maskz_loadu_ps(__mmask16((1u << m) - 1), x + j);
    const __m512i u = _mm512_castps_si512(xv);
    const __m512i rnd = _mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
    const __m512 xb = _mm512_castsi512_ps(_mm512_and_si512(rnd, top));
    const __m512 rv = _mm512_sub_ps(xv, xb);   // exact
    r2 = _mm512_fmadd_ps(rv, rv, r2);
    b2 = _mm512_fmadd_ps(xb, xb, b2);
    x2 = _mm512_fmadd_ps(xv, xv, x2);
    const int me = (m + 1) & ~1;
    _mm256_mask_storeu_epi16(out + j, __mmask16((1u << me) - 1), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rnd, 16)));
  }
  return bf16_window(DG, cst, nres, std::sqrt(_mm512_reduce_add_ps(r2)), std::sqrt(_mm512_reduce_add_ps(b2)),
                     std::sqrt(_mm512_reduce_add_ps(x2)));
}

// R rows against V vectors of 16 codewords: acc = -||c||^2 / 2 + sum over pairs of bf16 x . bf16 c (VDPBF16PS,
// fp32 accumulation); every score within the row's window of its running best goes to its Window.
template <int R, int V, int PC>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void small_group_bf16_avx512(
    const uint32_t* xw, int64_t ldw, const uint32_t* cbg, int64_t kb0, int64_t kb1, int64_t P_, Window* win) {
  const int64_t P = PC > 0 ? PC : P_;
  const int64_t stride = (P + 1) * 16;
  __m512 thr[R];
  for (int r = 0; r < R; ++r) thr[r] = _mm512_set1_ps(win[r].thr());
  for (int64_t kb = kb0; kb < kb1; kb += V) {
    const int nv = kb1 - kb < V ? int(kb1 - kb) : V;
    const uint32_t* c = cbg + kb * stride;
    __m512 acc[R][V];
    for (int v = 0; v < V; ++v) {
      const __m512 cn = _mm512_loadu_ps(reinterpret_cast<const float*>(c + (v < nv ? v : 0) * stride + P * 16));
      for (int r = 0; r < R; ++r) acc[r][v] = cn;
    }
    for (int64_t p = 0; p < P; ++p) {
      __m512bh cv[V];
      for (int v = 0; v < V; ++v) cv[v] = (__m512bh)_mm512_loadu_si512(c + (v < nv ? v : 0) * stride + p * 16);
      for (int r = 0; r < R; ++r) {
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(int(xw[r * ldw + p]));
        for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xb, cv[v]);
      }
    }
    // fast path: no score of the block reaches its row's threshold (masks only; the Window calls below make
    // the compiler save every accumulator, so they are left to the rare blocks that need them)
    __mmask16 hits[R][V];
    __mmask16 any = 0;
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) {
        hits[r][v] = v < nv ? _mm512_cmp_ps_mask(acc[r][v], thr[r], _CMP_GE_OQ) : __mmask16(0);
        any |= hits[r][v];
      }
    if (!any) continue;
    alignas(64) float sc[R][V][16];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) _mm512_store_ps(sc[r][v], acc[r][v]);
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < nv; ++v) {
        __mmask16 hit = hits[r][v];
        if (!hit) continue;
        if (hit & (hit - 1)) {
          // several lanes: raise the running best to the vector's maximum first, then keep only its near-best
          // lanes (without this, every lane of the first vectors seen, within reach of a -inf best, is kept)
          const float m = _mm512_reduce_max_ps(_mm512_load_ps(sc[r][v]));
          if (m > win[r].best) {
            win[r].best = m;
            hit = _mm512_cmp_ps_mask(_mm512_load_ps(sc[r][v]), _mm512_set1_ps(win[r].thr()), _CMP_GE_OQ);
          }
        }
        while (hit) {
          const int l = __builtin_ctz(hit);
          hit &= hit - 1;
          win[r].push(sc[r][v][l], int32_t((kb + v) * 16 + l));
        }
        thr[r] = _mm512_set1_ps(win[r].thr());
      }
    }
  }
}

// One group, `n` rows (at most kTile): as small_group_tile, bf16 pair words instead of fp32 x.
void small_group_bf16_tile(const uint32_t* xw, int64_t ldw, const uint32_t* cbg, int64_t Kp, int64_t P, int n,
                           Window* win) {
  constexpr int R = kRows;
  for (int64_t kb0 = 0; kb0 < Kp / 16; kb0 += kKbChunk) {
    const int64_t kb1 = kb0 + kKbChunk < Kp / 16 ? kb0 + kKbChunk : Kp / 16;
    int r = 0;
    for (; r + R <= n; r += R) {
      if (P == 12)
        small_group_bf16_avx512<R, kVecs, 12>(xw + r * ldw, ldw, cbg, kb0, kb1, P, win + r);   // DG 23, 24
      else if (P == 6)
        small_group_bf16_avx512<R, kVecs, 6>(xw + r * ldw, ldw, cbg, kb0, kb1, P, win + r);    // DG 11, 12
      else
        small_group_bf16_avx512<R, kVecs, 0>(xw + r * ldw, ldw, cbg, kb0, kb1, P, win + r);
    }
    for (; r < n; ++r) small_group_bf16_avx512<1, kVecs, 0>(xw + r * ldw, ldw, cbg, kb0, kb1, P, win + r);
  }
}
#endif

}  // namespace

const char* cpu_isa() {
#ifdef ASTRA_X86
  if (have_avx512()) return "avx512";
  if (have_avx2()) return "avx2";
#endif
  return "scalar";
}

bool small_group_bf16_available() {
#ifdef ASTRA_X86
  return have_avx512_bf16();
#else
  return false;
#endif
}

void small_group_bf16_top2(const float* x, int64_t rows, int64_t ldx, const uint32_t* cbb, const float* cb32,
                           const float* consts, const float* nres, int64_t ldn, int64_t G, int64_t K, int64_t DG,
                           int64_t ldo, float* vals, int64_t* idx) {
#ifdef ASTRA_X86
  const int64_t Kp = (K + 15) / 16 * 16, P = (DG + 1) / 2;
  uint32_t xw[kTile * 64];
  // tiles of rows outside, groups inside: the tile's rows (kTile x ldx floats) stay in L2 across the groups
  // while each group's codebook streams in order (group-outer re-read every row from memory, one miss each)
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    const int n = rows - r0 < kTile ? int(rows - r0) : kTile;
    for (int64_t g = 0; g < G; ++g) {
      const uint32_t* cbg = cbb + g * Kp * (P + 1);
      const float* cbg32 = cb32 + g * K * DG;
      Window win[kTile];
      for (int r = 0; g + 1 < G && r < n; ++r) {   // the next group's slice of the rows, while this one runs
        const char* nx = reinterpret_cast<const char*>(x + (r0 + r) * ldx + (g + 1) * DG);
        for (int64_t b = 0; b < DG * 4; b += 64) _mm_prefetch(nx + b, _MM_HINT_T0);
      }
      for (int r = 0; r < n; ++r) {
        const float* xr = x + (r0 + r) * ldx + g * DG;
        win[r].w = bf16_row(xr, DG, consts + 4 * g, nres ? nres[g * ldn + r0 + r] : -1.f, xw + r * P);
      }
      small_group_bf16_tile(xw, P, cbg, Kp, P, n, win);
      for (int r = 0; r < n; ++r) {   // fetch every candidate's codeword at once (one miss each, overlapped)
        win[r].compact();
        for (int i = 0; i < win[r].n; ++i) {
          const char* c = reinterpret_cast<const char*>(cbg32 + int64_t(win[r].k[i]) * DG);
          for (int64_t b = 0; b < DG * 4 + 63; b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
        }
      }
      for (int r = 0; r < n; ++r) {
        const int64_t o = (g * ldo + r0 + r) * 2;
        rerank_fp32(x + (r0 + r) * ldx + g * DG, cbg32, cbg, DG, win[r], vals + o, idx + o);
      }
    }
  }
#else
  (void)x, (void)rows, (void)ldx, (void)cbb, (void)cb32, (void)consts, (void)nres, (void)ldn, (void)G, (void)K,
      (void)DG, (void)ldo, (void)vals, (void)idx;
#endif
}


int64_t screen_topk(const void* S, bool bf16, int64_t rows, int64_t K, int64_t ld, const float* cn, float alpha,
                    int t, float* vals, int64_t* idx, float* smax) {
#ifdef ASTRA_X86
  if (have_avx512()) {
    if (bf16)
      scan_avx512<true>(S, rows, K, ld, cn, alpha, t, vals, idx, smax);
    else
      scan_avx512<false>(S, rows, K, ld, cn, alpha, t, vals, idx, smax);
  } else if (have_avx2()) {
    if (bf16)
      scan_avx2<true>(S, rows, K, ld, cn, alpha, t, vals, idx, smax);
    else
      scan_avx2<false>(S, rows, K, ld, cn, alpha, t, vals, idx, smax);
  } else
#endif
  if (bf16)
    scan_scalar<true>(S, rows, K, ld, cn, alpha, t, vals, idx, smax);
  else
    scan_scalar<false>(S, rows, K, ld, cn, alpha, t, vals, idx, smax);
  int64_t short_rows = 0;
  for (int64_t r = 0; r < rows; ++r) short_rows += idx[r * t + t - 1] < 0;
  return short_rows;
}

}  // namespace astra

namespace astra {

int64_t small_group_topk(const float* x, int64_t rows, int64_t ldx, const float* cbp, int64_t G, int64_t K,
                         int64_t DG, int t, int64_t ldo, float* vals, int64_t* idx) {
  const int64_t Kp = (K + 15) / 16 * 16;
  int64_t short_rows = 0;
  for (int64_t g = 0; g < G; ++g) {
    const float* cbg = cbp + g * Kp * (DG + 1);
    for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
      const int n = rows - r0 < kTile ? int(rows - r0) : kTile;
      Best best[kTile];
      for (int r = 0; r < n; ++r) best[r] = Best(t);
      small_group_tile(x + r0 * ldx + g * DG, ldx, cbg, Kp, K, DG, n, best);
      for (int r = 0; r < n; ++r) {
        const int64_t o = (g * ldo + r0 + r) * t;
        for (int j = 0; j < t; ++j) {
          vals[o + j] = best[r].v[j];
          idx[o + j] = best[r].i[j];
        }
        short_rows += best[r].i[t - 1] < 0;
      }
    }
  }
  return short_rows;
}

}  // namespace astra
