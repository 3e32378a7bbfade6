"""HF ``pipeline``: ``feature-extraction`` and ``text-classification`` on a parallelized model (docs/runtime.md,
"Integrations"). :func:`apply_pipeline` replaces the pipeline object's ``_forward`` (the one step that calls the
model) with a call of the :class:`~astra.ParallelModel`; pre- and post-processing are the pipeline's own. Every call
of the pipeline is then collective: every rank, same texts."""
from __future__ import annotations

from typing import Any, Dict, Optional

from ..errors import AstraError, UnsupportedModelError
from ..models import family_of
from ..outputs import resolve_output
from ..parallel import ParallelModel, parallelize
from .common import call_values, pad_to_ranks, patch, restore

ATTR = "_astra_integration"
# what each task's post-processing reads: feature extraction the whole sequence's hidden states, text
# classification the head's logits (its natural output); by pipeline class, as the task string is what the user typed
# ("sentiment-analysis" is text classification; a pipeline built from its class has none)
TASK_OUTPUTS = {"FeatureExtractionPipeline": "hidden_states", "TextClassificationPipeline": None}
# the output kinds each task's post-processing can read the same on every rank (``output=``): "local" differs per rank
# (feature extraction returned each rank its own tokens; text classification failed on the ranks that hold no
# logits, the others waited out the timeout), and text classification reads no pooled mean
TASK_ALLOWED = {"FeatureExtractionPipeline": ("hidden_states", "class_token", "mean_pooled"),
                "TextClassificationPipeline": (None, "class_token", "hidden_states")}


def _task(pipe) -> str:
    """The :data:`TASK_OUTPUTS` key of ``pipe``'s class (a subclass counts as its base)."""
    import transformers

    for name in TASK_OUTPUTS:
        if isinstance(pipe, getattr(transformers, name)):
            return name
    raise UnsupportedModelError(f"apply_pipeline supports the pipelines {sorted(TASK_OUTPUTS)} (feature-extraction, "
                                f"text-classification), got {type(pipe).__name__} (task "
                                f"{getattr(pipe, 'task', None)!r})")


def apply_pipeline(pipe, codebooks=None, *, output: Optional[str] = None, **parallelize_kwargs) -> ParallelModel:
    """Run ``pipe.model`` as one ASTRA rank inside ``pipe``. ``output`` overrides the task's output kind
    (:mod:`astra.outputs`); ``codebooks`` and ``parallelize_kwargs`` go to :func:`astra.parallelize`."""
    task = _task(pipe)
    if getattr(pipe, ATTR, None) is not None:
        raise AstraError("this pipeline is already parallelized by astra (astra.integrations.revert_pipeline first)")
    kind = output if output is not None else TASK_OUTPUTS[task]
    resolve_output(family_of(pipe.model), kind)          # a bad or unavailable kind, before the model is patched
    allowed = TASK_ALLOWED[task]
    if kind not in allowed:
        raise UnsupportedModelError(f"apply_pipeline: {type(pipe).__name__}'s post-processing can not read "
                                    f"output={kind!r}; it takes {list(allowed)}")
    pm = parallelize(pipe.model, codebooks, **parallelize_kwargs)
    # text classification reads the head's pooled logits whatever the output kind (with "hidden_states" a decoder
    # without pad_token_id scored a pad token silently)
    pooled = task == "TextClassificationPipeline"

    def forward(inputs: Dict[str, Any], **kwargs):
        return _forward(pm, kind, inputs, pooled)

    saved = []
    patch(saved, pipe, "_forward", forward)
    setattr(pipe, ATTR, (pm, saved, type(pipe)))
    pipe.__class__ = _collective_class(type(pipe))
    return pm


def revert_pipeline(pipe) -> None:
    """Undo :func:`apply_pipeline`: the pipeline's ``_forward`` and class as they were, the model unpatched."""
    state = getattr(pipe, ATTR, None)
    if state is None:
        return
    pm, saved, cls = state
    pipe.__class__ = cls
    restore(saved)
    pm.unpatch()
    delattr(pipe, ATTR)


#: per pipeline class, its subclass whose calls are agreed first (:func:`_collective_class`)
_COLLECTIVE: Dict[type, type] = {}


def _collective_class(cls: type) -> type:
    """``cls`` with a ``__call__`` that first agrees on the call (:meth:`astra.ParallelModel.agree`: the inputs and
    the plain keyword arguments, which decide the forwards and their batches), so ranks given other texts raise
    :class:`astra.InputMismatchError` together on it (one returned quietly and the other's error landed on a later
    call). A generator or dataset streams: its forwards are agreed one by one, as before. (``pipe(...)`` looks
    ``__call__`` up on the class, so an instance attribute would not be called.)"""
    if cls not in _COLLECTIVE:
        def __call__(self, inputs=None, *args, **kwargs):
            if isinstance(inputs, (str, dict, list, tuple)):
                plain = {k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool))}   # None: unset
                getattr(self, ATTR)[0].agree("pipeline", {**call_values(inputs), **plain, "args": len(args)})
            return cls.__call__(self, inputs, *args, **kwargs)

        _COLLECTIVE[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    return _COLLECTIVE[cls]


def _forward(pm: ParallelModel, kind: Optional[str], inputs: Dict[str, Any], pooled: bool):
    inputs, T = pad_to_ranks(pm, inputs, pooled=pooled)
    out = pm(**inputs, output=kind)
    if T < 0 or not hasattr(out, "items"):
        return out
    # drop the pad tokens pad_to_ranks added from the per-token fields
    return type(out)(**{k: v[:, :T] if k in ("last_hidden_state", "logits") and v.dim() == 3 else v
                        for k, v in out.items()})
