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


def _vq_kernels(seed: int):
    """(the VQ Triton kernels' module, the device they run on, a seeded generator); skipped, with the reason, where
    Triton can not run (no GPU and no TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    if not T.triton_runnable():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    from astra_kernels.triton import vq_kernels

    return vq_kernels, T.kernel_device(), T.seeded_generator(seed)


def test_triton_encode_ties_across_codebook_tiles_go_to_the_lowest_index():
    """Mutation audit (vq_kernels.vq_encode_kernel; here as the proof-chain file of the VQ kernels): ties were only
    tested on the CPU path, so the kernel's "a later BLOCK_K tile replaces the running best only if strictly
    smaller" (``tmin < best``) could become ``<=`` unnoticed. Duplicate codewords in three different 64-wide tiles
    (K = 150); odd-integer data, so every distance is exact in fp32 (any summation order, tf32x3 too) and the ties
    are exact. The kernel (poisoned output) and its fused pack must pick the lowest index, as the float64
    reference does."""
    import astra_kernels as ak
    from astra_kernels.vq import vq_distances_reference

    K, dev, g = _vq_kernels(83)
    G, Kc, DG, N = 2, 150, 16, 40

    def odd(*shape, high):                                 # odd integers in (-high, high): never zero
        return (2 * T.random_ints(*shape, low=0, high=high, generator=g) + 1 - high).to(torch.float32)

    cb = odd(G, Kc, DG, high=8)
    for a, b, c in ((5, 70, 140), (63, 64, 149)):          # the same codeword in tiles 0, 1 and 2
        cb[:, b] = cb[:, a]
        cb[:, c] = cb[:, a]
    pick = T.random_ints(N, G, low=0, high=4, generator=g)
    src = torch.tensor([5, 70, 63, 64])[pick]              # rows next to a duplicated codeword (either copy)
    x = (cb[torch.arange(G)[None, :], src] + odd(N, G, DG, high=2)).reshape(N, G * DG)
    ref = ak.vq_encode_reference(x, cb)
    d = vq_distances_reference(x, cb)
    assert bool((d[..., 149] == d.gather(-1, ref.long()[..., None]).squeeze(-1)).any()), "no tie across tiles"
    cn = (cb.double() ** 2).sum(-1).float()
    out = T.poisoned_empty(N, G, dtype=torch.int32, device=dev)
    K.vq_encode_triton(x.to(dev), cb.to(dev), cn.to(dev), out=out)
    T.assert_equal_ints(out.cpu(), ref, "codes")
    frame = K.encode_and_pack_triton(x.to(dev), cb.to(dev), cn.to(dev), 8, (N, G)).cpu()
    T.assert_equal_ints(frame, ak.pack_codes(ref, 8), "frame")


def test_triton_decode_clamps_codes_outside_the_codebook_to_row_zero():
    """Mutation audit (vq_kernels.vq_decode_kernel): the public decode range-checks codes first, so the kernel's
    own guard (a code outside ``[0, K)`` reads row 0, never another group's rows or memory past the codebook) was
    never exercised and could become ``code <= K`` unnoticed. Codes ``K`` and ``-1`` in group 0 (where row ``K``
    is group 1's row 0, inside the tensor) must decode to group 0's row 0; valid codes as the reference."""
    from astra_kernels.vq import vq_decode_reference

    K, dev, g = _vq_kernels(97)
    G, Kc, DG, N = 2, 9, 24, 37
    cb = T.random_inputs(G, Kc, DG, generator=g)
    codes = T.random_ints(N, G, low=0, high=Kc, generator=g, dtype=torch.int32)
    codes[3, 0], codes[30, 0] = Kc, -1
    expect = vq_decode_reference(codes.masked_fill((codes < 0) | (codes >= Kc), 0), cb)
    out = T.poisoned_empty(N, G * DG, device=dev)
    K.vq_decode_triton(codes.to(dev), cb.to(dev), out=out)
    T.assert_matches_reference(out.cpu(), expect.double(), rtol=0, atol=0)
