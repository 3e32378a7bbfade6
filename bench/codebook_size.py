"""How accuracy depends on the codebook size K (the paper fixes K = 1024 and has no study of it): the accuracy study's
MiniLM task (bench/accuracy.py: packaged all-MiniLM-L6-v2, 1500 train / 300 held-out `pydoc_data` sentences),
calibrated codebooks (``astra.calibrate``, 10 Lloyd iterations, 50,000 tokens), for every (G, K) given, plain and
predictive: bits a token, calibration seconds, and the held-out mean cosine / nearest-neighbour agreement at world
sizes 2, 4 and 8. Pairs with equal ``G log2 K`` compare more groups of smaller codebooks with fewer groups of larger
ones at the same bits.

    PYTHONPATH=.:python python bench/codebook_size.py [--configs 32x256,32x1024,32x4096,64x32,...] [--threads 2]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy as A  # noqa: E402

import astra  # noqa: E402

DEFAULT_CONFIGS = "32x256,32x1024,32x4096,64x32,128x4,1x256,1x1024,1x4096"


def parse_configs(text: str):
    """``"GxK,..."`` as ``[(G, K), ...]``; ValueError naming a malformed entry."""
    out = []
    for part in text.split(","):
        try:
            g, k = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"--configs entry {part!r} is not GxK (e.g. 32x1024)") from None
        if g < 1 or k < 2:
            raise ValueError(f"--configs entry {part!r}: G must be >= 1 and K >= 2")
        out.append((g, k))
    return out


def row(task, G: int, K: int, predict: bool) -> str:
    t0 = time.perf_counter()
    cb = astra.calibrate(task.model, task.train, groups=G, codebook_size=K, iters=10, max_tokens=50000,
                         predict=predict)
    secs = time.perf_counter() - t0
    res = A.evaluate(task, task.model, cb)
    cells = " | ".join(f"{m['cos']:.4f} / {100 * m['nn']:.1f} %" for _, m in sorted(res.items()))
    bits = G * math.ceil(math.log2(K))
    return f"| {G} | {K} | {bits} | {'predictive' if predict else 'plain'} | {secs:.0f} | {cells} |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"GxK pairs (default: {DEFAULT_CONFIGS})")
    ap.add_argument("--plain-only", action="store_true", help="skip the predictive codebooks")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    a = ap.parse_args(argv)
    try:
        configs = parse_configs(a.configs)
    except ValueError as e:
        ap.error(str(e))
    torch.set_num_threads(a.threads)
    task = A.minilm_task(A.Size())
    task.ref = A.outputs(task.model, task.test)
    print("| G | K | bits a token | codebooks | calibration s | ws 2 | ws 4 | ws 8 |")
    print("|---|---|---|---|---|---|---|---|")
    for G, K in configs:
        for predict in (False,) if a.plain_only else (False, True):
            print(row(task, G, K, predict), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
