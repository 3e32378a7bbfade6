"""Per-family adapters: where the attention modules are and how to project non-local K/V.

Nothing here copies HF modeling code: the adapters only name the modules HF already has and call their
own projections (Llama ``k_proj``/``v_proj``, GPT-2 ``c_attn`` key/value slices, BERT ``key``/``value``,
ViT ``k_proj``/``v_proj``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .errors import UnsupportedModelError

SUPPORTED = (
    "GPT2Model, GPT2LMHeadModel, GPT2ForSequenceClassification, LlamaModel, LlamaForCausalLM, "
    "LlamaForSequenceClassification, BertModel, BertForSequenceClassification, ViTModel, ViTForImageClassification"
)


@dataclass
class Family:
    name: str                      # "gpt2" | "llama" | "bert" | "vit"
    model: torch.nn.Module         # the model the user gave
    base: torch.nn.Module          # GPT2Model / LlamaModel / BertModel / ViTModel
    causal: bool
    attn_modules: List[torch.nn.Module]
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    rope: bool = False
    # encoders (bert, vit): the module whose output is the token embeddings (sliced per rank), and the module
    # whose output holds the final state the model reads its class token from
    embeddings: Optional[torch.nn.Module] = None
    final: Optional[torch.nn.Module] = None
    class_token_default: bool = False
    class_token_allowed: bool = False
    head: Optional[str] = None     # task head: None (base model), "causal_lm", "sequence_classification", ...

    @property
    def num_layers(self) -> int:
        return len(self.attn_modules)

    @property
    def decoder(self) -> bool:
        return self.name in ("gpt2", "llama")

    # -- K/V of (dequantized) hidden states through the layer's own projections, pre-RoPE --------
    def kv(self, module: torch.nn.Module, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        B, T, D = h.shape
        if self.name == "gpt2":
            W, b = module.c_attn.weight, module.c_attn.bias  # Conv1D: y = x @ W + b, W [D, 3D]
            kv = torch.addmm(b[D:], h.reshape(-1, D), W[:, D:]).view(B, T, 2, -1, self.head_dim)
            k, v = kv.unbind(2)
        elif self.name == "llama":
            k = module.k_proj(h).view(B, T, -1, self.head_dim)
            v = module.v_proj(h).view(B, T, -1, self.head_dim)
        elif self.name == "bert":
            k = module.key(h).view(B, T, -1, self.head_dim)
            v = module.value(h).view(B, T, -1, self.head_dim)
        elif self.name == "vit":
            k = module.k_proj(h).view(B, T, -1, self.head_dim)
            v = module.v_proj(h).view(B, T, -1, self.head_dim)
        else:  # pragma: no cover
            raise UnsupportedModelError(self.name)
        return k.transpose(1, 2), v.transpose(1, 2)

    # -- rotary embedding (Llama) ----------------------------------------------------------------
    def rope_cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[B or 1, T, Dh]`` at ``position_ids`` from the model's own rotary module."""
        dummy = torch.empty(0, dtype=dtype, device=position_ids.device)
        return self.base.rotary_emb(dummy, position_ids)

    def apply_rope(self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``k [B, H, T, Dh]`` by cos/sin ``[B or 1, T, Dh]`` (HF rotate_half convention)."""
        from transformers.models.llama.modeling_llama import rotate_half

        cos, sin = cos.unsqueeze(1).to(k.dtype), sin.unsqueeze(1).to(k.dtype)
        return k * cos + rotate_half(k) * sin


def family_of(model) -> Family:
    """Identify a supported HF model; raise :class:`UnsupportedModelError` otherwise."""
    try:
        import transformers as tf
    except ImportError as e:  # pragma: no cover
        raise UnsupportedModelError("astra's HF integration needs `transformers` installed") from e
    cls = type(model).__name__
    # 12b stand-in for 12a's registry: the heads' kinds (Family.head)
    heads = {tf.GPT2LMHeadModel: "causal_lm", tf.LlamaForCausalLM: "causal_lm",
             tf.GPT2ForSequenceClassification: "sequence_classification",
             tf.LlamaForSequenceClassification: "sequence_classification"}
    if isinstance(model, (tf.GPT2LMHeadModel, tf.GPT2Model, tf.GPT2ForSequenceClassification)):
        base = model.base_model
        cfg = base.config
        if getattr(cfg, "add_cross_attention", False):
            raise UnsupportedModelError(f"{cls} with add_cross_attention=True is not supported")
        mods = [blk.attn for blk in base.h]
        return Family("gpt2", model, base, True, mods, cfg.hidden_size, cfg.num_attention_heads,
                      cfg.hidden_size // cfg.num_attention_heads, head=heads.get(type(model)))
    if isinstance(model, (tf.LlamaForCausalLM, tf.LlamaModel, tf.LlamaForSequenceClassification)):
        base = model.base_model
        cfg = base.config
        mods = [layer.self_attn for layer in base.layers]
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return Family("llama", model, base, True, mods, cfg.hidden_size, cfg.num_key_value_heads, hd, rope=True,
                      head=heads.get(type(model)))
    # 12b stand-in for 12a's registry (heads recognised through base_model): BertForSequenceClassification
    if type(model) in (tf.BertModel, tf.BertForSequenceClassification):
        base = model.base_model
        cfg = base.config
        if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
            raise UnsupportedModelError("BertModel configured as a decoder / with cross-attention is not supported")
        pet = getattr(cfg, "position_embedding_type", "absolute")
        if pet not in (None, "absolute"):
            raise UnsupportedModelError(f"BertModel with position_embedding_type={pet!r} is not supported")
        mods = [layer.attention.self for layer in base.encoder.layer]
        return Family("bert", model, base, False, mods, cfg.hidden_size, cfg.num_attention_heads,
                      cfg.hidden_size // cfg.num_attention_heads, embeddings=base.embeddings, final=base.encoder,
                      class_token_default=False, class_token_allowed=True,
                      head=None if base is model else "sequence_classification")
    if isinstance(model, (tf.ViTForImageClassification, tf.ViTModel)):
        base = model.vit if isinstance(model, tf.ViTForImageClassification) else model
        cfg = base.config
        mods = [layer.attention for layer in base.layers]
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return Family("vit", model, base, False, mods, cfg.hidden_size, cfg.num_attention_heads, hd,
                      embeddings=base.embeddings, final=base.layernorm,
                      class_token_default=True, class_token_allowed=True,
                      head=None if base is model else "image_classification")
    raise UnsupportedModelError(f"astra does not support {cls}; supported: {SUPPORTED}")
