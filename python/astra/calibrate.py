"""k-means calibration of per-layer codebooks from the hidden states of sample inputs.

For every layer the hidden states ``h`` entering the attention's Q/K/V projection (the vectors ASTRA
quantizes) are collected from full-precision forwards of the unmodified model over the samples (padding
tokens excluded), cut into G groups, and clustered with seeded Lloyd k-means (k-means++ seeding on a
sub-sample). The paper trains codebooks jointly with fine-tuning; this is the cheap post-hoc variant.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Union

import torch

from .codebooks import Codebooks
from .models import family_of


@torch.no_grad()
def collect_hidden_states(model, samples: Iterable[Dict[str, Any]], *, max_tokens: Optional[int] = None
                          ) -> List[torch.Tensor]:
    """Per layer, the ``[N, D]`` hidden states entering the attention projections (non-padding tokens)."""
    fam = family_of(model)
    per_layer: List[List[torch.Tensor]] = [[] for _ in range(fam.num_layers)]
    current_mask: List[Optional[torch.Tensor]] = [None]

    def hook_for(layer):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            m = current_mask[0]
            x = h[m] if (m is not None and m.shape == h.shape[:2]) else h.reshape(-1, h.shape[-1])
            per_layer[layer].append(x.detach().float().cpu())
        return hook

    handles = [m.register_forward_pre_hook(hook_for(l), with_kwargs=True) for l, m in enumerate(fam.attn_modules)]
    try:
        n = 0
        for s in samples:
            m = s.get("attention_mask")
            current_mask[0] = m.bool() if m is not None else None
            model(**s)
            n += per_layer[0][-1].shape[0]
            if max_tokens is not None and n >= max_tokens:
                break
    finally:
        for h in handles:
            h.remove()
    out = [torch.cat(xs) for xs in per_layer]
    if max_tokens is not None:
        out = [x[:max_tokens] for x in out]
    return out


def _assign(xs: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Nearest codeword per group for the Lloyd step: plain fp32 ``||c||^2 - 2 x.c`` argmin, ``[N, G]``.

    Calibration only needs a good assignment, not the exact one, so it skips astra_kernels.vq_encode's
    exactness certificate (which re-ranks near-ties in float64 and gets slow on the near-tied clusters
    k-means produces). Encoding on the wire always goes through astra_kernels.vq_encode."""
    G, N, d = xs.shape
    K = C.shape[1]
    cn = (C * C).sum(-1).unsqueeze(1)                                    # [G, 1, K]
    step = max(1, (1 << 24) // max(1, G * K))
    out = []
    for i in range(0, N, step):
        s = torch.baddbmm(cn, xs[:, i: i + step], C.transpose(1, 2), alpha=-2.0)
        out.append(s.argmin(-1))
    return torch.cat(out, dim=1).t()


def kmeans(x: torch.Tensor, groups: int, k: int, *, iters: int = 15, seed: int = 0,
           init_samples: int = 4096) -> torch.Tensor:
    """Grouped k-means: ``x [N, D]`` -> codebook ``[G, K, D/G]``."""
    N, D = x.shape
    if D % groups:
        raise ValueError(f"hidden size {D} is not divisible by G={groups}")
    if N == 0:
        raise ValueError("no calibration vectors")
    d = D // groups
    g = torch.Generator().manual_seed(seed)
    xs = x.reshape(N, groups, d).transpose(0, 1).contiguous()       # [G, N, d]
    if k <= 256:
        # k-means++ seeding on a sub-sample (all groups at once)
        sub = xs[:, torch.randperm(N, generator=g)[: min(N, init_samples)]]
        M = sub.shape[1]
        C = torch.empty(groups, k, d)
        first = torch.randint(0, M, (groups,), generator=g)
        C[:, 0] = sub[torch.arange(groups), first]
        dmin = ((sub - C[:, :1]) ** 2).sum(-1)                          # [G, M]
        for j in range(1, k):
            w = dmin.clamp_min(0) + 1e-12
            idx = torch.multinomial(w, 1, generator=g)[:, 0]
            C[:, j] = sub[torch.arange(groups), idx]
            dmin = torch.minimum(dmin, ((sub - C[:, j: j + 1]) ** 2).sum(-1))
    else:
        # random *distinct* data points per group (duplicated codewords would only create exact ties);
        # with fewer distinct points than codewords, the rest are jittered copies
        C = torch.empty(groups, k, d)
        for gi in range(groups):
            u = torch.unique(xs[gi], dim=0)
            u = u[torch.randperm(u.shape[0], generator=g)]
            if u.shape[0] >= k:
                C[gi] = u[:k]
            else:
                extra = u[torch.randint(0, u.shape[0], (k - u.shape[0],), generator=g)]
                scale = u.std(0, keepdim=True).clamp_min(1e-6) * 1e-3
                C[gi] = torch.cat([u, extra + torch.randn(extra.shape, generator=g) * scale])
    for _ in range(iters):
        codes = _assign(xs, C)                                          # [N, G]
        flat = (codes.t() + torch.arange(groups).unsqueeze(1) * k).reshape(-1)   # [G*N] into [G*K]
        sums = torch.zeros(groups * k, d).index_add_(0, flat, xs.reshape(-1, d)).view(groups, k, d)
        counts = torch.zeros(groups * k).index_add_(0, flat, torch.ones(groups * N)).view(groups, k)
        empty = counts == 0
        newC = sums / counts.clamp_min(1).unsqueeze(-1)
        if empty.any():  # re-seed empty clusters with random data points
            r = torch.randint(0, N, (int(empty.sum()),), generator=g)
            gi = empty.nonzero()[:, 0]
            newC[empty] = xs[gi, r]
        C = newC
    return C


def calibrate(model, samples: Union[Dict[str, Any], Iterable[Dict[str, Any]]], *, groups: int = 1,
              codebook_size: int = 1024, iters: int = 15, seed: int = 0, max_tokens: Optional[int] = 20000
              ) -> Codebooks:
    """Codebooks for ``model`` by k-means over the hidden states of ``samples`` (input dicts for
    ``model(**sample)``; a single dict is one sample). Cheap and deterministic for a given seed."""
    fam = family_of(model)
    if isinstance(samples, dict):
        samples = [samples]
    was_training = model.training
    model.eval()
    try:
        hs = collect_hidden_states(model, samples, max_tokens=max_tokens)
    finally:
        model.train(was_training)
    tensors = [kmeans(h, groups, codebook_size, iters=iters, seed=seed + l) for l, h in enumerate(hs)]
    dtype = next(model.parameters()).dtype
    return Codebooks([t.to(dtype) for t in tensors], model_type=fam.name, hidden_size=fam.hidden_size)
