"""ASTRA over a real lossy link (root only): 2 gloo ranks in a network namespace whose loopback (MTU 1500) is shaped
by `tc tbf`, with random packet drops (nftables) and a netem delay with jitter (kernels with sch_netem), each
running N forwards; every gathered
output must equal `astra.simulate` (max abs diff < 1e-4) and the first forward bitwise.

    sudo python bench/lossy_link.py                          # 100 Mbit/s, loss 1 % and 5 %, delay 20ms +- 20ms
    sudo python bench/lossy_link.py --rate 10 --loss 1 5 --forwards 20 --tokens 256 --layers 6
    python bench/lossy_link.py --inner --forwards 2          # the rank part, unshaped (no root)

The namespace, tbf, loss and delay set-up is `astra.netlink.shaped_namespace`. Random-init GPT-2 (latency only),
random G = 32, K = 1024 codebooks. Prints a markdown table (latency of the slowest rank per forward).
"""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path[:0] = [str(HERE.parent), str(HERE.parents[1]), str(HERE.parents[1] / "python")]


def _rank_fn(rank, layers, tokens, forwards):
    import torch
    from transformers import GPT2Config, GPT2Model

    import astra

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_layer=layers, n_embd=768, n_head=12, n_positions=max(1024, tokens))).eval()
    inputs = {"input_ids": torch.randint(0, 50257, (1, tokens), generator=torch.Generator().manual_seed(1))}
    cb = astra.Codebooks.random(model, groups=32, codebook_size=1024, seed=2)
    sim = astra.simulate(model, inputs, world_size=2, codebooks=cb).last_hidden_state
    pm = astra.parallelize(model, cb, timeout=120)
    times, diffs, first, same = [], [], None, True
    for _ in range(forwards):
        t0 = time.perf_counter()
        out = pm(**inputs)
        times.append(time.perf_counter() - t0)
        full = pm.gather(out).last_hidden_state
        diffs.append(float((full - sim).abs().max()))
        first = full if first is None else first
        same &= bool(torch.equal(full, first))
    return {"times": times, "max_diff": max(diffs), "bitwise_same": same, "forwards": len(times)}


def inner(args) -> dict:
    import astra

    res = astra.launch(_rank_fn, 2, args.layers, args.tokens, args.forwards, timeout=300, join_timeout=3600)
    per = [max(r["times"][i] for r in res) for i in range(args.forwards)]
    return {"median_s": statistics.median(per), "max_s": max(per), "forwards": min(r["forwards"] for r in res),
            "max_diff": max(r["max_diff"] for r in res), "bitwise_same": all(r["bitwise_same"] for r in res)}


def outer(args) -> int:
    from astra.netlink import netem_available, netns_command, shaped_namespace

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))   # run the `finally` that removes the namespace
    if (args.delay_ms or args.jitter_ms) and netem_available():
        print(f"--delay-ms/--jitter-ms: {netem_available()}; run with --delay-ms 0 --jitter-ms 0 for loss alone",
              file=sys.stderr)
        return 2
    rows = []
    for loss in args.loss:
        with shaped_namespace(args.rate, loss=loss, delay_ms=args.delay_ms, jitter_ms=args.jitter_ms) as ns:
            argv = [sys.executable, str(HERE), "--inner", "--forwards", str(args.forwards),
                    "--tokens", str(args.tokens), "--layers", str(args.layers)]
            out = subprocess.run(netns_command(ns, argv), check=True, capture_output=True, text=True)
        rows.append((loss, json.loads(out.stdout.strip().splitlines()[-1])))
    print(f"GPT-2 (random init) {args.layers} layers, d=768, T={args.tokens}, 2 ranks x 1 core, G=32 K=1024; "
          f"{args.rate} Mbit/s tbf, loss by nftables random drops, netem delay {args.delay_ms}ms "
          f"+- {args.jitter_ms}ms, MTU 1500\n")
    print("| loss | forwards per rank | median (s) | max (s) | max abs diff vs simulate | all bitwise equal |")
    print("|---|---|---|---|---|---|")
    ok = True
    for loss, r in rows:
        print(f"| {loss} % | {r['forwards']} | {r['median_s']:.3f} | {r['max_s']:.3f} | {r['max_diff']:.1e} | "
              f"{r['bitwise_same']} |")
        ok &= r["forwards"] == args.forwards and r["max_diff"] < 1e-4 and r["bitwise_same"]
    print("\nOK" if ok else "\nFAILED")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=100, help="tbf rate, Mbit/s")
    ap.add_argument("--loss", type=float, nargs="+", default=[1.0, 5.0],
                    help="packet loss, percent (nftables random drops)")
    ap.add_argument("--delay-ms", type=int, default=20)
    ap.add_argument("--jitter-ms", type=int, default=20)
    ap.add_argument("--forwards", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inner:
        print(json.dumps(inner(args)))
        return 0
    return outer(args)


if __name__ == "__main__":
    sys.exit(main())
