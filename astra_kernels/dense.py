"""Dense products of astra's own weights (codebook transforms, folded K/V projections) on the faster CPU GEMM.

torch's default fp32 CPU GEMM is MKL's sgemm, which on AMD CPUs runs its AVX2 code even where AVX-512 is
there; oneDNN, in every x86 torch build, picks its code by instruction set. On an AMD EPYC Zen 5 (one thread,
fp32 ``[512, 768] x [768, 1536]``) MKL took 10.2 ms and oneDNN 4.6 ms (``bench/test_bench_gemm.py``,
bench/RESULTS.md "Dense products"). The model's own layers keep torch's default: this module is for the
products that astra adds.

One entry point, :func:`gemm`. oneDNN is used for fp32 CPU tensors when no gradient is asked for (the op has
no backward) and this torch build has it; everything else is ``torch.matmul`` / ``torch.addmm``, which is also
the reference the tests hold it to.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._dispatch import is_compiling
from .checks import require

__all__ = ["gemm", "onednn_available"]

_FAILED: list = []      # set once when this torch build's oneDNN linear raised: torch's default from then on


def _onednn_op():
    mkldnn = getattr(torch.ops, "mkldnn", None)
    op = None if mkldnn is None else getattr(mkldnn, "_linear_pointwise", None)
    return None if op is None or not torch.backends.mkldnn.is_available() else op


def onednn_available() -> bool:
    """Whether :func:`gemm` can take oneDNN's fp32 linear on CPU tensors in this process."""
    return not _FAILED and _onednn_op() is not None


def _wants_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def gemm(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ w (+ bias)``.

    ``x [..., K]``, ``w [K, N]``, ``bias [N]`` or None, all of one dtype and device; returns ``[..., N]``.
    fp32 CPU tensors without autograd (and not under ``torch.compile``, whose Inductor can not lower that op) go
    through oneDNN's linear (``w`` is read as the transposed view it is, no copy); anything else, or a torch build
    without it, through ``torch.matmul`` (+ bias).
    """
    for name, t in (("x", x), ("w", w), ("bias", bias)):
        require(isinstance(t, torch.Tensor) or (name == "bias" and t is None),
                f"{name} must be a torch.Tensor, got {type(t).__name__}")
    require(len({t.device for t in (x, w, bias) if t is not None}) == 1,
            f"x, w and bias must be on one device, got {x.device}, {w.device}, {None if bias is None else bias.device}")
    require(x.dim() >= 1 and w.dim() == 2 and x.shape[-1] == w.shape[0],
            f"gemm needs x [..., K] and w [K, N], got {tuple(x.shape)} and {tuple(w.shape)}")
    require(bias is None or tuple(bias.shape) == (w.shape[1],),
            f"bias must have shape [N={w.shape[1]}], got {None if bias is None else tuple(bias.shape)}")
    require(x.dtype == w.dtype and (bias is None or bias.dtype == w.dtype),
            f"x, w and bias must share a dtype, got {x.dtype}, {w.dtype}, {None if bias is None else bias.dtype}")
    op = None if _FAILED else _onednn_op()
    if (op is not None and x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == torch.float32
            and x.numel() and not _wants_grad(x, w, bias) and not is_compiling()):    # Inductor can not lower it
        try:       # the op reads the bias as dense memory whatever its strides: a view ([::2], expand) needs a copy
            return op(x, w.t(), None if bias is None else bias.contiguous(), "none", [None], "")
        except RuntimeError:        # not built for this input on this torch: torch's default from now on
            _FAILED.append(True)
    if bias is None:
        return torch.matmul(x, w)
    if x.dim() == 2:
        return torch.addmm(bias, x, w)
    return torch.matmul(x, w).add_(bias)
