"""``mbdl_fast.prox_l2`` for Cartesian MRI: every backend against the float64 torch reference on fresh random inputs.

Single coil: the closed form, fused (one k-space pass between two FFTs; triton here in the CPU interpreter, cuda on a
GPU). Multi-coil: CG on the fused DC step. Forward and backward, even and odd sizes, gamma as a float or a (B,)
tensor, per-sample masks; bad inputs named; the extension exports the CUDA k-space kernel (checked on any machine),
whose maths (``kspace_prox_update_ref``) is checked here against the reference and whose kernel runs on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_extension, rel_err, require_backend

import mbdl_fast
from mbdl_fast.backends import backends, supported_backends
from mbdl_fast.ops.mri_prox import kspace_prox_update_cuda, kspace_prox_update_ref, mri_prox_l2_op, mri_prox_l2_ref
from mbdl_fast.physics.masks import random_mask, variable_density_mask
from mbdl_fast.physics.mri import MRI, MultiCoilMRI

TOL = 1e-5  # complex64 fused vs the float64 reference, closed form
CG_TOL = 1e-4  # complex64 CG stopped at a relative residual of 1e-5, vs the float64 reference solved to 1e-12
SIZES = [(16, 12), (15, 9), (16, 9), (9, 14)]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def fused_backends(device: torch.device) -> list[str]:
    return [name for name in ("triton", "cuda") if backends(device)[name].available]


def make_mask(h, w, kind, batch, seed):
    if kind == "columns":
        return random_mask(w, 3, 0.2, seed=seed)
    if kind == "rows":
        return random_mask(h, 3, 0.2, seed=seed).reshape(h, 1)
    if kind == "weighted":  # a real, non-binary 2-D mask (M² != M), about 60 % sampled
        gen = torch.Generator().manual_seed(seed)
        return (torch.rand(h, w, generator=gen) < 0.6) * (0.2 + 1.6 * torch.rand(h, w, generator=gen))
    if kind == "per_sample":
        return torch.stack([variable_density_mask((h, w), 2.5, seed=seed + i) for i in range(batch)])[:, None]
    return variable_density_mask((h, w), 2.5, seed=seed)


def make_problem(h, w, coils, mask_kind, device, batch=2, seed=0, shared_maps=False):
    """(physics in complex64, the same physics in complex128 solved to 1e-12, z, y in complex128)."""
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(h, w, mask_kind, batch, seed).to(device)
    if coils is None:
        phys, phys64 = MRI(mask), MRI(mask)
    else:
        maps = torch.randn(1 if shared_maps else batch, coils, h, w, dtype=torch.complex128, generator=gen)
        maps = (maps / maps.abs().pow(2).sum(1, keepdim=True).sqrt()).to(device)
        phys = MultiCoilMRI(mask, maps.to(torch.complex64), cg_tol=1e-5, cg_max_iter=60)
        phys64 = MultiCoilMRI(mask, maps, cg_tol=1e-12, cg_max_iter=300)
    c = 1 if coils is None else coils
    z = torch.randn(batch, h, w, dtype=torch.complex128, generator=gen).to(device)
    y = torch.randn(batch, c, h, w, dtype=torch.complex128, generator=gen).to(device)
    return phys, phys64, z, y


def gammas(kind, device, batch=2):
    """(gamma for the complex64 call, the same in float64 for the reference)."""
    if kind == "float":
        return 0.8, 0.8
    g = torch.tensor([0.4, 1.7, 0.9][:batch], dtype=torch.float32, device=device)
    return g, g.double()


def c64(t):
    return t.to(torch.complex64)


# ------------------------------------------------------------------------------------------------
# Single coil: the closed form
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("mask_kind", ["columns", "weighted", "per_sample"])
@pytest.mark.parametrize("gamma_kind", ["float", "tensor"])
def test_single_coil_every_backend_matches_float64_reference(size, mask_kind, gamma_kind, device):
    phys, phys64, z, y = make_problem(*size, None, mask_kind, device, seed=sum(size))
    g, g64 = gammas(gamma_kind, device)
    ref = phys64.prox_l2_reference(z, y, g64)
    for backend in ["torch", *fused_backends(device)]:
        out = mbdl_fast.prox_l2(phys, c64(z), c64(y), g, backend=backend)
        assert out.dtype == torch.complex64 and out.shape == z.shape, backend
        assert rel_err(out.to(torch.complex128), ref) < TOL, backend


def test_kspace_step_reference_is_the_prox():
    """The maths the Triton and CUDA kernels implement: F^{-1}(step(F z)) is the prox, any parity, y or not."""
    for h, w in [(16, 12), (15, 9), (8, 7), (1, 5)]:
        _, phys64, z, y = make_problem(h, w, None, "weighted", "cpu", batch=3, seed=h * w)
        g = torch.tensor([0.3, 1.2, 0.0], dtype=torch.float64)
        for y_arg in (y, None):
            got = torch.fft.ifft2(kspace_prox_update_ref(torch.fft.fft2(z), phys64.mask, y_arg, g), norm="forward")
            want = phys64.prox_l2_reference(z, torch.zeros_like(y) if y_arg is None else y, g)
            assert rel_err(got, want) < 1e-13


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_single_coil_layouts(backend, device):
    from mbdl_fast.complex import to_real_packed

    if backend not in ["torch", *fused_backends(device)]:
        pytest.skip(f"{backend}: {backends(device)[backend].reason}")
    phys, phys64, z, y = make_problem(12, 10, None, "columns", device)
    ref = phys64.prox_l2_reference(z, y, 0.7)
    # (B, 1, H, W) in, (B, 1, H, W) out
    out = phys.prox_l2(c64(z)[:, None], c64(y), 0.7, backend=backend)
    assert out.shape == (2, 1, 12, 10) and rel_err(out[:, 0].to(torch.complex128), ref) < TOL
    packed = MRI(phys.mask, layout="real_packed")
    out = mbdl_fast.prox_l2(packed, to_real_packed(c64(z)), to_real_packed(c64(y)), 0.7, backend=backend)
    assert rel_err(out.double(), to_real_packed(ref)) < TOL


@pytest.mark.parametrize("size", [(16, 12), (15, 9)], ids=str)
def test_single_coil_backward_matches_reference(size, device):
    """Gradients in z, y and gamma of the fused op against autograd through the float64 reference."""
    phys, phys64, z0, y0 = make_problem(*size, None, "weighted", device, seed=11)
    weight = torch.randn(z0.shape, dtype=torch.complex128, generator=torch.Generator().manual_seed(3)).to(device)
    grads = {}
    for backend in ["torch64", *fused_backends(device)]:
        dtype = torch.complex128 if backend == "torch64" else torch.complex64
        z = z0.to(dtype).detach().clone().requires_grad_()
        y = y0.to(dtype).detach().clone().requires_grad_()
        gamma = torch.tensor([0.6, 1.3], dtype=z.real.dtype, device=device, requires_grad=True)
        if backend == "torch64":
            out = phys64.prox_l2(z, y, gamma, backend="torch")
        else:
            out = mbdl_fast.prox_l2(phys, z, y, gamma, backend=backend)
        loss = (out * weight.to(dtype).conj()).real.sum()
        grads[backend] = [t.to(torch.complex128) for t in torch.autograd.grad(loss, (z, y, gamma))]
    for backend in fused_backends(device):
        for name, ours, ref in zip(("z", "y", "gamma"), grads[backend], grads["torch64"], strict=True):
            assert rel_err(ours, ref) < 10 * TOL, (backend, name)


def test_prox_op_passes_opcheck(device):
    impls = fused_backends(device)
    if not impls:
        pytest.skip("no fused backend here")
    phys, _, z, y = make_problem(8, 6, None, "columns", device)
    gamma = torch.tensor([0.5, 0.8], device=device)
    for impl in impls:
        for y_arg in (c64(y), None):
            args = (c64(z).requires_grad_(), phys.mask, y_arg, gamma.clone().requires_grad_(), impl)
            torch.library.opcheck(torch.ops.mbdl_fast.mri_prox_l2.default, args)


def test_torch_compile_traces_around_the_prox_op(device):
    if "triton" not in fused_backends(device):
        pytest.skip(backends(device)["triton"].reason)
    phys, phys64, z, y = make_problem(16, 10, None, "columns", device)

    def prox(z, y):
        return mbdl_fast.prox_l2(phys, z, y, 0.5, backend="triton", check_inputs=False) * 2

    compiled = torch.compile(prox, backend="aot_eager", fullgraph=True)
    assert rel_err(compiled(c64(z), c64(y)).to(torch.complex128), 2 * phys64.prox_l2_reference(z, y, 0.5)) < TOL


# ------------------------------------------------------------------------------------------------
# Multi-coil: CG on the fused DC step
# ------------------------------------------------------------------------------------------------
MULTI_CASES = [
    # (H, W, coils, mask, shared maps, gamma)
    (16, 12, 3, "columns", True, "float"),
    (15, 9, 2, "weighted", False, "tensor"),
    (9, 14, 3, "rows", False, "float"),
]


@pytest.mark.parametrize("case", MULTI_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}-{c[5]}")
def test_multi_coil_every_backend_matches_float64_reference(case, device):
    h, w, coils, mask_kind, shared, gamma_kind = case
    phys, phys64, z, y = make_problem(h, w, coils, mask_kind, device, seed=h + w, shared_maps=shared)
    g, g64 = gammas(gamma_kind, device)
    ref = phys64.prox_l2_reference(z, y, g64)
    iterations = {}
    for backend in ["torch", *fused_backends(device)]:
        out = mbdl_fast.prox_l2(phys, c64(z), c64(y), g, backend=backend)
        assert out.dtype == torch.complex64 and out.shape == z.shape, backend
        assert rel_err(out.to(torch.complex128), ref) < CG_TOL, backend
        info = phys.last_prox_info
        assert bool(info["converged"].all()), (backend, info)
        iterations[backend] = info["iterations"]
    # the same CG on the same operator in the same precision: the iteration counts agree (to two)
    assert max(iterations.values()) - min(iterations.values()) <= 2, iterations


@pytest.mark.parametrize("start", ["random", "at_solution"])
def test_multi_coil_gradient_is_the_derivative_of_the_solution(start):
    """Implicit differentiation of the CG prox against central finite differences (float64, solved to 1e-13).

    With y = A z the warm start z is already the solution: CG stops after 0 iterations, and autograd through its
    (no) iterations gave dx/dz = I instead of (I + gamma A^H A)^{-1}."""
    phys, phys64, z0, y0 = make_problem(12, 10, 3, "columns", torch.device("cpu"), seed=6)
    if start == "at_solution":
        y0 = phys64.A(z0)
    phys64.cg_tol, phys64.cg_max_iter = 1e-13, 500
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(z0.shape, dtype=torch.complex128, generator=gen)
    dz, dy = (
        torch.randn(z0.shape, dtype=torch.complex128, generator=gen),
        torch.randn(y0.shape, dtype=torch.complex128, generator=gen),
    )
    gamma0 = torch.tensor([0.6, 1.3], dtype=torch.float64)
    dgamma = torch.tensor([0.3, -0.7], dtype=torch.float64)

    def loss(z, y, gamma):
        return (phys64.prox_l2(z, y, gamma, backend="torch") * weight.conj()).real.sum()

    args = [t.clone().requires_grad_() for t in (z0, y0, gamma0)]
    grads = torch.autograd.grad(loss(*args), args)
    eps = 1e-6
    with torch.no_grad():
        for i, direction in enumerate((dz, dy, dgamma)):
            plus = [t + eps * direction if j == i else t for j, t in enumerate((z0, y0, gamma0))]
            minus = [t - eps * direction if j == i else t for j, t in enumerate((z0, y0, gamma0))]
            numeric = (loss(*plus) - loss(*minus)) / (2 * eps)
            analytic = (grads[i].conj() * direction).real.sum()  # PyTorch's conjugate-Wirtinger gradients
            assert abs(float(analytic - numeric)) < 1e-6 * max(1.0, abs(float(numeric))), i


def test_multi_coil_backward_matches_torch(device):
    """Every backend's implicit gradient (CG with a fixed number of iterations, forward and backward) is the same."""
    impls = fused_backends(device)
    if not impls:
        pytest.skip("no fused backend here")
    phys, _, z0, y0 = make_problem(12, 10, 3, "columns", device, seed=5)
    phys.cg_tol, phys.cg_max_iter = 0.0, 4
    weight = torch.randn(z0.shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(3)).to(device)
    grads = {}
    for backend in ["torch", *impls]:
        z = c64(z0).requires_grad_()
        y = c64(y0).requires_grad_()
        gamma = torch.tensor([0.6, 1.3], device=device, requires_grad=True)
        out = mbdl_fast.prox_l2(phys, z, y, gamma, backend=backend)
        assert phys.last_prox_info["iterations"] == 4
        loss = (out * weight.conj()).real.sum()
        grads[backend] = torch.autograd.grad(loss, (z, y, gamma))
    for backend in impls:
        for name, ours, ref in zip(("z", "y", "gamma"), grads[backend], grads["torch"], strict=True):
            assert rel_err(ours, ref) < 1e-4, (backend, name)


# ------------------------------------------------------------------------------------------------
# Dispatch and bad input
# ------------------------------------------------------------------------------------------------
def test_torch_backend_is_the_reference_exactly():
    for coils in (None, 3):
        phys, _, z, y = make_problem(10, 8, coils, "columns", "cpu")
        z, y = c64(z), c64(y)
        want = phys.prox_l2_reference(z, y, 0.6)
        assert torch.equal(phys.prox_l2(z, y, 0.6, backend="torch"), want)
        assert torch.equal(mbdl_fast.prox_l2(phys, z, y, 0.6, backend="torch"), want)
        assert torch.equal(phys.prox_l2(z, y, 0.6), want)  # auto on a CPU is torch


def test_auto_falls_back_to_torch_where_fused_cannot_run():
    phys, phys64, z, y = make_problem(10, 8, None, "columns", "cpu")
    want = phys64.prox_l2_reference(z, y, 0.6)
    # The call after backend resolution ("auto" on a CPU resolves to torch before reaching it).
    assert torch.equal(phys64._prox_l2_by("triton", z, y, 0.6, auto=True), want)  # complex128
    with pytest.raises(TypeError, match=r"z: backend 'triton' expects complex64 \(B, H, W\), got complex128"):
        phys64._prox_l2_by("triton", z, y, 0.6, auto=False)


def test_other_operators_use_their_own_prox():
    from mbdl_fast.physics import SuperResolution

    sr = SuperResolution("box", factor=2)
    z = torch.randn(2, 1, 8, 8)
    y = sr.A(torch.randn(2, 1, 8, 8))
    assert torch.equal(mbdl_fast.prox_l2(sr, z, y, 0.5), sr.prox_l2(z, y, 0.5))
    with pytest.raises(ValueError, match="backend: 'triton' is not implemented for this operator"):
        mbdl_fast.prox_l2(sr, z, y, 0.5, backend="triton")


def test_explicit_unavailable_backend_is_an_error(monkeypatch):
    phys, _, z, y = make_problem(8, 6, None, "columns", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend: 'triton' is unavailable on cpu: triton needs a CUDA tensor"):
        mbdl_fast.prox_l2(phys, c64(z), c64(y), 0.5, backend="triton")
    with pytest.raises(ValueError, match="backend: expected one of"):
        mbdl_fast.prox_l2(phys, c64(z), c64(y), 0.5, backend="cudnn")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend: 'cuda' is unavailable on cpu"):
            mbdl_fast.prox_l2(phys, c64(z), c64(y), 0.5, backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("coils", [None, 2])
def test_bad_inputs_are_named(backend, coils, device):
    if backend not in ["torch", *fused_backends(device)]:
        pytest.skip(f"{backend}: {backends(device)[backend].reason}")
    phys, _, z, y = make_problem(8, 6, coils, "columns", device)
    z, y = c64(z), c64(y)
    bad = z.clone()
    bad[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="z: contains NaN"):
        mbdl_fast.prox_l2(phys, bad, y, 0.5, backend=backend)
    with pytest.raises(ValueError, match="y: contains"):
        mbdl_fast.prox_l2(phys, z, y * float("inf"), 0.5, backend=backend)
    with pytest.raises(ValueError, match="y: expected measurements, got None"):
        mbdl_fast.prox_l2(phys, z, None, 0.5, backend=backend)
    with pytest.raises(TypeError, match="z: expected complex .*real-packed"):
        mbdl_fast.prox_l2(phys, torch.randn(2, 2, 8, 6, device=device), y, 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"y: expected k-space \(2, \d, 8, 6\) to match the image"):
        mbdl_fast.prox_l2(phys, z, y[:, :, :, :5], 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"gamma: expected a scalar or shape \(2,\)|gamma: expected a real scalar"):
        mbdl_fast.prox_l2(phys, z, y, torch.ones(3, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"gamma: expected >= 0 .*got min -0.5"):
        mbdl_fast.prox_l2(phys, z, y, torch.tensor([0.5, -0.5], device=device), backend=backend)
    with pytest.raises(ValueError, match=r"gamma: expected a finite real >= 0 .*got -1.0"):
        mbdl_fast.prox_l2(phys, z, y, -1.0, backend=backend)
    with pytest.raises(ValueError, match=r"gamma: expected a finite real >= 0 .*got nan"):
        mbdl_fast.prox_l2(phys, z, y, float("nan"), backend=backend)
    with pytest.raises(ValueError, match="gamma: contains NaN"):
        mbdl_fast.prox_l2(phys, z, y, torch.tensor([0.5, float("nan")], device=device), backend=backend)


def test_fused_backend_refuses_what_it_cannot_run(device):
    if "triton" not in fused_backends(device):
        pytest.skip(backends(device)["triton"].reason)
    phys, phys64, z, y = make_problem(8, 6, None, "columns", device)
    with pytest.raises(TypeError, match="z: backend 'triton' expects complex64"):
        mbdl_fast.prox_l2(phys64, z, y, 0.5, backend="triton")
    with pytest.raises(TypeError, match="y: backend 'triton' expects complex64"):
        mbdl_fast.prox_l2(phys, c64(z), y, 0.5, backend="triton")
    maps = torch.ones(1, 2, 8, 6, dtype=torch.complex64, device=device, requires_grad=True)
    learned = MultiCoilMRI(phys.mask, maps)
    y2 = c64(torch.cat([y, y], dim=1))
    with pytest.raises(ValueError, match="coil_maps: backend 'triton' does not differentiate the operator"):
        mbdl_fast.prox_l2(learned, c64(z), y2, 0.5, backend="triton")


# ------------------------------------------------------------------------------------------------
# The CUDA k-space kernel: exported and validated on any machine, run on a GPU
# ------------------------------------------------------------------------------------------------
def _raw_prox_args(**changes):
    args = dict(z_ptr=16, mask_ptr=32, y_ptr=48, gamma_ptr=64, B=2, H=8, W=6, mask_stride_b=0, mask_stride_h=0)
    args.update(mask_stride_w=1, z_scale=1 / 48, y_scale=48**-0.5, stream=0)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"z_ptr": 0}, "z_ptr"),
        ({"mask_ptr": 0}, "mask_ptr"),
        ({"gamma_ptr": 0}, "gamma_ptr"),
        ({"B": 0}, "B"),
        ({"H": -1}, "H"),
        ({"W": 0}, "W"),
        ({"H": 1 << 16, "W": 1 << 16}, "H, W"),
        ({"mask_stride_b": -1}, "mask_stride_b"),
        ({"mask_stride_h": -6}, "mask_stride_h"),
        ({"mask_stride_w": -1}, "mask_stride_w"),
    ],
)
def test_extension_exports_kspace_prox_update_and_names_bad_arguments(changes, name):
    ext = load_extension()
    assert callable(ext.kspace_prox_update)
    with pytest.raises(ValueError, match=f"^{name}: "):
        ext.kspace_prox_update(**_raw_prox_args(**changes))


def test_kspace_prox_launch_without_device_raises_naming_the_call():
    ext = load_extension()
    if ext.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present: a launch on bogus pointers would poison its context")
    with pytest.raises(RuntimeError, match=r"^cudaLaunchKernel\(kspace_prox_update\) failed: cudaError"):
        ext.kspace_prox_update(**_raw_prox_args())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: a.update(z_k=a["z_k"].to(torch.complex128)), r"z_k: expected contiguous complex64 \(B, H, W\)"),
        (lambda a: a.update(z_k=a["z_k"].transpose(1, 2)), r"z_k: expected contiguous"),
        (lambda a: a.update(mask=a["mask"].double()), r"mask: expected float32 \(B or 1, 1, H or 1, W or 1\)"),
        (lambda a: a.update(mask=torch.ones(1, 1, 7, 6)), r"mask: .* got float32 \(1, 1, 7, 6\)"),
        (
            lambda a: a.update(y=a["y"][:, :, :7].contiguous()),
            r"y: expected None or contiguous complex64 \(2, 1, 8, 6\)",
        ),
        (lambda a: a.update(gamma=torch.ones(3)), r"gamma: expected contiguous float32 \(2,\)"),
        (lambda a: a.update(gamma=torch.ones(2, dtype=torch.float64)), r"gamma: .* got float64"),
        (lambda a: None, r"z_k: expected contiguous complex64 \(B, H, W\) on cuda, got complex64 \(2, 8, 6\) on cpu"),
    ],
)
def test_kspace_prox_wrapper_names_bad_arguments(mutate, message):
    args = dict(
        z_k=torch.zeros(2, 8, 6, dtype=torch.complex64),
        mask=torch.ones(1, 1, 1, 6),
        y=torch.zeros(2, 1, 8, 6, dtype=torch.complex64),
        gamma=torch.ones(2),
    )
    mutate(args)
    with pytest.raises(ValueError, match=f"^{message}"):
        kspace_prox_update_cuda(**args)


def _poison_allocator(numel: int) -> None:
    blocks = [torch.full((numel,), float("nan"), dtype=torch.complex64, device="cuda") for _ in range(4)]
    del blocks


GPU_SINGLE = [(1, 256, 256, "columns"), (8, 320, 320, "weighted"), (3, 255, 257, "per_sample"), (2, 368, 640, "rows")]


@needs_gpu
@pytest.mark.parametrize("case", GPU_SINGLE, ids=str)
@pytest.mark.parametrize("with_y", [True, False])
def test_cuda_kspace_kernel_matches_reference(case, with_y):
    b, h, w, mask_kind = case
    _, phys64, z, y = make_problem(h, w, None, mask_kind, "cuda", batch=b, seed=h + w)
    mask = phys64.mask
    gamma = (0.3 + torch.rand(b, generator=torch.Generator().manual_seed(b))).cuda()
    z_k = torch.fft.fft2(z)
    want = kspace_prox_update_ref(z_k, mask, y if with_y else None, gamma.double())
    got = c64(z_k).contiguous()
    kspace_prox_update_cuda(got, mask, c64(y).contiguous() if with_y else None, gamma)
    torch.cuda.synchronize()
    assert rel_err(got.to(torch.complex128), want) < TOL


@needs_gpu
@pytest.mark.parametrize("case", GPU_SINGLE, ids=str)
def test_cuda_single_coil_prox_forward_and_backward(case):
    b, h, w, mask_kind = case
    phys, phys64, z0, y0 = make_problem(h, w, None, mask_kind, "cuda", batch=b, seed=h * w + b)
    gamma0 = (0.3 + torch.rand(b, generator=torch.Generator().manual_seed(b))).cuda()
    weight = torch.randn(z0.shape, dtype=torch.complex128, generator=torch.Generator().manual_seed(3)).cuda()
    results = {}
    for backend in ("torch64", "cuda", "triton"):
        dtype = torch.complex128 if backend == "torch64" else torch.complex64
        z = z0.to(dtype).detach().clone().requires_grad_()
        y = y0.to(dtype).detach().clone().requires_grad_()
        gamma = gamma0.to(z.real.dtype).detach().clone().requires_grad_()
        if backend == "torch64":
            out = phys64.prox_l2(z, y, gamma, backend="torch")
        else:
            _poison_allocator(2 * b * h * w)
            out = mbdl_fast.prox_l2(phys, z, y, gamma, backend=backend)
        loss = (out * weight.to(dtype).conj()).real.sum()
        results[backend] = [t.to(torch.complex128) for t in (out.detach(), *torch.autograd.grad(loss, (z, y, gamma)))]
    for backend in ("cuda", "triton"):
        for name, ours, ref in zip(("out", "dz", "dy", "dgamma"), results[backend], results["torch64"], strict=True):
            assert rel_err(ours, ref) < 10 * TOL, (backend, name)


@needs_gpu
@pytest.mark.parametrize("case", [(8, 15, 320, 320, "columns"), (2, 3, 255, 257, "weighted"), (3, 4, 368, 640, "rows")])
def test_cuda_multi_coil_prox_matches_reference(case):
    b, c, h, w, mask_kind = case
    phys, phys64, z, y = make_problem(h, w, c, mask_kind, "cuda", batch=b, seed=b + c)
    gamma = (0.3 + torch.rand(b, generator=torch.Generator().manual_seed(c))).cuda()
    ref = phys64.prox_l2_reference(z, y, gamma.double())
    for backend in ("torch", "triton", "cuda"):
        out = mbdl_fast.prox_l2(phys, c64(z), c64(y), gamma, backend=backend)
        assert rel_err(out.to(torch.complex128), ref) < CG_TOL, backend
        assert bool(phys.last_prox_info["converged"].all()), backend


@needs_gpu
def test_cuda_prox_op_opcheck_and_compile():
    phys, phys64, z, y = make_problem(16, 12, None, "columns", "cuda")
    gamma = torch.tensor([0.5, 0.8], device="cuda")
    for y_arg in (c64(y), None):
        args = (c64(z).requires_grad_(), phys.mask, y_arg, gamma.clone().requires_grad_(), "cuda")
        torch.library.opcheck(torch.ops.mbdl_fast.mri_prox_l2.default, args)

    def prox(z, y):
        return mbdl_fast.prox_l2(phys, z, y, 0.5, backend="cuda", check_inputs=False) * 2

    compiled = torch.compile(prox, fullgraph=True)
    assert rel_err(compiled(c64(z), c64(y)).to(torch.complex128), 2 * phys64.prox_l2_reference(z, y, 0.5)) < TOL


# ------------------------------------------------------------------------------------------------
# The op on plain tensors, every backend of the table against its reference
# ------------------------------------------------------------------------------------------------
# (H, W, mask kind, y given): even and odd sizes, column / 2-D / per-sample masks, y = 0.
OP_CASES = [
    (16, 12, "columns", True),
    (15, 9, "weighted", True),
    (9, 14, "per_sample", True),
    (12, 10, "columns", False),
]


@pytest.mark.parametrize("backend", supported_backends("mri_prox_l2"))
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: "-".join(map(str, c)))
def test_every_backend_matches_the_ref(backend, case, device):
    require_backend("mri_prox_l2", backend, device)
    h, w, mask_kind, with_y = case
    phys, _, z, y = make_problem(h, w, None, mask_kind, device, seed=10 + OP_CASES.index(case))
    mask = phys.mask_for(c64(z))
    y_arg = c64(y) if with_y else None
    gamma = torch.tensor([0.4, 1.7], device=device)
    out = mri_prox_l2_op(c64(z), mask, y_arg, gamma, backend)
    ref = mri_prox_l2_ref(z, mask.double(), y if with_y else None, gamma.double())
    assert out.dtype == torch.complex64 and out.shape == z.shape
    assert rel_err(out.to(torch.complex128), ref) < 2e-5
