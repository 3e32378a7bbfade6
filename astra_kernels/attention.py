"""Mixed-precision attention (ASTRA): local full-precision tokens + non-local tokens known by VQ codes.

A device holds ``Tl`` local tokens (queries, keys and values in full precision) and the codes of ``Tr``
non-local tokens. Its output is ordinary softmax attention of the local queries over the union of the
local keys and the non-local keys reconstructed from the codes::

    out = softmax(scale * q [k ; k_hat]^T + mask) [v ; v_hat]

Masking is by *global token position*: with ``causal=True`` a query at position ``p`` sees a key at
position ``p'`` only if ``p' <= p``; ``local_mask`` / ``remote_mask`` (True = attend) remove keys.

Non-local K/V come in one of two forms:

* **per token** - ``k_hat, v_hat`` ``[B, Hkv, Tr, Dh]`` (any VQ group count G; RoPE already applied);
* **table** - ``codes [B, Tr]`` + per-layer ``k_table, v_table [K, Hkv, Dh]`` (exact for G = 1: a
  non-local token's K/V is a fixed function of its codeword). With ``rope_cos/rope_sin`` the gathered
  key is rotated by the token's global position ``kv_pos`` (HF Llama ``rotate_half`` convention).
  Without RoPE, identical codes give identical keys, so attention can run over the *distinct* codes
  once, each weighted by its count (``log(count)`` added to its score) - exactly equal, and the
  non-local cost no longer grows with ``Tr`` (``count_weighted``).

Count weighting with masks: a code's count only includes the keys visible to the query. Non-local keys
visible to every local query (before all of them, or ``causal=False``) are counted once per batch row;
keys visible to none are dropped; keys visible to only some queries (possible only when positions
interleave) stay per-token, with their positions. With contiguous sequence-parallel chunks the last set
is empty. This is exact for any positions.

All-masked convention: a query that sees no key at all gets ``out = 0`` and ``lse = -inf``.
:func:`merge_attention` understands it, so ``merge(local-only pass, non-local-only pass)`` equals the
single pass (e.g. to overlap local attention with the arrival of codes; see ``include_local``).

Backends (``astra_kernels._dispatch``): ``"triton"`` - one fused flash-attention-style kernel
(``astra_kernels/triton/attention_kernels.py``); ``"torch"`` - the CPU path below: one attention per
key segment (local keys, distinct-code keys with ``log(count)`` bias, per-token non-local keys) through
torch's fused CPU flash-attention kernel (it returns the log-sum-exp; an explicit matmul route is the
fallback), merged by log-sum-exp, so keys are never concatenated and unmasked segments run unmasked.

Precision: fp16/bf16 inputs are computed in fp32 on the CPU path (fp16-rounded output); the Triton
kernel feeds fp16/bf16 to tensor cores with fp32 accumulation, and fp32 inputs use ``tf32x3`` dots on a
GPU (about fp32 accuracy) and exact fp32 in the interpreter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from ._dispatch import resolve_backend

__all__ = ["mixed_attention", "mixed_attention_reference", "merge_attention"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------- validation
def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    _need(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _need(t.dim() == ndim, f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    _need(t.dtype in _FLOATS, f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")


def _check_finite(name: str, t: Optional[torch.Tensor]) -> None:
    # aminmax propagates NaN and shows +-inf: one reduction pass, ~8x cheaper than isfinite().all()
    if t is not None and t.numel():
        lo, hi = torch.aminmax(t)
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            raise ValueError(f"{name} contains non-finite values (inf/nan)")


def _positions(name: str, pos, B: int, T: int, default_start: int, device) -> torch.Tensor:
    """Normalise a [T] / [B, T] integer position tensor to int64 [B, T]."""
    if pos is None:
        return (torch.arange(T, device=device, dtype=torch.int64) + default_start).expand(B, T)
    _need(isinstance(pos, torch.Tensor), f"{name} must be a torch.Tensor")
    _need(not pos.dtype.is_floating_point and not pos.dtype.is_complex and pos.dtype != torch.bool,
          f"{name} must be an integer tensor, got {pos.dtype}")
    if pos.dim() == 1:
        _need(pos.shape[0] == T, f"{name} has length {pos.shape[0]}, expected {T}")
        pos = pos.expand(B, T)
    else:
        _need(pos.dim() == 2 and tuple(pos.shape) == (B, T),
              f"{name} must have shape [{T}] or [{B}, {T}], got {tuple(pos.shape)}")
    return pos.to(torch.int64)


def _mask(name: str, m, B: int, T: int) -> Optional[torch.Tensor]:
    if m is None:
        return None
    _need(isinstance(m, torch.Tensor), f"{name} must be a torch.Tensor")
    _need(m.dtype == torch.bool, f"{name} must be a bool tensor (True = attend), got {m.dtype}")
    _need(tuple(m.shape) == (B, T), f"{name} must have shape [{B}, {T}], got {tuple(m.shape)}")
    return m


@dataclass
class _Plan:
    """Validated, normalised description of one call, shared by every backend."""

    q: torch.Tensor                     # [B, Hq, Tl, Dh]
    B: int
    Hq: int
    Hkv: int
    Tl: int
    Dh: int
    scale: float
    causal: bool
    q_pos: torch.Tensor                 # [B, Tl] int64
    # local segment (None when include_local=False)
    k: Optional[torch.Tensor]
    v: Optional[torch.Tensor]
    l_valid: Optional[torch.Tensor]     # [B, Tl] bool or None (= all)
    # per-token remote segment: mode "none" | "direct" | "gather"
    r_mode: str
    r_k: Optional[torch.Tensor]         # direct: [B, Hkv, S, Dh]; gather: k_table [K, Hkv, Dh]
    r_v: Optional[torch.Tensor]
    r_codes: Optional[torch.Tensor]     # gather: [B, S] int64
    r_pos: Optional[torch.Tensor]       # [B, S] int64
    r_valid: Optional[torch.Tensor]     # [B, S] bool or None
    rope_cos: Optional[torch.Tensor]    # [P, Dh] (gather + RoPE only)
    rope_sin: Optional[torch.Tensor]
    # count segment (distinct codes, visible to every query): tables are r_k / r_v
    u_codes: Optional[torch.Tensor]     # [B, U] int64
    u_logc: Optional[torch.Tensor]      # [B, U] float32 log(count), -inf = padding


def _plan(q, k, v, *, k_hat, v_hat, codes, k_table, v_table, rope_cos, rope_sin, q_pos, kv_pos, causal,
          local_mask, remote_mask, count_weighted, scale, include_local, validate) -> _Plan:
    _check_float("q", q, 4)
    B, Hq, Tl, Dh = q.shape
    _need(Dh >= 1, "head_dim must be >= 1")
    if include_local:
        _need(k is not None and v is not None, "k and v (local keys/values) are required unless include_local=False")
    if k is not None or v is not None:
        _need(k is not None and v is not None, "give both k and v, or neither")
        _check_float("k", k, 4)
        _check_float("v", v, 4)
        _need(k.dtype == q.dtype and v.dtype == q.dtype,
              f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        _need(tuple(k.shape) == tuple(v.shape), f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
        _need(k.shape[0] == B and k.shape[2] == Tl and k.shape[3] == Dh,
              f"k/v must have shape [B={B}, Hkv, Tl={Tl}, Dh={Dh}], got {tuple(k.shape)}")
    per_token = k_hat is not None or v_hat is not None
    table = codes is not None or k_table is not None or v_table is not None
    _need(not (per_token and table),
          "give the non-local tokens either per token (k_hat, v_hat) or by table (codes, k_table, v_table), not both")
    Hkv = None
    if k is not None:
        Hkv = k.shape[1]
    rope = rope_cos is not None or rope_sin is not None
    if per_token:
        _need(k_hat is not None and v_hat is not None, "per-token mode needs both k_hat and v_hat")
        _check_float("k_hat", k_hat, 4)
        _check_float("v_hat", v_hat, 4)
        _need(tuple(k_hat.shape) == tuple(v_hat.shape),
              f"k_hat and v_hat shapes differ: {tuple(k_hat.shape)} vs {tuple(v_hat.shape)}")
        _need(k_hat.shape[0] == B and k_hat.shape[3] == Dh,
              f"k_hat/v_hat must have shape [B={B}, Hkv, Tr, Dh={Dh}], got {tuple(k_hat.shape)}")
        Hkv = k_hat.shape[1] if Hkv is None else Hkv
        _need(k_hat.shape[1] == Hkv, f"k_hat has {k_hat.shape[1]} kv heads, local k has {Hkv}")
        _need(not rope, "rope_cos/rope_sin apply to table mode only (per-token k_hat must already be rotated)")
        Tr = k_hat.shape[2]
    elif table:
        _need(codes is not None and k_table is not None and v_table is not None,
              "table mode needs codes, k_table and v_table")
        _check_float("k_table", k_table, 3)
        _check_float("v_table", v_table, 3)
        _need(tuple(k_table.shape) == tuple(v_table.shape),
              f"k_table and v_table shapes differ: {tuple(k_table.shape)} vs {tuple(v_table.shape)}")
        Kc = k_table.shape[0]
        _need(k_table.shape[2] == Dh, f"k_table/v_table must have shape [K, Hkv, Dh={Dh}], got {tuple(k_table.shape)}")
        Hkv = k_table.shape[1] if Hkv is None else Hkv
        _need(k_table.shape[1] == Hkv, f"k_table has {k_table.shape[1]} kv heads, local k has {Hkv}")
        _need(isinstance(codes, torch.Tensor) and not codes.dtype.is_floating_point and codes.dtype != torch.bool
              and not codes.dtype.is_complex, f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes))}")
        _need(codes.dim() == 2 and codes.shape[0] == B, f"codes must have shape [B={B}, Tr], got {tuple(codes.shape)}")
        Tr = codes.shape[1]
        _need(Kc >= 1 or Tr == 0, "k_table is empty but codes are given")
        if validate and codes.numel():
            lo, hi = int(codes.min()), int(codes.max())
            _need(lo >= 0 and hi < Kc, f"codes out of table range [0, {Kc}): min {lo}, max {hi}")
        if rope:
            _need(rope_cos is not None and rope_sin is not None, "RoPE needs both rope_cos and rope_sin")
            _check_float("rope_cos", rope_cos, 2)
            _check_float("rope_sin", rope_sin, 2)
            _need(tuple(rope_cos.shape) == tuple(rope_sin.shape) and rope_cos.shape[1] == Dh,
                  f"rope_cos/rope_sin must both have shape [P, Dh={Dh}], got {tuple(rope_cos.shape)}, {tuple(rope_sin.shape)}")
            _need(Dh % 2 == 0, f"RoPE needs an even head_dim, got {Dh}")
    else:
        _need(rope_cos is None and rope_sin is None, "rope_cos/rope_sin given without table-mode non-local tokens")
        _need(kv_pos is None and remote_mask is None,
              "kv_pos/remote_mask given without non-local tokens (k_hat/v_hat or codes/k_table/v_table)")
        Tr = 0
    _need(Hkv is not None, "no keys at all: include_local=False needs non-local tokens")
    _need(Hkv >= 1 and Hq % Hkv == 0, f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")

    if count_weighted not in ("auto", True, False):
        raise ValueError(f"count_weighted must be 'auto', True or False, got {count_weighted!r}")
    if count_weighted is True:
        _need(table, "count_weighted=True needs table mode (codes, k_table, v_table)")
        _need(not rope, "count_weighted=True is invalid with RoPE: rotated keys depend on position, not only on the code")
    use_count = table and not rope and count_weighted in ("auto", True)

    if scale is None:
        scale = 1.0 / math.sqrt(Dh)
    scale = float(scale)
    _need(math.isfinite(scale), f"scale must be finite, got {scale}")

    dev = q.device
    qp = _positions("q_pos", q_pos, B, Tl, 0, dev)
    kp = _positions("kv_pos", kv_pos, B, Tr, Tl, dev) if Tr or kv_pos is not None else None
    lm = _mask("local_mask", local_mask, B, Tl)
    rm = _mask("remote_mask", remote_mask, B, Tr) if (per_token or table) else None

    if validate:
        _check_finite("q", q)
        _check_finite("k", k)
        _check_finite("v", v)
        _check_finite("k_hat", k_hat)
        _check_finite("v_hat", v_hat)
        _check_finite("k_table", k_table)
        _check_finite("v_table", v_table)
        _check_finite("rope_cos", rope_cos)
        _check_finite("rope_sin", rope_sin)
        if rope and Tr:
            P = rope_cos.shape[0]
            lo, hi = int(kp.min()), int(kp.max())
            _need(lo >= 0 and hi < P, f"kv_pos out of RoPE table range [0, {P}): min {lo}, max {hi}")

    plan = _Plan(q=q, B=B, Hq=Hq, Hkv=Hkv, Tl=Tl, Dh=Dh, scale=scale, causal=bool(causal), q_pos=qp,
                 k=k if include_local else None, v=v if include_local else None,
                 l_valid=lm if include_local else None,
                 r_mode="none", r_k=None, r_v=None, r_codes=None, r_pos=None, r_valid=None,
                 rope_cos=None, rope_sin=None, u_codes=None, u_logc=None)
    if Tr == 0 or Tl == 0:
        return plan
    if per_token:
        plan.r_mode, plan.r_k, plan.r_v, plan.r_pos, plan.r_valid = "direct", k_hat, v_hat, kp, rm
        if plan.causal:
            keep = _causal_keep(plan, kp, rm)
            if keep is not None:
                order, plan.r_valid = keep
                idx = order.view(B, 1, -1, 1).expand(B, Hkv, order.shape[1], Dh)
                plan.r_k, plan.r_v = k_hat.gather(2, idx), v_hat.gather(2, idx)
                plan.r_pos = kp.gather(1, order)
                if plan.r_k.shape[2] == 0:
                    plan.r_mode = "none"
        return plan
    codes = codes.to(torch.int64)
    plan.r_k, plan.r_v = k_table, v_table
    if not use_count:
        plan.r_mode, plan.r_codes, plan.r_pos, plan.r_valid = "gather", codes, kp, rm
        if rope:
            plan.rope_cos, plan.rope_sin = rope_cos, rope_sin
        if plan.causal:
            keep = _causal_keep(plan, kp, rm)
            if keep is not None:
                order, plan.r_valid = keep
                plan.r_codes, plan.r_pos = codes.gather(1, order), kp.gather(1, order)
                if order.shape[1] == 0:
                    plan.r_mode = "none"
        return plan
    _split_counts(plan, codes, kp, rm, k_table.shape[0])
    return plan


def _compact(keep: torch.Tensor):
    """Per row, the indices of the kept entries first (stable), cut to the longest row's count.
    Returns (order [B, S] int64, valid [B, S] bool)."""
    S = int(keep.sum(dim=1).max()) if keep.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :S]
    return order, keep.gather(1, order)


def _causal_keep(plan: _Plan, kp, rm):
    """Causal: drop the non-local keys no local query can see (after the last query, or padded).
    None when nothing would be dropped."""
    keep = kp <= plan.q_pos.max(dim=1, keepdim=True).values
    if rm is not None:
        keep = keep & rm
    if bool(keep.all()):
        return None
    return _compact(keep)


def _split_counts(plan: _Plan, codes, kp, rm, Kc: int) -> None:
    """Count-weighted decomposition (see module doc): distinct codes of the keys every query sees,
    per-token keys for those only some queries see, drop the rest."""
    B = plan.B
    valid = torch.ones_like(codes, dtype=torch.bool) if rm is None else rm
    if plan.causal:
        qmin = plan.q_pos.min(dim=1, keepdim=True).values
        qmax = plan.q_pos.max(dim=1, keepdim=True).values
        always = valid & (kp <= qmin)
        some = valid & (kp <= qmax) & ~always
    else:
        always, some = valid, None
    # per-row bincount of the always-visible keys
    counts = torch.zeros(B, Kc, dtype=torch.float32, device=codes.device)
    counts.scatter_add_(1, codes, always.to(torch.float32))
    present = counts > 0
    U = int(present.sum(dim=1).max())
    if U:
        if B == 1:
            ucodes = present[0].nonzero().reshape(1, -1)
        else:
            ucodes = torch.argsort((~present).to(torch.int8), dim=1, stable=True)[:, :U]
        plan.u_codes = ucodes
        plan.u_logc = counts.gather(1, ucodes).log()  # log 0 = -inf pads rows with fewer codes
    if some is not None and bool(some.any()):
        order, plan.r_valid = _compact(some)
        plan.r_mode = "gather"
        plan.r_codes = codes.gather(1, order)
        plan.r_pos = kp.gather(1, order)


# ---------------------------------------------------------------------------------------- public API
def mixed_attention(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    *,
    k_hat: Optional[torch.Tensor] = None,
    v_hat: Optional[torch.Tensor] = None,
    codes: Optional[torch.Tensor] = None,
    k_table: Optional[torch.Tensor] = None,
    v_table: Optional[torch.Tensor] = None,
    rope_cos: Optional[torch.Tensor] = None,
    rope_sin: Optional[torch.Tensor] = None,
    q_pos: Optional[torch.Tensor] = None,
    kv_pos: Optional[torch.Tensor] = None,
    causal: bool = False,
    local_mask: Optional[torch.Tensor] = None,
    remote_mask: Optional[torch.Tensor] = None,
    count_weighted: Union[str, bool] = "auto",
    scale: Optional[float] = None,
    return_lse: bool = False,
    include_local: bool = True,
    validate: bool = True,
    backend: str = "auto",
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Softmax attention of local queries over local full-precision + non-local quantized keys.

    Args:
        q: ``[B, Hq, Tl, Dh]`` local queries (RoPE, if any, already applied).
        k, v: ``[B, Hkv, Tl, Dh]`` local keys/values in q's dtype (RoPE already applied);
            ``Hq % Hkv == 0`` (grouped-query: query head ``h`` uses kv head ``h // (Hq // Hkv)``).
            May be None with ``include_local=False``.
        k_hat, v_hat: per-token mode, ``[B, Hkv, Tr, Dh]`` non-local K/V (any float dtype; RoPE applied).
        codes: table mode, ``[B, Tr]`` integer codes in ``[0, K)``.
        k_table, v_table: table mode, ``[K, Hkv, Dh]`` per-layer K/V of every codeword.
        rope_cos, rope_sin: table mode with RoPE, ``[P, Dh]``; gathered keys become
            ``k * cos[kv_pos] + rotate_half(k) * sin[kv_pos]`` (HF Llama convention).
        q_pos: ``[Tl]`` or ``[B, Tl]`` global positions of the local tokens (default ``arange(Tl)``).
        kv_pos: ``[Tr]`` or ``[B, Tr]`` global positions of the non-local tokens (default ``Tl + arange(Tr)``).
        causal: a query sees a key only if ``key_pos <= query_pos``.
        local_mask, remote_mask: ``[B, Tl]`` / ``[B, Tr]`` bool key padding masks, True = attend.
        count_weighted: table mode without RoPE: attend over the distinct codes weighted by their
            counts. ``"auto"`` uses it whenever valid; ``True`` with RoPE or per-token mode raises.
        scale: score scale, default ``1/sqrt(Dh)``.
        return_lse: also return the natural-log log-sum-exp ``[B, Hq, Tl]`` float32.
        include_local: False skips the local keys (non-local-only pass, to be merged with a local-only
            pass - a call with no non-local arguments - through :func:`merge_attention`).
        validate: value checks that need a device sync (code range, kv_pos range, finiteness).
        backend: ``"auto" | "triton" | "torch"`` (see ``astra_kernels._dispatch``).

    Returns:
        ``out [B, Hq, Tl, Dh]`` in q's dtype, or ``(out, lse)``. A query with no visible key gets
        ``out = 0``, ``lse = -inf``.
    """
    be = resolve_backend(backend, q, k, v, k_hat, v_hat, codes, k_table, v_table, rope_cos, rope_sin,
                         q_pos, kv_pos, local_mask, remote_mask)
    plan = _plan(q, k, v, k_hat=k_hat, v_hat=v_hat, codes=codes, k_table=k_table, v_table=v_table,
                 rope_cos=rope_cos, rope_sin=rope_sin, q_pos=q_pos, kv_pos=kv_pos, causal=causal,
                 local_mask=local_mask, remote_mask=remote_mask, count_weighted=count_weighted, scale=scale,
                 include_local=include_local, validate=validate)
    if plan.Tl == 0 or plan.B == 0 or plan.Hq == 0:
        out = q.new_zeros(q.shape)
        lse = torch.full((plan.B, plan.Hq, plan.Tl), _NEG_INF, dtype=torch.float32, device=q.device)
    elif be == "triton":
        from .triton.attention_kernels import mixed_attention_triton

        out, lse = mixed_attention_triton(plan)
    else:
        out, lse = _attention_torch(plan)
    return (out, lse) if return_lse else out


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions over disjoint key sets: ``(out [..., T, Dh], lse [..., T])``.

    ``lse = -inf`` marks a row that saw no key (its ``out`` is ignored); a row with no key on either
    side comes out as ``out = 0``, ``lse = -inf``. Output dtype is ``out_a``'s; lse is float32
    (float64 if the inputs' lse is float64).
    """
    for n, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        _need(isinstance(t, torch.Tensor) and t.is_floating_point(), f"{n} must be a floating torch.Tensor")
    _need(out_a.shape == out_b.shape, f"out_a and out_b shapes differ: {tuple(out_a.shape)} vs {tuple(out_b.shape)}")
    _need(lse_a.shape == lse_b.shape and tuple(lse_a.shape) == tuple(out_a.shape[:-1]),
          f"lse shapes must be out.shape[:-1]={tuple(out_a.shape[:-1])}, got {tuple(lse_a.shape)}, {tuple(lse_b.shape)}")
    ct = torch.float64 if torch.float64 in (lse_a.dtype, lse_b.dtype, out_a.dtype) else torch.float32
    la, lb = lse_a.to(ct), lse_b.to(ct)
    m = torch.maximum(la, lb)
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(la - m_safe), torch.exp(lb - m_safe)
    tot = wa + wb
    inv = torch.where(tot > 0, 1.0 / torch.where(tot > 0, tot, torch.ones_like(tot)), torch.zeros_like(tot))
    # rows with weight 0 must not propagate NaN/garbage from their (ignored) out
    oa = torch.where((wa > 0).unsqueeze(-1), out_a.to(ct), torch.zeros((), dtype=ct, device=out_a.device))
    ob = torch.where((wb > 0).unsqueeze(-1), out_b.to(ct), torch.zeros((), dtype=ct, device=out_b.device))
    out = (oa * (wa * inv).unsqueeze(-1) + ob * (wb * inv).unsqueeze(-1)).to(out_a.dtype)
    lse = (m_safe + torch.log(tot)).to(torch.float64 if ct == torch.float64 else torch.float32)
    return out, lse


# ------------------------------------------------------------------------------------- CPU/torch path
_CHUNK_ELEMS = 1 << 23  # score elements per query chunk (32 MiB in fp32)


def _rope(kt: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """kt [B, S, H, Dh] rotated by pos [B, S] (rotate_half convention), in kt's dtype."""
    c = cos[pos].to(kt.dtype).unsqueeze(2)
    s = sin[pos].to(kt.dtype).unsqueeze(2)
    h = kt.shape[-1] // 2
    rot = torch.cat((-kt[..., h:], kt[..., :h]), dim=-1)
    return kt * c + rot * s


def _segments(plan: _Plan, ct: torch.dtype):
    """Key segments as (K [B,Hkv,N,Dh], V, pos [B,N] int64 or None (= always visible), bias [B,N] or None)."""
    segs = []
    if plan.k is not None and plan.Tl:
        bias = None if plan.l_valid is None else _valid_bias(plan.l_valid, ct)
        segs.append((plan.k.to(ct), plan.v.to(ct), plan.q_pos, bias))
    if plan.u_codes is not None:
        uk = plan.r_k[plan.u_codes].to(ct).permute(0, 2, 1, 3)
        uv = plan.r_v[plan.u_codes].to(ct).permute(0, 2, 1, 3)
        segs.append((uk, uv, None, plan.u_logc.to(ct)))
    if plan.r_mode != "none":
        if plan.r_mode == "direct":
            rk, rv = plan.r_k.to(ct), plan.r_v.to(ct)
        else:
            kt = plan.r_k[plan.r_codes].to(ct)  # [B, S, Hkv, Dh]
            if plan.rope_cos is not None:
                kt = _rope(kt, plan.r_pos, plan.rope_cos, plan.rope_sin)
            rk = kt.permute(0, 2, 1, 3)
            rv = plan.r_v[plan.r_codes].to(ct).permute(0, 2, 1, 3)
        bias = None if plan.r_valid is None else _valid_bias(plan.r_valid, ct)
        segs.append((rk, rv, plan.r_pos, bias))
    return segs


def _valid_bias(valid: torch.Tensor, ct) -> torch.Tensor:
    return torch.zeros(valid.shape, dtype=ct, device=valid.device).masked_fill_(~valid, _NEG_INF)


def _attention_torch(plan: _Plan) -> Tuple[torch.Tensor, torch.Tensor]:
    """CPU path: one attention per key segment (local / distinct codes / per-token non-local), each
    through torch's fused CPU flash-attention kernel (which returns the log-sum-exp), merged by lse.
    No concatenation of keys, and the local segment usually runs with no mask at all."""
    q = plan.q
    B, Hq, Tl, Dh = plan.B, plan.Hq, plan.Tl, plan.Dh
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    acc_o, acc_l = None, None
    for K, V, kpos, kbias in _segments(plan, ct):
        if K.shape[2] == 0:
            continue
        o, l = _segment_attention(plan, K, V, kpos, kbias, ct)
        if acc_o is None:
            acc_o, acc_l = o, l
        else:
            acc_o, acc_l = merge_attention(acc_o, acc_l, o, l)
    if acc_o is None:
        out = torch.zeros(B, Hq, Tl, Dh, dtype=q.dtype, device=q.device)
        lse = torch.full((B, Hq, Tl), _NEG_INF, dtype=torch.float32, device=q.device)
        return out, lse
    return acc_o.to(q.dtype), acc_l.to(torch.float32)


_FLASH_FAILED: set = set()  # dtypes for which this torch build's CPU flash kernel raised
_MASK_ELEMS = 1 << 22  # mask elements per query chunk on the causal route (16 MiB fp32)


def _segment_attention(plan, K, V, kpos, kbias, ct):
    """(out [B,Hq,Tl,Dh] ct, lse [B,Hq,Tl] ct) over one key segment; rows with no key: 0 / -inf."""
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is not None and plan.q.device.type == "cpu" and ct not in _FLASH_FAILED:
        try:
            return _attention_flash_cpu(flash, plan, K, V, kpos, kbias, ct)
        except RuntimeError:  # op missing a dtype on this torch build: use the matmul route
            _FLASH_FAILED.add(ct)
    return _attention_matmul(plan, K, V, kpos, kbias, ct)


def _attention_flash_cpu(flash, plan, K, V, kpos, kbias, ct):
    """torch's fused CPU flash-attention kernel with an additive float mask: key bias (padding -inf,
    log(count)) broadcast over queries, plus the causal mask by position where it matters.
    GQA: the G query heads of a kv head are stacked along the query axis (a view of contiguous q)."""
    q = plan.q
    B, Hq, Hkv, Tl, Dh = plan.B, plan.Hq, plan.Hkv, plan.Tl, plan.Dh
    G = Hq // Hkv
    N = K.shape[2]
    K = K.contiguous()
    V = V.contiguous()
    q5 = q.to(ct).reshape(B, Hkv, G, Tl, Dh)
    causal = plan.causal and kpos is not None
    if causal and bool((kpos.max(dim=1).values <= plan.q_pos.min(dim=1).values).all()):
        causal = False  # every key of the segment is visible to every query (e.g. earlier chunks)
    if causal and kpos is plan.q_pos and Tl > 1 and bool((kpos[:, 1:] > kpos[:, :-1]).all()):
        # local segment, positions strictly increasing: the causal mask is the index triangle, which
        # the flash kernel does itself (is_causal=True), skipping the blocks above the diagonal
        Kx = K if G == 1 else K.repeat_interleave(G, dim=1)
        Vx = V if G == 1 else V.repeat_interleave(G, dim=1)
        mask = None if kbias is None else kbias.view(B, 1, 1, N)
        o, l = flash(q.to(ct), Kx, Vx, 0.0, True, attn_mask=mask, scale=plan.scale)
        o = o.reshape(B, Hq, Tl, Dh)
        l = l.reshape(B, Hq, Tl).to(ct)
        if kbias is not None:
            empty = (~torch.isneginf(kbias)).cumsum(dim=1) == 0          # no visible key up to i
            if bool(empty.any()):
                e = empty.unsqueeze(1).expand(B, Hq, Tl)
                o = o.masked_fill(e.unsqueeze(-1), 0.0)
                l = l.masked_fill(e, _NEG_INF)
        return o, l
    out = torch.empty(B, Hq, Tl, Dh, dtype=ct, device=q.device)
    lse = torch.empty(B, Hq, Tl, dtype=ct, device=q.device)
    chunk = Tl if not causal else max(1, min(Tl, _MASK_ELEMS // max(1, B * G * N)))
    for t0 in range(0, Tl, chunk):
        t1 = min(Tl, t0 + chunk)
        c = t1 - t0
        qc = q5[:, :, :, t0:t1].reshape(B, Hkv, G * c, Dh)
        if causal:
            mask = torch.zeros(B, c, N, dtype=ct, device=q.device)
            if kbias is not None:
                mask.add_(kbias.unsqueeze(1))
            mask.masked_fill_(kpos.unsqueeze(1) > plan.q_pos[:, t0:t1].unsqueeze(2), _NEG_INF)
            empty = torch.isneginf(mask).all(dim=-1)                      # [B, c]
            mask = mask.unsqueeze(1).unsqueeze(1).expand(B, 1, G, c, N).reshape(B, 1, G * c, N)
        elif kbias is not None:
            mask = kbias.view(B, 1, 1, N)
            empty = torch.isneginf(kbias).all(dim=-1, keepdim=True).expand(B, c)
        else:
            mask, empty = None, None
        o, l = flash(qc, K, V, 0.0, False, attn_mask=mask, scale=plan.scale)
        o = o.reshape(B, Hq, c, Dh)
        l = l.reshape(B, Hq, c)
        if empty is not None and bool(empty.any()):
            e = empty.unsqueeze(1).expand(B, Hq, c)
            o = o.masked_fill(e.unsqueeze(-1), 0.0)
            l = l.masked_fill(e, _NEG_INF)
        out[:, :, t0:t1] = o
        lse[:, :, t0:t1] = l
    return out, lse


def _attention_matmul(plan, K, V, kpos, kbias, ct):
    """Portable route: explicit matmul + softmax, query-chunked to bound memory."""
    q = plan.q
    B, Hq, Hkv, Tl, Dh = plan.B, plan.Hq, plan.Hkv, plan.Tl, plan.Dh
    G = Hq // Hkv
    N = K.shape[2]
    Kt = K.transpose(-1, -2)
    q5 = q.reshape(B, Hkv, G, Tl, Dh)
    out = torch.empty(B, Hq, Tl, Dh, dtype=ct, device=q.device)
    lse = torch.empty(B, Hq, Tl, dtype=ct, device=q.device)
    chunk = max(1, min(Tl, _CHUNK_ELEMS // max(1, B * Hq * N)))
    bias5 = None if kbias is None else kbias.view(B, 1, 1, 1, N)
    for t0 in range(0, Tl, chunk):
        t1 = min(Tl, t0 + chunk)
        c = t1 - t0
        qc = (q5[:, :, :, t0:t1].to(ct) * plan.scale).reshape(B, Hkv, G * c, Dh)
        s = torch.matmul(qc, Kt).view(B, Hkv, G, c, N)
        if bias5 is not None:
            s.add_(bias5)
        if plan.causal and kpos is not None:
            hide = kpos.unsqueeze(1) > plan.q_pos[:, t0:t1].unsqueeze(2)  # [B, c, N]
            s.masked_fill_(hide.view(B, 1, 1, c, N), _NEG_INF)
        m = s.amax(dim=-1, keepdim=True)
        m = m.masked_fill_(torch.isneginf(m), 0.0)
        s.sub_(m).exp_()
        l = s.sum(dim=-1, keepdim=True)
        o = torch.matmul(s.view(B, Hkv, G * c, N), V).view(B, Hkv, G, c, Dh)
        o.div_(l.masked_fill(l == 0, 1.0))
        out[:, :, t0:t1] = o.reshape(B, Hq, c, Dh)
        lse[:, :, t0:t1] = (m + l.log()).reshape(B, Hq, c)
    return out, lse


# ------------------------------------------------------------------------------- float64 reference
def mixed_attention_reference(
    q, k, v, *, k_hat=None, v_hat=None, codes=None, k_table=None, v_table=None, rope_cos=None, rope_sin=None,
    q_pos=None, kv_pos=None, causal=False, local_mask=None, remote_mask=None, scale=None, include_local=True,
    **_ignored,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ground truth in float64: build every non-local key per token, concatenate, softmax.

    Returns ``(out, lse)`` in float64 (``out = 0, lse = -inf`` for rows with no visible key).
    Ignores ``count_weighted``/``backend`` (always the per-token definition).
    """
    f = torch.float64
    B, Hq, Tl, Dh = q.shape
    scale = 1.0 / math.sqrt(Dh) if scale is None else float(scale)
    keys, vals, pos, valid = [], [], [], []
    qp = _positions("q_pos", q_pos, B, Tl, 0, q.device)
    if include_local:
        keys.append(k.to(f))
        vals.append(v.to(f))
        pos.append(qp)
        valid.append(torch.ones(B, Tl, dtype=torch.bool) if local_mask is None else local_mask.cpu())
    if k_hat is not None:
        Tr = k_hat.shape[2]
        keys.append(k_hat.to(f))
        vals.append(v_hat.to(f))
    elif codes is not None:
        Tr = codes.shape[1]
        kt = k_table.to(f)[codes.long()]  # [B, Tr, H, Dh]
        if rope_cos is not None:
            kp = _positions("kv_pos", kv_pos, B, Tr, Tl, q.device)
            c = rope_cos.to(f)[kp].unsqueeze(2)
            s = rope_sin.to(f)[kp].unsqueeze(2)
            h = Dh // 2
            kt = kt * c + torch.cat((-kt[..., h:], kt[..., :h]), dim=-1) * s
        keys.append(kt.permute(0, 2, 1, 3))
        vals.append(v_table.to(f)[codes.long()].permute(0, 2, 1, 3))
    else:
        Tr = 0
    if Tr or k_hat is not None or codes is not None:
        pos.append(_positions("kv_pos", kv_pos, B, Tr, Tl, q.device))
        valid.append(torch.ones(B, Tr, dtype=torch.bool) if remote_mask is None else remote_mask.cpu())
    K = torch.cat(keys, dim=2).cpu()
    V = torch.cat(vals, dim=2).cpu()
    kpos = torch.cat(pos, dim=1).cpu()
    vis = torch.cat(valid, dim=1).unsqueeze(1).expand(B, Tl, K.shape[2])
    if causal:
        vis = vis & (kpos.unsqueeze(1) <= qp.cpu().unsqueeze(2))
    G = Hq // K.shape[1]
    K = K.repeat_interleave(G, dim=1)
    V = V.repeat_interleave(G, dim=1)
    s = torch.matmul(q.to(f).cpu(), K.transpose(-1, -2)) * scale
    s = s.masked_fill(~vis.unsqueeze(1), _NEG_INF)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    out = torch.matmul(p, V)
    return out, lse
