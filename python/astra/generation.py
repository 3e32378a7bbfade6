"""Generation through the model's own ``generate``: parallel prefill of the prompt, then HF decodes from a KV
cache built from codes.

The ranks run the prefill of the prompt's first T-1 tokens in parallel. After it the last rank holds every code
of every layer, so it builds the KV cache of those T-1 positions: its own tokens' K/V in full precision, every
other token's K/V from its dequantized hidden state through the layer's own projections (+ RoPE at the token's
position), exactly the K/V its prefill attention used. It then calls the model's own ``generate`` with that
cache and the model's own attention: HF computes the last prompt token from the cache (a cache holding all but
the last prompt token is what HF's ``generate`` continues from) and decodes, so sampling, ``GenerationConfig``,
EOS, stopping criteria and streamers are HF's. :func:`simulate_generate` does the same from
:func:`astra.simulate`'s prefill (the last rank's view), so the distributed tokens can be compared with it.

Prompt positions and masks follow HF's ``generate`` (transformers 5.x): the attention mask, when not given, is
HF's (all ones, or ``input_ids != pad_token_id`` when the prompt holds the pad token and pad != EOS), and
position ids, when not given, are ``cumsum(mask) - 1`` with padded positions set to 0 (left padding).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from astra_kernels.checks import is_count
from .errors import InvalidInputError, UnsupportedModelError
from .inputs import validate_inputs
from .models import keeps_logits
from .split import DEFAULT_SPLIT

_NOT_WITH_GENERATE = ("inputs_embeds", "token_type_ids", "prefill_chunk_size")
#: assisted decoding (prompt lookup, an assistant model, early exit): given a cache of all but the last prompt token,
#: HF's assisted path returns other tokens than plain greedy decoding (transformers 5.x), so it is refused
_ASSISTED = ("prompt_lookup_num_tokens", "assistant_model", "assistant_early_exit", "assistant_tokenizer")
#: a KV cache the caller gives (astra builds the cache from its prefill)
_CACHES = ("past_key_values", "cache")
#: the first transformers whose ``generate`` takes the KV cache as ``cache=`` (earlier: ``past_key_values=``, which
#: it still accepts with a FutureWarning until 6.0)
CACHE_KWARG_SINCE = "5.24.0"


def cache_kwarg() -> str:
    """The name under which the installed transformers' ``generate`` takes a KV cache."""
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__) >= Version(CACHE_KWARG_SINCE) else "past_key_values"


@dataclass
class Prompt:
    input_ids: torch.Tensor                 # [B, T]
    attention_mask: torch.Tensor            # [B, T], HF's (given, or inferred as HF infers it)
    position_ids: Optional[torch.Tensor]    # the caller's [B, T], passed on to HF (None: HF's from the mask)
    config: Any                             # the resolved GenerationConfig (a copy; kwargs applied): astra's checks
    model_kwargs: Dict[str, Any]            # generate kwargs that are not GenerationConfig fields
    expand: int                             # rows per prompt row (max(num_beams, num_return_sequences))
    given: Tuple[Any, Dict[str, Any]] = (None, {})   # the caller's generation_config and kwargs, for HF's generate
                                                       # (the resolved config back in HF warned of max_length)

    @property
    def prefill_len(self) -> int:
        """Tokens of the parallel prefill: all but the last (HF's generate computes the last from the cache)."""
        return self.input_ids.shape[1] - 1

    def prefill_inputs(self) -> Dict[str, torch.Tensor]:
        n = self.prefill_len
        pos = self.position_ids if self.position_ids is not None else generation_positions(self.attention_mask)
        return {"input_ids": self.input_ids[:, :n], "attention_mask": self.attention_mask[:, :n],
                "position_ids": pos[:, :n]}


def check_generation(fam) -> None:
    if not fam.decoder:
        raise UnsupportedModelError(f"generation needs a decoder (causal LM); {fam.name} is an encoder")
    if fam.head != "causal_lm":
        raise UnsupportedModelError(f"generation needs an LM head ({type(fam.model).__name__} has none)")


def generation_positions(mask: torch.Tensor) -> torch.Tensor:
    """HF generate's position ids ``[B, T]`` of a prompt from its attention mask: ``cumsum(mask) - 1``, padded
    positions 0 (``GenerationMixin._prepare_position_ids_for_generation``, transformers 5.x). A plain forward
    without ``position_ids`` uses ``arange(T)`` instead, as HF's forward does."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _resolve_config(model, generation_config, kwargs: Dict[str, Any]):
    """The generation config ``generate`` will use, resolved as HF resolves it (the caller's, its unset fields filled
    from ``model.generation_config``, then ``kwargs`` applied; a copy), and the kwargs that are model inputs."""
    gc, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)    # a copy
    for k in ("output_attentions", "output_hidden_states"):     # HF copies them into the model kwargs
        model_kwargs.pop(k, None)
    return gc, model_kwargs


def _default_mask(ids: torch.Tensor, gc) -> torch.Tensor:
    """HF's attention mask for a prompt given without one: ``ids != pad`` when the prompt holds the pad token and
    the pad token is not an EOS token, else all ones."""
    pad, eos = gc.pad_token_id, gc.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if pad is not None and pad not in eos and bool((ids == pad).any()):
        return ids.ne(pad).long()
    return torch.ones_like(ids, dtype=torch.long)


def prepare_prompt(fam, input_ids, attention_mask=None, position_ids=None, generation_config=None,
                   kwargs: Optional[Dict[str, Any]] = None) -> Prompt:
    """Check a generate call's prompt and options (every rank reaches the same verdict) and resolve HF's mask."""
    kwargs = dict(kwargs or {})
    bad = [k for k in _NOT_WITH_GENERATE if kwargs.get(k) is not None]
    if bad:
        raise UnsupportedModelError(f"astra's generate does not support {bad} (the prompt is given as input_ids)")
    given = [k for k in _CACHES if kwargs.get(k) is not None]
    if given:
        raise UnsupportedModelError(f"astra's generate builds the KV cache from its prefill: {given} can not be "
                                    "given")
    kwargs.pop("synced_gpus", None)     # only the last rank decodes; astra keeps the ranks in step (hf_generate)
    given_as = kwargs.pop("inputs", None)          # HF's generate names the prompt `inputs`
    if input_ids is not None and given_as is not None:
        raise InvalidInputError("give the prompt once: input_ids or inputs (HF's name), not both")
    input_ids = given_as if input_ids is None else input_ids
    if input_ids is None:
        raise InvalidInputError("generate needs input_ids [B, T]")
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    validate_inputs(fam, inputs, 1, False)      # kinds, ranks ([B, T]: a 1-D prompt is refused), shapes, ranges
    gc, model_kwargs = _resolve_config(fam.model, generation_config, kwargs)
    if getattr(gc, "cache_implementation", None) is not None:
        raise UnsupportedModelError(f"astra's generate continues from the prefill's DynamicCache: cache_implementation="
                                    f"{gc.cache_implementation!r} (given, or set on the generation config) is not "
                                    "supported")
    if gc.use_cache is False:   # given, or a checkpoint's config (often): the decode continues from the prefill's
        gc.use_cache = True     # cache, which gives the tokens HF's uncached decode gives
        if generation_config is not None:       # HF warns of a config given with generation kwargs: set it there
            generation_config = copy.deepcopy(generation_config)
            generation_config.use_cache = True
            kwargs.pop("use_cache", None)
        else:
            kwargs["use_cache"] = True
    assisted = [k for k in _ASSISTED if getattr(gc, k, None) is not None or model_kwargs.get(k) is not None]
    if assisted:
        raise UnsupportedModelError(f"astra's generate does not support assisted decoding ({assisted}): HF's "
                                    "assisted path does not continue correctly from the prefill's KV cache")
    partial = [k for k in ("output_hidden_states", "output_attentions") if getattr(gc, k, False) or model_kwargs.get(k)]
    if partial:
        raise UnsupportedModelError(f"astra's generate does not support {partial}: HF continues from the prefill's "
                                    "KV cache, so its first step would hold the last prompt token's alone")
    mask = attention_mask.long() if attention_mask is not None else _default_mask(input_ids, gc)
    if position_ids is not None:        # [T] or [1, T] -> [B, T]: HF extends and expands them per row
        position_ids = position_ids.reshape(-1, position_ids.shape[-1]).expand(input_ids.shape[0], -1)
    expand = max(int(gc.num_beams or 1), int(gc.num_return_sequences or 1))
    return Prompt(input_ids, mask, position_ids, gc, model_kwargs, expand, (generation_config, kwargs))


def prefill_call(model, call: Dict[str, Any]) -> Dict[str, Any]:
    """A generate prefill's forward arguments: only its K/V are read (the decode continues from the cache), so an LM
    head computes one position's logits (``logits_to_keep=1``, as HF's own prefill), not ``[B, T, V]`` (the prompt's
    logits took 1.7-2x the memory of HF's whole generate on each rank)."""
    return dict(call, logits_to_keep=1) if keeps_logits(model) else call


def generation_request(prompt: Optional[Prompt]) -> Tuple[str, Dict[str, Any]]:
    """What the ranks of a ``generate`` agree on before its prefill (:meth:`astra.parallel.DistRuntime.agree`): the
    whole prompt (its values, digested), the resolved generation config and the tensors among the other arguments
    (objects such as streamers or stopping criteria are left out: only the last rank runs them, so they may be
    given there alone). ``prompt`` None: refused locally."""
    if prompt is None:
        return "generate: refused; ", {}
    tensors = {}
    try:
        config = prompt.config.to_json_string(use_diff=True).replace("\n", "").replace(" ", "")
    except (TypeError, ValueError):     # a field JSON can not hold (a tensor eos_token_id): tensors go with the values
        fields = prompt.config.to_dict()
        tensors = {f"config.{k}": v for k, v in fields.items() if isinstance(v, torch.Tensor)}
        config = repr(sorted((k, v) for k, v in fields.items() if not isinstance(v, torch.Tensor)))
    extra = {k: v for k, v in prompt.model_kwargs.items() if isinstance(v, torch.Tensor)}    # model inputs
    values = {"input_ids": prompt.input_ids, "attention_mask": prompt.attention_mask,
              **({} if prompt.position_ids is None else {"position_ids": prompt.position_ids}), **extra, **tensors}
    return f"generate {config}; ", values


def build_cache(model, kv: List[Tuple[torch.Tensor, torch.Tensor]], expand: int = 1):
    """A ``DynamicCache`` holding per-layer K/V ``[B, Hkv, T, Dh]``, each row repeated ``expand`` times (beams and
    returned sequences: HF expands the prompt but not a cache it is given)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(kv):
        if expand > 1:
            k, v = k.repeat_interleave(expand, dim=0), v.repeat_interleave(expand, dim=0)
        cache.update(k, v, layer)
    return cache


def hf_generate(model, prompt: Prompt, kv: Optional[List[Tuple[torch.Tensor, torch.Tensor]]], extra_criteria=()):
    """The model's own ``generate`` continuing from the prefill's K/V of all but the last prompt token (``kv``;
    None: no prefill, HF computes the whole prompt). ``extra_criteria`` are appended to the stopping criteria."""
    from transformers import StoppingCriteriaList

    given_config, kwargs = prompt.given[0], dict(prompt.given[1])
    if extra_criteria:
        kwargs["stopping_criteria"] = StoppingCriteriaList(list(kwargs.get("stopping_criteria") or [])
                                                           + list(extra_criteria))
    if kv is not None:
        kwargs[cache_kwarg()] = build_cache(model, kv, prompt.expand)
    if prompt.position_ids is not None:
        kwargs["position_ids"] = prompt.position_ids
    # synced_gpus: HF's all-reduce per step on the world group would wait for ranks that do not decode
    return model.generate(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask,
                          generation_config=given_config, synced_gpus=False, **kwargs)


def replay_to_streamer(prompt: Prompt, sequences: torch.Tensor) -> None:
    """Feed the caller's streamer, on a rank that does not decode, what HF's ``generate`` feeds it on the last rank:
    the prompt, each new token column, then ``end()`` (so a consumer iterating it, e.g. a ``TextIteratorStreamer``,
    finishes)."""
    streamer = prompt.given[1].get("streamer")
    if streamer is None:
        return
    streamer.put(prompt.input_ids.cpu())
    for j in range(prompt.input_ids.shape[1], sequences.shape[1]):
        streamer.put(sequences[:, j].cpu())
    streamer.end()


def sequences_of(result) -> torch.Tensor:
    """The token tensor ``[B', T + new]`` of a ``generate`` result (a tensor or a ``GenerateOutput``)."""
    return result if isinstance(result, torch.Tensor) else result.sequences


def implausible_result(prompt: Prompt, rows: int, length: int) -> Optional[str]:
    """Why a ``generate`` result of ``[rows, length]`` tokens can not be this prompt's (None: it can): a multiple of the
    prompt's rows, at most :attr:`Prompt.expand` a row; from the prompt's length to the resolved config's limit."""
    B, T = prompt.input_ids.shape
    gc = prompt.config
    # max_length is a total where given, and HF reads its default (20) as new tokens: T + it bounds both
    limit = T + int(gc.max_new_tokens if gc.max_new_tokens is not None else gc.max_length or 0)
    if rows < B or rows % B or rows // B > prompt.expand:
        return f"{rows} rows for a prompt of {B} (at most {prompt.expand} a prompt row)"
    if not T <= length <= limit:
        return f"{length} tokens a row for a prompt of {T} and a limit of {limit}"
    return None


def result_like(prompt: Prompt, sequences: torch.Tensor):
    """``generate``'s result type for this prompt's config holding only ``sequences`` (the other ranks' copy)."""
    if not prompt.config.return_dict_in_generate:
        return sequences
    from transformers.generation import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

    cls = GenerateBeamDecoderOnlyOutput if int(prompt.config.num_beams or 1) > 1 else GenerateDecoderOnlyOutput
    return cls(sequences=sequences)


class Heartbeat:
    """A stopping criterion that never stops: it calls ``beat()`` at most every ``interval_s`` seconds while HF
    decodes, so ranks waiting for the result know the last rank is alive (their wait is bounded by the timeout)."""

    def __init__(self, beat, interval_s: float):
        self.beat, self.interval_s, self.t = beat, float(interval_s), time.monotonic()

    def __call__(self, input_ids, scores, **kwargs):
        if time.monotonic() - self.t >= self.interval_s:
            self.beat()
            self.t = time.monotonic()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def simulate_generate(model, input_ids: Optional[torch.Tensor] = None, *, world_size: int, codebooks=None,
                      attention_mask=None, generation_config=None, position_ids=None, split: str = DEFAULT_SPLIT,
                      **kwargs):
    """What the last of ``world_size`` ranks generates (:meth:`ParallelModel.generate`), in one process:
    :func:`astra.simulate`'s prefill of all but the last prompt token, then the model's own ``generate``. Prompts
    of at most ``world_size`` tokens are generated by the model alone, as the distributed runtime does. ``split``:
    the token split, :func:`astra.parallelize`'s to match it."""
    from .models import family_of
    from .simulation import simulate_with_context

    if not is_count(world_size, 1):
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    fam = family_of(model)
    check_generation(fam)
    prompt = prepare_prompt(fam, input_ids, attention_mask, position_ids, generation_config, kwargs)
    kv = None
    if prompt.prefill_len >= int(world_size):
        _, ctx = simulate_with_context(model, prompt.prefill_inputs(), world_size=world_size, codebooks=codebooks,
                                       capture=True, split=split, prefill=True)
        kv = [ctx.capture[l] for l in range(fam.num_layers)]
    return hf_generate(model, prompt, kv)
