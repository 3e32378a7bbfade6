"""``astra finetune``: fine-tune saved codebooks (and optionally the model) on text, and report the held-out loss
before and after."""
from __future__ import annotations

import os
import time
from typing import Dict, List, Sequence

from astra_kernels.checks import is_finite_real

DESCRIPTION = """\
Fine-tune codebooks saved by `astra calibrate` with astra.finetune: every step runs the ASTRA simulation at
the world size (or one sampled from the list), with a straight-through estimator, and distils the unmodified
model's output. --train codebooks leaves every model weight untouched; --train all trains the model too (the
paper's way; needs a model directory, loaded as the architecture its config names, task head included). The texts
are the paragraphs of CPython's pydoc topics, or the non-empty lines of --input: the last --held-out of them are
held out (the distillation loss on them is reported before and after at every world size), and training uses the
first --samples of the rest. Writes OUT/codebooks.safetensors (and with --train all the HF model, its tokenizer
and the directory's other files that are not weights, e.g. sentence-transformers' modules.json, into OUT)."""


def add_finetune_arguments(p) -> None:
    from .finetune import TRAIN_MODES

    p.add_argument("--model", default="auto", help="as `astra calibrate --model` (the model the codebooks are for)")
    p.add_argument("--codebooks", required=True, metavar="FILE", help="codebooks saved by `astra calibrate`")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--world-size", default="4", help="world size of every step, or a comma list sampled per step")
    p.add_argument("--train", choices=TRAIN_MODES, default="codebooks",
                   help="codebooks: the model's weights stay as they are; all: model and codebooks together")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training text")
    p.add_argument("--lr", type=float, default=None,
                   help="codebook learning rate (None: astra.finetune's, relative to each layer's codebook scale)")
    p.add_argument("--model-lr", type=float, default=None,
                   help="model learning rate with --train all (None: astra.finetune's)")
    p.add_argument("--beta", type=float, default=None, help="commitment loss weight (None: astra.finetune's)")
    p.add_argument("--naq", type=float, default=None,
                   help="noise-augmented quantization lambda (None: astra.finetune's for the --train mode)")
    p.add_argument("--input", default=None, metavar="FILE",
                   help="train on this text file's non-empty lines instead of CPython's pydoc topics")
    p.add_argument("--samples", type=int, default=400, help="training paragraphs (or lines) at most")
    p.add_argument("--held-out", type=int, default=32, help="the last paragraphs (or lines), not trained on")
    p.add_argument("--batch-size", type=int, default=16, help="texts per step (batched by length)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per input at most")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch order, world sizes and NAQ noise")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: --epochs passes)")
    p.add_argument("--class-token", choices=("auto", "distributed", "none"), default="auto",
                   help="distributed: every rank holds a copy of the class token ([CLS]; ViT always), none: rank 0 "
                   "holds it; auto: the model's default")


def parse_world_sizes(text: str) -> List[int]:
    """``"4"`` -> [4], ``"2,4,8"`` -> [2, 4, 8]; ValueError naming the option otherwise."""
    from .cli import int_range

    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--world-size must be an int or a comma list of ints, got {text!r}") from None
    for n in sizes:
        int_range("--world-size", n, 2, 64)           # at 1 no token is quantized: nothing to train
    return sizes


def check_finetune_args(args) -> None:
    """Every argument of ``astra finetune`` before any work (ValueError with one line)."""
    from .cli import check_in_file, int_range, local_model_dir, resolve_model_name, stdlib_paragraphs
    from .runcmd import read_texts

    check_in_file("--codebooks", args.codebooks)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out: {args.out} exists and is not a directory")
    parent = out if os.path.isdir(out) else os.path.dirname(out)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f"--out: directory {parent} does not exist or is not writable")
    args.world_sizes = parse_world_sizes(args.world_size)
    if args.train == "codebooks" and args.model_lr is not None:
        raise ValueError("--model-lr trains the model's weights, which --train codebooks leaves as they are: "
                         "give --train all, or leave --model-lr out")
    if args.train == "all" and local_model_dir(resolve_model_name(args.model)) is None:
        raise ValueError(f"--train all needs a model directory (with its tokenizer); {args.model} is random-init")
    int_range("--seed", args.seed, 0)
    for opt, v in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--held-out", args.held_out),
                   ("--samples", args.samples)) + ((("--steps", args.steps),) if args.steps is not None else ()):
        int_range(opt, v, 1)
    for opt, v, zero_ok in (("--lr", args.lr, False), ("--model-lr", args.model_lr, False),
                            ("--beta", args.beta, True), ("--naq", args.naq, True)):
        if v is not None and not is_finite_real(v, positive=not zero_ok):
            raise ValueError(f"{opt} must be a finite number {'>= 0' if zero_ok else '> 0'}, got {v}")
    if args.input not in (None, "-"):
        check_in_file("--input", args.input, regular=False)
    texts = read_texts(args.input) if args.input is not None else stdlib_paragraphs()
    if len(texts) <= args.held_out:
        raise ValueError(f"--held-out {args.held_out} leaves nothing to train on ({len(texts)} texts)")
    args.train_texts = texts[: len(texts) - args.held_out][: args.samples]
    args.held_out_texts = texts[len(texts) - args.held_out:]


def batches(tokenize, texts: Sequence[str], size: int, max_length: int) -> List[Dict]:
    """Input dicts of ``size`` texts each, the texts sorted by length so that a batch carries little padding."""
    texts = sorted(texts, key=len)
    return [tokenize(texts[i: i + size], max_length) for i in range(0, len(texts), size)]


def held_out_loss(model, cb, data: List[Dict], refs: List, world_size: int, class_token="auto") -> float:
    """Mean distillation loss (:func:`astra.finetune.distill_loss`) of ``astra.simulate`` against ``refs``."""
    import torch

    import astra
    from .finetune import distill_loss

    with torch.no_grad():
        losses = [float(distill_loss(astra.simulate(model, b, world_size=world_size, codebooks=cb,
                                                     class_token=class_token), r, b))
                  for b, r in zip(data, refs)]
    return sum(losses) / len(losses)


#: files of a model directory that hold (or index) its weights: the trained model's own replace them in OUT
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".ot", ".gguf",
                   ".index.json")


def save_model_files(model_name: str, out: str) -> None:
    """The model directory's tokenizer, and every other file it holds that is not weights (sentence-transformers'
    ``modules.json`` and pooling folders, the generation config...), into ``out`` where ``save_pretrained`` did not
    write one, so that ``--model OUT`` (and sentence-transformers) load it as they loaded the original. Folders that
    hold weights (an ONNX export: the old model's) and the model card are not copied."""
    import shutil

    import transformers as tf

    from .cli import local_model_dir, resolve_model_name

    path = local_model_dir(resolve_model_name(model_name))
    tf.AutoTokenizer.from_pretrained(path, local_files_only=True).save_pretrained(out)
    for name in sorted(os.listdir(path)):
        src, dst = os.path.join(path, name), os.path.join(out, name)
        if os.path.exists(dst) or name.endswith(WEIGHT_SUFFIXES) or name.lower() == "readme.md":
            continue
        if os.path.isdir(src):
            if not any(f.endswith(WEIGHT_SUFFIXES) for _, _, files in os.walk(src) for f in files):
                shutil.copytree(src, dst)
        elif os.path.isfile(src):
            shutil.copy2(src, dst)


def cmd_finetune(args) -> int:
    import torch

    import astra
    from .cli import load_model
    from .finetune import CODEBOOKS_FILE

    print(f"[1/3] loading {args.model} ...", flush=True)
    # --train all saves the model: loaded as its config's architecture, so its task head is trained and kept
    model, tokenize, desc = load_model(args.model, args.max_length, architecture=args.train == "all")
    cb = astra.Codebooks.load(args.codebooks, model)
    train = batches(tokenize, args.train_texts, args.batch_size, args.max_length)
    test = batches(tokenize, args.held_out_texts, args.batch_size, args.max_length)
    source = f"lines of {args.input}" if args.input else "paragraphs of CPython's pydoc topics"
    print(f"[2/3] {desc}, {cb} from {args.codebooks}\n  training on {len(args.train_texts)} {source} "
          f"({len(train)} batches), {len(args.held_out_texts)} held out", flush=True)
    with torch.no_grad():
        refs = [model(**b) for b in test]
    before = {n: held_out_loss(model, cb, test, refs, n, args.class_token) for n in args.world_sizes}
    opts = {k: v for k, v in (("lr", args.lr), ("model_lr", args.model_lr), ("beta", args.beta), ("naq", args.naq))
            if v is not None}
    ws = args.world_sizes[0] if len(args.world_sizes) == 1 else args.world_sizes
    print(f"[3/3] astra.finetune(train={args.train!r}, world_size={ws}, epochs={args.epochs}"
          + "".join(f", {k}={v:g}" for k, v in opts.items()) + ") ...", flush=True)
    t0 = time.perf_counter()
    res = astra.finetune(model, cb, train, world_size=ws, train=args.train, epochs=args.epochs, seed=args.seed,
                         steps=args.steps, class_token=args.class_token, output_dir=args.out, **opts)
    print(f"  {len(res.losses)} steps in {time.perf_counter() - t0:.1f}s")
    if args.train == "all":
        save_model_files(args.model, args.out)
    print("held-out distillation loss (astra.simulate vs the unmodified model), before -> after:")
    for n in args.world_sizes:
        after = held_out_loss(model, res.codebooks, test, refs, n, args.class_token)   # refs: the model before training
        print(f"  world size {n}: {before[n]:.5g} -> {after:.5g} ({100 * (after / before[n] - 1):+.1f} %)")
    path = os.path.join(args.out, CODEBOOKS_FILE)
    model_opt = f"--model {args.out}" if args.train == "all" else f"--model {args.model}"
    print(f"saved {path}{' and the model' if args.train == 'all' else ''}; "
          f"use: astra run {model_opt} --codebooks {path}")
    return 0
