"""k-means backends by group dim, side by side in one run: ``astra.calibrate.kmeans`` with faiss and with the torch
Lloyd iterations (whose assignment is the exact fused encode for groups up to ``astra_kernels.SMALL_GROUP_MAX_DIM``
dims), on the same seeded vectors; wall time and k-means error per backend. Motivates
``astra.calibrate.FAISS_MIN_GROUP_DIM`` (below it ``backend="auto"`` runs torch). Only meaningful on an idle machine.

    PYTHONPATH=.:python python bench/kmeans_small_groups.py --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time

sys.path[:0] = [p for p in (".", "python") if p not in sys.path]


def main(argv=None) -> int:
    import torch

    from astra.calibrate import FAISS_MIN_GROUP_DIM, faiss_available, kmeans, kmeans_error

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", default="2,4,8,12", help="group dims to compare (default: 2,4,8,12)")
    ap.add_argument("--groups", type=int, default=8, help="groups (default: 8)")
    ap.add_argument("--vectors", type=int, default=20000, help="vectors (default: 20000)")
    ap.add_argument("--codebook-size", type=int, default=1024, help="K (default: 1024)")
    ap.add_argument("--iters", type=int, default=10, help="Lloyd iterations (default: 10)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch / faiss threads")
    a = ap.parse_args(argv)
    if not faiss_available():
        ap.error("needs faiss (pip install faiss-cpu)")
    torch.set_num_threads(a.threads)
    print(f"FAISS_MIN_GROUP_DIM = {FAISS_MIN_GROUP_DIM}; {a.vectors} vectors, {a.groups} groups, "
          f"K = {a.codebook_size}, {a.iters} iterations, {a.threads} threads")
    print("| group dim | faiss s | faiss error | torch s | torch error | faiss / torch time |")
    print("|---|---|---|---|---|---|")
    for d in (int(v) for v in a.dims.split(",")):
        g = torch.Generator().manual_seed(d)
        x = torch.randn(a.vectors, a.groups * d, generator=g) * torch.linspace(0.2, 2.0, a.groups * d)
        res = {}
        for be in ("faiss", "torch"):
            t0 = time.perf_counter()
            C = kmeans(x, a.groups, a.codebook_size, iters=a.iters, backend=be)
            res[be] = (time.perf_counter() - t0, kmeans_error(x, C))
        (tf, ef), (tt, et) = res["faiss"], res["torch"]
        print(f"| {d} | {tf:.2f} | {ef:.6g} | {tt:.2f} | {et:.6g} | {tf / tt:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
