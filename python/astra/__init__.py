"""astra: ASTRA sequence-parallel Transformer inference (VQ codes between devices) on HF models.

Public API: :class:`Codebooks`, :func:`simulate`, :func:`parallelize`, :func:`unpatch`, :func:`launch`,
:func:`calibrate`, :func:`finetune`, :func:`simulate_generate`, and the errors :class:`PeerError`,
:class:`UnsupportedModelError`, :class:`LaunchError`. Semantics: docs/runtime.md.
"""
from .calibrate import calibrate
from .codebooks import Codebooks
from .errors import AstraError, LaunchError, PeerError, UnsupportedModelError
from .finetune import FinetuneResult, finetune
from .generation import simulate_generate
from .launch import launch
from .parallel import ParallelModel, parallelize
from .runtime import LayerStats, local_indices, simulate, split_indices, unpatch
from .transport import DEFAULT_TIMEOUT_S

__version__ = "0.1.0"

__all__ = [
    "AstraError", "Codebooks", "LaunchError", "PeerError", "UnsupportedModelError",
    "DEFAULT_TIMEOUT_S", "FinetuneResult", "LayerStats", "calibrate", "finetune", "ParallelModel", "launch",
    "local_indices", "parallelize", "simulate", "simulate_generate", "split_indices", "unpatch",
]
