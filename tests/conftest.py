"""Shared pytest set-up (keep minimal and general; append fixtures below).

Triton's interpreter must be chosen before any kernel module is imported (``@triton.jit`` decides
interpreted vs compiled when it runs; see ``astra_kernels/testing.py``). With no CUDA device the suite
runs every Triton kernel in the interpreter, so ``TRITON_INTERPRET=1`` is set here, before the test
modules import ``astra_kernels``. An explicit ``TRITON_INTERPRET=0`` in the environment is respected.
"""
import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
for _p in (str(_ROOT), str(_ROOT / "python")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if not _cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("ASTRA_RUN_SLOW") == "1"
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow test: set ASTRA_RUN_SLOW=1 to run"))
        if "root" in item.keywords and not is_root:
            item.add_marker(pytest.mark.skip(reason="needs root"))


@pytest.fixture
def kernel_device():
    """Device for backend='triton' tests: 'cuda' on a GPU (not interpreting), else 'cpu' (interpreter)."""
    from astra_kernels.testing import kernel_device as _kd

    return _kd()
