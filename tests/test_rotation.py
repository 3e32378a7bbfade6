"""Rotated codebooks (astra.Codebooks(rotations=...), astra.calibrate(rotate=...)): the PCA rotation, the
quantizer's semantics (encode h @ R, decode y_hat @ R.T) in every runtime, persistence and validation."""
import pytest
import torch
from test_runtime_support import main_output, tiny_inputs, tiny_model

import astra
from astra.calibrate import kmeans, kmeans_error, pca_rotation


def _correlated(n=3000, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -1.5, D)                       # a decaying spectrum, mixed into every raw dim
    mix = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    return ((torch.randn(n, D, generator=g, dtype=torch.float64) * scales) @ mix.t()).float()


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


def _block_permutation(D, G, perm):
    """R with (h @ R)'s group g = h's group perm[g], each group's entries reversed (not symmetric: R != R.T)."""
    d = D // G
    R = torch.zeros(D, D)
    for g, src in enumerate(perm):
        for j in range(d):
            R[src * d + (d - 1 - j), g * d + j] = 1.0
    return R


@pytest.mark.parametrize("family,n", [("gpt2", 3), ("bert", 2), ("llama", 2)])
def test_rotated_codebooks_quantize_in_the_rotated_space(family, n):
    """Codebooks C in the model's basis and (C', R) with R a (non-symmetric) block permutation and C' = C
    permuted alike quantize identically: simulate gives the same output, so encode applies R and decode R.T."""
    model = tiny_model(family)
    inputs = tiny_inputs(family, padded=True)
    G = 4
    cb = astra.calibrate(model, [tiny_inputs(family, batch=4, seq=16, seed=s) for s in (3, 4)], groups=G,
                         codebook_size=16, iters=3, rotate=False)
    perm = [2, 0, 3, 1]
    R = _block_permutation(64, G, perm)
    moved = [t[perm].flip(-1).contiguous() for t in cb.tensors]
    rot = astra.Codebooks(moved, model_type=cb.model_type, hidden_size=64, rotations=[R] * cb.num_layers)
    ref = main_output(astra.simulate(model, inputs, world_size=n, codebooks=cb))
    got = main_output(astra.simulate(model, inputs, world_size=n, codebooks=rot))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    wrong = astra.Codebooks(moved, model_type=cb.model_type, hidden_size=64, rotations=[R.t()] * cb.num_layers)
    bad = main_output(astra.simulate(model, inputs, world_size=n, codebooks=wrong))
    assert (bad - ref).abs().max() > 1e-3                      # the orientation matters, and is R, not R.T


def test_calibrate_rotates_by_default_when_grouped():
    model = tiny_model("bert")
    data = [tiny_inputs("bert", batch=4, seq=16, seed=s) for s in (3, 4)]
    g4 = astra.calibrate(model, data, groups=4, codebook_size=16, iters=3)
    g1 = astra.calibrate(model, data, groups=1, codebook_size=16, iters=3)
    assert g4.rotated and not g1.rotated
    assert astra.calibrate(model, data, groups=1, codebook_size=16, iters=3, rotate=True).rotated
    assert not astra.calibrate(model, data, groups=4, codebook_size=16, iters=3, rotate=False).rotated
    lw = astra.calibrate(model, data, groups=4, codebook_size=16, iters=3, world_size=2)
    assert lw.rotated and not torch.equal(lw.rotations[1], g4.rotations[1])     # layer 1 saw quantized layer 0
    torch.testing.assert_close(lw.rotations[0], g4.rotations[0])
    with pytest.raises(ValueError, match="rotate must be"):
        astra.calibrate(model, data, groups=4, codebook_size=16, rotate="pca")


def test_rotated_codebooks_save_load_and_corruption(tmp_path):
    model = tiny_model("gpt2")
    cb = astra.calibrate(model, [tiny_inputs("gpt2", batch=4, seq=16, seed=3)], groups=4, codebook_size=16, iters=3)
    path = tmp_path / "cb.safetensors"
    cb.save(path)
    back = astra.Codebooks.load(path, model)
    assert back.rotated and "rotated" in repr(back)
    half = cb.to(torch.bfloat16)                               # a rounded rotation is still accepted
    assert half.rotated and half.rotations[0].dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(back.rotations, cb.rotations))
    assert back.checksum() == cb.checksum() != cb.with_tensors(cb.tensors).to(torch.float64).checksum()
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["version"] == "3"
    tensors = load_file(str(path))
    tensors["rotation.1"] = tensors["rotation.1"].flip(0)       # still orthogonal, but not what was saved
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="rotation 1 fails its checksum"):
        astra.Codebooks.load(path)
    del tensors["rotation.1"]
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="expected tensors"):
        astra.Codebooks.load(path)


@pytest.mark.parametrize("rot,msg", [
    ("count", "2 rotations for 3 codebook layers"), ("shape", r"expected \[8, 8\]"),
    ("skew", "not orthogonal"), ("nan", "rotation of layer 0"), ("int", "floating tensor")])
def test_rotation_validation(rot, msg):
    t = [torch.randn(2, 4, 4) for _ in range(3)]
    eye = torch.eye(8)
    bad = {"count": [eye, eye], "shape": [torch.eye(4)] * 3, "skew": [eye * 1.01] * 3,
           "nan": [eye.masked_fill(eye == 0, float("nan"))] + [eye] * 2, "int": [eye.long()] * 3}[rot]
    with pytest.raises(ValueError, match=msg):
        astra.Codebooks(t, model_type="gpt2", hidden_size=8, rotations=bad)


def test_finetune_keeps_the_rotation_and_trains_through_it():
    model = tiny_model("bert")
    data = [tiny_inputs("bert", batch=2, seq=12, seed=s, padded=True) for s in range(3)]
    cb = astra.calibrate(model, data, groups=4, codebook_size=16, iters=3)
    res = astra.finetune(model, cb, data, world_size=2, steps=3, progress=False)
    assert res.codebooks.rotated
    assert all(torch.equal(a, b) for a, b in zip(res.codebooks.rotations, cb.rotations))
    assert any(not torch.equal(a, b) for a, b in zip(res.codebooks.tensors, cb.tensors))
    with pytest.raises(ValueError, match="codebook layers for 2 rotations"):
        cb.with_tensors(cb.tensors[:1])


def test_split_costs_count_the_rotation():
    """The causal split's costs charge a rotated codebook's D x D products: one per encoded token, one per
    decoded non-local key (G > 1; at G = 1 the K/V tables hold the rotation)."""
    from astra.models import family_of
    from astra.split import causal_costs

    model = tiny_model("gpt2")
    fam = family_of(model)
    data = [tiny_inputs("gpt2", batch=4, seq=16, seed=3)]
    plain = astra.calibrate(model, data, groups=4, codebook_size=16, iters=2, rotate=False)
    rot = astra.calibrate(model, data, groups=4, codebook_size=16, iters=2)
    (p0, k0, e0), (p1, k1, e1) = causal_costs(fam, plain), causal_costs(fam, rot)
    D = 64
    token0 = D * 16 / e0                               # one token's per-layer work, unrotated
    assert e1 * (token0 + D * D) == pytest.approx(D * 16 + D * D, rel=1e-12)
    assert k1 * (token0 + D * D) == pytest.approx(k0 * token0 + D * D, rel=1e-12)
    assert p1 * (token0 + D * D) == pytest.approx(p0 * token0, rel=1e-12)
    g1 = astra.calibrate(model, data, groups=1, codebook_size=16, iters=2, rotate=True)
    assert causal_costs(fam, g1)[1] == 0
