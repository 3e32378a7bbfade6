"""The only place astra reaches into ``astra_kernels`` (one way to do each thing).

Every op is looked up at call time, so the kernel layer can land (or be swapped) independently.
"""
from __future__ import annotations

import importlib


def _k():
    return importlib.import_module("astra_kernels")


def _op(name: str):
    mod = _k()
    fn = getattr(mod, name, None)
    if fn is None:
        raise ImportError(f"astra_kernels.{name} is not available (is the astra_kernels package installed/built?)")
    return fn


def vq_encode(x, codebook, **kw):
    return _op("vq_encode")(x, codebook, **kw)


def vq_decode(codes, codebook):
    return _op("vq_decode")(codes, codebook)


def encode_and_pack(x, codebook, bits):
    """vq_encode + pack into one codec frame (fused Triton encode+pack on CUDA, C++ codec on CPU)."""
    return _op("encode_and_pack")(x, codebook, bits)


def pack_codes(codes, bits):
    return _op("pack_codes")(codes, bits)


def unpack_codes(frame):
    return _op("unpack_codes")(frame)


def frame_nbytes(shape, bits):
    return int(_op("frame_nbytes")(tuple(int(s) for s in shape), int(bits)))


def mixed_attention(q, k, v, **kw):
    return _op("mixed_attention")(q, k, v, **kw)


def merge_attention(out_a, lse_a, out_b, lse_b):
    return _op("merge_attention")(out_a, lse_a, out_b, lse_b)
