"""Fixed-point solvers (Anderson, plain iteration) and the DEQ model: convergence, per-sample
freezing, reported non-convergence, JFB and implicit gradients, options, config round trip."""

from __future__ import annotations

import json
import math
import warnings
import weakref

import pytest
import torch
from conftest import rel_err
from torch import nn

from mbdl_fast.data.simulate import birdcage_coil_maps
from mbdl_fast.physics import BlockCS, MultiCoilMRI, SuperResolution
from mbdl_fast.physics.masks import random_mask
from mbdl_fast.registry import build, config_of, register
from mbdl_fast.solvers import DEQ, ConvergenceWarning, anderson_solve, fixed_point_solve


# ------------------------------------------------------------------------------------------------
# Fixtures: a contractive CNN prior and small problems
# ------------------------------------------------------------------------------------------------
@register("TestContractiveCNN")
class ContractiveCNN(nn.Module):
    """D(x) = scale * x + conv2(relu(conv1(x))), Lipschitz <= scale + branch_norm^2.

    Each conv is scaled so that sum over its k*k taps of ||W_tap||_2 = branch_norm, a bound on its
    operator norm (each tap is a shift, of norm <= 1, times a channel mixing).
    """

    def __init__(self, channels: int = 2, hidden: int = 8, scale: float = 0.9, branch_norm: float = 0.3, seed: int = 0):
        super().__init__()
        self.args = {"channels": channels, "hidden": hidden, "scale": scale, "branch_norm": branch_norm, "seed": seed}
        self.scale = scale
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                w = torch.randn(conv.weight.shape, generator=g)
                taps = w.permute(2, 3, 0, 1).reshape(-1, w.shape[0], w.shape[1])
                conv.weight.copy_(w * branch_norm / torch.linalg.matrix_norm(taps, ord=2).sum())
                conv.bias.copy_(0.01 * torch.randn(conv.bias.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x + self.conv2(torch.relu(self.conv1(x)))

    def to_config(self) -> dict:
        return dict(self.args)

    @classmethod
    def from_config(cls, config: dict) -> ContractiveCNN:
        return cls(**config)


def mri_problem(size=16, batch=2, coils=4, dtype=torch.complex64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = random_mask(size, 4, 0.125, seed=seed)
    maps = birdcage_coil_maps(coils, (size, size)).unsqueeze(0).to(dtype)
    physics = MultiCoilMRI(mask, maps)
    x = torch.randn(batch, size, size, generator=g, dtype=dtype)
    return physics, physics.A(x)


def linear_contraction(dtype, batch=3, n=30, radius=0.95, seed=0):
    """f(z) = M z + c per sample, M = Q diag(lambda) Q^H with |lambda| <= radius; also the exact fixed point."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=dtype))
    lam = radius * torch.rand(batch, n, generator=g, dtype=torch.float64)
    if dtype.is_complex:
        lam = lam * torch.exp(1j * (torch.rand(batch, n, generator=g, dtype=torch.float64) - 0.5))
    m = q @ torch.diag_embed(lam.to(dtype)) @ q.mH
    c = torch.randn(batch, n, generator=g, dtype=dtype)

    def f(z):
        return (m @ z[..., None])[..., 0] + c

    exact = torch.linalg.solve(torch.eye(n, dtype=dtype) - m, c)
    return f, exact


def residual_of(model, z, y, physics):
    with torch.no_grad():
        tz = model.step(z, y, physics)
    return (torch.linalg.vector_norm((tz - z).reshape(z.shape[0], -1), dim=1)) / torch.linalg.vector_norm(
        tz.reshape(z.shape[0], -1), dim=1
    )


# ------------------------------------------------------------------------------------------------
# The solvers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,coefficients",
    [(torch.float64, "real"), (torch.float32, "real")]
    + [(dtype, c) for dtype in (torch.complex128, torch.complex64) for c in ("complex", "real")],
)
def test_anderson_converges_faster_than_fixed_point(dtype, coefficients):
    f, exact = linear_contraction(dtype)
    z0 = torch.zeros_like(exact)
    tol = 1e-5 if dtype in (torch.float64, torch.complex128) else 1e-4
    z, info = anderson_solve(f, z0, tol=tol, max_iter=200, coefficients=coefficients)
    _, fp_info = fixed_point_solve(f, z0, tol=tol, max_iter=1000)
    assert bool(info["converged"].all()) and bool(fp_info["converged"].all())
    assert float(info["residual"].max()) <= tol
    assert rel_err(z, exact) < 50 * tol  # error <= residual / (1 - 0.95)
    # Measured: 21-52 Anderson iterations against 95-123 plain ones.
    assert info["iterations"] < fp_info["iterations"] / 1.5, (info["iterations"], fp_info["iterations"])
    assert len(info["trace"]) == info["iterations"]
    assert info["iterations_per_sample"].max() == info["iterations"]


def test_info_residual_is_the_residual_of_the_returned_iterate():
    f, _ = linear_contraction(torch.complex64, seed=1)
    for solve in (anderson_solve, fixed_point_solve):
        z, info = solve(f, torch.zeros(3, 30, dtype=torch.complex64), max_iter=500)
        fz = f(z)
        assert torch.allclose(info["residual"], (fz - z).norm(dim=1) / fz.norm(dim=1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("solve", [anderson_solve, fixed_point_solve])
def test_per_sample_convergence_freezes_samples(solve):
    f, exact = linear_contraction(torch.float64, seed=2)
    z0 = torch.zeros_like(exact)
    z0[0] = exact[0]  # sample 0 starts at its fixed point
    z, info = solve(f, z0, tol=1e-6, max_iter=500)
    assert int(info["iterations_per_sample"][0]) <= 1
    assert torch.equal(z[0], z0[0])  # it never moved
    assert int(info["iterations_per_sample"][1:].min()) > 5
    assert all(float(t[0]) == float(info["trace"][0][0]) for t in info["trace"])  # its trace is frozen
    # A sample that converges before the others is frozen: stopping the loop right then gives the same iterate.
    counts = info["iterations_per_sample"].tolist()
    fast = min((1, 2), key=lambda i: counts[i])
    assert counts[fast] < info["iterations"], counts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        z_early, _ = solve(f, z0, tol=1e-6, max_iter=counts[fast])
    assert torch.equal(z_early[fast], z[fast])


@pytest.mark.parametrize("solve", [anderson_solve, fixed_point_solve])
def test_non_convergence_is_reported(solve):
    f, exact = linear_contraction(torch.complex64, batch=2)
    with pytest.warns(ConvergenceWarning, match=r"2 of 2 samples did not converge.*max_iter=2"):
        z, info = solve(f, torch.zeros_like(exact), tol=1e-4, max_iter=2)
    assert info["iterations"] == 2 and len(info["trace"]) == 2
    assert not bool(info["converged"].any())
    assert bool((info["residual"] > 1e-4).all())
    assert info["iterations_per_sample"].tolist() == [2, 2]


def test_diverging_samples_never_read_as_converged():
    def f(z):  # grows without bound: ||f(z)|| overflows, which must not give residual 0
        return 1e30 * z + 1

    with pytest.warns(ConvergenceWarning):
        _, info = fixed_point_solve(f, torch.ones(2, 4), max_iter=10)
    assert not bool(info["converged"].any())


@pytest.mark.parametrize(
    "kwargs,name",
    [({"m": 0}, "m"), ({"tol": 0.0}, "tol"), ({"max_iter": 0}, "max_iter"), ({"lam": -1.0}, "lam")]
    + [({"beta": 0.0}, "beta"), ({"stop_mode": "max"}, "stop_mode"), ({"coefficients": "int"}, "coefficients")],
)
def test_solver_arguments_are_checked(kwargs, name):
    f, exact = linear_contraction(torch.float32)
    with pytest.raises(ValueError, match=f"^{name}:"):
        anderson_solve(f, exact, **kwargs)


def test_solvers_run_without_autograd():
    w = torch.tensor(0.5, requires_grad=True)
    z, info = anderson_solve(lambda z: w * z + 1, torch.zeros(2, 3))
    assert not z.requires_grad and torch.allclose(z, torch.full((2, 3), 2.0), rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# DEQ: fixed point, genericity
# ------------------------------------------------------------------------------------------------
def test_deq_fixed_point_satisfies_tolerance_mri():
    physics, y = mri_problem()
    model = DEQ(ContractiveCNN(), alpha=0.5, gamma=1.0, f_tol=1e-4)
    out, info = model(y, physics, return_info=True)
    assert model.last_info is info
    assert out.shape == (2, 16, 16) and out.dtype == torch.complex64
    assert bool(info["converged"].all()), info["residual"]
    z, _ = model.fixed_point(y, physics)
    assert float(residual_of(model, z, y, physics).max()) <= 1e-4 * 1.001
    with torch.no_grad():
        assert torch.allclose(out, model.step(z, y, physics))  # the output is one more application
    _, fp_info = model.configure(f_solver="fixed_point_iter", f_max_iter=500)(y, physics, return_info=True)
    assert bool(fp_info["converged"].all())
    assert info["iterations"] < fp_info["iterations"], (info["iterations"], fp_info["iterations"])


@pytest.mark.parametrize("which", ["superres", "blockcs"])
def test_deq_is_generic_over_real_physics(which):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 1, 16, 16, generator=g)
    physics = SuperResolution("gaussian", factor=2) if which == "superres" else BlockCS(0.25, 8, img_size=(16, 16))
    y = physics.A(x)
    model = DEQ(ContractiveCNN(channels=1), f_tol=1e-4)
    out, info = model(y, physics, return_info=True)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert bool(info["converged"].all())
    z, _ = model.fixed_point(y, physics)
    assert float(residual_of(model, z, y, physics).max()) <= 1e-4 * 1.001


def test_alpha_gamma_parametrisation():
    model = DEQ(ContractiveCNN(), alpha=0.3, gamma=0.8)
    assert math.isclose(model.alpha.item(), 0.3, rel_tol=1e-6) and math.isclose(model.gamma.item(), 0.8, rel_tol=1e-6)
    with torch.no_grad():  # any step on the raw parameters keeps them in range
        model.alpha_logit += 100.0
        model.log_gamma -= 100.0
    assert 0 < model.alpha.item() <= 1 and model.gamma.item() > 0
    frozen = DEQ(ContractiveCNN(), learn_alpha=False, learn_gamma=False)
    names = {n for n, _ in frozen.named_parameters()}
    assert "alpha_logit" not in names and "log_gamma" not in names
    assert {"alpha_logit", "log_gamma"} <= set(frozen.state_dict())
    for bad in ({"alpha": 1.0}, {"alpha": 0.0}, {"gamma": 0.0}, {"gamma": -1.0}):
        with pytest.raises(ValueError, match=f"^{next(iter(bad))}:"):
            DEQ(ContractiveCNN(), **bad)


def test_deq_input_checks():
    physics, y = mri_problem()
    model = DEQ(ContractiveCNN())
    with pytest.raises(ValueError, match="^x0:"):
        model(y, physics, x0=torch.zeros(2, 8, 8, dtype=torch.complex64))
    bad = y.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="^y: contains NaN"):
        model(bad, physics)


def test_unknown_options_are_refused():
    with pytest.raises(TypeError, match="unknown option 'f_tolerance'.*known options:.*'f_tol'"):
        DEQ(ContractiveCNN(), f_tolerance=1e-3)
    with pytest.raises(ValueError, match="^f_solver:"):
        DEQ(ContractiveCNN(), f_solver="broyden")
    with pytest.raises(ValueError, match="^b_max_iter:"):
        DEQ(ContractiveCNN(), b_max_iter=0)
    with pytest.raises(TypeError, match="unknown option"):
        DEQ(ContractiveCNN()).configure(tol=1e-3)


# ------------------------------------------------------------------------------------------------
# Gradients (float64 / complex128, backend "torch")
# ------------------------------------------------------------------------------------------------
def _double_problem():
    physics, y = mri_problem(size=8, batch=2, coils=2, dtype=torch.complex128, seed=4)
    prior = ContractiveCNN(hidden=4, scale=0.8, branch_norm=0.4, seed=4).double()
    w = torch.randn(y.shape[0], 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.complex128)
    return physics, y, prior, w


def _loss(out, w):
    return torch.sum((w.conj() * out).real)


def _fd_check(model, loss_of_model, grads, eps=1e-6, rtol=1e-5):
    """Central differences of ``loss_of_model()`` along alpha_logit, log_gamma and one weight of each conv."""
    probes = [
        ("alpha_logit", model.alpha_logit, ()),
        ("log_gamma", model.log_gamma, ()),
        ("conv1", model.prior.conv1.weight, (1, 0, 1, 2)),
        ("conv2", model.prior.conv2.weight, (0, 3, 0, 1)),
    ]
    for name, param, idx in probes:
        with torch.no_grad():
            param[idx] += eps
            plus = float(loss_of_model())
            param[idx] -= 2 * eps
            minus = float(loss_of_model())
            param[idx] += eps
        fd = (plus - minus) / (2 * eps)
        got = float(grads[name][idx])
        assert abs(got - fd) <= rtol * max(abs(fd), 1e-3), (name, got, fd)


def _grads(model, loss):
    params = {
        "alpha_logit": model.alpha_logit,
        "log_gamma": model.log_gamma,
        "conv1": model.prior.conv1.weight,
        "conv2": model.prior.conv2.weight,
    }
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


def test_jfb_gradient_matches_finite_differences_of_one_step():
    physics, y, prior, w = _double_problem()
    model = DEQ(prior, backward="jfb", f_tol=1e-12, f_max_iter=300, dc_backend="torch").double()
    grads = _grads(model, _loss(model(y, physics), w))
    assert all(g.abs().sum() > 0 for g in grads.values())  # gradients reach prior, alpha and gamma
    z_star, _ = model.fixed_point(y, physics)
    _fd_check(model, lambda: _loss(model.step(z_star, y, physics), w), grads)


def test_implicit_gradient_matches_finite_differences_of_fixed_point_map():
    physics, y, prior, w = _double_problem()
    opts = {"backward": "implicit", "f_tol": 1e-13, "f_max_iter": 300, "b_tol": 1e-12, "b_max_iter": 300}
    model = DEQ(prior, dc_backend="torch", **opts).double()
    grads = _grads(model, _loss(model(y, physics), w))
    assert bool(model.last_backward_info["converged"].all())
    _fd_check(model, lambda: _loss(model(y, physics), w), grads, eps=1e-5, rtol=1e-5)
    # JFB is a different (approximate) gradient here: the check above is not vacuous.
    jfb = _grads(model, _loss(model.configure(backward="jfb")(y, physics), w))
    assert rel_err(jfb["conv1"], grads["conv1"]) > 1e-3


def test_implicit_gradient_matches_backprop_through_unrolled_iterations():
    physics, y, prior, w = _double_problem()
    model = DEQ(prior, backward="implicit", f_tol=1e-13, f_max_iter=300, b_tol=1e-12, b_max_iter=300).double()
    model.configure(dc_backend="torch")
    implicit = _grads(model, _loss(model(y, physics), w))
    z = physics.A_adjoint(y)
    for _ in range(200):
        z = model.step(z, y, physics)
    unrolled = _grads(model, _loss(z, w))
    for name in implicit:
        assert rel_err(implicit[name], unrolled[name]) < 1e-7, name


def test_implicit_output_is_freed_without_backward():
    physics, y = mri_problem()
    model = DEQ(ContractiveCNN(), backward="implicit")
    out = model(y, physics)
    assert out.requires_grad
    ref = weakref.ref(out)
    del out
    assert ref() is None  # no reference cycle through the backward hook


def test_gradient_modes_agree_without_grad():
    physics, y = mri_problem()
    model = DEQ(ContractiveCNN(), backward="implicit")
    with torch.no_grad():
        a = model(y, physics)
    b = model.configure(backward="jfb")(y, physics)
    assert torch.equal(a, b.detach())


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------
def test_config_round_trip_gives_identical_outputs():
    physics, y = mri_problem()
    model = DEQ(ContractiveCNN(seed=7), alpha=0.37, gamma=0.9, learn_gamma=False, f_tol=2e-4, anderson_m=4)
    with torch.no_grad():  # as after training: values that are not the constructor's
        model.alpha_logit += 0.123
        model.prior.conv1.weight.mul_(1.01)
    config = json.loads(json.dumps(config_of(model)))
    assert config["class"] == "DEQ" and config["args"]["prior"]["class"] == "TestContractiveCNN"
    assert config["args"]["f_tol"] == 2e-4 and config["args"]["anderson_m"] == 4
    rebuilt = build(config)
    assert torch.equal(rebuilt.alpha_logit, model.alpha_logit) and torch.equal(rebuilt.log_gamma, model.log_gamma)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.solver_options == model.solver_options
    with torch.no_grad():
        assert torch.equal(rebuilt(y, physics), model(y, physics))
