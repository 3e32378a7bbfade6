"""Exceptions raised by the astra runtime."""
from __future__ import annotations


class AstraError(RuntimeError):
    """Base class of astra runtime errors."""


class UnsupportedModelError(AstraError, TypeError):
    """The model (or an option) is not supported by astra's HF integration."""


class PeerError(AstraError):
    """A peer rank died, stalled past the timeout, or the collective failed."""


class LinkError(AstraError):
    """A shaped link (:mod:`astra.netlink`: network namespaces, tc, nftables, the jitter relay) could not be built or
    run: the failed step and its message."""


class LaunchError(AstraError):
    """One or more ranks started by :func:`astra.launch` failed.

    ``results`` maps rank -> return value for the ranks that returned, ``errors`` maps rank -> formatted
    traceback for ranks that raised, ``dead`` lists ranks that exited without reporting (killed / crashed).
    """

    def __init__(self, message: str, results=None, errors=None, dead=None):
        super().__init__(message)
        self.results = dict(results or {})
        self.errors = dict(errors or {})
        self.dead = list(dead or [])


class InputMismatchError(AstraError, ValueError):
    """The ranks of one forward were given different inputs (or models, codebooks, world sizes), or fell out of
    step (different call counters). Raised on every rank, in the same call, naming the difference."""


class InvalidInputError(AstraError, ValueError):
    """The inputs of a forward are invalid (token id out of range, wrong rank or dtype, too short a sequence...).
    Every rank holds the full inputs, so every rank raises it in the same call."""


class RankFailedError(AstraError):
    """A rank failed in the middle of a forward; every rank raises it in that same call. ``rank`` is the failing
    rank, ``layer`` the layer it was in (None before the first / after the last layer)."""

    def __init__(self, message: str, rank: int, layer=None):
        super().__init__(message)
        self.rank = rank
        self.layer = layer


def described(e: BaseException) -> str:
    """``"Type: message"`` of ``e``, as it travels to other ranks and processes, never raising: an exception whose
    ``__str__`` fails still gets its type named, and characters UTF-8 can not encode (a lone surrogate, as
    ``os.fsdecode`` gives for a file name that is not UTF-8) are backslash-escaped."""
    try:
        text = f"{type(e).__name__}: {e}"
    except Exception:           # a third-party exception with a broken __str__
        text = f"{type(e).__name__}: <its str() failed>"
    return utf8_field(text).decode("utf-8")


def utf8_field(text: str, nbytes: int = -1) -> bytes:
    """``text`` as UTF-8 bytes, characters it can not encode backslash-escaped; with ``nbytes`` >= 0, cut and
    NUL-padded to exactly that many (the fixed-size text fields every rank exchanges: a cut character decodes as
    U+FFFD)."""
    raw = text.encode("utf-8", "backslashreplace")
    return raw if nbytes < 0 else raw[:nbytes].ljust(nbytes, b"\0")


class FrameMismatchError(PeerError):
    """A frame belongs to another call or layer than the one being exchanged: the ranks are out of step."""


class NonFiniteError(AstraError, ValueError):
    """A hidden state entering a layer holds NaN or Inf; the message names rank, layer and first bad token."""
