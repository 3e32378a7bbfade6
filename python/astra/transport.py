"""One all-gather per layer over a torch.distributed group, with a timeout that turns a dead or stalled
peer into :class:`astra.PeerError` instead of a hang.

Every per-layer payload travels behind a 20-byte envelope (:data:`ENVELOPE`): the call counter, the exchange
(slot) within the call, a status and the sender's failing layer. A payload of another call or exchange is a
:class:`FrameMismatchError`, never data. A sender that failed sends a failed status instead of a payload; every
rank then exchanges a fixed-size error text and raises :class:`RankFailedError` naming the failing rank and layer.

Codec frames of different ranks differ in size when the chunks are uneven; ``all_gather`` needs equal
sizes, so every rank pads its frame to the largest frame (every rank knows every chunk size) and the
receiver slices each frame back to its exact ``frame_nbytes`` before unpacking. Statistics count frame
bytes (``bytes_sent`` / ``bytes_received``); ``bytes_on_wire`` is the padded size actually handed to the
collective.
"""
from __future__ import annotations

import math
import os
import struct
import time
import warnings
from datetime import timedelta
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import AllgatherOptions, BroadcastOptions

import astra_kernels as ak
from .errors import FrameMismatchError, PeerError, RankFailedError, utf8_field

DEFAULT_TIMEOUT_S = 60.0


ENVELOPE = struct.Struct("<IIIIi")     # magic, call, slot, status, failing layer (-1: none)
ENVELOPE_NBYTES = ENVELOPE.size
ENVELOPE_MAGIC = 0x41535452              # "ASTR"
STATUS_OK, STATUS_FAILED = 0, 1
ERROR_TEXT_NBYTES = 1024                 # a failed rank's error text, exchanged after a failed status


def envelope(call: int, slot: int, status: int = STATUS_OK, layer: int = -1) -> torch.Tensor:
    """The transport envelope put in front of every per-layer payload: which call and which exchange (slot) of
    that call the payload belongs to, and whether the sender failed (then the payload is its error text)."""
    raw = ENVELOPE.pack(ENVELOPE_MAGIC, call & 0xFFFFFFFF, slot, status, -1 if layer is None else layer)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def read_envelopes(bufs: List[torch.Tensor]) -> List[tuple]:
    """The envelope fields of each buffer, read with one device-to-host copy for them all."""
    raw = torch.stack([b[:ENVELOPE_NBYTES] for b in bufs]).cpu().numpy()
    return [ENVELOPE.unpack(row.tobytes()) for row in raw]


class Pending:
    """An in-flight enveloped all-gather; :meth:`wait` checks every rank's envelope and returns every rank's
    payload (own slot included)."""

    def __init__(self, transport: "Transport", work, outs, sizes, call, slot, what: str, stats, keep=None):
        self._keep = keep        # the send buffer must outlive the asynchronous collective
        self._t = transport
        self._work = work
        self._outs = outs
        self._sizes = sizes
        self._call = call
        self._slot = slot
        self._what = what
        self._stats = stats

    def wait(self) -> List[torch.Tensor]:
        t0 = time.perf_counter()
        self._t.wait(self._work, self._what)
        if self._stats is not None:
            self._stats.wait_s += time.perf_counter() - t0
        heads = read_envelopes(self._outs)
        self._t.check_envelopes(heads, self._call, self._slot, self._what)
        return [o[ENVELOPE_NBYTES: ENVELOPE_NBYTES + int(n)] for o, n in zip(self._outs, self._sizes)]


def checked_timeout(timeout_s) -> float:
    """``timeout_s`` as float seconds, else ValueError: a number > 0 that a wait can be given (inf overflowed
    ``timedelta`` inside every wait, reported as a dead peer)."""
    try:
        t = float(timeout_s)
        timedelta(seconds=t)
    except (TypeError, ValueError, OverflowError):
        t = math.nan
    if not 0 < t < math.inf:
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout_s!r}")
    return t


#: the environment variable that makes an NCCL ``work.wait(timeout)`` block the host and raise at the timeout
NCCL_BLOCKING_WAIT = "TORCH_NCCL_BLOCKING_WAIT"


def check_nccl_wait(group) -> None:
    """Warn, for an NCCL group, unless :data:`NCCL_BLOCKING_WAIT` is set: without it NCCL's ``wait`` does not block
    the host, so astra's timeout does not bound a dead peer (NCCL's watchdog ends the process at the group's own
    timeout instead: no PeerError, no ``on_peer_failure="local"``). :func:`astra.launch` sets it for NCCL."""
    if names_nccl(backend_text(group)) and not nccl_blocking_wait():
        warnings.warn(f"astra over NCCL without {NCCL_BLOCKING_WAIT}=1: a dead or stalled peer is not bounded by "
                      "astra's timeout (NCCL's wait does not block the host; its watchdog ends the process at the "
                      f"process group's timeout). Set {NCCL_BLOCKING_WAIT}=1 before init_process_group (astra.launch "
                      "does)", RuntimeWarning, stacklevel=4)


def nccl_blocking_wait() -> bool:
    """Whether torch's NCCL wait blocks: the first of :data:`NCCL_BLOCKING_WAIT` and its older name
    ``NCCL_BLOCKING_WAIT`` that is set, read as torch reads it (1 / y / yes / t / true)."""
    for name in (NCCL_BLOCKING_WAIT, "NCCL_BLOCKING_WAIT"):
        if name in os.environ:
            return os.environ[name].strip().lower() in ("1", "y", "yes", "t", "true")
    return False


def names_nccl(backend: str) -> bool:
    """Whether a backend text sends anything over NCCL (``"nccl"``, or per device: ``"cpu:gloo,cuda:nccl"``)."""
    return "nccl" in str(backend).lower()


def backend_text(group) -> str:
    """The group's backends as text: ``"gloo"``, ``"nccl"``, or per device (``"cpu:gloo,cuda:nccl"``, what
    ``init_process_group()`` without a backend makes, whose ``get_backend`` reads ``"undefined"``)."""
    config = getattr(dist, "get_backend_config", None)      # torch >= 2.2
    return str(config(group) if config is not None else dist.get_backend(group))


class Transport:
    def __init__(self, group=None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.timeout_s = checked_timeout(timeout_s)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("astra.parallelize needs an initialized torch.distributed process group "
                               "(torchrun + init_process_group, or astra.launch)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if self.rank < 0:           # torch's answer for a process outside the group; its first call failed in struct
            raise ValueError(f"global rank {dist.get_rank()} is not a member of the process group given to "
                             "astra.parallelize (call it only on the group's ranks)")
        self.error_text: Optional[str] = None   # this rank's error, sent after the failed status is seen
        self.device = torch.device("cpu")        # where fixed-size buffers live (the model's device, for NCCL)
        check_nccl_wait(group)
        # gloo: every collective carries astra's timeout itself. A wait that gave up left the collective queued in
        # gloo until the process group's own timeout (30 min by default under torchrun): the next collective on the
        # group (another ParallelModel's, a late peer's) paired with it and gloo aborted a healthy rank, and a
        # survivor could not exit before then (the group's destructor joined it). NCCL: TORCH_NCCL_BLOCKING_WAIT.
        self.bounded = not names_nccl(backend_text(group))

    # -- error handling --------------------------------------------------------------------------
    def _peer_error(self, what: str, e: Optional[BaseException]) -> PeerError:
        msg = (f"astra rank {self.rank}/{self.world}: {what} failed - a peer rank died, stalled past the timeout "
               f"({self.timeout_s:g}s, or the process group's own if that is shorter), the link was too slow to move "
               "the exchange within it, or the process group broke")
        if e is not None:
            text = str(e).strip()
            msg += f" ({type(e).__name__}: {text.splitlines()[0] if text else ''})"
            if "closed by peer" in text or "reset by peer" in text:
                msg += "; the peer that closed the connection ended, or gave up after its own timeout"
        return PeerError(msg)

    def wait(self, work, what: str) -> None:
        try:
            ok = work.wait(timeout=timedelta(seconds=self.timeout_s))
        except Exception as e:  # gloo/nccl raise RuntimeError / DistBackendError subclasses
            raise self._peer_error(what, e) from e
        if ok is False:
            raise self._peer_error(what, None)

    def _issue(self, fn, what: str):
        try:
            return fn()
        except Exception as e:
            raise self._peer_error(what, e) from e

    def check_envelopes(self, heads, call: int, slot: int, what: str) -> None:
        """Raise unless every rank's envelope is this call's ``slot``; a failed sender -> RankFailedError."""
        for r, (magic, c, sl, _status, _layer) in enumerate(heads):
            if magic != ENVELOPE_MAGIC or c != (call & 0xFFFFFFFF) or sl != slot:
                raise FrameMismatchError(
                    f"astra rank {self.rank}/{self.world}: {what}: rank {r} sent a frame of call {c}, exchange {sl} "
                    f"(magic {magic:#x}); expected call {call}, exchange {slot}: the ranks are out of step")
        failed = [r for r, h in enumerate(heads) if h[3] != STATUS_OK]
        if failed:
            r = failed[0]
            layer = heads[r][4]
            text = self._error_texts(what)[r]
            where = f"layer {layer}" if layer >= 0 else "outside the layers"
            raise RankFailedError(f"astra rank {self.rank}/{self.world}: rank {r} failed in {where} "
                                  f"(call {call}): {text}", rank=r, layer=None if layer < 0 else layer)

    def _error_texts(self, what: str) -> List[str]:
        """After a failed status: every rank sends its error text (empty if it did not fail), fixed size."""
        text, self.error_text = self.error_text or "", None
        return self.exchange_texts(text, ERROR_TEXT_NBYTES, f"{what}: error report")

    def exchange_texts(self, text: str, nbytes: int, what: str) -> List[str]:
        """Every rank's ``text``, each sent as a field of exactly ``nbytes`` UTF-8 bytes (cut, NUL-padded)."""
        buf = torch.frombuffer(bytearray(utf8_field(text, nbytes)), dtype=torch.uint8).to(self.device)
        outs = self.exchange_fixed(buf, what)
        return [bytes(o.tolist()).rstrip(b"\0").decode("utf-8", "replace") for o in outs]

    # -- collectives -----------------------------------------------------------------------------
    def exchange(self, payload: torch.Tensor, sizes: Sequence[int], call: int, slot: int, stats=None,
                 what="all-gather", status: int = STATUS_OK, layer: int = -1) -> Pending:
        """All-gather 1-D uint8 payloads behind an envelope (call, slot, status); ``sizes[s]`` is rank s's exact
        payload size. Payloads are padded to the largest, so every rank hands the collective the same size."""
        size = int(sizes[self.rank])
        mx = max(int(s) for s in sizes)
        if status == STATUS_OK and payload.numel() != size:
            raise RuntimeError(f"payload has {payload.numel()} bytes, expected {size}")
        payload = payload[:mx].to(self.device)     # a frame packed on the CPU (CUDA without Triton) meets NCCL there
        buf = torch.cat([envelope(call, slot, status, layer).to(payload.device), payload,
                         payload.new_zeros(mx - payload.numel())])
        outs = [torch.empty_like(buf) for _ in range(self.world)]
        work = self._issue(lambda: self._all_gather(outs, buf), what)
        if stats is not None:
            stats.bytes_sent += size
            stats.bytes_received += sum(int(s) for r, s in enumerate(sizes) if r != self.rank)
            stats.bytes_on_wire += ENVELOPE_NBYTES + mx
        return Pending(self, work, outs, sizes, call, slot, f"{what} ({ENVELOPE_NBYTES + mx:,} B a rank)", stats,
                       keep=buf)

    def exchange_fixed(self, buf: torch.Tensor, what: str) -> List[torch.Tensor]:
        """Blocking all-gather of a buffer whose shape every rank knows in advance (the input fingerprint)."""
        outs = [torch.empty_like(buf) for _ in range(self.world)]
        work = self._issue(lambda: self._all_gather(outs, buf), what)
        self.wait(work, what)
        return outs

    # -- the collectives themselves ----------------------------------------------------------------
    def _process_group(self):
        return self.group if self.group is not None else dist.group.WORLD

    def _all_gather(self, outs: List[torch.Tensor], buf: torch.Tensor):
        if not self.bounded:
            return dist.all_gather(outs, buf, group=self.group, async_op=True)
        opts = AllgatherOptions()
        opts.timeout = timedelta(seconds=self.timeout_s)
        return self._process_group().allgather([outs], [buf], opts)

    def broadcast_frame(self, payload: Optional[torch.Tensor], nbytes: int, src: int, call: int, slot: int,
                        stats=None, what="broadcast", status: int = STATUS_OK) -> torch.Tensor:
        """Broadcast rank ``src``'s 1-D uint8 payload of ``nbytes`` (a size every rank knows) behind an envelope;
        every rank checks it as :meth:`exchange` does (another call or exchange: FrameMismatchError; a failed
        ``src``: RankFailedError on every rank). Returns the payload on every rank."""
        n = int(nbytes)
        if self.rank == src:
            if status == STATUS_OK and (payload is None or payload.numel() != n):
                raise RuntimeError(f"payload has {None if payload is None else payload.numel()} bytes, expected {n}")
            body = payload.to(self.device) if status == STATUS_OK else torch.zeros(n, dtype=torch.uint8,
                                                                                     device=self.device)
            buf = torch.cat([envelope(call, slot, status).to(body.device), body])
        else:
            buf = torch.empty(ENVELOPE_NBYTES + n, dtype=torch.uint8, device=self.device)
        t0 = time.perf_counter()
        self._broadcast_into(buf, src, what)
        if stats is not None:
            stats.wait_s += time.perf_counter() - t0
            if self.rank == src:
                stats.bytes_sent += n
                stats.bytes_on_wire += ENVELOPE_NBYTES + n
            else:
                stats.bytes_received += n
        ok = (ENVELOPE_MAGIC, call & 0xFFFFFFFF, slot, STATUS_OK, -1)
        head = read_envelopes([buf])[0]
        heads = [head if r == src else ok for r in range(self.world)]
        self.check_envelopes(heads, call, slot, what)
        return buf[ENVELOPE_NBYTES:]

    def broadcast(self, x: torch.Tensor, src: int, what="broadcast") -> torch.Tensor:
        """Rank ``src``'s ``x`` on every rank (a copy; every rank passes a tensor of the same shape and dtype)."""
        return self._broadcast_into(x.contiguous().clone(), src, what)

    def _broadcast_into(self, buf: torch.Tensor, src: int, what: str) -> torch.Tensor:
        """Blocking broadcast of rank ``src``'s ``buf`` into ``buf`` on every rank (group rank ``src``)."""
        if self.bounded:
            opts = BroadcastOptions()
            opts.rootRank, opts.rootTensor, opts.timeout = src, 0, timedelta(seconds=self.timeout_s)
            work = self._issue(lambda: self._process_group().broadcast([buf], opts), what)
        else:
            src_global = dist.get_global_rank(self.group, src) if self.group is not None else src
            work = self._issue(lambda: dist.broadcast(buf, src=src_global, group=self.group, async_op=True), what)
        self.wait(work, what)
        return buf


def frame_sizes(batch: int, lengths: Sequence[int], groups: int, bits: int) -> List[int]:
    return [ak.frame_nbytes((batch, int(n), groups), bits) for n in lengths]
