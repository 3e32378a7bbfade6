"""``astra bench --predict``: fit :mod:`astra.costmodel` at N = 2 and report its error on held-out points."""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

from ..costmodel import Machine, Point, Profile, evaluate, fit
from .ranks import DISTRIBUTED
from .results import write_csv, write_json


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def profiles_from(rows: List[Dict], world: int) -> Dict[Tuple[str, str], Profile]:
    """Per (system, model) the N = ``world`` unshaped measurements the cost model starts from."""
    ceilings = {r["model"]: r for r in rows if r["system"] == "ceiling" and r["world"] == world}
    out = {}
    for r in rows:
        if r["system"] in DISTRIBUTED and r["world"] == world and r["rate_mbit"] is None:
            ceiling = ceilings.get(r["model"], {})
            local = ceiling.get("median_s", r["compute_s"])
            out[(r["system"], r["model"])] = Profile(
                system=r["system"], model=r["model"], compute_s=r["compute_s"], local_s=min(local, r["compute_s"]),
                frame_bytes=r["frame_bytes"], collectives=r["collectives"], syncs=r.get("syncs", 0),
                kind="allreduce" if r["system"] == "hf-tp" else "allgather", tokens=r.get("tokens", 0),
                split_costs=tuple(r["split_costs"]) if r.get("split_costs") else None,
                probe_s=ceiling.get("probe_s", 0.0), probe_tokens=ceiling.get("probe_tokens", 0),
                own_probe_s=r.get("probe_s", 0.0), own_probe_tokens=r.get("probe_tokens", 0) * world)
    return out


def machines_from(rows: List[Dict]) -> Dict[str, Dict[int, Machine]]:
    """The machine probes of every model at every N: its unshaped ceiling rows (with the synchronisation probe)."""
    out: Dict[str, Dict[int, Machine]] = {}
    for r in rows:
        if r["system"] == "ceiling" and r["rate_mbit"] is None:
            out.setdefault(r["model"], {})[r["world"]] = Machine(
                world=r["world"], ceiling_s=r["median_s"], sync_s=r.get("sync_s", 0.0),
                sync_collectives=r.get("sync_collectives", 0))
    return out


def _machine_line(machines: Dict[str, Dict[int, Machine]]) -> str:
    parts = []
    for model, by_n in sorted(machines.items()):
        probes = ", ".join(f"N={n}: ceiling {m.ceiling_s:.3f} s, stall {m.stall_s * 1e3:.1f} ms/collective"
                           for n, m in sorted(by_n.items()))
        parts.append(f"{model} ({probes})")
    return "machine probes: " + ("; ".join(parts) if parts else "none")


def split_points(rows: List[Dict], world: int, fit_rates) -> Tuple[List[Point], List[Point]]:
    """(points used to fit: N = ``world`` unshaped and at ``fit_rates``; held out: the other points)."""
    fitted, held = [], []
    for r in rows:
        if r["system"] not in DISTRIBUTED:
            continue
        p = Point(r["system"], r["model"], r["world"], r["rate_mbit"], r["median_s"])
        used = r["world"] == world and (r["rate_mbit"] is None or r["rate_mbit"] in fit_rates)
        (fitted if used else held).append(p)
    return fitted, held


def report(cfg, rows_n: List[Dict], rows_other: List[Dict], out_dir: str, stem: str) -> Dict[str, str]:
    """Fit on N = cfg.world, evaluate on the rest; print and write the table; returns the files written."""
    fit_rates = set(cfg.extra["fit"])
    profiles = profiles_from(rows_n, cfg.world)
    fitted, held = split_points(rows_n + rows_other, cfg.world, fit_rates)
    machines = machines_from(rows_n + rows_other)
    # the emulated link charges bytes * 8 / rate exactly: no token bucket (a real tc-tbf link has one)
    bucket = {"burst_bytes": 0.0} if cfg.link == "emulated" else {}
    model = fit(profiles, fitted, usable_cores(), machines=machines, **bucket)
    table = evaluate(model, profiles, held)
    worst = max((abs(t["error_pct"]) for t in table), default=float("nan"))
    head = (f"cost model fitted at N={cfg.world} on {sorted(fit_rates)} Mbit/s ({len(fitted)} points): "
            f"eta={model.eta:.3f}, per collective {model.per_collective_s * 1e3:.2f} ms, {model.cores} cores; "
            f"held-out points {len(table)}, worst |error| {worst:.1f}%")
    lines = [head, "", _machine_line(machines), "",
             "| model | system | N | link Mbit/s | measured s | predicted s | error |", "|---|---|---|---|---|---|---|"]
    for t in table:
        rate = "unshaped" if t["rate_mbit"] is None else f"{t['rate_mbit']:g}"
        lines.append(f"| {t['model']} | {t['system']} | {t['world']} | {rate} | {t['measured_s']:.3f} | "
                     f"{t['predicted_s']:.3f} | {t['error_pct']:+.1f}% |")
    text = "\n".join(lines) + "\n"
    print(text)
    base = os.path.join(out_dir, stem)
    with open(base + ".md", "w") as f:
        f.write(text)
    cols = ["model", "system", "world", "rate_mbit", "measured_s", "predicted_s", "error_pct"]
    meta = {"link": cfg.link, "eta": model.eta, "per_collective_s": model.per_collective_s, "cores": model.cores,
            "fit_rates": sorted(fit_rates), "worst_abs_error_pct": worst, "raw_rows": rows_other,
            "machines": {m: {n: vars(x) for n, x in by.items()} for m, by in machines.items()}}
    return {"predict_md": base + ".md", "predict_json": write_json(table, meta, base + ".json"),
            "predict_csv": write_csv(table, base + ".csv", cols)}
