"""astra.calibrate: seeded grouped k-means over the hidden states ASTRA quantizes."""
import torch
from test_runtime_support import main_output, tiny_inputs, tiny_model

import astra
from astra.calibrate import collect_hidden_states, kmeans


def test_collect_excludes_padding_and_matches_layer_inputs():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert", batch=2, seq=10, padded=True)   # 3 padding tokens
    hs = collect_hidden_states(model, [inputs])
    assert len(hs) == 2 and all(h.shape == (17, 64) for h in hs)
    with torch.no_grad():
        emb = model.embeddings(input_ids=inputs["input_ids"])
    assert torch.allclose(hs[0], emb[inputs["attention_mask"].bool()], atol=1e-6)   # BERT: block input


def test_kmeans_is_seeded_and_reduces_error():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 16, generator=g) * 5
    x = centers[torch.randint(0, 8, (400,), generator=g)] + 0.1 * torch.randn(400, 16, generator=g)
    a = kmeans(x, 2, 8, iters=10, seed=1)
    b = kmeans(x, 2, 8, iters=10, seed=1)
    assert torch.equal(a, b) and a.shape == (2, 8, 8)
    import astra_kernels as K

    err = ((K.vq_decode(K.vq_encode(x, a), a) - x) ** 2).mean()
    rnd = torch.randn(2, 8, 8, generator=g)
    err_rnd = ((K.vq_decode(K.vq_encode(x, rnd), rnd) - x) ** 2).mean()
    assert err < 0.05 and err < err_rnd / 10


def test_more_codewords_than_points_and_large_k():
    x = torch.randn(10, 8)
    c = kmeans(x, 1, 300, iters=2, seed=0)          # random-init path, K > N
    assert c.shape == (1, 300, 8) and torch.isfinite(c).all()
    c = kmeans(x, 4, 16, iters=2, seed=0)           # k-means++ path, K > N
    assert c.shape == (4, 16, 2) and torch.isfinite(c).all()


def test_calibrated_codebooks_beat_random_ones():
    for family in ("gpt2", "vit"):
        model = tiny_model(family)
        samples = [tiny_inputs(family, batch=4, seq=24, seed=s) for s in range(3)]
        cb = astra.calibrate(model, samples, groups=8, codebook_size=32, iters=6, seed=0)
        assert (cb.model_type, cb.num_layers, cb.groups, cb.codebook_size) == (family, 2, 8, 32)
        again = astra.calibrate(model, samples, groups=8, codebook_size=32, iters=6, seed=0)
        assert all(torch.equal(a, b) for a, b in zip(cb, again))
        rnd = astra.Codebooks.random(model, groups=8, codebook_size=32, seed=0)
        inputs = tiny_inputs(family, seed=99)
        with torch.no_grad():
            ref = main_output(model(**inputs))
        e_cal = (main_output(astra.simulate(model, inputs, world_size=2, codebooks=cb)) - ref).abs().mean()
        e_rnd = (main_output(astra.simulate(model, inputs, world_size=2, codebooks=rnd)) - ref).abs().mean()
        assert e_cal < e_rnd, (family, float(e_cal), float(e_rnd))
