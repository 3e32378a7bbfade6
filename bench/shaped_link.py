"""End-to-end prefill latency over a real, shaped network link (root only).

    sudo python bench/shaped_link.py                       # 10 and 100 Mbit/s, plus plain loopback
    python bench/shaped_link.py --rates 10 --tokens 512 --layers 12 --world 2

Each bandwidth gets its own network namespace whose loopback (MTU 1500) is shaped by a `tc tbf`
qdisc; the ranks (one core, one thread each, gloo) run inside it, so every byte they exchange crosses
the shaped link. Peers measured in the same run, same random-init GPT-2 (latency only, never
accuracy), same input:

* single device: the unmodified model on one core;
* full-precision sequence parallelism (`astra.parallelize(model, None)`: hidden states sent as floats);
* ASTRA with G = 32 and G = 1 codebooks (10-bit codes; codebooks calibrated on random inputs).

Prints a markdown table (median of --repeats forwards, slowest rank) with bytes sent per rank per
forward. Namespaces are removed on exit.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def _model(layers: int, tokens: int):
    import torch
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=768, n_head=12, n_positions=max(1024, tokens), vocab_size=50257)
    return GPT2Model(cfg).eval()


def _inputs(tokens: int):
    import torch

    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 50257, (1, tokens), generator=g)}


def _rank_fn(rank, layers, tokens, codebooks, repeats):
    import torch
    import torch.distributed as dist

    import astra

    torch.set_num_threads(1)
    model = _model(layers, tokens)
    pm = astra.parallelize(model, codebooks, timeout=600)
    inputs = _inputs(tokens)
    times = []
    with torch.inference_mode():
        pm(**inputs)  # warm-up
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            pm(**inputs)
            times.append(time.perf_counter() - t0)
    sent = sum(s.bytes_sent for s in pm.stats)
    return {"times": times, "bytes_sent": sent}


def inner(args) -> dict:
    import statistics

    import torch

    import astra

    torch.set_num_threads(1)
    model = _model(args.layers, args.tokens)
    inputs = _inputs(args.tokens)
    with torch.inference_mode():
        model(**inputs)
        single = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model(**inputs)
            single.append(time.perf_counter() - t0)
    rows = {"single device": {"median_s": statistics.median(single), "bytes_sent": 0}}
    calib = [{"input_ids": torch.randint(0, 50257, (1, args.tokens), generator=torch.Generator().manual_seed(s))}
             for s in range(2)]
    modes = [("full-precision SP", None)]
    for G in (32, 1):
        with torch.inference_mode():
            modes.append((f"ASTRA G={G}", astra.calibrate(model, calib, groups=G, codebook_size=1024, iters=4)))
    for name, cb in modes:
        res = astra.launch(_rank_fn, args.world, args.layers, args.tokens, cb, args.repeats, timeout=900,
                           join_timeout=1800)
        per_iter = [max(r["times"][i] for r in res) for i in range(args.repeats)]
        rows[name] = {"median_s": statistics.median(per_iter), "bytes_sent": max(r["bytes_sent"] for r in res)}
    return rows


def _sh(*cmd):
    subprocess.run(cmd, check=True)


def outer(args) -> None:
    if os.geteuid() != 0:
        sys.exit("shaped_link.py needs root (network namespaces and tc); run the inner part unshaped with --inner")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))   # run the `finally` that removes the namespace
    results = {}
    for rate in args.rates:
        ns = f"astra-bench-{os.getpid()}-{rate}"
        _sh("ip", "netns", "add", ns)
        try:
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "mtu", "1500")
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", f"{rate}mbit",
                "burst", "64kb", "latency", "2s")
            out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, str(HERE), "--inner",
                                  "--tokens", str(args.tokens), "--layers", str(args.layers),
                                  "--world", str(args.world), "--repeats", str(args.repeats)],
                                 check=True, capture_output=True, text=True)
            results[f"{rate} Mbit/s"] = json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    if args.loopback:
        out = subprocess.run([sys.executable, str(HERE), "--inner", "--tokens", str(args.tokens), "--layers",
                              str(args.layers), "--world", str(args.world), "--repeats", str(args.repeats)],
                             check=True, capture_output=True, text=True)
        results["loopback (unshaped)"] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"GPT-2 (random init) {args.layers} layers, d=768, T={args.tokens}, {args.world} ranks x 1 core; "
          f"median of {args.repeats}, slowest rank\n")
    print("| link | mode | prefill (s) | speed-up vs single device | bytes sent per rank |")
    print("|---|---|---|---|---|")
    for link, rows in results.items():
        base = rows["single device"]["median_s"]
        for mode, r in rows.items():
            print(f"| {link} | {mode} | {r['median_s']:.3f} | {base / r['median_s']:.2f}x | {r['bytes_sent']:,} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=lambda s: [int(x) for x in s.split(",")], default=[10, 100],
                    help="link rates in Mbit/s, comma separated")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-loopback", dest="loopback", action="store_false")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inner:
        print(json.dumps(inner(args)))
    else:
        outer(args)


if __name__ == "__main__":
    main()
