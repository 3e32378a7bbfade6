"""Key segments of mixed-precision attention: the keys a block of local queries attends to.

Four key forms, in the words of the docs:

* :class:`TokenKeys` - **per token**: full-precision ``k, v [B, Hkv, N, Dh]`` at global positions
  ``pos [B, N]`` (the local tokens, or non-local tokens whose K/V were computed from dequantized codes);
* :class:`TableKeys` - **table**: ``codes [B, N]`` into per-layer ``k_table, v_table [K, Hkv, Dh]``,
  gathered per token at ``pos``; with ``rope_cos, rope_sin [P, Dh]`` the gathered key is rotated by its
  position (HF Llama ``rotate_half`` convention);
* :class:`GroupTableKeys` - **group table** (grouped VQ, G > 1): ``codes [B, N, G]`` into per-group partial
  tables ``[G, K, Hkv, Dh]``; a key is the sum of its G gathered rows (optionally RoPE-rotated);
* :class:`CountKeys` - **count**: distinct ``codes [B, U]`` with ``log_counts [B, U]`` (``log(count)``
  added to the score, ``-inf`` = padding), visible to every query (no position).

Each form checks its own shapes and dtypes when built (cheap: no device sync); ``check_values()`` does
the checks that need a sync (finite values, code range, RoPE range); ``num_keys`` and ``heads()`` give
its size; forms with positions also have ``take(order, valid)`` (select keys per row). ``valid [B, N]`` (bool, True =
attend) is an optional key padding mask. Two pure functions transform segments: :func:`prune_causal`
drops keys no query can see, :func:`split_counts` turns table keys into count keys (+ the per-token keys
visible to only some queries). Both backends take a list of segments.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Union

import torch

from .checks import check_finite, check_float, check_int, check_mask, require

__all__ = ["TokenKeys", "TableKeys", "GroupTableKeys", "CountKeys", "Segment", "positions", "prune_causal",
           "split_counts"]


def positions(name: str, pos, B: int, T: int, default_start: int = 0, device=None) -> torch.Tensor:
    """Normalise a ``[T]`` / ``[B, T]`` integer position tensor (None: ``default_start + arange(T)``)
    to int64 ``[B, T]``."""
    if pos is None:
        return (torch.arange(T, device=device, dtype=torch.int64) + default_start).expand(B, T)
    check_int(name, pos)
    if pos.dim() == 1:
        require(pos.shape[0] == T, f"{name} has length {pos.shape[0]}, expected {T}")
        pos = pos.expand(B, T)
    else:
        require(pos.dim() == 2 and tuple(pos.shape) == (B, T),
                f"{name} must have shape [{T}] or [{B}, {T}], got {tuple(pos.shape)}")
    return pos.to(torch.int64)


def _check_tables(k_table, v_table) -> None:
    check_float("k_table", k_table, 3)
    check_float("v_table", v_table, 3)
    require(tuple(k_table.shape) == tuple(v_table.shape),
            f"k_table and v_table shapes differ: {tuple(k_table.shape)} vs {tuple(v_table.shape)}")


def _check_code_range(codes: torch.Tensor, K: int) -> None:
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        require(lo >= 0 and hi < K, f"codes out of table range [0, {K}): min {lo}, max {hi}")


def _check_rope(rope_cos, rope_sin, Dh: int) -> None:
    if rope_cos is None and rope_sin is None:
        return
    require(rope_cos is not None and rope_sin is not None, "RoPE needs both rope_cos and rope_sin")
    check_float("rope_cos", rope_cos, 2)
    check_float("rope_sin", rope_sin, 2)
    require(tuple(rope_cos.shape) == tuple(rope_sin.shape) and rope_cos.shape[1] == Dh,
            f"rope_cos/rope_sin must both have shape [P, Dh={Dh}], got {tuple(rope_cos.shape)}, "
            f"{tuple(rope_sin.shape)}")
    require(Dh % 2 == 0, f"RoPE needs an even head_dim, got {Dh}")


def _check_rope_values(seg) -> None:
    if seg.rope_cos is None:
        return
    check_finite("rope_cos", seg.rope_cos)
    check_finite("rope_sin", seg.rope_sin)
    if seg.pos.numel():
        P = seg.rope_cos.shape[0]
        lo, hi = int(seg.pos.min()), int(seg.pos.max())
        require(lo >= 0 and hi < P, f"kv_pos out of RoPE table range [0, {P}): min {lo}, max {hi}")


def check_codes_dtype(codes: torch.Tensor) -> None:
    """Code-indexed segments gather with their codes as indices: int64 or int32 (the public ops convert any integer
    dtype; uint8 indices read as a boolean mask, int16 ones fail inside torch)."""
    check_int("codes", codes)
    require(codes.dtype in (torch.int64, torch.int32), f"codes must be int64 or int32 in a key segment, got "
                                                       f"{codes.dtype} (attention_table / attention_group_table "
                                                       "take any integer dtype)")


@dataclass(frozen=True)
class TokenKeys:
    """Per-token keys: ``k, v [B, Hkv, N, Dh]`` (one float dtype), ``pos [B, N]`` int64,
    ``valid [B, N]`` bool or None (= all). ``name`` labels error messages."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    valid: Optional[torch.Tensor] = None
    name: str = "k_hat/v_hat"

    def __post_init__(self):
        check_float("k", self.k, 4)
        check_float("v", self.v, 4)
        require(tuple(self.k.shape) == tuple(self.v.shape),
                f"{self.name} shapes differ: {tuple(self.k.shape)} vs {tuple(self.v.shape)}")
        B, _, N, _ = self.k.shape
        require(self.pos.dtype == torch.int64 and tuple(self.pos.shape) == (B, N),
                f"{self.name} positions must be int64 [{B}, {N}], got {self.pos.dtype} {tuple(self.pos.shape)}")
        check_mask(f"{self.name} valid", self.valid, B, N)

    def check_values(self) -> None:
        check_finite(self.name.split("/")[0], self.k)
        check_finite(self.name.split("/")[-1], self.v)

    @property
    def label(self) -> str:
        """What error messages call these keys (the caller's argument names)."""
        return self.name

    @property
    def num_keys(self) -> int:
        return self.k.shape[2]

    def heads(self) -> tuple:
        """``(B, Hkv, Dh)``."""
        return self.k.shape[0], self.k.shape[1], self.k.shape[3]

    def take(self, order: torch.Tensor, valid: torch.Tensor) -> "TokenKeys":
        """The keys ``order [B, S]`` of each row, with key mask ``valid [B, S]``."""
        B, H, _, Dh = self.k.shape
        idx = order.view(B, 1, -1, 1).expand(B, H, order.shape[1], Dh)
        return replace(self, k=self.k.gather(2, idx), v=self.v.gather(2, idx), pos=self.pos.gather(1, order),
                       valid=valid)


@dataclass(frozen=True)
class _CodeIndexed:
    """What the code-indexed key forms share: ``codes [B, N, ...]`` into ``k_table, v_table [..., K, Hkv, Dh]``
    at positions ``pos`` with key mask ``valid``, optional RoPE tables ``rope_cos, rope_sin``."""

    codes: torch.Tensor
    k_table: torch.Tensor
    v_table: torch.Tensor
    pos: torch.Tensor
    valid: Optional[torch.Tensor] = None
    rope_cos: Optional[torch.Tensor] = None
    rope_sin: Optional[torch.Tensor] = None


    @property
    def rope(self) -> bool:
        return self.rope_cos is not None

    @property
    def label(self) -> str:
        """What error messages call these keys (the caller's argument names)."""
        return "codes/k_table"

    @property
    def num_keys(self) -> int:
        return self.codes.shape[1]

    def heads(self) -> tuple:
        """``(B, Hkv, Dh)``."""
        return self.codes.shape[0], self.k_table.shape[-2], self.k_table.shape[-1]

    def check_keys(self, K: int, Dh: int) -> None:
        """The checks every code-indexed form shares once its codes' shape is checked: a non-empty table
        (``K`` codewords) for given codes, ``pos [B, N]`` int64, the key mask, and RoPE tables of width ``Dh``."""
        B, N = self.codes.shape[:2]
        require(K >= 1 or N == 0, "k_table is empty but codes are given")
        require(self.pos.dtype == torch.int64 and tuple(self.pos.shape) == (B, N),
                f"kv_pos must be int64 [{B}, {N}], got {self.pos.dtype} {tuple(self.pos.shape)}")
        check_mask("remote_mask", self.valid, B, N)
        _check_rope(self.rope_cos, self.rope_sin, Dh)

    def check_values(self) -> None:
        check_finite("k_table", self.k_table)
        check_finite("v_table", self.v_table)
        _check_code_range(self.codes, self.k_table.shape[-3])
        _check_rope_values(self)


@dataclass(frozen=True)
class TableKeys(_CodeIndexed):
    """Table keys: ``codes [B, N]`` int64 into ``k_table, v_table [K, Hkv, Dh]``, ``pos [B, N]`` int64,
    ``valid [B, N]`` bool or None; optional RoPE tables ``rope_cos, rope_sin [P, Dh]`` (even Dh)."""

    def __post_init__(self):
        _check_tables(self.k_table, self.v_table)
        check_codes_dtype(self.codes)
        require(self.codes.dim() == 2, f"codes must have shape [B, Tr], got {tuple(self.codes.shape)}")
        self.check_keys(self.k_table.shape[0], self.k_table.shape[2])

    def take(self, order: torch.Tensor, valid: torch.Tensor) -> "TableKeys":
        """The keys ``order [B, S]`` of each row, with key mask ``valid [B, S]``."""
        return replace(self, codes=self.codes.gather(1, order), pos=self.pos.gather(1, order), valid=valid)


@dataclass(frozen=True)
class GroupTableKeys(_CodeIndexed):
    """Per-group table keys (grouped VQ, ``G >= 1``): ``codes [B, N, G]`` int64 into per-layer partial
    tables ``k_table, v_table [G, K, Hkv, Dh]`` (one float dtype; fp32, or bf16 / fp16 to halve the
    memory). A token's key (value) is the sum over groups of ``k_table[g, codes[..., g]]`` - exact for a
    linear K/V projection, whose bias lives in group 0's table (:func:`astra_kernels.build_group_tables`)
    - then, with ``rope_cos, rope_sin [P, Dh]``, rotated by its position ``pos [B, N]`` (as
    :class:`TableKeys`). ``valid [B, N]`` bool or None. Table memory: ``G * K * 2 * Hkv * Dh`` elements
    per layer."""

    def __post_init__(self):
        check_float("k_table", self.k_table, 4)
        check_float("v_table", self.v_table, 4)
        require(tuple(self.k_table.shape) == tuple(self.v_table.shape) and self.k_table.dtype == self.v_table.dtype,
                f"k_table and v_table differ: {tuple(self.k_table.shape)} {self.k_table.dtype} vs "
                f"{tuple(self.v_table.shape)} {self.v_table.dtype}")
        G, K = self.k_table.shape[:2]
        check_codes_dtype(self.codes)
        require(self.codes.dim() == 3 and self.codes.shape[2] == G,
                f"codes must have shape [B, Tr, G={G}], got {tuple(self.codes.shape)}")
        self.check_keys(K, self.k_table.shape[3])

    def take(self, order: torch.Tensor, valid: torch.Tensor) -> "GroupTableKeys":
        """The keys ``order [B, S]`` of each row, with key mask ``valid [B, S]``."""
        idx = order.unsqueeze(2).expand(-1, -1, self.codes.shape[2])
        return replace(self, codes=self.codes.gather(1, idx), pos=self.pos.gather(1, order), valid=valid)


@dataclass(frozen=True)
class CountKeys:
    """Count keys: distinct ``codes [B, U]`` int64 into ``k_table, v_table [K, Hkv, Dh]`` with
    ``log_counts [B, U]`` float32 (``-inf`` pads rows with fewer codes). Visible to every query."""

    codes: torch.Tensor
    log_counts: torch.Tensor
    k_table: torch.Tensor
    v_table: torch.Tensor

    def __post_init__(self):
        _check_tables(self.k_table, self.v_table)
        check_codes_dtype(self.codes)
        require(self.codes.dim() == 2, f"codes must have shape [B, U], got {tuple(self.codes.shape)}")
        require(self.log_counts.dtype == torch.float32 and self.log_counts.shape == self.codes.shape,
                f"log_counts must be float32 {tuple(self.codes.shape)}, got {self.log_counts.dtype} "
                f"{tuple(self.log_counts.shape)}")

    def check_values(self) -> None:
        check_finite("k_table", self.k_table)
        check_finite("v_table", self.v_table)
        _check_code_range(self.codes, self.k_table.shape[0])
        # finite, or -inf (padding): NaN / +inf read as a finite wrong answer or as an empty row
        if self.log_counts.numel():
            require(bool(self.log_counts.amax() < float("inf")), "log_counts contains NaN or +inf "
                    "(each entry is log(count), or -inf for padding)")

    @property
    def label(self) -> str:
        """What error messages call these keys (the caller's argument names; count weighting is internal)."""
        return "codes/k_table"

    @property
    def num_keys(self) -> int:
        return self.codes.shape[1]

    def heads(self) -> tuple:
        """``(B, Hkv, Dh)``."""
        return self.codes.shape[0], self.k_table.shape[1], self.k_table.shape[2]


Segment = Union[TokenKeys, TableKeys, GroupTableKeys, CountKeys]


def _compact(keep: torch.Tensor):
    """Per row, the indices of the kept entries first (stable), cut to the longest row's count.
    Returns (order [B, S] int64, valid [B, S] bool)."""
    if keep.shape[0] == 1:                  # one row: its kept indices, in order (no sort)
        order = keep[0].nonzero().reshape(1, -1)
        return order, keep.gather(1, order)
    S = int(keep.sum(dim=1).max()) if keep.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :S]
    return order, keep.gather(1, order)


def prune_causal(seg: Union[TokenKeys, TableKeys, GroupTableKeys], q_pos: torch.Tensor) -> Optional[Segment]:
    """Causal attention: drop the keys no query of ``q_pos [B, Tl]`` can see (after the last query, or
    padded). ``seg``: any segment with positions (``pos``, ``valid``, ``take``). Returns ``seg`` itself when
    nothing is dropped, None when nothing is left."""
    if seg.pos.numel() == 0:
        return None
    keep = seg.pos <= q_pos.max(dim=1, keepdim=True).values
    if seg.valid is not None:
        keep = keep & seg.valid
    if bool(keep.all()):
        return seg
    order, valid = _compact(keep)
    return seg.take(order, valid) if order.shape[1] else None


def split_counts(seg: TableKeys, q_pos: torch.Tensor, causal: bool) -> List[Segment]:
    """Count-weighted form of un-rotated table keys (attention equal in exact arithmetic): the distinct codes of the
    keys every query sees as :class:`CountKeys`; keys only some queries see (possible only when positions
    interleave) stay :class:`TableKeys`; keys no query sees are dropped."""
    require(not seg.rope, "count weighting is invalid with RoPE: rotated keys depend on position, not only on the code")
    codes, kp = seg.codes, seg.pos
    valid = torch.ones_like(codes, dtype=torch.bool) if seg.valid is None else seg.valid
    some = None
    if causal:
        always = valid & (kp <= q_pos.min(dim=1, keepdim=True).values)
        some = valid & (kp <= q_pos.max(dim=1, keepdim=True).values) & ~always
    else:
        always = valid
    B, K = codes.shape[0], seg.k_table.shape[0]
    counts = torch.zeros(B, K, dtype=torch.float32, device=codes.device)
    counts.scatter_add_(1, codes, always.to(torch.float32))
    ucodes, _ = _compact(counts > 0)
    out: List[Segment] = []
    if ucodes.shape[1]:
        # log 0 = -inf pads rows with fewer codes
        out.append(CountKeys(ucodes, counts.gather(1, ucodes).log(), seg.k_table, seg.v_table))
    if some is not None and bool(some.any()):
        order, v = _compact(some)
        out.append(seg.take(order, v))
    return out
