"""The installed package: the CUDA extension was built where nvcc exists, reports its status on any machine, and
its k-space DC kernel matches the reference (on a GPU); kernels/ is installed only as mbdl_fast.kernels."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import shutil
import site
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_extension

from mbdl_fast import _extension
from mbdl_fast._extension import (
    NOT_BUILT,
    cuda_extension_status,
    kspace_dc_update_cuda,
    kspace_dc_update_ref,
)


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


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"B": 0}, "B"),
        ({"C": -1}, "C"),
        ({"H": 0}, "H"),
        ({"W": 0}, "W"),
        ({"flip_h": 2}, "flip_h"),
        ({"flip_w": -1}, "flip_w"),
        ({"z_ptr": 0}, "z_ptr"),
        ({"mask_ptr": 0}, "mask_ptr"),
        ({"H": 1 << 16, "W": 1 << 16}, "H, W"),
    ],
)
def test_extension_validates_integer_arguments(kwargs, name):
    ext = load_extension()
    args = dict(z_ptr=1, mask_ptr=1, y_ptr=0, B=1, C=1, H=4, W=4, mask_stride_h=4, mask_stride_w=1)
    args.update(flip_h=0, flip_w=1, c=1.0, stream=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"^{name}: "):
        ext.kspace_dc_update(**args)


def test_extension_launch_without_driver_raises_naming_the_call():
    ext = load_extension()
    if ext.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present: a launch on a bogus pointer would poison its context")
    with pytest.raises(RuntimeError, match=r"cudaLaunchKernel\(kspace_dc_update\) failed: cudaError"):
        ext.kspace_dc_update(1, 1, 0, 1, 1, 4, 4, 4, 1, 0, 0, 1.0, 0)


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

    monkeypatch.setattr(_extension, "_load", broken)
    ok, reason = _extension.cuda_extension_status.__wrapped__()
    assert not ok and "OSError" in reason


def _ref_loop(z, mask_hw, y, flip_h, flip_w, c):
    """z <- m (m c z - s y), one element at a time."""
    out = np.empty_like(z)
    B, C, H, W = z.shape
    for b in range(B):
        for k in range(C):
            for h in range(H):
                for w in range(W):
                    m = mask_hw[h, w]
                    s = (-1) ** (h * flip_h + w * flip_w)
                    yv = 0 if y is None else y[b, k, h, w]
                    out[b, k, h, w] = m * (m * c * z[b, k, h, w] - s * yv)
    return out


def _crandn(*shape, generator):
    return torch.complex(torch.randn(*shape, generator=generator), torch.randn(*shape, generator=generator))


@pytest.mark.parametrize("shape", [(1, 1, 4, 6), (2, 3, 5, 7), (1, 2, 8, 3)])
@pytest.mark.parametrize("mask_kind", ["hw", "w", "h1", "1hw"])
@pytest.mark.parametrize(("flip_h", "flip_w"), [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("with_y", [True, False])
@pytest.mark.parametrize("c", [1.0, -1.0])
def test_kspace_dc_update_ref_matches_loop(shape, mask_kind, flip_h, flip_w, with_y, c):
    g = torch.Generator().manual_seed(0)
    B, C, H, W = shape
    z = _crandn(*shape, generator=g)
    y = _crandn(*shape, generator=g) if with_y else None
    mask_shape = {"hw": (H, W), "w": (W,), "h1": (H, 1), "1hw": (1, 1, H, W)}[mask_kind]
    mask = torch.rand(mask_shape, generator=g)
    got = kspace_dc_update_ref(z, mask, y, bool(flip_h), bool(flip_w), c)
    mask_hw = np.broadcast_to(mask.numpy().reshape(mask.shape[-2:]), (H, W))
    want = _ref_loop(z.numpy(), mask_hw, None if y is None else y.numpy(), flip_h, flip_w, c)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_kspace_dc_update_cuda_names_bad_arguments():
    z = torch.zeros(1, 2, 4, 4, dtype=torch.complex64)
    mask = torch.ones(4, 4)
    cases = [
        (
            (torch.zeros(2, 3), mask, None),
            r"z: expected contiguous complex64 \(B, C, H, W\) on cuda, got float32 \(2, 3\) on cpu",
        ),
        (([1.0], mask, None), r"z: .* got list"),
        ((z.transpose(2, 3), mask, None), r"z: expected contiguous"),
        ((z, mask.double(), None), r"mask: expected real float32 broadcastable to \(H, W\) = \(4, 4\) .* got float64"),
        ((z, torch.ones(3, 4), None), r"mask: .* got float32 \(3, 4\) on cpu"),
        ((z, torch.ones(2, 4, 4), None), r"mask: .* got float32 \(2, 4, 4\) on cpu"),
        (
            (z, mask, torch.zeros(1, 2, 4, 3, dtype=torch.complex64)),
            r"y: expected None or contiguous complex64 \(1, 2, 4, 4\)",
        ),
        ((z, mask, torch.zeros(1, 2, 4, 4)), r"y: .* got float32 \(1, 2, 4, 4\) on cpu"),
        (
            (z, mask, None),
            r"z: expected contiguous complex64 \(B, C, H, W\) on cuda, got complex64 \(1, 2, 4, 4\) on cpu",
        ),
    ]
    if torch.cuda.is_available():
        cases += [
            ((z.cuda(), mask, None), r"mask: .* on cuda:0 \(like z\), got float32 \(4, 4\) on cpu"),
            ((z.cuda(), mask.cuda(), z), r"y: .* got complex64 \(1, 2, 4, 4\) on cpu"),
        ]
    for args, message in cases:
        with pytest.raises(ValueError, match=f"^{message}"):
            kspace_dc_update_cuda(*args, flip_h=False, flip_w=True, c=1.0)


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")


@needs_gpu
@pytest.mark.parametrize("shape", [(2, 3, 37, 53), (1, 8, 320, 320), (4, 1, 1, 1)])
@pytest.mark.parametrize("mask_kind", ["hw", "w", "transposed"])
@pytest.mark.parametrize(("flip_h", "flip_w"), [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("with_y", [True, False])
def test_kspace_dc_update_cuda_matches_ref(shape, mask_kind, flip_h, flip_w, with_y):
    load_extension()
    g = torch.Generator(device="cuda").manual_seed(1234)
    B, C, H, W = shape
    z = torch.randn(shape, dtype=torch.complex64, device="cuda", generator=g)
    y = torch.randn(shape, dtype=torch.complex64, device="cuda", generator=g) if with_y else None
    if mask_kind == "transposed":
        mask = torch.rand(W, H, device="cuda", generator=g).t()
    else:
        mask = torch.rand((H, W) if mask_kind == "hw" else (W,), device="cuda", generator=g)
    c = -1.0
    want = kspace_dc_update_ref(z, mask, y, bool(flip_h), bool(flip_w), c)
    # In place: poison guard bands around z, which the kernel must leave untouched.
    pad = 4096
    buf = torch.full((z.numel() + 2 * pad,), complex(float("nan"), float("nan")), dtype=z.dtype, device="cuda")
    got = buf[pad : pad + z.numel()].view(shape)
    got.copy_(z)
    kspace_dc_update_cuda(got, mask, y, bool(flip_h), bool(flip_w), c)
    torch.cuda.synchronize()
    assert torch.isnan(torch.view_as_real(buf[:pad])).all() and torch.isnan(torch.view_as_real(buf[-pad:])).all()
    rel = (torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want)).item()
    assert rel < 1e-6, rel


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
