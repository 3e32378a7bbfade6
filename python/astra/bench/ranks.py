"""What one benchmark rank runs (under :func:`astra.launch`): every distributed system on the same model and
input, one after the other, timed between barriers. The slowest rank's time is a forward's latency."""
from __future__ import annotations

import sys
import time
from typing import Callable, Dict, List

from ..agreement import FINGERPRINT_NBYTES
from ..cli import quiet_transformers
from ..transport import ENVELOPE_NBYTES

#: the systems, in the order they are run and shown (key -> label)
SYSTEMS = {
    "single": "one device",
    "ceiling": "ceiling (N x T/N, no communication)",
    "hf-tp": "HF tensor parallel (tp_plan=auto)",
    "fp-sp": "full-precision SP",
    "astra-g32": "ASTRA G=32",
    "astra-g1": "ASTRA G=1",
}
#: the systems that communicate (run under astra.launch on the link)
DISTRIBUTED = ("hf-tp", "fp-sp", "astra-g32", "astra-g1")
#: the ceiling, and each system on the unshaped link, also time a forward of 1/PROBE_SHARE of their tokens (the cost
#: model's fixed per-rank part)
PROBE_SHARE = 4


def probe_tokens(tokens: int, world: int) -> int:
    """Tokens per rank of a probe forward (1/PROBE_SHARE of a rank's share; 0: too few tokens to probe)."""
    return tokens // (world * PROBE_SHARE)


def slowest(per_rank: List[List[float]]) -> List[float]:
    """Per run, the slowest rank's time (``per_rank[r][i]``: rank r's i-th run; every rank runs as often)."""
    return [max(times) for times in zip(*per_rank)]


def progress(msg: str) -> None:
    """One progress line on stderr (the benchmark's long work reports as it goes)."""
    print(msg, file=sys.stderr, flush=True)


def timed(fn: Callable[[], object], runs: int, warmup: bool, barrier: Callable[[], None] = lambda: None,
          label: str = "") -> List[float]:
    """Seconds of ``runs`` calls of ``fn`` (after one untimed warm-up call when ``warmup``)."""
    import torch

    times = []
    with torch.inference_mode():
        if warmup:
            barrier()
            fn()
        for i in range(runs):
            barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            if label:
                progress(f"    {label}: run {i + 1}/{runs} {times[-1]:.3f}s")
    return times


#: what a rank sends per forward besides its layers' frames: the input agreement's fingerprint and the
#: end-of-forward status envelope (one all-gather each)
SYNC_BYTES_PER_RANK = FINGERPRINT_NBYTES + ENVELOPE_NBYTES


def _forward_stats(stats) -> Dict[str, float]:
    return {"bytes_sent": sum(s.bytes_sent for s in stats), "frame_bytes": sum(s.bytes_on_wire for s in stats),
            "wait_s": sum(s.wait_s for s in stats), "collectives": sum(1 for s in stats if s.bytes_on_wire)}


def _run_sp(rank, job, key, model, inputs, barrier) -> Dict:
    import astra
    from .models import build_inputs

    cb = job["codebooks"].get(key)
    pm = astra.parallelize(model, cb, timeout=job["timeout_s"])
    try:
        runs, warm = job["plan"][key]
        times = timed(lambda: pm(**inputs), runs, warm, barrier, job["label"] + SYSTEMS[key] if rank == 0 else "")
        res = {"times": times, **_forward_stats(pm.stats), "split_costs": pm.split_costs, "syncs": pm.exchanges,
               "sync_bytes": SYNC_BYTES_PER_RANK}
        n = probe_tokens(job["tokens"], job["world"])
        if job.get("probe") and n and job["model"] != "vit":   # ViT's smaller image needs other position embeddings
            # the same system on 1/PROBE_SHARE of the tokens (astra.costmodel.own_unit_costs)
            small = build_inputs(job["model"], n * job["world"])
            res.update(probe_times=timed(lambda: pm(**small), runs, warm, barrier),
                       probe_wait_s=_forward_stats(pm.stats)["wait_s"], probe_tokens=n)
    finally:
        pm.unpatch()
    if job.get("breakdown"):
        res["breakdown"] = _profiled(job, key, cb, model, inputs, barrier)
    return res


def _profiled(job, key, cb, model, inputs, barrier) -> Dict:
    """``astra.parallelize(profile=True)`` forwards after the timed ones: this rank's breakdown of the forward
    whose wall time is the median, with that wall time (the caller's ``perf_counter`` around the call)."""
    import astra

    pm = astra.parallelize(model, cb, timeout=job["timeout_s"], profile=True)
    try:
        runs, warm = job["plan"][key]
        walls, items = [], []
        for _ in range(max(1, runs)):
            walls.append(timed(lambda: pm(**inputs), 1, warm and not items, barrier)[0])
            items.append(pm.breakdown)
        mid = sorted(range(len(walls)), key=walls.__getitem__)[len(walls) // 2]
        return {"wall_s": walls[mid], **items[mid].to_dict()}
    finally:
        pm.unpatch()


def tp_allreduces_per_forward(model) -> int:
    """All-reduces in one TP forward: one per row-wise sharded module of the plan the model was loaded with (HF's
    ``model.tp_plan``, else its config's): every layer's row-wise linears, and a row-wise (vocab-parallel) embedding
    once, which the config's plan does not list (transformers 5 adds it)."""
    plan = getattr(model, "tp_plan", None) or getattr(model.config, "base_model_tp_plan", None) or {}
    layers = model.config.num_hidden_layers
    return sum(layers if "*" in key else 1 for key, v in plan.items() if "rowwise" in str(v))


def _run_tp(rank, job, inputs, barrier) -> Dict:
    import transformers as tf

    quiet_transformers()
    if hasattr(tf, "DistributedConfig"):       # transformers >= 5.x
        kw = {"distributed_config": tf.DistributedConfig(tp_size=job["world"], tp_plan="auto")}
    else:
        kw = {"tp_plan": "auto"}
    model = tf.AutoModel.from_pretrained(job["tp_dir"], **kw).eval()
    runs, warm = job["plan"]["hf-tp"]
    times = timed(lambda: model(**inputs), runs, warm, barrier, job["label"] + SYSTEMS["hf-tp"] if rank == 0 else "")
    n = tp_allreduces_per_forward(model)
    tensor = inputs["input_ids"].numel() * model.config.hidden_size * 4        # fp32 activations [B, T, D]
    # bytes_sent: the payload a rank contributes, as for the other systems (their own frames): its partial sums.
    # What the collective puts on the link (a ring all-reduce: 2 (N - 1) / N of them per rank) is the row's
    # link_bytes; counting that here made fp-sp look 18x lighter than TP at N = 4 where the link said 6x.
    return {"times": times, "bytes_sent": tensor * n, "frame_bytes": tensor * n, "wait_s": 0.0, "collectives": n,
            "syncs": n}


def _run_ceiling(rank, job, model, barrier) -> Dict:
    """The ceiling (T/N tokens per rank, no communication) and its two machine probes: the same with 1/PROBE_SHARE
    of the tokens, whose difference splits a rank's compute into per-token work and a fixed part
    (:func:`astra.costmodel.unit_costs`), and the same with a 64-byte all-gather before every layer's attention,
    whose difference is what synchronising N ranks costs on this machine per collective (ranks sharing cores
    wait for each other's time slices; :attr:`astra.costmodel.Machine.stall_s`)."""
    from .models import ceiling_inputs

    local = ceiling_inputs(job["model"], job["tokens"], job["world"])
    runs, warm = job["plan"]["ceiling"]
    lab = job["label"] + SYSTEMS["ceiling"] if rank == 0 else ""
    out = {"times": timed(lambda: model(**local), runs, warm, barrier, lab), "bytes_sent": 0, "frame_bytes": 0,
           "wait_s": 0.0, "collectives": 0}
    if probe_tokens(job["tokens"], job["world"]):      # else too few tokens: the cost model has no fixed part
        small = ceiling_inputs(job["model"], job["tokens"], job["world"] * PROBE_SHARE)
        out.update(probe_times=timed(lambda: model(**small), runs, warm, barrier),
                   probe_tokens=probe_tokens(job["tokens"], job["world"]))
    hooks = _sync_hooks(model)
    try:
        out.update(sync_times=timed(lambda: model(**local), runs, warm, barrier), sync_collectives=len(hooks))
    finally:
        for h in hooks:
            h.remove()
    return out


def _sync_hooks(model) -> list:
    """Forward pre-hooks that all-gather 64 bytes before every layer's attention (the synchronisation probe)."""
    import torch
    import torch.distributed as dist

    from ..models import family_of

    buf = torch.zeros(64, dtype=torch.uint8)
    outs = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    return [m.register_forward_pre_hook(lambda *_: dist.all_gather(outs, buf)) for m in family_of(model).attn_modules]


def bench_rank(rank: int, job: Dict) -> Dict[str, Dict]:
    """Run ``job["systems"]`` (keys of :data:`SYSTEMS` except ``single``) on this rank; per system the
    forward times and per-forward byte counts."""
    import torch
    import torch.distributed as dist

    from .models import build_inputs, build_model

    torch.set_num_threads(1)
    barrier = dist.barrier
    model = build_model(job["model"], job["layers"], job["tokens"])
    inputs = build_inputs(job["model"], job["tokens"])
    out = {}
    for key in job["systems"]:
        if key == "ceiling":
            out[key] = _run_ceiling(rank, job, model, barrier)
        elif key == "hf-tp":
            out[key] = _run_tp(rank, job, inputs, barrier)
        else:
            out[key] = _run_sp(rank, job, key, model, inputs, barrier)
    return out


def bench_models(rank: int, jobs: List[Dict]) -> Dict[str, Dict[str, Dict]]:
    """:func:`bench_rank` for each model's job in turn (one process group for all of them)."""
    return {job["model"]: bench_rank(rank, job) for job in jobs}
