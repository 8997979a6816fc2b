import numpy as np
import pytest
import torch
from conftest import rel_err

from mbdl_fast.complex import from_fastmri, from_real_packed, to_fastmri, to_real_packed
from mbdl_fast.fft import fft2c, fftc, ifft2c, ifftc


def numpy_fft2c(x: np.ndarray, inverse: bool = False) -> np.ndarray:
    """fastMRI's definition with numpy's own shifts: fftshift(fft2(ifftshift(x)))."""
    f = np.fft.ifft2 if inverse else np.fft.fft2
    return np.fft.fftshift(f(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


@pytest.mark.parametrize("shape", [(8, 6), (7, 5), (6, 9), (10, 10), (12, 14), (1, 4), (33, 32)])
@pytest.mark.parametrize("inverse", [False, True])
def test_centered_fft_matches_numpy_definition(shape, inverse):
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    x = torch.randn((2, 3) + shape, dtype=torch.complex128, generator=gen)
    ours = (ifft2c if inverse else fft2c)(x)
    assert rel_err(ours, torch.from_numpy(numpy_fft2c(x.numpy(), inverse))) < 1e-13


@pytest.mark.parametrize("dims", [(-1,), (-2,), (-2, -1)])
def test_centered_fft_is_unitary_and_inverted(dims):
    x = torch.randn(2, 9, 12, dtype=torch.complex128)
    k = fftc(x, dims)
    assert abs(float(k.norm() / x.norm()) - 1) < 1e-13
    assert rel_err(ifftc(k, dims), x) < 1e-13


def test_one_axis_transform_matches_numpy():
    x = torch.randn(3, 10, 7, dtype=torch.complex128)
    ref = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(x.numpy(), axes=-1), axis=-1, norm="ortho"), axes=-1)
    assert rel_err(fftc(x, (-1,)), torch.from_numpy(ref)) < 1e-13


def test_layout_converters_round_trip_exactly():
    x = torch.randn(2, 5, 6, dtype=torch.complex64)
    packed = to_real_packed(x)
    assert packed.shape == (2, 2, 5, 6) and packed.dtype == torch.float32
    assert torch.equal(packed[:, 0], x.real) and torch.equal(packed[:, 1], x.imag)
    assert torch.equal(from_real_packed(packed), x)
    fm = to_fastmri(x)
    assert fm.shape == (2, 5, 6, 2)
    assert torch.equal(from_fastmri(fm), x)
    # real-packed and fastMRI layouts of the same data agree element by element
    assert torch.equal(fm.movedim(-1, 1), packed)


def test_layout_converters_refuse_wrong_input():
    with pytest.raises(TypeError, match="x: expected complex"):
        to_real_packed(torch.randn(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"x: expected real-packed real \(B, 2, \.\.\.\), got float32 \(2, 3, 4\)"):
        from_real_packed(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="fastMRI layout"):
        from_fastmri(torch.randn(2, 3, 4))


def test_fft_refuses_real_tensors_and_names_the_converters():
    """fastMRI's real (..., H, W, 2) was once transformed as is (relative error 1.4 against fastMRI)."""
    real = torch.randn(2, 8, 6, 2)
    for transform in (fft2c, ifft2c, fftc, ifftc):
        with pytest.raises(TypeError, match=r"x: expected a complex tensor .*got float32 \(2, 8, 6, 2\).*from_fastmri"):
            transform(real)


@pytest.mark.parametrize("inverse", [False, True])
def test_fft_in_fastmri_layout_when_asked(inverse):
    x = torch.randn(2, 3, 8, 6, dtype=torch.complex128)
    transform = ifft2c if inverse else fft2c
    got = transform(to_fastmri(x), layout="fastmri")
    assert got.shape == (2, 3, 8, 6, 2) and got.dtype == torch.float64
    assert rel_err(from_fastmri(got), torch.from_numpy(numpy_fft2c(x.numpy(), inverse))) < 1e-13
    with pytest.raises(ValueError, match="layout: expected 'complex' or 'fastmri'"):
        transform(x, layout="deepinv")
