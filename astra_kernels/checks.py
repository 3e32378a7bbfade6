"""Input checks shared by the ops of astra_kernels (and astra): one home for the float dtypes, the
finiteness check and the "raise a clear ValueError" helper."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

__all__ = ["FLOAT_DTYPES", "INT_OF_SIZE", "MAX_BITS", "require", "is_count", "is_finite_real", "check_bits",
           "check_float", "check_finite", "check_int", "check_mask"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: the signed integer dtype of each element size (a tensor's bits seen as integers: exact compares and sums)
INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
MAX_BITS = 16  # the widest code the wire format carries (docs/wire-format.md)


def require(cond: bool, msg: str) -> None:
    """Raise ``ValueError(msg)`` unless ``cond``."""
    if not cond:
        raise ValueError(msg)


def is_count(x, lo: int = 0) -> bool:
    """Whether ``x`` is a Python int (numpy's too, not a bool) of at least ``lo``: a size, a count, a rank."""
    return not isinstance(x, bool) and isinstance(x, numbers.Integral) and x >= lo


def is_finite_real(x, *, positive: bool) -> bool:
    """Whether ``x`` is a finite real number (not a bool), ``> 0`` when ``positive``, else ``>= 0``: a rate, a weight,
    a scale."""
    ok = isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
    return ok and (x > 0 if positive else x >= 0)


def check_bits(bits) -> int:
    """``bits`` as an int in ``1..MAX_BITS``, else ValueError."""
    if not is_count(bits):
        raise ValueError(f"bits must be an int in 1..{MAX_BITS}, got {bits!r}")
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    return int(bits)


def check_float(name: str, t, ndim: int) -> None:
    """``t`` is a floating tensor (fp16/bf16/fp32/fp64) with ``ndim`` dims."""
    require(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    require(t.dim() == ndim, f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    require(t.dtype in FLOAT_DTYPES, f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")


def check_int(name: str, t) -> None:
    """``t`` is an integer tensor (not bool, float or complex)."""
    require(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    require(not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool,
            f"{name} must be an integer tensor, got {t.dtype}")


def check_finite(name: str, t: Optional[torch.Tensor]) -> None:
    """Raise ``ValueError("<name> contains non-finite values (NaN or inf)")`` if ``t`` holds NaN/inf.

    One reduction pass with one host sync: ``aminmax`` propagates NaN and shows +-inf, and unlike a sum it
    cannot overflow (a large fp16 tensor of finite values can sum to inf)."""
    if t is None or t.numel() == 0:
        return
    lo, hi = torch.aminmax(t.detach())
    if not bool(torch.isfinite(torch.stack((lo, hi))).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def check_mask(name: str, m, B: int, N: int) -> None:
    """``m`` is None or a bool ``[B, N]`` key mask (True = attend)."""
    if m is None:
        return
    require(isinstance(m, torch.Tensor), f"{name} must be a torch.Tensor")
    require(m.dtype == torch.bool, f"{name} must be a bool tensor (True = attend), got {m.dtype}")
    require(tuple(m.shape) == (B, N), f"{name} must have shape [{B}, {N}], got {tuple(m.shape)}")
