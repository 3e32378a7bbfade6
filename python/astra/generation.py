"""Greedy generation: parallel prefill, then single-rank decoding from a KV cache built from codes.

After the prefill the last rank holds every code of every layer, so it can build the full KV cache: its
own tokens' K/V in full precision, every other token's K/V from its dequantized hidden state through the
layer's own projections (+ RoPE at the token's position). It then decodes alone, with the model's own
attention implementation and no further traffic. :func:`simulate_generate` does the same from
:func:`astra.simulate`'s prefill (the last rank's view), so greedy tokens can be compared.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .errors import UnsupportedModelError


def check_generation(fam, max_new_tokens: int) -> None:
    if not fam.decoder:
        raise UnsupportedModelError(f"generation needs a decoder family, not {fam.name}")
    if fam.head != "causal_lm":
        raise UnsupportedModelError(f"generation needs an LM head ({type(fam.model).__name__} has none)")
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def build_cache(model, kv: List[Tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(kv):
        cache.update(k, v, layer)
    return cache


@torch.no_grad()
def greedy_decode(model, kv, last_logits: torch.Tensor, T: int, max_new_tokens: int,
                  attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Greedy tokens ``[B, max_new_tokens]`` from the prefill's per-layer K/V ``[B, Hkv, T, Dh]``."""
    cache = build_cache(model, kv)
    tok = last_logits.argmax(-1)
    toks = [tok]
    B = tok.shape[0]
    mask = None
    if attention_mask is not None:
        mask = attention_mask.to(torch.long)
    for i in range(max_new_tokens - 1):
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        pos = torch.full((B, 1), T + i, dtype=torch.long, device=tok.device)
        out = model(input_ids=tok[:, None], past_key_values=cache, use_cache=True, position_ids=pos,
                    attention_mask=mask)
        tok = out.logits[:, -1].argmax(-1)
        toks.append(tok)
    return torch.stack(toks, dim=1)


def simulate_generate(model, input_ids: torch.Tensor, *, world_size: int, max_new_tokens: int, codebooks=None,
                      attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Greedy tokens of :func:`astra.simulate`'s prefill (as the last rank sees it) + single-rank decoding."""
    from .models import family_of
    from .simulation import simulate_with_context

    fam = family_of(model)
    check_generation(fam, max_new_tokens)
    out, ctx = simulate_with_context(model, {"input_ids": input_ids, "attention_mask": attention_mask},
                                     world_size=world_size, codebooks=codebooks, capture=True)
    kv = [ctx.capture[l] for l in range(fam.num_layers)]
    return greedy_decode(model, kv, out.logits[:, -1], ctx.T, max_new_tokens, attention_mask)
