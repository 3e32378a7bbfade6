"""sentence-transformers: ``SentenceTransformer.encode`` on every rank of a process group, the transformer run as an
ASTRA rank and the pooling distributed (docs/runtime.md, "Integrations").

:func:`apply_sentence_transformers` replaces, on the model's own ``Transformer`` and ``Pooling`` module objects
(instances, not classes), their ``forward``:

* ``pooling_mode="mean"``: the transformer returns ``output="mean_pooled"`` straight into ``sentence_embedding``
  (each rank sends ``[B, D + 1]`` floats, never the token embeddings); the pooling passes it on.
* ``pooling_mode="cls"``: the class token's final hidden state (``output="class_token"``; nothing moves with
  distributed class tokens, else ``[B, D]`` from rank 0).
* any other mode (max, weighted mean, last token, several modes, ``include_prompt=False`` with a prompt): with
  ``pooling_gather=True`` the full token embeddings are gathered (``output="hidden_states"``) and the model's own
  pooling runs; otherwise :func:`apply_sentence_transformers` refuses the model with a clear error.

Modules after the pooling (``Normalize``, ``Dense``) run unchanged. :func:`revert_sentence_transformers` restores the
modules and unpatches the transformer.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Dict

from ..errors import AstraError, UnsupportedModelError
from ..models import family_of
from ..outputs import resolve_output
from ..parallel import ParallelModel, parallelize
from .common import call_values, pad_to_ranks, patch, restore

ATTR = "_astra_integration"
DISTRIBUTED_MODES = {"mean": "mean_pooled", "cls": "class_token"}


#: the first sentence-transformers with ``sentence_transformer.modules`` (Transformer, Pooling with ``pooling_mode``)
MIN_SENTENCE_TRANSFORMERS = "5.4"


def _modules(st_model):
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError as e:
        raise UnsupportedModelError(f"apply_sentence_transformers needs sentence-transformers >= "
                                    f"{MIN_SENTENCE_TRANSFORMERS} ({e})") from e

    mods = list(st_model.children())
    for i, m in enumerate(mods[:-1]):
        if isinstance(m, Transformer) and isinstance(mods[i + 1], Pooling):
            return m, mods[i + 1]
    raise UnsupportedModelError("apply_sentence_transformers needs a SentenceTransformer whose modules hold a "
                                f"Transformer followed by a Pooling; got {[type(m).__name__ for m in mods]}")


def _plan(pool, pooling_gather: bool) -> str:
    """The output kind: the gathered token embeddings with ``pooling_gather`` (every mode, the token embeddings
    and prompts too; it was ignored for mean and CLS pooling, whose refusals then asked for it), else the mode's
    distributed form."""
    if pooling_gather:
        return "hidden_states"
    modes = (pool.pooling_mode,) if isinstance(pool.pooling_mode, str) else tuple(pool.pooling_mode)
    if len(modes) == 1 and modes[0] in DISTRIBUTED_MODES:
        return DISTRIBUTED_MODES[modes[0]]
    raise UnsupportedModelError(f"pooling_mode={pool.pooling_mode!r} has no distributed form (only 'mean' and "
                                "'cls' do); pass pooling_gather=True to gather the full token embeddings and run the "
                                "model's own pooling")


def apply_sentence_transformers(st_model, codebooks=None, *, pooling_gather: bool = False,
                                **parallelize_kwargs) -> ParallelModel:
    """Make ``st_model`` (a ``SentenceTransformer``) encode as one ASTRA rank: afterwards ``st_model.encode(...)``
    is collective (every rank, same sentences) and returns the embeddings on every rank. ``codebooks`` and
    ``parallelize_kwargs`` go to :func:`astra.parallelize`; ``pooling_gather``: gather the full token embeddings
    and run the model's own pooling, for every pooling mode (what modes without a distributed form, the token
    embeddings and ``include_prompt=False`` need). Returns the :class:`~astra.ParallelModel` (``stats``,
    ``output_stats``)."""
    if getattr(st_model, ATTR, None) is not None:
        raise AstraError("this SentenceTransformer is already parallelized by astra "
                         "(astra.integrations.revert_sentence_transformers first)")
    trans, pool = _modules(st_model)
    plan = _plan(pool, pooling_gather)
    try:                                 # e.g. CLS pooling on a decoder: refused before any patch
        resolve_output(family_of(trans.model), plan)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{e}: apply with pooling_gather=True to run the model's own pooling") from None
    pm = parallelize(trans.model, codebooks, **parallelize_kwargs)

    def transformer_forward(features: Dict[str, Any], **kwargs) -> Dict[str, Any]:
        return _encode(pm, pool, plan, features)

    saved = []
    patch(saved, trans, "forward", transformer_forward)
    if plan != "hidden_states":
        patch(saved, pool, "forward", _pooled)
    patch(saved, st_model, "encode", collective_encode(pm, st_model.encode, plan != "hidden_states"))
    setattr(st_model, ATTR, (pm, saved))
    return pm


#: the arguments of ``encode`` that decide which forwards it runs (with the inputs themselves)
ENCODE_AGREED = ("prompt_name", "prompt", "batch_size", "output_value", "chunk_size")


def collective_encode(pm: ParallelModel, encode, pooled: bool):
    """``encode`` as a collective: the ranks first agree on the call (the inputs and :data:`ENCODE_AGREED`), so ranks
    given other sentences raise :class:`astra.InputMismatchError` together on it (one returned quietly and the
    other's error landed on a later call, or waited out the timeout); ``pooled`` (a distributed pooling): the token
    embeddings, which never leave their ranks, are refused (sentence-transformers raised a bare KeyError)."""
    sig = inspect.signature(encode)

    @functools.wraps(encode)
    def wrapped(*args, **kwargs):
        bound = sig.bind_partial(*args, **kwargs)
        bound.apply_defaults()          # a default written out is the same call as one left out
        call = bound.arguments
        items = call.get("inputs", call.get("sentences"))
        pm.agree("sentence_transformers.encode", {**call_values(items), **{k: call.get(k) for k in ENCODE_AGREED}})
        want = call.get("output_value", "sentence_embedding")
        if pooled and want != "sentence_embedding":
            raise UnsupportedModelError(f"output_value={want!r} needs the token embeddings, which the distributed "
                                        "pooling never gathers: apply with pooling_gather=True")
        return encode(*args, **kwargs)

    return wrapped


def revert_sentence_transformers(st_model) -> None:
    """Undo :func:`apply_sentence_transformers`: the modules' ``forward`` and the model's ``encode`` as they were, the
    transformer unpatched."""
    state = getattr(st_model, ATTR, None)
    if state is None:
        return
    pm, saved = state
    restore(saved)
    pm.unpatch()
    delattr(st_model, ATTR)


def _pooled(features: Dict[str, Any], **kwargs) -> Dict[str, Any]:
    """The pooling, done: the transformer already put the distributed pooling's result in ``sentence_embedding``."""
    return features


def _check_plan(pool, plan: str) -> None:
    """The pooling module still pools as it did when applied (``pooling_mode`` is read at every call by the model's
    own pooling; the distributed one was chosen once: a mode changed afterwards was silently ignored)."""
    if plan == "hidden_states":
        return                              # the model's own pooling runs: any mode
    try:
        now = _plan(pool, False)
    except UnsupportedModelError:
        now = None
    if now != plan:
        raise UnsupportedModelError(f"the pooling mode is {pool.pooling_mode!r} now, not the one astra was applied "
                                    "with: revert_sentence_transformers and apply again")


def _encode(pm: ParallelModel, pool, plan: str, features: Dict[str, Any]) -> Dict[str, Any]:
    _check_plan(pool, plan)
    if plan != "hidden_states" and not pool.include_prompt and features.get("prompt_length"):
        raise UnsupportedModelError("include_prompt=False with a prompt has no distributed pooling here: apply with "
                                    "pooling_gather=True")
    if plan != "hidden_states" and "token_weights_sum" in features:
        raise UnsupportedModelError("token_weights_sum has no distributed pooling here: apply with "
                                    "pooling_gather=True")
    inputs, T = pad_to_ranks(pm, features)
    out = pm(**inputs, output=plan)
    if plan == "mean_pooled":
        features["sentence_embedding"] = out
    elif plan == "class_token":
        mask = features.get("attention_mask")
        if mask is not None and not bool(mask[:, 0].all()):
            raise UnsupportedModelError("CLS pooling of a left-padded batch: the class token is not token 0")
        features["sentence_embedding"] = out.last_hidden_state[:, 0]
    else:
        features["token_embeddings"] = out.last_hidden_state[:, :T] if T >= 0 else out.last_hidden_state
    return features
