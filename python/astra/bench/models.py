"""Random-init models of the benchmark's shapes (latency only, never accuracy) and their inputs."""
from __future__ import annotations

import math
from typing import Dict

#: the benchmark's models: GPT-2-small shape, a Llama-shaped model of the same size, ViT-Base shape
BENCH_MODELS = ("gpt2", "llama", "vit")
#: ViT-Base patch size (the image is sized so that it has exactly T patches)
VIT_PATCH = 16
#: codewords per group of the benchmark's ASTRA codebooks
CODEBOOK_SIZE = 1024


def check_tokens(model: str, tokens: int) -> None:
    """Raise ValueError unless ``tokens`` is a valid sequence length for ``model``."""
    if model not in BENCH_MODELS:
        raise ValueError(f"unknown bench model {model!r}: choose from {', '.join(BENCH_MODELS)}")
    if tokens < 2:
        raise ValueError(f"--tokens must be >= 2, got {tokens}")
    if model == "vit" and math.isqrt(tokens) ** 2 != tokens:
        raise ValueError(f"the ViT input has a square grid of patches: --tokens must be a square (256, 1024, ...), "
                         f"got {tokens}")


def build_config(model: str, layers: int, tokens: int):
    """The HF config of bench model ``model`` with ``layers`` layers, able to take ``tokens`` tokens."""
    import transformers as tf

    check_tokens(model, tokens)
    if model == "gpt2":
        return tf.GPT2Config(n_layer=layers, n_embd=768, n_head=12, n_positions=max(1024, tokens), vocab_size=50257)
    if model == "llama":
        return tf.LlamaConfig(num_hidden_layers=layers, hidden_size=768, num_attention_heads=12,
                              num_key_value_heads=12, intermediate_size=2048, vocab_size=32000,
                              max_position_embeddings=max(2048, tokens))
    side = math.isqrt(tokens) * VIT_PATCH
    return tf.ViTConfig(num_hidden_layers=layers, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                        image_size=side, patch_size=VIT_PATCH)


def build_model(model: str, layers: int, tokens: int, seed: int = 0):
    """Random-init base model (``GPT2Model``, ``LlamaModel``, ``ViTModel``), eval mode, same weights per seed."""
    import torch
    import transformers as tf

    cfg = build_config(model, layers, tokens)
    torch.manual_seed(seed)
    cls = {"gpt2": tf.GPT2Model, "llama": tf.LlamaModel, "vit": tf.ViTModel}[model]
    kwargs = {"add_pooling_layer": False} if model == "vit" else {}
    return cls(cfg, **kwargs).eval()


def build_inputs(model: str, tokens: int, seed: int = 1) -> Dict:
    """The benchmark input: ``tokens`` random token ids (ViT: an image of ``tokens`` patches), batch 1."""
    import torch

    check_tokens(model, tokens)
    g = torch.Generator().manual_seed(seed)
    if model == "vit":
        side = math.isqrt(tokens) * VIT_PATCH
        return {"pixel_values": torch.randn(1, 3, side, side, generator=g)}
    vocab = 50257 if model == "gpt2" else 32000
    return {"input_ids": torch.randint(0, vocab, (1, tokens), generator=g)}


def ceiling_inputs(model: str, tokens: int, world: int) -> Dict:
    """One rank's input for the ceiling: T/N tokens (ViT: T/N patches as a 1-patch-high strip image)."""
    import torch

    inputs = build_inputs(model, tokens)
    n = tokens // world
    if model == "vit":
        # a strip of n patches keeps the per-token work (the patch grid shape does not matter)
        return {"pixel_values": torch.randn(1, 3, VIT_PATCH, n * VIT_PATCH,
                                            generator=torch.Generator().manual_seed(1)),
                "interpolate_pos_encoding": True}
    return {"input_ids": inputs["input_ids"][:, :n]}


def tp_splits(model: str, world: int) -> bool:
    """Whether HF tensor parallelism can shard bench model ``model``'s attention heads over ``world`` ranks."""
    cfg = build_config(model, 1, 4)
    heads = getattr(cfg, "num_attention_heads", 0)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return heads % world == 0 and kv % world == 0


def has_tp_plan(model: str) -> bool:
    """Whether HF tensor parallelism (``tp_plan="auto"``) is defined for this bench model."""
    return bool(getattr(build_config(model, 1, 4), "base_model_tp_plan", None))


def bench_codebooks(model, name: str, tokens: int, groups: int, basis="auto", predict: bool = False):
    """The benchmark's codebooks for ``model`` (bench model ``name``): K = CODEBOOK_SIZE, k-means (4 iterations)
    on seeded random inputs of ``tokens`` tokens, two or as many as give 2 K vectors a layer (latency only, never
    accuracy); ``basis`` and ``predict`` as in :func:`astra.calibrate` (by default transformed when G > 1, as users
    get them). Fewer vectors than codewords left duplicated codewords (empty clusters re-seeded with data points),
    whose exact ties no screen certifies: an encode 10-30x slower than real codebooks give (T = 64)."""
    import torch

    import astra

    n = max(2, -(-2 * CODEBOOK_SIZE // tokens))
    samples = [build_inputs(name, tokens, seed=11 + i) for i in range(n)]
    with torch.inference_mode():
        return astra.calibrate(model, samples, groups=groups, codebook_size=CODEBOOK_SIZE, iters=4, basis=basis,
                               predict=predict)
