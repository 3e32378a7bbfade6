"""Calibration speed, side by side in one run: the torch k-means path vs the faiss path of ``astra.calibrate``.

Both run at the CLI's ``astra calibrate`` defaults (read from ``astra.cli.build_parser``, so they cannot drift)
on the packaged all-MiniLM-L6-v2, on the same hidden states (collected once, not timed). Reported per backend:
k-means wall time over all layers and the k-means error (mean squared quantization error per element of the
calibration vectors, averaged over layers). Timings are only meaningful on an otherwise idle machine.

    PYTHONPATH=.:python python bench/calibrate_speed.py [--threads 2] [--groups 32] [--repeats 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path[:0] = [p for p in (".", "python") if p not in sys.path]


def main(argv=None) -> int:
    import torch

    from astra.calibrate import collect_hidden_states, kmeans, kmeans_error
    from astra.cli import build_parser, load_model, stdlib_paragraphs

    cli = build_parser().parse_args(["calibrate", "--out", os.devnull])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", type=int, default=cli.groups)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per backend (min is reported)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenize, desc = load_model("minilm")
    paras = stdlib_paragraphs()[: cli.samples]
    samples = [tokenize(paras[i: i + 8], cli.max_length) for i in range(0, len(paras), 8)]   # as the CLI
    hs = collect_hidden_states(model, samples, max_tokens=cli.max_tokens)
    print(f"{desc}: {len(hs)} layers x {hs[0].shape[0]} vectors, G={args.groups}, K={cli.codebook_size}, "
          f"iters={cli.iters}, threads={args.threads}")
    res = {}
    for backend in ("torch", "faiss"):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            cbs = [kmeans(h, args.groups, cli.codebook_size, iters=cli.iters, seed=cli.seed + l, backend=backend)
                   for l, h in enumerate(hs)]
            times.append(time.perf_counter() - t0)
        err = sum(kmeans_error(h, c) for h, c in zip(hs, cbs)) / len(hs)
        res[backend] = (min(times), err)
        print(f"  {backend:6s} k-means {min(times):8.2f} s   error {err:.6f}")
    (tt, et), (tf, ef) = res["torch"], res["faiss"]
    print(f"  faiss speed-up {tt / tf:.1f}x, error ratio faiss/torch {ef / et:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
