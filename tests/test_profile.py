"""astra.profile: the per-layer time breakdown of one rank (parallelize(..., profile=True)) tiles the forward,
changes nothing it measures, and is absent when off."""
import torch
from test_runtime_support import tiny_codebooks, tiny_inputs, tiny_model

import astra
from astra.profile import OUTSIDE, PHASES, Breakdown, format_breakdown


def _profiled_rank(rank):
    import time

    model = tiny_model("gpt2", head=False)
    inputs = tiny_inputs("gpt2", seq=11, padded=False)
    cb = tiny_codebooks(model, "gpt2", 1)
    plain = astra.parallelize(model, cb, timeout=30.0)
    ref = plain(**inputs)["last_hidden_state"]
    none = plain.breakdown
    plain.unpatch()
    pm = astra.parallelize(model, cb, timeout=30.0, profile=True)
    t0 = time.perf_counter()
    out = pm(**inputs)["last_hidden_state"]
    wall = time.perf_counter() - t0
    b = pm.breakdown
    try:                            # a forward that does not finish leaves no breakdown (it kept the last one's)
        pm(**dict(inputs, input_ids=inputs["input_ids"] + 10_000))
    except astra.InvalidInputError:
        pass
    stale = pm.breakdown
    pm.unpatch()
    return {"same": torch.equal(out, ref), "none": none, "b": b.to_dict(), "wall": wall, "stale": stale}


def test_breakdown_tiles_the_forward_and_changes_nothing():
    res = astra.launch(_profiled_rank, 2, timeout=60.0)
    for r in res:
        assert r["same"] and r["none"] is None and r["stale"] is None
        b = Breakdown.from_dict(r["b"])
        assert len(b.layers) == 2 and all(set(row) == set(PHASES) for row in b.layers)
        assert set(b.outside) == set(OUTSIDE)
        sums = b.phase_totals()
        assert all(v >= 0 for v in sums.values())
        assert sums["rest"] > 0 and sums["qkv"] > 0
        assert abs(b.residual_s()) <= 1e-3 * b.total_s + 1e-4           # the marks tile the forward
        assert b.total_s <= r["wall"] and r["wall"] - b.total_s < 0.05 * r["wall"] + 5e-3
    # causal: rank 0 never attends to rank 1's (later) tokens, so it builds no non-local K/V
    first, last = (Breakdown.from_dict(r["b"]).phase_totals() for r in res)
    assert first["attention"] == first["non-local K/V"] == first["unpack"] == 0.0
    assert last["attention"] > 0 and last["unpack"] > 0
    # and nobody attends to rank 1's tokens: it encodes nothing, rank 0 does
    assert first["encode"] > 0 and last["encode"] == 0.0


def test_format_breakdown_reports_the_residual():
    rows = [dict.fromkeys(PHASES, 0.001), dict.fromkeys(PHASES, 0.002)]
    b = Breakdown(layers=rows, outside=dict.fromkeys(OUTSIDE, 0.0005), total_s=0.0290)
    text = format_breakdown(b, "### t", wall_s=0.030)
    assert "| **all layers** |" in text and "| 1 | 2.0 | 2.0 |" in text
    assert "phases 28.0 ms + residual 1.00 ms (+3.45 %)" in text
    assert "wall time 30.0 ms = phases + 2.00 ms (+6.67 %)" in text
