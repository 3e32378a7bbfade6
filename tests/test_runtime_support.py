"""Test-only helpers for the runtime tests: tiny seeded HF models and inputs (importable from spawned
ranks, which is why it lives in a module and not in conftest)."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
for _p in (str(_ROOT), str(_ROOT / "python")):
    if _p not in sys.path:
        sys.path.insert(0, _p)


# --------------------------------------------------------------------------------------------
# tiny seeded models and inputs
# --------------------------------------------------------------------------------------------
HEAD_CLASSES = {   # head kind -> transformers auto class
    "causal_lm": "AutoModelForCausalLM", "masked_lm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "question_answering": "AutoModelForQuestionAnswering", "image_classification": "AutoModelForImageClassification",
}
DEFAULT_HEAD = {"gpt2": "causal_lm", "llama": "causal_lm", "mistral": "causal_lm", "qwen2": "causal_lm",
                "qwen3": "causal_lm", "bert": None, "roberta": None, "vit": "image_classification"}
FAMILIES = tuple(DEFAULT_HEAD)
PAD = {"roberta": 1}                    # padding token id (0 for the others)


def tiny_config(family: str, **kw):
    """A 2-layer, 64-wide config of ``family`` (``kw`` overrides)."""
    import transformers as tf

    dec = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, vocab_size=97, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
               pad_token_id=0, num_labels=3)
    enc = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=97,
               max_position_embeddings=64, pad_token_id=PAD.get(family, 0), num_labels=3)
    gpt2 = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=64, bos_token_id=0, eos_token_id=0,
                pad_token_id=0, num_labels=3)
    vit = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, image_size=32,
               patch_size=8, num_channels=3, num_labels=5)
    make = {"gpt2": (tf.GPT2Config, gpt2), "llama": (tf.LlamaConfig, dec), "mistral": (tf.MistralConfig, dec),
            "qwen2": (tf.Qwen2Config, dec), "qwen3": (tf.Qwen3Config, dict(dec, head_dim=32)),   # head_dim != D / H
            "bert": (tf.BertConfig, enc), "roberta": (tf.RobertaConfig, enc), "vit": (tf.ViTConfig, vit)}
    if family not in make:
        raise ValueError(family)
    cls, base = make[family]
    return cls(**dict(base, **kw))


def tiny_model(family: str, *, head=True, seed: int = 0, **config):
    """A tiny seeded model of ``family``: ``head`` True (the family's usual head: LM for decoders, none for
    BERT / RoBERTa, image classification for ViT), False (the base model) or a head kind of astra.models.HEADS."""
    import transformers as tf

    torch.manual_seed(seed)
    kind = DEFAULT_HEAD[family] if head is True else (None if head is False else head)
    if kind == "question_answering":
        config.setdefault("num_labels", 2)          # start and end logits
    cfg = tiny_config(family, **config)
    auto = getattr(tf, "AutoModel" if kind is None else HEAD_CLASSES[kind])
    m = auto.from_config(cfg)
    if family in ("mistral", "qwen2", "qwen3", "roberta"):
        # HF initialises biases to 0 and norm weights to 1: random values make q/k/v biases and k_norm count
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(0.2 * torch.randn(p.shape))
    return m.eval()


def tiny_inputs(family: str, *, batch: int = 2, seq: int = 11, padded: bool = False, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    pad = PAD.get(family, 0)
    ids = torch.randint(pad + 1, 97, (batch, seq), generator=g)
    inputs = {"input_ids": ids}
    if padded:
        mask = torch.ones(batch, seq, dtype=torch.long)
        if family in ("bert", "roberta"):
            mask[-1, seq - 3:] = 0          # right padding
            ids[-1, seq - 3:] = pad
        else:
            mask[-1, :3] = 0                # left padding
            ids[-1, :3] = pad
        inputs["attention_mask"] = mask
    return inputs


def main_output(out):
    """The primary tensor of a model output."""
    for key in ("logits", "last_hidden_state"):
        if key in out and out[key] is not None:
            return out[key]
    raise KeyError(list(out.keys()))


def steering_pre_hook(module, args, kwargs):
    """A user's steering forward pre-hook (``with_kwargs=True``): adds a fixed vector to a block's input."""
    h = args[0] if args else kwargs["hidden_states"]
    h = h + 0.5 * torch.linspace(-1, 1, h.shape[-1], dtype=h.dtype)
    return ((h,) + args[1:], kwargs) if args else (args, dict(kwargs, hidden_states=h))


def max_diff(a, b, inputs) -> float:
    """Largest absolute difference of two outputs; padding positions excluded when ``a`` is ``[B, T, ...]``."""
    d = (a - b).abs()
    m = inputs.get("attention_mask")
    if m is not None and d.dim() >= 2 and d.shape[:2] == m.shape:
        d = d[m.bool()]
    return float(d.max())


def tiny_codebooks(model, family: str, groups: int, *, sample_seeds=(11, 12), seed: int = 7, basis="auto",
                   predict=False):
    """Small codebooks (K = 16) calibrated on two seeded batches of ``tiny_inputs``."""
    import astra

    samples = [tiny_inputs(family, seq=16, batch=4, seed=s) for s in sample_seeds]
    return astra.calibrate(model, samples, groups=groups, codebook_size=16, iters=4, seed=seed, basis=basis,
                           predict=predict)


def codebook_case(spec):
    """``(G, basis)`` of a test case's codebook spec: None (full precision), G (astra.calibrate's default basis),
    "<G>a" / "<G>p" / "<G>n" (the attention basis / the PCA rotation / the model's basis, whatever G), or "<G>+"
    (predictive codebooks, the default basis: :func:`predictive_case`)."""
    if spec is None or isinstance(spec, int):
        return spec, "auto"
    return int(spec[:-1]), {"a": "attention", "p": "pca", "n": "none", "+": "auto"}[spec[-1]]


def predictive_case(spec) -> bool:
    """Whether a test case's codebook spec asks for predictive codebooks (``"<G>+"``)."""
    return isinstance(spec, str) and spec.endswith("+")


@contextlib.contextmanager
def layer_0_exchanged(model):
    """``model``'s family re-registered without ``first_input`` for the block: layer 0 is then exchanged and
    quantized like the others (as for a family that does not say how layer 0's input follows from the embedding
    output); the built-in adapter is restored after."""
    import dataclasses

    from astra.models import family_of, register_family

    adapter = family_of(model).adapter
    register_family(dataclasses.replace(adapter, first_input=None), replace=True)
    try:
        yield
    finally:
        register_family(adapter, replace=True)
