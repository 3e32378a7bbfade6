"""Bit-stream codec: pack integer codes into framed, CRC32C-protected byte strings.

The wire format is specified byte by byte in ``docs/wire-format.md``. Packing and unpacking run in
C++ (``astra_kernels._codec``) directly on the tensors' memory (zero-copy for contiguous CPU
tensors), with the GIL released; there is no Python loop over elements.

* :func:`pack_codes` accepts any integer tensor (or numpy array) of at most 8 dimensions whose
  values lie in ``[0, 2**bits)``, ``bits`` in 1..16. A non-contiguous input is copied to contiguous
  memory first. With ``backend="auto"`` CUDA tensors are packed on the device by the Triton packer
  (byte-identical frames, returned on the device); ``backend="torch"`` always uses the C++ codec
  (copying device tensors to the host), ``backend="triton"`` forces the Triton packer.
* :func:`unpack_codes` returns a contiguous CPU ``torch.int32`` tensor with the packed shape.

Both raise :class:`ValueError` naming the problem for any malformed input; no byte string can make
them read or write out of bounds.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ._dispatch import compile_opaque, extension, resolve_backend
from .checks import MAX_BITS, check_bits, is_count

_codec = extension("_codec")

__all__ = ["pack_codes", "unpack_codes", "frame_nbytes", "frame_layout", "frame_header", "header_nbytes", "crc32c",
           "CODES_DTYPE"]

#: dtype of the codes returned by :func:`unpack_codes`.
CODES_DTYPE = torch.int32
_INT64 = 1 << 63                # a dim outside +-2**63 does not reach the C++ codec's own check
_CRC_MAX = (1 << 32) - 1

# torch dtype -> C++ DType enum (csrc/codec.h). int8 works for widths up to 7 (non-negative values).
_DTYPES = {
    torch.uint8: 0,
    torch.int8: 1,
    torch.int16: 2,
    torch.uint16: 3,
    torch.int32: 4,
    torch.uint32: 5,
    torch.int64: 6,
}


def frame_layout(shape: Sequence[int], bits: int) -> Tuple[int, int, int]:
    """``(header_nbytes, payload_nbytes, frame_nbytes)`` of a frame holding codes of ``shape``."""
    check_bits(bits)
    dims = list(shape)
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in dims):
        raise ValueError(f"shape must hold integers, got {tuple(shape)!r}")
    for d, s in enumerate(dims):        # the C++ codec names any other bad size; these do not even reach it
        if not -_INT64 <= s < _INT64:
            raise ValueError(f"dimension {d} of size {s} does not fit the frame format")
    return _codec.frame_layout(int(bits), [int(s) for s in dims])


def header_nbytes(ndim: int) -> int:
    """Size in bytes of the header (CRC included) of a frame with ``ndim`` dims, from the C++ codec's
    layout (the one home of the wire format)."""
    if isinstance(ndim, bool) or not isinstance(ndim, (int, np.integer)) or not 0 <= ndim <= _codec.MAX_NDIM:
        raise ValueError(f"a frame has 0..{_codec.MAX_NDIM} dims, got {ndim!r}")
    return _HEADER_BASE + _HEADER_PER_DIM * int(ndim)


_HEADER_PER_DIM = _codec.frame_layout(1, [1, 1])[0] - _codec.frame_layout(1, [1])[0]
_HEADER_BASE = _codec.frame_layout(1, [1])[0] - _HEADER_PER_DIM


def frame_nbytes(shape: Sequence[int], bits: int) -> int:
    """Size in bytes of the frame holding codes of ``shape`` at ``bits`` bits each."""
    return frame_layout(shape, bits)[2]


def _as_cpu_tensor(x, what: str, raw_bytes: bool = False) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        if not x.flags.writeable or any(st < 0 for st in x.strides):
            x = x.copy()  # torch.from_numpy warns on read-only arrays and refuses negative strides
        try:
            t = torch.from_numpy(x)
        except TypeError as e:      # object / string arrays
            raise ValueError(f"{what} must be a numeric numpy array, got dtype {x.dtype}") from e
    elif isinstance(x, (bytes, bytearray, memoryview)) and raw_bytes:
        # torch.frombuffer refuses an empty buffer
        t = torch.frombuffer(bytearray(x), dtype=torch.uint8) if len(x) else torch.empty(0, dtype=torch.uint8)
    else:
        raise ValueError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if t.device.type == "meta":
        raise ValueError(f"{what} is a meta tensor: it has no data to pack or unpack")
    if t.is_nested or t.layout != torch.strided:
        raise ValueError(f"{what} must be a dense tensor, got a {'nested' if t.is_nested else t.layout} tensor")
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    return t


@compile_opaque
def pack_codes(codes, bits: int, *, out: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Pack ``codes`` (integer tensor, values in ``[0, 2**bits)``) into a 1-D ``torch.uint8`` frame.

    ``out``, if given, is a contiguous 1-D uint8 CPU tensor of at least :func:`frame_nbytes` bytes;
    the frame is written to its start and the matching view ``out[:nbytes]`` is returned (C++ codec
    only). ``backend``: see the module docstring.
    """
    if type(bits) is not int or not 1 <= bits <= MAX_BITS:  # noqa: E721 - fast path; numpy ints etc. checked here
        bits = check_bits(bits)
    if backend != "auto" or (isinstance(codes, torch.Tensor) and not codes.is_cpu):
        if resolve_backend(backend, codes if isinstance(codes, torch.Tensor) else None) == "triton":
            return _pack_triton(codes, bits, out)
    if type(codes) is torch.Tensor and codes.layout == torch.strided and not codes.is_nested and codes.is_cpu \
            and codes.is_contiguous():  # noqa: E721
        t = codes
    else:
        if isinstance(codes, (torch.Tensor, np.ndarray)) and not getattr(codes, "is_nested", False) and \
                getattr(codes, "layout", torch.strided) == torch.strided:
            frame_layout(tuple(codes.shape), bits)      # before a dense copy of an expanded view (2**40 codes)
        t = _as_cpu_tensor(codes, "codes")
    code = _DTYPES.get(t.dtype)
    if code is None:
        raise ValueError(f"codes must have an integer dtype ({', '.join(str(d) for d in _DTYPES)}), got {t.dtype}")
    shape = t.shape
    _check_ndim(len(shape))
    if out is None:
        # Size from the format (docs/wire-format.md); shape and bits are validated again in C++.
        nbytes = header_nbytes(len(shape)) + (t.numel() * bits + 7) // 8 if 1 <= bits <= MAX_BITS else 0
        out = torch.from_numpy(np.empty(nbytes, np.uint8))  # cheaper than torch.empty for small frames
    elif not (isinstance(out, torch.Tensor) and out.dtype == torch.uint8 and out.dim() == 1
              and out.is_cpu and out.is_contiguous()):
        raise ValueError("out must be a contiguous 1-D torch.uint8 CPU tensor")
    elif _overlap(t, out):
        raise ValueError("out overlaps the memory of codes: the frame would overwrite the codes it is packing")
    n = _codec.pack(t.data_ptr(), code, shape, bits, out.data_ptr(), out.numel())
    return out if n == out.numel() else out[:n]


def _check_ndim(ndim: int) -> None:
    if ndim > _codec.MAX_NDIM:
        raise ValueError(f"codes may have at most {_codec.MAX_NDIM} dimensions, got {ndim}")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous CPU tensors share any byte of memory."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a.numel() > 0 and b.numel() > 0 and a0 < b0 + b.numel() * b.element_size() \
        and b0 < a0 + a.numel() * a.element_size()


def _pack_triton(codes, bits: int, out) -> torch.Tensor:
    from .triton.codec_kernels import pack_frame_triton  # lazy: the CPU path never imports triton

    check_bits(bits)
    if out is not None:
        raise ValueError("out= is only supported by the C++ codec (backend='torch' or CPU tensors)")
    if not isinstance(codes, torch.Tensor):
        raise ValueError(f"codes must be a torch.Tensor for the Triton packer, got {type(codes).__name__}")
    if codes.dtype not in _DTYPES:
        raise ValueError(f"codes must have an integer dtype ({', '.join(str(d) for d in _DTYPES)}), got {codes.dtype}")
    _check_ndim(codes.dim())
    _codec.frame_layout(bits, list(codes.shape))  # validates the dims against the format
    flat = codes.reshape(-1).to(torch.int64)     # in the codes' own dtype 1 << bits wraps (uint8 at 8 bits)
    bad = ((flat < 0) | (flat >= (1 << bits))).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"code out of range at flat index {i}: {int(flat[i])} is not in [0, {1 << bits}) "
                         f"for bits={bits}")
    return pack_frame_triton(codes, bits)


@compile_opaque
def frame_header(frame) -> Tuple[int, Tuple[int, ...]]:
    """Validate a frame's header and size and return ``(bits, shape)`` (the CRC is checked by unpack)."""
    f = _frame_tensor(frame)
    return _codec.parse_header(f.data_ptr(), f.numel())


def _frame_tensor(frame, what: str = "frame") -> torch.Tensor:
    f = _as_cpu_tensor(frame, what, raw_bytes=True)
    if f.dtype != torch.uint8 or f.dim() != 1:
        raise ValueError(f"{what} must be a 1-D torch.uint8 tensor, got dtype={f.dtype} with {f.dim()} dims")
    return f


@compile_opaque
def unpack_codes(frame, *, backend: str = "auto") -> torch.Tensor:
    """Decode a frame made by :func:`pack_codes`; returns ``torch.int32`` codes with the packed shape.

    With ``backend="auto"`` a CUDA frame is decoded on its device by Triton (the header, at most 44
    bytes, is read on the host; CRC and padding are checked on the device) and the codes stay there;
    ``"torch"`` decodes with the C++ codec on the host; ``"triton"`` forces the device decoder."""
    if backend == "auto" and type(frame) is torch.Tensor and frame.is_cpu and frame.dtype == torch.uint8 \
            and frame.dim() == 1 and frame.is_contiguous():  # noqa: E721
        f = frame
    elif isinstance(frame, torch.Tensor) and \
            resolve_backend(backend, frame) == "triton":
        return _unpack_triton(frame)
    else:
        f = _frame_tensor(frame)
    ptr, n = f.data_ptr(), f.numel()
    _, shape = _codec.parse_header(ptr, n)
    if 0 in shape:
        _codec.unpack(ptr, n, 0, 0)                      # no codes; the CRC is checked all the same
        return _empty_codes(shape)
    out = torch.from_numpy(np.empty(shape, np.int32))
    _codec.unpack(ptr, n, out.data_ptr(), out.numel())
    return out


def _empty_codes(shape, device=None) -> torch.Tensor:
    """The empty ``CODES_DTYPE`` tensor of ``shape`` (a dim is 0): numpy refuses one whose other dims are huge ("array
    is too big"), torch one whose strides overflow int64 (then zero strides: it stores nothing)."""
    try:
        return torch.empty(shape, dtype=CODES_DTYPE, device=device)
    except RuntimeError:
        pass
    try:
        return torch.empty_strided(shape, (0,) * len(shape), dtype=CODES_DTYPE, device=device)
    except RuntimeError as e:       # the dims before the 0 multiply past int64: torch counts them in order
        raise ValueError(f"the frame's shape {tuple(shape)} holds no codes, but no torch tensor can take it (its "
                         f"dims multiply past int64 before the 0: {e})") from None


def _unpack_triton(frame: torch.Tensor) -> torch.Tensor:
    from .triton.codec_kernels import unpack_frame_triton  # lazy: the CPU path never imports triton

    if frame.dtype != torch.uint8 or frame.dim() != 1:
        raise ValueError(f"frame must be a 1-D torch.uint8 tensor, got dtype={frame.dtype} with {frame.dim()} dims")
    n = frame.numel()
    # parse_header reads at most the fixed header and 8 dims (44 bytes), never past min(n, 44): a host
    # copy of those bytes with the true frame length validates the header and the frame's size
    head = frame[: min(n, header_nbytes(_codec.MAX_NDIM))].cpu().contiguous()
    bits, shape = _codec.parse_header(head.data_ptr(), n)
    if 0 in shape:                                      # no payload: head is the whole frame
        _codec.unpack(head.data_ptr(), n, 0, 0)
        return _empty_codes(shape, frame.device)
    header = bytes(head[: header_nbytes(len(shape)) - 4].tolist())   # the bytes the CRC covers before the payload
    return unpack_frame_triton(frame.contiguous(), bits, shape, header)


@compile_opaque
def crc32c(data, crc: int = 0) -> int:
    """CRC32C (Castagnoli) of a uint8 tensor / bytes, continuing from ``crc`` (0 starts afresh; an int in
    ``0..2**32 - 1``, a previous result)."""
    if not (is_count(crc) and crc <= _CRC_MAX):
        raise ValueError(f"crc must be an int in 0..{_CRC_MAX} (a CRC32C to continue from), got {crc!r}")
    t = _frame_tensor(data, "data")
    return _codec.crc32c(t.data_ptr(), t.numel(), int(crc))
