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
        while (hit) {
          const int j = __builtin_ctz(hit);
          hit &= hit - 1;
          best.push(tmp[j], k0 + j);
        }
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

// ASTRA_NO_AVX512 (any value, read once) forces the scalar scans: the fallback's test on AVX-512 machines.
bool have_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && std::getenv("ASTRA_NO_AVX512") == nullptr;
  return ok;
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
          while (hit) {
            const int l = __builtin_ctz(hit);
            hit &= hit - 1;
            best[r].push(tmp[l], (kb + v) * 16 + l);
          }
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

}  // namespace

int64_t screen_topk(const void* S, bool bf16, int64_t rows, int64_t K, int64_t ld, const float* cn, float alpha,
                    int t, float* vals, int64_t* idx, float* smax) {
#ifdef ASTRA_X86
  if (have_avx512()) {
    if (bf16)
      scan_avx512<true>(S, rows, K, ld, cn, alpha, t, vals, idx, smax);
    else
      scan_avx512<false>(S, rows, K, ld, cn, alpha, t, vals, idx, smax);
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
