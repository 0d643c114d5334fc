"""Builds flatmtl_fast._C with CMake (Ninja when available) from csrc/.

Environment:
  FLATMTL_NATIVE      auto (default: a failed native build warns, the package still installs and
                      falls back to the reference/Triton backends), 1 (a failed build is an error), 0 (skip).
  FLATMTL_CUDA        auto (default: compile the CUDA kernels whenever nvcc is found), 1 (require), 0 (skip).
  FLATMTL_CUDA_ARCHS  CMAKE_CUDA_ARCHITECTURES list, default "80;90".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _mode(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"{name} must be auto, 0 or 1, got {value!r}")
    return value


def _find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        native = _mode("FLATMTL_NATIVE")
        if native == "0":
            print("flatmtl_fast: FLATMTL_NATIVE=0, skipping the native module", file=sys.stderr)
            return
        try:
            self._cmake_build(ext)
        except (OSError, subprocess.CalledProcessError) as error:
            if native == "1":
                raise
            print(
                f"flatmtl_fast: WARNING: the native module failed to build ({error}); "
                "the package installs without it and uses the reference/Triton backends",
                file=sys.stderr,
            )

    def _cmake_build(self, ext: Extension) -> None:
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)

        cuda = _mode("FLATMTL_CUDA")
        nvcc = _find_nvcc() if cuda != "0" else None
        if cuda == "1" and nvcc is None:
            raise SystemExit("FLATMTL_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DFLATMTL_CUDA={'ON' if nvcc else 'OFF'}",
            f"-DFLATMTL_CUDA_ARCHS={os.environ.get('FLATMTL_CUDA_ARCHS', '80;90')}",
        ]
        if nvcc:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        # The ninja package's own BIN_DIR is empty inside pip's isolated build: look on PATH.
        ninja = shutil.which("ninja")
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        cmake = shutil.which("cmake") or "cmake"
        subprocess.run([cmake, str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", "--parallel", str(os.cpu_count() or 2)], cwd=build_temp, check=True)


setup(ext_modules=[CMakeExtension("flatmtl_fast._C")], cmdclass={"build_ext": CMakeBuild})
