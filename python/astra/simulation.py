"""``astra.simulate``: every rank's computation in one process (the reference of the distributed runtime)."""
from __future__ import annotations

import contextlib
from typing import Any, Dict

import torch

import astra_kernels as ak
from astra_kernels.checks import is_count
from .codebooks import as_codebooks
from .context import key_masks
from .generation import prefill_call
from .inputs import validate_inputs
from .models import family_of
from .runtime import RuntimeBase
from .split import DEFAULT_SPLIT, resolve_class_token, with_class_token


class SimRuntime(RuntimeBase):
    """All ranks at once. With distributed class tokens the sequence is laid out as
    ``[cls copy of rank 0, ..., cls copy of rank N-1, token 1, ..., token T-1]``."""

    def __init__(self, model, codebooks, world_size: int, class_token="auto", split=DEFAULT_SPLIT):
        if not is_count(world_size, 1):
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")   # 2.5 ran as 2
        super().__init__(model, codebooks, class_token, split)
        self.N = world_size

    # extended-sequence index of global index g (non-class tokens)
    def _ext(self, g: torch.Tensor) -> torch.Tensor:
        return g + (self.N - 1) if self.ctx.cls else g

    def _local_ext(self, r: int) -> torch.Tensor:
        chunk = self._ext(self.ctx.chunks[r])
        if self.ctx.cls:
            return torch.cat([torch.tensor([r], device=chunk.device), chunk])
        return chunk

    def _local_global(self, r: int) -> torch.Tensor:
        return with_class_token(self.ctx.chunks[r], self.ctx.cls)

    def place(self) -> str:
        return f"astra.simulate (world_size={self.N})"

    def global_token(self, i: int) -> int:
        if self.ctx.cls:
            return 0 if i < self.N else i - (self.N - 1)
        return i

    def on_embeddings(self, out):
        if not self.ctx.cls:
            return out
        return torch.cat([out[:, :1]] * self.N + [out[:, 1:]], dim=1)

    def on_final(self, x):
        copies = x[:, : self.N]
        return torch.cat([copies.mean(dim=1, keepdim=True), x[:, self.N:]], dim=1)

    def on_layer_input(self, layer, module, h):
        self.ctx.state[layer] = [self.sent(layer, s, h[:, self._ext(self.ctx.chunks[s])]) for s in range(self.N)]

    def sent(self, layer: int, s: int, hs: torch.Tensor) -> torch.Tensor:
        """What the other ranks hold of rank ``s``'s tokens ``hs [B, n, D]`` in layer ``layer``: ``hs`` itself (full
        precision), their codes ``[B, n, G]``, or, with predictive codebooks, their reconstruction ``[B, n, D]``
        (which is also what layer ``layer + 1`` predicts from). In a layer the ranks compute themselves
        (:meth:`astra.models.Family.exchanged`) it is what they compute, :meth:`computed_input` (the adapter's
        ``embed`` / ``first_input``), not ``hs``, which must equal it (:meth:`checked_first_input`)."""
        if not self.fam.exchanged(layer):
            hs = self.checked_first_input(hs, self.ctx.chunks[s])
        if self.codebooks is None:
            return hs
        if not self.predictive:
            return self.encode(layer, hs) if self.fam.exchanged(layer) else hs
        if self.fam.exchanged(layer):
            pred = self.predicted(layer, s)
            hs = self.decode(layer, self.encode(layer, hs, pred), hs.dtype, pred)
        self.reconstructions()[s] = hs
        return hs

    def reconstructions(self) -> list:
        """Per rank, what the others hold of its tokens in the current layer (predictive codebooks: what the next
        layer predicts from; None before the first layer)."""
        return self.ctx.state.setdefault("recon", [None] * self.N)

    def predicted(self, layer: int, s: int) -> torch.Tensor:
        """Layer ``layer``'s prediction of rank ``s``'s tokens (predictive codebooks)."""
        return self.prediction(layer, self.ctx.chunks[s], self.reconstructions()[s])

    def attention(self, module, q, k, v, scaling):
        ctx = self.ctx
        layer = module._astra_layer
        hats = ctx.state.pop(layer)
        # K/V of every rank's dequantized tokens, once per layer
        pos = [self._pos_for(ctx.chunks[s]) for s in range(self.N)]
        coded = self.codebooks is not None and not self.predictive and self.fam.exchanged(layer)
        kv_hat = [self.quantized_kv(layer, module, hats[s], pos[s], q.dtype) if coded
                  else self.remote_kv(module, hats[s], pos[s]) for s in range(self.N)]
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
            lm, rm = key_masks(ctx, lg, rg)
            o = ak.attention_per_token(
                q[:, :, le], k[:, :, le], v[:, :, le], k_hat, v_hat, q_pos=lg, kv_pos=rg,
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

    def run(self, inputs: Dict[str, Any], capture: bool = False, prefill: bool = False):
        self.check_model_state()
        inputs = validate_inputs(self.fam, inputs, self.N, self.cls)
        self.layer = None
        self.ctx = self.new_ctx(inputs, self.N)
        if capture:
            self.ctx.capture = {}
        try:
            with contextlib.nullcontext() if self.differentiable else torch.no_grad():
                if self.fam.decoder:        # the position ids every rank is given (a slice of), as parallelize
                    inputs = dict(inputs, use_cache=False, position_ids=self.ctx.pos_ids)
                out = self.model(**(prefill_call(self.model, inputs) if prefill else inputs))
            return out, self.ctx
        finally:
            self.ctx = None


def simulate(model, inputs: Dict[str, Any], *, world_size: int, codebooks=None, class_token="auto",
             split: str = DEFAULT_SPLIT, differentiable: bool = False):
    """Compute, in one process, exactly what ``world_size`` ASTRA ranks compute; return ``model(**inputs)``'s
    output type for the whole sequence.

    ``codebooks=None`` is full-precision sequence parallelism (equals the unmodified model).
    ``class_token``: ``"auto"`` (distributed for ViT, single for BERT), ``"distributed"`` or ``"none"``.
    ``split``: the token split (:data:`astra.split.SPLITS`); must be :func:`astra.parallelize`'s to match it.
    ``differentiable``: run with autograd (:func:`astra.finetune`'s runtime, the same values): gradients reach the
    model's weights and codebook tensors that require grad, through a straight-through estimator where non-local
    tokens are quantized (to the sender's hidden state) and the codeword lookup (to the codebooks).
    """
    out, _ = simulate_with_context(model, inputs, world_size=world_size, codebooks=codebooks,
                                   class_token=class_token, split=split, differentiable=differentiable)
    return out


def simulate_with_context(model, inputs, *, world_size, codebooks=None, class_token="auto", capture=False,
                          split=DEFAULT_SPLIT, differentiable: bool = False, prefill: bool = False):
    """``simulate``'s output and the forward's :class:`~astra.context.Ctx` (with ``capture``: every layer's K/V
    as the last rank sees them, for generation; ``prefill``: a generate prefill, whose LM head computes the last
    position's logits only, :func:`astra.generation.prefill_call`)."""
    cb = as_codebooks(codebooks, model)
    if not isinstance(differentiable, bool):
        raise ValueError(f"differentiable must be a bool, got {differentiable!r}")
    if differentiable:
        from .training import TrainSimRuntime  # it builds on this module's SimRuntime

        resolve_class_token(family_of(model), class_token)   # refused as here (finetune's ViT ablation is not)
        rt = TrainSimRuntime(model, cb, world_size, class_token, split=split)
    else:
        rt = SimRuntime(model, cb, world_size, class_token, split)
    rt.install()
    try:
        return rt.run(inputs, capture=capture, prefill=prefill)
    finally:
        rt.uninstall()
