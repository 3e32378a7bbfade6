// Flash-style fp32 attention on the CPU (AVX-512), for astra_kernels/attention.py's CPU path.
#pragma once

#include <cstdint>

namespace astra {

// One attention over one key segment. Every tensor is fp32 with its last dimension contiguous; the other
// strides are in elements:
//   q    [B, Hq, Tq, D]   strides sqb, sqh, sqt
//   k, v [B, Hkv, N, D]   strides skb, skh, skn / svb, svh, svn   (Hq a multiple of Hkv: GQA)
//   bias null, or [B, N] (row stride sbb): added to every score of key n (padding -inf, log(count) ...)
//   qpos, kpos null (no causal mask), or [B, Tq] / [B, N] int32 contiguous: key n is seen by query t only
//        if kpos[n] <= qpos[t]; keys_sorted: every kpos row is nondecreasing (blocks of keys past a block of
//        queries' last position are skipped)
//   out  [B, Hq, Tq, D]   strides sob, soh, sot
//   lse  [B, Hq, Tq] contiguous: log-sum-exp of the scaled scores (natural log)
// out = softmax(scale * q k^T + bias + mask) v per (batch, head, query); a query that sees no key gets out = 0
// and lse = -inf; a query whose scores overflow fp32 (an inf or NaN score) gets NaN in out and lse. Computed in
// blocks of 64 queries x 32 keys with an online softmax (fp32 accumulation), on `threads` threads (1: the
// caller's).
// The largest query token stride (in floats) the kernel reads in place: it gathers 16 queries at a time with
// int32 offsets lane * stride. A larger stride needs a contiguous copy (the Python layer makes one).
constexpr int64_t kMaxQueryStride = INT32_MAX / 16;

struct AttentionArgs {
  const float* q;
  int64_t sqb, sqh, sqt;
  const float* k;
  int64_t skb, skh, skn;
  const float* v;
  int64_t svb, svh, svn;
  const float* bias;
  int64_t sbb;
  const int32_t* qpos;
  const int32_t* kpos;
  bool keys_sorted;
  int64_t B, Hq, Hkv, Tq, N, D;
  float scale;
  float* out;
  int64_t sob, soh, sot;
  float* lse;
  int threads;
};

// Whether attention_f32 runs on this CPU (x86 with AVX-512 F, ASTRA_NO_AVX512 unset).
bool attention_available();

// The attention described above. The caller checks shapes, strides and availability.
void attention_f32(const AttentionArgs& a);

}  // namespace astra
