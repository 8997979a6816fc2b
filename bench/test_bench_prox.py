"""The MRI data-consistency prox argmin_x gamma/2 ||A x - y||² + 1/2 ||x - z||², every backend, in one run.

Sizes (B x C x H x W):
- ``1x1x256x256``: single coil (no coil maps), the closed form F_c^H [(F_c z + gamma M y) / (1 + gamma M²)]: torch
  (the reference: centring signs, FFT, division, inverse FFT, signs) vs the fused backends (FFT of z, one k-space
  pass, inverse FFT writing x: kernels/mri_prox.py, csrc/mri_prox/kspace_prox.cu);
- ``8x15x320x320``: multi-coil, CG on (I + gamma A^H A) with a fixed number of iterations (``cg_tol=0``,
  ``CG_ITERATIONS``), so that every backend does the same work: the fused DC step of the backend with y = 0 as the
  normal operator (1-D transforms for the column mask).

Variants: ``torch``, ``triton``, ``cuda`` (GPU only; the CPU interpreter is for tests) and ``copy``, a
device-to-device copy of as many bytes as the single-coil prox must move at least (z, y, x; the bandwidth reference
``floor_gbps`` compares with; measured at 1x1x256x256 only). Every row records ``floor_bytes`` (what the call must
read and write at least) and, after the run, ``floor_gbps`` = floor_bytes / median time.
"""

import pytest
import torch
from conftest import checked_timer, device_name, record_floor_gbps, sync

import mbdl_fast
from mbdl_fast.backends import backends
from mbdl_fast.physics import MRI, MultiCoilMRI
from mbdl_fast.physics.masks import random_mask

SIZES = {"8x15x320x320": (8, 15, 320, 320), "1x1x256x256": (1, 1, 256, 256)}
VARIANTS = ["torch", "triton", "cuda", "copy"]
CG_ITERATIONS = 10


def make_problem(size, device):
    b, c, h, w = size
    gen = torch.Generator().manual_seed(0)
    mask = random_mask(w, 4, 0.08, seed=0).to(device)
    if c == 1:
        phys = MRI(mask)
    else:
        maps = torch.randn(b, c, h, w, dtype=torch.complex64, generator=gen)
        maps = maps / maps.abs().pow(2).sum(1, keepdim=True).sqrt()
        phys = MultiCoilMRI(mask, maps.to(device), cg_tol=0.0, cg_max_iter=CG_ITERATIONS)
    z = torch.randn(b, h, w, dtype=torch.complex64, generator=gen).to(device)
    y = phys.A(torch.randn(b, h, w, dtype=torch.complex64, generator=gen).to(device))
    return phys, z, y


def floor_bytes(phys, z) -> int:
    """Bytes the call must move at least. Single coil: read z, y, the mask, write x. Multi-coil: gamma A^H y once
    (read y, S; write an image) and per CG iteration one normal operator (read v, S; write an image)."""
    b, h, w = z.shape
    image = b * h * w * 8
    mask = phys.mask.numel() * 4
    if phys.coil_maps is None:
        return 3 * image + mask
    maps = phys.coil_maps.numel() * 8
    data = b * phys.num_coils * h * w * 8
    return (data + maps + image + mask) + CG_ITERATIONS * (2 * image + maps + mask)


@pytest.mark.parametrize("size_name", list(SIZES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_prox_l2(benchmark, variant, size_name, bench_device):
    size = SIZES[size_name]
    phys, z, y = make_problem(size, bench_device)
    floor = floor_bytes(phys, z)
    info = {"variant": variant, "size": size_name, "device": device_name(bench_device), "floor_bytes": floor}
    if phys.coil_maps is not None:
        info["cg_iterations"] = CG_ITERATIONS
    if variant == "copy":
        if bench_device.type != "cuda" or phys.coil_maps is not None:
            pytest.skip("copy: the bandwidth reference is measured on a GPU, at the single-coil size")
        src = torch.empty(floor // 2, dtype=torch.uint8, device=bench_device)
        dst = torch.empty_like(src)

        def copy():
            dst.copy_(src)
            sync(bench_device)

        benchmark.extra_info.update(info)
        benchmark.pedantic(copy, rounds=50, warmup_rounds=2)
        record_floor_gbps(benchmark, floor)
        return
    status = backends(bench_device)[variant]
    if not status.available:
        pytest.skip(f"{variant}: {status.reason}")
    gamma = 0.5

    def prox():
        return mbdl_fast.prox_l2(phys, z, y, gamma, backend=variant, check_inputs=False)

    err, timed = checked_timer(prox, phys.prox_l2_reference(z, y, gamma), bench_device, variant)

    benchmark.extra_info.update({**info, "rel_err": err})
    benchmark.pedantic(timed, rounds=5 if bench_device.type == "cpu" else 50, warmup_rounds=1)
    record_floor_gbps(benchmark, floor)
