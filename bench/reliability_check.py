"""Reproduce every numbered case of issue 11 outside pytest, on 2 and 3 local gloo ranks, and print per case and
rank the exception raised, or FAIL (a hang, an abort, no exception, or a wrong next call).

    python bench/reliability_check.py                 # worlds 2 and 3, every case
    python bench/reliability_check.py --worlds 2 --cases 1a 2b

Each case runs in its own process group (astra.launch), with a 5 s peer timeout. Per rank it prints the
exception of the faulty call (type: message, shortened), then whether the next, good call on every rank equals
`astra.simulate` (max abs diff). A rank that died (SIGABRT in gloo, ...) or outlived the join timeout is a FAIL.
Case 4 (codebook files) is single-process: 1000 random single-byte flips of a saved codebook file.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

TIMEOUT_S = 5.0
CASES = {
    "1a": "same shape, different input_ids on rank 1",
    "1b": "different length on rank 1 (T-2 tokens)",
    "1c": "different batch size on rank 1",
    "2a": "out-of-vocabulary id in the last rank's chunk (same inputs everywhere)",
    "2b": "one-sided exception on the last rank inside layer 1",
    "3": "ParallelModel used after astra.unpatch (GPT-2 and BERT)",
    "5a": "NaN in the last rank's hidden state entering layer 1",
    "5b": "1-D input_ids",
    "kill": "SIGKILL of the last rank mid-forward, on_peer_failure='local' on the survivors",
}


def _model(family: str):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=64,
                                                  bos_token_id=0, eos_token_id=0)).eval()
    return tf.BertModel(tf.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                      intermediate_size=128, vocab_size=97, max_position_embeddings=64)).eval()


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text if len(text) <= 230 else text[:227] + "..."


def _fault(model, case: str, rank: int, last: int):
    """Install the case's one-shot fault on the last rank; returns the hook handle (or None)."""
    import signal

    if rank != last or case not in ("2b", "5a", "kill"):
        return None
    block = model.transformer.h[1]
    if case == "kill":
        return block.attn.register_forward_pre_hook(lambda m, a: os.kill(os.getpid(), signal.SIGKILL))
    if case == "2b":
        def boom(module, args):
            raise RuntimeError("one-sided fault on this rank")
        return block.mlp.register_forward_pre_hook(boom)

    def poison(module, args, kwargs):
        key = "hidden_states" if "hidden_states" in kwargs else None
        h = (kwargs[key] if key else args[0]).clone()
        h[0, 3] = float("nan")
        return (args, dict(kwargs, hidden_states=h)) if key else ((h,) + args[1:], kwargs)
    return block.register_forward_pre_hook(poison, with_kwargs=True)


def _bad_inputs(case: str, ids, rank: int, world: int):
    import torch

    if case == "1a" and rank == 1:
        other = ids.clone()
        other[0, 4] = (other[0, 4] + 1) % 97
        return {"input_ids": other}
    if case == "1b" and rank == 1:
        return {"input_ids": ids[:, :-2]}
    if case == "1c" and rank == 1:
        return {"input_ids": torch.cat([ids, ids[:1]])}
    if case == "2a":
        oov = ids.clone()
        oov[0, -1] = 97
        return {"input_ids": oov}
    if case == "5b":
        return {"input_ids": ids[0]}
    return {"input_ids": ids}


def rank_body(rank: int, case: str):
    import torch
    import torch.distributed as dist

    import astra

    world = dist.get_world_size()
    family = "bert" if case == "3bert" else "gpt2"
    model = _model(family)
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    good = {"input_ids": ids}
    cb = astra.Codebooks.random(model, groups=1, codebook_size=8)
    sim = astra.simulate(model, good, world_size=world, codebooks=cb)
    mode = "local" if case == "kill" else "raise"
    pm = astra.parallelize(model, cb, timeout=TIMEOUT_S, on_peer_failure=mode)
    pm.gather(pm(**good))
    handle = _fault(model, case, rank, world - 1)
    if case.startswith("3"):
        astra.unpatch(model)
    t0 = time.monotonic()
    try:
        out = pm(**_bad_inputs(case, ids, rank, world))
        raised = None
    except Exception as e:
        raised = _short(e)
    took = time.monotonic() - t0
    if handle is not None:
        handle.remove()
    if case == "kill":
        with torch.no_grad():
            ref = _model("gpt2")(**good).logits
        diff = float((pm.gather(out).logits - ref).abs().max())
        return {"raised": raised, "took": took, "next": f"survivor vs unmodified model {diff:.2e}",
                "ok": raised is None and diff < 1e-4 and pm.degraded}
    if case.startswith("3"):
        return {"raised": raised, "took": took, "next": "n/a (unpatched)", "ok": raised is not None}
    key = "logits"
    full = pm.gather(pm(**good))
    diff = float((full[key] - sim[key]).abs().max())
    return {"raised": raised, "took": took, "next": f"next call vs simulate {diff:.2e}",
            "ok": raised is not None and diff < 1e-4}


def run_case(case: str, world: int) -> bool:
    import astra

    t0 = time.monotonic()
    try:
        results = dict(enumerate(astra.launch(rank_body, world, case, join_timeout=90)))
        dead = []
    except astra.LaunchError as e:
        results, dead = e.results, e.dead
        for r, tb in e.errors.items():
            results[r] = {"raised": "harness error " + tb.splitlines()[0], "took": 0, "next": "", "ok": False}
    ok = True
    for r in range(world):
        if r in dead:
            expected = case == "kill" and r == world - 1
            print(f"  rank {r}: {'killed (the victim)' if expected else 'FAIL: died / hung (no result)'}")
            ok &= expected
            continue
        res = results[r]
        verdict = "ok" if res["ok"] else "FAIL"
        raised = res["raised"] or ("no exception" if case == "kill" else "FAIL: no exception (silent)")
        print(f"  rank {r}: [{verdict}] {raised}  ({res['took']:.2f}s; {res['next']})")
        ok &= res["ok"]
    print(f"  wall {time.monotonic() - t0:.1f}s")
    return ok


def codebook_flips(n: int = 1000) -> bool:
    import warnings

    import torch

    import astra

    cb = astra.Codebooks.random(_model("gpt2"), groups=2, codebook_size=4, seed=3)
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "cb.safetensors", Path(d) / "flip.safetensors"
        cb.save(src)
        raw = src.read_bytes()
        rng = random.Random(0)
        counts = {"refused": 0, "identical": 0, "FAIL (different values)": 0}
        for _ in range(n):
            b = bytearray(raw)
            i = rng.randrange(len(b))
            b[i] = (b[i] + rng.randrange(1, 256)) % 256
            dst.write_bytes(bytes(b))
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    got = astra.Codebooks.load(dst)
            except ValueError:
                counts["refused"] += 1
                continue
            same = got.model_type == cb.model_type and all(torch.equal(a, c) for a, c in zip(got.tensors, cb.tensors))
            counts["identical" if same else "FAIL (different values)"] += 1
    print(f"  {n} random single-byte flips of a {len(raw)}-byte codebook file: {counts}")
    return counts["FAIL (different values)"] == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--cases", nargs="+", default=list(CASES) + ["4"])
    args = ap.parse_args()
    all_ok = True
    for case in args.cases:
        if case == "4":
            print("case 4: codebook file integrity")
            all_ok &= codebook_flips()
            continue
        for world in args.worlds:
            for sub in (["3gpt2", "3bert"] if case == "3" else [case]):
                print(f"case {sub} ({CASES[case]}), {world} ranks")
                all_ok &= run_case(sub, world)
    print("ALL CASES OK" if all_ok else "SOME CASES FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
