"""Links for the benchmark: a real shaped link (network namespace + ``tc``) and its emulated stand-in.

Real link (root only): a fresh network namespace whose loopback (MTU 1500) carries a ``tc tbf`` qdisc at
the given rate. Packet loss drops a random share of the packets entering that loopback with an nftables
rule (``numgen random``; needs the ``nft`` command, Debian's ``nftables``), so it works on kernels without
``sch_netem``; delay and jitter add a ``netem`` qdisc in front of the tbf (needs ``sch_netem``). Every
process started inside the namespace (``ip netns exec NAME ...``, see :func:`netns_command`) talks to its
local peers only through that loopback, so every byte the ranks exchange crosses the shaped link. All ranks share it, as
they would share one network link.

Jitter link (root only, two ranks, :func:`jitter_link`): delay and jitter without ``sch_netem``. Each rank gets
its own namespace holding a TUN interface; a relay process reads every packet one rank sends and writes it to
the other's TUN after a delay drawn per packet like netem's ``delay D J`` (:func:`delay_sampler`), with tbf on
each TUN and the same nftables loss. :func:`link_rtt_ms` measures the link's round trip with UDP echoes.

Emulated link (no root): the ranks run on the plain loopback and the link is charged afterwards. A
forward over the emulated link costs its measured time on the unshaped loopback plus the transfer time
of the bytes it put on the link (:func:`transfer_time`: every byte crosses the one shared link at the
given rate, one ``delay`` per collective, no overlap of compute and transfer credited, loss not
modelled). Outputs always name the link they used (:func:`link_name`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import heapq
import json
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

try:
    from .errors import LinkError
except ImportError:         # run as a script: the jitter relay process (this file, no package around it)
    LinkError = RuntimeError

#: bytes of the tbf bucket (a few frames of MTU 1500 plus room for TCP bursts): after an idle moment this
#: many bytes pass at the loopback's own speed (astra.costmodel charges the link only beyond it)
TBF_BURST_BYTES = 64 * 1024
#: loopback MTU inside the namespace (larger MTUs with tbf stall gloo until it times out)
NETNS_MTU = 1500
#: the slowest real link: below it tc's tbf silently shrinks the bucket below TBF_BURST_BYTES (0.001 Mbit/s: 31 KB)
#: and, below 1e-6 Mbit/s, refuses the rate
MIN_RATE_MBIT = 0.01


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
        raise LinkError(f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip()}")


def check_rate(rate_mbit: float) -> None:
    """ValueError unless ``rate_mbit`` is a rate a real link can be shaped to."""
    if not MIN_RATE_MBIT <= rate_mbit < float("inf"):
        raise ValueError(f"a real link's rate must be a finite number >= {MIN_RATE_MBIT:g} Mbit/s, got {rate_mbit}")


def tbf_qdisc(rate_mbit: float) -> List[str]:
    """The tbf qdisc of a link of ``rate_mbit`` (tc's words after ``root``): its rate in whole bits per second
    ("%g" wrote 1e-07mbit, which tc does not parse), the bucket ``TBF_BURST_BYTES``."""
    return ["tbf", "rate", f"{round(rate_mbit * 1e6)}bit", "burst", f"{TBF_BURST_BYTES}b", "latency", "2s"]


def _check_loss_delay(loss: float, delay_ms: float, jitter_ms: float) -> None:
    if not 0 <= loss < 100:
        raise ValueError(f"loss must be in [0, 100) percent, got {loss}")
    if delay_ms < 0 or jitter_ms < 0:
        raise ValueError(f"delay and jitter must be >= 0 ms, got {delay_ms} and {jitter_ms}")


def _qdisc_commands(ns: str, rate_mbit: float, delay_ms: float, jitter_ms: float) -> List[List[str]]:
    tc = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo"]
    tbf = tbf_qdisc(rate_mbit)
    if not (delay_ms or jitter_ms):
        return [tc + ["root"] + tbf]
    netem = ["netem", "delay", f"{delay_ms:g}ms"] + ([f"{jitter_ms:g}ms"] if jitter_ms else [])
    return [tc + ["root", "handle", "1:"] + netem, tc + ["parent", "1:", "handle", "2:"] + tbf]


def _loss_commands(ns: str, loss: float, iifname: Optional[str] = None) -> List[List[str]]:
    """nftables rules dropping ``loss`` percent (0.01 % steps) of the packets entering namespace ``ns``
    (only those arriving on interface ``iifname`` when given)."""
    if not loss:
        return []
    nft = ["ip", "netns", "exec", ns, "nft"]
    match = ["iifname", iifname] if iifname else []
    return [nft + ["add", "table", "inet", "astra"],
            nft + ["add", "chain", "inet", "astra", "lossy", "{ type filter hook input priority 0; }"],
            nft + ["add", "rule", "inet", "astra", "lossy", *match, "numgen", "random", "mod", "10000", "<",
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
        raise LinkError("--loss on the real link needs the nft command (apt-get install nftables)")
    check_rate(rate_mbit)
    _check_loss_delay(loss, delay_ms, jitter_ms)
    try:
        _sh("ip", "netns", "add", name)
    except LinkError:
        raise                       # not made (the name is taken: someone else's, left as it is)
    except BaseException:
        destroy_namespace(name)     # interrupted while `ip netns add` made it
        raise
    try:
        _sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "mtu", str(NETNS_MTU))
        _sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        for cmd in _qdisc_commands(name, rate_mbit, delay_ms, jitter_ms) + _loss_commands(name, loss):
            try:
                _sh(*cmd)
            except RuntimeError as e:
                if "netem" in cmd and "unknown" in str(e).lower():
                    raise LinkError("delay and jitter need the netem qdisc, which this kernel lacks "
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
    # a random tail: a namespace leaked by an earlier process of the same pid made `ip netns add` fail late
    name = f"{prefix}-{os.getpid()}-{rate_mbit:g}-{random.getrandbits(24):06x}".replace(".", "_")
    try:        # made inside: an interrupt between its creation and this block leaked it
        create_shaped_namespace(name, rate_mbit, loss=loss, delay_ms=delay_ms, jitter_ms=jitter_ms)
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


# ------------------------------------------------------------------------------------------------ jitter link
#: name of the TUN interface inside each namespace of a jitter link (the same name in both)
JITTER_IFNAME = "astra-tun"
#: point-to-point IPv4 addresses of rank 0's and rank 1's TUN interface
JITTER_ADDRESSES = ("10.77.0.1", "10.77.0.2")
#: packets the relay holds at most (netem's default ``limit``); more are dropped and counted
RELAY_QUEUE_LIMIT = 1000
#: delay distributions of the relay: ``uniform`` is netem's own (D +- J, no table), ``normal`` N(D, J)
JITTER_DISTRIBUTIONS = ("uniform", "normal")
_TUNSETIFF, _IFF_TUN, _IFF_NO_PI = 0x400454CA, 0x0001, 0x1000


@dataclasses.dataclass
class JitterLink:
    """A live jitter link (see :func:`jitter_link`): rank ``r`` runs in ``namespaces[r]`` and reaches the other
    rank at ``addresses[1 - r]`` through interface ``ifname``. ``stats`` is filled when the link is closed:
    packets relayed per direction (0 to 1, 1 to 0), packets dropped for a full queue, write errors, and the
    relay's lateness (time written minus time due, ms: p50, p99, max) and its scheduling class. ``relay_pid``
    is the relay process's id while the link is open."""
    namespaces: Tuple[str, str]
    addresses: Tuple[str, str] = JITTER_ADDRESSES
    ifname: str = JITTER_IFNAME
    stats: Optional[dict] = None
    relay_pid: Optional[int] = None

    def command(self, rank: int, argv: List[str]) -> List[str]:
        """``argv`` run inside rank ``rank``'s namespace."""
        return netns_command(self.namespaces[rank], argv)

    def env(self) -> Dict[str, str]:
        """Environment for a gloo rank on this link: its interface and rank 0's address as ``MASTER_ADDR``."""
        return {"GLOO_SOCKET_IFNAME": self.ifname, "MASTER_ADDR": self.addresses[0]}


def delay_sampler(delay_ms: float, jitter_ms: float, distribution: str = "uniform",
                  seed: int = 0) -> Callable[[], float]:
    """The relay's per-packet delay, in seconds: ``uniform`` draws from [D - J, D + J] (netem's ``delay D J``
    without a distribution table), ``normal`` from N(D, J); both clipped at 0. Seeded: the n-th call returns
    the n-th packet's delay (packets are numbered in the order the relay reads them)."""
    if distribution not in JITTER_DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {JITTER_DISTRIBUTIONS}, got {distribution!r}")
    _check_loss_delay(0.0, delay_ms, jitter_ms)
    rng = random.Random(seed)
    if distribution == "uniform":
        return lambda: max(0.0, delay_ms + jitter_ms * (2.0 * rng.random() - 1.0)) / 1e3
    return lambda: max(0.0, rng.gauss(delay_ms, jitter_ms)) / 1e3


def _read_packets(fd: int) -> List[bytes]:
    out = []
    while True:
        try:
            out.append(os.read(fd, 65536))
        except BlockingIOError:
            return out


def relay(fds: Tuple[int, int], draw: Callable[[], float], *, reorder: bool = True, stop_fd: int = 0) -> dict:
    """Forward every packet read from ``fds[i]`` to ``fds[1 - i]`` once its delay ``draw()`` (seconds, drawn
    when it is read) has passed, until ``stop_fd`` is readable (end of file: the parent closed it or died).
    A heap of due times; ``select`` wakes for the next due packet (microsecond timeout). ``reorder=False``
    keeps each direction's order (a packet is never due before the one read before it). Returns the stats
    of :class:`JitterLink`."""
    heap: List[tuple] = []
    seq, last_due, sent, dropped, errors, late = 0, [0.0, 0.0], [0, 0], 0, 0, []
    while True:
        wait = None if not heap else max(0.0, heap[0][0] - time.monotonic())
        ready, _, _ = select.select([fds[0], fds[1], stop_fd], [], [], wait)
        now = time.monotonic()
        if stop_fd in ready and not os.read(stop_fd, 4096):
            break
        for i in (0, 1):
            for pkt in _read_packets(fds[i]) if fds[i] in ready else ():
                if len(heap) >= RELAY_QUEUE_LIMIT:
                    dropped += 1
                    continue
                due = now + draw()
                if not reorder:
                    due = last_due[i] = max(due, last_due[i])
                heapq.heappush(heap, (due, seq, i, pkt))
                seq += 1
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            due, _, i, pkt = heapq.heappop(heap)
            try:
                os.write(fds[1 - i], pkt)
                sent[i] += 1
                late.append(now - due)
            except OSError:
                errors += 1
    late.sort()
    q = (lambda p: round(_quantile(late, p) * 1e3, 3)) if late else (lambda p: None)
    return {"packets": sent, "dropped_queue_full": dropped, "write_errors": errors,
            "late_ms": {"p50": q(0.5), "p99": q(0.99), "max": q(1.0)}}


def _quantile(values: List[float], p: float) -> float:
    """The ``p`` quantile of sorted, non-empty ``values`` (nearest rank, no interpolation)."""
    return values[min(len(values) - 1, int(p * len(values)))]


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def _jitter_check(rate_mbit: Optional[float], loss: float) -> None:
    if os.geteuid() != 0:
        raise PermissionError("a jitter link needs root (network namespaces and TUN devices)")
    for tool in ("ip",) + (("tc",) if rate_mbit is not None else ()) + (("nft",) if loss else ()):
        if shutil.which(tool) is None:
            raise LinkError(f"a jitter link needs the {tool!r} command (iproute2 / nftables)")
    if not os.path.exists("/dev/net/tun"):
        raise LinkError("a jitter link needs /dev/net/tun (kernel CONFIG_TUN)")


def _jitter_namespace(ns: str, tun: str, rank: int, rate_mbit: Optional[float], loss: float) -> None:
    """Namespace ``ns`` (created) gets TUN ``tun`` (moved in, renamed, addressed, MTU 1500, up), tbf, loss."""
    ipn = ["ip", "-n", ns]
    # no IPv6 in the namespace: its router solicitations would cross the relay next to the ranks' packets
    for key in ("all", "default"):
        _sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
    _sh(*ipn, "link", "set", "lo", "up")
    _sh("ip", "link", "set", "dev", tun, "netns", ns)
    _sh(*ipn, "link", "set", "dev", tun, "name", JITTER_IFNAME)
    _sh(*ipn, "addr", "add", JITTER_ADDRESSES[rank], "peer", JITTER_ADDRESSES[1 - rank], "dev", JITTER_IFNAME)
    _sh(*ipn, "link", "set", "dev", JITTER_IFNAME, "mtu", str(NETNS_MTU), "up")
    if rate_mbit is not None:
        _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", JITTER_IFNAME, "root", *tbf_qdisc(rate_mbit))
    for cmd in _loss_commands(ns, loss, JITTER_IFNAME):
        _sh(*cmd)


def _start_relay(fds: List[int], spec: dict) -> subprocess.Popen:
    """The relay, a child process (``python -I netlink.py relay SPEC``) holding the TUN file descriptors; it
    stops when its stdin closes (also when this process dies) and prints its stats."""
    argv = [sys.executable, "-I", os.path.abspath(__file__), "relay", json.dumps({**spec, "fds": fds})]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=fds, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise LinkError(f"the jitter relay did not start: {proc.communicate()[1].strip()[-2000:]}")
    return proc


def _stop_relay(proc: subprocess.Popen) -> dict:
    try:
        out, err = proc.communicate(input="", timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise LinkError("the jitter relay did not stop within 10 s (killed)") from None
    if proc.returncode != 0:
        raise LinkError(f"the jitter relay failed (exit {proc.returncode}): {err.strip()[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


@contextlib.contextmanager
def jitter_link(rate_mbit: Optional[float] = None, *, delay_ms: float = 20.0, jitter_ms: float = 20.0,
                loss: float = 0.0, distribution: str = "uniform", reorder: bool = True, seed: int = 0,
                prefix: str = "astra-jit") -> Iterator[JitterLink]:
    """``with jitter_link(10, delay_ms=20, jitter_ms=20, loss=1) as link:`` a two-rank link with delay and
    jitter made in user space, for kernels without ``sch_netem`` (root only; needs ``/dev/net/tun``).

    Two network namespaces ``{prefix}-{pid}-0`` and ``-1``, one per rank, each holding a TUN interface
    :data:`JITTER_IFNAME` (point-to-point, :data:`JITTER_ADDRESSES`, MTU 1500, no IPv6). A relay process
    reads every packet one rank sends and writes it to the other rank's TUN after a delay drawn per packet
    by :func:`delay_sampler` (netem's ``delay D J``: packets reorder, as with netem, unless ``reorder=False``).
    Each direction crosses the relay once: a round trip costs two draws. ``rate_mbit`` (None: unshaped) puts
    a tbf on each TUN, so each direction has that rate (a full-duplex link); ``loss`` percent of the packets
    entering each namespace on its TUN are dropped (nftables, as in :func:`create_shaped_namespace`).

    Run rank ``r`` with ``link.command(r, argv)`` and ``link.env()`` (``GLOO_SOCKET_IFNAME`` and
    ``MASTER_ADDR``). On exit, also on error, the relay is stopped and both namespaces removed; ``link.stats``
    then holds the relay's counts and lateness (see :class:`JitterLink`). If this process is killed by a signal
    that skips ``finally`` (SIGKILL; SIGTERM unless the caller handles it, as the ``astra`` CLI and
    ``bench/lossy_link.py`` do), the relay still stops (its stdin closes) but the namespaces stay: ``ip netns del
    {prefix}-{pid}-0`` (and ``-1``). :func:`shaped_namespace` is the same. Raises ``PermissionError`` when not
    root, ``astra.LinkError`` naming a missing tool or a failed set-up step, ``ValueError`` for bad arguments."""
    # the arguments first, then what the machine has (a bad argument is refused on any machine)
    if rate_mbit is not None:
        check_rate(rate_mbit)
    _check_loss_delay(loss, delay_ms, jitter_ms)
    delay_sampler(delay_ms, jitter_ms, distribution, seed)             # validates the distribution
    _jitter_check(rate_mbit, loss)
    pid = os.getpid()
    link = JitterLink(namespaces=(f"{prefix}-{pid}-0", f"{prefix}-{pid}-1"))
    made: List[str] = []
    fds: List[int] = []
    proc = None
    try:
        for rank, ns in enumerate(link.namespaces):
            _sh("ip", "netns", "add", ns)
            made.append(ns)
            tun = f"astra{pid}t{rank}"
            fds.append(_open_tun(tun))
            _jitter_namespace(ns, tun, rank, rate_mbit, loss)
        proc = _start_relay(fds, {"delay_ms": delay_ms, "jitter_ms": jitter_ms, "distribution": distribution,
                                  "seed": seed, "reorder": reorder})
        link.relay_pid = proc.pid
        while fds:
            os.close(fds.pop())
        yield link
        link.stats = _stop_relay(proc)
    finally:
        for fd in fds:
            os.close(fd)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        for ns in made:
            destroy_namespace(ns)


def link_rtt_ms(link: JitterLink, count: int = 50, interval_s: float = 0.01,
                timeout_s: float = 1.0) -> List[Optional[float]]:
    """Round-trip times (ms) of ``count`` UDP echoes (56-byte payload, as ``ping``) from rank 0's namespace to
    rank 1's, one at a time, ``interval_s`` apart; None for an echo lost (no answer within ``timeout_s``)."""
    port = "7"
    here = [sys.executable, "-I", os.path.abspath(__file__)]
    server = subprocess.Popen(link.command(1, here + ["echo", link.addresses[1], port]), stdout=subprocess.PIPE,
                              text=True)
    try:
        if server.stdout.readline().strip() != "ready":
            raise LinkError("the UDP echo server did not start in rank 1's namespace")
        argv = here + ["rtt", link.addresses[1], port, str(count), str(interval_s), str(timeout_s)]
        r = subprocess.run(link.command(0, argv), capture_output=True, text=True,
                           timeout=30 + count * (interval_s + timeout_s))
    finally:
        server.kill()
        server.wait()
    if r.returncode != 0:
        raise LinkError(f"the RTT probe failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout)


def rtt_summary(rtts: List[Optional[float]]) -> Dict[str, float]:
    """``ping``'s summary of :func:`link_rtt_ms`'s answer: sent, lost, min/mean/max/mdev and p10/p50/p90 (ms)."""
    got = sorted(x for x in rtts if x is not None)
    if not got:
        return {"sent": len(rtts), "lost": len(rtts)}
    mean = sum(got) / len(got)

    def q(p):
        return round(_quantile(got, p), 3)

    return {"sent": len(rtts), "lost": len(rtts) - len(got), "min": round(got[0], 3), "mean": round(mean, 3),
            "max": round(got[-1], 3), "mdev": round((sum((x - mean) ** 2 for x in got) / len(got)) ** 0.5, 3),
            "p10": q(0.1), "p50": q(0.5), "p90": q(0.9)}


def _echo_main(addr: str, port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    _realtime()
    print("ready", flush=True)
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(data, peer)


def _rtt_main(addr: str, port: int, count: int, interval_s: float, timeout_s: float) -> List[Optional[float]]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _realtime()
    out: List[Optional[float]] = []
    for k in range(count):
        payload = struct.pack("!I52x", k)
        t0 = time.perf_counter()
        s.sendto(payload, (addr, port))
        rtt = None
        while rtt is None and time.perf_counter() - t0 < timeout_s:
            s.settimeout(max(1e-3, timeout_s - (time.perf_counter() - t0)))
            try:
                data = s.recv(2048)
            except socket.timeout:
                break
            if data == payload:                     # a late answer to an earlier echo is not this one's
                rtt = (time.perf_counter() - t0) * 1e3
        out.append(rtt)
        time.sleep(interval_s)
    return out


def _realtime() -> str:
    """The relay stands for a wire, and the RTT probe measures it: the ranks' CPU load must not delay them.
    Real-time (SCHED_FIFO 1: they sleep between packets, and the kernel's RT throttling still bounds them)
    where allowed, else nice -10."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        return "SCHED_FIFO 1"
    except (OSError, AttributeError):
        pass
    try:
        os.nice(-10)
        return "nice -10"
    except OSError:
        return "default"


def _relay_main(spec: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent stops the relay (closes its stdin)
    draw = delay_sampler(spec["delay_ms"], spec["jitter_ms"], spec["distribution"], spec["seed"])
    priority = _realtime()
    print("ready", flush=True)
    stats = relay(tuple(spec["fds"]), draw, reorder=spec["reorder"])
    print(json.dumps({**stats, "scheduling": priority}), flush=True)


def _main(argv: List[str]) -> int:
    """Child processes of the jitter link: ``relay SPEC``, ``echo ADDR PORT``, ``rtt ADDR PORT N DT TIMEOUT``."""
    if argv[:1] == ["relay"]:
        _relay_main(json.loads(argv[1]))
    elif argv[:1] == ["echo"]:
        _echo_main(argv[1], int(argv[2]))
    elif argv[:1] == ["rtt"]:
        print(json.dumps(_rtt_main(argv[1], int(argv[2]), int(argv[3]), float(argv[4]), float(argv[5]))))
    else:
        raise SystemExit(f"usage: netlink.py relay SPEC | echo ADDR PORT | rtt ADDR PORT N DT TIMEOUT; got {argv}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
