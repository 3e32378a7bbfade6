"""The bandwidth sweep behind ``astra bench``: prepare the models, run every link, collect result rows."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

from ..cli import quiet_transformers
from ..errors import AstraError
from ..netlink import (
    link_bytes_allgather,
    link_bytes_allreduce,
    link_name,
    netns_command,
    shaped_namespace,
    transfer_time,
)
from .models import has_tp_plan, tp_splits
from .ranks import DISTRIBUTED, SYSTEMS, progress
from .worker import PARENT_ENV

#: the default bandwidths in Mbit/s (plus the unshaped loopback)
DEFAULT_RATES = (10.0, 20.0, 50.0, 100.0, 500.0)
#: codebooks of the ASTRA systems: key -> groups (K = CODEBOOK_SIZE)
ASTRA_GROUPS = {"astra-g32": 32, "astra-g1": 1}


@dataclass
class BenchConfig:
    models: Tuple[str, ...] = ("gpt2", "llama", "vit")
    systems: Tuple[str, ...] = tuple(SYSTEMS)
    rates: Tuple[float, ...] = DEFAULT_RATES
    tokens: int = 1024
    layers: int = 12
    world: int = 2
    repeats: int = 3
    slow_after_s: float = 20.0       # a system estimated slower than this per forward runs once
    link: str = "real"               # "real" (root: netns + tc) or "emulated"
    loss: float = 0.0
    delay_ms: float = 0.0
    timeout_s: float = 900.0
    breakdown: bool = False          # also profile the ASTRA / SP systems (astra.profile), every rank
    extra: Dict = field(default_factory=dict)


def _calibrate(name: str, cfg: BenchConfig, tmp: str) -> Dict[str, str]:
    """Codebooks of the ASTRA systems for bench model ``name`` (k-means on random inputs), saved to files."""
    from .models import CODEBOOK_SIZE, bench_codebooks, build_model

    model = build_model(name, cfg.layers, cfg.tokens)
    paths = {}
    for key, groups in ASTRA_GROUPS.items():
        if key in cfg.systems:
            progress(f"  {name}: calibrating codebooks for {SYSTEMS[key]} (K={CODEBOOK_SIZE}, random inputs)")
            cb = bench_codebooks(model, name, cfg.tokens, groups)
            paths[key] = os.path.join(tmp, f"{name}-{key}.safetensors")
            cb.save(paths[key])
    if "hf-tp" in cfg.systems and has_tp_plan(name):
        quiet_transformers()
        paths["tp_dir"] = os.path.join(tmp, f"{name}-hf")
        model.save_pretrained(paths["tp_dir"])
    return paths


def _systems_for(name: str, cfg: BenchConfig, unshaped: bool, world: int) -> List[str]:
    keep = [k for k in cfg.systems if k in DISTRIBUTED or unshaped]
    return [k for k in keep if k != "hf-tp" or (has_tp_plan(name) and tp_splits(name, world))]


def estimate_s(row_unshaped: Dict, rate: Optional[float], delay_ms: float = 0.0) -> float:
    """A forward's latency over a link of ``rate`` from its unshaped median and the bytes it puts on the link."""
    return row_unshaped["median_s"] + transfer_time(row_unshaped["link_bytes"], rate,
                                                    collectives=row_unshaped["syncs"], delay_ms=delay_ms)


def plan_systems(name: str, cfg: BenchConfig, rate, unshaped_rows: Dict, world: int) -> Dict[str, list]:
    """Per system to run on bench model ``name`` over the link of ``rate`` at ``world`` ranks: ``[runs, warm-up]``
    (a system estimated slower than ``cfg.slow_after_s`` runs once, without warm-up)."""
    plan = {}
    for key in _systems_for(name, cfg, rate is None, world):
        base = unshaped_rows.get((name, key))
        slow = base is not None and estimate_s(base, rate, cfg.delay_ms) > cfg.slow_after_s
        plan[key] = [1, False] if slow else [cfg.repeats, True]
    return plan


def _run_worker(job: Dict, ns: Optional[str], tmp: str) -> Dict:
    jpath, opath = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.json")
    with open(jpath, "w") as f:
        json.dump(job, f)
    argv = netns_command(ns, [sys.executable, "-m", "astra.bench.worker", jpath, opath])
    # TMPDIR: the ranks' rendezvous directories go into the sweep's own, which is removed however the sweep ends
    # (a worker killed with the sweep leaves its launch's behind otherwise)
    env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore::FutureWarning", TMPDIR=tmp, **{PARENT_ENV: str(os.getpid())})
    r = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise AstraError(f"the benchmark worker for {job['link']} failed (exit code {r.returncode}); "
                           "its error is printed above")
    with open(opath) as f:
        return json.load(f)


def make_row(name: str, key: str, res: Dict, cfg: BenchConfig, rate: Optional[float], kind: str,
             world: Optional[int] = None, slow: Optional[bool] = None) -> Dict:
    """One result row (a system on a model over one link) from a worker's measurements. ``slow``: the plan ran it
    once without warm-up (:func:`plan_systems`; None: read from the number of runs, which --repeats 1 hid)."""
    world = world or cfg.world
    times = res["times"]
    if key == "hf-tp":
        link_b = link_bytes_allreduce(res["frame_bytes"], world)
    else:       # the layers' frames and the forward's agreement and status all-gathers
        link_b = link_bytes_allgather(res["frame_bytes"] + res.get("sync_bytes", 0), world)
    med = statistics.median(times)
    return {"model": name, "system": key, "label": SYSTEMS[key], "world": world, "tokens": cfg.tokens,
            "layers": cfg.layers, "link": link_name(kind, rate, cfg.loss, cfg.delay_ms), "link_kind": kind,
            "rate_mbit": rate, "runs": len(times), "median_s": med, "min_s": min(times), "max_s": max(times),
            "slow": len(times) < cfg.repeats if slow is None else slow, "bytes_sent_per_rank": int(res["bytes_sent"]),
            "frame_bytes": int(res["frame_bytes"]), "link_bytes": int(link_b),
            "collectives": int(res["collectives"]), "syncs": int(res.get("syncs", res["collectives"])),
            "compute_s": max(0.0, med - res["wait_s"]), "times": times,
            "split_costs": res.get("split_costs"),
            **({"probe_tokens": res["probe_tokens"],
                "probe_s": max(0.0, statistics.median(res["probe_times"]) - res.get("probe_wait_s", 0.0))}
               if "probe_times" in res else {}),
            **({"sync_s": statistics.median(res["sync_times"]), "sync_collectives": res["sync_collectives"]}
               if "sync_times" in res else {}),
            **({"breakdown": res["breakdown"]} if "breakdown" in res else {})}


def emulated_row(base: Dict, rate: float, cfg: BenchConfig) -> Dict:
    """The row of ``base`` (measured unshaped) over the emulated link of ``rate``: every run is charged the
    transfer time of the forward's link bytes (:func:`astra.netlink.transfer_time`)."""
    # every collective of the forward waits the link's delay (the agreement and status all-gathers too: syncs)
    extra = transfer_time(base["link_bytes"], rate, collectives=base["syncs"], delay_ms=cfg.delay_ms)
    times = [t + extra for t in base["times"]]
    return dict(base, link=link_name("emulated", rate, cfg.loss, cfg.delay_ms), link_kind="emulated",
                rate_mbit=rate, times=times, median_s=statistics.median(times), min_s=min(times), max_s=max(times))


def _job(cfg: BenchConfig, rate, kind: str, prepared: Dict, unshaped_rows: Dict, world: int) -> Dict:
    models = {}
    for name in cfg.models:
        plan = plan_systems(name, cfg, rate, unshaped_rows, world)
        paths = prepared[name]
        models[name] = {"systems": list(plan), "plan": plan, "tp_dir": paths.get("tp_dir"),
                        "codebooks": {k: v for k, v in paths.items() if k in ASTRA_GROUPS}}
    return {"world": world, "tokens": cfg.tokens, "layers": cfg.layers, "models": models,
            "timeout_s": cfg.timeout_s, "join_timeout_s": 4 * 3600, "breakdown": cfg.breakdown,
            "probe": rate is None and world == cfg.world,     # the systems' own probes, where the cost model fits
            "link": link_name(kind, rate, cfg.loss, cfg.delay_ms)}


def run_links(cfg: BenchConfig, prepared: Dict, tmp: str, world: int, rates, kind: str,
              unshaped_rows: Dict) -> List[Dict]:
    """Measure every system over the unshaped loopback (when ``None`` is in ``rates``) and each shaped link."""
    rows = []
    t0 = time.perf_counter()
    for i, rate in enumerate(rates):
        name = link_name(kind, rate, cfg.loss, cfg.delay_ms)
        progress(f"[{i + 1}/{len(rates)}] N={world}, {name} (elapsed {time.perf_counter() - t0:.0f}s)")
        job = _job(cfg, rate, kind, prepared, unshaped_rows, world)
        if rate is None:
            res = _run_worker(job, None, tmp)
        else:
            with shaped_namespace(rate, loss=cfg.loss, delay_ms=cfg.delay_ms) as ns:
                res = _run_worker(job, ns, tmp)
        for model, systems in res.items():
            for key, r in systems.items():
                row = make_row(model, key, r, cfg, rate, kind, world, slow=not job["models"][model]["plan"][key][1])
                rows.append(row)
                if rate is None:
                    unshaped_rows[(model, key)] = row
    return rows


def prepare(cfg: BenchConfig, tmp: str) -> Dict[str, Dict[str, str]]:
    """Codebooks (and the saved HF model for TP) of every bench model."""
    progress("preparing models and codebooks")
    return {name: _calibrate(name, cfg, tmp) for name in cfg.models}


def run_sweep(cfg: BenchConfig, extra_worlds=()) -> List[Dict]:
    """Every system on every model over the unshaped loopback and each bandwidth of ``cfg.rates``, at N =
    ``cfg.world`` and then at each of ``extra_worlds`` (there without the one-device row)."""
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory(prefix="astra-bench-") as tmp:
        prepared = prepare(cfg, tmp)
        for world in (cfg.world, *extra_worlds):
            # at the other N: the systems that communicate, and the ceiling with its machine probes
            wcfg = cfg if world == cfg.world else replace(cfg, systems=tuple(k for k in cfg.systems
                                                                             if k in DISTRIBUTED or k == "ceiling"))
            unshaped: Dict = {}
            for name in wcfg.models:
                if "hf-tp" in wcfg.systems and has_tp_plan(name) and not tp_splits(name, world):
                    progress(f"  {name}: HF tensor parallel skipped at N={world} (its heads do not split {world} ways)")
            if cfg.link == "real":
                rates = [None] + sorted(cfg.rates, reverse=True)
                rows += run_links(wcfg, prepared, tmp, world, rates, "real", unshaped)
                continue
            rows += run_links(wcfg, prepared, tmp, world, [None], "emulated", unshaped)
            for rate in sorted(cfg.rates, reverse=True):
                rows += [emulated_row(r, rate, cfg) for r in list(unshaped.values()) if r["system"] in DISTRIBUTED]
    return rows
