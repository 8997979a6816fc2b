"""The silent wrong results and unnamed errors of issue 13, each now a named refusal or a correct result.

(The property-based sweep over every entry point is tests/test_validation.py; these are the cases the issue
lists, one test each, so that a regression names itself.)"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import rel_err

import mbdl_fast
from mbdl_fast.data import birdcage_coil_maps
from mbdl_fast.metrics import nmse
from mbdl_fast.physics import BlockCS, MultiCoilMRI, SuperResolution, masks
from mbdl_fast.priors import EDSR, denoise
from mbdl_fast.solvers import DEQ, ConvergenceWarning, DeepUnfolding, anderson_solve
from mbdl_fast.tasks import TrainConfig


def crandn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(*shape, generator=g), torch.randn(*shape, generator=g))


def mri_problem(b=2, c=3, h=8, w=6):
    mask = masks.random_mask(w, 2, 0.25, seed=0)
    maps = birdcage_coil_maps(c, (h, w))[None].expand(b, -1, -1, -1).contiguous()
    return MultiCoilMRI(mask, maps), crandn(b, h, w, seed=1), crandn(b, c, h, w, seed=2)


@pytest.mark.parametrize("physics", [SuperResolution("box", 2), BlockCS(0.5, block=4, img_size=(8, 8))])
@pytest.mark.parametrize("ahy_shape", [(1, 1, 8, 8), (2, 2, 8, 8), (2, 8, 8), (1, 8, 8)])
def test_dc_step_refuses_an_AHy_that_would_broadcast(physics, ahy_shape):  # noqa: N802 (the argument's name)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"^AHy: expected float32 \(2, 1, 8, 8\) like x \(A\^H y\), got"):
        mbdl_fast.dc_step(physics, x, None, 0.5, AHy=torch.randn(ahy_shape))


def test_denoise_refuses_several_complex_channels():
    prior = EDSR(width=4, num_blocks=1)
    with pytest.raises(ValueError, match=r"^x: expected complex \(B, H, W\) or \(B, 1, H, W\)"):
        denoise(prior, crandn(2, 2, 8, 8))


def test_operator_keeps_its_own_copy_of_the_mask():
    physics, x, _ = mri_problem()
    column = masks.random_mask(6, 2, 0.25, seed=0)
    physics = MultiCoilMRI(column, physics.coil_maps)
    before = physics.A_adjoint_A(x)
    column.fill_(1.0)  # the caller reuses its buffer
    assert torch.equal(physics.A_adjoint_A(x), before)
    assert rel_err(physics.A_adjoint_A(x), physics.A_adjoint(physics.A(x))) < 1e-5


@pytest.mark.parametrize(
    ("gamma", "error"),
    [
        (math.nan, r"^gamma: expected a finite real >= 0 \(a step size\), got nan"),
        (math.inf, r"^gamma: expected a finite real >= 0 \(a step size\), got inf"),
        (-0.5, r"^gamma: expected a finite real >= 0 \(a step size\), got -0.5"),
        (0.5 + 0.1j, r"^gamma: expected a finite real >= 0 \(a step size\), got \(0.5\+0.1j\)"),
        (torch.tensor([0.5, math.nan]), r"^gamma: contains NaN"),
        (torch.tensor([0.5, 1j]), r"^gamma: expected a real floating scalar or \(2,\) tensor"),
    ],
)
@pytest.mark.parametrize("operator", ["mri", "sr"])
def test_dc_step_refuses_bad_steps(gamma, error, operator):
    if operator == "mri":
        physics, x, y = mri_problem()
    else:
        physics, x = SuperResolution("box", 2), torch.randn(2, 1, 8, 8)
        y = physics.A(x)
    with pytest.raises((ValueError, TypeError), match=error):
        mbdl_fast.dc_step(physics, x, y, gamma)


def test_unrolled_step_size_must_be_positive():
    with pytest.raises(ValueError, match=r"^gamma_init: expected a finite real > 0 \(a step size\), got -4"):
        DeepUnfolding(EDSR(width=4, num_blocks=1), gamma_init=-4)


def test_cg_prox_refuses_no_iterations_and_nan_tolerance():
    physics, x, y = mri_problem()
    with pytest.raises(ValueError, match=r"^cg_max_iter: expected an int >= 1 and <= 10000, got 0"):
        MultiCoilMRI(physics.mask, physics.coil_maps, cg_max_iter=0)
    with pytest.raises(ValueError, match=r"^cg_tol: expected a finite real >= 0, got nan"):
        MultiCoilMRI(physics.mask, physics.coil_maps, cg_tol=math.nan)
    physics.cg_tol = math.nan  # set after construction: refused at the call, not ignored
    with pytest.raises(ValueError, match=r"^tol: expected a finite real >= 0, got nan"):
        physics.prox_l2(x, y, 0.5, backend="torch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cg_prox_warns_when_it_stops_short(backend):
    if not mbdl_fast.backends("cpu")[backend].available:
        pytest.skip(mbdl_fast.backends("cpu")[backend].reason)
    physics, x, y = mri_problem()
    physics.cg_tol, physics.cg_max_iter = 1e-12, 2
    with pytest.warns(ConvergenceWarning, match=r"CG left 2 of 2 samples above cg_tol=1e-12 after cg_max_iter=2"):
        mbdl_fast.prox_l2(physics, x, y, 0.5, backend=backend)
    assert not bool(physics.last_prox_info["converged"].any())
    physics.cg_tol, physics.cg_max_iter = 1e-4, 200
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mbdl_fast.prox_l2(physics, x, y, 0.5, backend=backend)


def test_a_nonfinite_sample_stops_and_the_others_converge():
    target = torch.randn(3, 5, dtype=torch.float64)

    def f(z):  # a contraction towards target; sample 1 turns to NaN at its third evaluation
        out = 0.5 * z + 0.5 * target
        f.calls += 1
        if f.calls >= 3:
            out[1] = math.nan
        return out

    f.calls = 0
    with pytest.warns(ConvergenceWarning, match=r"f\(z\) returned NaN/Inf for sample\(s\) \[1\] of 3 \(first at "):
        z, info = anderson_solve(f, torch.zeros(3, 5, dtype=torch.float64), tol=1e-10, max_iter=100)
    assert info["nonfinite"].tolist() == [False, True, False]
    assert info["converged"].tolist() == [True, False, True]
    assert info["iterations"] < 100  # the loop ends when the others have converged
    assert torch.isfinite(z).all()
    assert rel_err(z[[0, 2]], target[[0, 2]]) < 1e-8


def test_deq_reports_a_sample_whose_prior_breaks():
    physics, _, y = mri_problem()

    class BreaksOnSample1(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, x):
            out = self.scale * x
            return torch.cat([out[:1], out[1:] * math.nan])

    deq = DEQ(BreaksOnSample1(), f_tol=1e-5, f_max_iter=200)
    with torch.no_grad(), pytest.warns(ConvergenceWarning, match=r"sample\(s\) \[1\] of 2"):
        x, info = deq(y, physics, return_info=True)
    assert info["converged"].tolist() == [True, False] and info["nonfinite"].tolist() == [False, True]
    assert torch.isfinite(x[0]).all()


def test_nmse_refuses_an_all_zero_target():
    with pytest.raises(ValueError, match=r"^target: all zeros in image\(s\) \[1\]"):
        nmse(torch.rand(2, 8, 8), torch.cat([torch.rand(1, 8, 8), torch.zeros(1, 8, 8)]))


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"grad_clip": -1.0}, r"^grad_clip: expected a finite real >= 0"),
        ({"task": "denoise", "model": "deq"}, r"^model: task 'denoise' trains one of \('edsr', 'dncnn', 'unet'\)"),
        ({"batch_size": 0}, r"^batch_size: expected an int >= 1, got 0"),
        ({"epochs": "10"}, r"^epochs: expected an int >= 1, got '10'"),
    ],
)
def test_train_config_refuses(values, error):
    with pytest.raises((ValueError, TypeError), match=error):
        TrainConfig.from_dict(values)
