"""One-command GPU validation of astra (the checklist: shared/GPU-CHECKLIST.md; how to run it: bench/gpu/README.md).

    python bench/gpu/validate.py --out DIR             # on a CUDA machine (bench/gpu/run.sh calls it)
    python bench/gpu/validate.py --out DIR --smoke     # every step on the CPU, tiny sizes, Triton interpreted
    python bench/gpu/validate.py --report --out DIR --junit A.xml B.xml --steps-file F   # merge the test runs, print

Steps, each under its own time budget (:data:`BUDGET_S`; a step that fails or runs out of time does not stop the
next one):

* ``env``: device, versions, settings.
* ``ceilings``: the two roofline numbers measured here: a device-to-device copy (bytes read + written) and large
  cuBLAS GEMMs (fp32 with tf32 off, tf32, bf16), random data.
* ``correctness``: ``astra.simulate`` on the device (Triton kernels) against the same model in float64 on the CPU,
  GPT-2-small shape and a Llama shape, T = 4096, G in {1, 32} (K = 1024, a short ``astra.calibrate``), fp16 / bf16 /
  fp32, and full precision (``codebooks=None``). With codebooks a code can flip on a near tie: every
  ``astra_kernels.vq_encode`` call is tapped, the fraction of codes that differ from the float64 run is reported,
  and where any differ the float64 run is repeated with the device's codes forced (``rel_forced``: the kernels'
  numerical error alone, no flip cascading through the layers).
* ``speed``: VQ encode vs ``torch.cdist`` + argmin and vs a cuBLAS GEMM + argmin (fraction of the GEMM roofline);
  mixed attention vs ``F.scaled_dot_product_attention`` (flash backend) on the concatenated dequantized K/V
  (TFLOP/s, fraction of SDPA's); device pack / unpack vs a device-to-device copy. CUDA events after warm-up,
  median, random data, inputs rotated.
* ``aot``: registers / spills / shared memory of the kernels that ran in this process (Triton's in-memory JIT
  cache; registers and local memory as the driver reports them) beside ``python -m astra_kernels.aot --arch 90``.
* ``nccl``: two ranks of ``astra.launch(backend="gloo")`` on CUDA tensors (one GPU can not host two NCCL ranks):
  ``astra.parallelize`` against ``astra.simulate``; what stays unproven is recorded.

Records are appended to ``DIR/results.json`` after every step; ``DIR/summary.md`` is rewritten with them.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------------------------------
# budgets (seconds). run.sh: TOTAL_S 360 = BUILD <= 90 + GPU tests 90 + this script's VALIDATE_S 190
# (= sum(BUDGET_S) 180 + 10 start-up) + the rest of the suite (what is left) + the report 15.
# A step stops starting new cases once its budget is spent; SIGALRM ends it at HARD_FACTOR x its budget. With
# --deadline-s (run.sh passes its limit) a step also leaves half of the later steps' budgets to them.
# --budget-pct scales every budget (one longer run: run.sh's BUDGET_PCT).
# --------------------------------------------------------------------------------------------------
BUDGET_S = {"env": 5, "ceilings": 12, "correctness": 77, "speed": 40, "aot": 16, "nccl": 30}
HARD_FACTOR = 1.5
#: smoke runs on 2 shared CPU cores with Triton interpreted: looser budgets (the point is to run every path)
SMOKE_BUDGET_S = {"env": 20, "ceilings": 30, "correctness": 200, "speed": 200, "aot": 100, "nccl": 100}
STEPS = tuple(BUDGET_S)

#: the models of the correctness and nccl steps (random init; accuracy of the kernels, never of the model)
MODELS = {
    # GPT-2 small: 12 layers, 768 wide, 12 heads of 64
    "gpt2": dict(family="gpt2", layers=12, hidden=768, heads=12, kv_heads=12, mlp=3072, vocab=50257),
    # Llama-2-7B layer shape with Llama-3's GQA (32 query heads, 8 KV heads of 128, MLP 11008), only 2 layers so
    # that the CPU float64 reference takes seconds (layer 0 is computed by every rank, layer 1 is exchanged)
    "llama": dict(family="llama", layers=2, hidden=4096, heads=32, kv_heads=8, mlp=11008, vocab=32000),
}
SMOKE_MODELS = {
    "gpt2": dict(family="gpt2", layers=3, hidden=64, heads=4, kv_heads=4, mlp=128, vocab=97),
    "llama": dict(family="llama", layers=2, hidden=64, heads=4, kv_heads=2, mlp=128, vocab=97),
}
FULL = dict(
    corr_models=("gpt2", "llama"), corr_T=4096, corr_world=4, corr_groups=(32, 1), K=1024, calib_iters=4,
    corr_dtypes=("bf16", "fp16", "fp32"),
    # (tokens, D, G): GPT-2 / Llama hidden sizes, one group and 32 groups
    vq_shapes=[(n, d, g) for n in (1024, 4096) for d in (768, 4096) for g in (1, 32)],
    # (label, Hq, Hkv, Dh) x total T; the timed rank holds T / attn_world queries, the others' T - T/world keys
    attn_heads=[("gpt2", 12, 12, 64), ("llama", 32, 8, 128)], attn_T=(1024, 4096), attn_world=4, attn_dtype="bf16",
    codec_shapes=[(1024, 1), (4096, 32), (65536, 32)], codec_bits=10,
    copy_mib=1024, gemm_n=8192, bench_s=0.12,
    nccl_model="gpt2", nccl_layers=3, nccl_T=1024, nccl_dtype="bf16", nccl_groups=(None, 32, 1),
)
SMOKE = dict(
    corr_models=("gpt2", "llama"), corr_T=64, corr_world=4, corr_groups=(32, 1), K=16, calib_iters=2,
    corr_dtypes=("bf16", "fp16", "fp32"),
    vq_shapes=[(64, 64, 1), (64, 64, 32)],
    attn_heads=[("gpt2", 2, 2, 16), ("llama", 4, 2, 16)], attn_T=(64,), attn_world=4, attn_dtype="fp16",
    codec_shapes=[(64, 1), (64, 32)], codec_bits=10,
    copy_mib=8, gemm_n=256, bench_s=0.02,
    nccl_model="gpt2", nccl_layers=3, nccl_T=32, nccl_dtype="fp32", nccl_groups=(None, 32, 1),
)
#: ||out - ref|| / ||ref|| expected at most (the checklist: fp32/tf32 under 1e-3, bf16 operands 1e-3 to 1e-2)
REL_BOUND = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 1e-2, "float64": 1e-9}
NOT_PROVEN = ("NCCL itself (ncclAllGather / ncclBroadcast on device buffers, TORCH_NCCL_BLOCKING_WAIT timeouts, "
              "PeerError from a dead NCCL peer), two GPUs (P2P / NVLink copies, one device per rank, streams "
              "overlapping compute with a real transfer), and link bandwidth between machines")


class StepTimeout(Exception):
    """Raised by SIGALRM when a step outruns HARD_FACTOR x its budget."""


def on_alarm(signum, frame):
    raise StepTimeout("hard time limit of the step reached")


# --------------------------------------------------------------------------------------------------
# context: configuration, deadline, results
# --------------------------------------------------------------------------------------------------
class Ctx:
    def __init__(self, out: Path, smoke: bool, end: float = math.inf, scale: float = 1.0):
        import torch

        self.out, self.smoke = out, smoke
        self.cfg = SMOKE if smoke else FULL
        self.models = SMOKE_MODELS if smoke else MODELS
        self.budget = {k: v * scale for k, v in (SMOKE_BUDGET_S if smoke else BUDGET_S).items()}
        self.end = end          # time.monotonic() by which every step must be done (inf: none)
        self.device = "cpu" if smoke else "cuda"
        #: astra_kernels backend of the speed step: Triton (interpreted on CPU tensors in smoke runs)
        self.backend = "triton" if smoke else "auto"
        self.cuda = self.device == "cuda" and torch.cuda.is_available()
        self.deadline = math.inf
        self.step = ""
        self.records: list = []
        self.steps: list = []
        self.ceil: dict = {}
        self.meta = dict(command=" ".join([Path(sys.executable).name] + sys.argv), smoke=smoke,
                         date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        with contextlib.suppress(Exception):     # step env records it too; a failure here is that step's to report
            self.meta.update(env_info())

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, case: str, **fields) -> dict:
        rec = dict(step=self.step, case=case, **fields)
        self.records.append(rec)
        print(f"  [{self.step}] {case}: " + ", ".join(f"{k}={fmt(v)}" for k, v in fields.items()), flush=True)
        return rec

    def skip(self, case: str, why: str = "budget spent") -> None:
        self.add(case, status="skipped", note=why)

    def guarded(self, case: str, fn, *args) -> None:
        """``fn(*args)``; an error other than the step's timeout is recorded under ``case`` and the step goes on."""
        try:
            fn(*args)
        except StepTimeout:
            raise
        except Exception as e:  # the next case still runs
            traceback.print_exc()
            self.add(case, status="error", note=f"{type(e).__name__}: {e}"[:300])

    def save(self) -> None:
        data = dict(meta=self.meta, steps=self.steps, records=self.records)
        (self.out / "results.json").write_text(json.dumps(data, indent=1, default=str))
        (self.out / "summary.md").write_text(markdown(data))


def fmt(v) -> str:
    if isinstance(v, float):
        if v != v or v in (math.inf, -math.inf):
            return str(v)
        return f"{v:.3g}" if (abs(v) < 1e-2 or abs(v) >= 1e4) and v != 0 else f"{v:.4g}"
    if isinstance(v, (list, tuple)) and len(v) > 8:
        return f"[{len(v)} items]"
    return str(v)


def step_budget(ctx: Ctx, name: str, later) -> float:
    """The step's budget, cut where the overall deadline needs it: half of the later steps' budgets stay theirs."""
    b = ctx.budget[name]
    if ctx.end < math.inf:
        b = min(b, max(3.0, ctx.end - time.monotonic() - 0.5 * sum(ctx.budget[s] for s in later)))
    return round(b, 1)


def run_step(ctx: Ctx, name: str, fn, later=()) -> None:
    budget = step_budget(ctx, name, later)
    ctx.step, ctx.deadline = name, time.monotonic() + budget
    print(f"== step {name} (budget {budget} s)", flush=True)
    t0, status, err = time.monotonic(), "ok", ""
    old = signal.signal(signal.SIGALRM, on_alarm)
    hard = min(budget * HARD_FACTOR, max(budget, ctx.end - time.monotonic() - 1))
    signal.alarm(int(hard) + 1)
    try:
        fn(ctx)
    except BaseException as e:  # a failing step is a result; KeyboardInterrupt (run.sh's timeout) too
        status = "timeout" if isinstance(e, (StepTimeout, KeyboardInterrupt)) else "error"
        err = f"{type(e).__name__}: {e}"
        traceback.print_exc()
        if isinstance(e, KeyboardInterrupt):
            raise
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        ctx.steps.append(dict(step=name, status=status, seconds=round(time.monotonic() - t0, 1),
                              budget_s=budget, error=err[:500]))
        ctx.save()


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------
def sync(ctx: Ctx) -> None:
    import torch

    if ctx.cuda:
        torch.cuda.synchronize()


def bench(ctx: Ctx, fns) -> dict:
    """Median / min milliseconds of ``fns`` (a callable, or a list of callables over rotating input sets):
    CUDA events around every call after warm-up, else ``time.perf_counter`` (smoke)."""
    import torch

    fns = list(fns) if isinstance(fns, (list, tuple)) else [fns]
    for f in fns:           # warm-up: compilation, autotuning, allocator, caches
        f()
    sync(ctx)
    t0 = time.perf_counter()
    fns[0]()
    sync(ctx)
    est = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(200, max(5 if ctx.cuda else 3, ctx.cfg["bench_s"] / est)))
    if ctx.cuda:
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for i, (a, b) in enumerate(ev):
            a.record()
            fns[i % len(fns)]()
            b.record()
        torch.cuda.synchronize()
        ms = [a.elapsed_time(b) for a, b in ev]
    else:
        ms = []
        for i in range(reps):
            t = time.perf_counter()
            fns[i % len(fns)]()
            ms.append((time.perf_counter() - t) * 1e3)
    return dict(ms=statistics.median(ms), min_ms=min(ms), reps=reps)


def randn(ctx: Ctx, *shape, dtype=None, seed: int = 0):
    """Standard normal data drawn on the step's device with a seeded generator (never zeros)."""
    import torch

    g = torch.Generator(device=ctx.device).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=ctx.device).to(dtype or torch.float32)


# --------------------------------------------------------------------------------------------------
# step env and ceilings
# --------------------------------------------------------------------------------------------------
def env_info() -> dict:
    """Device, versions and settings (also the header of results.json and summary.md)."""
    import torch

    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available(), threads=torch.get_num_threads(),
                tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                triton_interpret=os.environ.get("TRITON_INTERPRET", ""))
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:
        info["triton"] = f"unavailable ({e})"
    import astra_kernels

    info["astra"] = astra_kernels.__version__
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, sm=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    mem_gib=round(p.total_memory / 2**30, 1), l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


def step_env(ctx: Ctx) -> None:
    info = env_info()
    ctx.meta.update(info)
    ctx.add("environment", **info)


def step_ceilings(ctx: Ctx) -> None:
    import torch

    n = ctx.cfg["copy_mib"] * 2**20 // 4
    src, dst = randn(ctx, n), torch.empty(n, device=ctx.device)
    t = bench(ctx, functools.partial(dst.copy_, src))
    ctx.ceil["copy_GBps"] = 2 * src.nbytes / t["ms"] / 1e6
    ctx.add("d2d copy", MiB=ctx.cfg["copy_mib"], ms=t["ms"], GBps=ctx.ceil["copy_GBps"])
    src = dst = None
    N = ctx.cfg["gemm_n"]
    for name, dt, tf32 in (("bf16", torch.bfloat16, False), ("fp32", torch.float32, False),
                           ("tf32", torch.float32, True)):
        if ctx.left() < 2:
            ctx.skip(f"gemm {name}")
            continue
        a, b = randn(ctx, N, N, dtype=dt, seed=1), randn(ctx, N, N, dtype=dt, seed=2)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            t = bench(ctx, lambda a=a, b=b: a @ b)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        ctx.ceil[f"gemm_{name}_tflops"] = 2 * N**3 / t["ms"] / 1e9
        ctx.add(f"gemm {name} {N}^3", ms=t["ms"], TFLOPs=ctx.ceil[f"gemm_{name}_tflops"])


# --------------------------------------------------------------------------------------------------
# step correctness
# --------------------------------------------------------------------------------------------------
def dtype_of(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "float64": torch.float64}[name]


def make_model(spec: dict, tokens: int, seed: int = 0):
    """A random-init base model (``GPT2Model`` / ``LlamaModel``) of ``spec``, float32, CPU, eval mode."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    if spec["family"] == "gpt2":
        cfg = tf.GPT2Config(n_layer=spec["layers"], n_embd=spec["hidden"], n_head=spec["heads"], n_inner=spec["mlp"],
                            n_positions=max(1024, tokens), vocab_size=spec["vocab"],
                            bos_token_id=spec["vocab"] - 1, eos_token_id=spec["vocab"] - 1)
        return tf.GPT2Model(cfg).eval()
    cfg = tf.LlamaConfig(num_hidden_layers=spec["layers"], hidden_size=spec["hidden"],
                         num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
                         intermediate_size=spec["mlp"], vocab_size=spec["vocab"],
                         max_position_embeddings=max(2048, tokens))
    return tf.LlamaModel(cfg).eval()


def make_inputs(spec: dict, tokens: int, device, seed: int = 1) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, spec["vocab"], (1, tokens), generator=g).to(device)}


class CodeTap:
    """Taps ``astra_kernels.vq_encode`` (the runtime calls it as ``ak.vq_encode``): records every call's codes; with
    ``replay`` (another run's recorded codes) it returns those instead, so that this run follows the same discrete
    choices, while still recording its own."""

    def __init__(self, replay=None):
        self.own: list = []
        self.replay = replay
        self.orig = None

    def __enter__(self):
        import astra_kernels as ak

        self.orig = ak.vq_encode
        ak.vq_encode = self.call
        return self

    def __exit__(self, *exc):
        import astra_kernels as ak

        ak.vq_encode = self.orig

    def call(self, x, codebook, **kw):
        codes = self.orig(x, codebook, **kw)
        self.own.append(codes.detach().cpu())
        if self.replay is None:
            return codes
        return self.replay[len(self.own) - 1].to(device=codes.device, dtype=codes.dtype)


def simulate_once(ctx: Ctx, model, inputs, cb, replay=None):
    """(last_hidden_state as float64 CPU, the codes of every encode call, seconds) of one ``astra.simulate``."""
    import torch

    import astra

    t0 = time.perf_counter()
    with CodeTap(replay) as tap, torch.no_grad():
        out = astra.simulate(model, inputs, world_size=ctx.cfg["corr_world"], codebooks=cb).last_hidden_state
    sync(ctx)
    return out.detach().to("cpu", torch.float64), tap.own, time.perf_counter() - t0


def rel_err(out, ref) -> float:
    import torch

    if not torch.isfinite(out).all():
        return math.nan
    return float((out - ref).norm() / ref.norm())


def code_diff(a: list, b: list) -> dict:
    """Fraction of codes that differ between two runs' encode calls, and the first call (layer x sender) with any."""
    if len(a) != len(b):
        return dict(flip_frac=math.nan, first_flip_call=None, calls=f"{len(a)} vs {len(b)}")
    ne = [int((x != y).sum()) for x, y in zip(a, b)]
    total = sum(x.numel() for x in a)
    first = next((i for i, n in enumerate(ne) if n), None)
    return dict(flip_frac=sum(ne) / max(total, 1), first_flip_call=first, calls=len(a),
                flips_by_call=[round(n / max(x.numel(), 1), 5) for n, x in zip(ne, a)])


def step_correctness(ctx: Ctx) -> None:
    for name in ctx.cfg["corr_models"]:
        if ctx.left() < 3:
            ctx.skip(name)
            continue
        ctx.guarded(name, correctness_model, ctx, name)


def correctness_model(ctx: Ctx, name: str) -> None:
    import torch

    import astra

    spec, T = ctx.models[name], ctx.cfg["corr_T"]
    master = make_model(spec, T)
    ref_model = copy.deepcopy(master).to(torch.float64)
    dev = {dt: copy.deepcopy(master).to(ctx.device, dtype_of(dt)) for dt in ctx.cfg["corr_dtypes"]}
    x_cpu, x_dev = make_inputs(spec, T, "cpu"), make_inputs(spec, T, ctx.device)
    case = f"{name} L{spec['layers']} D{spec['hidden']} T{T} N{ctx.cfg['corr_world']}"
    ref, _, ref_s = simulate_once(ctx, ref_model, x_cpu, None)
    ctx.add(f"{case} float64 CPU reference", seconds=ref_s)
    for dt, m in dev.items():
        out, _, s = simulate_once(ctx, m, x_dev, None)
        r = rel_err(out, ref)
        ctx.add(f"{case} full precision {dt}", rel=r, bound=REL_BOUND[dt], ok=bool(r <= REL_BOUND[dt]), seconds=s)
    fp32 = dev["fp32"] if "fp32" in dev else copy.deepcopy(master).to(ctx.device)
    calib = [make_inputs(spec, T, ctx.device, seed=2)]
    for G in ctx.cfg["corr_groups"]:
        if ctx.left() < 2 * ref_s + 2:
            ctx.skip(f"{case} G{G}")
            continue
        t0 = time.perf_counter()
        cb = astra.calibrate(fp32, calib, groups=G, codebook_size=ctx.cfg["K"], iters=ctx.cfg["calib_iters"])
        ctx.add(f"{case} G{G} calibrate", seconds=time.perf_counter() - t0, transformed=cb.transformed)
        correctness_codebooks(ctx, f"{case} G{G} K{ctx.cfg['K']}", ref_model, dev, x_cpu, x_dev, cb, ref_s)


def correctness_codebooks(ctx: Ctx, case: str, ref_model, dev: dict, x_cpu, x_dev, cb, ref_s: float) -> None:
    """One codebook set: the free float64 run, every device dtype, then the forced float64 runs while time lasts."""
    ref, ref_codes, s = simulate_once(ctx, ref_model, x_cpu, cb)
    ctx.add(f"{case} float64 CPU reference", seconds=s, calls=len(ref_codes))
    runs = {}
    for dt, m in dev.items():
        out, codes, s = simulate_once(ctx, m, x_dev, cb)
        runs[dt] = (out, codes, code_diff(codes, ref_codes), s)
    for dt, (out, codes, diff, s) in runs.items():
        r_free = rel_err(out, ref)
        r_forced, note = (r_free, "no code differs") if diff["flip_frac"] == 0 else (None, "")
        if math.isnan(diff["flip_frac"]):
            note = f"encode calls differ ({diff['calls']}): no forced rerun"
        elif r_forced is None and ctx.left() > 1.3 * ref_s + 1:
            forced, _, _ = simulate_once(ctx, ref_model, x_cpu, cb, replay=codes)
            r_forced, note = rel_err(out, forced), "float64 rerun with the device's codes"
        elif r_forced is None:
            note = "forced float64 rerun skipped: budget"
        ok = None if r_forced is None else bool(r_forced <= REL_BOUND[dt])
        ctx.add(f"{case} {dt}", rel_free=r_free, rel_forced=r_forced, bound=REL_BOUND[dt], ok=ok,
                flip_frac=diff["flip_frac"], first_flip_call=diff["first_flip_call"],
                flips_by_call=diff.get("flips_by_call"), seconds=s, note=note)


# --------------------------------------------------------------------------------------------------
# step speed
# --------------------------------------------------------------------------------------------------
def step_speed(ctx: Ctx) -> None:
    for name, fn in (("vq", speed_vq), ("attention", speed_attention), ("codec", speed_codec)):
        share = {"vq": 0.4, "attention": 0.4, "codec": 0.2}[name]
        end = time.monotonic() + share * max(ctx.left(), 0)
        ctx.guarded(name, fn, ctx, end)


def speed_vq(ctx: Ctx, end: float) -> None:
    import torch

    import astra_kernels as ak
    from astra_kernels.triton import vq_kernels

    K = ctx.cfg["K"]
    for N, D, G in ctx.cfg["vq_shapes"]:
        case = f"vq_encode N{N} D{D} G{G} K{K} fp32"
        if time.monotonic() > end:
            ctx.skip(case)
            continue
        xs = [randn(ctx, N, D, seed=s) for s in range(3)]
        C = randn(ctx, G, K, D // G, seed=7)
        mu = C.mean(dim=1, keepdim=True)
        cb = (C - mu).contiguous()
        cn = (cb * cb).sum(-1).contiguous()
        xk = [(x.view(N, G, -1) - mu.transpose(0, 1)).reshape(N, D).contiguous() for x in xs]
        xg = [x.view(N, G, D // G).transpose(0, 1) for x in xs]
        Ct, Cn = C.transpose(1, 2), (C * C).sum(-1)[:, None, :]
        t_api = bench(ctx, [functools.partial(ak.vq_encode, x, C, backend=ctx.backend) for x in xs])
        t_kernel = bench(ctx, [functools.partial(vq_kernels.vq_encode_triton, x, cb, cn) for x in xk])
        t_cdist = bench(ctx, [functools.partial(cdist_argmin, x, C) for x in xg])
        t_gemm = bench(ctx, [functools.partial(gemm_argmin, x, Ct, Cn) for x in xg])
        ref = torch.baddbmm(Cn.double(), xg[0].double(), Ct.double(), alpha=-2).argmin(-1).transpose(0, 1)
        agree = float((ak.vq_encode(xs[0], C, backend=ctx.backend) == ref).float().mean())
        flops, nbytes = 2 * N * K * D, 4 * (N * D + K * D + N * G)
        rate = ctx.ceil.get("gemm_fp32_tflops")
        roof_ms = None if rate is None else max(flops / rate / 1e9, nbytes / ctx.ceil["copy_GBps"] / 1e6)
        ctx.add(case, api_ms=t_api["ms"], kernel_ms=t_kernel["ms"], cdist_ms=t_cdist["ms"], gemm_ms=t_gemm["ms"],
                vs_gemm=t_gemm["ms"] / t_kernel["ms"], vs_cdist=t_cdist["ms"] / t_kernel["ms"],
                kernel_TFLOPs=flops / t_kernel["ms"] / 1e9,
                roofline_frac=None if roof_ms is None else roof_ms / t_kernel["ms"], codes_vs_f64=agree)


def cdist_argmin(xg, C):
    """The peer ``torch.cdist`` + argmin: codes ``[G, N]`` of ``xg [G, N, DG]`` under ``C [G, K, DG]``."""
    import torch

    return torch.cdist(xg, C).argmin(-1)


def gemm_argmin(xg, Ct, Cn):
    """The peer cuBLAS GEMM + argmin: ``argmin(||c||^2 - 2 x.c)`` (``||x||^2`` does not move it), ``Ct [G, DG, K]``,
    ``Cn [G, 1, K]``."""
    import torch

    return torch.baddbmm(Cn, xg, Ct, alpha=-2).argmin(-1)


def attention_inputs(ctx: Ctx, Hq: int, Hkv: int, Dh: int, T: int, seed: int) -> dict:
    import torch

    dt = dtype_of(ctx.cfg["attn_dtype"])
    Tl = T // ctx.cfg["attn_world"]
    Tr = T - Tl
    d = dict(q=randn(ctx, 1, Hq, Tl, Dh, dtype=dt, seed=seed), k=randn(ctx, 1, Hkv, Tl, Dh, dtype=dt, seed=seed + 1),
             v=randn(ctx, 1, Hkv, Tl, Dh, dtype=dt, seed=seed + 2))
    d["q_pos"] = torch.arange(Tr, T, device=ctx.device)
    d["kv_pos"] = torch.arange(0, Tr, device=ctx.device)
    d["Tl"], d["Tr"] = Tl, Tr
    return d


def sdpa_peer(ctx: Ctx, q, K, V, causal: bool = True):
    """``F.scaled_dot_product_attention`` with the flash backend (GPU) and a lower-right causal mask (the last
    ``Tl`` of ``T`` positions query all ``T`` keys; ``causal=False``: no mask, every key); returns (callable,
    backend asked for)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    mask = causal_lower_right(q.shape[2], K.shape[2]) if causal else None
    gqa = q.shape[1] != K.shape[1]
    if gqa:   # expanded outside the timing: the peer reads every head's K/V (compute bound at these sizes)
        rep = q.shape[1] // K.shape[1]
        K, V = K.repeat_interleave(rep, dim=1), V.repeat_interleave(rep, dim=1)
    backends = [SDPBackend.FLASH_ATTENTION] if ctx.cuda else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]

    def call(backends=backends):
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, K, V, attn_mask=mask)

    try:
        call()
        return call, "flash" + (" (K/V expanded for GQA)" if gqa else "")
    except RuntimeError as e:
        print(f"  flash SDPA refused ({str(e)[:200]}); timing SDPA's own choice", flush=True)
        return (lambda: F.scaled_dot_product_attention(q, K, V, attn_mask=mask)), "default (flash refused)"


def speed_attention(ctx: Ctx, end: float) -> None:
    import torch

    import astra_kernels as ak

    for label, Hq, Hkv, Dh in ctx.cfg["attn_heads"]:
        for T in ctx.cfg["attn_T"]:
            for mode in ("per_token", "table") if label == "gpt2" else ("per_token",):
                case = f"attention {mode} {label} H{Hq}/{Hkv}x{Dh} T{T} causal {ctx.cfg['attn_dtype']}"
                if time.monotonic() > end:
                    ctx.skip(case)
                    continue
                a = attention_inputs(ctx, Hq, Hkv, Dh, T, seed=T + Hq)
                kw = dict(q_pos=a["q_pos"], kv_pos=a["kv_pos"], causal=True, validate=False, backend=ctx.backend)
                if mode == "per_token":
                    kh = randn(ctx, 1, Hkv, a["Tr"], Dh, dtype=a["q"].dtype, seed=5)
                    vh = randn(ctx, 1, Hkv, a["Tr"], Dh, dtype=a["q"].dtype, seed=6)
                    own = functools.partial(ak.attention_per_token, a["q"], a["k"], a["v"], kh, vh, **kw)
                else:
                    K = ctx.cfg["K"]
                    kt, vt = (randn(ctx, K, Hkv, Dh, dtype=a["q"].dtype, seed=s) for s in (8, 9))
                    g = torch.Generator().manual_seed(3)
                    codes = torch.randint(0, K, (1, a["Tr"]), generator=g).to(ctx.device)
                    kh, vh = (t[codes[0]].permute(1, 0, 2).unsqueeze(0) for t in (kt, vt))
                    own = functools.partial(ak.attention_table, a["q"], a["k"], a["v"], codes, kt, vt, **kw)
                attention_case(ctx, case, a, kh, vh, own)


def attention_case(ctx: Ctx, case: str, a: dict, kh, vh, own) -> None:
    import torch

    K, V = torch.cat([kh, a["k"]], dim=2), torch.cat([vh, a["v"]], dim=2)
    peer, backend = sdpa_peer(ctx, a["q"], K, V)
    err = rel_err(own().double().cpu(), peer().double().cpu())
    t_own, t_peer = bench(ctx, own), bench(ctx, peer)
    # the same keys without a mask: flash for certain (a lower-right mask that fell back to the math path shows as
    # a much lower TFLOP/s than this)
    t_nomask = bench(ctx, sdpa_peer(ctx, a["q"], K, V, causal=False)[0])
    Hq, Dh, Tl, Tr = a["q"].shape[1], a["q"].shape[3], a["Tl"], a["Tr"]
    flops = 4 * Hq * Dh * (Tl * Tr + Tl * (Tl + 1) / 2)     # QK^T and PV over the visible keys
    fa = flash_attn_ms(ctx, a["q"], K, V)
    ctx.add(case, astra_ms=t_own["ms"], sdpa_ms=t_peer["ms"], astra_TFLOPs=flops / t_own["ms"] / 1e9,
            sdpa_TFLOPs=flops / t_peer["ms"] / 1e9, frac_of_sdpa=t_peer["ms"] / t_own["ms"], sdpa_backend=backend,
            sdpa_nomask_TFLOPs=4 * Hq * Dh * Tl * (Tl + Tr) / t_nomask["ms"] / 1e9, flash_attn_ms=fa,
            rel_vs_sdpa=err)


def flash_attn_ms(ctx: Ctx, q, K, V):
    """FlashAttention's own package where importable (``flash_attn_func``, bottom-right causal), else None."""
    try:
        from flash_attn import flash_attn_func
    except Exception:
        return None
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, K, V))
    return bench(ctx, lambda: flash_attn_func(qt, kt, vt, causal=True))["ms"]


def speed_codec(ctx: Ctx, end: float) -> None:
    import torch

    import astra_kernels as ak

    bits = ctx.cfg["codec_bits"]
    for T, G in ctx.cfg["codec_shapes"]:
        case = f"codec T{T} G{G} {bits} bits"
        if time.monotonic() > end:
            ctx.skip(case)
            continue
        g = torch.Generator().manual_seed(T + G)
        codes = [torch.randint(0, 2**bits, (1, T, G), generator=g, dtype=torch.int32).to(ctx.device)
                 for _ in range(3)]
        frames = [ak.pack_codes(c, bits, backend=ctx.backend) for c in codes]
        back = ak.unpack_codes(frames[0], backend=ctx.backend)
        ok = bool(torch.equal(back.cpu(), codes[0].cpu())) and frames[0].device.type == codes[0].device.type
        dst = torch.empty_like(codes[0])
        t_pack = bench(ctx, [functools.partial(ak.pack_codes, c, bits, backend=ctx.backend) for c in codes])
        t_unpack = bench(ctx, [functools.partial(ak.unpack_codes, f, backend=ctx.backend) for f in frames])
        t_copy = bench(ctx, [functools.partial(dst.copy_, c) for c in codes])
        io = codes[0].nbytes + frames[0].numel()       # int32 codes read + frame written (and the reverse)
        ctx.add(case, round_trip_ok=ok, frame_bytes=frames[0].numel(), pack_ms=t_pack["ms"], unpack_ms=t_unpack["ms"],
                copy_ms=t_copy["ms"], pack_GBps=io / t_pack["ms"] / 1e6, unpack_GBps=io / t_unpack["ms"] / 1e6,
                copy_GBps=2 * codes[0].nbytes / t_copy["ms"] / 1e6,
                pack_Gcodes_s=codes[0].numel() / t_pack["ms"] / 1e6)


# --------------------------------------------------------------------------------------------------
# step aot
# --------------------------------------------------------------------------------------------------
def kernel_functions():
    """(module, attribute, JITFunction) of every kernel module of astra_kernels.triton, each function once."""
    import importlib
    import pkgutil

    from astra_kernels import triton as kpkg

    seen, out = set(), []
    for info in sorted(pkgutil.iter_modules(kpkg.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{kpkg.__name__}.{info.name}")
        for attr, obj in sorted(vars(mod).items()):
            fn = obj
            while fn is not None and not hasattr(fn, "device_caches") and hasattr(fn, "fn"):
                fn = fn.fn      # Autotuner / Heuristics wrap the JITFunction
            if hasattr(fn, "device_caches") and id(fn) not in seen:
                seen.add(id(fn))
                out.append((info.name, attr, fn))
    return out


def jit_kernels() -> list:
    """One row per kernel compiled (and launched) in this process: Triton's in-memory JIT cache, with the
    registers and local memory the driver reported when the binary was loaded (``n_regs``, ``n_spills``)."""
    rows = []
    for module, attr, fn in kernel_functions():
        for device, entry in list(fn.device_caches.items()):
            cache = entry[0] if isinstance(entry, tuple) else entry
            for key, k in list(cache.items()):
                md = getattr(k, "metadata", None)
                rows.append(dict(kernel=getattr(k, "name", attr), module=module, device=str(device),
                                 warps=getattr(md, "num_warps", None), stages=getattr(md, "num_stages", None),
                                 smem=getattr(md, "shared", None), regs=getattr(k, "n_regs", None),
                                 spills=getattr(k, "n_spills", None), key=str(key)[:200]))
    return rows


def aot_report(ctx: Ctx) -> list:
    """``python -m astra_kernels.aot --arch 90 --json`` (compiled here, no GPU needed) as a list of rows."""
    cmd = [sys.executable, "-m", "astra_kernels.aot", "--arch", "90", "--json", "--jobs", str(min(8, os.cpu_count()))]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(5.0, ctx.left() - 2))
    if not r.stdout.strip():
        raise RuntimeError(f"aot printed nothing (rc {r.returncode}): {r.stderr[-500:]}")
    return json.loads(r.stdout)


def step_aot(ctx: Ctx) -> None:
    jit = jit_kernels()
    aot = aot_report(ctx)
    source = "Triton's JIT cache of this process"
    if not jit and ctx.smoke:
        # the interpreter compiles nothing: stand-in rows from the AOT report exercise the comparison below
        jit = [dict(kernel=r["kernel"], module=r["module"], warps=r["num_warps"], stages=r["num_stages"],
                    smem=r["smem"], regs=r["regs"], spills=0, key="smoke stand-in") for r in aot if r.get("ok")]
        source = "smoke: AOT rows standing in for the JIT cache (interpreter)"
    ctx.add("sources", jit_kernels=len(jit), aot_specs=len(aot), source=source)
    groups: dict = {}
    for side, rows in (("aot", [dict(kernel=r["kernel"], warps=r["num_warps"], stages=r["num_stages"], regs=r["regs"],
                                     spills=r["spills"], smem=r["smem"]) for r in aot]), ("real", jit)):
        for r in rows:
            g = groups.setdefault((r["kernel"], r["warps"], r["stages"]), {"aot": [], "real": []})
            g[side].append(r)
    for (kernel, warps, stages), g in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if not g["real"]:
            continue        # an AOT spec whose configuration did not run here
        ctx.add(f"{kernel} warps{warps} stages{stages}", **compare_resources(g["aot"], g["real"]))


def compare_resources(aot: list, real: list) -> dict:
    def span(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return None if not vals else (f"{min(vals)}" if min(vals) == max(vals) else f"{min(vals)}-{max(vals)}")

    out = dict(runs=len(real), aot_regs=span(aot, "regs"), real_regs=span(real, "regs"),
               aot_spills_B=span(aot, "spills"), real_spill_words=span(real, "spills"), aot_smem=span(aot, "smem"),
               real_smem=span(real, "smem"))
    notes = []
    if not aot:
        notes.append("no AOT spec at this warps/stages")
    else:
        top = max((r["regs"] or 0) for r in aot)
        if any((r.get("regs") or 0) > top for r in real):
            notes.append(f"regs above the AOT maximum {top}")
        if any((r.get("spills") or 0) > 0 for r in real) and not any((r["spills"] or 0) > 0 for r in aot):
            notes.append("spills on the device, none in the AOT report")
    out["differs"] = bool(notes)
    out["note"] = "; ".join(notes) or "within the AOT figures"
    return out


# --------------------------------------------------------------------------------------------------
# step nccl (gloo on CUDA tensors)
# --------------------------------------------------------------------------------------------------
def nccl_rank(rank: int, spec: dict, T: int, dtype_name: str, device: str, groups, K: int) -> dict:
    """One rank of the gloo check: astra.parallelize's gathered output against astra.simulate, per codebook set."""
    import torch

    import astra

    model = make_model(spec, T).to(device, dtype_of(dtype_name))
    inputs = make_inputs(spec, T, device)
    out = {}
    for G in groups:
        cb = None if G is None else astra.Codebooks.random(model, groups=G, codebook_size=K, seed=G)
        with torch.no_grad():
            sim = astra.simulate(model, inputs, world_size=2, codebooks=cb).last_hidden_state
        pm = astra.parallelize(model, cb, timeout=60)
        try:
            full = pm.gather(pm(**inputs, output="local"))["last_hidden_state"]
            sent = sum(s.bytes_sent for s in pm.stats)
        finally:
            pm.unpatch()
        d = (full.double() - sim.double())
        out[str(G)] = dict(max_abs=float(d.abs().max()), rel=float(d.norm() / sim.double().norm()),
                           bytes_sent=int(sent), device=str(full.device), tables=G == 1)
    return out


def step_nccl(ctx: Ctx) -> None:
    import astra

    c = ctx.cfg
    spec = dict(ctx.models[c["nccl_model"]], layers=c["nccl_layers"])
    results = astra.launch(nccl_rank, 2, spec, c["nccl_T"], c["nccl_dtype"], ctx.device, c["nccl_groups"], c["K"],
                           backend="gloo", timeout=60, join_timeout=max(10.0, ctx.left() - 2))
    for rank, res in enumerate(results):
        for G, r in res.items():
            cb = "full precision" if G == "None" else f"G{G} K{c['K']} random codebooks"
            ctx.add(f"rank {rank} {c['nccl_model']} L{spec['layers']} T{c['nccl_T']} {c['nccl_dtype']} {cb}",
                    **r, equal_to_simulate=r["max_abs"] == 0.0)
    ctx.add("not proven here", note=NOT_PROVEN)


# --------------------------------------------------------------------------------------------------
# report: merge the pytest runs, write summary.md, print the table
# --------------------------------------------------------------------------------------------------
def junit_counts(path: Path) -> dict:
    """Counts and failing test names of one pytest junit XML (None where the file is missing)."""
    if not path.exists():
        return dict(file=path.name, status="no junit xml (killed before the end?)")
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    c = dict(file=path.name, tests=0, failed=0, errors=0, skipped=0, seconds=0.0, failures=[], skip_reasons={})
    for s in suites:
        c["tests"] += int(s.get("tests", 0))
        c["failed"] += int(s.get("failures", 0))
        c["errors"] += int(s.get("errors", 0))
        c["skipped"] += int(s.get("skipped", 0))
        c["seconds"] += float(s.get("time", 0))
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                c["failures"].append(f"{case.get('classname')}::{case.get('name')}")
            skip = case.find("skipped")
            if skip is not None:
                why = (skip.get("message") or "?")[:100]
                c["skip_reasons"][why] = c["skip_reasons"].get(why, 0) + 1
    c["passed"] = c["tests"] - c["failed"] - c["errors"] - c["skipped"]
    return c


def report(out: Path, junits, steps_file) -> None:
    path = out / "results.json"
    data = json.loads(path.read_text()) if path.exists() else dict(meta={}, steps=[], records=[])
    data["records"] = [r for r in data["records"] if r.get("step") != "tests"]
    for j in junits or []:
        data["records"].append(dict(step="tests", case=Path(j).stem, **junit_counts(Path(j))))
    if steps_file and Path(steps_file).exists():
        data["shell_steps"] = [dict(zip(("step", "rc", "seconds", "log"), line.split("\t")))
                               for line in Path(steps_file).read_text().splitlines() if line.strip()]
    path.write_text(json.dumps(data, indent=1, default=str))
    (out / "summary.md").write_text(markdown(data))
    print(text_table(data))


def headline(step: str, recs: list) -> str:
    ok = [r for r in recs if r.get("status") not in ("skipped", "error")]
    skipped = sum(r.get("status") == "skipped" for r in recs)
    errors = sum(r.get("status") == "error" for r in recs)
    tail = (f"; {skipped} skipped" if skipped else "") + (f"; {errors} errors" if errors else "")
    if step == "correctness":
        bad = [r for r in ok if r.get("ok") is False]
        return f"{sum('ok' in r for r in ok)} checks, {len(bad)} over bound" + tail
    if step == "aot":
        n, bad = sum("differs" in r for r in ok), sum(bool(r.get("differs")) for r in ok)
        return f"{n} configs compared, {bad} differ" + tail
    if step == "nccl":
        return (f"{sum('equal_to_simulate' in r for r in ok)} rank x case, "
                f"{sum(r.get('equal_to_simulate') is False for r in ok)} not bit-equal to simulate") + tail
    if step == "tests":
        return "; ".join(f"{r['case']}: {r.get('passed', '?')} passed, {r.get('failed', '?')} failed, "
                         f"{r.get('errors', '?')} errors, {r.get('skipped', '?')} skipped" for r in recs)
    return f"{len(ok)} records" + tail


#: the columns of the compact per-record lines printed last (what the caller of the device run sees)
KEY_FIELDS = {
    "ceilings": ("GBps", "TFLOPs"),
    "correctness": ("rel", "rel_free", "rel_forced", "flip_frac", "ok"),
    "speed": ("kernel_ms", "api_ms", "gemm_ms", "cdist_ms", "vs_gemm", "roofline_frac", "astra_ms", "sdpa_ms",
              "astra_TFLOPs", "frac_of_sdpa", "sdpa_nomask_TFLOPs", "rel_vs_sdpa", "pack_GBps", "unpack_GBps",
              "copy_GBps", "round_trip_ok"),
    "aot": ("aot_regs", "real_regs", "aot_spills_B", "real_spill_words", "note"),
    "nccl": ("max_abs", "rel", "bytes_sent"),
    "tests": ("failures",),
}


def text_table(data: dict) -> str:
    m = data["meta"]
    lines = ["", "=" * 100, f"GPU validation summary  {m.get('device', '?')}  torch {m.get('torch')}  "
             f"triton {m.get('triton')}  {m.get('date', '')}"]
    for s in data.get("shell_steps", []):
        lines.append(f"  shell {s.get('step', '?'):<12} rc={s.get('rc', '?'):<4} {s.get('seconds', '?'):>6} s  "
                     f"{s.get('log', '')}")
    by_step: dict = {}
    for r in data["records"]:
        by_step.setdefault(r["step"], []).append(r)
    for name in list(STEPS) + ["tests"]:
        recs = by_step.get(name, [])
        if not recs:
            continue
        lines.append(f"-- {name}")
        for r in recs:
            vals = {k: r[k] for k in KEY_FIELDS.get(name, ()) if r.get(k) is not None}
            if name == "tests":
                skips = sorted(r.get("skip_reasons", {}).items(), key=lambda kv: -kv[1])[:4]
                vals = {"failures": ", ".join(r.get("failures", [])[:15]) or "-",
                        "skipped": "; ".join(f"{n}x {why}" for why, n in skips) or "-"}
            if r.get("status") in ("skipped", "error"):
                vals = {"status": r["status"], "note": r.get("note", "")[:120]}
            if vals:
                lines.append(f"   {r['case'][:52]:<52} " + " ".join(f"{k}={fmt(v)}" for k, v in vals.items()))
    lines.append("-" * 100)
    lines.append(f"{'step':<12} {'status':<8} {'s':>6} {'budget':>6}  headline")
    for s in data["steps"]:
        err = f"  [{s['error'][:80]}]" if s["error"] else ""
        lines.append(f"{s['step']:<12} {s['status']:<8} {s['seconds']:>6} {s['budget_s']:>6}  "
                     f"{headline(s['step'], by_step.get(s['step'], []))}{err}")
    if by_step.get("tests"):
        lines.append(f"{'tests':<12} {'-':<8} {'':>6} {'':>6}  {headline('tests', by_step['tests'])}")
    return "\n".join(lines)


def markdown(data: dict) -> str:
    m = data["meta"]
    out = ["# astra GPU validation", "", f"- device: {m.get('device')} (sm {m.get('sm')}, {m.get('sms')} SMs)",
           f"- torch {m.get('torch')} (CUDA {m.get('cuda')}), triton {m.get('triton')}, astra {m.get('astra')}, "
           f"python {m.get('python')}", f"- command: `{m.get('command')}`", f"- date: {m.get('date')}", "",
           "| step | status | seconds | budget | error |", "|---|---|---|---|---|"]
    out += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['budget_s']} | {s['error'][:120]} |"
            for s in data["steps"]]
    for s in data.get("shell_steps", []):
        out.append(f"| shell: {s.get('step')} | rc {s.get('rc')} | {s.get('seconds')} | | {s.get('log')} |")
    by_step: dict = {}
    for r in data["records"]:
        by_step.setdefault(r["step"], []).append(r)
    for name, recs in by_step.items():
        cols = [k for k in dict.fromkeys(k for r in recs for k in r) if k not in ("step", "flips_by_call", "key")]
        out += ["", f"## {name}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in recs:
            out.append("| " + " | ".join(fmt(r.get(c, "")).replace("|", "/") for c in cols) + " |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for results.json and summary.md")
    p.add_argument("--smoke", action="store_true", help="every step on the CPU with tiny sizes (Triton interpreted)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--report", action="store_true", help="only merge --junit files into the results and print")
    p.add_argument("--junit", nargs="*", default=[], help="pytest junit XML files (with --report)")
    p.add_argument("--steps-file", default=None, help="run.sh's step log (step, rc, seconds, log; tab-separated)")
    p.add_argument("--deadline-s", type=float, default=None, help="finish every step within this many seconds")
    p.add_argument("--budget-pct", type=float, default=100.0, help="scale every step's budget (percent)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.report:
        report(out, a.junit, a.steps_file)
        return 0
    if a.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")      # before astra_kernels (and its kernels) is imported
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as the test suite runs the kernels
    sys.path[:0] = [str(ROOT), str(ROOT / "python")]
    import torch

    if a.smoke:
        torch.set_num_threads(1)
    end = math.inf if a.deadline_s is None else time.monotonic() + a.deadline_s
    ctx = Ctx(out, a.smoke, end, a.budget_pct / 100)
    fns = dict(env=step_env, ceilings=step_ceilings, correctness=step_correctness, speed=step_speed, aot=step_aot,
               nccl=step_nccl)
    names = [s for s in a.steps.split(",") if s in fns]
    for bad in set(a.steps.split(",")) - set(fns) - {""}:
        print(f"unknown step {bad!r}", file=sys.stderr)
    for i, name in enumerate(names):
        run_step(ctx, name, fns[name], names[i + 1:])
    print(text_table(dict(meta=ctx.meta, steps=ctx.steps, records=ctx.records)))
    return 0 if all(s["status"] == "ok" for s in ctx.steps) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
