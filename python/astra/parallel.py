"""``astra.parallelize``: run a HF model as one rank of an ASTRA sequence-parallel group."""
from __future__ import annotations

import functools
import threading
import warnings
from dataclasses import replace
from typing import Any, Dict, List, Optional

import torch

import astra_kernels as ak
from . import profile as prof_
from .agreement import (
    INVALID,
    REQUEST_NBYTES,
    SETUP_FAILED,
    SETUP_NBYTES,
    VALID,
    Fingerprint,
    config_text,
    describe_inputs,
    describe_setup,
    digest,
    disagreement,
    inputs_digest,
    setups_differ,
    values_differ_only,
    weights_digest,
)
from .codebooks import as_codebooks
from .context import LayerStats, key_masks
from .errors import (
    AstraError,
    FrameMismatchError,
    InvalidInputError,
    PeerError,
    RankFailedError,
    UnsupportedModelError,
    described,
    utf8_field,
)
from .generation import (
    Heartbeat,
    check_generation,
    generation_request,
    hf_generate,
    implausible_result,
    prefill_call,
    prepare_prompt,
    replay_to_streamer,
    result_like,
    sequences_of,
)
from .inputs import check_dense, seq_geometry, validate_inputs
from .outputs import (
    OUTPUTS,
    Forward,
    OutputStats,
    captured,
    check_dst,
    last_logits_kept,
    resolve_output,
    token_signature,
    token_tensors,
)
from .runtime import RuntimeBase
from .split import DEFAULT_SPLIT, key_ranks, local_indices, senders, with_class_token
from .transport import DEFAULT_TIMEOUT_S, ERROR_TEXT_NBYTES, STATUS_FAILED, STATUS_OK, Pending, Transport, frame_sizes

PEER_FAILURE_MODES = ("raise", "local")
GEN_RESULT, GEN_FAILED, GEN_ALIVE = 0, 1, 2      # generate's result header: tokens follow / error text follows / wait


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
        self._sizes: List[int] = []          # this forward's payload size of every rank, per layer
        self._kv_ranks: List[int] = []       # the ranks whose tokens this rank's queries can attend to
        self._senders: List[bool] = []       # per rank: some other rank attends to its tokens (else it sends nothing)
        self._rg: Optional[torch.Tensor] = None     # their global indices
        self.calls = 0                       # forwards so far (every rank counts the same; agreed every call)
        self.exchanges = 0                   # collectives of the last complete forward (input agreement included)
        self.broken: Optional[str] = None    # why the process group can not be used again, after a PeerError
        self.local_fallback = False          # the last forward ran on this rank alone (on_peer_failure="local")
        self._slot = 0                       # the next exchange of the current forward
        self._dtype, self._elt = p.dtype, p.element_size()
        self._model_digest = digest(type(model).__name__, config_text(model.config),
                                    sum(q.numel() for q in model.parameters()), p.dtype,
                                    self.fam.adapter.describe())[:8] + weights_digest(model)
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
        """Per exchanged layer the K/V of every codeword ``[K, Hkv, Dh]`` (pre-RoPE) for the G = 1 table path (None for
        a layer every rank computes)."""
        use = self.kv_tables
        if use not in ("auto", True, False):
            raise ValueError(f"kv_tables must be 'auto', True or False, got {use!r}")
        if self.codebooks is None or use is False:
            return
        if self.codebooks.predictive:
            if use is True:
                raise ValueError("kv_tables=True needs codebooks without predictors (a predictive token's K/V depends "
                                 "on its prediction, not on its code alone)")
            return
        if self.codebooks.groups != 1:
            if use is True:
                raise ValueError("kv_tables=True needs G = 1 codebooks (a token's K/V is then a function of one code)")
            return
        tables = []
        with torch.no_grad():
            for l, m in enumerate(self.fam.attn_modules):
                if not self.fam.exchanged(l):                 # no codes arrive there: no table
                    tables.append(None)
                    continue
                if self._folds is not None:                   # as per-token decoding computes them (bf16: bit-equal)
                    kv = self.folded_kv(l, self._cb[l][0])    # [K, 2, Hkv, Dh]
                    tables.append((kv[:, 0].contiguous(), kv[:, 1].contiguous()))
                    continue
                words = self.untransform(l, self._cb[l][0]).unsqueeze(0)   # [1, K, D], the model's basis
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

    def _next_slot(self) -> int:
        """The slot of the forward's next exchange (every rank numbers its exchanges alike)."""
        slot, self._slot = self._slot, self._slot + 1
        return slot

    def _exchange(self, payload: torch.Tensor, sizes, stats, what: str, status: int = STATUS_OK) -> Pending:
        slot = self._next_slot()
        try:
            return self.transport.exchange(payload, sizes, self.calls, slot, stats=stats, what=what, status=status)
        except PeerError:
            raise
        except Exception:       # refused before its collective (a payload of the wrong size): the peers are still in
            self._slot = slot   # this exchange, so this rank's failure report takes its place
            raise

    def _layer_sizes(self) -> List[int]:
        """Every rank's payload size of a layer's exchange (codec frames, or raw hidden states; nothing from a rank
        whose tokens no other rank attends to)."""
        ctx = self.ctx
        lengths = [int(c.numel()) for c in ctx.chunks]
        if self.codebooks is None:
            sizes = [ctx.B * n * self.fam.hidden_size * self._elt for n in lengths]
        else:
            sizes = frame_sizes(ctx.B, lengths, self.codebooks.groups, self.codebooks.bits)
        return [n if send else 0 for n, send in zip(sizes, self._senders)]

    def _slot_sizes(self, slot: int) -> List[int]:
        """Payload sizes of exchange ``slot``: the exchanged layers in order (:meth:`astra.models.Family.exchanged`),
        then the class-token mean, then the final status."""
        L = sum(self.fam.exchanged(l) for l in range(self.fam.num_layers))
        if slot < L:
            return self._sizes
        if slot == L and self.ctx.cls:
            return [self.ctx.B * self.fam.hidden_size * self._elt] * self.world
        return [0] * self.world             # the end-of-forward status: its envelope alone

    def on_layer_input(self, layer, module, h):
        ctx = self.ctx
        send = h[:, 1:] if ctx.cls else h
        st = self.stats[layer]
        what = f"layer {layer} all-gather"
        prof = self.profiler
        if prof is not None:
            prof.mark(layer - 1, prof_.REST) if layer else prof.mark_outside(prof_.BEFORE)
        if not self.fam.exchanged(layer):       # every rank computes these tokens' inputs itself: nothing to send
            self.checked_first_input(send, ctx.chunks[self.rank])
            if self.predictive:
                ctx.state["own"] = send
            ctx.state[layer] = None
            return
        if not self._senders[self.rank]:     # causal, last rank: no query anywhere attends to these tokens
            payload = send.new_empty(0, dtype=torch.uint8)
        elif self.codebooks is None:
            payload = send.contiguous().reshape(-1).view(torch.uint8)
        elif prof is not None or self.predictive:    # encode, then pack (encode_and_pack's frames, byte-identical)
            # "own": this rank's reconstruction of its tokens in the previous layer ("received": the others')
            pred = self.prediction(layer, ctx.chunks[self.rank], ctx.state.get("own")) if self.predictive else None
            codes = self.encode(layer, send, pred)
            if pred is not None:
                ctx.state["own"] = self.decode(layer, codes, send.dtype, pred)
            if prof is not None:
                prof.mark(layer, prof_.ENCODE)
            payload = ak.pack_codes(codes, self.codebooks.bits)
        else:
            payload = ak.encode_and_pack(self.transform(layer, send), self._cb[layer], self.codebooks.bits)  # [B, n, G]
        st.tokens_sent = ctx.B * int(ctx.chunks[self.rank].numel()) if self._senders[self.rank] else 0
        ctx.state[layer] = self._exchange(payload, self._sizes, st, what)
        if prof is not None:
            prof.mark(layer, prof_.PACK)

    def _codes_from(self, s: int, frame: torch.Tensor, layer: int) -> torch.Tensor:
        """Rank ``s``'s codes ``[B, n_s, G]`` from its frame (CRC-checked by the codec), their shape checked against
        the split: a frame of another shape failed later, in an index, blaming the rank that received it."""
        codes = ak.unpack_codes(frame)
        want = (self.ctx.B, int(self.ctx.chunks[s].numel()), self.codebooks.groups)
        if tuple(codes.shape) != want:
            raise AstraError(f"{self.place()}, layer {layer}: rank {s} sent codes of shape {list(codes.shape)} where "
                             f"its tokens need {list(want)}: the ranks are out of step")
        return codes

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
            if pend is not None:
                pend.wait()
            if prof is not None:
                prof.mark(layer, prof_.WAIT)
            if ctx.capture is not None:
                ctx.capture[layer] = (k, v)
            return o, None
        local_part = None
        if self.overlap:
            # local attention while the codes are in flight; merged with the non-local part by log-sum-exp (both
            # partial outputs float32: the merged one is rounded to q's dtype once, as the single pass's is)
            local_part = ak.attention_local(q, k, v, return_lse=True, **common)
            if prof is not None:
                prof.mark(layer, prof_.LOCAL_ATTN)
        parts = None if pend is None else pend.wait()
        if prof is not None:
            prof.mark(layer, prof_.WAIT)
        nonlocal_kw = dict(common, kv_pos=rg, remote_mask=rm, return_lse=local_part is not None)
        lk, lv = (k, v) if local_part is None else (None, None)     # None: the non-local-only pass
        k_hat, v_hat, table_codes = self._nonlocal_kv(layer, module, parts, q)
        if table_codes is not None:
            kt, vt = self.tables[layer]
            cos, sin = self._rope_table(q.dtype) if fam.rope else (None, None)
            res = ak.attention_table(q, lk, lv, table_codes[..., 0], kt, vt, rope_cos=cos, rope_sin=sin,
                                     **nonlocal_kw)
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

    def _nonlocal_kv(self, layer: int, module, parts: Optional[List[torch.Tensor]], q: torch.Tensor):
        """``(k_hat, v_hat, table_codes)`` of the non-local keys from the received ``parts`` (None: a layer every rank
        computes itself, :meth:`astra.models.Family.exchanged`): their K/V ``[B, Hkv, Tr, Dh]`` (None on the G = 1
        table path unless captured), and their codes ``[B, Tr, G]`` where the table path attends to them (else
        None)."""
        ctx, rg, prof = self.ctx, self._rg, self.profiler
        codes = h_hat = None
        if parts is not None and self.codebooks is not None:
            codes = torch.cat([self._codes_from(s, parts[s], layer).to(q.device) for s in self._kv_ranks], dim=1)
            if prof is not None:
                prof.mark(layer, prof_.UNPACK)
            if self.predictive:
                h_hat = self.decode(layer, codes, q.dtype, self.prediction(layer, rg, ctx.state.get("received")))
        else:
            h_hat = (self.computed_input(rg) if parts is None
                     else torch.cat([self._rows(parts[s]) for s in self._kv_ranks], dim=1))
            if prof is not None:
                prof.mark(layer, prof_.UNPACK)
        if self.predictive:
            ctx.state["received"] = h_hat
        use_table = (codes is not None and self.tables is not None and not self.predictive
                     and (not self.fam.rope or ctx.default_pos))
        k_hat = v_hat = None
        if h_hat is not None:
            k_hat, v_hat = self.remote_kv(module, h_hat, self._pos_for(rg))
        elif ctx.capture is not None or not use_table:
            k_hat, v_hat = self.quantized_kv(layer, module, codes, self._pos_for(rg), q.dtype)
        if prof is not None:
            prof.mark(layer, prof_.NONLOCAL_KV)
        return k_hat, v_hat, codes if use_table else None

    # -- one forward -----------------------------------------------------------------------------
    def run(self, inputs: Dict[str, Any], capture: bool = False, request: str = "",
            request_error: Optional[Exception] = None, prefill: bool = False, last_logits: bool = False):
        """One forward on this rank: agree on the inputs (and on ``request``, what the caller asks of the forward,
        or ``request_error``, why it can not be given), run the model with one exchange per exchanged layer, agree on
        the outcome. Returns ``(out, ctx, local)``; ``ctx`` is None after a local fallback. ``prefill``: a generate
        prefill (:func:`astra.generation.prefill_call`); ``last_logits``: the LM head computes the positions that
        output kind reads only (:func:`astra.outputs.last_logits_kept`, ``ctx.logits_kept``)."""
        self.calls += 1
        self.local_fallback = False
        if self.broken is not None:
            return self._after_peer_failure(inputs, None)
        if self.profiler is not None:
            self.profiler.start()
        try:
            checked = self._agree(inputs, request, request_error)
        except PeerError as e:
            return self._after_peer_failure(inputs, e)
        ctx, local, call = self._prepare(checked, capture)
        call = prefill_call(self.model, call) if prefill else call
        if last_logits:
            ctx.logits_kept = last_logits_kept(self.fam, self.model, ctx.mask, ctx.B, ctx.T, local)
            if ctx.logits_kept is not None:
                call["logits_to_keep"] = ctx.logits_kept
        prof = self.profiler
        try:           # from here on a failure reaches the peers, which wait in layer 1's exchange
            self.embed_sequence(ctx, checked)
            with torch.no_grad():
                out = self.model(**call)
            if prof is not None:
                prof.mark(self.fam.num_layers - 1, prof_.REST)
            status = torch.zeros(0, dtype=torch.uint8, device=local.device)    # the envelope carries the status
            self._exchange(status, [0] * self.world, None, "end-of-forward status").wait()
            self.exchanges = self._slot + 1             # the forward's collectives, its input agreement included
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
        except BaseException as e:      # KeyboardInterrupt, CancelledError: the peers are told, then it goes on
            self._tell_peers(e)
            raise
        finally:
            self.ctx = None
        return out, ctx, local

    def _tell_peers(self, e: BaseException) -> None:
        """Report a non-``Exception`` interruption of this rank's forward as its failure (the peers raise
        RankFailedError and stay usable; unreported, they waited in an exchange that this rank's next call paired
        with a different size, and gloo aborted them), without turning it into an astra error here."""
        try:
            self._fail_together(e)
        except AstraError:
            pass

    # -- after the forward: the exchanges of its output (astra.outputs) ------------------------------
    def output_exchange(self, build, sizes, stats, what: str) -> List[torch.Tensor]:
        """One enveloped all-gather of an output's parts: ``build()`` is this rank's payload (``sizes[s]`` bytes
        from rank s). A rank whose ``build`` raises sends a failed status: every rank raises RankFailedError."""
        payload, status, stop = self._built(build)
        return self._reraised(stop, lambda: self._exchange(payload, sizes, stats, what, status).wait())

    def output_broadcast(self, build, nbytes: int, src: int, stats, what: str) -> torch.Tensor:
        """Rank ``src``'s ``build()`` (``nbytes``, known to every rank) on every rank: one enveloped broadcast."""
        payload, status, stop = self._built(build) if self.rank == src else (None, STATUS_OK, None)
        slot = self._next_slot()
        return self._reraised(stop, lambda: self.transport.broadcast_frame(payload, nbytes, src, self.calls, slot,
                                                                            stats, what, status))

    def _built(self, build):
        """``(payload, status, interruption)``: a failure of ``build`` is sent as a failed status (the exchange then
        raises RankFailedError on every rank); a KeyboardInterrupt-like one is re-raised after the exchange."""
        try:
            return build(), STATUS_OK, None
        except BaseException as e:
            self.transport.error_text = described(e)
            empty = torch.zeros(0, dtype=torch.uint8, device=self.transport.device)
            return empty, STATUS_FAILED, None if isinstance(e, Exception) else e

    @staticmethod
    def _reraised(stop: Optional[BaseException], exchange):
        """``exchange()``; after this rank's own interruption ``stop``, that interruption instead of its report."""
        try:
            return exchange()
        except AstraError:
            if stop is not None:
                raise stop from None
            raise

    def _prepare(self, inputs: Dict[str, Any], capture: bool):
        fam = self.fam
        ctx = self.new_ctx(inputs, self.world, embed=False)      # run() embeds, inside its failure handling
        local = with_class_token(ctx.chunks[self.rank], ctx.cls)      # the split of make_ctx, not a second one
        others = key_ranks(fam, ctx.chunks, self.rank)
        self._senders = senders(fam, ctx.chunks)
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
        self._sizes = self._layer_sizes()          # every layer's exchange has the same sizes
        return ctx, local, call

    def agree(self, request: str, values: Dict[str, Any], request_error=None) -> None:
        """The agreement of a collective other than a forward (``gather``, ``generate``), before its first sized
        exchange: a new call, whose fixed-size fingerprint (``request`` and a digest of ``values``) pairs with
        whatever the other ranks' first exchange is, so ranks calling different things, or the same with other
        arguments, raise the same error instead of pairing exchanges of different sizes (gloo aborts the process)."""
        self.calls += 1
        self._slot = 0                      # a new call numbers its exchanges from 0 (as a forward does)
        if self.broken is not None:         # a broken group: the caller goes on alone or raises its PeerError
            if request_error is not None:
                raise request_error
            return
        try:
            self._agree(values, request, request_error, validate=False)
        except PeerError as e:
            self.broken = str(e)
            raise

    def _agree(self, inputs: Dict[str, Any], request: str = "", request_error=None,
               validate: bool = True) -> Dict[str, Any]:
        """Validate the inputs, then exchange fixed-size fingerprints: every rank raises the same error unless
        every rank was given the same valid inputs and request, model, codebooks and world size, at the same call."""
        err = None
        try:
            if request_error is not None:
                raise request_error
            if not self._installed:
                raise AstraError("this ParallelModel was unpatched (astra.unpatch / pm.unpatch): it no longer "
                                 "controls the model; call astra.parallelize(model, ...) again on every rank")
            self.check_model_state()        # one rank's model put in training mode or moved: every rank raises
            if validate:
                inputs = validate_inputs(self.fam, inputs, self.world, self.cls)
            values = digest(inputs_digest(inputs), request, self.split, self.cls)
            text = (f"{request}{describe_inputs(inputs)}; split {self.split}; class_token="
                    f"{'distributed' if self.cls else 'none'}")
        except Exception as e:  # any verdict on the inputs travels in the fingerprint, so every rank raises
            err, values, text = e, b"\0" * 16, described(e)
        fp = Fingerprint(call=self.calls, world=self.world, status=VALID if err is None else INVALID,
                         model=self._model_digest, codebooks=self._cb_digest, values=values, text=text,
                         version=ak.__version__)
        outs = self.transport.exchange_fixed(fp.pack().to(self.transport.device), "input agreement")
        fps = [Fingerprint.unpack(o) for o in outs]
        self.calls = max(f.call for f in fps)     # re-synchronised whatever the verdict
        exc = disagreement(fps, self.rank, self._setups() if setups_differ(fps) else None,
                           self.transport.exchange_texts(request, REQUEST_NBYTES, "input agreement: requests")
                           if values_differ_only(fps) else None)
        if exc is None:
            return inputs
        if err is not None and isinstance(exc, InvalidInputError):     # every rank: same inputs, same reason
            if type(err) in (AstraError, InvalidInputError, UnsupportedModelError):
                raise type(err)(f"{self.place()}: {err}") from None
            raise err
        raise exc

    def _setups(self) -> List[str]:
        """Every rank's :func:`describe_setup` (one more fixed-size exchange, made only when models or codebooks
        differ, which every rank sees alike)."""
        mine = describe_setup(self.model, self.fam.adapter.describe(), self.codebooks)
        return self.transport.exchange_texts(mine, SETUP_NBYTES, "input agreement: setups")

    def _fail_together(self, e: BaseException):
        """This rank failed mid-forward: finish the exchanges in flight, then send an error frame in place of
        the next exchange, so every rank raises :class:`RankFailedError` in this same call."""
        text = described(e)
        layer = -1 if self.layer is None else self.layer
        try:
            for pend in [p for p in self.ctx.state.values() if isinstance(p, Pending)]:
                pend.wait()
            self.ctx.state.clear()
            slot = self._next_slot()        # the exchange the peers are in (they numbered it alike)
            self.transport.error_text = text
            empty = torch.zeros(0, dtype=torch.uint8, device=self.transport.device)
            self.transport.exchange(empty, self._slot_sizes(slot), self.calls, slot, status=STATUS_FAILED,
                                    layer=layer, what="failure report").wait()
        except RankFailedError as r:
            raise r from e
        except PeerError as p:
            self.broken = str(p)
            raise RankFailedError(f"{self.place()} failed in layer {self.layer} (call {self.calls}): {text}"
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


def _one_call_at_a_time(method):
    """A :class:`ParallelModel` method that waits for the call another thread is making (they share the forward's
    state and the exchanges' order: two at once failed with KeyError / FrameMismatchError and broke the group)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return call


class ParallelModel:
    """A HF model running as one ASTRA rank. Call it with the *full* inputs on every rank; ``output`` picks what
    it returns (:mod:`astra.outputs`: ``"local"``, ``"hidden_states"``, ``"mean_pooled"``, ``"class_token"``,
    ``"last_logits"``; None: the model's natural output), ``dst`` on which rank (None: every rank). It runs one
    call at a time: calls from several threads wait their turn, and every rank must make its calls in one order."""

    def __init__(self, model, rt: DistRuntime):
        self.module = model
        self._rt = rt
        self._lock = threading.RLock()
        self.last_local_indices: Optional[torch.Tensor] = None
        self._last: Optional[Forward] = None
        self._inputs: Dict[str, Any] = {}
        self.output_stats: Optional[OutputStats] = None

    rank = property(lambda self: self._rt.rank)
    world_size = property(lambda self: self._rt.world)
    codebooks = property(lambda self: self._rt.codebooks)
    class_token = property(lambda self: self._rt.cls)
    #: the ``costs`` of :func:`astra.split_indices` this model's token split uses (None: the even split)
    split_costs = property(lambda self: self._rt.split_costs)

    @property
    def stats(self) -> List[LayerStats]:
        """Per-layer statistics of the last forward (bytes sent/received, time waiting)."""
        return list(self._rt.stats)

    #: collectives every rank took part in during the last complete forward: the input agreement, one all-gather
    #: per exchanged layer (every layer but layer 0, :meth:`astra.models.Family.exchanged`), the class-token mean
    #: where there is one and the end-of-forward status (0 before any forward)
    exchanges = property(lambda self: self._rt.exchanges)

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

    @_one_call_at_a_time
    def __call__(self, output: Optional[str] = None, dst: Optional[int] = None, **inputs):
        """One forward (collective: every rank, same inputs, same ``output`` and ``dst``). Returns the ``output``
        kind's result on every rank, or on rank ``dst`` only (None elsewhere); ``pm.output_stats`` counts the
        bytes it moved."""
        rt = self._rt
        kind, err = None, None
        try:
            kind = resolve_output(rt.fam, output)
            dst = check_dst(dst, self.world_size)
        except (ValueError, UnsupportedModelError) as e:
            err = e                 # raised on every rank by the input agreement
        request = f"output={output!r}, dst={dst!r}; "
        with captured(rt.fam) as got:
            out, ctx, local = rt.run(inputs, request=request, request_error=err,
                                     last_logits=kind is not None and kind.name == "last_logits")
        if err is not None:         # a local fallback skips the agreement
            raise err
        self._last = self._record(inputs, out, ctx, local, got, kind.name, dst)
        return self._output(kind, self._last)

    forward = __call__

    def _record(self, inputs, out, ctx, local, got, kind_name: str, dst: Optional[int]) -> Forward:
        """What a forward leaves for its output kind (``ctx`` None: computed on this rank alone)."""
        alone = ctx is None
        self.last_local_indices = local
        self._inputs = inputs       # a peer failure in the output's exchange finishes the forward alone from them
        mask = inputs.get("attention_mask") if alone else ctx.mask
        return Forward(rt=self._rt, out=out, hidden=got.get("hidden", out.get("last_hidden_state")),
                       token_logits=got.get("token_logits"), input_ids=inputs.get("input_ids"),
                       T=seq_geometry(self._rt.fam, inputs)[1] if alone else ctx.T, local=local,
                       chunks=[] if alone else ctx.chunks, mask=None if mask is None else mask.bool(), alone=alone,
                       dst=dst, stats=OutputStats(kind_name), logits_kept=None if alone else ctx.logits_kept)

    def _output(self, kind, fw: Forward):
        self.output_stats = fw.stats
        try:
            res = kind.compute(fw)
        except PeerError as e:
            self._rt.broken = str(e)
            if self._rt.on_peer_failure == "raise" or fw.alone:
                raise
            return self._output_alone(kind, fw.dst)
        return None if fw.dst is not None and fw.dst != self.rank else res

    def _output_alone(self, kind, dst: Optional[int]):
        """on_peer_failure="local" and a peer failed in the output's exchange: the forward again, on this rank
        alone over the whole sequence (warned), and its output."""
        rt = self._rt
        with captured(rt.fam) as got:
            out, _, _ = rt._after_peer_failure(self._inputs, None)
        self._last = self._record(self._inputs, out, None, None, got, kind.name, dst)
        return self._output(kind, self._last)

    def local_indices(self, seq_len: int) -> torch.Tensor:
        return local_indices(seq_len, self.world_size, self.rank, self.class_token, self._rt.split_costs)

    @_one_call_at_a_time
    def agree(self, request: str, values: Optional[Dict[str, Any]] = None) -> None:
        """Collective: check, before a call made of several forwards (an integration's ``encode``, a pipeline's
        call over a list), that every rank makes it with the same ``request`` (text) and ``values`` (tensors,
        numbers, strings: digested); otherwise every rank raises the same :class:`astra.InputMismatchError` now,
        not at a later forward paired with another rank's. On a broken group it returns at once."""
        self._rt.agree(str(request), dict(values or {}))

    @_one_call_at_a_time
    def gather(self, out, dst: Optional[int] = None):
        """Full outputs (same type as ``model(**inputs)``) from this rank's local outputs ``out`` of the last
        forward (collective): the explicit form of ``output="hidden_states"``."""
        err, request = None, "gather: refused; "
        try:            # any refusal travels in the agreement: raised alone, it left the ranks one call apart
            if self._last is None:
                raise AstraError("gather() needs a forward first")
            dst = check_dst(dst, self.world_size)
            self._check_local(out)
            # the local outputs themselves differ between ranks (their tokens; fields only some ranks hold, such as
            # BERT's pooler output on rank 0): the call, its dst and the per-token fields' layout are what every
            # rank must share (other dtypes or widths would pair frames of other sizes: gloo aborts)
            request = f"gather(dst={dst!r}); {token_signature(self._rt.fam, out)}; "
        except Exception as e:
            err = e
        try:
            self._rt.agree(request, {}, err)
        except PeerError:                   # a peer died since the forward: on_peer_failure="local" finishes alone
            if self._rt.on_peer_failure == "raise" or err is not None:
                raise
            return self._output_alone(OUTPUTS["hidden_states"], dst)
        if self._rt.broken is not None:     # broken before this call: no exchange (it would wait out the timeout)
            if self._rt.on_peer_failure == "raise":
                self._rt._after_peer_failure({}, None)
            return self._output_alone(OUTPUTS["hidden_states"], dst)
        fw = replace(self._last, out=out, dst=dst, stats=OutputStats("hidden_states"))
        return self._output(OUTPUTS["hidden_states"], fw)

    def _check_local(self, out) -> None:
        """``out``'s per-token fields hold this rank's tokens of the last forward (an output of an earlier forward
        with another split would pair frames of other sizes)."""
        if self._last.alone:            # computed over the whole sequence here (peer failure fallback)
            return
        want = len(self._last.chunks[self.rank]) + (1 if self._rt.cls else 0)
        for k, t in token_tensors(self._rt.fam, out).items():
            check_dense(f"gather: out[{k!r}]", t)
            if t.dim() < 2 or t.shape[1] != want:
                raise InvalidInputError(f"gather: out[{k!r}] has shape {tuple(t.shape)}, but the last forward gave "
                                        f"this rank {want} tokens: out must be this rank's local output of the "
                                        "last forward")

    @_one_call_at_a_time
    def generate(self, input_ids=None, attention_mask=None, generation_config=None, position_ids=None, **kwargs):
        """The model's own ``generate`` (HF's arguments: ``generation_config``, ``max_new_tokens``, ``do_sample``,
        ``eos_token_id``, stopping criteria, streamers, ...) after a parallel prefill: every rank runs the prefill
        of all but the last prompt token, then the last rank builds the KV cache from its tokens and the codes it
        received and calls ``generate`` with it (the model's own attention). Returns HF's result (prompt + new
        tokens, or a ``GenerateOutput`` whose ``sequences`` only are sent) on every rank (docs/runtime.md)."""
        rt = self._rt
        prompt, err = None, None
        try:
            check_generation(rt.fam)
            prompt = prepare_prompt(rt.fam, input_ids, attention_mask, position_ids, generation_config, kwargs)
        except Exception as e:              # raised on every rank by the agreement (any error: else the ranks' calls
            err = e                         # would pair off one call apart)
        try:
            return self._generate(prompt, err)
        except BaseException:
            streamer = kwargs.get("streamer")   # ended on any failure, refused arguments too (HF ends it only on
            if streamer is not None:            # success): a consumer iterating it, on any rank, finishes
                streamer.end()
            raise

    def _generate(self, prompt, err):
        rt = self._rt
        if rt.broken is not None:
            if err is not None:
                raise err
            return self._generate_alone(prompt, warn=True)
        try:
            rt.agree(*generation_request(prompt), err)
        except PeerError as e:
            if err is not None:
                raise err from e
            if rt.on_peer_failure == "raise":
                raise
            return self._generate_alone(prompt, warn=True)
        last = self.world_size - 1
        kv = None
        if prompt.prefill_len >= self.world_size:   # else a short prompt: the last rank generates alone
            _, ctx, _ = rt.run(prompt.prefill_inputs(), capture=(self.rank == last), prefill=True)
            if ctx is None:                 # a peer failed (on_peer_failure="local", warned): generate alone
                return self._generate_alone(prompt, warn=False)
            if self.rank == last:
                kv = [ctx.capture[l] for l in range(rt.fam.num_layers)]
        try:
            if self.rank != last:
                return self._receive_generated(prompt)
            return self._decode_and_send(prompt, kv)
        except PeerError as e:              # a peer died or stalled while the last rank decoded
            rt.broken = str(e)
            if rt.on_peer_failure == "raise":
                raise
            return self._generate_alone(prompt, warn=True)

    def _decode_and_send(self, prompt, kv):
        """The last rank: HF's generate from the prefill's cache, then its result (or its error) to every rank."""
        rt, last = self._rt, self.world_size - 1
        try:
            with rt.original_attention():
                result = hf_generate(self.module, prompt, kv, [self._heartbeat()])
        except PeerError:
            raise
        except BaseException as e:          # an interrupt too: the waiting ranks are told at once, not at the timeout
            self._send_header(GEN_FAILED)
            text = utf8_field(described(e), ERROR_TEXT_NBYTES)
            rt.transport.broadcast(torch.frombuffer(bytearray(text), dtype=torch.uint8).to(rt.transport.device),
                                   last, what="generate: error report")
            raise
        seq = sequences_of(result)
        try:
            self._send_header(GEN_RESULT, tuple(seq.shape))
            rt.transport.broadcast(seq.to(rt.transport.device), last, what="generate: tokens")
        except PeerError as e:
            if rt.on_peer_failure == "raise":
                raise
            rt.broken = str(e)              # on_peer_failure="local": this rank's result stands
            warnings.warn(f"{rt.place()}: peer failure ({e}); the generated tokens stay on this rank",
                          RuntimeWarning, stacklevel=3)
        return result

    def _generate_alone(self, prompt, warn: bool):
        """After a peer failure: raise the group's PeerError, or (on_peer_failure="local") generate on this rank."""
        rt = self._rt
        if rt.on_peer_failure == "raise":
            rt._after_peer_failure({}, None)        # raises the PeerError of the broken group
        if warn:
            warnings.warn(f"{rt.place()}: peer failure ({rt.broken}); generating on this rank alone "
                          "(on_peer_failure='local')", RuntimeWarning, stacklevel=3)
        rt.local_fallback = True
        with rt.original_attention():
            return hf_generate(self.module, prompt, None)

    def _heartbeat(self):
        """While the last rank decodes, a header every timeout / 4 seconds keeps the waiting ranks' waits short."""
        return Heartbeat(lambda: self._send_header(GEN_ALIVE), self._rt.transport.timeout_s / 4)

    def _send_header(self, status: int, shape=(0, 0)) -> None:
        t = self._rt.transport
        t.broadcast(torch.tensor([status, *shape], dtype=torch.long, device=t.device), self.world_size - 1,
                    what="generate: result header")

    def _receive_generated(self, prompt):
        """The last rank's ``generate`` result: headers (heartbeats, then the result's shape or a failure), then
        the tokens. A streamer given here is fed them (:func:`astra.generation.replay_to_streamer`; :meth:`generate`
        ends it on any failure)."""
        rt, last = self._rt, self.world_size - 1
        t = rt.transport
        status = GEN_ALIVE
        while status == GEN_ALIVE:
            head = t.broadcast(torch.zeros(3, dtype=torch.long, device=t.device), last, what="generate: result header")
            status, B, L = (int(x) for x in head.tolist())
        if status == GEN_FAILED:
            raw = t.broadcast(torch.zeros(ERROR_TEXT_NBYTES, dtype=torch.uint8, device=t.device), last,
                              what="generate: error report")
            text = bytes(raw.tolist()).rstrip(b"\0").decode("utf-8", "replace")
            raise RankFailedError(f"{rt.place()}: rank {last} failed in generate: {text}", rank=last)
        why = f"status {status}" if status != GEN_RESULT else implausible_result(prompt, B, L)
        if why is not None:         # before any allocation: a wrong header aborted this rank in gloo, or filled GBs
            raise FrameMismatchError(f"{rt.place()}: generate: rank {last} announced a result of {why}: the ranks "
                                     "are out of step (another astra version, or another call)")
        seq = t.broadcast(torch.zeros(B, L, dtype=torch.long, device=t.device), last, what="generate: tokens")
        replay_to_streamer(prompt, seq)
        return result_like(prompt, seq.to(self.module.device))

    @_one_call_at_a_time
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
    ``"even"``, ``"balanced"``: causal attention work balanced (later ranks hold fewer tokens, the last, which
    encodes nothing, a few more), or ``"auto"``); the input agreement rejects ranks given different splits."""
    try:
        cb = as_codebooks(codebooks, model)
        rt = DistRuntime(model, cb, group=group, class_token=class_token, timeout=timeout, kv_tables=kv_tables,
                         overlap=overlap, on_peer_failure=on_peer_failure, profile=profile, split=split)
        rt.install()
    except Exception as e:
        _report_setup_failure(model, group, timeout, e)
        raise
    _agree_setup(rt)
    return ParallelModel(model, rt)


def _agree_setup(rt: DistRuntime) -> None:
    """``parallelize``'s own agreement (call 1): ranks whose versions, world sizes, models or codebooks differ, or
    one whose ``parallelize`` failed (:func:`_report_setup_failure`), raise together here, not at the first
    forward's timeout. A peer that died first: PeerError, or with ``on_peer_failure="local"`` a warning and a
    model that computes alone."""
    try:
        rt.agree("parallelize", {})
    except PeerError as e:
        if rt.on_peer_failure == "local" and not isinstance(e, RankFailedError):
            warnings.warn(f"{rt.place()}: peer failure in parallelize ({e}); every forward will run on this rank "
                          "alone (on_peer_failure='local')", RuntimeWarning, stacklevel=3)
            return
        rt.uninstall()
        raise
    except Exception:
        rt.uninstall()
        raise


def _report_setup_failure(model, group, timeout, e: BaseException) -> None:
    """This rank's ``parallelize`` failed: send the peers, waiting in :func:`_agree_setup`, a fingerprint that
    names it, so that they raise :class:`RankFailedError` with its reason. Nothing is sent without a usable
    process group (the peers then raise PeerError at their timeout); the caller raises ``e`` either way."""
    try:
        t = Transport(group, timeout)
    except Exception:
        try:
            t = Transport(group, DEFAULT_TIMEOUT_S)     # this rank's timeout itself was refused
        except Exception:
            return
    try:
        t.device = next(model.parameters()).device
    except Exception:
        pass
    none = b"\0" * 16
    fp = Fingerprint(call=1, world=t.world, status=SETUP_FAILED, model=none, codebooks=none, values=none,
                     text=described(e), version=ak.__version__)
    try:
        t.exchange_fixed(fp.pack().to(t.device), "parallelize: failure report")
    except Exception:
        pass        # the peers died or left: this rank's own error is what its caller needs
