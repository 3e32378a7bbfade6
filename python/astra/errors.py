"""Exceptions raised by the astra runtime."""
from __future__ import annotations


class AstraError(RuntimeError):
    """Base class of astra runtime errors."""


class UnsupportedModelError(AstraError, TypeError):
    """The model (or an option) is not supported by astra's HF integration."""


class PeerError(AstraError):
    """A peer rank died, stalled past the timeout, or the collective failed."""


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
