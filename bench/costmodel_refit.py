"""Re-fit :mod:`astra.costmodel` on saved ``astra bench --predict`` runs, whole and with parts taken out.

    PYTHONPATH=python python bench/costmodel_refit.py bench/results/predict-6 bench/results/predict-9

A run is ``STEM.json`` (the held-out table, whose ``meta.raw_rows`` are the N = 4 and 8 rows) beside
``STEM-n2.json`` (the N = 2 rows: the ``bench.json`` of the same run). For each run it fits at N = 2 on 10 and
100 Mbit/s, as the bench does, and prints the worst |error| over the held-out points for the model as it is and
for each ablation: ``min`` hides the transfer behind the overlapping compute as ``min(X, W)`` instead of
:func:`astra.costmodel.hidden_seconds`; ``ceiling F`` drops the systems' own probes (every system then gets the
ceiling's fixed cost per rank). Runs before the own probes existed (6-8) have no own probes to drop.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import astra.costmodel as cm
from astra.bench.predict import machines_from, profiles_from, split_points

FIT_RATES = {10.0, 100.0}


def worst(stem: str, own: bool, smooth: bool) -> dict:
    n2 = json.load(open(stem + "-n2.json"))["rows"]
    other = json.load(open(stem + ".json"))["meta"]["raw_rows"]
    profiles = profiles_from(n2, 2)
    if not own:
        profiles = {k: dataclasses.replace(p, own_probe_s=0.0) for k, p in profiles.items()}
    fitted, held = split_points(n2 + other, 2, FIT_RATES)
    saved = cm.hidden_seconds
    if not smooth:
        cm.hidden_seconds = min
    try:
        model = cm.fit(profiles, fitted, 2, machines=machines_from(n2 + other))
        rows = cm.evaluate(model, profiles, held)
    finally:
        cm.hidden_seconds = saved
    return max(rows, key=lambda r: abs(r["error_pct"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stems", nargs="+", help="saved runs: STEM.json and STEM-n2.json")
    args = ap.parse_args(argv)
    print("| run | model | worst \\|error\\| | where |")
    print("|---|---|---|---|")
    for stem in args.stems:
        for label, own, smooth in (("as built", True, True), ("min", True, False), ("ceiling F", False, True),
                                   ("min, ceiling F", False, False)):
            w = worst(stem, own, smooth)
            rate = "unshaped" if w["rate_mbit"] is None else f"{w['rate_mbit']:g} Mbit/s"
            print(f"| {stem.rsplit('/', 1)[-1]} | {label} | {abs(w['error_pct']):.1f} % | {w['system']} N = "
                  f"{w['world']} {rate} ({w['error_pct']:+.1f} %) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
