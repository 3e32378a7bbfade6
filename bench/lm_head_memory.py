"""Peak memory of a long prompt through an LM head: ``pm.generate`` and ``pm(..., output="last_logits")`` on 2 ranks
against HF's own ``generate`` and ``logits_to_keep=1`` forward in one process (the peer), same model, same prompt.

    PYTHONPATH=.:python python bench/lm_head_memory.py [--tokens 4096] [--new 16]

Each figure is the sampled peak resident memory during the call minus the resident memory just before it (MiB),
each call in a fresh process, so the model's own weights are not counted. A random-init GPT-2 of the small model's
width (768, 12 heads, vocabulary 50257) with 2 layers and 8192 positions; G = 32, K = 1024 random codebooks; 1 thread
per process. Memory, not time: the figures do not depend on what else runs on the machine.
"""
from __future__ import annotations

import argparse
import os
import threading
import time

import torch

import astra


def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Peak:
    """The peak resident memory above the level at entry, sampled every 2 ms."""

    def __enter__(self):
        self.base = self.peak = _resident_mib()
        self._stop = False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop:
            self.peak = max(self.peak, _resident_mib())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.extra = max(self.peak, _resident_mib()) - self.base


def _model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=768, n_layer=2, n_head=12, n_positions=8192)).eval()


def _ids(tokens: int) -> torch.Tensor:
    return torch.randint(0, 50257, (1, tokens), generator=torch.Generator().manual_seed(1))


def _call(rank: int, world: int, tokens: int, new: int, call: str) -> float:
    """One call's extra peak memory, in a fresh process (an earlier call's freed memory, which the allocator keeps,
    would hide the next one's): astra's rank when ``world`` > 1, else HF's model alone."""
    torch.set_num_threads(1)
    model, ids = _model(), _ids(tokens)
    if world > 1:
        pm = astra.parallelize(model, astra.Codebooks.random(model, groups=32, codebook_size=1024), timeout=600)
        run = {"generate": lambda: pm.generate(ids, max_new_tokens=new, do_sample=False),
               "last_logits": lambda: pm(input_ids=ids, output="last_logits")}[call]
    else:
        run = {"generate": lambda: model.generate(ids, max_new_tokens=new, do_sample=False),
               "last_logits": lambda: model(input_ids=ids, logits_to_keep=1)}[call]
    with Peak() as peak, torch.no_grad():
        run()
    return peak.extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--new", type=int, default=16)
    args = ap.parse_args()
    print(f"T = {args.tokens}, {args.new} new tokens; extra peak resident memory (MiB)")
    print("| call | HF, one process | astra rank 0 | astra rank 1 | largest rank / HF |")
    print("|---|---|---|---|---|")
    for call in ("generate", "last_logits"):
        (hf,) = astra.launch(_call, 1, 1, args.tokens, args.new, call, timeout=600, join_timeout=1800)
        r0, r1 = astra.launch(_call, 2, 2, args.tokens, args.new, call, timeout=600, join_timeout=1800)
        print(f"| {call} | {hf:.0f} | {r0:.0f} | {r1:.0f} | {max(r0, r1) / hf:.2f} |")


if __name__ == "__main__":
    main()
