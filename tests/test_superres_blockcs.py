"""SuperResolution and BlockCS: adjointness, closed-form prox, kernel and Φ properties, argument errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn.functional import avg_pool2d

from mbdl_fast.physics.base import LinearPhysics
from mbdl_fast.physics.blockcs import BlockCS, measurement_count, orthonormal_rows
from mbdl_fast.physics.superres import SuperResolution

KERNELS = ["gaussian", "bicubic", "bilinear", "block_gaussian", "block_bicubic", "box"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image(shape, complex_: bool, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    gen = _gen(seed)
    if complex_:
        return torch.complex(
            torch.randn(shape, generator=gen, dtype=dtype), torch.randn(shape, generator=gen, dtype=dtype)
        )
    return torch.randn(shape, generator=gen, dtype=dtype)


def _inner(a: torch.Tensor, b: torch.Tensor) -> complex:
    return complex(torch.sum(a.conj() * b))


def _sr_shapes(complex_: bool, factor: int, H: int = 12, W: int = 18):
    lead = (2,) if complex_ else (2, 3)
    return lead + (H, W), lead + (H // factor, W // factor)


def _objective_gradient(op, x, z, y, gamma):
    """Gradient of gamma/2 ||Ax - y||² + 1/2 ||x - z||² at x, with a per-sample gamma (B,)."""
    g = gamma.view((-1,) + (1,) * (x.dim() - 1))
    return g * op.A_adjoint_A(x) - g * op.A_adjoint(y) + x - z


# -- super-resolution --------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("factor", [2, 3])
@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
def test_sr_adjoint(kernel, factor, complex_):
    op = SuperResolution(kernel, factor)
    xs, ys = _sr_shapes(complex_, factor)
    x, y = _image(xs, complex_, 1), _image(ys, complex_, 2)
    ax = op.A(x)
    assert ax.shape == ys and ax.dtype == x.dtype
    lhs, rhs = _inner(ax, y), _inner(x, op.A_adjoint(y))
    assert abs(lhs - rhs) <= 1e-10 * abs(lhs)


def test_sr_adjoint_user_kernel_larger_than_image():
    kernel = torch.rand(15, 8, generator=_gen(3), dtype=torch.float64)
    op = SuperResolution(kernel, factor=2)
    x, y = _image((1, 1, 6, 10), False, 4), _image((1, 1, 3, 5), False, 5)
    lhs, rhs = _inner(op.A(x), y), _inner(x, op.A_adjoint(y))
    assert abs(lhs - rhs) <= 1e-10 * abs(lhs)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("factor", [2, 3])
@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
def test_sr_prox_closed_form(kernel, factor, complex_):
    op = SuperResolution(kernel, factor)
    xs, ys = _sr_shapes(complex_, factor)
    z, y = _image(xs, complex_, 6), _image(ys, complex_, 7)
    gamma = torch.tensor([0.3, 20.0], dtype=torch.float64)
    x = op.prox_l2(z, y, gamma)
    assert x.shape == z.shape and x.dtype == z.dtype
    grad = _objective_gradient(op, x, z, y, gamma)
    assert grad.norm() <= 1e-5 * z.norm()
    op.cg_tol, op.cg_max_iter = 1e-12, 1000
    x_cg = LinearPhysics.prox_l2(op, z, y, gamma)
    assert (x - x_cg).norm() <= 1e-5 * x_cg.norm()


def test_sr_prox_scalar_gamma_float32():
    op = SuperResolution("gaussian", 2)
    z, y = _image((2, 1, 16, 16), False, 8, torch.float32), _image((2, 1, 8, 8), False, 9, torch.float32)
    x = op.prox_l2(z, y, 0.5)
    assert x.dtype == torch.float32
    ref = SuperResolution("gaussian", 2).prox_l2(z.double(), y.double(), 0.5)
    assert (x.double() - ref).norm() <= 1e-5 * ref.norm()
    x_tensor_gamma = op.prox_l2(z, y, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert x_tensor_gamma.dtype == torch.float32


def test_sr_box_is_average_pooling():
    x = _image((2, 3, 12, 18), False, 10)
    for factor in (2, 3):
        torch.testing.assert_close(SuperResolution("box", factor).A(x), avg_pool2d(x, factor), rtol=0, atol=1e-12)


def _matlab_bicubic_weights(in_len: int, s: int) -> np.ndarray:
    """MATLAB imresize(·, 1/s, 'bicubic') as a matrix (out_len, in_len), circular boundary.

    Independent re-implementation of MATLAB's contributions(): output pixel j (1-based) sits at
    input coordinate u = j·s + (1 - s)/2, weights cubic((u - k)/s)/s over the taps k, normalised.
    """

    def cubic(t):
        a = np.abs(t)
        return np.where(a <= 1, 1.5 * a**3 - 2.5 * a**2 + 1, np.where(a < 2, -0.5 * a**3 + 2.5 * a**2 - 4 * a + 2, 0.0))

    out_len = in_len // s
    mat = np.zeros((out_len, in_len))
    width = 4 * s
    for j in range(1, out_len + 1):
        u = j * s + 0.5 * (1 - s)
        left = math.floor(u - width / 2)
        taps = left + np.arange(math.ceil(width) + 2)
        weights = cubic((u - taps) / s) / s
        weights /= weights.sum()
        for k, w in zip(taps, weights, strict=True):
            mat[j - 1, (k - 1) % in_len] += w
    return mat


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_sr_bicubic_equals_matlab_imresize(factor):
    H, W = 24, 36
    x = _image((1, 1, H, W), False, 11)
    rows, cols = _matlab_bicubic_weights(H, factor), _matlab_bicubic_weights(W, factor)
    ref = rows @ x[0, 0].numpy() @ cols.T
    np.testing.assert_allclose(SuperResolution("block_bicubic", factor).A(x)[0, 0].numpy(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("factor", [2, 3])
def test_sr_block_gaussian_kernel(factor):
    op = SuperResolution("block_gaussian", factor)
    k = op.kernel
    assert k.sum().item() == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(k, k.flip(0).flip(1))  # symmetric about the block centre
    # The kernel's centre of mass sits at the block centre (s - 1)/2 past the kept pixel.
    offsets = op.kernel_center[0] - torch.arange(k.shape[0], dtype=torch.float64)
    assert (k.sum(1) * offsets).sum().item() == pytest.approx((factor - 1) / 2, abs=1e-12)
    assert k.shape[0] == (6 * factor + 1 if factor % 2 else 6 * factor)


def test_sr_bicubic_is_block_bicubic_at_factor_2():
    """At s = 2 deepinv's bicubic and the MATLAB-aligned one coincide (the shipped 2x SR model's operator)."""
    x = _image((1, 1, 12, 16), False, 15)
    torch.testing.assert_close(SuperResolution("bicubic", 2).A(x), SuperResolution("block_bicubic", 2).A(x))
    assert not torch.allclose(SuperResolution("bicubic", 4).A(x), SuperResolution("block_bicubic", 4).A(x))


def test_sr_dc_step_reference_by_hand():
    op = SuperResolution("bicubic", 2)
    x, y = _image((2, 12, 18), True, 12), _image((2, 6, 9), True, 13)
    gamma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    by_hand = x - gamma.view(-1, 1, 1) * op.A_adjoint(op.A(x) - y)
    torch.testing.assert_close(op.dc_step_reference(x, y, gamma), by_hand, rtol=0, atol=0)


def test_sr_update_and_cache():
    op = SuperResolution("gaussian", 2)
    x = _image((1, 1, 12, 12), False, 14)
    op.A(x)
    assert len(op._spectra) == 1
    op.update(kernel="box")
    assert len(op._spectra) == 0
    torch.testing.assert_close(op.A(x), avg_pool2d(x, 2))
    op.update(factor=3)
    torch.testing.assert_close(op.A(x), avg_pool2d(x, 3))
    with pytest.raises(TypeError, match="unknown parameter 'sigma'"):
        op.update(sigma=2.0)


def test_sr_errors_name_the_argument():
    op = SuperResolution("gaussian", 3)
    with pytest.raises(ValueError, match=r"^x: expected H and W divisible by factor=3, got \(H, W\) = \(12, 16\)"):
        op.A(torch.zeros(1, 1, 12, 16))
    with pytest.raises(TypeError, match="^x: expected float32/float64"):
        op.A(torch.zeros(1, 1, 12, 12, dtype=torch.int64))
    with pytest.raises(TypeError, match="^y: expected float32/float64"):
        op.A_adjoint(torch.zeros(1, 1, 4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="^x: expected real"):
        op.A(torch.zeros(12, 12))
    with pytest.raises(ValueError, match=r"^y: expected real \(1, 1, 4, 4\)"):
        op.prox_l2(torch.zeros(1, 1, 12, 12), torch.zeros(1, 1, 4, 5), 1.0)
    with pytest.raises(ValueError, match=r"^y: expected real \(1, 1, 4, 4\)"):
        op.prox_l2(torch.zeros(1, 1, 12, 12), torch.zeros(1, 1, 4, 4, dtype=torch.complex64), 1.0)
    with pytest.raises(ValueError, match="^gamma: expected a scalar or shape"):
        op.prox_l2(torch.zeros(2, 1, 12, 12), torch.zeros(2, 1, 4, 4), torch.ones(3))
    with pytest.raises(ValueError, match="^kernel: expected one of"):
        SuperResolution("lanczos", 2)
    with pytest.raises(TypeError, match="^kernel: expected real floating"):
        SuperResolution(torch.ones(3, 3, 3), 2)
    with pytest.raises(ValueError, match="^kernel: contains NaN"):
        SuperResolution(torch.full((3, 3), float("nan")), 2)
    with pytest.raises(ValueError, match="^factor: expected an int >= 1"):
        SuperResolution("box", 0)
    with pytest.raises(ValueError, match="^img_size: expected positive"):
        SuperResolution("box", 2, img_size=(12, 13))
    with pytest.raises(ValueError, match=r"^x: expected \(H, W\) = \(12, 12\) \(img_size\)"):
        SuperResolution("box", 2, img_size=(12, 12)).A(torch.zeros(1, 1, 12, 14))


# -- block compressive sensing -------------------------------------------------------------------------
def test_measurement_counts():
    table = {0.01: 10, 0.04: 43, 0.10: 109, 0.25: 272, 0.30: 327, 0.40: 436, 0.50: 545}
    for ratio, m in table.items():
        assert measurement_count(ratio) == m
        assert BlockCS(ratio).m == m
    assert measurement_count(0.2) == round(0.2 * 1089)
    assert measurement_count(0.5, block=32) == 512


def test_phi_orthonormal_and_seeded():
    op = BlockCS(0.25)
    phi = op.phi(torch.float32)
    assert phi.shape == (272, 1089) and phi.dtype == torch.float32
    assert (phi @ phi.T - torch.eye(272)).abs().max() <= 1e-6
    torch.testing.assert_close(BlockCS(0.25, seed=0).phi(torch.float32), phi, rtol=0, atol=0)
    assert not torch.allclose(BlockCS(0.25, seed=1).phi(torch.float32), phi)
    torch.testing.assert_close(orthonormal_rows(272, 1089, seed=0), op.phi(torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("ratio", [0.1, 0.5])
def test_blockcs_adjoint_and_layout(ratio):
    op = BlockCS(ratio, img_size=(66, 99))
    x = _image((2, 1, 66, 99), False, 20)
    y = _image((2, 6, op.m), False, 21)
    ax = op.A(x)
    assert ax.shape == (2, 6, op.m)
    lhs, rhs = _inner(ax, y), _inner(x, op.A_adjoint(y))
    assert abs(lhs - rhs) <= 1e-10 * abs(lhs)
    # Block (i, j) is measurement row i * (W / 33) + j; pixels inside a block are row-major.
    block = x[1, 0, 33:66, 66:99].reshape(-1)
    torch.testing.assert_close(ax[1, 1 * 3 + 2], op.phi(torch.float64) @ block)
    torch.testing.assert_close(op.initial(y), op.A_adjoint(y), rtol=0, atol=0)


def test_blockcs_prox_closed_form():
    op = BlockCS(0.25, img_size=(66, 99))
    z, y = _image((2, 1, 66, 99), False, 22), _image((2, 6, op.m), False, 23)
    gamma = torch.tensor([0.4, 7.0], dtype=torch.float64)
    x = op.prox_l2(z, y, gamma)
    grad = _objective_gradient(op, x, z, y, gamma)
    assert grad.norm() <= 1e-5 * z.norm()
    op.cg_tol = 1e-12
    x_cg = LinearPhysics.prox_l2(op, z, y, gamma)
    assert (x - x_cg).norm() <= 1e-5 * x_cg.norm()


def test_blockcs_dc_step_reference_by_hand_without_img_size():
    op = BlockCS(0.1)
    x, y = _image((2, 1, 66, 99), False, 24), _image((2, 6, op.m), False, 25)
    gamma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    by_hand = x - gamma.view(-1, 1, 1, 1) * op.A_adjoint(op.A(x) - y, img_size=(66, 99))
    torch.testing.assert_close(op.dc_step_reference(x, y, gamma), by_hand, rtol=1e-12, atol=1e-12)


def test_blockcs_errors_name_the_argument():
    op = BlockCS(0.25)
    with pytest.raises(ValueError, match=r"^x: expected H and W multiples of block=33, got \(H, W\) = \(66, 100\)"):
        op.A(torch.zeros(1, 1, 66, 100))
    with pytest.raises(TypeError, match="^x: expected real floating"):
        op.A(torch.zeros(1, 1, 33, 33, dtype=torch.complex64))
    with pytest.raises(TypeError, match="^x: expected float32 or float64"):
        op.A(torch.zeros(1, 1, 33, 33, dtype=torch.float16))
    with pytest.raises(ValueError, match="^x: expected one channel"):
        op.A(torch.zeros(1, 3, 33, 33))
    with pytest.raises(ValueError, match="^img_size: needed to fold"):
        op.A_adjoint(torch.zeros(1, 6, op.m))
    with pytest.raises(ValueError, match=r"^y: expected \(B, n_blocks=6, m=272\)"):
        op.A_adjoint(torch.zeros(1, 5, op.m), img_size=(66, 99))
    with pytest.raises(ValueError, match="^y: expected \\(B, n_blocks, m=272\\)"):
        op.A_adjoint(torch.zeros(1, 6, 100), img_size=(66, 99))
    with pytest.raises(ValueError, match=r"^y: expected \(2, 6, 272\) \(the measurements of z\)"):
        op.prox_l2(torch.zeros(2, 1, 66, 99), torch.zeros(1, 6, op.m), 1.0)
    with pytest.raises(ValueError, match="^ratio: expected a number in \\(0, 1\\]"):
        BlockCS(1.5)
    with pytest.raises(ValueError, match="^img_size: expected positive"):
        BlockCS(0.25, img_size=(64, 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_operators_on_cuda_match_cpu():
    sr, cs = SuperResolution("bicubic", 2), BlockCS(0.25)
    z, y = _image((2, 3, 12, 18), False, 30, torch.float32), _image((2, 3, 6, 9), False, 31, torch.float32)
    torch.testing.assert_close(sr.prox_l2(z.cuda(), y.cuda(), 0.5).cpu(), sr.prox_l2(z, y, 0.5), rtol=1e-5, atol=1e-5)
    x, yb = _image((2, 1, 66, 99), False, 32, torch.float32), _image((2, 6, cs.m), False, 33, torch.float32)
    torch.testing.assert_close(cs.prox_l2(x.cuda(), yb.cuda(), 0.5).cpu(), cs.prox_l2(x, yb, 0.5), rtol=1e-5, atol=1e-5)
