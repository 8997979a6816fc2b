"""pip entry point (metadata lives in pyproject.toml): the package layout and the optional CUDA extension.

The extension ``mbdl_fast._C`` is built from ``csrc/`` by CMake (CMakeLists.txt) with nvcc, ninja and pybind11.
It links no torch (it takes raw device pointers) and links the CUDA runtime statically.

Environment switches:
    MBDL_FAST_CUDA=auto|0|1   auto (default): build when nvcc is found, else install without it;
                              1: build or fail; 0: never build.
    MBDL_FAST_CUDA_ARCHS      GPU architectures, e.g. "80;90" (default "80;86;89;90"): SASS for each, plus PTX of
                              the newest. Entries already in CMake syntax ("90a-real", "native") pass through as is.
    MAX_JOBS                  parallel compile jobs (default 2).
    CUDA_HOME (or CUDA_PATH)  where to look for bin/nvcc when it is not on PATH (default /usr/local/cuda).
    MBDL_FAST_CUFFT_ROOT      a folder with include/cufftXt.h (and lib/libcufft.so.12) for the Level-1 DC step
                              (cuFFT LTO callbacks). Default: the nvidia-cufft wheel (site-packages/nvidia/cu13) of
                              the build environment or of this interpreter's environment, else the CUDA toolkit.
                              Without cuFFT headers the extension is built without Level 1 and says why
                              (mbdl_fast._C.built_with()["level1_detail"]). libcufft itself is opened at run time.
    MBDL_FAST_MATHDX_ROOT     a folder with include/cufftdx.hpp (cuFFTDx >= 1.5) for the Level-2 DC step (cuFFTDx
                              row/column passes). Default: the nvidia-mathdx wheel (site-packages/nvidia/mathdx),
                              found as nvidia-cufft is. Without it the extension is built without Level 2 and says
                              why (mbdl_fast._C.built_with()["level2_detail"]). Header-only: nothing to load later.

Without a package index: ``pip install --no-build-isolation .`` (needs setuptools, wheel and pybind11 installed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;86;89;90"
NOT_BUILT_HINT = "set MBDL_FAST_CUDA=0 to install without the extension (the torch and triton backends still work)"
# What to install for a part the build leaves out: the lines `mbdl-fast info` prints (read as a file: the package
# itself imports torch, which pip's isolated build does not have).
HINTS = runpy.run_path(str(ROOT / "mbdl_fast" / "_build_hints.py"))


def say(message: str) -> None:
    print(f"mbdl_fast setup: {message}", file=sys.stderr, flush=True)


def report_levels(build_dir: Path) -> None:
    """Say which CUDA levels CMake built and what to install for the others (pip shows it with -v;
    `mbdl-fast info` says the same after the install)."""
    header = build_dir / "generated" / "mbdl_fast_config.h"
    text = header.read_text() if header.is_file() else ""
    for part, label in (("level1", "Level-1 DC step (cuFFT LTO callbacks)"), ("level2", "Level-2 DC step (cuFFTDx)")):
        found = re.search(rf'#define MBDL_FAST_{part.upper()}_DETAIL "(.*)"', text)
        detail = found.group(1) if found else "unknown (no generated header)"
        hint = "" if detail.startswith("built") else HINTS["hint"](part, detail)
        say(f"{label}: {detail}" + (f"; to build it: {hint}" if hint else ""))


def cuda_home() -> str:
    return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"


def find_nvcc() -> str | None:
    """nvcc on PATH, else in cuda_home()/bin."""
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    candidate = Path(cuda_home()) / "bin" / "nvcc"
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def nvidia_package_locations() -> list[Path]:
    """Folders of the `nvidia` namespace package: importable here (a build without isolation), then this
    interpreter's site-packages (an isolated build runs the target environment's interpreter, whose purelib is where
    the nvidia-* wheels are)."""
    locations: list[Path] = []
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        locations += [Path(p) for p in spec.submodule_search_locations]
    for key in ("purelib", "platlib"):
        path = sysconfig.get_path(key)
        if path:
            locations.append(Path(path) / "nvidia")
    return locations


def find_cufft_root() -> str | None:
    """The folder holding include/cufftXt.h of the CUDA 13 cuFFT (the nvidia-cufft wheel's nvidia/cu13), or None.

    Looked for in MBDL_FAST_CUFFT_ROOT, then in the `nvidia` namespace package importable here (a build without
    isolation), then in this interpreter's site-packages: an isolated build runs the target environment's own
    interpreter, whose purelib is where torch's CUDA wheels put nvidia-cufft. CMake falls back to the toolkit.
    """
    explicit = os.environ.get("MBDL_FAST_CUFFT_ROOT", "").strip()
    if explicit:
        return explicit
    for location in nvidia_package_locations():
        for sub in ("cu13", "cufft"):  # cu13: CUDA 13's wheel layout; cufft: CUDA 12's (CMake refuses its version)
            if (location / sub / "include" / "cufftXt.h").is_file():
                return str(location / sub)
    return None


def find_mathdx_root() -> str | None:
    """The folder holding include/cufftdx.hpp (the nvidia-mathdx wheel's nvidia/mathdx), or None.

    MBDL_FAST_MATHDX_ROOT first, then the `nvidia` namespace package as for cuFFT (nvidia_package_locations).
    """
    explicit = os.environ.get("MBDL_FAST_MATHDX_ROOT", "").strip()
    if explicit:
        return explicit
    for location in nvidia_package_locations():
        if (location / "mathdx" / "include" / "cufftdx.hpp").is_file():
            return str(location / "mathdx")
    return None


def cmake_architectures(spec: str) -> str:
    """``"80;86;89;90"`` -> ``"80-real;86-real;89-real;90"``: SASS for each, SASS + PTX for the newest."""
    archs = [a.replace(".", "") for a in re.split(r"[;,\s]+", spec.strip()) if a]
    if not archs:
        raise SystemExit(f"MBDL_FAST_CUDA_ARCHS: expected architectures like '80;90', got {spec!r}")
    if any(not a.isdigit() for a in archs):  # already CMake syntax: "90a-real", "native", "all-major"
        return ";".join(archs)
    archs = sorted(set(archs), key=int)
    return ";".join([f"{a}-real" for a in archs[:-1]] + [archs[-1]])


def cuda_build_plan() -> tuple[str, str] | None:
    """(nvcc, cmake) when the extension should be built, None to skip; exits when MBDL_FAST_CUDA=1 cannot build."""
    mode = os.environ.get("MBDL_FAST_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"MBDL_FAST_CUDA: expected auto, 0 or 1, got {mode!r}")
    if mode == "0":
        say("MBDL_FAST_CUDA=0: not building the CUDA extension mbdl_fast._C")
        return None
    nvcc, cmake = find_nvcc(), shutil.which("cmake")
    missing = []
    if nvcc is None:
        missing.append(f"nvcc (the CUDA toolkit) was found neither on PATH nor in {cuda_home()}/bin")
    if cmake is None:
        missing.append("cmake was not found on PATH (pip install cmake, or apt-get install cmake)")
    if not missing:
        return nvcc, cmake
    if mode == "1":
        raise SystemExit(
            "MBDL_FAST_CUDA=1 asks for the CUDA extension mbdl_fast._C, but " + "; and ".join(missing) + ". "
            "Install the CUDA toolkit (or point CUDA_HOME at it), or use MBDL_FAST_CUDA=auto or 0."
        )
    say(
        "MBDL_FAST_CUDA=auto: not building the CUDA extension mbdl_fast._C: " + "; ".join(missing) + ". "
        f"The torch backend (and triton on GPUs) works without it; for the cuda backend: {HINTS['EXTENSION']}"
    )
    return None


class CMakeExtension(Extension):
    """An extension whose sources CMakeLists.txt names; setuptools only places the result."""

    def __init__(self, name: str, nvcc: str, cmake: str) -> None:
        super().__init__(name, sources=[])
        self.nvcc = nvcc
        self.cmake = cmake


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        import pybind11  # a build requirement; imported here so that a skipped build never needs it

        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        archs = cmake_architectures(os.environ.get("MBDL_FAST_CUDA_ARCHS", DEFAULT_ARCHS))
        jobs = os.environ.get("MAX_JOBS", "2")
        cufft_root = find_cufft_root()
        mathdx_root = find_mathdx_root()
        # One build folder per interpreter, compiler, architectures, cuFFT and cuFFTDx: a cache made for another
        # never misleads it.
        key = f"{sys.executable}|{ext.nvcc}|{archs}|{cufft_root}|{mathdx_root}"
        key = hashlib.sha1(key.encode()).hexdigest()[:10]
        build_dir = Path(self.build_temp).resolve() / f"cmake-{key}"
        build_dir.mkdir(parents=True, exist_ok=True)
        ninja = shutil.which("ninja")
        configure = [
            ext.cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            *(["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={ext.nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DPYBIND11_FINDPYTHON=ON",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DMBDL_FAST_OUTPUT_DIR={target.parent}",
            f"-DMBDL_FAST_CUFFT_ROOT={cufft_root or ''}",
            f"-DMBDL_FAST_MATHDX_ROOT={mathdx_root or ''}",
        ]
        say(
            f"building {ext.name} -> {target} with {ext.nvcc}, CUDA architectures {archs}, "
            f"{'ninja' if ninja else 'the default CMake generator (ninja not found)'}, {jobs} jobs, "
            f"cuFFT headers: {cufft_root or 'the CUDA toolkit (no nvidia-cufft wheel found)'}, "
            f"cuFFTDx headers: {mathdx_root or 'none (no nvidia-mathdx wheel found: no Level 2)'}"
        )
        try:
            subprocess.run(configure, check=True)
            subprocess.run([ext.cmake, "--build", str(build_dir), "-j", jobs], check=True)
        except subprocess.CalledProcessError as exc:
            raise SystemExit(
                f"building {ext.name} failed ({exc}); the output above says why; {NOT_BUILT_HINT}"
            ) from exc
        if not target.is_file():
            raise SystemExit(f"building {ext.name}: CMake finished but {target} is missing; {NOT_BUILT_HINT}")
        report_levels(build_dir)


plan = cuda_build_plan()
# kernels/ (Triton) is installed as mbdl_fast.kernels: never as a top-level package named `kernels`.
kernel_packages = ["mbdl_fast.kernels", *(f"mbdl_fast.kernels.{p}" for p in find_packages(where="kernels"))]

setup(
    packages=find_packages(include=["mbdl_fast", "mbdl_fast.*"]) + kernel_packages,
    package_dir={"mbdl_fast.kernels": "kernels"},
    package_data={
        "mbdl_fast.data": ["files/*.npz", "files/*.txt", "files/*.png"],
        "mbdl_fast.weights": ["*.safetensors", "*.json"],
    },
    include_package_data=False,  # package_data above is the whole list: no MANIFEST.in guesswork
    ext_modules=[CMakeExtension("mbdl_fast._C", *plan)] if plan else [],
    cmdclass={"build_ext": CMakeBuild},
)
