"""The MRI data-consistency step x' = x - gamma A^H(A x - y), every backend, in one run.

Variants:
- ``fastmri_eager``: fastMRI's way, ``fft2c`` with rolls (ifftshift/fftshift) around each FFT;
- ``torch``: our reference (sign-flip shifts), y given;
- ``torch_ahy``: ours with A^H y precomputed, so a column mask needs the 1-D transform only;
- ``torch_compile``: the reference under ``torch.compile`` (inductor);
- ``triton``, ``triton_ahy``: the fused kernels (GPU only; the CPU interpreter is for tests);
- ``cuda_l1``, ``cuda_l1_ahy``: the compiled Level-1 step, cuFFT with LTO callbacks (csrc/dc_step/dc_step.cu; GPU only),
  y given (2-D transforms) or A^H y given (1-D transforms along the mask's axis);
- ``cuda_l2``, ``cuda_l2_ahy``: the compiled Level-2 step, cuFFTDx row/column passes with everything else fused
  (csrc/dc_step/dc_fftdx.cu; GPU only; both sizes here have Level-2 lengths): y given (three passes), A^H y given (one);
- ``copy``: a device-to-device copy of as many bytes as the y-given step must move at least: the bandwidth
  reference the ``floor_gbps`` of every row compares with.
The cuda rows force their level (``MBDL_FAST_CUDA_LEVEL``): the backend's auto choice would take Level 2 here.

Every row records ``floor_bytes`` (what its step must read and write at least: x, S, y or A^H y, the mask, x')
and, after the run, ``floor_gbps`` = floor_bytes / median time.
"""

import pytest
import torch
from conftest import checked_timer, device_name, record_floor_gbps, sync

import mbdl_fast
from mbdl_fast.backends import CUDA_LEVEL_ENV, backends
from mbdl_fast.physics import MultiCoilMRI
from mbdl_fast.physics.masks import random_mask

SIZES = {"8x15x320x320": (8, 15, 320, 320), "1x1x256x256": (1, 1, 256, 256)}
VARIANTS = [
    "fastmri_eager",
    "torch",
    "torch_ahy",
    "torch_compile",
    "triton",
    "triton_ahy",
    "cuda_l1",
    "cuda_l1_ahy",
    "cuda_l2",
    "cuda_l2_ahy",
    "copy",
]


def fastmri_fft2c(x):
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=(-2, -1))


def fastmri_ifft2c(x):
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.ifft2(x, norm="ortho"), dim=(-2, -1))


def fastmri_dc_step(x, maps, mask, y, gamma):
    residual = mask * fastmri_fft2c(maps * x[:, None]) - y
    return x - gamma * torch.sum(maps.conj() * fastmri_ifft2c(mask * residual), dim=1)


def make_problem(size, device):
    b, c, h, w = size
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(b, c, h, w, dtype=torch.complex64, generator=gen)
    maps = maps / maps.abs().pow(2).sum(1, keepdim=True).sqrt()
    phys = MultiCoilMRI(random_mask(w, 4, 0.08, seed=0).to(device), maps.to(device))
    x = torch.randn(b, h, w, dtype=torch.complex64, generator=gen).to(device)
    y = phys.A(torch.randn(b, h, w, dtype=torch.complex64, generator=gen).to(device))
    return phys, x, y


def floor_bytes(phys, x, with_y: bool) -> int:
    """Bytes one step must move at least: read x, the coil maps, y (or A^H y) and the mask once, write x'."""
    b, c, h, w = x.shape[0], phys.num_coils, x.shape[-2], x.shape[-1]
    maps = 0 if phys.coil_maps is None else phys.coil_maps.numel() * 8
    data = b * c * h * w * 8 if with_y else b * h * w * 8
    return 2 * b * h * w * 8 + maps + data + phys.mask.numel() * 4


@pytest.mark.parametrize("size_name", list(SIZES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_dc_step(benchmark, variant, size_name, bench_device, monkeypatch):
    size = SIZES[size_name]
    if variant.startswith("cuda_l"):
        monkeypatch.setenv(CUDA_LEVEL_ENV, variant[len("cuda_l")])
    phys, x, y = make_problem(size, bench_device)
    floor = floor_bytes(phys, x, with_y=not variant.endswith("_ahy"))
    if variant == "copy":
        if bench_device.type != "cuda":
            pytest.skip("copy: the bandwidth reference is measured on a GPU only")
        src = torch.empty(floor // 2, dtype=torch.uint8, device=bench_device)
        dst = torch.empty_like(src)

        def copy():
            dst.copy_(src)
            sync(bench_device)

        benchmark.extra_info.update(
            {"variant": variant, "size": size_name, "device": device_name(bench_device), "floor_bytes": floor}
        )
        benchmark.pedantic(copy, rounds=50, warmup_rounds=2)
        record_floor_gbps(benchmark, floor)
        return
    backend = variant.split("_")[0] if variant.startswith(("triton", "cuda")) else "torch"
    status = backends(bench_device)[backend]
    if not status.available:
        pytest.skip(f"{variant}: {status.reason}")
    gamma = 0.5
    ahy = phys.A_adjoint(y)
    if variant == "fastmri_eager":

        def step():
            return fastmri_dc_step(x, phys.coil_maps, phys.mask, y, gamma)
    elif variant == "torch_compile":
        compiled = torch.compile(lambda x, y: phys.dc_step_reference(x, y, gamma), dynamic=False)

        def step():
            return compiled(x, y)
    elif variant.endswith("_ahy"):

        def step():
            return mbdl_fast.dc_step(phys, x, None, gamma, backend=backend, AHy=ahy, check_inputs=False)
    else:

        def step():
            return mbdl_fast.dc_step(phys, x, y, gamma, backend=backend, check_inputs=False)

    err, timed = checked_timer(step, phys.dc_step_reference(x, y, gamma), bench_device, variant)

    benchmark.extra_info.update(
        {
            "variant": variant,
            "size": size_name,
            "device": device_name(bench_device),
            "rel_err": err,
            "floor_bytes": floor,
        }
    )
    if variant.startswith("cuda_l"):  # which level ran, checked: a silent fallback would mislabel the row
        from mbdl_fast.ops.dc_step import cuda_dc_level

        b, c, h, w = size
        dims = phys.transform_dims(h, w) if variant.endswith("_ahy") else (-2, -1)
        level, why = cuda_dc_level(b, c, h, w, -2 in dims, -1 in dims, bench_device)
        assert level == int(variant[len("cuda_l")]), why
        benchmark.extra_info["cuda_level"] = level
    benchmark.pedantic(timed, rounds=5 if bench_device.type == "cpu" else 50, warmup_rounds=1)
    record_floor_gbps(benchmark, floor)
