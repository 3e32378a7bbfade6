"""Codec microbenchmarks: astra's C++ codec vs a vectorized numpy packer, 10-bit codes, one core.

    python -m pytest bench/test_bench_codec.py --benchmark-only --benchmark-group-by=group
"""
import numpy as np
import pytest
import torch
from codec_reference import np_pack, np_unpack

import astra_kernels

BITS = 10


def _codes(n):
    return torch.randint(0, 2 ** BITS, (n,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)


@pytest.mark.parametrize("n", [512, 1_048_576])
@pytest.mark.parametrize("impl", ["astra", "numpy"])
@pytest.mark.parametrize("op", ["pack", "unpack"])
def test_codec(benchmark, op, impl, n):
    codes = _codes(n)
    benchmark.group = f"{op} {n} codes, {BITS} bits"
    benchmark.extra_info.update(codes=n, bits=BITS)
    if impl == "astra":
        frame = astra_kernels.pack_codes(codes, BITS)
        if op == "pack":
            def fn():
                return astra_kernels.pack_codes(codes, BITS)
        else:
            def fn():
                return astra_kernels.unpack_codes(frame)
    else:
        c = codes.numpy()
        frame = np_pack(c, BITS)
        assert bytes(frame[16:]) == bytes(astra_kernels.pack_codes(codes, BITS).numpy()[16:])  # same payload
        fn = (lambda: np_pack(c, BITS)) if op == "pack" else (lambda: np_unpack(frame))
    out = benchmark(fn)
    if op == "pack":        # what was timed decodes back to the codes (the pack rows checked nothing)
        out = astra_kernels.unpack_codes(out) if impl == "astra" else np_unpack(out)
    assert np.array_equal(np.asarray(out), codes.numpy())


def test_roundtrip_512(benchmark):
    codes = _codes(512)
    benchmark.group = "round trip 512 codes, 10 bits"
    out = benchmark(lambda: astra_kernels.unpack_codes(astra_kernels.pack_codes(codes, BITS)))
    assert torch.equal(out, codes)
