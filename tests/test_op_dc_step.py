"""The MRI DC step op (``mbdl_fast.ops.dc_step``): every backend in the table against ``mri_dc_step_ref``, and
through the physics (``mbdl_fast.dc_step``) against the operator's plain-PyTorch reference, forward and backward, on
fresh random inputs. The cuda implementation's own checks (levels, plans, arguments): test_op_dc_step_cuda.py."""

import pytest
import torch
from conftest import rel_err, require_backend

import mbdl_fast
from mbdl_fast.backends import backends, resolve_backend, supported_backends
from mbdl_fast.ops.dc_step import mri_dc_step_op, mri_dc_step_ref
from mbdl_fast.physics.masks import random_mask, variable_density_mask
from mbdl_fast.physics.mri import MRI, MultiCoilMRI

# Relative-error bounds per dtype for fused vs reference (complex64 arithmetic, FFT rounding).
TOL = {torch.complex64: 2e-5}
SIZES = [(16, 12), (15, 9), (16, 9), (9, 14)]


def make_problem(h, w, coils, mask_kind, device, batch=2, seed=0, per_sample_maps=True):
    gen = torch.Generator().manual_seed(seed)
    if mask_kind == "columns":
        mask = random_mask(w, 3, 0.2, seed=seed)
    elif mask_kind == "rows":
        mask = random_mask(h, 3, 0.2, seed=seed).reshape(h, 1)
    elif mask_kind == "per_sample_columns":
        mask = torch.stack([random_mask(w, 3, 0.2, seed=seed + i) for i in range(batch)])[:, None]
    elif mask_kind == "per_sample":
        mask = torch.stack([variable_density_mask((h, w), 2.5, seed=seed + i) for i in range(batch)])[:, None]
    else:
        mask = variable_density_mask((h, w), 2.5, seed=seed)
    if coils is None:
        phys = MRI(mask.to(device))
    else:
        maps = torch.randn(batch if per_sample_maps else 1, coils, h, w, dtype=torch.complex64, generator=gen)
        phys = MultiCoilMRI(mask.to(device), maps.to(device))
    x = torch.randn(batch, h, w, dtype=torch.complex64, generator=gen).to(device)
    y = torch.randn(batch, phys.num_coils, h, w, dtype=torch.complex64, generator=gen).to(device)
    return phys, x, y


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("coils", [None, 1, 4])
@pytest.mark.parametrize("mask_kind", ["columns", "rows", "2d", "per_sample", "per_sample_columns"])
def test_triton_forward_matches_reference(size, coils, mask_kind, device):
    phys, x, y = make_problem(*size, coils, mask_kind, device, seed=sum(size))
    gamma = torch.tensor([0.4, 1.7], device=device)
    ref = phys.dc_step_reference(x, y, gamma)
    out = torch.full_like(x, float("nan"))  # poisoned: a kernel that writes nothing cannot pass
    out = mbdl_fast.dc_step(phys, x, y, gamma, backend="triton")
    assert rel_err(out, ref) < TOL[torch.complex64]
    # with A^H y precomputed, the step transforms only the axes the mask varies along
    ahy = phys.A_adjoint(y)
    out = mbdl_fast.dc_step(phys, x, None, gamma, backend="triton", AHy=ahy)
    assert rel_err(out, ref) < TOL[torch.complex64]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shared_coil_maps_and_scalar_gamma(backend, device):
    phys, x, y = make_problem(16, 10, 3, "columns", device, per_sample_maps=False)
    ref = phys.dc_step_reference(x, y, 0.9)
    assert rel_err(phys.dc_step(x, y, 0.9, backend=backend), ref) < TOL[torch.complex64]


@pytest.mark.parametrize("size", [(16, 12), (15, 9)])
@pytest.mark.parametrize("coils", [None, 3])
@pytest.mark.parametrize("use_ahy", [False, True])
def test_triton_backward_matches_reference(size, coils, use_ahy, device):
    phys, x0, y0 = make_problem(*size, coils, "columns", device, seed=7)
    grads = {}
    for backend in ("torch", "triton"):
        x = x0.clone().requires_grad_()
        y = y0.clone().requires_grad_()
        gamma = torch.tensor([0.6, 1.1], device=device, requires_grad=True)
        ahy = phys.A_adjoint(y) if use_ahy else None
        out = mbdl_fast.dc_step(phys, x, None if use_ahy else y, gamma, backend=backend, AHy=ahy)
        weight = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3)).to(device)
        loss = (out * weight.conj()).real.sum()
        grads[backend] = torch.autograd.grad(loss, (x, y, gamma))
    for ours, ref in zip(grads["triton"], grads["torch"], strict=True):
        assert rel_err(ours, ref) < 5 * TOL[torch.complex64]


def test_reference_gradcheck_float64():
    phys, _, _ = make_problem(6, 5, 2, "2d", "cpu")
    phys.update(coil_maps=phys.coil_maps.to(torch.complex128))
    x = torch.randn(2, 6, 5, dtype=torch.complex128, requires_grad=True)
    y = torch.randn(2, 2, 6, 5, dtype=torch.complex128, requires_grad=True)
    gamma = torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, g: phys.dc_step(a, b, g, backend="torch"), (x, y, gamma))


def test_custom_op_registration_passes_opcheck(device):
    phys, x, y = make_problem(8, 6, 2, "columns", device)
    gamma = torch.tensor([0.5, 0.8], device=device)
    for y_arg, ahy, th in ((y, None, True), (None, phys.A_adjoint(y), False)):
        args = (x.requires_grad_(), phys.coil_maps, phys.mask, y_arg, ahy, gamma.requires_grad_(), th, True, "triton")
        torch.library.opcheck(torch.ops.mbdl_fast.mri_dc_step.default, args)


def test_torch_compile_traces_around_the_custom_op(device):
    phys, x, y = make_problem(16, 10, 3, "columns", device)

    def step(x, y):
        return mbdl_fast.dc_step(phys, x, y, 0.5, backend="triton", check_inputs=False) * 2

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert rel_err(compiled(x, y), 2 * phys.dc_step_reference(x, y, 0.5)) < TOL[torch.complex64]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_real_packed_layout(backend, device):
    from mbdl_fast.complex import to_real_packed

    phys, x, y = make_problem(12, 10, 2, "columns", device)
    packed = MultiCoilMRI(phys.mask, phys.coil_maps, layout="real_packed")
    expected = to_real_packed(phys.dc_step_reference(x, y, 0.7))
    out = mbdl_fast.dc_step(packed, to_real_packed(x), to_real_packed(y), 0.7, backend=backend)
    assert rel_err(out, expected) < TOL[torch.complex64]
    ahy = packed.A_adjoint(to_real_packed(y))
    out = mbdl_fast.dc_step(packed, to_real_packed(x), None, 0.7, backend=backend, AHy=ahy)
    assert rel_err(out, expected) < TOL[torch.complex64]


def test_other_operators_use_their_reference(device):
    from mbdl_fast.physics import SuperResolution

    sr = SuperResolution("box", factor=2)
    x = torch.randn(2, 1, 8, 8)
    y = sr.A(torch.randn(2, 1, 8, 8))
    want = x - 0.5 * sr.A_adjoint(sr.A(x) - y)
    assert rel_err(mbdl_fast.dc_step(sr, x, y, 0.5), want) < 1e-6
    with pytest.raises(ValueError, match="backend: 'triton' is not implemented for this operator"):
        mbdl_fast.dc_step(sr, x, y, 0.5, backend="triton")


# -- backend selection and bad input -------------------------------------------------------------
def test_backends_report_reasons():
    status = backends("cpu")
    assert set(status) == {"torch", "triton", "cuda"}
    assert status["torch"].available
    for s in status.values():
        assert s.reason
    if not torch.cuda.is_available():
        assert not status["cuda"].available


def test_auto_picks_torch_on_cpu():
    assert resolve_backend("auto", torch.device("cpu"), ("torch", "triton", "cuda")) == "torch"


def test_explicit_unavailable_backend_is_an_error(monkeypatch):
    phys, x, y = make_problem(8, 6, 2, "columns", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend: 'triton' is unavailable on cpu: triton needs a CUDA tensor"):
        mbdl_fast.dc_step(phys, x, y, 0.5, backend="triton")
    with pytest.raises(ValueError, match="backend: expected one of"):
        mbdl_fast.dc_step(phys, x, y, 0.5, backend="cudnn")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend: 'cuda' is unavailable on cpu"):
            mbdl_fast.dc_step(phys, x, y, 0.5, backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs_are_named(backend, device):
    phys, x, y = make_problem(8, 6, 2, "columns", device)
    bad = x.clone()
    bad[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="x: contains NaN"):
        mbdl_fast.dc_step(phys, bad, y, 0.5, backend=backend)
    with pytest.raises(ValueError, match="y: contains"):
        mbdl_fast.dc_step(phys, x, y * float("inf"), 0.5, backend=backend)
    with pytest.raises(TypeError, match="x: expected complex .*real-packed"):
        mbdl_fast.dc_step(phys, torch.randn(2, 2, 8, 6, device=device), y, 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"y: expected k-space \(2, 2, 8, 6\) to match the image"):
        mbdl_fast.dc_step(phys, x, y[:, :, :, :5], 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"gamma: expected a scalar or shape \(2,\)|gamma: expected a real scalar"):
        mbdl_fast.dc_step(phys, x, y, torch.ones(3, device=device), backend=backend)
    with pytest.raises(ValueError, match="y: expected measurements"):
        mbdl_fast.dc_step(phys, x, None, 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"AHy: expected complex64 \(2, 8, 6\) like x"):
        mbdl_fast.dc_step(phys, x, None, 0.5, backend=backend, AHy=x[:1])


def test_fused_backend_refuses_complex128(device):
    phys, x, y = make_problem(8, 6, None, "columns", device)
    with pytest.raises(TypeError, match="x: backend 'triton' expects complex64"):
        mbdl_fast.dc_step(phys, x.to(torch.complex128), y.to(torch.complex128), 0.5, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuda backend runs on a GPU only")
def test_cuda_backend_matches_reference():
    phys, x, y = make_problem(16, 12, 4, "columns", "cuda")
    ref = phys.dc_step_reference(x, y, 0.8)
    assert rel_err(mbdl_fast.dc_step(phys, x, y, 0.8, backend="cuda"), ref) < TOL[torch.complex64]


# ------------------------------------------------------------------------------------------------
# The op on plain tensors, every backend of the table against its reference
# ------------------------------------------------------------------------------------------------
# (H, W, coils, mask kind, what gives A^H y): "y" (then both axes are transformed), "ahy" (A^H y given: only the axis
# the mask varies along), "none" (A^H y = 0, both axes). Even and odd sizes, one coil without maps, shared maps.
OP_CASES = [
    (16, 12, None, "columns", "y"),
    (15, 9, 3, "columns", "ahy"),
    (9, 14, 3, "rows", "ahy"),
    (16, 9, 4, "per_sample", "y"),
    (12, 10, 2, "2d", "none"),
]


def _c128(t):
    return None if t is None else t.to(torch.complex128)


@pytest.mark.parametrize("backend", supported_backends("mri_dc_step"))
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: "-".join(map(str, c)))
def test_every_backend_matches_the_ref(backend, case, device):
    require_backend("mri_dc_step", backend, device)
    h, w, coils, mask_kind, given = case
    phys, x, y = make_problem(h, w, coils, mask_kind, device, seed=len(OP_CASES) + OP_CASES.index(case))
    dims = phys.transform_dims(h, w) if given == "ahy" else (-2, -1)
    maps, mask = phys.coil_maps, phys.mask_for(x)
    ahy = phys.A_adjoint(y) if given == "ahy" else None
    y_arg = y if given == "y" else None
    gamma = torch.tensor([0.7, 0.3], device=device)
    out = mri_dc_step_op(x, maps, mask, y_arg, ahy, gamma, -2 in dims, -1 in dims, backend)
    args64 = (_c128(x), _c128(maps), mask.double(), _c128(y_arg), _c128(ahy), gamma.double())
    ref = mri_dc_step_ref(*args64, -2 in dims, -1 in dims)
    assert out.dtype == torch.complex64 and out.shape == x.shape
    assert rel_err(out.to(torch.complex128), ref) < TOL[torch.complex64]
