"""PSNR, NMSE and SSIM against scikit-image and numpy, per-image consistency, argument errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mbdl_fast.metrics import nmse, psnr, ssim

SKIMAGE_SSIM = {
    "gaussian": {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False},
    "fastmri": {"win_size": 7, "use_sample_covariance": True},
}


def _random_pair(seed: int, shape=(3, 40, 52)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=gen, dtype=torch.float64)
    x = target + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
    return x, target


def _smooth_pair() -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(48, dtype=torch.float64).view(-1, 1)
    j = torch.arange(64, dtype=torch.float64).view(1, -1)
    target = torch.stack([1.5 + torch.sin(i / (5 + k)) * torch.cos(j / (7 - k)) for k in range(2)])
    x = 0.95 * target + 0.02 * torch.cos((i + j) / 3)
    return x, target


PAIRS = {"random": lambda: _random_pair(0), "smooth": _smooth_pair}


@pytest.mark.parametrize("pair", sorted(PAIRS))
@pytest.mark.parametrize("window", ["gaussian", "fastmri"])
def test_ssim_matches_skimage(pair, window):
    x, target = PAIRS[pair]()
    got = ssim(x, target, window=window, reduction="none")
    for b in range(x.shape[0]):
        gt, pred = target[b].numpy(), x[b].numpy()
        ref = structural_similarity(gt, pred, data_range=gt.max(), **SKIMAGE_SSIM[window])
        assert got[b].item() == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize("window", ["gaussian", "fastmri"])
def test_ssim_given_data_range_and_float32_input(window):
    x, target = _random_pair(1, shape=(2, 1, 33, 30))
    got = ssim(x.float(), target.float(), window=window, data_range=2.0, reduction="none")
    assert got.dtype == torch.float64 and got.shape == (2,)
    for b in range(2):
        ref = structural_similarity(
            target[b, 0].float().double().numpy(),
            x[b, 0].float().double().numpy(),
            data_range=2.0,
            **SKIMAGE_SSIM[window],
        )
        assert got[b].item() == pytest.approx(ref, abs=1e-6)


def test_ssim_of_identical_images_is_one():
    _, target = _random_pair(2)
    assert ssim(target, target).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_psnr_matches_skimage(pair):
    x, target = PAIRS[pair]()
    got = psnr(x, target, reduction="none")
    for b in range(x.shape[0]):
        gt, pred = target[b].numpy(), x[b].numpy()
        assert got[b].item() == pytest.approx(peak_signal_noise_ratio(gt, pred, data_range=gt.max()), abs=1e-6)
    fixed = psnr(x, target, data_range=3.0, reduction="none")
    for b in range(x.shape[0]):
        ref = peak_signal_noise_ratio(target[b].numpy(), x[b].numpy(), data_range=3.0)
        assert fixed[b].item() == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_nmse_matches_numpy(pair):
    x, target = PAIRS[pair]()
    got = nmse(x, target, reduction="none")
    for b in range(x.shape[0]):
        gt, pred = target[b].numpy(), x[b].numpy()
        ref = np.linalg.norm(gt - pred) ** 2 / np.linalg.norm(gt) ** 2
        assert got[b].item() == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("metric", [psnr, nmse, lambda x, t, **kw: ssim(x, t, window="fastmri", **kw)])
def test_mean_is_mean_of_per_image_and_channel_dim_is_optional(metric):
    x, target = _random_pair(3)
    per_image = metric(x, target, reduction="none")
    assert per_image.shape == (3,)
    assert metric(x, target).item() == pytest.approx(per_image.mean().item(), rel=1e-12)
    single = torch.stack([metric(x[b : b + 1], target[b : b + 1]) for b in range(3)])
    torch.testing.assert_close(single, per_image, rtol=1e-12, atol=0)
    with_channel = metric(x.unsqueeze(1), target.unsqueeze(1), reduction="none")
    torch.testing.assert_close(with_channel, per_image, rtol=0, atol=0)


def test_complex_inputs_use_the_magnitude():
    x, target = _random_pair(4)
    phase_x = torch.polar(torch.ones_like(x), torch.rand_like(x) * 6)
    phase_t = torch.polar(torch.ones_like(target), torch.rand_like(target) * 6)
    xc, tc = x.abs() * phase_x, target * phase_t
    torch.testing.assert_close(ssim(xc, tc), ssim(x.abs(), target))
    torch.testing.assert_close(psnr(xc, tc), psnr(x.abs(), target))
    torch.testing.assert_close(nmse(xc, tc), nmse(x.abs(), target))


def test_ssim_is_differentiable():
    x, target = _random_pair(5)
    x.requires_grad_(True)
    (1 - ssim(x, target)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_errors_name_the_argument():
    x, target = _random_pair(6, shape=(2, 16, 16))
    with pytest.raises(ValueError, match="^x: expected the shape of target"):
        psnr(x[:, :15], target)
    with pytest.raises(ValueError, match="^x: expected the shape of target"):
        ssim(x.unsqueeze(1), target)
    with pytest.raises(TypeError, match="^target: expected a real floating or complex"):
        nmse(x, (target * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="^x: expected a torch.Tensor"):
        psnr(x.numpy(), target)
    with pytest.raises(ValueError, match="^x: expected \\(B, H, W\\) or \\(B, 1, H, W\\)"):
        ssim(x.unsqueeze(1).expand(2, 3, 16, 16), target.unsqueeze(1).expand(2, 3, 16, 16))
    bad = x.clone()
    bad[1, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="^x: contains NaN"):
        ssim(bad, target)
    with pytest.raises(ValueError, match="^x: expected images of at least 11x11"):
        ssim(x[:, :10, :10], target[:, :10, :10])
    with pytest.raises(ValueError, match="^window: expected one of"):
        ssim(x, target, window="uniform")
    with pytest.raises(ValueError, match="^reduction: expected one of"):
        psnr(x, target, reduction="sum")
    with pytest.raises(ValueError, match="^data_range: expected positive"):
        psnr(x, target, data_range=0.0)
    with pytest.raises(ValueError, match="^data_range: expected a scalar or shape \\(2,\\)"):
        psnr(x, target, data_range=torch.ones(3))
    with pytest.raises(ValueError, match="^target: the default data_range"):
        psnr(x, -target)


def test_volume_reduction_pools_the_batch_as_one_volume():
    gen = torch.Generator().manual_seed(5)
    target = torch.rand(3, 16, 14, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 0.1, 2.0]).view(3, 1, 1)
    x = target + 0.02 * torch.randn(target.shape, generator=gen, dtype=torch.float64)
    err = (x - target).square()
    assert torch.allclose(nmse(x, target, reduction="volume"), err.sum() / target.square().sum(), rtol=1e-14)
    expected_psnr = 10 * torch.log10(target.max().square() / err.mean())
    assert torch.allclose(psnr(x, target, reduction="volume"), expected_psnr, rtol=1e-14)
    # SSIM: the mean over slices, each with the volume's maximum as data range
    per_slice = ssim(x, target, data_range=float(target.max()), reduction="none")
    assert torch.allclose(ssim(x, target, reduction="volume"), per_slice.mean(), rtol=1e-14)
    with pytest.raises(ValueError, match="data_range: expected one value for reduction='volume'"):
        psnr(x, target, data_range=torch.ones(3), reduction="volume")
