"""Links for the benchmark: a real shaped link (network namespace + ``tc``) and its emulated stand-in.

Real link (root only): a fresh network namespace whose loopback (MTU 1500) carries a ``tc tbf`` qdisc at
the given rate. Packet loss drops a random share of the packets entering that loopback with an nftables
rule (``numgen random``; needs the ``nft`` command, Debian's ``nftables``), so it works on kernels without
``sch_netem``; delay and jitter add a ``netem`` qdisc in front of the tbf (needs ``sch_netem``). Every
process started inside the namespace (``ip netns exec NAME ...``, see :func:`netns_command`) talks to its
local peers only through that loopback, so every byte the ranks exchange crosses the shaped link. All ranks share it, as
they would share one network link.

Emulated link (no root): the ranks run on the plain loopback and the link is charged afterwards. A
forward over the emulated link costs its measured time on the unshaped loopback plus the transfer time
of the bytes it put on the link (:func:`transfer_time`: every byte crosses the one shared link at the
given rate, one ``delay`` per collective, no overlap of compute and transfer credited, loss not
modelled). Outputs always name the link they used (:func:`link_name`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from typing import Iterator, List, Optional

#: bytes of the tbf bucket (a few frames of MTU 1500 plus room for TCP bursts)
TBF_BURST = "64kb"
#: loopback MTU inside the namespace (larger MTUs with tbf stall gloo until it times out)
NETNS_MTU = 1500


def real_link_available() -> Optional[str]:
    """None when a real shaped link can be built here, else the reason it cannot (one line)."""
    if os.geteuid() != 0:
        return "not root (network namespaces and tc need root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the {tool!r} command is not installed (iproute2)"
    return None


def link_name(kind: str, rate_mbit: Optional[float], loss: float = 0.0, delay_ms: float = 0.0) -> str:
    """Human-readable name of a link, used in every output row: e.g. ``real tbf 10 Mbit/s``."""
    if rate_mbit is None:
        return "loopback (unshaped)"      # no loss or delay there either
    base = f"{'real tbf' if kind == 'real' else 'emulated'} {rate_mbit:g} Mbit/s"
    extra = ([f"loss {loss:g}%"] if loss else []) + ([f"delay {delay_ms:g} ms"] if delay_ms else [])
    return base + (f" ({', '.join(extra)})" if extra else "")


def _sh(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip()}")


def _qdisc_commands(ns: str, rate_mbit: float, delay_ms: float, jitter_ms: float) -> List[List[str]]:
    tc = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo"]
    tbf = ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", TBF_BURST, "latency", "2s"]
    if not (delay_ms or jitter_ms):
        return [tc + ["root"] + tbf]
    netem = ["netem", "delay", f"{delay_ms:g}ms"] + ([f"{jitter_ms:g}ms"] if jitter_ms else [])
    return [tc + ["root", "handle", "1:"] + netem, tc + ["parent", "1:", "handle", "2:"] + tbf]


def _loss_commands(ns: str, loss: float) -> List[List[str]]:
    """nftables rules dropping ``loss`` percent (0.01 % steps) of the packets entering the loopback."""
    if not loss:
        return []
    nft = ["ip", "netns", "exec", ns, "nft"]
    return [nft + ["add", "table", "inet", "astra"],
            nft + ["add", "chain", "inet", "astra", "lossy", "{ type filter hook input priority 0; }"],
            nft + ["add", "rule", "inet", "astra", "lossy", "numgen", "random", "mod", "10000", "<",
                   str(round(loss * 100)), "drop"]]


def create_shaped_namespace(name: str, rate_mbit: float, *, loss: float = 0.0, delay_ms: float = 0.0,
                            jitter_ms: float = 0.0) -> str:
    """Create network namespace ``name`` with its loopback up, MTU 1500, shaped to ``rate_mbit`` by tbf,
    plus ``loss`` percent random packet drops (nftables) and netem ``delay_ms`` +- ``jitter_ms`` when non-zero.
    Returns ``name``. Root only."""
    why = real_link_available()
    if why:
        raise PermissionError(f"cannot build a real shaped link: {why}")
    if loss and shutil.which("nft") is None:
        raise RuntimeError("--loss on the real link needs the nft command (apt-get install nftables)")
    if not rate_mbit > 0:
        raise ValueError(f"rate must be > 0 Mbit/s, got {rate_mbit}")
    if not 0 <= loss < 100:
        raise ValueError(f"loss must be in [0, 100) percent, got {loss}")
    if delay_ms < 0 or jitter_ms < 0:
        raise ValueError(f"delay and jitter must be >= 0 ms, got {delay_ms} and {jitter_ms}")
    _sh("ip", "netns", "add", name)
    try:
        _sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "mtu", str(NETNS_MTU))
        _sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        for cmd in _qdisc_commands(name, rate_mbit, delay_ms, jitter_ms) + _loss_commands(name, loss):
            try:
                _sh(*cmd)
            except RuntimeError as e:
                if "netem" in cmd and "unknown" in str(e).lower():
                    raise RuntimeError("delay and jitter need the netem qdisc, which this kernel lacks "
                                       "(sch_netem module)") from e
                raise
    except BaseException:
        destroy_namespace(name)
        raise
    return name


def netem_available() -> Optional[str]:
    """None when ``--delay`` can be applied on a real link here, else why not (one line). It tries a netem
    qdisc in a throw-away namespace (root only)."""
    why = real_link_available()
    if why:
        return why
    name = f"astra-netem-probe-{os.getpid()}"
    try:
        create_shaped_namespace(name, 1000.0, delay_ms=1.0)
    except (RuntimeError, PermissionError) as e:
        return str(e)
    destroy_namespace(name)
    return None


def destroy_namespace(name: str) -> None:
    """Remove network namespace ``name`` (no error if it is already gone)."""
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextlib.contextmanager
def shaped_namespace(rate_mbit: float, *, loss: float = 0.0, delay_ms: float = 0.0, jitter_ms: float = 0.0,
                     prefix: str = "astra-link") -> Iterator[str]:
    """``with shaped_namespace(10) as ns:`` a shaped namespace for the block's lifetime (removed after)."""
    name = f"{prefix}-{os.getpid()}-{rate_mbit:g}".replace(".", "_")
    create_shaped_namespace(name, rate_mbit, loss=loss, delay_ms=delay_ms, jitter_ms=jitter_ms)
    try:
        yield name
    finally:
        destroy_namespace(name)


def netns_command(ns: Optional[str], argv: List[str]) -> List[str]:
    """``argv`` run inside namespace ``ns`` (unchanged when ``ns`` is None)."""
    return list(argv) if ns is None else ["ip", "netns", "exec", ns, *argv]


def link_bytes_allgather(frame_bytes_per_rank: int, world_size: int) -> int:
    """Bytes an all-gather puts on a link shared by all ranks: each rank's frame reaches the N - 1 others."""
    return int(frame_bytes_per_rank) * world_size * (world_size - 1)


def link_bytes_allreduce(tensor_bytes: int, world_size: int) -> int:
    """Bytes a ring all-reduce puts on the shared link: every rank sends 2 (N - 1) / N of the tensor."""
    return 2 * (world_size - 1) * int(tensor_bytes)


def transfer_time(link_bytes: float, rate_mbit: Optional[float], *, collectives: int = 0,
                  delay_ms: float = 0.0) -> float:
    """Seconds to move ``link_bytes`` over the emulated link (``rate_mbit`` None: unshaped, free), plus one
    ``delay_ms`` per collective."""
    if link_bytes < 0 or collectives < 0 or delay_ms < 0:
        raise ValueError("bytes, collectives and delay must be >= 0")
    wire = 0.0 if rate_mbit is None else float(link_bytes) * 8.0 / (float(rate_mbit) * 1e6)
    return wire + collectives * delay_ms / 1e3
