"""What a parallel forward returns: ``pm(**inputs, output=KIND, dst=None)`` (docs/runtime.md, "Outputs").

Every rank runs the model on its own tokens; an *output kind* then turns the ranks' local outputs into what the
caller asked for, sending only what that needs:

=================  ============================================================  =====================================
kind               result                                                        what travels (per rank)
=================  ============================================================  =====================================
``local``          the model's output type over this rank's tokens               nothing
``hidden_states``  the model's output type over the whole sequence              its tokens' per-token outputs
``mean_pooled``    ``[B, D]`` attention-mask-weighted mean of the last hidden    ``[B, D + 1]`` float32 (sums, count)
                   state (sentence embeddings)
``class_token``    the model's output type holding what it computes from its     nothing (distributed class tokens), or
                   class token (``pooler_output`` + the class row, or a          the holder's small result
                   classification head's ``logits``)
``last_logits``    ``[B, V]`` a causal LM's logits at each row's last attended   the holder's rows only
                   position (``T - 1`` with left padding or no mask)
=================  ============================================================  =====================================

``output=None`` is the model's natural output: a classification head's logits (``class_token``); ``local`` for
base models and LM heads. Kinds are registered with :func:`register_output`; bytes moved are counted in
:class:`OutputStats` (``pm.output_stats``). A float64 model's mean-pooled sums travel in float64.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

from astra_kernels.checks import is_count
from .errors import UnsupportedModelError
from .models import Family, keeps_logits


@dataclass
class OutputStats:
    """Bytes one forward's output moved on this rank (after the layers; the layers' own are ``pm.stats``)."""
    output: str
    bytes_sent: int = 0          # this rank's payload bytes
    bytes_received: int = 0      # the other ranks' payload bytes that reached this rank
    bytes_on_wire: int = 0       # what this rank handed the collectives (envelopes and padding included)
    wait_s: float = 0.0


@dataclass
class Forward:
    """What one parallel forward left for its output kind."""
    rt: Any                       # the DistRuntime (output_exchange / output_broadcast)
    out: Any                      # the model's output on this rank's tokens (the whole sequence when ``alone``)
    hidden: Optional[torch.Tensor]  # the base model's last hidden state on the same tokens
    token_logits: Optional[torch.Tensor]  # a decoder classification head's per-token logits (its ``score``)
    input_ids: Optional[torch.Tensor]     # the full [B, T] input ids (a decoder classifier pools at the last non-pad)
    T: int
    local: torch.Tensor           # global indices of this rank's tokens (class token first when replicated)
    chunks: List[torch.Tensor]    # every rank's non-replicated tokens (the forward's split; empty when ``alone``)
    mask: Optional[torch.Tensor]  # [B, T] bool attention mask
    alone: bool                   # computed over the whole sequence on this rank (peer failure fallback)
    dst: Optional[int]
    stats: OutputStats
    logits_kept: Optional[torch.Tensor] = None    # the local positions ``out["logits"]`` holds (None: every one)

    @property
    def fam(self) -> Family:
        return self.rt.fam

    @property
    def rank(self) -> int:
        return self.rt.rank

    @property
    def cls(self) -> bool:
        return self.rt.cls

    def class_holder(self) -> Optional[int]:
        """The rank whose class token is the model's (None: every rank's is, distributed class tokens)."""
        return None if (self.cls or self.alone) else 0

    def exchange(self, build: Callable[[], torch.Tensor], sizes: Sequence[int], what: str) -> List[torch.Tensor]:
        """Every rank's bytes (``build()`` here, ``sizes[s]`` bytes from rank s), one enveloped all-gather."""
        return self.rt.output_exchange(build, sizes, self.stats, what)

    def from_rank(self, src: int, build: Callable[[], Dict[str, torch.Tensor]], like: Dict[str, torch.Tensor],
                  what: str) -> Dict[str, torch.Tensor]:
        """Rank ``src``'s tensors (``build()`` there; shapes and dtypes of ``like``) on the ranks that need them:
        nothing moves when ``dst`` is ``src``, else one enveloped broadcast."""
        if self.dst == src:
            return build() if self.rank == src else {}
        nbytes = sum(t.numel() * t.element_size() for t in like.values())

        def payload():
            got = build()
            for k, t in like.items():
                if k not in got or got[k].shape != t.shape or got[k].dtype != t.dtype:
                    raise ValueError(f"{what}: rank {src} has {k} "
                                     f"{None if k not in got else (tuple(got[k].shape), got[k].dtype)}, expected "
                                     f"{(tuple(t.shape), t.dtype)}")
            return pack([got[k] for k in like])

        buf = self.rt.output_broadcast(payload, nbytes, src, self.stats, what)
        return dict(zip(like, unpack(buf, list(like.values()))))


def pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Tensors as one 1-D uint8 payload."""
    return torch.cat([_flat(t).view(torch.uint8) for t in tensors])


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 1-D tensor of stride 1. A one-element tensor counts as contiguous whatever its strides (HF's QA
    heads give ``[1, 1]`` start / end logits of strides (2, 2)), and reshape keeps them: a byte view refuses that."""
    flat = t.detach().contiguous().reshape(-1)
    return flat if flat.numel() == 0 or flat.stride(0) == 1 else flat.clone(memory_format=torch.contiguous_format)


def unpack(buf: torch.Tensor, like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The tensors of :func:`pack` back, with the shapes and dtypes of ``like``."""
    res, at = [], 0
    for t in like:
        n = t.numel() * t.element_size()
        res.append(buf[at:at + n].clone().view(t.dtype).view(t.shape))
        at += n
    return res


# ------------------------------------------------------------------------------------------------
# the registry
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputKind:
    name: str
    compute: Callable[[Forward], Any]
    refuse: Callable[[Family], Optional[str]]    # why this family can not give this output (None: it can)
    doc: str


OUTPUTS: Dict[str, OutputKind] = {}


def register_output(name: str, doc: str, refuse: Callable[[Family], Optional[str]] = lambda fam: None):
    """Register an output kind: ``compute(forward) -> result``; ``refuse(family)`` says why a family has none."""
    def deco(fn):
        OUTPUTS[name] = OutputKind(name, fn, refuse, doc)
        return fn
    return deco


def class_head(fam: Family) -> bool:
    """A classification head: its ``logits`` are computed from one token (the class token, or a decoder's last
    non-pad token)."""
    return fam.head is not None and "logits" in fam.pooled_outputs


def decoder_classifier(fam: Family) -> bool:
    """A sequence classifier on a decoder: it pools its per-token logits at the last non-pad token."""
    return class_head(fam) and fam.pooling == "last_token"


def natural_output(fam: Family) -> OutputKind:
    """What ``output=None`` means: a classification head's logits in the model's output type (an encoder's from
    its class token, a decoder's at its last non-pad token), else this rank's local outputs."""
    if decoder_classifier(fam):
        last = OUTPUTS["last_logits"]
        return OutputKind(last.name, lambda fw: as_head_output(fw, last.compute(fw)), last.refuse, last.doc)
    return OUTPUTS["class_token" if class_head(fam) else "local"]


def as_head_output(fw: Forward, logits: Optional[torch.Tensor]):
    return None if logits is None else type(fw.out)(logits=logits)


def _hidden_of(out) -> Optional[torch.Tensor]:
    """The last hidden state in a module's output: a model output's ``last_hidden_state`` or a tuple's first tensor
    (None for anything else, such as an embedding's or a pooler's plain tensor)."""
    h = getattr(out, "last_hidden_state", None)
    if h is None and isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        h = out[0]
    return h if isinstance(h, torch.Tensor) else None


def _keep_hidden(got: Dict[str, torch.Tensor]):
    def hook(module, args, out):
        h = _hidden_of(out)
        if h is not None:
            got["hidden"] = h
    return hook


@contextlib.contextmanager
def captured(fam: Family) -> Iterator[Dict[str, torch.Tensor]]:
    """Within the block, the forward's base-model last hidden state (``"hidden"``, for heads) and a decoder
    classifier's per-token logits (``"token_logits"``, the output of its ``score``). A head that calls a module
    inside its base instead of the base itself (OPT's ``model.decoder``) leaves it that module's output: the base's
    direct children are watched too, and the base's own output, which comes last, wins where it runs."""
    got: Dict[str, torch.Tensor] = {}
    hooks = []
    if fam.base is not fam.model:
        hooks += [m.register_forward_hook(_keep_hidden(got)) for m in (*fam.base.children(), fam.base)]
    if decoder_classifier(fam):
        hooks.append(fam.model.score.register_forward_hook(lambda m, a, o: got.__setitem__("token_logits", o)))
    try:
        yield got
    finally:
        for h in hooks:
            h.remove()


def resolve_output(fam: Family, output: Optional[str]) -> OutputKind:
    if output is None:
        return natural_output(fam)
    name = output
    kind = OUTPUTS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise ValueError(f"output must be None or one of {sorted(OUTPUTS)}, got {output!r}")
    why = kind.refuse(fam)
    if why:
        raise UnsupportedModelError(f"output={name!r} is not available for {type(fam.model).__name__}: {why}")
    return kind


def check_dst(dst, world: int) -> Optional[int]:
    if dst is None:
        return None
    if not is_count(dst, 0) or dst >= world:
        raise ValueError(f"dst must be None (every rank) or a rank in 0..{world - 1}, got {dst!r}")
    return int(dst)


def class_like(fw: Forward) -> Dict[str, torch.Tensor]:
    """Empty tensors shaped as the fields computed from the class token (a classification head's ``logits``, or
    the class row of the last hidden state and the pooler output): every rank knows them, holder or not."""
    fam, h = fw.fam, fw.hidden
    B, D = h.shape[0], h.shape[-1]
    if class_head(fam):
        return {"logits": h.new_empty(B, fam.model.config.num_labels)}
    like = {"last_hidden_state": h.new_empty(B, 1, D)}
    pooler = getattr(fam.base, "pooler", None)
    if "pooler_output" in fam.pooled_outputs and pooler is not None:
        like["pooler_output"] = h.new_empty(B, pooler.dense.out_features)
    return like


def class_fields(out, like: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The fields of ``like`` from ``out`` of the class token's holder (the class row: its first token)."""
    return {k: out[k][:, :1] if k == "last_hidden_state" else out[k] for k in like}


def token_fields(fam: Family) -> List[str]:
    """The per-token fields of the model's output."""
    return list(fam.token_outputs)


def token_tensors(fam: Family, out) -> Dict[str, torch.Tensor]:
    """The per-token fields that ``out`` holds as tensors, by name."""
    get = out.get if hasattr(out, "get") else (lambda k: None)
    return {k: get(k) for k in token_fields(fam) if isinstance(get(k), torch.Tensor)}


def token_signature(fam: Family, out) -> str:
    """What every rank's per-token fields of ``out`` must share for a gather (the bytes each rank sends follow
    from it): each field's name, dtype, batch and per-token shape; its token count is the rank's own."""
    parts = [f"{k}: {t.dtype} [{', '.join(map(str, t.shape[:1]))}, *, {', '.join(map(str, t.shape[2:]))}]"
             if t.dim() >= 2 else f"{k}: {t.dtype} {tuple(t.shape)}" for k, t in token_tensors(fam, out).items()]
    return "; ".join(parts) or "no per-token fields"


def _no_class_token(fam: Family) -> Optional[str]:
    if not fam.class_token_allowed:
        return f"{fam.name} has no class token"
    if fam.head is not None and not class_head(fam):
        return (f"its {fam.head} head's outputs are all per-token, none is computed from the class token "
                "(output='hidden_states' or 'local' give them)")
    return None


def _no_lm_head(fam: Family) -> Optional[str]:
    if fam.head == "causal_lm" or decoder_classifier(fam):
        return None
    return "it needs a causal LM head or a decoder's sequence classification head (per-token logits)"


# ------------------------------------------------------------------------------------------------
# the kinds
# ------------------------------------------------------------------------------------------------
@register_output("local", "this rank's tokens' outputs; fields computed from the class token only on its holder")
def local_output(fw: Forward):
    if decoder_classifier(fw.fam) and not fw.alone:     # pooled at a token that may be on another rank
        return type(fw.out)(**{k: v for k, v in fw.out.items() if k != "logits"})
    holder = fw.class_holder()
    if holder is None or holder == fw.rank or not fw.fam.class_token_allowed:
        return fw.out
    drop = set(class_like(fw)) - {"last_hidden_state"}
    return type(fw.out)(**{k: v for k, v in fw.out.items() if k not in drop})


@register_output("hidden_states", "the model's output over the whole sequence: every per-token field gathered")
def hidden_states(fw: Forward):
    out = fw.out
    if fw.alone:
        return out
    fam, cls = fw.fam, fw.cls
    keys = list(token_tensors(fam, out))
    bodies = [out[k][:, 1:] if cls else out[k] for k in keys]
    lengths = [int(c.numel()) for c in fw.chunks]
    fields = dict(out.items())
    if keys:
        parts = fw.exchange(lambda: pack(bodies), [sum(_nbytes(b, n) for b in bodies) for n in lengths],
                            "gather of " + "+".join(keys))
        full = [unpack(p, [b.new_empty(b.shape[0], n, *b.shape[2:]) for b in bodies]) for p, n in zip(parts, lengths)]
        for i, key in enumerate(keys):
            fields[key] = torch.cat(([out[key][:, :1]] if cls else []) + [f[i] for f in full], dim=1)
    if decoder_classifier(fam):
        fields["logits"] = last_logits(fw)
    holder = fw.class_holder()
    like = {k: v for k, v in class_like(fw).items() if k != "last_hidden_state"} if fam.class_token_allowed else {}
    if holder is not None and like:
        fields.update(fw.from_rank(holder, lambda: class_fields(out, like), like, "class-token outputs"))
    return type(out)(**fields)


def _nbytes(body: torch.Tensor, n: int) -> int:
    """Bytes of ``body`` ``[B, n_local, ...]`` with ``n`` tokens instead."""
    return body.shape[0] * n * math.prod(body.shape[2:]) * body.element_size()


@register_output("mean_pooled", "[B, D] attention-mask-weighted mean of the last hidden state (a sum and a count "
                                "per rank)")
def mean_pooled(fw: Forward) -> torch.Tensor:
    h = fw.hidden
    idx = torch.arange(fw.T, device=h.device) if fw.alone else fw.local.to(h.device)
    acc = torch.promote_types(h.dtype, torch.float32)       # float32 sums, float64 for a float64 model
    w = (torch.ones(h.shape[0], fw.T, device=h.device) if fw.mask is None else fw.mask.to(h.device))[:, idx].to(acc)
    if fw.cls and not fw.alone and fw.rank != 0:
        w[:, 0] = 0                 # the replicated class token counts once (rank 0's copy)
    part = torch.cat([(h.to(acc) * w.unsqueeze(-1)).sum(1), w.sum(1, keepdim=True)], dim=1)     # [B, D + 1]
    if not fw.alone:
        nbytes = part.numel() * part.element_size()
        parts = fw.exchange(lambda: pack([part]), [nbytes] * fw.rt.world, "mean-pooled sums")
        part = unpack(parts[0], [part])[0]
        for p in parts[1:]:
            part = part + unpack(p, [part])[0]       # rank order: the same sum, bit for bit, on every rank
    return (part[:, :-1] / part[:, -1:].clamp(min=1e-9)).to(h.dtype)


@register_output("class_token", "the outputs computed from the class token: pooler output and class row, or a "
                                "classification head's logits", refuse=_no_class_token)
def class_token(fw: Forward):
    like = class_like(fw)
    holder = fw.class_holder()
    if holder is None:
        return type(fw.out)(**class_fields(fw.out, like))
    return type(fw.out)(**fw.from_rank(holder, lambda: class_fields(fw.out, like), like, "class-token outputs"))


@register_output("last_logits", "[B, V] logits at each row's last attended position (a decoder classifier: at "
                                "its last non-pad token, as HF pools)", refuse=_no_lm_head)
def last_logits(fw: Forward) -> torch.Tensor:
    logits = fw.out["logits"] if fw.token_logits is None else fw.token_logits
    B = logits.shape[0]
    if decoder_classifier(fw.fam):
        pos = fw.fam.pooled_tokens({"input_ids": fw.input_ids}, B, fw.T).to(logits.device)
    else:
        pos = last_positions(fw.mask, B, fw.T).to(logits.device)
    if fw.alone:
        return logits[torch.arange(B, device=logits.device), pos]
    starts = torch.tensor([int(c[0]) for c in fw.chunks], device=logits.device)
    owner = torch.searchsorted(starts, pos, right=True) - 1                  # the rank holding each row's position
    mine = (owner == fw.rank).nonzero()[:, 0]
    at = pos[mine] - starts[fw.rank]                                       # local positions
    if fw.logits_kept is not None:                                         # the head computed these positions only
        at = torch.searchsorted(fw.logits_kept.to(at.device), at)
    rows = lambda: logits[mine, at]                                        # noqa: E731  [k, V] this rank's rows
    owners = sorted(set(owner.tolist()))
    like = logits.new_empty(B, logits.shape[2])
    if len(owners) == 1:                                                   # the usual case: every row on one rank
        return fw.from_rank(owners[0], lambda: {"x": rows()}, {"x": like}, "last-position logits").get("x")
    row_bytes = logits.shape[2] * logits.element_size()
    sizes = [int((owner == s).sum()) * row_bytes for s in range(fw.rt.world)]
    parts = fw.exchange(lambda: pack([rows()]), sizes, "last-position logits")
    for s, p in enumerate(parts):
        sel = (owner == s).nonzero()[:, 0]
        like[sel] = unpack(p, [like[sel]])[0]
    return like


def last_logits_kept(fam: Family, model, mask: Optional[torch.Tensor], batch: int, T: int,
                     local: torch.Tensor) -> Optional[torch.Tensor]:
    """For ``last_logits``: the positions among this rank's ``local`` tokens (global indices) that are some row's
    last attended position, as the LM head's ``logits_to_keep``, so that it computes ``[B, k, V]``, not every local
    token's ``[B, n, V]`` (1.5-2.2x the memory of HF's own ``logits_to_keep=1`` forward at T = 4096). None for a
    decoder classifier (its score head pools) or a model that takes no ``logits_to_keep``."""
    if decoder_classifier(fam) or not keeps_logits(model):
        return None
    last = last_positions(mask, batch, T).to(local.device)
    return torch.isin(local, last).nonzero()[:, 0]


def last_positions(mask: Optional[torch.Tensor], batch: int, T: int) -> torch.Tensor:
    """Each row's last attended position (``T - 1`` without a mask or for an empty row), as HF picks the last
    token of a padded batch (sentence-transformers ``lasttoken``; the position a left-padded prompt continues)."""
    if mask is None:
        return torch.full((batch,), T - 1, dtype=torch.long)
    m = mask.to(torch.long)
    values, idx = m.flip(1).max(1)
    return torch.where(values == 0, T - 1, T - 1 - idx).cpu()
