"""CPU benchmark: astra_kernels.gemm (astra's own dense products) against torch's default GEMM.

    PYTHONPATH=.:python python -m pytest bench/test_bench_dense.py --benchmark-only \
        --benchmark-group-by=param:shape --benchmark-columns=min,median,mean,rounds

Shapes: the products astra adds per layer on GPT-2-small shape with ~512 tokens per rank: the codebook transform
before the encode ``[512, 768] x [768, 768]`` and the folded non-local K/V projection ``[512, 768] x [768, 1536]``
(plus bias). Peer: ``torch.addmm`` / ``torch.matmul`` (MKL's sgemm in torch's x86 builds). One torch thread
(bench/conftest.py), same inputs, fp32.
"""
import os
import sys

import pytest
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_ROOT, os.path.join(_ROOT, "python")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from astra_kernels import gemm  # noqa: E402

SHAPES = {"transform-512x768x768": (512, 768, 768, False), "folded-kv-512x768x1536": (512, 768, 1536, True)}
_CACHE = {}


def _case(shape):
    if shape not in _CACHE:
        M, K, N, bias = SHAPES[shape]
        g = torch.Generator().manual_seed(M + K + N)
        x, w = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g) / K ** 0.5
        b = torch.randn(N, generator=g) if bias else None
        ref = x.double() @ w.double() + (0 if b is None else b.double())
        for route in (torch_default, gemm):      # the same answer, or the timing means nothing
            torch.testing.assert_close(route(x, w, b).double(), ref, rtol=1e-5, atol=1e-4)
        _CACHE[shape] = (x, w, b)
    return _CACHE[shape]


def torch_default(x, w, b):
    return torch.matmul(x, w) if b is None else torch.addmm(b, x, w)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_torch_default(benchmark, shape):
    benchmark.extra_info.update(route="torch addmm/matmul", threads=torch.get_num_threads())
    benchmark(torch_default, *_case(shape))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_astra_gemm(benchmark, shape):
    benchmark.extra_info.update(route="astra_kernels.gemm", threads=torch.get_num_threads())
    benchmark(gemm, *_case(shape))
