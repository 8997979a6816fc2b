"""deepinv interop: deepinv's own algorithms give the same reconstruction with our physics as with theirs.

deepinv is an optional extra (``pip install ".[deepinv]"``); CI installs it, so these run there.
"""

import pytest
import torch
from conftest import import_deepinv, rel_err

from mbdl_fast.complex import from_real_packed, to_real_packed
from mbdl_fast.interop.deepinv import from_deepinv_denoiser, to_deepinv
from mbdl_fast.physics import MRI, MultiCoilMRI, SuperResolution
from mbdl_fast.physics.masks import random_mask
from mbdl_fast.solvers import DEQ, DeepUnfolding

dinv = import_deepinv()

H = W = 32


def _denoiser(channels: int, seed: int) -> torch.nn.Module:
    """A small deepinv DnCNN with random weights (no download)."""
    torch.manual_seed(seed)
    return dinv.models.DnCNN(in_channels=channels, out_channels=channels, depth=4, nf=16, pretrained=None).eval()


def _problem(kind: str, seed: int = 0):
    """(ours, theirs, x): our operator, deepinv's equivalent, and a ground truth in deepinv's layout."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "sr":
        x = torch.rand(2, 1, H, W, generator=gen)
        theirs = dinv.physics.Downsampling(img_size=(1, H, W), filter="bicubic", factor=2, padding="circular")
        return SuperResolution("bicubic", 2), theirs, x
    mask = random_mask(W, 4, 0.125, seed=seed)  # (1, W)
    x = torch.randn(2, 2, H, W, generator=gen)
    if kind == "mri":
        return MRI(mask), dinv.physics.MRI(mask=mask.expand(H, W), img_size=(H, W)), x
    maps = torch.randn(2, 4, H, W, dtype=torch.complex64, generator=gen)
    maps = maps / maps.abs().square().sum(1, keepdim=True).sqrt()
    # Both multi-coil proxes run CG: solved tightly, they agree to float precision.
    ours = MultiCoilMRI(mask, maps, cg_tol=1e-7, cg_max_iter=100)
    theirs = dinv.physics.MultiCoilMRI(mask=mask.expand(H, W), coil_maps=maps, img_size=(H, W), tol=1e-7, max_iter=100)
    return ours, theirs, x


def _algorithm(name: str, denoiser: torch.nn.Module, fidelity: object) -> torch.nn.Module:
    prior = dinv.optim.PnP(denoiser)
    if name == "pgd":
        return dinv.optim.PGD(data_fidelity=fidelity, prior=prior, stepsize=1.0, sigma_denoiser=0.05, max_iter=6)
    return dinv.optim.HQS(data_fidelity=fidelity, prior=prior, stepsize=0.5, sigma_denoiser=0.05, max_iter=6)


@pytest.mark.parametrize("algorithm", ["pgd", "hqs"])
@pytest.mark.parametrize("kind", ["mri", "multicoil", "sr"])
def test_deepinv_algorithm_gives_the_same_reconstruction_with_our_physics(kind, algorithm):
    ours, theirs, x = _problem(kind)
    wrapped = to_deepinv(ours)
    assert isinstance(wrapped, dinv.physics.LinearPhysics)
    y = theirs.A(x)
    assert rel_err(wrapped.A(x), y) < 1e-6
    assert rel_err(wrapped.A_adjoint(y), theirs.A_adjoint(y)) < 1e-6
    denoiser = _denoiser(x.shape[1], seed=1)
    with torch.no_grad():
        expected = _algorithm(algorithm, denoiser, dinv.optim.L2())(y, theirs)
        got = _algorithm(algorithm, denoiser, dinv.optim.L2())(y, wrapped)
    assert got.shape == expected.shape == x.shape
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("kind", ["mri", "multicoil", "sr"])
def test_fused_l2_gradient_is_the_dc_step(kind):
    from mbdl_fast.interop.deepinv import FusedL2

    ours, theirs, x = _problem(kind, seed=2)
    wrapped = to_deepinv(ours)
    y = theirs.A(x)
    z = torch.randn_like(x)
    assert rel_err(FusedL2().grad(z, y, wrapped), dinv.optim.L2().grad(z, y, theirs)) < 1e-5
    with torch.no_grad():
        expected = _algorithm("pgd", _denoiser(x.shape[1], 3), dinv.optim.L2())(y, theirs)
        got = _algorithm("pgd", _denoiser(x.shape[1], 3), FusedL2())(y, wrapped)
    assert rel_err(got, expected) < 1e-5


def test_wrapped_physics_is_adjoint_differentiable_and_leaves_ours_complex():
    ours, theirs, x = _problem("multicoil", seed=4)
    wrapped = to_deepinv(ours)
    assert ours.layout == "complex"  # the wrapper works on a real-packed copy
    v = torch.randn_like(wrapped.A(x))
    assert abs(float((wrapped.A(x) * v).sum() / (x * wrapped.A_adjoint(v)).sum()) - 1) < 1e-5  # <Ax, v> = <x, A^H v>
    # gradients through prox_l2 (CG) and A agree with deepinv's own operator
    grads = []
    for physics in (wrapped, theirs):
        z = x.clone().requires_grad_()
        y = theirs.A(x)
        (physics.prox_l2(z, y, 0.7).square().sum() + physics.A(z).square().sum()).backward()
        grads.append(z.grad)
    assert rel_err(grads[0], grads[1]) < 1e-4


def test_wrapped_mri_noise_stays_on_the_sampled_lines():
    ours, _, x = _problem("multicoil", seed=5)
    wrapped = to_deepinv(ours, noise_model=dinv.physics.GaussianNoise(sigma=0.1))
    y = wrapped(x)
    unsampled = (ours.mask == 0).reshape(1, W).expand(H, W)
    assert y.shape == (2, 2, 4, H, W) and torch.all(y[..., unsampled] == 0)
    assert not torch.equal(y, wrapped.A(x))


def test_deepinv_denoiser_as_our_prior_equals_deepinvs_pgd():
    """DeepUnfolding (PGD, tied, gamma 1) with a deepinv denoiser is deepinv's PGD with the same denoiser."""
    ours, theirs, x = _problem("mri", seed=6)
    denoiser = _denoiser(2, seed=7)
    model = DeepUnfolding(from_deepinv_denoiser(denoiser, sigma=0.05), num_iters=6, gamma_init=1.0).eval()
    y_packed = theirs.A(x)
    y = from_real_packed(y_packed).unsqueeze(1)  # (B, 1, H, W) complex k-space
    with torch.no_grad():
        got = model(y, ours)
        expected = _algorithm("pgd", denoiser, dinv.optim.L2())(y_packed, theirs)
    assert rel_err(to_real_packed(got), expected) < 1e-5


def test_deepinv_denoiser_as_a_deq_prior_reaches_its_fixed_point_and_trains():
    # Fully sampled k-space and a half step: the DC step contracts by 1/2, so the DEQ converges for any
    # reasonable denoiser (a random one is not contractive on the unsampled k-space of an undersampled problem).
    physics = MRI(torch.ones(1, W))
    x = torch.randn(2, H, W, dtype=torch.complex64, generator=torch.Generator().manual_seed(8))
    y = physics.A(x)
    denoiser = _denoiser(2, seed=9)
    with torch.no_grad():
        denoiser.out_conv.weight.mul_(0.1)  # a residual denoiser x - 0.1 net(x): Lipschitz close to 1
    model = DEQ(from_deepinv_denoiser(denoiser, sigma=0.05), alpha=0.5, gamma=0.5)
    z = model(y, physics)
    assert bool(model.last_info["converged"].all())
    with torch.no_grad():
        assert rel_err(model.step(z, y, physics), z) < 1e-3
    (z - x).abs().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in denoiser.parameters())


@pytest.mark.parametrize("factor", [2, 3, 4])
@pytest.mark.parametrize("name", ["gaussian", "bicubic", "bilinear"])
def test_sr_kernels_named_as_deepinvs_filters_equal_them(name, factor):
    n = 12 * factor
    theirs = dinv.physics.Downsampling(img_size=(1, n, n), filter=name, factor=factor, padding="circular")
    x = torch.rand(2, 1, n, n, generator=torch.Generator().manual_seed(factor))
    ours = SuperResolution(name, factor)
    y = theirs.A(x)
    assert rel_err(ours.A(x), y) < 1e-6
    assert rel_err(ours.A_adjoint(y), theirs.A_adjoint(y)) < 1e-6
