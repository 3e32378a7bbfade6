"""Backend selection shared by every op of the package, and the loader of its compiled (C++) extensions.

``backend`` is one of:

* ``"auto"``   - Triton for CUDA tensors, the fast CPU path (torch / C++) for CPU tensors;
* ``"triton"`` - force the Triton kernel. On CPU tensors this only works under
  ``TRITON_INTERPRET=1`` (Triton's interpreter), which is how the kernels are tested here;
* ``"torch"``  - force the torch / C++ path (any device).
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Optional

import torch

from .interpreter import interpreting

BACKENDS = ("auto", "triton", "torch")


def extension(name: str):
    """The compiled extension ``astra_kernels.<name>``, or ImportError saying why it is missing. Run from a source
    checkout after a non-editable install, the checkout's uncompiled ``astra_kernels`` comes first on ``sys.path``
    and hides the installed one: Python then called it a circular import."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError as e:
        here = os.path.dirname(os.path.abspath(__file__))
        raise ImportError(f"astra_kernels at {here} has no compiled extension {name} ({e}). If this is a source "
                          "checkout, it hides the installed package: run from another directory, or build it in "
                          "place with `pip install -e .`") from e


#: ``torch.compiler.is_compiling`` (None before torch 2.3)
_IS_COMPILING = getattr(getattr(torch, "compiler", None), "is_compiling", None)


def is_compiling() -> bool:
    """Whether Dynamo is tracing the caller (``torch.compiler.is_compiling``; torch < 2.3 has none: False)."""
    return _IS_COMPILING is not None and _IS_COMPILING()


def compile_opaque(fn):
    """``fn`` as one opaque call under ``torch.compile`` (Dynamo does not trace into it): for functions that hand raw
    data pointers to C++. Traced, a tensor used only through its ``data_ptr()`` could be freed at the graph break
    before the C++ call read it (``vq_encode`` then returned wrong codes). ``torch.compiler.disable`` is applied on
    the first call made while compiling, so importing the package does not import Dynamo (~1 s); eager calls pay
    one ``is_compiling()`` check."""
    compiling, opaque = _IS_COMPILING, []
    if compiling is None:
        return fn

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not compiling():
            return fn(*args, **kwargs)
        if not opaque:
            opaque.append(torch.compiler.disable(fn))
        return opaque[0](*args, **kwargs)

    return call


#: the oldest Triton the kernels compile with (``tl.dot(input_precision=...)``, ``tl.argmin(tie_break_left=)``);
#: pyproject's ``triton`` extra asks for it. torch 2.1-2.5 bring Triton 2.1-3.1: "auto" takes the torch path there
MIN_TRITON = (3, 2)


def triton_version() -> Optional[tuple]:
    """The installed Triton's (major, minor), or None without a usable one."""
    try:
        import triton
        return tuple(int(p) for p in triton.__version__.split(".")[:2])
    except Exception:           # not installed, broken, or a version string of another form
        return None


def triton_available() -> bool:
    """Whether a Triton the kernels compile with (>= :data:`MIN_TRITON`) is installed."""
    v = triton_version()
    return v is not None and v >= MIN_TRITON


def resolve_backend(backend: str, *tensors: Optional[torch.Tensor]) -> str:
    """Return ``"triton"`` or ``"torch"`` for the given request and input tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    devs = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
    if len(devs) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(devs)}")
    dev = devs.pop() if devs else "cpu"
    if dev == "meta":
        raise ValueError("the kernels need tensors holding data, got a meta tensor")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not triton_available():
            have, need = triton_version(), ".".join(map(str, MIN_TRITON))
            found = "is not installed" if have is None else f"is {'.'.join(map(str, have))}"
            raise RuntimeError(f"backend='triton' needs triton >= {need}, which {found} (pip install 'triton>={need}')")
        if dev != "cuda" and not interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {dev}); set TRITON_INTERPRET=1 to run the "
                "kernel in Triton's interpreter on CPU tensors"
            )
        if dev != "cuda" and any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 for t in tensors):
            raise ValueError("Triton's interpreter has no bfloat16 (its results are garbage): use float16 / float32 "
                             "CPU tensors under TRITON_INTERPRET=1, or backend='torch'")
        return "triton"
    # auto
    if dev == "cuda" and triton_available():
        return "triton"
    return "torch"
