"""astra.transport: the envelope in front of every per-layer payload, and its check (a payload of another call,
another exchange of the same call, or no envelope at all is a FrameMismatchError, never data)."""
import pytest
import torch
import torch.distributed as dist

import astra
from astra.transport import ENVELOPE_MAGIC, ENVELOPE_NBYTES, STATUS_OK, Transport, envelope, read_envelopes


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
