"""Test-only helpers for the runtime tests: tiny seeded HF models, inputs, and (until the kernel layer
lands) plain-torch stand-ins for the astra_kernels ops the runtime calls. The stand-ins are installed only
for names astra_kernels does not export yet; product code always goes through astra_kernels."""
from __future__ import annotations

import math
import os
import struct
import sys
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]
for _p in (str(_ROOT), str(_ROOT / "python")):
    if _p not in sys.path:
        sys.path.insert(0, _p)


# --------------------------------------------------------------------------------------------
# stand-ins (test-only)
# --------------------------------------------------------------------------------------------
def _vq_encode(x, codebook, *, backend="auto"):
    G, K, d = codebook.shape
    xs = x.reshape(-1, G, d).to(codebook.dtype).transpose(0, 1)          # [G, N, d]
    dist = (xs * xs).sum(-1, keepdim=True) - 2 * xs @ codebook.transpose(1, 2) + (codebook * codebook).sum(-1)[:, None]
    return dist.argmin(-1).transpose(0, 1).reshape(*x.shape[:-1], G).to(torch.int32)


def _vq_decode(codes, codebook):
    G, K, d = codebook.shape
    c = codes.long()
    out = codebook[torch.arange(G, device=c.device), c]  # [..., G, d]
    return out.reshape(*codes.shape[:-1], G * d)


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _frame_nbytes(shape, bits):
    n = 1
    for s in shape:
        n *= int(s)
    return 12 + 4 * len(shape) + (n * bits + 7) // 8


def _pack_codes(codes, bits):
    flat = codes.reshape(-1).tolist()
    acc, nb, out = 0, 0, bytearray()
    for c in flat:
        acc |= int(c) << nb
        nb += bits
        while nb >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            nb -= 8
    if nb:
        out.append(acc & 0xFF)
    hdr = b"ASTQ" + bytes([1, bits, codes.ndim, 0]) + b"".join(struct.pack("<I", int(s)) for s in codes.shape)
    crc = _crc32c(hdr + bytes(out))
    frame = hdr + struct.pack("<I", crc) + bytes(out)
    return torch.frombuffer(bytearray(frame), dtype=torch.uint8).to(codes.device)


def _unpack_codes(frame):
    b = bytes(frame.cpu().tolist())
    if b[:4] != b"ASTQ":
        raise ValueError("bad magic")
    bits, ndim = b[5], b[6]
    shape = [struct.unpack("<I", b[8 + 4 * i: 12 + 4 * i])[0] for i in range(ndim)]
    H = 12 + 4 * ndim
    n = math.prod(shape)
    P = (n * bits + 7) // 8
    if len(b) != H + P:
        raise ValueError("bad length")
    if struct.unpack("<I", b[8 + 4 * ndim: H])[0] != _crc32c(b[: 8 + 4 * ndim] + b[H:]):
        raise ValueError("crc")
    val = int.from_bytes(b[H:], "little")
    mask = (1 << bits) - 1
    codes = [(val >> (i * bits)) & mask for i in range(n)]
    return torch.tensor(codes, dtype=torch.int32).reshape(shape)


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _mixed_attention(q, k, v, *, k_hat=None, v_hat=None, codes=None, k_table=None, v_table=None,
                     rope_cos=None, rope_sin=None, q_pos=None, kv_pos=None, causal=False, local_mask=None,
                     remote_mask=None, count_weighted="auto", scale=None, return_lse=False, backend="auto"):
    B, Hq, Tl, Dh = q.shape
    if codes is not None:
        k_hat = k_table[codes.long()].permute(0, 2, 1, 3)  # [B, Hkv, Tr, Dh]
        v_hat = v_table[codes.long()].permute(0, 2, 1, 3)
        if rope_cos is not None:
            cos = rope_cos[kv_pos.long()]
            sin = rope_sin[kv_pos.long()]
            if cos.ndim == 2:
                cos, sin = cos[None], sin[None]
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            k_hat = k_hat * cos + _rotate_half(k_hat) * sin
    if k_hat is None:
        k_hat = k[:, :, :0]
        v_hat = v[:, :, :0]
    Tr = k_hat.shape[2]
    K = torch.cat([k, k_hat], 2).double()
    V = torch.cat([v, v_hat], 2).double()
    rep = Hq // K.shape[1]
    K = K.repeat_interleave(rep, 1)
    V = V.repeat_interleave(rep, 1)
    scale = Dh ** -0.5 if scale is None else scale
    s = (q.double() @ K.transpose(-1, -2)) * scale
    allowed = torch.ones(B, Tl, Tl + Tr, dtype=torch.bool, device=q.device)
    if local_mask is not None:
        allowed[:, :, :Tl] &= local_mask[:, None, :]
    if remote_mask is not None and Tr:
        allowed[:, :, Tl:] &= remote_mask[:, None, :]
    if causal:
        qp = q_pos if q_pos.ndim == 2 else q_pos[None]
        kp = torch.cat([qp.expand(B, -1), (kv_pos if kv_pos.ndim == 2 else kv_pos[None]).expand(B, -1)], 1)
        allowed &= kp[:, None, :] <= qp.expand(B, -1)[:, :, None]
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    out = (p @ V).to(q.dtype)
    if return_lse:
        return out, lse.float()
    return out


def _encode_and_pack(x, codebook, bits=None, *, backend="auto"):
    return _pack_codes(_vq_encode(x, codebook), bits)


_STANDINS = {
    "encode_and_pack": _encode_and_pack,
    "vq_encode": _vq_encode,
    "vq_decode": _vq_decode,
    "pack_codes": _pack_codes,
    "unpack_codes": _unpack_codes,
    "frame_nbytes": _frame_nbytes,
    "mixed_attention": _mixed_attention,
}


def install_standins():
    """Fill in astra_kernels ops that have not landed yet (test-only). Returns the names filled in."""
    import astra_kernels

    filled = []
    if getattr(astra_kernels, "mixed_attention", None) is None:
        try:  # the real op exists but may not be exported from the package yet
            from astra_kernels.attention import mixed_attention

            astra_kernels.mixed_attention = mixed_attention
            filled.append("mixed_attention (from astra_kernels.attention)")
        except ImportError:
            pass
    for name, fn in _STANDINS.items():
        if getattr(astra_kernels, name, None) is None:
            setattr(astra_kernels, name, fn)
            filled.append(name)
    return filled


install_standins()


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
