import pytest
import torch
from conftest import rel_err

from mbdl_fast.complex import to_real_packed
from mbdl_fast.physics.masks import random_mask, variable_density_mask
from mbdl_fast.physics.mri import MRI, MultiCoilMRI

SIZES = [(16, 12), (15, 9), (16, 9), (9, 14)]


def make_mask(kind: str, h: int, w: int, seed: int = 0) -> torch.Tensor:
    if kind == "columns":
        return random_mask(w, 3, 0.2, seed=seed)
    if kind == "rows":
        return random_mask(h, 3, 0.2, seed=seed).reshape(h, 1)
    return variable_density_mask((h, w), 2.5, seed=seed)


def make_physics(h, w, coils, mask_kind, dtype=torch.complex128, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(mask_kind, h, w, seed)
    if coils is None:
        return MRI(mask)
    maps = torch.randn(batch, coils, h, w, dtype=dtype, generator=gen)
    return MultiCoilMRI(mask, maps)


def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.vdot(a.flatten(), b.flatten())


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("coils", [None, 1, 4])
@pytest.mark.parametrize("mask_kind", ["columns", "rows", "2d"])
def test_adjointness(size, coils, mask_kind):
    h, w = size
    phys = make_physics(h, w, coils, mask_kind)
    x = torch.randn(2, h, w, dtype=torch.complex128)
    y = torch.randn(2, phys.num_coils, h, w, dtype=torch.complex128)
    lhs, rhs = inner(phys.A(x), y), inner(x, phys.A_adjoint(y))
    assert abs(lhs - rhs) / abs(lhs) < 1e-12


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mask_kind", ["columns", "rows", "2d"])
def test_normal_operator_one_axis_transform_equals_two_axis(size, mask_kind):
    h, w = size
    phys = make_physics(h, w, 3, mask_kind)
    expected_dims = {"columns": (-1,), "rows": (-2,), "2d": (-2, -1)}[mask_kind]
    assert phys.transform_dims(h, w) == expected_dims
    x = torch.randn(2, h, w, dtype=torch.complex128)
    assert rel_err(phys.A_adjoint_A(x), phys.A_adjoint(phys.A(x))) < 1e-12


def test_forward_is_masked_centered_fft_of_coil_images():
    from mbdl_fast.fft import fft2c

    phys = make_physics(12, 10, 3, "columns")
    x = torch.randn(2, 12, 10, dtype=torch.complex128)
    want = phys.mask * fft2c(phys.coil_maps * x[:, None])
    assert torch.equal(phys.A(x), want)
    assert torch.all(phys.A(x)[..., phys.mask[0, 0, 0] == 0] == 0)


@pytest.mark.parametrize("coils", [None, 4])
@pytest.mark.parametrize("size", [(16, 12), (15, 9)])
def test_prox_is_optimal(coils, size):
    h, w = size
    phys = make_physics(h, w, coils, "columns")
    phys.cg_tol, phys.cg_max_iter = 1e-12, 200
    z = torch.randn(2, h, w, dtype=torch.complex128)
    y = phys.A(torch.randn(2, h, w, dtype=torch.complex128))
    gamma = 0.8
    x = phys.prox_l2(z, y, gamma)
    grad = gamma * phys.A_adjoint(phys.A(x) - y) + (x - z)
    assert float(grad.norm() / z.norm()) < 1e-9


def test_single_coil_closed_form_prox_equals_cg():
    phys = make_physics(14, 10, None, "2d")
    phys.cg_tol, phys.cg_max_iter = 1e-13, 300
    z = torch.randn(2, 14, 10, dtype=torch.complex128)
    y = torch.randn(2, 1, 14, 10, dtype=torch.complex128)
    gamma = torch.tensor([0.3, 2.0], dtype=torch.float64)
    closed = phys.prox_l2(z, y, gamma)
    from mbdl_fast.physics.base import LinearPhysics

    assert rel_err(closed, LinearPhysics.prox_l2(phys, z, y, gamma)) < 1e-10


def test_dc_step_reference_is_the_gradient_step():
    phys = make_physics(10, 8, 3, "columns")
    x = torch.randn(2, 10, 8, dtype=torch.complex128)
    y = torch.randn(2, 3, 10, 8, dtype=torch.complex128)
    want = x - 0.5 * phys.A_adjoint(phys.A(x) - y)
    assert rel_err(phys.dc_step_reference(x, y, 0.5), want) < 1e-14


def test_image_with_channel_dim_round_trips():
    phys = make_physics(10, 8, 2, "columns")
    x = torch.randn(2, 1, 10, 8, dtype=torch.complex128)
    y = phys.A(x)
    assert phys.dc_step_reference(x, y, 0.3).shape == (2, 1, 10, 8)


def test_real_packed_layout_equals_complex_layout():
    h, w = 10, 8
    maps = torch.randn(2, 3, h, w, dtype=torch.complex64)
    mask = random_mask(w, 3, 0.2, seed=0)
    cplx = MultiCoilMRI(mask, maps)
    packed = MultiCoilMRI(mask, maps, layout="real_packed")
    x = torch.randn(2, h, w, dtype=torch.complex64)
    y = cplx.A(x)
    assert torch.equal(packed.A(to_real_packed(x)), to_real_packed(y))
    assert torch.equal(packed.A_adjoint(to_real_packed(y)), to_real_packed(cplx.A_adjoint(y)))


def test_single_coil_real_packed_kspace_is_deepinv_shaped():
    h, w = 10, 8
    mask = random_mask(w, 3, 0.2, seed=0)
    cplx, packed = MRI(mask), MRI(mask, layout="real_packed")
    x = torch.randn(2, h, w, dtype=torch.complex64)
    y = packed.A(to_real_packed(x))
    assert y.shape == (2, 2, h, w)  # deepinv's MRI: (B, 2, H, W), no coil axis
    assert torch.equal(y, to_real_packed(cplx.A(x)[:, 0]))
    # both (B, 2, H, W) and (B, 2, 1, H, W) are accepted
    assert torch.equal(packed.A_adjoint(y), packed.A_adjoint(y[:, :, None]))
    assert torch.equal(packed.A_adjoint(y), to_real_packed(cplx.A_adjoint(cplx.A(x))))


@pytest.mark.parametrize("coils", [None, 2])
def test_float64_soft_mask_is_kept_and_cast_to_the_data(coils):
    h, w = 12, 10
    gen = torch.Generator().manual_seed(0)
    soft = torch.rand(1, w, dtype=torch.float64, generator=gen)  # not representable in float32
    maps = None if coils is None else torch.randn(1, coils, h, w, dtype=torch.complex128, generator=gen)
    phys = MRI(soft) if coils is None else MultiCoilMRI(soft, maps)
    assert phys.mask.dtype == torch.float64
    x = torch.randn(2, h, w, dtype=torch.complex128, generator=gen)
    expanded = x[:, None] if maps is None else maps * x[:, None]
    expected = soft * torch.fft.fftshift(
        torch.fft.fft2(torch.fft.ifftshift(expanded, dim=(-2, -1)), norm="ortho"), dim=(-2, -1)
    )
    assert rel_err(phys.A(x), expected) < 1e-14  # a float32 mask would be off by ~1e-8
    z = torch.randn_like(x)
    assert rel_err(phys.A_adjoint_A(z), phys.A_adjoint(phys.A(z))) < 1e-14
    # complex64 data: the mask follows the data's precision, nothing is promoted
    phys64 = MRI(soft) if coils is None else MultiCoilMRI(soft, maps.to(torch.complex64))
    assert phys64.A(x.to(torch.complex64)).dtype == torch.complex64
    assert phys64.dc_step_reference(x.to(torch.complex64), phys64.A(x.to(torch.complex64)), 0.5).dtype == (
        torch.complex64
    )


def test_update_swaps_parameters():
    phys = make_physics(10, 8, 2, "columns")
    new_mask = torch.ones(1, 8)
    phys.update(mask=new_mask)
    x = torch.randn(2, 10, 8, dtype=torch.complex128)
    assert rel_err(phys.A_adjoint_A(x), torch.sum(phys.coil_maps.abs() ** 2, 1) * x) < 1e-12
    with pytest.raises(TypeError, match="update: unknown parameter 'sigma'"):
        phys.update(sigma=0.1)


# -- bad input ----------------------------------------------------------------------------------
def test_real_packed_image_into_complex_operator_is_an_error():
    phys = make_physics(10, 8, 2, "columns", dtype=torch.complex64)
    with pytest.raises(TypeError, match=r"x: expected complex .*got float32 \(2, 2, 10, 8\).*real-packed"):
        phys.A(torch.randn(2, 2, 10, 8))
    with pytest.raises(TypeError, match=r"x: .*fastMRI's \(\.\.\., 2\) layout"):
        phys.A(torch.randn(2, 10, 8, 2))


def test_wrong_shapes_and_dtypes_name_the_argument():
    phys = make_physics(10, 8, 2, "columns", dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"coil_maps: expected complex64 \(3, C, 10, 8\)"):
        phys.A(torch.randn(3, 10, 8, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"mask: expected a shape broadcastable"):
        phys.A(torch.randn(2, 10, 9, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"y: expected k-space \(B, 2, H, W\) \(2 coils\)"):
        phys.A_adjoint(torch.randn(2, 3, 10, 8, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"coil_maps: expected complex \(B, C, H, W\), got float32"):
        MultiCoilMRI(torch.ones(1, 8), torch.randn(2, 2, 10, 8))
    with pytest.raises(TypeError, match="mask: expected real floating"):
        MultiCoilMRI(torch.ones(1, 8, dtype=torch.complex64))
    with pytest.raises(ValueError, match="layout"):
        MRI(torch.ones(1, 8), layout="channels")


def test_nan_parameters_are_refused():
    maps = torch.randn(1, 2, 10, 8, dtype=torch.complex64)
    maps[0, 1, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="coil_maps: contains NaN"):
        MultiCoilMRI(torch.ones(1, 8), maps)
    with pytest.raises(ValueError, match="mask: contains Inf"):
        MRI(torch.tensor([[1.0, float("inf")]]))


def test_device_mismatch_is_named():
    phys = make_physics(10, 8, 2, "columns", dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"mask: expected a tensor on meta"):
        phys.A(torch.empty(2, 10, 8, dtype=torch.complex64, device="meta"))
