"""One device, the plain model against the same model with astra's CPU attention (context for issue 10's ratios).

    PYTHONPATH=.:python python bench/one_device_attention.py --repeats 7

GPT-2-small shape (random init), 12 layers, T = 1024, one thread: the model's own attention (HF "sdpa": torch's
CPU flash kernel) against ``astra_kernels.attention_local(causal=True)`` registered as an HF attention function
(the C++ kernel where the CPU has AVX-512), interleaved, median of --repeats forwards after one warm-up. ASTRA's
ranks use that kernel for their attention, so this says how much of ASTRA's speed-up over one device is the kernel.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time


def local_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    import astra_kernels as ak

    if attention_mask is not None:
        raise ValueError("this benchmark feeds unpadded inputs (no attention mask)")
    out = ak.attention_local(query, key, value, causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=1024)
    a = ap.parse_args(argv)
    import torch
    from transformers import AttentionInterface

    from astra.bench.models import build_inputs, build_model

    torch.set_num_threads(1)
    AttentionInterface.register("astra_local_bench", local_attention)
    model = build_model("gpt2", 12, a.tokens)
    inputs = build_inputs("gpt2", a.tokens)
    impls = {"HF sdpa": "sdpa", "astra attention": "astra_local_bench"}
    times = {k: [] for k in impls}
    with torch.inference_mode():
        ref = None
        for i in range(a.repeats + 1):
            for name, impl in impls.items():
                model.set_attn_implementation(impl)
                t0 = time.perf_counter()
                out = model(**inputs).last_hidden_state
                if i:
                    times[name].append(time.perf_counter() - t0)
                if ref is None:
                    ref = out
                elif i == 0:
                    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)   # same model, same answer
    for name, ts in times.items():
        print(f"{name}: {statistics.median(ts):.3f} s [{min(ts):.3f}, {max(ts):.3f}]")
    base = statistics.median(times["HF sdpa"])
    print(f"astra attention / HF sdpa: {base / statistics.median(times['astra attention']):.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
