"""Mixed-precision attention: public API, CPU path (proof chain step 3) and merge, against the float64
reference. The Triton kernel's interpreter tests are in test_attention_triton.py (they reuse make_case)."""

import pytest
import torch

from astra_kernels import attention_table, build_group_tables
from astra_kernels.attention import merge_attention, mixed_attention, mixed_attention_reference
from astra_kernels.segments import CountKeys, TableKeys, TokenKeys, positions, prune_causal, split_counts
from astra_kernels.testing import assert_matches_reference, random_inputs, random_ints, seeded_generator

MODES = ("local", "per_token", "table", "rope", "count")


@pytest.fixture(autouse=True, params=["kernel", "flash"])
def cpu_route(request, monkeypatch):
    """Every test runs on both fp32 CPU routes: the C++ kernel (csrc/attention_cpu.cpp, AVX-512) and torch's
    flash kernel (the route of CPUs without AVX-512)."""
    import astra_kernels.attention as A

    if request.param == "kernel" and A._cpu_kernel() is None:
        pytest.skip("the C++ attention kernel needs AVX-512 (this CPU has none, or ASTRA_NO_AVX512 is set)")
    if request.param == "flash":
        monkeypatch.setattr(A, "_cpu_kernel", lambda: None)
    return request.param


def rope_tables(P, Dh, dtype=torch.float32, base=10000.0):
    inv = 1.0 / (base ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh))
    ang = torch.arange(P, dtype=torch.float64)[:, None] * inv[None, :]
    ang = torch.cat((ang, ang), dim=1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def make_case(seed, *, mode="table", B=2, Hq=4, Hkv=2, Tl=17, Tr=23, Dh=32, K=13, causal=False, masks=True,
              positions="interleaved", dtype=torch.float32):
    """(q, k, v, kwargs) for one random call; kwargs holds everything but the backend."""
    g = seeded_generator(seed)
    q = random_inputs(B, Hq, Tl, Dh, dtype=dtype, generator=g)
    k = random_inputs(B, Hkv, Tl, Dh, dtype=dtype, generator=g)
    v = random_inputs(B, Hkv, Tl, Dh, dtype=dtype, generator=g)
    kw = dict(causal=causal)
    if mode == "local":
        Tr = 0
    elif mode == "per_token":
        kw["k_hat"] = random_inputs(B, Hkv, Tr, Dh, dtype=dtype, generator=g)
        kw["v_hat"] = random_inputs(B, Hkv, Tr, Dh, dtype=dtype, generator=g)
    else:
        kw["codes"] = random_ints(B, Tr, low=0, high=K, generator=g)
        kw["k_table"] = random_inputs(K, Hkv, Dh, dtype=dtype, generator=g)
        kw["v_table"] = random_inputs(K, Hkv, Dh, dtype=dtype, generator=g)
        kw["count_weighted"] = mode == "count" if mode != "rope" else "auto"
        if mode == "rope":
            kw["rope_cos"], kw["rope_sin"] = rope_tables(Tl + Tr + 3, Dh)
    if positions == "interleaved":  # arbitrary global positions, different per batch row
        perms = torch.stack([torch.randperm(Tl + Tr, generator=g) for _ in range(B)])
        kw["q_pos"] = perms[:, :Tl]
        if Tr:
            kw["kv_pos"] = perms[:, Tl:]
    elif positions == "contiguous":  # sequence-parallel chunk in the middle: remote keys before and after
        a = Tr // 2
        kw["q_pos"] = a + torch.arange(Tl)
        if Tr:
            kw["kv_pos"] = torch.cat((torch.arange(a), a + Tl + torch.arange(Tr - a)))
    if masks:
        kw["local_mask"] = torch.rand(B, Tl, generator=g) > 0.25
        if Tr:
            kw["remote_mask"] = torch.rand(B, Tr, generator=g) > 0.25
    return q, k, v, kw


def reference(q, k, v, count_weighted=None, backend=None, **kw):
    """The float64 reference is the per-token definition: it takes no count_weighted / backend."""
    return mixed_attention_reference(q, k, v, **kw)


def check(out, lse, ref_out, ref_lse, dtype=torch.float32):
    """Relative error bar: |out - ref| <= rtol * |ref| + rtol * max|ref| elementwise (a normwise relative
    error under rtol; an element that is a near-cancelling sum only needs the absolute part), fp32:
    rtol = 1e-5. lse: 1e-5 abs/rel. All-masked rows: out 0, lse -inf exactly where the reference has them."""
    scale = float(ref_out.abs().max()) if ref_out.numel() else 1.0
    if dtype == torch.float32:
        rtol, atol = 1e-5, 1e-5 * scale
    elif dtype == torch.float64:
        rtol, atol = 1e-10, 1e-10 * scale
    else:
        rtol, atol = 2e-2, 1e-2 * scale
    partial = torch.float64 if dtype == torch.float64 else torch.float32    # with return_lse: rounded after merging
    assert out.dtype == partial and lse.dtype == partial
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "all-masked rows differ"
    fin = torch.isfinite(ref_lse)
    assert_matches_reference(out, ref_out, rtol=rtol, atol=atol, name="out")
    lt = {torch.float32: 1e-5, torch.float64: 1e-10}.get(dtype, 1e-2)
    assert_matches_reference(lse[fin], ref_lse[fin], rtol=lt, atol=lt, name="lse")
    assert bool((out[~fin] == 0).all()), "all-masked rows must output 0"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("positions", ["default", "interleaved", "contiguous"])
def test_cpu_matches_reference(mode, causal, positions):
    seed = hash((mode, causal, positions)) % 1000
    q, k, v, kw = make_case(seed, mode=mode, causal=causal, positions=positions)
    out, lse = mixed_attention(q, k, v, return_lse=True, backend="torch", **kw)
    ro, rl = reference(q, k, v, **kw)
    check(out, lse, ro, rl)


@pytest.mark.parametrize("Tl,Tr", [(0, 5), (1, 0), (1, 1), (17, 0), (69, 1), (1, 69), (64, 64), (69, 130)])
@pytest.mark.parametrize("mode", ["per_token", "rope", "count"])
def test_cpu_sizes(Tl, Tr, mode):
    q, k, v, kw = make_case(7 + Tl + 3 * Tr, mode=mode, Tl=Tl, Tr=Tr, causal=True, K=29)
    out, lse = mixed_attention(q, k, v, return_lse=True, **kw)  # auto -> CPU path
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    if Tl:
        ro, rl = reference(q, k, v, **kw)
        check(out, lse, ro, rl)


@pytest.mark.parametrize("Hq,Hkv,Dh", [(1, 1, 32), (12, 12, 64), (8, 2, 128), (6, 3, 96), (4, 1, 40)])
def test_cpu_heads_and_head_dims(Hq, Hkv, Dh):
    for mode in ("rope", "count", "per_token"):
        q, k, v, kw = make_case(Hq * Dh, mode=mode, Hq=Hq, Hkv=Hkv, Dh=Dh, B=1, Tl=9, Tr=21, causal=True)
        out, lse = mixed_attention(q, k, v, return_lse=True, scale=0.3, **kw)
        ro, rl = reference(q, k, v, scale=0.3, **kw)
        check(out, lse, ro, rl)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cpu_dtypes(dtype):
    for mode in ("per_token", "rope", "count"):
        q, k, v, kw = make_case(3, mode=mode, dtype=dtype, causal=True)
        out, lse = mixed_attention(q, k, v, return_lse=True, **kw)
        ro, rl = reference(q, k, v, **kw)
        check(out, lse, ro, rl, dtype=dtype)
        alone = mixed_attention(q, k, v, **kw)                 # no lse: the output in q's dtype, rounded once
        assert alone.dtype == dtype and torch.equal(alone, out.to(dtype))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("positions", ["default", "interleaved", "contiguous"])
def test_count_weighted_equals_per_token(causal, positions):
    q, k, v, kw = make_case(11, mode="count", causal=causal, positions=positions, Tr=90, K=7)
    kw.pop("count_weighted")
    a, la = mixed_attention(q, k, v, count_weighted=True, return_lse=True, **kw)
    b, lb = mixed_attention(q, k, v, count_weighted=False, return_lse=True, **kw)
    c, lc = mixed_attention(q, k, v, return_lse=True, **kw)  # "auto" -> count weighted
    assert torch.equal(a, c) and torch.equal(la, lc)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.isneginf(la), torch.isneginf(lb))
    fin = torch.isfinite(lb)
    torch.testing.assert_close(la[fin], lb[fin], rtol=1e-5, atol=1e-5)


def table_keys(q, kw):
    B, Tl, Tr = q.shape[0], q.shape[2], kw["codes"].shape[1]
    kp = positions("kv_pos", kw.get("kv_pos"), B, Tr, Tl, q.device)
    return TableKeys(kw["codes"], kw["k_table"], kw["v_table"], kp, kw.get("remote_mask"),
                     kw.get("rope_cos"), kw.get("rope_sin"))


def test_count_split_segments():
    """Contiguous chunks: every remote key is before or after all queries -> no per-token keys left."""
    q, k, v, kw = make_case(5, mode="count", causal=True, positions="contiguous", Tr=40)
    qp = positions("q_pos", kw["q_pos"], q.shape[0], q.shape[2])
    segs = split_counts(table_keys(q, kw), qp, causal=True)
    assert [type(s) for s in segs] == [CountKeys]
    # the keys after the chunk are dropped from the counts: total count = visible earlier keys
    Tr = kw["codes"].shape[1]
    before = (kw["kv_pos"] < kw["q_pos"].min()) & kw["remote_mask"]
    counts = segs[0].log_counts.exp().nan_to_num(0.0).sum(dim=1)
    assert torch.equal(counts.round().long(), before.sum(dim=1)), (counts, before.sum(dim=1), Tr)
    # interleaved positions: keys visible to only some queries stay per-token (table keys)
    q, k, v, kw = make_case(5, mode="count", causal=True, positions="interleaved", Tr=40)
    qp = positions("q_pos", kw["q_pos"], q.shape[0], q.shape[2])
    segs = split_counts(table_keys(q, kw), qp, causal=True)
    assert [type(s) for s in segs] == [CountKeys, TableKeys]


def test_all_masked_rows_and_merge_convention():
    q, k, v, kw = make_case(2, mode="count", causal=True, positions="interleaved")
    kw["local_mask"][0] = False
    kw["remote_mask"][0] = False
    out, lse = mixed_attention(q, k, v, return_lse=True, **kw)
    assert bool(torch.isneginf(lse[0]).all()) and bool((out[0] == 0).all())
    ro, rl = reference(q, k, v, **kw)
    check(out, lse, ro, rl)
    # merging a fully masked partial with anything returns the other side unchanged
    o2, l2 = merge_attention(out, lse, torch.full_like(out, float("nan")), torch.full_like(lse, float("-inf")))
    assert torch.equal(o2, out) and torch.equal(l2, lse)


@pytest.mark.parametrize("mode", ["per_token", "rope", "count"])
@pytest.mark.parametrize("causal", [False, True])
def test_merge_local_and_nonlocal_passes(mode, causal):
    q, k, v, kw = make_case(21, mode=mode, causal=causal, positions="interleaved")
    full, lfull = mixed_attention(q, k, v, return_lse=True, **kw)
    remote_kw = {n: kw[n] for n in ("k_hat", "v_hat", "codes", "k_table", "v_table", "rope_cos", "rope_sin",
                                    "kv_pos", "remote_mask", "count_weighted") if n in kw}
    o_loc, l_loc = mixed_attention(q, k, v, causal=causal, q_pos=kw["q_pos"], local_mask=kw["local_mask"],
                                   return_lse=True)
    o_rem, l_rem = mixed_attention(q, None, None, include_local=False, causal=causal, q_pos=kw["q_pos"],
                                   return_lse=True, **remote_kw)
    o, l = merge_attention(o_loc, l_loc, o_rem, l_rem)
    ro, rl = reference(q, k, v, **kw)
    check(o, l, ro, rl)
    torch.testing.assert_close(o, full, rtol=1e-5, atol=1e-6)


def test_float64_partials_merge_to_float64_accuracy():
    """The lse of float64 inputs came back float32, so a float64 local + non-local merge (parallelize's overlap) was
    ~1e-7 off the single pass (float64 models under astra.parallelize)."""
    q, k, v, kw = make_case(23, mode="per_token", causal=True, positions="interleaved", dtype=torch.float64)
    full, lfull = mixed_attention(q, k, v, return_lse=True, **kw)
    assert lfull.dtype == torch.float64
    o_loc, l_loc = mixed_attention(q, k, v, causal=True, q_pos=kw["q_pos"], local_mask=kw["local_mask"],
                                   return_lse=True)
    o_rem, l_rem = mixed_attention(q, None, None, include_local=False, causal=True, q_pos=kw["q_pos"],
                                   kv_pos=kw["kv_pos"], remote_mask=kw["remote_mask"], k_hat=kw["k_hat"],
                                   v_hat=kw["v_hat"], return_lse=True)
    o, l = merge_attention(o_loc, l_loc, o_rem, l_rem)
    ro, rl = reference(q, k, v, **kw)
    check(o, l, ro, rl, dtype=torch.float64)
    assert float((o - full).abs().max()) < 1e-13


def test_a_single_query_with_a_huge_token_stride_runs():
    """A [B, H, 1, Dh] q counts as contiguous whatever its token stride, so .contiguous() kept a stride past the
    C++ kernel's limit and the call was refused ("pass a contiguous q")."""
    q, k, v, kw = make_case(24, mode="local", Tl=1, masks=False, positions="contiguous")
    c = q.contiguous()
    wide = c.as_strided(c.shape, (c.stride(0), c.stride(1), 2 ** 31, c.stride(3)))   # dim 2 has size 1
    assert wide.stride(2) == 2 ** 31 and wide.is_contiguous() and torch.equal(wide, q)
    ro, rl = reference(q, k, v, **kw)
    out, lse = mixed_attention(wide, k, v, return_lse=True, **kw)
    check(out, lse, ro, rl)


def test_a_key_at_the_last_querys_position_is_kept():
    """prune_causal drops keys after the last query; a key at exactly its position is visible (0.4 off the reference
    when the comparison was strict)."""
    g = seeded_generator(25)
    q = random_inputs(1, 2, 3, 16, generator=g)
    k, v = random_inputs(1, 2, 3, 16, generator=g), random_inputs(1, 2, 3, 16, generator=g)
    kh, vh = random_inputs(1, 2, 2, 16, generator=g), random_inputs(1, 2, 2, 16, generator=g)
    kw = dict(causal=True, q_pos=torch.tensor([[0, 2, 4]]), kv_pos=torch.tensor([[1, 4]]), k_hat=kh, v_hat=vh)
    out, lse = mixed_attention(q, k, v, return_lse=True, **kw)
    check(out, lse, *reference(q, k, v, **kw))


def test_merge_validates_shapes():
    a = torch.randn(2, 3, 4, 8)
    la = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="shapes differ"):
        merge_attention(a, la, torch.randn(2, 3, 5, 8), la)
    with pytest.raises(ValueError, match="lse shapes"):
        merge_attention(a, la, a, torch.randn(2, 3))


def test_merge_refuses_nan_lse_and_non_finite_weighted_out():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 4, 8, generator=g)
    la, lb = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    for bad in (float("nan"), float("inf")):
        lbad = la.clone()
        lbad[1, 2, 3] = bad
        with pytest.raises(ValueError, match="lse_a contains NaN or \\+inf"):
            merge_attention(a, lbad, b, lb)
        obad = b.clone()
        obad[0, 1, 2, 5] = bad
        with pytest.raises(ValueError, match="non-finite"):
            merge_attention(a, la, obad, lb)
    # a row with lse = -inf carries no weight: its out may hold anything
    lneg, obad = lb.clone(), b.clone()
    lneg[0, 1, 2], obad[0, 1, 2, 5] = float("-inf"), float("nan")
    o, l = merge_attention(a, la, obad, lneg)
    assert torch.equal(o[0, 1, 2], a[0, 1, 2]) and bool(torch.isfinite(o).all())
    o, l = merge_attention(obad, lneg, a, la)           # either side
    assert torch.equal(o[0, 1, 2], a[0, 1, 2]) and bool(torch.isfinite(o).all())


def _bad(**over):
    q, k, v, kw = make_case(1, mode="rope", masks=True)
    kw.update(over)
    return q, k, v, kw


@pytest.mark.parametrize("change,msg", [
    (lambda q, k, v, kw: kw.update(k_hat=torch.randn(2, 2, 23, 32), v_hat=torch.randn(2, 2, 23, 32)), "not both"),
    (lambda q, k, v, kw: kw.pop("v_table"), "needs codes, k_table and v_table"),
    (lambda q, k, v, kw: kw.update(codes=kw["codes"] + 100), "out of table range"),
    (lambda q, k, v, kw: kw.update(codes=-kw["codes"] - 1), "out of table range"),
    (lambda q, k, v, kw: kw.update(codes=kw["codes"].float()), "integer"),
    (lambda q, k, v, kw: kw.update(count_weighted=True), "RoPE"),
    (lambda q, k, v, kw: kw.update(count_weighted="yes"), "count_weighted"),
    (lambda q, k, v, kw: kw.update(rope_sin=None), "both rope_cos and rope_sin"),
    (lambda q, k, v, kw: kw.update(rope_cos=kw["rope_cos"][:, :16]), "rope_cos/rope_sin"),
    (lambda q, k, v, kw: kw.update(kv_pos=kw["kv_pos"] + 1000), "kv_pos out of RoPE table range"),
    (lambda q, k, v, kw: kw.update(local_mask=kw["local_mask"].float()), "bool"),
    (lambda q, k, v, kw: kw.update(remote_mask=kw["remote_mask"][:, :3]), "remote_mask"),
    (lambda q, k, v, kw: kw.update(q_pos=torch.arange(5)), "q_pos"),
    (lambda q, k, v, kw: kw.update(q_pos=kw["q_pos"].float()), "integer"),
    (lambda q, k, v, kw: kw.update(k_table=kw["k_table"][:, :1], v_table=kw["v_table"][:, :1]), "kv heads"),
    (lambda q, k, v, kw: kw.update(v_table=kw["v_table"][:-1]), "shapes differ"),
    (lambda q, k, v, kw: kw["k_table"].__setitem__((0, 0, 0), float("nan")), "non-finite"),
    (lambda q, k, v, kw: q.__setitem__((0, 0, 0, 0), float("inf")), "non-finite"),
    (lambda q, k, v, kw: kw.update(scale=float("nan")), "scale"),
    (lambda q, k, v, kw: kw.update(scale="0.5"), "scale must be a real number or None"),     # was read as 0.5
    (lambda q, k, v, kw: kw.update(scale=1j), "scale must be a real number or None"),        # was a TypeError
])
def test_validation_errors(change, msg):
    q, k, v, kw = _bad()
    change(q, k, v, kw)
    with pytest.raises(ValueError, match=msg):
        mixed_attention(q, k, v, **kw)


def test_validation_shapes_and_modes():
    q, k, v, kw = make_case(1, mode="per_token")
    with pytest.raises(ValueError, match="multiple of kv heads"):
        mixed_attention(q[:, :3], k, v, **kw)
    with pytest.raises(ValueError, match="k/v must have shape"):
        mixed_attention(q, k[:, :, :5], v[:, :, :5], **kw)
    with pytest.raises(ValueError, match="share a dtype"):
        mixed_attention(q, k.double(), v.double(), **kw)
    with pytest.raises(ValueError, match="both k_hat and v_hat"):
        mixed_attention(q, k, v, k_hat=kw["k_hat"])
    with pytest.raises(ValueError, match="count_weighted=True needs table mode"):
        mixed_attention(q, k, v, count_weighted=True, **kw)
    with pytest.raises(ValueError, match="table mode only"):
        mixed_attention(q, k, v, rope_cos=torch.ones(4, 32), rope_sin=torch.ones(4, 32), **kw)
    with pytest.raises(ValueError, match="without non-local tokens"):
        mixed_attention(q, k, v, kv_pos=torch.arange(3))
    with pytest.raises(ValueError, match="required unless include_local=False"):
        mixed_attention(q, None, None, **kw)
    with pytest.raises(ValueError, match="backend"):
        mixed_attention(q, k, v, backend="cuda", **kw)
    with pytest.raises(ValueError, match="4-D"):
        mixed_attention(q[0], k, v)


def test_default_positions_causal_hide_remote():
    """Defaults: local at 0..Tl-1, non-local after -> with causal=True the remote keys are invisible."""
    q, k, v, kw = make_case(4, mode="per_token", positions="default", masks=False, causal=True)
    a = mixed_attention(q, k, v, **kw)
    b = mixed_attention(q, k, v, causal=True)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=25, deadline=None, derandomize=True)
    @given(seed=st.integers(0, 10_000), mode=st.sampled_from(MODES), causal=st.booleans(),
           Tl=st.integers(1, 40), Tr=st.integers(0, 40), K=st.integers(1, 20), G=st.sampled_from([1, 2, 3]),
           positions=st.sampled_from(["default", "interleaved", "contiguous"]))
    def test_cpu_property(seed, mode, causal, Tl, Tr, K, G, positions):
        q, k, v, kw = make_case(seed, mode=mode, causal=causal, Tl=Tl, Tr=Tr, K=K, Hq=2 * G, Hkv=2,
                                positions=positions, Dh=16)
        out, lse = mixed_attention(q, k, v, return_lse=True, **kw)
        ro, rl = reference(q, k, v, **kw)
        check(out, lse, ro, rl)
except ImportError:  # pragma: no cover
    pass


@pytest.mark.parametrize("mode", ["per_token", "rope", "count"])
def test_cpu_matmul_fallback_route(mode, monkeypatch):
    """The portable matmul route (used where torch has no CPU flash kernel) meets the same bar."""
    import astra_kernels.attention as A

    monkeypatch.setattr(A, "_cpu_kernel", lambda: None)
    missing = RuntimeError("\"_scaled_dot_product_flash_attention_for_cpu\" not implemented for 'Float'")
    monkeypatch.setattr(A, "_attention_flash_cpu", lambda *a, **k: (_ for _ in ()).throw(missing))
    monkeypatch.setattr(A, "_FLASH_FAILED", set())
    for causal in (False, True):
        q, k, v, kw = make_case(77, mode=mode, causal=causal, positions="interleaved", Tl=40, Tr=50)
        out, lse = mixed_attention(q, k, v, return_lse=True, **kw)
        check(out, lse, *reference(q, k, v, **kw))
    assert torch.float32 in A._FLASH_FAILED


def test_an_out_of_memory_in_the_flash_route_is_raised_and_does_not_retire_it(monkeypatch):
    """Every RuntimeError of torch's CPU flash op, an out-of-memory included, was read as "this build lacks the op":
    the call went on through the matmul route and float32 stayed off the flash route for the rest of the process."""
    import astra_kernels.attention as A

    monkeypatch.setattr(A, "_cpu_kernel", lambda: None)
    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(A, "_attention_flash_cpu", lambda *a, **k: (_ for _ in ()).throw(oom))
    monkeypatch.setattr(A, "_FLASH_FAILED", set())
    q, k, v, kw = make_case(78, mode="per_token", Tl=8, Tr=9)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        mixed_attention(q, k, v, **kw)
    assert A._FLASH_FAILED == set()


@pytest.mark.parametrize("mode", ["per_token", "rope"])
def test_causal_pruning_drops_keys_no_query_sees(mode):
    q, k, v, kw = make_case(8, mode=mode, causal=True, positions="contiguous", Tr=30, masks=False)
    qp = positions("q_pos", kw["q_pos"], q.shape[0], q.shape[2])
    if mode == "per_token":
        seg = TokenKeys(kw["k_hat"], kw["v_hat"], positions("kv_pos", kw["kv_pos"], q.shape[0], 30))
    else:
        seg = table_keys(q, kw)
    seg = prune_causal(seg, qp)
    before = int((kw["kv_pos"] < kw["q_pos"].min()).sum())
    assert seg.pos.shape == (2, before) and bool((seg.pos < kw["q_pos"].min()).all())
    out, lse = mixed_attention(q, k, v, return_lse=True, **kw)
    check(out, lse, *reference(q, k, v, **kw))


def noncontig(x):
    """Same values, [B, T, H, D] memory layout seen as [B, H, T, D] (what a runtime's .transpose gives)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2) if x.dim() == 4 else x.t().contiguous().t()


@pytest.mark.parametrize("mode", ["per_token", "count", "rope"])
def test_cpu_noncontiguous_inputs(mode):
    q, k, v, kw = make_case(13, mode=mode, causal=True, positions="interleaved", Hq=4, Hkv=2)
    q2, k2, v2 = noncontig(q), noncontig(k), noncontig(v)
    assert not q2.is_contiguous()
    kw2 = dict(kw)
    for n in ("k_hat", "v_hat"):
        if n in kw2:
            kw2[n] = noncontig(kw2[n])
    out, lse = mixed_attention(q2, k2, v2, return_lse=True, **kw2)
    check(out, lse, *reference(q, k, v, **kw))


@pytest.mark.parametrize("Tl,route", [(37, "chunks"), (300, "chunks"), (300, "triangle")])
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (3, 3)])
@pytest.mark.parametrize("mode", ["local", "count", "rope"])
def test_cpu_causal_sorted_local_route(mode, Hq, Hkv, Tl, route, monkeypatch):
    """Increasing local positions: from 128 keys on, chunks of queries each read only the keys up to their
    last query; above _CAUSAL_CHUNKED_MAX_KEYS the flash kernel's own triangle (shrunk here to reach it); leading
    padded keys leave the first queries with no key at all (out 0, lse -inf) when nothing non-local is visible."""
    import astra_kernels.attention as A

    if route == "triangle":
        monkeypatch.setattr(A, "_CAUSAL_CHUNKED_MAX_KEYS", 100)
    q, k, v, kw = make_case(17 + Tl, mode=mode, causal=True, positions="default", Hq=Hq, Hkv=Hkv, Tl=Tl)
    kw["local_mask"][:, :3] = False
    kw["local_mask"][:, 3:] = True
    out, lse = mixed_attention(noncontig(q), noncontig(k), noncontig(v), return_lse=True, **kw)
    ro, rl = reference(q, k, v, **kw)
    check(out, lse, ro, rl)
    assert bool(torch.isneginf(lse[:, :, :3]).all())


@pytest.mark.parametrize("B,Hq,Hkv", [(1, 4, 4), (2, 4, 2)])
def test_cpu_causal_chunks_of_sorted_segment(B, Hq, Hkv, monkeypatch):
    """A sorted non-local segment whose keys start after the first query chunks: those chunks read no key
    of it (out 0, lse -inf before the merge), later chunks read a prefix; every row equals the reference.
    The chunk size is shrunk so that uneven chunks and a partial last chunk occur."""
    import astra_kernels.attention as A

    monkeypatch.setattr(A, "_CAUSAL_CHUNK", 48)
    Tl, Tr = 250, 230
    q, k, v, kw = make_case(23 + B, mode="per_token", B=B, Hq=Hq, Hkv=Hkv, Tl=Tl, Tr=Tr, causal=True,
                            positions="default")
    kw["q_pos"] = torch.arange(Tl).repeat(B, 1) * 2
    kw["kv_pos"] = (torch.arange(Tr) * 2 + 101 + torch.arange(B).unsqueeze(1) * 10)
    for include_local in (True, False):
        out, lse = mixed_attention(q, k, v, return_lse=True, include_local=include_local, **kw)
        ro, rl = reference(q, k, v, include_local=include_local, **kw)
        check(out, lse, ro, rl)
    assert bool(torch.isneginf(lse[:, :, :50]).all()) and bool(torch.isfinite(lse[:, :, 60:]).all())


def mixed_segments(seed, Tl=17, Tr=40, K=9):
    """A call with three key segments of different forms: local tokens, per-token non-local keys (half the
    non-local tokens) and the count keys of the other half, plus the equivalent reference keywords."""
    q, k, v, kw = make_case(seed, mode="per_token", Tl=Tl, Tr=Tr, causal=True, positions="interleaved")
    g = seeded_generator(seed + 1)
    B, Hkv, Dh = k.shape[0], k.shape[1], k.shape[3]
    kt, vt = random_inputs(K, Hkv, Dh, generator=g), random_inputs(K, Hkv, Dh, generator=g)
    codes = random_ints(B, Tr, low=0, high=K, generator=g)
    qp = positions("q_pos", kw["q_pos"], B, Tl)
    kp = positions("kv_pos", kw["kv_pos"], B, Tr)
    before = kp < qp.min(dim=1, keepdim=True).values        # count keys must be visible to every query
    table = TableKeys(codes, kt, vt, kp, before)
    segs = [TokenKeys(k, v, qp, kw["local_mask"]), TokenKeys(kw["k_hat"], kw["v_hat"], kp, kw["remote_mask"])]
    segs += split_counts(table, qp, causal=True)
    assert isinstance(segs[-1], CountKeys)
    # reference: the same keys per token (the table keys appended as a second block of non-local tokens)
    k_all = torch.cat([kw["k_hat"], kt[codes].permute(0, 2, 1, 3)], dim=2)
    v_all = torch.cat([kw["v_hat"], vt[codes].permute(0, 2, 1, 3)], dim=2)
    ref_kw = dict(k_hat=k_all, v_hat=v_all, q_pos=qp, kv_pos=torch.cat([kp, kp], dim=1), causal=True,
                  local_mask=kw["local_mask"], remote_mask=torch.cat([kw["remote_mask"], before], dim=1))
    return q, k, v, qp, segs, ref_kw


def test_attention_segments_mixed_forms():
    from astra_kernels import attention_segments

    q, k, v, qp, segs, ref_kw = mixed_segments(3)
    out, lse = attention_segments(q, segs, q_pos=qp, causal=True, return_lse=True, backend="torch")
    check(out, lse, *reference(q, k, v, **ref_kw))


def test_segment_validation():
    from astra_kernels import attention_segments

    q, k, v, qp, segs, _ = mixed_segments(4)
    with pytest.raises(ValueError, match="shapes differ"):
        TokenKeys(k, v[:, :, :3], qp)
    with pytest.raises(ValueError, match="positions must be int64"):
        TokenKeys(k, v, qp.to(torch.int32))
    with pytest.raises(ValueError, match="log_counts must be float32"):
        CountKeys(segs[-1].codes, segs[-1].log_counts.double(), segs[-1].k_table, segs[-1].v_table)
    with pytest.raises(ValueError, match="count weighting is invalid with RoPE"):
        cos = torch.ones(100, q.shape[3])
        split_counts(TableKeys(segs[-1].codes, segs[-1].k_table, segs[-1].v_table, qp[:, :segs[-1].codes.shape[1]],
                               rope_cos=cos, rope_sin=cos), qp, causal=False)
    with pytest.raises(ValueError, match="must be TokenKeys / TableKeys / GroupTableKeys / CountKeys"):
        attention_segments(q, [k])
    with pytest.raises(ValueError, match="no keys at all"):
        attention_segments(q, [])
    with pytest.raises(ValueError, match=f"disagree on the number of kv heads: {segs[0].label} {k.shape[1]}, "
                                         "k_hat/v_hat 1"):
        attention_segments(q, [segs[0], TokenKeys(k[:, :1], v[:, :1], qp)])


def test_key_segments_take_int64_or_int32_codes_only():
    """TableKeys / GroupTableKeys / CountKeys accepted any integer codes and then failed inside torch (int16: an
    IndexError; uint8 indices read as a boolean mask); the public ops convert, the segments now say so."""
    from astra_kernels import GroupTableKeys

    g = seeded_generator(47)
    codes = random_ints(1, 5, low=0, high=8, generator=g)
    table, pos = random_inputs(8, 2, 16, generator=g), torch.arange(5)[None]
    for dt in (torch.int16, torch.uint8, torch.int8):
        for make in (lambda c: TableKeys(c, table, table, pos),
                     lambda c: GroupTableKeys(c[..., None], table[None], table[None], pos),
                     lambda c: CountKeys(c, torch.zeros(c.shape), table, table)):
            with pytest.raises(ValueError, match=f"codes must be int64 or int32 in a key segment, got {dt}"):
                make(codes.to(dt))
    for dt in (torch.int64, torch.int32):
        TableKeys(codes.to(dt), table, table, pos)


@pytest.mark.parametrize("count_weighted", [False, True])
def test_table_shape_errors_name_the_callers_arguments(count_weighted):
    """A k_table of the wrong head dim or head count was reported by the internal segment class ("TableKeys has
    batch 1, head_dim 17", "CountKeys ..." with count weighting) or as a bare list of head counts."""
    g = torch.Generator().manual_seed(3)
    B, H, Tl, Tr, Dh, K = 1, 2, 5, 7, 16, 32
    q, k, v = (torch.randn(B, H, Tl, Dh, generator=g) for _ in range(3))
    codes = torch.randint(0, K, (B, Tr), generator=g)
    wide = torch.randn(K, H, Dh + 1, generator=g)
    with pytest.raises(ValueError, match=f"codes/k_table has batch 1, head_dim {Dh + 1}; q has batch 1, head_dim {Dh}"):
        attention_table(q, k, v, codes, wide, wide, count_weighted=count_weighted)
    more = torch.randn(K, H + 1, Dh, generator=g)
    with pytest.raises(ValueError, match=f"disagree on the number of kv heads: k/v {H}, codes/k_table {H + 1}"):
        attention_table(q, k, v, codes, more, more, count_weighted=count_weighted)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_finiteness_check_never_overflows(dtype):
    """The one finiteness check (astra_kernels.checks): large finite fp16 inputs pass (their sum is inf),
    any NaN / inf is named."""
    from astra_kernels.checks import check_finite

    x = torch.full((300, 1000), 60000.0 if dtype == torch.float16 else 1e30, dtype=dtype)
    check_finite("x", x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[17, 5] = bad
        with pytest.raises(ValueError, match="x contains non-finite values"):
            check_finite("x", y)


def group_case(seed, *, B=2, Hq=4, Hkv=2, Tl=13, Tr=19, Dh=32, G=3, K=11, rope=False, causal=True,
               dtype=torch.float32, table_dtype=None):
    """(q, k, v, kwargs for attention_group_table, reference kwargs): per-group tables, interleaved
    positions, masks. The reference gets the per-token K/V: the float64 sum of the gathered rows, rotated."""
    g = seeded_generator(seed)
    q = random_inputs(B, Hq, Tl, Dh, dtype=dtype, generator=g)
    k = random_inputs(B, Hkv, Tl, Dh, dtype=dtype, generator=g)
    v = random_inputs(B, Hkv, Tl, Dh, dtype=dtype, generator=g)
    kt = random_inputs(G, K, Hkv, Dh, dtype=table_dtype or dtype, generator=g)
    vt = random_inputs(G, K, Hkv, Dh, dtype=table_dtype or dtype, generator=g)
    codes = random_ints(B, Tr, G, low=0, high=K, generator=g)
    perms = torch.stack([torch.randperm(Tl + Tr, generator=g) for _ in range(B)])
    kw = dict(q_pos=perms[:, :Tl], kv_pos=perms[:, Tl:], causal=causal,
              local_mask=torch.rand(B, Tl, generator=g) > 0.25, remote_mask=torch.rand(B, Tr, generator=g) > 0.25)
    gi = torch.arange(G)
    k_hat = kt.double()[gi, codes].sum(2)                                  # [B, Tr, Hkv, Dh]
    v_hat = vt.double()[gi, codes].sum(2)
    if rope:
        kw["rope_cos"], kw["rope_sin"] = rope_tables(Tl + Tr, Dh)
        c, s = (t.double()[kw["kv_pos"]].unsqueeze(2) for t in (kw["rope_cos"], kw["rope_sin"]))
        k_hat = k_hat * c + torch.cat((-k_hat[..., Dh // 2:], k_hat[..., :Dh // 2]), -1) * s
    ref_kw = {n: x for n, x in kw.items() if not n.startswith("rope")}
    ref_kw.update(k_hat=k_hat.permute(0, 2, 1, 3), v_hat=v_hat.permute(0, 2, 1, 3))
    return q, k, v, dict(kw, codes=codes, k_table=kt, v_table=vt), ref_kw


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,table_dtype", [(torch.float32, None), (torch.float16, None),
                                               (torch.float32, torch.bfloat16)])
def test_cpu_group_table_matches_reference(rope, causal, dtype, table_dtype):
    from astra_kernels import attention_group_table

    q, k, v, kw, ref_kw = group_case(11, rope=rope, causal=causal, dtype=dtype, table_dtype=table_dtype)
    out, lse = attention_group_table(q, k, v, return_lse=True, backend="torch", **kw)
    check(out, lse, *mixed_attention_reference(q, k, v, **ref_kw), dtype=dtype)


def test_build_group_tables_equals_decode_then_project():
    """sum_g table[g, c_g] == (decoded codeword) @ W.T + b, for K and V, fp32 tables to fp32 rounding,
    bf16 tables to bf16 rounding (G rows of rounding error each)."""
    from astra_kernels import build_group_tables, vq_decode

    g = seeded_generator(12)
    G, K, DG, Hkv, Dh, N = 4, 9, 6, 2, 8, 15
    cb = random_inputs(G, K, DG, generator=g)
    wk, wv = random_inputs(Hkv * Dh, G * DG, generator=g), random_inputs(Hkv * Dh, G * DG, generator=g)
    bk, bv = random_inputs(Hkv * Dh, generator=g), random_inputs(Hkv * Dh, generator=g)
    codes = random_ints(N, G, low=0, high=K, generator=g)
    h = vq_decode(codes, cb).double()
    gi = torch.arange(G)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        kt, vt = build_group_tables(cb, wk, bk, wv, bv, kv_heads=Hkv, dtype=dtype)
        assert kt.shape == vt.shape == (G, K, Hkv, Dh) and kt.dtype == dtype
        for t, w, b in ((kt, wk, bk), (vt, wv, bv)):
            ref = (h @ w.double().T + b.double()).reshape(N, Hkv, Dh)
            got = t.double()[gi, codes].sum(1)
            assert_matches_reference(got, ref, rtol=tol, atol=tol * float(ref.abs().max()), name=str(dtype))
    kt0, _ = build_group_tables(cb, wk, None, wv, None, kv_heads=Hkv)
    assert_matches_reference(kt0.double()[gi, codes].sum(1), (h @ wk.double().T).reshape(N, Hkv, Dh), rtol=1e-5,
                             atol=1e-5)
    with pytest.raises(ValueError, match="w_k must have shape"):
        build_group_tables(cb, wk[:, :-1], bk, wv, bv, kv_heads=Hkv)
    with pytest.raises(ValueError, match="b_v must have shape"):
        build_group_tables(cb, wk, bk, wv, bv[:-1], kv_heads=Hkv)
    # before: ZeroDivisionError, torch's "invalid shape dimension", tables of different shapes, int or NaN tables
    for heads in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="kv_heads must be an int >= 1"):
            build_group_tables(cb, wk, bk, wv, bv, kv_heads=heads)
    with pytest.raises(ValueError, match="w_k and w_v must have the same rows"):
        build_group_tables(cb, wk, bk, wv[:Dh], bv[:Dh], kv_heads=1)
    with pytest.raises(ValueError, match="dtype must be a floating dtype"):
        build_group_tables(cb, wk, bk, wv, bv, kv_heads=Hkv, dtype=torch.int32)
    for i, name in enumerate(("codebook", "w_k", "b_k", "w_v", "b_v")):
        args = [t.clone() for t in (cb, wk, bk, wv, bv)]
        args[i].view(-1)[3] = float("nan")
        with pytest.raises(ValueError, match=f"{name} contains non-finite"):
            build_group_tables(*args, kv_heads=Hkv)


@pytest.mark.parametrize("mode,causal", [("local", True), ("local", False), ("per_token", False),
                                         ("per_token", True), ("table", False), ("count", False), ("rope", True)])
def test_gradients_are_the_references_on_every_form(mode, causal, cpu_route):
    """The C++ kernel has no backward: with inputs that require grad the host takes a differentiable route, so the
    output carries the graph (on the kernel route it silently had none). Every form's gradients, the log-sum-exp's
    included, are the float64 reference's: with local and non-local keys the per-segment routes merged by a
    log-sum-exp that carried no gradient (torch's CPU flash op), and q / k got 0.48 wrong against |grad| <= 0.59."""
    q, k, v, kw = make_case(44, mode=mode, causal=causal, positions="contiguous", Tl=9, Tr=11, Dh=16)
    names = [n for n in ("k_hat", "v_hat", "k_table", "v_table") if n in kw]
    leaves = [q, k, v] + [kw[n] for n in names]
    f64 = [t.double().requires_grad_() for t in leaves]
    f32 = [t.clone().requires_grad_() for t in leaves]
    out, lse = mixed_attention(*f32[:3], backend="torch", return_lse=True, **dict(kw, **dict(zip(names, f32[3:]))))
    assert out.requires_grad and lse.requires_grad
    g = seeded_generator(45)
    w, wl = random_inputs(*out.shape, generator=g), random_inputs(*lse.shape, generator=g)
    live = torch.isfinite(lse)                              # rows that see no key: lse = -inf, no gradient
    ((out * w).sum() + (lse[live] * wl[live]).sum()).backward()
    r_out, r_lse = reference(*f64[:3], **dict(kw, **dict(zip(names, f64[3:]))))
    ((r_out * w.double()).sum() + (r_lse[live] * wl.double()[live]).sum()).backward()
    for name, got, ref in zip(["q", "k", "v"] + names, f32, f64):
        assert got.grad is not None, name
        assert_matches_reference(got.grad, ref.grad.float(), rtol=1e-4, atol=1e-4 * float(ref.grad.abs().max()),
                                 name=name)
    with torch.no_grad():                                   # no graph wanted: the fused routes again
        assert not mixed_attention(*f32[:3], backend="torch", **kw).requires_grad


def test_decode_and_group_tables_are_differentiable():
    """vq_decode and build_group_tables detached their inputs: outputs without a graph, gradients silently lost."""
    from astra_kernels import vq_decode

    g = seeded_generator(46)
    cb = random_inputs(3, 7, 4, dtype=torch.float64, generator=g).requires_grad_()
    codes = random_ints(5, 3, low=0, high=7, generator=g)
    assert torch.autograd.gradcheck(lambda c: vq_decode(codes, c), (cb,))
    wk, wv = (random_inputs(8, 12, dtype=torch.float64, generator=g).requires_grad_() for _ in range(2))
    bk, bv = (random_inputs(8, dtype=torch.float64, generator=g).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(lambda *a: build_group_tables(*a, kv_heads=2), (cb, wk, bk, wv, bv))


def test_group_table_validation_and_pruning():
    from astra_kernels import GroupTableKeys, attention_group_table

    q, k, v, kw, ref_kw = group_case(13)
    with pytest.raises(ValueError, match="codes must have shape"):
        attention_group_table(q, k, v, **dict(kw, codes=kw["codes"][..., :2]))
    with pytest.raises(ValueError, match="codes out of table range"):
        attention_group_table(q, k, v, **dict(kw, codes=kw["codes"] + 11))
    with pytest.raises(ValueError, match="k_table and v_table differ"):
        attention_group_table(q, k, v, **dict(kw, v_table=kw["v_table"].half()))
    with pytest.raises(ValueError, match="RoPE needs both"):
        attention_group_table(q, k, v, **dict(kw, rope_cos=torch.ones(40, 32)))
    seg = GroupTableKeys(kw["codes"], kw["k_table"], kw["v_table"], kw["kv_pos"], kw["remote_mask"])
    qp = kw["q_pos"][:, :3]                                    # few queries: causal pruning drops keys
    pruned = prune_causal(seg, qp)
    assert pruned.num_keys < seg.num_keys and pruned.codes.shape == (2, pruned.num_keys, 3)
    for b in range(2):
        n = int(pruned.valid[b].sum())
        keep = (seg.pos[b] <= qp[b].max()) & seg.valid[b]
        assert torch.equal(pruned.codes[b, :n], seg.codes[b][keep]) and torch.equal(pruned.pos[b, :n], seg.pos[b][keep])


@pytest.mark.parametrize("Tl,Tr,Dh", [(1, 1, 1), (15, 31, 7), (17, 33, 16), (65, 100, 65), (130, 7, 24)])
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_block_edges_and_threads(Tl, Tr, Dh, threads, cpu_route):
    """Query blocks of 64 and key blocks of 32 with partial last blocks, head dims off the 6-wide output tile,
    several threads: every route equals the reference."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for mode, positions in (("per_token", "interleaved"), ("count", "contiguous"), ("local", "default")):
            q, k, v, kw = make_case(Tl * 7 + Tr + Dh, mode=mode, Tl=Tl, Tr=Tr, Dh=Dh, causal=True,
                                    positions=positions, Hq=4, Hkv=2)
            out, lse = mixed_attention(q, k, v, return_lse=True, **kw)
            check(out, lse, *reference(q, k, v, **kw))
    finally:
        torch.set_num_threads(prev)


def test_cpu_positions_beyond_int32_take_torch(cpu_route):
    """Positions past the kernel's int32 run through torch's route, with the same result."""
    q, k, v, kw = make_case(91, mode="per_token", Tl=20, Tr=30, causal=True, positions="interleaved")
    kw["q_pos"], kw["kv_pos"] = kw["q_pos"] + 2 ** 33, kw["kv_pos"] + 2 ** 33
    out, lse = mixed_attention(q, k, v, return_lse=True, **kw)
    check(out, lse, *reference(q, k, v, **kw))


def test_queries_of_a_huge_token_stride_are_read_safely(cpu_route):
    """A query view whose token stride times 15 overflows int32 (the C++ kernel gathers 16 queries with int32
    offsets; it segfaulted): the host copies q first, and the kernel itself refuses such a stride. The storage is
    virtual (torch.empty); only the 16 rows used are written."""
    import astra_kernels.attention as A
    from astra_kernels import attention_local

    Tl, Dh = 16, 8
    sqt = 2 ** 31 // 15 + 1000
    try:
        store = torch.empty(15 * sqt + Dh)
    except RuntimeError as e:                               # a machine that refuses 8.6 GB of address space
        pytest.skip(f"cannot reserve {15 * sqt * 4 / 2 ** 30:.1f} GiB of virtual memory: {e}")
    g = seeded_generator(31)
    q = store.as_strided((1, 1, Tl, Dh), (0, 0, sqt, 1))
    q.copy_(random_inputs(1, 1, Tl, Dh, generator=g))
    k, v = random_inputs(1, 1, Tl, Dh, generator=g), random_inputs(1, 1, Tl, Dh, generator=g)
    out, lse = attention_local(q, k, v, return_lse=True)
    check(out, lse, *mixed_attention_reference(q.contiguous(), k, v))
    kernel = A._cpu_kernel()
    if cpu_route == "kernel":
        f = torch.empty(1)
        with pytest.raises(ValueError, match="query token stride exceeds MAX_QUERY_STRIDE"):
            kernel.attention_f32(q.data_ptr(), 0, 0, sqt, k.data_ptr(), 0, 0, Dh, v.data_ptr(), 0, 0, Dh, 0, 0, 0, 0,
                                 False, 1, 1, 1, Tl, Tl, Dh, 1.0, f.data_ptr(), 0, 0, Dh, f.data_ptr(), 1)


@pytest.mark.parametrize("dtype,grad", [(torch.float32, False), (torch.float32, True), (torch.float64, False)])
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_heads_with_a_strided_head_dim(dtype, grad, causal, cpu_route):
    """GQA (Hq = 4 over Hkv = 2) with a q whose head dim has stride 2: the torch flash route (float64, autograd, CPUs
    without AVX-512) stacked the G query heads of a kv head without making the head dim contiguous, and the kernel
    read the view as dense rows (error ~1.7)."""
    g = seeded_generator(1701)
    q = random_inputs(2, 4, 6, 32, dtype=dtype, generator=g)[..., ::2]
    k, v = (random_inputs(2, 2, 6, 16, dtype=dtype, generator=g) for _ in range(2))
    assert q.stride(-1) == 2
    if grad:
        q.requires_grad_(True)
    with torch.set_grad_enabled(grad):
        out, lse = mixed_attention(q, k, v, causal=causal, return_lse=True)
    ref = mixed_attention_reference(q.detach(), k, v, causal=causal)
    check(out.detach(), lse, *ref, dtype=dtype)
    dense, _ = mixed_attention(q.detach().contiguous(), k, v, causal=causal, return_lse=True)
    assert_matches_reference(out.detach(), dense.double(), rtol=1e-6, atol=1e-6, name="strided q vs contiguous q")


@pytest.mark.parametrize("case", ["scale", "scores", "scores-remote", "scores-float64"])
@pytest.mark.parametrize("validate", [True, False])
def test_scores_that_overflow_raise_instead_of_reading_as_no_key(case, validate, cpu_route):
    """Scaled scores beyond the compute dtype (finite inputs): the C++ kernel's exp turned their NaN into 0, and a
    sum of 0 is its empty-row marker (out = 0, lse = -inf); torch's flash kernel without a mask gave out = 0,
    lse = 0. Either is a wrong answer no caller can tell from a real one: a ValueError on the CPU path (the check
    is one reduction over the [B, H, T] lse, done with validate=False too: it needs no device sync there)."""
    g = seeded_generator(1702)
    dtype = torch.float64 if case == "scores-float64" else torch.float32
    big = {"scale": 1.0, "scores": 1e20, "scores-remote": 1.0, "scores-float64": 1e160}[case]
    q, k, v = (random_inputs(1, 2, 70, 8, dtype=dtype, generator=g) for _ in range(3))
    q, k = q * big, k * big
    kw = dict(scale=1e38 if case == "scale" else None, validate=validate)
    if case == "scores-remote":             # the local scores are fine, the non-local ones overflow (then merged)
        q = q * 1e20
        kw.update(k_hat=k * 1e20, v_hat=v)
    with pytest.raises(ValueError, match="attention scores overflow"):
        mixed_attention(q, k, v, **kw)
    # large scores that stay finite are no error, and a row that sees no key keeps its marker
    m = torch.ones(1, 70, dtype=torch.bool)
    m[:, :3] = False
    out, lse = mixed_attention(q / big * 1e4, k / big * 1e4, v, local_mask=m, causal=True, return_lse=True)
    assert bool(torch.isneginf(lse[:, :, :3]).all()) and bool(torch.isfinite(lse[:, :, 3:]).all())
    assert bool((out[:, :, :3] == 0).all())


@pytest.mark.parametrize("where", ["q", "k", "k_hat", "k_table"])
def test_validate_false_names_a_non_finite_input_rather_than_an_overflow(where, cpu_route):
    """validate=False skips the finiteness checks before the work; a NaN input then surfaced as "attention scores
    overflow" (its NaN log-sum-exp). The error path now checks the inputs and names the one that holds it. (A NaN in a
    value alone leaves the scores finite: it reaches the output as NaN, which validate=False accepts.)"""
    g = seeded_generator(1703)
    q, k, v = (random_inputs(1, 2, 9, 8, generator=g) for _ in range(3))
    kw = dict(validate=False)
    if where == "k_hat":
        kw.update(k_hat=random_inputs(1, 2, 5, 8, generator=g), v_hat=random_inputs(1, 2, 5, 8, generator=g))
        kw["k_hat"][0, 1, 3, 2] = float("nan")
    elif where == "k_table":
        table = random_inputs(16, 2, 8, generator=g)
        kw.update(codes=random_ints(1, 5, low=0, high=16, generator=g), k_table=table.clone(), v_table=table)
        kw["k_table"][:, 0, 5] = float("nan")
    else:
        {"q": q, "k": k}[where][0, 1, 4, 3] = float("nan")
    with pytest.raises(ValueError, match=rf"^{where} contains non-finite values \(NaN or inf\)"):
        mixed_attention(q, k, v, **kw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_count_keys_refuse_nan_and_positive_infinite_log_counts(bad):
    """log_counts: log(count), or -inf for padding. NaN gave a finite wrong output, +inf the empty-row marker."""
    from astra_kernels import attention_segments

    q, _, _, _, segs, _ = mixed_segments(5)
    counts = segs[-1]
    lc = counts.log_counts.clone()
    lc[0, 0] = float("-inf")                                 # padding is fine
    attention_segments(q, [CountKeys(counts.codes, lc, counts.k_table, counts.v_table)])
    lc[-1, 0] = bad
    with pytest.raises(ValueError, match="log_counts contains NaN or \\+inf"):
        attention_segments(q, [CountKeys(counts.codes, lc, counts.k_table, counts.v_table)])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_values_whose_weighted_sum_overflows_raise(backend):
    """v near fp32's largest with spread weights: the exact output (their average) is finite, the accumulated sum is
    not, and the output came back inf with validate=True and no error."""
    if backend == "triton":
        pytest.importorskip("triton")
    g = seeded_generator(1704)
    q, k = (random_inputs(1, 2, 3, 8, generator=g) * 1e-3 for _ in range(2))
    v = torch.full((1, 2, 3, 8), 3e38)
    with pytest.raises(ValueError, match="attention output overflows torch.float32"):
        mixed_attention(q, k, v, backend=backend)
    out = mixed_attention(q, k, v / 4, backend=backend)           # the sum fits: no error, the average
    assert_matches_reference(out.double(), torch.full((1, 2, 3, 8), 7.5e37, dtype=torch.float64), rtol=1e-5,
                             atol=0, name="large values")


def test_build_group_tables_refuses_an_empty_codebook():
    g = seeded_generator(1705)
    w = random_inputs(8, 6, generator=g)
    with pytest.raises(ValueError, match=r"codebook dims must be >= 1, got shape \[3, 0, 2\]"):
        build_group_tables(torch.zeros(3, 0, 2), w, None, w, None, kv_heads=2)


def test_float64_runs_the_torch_path_on_every_backend():
    """The Triton kernel keeps fp32 loop state: a float64 tl.dot does not compile against it for a GPU (the
    interpreter ran it, its lse fp32-accurate: two merged passes 2e-7 off). float64 takes the torch path on every
    backend, so backend="triton" gives the torch path's float64 result to the bit."""
    pytest.importorskip("triton")
    g = seeded_generator(1706)
    q, k, v = (random_inputs(1, 2, 9, 16, dtype=torch.float64, generator=g) for _ in range(3))
    kh, vh = (random_inputs(1, 2, 7, 16, dtype=torch.float64, generator=g) for _ in range(2))
    a = mixed_attention(q, k, v, k_hat=kh, v_hat=vh, return_lse=True, backend="triton")
    b = mixed_attention(q, k, v, k_hat=kh, v_hat=vh, return_lse=True, backend="torch")
    assert a[0].dtype == a[1].dtype == torch.float64
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
