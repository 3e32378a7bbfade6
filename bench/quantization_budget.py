"""Where MiniLM's quantization error comes from: the accuracy study's MiniLM task (bench/accuracy.py: packaged
all-MiniLM-L6-v2, 1500 train / 300 held-out `pydoc_data` sentences) at G = 32, K = 1024, world size 4, with
calibrated codebooks, scored with every layer quantized, with one layer quantized at a time, and with some
tokens kept exact (the [CLS] / [SEP] / punctuation tokens, or the 5 % of largest norm): how much of the loss
each part carries. Diagnostic only (an oracle: inference cannot keep a non-local token exact).

    PYTHONPATH=.:python python bench/quantization_budget.py [--threads 2] [--cases all,sep,...]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy as A  # noqa: E402

import astra  # noqa: E402
from astra.training import TrainSimRuntime  # noqa: E402

CLS, SEP, PERIOD, COMMA = 101, 102, 1012, 1010     # bert-base-uncased vocabulary ids


class OracleRuntime(TrainSimRuntime):
    """:class:`TrainSimRuntime` whose ``keep(layer, h, ids)`` rule keeps chosen non-local tokens exact."""

    def __init__(self, *args, keep, ids, **kw):
        super().__init__(*args, **kw)
        self.keep, self.ids = keep, ids

    def on_layer_input(self, layer, module, h):
        super().on_layer_input(layer, module, h)
        ctx = self.ctx
        for s, q in enumerate(ctx.state[layer]):
            g = ctx.chunks[s]
            hs = h[:, self._ext(g)]
            ctx.state[layer][s] = torch.where(self.keep(layer, hs, self.ids[:, g])[..., None], hs, q)


def _top_norm(frac):
    def keep(layer, h, ids):
        n = h.norm(dim=-1)
        return n >= torch.quantile(n.flatten().float(), 1 - frac)
    return keep


def _only_layer(L):
    return lambda layer, h, ids: torch.full(ids.shape, layer != L)


def cases():
    none = lambda l, h, ids: torch.zeros(ids.shape, dtype=torch.bool)  # noqa: E731
    out = {"all": none, "cls+sep": lambda l, h, ids: (ids == SEP) | (ids == CLS),
           "sep+punct": lambda l, h, ids: (ids == SEP) | (ids == PERIOD) | (ids == COMMA), "norm5%": _top_norm(0.05)}
    for L in range(6):
        out[f"only-layer-{L}"] = _only_layer(L)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default=",".join(cases()))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    task = A.minilm_task(A.Size())
    refs = A.outputs(task.model, task.test)
    cb = astra.calibrate(task.model, task.train, groups=32, codebook_size=1024, iters=10)
    print("| case | mean cosine | NN agreement |\n|---|---|---|")
    for name in args.cases.split(","):
        keep, outs, t0 = cases()[name], [], time.time()
        with torch.no_grad():
            for b in task.test:
                rt = OracleRuntime(task.model, cb, 4, "auto", keep=keep, ids=b["input_ids"])
                rt.install()
                try:
                    outs.append(rt.run(b)[0])
                finally:
                    rt.uninstall()
        m = task.score(outs, refs)
        print(f"| {name} | {m['cos']:.4f} | {100 * m['nn']:.1f}% |  ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
