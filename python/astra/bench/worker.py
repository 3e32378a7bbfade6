"""``python -m astra.bench.worker JOB.json OUT.json``: one link's measurements (run inside the link's namespace).

JOB.json: ``{"world", "tokens", "layers", "models": {name: {"systems", "plan", "codebooks", "tp_dir"}},
"single": bool, "timeout_s"}``. OUT.json: per model, per system, the slowest rank's time of every run and
the per-forward byte counts of rank 0.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict

from ..allocator import tune_allocator
from ..launch import exit_with_launcher


def _single(model_name: str, job: Dict, runs: int, label: str) -> Dict:
    import torch

    from .models import build_inputs, build_model
    from .ranks import timed

    torch.set_num_threads(1)
    model = build_model(model_name, job["layers"], job["tokens"])
    inputs = build_inputs(model_name, job["tokens"])
    return {"times": timed(lambda: model(**inputs), runs, True, label=label), "bytes_sent": 0, "frame_bytes": 0,
            "wait_s": 0.0, "collectives": 0}


def run_job(job: Dict) -> Dict:
    """One device in this process, then every distributed system of every model under one astra.launch."""
    import astra
    from .ranks import DISTRIBUTED, SYSTEMS, bench_models, progress, slowest

    out: Dict[str, Dict] = {name: {} for name in job["models"]}
    rank_jobs = []
    for name, spec in job["models"].items():
        label = f"  {name} | {job['link']} | "
        if "single" in spec["systems"]:
            out[name]["single"] = _single(name, job, spec["plan"]["single"][0], label + SYSTEMS["single"])
        systems = [k for k in spec["systems"] if k in DISTRIBUTED or k == "ceiling"]
        if systems:
            rank_jobs.append(dict(job, **dict(spec, model=name, systems=systems, label=label)))
    if rank_jobs:
        progress(f"  {job['link']}: starting {job['world']} ranks")
        ranks = astra.launch(bench_models, job["world"], rank_jobs, timeout=job["timeout_s"],
                             join_timeout=job["join_timeout_s"])
        for rj in rank_jobs:
            name = rj["model"]
            for k in rj["systems"]:
                per_rank = [r[name][k] for r in ranks]
                times = slowest([r["times"] for r in per_rank])
                # the slowest rank waits least: its forward minus its wait is the compute that sets the latency
                out[name][k] = dict(per_rank[0], times=times, wait_s=min(r["wait_s"] for r in per_rank))
                for probe in ("probe_times", "sync_times"):
                    if probe in per_rank[0]:
                        out[name][k][probe] = slowest([r[probe] for r in per_rank])
                if "probe_wait_s" in per_rank[0]:
                    out[name][k]["probe_wait_s"] = min(r["probe_wait_s"] for r in per_rank)
                if "breakdown" in per_rank[0]:
                    out[name][k]["breakdown"] = [r["breakdown"] for r in per_rank]     # every rank's
    return out


#: the environment variable naming the benchmark process that started this worker (which ends with it)
PARENT_ENV = "ASTRA_BENCH_PARENT"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get(PARENT_ENV, "").isdigit():     # a kill -9 of the benchmark left this worker and its ranks
        exit_with_launcher(int(os.environ[PARENT_ENV]))
    with open(argv[0]) as f:
        job = json.load(f)
    # the measured link is the loopback (shaped in its namespace or not): an inherited GLOO_SOCKET_IFNAME=eth0
    # measured the "unshaped loopback" row over eth0 and then failed inside the namespace, which has no eth0
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    tune_allocator()        # the one-device run here gets the allocator of the ranks astra.launch starts
    result = run_job(job)
    with open(argv[1], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
