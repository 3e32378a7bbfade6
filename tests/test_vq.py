"""VQ encode / decode: every backend against the float64 brute-force reference (proof chain steps 1, 3).

Triton runs under the interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 when there
is no GPU), so its shapes are kept small; the CPU path is also checked on the benchmark shape family.
"""
import pytest
import torch

import astra_kernels as ak
from astra_kernels import testing as T
from astra_kernels import vq

BACKENDS = ["torch", "triton"]


def _need(backend):
    if backend == "triton" and not T.triton_runnable():
        pytest.skip("triton kernels need a GPU or TRITON_INTERPRET=1")


def _dev(backend):
    return T.kernel_device() if backend == "triton" else "cpu"


def _assert_codes_match(codes, x, cb, *, exact: bool, name="codes"):
    """Codes equal the float64 argmin; with exact=False a different code is accepted only when its
    float64 distance ties the minimum to within fp32 rounding of the distance computation."""
    ref = vq.vq_encode_reference(x.cpu(), cb.cpu())
    codes = codes.cpu()
    assert codes.dtype == torch.int32
    T.assert_no_poison(codes, name)
    if exact:
        T.assert_equal_ints(codes, ref, name)
        return
    ne = codes != ref
    if ne.any():
        d = vq.vq_distances_reference(x.cpu(), cb.cpu())                      # [..., G, K]
        dc = d.gather(-1, codes.long().unsqueeze(-1)).squeeze(-1)
        dr = d.gather(-1, ref.long().unsqueeze(-1)).squeeze(-1)
        G, K, DG = cb.shape
        scale = (x.cpu().double().reshape(*x.shape[:-1], G, DG).pow(2).sum(-1)
                 + cb.cpu().double().pow(2).sum(-1).amax(-1))
        gap = (dc - dr)[ne]
        tol = 1e-5 * scale[ne]
        assert bool((gap <= tol).all()), f"{int(ne.sum())} codes differ beyond ties: max gap {float(gap.max())}"
        assert int(ne.sum()) <= max(1, codes.numel() // 100), f"too many tie disagreements: {int(ne.sum())}"


CASES = [
    # (tokens, G, K, DG, dtype)  tokens deliberately not multiples of the block size (64)
    (37, 1, 100, 64, torch.float32),
    (70, 1, 129, 96, torch.float32),
    (45, 32, 40, 12, torch.float32),
    (29, 32, 33, 24, torch.float16),
    (66, 4, 1024, 24, torch.float32),
    (13, 2, 17, 5, torch.float32),
    (9, 1, 1, 16, torch.float32),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,G,K,DG,dtype", CASES)
def test_encode_matches_float64_reference(backend, n, G, K, DG, dtype):
    _need(backend)
    g = T.seeded_generator(1000 + n + G + K)
    dev = _dev(backend)
    x = T.random_inputs(n, G * DG, generator=g).to(dtype).to(dev)
    cb = T.random_inputs(G, K, DG, generator=g).to(dtype).to(dev)
    codes = ak.vq_encode(x, cb, backend=backend)
    assert codes.shape == (n, G) and codes.device.type == x.device.type
    _assert_codes_match(codes, x, cb, exact=(backend == "torch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_encode_d768_k1024_g1(backend):
    _need(backend)
    g = T.seeded_generator(7)
    n = 70 if backend == "triton" else 150
    x = T.random_inputs(n, 768, generator=g).to(_dev(backend))
    cb = T.random_inputs(1, 1024, 768, generator=g).to(_dev(backend))
    _assert_codes_match(ak.vq_encode(x, cb, backend=backend), x, cb, exact=(backend == "torch"))


@pytest.fixture(params=["bf16", "fp32", "fp32-tiers"])
def screen(request, monkeypatch):
    """Both screens of the CPU path, for large and small groups: bf16 (the large-group bf16 GEMM runs on any CPU,
    emulated where bf16 is not native; the bf16 small-group screen only where the CPU has AVX512-BF16, else
    the fp32 one stands in) and fp32 (the fp32 GEMM and the fp32 small-group scan: CPUs without native bf16).
    "fp32-tiers": the fp32 screens with every uncertified pair refined through the tiers of ``_refine_group``
    (``BATCHED_EXACT_ELEMS = 0``), which the small test inputs would otherwise send to the batched exact pass."""
    bf16 = request.param == "bf16"
    monkeypatch.setattr(vq, "LARGE_GROUP_BF16", bf16)
    monkeypatch.setattr(vq, "SMALL_GROUP_BF16", bf16 and vq.BF16_NATIVE)
    if request.param == "fp32-tiers":
        monkeypatch.setattr(vq, "BATCHED_EXACT_ELEMS", 0)
    return request.param


@pytest.mark.parametrize("backend", BACKENDS)
def test_encode_d768_g32_and_d384_g32(backend, screen):
    _need(backend)
    g = T.seeded_generator(8)
    n = 65 if backend == "triton" else 130
    K = 64 if backend == "triton" else 1024
    for D in (768, 384):
        x = T.random_inputs(n, D, generator=g).to(_dev(backend))
        cb = T.random_inputs(32, K, D // 32, generator=g).to(_dev(backend))
        _assert_codes_match(ak.vq_encode(x, cb, backend=backend), x, cb, exact=(backend == "torch"))


def test_encode_leading_dims_and_empty():
    g = T.seeded_generator(3)
    cb = T.random_inputs(2, 50, 8, generator=g)
    x = T.random_inputs(3, 5, 16, generator=g)
    c = ak.vq_encode(x, cb)
    assert c.shape == (3, 5, 2) and c.dtype == torch.int32
    T.assert_equal_ints(c, vq.vq_encode_reference(x, cb))
    e = ak.vq_encode(torch.empty(0, 16), cb)
    assert e.shape == (0, 2) and e.dtype == torch.int32


@pytest.mark.parametrize("D", [64, 256])   # 64: small-group screens; 256: bf16 GEMM screen
def test_cpu_path_exact_on_near_ties_and_duplicates(D, screen):
    """Adversarial data for the screens: duplicate codewords (exact ties -> lowest index), clusters
    of >16 codewords within the screening error (exact full fallback), points near codewords."""
    g = T.seeded_generator(11)
    K = 300
    cb = T.random_inputs(1, K, D, generator=g)
    cb[0, 10] = cb[0, 200]                                        # exact duplicate: ties go to 10
    cb[0, 50:90] = cb[0, 49] + 1e-4 * T.random_inputs(40, D, generator=g)   # tight cluster of 41
    cb[0, 120:124] = cb[0, 119] + 3e-3 * T.random_inputs(4, D, generator=g)  # small cluster
    centers = torch.cat([cb[0, [200, 10, 49, 60, 119, 121]], cb[0, torch.arange(0, K, 7)]])
    x = centers + 1e-3 * T.random_inputs(centers.shape, generator=g)
    x = torch.cat([x, T.random_inputs(50, D, generator=g)])
    codes = ak.vq_encode(x, cb, backend="torch")
    T.assert_equal_ints(codes, vq.vq_encode_reference(x, cb))
    assert codes[0, 0] == 10 and codes[1, 0] == 10


def test_cpu_path_large_magnitudes_and_float64(screen):
    g = T.seeded_generator(12)
    cb = T.random_inputs(2, 77, 20, generator=g, scale=1e6).double()
    x = T.random_inputs(40, 40, generator=g, scale=1e6).double()
    T.assert_equal_ints(ak.vq_encode(x, cb, backend="torch"), vq.vq_encode_reference(x, cb))
    # values whose bf16 products overflow fp32 accumulation: exact float64 fallback
    for DG in (8, 128):   # fp32 screen and bf16 screen
        cb2 = T.random_inputs(1, 20, DG, generator=g, scale=1e19)
        x2 = T.random_inputs(10, DG, generator=g, scale=1e19)
        T.assert_equal_ints(ak.vq_encode(x2, cb2, backend="torch"), vq.vq_encode_reference(x2, cb2))
    cb3 = T.random_inputs(2, 300, 128, generator=g, scale=1e3).double()
    x3 = T.random_inputs(50, 256, generator=g, scale=1e3).double()
    T.assert_equal_ints(ak.vq_encode(x3, cb3, backend="torch"), vq.vq_encode_reference(x3, cb3))


def test_triton_encode_writes_every_code_into_poisoned_output():
    _need("triton")
    from astra_kernels.triton import vq_kernels as K

    g = T.seeded_generator(5)
    dev = T.kernel_device()
    x = T.random_inputs(67, 3 * 24, generator=g).to(dev)
    cb = T.random_inputs(3, 70, 24, generator=g).to(dev)
    out = T.poisoned_empty(67, 3, dtype=torch.int32, device=dev)
    xk, cbk, cn = vq._triton_inputs(x, cb)
    K.vq_encode_triton(xk, cbk, cn, out=out)
    _assert_codes_match(out, x, cb, exact=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_matches_reference(backend, dtype):
    _need(backend)
    g = T.seeded_generator(21)
    dev = _dev(backend)
    G, K, DG = 4, 50, 24
    cb = T.random_inputs(G, K, DG, generator=g).to(dtype).to(dev)
    codes = T.random_ints(3, 37, G, low=0, high=K, generator=g, dtype=torch.int32).to(dev)
    out = ak.vq_decode(codes, cb, backend=backend)
    assert out.shape == (3, 37, G * DG) and out.dtype == dtype
    ref = cb.cpu().double()[torch.arange(G)[None, None, :], codes.cpu().long()].reshape(3, 37, G * DG)
    T.assert_matches_reference(out, ref, rtol=0, atol=0)


def test_triton_decode_poisoned_output():
    _need("triton")
    from astra_kernels.triton import vq_kernels as K

    g = T.seeded_generator(22)
    dev = T.kernel_device()
    cb = T.random_inputs(2, 9, 100, generator=g).to(dev)
    codes = T.random_ints(41, 2, low=0, high=9, generator=g, dtype=torch.int32).to(dev)
    out = T.poisoned_empty(41, 200, dtype=torch.float32, device=dev)
    K.vq_decode_triton(codes, cb, out=out)
    T.assert_matches_reference(out, vq.vq_decode_reference(codes.cpu(), cb.cpu().double()), rtol=0, atol=0)


def test_decode_of_encode_is_nearest_codeword():
    g = T.seeded_generator(23)
    cb = T.random_inputs(1, 64, 16, generator=g)
    x = T.random_inputs(30, 16, generator=g)
    xh = ak.vq_decode(ak.vq_encode(x, cb), cb)
    d = ((x[:, None, :].double() - cb[0][None].double()) ** 2).sum(-1).amin(-1)
    T.assert_matches_reference(((x.double() - xh.double()) ** 2).sum(-1), d, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("where", ["x", "codebook"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_raises(backend, where, bad):
    _need(backend)
    g = T.seeded_generator(30)
    x = T.random_inputs(10, 8, generator=g)
    cb = T.random_inputs(2, 5, 4, generator=g)
    (x if where == "x" else cb)[1, 2, ...] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        ak.vq_encode(x, cb, backend=backend)
    with pytest.raises(ValueError, match="NaN or inf"):
        ak.encode_and_pack(x, cb, backend=backend)


def test_codebook_mutation_is_rechecked():
    cb = torch.ones(1, 4, 2)
    x = torch.ones(3, 2)
    ak.vq_encode(x, cb)
    cb[0, 1, 1] = float("nan")  # in-place edit bumps the version counter: the cached check is redone
    with pytest.raises(ValueError, match="NaN or inf"):
        ak.vq_encode(x, cb)


def test_codebook_cache_never_serves_a_stale_codebook():
    """Per-codebook data is cached by tensor identity + version: a new codebook that reuses a freed
    one's memory, or an in-place edit, must not see the old entry."""
    g = T.seeded_generator(31)
    x = T.random_inputs(40, 256, generator=g)
    for _ in range(3):
        cb = T.random_inputs(1, 64, 256, generator=g)
        T.assert_equal_ints(ak.vq_encode(x, cb), vq.vq_encode_reference(x, cb))
        del cb
    cb = T.random_inputs(1, 64, 256, generator=g)
    ak.vq_encode(x, cb)
    cb.mul_(-1.0)
    T.assert_equal_ints(ak.vq_encode(x, cb), vq.vq_encode_reference(x, cb))
    cbg = cb.clone().requires_grad_(True)
    T.assert_equal_ints(ak.vq_encode(x, cbg), vq.vq_encode_reference(x, cb))


def test_shape_and_dtype_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="codebook must have shape"):
        ak.vq_encode(x, torch.randn(4, 8))
    with pytest.raises(ValueError, match="last dim"):
        ak.vq_encode(x, torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="x must be float"):
        ak.vq_encode(x.long(), torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="codebook must be float"):
        ak.vq_encode(x, torch.randint(0, 3, (1, 5, 8)))
    with pytest.raises(ValueError, match="at most 65536"):
        ak.vq_encode(torch.randn(2, 1), torch.randn(1, 65537, 1))
    with pytest.raises(ValueError, match="backend"):
        ak.vq_encode(x, torch.randn(1, 5, 8), backend="cuda")
    with pytest.raises(ValueError, match="torch.Tensor"):
        ak.vq_encode(x.numpy(), torch.randn(1, 5, 8))


def test_decode_errors():
    cb = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="out of range"):
        ak.vq_decode(torch.tensor([[0, 5]]), cb)
    with pytest.raises(ValueError, match="out of range"):
        ak.vq_decode(torch.tensor([[-1, 0]]), cb)
    with pytest.raises(ValueError, match=r"shape \[..., G=2\]"):
        ak.vq_decode(torch.tensor([[0, 1, 2]]), cb)
    with pytest.raises(ValueError, match="integer"):
        ak.vq_decode(torch.tensor([[0.0, 1.0]]), cb)


def test_decode_refuses_a_selected_non_finite_codeword():
    """A NaN / inf codeword the codes select is an error (vq_encode refuses such a codebook too); one the codes
    do not select does not change the answer and passes."""
    cb = T.random_inputs(2, 5, 3, generator=T.seeded_generator(41))
    codes = torch.tensor([[0, 1], [2, 3]])
    for bad in (float("nan"), float("inf")):
        poisoned = cb.clone()
        poisoned[1, 3, 2] = bad
        with pytest.raises(ValueError, match="non-finite"):
            ak.vq_decode(codes, poisoned)
        poisoned = cb.clone()
        poisoned[0, 4, 0] = bad            # group 0's codeword 4: not selected
        torch.testing.assert_close(ak.vq_decode(codes, poisoned), vq.vq_decode_reference(codes, cb), rtol=0, atol=0)


def test_max_k_65536_cpu():
    g = T.seeded_generator(40)
    cb = T.random_inputs(1, 65536, 4, generator=g)
    x = T.random_inputs(20, 4, generator=g)
    T.assert_equal_ints(ak.vq_encode(x, cb), vq.vq_encode_reference(x, cb))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_screen_scan_matches_torch_topk(dtype):
    """csrc/screen.cpp (the CPU screen's fused add + top-t + max|S| pass) against torch: values bit-equal
    to torch.add(cn, S, alpha).topk, ties to the lowest index, every tail length, overflowed rows."""
    g = T.seeded_generator(50)
    for rows, K in [(50, 1024), (7, 1000), (9, 17), (3, 5), (2, 64)]:
        S = T.random_inputs(rows, K, generator=g).to(dtype)
        S[0, : min(40, K)] = S[0, -1]                        # many ties
        S[1, 2] = S[1, K - 1] = S[1].max() + 1               # tied best (alpha < 0: largest S)
        cn = T.random_inputs(K, generator=g)
        for t in sorted({1, 2, 4, min(8, K)}):
            for c in (cn, None):
                vals = T.poisoned_empty(rows, t, dtype=torch.float32)
                idx = T.poisoned_empty(rows, t, dtype=torch.int64)
                smax = T.poisoned_empty(rows, dtype=torch.float32)
                vq._screen_topk(S, c, -2.0, vals, idx, smax)
                d = S.float() * -2.0 if c is None else torch.add(c, S.float(), alpha=-2.0)
                vr, _ = torch.topk(d, t, dim=-1, largest=False, sorted=True)
                assert torch.equal(vals, vr) and torch.equal(d.gather(-1, idx), vals)
                assert torch.equal(smax, S.float().abs().amax(-1))
                # ties to the lowest index: the chosen indices are the first ones holding those values
                for r in range(rows):
                    for j in range(t):
                        first = int((d[r] == vals[r, j]).nonzero()[0])
                        assert int(idx[r, j]) >= first
                if c is None:  # tied best of -2 S: the lower index first
                    assert int(idx[1, 0]) == 2 and (t == 1 or int(idx[1, 1]) == K - 1)
    S = torch.tensor([[1.0, float("inf"), 2.0], [float("inf")] * 3])       # fp32 overflow rows
    vals, idx = torch.empty(2, 2), torch.empty(2, 2, dtype=torch.int64)
    vq._screen_topk(S, None, 1.0, vals, idx)
    assert vals[0].tolist() == [1.0, 2.0] and idx[0].tolist() == [0, 2]
    assert torch.isinf(vals[1]).all() and bool((idx[1] >= 0).all())


def test_fused_small_group_scan_matches_torch():
    """csrc/screen.cpp's small-group scan (no score matrix) against torch: the t smallest of
    -2 ([x, 1] @ caug) per token and group (fp32, any summation order: within 1e-5), indices that hold
    those values, K not a multiple of 16 (padding), rows not a multiple of the tile, duplicated codewords."""
    g = T.seeded_generator(51)
    for n, G, K, DG in [(101, 3, 1000, 24), (5, 2, 17, 7), (50, 1, 64, 48), (49, 4, 3, 5)]:
        cb = T.random_inputs(G, K, DG, generator=g)
        cb[:, K // 2] = cb[:, 0]                                        # tied codewords
        p = vq._prep(cb)
        x = (T.random_inputs(n, G * DG, generator=g) - p.mu_flat).contiguous()
        xa = torch.cat([x.reshape(n, G, DG).transpose(0, 1), torch.ones(G, n, 1)], -1)
        d = -2.0 * torch.bmm(xa.double(), p.caug.double())           # [G, n, K]
        for t in sorted({1, 2, min(8, K)}):
            vals = T.poisoned_empty(G, n + 3, t, dtype=torch.float32)
            idx = T.poisoned_empty(G, n + 3, t, dtype=torch.int64)
            vq._small_group_topk(x, p, vals, idx, start=2)
            vr = torch.topk(d, t, dim=-1, largest=False, sorted=True).values
            v, i = vals[:, 2:n + 2], idx[:, 2:n + 2]
            tol = 1e-5 * (1 + d.abs().amax())
            assert bool((i >= 0).all() and (i < K).all())
            assert (v.double() - vr).abs().max() <= tol
            assert (d.gather(-1, i) - v.double()).abs().max() <= tol
            assert bool((v[..., 1:] >= v[..., :-1]).all())
            assert torch.equal(vals[:, :2].view(torch.int32), T.poisoned_empty(G, 2, t).view(torch.int32))
        T.assert_equal_ints(ak.vq_encode(x + p.mu_flat, cb), vq.vq_encode_reference(x + p.mu_flat, cb))


def test_bf16_screen_only_from_its_smallest_group_dim(monkeypatch):
    """Groups narrower than vq.BF16_SCREEN_MIN_GROUP_DIM (2-dim groups of 1024 codewords overflow the bf16
    window) take the fp32 scan; wider ones the bf16 screen; codes exact either way."""
    calls = []
    real = vq._small_group_bf16_top2
    monkeypatch.setattr(vq, "SMALL_GROUP_BF16", True)

    def spy(x32, p, *args, **kwargs):
        calls.append(p.cb32.shape[-1])
        return real(x32, p, *args, **kwargs)

    monkeypatch.setattr(vq, "_small_group_bf16_top2", spy)
    g = T.seeded_generator(61)
    for DG in (vq.BF16_SCREEN_MIN_GROUP_DIM - 2, vq.BF16_SCREEN_MIN_GROUP_DIM - 1):
        cb = T.random_inputs(8, 1024, DG, generator=g)
        x = T.random_inputs(200, 8 * DG, generator=g)
        T.assert_equal_ints(ak.vq_encode(x, cb), vq.vq_encode_reference(x, cb))
    assert calls == []
    if vq._vq_screen.small_group_bf16_available():
        cb = T.random_inputs(8, 256, vq.BF16_SCREEN_MIN_GROUP_DIM, generator=g)
        x = T.random_inputs(200, 8 * vq.BF16_SCREEN_MIN_GROUP_DIM, generator=g)
        T.assert_equal_ints(ak.vq_encode(x, cb), vq.vq_encode_reference(x, cb))
        assert calls and set(calls) == {vq.BF16_SCREEN_MIN_GROUP_DIM}


@pytest.mark.skipif(not vq.SMALL_GROUP_BF16, reason="the bf16 small-group screen needs AVX512-BF16")
def test_bf16_small_group_screen_decides_only_what_it_proves():
    """csrc/screen.cpp's bf16 small-group screen: every (token, group) it decides alone (one candidate in
    its window) is the float64 argmin; the two values it returns are fp32 distances of the codes it names;
    on random data it decides most pairs alone and leaves almost none undecided (a window that degenerated
    to "everything" or "nothing" fails); rows outside [start, start + n) are never written. Odd DG
    (a zero-padded last pair), K not a multiple of 16, duplicated codewords, float64 inputs."""
    g = T.seeded_generator(52)
    for n, G, K, DG, dtype in [(301, 4, 1000, 24, torch.float32), (97, 3, 100, 23, torch.float32),
                               (50, 2, 17, 12, torch.float64), (64, 2, 300, 7, torch.float32)]:
        cb = T.random_inputs(G, K, DG, generator=g)
        cb[:, K // 2] = cb[:, 0]                                        # an exact tie: two candidates
        x = T.random_inputs(n, G * DG, generator=g, dtype=dtype)
        x[:5] = cb[:, 0].reshape(-1).to(dtype) + 1e-3                  # tokens at the tied codeword
        p = vq._prep(cb)
        xc = x - p.mu_flat.to(dtype)
        x32 = xc.to(torch.float32).contiguous()
        nres = None
        if dtype == torch.float64:
            nres = (xc - x32.double()).reshape(n, G, DG).norm(dim=-1).T.float().mul(1.01).contiguous()
        vals = T.poisoned_empty(G, n + 3, 2, dtype=torch.float32)
        idx = T.poisoned_empty(G, n + 3, 2, dtype=torch.int64)
        vq._small_group_bf16_top2(x32, p, vals, idx, start=2, nres=nres)
        assert torch.equal(vals[:, :2].view(torch.int32), T.poisoned_empty(G, 2, 2).view(torch.int32))
        v, i = vals[:, 2:n + 2], idx[:, 2:n + 2]
        ref = vq.vq_encode_reference(x, cb).T.long()                    # [G, n]
        d = vq.vq_distances_reference(x32.double() + p.mu_flat.double(), cb).transpose(0, 1)   # [G, n, K]
        undecided, single = torch.isinf(v[..., 0]), torch.isinf(v[..., 1]) & ~torch.isinf(v[..., 0])
        assert bool((i >= 0).all() and (i < K).all())
        assert torch.equal(i[..., 0][single], ref[single])
        assert not bool(single[:, :5].any()), "a tied pair was decided alone"
        two = ~undecided & ~single
        # centered ||c||^2 - 2 x.c
        dn = d - x32.double().reshape(n, G, DG).transpose(0, 1).pow(2).sum(-1, keepdim=True)
        tol = 1e-5 * (1 + dn.abs().amax())
        assert (dn.gather(-1, i)[two] - v[two].double()).abs().max() <= tol
        assert bool((v[..., 1][two] >= v[..., 0][two]).all())
        assert float(undecided.float().mean()) < 0.01 and float(single.float().mean()) > 0.4, (n, G, K, DG)


@pytest.mark.parametrize("env,isa", [({"ASTRA_NO_AVX512": "1"}, "avx2"),
                                     ({"ASTRA_NO_AVX512": "1", "ASTRA_NO_AVX2": "1"}, "scalar")])
def test_narrower_screen_fallbacks_are_exact(env, isa):
    """The C++ scans' AVX2 and scalar fallbacks (forced in a fresh process by ASTRA_NO_AVX512 / ASTRA_NO_AVX2:
    CPUs without AVX-512, or without AVX2, take them): codes equal to the float64 argmin for the large-group
    screens and the fused small-group one, with fp32 and float64 inputs."""
    import os
    import subprocess
    import sys

    if isa == "avx2" and vq.CPU_ISA == "scalar":
        pytest.skip("this CPU has no AVX2 + FMA: the AVX2 scans cannot run here")
    code = ("import torch, astra_kernels as ak\n"
            "from astra_kernels import vq\n"
            "print(vq.CPU_ISA, vq.BF16_NATIVE)\n"
            "g = torch.Generator().manual_seed(5)\n"
            "cases = [(203, 4, 100, 24), (70, 1, 300, 256), (9, 2, 5, 3), (61, 32, 1024, 12), (40, 2, 37, 7)]\n"
            "for n, G, K, DG in cases:\n"
            "    x, cb = torch.randn(n, G * DG, generator=g), torch.randn(G, K, DG, generator=g)\n"
            "    cb[:, K // 2] = cb[:, 1]\n"
            "    for dt in (torch.float32, torch.float64):\n"
            "        xd, cd = x.to(dt), cb.to(dt)\n"
            "        assert torch.equal(ak.vq_encode(xd, cd), vq.vq_encode_reference(xd, cd)), (n, G, K, DG, dt)\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [isa, "False", "ok"], r.stdout


@pytest.mark.parametrize("D", [32, 256])
def test_cpu_path_exact_when_most_of_the_codebook_is_within_the_screening_error(D, screen):
    """250 of 300 codewords within ~1e-4 of each other: the 3 / 16 / 128-candidate tiers cannot prove
    the argmin, the full-codebook tier (and float64 for the near-ties) must."""
    g = T.seeded_generator(60 + D)
    cb = T.random_inputs(1, 300, D, generator=g)
    cb[0, 50:] = cb[0, 49] + 1e-4 * T.random_inputs(250, D, generator=g)
    x = cb[0, 40:80] + 1e-5 * T.random_inputs(40, D, generator=g)
    T.assert_equal_ints(ak.vq_encode(x, cb, backend="torch"), vq.vq_encode_reference(x, cb))


@pytest.mark.parametrize("D", [32, 256])
def test_cpu_path_centering_on_offset_data(D, monkeypatch):
    """Hidden states with large common offsets (outlier dims): exact codes, and the certificate still
    certifies a good share of the tokens because the screen works relative to the mean codeword
    (without centering every token went to the expensive refinement)."""
    g = T.seeded_generator(70 + D)
    off = torch.zeros(D)
    off[:4] = torch.tensor([60.0, -40.0, 30.0, 25.0])
    off += 2.0
    n = 400
    x = T.random_inputs(n, D, generator=g) + off
    cb = T.random_inputs(1, 256, D, generator=g) * 0.7 + off
    refined = []
    orig = vq._refine_group

    def spy(*a, **k):
        refined.append(a[0].shape[0])
        return orig(*a, **k)

    monkeypatch.setattr(vq, "_refine_group", spy)
    monkeypatch.setattr(vq, "BATCHED_EXACT_ELEMS", 0)       # every uncertified token through _refine_group
    T.assert_equal_ints(ak.vq_encode(x, cb, backend="torch"), vq.vq_encode_reference(x, cb))
    assert sum(refined) < 0.9 * n, sum(refined)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("offset", ["one dim", "every dim"])
def test_triton_encode_centres_offset_data(dtype, offset):
    """A large offset common to the inputs and the codebook (+3000 in one dim of each group, or +1000 in all): the
    Triton kernel's fp32 ``||c||^2 - 2 x.c`` cancelled (~20 % of the codes not the nearest) until the host centred
    both on the mean codeword, as the CPU path does. Exact codes, and the fused frame equals the reference's."""
    _need("triton")
    g = T.seeded_generator(90 + len(offset))
    dev = T.kernel_device()
    G, K, DG, n = 2, 64, 32, 70
    off = torch.zeros(G, DG)
    if offset == "one dim":
        off[:, 0] = 3000.0
    else:
        off += 1000.0
    x = (T.random_inputs(n, G, DG, generator=g) + off).reshape(n, G * DG).to(dtype)
    cb = (T.random_inputs(G, K, DG, generator=g) + off[:, None, :]).to(dtype)
    ref = vq.vq_encode_reference(x, cb)
    T.assert_equal_ints(ak.vq_encode(x.to(dev), cb.to(dev), backend="triton").cpu(), ref, "codes")
    frame = ak.encode_and_pack(x.to(dev), cb.to(dev), backend="triton").cpu()
    T.assert_equal_ints(frame, ak.pack_codes(ref, vq.default_bits(K)), "frame")


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e19), (torch.float32, 1e-30), (torch.float64, 1e25),
                                         (torch.float64, 1e-30)])
def test_triton_encode_scales_extreme_magnitudes(dtype, scale):
    """Inputs near 1e19 / 1e25 (fp32 / float64) or 1e-30: the kernel's fp32 ||c||^2 and x.c overflowed or
    underflowed and every token got code 0 (the CPU path was exact). The host now scales both by one power of two.
    Tokens within 5 % of a codeword, so the nearest is unambiguous."""
    _need("triton")
    g = T.seeded_generator(97)
    dev = T.kernel_device()
    G, K, DG, n = 2, 32, 8, 60
    cb = T.random_inputs(G, K, DG, generator=g).to(torch.float64)
    pick = torch.randint(0, K, (n, G), generator=g)
    x = cb[torch.arange(G), pick] * (1 + 0.05 * T.random_inputs(n, G, DG, generator=g).to(torch.float64))
    x, cb = (x.reshape(n, G * DG) * scale).to(dtype), (cb * scale).to(dtype)
    ref = vq.vq_encode_reference(x, cb)
    assert len(set(ref.flatten().tolist())) > 10            # not all one code
    T.assert_equal_ints(ak.vq_encode(x.to(dev), cb.to(dev), backend="triton").cpu(), ref, "codes")
    T.assert_equal_ints(ak.vq_encode(x, cb, backend="torch"), ref, "codes (CPU path)")
    frame = ak.encode_and_pack(x.to(dev), cb.to(dev), backend="triton").cpu()
    T.assert_equal_ints(frame, ak.pack_codes(ref, vq.default_bits(K)), "frame")


def test_triton_encode_of_fp32_values_near_their_largest():
    """fp32 inputs within fp32's range whose centred values x - mu are not (|x| ~ 3e38 against a mean of the other
    sign): x - mu overflowed to inf in fp32 and the scale made it NaN, so every token got code 0 on Triton (the CPU
    path was exact). Centred in float64 now."""
    _need("triton")
    g = T.seeded_generator(98)
    dev = T.kernel_device()
    cb = (torch.rand(1, 16, 128, generator=g) * 2 - 1) * 3e38
    x = (torch.rand(50, 128, generator=g) * 2 - 1) * 3e38
    ref = vq.vq_encode_reference(x, cb)
    assert len(set(ref.flatten().tolist())) > 5
    T.assert_equal_ints(ak.vq_encode(x, cb, backend="torch"), ref, "codes (CPU path)")
    T.assert_equal_ints(ak.vq_encode(x.to(dev), cb.to(dev), backend="triton").cpu(), ref, "codes")
    T.assert_equal_ints(ak.encode_and_pack(x.to(dev), cb.to(dev), backend="triton").cpu(),
                        ak.pack_codes(ref, vq.default_bits(16)), "frame")


def test_float64_inputs_too_small_to_square_are_refused():
    """float64 x and codebook at ~1e-181: their squared distances underflowed to 0 and every token got code 0 on
    the CPU path and in the reference (Triton scales, and was right). Refused by name below 2**-480; zeros, and
    tiny values beside normal ones, are taken."""
    g = T.seeded_generator(99)
    s = 2.0 ** -600
    cb = torch.randn(1, 16, 8, dtype=torch.float64, generator=g)
    x = torch.randn(40, 8, dtype=torch.float64, generator=g)
    for backend in ("torch", "auto"):
        with pytest.raises(ValueError, match="below 2\\*\\*-480 .* whose squared distances underflow"):
            ak.vq_encode(x * s, cb * s, backend=backend)
    with pytest.raises(ValueError, match="whose squared distances underflow"):
        vq.vq_encode_reference(x * s, cb * s)
    assert torch.equal(ak.vq_encode(x * s, cb), vq.vq_encode_reference(x * s, cb))          # tiny x, normal codebook
    assert not ak.vq_encode(torch.zeros_like(x), torch.zeros_like(cb)).any()
    assert vq.F64_ENCODE_FLOOR == 2.0 ** -480
    for dtype in (torch.float32, torch.float16):     # an all-zero x of another dtype beside such a codebook: was code 0
        for backend in ("torch", "auto"):
            with pytest.raises(ValueError, match="below 2\\*\\*-480"):
                ak.vq_encode(torch.zeros(3, 8, dtype=dtype), cb * s, backend=backend)
    assert torch.equal(ak.vq_encode(x.float(), cb * s), vq.vq_encode_reference(x.float(), cb * s))   # fp32 x: taken


def test_float64_beyond_the_encoders_range_is_refused():
    """float64 inputs beyond ~1e154 got code 0 on every path, the reference too (squared distances overflowed);
    beyond fp32's range the centred frame's fp32 mean did. Refused by name beyond 2**120."""
    cb = torch.randn(1, 33, 10, dtype=torch.float64, generator=T.seeded_generator(3)) * 1e200
    for backend in ("torch", "auto"):
        with pytest.raises(ValueError, match="codebook holds float64 values beyond 2\\*\\*120"):
            ak.vq_encode(cb[0, :4], cb, backend=backend)
    with pytest.raises(ValueError, match="x holds float64 values beyond"):
        vq.vq_encode_reference(cb[0, :4], cb / 1e180)
    assert vq.F64_ENCODE_LIMIT == 2.0 ** 120


def test_few_uncertified_pairs_are_decided_in_one_batched_exact_pass(monkeypatch):
    """2-dim groups with near-tied codewords: the uncertified (token, group) pairs, spread over many groups,
    are decided by one batched float64 pass (no per-group tiers), and the codes are the reference's."""
    g = T.seeded_generator(81)
    G, K, DG = 16, 256, 2
    cb = T.random_inputs(G, K, DG, generator=g)
    cb[:, 1::2] = cb[:, 0::2] + 1e-6 * T.random_inputs(G, K // 2, DG, generator=g)     # near-tied pairs
    x = cb[:, :40].transpose(0, 1).reshape(40, G * DG) + 1e-3 * T.random_inputs(40, G * DG, generator=g)
    batched, tiered = [], []
    orig_pairs, orig_group = vq._exact_pairs, vq._refine_group
    monkeypatch.setattr(vq, "_exact_pairs", lambda *a: batched.append(a[3].shape[0]) or orig_pairs(*a))
    monkeypatch.setattr(vq, "_refine_group", lambda *a, **k: tiered.append(1) or orig_group(*a, **k))
    T.assert_equal_ints(ak.vq_encode(x, cb, backend="torch"), vq.vq_encode_reference(x, cb))
    assert len(batched) == 1 and batched[0] > G and not tiered, (batched, tiered)


def test_a_codebooks_preparation_dies_with_it():
    """Entries of dropped codebooks stayed until 128 had piled up (~1 GiB at D = 768: every simulate of a bf16 model
    casts its codebooks anew, so each call left one dead entry per layer)."""
    import gc

    g = torch.Generator().manual_seed(12)
    x = torch.randn(40, 48, generator=g)
    cbs = [torch.randn(4, 64, 12, generator=g) for _ in range(3)]
    for cb in cbs:
        ak.vq_encode(x, cb, backend="torch")
    assert all(vq._prep_cache.get(cb) is not None for cb in cbs)
    dropped = [id(cb) for cb in cbs[1:]]
    del cb, cbs[1:]
    gc.collect()
    assert vq._prep_cache.get(cbs[0]) is not None and not set(dropped) & set(vq._prep_cache.d)
    assert all(e[0]() is not None for e in vq._prep_cache.d.values())


def test_inference_mode_tensors_are_encoded_and_cached_by_content():
    """Tensors made under torch.inference_mode have no version counter: the cache checks their contents,
    so an in-place edit never hits a stale entry (and encoding them does not crash)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(40, 48, generator=g)
    with torch.inference_mode():
        cb = torch.randn(2, 64, 24, generator=g)
        codes = ak.vq_encode(x, cb, backend="torch")
        assert torch.equal(codes, ak.vq_encode_reference(x, cb))
        assert vq._prep_cache.get(cb) is not None                      # cached despite no version counter
        cb.mul_(-1.0)  # in-place edit of an inference tensor: must not hit a cached entry
        assert vq._prep_cache.get(cb) is None
        assert torch.equal(ak.vq_encode(x, cb, backend="torch"), ak.vq_encode_reference(x, cb))
        cb[1, 5, 3] += 0.25                                           # a single element changed
        assert torch.equal(ak.vq_encode(x, cb, backend="torch"), ak.vq_encode_reference(x, cb))


@pytest.mark.parametrize("edit", ["data", "numpy", "nan"])
def test_edits_that_bypass_the_version_counter_never_hit_a_stale_preparation(edit):
    """An EMA-style update through ``.data``, or a write to the numpy array a codebook shares memory with, leaves
    the version counter as it was: the cached preparation must still not be used (it gave wrong codes for 396 of
    400), and a NaN written that way must still be refused."""
    g = torch.Generator().manual_seed(12)
    arr = torch.randn(2, 64, 4, generator=g).numpy()
    cb = torch.from_numpy(arr) if edit == "numpy" else torch.from_numpy(arr.copy())
    x = torch.randn(200, 8, generator=g)
    assert torch.equal(ak.vq_encode(x, cb, backend="torch"), ak.vq_encode_reference(x, cb))
    version = cb._version
    new = torch.randn(2, 64, 4, generator=g)
    if edit == "numpy":
        arr[...] = new.numpy()
    else:
        cb.data.copy_(new)
    if edit == "nan":
        cb.data[0, 0, 0] = float("nan")
    assert cb._version == version                                      # the edit bypassed the counter
    if edit == "nan":
        with pytest.raises(ValueError, match="codebook contains non-finite"):
            ak.vq_encode(x, cb, backend="torch")
        return
    assert torch.equal(ak.vq_encode(x, cb, backend="torch"), ak.vq_encode_reference(x, cb))


def test_codebook_preparation_is_kept_for_every_layer_of_a_deep_model():
    """A forward encodes with one codebook per layer in turn: each preparation must survive a full cycle through
    the layers (with room for 8 only, a 12-layer model re-prepared every codebook on every layer)."""
    g = torch.Generator().manual_seed(3)
    cbs = [torch.randn(1, 16, 8, generator=g) for _ in range(24)]
    x = torch.randn(5, 8, generator=g)
    first = []
    for c in cbs:
        ak.vq_encode(x, c)
        first.append(vq._prep(c))
    for c, p in zip(cbs, first):
        ak.vq_encode(x, c)
        assert vq._prep(c) is p


def test_the_interpreter_refuses_bfloat16():
    """Triton's interpreter has no bfloat16: on CPU tensors it returned garbage codes (and attention outputs of
    ~8e8) without an error; the dispatch now refuses before any kernel runs. (On CUDA, bf16 is a supported dtype.)"""
    if not T.triton_runnable() or T.kernel_device() != "cpu":
        pytest.skip("needs Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest)")
    g = torch.Generator().manual_seed(13)
    cb, x = torch.randn(1, 8, 4, generator=g).bfloat16(), torch.randn(5, 4, generator=g).bfloat16()
    q = torch.randn(1, 1, 2, 4, generator=g).bfloat16()
    codes = torch.zeros(5, 1, dtype=torch.int32)
    for call in (lambda: ak.vq_encode(x, cb, backend="triton"), lambda: ak.vq_decode(codes, cb, backend="triton"),
                 lambda: ak.attention_local(q, q, q, backend="triton")):
        with pytest.raises(ValueError, match="interpreter has no bfloat16"):
            call()
    assert torch.equal(ak.vq_encode(x, cb), ak.vq_encode_reference(x, cb))      # the CPU path takes bf16


@pytest.mark.parametrize("batched", [True, False])
def test_exact_midpoint_ties_go_to_the_lowest_index(batched, monkeypatch):
    """A point exactly halfway between two distinct codewords is an exact float64 tie: the lowest index wins on every
    refinement path (the tiered per-group one took the candidates unsorted, and 4 of 200 such ties went to the higher
    index)."""
    if not batched:
        monkeypatch.setattr(vq, "BATCHED_EXACT_ELEMS", 0)    # uncertified pairs through the per-group tiers
    g = T.seeded_generator(13)
    wrong = 0
    for _ in range(200):
        cb = (torch.randn(1, 16, 1, generator=g) * 3).float()
        i, j = sorted(torch.randperm(16, generator=g)[:2].tolist())
        x = ((cb[0, i] + cb[0, j]) / 2).reshape(1, 1)
        ref = vq.vq_encode_reference(x, cb)
        wrong += int(not torch.equal(ak.vq_encode(x, cb, backend="torch"), ref))
    assert wrong == 0


def test_meta_tensors_and_shapes_no_frame_holds_are_refused_before_any_work():
    """Meta tensors failed inside torch (``item() cannot be called on meta tensors``); a shape no frame can hold
    was encoded first, and failed allocating ~400 GB before the frame's own check named it."""
    cb = T.random_inputs(1, 8, 24, generator=T.seeded_generator(5))
    for call in (lambda: ak.vq_encode(torch.ones(2, 24, device="meta"), cb.to("meta")),
                 lambda: ak.vq_decode(torch.zeros(2, 1, dtype=torch.int32, device="meta"), cb.to("meta"))):
        with pytest.raises(ValueError, match="tensors holding data, got a meta tensor"):
            call()
    with pytest.raises(ValueError, match="dimension 0 of size 4294967296 does not fit the frame format"):
        ak.encode_and_pack(torch.ones(1, 24).expand(2 ** 32, 24), cb)


def test_codes_of_a_dtype_decode_does_not_take_name_the_ones_it_does():
    """uint64 codes were refused as "must be an integer tensor", which they are."""
    cb = T.random_inputs(1, 4, 8, generator=T.seeded_generator(6))
    with pytest.raises(ValueError, match="codes must be an integer tensor of one of the dtypes uint8, .*int64.*, "
                                         "got torch.uint64"):
        ak.vq_decode(torch.zeros(2, 1, dtype=torch.uint64), cb)


def test_threads_sharing_a_new_codebook_get_exact_codes(monkeypatch):
    """The packed codebook of the fused small-group scan was built lazily without a lock and handed to C++ (which
    releases the GIL) by pointer only: a second thread's build freed the first while the scan read it, and ~1 in 300
    calls of 4 threads returned wrong codes. Built once under a lock, and held while the scan runs (checked here
    by replacing the attribute during the call, as a concurrent build did)."""
    import gc
    import threading
    import weakref

    g = T.seeded_generator(100)
    cb, x = torch.randn(4, 64, 8, generator=g), torch.randn(32, 32, generator=g)
    p = vq._prep(cb)
    real, seen = vq._vq_screen, {}

    class Replacing:
        def __getattr__(self, name):
            return getattr(real, name)

        def small_group_topk(self, *args):
            ref = weakref.ref(p._cbp)
            p._cbp = None
            gc.collect()
            seen["alive"] = ref() is not None
            if seen["alive"]:
                real.small_group_topk(*args)

    monkeypatch.setattr(vq, "_vq_screen", Replacing())
    vq._small_group_topk(vq._center(x, p.mu_flat).contiguous(), p, torch.empty(4, 32, 2),
                         torch.empty(4, 32, 2, dtype=torch.int64))
    assert seen["alive"], "the packed codebook handed to C++ by pointer was freed during the scan"
    monkeypatch.undo()
    wrong = []

    def encode(cb, x, ref):
        got = ak.vq_encode(x, cb, backend="torch")
        if not torch.equal(got, ref):
            wrong.append(1)

    for _ in range(20):          # a new codebook each round: its first encodes build the packed forms
        cb = torch.randn(8, 1024, 4, generator=g)
        x = torch.randn(64, 32, generator=g)
        ref = vq.vq_encode_reference(x, cb)
        threads = [threading.Thread(target=encode, args=(cb, x, ref)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not wrong


def test_default_bits_is_the_code_width_of_k_codewords():
    """ceil(log2 K), at least 1 (mutation audit: K instead of K - 1 gave 11 bits for K = 1024, caught only by a test
    of another module)."""
    widths = {1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 1023: 10, 1024: 10, 1025: 11, 65535: 16, 65536: 16}
    assert {K: ak.default_bits(K) for K in widths} == widths
    for bad in (0, 65537, 2.0, True):
        with pytest.raises(ValueError, match="K .codebook entries. must be an int in 1..65536"):
            ak.default_bits(bad)


@pytest.mark.parametrize("G, DG", [(4, 6), (2, 24), (1, 160)])
def test_codebooks_that_repeat_codewords_encode_exactly(G, DG):
    """k-means on fewer vectors than codewords re-seeds empty clusters with data points, so codewords repeat exactly;
    the CPU path encodes such a codebook through its distinct codewords (copies left every token near one to the
    exact search, ~10x slower). Codes equal the float64 reference's, ties to the lowest code, with tokens on a
    repeated codeword, near one, and a group that repeats none."""
    g = T.seeded_generator(131)
    K = 64
    base = torch.randn(G, 12, DG, generator=g)
    pick = torch.randint(0, 12, (G, K), generator=g)
    pick[:, 5], pick[:, 40] = 3, 3                          # code 5 is the first copy of base[3], code 40 a later one
    cb = base.gather(1, pick[..., None].expand(G, K, DG)).contiguous()
    if G > 1:
        cb[1] = torch.randn(K, DG, generator=g)            # a group with no repeated codeword
    on = cb.transpose(0, 1)[torch.randint(0, K, (30,), generator=g)].reshape(30, G * DG)
    near = on + 1e-3 * torch.randn(30, G * DG, generator=g)
    x = torch.cat([on, near, torch.randn(40, G * DG, generator=g)])
    ref = vq.vq_encode_reference(x, cb)
    T.assert_equal_ints(ak.vq_encode(x, cb, backend="torch"), ref, "codes")
    assert not bool((ref[:, 0] == 40).any())               # a later copy never wins its tie
    T.assert_equal_ints(ak.vq_encode(x, cb.double(), backend="torch"), vq.vq_encode_reference(x, cb.double()),
                        "codes (float64)")
