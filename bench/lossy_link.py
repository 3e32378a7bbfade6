"""ASTRA over a real lossy link with delay and jitter (root only): 2 gloo ranks, each running N forwards; every
gathered output must equal `astra.simulate` (max abs diff < 1e-4) and the first forward bitwise.

With delay or jitter (the default, delay 20 ms +- 20 ms): `astra.netlink.jitter_link`, two network namespaces,
one per rank, joined by TUN interfaces (MTU 1500) and a relay process that delays each packet by its own
draw (netem's `delay D J`, uniform by default; packets reorder as with netem). Each TUN is shaped by `tc tbf`
(a full-duplex link of --rate each way) and nftables drops --loss percent of the packets entering each
namespace. gloo talks over the TUN addresses (GLOO_SOCKET_IFNAME, MASTER_ADDR = rank 0's address). Before
the ranks start, 50 UDP echoes measure the link's round trip (two relay crossings), printed with the relay's
packet counts and lateness. Needs no sch_netem (this project's kernels lack it), only /dev/net/tun.

With --delay-ms 0 --jitter-ms 0: one namespace whose loopback carries tbf (shared by both ranks) and the
nftables loss, `astra.netlink.shaped_namespace`, ranks started by `astra.launch`.

    sudo python bench/lossy_link.py --rate 10 --loss 1 5 --jitter-ms 20 --delay-ms 20 --forwards 20
    sudo python bench/lossy_link.py --rate 10 --loss 1 5 --delay-ms 0 --jitter-ms 0 --forwards 20
    python bench/lossy_link.py --inner --forwards 2          # the rank part, unshaped (no root)

Random-init GPT-2 (latency only), random G = 32, K = 1024 codebooks. Prints markdown tables (latency of the
slowest rank per forward).
"""
from __future__ import annotations

import argparse
import json
import os
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

    import astra
    from astra.bench.models import build_inputs, build_model

    torch.set_num_threads(1)
    model, inputs = build_model("gpt2", layers, tokens), build_inputs("gpt2", tokens)
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


def _summary(res, forwards) -> dict:
    from astra.bench.ranks import slowest

    per = slowest([r["times"][:forwards] for r in res])
    return {"median_s": statistics.median(per), "max_s": max(per), "forwards": min(r["forwards"] for r in res),
            "max_diff": max(r["max_diff"] for r in res), "bitwise_same": all(r["bitwise_same"] for r in res)}


def inner(args) -> dict:
    import astra

    res = astra.launch(_rank_fn, 2, args.layers, args.tokens, args.forwards, timeout=300, join_timeout=3600)
    return _summary(res, args.forwards)


def rank_main(args) -> dict:
    """One rank of the jitter link, started in its own namespace (env:// rendezvous at rank 0's TUN address)."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", rank=args.rank, world_size=2, timeout=timedelta(seconds=300))
    try:
        return _rank_fn(args.rank, args.layers, args.tokens, args.forwards)
    finally:
        dist.destroy_process_group()


def _rank_argv(args, *extra) -> list:
    return [sys.executable, str(HERE), *extra, "--forwards", str(args.forwards), "--tokens", str(args.tokens),
            "--layers", str(args.layers)]


def _run_loopback(args, loss) -> dict:
    from astra.netlink import netns_command, shaped_namespace

    with shaped_namespace(args.rate, loss=loss) as ns:
        out = subprocess.run(netns_command(ns, _rank_argv(args, "--inner")), capture_output=True, text=True)
    if out.returncode != 0:         # the ranks' error, not only CalledProcessError's exit status
        raise SystemExit(f"lossy_link: the ranks failed (exit {out.returncode}):\n{out.stderr.strip()[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_jitter(args, loss) -> dict:
    from astra.netlink import jitter_link, link_rtt_ms, rtt_summary

    with jitter_link(args.rate, delay_ms=args.delay_ms, jitter_ms=args.jitter_ms, loss=loss,
                     distribution=args.distribution, seed=args.seed) as link:
        rtt = rtt_summary(link_rtt_ms(link, 50))
        env = [{**os.environ, **link.env(), "MASTER_PORT": "29500", "RANK": str(r), "WORLD_SIZE": "2"}
               for r in (0, 1)]
        procs = [subprocess.Popen(link.command(r, _rank_argv(args, "--rank", str(r))), env=env[r], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
        try:
            outs = [p.communicate(timeout=3600) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for r, (p, (_, err)) in enumerate(zip(procs, outs)):
            if p.returncode != 0:
                raise RuntimeError(f"rank {r} failed (exit {p.returncode}):\n{err.strip()[-3000:]}")
    res = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    return {**_summary(res, args.forwards), "rtt_ms": rtt, "relay": link.stats}


def _print_link_table(rows) -> None:
    print("\n| loss | probe RTT min / p10 / p50 / p90 / max (ms) | probes lost | relay packets 0->1, 1->0 | "
          "relay lateness p50 / p99 / max (ms) |")
    print("|---|---|---|---|---|")
    for loss, r in rows:
        t, rel = r["rtt_ms"], r["relay"]
        rtt = " / ".join(f"{t[k]:.1f}" for k in ("min", "p10", "p50", "p90", "max")) if "min" in t else "-"
        late = " / ".join(f"{rel['late_ms'][k]}" for k in ("p50", "p99", "max"))
        print(f"| {loss} % | {rtt} | {t['lost']} of {t['sent']} | {rel['packets'][0]}, {rel['packets'][1]} | "
              f"{late} |")


def outer(args) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))   # run the `finally` that removes the namespaces
    jitter = bool(args.delay_ms or args.jitter_ms)
    rows = [(loss, (_run_jitter if jitter else _run_loopback)(args, loss)) for loss in args.loss]
    link = (f"two namespaces joined by a TUN relay, delay {args.delay_ms} ms +- {args.jitter_ms} ms "
            f"({args.distribution}, per packet and direction, seed {args.seed}), {args.rate} Mbit/s tbf each way"
            if jitter else f"one namespace's loopback, {args.rate} Mbit/s tbf shared by both ranks")
    print(f"GPT-2 (random init) {args.layers} layers, d=768, T={args.tokens}, 2 ranks x 1 core, G=32 K=1024; "
          f"{link}, loss by nftables random drops, MTU 1500\n")
    print("| loss | forwards per rank | median (s) | max (s) | max abs diff vs simulate | all bitwise equal |")
    print("|---|---|---|---|---|---|")
    ok = True
    for loss, r in rows:
        print(f"| {loss} % | {r['forwards']} | {r['median_s']:.3f} | {r['max_s']:.3f} | {r['max_diff']:.1e} | "
              f"{r['bitwise_same']} |")
        ok &= r["forwards"] == args.forwards and r["max_diff"] < 1e-4 and r["bitwise_same"]
    if jitter:
        _print_link_table(rows)
    print("\nOK" if ok else "\nFAILED")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=100, help="tbf rate, Mbit/s")
    ap.add_argument("--loss", type=float, nargs="+", default=[1.0, 5.0],
                    help="packet loss, percent (nftables random drops)")
    ap.add_argument("--delay-ms", type=float, default=20.0, help="mean one-way delay (0 with --jitter-ms 0: "
                    "one shaped loopback, no relay)")
    ap.add_argument("--jitter-ms", type=float, default=20.0, help="one-way jitter (netem's delay D J)")
    ap.add_argument("--distribution", choices=("uniform", "normal"), default="uniform",
                    help="delay distribution: uniform in D +- J (netem without a table) or normal N(D, J), >= 0")
    ap.add_argument("--seed", type=int, default=0, help="seed of the per-packet delays")
    ap.add_argument("--forwards", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.forwards < 1 or args.tokens < 2 or args.layers < 2:
        ap.error("--forwards must be >= 1, --tokens >= 2 and --layers >= 2 (layer 0 exchanges nothing)")
    if args.inner or args.rank is not None:
        print(json.dumps(inner(args) if args.inner else rank_main(args)))
        return 0
    return outer(args)


if __name__ == "__main__":
    sys.exit(main())
