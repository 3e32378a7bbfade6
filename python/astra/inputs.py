"""Checks of the inputs of one forward (which inputs a family accepts, the sequence geometry)."""
from __future__ import annotations

from typing import Any, Dict, Tuple

from .errors import UnsupportedModelError
from .models import Family

_ALLOWED_INPUTS = {
    "gpt2": {"input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids"},
    "llama": {"input_ids", "inputs_embeds", "attention_mask", "position_ids"},
    "bert": {"input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids"},
    "vit": {"pixel_values", "interpolate_pos_encoding"},
}


def check_inputs(fam: Family, inputs: Dict[str, Any]) -> Dict[str, Any]:
    inputs = {k: v for k, v in inputs.items() if v is not None}
    for flag in ("output_attentions", "output_hidden_states"):
        if inputs.pop(flag, False):
            raise UnsupportedModelError(f"astra does not support {flag}=True")
    if inputs.pop("use_cache", False) and not fam.decoder:
        raise UnsupportedModelError("use_cache=True is not supported here")
    if inputs.pop("return_dict", True) is False:
        raise UnsupportedModelError("astra needs return_dict=True outputs")
    bad = set(inputs) - _ALLOWED_INPUTS[fam.name]
    if bad:
        raise UnsupportedModelError(f"astra does not support the input(s) {sorted(bad)} for {fam.name}")
    return inputs


def seq_geometry(fam: Family, inputs: Dict[str, Any]) -> Tuple[int, int]:
    """(B, T) of the full sequence the inputs describe."""
    if fam.name == "vit":
        pv = inputs.get("pixel_values")
        if pv is None:
            raise ValueError("ViT needs pixel_values")
        emb = fam.base.embeddings.patch_embeddings
        if inputs.get("interpolate_pos_encoding"):
            ps = emb.patch_size
            ps = ps if isinstance(ps, (tuple, list)) else (ps, ps)
            n = (pv.shape[-2] // ps[0]) * (pv.shape[-1] // ps[1])
        else:
            n = emb.num_patches
        return pv.shape[0], n + 1
    x = inputs.get("input_ids")
    if x is None:
        x = inputs.get("inputs_embeds")
    if x is None:
        raise ValueError("need input_ids or inputs_embeds")
    return x.shape[0], x.shape[1]
