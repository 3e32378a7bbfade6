"""Where one rank's forward time goes, layer by layer (``astra.parallelize(..., profile=True)``; off by default).

The profiler keeps one timeline per forward: each mark charges the time since the previous mark to one phase
of one layer, so the phases tile the forward with no gap and no overlap. When profiling is off the runtime
holds no profiler and does nothing extra (no timer, no synchronisation, no allocation). On CUDA every mark
synchronises the device, so the profiled forward is slower than an unprofiled one there.

Phases of a layer, in timeline order (:data:`PHASES`):

* ``encode``: VQ-encode this rank's hidden states (full precision: nothing);
* ``pack``: the codec frame, the envelope and issuing the all-gather;
* ``qkv``: the model's local Q/K/V projection (between the exchange's issue and the attention call);
* ``local attention``: local queries on local keys, while the codes are in flight (``overlap=True``);
* ``wait``: blocked on the link, and the envelope check;
* ``unpack``: the frames back to codes (full precision: nothing);
* ``non-local K/V``: decode + K/V projection of the non-local tokens (nothing with K/V tables);
* ``attention``: the non-local (or fused) attention and the log-sum-exp merge;
* ``rest``: the rest of the block (output projection, MLP, norms) up to the next layer's exchange (the last
  layer's: up to the end of the model, final norm and class-token mean included).

Outside the layers (:data:`OUTSIDE`): ``before layers`` (input agreement, the split, the embeddings) and
``after layers`` (the end-of-forward status exchange).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

PHASES = ("encode", "pack", "qkv", "local attention", "wait", "unpack", "non-local K/V", "attention", "rest")
OUTSIDE = ("before layers", "after layers")
ENCODE, PACK, QKV, LOCAL_ATTN, WAIT, UNPACK, NONLOCAL_KV, ATTN, REST = range(len(PHASES))
BEFORE, AFTER = range(len(OUTSIDE))


@dataclass
class Breakdown:
    """One forward's phase times in seconds: ``layers[l][phase]`` and ``outside[name]``; ``total_s`` is the
    forward's wall time measured independently of the marks (by :class:`Profiler` from start to stop)."""

    layers: List[Dict[str, float]]
    outside: Dict[str, float]
    total_s: float

    def phase_totals(self) -> Dict[str, float]:
        """Seconds per phase summed over the layers, then the phases outside the layers."""
        sums = {p: sum(row[p] for row in self.layers) for p in PHASES}
        sums.update(self.outside)
        return sums

    def residual_s(self) -> float:
        """The total minus the sum of every phase (the time no phase accounts for)."""
        return self.total_s - sum(self.phase_totals().values())

    def to_dict(self) -> Dict:
        return {"layers": self.layers, "outside": self.outside, "total_s": self.total_s}

    @classmethod
    def from_dict(cls, d: Dict) -> "Breakdown":
        return cls(layers=d["layers"], outside=d["outside"], total_s=d["total_s"])


class Profiler:
    """The marks of :class:`Breakdown` for a runtime of ``num_layers`` layers on ``device``."""

    def __init__(self, num_layers: int, device: torch.device):
        self.num_layers = num_layers
        self._cuda = torch.device(device).type == "cuda"
        self._rows: List[List[float]] = []
        self._outside: List[float] = []
        self._t0 = self._t = 0.0
        self.last: Optional[Breakdown] = None

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        self.last = None            # a forward that does not finish (a fallback, an error) leaves no breakdown
        self._rows = [[0.0] * len(PHASES) for _ in range(self.num_layers)]
        self._outside = [0.0] * len(OUTSIDE)
        self._t0 = self._t = self._now()

    def mark(self, layer: int, phase: int) -> None:
        """Charge the time since the previous mark to ``phase`` of ``layer``."""
        t = self._now()
        self._rows[layer][phase] += t - self._t
        self._t = t

    def mark_outside(self, which: int) -> None:
        t = self._now()
        self._outside[which] += t - self._t
        self._t = t

    def stop(self) -> Breakdown:
        total = self._now() - self._t0
        self.last = Breakdown(layers=[dict(zip(PHASES, row)) for row in self._rows],
                              outside=dict(zip(OUTSIDE, self._outside)), total_s=total)
        return self.last


def format_breakdown(b: Breakdown, title: str, wall_s: Optional[float] = None) -> str:
    """A markdown table: a row per layer (ms per phase), the sum over layers, the phases outside the layers,
    and how the sum of the phases compares with the total (and with ``wall_s``, the caller's own timing)."""
    head = "| layer | " + " | ".join(PHASES) + " | layer total |"
    lines = [title, "", head, "|" + "---|" * (len(PHASES) + 2)]
    for l, row in enumerate(b.layers):
        lines.append(f"| {l} | " + " | ".join(f"{1e3 * row[p]:.1f}" for p in PHASES)
                     + f" | {1e3 * sum(row.values()):.1f} |")
    sums = b.phase_totals()
    in_layers = sum(sums[p] for p in PHASES)
    lines.append("| **all layers** | " + " | ".join(f"**{1e3 * sums[p]:.1f}**" for p in PHASES)
                 + f" | **{1e3 * in_layers:.1f}** |")
    share = " ".join(f"{p} {100 * sums[p] / b.total_s:.1f} %;" for p in PHASES) if b.total_s > 0 else ""
    lines += ["", "share of the total: " + share,
              "outside the layers: " + ", ".join(f"{p} {1e3 * sums[p]:.1f} ms" for p in OUTSIDE)]
    phases = sum(sums.values())
    res = b.total_s - phases
    line = (f"total {1e3 * b.total_s:.1f} ms = phases {1e3 * phases:.1f} ms + residual {1e3 * res:.2f} ms "
            f"({100 * res / b.total_s:+.2f} %)" if b.total_s > 0 else "total 0")
    if wall_s is not None:
        gap = wall_s - phases
        line += (f"; the caller's wall time {1e3 * wall_s:.1f} ms = phases + {1e3 * gap:.2f} ms "
                 f"({100 * gap / wall_s:+.2f} %)")
    lines.append(line)
    return "\n".join(lines) + "\n"
