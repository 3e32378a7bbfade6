"""Test-only helpers for the runtime tests: tiny seeded HF models and inputs (importable from spawned
ranks, which is why it lives in a module and not in conftest)."""
from __future__ import annotations

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
def tiny_model(family: str, *, head: bool = True, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=64,
                            bos_token_id=0, eos_token_id=0)
        m = tf.GPT2LMHeadModel(cfg) if head else tf.GPT2Model(cfg)
    elif family == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, vocab_size=97, max_position_embeddings=64,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0)
        m = tf.LlamaForCausalLM(cfg) if head else tf.LlamaModel(cfg)
    elif family == "bert":
        cfg = tf.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                            vocab_size=97, max_position_embeddings=64, pad_token_id=0)
        m = tf.BertModel(cfg)
    elif family == "vit":
        cfg = tf.ViTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                           image_size=32, patch_size=8, num_channels=3, num_labels=5)
        m = tf.ViTForImageClassification(cfg) if head else tf.ViTModel(cfg)
    else:
        raise ValueError(family)
    return m.eval()


def tiny_inputs(family: str, *, batch: int = 2, seq: int = 11, padded: bool = False, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    ids = torch.randint(1, 97, (batch, seq), generator=g)
    inputs = {"input_ids": ids}
    if padded:
        mask = torch.ones(batch, seq, dtype=torch.long)
        if family == "bert":
            mask[-1, seq - 3:] = 0          # right padding
            ids[-1, seq - 3:] = 0
        else:
            mask[-1, :3] = 0                # left padding
            ids[-1, :3] = 0
        inputs["attention_mask"] = mask
    return inputs


def main_output(out):
    """The primary tensor of a model output."""
    for key in ("logits", "last_hidden_state"):
        if key in out and out[key] is not None:
            return out[key]
    raise KeyError(list(out.keys()))


def valid_rows(family, inputs):
    """[B, T] bool mask of positions whose outputs are meaningful (non-padding)."""
    m = inputs.get("attention_mask")
    return None if m is None else m.bool()
