"""What the integrations share: short batches padded so that every rank holds a token. (A stack's own feature
keys, such as sentence-transformers' ``modality``, need no filtering: the runtime drops inputs the model's
``forward`` does not take.)"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from ..errors import UnsupportedModelError
from ..models import family_of
from ..parallel import ParallelModel


def pad_to_ranks(pm: ParallelModel, inputs: Dict[str, Any], *, pooled: bool = False) -> Tuple[Dict[str, Any], int]:
    """Right-pad a token batch shorter than the ranks need (one token each besides a replicated class token) with
    masked pad tokens, which change no other token's output (the keys are masked; causal models
    never look ahead). Returns the inputs and the original length. ``pooled``: the caller reads the head's pooled
    output, which a decoder without ``pad_token_id`` takes from the last position, a pad token here: refused."""
    ids = inputs.get("input_ids")
    if ids is None:
        return inputs, -1
    T = ids.shape[1]
    need = pm.world_size + (1 if pm.class_token else 0)
    if T >= need:
        return inputs, T
    n = need - T
    pad_id = getattr(pm.module.config, "pad_token_id", None)
    if pooled and pad_id is None and family_of(pm.module).pooling == "last_token":
        raise UnsupportedModelError(
            f"the input has {T} token(s), fewer than the {need} the {pm.world_size} ranks need, and "
            f"{type(pm.module).__name__} pools its last position, which padding would move onto a pad token (its "
            "config has no pad_token_id to tell them apart, as HF reads it): set model.config.pad_token_id, or "
            "give longer inputs")
    pad_id = pad_id or 0
    out = dict(inputs)
    out["input_ids"] = torch.cat([ids, ids.new_full((ids.shape[0], n), pad_id)], dim=1)
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    out["attention_mask"] = torch.cat([mask, mask.new_zeros(mask.shape[0], n)], dim=1)
    if inputs.get("token_type_ids") is not None:
        tt = inputs["token_type_ids"]
        out["token_type_ids"] = torch.cat([tt, tt.new_zeros(tt.shape[0], n)], dim=1)
    return out, T


def call_values(items) -> Dict[str, Any]:
    """What ranks agree on before a call over ``items`` (:meth:`astra.ParallelModel.agree`): their number and each
    one's text or tensor (other objects, such as images, by type only: their ``repr`` may hold an address)."""
    one = not isinstance(items, (list, tuple))
    items = [items] if one else list(items)

    def value(x):
        if isinstance(x, (str, int, float, bool)) or x is None:
            return x
        if isinstance(x, dict):
            return [(str(k), value(v)) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))]
        if isinstance(x, (list, tuple)):
            return [value(v) for v in x]
        return type(x).__name__

    tensors = {f"tensor {i}": x for i, x in enumerate(items) if isinstance(x, torch.Tensor)}
    return {"n": -1 if one else len(items), "items": [None if isinstance(x, torch.Tensor) else value(x)
                                                      for x in items], **tensors}


_MISSING = object()


def patch(saved: List[tuple], obj, name: str, value) -> None:
    """Set ``obj.<name> = value`` as an instance attribute, recording in ``saved`` what :func:`restore` puts back (the
    instance's own earlier attribute, such as a user's wrapper, or none)."""
    saved.append((obj, name, obj.__dict__.get(name, _MISSING)))
    setattr(obj, name, value)


def restore(saved: List[tuple]) -> None:
    """Undo :func:`patch` calls, last first."""
    for obj, name, old in reversed(saved):
        if old is _MISSING:
            obj.__dict__.pop(name, None)
        else:
            obj.__dict__[name] = old
