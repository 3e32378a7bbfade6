"""Checks of the inputs of one forward: which inputs a family accepts, their kinds, shapes and ranges, and the
sequence geometry. Every rank holds the full inputs, so every rank reaches the same verdict."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Dict, Optional, Tuple

import torch

from .errors import InvalidInputError, UnsupportedModelError
from .models import Family
from .split import split_indices

# flags HF models take through **kwargs: True changes what the model returns (refused), False is the default
REFUSED_FLAGS = ("output_attentions", "output_hidden_states")
# inputs that change what is computed, refused by name whatever the model's forward signature calls them (the
# cache is ``cache`` there since transformers 5, yet ``past_key_values`` still reaches it through **kwargs: a
# signature-based check dropped it, and astra computed without the cache the model would have used)
REFUSED_INPUTS = ("past_key_values", "cache", "cache_position", "labels", "head_mask", "encoder_hidden_states",
                  "encoder_attention_mask", "logits_to_keep", "num_logits_to_keep")


def check_inputs(fam: Family, inputs: Dict[str, Any]) -> Dict[str, Any]:
    """The inputs astra passes on. Dropped: None values, the flags above when False, ``use_cache`` (decoders: no
    cache in a parallel forward; encoders ignore it, as the unmodified model does) and keys the model's ``forward``
    does not name (e.g. sentence-transformers' ``modality``), which the unmodified model ignores too. Refused: the
    flags above when True, ``return_dict=False``, :data:`REFUSED_INPUTS` by name, and inputs the model's ``forward``
    names but astra does not take (they change what is computed)."""
    inputs = {k: v for k, v in inputs.items() if v is not None}
    _check_config_flags(fam)
    for flag in REFUSED_FLAGS:
        if inputs.pop(flag, False):
            raise UnsupportedModelError(f"astra does not support {flag}=True")
    inputs.pop("use_cache", None)       # decoders: no cache in a parallel forward; encoders ignore it, as HF's do
    if inputs.pop("return_dict", True) is False:
        raise UnsupportedModelError("astra needs return_dict=True outputs")
    refused = sorted(k for k in inputs if k in REFUSED_INPUTS and k not in fam.inputs)
    if refused:
        raise UnsupportedModelError(f"astra does not support the input(s) {refused} for {type(fam.model).__name__} "
                                    f"(they change what is computed); it takes {sorted(fam.inputs)}")
    inputs = {k: v for k, v in inputs.items() if k in fam.forward_params or k in fam.inputs}
    bad = set(inputs) - fam.inputs
    if bad:
        raise UnsupportedModelError(f"astra does not support the input(s) {sorted(bad)} for "
                                    f"{type(fam.model).__name__}; it takes {sorted(fam.inputs)}")
    return inputs


def _check_config_flags(fam: Family) -> None:
    """The flags above set on the model's configuration, which the model reads where a call does not give them (the
    call's own flags are dropped, so a call's False does not override them either)."""
    cfg = fam.model.config
    for flag in REFUSED_FLAGS:
        if getattr(cfg, flag, False):
            raise UnsupportedModelError(f"astra does not support {flag}=True, which the model's config sets: set "
                                        f"config.{flag} = False")
    if getattr(cfg, "return_dict", True) is False:
        raise UnsupportedModelError("astra needs return_dict=True outputs, and the model's config sets "
                                    "return_dict=False: set config.return_dict = True")


def seq_geometry(fam: Family, inputs: Dict[str, Any]) -> Tuple[int, int]:
    """(B, T) of the full sequence the inputs describe."""
    if fam.image:
        pv = inputs.get("pixel_values")
        if pv is None:
            raise ValueError(f"{fam.name} needs pixel_values")
        return pv.shape[0], fam.image_tokens(inputs)
    x = inputs.get("input_ids")
    if x is None:
        x = inputs.get("inputs_embeds")
    if x is None:
        raise ValueError("need input_ids or inputs_embeds")
    return x.shape[0], x.shape[1]


def check_dense(key: str, x: torch.Tensor) -> None:
    """Refuse a tensor whose bytes astra can not read or send: sparse, nested or on the meta device."""
    if x.is_meta or x.is_nested or x.layout != torch.strided:
        kind = "meta" if x.is_meta else "nested" if x.is_nested else str(x.layout).replace("torch.", "")
        raise InvalidInputError(f"{key} must be a dense tensor holding its values, got a {kind} tensor")


def _tensor(inputs: Dict[str, Any], key: str, kinds: str, ndims: Tuple[int, ...]):
    x = inputs.get(key)
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"{key} must be a torch.Tensor, got {type(x).__name__}")
    check_dense(key, x)
    if kinds == "float":
        ok, want = x.is_floating_point(), "a floating"
    elif kinds == "index":          # what an embedding lookup takes
        ok, want = x.dtype in (torch.int32, torch.int64), "an int64 or int32"
    else:
        ok, want = not x.is_floating_point() and not x.is_complex(), "an integer or bool"
    if not ok:
        raise InvalidInputError(f"{key} must have {want} dtype, got {x.dtype}")
    if x.ndim not in ndims:
        hint = " (add a batch dimension: x[None])" if x.ndim == min(ndims) - 1 else ""
        raise InvalidInputError(f"{key} must have {' or '.join(map(str, ndims))} dimensions, got shape "
                                f"{list(x.shape)}{hint}")
    return x


def _float_mask(inputs: Dict[str, Any]) -> None:
    """A floating ``attention_mask`` of 0s and 1s (which HF takes, as ``padding_mask.bool()``) becomes int64; any other
    float value (an additive mask's -inf, a soft 0.5) is refused, since HF would read it as attend."""
    x = inputs.get("attention_mask")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return
    check_dense("attention_mask", x)
    bad = (x != 0) & (x != 1)
    if bool(bad.any()):
        at = bad.nonzero()[0].tolist()
        raise InvalidInputError(f"attention_mask holds {float(x[tuple(at)])} at position {at}; a padding mask holds "
                                "1 (attend) and 0 (padding) only (an additive mask of 0 / -inf is not one)")
    inputs["attention_mask"] = x.to(torch.long)


def _finite(key: str, x: Optional[torch.Tensor]) -> None:
    """A float input holding NaN or Inf is refused before any work, naming its first such position."""
    if x is None or x.numel() == 0 or bool(torch.isfinite(x).all()):
        return
    bad = (~torch.isfinite(x)).nonzero()[0].tolist()
    raise InvalidInputError(f"{key} holds {float(x[tuple(bad)])} at position {bad}; inputs must be finite")


def _in_range(key: str, x: torch.Tensor, n: Optional[int]) -> None:
    if n is None or x.numel() == 0:
        return
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi >= n:
        bad = ((x < 0) | (x >= n)).nonzero()[0].tolist()
        raise InvalidInputError(f"{key} holds {hi if hi >= n else lo} at position {bad}; valid ids are 0..{n - 1}")


def _check_sequence(fam: Family, inputs: Dict[str, Any], use_cache: Optional[bool]) -> None:
    ids = _tensor(inputs, "input_ids", "index", (2,))
    emb = _tensor(inputs, "inputs_embeds", "float", (3,))
    if (ids is None) == (emb is None):
        raise InvalidInputError("give exactly one of input_ids and inputs_embeds")
    B, T = (ids if ids is not None else emb).shape[:2]
    cfg = fam.model.config
    if ids is not None:
        _in_range("input_ids", ids, fam.model.get_input_embeddings().num_embeddings)
    if emb is not None and emb.shape[2] != fam.hidden_size:
        raise InvalidInputError(f"inputs_embeds must be [B, T, {fam.hidden_size}], got {list(emb.shape)}")
    _finite("inputs_embeds", emb)
    _float_mask(inputs)
    for key, kind in (("attention_mask", "int"), ("token_type_ids", "index")):
        x = _tensor(inputs, key, kind, (2,))
        if x is not None and tuple(x.shape) != (B, T):
            raise InvalidInputError(f"{key} must be [B, T] = [{B}, {T}], got {list(x.shape)}")
    # models without a token-type table (GPT-2) embed token types with the token embeddings
    types = getattr(cfg, "type_vocab_size", None) or fam.model.get_input_embeddings().num_embeddings
    _in_range("token_type_ids", inputs.get("token_type_ids", torch.zeros(0)), types)
    pos = _tensor(inputs, "position_ids", "int" if fam.rope else "index", (1, 2))
    if pos is not None:
        if pos.shape[-1] != T or (pos.ndim == 2 and pos.shape[0] not in (1, B)):
            raise InvalidInputError(f"position_ids must be [T], [1, T] or [B, T] with B={B}, T={T}; got "
                                    f"{list(pos.shape)}")
        limit = None if fam.rope else getattr(cfg, "max_position_embeddings", getattr(cfg, "n_positions", None))
        _in_range("position_ids", pos, limit)
        _not_packed(fam, pos.reshape(-1, T), inputs.get("attention_mask"), use_cache)
        if pos.ndim == 1:           # [T]: every row's (HF's rotary embeddings take [B, T] only)
            inputs["position_ids"] = pos[None]


def _not_packed(fam: Family, pos: torch.Tensor, mask, use_cache: Optional[bool]) -> None:
    """Refuse position ids that transformers reads as packed sequences: with no attention_mask and no KV cache in the
    forward (``masking_utils._preprocess_mask_arguments``), the model masks attention block-diagonally wherever
    consecutive positions do not step by 1 (``find_packed_sequence_indices``); astra's attention has no such mask,
    and its result differed silently. A decoder's forward has a cache unless ``use_cache`` is False (in the call,
    else on its config); bidirectional models never have one."""
    if fam.decoder:
        use_cache = getattr(fam.model.config, "use_cache", True) if use_cache is None else use_cache
    if (fam.decoder and use_cache) or mask is not None or pos.shape[-1] < 2:
        return
    steps = pos.diff(dim=-1) != 1
    if bool(steps.any()):
        row, col = (int(i) for i in steps.nonzero()[0])
        raise InvalidInputError(
            f"position_ids step from {int(pos[row, col])} to {int(pos[row, col + 1])} at token {col + 1} (row {row}): "
            f"with no attention_mask, transformers reads that as packed sequences and masks {fam.name}'s attention "
            f"block-diagonally, which astra does not; pass one sequence per row (or an attention_mask"
            f"{', or use_cache=True' if fam.decoder else ''})")


def validate_inputs(fam: Family, inputs: Dict[str, Any], world_size: int, cls: bool) -> Dict[str, Any]:
    """Everything a forward can check before it starts: accepted inputs, tensor kinds, ranks and shapes, ids in
    range, float inputs finite, a chunk for every rank. Raises :class:`InvalidInputError` (or
    ``UnsupportedModelError``)."""
    use_cache = inputs.get("use_cache")         # the reference forward's cache changes its masks (_not_packed)
    inputs = check_inputs(fam, inputs)
    if fam.image:
        pv = _tensor(inputs, "pixel_values", "float", (4,))
        if pv is None:
            raise InvalidInputError(f"{fam.name} needs pixel_values")
        cfg = fam.model.config
        size = cfg.image_size if isinstance(cfg.image_size, (tuple, list)) else (cfg.image_size,) * 2
        if pv.shape[1] != cfg.num_channels:
            raise InvalidInputError(f"pixel_values must be [B, {cfg.num_channels}, H, W], got {list(pv.shape)}")
        if not inputs.get("interpolate_pos_encoding") and tuple(pv.shape[2:]) != tuple(size):
            raise InvalidInputError(f"pixel_values must be {list(size)} pixels (or pass "
                                    f"interpolate_pos_encoding=True), got {list(pv.shape[2:])}")
        _finite("pixel_values", pv)
    else:
        _check_sequence(fam, inputs, use_cache)
    try:
        B, T = seq_geometry(fam, inputs)
        if B < 1:
            raise ValueError("the batch is empty (batch size 0)")
        split_indices(T, world_size, cls)
    except ValueError as e:
        raise InvalidInputError(str(e)) from e
    if fam.decoder and fam.head == "sequence_classification" and B > 1 and fam.model.config.pad_token_id is None:
        # HF's own refusal, raised after the layers (on the rank holding the last token: read as its failure)
        raise InvalidInputError(f"{type(fam.model).__name__} finds each row's last token by pad_token_id, and the "
                                "model's config has none: HF cannot handle batch sizes > 1 without it (set "
                                "model.config.pad_token_id)")
    pos = inputs.get("position_ids")
    _check_length(fam, T, pos is not None, T if pos is None or not pos.numel() else int(pos.max()) + 1)
    return inputs


def batches(data, name: str) -> Iterable:
    """``data`` as an iterable of batches (calibration samples, fine-tuning data): one batch (a dict, or a
    tokenizer's BatchEncoding, a Mapping) becomes a list of one; a tensor, a string or a non-iterable is refused."""
    if isinstance(data, Mapping):
        return [data]
    if isinstance(data, (torch.Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(f"{name} must be a batch (a dict of model inputs) or an iterable of them, got "
                        f"{type(data).__name__}")
    return data


def checked_batch(fam: Family, batch, name: str, i: int, world_size: int, cls: bool) -> Dict[str, Any]:
    """Batch ``i`` of ``name`` as a dict, checked as a forward at ``world_size`` ranks checks its inputs
    (:func:`validate_inputs`); its errors name ``name[i]``."""
    if not isinstance(batch, Mapping) or not batch:
        raise TypeError(f"{name}[{i}] must be a non-empty dict of model inputs, got {type(batch).__name__}")
    batch = dict(batch)
    try:
        validate_inputs(fam, batch, world_size, cls)
    except (InvalidInputError, UnsupportedModelError) as e:
        raise type(e)(f"{name}[{i}]: {e}") from None
    return batch


def check_not_autocast(fam: Family) -> None:
    """Refuse an inference forward under ``torch.autocast`` on the model's device: the kernels take one dtype per call
    (q, k, v came in mixed), and a rank's outputs would carry dtypes the others can not know without running the head.
    (Training, astra.finetune's differentiable runtime, computes its attention in torch and takes it.)"""
    device = next(fam.model.parameters()).device.type
    try:
        on = torch.is_autocast_enabled(device)
    except TypeError:       # torch < 2.4: no device argument (CUDA's state; CPU's has its own function)
        on = torch.is_autocast_cpu_enabled() if device == "cpu" else torch.is_autocast_enabled()
    if on:
        raise UnsupportedModelError(f"astra does not run under torch.autocast ({device}): run the model in the "
                                    "precision you want instead (e.g. model.to(torch.bfloat16))")


def _check_length(fam: Family, T: int, given_positions: bool, span: int) -> None:
    """``span``: the largest position + 1, which a length-dependent rotary embedding reads."""
    limit = None if given_positions else fam.max_len()      # given position ids are range-checked above
    if limit is not None and T > limit:
        raise InvalidInputError(f"the sequence has {T} tokens; {fam.name}'s position embeddings hold {limit}")
    window = fam.window()
    if window is not None and T > window:
        # astra's attention has no sliding window: refused rather than computed differently from the model
        raise UnsupportedModelError(f"the sequence has {T} tokens, more than {fam.name}'s sliding window of "
                                    f"{window}: astra does not implement sliding-window attention")
    rope = fam.rope_scaled_beyond()
    if rope is not None and span > rope[1]:
        # the model's rotary module picks its frequencies from the largest position it is given: each rank's chunk
        # would get other frequencies than the whole sequence
        raise UnsupportedModelError(f"the sequence spans {span} positions, more than the {rope[1]} beyond which "
                                    f"{fam.name}'s {rope[0]!r} rotary embedding changes its frequencies with the "
                                    "sequence's length: astra computes every rank's positions with one set of them")
