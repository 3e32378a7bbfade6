"""Triton kernels for vector quantization: fused nearest-codeword encode (optionally packing the codes
into a wire-format frame, ``docs/wire-format.md``) and decode.

Kernels
-------
``vq_encode_kernel``
    grid ``(cdiv(N, BLOCK_M), G)``. A program owns ``BLOCK_M`` tokens of one group ``g`` and scans the
    group's codebook in ``BLOCK_K`` tiles: ``acc = x_tile @ c_tile^T`` accumulated over ``BLOCK_D``
    slices of the group dimension with ``tl.dot`` (tensor cores: ``mma.sync`` on sm_80, ``wgmma`` on
    sm_90), distances ``||c||^2 - 2 x.c`` (``||x||^2`` does not change the argmin), and a running
    (min, argmin) per token. The ``[tokens, K]`` distance matrix never exists, only one
    ``[BLOCK_M, BLOCK_K]`` tile in registers (the FAISS flat-search / flash-kmeans FlashAssign
    scheme). Ties go to the lowest index: ``tl.argmin`` breaks ties to the left inside a tile, and a
    later tile replaces the running best only if strictly smaller. Group dims that are not powers of
    two (12, 24) are padded to the next power of two >= 16 with masked loads (zeros add nothing to the
    dot). fp32 inputs use ``input_precision="tf32x3"`` (three TF32 MMAs, ~fp32 accuracy, still tensor
    cores); fp16 / bf16 inputs are exact products with an fp32 accumulator. ``astra_kernels.vq`` hands it
    inputs centred on the mean codeword, in fp32 whatever the caller's dtype (``vq._triton_inputs``):
    ``||c||^2 - 2 x.c`` cancels in fp32 under a large offset common to x and the codebook.
    With ``FUSE_PACK`` the epilogue also ORs each code's ``BITS`` bits into the frame payload (viewed as
    little-endian int32 words) with ``tl.atomic_or``: a code of <= 16 bits touches at most two words,
    OR is order independent, so the packed payload is deterministic and the codes never leave the
    device.
``vq_decode_kernel``
    grid ``(cdiv(N, BLOCK_M), G)``: gathers codeword rows into ``out[..., g*DG:(g+1)*DG]``.
The codec's device kernels (packer, unpacker, CRC32C, frame header) are in ``codec_kernels.py``.

Every module-level kernel is listed in ``AOT_SPECS`` (see ``astra_kernels/aot.py``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..aot import AotSpec
from .codec_kernels import finish_frame, frame_buffers, frame_header_bytes, or_code_bits


@triton.jit
def vq_encode_kernel(
    x_ptr, cb_ptr, cn_ptr, codes_ptr, words_ptr,
    N, K, DG,
    stride_xn, stride_cbg, stride_cbk, stride_cng, stride_cn_out,
    BITS, G,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WRITE_CODES: tl.constexpr, FUSE_PACK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    offs_m64 = offs_m.to(tl.int64)
    x_row = x_ptr + offs_m64[:, None] * stride_xn + g * DG
    cb_g = cb_ptr + g.to(tl.int64) * stride_cbg
    best = tl.full([BLOCK_M], float("inf"), tl.float32)
    best_i = tl.zeros([BLOCK_M], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        for d0 in range(0, DG, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < DG
            xt = tl.load(x_row + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            ct = tl.load(cb_g + offs_k[None, :].to(tl.int64) * stride_cbk + offs_d[:, None],
                         mask=mask_d[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(xt, ct, acc, input_precision=DOT_PRECISION)
        cn = tl.load(cn_ptr + g * stride_cng + offs_k, mask=mask_k, other=float("inf"))
        dist = cn[None, :] - 2.0 * acc
        dist = tl.where(mask_k[None, :], dist, float("inf"))
        tmin = tl.min(dist, axis=1)
        targ = tl.argmin(dist, axis=1, tie_break_left=True).to(tl.int32) + k0
        upd = tmin < best
        best = tl.where(upd, tmin, best)
        best_i = tl.where(upd, targ, best_i)
    if WRITE_CODES:
        tl.store(codes_ptr + offs_m64 * stride_cn_out + g, best_i, mask=mask_m)
    if FUSE_PACK:
        # stream position of code (token, g) in C order [N, G]
        or_code_bits(words_ptr, best_i.to(tl.uint32), (offs_m64 * G + g) * BITS, BITS, mask_m)


@triton.jit
def vq_decode_kernel(
    codes_ptr, cb_ptr, out_ptr,
    N, K, DG,
    stride_cn, stride_cbg, stride_cbk, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    offs_m64 = offs_m.to(tl.int64)
    code = tl.load(codes_ptr + offs_m64 * stride_cn + g, mask=mask_m, other=0).to(tl.int64)
    code = tl.where((code >= 0) & (code < K), code, 0)
    src = cb_ptr + g.to(tl.int64) * stride_cbg + code[:, None] * stride_cbk
    dst = out_ptr + offs_m64[:, None] * stride_on + g * DG
    for d0 in range(0, DG, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = mask_m[:, None] & (offs_d < DG)[None, :]
        vals = tl.load(src + offs_d[None, :], mask=m, other=0.0)
        tl.store(dst + offs_d[None, :], vals, mask=m)


# --------------------------------------------------------------------------------------------------
# AOT specs: representative configurations (see astra_kernels/aot.py)
# --------------------------------------------------------------------------------------------------

def _enc_sig(xt: str, ct: str) -> dict:
    return {
        "x_ptr": xt, "cb_ptr": ct, "cn_ptr": "*fp32", "codes_ptr": "*i32", "words_ptr": "*i32",
        "N": "i32", "K": "i32", "DG": "i32",
        "stride_xn": "i32", "stride_cbg": "i32", "stride_cbk": "i32", "stride_cng": "i32", "stride_cn_out": "i32",
        "BITS": "i32", "G": "i32",
        "BLOCK_M": "constexpr", "BLOCK_K": "constexpr", "BLOCK_D": "constexpr",
        "DOT_PRECISION": "constexpr", "WRITE_CODES": "constexpr", "FUSE_PACK": "constexpr",
    }


def _enc_spec(dt: str, bm: int, bk: int, bd: int, prec: str, write: bool, fuse: bool, label: str,
              num_warps: int = 4, num_stages: int = 2) -> AotSpec:
    return AotSpec(
        name="vq_encode_kernel", fn=vq_encode_kernel, signature=_enc_sig(dt, dt),
        constexprs={"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_D": bd, "DOT_PRECISION": prec,
                    "WRITE_CODES": write, "FUSE_PACK": fuse},
        label=label, num_warps=num_warps, num_stages=num_stages, expect_mma=True,
    )


_OTHER_SPECS = [
    AotSpec(
        name="vq_decode_kernel", fn=vq_decode_kernel,
        signature={"codes_ptr": "*i32", "cb_ptr": "*fp16", "out_ptr": "*fp16", "N": "i32", "K": "i32", "DG": "i32",
                   "stride_cn": "i32", "stride_cbg": "i32", "stride_cbk": "i32", "stride_on": "i32",
                   "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"},
        constexprs={"BLOCK_M": 32, "BLOCK_D": 64}, label="fp16 M32 D64",
    ),
]


# --------------------------------------------------------------------------------------------------
# launch configurations (the AOT specs above are generated from the same function)
# --------------------------------------------------------------------------------------------------

def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def encode_config(dtype, DG: int) -> dict:
    """Block sizes / precision / warps for the encode kernel (spill-free at sm_80 and sm_90, see aot)."""
    name = dtype if isinstance(dtype, str) else {
        "torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}[str(dtype)]
    if name == "fp32":
        # tf32x3 keeps ~fp32 accuracy on tensor cores; it needs 3x the operand registers -> D tiles of 16
        return dict(BLOCK_M=64, BLOCK_K=64, BLOCK_D=16, DOT_PRECISION="tf32x3", num_warps=4, num_stages=2)
    bd = min(64, max(16, _next_pow2(DG)))
    warps = 8 if bd >= 64 else 4
    return dict(BLOCK_M=64, BLOCK_K=64, BLOCK_D=bd, DOT_PRECISION="ieee", num_warps=warps, num_stages=2)


def _spec_from_config(dt: str, DG: int, write: bool, fuse: bool, what: str) -> AotSpec:
    c = encode_config(dt, DG)
    label = f"{dt} {what} DG{DG} M{c['BLOCK_M']} K{c['BLOCK_K']} D{c['BLOCK_D']} {c['DOT_PRECISION']}"
    return _enc_spec("*" + dt, c["BLOCK_M"], c["BLOCK_K"], c["BLOCK_D"], c["DOT_PRECISION"], write, fuse,
                     label, num_warps=c["num_warps"], num_stages=c["num_stages"])


AOT_SPECS = [      # the host launches the encoder in fp32 only (centred inputs: astra_kernels.vq._triton_inputs)
    _spec_from_config("fp32", 768, True, False, "codes"),          # G=1, D=768 (ViT-B, GPT-2)
    _spec_from_config("fp32", 24, False, True, "fused-pack"),      # G=32 of D=768
    _spec_from_config("fp32", 12, True, True, "codes+pack"),       # G=32 of D=384
] + _OTHER_SPECS


# --------------------------------------------------------------------------------------------------
# host-side wrappers (called by astra_kernels.vq; tensors already validated there)
# --------------------------------------------------------------------------------------------------

import torch  # noqa: E402


def _launch_encode(x2, cb, cn, codes, words, bits: int, write: bool, fuse: bool):
    N = x2.shape[0]
    G, K, DG = cb.shape
    cfg = encode_config(x2.dtype, DG)
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), G)
    vq_encode_kernel[grid](
        x2, cb, cn, codes, words, N, K, DG,
        x2.stride(0), cb.stride(0), cb.stride(1), cn.stride(0), G,
        bits, G,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"],
        DOT_PRECISION=cfg["DOT_PRECISION"], WRITE_CODES=write, FUSE_PACK=fuse,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def vq_encode_triton(x2: torch.Tensor, cb: torch.Tensor, cn: torch.Tensor, out=None) -> torch.Tensor:
    """Codes ``[N, G]`` int32 for contiguous ``x2 [N, D]``, ``cb [G, K, DG]``, ``cn [G, K]`` fp32.

    ``out`` (contiguous int32 ``[N, G]``) is written if given (tests pass a poisoned one)."""
    N = x2.shape[0]
    G = cb.shape[0]
    codes = torch.empty(N, G, dtype=torch.int32, device=x2.device) if out is None else out
    if N:
        dummy = torch.zeros(1, dtype=torch.int32, device=x2.device)
        _launch_encode(x2, cb, cn, codes, dummy, 0, True, False)
    return codes


def encode_and_pack_triton(x2, cb, cn, bits: int, shape) -> torch.Tensor:
    """Fused encode + pack: the frame of the codes of ``x2`` (codes shape ``shape``), on the device."""
    words, H, P, numel = frame_buffers(shape, bits, x2.device)
    if numel:
        dummy = torch.zeros(1, dtype=torch.int32, device=x2.device)
        _launch_encode(x2, cb, cn, dummy, words[H // 4:], bits, False, True)
    return finish_frame(words, frame_header_bytes(shape, bits), H, P)


def vq_decode_triton(codes2: torch.Tensor, cb: torch.Tensor, out=None) -> torch.Tensor:
    """``out [N, G*DG]`` (codebook dtype) for ``codes2 [N, G]`` int32 (range-checked by the caller)."""
    N, G = codes2.shape
    _, K, DG = cb.shape
    if out is None:
        out = torch.empty(N, G * DG, dtype=cb.dtype, device=cb.device)
    if N:
        BLOCK_M = 32
        BLOCK_D = min(64, max(16, _next_pow2(DG)))
        vq_decode_kernel[(triton.cdiv(N, BLOCK_M), G)](
            codes2, cb, out, N, K, DG, codes2.stride(0), cb.stride(0), cb.stride(1), out.stride(0),
            BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)
    return out
