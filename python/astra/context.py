"""The state of one forward shared by the per-layer hooks (:class:`Ctx`) and the per-layer statistics."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from .inputs import seq_geometry
from .models import Family
from .split import split_indices


@dataclass
class Ctx:
    T: int                                  # tokens in the (original) sequence
    B: int
    cls: bool
    chunks: List[torch.Tensor]              # global indices of each rank's non-replicated tokens
    pos_ids: Optional[torch.Tensor]         # [B or 1, T] position ids (decoders)
    default_pos: bool                       # pos_ids == arange(T)
    mask: Optional[torch.Tensor]            # [B, T] bool key padding mask (True = attend)
    capture: Optional[Dict[int, Tuple[torch.Tensor, torch.Tensor]]] = None   # layer -> (K, V) of last rank's view
    logits_kept: Optional[torch.Tensor] = None   # the local positions whose LM-head logits the forward computed
    state: Dict[int, Any] = field(default_factory=dict)


@dataclass
class LayerStats:
    layer: int
    bytes_sent: int = 0          # this rank's frame (codec frame bytes, or raw bytes in full precision)
    bytes_received: int = 0      # the other ranks' frames
    bytes_on_wire: int = 0       # what the all-gather moved out of this rank (frames are padded to the largest)
    wait_s: float = 0.0          # time blocked waiting for the all-gather
    tokens_sent: int = 0
    local_fallback: bool = False  # the forward ran on this rank alone after a peer failure (on_peer_failure="local")


def key_masks(ctx: Ctx, q_idx: torch.Tensor, r_idx: torch.Tensor):
    """Padding masks of the queries ``q_idx`` and of the non-local keys ``r_idx`` (None without a mask)."""
    if ctx.mask is None:
        return None, None
    return ctx.mask[:, q_idx], ctx.mask[:, r_idx]


def make_ctx(fam: Family, inputs: Dict[str, Any], world_size: int, cls: bool, costs=None) -> Ctx:
    B, T = seq_geometry(fam, inputs)
    dev = next(fam.model.parameters()).device
    chunks = [c.to(dev) for c in split_indices(T, world_size, cls, costs)]
    mask = inputs.get("attention_mask")
    if mask is not None:
        if mask.shape != (B, T):
            raise ValueError(f"attention_mask must be [B, T] = [{B}, {T}], got {tuple(mask.shape)}")
        mask = mask.to(torch.bool)
    pos, default_pos = position_ids(fam, inputs, T, dev)
    return Ctx(T=T, B=B, cls=cls, chunks=chunks, pos_ids=pos, default_pos=default_pos, mask=mask)


def position_ids(fam: Family, inputs: Dict[str, Any], T: int, device) -> Tuple[Optional[torch.Tensor], bool]:
    """A decoder's global position ids ``[B or 1, T]`` and whether they are ``arange(T)`` (encoders: ``(None,
    True)``; their embeddings compute their own over the whole sequence): the given ``position_ids``, else what the
    model's forward derives from the inputs (:meth:`Family.positions`: the adapter's, else ``arange(T)``)."""
    if not fam.decoder:
        return None, True
    # HF's forward: arange(T) unless position_ids are given (generate gives them from the attention mask), or, in
    # a model that derives them from the inputs (OPT: from the attention mask), the adapter's `positions`
    arange = torch.arange(T, device=device).unsqueeze(0)
    pos = inputs.get("position_ids")
    if pos is None and fam.derives_positions:
        pos = fam.positions(inputs, seq_geometry(fam, inputs)[0], T)
    if pos is None:
        return arange, True
    pos = pos.to(device).unsqueeze(0) if pos.ndim == 1 else pos.to(device)
    return pos, bool((pos == arange).all())
