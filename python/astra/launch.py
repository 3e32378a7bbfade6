"""``astra.launch``: spawn local gloo ranks on one machine (torchrun works too: see docs/runtime.md)."""
from __future__ import annotations

import ctypes
import io
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import types
from datetime import timedelta
from typing import Any, Callable, List, Optional

from astra_kernels.checks import is_count
from . import allocator
from .errors import LaunchError, described
from .transport import NCCL_BLOCKING_WAIT, checked_timeout, names_nccl


class _CompactPickler(pickle.Pickler):
    """``torch.save``'s pickler, except that a tensor viewing part of a larger storage travels as a copy of its own
    elements (``torch.save`` writes the whole storage: a rank returning ``hidden[:, :1]`` sent every token). Tensors
    that share a storage whole still share it (``torch.save`` writes each storage once)."""

    def reducer_override(self, obj):
        import torch

        if isinstance(obj, torch.Tensor) and obj.layout == torch.strided and obj.device.type != "meta" and (
                obj.untyped_storage().nbytes() > obj.numel() * obj.element_size()):
            return _rebuilt, (obj.clone(memory_format=torch.contiguous_format),)
        return NotImplemented


def _rebuilt(t):
    return t


_COMPACT = types.ModuleType("astra_launch_pickle")     # what torch.save reads of its pickle_module
_COMPACT.Pickler = _CompactPickler


def _dump(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf, pickle_module=_COMPACT)
    return buf.getvalue()


def _load(b: bytes):
    import torch

    return torch.load(io.BytesIO(b), weights_only=False)


class _Fn:
    """``fn`` as a rank gets it. Under spawn it is pickled while the ranks start (so it may bind multiprocessing
    objects, as before) and unpickled in the rank, where a failure is reported with its likely cause (spawn's own
    unpickling failed before any astra code ran: the rank "exited without a result")."""

    def __init__(self, fn: Optional[Callable] = None, error: Optional[BaseException] = None):
        self.fn, self.error = fn, error

    def __reduce__(self):
        from multiprocessing.reduction import ForkingPickler

        return _unpickled_fn, (bytes(ForkingPickler.dumps(self.fn)),)

    def get(self) -> Callable:
        if self.error is not None:
            raise ValueError(f"the rank could not load fn ({type(self.error).__name__}: {self.error}): spawn "
                             "re-imports the launching script as a module, so fn must be defined at its top level, "
                             "not under `if __name__ == '__main__':`, or in an importable module")
        return self.fn


def _unpickled_fn(data: bytes) -> _Fn:
    try:
        return _Fn(pickle.loads(data))
    except Exception as e:
        return _Fn(error=e)


def exit_with_launcher(launcher: int) -> None:
    """This process (a rank, the benchmark's worker) does not outlive the process ``launcher`` that started it: a
    launcher killed by a signal that skips its ``finally`` (SIGTERM, SIGKILL) left every rank running, parented to
    init. On Linux the kernel kills this process when its parent dies (``PR_SET_PDEATHSIG``: a thread could wait for
    the GIL forever, e.g. behind torch's FileStore constructor); a thread also polls twice a second (forkserver's
    ranks are not the launcher's children; other systems)."""
    parent = os.getppid()       # the launcher under spawn; forkserver's server otherwise
    if sys.platform.startswith("linux") and parent == launcher:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)     # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def gone() -> bool:
        if os.getppid() != parent:
            return True
        try:
            os.kill(launcher, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False

    def watch():
        while not gone():
            time.sleep(0.5)
        os._exit(1)

    if gone():                  # died before the prctl
        os._exit(1)
    threading.Thread(target=watch, name="astra-launch-watch", daemon=True).start()


def _worker(rank, world_size, init_method, backend, timeout_s, threads, tune, fn: _Fn, args, kwargs, q, launcher):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    exit_with_launcher(launcher)
    try:
        _sigint_mask(signal.SIG_UNBLOCK)        # blocked by the launcher while it started this rank (:func:`_start`)
        call = fn.get()
        if tune:
            allocator.tune_allocator()
        import torch
        import torch.distributed as dist

        if threads:
            torch.set_num_threads(threads)
        if names_nccl(backend):     # NCCL's wait then blocks and raises at astra's timeout (transport.check_nccl_wait)
            os.environ.setdefault(NCCL_BLOCKING_WAIT, "1")
        dist.init_process_group(backend, init_method=init_method, rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
        if backend == "gloo":
            # every rank's mesh connected before any fn runs: a rank whose fn failed at once closed its connections
            # while a slower rank was still connecting, and that rank failed in gloo's connectFullMesh
            dist.barrier()
        try:
            result = call(rank, *args, **kwargs)
        finally:
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        q.put((rank, "ok", _dump(result)))
    except BaseException as e:  # report everything, including SystemExit from fn
        q.put((rank, "err", f"{described(e)}\n{traceback.format_exc()}"))


def _check_spawnable(fn) -> None:
    """Refuse, before any rank starts, what spawned ranks can not import: a main script read from stdin (spawn runs
    its path again: every rank failed with FileNotFoundError '<stdin>') and a ``fn`` defined in a main module with no
    file (``python -c``, a REPL, a notebook: the ranks' error blamed a ``__main__`` guard that was not there)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    # a relative path is resolved as spawn resolves it (against the directory the program started in); a frozen
    # program's children do not run their main again
    where = path if path is None or os.path.isabs(path) else os.path.join(mp.process.ORIGINAL_DIR or "", path)
    if (getattr(main, "__spec__", None) is None and path is not None and not os.path.exists(where)
            and not getattr(sys, "frozen", False)):
        raise ValueError(f"the main script was read from {path} and spawned ranks can not run it again: save it to a "
                         "file and run that, or launch(..., start_method='fork')")
    if getattr(fn, "__module__", None) == "__main__" and path is None:
        raise ValueError(f"fn ({getattr(fn, '__qualname__', fn)!r}) is defined in an interactive session, python -c "
                         "or a notebook, which spawned ranks can not import: define it in a .py module and import "
                         "it, or launch(..., start_method='fork')")


def _sigint_mask(how):
    """Block or unblock SIGINT in this thread; the previous mask (None where the platform has no signal masks)."""
    return signal.pthread_sigmask(how, {signal.SIGINT}) if hasattr(signal, "pthread_sigmask") else None


def _start(procs, start_method: str) -> None:
    """Start the ranks with SIGINT blocked, a mask they inherit: a Ctrl-C reaching a rank while it still imports
    (spawn's bootstrap, outside :func:`_worker`'s reporting) printed its traceback on every rank; it now waits
    until :func:`_worker` unblocks it. The launcher gets its own Ctrl-C when its mask is restored."""
    if start_method == "forkserver":
        # the server would inherit the blocked mask, and hand it to every process it forks later, the user's too
        from multiprocessing import forkserver
        forkserver.ensure_running()
    previous = _sigint_mask(signal.SIG_BLOCK)
    try:
        for p in procs:
            p.start()
    except (AttributeError, TypeError, pickle.PicklingError) as e:      # spawn pickles fn, its args and kwargs
        raise ValueError(f"launch could not hand fn and its arguments to the ranks ({type(e).__name__}: {e}): fn "
                         "must be importable at module level and its arguments picklable") from e
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _failed_at(procs, results: dict, errors: dict, since: Optional[float]) -> Optional[float]:
    """When a rank first failed (raised, or exited with a non-zero code before reporting), or None while none has."""
    died = any(p.exitcode not in (None, 0) and r not in results for r, p in enumerate(procs))
    return time.monotonic() if since is None and (errors or died) else since


def _collect(procs, q, world_size: int, deadline: Optional[float], after_failure_s: Optional[float]):
    """``(results, errors, cut)``: every rank's message until all have reported, all have exited (``cut`` None),
    the deadline (``"join"``), or ``after_failure_s`` seconds after a rank failed (``"failure"``: a stalled rank held
    the launch until the deadline, 4 hours in ``astra bench``)."""
    results, errors = {}, {}
    failed = None

    def drain(block_s: float) -> bool:
        try:
            rank, kind, payload = q.get(timeout=block_s)
        except Exception:
            return False
        if kind == "ok":
            try:
                results[rank] = _load(payload)
            except Exception as e:          # e.g. a class the launching process can not rebuild
                errors[rank] = (f"its result could not be loaded in the launching process: {type(e).__name__}: "
                                f"{e}")
        else:
            errors[rank] = payload
        return True

    while len(results) + len(errors) < world_size:
        if drain(0.1):
            continue
        if all(not p.is_alive() for p in procs):
            while drain(0.5):               # the last messages may still be in the pipe
                pass
            break
        failed = _failed_at(procs, results, errors, failed)
        now = time.monotonic()
        if deadline is not None and now > deadline:
            return results, errors, "join"
        if failed is not None and after_failure_s is not None and now > failed + after_failure_s:
            return results, errors, "failure"
    return results, errors, None


def _reap(procs, grace_s: float) -> None:
    """Join every started rank for ``grace_s`` seconds, then kill what still runs."""
    for p in procs:
        if p.pid is None:                   # never started
            continue
        if p.is_alive() and grace_s > 0:
            p.join(timeout=grace_s)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _after_failure(after_failure_s, timeout: float) -> Optional[float]:
    """:func:`launch`'s ``after_failure_s`` in seconds (None: no limit). "auto": the others' collectives fail
    within the process group's ``timeout``; twice that (at least 10 s) leaves them time to report."""
    if after_failure_s == "auto":
        return max(2.0 * timeout, 10.0)
    return None if after_failure_s is None else checked_timeout(after_failure_s)


_RDV_PREFIX = "astra-launch-"
#: errors a rank raises because another failed (astra's own reports of a peer's failure)
_CONSEQUENCES = ("PeerError", "RankFailedError")


def _consequence(traceback_text: str) -> bool:
    """Whether a rank's error (its traceback's first line, ``Name: message``) reports another rank's failure."""
    return traceback_text.split(":", 1)[0].strip().rsplit(".", 1)[-1] in _CONSEQUENCES


def _rendezvous_dir() -> str:
    """A fresh directory for this launch's rendezvous file, named after this process (``astra-launch-<pid>-*``), after
    removing those this user's launchers that no longer run left (killed by a signal before their cleanup)."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        pid = name[len(_RDV_PREFIX):].split("-", 1)[0]
        path = os.path.join(root, name)
        if not (name.startswith(_RDV_PREFIX) and pid.isdigit()) or _alive(int(pid)):
            continue
        try:
            if os.stat(path).st_uid == os.getuid():
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass            # gone meanwhile
    return tempfile.mkdtemp(prefix=f"{_RDV_PREFIX}{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True         # another user's process (or a name that is no pid): leave its directory alone
    return True


def launch(fn: Callable, world_size: int, *args, backend: str = "gloo", timeout: float = 60.0,
           join_timeout: Optional[float] = None, after_failure_s="auto", threads: int = 1,
           start_method: str = "spawn", tune_allocator: bool = True, **kwargs) -> List[Any]:
    """Run ``fn(rank, *args, **kwargs)`` on ``world_size`` local processes joined in a ``backend`` process
    group (gloo over loopback by default; file rendezvous) and return the per-rank results, in rank order.

    ``fn`` must be importable (module-level) and its result picklable. ``timeout`` is the process group's
    collective timeout (seconds); ``join_timeout`` bounds the whole run (ranks still running then are
    killed); ``after_failure_s``: once a rank failed, the others are killed if they still run that many seconds
    later ("auto": twice ``timeout``, at least 10 s; so a stalled rank can not hold the launch until
    ``join_timeout``), None: no limit (survivors of ``on_peer_failure="local"`` that go on working alone).
    ``tune_allocator``: every rank first calls :func:`astra.tune_allocator` (glibc keeps freed memory
    instead of faulting it in again every layer; see :mod:`astra.allocator`). Raises :class:`astra.LaunchError`
    if a rank raised, died, or was killed; the error carries the results of the ranks that did return. No rank
    outlives the launching process, however it ends (an exception, an interrupt, SIGTERM or SIGKILL: the kernel or
    a thread of each rank ends it). The rendezvous directory (one file under ``tempfile.gettempdir()``) is removed
    by the launching process; one that a launcher killed by a signal left is removed by the next launch.
    """
    if not is_count(world_size, 1):
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if start_method != "fork":
        _check_spawnable(fn)
    timeout = checked_timeout(timeout)                      # 0 was accepted (parallelize refused it)
    if join_timeout is not None:
        join_timeout = checked_timeout(join_timeout)
    after_failure = _after_failure(after_failure_s, timeout)
    ctx = mp.get_context(start_method)
    q = ctx.Queue()
    # rendezvous through a fresh file (no port to race for with other processes on the machine)
    rdv_dir = _rendezvous_dir()
    init_method = "file://" + os.path.join(rdv_dir, "rendezvous")
    procs, grace_s = [], 0.0         # an exception or interrupt here: kill the ranks at once
    try:
        common = (world_size, init_method, backend, float(timeout), threads, tune_allocator, _Fn(fn), args, kwargs,
                  q, os.getpid())
        procs = [ctx.Process(target=_worker, args=(r, *common), daemon=True) for r in range(world_size)]
        deadline = None if join_timeout is None else time.monotonic() + float(join_timeout)
        _start(procs, start_method)
        results, errors, cut = _collect(procs, q, world_size, deadline, after_failure)
        grace_s = 0.1 if cut else 5.0
    finally:        # also on an exception or an interrupt in this process: no rank outlives it, no directory leaks
        _reap(procs, grace_s)
        shutil.rmtree(rdv_dir, ignore_errors=True)
    dead = [r for r in range(world_size) if r not in results and r not in errors]
    if errors or dead:
        parts = []
        if cut == "join":
            parts.append(f"launch timed out after {join_timeout}s")
        if cut == "failure":
            parts.append(f"rank(s) still running {after_failure:g}s after a rank failed were killed")
        if dead:
            parts.append(f"rank(s) {dead} exited without a result (exit codes "
                         f"{[procs[r].exitcode for r in dead]})")
        order = sorted(errors, key=lambda r: (_consequence(errors[r]), r))     # the cause first, then its echoes
        for r in order:
            parts.append(f"rank {r} raised {errors[r].splitlines()[0]}")
        msg = "; ".join(parts)
        if errors:
            msg += f"\n\ntraceback of rank {order[0]}:\n" + errors[order[0]]
        raise LaunchError(msg, results=results, errors=errors, dead=dead)
    return [results[r] for r in range(world_size)]
