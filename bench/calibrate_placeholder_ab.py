"""What leaving layer 0 unfitted saves ``astra.calibrate`` (``Codebooks.placeholder_layers``): the accuracy study's
MiniLM calibration (bench/accuracy.py's 1500 training sentences, K = 1024, 10 Lloyd iterations, 50,000 tokens),
timed with layer 0 left as a placeholder (the built-in family, every rank computes layer 0) against the same call
with the family re-registered without ``first_input`` (layer 0 exchanged, so fitted like the others: what
calibration did before), alternating, ``--repeats`` each. Timings are only meaningful on an otherwise idle machine.

    PYTHONPATH=.:python python bench/calibrate_placeholder_ab.py [--groups 32,1] [--repeats 2] [--threads 2]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent / "tests")]
import accuracy as A  # noqa: E402
from test_runtime_support import layer_0_exchanged  # noqa: E402

import astra  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", default="32,1", help="G values (default: 32,1)")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per variant (default: 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    task = A.minilm_task(A.Size())
    for G in (int(g) for g in a.groups.split(",")):
        times = {"layer 0 fitted": [], "layer 0 placeholder": []}
        for _ in range(a.repeats):
            for name, ctx in (("layer 0 fitted", layer_0_exchanged(task.model)),
                              ("layer 0 placeholder", contextlib.nullcontext())):
                with ctx:
                    t0 = time.perf_counter()
                    astra.calibrate(task.model, task.train, groups=G, codebook_size=1024, iters=10, max_tokens=50000)
                    times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"G={G}: " + ", ".join(f"{k} {v:.1f} s ({', '.join(f'{x:.1f}' for x in times[k])})"
                                      for k, v in med.items())
              + f"; placeholder / fitted {med['layer 0 placeholder'] / med['layer 0 fitted']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
