"""Interleaved A/B of :func:`astra.tune_allocator` (glibc's mmap / trim thresholds) on the bench models.

    python bench/allocator_ab.py --systems g32,g1,plain --rounds 3

Each round launches 2 ranks x 1 thread (unshaped loopback) twice, untuned then tuned (``astra.launch``'s
``tune_allocator``; mallopt cannot be undone in a process, so each setting needs its own processes). In every
launch each rank runs, per system, one warm-up forward and ``--forwards`` timed ones, recording the slowest
rank's wall time and every rank's minor page faults and system CPU time (``resource.getrusage``) over them.
Systems: ``g32`` / ``g1``: ``astra.parallelize`` with the bench codebooks (G = 32 / 1, K = 1024), causal
split "auto"; ``plain``: the unmodified model on each rank's T / 2 tokens with no communication (the ceiling's
work). Prints per system and setting the median over rounds of the median forward, and the faults and system
time per rank per forward.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

SYSTEMS = {"g32": 32, "g1": 1, "plain": None}


def _rank(rank, systems, paths, model_name, layers, tokens, forwards):
    import torch
    import torch.distributed as dist

    import astra
    from astra.bench.models import build_inputs, build_model

    torch.set_num_threads(1)
    model = build_model(model_name, layers, tokens)
    inputs = build_inputs(model_name, tokens)
    half = build_inputs(model_name, tokens // 2)
    out = {}
    with torch.inference_mode():
        for s in systems:
            pm = None if s == "plain" else astra.parallelize(model, astra.Codebooks.load(paths[s]), split="auto")
            run = (lambda: model(**half)) if pm is None else (lambda pm=pm: pm(**inputs))
            try:
                dist.barrier()
                run()                                   # warm-up (tables, workspaces)
                walls = []
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                for _ in range(forwards):
                    dist.barrier()
                    t0 = time.perf_counter()
                    run()
                    walls.append(time.perf_counter() - t0)
                r1 = resource.getrusage(resource.RUSAGE_SELF)
            finally:
                if pm is not None:
                    pm.unpatch()
            out[s] = {"wall": walls, "faults": (r1.ru_minflt - r0.ru_minflt) / forwards,
                      "sys": (r1.ru_stime - r0.ru_stime) / forwards}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default="g32,g1,plain", help="comma list of %s (default: all)" % ",".join(SYSTEMS))
    ap.add_argument("--model", default="gpt2", help="bench model (default: gpt2)")
    ap.add_argument("--layers", type=int, default=12, help="layers (default: 12)")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens T (default: 1024)")
    ap.add_argument("--forwards", type=int, default=3, help="timed forwards per launch (default: 3)")
    ap.add_argument("--rounds", type=int, default=3, help="launch pairs, untuned then tuned (default: 3)")
    a = ap.parse_args(argv)
    import astra
    from astra.bench.models import bench_codebooks, build_model

    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems or a.forwards < 1 or a.rounds < 1:
        ap.error(f"systems must be among {list(SYSTEMS)} (got {bad or systems}); forwards and rounds >= 1")
    res = {(s, t): [] for s in systems for t in (False, True)}
    with tempfile.TemporaryDirectory(prefix="astra-alloc-") as tmp:
        model = build_model(a.model, a.layers, a.tokens)
        paths = {}
        for s in systems:
            if SYSTEMS[s] is not None:
                paths[s] = os.path.join(tmp, f"{s}.safetensors")
                bench_codebooks(model, a.model, a.tokens, SYSTEMS[s], "auto").save(paths[s])
        for i in range(a.rounds):
            for tuned in (False, True):
                out = astra.launch(_rank, 2, systems, paths, a.model, a.layers, a.tokens, a.forwards,
                                   timeout=900.0, tune_allocator=tuned)
                for s in systems:
                    wall = statistics.median(max(w) for w in zip(*(r[s]["wall"] for r in out)))
                    res[s, tuned].append((wall, [r[s]["faults"] for r in out], [r[s]["sys"] for r in out]))
                print(f"round {i + 1}/{a.rounds} {'tuned' if tuned else 'untuned'} done", file=sys.stderr)
    print("| system | allocator | forward s, median over rounds [per round] | page faults / rank / forward | "
          "system CPU s / rank / forward |")
    print("|---|---|---|---|---|")
    for s in systems:
        for tuned in (False, True):
            rows = res[s, tuned]
            walls = [w for w, _, _ in rows]
            faults = statistics.median(f for _, fs, _ in rows for f in fs)
            sys_t = statistics.median(t for _, _, ts in rows for t in ts)
            print(f"| {s} | {'tuned' if tuned else 'glibc default'} | {statistics.median(walls):.3f} "
                  f"[{', '.join(f'{w:.3f}' for w in walls)}] | {faults:,.0f} | {sys_t:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
