"""astra: ASTRA sequence-parallel Transformer inference (VQ codes between devices) on HF models.

Public API: :class:`Codebooks`, :func:`simulate`, :func:`parallelize`, :func:`unpatch`, :func:`launch`,
:func:`calibrate`, :func:`simulate_generate`, and the errors :class:`PeerError`,
:class:`UnsupportedModelError`, :class:`LaunchError`. Semantics: docs/runtime.md.
"""
from .codebooks import Codebooks
from .errors import AstraError, LaunchError, PeerError, UnsupportedModelError
from .runtime import local_indices, simulate, split_indices, unpatch

__version__ = "0.1.0"

__all__ = [
    "AstraError", "Codebooks", "LaunchError", "PeerError", "UnsupportedModelError",
    "local_indices", "simulate", "split_indices", "unpatch",
]
