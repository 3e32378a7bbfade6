"""Build the C++ extensions (``astra_kernels._codec``: the codec; ``astra_kernels._vq_screen``: the VQ
encoder's CPU screen scan; ``astra_kernels._attention_cpu``: the CPU attention kernel) through CMake + Ninja.

Everything else about the package lives in pyproject.toml. The extensions link no libtorch: it works
on raw pointers handed over by the Python layer, so one build serves every torch version.
"""
import os
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


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_temp = Path(self.build_temp).resolve() / ext.name
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
        gen = []
        try:
            import ninja  # noqa: F401

            gen = ["-G", "Ninja"]
        except ImportError:
            pass
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_temp), *gen, *cmake_args], check=True)
        subprocess.run(["cmake", "--build", str(build_temp), "--target", ext.target, "--config", cfg], check=True)


setup(
    ext_modules=[CMakeExtension("astra_kernels._codec", target="_codec"),
                 CMakeExtension("astra_kernels._vq_screen", target="_vq_screen"),
                 CMakeExtension("astra_kernels._attention_cpu", target="_attention_cpu")],
    cmdclass={"build_ext": CMakeBuild},
)
