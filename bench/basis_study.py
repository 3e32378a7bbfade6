"""The bases calibration can quantize in (astra.bases), side by side on all-MiniLM-L6-v2: calibrated codebooks
(no fine-tuning) in the model's basis, the PCA rotation and the attention basis, scored on the accuracy study's
held-out pydoc sentences (mean cosine of the sentence embeddings to the original model's, nearest-neighbour
agreement) at world sizes 2, 4 and 8.

    PYTHONPATH=.:python python bench/basis_study.py [--groups 32,1] [--threads 2]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import accuracy  # noqa: E402

import astra  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", default="32,1", help="comma-separated G values")
    ap.add_argument("--bases", default="none,pca,attention", help="comma-separated bases (astra.bases.BASES)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = accuracy.Size()
    task = accuracy.minilm_task(size)
    task.ref = accuracy.outputs(task.model, task.test)
    print("| G | basis | ws 2 cos / NN | ws 4 cos / NN | ws 8 cos / NN | calibration s |")
    print("|---|---|---|---|---|---|")
    for G in (int(g) for g in args.groups.split(",")):
        for basis in args.bases.split(","):
            t0 = time.perf_counter()
            cb = astra.calibrate(task.model, task.train, groups=G, codebook_size=size.K, iters=10, max_tokens=50000,
                                 basis=basis)
            dt = time.perf_counter() - t0
            res = [task.score(accuracy.outputs(task.model, task.test, cb, ws), task.ref) for ws in (2, 4, 8)]
            cells = " | ".join(f"{m['cos']:.4f} / {100 * m['nn']:.1f} %" for m in res)
            print(f"| {G} | {basis} | {cells} | {dt:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
