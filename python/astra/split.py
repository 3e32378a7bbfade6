"""The token split: which tokens each rank holds (docs/runtime.md, "Split")."""
from __future__ import annotations

import functools
import math
import numbers
from typing import List, Optional, Tuple

import torch

from astra_kernels.checks import is_count
from .errors import UnsupportedModelError
from .models import Family

#: the split modes: "even" (``torch.tensor_split``), "balanced" (causal work balanced, :func:`causal_costs`),
#: "auto" (balanced for causal models, even otherwise)
SPLITS = ("auto", "even", "balanced")
#: the split of astra.parallelize and astra.simulate unless told otherwise (balanced for causal models: on
#: GPT-2 shape, 12 layers, T = 1024, 2 ranks x 1 thread, interleaved, median of 5, the forward went from
#: 1.507 to 1.368 s at G = 1 and from 1.901 to 1.649 s at G = 32 against the even split; bench/runtime_ab.py)
DEFAULT_SPLIT = "auto"
#: The causal split's costs are times per multiply-add of astra's own work relative to the model's dense layers
#: (torch's default GEMM), each read off the per-layer breakdown of one rank (astra.profile; GPT-2 shape, T = 1024,
#: 2 ranks x 1 thread; bench/runtime_ab.py) on an AMD EPYC Zen 5 (AVX-512, AVX512-BF16), where torch's default
#: fp32 GEMM (MKL) runs its AVX2 code, oneDNN (astra_kernels.gemm) about 2.2x faster and the attention is
#: astra's C++ kernel (csrc/attention_cpu.cpp); bench/RESULTS.md, issue 10 on Zen 5. They are constants, not
#: measured per machine, so that every rank (whatever its CPU) and ``simulate`` compute the same split; on CPUs
#: without AVX-512 (torch's flash kernel, AVX2 scans) the split is a few per cent off balance (the grouped search
#: measured 2.0 on an AVX2 CPU).
#:
#: attention of one query over one non-local key, all heads, QK and PV: per-token keys (G > 1) ...
ATTENTION_MAC_COST = 0.8
#: ... and keys gathered from G = 1's codeword tables, count-weighted where the model has no RoPE
TABLE_ATTENTION_MAC_COST = 0.7
#: the local causal triangle (key blocks past a block of queries skipped, the diagonal ones masked)
CAUSAL_ATTENTION_MAC_COST = 0.93
#: the nearest-codeword search at G = 1: a bf16 GEMM screen, exact re-rank of the few candidates
ENCODE_MAC_COST = 0.5
#: the grouped (G > 1) search: the fused small-group scans
GROUPED_ENCODE_MAC_COST = 0.85
#: astra's own products (astra_kernels.gemm): a transformed codebook's ``D x D`` transform on the sender, the
#: folded non-local K/V projection on the receiver (its decode included)
GEMM_MAC_COST = 0.5


def split_indices(seq_len: int, world_size: int, class_token: bool,
                  costs: Optional[Tuple[float, ...]] = None) -> List[torch.Tensor]:
    """Global indices of the non-replicated tokens of each rank, contiguous and in rank order.

    ``costs=None``: the even split (``torch.tensor_split`` order). ``costs=(pair, key, encode[, local])``: the
    causal split that balances ``n * (1 - encode [last]) + pair * n * p + local * n * (n + 1) / 2 + key * p``
    (``0 <= encode < 1``, ``key <= 1 - encode``, ``local >= pair``; ``local`` defaults to ``pair``) over the ranks,
    for a rank holding ``n`` tokens after ``p`` earlier ones (per-token work, attention pairs with non-local and
    local keys, non-local keys; the last rank does not encode its tokens, which no query attends to;
    :func:`causal_costs`)."""
    if not is_count(seq_len):
        raise ValueError(f"seq_len must be an int >= 0, got {seq_len!r}")
    if not is_count(world_size, 1):
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(class_token, bool):
        raise ValueError(f"class_token must be a bool here (True: token 0 is replicated), got {class_token!r}")
    start = 1 if class_token else 0
    n = seq_len - start
    if n < world_size:
        what = "tokens besides the class token" if class_token else "tokens"
        raise ValueError(f"sequence has {n} {what}; need at least one per rank (world_size={world_size})")
    if costs is None:
        return list(torch.tensor_split(torch.arange(start, seq_len), world_size))
    bounds = _balanced_bounds(n, world_size, *costs)
    return [torch.arange(start + a, start + b) for a, b in zip(bounds[:-1], bounds[1:])]


def chunk_cost(m: int, p: int, costs: Tuple[float, ...], last: bool = False) -> float:
    """The work of a rank holding ``m`` tokens after ``p`` earlier ones, in units of one token's per-layer work,
    under the causal split's ``costs = (pair, key[, encode[, local]])`` (:func:`split_indices`; the last rank does
    not encode)."""
    pair, key, encode, local = _full(costs)
    return m * (1 - encode if last else 1) + pair * m * p + local * m * (m + 1) / 2 + key * p


def _full(costs: Tuple[float, ...]) -> Tuple[float, float, float, float]:
    """``(pair, key, encode, local)`` from a 2- to 4-tuple of finite split costs (encode 0, local = pair by
    default); ValueError for any other."""
    c = tuple(costs)
    finite = all(isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) for x in c)
    if not 2 <= len(c) <= 4 or not finite:
        raise ValueError(f"split costs must be 2 to 4 finite numbers (pair, key[, encode[, local]]), got {costs!r}")
    c = c + (0.0,) * (3 - len(c))
    return (c[0], c[1], c[2], c[3] if len(c) > 3 else c[0])


def rank_costs(seq_len: int, world_size: int, costs: Optional[Tuple[float, ...]] = None) -> List[float]:
    """Every rank's work (:func:`chunk_cost`) under the split of ``seq_len`` tokens that ``costs`` selects
    (``None``: the even split, whose work is counted in tokens)."""
    chunks = split_indices(seq_len, world_size, False, costs)
    if costs is None:
        return [float(len(c)) for c in chunks]
    return [chunk_cost(len(c), int(c[0]), costs, last=r == world_size - 1) for r, c in enumerate(chunks)]


@functools.lru_cache(maxsize=256)
def _balanced_bounds(n: int, world: int, *costs: float) -> Tuple[int, ...]:
    """Chunk boundaries ``0 = b_0 < ... < b_world = n`` minimising the largest rank cost (bisection on it). Kept per
    ``(n, world, costs)``: every forward asks again, and the bisection's ~500 costs took 1-5 ms of Python."""
    pair, key, encode, local = costs = _full(costs)
    if not (pair >= 0 and 0 <= encode < 1 and 0 <= key <= 1 - encode and local >= pair):
        # key <= 1 - encode and local >= pair: a token moved to an earlier rank never makes a later rank dearer (so
        # filling greedily is optimal)
        raise ValueError(f"split costs need pair >= 0, 0 <= encode < 1, 0 <= key <= 1 - encode and local >= pair, "
                         f"got pair={pair}, key={key}, encode={encode}, local={local}")

    def cost(m: int, p: int, last: bool = False) -> float:
        return chunk_cost(m, p, costs, last)

    def fill(target: float) -> Optional[List[int]]:
        bounds = [0]
        for r in range(world - 1):
            p, left = bounds[-1], world - 1 - r          # every later rank keeps at least one token
            lo, hi = 1, n - p - left
            if hi < 1 or cost(1, p) > target:
                return None
            while lo < hi:                               # the most tokens within the target
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if cost(mid, p) <= target else (lo, mid - 1)
            bounds.append(p + lo)
        return bounds + [n] if cost(n - bounds[-1], bounds[-1], last=True) <= target else None

    lo, hi = 0.0, cost(n, n)                           # feasible: no rank costs more
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if fill(mid) is not None else (mid, hi)
    return tuple(fill(hi))


def causal_costs(fam: Family, codebooks) -> Tuple[float, float, float, float]:
    """``(pair, key, encode, local)`` of :func:`split_indices` for a causal model, each relative to one token's
    per-layer work (the layer's weights, plus the encode), every multiply-add weighted by its constant above: one
    (query, non-local key) pair of attention (all heads, QK and PV); one non-local key's K/V projection (none with
    G = 1, whose K/V come from the codeword tables; transformed codebooks fold their inverse transform into it, see
    :meth:`astra.runtime.RuntimeBase.quantized_kv`); one token's VQ encode (with transformed codebooks plus its
    ``D x D`` transform; the last rank skips it); one (query, local key) pair of the causal triangle. Predictive
    codebooks add to both a key and an encode the ``[2D, D]`` prediction and the inverse transform (the sender
    reconstructs its own tokens), and take K/V per key instead of from the tables. Averaged over the layers: a layer
    every rank computes (:meth:`astra.models.Family.exchanged`) has no encode and projects every non-local key's K/V
    from its embedding output. A function of the model and the codebooks only, so every rank and ``simulate``
    agree."""
    layers = fam.num_layers
    coded = sum(fam.exchanged(l) for l in range(layers)) / layers
    weights = sum(q.numel() for m in fam.base.modules() if not isinstance(m, torch.nn.Embedding)
                  for q in m.parameters(recurse=False))
    D = fam.hidden_size
    predictive = codebooks is not None and codebooks.predictive
    tables = codebooks is not None and codebooks.groups == 1 and not predictive
    transform = GEMM_MAC_COST * D * D if codebooks is not None and codebooks.transformed else 0
    predict = GEMM_MAC_COST * 2 * D * D + transform if predictive else 0     # prediction + reconstruction
    search = ENCODE_MAC_COST if codebooks is None or codebooks.groups == 1 else GROUPED_ENCODE_MAC_COST
    encode = 0 if codebooks is None else coded * (search * codebooks.codebook_size * D + transform + predict)
    token = weights / layers + encode
    kv = 2 * D * fam.num_kv_heads * fam.head_dim
    key = coded * (0 if tables else (kv if codebooks is None else GEMM_MAC_COST * kv + predict)) + (1 - coded) * kv
    pair = (TABLE_ATTENTION_MAC_COST if tables else ATTENTION_MAC_COST) * 2 * D
    return pair / token, key / token, encode / token, CAUSAL_ATTENTION_MAC_COST * 2 * D / token


def key_ranks(fam: Family, chunks: List[torch.Tensor], rank: int) -> List[int]:
    """The other ranks whose tokens rank ``rank``'s queries attend to, given every rank's chunk of
    :func:`split_indices`: all of them, or for a causal model those holding a token at or before its last one
    (with contiguous chunks in rank order: the earlier ranks; nobody attends to the last rank's tokens)."""
    others = [s for s in range(len(chunks)) if s != rank]
    if fam.causal:
        top = int(chunks[rank][-1])
        others = [s for s in others if int(chunks[s][0]) <= top]
    return others


def senders(fam: Family, chunks: List[torch.Tensor]) -> List[bool]:
    """Per rank: some other rank attends to its tokens, so it encodes and sends them (a causal model's last rank does
    not: nobody attends to its tokens)."""
    attends = [key_ranks(fam, chunks, r) for r in range(len(chunks))]
    return [any(s in a for a in attends) for s in range(len(chunks))]


def resolve_split(fam: Family, codebooks, split: str) -> Optional[Tuple[float, ...]]:
    """The ``costs`` argument of :func:`split_indices` for split mode ``split`` (None: the even split)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "even" or (split == "auto" and not fam.causal):
        return None
    if not fam.causal:
        raise UnsupportedModelError(f"split='balanced' balances causal attention; {fam.name} is bidirectional")
    return causal_costs(fam, codebooks)


def local_indices(seq_len: int, world_size: int, rank: int, class_token: bool,
                  costs: Optional[Tuple[float, ...]] = None) -> torch.Tensor:
    """Global indices of the tokens rank ``rank`` holds (its outputs), class token first if replicated."""
    if not is_count(rank) or (is_count(world_size, 1) and rank >= world_size):
        raise ValueError(f"rank must be an int in 0..world_size - 1, got {rank!r} (world_size={world_size!r})")
    return with_class_token(split_indices(seq_len, world_size, class_token, costs)[rank], class_token)


def with_class_token(chunk: torch.Tensor, class_token: bool) -> torch.Tensor:
    """A rank's tokens from its chunk of :func:`split_indices`: the replicated class token (0) first if any."""
    return torch.cat([chunk.new_zeros(1), chunk]) if class_token else chunk


def resolve_class_token(fam: Family, class_token) -> bool:
    if class_token in ("auto", None):
        return fam.class_token_default
    if class_token in (True, "distributed"):
        if not fam.class_token_allowed:
            raise UnsupportedModelError(f"distributed class tokens are not available for {fam.name}")
        return True
    if class_token in (False, "none", "single"):
        if fam.class_token_required:
            # ViT's class token is replicated by definition of the split (it has no owner otherwise)
            raise UnsupportedModelError(f"{fam.name} always uses distributed class tokens "
                                        "(class_token='distributed')")
        return False
    raise ValueError(f"class_token must be 'auto', 'distributed' or 'none', got {class_token!r}")
