"""Triton packer, on-device CRC32C and fused encode+pack: frames byte-identical to the C++ codec and to an
independent pure-Python implementation of docs/wire-format.md."""
import numpy as np
import pytest
import torch

import astra_kernels as ak
from astra_kernels import testing as T
from astra_kernels import vq

needs_triton = pytest.mark.skipif(not T.triton_runnable(), reason="triton kernels need a GPU or TRITON_INTERPRET=1")


def _kernels():
    from astra_kernels.triton import codec_kernels

    return codec_kernels


def test_python_reference_matches_spec_example():
    f = T.reference_frame(torch.tensor([1, 2, 3]), 10)
    assert f[16:] == bytes([0x01, 0x08, 0x30, 0x00])
    assert T.crc32c_reference(b"123456789") == 0xE3069283  # CRC-32C check value


@needs_triton
@pytest.mark.parametrize("bits", list(range(1, 17)))
def test_triton_pack_equals_cpp_codec_all_widths(bits):
    g = T.seeded_generator(100 + bits)
    dev = T.kernel_device()
    for shape in [(3, 7, 5), (1,), (0,), (2, 0, 3), (33,)]:
        codes = T.random_ints(*shape, low=0, high=1 << bits, generator=g, dtype=torch.int32)
        f = _kernels().pack_frame_triton(codes.to(dev), bits)
        assert f.dtype == torch.uint8 and f.dim() == 1 and f.is_contiguous()
        want = ak.pack_codes(codes, bits)
        T.assert_equal_ints(f.cpu(), want, f"frame bits={bits} shape={shape}")
        assert bytes(f.cpu().tolist()) == T.reference_frame(codes, bits)
        T.assert_equal_ints(ak.unpack_codes(f.cpu()), codes)


@needs_triton
def test_crc_over_many_chunks_and_larger_chunk_len():
    """Payloads spanning many CRC lanes, one not a multiple of the chunk length (front padding), and one
    large enough that the chunk length doubles."""
    g = T.seeded_generator(7)
    dev = T.kernel_device()
    k = _kernels()
    for n, bits in [(1000, 10), (777, 13)]:
        codes = T.random_ints(n, low=0, high=1 << bits, generator=g, dtype=torch.int32)
        T.assert_equal_ints(k.pack_frame_triton(codes.to(dev), bits).cpu(), ak.pack_codes(codes, bits))
    assert k._crc_chunk_len(64 * 4096) == 64 and k._crc_chunk_len(64 * 4096 + 1) == 128
    # the combine math for a chunk length > 64, on the host: A_L composed from single zero bytes
    data = bytes(T.random_ints(3 * 128 + 5, low=0, high=256, generator=g).tolist())
    L = 128
    pad = (-len(data)) % L
    padded = bytes(pad) + data
    state = 0
    for i in range(0, len(padded), L):
        state = k._mat_apply(k._zeros_operator(L), state) ^ k._crc_update(0, padded[i:i + L])
    c0 = k._mat_apply(k._zeros_operator(len(data)), 0xFFFFFFFF)
    assert state ^ c0 ^ 0xFFFFFFFF == T.crc32c_reference(data)


@needs_triton
def test_triton_pack_is_deterministic():
    """The packer ORs into a zeroed word buffer (so poisoning does not apply; a missing header / CRC
    write shows up as zero bytes in the byte comparisons). Atomic OR is order independent: a frame
    built twice from the same codes is identical."""
    dev = T.kernel_device()
    codes = torch.tensor([[5, 1023, 0], [77, 512, 1]], dtype=torch.int32)
    a = _kernels().pack_frame_triton(codes.to(dev), 10).cpu()
    b = _kernels().pack_frame_triton(codes.to(dev), 10).cpu()
    T.assert_equal_ints(a, b)
    assert bytes(a.tolist()) == T.reference_frame(codes, 10)


@needs_triton
@pytest.mark.parametrize("n,G,K,DG,bits", [
    (37, 1, 100, 64, None), (45, 32, 40, 12, None), (29, 32, 33, 24, 16), (66, 4, 1024, 24, None), (5, 3, 2, 8, 1),
])
def test_fused_encode_and_pack_equals_cpp(n, G, K, DG, bits):
    g = T.seeded_generator(n * G + K)
    dev = T.kernel_device()
    x = T.random_inputs(n, G * DG, generator=g)
    cb = T.random_inputs(G, K, DG, generator=g)
    f_tr = ak.encode_and_pack(x.to(dev), cb.to(dev), bits, backend="triton").cpu()
    f_cpu = ak.encode_and_pack(x, cb, bits, backend="torch")
    b = vq.default_bits(K) if bits is None else bits
    ref_frame = ak.pack_codes(vq.vq_encode_reference(x, cb), b)
    T.assert_equal_ints(f_cpu, ref_frame, "cpu frame")
    T.assert_equal_ints(f_tr, ref_frame, "triton frame")
    T.assert_equal_ints(ak.unpack_codes(f_tr), vq.vq_encode_reference(x, cb))


def test_encode_and_pack_leading_dims_and_bits_errors():
    g = T.seeded_generator(3)
    x = T.random_inputs(2, 3, 16, generator=g)
    cb = T.random_inputs(2, 9, 8, generator=g)
    f = ak.encode_and_pack(x, cb)
    assert ak.frame_header(f) == (4, (2, 3, 2))
    T.assert_equal_ints(ak.unpack_codes(f), ak.vq_encode(x, cb))
    assert vq.default_bits(1) == 1 and vq.default_bits(2) == 1 and vq.default_bits(1024) == 10
    assert vq.default_bits(1025) == 11 and vq.default_bits(65536) == 16 and vq.default_bits(np.int64(3)) == 2
    with pytest.raises(ValueError, match="do not fit"):
        ak.encode_and_pack(x, cb, bits=3)
    with pytest.raises(ValueError, match="bits"):
        ak.encode_and_pack(x, cb, bits=17)
    with pytest.raises(ValueError, match="bits"):
        ak.encode_and_pack(x, cb, bits=0)
    assert torch.equal(ak.encode_and_pack(x, cb, bits=np.int64(4)), f)      # numpy ints, as pack_codes takes


@pytest.mark.parametrize("K", [-5, 0, 2.5, 2 ** 20, vq.MAX_K + 1, True, "8", None])
def test_default_bits_refuses_what_is_no_codebook_size(K):
    """K is an int in 1..MAX_K: -5 gave 3, 0 and 2.5 gave 1, 2**20 gave 20 (wider than the 16-bit codes)."""
    with pytest.raises(ValueError, match=f"K \\(codebook entries\\) must be an int in 1..{vq.MAX_K}"):
        vq.default_bits(K)


def test_encode_and_pack_refuses_nine_dim_codes_before_encoding(monkeypatch):
    """``x`` with 8 leading dims gives codes of 9 dims, one more than a frame holds: encode_and_pack says so
    before encoding (``len(shape) > 8``); with ``> 9`` it encoded every token and pack_codes refused afterwards."""
    cb = T.random_inputs(2, 4, 2, generator=T.seeded_generator(4))
    x = T.random_inputs(*(1,) * 8, 4, generator=T.seeded_generator(5))

    def no_encode(*a, **k):
        raise AssertionError("encoded codes that no frame can hold")

    monkeypatch.setattr(vq, "vq_encode", no_encode)
    with pytest.raises(ValueError, match="codes would have 9 dims; a frame holds at most 8"):
        ak.encode_and_pack(x, cb)
    monkeypatch.undo()
    f = ak.encode_and_pack(x[0], cb)                       # 8 dims: packed
    assert ak.frame_header(f) == (2, (1,) * 7 + (2,))


def test_pack_into_out_that_ends_where_the_codes_begin():
    """``out`` may end exactly where the codes' memory begins (adjacent, not overlapping): packed and unpacked
    intact. ``<=`` in place of ``<`` in the overlap test refused this legal call as an overlap."""
    codes = torch.randint(0, 16, (10,), dtype=torch.int32, generator=torch.Generator().manual_seed(9))
    n = (ak.frame_nbytes((10,), 4) + 3) // 4 * 4
    buf = torch.zeros(n + 40, dtype=torch.uint8)
    inside = buf[n:].view(torch.int32)
    inside.copy_(codes)
    frame = ak.pack_codes(inside, 4, out=buf[:n])
    assert torch.equal(ak.unpack_codes(frame), codes) and torch.equal(inside, codes)
    with pytest.raises(ValueError, match="out overlaps the memory of codes"):
        ak.pack_codes(inside, 4, out=buf[1:n + 1])          # one byte into the codes: refused
