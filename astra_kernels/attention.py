"""Mixed-precision attention (ASTRA): local full-precision tokens + non-local tokens known by VQ codes.

A device holds ``Tl`` local tokens (queries, keys and values in full precision) and the codes of ``Tr``
non-local tokens. Its output is ordinary softmax attention of the local queries over the union of the
local keys and the non-local keys reconstructed from the codes::

    out = softmax(scale * q [k ; k_hat]^T + mask) [v ; v_hat]

Masking is by *global token position*: with ``causal=True`` a query at position ``p`` sees a key at
position ``p'`` only if ``p' <= p``; ``local_mask`` / ``remote_mask`` (True = attend) remove keys.

The keys are a list of segments (``astra_kernels.segments``), one per key form; one public entry point
per input form, each with its shape contract: :func:`attention_local`, :func:`attention_per_token`,
:func:`attention_table`, and :func:`attention_segments` for an explicit list (``mixed_attention`` is
the keyword form of the first three). Non-local K/V come in one of two input forms:

* **per token** - ``k_hat, v_hat`` ``[B, Hkv, Tr, Dh]`` (any VQ group count G; RoPE already applied);
* **table** - ``codes [B, Tr]`` + per-layer ``k_table, v_table [K, Hkv, Dh]`` (exact for G = 1: a
  non-local token's K/V is a fixed function of its codeword). With ``rope_cos/rope_sin`` the gathered
  key is rotated by the token's global position ``kv_pos`` (HF Llama ``rotate_half`` convention).
  Without RoPE, identical codes give identical keys, so attention can run over the *distinct* codes
  once, each weighted by its count (``log(count)`` added to its score) - equal in exact arithmetic (the fp32
  ``log(count)`` rounds: ~1e-7 relative, in float64 too), and the non-local cost no longer grows with ``Tr``
  (``count_weighted``).

Count weighting with masks: a code's count only includes the keys visible to the query. Non-local keys
visible to every local query (before all of them, or ``causal=False``) are counted once per batch row;
keys visible to none are dropped; keys visible to only some queries (possible only when positions
interleave) stay per-token, with their positions. With contiguous sequence-parallel chunks the last set
is empty. This is exact for any positions.

All-masked convention: a query that sees no key at all gets ``out = 0`` and ``lse = -inf``.
:func:`merge_attention` understands it, so ``merge(local-only pass, non-local-only pass)`` equals the
single pass (e.g. to overlap local attention with the arrival of codes: :func:`attention_local`, then a
non-local-only pass with ``k = v = None``).

Backends (``astra_kernels._dispatch``): ``"triton"`` - one fused flash-attention-style kernel
(``astra_kernels/triton/attention_kernels.py``); ``"torch"`` - the CPU path below: one attention per
key segment (one CPU segment function per key form turns it into dense K/V + positions + bias) through
torch's fused CPU flash-attention kernel (it returns the log-sum-exp; an explicit matmul route is the
fallback), merged by log-sum-exp, so keys are never concatenated and unmasked segments run unmasked.

Precision: fp16/bf16 inputs are computed in fp32 on the CPU path (fp16-rounded output); the Triton
kernel feeds fp16/bf16 to tensor cores with fp32 accumulation, and fp32 inputs use ``tf32x3`` dots on a
GPU (about fp32 accuracy) and exact fp32 in the interpreter. float64 queries run the torch path on every backend
and device, in float64 throughout: the Triton kernel's running max, sum and log-sum-exp are fp32 loop state,
which a float64 ``tl.dot`` does not compile against for a GPU (the interpreter ran it, with an fp32-accurate lse).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ._dispatch import compile_opaque, resolve_backend
from .checks import FLOAT_DTYPES, check_finite, check_float, check_int, check_mask, is_count, require
from .segments import CountKeys, GroupTableKeys, Segment, TableKeys, TokenKeys, positions, prune_causal, split_counts

__all__ = ["attention_local", "attention_per_token", "attention_table", "attention_group_table", "build_group_tables",
           "attention_segments", "mixed_attention",
           "mixed_attention_reference", "merge_attention"]

_NEG_INF = float("-inf")
Result = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Queries:
    """The query side of one call: ``q [B, Hq, Tl, Dh]``, ``q_pos [B, Tl]`` int64, ``causal``, ``scale``."""

    q: torch.Tensor
    q_pos: torch.Tensor
    causal: bool
    scale: float

    @property
    def B(self) -> int:
        return self.q.shape[0]

    @property
    def Hq(self) -> int:
        return self.q.shape[1]

    @property
    def Tl(self) -> int:
        return self.q.shape[2]

    @property
    def Dh(self) -> int:
        return self.q.shape[3]


# ---------------------------------------------------------------------------------------- public API
def attention_segments(q: torch.Tensor, segments: Sequence[Segment], *, q_pos: Optional[torch.Tensor] = None,
                       causal: bool = False, scale: Optional[float] = None, return_lse: bool = False,
                       validate: bool = True, backend: str = "auto") -> Result:
    """Softmax attention of ``q [B, Hq, Tl, Dh]`` over a list of key segments (the general form).

    ``segments``: :class:`~astra_kernels.segments.TokenKeys` / ``TableKeys`` / ``GroupTableKeys`` /
    ``CountKeys``, each with
    ``Hkv`` kv heads (``Hq % Hkv == 0``; query head ``h`` uses kv head ``h // (Hq // Hkv)``), head_dim
    ``Dh`` and batch ``B``. A segment whose ``pos`` *is* the normalised ``q_pos`` tensor is treated as
    keys at the query positions (the causal triangle skip). ``q_pos``: ``[Tl]`` / ``[B, Tl]`` global
    positions (default ``arange(Tl)``); ``causal``: a query sees a key only if ``key_pos <= query_pos``
    (count keys are seen by every query). ``scale`` defaults to ``1/sqrt(Dh)``. ``validate``: value
    checks that need a device sync (finiteness, code and RoPE ranges). Autograd: with an input that requires grad
    (under grad mode) every backend takes one differentiable torch route (``out`` and ``lse`` carry gradients;
    memory ``[B, Hq, Tl, N]``).

    Returns ``out [B, Hq, Tl, Dh]`` in q's dtype, or with ``return_lse`` a partial result for
    :func:`merge_attention`: ``(out, lse [B, Hq, Tl])``, both float32 (float64 for a float64 q; a half-precision
    q's ``out`` too, so that the merged output is rounded to q's dtype once, as one pass over all keys is). A query
    with no visible key gets ``out = 0``, ``lse = -inf``.
    """
    check_float("q", q, 4)
    qp = positions("q_pos", q_pos, q.shape[0], q.shape[2], 0, q.device)
    segments = list(segments)
    return _attend(q, qp, segments, causal, scale, return_lse, backend, segments if validate else None)


def _attend(q, qp, segments, causal, scale, return_lse, backend, check: Optional[list]) -> Result:
    """Validate the call, drop invisible keys, run the backend. ``check``: segments whose values to check
    (None: no value checks)."""
    qs = _queries(q, qp, causal, scale, segments)
    be = resolve_backend(backend, q, qp, *_tensors(segments))
    if check is not None:
        _check_values(q, check)
    segs = _visible(qs, segments)
    out_dtype = _lse_dtype(q) if return_lse else q.dtype     # a partial result is rounded once, after its merge
    try:
        if qs.Tl == 0 or qs.B == 0 or qs.Hq == 0:
            out = q.new_zeros(q.shape, dtype=out_dtype)
            lse = torch.full((qs.B, qs.Hq, qs.Tl), _NEG_INF, dtype=_lse_dtype(q), device=q.device)
        elif _needs_grad(q, *_tensors(segs)):       # autograd: one differentiable route, on any backend
            out, lse = _attention_differentiable(qs, segs, out_dtype)
        elif be == "triton" and q.dtype != torch.float64:      # float64: the torch path below, on any device
            from .triton.attention_kernels import attention_triton

            out = torch.empty(q.shape, dtype=out_dtype, device=q.device)   # q's dtype, or float32 / float64 (q's)
            out, lse = attention_triton(qs.q, qs.q_pos, segs, causal=qs.causal, scale=qs.scale, out=out)
            lse = lse.to(_lse_dtype(q))         # the kernel's is float32
        else:
            out, lse = _attention_torch(qs, segs, out_dtype)
        if check is not None or lse.device.type == "cpu":     # a sync on a device: only with validate
            _check_lse(lse)
        if check is not None:       # validate=False takes non-finite outputs (a NaN value reaches them as NaN)
            _check_out(out)
    except ValueError:
        if check is None:       # validate=False: a NaN / Inf input reads as an overflow; name it instead (error path)
            _check_values(q, segments)
        raise
    return (out, lse) if return_lse else out


def _check_values(q: torch.Tensor, segments) -> None:
    check_finite("q", q)
    for seg in segments:
        seg.check_values()


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    """The log-sum-exp's dtype: float32, float64 for float64 queries."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _check_lse(lse: torch.Tensor) -> None:
    """Raise ValueError where a row's log-sum-exp is NaN or +inf: its scores overflowed the compute dtype (a row
    that sees no key has ``-inf``, never these). One reduction over ``[B, H, T]``."""
    if lse.numel() and not bool(lse.amax() < float("inf")):       # NaN fails the compare too
        raise ValueError(f"attention scores overflow {lse.dtype}: scale * q.k (or its log-sum-exp) is not finite; "
                         "q, k or scale are too large")


def _check_out(out: torch.Tensor) -> None:
    """Raise ValueError where the output is not finite though every input and log-sum-exp is: the values' weighted
    sum overflowed (v near its dtype's largest: the average is, the accumulated sum is not)."""
    if out.numel() and not bool(out.abs().amax() < float("inf")):       # NaN fails it too; 4x cheaper than isfinite
        raise ValueError(f"attention output overflows {out.dtype}: the weighted sum of the values is not finite; v is "
                         "too large (scale it down and the output up)")


def _queries(q, qp, causal, scale, segments) -> Queries:
    B, Hq, Tl, Dh = q.shape
    require(Dh >= 1, "head_dim must be >= 1")
    require(len(segments) > 0, "no keys at all: give at least one key segment")
    heads = {}
    for seg in segments:
        require(type(seg) in _DENSE,
                f"segments must be TokenKeys / TableKeys / GroupTableKeys / CountKeys, got {type(seg).__name__}")
        b, h, d = seg.heads()
        require(b == B and d == Dh, f"{seg.label} has batch {b}, head_dim {d}; q has batch {B}, head_dim {Dh}")
        heads.setdefault(h, seg.label)
    require(len(heads) == 1, "key segments disagree on the number of kv heads: "
                             + ", ".join(f"{label} {h}" for h, label in heads.items()))
    Hkv = next(iter(heads))
    require(Hkv >= 1 and Hq % Hkv == 0, f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    real = isinstance(scale, numbers.Real) or (isinstance(scale, torch.Tensor) and scale.numel() == 1
                                               and not scale.is_complex())
    require(scale is None or (real and not isinstance(scale, bool)),
            f"scale must be a real number or None, got {scale!r}")         # "0.5" was read as 0.5, 1j a TypeError
    scale = 1.0 / math.sqrt(Dh) if scale is None else float(scale)
    require(math.isfinite(scale), f"scale must be finite, got {scale}")
    return Queries(q, qp, bool(causal), scale)


def _tensors(segments) -> List[torch.Tensor]:
    out = []
    for seg in segments:
        out += [t for t in vars(seg).values() if isinstance(t, torch.Tensor)]
    return out


def _visible(qs: Queries, segments) -> List[Segment]:
    """Drop empty segments; with causal attention, the keys no query can see (pure, see segments)."""
    out = []
    for seg in segments:
        if hasattr(seg, "pos") and qs.causal and seg.pos is not qs.q_pos and qs.Tl:
            seg = prune_causal(seg, qs.q_pos)
        if seg is not None and seg.num_keys:
            out.append(seg)
    return out


def _local_keys(q, k, v, qp, local_mask) -> TokenKeys:
    """The local tokens as per-token keys at the query positions."""
    require(k is not None and v is not None, "k and v (local keys/values) are required unless include_local=False")
    check_float("k", k, 4)
    check_float("v", v, 4)
    require(k.dtype == q.dtype and v.dtype == q.dtype,
            f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    require(tuple(k.shape) == tuple(v.shape), f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    B, _, Tl, Dh = q.shape
    require(k.shape[0] == B and k.shape[2] == Tl and k.shape[3] == Dh,
            f"k/v must have shape [B={B}, Hkv, Tl={Tl}, Dh={Dh}], got {tuple(k.shape)}")
    check_mask("local_mask", local_mask, B, Tl)
    return TokenKeys(k, v, qp, local_mask, name="k/v")


def _common(q, k, v, q_pos, local_mask, Tr, kv_pos, remote_mask):
    """(q_pos [B, Tl], kv_pos [B, Tr], local segments) shared by the entry points."""
    check_float("q", q, 4)
    B, _, Tl, _ = q.shape
    qp = positions("q_pos", q_pos, B, Tl, 0, q.device)
    kp = positions("kv_pos", kv_pos, B, Tr, Tl, q.device)
    check_mask("remote_mask", remote_mask, B, Tr)
    local = [] if k is None and v is None else [_local_keys(q, k, v, qp, local_mask)]
    return qp, kp, local


def attention_local(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_pos: Optional[torch.Tensor] = None,
                    causal: bool = False, local_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                    return_lse: bool = False, validate: bool = True, backend: str = "auto") -> Result:
    """Attention of the local queries over the local keys only.

    ``q [B, Hq, Tl, Dh]``, ``k, v [B, Hkv, Tl, Dh]`` in q's dtype (RoPE applied), ``Hq % Hkv == 0``;
    ``q_pos [Tl]`` / ``[B, Tl]`` (default ``arange(Tl)``); ``local_mask [B, Tl]`` bool, True = attend.
    Returns ``out [B, Hq, Tl, Dh]`` or ``(out, lse)`` (:func:`attention_segments`' dtypes); no visible key: 0 / -inf.
    """
    qp, _, local = _common(q, k, v, q_pos, local_mask, 0, None, None)
    return _attend(q, qp, local, causal, scale, return_lse, backend, local if validate else None)


def attention_per_token(q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor],
                        k_hat: torch.Tensor, v_hat: torch.Tensor, *, q_pos: Optional[torch.Tensor] = None,
                        kv_pos: Optional[torch.Tensor] = None, causal: bool = False,
                        local_mask: Optional[torch.Tensor] = None, remote_mask: Optional[torch.Tensor] = None,
                        scale: Optional[float] = None, return_lse: bool = False, validate: bool = True,
                        backend: str = "auto") -> Result:
    """Local keys + non-local keys given per token.

    ``q [B, Hq, Tl, Dh]``; ``k, v [B, Hkv, Tl, Dh]`` in q's dtype, or both None for a non-local-only pass
    (merge it with :func:`attention_local`'s through :func:`merge_attention`); ``k_hat, v_hat
    [B, Hkv, Tr, Dh]`` any float dtype, RoPE already applied; ``q_pos [Tl]`` / ``[B, Tl]`` (default
    ``arange(Tl)``), ``kv_pos [Tr]`` / ``[B, Tr]`` (default ``Tl + arange(Tr)``); ``local_mask [B, Tl]``,
    ``remote_mask [B, Tr]`` bool, True = attend. Returns ``out [B, Hq, Tl, Dh]`` or ``(out, lse)``.
    """
    require(k_hat is not None and v_hat is not None, "per-token mode needs both k_hat and v_hat")
    check_float("k_hat", k_hat, 4)
    check_float("v_hat", v_hat, 4)
    qp, kp, segs = _common(q, k, v, q_pos, local_mask, k_hat.shape[2], kv_pos, remote_mask)
    require(k_hat.shape[0] == q.shape[0] and k_hat.shape[3] == q.shape[3],
            f"k_hat/v_hat must have shape [B={q.shape[0]}, Hkv, Tr, Dh={q.shape[3]}], got {tuple(k_hat.shape)}")
    segs.append(TokenKeys(k_hat, v_hat, kp, remote_mask))
    return _attend(q, qp, segs, causal, scale, return_lse, backend, segs if validate else None)


def attention_table(q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor], codes: torch.Tensor,
                    k_table: torch.Tensor, v_table: torch.Tensor, *, rope_cos: Optional[torch.Tensor] = None,
                    rope_sin: Optional[torch.Tensor] = None, q_pos: Optional[torch.Tensor] = None,
                    kv_pos: Optional[torch.Tensor] = None, causal: bool = False,
                    local_mask: Optional[torch.Tensor] = None, remote_mask: Optional[torch.Tensor] = None,
                    count_weighted: Union[str, bool] = "auto", scale: Optional[float] = None,
                    return_lse: bool = False, validate: bool = True, backend: str = "auto") -> Result:
    """Local keys + non-local keys given by code into per-layer K/V tables (exact for G = 1).

    ``q``, ``k``, ``v``, ``q_pos``, ``kv_pos``, masks: as :func:`attention_per_token`. ``codes [B, Tr]``
    integer in ``[0, K)``; ``k_table, v_table [K, Hkv, Dh]``; ``rope_cos, rope_sin [P, Dh]``: the
    gathered key becomes ``k * cos[kv_pos] + rotate_half(k) * sin[kv_pos]`` (HF Llama convention).
    ``count_weighted`` (no RoPE only): attend over the distinct codes, ``log(count)`` added to each
    score - equal in exact arithmetic (fp32 ``log(count)``: ~1e-7 relative), cost independent of ``Tr``; ``"auto"``
    uses it whenever valid.
    """
    require(count_weighted in ("auto", True, False),
            f"count_weighted must be 'auto', True or False, got {count_weighted!r}")
    rope = rope_cos is not None or rope_sin is not None
    require(not (count_weighted is True and rope),
            "count_weighted=True is invalid with RoPE: rotated keys depend on position, not only on the code")
    check_int("codes", codes)
    require(codes.dim() == 2 and codes.shape[0] == q.shape[0],
            f"codes must have shape [B={q.shape[0]}, Tr], got {tuple(codes.shape)}")
    qp, kp, segs = _common(q, k, v, q_pos, local_mask, codes.shape[1], kv_pos, remote_mask)
    table = TableKeys(codes.to(torch.int64), k_table, v_table, kp, remote_mask, rope_cos, rope_sin)
    local = list(segs)
    if validate:
        table.check_values()  # before the count split, which indexes by code
    if rope or count_weighted is False or q.shape[2] == 0:
        segs.append(table)
    else:
        segs += split_counts(table, qp, bool(causal))
        if len(segs) == len(local):  # nothing visible: an empty table segment still fixes the kv heads
            segs.append(replace(table, codes=table.codes[:, :0], pos=kp[:, :0],
                                valid=None if remote_mask is None else remote_mask[:, :0]))
    return _attend(q, qp, segs, causal, scale, return_lse, backend, local if validate else None)


def mixed_attention(q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor], *,
                    k_hat: Optional[torch.Tensor] = None, v_hat: Optional[torch.Tensor] = None,
                    codes: Optional[torch.Tensor] = None, k_table: Optional[torch.Tensor] = None,
                    v_table: Optional[torch.Tensor] = None, rope_cos: Optional[torch.Tensor] = None,
                    rope_sin: Optional[torch.Tensor] = None, q_pos: Optional[torch.Tensor] = None,
                    kv_pos: Optional[torch.Tensor] = None, causal: bool = False,
                    local_mask: Optional[torch.Tensor] = None, remote_mask: Optional[torch.Tensor] = None,
                    count_weighted: Union[str, bool] = "auto", scale: Optional[float] = None,
                    return_lse: bool = False, include_local: bool = True, validate: bool = True,
                    backend: str = "auto") -> Result:
    """Keyword form of the three entry points (kept for callers of astra_kernels 0.1): no non-local
    arguments -> :func:`attention_local`; ``k_hat, v_hat`` -> :func:`attention_per_token`; ``codes,
    k_table, v_table`` (+ ``rope_cos, rope_sin``) -> :func:`attention_table`. ``include_local=False``
    drops ``k, v`` (non-local-only pass). Arguments and results as documented there."""
    per_token = k_hat is not None or v_hat is not None
    table = codes is not None or k_table is not None or v_table is not None
    require(not (per_token and table),
            "give the non-local tokens either per token (k_hat, v_hat) or by table (codes, k_table, v_table), not both")
    if include_local:
        require(k is not None and v is not None, "k and v (local keys/values) are required unless include_local=False")
    else:
        k = v = None
    common = dict(q_pos=q_pos, causal=causal, local_mask=local_mask, scale=scale, return_lse=return_lse,
                  validate=validate, backend=backend)
    if table:
        require(codes is not None and k_table is not None and v_table is not None,
                "table mode needs codes, k_table and v_table")
        return attention_table(q, k, v, codes, k_table, v_table, rope_cos=rope_cos, rope_sin=rope_sin, kv_pos=kv_pos,
                               remote_mask=remote_mask, count_weighted=count_weighted, **common)
    require(rope_cos is None and rope_sin is None, "rope_cos/rope_sin apply to table mode only "
            "(per-token k_hat must already be rotated); given without table-mode non-local tokens")
    require(count_weighted is not True, "count_weighted=True needs table mode (codes, k_table, v_table)")
    require(count_weighted in ("auto", False), f"count_weighted must be 'auto', True or False, got {count_weighted!r}")
    if per_token:
        return attention_per_token(q, k, v, k_hat, v_hat, kv_pos=kv_pos, remote_mask=remote_mask, **common)
    require(kv_pos is None and remote_mask is None,
            "kv_pos/remote_mask given without non-local tokens (k_hat/v_hat or codes/k_table/v_table)")
    require(k is not None, "no keys at all: include_local=False needs non-local tokens")
    return attention_local(q, k, v, **common)


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions over disjoint key sets: ``(out [..., T, Dh], lse [..., T])``.

    ``lse = -inf`` marks a row that saw no key (its ``out`` is ignored); a row with no key on either
    side comes out as ``out = 0``, ``lse = -inf``. Raises ValueError for an lse holding NaN or +inf, or a
    non-finite ``out`` in a row that carries weight. Output dtype is ``out_a``'s; lse is float32
    (float64 if the inputs' lse is float64).
    """
    for n, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        require(isinstance(t, torch.Tensor) and t.is_floating_point(), f"{n} must be a floating torch.Tensor")
    require(out_a.shape == out_b.shape, f"out_a and out_b shapes differ: {tuple(out_a.shape)} vs {tuple(out_b.shape)}")
    require(lse_a.shape == lse_b.shape and tuple(lse_a.shape) == tuple(out_a.shape[:-1]),
            f"lse shapes must be out.shape[:-1]={tuple(out_a.shape[:-1])}, "
            f"got {tuple(lse_a.shape)}, {tuple(lse_b.shape)}")
    ct = torch.float64 if torch.float64 in (lse_a.dtype, lse_b.dtype, out_a.dtype) else torch.float32
    la, lb = lse_a.to(ct), lse_b.to(ct)
    for n, t in (("lse_a", la), ("lse_b", lb)):      # -inf is a row with no key; NaN / +inf would spread silently
        require(not bool((torch.isnan(t) | torch.isposinf(t)).any()), f"{n} contains NaN or +inf")
    m = torch.maximum(la, lb)
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(la - m_safe), torch.exp(lb - m_safe)
    tot = wa + wb
    inv = torch.where(tot > 0, 1.0 / torch.where(tot > 0, tot, torch.ones_like(tot)), torch.zeros_like(tot))
    # rows with weight 0 must not propagate NaN/garbage from their (ignored) out
    oa = torch.where((wa > 0).unsqueeze(-1), out_a.to(ct), torch.zeros((), dtype=ct, device=out_a.device))
    ob = torch.where((wb > 0).unsqueeze(-1), out_b.to(ct), torch.zeros((), dtype=ct, device=out_b.device))
    out = (oa * (wa * inv).unsqueeze(-1) + ob * (wb * inv).unsqueeze(-1)).to(out_a.dtype)
    check_finite("out_a / out_b (in rows that carry weight)", out)
    lse = (m_safe + torch.log(tot)).to(torch.float64 if ct == torch.float64 else torch.float32)
    return out, lse



def attention_group_table(q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor],
                          codes: torch.Tensor, k_table: torch.Tensor, v_table: torch.Tensor, *,
                          rope_cos: Optional[torch.Tensor] = None, rope_sin: Optional[torch.Tensor] = None,
                          q_pos: Optional[torch.Tensor] = None, kv_pos: Optional[torch.Tensor] = None,
                          causal: bool = False, local_mask: Optional[torch.Tensor] = None,
                          remote_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                          return_lse: bool = False, validate: bool = True, backend: str = "auto") -> Result:
    """Local keys + non-local keys given by grouped-VQ codes into per-group partial K/V tables (G >= 1).

    ``q``, ``k``, ``v``, ``q_pos``, ``kv_pos``, masks: as :func:`attention_per_token`. ``codes [B, Tr, G]``
    integer in ``[0, K)`` (the codes of :func:`astra_kernels.vq_encode`); ``k_table, v_table
    [G, K, Hkv, Dh]`` from :func:`build_group_tables` (fp32 / bf16 / fp16): a non-local key is
    ``sum_g k_table[g, codes[..., g]]`` (summed in fp32), rotated with ``rope_cos, rope_sin [P, Dh]`` at
    ``kv_pos`` if given (HF Llama convention) - the K/V of the decoded token without its D x D projection.
    """
    check_int("codes", codes)
    require(codes.dim() == 3 and codes.shape[0] == q.shape[0],
            f"codes must have shape [B={q.shape[0]}, Tr, G], got {tuple(codes.shape)}")
    qp, kp, segs = _common(q, k, v, q_pos, local_mask, codes.shape[1], kv_pos, remote_mask)
    segs.append(GroupTableKeys(codes.to(torch.int64), k_table, v_table, kp, remote_mask, rope_cos, rope_sin))
    return _attend(q, qp, segs, causal, scale, return_lse, backend, segs if validate else None)


def build_group_tables(codebook: torch.Tensor, w_k: torch.Tensor, b_k: Optional[torch.Tensor], w_v: torch.Tensor,
                       b_v: Optional[torch.Tensor], *, kv_heads: int,
                       dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-group partial K/V tables of one layer for :class:`~astra_kernels.segments.GroupTableKeys`.

    ``codebook [G, K, D // G]``; ``w_k, w_v [Hkv * Dh, D]`` (``nn.Linear`` layout: ``k = h @ w_k.T + b_k``),
    ``b_k, b_v [Hkv * Dh]`` or None; ``kv_heads`` = Hkv. Since ``k`` is linear in ``h = [c_0, ..., c_{G-1}]``,
    ``k = sum_g c_g @ w_k[:, g].T + b_k``: table ``[g, j] = codebook[g, j] @ w_k[:, g * DG:(g + 1) * DG].T``
    (computed in float64), the bias added to group 0. Returns ``(k_table, v_table) [G, K, Hkv, Dh]`` in
    ``dtype`` (default: the weights' dtype; bf16 / fp16 halve the memory). Memory per layer:
    ``G * K * 2 * Hkv * Dh`` elements (G = 32, K = 1024, D = 768: 201 MB fp32, 101 MB bf16). Differentiable in
    every tensor argument (build under ``torch.no_grad()`` for inference: a model's weights require grad).
    """
    check_float("codebook", codebook, 3)
    check_finite("codebook", codebook)
    G, K, DG = codebook.shape
    require(min(G, K, DG) >= 1, f"codebook dims must be >= 1, got shape {list(codebook.shape)} ([G, K, D/G])")
    require(is_count(kv_heads, 1),
            f"kv_heads must be an int >= 1, got {kv_heads!r}")
    require(dtype is None or dtype in FLOAT_DTYPES, f"dtype must be a floating dtype, got {dtype}")
    for name, w, b in (("w_k", w_k, b_k), ("w_v", w_v, b_v)):
        bname = "b" + name[1:]
        check_float(name, w, 2)
        check_finite(name, w)
        require(w.shape[1] == G * DG and w.shape[0] % kv_heads == 0,
                f"{name} must have shape [Hkv * Dh, D={G * DG}] with Hkv={kv_heads}, got {tuple(w.shape)}")
        if b is not None:
            check_float(bname, b, 1)
            check_finite(bname, b)
            require(b.shape[0] == w.shape[0], f"{bname} must have shape [{w.shape[0]}], got {tuple(b.shape)}")
    require(w_k.shape[0] == w_v.shape[0],
            f"w_k and w_v must have the same rows (Hkv * Dh), got {tuple(w_k.shape)} and {tuple(w_v.shape)}")
    out = []
    for w, b in ((w_k, b_k), (w_v, b_v)):
        w64 = w.to(torch.float64).reshape(w.shape[0], G, DG)
        t = torch.einsum("gkd,ogd->gko", codebook.to(torch.float64), w64)        # [G, K, Hkv * Dh]
        if b is not None:                   # (out of place: differentiable in every argument)
            t = torch.cat([t[:1] + b.to(torch.float64), t[1:]])
        out.append(t.reshape(G, K, kv_heads, -1).to(dtype or w.dtype).contiguous())
    return out[0], out[1]


# ------------------------------------------------------------------------------------- CPU/torch path
_CHUNK_ELEMS = 1 << 23  # score elements per query chunk (32 MiB in fp32)


def _rope(kt: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """kt [B, S, H, Dh] rotated by pos [B, S] (rotate_half convention), in kt's dtype."""
    c = cos[pos].to(kt.dtype).unsqueeze(2)
    s = sin[pos].to(kt.dtype).unsqueeze(2)
    h = kt.shape[-1] // 2
    rot = torch.cat((-kt[..., h:], kt[..., :h]), dim=-1)
    return kt * c + rot * s


def _dense_tokens(seg: TokenKeys, ct: torch.dtype):
    return seg.k.to(ct), seg.v.to(ct), seg.pos, None if seg.valid is None else _valid_bias(seg.valid, ct)


def _dense_table(seg: TableKeys, ct: torch.dtype):
    kt = seg.k_table[seg.codes].to(ct)  # [B, N, Hkv, Dh]
    if seg.rope:
        kt = _rope(kt, seg.pos, seg.rope_cos, seg.rope_sin)
    vt = seg.v_table[seg.codes].to(ct)
    bias = None if seg.valid is None else _valid_bias(seg.valid, ct)
    return kt.permute(0, 2, 1, 3), vt.permute(0, 2, 1, 3), seg.pos, bias


def _dense_group_table(seg: GroupTableKeys, ct: torch.dtype):
    G = seg.k_table.shape[0]
    B, N = seg.codes.shape[:2]
    flat = seg.codes.reshape(B * N, G)
    kt = torch.zeros(B * N, *seg.k_table.shape[2:], dtype=ct, device=seg.codes.device)
    vt = torch.zeros_like(kt)
    for g in range(G):                      # one gather per group, summed in the compute dtype
        kt += seg.k_table[g].index_select(0, flat[:, g]).to(ct)
        vt += seg.v_table[g].index_select(0, flat[:, g]).to(ct)
    kt, vt = kt.reshape(B, N, *kt.shape[1:]), vt.reshape(B, N, *vt.shape[1:])
    if seg.rope:
        kt = _rope(kt, seg.pos, seg.rope_cos, seg.rope_sin)
    bias = None if seg.valid is None else _valid_bias(seg.valid, ct)
    return kt.permute(0, 2, 1, 3), vt.permute(0, 2, 1, 3), seg.pos, bias


def _dense_counts(seg: CountKeys, ct: torch.dtype):
    uk = seg.k_table[seg.codes].to(ct).permute(0, 2, 1, 3)
    uv = seg.v_table[seg.codes].to(ct).permute(0, 2, 1, 3)
    return uk, uv, None, seg.log_counts.to(ct)


# one CPU segment function per key form: (K [B, Hkv, N, Dh], V, pos [B, N] or None = seen by every query,
# additive key bias [B, N] or None)
_DENSE = {TokenKeys: _dense_tokens, TableKeys: _dense_table, GroupTableKeys: _dense_group_table,
          CountKeys: _dense_counts}


def _valid_bias(valid: torch.Tensor, ct) -> torch.Tensor:
    return torch.zeros(valid.shape, dtype=ct, device=valid.device).masked_fill_(~valid, _NEG_INF)


def _attention_torch(qs: Queries, segments: Sequence[Segment], out_dtype: torch.dtype
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """CPU path: one attention per key segment, each through torch's fused CPU flash-attention kernel
    (which returns the log-sum-exp), merged by lse. No concatenation of keys, and the local segment
    usually runs with no mask at all."""
    q = qs.q
    ct = _lse_dtype(q)
    acc_o, acc_l = None, None
    for seg in segments:
        K, V, kpos, kbias = _DENSE[type(seg)](seg, ct)
        o, l = _one_segment(qs, K, V, kpos, kbias, ct)
        if l.device.type == "cpu":          # before a merge, which would refuse it naming lse_a / lse_b (on a
            _check_lse(l)                   # device a sync: the result's check, with validate, names it)
        if acc_o is None:
            acc_o, acc_l = o, l
        else:
            acc_o, acc_l = merge_attention(acc_o, acc_l, o, l)
    if acc_o is None:
        out = torch.zeros(q.shape, dtype=out_dtype, device=q.device)
        return out, torch.full(q.shape[:3], _NEG_INF, dtype=ct, device=q.device)
    return acc_o.to(out_dtype), acc_l.to(ct)       # a float64 lse keeps a later merge of float64 outputs exact


def _attention_differentiable(qs: Queries, segments: Sequence[Segment], out_dtype: torch.dtype
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The autograd route (an input requires grad under grad mode): every segment's dense keys concatenated and one
    out-of-place softmax, so both ``out`` and ``lse`` carry gradients. The fused routes' log-sum-exp carries none
    (torch's CPU flash op), so their merge of several segments dropped the gradient through the softmax weights, and
    the Triton kernels have no backward. Memory ``[B, Hq, Tl, N]`` in the compute dtype."""
    q, ct = qs.q, _lse_dtype(qs.q)
    Ks, Vs, masks = [], [], []
    for seg in segments:
        K, V, kpos, kbias = _DENSE[type(seg)](seg, ct)
        mask = torch.zeros(qs.B, qs.Tl, K.shape[2], dtype=ct, device=q.device)
        if kbias is not None:
            mask = mask + kbias.unsqueeze(1)
        if qs.causal and kpos is not None:
            mask = mask.masked_fill(kpos.unsqueeze(1) > qs.q_pos.unsqueeze(2), _NEG_INF)
        Ks.append(K)
        Vs.append(V)
        masks.append(mask)
    K, V, mask = torch.cat(Ks, dim=2), torch.cat(Vs, dim=2), torch.cat(masks, dim=2).unsqueeze(1)
    G = qs.Hq // K.shape[1]
    if G > 1:
        K, V = K.repeat_interleave(G, dim=1), V.repeat_interleave(G, dim=1)
    empty = torch.isneginf(mask).all(dim=-1, keepdim=True)                 # [B, 1, Tl, 1]: no visible key
    s = (torch.matmul(q.to(ct), K.transpose(-1, -2)) * qs.scale + mask).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)     # (finite on empty rows: no NaN in their gradient)
    out = torch.matmul(torch.exp(s - lse), V).masked_fill(empty, 0.0)
    lse = lse.masked_fill(empty, _NEG_INF).squeeze(-1)
    return out.to(out_dtype), lse


_FLASH_FAILED: set = set()  # dtypes for which this torch build's CPU flash kernel raised
_MASK_ELEMS = 1 << 22  # mask elements per query chunk on the causal route (16 MiB fp32)
_CAUSAL_CHUNK = 64     # queries per call where causal keys are sorted (bench/RESULTS.md, issue 10 on Zen 5)
# above this many local keys the kernel's own causal triangle wastes little (its 512-key blocks are small against
# the sequence) and beats the masked chunks: measured 1024 keys chunked 21.7 ms vs 24.4, 2048 keys 87.8 vs 80.7
_CAUSAL_CHUNKED_MAX_KEYS = 1024


def _one_segment(qs: Queries, K, V, kpos, kbias, ct):
    """(out [B,Hq,Tl,Dh] ct, lse [B,Hq,Tl] ct) over one key segment; rows with no key: 0 / -inf."""
    kernel = _cpu_kernel()
    if kernel is not None and ct == torch.float32 and qs.q.device.type == "cpu" and _int32_positions(qs, kpos) \
            and not _needs_grad(qs.q, K, V, kbias):            # the kernel has no backward: torch's routes do
        return _attention_kernel(kernel, qs, K, V, kpos, kbias)
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is not None and qs.q.device.type == "cpu" and ct not in _FLASH_FAILED:
        try:
            return _attention_flash_cpu(flash, qs, K, V, kpos, kbias, ct)
        except RuntimeError as e:   # op missing a dtype on this torch build: the matmul route from now on
            if not (isinstance(e, NotImplementedError) or "not implemented" in str(e)):
                raise               # out of memory, say: raised as itself, the route stays
            _FLASH_FAILED.add(ct)
    return _attention_matmul(qs, K, V, kpos, kbias, ct)


_THREAD_WORK = 1 << 17      # (query, key, head-dim) products per thread at least: the kernel starts its threads
                            # per call (~20 us each); a decode step (1 query x 1024 keys x 12 heads) gets 6


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _cpu_kernel():
    """The C++ attention kernel module (``astra_kernels._attention_cpu``) where it runs on this CPU, else None."""
    try:
        from . import _attention_cpu
    except ImportError:        # a build without it: torch's flash kernel
        return None
    return _attention_cpu if _attention_cpu.available() else None


def _masked_causally(qs: Queries, kpos) -> bool:
    """Whether the causal mask hides some key of the segment from some query (not when every key is at or before
    every query, e.g. an earlier rank's chunk)."""
    if not qs.causal or kpos is None:
        return False
    return not bool((kpos.max(dim=1).values <= qs.q_pos.min(dim=1).values).all())


def _int32_positions(qs: Queries, kpos) -> bool:
    """Whether the positions fit the kernel's int32 (token indices always do)."""
    if kpos is None or not qs.causal:
        return True
    lim = 2 ** 31 - 1
    return all(int(t.max()) <= lim and int(t.min()) >= -lim for t in (qs.q_pos, kpos) if t.numel())


@compile_opaque
def _attention_kernel(kernel, qs: Queries, K, V, kpos, kbias):
    """fp32 attention through the C++ kernel (csrc/attention_cpu.h): GQA, the key bias and the causal mask by
    position inside it (blocks of keys past a block of queries skipped when the keys are sorted), q/K/V read in
    place when their head dim is contiguous."""
    q = _rows_contiguous(qs.q.to(torch.float32))
    if q.stride(2) > kernel.MAX_QUERY_STRIDE:          # its int32 gather offsets would overflow
        q = torch.empty(q.shape, dtype=q.dtype).copy_(q)    # not .contiguous(): a [.., 1, Dh] q counts as contiguous
    K, V = _rows_contiguous(K), _rows_contiguous(V)
    B, Hq, Tl, Dh = q.shape
    Hkv, N = K.shape[1], K.shape[2]
    out = torch.empty(B, Hq, Tl, Dh, dtype=torch.float32)
    lse = torch.empty(B, Hq, Tl, dtype=torch.float32)
    causal = _masked_causally(qs, kpos)
    qp = qs.q_pos.to(torch.int32).contiguous() if causal else None
    kp = kpos.to(torch.int32).contiguous() if causal else None
    srt = causal and bool((kpos[:, 1:] >= kpos[:, :-1]).all())
    bias = None if kbias is None else kbias.to(torch.float32).contiguous()
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    threads = min(torch.get_num_threads(), max(1, B * Hq * Tl * N * Dh // _THREAD_WORK))
    kernel.attention_f32(ptr(q), *q.stride()[:3], ptr(K), *K.stride()[:3], ptr(V), *V.stride()[:3],
                         ptr(bias), 0 if bias is None else bias.stride(0), ptr(qp), ptr(kp), srt,
                         B, Hq, Hkv, Tl, N, Dh, qs.scale, ptr(out), *out.stride()[:3], ptr(lse), threads)
    return out, lse


def _attention_flash_cpu(flash, qs, K, V, kpos, kbias, ct):
    """torch's fused CPU flash-attention kernel with an additive float mask: key bias (padding -inf,
    log(count)) broadcast over queries, plus the causal mask by position where it matters.
    GQA: the G query heads of a kv head are stacked along the query axis (a view of q where its head dim is
    contiguous, as for G = 1: the kernel reads any strides but that one's)."""
    q = qs.q
    B, Hq, Hkv, Tl, Dh = qs.B, qs.Hq, K.shape[1], qs.Tl, qs.Dh
    G = Hq // Hkv
    N = K.shape[2]
    K, V = _rows_contiguous(K), _rows_contiguous(V)    # the kernel takes any strides but the head dim's
    q5 = _rows_contiguous(q.to(ct)).reshape(B, Hkv, G, Tl, Dh)
    causal = _masked_causally(qs, kpos)
    if (causal and N > _CAUSAL_CHUNKED_MAX_KEYS and kpos is qs.q_pos and Tl > 1
            and bool((kpos[:, 1:] > kpos[:, :-1]).all())):
        return _flash_triangle(flash, qs, K, V, kbias, ct)
    out = torch.empty(B, Hq, Tl, Dh, dtype=ct, device=q.device)
    lse = torch.empty(B, Hq, Tl, dtype=ct, device=q.device)
    chunk, ends = _causal_plan(qs, kpos, B * G, N) if causal else (Tl, None)
    for i, t0 in enumerate(range(0, Tl, chunk)):
        t1 = min(Tl, t0 + chunk)
        c = t1 - t0
        n = N if ends is None else ends[i]          # keys past n are after every query of the chunk
        if n == 0:
            out[:, :, t0:t1] = 0.0
            lse[:, :, t0:t1] = _NEG_INF
            continue
        qc = q5[:, :, :, t0:t1].reshape(B, Hkv, G * c, Dh)
        mask, empty = _chunk_mask(qs, kpos, kbias, t0, t1, n, G, ct) if causal else _bias_mask(kbias, B, N, c, ct)
        o, l = flash(qc, K[:, :, :n], V[:, :, :n], 0.0, False, attn_mask=mask, scale=qs.scale)
        o = o.reshape(B, Hq, c, Dh)
        l = l.reshape(B, Hq, c)
        if empty is not None and bool(empty.any()):
            e = empty.unsqueeze(1).expand(B, Hq, c)
            o = o.masked_fill(e.unsqueeze(-1), 0.0)
            l = l.masked_fill(e, _NEG_INF)
        out[:, :, t0:t1] = o
        lse[:, :, t0:t1] = l
    return out, lse


def _flash_triangle(flash, qs: Queries, K, V, kbias, ct):
    """The local segment with strictly increasing positions: the causal mask is the index triangle, which the
    flash kernel applies itself (``is_causal=True``, skipping its 512-key blocks above the diagonal)."""
    q = qs.q
    B, Hq, Hkv, Tl = qs.B, qs.Hq, K.shape[1], qs.Tl
    G = Hq // Hkv
    Kx = K if G == 1 else K.repeat_interleave(G, dim=1)
    Vx = V if G == 1 else V.repeat_interleave(G, dim=1)
    mask, _ = _bias_mask(kbias, B, K.shape[2], Tl, ct)
    o, l = flash(_rows_contiguous(q.to(ct)), Kx, Vx, 0.0, True, attn_mask=mask, scale=qs.scale)
    l = l.to(ct)
    if kbias is not None:
        empty = (~torch.isneginf(kbias)).cumsum(dim=1) == 0          # no visible key up to i
        if bool(empty.any()):
            e = empty.unsqueeze(1).expand(B, Hq, Tl)
            o = o.masked_fill(e.unsqueeze(-1), 0.0)
            l = l.masked_fill(e, _NEG_INF)
    return o, l


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is contiguous (e.g. HF's ``[B, T, H, Dh] -> [B, H, T, Dh]`` transposed
    views, which the CPU flash kernel reads in place), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _causal_plan(qs: Queries, kpos: torch.Tensor, rows: int, N: int):
    """(query chunk size, keys each chunk reads or None = all) for the causal route. Keys sorted by position
    (the local segment, contiguous chunks): each chunk of ``_CAUSAL_CHUNK`` queries reads only the key prefix
    up to its last query, which skips the work above the diagonal that torch's kernel does not skip."""
    Tl = qs.Tl
    chunk = max(1, min(Tl, _MASK_ELEMS // max(1, rows * N)))
    if N < 2 * _CAUSAL_CHUNK or not bool((kpos[:, 1:] >= kpos[:, :-1]).all()):
        return chunk, None
    chunk = min(chunk, _CAUSAL_CHUNK)
    last = torch.stack([qs.q_pos[:, t0:t0 + chunk].amax(dim=1) for t0 in range(0, Tl, chunk)], dim=1)  # [B, n]
    ends = torch.searchsorted(kpos.contiguous(), last.contiguous(), right=True)
    return chunk, ends.amax(dim=0).tolist()


def _chunk_mask(qs: Queries, kpos, kbias, t0: int, t1: int, n: int, G: int, ct):
    """Additive mask ``[B, 1, G * c, n]`` of queries ``t0:t1`` over the first ``n`` keys (key bias + causal), and
    the rows that see no key ``[B, c]``."""
    B, c = qs.B, t1 - t0
    mask = torch.zeros(B, c, n, dtype=ct, device=qs.q.device)
    if kbias is not None:
        mask.add_(kbias[:, :n].unsqueeze(1))
    mask.masked_fill_(kpos[:, :n].unsqueeze(1) > qs.q_pos[:, t0:t1].unsqueeze(2), _NEG_INF)
    empty = torch.isneginf(mask).all(dim=-1)                      # [B, c]
    return mask.unsqueeze(1).unsqueeze(1).expand(B, 1, G, c, n).reshape(B, 1, G * c, n), empty


def _bias_mask(kbias, B: int, N: int, c: int, ct):
    """Key bias alone ``[B, 1, 1, N]`` (zeros without one) and the rows that see no key ``[B, c]`` (or None).
    Always a mask: with none, torch's CPU flash kernel turns a row whose fp32 scores overflow to NaN into
    ``out = 0, lse = 0`` (a wrong answer no check can see); with one the NaN reaches the lse (~1 % slower)."""
    if kbias is None:
        return torch.zeros(B, 1, 1, N, dtype=ct), None
    return kbias.view(B, 1, 1, N), torch.isneginf(kbias).all(dim=-1, keepdim=True).expand(B, c)


def _attention_matmul(qs, K, V, kpos, kbias, ct):
    """Portable route: explicit matmul + softmax, query-chunked to bound memory."""
    q = qs.q
    B, Hq, Hkv, Tl, Dh = qs.B, qs.Hq, K.shape[1], qs.Tl, qs.Dh
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
        qc = (q5[:, :, :, t0:t1].to(ct) * qs.scale).reshape(B, Hkv, G * c, Dh)
        s = torch.matmul(qc, Kt).view(B, Hkv, G, c, N)
        if bias5 is not None:
            s.add_(bias5)
        if qs.causal and kpos is not None:
            hide = kpos.unsqueeze(1) > qs.q_pos[:, t0:t1].unsqueeze(2)  # [B, c, N]
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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ground truth in float64: build every non-local key per token, concatenate, softmax.

    Returns ``(out, lse)`` in float64 (``out = 0, lse = -inf`` for rows with no visible key).
    Arguments as :func:`mixed_attention` (the per-token definition: no ``count_weighted``, no backend).
    """
    f = torch.float64
    B, Hq, Tl, Dh = q.shape
    scale = 1.0 / math.sqrt(Dh) if scale is None else float(scale)
    keys, vals, pos, valid = [], [], [], []
    qp = positions("q_pos", q_pos, B, Tl, 0, q.device)
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
            kp = positions("kv_pos", kv_pos, B, Tr, Tl, q.device)
            c = rope_cos.to(f)[kp].unsqueeze(2)
            s = rope_sin.to(f)[kp].unsqueeze(2)
            h = Dh // 2
            kt = kt * c + torch.cat((-kt[..., h:], kt[..., :h]), dim=-1) * s
        keys.append(kt.permute(0, 2, 1, 3))
        vals.append(v_table.to(f)[codes.long()].permute(0, 2, 1, 3))
    else:
        Tr = 0
    if Tr or k_hat is not None or codes is not None:
        pos.append(positions("kv_pos", kv_pos, B, Tr, Tl, q.device))
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
