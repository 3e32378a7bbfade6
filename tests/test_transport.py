"""astra.transport: the envelope in front of every per-layer payload, and its check (a payload of another call,
another exchange of the same call, or no envelope at all is a FrameMismatchError, never data)."""
import warnings
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import astra
from astra.transport import (
    ENVELOPE_MAGIC,
    ENVELOPE_NBYTES,
    ERROR_TEXT_NBYTES,
    STATUS_FAILED,
    STATUS_OK,
    Pending,
    Transport,
    checked_timeout,
    envelope,
    read_envelopes,
)


@pytest.fixture
def transport():
    """A Transport over a one-rank gloo group in this process (torn down after the test)."""
    assert not dist.is_initialized(), "a test left a process group initialized in the pytest process"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield Transport(timeout_s=10)
    finally:
        dist.destroy_process_group()


def _heads(*envelopes):
    return read_envelopes(list(envelopes))


def test_envelope_round_trips_its_fields():
    e = envelope(2**32 + 7, 3, status=1, layer=5)
    assert e.dtype == torch.uint8 and e.numel() == ENVELOPE_NBYTES == 20
    assert _heads(e) == [(ENVELOPE_MAGIC, 7, 3, 1, 5)]
    assert _heads(envelope(9, 0, layer=None)) == [(ENVELOPE_MAGIC, 9, 0, STATUS_OK, -1)]


def test_check_envelopes_refuses_another_slot_call_or_magic(transport):
    """No test raised FrameMismatchError: the check accepted a payload from another exchange (slot) of the same call
    with its slot comparison removed. Each of slot, call and magic is now checked on its own, for any rank."""
    ok = envelope(11, 2)
    transport.check_envelopes(_heads(ok, ok), 11, 2, "layer 1")            # this call's exchange: accepted
    transport.check_envelopes(_heads(ok, ok), 11 + 2**32, 2, "layer 1")    # the call counter wraps at 32 bits
    bad_magic = ok.clone()
    bad_magic[:4] = torch.tensor([0x52, 0x54, 0x53, 0x42], dtype=torch.uint8)     # "RTSB"
    cases = ((envelope(11, 3), r"call 11, exchange 3 \(magic 0x41535452\)"),      # another exchange of this call
             (envelope(10, 2), r"call 10, exchange 2 \(magic 0x41535452\)"),      # another call
             (bad_magic, r"call 11, exchange 2 \(magic 0x42535452\)"))            # no envelope
    for other, text in cases:
        for bad, heads in ((0, _heads(other, ok)), (1, _heads(ok, other))):
            with pytest.raises(astra.FrameMismatchError, match=rf"^astra rank 0/1: layer 1: rank {bad} sent a frame of "
                                                                rf"{text}; expected call 11, exchange 2: the ranks"):
                transport.check_envelopes(heads, 11, 2, "layer 1")
    assert issubclass(astra.FrameMismatchError, astra.PeerError)


def test_exchange_returns_the_payload_behind_its_envelope(transport):
    payload = torch.arange(13, dtype=torch.uint8)
    pending = transport.exchange(payload, [13], call=4, slot=1, what="layer 1")
    (got,) = pending.wait()
    assert torch.equal(got, payload)


class _Work:
    """A finished (or, with ``ok=False``, timed-out) collective as ``work.wait`` reports it."""

    def __init__(self, ok=True):
        self.ok = ok

    def wait(self, timeout=None):
        return self.ok


class _Closed(_Work):
    def wait(self, timeout=None):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:4242")


def test_a_failed_exchange_names_its_size_and_what_a_closed_connection_means(transport, monkeypatch):
    """On a link that collapsed to 0.1 Mbit/s, live peers timed out and the message said only "a peer rank died,
    stalled past the timeout, or the process group broke"; the peer that gave up first was reported as a crashed
    worker (gloo's "Connection closed by peer"). The message now gives the exchange's bytes a rank and both readings."""
    monkeypatch.setattr(transport, "_issue", lambda fn, what: _Closed())
    pend = transport.exchange(torch.zeros(1000, dtype=torch.uint8), [1000], call=1, slot=3, what="layer 2 all-gather")
    with pytest.raises(astra.PeerError) as e:
        pend.wait()
    msg = str(e.value)
    assert msg.startswith(f"astra rank 0/1: layer 2 all-gather ({ENVELOPE_NBYTES + 1000:,} B a rank) failed - a peer "
                          "rank died, stalled past the timeout (10s"), msg
    assert "the link was too slow to move the exchange within it" in msg, msg
    assert msg.endswith("Connection closed by peer [127.0.0.1]:4242); the peer that closed the connection ended, or "
                        "gave up after its own timeout"), msg


def test_uneven_frames_are_cut_back_to_each_ranks_own_size(transport):
    """Mutation testing: no test of this file gave ranks frames of different sizes; every rank's payload returned
    padded to the largest (what the receiver then unpacks) went unnoticed. Rank 0 sent 5 bytes, rank 1 3, padded
    to 5 on the wire."""
    frames = [torch.cat([envelope(6, 2), torch.arange(1, 6, dtype=torch.uint8)]),
              torch.cat([envelope(6, 2), torch.tensor([9, 8, 7, 0, 0], dtype=torch.uint8)])]
    got = Pending(transport, _Work(), frames, [5, 3], call=6, slot=2, what="layer 2", stats=None).wait()
    assert [g.tolist() for g in got] == [[1, 2, 3, 4, 5], [9, 8, 7]]


def test_a_wait_that_returns_false_is_a_peer_error(transport):
    """Mutation testing: a ``work.wait`` that timed out by returning False (not raising) was never simulated; taken
    as success, the rank went on with buffers the collective never filled."""
    with pytest.raises(astra.PeerError, match=r"^astra rank 0/1: layer 3 failed - a peer rank died, stalled past the "
                                              r"timeout \(10s"):
        transport.wait(_Work(ok=False), "layer 3")
    transport.wait(_Work(ok=True), "layer 3")


def test_checked_timeout_refuses_what_a_wait_could_not_be_given():
    """Mutation testing: without the ``timedelta`` check a finite 1e300 s passed and overflowed inside every wait
    (reported as a dead peer); no test gave a value that large."""
    assert checked_timeout(2) == 2.0 and checked_timeout("1.5") == 1.5
    for bad in (1e300, 0, -1, float("nan"), float("inf"), None, "soon"):
        with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0"):
            checked_timeout(bad)


def _two_rank_gather(monkeypatch, transport, sent):
    """Rank 0 of two: the collective records what it was handed and gives rank 1 this rank's frame."""
    def all_gather(outs, buf):
        sent.append(buf.numel())
        for o in outs:
            o.copy_(buf)
        return _Work()

    monkeypatch.setattr(transport, "_all_gather", all_gather)
    monkeypatch.setattr(transport, "world", 2)


def test_every_rank_hands_the_collective_the_largest_frame_and_counts_its_own(monkeypatch, transport):
    """Mutation testing: the statistics (frame bytes sent and received, padded bytes on the wire) and the cut of a
    failed rank's longer error payload to the agreed size were never checked; a sender that failed handed the
    collective a larger buffer than its peers (gloo aborts), and the counts could include this rank's own frame."""
    sent = []
    _two_rank_gather(monkeypatch, transport, sent)
    stats = SimpleNamespace(bytes_sent=0, bytes_received=0, bytes_on_wire=0, wait_s=0.0)
    got = transport.exchange(torch.arange(13, dtype=torch.uint8), [13, 20], call=1, slot=1, stats=stats).wait()
    assert [g.numel() for g in got] == [13, 20] and got[0].tolist() == list(range(13))
    assert sent == [ENVELOPE_NBYTES + 20]
    assert (stats.bytes_sent, stats.bytes_received, stats.bytes_on_wire) == (13, 20, ENVELOPE_NBYTES + 20)
    transport.error_text = "a long error report " * 10
    pending = transport.exchange(torch.zeros(300, dtype=torch.uint8), [13, 20], call=1, slot=2,
                                 status=STATUS_FAILED, layer=0)
    assert sent[1] == ENVELOPE_NBYTES + 20
    with pytest.raises(astra.RankFailedError, match=r"rank 0 failed in layer 0 \(call 1\): a long error") as e:
        pending.wait()
    assert (e.value.rank, e.value.layer) == (0, 0)


def test_a_failed_ranks_error_text_is_cut_to_its_fixed_size_and_sent_once(transport):
    """Mutation testing: the error text was never longer than its fixed size (a longer one was handed to the
    collective whole: a size the other ranks did not post), nor was a second failure reported; with the text not
    cleared after it was sent, the next failure carried the previous one's error."""
    transport.error_text = "x" * 5000
    with pytest.raises(astra.RankFailedError) as first:
        transport.exchange(torch.zeros(4, dtype=torch.uint8), [4], call=2, slot=1, status=STATUS_FAILED,
                           layer=-1).wait()
    msg = str(first.value)
    assert "outside the layers" in msg and first.value.layer is None
    assert msg.endswith("x" * ERROR_TEXT_NBYTES) and "x" * (ERROR_TEXT_NBYTES + 1) not in msg
    assert transport.error_text is None
    with pytest.raises(astra.RankFailedError, match=r"rank 0 failed in layer 1 \(call 3\): $"):
        transport.exchange(torch.zeros(4, dtype=torch.uint8), [4], call=3, slot=1, status=STATUS_FAILED,
                           layer=1).wait()


def test_an_nccl_group_without_blocking_wait_is_warned(monkeypatch):
    """NCCL's work.wait(timeout) does not block the host unless TORCH_NCCL_BLOCKING_WAIT is set: astra's timeout
    then bounds nothing and NCCL's watchdog ends the process instead of a PeerError. Warned (astra.launch sets it)."""
    import torch.distributed as dist

    from astra.transport import NCCL_BLOCKING_WAIT, Transport

    for name, value in (("is_available", True), ("is_initialized", True), ("get_rank", 0), ("get_world_size", 2)):
        monkeypatch.setattr(dist, name, lambda *a, v=value, **k: v)
    monkeypatch.delenv(NCCL_BLOCKING_WAIT, raising=False)
    for backend in ("nccl", "cpu:gloo,cuda:nccl"):      # the second: init_process_group() without a backend
        monkeypatch.setattr(dist, "get_backend_config", lambda group=None, b=backend: b)
        with pytest.warns(RuntimeWarning, match="without TORCH_NCCL_BLOCKING_WAIT=1"):
            Transport(None, 5)
    for name, value in ((NCCL_BLOCKING_WAIT, "1"), (NCCL_BLOCKING_WAIT, "yes"), (NCCL_BLOCKING_WAIT, "t"),
                        ("NCCL_BLOCKING_WAIT", "1")):    # torch's true values, and its older name
        monkeypatch.setenv(name, value)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            Transport(None, 5)
        monkeypatch.delenv(name)
    monkeypatch.setenv(NCCL_BLOCKING_WAIT, "1")
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "gloo")
    monkeypatch.delenv(NCCL_BLOCKING_WAIT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Transport(None, 5)


def test_gloo_collectives_carry_astras_timeout_themselves(transport, monkeypatch):
    """A wait that gave up at astra's timeout left gloo's collective queued until the process group's own (30 min
    under torchrun), where a late peer's or another model's collective paired with it and gloo aborted a healthy
    rank (tests/test_reliability.py has the two-rank case): the collective itself now times out with astra."""
    seen = []

    class Group:
        def allgather(self, outs, bufs, opts):
            seen.append(("allgather", opts.timeout))
            outs[0][0].copy_(bufs[0])
            return _Work()

        def broadcast(self, bufs, opts):
            seen.append(("broadcast", opts.timeout, opts.rootRank))
            return _Work()

    assert transport.bounded
    monkeypatch.setattr(transport, "_process_group", lambda: Group())
    transport.exchange_fixed(torch.zeros(8, dtype=torch.uint8), "fingerprint")
    transport.broadcast(torch.zeros(3), 0)
    assert seen == [("allgather", timedelta(seconds=10)), ("broadcast", timedelta(seconds=10), 0)]
