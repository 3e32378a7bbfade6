"""Cost model of a sequence-parallel prefill: compute plus link transfer, fitted at N = 2.

For one system (full-precision SP, ASTRA G = 32, ASTRA G = 1, HF TP) on one model at N ranks and a link
of R Mbit/s, the predicted latency of one forward is

    latency(N, R) = compute(N) + eta * C * max(0, link_bytes(N) / C - burst) * 8 / R + per_collective * C

* ``compute(N)`` comes from the forward on the unshaped loopback at N = 2 (its time minus the time the
  slowest rank spent waiting on peers), split into the local part (the ceiling's time: T/N tokens with no
  communication, which shrinks as 1/N) and the rest (non-local keys and values: (N - 1)/N of the tokens),
  then scaled by the CPU contention of N single-threaded ranks on the machine's cores.
* ``link_bytes(N)``: the bytes that cross the one link all ranks share, from the bytes measured at N = 2
  (an all-gather's frames, padded to the largest chunk's, reach the N - 1 others, the largest chunk at N
  following the split; a ring all-reduce sends 2 (N - 1)/N of its tensor), spread over the forward's ``C``
  collectives.
* ``burst``: the link's token bucket (:data:`astra.netlink.TBF_BURST_BYTES`), refilled while the ranks
  compute between two collectives (at most ``R`` times that gap): that much of each collective passes at
  the loopback's own speed, so only the rest is charged at ``R`` (a G = 32 layer exchange at N = 2, ~47 KB,
  fits in it; at N = 4 its ~140 KB does not).
* ``eta`` (the link's efficiency: protocol overhead, shaping) and ``per_collective`` (seconds of fixed
  cost per collective) are the only fitted numbers, by least squares on the relative error over the
  points used to fit (unweighted, the slowest system's seconds would decide alone).

The error is reported on the measured points not used to fit (other bandwidths, N = 4 and 8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .netlink import TBF_BURST_BYTES, link_bytes_allgather, link_bytes_allreduce
from .split import split_indices


@dataclass(frozen=True)
class Profile:
    """What the N = 2 unshaped run of one system measured (per forward, slowest rank)."""

    system: str
    model: str
    compute_s: float          # forward time on the unshaped loopback minus the time waiting on peers
    local_s: float            # the ceiling at N = 2: T/2 tokens with no communication
    frame_bytes: float        # bytes one rank contributes per forward, summed over collectives
    collectives: int          # collectives per forward
    kind: str = "allgather"   # "allgather" (sequence parallel) or "allreduce" (tensor parallel)
    tokens: int = 0           # T (0: unknown, chunks taken as T/N)
    split_costs: Optional[Tuple[float, ...]] = None    # the split's costs (astra.split_indices; None: even)


def largest_chunk(p: Profile, world: int) -> float:
    """Tokens of the largest rank's chunk at ``world`` ranks (the split is a function of T, N and its costs; with
    T unknown, T/N)."""
    if p.tokens < world:
        return 1.0 / world
    return float(max(len(c) for c in split_indices(p.tokens, world, False, p.split_costs)))


@dataclass(frozen=True)
class Point:
    """A measured latency (median seconds) of ``system`` on ``model`` at ``world`` ranks and ``rate``."""

    system: str
    model: str
    world: int
    rate_mbit: Optional[float]      # None: unshaped loopback
    latency_s: float


def contention(world: int, cores: int) -> float:
    """Slow-down of ``world`` single-threaded ranks sharing ``cores`` cores (1 while each has its own)."""
    if world < 1 or cores < 1:
        raise ValueError(f"world and cores must be >= 1, got {world}, {cores}")
    return max(1.0, world / cores)


def compute_time(p: Profile, world: int, cores: int) -> float:
    """Per-forward compute of one rank at ``world`` ranks, from its N = 2 profile."""
    local = p.local_s * 2.0 / world
    rest = max(0.0, p.compute_s - p.local_s) * ((world - 1) / world) / 0.5
    return (local + rest) * contention(world, cores) / contention(2, cores)


def link_bytes(p: Profile, world: int) -> float:
    """Bytes one forward puts on the shared link at ``world`` ranks (frame bytes measured at N = 2)."""
    if p.kind == "allreduce":
        return float(link_bytes_allreduce(int(p.frame_bytes), world))
    # a padded all-gather: every rank sends the largest chunk's frame, whose tokens follow the split at N
    per_rank = p.frame_bytes * largest_chunk(p, world) / largest_chunk(p, 2)
    return float(link_bytes_allgather(int(round(per_rank)), world))


def charged_seconds(p: Profile, world: int, rate_mbit: float, burst_bytes: float, cores: int) -> float:
    """Seconds the shaped link charges one forward at ``rate_mbit``: per collective, its share of
    :func:`link_bytes` beyond the bucket (``burst_bytes``, refilled during the compute between collectives)."""
    c = max(1, p.collectives)
    per_s = rate_mbit * 1e6 / 8.0
    refill = min(float(burst_bytes), per_s * compute_time(p, world, cores) / c)
    return c * max(0.0, link_bytes(p, world) / c - refill) / per_s


@dataclass(frozen=True)
class CostModel:
    eta: float                    # link efficiency factor on the transfer term
    per_collective_s: float       # fixed seconds per collective
    cores: int
    burst_bytes: float = TBF_BURST_BYTES

    def predict(self, p: Profile, world: int, rate_mbit: Optional[float]) -> float:
        t = compute_time(p, world, self.cores)
        if rate_mbit is not None:
            t += self.eta * charged_seconds(p, world, rate_mbit, self.burst_bytes, self.cores)
            t += self.per_collective_s * p.collectives
        return t


def _solve2(rows: List[Sequence[float]], ys: List[float]):
    """Least squares for y = a x1 + b x2 (normal equations; b = 0 when x2 carries no information)."""
    s11 = sum(r[0] * r[0] for r in rows)
    s12 = sum(r[0] * r[1] for r in rows)
    s22 = sum(r[1] * r[1] for r in rows)
    t1 = sum(r[0] * y for r, y in zip(rows, ys))
    t2 = sum(r[1] * y for r, y in zip(rows, ys))
    det = s11 * s22 - s12 * s12
    if s11 <= 0:
        raise ValueError("the points used to fit carry no transfer time (fit on at least one shaped bandwidth)")
    if abs(det) <= 1e-12 * max(1.0, s11 * s22):
        return t1 / s11, 0.0
    return (t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det


def fit(profiles: Dict[tuple, Profile], points: Iterable[Point], cores: int,
        burst_bytes: float = TBF_BURST_BYTES) -> CostModel:
    """Fit ``eta`` and the per-collective cost on shaped ``points`` (N = 2) by least squares on the relative
    error (each equation divided by the measured latency); ``profiles`` by (system, model)."""
    rows, ys = [], []
    for pt in points:
        if pt.rate_mbit is None:
            continue
        p = profiles[(pt.system, pt.model)]
        w = 1.0 / pt.latency_s
        rows.append((charged_seconds(p, pt.world, pt.rate_mbit, burst_bytes, cores) * w, float(p.collectives) * w))
        ys.append((pt.latency_s - compute_time(p, pt.world, cores)) * w)
    if not rows:
        raise ValueError("no shaped measurements to fit the cost model on")
    eta, per = _solve2(rows, ys)
    return CostModel(eta=eta, per_collective_s=max(0.0, per), cores=cores, burst_bytes=burst_bytes)


def evaluate(model: CostModel, profiles: Dict[tuple, Profile], points: Iterable[Point]) -> List[dict]:
    """Predicted vs measured for each point: rows with the relative error (percent)."""
    out = []
    for pt in points:
        pred = model.predict(profiles[(pt.system, pt.model)], pt.world, pt.rate_mbit)
        err = (pred - pt.latency_s) / pt.latency_s * 100.0 if pt.latency_s > 0 else math.inf
        out.append({"system": pt.system, "model": pt.model, "world": pt.world, "rate_mbit": pt.rate_mbit,
                    "measured_s": pt.latency_s, "predicted_s": pred, "error_pct": err})
    return out
