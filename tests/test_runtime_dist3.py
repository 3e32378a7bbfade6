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
