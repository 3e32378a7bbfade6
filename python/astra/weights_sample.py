"""Which checkpoint codebooks were made for: a small sample of its weights (:attr:`astra.Codebooks.weights_sample`).

Codebooks fit one checkpoint's hidden states; another checkpoint of the same family, hidden size and depth (a
fine-tuned variant, another seed) ran with them silently, at whatever accuracy that gave. :func:`astra.calibrate`
now keeps a sample of the model's weights in the codebooks (``SAMPLE_ELEMENTS`` values of each of up to
``SAMPLE_TENSORS`` base-model parameters, at fixed positions), and :meth:`astra.Codebooks.check_model` refuses a
model whose weights are not those. The comparison has a tolerance, so a copy of the checkpoint in bf16 or fp16
passes: a sampled value matches within ``RTOL`` of its magnitude plus its tensor's sampled rms, and the checkpoint
is the same when at least ``MATCH`` of the values match. (Two random initialisations of one configuration share
their zero biases and unit norms: well under ``MATCH``.)
"""
from __future__ import annotations

import base64
from typing import List, Optional

import torch

SAMPLE_TENSORS = 64
SAMPLE_ELEMENTS = 16
RTOL = 0.005                # bf16 rounds to within 2^-8 = 0.0039 of a value's magnitude
MATCH = 0.98


@torch.no_grad()
def _values(base) -> List[torch.Tensor]:
    """The sampled values of ``base``'s parameters, per sampled parameter (float32, CPU)."""
    params = sorted((n, p) for n, p in base.named_parameters() if p.numel())
    if len(params) > SAMPLE_TENSORS:
        pick = torch.linspace(0, len(params) - 1, SAMPLE_TENSORS).round().long().tolist()
        params = [params[i] for i in pick]
    out = []
    for _, p in params:
        flat = p.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(SAMPLE_ELEMENTS, flat.numel())).round().long()
        out.append(flat[idx.to(flat.device)].float().cpu())
    return out


def weights_sample(model) -> str:
    """The sample of ``model``'s base-model weights, as text (base64 of float32 values, with the per-parameter
    counts in front)."""
    from .models import family_of

    vals = _values(family_of(model).base)
    counts = ",".join(str(v.numel()) for v in vals)
    raw = torch.cat(vals).numpy().tobytes() if vals else b""
    return counts + ":" + base64.b64encode(raw).decode("ascii")


def _decoded(text: str) -> Optional[List[torch.Tensor]]:
    try:
        counts_text, data = text.split(":", 1)
        counts = [int(c) for c in counts_text.split(",")] if counts_text else []
        flat = torch.frombuffer(bytearray(base64.b64decode(data, validate=True)), dtype=torch.float32)
    except (ValueError, TypeError):
        return None
    if sum(counts) != flat.numel() or min(counts, default=1) < 1:
        return None
    return list(torch.split(flat, counts))


def check_text(text: str) -> None:
    """ValueError unless ``text`` is a weights sample (:func:`weights_sample`'s form)."""
    if not isinstance(text, str) or _decoded(text) is None:
        raise ValueError("weights_sample must be a sample of weights as astra.calibrate takes it "
                         f"(astra.weights_sample.weights_sample), got {str(text)[:40]!r}")


def mismatch(text: str, model) -> Optional[str]:
    """None if ``model``'s weights are those ``text`` sampled (within the tolerance above); else what differs."""
    from .models import family_of

    saved, now = _decoded(text), _values(family_of(model).base)
    if [t.numel() for t in saved] != [t.numel() for t in now]:
        return f"its parameters are laid out otherwise ({len(now)} sampled against {len(saved)})"
    if not saved:
        return None
    match = []
    for a, b in zip(saved, now):
        scale = RTOL * (a.abs() + a.pow(2).mean().sqrt())
        match.append((b - a).abs() <= scale)
    share = float(torch.cat(match).float().mean())
    return None if share >= MATCH else f"{share:.0%} of the sampled weights match (the same checkpoint: >= {MATCH:.0%})"
