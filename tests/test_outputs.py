"""pm(**inputs, output=KIND, dst=...) over 2 gloo ranks: every output kind equals the unmodified model in full
precision (< 1e-4) and astra.simulate with codebooks; each sends only what it needs (pm.output_stats bytes);
task heads (BertForSequenceClassification, ViTForImageClassification, GPT2LMHeadModel,
GPT2ForSequenceClassification) work with no glue."""
import pytest
import torch
from test_runtime_support import tiny_codebooks, tiny_inputs, tiny_model

import astra
from astra.outputs import OUTPUTS, last_positions, pack, register_output, unpack
from astra.transport import ENVELOPE_NBYTES

TOL = 1e-4
LABELS = 3


def bert_classifier():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                        vocab_size=97, max_position_embeddings=64, pad_token_id=0, num_labels=LABELS)
    return tf.BertForSequenceClassification(cfg).eval()


def masked_mean(h, mask):
    w = torch.ones(h.shape[:2], dtype=h.dtype) if mask is None else mask.to(h.dtype)
    return (h * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)


def _d(a, b):
    return float((a - b).abs().max())


def _bert_cases(rank, inputs):
    """BertModel, class token on rank 0 only: every kind vs the model, and the bytes each moved."""
    model = tiny_model("bert")
    with torch.no_grad():
        ref = model(**inputs)
    pm = astra.parallelize(model, timeout=30)
    res = {}
    local = pm(**inputs)
    res["local_pooler"] = "pooler_output" in local            # only rank 0 holds [CLS]
    res["local_bytes"] = pm.output_stats.bytes_sent + pm.output_stats.bytes_received
    full = pm(**inputs, output="hidden_states")
    m = inputs["attention_mask"].bool()
    res["hidden"] = (_d(full.last_hidden_state[m], ref.last_hidden_state[m]), _d(full.pooler_output, ref.pooler_output))
    res["hidden_bytes"] = pm.output_stats.bytes_sent
    again = pm.gather(local)                                    # the explicit form
    res["gather"] = _d(again.last_hidden_state, full.last_hidden_state) + _d(again.pooler_output, full.pooler_output)
    pooled = pm(**inputs, output="mean_pooled")
    res["mean"] = _d(pooled, masked_mean(ref.last_hidden_state, inputs["attention_mask"]))
    res["mean_stats"] = (pm.output_stats.bytes_sent, pm.output_stats.bytes_received, pm.output_stats.bytes_on_wire)
    ct = pm(**inputs, output="class_token")
    res["cls"] = (_d(ct.pooler_output, ref.pooler_output), _d(ct.last_hidden_state, ref.last_hidden_state[:, :1]))
    res["cls_bytes"] = (pm.output_stats.bytes_sent, pm.output_stats.bytes_received)
    on1 = pm(**inputs, output="class_token", dst=1)
    res["dst1"] = None if on1 is None else _d(on1.pooler_output, ref.pooler_output)
    on0 = pm(**inputs, output="class_token", dst=0)             # rank 0 holds it: nothing moves
    res["dst0"] = (None if on0 is None else _d(on0.pooler_output, ref.pooler_output), pm.output_stats.bytes_sent)
    for bad, exc in (("everything", ValueError), ("last_logits", astra.UnsupportedModelError)):
        try:
            pm(**inputs, output=bad)
            res[bad] = None
        except exc as e:
            res[bad] = str(e)
    res["after_error"] = _d(pm(**inputs, output="mean_pooled"), masked_mean(ref.last_hidden_state,
                                                                           inputs["attention_mask"]))
    res.update(_disagreements(pm, rank, inputs))
    pm.unpatch()
    return res


def _boom(fw):
    def build():
        if fw.rank == 1:
            raise RuntimeError("no sums here")
        return torch.zeros(4, dtype=torch.uint8)
    return fw.exchange(build, [4, 4], "boom")


def _disagreements(pm, rank, inputs):
    """Ranks asking for different outputs, and a rank failing to build its part of an output."""
    res = {}
    try:
        pm(**inputs, output="mean_pooled" if rank == 0 else "local")
    except astra.InputMismatchError as e:
        res["mismatch"] = str(e)
    register_output("boom", "a kind whose part fails on rank 1")(_boom)
    try:
        pm(**inputs, output="boom")
    except astra.RankFailedError as e:
        res["boom"] = (e.rank, str(e))
    finally:
        del OUTPUTS["boom"]
    res["after_boom"] = tuple(pm(**inputs, output="mean_pooled").shape)
    return res


def _head_cases(rank, bert_inputs):
    """Task heads through parallelize, natural outputs, full precision and with codebooks vs simulate."""
    res = {}
    clf = bert_classifier()
    with torch.no_grad():
        ref = clf(**bert_inputs)
        base = clf.bert(**bert_inputs).last_hidden_state
    for ct in ("none", "distributed"):
        pm = astra.parallelize(clf, timeout=30, class_token=ct)
        out = pm(**bert_inputs)
        res[f"bert_clf_{ct}"] = (type(out).__name__, _d(out.logits, ref.logits), pm.output_stats.bytes_sent,
                                 pm.output_stats.bytes_received)
        res[f"bert_clf_mean_{ct}"] = _d(pm(**bert_inputs, output="mean_pooled"),
                                        masked_mean(base, bert_inputs["attention_mask"]))
        pm.unpatch()
    cb = tiny_codebooks(clf, "bert", 32)
    sim = astra.simulate(clf, bert_inputs, world_size=2, codebooks=cb)
    pm = astra.parallelize(clf, cb, timeout=30)
    res["bert_clf_astra"] = _d(pm(**bert_inputs).logits, sim.logits)
    pm.unpatch()

    vit = tiny_model("vit")
    px = tiny_inputs("vit")
    with torch.no_grad():
        vref = vit(**px)
        vbase = vit.vit(**px).last_hidden_state
    pm = astra.parallelize(vit, timeout=30)
    out = pm(**px)
    res["vit"] = (type(out).__name__, _d(out.logits, vref.logits), pm.output_stats.bytes_sent)
    res["vit_mean"] = _d(pm(**px, output="mean_pooled"), vbase.mean(1))
    pm.unpatch()

    gpt = tiny_model("gpt2")
    for pad in ("left", "right"):
        ids = tiny_inputs("gpt2", padded=True)
        if pad == "right":           # row 1 ends at position 4 (rank 0), row 0 at 10 (rank 1)
            mask = torch.ones_like(ids["input_ids"])
            mask[1, 5:] = 0
            ids = {"input_ids": ids["input_ids"], "attention_mask": mask}
        with torch.no_grad():
            gref = gpt(**ids).logits
        want = gref[torch.arange(2), last_positions(ids["attention_mask"].bool(), 2, 11)]
        pm = astra.parallelize(gpt, timeout=30)
        rows = []
        head = gpt.lm_head.register_forward_hook(lambda m, a, o, rows=rows: rows.append(o.shape[1]))
        last = pm(**ids, output="last_logits")
        head.remove()
        res[f"gpt_last_{pad}"] = (_d(last, want), pm.output_stats.bytes_sent)
        res[f"gpt_last_rows_{pad}"] = rows
        full = pm(**ids, output="hidden_states").logits
        m = ids["attention_mask"].bool()
        res[f"gpt_full_{pad}"] = _d(full[m], gref[m])
        res[f"gpt_natural_{pad}"] = pm(**ids).logits.shape[1]      # local: this rank's tokens
        pm.unpatch()
    res.update(_decoder_classifier_cases())
    res.update(_boundary_cases())
    res.update(_double_case())
    return res


def _boundary_cases():
    """Rows whose last attended position is the first token of a rank, and a ViT base model's gathered outputs
    (distributed class tokens: the class row is replicated, not gathered)."""
    gpt = tiny_model("gpt2")
    ids = tiny_inputs("gpt2")["input_ids"]          # T = 11: rank 0 holds 0..5, rank 1 holds 6..10
    res = {}
    for name, ends in (("both_at_6", (6, 6)), ("at_6_and_0", (6, 0))):
        mask = torch.zeros_like(ids)
        for row, end in enumerate(ends):
            mask[row, :end + 1] = 1
        with torch.no_grad():
            want = gpt(input_ids=ids, attention_mask=mask).logits[torch.arange(2), torch.tensor(ends)]
        pm = astra.parallelize(gpt, timeout=30)
        try:
            res[f"last_{name}"] = _d(pm(input_ids=ids, attention_mask=mask, output="last_logits"), want)
        finally:
            pm.unpatch()
    vit = tiny_model("vit", head=False)
    px = tiny_inputs("vit")
    with torch.no_grad():
        ref = vit(**px)
    pm = astra.parallelize(vit, timeout=30)
    try:
        full = pm(**px, output="hidden_states")
        res["vit_hidden"] = (tuple(full.last_hidden_state.shape), _d(full.last_hidden_state, ref.last_hidden_state),
                             _d(full.pooler_output, ref.pooler_output))
    finally:
        pm.unpatch()
    return res


def _double_case():
    """A float64 model's mean-pooled output: its sums were taken in float32 (a float32 answer's error, ~1e-7, cast
    back to float64); they are float64 now, as the model is."""
    model = tiny_model("bert").double()
    inputs = tiny_inputs("bert", padded=True)
    with torch.no_grad():
        want = masked_mean(model(**inputs).last_hidden_state, inputs["attention_mask"].double())
    pm = astra.parallelize(model, timeout=30)
    try:
        out = pm(**inputs, output="mean_pooled")
    finally:
        pm.unpatch()
    return {"mean_f64": (out.dtype, _d(out, want))}


def _decoder_classifier_cases():
    """GPT2ForSequenceClassification pools at each row's last non-pad token, wherever it lies."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=64, pad_token_id=0,
                        num_labels=LABELS)
    clf = tf.GPT2ForSequenceClassification(cfg).eval()
    ids = tiny_inputs("gpt2")["input_ids"]
    ids[1, 4:] = 0                  # right padding: row 1 pools at position 3 (rank 0), row 0 at 10 (rank 1)
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    with torch.no_grad():
        ref = clf(**inputs).logits
    pm = astra.parallelize(clf, timeout=30)
    out = pm(**inputs)
    res = {"gclf": (type(out).__name__, _d(out.logits, ref), pm.output_stats.bytes_sent)}
    res["gclf_local"] = "logits" in pm(**inputs, output="local")        # pooled elsewhere: dropped
    res["gclf_full"] = _d(pm(**inputs, output="hidden_states").logits, ref)
    pm.unpatch()
    return res


def _rank(rank):
    inputs = tiny_inputs("bert", padded=True)
    return _bert_cases(rank, inputs), _head_cases(rank, inputs)


@pytest.fixture(scope="module")
def ranks():
    return astra.launch(_rank, 2, join_timeout=300)


def test_pack_reads_one_element_tensors_of_any_stride():
    """HF's QA heads give [1, 1] start / end logits of strides (2, 2) for a rank holding one token of a one-row batch
    (contiguous to torch, so kept as they are): pack's byte view refused them, and gather / output="hidden_states"
    failed on every rank."""
    start = torch.randn(1, 1, 2).split(1, -1)[0].squeeze(-1).contiguous()
    assert start.stride() == (2, 2)
    rows = torch.randn(3, 4)
    back = unpack(pack([start, rows, rows[:0]]), [start, rows, rows[:0]])
    assert torch.equal(back[0], start) and torch.equal(back[1], rows) and back[2].shape == (0, 4)


def test_registry_has_the_kinds():
    assert {"local", "hidden_states", "mean_pooled", "class_token", "last_logits"} <= set(OUTPUTS)
    m = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]).bool()
    assert last_positions(m, 3, 4).tolist() == [3, 1, 3]
    assert last_positions(None, 2, 7).tolist() == [6, 6]
    ids = torch.tensor([[5, 6, 0, 0], [0, 0, 7, 8], [0, 0, 0, 0]])
    fam = astra.family_of(tiny_model("gpt2", head="sequence_classification"))      # pad_token_id 0
    assert fam.pooled_tokens({"input_ids": ids}, 3, 4).tolist() == [1, 3, 0]      # HF: the rightmost non-pad token
    assert fam.pooled_tokens({}, 3, 4).tolist() == [3, 3, 3]


def test_class_token_output_needs_a_field_computed_from_the_class_token():
    """A BERT head whose outputs are all per-token (token classification, masked LM, question answering) has no
    class-token field: output='class_token' is refused before any forward (it was a KeyError on every rank); a base
    model and a sequence classifier keep it."""
    from astra.outputs import resolve_output

    for head in ("token_classification", "masked_lm", "question_answering"):
        with pytest.raises(astra.UnsupportedModelError, match=f"{head} head's outputs are all per-token"):
            resolve_output(astra.family_of(tiny_model("bert", head=head)), "class_token")
    for head in (False, "sequence_classification"):
        assert resolve_output(astra.family_of(tiny_model("bert", head=head)), "class_token").name == "class_token"


def test_bert_every_kind_two_ranks(ranks):
    B, D, T = 2, 64, 11
    for rank, (res, _) in enumerate(ranks):
        assert res["local_pooler"] == (rank == 0) and res["local_bytes"] == 0
        assert max(res["hidden"]) < TOL and res["gather"] == 0.0
        assert res["hidden_bytes"] == B * len(astra.split_indices(T, 2, False)[rank]) * D * 4 + \
            (B * D * 4 if rank == 0 else 0)           # its tokens, and rank 0 the pooler output
        assert res["mean"] < TOL
        # mean pooling: B sums of D floats and B counts, whatever T is
        assert res["mean_stats"] == (B * (D + 1) * 4, B * (D + 1) * 4, ENVELOPE_NBYTES + B * (D + 1) * 4)
        assert max(res["cls"]) < TOL
        assert res["cls_bytes"] == ((B * D * 4 * 2, 0) if rank == 0 else (0, B * D * 4 * 2))
        assert (res["dst1"] is None) == (rank == 0) and (rank == 0 or res["dst1"] < TOL)
        assert (res["dst0"][0] is None) == (rank == 1) and res["dst0"][1] == 0
        assert "everything" in res["everything"] and "causal LM head" in res["last_logits"]
        assert res["after_error"] < TOL                # the group stays usable after a refused request
        assert "output='mean_pooled'" in res["mismatch"] and "output='local'" in res["mismatch"]
        assert res["boom"][0] == 1 and "no sums here" in res["boom"][1]     # every rank names rank 1's error
        assert res["after_boom"] == (B, D)


def test_task_heads_two_ranks(ranks):
    for rank, (_, res) in enumerate(ranks):
        name, d, sent, recv = res["bert_clf_none"]
        assert name == "SequenceClassifierOutput" and d < TOL
        assert (sent, recv) == ((2 * LABELS * 4, 0) if rank == 0 else (0, 2 * LABELS * 4))   # the logits only
        name, d, sent, recv = res["bert_clf_distributed"]
        assert name == "SequenceClassifierOutput" and d < TOL and sent == recv == 0
        assert res["bert_clf_mean_none"] < TOL and res["bert_clf_mean_distributed"] < TOL
        assert res["bert_clf_astra"] < TOL
        name, d, sent = res["vit"]
        assert name == "ImageClassifierOutput" and d < TOL and sent == 0
        assert res["vit_mean"] < TOL
        for pad in ("left", "right"):
            d, sent = res[f"gpt_last_{pad}"]
            assert d < TOL and res[f"gpt_full_{pad}"] < TOL
            assert res[f"gpt_natural_{pad}"] == (6 if rank == 0 else 5)
        # left padding: every row's last position is on rank 1, which sends B rows of V logits; right padding:
        # each rank sends the row it holds
        assert res["gpt_last_left"][1] == (2 * 97 * 4 if rank == 1 else 0)
        assert res["gpt_last_right"][1] == 97 * 4
        # the LM head computes the positions last_logits reads, not every local token's [B, n, V]
        assert res["gpt_last_rows_left"] == [1 if rank == 1 else 0] and res["gpt_last_rows_right"] == [1], res
        name, d, sent = res["gclf"]
        assert name == "SequenceClassifierOutputWithPast" and d < TOL and sent == LABELS * 4   # its one row
        assert res["gclf_local"] is False and res["gclf_full"] < TOL


def test_last_logits_at_the_first_token_of_a_rank(ranks):
    """A row whose last attended position is the first token of a rank's chunk (position 6 of 11 on 2 ranks, or
    position 0) belongs to that rank: the owner search must take the chunk that starts there (``searchsorted(...,
    right=True) - 1``); with ``right=False`` it named the rank before (or rank -1), which indexed past its tokens.
    The existing cases put every row's last position strictly inside a chunk, so they missed it."""
    for _, res in ranks:
        assert res["last_both_at_6"] < TOL and res["last_at_6_and_0"] < TOL


def test_hidden_states_with_distributed_class_tokens(ranks):
    """output='hidden_states' of a ViT base model (distributed class tokens, class token replicated on every rank)
    equals the model: each rank sends only its non-replicated tokens and the class row is put back once. Only
    BERT (single class token) was gathered before, so sending the replicated class row too went unnoticed."""
    for _, res in ranks:
        shape, d_hidden, d_pooler = res["vit_hidden"]
        assert shape == (2, 17, 64) and d_hidden < TOL and d_pooler < TOL



def test_mean_pooled_of_a_float64_model_sums_in_float64(ranks):
    for _, res in ranks:
        dtype, d = res["mean_f64"]
        assert dtype == torch.float64 and d < 1e-12
