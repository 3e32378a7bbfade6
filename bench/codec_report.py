"""Codec figures for bench/RESULTS.md: throughput through the Python API and pure C++ codec time.

    python bench/codec_report.py

Reports, for 10-bit codes on one core: pack / unpack codes per second at 512 and 1,048,576 codes
(frame + CRC32C included, through astra_kernels.pack_codes / unpack_codes) next to the numpy peer,
and the 512-code round-trip cost both measured inside C++ (codec time) and through Python.
"""
import timeit

import torch
from codec_reference import np_pack, np_unpack

import astra_kernels
from astra_kernels._codec import bench as codec_bench

BITS = 10


def best(fn, number, repeat=7):
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def main():
    torch.set_num_threads(1)
    print("| codes | op | astra (s) | astra codes/s | numpy (s) | numpy codes/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for n in (512, 1_048_576):
        codes = torch.randint(0, 2 ** BITS, (n,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
        c = codes.numpy()
        frame, npframe = astra_kernels.pack_codes(codes, BITS), np_pack(c, BITS)
        number = 20000 if n == 512 else 30
        for op, a, b in (
                ("pack", lambda codes=codes: astra_kernels.pack_codes(codes, BITS), lambda c=c: np_pack(c, BITS)),
                ("unpack", lambda frame=frame: astra_kernels.unpack_codes(frame), lambda f=npframe: np_unpack(f))):
            ta, tb = best(a, number), best(b, max(number // 20, 5))
            print(f"| {n} | {op} | {ta:.3e} | {n / ta:.3e} | {tb:.3e} | {n / tb:.3e} | {tb / ta:.1f}x |")
    cpp = min(codec_bench.time_roundtrip(512, BITS, 20000) for _ in range(5))
    codes = torch.randint(0, 2 ** BITS, (512,), dtype=torch.int32)
    py = best(lambda: astra_kernels.unpack_codes(astra_kernels.pack_codes(codes, BITS)), 20000)
    print(f"\n512-code round trip (pack + unpack, 10 bits): codec time {cpp / 1e3:.2f} us (C++), "
          f"{py * 1e6:.2f} us through the Python API (incl. tensor allocation)")
    big = min(codec_bench.time_roundtrip(1 << 20, BITS, 20) for _ in range(3))
    print(f"1M-code round trip codec time: {big / 1e6:.3f} ms -> {2 * (1 << 20) / (big / 1e9):.3e} codes/s per op "
          "(mean of pack+unpack)")


if __name__ == "__main__":
    main()
