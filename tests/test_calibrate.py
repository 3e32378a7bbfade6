"""astra.calibrate: seeded grouped k-means over the hidden states ASTRA quantizes."""
import torch
from test_runtime_support import main_output, tiny_inputs, tiny_model

import astra
from astra.bases import attention_basis, attention_metric
from astra.calibrate import collect_hidden_states, kmeans
from astra.models import family_of


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
    import pytest

    x = torch.randn(10, 8)
    with pytest.warns(UserWarning, match="k-means of 10 vectors into K=300 codewords"):
        c = kmeans(x, 1, 300, iters=2, seed=0)      # random-init path, K > N
    assert c.shape == (1, 300, 8) and torch.isfinite(c).all()
    with pytest.warns(UserWarning, match="K=16 codewords: at most 10 of them differ, yet every code takes 4 bits"):
        c = kmeans(x, 4, 16, iters=2, seed=0)       # k-means++ path, K > N
    assert c.shape == (4, 16, 2) and torch.isfinite(c).all()


def test_empty_clusters_are_reseeded_with_data_points():
    """K > 256 codewords for 10 points start as the points and jittered copies of them; after a Lloyd step every
    jittered copy is an empty cluster. Keeping the empty clusters' old codewords (the jittered copies) passed: now
    every codeword of every group is one of the data points, exactly, and every point is a codeword."""
    import pytest

    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(5))
    with pytest.warns(UserWarning, match="K=300"):
        c = kmeans(x, 2, 300, iters=1, seed=0, backend="torch")
    assert c.shape == (2, 300, 4)
    for g in range(2):
        points = x[:, 4 * g: 4 * g + 4]
        same = (c[g][:, None, :] == points[None]).all(-1)          # [K, N]: codeword k is point n
        assert same.any(1).all() and same.any(0).all()

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


def test_faiss_and_torch_backends_are_seeded_and_comparable():
    import pytest

    from astra.calibrate import faiss_available, kmeans_error

    if not faiss_available():
        pytest.skip("faiss is not installed (the torch fallback is covered by the other tests)")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3000, 16, generator=g) * torch.linspace(0.2, 2.0, 16)
    for k in (8, 300):                       # k-means++ seeding, and the large-K random-point seeding
        f1 = kmeans(x, 4, k, iters=8, seed=1, backend="faiss")
        f2 = kmeans(x, 4, k, iters=8, seed=1, backend="faiss")
        t = kmeans(x, 4, k, iters=8, seed=1, backend="torch")
        assert torch.equal(f1, f2) and f1.shape == t.shape == (4, k, 4)
        ef, et = kmeans_error(x, f1), kmeans_error(x, t)
        assert ef < 1.05 * et and ef < 0.5 * float(x.reshape(-1, 4, 4).var(0).mean()), (k, ef, et)


def test_large_groups_assign_the_nearest_codeword():
    """Groups wider than SMALL_GROUP_MAX_DIM (G = 1 of a real model: 384 / 768 dims, the default) take the GEMM
    argmin of ``||c||^2 - 2 x.c``: the nearest codeword too (mutation audit: alpha -1 instead of -2, which favours
    short codewords and made MiniLM-size codebooks ~4 % worse, passed every test). Codewords of varied norms."""
    import astra_kernels as ak
    from astra.calibrate import lloyd_assign

    g = torch.Generator().manual_seed(0)
    G, N, d, K = 2, 300, 160, 32
    assert d > ak.SMALL_GROUP_MAX_DIM
    xs = torch.randn(G, N, d, generator=g)
    C = torch.randn(G, K, d, generator=g) * torch.linspace(0.2, 3.0, K)[None, :, None]
    ref = ak.vq_encode_reference(xs.transpose(0, 1).reshape(N, G * d), C).long()
    assert torch.equal(lloyd_assign(xs, C), ref)


def test_small_groups_assign_exactly_and_skip_faiss(monkeypatch):
    """Groups of a few dims: the Lloyd assignment is the exact encode (the float64 argmin), and backend "auto"
    runs the torch iterations (faiss was 4x slower there); from FAISS_MIN_GROUP_DIM dims up it is faiss."""
    import importlib

    import astra_kernels as ak

    cal = importlib.import_module("astra.calibrate")
    g = torch.Generator().manual_seed(4)
    xs = torch.randn(8, 500, 2, generator=g)                               # [G, N, d]
    C = torch.randn(8, 64, 2, generator=g)
    ref = ak.vq_encode_reference(xs.transpose(0, 1).reshape(500, 16), C).long()
    assert torch.equal(cal.lloyd_assign(xs, C), ref)
    calls = []
    monkeypatch.setattr(cal, "_kmeans_faiss", lambda *a, **k: calls.append(a[0].shape) or torch.zeros(()))
    x = torch.randn(600, 16, generator=g)
    small = kmeans(x, 8, 32, iters=3, seed=1)                               # 2-dim groups
    assert calls == [] and torch.equal(small, kmeans(x, 8, 32, iters=3, seed=1, backend="torch"))
    if cal.faiss_available():
        kmeans(x, 16 // cal.FAISS_MIN_GROUP_DIM, 32, iters=3, seed=1)
        assert calls == [(600, 16)]


def test_kmeans_bad_inputs():
    import pytest

    with pytest.raises(ValueError, match="backend"):
        kmeans(torch.randn(10, 8), 1, 4, backend="sklearn")
    with pytest.raises(ValueError, match="not divisible"):
        kmeans(torch.randn(10, 8), 3, 4)
    with pytest.raises(ValueError, match="no calibration vectors"):
        kmeans(torch.randn(0, 8), 1, 4)
    with pytest.raises(ValueError, match="at least one sample"):
        astra.calibrate(tiny_model("bert"), [], groups=4, codebook_size=8)
    for ws in (0, 1):             # 1 passed the check, then died in torch.cat (no rank sends at world size 1)
        with pytest.raises(ValueError, match="world_size must be None or an int >= 2"):
            astra.calibrate(tiny_model("bert"), [tiny_inputs("bert")], groups=4, codebook_size=8, world_size=ws)
    for G in (5, 0):              # refused before any forward, whichever path (layer 0 is not fitted to catch it)
        for kw in ({}, {"predict": True}, {"world_size": 2}):
            with pytest.raises(ValueError, match=f"hidden size 64 is not divisible by G={G}"):
                astra.calibrate(tiny_model("bert"), [tiny_inputs("bert")], groups=G, codebook_size=8, **kw)


def test_calibrate_reads_a_stream_of_samples_up_to_max_tokens():
    """An endless iterator of samples was read whole (list()) before anything else: calibrate never returned. A
    stream without len is read until its samples hold max_tokens tokens; a list is taken as given."""
    import itertools

    import pytest

    model = tiny_model("bert")
    x = tiny_inputs("bert")                           # [B, T], no mask: B * T tokens a sample
    per = x["input_ids"].numel()
    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield x

    cb = astra.calibrate(model, endless(), groups=4, codebook_size=8, iters=2, max_tokens=3 * per)
    assert len(pulled) == 3 and cb.num_layers == 2
    same = astra.calibrate(model, [x] * 3, groups=4, codebook_size=8, iters=2, max_tokens=3 * per)
    assert all(torch.equal(a, b) for a, b in zip(cb.tensors, same.tensors))
    with pytest.raises(ValueError, match="at least one sample"):
        astra.calibrate(model, iter([]), groups=4, codebook_size=8)
    # layer-wise calibration counts the vectors it quantizes (a causal model's last rank sends none; with left
    # padding a row's real tokens may all be there): the stream is read as far as the passes over it go, so it fits
    # on what the same samples as a list give (a token count fitted on half, then 60 %, as many)
    gpt2 = tiny_model("gpt2")
    samples = [tiny_inputs("gpt2", batch=2, seq=16, seed=s) for s in range(8)]
    kw = dict(groups=1, codebook_size=8, iters=2, max_tokens=96, world_size=2)
    a, b = astra.calibrate(gpt2, samples, **kw), astra.calibrate(gpt2, iter(samples), **kw)
    assert all(torch.equal(u, v) for u, v in zip(a.tensors, b.tensors))
    llama, padded = tiny_model("llama", head=False), []
    for i in range(10):
        s = tiny_inputs("llama", batch=4, seq=8, seed=100 + i)
        s["attention_mask"] = torch.ones(4, 8, dtype=torch.long)
        s["attention_mask"][1:, :6] = 0                            # rows 1-3: two real tokens, left-padded
        s["input_ids"][1:, :6] = 0
        padded.append(s)
    kw = dict(groups=1, codebook_size=4, iters=2, max_tokens=20, world_size=2)
    a, b = astra.calibrate(llama, padded, **kw), astra.calibrate(llama, iter(padded), **kw)
    assert all(torch.equal(u, v) for u, v in zip(a.tensors, b.tensors))


def test_calibrate_names_the_layer_whose_input_is_not_finite():
    """A NaN in the hidden states died in torch's multinomial ("probability tensor contains inf, nan") or read as
    "the attention metric is zero"; layer-wise calibration and finetune already named the layer."""
    import pytest

    model = tiny_model("bert")
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
    for kw in ({"groups": 4}, {"groups": 1}, {"groups": 4, "predict": True}):
        with pytest.raises(astra.NonFiniteError, match="the hidden state entering layer 1 holds NaN or Inf"):
            astra.calibrate(model, [tiny_inputs("bert")], codebook_size=8, iters=2, **kw)


def test_calibrate_names_each_bad_argument_before_any_forward(monkeypatch):
    """Each was a torch error from deep inside (IndexError, 'cannot reshape a tensor of 0 elements', an attention
    metric 'that is zero' for NaN embeddings, AttributeError for a tensor of ids) or, for K above the vectors,
    silence."""
    import pytest

    model = tiny_model("bert")
    x = tiny_inputs("bert")
    ok = dict(groups=4, codebook_size=8, iters=2)
    for kw, msg in (({"codebook_size": 0}, "codebook_size must be an int in 1..65536"),
                    ({"codebook_size": 70000}, "codebook_size must be an int in 1..65536"),
                    ({"iters": 0}, "iters must be an int >= 1"), ({"max_tokens": 0}, "max_tokens must be None")):
        with pytest.raises(ValueError, match=msg):
            astra.calibrate(model, [x], **{**ok, **kw})
    with pytest.raises(TypeError, match="samples must be a batch .a dict of model inputs. or an iterable of them, "
                                        "got Tensor"):
        astra.calibrate(model, x["input_ids"], **ok)
    with pytest.raises(TypeError, match=r"samples\[1\] must be a non-empty dict"):
        astra.calibrate(model, [x, x["input_ids"]], **ok)
    emb = torch.randn(2, 8, 64)
    emb[1, 3, 5] = float("nan")
    with pytest.raises(astra.InvalidInputError, match=r"samples\[0\]: inputs_embeds holds nan at position \[1, 3, 5\]"):
        astra.calibrate(model, [{"inputs_embeds": emb}], **ok)
    with pytest.raises(ValueError, match="no attended token to calibrate on"):
        astra.calibrate(model, [dict(x, attention_mask=torch.zeros_like(x["input_ids"]))], **ok)
    with pytest.warns(UserWarning, match=r"k-means of \d+ vectors into K=1024 codewords"):
        astra.calibrate(model, [x], groups=4, codebook_size=1024, iters=1)
    with pytest.raises(ValueError, match="class_token must be 'auto', 'distributed' or 'none'"):
        astra.calibrate(model, [x], **ok, class_token="bogus")          # read only with world_size before


def test_layerwise_calibration_sees_quantized_earlier_layers(capsys):
    """Layer l's codebook is fitted on what layer l quantizes in a world_size-rank simulation with layers < l
    quantized. (The 2-layer version of this test could not fail: layer 0 exchanges nothing, so layer 1's inputs are
    the same either way; a mutant that never quantized earlier layers passed it.)"""
    from astra.training import TrainSimRuntime

    model = tiny_model("bert", num_hidden_layers=3)
    samples = [tiny_inputs("bert", batch=4, seq=16, seed=s, padded=True) for s in range(3)]
    seq = astra.calibrate(model, samples, groups=4, codebook_size=16, iters=4, backend="torch", world_size=2,
                          progress=True)
    assert "astra.calibrate" in capsys.readouterr().err                     # the progress bar

    def recorded(quantized_below):      # layer 2's quantized vectors, 2 ranks, layers < quantized_below quantized
        rt = TrainSimRuntime(model, seq, 2, quantize_layers=quantized_below, record_layer=2)
        rt.install()
        try:
            with torch.no_grad():
                for s in samples:
                    rt.run(s)
        finally:
            rt.uninstall()
        return torch.cat(rt.recorded)

    exact, h2 = recorded(0), recorded(2)
    assert h2.shape == exact.shape and h2.shape[0] == sum(int(s["attention_mask"].sum()) for s in samples)
    ref = collect_hidden_states(model, samples)[2]          # full precision: the model's own layer-2 inputs
    torch.testing.assert_close(exact.norm(dim=1).sort().values, ref.norm(dim=1).sort().values)
    moved = (h2 - exact).norm(dim=1) > 1e-3 * exact.norm(dim=1)
    assert float(moved.float().mean()) > 0.5                # layer 1's codes moved most tokens' layer-2 inputs
    # layer 2's codebook is exactly k-means of those vectors, in their attention basis (G > 1)
    fam = family_of(model)
    T2 = attention_basis(attention_metric(fam, fam.attn_modules[2], h2), h2, 4)[0].to(h2.dtype)
    assert torch.equal(seq.transforms[2], T2)
    assert torch.equal(seq[2], kmeans(h2 @ T2, 4, 16, iters=4, seed=2, backend="torch"))


def test_layerwise_calibration_of_a_causal_model_leaves_out_the_tokens_nobody_receives():
    """A causal model's last rank sends nothing (nobody attends to its tokens), yet its tokens were half of what layer
    l was calibrated on at world size 2 (and got commitment and NAQ in fine-tuning): codebooks fitted on vectors no
    rank ever encodes. Only the sending ranks' tokens are recorded, quantized and trained now."""
    from astra.split import local_indices
    from astra.training import TrainSimRuntime

    model = tiny_model("llama", num_hidden_layers=3)
    cb = astra.Codebooks.random(model, groups=4, codebook_size=16)
    x = tiny_inputs("llama", batch=2, seq=12)
    for world in (2, 3):
        rt = TrainSimRuntime(model, cb, world, quantize_layers=2, record_layer=2)
        rt.install()
        try:
            with torch.no_grad():
                rt.run(x)
        finally:
            rt.uninstall()
        kept = torch.cat([local_indices(12, world, r, False, rt.split_costs) for r in range(world - 1)])
        got = torch.cat(rt.recorded)
        assert got.shape[0] == 2 * kept.numel()             # every token of the ranks 0..N-2, none of the last
        assert len(rt.commitment) == world - 1              # layer 1 quantized (0 exchanges nothing), senders only


def test_calibrate_gives_every_submodule_back_its_train_or_eval_mode():
    """Only the top-level mode was kept: ``model.train(was_training)`` put a layer the user had left in eval mode back
    in train mode (its dropout on again), after a calibration and after one that failed."""
    import pytest

    model = tiny_model("bert", num_hidden_layers=3)
    model.train()
    model.encoder.layer[0].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    assert modes["encoder.layer.0.attention.self"] is False and modes["encoder.layer.1"] is True
    seen = []
    model.encoder.layer[1].register_forward_pre_hook(lambda m, a: seen.append(m.training))
    astra.calibrate(model, [tiny_inputs("bert")], groups=4, codebook_size=8, iters=2)
    assert seen and not any(seen)                                   # calibrated in eval mode
    assert {name: m.training for name, m in model.named_modules()} == modes
    with pytest.raises(ValueError, match="no attended token"):
        x = tiny_inputs("bert")
        astra.calibrate(model, [dict(x, attention_mask=torch.zeros_like(x["input_ids"]))], groups=4, codebook_size=8)
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_calibrate_takes_a_tokenizers_batch_encoding():
    """A tokenizer's output (``BatchEncoding``: a Mapping, no dict) was iterated as its keys ("samples[0] must be an
    input dict ..., got str") or refused inside a list, while astra.simulate takes it."""
    from transformers import BatchEncoding

    model = tiny_model("bert")
    x = tiny_inputs("bert", batch=2, seq=10, padded=True)
    ref = astra.calibrate(model, [x], groups=4, codebook_size=8, iters=2)
    for samples in (BatchEncoding(x), [BatchEncoding(x)]):
        cb = astra.calibrate(model, samples, groups=4, codebook_size=8, iters=2)
        assert all(torch.equal(a, b) for a, b in zip(cb.tensors, ref.tensors))


def test_backend_faiss_without_faiss_is_refused_before_any_work(monkeypatch, capsys):
    """A plain ImportError after every hidden state was collected (a traceback from the CLI, 25 s in); it is a
    ModuleNotFoundError naming faiss before any forward, which the CLI reports in one line with its extra."""
    import importlib

    import pytest

    from astra.cli import main

    C = importlib.import_module("astra.calibrate")
    monkeypatch.setattr(C, "faiss_available", lambda: False)
    model = tiny_model("bert")
    model.register_forward_pre_hook(lambda *a: pytest.fail("a forward ran"))
    with pytest.raises(ModuleNotFoundError, match="backend='faiss' needs the faiss package") as err:
        astra.calibrate(model, [tiny_inputs("bert")], groups=4, codebook_size=8, backend="faiss")
    assert err.value.name == "faiss"
    assert main(["calibrate", "--model", "gpt2-random", "--backend", "faiss", "--out", "cb.safetensors"]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("astra calibrate: error: this command needs faiss") and out.err.count("\n") == 1
