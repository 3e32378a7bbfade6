// See attention_cpu.h. Layout: a block of up to 64 queries is packed transposed (Q^T [D][64], pre-scaled by
// scale * log2(e)), so that every vector holds 16 queries: a score tile S^T[key][query] is D FMAs of a
// broadcast key element into the query vectors, the softmax's max and sum over keys are elementwise over
// vectors, and the output accumulates transposed (O^T [D][64]) from broadcast value elements. K and V are read
// in place (broadcast loads from their rows), never packed. exp is 2^x with a degree-7 polynomial on
// [-1/2, 1/2] and vscalefps (relative error ~1e-8, below fp32's rounding).
#include "attention_cpu.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
// GCC 12's _mm512_max_ps passes an undefined vector as the unused merge source: a false -Wmaybe-uninitialized
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define ASTRA_X86 1
#endif

namespace astra {
namespace {

constexpr int kBM = 64;     // queries per block (4 vectors of 16)
constexpr int kBN = 32;     // keys per block
constexpr int kJT = 6;      // keys per score tile (6 x 4 accumulators)
constexpr int kDT = 6;      // head dims per output tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Work {
  std::vector<float> qt, st, ot;
  explicit Work(int64_t D) : qt(D * kBM), st(kBN * kBM), ot(D * kBM) {}
};

#ifdef ASTRA_X86
#define ASTRA_AVX512 __attribute__((target("avx512f")))

// 2^x for x <= 0 (and -inf): 0 below -126; NaN stays NaN (a score that overflowed must not read as no key).
ASTRA_AVX512 inline __m512 exp2_ps(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-126.f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ);   // x >= -126, or NaN
  x = _mm512_max_ps(lo, x);                                         // vmaxps gives its second operand for a NaN
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);     // [-1/2, 1/2]
  __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

// S^T[j][queries] = sum_d K[n0 + j][d] * Q^T[d][queries] for keys j0 .. j0 + JT - 1 of the block.
template <int NV, int JT>
ASTRA_AVX512 inline void score_tile(const float* qt, const float* kb, int64_t skn, int64_t D, int64_t j0, float* st) {
  constexpr int W = 16 * NV;
  __m512 acc[JT][NV];
  for (int t = 0; t < JT; ++t)
    for (int u = 0; u < NV; ++u) acc[t][u] = _mm512_setzero_ps();
  const float* kr[JT];
  for (int t = 0; t < JT; ++t) kr[t] = kb + (j0 + t) * skn;
  for (int64_t d = 0; d < D; ++d) {
    __m512 qv[NV];
    for (int u = 0; u < NV; ++u) qv[u] = _mm512_loadu_ps(qt + d * W + 16 * u);
    for (int t = 0; t < JT; ++t) {
      const __m512 kv = _mm512_set1_ps(kr[t][d]);
      for (int u = 0; u < NV; ++u) acc[t][u] = _mm512_fmadd_ps(kv, qv[u], acc[t][u]);
    }
  }
  for (int t = 0; t < JT; ++t)
    for (int u = 0; u < NV; ++u) _mm512_storeu_ps(st + (j0 + t) * W + 16 * u, acc[t][u]);
}

// O^T[d0 .. d0 + DT - 1][queries] += sum_j V[n0 + j][d] * P^T[j][queries] over the block's bn keys.
template <int NV, int DT>
ASTRA_AVX512 inline void output_tile(const float* st, const float* vb, int64_t svn, int64_t bn, int64_t d0, float* ot) {
  constexpr int W = 16 * NV;
  __m512 acc[DT][NV];
  for (int t = 0; t < DT; ++t)
    for (int u = 0; u < NV; ++u) acc[t][u] = _mm512_loadu_ps(ot + (d0 + t) * W + 16 * u);
  for (int64_t j = 0; j < bn; ++j) {
    __m512 pv[NV];
    for (int u = 0; u < NV; ++u) pv[u] = _mm512_loadu_ps(st + j * W + 16 * u);
    const float* vr = vb + j * svn + d0;
    for (int t = 0; t < DT; ++t) {
      const __m512 vv = _mm512_set1_ps(vr[t]);
      for (int u = 0; u < NV; ++u) acc[t][u] = _mm512_fmadd_ps(vv, pv[u], acc[t][u]);
    }
  }
  for (int t = 0; t < DT; ++t)
    for (int u = 0; u < NV; ++u) _mm512_storeu_ps(ot + (d0 + t) * W + 16 * u, acc[t][u]);
}

// The running softmax of one block of queries (NV vectors of 16): max m and sum l in log2 units.
template <int NV>
struct Softmax {
  __m512 m[NV], l[NV];
  __m512i qp[NV];           // query positions (INT32_MIN in lanes past the last query: they see no key)
  int32_t qmin = INT32_MAX, qmax = INT32_MIN;
};

// Bias and causal mask on the block's scores, then the online softmax update: the scores become
// probabilities (relative to the new max), O^T is rescaled.
template <int NV>
ASTRA_AVX512 void softmax_block(const AttentionArgs& a, const float* bias, const int32_t* kpos, int64_t n0,
                                int64_t bn, bool masked, Softmax<NV>& sm, float* st, float* ot) {
  constexpr int W = 16 * NV;
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 bm[NV];
  for (int u = 0; u < NV; ++u) bm[u] = ninf;
  for (int64_t j = 0; j < bn; ++j) {
    const __m512 bj = _mm512_set1_ps(bias ? bias[n0 + j] * kLog2e : 0.f);
    const __m512i kp = _mm512_set1_epi32(masked ? kpos[n0 + j] : 0);
    for (int u = 0; u < NV; ++u) {
      __m512 s = _mm512_add_ps(_mm512_loadu_ps(st + j * W + 16 * u), bj);
      if (masked) s = _mm512_mask_mov_ps(s, _mm512_cmpgt_epi32_mask(kp, sm.qp[u]), ninf);
      _mm512_storeu_ps(st + j * W + 16 * u, s);
      bm[u] = _mm512_max_ps(bm[u], s);
    }
  }
  for (int u = 0; u < NV; ++u) {
    const __m512 mn = _mm512_max_ps(sm.m[u], bm[u]);
    const __m512 mu = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(mn, ninf, _CMP_NEQ_OQ), mn);   // -inf -> 0
    const __m512 alpha = exp2_ps(_mm512_sub_ps(sm.m[u], mu));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < bn; ++j) {
      const __m512 p = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(st + j * W + 16 * u), mu));
      _mm512_storeu_ps(st + j * W + 16 * u, p);
      sum = _mm512_add_ps(sum, p);
    }
    sm.l[u] = _mm512_fmadd_ps(sm.l[u], alpha, sum);
    sm.m[u] = mn;
    for (int64_t d = 0; d < a.D; ++d)
      _mm512_storeu_ps(ot + d * W + 16 * u, _mm512_mul_ps(_mm512_loadu_ps(ot + d * W + 16 * u), alpha));
  }
}

// Q^T of the block's `rows` queries, scaled by scale * log2(e), zero past them; positions and their range.
template <int NV>
ASTRA_AVX512 void load_queries(const AttentionArgs& a, const float* qb, const int32_t* qpos, int64_t rows, float* qt,
                               Softmax<NV>& sm) {
  constexpr int W = 16 * NV;
  const __m512 c = _mm512_set1_ps(a.scale * kLog2e);
  for (int u = 0; u < NV; ++u) {
    const int64_t left = rows - 16 * u;
    const __mmask16 valid = left >= 16 ? __mmask16(0xFFFF) : left > 0 ? __mmask16((1u << left) - 1) : __mmask16(0);
    const __m512i off = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(int32_t(a.sqt)));
    const float* base = qb + 16 * u * a.sqt;
    for (int64_t d = 0; d < a.D; ++d) {
      const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, off, base + d, 4);
      _mm512_storeu_ps(qt + d * W + 16 * u, _mm512_mul_ps(g, c));
    }
    sm.qp[u] = qpos ? _mm512_mask_loadu_epi32(_mm512_set1_epi32(INT32_MIN), valid, qpos + 16 * u)
                    : _mm512_set1_epi32(INT32_MAX);
    sm.m[u] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    sm.l[u] = _mm512_setzero_ps();
  }
  if (qpos)
    for (int64_t i = 0; i < rows; ++i) {
      sm.qmin = std::min(sm.qmin, qpos[i]);
      sm.qmax = std::max(sm.qmax, qpos[i]);
    }
}

// out and lse of the block's queries from O^T and the softmax state.
template <int NV>
ASTRA_AVX512 void store_block(const AttentionArgs& a, const Softmax<NV>& sm, const float* ot, int64_t rows,
                              float* ob, float* lb) {
  constexpr int W = 16 * NV;
  alignas(64) float m[W], l[W];
  for (int u = 0; u < NV; ++u) {
    _mm512_store_ps(m + 16 * u, sm.m[u]);
    _mm512_store_ps(l + 16 * u, sm.l[u]);
  }
  for (int64_t i = 0; i < rows; ++i) {
    float* orow = ob + i * a.sot;
    if (l[i] == 0.f) {  // no key seen; a NaN sum (scores overflowed) stays NaN, never this empty-row marker
      for (int64_t d = 0; d < a.D; ++d) orow[d] = 0.f;
      lb[i] = -std::numeric_limits<float>::infinity();
      continue;
    }
    const float inv = 1.f / l[i];
    for (int64_t d = 0; d < a.D; ++d) orow[d] = ot[d * W + i] * inv;
    lb[i] = m[i] * kLn2 + std::log(l[i]);
  }
}

template <int NV>
ASTRA_AVX512 void run_block(const AttentionArgs& a, int64_t b, int64_t h, int64_t m0, int64_t rows, Work& w) {
  constexpr int W = 16 * NV;
  const int64_t kh = h / (a.Hq / a.Hkv), D = a.D;
  const float* kb = a.k + b * a.skb + kh * a.skh;
  const float* vb = a.v + b * a.svb + kh * a.svh;
  const float* bias = a.bias ? a.bias + b * a.sbb : nullptr;
  const int32_t* kpos = a.kpos ? a.kpos + b * a.N : nullptr;
  Softmax<NV> sm;
  load_queries<NV>(a, a.q + b * a.sqb + h * a.sqh + m0 * a.sqt, a.qpos ? a.qpos + b * a.Tq + m0 : nullptr, rows,
                   w.qt.data(), sm);
  float* st = w.st.data();
  float* ot = w.ot.data();
  std::fill(ot, ot + D * W, 0.f);
  int64_t n_end = a.N;
  if (kpos && a.keys_sorted) n_end = std::upper_bound(kpos, kpos + a.N, sm.qmax) - kpos;
  for (int64_t n0 = 0; n0 < n_end; n0 += kBN) {
    const int64_t bn = std::min<int64_t>(kBN, n_end - n0);
    const bool masked = kpos && !(a.keys_sorted && kpos[n0 + bn - 1] <= sm.qmin);
    const float* kn = kb + n0 * a.skn;
    int64_t j = 0;
    for (; j + kJT <= bn; j += kJT) score_tile<NV, kJT>(w.qt.data(), kn, a.skn, D, j, st);
    for (; j < bn; ++j) score_tile<NV, 1>(w.qt.data(), kn, a.skn, D, j, st);
    softmax_block<NV>(a, bias, kpos, n0, bn, masked, sm, st, ot);
    const float* vn = vb + n0 * a.svn;
    int64_t d = 0;
    for (; d + kDT <= D; d += kDT) output_tile<NV, kDT>(st, vn, a.svn, bn, d, ot);
    for (; d < D; ++d) output_tile<NV, 1>(st, vn, a.svn, bn, d, ot);
  }
  store_block<NV>(a, sm, ot, rows, a.out + b * a.sob + h * a.soh + m0 * a.sot, a.lse + (b * a.Hq + h) * a.Tq + m0);
}

void run_task(const AttentionArgs& a, int64_t task, Work& w) {
  const int64_t nqb = (a.Tq + kBM - 1) / kBM;
  const int64_t qb = task % nqb, bh = task / nqb;
  const int64_t m0 = qb * kBM, rows = std::min<int64_t>(kBM, a.Tq - m0);
  const int64_t b = bh / a.Hq, h = bh % a.Hq;
  switch ((rows + 15) / 16) {
    case 1: run_block<1>(a, b, h, m0, rows, w); break;
    case 2: run_block<2>(a, b, h, m0, rows, w); break;
    case 3: run_block<3>(a, b, h, m0, rows, w); break;
    default: run_block<4>(a, b, h, m0, rows, w); break;
  }
}

bool have_avx512f() {
  static const bool ok = __builtin_cpu_supports("avx512f") && std::getenv("ASTRA_NO_AVX512") == nullptr;
  return ok;
}
#endif

}  // namespace

bool attention_available() {
#ifdef ASTRA_X86
  return have_avx512f();
#else
  return false;
#endif
}

void attention_f32(const AttentionArgs& a) {
#ifdef ASTRA_X86
  const int64_t tasks = a.B * a.Hq * ((a.Tq + kBM - 1) / kBM);
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(a.threads, tasks)));
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    Work w(a.D);
    for (int64_t t = next++; t < tasks; t = next++) run_task(a, t, w);
  };
  std::vector<std::thread> pool;
  for (int i = 1; i < threads; ++i) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
#else
  (void)a;
#endif
}

}  // namespace astra
