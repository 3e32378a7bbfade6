"""CPU benchmark: mixed_attention (table / count-weighted form) vs the naive route a user would write.

    PYTHONPATH=.:python python -m pytest bench/test_bench_attention.py --benchmark-only \
        --benchmark-group-by=group --benchmark-columns=min,median,mean,rounds

Setting (ViT/GPT-2-base sized layer, one device's view): Tl = 512 local tokens, Tr in {512, 3584}
non-local tokens known by G = 1 codes, D = 768, 12 heads x 64, K = 1024 codewords, batch 1,
bidirectional. Both routes run with ONE torch thread (bench/conftest.py), same inputs.

* naive: ``h_hat = codebook[codes]``; ``k = h_hat @ Wk + bk``; ``v = h_hat @ Wv + bv``; reshape to heads,
  concatenate with the local K/V, ``F.scaled_dot_product_attention``.
* table_count: ``mixed_attention(q, k, v, codes=..., k_table=..., v_table=...)`` with the per-layer
  tables ``codebook @ Wk + bk`` precomputed once (not timed: once per layer per model); "auto" picks the
  count-weighted form (distinct codes + log(count)), input validation included in the timing.
* table_per_token: same with ``count_weighted=False`` (gather every token's K/V row), for reference.

Grouped VQ, G = 32 (24-dim groups, K = 1024 per group), same layer, causal-free, Tr in {512, 3584}:

* g32_decode_project: ``h_hat = vq_decode(codes, codebook)``, ``k/v = h_hat @ W + b`` (two D x D
  projections per token), then ``attention_per_token`` - what the runtime did for G > 1.
* g32_group_table (fp32 / bf16 tables): ``attention_group_table`` with per-group partial tables from
  ``build_group_tables`` (built once, not timed; 201 MB fp32 / 101 MB bf16 per layer): each non-local
  K/V row is the sum of 32 gathered table rows.

    PYTHONPATH=.:python python -m pytest bench/test_bench_attention.py --benchmark-only -k g32 \
        --benchmark-group-by=group --benchmark-columns=min,median,mean,rounds
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_ROOT, os.path.join(_ROOT, "python")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from astra_kernels import (  # noqa: E402
    attention_group_table,
    attention_local,
    attention_per_token,
    build_group_tables,
    vq_decode,
)
from astra_kernels.attention import mixed_attention  # noqa: E402

D, H, DH, K, TL = 768, 12, 64, 1024, 512


@pytest.fixture(autouse=True)
def _group(request, benchmark):
    """Every benchmark's group from its size (``--benchmark-group-by=group``): ``param:Tr`` raised KeyError in
    pytest-benchmark once the causal cases, which have T and no Tr, sat in the same file."""
    p = request.node.callspec.params
    benchmark.group = f"Tr={p['Tr']}" if "Tr" in p else f"causal T={p['T']}"


def _setup(Tr):
    g = torch.Generator().manual_seed(1234 + Tr)
    codebook = torch.randn(K, D, generator=g)
    Wk = torch.randn(D, D, generator=g) / D ** 0.5
    Wv = torch.randn(D, D, generator=g) / D ** 0.5
    bk = torch.randn(D, generator=g) * 0.1
    bv = torch.randn(D, generator=g) * 0.1
    q = torch.randn(1, H, TL, DH, generator=g)
    k = torch.randn(1, H, TL, DH, generator=g)
    v = torch.randn(1, H, TL, DH, generator=g)
    codes = torch.randint(0, K, (1, Tr), generator=g)
    k_table = (codebook @ Wk + bk).view(K, H, DH)
    v_table = (codebook @ Wv + bv).view(K, H, DH)
    return dict(codebook=codebook, Wk=Wk, Wv=Wv, bk=bk, bv=bv, q=q, k=k, v=v, codes=codes,
                k_table=k_table, v_table=v_table)


def naive(s):
    h_hat = s["codebook"][s["codes"][0]]                       # [Tr, D]
    kr = (h_hat @ s["Wk"] + s["bk"]).view(1, -1, H, DH).transpose(1, 2)
    vr = (h_hat @ s["Wv"] + s["bv"]).view(1, -1, H, DH).transpose(1, 2)
    kk = torch.cat((s["k"], kr), dim=2)
    vv = torch.cat((s["v"], vr), dim=2)
    return F.scaled_dot_product_attention(s["q"], kk, vv)


def ours(s, count_weighted="auto"):
    return mixed_attention(s["q"], s["k"], s["v"], codes=s["codes"], k_table=s["k_table"], v_table=s["v_table"],
                           count_weighted=count_weighted, backend="torch")


_CACHE = {}


def _case(Tr):
    if Tr not in _CACHE:
        s = _setup(Tr)
        ref = naive(s)
        for cw in ("auto", False):  # same answer as the naive route, or the timing means nothing
            torch.testing.assert_close(ours(s, cw), ref, rtol=1e-4, atol=1e-4)
        _CACHE[Tr] = s
    return _CACHE[Tr]


@pytest.mark.parametrize("Tr", [512, 3584])
def test_naive_dequant_project_sdpa(benchmark, Tr):
    s = _case(Tr)
    benchmark.extra_info.update(route="naive", threads=torch.get_num_threads())
    benchmark(naive, s)


@pytest.mark.parametrize("Tr", [512, 3584])
def test_mixed_attention_table_count(benchmark, Tr):
    s = _case(Tr)
    benchmark.extra_info.update(route="table_count", threads=torch.get_num_threads())
    benchmark(ours, s)


@pytest.mark.parametrize("Tr", [512, 3584])
def test_mixed_attention_table_per_token(benchmark, Tr):
    s = _case(Tr)
    benchmark.extra_info.update(route="table_per_token", threads=torch.get_num_threads())
    benchmark(ours, s, False)


G32 = 32
_G_CACHE = {}


def _g32_setup():
    if "base" not in _G_CACHE:
        g = torch.Generator().manual_seed(4321)
        cb = torch.randn(G32, K, D // G32, generator=g)
        Wk = torch.randn(D, D, generator=g) / D ** 0.5          # nn.Linear layout [out, in]
        Wv = torch.randn(D, D, generator=g) / D ** 0.5
        bk = torch.randn(D, generator=g) * 0.1
        bv = torch.randn(D, generator=g) * 0.1
        s = dict(codebook=cb, Wk=Wk, Wv=Wv, bk=bk, bv=bv, q=torch.randn(1, H, TL, DH, generator=g),
                 k=torch.randn(1, H, TL, DH, generator=g), v=torch.randn(1, H, TL, DH, generator=g))
        for dt in (torch.float32, torch.bfloat16):
            s[dt] = build_group_tables(cb, Wk, bk, Wv, bv, kv_heads=H, dtype=dt)
        _G_CACHE["base"] = s
    return _G_CACHE["base"]


def g32_decode_project(s, codes):
    h_hat = vq_decode(codes, s["codebook"], backend="torch")[0]           # [Tr, D]
    kr = torch.addmm(s["bk"], h_hat, s["Wk"].T).view(1, -1, H, DH).transpose(1, 2)
    vr = torch.addmm(s["bv"], h_hat, s["Wv"].T).view(1, -1, H, DH).transpose(1, 2)
    return attention_per_token(s["q"], s["k"], s["v"], kr, vr, backend="torch")


def g32_group_table(s, codes, dtype):
    kt, vt = s[dtype]
    return attention_group_table(s["q"], s["k"], s["v"], codes, kt, vt, backend="torch")


def _g32_case(Tr):
    key = ("codes", Tr)
    if key not in _G_CACHE:
        s = _g32_setup()
        codes = torch.randint(0, K, (1, Tr, G32), generator=torch.Generator().manual_seed(Tr))
        ref = g32_decode_project(s, codes)
        torch.testing.assert_close(g32_group_table(s, codes, torch.float32), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(g32_group_table(s, codes, torch.bfloat16), ref, rtol=2e-2, atol=2e-2)
        _G_CACHE[key] = codes
    return _g32_setup(), _G_CACHE[key]


@pytest.mark.parametrize("Tr", [512, 3584])
def test_g32_decode_project(benchmark, Tr):
    s, codes = _g32_case(Tr)
    benchmark.extra_info.update(route="g32_decode_project", G=G32, threads=torch.get_num_threads())
    benchmark(g32_decode_project, s, codes)


@pytest.mark.parametrize("table", ["fp32", "bf16"])
@pytest.mark.parametrize("Tr", [512, 3584])
def test_g32_group_table(benchmark, Tr, table):
    s, codes = _g32_case(Tr)
    dt = torch.float32 if table == "fp32" else torch.bfloat16
    benchmark.extra_info.update(route=f"g32_group_table_{table}", G=G32, threads=torch.get_num_threads())
    benchmark(g32_group_table, s, codes, dt)


# ---- the local causal triangle (every rank's local attention in a causal model) ------------------------------
# attention_local(causal=True) against torch's SDPA with is_causal=True (what HF's "sdpa" attention runs), both on
# HF's layout (q/k/v transposed views of [1, T, H, Dh]), T local tokens, one thread:
#
#     PYTHONPATH=.:python python -m pytest bench/test_bench_attention.py --benchmark-only -k causal \
#         --benchmark-group-by=group --benchmark-columns=min,median,mean,rounds
_C_CACHE = {}


def _causal_case(T):
    if T not in _C_CACHE:
        g = torch.Generator().manual_seed(77 + T)
        qkv = torch.randn(1, T, 3 * H * DH, generator=g)
        q, k, v = (x.view(1, T, H, DH).transpose(1, 2) for x in qkv.split(H * DH, dim=2))
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
        for route in (causal_sdpa, causal_astra):    # the same answer, or the timing means nothing
            torch.testing.assert_close(route((q, k, v)).double(), ref, rtol=1e-4, atol=1e-4)
        _C_CACHE[T] = (q, k, v)
    return _C_CACHE[T]


def causal_sdpa(s):
    return F.scaled_dot_product_attention(*s, is_causal=True)


def causal_astra(s):
    return attention_local(*s, causal=True, backend="torch")


@pytest.mark.parametrize("T", [256, 524, 1024])
def test_causal_sdpa(benchmark, T):
    s = _causal_case(T)
    benchmark.extra_info.update(route="sdpa is_causal", threads=torch.get_num_threads())
    benchmark(causal_sdpa, s)


@pytest.mark.parametrize("T", [256, 524, 1024])
def test_causal_attention_local(benchmark, T):
    s = _causal_case(T)
    benchmark.extra_info.update(route="attention_local causal", threads=torch.get_num_threads())
    benchmark(causal_astra, s)
