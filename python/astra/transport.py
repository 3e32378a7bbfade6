"""One all-gather per layer over a torch.distributed group, with a timeout that turns a dead or stalled
peer into :class:`astra.PeerError` instead of a hang.

Codec frames of different ranks differ in size when the chunks are uneven; ``all_gather`` needs equal
sizes, so every rank pads its frame to the largest frame (every rank knows every chunk size) and the
receiver slices each frame back to its exact ``frame_nbytes`` before unpacking. Statistics count frame
bytes (``bytes_sent`` / ``bytes_received``); ``bytes_on_wire`` is the padded size actually handed to the
collective.
"""
from __future__ import annotations

import time
from datetime import timedelta
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

import astra_kernels as ak
from .errors import PeerError

DEFAULT_TIMEOUT_S = 60.0


class Pending:
    """An in-flight all-gather; :meth:`wait` returns every rank's payload (own slot included)."""

    def __init__(self, transport: "Transport", work, outs, finish: Callable, what: str, stats, keep=None):
        self._keep = keep        # the send buffer must outlive the asynchronous collective
        self._t = transport
        self._work = work
        self._outs = outs
        self._finish = finish
        self._what = what
        self._stats = stats

    def wait(self) -> List[torch.Tensor]:
        t0 = time.perf_counter()
        self._t.wait(self._work, self._what)
        if self._stats is not None:
            self._stats.wait_s += time.perf_counter() - t0
        return self._finish(self._outs)


class Transport:
    def __init__(self, group=None, timeout_s: float = DEFAULT_TIMEOUT_S):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("astra.parallelize needs an initialized torch.distributed process group "
                               "(torchrun + init_process_group, or astra.launch)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.timeout_s = float(timeout_s)
        if not (self.timeout_s > 0):
            raise ValueError(f"timeout must be > 0 seconds, got {timeout_s}")

    # -- error handling --------------------------------------------------------------------------
    def _peer_error(self, what: str, e: Optional[BaseException]) -> PeerError:
        msg = (f"astra rank {self.rank}/{self.world}: {what} failed - a peer rank died, stalled for more than "
               f"{self.timeout_s:g}s, or the process group broke")
        if e is not None:
            msg += f" ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
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

    # -- collectives -----------------------------------------------------------------------------
    def start_frames(self, frame: torch.Tensor, sizes: Sequence[int], stats=None, what="all-gather") -> Pending:
        """All-gather 1-D uint8 codec frames; ``sizes[s]`` is rank s's exact frame size."""
        size = int(sizes[self.rank])
        if frame.numel() != size:
            raise RuntimeError(f"frame has {frame.numel()} bytes, expected frame_nbytes = {size}")
        mx = max(int(s) for s in sizes)
        buf = frame if size == mx else torch.cat([frame, frame.new_zeros(mx - size)])
        outs = [torch.empty(mx, dtype=torch.uint8, device=frame.device) for _ in range(self.world)]
        work = self._issue(lambda: dist.all_gather(outs, buf, group=self.group, async_op=True), what)
        if stats is not None:
            stats.bytes_sent += size
            stats.bytes_received += sum(int(s) for r, s in enumerate(sizes) if r != self.rank)
            stats.bytes_on_wire += mx

        def finish(outs):
            return [outs[s][: int(sizes[s])] for s in range(self.world)]

        return Pending(self, work, outs, finish, what, stats, keep=buf)

    def start_tensor(self, x: torch.Tensor, lengths: Sequence[int], dim: int = 1, stats=None,
                     what="all-gather") -> Pending:
        """All-gather tensors that differ only in size along ``dim`` (``lengths[s]`` for rank s)."""
        n = int(lengths[self.rank])
        mx = max(int(s) for s in lengths)
        x = x.contiguous()
        if n < mx:
            pad_shape = list(x.shape)
            pad_shape[dim] = mx - n
            x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
        outs = [torch.empty_like(x) for _ in range(self.world)]
        work = self._issue(lambda: dist.all_gather(outs, x, group=self.group, async_op=True), what)
        if stats is not None:
            per_tok = x.element_size() * (x.numel() // max(1, x.shape[dim]))
            stats.bytes_sent += n * per_tok
            stats.bytes_received += sum(int(s) for r, s in enumerate(lengths) if r != self.rank) * per_tok
            stats.bytes_on_wire += mx * per_tok

        def finish(outs):
            return [o.narrow(dim, 0, int(lengths[s])) for s, o in enumerate(outs)]

        return Pending(self, work, outs, finish, what, stats, keep=x)

    def all_gather_seq(self, x: torch.Tensor, lengths: Sequence[int], dim: int = 1, what="gather") -> torch.Tensor:
        parts = self.start_tensor(x, lengths, dim=dim, what=what).wait()
        return torch.cat(parts, dim=dim)

    def all_reduce_mean(self, x: torch.Tensor, what="class-token all-reduce") -> torch.Tensor:
        y = x.contiguous().clone()
        work = self._issue(lambda: dist.all_reduce(y, group=self.group, async_op=True), what)
        self.wait(work, what)
        return y / self.world

    def broadcast(self, x: torch.Tensor, src: int, what="broadcast") -> torch.Tensor:
        y = x.contiguous().clone()
        src_global = dist.get_global_rank(self.group, src) if self.group is not None else src
        work = self._issue(lambda: dist.broadcast(y, src=src_global, group=self.group, async_op=True), what)
        self.wait(work, what)
        return y


def frame_sizes(batch: int, lengths: Sequence[int], groups: int, bits: int) -> List[int]:
    return [ak.frame_nbytes((batch, int(n), groups), bits) for n in lengths]
