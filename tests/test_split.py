"""The balanced causal split (split="balanced"): contiguous, every rank non-empty, the largest rank cost minimal;
parallelize equals simulate with it; ranks given different splits are stopped by the input agreement."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_runtime_support import tiny_codebooks, tiny_inputs, tiny_model

import astra
from astra import split
from astra.models import family_of
from astra.split import causal_costs, resolve_split, split_indices


def _cost(n, p, pair, key, encode=0.0, local=None, last=False):
    local = pair if local is None else local
    return n * (1 - encode if last else 1) + pair * n * p + local * n * (n + 1) / 2 + key * p


def _worst(bounds, pair, key, encode, local=None):
    N = len(bounds) - 1
    return max(_cost(b - a, a, pair, key, encode, local, i == N - 1)
               for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])))


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 300), N=st.integers(1, 6), cls=st.booleans(), pair=st.floats(0, 0.05),
       key=st.floats(0, 1), encode=st.sampled_from([0.0, 0.05, 0.5]), extra=st.sampled_from([0.0, 0.3, 2.0]))
def test_balanced_split_is_contiguous_and_minimises_the_largest_cost(T, N, cls, pair, key, encode, extra):
    key *= 1 - encode
    local = pair * (1 + extra)             # the local triangle's pairs cost at least the non-local ones
    start = 1 if cls else 0
    if T - start < N:
        with pytest.raises(ValueError):
            split_indices(T, N, cls, (pair, key, encode, local))
        return
    chunks = split_indices(T, N, cls, (pair, key, encode, local))
    assert len(chunks) == N and torch.equal(torch.cat(chunks), torch.arange(start, T))
    sizes = [len(c) for c in chunks]
    assert min(sizes) >= 1
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    worst = _worst(bounds, pair, key, encode, local)
    for i in range(1, N):              # moving any one boundary by one token never lowers the largest cost
        for d in (-1, 1):
            nb = list(bounds)
            nb[i] += d
            if all(b > a for a, b in zip(nb[:-1], nb[1:])):
                assert _worst(nb, pair, key, encode, local) >= worst - 1e-9
    if pair == 0 and key == 0 and encode == 0:
        assert max(sizes) == -(-(T - start) // N)


def test_split_costs_are_checked():
    with pytest.raises(ValueError, match="0 <= key <= 1 - encode"):
        split_indices(10, 2, False, (0.0, 1.5))
    with pytest.raises(ValueError, match="0 <= key <= 1 - encode"):
        split_indices(10, 2, False, (0.0, 0.9, 0.2))
    with pytest.raises(ValueError, match="pair >= 0"):
        split_indices(10, 2, False, (-1.0, 0.0))
    with pytest.raises(ValueError, match="0 <= encode < 1"):
        split_indices(10, 2, False, (0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="local >= pair"):
        split_indices(10, 2, False, (0.2, 0.0, 0.0, 0.1))
    for bad in [(math.inf, 0.0), (0.1,), (0.1, 0.0, 0.0, 0.1, 0.0), (0.1, math.nan), (True, 0.0)]:
        with pytest.raises(ValueError, match="2 to 4 finite numbers"):
            split_indices(10, 2, False, bad)


def test_split_arguments_are_checked():
    for args, what in [((10.0, 2, False), "seq_len"), ((-1, 2, False), "seq_len"), ((10, 2.0, False), "world_size"),
                       ((10, 0, False), "world_size"), ((10, 2, "yes"), "class_token")]:
        with pytest.raises(ValueError, match=what):
            split_indices(*args)
    for rank in (2, -1, 1.0):
        with pytest.raises(ValueError, match="rank must be an int in 0..world_size - 1"):
            astra.local_indices(10, 2, rank, False)
    assert astra.local_indices(10, 2, 1, False).tolist() == [5, 6, 7, 8, 9]


def test_causal_costs_put_fewer_tokens_on_later_ranks():
    fam = family_of(tiny_model("gpt2"))
    pair, key, encode, local = costs = causal_costs(fam, None)
    assert local > pair > 0 and key > 0 and encode == 0
    sizes = [len(c) for c in split_indices(1024, 4, False, costs)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    assert resolve_split(fam, None, "even") is None and resolve_split(fam, None, "auto") == costs
    # with codebooks the last rank skips its encode: it takes more tokens than without that saving
    cb = tiny_codebooks(tiny_model("gpt2", head=False), "gpt2", 1)
    pair1, key1, enc1, local1 = causal_costs(fam, cb)
    D, c = fam.hidden_size, 1 - 1 / fam.num_layers      # c: the share of layers that encode (layer 0 does not)
    assert 0 < enc1 < 1 and local1 > pair1
    # G = 1: K/V from the tables, but layer 0's non-local keys are projected (every rank computes layer 0)
    assert key1 * split.TABLE_ATTENTION_MAC_COST * 2 * D / pair1 == pytest.approx((1 - c) * 2 * D * D)
    last = [len(split_indices(1024, 4, False, (pair1, key1, e, local1))[-1]) for e in (0.0, enc1, 0.3)]
    assert last[0] <= last[1] < last[2]
    # predictive codebooks: K/V per key (no tables), and the prediction on both sides: D = 64, 2 D^2 GEMM MACs each
    cbp = tiny_codebooks(tiny_model("gpt2", head=False), "gpt2", 1, predict=True)
    pair_p, key_p, enc_p, _ = causal_costs(fam, cbp)
    K = cbp.codebook_size
    token = split.ATTENTION_MAC_COST * 2 * D / pair_p          # one token's per-layer work, as causal_costs counts it
    # K/V + prediction in the coded layers, the plain K/V projection in layer 0
    assert key_p * token == pytest.approx(c * split.GEMM_MAC_COST * (2 * D * D + 2 * D * D) + (1 - c) * 2 * D * D)
    assert enc_p * token == pytest.approx(c * (split.ENCODE_MAC_COST * K * D + split.GEMM_MAC_COST * 2 * D * D))
    with pytest.raises(ValueError, match="split must be one of"):
        resolve_split(fam, None, "uneven")
    bert = family_of(tiny_model("bert"))
    assert resolve_split(bert, None, "auto") is None
    with pytest.raises(astra.UnsupportedModelError, match="bidirectional"):
        resolve_split(bert, None, "balanced")


def _balanced_rank(rank):
    model = tiny_model("gpt2", head=False)
    inputs = tiny_inputs("gpt2", seq=40, padded=True)
    cb = tiny_codebooks(model, "gpt2", 32)
    with torch.no_grad():
        ref = model(**inputs)["last_hidden_state"]
    out = {}
    for name, c in (("g32", cb), ("fp", None)):
        sim = astra.simulate(model, inputs, world_size=2, codebooks=c, split="balanced")["last_hidden_state"]
        pm = astra.parallelize(model, c, timeout=30.0, split="balanced")
        full = pm.gather(pm(**inputs))["last_hidden_state"]
        out[name] = {"vs_sim": float((full - sim).abs().max()), "n": int(pm.last_local_indices.numel())}
        if c is None:
            m = inputs["attention_mask"].bool()
            out[name]["vs_ref"] = float((full - ref).abs()[m].max())
        pm.unpatch()
    try:            # told at parallelize, whose agreement carries the split
        astra.parallelize(model, cb, timeout=30.0, split="balanced" if rank == 0 else "even")
        out["mismatch"] = None
    except astra.InputMismatchError as e:
        out["mismatch"] = str(e)
    return out


def test_balanced_split_parallelize_equals_simulate_and_mismatch_is_caught():
    res = astra.launch(_balanced_rank, 2, timeout=60.0)
    assert res[0]["g32"]["n"] > res[1]["g32"]["n"] and res[0]["g32"]["n"] + res[1]["g32"]["n"] == 40
    for r in res:
        assert r["g32"]["vs_sim"] < 1e-4 and r["fp"]["vs_sim"] < 1e-4 and r["fp"]["vs_ref"] < 1e-4
        assert "split balanced" in r["mismatch"] and "split even" in r["mismatch"]
