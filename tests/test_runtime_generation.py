"""Generation (GPT-2, Llama) through the model's own ``generate``: parallel prefill of all but the last prompt
token, then HF decodes from the KV cache the last rank builds from codes. Full precision equals
``model.generate`` token for token (greedy, seeded sampling, left padding, EOS, beams, short prompts); with
codebooks the distributed tokens equal ``astra.simulate_generate``; the result reaches every rank."""
import functools
import time

import pytest
import torch
from test_runtime_support import tiny_codebooks, tiny_inputs, tiny_model
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

import astra

# EOS tokens these (sharpened) models emit greedily on the EOS prompts below, at different steps per row
EOS = {"gpt2": [66], "llama": [73, 92]}


def gen_model(family):
    """A tiny model whose outputs depend on positions: random init gives near-uniform attention (and GPT-2 tiny
    position embeddings), so query/key weights are scaled up (and GPT-2's position embeddings)."""
    model = tiny_model(family)
    with torch.no_grad():
        if family == "gpt2":
            model.transformer.wpe.weight.mul_(10)
            for blk in model.transformer.h:
                blk.attn.c_attn.weight[:, : 2 * model.config.n_embd].mul_(4)
        else:
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(4)
                layer.self_attn.k_proj.weight.mul_(4)
    return model


def _positions(inputs):
    mask = inputs["attention_mask"]
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _cases(family):
    """(name, prompt inputs, generate kwargs, seed or None) compared with model.generate."""
    plain = tiny_inputs(family, seq=10)
    padded = tiny_inputs(family, seq=10, padded=True)        # left padding: row 1's first 3 tokens
    eos_prompt = padded if family == "gpt2" else tiny_inputs(family, seq=9, seed=2)
    return [
        ("greedy", plain, dict(max_new_tokens=6, do_sample=False), None),
        ("sampling", plain, dict(max_new_tokens=6, do_sample=True, top_k=5, temperature=1.3), 11),
        ("left-padded", padded, dict(max_new_tokens=6, do_sample=False), None),
        ("left-padded sampling", padded, dict(max_new_tokens=5, do_sample=True, top_p=0.9), 12),
        ("given position_ids", padded, dict(max_new_tokens=4, position_ids=_positions(padded) + 2), None),
        ("beams", plain, dict(max_new_tokens=4, num_beams=3, num_return_sequences=2), None),
        ("eos", eos_prompt, dict(max_new_tokens=6, do_sample=False, eos_token_id=EOS[family]), None),
        ("one-token prompt", {"input_ids": plain["input_ids"][:, :1]}, dict(max_new_tokens=4), None),
        # 2 of its tokens prefilled by 2 ranks (one each), or generated alone when shorter than the world
        ("three-token prompt", {"input_ids": plain["input_ids"][:, :3]}, dict(max_new_tokens=4), None),
        # HF's default length (20 new tokens), a longer prompt than it, and max_length as a total: the result header's
        # bound read the default as a total, and every rank failed (FrameMismatchError / PeerError)
        ("default length", plain, dict(do_sample=False), None),
        ("default length, prompt of 24", tiny_inputs(family, seq=24, seed=3), dict(do_sample=False), None),
        ("max_length", plain, dict(max_length=14, do_sample=False), None),
    ]


def _generate(fn, inputs, kwargs, seed):
    if seed is not None:
        torch.manual_seed(seed)
    return fn(inputs["input_ids"], attention_mask=inputs.get("attention_mask"), **kwargs)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_simulate_generate_full_precision_equals_model_generate(family):
    model = gen_model(family)
    for name, inputs, kwargs, seed in _cases(family):
        ref = _generate(model.generate, inputs, kwargs, seed)
        if name in ("left-padded", "given position_ids") and family == "gpt2":    # sensitive to positions
            arange = torch.arange(10).expand(2, -1)
            kw = dict(kwargs, position_ids=arange)
            assert not torch.equal(ref, model.generate(**inputs, **kw)), name
        if name == "eos":       # the case exercises stopping: shorter than max_new_tokens, a row padded after EOS
            B, T, L = ref.shape[0], inputs["input_ids"].shape[1], ref.shape[1]
            assert L < T + kwargs["max_new_tokens"]
            assert any(int(ref[b, t]) in EOS[family] for b in range(B) for t in range(T, L - 1))
        for n in (2, 3) if name in ("left-padded", "three-token prompt") else (2,):
            got = _generate(functools.partial(astra.simulate_generate, model, world_size=n), inputs, kwargs, seed)
            assert torch.equal(got, ref), (family, name, n, got.tolist(), ref.tolist())


def test_the_prompt_may_be_given_under_hfs_name_inputs():
    """HF's generate names its prompt ``inputs``; astra refused it ("generate needs input_ids"; simulate_generate: a
    TypeError)."""
    model = gen_model("gpt2")
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    ref = model.generate(inputs=ids, max_new_tokens=4, do_sample=False)
    got = astra.simulate_generate(model, inputs=ids, world_size=2, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, ref) and torch.equal(ref, model.generate(ids, max_new_tokens=4, do_sample=False))
    with pytest.raises(astra.InvalidInputError, match="give the prompt once: input_ids or inputs"):
        astra.simulate_generate(model, ids, inputs=ids, world_size=2, max_new_tokens=4)


def test_the_cache_goes_to_generate_under_the_installed_transformers_name(monkeypatch):
    import sys
    import warnings

    from astra.generation import cache_kwarg

    model = gen_model("gpt2")
    ids = tiny_inputs("gpt2", batch=1, seq=6, seed=3)["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)          # no deprecated keyword from astra's own call
        astra.simulate_generate(model, ids, world_size=2, max_new_tokens=2)
    for version, name in (("4.48.0", "past_key_values"), ("5.23.0", "past_key_values"), ("5.24.0", "cache"),
                          ("6.1.0", "cache")):
        # (transformers swaps its module object in sys.modules on lazy imports: patch the one there now)
        monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
        assert cache_kwarg() == name, version


def test_simulate_generate_beams_dict_output_and_inferred_mask():
    model = tiny_model("llama")
    ids = tiny_inputs("llama", seq=10)["input_ids"]
    kw = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, return_dict_in_generate=True)
    ref = model.generate(ids, **kw)
    got = astra.simulate_generate(model, ids, world_size=2, **kw)
    assert type(got) is type(ref) and type(ref).__name__ == "GenerateBeamDecoderOnlyOutput"
    assert got.sequences.shape == (4, 14)
    assert torch.equal(got.sequences, ref.sequences)
    # no attention_mask, the prompt holds the pad token (pad != EOS): HF infers the mask and positions from it
    model.generation_config.pad_token_id = 5
    ids = ids.clone()
    ids[1, :3] = 5
    ref = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert not torch.equal(ref, model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5))
    assert torch.equal(astra.simulate_generate(model, ids, world_size=2, max_new_tokens=5), ref)


def test_a_callers_generation_config_is_filled_from_the_models_as_hf_fills_it():
    """The caller's GenerationConfig leaves fields unset, which HF fills from model.generation_config: astra read
    them from the caller's alone (the inferred mask, the beams' cache expansion and the refusals went wrong)."""
    from transformers import GenerationConfig

    model = gen_model("llama")
    ids = tiny_inputs("llama", seq=10)["input_ids"].clone()
    ids[1, :3] = 5
    model.generation_config.pad_token_id = 5          # the mask is inferred from the model's pad token
    mine = GenerationConfig(max_new_tokens=5)
    ref = model.generate(ids, generation_config=mine)
    assert not torch.equal(ref, model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=mine))
    assert torch.equal(astra.simulate_generate(model, ids, world_size=2, generation_config=mine), ref)
    model.generation_config.num_beams = 3             # was: a size mismatch in the cache (not expanded)
    ref = model.generate(ids, generation_config=mine)
    assert torch.equal(astra.simulate_generate(model, ids, world_size=2, generation_config=mine), ref)
    model.generation_config.num_beams = 1
    model.generation_config.use_cache = False           # many checkpoints' config: decoded from the prefill's cache
    ref = model.generate(ids, generation_config=mine)
    assert torch.equal(astra.simulate_generate(model, ids, world_size=2, generation_config=mine), ref)
    model.generation_config.use_cache = None
    for field, value, match in [("cache_implementation", "static", "cache_implementation='static'"),
                                ("output_hidden_states", True, "output_hidden_states")]:
        setattr(model.generation_config, field, value)
        with pytest.raises(astra.UnsupportedModelError, match=match):
            astra.simulate_generate(model, ids, world_size=2, generation_config=mine)
        setattr(model.generation_config, field, None)


def test_hf_gets_the_callers_config_not_the_resolved_one():
    """astra resolves the config for its checks; handing the resolved one (max_length=20 filled in) back to HF's
    generate made it warn on every call that both max_new_tokens and max_length were set."""
    model = gen_model("gpt2")
    ids = tiny_inputs("gpt2", seq=10)["input_ids"]
    ref = model.generate(ids, max_new_tokens=4, attention_mask=torch.ones_like(ids))
    seen, real = {}, model.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    model.generate = spy
    got = astra.simulate_generate(model, ids, world_size=2, max_new_tokens=4, attention_mask=torch.ones_like(ids))
    assert seen["generation_config"] is None and seen["max_new_tokens"] == 4 and torch.equal(got, ref)


def test_beams_of_several_prompts_continue_from_their_own_rows():
    """The prefill's cache is expanded row by row (repeat_interleave, as HF expands the prompt): with 3 prompts and
    2 beams a tiled cache gave beams other prompts' K/V; the batch-2 beam case above could not see it."""
    model = gen_model("llama")
    ids = tiny_inputs("llama", seq=10, batch=3)["input_ids"]
    kw = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, attention_mask=torch.ones_like(ids))
    assert torch.equal(astra.simulate_generate(model, ids, world_size=2, **kw), model.generate(ids, **kw))


def test_a_prompt_one_token_longer_than_the_ranks_is_prefilled_in_parallel():
    """A prompt of world_size + 1 tokens leaves one prefill token per rank: it runs the parallel prefill (its
    first-step scores are the codes', not the model's alone)."""
    model = gen_model("gpt2")
    ids = tiny_inputs("gpt2", seq=3)["input_ids"][:1]
    kw = dict(max_new_tokens=1, output_scores=True, return_dict_in_generate=True)
    cb = tiny_codebooks(model, "gpt2", 1)
    alone = model.generate(ids, attention_mask=torch.ones_like(ids), **kw).scores[0]
    got = astra.simulate_generate(model, ids, world_size=2, codebooks=cb, **kw).scores[0]
    assert float((got - alone).abs().max()) > 1e-4        # the model alone gives them bit for bit (below)
    got = astra.simulate_generate(model, ids[:, :2], world_size=2, codebooks=cb, **kw).scores[0]   # the model's
    alone = model.generate(ids[:, :2], attention_mask=torch.ones_like(ids[:, :2]), **kw).scores[0]
    assert torch.equal(got, alone)


def test_simulate_generate_takes_the_split_and_checks_world_size():
    model = gen_model("gpt2")
    ids = tiny_inputs("gpt2", seq=12)["input_ids"]
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3)
    for split in ("even", "balanced"):
        got = astra.simulate_generate(model, ids, world_size=3, split=split, max_new_tokens=3,
                                      codebooks=tiny_codebooks(model, "gpt2", 1))
        assert got.shape == ref.shape and torch.equal(got[:, :12], ids)
    assert torch.equal(astra.simulate_generate(model, ids, world_size=3, split="balanced", max_new_tokens=3), ref)
    for bad in (2.5, "3", None, 0):      # a short prompt skipped the check before
        with pytest.raises(ValueError, match="world_size must be an int >= 1"):
            astra.simulate_generate(model, ids[:, :1], world_size=bad, max_new_tokens=2)


class _Collect(BaseStreamer):
    def __init__(self):
        self.tokens, self.ended = [], False

    def put(self, value):
        self.tokens += value.reshape(-1).tolist()

    def end(self):
        self.ended = True


def test_simulate_generate_streams_through_hf_streamer():
    model = gen_model("gpt2")
    ids = tiny_inputs("gpt2", seq=10)["input_ids"][:1]
    streamer = _Collect()
    got = astra.simulate_generate(model, ids, world_size=2, max_new_tokens=4, streamer=streamer)
    assert streamer.ended and streamer.tokens == got[0].tolist() and got.shape == (1, 14)


def test_explicit_position_ids_follow_hf_forward():
    """A plain forward uses arange(T) as HF's does; given position_ids (here HF generate's, from a left-padded
    mask) are used as given: simulate equals the model called with the same position ids."""
    model = tiny_model("llama", head=False)
    inputs = tiny_inputs("llama", seq=10, padded=True)
    mask = inputs["attention_mask"]
    for extra in ({}, {"position_ids": _positions(inputs)}):
        with torch.no_grad():
            ref = model(**inputs, **extra).last_hidden_state
        got = astra.simulate(model, dict(inputs, **extra), world_size=3).last_hidden_state
        assert float((got - ref)[mask.bool()].abs().max()) < 1e-4


def test_generation_rejects_bad_prompts_and_models():
    model = tiny_model("gpt2")
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(astra.UnsupportedModelError, match="decoder"):
        astra.simulate_generate(tiny_model("bert"), ids, world_size=2, max_new_tokens=2)
    with pytest.raises(astra.UnsupportedModelError, match="LM head"):
        astra.simulate_generate(tiny_model("gpt2", head=False), ids, world_size=2, max_new_tokens=2)
    with pytest.raises(astra.InvalidInputError, match=r"2 dimensions, got shape \[4\].*x\[None\]"):
        astra.simulate_generate(model, ids[0], world_size=2, max_new_tokens=2)
    with pytest.raises(astra.InvalidInputError, match="at least one per rank"):
        astra.simulate_generate(model, ids[:, :0], world_size=2, max_new_tokens=2)
    with pytest.raises(astra.UnsupportedModelError, match="inputs_embeds"):
        astra.simulate_generate(model, ids, world_size=2, inputs_embeds=torch.zeros(1, 4, 64))
    uncached = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, use_cache=False)
    assert torch.equal(astra.simulate_generate(model, ids, world_size=2, max_new_tokens=3, use_cache=False), uncached)
    from transformers import DynamicCache
    for kw in ("past_key_values", "cache"):      # was: silently replaced by astra's cache
        with pytest.raises(astra.UnsupportedModelError, match=rf"builds the KV cache.*\['{kw}'\]"):
            astra.simulate_generate(model, ids, world_size=2, max_new_tokens=2, **{kw: DynamicCache()})
    # assisted decoding from the prefill's cache returned other tokens than greedy decoding (HF's assisted path)
    with pytest.raises(astra.UnsupportedModelError, match="assisted decoding.*prompt_lookup_num_tokens"):
        astra.simulate_generate(model, ids, world_size=2, max_new_tokens=3, prompt_lookup_num_tokens=2)
    with pytest.raises(astra.UnsupportedModelError, match="assisted decoding.*assistant_model"):
        astra.simulate_generate(model, ids, world_size=2, max_new_tokens=3, assistant_model=model)
    with pytest.raises(ValueError, match="max_new_tokens"):
        astra.simulate_generate(model, ids, world_size=2, max_new_tokens=0)
    # accepted before, and the first step's hidden states held the last prompt token alone (HF: the whole prompt)
    for flag in ("output_hidden_states", "output_attentions"):
        with pytest.raises(astra.UnsupportedModelError, match=rf"\['{flag}'\]: HF continues from the prefill"):
            astra.simulate_generate(model, ids, world_size=2, max_new_tokens=2, return_dict_in_generate=True,
                                    **{flag: True})


class _Raise(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        raise RuntimeError("stopping criterion failed")


class _Slow(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        time.sleep(0.25)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _family_rank(rank, family):
    """Every case of one family on this rank: (name, distributed result, reference)."""
    last = 1
    model = gen_model(family)
    res = []
    refs = [(name, inp, kw, seed, _generate(model.generate, inp, kw, seed)) for name, inp, kw, seed in _cases(family)]
    ids = refs[0][1]["input_ids"]
    ref3, ref12 = model.generate(ids, max_new_tokens=3), model.generate(ids, max_new_tokens=12)
    pm = astra.parallelize(model, None, timeout=30)
    for name, inp, kw, seed, ref in refs:
        res.append((name, _generate(pm.generate, inp, kw, seed if rank == last else None), ref))
        assert model.config._attn_implementation == "astra"      # the decode ran with the model's own attention
    out = pm.generate(ids, max_new_tokens=3, return_dict_in_generate=True, output_scores=True)
    res.append(("dict", out, ref3))
    res.append(("scores", out.scores is not None, rank == last))
    # a streamer on every rank: the waiting rank's was never fed nor ended (a TextIteratorStreamer consumer there
    # waited forever); synced_gpus made HF all-reduce on the world group every step while the other rank waited in
    # astra's broadcast (PeerError after the timeout); a use_cache=False (a checkpoint's config) was refused
    streamer = _Collect()
    got = pm.generate(ids[:1], max_new_tokens=3, streamer=streamer, synced_gpus=True, use_cache=False)
    res.append(("streamer", (streamer.ended, streamer.tokens, torch.equal(got, ref3[:1])),
                (True, ref3[0].tolist(), True)))
    try:
        pm.generate(ids[0], max_new_tokens=2)
    except astra.InvalidInputError as e:
        res.append(("1-D", "add a batch dimension" in str(e), True))
    refused = _Collect()                # arguments refused on every rank: ended all the same
    try:
        pm.generate(ids[:1], max_new_tokens=2, cache_implementation="static", streamer=refused)
    except astra.UnsupportedModelError:
        res.append(("refused", refused.ended, True))
    failed = _Collect()                 # ended on every rank though the decode failed (a consumer would wait forever)
    try:
        pm.generate(ids[:1], max_new_tokens=2, stopping_criteria=[_Raise()] if rank == last else None,
                    streamer=failed)
    except (RuntimeError, astra.RankFailedError) as e:
        res.append(("failure", (type(e).__name__, "stopping criterion failed" in str(e), failed.ended),
                    ("RuntimeError" if rank == last else "RankFailedError", True, True)))
    pm.unpatch()
    # a decode longer than the timeout: heartbeats keep the waiting rank's waits short
    pm = astra.parallelize(model, None, timeout=2)
    t0 = time.perf_counter()
    got = pm.generate(ids, max_new_tokens=12, do_sample=False, stopping_criteria=[_Slow()] if rank == last else None)
    res.append(("heartbeat", (torch.equal(got, ref12), time.perf_counter() - t0 > 2.5), (True, True)))
    pm.unpatch()
    # a group broken by an earlier peer failure: PeerError, or (on_peer_failure="local") generate alone
    for mode, expected in (("raise", ("PeerError", True)), ("local", ("tokens", True, True))):
        pm = astra.parallelize(model, None, timeout=30, on_peer_failure=mode)
        pm._rt.broken = "peer lost (simulated)"
        if mode == "raise":
            broken = _Collect()
            with pytest.raises(astra.PeerError, match=r"peer lost \(simulated\)"):
                pm.generate(ids[:1], max_new_tokens=3, streamer=broken)
            res.append((f"broken {mode}", ("PeerError", broken.ended), expected))
        else:
            with pytest.warns(RuntimeWarning, match="generating on this rank alone"):
                got = pm.generate(ids, max_new_tokens=3)
            res.append((f"broken {mode}", ("tokens", torch.equal(got, ref3), pm.degraded), expected))
        pm.unpatch()
    return res


def _codebook_rank(rank, family):
    """With codebooks: distributed tokens equal simulate_generate (G = 1 table path, G = 32, left padding,
    predictive G = 1)."""
    model = gen_model(family)
    res = []
    for G, padded, predict in ((1, False, False), (32, True, False), (1, True, True)):
        inp = tiny_inputs(family, seq=11, padded=padded)
        cb = tiny_codebooks(model, family, G, sample_seeds=(21, 22), seed=3, predict=predict)
        kw = dict(attention_mask=inp.get("attention_mask"), max_new_tokens=5, do_sample=False)
        sim = astra.simulate_generate(model, inp["input_ids"], world_size=2, codebooks=cb, **kw)
        pm = astra.parallelize(model, cb, timeout=30)
        res.append((f"codebooks G={G}{' predictive' if predict else ''}", pm.generate(inp["input_ids"], **kw), sim))
        pm.unpatch()
    return res


def _generate_rank(rank):
    return {family: _family_rank(rank, family) + _codebook_rank(rank, family) for family in ("gpt2", "llama")}


def test_distributed_generation_equals_hf_generate():
    out = astra.launch(_generate_rank, 2, join_timeout=240)
    for family in ("gpt2", "llama"):
        for rank in (0, 1):
            for name, got, ref in out[rank][family]:
                if name == "dict":      # HF's output type on every rank; the sequences reach every rank
                    assert type(got).__name__ == "GenerateDecoderOnlyOutput"
                    assert torch.equal(got.sequences, ref) and ref.shape == (2, 13)
                elif isinstance(got, torch.Tensor):
                    assert torch.equal(got, ref), (family, name, rank, got.tolist(), ref.tolist())
                else:
                    assert got == ref, (family, name, rank, got, ref)
        names = [r[0] for r in out[0][family]]
        assert names[-11:] == ["scores", "streamer", "1-D", "refused", "failure", "heartbeat", "broken raise",
                               "broken local", "codebooks G=1", "codebooks G=32", "codebooks G=1 predictive"]


def _lm_head_rows(model, fn):
    """``fn()``'s result and the number of positions of every logits the LM head computed meanwhile."""
    rows = []
    head = model.lm_head.register_forward_hook(lambda m, a, o: rows.append(o.shape[1]))
    try:
        return fn(), rows
    finally:
        head.remove()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_prefill_computes_no_logits_of_the_prompt(family):
    """The prefill's LM head computed [B, T, V] logits nobody read (each rank of a long prompt took 1.7-2x the
    memory of HF's whole generate); as HF's own prefill, it now computes the last position's."""
    model = gen_model(family)
    inp = tiny_inputs(family, seq=11)
    cb = tiny_codebooks(model, family, 1, sample_seeds=(21, 22), seed=3)
    kw = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        want = model.generate(inp["input_ids"], **kw)
    for codebooks in (None, cb):
        got, rows = _lm_head_rows(model, lambda cbs=codebooks: astra.simulate_generate(
            model, inp["input_ids"], world_size=2, codebooks=cbs, **kw))
        assert rows and all(r == 1 for r in rows), rows
        if codebooks is None:
            assert torch.equal(got, want)


def _prefill_rows_rank(rank):
    model = gen_model("gpt2")
    ids = tiny_inputs("gpt2", seq=11)["input_ids"]
    pm = astra.parallelize(model, tiny_codebooks(model, "gpt2", 1, sample_seeds=(21, 22), seed=3), timeout=30)
    return _lm_head_rows(model, lambda: pm.generate(ids, max_new_tokens=3, do_sample=False))


def test_the_distributed_prefill_computes_no_logits_of_the_prompt():
    (got0, rows0), (got1, rows1) = astra.launch(_prefill_rows_rank, 2, join_timeout=120)
    assert torch.equal(got0, got1)
    assert rows0 == [1] and len(rows1) > 1 and all(r == 1 for r in rows1), (rows0, rows1)    # rank 1 decodes
