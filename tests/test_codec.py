"""The C++ bit-stream codec: round trips, exact bytes, rejection of every malformed input, fuzzing."""
import random
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import astra_kernels as ak
from astra_kernels import crc32c, frame_header, frame_layout, frame_nbytes, header_nbytes, pack_codes, unpack_codes
from astra_kernels import testing as T

# The independent pure-Python model of docs/wire-format.md: astra_kernels.testing.reference_frame.


def _with_crc(frame: bytearray) -> bytearray:
    """Recompute the CRC of a hand-edited frame (so a later check, not the CRC, must catch it)."""
    ndim = frame[6]
    off = 8 + 4 * ndim
    frame[off:off + 4] = struct.pack("<I", T.crc32c_reference(bytes(frame[:off]) + bytes(frame[off + 4:])))
    return frame


SHAPES = [(), (0,), (1,), (2,), (7,), (8,), (9,), (33,), (512, 1), (17, 3), (2, 3, 4), (0, 5), (3, 0, 2),
          (1, 1, 1, 1, 1, 1, 1, 3)]


def _rand_codes(shape, bits, dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2 ** bits, shape, generator=g, dtype=torch.int64).to(dtype)


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"6789", crc32c(b"12345")) == 0xE3069283


def test_crc32c_names_its_own_argument():
    """A tensor of another dtype was refused as "frame must be ...", an argument crc32c does not have."""
    with pytest.raises(ValueError, match="data must be a 1-D torch.uint8 tensor, got dtype=torch.int64"):
        crc32c(torch.ones(3, dtype=torch.int64))


@pytest.mark.parametrize("bits", range(1, 17))
def test_round_trip_every_width_and_shape(bits):
    for i, shape in enumerate(SHAPES):
        codes = _rand_codes(shape, bits, seed=bits * 100 + i)
        frame = pack_codes(codes, bits)
        assert frame.dtype == torch.uint8 and frame.dim() == 1
        assert frame.numel() == frame_nbytes(shape, bits)
        assert bytes(frame.numpy()) == T.reference_frame(codes.numpy(), bits)
        back = unpack_codes(frame)
        assert back.dtype == torch.int32 and tuple(back.shape) == tuple(shape)
        assert torch.equal(back.long(), codes)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32,
                                   torch.uint32, torch.int64])
def test_input_dtypes(dtype):
    bits = 7
    codes = _rand_codes((5, 13), bits, dtype=dtype, seed=3)
    assert torch.equal(unpack_codes(pack_codes(codes, bits)).long(), codes.long())


def test_numpy_and_noncontiguous_inputs():
    codes = _rand_codes((16, 9), 10, seed=4)
    t = codes.t()  # non-contiguous view: packed in its logical (C) order
    assert not t.is_contiguous()
    assert torch.equal(unpack_codes(pack_codes(t, 10)).long(), t)
    assert torch.equal(unpack_codes(pack_codes(codes.numpy(), 10)).long(), codes)
    f = pack_codes(codes, 10)
    assert torch.equal(unpack_codes(bytes(f.numpy())).long(), codes)  # bytes frames accepted


def test_512_tokens_of_one_10_bit_code_take_640_payload_bytes():
    header, payload, total = frame_layout((512, 1), 10)
    assert (header, payload, total) == (20, 640, 660)
    assert pack_codes(_rand_codes((512, 1), 10), 10).numel() == 660


def test_exact_bytes_hand_checked():
    # [1, 2, 3] at 10 bits: 1 at bit 0, 2 at bit 10, 3 at bit 20.
    f = pack_codes(torch.tensor([1, 2, 3]), 10)
    head = bytes([0x41, 0x53, 0x54, 0x51, 1, 10, 1, 0, 3, 0, 0, 0])
    payload = bytes([0x01, 0x08, 0x30, 0x00])
    assert bytes(f.numpy()) == head + struct.pack("<I", T.crc32c_reference(head + payload)) + payload
    # 3 bits: 7, 0, 5 -> 0b01_000_111, 0b1 ; padding bits zero.
    assert bytes(pack_codes(torch.tensor([7, 0, 5]), 3).numpy()[16:]) == bytes([0x47, 0x01])
    # 16 bits: little-endian u16s.
    assert bytes(pack_codes(torch.tensor([0x1234, 0xABCD]), 16).numpy()[16:]) == bytes([0x34, 0x12, 0xCD, 0xAB])
    # 1 bit: LSB first.
    assert bytes(pack_codes(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).numpy()[16:]) == bytes([0x0D, 0x01])
    # 0-d tensor and empty tensors.
    assert bytes(pack_codes(torch.tensor(5), 4).numpy()[12:]) == bytes([0x05])
    assert pack_codes(torch.zeros(0, 4, dtype=torch.int32), 10).numel() == 12 + 8


def test_out_buffer():
    codes = _rand_codes((100,), 12)
    buf = torch.full((1000,), 0xAB, dtype=torch.uint8)
    f = pack_codes(codes, 12, out=buf)
    assert f.data_ptr() == buf.data_ptr() and f.numel() == frame_nbytes((100,), 12)
    assert torch.equal(unpack_codes(f).long(), codes)
    with pytest.raises(ValueError, match="too small"):
        pack_codes(codes, 12, out=torch.empty(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="out must be"):
        pack_codes(codes, 12, out=torch.empty(1000, dtype=torch.int32))
    # an out that overlaps the codes' memory would overwrite codes before they are read (the frame's CRC was valid,
    # its codes wrong)
    mem = torch.arange(300).to(torch.uint8)
    for view in (mem[10:], mem[:50], mem[199:]):
        with pytest.raises(ValueError, match="out overlaps the memory of codes"):
            pack_codes(mem[:200], 8, out=view)
    f = pack_codes(mem[:200], 8, out=torch.empty(300, dtype=torch.uint8))        # disjoint: fine
    assert torch.equal(unpack_codes(f).to(torch.uint8), mem[:200])


@settings(max_examples=300, deadline=None)
@given(bits=st.integers(1, 16), shape=st.lists(st.integers(0, 9), min_size=0, max_size=4), data=st.data())
def test_property_round_trip_matches_reference(bits, shape, data):
    n = int(np.prod(shape)) if shape else 1
    vals = data.draw(st.lists(st.integers(0, 2 ** bits - 1), min_size=n, max_size=n))
    codes = np.array(vals, dtype=np.int64).reshape(shape)
    frame = pack_codes(codes, bits)
    assert bytes(frame.numpy()) == T.reference_frame(codes, bits)
    assert np.array_equal(unpack_codes(frame).numpy(), codes)


# ---- rejection -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, 17, -1, 10.0, True, "10", None, 2 ** 40, -2 ** 40])
def test_rejects_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.tensor([1]), bad)


@pytest.mark.parametrize("bits", [1, 5, 10, 16])
def test_rejects_out_of_range_codes(bits):
    codes = _rand_codes((40,), bits)
    codes[29] = 2 ** bits
    with pytest.raises(ValueError, match=r"out of range at flat index 29"):
        pack_codes(codes, bits)
    codes[29] = -1
    with pytest.raises(ValueError, match=r"out of range at flat index 29: -1"):
        pack_codes(codes, bits)


def test_rejects_bad_code_inputs():
    for bad in (torch.tensor([1.0, 2.0]), torch.tensor([True, False]), torch.tensor([1 + 2j])):
        with pytest.raises(ValueError, match="integer dtype"):
            pack_codes(bad, 4)
    with pytest.raises(ValueError, match="torch.Tensor or numpy"):
        pack_codes([1, 2, 3], 4)
    with pytest.raises(ValueError, match="at most 8 dimensions"):
        pack_codes(torch.zeros([1] * 9, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="does not fit"):
        frame_layout((2 ** 32,), 4)
    with pytest.raises(ValueError, match="meta tensor"):
        pack_codes(torch.zeros(3, dtype=torch.int32, device="meta"), 4)
    with pytest.raises(ValueError, match="shape must hold integers"):
        frame_nbytes((2.5,), 4)
    for ndim in (-1, 9, 2.0):
        with pytest.raises(ValueError, match="0..8 dims"):
            header_nbytes(ndim)


def test_empty_byte_strings_and_reversed_numpy_views():
    """An empty byte string is a truncated frame (torch.frombuffer refused it with its own message) and has CRC 0; a
    numpy view with negative strides is copied like any other non-contiguous input (torch.from_numpy refused it)."""
    assert crc32c(b"") == 0 and crc32c(bytearray()) == 0
    for empty in (b"", bytearray(), memoryview(b"")):
        with pytest.raises(ValueError, match="truncated frame: 0 bytes"):
            unpack_codes(empty)
        with pytest.raises(ValueError, match="truncated frame: 0 bytes"):
            frame_header(empty)
    rev = np.arange(10)[::-1]
    assert np.array_equal(unpack_codes(pack_codes(rev, 4)).numpy(), rev)


def _frame(bits=10, shape=(6, 5), seed=7) -> bytearray:
    return bytearray(pack_codes(_rand_codes(shape, bits, seed=seed), bits).numpy().tobytes())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f[:5], "truncated frame"),
        (lambda f: f[:11], "truncated frame"),
        (lambda f: f[:-1], "truncated frame"),
        (lambda f: f + b"\x00", "trailing bytes"),
        (lambda f: b"XSTQ" + f[4:], "bad magic"),
        (lambda f: f[:4] + b"\x02" + f[5:], "unsupported frame version 2"),
        (lambda f: f[:5] + b"\x00" + f[6:], "bits=0"),
        (lambda f: f[:5] + b"\x11" + f[6:], "bits=17"),
        (lambda f: f[:6] + b"\x09" + f[7:], "ndim=9"),
        (lambda f: f[:7] + b"\x01" + f[8:], "flags"),
        (lambda f: _with_crc(bytearray(f[:8] + struct.pack("<I", 600) + f[12:])), "truncated frame: header announces"),
        (lambda f: _with_crc(bytearray(f[:8] + struct.pack("<I", 2) + f[12:])), "trailing bytes"),
        (lambda f: f[:-1] + bytes([f[-1] ^ 1]), "CRC mismatch"),
        (lambda f: f[:17] + bytes([f[17] ^ 0x80]) + f[18:], "CRC mismatch"),  # the CRC field itself
    ],
)
def test_rejects_corrupt_frames(mutate, message):
    frame = bytes(mutate(_frame()))
    with pytest.raises(ValueError, match=message):
        t = torch.frombuffer(bytearray(frame), dtype=torch.uint8) if frame else torch.empty(0, dtype=torch.uint8)
        unpack_codes(t)


def test_rejects_nonzero_padding_bits():
    f = _frame(bits=3, shape=(3,))  # 9 bits -> 2 payload bytes, 7 padding bits
    f[-1] |= 0x80
    with pytest.raises(ValueError, match="padding bits"):
        unpack_codes(bytes(_with_crc(f)))


def test_rejects_huge_shape_claims_without_allocating():
    f = _frame(bits=16, shape=(2, 3))
    f[8:16] = struct.pack("<II", 0xFFFFFFFF, 0xFFFFFFFF)
    with pytest.raises(ValueError, match="truncated frame|too large"):
        unpack_codes(bytes(_with_crc(f)))
    g = bytearray(b"ASTQ" + bytes([1, 16, 8, 0]) + struct.pack("<8I", *[0xFFFFFFFF] * 8) + b"\0" * 4)
    with pytest.raises(ValueError, match="too large"):
        unpack_codes(bytes(g))


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_into_out_touches_only_the_frame(bits):
    """``out`` larger than the frame, prefilled with 0xAB: only ``out[:frame_nbytes]`` is written (the wide stores of
    the packing loop wrote up to 7 zero bytes past the frame's end into the caller's buffer)."""
    for n in (0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 64, 65, 257):
        codes = _rand_codes((n,), bits, dtype=torch.int32, seed=n * 17 + bits)
        nbytes = frame_nbytes((n,), bits)
        out = torch.full((nbytes + 24,), 0xAB, dtype=torch.uint8)
        frame = pack_codes(codes, bits, out=out)
        assert frame.data_ptr() == out.data_ptr() and frame.numel() == nbytes
        assert bool((out[nbytes:] == 0xAB).all()), f"bits={bits} n={n}: bytes past the frame were written"
        T.assert_equal_ints(frame, pack_codes(codes, bits), f"bits={bits} n={n}")
        T.assert_equal_ints(unpack_codes(frame), codes, f"bits={bits} n={n}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_frame_with_huge_other_dims_round_trips(backend, kernel_device):
    """No codes, other dims huge: pack_codes takes such a tensor, unpack_codes failed with numpy's "array is too big".
    A frame no torch tensor can take the shape of with its usual strides (8 dims, one 0, the others 2**32 - 1) decodes
    too (torch refused it: "Stride calculation overflowed"); the CRC is checked all the same."""
    dev = "cpu" if backend == "torch" else kernel_device
    shape = (0,) + (2 ** 32 - 1,) * 7
    head = b"ASTQ" + bytes([1, 3, 8, 0]) + struct.pack("<8I", *shape)
    crafted = head + struct.pack("<I", T.crc32c_reference(head))
    frames = [pack_codes(torch.empty(s, dtype=torch.int32), 5) for s in ((0, 2 ** 31, 2 ** 31), (2 ** 32 - 1, 0, 9))]
    for frame in frames + [torch.frombuffer(bytearray(crafted), dtype=torch.uint8)]:
        out = unpack_codes(frame.to(dev), backend=backend)
        assert out.shape == frame_header(frame)[1] and out.dtype == torch.int32 and out.numel() == 0
        assert out.is_contiguous() and out.device.type == torch.device(dev).type
    bad = torch.frombuffer(bytearray(crafted[:-1] + bytes([crafted[-1] ^ 1])), dtype=torch.uint8)
    with pytest.raises(ValueError, match="CRC mismatch"):
        unpack_codes(bad.to(dev), backend=backend)
    head = b"ASTQ" + bytes([1, 3, 8, 0]) + struct.pack("<8I", *shape[1:], 0)    # the 0 last: torch overflows first
    last = torch.frombuffer(bytearray(head + struct.pack("<I", T.crc32c_reference(head))), dtype=torch.uint8)
    with pytest.raises(ValueError, match="holds no codes, but no torch tensor can take it"):
        unpack_codes(last.to(dev), backend=backend)


def test_sizes_and_crcs_beyond_the_bindings_types_are_value_errors():
    """A dim beyond int64 or a crc outside uint32 reached pybind, whose TypeError named no argument."""
    for dim in (2 ** 70, -2 ** 70):
        with pytest.raises(ValueError, match="dimension 0 of size .* does not fit the frame format"):
            frame_nbytes((dim,), 10)
    for crc in (-1, 2 ** 32, 2 ** 33, 1.5, True):
        with pytest.raises(ValueError, match="crc must be an int in 0..4294967295"):
            crc32c(b"x", crc)
    assert crc32c(b"x", np.uint32(2 ** 32 - 1)) == crc32c(b"x", 2 ** 32 - 1)
    assert crc32c(b"y", crc32c(b"x")) == crc32c(b"xy")


def test_rejects_bad_frame_types():
    with pytest.raises(ValueError, match="1-D torch.uint8"):
        unpack_codes(torch.zeros(20, dtype=torch.int32))
    with pytest.raises(ValueError, match="1-D torch.uint8"):
        unpack_codes(torch.zeros(4, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="torch.Tensor or numpy"):
        unpack_codes("ASTQ")
    with pytest.raises(ValueError, match="truncated"):
        frame_header(torch.zeros(3, dtype=torch.uint8))


def test_fuzz_unpack_only_raises_value_error():
    """>= 10^5 mutated, truncated, spliced and random frames: every one decodes or raises ValueError."""
    rng = random.Random(1234)
    seeds = [bytes(_frame(bits, shape, seed=i)) for i, (bits, shape) in enumerate(
        [(1, (0,)), (3, (5,)), (8, ()), (10, (64, 1)), (13, (17, 3)), (16, (2, 3, 4)), (10, (512, 1))])]
    decoded = rejected = 0
    for it in range(100_000):
        f = bytearray(rng.choice(seeds))
        kind = it % 6
        if kind == 0:
            del f[rng.randrange(len(f) + 1):]
        elif kind == 1:
            i = rng.randrange(len(f))
            f[i] ^= 1 << rng.randrange(8)
        elif kind == 2:
            f[rng.randrange(len(f))] = rng.randrange(256)
        elif kind == 3:
            f += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif kind == 4:
            f = bytearray(rng.randbytes(rng.randrange(64)))
            if len(f) > 8 and rng.random() < 0.7:
                f[:8] = b"ASTQ" + bytes([1, rng.randrange(1, 17), rng.randrange(0, 9), 0])
        else:
            a, b = rng.choice(seeds), rng.choice(seeds)
            f = bytearray(a[: rng.randrange(len(a) + 1)] + b[rng.randrange(len(b) + 1):])
        try:
            unpack_codes(torch.frombuffer(f, dtype=torch.uint8) if f else torch.empty(0, dtype=torch.uint8))
            decoded += 1
        except ValueError:
            rejected += 1
    assert decoded + rejected == 100_000
    assert rejected > 90_000  # nearly every mutation is caught (the rest are identity mutations)


def test_triton_packer_through_public_api_matches_cpp(kernel_device):
    """pack_codes(backend="triton") (the device packer; interpreter here) gives the C++ codec's bytes."""
    for bits, shape in ((10, (37, 1)), (3, (5, 7)), (16, (9,))):
        codes = _rand_codes(shape, bits, dtype=torch.int32, seed=bits)
        want = pack_codes(codes, bits, backend="torch")
        got = pack_codes(codes.to(kernel_device), bits, backend="triton")
        assert torch.equal(got.cpu(), want)
        assert torch.equal(unpack_codes(got.cpu()), codes)
    # every integer dtype at the top code of its widest width (in the codes' own dtype 1 << bits wrapped: uint8
    # codes at 8 bits were refused as out of range, uint16 / uint32 failed in torch's comparison)
    for dtype, bits in ((torch.uint8, 8), (torch.int8, 7), (torch.int16, 15), (torch.uint16, 16),
                        (torch.uint32, 16), (torch.int64, 16)):
        codes = torch.tensor([0, 1, (1 << bits) - 1, 5], dtype=dtype)
        got = pack_codes(codes.to(kernel_device), bits, backend="triton")
        assert torch.equal(got.cpu(), pack_codes(codes, bits, backend="torch")), dtype
    bad = _rand_codes((20,), 4, dtype=torch.int32)
    bad[11] = 16
    with pytest.raises(ValueError, match="out of range at flat index 11: 16"):
        pack_codes(bad.to(kernel_device), 4, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        pack_codes(bad, 4, backend="cuda")


def test_triton_unpacker_matches_cpp_and_rejects_corruption(kernel_device):
    """unpack_codes(backend="triton") (the device decoder; interpreter here) equals the C++ decode for
    every width, and rejects the same corruptions with ValueError."""
    for bits in range(1, 17):
        for shape in ((37, 1), (5, 3), (0, 4), ()):
            codes = _rand_codes(shape, bits, dtype=torch.int32, seed=bits)
            frame = pack_codes(codes, bits)
            got = unpack_codes(frame.to(kernel_device), backend="triton")
            assert got.dtype == torch.int32 and tuple(got.shape) == tuple(shape)
            assert torch.equal(got.cpu(), codes)
    good = bytearray(pack_codes(_rand_codes((29,), 11, seed=5), 11).numpy().tobytes())
    bad_crc = bytearray(good)
    bad_crc[-2] ^= 0x10
    pad = bytearray(good)
    pad[-1] |= 0x80                                    # 29*11 = 319 bits: 1 padding bit in the last byte
    cases = [(bad_crc, "CRC mismatch"), (_with_crc(pad), "padding bits"), (good[:-1], "truncated"),
             (good + b"\0", "trailing"), (b"XSTQ" + good[4:], "bad magic"), (good[:7], "truncated")]
    for f, message in cases:
        with pytest.raises(ValueError, match=message):
            unpack_codes(torch.frombuffer(bytearray(f), dtype=torch.uint8).to(kernel_device), backend="triton")


def test_the_benchmarks_numpy_peer_checks_range_and_header():
    """bench/codec_reference.py (the codec benchmarks' peer) cast int64 codes to uint32 before its range check, so
    2**32 + 1 packed as 1, and it decoded frames of any version."""
    import numpy as np

    from bench.codec_reference import np_pack, np_unpack

    for bad in ([2 ** 32 + 1, 2], [-(2 ** 32) + 3]):
        with pytest.raises(ValueError, match="code out of range"):
            np_pack(np.array(bad, dtype=np.int64), 4)
    codes = np.arange(6, dtype=np.int64).reshape(2, 3)
    frame = np_pack(codes, 4)
    assert np.array_equal(np_unpack(frame), codes)
    assert np.array_equal(frame[:-4 - 3], np.asarray(pack_codes(torch.from_numpy(codes), 4))[:-4 - 3])  # header
    for i, v in ((4, 9), (7, 3), (0, ord("X"))):
        f = frame.copy()
        f[i] = v
        with pytest.raises(ValueError, match="not a version-1 frame"):
            np_unpack(f)


def test_a_numpy_array_of_objects_is_a_value_error():
    """torch.from_numpy's TypeError escaped, where the codec promises ValueError for any malformed input."""
    with pytest.raises(ValueError, match="codes must be a numeric numpy array, got dtype object"):
        pack_codes(np.array([1, None]), 3)


def test_a_shape_no_frame_holds_is_refused_before_any_copy():
    """An expanded view of 2**40 codes was made dense first (+8 TB: a RuntimeError from the allocator; 2**32 + 1
    uint8 codes took 10 s and 4 GB before the shape was refused); sparse and nested tensors failed inside torch."""
    import time
    import warnings

    for x, bits in ((torch.zeros(1, dtype=torch.int64).expand(2**40), 4),
                    (torch.zeros(1, dtype=torch.uint8).expand(2**32 + 1), 1),
                    (np.broadcast_to(np.zeros(1, np.int64), (2**40,)), 4)):
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match="does not fit the frame format"):
            ak.pack_codes(x, bits)
        assert time.perf_counter() - t0 < 1.0
    frame = ak.pack_codes(torch.arange(5), 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)        # torch: sparse CSR / nested tensors are beta
        bad = {"sparse_coo": frame.to_sparse(), "sparse_csr": frame[None].to_sparse_csr(),
               "nested": torch.nested.nested_tensor([frame, frame[:3]])}
        for kind, t in bad.items():
            for name, fn in (("frame", ak.unpack_codes), ("frame", ak.frame_header), ("data", ak.crc32c),
                             ("codes", lambda c: ak.pack_codes(c, 4))):
                with pytest.raises(ValueError, match=f"{name} must be a dense tensor, got a (torch.)?{kind} tensor"):
                    fn(t)


def test_the_largest_shape_the_wire_format_takes_is_its_documented_cap():
    """docs/wire-format.md: numel <= 2**56 (the C++ codec's kMaxPayloadBits / 16), whatever the bit width."""
    import astra_kernels as ak

    assert ak.frame_nbytes((2 ** 31, 2 ** 25), 1) == 12 + 8 + 2 ** 56 // 8
    with pytest.raises(ValueError, match="shape too large"):
        ak.frame_nbytes((2 ** 31, 2 ** 25 + 1), 1)
