"""The family registry (astra.models): every registered family and head kind resolves, equals the unmodified
model under full-precision astra.simulate, runs ASTRA; inputs a model does not take are dropped; unknown
models, heads and configurations are refused naming what is supported; users register their own family."""
import pytest
import torch
from test_runtime_support import FAMILIES, PAD, layer_0_exchanged, main_output, max_diff, tiny_inputs, tiny_model

import astra
from astra.models import FamilyAdapter, family_of, linear_kv, register_family, unregister_family

TOL = 1e-4
HEADS = {   # family -> head kinds tested (None: the base model)
    "gpt2": (None, "causal_lm", "sequence_classification", "token_classification", "question_answering"),
    "llama": (None, "causal_lm", "sequence_classification", "token_classification"),
    "mistral": (None, "causal_lm", "sequence_classification", "token_classification"),
    "qwen2": (None, "causal_lm", "sequence_classification", "token_classification"),
    "qwen3": (None, "causal_lm", "sequence_classification", "token_classification", "question_answering"),
    "bert": (None, "sequence_classification", "token_classification", "masked_lm", "question_answering"),
    "roberta": (None, "sequence_classification", "token_classification", "masked_lm"),
    "vit": (None, "image_classification"),
}
CASES = [(f, h) for f in FAMILIES for h in HEADS[f]]


def _worst(ref, out, inputs):
    """Largest difference over every tensor field (padding positions excluded)."""
    worst = 0.0
    for key, r in ref.items():
        if not isinstance(r, torch.Tensor):
            continue
        assert out[key] is not None and out[key].shape == r.shape, key
        worst = max(worst, max_diff(out[key], r, inputs))
    return worst


def test_every_family_and_head_resolves():
    assert sorted(HEADS) == sorted(FAMILIES)
    for family, head in CASES:
        fam = family_of(tiny_model(family, head=head if head else False))
        assert (fam.name, fam.head, fam.num_layers) == (family, head, 2)
        assert fam.decoder == (family not in ("bert", "roberta", "vit"))
        assert fam.rope == (family in ("llama", "mistral", "qwen2", "qwen3"))
        assert fam.pooling == {"sequence_classification": "class_token" if not fam.decoder else "last_token",
                               "image_classification": "class_token"}.get(head, fam.pooling)
    assert family_of(tiny_model("qwen3")).head_dim == 32          # Qwen3: head_dim apart from hidden / heads


@pytest.mark.parametrize("family", FAMILIES)
def test_full_precision_simulate_equals_model_every_head(family):
    inputs = tiny_inputs(family, seq=11, padded=family != "vit")    # T = 11 (ViT 17): not divisible by 2 or 3
    modes = ["auto", "distributed"] if family in ("bert", "roberta") else ["auto"]
    for head in HEADS[family]:
        model = tiny_model(family, head=head if head else False)
        with torch.no_grad():
            ref = model(**inputs)
        for n in (2, 3):
            for mode in modes:
                out = astra.simulate(model, inputs, world_size=n, class_token=mode)
                assert type(out) is type(ref)
                assert _worst(ref, out, inputs) < TOL, (family, head, n, mode)


@pytest.mark.parametrize("family", FAMILIES)
def test_astra_runs_every_head(family):
    """With codebooks: finite outputs of the model's type; a causal decoder's first rank attends to its own
    tokens only, so its outputs are exact while the last rank's are not."""
    inputs = tiny_inputs(family, seq=12)
    for head in HEADS[family]:
        model = tiny_model(family, head=head if head else False)
        cb = astra.Codebooks.random(model, groups=2, codebook_size=4, seed=3)
        with torch.no_grad():
            ref = model(**inputs)
        out = astra.simulate(model, inputs, world_size=2, codebooks=cb)
        assert type(out) is type(ref)
        key = next(k for k in ("logits", "start_logits", "last_hidden_state") if k in ref)
        assert torch.isfinite(out[key]).all() and out[key].shape == ref[key].shape
        d = (out[key] - ref[key]).abs()
        if family not in ("bert", "roberta", "vit") and d.dim() == 3:
            assert float(d[:, :6].max()) < 1e-5 and float(d[:, 6:].max()) > 1e-4, (family, head)
        else:
            assert float(d.max()) > 1e-4, (family, head)      # quantized non-local tokens change the result


def test_roberta_padding_offset_positions_stay_global():
    """RoBERTa's position ids count non-padding tokens from pad_token_id + 1: with left padding every rank's
    positions depend on the tokens before it."""
    model = tiny_model("roberta", head="token_classification")
    inputs = tiny_inputs("roberta", seq=12)
    inputs["input_ids"][0, :4] = PAD["roberta"]
    inputs["attention_mask"] = (inputs["input_ids"] != PAD["roberta"]).long()
    with torch.no_grad():
        ref = model(**inputs)
    for n in (2, 3, 4):
        assert _worst(ref, astra.simulate(model, inputs, world_size=n), inputs) < TOL


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_position_ids_that_transformers_reads_as_packed_sequences(family):
    """With no attention_mask, transformers masks a bidirectional model block-diagonally where positions do not step
    by 1 (packed sequences); astra's attention has no such mask and differed by 1.7e-2 without a word: refused. A
    causal model packs too when its forward has no KV cache (use_cache=False in the call or on the config: GPT-2
    differed by 0.27), and ignores packing with one, where astra equals it; with an attention_mask, or positions that
    step by 1 from any offset, both run and equal HF."""
    model = tiny_model(family)
    inputs = tiny_inputs(family, seq=10)
    inputs.pop("attention_mask", None)
    packed = dict(inputs, position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]))
    with torch.no_grad():
        ref = model(**packed)
    if family == "bert":
        with pytest.raises(astra.InvalidInputError, match="step from 4 to 0 at token 5 .*packed sequences"):
            astra.simulate(model, packed, world_size=2)
        with torch.no_grad():
            unpacked = model(**dict(packed, position_ids=packed["position_ids"][:, 5:],
                                    input_ids=inputs["input_ids"][:, 5:]))
        assert float((ref.last_hidden_state[:, 5:] - unpacked.last_hidden_state).abs().max()) < TOL   # HF packed them
    else:
        assert _worst(ref, astra.simulate(model, packed, world_size=2), packed) < TOL
        with torch.no_grad():
            assert float((model(**packed, use_cache=False).logits - ref.logits).abs().max()) > 0.01  # HF packed them
        with pytest.raises(astra.InvalidInputError, match="packed sequences.*or use_cache=True"):
            astra.simulate(model, dict(packed, use_cache=False), world_size=2)
        model.config.use_cache = False
        with pytest.raises(astra.InvalidInputError, match="packed sequences"):
            astra.simulate(model, packed, world_size=2)
        assert _worst(ref, astra.simulate(model, dict(packed, use_cache=True), world_size=2), packed) < TOL
    for ok in (dict(inputs, position_ids=torch.arange(3, 13)[None]),
               dict(packed, attention_mask=torch.ones_like(inputs["input_ids"]))):
        with torch.no_grad():
            ref = model(**ok)
        assert _worst(ref, astra.simulate(model, ok, world_size=2), ok) < TOL


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_feed_forward_chunking_runs_on_any_chunk_length(family):
    """HF's chunk_size_feed_forward needs each forward's length to be a multiple of the chunk: a rank's chunk (or T +
    N - 1 tokens with distributed class tokens) failed where the model runs. astra turns chunking off while
    installed (the result is the same) and restores it."""
    model = tiny_model(family, chunk_size_feed_forward=4)
    inputs = tiny_inputs(family, seq=12)
    with torch.no_grad():
        ref = model(**inputs)
    for n, cls in ((2, "auto"), (3, "auto"), (2, "distributed")):
        assert _worst(ref, astra.simulate(model, inputs, world_size=n, class_token=cls), inputs) < TOL
    chunks = {m.chunk_size_feed_forward for m in model.modules() if hasattr(m, "chunk_size_feed_forward")}
    assert chunks == {4}


def _logits_off(model, inputs, world_size) -> float:
    """Largest |simulate - model| of the logits (full precision)."""
    with torch.no_grad():
        ref = model(**inputs).logits
    return float((astra.simulate(model, inputs, world_size=world_size).logits - ref).abs().max())


def test_sliding_window_is_refused_beyond_the_window():
    mistral = tiny_model("mistral", sliding_window=8)
    inputs = tiny_inputs("mistral", seq=11)
    with pytest.raises(astra.UnsupportedModelError, match="sliding window of 8"):
        astra.simulate(mistral, inputs, world_size=2)
    assert _logits_off(mistral, tiny_inputs("mistral", seq=8), 2) < TOL
    qwen = tiny_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0)
    with pytest.raises(astra.UnsupportedModelError, match="sliding-window attention"):
        astra.simulate(qwen, tiny_inputs("qwen2", seq=11), world_size=2)
    assert family_of(tiny_model("qwen2")).window() is None          # use_sliding_window=False: full attention
    # Mistral slides in every layer whatever layer_types says (transformers warns and reads sliding_window alone):
    # astra read layer_types as Qwen2's and computed full attention, 0.31 off the model
    listed = tiny_model("mistral", sliding_window=4, layer_types=["full_attention"] * 2)
    with pytest.raises(astra.UnsupportedModelError, match="sliding window of 4"):
        astra.simulate(listed, inputs, world_size=2)


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_length_dependent_rope_is_exact_within_its_original_length_and_refused_beyond(rope_type):
    """HF's dynamic and longrope rotary modules pick their frequencies from the largest position they are given:
    each rank's chunk got other frequencies than the whole sequence (simulate 3.7e-4 to 1e-2 off the model)."""
    rope = dict(rope_type=rope_type, factor=2.0, rope_theta=10000.0)
    if rope_type == "longrope":
        rope.update(short_factor=[1.0] * 8, long_factor=[2.0] * 8, original_max_position_embeddings=10)
    model = tiny_model("llama", max_position_embeddings=10 if rope_type == "dynamic" else 32, rope_parameters=rope,
                       hidden_size=64, num_attention_heads=4)
    assert family_of(model).rope_scaled_beyond() == (rope_type, 10)
    ok = tiny_inputs("llama", seq=10)
    assert _logits_off(model, ok, 3) < TOL
    with pytest.raises(astra.UnsupportedModelError, match=f"spans 11 positions, more than the 10 beyond which llama's "
                                                          f"'{rope_type}' rotary embedding changes its frequencies"):
        astra.simulate(model, tiny_inputs("llama", seq=11), world_size=3)
    assert family_of(tiny_model("llama")).rope_scaled_beyond() is None
    if rope_type == "dynamic":      # its length is max_position_embeddings, whatever else the parameters name
        rope = dict(rope, original_max_position_embeddings=10)
        longer = tiny_model("llama", max_position_embeddings=32, rope_parameters=rope, hidden_size=64,
                            num_attention_heads=4)
        assert family_of(longer).rope_scaled_beyond() == ("dynamic", 32)
        # after a longer sequence the module keeps scaled frequencies for a span of exactly its length (HF resets them
        # below it): a rank's chunk reset them, and simulate was 4e-4 off the model; refused, shorter spans exact
        with torch.no_grad():
            model(**tiny_inputs("llama", seq=14))
        assert family_of(model).rope_scaled_beyond() == ("dynamic", 9)
        with pytest.raises(astra.UnsupportedModelError, match="spans 10 positions, more than the 9"):
            astra.simulate(model, ok, world_size=3)
        assert _logits_off(model, tiny_inputs("llama", seq=9), 3) < TOL


@pytest.mark.parametrize("flag,value", [("output_hidden_states", True), ("output_attentions", True),
                                        ("return_dict", False)])
def test_output_flags_set_on_the_config_are_refused_like_the_call_flags(flag, value):
    """The call's flags were checked, the config's were not: hidden states in astra's internal layout (ViT: 18
    tokens for 17), empty attentions, and with return_dict=False a bare AttributeError on every rank."""
    for family in ("bert", "vit"):
        model = tiny_model(family)
        model.config._attn_implementation = "eager"       # HF refuses output_attentions with sdpa
        setattr(model.config, flag, value)
        with pytest.raises(astra.UnsupportedModelError, match="the model's config sets"):
            astra.simulate(model, tiny_inputs(family), world_size=2)
        setattr(model.config, flag, not value)
        assert astra.simulate(model, tiny_inputs(family), world_size=2) is not None


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")   # torch.compile's
def test_a_compiled_model_is_refused_naming_the_model_to_give():
    """torch.compile's wrapper was refused as "the head OptimizedModule on GPT2Model"."""
    model = tiny_model("gpt2")
    compiled = torch.compile(model)
    for call in (lambda: astra.simulate(compiled, tiny_inputs("gpt2", seq=6), world_size=2),
                 lambda: astra.parallelize(compiled)):
        with pytest.raises(astra.UnsupportedModelError, match=r"torch.compile'd model \(OptimizedModule of "
                                                              r"GPT2LMHeadModel\): give the model itself"):
            call()
    assert family_of(compiled._orig_mod).model is model


def test_inputs_the_model_does_not_take_are_dropped():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert", padded=True)
    ref = astra.simulate(model, inputs, world_size=2)
    out = astra.simulate(model, dict(inputs, modality="text", output_attentions=False), world_size=2)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    head = tiny_model("bert", head="sequence_classification")
    with pytest.raises(astra.UnsupportedModelError, match=r"\['labels'\]"):
        astra.simulate(head, dict(inputs, labels=torch.zeros(2, dtype=torch.long)), world_size=2)
    with pytest.raises(astra.UnsupportedModelError, match="output_hidden_states"):
        astra.simulate(model, dict(inputs, output_hidden_states=True), world_size=2)


def test_a_cache_given_under_any_name_is_refused():
    """transformers 5 calls the cache ``cache`` in forward's signature, yet ``past_key_values`` still reaches it
    through **kwargs: dropped as an unnamed key, astra computed without the cache the model used (a wrong answer)."""
    model = tiny_model("gpt2", head="causal_lm")
    ids = tiny_inputs("gpt2", seq=12)["input_ids"]
    with torch.no_grad():
        cache = model(input_ids=ids[:, :8], use_cache=True).past_key_values
        used = model(input_ids=ids[:, 8:], cache=cache).logits
        full = model(input_ids=ids).logits[:, 8:]
    assert float((used - full).abs().max()) < TOL                   # the model does use it
    for key in ("past_key_values", "cache"):
        with pytest.raises(astra.UnsupportedModelError, match=rf"\['{key}'\] .*change what is computed"):
            astra.simulate(model, {"input_ids": ids[:, 8:], key: cache}, world_size=2)


def test_unsupported_models_heads_and_lengths_are_named():
    import transformers as tf

    distil = tf.DistilBertModel(tf.DistilBertConfig(n_layers=1, dim=32, n_heads=2, hidden_dim=64, vocab_size=50))
    with pytest.raises(astra.UnsupportedModelError, match="bert, gpt2, llama, mistral, qwen2, qwen3, roberta, vit"):
        family_of(distil)
    double = tf.GPT2DoubleHeadsModel(tiny_model("gpt2").config)
    with pytest.raises(astra.UnsupportedModelError, match="head GPT2DoubleHeadsModel.*sequence_classification"):
        family_of(double)
    with pytest.raises(astra.UnsupportedModelError, match="configured as a decoder"):
        family_of(tiny_model("bert", head="causal_lm", is_decoder=True))
    with pytest.raises(astra.InvalidInputError, match="65 tokens; bert's position embeddings hold 64"):
        astra.simulate(tiny_model("bert"), tiny_inputs("bert", seq=65), world_size=2)
    with pytest.raises(astra.InvalidInputError, match="63 tokens; roberta's position embeddings hold 62"):
        astra.simulate(tiny_model("roberta"), tiny_inputs("roberta", seq=63), world_size=2)


def test_register_a_family():
    """DistilBERT is not built in: one adapter makes its base model and heads run (and it can be removed)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.DistilBertConfig(n_layers=2, dim=64, n_heads=4, hidden_dim=128, vocab_size=97, num_labels=3)
    model = tf.DistilBertForTokenClassification(cfg).eval()
    inputs = tiny_inputs("bert", padded=True)
    with pytest.raises(astra.UnsupportedModelError):
        family_of(model)
    register_family(FamilyAdapter("distilbert", decoder=False,
                                  attention=lambda b: [x.attention for x in b.transformer.layer],
                                  kv=linear_kv("k_lin", "v_lin"), embeddings=lambda b: b.embeddings,
                                  final=lambda b: b.transformer, class_token="optional"))
    try:
        assert family_of(model).head == "token_classification"
        with pytest.raises(ValueError, match="already registered"):
            register_family(FamilyAdapter("distilbert", True, lambda b: [], linear_kv("k", "v")))
        with torch.no_grad():
            ref = model(**inputs)
        for mode in ("auto", "distributed"):
            assert _worst(ref, astra.simulate(model, inputs, world_size=3, class_token=mode), inputs) < TOL
    finally:
        unregister_family("distilbert")
    with pytest.raises(astra.UnsupportedModelError):
        family_of(model)


def test_adapters_are_checked_and_a_failed_patch_leaves_nothing():
    """A bad adapter field (an int model_type, a str of inputs, rope on an encoder) was accepted and failed later with
    a bare TypeError / AttributeError; an adapter whose `final` picked a Parameter left the model half-patched (every
    plain call refused, unpatch found nothing); a partial rotary factor failed inside the forward."""
    import transformers as tf

    base = dict(decoder=False, attention=lambda b: [x.attention for x in b.transformer.layer],
                kv=linear_kv("k_lin", "v_lin"), embeddings=lambda b: b.embeddings, final=lambda b: b.transformer,
                class_token="optional")
    for bad, what in ((dict(base, model_type=5), "model_type must be a non-empty string"),
                      (dict(base, model_type="x", inputs="input_ids"), "inputs must be a set"),
                      (dict(base, model_type="x", decoder="no"), "decoder must be a bool"),
                      (dict(base, model_type="x", kv="k_lin"), "kv must be callable"),
                      (dict(base, model_type="x", rope=True), "rope=True is for decoders")):
        with pytest.raises(ValueError, match=what):
            FamilyAdapter(**bad)
    # what the ranks compare: swapped projections or a first_input on one rank only tell adapters apart
    one = FamilyAdapter("x", **base).describe()
    assert one == FamilyAdapter("x", **base).describe()
    assert one != FamilyAdapter("x", **dict(base, kv=linear_kv("v_lin", "k_lin"))).describe()
    assert one != FamilyAdapter("x", **dict(base, first_input=lambda b, e: e)).describe()
    torch.manual_seed(0)
    model = tf.DistilBertModel(tf.DistilBertConfig(n_layers=2, dim=64, n_heads=4, hidden_dim=128,
                                                   vocab_size=97)).eval()
    inputs = tiny_inputs("bert", padded=True)
    with torch.no_grad():
        ref = model(**inputs)
    register_family(FamilyAdapter("distilbert", **dict(base, final=lambda b: b.transformer.layer[-1].sa_layer_norm
                                                       .weight)))
    try:
        with pytest.raises(astra.UnsupportedModelError, match="adapter's final picks Parameter"):
            astra.simulate(model, inputs, world_size=2, class_token="distributed")
        with torch.no_grad():           # nothing was patched
            assert torch.equal(model(**inputs).last_hidden_state, ref.last_hidden_state)
    finally:
        unregister_family("distilbert")
    register_family(FamilyAdapter("distilbert", **dict(base, attention=lambda b: [b.transformer.layer[0].attention])))
    try:                # one layer's attention named of two: the other called astra's attention unregistered
        with pytest.raises(astra.AstraError, match="this DistilBertSelfAttention is not among the attention modules"):
            astra.simulate(model, inputs, world_size=2)
    finally:
        unregister_family("distilbert")
    phi = tf.PhiForCausalLM(tf.PhiConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                                         intermediate_size=128, vocab_size=97, partial_rotary_factor=0.5)).eval()
    register_family(FamilyAdapter("phi", True, lambda b: [x.self_attn for x in b.layers],
                                  linear_kv("k_proj", "v_proj"), rope=True))
    try:
        with pytest.raises(astra.UnsupportedModelError, match="rotates 8 of each head's 16 dims"):
            astra.simulate(phi, tiny_inputs("llama"), world_size=2)
    finally:
        unregister_family("phi")


def test_pooled_outputs_and_their_owners():
    """Which output fields come from one token, and which token (who holds it under ``parallelize`` is the output
    kinds' business: tests/test_outputs.py)."""
    bert_cls = family_of(tiny_model("bert", head="sequence_classification"))
    assert (bert_cls.token_outputs, bert_cls.pooled_outputs, bert_cls.pooling) == ((), ("logits",), "class_token")
    first = bert_cls.pooled_tokens(tiny_inputs("bert"), 2, 11)
    assert first.tolist() == [0, 0]
    bert = family_of(tiny_model("bert"))
    assert (bert.token_outputs, bert.pooled_outputs) == (("last_hidden_state",), ("pooler_output",))
    gpt2_cls = family_of(tiny_model("gpt2", head="sequence_classification"))
    assert gpt2_cls.pooling == "last_token"
    inputs = tiny_inputs("gpt2", padded=True)            # row 1 left-padded: both rows end at token 10
    inputs["input_ids"][0, 4:] = PAD.get("gpt2", 0)      # row 0 right-padded: its last real token is 3
    last = gpt2_cls.pooled_tokens(inputs, 2, 11)
    assert last.tolist() == [3, 10]
    lm = family_of(tiny_model("llama"))
    assert (lm.token_outputs, lm.pooled_outputs, lm.pooling) == (("logits",), (), None)
    vit = family_of(tiny_model("vit"))
    assert vit.pooling == "class_token" and vit.class_token_required and vit.image


def test_a_subclass_of_a_head_is_that_head():
    import transformers as tf

    class MyClassifier(tf.BertForSequenceClassification):
        pass

    torch.manual_seed(0)
    model = MyClassifier(tiny_model("bert").config).eval()
    assert family_of(model).head == "sequence_classification"
    inputs = tiny_inputs("bert", padded=True)
    with torch.no_grad():
        ref = model(**inputs).logits
    assert float((astra.simulate(model, inputs, world_size=2).logits - ref).abs().max()) < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_every_rank_computes_layer_0_from_the_embedding_output(family):
    """Layer 0 exchanges nothing: ``first_layer_input`` of the embedding output is exactly what layer 0's attention
    receives, so a one-layer model under ASTRA (any codebooks, any world size) is the unmodified model, and a
    two-layer model's output does not depend on layer 0's codebook."""
    from astra.calibrate import collect_hidden_states

    inputs = tiny_inputs(family, seq=12)
    model = tiny_model(family, head=False)
    fam = family_of(model)
    assert fam.computes_first_layer and not fam.exchanged(0) and fam.exchanged(1)
    hs, emb = collect_hidden_states(model, [inputs], embeddings=True)
    with torch.no_grad():
        torch.testing.assert_close(fam.first_layer_input(emb[None])[0], hs[0], rtol=0, atol=1e-6)
    one = tiny_model(family, head=False, num_hidden_layers=1)
    with torch.no_grad():
        ref = one(**inputs)
    cb = astra.Codebooks.random(one, groups=2, codebook_size=4, seed=3)
    for n in (2, 3):
        assert _worst(ref, astra.simulate(one, inputs, world_size=n, codebooks=cb), inputs) < TOL, (family, n)
    cb = astra.Codebooks.random(model, groups=2, codebook_size=4, seed=3)
    other = cb.with_tensors([cb.tensors[0] * 100 + 7] + list(cb.tensors[1:]))
    a, b = (main_output(astra.simulate(model, inputs, world_size=3, codebooks=c)) for c in (cb, other))
    assert torch.equal(a, b)
    assert not torch.equal(a, main_output(model(**inputs)))       # the later layers are quantized


def test_a_family_without_first_input_exchanges_layer_0():
    """An adapter that does not say how layer 0's input follows from the embedding output (``first_input``
    None) gets layer 0 exchanged and quantized like the others."""
    model = tiny_model("bert", head=False)
    inputs = tiny_inputs("bert", seq=12)
    cb = astra.Codebooks.random(model, groups=2, codebook_size=4, seed=3)
    other = cb.with_tensors([cb.tensors[0] * 100 + 7] + list(cb.tensors[1:]))
    with layer_0_exchanged(model):
        assert not family_of(model).computes_first_layer and family_of(model).exchanged(0)
        a, b = (main_output(astra.simulate(model, inputs, world_size=3, codebooks=c)) for c in (cb, other))
        assert not torch.allclose(a, b, atol=1e-3)
    assert family_of(model).computes_first_layer


# -- a user-registered decoder whose forward derives its positions from the attention mask (OPT) -----------------
def _opt_embed(base, inputs, pos):
    d = base.decoder
    x = d.embed_tokens(inputs["input_ids"])
    return x + d.embed_positions(None, 0, position_ids=pos.expand(x.shape[0], -1))


def _opt_positions(base, inputs):
    """OPTDecoder.forward's position ids without position_ids: cumsum(mask) * mask - 1 (padding at -1)."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.long()
    return torch.cumsum(mask, dim=1) * mask - 1


def _opt_adapter(embed=_opt_embed, first_input=lambda b, e: b.decoder.layers[0].self_attn_layer_norm(e),
                 positions=_opt_positions):
    return FamilyAdapter("opt", decoder=True, attention=lambda b: [x.self_attn for x in b.decoder.layers],
                         kv=linear_kv("k_proj", "v_proj"), final=lambda b: b.decoder.final_layer_norm,
                         embed=embed, first_input=first_input, positions=positions)


def _opt_model_and_inputs(padding, head=False):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.OPTConfig(vocab_size=97, hidden_size=64, num_hidden_layers=3, ffn_dim=128, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=64, pad_token_id=1)
    inputs = tiny_inputs("roberta", padded=padding is not None)        # pad id 1, row 1 right-padded (3 tokens)
    if padding == "left":
        inputs = {k: v.roll(3, dims=1) for k, v in inputs.items()}
    return (tf.OPTForCausalLM if head else tf.OPTModel)(cfg).eval(), inputs


def _simulate_off(model, inputs, world_size, **kw) -> float:
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
    return max_diff(astra.simulate(model, inputs, world_size=world_size, **kw).last_hidden_state, ref, inputs)


@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_a_decoder_that_derives_its_positions_from_the_mask(padding):
    """OPT's forward derives its position ids from the attention mask; every rank is given the global ones astra
    derives (arange(T) before), so a left-padded batch was wrong under parallelize (3.7 off) while simulate, which let
    the model derive its own, equalled the model. simulate now gives the model the ranks' position ids, and the
    adapter's ``positions`` says how the forward derives them; given position_ids still win."""
    from astra.context import make_ctx

    model, inputs = _opt_model_and_inputs(padding)
    register_family(_opt_adapter(), replace=True)
    try:
        ctx = make_ctx(family_of(model), inputs, 2, False)
        mask = inputs.get("attention_mask", torch.ones(2, 11, dtype=torch.long))
        assert torch.equal(ctx.pos_ids, torch.cumsum(mask, 1) * mask - 1)
        assert ctx.default_pos == (padding is None)        # padding at -1
        for n in (2, 3):
            assert _simulate_off(model, inputs, n) < TOL, (padding, n)
        given = dict(inputs, position_ids=torch.arange(11) + 5)             # the caller's, not the mask's
        assert torch.equal(make_ctx(family_of(model), given, 2, False).pos_ids[0], torch.arange(11) + 5)
        assert _simulate_off(model, given, 2) < TOL
        register_family(_opt_adapter(positions=None), replace=True)      # arange(T): wrong under left padding
        off = _simulate_off(model, inputs, 2)
        assert off > 0.1 if padding == "left" else off < TOL, (padding, off)
    finally:
        unregister_family("opt")


def test_an_adapters_positions_are_checked():
    """An adapter's ``positions`` must give integer [B or 1, T] ids (UnsupportedModelError naming what it gave), only
    for decoders; the ranks' input agreement tells adapters with and without it apart."""
    model, inputs = _opt_model_and_inputs("left")
    assert _opt_adapter().describe() != _opt_adapter(positions=None).describe()
    with pytest.raises(ValueError, match="`positions` is for decoders"):
        FamilyAdapter("x", decoder=False, attention=lambda b: [], kv=linear_kv("k", "v"),
                      embeddings=lambda b: b.embeddings, positions=_opt_positions)
    for bad, got in ((lambda b, i: _opt_positions(b, i).float(), "torch.float32 \\[2, 11\\]"),
                     (lambda b, i: _opt_positions(b, i)[:, 1:], "torch.int64 \\[2, 10\\]"),
                     (lambda b, i: None, "got NoneType")):
        register_family(_opt_adapter(positions=bad), replace=True)
        try:
            with pytest.raises(astra.UnsupportedModelError, match="opt adapter's positions must return .*" + got):
                astra.simulate(model, inputs, world_size=2)
        finally:
            unregister_family("opt")


@pytest.mark.parametrize("wrong", ["embed", "first_input"])
def test_simulate_runs_the_adapters_layer_0_hooks(wrong):
    """Every rank computes the other ranks' layer-0 input from the adapter's ``embed`` / ``first_input``; simulate
    gave the other ranks the true layer-0 input instead, so an adapter with a wrong hook equalled the model there
    (the documented check of an adapter) and was wrong under parallelize. simulate now computes what they compute,
    and checks it against the layer-0 input of each rank's own tokens: the wrong hook is named."""
    model, inputs = _opt_model_and_inputs("left")
    hooks = {"embed": dict(embed=lambda b, i, p: b.decoder.embed_tokens(i["input_ids"])),   # no position embeddings
             "first_input": dict(first_input=lambda b, e: e)}[wrong]                           # no pre-attention norm
    register_family(_opt_adapter(**hooks), replace=True)
    try:
        for n in (2, 3):
            with pytest.raises(astra.AstraError, match="layer 0's attention input differs .* the family adapter's "
                                                       "embed / first_input computes something else"):
                _simulate_off(model, inputs, n)
    finally:
        unregister_family("opt")


def _opt_head_outputs(rank):
    register_family(_opt_adapter(), replace=True)
    model, inputs = _opt_model_and_inputs("right", head=True)
    pm = astra.parallelize(model, None, timeout=10)
    return {"gather": pm.gather(pm(**inputs)).logits, "hidden_states": pm(**inputs, output="hidden_states").logits,
            "mean_pooled": pm(**inputs, output="mean_pooled")}


def test_outputs_of_a_head_that_calls_inside_its_base():
    """OPTForCausalLM calls its base's ``decoder`` instead of the base itself, so the hook on the base never ran and
    gather, output="hidden_states" and output="mean_pooled" failed with an AttributeError on None: the last hidden
    state is now also taken from the base's children."""
    model, inputs = _opt_model_and_inputs("right", head=True)
    with torch.no_grad():
        logits = model(**inputs).logits
        h = model.model.decoder(**inputs).last_hidden_state
    m = inputs["attention_mask"].unsqueeze(-1).float()
    mean = (h * m).sum(1) / m.sum(1)
    for out in astra.launch(_opt_head_outputs, 2, join_timeout=120):
        assert max_diff(out["gather"], logits, inputs) < TOL and max_diff(out["hidden_states"], logits, inputs) < TOL
        assert float((out["mean_pooled"] - mean).abs().max()) < TOL


def test_a_decoder_classifier_without_pad_token_is_refused_before_the_forward():
    """HF's GPT2ForSequenceClassification refuses batches > 1 without pad_token_id after the layers; distributed, that
    ran the whole forward and read as the last rank's failure. It is an input error every rank raises first."""
    import transformers as tf

    cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, num_labels=3, eos_token_id=0, bos_token_id=0)
    model = tf.GPT2ForSequenceClassification(cfg).eval()
    x = {"input_ids": torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(0))}
    with pytest.raises(astra.InvalidInputError, match="finds each row's last token by pad_token_id"):
        astra.simulate(model, x, world_size=2)
    one = {"input_ids": x["input_ids"][:1]}                     # a single row needs no pad token
    with torch.no_grad():
        ref = model(**one).logits
    torch.testing.assert_close(astra.simulate(model, one, world_size=2).logits, ref, rtol=1e-5, atol=1e-5)
    model.config.pad_token_id = 0
    with torch.no_grad():
        ref = model(**x).logits
    torch.testing.assert_close(astra.simulate(model, x, world_size=2).logits, ref, rtol=1e-5, atol=1e-5)
