"""astra_kernels.dense: astra's own dense products (oneDNN on fp32 CPU tensors, torch's default elsewhere), against
a float64 reference on random inputs."""

import pytest
import torch

import astra_kernels.dense as G
from astra_kernels import gemm
from astra_kernels.testing import assert_matches_reference, random_inputs, seeded_generator


def reference(x, w, b):
    out = x.double() @ w.double()
    return out if b is None else out + b.double()


@pytest.mark.parametrize("shape", [(1, 48), (37, 48), (3, 70, 48), (2, 1, 5, 48)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_reference(shape, bias, dtype):
    g = seeded_generator(len(shape) * 100 + shape[0] + bias)
    x = random_inputs(*shape, dtype=dtype, generator=g)
    w = random_inputs(48, 96, dtype=dtype, generator=g)
    b = random_inputs(96, dtype=dtype, generator=g) if bias else None
    out = gemm(x, w, b)
    assert out.dtype == dtype and out.shape == (*shape[:-1], 96)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    assert_matches_reference(out, reference(x, w, b), rtol=tol, atol=tol * 10, name="gemm")


def test_strided_operands():
    """A transposed x and a w that is a transposed view (how the runtime's weights may arrive)."""
    g = seeded_generator(3)
    x = random_inputs(64, 50, generator=g).t()               # [50, 64], not contiguous
    w = random_inputs(80, 64, generator=g).t()               # [64, 80], not contiguous
    b = random_inputs(80, generator=g)
    assert_matches_reference(gemm(x, w, b), reference(x, w, b), rtol=1e-5, atol=1e-4, name="gemm")


@pytest.mark.parametrize("view", ["strided", "expanded"])
def test_bias_views(view):
    """A bias that is a view (every other element of a buffer, or one value expanded with stride 0): oneDNN's linear
    read it as dense memory and added the wrong values."""
    g = seeded_generator(4)
    x, w = random_inputs(5, 16, generator=g), random_inputs(16, 8, generator=g)
    b = random_inputs(16, generator=g)[::2] if view == "strided" else random_inputs(1, generator=g).expand(8)
    assert not b.is_contiguous()
    assert_matches_reference(gemm(x, w, b), reference(x, w, b), rtol=1e-5, atol=1e-4, name="gemm")
    assert_matches_reference(gemm(x[None], w, b), reference(x[None], w, b), rtol=1e-5, atol=1e-4, name="gemm 3-D")


def test_gradients_take_torch_and_flow():
    g = seeded_generator(5)
    x = random_inputs(9, 16, generator=g).requires_grad_()
    w = random_inputs(16, 8, generator=g).requires_grad_()
    b = random_inputs(8, generator=g).requires_grad_()
    gemm(x, w, b).square().sum().backward()
    x2, w2, b2 = (t.detach().double().requires_grad_() for t in (x, w, b))
    (x2 @ w2 + b2).square().sum().backward()
    for a, r in ((x, x2), (w, w2), (b, b2)):
        assert_matches_reference(a.grad, r.grad, rtol=1e-5, atol=1e-4, name="grad")


def test_empty_rows():
    w = random_inputs(16, 8, generator=seeded_generator(6))
    assert gemm(torch.empty(0, 16), w).shape == (0, 8)


def test_falls_back_when_onednn_raises(monkeypatch):
    """A torch build whose oneDNN linear rejects the input: the same values through torch's default, and
    every later call goes there directly."""
    calls = []

    def broken(*a):
        calls.append(1)
        raise RuntimeError("not built for this input")

    monkeypatch.setattr(G, "_FAILED", [])
    monkeypatch.setattr(G, "_onednn_op", lambda: broken)
    g = seeded_generator(7)
    x, w = random_inputs(5, 16, generator=g), random_inputs(16, 8, generator=g)
    for _ in range(2):
        assert_matches_reference(gemm(x, w), reference(x, w, None), rtol=1e-5, atol=1e-5, name="gemm")
    assert calls == [1] and not G.onednn_available()


@pytest.mark.skipif(not G.onednn_available(), reason="this torch build has no oneDNN linear")
def test_onednn_route_is_taken(monkeypatch):
    seen = []
    op = G._onednn_op()
    monkeypatch.setattr(G, "_onednn_op", lambda: (lambda *a: seen.append(1) or op(*a)))
    g = seeded_generator(8)
    x, w = random_inputs(5, 16, generator=g), random_inputs(16, 8, generator=g)
    gemm(x, w)
    assert seen == [1]
    gemm(x.double(), w.double())                              # float64: torch's default
    assert seen == [1]


@pytest.mark.parametrize("x,w,b,msg", [
    ((5, 16), (15, 8), None, "x \\[..., K\\] and w \\[K, N\\]"),
    ((5, 16), (16, 8, 1), None, "x \\[..., K\\] and w \\[K, N\\]"),
    ((5, 16), (16, 8), (9,), "bias must have shape"),
])
def test_bad_shapes(x, w, b, msg):
    with pytest.raises(ValueError, match=msg):
        gemm(torch.ones(x), torch.ones(w), None if b is None else torch.ones(b))


def test_operands_that_are_not_tensors_or_not_on_one_device():
    """A list raised AttributeError inside the checks; a meta x with a CPU w returned a meta tensor silently."""
    with pytest.raises(ValueError, match="x must be a torch.Tensor, got list"):
        gemm([1.0, 2.0], torch.ones(2, 3))
    with pytest.raises(ValueError, match="bias must be a torch.Tensor, got float"):
        gemm(torch.ones(2, 3), torch.ones(3, 4), 1.0)
    with pytest.raises(ValueError, match="x, w and bias must be on one device, got meta, cpu, None"):
        gemm(torch.ones(2, 3, device="meta"), torch.ones(3, 4))


def test_mixed_dtypes():
    with pytest.raises(ValueError, match="share a dtype"):
        gemm(torch.ones(2, 3), torch.ones(3, 4, dtype=torch.float64))


@pytest.mark.parametrize("which", ["x", "w", "bias"])
def test_one_operand_asking_for_a_gradient_takes_torch(which):
    """Any one operand that requires grad sends the product through torch (oneDNN's linear has no backward): with
    only ``x`` (or only ``w``, only the bias) requiring grad the result is differentiable and its gradient right.
    The existing test made all three require grad, so ``all(...)`` in place of ``any(...)`` went unnoticed (it
    returned a result with no grad_fn)."""
    g = seeded_generator(8)
    ops = {"x": random_inputs(9, 16, generator=g), "w": random_inputs(16, 8, generator=g),
           "bias": random_inputs(8, generator=g)}
    ops[which].requires_grad_()
    out = gemm(ops["x"], ops["w"], ops["bias"])
    assert out.requires_grad and out.grad_fn is not None
    out.square().sum().backward()
    ref = {k: t.detach().double().requires_grad_(k == which) for k, t in ops.items()}
    (ref["x"] @ ref["w"] + ref["bias"]).square().sum().backward()
    assert_matches_reference(ops[which].grad, ref[which].grad, rtol=1e-5, atol=1e-4, name="grad")
