"""End-to-end prefill latency over a real, shaped network link: a thin wrapper of ``astra bench``.

    sudo python bench/shaped_link.py --rates 10 --tokens 1024 --repeats 5

runs ``astra bench --models gpt2 --systems single,ceiling,fp-sp,astra-g32,astra-g1`` with the given rates,
tokens, layers, world size and repeats (the GPT-2-small rows of issue 10's table). Everything else - the
namespaces, the tbf shaping, the systems, the outputs under bench/results/ - is ``astra bench``'s; see
``astra bench --help``. The shaped namespace helpers live in :mod:`astra.netlink`
(``create_shaped_namespace``, ``destroy_namespace``, ``shaped_namespace``), re-exported here.
"""
from __future__ import annotations

import argparse
import sys

from astra.netlink import create_shaped_namespace, destroy_namespace, shaped_namespace

__all__ = ["create_shaped_namespace", "destroy_namespace", "shaped_namespace", "main"]


def main(argv=None) -> int:
    from astra.cli import main as astra_main

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="10,100", help="link rates in Mbit/s, comma separated")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--breakdown", action="store_true", help="also print every rank's per-layer time breakdown")
    ap.add_argument("--out-dir", default="bench/results", help="existing directory for the results")
    a = ap.parse_args(argv)
    return astra_main(["bench", "--models", "gpt2", "--systems", "single,ceiling,fp-sp,astra-g32,astra-g1",
                       "--rates", a.rates, "--tokens", str(a.tokens), "--layers", str(a.layers),
                       "--world-size", str(a.world), "--repeats", str(a.repeats), "--out-dir", a.out_dir]
                      + (["--breakdown"] if a.breakdown else []))


if __name__ == "__main__":
    sys.exit(main())
