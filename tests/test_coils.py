"""ESPIRiT coil maps: against sigpy's EspiritCalib on the shipped real slice, against known simulated maps,
the calibration region of ACS-band k-space, and the argument checks."""

import pytest
import torch
from conftest import rel_err

from mbdl_fast.coils import calibration_shape, espirit
from mbdl_fast.data import load_brain_slices, load_real_brain, simulate_multicoil
from mbdl_fast.physics.masks import random_mask, uniform_acs_mask


@pytest.fixture(scope="module")
def real_kspace() -> torch.Tensor:
    return load_real_brain()


def _coil_inner(maps: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|<S, S_ref>| per pixel (B, H, W): 1 where the maps agree up to a per-pixel phase."""
    return (maps.conj() * ref).sum(dim=1).abs()


def test_matches_sigpy_on_real_slice_full_and_acs_band(real_kspace):
    sigpy_app = pytest.importorskip("sigpy.mri.app", reason="sigpy is the test-only reference (extra 'test')")
    # a 24-line ACS band (fastMRI centre fraction 24/128): the same 24 x 24 calibration region as the full scan
    acs = random_mask(128, 4, 24 / 128, seed=3) * real_kspace
    batch = torch.cat([real_kspace, acs])
    assert calibration_shape(batch) == (24, 24)
    ours = espirit(batch)
    assert ours.dtype == torch.complex64 and ours.shape == batch.shape
    for b in range(2):
        ref = torch.from_numpy(sigpy_app.EspiritCalib(batch[b].numpy(), show_pbar=False).run())
        support, ref_support = ours[b].abs().sum(0) > 0, ref.abs().sum(0) > 0
        assert int((support ^ ref_support).sum()) <= 0.01 * int(ref_support.sum())
        inside = support & ref_support
        inner = _coil_inner(ours[b : b + 1], ref[None])[0][inside]
        assert float(inner.min()) >= 0.95 and float(inner.mean()) >= 0.999
        # both refer the phase to coil 0, so the maps agree as they are, not only up to a phase
        assert rel_err(ours[b][:, inside], ref[:, inside]) < 1e-3


def test_recovers_known_simulated_maps_on_the_object():
    images = load_brain_slices("test", 64)[:2]
    data = simulate_multicoil(images, num_coils=8, seed=1)
    maps = espirit(data["kspace"])
    obj = images > 0.05
    assert bool((maps.abs().sum(1) > 0)[obj].all())  # the object is never cropped
    assert float(_coil_inner(maps, data["coil_maps"])[obj].min()) >= 0.99
    kept = maps.abs().sum(1) > 0
    norms = maps.abs().square().sum(1)
    assert torch.allclose(norms[kept], torch.ones(()), atol=1e-5)  # unit norm over coils where kept
    assert float(maps[:, 0].imag.abs().max()) < 1e-6 and float(maps[:, 0].real.min()) >= 0  # coil 0's phase removed


def test_acs_band_calibrates_on_the_band_only(real_kspace):
    full = espirit(real_kspace)
    for mask in (random_mask(128, 4, 0.08, seed=0), uniform_acs_mask(128, 6)):
        undersampled = mask * real_kspace
        height, lines = calibration_shape(undersampled, (128, 24))
        assert height == 128 and 8 <= lines < 24
        maps = espirit(undersampled, calib_width=(128, 24), kernel_width=4)
        both = (maps.abs().sum(1) > 0) & (full.abs().sum(1) > 0)
        assert int(both.sum()) >= 0.85 * int((full.abs().sum(1) > 0).sum())
        assert float(_coil_inner(maps, full)[both].quantile(0.01)) >= 0.95


def test_row_masks_and_batches_give_the_calibration_region_per_axis(real_kspace):
    column = random_mask(128, 4, 0.08, seed=0)
    assert calibration_shape(column * real_kspace) == (24, 11)
    assert calibration_shape(column.T * real_kspace) == (11, 24)
    assert calibration_shape(real_kspace, (32, 16)) == (32, 16)
    # a batch calibrates on what all its images sampled
    batch = torch.cat([real_kspace, uniform_acs_mask(128, 6) * real_kspace])
    assert calibration_shape(batch) == (24, 8)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"kspace": torch.zeros(1, 4, 32, 32)}, TypeError, r"kspace: expected complex \(B, C, H, W\), got float32"),
        ({"kspace": torch.zeros(4, 32, 32, dtype=torch.complex64)}, ValueError, r"kspace: expected complex"),
        ({"threshold": 1.5}, ValueError, r"threshold: expected a number in \(0, 1\)"),
        ({"crop": 1.0}, ValueError, r"crop: expected a number in \[0, 1\)"),
        ({"kernel_width": 0}, ValueError, r"kernel_width: expected an int >= 1"),
        ({"calib_width": 4}, ValueError, r"calib_width: expected an int >= 6"),
        ({"calib_width": (24, 24, 24)}, ValueError, r"calib_width: expected an int or a pair"),
        ({"kernel_width": 17}, ValueError, r"kspace: expected H and W >= 2 \* kernel_width - 1 = 33"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    args = {"kspace": torch.ones(1, 4, 32, 32, dtype=torch.complex64), **kwargs}
    with pytest.raises(error, match=match):
        espirit(**args)


def test_too_narrow_acs_band_and_nan_are_refused(real_kspace):
    narrow = torch.zeros(128)
    narrow[62:66] = 1
    with pytest.raises(ValueError, match=r"kspace: the fully sampled centre is 24 x 4 points, smaller than kernel"):
        espirit(narrow * real_kspace)
    bad = real_kspace.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="kspace: contains NaN"):
        espirit(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_maps_equal_cpu_maps(real_kspace):
    cpu = espirit(real_kspace)
    gpu = espirit(real_kspace.cuda())
    assert gpu.device.type == "cuda"
    kept = (cpu.abs().sum(1) > 0) & (gpu.cpu().abs().sum(1) > 0)
    assert float(_coil_inner(gpu.cpu(), cpu)[kept].min()) >= 0.999
