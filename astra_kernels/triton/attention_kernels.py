"""Fused mixed-precision attention kernel (flash-attention forward style).

One program owns ``BLOCK_M`` local queries of one (batch, query head). It streams over up to three key
segments with one online softmax (running max ``m``, running sum ``l``, accumulator ``acc``), never
materialising a ``[Tl, Tr]`` score matrix:

1. ``HAS_LOCAL``: per-token keys at the query positions (``TokenKeys`` whose ``pos`` is ``q_pos``):
   ``K, V [B, Hkv, Tl, Dh]``, optional padding bias;
2. one non-local segment in the ``R*`` arguments: per-token keys (``HAS_TOKENS``: ``TokenKeys``, read
   directly) or table keys (``HAS_TABLE``: ``TableKeys``, gathered by code from the per-layer tables
   inside the kernel, optionally rotated by their global position - ``ROPE``, rotate_half convention,
   both halves loaded); causal masking by global position, optional padding bias;
   or per-group table keys (``HAS_GTABLE``: ``GroupTableKeys``, codes ``[B, Tr, NG]``: the key and value
   are the fp32 sums of ``NG`` rows gathered from ``[NG, K, Hkv, Dh]`` tables, group stride
   ``stride_rkg`` / ``stride_rvg``, then the same optional RoPE);
3. ``HAS_COUNTS``: count keys (``CountKeys``): table rows gathered by code, ``log(count)`` added to the
   score, no position mask (count keys are seen by every query). Their tables are the ``RK, RV``
   arguments (batch stride 0).

The host launcher (:func:`attention_triton`) takes the same list of segments as the CPU path and maps
each to its slot; a new key form is one more flag, one more ``_attn_segment`` call and one slot.

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

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..aot import AotSpec
from ..attention import merge_attention
from ..interpreter import interpreting
from ..segments import CountKeys, GroupTableKeys, Segment, TableKeys, TokenKeys

LOG2E = 1.4426950408889634


@triton.jit
def _attn_segment(acc, m_i, l_i, q, q_pos, offs_d, d_mask,
                  k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                  codes_base, pos_base, bias_base, cos_ptr, sin_ptr, N, half, qk_scale, NG, stride_kg, stride_vg,
                  BLOCK_N: tl.constexpr, GATHER: tl.constexpr, ROPE: tl.constexpr, HAS_BIAS: tl.constexpr,
                  CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, GSUM: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start in range(0, N, BLOCK_N):
        offs_n = start + offs_n0
        n_mask = offs_n < N
        if GATHER and not GSUM:
            code = tl.load(codes_base + offs_n, mask=n_mask, other=0).to(tl.int64)
            row_k = code * stride_kn
            row_v = code * stride_vn
        else:
            row_k = offs_n.to(tl.int64) * stride_kn
            row_v = offs_n.to(tl.int64) * stride_vn
        kv_mask = n_mask[:, None] & d_mask[None, :]
        lo = offs_d < half
        partner = tl.where(lo, offs_d + half, offs_d - half)
        if GSUM:
            # per-group tables: K (V) is the fp32 sum of NG gathered rows, codes [N, NG] row-major
            k = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            k2 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            v = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            kg0 = k_base
            vg0 = v_base
            for gi in range(0, NG):
                code = tl.load(codes_base + offs_n.to(tl.int64) * NG + gi, mask=n_mask, other=0).to(tl.int64)
                kg = kg0 + code[:, None] * stride_kn
                k += tl.load(kg + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0).to(tl.float32)
                if ROPE:
                    k2 += tl.load(kg + partner[None, :] * stride_kd, mask=kv_mask, other=0.0).to(tl.float32)
                v += tl.load(vg0 + code[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask,
                             other=0.0).to(tl.float32)
                kg0 += stride_kg                                   # next group's table
                vg0 += stride_vg
        else:
            k = tl.load(k_base + row_k[:, None] + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
            if ROPE:
                k2 = tl.load(k_base + row_k[:, None] + partner[None, :] * stride_kd, mask=kv_mask, other=0.0)
        if ROPE or CAUSAL:
            kpos = tl.load(pos_base + offs_n, mask=n_mask, other=0)
        if ROPE:
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
        if not GSUM:
            v = tl.load(v_base + row_v[:, None] + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def mixed_attn_fwd_kernel(
    Q, K, V, O, LSE,
    QPOS, LBIAS,
    RK, RV, RCODES, RPOS, RBIAS,
    CCODES, CLOGC,
    COS, SIN,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_rkb, stride_rkh, stride_rkt, stride_rkd,
    stride_rvb, stride_rvh, stride_rvt, stride_rvd,
    stride_rkg, stride_rvg, NG,
    Hq, Tl, Tr, U, Dh, GROUP, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LOCAL: tl.constexpr, HAS_LBIAS: tl.constexpr,
    HAS_TOKENS: tl.constexpr, HAS_TABLE: tl.constexpr, ROPE: tl.constexpr, HAS_RBIAS: tl.constexpr,
    HAS_COUNTS: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, LOCAL_SORTED: tl.constexpr,
    HAS_GTABLE: tl.constexpr,
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
            QPOS, QPOS + b64 * Tl, LBIAS + b64 * Tl, COS, SIN, n_local, half, qk_scale, 1, 0, 0,
            BLOCK_N, False, False, HAS_LBIAS, CAUSAL, BLOCK_D, DOT_PREC, False)
    if HAS_TOKENS or HAS_TABLE or HAS_GTABLE:
        acc, m_i, l_i = _attn_segment(
            acc, m_i, l_i, q, q_pos, offs_d, d_mask,
            RK + b64 * stride_rkb + hk64 * stride_rkh, RV + b64 * stride_rvb + hk64 * stride_rvh,
            stride_rkt, stride_rkd, stride_rvt, stride_rvd,
            RCODES + b64 * Tr * NG, RPOS + b64 * Tr, RBIAS + b64 * Tr, COS, SIN, Tr, half, qk_scale,
            NG, stride_rkg, stride_rvg,
            BLOCK_N, HAS_TABLE or HAS_GTABLE, ROPE, HAS_RBIAS, CAUSAL, BLOCK_D, DOT_PREC, HAS_GTABLE)
    if HAS_COUNTS:
        # distinct codes: tables are RK/RV (stride_rkb = 0), bias = log(count), visible to every query
        acc, m_i, l_i = _attn_segment(
            acc, m_i, l_i, q, q_pos, offs_d, d_mask,
            RK + hk64 * stride_rkh, RV + hk64 * stride_rvh,
            stride_rkt, stride_rkd, stride_rvt, stride_rvd,
            CCODES + b64 * U, CCODES + b64 * U, CLOGC + b64 * U, COS, SIN, U, half, qk_scale, 1, 0, 0,
            BLOCK_N, True, False, True, False, BLOCK_D, DOT_PREC, False)

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

    16-bit: 128 x 32 (head_dim <= 64) / 128 x 16 (up to 128), 8 warps: 64x64 / 4-warp variants spill on
    the RoPE gather path, and 128 x 32 at head_dim 128 sits at the 255-register edge. head_dim 256: 64 x 16, one
    stage (128 x 16 in two stages needed 110,656 B of shared memory with RoPE tables, more than sm_86 / sm_89 give
    a block, 101,376, and spilled 33 KB on sm_80; 64 x 16 x 1 stage: 43 KB, no spills on sm_80 / 86 / 90).
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
    if block_d <= 128:
        return 128, 16, 8, 2, "tf32"
    return 64, 16, 8, 1, "tf32"


def attention_triton(q: torch.Tensor, q_pos: torch.Tensor, segments: Sequence[Segment], *, causal: bool,
                     scale: float, out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None):
    """Run the fused kernel over validated key segments; returns ``(out, lse)``.

    ``q [B, Hq, Tl, Dh]``, ``q_pos [B, Tl]`` int64; ``segments``: TokenKeys / TableKeys / CountKeys with
    a common kv head count (see ``astra_kernels.segments``). One launch takes at most one segment per
    slot (local tokens at the query positions; one per-token or table segment; one count segment that
    shares the table segment's tables); more segments mean more launches, merged by log-sum-exp.
    ``out`` ([B, Hq, Tl, Dh], q's dtype or float32: a partial result rounded once after its merge) / ``lse``
    ([B, Hq, Tl] float32, contiguous) may be given (tests pass poisoned buffers)."""
    B, Hq, Tl, Dh = q.shape
    if triton.next_power_of_2(Dh) > 256:
        raise ValueError(f"backend='triton' supports head_dim up to 256, got {Dh}")
    if B * Hq > 65535:
        raise ValueError(f"backend='triton' supports batch * query heads <= 65535 (grid axis 1), got {B * Hq}")
    if out is None:
        out = torch.empty(B, Hq, Tl, Dh, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(B, Hq, Tl, dtype=torch.float32, device=q.device)
    if tuple(out.shape) != (B, Hq, Tl, Dh) or out.dtype not in (q.dtype, torch.float32):
        raise ValueError(f"out must be [{B}, {Hq}, {Tl}, {Dh}] {q.dtype} or float32")
    if tuple(lse.shape) != (B, Hq, Tl) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be a contiguous float32 [{B}, {Hq}, {Tl}] tensor")
    for name, pos in [("q_pos", q_pos)] + [("kv_pos", s.pos) for s in segments if hasattr(s, "pos")]:
        if pos.numel():
            lo, hi = torch.aminmax(pos)
            if int(lo) < -2**31 or int(hi) >= 2**31:
                raise ValueError(f"backend='triton' needs {name} within int32, got [{int(lo)}, {int(hi)}]")
    launches = _launches(q_pos, segments) or [{}]
    _launch(q, q_pos, launches[0], causal, scale, out, lse)
    for slots in launches[1:]:
        o, l = _launch(q, q_pos, slots, causal, scale, torch.empty_like(out), torch.empty_like(lse))
        o, l = merge_attention(out, lse, o, l)
        out.copy_(o)
        lse.copy_(l)
    return out, lse


def _slot(seg: Segment, q_pos: torch.Tensor) -> str:
    if isinstance(seg, CountKeys):
        return "counts"
    if isinstance(seg, TokenKeys) and seg.pos is q_pos:
        return "local"
    return "remote"


def _fits(slots: dict, slot: str, seg: Segment) -> bool:
    """The count segment reads its tables through the remote slot's pointers (batch stride 0)."""
    counts = seg if slot == "counts" else slots.get("counts")
    remote = seg if slot == "remote" else slots.get("remote")
    if counts is None or remote is None:
        return True
    return isinstance(remote, TableKeys) and remote.k_table is counts.k_table and remote.v_table is counts.v_table


def _launches(q_pos: torch.Tensor, segments: Sequence[Segment]) -> List[dict]:
    """Group segments into launches of at most one segment per slot ("local", "remote", "counts")."""
    launches: List[dict] = []
    for seg in segments:
        slot = _slot(seg, q_pos)
        for slots in launches:
            if slot not in slots and _fits(slots, slot, seg):
                slots[slot] = seg
                break
        else:
            launches.append({slot: seg})
    return launches


def _bias(valid: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    if valid is None:
        return dummy
    return torch.zeros(valid.shape, dtype=torch.float32, device=valid.device).masked_fill_(~valid, float("-inf"))


def _table_strides(t: torch.Tensor) -> tuple:
    return (0, t.stride(1), t.stride(0), t.stride(2))  # [K, Hkv, Dh] seen as [B (stride 0), Hkv, K, Dh]


def _remote_args(slots: dict, q: torch.Tensor, dummy_i, dummy_f) -> dict:
    """Pointer / stride / size arguments of the remote (per-token or table) and count slots."""
    i32 = torch.int32
    remote, counts = slots.get("remote"), slots.get("counts")
    a = dict(RK=q, RV=q, rks=(0, 0, 0, 0), rvs=(0, 0, 0, 0), RCODES=dummy_i, RPOS=dummy_i, RBIAS=dummy_f, Tr=0,
             CCODES=dummy_i, CLOGC=dummy_f, U=0, COS=dummy_f, SIN=dummy_f, gs=(0, 0, 1))
    if isinstance(remote, TokenKeys):
        a.update(RK=remote.k, RV=remote.v, rks=remote.k.stride(), rvs=remote.v.stride(), Tr=remote.k.shape[2])
    tables = remote if isinstance(remote, TableKeys) else counts
    if tables is not None and not isinstance(remote, TokenKeys):
        a.update(RK=tables.k_table, RV=tables.v_table, rks=_table_strides(tables.k_table),
                 rvs=_table_strides(tables.v_table))
    if isinstance(remote, GroupTableKeys):  # [G, K, Hkv, Dh] seen as [B (stride 0), Hkv, K, Dh] + group stride
        kt, vt = remote.k_table, remote.v_table
        a.update(RK=kt, RV=vt, rks=(0, kt.stride(2), kt.stride(1), kt.stride(3)),
                 rvs=(0, vt.stride(2), vt.stride(1), vt.stride(3)), gs=(kt.stride(0), vt.stride(0), kt.shape[0]))
    if isinstance(remote, (TableKeys, GroupTableKeys)):
        a.update(RCODES=remote.codes.to(i32).contiguous(), Tr=remote.codes.shape[1])
        if remote.rope:
            a.update(COS=remote.rope_cos.to(torch.float32).contiguous(),
                     SIN=remote.rope_sin.to(torch.float32).contiguous())
    if remote is not None:
        a.update(RPOS=remote.pos.to(i32).contiguous(), RBIAS=_bias(remote.valid, dummy_f))
    if counts is not None:
        a.update(CCODES=counts.codes.to(i32).contiguous(), CLOGC=counts.log_counts.contiguous(),
                 U=counts.codes.shape[1])
    return a


def _launch(q, q_pos, slots: dict, causal: bool, scale: float, out, lse):
    dev = q.device
    B, Hq, Tl, Dh = q.shape
    dummy_i = torch.zeros(1, dtype=torch.int32, device=dev)
    dummy_f = torch.zeros(1, dtype=torch.float32, device=dev)
    local, remote = slots.get("local"), slots.get("remote")
    k = local.k if local is not None else q
    v = local.v if local is not None else q
    G = Hq // next(iter(slots.values())).heads()[1] if slots else 1
    lbias = _bias(local.valid, dummy_f) if local is not None else dummy_f
    r = _remote_args(slots, q, dummy_i, dummy_f)
    local_sorted = bool(causal and local is not None and Tl > 1 and bool((q_pos[:, 1:] > q_pos[:, :-1]).all()))
    BLOCK_D = max(16, triton.next_power_of_2(Dh))
    BM, BN, warps, stages, prec = _blocks(q.dtype, BLOCK_D, interpreting() and dev.type != "cuda")
    grid = (triton.cdiv(Tl, BM), B * Hq)
    mixed_attn_fwd_kernel[grid](
        q, k, v, out, lse,
        q_pos.to(torch.int32).contiguous(), lbias,
        r["RK"], r["RV"], r["RCODES"], r["RPOS"], r["RBIAS"],
        r["CCODES"], r["CLOGC"],
        r["COS"], r["SIN"],
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *r["rks"], *r["rvs"], *r["gs"],
        Hq, Tl, r["Tr"], r["U"], Dh, G, scale * LOG2E,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BLOCK_D,
        HAS_LOCAL=local is not None, HAS_LBIAS=lbias is not dummy_f,
        HAS_TOKENS=isinstance(remote, TokenKeys), HAS_TABLE=isinstance(remote, TableKeys),
        ROPE=isinstance(remote, (TableKeys, GroupTableKeys)) and remote.rope, HAS_RBIAS=r["RBIAS"] is not dummy_f,
        HAS_COUNTS="counts" in slots, CAUSAL=causal,
        DOT_PREC=prec, LOCAL_SORTED=local_sorted, HAS_GTABLE=isinstance(remote, GroupTableKeys),
        num_warps=warps, num_stages=stages,
    )
    return out, lse


# --------------------------------------------------------------------------------------- AOT specs
_PTR_ARGS = ("Q", "K", "V", "O", "LSE", "QPOS", "LBIAS", "RK", "RV", "RCODES", "RPOS", "RBIAS",
             "CCODES", "CLOGC", "COS", "SIN")
_STRIDE_ARGS = [f"stride_{t}{d}" for t in ("q", "k", "v", "o", "rk", "rv") for d in ("b", "h", "t", "d")]


def _spec(dt: str, Dh: int, *, remote: str, rope: bool, count: bool, causal: bool, lbias: bool, rbias: bool,
          label: str) -> AotSpec:
    block_d = max(16, 1 << (Dh - 1).bit_length())
    BM, BN, warps, stages, prec = _blocks(torch.float16 if dt != "fp32" else torch.float32, block_d, False)
    ptr = {"Q": dt, "K": dt, "V": dt, "O": dt, "LSE": "fp32", "QPOS": "i32", "LBIAS": "fp32",
           "RK": dt, "RV": dt, "RCODES": "i32", "RPOS": "i32", "RBIAS": "fp32",
           "CCODES": "i32", "CLOGC": "fp32", "COS": "fp32", "SIN": "fp32"}
    sig = {n: "*" + ptr[n] for n in _PTR_ARGS}
    for s in _STRIDE_ARGS:
        sig[s] = "i32"
    for s in ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_rkd", "stride_rvd"):
        sig[s] = "constexpr"  # unit inner stride, as in practice (contiguous head_dim)
    for s in ("stride_rkg", "stride_rvg", "NG", "Hq", "Tl", "Tr", "U", "Dh", "GROUP"):
        sig[s] = "i32"
    sig["qk_scale"] = "fp32"
    cx = dict(stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1, stride_rkd=1, stride_rvd=1,
              BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=block_d, HAS_LOCAL=True, HAS_LBIAS=lbias,
              HAS_TOKENS=remote == "tokens", HAS_TABLE=remote == "table",
              ROPE=rope, HAS_RBIAS=rbias, HAS_COUNTS=count, CAUSAL=causal,
              DOT_PREC=prec, LOCAL_SORTED=causal, HAS_GTABLE=remote == "gtable")
    for n in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "HAS_LOCAL", "HAS_LBIAS", "HAS_TOKENS", "HAS_TABLE", "ROPE",
              "HAS_RBIAS", "HAS_COUNTS", "CAUSAL", "DOT_PREC", "LOCAL_SORTED", "HAS_GTABLE"):
        sig[n] = "constexpr"
    return AotSpec(name="mixed_attn_fwd_kernel", fn=mixed_attn_fwd_kernel, signature=sig, constexprs=cx,
                   label=f"{dt} Dh={Dh} {label} BM={BM} BN={BN}", num_warps=warps, num_stages=stages,
                   expect_mma=True)


AOT_SPECS = [
    _spec("fp16", 64, remote="none", rope=False, count=True, causal=False, lbias=True, rbias=False,
          label="count+lmask"),
    _spec("fp16", 128, remote="table", rope=True, count=False, causal=True, lbias=True, rbias=True,
          label="table+rope causal masks"),
    _spec("bf16", 64, remote="table", rope=True, count=False, causal=True, lbias=True, rbias=True,
          label="table+rope causal masks"),
    _spec("fp16", 64, remote="table", rope=True, count=False, causal=True, lbias=False, rbias=False,
          label="table+rope causal"),
    _spec("fp16", 128, remote="table", rope=False, count=True, causal=True, lbias=True, rbias=True,
          label="count+straddle causal masks"),
    _spec("bf16", 128, remote="tokens", rope=False, count=False, causal=True, lbias=True, rbias=True,
          label="per-token causal masks"),
    _spec("fp16", 80, remote="tokens", rope=False, count=False, causal=False, lbias=False, rbias=False,
          label="per-token Dh pad"),
    _spec("fp32", 64, remote="table", rope=True, count=True, causal=True, lbias=True, rbias=True,
          label="all segments tf32x3"),
    _spec("fp32", 128, remote="table", rope=True, count=True, causal=True, lbias=True, rbias=True,
          label="all segments tf32x3"),
    _spec("fp16", 64, remote="gtable", rope=False, count=False, causal=True, lbias=True, rbias=True,
          label="group-table causal masks"),
    _spec("bf16", 128, remote="gtable", rope=True, count=False, causal=True, lbias=True, rbias=True,
          label="group-table+rope causal masks"),
    _spec("fp32", 64, remote="gtable", rope=True, count=False, causal=True, lbias=False, rbias=False,
          label="group-table+rope tf32x3"),
    _spec("bf16", 256, remote="table", rope=True, count=False, causal=True, lbias=False, rbias=False,
          label="table+rope causal, head_dim 256"),
]
