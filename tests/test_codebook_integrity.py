"""Codebook files carry sha256 checksums (every layer + the metadata): a flipped byte anywhere is refused or
provably harmless (loads as exactly the same codebooks); version-1 files (no checksums) load with a warning."""
import json
import random
import struct
import time
import warnings

import pytest
import torch
from test_runtime_support import tiny_model

import astra


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cb = astra.Codebooks.random(tiny_model("gpt2"), groups=2, codebook_size=4, seed=3)
    path = tmp_path_factory.mktemp("cb") / "cb.safetensors"
    cb.save(path)
    return cb, path.read_bytes()


def _verdict(tmp_path, raw: bytes, ref: astra.Codebooks) -> str:
    """'refused' or 'same' (loads as exactly ``ref``); anything else fails the test."""
    p = tmp_path / "flip.safetensors"
    p.write_bytes(raw)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")          # a flip must not turn the file into an unchecked one
            got = astra.Codebooks.load(p)
    except ValueError:
        return "refused"
    same = (got.model_type == ref.model_type and got.hidden_size == ref.hidden_size
            and len(got.tensors) == len(ref.tensors)
            and all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got.tensors, ref.tensors)))
    assert same, "a flipped byte loaded as different codebooks"
    return "same"


def test_1000_random_byte_flips_are_refused_or_harmless(saved, tmp_path):
    ref, raw = saved
    rng = random.Random(11)
    counts = {"refused": 0, "same": 0}
    for _ in range(1000):
        i = rng.randrange(len(raw))
        b = bytearray(raw)
        b[i] = (b[i] + rng.randrange(1, 256)) % 256      # a different byte value
        counts[_verdict(tmp_path, bytes(b), ref)] += 1
    assert counts["refused"] >= 990, counts               # only header padding flips can be harmless


def test_every_header_byte_flip_is_refused_or_harmless(saved, tmp_path):
    ref, raw = saved
    n = struct.unpack("<Q", raw[:8])[0]
    for i in range(8 + n):
        for delta in (1, 0x20, 0x80):
            b = bytearray(raw)
            b[i] = (b[i] + delta) % 256
            _verdict(tmp_path, bytes(b), ref)


def _rewrite_header(raw: bytes, edit) -> bytes:
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    edit(head)
    h = json.dumps(head).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + raw[8 + n:]


@pytest.mark.parametrize("edit, msg", [
    (lambda h: h["__metadata__"].update(checksum="0" * 64), "metadata fails its checksum"),
    (lambda h: h["__metadata__"].update(model_type="llama"), "metadata fails its checksum"),
    (lambda h: h["__metadata__"].pop("checksum"), "without its checksums"),
    (lambda h: h["__metadata__"].update(version="1"),
     r"version 1 with unexpected metadata \['checksum', 'layer_checksums'\]: corrupt"),
    (lambda h: h["layer.1"].update(dtype="I32"), "layer 1 fails its checksum"),
    (lambda h: h["layer.0"].update(shape=[2, 2, 64]), "not a valid safetensors|layer 0 fails its checksum"),
])
def test_header_edits_are_refused(saved, tmp_path, edit, msg):
    ref, raw = saved
    p = tmp_path / "edit.safetensors"
    p.write_bytes(_rewrite_header(raw, edit))
    with pytest.raises(ValueError, match=msg):
        astra.Codebooks.load(p)


@pytest.mark.parametrize("layers", ["30000000", "0", "-3"])
def test_a_layer_count_that_the_tensors_do_not_hold_is_refused_at_once(saved, tmp_path, layers):
    """A num_layers edited with its checksum recomputed (a plain sha256) names more layers than the file holds: refused
    before any per-layer work (3e7 layers took 13.5 s and 2.8 GB to refuse, 1e9 would exhaust memory)."""
    from astra.codebooks import metadata_checksum

    def edit(h):
        h["__metadata__"]["num_layers"] = layers
        h["__metadata__"]["checksum"] = metadata_checksum(h["__metadata__"])

    ref, raw = saved
    p = tmp_path / "layers.safetensors"
    p.write_bytes(_rewrite_header(raw, edit))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="expected tensors"):
        astra.Codebooks.load(p)
    assert time.perf_counter() - t0 < 5.0       # before: 13.5 s for 3e7 layers


def test_a_flipped_data_byte_names_its_layer(saved, tmp_path):
    ref, raw = saved
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    start = 8 + n + head["layer.1"]["data_offsets"][0]
    b = bytearray(raw)
    b[start + 5] ^= 0x40
    p = tmp_path / "l1.safetensors"
    p.write_bytes(bytes(b))
    with pytest.raises(ValueError, match="layer 1 fails its checksum"):
        astra.Codebooks.load(p)


def test_version_1_files_load_with_a_warning(saved, tmp_path):
    ref, raw = saved
    from safetensors.torch import save_file

    meta = {"format": "astra-codebooks", "version": "1", "model_type": "gpt2", "hidden_size": "64",
            "num_layers": "2", "groups": "2", "codebook_size": "4"}
    p = tmp_path / "v1.safetensors"
    save_file({f"layer.{i}": t for i, t in enumerate(ref.tensors)}, str(p), metadata=meta)
    with pytest.warns(UserWarning, match="version 1 has no checksums"):
        got = astra.Codebooks.load(p)
    assert all(torch.equal(a, b) for a, b in zip(got.tensors, ref.tensors))
    assert got.checksum() == ref.checksum()
