"""Generation (GPT-2, Llama): parallel prefill, then the last rank builds the KV cache from codes and decodes
alone. Greedy tokens equal simulate-based prefill + the same decode; full precision equals the model."""
import pytest
import torch
from test_runtime_support import tiny_inputs, tiny_model

import astra


def _reference_greedy(model, ids, n, mask=None):
    toks = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
            t = logits.argmax(-1)
            toks.append(t)
            ids = torch.cat([ids, t[:, None]], 1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    return torch.stack(toks, 1)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_full_precision_generation_equals_model(family):
    model = tiny_model(family)
    for padded in (False, True):
        inputs = tiny_inputs(family, seq=10, padded=padded)
        ref = _reference_greedy(model, inputs["input_ids"], 6, inputs.get("attention_mask"))
        for n in (1, 2, 3):
            got = astra.simulate_generate(model, inputs["input_ids"], world_size=n, max_new_tokens=6,
                                          attention_mask=inputs.get("attention_mask"))
            assert torch.equal(got, ref), (family, padded, n)


def test_generation_rejects_encoders_and_headless():
    with pytest.raises(astra.UnsupportedModelError, match="needs a decoder"):
        astra.simulate_generate(tiny_model("bert"), torch.ones(1, 4, dtype=torch.long), world_size=2,
                                max_new_tokens=2)
    with pytest.raises(astra.UnsupportedModelError, match="LM head"):
        astra.simulate_generate(tiny_model("gpt2", head=False), torch.ones(1, 4, dtype=torch.long),
                                world_size=2, max_new_tokens=2)


def _generate_rank(rank, family, groups):
    model = tiny_model(family)
    inputs = tiny_inputs(family, seq=11)
    samples = [tiny_inputs(family, seq=16, batch=4, seed=s) for s in (21, 22)]
    padded = tiny_inputs(family, seq=11, padded=True)
    res = []
    for G, inp in [(G, inputs) for G in groups] + [(groups[-1], padded)]:
        cb = astra.calibrate(model, samples, groups=G, codebook_size=16, iters=4, seed=3)
        mask = inp.get("attention_mask")
        sim = astra.simulate_generate(model, inp["input_ids"], world_size=2, max_new_tokens=5, codebooks=cb,
                                      attention_mask=mask)
        pm = astra.parallelize(model, cb, timeout=30)
        got = pm.generate(inp["input_ids"], max_new_tokens=5, attention_mask=mask)
        # the decode ran with the model's own attention; the model is still parallel afterwards
        assert model.config._attn_implementation == "astra"
        pm.unpatch()
        res.append((sim, got))
    return res


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_distributed_generation_equals_simulate(family):
    out = astra.launch(_generate_rank, 2, family, (1, 32), join_timeout=150)
    for (_, got0), (sim, got) in zip(out[0], out[1]):
        assert got0 is None                       # only the last rank decodes
        assert got.shape == (2, 5)
        assert torch.equal(got, sim)
