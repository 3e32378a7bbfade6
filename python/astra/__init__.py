"""astra: ASTRA sequence-parallel Transformer inference (VQ codes between devices) on HF models.

Public API: :class:`Codebooks`, :func:`simulate`, :func:`parallelize` (a :class:`ParallelModel`, its per-layer
:class:`LayerStats` and :class:`OutputStats`), :func:`unpatch`, :func:`launch`, :func:`tune_allocator`,
:func:`calibrate`, :func:`finetune` (a :class:`FinetuneResult`), :func:`simulate_generate`, the token split
(:func:`split_indices`, :func:`local_indices`), :data:`DEFAULT_TIMEOUT_S`, the family registry
(:class:`FamilyAdapter`, :func:`register_family`, :func:`unregister_family`, :func:`family_of`), and the errors
(:class:`AstraError` and its kinds :class:`PeerError`, :class:`UnsupportedModelError`, :class:`LaunchError`,
:class:`InputMismatchError`, :class:`InvalidInputError`, :class:`RankFailedError`, :class:`FrameMismatchError`,
:class:`NonFiniteError`, :class:`LinkError`).
Semantics: docs/runtime.md.
"""
from astra_kernels import __version__
from .allocator import tune_allocator
from .calibrate import calibrate
from .codebooks import Codebooks
from .context import LayerStats
from .errors import (
    AstraError,
    FrameMismatchError,
    InputMismatchError,
    InvalidInputError,
    LaunchError,
    LinkError,
    NonFiniteError,
    PeerError,
    RankFailedError,
    UnsupportedModelError,
)
from .finetune import FinetuneResult, finetune
from .generation import simulate_generate
from .launch import launch
from .models import FamilyAdapter, family_of, register_family, unregister_family
from .outputs import OutputStats
from .parallel import ParallelModel, parallelize
from .runtime import unpatch
from .simulation import simulate
from .split import local_indices, split_indices
from .transport import DEFAULT_TIMEOUT_S

__all__ = [
    "AstraError", "Codebooks", "FrameMismatchError", "InputMismatchError", "InvalidInputError", "LaunchError",
    "LinkError", "NonFiniteError", "PeerError", "RankFailedError", "UnsupportedModelError",
    "DEFAULT_TIMEOUT_S", "FinetuneResult", "LayerStats", "OutputStats", "calibrate", "finetune", "ParallelModel",
    "launch",
    "local_indices", "parallelize", "simulate", "simulate_generate", "split_indices", "tune_allocator", "unpatch",
    "__version__",
    "FamilyAdapter", "family_of", "register_family", "unregister_family",
]
