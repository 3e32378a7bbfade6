"""Interleaved A/B of ``astra.parallelize`` options on the bench models (2 ranks x 1 thread, unshaped loopback).

    python bench/runtime_ab.py --variants g1-even,g1-balanced,g32-even,g32-balanced --repeats 5

A variant is ``<g1|g32|g32n|g1p|g32p|fp>-<split>``: the codebooks (G = 1 or 32, K = 1024, k-means on random inputs,
as ``astra bench``, transformed when G > 1; ``g32n``: G = 32 in the model's basis; ``g1p`` / ``g32p``: predictive
codebooks; ``fp``: full precision) and the split
(``astra.split.SPLITS``). Each repeat runs every variant once (after one warm-up forward each), so load drifts
hit every variant alike. Prints per variant the median
slowest-rank wall time, the median slowest-rank CPU time (``time.process_time``: less sensitive to other load
on the machine) and every rank's median phase totals from :mod:`astra.profile`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

#: codebooks of a variant: (G, astra.calibrate's basis, predict); g32n: G = 32 in the model's basis (not transformed)
GROUPS = {"g1": (1, "auto", False), "g32": (32, "auto", False), "g32n": (32, "none", False),
          "g1p": (1, "auto", True), "g32p": (32, "auto", True), "fp": None}


def _rank(rank, variants, paths, model_name, layers, tokens, repeats):
    import torch
    import torch.distributed as dist

    import astra
    from astra.bench.models import build_inputs, build_model

    torch.set_num_threads(1)
    model = build_model(model_name, layers, tokens)
    inputs = build_inputs(model_name, tokens)
    cbs = {k: astra.Codebooks.load(p) for k, p in paths.items()}
    res = {v: {"wall": [], "cpu": [], "phases": []} for v in variants}
    with torch.inference_mode():
        for i in range(repeats + 1):
            for v in variants:
                cb, split = v.split("-", 1)
                pm = astra.parallelize(model, cbs.get(cb), profile=True, split=split)
                try:
                    dist.barrier()
                    pm(**inputs)                   # warm-up (tables, workspaces)
                    dist.barrier()
                    t0, c0 = time.perf_counter(), time.process_time()
                    pm(**inputs)
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                finally:
                    pm.unpatch()
                if i:
                    res[v]["wall"].append(wall)
                    res[v]["cpu"].append(cpu)
                    res[v]["phases"].append(pm.breakdown.phase_totals())
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="g1-even,g1-balanced,g32-even,g32-balanced")
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    import astra
    from astra.bench.models import bench_codebooks, build_model
    from astra.bench.ranks import slowest
    from astra.split import SPLITS

    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    for v in variants:
        cb, _, split = v.partition("-")
        if cb not in GROUPS or split not in SPLITS:
            ap.error(f"variant {v!r}: expected <{'|'.join(GROUPS)}>-<{'|'.join(SPLITS)}>")
    with tempfile.TemporaryDirectory(prefix="astra-ab-") as tmp:
        model = build_model(a.model, a.layers, a.tokens)
        paths = {}
        for cb in sorted({v.split("-")[0] for v in variants} - {"fp"}):
            c = bench_codebooks(model, a.model, a.tokens, *GROUPS[cb])
            paths[cb] = os.path.join(tmp, f"{cb}.safetensors")
            c.save(paths[cb])
        out = astra.launch(_rank, 2, variants, paths, a.model, a.layers, a.tokens, a.repeats, timeout=900.0)
    for v in variants:
        wall, cpu = slowest([r[v]["wall"] for r in out]), slowest([r[v]["cpu"] for r in out])
        print(f"{v}: wall {statistics.median(wall):.3f} s (slowest rank, median of {a.repeats}), CPU "
              f"{statistics.median(cpu):.3f} s; per rank CPU "
              + ", ".join(f"{statistics.median(r[v]['cpu']):.3f}" for r in out))
        for rank, r in enumerate(out):
            ph = {p: statistics.median(d[p] for d in r[v]["phases"]) for p in r[v]["phases"][0]}
            print(f"  rank {rank} ms: " + ", ".join(f"{p} {1e3 * t:.0f}" for p, t in ph.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
