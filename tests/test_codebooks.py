"""astra.Codebooks: construction checks, safetensors round trip, and clear errors on bad files/models."""
import pytest
import torch
from test_runtime_support import layer_0_exchanged, tiny_inputs, tiny_model

import astra


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2")


def test_metadata_and_bits(gpt2):
    cb = astra.Codebooks.random(gpt2, groups=4, codebook_size=1024, seed=3)
    assert (cb.num_layers, cb.groups, cb.codebook_size, cb.bits, cb.hidden_size) == (2, 4, 1024, 10, 64)
    assert cb[0].shape == (4, 1024, 16) and cb.model_type == "gpt2"
    assert astra.Codebooks.random(gpt2, groups=1, codebook_size=1000).bits == 10
    assert astra.Codebooks.random(gpt2, groups=1, codebook_size=2).bits == 1
    assert astra.Codebooks.random(gpt2, groups=1, codebook_size=1).bits == 1


def test_save_load_roundtrip(tmp_path, gpt2):
    cb = astra.Codebooks.random(gpt2, groups=2, codebook_size=16, seed=1)
    p = tmp_path / "cb.safetensors"
    cb.save(p)
    back = astra.Codebooks.load(p, gpt2)
    assert back.model_type == "gpt2" and back.groups == 2 and back.codebook_size == 16
    for a, b in zip(cb, back):
        assert torch.equal(a, b)
    # not a pickle: the file starts with the safetensors header length + JSON
    raw = p.read_bytes()
    assert raw[8:9] == b"{"


def test_save_names_a_missing_directory_or_a_directory_given_as_the_file(tmp_path, gpt2):
    """Both were safetensors' own "Error while serializing: I/O error" naming a temporary file."""
    cb = astra.Codebooks.random(gpt2, groups=2, codebook_size=16, seed=1)
    with pytest.raises(FileNotFoundError, match=f"no directory {tmp_path / 'missing'}"):
        cb.save(tmp_path / "missing" / "cb.safetensors")
    with pytest.raises(IsADirectoryError, match="is a directory; give the codebook file's path"):
        cb.save(tmp_path)
    with pytest.raises(ValueError, match="cannot save codebooks to an empty path"):    # was a SafetensorError
        cb.save("")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_what_is_not_a_regular_file_and_writes_through_links(tmp_path, gpt2):
    """Untrusted-files audit: safetensors' save wrote a file beside the path and renamed it over whatever was there,
    so saving to /dev/null as root replaced the device node, a FIFO became a file, a symbolic link was replaced
    instead of its target, and every file got mode 0600 whatever the umask."""
    import os
    import stat

    cb = astra.Codebooks.random(gpt2, groups=2, codebook_size=16, seed=1)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="fifo: it is not a regular file"):
        cb.save(fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    target, link = tmp_path / "v1.safetensors", tmp_path / "current.safetensors"
    astra.Codebooks.random(gpt2, groups=2, codebook_size=16, seed=2).save(target)
    link.symlink_to(target.name)
    old = os.umask(0o022)
    try:
        cb.save(link)
    finally:
        os.umask(old)
    assert link.is_symlink() and torch.equal(astra.Codebooks.load(target)[1], cb[1])
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.safetensors", "fifo", "v1.safetensors"]
    long = tmp_path / ("x" * 240 + ".safetensors")        # a legal name: the temporary file's must fit beside it
    cb.save(long)
    assert torch.equal(astra.Codebooks.load(long)[0], cb[0])


def test_load_rejects_wrong_model(tmp_path, gpt2):
    cb = astra.Codebooks.random(gpt2, groups=2, codebook_size=16)
    p = tmp_path / "cb.safetensors"
    cb.save(p)
    with pytest.raises(ValueError, match="model_type 'gpt2'") as err:
        astra.Codebooks.load(p, tiny_model("bert"))
    assert str(err.value).startswith(f"{p}: ")          # the file the refused codebooks came from
    import transformers as tf

    deeper = tf.GPT2Model(tf.GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=97, n_positions=64))
    with pytest.raises(ValueError, match="2 layers, model has 3"):
        astra.Codebooks.load(p, deeper)
    wider = tf.GPT2Model(tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64))
    with pytest.raises(ValueError, match="hidden_size 64, model has 32"):
        astra.Codebooks.load(p, wider)


def test_load_names_the_file_when_the_constructor_refuses(tmp_path, gpt2):
    """A file whose checksums hold but whose fields the constructor refuses (another tool wrote an empty model_type
    and re-signed the metadata) is named in the message, as every other refused file is."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    p = tmp_path / "cb.safetensors"
    astra.Codebooks.random(gpt2, groups=2, codebook_size=16).save(p)
    with safe_open(str(p), framework="pt") as f:
        meta = dict(f.metadata())
    meta["model_type"] = ""
    meta["checksum"] = astra.codebooks.metadata_checksum(meta)
    save_file(load_file(str(p)), str(p), metadata=meta)
    with pytest.raises(ValueError, match="model_type must be a non-empty string") as err:
        astra.Codebooks.load(p)
    assert str(err.value).startswith(f"{p}: ")


@pytest.mark.parametrize("bad, msg", [
    ([torch.randn(2, 16, 32), torch.randn(2, 16, 16)], "all layers must share"),
    ([torch.randn(2, 16)], "expected \\[G, K, D/G\\]"),
    ([torch.randint(0, 3, (2, 16, 32))], "floating dtype"),
    ([torch.full((2, 16, 32), float("nan"))], "NaN or inf"),
    ([torch.randn(3, 16, 32)], "hidden_size is 64"),
    ([], "at least one layer"),
])
def test_constructor_validation(bad, msg):
    with pytest.raises(ValueError, match=msg):
        astra.Codebooks(bad, model_type="gpt2", hidden_size=64)


def test_load_rejects_bad_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        astra.Codebooks.load(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not an astra codebook file"):
        astra.Codebooks.load(other)
    if not torch.cuda.is_available():             # torch's "not compiled with CUDA" AssertionError before
        with pytest.raises(ValueError, match="device='cuda': this torch has no CUDA device"):
            astra.Codebooks.load(other, device="cuda")
    inf = tmp_path / "inf.safetensors"
    save_file({"layer.0": torch.full((1, 4, 64), float("inf"))}, str(inf), metadata={
        "format": "astra-codebooks", "version": "1", "model_type": "gpt2", "hidden_size": "64",
        "num_layers": "1", "groups": "1", "codebook_size": "4"})
    with pytest.raises(ValueError, match="NaN or inf"), pytest.warns(UserWarning, match="version 1 has no checksums"):
        astra.Codebooks.load(inf)
    missing = tmp_path / "missing.safetensors"
    save_file({"layer.0": torch.zeros(1, 4, 64)}, str(missing), metadata={
        "format": "astra-codebooks", "version": "1", "model_type": "gpt2", "hidden_size": "64",
        "num_layers": "2", "groups": "1", "codebook_size": "4"})
    with pytest.raises(ValueError, match="expected tensors layer.0..layer.1"), pytest.warns(UserWarning):
        astra.Codebooks.load(missing)
    with pytest.raises(FileNotFoundError):
        astra.Codebooks.load(tmp_path / "nope.safetensors")


def test_parallel_entry_points_check_codebooks(gpt2):
    cb = astra.Codebooks.random(tiny_model("bert"), groups=1, codebook_size=4)
    with pytest.raises(ValueError, match="built for model_type 'bert'"):
        astra.simulate(gpt2, {"input_ids": torch.ones(1, 4, dtype=torch.long)}, world_size=2, codebooks=cb)


def _meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_placeholder_layers_format_versions_and_refusal(tmp_path, gpt2):
    """``astra.calibrate`` leaves the layers every rank computes (layer 0 of the built-in families) as placeholders
    and writes format version 6 naming them; files without placeholders keep versions 2 / 4 / 5; placeholder
    codebooks are refused for a family that exchanges the layer."""
    from safetensors.torch import load_file, save_file

    from astra.codebooks import metadata_checksum

    samples = [tiny_inputs("gpt2", seq=16, batch=4, seed=s) for s in (11, 12)]
    for kw, kinds in (({"groups": 1}, "layer"), ({"groups": 4}, "layer,transform,inverse"),
                      ({"groups": 4, "world_size": 2}, "layer,transform,inverse"),
                      ({"groups": 4, "predict": True}, "layer,transform,inverse,predictor,predictor_bias")):
        cb = astra.calibrate(gpt2, samples, codebook_size=16, iters=2, **kw)
        assert cb.placeholder_layers == (0,) and cb[0].abs().max() == 0 and cb[1].abs().max() > 0, kw
        assert "placeholder_layers=[0]" in repr(cb)
        cb.save(tmp_path / "cb.safetensors")
        meta = _meta(tmp_path / "cb.safetensors")
        assert (meta["version"], meta["kinds"], meta["placeholder_layers"]) == ("6", kinds, "0"), kw
        back = astra.Codebooks.load(tmp_path / "cb.safetensors", gpt2)
        assert back.placeholder_layers == (0,) and back.checksum() == cb.checksum()
        assert cb.to(torch.float64).placeholder_layers == cb.with_tensors(cb.tensors).placeholder_layers == (0,)
        with layer_0_exchanged(gpt2):
            with pytest.raises(ValueError, match=r"placeholders for layer\(s\) \[0\].*gpt2 exchanges them"):
                astra.Codebooks.load(tmp_path / "cb.safetensors", gpt2)
            with pytest.raises(ValueError, match=r"placeholders for layer\(s\) \[0\]"):
                astra.simulate(gpt2, samples[0], world_size=2, codebooks=cb)
            plain = astra.calibrate(gpt2, samples, codebook_size=16, iters=2, **kw)
        assert plain.placeholder_layers == () and plain[0].abs().max() > 0
        plain.save(tmp_path / "plain.safetensors")
        assert _meta(tmp_path / "plain.safetensors")["version"] == {"layer": "2", "layer,transform,inverse": "4"}.get(
            kinds, "5")
    for bad, msg in (([2], r"not all in 0..1"), ([0, 1], "every layer is a placeholder")):
        with pytest.raises(ValueError, match=msg):
            astra.Codebooks(cb.tensors, model_type="gpt2", hidden_size=64, placeholder_layers=bad)
    tensors, meta = load_file(str(tmp_path / "cb.safetensors")), _meta(tmp_path / "cb.safetensors")
    meta["placeholder_layers"] = "zero"
    meta["checksum"] = metadata_checksum(meta)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="names placeholder layers 'zero'; expected layer numbers"):
        astra.Codebooks.load(tmp_path / "bad.safetensors")
    meta["placeholder_layers"] = "1"                                 # edited without the checksum
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="metadata fails its checksum"):
        astra.Codebooks.load(tmp_path / "bad.safetensors")


def test_calibrated_codebooks_refuse_another_checkpoint_of_the_same_shape(tmp_path, gpt2):
    """Codebooks kept no trace of the weights they fit: another checkpoint of the same family, width and depth ran
    with them silently. Now a sample of the weights travels with them (through save / load) and is compared."""
    cb = astra.calibrate(gpt2, [tiny_inputs("gpt2", seq=16)], groups=4, codebook_size=8, iters=2)
    p = tmp_path / "cb.safetensors"
    cb.save(p)
    back = astra.Codebooks.load(p, gpt2)
    assert back.weights_sample == cb.weights_sample is not None
    other = tiny_model("gpt2", seed=7)
    for call in (lambda: astra.Codebooks.load(p, other),
                 lambda: astra.simulate(other, tiny_inputs("gpt2"), codebooks=back, world_size=2),
                 lambda: astra.parallelize(other, back)):
        with pytest.raises(ValueError, match=r"made for other weights than this model's: \d+% of the sampled weights "
                                             r"match .* set codebooks.weights_sample = None"):
            call()
    for same in (tiny_model("gpt2"), tiny_model("gpt2").to(torch.bfloat16), tiny_model("gpt2").half()):
        back.check_model(same)                          # the checkpoint itself, in any float dtype
    with torch.no_grad():                               # every weight moved by 5 %: another checkpoint
        moved = tiny_model("gpt2")
        for w in moved.parameters():
            w.mul_(1.05)
    with pytest.raises(ValueError, match="other weights"):
        back.check_model(moved)
    back.weights_sample = None                          # the documented way to use them anyway
    back.check_model(other)
    with pytest.raises(ValueError, match="weights_sample must be a sample of weights"):
        back.weights_sample = "not a sample"
    assert astra.Codebooks.random(gpt2, groups=2, codebook_size=4).weights_sample is None   # fit to nothing


def test_the_weights_sample_refuses_a_checkpoint_one_percent_away():
    """Only weights moved by 5 % were tried: a tolerance six times too loose (every value within 3 % of its magnitude
    plus its parameter's rms) accepted the model with every weight scaled by 1.01. The tolerance is 0.5 %: 1 % away
    is another checkpoint, 0.2 % away (a rounding of it) the same one."""
    from astra.weights_sample import weights_sample

    model = tiny_model("gpt2")
    cb = astra.Codebooks.random(model, groups=4, codebook_size=8, seed=0)
    cb.weights_sample = weights_sample(model)
    cb.check_model(model)
    cb.check_model(tiny_model("gpt2"))

    def scaled(factor):
        m = tiny_model("gpt2")
        with torch.no_grad():
            for w in m.parameters():
                w.mul_(factor)
        return m

    cb.check_model(scaled(1.002))
    for factor in (1.01, 0.99):
        with pytest.raises(ValueError, match=r"made for other weights than this model's: \d+% of the sampled weights "
                                             r"match \(the same checkpoint: >= 98%\)"):
            cb.check_model(scaled(factor))

def test_a_base_model_and_its_heads_share_codebooks_whatever_their_pooler():
    """HF builds the base of masked-LM / token-classification heads without a pooler: the sample, taken over the
    sorted parameters, then picked other ones and refused the same checkpoint ("27% ... match")."""
    import transformers as tf

    base = tiny_model("bert", head=False)
    mlm = tf.BertForMaskedLM(base.config).eval()
    mlm.bert.load_state_dict(base.state_dict(), strict=False)       # the same encoder, no pooler
    assert not hasattr(mlm.bert, "pooler") or mlm.bert.pooler is None
    cb = astra.calibrate(base, [tiny_inputs("bert", seq=16)], groups=4, codebook_size=8, iters=2)
    cb.check_model(mlm)
    cb2 = astra.calibrate(mlm, [tiny_inputs("bert", seq=16)], groups=4, codebook_size=8, iters=2)
    cb2.check_model(base)
    with pytest.raises(ValueError, match="other weights"):
        cb.check_model(tiny_model("bert", head=False, seed=4))


def test_the_weights_sample_reaches_the_last_element_of_large_parameters():
    """The positions came from a float32 linspace, which rounds past the end beyond 2^24 elements: calibrating GPT-2
    (its 38.6 M-entry embedding) raised IndexError."""
    from astra.weights_sample import sample_values

    class Big(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2 ** 24 + 2))   # its last position rounds off in float32
            self.small = torch.nn.Parameter(torch.arange(5.0))

    big = Big()
    with torch.no_grad():
        big.w[-1] = 7.0
    vals = sample_values(big)
    assert vals["w"].numel() == 16 and float(vals["w"][-1]) == 7.0 and float(vals["w"][0]) == 0.0
    assert vals["small"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_casts_keep_transform_pairs_and_name_an_overflow(tmp_path):
    """Codebooks.to re-ran the transforms' identity check at the new dtype's tolerance: bf16 pairs cast to float32
    (their bf16 rounding kept) were refused. And float32 codebooks beyond fp16's range on an fp16 copy of their
    model (accepted: the weights sample matches) failed at the first forward as "non-finite values"."""
    bf = tiny_model("gpt2").to(torch.bfloat16)
    cb = astra.calibrate(bf, [tiny_inputs("gpt2", seq=16, batch=4, seed=s) for s in (11, 12)], groups=4,
                         codebook_size=16, iters=4, basis="attention")
    for dt in (torch.float32, torch.float64, torch.float16):
        up = cb.to(dt)
        assert up.dtype == dt and all(t.dtype == dt for t in up.transforms + up.inverses)
        if dt != torch.float16:
            assert torch.equal(up.transforms[1].to(torch.bfloat16), cb.transforms[1])      # exact widening
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.h[1].ln_1.weight.mul_(15000.0)    # layer 1's attention input: entries < 65504, norm not
        model.transformer.h[1].ln_1.bias.zero_()
    big = astra.calibrate(model, [tiny_inputs("gpt2", seq=16, batch=4, seed=s) for s in (11, 12)], groups=4,
                          codebook_size=16, iters=4, basis="pca")
    half = model.half()
    with pytest.raises(ValueError, match=r"codebook of layer 1: entries up to .* overflow torch.float16"):
        astra.simulate(half, tiny_inputs("gpt2", seq=16, batch=2, seed=3), world_size=2, codebooks=big)
    with pytest.raises(ValueError, match=r"overflow torch.float16"):
        big.to(torch.float16)


def test_a_model_without_weights_and_loose_arguments_are_named(tmp_path):
    """A meta-device model crashed inside the weights-sample check (NotImplementedError from torch); hidden_size 64.9,
    placeholder_layers [True, False] and [1.7] were silently truncated; load(device=None / "meta") and a directory
    gave errors from deep inside."""
    import transformers as tf
    from test_runtime_support import tiny_codebooks, tiny_config

    real = tiny_model("gpt2")
    cb = tiny_codebooks(real, "gpt2", 4)
    path = tmp_path / "cb.safetensors"
    cb.save(path)
    with torch.device("meta"):
        meta = tf.GPT2LMHeadModel(tiny_config("gpt2")).eval()
    for fn in (lambda: astra.simulate(meta, tiny_inputs("gpt2"), world_size=2, codebooks=cb),
               lambda: astra.Codebooks.load(path, meta)):
        with pytest.raises(astra.UnsupportedModelError, match="meta device"):
            fn()
    t = cb.tensors
    with pytest.raises(ValueError, match="hidden_size must be an int >= 1, got 64.9"):
        astra.Codebooks(t, model_type="gpt2", hidden_size=64.9)
    for bad in ([True, False], [1.7]):
        with pytest.raises(ValueError, match="placeholder layers must be layer numbers"):
            astra.Codebooks(t, model_type="gpt2", hidden_size=64, placeholder_layers=bad)
    for device in (None, "meta", 0.5):
        with pytest.raises(ValueError, match="device must be 'cpu' or a CUDA device"):
            astra.Codebooks.load(path, device=device)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        astra.Codebooks.load(tmp_path)
    assert astra.Codebooks.load(str(path).encode()).checksum() == cb.checksum()
