"""Build the C++ extensions (``astra_kernels._codec``: the codec; ``astra_kernels._vq_screen``: the VQ
encoder's CPU screen scan; ``astra_kernels._attention_cpu``: the CPU attention kernel) through CMake + Ninja.

Everything else about the package lives in pyproject.toml. The extensions link no libtorch: it works
on raw pointers handed over by the Python layer, so one build serves every torch version.
"""
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, target: str):
        super().__init__(name, sources=[])
        self.target = target


def _tool(module: str, attr: str, name: str) -> str:
    """The path of ``name`` from the Python package ``module`` (its ``attr`` directory) if that package is installed in
    the building Python, else ``name`` (found on PATH): an environment's own cmake / ninja, not whatever comes first
    on PATH."""
    try:
        path = Path(getattr(importlib.import_module(module), attr)) / name
    except (ImportError, AttributeError, TypeError):
        return name
    return str(path) if path.exists() else name


def _stale(build_temp: Path, generator: str) -> bool:
    """Whether a CMake cache in ``build_temp`` can not be configured again: it names a cmake or build program that no
    longer exists (pip deletes its isolated build environment after each build, and CMake keeps the paths of the
    first configure), or another generator."""
    cache = build_temp / "CMakeCache.txt"
    if not cache.exists():
        return False
    for line in cache.read_text(errors="replace").splitlines():
        key, _, value = line.partition("=")
        key = key.split(":")[0]
        if key in ("CMAKE_COMMAND", "CMAKE_MAKE_PROGRAM") and value and not Path(value).exists():
            return True
        if key == "CMAKE_GENERATOR" and value != generator:
            return True
    return False


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_temp = Path(self.build_temp).resolve() / ext.name
        ninja = _tool("ninja", "BIN_DIR", "ninja")
        ninja = ninja if ninja != "ninja" else shutil.which("ninja")
        gen = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
        if _stale(build_temp, "Ninja" if ninja else "Unix Makefiles"):
            shutil.rmtree(build_temp)
        build_temp.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("ASTRA_BUILD_TYPE", "Release")
        cmake_args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DASTRA_EXT_OUTPUT_DIR={out.parent}",
            f"-DASTRA_EXT_OUTPUT_NAME={out.name}",
            f"-DASTRA_EXT_TARGET={ext.target}",
        ]
        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_temp), *gen, *cmake_args], check=True)
        subprocess.run([cmake, "--build", str(build_temp), "--target", ext.target, "--config", cfg], check=True)


setup(
    ext_modules=[CMakeExtension("astra_kernels._codec", target="_codec"),
                 CMakeExtension("astra_kernels._vq_screen", target="_vq_screen"),
                 CMakeExtension("astra_kernels._attention_cpu", target="_attention_cpu")],
    cmdclass={"build_ext": CMakeBuild},
)
