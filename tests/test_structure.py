"""The code bar, checked mechanically: ruff is clean, no function in the packages is longer than 80 lines,
and no module imports a ``_private`` name from another module (a test may import from the module it tests)."""
import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [ROOT / "astra_kernels", ROOT / "python" / "astra"]
MAX_LINES = 80

def _py_files(*dirs):
    for d in dirs:
        yield from sorted(p for p in d.rglob("*.py") if ".venv" not in p.parts)


def _rel(p: Path) -> str:
    try:
        return p.relative_to(ROOT).as_posix()
    except ValueError:  # outside the tree (the checkers' own test)
        return p.name


def long_functions(paths):
    """["path:qualname (N lines)"] of every function / method longer than MAX_LINES (def line to last line)."""
    out = []
    for p in paths:
        tree = ast.parse(p.read_text(), filename=str(p))
        stack = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                name = prefix
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}."
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = child.end_lineno - child.lineno + 1
                    if n > MAX_LINES:
                        out.append((f"{_rel(p)}:{name[:-1]}", n))
                stack.append((child, name))
    return out


def _is_module(base: Path, module: str, level: int, name: str) -> bool:
    """Whether ``from <module> import <name>`` names a submodule (an implementation module such as
    ``_codec`` or ``_dispatch`` may be imported; a private function or class may not)."""
    if level:
        d = base.parent
        for _ in range(level - 1):
            d = d.parent
        d = d.joinpath(*module.split(".")) if module else d
        return (d / f"{name}.py").exists() or (d / name).is_dir() or any(d.glob(f"{name}.*.so"))
    full = f"{module}.{name}" if module else name
    try:
        return importlib.util.find_spec(full) is not None
    except (ImportError, ValueError):
        return False


def private_imports(paths):
    """["path:module.name"] for every ``from module import _name`` (not a dunder, not a submodule)."""
    out = []
    for p in paths:
        tree = ast.parse(p.read_text(), filename=str(p))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            module = node.module or ""
            for alias in node.names:
                n = alias.name
                if not n.startswith("_") or n.startswith("__") or _is_module(p, module, node.level, n):
                    continue
                if p.name.startswith("test_") and module.split(".")[-1].lstrip("_") in p.stem:
                    continue  # a test of that very module
                out.append(f"{_rel(p)}:{'.' * node.level}{module}.{n}")
    return out


def test_no_function_longer_than_80_lines():
    found = [f"{where} ({n} lines)" for where, n in long_functions(_py_files(*PACKAGES))]
    assert not found, f"functions longer than {MAX_LINES} lines: {found}"


def test_no_private_names_imported_across_modules():
    found = private_imports(_py_files(*PACKAGES, ROOT / "tests", ROOT / "bench"))
    assert not found, f"private names imported from another module: {found}"


def test_checkers_catch_violations(tmp_path):
    """The two checkers above find what they must (a checker that cannot fail proves nothing)."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "mod.py").write_text(f"def long():\n{body}\n\n\ndef short():\n    return 1\n")
    (tmp_path / "user.py").write_text("from .mod import _hidden, short\nfrom os import _exit\nimport os\n")
    assert long_functions([tmp_path / "mod.py"]) == [("mod.py:long", MAX_LINES + 1)]
    found = private_imports([tmp_path / "user.py"])
    assert [f.split(":")[-1] for f in found] == [".mod._hidden", "os._exit"]


def test_ruff_clean():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def _extras():
    """pyproject.toml's optional dependencies: extra -> {distribution name: its requirement}."""
    import re

    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {name: {re.split(r"[<>=!~ ]", r, maxsplit=1)[0].lower(): r for r in reqs} for name, reqs in extras.items()}


def test_optional_package_facts_agree_with_pyproject():
    """The CLI names the extra that installs a missing package, and the sentence-transformers integration checks a
    minimum version: each repeats a fact of pyproject.toml, so they are tied to it here."""
    from astra.cli import OPTIONAL_PACKAGES
    from astra.integrations.sentence_transformers import MIN_SENTENCE_TRANSFORMERS

    extras = _extras()
    for module, extra in OPTIONAL_PACKAGES.items():
        assert any(d == module or d.startswith(module + "-") for d in extras[extra]), (module, extra)
    assert extras["test"]["sentence-transformers"] == f"sentence-transformers>={MIN_SENTENCE_TRANSFORMERS}"
    from astra_kernels._dispatch import MIN_TRITON

    assert extras["triton"]["triton"] == f"triton>={'.'.join(map(str, MIN_TRITON))}"


def test_torch_is_installed_from_the_cpu_index_where_none_is_present():
    """`pip install torch==2.13.0` from PyPI pulls the CUDA packages on Linux x86_64 (several GB): the Makefile and
    the README's install block take PyTorch's CPU index."""
    cpu = "--index-url https://download.pytorch.org/whl/cpu"
    make = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    installs = [line for line in make.splitlines() if 'pip install "torch==' in line]
    assert installs and all(" ".join(cpu.split()) in " ".join(line.split()) for line in installs), installs
    readme = (ROOT / "README.md").read_text()
    assert all(cpu in line for line in readme.splitlines() if line.startswith("pip install torch"))


def test_a_source_checkout_shadowing_the_installed_package_says_so(tmp_path):
    """After a non-editable install, Python run from the checkout imports its uncompiled astra_kernels first: the
    missing extension read as "cannot import name '_codec' ... (most likely due to a circular import)"."""
    import shutil

    shutil.copytree(ROOT / "astra_kernels", tmp_path / "astra_kernels",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    # as after a non-editable install: no editable finder that would find the extension in the real checkout
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
            "str(getattr(f, '__module__', ''))]; import astra_kernels")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0
    assert "has no compiled extension" in r.stderr and "hides the installed package" in r.stderr, r.stderr[-2000:]
    assert "circular import" not in r.stderr.splitlines()[-1]


def test_a_triton_older_than_the_kernels_need_is_not_used(monkeypatch):
    """torch 2.1-2.5 bring Triton 2.1-3.1, whose tl.dot has no input_precision: "auto" picked it for CUDA tensors and
    the first encode failed at JIT time. Older versions read as unavailable, and backend="triton" names the need."""
    import types

    import astra_kernels._dispatch as D

    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.1.0"))
    assert D.triton_version() == (3, 1) and not D.triton_available()
    with pytest.raises(RuntimeError, match=r"needs triton >= 3\.2, which is 3\.1"):
        D.resolve_backend("triton", __import__("torch").zeros(1))
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.2.0+git1234"))
    assert D.triton_available()
