"""astra.parallelize over real gloo ranks (astra.launch): full-precision SP equals the model, ASTRA equals
astra.simulate with calibrated codebooks (G in {1, 32}), per-layer bytes equal the codec frame sizes (layer 0
exchanges nothing: every rank computes it)."""
import torch
from test_runtime_support import codebook_case, max_diff, predictive_case, tiny_codebooks, tiny_inputs, tiny_model

import astra

TOL = 1e-4


def run_cases(rank, cases, timeout=30.0, overlap=True):
    """Rank body: for each case, compare this rank's gathered output with simulate and the model."""
    import torch.distributed as dist

    world = dist.get_world_size()
    results = []
    for family, head, padded, spec, class_token in cases:
        G, basis = codebook_case(spec)
        model = tiny_model(family, head=head)
        inputs = tiny_inputs(family, seq=11, padded=padded)
        cb = None
        if G is not None:
            cb = tiny_codebooks(model, family, G, basis=basis, predict=predictive_case(spec))
        with torch.no_grad():
            ref = model(**inputs)
        sim = astra.simulate(model, inputs, world_size=world, codebooks=cb, class_token=class_token)
        pm = astra.parallelize(model, cb, class_token=class_token, timeout=timeout, overlap=overlap)
        local = pm(**inputs, output="local")
        exchanges = pm.exchanges
        full = pm.gather(local)
        stats = [(s.bytes_sent, s.bytes_received, s.bytes_on_wire, s.wait_s) for s in pm.stats]
        try:
            model(**inputs)
            raise AssertionError("calling the patched model directly must raise")
        except astra.AstraError:
            pass
        astra.unpatch(model)
        with torch.no_grad():   # reversible: the unpatched model is the original model again
            again = model(**inputs)
        assert all(torch.equal(again[k], ref[k]) for k in ref.keys() if isinstance(ref[k], torch.Tensor))
        rec = {"case": (family, head, padded, spec, class_token), "stats": stats,
               "transformed": cb is not None and cb.transformed,
               "local_len": {k: v.shape[1] for k, v in local.items() if isinstance(v, torch.Tensor) and v.dim() == 3},
               "local_idx": pm.last_local_indices.tolist(), "vs_sim": {}, "vs_ref": {},
               "bits": None if cb is None else cb.bits, "type_ok": type(full) is type(ref),
               "tables": pm._rt.tables is not None, "costs": pm._rt.split_costs, "causal": pm._rt.fam.causal,
               "exchanges": exchanges, "layers": pm._rt.fam.num_layers}
        rec["dropped"] = sorted(k for k, r in ref.items() if isinstance(r, torch.Tensor) and full.get(k) is None)
        rec["local_dropped"] = sorted(k for k, r in ref.items() if isinstance(r, torch.Tensor) and local.get(k) is None)
        for key, r in ref.items():
            if isinstance(r, torch.Tensor) and key not in rec["dropped"]:
                rec["vs_sim"][key] = max_diff(full[key], sim[key], inputs)
                rec["vs_ref"][key] = max_diff(full[key], r, inputs)
        rec["B"] = (inputs.get("input_ids") if "input_ids" in inputs else inputs["pixel_values"]).shape[0]
        rec["T"] = 17 if family == "vit" else inputs["input_ids"].shape[1]
        results.append(rec)
    return results


def check(results_per_rank, world):
    from astra.transport import ENVELOPE_NBYTES
    from astra_kernels import frame_nbytes

    for rank, results in enumerate(results_per_rank):
        for rec in results:
            family, head, padded, spec, class_token = rec["case"]
            G, basis = codebook_case(spec)
            assert rec["transformed"] == (G is not None and (G > 1 if basis == "auto" else basis != "none"))
            assert rec["type_ok"]
            # output="local": pooled head outputs a rank did not compute from the model's own token are left out
            # (the class token lives on rank 0 without distributed class tokens; a decoder classifier pools at a
            # token that may sit on any rank); the gather then brings every field
            encoder = family in ("bert", "roberta")
            owned = class_token == "distributed" or (encoder and rank == 0)
            pooled = ["logits"] if head == "sequence_classification" else ["pooler_output"] if (
                encoder and head in (True, False)) else []
            assert rec["local_dropped"] == ([] if owned else pooled), (rank, rec["case"])
            assert rec["dropped"] == [], (rank, rec["case"])
            # G = 1 runs the precomputed K/V table path (not with predictive codebooks: K/V depend on the prediction)
            assert rec["tables"] == (G == 1 and not predictive_case(spec))
            for key, d in rec["vs_sim"].items():
                assert d < TOL, (rank, rec["case"], key, d)
            if G is None:
                for key, d in rec["vs_ref"].items():
                    assert d < TOL, (rank, rec["case"], key, d)
            cls = family == "vit" or class_token == "distributed"
            # the input agreement, one all-gather per layer but layer 0 (every rank computes its inputs from the
            # embedding output), the class-token mean, the end-of-forward status
            assert rec["exchanges"] == 1 + rec["layers"] - 1 + cls + 1, (rec["case"], rec["exchanges"])
            chunks = astra.split_indices(rec["T"], world, cls, rec["costs"])
            n = [len(c) for c in chunks]
            assert rec["local_idx"] == astra.local_indices(rec["T"], world, rank, cls, rec["costs"]).tolist()
            # causal models: no query attends to the last rank's tokens, so it sends nothing (and encodes nothing)
            senders = [not (rec["causal"] and s == world - 1) for s in range(world)]
            for layer, (sent, recv, wire, wait) in enumerate(rec["stats"]):
                B = rec["B"]
                if layer == 0:
                    assert (sent, recv, wire, wait) == (0, 0, 0, 0.0), (rec["case"], sent, recv, wire)
                    continue
                if G is None:
                    per = 64 * 4
                    sizes = [B * k * per if snd else 0 for k, snd in zip(n, senders)]
                    assert sent == sizes[rank] and recv == sum(sizes) - sizes[rank], (rec["case"], layer, sent, sizes)
                    assert wire == ENVELOPE_NBYTES + max(sizes)
                else:
                    sizes = [frame_nbytes((B, k, G), rec["bits"]) if snd else 0 for k, snd in zip(n, senders)]
                    assert sent == sizes[rank], (rec["case"], layer, sent, sizes)
                    assert not senders[rank] or sent == 12 + 4 * 3 + -(-B * n[rank] * G * rec["bits"] // 8)
                    assert recv == sum(sizes) - sizes[rank]
                    assert wire == ENVELOPE_NBYTES + max(sizes)      # every frame travels behind an envelope
                assert wait >= 0.0


CASES_2 = [
    (f, True, f != "vit", G, "auto") for f in ("gpt2", "llama", "bert", "vit") for G in (None, 1, 32)
] + [("bert", True, True, 32, "distributed"), ("llama", False, False, None, "auto")] + [
    # the families added by the registry, and heads whose outputs the local + gather path carries: token-level
    # heads, and class-token heads with distributed class tokens (every rank then holds the merged class token)
    (f, True, True, G, "auto") for f in ("mistral", "qwen2", "qwen3", "roberta") for G in (None, 1)
] + [("qwen3", False, False, 32, "auto"), ("roberta", "token_classification", True, 32, "auto"),
     ("gpt2", "token_classification", True, None, "auto"), ("bert", "question_answering", True, None, "auto"),
     ("bert", "sequence_classification", True, None, "distributed"),
     ("roberta", "sequence_classification", True, 1, "distributed"),
     ("bert", "sequence_classification", True, None, "auto"),
     ("gpt2", "sequence_classification", True, None, "auto")] + [
    # transformed codebooks (non-orthogonal: the attention basis) on the G = 1 table path, the PCA rotation, and
    # G = 32 in the model's own basis
    ("gpt2", True, True, "1a", "auto"), ("llama", True, True, "1a", "auto"), ("gpt2", True, True, "4p", "auto"),
    ("bert", True, True, "32n", "auto")] + [
    # predictive codebooks: encoders predict from the embedding output too (ViT: distributed class tokens), decoders
    # from the previous layer only
    ("bert", True, True, "32+", "auto"), ("vit", True, False, "1+", "auto"), ("gpt2", True, True, "32+", "auto"),
    ("llama", True, True, "1+", "auto"), ("bert", "sequence_classification", True, "1+", "distributed")]


def test_two_gloo_ranks_all_families():
    results = astra.launch(run_cases, 2, CASES_2, join_timeout=240)
    check(results, 2)


def _half_precision_rank(rank):
    out = {}
    for family in ("gpt2", "bert", "vit"):
        model = tiny_model(family).to(torch.bfloat16)
        inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                  for k, v in tiny_inputs(family, seq=11, padded=family != "vit").items()}
        for G, basis in ((32, "auto"), (1, "pca"), (1, "attention")):      # G = 1: the K/V tables
            cb = tiny_codebooks(model, family, G, basis=basis)
            sim = astra.simulate(model, inputs, world_size=2, codebooks=cb)
            pm = astra.parallelize(model, cb, timeout=30)           # overlap=True: local and non-local passes merged
            full = pm.gather(pm(**inputs, output="local"))
            out[family, G, basis] = max(max_diff(full[k].float(), sim[k].float(), inputs) for k, v in sim.items()
                                        if isinstance(v, torch.Tensor))
            pm.unpatch()
    return out


def test_half_precision_overlap_equals_simulate_exactly():
    """A bf16 model's overlapped passes returned their partial outputs in bf16 and the merge rounded again: up to
    0.008 off simulate (which rounds once), and slightly less accurate. G = 1 transformed codebooks' K/V tables were
    built through the inverse transform and the projection, per-token decoding through the folded projection:
    0.004-0.008 apart in bf16 (one home now, ``RuntimeBase.folded_kv``)."""
    for out in astra.launch(_half_precision_rank, 2, join_timeout=240):
        assert len(out) == 9 and set(out.values()) == {0.0}, out


def _threads_rank(rank):
    """Two threads per rank calling one ParallelModel (a server's request threads), then gather and generate."""
    import threading

    model = tiny_model("gpt2", head="causal_lm")
    x = tiny_inputs("gpt2", seq=12)
    with torch.no_grad():
        ref = model(**x).logits
    cb = tiny_codebooks(model, "gpt2", 1)
    sim = astra.simulate(model, x, world_size=2, codebooks=cb).logits
    pm = astra.parallelize(model, cb, timeout=30)
    errors, diffs = [], []

    def serve():
        try:
            for _ in range(6):
                diffs.append(float((pm(**x, output="last_logits") - sim[:, -1]).abs().max()))   # one call
        except Exception as e:      # noqa: BLE001 - reported to the test
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=serve) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pm.unpatch()
    full = astra.parallelize(model, None, timeout=30)
    after = float((full.gather(full(**x)).logits - ref).abs().max())
    full.unpatch()
    return errors, diffs, after


def test_a_parallel_model_called_from_two_threads_runs_the_calls_in_turn():
    """Two threads' calls interleaved in one forward's state: KeyError, FrameMismatchError, "call counters differ",
    and a PeerError that left the group unusable. Each call now waits for the other's (same inputs: any order; a
    forward and its gather are two calls, which threads must not interleave)."""
    for errors, diffs, after in astra.launch(_threads_rank, 2, join_timeout=240):
        assert not errors and len(diffs) == 12 and max(diffs) < 1e-5, (errors, diffs)
        assert after < 1e-5
