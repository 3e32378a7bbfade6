"""A vectorized numpy packer/unpacker of the frame layout (header, payload), written as the comparison peer.

It builds the payload with ``np.packbits(..., bitorder="little")`` over the codes' bit planes and
checks integrity with ``zlib.crc32`` (a C implementation; numpy has no CRC32C, so the peer gets the
cheaper checksum, and its frames do not interoperate with astra's: same bytes but the CRC field).
No Python loop over elements. It checks the codes' range, the header's magic, version and flags, and the CRC; not
the payload's padding bits.
"""
import struct
import zlib

import numpy as np


def np_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    c = np.ascontiguousarray(codes).reshape(-1)
    if c.size and (int(c.min()) < 0 or int(c.max()) >> bits):      # before the cast, which would wrap them
        raise ValueError("code out of range")
    c = c.astype(np.uint32, copy=False)
    planes = ((c[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    payload = np.packbits(planes.reshape(-1), bitorder="little")
    head = b"ASTQ" + bytes([1, bits, codes.ndim, 0]) + struct.pack(f"<{codes.ndim}I", *codes.shape)
    crc = zlib.crc32(payload, zlib.crc32(head))
    return np.concatenate([np.frombuffer(head + struct.pack("<I", crc), np.uint8), payload])


def np_unpack(frame: np.ndarray) -> np.ndarray:
    if frame[:4].tobytes() != b"ASTQ" or frame[4] != 1 or frame[7] != 0:
        raise ValueError("not a version-1 frame")
    bits, ndim = int(frame[5]), int(frame[6])
    shape = struct.unpack(f"<{ndim}I", frame[8:8 + 4 * ndim].tobytes())
    h = 12 + 4 * ndim
    payload = frame[h:]
    if zlib.crc32(payload, zlib.crc32(frame[:h - 4].tobytes())) != struct.unpack("<I", frame[h - 4:h].tobytes())[0]:
        raise ValueError("CRC mismatch")
    n = int(np.prod(shape)) if ndim else 1
    planes = np.unpackbits(payload, bitorder="little")[: n * bits].reshape(n, bits).astype(np.int32)
    return (planes << np.arange(bits, dtype=np.int32)).sum(axis=1, dtype=np.int32).reshape(shape)
