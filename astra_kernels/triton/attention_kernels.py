"""Fused mixed-precision attention kernel (flash-attention forward style).

One program owns ``BLOCK_M`` local queries of one (batch, query head). It streams over up to three key
segments with one online softmax (running max ``m``, running sum ``l``, accumulator ``acc``), never
materialising a ``[Tl, Tr]`` score matrix:

1. local keys ``K, V [B, Hkv, Tl, Dh]`` (full precision), positions = the queries' positions,
   optional padding bias;
2. per-token non-local keys, either read directly (``REMOTE_MODE=1``: ``k_hat, v_hat``) or gathered
   by code from the per-layer tables inside the kernel (``REMOTE_MODE=2``: ``k_table[code]``), with the
   gathered key optionally rotated by its global position (``ROPE``: rotate_half convention, both halves
   loaded); causal masking by global position, optional padding bias;
3. distinct codes (``HAS_COUNT``): table rows gathered by code, ``log(count)`` added to the score, no
   position mask (the host only puts here keys every query of the call sees).

Grouped-query attention maps query head ``h`` to kv head ``h // GROUP``. ``head_dim`` is padded to the
power of two ``BLOCK_D`` with masks. Scores use ``exp2`` with ``scale * log2(e)`` folded in. A row that
sees no key ends with ``l = 0``: it stores ``out = 0`` and ``lse = -inf``.

Causal with strictly increasing local positions (``LOCAL_SORTED``, checked by the host - the usual
contiguous chunk) stops the local loop at the end of the query block, the standard causal skip; with
arbitrary positions every block is visited and masked by position.

Positions, codes, biases are passed as contiguous ``[B, T]`` int32 / float32 arrays (the host
normalises them); big tensors take explicit strides.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ..aot import AotSpec

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _attn_segment(acc, m_i, l_i, q, q_pos, offs_d, d_mask,
                  k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                  codes_base, pos_base, bias_base, cos_ptr, sin_ptr, N, half, qk_scale,
                  BLOCK_N: tl.constexpr, GATHER: tl.constexpr, ROPE: tl.constexpr, HAS_BIAS: tl.constexpr,
                  CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start in range(0, N, BLOCK_N):
        offs_n = start + offs_n0
        n_mask = offs_n < N
        if GATHER:
            code = tl.load(codes_base + offs_n, mask=n_mask, other=0).to(tl.int64)
            row_k = code * stride_kn
            row_v = code * stride_vn
        else:
            row_k = offs_n.to(tl.int64) * stride_kn
            row_v = offs_n.to(tl.int64) * stride_vn
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + row_k[:, None] + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        if ROPE or CAUSAL:
            kpos = tl.load(pos_base + offs_n, mask=n_mask, other=0)
        if ROPE:
            lo = offs_d < half
            partner = tl.where(lo, offs_d + half, offs_d - half)
            k2 = tl.load(k_base + row_k[:, None] + partner[None, :] * stride_kd, mask=kv_mask, other=0.0)
            sgn = tl.where(lo, -1.0, 1.0)
            rp = kpos.to(tl.int64) * (2 * half)
            cs = tl.load(cos_ptr + rp[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            sn = tl.load(sin_ptr + rp[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            k = k.to(tl.float32) * cs + k2.to(tl.float32) * sgn[None, :] * sn
        k = k.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        if HAS_BIAS:
            b = tl.load(bias_base + offs_n, mask=n_mask, other=float("-inf"))
            s = s + b[None, :] * 1.4426950408889634
        if CAUSAL:
            s = tl.where(kpos[None, :] <= q_pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + row_v[:, None] + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def mixed_attn_fwd_kernel(
    Q, K, V, O, LSE,
    QPOS, LBIAS,
    RK, RV, RCODES, RPOS, RBIAS,
    UCODES, UBIAS,
    COS, SIN,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_rkb, stride_rkh, stride_rkt, stride_rkd,
    stride_rvb, stride_rvh, stride_rvt, stride_rvd,
    Hq, Tl, Tr, U, Dh, GROUP, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LOCAL: tl.constexpr, HAS_LBIAS: tl.constexpr,
    REMOTE_MODE: tl.constexpr, ROPE: tl.constexpr, HAS_RBIAS: tl.constexpr,
    HAS_COUNT: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, LOCAL_SORTED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // GROUP
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < Tl
    d_mask = offs_d < Dh
    q_ptrs = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qt \
        + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = tl.load(QPOS + b64 * Tl + offs_m, mask=m_mask, other=0)
    half = Dh // 2

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if HAS_LOCAL:
        n_local = Tl
        if CAUSAL and LOCAL_SORTED:
            # positions strictly increase along the local axis: keys past this query block come later
            # than every query in it, so the loop stops at the block's end (the usual causal skip)
            n_local = tl.minimum(Tl, (pid_m + 1) * BLOCK_M)
        acc, m_i, l_i = _attn_segment(
            acc, m_i, l_i, q, q_pos, offs_d, d_mask,
            K + b64 * stride_kb + hk64 * stride_kh, V + b64 * stride_vb + hk64 * stride_vh,
            stride_kt, stride_kd, stride_vt, stride_vd,
            QPOS, QPOS + b64 * Tl, LBIAS + b64 * Tl, COS, SIN, n_local, half, qk_scale,
            BLOCK_N, False, False, HAS_LBIAS, CAUSAL, BLOCK_D, DOT_PREC)
    if REMOTE_MODE != 0:
        acc, m_i, l_i = _attn_segment(
            acc, m_i, l_i, q, q_pos, offs_d, d_mask,
            RK + b64 * stride_rkb + hk64 * stride_rkh, RV + b64 * stride_rvb + hk64 * stride_rvh,
            stride_rkt, stride_rkd, stride_rvt, stride_rvd,
            RCODES + b64 * Tr, RPOS + b64 * Tr, RBIAS + b64 * Tr, COS, SIN, Tr, half, qk_scale,
            BLOCK_N, REMOTE_MODE == 2, ROPE, HAS_RBIAS, CAUSAL, BLOCK_D, DOT_PREC)
    if HAS_COUNT:
        # distinct codes: tables are RK/RV (stride_rkb = 0), bias = log(count), visible to every query
        acc, m_i, l_i = _attn_segment(
            acc, m_i, l_i, q, q_pos, offs_d, d_mask,
            RK + hk64 * stride_rkh, RV + hk64 * stride_rvh,
            stride_rkt, stride_rkd, stride_rvt, stride_rvd,
            UCODES + b64 * U, UCODES + b64 * U, UBIAS + b64 * U, COS, SIN, U, half, qk_scale,
            BLOCK_N, True, False, True, False, BLOCK_D, DOT_PREC)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None].to(tl.int64) * stride_ot \
        + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * Tl + offs_m, lse, mask=m_mask)


# -------------------------------------------------------------------------------------------- host
def _blocks(dtype: torch.dtype, block_d: int, interpret: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, DOT_PREC) for a config (from the AOT report).

    16-bit: 128 x 32 (head_dim <= 64) / 128 x 16 (larger), 8 warps: 64x64 / 4-warp variants spill on
    the RoPE gather path, and 128 x 32 at head_dim 128 sits at the 255-register edge.
    fp32: ``tf32x3`` dots (three TF32 MMAs, ~fp32 accuracy, on tensor cores); plain ``ieee`` FMA dots
    spill at every block shape that was tried.
    """
    if interpret:
        return 16, 16, 4, 1, "ieee"
    if dtype == torch.float32:
        if block_d <= 64:
            return 64, 16, 4, 2, "tf32x3"
        return 16, 16, 4, 2, "tf32x3"
    if block_d <= 64:
        return 128, 32, 8, 2, "tf32"
    return 128, 16, 8, 2, "tf32"


def mixed_attention_triton(plan, out=None, lse=None):
    """Run the fused kernel for a validated ``astra_kernels.attention._Plan``; returns (out, lse).

    ``out`` ([B, Hq, Tl, Dh], q's dtype) / ``lse`` ([B, Hq, Tl] float32, contiguous) may be given
    (tests pass poisoned buffers)."""
    from .._dispatch import interpreting

    q = plan.q
    dev = q.device
    B, Hq, Tl, Dh = plan.B, plan.Hq, plan.Tl, plan.Dh
    G = Hq // plan.Hkv
    BLOCK_D = max(16, triton.next_power_of_2(Dh))
    if BLOCK_D > 256:
        raise ValueError(f"backend='triton' supports head_dim up to 256, got {Dh}")
    if out is None:
        out = torch.empty(B, Hq, Tl, Dh, dtype=q.dtype, device=dev)
    if lse is None:
        lse = torch.empty(B, Hq, Tl, dtype=torch.float32, device=dev)
    if tuple(out.shape) != (B, Hq, Tl, Dh) or out.dtype != q.dtype:
        raise ValueError(f"out must be [{B}, {Hq}, {Tl}, {Dh}] {q.dtype}")
    if tuple(lse.shape) != (B, Hq, Tl) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be a contiguous float32 [{B}, {Hq}, {Tl}] tensor")
    i32 = torch.int32
    dummy_i = torch.zeros(1, dtype=i32, device=dev)
    dummy_f = torch.zeros(1, dtype=torch.float32, device=dev)
    for name, pos in (("q_pos", plan.q_pos), ("kv_pos", plan.r_pos)):
        if pos is not None and pos.numel():
            lo, hi = torch.aminmax(pos)
            if int(lo) < -2**31 or int(hi) >= 2**31:
                raise ValueError(f"backend='triton' needs {name} within int32, got [{int(lo)}, {int(hi)}]")
    qpos = plan.q_pos.to(i32).contiguous()

    has_local = plan.k is not None
    k = plan.k if has_local else q
    v = plan.v if has_local else q
    lbias = dummy_f
    if has_local and plan.l_valid is not None:
        lbias = torch.zeros(B, Tl, dtype=torch.float32, device=dev).masked_fill_(~plan.l_valid, float("-inf"))

    mode = {"none": 0, "direct": 1, "gather": 2}[plan.r_mode]
    has_count = plan.u_codes is not None
    Tr = 0
    rcodes, rpos, rbias = dummy_i, dummy_i, dummy_f
    if mode == 1:
        rk, rv = plan.r_k, plan.r_v
        rks, rvs = rk.stride(), rv.stride()
        Tr = rk.shape[2]
    elif mode == 2 or has_count:
        rk, rv = plan.r_k, plan.r_v  # tables [K, Hkv, Dh]
        rks = (0, rk.stride(1), rk.stride(0), rk.stride(2))
        rvs = (0, rv.stride(1), rv.stride(0), rv.stride(2))
        if mode == 2:
            rcodes = plan.r_codes.to(i32).contiguous()
            Tr = rcodes.shape[1]
    else:
        rk, rv = q, q
        rks = rvs = (0, 0, 0, 0)
    if mode != 0:
        if plan.r_pos is not None:
            rpos = plan.r_pos.to(i32).contiguous()
        if plan.r_valid is not None:
            rbias = torch.zeros(B, Tr, dtype=torch.float32, device=dev).masked_fill_(~plan.r_valid, float("-inf"))
    rope = mode == 2 and plan.rope_cos is not None
    cos, sin = dummy_f, dummy_f
    if rope:
        cos = plan.rope_cos.to(torch.float32).contiguous()
        sin = plan.rope_sin.to(torch.float32).contiguous()
    ucodes, ubias, U = dummy_i, dummy_f, 0
    if has_count:
        ucodes = plan.u_codes.to(i32).contiguous()
        ubias = plan.u_logc.to(torch.float32).contiguous()
        U = ucodes.shape[1]

    local_sorted = bool(plan.causal and has_local and Tl > 1
                        and bool((plan.q_pos[:, 1:] > plan.q_pos[:, :-1]).all()))
    interp = interpreting() and dev.type != "cuda"
    BM, BN, warps, stages, prec = _blocks(q.dtype, BLOCK_D, interp)
    if B * Hq > 65535:
        raise ValueError(f"backend='triton' supports batch * query heads <= 65535 (grid axis 1), got {B * Hq}")
    grid = (triton.cdiv(Tl, BM), B * Hq)
    mixed_attn_fwd_kernel[grid](
        q, k, v, out, lse,
        qpos, lbias,
        rk, rv, rcodes, rpos, rbias,
        ucodes, ubias,
        cos, sin,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *rks, *rvs,
        Hq, Tl, Tr, U, Dh, G, plan.scale * LOG2E,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BLOCK_D,
        HAS_LOCAL=has_local, HAS_LBIAS=lbias is not dummy_f,
        REMOTE_MODE=mode, ROPE=rope, HAS_RBIAS=rbias is not dummy_f,
        HAS_COUNT=has_count, CAUSAL=plan.causal,
        DOT_PREC=prec, LOCAL_SORTED=local_sorted,
        num_warps=warps, num_stages=stages,
    )
    return out, lse


# --------------------------------------------------------------------------------------- AOT specs
_PTR_ARGS = ("Q", "K", "V", "O", "LSE", "QPOS", "LBIAS", "RK", "RV", "RCODES", "RPOS", "RBIAS",
             "UCODES", "UBIAS", "COS", "SIN")
_STRIDE_ARGS = [f"stride_{t}{d}" for t in ("q", "k", "v", "o", "rk", "rv") for d in ("b", "h", "t", "d")]


def _spec(dt: str, Dh: int, *, mode: int, rope: bool, count: bool, causal: bool, lbias: bool, rbias: bool,
          label: str) -> AotSpec:
    block_d = max(16, 1 << (Dh - 1).bit_length())
    BM, BN, warps, stages, prec = _blocks(torch.float16 if dt != "fp32" else torch.float32, block_d, False)
    ptr = {"Q": dt, "K": dt, "V": dt, "O": dt, "LSE": "fp32", "QPOS": "i32", "LBIAS": "fp32",
           "RK": dt, "RV": dt, "RCODES": "i32", "RPOS": "i32", "RBIAS": "fp32",
           "UCODES": "i32", "UBIAS": "fp32", "COS": "fp32", "SIN": "fp32"}
    sig = {n: "*" + ptr[n] for n in _PTR_ARGS}
    for s in _STRIDE_ARGS:
        sig[s] = "i32"
    for s in ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_rkd", "stride_rvd"):
        sig[s] = "constexpr"  # unit inner stride, as in practice (contiguous head_dim)
    for s in ("Hq", "Tl", "Tr", "U", "Dh", "GROUP"):
        sig[s] = "i32"
    sig["qk_scale"] = "fp32"
    cx = dict(stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1, stride_rkd=1, stride_rvd=1,
              BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=block_d, HAS_LOCAL=True, HAS_LBIAS=lbias, REMOTE_MODE=mode,
              ROPE=rope, HAS_RBIAS=rbias, HAS_COUNT=count, CAUSAL=causal,
              DOT_PREC=prec, LOCAL_SORTED=causal)
    for n in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "HAS_LOCAL", "HAS_LBIAS", "REMOTE_MODE", "ROPE", "HAS_RBIAS",
              "HAS_COUNT", "CAUSAL", "DOT_PREC", "LOCAL_SORTED"):
        sig[n] = "constexpr"
    return AotSpec(name="mixed_attn_fwd_kernel", fn=mixed_attn_fwd_kernel, signature=sig, constexprs=cx,
                   label=f"{dt} Dh={Dh} {label} BM={BM} BN={BN}", num_warps=warps, num_stages=stages,
                   expect_mma=True)


AOT_SPECS = [
    _spec("fp16", 64, mode=0, rope=False, count=True, causal=False, lbias=True, rbias=False, label="count+lmask"),
    _spec("fp16", 128, mode=2, rope=True, count=False, causal=True, lbias=True, rbias=True,
          label="table+rope causal masks"),
    _spec("bf16", 64, mode=2, rope=True, count=False, causal=True, lbias=True, rbias=True,
          label="table+rope causal masks"),
    _spec("fp16", 64, mode=2, rope=True, count=False, causal=True, lbias=False, rbias=False, label="table+rope causal"),
    _spec("fp16", 128, mode=2, rope=False, count=True, causal=True, lbias=True, rbias=True,
          label="count+straddle causal masks"),
    _spec("bf16", 128, mode=1, rope=False, count=False, causal=True, lbias=True, rbias=True, label="per-token causal masks"),
    _spec("fp16", 80, mode=1, rope=False, count=False, causal=False, lbias=False, rbias=False, label="per-token Dh pad"),
    _spec("fp32", 64, mode=2, rope=True, count=True, causal=True, lbias=True, rbias=True, label="all segments tf32x3"),
    _spec("fp32", 128, mode=2, rope=True, count=True, causal=True, lbias=True, rbias=True, label="all segments tf32x3"),
]
