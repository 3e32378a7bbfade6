"""astra.finetune and the differentiable simulation behind it (astra.training)."""
import copy
import math
import sys

import pytest
import torch
from test_runtime_support import main_output, tiny_inputs, tiny_model

import astra
from astra.models import family_of
from astra.training import TrainSimRuntime


def _train_sim(model, inputs, cb, n, **kw):
    rt = TrainSimRuntime(model, cb, n, **kw)
    rt.install()
    try:
        out, _ = rt.run(inputs)
        return out, rt
    finally:
        rt.uninstall()


@pytest.mark.parametrize("family,padded,n,cls", [("gpt2", True, 3, "auto"), ("llama", True, 2, "auto"),
                                                 ("bert", True, 3, "auto"), ("bert", True, 2, "distributed"),
                                                 ("vit", False, 4, "auto"), ("bert", False, 1, "auto")])
def test_training_path_equals_simulate_in_value(family, padded, n, cls):
    model = tiny_model(family)
    inputs = tiny_inputs(family, padded=padded)
    cb = astra.Codebooks.random(model, groups=4, codebook_size=16, seed=0, scale=0.5)
    ref = main_output(astra.simulate(model, inputs, world_size=n, codebooks=cb, class_token=cls))
    out, rt = _train_sim(model, inputs, cb, n, class_token=cls)
    got = main_output(out)
    assert got.requires_grad
    rows = inputs.get("attention_mask")
    rows = rows.bool() if rows is not None and got.ndim == 3 else slice(None)
    torch.testing.assert_close(got.detach()[rows], ref[rows], rtol=1e-4, atol=1e-5)
    senders = n - 1 if family_of(model).causal else n           # nobody attends to a causal model's last rank
    assert len(rt.commitment) == (senders if n > 1 else 0)     # layer 1 of 2: every rank computes layer 0


def test_simulate_is_differentiable_when_asked():
    """The issue's contract: finetune trains through astra.simulate's semantics, which must be differentiable when
    asked (the training runtime was reachable only through astra.training)."""
    model = tiny_model("gpt2")
    inputs = tiny_inputs("gpt2", padded=True)
    cb = astra.Codebooks.random(model, groups=4, codebook_size=16, seed=0, scale=0.5)
    params = [torch.nn.Parameter(t.clone()) for t in cb.tensors]
    plain = astra.simulate(model, inputs, world_size=2, codebooks=cb).logits
    out = astra.simulate(model, inputs, world_size=2, codebooks=cb.with_tensors(params), differentiable=True).logits
    assert out.requires_grad and not plain.requires_grad
    rows = inputs["attention_mask"].bool()
    torch.testing.assert_close(out.detach()[rows], plain[rows], rtol=1e-4, atol=1e-5)
    out[:, -1].pow(2).sum().backward()              # the last token: its rank reads the earlier ranks' codes
    assert params[1].grad is not None and params[1].grad.abs().sum() > 0
    assert model.transformer.h[0].mlp.c_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="differentiable must be a bool"):
        astra.simulate(model, inputs, world_size=2, differentiable="yes")
    vit = tiny_model("vit")         # refused as without autograd (finetune's single-class-token ablation is not)
    with pytest.raises(astra.UnsupportedModelError, match="always uses distributed class tokens"):
        astra.simulate(vit, tiny_inputs("vit"), world_size=2, class_token="none", differentiable=True)


def test_training_runs_under_autocast_where_inference_is_refused():
    """The autocast refusal sat in the input checks, so finetune (whose attention is torch's, and which trained under
    autocast before) was refused too; it belongs to the inference runtimes only."""
    model = tiny_model("llama")
    cb = astra.Codebooks.random(model, groups=4, codebook_size=16, seed=0, scale=0.5)
    data = [tiny_inputs("llama", padded=True)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = astra.finetune(model, cb, data, world_size=2, progress=False, steps=1)
        with pytest.raises(astra.UnsupportedModelError, match="torch.autocast"):
            astra.simulate(model, data[0], world_size=2, codebooks=cb)
    assert len(res.losses) == 1 and math.isfinite(res.losses[0])


def test_ste_gradients_reach_codebooks_and_sender_weights():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert", padded=True)
    cb = astra.calibrate(model, [inputs], groups=4, codebook_size=16, iters=3)
    params = [torch.nn.Parameter(t.clone()) for t in cb.tensors]
    cbp = cb.with_tensors(params)
    out, rt = _train_sim(model, inputs, cbp, 2)
    main_output(out).pow(2).sum().backward()
    assert params[0].grad is None                         # layer 0: every rank computes it, no codes
    for p in params[1:]:                                  # every other layer's codebook gets a gradient
        assert p.grad is not None and p.grad.abs().sum() > 0
    # layer 1's quantized input comes from layer 0's output: its gradient reaches layer 0's weights through
    # the STE; to isolate the STE path, compare against a run where the STE is cut (h.detach() only)
    w = model.encoder.layer[0].output.dense.weight
    g_ste = w.grad.clone()
    model.zero_grad()
    rt2 = TrainSimRuntime(model, cbp, 2)
    rt2.quantize = lambda layer, h, valid, pred=None, q=rt2.quantize: q(layer, h.detach(), valid, pred)
    rt2.install()
    try:
        main_output(rt2.run(inputs)[0]).pow(2).sum().backward()
    finally:
        rt2.uninstall()
    assert (g_ste - w.grad).norm() > 1e-3 * g_ste.norm() > 0


def test_straight_through_quantizer_value_and_gradients():
    model = tiny_model("bert")
    C = torch.nn.Parameter(torch.randn(4, 16, 16))
    rt = TrainSimRuntime(model, astra.Codebooks([C, C.detach()], model_type="bert", hidden_size=64), 2)
    rt.install()
    try:
        h = torch.randn(2, 5, 64, requires_grad=True)
        out = rt.quantize(0, h, None)
    finally:
        rt.uninstall()
    import astra_kernels as ak

    codes = ak.vq_encode(h.detach(), C.detach())
    torch.testing.assert_close(out.detach(), ak.vq_decode(codes, C.detach()))       # value: the codeword
    w = torch.randn_like(out)
    (out * w).sum().backward()
    torch.testing.assert_close(h.grad, w)                                          # STE: identity to h
    expect = torch.zeros_like(C)
    flat = w.reshape(-1, 4, 16)
    for g in range(4):
        expect[g].index_add_(0, codes.reshape(-1, 4)[:, g].long(), flat[:, g])
    torch.testing.assert_close(C.grad, expect)                                     # and to the codewords
    assert len(rt.commitment) == 1


def test_codebook_gradients_are_bitwise_reproducible_with_threads():
    """Many tokens on few codewords, two threads: the codewords' gradients are the same bits on every backward
    (advanced indexing's accumulating backward was not, and MiniLM fine-tunes differed between processes)."""
    model = tiny_model("bert")
    g = torch.Generator().manual_seed(3)
    C = torch.nn.Parameter(torch.randn(4, 16, 16, generator=g))
    rt = TrainSimRuntime(model, astra.Codebooks([C, C.detach()], model_type="bert", hidden_size=64), 2)
    h = torch.randn(8, 6000, 64, generator=g)
    w = torch.randn(8, 6000, 64, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    rt.install()
    try:
        grads = []
        for _ in range(4):
            C.grad = None
            (rt.quantize(0, h, None) * w).sum().backward()
            grads.append(C.grad.clone())
    finally:
        rt.uninstall()
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], x) for x in grads[1:])


def _padded_quantizer_case(naq=0.0, seed=0):
    """A TrainSimRuntime on layer 0's codebook C [4, 16, 16] and hidden states ``h [4, 500, 64]`` that are codewords
    plus a small residual of a per-dimension scale (0.02 .. 0.2), with the last 100 tokens of every row padding
    holding garbage (+-50); returns (runtime, h, valid, the clean quantization of h, h's residual)."""
    import astra_kernels as ak

    model = tiny_model("bert")
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(4, 16, 16, generator=g)
    rt = TrainSimRuntime(model, astra.Codebooks([C, C], model_type="bert", hidden_size=64), 2, naq=naq,
                         generator=torch.Generator().manual_seed(seed + 1))
    codes = torch.randint(0, 16, (4, 500, 4), generator=g, dtype=torch.int32)
    scale = torch.linspace(0.02, 0.2, 64)
    h = ak.vq_decode(codes, C) + torch.randn(4, 500, 64, generator=g) * scale
    valid = torch.ones(4, 500, dtype=torch.bool)
    valid[:, 400:] = False
    h[:, 400:] = 50 * torch.sign(torch.randn(4, 100, 64, generator=g))
    clean = ak.vq_decode(ak.vq_encode(h, C), C)
    return rt, h, valid, clean, h - clean


def test_commitment_counts_only_valid_tokens():
    """The commitment term was not checked on a padded batch: the mean over every token, padding included, passed.
    It is the mean squared residual over the valid tokens only."""
    rt, h, valid, clean, resid = _padded_quantizer_case()
    rt.install()
    try:
        out = rt.quantize(0, h, valid)
    finally:
        rt.uninstall()
    assert torch.equal(out, clean)
    assert len(rt.commitment) == 1
    expect = resid[valid].pow(2).mean()
    torch.testing.assert_close(rt.commitment[0], expect, rtol=1e-6, atol=0)
    assert float(resid.pow(2).mean()) > 100 * float(expect)          # the padding's residual is far larger


def test_naq_noise_std_per_dimension_is_naq_times_the_residual_std():
    """NAQ noise scaled by the hidden state's std (instead of the quantization residual's) passed: the earlier test
    only compared noise sizes between two lambdas. The noise of every dimension has std ~ naq x that dimension's
    residual std over the valid tokens, and it is the generator's Gaussian draw times exactly that."""
    naq = 0.5
    rt, h, valid, clean, resid = _padded_quantizer_case(naq=naq, seed=3)
    rt.install()
    try:
        out = rt.quantize(0, h, valid)
    finally:
        rt.uninstall()
    noise = (out - clean)[valid]                                      # [1600, 64]
    target = naq * resid[valid].std(dim=0)                            # 0.01 .. 0.1 by dimension
    assert target.max() > 5 * target.min()
    torch.testing.assert_close(noise.std(dim=0), target, rtol=0.1, atol=0)
    assert (noise.mean(dim=0).abs() < 0.15 * target).all()                # zero mean (6 standard errors)
    draw = torch.randn(h.shape, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, clean + draw * target, rtol=1e-5, atol=1e-6)


def test_dense_attention_gives_zero_to_a_query_that_sees_no_key():
    """A query with no visible key got the uniform average of the values (the softmax of an all-zero row) instead
    of 0, the astra_kernels convention; the other queries are plain masked softmax attention (grouped K/V)."""
    from astra.training import dense_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 4, generator=g)
    k, v = torch.randn(1, 1, 5, 4, generator=g), torch.randn(1, 1, 5, 4, generator=g) + 3.0
    visible = torch.tensor([[True, True, False, True, False], [False] * 5, [True] * 5])[None, None]
    out = dense_attention(q, k, v, visible, None)
    assert out.shape == (1, 2, 3, 4)
    assert torch.equal(out[:, :, 1], torch.zeros(1, 2, 4))
    for hq in range(2):
        for t in (0, 2):
            m = visible[0, 0, t]
            w = torch.softmax((k[0, 0, m] @ q[0, hq, t]) / 2.0, dim=0)
            torch.testing.assert_close(out[0, hq, t], w @ v[0, 0, m])


def test_distill_loss_is_kl_teacher_to_student_over_valid_tokens():
    """Neither the direction of the KL nor the padding was checked: KL(student || teacher), and a mean over every
    token (padding included), passed. It is KL(teacher || student) averaged over the valid tokens; whatever the
    padded positions hold does not change it, nor does a constant added to a token's logits."""
    import math
    from types import SimpleNamespace

    from astra.finetune import distill_loss

    P = [[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.05, 0.05, 0.6, 0.3], [0.4, 0.3, 0.2, 0.1]]   # teacher
    Q = [[0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4], [0.3, 0.3, 0.2, 0.2], [0.1, 0.1, 0.1, 0.7]]   # student
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    valid = [(0, 0), (0, 1), (1, 0), (1, 1)]

    def logits(rows):
        x = torch.full((2, 3, 4), 0.0)
        for i, (b, t) in enumerate(valid):
            x[b, t] = torch.tensor(rows[i]).log() + 2.0 * i - 1.0                   # any shift per token
        return x

    def kl(a, b):
        return sum(pa * math.log(pa / pb) for pa, pb in zip(a, b))

    s, t = logits(Q), logits(P)
    expect = sum(kl(p, q) for p, q in zip(P, Q)) / 4
    reverse = sum(kl(q, p) for p, q in zip(P, Q)) / 4
    assert abs(expect - reverse) > 0.05
    batch = {"attention_mask": mask}
    got = distill_loss(SimpleNamespace(logits=s), SimpleNamespace(logits=t), batch)
    assert got.dim() == 0 and float(got) == pytest.approx(expect, rel=1e-5)
    g = torch.Generator().manual_seed(1)
    s2, t2 = s.clone(), t.clone()
    s2[:, 2], t2[:, 2] = 30 * torch.randn(2, 4, generator=g), 30 * torch.randn(2, 4, generator=g)
    assert float(distill_loss(SimpleNamespace(logits=s2), SimpleNamespace(logits=t2), batch)) == \
        pytest.approx(expect, rel=1e-5)


def test_distill_loss_of_one_logit_is_its_relative_squared_error():
    """A regression head or a reranker (num_labels = 1): the softmax over one logit is 1, so the KL was 0 whatever
    the student gave and fine-tuning learnt nothing from the task. One logit is distilled by its relative squared
    error, as hidden states are."""
    from types import SimpleNamespace

    from astra.finetune import distill_loss

    t = torch.tensor([[2.0], [-1.0], [0.5]])
    s = torch.tensor([[1.5], [-1.0], [1.5]])
    got = distill_loss(SimpleNamespace(logits=s), SimpleNamespace(logits=t), {})
    assert float(got) == pytest.approx((0.25 + 0 + 1.0) / (4 + 1 + 0.25), rel=1e-6)
    assert float(distill_loss(SimpleNamespace(logits=t), SimpleNamespace(logits=t), {})) == 0.0


def test_naq_noise_only_in_training_and_scaled_by_residual():
    model = tiny_model("vit")
    inputs = tiny_inputs("vit")
    cb = astra.calibrate(model, [inputs], groups=4, codebook_size=16, iters=3)
    clean, _ = _train_sim(model, inputs, cb, 2)
    g = torch.Generator().manual_seed(0)
    noisy, rt = _train_sim(model, inputs, cb, 2, naq=1.0, generator=g)
    assert (main_output(noisy) - main_output(clean)).abs().max() > 1e-3
    big, _ = _train_sim(model, inputs, cb, 2, naq=4.0, generator=torch.Generator().manual_seed(0))
    d1 = (main_output(noisy) - main_output(clean)).norm()
    d4 = (main_output(big) - main_output(clean)).norm()
    assert d4 > 2 * d1
    # after fine-tuning with NAQ, inference (astra.simulate) is noise-free: repeatable and equal to the
    # training path without noise
    res = astra.finetune(model, cb, [inputs], world_size=2, steps=2, naq=1.0, progress=False)
    a = main_output(astra.simulate(model, inputs, world_size=2, codebooks=res.codebooks))
    b = main_output(astra.simulate(model, inputs, world_size=2, codebooks=res.codebooks))
    c, _ = _train_sim(model, inputs, res.codebooks, 2)
    assert torch.equal(a, b)
    torch.testing.assert_close(main_output(c).detach(), a, rtol=1e-4, atol=1e-5)


def test_naq_default_is_off_for_codebooks_and_on_for_all():
    from astra.finetune import NAQ_DEFAULT

    assert NAQ_DEFAULT == {"codebooks": 0.0, "all": 1.0}
    model = tiny_model("vit")
    inputs = tiny_inputs("vit")
    cb = astra.calibrate(model, [inputs], groups=4, codebook_size=16, iters=3)

    def trained(train, **kw):
        m = copy.deepcopy(model)
        res = astra.finetune(m, cb, [inputs], world_size=2, steps=3, train=train, lr=1e-2, progress=False, **kw)
        return torch.cat([t.reshape(-1) for t in res.codebooks.tensors]), res.losses

    for train, on in (("codebooks", False), ("all", True)):
        dflt, dl = trained(train)
        off, ol = trained(train, naq=0.0)
        one, nl = trained(train, naq=1.0)
        assert not torch.equal(off, one)             # the noise changes what is learned ...
        assert torch.equal(dflt, one if on else off) and dl == (nl if on else ol)    # ... and the default picks


def _data(family, n=3, **kw):
    return [tiny_inputs(family, batch=2, seq=12, seed=s, **kw) for s in range(n)]


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_finetune_codebooks_lowers_distillation_error_and_leaves_model_untouched(family):
    model = tiny_model(family)
    data = _data(family, padded=True)
    cb = astra.calibrate(model, data, groups=4, codebook_size=16, iters=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = astra.finetune(model, cb, data, world_size=[2, 3], steps=12, lr=1e-2, seed=0, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())          # flags restored
    assert sorted(set(res.world_sizes)) == [2, 3] and len(res.losses) == 12
    again = astra.finetune(model, cb, data, world_size=[2, 3], steps=12, lr=1e-2, seed=0, progress=False)
    assert again.losses == res.losses and all(torch.equal(a, b) for a, b in zip(res.codebooks, again.codebooks))

    def err(c):
        from astra.finetune import distill_loss
        tot = 0.0
        for b in data:
            with torch.no_grad():
                ref = model(**b)
            tot += float(distill_loss(astra.simulate(model, b, world_size=3, codebooks=c), ref, b))
        return tot
    assert err(res.codebooks) < 0.9 * err(cb), (err(res.codebooks), err(cb))


def test_default_codebook_lr_follows_each_layers_scale():
    from astra.finetune import LR_RELATIVE, codebook_lrs

    model = tiny_model("gpt2", num_hidden_layers=3)
    data = _data("gpt2")
    cb = astra.calibrate(model, data, groups=4, codebook_size=16, iters=3)
    scaled = cb.with_tensors([t * (l + 1) for l, t in enumerate(cb.tensors)])     # layer l's codewords x (l + 1)
    lrs = codebook_lrs(scaled, None)
    assert lrs == pytest.approx([LR_RELATIVE * float(t.abs().mean()) for t in scaled.tensors], rel=1e-6)
    assert codebook_lrs(scaled, 3e-3) == [3e-3] * cb.num_layers
    # Adam's first step moves every entry with a gradient by its group's lr: here each layer's own
    res = astra.finetune(model, scaled, data, world_size=2, steps=1, progress=False)
    assert torch.equal(scaled.tensors[0], res.codebooks.tensors[0])       # layer 0 is computed: not trained
    for l, (a, b) in list(enumerate(zip(scaled.tensors, res.codebooks.tensors)))[1:]:
        moved = (b - a).abs()
        assert float(moved.max()) == pytest.approx(lrs[l], rel=1e-3), l
        assert float(moved[moved > 0].median()) == pytest.approx(lrs[l], rel=1e-2), l     # (tiny gradients: less)
    for bad in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr must be a finite number > 0"):
            astra.finetune(model, cb, data, world_size=2, lr=bad, progress=False)


def test_finetune_all_round_trips_through_save_and_load(tmp_path):
    import transformers as tf

    model = tiny_model("gpt2")
    data = _data("gpt2")
    cb = astra.calibrate(model, data, groups=4, codebook_size=16, iters=3)
    w0 = model.transformer.h[0].attn.c_attn.weight.clone()
    res = astra.finetune(model, cb, data, world_size=2, train="all", steps=3, model_lr=1e-3, progress=False,
                         output_dir=str(tmp_path / "ft"))
    assert not torch.equal(w0, model.transformer.h[0].attn.c_attn.weight)     # the model trained
    loaded = tf.GPT2LMHeadModel.from_pretrained(tmp_path / "ft").eval()
    cb2 = astra.Codebooks.load(tmp_path / "ft" / "codebooks.safetensors", loaded)
    x = tiny_inputs("gpt2", seed=7)
    a = main_output(astra.simulate(model, x, world_size=2, codebooks=res.codebooks))
    b = main_output(astra.simulate(loaded, x, world_size=2, codebooks=cb2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_finetune_all_keeps_frozen_parameters_and_leaves_no_gradients():
    """train='all' set requires_grad on every parameter and trained what the caller had frozen (then marked it
    frozen again), and left a .grad on every parameter: a model-sized copy kept after the call."""
    model = tiny_model("gpt2")
    data = _data("gpt2")
    cb = astra.Codebooks.random(model, groups=4, codebook_size=16)
    model.transformer.wpe.weight.requires_grad_(False)
    wpe, h0 = model.transformer.wpe.weight.clone(), model.transformer.h[0].attn.c_attn.weight.clone()
    astra.finetune(model, cb, data, world_size=2, train="all", steps=2, model_lr=1e-3, progress=False)
    assert torch.equal(wpe, model.transformer.wpe.weight) and not model.transformer.wpe.weight.requires_grad
    assert not torch.equal(h0, model.transformer.h[0].attn.c_attn.weight)          # the rest trained
    assert all(p.grad is None for p in model.parameters())
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="every one has requires_grad=False"):
        astra.finetune(model, cb, data, world_size=2, train="all", steps=1, progress=False)


def test_finetune_bad_inputs():
    model = tiny_model("bert")
    data = _data("bert")
    cb = astra.Codebooks.random(model, groups=4, codebook_size=16)
    with pytest.raises(ValueError, match="empty"):
        astra.finetune(model, cb, [], world_size=2)
    for ws in (0, 1, [], [2, 0], "2", 2.0):
        with pytest.raises(ValueError, match="world_size"):
            astra.finetune(model, cb, data, world_size=ws)
    with pytest.raises(ValueError, match="need at least one per rank"):
        astra.finetune(model, cb, data, world_size=64, progress=False)          # 12 tokens, 64 ranks
    with pytest.raises(ValueError, match="train must be"):
        astra.finetune(model, cb, data, world_size=2, train="model")
    with pytest.raises(ValueError, match="naq"):
        astra.finetune(model, cb, data, world_size=2, naq=-1.0, progress=False)
    with pytest.raises(ValueError, match="model_type .vit., model is .bert."):
        astra.finetune(model, astra.Codebooks.random(tiny_model("vit"), groups=4, codebook_size=8), data,
                       world_size=2)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        astra.finetune(model, cb, data, world_size=2, progress=False,
                       loss=lambda out, ref, b: out.last_hidden_state.sum() * float("nan"))
    with pytest.raises(TypeError, match=r"data\[1\] must be a non-empty dict"):
        astra.finetune(model, cb, [data[0], {}], world_size=2)
    for bad in (lambda out, ref, b: out.last_hidden_state.pow(2).mean(-1), lambda out, ref, b: 0.5):
        with pytest.raises(ValueError, match="loss.out, ref, batch. must return a scalar float tensor"):
            astra.finetune(model, cb, data, world_size=2, progress=False, loss=bad)   # was: a bare RuntimeError
    for bad in (None, 3, data[0]["input_ids"]):                        # None: 'NoneType' object is not iterable
        with pytest.raises(TypeError, match="data must be a batch .a dict of model inputs. or an iterable"):
            astra.finetune(model, cb, bad, world_size=2, progress=False)
    pulled = []

    def endless():                                  # a stream: read for `steps` batches (list() never returned)
        while True:
            pulled.append(1)
            yield data[len(pulled) % len(data)]

    assert len(astra.finetune(model, cb, endless(), world_size=2, progress=False, steps=3).losses) == 3
    assert len(pulled) == 3
    one = astra.finetune(model, cb, data, world_size=2, progress=False, steps=1,       # [1]: backward takes it
                         loss=lambda out, ref, b: out.last_hidden_state.pow(2).mean().reshape(1))
    assert len(one.losses) == 1



def test_finetune_refuses_bad_options_and_batches_before_touching_the_model(monkeypatch):
    """A negative clip or model_lr trained the wrong way without an error; a bad seed raised after the model was put
    in eval mode and frozen (and left so); a bad batch was found only at its step, after the steps before it."""
    F = sys.modules["astra.finetune"]
    monkeypatch.setattr(F, "_step", lambda *a, **k: pytest.fail("training started"))
    model = tiny_model("bert").train()
    data = _data("bert")
    cb = astra.Codebooks.random(model, groups=4, codebook_size=16)
    bad = [(dict(clip=-1.0), "clip must be a finite number >= 0"), (dict(clip=float("nan")), "clip"),
           (dict(train="all", model_lr=-1e-3), "model_lr must be a finite number > 0"), (dict(lr=0.0), "lr must"),
           (dict(lr="0.1"), "lr must"), (dict(naq="x"), "naq must"), (dict(beta=None), "beta must"),
           (dict(seed="a"), "seed must be an int"), (dict(seed=1.5), "seed must"), (dict(steps=2.9), "steps must"),
           (dict(epochs=1.7), "epochs must"), (dict(steps=0), "steps must"), (dict(loss=5), "loss must be a callable")]
    for kw, msg in bad:
        with pytest.raises((ValueError, TypeError), match=msg):
            astra.finetune(model, cb, data, world_size=2, progress=False, **kw)
        assert model.training and all(p.requires_grad for p in model.parameters()), kw
    one_d = dict(data[1], input_ids=data[1]["input_ids"][0])
    for batch, msg in (({"ids": data[0]["input_ids"]}, r"data\[1\]: "), (one_d, r"data\[1\]: .*2 dimensions"),
                       (dict(data[1], input_ids=data[1]["input_ids"] + 10_000), r"data\[1\]: .*valid ids are")):
        with pytest.raises((astra.InvalidInputError, astra.UnsupportedModelError), match=msg):
            astra.finetune(model, cb, [data[0], batch], world_size=2, progress=False)
    with pytest.raises(astra.InvalidInputError, match=r"data\[0\]: .*need at least one per rank"):
        astra.finetune(model, cb, data, world_size=[2, 32], progress=False)      # 12 tokens: 32 was met at a step


def test_a_bad_output_dir_is_refused_before_training(tmp_path, monkeypatch):
    """It was found only when saving, after the whole training, whose result was then lost."""
    F = sys.modules["astra.finetune"]          # astra.finetune is the function; its module holds _step
    model = tiny_model("bert")
    cb = astra.Codebooks.random(model, groups=4, codebook_size=16)
    monkeypatch.setattr(F, "_step", lambda *a, **k: pytest.fail("training started"))
    afile = tmp_path / "a_file"
    afile.write_text("x")
    for bad in (afile, afile / "sub"):
        with pytest.raises(ValueError, match="output_dir .* cannot be made"):
            astra.finetune(model, cb, _data("bert"), world_size=2, progress=False, output_dir=str(bad))


def test_progress_bar_shows_running_loss(capsys):
    model = tiny_model("vit")
    data = _data("vit")
    cb = astra.calibrate(model, data, groups=4, codebook_size=16, iters=2)
    res = astra.finetune(model, cb, data, world_size=2, steps=2, progress=True)
    err = capsys.readouterr().err
    assert "astra.finetune[vit, codebooks]" in err and f"loss={sum(res.losses) / 2:.4g}" in err


def test_single_vit_class_token_ablation_differs_from_distributed():
    model = tiny_model("vit")
    x = tiny_inputs("vit")
    cb = astra.calibrate(model, [x], groups=4, codebook_size=16, iters=2)
    dct, _ = _train_sim(model, x, cb, 4)
    single, _ = _train_sim(model, x, cb, 4, class_token="none")
    full, _ = _train_sim(model, x, None, 4, class_token="none")      # full precision: equals the model
    with torch.no_grad():
        torch.testing.assert_close(main_output(full), main_output(model(**x)), rtol=1e-4, atol=1e-5)
    assert (main_output(single) - main_output(dct)).abs().max() > 1e-4
    with pytest.raises(Exception, match="distributed class tokens"):
        astra.simulate(model, x, world_size=4, codebooks=cb, class_token="none")   # inference refuses it
    # finetune itself refused it (its batch check applied the inference rule)
    res = astra.finetune(model, cb, [x], world_size=4, steps=1, class_token="none", progress=False)
    assert len(res.losses) == 1 and res.losses[0] > 0


def test_codebooks_calibrated_under_inference_mode_fine_tune(tmp_path):
    """Their transforms and predictors stayed inference tensors ("cannot be saved for backward"), and the encoder's
    workspace, made under inference_mode, refused every later write outside it; PCA bases could not be saved
    (their inverses are transposed views), so finetune(output_dir=) lost the finished training at the save."""
    model = tiny_model("bert")
    xs = [tiny_inputs("bert", seed=s) for s in (1, 2)]
    for kw in ({"basis": "pca"}, {"predict": True}, {"basis": "none", "backend": "torch"}):
        with torch.inference_mode():
            cb = astra.calibrate(model, xs, groups=16, codebook_size=8, iters=2, **kw)
        res = astra.finetune(model, cb, xs, world_size=2, steps=1, progress=False, output_dir=str(tmp_path / "o"))
        back = astra.Codebooks.load(tmp_path / "o" / "codebooks.safetensors", model)
        assert all(torch.equal(a, b) for a, b in zip(back, res.codebooks)), kw
        if res.codebooks.transformed:
            assert all(torch.equal(a, b) for a, b in zip(back.inverses, res.codebooks.inverses))


def _modes(model):
    return {name: m.training for name, m in model.named_modules()}


def test_finetune_gives_every_submodule_back_its_mode_and_every_parameter_its_flag():
    """Only the top-level mode was kept: a layer the user had left in eval mode came back in train mode."""
    model = tiny_model("bert", num_hidden_layers=3)
    data = _data("bert", n=2, padded=True)
    cb = astra.Codebooks.random(model, groups=4, codebook_size=8)
    model.train()
    model.encoder.layer[0].eval()
    model.embeddings.word_embeddings.weight.requires_grad_(False)
    modes = _modes(model)
    assert modes["encoder.layer.0.attention.self"] is False and modes["encoder.layer.1"] is True
    seen = []
    model.encoder.layer[1].register_forward_pre_hook(lambda m, a: seen.append(m.training))
    for train in ("codebooks", "all"):
        astra.finetune(model, cb, data, world_size=2, train=train, steps=1, progress=False)
        assert _modes(model) == modes, train
        assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["embeddings.word_embeddings.weight"]
    assert seen and not any(seen)                                   # trained in eval mode (no dropout)


def test_finetune_that_fails_in_its_setup_leaves_the_model_as_it_was(monkeypatch):
    """The copy of the teacher (train="all") and the optimizer were made before the try: a model that cannot be
    deep-copied raised TypeError with the model left in eval mode; a failure after the flags were set left them."""
    import threading

    model = tiny_model("bert")
    data = _data("bert", n=2)
    cb = astra.Codebooks.random(model, groups=4, codebook_size=8)
    model.train()
    model.encoder.layer[0].eval()
    model.pooler.requires_grad_(False)
    modes = _modes(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.encoder.lock = threading.Lock()
    with pytest.raises(TypeError, match="pickle"):
        astra.finetune(model, cb, data, world_size=2, train="all", progress=False)
    assert _modes(model) == modes and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    del model.encoder.lock

    def no_optimizer(*a, **k):
        raise RuntimeError("no optimizer")

    monkeypatch.setattr(torch.optim, "Adam", no_optimizer)          # after requires_grad_ set every flag
    for train in ("codebooks", "all"):
        with pytest.raises(RuntimeError, match="no optimizer"):
            astra.finetune(model, cb, data, world_size=2, train=train, progress=False)
        assert _modes(model) == modes and {n: p.requires_grad for n, p in model.named_parameters()} == flags, train


def test_finetune_takes_a_tokenizers_batch_encoding():
    """A tokenizer's output (``BatchEncoding``: a Mapping, no dict) was iterated as its keys ("data[0] must be a
    non-empty dict of model inputs, got str") or refused inside a list, while astra.simulate takes it."""
    from transformers import BatchEncoding

    model = tiny_model("bert")
    x = tiny_inputs("bert", batch=2, seq=12, padded=True)
    cb = astra.Codebooks.random(model, groups=4, codebook_size=8)
    ref = astra.finetune(model, cb, [x], world_size=2, steps=2, progress=False)
    for data in (BatchEncoding(x), [BatchEncoding(x)]):
        res = astra.finetune(model, cb, data, world_size=2, steps=2, progress=False)
        assert res.losses == ref.losses and len(res.losses) == 2
        assert all(torch.equal(a, b) for a, b in zip(res.codebooks.tensors, ref.codebooks.tensors))
