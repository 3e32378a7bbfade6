"""Sequence-parallel ASTRA runtime over HF models: hooks + a registered attention function.

Two runtimes share the per-layer machinery:

* :class:`SimRuntime` (``astra.simulate``): one process runs the model over the whole sequence and, in every
  layer, computes for each rank exactly what that rank computes (its queries against its own full-precision
  K/V plus the K/V of the other ranks' dequantized tokens).
* :class:`DistRuntime` (``astra.parallelize``): one rank of a torch.distributed group runs the model on its
  own tokens and exchanges codec frames with the others once per layer.

See docs/runtime.md for the normative semantics.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

import astra_kernels as ak
from .codebooks import Codebooks
from .errors import AstraError, UnsupportedModelError
from .models import Family, family_of

ATTN_NAME = "astra"
_REGISTERED = False


# ------------------------------------------------------------------------------------------------
# attention-function registration (global, idempotent)
# ------------------------------------------------------------------------------------------------
def _astra_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    rt = getattr(module, "_astra_runtime", None)
    rt = rt() if rt is not None else None
    if rt is None or rt.ctx is None:
        raise AstraError(
            "this model is patched by astra: call it through astra.simulate / the object returned by "
            "astra.parallelize, or restore it with astra.unpatch(model)"
        )
    return rt.attention(module, query, key, value, scaling)


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _astra_attention)
    _REGISTERED = True


# ------------------------------------------------------------------------------------------------
# token split
# ------------------------------------------------------------------------------------------------
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


def _resolve_class_token(fam: Family, class_token) -> bool:
    if class_token in ("auto", None):
        return fam.class_token_default
    if class_token in (True, "distributed"):
        if not fam.class_token_allowed:
            raise UnsupportedModelError(f"distributed class tokens are not available for {fam.name}")
        return True
    if class_token in (False, "none", "single"):
        if fam.name == "vit":
            # ViT's class token is replicated by definition of the split (it has no owner otherwise)
            raise UnsupportedModelError("ViT always uses distributed class tokens (class_token='distributed')")
        return False
    raise ValueError(f"class_token must be 'auto', 'distributed' or 'none', got {class_token!r}")


# ------------------------------------------------------------------------------------------------
# per-forward context
# ------------------------------------------------------------------------------------------------
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
    state: Dict[int, Any] = field(default_factory=dict)


@dataclass
class LayerStats:
    layer: int
    bytes_sent: int = 0          # this rank's frame (codec frame bytes, or raw bytes in full precision)
    bytes_received: int = 0      # the other ranks' frames
    bytes_on_wire: int = 0       # what the all-gather moved out of this rank (frames are padded to the largest)
    wait_s: float = 0.0          # time blocked waiting for the all-gather
    tokens_sent: int = 0


def _masks(ctx: Ctx, q_idx: torch.Tensor, r_idx: torch.Tensor):
    if ctx.mask is None:
        return None, None
    return ctx.mask[:, q_idx], ctx.mask[:, r_idx]


class _RuntimeBase:
    """Installs hooks + the attention implementation on a model; subclasses fill in the per-layer work."""

    def __init__(self, model, codebooks: Optional[Codebooks], class_token="auto"):
        self.fam = family_of(model)
        if self.fam.model.training:
            raise AstraError("astra runs inference only: call model.eval() first")
        self.model = model
        self.codebooks = codebooks
        self.cls = _resolve_class_token(self.fam, class_token)
        self.ctx: Optional[Ctx] = None
        self._handles = []
        self._orig_impl = None
        self._cb: List[torch.Tensor] = []
        self._installed = False

    # -- install / uninstall ---------------------------------------------------------------------
    def install(self) -> None:
        if getattr(self.model, "_astra_runtime_obj", None) is not None:
            raise AstraError("model is already patched by astra (call astra.unpatch(model) first)")
        _register()
        p = next(self.model.parameters())
        if self.codebooks is not None:
            self._cb = [c.to(device=p.device, dtype=p.dtype) for c in self.codebooks.tensors]
        self._orig_impl = self.model.config._attn_implementation
        self.model.set_attn_implementation(ATTN_NAME)
        if self.model.config._attn_implementation != ATTN_NAME:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} did not accept a custom attention implementation")
        ref = weakref.ref(self)
        for l, m in enumerate(self.fam.attn_modules):
            m._astra_runtime = ref
            m._astra_layer = l
            self._handles.append(m.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        if self.fam.embeddings is not None:
            self._handles.append(self.fam.embeddings.register_forward_hook(self._emb_hook))
        if self.fam.final is not None and self.cls:
            self._handles.append(self.fam.final.register_forward_hook(self._final_hook))
        self.model._astra_runtime_obj = self
        self._installed = True

    def uninstall(self) -> None:
        if not self._installed:
            return
        for h in self._handles:
            h.remove()
        self._handles = []
        for m in self.fam.attn_modules:
            for a in ("_astra_runtime", "_astra_layer"):
                if hasattr(m, a):
                    delattr(m, a)
        self.model.set_attn_implementation(self._orig_impl)
        if getattr(self.model, "_astra_runtime_obj", None) is self:
            del self.model._astra_runtime_obj
        self._installed = False

    @contextlib.contextmanager
    def original_attention(self):
        """Temporarily run the model with its own attention implementation (single-rank decoding)."""
        self.model.set_attn_implementation(self._orig_impl)
        try:
            yield
        finally:
            self.model.set_attn_implementation(ATTN_NAME)

    # -- hooks -----------------------------------------------------------------------------------
    def _pre_hook(self, module, args, kwargs):
        if self.ctx is None:
            return None
        h = args[0] if args else kwargs["hidden_states"]
        self.on_layer_input(module._astra_layer, module, h)
        return None

    def _emb_hook(self, module, args, output):
        if self.ctx is None:
            return None
        return self.on_embeddings(output)

    def _final_hook(self, module, args, output):
        if self.ctx is None:
            return None
        if isinstance(output, torch.Tensor):
            return self.on_final(output)
        output["last_hidden_state"] = self.on_final(output["last_hidden_state"])
        return output

    # -- shared math -----------------------------------------------------------------------------
    def remote_kv(self, module, h_hat: torch.Tensor, pos: Optional[torch.Tensor]):
        """K/V of dequantized hidden states ``[B, Tr, D]`` through the layer's own projections (+RoPE)."""
        k, v = self.fam.kv(module, h_hat)
        if self.fam.rope:
            cos, sin = self.fam.rope_cos_sin(pos, h_hat.dtype)
            k = self.fam.apply_rope(k, cos, sin)
        return k, v

    def encode(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return ak.vq_encode(h, self._cb[layer])

    def decode(self, layer: int, codes: torch.Tensor, dtype) -> torch.Tensor:
        return ak.vq_decode(codes, self._cb[layer]).to(dtype)

    def _pos_for(self, idx: torch.Tensor) -> Optional[torch.Tensor]:
        if self.ctx.pos_ids is None:
            return None
        return self.ctx.pos_ids[:, idx]

    # subclass API
    def on_layer_input(self, layer, module, h):  # pragma: no cover - abstract
        raise NotImplementedError

    def attention(self, module, q, k, v, scaling):  # pragma: no cover - abstract
        raise NotImplementedError

    def on_embeddings(self, out):  # pragma: no cover - abstract
        raise NotImplementedError

    def on_final(self, x):  # pragma: no cover - abstract
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
_ALLOWED_INPUTS = {
    "gpt2": {"input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids"},
    "llama": {"input_ids", "inputs_embeds", "attention_mask", "position_ids"},
    "bert": {"input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids"},
    "vit": {"pixel_values", "interpolate_pos_encoding"},
}
_SEQ_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids")


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


def make_ctx(fam: Family, inputs: Dict[str, Any], world_size: int, cls: bool) -> Ctx:
    B, T = seq_geometry(fam, inputs)
    dev = next(fam.model.parameters()).device
    chunks = [c.to(dev) for c in split_indices(T, world_size, cls)]
    mask = inputs.get("attention_mask")
    if mask is not None:
        if mask.shape != (B, T):
            raise ValueError(f"attention_mask must be [B, T] = [{B}, {T}], got {tuple(mask.shape)}")
        mask = mask.to(torch.bool)
    pos = inputs.get("position_ids")
    default_pos = pos is None
    if fam.decoder:
        if pos is None:
            pos = torch.arange(T, device=dev).unsqueeze(0)
        elif pos.ndim == 1:
            pos = pos.unsqueeze(0)
    else:
        pos = None
    return Ctx(T=T, B=B, cls=cls, chunks=chunks, pos_ids=pos, default_pos=default_pos, mask=mask)


# ------------------------------------------------------------------------------------------------
# simulation: every rank's computation in one process
# ------------------------------------------------------------------------------------------------
class SimRuntime(_RuntimeBase):
    """All ranks at once. With distributed class tokens the sequence is laid out as
    ``[cls copy of rank 0, ..., cls copy of rank N-1, token 1, ..., token T-1]``."""

    # True in astra.training's subclass: run() keeps autograd on (the caller's grad mode applies)
    differentiable = False

    def __init__(self, model, codebooks, world_size: int, class_token="auto"):
        super().__init__(model, codebooks, class_token)
        self.N = int(world_size)

    # extended-sequence index of global index g (non-class tokens)
    def _ext(self, g: torch.Tensor) -> torch.Tensor:
        return g + (self.N - 1) if self.ctx.cls else g

    def _local_ext(self, r: int) -> torch.Tensor:
        chunk = self._ext(self.ctx.chunks[r])
        if self.ctx.cls:
            return torch.cat([torch.tensor([r], device=chunk.device), chunk])
        return chunk

    def _local_global(self, r: int) -> torch.Tensor:
        chunk = self.ctx.chunks[r]
        if self.ctx.cls:
            return torch.cat([chunk.new_zeros(1), chunk])
        return chunk

    def on_embeddings(self, out):
        if not self.ctx.cls:
            return out
        return torch.cat([out[:, :1]] * self.N + [out[:, 1:]], dim=1)

    def on_final(self, x):
        copies = x[:, : self.N]
        return torch.cat([copies.mean(dim=1, keepdim=True), x[:, self.N:]], dim=1)

    def on_layer_input(self, layer, module, h):
        hats = []
        for s in range(self.N):
            hs = h[:, self._ext(self.ctx.chunks[s])]
            if self.codebooks is None:
                hats.append(hs)
            else:
                hats.append(self.decode(layer, self.encode(layer, hs), hs.dtype))
        self.ctx.state[layer] = hats

    def attention(self, module, q, k, v, scaling):
        ctx = self.ctx
        layer = module._astra_layer
        hats = ctx.state.pop(layer)
        # K/V of every rank's dequantized tokens, once per layer
        kv_hat = [self.remote_kv(module, hats[s], self._pos_for(ctx.chunks[s])) for s in range(self.N)]
        out = q.new_empty(q.shape)
        for r in range(self.N):
            le = self._local_ext(r)
            lg = self._local_global(r)
            others = [s for s in range(self.N) if s != r]
            if others:
                rg = torch.cat([ctx.chunks[s] for s in others])
                k_hat = torch.cat([kv_hat[s][0] for s in others], dim=2)
                v_hat = torch.cat([kv_hat[s][1] for s in others], dim=2)
            else:
                rg = lg[:0]
                k_hat = k[:, :, :0]
                v_hat = v[:, :, :0]
            lm, rm = _masks(ctx, lg, rg)
            o = ak.mixed_attention(
                q[:, :, le], k[:, :, le], v[:, :, le], k_hat=k_hat, v_hat=v_hat, q_pos=lg, kv_pos=rg,
                causal=self.fam.causal, local_mask=lm, remote_mask=rm, scale=scaling,
            )
            out[:, :, le] = o.to(out.dtype)
            if ctx.capture is not None and r == self.N - 1:
                K = k.new_empty(k.shape[0], k.shape[1], ctx.T, k.shape[3])
                V = torch.empty_like(K)
                K[:, :, lg], V[:, :, lg] = k[:, :, le], v[:, :, le]
                K[:, :, rg], V[:, :, rg] = k_hat, v_hat
                ctx.capture[layer] = (K, V)
        return out.transpose(1, 2).contiguous(), None

    def run(self, inputs: Dict[str, Any], capture: bool = False):
        inputs = check_inputs(self.fam, inputs)
        self.ctx = make_ctx(self.fam, inputs, self.N, self.cls)
        if capture:
            self.ctx.capture = {}
        try:
            with contextlib.nullcontext() if self.differentiable else torch.no_grad():
                if self.fam.decoder:
                    inputs = dict(inputs, use_cache=False)
                out = self.model(**inputs)
            return out, self.ctx
        finally:
            self.ctx = None


def simulate(model, inputs: Dict[str, Any], *, world_size: int, codebooks=None, class_token="auto"):
    """Compute, in one process, exactly what ``world_size`` ASTRA ranks compute; return ``model(**inputs)``'s
    output type for the whole sequence.

    ``codebooks=None`` is full-precision sequence parallelism (equals the unmodified model).
    ``class_token``: ``"auto"`` (distributed for ViT, single for BERT), ``"distributed"`` or ``"none"``.
    """
    out, _ = _simulate(model, inputs, world_size=world_size, codebooks=codebooks, class_token=class_token)
    return out


def _simulate(model, inputs, *, world_size, codebooks=None, class_token="auto", capture=False):
    from .codebooks import as_codebooks

    cb = as_codebooks(codebooks, model)
    rt = SimRuntime(model, cb, world_size, class_token)
    rt.install()
    try:
        return rt.run(inputs, capture=capture)
    finally:
        rt.uninstall()


def unpatch(model) -> None:
    """Undo :func:`astra.parallelize` on ``model`` (hooks, attention implementation, attributes)."""
    rt = getattr(model, "_astra_runtime_obj", None)
    if rt is None:
        return
    rt.uninstall()
