// Fused top-t scan over a matrix of screening scores, for the CPU VQ encoder (astra_kernels/vq.py).
#pragma once

#include <cstdint>

namespace astra {

// For each of `rows` rows of S (row stride `ld` elements; bf16 stored as uint16 if `bf16`, else
// fp32), with d[k] = cn[k] + alpha * S[k] in fp32 (cn may be null: d = alpha * S[k]), writes the `t`
// smallest d (1 <= t <= 8) in ascending order to vals[row * t ...] and their column indices to
// idx[...] (ties: lowest index first), and, if smax is not null, max_k |S[k]| to smax[row].
// Requires K >= t. One pass over S; AVX-512 when the CPU has it. Returns the number of rows left
// with fewer than t candidates (index -1: only non-finite d, i.e. fp32 overflow), for the caller to redo.
int64_t screen_topk(const void* S, bool bf16, int64_t rows, int64_t K, int64_t ld, const float* cn, float alpha,
                 int t, float* vals, int64_t* idx, float* smax);

}  // namespace astra

namespace astra {

// Fused small-group screen (grouped VQ with short groups, e.g. G = 32 of 768: 24 dims) that never
// writes the score matrix. x: `rows` rows of `ldx` fp32 (group g at x[row * ldx + g * DG ...]);
// cbp: the codebook packed per group as [G][Kp / 16][DG + 1][16] fp32, Kp = K rounded up to 16, row
// DG holding -||c||^2 / 2 (-inf for padding columns) and rows 0..DG-1 the codeword dims. For every
// row and group, S(k) = -||c_k||^2 / 2 + sum_j x_j c_kj is accumulated in fp32 (FMA) and the `t`
// (1 <= t <= 8) smallest d(k) = -2 S(k) are written ascending to vals[(g * ldo + row) * t ...] with
// their indices to idx[...] (ties: lowest index first). Returns the number of (row, group) pairs left
// with fewer than t finite candidates (index -1), for the caller to redo.
int64_t small_group_topk(const float* x, int64_t rows, int64_t ldx, const float* cbp, int64_t G, int64_t K,
                         int64_t DG, int t, int64_t ldo, float* vals, int64_t* idx);

}  // namespace astra

namespace astra {

// The vector instruction set the scans use on this CPU: "avx512" (AVX-512 F/BW/VL, ASTRA_NO_AVX512 unset),
// "avx2" (AVX2 and FMA, ASTRA_NO_AVX2 unset) or "scalar". Every level gives the same values for finite scores
// (a NaN score: AVX-512's max|S| is NaN, the others' drop it; the callers refuse non-finite inputs first).
const char* cpu_isa();

// Whether small_group_bf16_top2 runs here (x86 with AVX-512 and AVX512-BF16, ASTRA_NO_AVX512 unset).
bool small_group_bf16_available();

// The small-group screen in bf16 with an fp32 re-rank, for the same x as small_group_topk (`rows` rows of
// `ldx` fp32, centered) and:
//   cb32    the codebook, [G][K][DG] fp32 (centered, the values of small_group_topk's cbp);
//   cbb     the codebook as bf16 pairs, [G][Kp / 16][P + 1][16] uint32, P = ceil(DG / 2): word (p, l) holds
//           dims 2p (low half) and 2p + 1 (high half, 0 past DG) of codeword 16 kb + l, and word (P, l) the
//           fp32 bits of -||c||^2 / 2 (-inf for padding columns);
//   consts  [G][4] fp32: max ||c||, max ||c - bf16(c)||, max ||bf16(c)||, max ||c||^2 over each group;
//   nres    null, or [G][ldn] bounds on ||x - exact (x - mu)|| (float64 inputs); null means fp32 inputs,
//           for which the rounding of x - mu is bounded here.
// Per row and group, S_b(k) = -||c||^2 / 2 + bf16(x) . bf16(c) (VDPBF16PS, fp32 accumulation) is screened
// against a rigorous bound e >= |S_b(k) - S(k)| (S the exact score); every codeword within 2 e of the best
// screened score is a candidate (the exact argmin is one of them), recomputed in fp32 (FMA) from cb32 and the
// packed -||c||^2 / 2.
// Writes the best two fp32 distances d = -2 S (ascending, ties: lowest code first) and their codes to
// vals / idx [(g * ldo + row) * 2 ...]; a single candidate gives {d, +inf} (the argmin is decided), and
// {+inf, +inf} means undecided (more than 16 candidates, or fp32 overflow): the caller refines those.
// DG must be < 128.
void small_group_bf16_top2(const float* x, int64_t rows, int64_t ldx, const uint32_t* cbb, const float* cb32,
                           const float* consts, const float* nres, int64_t ldn, int64_t G, int64_t K, int64_t DG,
                           int64_t ldo, float* vals, int64_t* idx);

}  // namespace astra
