"""Result writers of ``astra bench``: CSV, JSON, a markdown table and a PNG plot (latency vs bandwidth)."""
from __future__ import annotations

import csv
import json
import os
import textwrap
from typing import Dict, List, Optional

#: CSV columns, in order. ``bytes_sent_per_rank``: the payload a rank contributes to a forward's exchanges (its own
#: frames; HF TP's partial sums), whatever the collective's algorithm; ``link_bytes``: what the collectives put on the
#: one shared link (all-gather N (N - 1) frames, ring all-reduce 2 (N - 1) tensors)
COLUMNS = ("model", "system", "label", "link", "link_kind", "rate_mbit", "world", "tokens", "layers", "runs",
           "median_s", "min_s", "max_s", "slow", "speedup_vs_single", "bytes_sent_per_rank", "link_bytes",
           "collectives")


def add_speedups(rows: List[Dict]) -> List[Dict]:
    """Set ``speedup_vs_single`` on every row: the model's one-device median over the row's median."""
    single = {r["model"]: r["median_s"] for r in rows if r["system"] == "single"}
    for r in rows:
        base = single.get(r["model"])
        r["speedup_vs_single"] = base / r["median_s"] if base and r["median_s"] > 0 else None
    return rows


def write_csv(rows: List[Dict], path: str, columns=COLUMNS) -> str:
    """``rows`` as CSV with ``columns`` (a missing value or None is an empty cell)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return path


def write_json(rows: List[Dict], meta: Dict, path: str) -> str:
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return path


def _rate_label(rate: Optional[float]) -> str:
    return "unshaped" if rate is None else f"{rate:g} Mbit/s"


def markdown_table(rows: List[Dict]) -> str:
    """One markdown table: a row per (model, link, system) with median [min, max] and the speed-up."""
    lines = ["| model | link | system | prefill s, median [min, max] | runs | x one device | bytes sent/rank |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = f"{r['speedup_vs_single']:.2f}x" if r.get("speedup_vs_single") else ""
        runs = f"{r['runs']}" + (" (slow: ran once)" if r.get("slow") else "")
        lines.append(f"| {r['model']} | {r['link']} | {r['label']} | {r['median_s']:.3f} [{r['min_s']:.3f}, "
                     f"{r['max_s']:.3f}] | {runs} | {sp} | {r['bytes_sent_per_rank']:,} |")
    return "\n".join(lines) + "\n"


#: one colour per system, the same in every panel
COLORS = {"single": "#1f77b4", "ceiling": "#ff7f0e", "hf-tp": "#8c564b", "fp-sp": "#2ca02c", "astra-g32": "#d62728",
          "astra-g1": "#9467bd"}


def plot(rows: List[Dict], path: str, title: str) -> str:
    """PNG: one panel per model, latency (log) against bandwidth (log x), one line per system; the unshaped
    loopback is drawn at the right edge, systems that do not communicate as horizontal lines, and points
    of systems that ran once (slow) are ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    models = list(dict.fromkeys(r["model"] for r in rows))
    rates = sorted({r["rate_mbit"] for r in rows if r["rate_mbit"] is not None})
    x_unshaped = (max(rates) if rates else 1.0) * 4
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        for system in dict.fromkeys(r["system"] for r in mine):
            pts = sorted((((r["rate_mbit"] or x_unshaped), r) for r in mine if r["system"] == system),
                         key=lambda p: p[0])
            label = pts[0][1]["label"]
            if len(pts) == 1:   # no communication: the same at every bandwidth
                lo = min(rates) if rates else x_unshaped / 10
                ax.plot([lo, x_unshaped], [pts[0][1]["median_s"]] * 2, "--", label=label, color=COLORS.get(system))
                continue
            xs = [x for x, _ in pts]
            ys = [r["median_s"] for _, r in pts]
            err = [[r["median_s"] - r["min_s"] for _, r in pts], [r["max_s"] - r["median_s"] for _, r in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label, color=COLORS.get(system))
            slow = [(x, r["median_s"]) for x, r in pts if r.get("slow")]
            if slow:   # ran once: ringed
                ax.scatter(*zip(*slow), s=110, facecolors="none", edgecolors=COLORS.get(system))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=6)
        ax.set_xticks(rates + [x_unshaped], [f"{r:g}" for r in rates] + ["unshaped"])
        ax.xaxis.set_minor_formatter(NullFormatter())      # log-axis minor labels ("2x10^1") beside the rates
        ax.set_xlabel("link bandwidth (Mbit/s)")
        ax.set_ylabel("prefill latency (s), median [min, max]")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    # wrapped to the figure's width: one model's panel clipped the title, and with it the link's name
    fig.suptitle(textwrap.fill(title + "; ringed points: slow, ran once", width=int(15 * 5.5 * len(models))),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(rows: List[Dict], meta: Dict, out_dir: str, stem: str) -> Dict[str, str]:
    """``stem``.csv, .json, .md and .png under ``out_dir``; returns their paths."""
    add_speedups(rows)
    base = os.path.join(out_dir, stem)
    with open(base + ".md", "w") as f:
        f.write(f"{meta['title']}\n\n" + markdown_table(rows))
    return {"csv": write_csv(rows, base + ".csv"), "json": write_json(rows, meta, base + ".json"),
            "md": base + ".md", "png": plot(rows, base + ".png", meta["title"])}
