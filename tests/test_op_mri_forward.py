"""The MRI forward op (``mbdl_fast.ops.mri_forward``): every backend in the table against ``mri_forward_ref``, its
backward against the adjoint, and the backend the table does not hold (cuda) refused with the reason."""

import pytest
import torch
from conftest import rel_err, require_backend

from mbdl_fast.backends import op_backends, resolve_op, supported_backends
from mbdl_fast.ops.mri_forward import mri_adjoint_ref, mri_forward_op, mri_forward_ref
from mbdl_fast.physics.masks import random_mask, variable_density_mask

# (H, W, coils, mask kind, maps shared by the batch): even and odd sizes, one coil without maps.
CASES = [(16, 12, None, "columns", False), (15, 9, 3, "2d", False), (9, 14, 4, "columns", True), (8, 8, 2, "2d", True)]


def make_inputs(h, w, coils, mask_kind, shared, device, seed, batch=2):
    gen = torch.Generator().manual_seed(seed)
    mask = (
        random_mask(w, 3, 0.2, seed=seed) if mask_kind == "columns" else variable_density_mask((h, w), 2.5, seed=seed)
    )
    mask = mask.reshape((1, 1) + (1,) * (2 - mask.dim()) + tuple(mask.shape)).to(device)
    maps = None
    if coils is not None:
        maps = torch.randn(1 if shared else batch, coils, h, w, dtype=torch.complex64, generator=gen).to(device)
    x = torch.randn(batch, h, w, dtype=torch.complex64, generator=gen).to(device)
    return x, maps, mask


def _c128(t):
    return None if t is None else t.to(torch.complex128)


@pytest.mark.parametrize("backend", supported_backends("mri_forward"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_every_backend_matches_the_ref(backend, case, device):
    require_backend("mri_forward", backend, device)
    x, maps, mask = make_inputs(*case, device, seed=CASES.index(case))
    out = mri_forward_op(x, maps, mask, backend)
    ref = mri_forward_ref(_c128(x), _c128(maps), mask.double())
    coils = 1 if maps is None else maps.shape[1]
    assert out.dtype == torch.complex64 and out.shape == (x.shape[0], coils, *x.shape[1:])
    assert rel_err(out.to(torch.complex128), ref) < 2e-5


@pytest.mark.parametrize("backend", supported_backends("mri_forward"))
def test_backward_is_the_adjoint(backend, device):
    require_backend("mri_forward", backend, device)
    x, maps, mask = make_inputs(15, 9, 3, "2d", False, device, seed=7)
    g = torch.randn(2, 3, 15, 9, dtype=torch.complex64, generator=torch.Generator().manual_seed(8)).to(device)
    xs = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(mri_forward_op(xs, maps, mask, backend), xs, g)
    assert rel_err(grad.to(torch.complex128), mri_adjoint_ref(_c128(g), _c128(maps), mask.double())) < 2e-5


def test_the_adjoint_ref_is_the_adjoint():
    x, maps, mask = make_inputs(9, 14, 4, "2d", True, "cpu", seed=3)
    x, maps, mask = _c128(x), _c128(maps), mask.double()
    y = torch.randn(2, 4, 9, 14, dtype=torch.complex128, generator=torch.Generator().manual_seed(4))
    lhs = torch.vdot(mri_forward_ref(x, maps, mask).flatten(), y.flatten())
    rhs = torch.vdot(x.flatten(), mri_adjoint_ref(y, maps, mask).flatten())
    assert abs(lhs - rhs) < 1e-10 * abs(lhs)


def test_cuda_is_refused_with_the_reason():
    """The extension has no forward operator: an explicit request is an error, never torch run quietly."""
    assert "cuda" not in supported_backends("mri_forward")
    status = op_backends("mri_forward", "cpu")["cuda"]
    assert not status.available and status.reason == "cuda does not implement mri_forward"
    with pytest.raises(ValueError, match=r"^backend: 'cuda' is not implemented for mri_forward; supported: "):
        resolve_op("mri_forward", "cuda", torch.device("cpu"))
    x, maps, mask = make_inputs(8, 8, 2, "2d", False, "cpu", seed=1)
    with pytest.raises(ValueError, match=r"^impl: expected one of \('torch', 'triton'\) for mri_forward, got 'cuda'"):
        mri_forward_op(x, maps, mask, "cuda")
