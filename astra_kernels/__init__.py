"""astra_kernels: the kernel layer of astra.

Triton kernels (VQ encode/decode, packing, mixed-precision attention), float64 torch references,
fast CPU paths, backend dispatch, and the C++ bit-stream codec. Knows nothing of models: no
``transformers``, no ``torch.distributed``.
"""
from .codec import CODES_DTYPE, crc32c, frame_header, frame_layout, frame_nbytes, pack_codes, unpack_codes

__version__ = "0.1.0"
from .vq import default_bits, encode_and_pack, vq_decode, vq_encode, vq_encode_reference  # VQ ops (issue 3)
from .attention import merge_attention, mixed_attention, mixed_attention_reference  # mixed-precision attention (issue 4)
