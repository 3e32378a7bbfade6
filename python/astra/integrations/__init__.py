"""Drop-in integrations: each is one ``apply_*`` function that makes an existing stack run on an ASTRA rank, and its
``revert_*`` (in the style of Liger-Kernel's ``apply_liger_kernel_to_*``). Every call they make is collective:
every rank of the process group makes the same call with the same inputs.

* :func:`apply_sentence_transformers` / :func:`revert_sentence_transformers`: ``SentenceTransformer.encode`` with
  distributed pooling (mean pooling by a reduce of sums and counts, CLS pooling from the class token).
* :func:`apply_pipeline` / :func:`revert_pipeline`: HF ``pipeline`` for ``feature-extraction`` and
  ``text-classification``.
"""
from .pipelines import apply_pipeline, revert_pipeline
from .sentence_transformers import apply_sentence_transformers, revert_sentence_transformers

__all__ = ["apply_pipeline", "apply_sentence_transformers", "revert_pipeline", "revert_sentence_transformers"]
