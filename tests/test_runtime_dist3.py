"""Three real gloo ranks (uneven chunks: 11 tokens / 16 patches over 3 ranks)."""
from test_runtime_dist import check, run_cases

import astra

CASES_3 = [
    ("gpt2", True, True, None, "auto"), ("gpt2", True, False, 1, "auto"),
    ("llama", True, True, None, "auto"), ("llama", True, True, 32, "auto"),
    ("bert", True, True, None, "auto"), ("bert", True, True, 1, "distributed"),
    ("vit", True, False, None, "auto"), ("vit", False, False, 32, "auto"),
]


def test_three_gloo_ranks():
    results = astra.launch(run_cases, 3, CASES_3, join_timeout=240)
    check(results, 3)


def test_three_gloo_ranks_single_pass_attention():
    # overlap=False: one fused mixed-attention pass after the codes arrive (no log-sum-exp merge)
    cases = [("llama", True, True, 1, "auto"), ("bert", True, True, 32, "auto"), ("gpt2", True, True, None, "auto")]
    results = astra.launch(run_cases, 3, cases, 30.0, False, join_timeout=240)
    check(results, 3)


def _subgroup_rank(rank):
    import torch.distributed as dist
    from test_runtime_support import tiny_inputs, tiny_model

    group = dist.new_group([1, 2])             # every rank takes part in creating it
    if rank == 0:               # outside the group: it "succeeded" with rank -1, then failed in struct.pack
        try:
            astra.parallelize(tiny_model("llama"), None, group=group, timeout=30)
        except ValueError as e:
            return str(e)
        return "parallelize accepted a rank outside its group"
    model = tiny_model("llama")
    inputs = tiny_inputs("llama", seq=9, padded=True)
    cb = astra.Codebooks.random(model, groups=1, codebook_size=8, seed=4)
    sim = astra.simulate(model, inputs, world_size=2, codebooks=cb)
    pm = astra.parallelize(model, cb, group=group, timeout=30)
    assert (pm.rank, pm.world_size) == (rank - 1, 2)
    full = pm.gather(pm(**inputs))
    m = inputs["attention_mask"].bool()
    return float((full.logits - sim.logits).abs()[m].max())


def test_parallelize_on_a_subgroup():
    out = astra.launch(_subgroup_rank, 3, join_timeout=120)
    assert out[0] == ("global rank 0 is not a member of the process group given to astra.parallelize (call it only "
                      "on the group's ranks)"), out[0]
    assert out[1] < 1e-4 and out[2] < 1e-4
