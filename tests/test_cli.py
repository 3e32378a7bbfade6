"""python -m astra: info, calibrate, demo (small random GPT-2 so it stays fast)."""
import os
import subprocess
import sys
from pathlib import Path

import astra
from astra.cli import main, stdlib_paragraphs

ROOT = Path(__file__).resolve().parents[1]


def test_stdlib_text_is_available():
    paras = stdlib_paragraphs()
    assert len(paras) > 200 and all(len(p) >= 80 for p in paras)


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "astra " in out and "supported models" in out and "GPT2LMHeadModel" in out


def test_calibrate_then_info(tmp_path, capsys):
    path = tmp_path / "cb.safetensors"
    assert main(["calibrate", "--model", "gpt2-random", "--groups", "8", "--codebook-size", "16",
                 "--samples", "8", "--max-length", "32", "--iters", "2", "--out", str(path)]) == 0
    cb = astra.Codebooks.load(path)
    assert (cb.model_type, cb.groups, cb.codebook_size, cb.num_layers) == ("gpt2", 8, 16, 4)
    assert main(["info", "--codebooks", str(path)]) == 0
    assert "bits per token: 32" in capsys.readouterr().out


def test_bad_codebook_file_is_a_clean_error(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    assert main(["info", "--codebooks", str(bad)]) == 2
    assert "error" in capsys.readouterr().err


def test_demo_small_gpt2():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python"),
                                                         os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "astra", "demo", "--model", "gpt2-random", "--world-size", "2",
                        "--groups", "8", "--codebook-size", "16", "--samples", "8", "--max-length", "48",
                        "--iters", "2", "--batch", "2"],
                       capture_output=True, text=True, timeout=240, env=env, cwd=str(ROOT))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = r.stdout
    assert "full-precision SP vs unmodified model" in out
    assert "ASTRA (distributed) vs astra.simulate" in out
    assert "x less" in out and "FAILED" not in out
