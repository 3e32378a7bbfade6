"""astra.agreement: the fixed-size input fingerprint every rank exchanges before a distributed forward, what its
digests see, and the verdict :func:`disagreement` gives for a set of fingerprints. The distributed cases (ranks given
different inputs, models, codebooks) are in test_reliability.py; these check the pieces without a process group."""

import torch

import astra
from astra.agreement import (
    FINGERPRINT_NBYTES,
    INVALID,
    MAGIC,
    TEXT_NBYTES,
    VALID,
    Fingerprint,
    describe_inputs,
    digest,
    disagreement,
    inputs_digest,
)


def _fp(call=3, world=2, status=VALID, model=b"M" * 16, codebooks=b"C" * 16, values=b"V" * 16, text="ids: int64[1, 4]",
        magic=MAGIC, version="0.1.0"):
    return Fingerprint(call, world, status, model, codebooks, values, text, magic, version)


def test_a_fingerprint_has_one_size_whatever_its_call_counter_or_text():
    """Mutation testing: neither the 32-bit wrap of the call counter nor the cut of a long text was tested; without
    them a rank past 2**32 calls, or one whose inputs' description is longer than 448 bytes, failed to pack or sent a
    larger buffer than its peers (the exchange must never fail on mismatched sizes)."""
    long_text = "input_ids: int64[1, 4], " + "é" * 400           # 824 bytes of UTF-8
    for fp in (_fp(call=2**32 + 5), _fp(text=long_text), _fp(text="")):
        buf = fp.pack()
        assert buf.dtype == torch.uint8 and buf.numel() == FINGERPRINT_NBYTES
    back = Fingerprint.unpack(_fp(call=2**32 + 5, text=long_text).pack())
    assert back.call == 5 and back.magic == MAGIC and back.values == b"V" * 16
    assert len(back.text.encode("utf-8")) <= TEXT_NBYTES and long_text.startswith(back.text.rstrip("\ufffd"))
    assert Fingerprint.unpack(_fp().pack()) == _fp()


def test_digest_sees_the_parts_boundaries_and_each_tensors_dtype_and_shape():
    """Mutation testing: dropping the part separator, or the dtype and shape a tensor is hashed with, left every test
    passing; then (1, 23) and (12, 3), or the same bytes as [2, 3] and [3, 2] or as int32 and float32, agreed."""
    assert digest(1, 23) != digest(12, 3) and digest("ab", 1) != digest("a", "b1")
    t = torch.arange(6, dtype=torch.int32)
    assert digest(t.reshape(2, 3)) != digest(t.reshape(3, 2)) != digest(t)
    assert digest(t) != digest(t.view(torch.float32))
    assert digest(t.reshape(2, 3)) == digest(t.reshape(2, 3).clone()) and len(digest(t)) == 16


def test_inputs_digest_sees_values_their_order_and_names():
    """Two same-shaped inputs given in swapped roles (ids and token types) digest differently, whatever the dict's
    order; and so does one tensor under another name (the fingerprint's text also names the inputs, so dropping the
    names from this digest alone changes no verdict: mutation testing found no test of it)."""
    a, b = torch.tensor([[5, 6, 7]]), torch.tensor([[0, 0, 1]])
    assert inputs_digest({"input_ids": a, "token_type_ids": b}) != inputs_digest({"input_ids": b, "token_type_ids": a})
    assert inputs_digest({"input_ids": a, "token_type_ids": b}) == inputs_digest({"token_type_ids": b, "input_ids": a})
    assert inputs_digest({"input_ids": a}) != inputs_digest({"position_ids": a})


def test_describe_inputs_names_tensors_and_options():
    """Mutation testing: an option's value (``use_cache=True``) was not checked to appear; without it ranks given
    different options were reported as given different input values, not different options."""
    text = describe_inputs({"use_cache": True, "input_ids": torch.zeros(2, 3, dtype=torch.long)})
    assert text == "input_ids: int64[2, 3], use_cache=True"


def _verdict(fps, rank=0):
    exc = disagreement(fps, rank)
    return None if exc is None else (type(exc), str(exc))


def test_disagreement_gives_each_verdict_the_same_on_every_rank():
    """Mutation testing: a frame without the fingerprint's magic (another collective interleaved), and ranks all
    rejecting their inputs for different reasons, were never given to :func:`disagreement`; removing either check,
    or calling one rank's rejection an invalid input on every rank, left every test passing."""
    ok = _fp()
    assert _verdict([ok, ok, ok]) is None
    cases = [
        ([ok, _fp(magic=0)], astra.InputMismatchError, "rank(s) [1] sent no astra input fingerprint"),
        ([ok, _fp(world=3)], astra.InputMismatchError, "world sizes differ between ranks: rank 0: 2; rank 1: 3"),
        ([ok, _fp(model=b"M" * 8 + b"W" * 8)], astra.InputMismatchError,
         "model weights differ between ranks: rank 0: " + (b"M" * 8).hex()),
        ([ok, _fp(model=b"X" * 8 + b"M" * 8)], astra.InputMismatchError,
         "models (class, configuration, size, dtype, family adapter)"),
        ([ok, _fp(codebooks=b"D" * 16)], astra.InputMismatchError, "codebooks differ between ranks"),
        ([_fp(status=INVALID, text="bad ids"), _fp(status=INVALID, text="bad ids")], astra.InvalidInputError,
         "invalid inputs on every rank: bad ids"),
        ([_fp(status=INVALID, text="bad ids"), _fp(status=INVALID, text="bad mask")], astra.InputMismatchError,
         "reasons to reject the inputs differ between ranks: rank 0: bad ids; rank 1: bad mask"),
        ([ok, _fp(status=INVALID, text="bad ids")], astra.InputMismatchError,
         "rank 1 rejected its inputs (bad ids); ranks [0] accepted theirs"),
        ([ok, _fp(call=4)], astra.InputMismatchError, "call counters differ between ranks: rank 0: 3; rank 1: 4"),
        ([ok, _fp(text="ids: int64[1, 5]")], astra.InputMismatchError, "input names, dtypes or shapes, or options"),
        ([ok, _fp(values=b"U" * 16)], astra.InputMismatchError, "input values (digests) differ between ranks"),
    ]
    for fps, kind, text in cases:
        for rank in range(len(fps)):
            got = _verdict(fps, rank)
            assert got is not None and got[0] is kind and got[1].startswith(f"astra rank {rank}/{len(fps)}: "), got
            assert text in got[1], (text, got)
            assert got[1].split(": ", 1)[1] == _verdict(fps, 0)[1].split(": ", 1)[1]     # the same on every rank
    # a weights-only difference names the checkpoint; the earlier checks win over the later ones
    assert "every rank must load the same checkpoint" in _verdict([ok, _fp(model=b"M" * 8 + b"W" * 8)])[1]
    assert "world sizes" in _verdict([ok, _fp(world=3, status=INVALID, call=9, values=b"U" * 16)])[1]


def test_texts_for_other_ranks_never_fail_to_encode():
    """A lone surrogate (os.fsdecode of a name that is not UTF-8) in a rejection reason made the fingerprint's
    encode raise on that rank alone, before the exchange; an exception whose str() raised escaped the same way."""
    from astra.errors import described, utf8_field

    name = b"caf\xe9.bin".decode("utf-8", "surrogateescape")
    fp = _fp(status=INVALID, text=f"OSError: could not read {name}")
    assert Fingerprint.unpack(fp.pack()).text == "OSError: could not read caf\\udce9.bin"

    class Unprintable(ValueError):
        def __str__(self):
            raise RuntimeError("no text")

    assert described(Unprintable()) == "Unprintable: <its str() failed>"
    assert described(OSError(name)) == "OSError: caf\\udce9.bin"
    assert utf8_field("é" * 3, 5) == "éé".encode() + b"\xc3" and utf8_field("ab", 4) == b"ab\0\0"


def test_setup_differences_name_what_differs_between_the_ranks_models_and_codebooks():
    """Ranks given a bf16 model, more layers, another dropout or codebooks of another G were all told "models (class,
    configuration, size, dtype, family adapter) differ: rank 0: 5eca243ebb15ae3a; rank 1: 70f510ab7432a7a1"."""
    from test_runtime_support import tiny_model

    from astra.agreement import describe_setup, request_differences, setup_differences

    base = tiny_model("gpt2")
    cb = astra.Codebooks.random(base, groups=1, codebook_size=8)
    ref = describe_setup(base, "adapter", cb)
    assert setup_differences([ref, ref]) is None
    bf16 = describe_setup(tiny_model("gpt2").to(torch.bfloat16), "adapter", cb)
    assert setup_differences([ref, bf16]) == ("models differ between ranks: rank 0: GPT2LMHeadModel, float32, "
                                              f"{sum(p.numel() for p in base.parameters()):,} parameters; rank 1: "
                                              "GPT2LMHeadModel, bfloat16, " + ref.split("float32, ")[1].split(" ")[0]
                                              + " parameters")
    assert setup_differences([ref, describe_setup(tiny_model("gpt2", attn_pdrop=0.3), "adapter", cb)]) == (
        "model configurations differ between ranks in: attn_pdrop")
    deeper = setup_differences([ref, describe_setup(tiny_model("gpt2", n_layer=3), "adapter", None)])
    assert deeper.startswith("models differ between ranks: rank 0: GPT2LMHeadModel, float32, ") and (
        "codebooks differ between ranks: rank 0: Codebooks(model_type='gpt2', layers=2" in deeper and
        "rank 1: none" in deeper and deeper.endswith("model configurations differ between ranks in: n_layer")), deeper
    g4 = describe_setup(base, "adapter", astra.Codebooks.random(base, groups=4, codebook_size=8))
    assert "G=1, K=8" in setup_differences([ref, g4]) and "G=4, K=8" in setup_differences([ref, g4])
    assert setup_differences([ref, describe_setup(base, "other", cb)]) == (
        "family adapters differ between ranks (register the same FamilyAdapter on every rank)")
    assert setup_differences([ref, ref[:100]]) is None          # a cut description: the digests' message stands
    # a peer's text that is JSON but not a description (untrusted-peers audit: bare RecursionError / TypeError /
    # KeyError escaped the agreement): the digests' message stands too
    for other in ("[" * 4000, "[1]", "{}", '{"model": 1, "codebooks": 2, "adapter": 3, "config": 5}'):
        assert setup_differences([ref, other]) is None, other
    odd = setup_differences([ref, '{"model": 1, "codebooks": 2, "adapter": [3], "config": {"a": [1]}}'])
    assert odd.startswith("models differ between ranks: rank 0: GPT2LMHeadModel") and "rank 1: 1;" in odd, odd
    assert "family adapters differ" in odd and "model configurations differ between ranks in: a, " in odd, odd
    assert request_differences(["generate {}; ", "generate " + "[" * 4000]).startswith("call arguments differ")
    fps = [_fp(), _fp(model=b"X" * 8 + b"M" * 8)]
    assert str(disagreement(fps, 1, [ref, bf16])).startswith("astra rank 1/2: models differ between ranks: rank 0: "
                                                             "GPT2LMHeadModel, float32")


def test_ranks_of_other_astra_versions_are_named():
    """A version that changed the fingerprint's size paired fingerprints of two sizes in one all-gather: gloo aborted
    the process. The size is fixed for every version now (FINGERPRINT_NBYTES); the version travels inside it, and the
    layout before it (0.1.0's, magic "ASPF") is named as an older astra."""
    from astra.agreement import MAGIC_V1

    assert FINGERPRINT_NBYTES == 512 and _fp(version="0.1.0").pack().numel() == 512
    assert Fingerprint.unpack(_fp(version="0.2.0").pack()).version == "0.2.0"
    ours, theirs = _fp(version="0.2.0"), _fp(version="0.3.0")
    assert _verdict([ours, ours]) is None
    assert _verdict([ours, theirs], 1) == (astra.InputMismatchError, "astra rank 1/2: the ranks run different astra "
                                           "versions: rank 0: astra 0.2.0; rank 1: astra 0.3.0; install one version "
                                           "on every node")
    old = _verdict([ours, _fp(magic=MAGIC_V1)])
    assert old[1] == ("astra rank 0/2: the ranks run different astra versions: rank 0: astra 0.2.0; rank 1: astra "
                      "0.1.0 or older; install one version on every node"), old
    assert "the ranks run different astra versions" in _verdict([ours, _fp(version="0.3.0", world=3)])[1]


def test_weights_digest_sees_every_element_of_a_parameter_over_one_block():
    """No test changed an element of a parameter larger than one 65,536-element block: the digest ignoring its full
    blocks (only the tail counted) passed. One element changed in a full block, and two full blocks trading places,
    each change it; the same weights in another module give the same digest."""
    from astra.agreement import weights_digest

    torch.manual_seed(0)
    model = torch.nn.Linear(300, 500)                     # weight: 150,000 elements, two full blocks and a tail
    ref = weights_digest(model)
    twin = torch.nn.Linear(300, 500)
    twin.load_state_dict(model.state_dict())
    assert len(ref) == 8 and weights_digest(twin) == ref
    with torch.no_grad():
        flat = twin.weight.view(-1)
        flat[1000] = torch.nextafter(flat[1000], torch.tensor(float("inf")))    # one ulp, inside block 0
        one_element = weights_digest(twin)
        flat.copy_(model.weight.view(-1))
        assert weights_digest(twin) == ref
        src, block = model.weight.view(-1), 1 << 16
        flat[:block], flat[block: 2 * block] = src[block: 2 * block], src[:block]     # blocks 0 and 1 swapped
        swapped = weights_digest(twin)
    assert len({ref, one_element, swapped}) == 3
