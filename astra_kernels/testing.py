"""Proof-chain helpers shared by every kernel test of the package (see DEVELOPERS.md, "The proof chain").

Step 1 of the chain runs each Triton kernel in Triton's interpreter on CPU tensors, against a float64
torch reference, on fresh random inputs (never zeros), with outputs poisoned before the call. This
module provides the pieces:

* :func:`seeded_generator` - a ``torch.Generator`` with a fixed seed (tests are deterministic);
* :func:`random_inputs` / :func:`random_ints` - random data that never contains exact zeros
  (a kernel that forgets to write, or reads the wrong row, cannot hide behind zeros);
* :func:`poison_like` / :func:`poisoned_empty` - output buffers filled with NaN (floats) or a
  sentinel (:data:`POISON_INT` = -12345 for signed ints, :data:`POISON_U8` = 0xAB for uint8, ...) so
  that an element the kernel never wrote is detected by :func:`assert_no_poison`;
* :func:`assert_matches_reference` - compares a result with a float64 reference and reports the max
  absolute / relative error and the worst element;
* :func:`interpret_mode` / :func:`kernel_device` / :func:`interpreter_env` - how to get the
  interpreter.

Interpreter control (``interpreting``, ``interpret_mode``, ``interpreter_env``,
``reload_kernel_modules``) lives in ``astra_kernels.interpreter`` (production code uses it too); it is
re-exported here for tests.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .interpreter import interpret_mode, interpreter_env, interpreting, reload_kernel_modules

POISON_INT = -12345
POISON_U8 = 0xAB
POISON_FLOAT = float("nan")

_INT_POISON = {
    torch.uint8: POISON_U8,
    torch.int8: -85,  # 0xAB as int8
    torch.int16: POISON_INT,
    torch.int32: POISON_INT,
    torch.int64: POISON_INT,
    torch.bool: True,
}


def seeded_generator(seed: int = 0, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with ``seed`` (CPU by default)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def _gen(generator: Optional[torch.Generator], seed: Optional[int]) -> torch.Generator:
    if generator is not None:
        return generator
    return seeded_generator(0 if seed is None else seed)


def random_inputs(
    *shape: int,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    scale: float = 1.0,
    kind: str = "normal",
    min_abs: float = 1e-3,
) -> torch.Tensor:
    """Random floats of ``shape`` that contain no exact zeros (``|x| >= min_abs * scale``).

    ``kind="normal"``: standard normal times ``scale``; ``kind="uniform"``: uniform in
    ``[-scale, scale]``. Values are drawn in float64 on the CPU (reproducible across devices) and then
    cast to ``dtype`` and moved to ``device``.
    """
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    g = _gen(generator, seed)
    if kind == "normal":
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
    elif kind == "uniform":
        x = torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1
    else:
        raise ValueError(f"kind must be 'normal' or 'uniform', got {kind!r}")
    small = x.abs() < min_abs
    x = torch.where(small, torch.where(x < 0, -min_abs, min_abs) * torch.ones_like(x), x)
    x = (x * scale).to(dtype)
    # casting to a narrow dtype can underflow tiny values to 0: push them back out
    if (x == 0).any():
        fill = max(abs(min_abs * scale), torch.finfo(dtype).tiny) if dtype.is_floating_point else 1
        x = torch.where(x == 0, torch.full_like(x, fill), x)
    return x.to(device)


def random_ints(
    *shape: int,
    low: int,
    high: int,
    dtype: torch.dtype = torch.int64,
    device: Union[str, torch.device] = "cpu",
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """Random integers in ``[low, high)`` (``torch.randint`` with a seeded generator)."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    g = _gen(generator, seed)
    return torch.randint(low, high, tuple(shape), generator=g, dtype=torch.int64).to(dtype).to(device)


def poison_value(dtype: torch.dtype):
    """The poison used for ``dtype``: NaN for floating dtypes, a sentinel for integer dtypes."""
    if dtype.is_floating_point or dtype.is_complex:
        return POISON_FLOAT
    if dtype in _INT_POISON:
        return _INT_POISON[dtype]
    return POISON_INT


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A new tensor like ``t`` filled with the poison of its dtype."""
    return torch.full_like(t, poison_value(t.dtype))


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` in place with its poison; returns ``t``."""
    return t.fill_(poison_value(t.dtype))


def poisoned_empty(
    *shape: int, dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu"
) -> torch.Tensor:
    """``torch.empty`` of ``shape`` filled with the poison of ``dtype``."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    return torch.full(tuple(shape), poison_value(dtype), dtype=dtype, device=device)


def assert_no_poison(t: torch.Tensor, name: str = "output") -> None:
    """Fail if any element of ``t`` still holds the poison (i.e. was never written)."""
    t = t.detach().cpu()
    if t.dtype.is_floating_point:
        bad = torch.isnan(t)
    else:
        bad = t == poison_value(t.dtype)
    n = int(bad.sum())
    if n:
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(f"{name}: {n} of {t.numel()} elements still poisoned (first at {idx})")


def max_errors(actual: torch.Tensor, ref64: torch.Tensor) -> Tuple[float, float]:
    """(max absolute error, max relative error) of ``actual`` against ``ref64``, in float64."""
    a = actual.detach().cpu().to(torch.float64)
    r = ref64.detach().cpu().to(torch.float64)
    if a.numel() == 0:
        return 0.0, 0.0
    diff = (a - r).abs()
    rel = diff / r.abs().clamp_min(torch.finfo(torch.float64).tiny)
    return float(diff.max()), float(rel.max())


def assert_matches_reference(
    actual: torch.Tensor,
    ref64: torch.Tensor,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    name: str = "output",
) -> Tuple[float, float]:
    """Assert ``|actual - ref64| <= atol + rtol * |ref64|`` elementwise (computed in float64).

    ``ref64`` is the float64 reference. Fails on shape mismatch, on any NaN/inf in ``actual`` that is
    not in the reference (poison left in place counts), and reports the max abs / rel error, the
    number of mismatching elements and the worst one. Returns (max_abs, max_rel).
    """
    if tuple(actual.shape) != tuple(ref64.shape):
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref64.shape)}")
    a = actual.detach().cpu().to(torch.float64)
    r = ref64.detach().cpu().to(torch.float64)
    nonfinite = ~torch.isfinite(a) & torch.isfinite(r)
    if nonfinite.any():
        idx = nonfinite.nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: {int(nonfinite.sum())} non-finite elements (poison or overflow) where the reference "
            f"is finite; first at {idx}: {a[tuple(idx)].item()} vs {r[tuple(idx)].item()}"
        )
    diff = (a - r).abs()
    tol = atol + rtol * r.abs()
    bad = diff > tol
    max_abs, max_rel = max_errors(a, r)
    if bad.any():
        worst = int(torch.argmax(diff - tol))
        widx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} elements outside atol={atol} rtol={rtol}; "
            f"max abs err {max_abs:.3e}, max rel err {max_rel:.3e}; worst at {list(widx)}: "
            f"{a[widx].item()!r} vs reference {r[widx].item()!r}"
        )
    return max_abs, max_rel


def assert_equal_ints(actual: torch.Tensor, expected: torch.Tensor, name: str = "output") -> None:
    """Exact equality for integer results (codes, bytes) with a useful message."""
    a = actual.detach().cpu()
    e = expected.detach().cpu()
    if tuple(a.shape) != tuple(e.shape):
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    ne = a.to(torch.int64) != e.to(torch.int64)
    if ne.any():
        idx = ne.nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: {int(ne.sum())} of {a.numel()} elements differ; first at {idx}: "
            f"{a[tuple(idx)].item()} vs expected {e[tuple(idx)].item()}"
        )


# --------------------------------------------------------------------------------------------------
# interpreter control
# --------------------------------------------------------------------------------------------------

def cuda_available() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - broken CUDA installs
        return False


def kernel_device() -> str:
    """The device on which a ``backend="triton"`` test should put its tensors.

    ``"cuda"`` on a GPU machine that is not interpreting, else ``"cpu"`` (interpreter).
    """
    if cuda_available() and not interpreting():
        return "cuda"
    return "cpu"


def triton_runnable() -> bool:
    """Whether a Triton kernel can run here (a GPU, or the interpreter on)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return interpreting() or cuda_available()


__all__ = [
    "POISON_INT",
    "POISON_U8",
    "POISON_FLOAT",
    "seeded_generator",
    "random_inputs",
    "random_ints",
    "poison_value",
    "poison_like",
    "poison_",
    "poisoned_empty",
    "assert_no_poison",
    "max_errors",
    "assert_matches_reference",
    "assert_equal_ints",
    "interpreting",
    "cuda_available",
    "kernel_device",
    "triton_runnable",
    "reload_kernel_modules",
    "interpret_mode",
    "interpreter_env",
]


# --------------------------------------------------------------------------------------------------
# An independent model of the codec frame (docs/wire-format.md), for tests of every packer
# --------------------------------------------------------------------------------------------------
def crc32c_reference(data: bytes, crc: int = 0) -> int:
    """Bitwise CRC32C (Castagnoli), continuing from ``crc`` (0 starts afresh). Slow, obviously right."""
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def reference_frame(codes, bits: int) -> bytes:
    """The frame of ``codes`` (any integer tensor / array) at ``bits`` bits, written from the wire-format
    document alone (Python integers, no shared code with the C++ or Triton packers)."""
    shape = tuple(int(d) for d in codes.shape)
    flat = [int(v) for v in codes.reshape(-1).tolist()]
    acc = 0
    for i, c in enumerate(flat):
        acc |= c << (i * bits)
    payload = acc.to_bytes((len(flat) * bits + 7) // 8, "little")
    head = b"ASTQ" + bytes([1, bits, len(shape), 0]) + b"".join(d.to_bytes(4, "little") for d in shape)
    return head + crc32c_reference(head + payload).to_bytes(4, "little") + payload
