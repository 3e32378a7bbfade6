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
