"""Ahead-of-time compile report for every Triton kernel of the package (proof chain, step 2).

    python -m astra_kernels.aot [--arch 80 90] [--kernel SUBSTR ...] [--json] [--keep DIR] [--jobs N]

Every module under ``astra_kernels/triton/`` exposes ``AOT_SPECS: list[AotSpec]``: one entry per
kernel and representative constexpr configuration. This module imports all of them, compiles each spec
with ``triton.compile`` for sm_80 and sm_90 (no GPU needed), and prints one row per (spec, arch):

    kernel | arch | config | warps | stages | regs | spills | smem | mma | status

* ``regs`` / ``spills``: from ``ptxas -v`` (Triton's bundled ptxas) run on the generated PTX
  (``spill stores + spill loads`` bytes, plus the stack frame); ``cuobjdump --dump-resource-usage``
  on the cubin (REG, LOCAL) is the fallback if ptxas cannot be run;
* ``smem``: ``metadata.shared`` (bytes of shared memory Triton allocates);
* ``mma``: which tensor-core instructions the PTX contains (the SASS is checked too when the PTX
  shows none): ``wgmma`` (Hopper warpgroup MMA, SASS ``HGMMA``), ``mma.sync`` (SASS ``HMMA``), or
  ``-``.

``main()`` returns non-zero if any spec fails to compile, spills, or has ``expect_mma=True`` and no
tensor-core instruction (sm_80: ``mma.sync``; sm_90: ``wgmma``, or ``mma.sync`` when Triton did not pick
wgmma for that shape - accepted, and reported as such in the ``mma`` column).

Compilation needs real ``JITFunction`` s: if ``TRITON_INTERPRET=1`` is set, this module switches the
interpreter off and re-imports the kernel modules before compiling.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from .interpreter import interpreting, reload_kernel_modules, set_interpret

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

ARCHS = (80, 90)


@dataclass
class AotSpec:
    """One kernel at one representative configuration.

    ``signature`` maps every argument name of the kernel to its Triton type (``"*fp32"``, ``"i32"``,
    ``"constexpr"``...); ``constexprs`` gives the values of the constexpr arguments. ``label`` is the
    human-readable configuration shown in the table. ``expect_mma`` marks kernels whose inner loop is a
    ``tl.dot`` that must map onto tensor cores.
    """

    name: str
    fn: Any
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    label: str
    num_warps: int = 4
    num_stages: int = 2
    expect_mma: bool = False


@dataclass
class AotResult:
    kernel: str
    arch: int
    config: str
    num_warps: int
    num_stages: int
    module: str = ""
    ok: bool = False
    regs: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack: Optional[int] = None
    local: Optional[int] = None
    smem: Optional[int] = None
    mma: str = "-"
    expect_mma: bool = False
    compile_s: float = 0.0
    errors: List[str] = field(default_factory=list)

    @property
    def spills(self) -> Optional[int]:
        if self.spill_stores is None and self.spill_loads is None:
            return None
        return (self.spill_stores or 0) + (self.spill_loads or 0)


# --------------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------------

def _ensure_not_interpreting() -> None:
    if interpreting():
        set_interpret(False)
        reload_kernel_modules()


def discover_specs(for_compile: bool = True) -> List[tuple]:
    """[(module_name, AotSpec)] for every module of ``astra_kernels.triton`` that has ``AOT_SPECS``.

    ``for_compile=True`` first switches Triton's interpreter off for this process (and re-imports the
    kernel modules) so the specs hold compilable ``JITFunction`` s; pass False to only inspect them."""
    if for_compile:
        _ensure_not_interpreting()
    from . import triton as kpkg

    out = []
    for info in sorted(pkgutil.iter_modules(kpkg.__path__), key=lambda i: i.name):
        modname = f"{kpkg.__name__}.{info.name}"
        mod = importlib.import_module(modname)
        for spec in getattr(mod, "AOT_SPECS", []) or []:
            out.append((modname, spec))
    return out


# --------------------------------------------------------------------------------------------------
# tools
# --------------------------------------------------------------------------------------------------

def _nvidia_bin() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _ptxas_candidates() -> List[str]:
    cands = []
    try:
        from triton import knobs

        for attr in ("ptxas", "ptxas_blackwell"):
            tool = getattr(knobs.nvidia, attr, None)
            p = getattr(tool, "path", None)
            if p:
                cands.append(p)
    except Exception:
        pass
    b = _nvidia_bin()
    for n in ("ptxas", "ptxas-blackwell"):
        cands.append(os.path.join(b, n))
    w = shutil.which("ptxas")
    if w:
        cands.append(w)
    seen, res = set(), []
    for c in cands:
        if c and c not in seen and os.path.exists(c):
            seen.add(c)
            res.append(c)
    return res


def _ptxas_info(ptx: str, tmpdir: str) -> Dict[str, int]:
    m = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.M)
    gpu = m.group(1) if m else "sm_80"
    path = os.path.join(tmpdir, "k.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    last_err = "no ptxas found"
    for exe in _ptxas_candidates():
        r = subprocess.run([exe, "-v", f"--gpu-name={gpu}", path, "-o", os.devnull],
                           capture_output=True, text=True)
        txt = r.stdout + r.stderr
        if r.returncode != 0:
            last_err = txt.strip().splitlines()[-1] if txt.strip() else f"{exe} rc={r.returncode}"
            continue
        info: Dict[str, int] = {}
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", txt)
        if m:
            info["stack"], info["spill_stores"], info["spill_loads"] = (int(g) for g in m.groups())
        m = re.search(r"Used (\d+) registers", txt)
        if m:
            info["regs"] = int(m.group(1))
        return info
    raise RuntimeError(f"ptxas -v failed: {last_err}")


def _cuobjdump(cubin: bytes, tmpdir: str) -> Dict[str, Any]:
    exe = os.path.join(_nvidia_bin(), "cuobjdump")
    path = os.path.join(tmpdir, "k.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    info: Dict[str, Any] = {}
    r = subprocess.run([exe, "--dump-resource-usage", path], capture_output=True, text=True)
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", r.stdout)
    if m:
        info["regs"], info["local"] = int(m.group(1)), int(m.group(2))
    r = subprocess.run([exe, "-sass", path], capture_output=True, text=True)
    info["sass"] = r.stdout
    return info


def _mma_kind(ptx: str, sass: str) -> str:
    if "wgmma" in ptx or "HGMMA" in sass:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx) or "HMMA" in sass:
        return "mma.sync"
    return "-"


# --------------------------------------------------------------------------------------------------
# compile
# --------------------------------------------------------------------------------------------------

def compile_spec(spec: AotSpec, arch: int, module: str = "", keep: Optional[str] = None) -> AotResult:
    import triton
    from triton.backends.compiler import GPUTarget

    res = AotResult(kernel=spec.name, arch=arch, config=spec.label, num_warps=spec.num_warps,
                    num_stages=spec.num_stages, module=module, expect_mma=spec.expect_mma)
    t0 = time.time()
    try:
        src = triton.compiler.ASTSource(fn=spec.fn, signature=dict(spec.signature),
                                        constexprs=dict(spec.constexprs))
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as e:  # compile failure is a reported result, not a crash
        last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        res.errors.append(f"compile failed: {type(e).__name__}: {last}")
        res.compile_s = time.time() - t0
        if os.environ.get("ASTRA_AOT_TRACE"):
            traceback.print_exc()
        return res
    res.compile_s = time.time() - t0
    res.smem = int(getattr(k.metadata, "shared", 0) or 0)
    ptx = k.asm.get("ptx", "")
    cubin = k.asm.get("cubin", b"")
    with tempfile.TemporaryDirectory() as td:
        try:
            info = _ptxas_info(ptx, td)
            res.regs = info.get("regs")
            res.spill_stores = info.get("spill_stores")
            res.spill_loads = info.get("spill_loads")
            res.stack = info.get("stack")
        except Exception as e:
            res.errors.append(str(e))
        sass = ""
        # cuobjdump (~0.5 s a kernel) only where it adds something: ptxas -v failed, the PTX shows no
        # tensor-core instruction for a spec that needs one, or --keep wants the SASS
        need_sass = keep or res.regs is None or (spec.expect_mma and _mma_kind(ptx, "") == "-")
        if need_sass:
            try:
                cinfo = _cuobjdump(cubin, td)
                sass = cinfo.get("sass", "")
                res.local = cinfo.get("local")
                if res.regs is None:
                    res.regs = cinfo.get("regs")
            except Exception as e:
                res.errors.append(f"cuobjdump failed: {e}")
    if keep:
        os.makedirs(keep, exist_ok=True)
        base = os.path.join(keep, f"{spec.name}.{spec.label}.sm{arch}".replace("/", "_").replace(" ", ""))
        with open(base + ".ptx", "w") as f:
            f.write(ptx)
        with open(base + ".cubin", "wb") as f:
            f.write(cubin)
        with open(base + ".sass", "w") as f:
            f.write(sass)
    res.mma = _mma_kind(ptx, sass)
    if res.spills is None and res.local is None:
        res.errors.append("could not determine spills")
    if (res.spills or 0) > 0 or (res.local or 0) > 0:
        res.errors.append(f"spills: {res.spill_stores} B stores, {res.spill_loads} B loads, local {res.local} B")
    if spec.expect_mma and res.mma == "-":
        res.errors.append("expected tensor-core instructions (mma.sync / wgmma), found none")
    res.ok = not res.errors
    return res


_JOBS: List[tuple] = []   # (module, spec, arch, keep) for forked workers


def _run_job(i: int) -> AotResult:
    module, spec, arch, keep = _JOBS[i]
    return compile_spec(spec, arch, module=module, keep=keep)


def run(archs: Sequence[int] = ARCHS, kernel_filters: Sequence[str] = (), keep: Optional[str] = None,
        jobs: int = 1) -> List[AotResult]:
    """Compile every selected (spec, arch); ``jobs > 1`` compiles in forked worker processes."""
    global _JOBS
    _JOBS = [(module, spec, arch, keep) for module, spec in discover_specs()
             if not kernel_filters or any(f in spec.name for f in kernel_filters) for arch in archs]
    if jobs > 1 and len(_JOBS) > 1 and sys.platform.startswith("linux"):
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(min(jobs, len(_JOBS))) as pool:
            return pool.map(_run_job, range(len(_JOBS)), chunksize=1)
    return [_run_job(i) for i in range(len(_JOBS))]


def format_table(results: Sequence[AotResult]) -> str:
    head = ["kernel", "arch", "config", "warps", "stages", "regs", "spills", "smem", "mma", "status"]
    rows = []
    for r in results:
        sp = "?" if r.spills is None else str(r.spills)
        rows.append([r.kernel, f"sm_{r.arch}", r.config, str(r.num_warps), str(r.num_stages),
                     "?" if r.regs is None else str(r.regs), sp, "?" if r.smem is None else str(r.smem),
                     r.mma + ("" if not r.expect_mma else " (req)"),
                     "ok" if r.ok else "FAIL: " + "; ".join(r.errors)])
    widths = [max(len(head[i]), *(len(row[i]) for row in rows)) if rows else len(head[i]) for i in range(len(head))]
    fmt = lambda row: " | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    lines = [fmt(head), "-+-".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m astra_kernels.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="SM versions (default: 80 90)")
    p.add_argument("--kernel", nargs="+", default=[], help="only specs whose kernel name contains one of these")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--keep", default=None, help="write ptx / cubin / sass of every compile into this folder")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                   help="parallel compile processes (default: CPU count, at most 8)")
    a = p.parse_args(argv)
    try:
        results = run(a.arch, a.kernel, keep=a.keep, jobs=a.jobs)
    except Exception as e:
        print(f"aot: discovery failed: {type(e).__name__}: {e}", file=sys.stderr)
        traceback.print_exc()
        return 2
    if not results:
        print("aot: no kernel specs matched", file=sys.stderr)
        return 1
    if a.json:
        out = []
        for r in results:
            d = dataclasses.asdict(r)
            d["spills"] = r.spills
            out.append(d)
        print(json.dumps(out, indent=1))
    else:
        print(format_table(results))
        nfail = sum(not r.ok for r in results)
        print(f"\n{len(results)} compiles, {nfail} failed, "
              f"{sum(r.compile_s for r in results):.1f} s compile time")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
