"""The bases codebooks quantize in: per layer a transform ``T [D, D]`` and its inverse (see :class:`astra.Codebooks`),
a hidden state ``h`` being quantized as ``y = h @ T`` and dequantized as ``y_hat @ T^-1``.

* :func:`pca_rotation`: an orthogonal ``R`` from the principal axes of the hidden states, dealt out to the G groups
  so that their variances are balanced (the initial rotation of optimized product quantization).
* :func:`attention_metric`: the quadratic form of the error a quantized hidden state causes in the attention
  output. A non-local token reaches a receiver only as its key ``k = h W_K + b_K`` and value ``v = h W_V + b_V``
  (``[D, Dh]`` per K/V head g). An error ``e`` in ``h`` moves query head i's logit on that token by
  ``s q_i . (e W_K,g)`` (``s``: the attention's scaling; g: the K/V head i reads) and its output by
  ``p e W_V,g + p (v - o) dlogit`` (``p``: the token's attention weight, ``o``: the output). Squared and averaged
  over the queries (their second moment ``C_i``) and the tokens (the values' spread ``sigma_g^2 = E ||v - E v||^2``
  standing in for ``||v - o||^2``), the common ``p^2`` aside, the error is ``e M e^T`` with

      M = sum_i sigma_g^2 s^2 W_K,g C_i W_K,g^T + sum_i W_V,g W_V,g^T.

  With RoPE the query-key rotation varies with the positions, so ``C_i`` is averaged over it: each rotate-half
  pair's two diagonal entries are replaced by their mean and every other entry is dropped.
* :func:`attention_basis`: ``T = M^(1/2)``, so that the Euclidean k-means of the codebooks minimises that error,
  followed for G > 1 by the PCA rotation of ``h M^(1/2)``. Eigenvalues of ``M`` below :data:`METRIC_FLOOR` of the
  largest are raised to it, so ``T``'s condition number is at most ``METRIC_FLOOR ** -0.5``.

Measured on all-MiniLM-L6-v2 (bench/RESULTS.md, "The attention basis"): at G = 32 the attention basis beats the PCA
rotation; at G = 1 neither basis moves the result, so ``basis="auto"`` leaves G = 1 codebooks untransformed.
"""
from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Tuple

import torch

#: the bases :func:`astra.calibrate` takes (``basis=``)
BASES = ("auto", "attention", "pca", "none")
#: eigenvalues of the attention metric below this fraction of the largest are raised to it
METRIC_FLOOR = 1e-3
#: how far the family's K/V may be from affine in ``h`` (largest error relative to the largest entry)
AFFINE_TOL = 1e-4


def pca_rotation(x: torch.Tensor, groups: int) -> torch.Tensor:
    """An orthogonal ``R [D, D]`` for product quantization of ``x [N, D]`` in G groups: the principal axes of
    ``x``, allocated to the groups so that the products of their variances are balanced (the initial rotation
    of optimized product quantization, Ge et al. 2013, eigenvalue allocation): by decreasing variance, in rounds
    of G axes, each round's largest axis going to the group whose product is the smallest so far, its next to
    the next smallest, and so on (in rounds, so that the allocation does not depend on the data's scale; the
    groups' log products then differ by at most one round's log spread). It decorrelates the raw dimensions, which a
    product quantizer cannot exploit across groups, and no group is left with only weak axes. Within a group
    the axes come by decreasing variance; each axis's sign makes its largest entry positive (deterministic)."""
    x64 = x.detach().double().cpu()
    D = x64.shape[1]
    if D % groups:
        raise ValueError(f"hidden size {D} is not divisible by G={groups}")
    xc = x64 - x64.mean(0)
    lam, U = torch.linalg.eigh(xc.t() @ xc / max(1, xc.shape[0] - 1))
    U = U * torch.where(U.gather(0, U.abs().argmax(0, keepdim=True)) < 0, -1.0, 1.0).to(U.dtype)
    order = lam.argsort(descending=True).tolist()
    floor = float(lam.max().clamp_min(1e-300)) * 1e-12            # null axes: a tiny variance, not log(0)
    d = D // groups
    members: List[List[int]] = [[] for _ in range(groups)]
    logs = [0.0] * groups
    for r in range(d):
        poorest = sorted(range(groups), key=lambda g: (logs[g], g))
        for g, j in zip(poorest, order[r * groups:(r + 1) * groups]):
            members[g].append(j)
            logs[g] += math.log(max(float(lam[j]), floor))
    return U[:, [j for m in members for j in m]]


@contextlib.contextmanager
def _in_float32(module):
    """Within the block, ``module``'s half-precision parameters and buffers hold float32 copies; afterwards the very
    tensors they held before (no rounding back). A probe in fp16 / bf16 rounds its outputs by ~1e-3, which
    :func:`kv_maps` read as a K/V that is not affine, and the maps themselves would carry that rounding."""
    saved = [(t, t.data) for t in [*module.parameters(), *module.buffers()]
             if t.dtype in (torch.float16, torch.bfloat16)]
    for t, data in saved:
        t.data = data.float()
    try:
        yield
    finally:
        for t, data in saved:
            t.data = data


def kv_maps(fam, module, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's K/V (pre-RoPE) as affine maps of the hidden state: ``(W_K, W_V, b_K, b_V)``, float64, the
    weights ``[Hkv, D, Dh]`` and the biases ``[Hkv, Dh]``; ValueError if the family's K/V is not affine in ``h``
    (e.g. Qwen3's ``k_norm``), checked on the first rows of ``h [N, D]``. A half-precision module is probed in
    float32 (:func:`_in_float32`)."""
    D = fam.hidden_size
    with torch.no_grad(), _in_float32(module):
        p = next(module.parameters())
        eye = torch.eye(D, dtype=p.dtype, device=p.device).unsqueeze(0)
        k0, v0 = fam.kv(module, torch.zeros_like(eye[:, :1]))         # [1, Hkv, 1, Dh]: the biases
        k1, v1 = fam.kv(module, eye)
        wk, wv = (k1 - k0)[0].double(), (v1 - v0)[0].double()          # [Hkv, D, Dh]
        probe = h[:64].to(p.dtype).to(p.device)
        for name, got, w, b in zip(("K", "V"), fam.kv(module, probe.unsqueeze(0)), (wk, wv), (k0, v0)):
            want = torch.einsum("nd,gde->gne", probe.double(), w) + b[0].double()
            err = float((got[0].double() - want).abs().max()) / max(float(want.abs().max()), 1e-30)
            if err > AFFINE_TOL:
                raise ValueError(f"the {fam.name!r} family's {name} is not affine in the hidden state (relative "
                                 f"error {err:.1e}): the attention basis does not apply; use basis='pca'")
    return wk, wv, k0[0, :, 0].double(), v0[0, :, 0].double()


def folded_kv(fam, module, inverse: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The layer's K/V projection of a dequantized token taken straight from the codebooks' basis: ``(W, b)``,
    float64, ``W = T^-1 [W_K | W_V]`` ``[D, 2 Hkv Dh]`` and ``b = [b_K | b_V]``, so that ``y_hat @ W + b`` holds the
    token's K and V (pre-RoPE; head-major: ``[2, Hkv, Dh]`` per token) with one GEMM instead of the inverse
    transform's and the projection's. ValueError as :func:`kv_maps` where the K/V are not affine."""
    probe = torch.randn(8, fam.hidden_size, generator=torch.Generator().manual_seed(0))
    wk, wv, bk, bv = kv_maps(fam, module, probe)
    w = torch.stack([wk, wv]).permute(2, 0, 1, 3).reshape(fam.hidden_size, -1)      # [D, 2 * Hkv * Dh]
    return inverse.double().to(w.device) @ w, torch.stack([bk, bv]).reshape(-1)


def rope_averaged(c: torch.Tensor) -> torch.Tensor:
    """A queries' second moment ``c [..., Dh, Dh]`` averaged over RoPE's rotations (rotate-half pairs i, i + Dh/2):
    each pair's diagonal entries replaced by their mean, every other entry zero."""
    d = c.diagonal(dim1=-2, dim2=-1)
    half = d.shape[-1] // 2
    m = (d[..., :half] + d[..., half:]) / 2
    return torch.diag_embed(torch.cat([m, m], dim=-1))


def attention_metric(fam, module, h: torch.Tensor) -> torch.Tensor:
    """``M [D, D]`` (float64, symmetric, positive semi-definite) such that ``e M e^T`` is the attention output's
    squared error caused by an error ``e`` in a non-local token's hidden state, estimated on this layer's hidden
    states ``h [N, D]`` (see the module docstring)."""
    wk, wv, _, _ = kv_maps(fam, module, h)
    p = next(module.parameters())
    with torch.no_grad():
        x = h.to(p.dtype).to(p.device).unsqueeze(0)
        q = fam.q(module, x)[0].double()                                 # [H, N, Dh]
        v = fam.kv(module, x)[1][0].double()                             # [Hkv, N, Dh]
    H, N, Dh = q.shape
    Hkv = wk.shape[0]
    if H % Hkv:
        raise ValueError(f"{H} query heads do not share {Hkv} K/V heads evenly")
    scale = float(getattr(module, "scaling", Dh ** -0.5))
    c = q.transpose(1, 2) @ q / N                                        # [H, Dh, Dh]
    if fam.rope:
        c = rope_averaged(c)
    spread = (v - v.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1)      # [Hkv]
    g = torch.arange(H) // (H // Hkv)                                    # the K/V head of each query head
    weighted = (spread[g] * scale ** 2).view(H, 1, 1) * c
    M = torch.einsum("hde,hef,hgf->dg", wk[g], weighted, wk[g]) + (H // Hkv) * torch.einsum("hde,hfe->df", wv, wv)
    return (M + M.t()) / 2


def attention_basis(M: torch.Tensor, h: torch.Tensor, groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(T, T^-1)`` (float64) of the attention basis for metric ``M`` and hidden states ``h [N, D]``:
    ``T = M^(1/2)``, then for ``groups > 1`` times the :func:`pca_rotation` of ``h M^(1/2)``."""
    lam, U = torch.linalg.eigh(M.double().cpu())
    if not float(lam.max()) > 0:
        raise ValueError("the attention metric is zero: the layer's K/V do not depend on the hidden state")
    lam = lam.clamp_min(float(lam.max()) * METRIC_FLOOR)
    S, S_inv = (U * lam.sqrt()) @ U.t(), (U * lam.rsqrt()) @ U.t()
    if groups == 1:
        return S, S_inv
    R = pca_rotation(h.detach().double().cpu() @ S, groups)
    return S @ R, R.t() @ S_inv


def layer_basis(fam, layer: int, h: torch.Tensor, groups: int, basis: str, quantized: Optional[torch.Tensor] = None
                ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(T, T^-1)`` (float64) layer ``layer`` quantizes in, or None (the model's own basis), for a ``basis`` resolved
    by :func:`resolve`: the metric from the layer's hidden states ``h [N, D]``, the rotation from the vectors it
    quantizes, ``quantized [N, D]`` (default ``h``; predictive codebooks: the residuals of the prediction)."""
    x = h if quantized is None else quantized
    if basis == "none":
        return None
    if basis == "pca":
        R = pca_rotation(x, groups)
        return R, R.t()
    return attention_basis(attention_metric(fam, fam.attn_modules[layer], h), x, groups)


def attention_unavailable(fam) -> Optional[str]:
    """Why the attention basis does not apply to ``fam`` (None: it does): the adapter gives no queries, or the K/V
    are not affine in the hidden state (a key norm; probed on layer 0 with seeded random hidden states)."""
    if fam.adapter.q is None:
        return (f"basis='attention' needs the queries, which the {fam.name!r} family adapter does not give "
                "(FamilyAdapter.q); use basis='pca'")
    probe = torch.randn(8, fam.hidden_size, generator=torch.Generator().manual_seed(0))
    try:
        kv_maps(fam, fam.attn_modules[0], probe)
    except ValueError as e:
        return str(e)
    return None


def resolve(basis: str, fam, groups: int) -> str:
    """``basis`` checked, with "auto" resolved: "attention" for G > 1 where :func:`attention_unavailable` finds no
    reason against it, "pca" for other G > 1, "none" for G = 1 (full-vector k-means gains nothing measurable
    from either). An explicit "attention" that does not apply is a ValueError, before any calibration work."""
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    if basis == "auto":
        if groups == 1:
            return "none"
        return "pca" if attention_unavailable(fam) else "attention"
    why = attention_unavailable(fam) if basis == "attention" else None
    if why:
        raise ValueError(why)
    return basis
