"""The proof-chain helpers themselves (astra_kernels.testing) and the AOT report plumbing
(astra_kernels.aot) - cheap checks that do not compile anything."""
import math

import pytest
import torch

from astra_kernels import testing as T


def test_random_inputs_never_zero_and_seeded():
    a = T.random_inputs(1000, 7, seed=3)
    b = T.random_inputs(1000, 7, seed=3)
    assert torch.equal(a, b) and not (a == 0).any()
    assert not (T.random_inputs(5000, generator=T.seeded_generator(1), dtype=torch.float16, scale=1e-6) == 0).any()
    u = T.random_inputs(100, kind="uniform", seed=1, scale=2.0)
    assert u.abs().max() <= 2.0
    r = T.random_ints(10, 10, low=3, high=9, seed=1, dtype=torch.int32)
    assert r.dtype == torch.int32 and int(r.min()) >= 3 and int(r.max()) < 9
    with pytest.raises(ValueError):
        T.random_inputs(3, kind="cauchy")


def test_poison_values_and_detection():
    f = T.poisoned_empty(3, 4, dtype=torch.float32)
    assert torch.isnan(f).all()
    i = T.poisoned_empty((2, 2), dtype=torch.int32)
    assert (i == T.POISON_INT).all()
    u = T.poison_like(torch.zeros(5, dtype=torch.uint8))
    assert (u == T.POISON_U8).all()
    with pytest.raises(AssertionError, match="still poisoned"):
        T.assert_no_poison(f)
    f[:] = 1.0
    T.assert_no_poison(f)
    i[0, 0] = 7
    with pytest.raises(AssertionError, match="3 of 4"):
        T.assert_no_poison(i)


def test_assert_matches_reference_reports_errors():
    ref = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    ma, mr = T.assert_matches_reference(ref.float() * (1 + 1e-7), ref, rtol=1e-6, atol=0)
    assert ma > 0 and mr < 1e-6
    with pytest.raises(AssertionError, match="max abs err"):
        T.assert_matches_reference(torch.tensor([1.0, 2.5, 4.0]), ref, rtol=1e-3, atol=1e-3)
    with pytest.raises(AssertionError, match="non-finite"):
        T.assert_matches_reference(torch.tensor([1.0, float("nan"), 4.0]), ref)
    with pytest.raises(AssertionError, match="shape"):
        T.assert_matches_reference(torch.ones(2), ref)
    with pytest.raises(AssertionError, match="differ"):
        T.assert_equal_ints(torch.tensor([1, 2]), torch.tensor([1, 3]))


def test_interpreter_switching():
    """interpret_mode() re-creates the kernels of already imported modules in the requested mode and
    restores the previous mode afterwards."""
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from astra_kernels.triton import vq_kernels as K

    before = T.interpreting()
    with T.interpret_mode(True):
        assert T.interpreting()
        assert isinstance(K.vq_decode_kernel, InterpretedFunction)
        cb = T.random_inputs(1, 5, 3, seed=1)
        codes = torch.tensor([[4], [0]], dtype=torch.int32)
        out = K.vq_decode_triton(codes, cb, out=T.poisoned_empty(2, 3))
        T.assert_matches_reference(out, cb[0, [4, 0]].double(), rtol=0, atol=0)
    assert T.interpreting() == before
    with T.interpret_mode(False):
        assert not T.interpreting()
        assert not isinstance(K.vq_decode_kernel, InterpretedFunction)
    assert T.interpreting() == before
    assert isinstance(K.vq_decode_kernel, InterpretedFunction) == before
    env = T.interpreter_env(True, base={})
    assert env == {"TRITON_INTERPRET": "1"} and T.interpreter_env(False, base={"TRITON_INTERPRET": "1"}) == {}


def test_aot_specs_are_discoverable_and_well_formed():
    pytest.importorskip("triton")
    from astra_kernels import aot

    specs = [s for m, s in aot.discover_specs(for_compile=False) if m.endswith(("vq_kernels", "codec_kernels"))]
    names = {s.name for s in specs}
    assert {"vq_encode_kernel", "vq_decode_kernel", "pack_codes_kernel", "crc32c_chunks_kernel",
            "crc32c_combine_kernel"} <= names
    for s in specs:
        argn = s.fn.arg_names
        assert set(s.signature) == set(argn), s.name
        for k, v in s.constexprs.items():
            assert s.signature[k] == "constexpr"
            if k.startswith("BLOCK"):
                assert v & (v - 1) == 0, f"{s.name}: {k}={v} is not a power of two"
        if s.name == "vq_encode_kernel":
            assert s.expect_mma and s.constexprs["BLOCK_D"] >= 16 and s.constexprs["BLOCK_K"] >= 16


def test_aot_table_formatting():
    from astra_kernels.aot import AotResult, format_table

    r = [AotResult(kernel="k", arch=80, config="c", num_warps=4, num_stages=2, ok=True, regs=40,
                   spill_stores=0, spill_loads=0, smem=1024, mma="mma.sync", expect_mma=True),
         AotResult(kernel="k", arch=90, config="c", num_warps=4, num_stages=2, ok=False, regs=255,
                   spill_stores=8, spill_loads=4, smem=0, errors=["spills: 8 B"])]
    t = format_table(r)
    assert "sm_80" in t and "mma.sync (req)" in t and "FAIL: spills: 8 B" in t and "12" in t
    assert r[1].spills == 12 and not math.isnan(r[0].spills)
