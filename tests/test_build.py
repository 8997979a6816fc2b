"""The installed package: the CUDA extension was built where nvcc exists and reports its status on any machine (its
ops are checked in tests/test_op_*.py); kernels/ is installed only as mbdl_fast.kernels."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import shutil
import site
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import load_extension

from mbdl_fast import cuda_extension
from mbdl_fast.cuda_extension import NOT_BUILT, cuda_extension_status


def test_extension_importable_and_describes_itself():
    ext = load_extension()
    built = ext.built_with()
    assert built["cuda_runtime_version"] >= 11000
    assert built["cudart"] == "static"
    assert built["cuda_archs"] and built["cuda_archs"] != "unknown"
    count = ext.cuda_device_count()
    assert isinstance(count, int) and count >= 0
    assert ext.cuda_status()


def test_extension_links_no_cuda_library():
    """cudart is static and cuFFT is opened at run time: the module imports where neither is installed."""
    ext = load_extension()
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    dynamic = subprocess.run([readelf, "-d", ext.__file__], capture_output=True, text=True, check=True).stdout
    needed = [line.split()[-1] for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert needed, dynamic
    assert not [lib for lib in needed if any(k in lib for k in ("cufft", "cudart", "nvJitLink", "libcuda."))], needed


def test_cuda_extension_status_answers():
    ok, reason = cuda_extension_status()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason
    if not torch.cuda.is_available():
        assert not ok
    if importlib.util.find_spec("mbdl_fast._C") is None:
        assert reason == NOT_BUILT


def test_cuda_extension_status_never_raises(monkeypatch):
    def broken():
        raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(cuda_extension, "_load", broken)
    ok, reason = cuda_extension.cuda_extension_status.__wrapped__()
    assert not ok and "OSError" in reason


def test_no_top_level_kernels_package_installed():
    assert importlib.util.find_spec("mbdl_fast.kernels") is not None
    files = importlib.metadata.files("mbdl_fast") or []
    assert not [f for f in files if f.parts and f.parts[0] == "kernels"]
    assert "mbdl_fast" not in importlib.metadata.packages_distributions().get("kernels", [])
    # Another distribution may own a top-level `kernels`; this one never installs it.
    spec = importlib.util.find_spec("kernels")
    if spec is not None and spec.origin:
        origin = Path(spec.origin).resolve()
        site_dirs = [Path(p).resolve() for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]]
        assert not any(d in origin.parents for d in site_dirs) or importlib.metadata.packages_distributions().get(
            "kernels"
        ), f"a top-level `kernels` of no distribution but this one's build is importable from {origin}"
