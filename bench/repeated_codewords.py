"""Encode time with codebooks that repeat codewords: K = 1024 k-meansed on 128 vectors (as calibrating on fewer vectors
than codewords gives: empty clusters re-seeded with data points, so most codewords are copies), 64 tokens near the
training vectors, the CPU path, 1 thread, the best of 15 calls.

    PYTHONPATH=.:python python bench/repeated_codewords.py
"""
import time

import torch

import astra_kernels as ak
from astra.calibrate import kmeans


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    for G, D in ((32, 768), (1, 768)):
        train = torch.randn(128, D, generator=g) * torch.linspace(0.5, 2, D)
        cb = kmeans(train, G, 1024, iters=4, seed=0)
        x = train[:64] + 0.05 * torch.randn(64, D, generator=g)
        ak.vq_encode(x, cb)                                     # the codebook's preparation, once
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            ak.vq_encode(x, cb)
            times.append(time.perf_counter() - t0)
        distinct = min(torch.unique(cb[i], dim=0).shape[0] for i in range(G))
        print(f"G = {G}: at least {distinct} distinct codewords a group of 1024; encode of 64 tokens "
              f"{min(times) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
