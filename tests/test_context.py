"""astra.context: the per-forward state the hooks share (key padding masks, a decoder's position ids and whether
they are the default ``arange(T)``, the split)."""
import pytest
import torch
from test_runtime_support import tiny_inputs, tiny_model

import astra
from astra.context import key_masks, make_ctx, position_ids
from astra.models import family_of


@pytest.fixture(scope="module")
def llama():
    return family_of(tiny_model("llama", head=False))


def test_position_ids_are_default_only_when_they_equal_arange(llama):
    """``default_pos`` says a decoder's position ids are ``arange(T)``: the distributed runtime then gathers G = 1
    non-local K/V from codeword tables RoPE-rotated at the default positions. Shifted or left-padding positions
    must say False (a mutation returning True made parallelize differ from simulate by 6e-3 on llama, G = 1, with
    position_ids = arange + 5; no test looked at the flag)."""
    T = 7
    cases = [({}, torch.arange(T)[None], True),
             ({"position_ids": torch.arange(T)}, torch.arange(T)[None], True),             # [T] -> [1, T]
             ({"position_ids": torch.arange(T)[None].expand(2, T)}, torch.arange(T)[None].expand(2, T), True),
             ({"position_ids": torch.arange(T) + 5}, (torch.arange(T) + 5)[None], False),
             ({"position_ids": torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4]])}, None, False)]
    for inputs, want, default in cases:
        pos, is_default = position_ids(llama, inputs, T, "cpu")
        assert is_default is default, inputs
        if want is not None:
            assert torch.equal(pos, want)
    bert = family_of(tiny_model("bert"))
    assert position_ids(bert, {"position_ids": torch.arange(T) + 5}, T, "cpu") == (None, True)   # encoders: own


def test_make_ctx_masks_and_split(llama):
    """make_ctx keeps the attention mask as a [B, T] bool key mask and refuses another shape (validate_inputs
    refuses it first on the runtimes' path, so only a direct call reached this check); the chunks are the split's."""
    inputs = tiny_inputs("llama", batch=2, seq=9, padded=True)
    ctx = make_ctx(llama, inputs, 3, False)
    assert ctx.mask.dtype == torch.bool and torch.equal(ctx.mask, inputs["attention_mask"].bool())
    assert [c.tolist() for c in ctx.chunks] == [c.tolist() for c in astra.split_indices(9, 3, False)]
    assert (ctx.T, ctx.B, ctx.default_pos) == (9, 2, True)
    for bad in (inputs["attention_mask"][:, :8], inputs["attention_mask"][:1]):
        with pytest.raises(ValueError, match=r"attention_mask must be \[B, T\] = \[2, 9\]"):
            make_ctx(llama, dict(inputs, attention_mask=bad), 3, False)


def test_key_masks_select_the_queries_and_the_non_local_keys(llama):
    """key_masks gives the mask columns of the queries and of the non-local keys, in the order of the indices."""
    inputs = tiny_inputs("llama", batch=2, seq=9, padded=True)
    ctx = make_ctx(llama, inputs, 3, False)
    q, r = torch.tensor([3, 4, 5]), torch.tensor([0, 1, 2, 6])
    lm, rm = key_masks(ctx, q, r)
    assert torch.equal(lm, ctx.mask[:, [3, 4, 5]]) and torch.equal(rm, ctx.mask[:, [0, 1, 2, 6]])
    assert not bool(rm.all())                      # the padding is among the non-local keys here
    ctx = make_ctx(llama, {"input_ids": inputs["input_ids"]}, 3, False)
    assert key_masks(ctx, q, r) == (None, None)
