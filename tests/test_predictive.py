"""Predictive codebooks: each layer quantizes the residual of a prediction from the token's embedding output and
its previous layer's reconstruction (astra.Codebooks.predictive, astra.calibrate(predict=True)). The distributed
runtime's equality with simulate is in test_runtime_dist.py and test_runtime_generation.py."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_runtime_support import layer_0_exchanged, main_output, tiny_codebooks, tiny_inputs, tiny_model

import astra
from astra.calibrate import collect_hidden_states, fit_predictor
from astra.training import TrainSimRuntime


def test_fit_predictor_recovers_an_affine_map_and_leaves_missing_inputs_zero():
    g = torch.Generator().manual_seed(0)
    D, N = 8, 400
    e, prev = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    A, B, c = torch.randn(D, D, generator=g), torch.randn(D, D, generator=g), torch.randn(D, generator=g)
    W, b = fit_predictor(e, prev, e @ A + prev @ B + c)
    torch.testing.assert_close(W, torch.cat([A, B]).double(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(b, c.double(), atol=2e-2, rtol=2e-2)
    W, b = fit_predictor(None, prev, prev @ B + c)
    assert W[:D].abs().max() == 0 and (W[D:] - B.double()).abs().max() < 2e-2
    h = torch.randn(N, D, generator=g) + 3.0
    W, b = fit_predictor(None, None, h)
    assert W.abs().max() == 0
    torch.testing.assert_close(b, h.double().mean(0))



def test_collect_hidden_states_keeps_at_most_max_tokens():
    """Mutation testing: no test gave ``max_tokens`` fewer tokens than a sample holds; without the final cut every
    layer (and the embedding outputs) kept the whole sample that crossed the cap (64 tokens for a cap of 10), and
    calibration fitted and paid for more tokens than asked."""
    model = tiny_model("bert")
    samples = [tiny_inputs("bert", seq=16, batch=4, seed=s) for s in (1, 2)]
    hs, emb = collect_hidden_states(model, samples, max_tokens=10, embeddings=True)
    full, full_emb = collect_hidden_states(model, samples[:1], embeddings=True)
    assert [h.shape[0] for h in hs] == [10] * len(full) and emb.shape[0] == 10
    assert all(torch.equal(h, f[:10]) for h, f in zip(hs, full)) and torch.equal(emb, full_emb[:10])

@pytest.fixture(scope="module")
def bert():
    return tiny_model("bert")


@pytest.fixture(scope="module")
def predictive(bert):
    return tiny_codebooks(bert, "bert", 4, predict=True)


def test_calibrated_predictors_shapes_and_layer_0_is_a_placeholder(bert, predictive):
    D = bert.config.hidden_size
    assert predictive.predictive and "predictive" in repr(predictive)
    assert [tuple(w.shape) for w in predictive.predictors] == [(2 * D, D)] * bert.config.num_hidden_layers
    assert [tuple(b.shape) for b in predictive.predictor_biases] == [(D,)] * bert.config.num_hidden_layers
    # every rank computes layer 0: nothing fitted there; layer 1 predicts from the embedding output and the exact h_0
    assert predictive.placeholder_layers == (0,)
    assert predictive.predictors[0].abs().max() == 0 and predictive.predictor_biases[0].abs().max() == 0
    assert predictive[0].abs().max() == 0 and torch.equal(predictive.transforms[0], torch.eye(D))
    assert predictive.predictors[1][:D].abs().max() > 0 and predictive.predictors[1][D:].abs().max() > 0


def test_an_exchanged_layer_0_is_predicted_from_the_embedding_output(bert):
    """Where layer 0 is exchanged (a family without ``first_input``), BERT's layer 0 quantizes its embedding output:
    the fitted prediction is (nearly) exact, the residual tiny."""
    D = bert.config.hidden_size
    with layer_0_exchanged(bert):
        cb = tiny_codebooks(bert, "bert", 4, predict=True)
    assert cb.placeholder_layers == ()
    hs, emb = collect_hidden_states(bert, [tiny_inputs("bert", seq=16, batch=4, seed=11)], embeddings=True)
    assert torch.equal(hs[0], emb)
    W, b = cb.predictors[0], cb.predictor_biases[0]
    assert W[D:].abs().max() == 0                      # layer 0 has no previous layer
    resid = hs[0] - (emb @ W[:D] + b)
    assert float(resid.pow(2).mean()) < 1e-2 * float(hs[0].var(0).mean())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoders_embed_the_whole_sequence_as_their_forward_does(family):
    """A decoder's ranks embed every token themselves (FamilyAdapter.embed), exactly as the forward's first layer
    sees it: with default and given position ids, from ids or given embeddings and, for GPT-2, token types."""
    from astra.models import family_of

    model = tiny_model(family, head=False)
    fam = family_of(model)
    inputs = tiny_inputs(family, batch=2, seq=9, padded=True, seed=3)
    pos = (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    embeds = 1.5 * model.get_input_embeddings()(inputs["input_ids"]).detach()
    cases = [(inputs, torch.arange(9).unsqueeze(0)), (dict(inputs, position_ids=pos), pos),
             ({"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}, torch.arange(9).unsqueeze(0))]
    if family == "gpt2":
        cases.append((dict(inputs, token_type_ids=inputs["input_ids"] % 3), torch.arange(9).unsqueeze(0)))
    for given, p in cases:
        with torch.no_grad():
            want = model(**given, output_hidden_states=True).hidden_states[0]
            got = fam.embed(given, p)
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoders_predict_layer_0_from_their_embedding(family):
    """Predictive decoder codebooks read the embedding output too: layer 0 (its normalized embedding) is
    predicted far better than by the mean alone, which is all a decoder had without it."""
    model = tiny_model(family, head=False)
    D = model.config.hidden_size
    built_in = tiny_codebooks(model, family, 4, predict=True)      # layer 0 computed: layer 1 reads e and h_0
    assert built_in.placeholder_layers == (0,) and built_in.predictors[0].abs().max() == 0
    assert built_in.predictors[1][:D].abs().max() > 0 and built_in.predictors[1][D:].abs().max() > 0
    with layer_0_exchanged(model):
        cb = tiny_codebooks(model, family, 4, predict=True)
    assert cb.predictors[0][:D].abs().max() > 0 and cb.predictors[0][D:].abs().max() == 0
    assert cb.predictors[1][D:].abs().max() > 0
    hs, emb = collect_hidden_states(model, [tiny_inputs(family, seq=16, batch=4, seed=21)], embeddings=True)
    W, b = cb.predictors[0], cb.predictor_biases[0]
    left = float((hs[0] - (emb @ W[:D] + b)).pow(2).sum()) / float((hs[0] - hs[0].mean(0)).pow(2).sum())
    print(f"{family}: layer 0's prediction leaves {left:.4f} of the held-out tokens' variance")
    assert left < 0.05


def test_save_load_round_trip_and_corruption(tmp_path, bert, predictive):
    path = tmp_path / "cb.safetensors"
    predictive.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["version"] == "6" and meta["kinds"] == "layer,transform,inverse,predictor,predictor_bias"
    assert meta["placeholder_layers"] == "0"
    cb = astra.Codebooks.load(path, bert)
    assert cb.checksum() == predictive.checksum()
    for a, b in zip(cb.predictors + cb.predictor_biases, predictive.predictors + predictive.predictor_biases):
        assert torch.equal(a, b)
    x = tiny_inputs("bert", seed=5)
    torch.testing.assert_close(main_output(astra.simulate(bert, x, world_size=2, codebooks=cb)),
                               main_output(astra.simulate(bert, x, world_size=2, codebooks=predictive)), rtol=0, atol=0)
    tensors["predictor.1"] = tensors["predictor.1"] + 1e-3
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="predictor 1 fails its checksum"):
        astra.Codebooks.load(tmp_path / "bad.safetensors")
    del tensors["predictor_bias.0"]
    save_file(tensors, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="expected tensors"):
        astra.Codebooks.load(tmp_path / "missing.safetensors")


def test_predictors_are_validated_and_kept(predictive):
    kw = dict(model_type="bert", hidden_size=predictive.hidden_size)
    W, b = predictive.predictors, predictive.predictor_biases
    with pytest.raises(ValueError, match="give both or neither"):
        astra.Codebooks(predictive.tensors, predictors=W, **kw)
    with pytest.raises(ValueError, match=r"predictor of layer 0 has shape \(64, 64\); expected \[128, 64\]"):
        astra.Codebooks(predictive.tensors, predictors=[w[:64] for w in W], predictor_biases=b, **kw)
    with pytest.raises(ValueError, match="1 predictor biases for 2 codebook layers"):
        astra.Codebooks(predictive.tensors, predictors=W, predictor_biases=b[:1], **kw)
    nan = [w.clone() for w in W]
    nan[1][3, 4] = float("nan")
    with pytest.raises(ValueError, match="predictor of layer 1"):
        astra.Codebooks(predictive.tensors, predictors=nan, predictor_biases=b, **kw)
    moved = predictive.to(torch.float64)
    assert moved.predictive and moved.predictors[0].dtype == torch.float64
    assert predictive.with_tensors([t + 1 for t in predictive.tensors]).predictors is W


def test_calibrate_predict_rejects_world_size(bert):
    with pytest.raises(ValueError, match="predict=True .* does not take world_size"):
        astra.calibrate(bert, [tiny_inputs("bert")], groups=4, codebook_size=8, predict=True, world_size=2)


def _train_sim(model, inputs, cb, n):
    rt = TrainSimRuntime(model, cb, n)
    rt.install()
    try:
        return rt.run(inputs)[0], rt
    finally:
        rt.uninstall()


def test_training_path_equals_simulate_and_gradients_flow_through_the_predictions():
    bert = tiny_model("bert", num_hidden_layers=3)
    predictive = tiny_codebooks(bert, "bert", 4, predict=True)
    inputs = tiny_inputs("bert", padded=True)
    ref = main_output(astra.simulate(bert, inputs, world_size=3, codebooks=predictive))
    params = [torch.nn.Parameter(t.clone()) for t in predictive.tensors]
    out, rt = _train_sim(bert, inputs, predictive.with_tensors(params), 3)
    got = main_output(out)
    rows = inputs["attention_mask"].bool()
    torch.testing.assert_close(got.detach()[rows], ref[rows], rtol=1e-4, atol=1e-5)
    got[rows].pow(2).sum().backward()
    assert params[0].grad is None             # layer 0: every rank computes it, its codebook is not used
    for p in params[1:]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    # layer 2's prediction reads layer 1's reconstruction: layer 1's codebook also gets a gradient from it. Cut
    # the predictions' gradient and layer 1's codebook gradient changes.
    g1 = params[1].grad.clone()
    for p in params:
        p.grad = None
    rt2 = TrainSimRuntime(bert, predictive.with_tensors(params), 3)
    rt2.prediction = lambda layer, idx, prev, f=rt2.prediction: f(layer, idx, None if prev is None else prev.detach())
    rt2.install()
    try:
        main_output(rt2.run(inputs)[0])[rows].pow(2).sum().backward()
    finally:
        rt2.uninstall()
    assert (g1 - params[1].grad).norm() > 1e-3 * g1.norm()


def test_predictive_codebooks_finetune(bert, predictive):
    data = [tiny_inputs("bert", seed=s) for s in (31, 32)]
    res = astra.finetune(bert, predictive, data, world_size=2, steps=3, progress=False)
    assert res.codebooks.predictive and res.codebooks.predictors is predictive.predictors
    assert any(not torch.equal(a, b) for a, b in zip(res.codebooks.tensors, predictive.tensors))


def test_with_tensors_keeps_one_codebook_per_predictor(bert):
    """Untransformed predictive codebooks took a 1-layer replacement beside their per-layer predictors, and saved a
    file that load then refused."""
    cb = tiny_codebooks(bert, "bert", 4, predict=True, basis="none")
    assert cb.predictive and not cb.transformed
    with pytest.raises(ValueError, match="codebook layers for 2 predictors"):
        cb.with_tensors(cb.tensors[:1])
    assert cb.with_tensors(list(cb.tensors)).num_layers == cb.num_layers


def _exact_predictive_codebooks(model, inputs, seed=5):
    """Predictive codebooks whose layer-l codebook holds exactly the residuals ``h_l - ([e, h_(l-1)] @ W_l + b_l)``
    of every token of ``inputs`` (random predictors; G = 1, untransformed; layer 0 a placeholder)."""
    from astra.models import family_of

    fam = family_of(model)
    g = torch.Generator().manual_seed(seed)
    D, L = fam.hidden_size, fam.num_layers
    hs, emb = collect_hidden_states(model, [inputs], embeddings=True)     # [N, D] per layer, and the embeddings
    W = [torch.zeros(2 * D, D)] + [0.3 * torch.randn(2 * D, D, generator=g) / D ** 0.5 for _ in range(1, L)]
    b = [torch.zeros(D)] + [torch.randn(D, generator=g) for _ in range(1, L)]
    tensors = [torch.zeros(1, hs[0].shape[0], D)]
    for l in range(1, L):
        pred = emb @ W[l][:D] + hs[l - 1] @ W[l][D:] + b[l]
        tensors.append((hs[l] - pred).unsqueeze(0))
    return astra.Codebooks(tensors, model_type=fam.name, hidden_size=D, predictors=W, predictor_biases=b,
                           placeholder_layers=(0,))


def test_codebooks_holding_every_residual_reproduce_the_model():
    """With predictive codebooks that hold each token's residual of the prediction exactly, every reconstruction is
    exact, so simulate equals the model (3 ranks). It pins down what a rank sends: the code of ``h - pred`` (not
    ``h + pred``), where ``pred`` reads the token's embedding output and the previous layer's reconstruction (the
    sender's own, ``SimRuntime.predicted``), and ``decode + pred``. The other predictive tests compare the runtimes
    with each other, which share those steps, so dropping either prediction input, or the sign, went unnoticed."""
    bert = tiny_model("bert", num_hidden_layers=3)
    inputs = tiny_inputs("bert", batch=2, seq=9, seed=4)
    cb = _exact_predictive_codebooks(bert, inputs)
    with torch.no_grad():
        want = bert(**inputs).last_hidden_state
    got = astra.simulate(bert, inputs, world_size=3, codebooks=cb).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the codebooks do matter: residuals off by 0.1 move the output
    shifted = cb.with_tensors([cb.tensors[0]] + [t + 0.1 for t in cb.tensors[1:]])
    off = astra.simulate(bert, inputs, world_size=3, codebooks=shifted).last_hidden_state
    assert float((off - want).abs().max()) > 2e-3
