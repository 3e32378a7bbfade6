"""Control of Triton's interpreter (``TRITON_INTERPRET``), for the ops' dispatch, ``astra_kernels.aot``
and the tests.

How ``TRITON_INTERPRET`` works in triton 3.x (checked on 3.9)
------------------------------------------------------------
``@triton.jit`` reads ``triton.knobs.runtime.interpret`` (which falls back to the environment variable
``TRITON_INTERPRET``) **when the decorator runs**, i.e. when the kernel module is imported: with it set
the decorator returns an ``InterpretedFunction`` (runs on CPU tensors), otherwise a ``JITFunction``
(needs a GPU). Setting the variable after the kernel module was imported has no effect on that
module's kernels. Therefore:

1. The test suite sets ``TRITON_INTERPRET=1`` in ``tests/conftest.py`` *before anything imports a kernel
   module*, when no CUDA device is present (``os.environ.setdefault``, so an explicit
   ``TRITON_INTERPRET=0`` from the user still wins). This is the normal route.
2. :func:`interpret_mode` is the robust route for scripts / a process that already imported the
   kernels: it sets the env var and the knob, and **reloads** every already-imported module under
   ``astra_kernels.triton`` so that their ``@triton.jit`` decorators run again in interpreter mode; on
   exit it restores the previous setting and reloads them again. ``importlib.reload`` updates the
   module object in place, so code that looks kernels up as ``module.kernel`` at call time (as all ops
   of this package do) sees the new functions; a name bound with ``from mod import kernel`` would not.
3. :func:`interpreter_env` returns an environment for running a subprocess with the interpreter on
   (or off: ``python -m astra_kernels.aot`` needs real ``JITFunction`` s and switches it off itself).

``_dispatch.interpreting()`` reads the environment variable at call time, so ``backend="triton"`` on
CPU tensors is accepted exactly while interpreting.
``interpreting()`` reads the environment variable at call time, so ``backend="triton"`` on CPU tensors
is accepted exactly while interpreting (``astra_kernels._dispatch``).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from typing import Iterator, Optional, Sequence

__all__ = ["interpreting", "set_interpret", "reload_kernel_modules", "interpret_mode", "interpreter_env"]


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1`` is in effect for newly decorated kernels and for dispatch."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernel_modules() -> Sequence[str]:
    return sorted(m for m in sys.modules if m.startswith("astra_kernels.triton.") and sys.modules[m] is not None)


def set_interpret(on: bool) -> None:
    """Switch the interpreter on or off for kernels decorated from now on (env var + pinned knob)."""
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    if on:
        try:
            from triton import knobs

            knobs.runtime.interpret = True  # assigning a bool pins the knob
        except Exception:
            pass
    else:
        _unpin_interpret_knob()


def _unpin_interpret_knob() -> None:
    """Delete the pinned knob so that it follows the environment variable again."""
    try:
        from triton import knobs

        try:
            del knobs.runtime.interpret
        except AttributeError:
            pass
    except Exception:
        pass


def reload_kernel_modules() -> None:
    """Re-run the ``@triton.jit`` decorators of every imported ``astra_kernels.triton.*`` module."""
    for name in _kernel_modules():
        importlib.reload(sys.modules[name])


@contextlib.contextmanager
def interpret_mode(on: bool = True) -> Iterator[None]:
    """Run the body with Triton's interpreter switched on (or off with ``on=False``).

    Sets ``TRITON_INTERPRET`` and ``triton.knobs.runtime.interpret`` and reloads the already imported
    kernel modules so their kernels are (re)created in that mode; restores everything on exit.
    """
    prev_env = os.environ.get("TRITON_INTERPRET")
    was = interpreting()
    changed = was != on
    set_interpret(on)
    if changed:
        reload_kernel_modules()
    try:
        yield
    finally:
        if prev_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = prev_env
        _unpin_interpret_knob()
        if changed:
            reload_kernel_modules()


def interpreter_env(on: bool = True, base: Optional[dict] = None) -> dict:
    """A copy of the environment (``base`` or ``os.environ``) with the interpreter on or off."""
    env = dict(os.environ if base is None else base)
    if on:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env
