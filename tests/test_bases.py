"""The bases codebooks quantize in (astra.bases; astra.Codebooks(transforms=..., inverses=...),
astra.calibrate(basis=...)): the PCA rotation, the attention metric against a direct computation of the attention
error, the quantizer's semantics (encode h @ T, decode y_hat @ T^-1) in every runtime, persistence, validation."""
import pytest
import torch
from test_runtime_support import main_output, tiny_inputs, tiny_model

import astra
import astra_kernels as ak
from astra import bases
from astra.bases import attention_basis, attention_metric, pca_rotation
from astra.calibrate import collect_hidden_states, kmeans, kmeans_error
from astra.models import family_of


def _correlated(n=3000, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -1.5, D)                       # a decaying spectrum, mixed into every raw dim
    mix = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    return ((torch.randn(n, D, generator=g, dtype=torch.float64) * scales) @ mix.t()).float()


def _data(family, seeds=(3, 4)):
    return [tiny_inputs(family, batch=4, seq=16, seed=s) for s in seeds]


def test_pca_rotation_orthogonal_deterministic_and_balanced():
    x = _correlated()
    G = 4
    R = pca_rotation(x, G)
    assert R.shape == (32, 32) and R.dtype == torch.float64
    torch.testing.assert_close(R.t() @ R, torch.eye(32, dtype=torch.float64), atol=1e-10, rtol=0)
    assert torch.equal(R, pca_rotation(x.clone(), G))
    y = (x.double() - x.double().mean(0)) @ R
    per_dim = y.var(0)
    logvar = per_dim.log().reshape(G, -1)                    # group g holds slots g*8 .. g*8+7
    assert bool((logvar[:, :-1] >= logvar[:, 1:] - 1e-9).all())       # by decreasing variance within a group
    spread = logvar.sum(1)
    # balanced products of variances: the groups' log products differ by at most one round's log spread (a
    # round: the next G axes by variance, one to each group)
    lam = per_dim.sort(descending=True).values.log().reshape(-1, G)
    assert float(spread.max() - spread.min()) <= float((lam[:, 0] - lam[:, -1]).max()) + 1e-6, spread
    assert float(spread.max() - spread.min()) < 0.1 * float(lam.max() - lam.min())    # far below the spectrum's
    with pytest.raises(ValueError, match="not divisible"):
        pca_rotation(x, 5)


def test_rotation_lowers_the_product_quantization_error():
    x = _correlated()
    plain = kmeans_error(x, kmeans(x, 4, 16, iters=10, backend="torch"))
    R = pca_rotation(x, 4).float()
    rotated = kmeans_error(x @ R, kmeans(x @ R, 4, 16, iters=10, backend="torch"))   # R orthogonal: same norm
    assert rotated < 0.8 * plain, (rotated, plain)


def _direct_attention_error(fam, module, h, e):
    """The attention metric's quadratic form for errors ``e [E, D]``, computed independently: the errors' K/V
    through the layer's own projections (differences of two forwards), the queries from the model's own query
    projection, the logit error averaged over the queries (and, with RoPE, over each rotate-half pair's
    rotation: |q_p|^2 |dk_p|^2 / 2 per pair), weighted by the values' spread, plus the value error per head."""
    with torch.no_grad():
        x = h.unsqueeze(0)
        dk, dv = [a - b for a, b in zip(fam.kv(module, (h[:1] + e).unsqueeze(0)), fam.kv(module, h[:1].unsqueeze(0)
                                                                                         .expand(1, len(e), -1)))]
        if fam.name == "gpt2":
            q = module.c_attn(x)[..., :fam.hidden_size]
        else:
            q = (module.query if fam.name == "bert" else module.q_proj)(x)
        v = fam.kv(module, x)[1][0].double()                                     # [Hkv, N, Dh]
    dk, dv = dk[0].double(), dv[0].double()                                      # [Hkv, E, Dh]
    N, Dh = h.shape[0], fam.head_dim
    q = q.view(N, -1, Dh).transpose(0, 1).double()                               # [H, N, Dh]
    H, Hkv = q.shape[0], dk.shape[0]
    spread = (v - v.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1)
    out = torch.zeros(len(e), dtype=torch.float64)
    for i in range(H):
        g = i // (H // Hkv)
        if fam.rope:
            half = Dh // 2
            qq = q[i, :, :half].pow(2) + q[i, :, half:].pow(2)                  # [N, Dh/2]: |q_p|^2
            kk = dk[g, :, :half].pow(2) + dk[g, :, half:].pow(2)                # [E, Dh/2]
            logit = (kk @ qq.mean(0)) / 2
        else:
            logit = (dk[g] @ q[i].t()).pow(2).mean(-1)                           # mean over queries
        out += spread[g] * module.scaling ** 2 * logit + dv[g].pow(2).sum(-1)
    return out


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_attention_metric_is_the_attention_error(family):
    model = tiny_model(family)
    fam = family_of(model)
    hs = collect_hidden_states(model, _data(family))
    h = hs[1]
    M = attention_metric(fam, fam.attn_modules[1], h)
    assert M.shape == (64, 64) and M.dtype == torch.float64 and torch.equal(M, M.t())
    assert float(torch.linalg.eigvalsh(M).min()) > -1e-9 * float(M.abs().max())
    e = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    want = _direct_attention_error(fam, fam.attn_modules[1], h, e)
    got = torch.einsum("nd,de,ne->n", e.double(), M, e.double())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


def test_attention_metric_refuses_a_key_norm_and_auto_falls_back_to_pca():
    model = tiny_model("qwen3")
    fam = family_of(model)
    h = collect_hidden_states(model, _data("qwen3"))[0]
    with pytest.raises(ValueError, match="not affine"):
        attention_metric(fam, fam.attn_modules[0], h)
    assert bases.resolve("auto", fam, 4) == "pca"
    cb = astra.calibrate(model, _data("qwen3"), groups=4, codebook_size=16, iters=2)
    R = cb.transforms[0].double()
    torch.testing.assert_close(R.t() @ R, torch.eye(64, dtype=torch.float64), atol=1e-5, rtol=0)   # orthogonal
    with pytest.raises(ValueError, match="not affine"):
        astra.calibrate(model, _data("qwen3"), groups=4, codebook_size=16, iters=2, basis="attention")


@pytest.mark.parametrize("groups", [1, 4])
def test_attention_basis_squares_to_the_metric(groups):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(32, 32, generator=g, dtype=torch.float64)
    M = A @ A.t() + 0.5 * torch.eye(32, dtype=torch.float64)          # well conditioned: no eigenvalue is floored
    h = _correlated()
    T, T_inv = attention_basis(M, h, groups)
    torch.testing.assert_close(T @ T_inv, torch.eye(32, dtype=torch.float64), atol=1e-10, rtol=0)
    e = torch.randn(5, 32, generator=g, dtype=torch.float64)
    torch.testing.assert_close((e @ T).pow(2).sum(-1), torch.einsum("nd,de,ne->n", e, M, e), rtol=1e-10, atol=0)
    flat = torch.diag(torch.tensor([1.0] + [1e-9] * 31, dtype=torch.float64))
    S, _ = attention_basis(flat, h, 1)                                # floored: condition number <= FLOOR^-1/2
    assert float(torch.linalg.cond(S)) == pytest.approx(bases.METRIC_FLOOR ** -0.5, rel=1e-6)


def test_kmeans_in_the_attention_basis_lowers_the_attention_error():
    """What the basis is for: k-means of ``h @ T`` minimises ``e M e^T``, k-means of ``h`` does not. The layer's
    K/V are made to read 8 of the 64 dimensions 10x more strongly than the others (a random model's metric is
    nearly isotropic, so either basis would do)."""
    model = tiny_model("bert")
    fam = family_of(model)
    with torch.no_grad():
        for w in (fam.attn_modules[1].key.weight, fam.attn_modules[1].value.weight):
            w[:, :8] *= 10.0
    h = collect_hidden_states(model, _data("bert", seeds=(3, 4, 5, 6)))[1]
    M = attention_metric(fam, fam.attn_modules[1], h)
    T, T_inv = (t.float() for t in attention_basis(M, h, 1))

    def err(C, basis, back):
        codes = ak.vq_encode(h @ basis, C)
        e = (ak.vq_decode(codes, C) @ back - h).double()
        return float(torch.einsum("nd,de,ne->", e, M, e))

    eye = torch.eye(64)
    plain = err(kmeans(h, 1, 16, iters=10, backend="torch"), eye, eye)
    moved = err(kmeans(h @ T, 1, 16, iters=10, backend="torch"), T, T_inv)
    assert moved < 0.9 * plain, (moved, plain)


def _block_scaling(D, G, perm, scales):
    """T with (h @ T)'s group g = h's group perm[g], reversed and times scales[g] (neither orthogonal nor
    symmetric)."""
    d = D // G
    T = torch.zeros(D, D)
    for g, src in enumerate(perm):
        for j in range(d):
            T[src * d + (d - 1 - j), g * d + j] = scales[g]
    return T


@pytest.mark.parametrize("family,n", [("gpt2", 3), ("bert", 2), ("llama", 2)])
def test_transformed_codebooks_quantize_in_the_transformed_basis(family, n):
    """Codebooks C in the model's basis and (C', T) with T a block permutation with a scale per group and C'
    = C moved alike quantize identically (a group's scale does not change its nearest codeword): simulate gives
    the same output, so encode applies T and decode T^-1. (The even split: the balanced one charges the transform,
    so it may split the two apart.)"""
    model = tiny_model(family)
    inputs = tiny_inputs(family, padded=True)
    G = 4
    cb = astra.calibrate(model, _data(family), groups=G, codebook_size=16, iters=3, basis="none")
    perm, scales = [2, 0, 3, 1], [0.5, 2.0, 3.0, 0.25]
    T = _block_scaling(64, G, perm, scales)
    moved = [(t[perm].flip(-1) * torch.tensor(scales).view(G, 1, 1)).contiguous() for t in cb.tensors]
    tf = astra.Codebooks(moved, model_type=cb.model_type, hidden_size=64, transforms=[T] * cb.num_layers)
    ref = main_output(astra.simulate(model, inputs, world_size=n, codebooks=cb, split="even"))
    got = main_output(astra.simulate(model, inputs, world_size=n, codebooks=tf, split="even"))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    inv = torch.linalg.inv(T)
    wrong = astra.Codebooks(moved, model_type=cb.model_type, hidden_size=64, transforms=[inv] * cb.num_layers)
    bad = main_output(astra.simulate(model, inputs, world_size=n, codebooks=wrong, split="even"))
    assert (bad - ref).abs().max() > 1e-3                      # the orientation matters, and is T, not T^-1


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama", "qwen3"])
def test_folded_kv_projection_equals_decode_then_project(family):
    """Non-local K/V through the folded projection T^-1 [W_K | W_V] equal the inverse transform followed by the
    layer's own projection (+ RoPE at the tokens' positions); a family whose K/V are not affine (Qwen3's
    k_norm) is not folded and takes the unfolded path."""
    from astra.simulation import SimRuntime

    model = tiny_model(family)
    cb = astra.calibrate(model, _data(family), groups=4, codebook_size=16, iters=2, basis="pca")
    rt = SimRuntime(model, cb, world_size=2)
    rt.install()
    try:
        assert (rt._folds is None) == (family == "qwen3")
        g = torch.Generator().manual_seed(7)
        codes = torch.randint(0, 16, (2, 5, 4), generator=g, dtype=torch.int32)
        pos = torch.tensor([[3, 9, 4, 11, 6]] * 2)
        assert cb.placeholder_layers == (0,)                # every rank computes layer 0: nothing to decode there
        for layer, m in list(enumerate(rt.fam.attn_modules))[1:]:
            with torch.no_grad():               # inference, as the runtimes call them
                k, v = rt.quantized_kv(layer, m, codes, pos, torch.float32)
                k0, v0 = rt.remote_kv(m, rt.decode(layer, codes, torch.float32), pos)
            assert k.shape == k0.shape and v.shape == v0.shape
            torch.testing.assert_close(k, k0, rtol=0, atol=1e-5)
            torch.testing.assert_close(v, v0, rtol=0, atol=1e-5)
            assert float(k0.abs().max()) > 0.1 and float(v0.abs().max()) > 0.1
    finally:
        rt.uninstall()


def test_calibrate_bases():
    model = tiny_model("bert")
    fam = family_of(model)
    data = _data("bert")
    g4 = astra.calibrate(model, data, groups=4, codebook_size=16, iters=3)
    g1 = astra.calibrate(model, data, groups=1, codebook_size=16, iters=3)
    assert g4.transformed and not g1.transformed
    h = collect_hidden_states(model, data, max_tokens=20000)
    assert g4.placeholder_layers == g1.placeholder_layers == (0,)          # every rank computes layer 0
    eye = torch.eye(fam.hidden_size)
    assert torch.equal(g4.transforms[0], eye) and torch.equal(g4.inverses[0], eye) and g4[0].abs().max() == 0
    for l in range(1, 2):                                      # auto at G > 1: the attention basis
        T, T_inv = attention_basis(attention_metric(fam, fam.attn_modules[l], h[l]), h[l], 4)
        torch.testing.assert_close(g4.transforms[l], T.float(), rtol=0, atol=1e-6)
        torch.testing.assert_close(g4.inverses[l], T_inv.float(), rtol=0, atol=1e-6)
        assert torch.equal(g4[l], kmeans(h[l] @ g4.transforms[l], 4, 16, iters=3, seed=l))
    pca = astra.calibrate(model, data, groups=1, codebook_size=16, iters=3, basis="pca")
    torch.testing.assert_close(pca.inverses[1], pca.transforms[1].t())
    assert not astra.calibrate(model, data, groups=4, codebook_size=16, iters=3, basis="none").transformed
    assert astra.calibrate(model, data, groups=1, codebook_size=16, iters=3, basis="attention").transformed
    lw = astra.calibrate(model, data, groups=4, codebook_size=16, iters=3, world_size=2)
    assert lw.transformed and not torch.equal(lw.transforms[1], g4.transforms[1])  # layer 1 saw quantized layer 0
    torch.testing.assert_close(lw.transforms[0], g4.transforms[0])
    with pytest.raises(ValueError, match="basis must be one of"):
        astra.calibrate(model, data, groups=4, codebook_size=16, basis=True)


def test_transformed_codebooks_save_load_and_corruption(tmp_path):
    model = tiny_model("gpt2")
    cb = astra.calibrate(model, _data("gpt2", seeds=(3,)), groups=4, codebook_size=16, iters=3)
    path = tmp_path / "cb.safetensors"
    cb.save(path)
    back = astra.Codebooks.load(path, model)
    assert back.transformed and "transformed" in repr(back)
    assert all(torch.equal(a, b) for a, b in zip(back.transforms + back.inverses, cb.transforms + cb.inverses))
    half = cb.to(torch.bfloat16)                               # a rounded transform is still accepted
    assert half.transformed and half.transforms[0].dtype == half.inverses[0].dtype == torch.bfloat16
    assert back.checksum() == cb.checksum() != cb.with_tensors(cb.tensors).to(torch.float64).checksum()
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["version"] == "6" and meta["kinds"] == "layer,transform,inverse" and meta["placeholder_layers"] == "0"
    tensors = load_file(str(path))
    for kind in ("transform", "inverse"):
        bad = dict(tensors, **{f"{kind}.1": tensors[f"{kind}.1"].flip(0)})
        save_file(bad, str(path), metadata=meta)
        with pytest.raises(ValueError, match=f"{kind} 1 fails its checksum"):
            astra.Codebooks.load(path)
    del tensors["inverse.1"]
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="expected tensors"):
        astra.Codebooks.load(path)


def test_version_3_rotations_load_with_their_transpose_as_inverse(tmp_path):
    from safetensors.torch import save_file

    from astra.codebooks import FORMAT, metadata_checksum, tensor_checksum

    model = tiny_model("gpt2")
    cb = astra.calibrate(model, _data("gpt2", seeds=(3,)), groups=4, codebook_size=16, iters=3, basis="pca")
    meta = {"format": FORMAT, "version": "3", "model_type": "gpt2", "hidden_size": "64", "num_layers": "2",
            "groups": "4", "codebook_size": "16", "layer_checksums": ",".join(cb.layer_checksums()),
            "rotation_checksums": ",".join(tensor_checksum(r) for r in cb.transforms)}
    meta["checksum"] = metadata_checksum(meta)
    tensors = {f"layer.{i}": t for i, t in enumerate(cb.tensors)}
    tensors.update({f"rotation.{i}": r.contiguous() for i, r in enumerate(cb.transforms)})
    save_file(tensors, str(tmp_path / "v3.safetensors"), metadata=meta)
    back = astra.Codebooks.load(tmp_path / "v3.safetensors", model)
    assert all(torch.equal(a, b) for a, b in zip(back.transforms, cb.transforms))
    assert all(torch.equal(a, b.t()) for a, b in zip(back.inverses, cb.transforms))


@pytest.mark.parametrize("case,msg", [
    ("count", "2 transforms for 3 codebook layers"), ("shape", r"expected \[8, 8\]"),
    ("singular", "transform of layer 0 is singular"), ("near-singular", "do not multiply"),
    ("wrong inverse", "do not multiply to the identity"),
    ("nan", "transform of layer 0"), ("int", "floating tensor"), ("inverse count", "2 inverses for 3"),
    ("no transforms", "inverses were given without transforms")])
def test_transform_validation(case, msg):
    t = [torch.randn(2, 4, 4) for _ in range(3)]
    eye = torch.eye(8)
    sing = eye.clone()
    sing[3] = sing[2]
    g = torch.Generator().manual_seed(0)
    U, V = (torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0] for _ in range(2))
    near = ((U * torch.logspace(0, -9, 8, dtype=torch.float64)) @ V.t()).float()   # condition number 1e9:
    # invertible, but its inverse rounded to float32 no longer inverts it
    kw = {"count": dict(transforms=[eye, eye]), "shape": dict(transforms=[torch.eye(4)] * 3),
          "singular": dict(transforms=[sing] * 3), "near-singular": dict(transforms=[near] * 3),
          "wrong inverse": dict(transforms=[eye * 2] * 3, inverses=[eye] * 3),
          "nan": dict(transforms=[eye.masked_fill(eye == 0, float("nan"))] + [eye] * 2),
          "int": dict(transforms=[eye.long()] * 3), "inverse count": dict(transforms=[eye] * 3, inverses=[eye] * 2),
          "no transforms": dict(inverses=[eye] * 3)}[case]
    with pytest.raises(ValueError, match=msg):
        astra.Codebooks(t, model_type="gpt2", hidden_size=8, **kw)


def test_finetune_keeps_the_transform_and_trains_through_it():
    model = tiny_model("bert")
    data = [tiny_inputs("bert", batch=2, seq=12, seed=s, padded=True) for s in range(3)]
    cb = astra.calibrate(model, data, groups=4, codebook_size=16, iters=3)
    res = astra.finetune(model, cb, data, world_size=2, steps=3, progress=False)
    assert res.codebooks.transformed
    assert all(torch.equal(a, b) for a, b in zip(res.codebooks.transforms, cb.transforms))
    assert all(torch.equal(a, b) for a, b in zip(res.codebooks.inverses, cb.inverses))
    assert any(not torch.equal(a, b) for a, b in zip(res.codebooks.tensors, cb.tensors))
    with pytest.raises(ValueError, match="codebook layers for 2 transforms"):
        cb.with_tensors(cb.tensors[:1])


def test_split_costs_count_the_transform():
    """The causal split's costs charge a transformed codebook's D x D product once per encoded token, and nothing
    per non-local key (the folded K/V projection; at G = 1 the K/V tables hold the inverse transform), in every
    layer but layer 0, which every rank computes (no encode; every non-local key projected)."""
    from astra.split import GEMM_MAC_COST, GROUPED_ENCODE_MAC_COST, TABLE_ATTENTION_MAC_COST, causal_costs

    model = tiny_model("gpt2")
    fam = family_of(model)
    c = 1 - 1 / fam.num_layers                         # the share of layers that encode (layer 0 does not)
    data = _data("gpt2", seeds=(3,))
    plain = astra.calibrate(model, data, groups=4, codebook_size=16, iters=2, basis="none")
    tf = astra.calibrate(model, data, groups=4, codebook_size=16, iters=2)
    (p0, k0, e0, l0), (p1, k1, e1, l1) = causal_costs(fam, plain), causal_costs(fam, tf)
    D = 64
    search = GROUPED_ENCODE_MAC_COST * D * 16          # G = 4: the grouped search's weighted multiply-adds
    token0 = c * search / e0                           # one token's per-layer work, untransformed
    tdd = GEMM_MAC_COST * D * D                        # the transform, through astra_kernels.gemm
    assert e1 * (token0 + c * tdd) == pytest.approx(c * (search + tdd), rel=1e-12)
    assert k1 * (token0 + c * tdd) == pytest.approx(k0 * token0, rel=1e-12)
    assert p1 * (token0 + c * tdd) == pytest.approx(p0 * token0, rel=1e-12)
    assert l1 * (token0 + c * tdd) == pytest.approx(l0 * token0, rel=1e-12)
    g1 = astra.calibrate(model, data, groups=1, codebook_size=16, iters=2, basis="attention")
    pair, key = causal_costs(fam, g1)[:2]
    token = TABLE_ATTENTION_MAC_COST * 2 * D / pair
    assert key * token == pytest.approx((1 - c) * 2 * D * D, rel=1e-12)      # layer 0's projections only


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_half_precision_models_keep_the_attention_basis(family):
    """The affinity probe ran in the model's dtype: bf16 / fp16 rounding (~1e-3) read as a K/V that is not affine,
    so half-precision models silently got the PCA basis and no folded K/V. It now runs in float32 and gives the
    maps of the half-precision weights exactly, leaving the module's tensors as they were."""
    for dtype in (torch.bfloat16, torch.float16):
        model = tiny_model(family).to(dtype)
        fam = family_of(model)
        assert bases.resolve("auto", fam, 4) == "attention", (family, dtype)
        module = fam.attn_modules[0]
        before = [(t.data_ptr(), t.dtype) for t in module.parameters()]
        h = torch.randn(8, fam.hidden_size, generator=torch.Generator().manual_seed(1))
        got = bases.kv_maps(fam, module, h)
        assert [(t.data_ptr(), t.dtype) for t in module.parameters()] == before
        want = bases.kv_maps(family_of(tiny_model(family).to(dtype).float()), family_of(
            tiny_model(family).to(dtype).float()).attn_modules[0], h)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not affine"):                 # a key norm is still found in half precision
        bases.kv_maps(family_of(tiny_model("qwen3").to(torch.bfloat16)), family_of(
            tiny_model("qwen3").to(torch.bfloat16)).attn_modules[0], torch.randn(8, 64))


def test_a_rotated_basis_that_overflows_fp16_is_named():
    """fp16 GPT-2 whose attention inputs reach ~6e4 (finite; the model runs): the PCA basis' coordinates reach the
    hidden states' norm, whose float32 codebooks overflowed fp16 in the cast and were refused as "non-finite"."""
    model = tiny_model("gpt2")
    with torch.no_grad():       # the same function: ln_1's output scaled up, c_attn's weight scaled down
        for blk in model.transformer.h:
            blk.ln_1.weight.mul_(15000.0)
            blk.ln_1.bias.mul_(15000.0)
            blk.attn.c_attn.weight.div_(15000.0)
    model = model.half()
    samples = [tiny_inputs("gpt2", seq=16, batch=4, seed=s) for s in (11, 12)]
    with pytest.raises(ValueError, match=r"the calibrated codebooks: entries up to .* overflow torch.float16: run "
                                         r"the model in float32 .* basis='none'"):
        astra.calibrate(model, samples, groups=8, codebook_size=16, iters=3, basis="pca")
    cb = astra.calibrate(model, samples, groups=8, codebook_size=16, iters=3, basis="none")
    assert all(bool(torch.isfinite(t).all()) for t in cb.tensors)
