"""What mixed_attention's output check (validate=True: the output's largest magnitude must be finite) costs:
the table_count case of bench/test_bench_attention.py (Tl = 512, 12 heads x 64, K = 1024, G = 1 codes), with
the check and with it replaced by a no-op, interleaved in one process, one thread, medians of the repeats.

    PYTHONPATH=.:python python bench/output_check_ab.py --repeats 41
"""
import argparse
import statistics
import time

import torch

import astra_kernels.attention as A
from astra_kernels.attention import mixed_attention


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=41)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    H, DH, TL, K = 12, 64, 512, 1024
    q, k, v = (torch.randn(1, H, TL, DH, generator=g) for _ in range(3))
    real = A._check_out
    for Tr in (512, 3584):
        codes = torch.randint(0, K, (1, Tr), generator=g)
        kt, vt = torch.randn(K, H, DH, generator=g), torch.randn(K, H, DH, generator=g)
        times = {"with": [], "without": []}
        for _ in range(args.repeats):
            for name in times:
                A._check_out = real if name == "with" else (lambda out: None)
                t0 = time.perf_counter()
                mixed_attention(q, k, v, codes=codes, k_table=kt, v_table=vt)
                times[name].append(time.perf_counter() - t0)
        A._check_out = real
        w, wo = statistics.median(times["with"]), statistics.median(times["without"])
        print(f"Tr = {Tr}: with the output check {w * 1e3:.3f} ms, without {wo * 1e3:.3f} ms, ratio {w / wo:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
