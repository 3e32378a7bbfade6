"""Model families: a registry of small adapters, one per HF architecture, keyed by ``config.model_type`` (as
transformers' auto classes and Liger's ``apply_*`` registry are).

An adapter (:class:`FamilyAdapter`) only *names* what the HF model already has: where its attention modules
are, how to project K/V of any hidden states through a layer's own modules (with per-head norms such as
Qwen3's ``k_norm``), whether it uses RoPE, a class token, which inputs it takes. Nothing here copies HF
modeling code. :func:`family_of` resolves a model to a :class:`Family`: its adapter bound to the model's base
(``model.base_model``, HF's ``base_model_prefix``) plus the task head on top (:data:`HEADS`), recognised from
transformers' own auto-class mappings, so head classes are never listed here.

Add a family with :func:`register_family` (docs/architecture.md, "Where to add: a model family").
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch

from .errors import UnsupportedModelError

Module = torch.nn.Module
KV = Callable[[Module, torch.Tensor, int], Tuple[torch.Tensor, torch.Tensor]]
Q = Callable[[Module, torch.Tensor, int], torch.Tensor]

TEXT_INPUTS = frozenset({"input_ids", "inputs_embeds", "attention_mask", "position_ids"})
IMAGE_INPUTS = frozenset({"pixel_values", "interpolate_pos_encoding"})
CLASS_TOKEN_MODES = ("none", "optional", "always")


@dataclass(frozen=True)
class Head:
    """A kind of task head. ``mapping``: the transformers auto-class mapping whose classes are heads of this
    kind; ``token_outputs``: output fields with one row per token (rank-local under ``parallelize``);
    ``pooled_outputs``: fields computed from one token (the class token of an encoder, the last non-padding
    token of a decoder)."""
    kind: Optional[str]
    mapping: str
    token_outputs: Tuple[str, ...] = ()
    pooled_outputs: Tuple[str, ...] = ()


HEADS: Tuple[Head, ...] = (
    Head(None, "MODEL_MAPPING_NAMES", ("last_hidden_state",), ("pooler_output",)),
    Head("causal_lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", ("logits",)),
    Head("masked_lm", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", ("logits",)),
    Head("token_classification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", ("logits",)),
    Head("question_answering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", ("start_logits", "end_logits")),
    Head("sequence_classification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", (), ("logits",)),
    Head("image_classification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", (), ("logits",)),
)


def linear_kv(key: str, value: str, key_norm: Optional[str] = None) -> KV:
    """K/V through the attention module's own linear layers ``module.<key>`` / ``module.<value>`` (bias
    included), then ``module.<key_norm>`` per head when given (Qwen3's ``k_norm``, applied before RoPE)."""
    def kv(module: Module, h: torch.Tensor, head_dim: int):
        B, T, _ = h.shape
        k = getattr(module, key)(h).view(B, T, -1, head_dim)
        if key_norm is not None:
            k = getattr(module, key_norm)(k)
        return k, getattr(module, value)(h).view(B, T, -1, head_dim)
    return kv


def linear_q(query: str, query_norm: Optional[str] = None) -> Q:
    """Queries through ``module.<query>`` (bias included), then ``module.<query_norm>`` per head when given."""
    def q(module: Module, h: torch.Tensor, head_dim: int):
        B, T, _ = h.shape
        out = getattr(module, query)(h).view(B, T, -1, head_dim)
        return out if query_norm is None else getattr(module, query_norm)(out)
    return q


def fused_conv1d_q(attr: str = "c_attn") -> Q:
    """Queries from the query slice of a fused ``[q | k | v]`` GPT-2 ``Conv1D``."""
    def q(module: Module, h: torch.Tensor, head_dim: int):
        B, T, D = h.shape
        conv = getattr(module, attr)
        return torch.addmm(conv.bias[:D], h.reshape(-1, D), conv.weight[:, :D]).view(B, T, -1, head_dim)
    return q


def fused_conv1d_kv(attr: str = "c_attn") -> KV:
    """K/V from a fused ``[q | k | v]`` GPT-2 ``Conv1D`` (``y = x @ W + b``, ``W [D, 3D]``): its key and value
    slices only, so the query projection is never computed."""
    def kv(module: Module, h: torch.Tensor, head_dim: int):
        B, T, D = h.shape
        conv = getattr(module, attr)
        out = torch.addmm(conv.bias[D:], h.reshape(-1, D), conv.weight[:, D:]).view(B, T, 2, -1, head_dim)
        return out.unbind(2)
    return kv


@dataclass(frozen=True)
class FamilyAdapter:
    """What astra needs to know about one HF architecture. Callables take the *base* model (``model.base_model``)
    or its config, never a head.

    ``decoder``: causal decoder (every rank embeds only its own tokens, position ids are global) or bidirectional
    encoder (the embeddings of the whole sequence are computed, then sliced per rank by a hook on
    ``embeddings``, so position ids such as RoBERTa's padding-offset ones stay global).
    ``attention``: the attention modules, one per layer, that call HF's attention interface.
    ``kv(module, h, head_dim)``: K, V ``[B, T, Hkv, Dh]`` of hidden states ``h [B, T, D]``, before RoPE.
    ``q(module, h, head_dim)``: the queries ``[B, T, H, Dh]``, before RoPE (None: not known; calibration's
    attention basis, :mod:`astra.bases`, is then not available and ``basis="auto"`` uses the PCA rotation).
    ``final``: the module whose output holds the final hidden states (where replicated class tokens are merged).
    ``class_token``: "none", "optional" (BERT: distributed or on rank 0) or "always" (ViT: always replicated).
    ``image_tokens(base, inputs)``: for image models, the sequence length the ``pixel_values`` give.
    ``check(config)``: raise :class:`UnsupportedModelError` for configurations astra can not run.
    ``max_len(config)``: the longest sequence the position embeddings allow (None: no limit, e.g. RoPE).
    ``window(config)``: the sliding-window span of any layer (None: full attention); longer sequences are refused.
    ``embed(base, inputs, pos)``: decoders: the embedding output ``[B, T, D]`` of a whole input dict at position ids
    ``pos [B or 1, T]``, what the forward hands its first layer (eval mode), so that every rank can embed every
    token: for layer 0 (``first_input``) and predictive codebooks (None: layer 0 is exchanged, and predictions read
    no embedding, as from zero).
    ``first_input(base, e)``: what layer 0's attention module receives, ``[B, n, D]``, from the embedding output
    ``e [B, n, D]`` of the same tokens (a pre-norm block's first norm; a post-norm encoder's ``e`` itself). Every rank
    holds the whole sequence's embedding output (an encoder's ``embeddings``; a decoder's ``embed``), so with it
    every rank computes every token's layer-0 K/V and layer 0 exchanges nothing (None: layer 0 is exchanged like
    the others).
    ``positions(base, inputs)``: decoders: the position ids ``[B or 1, T]`` (integers) the model's forward derives
    from an input dict given without ``position_ids`` (OPT: from the attention mask, ``cumsum(mask) * mask - 1``);
    every rank is given its tokens' slice of them (None: ``arange(T)``, HF's default; given ``position_ids`` win).
    """
    model_type: str
    decoder: bool
    attention: Callable[[Module], Sequence[Module]]
    kv: KV
    q: Optional[Q] = None
    inputs: FrozenSet[str] = TEXT_INPUTS
    rope: bool = False
    embeddings: Optional[Callable[[Module], Module]] = None
    final: Optional[Callable[[Module], Module]] = None
    class_token: str = "none"
    image_tokens: Optional[Callable[[Module, dict], int]] = None
    check: Optional[Callable[[object], None]] = None
    max_len: Optional[Callable[[object], Optional[int]]] = None
    window: Optional[Callable[[object], Optional[int]]] = None
    embed: Optional[Callable[[Module, dict, torch.Tensor], torch.Tensor]] = None
    first_input: Optional[Callable[[Module, torch.Tensor], torch.Tensor]] = None
    positions: Optional[Callable[[Module, dict], torch.Tensor]] = None

    def __post_init__(self):
        self._check_types()
        if self.rope and not self.decoder:
            raise ValueError("rope=True is for decoders (astra rotates a decoder's non-local keys by their global "
                             "positions); an encoder's position embeddings are added in its embeddings module")
        if self.class_token not in CLASS_TOKEN_MODES:
            raise ValueError(f"class_token must be one of {CLASS_TOKEN_MODES}, got {self.class_token!r}")
        if not self.decoder and self.embed is not None:
            raise ValueError("`embed` is for decoders (an encoder's `embeddings` module embeds the whole sequence)")
        if not self.decoder and self.positions is not None:
            raise ValueError("`positions` is for decoders (an encoder's `embeddings` module computes its positions "
                             "over the whole sequence)")
        if not self.decoder and self.embeddings is None:
            raise ValueError("an encoder family needs `embeddings` (the module whose output is sliced per rank)")
        if self.class_token != "none" and self.final is None:
            raise ValueError("a family with a class token needs `final` (where the replicated copies are merged)")

    def _check_types(self) -> None:
        if not isinstance(self.model_type, str) or not self.model_type:
            raise ValueError(f"model_type must be a non-empty string, got {self.model_type!r}")
        for name in ("decoder", "rope"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.inputs, (set, frozenset)) or not all(isinstance(x, str) for x in self.inputs):
            raise ValueError(f"inputs must be a set of input names, got {self.inputs!r}")
        object.__setattr__(self, "inputs", frozenset(self.inputs))     # a frozen dataclass
        for name in ("attention", "kv"):
            if not callable(getattr(self, name)):
                raise ValueError(f"{name} must be callable, got {getattr(self, name)!r}")
        for name in ("q", "embeddings", "final", "image_tokens", "check", "max_len", "window", "embed",
                     "first_input", "positions"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ValueError(f"{name} must be callable or None, got {value!r}")

    def describe(self) -> str:
        """What the runtime does differently by this adapter, as text every rank compares (the input agreement): two
        ranks resolving one model to different adapters computed different things without a word."""
        fns = {n: _callable_text(getattr(self, n)) for n in (
            "attention", "kv", "q", "embeddings", "final", "embed", "first_input", "positions")}
        return (f"{self.model_type} decoder={self.decoder} rope={self.rope} class_token={self.class_token} "
                f"inputs={sorted(self.inputs)} {fns}")


def _callable_text(fn) -> str:
    """A callable as the ranks compare it: its qualified name and the plain values it closes over (so that
    ``linear_kv("k_proj", "v_proj")`` and ``linear_kv("v_proj", "k_proj")`` differ)."""
    values = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            v = cell.cell_contents
        except ValueError:          # an empty cell
            continue
        if isinstance(v, (str, int, float, bool, type(None))):
            values.append(v)
    return f"{getattr(fn, '__qualname__', repr(fn))}{values if values else ''}"


_REGISTRY: Dict[str, FamilyAdapter] = {}


def register_family(adapter: FamilyAdapter, *, replace: bool = False) -> FamilyAdapter:
    """Register ``adapter`` for models whose ``config.model_type`` is ``adapter.model_type``. Its base model and
    every task head of :data:`HEADS` on it are then supported. ``replace=True`` overrides a registered one."""
    if not isinstance(adapter, FamilyAdapter):
        raise TypeError(f"register_family takes a FamilyAdapter, got {type(adapter).__name__}")
    if adapter.model_type in _REGISTRY and not replace:
        raise ValueError(f"a family is already registered for model_type {adapter.model_type!r} (replace=True "
                         "overrides it)")
    _REGISTRY[adapter.model_type] = adapter
    return adapter


def unregister_family(model_type: str) -> None:
    """Remove the family registered for ``model_type`` (KeyError when there is none)."""
    if model_type not in _REGISTRY:
        raise KeyError(f"no family is registered for model_type {model_type!r}")
    del _REGISTRY[model_type]


def supported() -> str:
    """The registered families and the head kinds, for error messages and ``python -m astra info``."""
    heads = ", ".join(h.kind for h in HEADS if h.kind)
    return f"families (config.model_type) {', '.join(sorted(_REGISTRY))}; base models and heads: {heads}"


@dataclass
class Family:
    """A model resolved by :func:`family_of`: its adapter bound to the model's base and head."""
    adapter: FamilyAdapter
    model: Module                  # the model the user gave (base or head)
    base: Module                   # model.base_model
    head: Optional[str]            # None (base model) or a kind of :data:`HEADS`
    attn_modules: List[Module]
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    embeddings: Optional[Module] = None
    final: Optional[Module] = None
    forward_params: FrozenSet[str] = field(default_factory=frozenset)   # the names model.forward takes

    name = property(lambda self: self.adapter.model_type)
    decoder = property(lambda self: self.adapter.decoder)
    causal = property(lambda self: self.adapter.decoder)
    rope = property(lambda self: self.adapter.rope)
    image = property(lambda self: self.adapter.image_tokens is not None)
    inputs = property(lambda self: self.adapter.inputs)
    class_token_default = property(lambda self: self.adapter.class_token == "always")
    class_token_allowed = property(lambda self: self.adapter.class_token != "none")
    class_token_required = property(lambda self: self.adapter.class_token == "always")

    @property
    def num_layers(self) -> int:
        return len(self.attn_modules)

    def embed(self, inputs: dict, pos: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """A decoder's embedding output ``[B, T, D]`` of the whole input dict ``inputs`` at position ids ``pos``
        (:attr:`FamilyAdapter.embed`); None where the adapter gives none (and for encoders, whose ``embeddings``
        module embeds the whole sequence in the forward)."""
        if self.adapter.embed is None:
            return None
        return self.adapter.embed(self.base, inputs, pos)

    @property
    def derives_positions(self) -> bool:
        """The adapter says how the model's forward derives its position ids (:attr:`FamilyAdapter.positions`)."""
        return self.adapter.positions is not None

    def positions(self, inputs: dict, B: int, T: int) -> Optional[torch.Tensor]:
        """A decoder's position ids ``[B or 1, T]`` (long) of an input dict given without ``position_ids``, as its
        forward derives them (:attr:`FamilyAdapter.positions`); None where the adapter gives none (``arange(T)``).
        UnsupportedModelError where the adapter returns something else."""
        if self.adapter.positions is None:
            return None
        pos = self.adapter.positions(self.base, inputs)
        if (not isinstance(pos, torch.Tensor) or pos.is_floating_point() or pos.is_complex()
                or pos.dtype == torch.bool or pos.ndim != 2 or pos.shape[0] not in (1, B) or pos.shape[1] != T):
            got = f"{pos.dtype} {list(pos.shape)}" if isinstance(pos, torch.Tensor) else type(pos).__name__
            raise UnsupportedModelError(f"the {self.name} adapter's positions must return integer position ids "
                                        f"[B, T] or [1, T] = [{B} or 1, {T}], got {got}")
        return pos.long()

    @property
    def computes_first_layer(self) -> bool:
        """Every rank computes every token's layer-0 input itself (:attr:`FamilyAdapter.first_input`, from the
        embedding output of the whole sequence), so layer 0 exchanges nothing."""
        a = self.adapter
        return a.first_input is not None and (not a.decoder or a.embed is not None)

    def exchanged(self, layer: int) -> bool:
        """Whether layer ``layer``'s non-local hidden states travel between the ranks (all layers but layer 0 where
        :attr:`computes_first_layer`)."""
        return layer > 0 or not self.computes_first_layer

    def first_layer_input(self, emb: torch.Tensor) -> torch.Tensor:
        """Layer 0's attention input ``[B, n, D]`` of tokens whose embedding output is ``emb [B, n, D]``."""
        return self.adapter.first_input(self.base, emb)

    @property
    def _head(self) -> Head:
        return next(h for h in HEADS if h.kind == self.head)

    @property
    def token_outputs(self) -> Tuple[str, ...]:
        """Output fields with one row per token (this rank's tokens under ``parallelize``)."""
        return self._head.token_outputs

    @property
    def pooled_outputs(self) -> Tuple[str, ...]:
        """Output fields computed from one token, see :attr:`pooling` (a base model's ``pooler_output`` when it
        has a pooler)."""
        if self.head is None and getattr(self.base, "pooler", None) is None:
            return ()
        return self._head.pooled_outputs

    @property
    def pooling(self) -> Optional[str]:
        """Which token :attr:`pooled_outputs` read: "class_token" (encoders), "last_token" (decoders' last
        non-padding token) or None (no pooled output)."""
        if not self.pooled_outputs:
            return None
        return "last_token" if self.decoder else "class_token"

    def max_len(self) -> Optional[int]:
        return None if self.adapter.max_len is None else self.adapter.max_len(self.base.config)

    def window(self) -> Optional[int]:
        return None if self.adapter.window is None else self.adapter.window(self.base.config)

    def image_tokens(self, inputs: dict) -> int:
        return self.adapter.image_tokens(self.base, inputs)

    def pooled_tokens(self, inputs: dict, B: int, T: int) -> torch.Tensor:
        """Global index, per batch row ``[B]``, of the token :attr:`pooled_outputs` read, by HF's convention: the
        class token 0, or a decoder's last token that is not ``pad_token_id`` (the last token without
        ``input_ids`` or a pad id)."""
        ids = inputs.get("input_ids")
        pad = getattr(self.model.config.get_text_config(), "pad_token_id", None)
        if self.pooling != "last_token":
            return torch.zeros(B, dtype=torch.long)
        if ids is None or pad is None:
            return torch.full((B,), T - 1, dtype=torch.long)
        return (torch.arange(T, device=ids.device) * (ids != pad)).argmax(-1).cpu()

    # -- K/V of (dequantized) hidden states through the layer's own projections, pre-RoPE --------
    def kv(self, module: Module, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        k, v = self.adapter.kv(module, h, self.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)

    def q(self, module: Module, h: torch.Tensor) -> torch.Tensor:
        """Queries ``[B, H, T, Dh]`` of ``h [B, T, D]`` (pre-RoPE); the adapter must know them (``adapter.q``)."""
        if self.adapter.q is None:
            raise ValueError(f"the {self.name!r} family adapter does not give the queries (FamilyAdapter.q)")
        return self.adapter.q(module, h, self.head_dim).transpose(1, 2)

    # -- rotary embedding ------------------------------------------------------------------------
    def check_rope(self) -> None:
        """UnsupportedModelError where a RoPE family's model has no ``rotary_emb`` or rotates only part of each head
        (a partial rotary factor: Phi, GPT-NeoX), which astra's rotation of non-local keys does not do (a bare size
        mismatch inside the forward before)."""
        if not self.rope:
            return
        rot = getattr(self.base, "rotary_emb", None)
        inv = getattr(rot, "inv_freq", None)
        if not isinstance(inv, torch.Tensor):
            raise UnsupportedModelError(f"the {self.name} adapter sets rope=True, but {type(self.base).__name__} has "
                                        "no rotary_emb module with inv_freq")
        if 2 * inv.numel() != self.head_dim:
            raise UnsupportedModelError(f"{self.name}'s rotary embedding rotates {2 * inv.numel()} of each head's "
                                        f"{self.head_dim} dims (a partial rotary factor): astra rotates whole heads")

    def rope_scaled_beyond(self) -> Optional[Tuple[str, int]]:
        """``(rope_type, length)`` if the model's rotary frequencies depend on the largest position it is given once
        the positions pass ``length`` (HF's "dynamic" and "longrope" types), else None."""
        rot = getattr(self.base, "rotary_emb", None) if self.rope else None
        types = getattr(rot, "rope_type", None)
        types = set(types.values()) if isinstance(types, dict) else {types}
        scaled = sorted(t for t in types if isinstance(t, str) and ("dynamic" in t or t == "longrope"))
        if not scaled:
            return None
        # the length each type compares with (HF's dynamic_rope_update): dynamic the module's original_max_seq_len
        # (max_position_embeddings), longrope its parameters' original_max_position_embeddings
        params = getattr(self.base.config, "rope_parameters", None) or {}
        limits = {"longrope": params.get("original_max_position_embeddings")}
        lengths = [limits.get(t) or getattr(rot, "original_max_seq_len", None) for t in scaled]
        lengths = [int(x) for x in lengths if isinstance(x, int)]
        if any("dynamic" in t for t in scaled) and lengths and getattr(rot, "max_seq_len_cached", 0) > min(lengths):
            # an earlier longer sequence left scaled frequencies, which HF keeps for a span of exactly the original
            # length and resets below it: a rank's chunk would reset them, the whole sequence not
            lengths = [min(lengths) - 1]
        if not lengths:
            raise UnsupportedModelError(f"{self.name}'s {scaled[0]!r} rotary embedding names no original length: "
                                        "astra can not tell where its frequencies start to change")
        return scaled[0], min(lengths)

    def rope_cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[B or 1, T, Dh]`` at ``position_ids`` from the model's own rotary module."""
        dummy = torch.empty(0, dtype=dtype, device=position_ids.device)
        return self.base.rotary_emb(dummy, position_ids)

    def apply_rope(self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``k [B, H, T, Dh]`` by cos/sin ``[B or 1, T, Dh]`` (HF rotate_half convention)."""
        from transformers.models.llama.modeling_llama import rotate_half

        cos, sin = cos.unsqueeze(1).to(k.dtype), sin.unsqueeze(1).to(k.dtype)
        return k * cos + rotate_half(k) * sin


def head_of(model: Module, base: Module) -> Optional[str]:
    """The task-head kind of ``model`` over ``base`` (None when ``model`` is the base model), from transformers'
    auto-class mappings for its ``model_type``."""
    if model is base:
        return None
    from transformers.models.auto import modeling_auto

    cls, model_type = type(model).__name__, base.config.model_type
    lineage = [c.__name__ for c in type(model).__mro__]          # a subclass of a head is that head
    for head in HEADS:
        names = getattr(modeling_auto, head.mapping, {}).get(model_type)
        names = (names,) if isinstance(names, str) else tuple(names or ())
        if head.kind is not None and any(n in names for n in lineage):
            return head.kind
    kinds = ", ".join(h.kind for h in HEADS if h.kind)
    raise UnsupportedModelError(f"astra does not support the head {cls} on {type(base).__name__}; supported head "
                                f"kinds: {kinds}")


def _forward_params(model: Module, base: Module) -> FrozenSet[str]:
    """The inputs ``model``'s forward names; a head whose forward passes ``**kwargs`` on to its base (ViT's
    classifier: ``bool_masked_pos``) names its base's too, since those reach the base and change what it computes."""
    ps = list(inspect.signature(type(model).forward).parameters.values())
    names = {p.name for p in ps if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
    if base is not model and any(p.kind == p.VAR_KEYWORD for p in ps):
        names |= _forward_params(base, base)
    return frozenset(names)


def keeps_logits(model) -> bool:
    """Whether ``model``'s forward takes HF's ``logits_to_keep`` (its LM head can compute chosen positions only)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def check_has_weights(model) -> None:
    """UnsupportedModelError for a model without the float weights astra computes with: parameters on the meta device
    (built without its weights), or dynamically quantized modules (``torch.ao.quantization.quantize_dynamic``), whose
    per-call activation scale depends on the rows a call holds, so a rank's chunk would compute other values than the
    whole sequence does (2.5e-3 off on a tiny BERT, as large as the quantization error itself)."""
    if any(p.is_meta for p in model.parameters()):
        raise UnsupportedModelError("the model has parameters on the meta device (no weights): load its weights first "
                                    "(a device_map that offloads to disk or CPU leaves them there: astra needs every "
                                    "weight in memory on the model's device)")
    quantized = ("torch.ao.nn.quantized", "torch.nn.quantized")
    for name, m in model.named_modules():
        if hasattr(m, "_packed_params") or type(m).__module__.startswith(quantized):
            raise UnsupportedModelError(
                f"astra does not run dynamically quantized modules ({name}: {type(m).__module__}.{type(m).__name__}): "
                "their activation scale is chosen per call from the rows it holds, so each rank's chunk would be "
                "quantized unlike the whole sequence; give astra the float model")


def check_not_compiled(model) -> None:
    """Raise :class:`UnsupportedModelError` for a model compiled in place (``model.compile()``, on it or on one of its
    modules): Dynamo traced astra's hooks and collectives, and its error read as a dead peer's."""
    if all(getattr(m, "_compiled_call_impl", None) is None for m in model.modules()):     # (every forward: no names)
        return
    for name, m in model.named_modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            where = f"on {name} ({type(m).__name__})" if name else f"on the model ({type(m).__name__})"
            raise UnsupportedModelError(f"astra does not run a model compiled in place (compile() {where}): load "
                                        "or build the model again without it")


def family_of(model) -> Family:
    """Resolve a supported HF model (a registered family's base model or a head on it); raise
    :class:`UnsupportedModelError` naming what is supported otherwise."""
    cls = type(model).__name__
    if isinstance(getattr(model, "_orig_mod", None), Module):           # what torch.compile returns
        raise UnsupportedModelError(f"astra does not support a torch.compile'd model ({cls} of "
                                    f"{type(model._orig_mod).__name__}): give the model itself (model._orig_mod)")
    if isinstance(model, Module):
        check_not_compiled(model)
    cfg = getattr(model, "config", None)
    adapter = _REGISTRY.get(getattr(cfg, "model_type", None))
    if adapter is None or not isinstance(getattr(model, "base_model", None), Module):
        what = f" (model_type {cfg.model_type!r})" if hasattr(cfg, "model_type") else ""
        raise UnsupportedModelError(f"astra does not support {cls}{what}; supported: {supported()}")
    base = model.base_model
    head = head_of(model, base)
    if adapter.check is not None:
        adapter.check(base.config)
    bcfg = base.config
    heads = bcfg.num_attention_heads
    modules = _modules_of(cls, base, adapter, "attention", many=True)
    return Family(adapter, model, base, head, modules, bcfg.hidden_size,
                  getattr(bcfg, "num_key_value_heads", None) or heads,
                  getattr(bcfg, "head_dim", None) or bcfg.hidden_size // heads,
                  embeddings=_modules_of(cls, base, adapter, "embeddings"),
                  final=_modules_of(cls, base, adapter, "final"), forward_params=_forward_params(model, base))


def _modules_of(cls: str, base: Module, adapter: FamilyAdapter, field: str, many: bool = False):
    """The module(s) ``adapter.<field>`` picks from ``base`` (None where the field is None); UnsupportedModelError
    where the base lacks the layout or the field picks something that is not a module (it was hooked later)."""
    pick = getattr(adapter, field)
    if pick is None:
        return None
    try:
        got = list(pick(base)) if many else pick(base)
    except (AttributeError, TypeError, IndexError) as e:
        raise UnsupportedModelError(f"astra does not support {cls}: its base {type(base).__name__} does not have "
                                    f"the layout of a {adapter.model_type} model ({field}: {e})") from e
    bad = [m for m in (got if many else [got]) if not isinstance(m, Module)]
    if bad or (many and not got):
        raise UnsupportedModelError(f"the {adapter.model_type} adapter's {field} picks "
                                    f"{type(bad[0]).__name__ if bad else 'no modules'} from {type(base).__name__}, "
                                    "not torch modules")
    return got


# ------------------------------------------------------------------------------------------------
# the built-in families
# ------------------------------------------------------------------------------------------------
def _no_cross_attention(cfg) -> None:
    if getattr(cfg, "add_cross_attention", False):
        raise UnsupportedModelError(f"{cfg.model_type} with add_cross_attention=True is not supported")


def _bidirectional_encoder(cfg) -> None:
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise UnsupportedModelError(f"{cfg.model_type} configured as a decoder / with cross-attention is not "
                                    "supported (astra runs it as a bidirectional encoder)")
    pet = getattr(cfg, "position_embedding_type", "absolute")
    if pet not in (None, "absolute"):
        raise UnsupportedModelError(f"{cfg.model_type} with position_embedding_type={pet!r} is not supported")


def _sliding_window(cfg) -> Optional[int]:
    """The span of Qwen2 / Qwen3's sliding-window layers: those whose ``layer_types`` entry is "sliding_attention"
    (every layer where the config has no ``layer_types``)."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if window is None or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def _mistral_window(cfg) -> Optional[int]:
    """Mistral's window: every layer's when ``sliding_window`` is set, whatever ``layer_types`` says (its attention
    and mask read ``config.sliding_window`` alone; a config with ``layer_types`` of full attention still slides)."""
    window = getattr(cfg, "sliding_window", None)
    return None if window is None else int(window)


def _vit_tokens(base: Module, inputs: dict) -> int:
    pv, emb = inputs["pixel_values"], base.embeddings.patch_embeddings
    if inputs.get("interpolate_pos_encoding"):
        ps = emb.patch_size if isinstance(emb.patch_size, (tuple, list)) else (emb.patch_size,) * 2
        return (pv.shape[-2] // ps[0]) * (pv.shape[-1] // ps[1]) + 1
    return emb.num_patches + 1


def _gpt2_embed(base: Module, inputs: dict, pos: torch.Tensor) -> torch.Tensor:
    ids, types = inputs.get("input_ids"), inputs.get("token_type_ids")
    x = (base.wte(ids) if ids is not None else inputs["inputs_embeds"]) + base.wpe(pos)
    return x if types is None else x + base.wte(types)


def _llama_embed(base: Module, inputs: dict, pos: torch.Tensor) -> torch.Tensor:
    ids = inputs.get("input_ids")
    return base.embed_tokens(ids) if ids is not None else inputs["inputs_embeds"]


def _register_builtins() -> None:
    llama_like = dict(decoder=True, attention=lambda b: [layer.self_attn for layer in b.layers],
                      kv=linear_kv("k_proj", "v_proj"), q=linear_q("q_proj"), rope=True, final=lambda b: b.norm,
                      embed=_llama_embed, first_input=lambda b, e: b.layers[0].input_layernorm(e))
    register_family(FamilyAdapter("gpt2", True, lambda b: [blk.attn for blk in b.h], fused_conv1d_kv(),
                                  q=fused_conv1d_q(), embed=_gpt2_embed, first_input=lambda b, e: b.h[0].ln_1(e),
                                  inputs=TEXT_INPUTS | {"token_type_ids"}, final=lambda b: b.ln_f,
                                  check=_no_cross_attention, max_len=lambda c: c.n_positions))
    register_family(FamilyAdapter("llama", **llama_like))
    register_family(FamilyAdapter("mistral", **llama_like, window=_mistral_window))
    register_family(FamilyAdapter("qwen2", **llama_like, window=_sliding_window))          # q/k/v biases
    register_family(FamilyAdapter("qwen3", **dict(llama_like, kv=linear_kv("k_proj", "v_proj", "k_norm"),
                                                  q=linear_q("q_proj", "q_norm")),
                                  window=_sliding_window))
    bert_like = dict(decoder=False, attention=lambda b: [layer.attention.self for layer in b.encoder.layer],
                     kv=linear_kv("key", "value"), q=linear_q("query"), inputs=TEXT_INPUTS | {"token_type_ids"},
                     embeddings=lambda b: b.embeddings, final=lambda b: b.encoder, class_token="optional",
                     check=_bidirectional_encoder, first_input=lambda b, e: e)       # post-norm
    register_family(FamilyAdapter("bert", **bert_like, max_len=lambda c: c.max_position_embeddings))
    # RoBERTa's position ids start after the padding index (pad_token_id + 1 + cumsum of non-padding tokens):
    # computed by its own embeddings over the whole sequence, so they stay global
    register_family(FamilyAdapter("roberta", **bert_like,
                                  max_len=lambda c: c.max_position_embeddings - c.pad_token_id - 1))
    register_family(FamilyAdapter("vit", False, lambda b: [layer.attention for layer in b.layers],
                                  linear_kv("k_proj", "v_proj"), q=linear_q("q_proj"), inputs=IMAGE_INPUTS,
                                  embeddings=lambda b: b.embeddings,
                                  final=lambda b: b.layernorm, class_token="always", image_tokens=_vit_tokens,
                                  first_input=lambda b, e: b.layers[0].layernorm_before(e)))


_register_builtins()
