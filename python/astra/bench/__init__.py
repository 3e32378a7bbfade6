"""``astra bench``: prefill latency against link bandwidth, ASTRA beside the systems users would otherwise run."""
from __future__ import annotations

import importlib.util
import math
import os
import shutil
import time
from typing import List, Optional

from ..cli import OPTIONAL_PACKAGES
from ..netlink import check_rate, netem_available, real_link_available
from ..transport import checked_timeout
from .models import BENCH_MODELS, check_tokens, has_tp_plan, tp_splits
from .ranks import DISTRIBUTED, SYSTEMS
from .sweep import ASTRA_GROUPS, DEFAULT_RATES, BenchConfig, run_sweep

DESCRIPTION = """\
Prefill latency against link bandwidth. In one run, on the same random-init model and input, it measures:
one device; the ceiling (N processes each running T/N tokens at once, no communication); HF tensor
parallelism (tp_plan="auto" over gloo, models with a TP plan); full-precision sequence parallelism;
ASTRA G=32 and G=1 (K=1024 codebooks, k-means on random inputs). Each point is the median of --repeats
forwards (slowest rank) with min and max; a system estimated slower than --slow-after seconds per forward
runs once and is marked so.

The link is real by default when run as root: a network namespace per bandwidth whose loopback (MTU 1500)
is shaped by tc tbf (plus nftables random drops for --loss, netem for --delay). Without root, or with
--link emulated, the ranks run on the plain loopback and each forward is charged the transfer time of the
bytes it put on the one shared link (bytes x 8 / rate, one --delay per collective, no overlap credited,
loss not modelled). Every output names the link it used. Writes CSV, JSON, a markdown table and a PNG
plot under --out-dir.

--predict also measures N = 2, 4 and 8 ranks and fits the cost model (astra.costmodel) at N = 2 on
--fit-rates; it reports the prediction error on every other measured point."""

#: --quick: small enough for a few minutes on two cores
QUICK = {"tokens": 256, "layers": 2, "rates": (10.0, 100.0), "repeats": 3}
TITLE = "{kind} link; random-init {models}; {layers} layers, T={tokens}, N={world} ranks x 1 thread"


def _listed(opt: str, values: list, fmt=str) -> list:
    """``values`` of option ``opt``, else ValueError: none, or one listed twice."""
    if not values:
        raise ValueError(f"{opt} is empty: give at least one value")
    twice = [v for i, v in enumerate(values) if v in values[:i]]
    if twice:
        raise ValueError(f"{opt} lists {fmt(twice[0])} more than once")
    return values


def _floats(opt: str, s: str) -> List[float]:
    try:
        values = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{opt}: expected comma-separated numbers, got {s!r}") from None
    return _listed(opt, values, lambda v: f"{v:g}")


def _names(opt: str, s: str) -> List[str]:
    return _listed(opt, [x.strip() for x in s.split(",") if x.strip()])


def add_bench_arguments(b) -> None:
    b.add_argument("--models", default=",".join(BENCH_MODELS), help="comma-separated: gpt2 (GPT-2-small shape), "
                   "llama (Llama-shaped, hidden 768, 12 layers, MLP 2048), vit (ViT-Base shape)")
    b.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {', '.join(SYSTEMS)}")
    b.add_argument("--rates", default=",".join(f"{r:g}" for r in DEFAULT_RATES),
                   help="link bandwidths in Mbit/s, comma-separated (the unshaped loopback is always measured)")
    b.add_argument("--tokens", type=int, default=1024, help="T: tokens per input (ViT: patches; a square)")
    b.add_argument("--layers", type=int, default=12, help="Transformer layers")
    b.add_argument("--world-size", type=int, default=2, help="N: ranks, one thread each")
    b.add_argument("--repeats", type=int, default=3, help="timed forwards per point (after one warm-up)")
    b.add_argument("--slow-after", type=float, default=20.0,
                   help="seconds per forward (estimated from the unshaped run) above which a system runs once")
    b.add_argument("--link", choices=("auto", "real", "emulated"), default="auto",
                   help="auto: real when root (and ip/tc exist), else emulated")
    b.add_argument("--loss", type=float, default=0.0,
                   help="packet loss in percent (nftables random drops; real link only)")
    b.add_argument("--delay", type=float, default=0.0, help="one-way delay in ms (netem on the real link)")
    b.add_argument("--out-dir", default=os.path.join("bench", "results"),
                   help="directory for the results (made if missing)")
    b.add_argument("--quick", action="store_true",
                   help=f"a few minutes: T={QUICK['tokens']}, {QUICK['layers']} layers, rates "
                   f"{','.join(f'{r:g}' for r in QUICK['rates'])}, {QUICK['repeats']} repeats (overrides those "
                   "options)")
    b.add_argument("--predict", action="store_true",
                   help="also measure N of --predict-worlds and report the cost model")
    b.add_argument("--predict-worlds", default="4,8", help="N values the cost model predicts (with --predict)")
    b.add_argument("--fit-rates", default="10,100", help="bandwidths (N=2) the cost model is fitted on")
    b.add_argument("--breakdown", action="store_true",
                   help="also print every rank's per-layer time breakdown of full-precision SP and ASTRA (extra "
                   "profiled forwards after the timed ones; astra.profile)")
    b.add_argument("--timeout", type=float, default=900.0, help="seconds to wait on a peer before failing")


def check_bench_args(args) -> None:
    """Every ``astra bench`` argument, before any work (ValueError with one line)."""
    if args.quick:
        args.tokens, args.layers, args.repeats = QUICK["tokens"], QUICK["layers"], QUICK["repeats"]
        args.rates = ",".join(f"{r:g}" for r in QUICK["rates"])
    models, systems = _names("--models", args.models), _names("--systems", args.systems)
    bad = [m for m in models if m not in BENCH_MODELS] or [s for s in systems if s not in SYSTEMS]
    if bad:
        raise ValueError(f"unknown --models/--systems {bad}: models {', '.join(BENCH_MODELS)}; "
                         f"systems {', '.join(SYSTEMS)}")
    rates = _floats("--rates", args.rates)
    if not all(0 < r < math.inf for r in rates):
        raise ValueError(f"--rates must be finite and > 0 Mbit/s, got {args.rates}")
    for m in models:
        check_tokens(m, args.tokens)
    if args.world_size < 2 or args.tokens % args.world_size:
        raise ValueError(f"--world-size must be >= 2 and divide --tokens {args.tokens}, got {args.world_size}")
    for opt, v, lo in (("--layers", args.layers, 1), ("--repeats", args.repeats, 1)):
        if v < lo:
            raise ValueError(f"{opt} must be >= {lo}, got {v}")
    quantized = [s for s in systems if s in ASTRA_GROUPS]
    if quantized and args.layers < 2:
        raise ValueError(f"{', '.join(quantized)} need --layers >= 2: layer 0 exchanges nothing (every rank computes "
                         "it), so one layer leaves nothing to quantize")
    _check_tp(models, systems, args.world_size)
    if not args.slow_after > 0 or not 0 <= args.delay < math.inf or not 0 <= args.loss < 100:
        raise ValueError("--slow-after must be > 0, --delay finite and >= 0, --loss in [0, 100)")
    try:
        args.timeout = checked_timeout(args.timeout)
    except ValueError as e:
        raise ValueError(f"--timeout: {e}") from None
    worlds, fit = _predict_args(args, rates, systems)
    _check_link(args, rates)
    # the packages last: every argument error is reported first
    for mod, what in (("accelerate", "hf-tp (HF tensor parallelism)"), ("matplotlib", "the plot")):
        if (mod != "accelerate" or "hf-tp" in systems) and importlib.util.find_spec(mod) is None:
            raise ValueError(f"{what} needs {mod}: pip install 'astra-kernels[{OPTIONAL_PACKAGES[mod]}]'")
    try:                                   # last: nothing is made for a command line that fails its checks
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out-dir {args.out_dir}: cannot make that directory ({e.strerror})") from e
    _check_outputs(args.out_dir, stem_of(args), args.predict)
    args.bench = BenchConfig(models=tuple(models), systems=tuple(systems), rates=tuple(rates), tokens=args.tokens,
                             layers=args.layers, world=args.world_size, repeats=args.repeats,
                             slow_after_s=args.slow_after, link=args.link, loss=args.loss, delay_ms=args.delay,
                             timeout_s=args.timeout, breakdown=args.breakdown, extra={"worlds": worlds, "fit": fit})


def _check_tp(models: List[str], systems: List[str], world: int) -> None:
    """hf-tp asked for must run on at least one of the models at ``world`` ranks (where it cannot, it is left out
    of that model's runs with a progress line)."""
    if "hf-tp" in systems and not any(has_tp_plan(m) and tp_splits(m, world) for m in models):
        raise ValueError(f"hf-tp runs on none of --models {','.join(models)} at --world-size {world}: it needs a "
                         "model with an HF tensor-parallel plan (llama) whose heads split that many ways")


def _predict_args(args, rates: List[float], systems: List[str]):
    """(--predict-worlds, --fit-rates), checked when --predict is given."""
    worlds, fit = _floats("--predict-worlds", args.predict_worlds), _floats("--fit-rates", args.fit_rates)
    if not args.predict:
        return [int(w) for w in worlds if w == int(w)], fit
    if not any(s in DISTRIBUTED for s in systems):
        # found by the fit after the whole sweep (~25 min): no measurement to fit the cost model on
        raise ValueError(f"--predict fits the cost model on the systems that communicate: give one of "
                         f"{', '.join(DISTRIBUTED)} in --systems (got {', '.join(systems)})")
    if args.world_size != 2:
        # the cost model's per-N formulas are fitted on N = 2 measurements (astra.costmodel)
        raise ValueError(f"--predict fits the cost model at --world-size 2, got --world-size {args.world_size}")
    bad = [w for w in worlds if w != int(w) or w < 2 or args.tokens % int(w) or w == args.world_size]
    if bad:
        raise ValueError(f"--predict-worlds must be whole numbers >= 2 that divide --tokens {args.tokens}, other "
                         f"than --world-size {args.world_size} (measured anyway), got {bad[0]:g}")
    missing = [r for r in fit if r not in rates]
    if missing:
        raise ValueError(f"--fit-rates must be among --rates {args.rates}: {missing[0]:g} is not")
    return [int(w) for w in worlds], fit


def stem_of(args) -> str:
    """The result files' name: ``bench`` (``bench-quick`` with --quick)."""
    return "bench-quick" if args.quick else "bench"


def _check_outputs(out_dir: str, stem: str, predict: bool) -> None:
    """The result files can be written (found only after every measurement before: a directory named bench.csv)."""
    names = [stem + ext for ext in (".csv", ".json", ".md", ".png")]
    names += [stem + "-predict" + ext for ext in (".csv", ".json", ".md")] if predict else []
    for path in [out_dir] + [os.path.join(out_dir, n) for n in names]:
        if (os.path.isdir(path) and path != out_dir) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            raise ValueError(f"--out-dir: cannot write {path} (a directory, or not writable)")


def _check_link(args, rates: List[float]) -> None:
    """--link (auto resolved), the --rates given as ``rates``, --loss and --delay against what this machine can do."""
    why = real_link_available()
    if args.link == "real" and why:
        raise ValueError(f"--link real: {why}")
    args.link = ("emulated" if why else "real") if args.link == "auto" else args.link
    if args.link == "real":
        for rate in rates:
            try:
                check_rate(rate)
            except ValueError as e:         # tc refused it after the unshaped run, losing its measurements
                raise ValueError(f"--rates: {e}") from None
    if args.link == "emulated" and args.loss:
        raise ValueError("--loss needs the real link (root): the emulated link does not model loss")
    no_netem = netem_available() if args.link == "real" and args.delay else None     # a throw-away namespace
    if no_netem:
        raise ValueError(f"--delay on the real link: {no_netem}")
    if args.link == "real" and args.loss and shutil.which("nft") is None:
        raise ValueError("--loss on the real link needs the nft command (apt-get install nftables)")


def title_of(cfg: BenchConfig, world: Optional[int] = None) -> str:
    kind = "real tc-tbf (netns)" if cfg.link == "real" else "emulated"
    return TITLE.format(kind=kind, models=", ".join(cfg.models), layers=cfg.layers, tokens=cfg.tokens,
                        world=world or cfg.world)


def breakdown_tables(rows) -> str:
    """Every rank's breakdown of every profiled row (markdown, one table per rank)."""
    from ..profile import Breakdown, format_breakdown

    out = []
    for r in rows:
        if r["link_kind"] == "emulated" and r["rate_mbit"] is not None:
            continue        # an emulated link's row is the unshaped run plus a transfer time: same breakdown
        for rank, d in enumerate(r.get("breakdown") or []):
            title = (f"### {r['model']} | {r['link']} | {r['label']} | rank {rank}: the median of "
                     f"{r['runs']} profiled forward(s), ms")
            out.append(format_breakdown(Breakdown.from_dict(d), title, wall_s=d["wall_s"]))
    return "\n".join(out)


def cmd_bench(args) -> int:
    from .results import markdown_table, write_all

    cfg = args.bench
    t0 = time.perf_counter()
    print(f"astra bench: {title_of(cfg)}", flush=True)
    rows = run_sweep(cfg, cfg.extra["worlds"] if args.predict else ())
    stem = stem_of(args)
    if args.predict:
        from .predict import report

        predicted = [r for r in rows if r["world"] != cfg.world]
        rows = [r for r in rows if r["world"] == cfg.world]
    meta = {"title": title_of(cfg), "link": cfg.link, "config": {k: v for k, v in vars(cfg).items()},
            "elapsed_s": time.perf_counter() - t0}
    paths = write_all(rows, meta, args.out_dir, stem)
    print(markdown_table(rows))
    if cfg.breakdown:
        print(breakdown_tables(rows))
    if args.predict:
        paths.update(report(cfg, rows, predicted, args.out_dir, stem + "-predict"))
    print(f"done in {time.perf_counter() - t0:.0f}s; link: {cfg.link}; wrote " + ", ".join(paths.values()))
    return 0


__all__ = ["BenchConfig", "DESCRIPTION", "add_bench_arguments", "check_bench_args", "cmd_bench", "run_sweep"]
