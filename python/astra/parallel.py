"""``astra.parallelize``: run a HF model as one rank of an ASTRA sequence-parallel group."""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional

import torch

import astra_kernels as ak
from . import profile as prof_
from .agreement import INVALID, VALID, Fingerprint, describe_inputs, digest, disagreement, inputs_digest
from .codebooks import as_codebooks
from .context import LayerStats, key_masks, make_ctx
from .errors import AstraError, InvalidInputError, PeerError, RankFailedError, UnsupportedModelError
from .inputs import validate_inputs
from .runtime import RuntimeBase
from .split import DEFAULT_SPLIT, local_indices, split_indices
from .transport import DEFAULT_TIMEOUT_S, STATUS_FAILED, Pending, Transport, frame_sizes

PEER_FAILURE_MODES = ("raise", "local")


class DistRuntime(RuntimeBase):
    def __init__(self, model, codebooks, *, group=None, class_token="auto", timeout=DEFAULT_TIMEOUT_S,
                 kv_tables="auto", overlap=True, on_peer_failure="raise", profile=False, split=DEFAULT_SPLIT):
        super().__init__(model, codebooks, class_token, split)
        if on_peer_failure not in PEER_FAILURE_MODES:
            raise ValueError(f"on_peer_failure must be one of {PEER_FAILURE_MODES}, got {on_peer_failure!r}")
        self.on_peer_failure = on_peer_failure
        self.overlap = bool(overlap)
        p = next(model.parameters())
        self.transport = Transport(group, timeout)
        self.transport.device = p.device
        self.rank = self.transport.rank
        self.world = self.transport.world
        self.stats: List[LayerStats] = []
        # the per-layer time breakdown (astra.profile); None: off, and the forward does nothing extra
        self.profiler = prof_.Profiler(self.fam.num_layers, p.device) if profile else None
        self.kv_tables = kv_tables
        self.tables: Optional[List] = None
        self._local = None
        self._kv_ranks: List[int] = []       # the ranks whose tokens this rank's queries can attend to
        self._rg: Optional[torch.Tensor] = None     # their global indices
        self.calls = 0                       # forwards so far (every rank counts the same; agreed every call)
        self.broken: Optional[str] = None    # why the process group can not be used again, after a PeerError
        self.local_fallback = False          # the last forward ran on this rank alone (on_peer_failure="local")
        self._slot = 0                       # the next exchange of the current forward
        self._dtype, self._elt = p.dtype, p.element_size()
        self._model_digest = digest(type(model).__name__, model.config.to_json_string(use_diff=False),
                                    sum(q.numel() for q in model.parameters()), p.dtype)
        self._cb_digest = b"\0" * 16 if codebooks is None else digest(codebooks.checksum())

    def place(self) -> str:
        return f"astra rank {self.rank}/{self.world}"

    def global_token(self, i: int) -> int:
        return int(self._local[i])

    def install(self) -> None:
        super().install()
        try:
            self._build_tables()
        except Exception:
            self.uninstall()
            raise

    def _build_tables(self) -> None:
        """Per-layer K/V of every codeword ``[K, Hkv, Dh]`` (pre-RoPE) for the G = 1 table path."""
        use = self.kv_tables
        if use not in ("auto", True, False):
            raise ValueError(f"kv_tables must be 'auto', True or False, got {use!r}")
        if self.codebooks is None or use is False:
            return
        if self.codebooks.groups != 1:
            if use is True:
                raise ValueError("kv_tables=True needs G = 1 codebooks (a token's K/V is then a function of one code)")
            return
        tables = []
        with torch.no_grad():
            for l, m in enumerate(self.fam.attn_modules):
                words = self._cb[l][0].unsqueeze(0)           # [1, K, D]
                k, v = self.fam.kv(m, words)                  # [1, Hkv, K, Dh]
                tables.append((k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous()))
        self.tables = tables

    # -- hooks -----------------------------------------------------------------------------------
    def on_embeddings(self, out):
        return out[:, self._local]

    def on_final(self, x):
        x = x.clone()
        row = x[:, 0].contiguous()
        nbytes = row.numel() * row.element_size()
        parts = self._exchange(row.reshape(-1).view(torch.uint8), [nbytes] * self.world, None,
                               "class-token mean").wait()
        x[:, 0] = torch.stack([p.clone().view(row.dtype).view(row.shape) for p in parts], dim=1).mean(dim=1)
        return x

    def _exchange(self, payload: torch.Tensor, sizes, stats, what: str) -> Pending:
        slot, self._slot = self._slot, self._slot + 1
        return self.transport.exchange(payload, sizes, self.calls, slot, stats=stats, what=what)

    def _layer_sizes(self) -> List[int]:
        """Every rank's payload size of a layer's exchange (codec frames, or raw hidden states)."""
        ctx = self.ctx
        lengths = [int(c.numel()) for c in ctx.chunks]
        if self.codebooks is None:
            return [ctx.B * n * self.fam.hidden_size * self._elt for n in lengths]
        return frame_sizes(ctx.B, lengths, self.codebooks.groups, self.codebooks.bits)

    def _slot_sizes(self, slot: int) -> List[int]:
        """Payload sizes of exchange ``slot``: layers 0..L-1, then the class-token mean, then the final status."""
        L = self.fam.num_layers
        if slot < L:
            return self._layer_sizes()
        if slot == L and self.ctx.cls:
            return [self.ctx.B * self.fam.hidden_size * self._elt] * self.world
        return [0] * self.world             # the end-of-forward status: its envelope alone

    def on_layer_input(self, layer, module, h):
        ctx = self.ctx
        send = h[:, 1:] if ctx.cls else h
        lengths = [int(c.numel()) for c in ctx.chunks]
        st = self.stats[layer]
        st.tokens_sent = ctx.B * lengths[self.rank]
        what = f"layer {layer} all-gather"
        prof = self.profiler
        if prof is not None:
            prof.mark(layer - 1, prof_.REST) if layer else prof.mark_outside(prof_.BEFORE)
        if self.codebooks is None:
            payload = send.contiguous().reshape(-1).view(torch.uint8)
        elif prof is not None:       # the two steps of encode_and_pack, timed apart (byte-identical frames)
            codes = ak.vq_encode(send, self._cb[layer])
            prof.mark(layer, prof_.ENCODE)
            payload = ak.pack_codes(codes, self.codebooks.bits)
        else:
            payload = ak.encode_and_pack(send, self._cb[layer], self.codebooks.bits)   # codes [B, n, G]
        ctx.state[layer] = self._exchange(payload, self._layer_sizes(), st, what)
        if prof is not None:
            prof.mark(layer, prof_.PACK)

    def _rows(self, payload: torch.Tensor) -> torch.Tensor:
        """A rank's raw hidden states ``[B, n, D]`` from its full-precision payload bytes."""
        return payload.clone().view(self._dtype).view(self.ctx.B, -1, self.fam.hidden_size)

    def _rope_table(self, dtype):
        ctx = self.ctx
        if "rope" not in ctx.state:
            pos = torch.arange(ctx.T, device=self._local.device).unsqueeze(0)
            cos, sin = self.fam.rope_cos_sin(pos, dtype)
            ctx.state["rope"] = (cos[0], sin[0])
        return ctx.state["rope"]

    def attention(self, module, q, k, v, scaling):
        ctx = self.ctx
        layer = module._astra_layer
        pend = ctx.state.pop(layer)
        prof = self.profiler
        if prof is not None:
            prof.mark(layer, prof_.QKV)
        others, lg, rg = self._kv_ranks, self._local, self._rg
        lm, rm = key_masks(ctx, lg, rg)
        fam = self.fam
        common = dict(q_pos=lg, causal=fam.causal, local_mask=lm, scale=scaling)
        if not others:      # one rank, or causal and no earlier rank: local keys only, while the codes travel
            o = ak.attention_local(q, k, v, **common).to(q.dtype).transpose(1, 2).contiguous()
            if prof is not None:
                prof.mark(layer, prof_.LOCAL_ATTN)
            pend.wait()
            if prof is not None:
                prof.mark(layer, prof_.WAIT)
            if ctx.capture is not None:
                ctx.capture[layer] = (k, v)
            return o, None
        local_part = None
        if self.overlap:
            # local attention while the codes are in flight; merged with the non-local part by log-sum-exp
            local_part = ak.attention_local(q, k, v, return_lse=True, **common)
            if prof is not None:
                prof.mark(layer, prof_.LOCAL_ATTN)
        parts = pend.wait()
        if prof is not None:
            prof.mark(layer, prof_.WAIT)
        nonlocal_kw = dict(common, kv_pos=rg, remote_mask=rm, return_lse=local_part is not None)
        lk, lv = (k, v) if local_part is None else (None, None)     # None: the non-local-only pass
        k_hat = v_hat = None
        if self.codebooks is None:
            h_hat = torch.cat([self._rows(parts[s]) for s in others], dim=1)
            if prof is not None:
                prof.mark(layer, prof_.UNPACK)
            k_hat, v_hat = self.remote_kv(module, h_hat, self._pos_for(rg))
            if prof is not None:
                prof.mark(layer, prof_.NONLOCAL_KV)
            res = ak.attention_per_token(q, lk, lv, k_hat, v_hat, **nonlocal_kw)
        else:
            codes = torch.cat([ak.unpack_codes(parts[s]).to(q.device) for s in others], dim=1)  # [B, Tr, G]
            if prof is not None:
                prof.mark(layer, prof_.UNPACK)
            use_table = self.tables is not None and (not fam.rope or ctx.default_pos)
            if ctx.capture is not None or not use_table:
                k_hat, v_hat = self.remote_kv(module, self.decode(layer, codes, q.dtype), self._pos_for(rg))
            if prof is not None:
                prof.mark(layer, prof_.NONLOCAL_KV)
            if use_table:
                kt, vt = self.tables[layer]
                cos, sin = self._rope_table(q.dtype) if fam.rope else (None, None)
                res = ak.attention_table(q, lk, lv, codes[..., 0], kt, vt, rope_cos=cos, rope_sin=sin, **nonlocal_kw)
            else:
                res = ak.attention_per_token(q, lk, lv, k_hat, v_hat, **nonlocal_kw)
        o = res if local_part is None else ak.merge_attention(local_part[0], local_part[1], *res)[0]
        if ctx.capture is not None:
            K = k.new_empty(k.shape[0], k.shape[1], ctx.T, k.shape[3])
            V = torch.empty_like(K)
            K[:, :, lg], V[:, :, lg] = k, v
            K[:, :, rg], V[:, :, rg] = k_hat.to(K.dtype), v_hat.to(V.dtype)
            ctx.capture[layer] = (K, V)
        o = o.to(q.dtype).transpose(1, 2).contiguous()
        if prof is not None:
            prof.mark(layer, prof_.ATTN)
        return o, None

    # -- one forward -----------------------------------------------------------------------------
    def run(self, inputs: Dict[str, Any], capture: bool = False):
        """One forward on this rank: agree on the inputs, run the model with one exchange per layer, agree on
        the outcome. Returns ``(out, ctx, local)``; ``ctx`` is None after a local fallback."""
        self.calls += 1
        self.local_fallback = False
        if self.broken is not None:
            return self._after_peer_failure(inputs, None)
        if self.profiler is not None:
            self.profiler.start()
        try:
            checked = self._agree(inputs)
        except PeerError as e:
            return self._after_peer_failure(inputs, e)
        ctx, local, call = self._prepare(checked, capture)
        prof = self.profiler
        try:
            with torch.no_grad():
                out = self.model(**call)
            if prof is not None:
                prof.mark(self.fam.num_layers - 1, prof_.REST)
            status = torch.zeros(0, dtype=torch.uint8, device=local.device)    # the envelope carries the status
            self._exchange(status, [0] * self.world, None, "end-of-forward status").wait()
            if prof is not None:
                prof.mark_outside(prof_.AFTER)
                prof.stop()
        except RankFailedError:
            raise
        except PeerError as e:
            self.ctx = None
            return self._after_peer_failure(inputs, e)
        except Exception as e:
            self._fail_together(e)
        finally:
            self.ctx = None
        if self.fam.name == "bert" and not ctx.cls and self.rank != 0 and "pooler_output" in out:
            # without distributed class tokens, [CLS] lives on rank 0 only; other ranks have no pooler output
            out = type(out)(**{k: v for k, v in out.items() if k != "pooler_output"})
        return out, ctx, local

    def _prepare(self, inputs: Dict[str, Any], capture: bool):
        fam = self.fam
        ctx = make_ctx(fam, inputs, self.world, self.cls, self.split_costs)
        local = local_indices(ctx.T, self.world, self.rank, ctx.cls, self.split_costs).to(ctx.chunks[0].device)
        others = [s for s in range(self.world) if s != self.rank]
        if fam.causal:      # a causal query never attends to a later key: skip the ranks holding only later tokens
            top = int(local[-1])
            others = [s for s in others if int(ctx.chunks[s][0]) <= top]
        self._kv_ranks = others
        self._rg = torch.cat([ctx.chunks[s] for s in others]) if others else local[:0]
        call = dict(inputs)
        if fam.decoder:
            for key in ("input_ids", "inputs_embeds", "attention_mask", "token_type_ids"):
                if key in call:
                    call[key] = call[key][:, local]
            call["position_ids"] = ctx.pos_ids[:, local]
            call["use_cache"] = False
        if capture:
            ctx.capture = {}
        self.stats = [LayerStats(layer=l) for l in range(fam.num_layers)]
        self._local = local
        self._slot = 0
        self.layer = None
        self.ctx = ctx
        return ctx, local, call

    def _agree(self, inputs: Dict[str, Any]) -> Dict[str, Any]:
        """Validate the inputs, then exchange fixed-size fingerprints: every rank raises the same error unless
        every rank was given the same valid inputs, model, codebooks and world size, at the same call."""
        err = None
        try:
            if not self._installed:
                raise AstraError("this ParallelModel was unpatched (astra.unpatch / pm.unpatch): it no longer "
                                 "controls the model; call astra.parallelize(model, ...) again on every rank")
            inputs = validate_inputs(self.fam, inputs, self.world, self.cls)
        except Exception as e:  # any verdict on the inputs travels in the fingerprint, so every rank raises
            err = e
        fp = Fingerprint(call=self.calls, world=self.world, status=VALID if err is None else INVALID,
                         model=self._model_digest, codebooks=self._cb_digest,
                         values=b"\0" * 16 if err else inputs_digest(inputs),
                         text=f"{type(err).__name__}: {err}" if err
                         else f"{describe_inputs(inputs)}; split {self.split}")
        outs = self.transport.exchange_fixed(fp.pack().to(self.transport.device), "input agreement")
        fps = [Fingerprint.unpack(o) for o in outs]
        self.calls = max(f.call for f in fps)     # re-synchronised whatever the verdict
        exc = disagreement(fps, self.rank)
        if exc is None:
            return inputs
        if err is not None and isinstance(exc, InvalidInputError):     # every rank: same inputs, same reason
            if type(err) in (AstraError, InvalidInputError, UnsupportedModelError):
                raise type(err)(f"{self.place()}: {err}") from None
            raise err
        raise exc

    def _fail_together(self, e: Exception):
        """This rank failed mid-forward: finish the exchanges in flight, then send an error frame in place of
        the next exchange, so every rank raises :class:`RankFailedError` in this same call."""
        text = (f"{type(e).__name__}: {e}").encode("utf-8")
        layer = -1 if self.layer is None else self.layer
        try:
            for pend in [p for p in self.ctx.state.values() if isinstance(p, Pending)]:
                pend.wait()
            self.ctx.state.clear()
            slot = self._slot
            self.transport.error_text = text.decode("utf-8", "replace")
            empty = torch.zeros(0, dtype=torch.uint8, device=self.transport.device)
            self.transport.exchange(empty, self._slot_sizes(slot), self.calls, slot, status=STATUS_FAILED,
                                    layer=layer, what="failure report").wait()
        except RankFailedError as r:
            raise r from e
        except PeerError as p:
            self.broken = str(p)
            raise RankFailedError(f"{self.place()} failed in layer {self.layer} (call {self.calls}): {text.decode()}"
                                  f"; the other ranks could not be told ({p})", self.rank, self.layer) from e
        raise AssertionError("unreachable: an error frame always raises")  # pragma: no cover

    def _after_peer_failure(self, inputs: Dict[str, Any], e: Optional[PeerError]):
        if e is not None:
            self.broken = str(e)
        if self.on_peer_failure == "raise":
            if e is not None:
                raise e
            raise PeerError(f"{self.place()}: a peer failed in an earlier call ({self.broken}); astra can not use "
                            "this process group again: destroy it, create a new one and call astra.parallelize "
                            "again (or parallelize with on_peer_failure='local' to finish requests alone)")
        warnings.warn(f"{self.place()}: peer failure ({self.broken}); computing the whole forward on this rank "
                      "(on_peer_failure='local')", RuntimeWarning, stacklevel=3)
        return self._run_local(inputs), None, None

    def _run_local(self, inputs: Dict[str, Any]):
        """The unmodified model's forward over the whole sequence, on this rank alone (full precision)."""
        inputs = validate_inputs(self.fam, inputs, 1, self.cls)
        if self.fam.decoder:
            inputs = dict(inputs, use_cache=False)
        self.stats = [LayerStats(layer=l, local_fallback=True) for l in range(self.fam.num_layers)]
        self.local_fallback = True
        self.ctx = None
        with torch.no_grad(), self.original_attention():
            return self.model(**inputs)


class ParallelModel:
    """A HF model running as one ASTRA rank. Call it with the *full* inputs on every rank; it returns this
    rank's outputs (its tokens; class token first when replicated). :meth:`gather` assembles full outputs."""

    def __init__(self, model, rt: DistRuntime):
        self.module = model
        self._rt = rt
        self.last_local_indices: Optional[torch.Tensor] = None
        self._last_T = None

    rank = property(lambda self: self._rt.rank)
    world_size = property(lambda self: self._rt.world)
    codebooks = property(lambda self: self._rt.codebooks)
    class_token = property(lambda self: self._rt.cls)

    @property
    def stats(self) -> List[LayerStats]:
        """Per-layer statistics of the last forward (bytes sent/received, time waiting)."""
        return list(self._rt.stats)

    @property
    def breakdown(self) -> Optional[prof_.Breakdown]:
        """Per-layer time breakdown of this rank's last forward (``parallelize(..., profile=True)``; else None)."""
        p = self._rt.profiler
        return None if p is None else p.last

    @property
    def degraded(self) -> bool:
        """True when the last forward ran on this rank alone after a peer failure (``on_peer_failure="local"``);
        its output is then the whole sequence's, and :meth:`gather` returns it unchanged."""
        return self._rt.local_fallback

    def __call__(self, **inputs):
        out, ctx, local = self._rt.run(inputs)
        self.last_local_indices = local
        self._last_T = None if ctx is None else ctx.T
        return out

    forward = __call__

    def local_indices(self, seq_len: int) -> torch.Tensor:
        return local_indices(seq_len, self.world_size, self.rank, self.class_token, self._rt.split_costs)

    def gather(self, out):
        """Full outputs (same type as ``model(**inputs)``) from every rank's local outputs (collective)."""
        if self._rt.local_fallback:
            return out              # already the whole sequence, computed on this rank alone
        if self._last_T is None:
            raise AstraError("gather() needs a forward first")
        rt, T = self._rt, self._last_T
        cls = rt.cls
        lengths = [int(c.numel()) for c in split_indices(T, rt.world, cls, rt.split_costs)]
        seq_keys = ["last_hidden_state"] + (["logits"] if rt.fam.decoder else [])
        fields = {}
        for key, val in out.items():
            if key in seq_keys and isinstance(val, torch.Tensor):
                body = val[:, 1:] if cls else val
                full = rt.transport.all_gather_seq(body, lengths, dim=1, what=f"gather of {key}")
                fields[key] = torch.cat([val[:, :1], full], dim=1) if cls else full
            else:
                fields[key] = val
        if rt.fam.name == "bert" and not cls and rt.fam.base.pooler is not None:
            # [CLS] lives on rank 0 only: its pooler output is the model's
            lhs = fields["last_hidden_state"]
            src = out.get("pooler_output")
            if src is None:
                src = lhs.new_empty(lhs.shape[0], rt.fam.hidden_size)
            fields["pooler_output"] = rt.transport.broadcast(src, 0, what="pooler broadcast")
        return type(out)(**fields)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask=None):
        """Greedy generation: parallel prefill on every rank, then the last rank (which holds every code)
        builds the full KV cache and decodes alone. Returns ``[B, max_new_tokens]`` new tokens on the last
        rank and None on the others."""
        from .generation import check_generation, greedy_decode

        check_generation(self._rt.fam, max_new_tokens)
        last = self.world_size - 1
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        out, ctx, local = self._rt.run(inputs, capture=(self.rank == last))
        if ctx is None:
            raise PeerError(f"{self._rt.place()}: a peer failed during the prefill; generate() has no local "
                            "fallback (the forward call has)")
        if self.rank != last:
            return None
        kv = [ctx.capture[l] for l in range(self._rt.fam.num_layers)]
        with self._rt.original_attention():
            return greedy_decode(self.module, kv, out.logits[:, -1], ctx.T, max_new_tokens, attention_mask)

    def unpatch(self) -> None:
        self._rt.uninstall()


def parallelize(model, codebooks=None, *, group=None, class_token="auto", timeout: float = DEFAULT_TIMEOUT_S,
                kv_tables="auto", overlap: bool = True, on_peer_failure: str = "raise",
                profile: bool = False, split: str = DEFAULT_SPLIT) -> ParallelModel:
    """Make ``model`` one ASTRA rank of ``group`` (default: the world group). Patches the model in place
    (attention implementation + hooks; weights untouched); :func:`astra.unpatch` restores it.

    ``codebooks=None`` is full-precision sequence parallelism. ``timeout`` (seconds) bounds every wait on a
    peer: a dead or stalled peer raises :class:`astra.PeerError` on the surviving ranks. ``kv_tables``:
    precompute per-layer codeword K/V tables and use the table attention path (G = 1 only; "auto").
    ``overlap``: run the local attention while the layer's codes are in flight and merge it with the
    non-local part by log-sum-exp (else one fused pass after the codes arrive). ``on_peer_failure``: ``"raise"``
    (PeerError) or ``"local"``: a survivor computes the whole forward alone in full precision (RuntimeWarning,
    ``pm.degraded``, ``LayerStats.local_fallback``). Failure semantics: docs/runtime.md, "Failures".
    ``profile``: time every phase of every layer (:mod:`astra.profile`; ``pm.breakdown``); off by default.
    ``split``: the token split, the same on every rank and in :func:`astra.simulate` (:data:`astra.split.SPLITS`:
    ``"even"``, ``"balanced"``: causal attention work balanced, the last rank holding fewer tokens, or
    ``"auto"``); the input agreement rejects ranks given different splits."""
    cb = as_codebooks(codebooks, model)
    rt = DistRuntime(model, cb, group=group, class_token=class_token, timeout=timeout, kv_tables=kv_tables,
                     overlap=overlap, on_peer_failure=on_peer_failure, profile=profile, split=split)
    rt.install()
    return ParallelModel(model, rt)
