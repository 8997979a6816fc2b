"""The MRI data-consistency step x' = x - gamma A^H(A x - y), every backend, in one run.

Variants:
- ``fastmri_eager``: fastMRI's way, ``fft2c`` with rolls (ifftshift/fftshift) around each FFT;
- ``torch``: our reference (sign-flip shifts), y given;
- ``torch_ahy``: ours with A^H y precomputed, so a column mask needs the 1-D transform only;
- ``torch_compile``: the reference under ``torch.compile`` (inductor);
- ``triton``, ``triton_ahy``: the fused kernels (GPU only; the CPU interpreter is for tests);
- ``cuda``: the compiled k-space kernel between torch FFTs (GPU only).
"""

import pytest
import torch
from conftest import device_name, sync

import mbdl_fast
from mbdl_fast.backends import backends
from mbdl_fast.physics import MultiCoilMRI
from mbdl_fast.physics.masks import random_mask

SIZES = {"8x15x320x320": (8, 15, 320, 320), "1x1x256x256": (1, 1, 256, 256)}
VARIANTS = ["fastmri_eager", "torch", "torch_ahy", "torch_compile", "triton", "triton_ahy", "cuda"]


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


@pytest.mark.parametrize("size_name", list(SIZES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_dc_step(benchmark, variant, size_name, bench_device):
    size = SIZES[size_name]
    phys, x, y = make_problem(size, bench_device)
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

    reference = phys.dc_step_reference(x, y, gamma)
    out = step()  # warm-up (compilation, plans) and a correctness check before timing
    err = float((out - reference).abs().pow(2).sum().sqrt() / reference.abs().pow(2).sum().sqrt())
    assert err < 1e-4, f"{variant}: relative error {err:.2e} against the reference"

    def timed():
        out = step()
        sync(bench_device)
        return out

    benchmark.extra_info.update(
        {"variant": variant, "size": size_name, "device": device_name(bench_device), "rel_err": err}
    )
    benchmark.pedantic(timed, rounds=5 if bench_device.type == "cpu" else 50, warmup_rounds=1)
