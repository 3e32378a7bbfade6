"""Backend selection shared by every op of the package.

``backend`` is one of:

* ``"auto"``   - Triton for CUDA tensors, the fast CPU path (torch / C++) for CPU tensors;
* ``"triton"`` - force the Triton kernel. On CPU tensors this only works under
  ``TRITON_INTERPRET=1`` (Triton's interpreter), which is how the kernels are tested here;
* ``"torch"``  - force the torch / C++ path (any device).
"""
from __future__ import annotations

from typing import Optional

import torch

from .interpreter import interpreting

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


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
            raise RuntimeError("backend='triton' requested but triton is not installed (pip install triton)")
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
