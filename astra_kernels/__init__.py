"""astra_kernels: the kernel layer of astra.

Triton kernels (VQ encode/decode, packing, mixed-precision attention), float64 torch references,
fast CPU paths, backend dispatch, and the C++ bit-stream codec. Knows nothing of models: no
``transformers``, no ``torch.distributed``.
"""
from .attention import (
    attention_group_table,
    attention_local,
    attention_per_token,
    attention_segments,
    attention_table,
    build_group_tables,
    merge_attention,
    mixed_attention,
    mixed_attention_reference,
)
from .codec import (
    CODES_DTYPE,
    crc32c,
    frame_header,
    frame_layout,
    frame_nbytes,
    header_nbytes,
    pack_codes,
    unpack_codes,
)
from .dense import gemm
from .segments import CountKeys, GroupTableKeys, TableKeys, TokenKeys
from .vq import MAX_K, SMALL_GROUP_MAX_DIM, default_bits, encode_and_pack, vq_decode, vq_encode, vq_encode_reference

__version__ = "0.2.0"  # the package version (pyproject.toml and astra read it from here)

__all__ = [
    "CODES_DTYPE", "MAX_K", "SMALL_GROUP_MAX_DIM", "CountKeys", "GroupTableKeys", "TableKeys", "TokenKeys",
    "attention_group_table",
    "attention_local", "attention_per_token", "attention_segments", "attention_table", "build_group_tables",
    "crc32c", "default_bits", "encode_and_pack", "frame_header", "frame_layout", "frame_nbytes", "gemm",
    "header_nbytes", "merge_attention", "mixed_attention", "mixed_attention_reference", "pack_codes", "unpack_codes",
    "vq_decode", "vq_encode", "vq_encode_reference",
]
