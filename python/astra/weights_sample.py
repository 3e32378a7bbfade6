"""Which checkpoint codebooks were made for: a small sample of its weights (:attr:`astra.Codebooks.weights_sample`).

Codebooks fit one checkpoint's hidden states; another checkpoint of the same family, hidden size and depth (a
fine-tuned variant, another seed) ran with them silently, at whatever accuracy that gave. :func:`astra.calibrate`
now keeps a sample of the model's weights in the codebooks (``SAMPLE_ELEMENTS`` values of every base-model
parameter, at fixed positions, by name), and :meth:`astra.Codebooks.check_model` refuses a model whose weights are
not those. The parameters are compared by name where both have them, so a head whose base has no pooler (HF's
masked-LM and token-classification heads) matches its base model; at least ``SHARED`` of the sampled names must be
common. The comparison has a tolerance, so a copy of the checkpoint in bf16 or fp16 passes: a sampled value matches
within ``RTOL`` of its magnitude plus its parameter's sampled rms, and the checkpoint is the same when at least
``MATCH`` of the values match. (Two random initialisations of one configuration share their zero biases and unit
norms: well under ``MATCH``.)
"""
from __future__ import annotations

import base64
from typing import Dict, Optional

import torch

SAMPLE_ELEMENTS = 16
SHARED = 0.9
RTOL = 0.005                # bf16 rounds to within 2^-8 = 0.0039 of a value's magnitude
MATCH = 0.98


@torch.no_grad()
def sample_values(base) -> Dict[str, torch.Tensor]:
    """The sampled values of ``base``'s parameters (any module) by name: ``SAMPLE_ELEMENTS`` of each at evenly spaced
    positions (float32, CPU)."""
    out = {}
    for name, p in sorted(base.named_parameters()):
        flat = p.detach().reshape(-1)
        if flat.numel():
            m = min(SAMPLE_ELEMENTS, flat.numel())       # integer positions (a float32 linspace rounded the last
            idx = torch.arange(m) * (flat.numel() - 1) // max(m - 1, 1)    # one past the end beyond 2^24)
            out[name] = flat[idx.to(flat.device)].float().cpu()
    return out


def weights_sample(model) -> str:
    """The sample of ``model``'s base-model weights, as text: ``name=count`` per parameter, then ``|`` and the
    values' float32 bytes in base64."""
    from .models import family_of

    vals = sample_values(family_of(model).base)
    names = ",".join(f"{n}={v.numel()}" for n, v in vals.items())
    raw = torch.cat(list(vals.values())).numpy().tobytes() if vals else b""
    return names + "|" + base64.b64encode(raw).decode("ascii")


def _decoded(text: str) -> Optional[Dict[str, torch.Tensor]]:
    try:
        names_text, data = text.split("|", 1)
        pairs = [item.rsplit("=", 1) for item in names_text.split(",")] if names_text else []
        names, counts = [n for n, _ in pairs], [int(c) for _, c in pairs]
        flat = torch.frombuffer(bytearray(base64.b64decode(data, validate=True)), dtype=torch.float32)
    except (ValueError, TypeError):
        return None
    if sum(counts) != flat.numel() or min(counts, default=1) < 1 or len(set(names)) != len(names):
        return None
    return dict(zip(names, torch.split(flat, counts)))


def check_text(text: str) -> None:
    """ValueError unless ``text`` is a weights sample (:func:`weights_sample`'s form)."""
    if not isinstance(text, str) or _decoded(text) is None:
        raise ValueError("weights_sample must be a sample of weights as astra.calibrate takes it "
                         f"(astra.weights_sample.weights_sample), got {str(text)[:40]!r}")


def mismatch(text: str, model) -> Optional[str]:
    """None if ``model``'s weights are those ``text`` sampled (within the tolerances above); else what differs."""
    from .models import family_of

    saved, now = _decoded(text), sample_values(family_of(model).base)
    common = [n for n in saved if n in now and now[n].numel() == saved[n].numel()]
    if len(common) < SHARED * max(len(saved), len(now)) or not common:
        return (f"its parameters are laid out otherwise ({len(common)} of the {len(saved)} sampled found, the model "
                f"has {len(now)})")
    match = []
    for n in common:
        a, b = saved[n], now[n]
        match.append((b - a).abs() <= RTOL * (a.abs() + a.pow(2).mean().sqrt()))
    share = float(torch.cat(match).float().mean())
    return None if share >= MATCH else f"{share:.0%} of the sampled weights match (the same checkpoint: >= {MATCH:.0%})"
