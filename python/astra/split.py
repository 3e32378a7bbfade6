"""The token split: which tokens each rank holds (docs/runtime.md, "Split")."""
from __future__ import annotations

from typing import List

import torch

from .errors import UnsupportedModelError
from .models import Family


def split_indices(seq_len: int, world_size: int, class_token: bool) -> List[torch.Tensor]:
    """Global indices of the non-replicated tokens of each rank (``torch.tensor_split`` order)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    start = 1 if class_token else 0
    n = seq_len - start
    if n < world_size:
        what = "tokens besides the class token" if class_token else "tokens"
        raise ValueError(f"sequence has {n} {what}; need at least one per rank (world_size={world_size})")
    return list(torch.tensor_split(torch.arange(start, seq_len), world_size))


def local_indices(seq_len: int, world_size: int, rank: int, class_token: bool) -> torch.Tensor:
    """Global indices of the tokens rank ``rank`` holds (its outputs), class token first if replicated."""
    chunk = split_indices(seq_len, world_size, class_token)[rank]
    if class_token:
        return torch.cat([torch.zeros(1, dtype=torch.long), chunk])
    return chunk


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
