"""Property-based tests of the argument checks of every public entry point (hypothesis).

Each test starts from a valid call at a tiny size, lets hypothesis corrupt one argument, and asserts one of two
outcomes, never a third:

- a ``ValueError`` / ``TypeError`` whose message starts with ``name:`` for an argument of the call and names the
  corrupted argument (a refusal that says what was expected and what came);
- a result equal to the reference, for corruptions that keep the call meaningful (a float64 copy, a non-contiguous
  view, a numpy scalar, an image with its channel axis): the reference is computed independently, in float64,
  from the uncorrupted call.

Categories of corruption: wrong dtypes, shapes that would broadcast (a batch of 1, an extra or a missing axis, a
shortened axis), NaN and Inf, empty (zero-size) tensors, non-tensors, and bad scalars (NaN, Inf, negative, zero,
too large, bool, str, None, complex). ``MBDL_FAST_VALIDATION_REPORT=path`` writes the count of generated cases per
entry point, category and outcome as JSON.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mbdl_fast
from mbdl_fast.checkpoint import load_model, save_model
from mbdl_fast.data import birdcage_coil_maps, load_brain_slices, simulate_multicoil, smooth_phase
from mbdl_fast.metrics import nmse, psnr, ssim
from mbdl_fast.physics import BlockCS, MultiCoilMRI, SuperResolution, masks
from mbdl_fast.priors import EDSR, denoise
from mbdl_fast.solvers import DEQ, DeepUnfolding, anderson_solve
from mbdl_fast.tasks import TrainConfig

SETTINGS = settings(
    max_examples=int(os.environ.get("MBDL_FAST_VALIDATION_EXAMPLES", "200")),
    deadline=None,
    derandomize=True,  # the same cases on every run: CI stays reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
COUNTS: Counter = Counter()
B, C, H, W = 2, 3, 8, 6
TOL = {torch.complex64: 2e-5, torch.float32: 2e-5, torch.complex128: 1e-10, torch.float64: 1e-10}
SINGLE = TOL[torch.float32]  # problems built in single precision stay that precise when one input is upcast


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    path = os.environ.get("MBDL_FAST_VALIDATION_REPORT")
    if path:
        rows = [{"entry": e, "category": c, "outcome": o, "cases": n} for (e, c, o), n in sorted(COUNTS.items())]
        total = sum(COUNTS.values())
        Path = __import__("pathlib").Path
        Path(path).write_text(json.dumps({"total": total, "rows": rows}, indent=1))


# ------------------------------------------------------------------------------------------------
# Corruptions
# ------------------------------------------------------------------------------------------------
@dataclass
class Corruption:
    category: str
    value: Any
    benign: bool  # the call keeps a meaning: a refusal or the reference result, nothing else


TENSOR_KINDS = ("nan", "inf", "dtype", "empty", "batch1", "lead", "drop", "trail", "short", "list", "noncontig")
SHAPE_NAMES = {
    "batch1": "shape: batch 1",
    "lead": "shape: extra leading axis",
    "drop": "shape: axis 0 dropped",
    "trail": "shape: extra trailing axis",
    "short": "shape: axis shortened",
}
DTYPES = (torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128, torch.int64, torch.bool)


def corrupt_tensor(t: torch.Tensor, data, benign_shapes=(), kinds=TENSOR_KINDS) -> Corruption:
    """One corruption of ``t``. A dtype change that keeps every value exactly (an upcast, a 0/1 mask in float16,
    a real tensor as complex) is benign; so are the shape changes in ``benign_shapes`` (a valid other input)."""
    usable = [k for k in kinds if not (k == "batch1" and t.shape[0] == 1) and not (k == "drop" and t.dim() < 2)]
    kind = data.draw(st.sampled_from(usable))
    if kind in ("nan", "inf"):
        bad = t.clone()
        value = float("nan") if kind == "nan" else data.draw(st.sampled_from([math.inf, -math.inf]))
        flat = data.draw(st.sampled_from([0, t.numel() // 2, t.numel() - 1]))  # first, middle or last element
        where = np.unravel_index(flat, tuple(t.shape))
        if bad.is_complex():
            getattr(bad, data.draw(st.sampled_from(["real", "imag"])))[where] = value
        else:
            bad[where] = value
        return Corruption(kind, bad, False)
    if kind == "dtype":
        dtype = data.draw(st.sampled_from([d for d in DTYPES if d != t.dtype]))
        value = t.real.to(dtype) if t.is_complex() and not dtype.is_complex else t.to(dtype)
        exact = value.to(t.dtype) if not (value.is_complex() and not t.is_complex()) else value.real.to(t.dtype)
        keeps = bool(torch.equal(exact, t)) and (not t.is_complex() or value.is_complex())
        kept_kind = value.is_floating_point() or value.is_complex()
        return Corruption(f"dtype {str(dtype).replace('torch.', '')}", value, keeps and kept_kind)
    if kind == "empty":
        dim = data.draw(st.integers(0, t.dim() - 1))
        return Corruption("empty", t.narrow(dim, 0, 0), False)
    if kind == "short":
        dim = data.draw(st.integers(max(0, t.dim() - 2), t.dim() - 1))
        value = t.narrow(dim, 0, t.shape[dim] - 1).clone() if t.shape[dim] > 1 else t.narrow(dim, 0, 0)
        return Corruption(SHAPE_NAMES[kind], value, kind in benign_shapes and value.numel() > 0)
    if kind in SHAPE_NAMES:
        value = {"batch1": lambda: t[:1], "lead": lambda: t[None], "drop": lambda: t[0], "trail": lambda: t[..., None]}
        return Corruption(SHAPE_NAMES[kind], value[kind]().clone(), kind in benign_shapes)
    if kind == "list":
        return Corruption("not a tensor", t.tolist() if data.draw(st.booleans()) else t.numpy(), False)
    view = t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t[::1]
    return Corruption("non-contiguous", view, True)


BAD_SCALARS = {
    "nan": float("nan"),
    "inf": math.inf,
    "-inf": -math.inf,
    "negative": -1.0,
    "zero": 0,
    "huge": 10**12,
    "fraction": 2.5,
    "bool": True,
    "str": "1",
    "None": None,
    "complex": complex(1, 1),
    "list": [1.0],
}


def scalar_corruption(data, default: Any, valid: set[str] = frozenset(), skip: set[str] = frozenset()) -> Corruption:
    """A scalar from BAD_SCALARS (minus ``skip``: valid values whose answer differs from the default's), or a
    numpy-typed ``default``. ``valid`` names the BAD_SCALARS the argument accepts with the same reference."""
    names = [n for n in BAD_SCALARS if n not in skip] + ["numpy"]
    if isinstance(default, int) and not isinstance(default, bool):
        names.append("int as float")
    name = data.draw(st.sampled_from(names))
    if name == "numpy":
        typed = np.int64(default) if isinstance(default, int) and not isinstance(default, bool) else np.float64(default)
        return Corruption("scalar: numpy type", typed, True)
    if name == "int as float":
        return Corruption("scalar: int as float", float(default), False)  # a count given as 3.0
    return Corruption(f"scalar: {name}", BAD_SCALARS[name], name in valid)


def plain(value: Any) -> Any:
    """numpy scalars as Python numbers (the reference call's arguments)."""
    return value.item() if isinstance(value, np.generic) else value


# ------------------------------------------------------------------------------------------------
# The one check
# ------------------------------------------------------------------------------------------------
def check(
    entry: str,
    call: Callable[[], Any],
    arg: str,
    names: set[str],
    corruption: Corruption,
    reference: Callable[[], Any] | None = None,
    tol: float | None = None,
):
    """A refusal naming ``arg`` (message ``name: ...`` with ``name`` an argument of the call, ``arg`` named in it),
    or, for a benign corruption only, the reference result within ``tol`` (default: by the result's dtype; NaN
    never passes). Counts the case."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = call()
        except (ValueError, TypeError) as err:
            message = str(err)
            first = re.match(r"([\w.]+): ", message)
            assert first and first.group(1) in names, f"{entry}: refusal names no argument: {message!r}"
            assert re.search(rf"\b{re.escape(arg)}\b", message), f"{entry}: refusal does not name {arg}: {message!r}"
            COUNTS[(entry, corruption.category, "refused")] += 1
            return
        assert corruption.benign, f"{entry}: accepted {arg} with {corruption.category}: a silent result"
        want = reference()
    got = out.reshape(want.shape) if isinstance(out, torch.Tensor) else out
    if isinstance(want, torch.Tensor):
        assert torch.isfinite(got).all(), f"{entry}: NaN/Inf result for {arg} with {corruption.category}"
        common = torch.complex128 if got.is_complex() or want.is_complex() else torch.float64
        rel = float((got.to(common) - want.to(common)).abs().norm() / want.abs().norm().clamp_min(1e-30))
        tol = TOL.get(got.dtype, 1e-3) if tol is None else tol
        assert rel < tol, f"{entry}: {arg} with {corruption.category}: relative error {rel:.2e} to the reference"
    else:
        assert got == want, f"{entry}: {arg} with {corruption.category}: {got!r} != {want!r}"
    COUNTS[(entry, corruption.category, "reference")] += 1


# ------------------------------------------------------------------------------------------------
# Independent references (float64)
# ------------------------------------------------------------------------------------------------
def fft2c(x):
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


def ifft2c(x):
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


def c128(t):
    return t.to(torch.complex128)


def mri_forward(mask, maps, x):
    return c128(mask).reshape(1, 1, 1, -1) * fft2c(c128(maps) * c128(x)[:, None])


def mri_adjoint(mask, maps, y):
    return (c128(maps).conj() * ifft2c(c128(mask).reshape(1, 1, 1, -1) * c128(y))).sum(1)


def mri_prox(mask, maps, z, y, gamma: float):
    """(I + g A^H A)^-1 (z + g A^H y) for one sample by a dense solve: the operator as an explicit matrix."""
    n = H * W
    basis = torch.eye(n, dtype=torch.complex128).reshape(n, H, W)
    many = maps.expand(n, -1, -1, -1)
    normal = mri_adjoint(mask, many, mri_forward(mask, many, basis)).reshape(n, n).T  # column j: A^H A e_j
    rhs = c128(z).reshape(n) + gamma * mri_adjoint(mask, maps, y).reshape(n)
    return torch.linalg.solve(torch.eye(n, dtype=torch.complex128) + gamma * normal, rhs).reshape(1, H, W)


def sr_forward(physics: SuperResolution, x):
    """Circular convolution with the kernel (tap by tap), then keep every s-th pixel: float64."""
    k = physics.kernel
    ci, cj = physics.kernel_center
    x = x.to(torch.float64)
    out = torch.zeros_like(x)
    for i in range(k.shape[0]):
        for j in range(k.shape[1]):
            out = out + k[i, j] * torch.roll(x, shifts=(i - ci, j - cj), dims=(-2, -1))
    s = physics.factor
    return out[..., ::s, ::s]


def adjoint_of(forward, y, x_shape):
    """A^H y of a linear ``forward`` by a vector-Jacobian product at 0."""
    x = torch.zeros(x_shape, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(forward(x), x, y.to(torch.float64))
    return grad


def blockcs_forward(physics: BlockCS, x):
    b = physics.block
    phi = physics._phi64
    rows = []
    for i in range(x.shape[-2] // b):
        for j in range(x.shape[-1] // b):
            rows.append(x[:, 0, i * b : (i + 1) * b, j * b : (j + 1) * b].reshape(x.shape[0], -1).to(torch.float64))
    return torch.stack(rows, 1) @ phi.T


# ------------------------------------------------------------------------------------------------
# The tests: one per family of entry points
# ------------------------------------------------------------------------------------------------
def crandn(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(*shape, generator=g), torch.randn(*shape, generator=g))


@dataclass
class MRIProblem:
    """2 images 8 x 6 (H != W: a transposed mask cannot pass for a valid one), 3 coils, a column mask."""

    mask: torch.Tensor = field(default_factory=lambda: masks.random_mask(W, 2, 0.25, seed=0))
    maps: torch.Tensor = field(
        default_factory=lambda: birdcage_coil_maps(C, (H, W))[None].expand(B, -1, -1, -1).clone()
    )
    x: torch.Tensor = field(default_factory=lambda: crandn(B, H, W, seed=1))
    y: torch.Tensor = field(default_factory=lambda: crandn(B, C, H, W, seed=2))

    def physics(self, **kwargs):
        return MultiCoilMRI(self.mask, self.maps, **kwargs)


MRI_NAMES = {"x", "y", "z", "mask", "coil_maps", "gamma", "AHy", "cg_tol", "cg_max_iter", "physics"}


@SETTINGS
@given(st.data())
def test_mri_operator_and_its_constructor(data):
    p = MRIProblem()
    args = {"mask": p.mask, "coil_maps": p.maps, "cg_tol": 1e-6, "cg_max_iter": 50, "x": p.x, "y": p.y}
    arg = data.draw(st.sampled_from(sorted(args)))
    if arg == "cg_tol":
        corruption = scalar_corruption(data, 1e-6, valid={"zero", "huge", "fraction"})  # A does not use it
    elif arg == "cg_max_iter":
        corruption = scalar_corruption(data, 50)
    else:
        # a shared (1, W) mask may come with more leading ones or as (W,); the maps are equal across the batch
        benign = {"mask": ("lead", "drop"), "coil_maps": ("batch1",)}.get(arg, ())
        corruption = corrupt_tensor(args[arg], data, benign_shapes=benign)
    args[arg] = corruption.value
    op = "A_adjoint" if arg == "y" else "A"

    def call():
        physics = MultiCoilMRI(args["mask"], args["coil_maps"], cg_tol=args["cg_tol"], cg_max_iter=args["cg_max_iter"])
        return physics.A(args["x"]) if op == "A" else physics.A_adjoint(args["y"])

    def reference():
        return mri_forward(p.mask, p.maps, p.x) if op == "A" else mri_adjoint(p.mask, p.maps, p.y)

    check(f"MultiCoilMRI.{op}", call, arg, MRI_NAMES, corruption, reference, tol=SINGLE)


def gamma_corruption(data, batch: int, default: float, skip=frozenset({"huge", "fraction"})) -> Corruption:
    """A step size: a bad scalar, or a (B,) tensor with a bad value, dtype or shape (valid dtypes are benign)."""
    if data.draw(st.booleans()):
        return scalar_corruption(data, default, valid={"zero"}, skip=skip)
    base = torch.full((batch,), default)
    corruption = corrupt_tensor(base, data, kinds=("nan", "inf", "dtype", "lead", "short", "list", "empty"))
    if corruption.category in ("dtype float16", "dtype float64"):
        corruption.benign = True  # the reference uses the step as given
    return corruption


def as_step(gamma, dims: int):
    return gamma.to(torch.float64).reshape((-1,) + (1,) * dims) if isinstance(gamma, torch.Tensor) else float(gamma)


@SETTINGS
@given(st.data(), st.sampled_from(["torch", "auto"]), st.booleans())
def test_dc_step(data, backend, with_ahy):
    p = MRIProblem()
    physics = p.physics()
    args = {"x": p.x, "y": None if with_ahy else p.y, "gamma": 0.7, "AHy": physics.A_adjoint(p.y) if with_ahy else None}
    arg = data.draw(st.sampled_from(["x", "gamma", "AHy" if with_ahy else "y"]))
    corruption = gamma_corruption(data, B, 0.7) if arg == "gamma" else corrupt_tensor(args[arg], data)
    args[arg] = corruption.value

    def call():
        return mbdl_fast.dc_step(physics, args["x"], args["y"], args["gamma"], backend=backend, AHy=args["AHy"])

    def reference():
        normal = mri_adjoint(p.mask, p.maps, mri_forward(p.mask, p.maps, p.x))
        return c128(p.x) - as_step(args["gamma"], 2) * (normal - mri_adjoint(p.mask, p.maps, p.y))

    check("dc_step (MRI)", call, arg, MRI_NAMES, corruption, reference, tol=SINGLE)


@SETTINGS
@given(st.data())
def test_prox_l2(data):
    p = MRIProblem()
    physics = p.physics(cg_tol=1e-12, cg_max_iter=200)
    args = {"z": p.x, "y": p.y, "gamma": 0.5}
    arg = data.draw(st.sampled_from(sorted(args)))
    corruption = gamma_corruption(data, B, 0.5) if arg == "gamma" else corrupt_tensor(args[arg], data)
    args[arg] = corruption.value

    def reference():
        g = args["gamma"]
        steps = g.tolist() if isinstance(g, torch.Tensor) and g.dim() == 1 else [float(g)] * B
        return torch.cat([mri_prox(p.mask, p.maps[b : b + 1], p.x[b : b + 1], p.y[b : b + 1], steps[b])
                          for b in range(B)])  # fmt: skip

    check("prox_l2 (MRI, CG)", lambda: mbdl_fast.prox_l2(physics, args["z"], args["y"], args["gamma"]), arg,
          MRI_NAMES, corruption, reference, tol=SINGLE)  # fmt: skip


@SETTINGS
@given(st.data(), st.sampled_from(["SuperResolution", "BlockCS"]), st.sampled_from(["A", "dc_step"]))
def test_super_resolution_and_block_cs(data, operator, op):
    g = torch.Generator().manual_seed(3)
    physics = SuperResolution("box", 2) if operator == "SuperResolution" else BlockCS(0.5, block=4, img_size=(8, 8))
    forward = (
        (lambda t: sr_forward(physics, t)) if operator == "SuperResolution" else (lambda t: blockcs_forward(physics, t))
    )
    x, ahy = torch.randn(B, 1, 8, 8, generator=g), torch.randn(B, 1, 8, 8, generator=g)
    args = {"x": x, "AHy": ahy, "gamma": 0.5}
    arg = data.draw(st.sampled_from(["x", "AHy", "gamma"] if op == "dc_step" else ["x"]))
    if arg == "gamma":
        corruption = gamma_corruption(data, B, 0.5, skip=frozenset())
        if corruption.category in ("scalar: huge", "scalar: fraction"):
            corruption.benign = True  # a large step is still a step: the reference takes it
    else:
        # A alone takes any valid batch of images: (B, C, H, W) real for SR (or (B, H, W)), (B, 1, H, W) for block CS
        benign = {"SuperResolution": ("batch1", "drop"), "BlockCS": ("batch1",)}[operator] if op == "A" else ()
        corruption = corrupt_tensor(args[arg], data, benign_shapes=benign)
    args[arg] = corruption.value

    def call():
        if op == "A":
            return physics.A(args["x"])
        return mbdl_fast.dc_step(physics, args["x"], None, args["gamma"], AHy=args["AHy"])

    def reference():
        if op == "A":
            value = args["x"]
            return forward(value.real if value.is_complex() else value)
        normal = adjoint_of(forward, forward(x), x.shape)
        return x.double() - as_step(args["gamma"], 3) * (normal - ahy.double())

    check(f"{operator}.{op}", call, arg, {"x", "y", "gamma", "AHy", "physics"}, corruption, reference, tol=SINGLE)


@SETTINGS
@given(st.data(), st.booleans())
def test_priors_and_denoise(data, complex_input):
    torch.manual_seed(0)
    prior = EDSR(width=4, num_blocks=1).eval()
    x = (
        crandn(B, H, W, seed=5)
        if complex_input
        else torch.randn(B, 2, H, W, generator=torch.Generator().manual_seed(5))
    )
    # Another batch or a smaller image is a valid input of a CNN.
    corruption = corrupt_tensor(x, data, benign_shapes=("batch1", "short"))
    if corruption.category.startswith("dtype"):
        corruption.benign = False  # another dtype than the weights' is refused, naming x

    def call():
        with torch.no_grad():
            return denoise(prior, corruption.value) if complex_input else prior(corruption.value)

    def reference():
        value = corruption.value.contiguous()
        with torch.no_grad():
            return denoise(prior, value) if complex_input else prior(value)

    check("denoise" if complex_input else "EDSR.forward", call, "x", {"x", "prior"}, corruption, reference)


@SETTINGS
@given(st.data(), st.sampled_from(["psnr", "ssim", "nmse"]))
def test_metrics(data, metric):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    g = torch.Generator().manual_seed(6)
    target = torch.rand(B, 12, 12, generator=g) + 0.1
    args = {"x": target + 0.05 * torch.randn(B, 12, 12, generator=g), "target": target, "data_range": None}
    arg = data.draw(st.sampled_from(["x", "target"] + (["data_range"] if metric != "nmse" else [])))
    if arg == "data_range":
        corruption = scalar_corruption(data, 1.0, valid={"huge", "fraction", "None"})
    else:
        corruption = corrupt_tensor(args[arg], data)
        if corruption.category in ("dtype float16", "dtype complex64", "dtype complex128"):
            corruption.benign = True  # a float image as it is, a complex one by its magnitude: the reference does both
    args[arg] = corruption.value
    fn = {"psnr": psnr, "ssim": ssim, "nmse": nmse}[metric]

    def call():
        kwargs = {} if metric == "nmse" else {"data_range": args["data_range"]}
        return fn(args["x"], args["target"], reduction="none", **kwargs)

    def reference():
        out = []
        for b in range(B):
            t, r = (args[k][b].abs().double().numpy() for k in ("target", "x"))
            rng = t.max() if args["data_range"] is None else float(args["data_range"])
            if metric == "psnr":
                out.append(peak_signal_noise_ratio(t, r, data_range=rng))
            elif metric == "ssim":
                out.append(structural_similarity(t, r, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                                  data_range=rng))  # fmt: skip
            else:
                out.append(((t - r) ** 2).sum() / (t**2).sum())
        return torch.tensor(out, dtype=torch.float64)

    check(metric, call, arg, {"x", "target", "data_range", "reduction"}, corruption, reference)


@SETTINGS
@given(st.data())
def test_fixed_point_solvers(data):
    b = torch.randn(B, 6, generator=torch.Generator().manual_seed(7))
    args = {"z0": torch.zeros(B, 6), "tol": 1e-6, "max_iter": 50, "m": 3, "lam": 1e-4, "beta": 1.0}
    arg = data.draw(st.sampled_from(sorted(args)))
    if arg == "z0":
        corruption = corrupt_tensor(args["z0"], data, kinds=("nan", "inf", "empty", "list", "dtype", "noncontig"))
    else:
        # huge / fractional tolerances, histories and mixings are valid settings with other answers
        skip = {"tol": {"huge", "fraction"}, "lam": {"huge", "fraction"}, "beta": {"huge", "fraction"}}.get(arg, set())
        corruption = scalar_corruption(data, args[arg], valid={"zero"} if arg == "lam" else set(), skip=skip)
    args[arg] = corruption.value

    def call():
        return anderson_solve(lambda z: 0.5 * z + b.to(z.dtype), **args)[0]

    # converged to tol = 1e-6 (relative): the fixed point 2 b to about that
    check("anderson_solve", call, arg, set(args) | {"f"}, corruption, lambda: 2 * b.double(), tol=1e-5)


@SETTINGS
@given(st.data(), st.sampled_from(["DEQ", "DeepUnfolding"]))
def test_deq_and_unfolding(data, which):
    p = MRIProblem()
    physics = p.physics()
    if which == "DEQ":
        args = {"alpha": 0.5, "gamma": 1.0, "f_max_iter": 3, "f_tol": 1e-3, "anderson_m": 2}
    else:
        args = {"num_iters": 2, "gamma_init": 1.0}
    arg = data.draw(st.sampled_from([*sorted(args), "y"]))
    if arg == "y":
        corruption = corrupt_tensor(p.y, data)
    else:
        skip = {"huge", "fraction"} if arg in ("gamma", "f_tol", "gamma_init") else set()
        corruption = scalar_corruption(data, args[arg], skip=skip)
        args[arg] = corruption.value

    def build(values):
        torch.manual_seed(0)
        prior = EDSR(width=4, num_blocks=1)
        return DEQ(prior, **values) if which == "DEQ" else DeepUnfolding(prior, **values)

    def call():
        with torch.no_grad():
            return build(args)(corruption.value if arg == "y" else p.y, physics)

    def reference():
        with torch.no_grad():
            return build({k: plain(v) for k, v in args.items()})(p.y, physics)

    # y is checked against the operator's coil maps and mask: their names may lead the refusal
    check(which, call, arg, set(args) | {"y", "physics", "x0", "prior", "coil_maps", "mask"}, corruption, reference)


MASK_FUNCTIONS = {
    "random_mask": (masks.random_mask, {"num_cols": 16, "acceleration": 4, "center_fraction": 0.08, "seed": 0}),
    "equispaced_mask": (masks.equispaced_mask, {"num_cols": 16, "acceleration": 4, "center_fraction": 0.08, "seed": 0}),
    "uniform_acs_mask": (masks.uniform_acs_mask, {"num_cols": 16, "acceleration": 4}),
    "variable_density_mask": (masks.variable_density_mask,
                              {"shape": (16, 16), "acceleration": 4, "center_fraction": 0.08, "decay": 2.0, "seed": 0}),
}  # fmt: skip
BAD_SHAPES = [(16,), (16, 0), (16, -4), (16.0, 16), "16", None, (16, 16, 1), (16, 10**9)]


@SETTINGS
@given(st.data(), st.sampled_from(sorted(MASK_FUNCTIONS)))
def test_masks(data, name):
    fn, defaults = MASK_FUNCTIONS[name]
    arg = data.draw(st.sampled_from(sorted(defaults)))
    args = dict(defaults)
    if arg == "shape":
        bad = data.draw(st.sampled_from(BAD_SHAPES))
        corruption = Corruption(f"shape {bad!r}", bad, False)
    else:
        valid = {"center_fraction": {"zero"}, "seed": {"zero", "huge"}, "decay": {"zero"}}.get(arg, set())
        if name in ("random_mask", "equispaced_mask") and arg in ("acceleration", "center_fraction"):
            valid = valid | {"list"}  # fastMRI's lists of accelerations and center fractions
        skip = {"acceleration": {"fraction"}, "decay": {"fraction", "huge"}, "seed": {"None"}}.get(arg, set())
        corruption = scalar_corruption(data, defaults[arg], valid=valid, skip=skip)
        if arg == "acceleration" and corruption.category == "scalar: int as float":
            corruption.benign = True  # an acceleration is a real number
    args[arg] = corruption.value

    def reference():
        return fn(**{k: plain(v) for k, v in args.items()}).double()

    check(name, lambda: fn(**args), arg, set(defaults), corruption, reference)


@SETTINGS
@given(st.data(), st.sampled_from(["simulate_multicoil", "birdcage_coil_maps", "smooth_phase", "load_brain_slices"]))
def test_data(data, name):
    images = load_brain_slices("test", size=16)[:2]
    table = {
        "simulate_multicoil": (lambda **a: simulate_multicoil(**a)["kspace"],
                               {"images": images, "num_coils": 2, "noise_std": 0.0, "seed": 0}),
        "birdcage_coil_maps": (birdcage_coil_maps, {"num_coils": 2, "shape": (8, 8), "radius": 1.5, "jitter": 0.1}),
        "smooth_phase": (smooth_phase, {"shape": (8, 8), "seed": 0, "max_phase": 1.0, "order": 2}),
        "load_brain_slices": (load_brain_slices, {"split": "test", "size": 16}),
    }  # fmt: skip
    fn, defaults = table[name]
    arg = data.draw(st.sampled_from(sorted(defaults)))
    args = dict(defaults)
    if arg == "images":
        # another batch, size or float dtype of real images is a valid input: the reference simulates it as given
        corruption = corrupt_tensor(images, data, benign_shapes=("batch1", "short"))
        corruption.benign = corruption.benign or corruption.category in ("dtype float16", "dtype float64")
    elif arg in ("shape", "split", "size"):
        pool = {"shape": BAD_SHAPES, "split": ["tests", 1, None], "size": [15, 0, -16, 16.0, "16", (16,), True]}[arg]
        bad = data.draw(st.sampled_from(pool))
        corruption = Corruption(f"{arg} {bad!r}", bad, False)
    else:
        # values in range give a different, valid answer: the reference is the same call with Python numbers
        valid = {"noise_std": {"zero", "huge", "fraction"}, "seed": {"zero", "huge"}, "max_phase": {"zero", "huge",
                 "fraction"}, "jitter": {"zero"}, "radius": {"huge", "fraction"}, "order": {"zero"}}.get(arg, set())  # fmt: skip
        corruption = scalar_corruption(data, defaults[arg], valid=valid, skip={"None"} if arg == "seed" else set())
    args[arg] = corruption.value

    def reference():
        out = fn(**{k: plain(v) for k, v in args.items()})
        return out.to(torch.complex128) if out.is_complex() else out.double()

    check(name, lambda: fn(**args), arg, set(defaults), corruption, reference)


TRAIN_FIELDS = {
    "size": ([15, 0, -2, 32.0, "32", None], "an even size"),
    "coils": ([0, -1, 2.5, "8", None], ""),
    "acceleration": ([0.5, math.nan, math.inf, "4", None], ""),
    "center_fraction": ([-0.1, 1.5, math.nan, None], ""),
    "noise_std": ([-0.1, math.nan, math.inf], ""),
    "epochs": ([0, -1, 2.5, "10", None], ""),
    "batch_size": ([0, -4, 1.5, None], ""),
    "lr": ([0, -1e-3, math.nan, math.inf, "1e-3", None], ""),
    "grad_clip": ([-1.0, math.nan, math.inf, "1"], ""),
    "seed": ([-1, 1.5, "0", None], ""),
    "denoise_sigma": ([-0.05, math.nan], ""),
    "cs_ratio": ([0, 1.5, math.nan], ""),
    "sr_factor": ([0, 1.5, "2"], ""),
    "max_train_items": ([0, -1, 2.5], ""),
    "device": (["cuda:7", "gpu", 3], ""),
    "model": (["resnet", "edsr"], ""),
    "task": (["ct", None], ""),
    "mask_type": (["radial", None], ""),
    "model_args": ([[], "x", None], ""),
    "resume": (["yes", 1], ""),
    "out": (["", None], ""),
}


@SETTINGS
@given(st.sampled_from(sorted(TRAIN_FIELDS)), st.data())
def test_train_config(name, data):
    bad = data.draw(st.sampled_from(TRAIN_FIELDS[name][0]))
    if name == "device" and bad == "cuda:7" and torch.cuda.device_count() > 7:
        return
    corruption = Corruption(f"{name} {bad!r}", bad, False)
    check("TrainConfig", lambda: TrainConfig.from_dict({name: bad}), name, set(TRAIN_FIELDS) | {"config"}, corruption)


CHECKPOINT_EDITS = {
    "format": ["mbdl_fast-training-state", None, 3],
    "version": [2, "1", None],
    "tensors": [{}, [], {"head.weight": [[1], "float32"]}, None],
    "aliases": [{"x": "missing"}, [1], "a"],
    "config": [None, {"class": "EDSR"}, {"class": "Nope", "args": {}}, {"class": "EDSR", "args": {"width": 10**6}},
               {"class": "EDSR", "args": {"num_blocks": 10**7}}, {"class": "EDSR", "args": {"width": 8}},
               {"class": "EDSR", "args": {"bogus": 1}}, "EDSR"],
    "sha256": ["0" * 64, None],
    "metadata": [{"note": "edited"}],  # benign: the weights are untouched
}  # fmt: skip


@SETTINGS
@given(key=st.sampled_from(sorted(CHECKPOINT_EDITS)), data=st.data())
def test_checkpoint_header_edits(tmp_path_factory, key, data):
    from mbdl_fast.checkpoint import CheckpointError

    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = EDSR(width=4, num_blocks=1)
    save_model(model, folder / "m")
    header = json.loads((folder / "m.json").read_text())
    value = data.draw(st.sampled_from(CHECKPOINT_EDITS[key]))
    if key == "config" and isinstance(value, dict) and "args" in value:
        value = {"class": value["class"], "args": {**header["config"]["args"], **value["args"]}}
        value["args"].pop("widths", None) if "width" in value["args"] or "num_blocks" in value["args"] else None
    header[key] = value
    (folder / "m.json").write_text(json.dumps(header))
    corruption = Corruption(f"header {key}", value, key == "metadata")
    try:
        loaded = load_model(folder / "m")
    except CheckpointError as err:
        assert str(err).startswith(str(folder)), f"the refusal names no file: {err}"
        COUNTS[("load_model", corruption.category, "refused")] += 1
        return
    assert corruption.benign, f"load_model accepted a header with {key} = {value!r}"
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    COUNTS[("load_model", corruption.category, "reference")] += 1
