"""Ranks agree before they compute: a fixed-size fingerprint of what each rank was given, exchanged before the
first layer of every distributed forward (docs/runtime.md, "Failures").

The fingerprint has the same size on every rank whatever the inputs and in every astra version, so the exchange
itself can never fail on mismatched sizes. It holds the astra version, the call counter, the world size, digests of
the model description and weights, the codebooks and the input values, a text description of the inputs (names,
dtypes, shapes) and, when this rank rejected its inputs, the reason.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from astra_kernels.checks import INT_OF_SIZE
from .errors import InputMismatchError, InvalidInputError, RankFailedError, utf8_field

#: the fingerprint's size, the same in every astra version (a version that pairs fingerprints of two sizes in one
#: all-gather makes gloo abort the process): what a version changes is its layout, named by the magic
FINGERPRINT_NBYTES = 512
# magic, call, world, status, model (8 bytes of its description's digest, 8 of its weights'), codebooks and input
# values digests, then the astra version (text)
HEAD = struct.Struct("<IIII16s16s16s16s")
TEXT_NBYTES = FINGERPRINT_NBYTES - HEAD.size
MAGIC = 0x32505341                         # "ASP2": this layout
#: the layout astra 0.1.0 sent (no version field): named rather than read as another program's collective
MAGIC_V1 = 0x46505341                      # "ASPF"
VALID, INVALID = 0, 1
#: the status of a rank whose ``astra.parallelize`` failed: its fingerprint carries the reason and nothing else
SETUP_FAILED = 2


@dataclass(frozen=True)
class Fingerprint:
    call: int
    world: int
    status: int
    model: bytes
    codebooks: bytes
    values: bytes
    text: str            # the inputs' names, dtypes and shapes; or the reason they were rejected
    magic: int = MAGIC
    version: str = ""    # the astra version the rank runs

    def pack(self) -> torch.Tensor:
        text = utf8_field(self.text, TEXT_NBYTES)
        raw = HEAD.pack(self.magic, self.call & 0xFFFFFFFF, self.world, self.status, self.model, self.codebooks,
                        self.values, utf8_field(self.version, 16)) + text
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)

    @classmethod
    def unpack(cls, buf: torch.Tensor) -> "Fingerprint":
        raw = bytes(buf.tolist())
        magic, call, world, status, model, cbs, values, version = HEAD.unpack(raw[:HEAD.size])
        text = raw[HEAD.size:].rstrip(b"\0").decode("utf-8", "replace")
        return cls(call, world, status, model, cbs, values, text, magic,
                   version.rstrip(b"\0").decode("utf-8", "replace"))


def digest(*parts: Any) -> bytes:
    """16-byte blake2b digest of strings, numbers and tensors (a tensor by dtype, shape and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().contiguous().cpu()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(p).encode())
        h.update(b"|")
    return h.digest()


#: :func:`weights_digest` weighs element i of a parameter by ``_position_weights()[i % _BLOCK]`` times ``i // _BLOCK
#: + 1`` (odd pseudo-random int32s from a multiplicative hash; the products wrap), ``_SLAB`` blocks at a time
_POS_MUL, _POS_ADD, _BLOCK, _SLAB = -7046029254386353131, 0x5851F42D4C957F2D, 1 << 16, 256


def _position_weights(dtype: torch.dtype, device) -> torch.Tensor:
    w = ((torch.arange(_BLOCK, dtype=torch.int64) * _POS_MUL + _POS_ADD) >> 32) | 1
    return w.to(device=device, dtype=torch.int64 if dtype == torch.int64 else torch.int32)


def _weighted_sum(bits: torch.Tensor) -> int:
    """``sum_i bits[i] * w(i)`` with the position weights above, exact (integer) whatever the reduction's order."""
    w = _position_weights(bits.dtype, bits.device)
    n, total = bits.numel(), 0
    for start in range(0, n, _BLOCK * _SLAB):
        part = bits[start: start + _BLOCK * _SLAB]
        full = part.numel() // _BLOCK * _BLOCK
        first = start // _BLOCK + 1
        if full:
            per_block = (part[:full].view(-1, _BLOCK) * w).sum(dim=1, dtype=torch.int64)
            index = torch.arange(first, first + per_block.numel(), dtype=torch.int64, device=bits.device)
            total += int((per_block * index).sum())
        if full < part.numel():
            total += int((part[full:] * w[: part.numel() - full]).sum(dtype=torch.int64)) * (first + full // _BLOCK)
    return total


@torch.no_grad()
def weights_digest(model) -> bytes:
    """8-byte digest of every parameter's values: per parameter the sum, as an integer, of its elements' bit
    patterns each weighted by an odd function of its position (:func:`_weighted_sum`), so the digest is exact and the
    same whatever the reduction's order or thread count, any one changed element changes it, and so do elements
    that trade places (a plain sum, and one of every third element, did not see two rows swapped). Two checkpoints,
    or two random initialisations, differ in it; the model's configuration and size alone did not tell them apart.
    (One pass over the weights: ~0.2 s for GPT-2's 124 M on 2 idle cores.)"""
    sums = []
    for name, p in model.named_parameters():
        sums += [name, _weighted_sum(p.detach().reshape(-1).view(INT_OF_SIZE[p.element_size()]))]
    return digest(*sums)[:8]


def config_text(config) -> str:
    """The model's configuration as the ranks compare it: its JSON without ``_name_or_path`` (the directory it was
    loaded from: one checkpoint in two places is one model)."""
    d = config.to_dict()
    d.pop("_name_or_path", None)
    return json.dumps(d, sort_keys=True, default=str)


def describe_inputs(inputs: Dict[str, Any]) -> str:
    parts = []
    for k in sorted(inputs):
        v = inputs[k]
        parts.append(f"{k}: {str(v.dtype).replace('torch.', '')}{list(v.shape)}" if isinstance(v, torch.Tensor)
                     else f"{k}={v!r}")
    return ", ".join(parts)


def inputs_digest(inputs: Dict[str, Any]) -> bytes:
    return digest(*[x for k in sorted(inputs) for x in (k, inputs[k])])


#: the size of a rank's setup description (:func:`describe_setup`), exchanged only once models or codebooks differ
SETUP_NBYTES = 4096


def describe_setup(model, adapter_text: str, codebooks) -> str:
    """What a rank runs, for naming a difference once the digests disagree: the model's class, parameter dtype and
    count, family adapter, a short digest of each configuration entry, and the codebooks' summary."""
    p = next(model.parameters())
    config = json.loads(config_text(model.config))
    return json.dumps({"model": f"{type(model).__name__}, {str(p.dtype).replace('torch.', '')}, "
                                f"{sum(q.numel() for q in model.parameters()):,} parameters",
                       "adapter": digest(adapter_text)[:4].hex(),
                       "config": {k: digest(json.dumps(v, sort_keys=True))[:3].hex() for k, v in config.items()},
                       "codebooks": "none" if codebooks is None else repr(codebooks)}, separators=(",", ":"))


def setup_differences(texts: List[str]) -> Optional[str]:
    """What differs between the ranks' :func:`describe_setup` texts (None: nothing they show)."""
    setups = [_parsed(t) for t in texts]
    if not all(isinstance(s, dict) and {"model", "codebooks", "adapter"} <= s.keys()
               and isinstance(s.get("config"), dict) for s in setups):
        return None             # cut at SETUP_NBYTES (or not astra's): the digests' message stands
    parts = []
    for key, name in (("model", "models"), ("codebooks", "codebooks")):
        if len({json.dumps(s[key]) for s in setups}) > 1:
            parts.append(_differ(name, [s[key] for s in setups]))
    if len({json.dumps(s["adapter"]) for s in setups}) > 1:
        parts.append("family adapters differ between ranks (register the same FamilyAdapter on every rank)")
    keys = sorted(set().union(*(s["config"] for s in setups)))
    differ = [k for k in keys if len({json.dumps(s["config"].get(k)) for s in setups}) > 1]
    if differ:
        shown = ", ".join(differ[:12]) + (f" and {len(differ) - 12} more" if len(differ) > 12 else "")
        parts.append(f"model configurations differ between ranks in: {shown}")
    return "; ".join(parts) or None


def _parsed(text: str) -> Any:
    """``text`` as JSON, or None where it is not JSON (cut at its field's size) or nests past the parser's depth."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _differ(name: str, values: List[str]) -> str:
    return f"{name} differ between ranks: " + "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))


def setups_differ(fps: List[Fingerprint]) -> bool:
    """The ranks run one world size but their models or codebooks differ (every rank sees it alike): the case in which
    they exchange :func:`describe_setup` texts to name the difference."""
    return (all(f.magic == MAGIC and f.status != SETUP_FAILED for f in fps) and len({f.version for f in fps}) == 1
            and len({f.world for f in fps}) == 1
            and (len({f.model[:8] for f in fps}) > 1 or len({f.codebooks for f in fps}) > 1))


#: the size of a rank's whole request text (a call's arguments: a generation config), exchanged only where the
#: fingerprints differ in their values alone (:func:`values_differ_only`): the fingerprint's text cuts it
REQUEST_NBYTES = 4096


def values_differ_only(fps: List[Fingerprint]) -> bool:
    """The fingerprints agree in everything but the values' digest, which also covers the whole request text (every
    rank sees it alike): the case in which the ranks exchange their requests to name a difference the text cut."""
    def same(attr: str) -> bool:
        return len({getattr(f, attr) for f in fps}) == 1
    return (all(f.magic == MAGIC and f.status == VALID for f in fps) and not same("values")
            and all(same(a) for a in ("version", "world", "model", "codebooks", "call", "text")))


def request_differences(requests: List[str]) -> Optional[str]:
    """What differs between the ranks' request texts (``"generate {json}; "``: the differing keys with each rank's
    value), or None where they are equal (the inputs' values differ)."""
    if len(set(requests)) == 1:
        return None
    fields = [_parsed(r.split(" ", 1)[1].rstrip("; ")) if " " in r else None for r in requests]
    if not all(isinstance(f, dict) for f in fields):
        return _differ("call arguments", requests)
    keys = sorted(set().union(*fields))
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in fields}) > 1]
    return f"{requests[0].split(' ', 1)[0]} arguments differ between ranks: " + "; ".join(
        f"{k} (" + ", ".join(f"rank {r}: {json.dumps(f.get(k))}" for r, f in enumerate(fields)) + ")"
        for k in differ[:8])


def disagreement(fps: List[Fingerprint], rank: int, setups: Optional[List[str]] = None,
                 requests: Optional[List[str]] = None) -> Optional[Exception]:
    """The error every rank raises for these fingerprints (the same on every rank), or None if they agree.
    ``setups``: every rank's :func:`describe_setup`, where :func:`setups_differ` had them exchanged; ``requests``:
    every rank's whole request text, where :func:`values_differ_only` had them exchanged."""
    world = len(fps)
    pre = f"astra rank {rank}/{world}: "
    older = [r for r, f in enumerate(fps) if f.magic == MAGIC_V1]
    strange = [r for r, f in enumerate(fps) if f.magic not in (MAGIC, MAGIC_V1)]
    if strange:
        return InputMismatchError(pre + f"rank(s) {strange} sent no astra input fingerprint: they are not running "
                                        "the same astra forward (another collective or program is interleaved)")
    versions = ["0.1.0 or older" if f.magic == MAGIC_V1 else f.version for f in fps]
    if older or len(set(versions)) > 1:
        return InputMismatchError(pre + "the ranks run different astra versions: " + "; ".join(
            f"rank {r}: astra {v}" for r, v in enumerate(versions)) + "; install one version on every node")
    failed = [r for r, f in enumerate(fps) if f.status == SETUP_FAILED]
    if failed:
        return RankFailedError(pre + "; ".join(f"rank {r} could not parallelize ({fps[r].text})" for r in failed)
                               + ": call astra.parallelize again on every rank once it can", rank=failed[0])
    named = None if setups is None else setup_differences(setups)
    checks = [("world sizes", [str(f.world) for f in fps], ""),
              ("models (class, configuration, size, dtype, family adapter)", [f.model[:8].hex() for f in fps], ""),
              ("model weights", [f.model[8:].hex() for f in fps], ": every rank must load the same checkpoint"),
              ("codebooks", [f.codebooks.hex()[:12] for f in fps], ": every rank must load the same codebooks")]
    for name, vals, hint in checks:
        if len(set(vals)) > 1:
            if named is not None and name != "model weights":
                return InputMismatchError(pre + named)
            return InputMismatchError(pre + _differ(name, vals) + hint)
    bad = [r for r, f in enumerate(fps) if f.status != VALID]
    if bad:
        texts = {fps[r].text for r in bad}
        if len(bad) == world and len(texts) == 1:
            return InvalidInputError(pre + f"invalid inputs on every rank: {texts.pop()}")
        if len(bad) == world:
            return InputMismatchError(pre + _differ("reasons to reject the inputs", [f.text for f in fps]))
        return InputMismatchError(pre + f"rank {bad[0]} rejected its inputs ({fps[bad[0]].text}); ranks "
                                        f"{[r for r in range(world) if r not in bad]} accepted theirs: the ranks "
                                        "were given different inputs")
    calls = [f.call for f in fps]
    if len(set(calls)) > 1:
        return InputMismatchError(pre + _differ("call counters", [str(c) for c in calls]) + ": the ranks fell out "
                                  "of step (a rank skipped or repeated a call); the counters are now re-synchronised "
                                  "and the next call, made on every rank, runs normally")
    descr = [f.text for f in fps]
    if len(set(descr)) > 1:
        return InputMismatchError(pre + _differ("input names, dtypes or shapes, or options (split, class_token)",
                                                descr))
    named = None if requests is None else request_differences(requests)
    if named is not None:
        return InputMismatchError(pre + named)
    vals = [f.values.hex()[:12] for f in fps]
    if len(set(vals)) > 1:
        return InputMismatchError(pre + _differ("input values (digests)", vals) + "; every rank must be given the "
                                  "same full inputs")
    return None
