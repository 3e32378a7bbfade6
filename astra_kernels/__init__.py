"""astra_kernels: the kernel layer of astra.

Triton kernels (VQ encode/decode, packing, mixed-precision attention), float64 torch references,
fast CPU paths, backend dispatch, and the C++ bit-stream codec. Knows nothing of models: no
``transformers``, no ``torch.distributed``.
"""
from .attention import merge_attention, mixed_attention, mixed_attention_reference
from .codec import CODES_DTYPE, crc32c, frame_header, frame_layout, frame_nbytes, pack_codes, unpack_codes
from .vq import default_bits, encode_and_pack, vq_decode, vq_encode, vq_encode_reference

__version__ = "0.1.0"

__all__ = [
    "CODES_DTYPE", "crc32c", "default_bits", "encode_and_pack", "frame_header", "frame_layout", "frame_nbytes",
    "merge_attention", "mixed_attention", "mixed_attention_reference", "pack_codes", "unpack_codes",
    "vq_decode", "vq_encode", "vq_encode_reference",
]
