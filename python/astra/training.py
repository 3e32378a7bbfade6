"""The differentiable ASTRA simulation used for fine-tuning and layer-wise calibration (training only).

:class:`TrainSimRuntime` is :class:`astra.simulation.SimRuntime` (same token split, same class-token layout, same
per-rank local/non-local key sets) with three changes, none of which affects inference:

* autograd stays on (``differentiable = True``);
* non-local tokens are quantized (in the layers that exchange them, :meth:`astra.models.Family.exchanged`)
  with a straight-through estimator: ``h_hat = C[codes] + h - sg(h)``, so the value is the codeword while the
  gradient reaches both the codebook ``C`` and the sender's hidden state ``h``;
  the commitment term ``mean ||h - C[codes]||^2`` of every quantized layer is collected in ``commitment``;
* attention is plain torch (:func:`dense_attention`) instead of the ``astra_kernels`` attention entry points, which are
  forward-only. ``tests/test_finetune.py`` checks both give the same values.

Optional, for training and calibration: Gaussian noise-augmented quantization (``naq``), quantizing only the
first ``quantize_layers`` layers, recording the vectors one layer quantizes (``record_layer``), and (ablation
only) a single ViT class token owned by rank 0 (``class_token="none"``), which the inference runtimes do not
serve.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

import astra_kernels as ak
from astra_kernels.checks import is_finite_real
from .models import family_of
from .simulation import SimRuntime
from .split import DEFAULT_SPLIT, resolve_class_token, senders


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                    scale: Optional[float]) -> torch.Tensor:
    """Differentiable softmax attention ``[B, Hq, Tq, Dh]`` with a bool ``visible`` mask broadcastable to
    ``[B, Hq, Tq, Tk]`` and grouped-query K/V ``[B, Hkv, Tk, Dh]``. A query with no visible key gets 0
    (the ``astra_kernels`` attention convention)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    s = torch.matmul(q, k.to(q.dtype).transpose(-1, -2)) * scale
    seen = visible.any(dim=-1, keepdim=True)
    s = s.masked_fill(~visible, float("-inf")).masked_fill(~seen, 0.0)
    p = torch.softmax(s.float(), dim=-1).to(q.dtype) * seen
    return torch.matmul(p, v.to(q.dtype))


def single_required_class_token(fam, class_token) -> bool:
    """Whether ``class_token`` asks a family whose class token inference always distributes (ViT) for a single one
    owned by rank 0: the training simulation's ablation, which the inference runtimes refuse."""
    return class_token in (False, "none", "single") and fam.class_token_required


def training_class_token(fam, class_token) -> bool:
    """Whether the training simulation distributes the class token for ``class_token`` (as inference does, and the
    single-class-token ablation above)."""
    return False if single_required_class_token(fam, class_token) else resolve_class_token(fam, class_token)


class TrainSimRuntime(SimRuntime):
    """Differentiable all-ranks simulation (see the module docstring). ``naq`` is lambda of noise-augmented
    quantization (0 = off); ``generator`` seeds its noise."""

    differentiable = True

    def __init__(self, model, codebooks, world_size: int, class_token="auto", *, naq: float = 0.0,
                 generator: Optional[torch.Generator] = None, quantize_layers: Optional[int] = None,
                 record_layer: Optional[int] = None, split: str = DEFAULT_SPLIT):
        single_vit = single_required_class_token(family_of(model), class_token)
        super().__init__(model, codebooks, world_size, "auto" if single_vit else class_token, split)
        if single_vit:
            self.cls = False            # ablation: the class token is rank 0's token like any other
        if not is_finite_real(naq, positive=False):
            raise ValueError(f"naq (noise scale lambda) must be a finite number >= 0, got {naq}")
        self.naq = float(naq)
        self.generator = generator
        self.quantize_layers = quantize_layers
        self.commitment: List[torch.Tensor] = []
        self.record_layer = record_layer
        self.recorded: List[torch.Tensor] = []          # layer ``record_layer``'s quantized vectors [n, D]

    def install(self) -> None:
        super().install()
        if self.codebooks is not None:   # keep the caller's tensors (nn.Parameters) so gradients reach them
            p = next(self.model.parameters())
            self._cb = [c if c.device == p.device else c.to(p.device) for c in self.codebooks.tensors]

    # -- quantization ----------------------------------------------------------------------------
    def quantize(self, layer: int, h: torch.Tensor, valid: Optional[torch.Tensor],
                 pred: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Straight-through VQ of ``h [B, n, D]`` (with predictive codebooks: of its residual ``h - pred``, the
        prediction added back) (+ NAQ noise); adds this layer's commitment term."""
        C = self._cb[layer]
        G, K, d = C.shape
        x = h.detach() if pred is None else h.detach() - pred.detach().to(h.dtype)
        with torch.no_grad():
            # C itself, not C.detach() (a new tensor each call): the encoder's per-codebook preparation is cached
            # on the tensor and its version, so the ranks of one step share it and an optimizer step renews it
            codes = ak.vq_encode(self.transform(layer, x).to(C.dtype), C).long()        # [B, n, G]
        # index_select: its backward (index_add_) sums each codeword's gradient in a fixed order on CPU; advanced
        # indexing's (index_put_ accumulating) does not with several threads, and fine-tunes came out different
        flat = codes + torch.arange(G, device=C.device) * K                             # rows of C [G * K, d]
        q = C.reshape(G * K, d).index_select(0, flat.reshape(-1)).reshape(h.shape)      # [B, n, D] transformed
        q = self.untransform(layer, q).to(h.dtype)
        if pred is not None:
            q = q + pred.to(h.dtype)
        resid = h - q
        rows = resid if valid is None else resid[valid]
        if rows.shape[0]:
            self.commitment.append(rows.pow(2).mean())
        if self.naq > 0 and rows.shape[0] > 1:
            std = rows.detach().std(dim=0)                                              # per dimension
            noise = torch.randn(q.shape, generator=self.generator, device=q.device, dtype=q.dtype)
            q = q + noise * (std * self.naq)
        return q + (h - h.detach())

    def on_layer_input(self, layer, module, h):
        ctx = self.ctx
        quant = (self.codebooks is not None and self.N > 1 and self.fam.exchanged(layer)
                 and (self.quantize_layers is None or layer < self.quantize_layers))
        hats = []
        sends = senders(self.fam, ctx.chunks)     # a causal model's last rank sends nothing: nothing to fit or train
        for s in range(self.N):
            hs = h[:, self._ext(ctx.chunks[s])]
            valid = None if ctx.mask is None else ctx.mask[:, ctx.chunks[s]]
            if layer == self.record_layer and sends[s]:
                self.recorded.append((hs if valid is None else hs[valid]).reshape(-1, hs.shape[-1]).detach())
            if quant and sends[s]:
                hats.append(self.quantize(layer, hs, valid, self.predicted(layer, s) if self.predictive else None))
            else:
                hats.append(hs)
            if self.predictive:
                self.reconstructions()[s] = hats[-1]
        ctx.state[layer] = hats

    # -- attention -------------------------------------------------------------------------------
    def attention(self, module, q, k, v, scaling):
        ctx = self.ctx
        hats = ctx.state.pop(module._astra_layer)
        kv_hat = [self.remote_kv(module, hats[s], self._pos_for(ctx.chunks[s])) for s in range(self.N)]
        outs, rows = [], []
        for r in range(self.N):
            le, lg = self._local_ext(r), self._local_global(r)
            others = [s for s in range(self.N) if s != r]
            keys = torch.cat([k[:, :, le]] + [kv_hat[s][0].to(k.dtype) for s in others], dim=2)
            vals = torch.cat([v[:, :, le]] + [kv_hat[s][1].to(v.dtype) for s in others], dim=2)
            kpos = torch.cat([lg] + [ctx.chunks[s] for s in others])
            visible = torch.ones(1, 1, lg.numel(), kpos.numel(), dtype=torch.bool, device=q.device)
            if ctx.mask is not None:
                visible = visible & ctx.mask[:, kpos][:, None, None, :]
            if self.fam.causal:
                visible = visible & (kpos[None, :] <= lg[:, None])
            outs.append(dense_attention(q[:, :, le], keys, vals, visible, scaling))
            rows.append(le)
        out = torch.cat(outs, dim=2)[:, :, torch.argsort(torch.cat(rows))]
        return out.transpose(1, 2).contiguous(), None

    def run(self, inputs, capture: bool = False, prefill: bool = False):
        if capture or prefill:
            raise ValueError("TrainSimRuntime neither captures K/V nor prefills (use astra.simulate)")
        self.commitment = []
        return super().run(inputs)
