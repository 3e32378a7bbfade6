"""Triton kernels of the codec (wire format v1, ``docs/wire-format.md``): the device packer, unpacker,
CRC32C and frame-header writer, and their host wrappers (called by ``astra_kernels.codec``).

Kernels
-------
``pack_codes_kernel``
    the standalone packer (codes already in memory): each code's ``BITS`` bits are ORed into the frame
    payload, viewed as little-endian int32 words, with ``tl.atomic_or`` (:func:`or_code_bits`, shared
    with the fused encode + pack of ``vq_kernels.py``): a code of <= 16 bits touches at most two words,
    OR is order independent, so the payload is deterministic.
``unpack_codes_kernel``
    the device-side decoder of a received frame's payload (one code per lane: its word, plus the next
    word when the code straddles a word boundary); CRC and padding are checked on the device first.
``crc32c_chunks_kernel`` / ``crc32c_combine_kernel``
    CRC32C of the payload on the device. CRC without init / final xor ("raw CRC") is linear over GF(2),
    and leading zero bytes do not change it, so the payload is cut (after virtual zero padding at the
    front) into ``NCHUNK`` chunks of ``L`` bytes; lane ``i`` of the first kernel runs the byte-wise
    table-driven CRC over chunk ``i``; the second kernel combines the chunk CRCs by Horner's rule,
    ``state = A_L(state) ^ r_i``, where ``A_L`` (the 32x32 GF(2) matrix "append L zero bytes") is
    precomputed on the host. The header's contribution (the standard init ``0xFFFFFFFF`` advanced over
    the header bytes, then over ``P`` zero bytes) is a host constant ``c0``, so the frame CRC is
    ``c0 ^ r(payload) ^ 0xFFFFFFFF``, written little-endian into the frame.

Every module-level kernel is listed in ``AOT_SPECS`` (see ``astra_kernels/aot.py``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..aot import AotSpec
from ..codec import frame_layout


@triton.jit
def or_code_bits(words_ptr, v, bitpos, BITS, mask):
    """OR the ``BITS``-bit codes ``v`` (uint32) into the little-endian 32-bit word stream at stream bit
    ``bitpos`` (the payload layout of docs/wire-format.md): the low part into word ``bitpos // 32``,
    the part past the word boundary, if any, into the next word."""
    w = bitpos // 32
    sh = (bitpos % 32).to(tl.int32)
    lo = (v << sh.to(tl.uint32)).to(tl.int32, bitcast=True)
    tl.atomic_or(words_ptr + w, lo, mask=mask)
    spill = (sh + BITS) > 32
    hi_sh = tl.where(spill, 32 - sh, 0).to(tl.uint32)
    hi = tl.where(spill, v >> hi_sh, 0).to(tl.int32, bitcast=True)
    tl.atomic_or(words_ptr + w + 1, hi, mask=mask & spill)


@triton.jit
def pack_codes_kernel(codes_ptr, words_ptr, NUMEL, BITS, BLOCK: tl.constexpr):
    """OR the low ``BITS`` bits of ``codes[i]`` (int32, C order) into the stream at bit ``i*BITS``."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    v = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.uint32)
    or_code_bits(words_ptr, v, offs * BITS, BITS, mask)


@triton.jit
def unpack_codes_kernel(words_ptr, out_ptr, NUMEL, BITS, BLOCK: tl.constexpr):
    """``out[i]`` (int32) = stream bits ``[i*BITS, (i+1)*BITS)`` of the little-endian 32-bit word stream
    (the payload of docs/wire-format.md, zero-padded by at least one word past its end)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    bitpos = offs * BITS
    w = bitpos // 32
    sh = (bitpos % 32).to(tl.uint32)
    lo = tl.load(words_ptr + w, mask=mask, other=0).to(tl.uint32, bitcast=True) >> sh
    spill = (sh + BITS) > 32
    hi_w = tl.load(words_ptr + w + 1, mask=mask & spill, other=0).to(tl.uint32, bitcast=True)
    hi = tl.where(spill, hi_w << tl.where(spill, 32 - sh, 0), 0)
    code = (lo | hi) & ((1 << BITS) - 1)
    tl.store(out_ptr + offs, code.to(tl.int32), mask=mask)


@triton.jit
def crc32c_chunks_kernel(data_ptr, table_ptr, out_ptr, NBYTES, PAD, NCHUNK,
                         L: tl.constexpr, BLOCK: tl.constexpr):
    """Raw CRC32C (init 0, no final xor) of each ``L``-byte chunk of the virtually front-padded data.

    Virtual byte ``v`` is ``data[v - PAD]`` (zero for ``v < PAD``); chunk ``i`` covers ``[i*L, (i+1)*L)``.
    """
    lanes = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lmask = lanes < NCHUNK
    crc = tl.zeros([BLOCK], tl.uint32)
    base = lanes.to(tl.int64) * L - PAD
    for j in range(0, L):
        idx = base + j
        m = lmask & (idx >= 0) & (idx < NBYTES)
        b = tl.load(data_ptr + idx, mask=m, other=0).to(tl.uint32)
        t = tl.load(table_ptr + ((crc ^ b) & 0xFF).to(tl.int32)).to(tl.uint32, bitcast=True)
        crc = t ^ (crc >> 8)
    tl.store(out_ptr + lanes, crc.to(tl.int32, bitcast=True), mask=lmask)


@triton.jit
def _xor_combine(a, b):
    return a ^ b


@triton.jit
def crc32c_combine_kernel(chunk_ptr, mat_ptr, frame_ptr, NCHUNK, CRC_OFF):
    """``state = A_L(state) ^ r_i`` over the chunks (``mat[0:32]`` = the columns of ``A_L``), then write
    ``state ^ mat[32]`` little-endian at ``frame[CRC_OFF:CRC_OFF+4]`` (``mat[32] = c0 ^ 0xFFFFFFFF``,
    the header's contribution and the final xor). One program."""
    bit = tl.arange(0, 32)
    cols = tl.load(mat_ptr + bit).to(tl.uint32, bitcast=True)
    state = tl.zeros([1], tl.uint32)
    for i in range(0, NCHUNK):
        sel = ((state[:, None] >> bit[None, :].to(tl.uint32)) & 1) != 0
        shifted = tl.reduce(tl.where(sel, cols[None, :], 0).to(tl.uint32), 1, _xor_combine)
        r = tl.load(chunk_ptr + i + tl.zeros([1], tl.int32)).to(tl.uint32, bitcast=True)
        state = shifted ^ r
    fin = tl.load(mat_ptr + 32 + tl.zeros([1], tl.int32)).to(tl.uint32, bitcast=True)
    crc = state ^ fin
    four = tl.arange(0, 4)
    byts = ((crc[:, None] >> (8 * four[None, :]).to(tl.uint32)) & 0xFF).to(tl.uint8)
    tl.store(frame_ptr + CRC_OFF + four[None, :], byts)


# --------------------------------------------------------------------------------------------------
# AOT specs (see astra_kernels/aot.py)
# --------------------------------------------------------------------------------------------------

AOT_SPECS = [
    AotSpec(
        name="pack_codes_kernel", fn=pack_codes_kernel,
        signature={"codes_ptr": "*i32", "words_ptr": "*i32", "NUMEL": "i32", "BITS": "i32", "BLOCK": "constexpr"},
        constexprs={"BLOCK": 1024}, label="BLOCK1024",
    ),
    AotSpec(
        name="unpack_codes_kernel", fn=unpack_codes_kernel,
        signature={"words_ptr": "*i32", "out_ptr": "*i32", "NUMEL": "i32", "BITS": "i32", "BLOCK": "constexpr"},
        constexprs={"BLOCK": 1024}, label="BLOCK1024",
    ),
    AotSpec(
        name="crc32c_chunks_kernel", fn=crc32c_chunks_kernel,
        signature={"data_ptr": "*u8", "table_ptr": "*i32", "out_ptr": "*i32", "NBYTES": "i32", "PAD": "i32",
                   "NCHUNK": "i32", "L": "constexpr", "BLOCK": "constexpr"},
        constexprs={"L": 64, "BLOCK": 128}, label="L64 BLOCK128",
    ),
    AotSpec(
        name="crc32c_combine_kernel", fn=crc32c_combine_kernel,
        signature={"chunk_ptr": "*i32", "mat_ptr": "*i32", "frame_ptr": "*u8", "NCHUNK": "i32", "CRC_OFF": "i32"},
        constexprs={}, label="-", num_warps=1,
    ),
]


# --------------------------------------------------------------------------------------------------
# host side: CRC32C operators, frame header, pack / unpack of whole frames
# --------------------------------------------------------------------------------------------------

_CRC_POLY = 0x82F63B78
_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ (_CRC_POLY if _c & 1 else 0)
    _CRC_TABLE.append(_c)


def _crc_update(state: int, data: bytes) -> int:
    """Raw table-driven CRC32C update (no init / final xor applied here)."""
    for b in data:
        state = _CRC_TABLE[(state ^ b) & 0xFF] ^ (state >> 8)
    return state


def _mat_apply(cols, v: int) -> int:
    r = 0
    i = 0
    while v:
        if v & 1:
            r ^= cols[i]
        v >>= 1
        i += 1
    return r


def _mat_mul(a, b):
    """Columns of the composition a(b(.))."""
    return [_mat_apply(a, c) for c in b]


_ZERO1 = [_crc_update(1 << i, b"\x00") for i in range(32)]   # "append one zero byte"
_pow_cache = {}


def _zeros_operator(nbytes: int):
    """Columns of the GF(2) operator "advance the raw CRC state over ``nbytes`` zero bytes"."""
    if nbytes in _pow_cache:
        return _pow_cache[nbytes]
    result = [1 << i for i in range(32)]
    base = _ZERO1
    n = nbytes
    while n:
        if n & 1:
            result = _mat_mul(base, result)
        base = _mat_mul(base, base)
        n >>= 1
    if len(_pow_cache) > 64:
        _pow_cache.clear()
    _pow_cache[nbytes] = result
    return result


def _to_i32(v: int) -> int:
    return v - (1 << 32) if v >= (1 << 31) else v


def frame_header_bytes(shape, bits: int) -> bytes:
    """Header bytes ``[0, 8 + 4*ndim)`` (everything before the CRC) of a wire-format v1 frame."""
    hdr = bytearray(b"ASTQ") + bytes([1, bits, len(shape), 0])
    for d in shape:
        hdr += int(d).to_bytes(4, "little")
    return bytes(hdr)


_dev_cache = {}


def _crc_table_on(device) -> torch.Tensor:
    key = ("table", str(device))
    t = _dev_cache.get(key)
    if t is None:
        t = _dev_cache[key] = torch.tensor([_to_i32(v) for v in _CRC_TABLE], dtype=torch.int32, device=device)
    return t


def _crc_chunk_len(P: int) -> int:
    L = 64
    while (P + L - 1) // L > 4096:
        L *= 2
    return L


def _crc_on_device(payload: torch.Tensor, hdr: bytes, out: torch.Tensor, off: int) -> None:
    """CRC32C of ``hdr`` (host bytes, the header before its CRC field) followed by ``payload`` (uint8 on
    the device), computed on the device and written little-endian to ``out[off:off + 4]``."""
    device = payload.device
    P = payload.numel()
    L = _crc_chunk_len(P)
    nchunk = (P + L - 1) // L
    pad = nchunk * L - P
    state_h = _crc_update(0xFFFFFFFF, hdr)                     # standard init over the header
    c0 = _mat_apply(_zeros_operator(P), state_h)               # ... carried over P bytes
    mat = torch.tensor([_to_i32(v) for v in _zeros_operator(L)] + [_to_i32(c0 ^ 0xFFFFFFFF)],
                       dtype=torch.int32, device=device)
    chunks = torch.empty(max(1, nchunk), dtype=torch.int32, device=device)
    if nchunk:
        BLOCK = 128
        crc32c_chunks_kernel[(triton.cdiv(nchunk, BLOCK),)](
            payload, _crc_table_on(device), chunks, P, pad, nchunk, L=L, BLOCK=BLOCK)
    crc32c_combine_kernel[(1,)](chunks, mat, out, nchunk, off, num_warps=1)


def finish_frame(words: torch.Tensor, hdr: bytes, H: int, P: int) -> torch.Tensor:
    """Write the header, compute the CRC32C of header + payload on the device, return the frame view."""
    frame = words.view(torch.uint8)[: H + P]
    frame[: H - 4].copy_(torch.frombuffer(bytearray(hdr), dtype=torch.uint8).to(words.device))
    _crc_on_device(frame[H:], hdr, frame, H - 4)
    return frame


def frame_buffers(shape, bits: int, device):
    """(int32 words holding the frame + at least one zero word, header bytes H, payload bytes P, numel)."""
    numel = 1
    for d in shape:
        numel *= int(d)
    H, P, _ = frame_layout(shape, bits)
    words = torch.zeros((H + P + 3) // 4 + 1, dtype=torch.int32, device=device)
    return words, H, P, numel


def pack_frame_triton(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Wire-format v1 frame of ``codes`` (values already checked to fit ``bits``), built on the device."""
    shape = tuple(codes.shape)
    words, H, P, numel = frame_buffers(shape, bits, codes.device)
    flat = codes.reshape(-1).to(torch.int32).contiguous()
    if numel:
        BLOCK = 1024
        pack_codes_kernel[(triton.cdiv(numel, BLOCK),)](flat, words[H // 4:], numel, bits, BLOCK=BLOCK)
    return finish_frame(words, frame_header_bytes(shape, bits), H, P)


def unpack_frame_triton(frame: torch.Tensor, bits: int, shape, header: bytes) -> torch.Tensor:
    """Decode a frame whose header the caller has validated (``bits``, ``shape``; ``header`` = its bytes
    before the CRC field, already on the host) on the frame's device: CRC32C and padding bits checked on
    the device (one host sync for both verdicts), codes unpacked by :func:`unpack_codes_kernel`.
    Raises ``ValueError`` like the C++ codec."""
    words, H, P, numel = frame_buffers(shape, bits, frame.device)      # payload at byte H + >= 1 zero word
    payload = words.view(torch.uint8)[H:H + P]
    payload.copy_(frame[H:H + P])
    crc = torch.empty(4, dtype=torch.uint8, device=frame.device)
    _crc_on_device(payload, header, crc, 0)
    used = numel * bits
    pad_ok = (payload[-1] >> (used % 8)) == 0 if used % 8 else torch.ones((), dtype=torch.bool, device=frame.device)
    crc_ok, pad_ok = torch.stack([(crc == frame[H - 4:H]).all(), pad_ok]).tolist()
    if not crc_ok:
        raise ValueError("CRC mismatch: frame is corrupt")
    if not pad_ok:
        raise ValueError("corrupt frame: non-zero padding bits after the last code")
    out = torch.empty(tuple(int(d) for d in shape), dtype=torch.int32, device=frame.device)
    if numel:
        BLOCK = 1024
        unpack_codes_kernel[(triton.cdiv(numel, BLOCK),)](words[H // 4:], out, numel, bits, BLOCK=BLOCK)
    return out
