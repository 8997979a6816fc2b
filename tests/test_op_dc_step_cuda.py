"""The ``cuda`` backend of the MRI DC step: Level 1 (cuFFT with LTO callbacks, csrc/dc_step/dc_step.cu) and Level 2
(cuFFTDx row/column passes, csrc/dc_step/dc_fftdx.cu): ``mbdl_fast.ops.dc_step.mri_dc_step_cuda`` and its level policy.

Everywhere: the extension imports and says why it cannot run here; each level was built where its headers were
available (cuFFT; cuFFTDx from nvidia-mathdx); the Level-2 lengths, plans and level choice; forcing Level 2 on sizes
without a path is a ValueError naming the lengths; every argument error names the argument. On a GPU (tests marked
``needs a CUDA device``): each level against the plain-PyTorch reference on fresh random data, outputs poisoned
first — Level 1 at the common sizes (256, 320, 368 x 640) and odd ones, Level 2 at every shipped length (256, 320,
368) — batch 1..8, coils 1..20, y given, A^H y given (one-axis transform) or neither; forward and backward through
``mbdl_fast.dc_step(..., backend="cuda")``; plans cached per stream; CUDA graphs and torch.compile around the op.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import load_extension, rel_err

import mbdl_fast
from mbdl_fast import cuda_extension
from mbdl_fast.backends import CUDA_LEVEL_ENV, backends, cuda_level
from mbdl_fast.cuda_extension import cuda_extension_status, level1_status, level2_sizes, level2_status
from mbdl_fast.ops.dc_step import cuda_dc_level, cuda_dc_level_runs, mri_dc_step_cuda
from mbdl_fast.physics.masks import random_mask, variable_density_mask
from mbdl_fast.physics.mri import MultiCoilMRI

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = 1e-5  # relative error, fp32


# ------------------------------------------------------------------------------------------------
# Any machine
# ------------------------------------------------------------------------------------------------
def test_level1_built_where_cufft_headers_were_found():
    ext = load_extension()
    built = ext.built_with()
    detail = built["level1_detail"]
    if built["level1"]:
        assert detail.startswith("built: cuFFT LTO callbacks")
        assert built["cufft_headers"] >= 12000 and built["lto_callbacks_bytes"] > 0
        assert built["lto_archs"]
    else:
        assert detail.startswith("not built: ")
        # The nvidia-cufft wheel importable here is what setup.py builds Level 1 with.
        assert not cuda_extension.cufft_library_candidates(), f"nvidia-cufft is installed, yet Level 1 was {detail}"


def _mathdx_wheel_installed() -> bool:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("nvidia")
    locations = (spec.submodule_search_locations or []) if spec is not None else []
    return any((Path(p) / "mathdx" / "include" / "cufftdx.hpp").is_file() for p in locations)


def test_level2_built_where_cufftdx_headers_were_found():
    ext = load_extension()
    built = ext.built_with()
    detail = built["level2_detail"]
    assert built["level2_sizes"] == [256, 320, 368]
    ok, why = level2_status()
    assert ok == built["level2"]
    if built["level2"]:
        assert detail.startswith("built: cuFFTDx ")
        assert built["level2_archs"] and all(a.split("-")[0].isdigit() for a in built["level2_archs"].split(","))
        assert why.endswith("lengths 256, 320, 368")
    else:
        assert detail.startswith("not built: ")
        # The nvidia-mathdx wheel importable here is what setup.py builds Level 2 with.
        assert not _mathdx_wheel_installed(), f"nvidia-mathdx is installed, yet Level 2 was {detail}"


def test_level2_sizes_and_plans():
    ext = load_extension()
    assert ext.dc_level2_sizes() == [256, 320, 368] and level2_sizes() == (256, 320, 368)
    plan = ext.dc_level2_plan(8, 15, 320, 320, True, True, 0, 50 << 20)  # 2-D on an H100's 50 MB of L2
    assert plan["supported"] and plan["batch_chunk"] == 1 and plan["workspace_bytes"] == 15 * 320 * 320 * 8
    kernels = [launch["kernel"] for launch in plan["launches"]]
    assert kernels == ["forward_rows", "residual_columns", "adjoint_rows"] * 8
    first = plan["launches"][0]
    assert (first["n"], first["grid"], first["block"], first["shared_bytes"]) == (320, (40, 15, 1), (8, 8, 1), 20480)
    plan = ext.dc_level2_plan(4, 20, 640, 368, False, True)  # fastMRI knee, A^H y, column mask: one fused pass
    assert plan["supported"] and plan["workspace_bytes"] == 0
    assert [(x["kernel"], x["n"], x["grid"]) for x in plan["launches"]] == [("fused_rows", 368, (80, 4, 1))]
    plan = ext.dc_level2_plan(1, 1, 640, 368, True, True)
    assert not plan["supported"] and plan["why_not"].startswith("H = 640 is not a Level-2 length")
    assert "256, 320, 368" in plan["why_not"]


def test_cuda_level_switch(monkeypatch):
    monkeypatch.delenv(CUDA_LEVEL_ENV, raising=False)
    assert cuda_level() == "auto" and cuda_level(2) == "2" and cuda_level(" 1 ") == "1"
    monkeypatch.setenv(CUDA_LEVEL_ENV, "2")
    assert cuda_level() == "2" and cuda_level("auto") == "auto"
    monkeypatch.setenv(CUDA_LEVEL_ENV, "3")
    with pytest.raises(ValueError, match=r"^MBDL_FAST_CUDA_LEVEL: expected one of auto, 1, 2, got '3'"):
        cuda_level()
    with pytest.raises(ValueError, match=r"^level: expected one of auto, 1, 2, got 'fast'"):
        cuda_level("fast")


def test_cuda_dc_level_choice(monkeypatch):
    load_extension()
    monkeypatch.delenv(CUDA_LEVEL_ENV, raising=False)
    built = level2_status()[0]
    assert cuda_dc_level(8, 15, 320, 320)[0] == (2 if built else 1)
    assert cuda_dc_level(2, 4, 368, 640, False, True)[0] == 1  # W = 640 transformed: no Level-2 length
    assert cuda_dc_level(2, 4, 640, 368, False, True)[0] == (2 if built else 1)  # H = 640 not transformed
    assert cuda_dc_level(8, 15, 320, 320, level=1) == (1, "Level 1 asked for (level=1)")
    assert cuda_dc_level(8, 15, 320, 320, callbacks=False)[0] == 1
    level, why = cuda_dc_level(1, 1, 255, 257)
    assert level == 1 and ("H = 255 and W = 257 are not" in why or not built)
    monkeypatch.setenv(CUDA_LEVEL_ENV, "1")
    assert cuda_dc_level(8, 15, 320, 320)[0] == 1


@pytest.mark.parametrize(
    ("size", "axes", "message"),
    [
        (
            (8, 6),
            (True, True),
            r"H, W: expected a Level-2 length \(256, 320, 368\) on every transformed axis for level=2, "
            r"got H = 8, W = 6; use level 1 or auto",
        ),
        ((640, 368), (True, True), r"H: expected a Level-2 length \(256, 320, 368\) .* got H = 640;"),
        ((368, 640), (False, True), r"W: expected a Level-2 length \(256, 320, 368\) .* got W = 640;"),
    ],
)
def test_forcing_level2_on_unsupported_sizes_raises(size, axes, message):
    load_extension()
    h, w = size
    x, maps, mask, y, gamma = _cpu_inputs(h=h, w=w)
    y = y if all(axes) else None
    with pytest.raises(ValueError, match=f"^{message}"):
        mri_dc_step_cuda(x, maps, mask, y, None, gamma, *axes, level=2)
    with pytest.raises(ValueError, match=f"^{message}"):
        cuda_dc_level(2, 3, h, w, *axes, level=2)


def test_forcing_level2_by_environment(monkeypatch):
    load_extension()
    monkeypatch.setenv(CUDA_LEVEL_ENV, "2")
    x, maps, mask, y, gamma = _cpu_inputs(h=8, w=6)
    with pytest.raises(ValueError, match=r"^H, W: expected a Level-2 length .* for MBDL_FAST_CUDA_LEVEL=2, got"):
        mri_dc_step_cuda(x, maps, mask, y, None, gamma)
    # Sizes with a Level-2 path pass that check; then a build with Level 2 reaches the device check (CPU tensors
    # here), and one without it (no nvidia-mathdx when it was built) says so.
    x, maps, mask, y, gamma = _cpu_inputs(h=5, w=256)
    if level2_status()[0]:
        with pytest.raises(ValueError, match=r"^x: expected contiguous complex64 \(B, H, W\) on cuda"):
            mri_dc_step_cuda(x, maps, mask, None, None, gamma, False, True)
    else:
        with pytest.raises(RuntimeError, match=r"^MBDL_FAST_CUDA_LEVEL=2: the Level-2 DC step is unavailable: "):
            mri_dc_step_cuda(x, maps, mask, None, None, gamma, False, True)
    # The answer of a build without Level 2, wherever this one has it.
    monkeypatch.setattr(
        cuda_extension, "level2_status", lambda: (False, "mbdl_fast._C was built without it (no headers)")
    )
    with pytest.raises(RuntimeError, match=r"^MBDL_FAST_CUDA_LEVEL=2: the Level-2 DC step is unavailable: .*built wi"):
        mri_dc_step_cuda(x, maps, mask, None, None, gamma, False, True)


def test_status_says_why_cuda_cannot_run_here():
    ok, reason = cuda_extension_status()
    assert isinstance(ok, bool) and reason
    level1_ok, level1_reason = level1_status()
    assert isinstance(level1_ok, bool) and level1_reason
    if level1_ok:
        assert level1_reason.startswith("cuFFT 12.")
    if not torch.cuda.is_available():
        assert not ok
        status = backends("cpu")["cuda"]
        assert not status.available and status.reason


def test_level1_status_never_raises(monkeypatch):
    def broken():
        raise OSError("libcufft.so.12: cannot open shared object file")

    monkeypatch.setattr(cuda_extension, "_load", broken)
    ok, reason = cuda_extension.level1_status.__wrapped__()
    assert not ok and "OSError" in reason


def test_geometry_from_python():
    ext = load_extension()
    g = ext.dc_geometry(8, 15, 320, 320, True, True)
    assert (g["layout"], g["rank"], g["n"], g["batch"], g["separate_v"]) == (0, 2, (320, 320), 120, False)
    assert g["z_scale"] == pytest.approx(1 / 320**2) and g["y_scale"] == pytest.approx(1 / 320)
    g = ext.dc_geometry(2, 3, 255, 257, True, True)
    assert (g["shift_h"], g["shift_w"], g["flip_h"], g["flip_w"], g["separate_v"]) == (127, 128, 0, 0, True)
    g = ext.dc_geometry(1, 4, 368, 640, False, True)
    assert (g["layout"], g["n"], g["batch"]) == (1, (640, 1), 4 * 368)
    with pytest.raises(ValueError, match="^transform_h, transform_w: "):
        ext.dc_geometry(1, 1, 8, 8, False, False)
    with pytest.raises(ValueError, match="^H: "):
        ext.dc_geometry(1, 1, 0, 8, True, True)


def _raw_args(**changes):
    args = dict(device=0, stream=0, x=16, coil=32, coil_batch_stride=3 * 8 * 6, mask=48, mask_sb=0, mask_sh=0)
    args.update(mask_sw=1, y=64, ahy=0, gamma=80, out=96, z=112, v=112, workspace=0, workspace_bytes=0)
    args.update(B=2, C=3, H=8, W=6, transform_h=True, transform_w=True)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"device": -1}, "device"),
        ({"x": 0}, "x"),
        ({"mask": 0}, "mask"),
        ({"gamma": 0}, "gamma"),
        ({"out": 0}, "out"),
        ({"z": 0}, "z"),
        ({"v": 0}, "v"),
        ({"coil": 0}, "coil_maps"),
        ({"coil_batch_stride": 5}, "coil_batch_stride"),
        ({"B": 0}, "B"),
        ({"C": -2}, "C"),
        ({"H": 0}, "H"),
        ({"W": 0}, "W"),
        ({"H": 1 << 16, "W": 1 << 16}, "H, W"),
        ({"transform_h": False}, "y"),
        ({"ahy": 128}, "y, ahy"),
        ({"mask_sh": -1}, "mask_sh"),
        ({"H": 7, "coil_batch_stride": 0}, "v"),  # odd H is rolled: V needs its own buffer
        ({"workspace_bytes": -1}, "workspace_bytes"),
        ({"workspace_bytes": 256}, "workspace"),
    ],
)
def test_raw_dc_step_names_bad_arguments(changes, name):
    ext = load_extension()
    with pytest.raises(ValueError, match=f"^{name}: "):
        ext.dc_step(**_raw_args(**changes))


def test_raw_dc_step_without_device_raises_naming_the_call():
    ext = load_extension()
    if ext.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present: a step on bogus pointers would poison its context")
    if not ext.built_with()["level1"]:
        with pytest.raises(RuntimeError, match="^the Level-1 DC step is not built: "):
            ext.dc_step(**_raw_args())
        return
    ok, why = level1_status()
    if not ok:
        pytest.skip(f"cuFFT cannot be loaded here: {why}")
    with pytest.raises(RuntimeError, match=r"^cudaSetDevice\(0\) failed: cudaError"):
        ext.dc_step(**_raw_args())


def _raw_level2_args(**changes):
    args = dict(device=0, stream=0, x=16, coil=32, coil_batch_stride=3 * 256 * 320, mask=48, mask_sb=0, mask_sh=0)
    args.update(mask_sw=1, y=64, ahy=0, gamma=80, out=96, workspace=112, workspace_bytes=3 * 256 * 320 * 8)
    args.update(B=2, C=3, H=256, W=320, transform_h=True, transform_w=True)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"device": -1}, "device"),
        ({"x": 0}, "x"),
        ({"mask": 0}, "mask"),
        ({"gamma": 0}, "gamma"),
        ({"out": 0}, "out"),
        ({"coil": 0}, "coil_maps"),
        ({"coil_batch_stride": 5}, "coil_batch_stride"),
        ({"B": 0}, "B"),
        ({"transform_h": False}, "y"),
        ({"ahy": 128}, "y, ahy"),
        ({"mask_sh": -1}, "mask_sh"),
        ({"workspace_bytes": 8}, "workspace_bytes"),
        ({"workspace": 0}, "workspace"),
        ({"H": 255, "coil_batch_stride": 0}, "H"),
        ({"W": 640, "coil_batch_stride": 0}, "W"),
        ({"H": 8, "W": 6, "coil_batch_stride": 0}, "H, W"),
    ],
)
def test_raw_level2_step_names_bad_arguments(changes, name):
    ext = load_extension()
    with pytest.raises(ValueError, match=f"^{name}: "):
        ext.dc_step_level2(**_raw_level2_args(**changes))


def test_raw_level2_step_without_device_raises_naming_the_call():
    ext = load_extension()
    if ext.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present: a step on bogus pointers would poison its context")
    if not ext.built_with()["level2"]:
        with pytest.raises(RuntimeError, match="^the Level-2 DC step is not built: "):
            ext.dc_step_level2(**_raw_level2_args())
        return
    with pytest.raises(RuntimeError, match=r"^cudaSetDevice\(0\) failed: cudaError"):
        ext.dc_step_level2(**_raw_level2_args())


def _cpu_inputs(b=2, c=3, h=8, w=6):
    x = torch.zeros(b, h, w, dtype=torch.complex64)
    maps = torch.zeros(b, c, h, w, dtype=torch.complex64)
    mask = torch.ones(1, 1, 1, w)
    y = torch.zeros(b, c, h, w, dtype=torch.complex64)
    gamma = torch.ones(b)
    return x, maps, mask, y, gamma


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: a.update(x=a["x"].to(torch.complex128)), r"x: expected contiguous complex64 \(B, H, W\) on cuda"),
        (lambda a: a.update(x=a["x"][None]), r"x: expected contiguous complex64 \(B, H, W\)"),
        (lambda a: a.update(x=a["x"].transpose(1, 2)), r"x: expected contiguous"),
        (lambda a: a.update(coil_maps=a["coil_maps"][..., :5]), r"coil_maps: expected None or contiguous complex64"),
        (lambda a: a.update(coil_maps=a["coil_maps"].real.contiguous()), r"coil_maps: .* got float32"),
        (lambda a: a.update(mask=a["mask"].double()), r"mask: expected float32 \(B or 1, 1, H or 1, W or 1\)"),
        (lambda a: a.update(mask=torch.ones(6)), r"mask: .* got float32 \(6,\) on cpu"),
        (lambda a: a.update(mask=torch.ones(1, 2, 8, 6)), r"mask: .* got float32 \(1, 2, 8, 6\)"),
        (lambda a: a.update(y=a["y"][:, :2]), r"y: expected None or contiguous complex64 \(2, 3, 8, 6\)"),
        (lambda a: a.update(transform_h=False), r"y: expected None with a one-axis transform"),
        (lambda a: a.update(ahy=a["x"].clone()), r"y, ahy: expected at most one"),
        (lambda a: a.update(y=None, ahy=a["x"][:1].clone()), r"ahy: expected None or contiguous complex64"),
        (lambda a: a.update(gamma=torch.ones(3)), r"gamma: expected contiguous float32 \(2,\)"),
        (lambda a: a.update(gamma=torch.ones(2, dtype=torch.float64)), r"gamma: .* got float64"),
        (lambda a: a.update(y=None, transform_h=False, transform_w=False), r"transform_h, transform_w: "),
        (lambda a: None, r"x: expected contiguous complex64 \(B, H, W\) on cuda, got complex64 \(2, 8, 6\) on cpu"),
    ],
)
def test_tensor_wrapper_names_bad_arguments(mutate, message):
    x, maps, mask, y, gamma = _cpu_inputs()
    args = dict(x=x, coil_maps=maps, mask=mask, y=y, ahy=None, gamma=gamma, transform_h=True, transform_w=True)
    mutate(args)
    with pytest.raises(ValueError, match=f"^{message}"):
        mri_dc_step_cuda(**args)


def test_dc_step_backend_cuda_on_cpu_says_why():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    phys = MultiCoilMRI(torch.ones(1, 6), torch.ones(1, 2, 8, 6, dtype=torch.complex64))
    x = torch.zeros(1, 8, 6, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="backend: 'cuda' is unavailable on cpu: "):
        mbdl_fast.dc_step(phys, x, phys.A(x), 0.5, backend="cuda")


# ------------------------------------------------------------------------------------------------
# On a GPU
# ------------------------------------------------------------------------------------------------
def _poison_allocator(numel: int) -> None:
    """Fill the caching allocator's next blocks with NaN, so that buffers the step allocates start poisoned."""
    blocks = [torch.full((numel,), float("nan"), dtype=torch.complex64, device="cuda") for _ in range(4)]
    del blocks


def _problem(b, c, h, w, mask_kind, seed, shared_maps=False):
    gen = torch.Generator().manual_seed(seed)
    if mask_kind == "columns":
        mask = random_mask(w, 4, 0.08, seed=seed)
    elif mask_kind == "rows":
        mask = random_mask(h, 4, 0.08, seed=seed).reshape(h, 1)
    elif mask_kind == "per_sample":
        mask = torch.stack([variable_density_mask((h, w), 3.0, seed=seed + i) for i in range(b)])[:, None]
    else:
        mask = variable_density_mask((h, w), 3.0, seed=seed)
    maps = None
    if c is not None:
        maps = torch.randn(1 if shared_maps else b, c, h, w, dtype=torch.complex64, generator=gen)
        maps = maps / maps.abs().pow(2).sum(1, keepdim=True).sqrt()
    x = torch.randn(b, h, w, dtype=torch.complex64, generator=gen)
    y = torch.randn(b, 1 if c is None else c, h, w, dtype=torch.complex64, generator=gen)
    phys = MultiCoilMRI(mask.cuda(), None if maps is None else maps.cuda())
    gamma = (0.3 + torch.rand(b, generator=gen)).cuda()
    return phys, x.cuda(), y.cuda(), gamma


GPU_CASES = [
    # (B, C, H, W, mask)   C None: single coil (no maps)
    (1, 1, 256, 256, "columns"),
    (1, None, 256, 256, "2d"),
    (8, 15, 320, 320, "columns"),
    (4, 20, 320, 320, "per_sample"),
    (2, 8, 640, 368, "columns"),
    (3, 4, 368, 640, "rows"),
    (2, 3, 255, 257, "2d"),
    (5, 2, 37, 53, "columns"),
    (6, 1, 321, 320, "rows"),
    (7, 5, 320, 255, "columns"),
    (8, 2, 33, 33, "per_sample"),
]


def _case_id(case):
    b, c, h, w, mask = case
    return f"{b}x{c}x{h}x{w}-{mask}"


@needs_gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
@pytest.mark.parametrize("mode", ["y", "ahy", "none"])
@pytest.mark.parametrize("callbacks", [True, False], ids=["callbacks", "kernels"])
def test_level1_matches_reference(case, mode, callbacks):
    assert level1_status()[0], level1_status()[1]
    b, c, h, w, mask_kind = case
    phys, x, y, gamma = _problem(b, c, h, w, mask_kind, seed=b * 1000 + h + w)
    coil_maps = phys.coil_maps
    th, tw = (True, True) if mode == "y" else (-2 in phys.transform_dims(h, w), -1 in phys.transform_dims(h, w))
    ahy = phys.A_adjoint(y) if mode == "ahy" else None
    if mode == "y":
        want = phys.dc_step_reference(x, y, gamma)
    else:
        normal = phys.A_adjoint_A(x)
        want = x - gamma.view(-1, 1, 1) * (normal - (ahy if ahy is not None else 0))
    _poison_allocator(2 * b * (c or 1) * h * w)
    got = mri_dc_step_cuda(x, coil_maps, phys.mask, y if mode == "y" else None, ahy, gamma, th, tw, callbacks, level=1)
    torch.cuda.synchronize()
    assert rel_err(got, want) < TOL


# Level 2: every shipped length on each transformed axis; an untransformed axis (A^H y, one-axis mask) may have any.
LEVEL2_CASES = [
    # (B, C, H, W, mask)   C None: single coil (no maps)
    (1, 1, 256, 256, "columns"),
    (1, None, 256, 256, "2d"),
    (8, 15, 320, 320, "columns"),
    (4, 20, 320, 320, "per_sample"),
    (3, 4, 368, 368, "rows"),
    (2, 8, 256, 368, "columns"),
    (5, 2, 368, 256, "rows"),
    (6, 1, 320, 256, "2d"),
    (8, 3, 368, 320, "per_sample"),
    (7, 5, 640, 368, "columns"),  # fastMRI knee: only the A^H y / no-y steps (W-only) have a Level-2 path
    (2, 3, 320, 77, "rows"),  # H-only, 77 columns: the last block of 8 lines is partly past the edge
]


def _level2_params():
    for case in LEVEL2_CASES:
        for mode in ("y", "ahy", "none"):
            if mode == "y" and not (case[2] in (256, 320, 368) and case[3] in (256, 320, 368)):
                continue  # y needs the 2-D transform, and this size has no 2-D Level-2 path
            yield pytest.param(case, mode, id=f"{_case_id(case)}-{mode}")


@needs_gpu
@pytest.mark.parametrize(("case", "mode"), list(_level2_params()))
def test_level2_matches_reference(case, mode):
    assert level2_status()[0], level2_status()[1]
    b, c, h, w, mask_kind = case
    phys, x, y, gamma = _problem(b, c, h, w, mask_kind, seed=b * 977 + h * 3 + w)
    th, tw = (True, True) if mode == "y" else (-2 in phys.transform_dims(h, w), -1 in phys.transform_dims(h, w))
    ahy = phys.A_adjoint(y) if mode == "ahy" else None
    if mode == "y":
        want = phys.dc_step_reference(x, y, gamma)
    else:
        want = x - gamma.view(-1, 1, 1) * (phys.A_adjoint_A(x) - (ahy if ahy is not None else 0))
    assert cuda_dc_level(b, c or 1, h, w, th, tw, x.device, level="auto")[0] == 2
    before = cuda_dc_level_runs().get(2, 0)
    _poison_allocator(2 * b * (c or 1) * h * w)
    got = mri_dc_step_cuda(x, phys.coil_maps, phys.mask, y if mode == "y" else None, ahy, gamma, th, tw, level=2)
    torch.cuda.synchronize()
    assert cuda_dc_level_runs().get(2, 0) == before + 1
    assert rel_err(got, want) < TOL


@needs_gpu
@pytest.mark.parametrize("use_ahy", [False, True])
def test_level2_shared_coil_maps(use_ahy):
    phys, x, y, gamma = _problem(4, 6, 368, 320, "columns", seed=8, shared_maps=True)
    _poison_allocator(4 * 6 * 368 * 320 * 2)
    ahy = phys.A_adjoint(y) if use_ahy else None
    dims = phys.transform_dims(368, 320) if use_ahy else (-2, -1)  # A^H y, column mask: W only
    got = mri_dc_step_cuda(
        x, phys.coil_maps, phys.mask, None if use_ahy else y, ahy, gamma, -2 in dims, -1 in dims, level=2
    )
    want = phys.dc_step_reference(x, y, gamma)
    assert rel_err(got, want) < TOL


@needs_gpu
def test_auto_picks_level2_at_shipped_sizes(monkeypatch):
    monkeypatch.delenv(CUDA_LEVEL_ENV, raising=False)
    for (h, w), level in (((320, 320), 2), ((255, 257), 1)):
        phys, x, y, gamma = _problem(2, 3, h, w, "columns", seed=h + w)
        before = cuda_dc_level_runs()
        out = mbdl_fast.dc_step(phys, x, y, gamma, backend="cuda")
        after = cuda_dc_level_runs()
        assert after.get(level, 0) == before.get(level, 0) + 1, (h, w, before, after)
        assert rel_err(out, phys.dc_step_reference(x, y, gamma)) < TOL


@needs_gpu
@pytest.mark.parametrize("size", [(256, 256), (320, 320), (368, 640), (640, 368)], ids=str)
def test_shipped_sizes_run_with_callbacks(size, monkeypatch):
    """At the common sizes the plans must carry the LTO callbacks: a fallback there would be silently slow."""
    monkeypatch.setenv(CUDA_LEVEL_ENV, "1")  # auto would take Level 2 at most of these sizes
    ext = load_extension()
    h, w = size
    phys, x, y, gamma = _problem(2, 3, h, w, "columns", seed=h + w)
    stream = torch.cuda.current_stream().cuda_stream
    for y_arg, ahy in ((y, None), (None, phys.A_adjoint(y))):
        mbdl_fast.dc_step(phys, x, y_arg, gamma, backend="cuda", AHy=ahy)
        torch.cuda.synchronize()
    plans = [p for p in ext.dc_step_plans() if (p["H"], p["W"], p["planes"], p["stream"]) == (h, w, 6, stream)]
    plans = [p for p in plans if p["callbacks_requested"]]
    assert len(plans) == 2, plans  # the 2-D pair (y) and the 1-D pair (A^H y, column mask)
    for p in plans:
        assert p["fused"], p["note"]


@needs_gpu
def test_level1_shared_coil_maps(monkeypatch):
    monkeypatch.setenv(CUDA_LEVEL_ENV, "1")
    phys, x, y, gamma = _problem(4, 6, 320, 320, "columns", seed=5, shared_maps=True)
    _poison_allocator(4 * 6 * 320 * 320 * 2)
    got = mbdl_fast.dc_step(phys, x, y, gamma, backend="cuda")
    assert rel_err(got, phys.dc_step_reference(x, y, gamma)) < TOL


@needs_gpu
@pytest.mark.parametrize("case", [(1, 1, 256, 256), (8, 15, 320, 320), (3, 4, 255, 257), (2, 20, 368, 640)], ids=str)
@pytest.mark.parametrize("use_ahy", [False, True])
@pytest.mark.parametrize("level", ["1", "auto"])
def test_dc_step_cuda_forward_and_backward(case, use_ahy, level, monkeypatch):
    monkeypatch.setenv(CUDA_LEVEL_ENV, level)  # auto: Level 2 where the sizes have a path (the backward too)
    b, c, h, w = case
    phys, x0, y0, gamma0 = _problem(b, c, h, w, "columns", seed=h * w + b)
    results = {}
    for backend in ("torch", "cuda"):
        x = x0.clone().requires_grad_()
        y = y0.clone().requires_grad_()
        gamma = gamma0.clone().requires_grad_()
        ahy = phys.A_adjoint(y) if use_ahy else None
        if backend == "cuda":
            _poison_allocator(2 * b * c * h * w)
        out = mbdl_fast.dc_step(phys, x, None if use_ahy else y, gamma, backend=backend, AHy=ahy)
        weight = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3)).cuda()
        loss = (out * weight.conj()).real.sum()
        results[backend] = (out.detach(), *torch.autograd.grad(loss, (x, y, gamma)))
    for name, ours, ref in zip(("out", "dx", "dy", "dgamma"), results["cuda"], results["torch"], strict=True):
        assert rel_err(ours, ref) < TOL, name


@needs_gpu
def test_plans_cached_per_stream_and_shape():
    ext = load_extension()
    phys, x, y, gamma = _problem(2, 3, 64, 48, "columns", seed=1)
    mbdl_fast.dc_step(phys, x, y, gamma, backend="cuda")
    before = ext.dc_step_cache_size()
    for _ in range(3):
        mbdl_fast.dc_step(phys, x, y, gamma, backend="cuda")
    assert ext.dc_step_cache_size() == before
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        out = mbdl_fast.dc_step(phys, x, y, gamma, backend="cuda")
    side.synchronize()
    assert ext.dc_step_cache_size() == before + 1
    assert rel_err(out, phys.dc_step_reference(x, y, gamma)) < TOL


@needs_gpu
def test_threads_on_their_own_streams():
    phys, x, y, gamma = _problem(2, 4, 96, 80, "columns", seed=2)
    want = phys.dc_step_reference(x, y, gamma)
    errors: list[float] = []

    def work():
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            outs = [mbdl_fast.dc_step(phys, x, y, gamma, backend="cuda") for _ in range(5)]
        stream.synchronize()
        errors.extend(rel_err(o, want) for o in outs)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 20 and max(errors) < TOL


@needs_gpu
@pytest.mark.parametrize("size", [128, 256], ids=["level1", "level2"])
def test_cuda_graph_capture_and_replay(size):
    phys, x, y, gamma = _problem(2, 4, size, size, "columns", seed=3)
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on the capture stream makes its plans outside the capture
        for _ in range(2):
            mbdl_fast.dc_step(phys, static_x, y, gamma, backend="cuda", check_inputs=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        static_out = mbdl_fast.dc_step(phys, static_x, y, gamma, backend="cuda", check_inputs=False)
    for seed in range(3):
        new_x = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(seed)).cuda()
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(static_out, phys.dc_step_reference(new_x, y, gamma)) < TOL


@needs_gpu
def test_torch_compile_traces_around_the_cuda_op():
    phys, x, y, gamma = _problem(2, 3, 64, 64, "columns", seed=4)

    def step(x, y):
        return mbdl_fast.dc_step(phys, x, y, 0.5, backend="cuda", check_inputs=False) * 2

    compiled = torch.compile(step, fullgraph=True)
    assert rel_err(compiled(x, y), 2 * phys.dc_step_reference(x, y, 0.5)) < TOL


@needs_gpu
def test_opcheck_cuda_impl():
    phys, x, y, gamma = _problem(2, 2, 16, 12, "columns", seed=6)
    for y_arg, ahy, th in ((y, None, True), (None, phys.A_adjoint(y), False)):
        args = (x.requires_grad_(), phys.coil_maps, phys.mask, y_arg, ahy, gamma.requires_grad_(), th, True, "cuda")
        torch.library.opcheck(torch.ops.mbdl_fast.mri_dc_step.default, args)
