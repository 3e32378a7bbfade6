"""The kernel ops inside ``torch.compile`` (CPU). Dynamo traced into the functions that hand raw data pointers to C++:
a tensor used only through its ``data_ptr()`` could be freed at the graph break before the C++ call read it, and
``vq_encode`` / ``encode_and_pack`` returned wrong codes in some calls (1 in 40 with Inductor, most with the eager
backend); ``gemm``'s oneDNN route does not lower in Inductor (a compile-time crash). Now those functions run as opaque
calls (``astra_kernels._dispatch.compile_opaque``) and ``gemm`` takes ``torch.matmul`` while compiling."""
import pytest
import torch

import astra_kernels as ak
from astra_kernels.testing import random_inputs, seeded_generator

REPEATS = 12


def _cases():
    g = seeded_generator(71)
    cb = random_inputs(16, 256, 8, generator=g)
    x = random_inputs(300, 128, generator=g)
    x[:30] = (cb[:, 3].reshape(-1) + cb[:, 4].reshape(-1)) / 2          # ties: the exact re-rank decides them
    codes = ak.vq_encode_reference(x, cb)
    q, k, v = (random_inputs(1, 2, 40, 16, generator=g) for _ in range(3))
    kt, vt = random_inputs(32, 2, 16, generator=g), random_inputs(32, 2, 16, generator=g)
    cd = torch.randint(0, 32, (1, 30), generator=g)
    return {
        "vq_encode": (lambda x, cb: ak.vq_encode(x * 1.0, cb * 1.0), (x, cb), codes),
        "vq_encode float64": (lambda x, cb: ak.vq_encode(x * 1.0, cb * 1.0), (x.double(), cb.double()),
                              ak.vq_encode_reference(x.double(), cb.double())),
        "encode_and_pack": (lambda x, cb: ak.encode_and_pack(x * 1.0, cb * 1.0, 8), (x, cb), ak.pack_codes(codes, 8)),
        "pack_codes": (lambda c: ak.pack_codes(c + 0, 10), (codes,), ak.pack_codes(codes, 10)),
        "unpack_codes": (lambda f: ak.unpack_codes(f.clone()), (ak.pack_codes(codes, 10),), codes),
        "attention_table": (lambda q, k, v: ak.attention_table(q * 1.0, k * 1.0, v, cd, kt * 1.0, vt),
                            (q, k, v), ak.attention_table(q, k, v, cd, kt, vt)),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_ops_inside_torch_compile_equal_eager(name):
    torch._dynamo.reset()
    fn, args, want = _cases()[name]
    f = torch.compile(fn, backend="eager")          # Dynamo's tracing, no code generation
    for _ in range(REPEATS):
        got = f(*args)
        assert got.dtype == want.dtype and got.shape == want.shape
        if got.is_floating_point():
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got, want), name


def test_gemm_inside_torch_compile_with_inductor():
    torch._dynamo.reset()
    g = seeded_generator(72)
    x, w, b = random_inputs(4, 8, generator=g), random_inputs(8, 3, generator=g), random_inputs(3, generator=g)
    f = torch.compile(lambda x, w, b: ak.gemm(x, w, b))
    torch.testing.assert_close(f(x, w, b), torch.addmm(b, x, w), rtol=1e-6, atol=1e-6)


def test_the_cpp_calls_run_eagerly_inside_a_compiled_function(monkeypatch):
    """Deterministic form of the test above (a freed tensor is read only when its memory is reused): every C++ entry
    that takes raw pointers is reached outside Dynamo's tracing (``is_compiling()`` is False there), so no traced
    graph owns the tensors it reads."""
    import astra_kernels._attention_cpu as attention_cpu
    import astra_kernels._codec as codec
    import astra_kernels._vq_screen as vq_screen

    seen = []

    def record(mod, name):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a: (seen.append((name, torch.compiler.is_compiling())), real(*a))[1])

    for mod, name in ((vq_screen, "small_group_bf16_top2"), (codec, "pack"), (codec, "unpack"),
                      (codec, "parse_header"), (codec, "crc32c"), (attention_cpu, "attention_f32")):
        record(mod, name)
    for fn, args, _ in _cases().values():
        torch._dynamo.reset()
        torch.compile(fn, backend="eager")(*args)
    torch.compile(lambda f: ak.crc32c(f.clone()), backend="eager")(ak.pack_codes(torch.arange(5), 4))
    names = {n for n, _ in seen}
    assert names == {"small_group_bf16_top2", "pack", "unpack", "parse_header", "crc32c", "attention_f32"}, names
    assert not any(compiling for _, compiling in seen), sorted({n for n, c in seen if c})
