"""astra.simulate: full-precision sequence parallelism equals the unmodified model (all four families,
world sizes 1..4, T not divisible by N, padded batches); ASTRA semantics checks; clean patching."""
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_runtime_support import main_output, max_diff, steering_pre_hook, tiny_codebooks, tiny_inputs, tiny_model

import astra
from astra.models import family_of
from astra.split import DEFAULT_SPLIT, resolve_split

FAMILIES = ["gpt2", "llama", "bert", "vit"]
TOL = 1e-4


def _compare(ref, out, inputs):
    worst = 0.0
    for key, r in ref.items():
        if not isinstance(r, torch.Tensor):
            continue
        o = out[key]
        assert o.shape == r.shape, key
        d = (o - r).abs()
        m = inputs.get("attention_mask")
        if m is not None and d.dim() >= 2 and d.shape[:2] == m.shape:
            d = d[m.bool()]
        worst = max(worst, float(d.max()))
    return worst


@pytest.mark.parametrize("family, padded", [(f, p) for f in FAMILIES for p in (False, True) if not (f == "vit" and p)])
def test_full_precision_sp_equals_model(family, padded):
    head = family != "bert"
    for use_head in ([True, False] if head else [True]):
        model = tiny_model(family, head=use_head)
        inputs = tiny_inputs(family, seq=11, padded=padded)   # 11 tokens (ViT: 17): not divisible by 2, 3, 4
        with torch.no_grad():
            ref = model(**inputs)
        for n in (1, 2, 3, 4):
            out = astra.simulate(model, inputs, world_size=n)
            assert type(out) is type(ref)
            assert _compare(ref, out, inputs) < TOL, (family, use_head, n)


def test_bert_distributed_class_token_full_precision():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert", seq=10, padded=True)
    with torch.no_grad():
        ref = model(**inputs)
    for n in (2, 3):
        out = astra.simulate(model, inputs, world_size=n, class_token="distributed")
        assert _compare(ref, out, inputs) < TOL


def test_world_size_one_with_codebooks_is_exact():
    # one rank has no non-local tokens: nothing is quantized
    for family in FAMILIES:
        model = tiny_model(family)
        inputs = tiny_inputs(family)
        cb = astra.Codebooks.random(model, groups=1, codebook_size=8)
        with torch.no_grad():
            ref = model(**inputs)
        assert _compare(ref, astra.simulate(model, inputs, world_size=1, codebooks=cb), inputs) < TOL


def test_quantized_nonlocal_changes_output_and_is_deterministic():
    model = tiny_model("llama")
    inputs = tiny_inputs("llama")
    cb = astra.Codebooks.random(model, groups=1, codebook_size=8, seed=2)
    with torch.no_grad():
        ref = main_output(model(**inputs))
    a = main_output(astra.simulate(model, inputs, world_size=2, codebooks=cb))
    b = main_output(astra.simulate(model, inputs, world_size=2, codebooks=cb))
    assert torch.equal(a, b)
    assert float((a - ref).abs().max()) > 1e-3
    # causal: the first rank's queries see no non-local key (all non-local tokens come later)
    first = astra.split_indices(inputs["input_ids"].shape[1], 2, False,
                                resolve_split(family_of(model), cb, DEFAULT_SPLIT))[0]
    assert float((a[:, first] - ref[:, first]).abs().max()) < TOL


def test_inference_mode_codebooks_run_as_normal_tensors():
    """Codebooks calibrated under torch.inference_mode: the runtime holds normal copies and computes exactly what it
    does with normal codebooks."""
    from astra.simulation import SimRuntime

    model = tiny_model("gpt2")
    inputs = tiny_inputs("gpt2")
    cb = astra.Codebooks.random(model, groups=4, codebook_size=8, seed=3)
    with torch.inference_mode():
        made = [t.clone() for t in cb.tensors]
        cb_inf = cb.with_tensors(made)
        other = cb.with_tensors([t.clone() for t in cb.tensors])
    assert all(t.is_inference() for t in made) and not any(t.is_inference() for t in cb_inf.tensors)
    model64 = tiny_model("gpt2").to(torch.float64)
    with torch.inference_mode():             # installed under inference_mode with a dtype conversion
        rt = SimRuntime(model64, other, world_size=2)
        rt.install()
    try:
        assert all(t.dtype == torch.float64 and not t.is_inference() for t in rt._cb)
    finally:
        rt.uninstall()
    a = main_output(astra.simulate(model, inputs, world_size=2, codebooks=cb))
    b = main_output(astra.simulate(model, inputs, world_size=2, codebooks=cb_inf))
    assert torch.equal(a, b)


def test_nonlocal_kv_come_from_dequantized_hidden_state():
    """With a codebook holding every hidden state exactly (one codeword per token of one sequence),
    quantization is lossless, so ASTRA equals the model: the non-local K/V are the layer's own projections
    of h_hat (bias included; RoPE at the global position)."""
    for family in ("gpt2", "llama", "bert"):
        model = tiny_model(family)
        inputs = tiny_inputs(family, batch=1, seq=9)
        from astra.calibrate import collect_hidden_states

        hs = collect_hidden_states(model, [inputs])
        cb = astra.Codebooks([h.unsqueeze(0).clone() for h in hs], model_type=family, hidden_size=64)
        with torch.no_grad():
            ref = model(**inputs)
        out = astra.simulate(model, inputs, world_size=3, codebooks=cb)
        assert _compare(ref, out, inputs) < TOL, family


def test_vit_class_token_is_mean_over_rank_copies():
    """With distributed class tokens every rank keeps its own class-token copy; the final class state is
    the mean of the copies, placed where the pooler/classifier reads it."""
    model = tiny_model("vit", head=False)
    inputs = tiny_inputs("vit", batch=2)
    cb = astra.Codebooks.random(model, groups=1, codebook_size=4, seed=5)
    seen = []
    h = model.layernorm.register_forward_hook(lambda m, a, o: seen.append(o.clone()))  # runs before astra's
    try:
        out = astra.simulate(model, inputs, world_size=3, codebooks=cb)
    finally:
        h.remove()
    copies = seen[0][:, :3]                       # [B, 3 copies, D] before the mean
    assert seen[0].shape[1] == 3 + 16
    assert float((copies[:, 0] - copies[:, 1]).abs().max()) > 1e-4   # ranks see different full-precision sets
    assert torch.allclose(out.last_hidden_state[:, 0], copies.mean(1), atol=1e-6)
    assert torch.allclose(out.last_hidden_state[:, 1:], seen[0][:, 3:], atol=0)
    assert torch.allclose(model.pooler(out.last_hidden_state), out.pooler_output, atol=1e-6)


def test_unsupported_and_bad_inputs():
    import transformers as tf

    distil = tf.DistilBertModel(tf.DistilBertConfig(n_layers=1, dim=32, n_heads=2, hidden_dim=64, vocab_size=50))
    with pytest.raises(astra.UnsupportedModelError, match="does not support DistilBertModel"):
        astra.simulate(distil.eval(), {"input_ids": torch.ones(1, 4, dtype=torch.long)}, world_size=2)
    with pytest.raises(astra.UnsupportedModelError):
        astra.simulate(torch.nn.Linear(2, 2), {}, world_size=2)
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="at least one per rank"):
        astra.simulate(model, {"input_ids": torch.ones(1, 3, dtype=torch.long)}, world_size=4)
    with pytest.raises(astra.UnsupportedModelError, match="output_attentions"):
        astra.simulate(model, {"input_ids": torch.ones(1, 4, dtype=torch.long), "output_attentions": True},
                       world_size=2)
    with pytest.raises(astra.UnsupportedModelError, match="distributed class tokens"):
        astra.simulate(model, {"input_ids": torch.ones(1, 4, dtype=torch.long)}, world_size=2,
                       class_token="distributed")
    model.train()
    with pytest.raises(astra.AstraError, match="eval"):
        astra.simulate(model, {"input_ids": torch.ones(1, 4, dtype=torch.long)}, world_size=2)


def test_simulate_leaves_model_untouched():
    model = tiny_model("llama")
    impl = model.config._attn_implementation
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = tiny_inputs("llama")
    astra.simulate(model, inputs, world_size=2, codebooks=astra.Codebooks.random(model, groups=1, codebook_size=4))
    assert model.config._attn_implementation == impl
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert not any(hasattr(m, "_astra_runtime") for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    with torch.no_grad():
        model(**inputs)  # still runs normally


def test_parallelize_needs_a_process_group():
    model = tiny_model("gpt2")
    with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
        astra.parallelize(model)
    assert model.config._attn_implementation != "astra"


def test_simulate_refuses_a_fractional_world_size_and_an_empty_batch():
    """world_size=2.5 ran as 2; a batch of 0 rows failed inside a reshape."""
    model = tiny_model("gpt2")
    inputs = tiny_inputs("gpt2")
    for ws in (2.5, "2", True, 0):
        with pytest.raises(ValueError, match="world_size must be an int >= 1"):
            astra.simulate(model, inputs, world_size=ws)
    with pytest.raises(astra.InvalidInputError, match="the batch is empty"):
        astra.simulate(model, {k: v[:0] for k, v in inputs.items()}, world_size=2)
    with pytest.raises(ValueError, match="not divisible by G=0"):
        astra.Codebooks.random(model, groups=0, codebook_size=8)
    with pytest.raises(ValueError, match="codebook_size must be an int >= 1"):
        astra.Codebooks.random(model, groups=4, codebook_size=0)


def test_ids_of_a_dtype_no_embedding_takes_and_token_types_out_of_range_are_refused():
    """bool / uint8 ids and GPT-2 token types past its token table (it embeds them with the token embeddings) were
    accepted, then failed inside torch with a bare RuntimeError / IndexError; [T] position ids failed inside
    Llama's rotary embedding (now read as [1, T], as GPT-2 reads them)."""
    gpt2 = tiny_model("gpt2")
    inputs = tiny_inputs("gpt2", seq=8)
    for dt in (torch.uint8, torch.bool, torch.int16):
        with pytest.raises(astra.InvalidInputError, match=f"input_ids must have an int64 or int32 dtype, got {dt}"):
            astra.simulate(gpt2, dict(inputs, input_ids=inputs["input_ids"].to(dt)), world_size=2)
    n = gpt2.get_input_embeddings().num_embeddings
    for bad in (n, -1):
        types = torch.zeros_like(inputs["input_ids"])
        types[0, 3] = bad
        with pytest.raises(astra.InvalidInputError, match=rf"token_type_ids holds {bad} .*valid ids are 0..{n - 1}"):
            astra.simulate(gpt2, dict(inputs, token_type_ids=types), world_size=2)
    llama = tiny_model("llama")
    inputs = tiny_inputs("llama", seq=8)
    pos = torch.arange(3, 11)
    with torch.no_grad():
        ref = llama(**inputs, position_ids=pos[None]).logits
    got = astra.simulate(llama, dict(inputs, position_ids=pos), world_size=2).logits
    assert float((got - ref).abs().max()) < 1e-4


def test_inputs_without_dense_values_are_refused_by_name():
    """A sparse mask got past the checks and failed in the fingerprint's digest, on its rank alone, outside the
    agreement (its peers then waited for an exchange that never came); meta and nested ids failed inside torch."""
    gpt2 = tiny_model("gpt2")
    inputs = tiny_inputs("gpt2", seq=8)
    ids, mask = inputs["input_ids"], torch.ones_like(inputs["input_ids"])
    with warnings.catch_warnings():         # torch: nested tensors are a prototype
        warnings.simplefilter("ignore", UserWarning)
        nested = torch.nested.nested_tensor([ids[0], ids[0, :5]])
    cases = [("attention_mask", mask.to_sparse(), "sparse_coo"), ("input_ids", ids.to("meta"), "meta"),
             ("input_ids", nested, "nested")]
    for key, bad, kind in cases:
        with pytest.raises(astra.InvalidInputError, match=f"{key} must be a dense tensor holding its values, got a "
                                                          f"{kind} tensor"):
            astra.simulate(gpt2, {**inputs, "attention_mask": mask, key: bad}, world_size=2)


def test_a_float_padding_mask_is_taken_and_an_additive_one_refused():
    """HF takes a float 0 / 1 attention_mask (it reads ``mask.bool()``); astra refused it by dtype. Now it computes what
    the integer mask gives; a float mask with any other value (an additive 0 / -inf mask, a soft 0.5) is refused by
    position, since HF would read every nonzero as "attend"."""
    bert = tiny_model("bert")
    inputs = tiny_inputs("bert", seq=10)
    mask = torch.ones_like(inputs["input_ids"])
    mask[-1, 6:] = 0
    with torch.no_grad():
        ref = astra.simulate(bert, {**inputs, "attention_mask": mask}, world_size=2).last_hidden_state
        for dt in (torch.float32, torch.float16, torch.float64):
            got = astra.simulate(bert, {**inputs, "attention_mask": mask.to(dt)}, world_size=2).last_hidden_state
            assert torch.equal(got, ref), dt
    for bad in (0.5, float("-inf"), float("nan")):
        soft = mask.float()
        soft[0, 2] = bad
        with pytest.raises(astra.InvalidInputError, match=rf"attention_mask holds {bad} at position \[0, 2\]; a "
                                                          "padding mask holds 1 \\(attend\\) and 0"):
            astra.simulate(bert, {**inputs, "attention_mask": soft}, world_size=2)


def test_use_cache_on_an_encoder_is_ignored_as_hf_ignores_it():
    """BERT / ViT run use_cache=True (transformers ignores it for a model that is not a decoder); astra refused it."""
    for family in ("bert", "vit"):
        model = tiny_model(family, head=False)
        inputs = tiny_inputs(family)
        with torch.no_grad():
            ref = astra.simulate(model, inputs, world_size=2).last_hidden_state
            got = astra.simulate(model, {**inputs, "use_cache": True}, world_size=2).last_hidden_state
        assert torch.equal(got, ref), family


def test_autocast_is_refused_by_name():
    """Under torch.autocast, Llama's q / k came fp32 and v bf16 (a bare dtype error in the kernels), BERT's class-token
    outputs failed their layout check, and autocast on one rank only aborted gloo: refused up front."""
    model = tiny_model("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(astra.UnsupportedModelError, match=r"does not run under torch.autocast \(cpu\)"):
            astra.simulate(model, tiny_inputs("llama"), world_size=2)


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), 1e300, "soon", None])
def test_parallelize_refuses_a_timeout_no_wait_can_take(bad):
    """Checked before anything else (before the process group): an infinite timeout was accepted and then failed
    inside every wait, reported as a dead peer (OverflowError in timedelta)."""
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0"):
        astra.parallelize(model, timeout=bad)
    assert model.config._attn_implementation != "astra"


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 40), N=st.integers(1, 6), cls=st.booleans())
def test_split_is_tensor_split_of_the_non_replicated_tokens(T, N, cls):
    start = 1 if cls else 0
    if T - start < N:
        with pytest.raises(ValueError):
            astra.split_indices(T, N, cls)
        return
    chunks = astra.split_indices(T, N, cls)
    want = torch.tensor_split(torch.arange(start, T), N)
    assert len(chunks) == N and all(torch.equal(a, b) for a, b in zip(chunks, want))
    assert torch.equal(torch.cat(chunks), torch.arange(start, T))
    sizes = [len(c) for c in chunks]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    for r in range(N):
        loc = astra.local_indices(T, N, r, cls)
        assert torch.equal(loc, torch.cat([torch.zeros(1, dtype=torch.long), chunks[r]]) if cls else chunks[r])


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_models_run(family):
    model = tiny_model(family).to(torch.bfloat16)
    inputs = tiny_inputs(family, padded=family != "vit")
    if family == "vit":
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        ref = main_output(model(**inputs)).float()
    out = main_output(astra.simulate(model, inputs, world_size=3)).float()
    d = (out - ref).abs()
    m = inputs.get("attention_mask")
    d = d[m.bool()] if m is not None else d
    assert float(d.max()) <= 0.02 * max(1.0, float(ref.abs().max()))      # bf16 rounding only
    cb = astra.Codebooks.random(model, groups=8, codebook_size=16)
    q = main_output(astra.simulate(model, inputs, world_size=3, codebooks=cb))
    assert q.dtype == torch.bfloat16 and bool(torch.isfinite(q).all())


def test_a_heads_kwargs_that_reach_its_base_are_refused_by_name():
    """ViTForImageClassification passes **kwargs to its ViTModel, which masks the patches given ``bool_masked_pos``;
    the head's signature does not name it, so astra dropped it as a key "the model ignores" and returned unmasked
    logits (the base model was refused as it should be)."""
    for head in (True, False):
        model = tiny_model("vit", head=head)
        cfg = model.config
        mask = torch.zeros(1, (cfg.image_size // cfg.patch_size) ** 2, dtype=torch.bool)
        mask[0, 3] = True
        with pytest.raises(astra.UnsupportedModelError, match=r"does not support the input\(s\) \['bool_masked_pos'\]"):
            astra.simulate(model, {**tiny_inputs("vit", batch=1), "bool_masked_pos": mask}, world_size=2)


def test_weights_loaded_into_inference_tensor_parameters_are_refused():
    """Parameters made or converted under torch.inference_mode have no version counter: a checkpoint loaded into
    them in place (an inference server swapping weights) ran on with stale K/V tables and fingerprint, silently.
    Their sampled values are compared instead."""
    from astra.simulation import SimRuntime

    model = tiny_model("bert")
    with torch.inference_mode():
        model.to(torch.float64)
    assert all(p.is_inference() for p in model.parameters())
    rt = SimRuntime(model, None, 2)
    rt.install()
    try:
        rt.check_model_state()                          # unchanged: accepted
        with torch.inference_mode():
            model.load_state_dict(tiny_model("bert", seed=1).to(torch.float64).state_dict())
        with pytest.raises(astra.AstraError, match="the model's weights changed after astra patched it"):
            rt.check_model_state()
    finally:
        rt.uninstall()


def test_inference_tensor_marks_sample_large_parameters_by_integer_positions():
    """The sample positions came from a float32 linspace, which rounds numel - 1 up to numel past 2**24 elements:
    simulate of a GPT-2 whose 50257 x 768 embedding was converted under inference_mode died in IndexError."""
    from astra.runtime import TensorMarks

    with torch.inference_mode():
        big = torch.zeros(50257, 768)
    marks = TensorMarks([big])
    assert not marks.changed([big])
    with torch.inference_mode():
        big[-1, -1] = 1.0                               # the last element is sampled
    assert marks.changed([big])


def test_dynamically_quantized_models_are_refused_by_name():
    """quantize_dynamic picks each call's activation scale from the rows it holds: a rank's chunk computed other
    values than the whole sequence (2.5e-3 off with codebooks=None), and codebooks with a transform died in a bare
    StopIteration (the attention module had no float parameter left)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # torch.ao.quantization's deprecation
        q = torch.ao.quantization.quantize_dynamic(tiny_model("bert"), {torch.nn.Linear}, dtype=torch.qint8)
    cb = tiny_codebooks(tiny_model("bert"), "bert", 4)
    cb.weights_sample = None
    for call in (lambda: astra.simulate(q, tiny_inputs("bert"), world_size=2),
                 lambda: astra.simulate(q, tiny_inputs("bert"), world_size=2, codebooks=cb),
                 lambda: astra.calibrate(q, tiny_inputs("bert"), groups=4, codebook_size=8)):
        with pytest.raises(astra.UnsupportedModelError, match="does not run dynamically quantized modules"):
            call()


def _race(monkeypatch, layers, calls):
    """Run ``calls`` (name -> (simulate arguments, expected output or None)) in threads started 20 ms apart, with
    install's window between its check and its patch widened (TensorMarks slowed: no logic changed) and ``layers``
    slowed; returns name -> "right" / "wrong" / the AstraError's text."""
    import threading
    import time

    import astra.runtime as rtm

    real = rtm.TensorMarks.__init__

    def slow(self, tensors):
        time.sleep(0.05)
        real(self, tensors)

    monkeypatch.setattr(rtm.TensorMarks, "__init__", slow)
    for layer in layers:
        layer.mlp.register_forward_pre_hook(lambda *a: time.sleep(0.03))
    out = {}

    def run(j, name, args, ref):
        time.sleep(0.02 * j)
        try:
            model, inputs, codebooks = args
            got = main_output(astra.simulate(model, inputs, world_size=2, codebooks=codebooks))
            out[name] = "right" if ref is None or torch.equal(got, ref) else "wrong"
        except astra.AstraError as e:
            out[name] = str(e)

    threads = [threading.Thread(target=run, args=(j, name, *call)) for j, (name, call) in enumerate(calls.items())]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_one_model_simulated_from_two_threads_is_refused_never_mixed(monkeypatch):
    """Two threads' astra.simulate of one model both passed install's "already patched" check: one returned the
    other's result (its codebooks' or none), and the model was left patched for good. The check and the claim are
    one step now: the second call is refused by name, the first is right, and the model comes back clean."""
    model = tiny_model("llama")
    x = tiny_inputs("llama", seq=13)
    cb = astra.Codebooks.random(model, groups=1, codebook_size=8, seed=3)
    refs = [main_output(astra.simulate(model, x, world_size=2, codebooks=c)) for c in (None, cb)]
    out = _race(monkeypatch, model.model.layers, {"first": ((model, x, None), refs[0]),
                                                   "second": ((model, x, cb), refs[1])})
    assert out["first"] == "right", out
    assert "running in another thread: one astra runtime per model at a time" in out["second"], out
    assert model.config._attn_implementation != "astra" and getattr(model, "_astra_runtime_obj", None) is None
    with torch.no_grad():
        model(**x)


def test_codebooks_changed_in_place_after_patching_are_refused():
    """With G = 1 K/V tables, codebooks changed in place after parallelize were encoded with the new values and
    decoded through tables of the old ones: 0.32 off simulate with the new codebooks, 0.28 off the old, no error.
    Refused at the next forward, as changed weights are; a codebook tensor replaced in the list too."""
    from astra.simulation import SimRuntime

    model = tiny_model("llama")
    x = tiny_inputs("llama", seq=12)
    for change in ("copy_", "replace"):
        cb = astra.Codebooks.random(model, groups=1, codebook_size=8, seed=3)
        rt = SimRuntime(model, cb, 2)
        rt.install()
        try:
            rt.check_model_state()
            new = torch.randn_like(cb.tensors[1])
            if change == "copy_":
                with torch.no_grad():
                    cb.tensors[1].copy_(new)
            else:
                cb.tensors[1] = new
            with pytest.raises(astra.AstraError, match="the codebooks changed in place after astra patched"):
                rt.check_model_state()
        finally:
            rt.uninstall()
    assert torch.isfinite(main_output(astra.simulate(model, x, world_size=2, codebooks=cb))).all()


def test_a_head_and_its_base_model_simulated_from_two_threads_are_one_claim(monkeypatch):
    """A head and its base_model share the config and attention modules: two threads' simulate of them both passed the
    checks (the shared state was written later, outside the claim), the head's result was 0.29 off and the config
    stayed patched. The config is claimed with the model now."""
    import astra.runtime as rtm

    head = tiny_model("llama", head="causal_lm")
    x = tiny_inputs("llama", seq=13)
    cb = astra.Codebooks.random(head, groups=1, codebook_size=8, seed=3)
    ref = main_output(astra.simulate(head, x, world_size=2, codebooks=cb))
    out = _race(monkeypatch, head.model.layers, {"head": ((head, x, cb), ref), "base": ((head.model, x, None), None)})
    assert out["head"] == "right" and out["base"].startswith("the model shares its config"), out
    assert head.config._attn_implementation != "astra" and not rtm._CLAIMED_CONFIGS


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "vit"])
def test_a_hook_changing_layer_0s_input_is_refused_and_one_on_a_later_layer_is_exact(family):
    """Every rank computes the other ranks' layer-0 inputs from the embedding output itself, so a pre-hook on the
    first block reached only each rank's own tokens: simulate was 1e-2 - 3e-2 off the hooked model, silently. It is
    refused by name; the same hook on block 1 is exact; an observing hook on block 0 is fine."""
    model = tiny_model(family)
    inputs = tiny_inputs(family)
    for layer, steer in ((0, True), (0, False), (1, True)):
        hook = steering_pre_hook if steer else (lambda m, a, k: None)
        handle = BLOCKS[family](model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                ref = model(**inputs)[0]
            if layer == 0 and steer:
                with pytest.raises(astra.AstraError, match="layer 0's attention input differs by .* hook or a "
                                                           "changed module between the embeddings"):
                    astra.simulate(model, inputs, world_size=2)
                continue
            out = astra.simulate(model, inputs, world_size=2)[0]
            assert max_diff(out, ref, inputs) < 1e-4, (layer, steer)
        finally:
            handle.remove()


BLOCKS = {"gpt2": lambda m: m.transformer.h, "llama": lambda m: m.model.layers, "bert": lambda m: m.encoder.layer,
          "vit": lambda m: m.vit.layers}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layer_0s_input_check_has_no_false_alarm_in_any_dtype(dtype):
    """The check above compares what the forward computed with what astra computes from the embedding output: the
    same operations, so no dtype's rounding may trip it (every family that computes layer 0 itself)."""
    for family in ("gpt2", "llama", "bert", "vit"):
        model = tiny_model(family).to(dtype)
        inputs = tiny_inputs(family)
        if family == "vit":
            inputs = {"pixel_values": inputs["pixel_values"].to(dtype)}
        assert family_of(model).computes_first_layer, family
        out = astra.simulate(model, inputs, world_size=3)[0]
        assert torch.isfinite(out).all(), (family, dtype)
