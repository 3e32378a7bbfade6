"""Proof chain step 1 for the fused mixed-attention kernel: the Triton kernel (interpreter on CPU, or a
GPU when present) against the float64 reference, fresh random non-zero inputs, poisoned outputs.
fp32 and fp16 only (no bf16 in the interpreter). Small shapes: the interpreter is slow."""
from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from test_attention import (  # noqa: E402
    check,
    group_case,
    make_case,
    mixed_segments,
    noncontig,
    reference,
    table_keys,
)

from astra_kernels.attention import attention_segments, mixed_attention, mixed_attention_reference  # noqa: E402
from astra_kernels.segments import (  # noqa: E402
    CountKeys,
    GroupTableKeys,
    TableKeys,
    TokenKeys,
    positions,
    split_counts,
)
from astra_kernels.testing import (  # noqa: E402
    assert_no_poison,
    kernel_device,
    poisoned_empty,
    random_inputs,
    random_ints,
    seeded_generator,
    triton_runnable,
)

pytestmark = pytest.mark.skipif(not triton_runnable(), reason="needs a GPU or TRITON_INTERPRET=1")

def _to(dev, x):
    return x.to(dev) if isinstance(x, torch.Tensor) else x


def segments(q, k, v, kw):
    """The key segments of a make_case call, built through the public types."""
    B, _, Tl, Dh = q.shape
    qp = positions("q_pos", kw.get("q_pos"), B, Tl, 0, q.device)
    segs = [] if kw.get("include_local") is False else [TokenKeys(k, v, qp, kw.get("local_mask"))]
    if "k_hat" in kw:
        kp = positions("kv_pos", kw.get("kv_pos"), B, kw["k_hat"].shape[2], Tl, q.device)
        segs.append(TokenKeys(kw["k_hat"], kw["v_hat"], kp, kw.get("remote_mask")))
    elif "codes" in kw:
        table = table_keys(q, kw)
        segs += split_counts(table, qp, kw["causal"]) if kw.get("count_weighted") is True else [table]
    return qp, segs


def run_kernel(q, k, v, kw):
    """Segments on the host, then the kernel into poisoned out/lse buffers; returns CPU (out, lse)."""
    from astra_kernels.triton import attention_kernels as ak

    dev = kernel_device()
    q, k, v = _to(dev, q), _to(dev, k), _to(dev, v)
    qp, segs = segments(q, k, v, {n: _to(dev, x) for n, x in kw.items()})
    B, Hq, Tl, Dh = q.shape
    # float32 out: the partial result the public functions ask for with return_lse (a half q's too)
    out = poisoned_empty(B, Hq, Tl, Dh, dtype=torch.float32, device=dev)
    lse = torch.full((B, Hq, Tl), 12345.0, dtype=torch.float32, device=dev)  # sentinel: -inf is legal
    o, l = ak.attention_triton(q, qp, segs, causal=kw.get("causal", False), scale=Dh ** -0.5, out=out, lse=lse)
    assert o is out and l is lse
    assert_no_poison(out, "out")
    assert not bool((lse == 12345.0).any()), "lse not written"
    return out.cpu(), lse.cpu()


CASES = [
    # (mode, Tl, Tr, Hq, Hkv, Dh, positions)
    ("local", 17, 0, 4, 2, 32, "interleaved"),
    ("local", 69, 0, 2, 1, 64, "default"),
    ("per_token", 1, 17, 4, 2, 32, "interleaved"),
    ("per_token", 17, 69, 4, 4, 40, "contiguous"),
    ("table", 17, 1, 4, 2, 32, "interleaved"),
    ("table", 69, 17, 2, 1, 32, "default"),
    ("rope", 17, 69, 4, 2, 32, "interleaved"),
    ("rope", 1, 1, 2, 2, 64, "contiguous"),
    ("rope", 64, 17, 2, 1, 40, "default"),
    ("rope", 17, 23, 2, 1, 96, "interleaved"),
    ("count", 17, 69, 4, 2, 32, "interleaved"),
    ("count", 69, 17, 2, 1, 32, "contiguous"),
    ("count", 1, 64, 4, 2, 64, "default"),
    ("count", 17, 0, 2, 2, 32, "default"),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-Tl{c[1]}-Tr{c[2]}-H{c[3]}/{c[4]}-D{c[5]}-{c[6]}")
def test_kernel_matches_reference_fp32(case, causal):
    mode, Tl, Tr, Hq, Hkv, Dh, positions = case
    q, k, v, kw = make_case(100 + Tl + 7 * Tr + Dh, mode=mode, Tl=Tl, Tr=Tr, Hq=Hq, Hkv=Hkv, Dh=Dh, causal=causal,
                            positions=positions, K=23)
    out, lse = run_kernel(q, k, v, kw)
    ro, rl = reference(q, k, v, **kw)
    check(out, lse, ro, rl)


@pytest.mark.parametrize("mode", ["per_token", "rope", "count"])
def test_kernel_fp16(mode):
    q, k, v, kw = make_case(9, mode=mode, Tl=17, Tr=23, causal=True, dtype=torch.float16)
    out, lse = run_kernel(q, k, v, kw)
    ro, rl = reference(q, k, v, **kw)
    check(out, lse, ro, rl, dtype=torch.float16)
    # the public call: a partial result in float32 with return_lse, else q's dtype (that output rounded once)
    dev = kernel_device()
    args, kw_d = (_to(dev, t) for t in (q, k, v)), {n: _to(dev, x) for n, x in kw.items()}
    part, _ = mixed_attention(*args, backend="triton", return_lse=True, **kw_d)
    args = (_to(dev, t) for t in (q, k, v))
    whole = mixed_attention(*args, backend="triton", **kw_d)
    assert part.dtype == torch.float32 and whole.dtype == torch.float16
    assert torch.equal(whole.cpu(), part.cpu().to(torch.float16))


def test_kernel_no_masks_and_all_masked_rows():
    q, k, v, kw = make_case(31, mode="count", masks=False, positions="interleaved", causal=True)
    out, lse = run_kernel(q, k, v, kw)
    check(out, lse, *reference(q, k, v, **kw))
    q, k, v, kw = make_case(32, mode="rope", positions="interleaved", causal=True)
    kw["local_mask"][1] = False
    kw["remote_mask"][1] = False
    out, lse = run_kernel(q, k, v, kw)
    assert bool(torch.isneginf(lse[1]).all()) and bool((out[1] == 0).all())
    check(out, lse, *reference(q, k, v, **kw))


def test_kernel_count_equals_per_token_and_cpu():
    q, k, v, kw = make_case(41, mode="count", Tr=69, K=5, causal=True, positions="interleaved")
    kw.pop("count_weighted")
    a, la = run_kernel(q, k, v, dict(kw, count_weighted=True))
    b, lb = run_kernel(q, k, v, dict(kw, count_weighted=False))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    c, lc = mixed_attention(q, k, v, return_lse=True, backend="torch", **kw)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    fin = torch.isfinite(lc)
    torch.testing.assert_close(la[fin], lc[fin], rtol=1e-5, atol=1e-5)


def test_kernel_nonlocal_only_pass_and_public_api():
    dev = kernel_device()
    q, k, v, kw = make_case(51, mode="rope", causal=True, positions="interleaved")
    remote = {n: kw[n] for n in ("codes", "k_table", "v_table", "rope_cos", "rope_sin", "kv_pos", "remote_mask")}
    out, lse = run_kernel(q, None, None, dict(remote, causal=True, q_pos=kw["q_pos"], include_local=False))
    ro, rl = reference(q, k, v, causal=True, q_pos=kw["q_pos"], include_local=False, **remote)
    check(out, lse, ro, rl)
    o2, l2 = mixed_attention(q.to(dev), k.to(dev), v.to(dev), backend="triton", return_lse=True,
                             **{n: _to(dev, x) for n, x in kw.items()})
    check(o2.cpu(), l2.cpu(), *reference(q, k, v, **kw))


def test_kernel_empty_query_block():
    q, k, v, kw = make_case(61, mode="count", Tl=0, Tr=9)
    dev = kernel_device()
    out, lse = mixed_attention(q.to(dev), k.to(dev), v.to(dev), backend="triton", return_lse=True,
                               **{n: _to(dev, x) for n, x in kw.items()})
    assert out.shape == (2, 4, 0, 32) and lse.shape == (2, 4, 0)


@pytest.mark.parametrize("mode", ["per_token", "rope"])
def test_kernel_noncontiguous_inputs(mode):
    q, k, v, kw = make_case(14, mode=mode, causal=True, positions="interleaved")
    kw2 = {n: (noncontig(x) if n in ("k_hat", "v_hat") else x) for n, x in kw.items()}
    out, lse = run_kernel(noncontig(q), noncontig(k), noncontig(v), kw2)
    check(out, lse, *reference(q, k, v, **kw))


def test_kernel_causal_sorted_skip_with_leading_padding():
    """LOCAL_SORTED loop bound + rows whose only visible keys are padded (out 0, lse -inf)."""
    q, k, v, kw = make_case(18, mode="count", causal=True, positions="default", Tl=37, Tr=20)
    kw["local_mask"][:, :3] = False
    kw["local_mask"][:, 3:] = True
    out, lse = run_kernel(q, k, v, kw)
    check(out, lse, *reference(q, k, v, **kw))
    assert bool(torch.isneginf(lse[:, :, :3]).all())


def test_kernel_mixed_forms_need_two_launches():
    """Per-token non-local keys and count keys use the same kernel slot pointers: the launcher runs two
    launches and merges them by log-sum-exp."""
    from astra_kernels.triton import attention_kernels as ak

    q, k, v, qp, segs, ref_kw = mixed_segments(5)
    assert len(ak._launches(qp, segs)) == 2
    dev = kernel_device()
    qp_d = _to(dev, qp)
    on_dev = [replace(s, **{f: _to(dev, t) for f, t in vars(s).items() if isinstance(t, torch.Tensor)})
              for s in segs]
    on_dev[0] = replace(on_dev[0], pos=qp_d)   # the local keys sit at the query positions
    out, lse = attention_segments(_to(dev, q), on_dev, q_pos=qp_d, causal=True, return_lse=True, backend="triton")
    check(out.cpu(), lse.cpu(), *reference(q, k, v, **ref_kw))


@pytest.mark.parametrize("dtype,table_dtype,rope,Dh", [(torch.float32, None, False, 32),
                                                      (torch.float32, None, True, 40),
                                                      (torch.float16, None, True, 32),
                                                      (torch.float32, torch.float16, False, 64)])
def test_kernel_group_table(dtype, table_dtype, rope, Dh):
    """HAS_GTABLE: the sum of G gathered rows per key inside the kernel (fp32), optional RoPE, causal,
    masks, interleaved positions; poisoned outputs; against the float64 reference of the summed K/V."""
    from astra_kernels.triton import attention_kernels as ak

    q, k, v, kw, ref_kw = group_case(21 + Dh, Dh=Dh, G=5, K=7, rope=rope, dtype=dtype, table_dtype=table_dtype)
    dev = kernel_device()
    kw = {n: _to(dev, x) for n, x in kw.items()}
    q, k, v = _to(dev, q), _to(dev, k), _to(dev, v)
    B, Hq, Tl, _ = q.shape
    qp = positions("q_pos", kw["q_pos"], B, Tl, 0, dev)
    kp = kw["kv_pos"].to(torch.int64)
    segs = [TokenKeys(k, v, qp, kw["local_mask"]),
            GroupTableKeys(kw["codes"], kw["k_table"], kw["v_table"], kp, kw["remote_mask"], kw.get("rope_cos"),
                           kw.get("rope_sin"))]
    out = poisoned_empty(B, Hq, Tl, Dh, dtype=torch.float32, device=dev)     # the partial result's dtype
    lse = torch.full((B, Hq, Tl), 12345.0, dtype=torch.float32, device=dev)
    ak.attention_triton(q, qp, segs, causal=True, scale=Dh ** -0.5, out=out, lse=lse)
    assert_no_poison(out, "out")
    assert not bool((lse == 12345.0).any()), "lse not written"
    check(out.cpu(), lse.cpu(), *mixed_attention_reference(q.cpu(), k.cpu(), v.cpu(), **ref_kw), dtype=dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")     # the interpreter's numpy
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("case", ["scale", "scores"])
def test_kernel_scores_that_overflow_raise(case):
    """Scaled scores beyond fp32 (finite inputs) are a ValueError, never an empty row or a finite wrong answer: the
    kernel's NaN reaches the lse, which the host checks (with validate; a device sync)."""
    dev = kernel_device()
    g = torch.Generator().manual_seed(1703)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g).to(dev) for _ in range(3))
    if case == "scores":
        q, k = q * 1e20, k * 1e20
    with pytest.raises(ValueError, match="attention scores overflow"):
        mixed_attention(q, k, v, scale=1e38 if case == "scale" else None, backend="triton")


def test_kernel_causal_skip_needs_strictly_increasing_positions():
    """Mutation audit: LOCAL_SORTED (the causal block skip) was only exercised with strictly increasing or shuffled
    positions, so a host check weakened to non-decreasing (``>=``) went unnoticed. Equal positions that straddle a
    query block (BLOCK_M = 16 in the interpreter) make a key past the block visible to a query inside it: the
    skip must stay off, and every query must see its equal-position key past the block boundary."""
    q, k, v, kw = make_case(71, mode="local", Tl=37, causal=True, positions="default", masks=False)
    qp = torch.arange(37)
    qp[16:] -= 1                                   # positions 15 at indices 15 and 16 (blocks 0 and 1)
    qp[33:] -= 1                                   # and 31 at indices 31 and 32 (blocks 1 and 2)
    kw["q_pos"] = torch.stack([qp, qp + 5])
    out, lse = run_kernel(q, k, v, kw)
    check(out, lse, *reference(q, k, v, **kw))


def test_kernel_count_keys_with_their_own_value_table_get_their_own_launch():
    """Mutation audit: ``_fits`` lets count keys share a launch with table keys only when both K and V tables are
    the same objects (the count slot reads the remote slot's table pointers). Every existing case shares both
    tables, so dropping the V-table condition went unnoticed. Here the count keys share the K table but not the V
    table: two launches, and the count keys' values come from their own table (float64 reference of the same keys
    given per token, each count key repeated ``count`` times; not causal, so positions do not matter)."""
    from astra_kernels.triton import attention_kernels as ak

    g = seeded_generator(73)
    B, Hq, Hkv, Tl, Dh, K = 2, 4, 2, 17, 32, 7
    q, k, v = (random_inputs(B, h, Tl, Dh, generator=g) for h in (Hq, Hkv, Hkv))
    kt, vt, vt_counts = (random_inputs(K, Hkv, Dh, generator=g) for _ in range(3))
    codes = random_ints(B, 9, low=0, high=K, generator=g)
    ucodes = torch.stack([torch.randperm(K, generator=g)[:3] for _ in range(B)])
    counts = random_ints(B, 3, low=1, high=5, generator=g)
    qp = positions("q_pos", None, B, Tl)
    kp = positions("kv_pos", None, B, 9, Tl)
    segs = [TokenKeys(k, v, qp), TableKeys(codes, kt, vt, kp),
            CountKeys(ucodes, counts.to(torch.float32).log(), kt, vt_counts)]
    assert len(ak._launches(qp, segs)) == 2
    rep = [torch.repeat_interleave(ucodes[b], counts[b]) for b in range(B)]
    width = max(len(r) for r in rep)               # rows may differ in their total count: pad, masked
    cc = torch.stack([torch.cat([r, r[:1].repeat(width - len(r))]) for r in rep])
    cmask = torch.arange(width)[None, :] < torch.tensor([len(r) for r in rep])[:, None]
    k_hat = torch.cat([kt[codes], kt[cc]], dim=1).permute(0, 2, 1, 3)
    v_hat = torch.cat([vt[codes], vt_counts[cc]], dim=1).permute(0, 2, 1, 3)
    dev = kernel_device()
    segs_d = [replace(s, **{f: _to(dev, t) for f, t in vars(s).items() if isinstance(t, torch.Tensor)}) for s in segs]
    out = poisoned_empty(B, Hq, Tl, Dh, dtype=q.dtype, device=dev)
    lse = torch.full((B, Hq, Tl), 12345.0, dtype=torch.float32, device=dev)
    ak.attention_triton(_to(dev, q), segs_d[0].pos, segs_d, causal=False, scale=Dh ** -0.5, out=out, lse=lse)
    assert_no_poison(out, "out")
    assert not bool((lse == 12345.0).any()), "lse not written"
    remote_mask = torch.cat([torch.ones(B, 9, dtype=torch.bool), cmask], dim=1)
    ref = mixed_attention_reference(q, k, v, k_hat=k_hat, v_hat=v_hat, causal=False, remote_mask=remote_mask)
    check(out.cpu(), lse.cpu(), *ref)


def test_count_split_keeps_keys_at_the_last_query_position():
    """Mutation audit (split_counts, astra_kernels/segments.py; here because both backends go through it): with
    permutation positions no non-local key ever sits at a query's position, so the "visible to some queries" test
    ``kp <= max(q_pos)`` could become ``<`` unnoticed (dropping keys only the last query sees). Here several table
    keys share the position of each row's last query (and of other queries): count-weighted attention must still
    equal the float64 per-token reference, in the kernel and on the CPU path."""
    q, k, v, kw = make_case(79, mode="count", Tl=17, Tr=40, K=5, causal=True, positions="interleaved")
    qmax = kw["q_pos"].max(dim=1).values
    kw["kv_pos"] = kw["kv_pos"].clone()
    kw["kv_pos"][:, :4] = qmax[:, None]                    # at the last query's position
    kw["kv_pos"][:, 4:8] = kw["q_pos"][:, 3:7]             # at other queries' positions
    kw["remote_mask"][:, :8] = True
    ref = reference(q, k, v, **kw)
    check(*run_kernel(q, k, v, kw), *ref)
    check(*mixed_attention(q, k, v, return_lse=True, backend="torch", **kw), *ref)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_causal_keys_in_descending_position_order(backend):
    """Mutation audit (the CPU path's C++ kernel call, astra_kernels/attention.py ``_attention_kernel``; here with
    the kernel's case): causal keys were only ever ascending or shuffled, so the "keys sorted" flag that lets the
    C++ kernel cut the key range by binary search could be computed wrongly for descending positions unnoticed.
    Local and non-local keys in strictly descending position order (a reversed chunk) must match the float64
    reference on both backends."""
    q, k, v, kw = make_case(89, mode="per_token", B=2, Tl=40, Tr=70, causal=True, positions="default", masks=False)
    kw["q_pos"] = 200 - 3 * torch.arange(40)
    kw["kv_pos"] = 150 - 2 * torch.arange(70)              # before, among and after the queries
    ref = reference(q, k, v, **kw)
    if backend == "torch":
        check(*mixed_attention(q, k, v, return_lse=True, backend="torch", **kw), *ref)
    else:
        check(*run_kernel(q, k, v, kw), *ref)
