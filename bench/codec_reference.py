"""A vectorized numpy packer/unpacker for the same frame format, written as the comparison peer.

It builds the payload with ``np.packbits(..., bitorder="little")`` over the codes' bit planes and
checks integrity with ``zlib.crc32`` (a C implementation; numpy has no CRC32C, so the peer gets the
cheaper checksum). No Python loop over elements.
"""
import struct
import zlib

import numpy as np


def np_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    c = np.ascontiguousarray(codes).reshape(-1).astype(np.uint32, copy=False)
    if c.size and (c.max() >> bits):
        raise ValueError("code out of range")
    planes = ((c[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    payload = np.packbits(planes.reshape(-1), bitorder="little")
    head = b"ASTQ" + bytes([1, bits, codes.ndim, 0]) + struct.pack(f"<{codes.ndim}I", *codes.shape)
    crc = zlib.crc32(payload, zlib.crc32(head))
    return np.concatenate([np.frombuffer(head + struct.pack("<I", crc), np.uint8), payload])


def np_unpack(frame: np.ndarray) -> np.ndarray:
    bits, ndim = int(frame[5]), int(frame[6])
    shape = struct.unpack(f"<{ndim}I", frame[8:8 + 4 * ndim].tobytes())
    h = 12 + 4 * ndim
    payload = frame[h:]
    if zlib.crc32(payload, zlib.crc32(frame[:h - 4].tobytes())) != struct.unpack("<I", frame[h - 4:h].tobytes())[0]:
        raise ValueError("CRC mismatch")
    n = int(np.prod(shape)) if ndim else 1
    planes = np.unpackbits(payload, bitorder="little")[: n * bits].reshape(n, bits).astype(np.int32)
    return (planes << np.arange(bits, dtype=np.int32)).sum(axis=1, dtype=np.int32).reshape(shape)
