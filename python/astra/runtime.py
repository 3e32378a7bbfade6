"""The base of both ASTRA runtimes: installs hooks + a registered attention function on a HF model.

* :class:`astra.simulation.SimRuntime` (``astra.simulate``): one process runs the model over the whole
  sequence and, in every layer, computes for each rank exactly what that rank computes.
* :class:`astra.parallel.DistRuntime` (``astra.parallelize``): one rank of a torch.distributed group runs
  the model on its own tokens and exchanges codec frames with the others once per layer.

Both derive from :class:`RuntimeBase`. See docs/runtime.md for the normative semantics.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Dict, List, Optional, Tuple

import torch

import astra_kernels as ak
from astra_kernels.checks import INT_OF_SIZE
from astra_kernels.checks import check_finite as finite_or_raise
from . import bases
from .codebooks import Codebooks, apply_predictor, as_normal_tensor, cast_layers
from .context import Ctx, make_ctx
from .errors import AstraError, NonFiniteError, UnsupportedModelError
from .inputs import check_not_autocast
from .models import check_has_weights, check_not_compiled, family_of
from .split import resolve_class_token, resolve_split

ATTN_NAME = "astra"
_REGISTERED = False
#: guards the claim of a model (``model._astra_runtime_obj``, and its config in :data:`_CLAIMED_CONFIGS`) by one
#: runtime at a time, across threads
_CLAIMS = threading.Lock()
#: id(config) -> the runtime holding it: a head and its base_model, or models built from one config object, share the
#: config (and the attention setting on it), so one claim covers them all
_CLAIMED_CONFIGS: Dict[int, "weakref.ref"] = {}


# ------------------------------------------------------------------------------------------------
# attention-function registration (global, idempotent)
# ------------------------------------------------------------------------------------------------
def _astra_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    rt = getattr(module, "_astra_runtime", None)
    rt = rt() if rt is not None else None
    if rt is None or rt.ctx is None:
        hint = "" if rt is not None else (
            f"; inside astra.simulate or a ParallelModel: this {type(module).__name__} is not among the attention "
            "modules the model's family adapter names (FamilyAdapter.attention must give every layer's)")
        raise AstraError(
            "this model is patched by astra: call it through astra.simulate / the object returned by "
            "astra.parallelize, or restore it with astra.unpatch(model) (a model that shares its config with a "
            f"patched one, e.g. built from the same config object, reads the patch too){hint}"
        )
    return rt.attention(module, query, key, value, scaling)


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _astra_attention)
    _REGISTERED = True


#: values sampled from each inference-tensor parameter (evenly spaced, first and last included), which has no version
#: counter: a new checkpoint loaded into it in place changes them
INFERENCE_SAMPLE = 17


class TensorMarks:
    """What tensors were when astra built from them (a model's parameters, codebooks): per tensor the tensor itself
    (weakly) and its in-place version counter (``load_state_dict``, ``copy_`` and in-place updates under
    ``torch.no_grad`` bump it; ``load_state_dict(assign=True)`` replaces the parameter; a dtype / device round trip
    changes neither), and for inference tensors (made or converted under ``torch.inference_mode``, which have no
    counter) :data:`INFERENCE_SAMPLE` of their values, at positions fixed here. Writes through ``.data``, and
    writes to an inference tensor that keep its sampled values, are not seen."""

    def __init__(self, tensors: List[torch.Tensor]):
        self.refs = [weakref.ref(t) for t in tensors]
        self.versions = [-1 if t.is_inference() else t._version for t in tensors]
        self.where = [_sample_positions(t) if t.is_inference() and t.numel() else None for t in tensors]
        self.sample = self._sample(tensors)         # per (dtype, device) of the inference tensors

    def changed(self, tensors: List[torch.Tensor]) -> bool:
        """Whether ``tensors`` are others than, or were changed in place since, these marks."""
        if len(tensors) != len(self.refs) or any(ref() is not t for t, ref in zip(tensors, self.refs)):
            return True
        if any(v != (-1 if t.is_inference() else t._version) for t, v in zip(tensors, self.versions)):
            return True
        now = self._sample(tensors)
        return len(now) != len(self.sample) or any(not torch.equal(a, b) for a, b in zip(now, self.sample))

    def _sample(self, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
        """The sampled values of the inference tensors, concatenated per (dtype, device) and read as integers of
        their size (bit patterns: NaNs compare equal), so one comparison covers each group."""
        groups: Dict[tuple, List[torch.Tensor]] = {}
        for t, w in zip(tensors, self.where):
            if w is not None:
                groups.setdefault((t.dtype, t.device), []).append(t.detach().reshape(-1)[w])
        return [torch.cat(parts).view(INT_OF_SIZE[parts[0].element_size()]) for parts in groups.values()]


def _sample_positions(t: torch.Tensor) -> torch.Tensor:
    """:data:`INFERENCE_SAMPLE` evenly spaced flat positions of ``t``, first and last included, in integers (a float32
    linspace rounded ``numel - 1`` up to ``numel`` past 2**24 elements: an IndexError on a 50257 x 768 embedding)."""
    n = t.numel()
    m = min(INFERENCE_SAMPLE, n)
    return torch.arange(m, device=t.device) * (n - 1) // max(m - 1, 1)


class RuntimeBase:
    """Installs hooks + the attention implementation on a model; subclasses fill in the per-layer work."""

    # True in astra.training's subclass: the simulation keeps autograd on (the caller's grad mode applies)
    differentiable = False

    def __init__(self, model, codebooks: Optional[Codebooks], class_token="auto", split="even"):
        self.fam = family_of(model)
        self.fam.check_rope()
        check_has_weights(model)
        self.model = model
        if self.in_training():
            raise AstraError("astra runs inference only: call model.eval() first (the model or one of its modules "
                             "is in training mode)")
        self.codebooks = codebooks
        self.cls = resolve_class_token(self.fam, class_token)
        self.split = split
        self.split_costs = resolve_split(self.fam, codebooks, split)    # split_indices' costs (None: even)
        self.ctx: Optional[Ctx] = None
        self.layer: Optional[int] = None          # the layer the current forward is in (for error messages)
        self._handles = []
        self._chunked = []                      # (module, its chunk_size_feed_forward) while installed
        self._orig_impl = None
        self._cb: List[torch.Tensor] = []
        self._tf: Optional[List[torch.Tensor]] = None      # the codebooks' transforms on the model's device / dtype
        self._inv: Optional[List[torch.Tensor]] = None     # and their inverses
        self._folds: Optional[List] = None     # per layer (W, b) of bases.folded_kv (transformed, affine K/V)
        self._pred: Optional[List] = None      # per layer the predictor (W [2D, D], b [D]) of predictive codebooks
        self._installed = False
        self._param_state = None                # (dtype, device) of the model's parameters when installed
        self._marks: Optional[Tuple[TensorMarks, TensorMarks]] = None   # the parameters and codebooks when installed

    # -- install / uninstall ---------------------------------------------------------------------
    def install(self) -> None:
        with _CLAIMS:       # checked and claimed at once: two threads' simulate of one model both passed the check,
            self._claim()   # and one returned the other's result and left the model patched
        try:
            self._install()
        except BaseException:
            with _CLAIMS:
                if not self._installed:
                    self._release()
            raise

    def _claim(self) -> None:
        if getattr(self.model, "_astra_runtime_obj", None) is not None:
            raise AstraError("model is already patched by astra (call astra.unpatch(model) first; or an astra.simulate "
                             "of it is running in another thread: one astra runtime per model at a time)")
        live = [m for m in self.fam.attn_modules if getattr(m, "_astra_runtime", None) is not None
                and m._astra_runtime() is not None]
        holder = _CLAIMED_CONFIGS.get(id(self.model.config))
        if live or self.model.config._attn_implementation == ATTN_NAME or (holder is not None and holder() is not None):
            raise AstraError("the model shares its config or attention modules with a model astra has patched (a "
                             "head and its base_model, or models built from one config object): unpatch that one "
                             "first, or give each model its own config (copy.deepcopy(config))")
        self.model._astra_runtime_obj = self
        _CLAIMED_CONFIGS[id(self.model.config)] = weakref.ref(self)

    def _release(self) -> None:
        """Give the model and its config back (under :data:`_CLAIMS`)."""
        if getattr(self.model, "_astra_runtime_obj", None) is self:
            del self.model._astra_runtime_obj
        holder = _CLAIMED_CONFIGS.get(id(self.model.config))
        if holder is not None and holder() in (self, None):
            del _CLAIMED_CONFIGS[id(self.model.config)]

    def _install(self) -> None:
        _register()
        p = next(self.model.parameters())
        self._param_state = (p.dtype, p.device)
        self._marks = (TensorMarks(list(self.model.parameters())), TensorMarks(self._codebook_tensors()))
        cb = self.codebooks
        if cb is not None:
            def cast(what, ts):         # to the model's device and dtype; ValueError where the cast overflows
                return [as_normal_tensor(t) for t in cast_layers(what, ts, device=p.device, dtype=p.dtype)]
            self._cb = cast("codebook", cb.tensors)
            if cb.transformed:
                self._tf, self._inv = cast("transform", cb.transforms), cast("inverse", cb.inverses)
                self._folds = self._fold_kv(p)
            if cb.predictive:
                self._pred = list(zip(cast("predictor", cb.predictors), cast("predictor bias", cb.predictor_biases)))
        self._orig_impl = self.model.config._attn_implementation
        try:
            self._patch()
        except BaseException:
            self._installed = True      # undo whatever was patched: the model stayed half-patched, unpatch found none
            self.uninstall()
            raise

    def _patch(self) -> None:
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
        self._chunked = [(m, m.chunk_size_feed_forward) for m in self.model.modules()
                         if getattr(m, "chunk_size_feed_forward", 0)]
        for m, _ in self._chunked:
            # HF's feed-forward chunking (a memory saving; the result is the same) needs every forward's length to
            # be a multiple of the chunk, and a rank's forward holds its own chunk of the sequence, not the whole
            m.chunk_size_feed_forward = 0
        self._installed = True      # (the model was claimed, model._astra_runtime_obj, in install)

    def uninstall(self) -> None:
        if not self._installed:
            return
        for h in self._handles:
            h.remove()
        self._handles = []
        for m, chunk in self._chunked:
            m.chunk_size_feed_forward = chunk
        self._chunked = []
        for m in self.fam.attn_modules:
            for a in ("_astra_runtime", "_astra_layer"):
                if hasattr(m, a):
                    delattr(m, a)
        self.model.set_attn_implementation(self._orig_impl)
        with _CLAIMS:
            self._release()
            self._installed = False

    @contextlib.contextmanager
    def original_attention(self):
        """Temporarily run the model with its own attention implementation (single-rank decoding)."""
        self.model.set_attn_implementation(self._orig_impl)
        try:
            yield
        finally:
            self.model.set_attn_implementation(ATTN_NAME)

    @property
    def needs_embeddings(self) -> bool:
        """The forward keeps the whole sequence's embedding output (``ctx.state["emb"]``): predictions read it, and
        layer 0's non-local inputs are computed from it (:attr:`Family.computes_first_layer`)."""
        return self.predictive or self.fam.computes_first_layer

    def computed_input(self, idx: torch.Tensor) -> torch.Tensor:
        """Layer 0's attention input ``[B, n, D]`` of the tokens of global indices ``idx``, from the embedding output
        (every rank's own computation, no exchange; :meth:`Family.first_layer_input`). Raises
        :class:`NonFiniteError` naming the first non-finite token, as its own rank's check does."""
        h = self.fam.first_layer_input(self.ctx.state["emb"][:, idx])
        self.check_finite(0, h, idx)
        return h

    def new_ctx(self, inputs, world_size: int, embed: bool = True) -> Ctx:
        """A forward's context (:func:`make_ctx`), with the whole sequence's embedding (:meth:`embed_sequence`)
        unless ``embed`` is False (the distributed runtime embeds where a failure can still be reported to its
        peers). The caller has checked the model's state (:meth:`check_model_state`: the distributed runtime in its
        input agreement)."""
        ctx = make_ctx(self.fam, inputs, world_size, self.cls, self.split_costs)
        if embed:
            self.embed_sequence(ctx, inputs)
        return ctx

    def embed_sequence(self, ctx: Ctx, inputs) -> None:
        """Where :attr:`needs_embeddings`, a decoder's ranks embed the whole sequence into ``ctx.state["emb"]``
        (:meth:`Family.embed`: the model's own embedding modules; encoders keep theirs from the embeddings hook)."""
        if self.needs_embeddings and self.fam.decoder:
            with contextlib.nullcontext() if self.differentiable else torch.no_grad():
                emb = self.fam.embed(inputs, ctx.pos_ids)
            if emb is not None:
                ctx.state["emb"] = emb

    def in_training(self) -> bool:
        """A module of the model is in training mode (dropout on), where this runtime runs inference only."""
        return not self.differentiable and any(m.training for m in self.model.modules())

    def check_model_state(self) -> None:
        """Raise :class:`AstraError` if the model changed since it was patched in what the runtime relies on: eval
        mode (a module put back in training mode ran dropout silently), its parameters' dtype and device (cached
        with the codebooks and the frame sizes), its attention implementation, and (inference runtimes) its weights
        and the codebooks, which the K/V tables, folded projections and the fingerprints were built from;
        UnsupportedModelError under ``torch.autocast`` (inference runtimes)."""
        if not self.differentiable:
            check_not_autocast(self.fam)
        check_not_compiled(self.model)
        self._hooks_last()
        if self.in_training():
            raise AstraError("astra runs inference only: the model (or one of its modules) was put in training mode "
                             "after astra patched it; call model.eval()")
        p = next(self.model.parameters())
        if self._param_state is not None and (p.dtype, p.device) != self._param_state:
            raise AstraError(f"the model moved to {p.dtype} on {p.device} after astra patched it on "
                             f"{self._param_state[0]} on {self._param_state[1]}: unpatch it and patch it again")
        impl = self.model.config._attn_implementation
        if self._installed and impl != ATTN_NAME:
            raise AstraError(f"the model's attention implementation was set to {impl!r} after astra patched it (its "
                             "attention then ignores the other ranks' tokens): unpatch it and patch it again")
        if not self.differentiable and self._marks is not None:     # (training updates its codebooks in place)
            self._check_marks()

    def _check_marks(self) -> None:
        weights, codebooks = self._marks
        if weights.changed(list(self.model.parameters())):
            raise AstraError("the model's weights changed after astra patched it (load_state_dict, an in-place "
                             "update, a merged adapter): what astra built from them (K/V tables, folded projections, "
                             "the weights fingerprint) is stale; unpatch it and patch it again")
        if codebooks.changed(self._codebook_tensors()):
            raise AstraError("the codebooks changed in place after astra patched the model with them: what astra "
                             "built from them (K/V tables, the codebooks fingerprint) is stale, and the senders "
                             "already encode with the new values; unpatch it and patch it again")

    def _hooks_last(self) -> None:
        """astra's hooks run after the user's on the same module, those registered after astra patched the model too
        (a pre-hook changing a layer's input ran after astra had sent it; an embeddings hook saw this rank's tokens
        only, and its change missed the whole sequence's embedding output astra keeps)."""
        for h in self._handles:
            hooks = h.hooks_dict_ref()
            if hooks is not None and h.id in hooks:
                hooks.move_to_end(h.id)

    def checked_first_input(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """:meth:`computed_input` of the tokens of global indices ``idx``, checked against their layer-0 attention
        input ``h [B, n, D]`` as this forward computed it. Every rank uses the computed input for the other ranks'
        tokens of a layer it computes itself, so a hook or a module changed between the embedding output and layer
        0's attention would reach this rank's tokens only: :class:`AstraError` naming it."""
        want = self.computed_input(idx)
        if not want.numel():
            return want
        top = want.detach().abs().amax()
        diff = (h.detach() - want.detach()).abs().amax()
        if bool(diff > 32 * torch.finfo(h.dtype).eps * top.clamp(min=1.0)):        # (one host sync a forward)
            d, scale = float(diff), float(top)
            raise AstraError(f"{self.place()}: layer 0's attention input differs by {d:.3g} (largest |value| "
                             f"{scale:.3g}) from what astra computes from the embedding output, which every rank uses "
                             "for the other ranks' tokens (layer 0 exchanges nothing): a hook or a changed module "
                             "between the embeddings and layer 0's attention would reach this rank's tokens only "
                             "(hook the embeddings module or a later layer instead), or the family adapter's embed / "
                             "first_input computes something else")
        return want

    def _codebook_tensors(self) -> List[torch.Tensor]:
        return [] if self.codebooks is None else self.codebooks.all_tensors()

    # -- hooks -----------------------------------------------------------------------------------
    def _pre_hook(self, module, args, kwargs):
        if self.ctx is None:
            return None
        h = args[0] if args else kwargs["hidden_states"]
        self.layer = module._astra_layer
        self.check_finite(self.layer, h)
        self.on_layer_input(self.layer, module, h)
        return None

    def check_finite(self, layer: int, h: torch.Tensor, idx: Optional[torch.Tensor] = None) -> None:
        """Raise :class:`NonFiniteError` naming the place and the first token whose hidden state ``h [B, n, D]`` is
        not finite: the ``i``-th token this runtime's model sees, or with ``idx``, the token of global index
        ``idx[i]`` (a non-local token whose input this rank computed itself)."""
        try:
            finite_or_raise("h", h)             # one cheap reduction; the search for the token only on failure
            return
        except ValueError:
            pass
        b, i = (~torch.isfinite(h)).flatten(2).any(-1).nonzero()[0].tolist()
        token = self.global_token(i) if idx is None else int(idx[i])
        what = "the hidden state entering attention" if idx is None else \
            "the attention input computed from the embedding output"
        raise NonFiniteError(f"{self.place()}, layer {layer}: {what} holds NaN or Inf at token {token} (batch row "
                             f"{b}; the first such token)")

    def place(self) -> str:
        """Where this runtime runs, for error messages."""
        return "astra"

    def global_token(self, i: int) -> int:
        """Global index of the ``i``-th token this runtime's model sees."""
        return i

    def _emb_hook(self, module, args, output):
        if self.ctx is None:
            return None
        if self.needs_embeddings:
            self.ctx.state["emb"] = output                   # the whole sequence's, by global index
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

    def _fold_kv(self, p: torch.Tensor) -> Optional[List]:
        """Every layer's :func:`astra.bases.folded_kv` on the model's device / dtype (None: K/V not affine)."""
        try:
            with torch.no_grad():
                folds = [bases.folded_kv(self.fam, m, inv) for m, inv in zip(self.fam.attn_modules,
                                                                             self.codebooks.inverses)]
        except ValueError:
            return None
        return [(w.to(device=p.device, dtype=p.dtype), b.to(device=p.device, dtype=p.dtype)) for w, b in folds]

    def folded_kv(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        """``[n, 2, Hkv, Dh]``: K and V (pre-RoPE) of rows ``y [n, D]`` in the codebooks' basis, through the layer's
        folded projection (one home, so that the G = 1 K/V tables equal per-token decoding to the bit)."""
        w, b = self._folds[layer]
        return ak.gemm(y.to(w.dtype), w, b).view(y.shape[0], 2, self.fam.num_kv_heads, -1)

    def quantized_kv(self, layer: int, module, codes: torch.Tensor, pos: Optional[torch.Tensor], dtype):
        """K/V ``[B, Hkv, Tr, Dh]`` (RoPE applied) of non-local tokens from their codes ``[B, Tr, G]``: decoded,
        then the layer's own projection; with transformed codebooks and affine K/V, one GEMM through the folded
        projection ``T^-1 [W_K | W_V]`` instead of the inverse transform's and the projection's."""
        if self._folds is None:
            return self.remote_kv(module, self.decode(layer, codes, dtype), pos)
        y = ak.vq_decode(codes, self._cb[layer])                                    # [B, Tr, D], transformed
        B, Tr = codes.shape[:2]
        kv = self.folded_kv(layer, y.reshape(B * Tr, -1)).view(B, Tr, 2, self.fam.num_kv_heads, -1)
        k, v = kv.permute(2, 0, 3, 1, 4).to(dtype).unbind(0)                        # [B, Hkv, Tr, Dh] each
        if self.fam.rope:
            cos, sin = self.fam.rope_cos_sin(pos, k.dtype)
            k = self.fam.apply_rope(k, cos, sin)
        return k, v

    def transform(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """``h [..., D]`` in the basis layer ``layer``'s codebooks quantize in (``h @ T``; untransformed: h)."""
        return h if self._tf is None else ak.gemm(h.to(self._tf[layer].dtype), self._tf[layer])

    def untransform(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`transform` (``y @ T^-1``)."""
        return y if self._inv is None else ak.gemm(y.to(self._inv[layer].dtype), self._inv[layer])

    @property
    def predictive(self) -> bool:
        """The codebooks quantize the residual of a prediction (:attr:`astra.Codebooks.predictive`)."""
        return self._pred is not None

    def prediction(self, layer: int, idx: torch.Tensor, prev: Optional[torch.Tensor]) -> torch.Tensor:
        """Layer ``layer``'s prediction ``[e, h_prev] @ P + p`` ``[B, n, D]`` of the tokens of global indices ``idx``:
        ``e`` their embedding output (kept by the embeddings hook, or a decoder's by :meth:`new_ctx`; zero where
        the family gives none), ``h_prev = prev`` their dequantized hidden state of the previous layer (None: zero;
        both zero: the bias alone, broadcast)."""
        emb = self.ctx.state.get("emb")
        return apply_predictor(*self._pred[layer], None if emb is None else emb[:, idx], prev, ak.gemm)

    def encode(self, layer: int, h: torch.Tensor, pred: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Codes ``[B, n, G]`` of ``h [B, n, D]``, or of its residual ``h - pred`` (predictive codebooks)."""
        return ak.vq_encode(self.transform(layer, h if pred is None else h - pred.to(h.dtype)), self._cb[layer])

    def decode(self, layer: int, codes: torch.Tensor, dtype, pred: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The dequantized hidden states ``[B, n, D]`` of ``codes`` (plus ``pred``: predictive codebooks)."""
        h = self.untransform(layer, ak.vq_decode(codes, self._cb[layer])).to(dtype)
        return h if pred is None else h + pred.to(dtype)

    def _pos_for(self, idx: torch.Tensor) -> Optional[torch.Tensor]:
        if self.ctx.pos_ids is None:
            return None
        return self.ctx.pos_ids[:, idx]

    # subclass API
    def on_layer_input(self, layer, module, h):  # pragma: no cover - abstract
        raise NotImplementedError

    def attention(self, module, q, k, v, scaling):  # pragma: no cover - abstract
        raise NotImplementedError


def unpatch(model) -> None:
    """Undo :func:`astra.parallelize` on ``model`` (hooks, attention implementation, attributes)."""
    rt = getattr(model, "_astra_runtime_obj", None)
    if rt is None:
        return
    rt.uninstall()
