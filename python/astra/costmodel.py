"""Cost model of a sequence-parallel prefill: compute plus link transfer, fitted at N = 2.

For one system (full-precision SP, ASTRA G = 32, ASTRA G = 1, HF TP) on one model at N ranks and a link
of R Mbit/s, the predicted latency of one forward is

    latency(N, R) = compute(N) + X - X * W / (X + W) + per_collective * C,
    X = eta * transfer(N, R),  W = overlap * compute(N)

* ``compute(N)``: every rank's work is ``u * cost_r + F``, where ``cost_r`` is the rank's share under the
  system's split (:func:`astra.split.rank_costs`: its tokens, causal attention pairs, non-local keys' K/V
  projections and encodes, in units of one token's per-layer work); ``u`` (seconds per unit) and ``F`` (seconds
  per rank and forward whatever its tokens) come from the system's own forward at N = 2 on the unshaped loopback
  (its time minus the time the slowest rank waited) against the same forward of 1/4 of the tokens (its probe;
  :func:`own_unit_costs`). Without that probe, ``F`` is the ceiling's (T/2 tokens per rank, no communication,
  against T/8) and ``u`` scales the system to its N = 2 forward. N ranks on ``cores`` cores take
  ``max(largest rank, sum of ranks / cores)``, normalised so that N = 2 gives the measured compute.
* ``transfer(N, R)``: the bytes that cross the one link all ranks share (from the bytes measured at N = 2: an
  all-gather's frames, padded to the largest chunk's, reach the N - 1 others, the largest chunk at N following
  the split; a ring all-reduce sends 2 (N - 1)/N of its tensor), spread over the forward's ``C`` collectives,
  charged at ``R`` beyond the link's token bucket (:data:`astra.netlink.TBF_BURST_BYTES`, refilled while the
  ranks compute between two collectives, at most ``R`` times that gap).
* ``overlap``: the share of each layer's compute that runs while its collective is in flight (the local
  projections and attention); the transfer hides behind it as :func:`hidden_seconds` says.
* ``eta`` (the link's efficiency: protocol overhead, shaping), ``overlap`` and ``per_collective`` (seconds of
  fixed cost per collective) are the only fitted numbers, by least squares on the relative error over the
  points used to fit (unweighted, the slowest system's seconds would decide alone).
* **The machine at N** (:class:`Machine`, optional): two probes of the machine itself, no system involved, at
  every N: the ceiling (N processes, T/N tokens each) and the same with a 64-byte all-gather before every layer.
  The first scales the compute by how far N processes of plain model work run from what the core-sharing
  arithmetic above says (caches, context switches); the second gives what synchronising N ranks costs per
  collective (ranks that share a core wait for each other's time slices), charged on every collective of the
  system (``syncs``: its input agreement and end-of-forward status too) beyond its cost at N = 2, which the
  system's own N = 2 measurement already holds.

The error is reported on the measured points not used to fit (other bandwidths, N = 4 and 8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .netlink import TBF_BURST_BYTES, link_bytes_allgather, link_bytes_allreduce
from .split import chunk_cost, rank_costs, split_indices


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
    probe_s: float = 0.0      # the ceiling's probe at N = 2: ``probe_tokens`` per rank (0: unknown, no fixed part)
    probe_tokens: int = 0
    syncs: int = 0            # collectives per forward with or without bytes (agreement, status; 0: collectives)
    own_probe_s: float = 0.0  # the system's own N = 2 forward of ``own_probe_tokens`` in all (0: not measured)
    own_probe_tokens: int = 0


def largest_chunk(p: Profile, world: int) -> float:
    """Tokens of the largest rank's chunk at ``world`` ranks (the split is a function of T, N and its costs; with
    T unknown, T/N)."""
    if p.tokens < world:
        return 1.0 / world
    return float(max(len(c) for c in split_indices(p.tokens, world, False, p.split_costs)))


def rank_work(p: Profile, world: int) -> List[float]:
    """Every rank's work at ``world`` ranks in units of one token's per-layer work (:func:`astra.split.rank_costs`;
    tensor parallelism splits every token's work evenly; T unknown: fractions of the forward)."""
    if p.kind == "allreduce" or p.tokens < world:
        return [float(p.tokens or 1) / world] * world
    return rank_costs(p.tokens, world, p.split_costs)


def _line(full_s: float, probe_s: float, c_full: float, c_probe: float) -> Tuple[float, float]:
    """``(u, F)`` of the work ``u * c + F`` through ``(c_full, full_s)`` and ``(c_probe, probe_s)``, with ``F`` kept
    in ``[0, 0.9 full_s]``."""
    u = (full_s - probe_s) / (c_full - c_probe)
    fixed = min(max(0.0, full_s - u * c_full), 0.9 * full_s)
    return (full_s - fixed) / c_full, fixed


def unit_costs(p: Profile) -> Tuple[float, float]:
    """``(u, F)``: seconds per unit of :func:`rank_work` and seconds per rank and forward whatever its tokens, from
    the ceiling at N = 2 (T/2 tokens per rank) against its probe (fewer tokens per rank, same two ranks)."""
    T = float(p.tokens or 1)
    costs = p.split_costs if p.kind == "allgather" and p.split_costs and p.tokens else (0.0, 0.0, 0.0)
    c_half = chunk_cost(T / 2, 0, costs, last=True)
    if not (0 < p.probe_s < p.local_s and 0 < p.probe_tokens < T / 2):     # no probe: no fixed part
        return p.local_s / c_half, 0.0
    return _line(p.local_s, p.probe_s, c_half, chunk_cost(float(p.probe_tokens), 0, costs, last=True))


def own_unit_costs(p: Profile) -> Optional[Tuple[float, float]]:
    """``(u, F)`` of the system itself (None without its probe): its N = 2 forward of T tokens against the same
    forward of ``own_probe_tokens``, each the slowest rank's work under the split. ``F`` is the system's own fixed
    cost per rank and forward (per-layer dispatch of encode, exchange, decode, merge), which the ceiling's does not
    hold and which does not shrink with a rank's tokens."""
    if p.kind != "allgather" or not (0 < p.own_probe_s < p.compute_s and 2 <= p.own_probe_tokens < p.tokens):
        return None
    c_probe = max(rank_costs(p.own_probe_tokens, 2, p.split_costs)) if p.split_costs else p.own_probe_tokens / 2
    return _line(p.compute_s, p.own_probe_s, max(rank_work(p, 2)), c_probe)


@dataclass(frozen=True)
class Machine:
    """The machine probes of one model at one N (``astra bench``'s ceiling row): no system is measured here."""

    world: int
    ceiling_s: float            # N processes, T/N tokens each, no communication
    sync_s: float = 0.0         # the same with a 64-byte all-gather before every layer (0: not measured)
    sync_collectives: int = 0

    @property
    def stall_s(self) -> float:
        """Seconds one collective costs beyond the work, on this machine at this N."""
        if self.sync_s <= 0 or self.sync_collectives < 1:
            return 0.0
        return max(0.0, (self.sync_s - self.ceiling_s) / self.sync_collectives)


@dataclass(frozen=True)
class Point:
    """A measured latency (median seconds) of ``system`` on ``model`` at ``world`` ranks and ``rate``."""

    system: str
    model: str
    world: int
    rate_mbit: Optional[float]      # None: unshaped loopback
    latency_s: float


def _busy(work: Sequence[float], cores: int) -> float:
    """Seconds ranks of these works take on ``cores`` cores: the largest, or all of them shared out."""
    return max(max(work), sum(work) / cores) if len(work) > cores else max(work)


def compute_time(p: Profile, world: int, cores: int) -> float:
    """Per-forward compute at ``world`` ranks, from the system's N = 2 profile (see the module docstring)."""
    if world < 1 or cores < 1:
        raise ValueError(f"world and cores must be >= 1, got {world}, {cores}")
    own = own_unit_costs(p)
    if own is None:
        u, fixed = unit_costs(p)
        u *= max(0.0, p.compute_s - fixed) / (u * max(rank_work(p, 2)))   # the system's cost per unit, the ceiling's F
    else:
        u, fixed = own
    work = lambda n: [u * c + fixed for c in rank_work(p, n)]  # noqa: E731
    return p.compute_s * _busy(work(world), cores) / _busy(work(2), cores)


def link_bytes(p: Profile, world: int) -> float:
    """Bytes one forward puts on the shared link at ``world`` ranks (frame bytes measured at N = 2)."""
    if p.kind == "allreduce":
        return float(link_bytes_allreduce(int(p.frame_bytes), world))
    # a padded all-gather: every rank sends the largest chunk's frame, whose tokens follow the split at N
    per_rank = p.frame_bytes * largest_chunk(p, world) / largest_chunk(p, 2)
    return float(link_bytes_allgather(int(round(per_rank)), world))


def charged_seconds(p: Profile, world: int, rate_mbit: float, burst_bytes: float, cores: int,
                    compute: Optional[float] = None) -> float:
    """Seconds the shaped link charges one forward at ``rate_mbit``: per collective, its share of
    :func:`link_bytes` beyond the bucket (``burst_bytes``, refilled during the ``compute`` seconds between
    collectives; default :func:`compute_time`)."""
    c = max(1, p.collectives)
    per_s = rate_mbit * 1e6 / 8.0
    compute = compute_time(p, world, cores) if compute is None else compute
    refill = min(float(burst_bytes), per_s * compute / c)
    return c * max(0.0, link_bytes(p, world) / c - refill) / per_s


def hidden_seconds(transfer: float, window: float) -> float:
    """Seconds of a forward's ``transfer`` hidden behind the ``window`` of compute that can run while it is in flight:
    ``transfer * window / (transfer + window)``, the smaller of the two when one dominates, half of either when they
    are equal. A full ``min`` assumes every rank's transfer starts as its window opens; ranks that share cores reach
    a collective at different moments, and where transfer and window are comparable only part of it hides (runs 6-8
    of bench/RESULTS.md: N = 8, 50-100 Mbit/s, 0.4-0.45 of the transfer hidden where ``min`` hides all of it)."""
    return transfer * window / (transfer + window) if transfer > 0 and window > 0 else 0.0


def machine_compute(p: Profile, world: int, cores: int, machines: Optional[Dict[int, Machine]]) -> float:
    """:func:`compute_time` corrected by the machine probes of ``p``'s model (``machines`` by N; both N = 2 and
    ``world`` needed, else uncorrected): times the ceiling's measured over its modelled time at ``world``, plus
    the synchronisation stall of each collective beyond the one at N = 2."""
    t = compute_time(p, world, cores)
    m2, mw = (machines or {}).get(2), (machines or {}).get(world)
    if m2 is None or mw is None:
        return t
    ceiling = Profile("ceiling", p.model, compute_s=m2.ceiling_s, local_s=m2.ceiling_s, frame_bytes=0.0,
                      collectives=0, tokens=p.tokens, probe_s=p.probe_s, probe_tokens=p.probe_tokens)
    ratio = mw.ceiling_s / compute_time(ceiling, world, cores)
    return t * ratio + max(1, p.syncs or p.collectives) * max(0.0, mw.stall_s - m2.stall_s)


@dataclass(frozen=True)
class CostModel:
    eta: float                    # link efficiency factor on the transfer term
    per_collective_s: float       # fixed seconds per collective
    cores: int
    burst_bytes: float = TBF_BURST_BYTES
    overlap: float = 0.0          # share of the compute that runs while a collective is in flight
    machines: Optional[Dict[str, Dict[int, Machine]]] = None     # the machine probes, by model and N

    def compute(self, p: Profile, world: int) -> float:
        """Per-forward compute at ``world`` ranks (:func:`machine_compute` with this model's probes)."""
        return machine_compute(p, world, self.cores, (self.machines or {}).get(p.model))

    def link_time(self, p: Profile, world: int, rate_mbit: float) -> float:
        """Seconds the link adds to one forward at ``rate_mbit`` (beyond the compute it overlaps)."""
        compute = self.compute(p, world)
        charged = charged_seconds(p, world, rate_mbit, self.burst_bytes, self.cores, compute)
        transfer = self.eta * charged
        hidden = hidden_seconds(transfer, self.overlap * compute)
        return transfer - hidden + self.per_collective_s * max(1, p.collectives)

    def predict(self, p: Profile, world: int, rate_mbit: Optional[float]) -> float:
        t = self.compute(p, world)
        return t if rate_mbit is None else t + self.link_time(p, world, rate_mbit)


#: the grids ``fit`` searches for ``eta`` and ``overlap`` (the per-collective cost is solved exactly for each)
ETA_GRID = tuple(0.5 + 0.0025 * i for i in range(601))
OVERLAP_GRID = tuple(0.01 * i for i in range(91))


def fit(profiles: Dict[tuple, Profile], points: Iterable[Point], cores: int,
        burst_bytes: float = TBF_BURST_BYTES, machines: Optional[Dict[str, Dict[int, Machine]]] = None) -> CostModel:
    """Fit ``eta``, ``overlap`` and the per-collective cost on the shaped ``points`` (N = 2) by least squares on
    the relative error (each residual divided by the measured latency); ``profiles`` by (system, model);
    ``machines``: the machine probes by model and N, kept by the model (at N = 2 they change nothing)."""
    rows = []          # (compute, charged, collectives, latency) per shaped point
    for pt in points:
        if pt.rate_mbit is None:
            continue
        p = profiles[(pt.system, pt.model)]
        rows.append((compute_time(p, pt.world, cores), charged_seconds(p, pt.world, pt.rate_mbit, burst_bytes, cores),
                     max(1, p.collectives), pt.latency_s))
    if not rows:
        raise ValueError("no shaped measurements to fit the cost model on")
    if not any(r[1] > 0 for r in rows):
        raise ValueError("the points used to fit carry no transfer time (fit on at least one shaped bandwidth "
                         "whose exchanges exceed the link's bucket)")
    best = None
    for eta in ETA_GRID:
        for ov in OVERLAP_GRID:
            # residual_i = a_i - per * b_i (relative): per by least squares, clipped at 0
            a = [(lat - comp - eta * ch + hidden_seconds(eta * ch, ov * comp)) / lat for comp, ch, _, lat in rows]
            b = [c / lat for _, _, c, lat in rows]
            per = max(0.0, sum(x * y for x, y in zip(a, b)) / sum(y * y for y in b))
            err = sum((x - per * y) ** 2 for x, y in zip(a, b))
            if best is None or err < best[0] - 1e-15:
                best = (err, eta, ov, per)
    _, eta, ov, per = best
    return CostModel(eta=eta, per_collective_s=per, cores=cores, burst_bytes=burst_bytes, overlap=ov,
                     machines=machines)


def evaluate(model: CostModel, profiles: Dict[tuple, Profile], points: Iterable[Point]) -> List[dict]:
    """Predicted vs measured for each point: rows with the relative error (percent)."""
    out = []
    for pt in points:
        pred = model.predict(profiles[(pt.system, pt.model)], pt.world, pt.rate_mbit)
        err = (pred - pt.latency_s) / pt.latency_s * 100.0 if pt.latency_s > 0 else math.inf
        out.append({"system": pt.system, "model": pt.model, "world": pt.world, "rate_mbit": pt.rate_mbit,
                    "measured_s": pt.latency_s, "predicted_s": pred, "error_pct": err})
    return out
