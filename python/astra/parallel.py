"""``astra.parallelize``: run a HF model as one rank of an ASTRA sequence-parallel group."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

import astra_kernels as ak
from .codebooks import as_codebooks
from .errors import AstraError
from .runtime import LayerStats, _masks, _RuntimeBase, check_inputs, local_indices, make_ctx
from .transport import DEFAULT_TIMEOUT_S, Transport, frame_sizes


class DistRuntime(_RuntimeBase):
    def __init__(self, model, codebooks, *, group=None, class_token="auto", timeout=DEFAULT_TIMEOUT_S,
                 kv_tables="auto", overlap=True):
        super().__init__(model, codebooks, class_token)
        self.overlap = bool(overlap)
        self.transport = Transport(group, timeout)
        self.rank = self.transport.rank
        self.world = self.transport.world
        self.stats: List[LayerStats] = []
        self.kv_tables = kv_tables
        self.tables: Optional[List] = None
        self._local = None

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
        x[:, 0] = self.transport.all_reduce_mean(x[:, 0])
        return x

    def on_layer_input(self, layer, module, h):
        ctx = self.ctx
        send = h[:, 1:] if ctx.cls else h
        lengths = [int(c.numel()) for c in ctx.chunks]
        st = self.stats[layer]
        st.tokens_sent = ctx.B * lengths[self.rank]
        what = f"layer {layer} all-gather"
        if self.codebooks is None:
            pend = self.transport.start_tensor(send, lengths, dim=1, stats=st, what=what)
        else:
            frame = ak.encode_and_pack(send, self._cb[layer], self.codebooks.bits)   # codes [B, n, G]
            sizes = frame_sizes(ctx.B, lengths, self.codebooks.groups, self.codebooks.bits)
            pend = self.transport.start_frames(frame, sizes, stats=st, what=what)
        ctx.state[layer] = pend

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
        others = [s for s in range(self.world) if s != self.rank]
        lg = self._local
        rg = torch.cat([ctx.chunks[s] for s in others]) if others else lg[:0]
        lm, rm = _masks(ctx, lg, rg)
        causal, fam = self.fam.causal, self.fam
        local_part = None
        if self.overlap and others:
            # local attention while the codes are in flight; merged with the non-local part by log-sum-exp
            local_part = ak.mixed_attention(q, k, v, q_pos=lg, causal=causal, local_mask=lm, scale=scaling,
                                              return_lse=True)
        parts = pend.wait()
        if not others:
            o = ak.mixed_attention(q, k, v, q_pos=lg, causal=causal, local_mask=lm, scale=scaling)
            if ctx.capture is not None:
                ctx.capture[layer] = (k, v)
            return o.to(q.dtype).transpose(1, 2).contiguous(), None
        remote = dict(kv_pos=rg, remote_mask=rm)
        k_hat = v_hat = None
        if self.codebooks is None:
            h_hat = torch.cat([parts[s] for s in others], dim=1)
            k_hat, v_hat = self.remote_kv(module, h_hat, self._pos_for(rg))
        else:
            codes = torch.cat([ak.unpack_codes(parts[s]).to(q.device) for s in others], dim=1)  # [B, Tr, G]
            if self.tables is not None and (not fam.rope or ctx.default_pos):
                kt, vt = self.tables[layer]
                remote.update(codes=codes[..., 0], k_table=kt, v_table=vt)
                if fam.rope:
                    remote["rope_cos"], remote["rope_sin"] = self._rope_table(q.dtype)
                if ctx.capture is not None:
                    k_hat, v_hat = self.remote_kv(module, self.decode(layer, codes, q.dtype), self._pos_for(rg))
            else:
                k_hat, v_hat = self.remote_kv(module, self.decode(layer, codes, q.dtype), self._pos_for(rg))
        if "codes" not in remote:
            remote.update(k_hat=k_hat, v_hat=v_hat)
        if local_part is None:
            o = ak.mixed_attention(q, k, v, q_pos=lg, causal=causal, local_mask=lm, scale=scaling, **remote)
        else:
            o_r, lse_r = ak.mixed_attention(q, None, None, include_local=False, q_pos=lg, causal=causal,
                                              scale=scaling, return_lse=True, **remote)
            o, _ = ak.merge_attention(local_part[0], local_part[1], o_r, lse_r)
        if ctx.capture is not None:
            K = k.new_empty(k.shape[0], k.shape[1], ctx.T, k.shape[3])
            V = torch.empty_like(K)
            K[:, :, lg], V[:, :, lg] = k, v
            K[:, :, rg], V[:, :, rg] = k_hat.to(K.dtype), v_hat.to(V.dtype)
            ctx.capture[layer] = (K, V)
        return o.to(q.dtype).transpose(1, 2).contiguous(), None

    # -- one forward -----------------------------------------------------------------------------
    def run(self, inputs: Dict[str, Any], capture: bool = False):
        fam = self.fam
        inputs = check_inputs(fam, inputs)
        ctx = make_ctx(fam, inputs, self.world, self.cls)
        local = local_indices(ctx.T, self.world, self.rank, ctx.cls).to(ctx.chunks[0].device)
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
        self.ctx = ctx
        try:
            with torch.no_grad():
                out = self.model(**call)
        finally:
            self.ctx = None
        if fam.name == "bert" and not ctx.cls and self.rank != 0 and "pooler_output" in out:
            # without distributed class tokens, [CLS] lives on rank 0 only; other ranks have no pooler output
            out = type(out)(**{k: v for k, v in out.items() if k != "pooler_output"})
        return out, ctx, local


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

    def __call__(self, **inputs):
        out, ctx, local = self._rt.run(inputs)
        self.last_local_indices = local
        self._last_T = ctx.T
        return out

    forward = __call__

    def local_indices(self, seq_len: int) -> torch.Tensor:
        return local_indices(seq_len, self.world_size, self.rank, self.class_token)

    def gather(self, out):
        """Full outputs (same type as ``model(**inputs)``) from every rank's local outputs (collective)."""
        if self._last_T is None:
            raise AstraError("gather() needs a forward first")
        rt, T = self._rt, self._last_T
        cls = rt.cls
        from .runtime import split_indices

        lengths = [int(c.numel()) for c in split_indices(T, rt.world, cls)]
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
        if self.rank != last:
            return None
        kv = [ctx.capture[l] for l in range(self._rt.fam.num_layers)]
        with self._rt.original_attention():
            return greedy_decode(self.module, kv, out.logits[:, -1], ctx.T, max_new_tokens, attention_mask)

    def unpatch(self) -> None:
        self._rt.uninstall()


def parallelize(model, codebooks=None, *, group=None, class_token="auto", timeout: float = DEFAULT_TIMEOUT_S,
                kv_tables="auto", overlap: bool = True) -> ParallelModel:
    """Make ``model`` one ASTRA rank of ``group`` (default: the world group). Patches the model in place
    (attention implementation + hooks; weights untouched); :func:`astra.unpatch` restores it.

    ``codebooks=None`` is full-precision sequence parallelism. ``timeout`` (seconds) bounds every wait on a
    peer: a dead or stalled peer raises :class:`astra.PeerError` on the surviving ranks. ``kv_tables``:
    precompute per-layer codeword K/V tables and use the table attention path (G = 1 only; "auto").
    ``overlap``: run the local attention while the layer's codes are in flight and merge it with the
    non-local part by log-sum-exp (else one fused pass after the codes arrive)."""
    cb = as_codebooks(codebooks, model)
    rt = DistRuntime(model, cb, group=group, class_token=class_token, timeout=timeout, kv_tables=kv_tables,
                     overlap=overlap)
    rt.install()
    return ParallelModel(model, rt)
