"""One MiniLM fine-tune of the accuracy study (bench/accuracy.py's data, split and metrics), with its knobs on the
command line: the loss, NAQ, the learning rate, epochs. Calibrates (or loads ``--codebooks``), fine-tunes
``train="codebooks"`` at world size 4 and prints the held-out mean cosine / nearest-neighbour agreement at world
sizes 2, 4 and 8, before and after.

    PYTHONPATH=.:python python bench/minilm_finetune.py --groups 32 --loss embedding --naq 0
    PYTHONPATH=.:python python bench/minilm_finetune.py --groups 1 --predict
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path[:0] = [p for p in (".", "python", os.path.dirname(os.path.abspath(__file__))) if p not in sys.path]


def main(argv=None) -> int:
    import accuracy as A
    import torch

    import astra

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", type=int, default=32, help="G (default: 32)")
    ap.add_argument("--loss", choices=("distill", "embedding"), default="embedding",
                    help="distill: astra.finetune's default; embedding: the study's sentence-embedding distance")
    ap.add_argument("--naq", type=float, default=None, help="NAQ lambda (default: astra.finetune's)")
    ap.add_argument("--lr", type=float, default=None,
                    help="codebook learning rate (default: astra.finetune's, relative to the codebooks' scale)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs over the 1500 training sentences (default: 1)")
    ap.add_argument("--predict", action="store_true", help="predictive codebooks (astra.calibrate(predict=True))")
    ap.add_argument("--codebooks", default=None, help="load / save the calibrated codebooks here")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    task = A.minilm_task(A.Size())
    task.ref = A.outputs(task.model, task.test)
    if a.codebooks and os.path.exists(a.codebooks):
        cb = astra.Codebooks.load(a.codebooks)
    else:
        cb = astra.calibrate(task.model, task.train, groups=a.groups, codebook_size=1024, iters=10, max_tokens=50000,
                             predict=a.predict)
        if a.codebooks:
            cb.save(a.codebooks)
    print("calibrated:", flush=True)
    A.evaluate(task, task.model, cb)
    task.loss = A.embedding_loss if a.loss == "embedding" else None
    task.lr, task.epochs = a.lr, a.epochs
    print(f"fine-tuned (loss {a.loss}, lr {'relative' if a.lr is None else f'{a.lr:g}'}):", flush=True)
    _, codebooks = A.fine_tuned(task, cb, G=a.groups, ws=4, naq=a.naq)
    A.evaluate(task, task.model, codebooks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
