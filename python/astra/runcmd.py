"""``astra run``: a real model over N local ranks (or under torchrun) on text from a file or stdin."""
from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from typing import Dict, List

from .transport import checked_timeout

DESCRIPTION = """\
Run a real model with ASTRA over N local gloo ranks (astra.launch), or as one rank under torchrun
(`torchrun --nproc-per-node 2 -m astra run ...`). The model is the packaged all-MiniLM-L6-v2 or an HF model
directory; the codebooks are --codebooks FILE or calibrated now on CPython's pydoc text. Inputs are the
non-empty lines of --input (a file, or - for stdin). Prints each input's output (sentence embedding for
encoders, next-token id for decoders, predicted class for image classifiers), the latency, the bytes each
rank sent, and the distance to the unmodified model."""


#: the most text ``astra run --input`` reads (every line runs in one batch): /dev/zero or `yes |` grew until the OOM
#: killer came
MAX_INPUT_CHARS = 16 << 20


def read_texts(path: str) -> List[str]:
    """Non-empty lines of ``path`` (``-``: stdin), at most :data:`MAX_INPUT_CHARS` characters."""
    if path == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise ValueError("--input -: no text on stdin (pipe text in, or give --input FILE)")
        text = sys.stdin.read(MAX_INPUT_CHARS + 1)
    else:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(MAX_INPUT_CHARS + 1)
        except UnicodeDecodeError as e:
            raise ValueError(f"--input {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if len(text) > MAX_INPUT_CHARS:
        raise ValueError(f"--input {path}: more than {MAX_INPUT_CHARS >> 20} Mi characters of text (every line runs "
                         "as one batch); give fewer lines")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"--input {path}: no non-empty lines")
    return lines


def check_run_args(args) -> None:
    from .cli import check_in_file

    if args.input != "-":
        check_in_file("--input", args.input, regular=False)
    elif under_torchrun():
        raise ValueError("--input -: under torchrun every rank reads the same stdin (one takes the text, the others "
                         "none); give --input FILE")
    try:
        args.timeout = checked_timeout(args.timeout)
    except ValueError as e:
        raise ValueError(f"--timeout: {e}") from None
    args.world_size = torchrun_world(args.world_size) if under_torchrun() else (args.world_size or DEFAULT_WORLD)
    args.texts = read_texts(args.input)


#: ``astra run``'s local ranks when --world-size is not given
DEFAULT_WORLD = 2
#: what torchrun (or a launcher like it) sets for every rank; RANK with MASTER_ADDR is read as running under one
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torchrun_world(given) -> int:
    """The world size under torchrun, from the environment: ValueError (before any work) where its variables are
    incomplete or out of range (left over in a shell, say), or where ``--world-size`` says another."""
    env = {k: os.environ.get(k) for k in TORCHRUN_VARIABLES}
    missing = [k for k, v in env.items() if not v]
    if missing:
        raise ValueError(f"{' and '.join(k for k in ('RANK', 'MASTER_ADDR') if env[k])} set in the environment read "
                         f"as running under torchrun, but {', '.join(missing)} is not set (unset the leftover "
                         "variables to start local ranks)")
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    except ValueError:
        raise ValueError(f"RANK={env['RANK']!r} and WORLD_SIZE={env['WORLD_SIZE']!r} in the environment must be "
                         "integers") from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world}) in the environment")
    if given is not None and given != world:
        raise ValueError(f"--world-size {given}, but the environment says WORLD_SIZE={world} (under torchrun the "
                         "ranks come from it: drop --world-size, or unset RANK / MASTER_ADDR to start local ranks)")
    print(f"under torchrun: rank {rank} of {world} (RANK / WORLD_SIZE from the environment)", flush=True)
    return world


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "MASTER_ADDR" in os.environ)


def run_rank(rank: int, model_name: str, cb_path: str, texts: List[str], max_length: int, timeout: float) -> Dict:
    """One spawned rank: loads the model and the codebooks, then :func:`rank_body`."""
    import astra
    from .cli import load_model

    model, tokenize, _ = load_model(model_name)
    return rank_body(model, astra.Codebooks.load(cb_path, model), tokenize(texts, max_length), timeout)


def rank_body(model, cb, inputs: Dict, timeout: float) -> Dict:
    """The ASTRA forward on this rank (timed), the gathered outputs, and the bytes this rank sent; the model is
    unpatched again afterwards."""
    import torch

    import astra

    pm = astra.parallelize(model, cb, timeout=timeout)
    try:
        with torch.inference_mode():
            pm(**inputs)                                   # warm-up
            t0 = time.perf_counter()
            out = pm(**inputs)
            dt = time.perf_counter() - t0
            full = pm.gather(out, dst=0)                   # rank 0 reports; the others send, and hold nothing
    finally:
        pm.unpatch()
    # layer 0 sends nothing (docs/runtime.md); one rank exchanges nothing at all
    exchanged = 0 if pm.world_size == 1 else sum(1 for s in pm.stats if s.bytes_on_wire > 0)
    return {"time_s": dt, "bytes_sent": sum(s.bytes_sent for s in pm.stats), "layers": exchanged,
            "out": None if full is None else {k: v for k, v in full.items() if isinstance(v, torch.Tensor)}}


def _report(ranks: List[Dict], model, tokenize, texts, max_length) -> None:
    import torch

    from .cli import primary_output

    inputs = tokenize(texts, max_length)
    with torch.no_grad():
        ref = {k: v for k, v in model(**inputs).items() if isinstance(v, torch.Tensor)}
    key, ref_main = primary_output(ref)
    got = ranks[0]["out"][key]
    mask = inputs.get("attention_mask")
    print("\noutputs:")
    for line in output_lines(ref, key, got, mask, texts):
        print(line)
    valid = mask.bool() if mask is not None else torch.ones(got.shape[:2], dtype=torch.bool)
    d = (got - ref_main).abs()[valid]
    print(f"\nlatency (slowest rank, one forward): {max(r['time_s'] for r in ranks) * 1e3:.1f} ms")
    for r, res in enumerate(ranks):
        where = f"over the {res['layers']} layers that exchange" if res["layers"] else "(one rank: nothing exchanged)"
        print(f"  rank {r}: {res['time_s'] * 1e3:.1f} ms, sent {res['bytes_sent']:,} B {where}")
    print(f"distance to the unmodified model ({key}): max |diff| {float(d.max()):.4f}, mean |diff| "
          f"{float(d.mean()):.5f}")


def output_lines(ref: Dict, key: str, got, mask, texts: List[str]) -> List[str]:
    """One line per input: a causal LM's next token after the input's last token (not after the padding), an
    image classifier's class, else the sentence embedding's cosine to the unmodified model's."""
    import torch

    from .cli import sentence_embedding

    if "logits" in ref and got.dim() == 3:
        T = got.shape[1]
        last = (torch.arange(T) * mask).argmax(-1) if mask is not None else torch.full((got.shape[0],), T - 1)
        rows = torch.arange(got.shape[0])
        nxt, want = got[rows, last].argmax(-1), ref["logits"][rows, last].argmax(-1)
        return [f"  [{i}] next-token id {int(nxt[i])} (model: {int(want[i])}): {t[:60]!r}" for i, t in enumerate(texts)]
    if "logits" in ref:
        cls, want = got.argmax(-1), ref["logits"].argmax(-1)
        return [f"  [{i}] class {int(cls[i])} (model: {int(want[i])}): {t[:60]!r}" for i, t in enumerate(texts)]
    emb, emb_ref = sentence_embedding(got, mask), sentence_embedding(ref[key], mask)
    return [f"  [{i}] embedding [{', '.join(f'{float(v):+.3f}' for v in emb[i, :4])}, ...] cosine to the model "
            f"{float((emb[i] * emb_ref[i]).sum()):.4f}: {t[:60]!r}" for i, t in enumerate(texts)]


def truncated(tokenize, texts: List[str], max_length: int) -> List[int]:
    """Indices of the texts that ``tokenize`` cuts at ``max_length`` tokens (none for image models)."""
    longer = tokenize(texts, max_length + 1)
    ids, mask = longer.get("input_ids"), longer.get("attention_mask")
    if ids is None:
        return []
    lengths = mask.sum(-1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
    return [i for i, n in enumerate(lengths) if n > max_length]


def cmd_run(args) -> int:
    import tempfile

    import astra
    from .cli import check_world_fits, codebooks_for, load_model

    print(f"[1/3] loading {args.model} ...", flush=True)
    model, tokenize, desc = load_model(args.model, args.max_length)
    print(f"model: {desc}; {len(args.texts)} input(s)")
    check_world_fits(model, tokenize(args.texts, args.max_length), args.world_size)
    cut = truncated(tokenize, args.texts, args.max_length)
    if cut:
        lines = ", ".join(str(i + 1) for i in cut)
        print(f"note: input line(s) {lines} are longer than --max-length {args.max_length} tokens and run cut to it")
    cb = codebooks_for(args, model, tokenize, desc)
    with tempfile.TemporaryDirectory() as d:
        path = args.codebooks or os.path.join(d, "codebooks.safetensors")
        if not args.codebooks:
            cb.save(path)
        call = (args.model, path, args.texts, args.max_length, args.timeout)
        if under_torchrun():
            import torch.distributed as dist

            astra.tune_allocator()             # as astra.launch does for the ranks it starts
            # this process already holds the model and the codebooks; --timeout bounds the rendezvous and the
            # results' gather too (gloo's default is 30 minutes)
            dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
            mine = rank_body(model, cb, tokenize(args.texts, args.max_length), args.timeout)
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
            rank = dist.get_rank()
            dist.destroy_process_group()
            if rank != 0:
                return 0
        else:
            print(f"[3/3] running {args.world_size} local gloo ranks ...", flush=True)
            # no cap on the whole run: --timeout bounds every wait on a peer, and a failed rank ends the others
            ranks = astra.launch(run_rank, args.world_size, *call, timeout=args.timeout)
    _report(ranks, model, tokenize, args.texts, args.max_length)
    return 0
