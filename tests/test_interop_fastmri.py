"""fastMRI interop: its VarNet and U-Net weights load into ours and give its outputs.

fastmri is a test-only extra (``pip install ".[fastmri]"``); CI installs it, so these run there.
"""

import pytest
import torch
from conftest import rel_err

from mbdl_fast.checkpoint import load_model, save_model
from mbdl_fast.interop.fastmri import load_unet, load_varnet, varnet_inputs
from mbdl_fast.metrics import nmse, psnr, ssim
from mbdl_fast.physics import MRI, MultiCoilMRI
from mbdl_fast.physics.masks import equispaced_mask, random_mask
from mbdl_fast.solvers import VarNet

fastmri = pytest.importorskip("fastmri", reason="fastmri (the [fastmri] extra) is not installed")
fastmri_models = pytest.importorskip("fastmri.models", reason="fastmri (the [fastmri] extra) is not installed")
subsample = pytest.importorskip("fastmri.data.subsample", reason="fastmri (the [fastmri] extra) is not installed")
fastmri_evaluate = pytest.importorskip("fastmri.evaluate", reason="fastmri (the [fastmri] extra) is not installed")


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter perturbed, so that a weight landing in the wrong place shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def _fastmri_batch(b, c, h, w, masks, seed, dtype=torch.float32):
    """fastMRI's VarNet inputs: masked k-space (B, C, H, W, 2) and a bool mask (B, 1, 1, W, 1)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.stack([m.reshape(-1) for m in masks]).reshape(b, 1, 1, w, 1).bool()
    kspace = torch.randn(b, c, h, w, 2, generator=gen, dtype=dtype)
    return kspace * mask, mask


@pytest.mark.parametrize(
    ("mask_center", "num_low_frequencies", "dtype", "tol"),
    [(True, None, torch.float32, 1e-5), (False, None, torch.float32, 1e-5), (True, 6, torch.float64, 1e-10)],
    ids=["acs-from-mask", "no-centre-mask", "given-band-float64"],
)
def test_fastmri_varnet_state_dict_loads_and_matches(mask_center, num_low_frequencies, dtype, tol):
    theirs = fastmri_models.VarNet(
        num_cascades=2, sens_chans=4, sens_pools=2, chans=4, pools=2, mask_center=mask_center
    )
    theirs = _randomise(theirs, seed=1).to(dtype)
    b, c, h, w = 2, 3, 24, 32
    # Two different masks in the batch: the ACS band is found per sample.
    masks = [random_mask(w, 4, 0.125, seed=3), equispaced_mask(w, 3, 0.1875, seed=4)]
    kspace, mask = _fastmri_batch(b, c, h, w, masks, seed=2, dtype=dtype)
    with torch.no_grad():
        expected = theirs(kspace, mask, num_low_frequencies)

    ours = load_varnet(theirs.state_dict(), mask_center=mask_center)
    assert ours.sens_net is not None and ours.num_cascades == 2
    y, physics = varnet_inputs(kspace, mask)
    with torch.no_grad():
        got = ours(y, physics, num_low_frequencies=num_low_frequencies)
    assert got.shape == expected.shape == (b, h, w) and got.dtype == dtype
    assert rel_err(got, expected) < tol

    # The sensitivity maps alone, too.
    with torch.no_grad():
        maps_theirs = torch.view_as_complex(theirs.sens_net(kspace, mask, num_low_frequencies).contiguous())
        maps_ours = ours.sens_net(y, physics.mask, num_low_frequencies)
    assert rel_err(maps_ours, maps_theirs) < tol


def test_fastmri_varnet_from_a_lightning_checkpoint_file(tmp_path):
    theirs = _randomise(fastmri_models.VarNet(num_cascades=1, sens_chans=2, sens_pools=1, chans=4, pools=1), seed=5)
    state = {f"varnet.{k}": v for k, v in theirs.state_dict().items()}
    state["loss.w"] = torch.ones(1, 1, 7, 7)  # a Lightning module's SSIM buffer, not the model's
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "varnet.ckpt")
    ours = load_varnet(tmp_path / "varnet.ckpt")
    kspace, mask = _fastmri_batch(1, 2, 16, 16, [random_mask(16, 2, 0.25, seed=0)], seed=6)
    with torch.no_grad():
        assert rel_err(ours(*varnet_inputs(kspace, mask)), theirs(kspace, mask)) < 1e-5


def test_loaded_e2e_varnet_saves_and_rebuilds_from_its_config(tmp_path):
    theirs = _randomise(fastmri_models.VarNet(num_cascades=2, sens_chans=2, sens_pools=1, chans=4, pools=1), seed=7)
    ours = load_varnet(theirs.state_dict(), output="combined")
    save_model(ours, tmp_path / "e2e")
    back = load_model(tmp_path / "e2e")
    kspace, mask = _fastmri_batch(1, 2, 16, 16, [random_mask(16, 2, 0.25, seed=1)], seed=8)
    y, physics = varnet_inputs(kspace, mask)
    with torch.no_grad():
        a, b = ours(y, physics), back(y, physics)
    assert a.dtype == torch.complex64 and torch.equal(a, b)


def test_fastmri_unet_state_dict_loads_and_matches():
    theirs = _randomise(fastmri_models.Unet(in_chans=1, out_chans=1, chans=8, num_pool_layers=3), seed=9)
    ours = load_unet(theirs.state_dict())
    assert ours.num_pool_layers == 3 and ours.widths[0] == 8
    x = torch.randn(2, 1, 40, 36, generator=torch.Generator().manual_seed(10))  # odd bottleneck: reflect padding
    with torch.no_grad():
        assert rel_err(ours(x), theirs(x)) < 1e-5


def test_fastmri_varnet_block_equals_ours_with_given_maps():
    """Without a sensitivity network, our cascades with the physics' maps are fastMRI's VarNetBlock chain."""
    theirs = _randomise(fastmri_models.VarNet(num_cascades=2, sens_chans=2, sens_pools=1, chans=4, pools=1), seed=11)
    state = {k: v for k, v in theirs.state_dict().items() if not k.startswith("sens_net.")}
    ours = load_varnet(state)
    assert ours.sens_net is None
    kspace, mask = _fastmri_batch(1, 3, 16, 16, [random_mask(16, 2, 0.25, seed=2)], seed=12)
    maps = torch.randn(1, 3, 16, 16, 2, generator=torch.Generator().manual_seed(13))
    k = kspace.clone()
    with torch.no_grad():
        for cascade in theirs.cascades:
            k = cascade(k, kspace, mask, maps)
        expected = fastmri.rss(fastmri.complex_abs(fastmri.ifft2c(k)), dim=1)
        y, _ = varnet_inputs(kspace, mask)
        got = ours(y, MultiCoilMRI(mask[..., 0].float(), torch.view_as_complex(maps)))
    assert rel_err(got, expected) < 1e-5


# ------------------------------------------------------------------------------------------------
# Our E2E-VarNet on its own (no fastmri needed below, but kept beside the comparisons)
# ------------------------------------------------------------------------------------------------
def test_e2e_varnet_trains_and_prunes_its_sensitivity_network():
    from mbdl_fast.prune import count_params_and_macs, find_priors, prune_channels

    model = VarNet(num_cascades=2, chans=8, pools=1, sens_net=True, sens_chans=8, sens_pools=1)
    names = [name for name, _ in find_priors(model)]
    assert names == ["cascades.0.model", "cascades.1.model", "sens_net.norm_unet"]
    counts = count_params_and_macs(model, input_shape=(1, 2, 16, 16))
    assert counts["applications_per_forward"] == 3
    pruned = prune_channels(model, 0.5)
    assert pruned.sens_net.widths[0] == 8 and pruned.cascades[0].model.widths[2] == 8  # 16 -> 8; 8 stays

    y = torch.randn(2, 4, 16, 16, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    physics = MRI(random_mask(16, 2, 0.25, seed=0))
    y = physics.mask * y
    out = model(y, physics)
    assert out.shape == (2, 16, 16) and out.dtype == torch.complex64
    out.abs().sum().backward()
    assert all(p.grad is not None for p in model.sens_net.parameters())


def test_e2e_varnet_refuses_a_mask_varying_along_h():
    model = VarNet(num_cascades=1, chans=4, pools=1, sens_net=True, sens_chans=4, sens_pools=1)
    mask = (torch.rand(16, 16, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    y = torch.randn(1, 2, 16, 16, dtype=torch.complex64)
    with pytest.raises(ValueError, match="mask: the sensitivity network"):
        model(y, MRI(mask))
    with torch.no_grad():
        assert model(y, MRI(mask), num_low_frequencies=4).shape == (1, 16, 16)


# ------------------------------------------------------------------------------------------------
# Masks, metrics, FFT layout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("any_combination", [False, True])
def test_masks_with_fastmri_lists_and_offset_equal_fastmris(any_combination):
    w, fractions, accels = 96, [0.08, 0.04], [4, 8]
    kinds = [
        (subsample.RandomMaskFunc, lambda seed, offset: random_mask(w, accels, fractions, seed, any_combination)),
        (
            subsample.EquiSpacedMaskFunc,
            lambda seed, offset: equispaced_mask(w, accels, fractions, seed, False, offset, any_combination),
        ),
        (
            subsample.EquispacedMaskFractionFunc,
            lambda seed, offset: equispaced_mask(w, accels, fractions, seed, True, offset, any_combination),
        ),
    ]
    for theirs_cls, ours in kinds:
        theirs = theirs_cls(fractions, accels, allow_any_combination=any_combination)
        counts = set()
        for seed in range(6):
            for offset in (None, 1) if theirs_cls is not subsample.RandomMaskFunc else (None,):
                expected, _ = theirs((1, w, 1), offset=offset, seed=seed)
                got = ours(seed, offset)
                assert torch.equal(got.reshape(-1), expected.reshape(-1)), (theirs_cls.__name__, seed, offset)
                counts.add(int(got.sum()))
        assert len(counts) > 1  # the lists were drawn from, not their first pair only


def test_volume_metrics_equal_fastmri_evaluate():
    """The NMSE 0.0089 (per image) vs 0.0044 (per volume) confusion: ``reduction="volume"`` is fastMRI's number."""
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(4, 40, 36, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 0.2, 0.5, 3.0]).view(
        4, 1, 1
    )
    x = target + 0.05 * torch.randn(target.shape, generator=gen, dtype=torch.float64)
    gt, pred = target.numpy(), x.numpy()

    def theirs(metric):
        return torch.tensor(float(metric(gt, pred).reshape(-1)[0]), dtype=torch.float64)

    assert rel_err(nmse(x, target, reduction="volume"), theirs(fastmri_evaluate.nmse)) < 1e-12
    assert rel_err(psnr(x, target, reduction="volume"), theirs(fastmri_evaluate.psnr)) < 1e-12
    expected_ssim = theirs(fastmri_evaluate.ssim)
    assert rel_err(ssim(x, target, window="fastmri", reduction="volume"), expected_ssim) < 1e-10
    # per image, the slices of different scale weigh alike: a different number
    assert abs(float(nmse(x, target)) - float(fastmri_evaluate.nmse(gt, pred))) > 1e-3


def test_fft2c_in_fastmri_layout_equals_fastmris():
    x = torch.randn(2, 3, 12, 10, 2, dtype=torch.float64)
    from mbdl_fast.fft import fft2c, ifft2c

    assert rel_err(fft2c(x, layout="fastmri"), fastmri.fft2c(x)) < 1e-14
    assert rel_err(ifft2c(x, layout="fastmri"), fastmri.ifft2c(x)) < 1e-14
    with pytest.raises(TypeError, match="from_fastmri"):
        fft2c(x)
